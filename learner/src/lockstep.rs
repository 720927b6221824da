//! The feedforward MLP's update on two threads in lock-step (`learner.threads` = 2
//! and more, on the CPU): the training thread runs every minibatch step's policy half
//! and a helper every step's critic half, each with Adam over its own network's part
//! of the optimizer's buffers. Per step the two exchange one small message: the sum of
//! the squares of their gradients (the clip scales both networks' gradients by one
//! factor from their joint norm), whether their loss was finite (a step is taken by
//! both or by neither), and from the policy's side whether its KL went past
//! `learner.target_kl` (the update then ends on both). So the steps are those of one
//! thread, up to float rounding, while neither thread waits for the other except on
//! that message. Splitting each step in two instead (the helper running one step's
//! critic half while this thread runs its policy half, then joining) put a hand-off
//! between threads inside every step, which on two busy cores cost about what the
//! split saved.

use crossbeam::channel::{bounded, Receiver, Sender, TryRecvError};
use spur_core::adam::{clip_coef, Adam, HostPart};
use spur_core::mlp_grad::{Mlp, PolicyFigures};
use spur_core::ppo::PpoParams;
use tch::{nn, Tensor};

use crate::parallel::Helpers;
use crate::trainer::{past_target_kl, StepTerms};

/// What one side tells the other after a step's gradients.
#[derive(Clone, Copy)]
struct Post {
    /// The sum of the squares of its gradients.
    squares: f64,
    /// Its loss is finite.
    finite: bool,
    /// The policy's KL passed the limit (the critic's side always false).
    over_kl: bool,
}

/// One minibatch step, as both sides saw it.
pub(crate) struct Step {
    /// Both losses were finite and the optimizer stepped.
    pub taken: bool,
    /// The joint gradient norm before clipping.
    pub norm: f64,
    pub policy: PolicyFigures,
    pub value: f64,
}

/// What the update's loop reads.
pub(crate) struct Settings {
    pub params: PpoParams,
    pub max_grad_norm: f64,
    pub target_kl: f64,
    pub advantage_std_floor: f64,
}

/// Where the optimizer's buffers split between the policy's variables and the
/// critic's, when they are on the CPU with the policy's first (`None` otherwise:
/// lock-step does not apply).
pub(crate) fn split_at(opt: &Adam) -> Option<usize> {
    let (p_span, v_span, all) = (opt.span("policy.")?, opt.span("value.")?, opt.span("")?);
    let fits =
        opt.on_cpu() && p_span.start == 0 && p_span.end == v_span.start && v_span.end == all.end;
    fits.then_some(v_span.start)
}

/// Runs the update's minibatch steps (the batch steps of each, in order) with the
/// policy's half on this thread and the critic's on a helper; `at` is where
/// [`split_at`] splits `opt`.
pub(crate) fn update(
    helpers: &Helpers,
    (policy, value): (&[nn::Linear], &[nn::Linear]),
    (opt, at): (&mut Adam, usize),
    (obs, terms): (&Tensor, &StepTerms),
    minibatches: &[Vec<i64>],
    s: &Settings,
) -> Vec<Step> {
    let (p_part, v_part) = opt.split_host(at).expect("buffers on the CPU");
    let (to_value, from_policy) = bounded::<Post>(1);
    let (to_policy, from_value) = bounded::<Post>(1);
    let (p_mlp, v_mlp) = (Mlp::of(policy), Mlp::of(value));
    let (p_obs, v_obs) = (obs.shallow_clone(), obs.shallow_clone());
    let (policy_steps, value_steps) = helpers.join(
        move || {
            side(
                p_part,
                (&to_value, &from_value),
                minibatches,
                |at| {
                    let f = p_mlp
                        .policy_step(&terms.rows(&p_obs, at, s.advantage_std_floor), &s.params);
                    let over_kl = past_target_kl(f.approx_kl, s.target_kl);
                    (f.surrogate.is_finite() && f.entropy.is_finite(), over_kl, f)
                },
                s.max_grad_norm,
            )
        },
        move || {
            side(
                v_part,
                (&to_policy, &from_policy),
                minibatches,
                |at| {
                    let v =
                        v_mlp.value_step(&terms.rows(&v_obs, at, s.advantage_std_floor), &s.params);
                    (v.is_finite(), false, v)
                },
                s.max_grad_norm,
            )
        },
    );
    let steps: Vec<Step> = policy_steps
        .into_iter()
        .zip(value_steps)
        .map(|((taken, norm, policy), (_, _, value))| Step {
            taken,
            norm,
            policy,
            value,
        })
        .collect();
    opt.add_steps(steps.iter().filter(|s| s.taken).count() as u64);
    steps
}

