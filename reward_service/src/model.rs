//! The reward model subscribers receive: for `retrieval` the label table itself (each
//! committed batch of labels is a new version; subscribers get the whole table first,
//! then each version's new labels, and one that falls too far behind gets the whole
//! table again); for `classification` and `ranking` the newest distilled network.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use spur_core::config::RewardModelKind;
use spur_proto::v1::{LabelEntry, RewardModelUpdate};
use tokio::sync::broadcast;

/// The label table, and what subscribers receive: the table and its deltas
/// (`retrieval`), or the newest network weights (`classification`, `ranking`).
/// For `ranking` the table holds every text judged in some pair, with 1 for texts
/// that showed more progress than their partner at least once.
pub struct RewardModel {
    prompt_version: String,
    /// What subscribers get: label deltas (`Retrieval`) or network weights.
    kind: RewardModelKind,
    state: Mutex<(u64, HashMap<String, f32>)>,
    latest_weights: Mutex<Option<Arc<RewardModelUpdate>>>,
    deltas: broadcast::Sender<Arc<RewardModelUpdate>>,
}

impl RewardModel {
    /// Starts from the labels already in the store (version 1). With a network kind
    /// (not `Retrieval`), subscribers get weights from
    /// [`publish_weights`](Self::publish_weights).
    pub fn new(
        prompt_version: String,
        kind: RewardModelKind,
        labels: impl IntoIterator<Item = (String, f32)>,
    ) -> Self {
        let (deltas, _) = broadcast::channel(256);
        Self {
            prompt_version,
            kind,
            state: Mutex::new((1, labels.into_iter().collect())),
            latest_weights: Mutex::new(None),
            deltas,
        }
    }

    /// Publishes a new network version to subscribers.
    pub fn publish_weights(&self, weights: Vec<u8>, loss: f64) {
        let mut s = self.state.lock().expect("model lock poisoned");
        s.0 += 1;
        let update = Arc::new(RewardModelUpdate {
            version: s.0,
            kind: spur_proto::v1::RewardModelKind::from(self.kind).into(),
            prompt_version: self.prompt_version.clone(),
            full: true,
            labels: Vec::new(),
            weights,
            loss,
        });
        *self.latest_weights.lock().expect("model lock poisoned") = Some(update.clone());
        let _ = self.deltas.send(update);
    }

    /// The kind subscribers get, and the newest network's training loss.
    pub fn kind_and_loss(&self) -> (RewardModelKind, f64) {
        let loss = self
            .latest_weights
            .lock()
            .expect("model lock poisoned")
            .as_ref()
            .map_or(0.0, |u| u.loss);
        (self.kind, loss)
    }

    pub fn version(&self) -> u64 {
        self.state.lock().expect("model lock poisoned").0
    }

    pub fn contains(&self, text: &str) -> bool {
        self.state
            .lock()
            .expect("model lock poisoned")
            .1
            .contains_key(text)
    }

    /// Labelled texts.
    pub fn label_count(&self) -> usize {
        self.state.lock().expect("model lock poisoned").1.len()
    }

    pub fn positives(&self) -> usize {
        let s = self.state.lock().expect("model lock poisoned");
        s.1.values().filter(|&&v| v > 0.0).count()
    }

    /// Adds committed labels as a new version and tells subscribers.
    pub fn add(&self, labels: Vec<(String, f32)>) {
        if labels.is_empty() {
            return;
        }
        let mut s = self.state.lock().expect("model lock poisoned");
        for (t, v) in &labels {
            let old = s.1.entry(t.clone()).or_insert(*v);
            *old = old.max(*v);
        }
        if self.kind != RewardModelKind::Retrieval {
            return; // subscribers get weights, not labels
        }
        s.0 += 1;
        let update = RewardModelUpdate {
            version: s.0,
            kind: spur_proto::v1::RewardModelKind::Retrieval.into(),
            prompt_version: self.prompt_version.clone(),
            full: false,
            labels: labels
                .into_iter()
                .map(|(text, value)| LabelEntry { text, value })
                .collect(),
            ..Default::default()
        };
        let _ = self.deltas.send(Arc::new(update));
    }

    /// The newest network, or else the whole table, as one update, plus a receiver
    /// for later versions.
    pub fn subscribe(
        &self,
    ) -> (
        RewardModelUpdate,
        broadcast::Receiver<Arc<RewardModelUpdate>>,
    ) {
        let s = self.state.lock().expect("model lock poisoned");
        let rx = self.deltas.subscribe();
        if let Some(w) = self
            .latest_weights
            .lock()
            .expect("model lock poisoned")
            .as_ref()
        {
            return ((**w).clone(), rx);
        }
        let full = RewardModelUpdate {
            version: s.0,
            kind: spur_proto::v1::RewardModelKind::Retrieval.into(),
            prompt_version: self.prompt_version.clone(),
            full: true,
            labels: s
                .1
                .iter()
                .map(|(t, v)| LabelEntry {
                    text: t.clone(),
                    value: *v,
                })
                .collect(),
            ..Default::default()
        };
        (full, rx)
    }
}
