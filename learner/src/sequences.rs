//! Sequences for recurrent policies: which steps of a batch one recurrent core runs
//! through in order, the state it starts from, and where episodes restart it. A
//! chunk batch holds one sequence per column (from the chunk's initial state, zeroed
//! after every step that ended an episode); an episodes batch (UI-S1's groups) holds
//! one per episode, from zeros. Minibatches of a recurrent update are whole
//! sequences, padded to the longest for one time-major pass.

use tch::{Device, Kind, Tensor};

use crate::batch::Batch;
use crate::episodes::GroupLayout;

pub struct Sequences {
    /// Per sequence, the flat batch index (`t * width + column`) of each step.
    steps: Vec<Vec<i64>>,
    /// Per sequence and step: 1.0 where the state is zeroed before the step.
    resets: Vec<Vec<f32>>,
    /// `len() * state_size` starting states.
    initial: Vec<f32>,
    state_size: usize,
}

/// Sequences laid out time-major for one pass: `[L, J]`, padded past each
/// sequence's end by repeating its last step.
pub struct Padded {
    /// `[L * J]` flat batch index of each (step, sequence).
    pub index: Tensor,
    /// `[L, J]`.
    pub resets: Tensor,
    /// `[J, state_size]`.
    pub initial: Tensor,
    /// Positions in `L * J` of real steps (None: no padding, every position is one).
    valid: Option<Tensor>,
    /// Flat batch index of each real step, in the order [`pick`](Self::pick) returns.
    pub flat: Tensor,
}

impl Padded {
    /// The rows of `t` (`[L * J, ...]`, from a pass over this layout) that are real
    /// steps, in the order of [`flat`](Self::flat).
    pub fn pick(&self, t: &Tensor) -> Tensor {
        match &self.valid {
            Some(v) => t.index_select(0, v),
            None => t.shallow_clone(),
        }
    }
}

impl Sequences {
    /// One sequence per column of a chunk batch over its first `rows` time steps
    /// (`T` to train; `T + 1` to reach the bootstrap row), each from its chunk's
    /// initial state; a step whose previous step ended the episode starts from zeros.
    pub fn columns(batch: &Batch, rows: usize) -> Self {
        let w = batch.width;
        let ended = |i: usize| batch.terminated[i] == 1 || batch.truncated[i] == 1;
        Self {
            steps: (0..w)
                .map(|b| (0..rows).map(|t| (t * w + b) as i64).collect())
                .collect(),
            resets: (0..w)
                .map(|b| {
                    (0..rows)
                        .map(|t| (t > 0 && ended((t - 1) * w + b)) as u8 as f32)
                        .collect()
                })
                .collect(),
            initial: batch.initial_states.clone(),
            state_size: batch.state_size,
        }
    }

