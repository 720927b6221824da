//! Judges answer a rendered prompt for a batch of texts. Every answer, whoever gave
//! it, goes through the same strict parser (`parse.rs`).
//!
//! - `rules`: the built-in offline stand-in for an LLM (a pattern file per environment)
//! - `openai`: any OpenAI-compatible chat-completions server, with timeouts, retries
//!   with jittered exponential backoff and a circuit breaker

mod openai;
mod rules;

pub use openai::{Breaker, OpenAiJudge, OpenAiSettings};
pub use rules::RulesJudge;

use crate::error::JudgeError;

pub enum Judge {
    Rules(RulesJudge),
    OpenAi(OpenAiJudge),
}

impl Judge {
    /// Who answers, as stored with every label.
    pub fn id(&self) -> String {
        match self {
            Judge::Rules(j) => j.id(),
            Judge::OpenAi(j) => j.id(),
        }
    }

    /// The raw answer for `texts`, asked with `prompt`.
    pub async fn answer(&self, texts: &[String], prompt: &str) -> Result<String, JudgeError> {
        match self {
            Judge::Rules(j) => Ok(j.answer(texts)),
            Judge::OpenAi(j) => j.answer(prompt).await,
        }
    }
}
