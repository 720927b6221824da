//! The environment bridge end to end: Gymnasium envs served by `python -m spur_bridge`
//! and stepped over both wires (gRPC, and frames on a Unix socket), compared with
//! stepping the same envs directly in Python; bad requests, answered alike on both; a vanished server; a killed bridge restarted (by a batch and
//! under a training actor, which fails instead once `env.bridge_restarts` is spent)
//! and a remote server reconnected; and NetHack through an actor, with its messages
//! reaching the reward service.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use spur_core::config::{BridgeWire, Config, EnvKind};
use spur_core::env::{EnvBatch, StepOutcome};
use spur_core::EnvError;
use spur_env_bridge::{python, BridgeProcess, EnvClient, RemoteBatch};
use spur_proto::v1::{RenderRequest, ResetRequest, RewardStatusRequest, StepRequest};
use spur_tests::{spawn_actor, tiny_cartpole, TestLearner, TestRewardService};

fn gym_config(gym_id: &str, num_envs: u32) -> Config {
    let mut c = tiny_cartpole(0);
    c.env.kind = EnvKind::Gym;
    c.env.gym_id = gym_id.into();
    c.env.num_envs = num_envs;
    c
}

/// Resets every env with `seeds[i]`, then steps with `actions[t]`, resetting an ended
/// env with the next seed of `more_seeds`; returns every observation seen, in order.
fn play(
    batch: &mut dyn EnvBatch,
    seeds: &[u64],
    actions: &[Vec<i64>],
    more_seeds: &[u64],
) -> Vec<Vec<f32>> {
    let n = batch.num_envs();
    let d = batch.spec().obs_dim;
    let mut obs = vec![0.0; n * d];
    let mut texts = vec![String::new(); n];
    let mut outcomes = vec![StepOutcome::default(); n];
    let all: Vec<usize> = (0..n).collect();
    batch.reset(&all, seeds, &mut obs).unwrap();
    let mut seen = vec![obs.clone()];
    let mut next_seed = more_seeds.iter();
    for a in actions {
        batch.step(a, &mut obs, &mut texts, &mut outcomes).unwrap();
        seen.push(obs.clone());
        let ended: Vec<usize> = (0..n)
            .filter(|&i| outcomes[i].terminated || outcomes[i].truncated)
            .collect();
        if !ended.is_empty() {
            let s: Vec<u64> = ended.iter().map(|_| *next_seed.next().unwrap()).collect();
            batch.reset(&ended, &s, &mut obs).unwrap();
            seen.push(obs.clone());
        }
    }
    seen
}

/// The same protocol as `play`, run by Gymnasium directly in Python (no bridge).
const DIRECT: &str = r#"
import json, sys
import gymnasium as gym
import numpy as np
job = json.load(sys.stdin)
envs = [gym.make(job["id"]) for _ in job["seeds"]]
obs = [np.asarray(e.reset(seed=s)[0], dtype=np.float32) for e, s in zip(envs, job["seeds"])]
seen = [np.concatenate(obs).tolist()]
more = iter(job["more_seeds"])
for actions in job["actions"]:
    ended = []
    for i, (e, a) in enumerate(zip(envs, actions)):
        o, r, term, trunc, _ = e.step(a)
        obs[i] = np.asarray(o, dtype=np.float32)
        if term or trunc:
            ended.append(i)
    seen.append(np.concatenate(obs).tolist())
    if ended:
        for i in ended:
            obs[i] = np.asarray(envs[i].reset(seed=next(more))[0], dtype=np.float32)
        seen.append(np.concatenate(obs).tolist())
json.dump(seen, sys.stdout)
"#;

