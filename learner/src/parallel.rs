//! One minibatch step's forward and backward passes split by rows (by whole
//! sequences for a recurrent policy) over several threads (`learner.threads`): each
//! thread runs the network and PPO's loss on its share of the rows and adds its
//! gradient, weighted by its share, into the parameters' gradients. Their sum is the
//! gradient of the whole minibatch's loss, the same as on one thread up to float
//! rounding. With one share, the step runs on the calling thread alone.
//!
//! The helper threads ([`Helpers`]) start with the learner and live as long as it
//! does: a thread started for each step paid its start and the per-thread set-up of
//! libtorch's kernels again on every step. Each adds up its CPU time per share into
//! [`helper_cpu_seconds`], so what the learner costs can be measured.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use spur_core::config::LearnerConfig;
use spur_core::model::{ActorCritic, Evaluation};
use spur_core::ppo::{ppo_loss, PpoLoss, PpoParams};
use tch::{Device, Kind, Tensor};
use tracing::info;

use crate::sequences::Padded;

/// The training thread's name; its helpers are `spur-trainer1`, ...
pub const TRAINER_THREAD: &str = "spur-trainer";

/// CPU nanoseconds helper threads spent on shares, in this process.
static HELPER_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// The thread count the last learner started in this process resolved.
static THREADS_IN_USE: AtomicU32 = AtomicU32::new(1);

/// `learner.threads` resolved for `model`: as configured, or for 0 (auto) 2 on the
/// CPU of a machine with 2 cores or more for the feedforward NetHack network (its
/// minibatch steps take tens of milliseconds) and for the MLP with closed-form
/// gradients (`closed_form_mlp`: its update in lock-step, `lockstep`), else 1. With
/// a recurrent core the NetHack learner alone is faster on two threads, but a run
/// sharing 2 cores with its actor was slower (docs/benchmarks.md). Always 1 for a
/// model on a GPU. Logged, and kept for [`minibatch_threads_in_use`].
fn minibatch_threads(configured: u32, model: &ActorCritic, closed_form_mlp: bool) -> u32 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let feedforward_nethack = model.is_nethack() && !model.is_recurrent();
    let lockstep = closed_form_mlp && model.mlp_layers().is_some();
    let on_cpu = model.device() == Device::Cpu;
    let threads = match configured {
        // The helpers split a step's CPU work; a GPU's kernels queue on one stream.
        n if !on_cpu => {
            if n > 1 {
                tracing::warn!(
                    configured = n,
                    "learner.threads applies on the CPU only; one thread drives the GPU"
                );
            }
            1
        }
        0 if (feedforward_nethack || lockstep) && cores >= 2 => 2,
        0 => 1,
        n => n,
    };
    info!(threads, configured, "threads per minibatch step");
    THREADS_IN_USE.store(threads, Ordering::Relaxed);
    threads
}

/// Threads per minibatch step of the last learner started in this process.
pub fn minibatch_threads_in_use() -> u32 {
    THREADS_IN_USE.load(Ordering::Relaxed)
}

/// CPU seconds helper threads spent on the shares of split minibatch steps, in this
/// process (with the training thread's own, the learner's whole CPU time).
pub fn helper_cpu_seconds() -> f64 {
    HELPER_CPU_NS.load(Ordering::Relaxed) as f64 * 1e-9
}

/// One thread's share of a minibatch: its rows of everything the loss reads.
pub struct Share {
    pub rows: ShareRows,
    /// The batch rows of its steps, in the order of the terms below.
    pub flat: Tensor,
    pub proximal: Tensor,
    /// Advantages, already normalised over the whole minibatch.
    pub advantages: Tensor,
    pub targets: Tensor,
    /// Its steps over the minibatch's.
    pub weight: f64,
}

/// What a share's forward pass reads.
pub enum ShareRows {
    /// Steps on their own (a feedforward policy).
    Steps { obs: Tensor, actions: Tensor },
    /// Whole sequences through a recurrent core: observations in the padded layout,
    /// actions of the real steps.
    Sequences {
        obs: Tensor,
        padded: Padded,
        actions: Tensor,
    },
}

