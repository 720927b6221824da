//! Distils the judge's verdicts into a network reward model (`spur_core::text_model`,
//! a char-level CNN) trained on its own thread:
//!
//! - `classification`: two outputs, cross-entropy on class-balanced minibatches of
//!   the labels (helpful / not helpful);
//! - `ranking`: one output, the Bradley–Terry loss on minibatches of ranked pairs
//!   (ties count as 0.5; each pair is shown in a random order).
//!
//! Each time new verdicts arrive it takes `distill_steps` Adam steps on all verdicts
//! so far and publishes the weights as a new reward-model version. Unlike the label
//! table, a network also rewards texts the judge has not seen yet.

use std::sync::mpsc;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use spur_core::config::RewardModelKind;
use spur_core::text_model::CharCnnTrainer;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::model::RewardModel;
use crate::store::Pair;

/// Texts (or pairs) per training minibatch.
const MINIBATCH: usize = 128;

/// Verdicts for the training thread.
pub enum Verdicts {
    /// (text, helpful)
    Labels(Vec<(String, bool)>),
    /// (pair, preference for the first text)
    Pairs(Vec<(Pair, f32)>),
}

/// Hands new verdicts to the training thread.
pub type VerdictSender = mpsc::Sender<Verdicts>;

/// Everything the network is trained on.
#[derive(Default)]
struct Data {
    pos: Vec<String>,
    neg: Vec<String>,
    pairs: Vec<(Pair, f32)>,
}

impl Data {
    fn add(&mut self, v: Verdicts) {
        match v {
            Verdicts::Labels(labels) => {
                for (t, h) in labels {
                    if h {
                        self.pos.push(t)
                    } else {
                        self.neg.push(t)
                    }
                }
            }
            Verdicts::Pairs(pairs) => self.pairs.extend(pairs),
        }
    }

    fn is_empty(&self) -> bool {
        self.pos.is_empty() && self.neg.is_empty() && self.pairs.is_empty()
    }
}

/// The running training thread.
pub struct Distiller {
    /// Resolves (with an error) once the thread has let go of everything it held.
    pub finished: oneshot::Receiver<()>,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts the training thread for the `kind` network (classification or ranking) with the
/// verdicts already stored. The thread ends when every sender is dropped, or after
/// the training step it is in once `cancel` is cancelled.
pub fn spawn(
    kind: RewardModelKind,
    initial: Verdicts,
    steps: u32,
    lr: f64,
    publisher: Arc<RewardModel>,
    cancel: CancellationToken,
) -> std::io::Result<(VerdictSender, Distiller)> {
    let (tx, rx) = mpsc::channel::<Verdicts>();
    let (done, finished) = oneshot::channel::<()>();
    let ranking = kind == RewardModelKind::Ranking;
    let thread = std::thread::Builder::new()
        .name("spur-distill".into())
        .spawn(move || {
            // Dropped last, when everything else the thread holds is gone.
            let _done = done;
            tch::set_num_threads(1);
            tch::manual_seed(0);
            let outputs = if ranking { 1 } else { 2 };
            let mut trainer = match CharCnnTrainer::new(outputs, lr, tch::Device::Cpu) {
                Ok(t) => t,
                Err(e) => {
                    warn!(kind = kind.name(), error = %e, "cannot build the reward network");
                    return;
                }
            };
            let mut rng = SmallRng::seed_from_u64(0);
            let mut data = Data::default();
            data.add(initial);
            let mut pending = !data.is_empty();
            loop {
                if pending {
                    let loss = if ranking {
                        train_ranker(&mut trainer, &data.pairs, steps, &mut rng, &cancel)
                    } else {
                        let (pos, neg) = (&data.pos, &data.neg);
                        train_classifier(&mut trainer, pos, neg, steps, &mut rng, &cancel)
                    };
                    if cancel.is_cancelled() {
                        return;
                    }
                    let version = publisher.version() + 1;
                    match trainer.net.to_safetensors(version) {
                        Ok(bytes) => {
                            publisher.publish_weights(bytes, loss);
                            info!(
                                kind = kind.name(),
                                loss,
                                positives = data.pos.len(),
                                negatives = data.neg.len(),
                                pairs = data.pairs.len(),
                                "reward network updated"
                            );
                        }
                        Err(e) => warn!(error = %e, "cannot serialize the reward network"),
                    }
                }
                // Wait for verdicts, then take everything that queued up meanwhile.
                let Ok(batch) = rx.recv() else { return };
                if cancel.is_cancelled() {
                    return;
                }
                data.add(batch);
                while let Ok(more) = rx.try_recv() {
                    data.add(more);
                }
                pending = true;
            }
        })?;
    Ok((tx, Distiller { finished, thread }))
}

/// `steps` Adam steps on minibatches drawn half from each class (when both exist).
fn train_classifier(
    t: &mut CharCnnTrainer,
    pos: &[String],
    neg: &[String],
    steps: u32,
    rng: &mut SmallRng,
    cancel: &CancellationToken,
) -> f64 {
    let mut loss = 0.0;
    for _ in 0..steps {
        if cancel.is_cancelled() {
            break;
        }
        let mut texts: Vec<&str> = Vec::with_capacity(MINIBATCH);
        let mut labels: Vec<i64> = Vec::with_capacity(MINIBATCH);
        for i in 0..MINIBATCH {
            let from_pos = if pos.is_empty() {
                false
            } else if neg.is_empty() {
                true
            } else {
                i % 2 == 0
            };
            let pool = if from_pos { pos } else { neg };
            texts.push(&pool[rng.random_range(0..pool.len())]);
            labels.push(from_pos as i64);
        }
        loss = t.train_classifier(&texts, &labels);
    }
    loss
}

/// `steps` Adam steps of the Bradley–Terry loss on pairs drawn uniformly, each in
/// a random order so the network cannot learn a position.
fn train_ranker(
    t: &mut CharCnnTrainer,
    pairs: &[(Pair, f32)],
    steps: u32,
    rng: &mut SmallRng,
    cancel: &CancellationToken,
) -> f64 {
    let mut loss = 0.0;
    if pairs.is_empty() {
        return loss;
    }
    for _ in 0..steps {
        if cancel.is_cancelled() {
            break;
        }
        let mut first: Vec<&str> = Vec::with_capacity(MINIBATCH);
        let mut second: Vec<&str> = Vec::with_capacity(MINIBATCH);
        let mut prefer: Vec<f32> = Vec::with_capacity(MINIBATCH);
        for _ in 0..MINIBATCH {
            let ((a, b), p) = &pairs[rng.random_range(0..pairs.len())];
            if rng.random_bool(0.5) {
                first.push(a);
                second.push(b);
                prefer.push(*p);
            } else {
                first.push(b);
                second.push(a);
                prefer.push(1.0 - *p);
            }
        }
        loss = t.train_ranker(&first, &second, &prefer);
    }
    loss
}
