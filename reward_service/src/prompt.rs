//! Prompt templates. A template lives in a file in our own words, the environment's
//! goal in another; the prompt version is a hash of both, so labels made under one
//! wording are never mixed with labels made under another.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::ServiceError;

#[derive(Debug, Clone)]
pub struct Prompt {
    template: String,
    goal: String,
    /// First 16 hex digits of SHA-256 over the template and the goal.
    pub version: String,
}

pub fn read(path: &Path) -> Result<String, ServiceError> {
    std::fs::read_to_string(path).map_err(|source| ServiceError::ReadFile {
        path: path.display().to_string(),
        source,
    })
}

/// Short hex digest of `parts`, separated so that ("ab", "c") and ("a", "bc") differ.
pub fn version_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Prompt {
    pub fn new(template: String, goal: String) -> Self {
        let version = version_of(&[&template, goal.trim()]);
        Self {
            template,
            goal: goal.trim().to_string(),
            version,
        }
    }

    pub fn load(template: &Path, goal: &Path) -> Result<Self, ServiceError> {
        Ok(Self::new(read(template)?, read(goal)?))
    }

    /// The prompt for `texts`, numbered from 1.
    pub fn render(&self, texts: &[String]) -> String {
        let events: String = texts
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}. {}\n", i + 1, one_line(t)))
            .collect();
        self.fill(texts.len(), &events)
    }

    /// The ranking prompt for `pairs`, numbered from 1, each on its own two lines.
    pub fn render_pairs(&self, pairs: &[(String, String)]) -> String {
        let events: String = pairs
            .iter()
            .enumerate()
            .map(|(i, (a, b))| {
                format!(
                    "{}. first: {}\n   second: {}\n",
                    i + 1,
                    one_line(a),
                    one_line(b)
                )
            })
            .collect();
        self.fill(pairs.len(), &events)
    }

    fn fill(&self, count: usize, events: &str) -> String {
        self.template
            .replace("{goal}", &self.goal)
            .replace("{count}", &count.to_string())
            .replace("{events}", events.trim_end())
    }
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_numbered_events_and_versions_by_content() {
        let p = Prompt::new(
            "Goal: {goal}\n{count} events:\n{events}\n".into(),
            "win".into(),
        );
        let text = p.render(&["a b".into(), "c\nd".into()]);
        assert_eq!(text, "Goal: win\n2 events:\n1. a b\n2. c d\n");
        let q = Prompt::new(
            "Goal: {goal}\n{count} events:\n{events}\n".into(),
            "lose".into(),
        );
        assert_ne!(p.version, q.version);
        let pairs = p.render_pairs(&[("a".into(), "b".into())]);
        assert_eq!(pairs, "Goal: win\n1 events:\n1. first: a\n   second: b\n");
        assert_eq!(p.version.len(), 16);
    }
}
