//! The rule judge: a stand-in for an LLM, for offline runs and tests. It is not an
//! LLM: it marks a text helpful when it contains one of the phrases listed as
//! `helpful: <phrase>` in its pattern file (case-insensitive), and answers in exactly
//! the format the prompt asks an LLM for. The file lists its phrases from the least
//! to the most progress; asked about a pair, the judge prefers the text whose phrase
//! comes later, and calls it a tie when neither text has a later phrase.

use std::path::Path;

use crate::error::ServiceError;
use crate::parse::{format_labels, format_preferences};

pub struct RulesJudge {
    name: String,
    helpful: Vec<String>,
    /// The file's text, which versions the labels this judge makes.
    pub source: String,
}

impl RulesJudge {
    pub fn load(path: &Path) -> Result<Self, ServiceError> {
        let source = crate::prompt::read(path)?;
        Self::parse(&path.display().to_string(), source)
    }

    pub fn parse(name: &str, source: String) -> Result<Self, ServiceError> {
        let mut helpful = Vec::new();
        for (i, line) in source.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.split_once(':') {
                Some(("helpful", phrase)) if !phrase.trim().is_empty() => {
                    helpful.push(phrase.trim().to_lowercase())
                }
                _ => {
                    return Err(ServiceError::Judge(format!(
                        "{name} line {}: expected `helpful: <phrase>`",
                        i + 1
                    )))
                }
            }
        }
        Ok(Self {
            name: name.to_string(),
            helpful,
            source,
        })
    }

    pub fn id(&self) -> String {
        format!("rules:{}", self.name)
    }

    /// 0 for a text with no listed phrase, else 1 + the position of the last listed
    /// phrase it contains.
    pub fn progress(&self, text: &str) -> usize {
        let t = text.to_lowercase();
        self.helpful
            .iter()
            .rposition(|p| t.contains(p.as_str()))
            .map_or(0, |i| i + 1)
    }

    pub fn is_helpful(&self, text: &str) -> bool {
        self.progress(text) > 0
    }

    pub fn answer(&self, texts: &[String]) -> String {
        let labels: Vec<bool> = texts.iter().map(|t| self.is_helpful(t)).collect();
        format_labels(&labels)
    }

    pub fn answer_pairs(&self, pairs: &[(String, String)]) -> String {
        let prefs: Vec<f32> = pairs
            .iter()
            .map(|(a, b)| match self.progress(a).cmp(&self.progress(b)) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Less => 0.0,
                std::cmp::Ordering::Equal => 0.5,
            })
            .collect();
        format_preferences(&prefs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_by_phrase() {
        let j = RulesJudge::parse(
            "t",
            "# comment\nhelpful: pick up the key\n\nhelpful: Unlock\n".into(),
        )
        .unwrap();
        assert!(j.is_helpful("You pick up the key"));
        assert!(j.is_helpful("you unlock the door with the key"));
        assert!(!j.is_helpful("you bump into a wall"));
        assert_eq!(
            j.answer(&["x".into(), "unlock".into()]),
            "1: not helpful\n2: helpful\n"
        );
        assert!(RulesJudge::parse("t", "helpfull: x\n".into()).is_err());
        // later phrases are more progress; no phrase at all ties with no phrase
        let pairs = [
            ("unlock".to_string(), "pick up the key".to_string()),
            ("a wall".to_string(), "pick up the key".to_string()),
            ("a wall".to_string(), "nothing".to_string()),
        ];
        assert_eq!(j.answer_pairs(&pairs), "1: first\n2: second\n3: tie\n");
    }
}
