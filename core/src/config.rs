//! The one typed experiment config, read from TOML and overridden by `SPUR_*`
//! environment variables and `--set key=value` flags, then validated as a whole
//! before any role binds a port.
//!
//! Override keys are dotted paths into the TOML (`learner.lr`, `env.num_envs`). An
//! environment variable names the same path in upper case with `__` between the
//! section and the key: `SPUR_LEARNER__LR=0.001`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, WireError};
use crate::secret::Secret;

/// Prefix of every environment variable that overrides a config key.
pub const ENV_PREFIX: &str = "SPUR_";

/// Default of `transport.token_env`: the variable that holds the service token.
pub const DEFAULT_TOKEN_ENV: &str = "SPUR_SERVICE_TOKEN";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub env: EnvConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub actor: ActorConfig,
    #[serde(default)]
    pub learner: LearnerConfig,
    #[serde(default)]
    pub stop: StopConfig,
    #[serde(default)]
    pub intrinsic: IntrinsicConfig,
    #[serde(default)]
    pub reward_service: RewardServiceConfig,
    #[serde(default)]
    pub transport: TransportConfig,
}

/// How the roles reach each other over gRPC (`core/src/transport.rs` builds every
/// server and client from it): TLS, a shared bearer token, HTTP/2 keepalive. One
/// section serves both ends: in a cluster one CA signs every role's certificate, and
/// each certificate serves as the role's server and client identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// PEM certificate (chain) of this role: the server certificate of the learner and
    /// the reward service, and the client certificate every role presents for mutual
    /// TLS. Empty: servers speak plain HTTP/2 and clients present no certificate.
    pub tls_cert: String,
    /// PEM private key of `tls_cert`.
    pub tls_key: String,
    /// PEM CA certificate. Servers require client certificates signed by it (mutual
    /// TLS); clients verify servers against it and speak TLS, so with it set every
    /// address (`actor.learner_addr`, `reward_service.addr`, `--learner`) must use
    /// `https://`, and without it none may.
    pub tls_ca: String,
    /// Name of the environment variable that holds the bearer token every spur
    /// service requires and every client sends (not the health service). Unset or
    /// empty: no token is required or sent. The token never appears in logs,
    /// statuses or the run directory's `config.toml`.
    pub token_env: String,
    /// HTTP/2 keepalive of servers and clients, in ms: a ping after this long
    /// without traffic, and a peer that does not answer it within the same time is
    /// dropped, so a silently dead peer is noticed after about twice this.
    pub keepalive_ms: u64,
    /// The token read from `token_env` when the config was loaded; never written out.
    #[serde(skip)]
    pub token: Option<Secret>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
            token_env: DEFAULT_TOKEN_ENV.into(),
            keepalive_ms: 10_000,
            token: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RewardModelKind {
    /// The label table itself: a labelled text's reward is its label.
    Retrieval,
    /// A char-level CNN trained on the labels: reward 1 when p(helpful) > 0.5, so
    /// texts the judge has not seen yet get a reward too.
    Classification,
    /// A char-level CNN scalar trained on ranked pairs (Bradley–Terry, ties 0.5):
    /// reward is the score normalized by a running mean and std.
    Ranking,
}

impl RewardModelKind {
    /// The config spelling (`retrieval`, `classification`, `ranking`), for display.
    pub fn name(self) -> &'static str {
        match self {
            Self::Retrieval => "retrieval",
            Self::Classification => "classification",
            Self::Ranking => "ranking",
        }
    }
}

/// The one mapping onto the wire enum of `RewardModelUpdate.kind`.
impl From<RewardModelKind> for spur_proto::v1::RewardModelKind {
    fn from(kind: RewardModelKind) -> Self {
        match kind {
            RewardModelKind::Retrieval => Self::Retrieval,
            RewardModelKind::Classification => Self::Classification,
            RewardModelKind::Ranking => Self::Ranking,
        }
    }
}

/// The one mapping back from the wire: `RewardModelUpdate.kind` as prost holds it.
/// An unspecified or unknown value is an error naming the field.
impl TryFrom<i32> for RewardModelKind {
    type Error = WireError;

    fn try_from(value: i32) -> Result<Self, WireError> {
        use spur_proto::v1::RewardModelKind as Wire;
        match Wire::try_from(value) {
            Ok(Wire::Retrieval) => Ok(Self::Retrieval),
            Ok(Wire::Classification) => Ok(Self::Classification),
            Ok(Wire::Ranking) => Ok(Self::Ranking),
            Ok(Wire::Unspecified) => Err(WireError::Missing { field: "kind" }),
            Err(_) => Err(WireError::invalid(
                "kind",
                format!("unknown reward model kind {value}"),
            )),
        }
    }
}

/// How the learner mixes rewards:
/// `c_ext * clip(r_env, -clip_max, clip_max) + c_int * r_int(text) * count^(-beta)`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntrinsicConfig {
    /// Use intrinsic rewards from the reward service (`spur local` starts it).
    pub enabled: bool,
    pub model: RewardModelKind,
    pub c_ext: f64,
    pub c_int: f64,
    pub clip_max: f64,
    /// Repeat decay: the n-th occurrence of a text in an episode earns n^(-beta).
    pub beta: f64,
    /// `ranking`: normalized scores are clipped to [-rank_clip, rank_clip].
    pub rank_clip: f64,
}

