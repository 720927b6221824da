//! A judge for unit tests: gives scripted answers first, then correct ones ("helpful"
//! for texts that mention a key), and records every text it was asked about.

use std::collections::VecDeque;
use std::sync::Mutex;

pub struct ScriptedJudge {
    script: Mutex<VecDeque<String>>,
    asked: Mutex<Vec<String>>,
}

impl ScriptedJudge {
    pub fn new(script: &[&str]) -> Self {
        Self {
            script: Mutex::new(script.iter().map(|s| s.to_string()).collect()),
            asked: Mutex::new(Vec::new()),
        }
    }

    pub fn answer(&self, texts: &[String]) -> String {
        self.asked.lock().unwrap().extend(texts.iter().cloned());
        if let Some(s) = self.script.lock().unwrap().pop_front() {
            return s;
        }
        crate::parse::format_labels(&texts.iter().map(|t| t.contains("key")).collect::<Vec<_>>())
    }

    /// How often `text` was asked about.
    pub fn calls(&self, text: &str) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|t| *t == text)
            .count()
    }
}
