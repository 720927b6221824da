//! The retrieval reward model: the label table itself. Each committed batch of labels
//! is a new version; subscribers get the whole table first, then each version's new
//! labels. A subscriber that falls too far behind gets the whole table again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use spur_proto::v1::{LabelEntry, RewardModelUpdate};
use tokio::sync::broadcast;

pub const KIND_RETRIEVAL: &str = "retrieval";

pub struct RetrievalModel {
    prompt_version: String,
    state: Mutex<(u64, HashMap<String, f32>)>,
    deltas: broadcast::Sender<Arc<RewardModelUpdate>>,
}

impl RetrievalModel {
    /// Starts from the labels already in the store (version 1).
    pub fn new(prompt_version: String, labels: impl IntoIterator<Item = (String, f32)>) -> Self {
        let (deltas, _) = broadcast::channel(256);
        Self {
            prompt_version,
            state: Mutex::new((1, labels.into_iter().collect())),
            deltas,
        }
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
        s.0 += 1;
        for (t, v) in &labels {
            s.1.insert(t.clone(), *v);
        }
        let update = RewardModelUpdate {
            version: s.0,
            kind: KIND_RETRIEVAL.into(),
            prompt_version: self.prompt_version.clone(),
            full: false,
            labels: labels
                .into_iter()
                .map(|(text, value)| LabelEntry { text, value })
                .collect(),
        };
        let _ = self.deltas.send(Arc::new(update));
    }

    /// The whole table as one update, plus a receiver for later versions.
    pub fn subscribe(
        &self,
    ) -> (
        RewardModelUpdate,
        broadcast::Receiver<Arc<RewardModelUpdate>>,
    ) {
        let s = self.state.lock().expect("model lock poisoned");
        let rx = self.deltas.subscribe();
        let full = RewardModelUpdate {
            version: s.0,
            kind: KIND_RETRIEVAL.into(),
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
        };
        (full, rx)
    }
}
