//! `spur local` with a real language model as its judge. The test makes the model
//! (`judges/llm/tiny_judge.py train`: a BPE tokenizer and a two-layer Llama-style
//! network fitted in seconds to the service's keyroom prompts), serves it with
//! `transformers serve` (a real OpenAI-compatible server, offline), and trains keyroom
//! with ONI retrieval rewards from its labels to the success target. The labels must
//! be the model's: each stored record names it, the server logged the requests, and
//! the model calls "the door is locked" helpful, which the rule judge does not.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spur_reward_service::judge::RulesJudge;
use spur_reward_service::parse::parse_labels;
use spur_reward_service::store::LabelStore;
use support::{keyroom_with_judge, python, read_log, temp_dir, ROOT};

/// The one text on which the model and the rule judge disagree, by design.
const DISAGREED: &str = "the door is locked";
/// Training the model and starting its server, on a loaded 2-core machine.
const SERVER_START: Duration = Duration::from_secs(600);
/// Keyroom 7x7 to the success target.
const TRAINING: Duration = Duration::from_secs(1200);

/// The `tiny_judge.py serve` process; SIGTERM on drop stops it and its server.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid this test started and a valid signal number.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Trains the model into `dir/model`, serves it, and returns the server with its base
/// URL and model name once it answers.
fn start_server(dir: &Path) -> (Server, String, String) {
    let script = Path::new(ROOT).join("judges/llm/tiny_judge.py");
    let model = dir.join("model");
    let log = dir.join("train.log");
    let status = Command::new(python())
        .arg(&script)
        .args(["train", "--out"])
        .arg(&model)
        .stdout(std::fs::File::create(dir.join("train.json")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .expect("python runs");
    assert!(
        status.success(),
        "training the tiny judge failed (`make llm-tools` installs its packages):\n{}",
        read_log(&log)
    );
    eprintln!(
        "tiny judge: {}",
        std::fs::read_to_string(dir.join("train.json")).unwrap_or_default()
    );

    let url_file = dir.join("judge.json");
    // The server's access lines go to stdout, its own messages to stderr.
    let server_log = dir.join("server.log");
    let log = std::fs::File::create(&server_log).unwrap();
    let mut server = Server(
        Command::new(python())
            .arg(&script)
            .args(["serve", "--model"])
            .arg(&model)
            .arg("--url-file")
            .arg(&url_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("python runs"),
    );
    let deadline = Instant::now() + SERVER_START;
    let found = loop {
        if let Ok(text) = std::fs::read_to_string(&url_file) {
            break serde_json::from_str::<serde_json::Value>(&text).expect("judge.json is JSON");
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!(
                "the server exited ({status}) before serving:\n{}",
                read_log(&server_log)
            );
        }
        assert!(
            Instant::now() < deadline,
            "the server never served:\n{}",
            read_log(&server_log)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let url = found["base_url"].as_str().expect("base_url").to_string();
    let name = found["model"].as_str().expect("model").to_string();
    (server, url, name)
}

/// `spur local` on keyroom 7x7 with ONI retrieval rewards from the server's labels,
/// until the mean return (the success rate: keyroom pays 1 at the goal only) of the
/// last 100 episodes reaches 0.8.
fn train_keyroom(dir: &Path, url: &str, model: &str) -> Child {
    let extra = [
        "stop.env_steps=3000000".to_string(),
        "stop.target_return=0.8".into(),
    ];
    keyroom_with_judge(dir, &dir.join("run"), url, model, &extra)
}

/// The verdict the rule judge gives `text`.
fn rule_verdict(rules: &RulesJudge, text: &str) -> bool {
    parse_labels(&rules.answer(&[text.to_string()]), 1).expect("the rule judge answers")[0]
}

#[test]
fn keyroom_learns_from_a_served_language_model() {
    let dir = temp_dir("llm-judge");
    let (server, url, model) = start_server(&dir);

    let mut run = train_keyroom(&dir, &url, &model);
    let deadline = Instant::now() + TRAINING;
    let status = loop {
        if let Some(status) = run.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            panic!(
                "keyroom did not reach its target in time\n{}",
                read_log(&dir.join("local.log"))
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let local_log = read_log(&dir.join("local.log"));
    assert!(
        status.success(),
        "spur local failed ({status}):\n{local_log}"
    );

    // The run learned: its last metrics row has the target success rate.
    let metrics = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().last().expect("metrics rows")).unwrap();
    let success = last["success_rate"].as_f64().unwrap();
    assert!(success >= 0.8, "success {success}:\n{local_log}");

    // The judge was the model behind the server, and every answer parsed.
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run/reward_service.json")).unwrap(),
    )
    .unwrap();
    let judge_id = format!("openai:{model}");
    assert_eq!(summary["judge"], judge_id.as_str());
    let calls = summary["llm_calls"].as_u64().unwrap();
    let failures = summary["llm_failures"].as_u64().unwrap();
    assert!(calls >= 1, "{summary:#}");
    assert_eq!(summary["unparseable_answers"], 0, "{summary:#}");

    // The server answered at least every judge call that got an answer.
    drop(server);
    let server_log = std::fs::read_to_string(dir.join("server.log")).unwrap();
    let answered = server_log
        .lines()
        .filter(|l| l.contains("\"POST /v1/chat/completions HTTP/1.1\" 200"))
        .count() as u64;
    assert!(
        answered >= calls - failures && answered >= 1,
        "the server answered {answered} requests, the service made {calls} calls ({failures} failed)"
    );

    // Every stored label is the model's, and it is the model's own verdict: the rule
    // judge's on every text but the one the model was taught to see differently.
    let store = LabelStore::open(&dir.join("labels.redb")).unwrap();
    let version = summary["prompt_version"].as_str().unwrap();
    let labels = store.all(version).unwrap();
    assert_eq!(labels.len() as u64, summary["labels"].as_u64().unwrap());
    let rules = RulesJudge::load(&Path::new(ROOT).join("judges/keyroom.rules")).unwrap();
    let mut disagreed = false;
    for (text, record) in &labels {
        assert_eq!(record.judge, judge_id, "{text:?}");
        let verdict = record.verdict.expect("a parsed verdict");
        if text == DISAGREED {
            assert!(verdict, "the model's verdict on {text:?}: {record:?}");
            assert!(!rule_verdict(&rules, text), "the rule judge's verdict");
            disagreed = true;
        } else {
            assert_eq!(verdict, rule_verdict(&rules, text), "{text:?}: {record:?}");
        }
    }
    assert!(disagreed, "{DISAGREED:?} was never labelled: {labels:?}");

    eprintln!(
        "tiny LLM judge: success {:.2} after {} env steps; {} labels ({} helpful) in {} calls, \
         {:.2} calls per labelled text, latency p50 {:.0} ms, p99 {:.0} ms; server answered {}",
        success,
        last["env_steps"],
        summary["labels"],
        summary["positive_labels"],
        calls,
        summary["calls_per_labelled_text"].as_f64().unwrap(),
        summary["llm_latency_p50_ms"].as_f64().unwrap(),
        summary["llm_latency_p99_ms"].as_f64().unwrap(),
        answered
    );
    let _ = std::fs::remove_dir_all(&dir);
}
