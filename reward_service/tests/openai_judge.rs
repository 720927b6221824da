//! The reward service against a stub OpenAI-compatible server that speaks the real
//! chat-completions wire format over HTTP, with scripted answers, delays and errors.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use spur_core::config::{Config, JudgeKind, RewardModelKind};
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{RewardModelRequest, RewardServiceStatus, RewardStatusRequest, TextBatch};
use spur_reward_service::store::LabelStore;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// What the stub does with one request.
#[derive(Clone)]
enum Act {
    /// Answer correctly: "helpful" for texts mentioning a key.
    Answer,
    Status(u16),
    Delay(Duration),
    Say(&'static str),
}

#[derive(Default)]
struct Stub {
    calls: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    batch_sizes: Mutex<Vec<usize>>,
    script: Mutex<VecDeque<Act>>,
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

/// The numbered pairs of a rendered ranking prompt ("1. first: a" / "second: b").
fn pairs(prompt: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = prompt.lines().collect();
    lines
        .windows(2)
        .filter_map(|w| {
            let (n, first) = w[0].split_once(". first: ")?;
            n.parse::<usize>().ok()?;
            let second = w[1].trim().strip_prefix("second: ")?;
            Some((first.to_string(), second.to_string()))
        })
        .collect()
}

/// The correct ranking: a text mentioning a key beats one that does not.
fn rank(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .enumerate()
        .map(|(i, (a, b))| {
            let verdict = match (a.contains("key"), b.contains("key")) {
                (true, false) => "first",
                (false, true) => "second",
                _ => "tie",
            };
            format!("{}: {verdict}\n", i + 1)
        })
        .collect()
}

async fn completions(
    State(stub): State<Arc<Stub>>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    stub.calls.fetch_add(1, Ordering::SeqCst);
    let now = stub.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    stub.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let prompt = body["messages"][0]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let texts = events(&prompt);
    let pairs = pairs(&prompt);
    stub.batch_sizes.lock().unwrap().push(texts.len());
    let answer = |texts: &[String]| {
        if pairs.is_empty() {
            answer(texts)
        } else {
            rank(&pairs)
        }
    };
    let act = stub
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Act::Answer);
    // Long enough for concurrent requests to overlap.
    tokio::time::sleep(Duration::from_millis(40)).await;
    let content = match act {
        Act::Status(code) => {
            stub.in_flight.fetch_sub(1, Ordering::SeqCst);
            let code = StatusCode::from_u16(code).unwrap();
            return (code, "<html><body>upstream error</body></html>").into_response();
        }
        Act::Delay(d) => {
            tokio::time::sleep(d).await;
            answer(&texts)
        }
        Act::Say(s) => s.to_string(),
        Act::Answer => answer(&texts),
    };
    stub.in_flight.fetch_sub(1, Ordering::SeqCst);
    Json(serde_json::json!({
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": body["model"],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop"
        }]
    }))
    .into_response()
}

fn answer(texts: &[String]) -> String {
    spur_reward_service::parse::format_labels(
        &texts.iter().map(|t| t.contains("key")).collect::<Vec<_>>(),
    )
}

async fn start_stub(script: Vec<Act>) -> (String, Arc<Stub>) {
    let stub = Arc::new(Stub::default());
    *stub.script.lock().unwrap() = script.into();
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(stub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), stub)
}

struct Service {
    client: RewardServiceClient<Channel>,
    service: spur_reward_service::InProcess,
}

