//! Judges answer a rendered prompt for a batch of texts. Every answer, whoever gave
//! it, goes through the same strict parser (`parse.rs`).
//!
//! - `rules`: the built-in offline stand-in for an LLM (a pattern file per environment)
//! - `openai`: any OpenAI-compatible chat-completions server, with timeouts, retries
//!   with jittered exponential backoff and a circuit breaker

mod openai;
mod rules;
#[cfg(test)]
mod scripted;

pub use openai::{Breaker, OpenAiJudge, OpenAiSettings};
pub use rules::RulesJudge;
#[cfg(test)]
pub use scripted::ScriptedJudge;

use crate::error::JudgeError;

pub enum Judge {
    Rules(RulesJudge),
    OpenAi(OpenAiJudge),
    #[cfg(test)]
    Scripted(ScriptedJudge),
}

impl Judge {
    /// Who answers, as stored with every label.
    pub fn id(&self) -> String {
        match self {
            Judge::Rules(j) => j.id(),
            Judge::OpenAi(j) => j.id(),
            #[cfg(test)]
            Judge::Scripted(_) => "scripted".into(),
        }
    }

    /// The raw answer for `task`, asked with `prompt`.
    pub async fn answer(&self, task: &Task<'_>, prompt: &str) -> Result<String, JudgeError> {
        match (self, task) {
            (Judge::Rules(j), Task::Label(texts)) => Ok(j.answer(texts)),
            (Judge::Rules(j), Task::Rank(pairs)) => Ok(j.answer_pairs(pairs)),
            (Judge::OpenAi(j), _) => j.answer(prompt).await,
            #[cfg(test)]
            (Judge::Scripted(j), Task::Label(texts)) => Ok(j.answer(texts)),
            #[cfg(test)]
            (Judge::Scripted(_), Task::Rank(_)) => Err(JudgeError::BadResponse(
                "the scripted judge does not rank".into(),
            )),
        }
    }
}

/// What a judge is asked about.
pub enum Task<'a> {
    /// Is each text helpful toward the goal?
    Label(&'a [String]),
    /// Which text of each pair shows more progress?
    Rank(&'a [(String, String)]),
}