impl Default for IntrinsicConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            model: RewardModelKind::Retrieval,
            c_ext: 1.0,
            c_int: 0.4,
            clip_max: 10.0,
            beta: 3.0,
            rank_clip: 3.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JudgeKind {
    /// The built-in rule judge: a stand-in for an LLM that labels by a pattern file.
    Rules,
    /// Any OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama).
    Openai,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RewardServiceConfig {
    /// Socket address the reward service binds.
    pub listen: String,
    /// Socket address of a second port that serves only gRPC health, without TLS or
    /// token (see `learner.health_listen`); empty: none.
    pub health_listen: String,
    /// Where actors and the learner reach it.
    pub addr: String,
    /// The label store (an embedded transactional database); it outlives runs.
    pub store: String,
    pub judge: JudgeKind,
    /// Pattern file of the rule judge.
    pub rules: String,
    /// Prompt template for labelling texts (`{goal}`, `{count}`, `{events}`).
    pub prompt: String,
    /// Prompt template for ranking pairs of texts (`ranking` reward model).
    pub rank_prompt: String,
    /// `ranking`: pairs each new text is judged in, against texts already judged
    /// (or other new ones).
    pub pairs_per_text: u32,
    /// The environment's goal, in words, for the prompt.
    pub goal: String,
    /// Most texts waiting for a label; the oldest are shed beyond it.
    pub backlog: u32,
    /// Texts per judge request.
    pub batch_size: u32,
    /// Judge requests in flight at once.
    pub max_concurrent: u32,
    pub timeout_ms: u64,
    /// Retries of a failed request (network error, timeout, 5xx, 429).
    pub retries: u32,
    /// Judge calls a text gets in one round when the answers cannot be parsed; a
    /// round that ends without a parsed answer is retried later
    /// (`unparseable_retries`).
    pub unparseable_budget: u32,
    /// Later rounds a text gets when every answer of a round (`unparseable_budget`
    /// calls) was unparseable; 0: it is stored as unparseable (reward 0, never
    /// positive) after the first round. Until then it waits, unlabelled.
    pub unparseable_retries: u32,
    /// Wait before the first later round of an unparseable text; doubles each round.
    pub unparseable_retry_ms: u64,
    /// Consecutive failed requests that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker pauses all requests.
    pub breaker_cooldown_ms: u64,
    pub openai_base_url: String,
    pub openai_model: String,
    /// Name of the environment variable holding the API key (the key is never logged).
    pub api_key_env: String,
    pub max_tokens: u32,
    /// Training steps of a distilled model each time new labels arrive.
    pub distill_steps: u32,
    pub distill_lr: f64,
}

impl Default for RewardServiceConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50052".into(),
            health_listen: String::new(),
            addr: "http://127.0.0.1:50052".into(),
            store: "runs/labels.redb".into(),
            judge: JudgeKind::Rules,
            rules: "judges/keyroom.rules".into(),
            prompt: "prompts/classify.txt".into(),
            rank_prompt: "prompts/rank.txt".into(),
            pairs_per_text: 2,
            goal: "prompts/keyroom-goal.txt".into(),
            backlog: 10_000,
            batch_size: 32,
            max_concurrent: 4,
            timeout_ms: 30_000,
            retries: 3,
            unparseable_budget: 2,
            unparseable_retries: 4,
            unparseable_retry_ms: 30_000,
            breaker_failures: 5,
            breaker_cooldown_ms: 10_000,
            openai_base_url: "http://127.0.0.1:8000/v1".into(),
            openai_model: "default".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            max_tokens: 2048,
            distill_steps: 30,
            distill_lr: 3e-3,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Name of the experiment; run directories are `<dir>/<name>-<unix time>`.
    pub name: String,
    /// Root folder for run directories.
    pub dir: String,
    /// Base seed; actor `i` (`--index i`) seeds its environments and sampling from
    /// `seed + 1000 * i`, an actor with only an id from `seed` plus a hash of the id.
    pub seed: u64,
    /// Number of actor processes `spur local` starts.
    pub actors: u32,
    /// Intra-op threads for libtorch in each process (1 avoids oversubscription when
    /// several roles share a machine).
    pub torch_threads: u32,
    /// Where each role serves Prometheus `/metrics` (`0.0.0.0:9100`); empty: off.
    /// `spur local` gives its children consecutive ports from this one (reward
    /// service, learner, then actors); port 0: each binds a free port and writes it
    /// to the file `$SPUR_METRICS_ADDR_FILE` names (`<run dir>/metrics/` in local mode).
    pub prometheus_listen: String,
    /// How long a role may take to stop after SIGTERM or Ctrl-C (the learner
    /// checkpoints, the reward service commits its labels, actors close their
    /// streams); whatever still runs after it is abandoned. On Kubernetes keep it
    /// below the pod's `terminationGracePeriodSeconds`.
    pub drain_timeout_ms: u64,
    /// `spur local`: how often each role (reward service, learner, each actor slot)
    /// is restarted after a crash before the run fails.
    pub max_restarts: u32,
    /// `spur local`: niceness added to each actor process (and so to the env bridges
    /// it starts), 0-19. On a shared machine the learner's update sets the pace; at a
    /// lower priority the actors run in its gaps instead of taking its cores. Each
    /// time an actor preempts a thread of a learner on two threads, the other thread
    /// waits for it too, so the default is the lowest priority, 19 (at 10, cartpole
    /// ran 0.9x as fast end to end on 2 cores). 0: the same priority as the learner.
    pub actor_nice: u32,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "spur".into(),
            dir: "runs".into(),
            seed: 1,
            actors: 2,
            torch_threads: 1,
            prometheus_listen: String::new(),
            drain_timeout_ms: 15_000,
            max_restarts: 3,
            actor_nice: 19,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EnvKind {
    Cartpole,
    Keyroom,
    /// UI-S1's semi-online mode over expert trajectories (`env.replay_path`).
    Replay,
    /// Any Gymnasium id (NetHack and MiniHack included) through the Python bridge
    /// (`bridge/python`), `env.gym_id` with `env.num_envs` envs per actor.
    Gym,
    /// A memory task: a cue shown only at the first step, `env.memory_delay` blank
    /// steps, then a query whose rewarded action is the cue. A feedforward policy
    /// cannot beat chance; a recurrent one can.
    Memory,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EnvConfig {
    pub kind: EnvKind,
    /// Environments each actor steps in lock-step.
    pub num_envs: u32,
    /// Episode step limit; 0 takes the environment's own (500 for cartpole,
    /// 4 * size^2 for keyroom).
    pub max_episode_steps: u32,
    /// Interior side length of the keyroom grid.
    pub keyroom_size: u32,
    /// `memory`: blank steps between the cue and the query.
    pub memory_delay: u32,
    /// `memory`: how many cues there are (and actions; chance is one in this many).
    pub memory_cues: u32,
    /// `replay`: JSONL file of expert trajectories (`spur expert` writes one).
    pub replay_path: String,
    /// `replay`: patches per episode (a mismatch after they are spent ends it).
    pub replay_patches: u32,
    /// `gym`: the Gymnasium id, e.g. `CartPole-v1`, `NetHackScore-v0`,
    /// `MiniHack-Room-5x5-v0`.
    pub gym_id: String,
    /// `gym`: env servers this actor steps (`host:port` for gRPC, `unix:PATH` for the
    /// unix wire), which split `num_envs` evenly; empty: the actor starts `servers`
    /// bridge processes itself.
    pub remote: Vec<String>,
    /// `gym`: bridge processes each actor starts when `remote` is empty.
    pub servers: u32,
    /// `gym`: the Python that runs the bridge; empty: `$VIRTUAL_ENV/bin/python`,
    /// then `.venv/bin/python`, then `python3`.
    pub python: String,
    /// `gym`, NetHack and MiniHack: side of the glyph crop around the hero (odd).
    pub crop: u32,
    /// `gym`: how often an actor restarts a bridge process that died before it gives
    /// up (with backoff between tries); the episodes that were running are lost and
    /// counted.
    pub bridge_restarts: u32,
    /// `gym`: how an actor talks to the bridge processes it starts itself: `unix` (the
    /// env service's messages in frames on a Unix socket, about a tenth of a
    /// millisecond a call beyond the envs' own work) or `grpc` (gRPC on a loopback port, about a millisecond a call in
    /// grpcio's server). `env.remote` addresses name their wire themselves
    /// (`host:port` is gRPC, `unix:PATH` the unix wire).
    pub bridge_wire: BridgeWire,
}

/// The wire between an actor and the bridge processes it starts (`env.bridge_wire`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BridgeWire {
    Unix,
    Grpc,
}

impl Default for EnvConfig {
    fn default() -> Self {
        Self {
            kind: EnvKind::Cartpole,
            num_envs: 32,
            max_episode_steps: 0,
            keyroom_size: 5,
            memory_delay: 4,
            memory_cues: 2,
            replay_path: String::new(),
            replay_patches: 1,
            gym_id: String::new(),
            remote: Vec::new(),
            servers: 1,
            python: String::new(),
            crop: 9,
            bridge_restarts: 5,
            bridge_wire: BridgeWire::Unix,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `auto` (the NetHack network for observations with a glyph crop, stats and a
    /// message, else the MLP), `mlp`, `nethack`, or `torchscript` (the module saved
    /// by `torch.jit.save` at `model.path`).
    pub arch: ModelArch,
    /// The TorchScript module file (`model.arch = "torchscript"` only). Its
    /// parameters replace the built-in network's; `hidden`, `core` and `core_size`
    /// do not apply.
    pub path: String,
    /// Hidden layer widths of the policy and value MLPs (`nethack`: the first is the
    /// width of the shared core).
    pub hidden: Vec<u32>,
    /// The actors' policies: `auto` (CUDA device 0 when torch sees one, else the CPU),
    /// `cpu`, `cuda` or `cuda:N` (a role told a CUDA device it lacks stops at start).
    pub device: String,
    /// Recurrent core between the torso and the policy and value heads: `none`
    /// (feedforward), `lstm` or `gru`. With a core, the MLP's torso is shared by both
    /// heads, actors carry one state per env and the learner re-runs each chunk's
    /// sequence from the state it started with (truncated BPTT over the rollout).
    pub core: CoreKind,
    /// Width of the recurrent core's hidden state (an LSTM's state holds twice this:
    /// hidden and cell).
    pub core_size: u32,
}

/// The recurrent core of a policy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CoreKind {
    #[default]
    None,
    Lstm,
    Gru,
}

/// Float type of weights on the wire (`learner.weights_dtype`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WeightsDtype {
    F32,
    #[default]
    F16,
    Bf16,
}

/// Widest recurrent core accepted (`model.core_size`).
pub const MAX_CORE_SIZE: u32 = 4096;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelArch {
    Auto,
    Mlp,
    Nethack,
    Torchscript,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: ModelArch::Auto,
            path: String::new(),
            hidden: vec![64, 64],
            device: "auto".into(),
            core: CoreKind::None,
            core_size: 128,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ActorConfig {
    /// Steps per trajectory chunk.
    pub rollout_len: u32,
    /// Learner address the actor connects to (`http://host:port`).
    pub learner_addr: String,
    /// Socket address of a port that serves only gRPC health, plain (no TLS, no
    /// token) whatever `[transport]` says: `spur.v1.Actor` is SERVING while the
    /// policy holds the learner's weights and the trajectory stream is open; empty:
    /// none (the actor serves nothing else).
    pub health_listen: String,
    /// Finished chunks an actor holds for sending before its rollout waits.
    pub send_queue: u32,
    /// Chunks sent to the learner but not yet acknowledged before sending waits.
    pub max_unacked_chunks: u32,
    /// Upper bound of the reconnect backoff, in milliseconds.
    pub max_backoff_ms: u64,
    /// Episodes per group for UI-S1's advantages: each actor's envs come in blocks of
    /// this many whose k-th episodes share a task seed (1: no groups).
    pub group_size: u32,
    /// Whether each actor steps its envs in two lanes (rollout loops on threads of
    /// their own, half of the envs and a copy of the policy each), one lane's envs
    /// stepping while the other lane is in the policy's forward pass: `auto` (for bridge envs,
    /// whose steps run in other processes; `spur local` makes it `off` when the machine
    /// has fewer than 2 cores for each actor and the learner), `on` or `off`.
    pub split_envs: SplitEnvs,
    /// Whether actors run the NetHack network through tables folded from each
    /// weight version (its embeddings folded into the convolutions that read them,
    /// `crop_fc`'s weight transposed once): the same outputs to float rounding in
    /// fewer, cheaper operations; `false` computes it as the learner does. Other
    /// networks are unaffected.
    pub fold_weights: bool,
}

/// `actor.split_envs`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SplitEnvs {
    #[default]
    Auto,
    On,
    Off,
}

impl Default for ActorConfig {
    fn default() -> Self {
        Self {
            rollout_len: 32,
            learner_addr: "http://127.0.0.1:50051".into(),
            health_listen: String::new(),
            send_queue: 1,
            max_unacked_chunks: 1,
            max_backoff_ms: 5000,
            group_size: 1,
            split_envs: SplitEnvs::Auto,
            fold_weights: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LearnerConfig {
    /// Socket address the learner's gRPC server binds (`127.0.0.1:0` picks a port).
    pub listen: String,
    /// Socket address of a second port that serves only gRPC health, without TLS or
    /// token, for probes that cannot present a client certificate (Kubernetes'
    /// `grpc:` probes); empty: none.
    pub health_listen: String,
    /// Environment steps per update (chunks are gathered until at least this many).
    pub batch_steps: u32,
    /// Passes over each batch.
    pub epochs: u32,
    /// Minibatches per pass.
    pub minibatches: u32,
    pub lr: f64,
    /// Decay the learning rate linearly over `stop.env_steps` (to 5% of `lr`).
    pub lr_anneal: bool,
    pub gamma: f64,
    /// V-trace trace-cutting lambda (1 is the classic IMPALA estimator).
    pub lambda: f64,
    /// V-trace importance weight clips.
    pub rho_clip: f64,
    pub c_clip: f64,
    /// PPO ratio clip.
    pub clip_eps: f64,
    /// Advantages are divided by max(std, this) per minibatch, so a batch with no
    /// reward signal does not turn into unit-size noise.
    pub advantage_std_floor: f64,
    pub value_coef: f64,
    pub entropy_coef: f64,
    pub max_grad_norm: f64,
    /// Stop an update's remaining minibatches once the estimated KL from the
    /// pre-update policy exceeds 1.5 times this (0: never).
    pub target_kl: f64,
    /// Chunks produced more than this many versions ago are dropped and counted.
    pub max_policy_lag: u64,
    /// Publish weights every this many updates.
    pub broadcast_every: u64,
    /// Capacity of the chunk queue; when it is full the learner stops reading streams.
    pub queue_capacity: u32,
    /// Write a checkpoint every this many updates (and always at the end).
    pub checkpoint_every: u64,
    /// Largest weights payload piece per message, in bytes.
    pub weights_chunk_bytes: u32,
    /// Float type of the weights sent to actors: `f16` (the default) or `bf16`, half
    /// the bytes to encode, send and load per actor, or `f32` (exact). Actors act on
    /// the rounded weights (within 2^-11 of the learner's, relative, as f16) and load
    /// them back into f32 variables; the chunks they send carry the log-probabilities
    /// of the policy they acted with, so the learner's importance ratios see the
    /// rounding as a little more policy lag. A tensor outside f16's range goes out as
    /// f32. Checkpoints are always f32.
    pub weights_dtype: WeightsDtype,
    /// HTTP/2 flow-control window of each stream the learner receives (a trajectory
    /// stream), in bytes: how much an actor may send before the learner has read it.
    /// A window smaller than a chunk costs a round trip per window's worth of bytes.
    pub stream_window_bytes: u32,
    /// HTTP/2 flow-control window of each connection to the learner, in bytes.
    pub connection_window_bytes: u32,
    /// `auto`, `cpu`, `cuda` or `cuda:N` for the learner's model (as `model.device`).
    pub device: String,
    /// How advantages are estimated: `vtrace` (off-policy corrected), `gae`, `uis1`
    /// (critic-free, over groups of episodes) or `hybrid` (V-trace plus UI-S1's
    /// episode-level term). `uis1` and `hybrid` need `actor.group_size` >= 2.
    pub advantage: AdvantageKind,
    /// UI-S1: discount of the step returns.
    pub gamma_step: f64,
    /// UI-S1: weights of the episode-level and step-level terms.
    pub w_episode: f64,
    pub w_step: f64,
    /// UI-S1: what the episode-level term scores: `extrinsic` (the sum of the
    /// environment's rewards, the task's outcome) or `mixed` (the sum of the mixed
    /// extrinsic and intrinsic reward).
    pub group_outcome: GroupOutcome,
    /// UI-S1's dynamic sampling: a group whose episodes' returns (of the mixed
    /// reward) have a standard deviation at or below this is dropped (and counted):
    /// `uis1` does not train on it, `hybrid` keeps only its V-trace term. 0 drops
    /// only groups whose returns are all equal.
    pub group_min_spread: f64,
    /// UI-S1: divide the episode-level and step-level terms by their group's
    /// standard deviation (UI-S1's `mean_std_norm`); `false` only subtracts the
    /// group's mean (`mean_norm`), so small return differences stay small.
    pub group_std_norm: bool,
    /// Groups whose episodes are still running, at most; the oldest beyond are given
    /// up (and counted).
    pub max_open_groups: u32,
    /// Weight of the imitation term (cross-entropy to the expert's action) on steps
    /// a `replay` env patched.
    pub imitation_coef: f64,
    /// Take each step's value and the old policy's log-probability from the actor
    /// that acted (sent with the chunk) instead of a forward pass of the learner over
    /// the batch before every update: standard PPO, as Sample Factory runs it, and one
    /// pass fewer per update (about 1/7 of the learner's work with 2 epochs). Only
    /// with `advantage = "gae"` (V-trace needs the current policy's log-probabilities)
    /// and a feedforward policy. Actors read the same key and send their values.
    pub actor_estimates: bool,
    /// Train the critic on value targets scaled by the running mean and standard
    /// deviation of all targets so far, and scale its outputs back before advantages
    /// are computed (Sample Factory's `normalize_returns`), so that the critic's
    /// gradient does not outweigh the policy's in a shared torso or under the one
    /// gradient-norm clip. The statistics are kept in checkpoints; `value_loss` is
    /// then on the scaled targets.
    pub normalize_returns: bool,
    /// With the feedforward MLP (separate policy and value MLPs, no core), compute
    /// PPO's gradients by the closed-form backward pass of `spur_core::mlp_grad`
    /// instead of autograd, with PPO's loss in plain loops over the rows: the same
    /// gradients in a fraction of the libtorch calls, which are much of a small
    /// network's update. `false` uses autograd. Minibatches
    /// with imitation terms always use autograd.
    pub explicit_mlp_gradients: bool,
    /// Threads each minibatch step runs on. An autograd network (the NetHack
    /// network, MLPs with `explicit_mlp_gradients = false`) splits the step's rows
    /// over them: each runs the forward and backward passes of its share, and their
    /// gradients add up to the minibatch's. The closed-form MLP update on the CPU
    /// runs in lock-step on two threads instead (more add nothing): every step's
    /// policy half on the training thread and its critic half on a helper, each with
    /// Adam over its own network, exchanging one small message per step. The helper
    /// threads start with the learner. 1: the training thread alone. 0 (the
    /// default): 2 on a CPU learner of a machine with 2 cores or more for the
    /// feedforward NetHack network and for the closed-form MLP, else 1. A recurrent
    /// policy's minibatch splits by whole sequences; minibatches with imitation terms
    /// use one thread. A learner on a GPU uses one thread whatever this says.
    pub threads: u32,
    /// With more than one thread per minibatch step, keep the training thread and
    /// each helper on CPUs of their own: the CPUs the process may use are dealt out
    /// in turn (on 2 cores, one each; on 16, eight each), so no two of them ever
    /// share a core. Unpinned, a lock-step partner woken by the other was at times
    /// placed on its waker's core, and the two took turns there while the other core
    /// idled (on 2 cores: cartpole end to end 0.9x as fast). Nothing is pinned when
    /// the process may use fewer CPUs than threads.
    pub pin_threads: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AdvantageKind {
    /// V-trace (IMPALA): truncated importance weights correct for the policy lag.
    Vtrace,
    /// Generalized advantage estimation with the current critic, no correction.
    Gae,
    /// UI-S1: step-level and episode-level z-scores within groups of episodes.
    Uis1,
    /// V-trace advantages as the step-level term plus UI-S1's episode-level term.
    Hybrid,
}

/// What UI-S1's episode-level term scores (`learner.group_outcome`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GroupOutcome {
    /// The episode's sum of environment rewards.
    Extrinsic,
    /// The episode's sum of mixed (extrinsic plus intrinsic) rewards.
    Mixed,
}

impl AdvantageKind {
    /// The estimators that train on whole groups of episodes sharing a task seed.
    pub fn is_grouped(self) -> bool {
        matches!(self, AdvantageKind::Uis1 | AdvantageKind::Hybrid)
    }
}

impl Default for LearnerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            health_listen: String::new(),
            batch_steps: 4096,
            epochs: 4,
            minibatches: 16,
            lr: 1e-3,
            lr_anneal: true,
            gamma: 0.99,
            lambda: 0.95,
            rho_clip: 1.0,
            c_clip: 1.0,
            clip_eps: 0.2,
            advantage_std_floor: 1e-3,
            value_coef: 0.5,
            entropy_coef: 0.0,
            max_grad_norm: 0.5,
            target_kl: 0.0,
            max_policy_lag: 8,
            broadcast_every: 1,
            queue_capacity: 4,
            checkpoint_every: 50,
            weights_chunk_bytes: 1 << 20,
            weights_dtype: WeightsDtype::F16,
            stream_window_bytes: 1 << 20,
            connection_window_bytes: 1 << 20,
            device: "auto".into(),
            advantage: AdvantageKind::Vtrace,
            gamma_step: 0.5,
            w_episode: 1.0,
            w_step: 1.0,
            group_outcome: GroupOutcome::Extrinsic,
            group_min_spread: 0.0,
            group_std_norm: true,
            max_open_groups: 4096,
            imitation_coef: 1.0,
            actor_estimates: false,
            normalize_returns: false,
            explicit_mlp_gradients: true,
            threads: 0,
            pin_threads: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StopConfig {
    /// Stop after this many environment steps (0: no limit).
    pub env_steps: u64,
    /// Stop early once the mean return of the last 100 episodes reaches this (0: off).
    pub target_return: f64,
}

impl Default for StopConfig {
    fn default() -> Self {
        Self {
            env_steps: 300_000,
            target_return: 0.0,
        }
    }
}

/// `Ok` when `ok`, else an error naming `key`.
/// HTTP/2's initial flow-control window (RFC 9113, 6.9.2): the smallest the learner
/// accepts.
const MIN_FLOW_WINDOW: u32 = 65_535;
/// The largest flow-control window HTTP/2 allows (2^31 - 1).
const MAX_FLOW_WINDOW: u32 = (1 << 31) - 1;

fn check(ok: bool, key: &str, message: &str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        })
    }
}

impl Config {
    /// Reads `path`, applies `SPUR_*` variables from `vars` and then `overrides`
    /// (`key=value`), and validates the result.
    pub fn load(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        let mut value: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin: path.map_or("<defaults>".into(), |p| p.display().to_string()),
            message: e.to_string(),
        })?;
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        let mut all: Vec<(String, String)> = vars
            .iter()
            .filter_map(|(k, v)| env_var_key(k).map(|key| (key, v.clone())))
            .collect();
        all.sort();
        for item in overrides {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::Override(item.clone()))?;
            all.push((k.trim().to_string(), v.trim().to_string()));
        }
        for (key, raw) in all {
            set_path(&mut value, &key, parse_scalar(&raw))?;
        }
        let mut config = Self::from_table(value)?;
        config.transport.token = Secret::from_vars(&config.transport.token_env, &vars);
        if config.env.kind == EnvKind::Replay {
            // Read the expert data now, so a bad file is a config error, not a crash.
            crate::env::replay::load_trajectories(Path::new(&config.env.replay_path)).map_err(
                |message| ConfigError::Invalid {
                    key: "env.replay_path".into(),
                    message,
                },
            )?;
        }
        Ok(config)
    }

    /// Parses a TOML string (no overrides) and validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: "<string>".into(),
            message: e.to_string(),
        })?;
        Self::from_table(table)
    }

    fn from_table(table: toml::Table) -> Result<Self, ConfigError> {
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::Invalid {
                    key: e.path().to_string(),
                    message: e.into_inner().to_string(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The resolved config as TOML, as written into every run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config is plain data and always serializes")
    }

    /// Checks every value, section by section; the error names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_run()?;
        self.validate_env()?;
        self.validate_model()?;
        self.validate_actor()?;
        self.validate_learner()?;
        self.validate_intrinsic()?;
        self.validate_reward_service()?;
        check(
            self.stop.target_return.is_finite(),
            "stop.target_return",
            "must be a finite number",
        )?;
        self.validate_transport()
    }

    /// The `[run]` keys.
    fn validate_run(&self) -> Result<(), ConfigError> {
        check(!self.run.name.is_empty(), "run.name", "must not be empty")?;
        check(
            self.run.prometheus_listen.is_empty()
                || self
                    .run
                    .prometheus_listen
                    .parse::<std::net::SocketAddr>()
                    .is_ok(),
            "run.prometheus_listen",
            "must be empty (off) or a socket address such as 0.0.0.0:9100",
        )?;
        check(self.run.actors >= 1, "run.actors", "must be at least 1")?;
        check(
            self.run.drain_timeout_ms >= 100,
            "run.drain_timeout_ms",
            "must be at least 100",
        )?;
        check(
            self.run.torch_threads >= 1,
            "run.torch_threads",
            "must be at least 1",
        )?;
        check(
            self.run.actor_nice <= 19,
            "run.actor_nice",
            "must be between 0 and 19 (the range of niceness an unprivileged process can add)",
        )?;
        Ok(())
    }

    /// The `[env]` keys.
    fn validate_env(&self) -> Result<(), ConfigError> {
        check(self.env.num_envs >= 1, "env.num_envs", "must be at least 1")?;
        if self.env.kind == EnvKind::Gym {
            let e = &self.env;
            check(
                !e.gym_id.is_empty(),
                "env.gym_id",
                "must name a Gymnasium id for env.kind = \"gym\"",
            )?;
            check(
                e.crop % 2 == 1 && e.crop <= 21,
                "env.crop",
                "must be odd and at most 21",
            )?;
            let servers = if e.remote.is_empty() {
                e.servers
            } else {
                e.remote.len() as u32
            };
            check(
                servers >= 1 && e.num_envs.is_multiple_of(servers),
                if e.remote.is_empty() {
                    "env.servers"
                } else {
                    "env.remote"
                },
                "the env servers must split env.num_envs evenly (at least one server)",
            )?;
        }
        check(
            (3..=64).contains(&self.env.keyroom_size),
            "env.keyroom_size",
            "must be between 3 and 64",
        )?;
        check(
            self.env.memory_delay <= 1000,
            "env.memory_delay",
            "must be at most 1000",
        )?;
        check(
            (2..=16).contains(&self.env.memory_cues),
            "env.memory_cues",
            "must be between 2 and 16",
        )?;
        Ok(())
    }

    /// The `[model]` keys.
    fn validate_model(&self) -> Result<(), ConfigError> {
        check(
            !self.model.hidden.is_empty() && self.model.hidden.iter().all(|&h| h > 0),
            "model.hidden",
            "must list at least one positive layer width",
        )?;
        self.validate_model_path()?;
        check(
            (1..=MAX_CORE_SIZE).contains(&self.model.core_size),
            "model.core_size",
            "must be between 1 and 4096",
        )?;
        check(
            crate::device::parse_device(&self.model.device).is_ok(),
            "model.device",
            "must be auto, cpu, cuda or cuda:N",
        )?;
        Ok(())
    }

    /// The `[actor]` keys, and how they fit `env.num_envs`.
    fn validate_actor(&self) -> Result<(), ConfigError> {
        check(
            (1..=crate::trajectory::MAX_GROUP_SIZE).contains(&self.actor.group_size)
                && self.env.num_envs.is_multiple_of(self.actor.group_size),
            "actor.group_size",
            "must be at least 1 and divide env.num_envs",
        )?;
        check(
            self.actor.split_envs != SplitEnvs::On
                || (self.env.num_envs / 2).is_multiple_of(self.actor.group_size)
                    && self.env.num_envs >= 2
                    && self.env.num_envs.is_multiple_of(2),
            "actor.split_envs",
            "`on` needs env.num_envs to split into two halves of whole groups",
        )?;
        check(
            self.actor.rollout_len >= 1,
            "actor.rollout_len",
            "must be at least 1",
        )?;
        check(
            self.actor.send_queue >= 1,
            "actor.send_queue",
            "must be at least 1",
        )?;
        check(
            self.actor.max_unacked_chunks >= 1,
            "actor.max_unacked_chunks",
            "must be at least 1",
        )?;
        check(
            self.actor.learner_addr.starts_with("http://")
                || self.actor.learner_addr.starts_with("https://"),
            "actor.learner_addr",
            "must start with http:// or https://",
        )?;
        Ok(())
    }

    /// The `[learner]` keys, and what the advantage estimator needs of the actors.
    fn validate_learner(&self) -> Result<(), ConfigError> {
        self.validate_learner_loss()?;
        let l = &self.learner;
        check(
            crate::device::parse_device(&l.device).is_ok(),
            "learner.device",
            "must be auto, cpu, cuda or cuda:N",
        )?;
        check(
            l.listen.parse::<std::net::SocketAddr>().is_ok(),
            "learner.listen",
            "must be a socket address such as 127.0.0.1:50051",
        )?;
        check(
            l.batch_steps >= 1,
            "learner.batch_steps",
            "must be at least 1",
        )?;
        check(l.epochs >= 1, "learner.epochs", "must be at least 1")?;
        check(
            l.threads <= 64,
            "learner.threads",
            "must be between 0 (auto) and 64",
        )?;
        check(
            !l.advantage.is_grouped() || self.actor.group_size >= 2,
            "learner.advantage",
            "uis1 and hybrid compare episodes within groups: set actor.group_size >= 2",
        )?;
        check(
            !l.actor_estimates || l.advantage == AdvantageKind::Gae,
            "learner.actor_estimates",
            "needs learner.advantage = \"gae\": V-trace and the group estimators need the \
             current policy's log-probabilities, which only the learner's own pass gives",
        )?;
        check(
            !l.actor_estimates || self.model.core == CoreKind::None,
            "learner.actor_estimates",
            "needs a feedforward policy (model.core = \"none\"): a recurrent learner \
             re-runs each sequence anyway",
        )?;
        check(
            (0.0..=1.0).contains(&l.gamma_step),
            "learner.gamma_step",
            "must be in [0, 1]",
        )?;
        for (value, key) in [
            (l.w_episode, "learner.w_episode"),
            (l.w_step, "learner.w_step"),
        ] {
            check(
                value.is_finite() && value >= 0.0,
                key,
                "must be a finite number >= 0",
            )?;
        }
        check(
            !l.advantage.is_grouped() || l.w_episode + l.w_step > 0.0,
            "learner.w_episode",
            "learner.w_episode and learner.w_step are both 0: the group estimators would have no advantage",
        )?;
        check(
            l.group_min_spread.is_finite() && l.group_min_spread >= 0.0,
            "learner.group_min_spread",
            "must be a finite number >= 0",
        )?;
        check(
            l.max_open_groups >= 1,
            "learner.max_open_groups",
            "must be at least 1",
        )?;
        check(
            l.minibatches >= 1,
            "learner.minibatches",
            "must be at least 1",
        )?;
        check(
            l.broadcast_every >= 1,
            "learner.broadcast_every",
            "must be at least 1",
        )?;
        check(
            l.queue_capacity >= 1,
            "learner.queue_capacity",
            "must be at least 1",
        )?;
        check(
            l.checkpoint_every >= 1,
            "learner.checkpoint_every",
            "must be at least 1",
        )?;
        check(
            l.weights_chunk_bytes >= 1024
                && (l.weights_chunk_bytes as usize) < spur_proto::MAX_MESSAGE_BYTES,
            "learner.weights_chunk_bytes",
            "must be at least 1024 and below the 16 MiB message limit",
        )?;
        for (key, bytes) in [
            ("learner.stream_window_bytes", l.stream_window_bytes),
            ("learner.connection_window_bytes", l.connection_window_bytes),
        ] {
            check(
                (MIN_FLOW_WINDOW..=MAX_FLOW_WINDOW).contains(&bytes),
                key,
                "must be between 65535 (HTTP/2's initial window) and 2147483647 \
                 (the largest window HTTP/2 allows)",
            )?;
        }
        Ok(())
    }

    /// The `[intrinsic]` keys.
    /// The optimizer and loss keys of `[learner]`.
    fn validate_learner_loss(&self) -> Result<(), ConfigError> {
        let l = &self.learner;
        check(
            l.lr > 0.0 && l.lr.is_finite(),
            "learner.lr",
            "must be a positive number",
        )?;
        check(
            (0.0..=1.0).contains(&l.gamma),
            "learner.gamma",
            "must be in [0, 1]",
        )?;
        check(
            (0.0..=1.0).contains(&l.lambda),
            "learner.lambda",
            "must be in [0, 1]",
        )?;
        check(l.rho_clip > 0.0, "learner.rho_clip", "must be positive")?;
        check(l.c_clip > 0.0, "learner.c_clip", "must be positive")?;
        check(
            l.clip_eps > 0.0 && l.clip_eps < 1.0,
            "learner.clip_eps",
            "must be in (0, 1)",
        )?;
        check(
            l.value_coef >= 0.0,
            "learner.value_coef",
            "must not be negative",
        )?;
        check(
            l.entropy_coef >= 0.0,
            "learner.entropy_coef",
            "must not be negative",
        )?;
        check(
            l.max_grad_norm > 0.0,
            "learner.max_grad_norm",
            "must be positive",
        )?;
        check(
            l.target_kl >= 0.0,
            "learner.target_kl",
            "must not be negative",
        )?;
        Ok(())
    }

    fn validate_intrinsic(&self) -> Result<(), ConfigError> {
        let i = &self.intrinsic;
        check(
            self.intrinsic.rank_clip > 0.0,
            "intrinsic.rank_clip",
            "must be positive",
        )?;
        check(
            i.c_ext.is_finite(),
            "intrinsic.c_ext",
            "must be a finite number",
        )?;
        check(
            i.c_int.is_finite(),
            "intrinsic.c_int",
            "must be a finite number",
        )?;
        check(i.clip_max > 0.0, "intrinsic.clip_max", "must be positive")?;
        check(i.beta >= 0.0, "intrinsic.beta", "must not be negative")?;
        Ok(())
    }

    /// The `[reward_service]` keys.
    fn validate_reward_service(&self) -> Result<(), ConfigError> {
        let r = &self.reward_service;
        check(
            self.reward_service.pairs_per_text >= 1,
            "reward_service.pairs_per_text",
            "must be at least 1",
        )?;
        check(
            r.listen.parse::<std::net::SocketAddr>().is_ok(),
            "reward_service.listen",
            "must be a socket address such as 127.0.0.1:50052",
        )?;
        check(
            r.addr.starts_with("http://") || r.addr.starts_with("https://"),
            "reward_service.addr",
            "must start with http:// or https://",
        )?;
        check(
            r.backlog >= 1,
            "reward_service.backlog",
            "must be at least 1",
        )?;
        check(
            (1..=1000).contains(&r.batch_size),
            "reward_service.batch_size",
            "must be between 1 and 1000",
        )?;
        check(
            r.max_concurrent >= 1,
            "reward_service.max_concurrent",
            "must be at least 1",
        )?;
        check(
            r.timeout_ms >= 1,
            "reward_service.timeout_ms",
            "must be at least 1",
        )?;
        check(
            r.unparseable_budget >= 1,
            "reward_service.unparseable_budget",
            "must be at least 1",
        )?;
        check(
            r.breaker_failures >= 1,
            "reward_service.breaker_failures",
            "must be at least 1",
        )?;
        check(
            r.openai_base_url.starts_with("http://") || r.openai_base_url.starts_with("https://"),
            "reward_service.openai_base_url",
            "must start with http:// or https://",
        )?;
        Ok(())
    }

    /// The `[transport]` keys and the schemes of the addresses they govern. Files
    /// are read when a role starts, not here: `--check-config` runs where the
    /// certificates are not mounted.
    /// `model.path` names a TorchScript file exactly when `model.arch` is
    /// `torchscript`; a recurrent core of the built-in kind does not wrap it.
    fn validate_model_path(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message: message.into(),
            })
        };
        if m.arch != ModelArch::Torchscript {
            if !m.path.is_empty() {
                return invalid(
                    "model.path",
                    "is only read with model.arch = \"torchscript\"; remove it or set the arch",
                );
            }
            return Ok(());
        }
        if m.path.is_empty() {
            return invalid(
                "model.path",
                "must name a TorchScript file (torch.jit.save) for model.arch = \"torchscript\"",
            );
        }
        if m.core != CoreKind::None {
            return invalid(
                "model.core",
                "must be none for model.arch = \"torchscript\" (the module carries its own state)",
            );
        }
        Ok(())
    }

    fn validate_transport(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        };
        let t = &self.transport;
        if t.tls_cert.is_empty() != t.tls_key.is_empty() {
            return Err(invalid(
                "transport.tls_key",
                "must be set together with transport.tls_cert",
            ));
        }
        if t.keepalive_ms < 10 {
            return Err(invalid("transport.keepalive_ms", "must be at least 10"));
        }
        let tls = !t.tls_ca.is_empty();
        let health = [
            (
                "learner.health_listen",
                self.learner.health_listen.as_str(),
                self.learner.listen.as_str(),
            ),
            (
                "reward_service.health_listen",
                self.reward_service.health_listen.as_str(),
                self.reward_service.listen.as_str(),
            ),
            // The actor serves nothing but health.
            ("actor.health_listen", self.actor.health_listen.as_str(), ""),
        ];
        for (key, value, main) in health {
            if value.is_empty() {
                continue;
            }
            match value.parse::<std::net::SocketAddr>() {
                Err(_) => {
                    return Err(invalid(
                        key,
                        "must be empty (off) or a socket address such as 0.0.0.0:50061",
                    ))
                }
                Ok(a) if a.port() != 0 && value == main => {
                    return Err(invalid(key, "must differ from the main listen address"))
                }
                Ok(_) => {}
            }
        }
        let addrs = [
            ("actor.learner_addr", &self.actor.learner_addr, true),
            (
                "reward_service.addr",
                &self.reward_service.addr,
                self.intrinsic.enabled,
            ),
        ];
        for (key, addr, used) in addrs {
            if used && addr.starts_with("https://") != tls {
                return Err(invalid(
                    key,
                    if tls {
                        "must start with https:// when transport.tls_ca is set"
                    } else {
                        "https:// needs transport.tls_ca, the CA that signed the servers' certificates"
                    },
                ));
            }
        }
        Ok(())
    }
}