impl Service {
    async fn start(config: &Config) -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let service = spur_reward_service::InProcess::start(config.clone(), root)
            .await
            .unwrap();
        let addr = service.addr.clone();
        let channel = Channel::from_shared(addr).unwrap().connect().await.unwrap();
        // Ready once health says so: the label store is loaded by then.
        let mut health = HealthClient::new(channel.clone());
        let req = HealthCheckRequest {
            service: "spur.v1.RewardService".into(),
        };
        let mut serving = false;
        for _ in 0..500 {
            let status = health.check(req.clone()).await.unwrap().into_inner().status;
            if status == ServingStatus::Serving as i32 {
                serving = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(serving, "the reward service never became ready");
        Self {
            client: RewardServiceClient::new(channel),
            service,
        }
    }

    async fn submit(&mut self, texts: &[&str]) {
        let batch = TextBatch {
            actor_id: "test".into(),
            texts: texts.iter().map(|t| t.to_string()).collect(),
        };
        self.client
            .submit_texts(tokio_stream::iter(vec![batch]))
            .await
            .unwrap();
    }

    async fn status(&mut self) -> RewardServiceStatus {
        self.client
            .get_status(RewardStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    async fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&RewardServiceStatus) -> bool,
    ) -> RewardServiceStatus {
        for _ in 0..500 {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}: {:?}", self.status().await);
    }

    async fn stop(self) {
        self.service.stop().await.unwrap();
    }
}

fn config(base_url: &str, store: &std::path::Path) -> Config {
    let mut c = Config::from_toml_str("").unwrap();
    let r = &mut c.reward_service;
    r.judge = JudgeKind::Openai;
    r.openai_base_url = base_url.to_string();
    r.openai_model = "stub-model".into();
    r.store = store.display().to_string();
    r.batch_size = 4;
    r.max_concurrent = 2;
    r.timeout_ms = 300;
    r.retries = 3;
    r.unparseable_budget = 2;
    c
}

fn temp_store(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spur-judge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.join("labels.redb")
}

fn texts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 3 == 0 {
                format!("you pick up key number {i}")
            } else {
                format!("you bump into wall number {i}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_concurrency_and_labels_are_right() {
    let (url, stub) = start_stub(vec![]).await;
    let store = temp_store("batches");
    let mut svc = Service::start(&config(&url, &store)).await;
    let all = texts(22);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    svc.submit(&refs).await;
    // Submitting the same texts again while they are queued or labelled adds nothing.
    svc.submit(&refs).await;
    let s = svc.wait_for("22 labels", |s| s.labels == 22).await;
    assert!(stub
        .batch_sizes
        .lock()
        .unwrap()
        .iter()
        .all(|&n| (1..=4).contains(&n)));
    assert!(
        stub.max_in_flight.load(Ordering::SeqCst) <= 2,
        "concurrency cap exceeded"
    );
    assert_eq!(s.calls_per_labelled_text, 1.0);
    assert_eq!(s.positive_labels, 8);
    assert_eq!(s.llm_calls as usize, stub.calls.load(Ordering::SeqCst));

    // The learner's view: the whole table, with the right values.
    let mut updates = svc
        .client
        .subscribe_reward_model(RewardModelRequest {
            subscriber: "t".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let full = updates.message().await.unwrap().unwrap();
    assert!(full.full);
    assert_eq!(full.labels.len(), 22);
    for l in &full.labels {
        assert_eq!(
            l.value,
            if l.text.contains("key") { 1.0 } else { 0.0 },
            "{}",
            l.text
        );
    }
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_timeouts_are_retried() {
    let script = vec![
        Act::Status(500),
        Act::Status(503),
        Act::Delay(Duration::from_secs(2)), // past the 300 ms timeout
        Act::Status(429),
    ];
    let (url, stub) = start_stub(script).await;
    let store = temp_store("retries");
    let mut cfg = config(&url, &store);
    cfg.reward_service.max_concurrent = 1;
    cfg.reward_service.retries = 4;
    let mut svc = Service::start(&cfg).await;
    svc.submit(&["you pick up the key", "you bump into a wall"])
        .await;
    let s = svc.wait_for("2 labels", |s| s.labels == 2).await;
    assert_eq!(
        stub.calls.load(Ordering::SeqCst),
        5,
        "4 failures, then an answer"
    );
    assert_eq!(s.llm_failures, 0, "the retries absorbed every failure");
    assert_eq!(s.positive_labels, 1);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_answers_never_become_positive_labels() {
    let script = vec![
        Act::Say("Thought process: the key is important.\n1: helpful"),
        Act::Say(":"),
        Act::Say(""),
        Act::Say("1: helpful, since keys open doors"),
        Act::Say("<!DOCTYPE html><html><body>Bad Gateway</body></html>"),
        Act::Say("1: helpful\n2: not"),
    ];
    let (url, stub) = start_stub(script).await;
    let store = temp_store("malformed");
    let mut cfg = config(&url, &store);
    cfg.reward_service.batch_size = 1;
    cfg.reward_service.max_concurrent = 1;
    cfg.reward_service.unparseable_budget = 2;
    // No later round: the first round's end is final.
    cfg.reward_service.unparseable_retries = 0;
    let mut svc = Service::start(&cfg).await;
    svc.submit(&[
        "you pick up the key",
        "you pick up a key again",
        "a key glints",
    ])
    .await;
    let s = svc.wait_for("3 labels", |s| s.labels == 3).await;
    assert_eq!(
        stub.calls.load(Ordering::SeqCst),
        6,
        "each text got its 2 tries"
    );
    assert_eq!(s.unparseable_answers, 6);
    assert_eq!(
        s.positive_labels, 0,
        "no malformed answer may become a positive label"
    );
    svc.stop().await;
    // The store says why: unparseable, with the raw answer kept.
    let st = LabelStore::open(&store).unwrap();
    let pv = s.prompt_version;
    let rec = st.get(&pv, "a key glints").unwrap().unwrap();
    assert_eq!(rec.verdict, None);
    assert_eq!(rec.attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_survive_a_restart_with_zero_repeated_calls() {
    let (url, stub) = start_stub(vec![]).await;
    let store = temp_store("restart");
    let cfg = config(&url, &store);
    let all = texts(10);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut svc = Service::start(&cfg).await;
    svc.submit(&refs).await;
    svc.wait_for("10 labels", |s| s.labels == 10).await;
    svc.stop().await;
    let calls = stub.calls.load(Ordering::SeqCst);

    let mut svc = Service::start(&cfg).await;
    let s = svc.status().await;
    assert_eq!(s.labels, 10, "labels loaded from the store");
    svc.submit(&refs).await;
    let s = svc.wait_for("store hits", |s| s.store_hits == 10).await;
    assert_eq!(s.backlog, 0);
    assert_eq!(
        stub.calls.load(Ordering::SeqCst),
        calls,
        "no call for a stored label"
    );
    assert_eq!(s.llm_calls, 0);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranked_pairs_are_stored_and_survive_a_restart() {
    let (url, stub) = start_stub(vec![]).await;
    let store = temp_store("ranking");
    let mut cfg = config(&url, &store);
    cfg.intrinsic.model = RewardModelKind::Ranking;
    cfg.reward_service.pairs_per_text = 2;
    let all = texts(9);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut svc = Service::start(&cfg).await;
    svc.submit(&refs).await;
    let s = svc.wait_for("9 ranked texts", |s| s.labels == 9).await;
    assert_eq!(s.model_kind, "ranking");
    assert!(s.ranked_pairs >= 9, "each new text is in pairs: {s:?}");
    assert_eq!(s.unparseable_answers, 0);
    assert_eq!(s.calls_per_labelled_text, 1.0);
    svc.stop().await;
    let calls = stub.calls.load(Ordering::SeqCst);

    // Every stored preference is the judge's: key texts beat the others.
    let st = LabelStore::open(&store).unwrap();
    let stored = st.all_pairs(&s.prompt_version).unwrap();
    assert_eq!(stored.len() as u64, s.ranked_pairs);
    for ((a, b), rec) in &stored {
        let want = match (a.contains("key"), b.contains("key")) {
            (true, false) => 1.0,
            (false, true) => 0.0,
            _ => 0.5,
        };
        assert_eq!(rec.verdict, Some(want), "{a} vs {b}");
        assert!(rec.judge.contains("stub-model"));
    }
    drop(st);

    let mut svc = Service::start(&cfg).await;
    assert_eq!(
        svc.status().await.labels,
        9,
        "ranked texts loaded from the store"
    );
    svc.submit(&refs).await;
    svc.wait_for("store hits", |s| s.store_hits == 9).await;
    assert_eq!(
        stub.calls.load(Ordering::SeqCst),
        calls,
        "no call for a ranked text"
    );
    svc.stop().await;
}

/// Polls `pred` every 5 ms for up to 10 s.
async fn eventually(what: &str, pred: impl Fn() -> bool) {
    for _ in 0..2000 {
        if pred() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_answers_in_flight_and_ends_open_streams() {
    let (url, stub) = start_stub(vec![Act::Delay(Duration::from_millis(600))]).await;
    let store = temp_store("drain");
    let mut cfg = config(&url, &store);
    cfg.run.drain_timeout_ms = 10_000;
    let mut svc = Service::start(&cfg).await;
    let pv = svc.status().await.prompt_version;
    // An actor's submit stream and the learner's subscription stay open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut client = svc.client.clone();
    let submit = tokio::spawn(async move {
        client
            .submit_texts(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let batch = TextBatch {
        actor_id: "a".into(),
        texts: vec!["you pick up the key".into(), "you bump into a wall".into()],
    };
    tx.send(batch).await.unwrap();
    let mut updates = svc
        .client
        .subscribe_reward_model(RewardModelRequest {
            subscriber: "learner".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updates.message().await.unwrap().unwrap().full);
    eventually("a judge request in flight", || {
        stub.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;

    let started = std::time::Instant::now();
    svc.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the streams end at once: nobody waits for the drain deadline ({:?})",
        started.elapsed()
    );
    // The answer that was in flight was committed before the service stopped.
    let st = LabelStore::open(&store).unwrap();
    let labels = st.all(&pv).unwrap();
    assert_eq!(labels.len(), 2, "{labels:?}");
    assert_eq!(
        st.get(&pv, "you pick up the key").unwrap().unwrap().verdict,
        Some(true)
    );
    // The open streams ended and said why.
    let ended = submit.await.unwrap().unwrap_err();
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    match updates.message().await {
        Ok(None) => {}
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(Some(u)) => panic!("no update after shutdown: {u:?}"),
    }
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_judge_request_is_abandoned_at_the_drain_deadline() {
    let (url, stub) = start_stub(vec![Act::Delay(Duration::from_secs(60))]).await;
    let store = temp_store("stuck");
    let mut cfg = config(&url, &store);
    cfg.reward_service.timeout_ms = 120_000;
    cfg.run.drain_timeout_ms = 300;
    let mut svc = Service::start(&cfg).await;
    let pv = svc.status().await.prompt_version;
    svc.submit(&["you pick up the key"]).await;
    eventually("a judge request in flight", || {
        stub.in_flight.load(Ordering::SeqCst) == 1
    })
    .await;
    let started = std::time::Instant::now();
    svc.stop().await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "stopped at the drain deadline: {took:?}"
    );
    // The abandoned request let go of the store: it opens at once, with no label.
    let st = LabelStore::open(&store).unwrap();
    assert!(st.all(&pv).unwrap().is_empty());
}