/// How long a side spins for the other's post before it sleeps: a post comes within
/// tens of microseconds in a running update, and a thread woken from sleep may take
/// as long as that again to run, which the other side would then wait for.
const SPIN: std::time::Duration = std::time::Duration::from_micros(500);

/// The other side's next post, spinning for up to [`SPIN`] before sleeping; `None`
/// when the other side has gone.
fn wait_for(hear: &Receiver<Post>) -> Option<Post> {
    let start = std::time::Instant::now();
    loop {
        match hear.try_recv() {
            Ok(post) => return Some(post),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) if start.elapsed() < SPIN => std::hint::spin_loop(),
            Err(TryRecvError::Empty) => return hear.recv().ok(),
        }
    }
}

/// One side's loop: per minibatch, `half` writes its gradients and says whether its
/// loss was finite and its KL over the limit; the two sides exchange their posts, and
/// both clip by the joint norm and step, or neither. Ends after the last minibatch,
/// after a taken step over the KL limit, or when the other side has gone (it
/// panicked: the panic carries on at the join).
fn side<T>(
    mut part: HostPart<'_>,
    (tell, hear): (&Sender<Post>, &Receiver<Post>),
    minibatches: &[Vec<i64>],
    mut half: impl FnMut(&[i64]) -> (bool, bool, T),
    max_grad_norm: f64,
) -> Vec<(bool, f64, T)> {
    let mut out = Vec::with_capacity(minibatches.len());
    for at in minibatches {
        let (finite, over_kl, figures) = half(at);
        let mine = Post {
            squares: part.sum_of_squares(),
            finite,
            over_kl,
        };
        if tell.send(mine).is_err() {
            break;
        }
        let Some(theirs) = wait_for(hear) else { break };
        let taken = mine.finite && theirs.finite;
        let norm = (mine.squares + theirs.squares).sqrt();
        if taken {
            part.scale_grads(clip_coef(norm, max_grad_norm));
            part.step();
        }
        out.push((taken, norm, figures));
        if taken && (mine.over_kl || theirs.over_kl) {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::helper_cpu_seconds;
    use spur_core::mlp_grad::step;
    use spur_core::model::{f32_vec, ActorCritic};
    use tch::{Device, Kind};

    /// Two copies of one MLP, an optimizer each, a batch and its minibatches.
    struct Case {
        one: ActorCritic,
        two: ActorCritic,
        opt_one: Adam,
        opt_two: Adam,
        obs: Tensor,
        terms: StepTerms,
        minibatches: Vec<Vec<i64>>,
    }

    fn case() -> Case {
        tch::manual_seed(5);
        let (obs_dim, num_actions, n) = (4, 3, 256);
        let one = ActorCritic::new(obs_dim, num_actions, &[32, 32], Device::Cpu);
        let mut two = ActorCritic::new(obs_dim, num_actions, &[32, 32], Device::Cpu);
        two.copy_from(&one).unwrap();
        let opts = (Kind::Float, Device::Cpu);
        let obs = Tensor::randn([n, obs_dim as i64], opts);
        let actions = Tensor::randint(num_actions as i64, [n], (Kind::Int64, Device::Cpu));
        let current = tch::no_grad(|| one.evaluate(&obs, &actions).log_probs.detach());
        let terms = StepTerms {
            actions: Vec::try_from(&actions).unwrap(),
            proximal: f32_vec(&(&current + (Tensor::rand([n], opts) - 0.5) * 0.2)),
            advantages: f32_vec(&Tensor::randn([n], opts)),
            targets: f32_vec(&Tensor::randn([n], opts)),
        };
        let perm = Vec::<i64>::try_from(Tensor::randperm(n, (Kind::Int64, Device::Cpu))).unwrap();
        Case {
            opt_one: Adam::new(one.var_store(), 1e-2, 1e-5),
            opt_two: Adam::new(two.var_store(), 1e-2, 1e-5),
            one,
            two,
            obs,
            terms,
            minibatches: perm.chunks(32).map(<[i64]>::to_vec).collect(),
        }
    }

    fn settings(target_kl: f64) -> Settings {
        Settings {
            params: PpoParams {
                clip_eps: 0.2,
                value_coef: 0.5,
                entropy_coef: 0.01,
            },
            max_grad_norm: 0.5,
            target_kl,
            advantage_std_floor: 1e-4,
        }
    }

    impl Case {
        /// The trainer's steps on one thread: a step per minibatch whose loss is
        /// finite, clipped by the joint norm, until one's KL passes the limit.
        /// Returns each minibatch's (taken, norm).
        fn on_one_thread(&mut self, s: &Settings) -> Vec<(bool, f64)> {
            let mut out = vec![];
            for at in &self.minibatches {
                let rows = self.terms.rows(&self.obs, at, s.advantage_std_floor);
                let loss = step(self.one.mlp_layers().unwrap(), &rows, &s.params);
                if !loss.total.double_value(&[]).is_finite() {
                    out.push((false, f64::NAN));
                    continue;
                }
                out.push((true, self.opt_one.clip_grad_norm(s.max_grad_norm)));
                self.opt_one.step();
                if past_target_kl(loss.approx_kl, s.target_kl) {
                    break;
                }
            }
            out
        }

        fn in_lockstep(&mut self, s: &Settings) -> Vec<Step> {
            let layers = self.two.mlp_layers().unwrap();
            let helpers = Helpers::new(2, 1);
            let cpu = helper_cpu_seconds();
            let at = split_at(&self.opt_two).expect("the MLP's buffers on the CPU");
            let steps = update(
                &helpers,
                layers,
                (&mut self.opt_two, at),
                (&self.obs, &self.terms),
                &self.minibatches,
                s,
            );
            assert!(
                helper_cpu_seconds() > cpu,
                "the critic's half ran on the helper"
            );
            steps
        }

        /// The largest difference between the two copies' variables.
        fn apart(&self) -> f64 {
            let theirs = self.two.var_store().variables();
            self.one
                .var_store()
                .variables()
                .iter()
                .map(|(k, t)| (t - &theirs[k]).abs().max().double_value(&[]))
                .fold(0.0, f64::max)
        }
    }

    /// Lock-step takes the steps one thread takes: the same gradient norms, and the
    /// same variables afterwards (up to float rounding), with the clip binding.
    #[test]
    fn lockstep_takes_the_steps_of_one_thread() {
        let mut c = case();
        assert_eq!(c.apart(), 0.0);
        let initial: Vec<(String, Tensor)> = c
            .two
            .var_store()
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        let s = settings(0.0);
        let one = c.on_one_thread(&s);
        let two = c.in_lockstep(&s);
        assert_eq!(two.len(), c.minibatches.len());
        assert_eq!(c.opt_two.steps(), c.opt_one.steps());
        for ((taken, norm), step) in one.iter().zip(&two) {
            assert!(*taken && step.taken);
            assert!(
                (norm - step.norm).abs() <= 1e-5 * norm,
                "{norm} against {}",
                step.norm
            );
        }
        assert!(two.iter().any(|s| s.norm > 0.5), "the clip binds");
        assert!(two.iter().all(|s| s.value > 0.0 && s.policy.entropy > 0.0));
        assert!(c.apart() < 1e-5, "{}", c.apart());
        let now = c.two.var_store().variables();
        let moved_by = initial
            .iter()
            .map(|(k, t)| (t - &now[k]).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        assert!(moved_by > 1e-3, "the update moved the weights: {moved_by}");
    }

    /// A step whose critic loss is not finite is taken by neither side, and a KL past
    /// `target_kl` ends the update on both sides after the same step: the variables
    /// end where one thread's do.
    #[test]
    fn a_skipped_step_and_the_kl_stop_hold_on_both_sides() {
        let mut c = case();
        let bad = c.minibatches[2][0] as usize;
        c.terms.targets[bad] = f32::NAN;
        let s = settings(0.0);
        let one = c.on_one_thread(&s);
        let two = c.in_lockstep(&s);
        assert!(
            !one[2].0 && !two[2].taken,
            "the step with a NaN target is skipped"
        );
        assert_eq!(
            two.iter().filter(|s| s.taken).count(),
            c.minibatches.len() - 1
        );
        assert_eq!(c.opt_two.steps(), c.opt_one.steps());
        assert!(c.apart() < 1e-5, "{}", c.apart());

        let mut c = case();
        // The proximal policy differs from the current one by up to +-0.1 in log
        // probability: past a limit this small on the first step already.
        let s = settings(1e-6);
        let one = c.on_one_thread(&s);
        let two = c.in_lockstep(&s);
        assert_eq!(one.len(), 1);
        assert_eq!(two.len(), 1, "both sides stopped after the first step");
        assert_eq!(c.opt_two.steps(), 1);
        assert!(c.apart() < 1e-5, "{}", c.apart());
    }
}