/// `SPUR_LEARNER__LR` -> `learner.lr`; other variables -> None.
fn env_var_key(name: &str) -> Option<String> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    if !rest.contains("__") {
        return None;
    }
    Some(rest.to_ascii_lowercase().replace("__", "."))
}

/// A raw override value as TOML when it parses as one (numbers, booleans, arrays),
/// else as a plain string.
fn parse_scalar(raw: &str) -> toml::Value {
    let wrapped = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), ConfigError> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::Override(key.into()));
    }
    let (last, sections) = parts.split_last().expect("split always yields one part");
    let mut cur = table;
    for section in sections {
        let entry = cur
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| ConfigError::Invalid {
            key: key.into(),
            message: format!("`{section}` is not a section"),
        })?;
    }
    cur.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every config under `configs/` loads and validates, and the prompt, goal and
    /// rules files it names exist (paths are relative to the repository root).
    #[test]
    fn every_shipped_config_loads_and_names_files_that_exist() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut checked = 0;
        for entry in std::fs::read_dir(root.join("configs")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let config = match Config::load(Some(&path), [], &[]) {
                Ok(c) => c,
                // Expert data is made by `make semi-online`, not shipped.
                Err(ConfigError::Invalid { key, .. }) if key == "env.replay_path" => continue,
                Err(e) => panic!("{}: {e}", path.display()),
            };
            let rs = &config.reward_service;
            let mut named = vec![
                ("reward_service.prompt", &rs.prompt),
                ("reward_service.rank_prompt", &rs.rank_prompt),
                ("reward_service.goal", &rs.goal),
            ];
            if rs.judge == JudgeKind::Rules {
                named.push(("reward_service.rules", &rs.rules));
            }
            for (key, file) in named {
                assert!(
                    file.is_empty() || root.join(file).is_file(),
                    "{}: {key} = {file} does not exist",
                    path.display()
                );
            }
            checked += 1;
        }
        assert!(checked >= 10, "only {checked} configs checked");
    }

    #[test]
    fn defaults_are_valid() {
        Config::from_toml_str("").expect("defaults validate");
    }

    #[test]
    fn overrides_from_env_and_flags_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("spur-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "[learner]\nlr = 0.5\n[env]\nnum_envs = 3\n").unwrap();
        let vars = vec![
            ("SPUR_LEARNER__LR".to_string(), "0.25".to_string()),
            ("SPUR_ENV__KIND".to_string(), "keyroom".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ];
        let c = Config::load(Some(&path), vars, &["env.num_envs=7".into()]).unwrap();
        assert_eq!(c.learner.lr, 0.25);
        assert_eq!(c.env.kind, EnvKind::Keyroom);
        assert_eq!(c.env.num_envs, 7);
        let c = Config::load(Some(&path), Vec::new(), &["learner.lr=0.125".into()]).unwrap();
        assert_eq!(c.learner.lr, 0.125);
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = Config::from_toml_str("[learner]\nlr = -1.0\n").unwrap_err();
        assert!(err.to_string().contains("learner.lr"), "{err}");
        let err = Config::from_toml_str("[learner]\nlrr = 1.0\n").unwrap_err();
        assert!(err.to_string().contains("lrr"), "{err}");
        let err = Config::from_toml_str("[env]\nnum_envs = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("env.num_envs"), "{err}");
        let err = Config::from_toml_str("[env]\nkind = \"pong\"\n").unwrap_err();
        assert!(err.to_string().contains("env.kind"), "{err}");
        Config::from_toml_str("[run]\nactor_nice = 19\n").expect("the lowest priority");
        let err = Config::from_toml_str("[run]\nactor_nice = 20\n").unwrap_err();
        assert!(err.to_string().contains("run.actor_nice"), "{err}");
        // UI-S1's estimators need groups; groups must divide the envs.
        let err = Config::from_toml_str("[learner]\nadvantage = \"uis1\"\n").unwrap_err();
        assert!(err.to_string().contains("actor.group_size"), "{err}");
        let err =
            Config::from_toml_str("[env]\nnum_envs = 6\n[actor]\ngroup_size = 4\n").unwrap_err();
        assert!(err.to_string().contains("actor.group_size"), "{err}");
        // UI-S1's group keys: a known outcome, a spread and weights that make sense.
        let grouped = "[actor]\ngroup_size = 4\n[learner]\nadvantage = \"uis1\"\n";
        let c = Config::from_toml_str(&format!(
            "{grouped}group_outcome = \"mixed\"\ngroup_min_spread = 0.05\n"
        ))
        .unwrap();
        assert_eq!(c.learner.group_outcome, GroupOutcome::Mixed);
        for (bad, key) in [
            ("group_outcome = \"success\"", "learner.group_outcome"),
            ("group_min_spread = -0.1", "learner.group_min_spread"),
            ("w_step = -1.0", "learner.w_step"),
            ("w_step = 0.0\nw_episode = 0.0", "learner.w_episode"),
        ] {
            let err = Config::from_toml_str(&format!("{grouped}{bad}\n")).unwrap_err();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
        // A replay file that cannot be read is a config error naming the key.
        let err = Config::load(
            None,
            Vec::new(),
            &[
                "env.kind=replay".into(),
                "env.replay_path=/nonexistent/expert.jsonl".into(),
            ],
        )
        .unwrap_err();
        assert!(err.to_string().contains("env.replay_path"), "{err}");
        // Bridge envs need an id, an odd crop and servers that split the envs.
        let err = Config::from_toml_str("[env]\nkind = \"gym\"\n").unwrap_err();
        assert!(err.to_string().contains("env.gym_id"), "{err}");
        let gym = "[env]\nkind = \"gym\"\ngym_id = \"CartPole-v1\"\nnum_envs = 6\n";
        Config::from_toml_str(gym).expect("one server for 6 envs");
        let err = Config::from_toml_str(&format!("{gym}servers = 4\n")).unwrap_err();
        assert!(err.to_string().contains("env.servers"), "{err}");
        let err = Config::from_toml_str(&format!(
            "{gym}remote = [\"a:1\", \"b:2\", \"c:3\", \"d:4\"]\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("env.remote"), "{err}");
        let err = Config::from_toml_str(&format!("{gym}crop = 8\n")).unwrap_err();
        assert!(err.to_string().contains("env.crop"), "{err}");
        // Recurrent cores: a known kind and a sensible width.
        let c = Config::from_toml_str("[model]\ncore = \"gru\"\ncore_size = 32\n").unwrap();
        assert_eq!((c.model.core, c.model.core_size), (CoreKind::Gru, 32));
        let err = Config::from_toml_str("[model]\ncore = \"transformer\"\n").unwrap_err();
        assert!(err.to_string().contains("model.core"), "{err}");
        let err = Config::from_toml_str("[model]\ncore = \"lstm\"\ncore_size = 0\n").unwrap_err();
        assert!(err.to_string().contains("model.core_size"), "{err}");
        // Weights for actors: f16 unless asked, and a known float type.
        let c = Config::from_toml_str("").unwrap();
        assert_eq!(c.learner.weights_dtype, WeightsDtype::F16);
        let c = Config::from_toml_str("[learner]\nweights_dtype = \"f32\"\n").unwrap();
        assert_eq!(c.learner.weights_dtype, WeightsDtype::F32);
        let c = Config::from_toml_str("[learner]\nweights_dtype = \"bf16\"\n").unwrap();
        assert_eq!(c.learner.weights_dtype, WeightsDtype::Bf16);
        let err = Config::from_toml_str("[learner]\nweights_dtype = \"f8\"\n").unwrap_err();
        assert!(err.to_string().contains("learner.weights_dtype"), "{err}");
    }

    #[test]
    fn learner_threads_at_most_64() {
        let c = Config::from_toml_str("[learner]\nthreads = 64\n").unwrap();
        assert_eq!(c.learner.threads, 64);
        assert_eq!(LearnerConfig::default().threads, 0);
        assert!(LearnerConfig::default().pin_threads);
        let c = Config::from_toml_str("[learner]\npin_threads = false\n").unwrap();
        assert!(!c.learner.pin_threads);
        for bad in [65, 1000] {
            let err = Config::from_toml_str(&format!("[learner]\nthreads = {bad}\n")).unwrap_err();
            assert!(err.to_string().contains("learner.threads"), "{err}");
        }
    }

    #[test]
    fn actor_estimates_need_gae_and_a_feedforward_policy() {
        let gae = "[learner]\nactor_estimates = true\nadvantage = \"gae\"\n";
        let c = Config::from_toml_str(gae).expect("GAE with a feedforward policy");
        assert!(c.learner.actor_estimates);
        let err = Config::from_toml_str("[learner]\nactor_estimates = true\n").unwrap_err();
        assert!(err.to_string().contains("learner.actor_estimates"), "{err}");
        assert!(err.to_string().contains("gae"), "{err}");
        let err = Config::from_toml_str(&format!("{gae}[model]\ncore = \"lstm\"\n")).unwrap_err();
        assert!(err.to_string().contains("learner.actor_estimates"), "{err}");
        assert!(err.to_string().contains("model.core"), "{err}");
    }

    #[test]
    fn flow_windows_stay_within_what_http2_allows() {
        let c = Config::from_toml_str(
            "[learner]\nstream_window_bytes = 65535\nconnection_window_bytes = 2147483647\n",
        )
        .expect("both ends of the range");
        assert_eq!(c.learner.stream_window_bytes, 65_535);
        for key in ["stream_window_bytes", "connection_window_bytes"] {
            for bad in [0u64, 65_534, 2_147_483_648] {
                let err = Config::from_toml_str(&format!("[learner]\n{key} = {bad}\n"))
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(&format!("learner.{key}")), "{bad}: {err}");
            }
        }
    }

    #[test]
    fn torchscript_needs_a_path_and_only_it_takes_one() {
        let ts = "[model]\narch = \"torchscript\"\n";
        let c = Config::from_toml_str(&format!("{ts}path = \"m.pt\"\n")).unwrap();
        assert_eq!(
            (c.model.arch, c.model.path.as_str()),
            (ModelArch::Torchscript, "m.pt")
        );
        let err = Config::from_toml_str(ts).unwrap_err();
        assert!(err.to_string().contains("model.path"), "{err}");
        let err = Config::from_toml_str("[model]\npath = \"m.pt\"\n").unwrap_err();
        assert!(err.to_string().contains("model.path"), "{err}");
        let err =
            Config::from_toml_str(&format!("{ts}path = \"m.pt\"\ncore = \"gru\"\n")).unwrap_err();
        assert!(err.to_string().contains("model.core"), "{err}");
    }

    #[test]
    fn transport_keys_are_checked_by_name() {
        let err = Config::from_toml_str("[transport]\ntls_cert = \"c.pem\"\n").unwrap_err();
        assert!(err.to_string().contains("transport.tls_key"), "{err}");
        let err = Config::from_toml_str("[transport]\nkeepalive_ms = 0\n").unwrap_err();
        assert!(err.to_string().contains("transport.keepalive_ms"), "{err}");
        // A CA means TLS: every address it governs must say https, and only then.
        let err = Config::from_toml_str("[transport]\ntls_ca = \"ca.pem\"\n").unwrap_err();
        assert!(err.to_string().contains("actor.learner_addr"), "{err}");
        let err = Config::from_toml_str("[actor]\nlearner_addr = \"https://l:1\"\n").unwrap_err();
        assert!(err.to_string().contains("actor.learner_addr"), "{err}");
        let tls = "[transport]\ntls_ca = \"ca.pem\"\n[actor]\nlearner_addr = \"https://l:1\"\n";
        Config::from_toml_str(tls).expect("https with a CA");
        let err =
            Config::from_toml_str(&format!("{tls}[intrinsic]\nenabled = true\n")).unwrap_err();
        assert!(err.to_string().contains("reward_service.addr"), "{err}");
        let err = Config::from_toml_str("[learner]\nhealth_listen = \"probe\"\n").unwrap_err();
        assert!(err.to_string().contains("learner.health_listen"), "{err}");
        let err = Config::from_toml_str("[actor]\nhealth_listen = \"50063\"\n").unwrap_err();
        assert!(err.to_string().contains("actor.health_listen"), "{err}");
        Config::from_toml_str("[actor]\nhealth_listen = \"0.0.0.0:50063\"\n").expect("a port");
        let err = Config::from_toml_str(
            "[reward_service]\nlisten = \"0.0.0.0:7\"\nhealth_listen = \"0.0.0.0:7\"\n",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("reward_service.health_listen"),
            "{err}"
        );
    }

    #[test]
    fn the_token_comes_from_its_variable_and_is_never_written_out() {
        let vars = vec![("SPUR_SERVICE_TOKEN".to_string(), "t0ken-x9".to_string())];
        let c = Config::load(None, vars.clone(), &[]).unwrap();
        assert_eq!(c.transport.token.as_ref().unwrap().expose(), "t0ken-x9");
        assert!(!c.to_toml().contains("t0ken-x9"));
        assert!(!format!("{c:?}").contains("t0ken-x9"));
        // The variable's name is configurable; another name leaves auth off.
        let c = Config::load(None, vars, &["transport.token_env=OTHER_TOKEN".into()]).unwrap();
        assert!(c.transport.token.is_none());
        // The token itself is no config key.
        let err = Config::from_toml_str("[transport]\ntoken = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("token"), "{err}");
    }

    #[test]
    fn resolved_config_round_trips() {
        let c = Config::from_toml_str("[run]\nname = \"x\"\n").unwrap();
        assert_eq!(Config::from_toml_str(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn reward_model_kind_round_trips_the_wire_and_rejects_unknown_values() {
        for kind in [
            RewardModelKind::Retrieval,
            RewardModelKind::Classification,
            RewardModelKind::Ranking,
        ] {
            let wire = spur_proto::v1::RewardModelKind::from(kind) as i32;
            assert_eq!(RewardModelKind::try_from(wire), Ok(kind));
        }
        assert_eq!(
            RewardModelKind::try_from(0),
            Err(WireError::Missing { field: "kind" })
        );
        let err = RewardModelKind::try_from(99).unwrap_err();
        assert!(err.to_string().contains("`kind`"), "{err}");
    }
}