impl Share {
    /// The forward pass over this share and PPO's loss on it, with its graph.
    pub fn loss(&self, model: &ActorCritic, params: &PpoParams) -> (PpoLoss, Evaluation) {
        let eval = match &self.rows {
            ShareRows::Steps { obs, actions } => model.evaluate(obs, actions),
            ShareRows::Sequences {
                obs,
                padded,
                actions,
            } => {
                let u = model.unroll(obs, &padded.initial, &padded.resets);
                ActorCritic::evaluation(&padded.pick(&u.logits), padded.pick(&u.values), actions)
            }
        };
        let loss = ppo_loss(
            &eval.log_probs,
            &self.proximal,
            &self.advantages,
            &eval.values,
            &self.targets,
            &eval.entropy,
            params,
        );
        (loss, eval)
    }
}

/// Lets the helper threads of one step read the model. tch's `Tensor` is not
/// `Sync` because some of its methods change a tensor in place through `&self`;
/// forward passes only read the parameters, and libtorch's autograd engine takes a
/// lock in each parameter's gradient accumulator, so backward passes of separate
/// graphs that end in the same parameters may run at the same time (as in PyTorch's
/// multithreaded training). Nothing changes the parameters while a step's threads run:
/// the optimizer steps after they have joined.
struct ReadOnly<'a>(&'a ActorCritic);

// SAFETY: see the type's comment; the threads that share it only run forward and
// backward passes, and all of them join before the optimizer writes the parameters.
unsafe impl Sync for ReadOnly<'_> {}

/// The threads a learner splits its minibatch steps over: the training thread and
/// `threads - 1` helpers, started once. Between shares a helper waits for work
/// (briefly spinning, then asleep), so a step hands its share over in microseconds.
pub struct Helpers {
    threads: u32,
    pool: Option<rayon::ThreadPool>,
    /// The training thread's CPUs when the threads are pinned (`learner.pin_threads`).
    own_cpus: Option<Vec<usize>>,
}

impl Helpers {
    /// `threads` in all (this one and `threads - 1` helpers), each helper with
    /// `torch_threads` for libtorch's own parallel kernels and subnormal floats
    /// flushed, like the training thread.
    #[cfg(test)]
    pub fn new(threads: u32, torch_threads: i32) -> Self {
        Self::with_cpus(threads, torch_threads, None)
    }

