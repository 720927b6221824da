//! What the `spur` binary's process tests share: a stub OpenAI-compatible judge that
//! speaks the real chat-completions wire format over HTTP and counts its calls per
//! text, and small helpers for child processes.

#![allow(dead_code)] // each test binary uses part of it

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};

/// The stub judge: answers "helpful" for texts that mention a key, after `garbage`
/// answers in a shape the prompt does not ask for; each answer takes `delay`.
#[derive(Default)]
pub struct Stub {
    pub delay: Duration,
    pub garbage: AtomicUsize,
    pub requests: AtomicUsize,
    calls: Mutex<HashMap<String, usize>>,
}

impl Stub {
    /// How often each text was sent to the judge so far.
    pub fn calls(&self) -> HashMap<String, usize> {
        self.calls.lock().unwrap().clone()
    }
}

/// The numbered events of a rendered prompt ("1. text").
fn events(prompt: &str) -> Vec<String> {
    prompt
        .lines()
        .filter_map(|l| {
            let (n, rest) = l.split_once(". ")?;
            n.parse::<usize>().ok().map(|_| rest.to_string())
        })
        .collect()
}

async fn completions(
    State(stub): State<Arc<Stub>>,
    Json(body): Json<serde_json::Value>,
) -> Json<serde_json::Value> {
    stub.requests.fetch_add(1, Ordering::SeqCst);
    let prompt = body["messages"][0]["content"].as_str().unwrap_or_default();
    let texts = events(prompt);
    {
        let mut calls = stub.calls.lock().unwrap();
        for t in &texts {
            *calls.entry(t.clone()).or_default() += 1;
        }
    }
    tokio::time::sleep(stub.delay).await;
    let garbage = stub
        .garbage
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let content: String = if garbage {
        // Reasoning before the verdicts, each claiming "helpful": a lenient parser
        // would make every text positive.
        let verdicts: String = (1..=texts.len())
            .map(|i| format!("{i}: helpful\n"))
            .collect();
        format!("Thought process: every event here helps.\n{verdicts}")
    } else {
        spur_reward_service::parse::format_labels(
            &texts.iter().map(|t| t.contains("key")).collect::<Vec<_>>(),
        )
    };
    Json(serde_json::json!({
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"
        }]
    }))
}

/// Serves the stub judge on a free loopback port; returns its base URL (`.../v1`).
pub async fn start_stub(delay: Duration, garbage: usize) -> (String, Arc<Stub>) {
    let stub = Arc::new(Stub {
        delay,
        garbage: AtomicUsize::new(garbage),
        ..Stub::default()
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), stub)
}

/// A fresh, empty temp folder for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spur-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The last 30 lines of a log file.
pub fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// SIGKILL: no handler runs, nothing is flushed.
pub fn kill_9(pid: u32) {
    // SAFETY: kill(2) with a pid the test started and a valid signal number.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// The repository root (the workspace folder).
pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// `spur <args>` from the repository root, with no `SPUR_*` variables but `vars`.
pub fn spur(args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spur"));
    cmd.current_dir(ROOT).args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SPUR_")) {
        cmd.env_remove(k);
    }
    cmd.envs(vars.iter().copied());
    cmd.output().expect("the spur binary runs")
}

/// A child's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The first `name` on `PATH`, if any.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The project venv's Python (where `make test` installs kubernetes-validate and
/// PyYAML), else `python3`.
pub fn python() -> PathBuf {
    let venv = std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join(".venv"));
    let py = venv.join("bin/python");
    if py.is_file() {
        py
    } else {
        PathBuf::from("python3")
    }
}

/// `spur local` on keyroom 7x7 (120-step episodes, 2048-step batches) with ONI rewards
/// labelled by the OpenAI-compatible judge at `judge_url` serving `model`: labels in
/// `dir/labels.redb`, output in `dir/local.log`, the run in `run_dir`; `extra` are more
/// `--set` values.
pub fn keyroom_with_judge(
    dir: &Path,
    run_dir: &Path,
    judge_url: &str,
    model: &str,
    extra: &[String],
) -> Child {
    let log = std::fs::File::create(dir.join("local.log")).unwrap();
    let sets = [
        "env.keyroom_size=7".to_string(),
        "env.max_episode_steps=120".into(),
        "learner.batch_steps=2048".into(),
        "reward_service.judge=openai".into(),
        format!("reward_service.openai_base_url={judge_url}"),
        format!("reward_service.openai_model={model}"),
        format!("reward_service.store={}", dir.join("labels.redb").display()),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spur"));
    cmd.current_dir(ROOT)
        .args(["local", "--config", "configs/keyroom-oni.toml", "--run-dir"])
        .arg(run_dir);
    for s in sets.iter().chain(extra) {
        cmd.args(["--set", s]);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}
