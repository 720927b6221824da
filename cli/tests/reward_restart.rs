//! `spur reward-service` as a real process against a stub OpenAI-compatible judge (real
//! HTTP, the chat-completions wire format, calls counted per text): killed with
//! SIGKILL in the middle of labelling and restarted on the same store, it keeps every
//! label it committed, never asks the judge about those texts again, and labels the
//! rest; and a judge that answers garbage before it answers properly ends with every
//! text labelled, garbage never a positive label.

mod support;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{RewardModelRequest, RewardServiceStatus, RewardStatusRequest, TextBatch};
use spur_reward_service::store::{LabelRecord, LabelStore};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use support::{read_log, start_stub, temp_dir};

/// A running `spur reward-service` child.
struct Service {
    child: Child,
    client: RewardServiceClient<Channel>,
    log: PathBuf,
}

impl Service {
    /// Starts the service on `dir/labels.redb` with the stub judge at `judge`, and
    /// waits until it reports its address and its health says SERVING.
    async fn start(dir: &Path, judge: &str, extra: &[&str]) -> Self {
        let addr_file = dir.join(spur_reward_service::ADDR_FILE);
        let _ = std::fs::remove_file(&addr_file);
        let log = dir.join(format!("service-{}.log", std::process::id()));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spur"));
        cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .arg("reward-service")
            .arg("--run-dir")
            .arg(dir);
        let store = format!("reward_service.store={}", dir.join("labels.redb").display());
        let url = format!("reward_service.openai_base_url={judge}");
        let sets = [
            "reward_service.listen=127.0.0.1:0",
            "reward_service.judge=openai",
            "reward_service.openai_model=stub-model",
            "reward_service.batch_size=2",
            "reward_service.max_concurrent=1",
            "run.drain_timeout_ms=5000",
            &store,
            &url,
        ];
        for s in sets.iter().chain(extra) {
            cmd.args(["--set", s]);
        }
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the service exited ({status}): {}", read_log(&log));
            }
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                break format!("http://{}", a.trim());
            }
            assert!(Instant::now() < deadline, "no address file");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let channel = Channel::from_shared(addr).unwrap().connect().await.unwrap();
        let mut health = HealthClient::new(channel.clone());
        loop {
            let req = HealthCheckRequest {
                service: "spur.v1.RewardService".into(),
            };
            let status = health.check(req).await.unwrap().into_inner().status;
            if status == ServingStatus::Serving as i32 {
                break;
            }
            assert!(Instant::now() < deadline, "never SERVING");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            child,
            client: RewardServiceClient::new(channel),
            log,
        }
    }

    async fn submit(&mut self, texts: &[String]) {
        let batch = TextBatch {
            actor_id: "actor-0".into(),
            texts: texts.to_vec(),
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

    /// Polls the status until `pred` holds (30 s at most); `each` sees every status.
    async fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&RewardServiceStatus) -> bool,
        mut each: impl FnMut(&RewardServiceStatus),
    ) -> RewardServiceStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status().await;
            each(&s);
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}\n{}",
                read_log(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The reward model's whole table, as a subscriber gets it first.
    async fn table(&mut self) -> HashMap<String, f32> {
        let mut updates = self
            .client
            .subscribe_reward_model(RewardModelRequest {
                subscriber: "test".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let full = updates.message().await.unwrap().unwrap();
        assert!(full.full);
        full.labels.into_iter().map(|l| (l.text, l.value)).collect()
    }

    fn kill_9(mut self) {
        support::kill_9(self.child.id());
        let status = self.child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    /// SIGTERM, as Kubernetes stops a pod: a clean exit within the drain timeout.
    fn terminate(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?}: {}", read_log(&self.log));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "drained in time"
        );
    }
}

fn stored(dir: &Path, prompt_version: &str) -> HashMap<String, LabelRecord> {
    let store = LabelStore::open(&dir.join("labels.redb")).unwrap();
    store.all(prompt_version).unwrap().into_iter().collect()
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

fn value(text: &str) -> f32 {
    if text.contains("key") {
        1.0
    } else {
        0.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_survive_kill_9_and_are_never_judged_again() {
    let (url, stub) = start_stub(Duration::from_millis(100), 0).await;
    let dir = temp_dir("reward-kill9");
    let all = texts(30);
    let mut svc = Service::start(&dir, &url, &[]).await;
    let pv = svc.status().await.prompt_version;
    svc.submit(&all).await;
    svc.wait_for("some labels", |s| s.labels >= 4, |_| {}).await;
    // What a subscriber (the learner) has seen: every label in it was committed.
    let seen = svc.table().await;
    assert!(seen.len() >= 4 && seen.len() < all.len(), "{}", seen.len());
    svc.kill_9();

    let before = stored(&dir, &pv);
    for (text, v) in &seen {
        let rec = before.get(text).unwrap_or_else(|| panic!("{text:?} lost"));
        assert_eq!(rec.value(), *v, "{text}");
    }
    assert!(before.len() < all.len(), "the kill came before the end");
    let calls_before = stub.calls();

    let mut svc = Service::start(&dir, &url, &[]).await;
    let table = svc.table().await;
    assert_eq!(table.len(), before.len(), "the restart loaded every label");
    // Actors send their texts again after a reconnect.
    svc.submit(&all).await;
    let s = svc
        .wait_for("every label", |s| s.labels == all.len() as u64, |_| {})
        .await;
    assert_eq!(s.store_hits, before.len() as u64);
    assert_eq!(s.positive_labels, 10);
    let calls = stub.calls();
    for text in before.keys() {
        assert_eq!(
            calls.get(text),
            calls_before.get(text),
            "{text:?} was labelled before the kill, and judged again"
        );
    }
    svc.terminate();

    let after = stored(&dir, &pv);
    assert_eq!(after.len(), all.len());
    for (text, rec) in &before {
        assert_eq!(&after[text], rec, "a committed label changed");
    }
    for text in &all {
        assert_eq!(after[text].value(), value(text), "{text}");
        assert!(calls[text] >= 1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_answers_are_retried_until_the_judge_answers() {
    // Three garbage answers in a row, then proper ones.
    let (url, stub) = start_stub(Duration::from_millis(10), 3).await;
    let dir = temp_dir("reward-garbage");
    let extra = [
        "reward_service.batch_size=4",
        "reward_service.unparseable_budget=1",
        "reward_service.unparseable_retries=5",
        "reward_service.unparseable_retry_ms=100",
    ];
    let mut svc = Service::start(&dir, &url, &extra).await;
    let pv = svc.status().await.prompt_version;
    let all = texts(4);
    svc.submit(&all).await;
    let mut most_waiting = 0;
    let s = svc
        .wait_for(
            "every label",
            |s| s.labels == 4,
            |s| {
                assert!(s.positive_labels <= 2, "garbage became positive: {s:?}");
                if s.retry_waiting > 0 {
                    assert_eq!(s.labels, 0, "garbage is no label: {s:?}");
                }
                most_waiting = most_waiting.max(s.retry_waiting);
            },
        )
        .await;
    assert_eq!(most_waiting, 4, "the texts waited for a later round");
    assert_eq!(s.retry_waiting, 0);
    assert_eq!(s.positive_labels, 2);
    assert_eq!(s.unparseable_answers, 3);
    assert_eq!(stub.requests.load(Ordering::SeqCst), 4);
    svc.terminate();

    let labels = stored(&dir, &pv);
    assert_eq!(labels.len(), 4);
    for text in &all {
        let rec = &labels[text];
        assert_eq!(rec.verdict, Some(value(text) == 1.0), "{text}");
        assert_eq!(rec.attempts, 4, "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