    /// As [`Helpers::new`]; with `dealt` (one CPU list per thread, the training
    /// thread's first), each helper pins itself to its list as it starts, and
    /// [`Helpers::pin_training_thread`] pins the training thread to the first.
    fn with_cpus(threads: u32, torch_threads: i32, dealt: Option<Vec<Vec<usize>>>) -> Self {
        let own_cpus = dealt.as_ref().map(|d| d[0].clone());
        let pool = (threads > 1).then(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads as usize - 1)
                .thread_name(|i| format!("{TRAINER_THREAD}{}", i + 1))
                .start_handler(move |i| {
                    spur_core::fpu::flush_denormals();
                    // OpenMP's thread count is per calling thread: a new thread
                    // starts with one per core, not the run's setting.
                    tch::set_num_threads(torch_threads);
                    if let Some(cpus) = dealt.as_ref().map(|d| &d[i + 1]) {
                        pin_this_thread(cpus);
                    }
                })
                .build()
                .expect("starting the learner's helper threads")
        });
        Self {
            threads,
            pool,
            own_cpus,
        }
    }

    /// The helpers of a learner training `model` with `learner` (`threads` resolved
    /// as [`minibatch_threads`] says; pinned as `pin_threads` says).
    pub fn for_model(learner: &LearnerConfig, model: &ActorCritic, torch_threads: i32) -> Self {
        let threads = minibatch_threads(learner.threads, model, learner.explicit_mlp_gradients);
        let dealt = learner
            .pin_threads
            .then(|| deal(&allowed_cpus(), threads as usize))
            .flatten();
        match &dealt {
            Some(d) => info!(cpus = ?d, "learner threads pinned, the training thread's first"),
            None if learner.pin_threads && threads > 1 => {
                info!(
                    threads,
                    "learner threads not pinned: the process may use fewer CPUs than \
                     threads (or the kernel did not say which)"
                )
            }
            None => {}
        }
        Self::with_cpus(threads, torch_threads, dealt)
    }

    /// Pins the calling thread, the training thread, to its CPUs if the threads are
    /// pinned.
    pub fn pin_training_thread(&self) {
        if let Some(cpus) = &self.own_cpus {
            pin_this_thread(cpus);
        }
    }

    /// Threads per minibatch step, this one included.
    pub fn threads(&self) -> u32 {
        self.threads
    }

    /// Runs `here` on this thread and each of `there` on a helper, and returns once
    /// all have ended (with no helpers, one after the other on this thread). A
    /// helper's panic goes on in this thread.
    fn fork<'a, U>(
        &self,
        there: Vec<Box<dyn FnOnce() + Send + 'a>>,
        here: impl FnOnce() -> U,
    ) -> U {
        let Some(pool) = self.pool.as_ref() else {
            let out = here();
            there.into_iter().for_each(|f| f());
            return out;
        };
        pool.in_place_scope(|scope| {
            for f in there {
                scope.spawn(move |_| {
                    let cpu0 = thread_cpu_ns();
                    f();
                    HELPER_CPU_NS.fetch_add(thread_cpu_ns() - cpu0, Ordering::Relaxed);
                });
            }
            here()
        })
    }

    /// Runs `work` on each of `jobs`, this thread taking the first and the helpers
    /// the others, and returns their results in order.
    fn run<J: Send, T: Send>(
        &self,
        model: &ActorCritic,
        jobs: Vec<J>,
        work: impl Fn(&ActorCritic, J) -> T + Sync,
    ) -> Vec<T> {
        let model = ReadOnly(model);
        let (model, work) = (&model, &work);
        let mut jobs = jobs.into_iter();
        let own = jobs.next().expect("work for at least one thread");
        let rest: Vec<J> = jobs.collect();
        let slots: Vec<Mutex<Option<T>>> = rest.iter().map(|_| Mutex::new(None)).collect();
        let there = rest
            .into_iter()
            .zip(&slots)
            .map(|(job, slot)| {
                Box::new(move || *slot.lock().expect("a result's slot") = Some(work(model.0, job)))
                    as Box<dyn FnOnce() + Send + '_>
            })
            .collect();
        let first = self.fork(there, || work(model.0, own));
        std::iter::once(first)
            .chain(slots.into_iter().map(taken))
            .collect()
    }

    /// Runs `b` on a helper while `a` runs on this thread (with no helpers, one
    /// after the other), and returns both results.
    pub fn join<A: Send, B: Send>(
        &self,
        a: impl FnOnce() -> A + Send,
        b: impl FnOnce() -> B + Send,
    ) -> (A, B) {
        let slot = Mutex::new(None);
        let to = &slot;
        let there: Vec<Box<dyn FnOnce() + Send + '_>> = vec![Box::new(move || {
            *to.lock().expect("a result's slot") = Some(b())
        })];
        let a = self.fork(there, a);
        (a, taken(slot))
    }

    /// Runs the forward and backward passes of `shares` (one per thread) and
    /// returns the minibatch's loss, the shares' figures weighted together.
    /// Gradients are added into the parameters' (the caller zeroes them first); when
    /// any share's loss is not finite the returned total is not either, and the
    /// caller should zero the gradients and skip the step.
    pub fn step(&self, model: &ActorCritic, shares: Vec<Share>, params: &PpoParams) -> PpoLoss {
        combine(&self.run(model, shares, |m, share| share_step(m, share, params)))
    }

    /// [`ActorCritic::logits_and_values`] without gradients, the rows of `obs` split
    /// about equally over the threads: the learner's pass over a batch before its
    /// update.
    pub fn logits_and_values(&self, model: &ActorCritic, obs: &Tensor) -> (Tensor, Tensor) {
        let n = obs.size()[0];
        let parts = (self.threads as i64).clamp(1, n.max(1));
        if parts == 1 {
            return tch::no_grad(|| model.logits_and_values(obs));
        }
        let rows: Vec<Tensor> = (0..parts)
            .map(|i| {
                let (start, len) = share_rows(n, parts, i);
                obs.narrow(0, start, len)
            })
            .collect();
        let outs = self.run(model, rows, |m, rows| {
            tch::no_grad(|| m.logits_and_values(&rows))
        });
        let (logits, values): (Vec<Tensor>, Vec<Tensor>) = outs.into_iter().unzip();
        (Tensor::cat(&logits, 0), Tensor::cat(&values, 0))
    }
}

/// Where share `i` of `parts` about equal shares of `n` rows starts, and its length.
pub fn share_rows(n: i64, parts: i64, i: i64) -> (i64, i64) {
    let start = n * i / parts;
    (start, n * (i + 1) / parts - start)
}

/// One share's forward pass, loss and (if finite) backward pass.
fn share_step(model: &ActorCritic, share: Share, params: &PpoParams) -> (PpoLoss, f64) {
    let (loss, _) = share.loss(model, params);
    if loss.total.double_value(&[]).is_finite() {
        (&loss.total * share.weight).backward();
    }
    (loss, share.weight)
}

