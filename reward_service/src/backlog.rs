//! The queue of texts waiting for a label: newest first, bounded (the oldest are shed
//! and counted when it overflows), and a text is queued or in flight at most once.

use std::collections::{HashSet, VecDeque};

pub struct Backlog {
    queue: VecDeque<String>,
    queued: HashSet<String>,
    in_flight: HashSet<String>,
    capacity: usize,
    pub shed: u64,
}

impl Backlog {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            queued: HashSet::new(),
            in_flight: HashSet::new(),
            capacity,
            shed: 0,
        }
    }

    /// Texts waiting.
    pub fn depth(&self) -> usize {
        self.queue.len()
    }

    /// Queues a new text at the front; false when it is already queued or in flight.
    pub fn push_new(&mut self, text: String) -> bool {
        if self.queued.contains(&text) || self.in_flight.contains(&text) {
            return false;
        }
        self.queued.insert(text.clone());
        self.queue.push_front(text);
        while self.queue.len() > self.capacity {
            if let Some(old) = self.queue.pop_back() {
                self.queued.remove(&old);
                self.shed += 1;
            }
        }
        true
    }

    /// Puts texts back after a failed request (or a wait), behind the newer ones;
    /// returns those that did not fit.
    pub fn requeue(&mut self, texts: Vec<String>) -> Vec<String> {
        let mut shed = Vec::new();
        for t in texts {
            self.in_flight.remove(&t);
            if self.queued.contains(&t) {
                continue;
            }
            if self.queue.len() < self.capacity {
                self.queued.insert(t.clone());
                self.queue.push_back(t);
            } else {
                self.shed += 1;
                shed.push(t);
            }
        }
        shed
    }

    /// Takes up to `n` of the newest texts and marks them in flight.
    pub fn take(&mut self, n: usize) -> Vec<String> {
        let k = n.min(self.queue.len());
        let batch: Vec<String> = self.queue.drain(..k).collect();
        for t in &batch {
            self.queued.remove(t);
            self.in_flight.insert(t.clone());
        }
        batch
    }

    /// The texts are labelled (or given up on): no longer in flight.
    pub fn done(&mut self, texts: &[String]) {
        for t in texts {
            self.in_flight.remove(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_first_bounded_and_deduplicated() {
        let mut b = Backlog::new(3);
        for t in ["a", "b", "c", "d"] {
            assert!(b.push_new(t.into()));
        }
        assert_eq!(b.shed, 1); // "a", the oldest, was shed
        assert!(!b.push_new("d".into()));
        let batch = b.take(2);
        assert_eq!(batch, vec!["d".to_string(), "c".to_string()]);
        // in flight: not queued again
        assert!(!b.push_new("d".into()));
        assert!(b.requeue(vec!["d".into()]).is_empty());
        assert_eq!(b.take(5), vec!["b".to_string(), "d".to_string()]);
        b.done(&["b".into(), "c".into(), "d".into()]);
        assert!(b.push_new("c".into()));
        // a full queue sheds what comes back, and says which
        assert!(b.push_new("e".into()) && b.push_new("f".into()));
        assert_eq!(b.requeue(vec!["x".into()]), vec!["x".to_string()]);
        assert_eq!(b.shed, 2);
    }
}