    /// One sequence per episode of a batch from `episodes_batch` (one column,
    /// episodes back to back), each from a zero state.
    pub fn episodes(layout: &GroupLayout, state_size: usize) -> Self {
        let spans: Vec<(usize, usize)> = layout.iter().flatten().copied().collect();
        Self {
            steps: spans
                .iter()
                .map(|&(s, l)| (s as i64..(s + l) as i64).collect())
                .collect(),
            resets: spans.iter().map(|&(_, l)| vec![0.0; l]).collect(),
            initial: vec![0.0; spans.len() * state_size],
            state_size,
        }
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Sequences `which`, time-major and padded to the longest, on `dev`.
    pub fn pad(&self, which: &[usize], dev: Device) -> Padded {
        let (j, s) = (which.len(), self.state_size);
        let l = which
            .iter()
            .map(|&q| self.steps[q].len())
            .max()
            .unwrap_or(0);
        let mut index = Vec::with_capacity(l * j);
        let mut resets = Vec::with_capacity(l * j);
        let mut valid = Vec::with_capacity(l * j);
        let mut flat = Vec::with_capacity(l * j);
        for t in 0..l {
            for (col, &q) in which.iter().enumerate() {
                let steps = &self.steps[q];
                match steps.get(t) {
                    Some(&i) => {
                        valid.push((t * j + col) as i64);
                        index.push(i);
                        resets.push(self.resets[q][t]);
                        flat.push(i);
                    }
                    None => {
                        index.push(*steps.last().expect("sequences are not empty"));
                        resets.push(0.0);
                    }
                }
            }
        }
        let valid = (flat.len() < l * j).then(|| Tensor::from_slice(&valid).to_device(dev));
        let mut initial = Vec::with_capacity(j * s);
        for &q in which {
            initial.extend_from_slice(&self.initial[q * s..(q + 1) * s]);
        }
        Padded {
            index: Tensor::from_slice(&index).to_device(dev),
            resets: Tensor::from_slice(&resets)
                .view([l as i64, j as i64])
                .to_device(dev),
            initial: Tensor::from_slice(&initial)
                .view([j as i64, s as i64])
                .to_kind(Kind::Float)
                .to_device(dev),
            valid,
            flat: Tensor::from_slice(&flat).to_device(dev),
        }
    }
}

#[cfg(test)]
mod tests {
    use spur_core::config::{CoreKind, ModelConfig};
    use spur_core::env::{Env, Memory, VecEnv};
    use spur_core::model::{reset_ended, ActorCritic};
    use spur_core::trajectory::Chunk;
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::batch::Batch;
    use crate::episodes::{episodes_batch, Assembler};
    use crate::trainer::sequence_targets;

    /// `chunks` consecutive chunks of `t_len` steps of `n` memory envs (3-step
    /// episodes, so they end inside chunks and run across their boundaries), acted
    /// as the actor acts: one state per env, zeroed when its episode ends, recorded
    /// at each chunk's first step.
    fn act_like_an_actor(model: &ActorCritic, chunks: usize, t_len: usize, n: usize) -> Vec<Chunk> {
        let envs: Vec<Box<dyn Env>> = (0..n)
            .map(|_| Box::new(Memory::new(2, 1, None)) as Box<dyn Env>)
            .collect();
        let mut venv = VecEnv::grouped(envs, 9, 2);
        let d = venv.spec().obs_dim;
        let s = model.state_size();
        let mut state = vec![0.0f32; n * s];
        let mut out = Vec::new();
        for _ in 0..chunks {
            let mut c = Chunk {
                actor_id: "a".into(),
                policy_version: 1,
                rollout_len: t_len,
                num_envs: n,
                obs_dim: d,
                observations: Vec::new(),
                actions: Vec::new(),
                behaviour_log_probs: Vec::new(),
                rewards: Vec::new(),
                terminated: Vec::new(),
                truncated: Vec::new(),
                final_observations: Vec::new(),
                event_texts: Vec::new(),
                env_ids: (0..n as u32).collect(),
                episode_ids: Vec::new(),
                step_indices: Vec::new(),
                finished_episodes: Vec::new(),
                event_counts: Vec::new(),
                group_ids: Vec::new(),
                group_size: 2,
                expert_actions: Vec::new(),
                learner_incarnation: 1,
                state_size: s,
                initial_state: state.clone(),
                behaviour_values: vec![],
            };
            for _ in 0..t_len {
                let obs = venv.observations().to_vec();
                let (actions, lp) = model.act(&obs, &mut state, false);
                c.observations.extend_from_slice(&obs);
                c.episode_ids.extend_from_slice(venv.episode_ids());
                c.step_indices.extend_from_slice(venv.step_indices());
                c.group_ids.extend_from_slice(venv.group_ids());
                let step = venv.step(&actions).unwrap();
                c.actions.extend_from_slice(&actions);
                c.behaviour_log_probs.extend_from_slice(&lp);
                c.rewards.extend_from_slice(&step.rewards);
                c.terminated.extend_from_slice(&step.terminated);
                c.truncated.extend_from_slice(&step.truncated);
                c.final_observations
                    .extend_from_slice(&step.final_observations);
                reset_ended(&mut state, &step.terminated, &step.truncated);
            }
            c.observations.extend_from_slice(venv.observations());
            out.push(c);
        }
        out
    }