/// The result a helper left in `slot`.
fn taken<T>(slot: Mutex<Option<T>>) -> T {
    slot.into_inner()
        .expect("a result's slot")
        .expect("every helper's work ran")
}

/// The minibatch's loss from its shares': each figure weighted by the share's rows.
/// `total` carries no graph (the shares' backward passes have run).
fn combine(losses: &[(PpoLoss, f64)]) -> PpoLoss {
    let mean = |f: fn(&PpoLoss) -> f64| losses.iter().map(|(l, w)| f(l) * w).sum::<f64>();
    PpoLoss {
        total: Tensor::from(mean(|l| l.total.double_value(&[]))).to_kind(Kind::Float),
        policy: mean(|l| l.policy),
        value: mean(|l| l.value),
        entropy: mean(|l| l.entropy),
        clip_fraction: mean(|l| l.clip_fraction),
        approx_kl: mean(|l| l.approx_kl),
    }
}

/// The CPUs the calling thread may run on, in order (empty if the kernel does not
/// say).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is an empty set, and the kernel writes at most
    // the size passed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below the set's size.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// `cpus` dealt out to `threads` threads in turn (thread `i` gets the `i`-th, the
/// `i + threads`-th, ... of them), so that no two threads share a CPU while each may
/// still move between several on a larger machine. `None` with one thread, or with
/// fewer CPUs than threads.
fn deal(cpus: &[usize], threads: usize) -> Option<Vec<Vec<usize>>> {
    (threads > 1 && cpus.len() >= threads).then(|| {
        (0..threads)
            .map(|i| cpus.iter().copied().skip(i).step_by(threads).collect())
            .collect()
    })
}

