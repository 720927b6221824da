//! A client for OpenAI-compatible chat-completions servers (vLLM, llama.cpp server,
//! Ollama, hosted APIs). One request per batch of texts, with a per-request timeout,
//! retries with jittered exponential backoff for errors worth retrying, and a circuit
//! breaker that pauses every request for a while after repeated failures, so a
//! struggling server is not hammered. The API key comes from an environment variable
//! and is never logged.

use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::warn;

use crate::error::JudgeError;

#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    /// Base URL up to and including `/v1`.
    pub base_url: String,
    pub model: String,
    /// Sent as a bearer token; prints as `<redacted>`.
    pub api_key: Option<spur_core::secret::Secret>,
    pub timeout: Duration,
    pub retries: u32,
    pub max_tokens: u32,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
}

/// Opens after `threshold` consecutive failures and stays open for `cooldown`.
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<(u32, Option<Instant>)>,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            state: Mutex::new((0, None)),
        }
    }

    /// When the breaker is open, the moment it closes again.
    pub fn open_until(&self) -> Option<Instant> {
        let s = self.state.lock().expect("breaker lock poisoned");
        s.1.filter(|t| *t > Instant::now())
    }

    pub fn success(&self) {
        *self.state.lock().expect("breaker lock poisoned") = (0, None);
    }

    /// Records a failure; true when this failure opened the breaker.
    pub fn failure(&self) -> bool {
        let mut s = self.state.lock().expect("breaker lock poisoned");
        s.0 += 1;
        if s.0 >= self.threshold {
            s.0 = 0;
            s.1 = Some(Instant::now() + self.cooldown);
            return true;
        }
        false
    }
}

pub struct OpenAiJudge {
    http: reqwest::Client,
    settings: OpenAiSettings,
    breaker: Breaker,
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: [Message<'a>; 1],
    temperature: f32,
    max_tokens: u32,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    content: Option<String>,
}

impl OpenAiJudge {
    pub fn new(settings: OpenAiSettings) -> Result<Self, JudgeError> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .map_err(|e| JudgeError::Connect(e.to_string()))?;
        Ok(Self {
            http,
            breaker: Breaker::new(settings.breaker_failures, settings.breaker_cooldown),
            settings,
        })
    }

    pub fn id(&self) -> String {
        format!("openai:{}", self.settings.model)
    }

    /// One completion for `prompt`, retried as configured.
    pub async fn answer(&self, prompt: &str) -> Result<String, JudgeError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            if let Some(until) = self.breaker.open_until() {
                tokio::time::sleep_until(until).await;
            }
            let result = self.request(prompt).await;
            match result {
                Ok(answer) => {
                    self.breaker.success();
                    return Ok(answer);
                }
                Err(e) => {
                    if self.breaker.failure() {
                        warn!(cooldown = ?self.settings.breaker_cooldown, "judge keeps failing, pausing requests");
                    }
                    if !e.retryable() || attempt >= self.settings.retries {
                        return Err(e);
                    }
                    attempt += 1;
                    let jittered = delay.mul_f64(rand::rng().random_range(0.5..=1.0));
                    warn!(attempt, error = %e, ?jittered, "judge request failed, retrying");
                    tokio::time::sleep(jittered).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn request(&self, prompt: &str) -> Result<String, JudgeError> {
        let url = format!(
            "{}/chat/completions",
            self.settings.base_url.trim_end_matches('/')
        );
        let body = ChatRequest {
            model: &self.settings.model,
            messages: [Message {
                role: "user",
                content: prompt,
            }],
            temperature: 0.0,
            max_tokens: self.settings.max_tokens,
        };
        let mut req = self.http.post(&url).json(&body);
        if let Some(key) = &self.settings.api_key {
            req = req.bearer_auth(key.expose());
        }
        let send = tokio::time::timeout(self.settings.timeout, req.send());
        let resp = match send.await {
            Err(_) => return Err(JudgeError::Timeout),
            Ok(Err(e)) if e.is_timeout() => return Err(JudgeError::Timeout),
            Ok(Err(e)) => return Err(JudgeError::Connect(e.to_string())),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let text = match tokio::time::timeout(self.settings.timeout, resp.text()).await {
            Err(_) => return Err(JudgeError::Timeout),
            Ok(Err(e)) => return Err(JudgeError::Connect(e.to_string())),
            Ok(Ok(t)) => t,
        };
        if !status.is_success() {
            let body: String = text.chars().take(200).collect();
            return Err(JudgeError::Http {
                status: status.as_u16(),
                body,
            });
        }
        let parsed: ChatResponse =
            serde_json::from_str(&text).map_err(|e| JudgeError::BadResponse(e.to_string()))?;
        parsed
            .choices
            .into_iter()
            .next()
            .and_then(|c| c.message.content)
            .ok_or_else(|| JudgeError::BadResponse("no choices[0].message.content".into()))
    }
}
