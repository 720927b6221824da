//! Distils the judge's labels into the `classification` reward model: a char-level
//! CNN (`spur_core::text_model`) trained on its own thread. Each time new labels
//! arrive it takes `distill_steps` Adam steps on class-balanced minibatches of all
//! labels so far and publishes the weights as a new reward-model version. Unlike the
//! label table, the network also rewards texts the judge has not seen yet.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use spur_core::text_model::CharCnnTrainer;
use tracing::{info, warn};

use crate::model::RetrievalModel;

/// Texts per training minibatch.
const MINIBATCH: usize = 128;

/// Hands labelled texts (text, helpful) to the training thread.
pub type LabelSender = mpsc::Sender<Vec<(String, bool)>>;

/// Starts the training thread with the labels already stored. The thread ends when
/// `stop` is set or every sender is dropped; join it before the process exits.
pub fn spawn(
    initial: Vec<(String, bool)>,
    steps: u32,
    lr: f64,
    publisher: Arc<RetrievalModel>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<(LabelSender, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel::<Vec<(String, bool)>>();
    let handle = std::thread::Builder::new()
        .name("spur-distill".into())
        .spawn(move || {
            tch::set_num_threads(1);
            tch::manual_seed(0);
            let mut trainer = match CharCnnTrainer::new(2, lr, tch::Device::Cpu) {
                Ok(t) => t,
                Err(e) => {
                    warn!(error = %e, "cannot build the classification model");
                    return;
                }
            };
            let mut rng = SmallRng::seed_from_u64(0);
            let (mut pos, mut neg): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
            add(initial, &mut pos, &mut neg);
            let mut pending = !pos.is_empty() || !neg.is_empty();
            loop {
                if pending {
                    let loss = train(&mut trainer, &pos, &neg, steps, &mut rng);
                    let version = publisher.version() + 1;
                    match trainer.net.to_safetensors(version) {
                        Ok(bytes) => {
                            publisher.publish_weights(bytes, loss);
                            info!(
                                loss,
                                positives = pos.len(),
                                negatives = neg.len(),
                                "classification model updated"
                            );
                        }
                        Err(e) => warn!(error = %e, "cannot serialize the classification model"),
                    }
                }
                // Wait for labels, then take everything that queued up meanwhile.
                let batch = loop {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    match rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(b) => break b,
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                };
                add(batch, &mut pos, &mut neg);
                while let Ok(more) = rx.try_recv() {
                    add(more, &mut pos, &mut neg);
                }
                pending = true;
            }
        })?;
    Ok((tx, handle))
}

fn add(batch: Vec<(String, bool)>, pos: &mut Vec<String>, neg: &mut Vec<String>) {
    for (t, h) in batch {
        if h {
            pos.push(t)
        } else {
            neg.push(t)
        }
    }
}

/// `steps` Adam steps on minibatches drawn half from each class (when both exist).
fn train(
    t: &mut CharCnnTrainer,
    pos: &[String],
    neg: &[String],
    steps: u32,
    rng: &mut SmallRng,
) -> f64 {
    let mut loss = 0.0;
    for _ in 0..steps {
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