/// Keeps the calling thread on `cpus`; a refusal is logged and changes nothing.
fn pin_this_thread(cpus: &[usize]) {
    // SAFETY: as in `allowed_cpus`; every CPU in `cpus` came from a set of this size.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let size = std::mem::size_of::<libc::cpu_set_t>();
    if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
        let err = std::io::Error::last_os_error();
        tracing::warn!(?cpus, %err, "could not pin a learner thread; it runs unpinned");
    }
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every variable's gradient, in the store's name order (for tests).
#[cfg(test)]
pub(crate) fn gradients(model: &ActorCritic) -> Vec<(String, Vec<f32>)> {
    let mut vars: Vec<_> = model.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter()
        .map(|(name, v)| (name, spur_core::model::f32_vec(&v.grad())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use spur_core::adam::Adam;

    /// The rows `start..end` of a minibatch as a share of `n` rows.
    fn share(rows: &[&Tensor; 5], start: i64, end: i64, n: i64) -> Share {
        let [obs, actions, proximal, advantages, targets] =
            rows.map(|t| t.narrow(0, start, end - start));
        Share {
            rows: ShareRows::Steps { obs, actions },
            flat: Tensor::arange_start(start, end, (Kind::Int64, Device::Cpu)),
            proximal,
            advantages,
            targets,
            weight: (end - start) as f64 / n as f64,
        }
    }

    /// Split over 2 and 3 threads (uneven shares), the gradients the optimizer sees
    /// and the loss's figures are those of one pass over the whole minibatch; a share
    /// whose loss is not finite makes the total not finite; the helpers' CPU time is
    /// counted.
    #[test]
    fn split_steps_add_up_to_the_whole_minibatch() {
        tch::manual_seed(11);
        let (obs_dim, num_actions, n) = (6, 4, 301);
        let model = ActorCritic::new(obs_dim, num_actions, &[32, 32], Device::Cpu);
        let mut opt = Adam::new(model.var_store(), 1e-3, 1e-5);
        let opts = (Kind::Float, Device::Cpu);
        let obs = Tensor::randn([n, obs_dim as i64], opts);
        let actions = Tensor::randint(num_actions as i64, [n], (Kind::Int64, Device::Cpu));
        let current = tch::no_grad(|| model.evaluate(&obs, &actions).log_probs.detach());
        let proximal = &current + (Tensor::rand([n], opts) - 0.5);
        let advantages = Tensor::randn([n], opts);
        let targets = Tensor::randn([n], opts);
        let params = PpoParams {
            clip_eps: 0.2,
            value_coef: 0.5,
            entropy_coef: 0.01,
        };

        opt.zero_grad();
        let eval = model.evaluate(&obs, &actions);
        let whole = ppo_loss(
            &eval.log_probs,
            &proximal,
            &advantages,
            &eval.values,
            &targets,
            &eval.entropy,
            &params,
        );
        whole.total.backward();
        let expected = gradients(&model);
        assert!(whole.clip_fraction > 0.05, "some ratios clipped");

        let rows = [&obs, &actions, &proximal, &advantages, &targets];
        let cpu_before = helper_cpu_seconds();
        for split in [2i64, 3] {
            // Garbage first: the caller zeroes, the shares add.
            opt.zero_grad();
            let shares = (0..split)
                .map(|i| {
                    let (start, len) = share_rows(n, split, i);
                    share(&rows, start, start + len, n)
                })
                .collect();
            let loss = Helpers::new(split as u32, 1).step(&model, shares, &params);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
            assert!(close(
                loss.total.double_value(&[]),
                whole.total.double_value(&[])
            ));
            for (got, want) in [
                (loss.policy, whole.policy),
                (loss.value, whole.value),
                (loss.entropy, whole.entropy),
                (loss.clip_fraction, whole.clip_fraction),
                (loss.approx_kl, whole.approx_kl),
            ] {
                assert!(close(got, want), "split {split}: {got} against {want}");
            }
            let got = gradients(&model);
            assert_eq!(got.len(), expected.len());
            for ((name, g), (_, e)) in got.iter().zip(&expected) {
                let scale = e.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                assert!(e.iter().any(|&x| x != 0.0), "{name}: a gradient to compare");
                for (i, (a, b)) in g.iter().zip(e).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * scale,
                        "split {split}: {name}[{i}]: {a} against {b}"
                    );
                }
            }
        }
        assert!(
            helper_cpu_seconds() > cpu_before,
            "helpers' CPU time counted"
        );

        // The pass before an update, split in 3 uneven parts: the same rows in order.
        let (logits, values) = tch::no_grad(|| model.logits_and_values(&obs));
        let (split_logits, split_values) = Helpers::new(3, 1).logits_and_values(&model, &obs);
        assert_eq!(split_logits.size(), logits.size());
        assert!(split_logits.allclose(&logits, 1e-5, 1e-6, false));
        assert!(split_values.allclose(&values, 1e-5, 1e-6, false));
        assert!(!split_values.requires_grad(), "no graph from the helpers");

        // One share's advantages hold a NaN (the other's rows are as above).
        let bad_advantages = advantages.copy();
        let _ = bad_advantages.narrow(0, n - 1, 1).fill_(f64::NAN);
        let bad = [&obs, &actions, &proximal, &bad_advantages, &targets];
        opt.zero_grad();
        let shares = vec![share(&bad, 0, n / 2, n), share(&bad, n / 2, n, n)];
        let loss = Helpers::new(2, 1).step(&model, shares, &params);
        assert!(!loss.total.double_value(&[]).is_finite());
    }

    #[test]
    fn threads_are_dealt_cpus_of_their_own() {
        assert_eq!(deal(&[0, 1], 2), Some(vec![vec![0], vec![1]]));
        let sixteen: Vec<usize> = (0..16).collect();
        let two = deal(&sixteen, 2).unwrap();
        assert_eq!(two[0], vec![0, 2, 4, 6, 8, 10, 12, 14]);
        assert_eq!(two[1], vec![1, 3, 5, 7, 9, 11, 13, 15]);
        // A container's CPUs need not start at 0 or be contiguous.
        assert_eq!(
            deal(&[3, 5, 6, 9, 12], 2),
            Some(vec![vec![3, 6, 12], vec![5, 9]])
        );
        assert_eq!(deal(&[4], 2), None, "fewer CPUs than threads");
        assert_eq!(deal(&sixteen, 1), None, "one thread is left alone");

        // Pinned for real: the helper runs on its CPUs only, the training thread
        // (here this test's thread, on one of its own) on the first list.
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty(), "the kernel names this thread's CPUs");
        let Some(dealt) = deal(&cpus, 2) else {
            eprintln!("one CPU only: nothing to pin");
            return;
        };
        let helpers = Helpers::with_cpus(2, 1, Some(dealt.clone()));
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    helpers.pin_training_thread();
                    let (here, there) = helpers.join(allowed_cpus, allowed_cpus);
                    assert_eq!(here, dealt[0], "the training thread's CPUs");
                    assert_eq!(there, dealt[1], "the helper's CPUs");
                })
                .join()
                .unwrap();
        });
        // An unpinned learner leaves its threads where they were.
        let (here, there) = Helpers::new(2, 1).join(allowed_cpus, allowed_cpus);
        assert_eq!((here, there), (cpus.clone(), cpus));
    }
}