#[test]
fn cartpole_through_the_bridge_matches_gymnasium() {
    // Two bridge processes of two envs each: offsets and the split are exercised.
    let mut config = gym_config("CartPole-v1", 4);
    config.env.servers = 2;
    let seeds = [11u64, 12, 13, 14];
    // A fixed, uneven action pattern: episodes end at different steps.
    let actions: Vec<Vec<i64>> = (0..120)
        .map(|t| (0..4).map(|i| ((t * (i + 2) / 3 + i) % 2) as i64).collect())
        .collect();
    let more_seeds: Vec<u64> = (100..400).collect();
    let mut through = Vec::new();
    for wire in [BridgeWire::Unix, BridgeWire::Grpc] {
        config.env.bridge_wire = wire;
        let mut batch = RemoteBatch::connect(&config.env, 4).expect("bridges start");
        let prefix = batch.bridges()[0].addr.starts_with("unix:");
        assert_eq!(prefix, wire == BridgeWire::Unix, "{:?}", batch.bridges());
        assert_eq!(batch.spec().obs_dim, 4);
        assert_eq!(batch.spec().num_actions, 2);
        assert_eq!(batch.spec().max_episode_steps, 500);
        through.push((wire, play(&mut batch, &seeds, &actions, &more_seeds)));
    }

    let job = serde_json::json!({
        "id": "CartPole-v1", "seeds": seeds, "actions": actions, "more_seeds": more_seeds,
    });
    let mut child = Command::new(python(&config.env))
        .args(["-c", DIRECT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the venv python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "direct gymnasium run failed");
    let direct: Vec<Vec<f32>> = serde_json::from_slice(&out.stdout).unwrap();

    for (wire, through_bridge) in through {
        assert!(
            through_bridge.len() > actions.len() + 3,
            "some episodes ended and were reset"
        );
        assert_eq!(
            through_bridge.len(),
            direct.len(),
            "{wire:?}: the same episode ends"
        );
        for (t, (a, b)) in through_bridge.iter().zip(&direct).enumerate() {
            assert_eq!(a, b, "{wire:?}: observations differ at record {t}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() {
    for wire in [BridgeWire::Unix, BridgeWire::Grpc] {
        let mut config = gym_config("CartPole-v1", 4);
        config.env.bridge_wire = wire;
        bad_requests_are_refused(&config).await;
    }

    // An unknown id: the bridge says so, and the actor-side error carries it.
    let config_bad = gym_config("NoSuchEnv-v7", 2);
    let err = tokio::task::spawn_blocking(move || RemoteBatch::connect(&config_bad.env, 2).err())
        .await
        .unwrap()
        .expect("an unknown env id fails");
    assert!(matches!(err, EnvError::Spawn { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("unknown environment id 'NoSuchEnv-v7'"),
        "{err}"
    );
}

/// The refusals one bridge process on `config`'s wire gives: the right status, a
/// message naming what is wrong, and a server that keeps serving.
async fn bad_requests_are_refused(config: &Config) {
    let (bridge, addr) = BridgeProcess::spawn(&config.env, 4).unwrap();
    let mut c = EnvClient::connect(&addr).await.unwrap();

    let e = c
        .step(StepRequest {
            actions: vec![0, 1, 0, 1],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("reset it first"), "{e:?}");

    let e = c
        .reset(ResetRequest {
            env_indices: vec![],
            seeds: vec![1, 2],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("4 envs to reset but 2 seeds"), "{e:?}");
    let e = c
        .reset(ResetRequest {
            env_indices: vec![7],
            seeds: vec![1],
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("env index 7 is outside 0..3"), "{e:?}");

    c.reset(ResetRequest {
        env_indices: vec![],
        seeds: vec![1, 2, 3, 4],
    })
    .await
    .unwrap();
    let e = c
        .step(StepRequest {
            actions: vec![0, 1],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .contains("expected 4 actions (one per env), got 2"),
        "{e:?}"
    );
    let e = c
        .step(StepRequest {
            actions: vec![0, 1, 5, 0],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("action 5 for env 2 is outside 0..1"),
        "{e:?}"
    );
    let e = c.render(RenderRequest { env_index: 9 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // CartPole has no picture.
    let r = c.render(RenderRequest { env_index: 0 }).await.unwrap();
    assert!(r.text.is_empty());
    // The server kept going: a good step still works.
    let r = c
        .step(StepRequest {
            actions: vec![0, 1, 1, 0],
        })
        .await
        .unwrap();
    assert_eq!(r.rewards.len(), 4);
    assert_eq!(r.observations.len(), 4 * 4 * 4);
    drop(bridge);
}

#[test]
fn a_vanished_or_mismatched_server_is_an_error() {
    let config = gym_config("CartPole-v1", 2);
    let (bridge, addr) = BridgeProcess::spawn(&config.env, 2).unwrap();

    // A server of another env id is refused at connect.
    let mut other = gym_config("Acrobot-v1", 2);
    other.env.remote = vec![addr.clone()];
    let err = RemoteBatch::connect(&other.env, 2)
        .err()
        .expect("the ids differ");
    assert!(
        err.to_string()
            .contains("serves CartPole-v1, not env.gym_id = Acrobot-v1"),
        "{err}"
    );
    // So is a wrong env count.
    let mut remote = config.clone();
    remote.env.remote = vec![addr];
    let err = RemoteBatch::connect(&remote.env, 4)
        .err()
        .expect("2 envs, not 4");
    assert!(err.to_string().contains("hold 2 envs in all"), "{err}");

    // The server goes away mid-run for good: two reconnects are tried, then the
    // error names the server.
    remote.env.bridge_restarts = 2;
    let mut batch = RemoteBatch::connect(&remote.env, 2).unwrap();
    let mut obs = vec![0.0; 8];
    batch.reset(&[0, 1], &[1, 2], &mut obs).unwrap();
    drop(bridge);
    let mut texts = vec![String::new(); 2];
    let mut outcomes = vec![StepOutcome::default(); 2];
    let err = batch
        .step(&[0, 1], &mut obs, &mut texts, &mut outcomes)
        .expect_err("nobody serves any more");
    assert!(
        matches!(err, EnvError::BridgeFailed { restarts: 2, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&format!("env server {} (envs 0..2)", remote.env.remote[0]))
            && text.contains("env.bridge_restarts is used up (2 restarts tried)"),
        "{text}"
    );
}

/// Steps every env of `batch` with action 0 once; returns the outcomes.
fn step_all(batch: &mut RemoteBatch, obs: &mut [f32]) -> Result<Vec<StepOutcome>, EnvError> {
    let n = batch.num_envs();
    let mut texts = vec![String::new(); n];
    let mut outcomes = vec![StepOutcome::default(); n];
    batch.step(&vec![0; n], obs, &mut texts, &mut outcomes)?;
    Ok(outcomes)
}

/// Sends `signal` (`-9`, `-TERM`) to `pid`.
fn kill(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}

fn kill_9(pid: u32) {
    kill("-9", pid);
}

#[test]
fn a_killed_bridge_is_restarted_and_its_episodes_are_lost() {
    let mut config = gym_config("CartPole-v1", 4);
    config.env.servers = 2;
    let mut batch = RemoteBatch::connect(&config.env, 4).unwrap();
    let before = batch.bridges();
    assert_eq!(before.len(), 2);
    assert_eq!(before[1].envs, 2..4);
    let pid = before[1].pid.expect("a bridge this batch started");
    let mut obs = vec![0.0; 16];
    batch.reset(&[0, 1, 2, 3], &[1, 2, 3, 4], &mut obs).unwrap();
    let first = obs.clone();
    assert!(step_all(&mut batch, &mut obs)
        .unwrap()
        .iter()
        .all(|o| !o.lost));

    kill_9(pid);
    let kept = obs.clone();
    let out = step_all(&mut batch, &mut obs).unwrap();
    let lost: Vec<bool> = out.iter().map(|o| o.lost).collect();
    assert_eq!(lost, [false, false, true, true]);
    assert_eq!(obs[8..], kept[8..], "lost envs keep their last observation");
    let after = batch.bridges();
    assert_eq!(after[1].restarts, 1);
    assert_eq!(batch.restarts(), 1);
    assert!(after[1].pid.is_some() && after[1].pid != Some(pid));
    assert_ne!(
        after[1].addr, before[1].addr,
        "a new bridge on a new socket"
    );
    assert_eq!(after[0], before[0], "the other bridge is untouched");
    // The killed bridge's socket directory went with it.
    let socket_dir = |addr: &str| {
        let path = addr
            .strip_prefix("unix:")
            .expect("the unix wire by default");
        std::path::Path::new(path).parent().unwrap().to_path_buf()
    };
    assert!(!socket_dir(&before[1].addr).exists(), "{}", before[1].addr);
    assert!(socket_dir(&after[1].addr).exists(), "{}", after[1].addr);

    // Lost envs must be reset before they step again; then all is as before.
    let err = step_all(&mut batch, &mut obs).unwrap_err();
    assert!(err.to_string().contains("must be reset"), "{err}");
    batch.reset(&[2, 3], &[3, 4], &mut obs).unwrap();
    // The seeds of the first reset: the same first observations.
    assert_eq!(obs[8..], first[8..]);
    assert!(step_all(&mut batch, &mut obs)
        .unwrap()
        .iter()
        .all(|o| !o.lost));

    // A bridge that dies while its envs are being reset: restarted, and the reset
    // is done on the new one.
    let pid = batch.bridges()[0].pid.unwrap();
    kill_9(pid);
    batch.reset(&[1], &[2], &mut obs).unwrap();
    assert_eq!(obs[4..8], first[4..8]);
    assert_eq!(batch.bridges()[0].restarts, 1);
    // Env 0 was not asked for: its episode is reported lost at the next step.
    let lost: Vec<bool> = step_all(&mut batch, &mut obs)
        .unwrap()
        .iter()
        .map(|o| o.lost)
        .collect();
    assert_eq!(lost, [true, false, false, false]);
    // Every socket directory goes with the batch.
    let dirs: Vec<_> = batch
        .bridges()
        .iter()
        .map(|b| socket_dir(&b.addr))
        .collect();
    drop(batch);
    for d in dirs {
        assert!(!d.exists(), "{}", d.display());
    }
}

/// A bridge process started by a test; killed when dropped.
struct TestBridge(std::process::Child);

impl Drop for TestBridge {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `python -m spur_bridge` for `config` listening on `listen` (with `extra`
/// flags); returns it once it serves.
fn bridge_at(config: &Config, listen: &str, num_envs: usize, extra: &[&str]) -> TestBridge {
    use std::io::BufRead;
    let mut child = Command::new(python(&config.env))
        .args(["-m", "spur_bridge", "--listen", listen])
        .args(["--env-id", &config.env.gym_id])
        .args(["--num-envs", &num_envs.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the venv python runs");
    let stdout = child.stdout.take().unwrap();
    let ready = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("SPUR_BRIDGE_LISTENING "));
    let bridge = TestBridge(child);
    assert!(ready, "the bridge on {listen} serves");
    bridge
}

#[test]
fn a_remote_server_that_comes_back_is_reconnected() {
    // A sidecar on a port: it comes back on the same address.
    let mut config = gym_config("CartPole-v1", 2);
    config.env.bridge_wire = BridgeWire::Grpc;
    let (bridge, addr) = BridgeProcess::spawn(&config.env, 2).unwrap();
    let mut remote = config.clone();
    remote.env.remote = vec![addr.clone()];
    let mut batch = RemoteBatch::connect(&remote.env, 2).unwrap();
    assert_eq!(batch.bridges()[0].pid, None, "not a bridge of this batch");
    let mut obs = vec![0.0; 8];
    batch.reset(&[0, 1], &[1, 2], &mut obs).unwrap();
    step_all(&mut batch, &mut obs).unwrap();

    // The server restarts on the same address (as a sidecar would) while the batch
    // tries to reach it.
    drop(bridge);
    let (config_b, addr_b) = (config.clone(), addr.clone());
    let back = std::thread::spawn(move || bridge_at(&config_b, &addr_b, 2, &[]));
    let out = step_all(&mut batch, &mut obs).unwrap();
    assert!(out.iter().all(|o| o.lost), "{out:?}");
    assert!(batch.restarts() >= 1);
    assert_eq!(batch.bridges()[0].addr, addr);
    batch.reset(&[0, 1], &[5, 6], &mut obs).unwrap();
    let out = step_all(&mut batch, &mut obs).unwrap();
    assert!(out.iter().all(|o| !o.lost && o.reward == 1.0), "{out:?}");
    drop(back.join().unwrap());
}

/// A bridge whose actor was killed gets SIGTERM (the parent-death signal) and removes
/// its socket and the directory made for it, which the killed actor cannot.
#[test]
fn a_stopped_bridge_removes_its_socket_directory() {
    let config = gym_config("CartPole-v1", 2);
    for remove in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("env.sock");
        let listen = format!("unix:{}", sock.display());
        let flags: &[&str] = if remove {
            &["--remove-socket-dir"]
        } else {
            &[]
        };
        let mut bridge = bridge_at(&config, &listen, 2, flags);
        assert!(sock.exists(), "serving on {listen}");
        kill("-TERM", bridge.0.id());
        let exit = bridge.0.wait().unwrap();
        assert!(exit.success(), "a clean stop: {exit}");
        assert!(!sock.exists(), "the socket goes either way");
        assert_eq!(dir.path().exists(), !remove, "remove-socket-dir {remove}");
    }
}

/// NLE ignores Gymnasium's reset seed; the bridge seeds the game itself, so a seed
/// is a dungeon: grouped rollouts (UI-S1) compare episodes of one task.
#[test]
fn nethack_seeds_pick_the_dungeon() {
    for id in ["NetHackScore-v0", "MiniHack-Room-5x5-v0"] {
        let config = gym_config(id, 3);
        let mut batch = RemoteBatch::connect(&config.env, 3).unwrap();
        let d = batch.spec().obs_dim;
        let mut obs = vec![0.0; 3 * d];
        batch.reset(&[0, 1, 2], &[7, 7, 8], &mut obs).unwrap();
        // (`assert!`, not `assert_eq!`: a failure would print 700 floats.)
        assert!(obs[..d] == obs[d..2 * d], "{id}: one seed, one dungeon");
        assert!(
            obs[..d] != obs[2 * d..],
            "{id}: another seed, another dungeon"
        );
        let first = obs[..d].to_vec();
        batch.reset(&[2], &[7], &mut obs).unwrap();
        assert!(
            obs[2 * d..] == first[..],
            "{id}: the seed repeats its dungeon"
        );
        // `spur eval` draws NetHack's map: the hero is on it.
        let picture = batch.render_text(2).expect("NetHack renders");
        assert!(
            picture.contains('@') && picture.contains("HP "),
            "{picture}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nethack_messages_reach_the_reward_service() -> anyhow::Result<()> {
    let store = std::env::temp_dir().join(format!("spur-nethack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&store);
    let mut config = gym_config("NetHackScore-v0", 4);
    config.model.hidden = vec![64];
    config.learner.batch_steps = 256;
    config.learner.minibatches = 2;
    config.learner.epochs = 1;
    config.actor.rollout_len = 16;
    config.intrinsic.enabled = true;
    config.reward_service.rules = "judges/nethack.rules".into();
    config.reward_service.goal = "prompts/nethack-score-goal.txt".into();
    config.reward_service.store = store.join("labels.redb").display().to_string();

    let spec = tokio::task::spawn_blocking({
        let env = config.env.clone();
        move || spur_env_bridge::env_spec(&env)
    })
    .await??;
    let names: Vec<&str> = spec.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["glyphs_crop", "blstats", "message"]);
    assert_eq!(spec.field("glyphs_crop").unwrap().1.shape, vec![9, 9]);
    assert!(spec.has_text);

    let service = TestRewardService::start(&mut config).await?;
    let learner = TestLearner::start(config.clone(), "nethack").await?;
    let (stop_actor, actor) = spawn_actor(&config, &learner.addr, 0);

    // A few hundred NetHack steps, trained on, with their messages judged.
    let l = learner
        .wait_for(Duration::from_secs(120), "NetHack steps and labels", |s| {
            s.env_steps >= 512 && s.policy_version >= 2 && s.reward_labels > 0
        })
        .await?;
    let mut rs = service.client().await?;
    let j = rs.get_status(RewardStatusRequest {}).await?.into_inner();
    assert!(
        j.texts_seen > 0 && j.labels > 0,
        "messages were judged: {j:?}"
    );
    assert!(
        l.reward_labels <= j.labels,
        "the learner holds only judged labels"
    );

    let _ = stop_actor.send(());
    let summary = actor.await??;
    assert!(summary.rollout.env_steps >= 512);
    learner.stop().await?;
    service.stop().await?;
    let _ = std::fs::remove_dir_all(&store);
    Ok(())
}

/// MiniHack's 5x5 room through the bridge, with the NetHack network: a random policy
/// finds the goal in about 60% of episodes at a return near 0.5 (step penalties);
/// a trained one always does, in a few steps, well within 100k steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minihack_room_is_learned_through_the_bridge() -> anyhow::Result<()> {
    let mut config = gym_config("MiniHack-Room-5x5-v0", 16);
    config.model.hidden = vec![128];
    config.learner.batch_steps = 2048;
    config.learner.epochs = 2;
    config.learner.minibatches = 4;
    config.learner.lr = 3e-4;
    config.learner.gamma = 0.999;
    config.learner.entropy_coef = 0.01;
    // Ends once the last 100 episodes average 0.9 (about 20k steps in our runs).
    config.stop.target_return = 0.9;
    config.stop.env_steps = 100_000;
    let learner = TestLearner::start(config.clone(), "minihack").await?;
    let (_stop, actor) = spawn_actor(&config, &learner.addr, 0);
    let summary = learner.handle.await??;
    assert!(actor.await??.training_finished);
    assert!(
        summary.env_steps < 100_000
            && summary.success_rate >= 0.95
            && summary.episode_return_mean >= 0.9,
        "success {} and return {} after {} steps",
        summary.success_rate,
        summary.episode_return_mean,
        summary.env_steps
    );
    Ok(())
}

/// Counters of the global metrics recorder, summed over every read (a snapshot
/// takes the counts it reads), so that tests running in parallel can share it.
fn counter(name: &str) -> u64 {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static RECORDER: OnceLock<(Snapshotter, Mutex<HashMap<String, u64>>)> = OnceLock::new();
    let (snapshotter, totals) = RECORDER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("no other metrics recorder in this test binary");
        (snapshotter, Mutex::default())
    });
    let mut totals = totals.lock().unwrap();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let DebugValue::Counter(c) = value {
            *totals.entry(key.key().name().to_string()).or_default() += c;
        }
    }
    totals.get(name).copied().unwrap_or(0)
}

/// A gym CartPole actor config on two bridge processes whose Python is a wrapper
/// that logs each bridge's pid and arguments to `dir/bridges` (the pid survives the
/// wrapper's `exec`). Four envs each: a bridge found dead while it resets envs whose
/// episodes all ended on the last step loses no episode, which with two CartPole
/// envs happened now and then.
fn actor_bridge_config(dir: &std::path::Path) -> Config {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let mut config = gym_config("CartPole-v1", 8);
    let wrapper = dir.join("python");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$$ $*\" >> '{}'\nexec '{}' \"$@\"\n",
            dir.join("bridges").display(),
            python(&config.env)
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    config.env.python = wrapper.display().to_string();
    config.env.servers = 2;
    config.model.hidden = vec![32];
    config.actor.rollout_len = 16;
    config.learner.batch_steps = 256;
    config.learner.minibatches = 2;
    config.learner.epochs = 1;
    config
}

/// Pids of the actor's bridges (four envs each; the spec query's has one), in start
/// order: restarts come after the first two.
fn actor_bridge_pids(dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("bridges"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("--num-envs 4 "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_restarts_a_killed_bridge_and_training_goes_on() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("spur-bridge-restart-{}", std::process::id()));
    let config = actor_bridge_config(&dir);
    let lost_before = counter("spur_actor_lost_episodes_total");
    let learner = TestLearner::start(config.clone(), "bridge-restart").await?;
    let (stop_actor, actor) = spawn_actor(&config, &learner.addr, 0);
    learner
        .wait_for(Duration::from_secs(60), "training on bridge envs", |s| {
            s.policy_version >= 2
        })
        .await?;
    let pids = actor_bridge_pids(&dir);
    assert_eq!(pids.len(), 2, "two bridges: {pids:?}");
    kill_9(pids[0]);

    // A third bridge starts in place of the first; its episodes are counted lost.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while actor_bridge_pids(&dir).len() < 3
        || counter("spur_actor_lost_episodes_total") <= lost_before
    {
        if actor.is_finished() {
            panic!("the actor ended: {:?}", actor.await);
        }
        if tokio::time::Instant::now() >= deadline {
            // What a rerun needs to tell a slow restart from one not counted.
            let status = learner.status().await?;
            panic!(
                "no restart in 60 s: bridges started {:?} (killed {}), restarts counted {}, \
                 lost episodes {} (before {lost_before}), learner at version {} after {} \
                 env steps",
                actor_bridge_pids(&dir),
                pids[0],
                counter("spur_actor_bridge_restarts_total"),
                counter("spur_actor_lost_episodes_total"),
                status.policy_version,
                status.env_steps
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Training goes on with chunks made after the restart: four more updates of 256
    // steps are more than the actor and learner queues held at the kill.
    let s = learner.status().await?;
    learner
        .wait_for(Duration::from_secs(60), "updates after the restart", |l| {
            l.policy_version >= s.policy_version + 4 && l.env_steps >= s.env_steps + 1024
        })
        .await?;
    assert!(!actor.is_finished(), "the actor kept running");
    assert!(counter("spur_actor_bridge_restarts_total") >= 1);

    let _ = stop_actor.send(());
    let summary = actor.await??;
    assert!(summary.rollout.env_steps >= 1024);
    learner.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_restarts_a_killed_bridge_fails_the_actor() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("spur-bridge-norestart-{}", std::process::id()));
    let mut config = actor_bridge_config(&dir);
    config.env.bridge_restarts = 0;
    let learner = TestLearner::start(config.clone(), "bridge-norestart").await?;
    let (_stop_actor, actor) = spawn_actor(&config, &learner.addr, 0);
    learner
        .wait_for(Duration::from_secs(60), "chunks from bridge envs", |s| {
            s.env_steps > 0
        })
        .await?;
    let pids = actor_bridge_pids(&dir);
    assert_eq!(pids.len(), 2, "two bridges: {pids:?}");
    kill_9(pids[0]);

    let err = tokio::time::timeout(Duration::from_secs(60), actor)
        .await??
        .expect_err("the actor fails");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            spur_actor::ActorError::Env(EnvError::BridgeFailed { restarts: 0, .. })
        ),
        "{text}"
    );
    // The two lanes start their bridges at the same time, so either may be the first.
    assert!(
        (text.contains("env bridge 1 of 2 (envs 0..4 at unix:")
            || text.contains("env bridge 2 of 2 (envs 4..8 at unix:"))
            && text.contains(&format!("pid {})", pids[0]))
            && text.contains("(0 restarts tried)"),
        "{text}"
    );
    assert_eq!(actor_bridge_pids(&dir).len(), 2, "no restart was tried");
    // (Not `learner.stop()`: with a weight stream to the failed actor it waits out
    // the drain timeout, which this test is not about.)
    drop(learner);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