    fn assert_reproduces(model: &ActorCritic, batch: &Batch, seqs: &Sequences, what: &str) {
        let obs_all = Tensor::from_slice(&batch.observations).view([-1, batch.obs_dim as i64]);
        let actions = Tensor::from_slice(&batch.actions);
        let t = tch::no_grad(|| sequence_targets(model, batch, seqs, &obs_all, None, &actions));
        let again = Vec::<f32>::try_from(t.log_probs).unwrap();
        assert_eq!(again.len(), batch.behaviour_log_probs.len());
        for (i, (a, b)) in batch.behaviour_log_probs.iter().zip(&again).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "{what}: step {i}: actor {a}, learner {b}"
            );
        }
    }

    /// The learner's sequence pass from each chunk's initial state gives the very
    /// log-probabilities the actor sampled with (same weights), for chunks that start
    /// mid-episode and hold episode ends, and for grouped episode batches.
    #[test]
    fn sequence_pass_reproduces_the_actors_log_probs() {
        for core in [CoreKind::Lstm, CoreKind::Gru] {
            let config = ModelConfig {
                hidden: vec![16],
                core,
                core_size: 8,
                ..Default::default()
            };
            let spec = Memory::new(2, 1, None).spec();
            let model = ActorCritic::for_spec(&spec, &config, Device::Cpu).unwrap();
            let chunks = act_like_an_actor(&model, 3, 5, 4);
            assert!(chunks[1].initial_state.iter().any(|&x| x != 0.0));
            assert!(chunks[1].terminated.contains(&1), "an episode ends inside");

            let batch = Batch::from_chunks(&chunks);
            assert_reproduces(&model, &batch, &Sequences::columns(&batch, 6), "columns");
            // The stored state matters: from zeros, chunks that start mid-episode
            // come out differently.
            let mut zeroed = Batch::from_chunks(&chunks);
            zeroed.initial_states.fill(0.0);
            let obs_all = Tensor::from_slice(&zeroed.observations).view([-1, 3]);
            let actions = Tensor::from_slice(&zeroed.actions);
            let t = tch::no_grad(|| {
                let seqs = Sequences::columns(&zeroed, 6);
                sequence_targets(&model, &zeroed, &seqs, &obs_all, None, &actions)
            });
            let from_zeros = Vec::<f32>::try_from(t.log_probs).unwrap();
            assert!(from_zeros
                .iter()
                .zip(&zeroed.behaviour_log_probs)
                .any(|(a, b)| (a - b).abs() > 1e-4));

            let mut assembler = Assembler::new(2, 100, 16);
            for c in &chunks {
                assembler.push(c);
            }
            let groups = assembler.take_ready();
            assert!(!groups.is_empty());
            let (eb, layout) = episodes_batch(&groups, 3);
            let seqs = Sequences::episodes(&layout, model.state_size());
            assert_eq!(seqs.len(), layout.iter().map(Vec::len).sum::<usize>());
            assert_reproduces(&model, &eb, &seqs, "episodes");
        }
    }

    /// A recurrent minibatch in two shares of whole sequences (episodes of unequal
    /// length, so each share pads differently), on two threads: the gradients are
    /// those of one share holding every sequence.
    #[test]
    fn sequence_shares_add_up_to_the_whole_minibatch() {
        use crate::parallel::{gradients, Helpers, Share, ShareRows};
        use spur_core::adam::Adam;
        use spur_core::ppo::PpoParams;

        tch::manual_seed(5);
        let config = ModelConfig {
            hidden: vec![16],
            core: CoreKind::Lstm,
            core_size: 8,
            ..Default::default()
        };
        let spec = Memory::new(2, 1, None).spec();
        let model = ActorCritic::for_spec(&spec, &config, Device::Cpu).unwrap();
        let mut opt = Adam::new(model.var_store(), 1e-3, 1e-5);
        let eb = Batch::from_chunks(&act_like_an_actor(&model, 3, 5, 4));
        // Sequences of 1 to 6 steps over the batch's rows (the loss does not care
        // where episodes really end).
        let layout = vec![
            vec![(0, 5), (5, 2), (7, 4), (11, 1), (12, 3)],
            vec![(15, 6), (21, 2), (23, 4)],
        ];
        let seqs = Sequences::episodes(&layout, model.state_size());
        let lengths: Vec<usize> = seqs.steps.iter().map(Vec::len).collect();
        assert_eq!(lengths, [5, 2, 4, 1, 3, 6, 2, 4]);

        let rows = eb.len() as i64;
        let obs_all = Tensor::from_slice(&eb.observations).view([-1, eb.obs_dim as i64]);
        let actions = Tensor::from_slice(&eb.actions);
        let opts = (Kind::Float, Device::Cpu);
        let (proximal, advantages, targets) = (
            Tensor::from_slice(&eb.behaviour_log_probs) + (Tensor::rand([rows], opts) - 0.5),
            Tensor::randn([rows], opts),
            Tensor::randn([rows], opts),
        );
        let all_steps: usize = lengths.iter().sum();
        let share = |which: &[usize]| {
            let padded = seqs.pad(which, Device::Cpu);
            let flat = padded.flat.shallow_clone();
            Share {
                rows: ShareRows::Sequences {
                    obs: obs_all.index_select(0, &padded.index),
                    actions: actions.index_select(0, &flat),
                    padded,
                },
                proximal: proximal.index_select(0, &flat),
                advantages: advantages.index_select(0, &flat),
                targets: targets.index_select(0, &flat),
                weight: flat.size()[0] as f64 / all_steps as f64,
                flat,
            }
        };
        let params = PpoParams {
            clip_eps: 0.2,
            value_coef: 0.5,
            entropy_coef: 0.01,
        };
        let mut grads = |shares: Vec<Share>| {
            opt.zero_grad();
            let loss = Helpers::new(2, 1).step(&model, shares, &params);
            let g: Vec<f32> = gradients(&model).into_iter().flat_map(|(_, g)| g).collect();
            (loss.total.double_value(&[]), g)
        };
        let j = seqs.len();
        let which: Vec<usize> = (0..j).collect();
        let (whole_loss, whole) = grads(vec![share(&which)]);
        let (split_loss, split) = grads(vec![share(&which[..j / 2]), share(&which[j / 2..])]);
        assert!(
            (whole_loss - split_loss).abs() < 1e-5,
            "{whole_loss} {split_loss}"
        );
        let scale = whole.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
        assert!(whole.iter().filter(|&&x| x != 0.0).count() > whole.len() / 2);
        for (i, (a, b)) in split.iter().zip(&whole).enumerate() {
            assert!((a - b).abs() <= 1e-5 * scale, "[{i}]: {a} against {b}");
        }
    }

    #[test]
    fn padding_keeps_real_steps_in_order() {
        let layout = vec![vec![(0, 2), (2, 3)], vec![(5, 1)]];
        let seqs = Sequences::episodes(&layout, 2);
        let p = seqs.pad(&[1, 2, 0], Device::Cpu);
        // Longest is 3 steps: [3, 3] laid out time-major.
        assert_eq!(p.resets.size(), vec![3, 3]);
        assert_eq!(p.initial.size(), vec![3, 2]);
        let index = Vec::<i64>::try_from(&p.index).unwrap();
        assert_eq!(index, vec![2, 5, 0, 3, 5, 1, 4, 5, 1]);
        let flat = Vec::<i64>::try_from(&p.flat).unwrap();
        assert_eq!(flat, vec![2, 5, 0, 3, 1, 4]);
        let picked = Vec::<i64>::try_from(p.pick(&p.index)).unwrap();
        assert_eq!(picked, flat);
    }
}
