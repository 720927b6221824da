//! Faults on a running `spur local` (keyroom, ONI retrieval rewards, the stub OpenAI
//! judge; every role a real process): `kill -9` of an actor, of the reward service,
//! and of the learner at a moment when its newest checkpoint is older than the weights
//! its actors hold. After each fault the supervisor restarts the role, the policy
//! version and the trained env steps advance again, no committed label is lost and no
//! labelled text is sent to the judge again; after the last one the run reaches its
//! success target and stops cleanly.

mod support;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::reward_service_client::RewardServiceClient;
use spur_proto::v1::{LearnerStatus, RewardServiceStatus, RewardStatusRequest, StatusRequest};
use support::{keyroom_with_judge, kill_9, read_log, start_stub, temp_dir};

/// How long the system gets to recover from one fault.
const RECOVERY: Duration = Duration::from_secs(60);
const CHECKPOINT_EVERY: u64 = 20;

/// The `spur local` run under test, seen through its run directory.
struct Run {
    dir: PathBuf,
    child: Child,
}

impl Run {
    fn pid(&self, role: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("pids").join(format!("{role}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The niceness of `role`'s process now (field 19 of `/proc/PID/stat`).
    fn niceness(&self, role: &str) -> i32 {
        let pid = self
            .pid(role)
            .unwrap_or_else(|| panic!("no pid for {role}"));
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("a live process");
        // Fields after the command name, which ends at the last ')': state is 3.
        let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
        rest.split(' ')
            .nth(16)
            .and_then(|f| f.parse().ok())
            .expect("a niceness field")
    }

    fn addr(&self, file: &str) -> Option<String> {
        let a = std::fs::read_to_string(self.dir.join(file)).ok()?;
        Some(format!("http://{}", a.trim()))
    }

    async fn learner(&self) -> Option<LearnerStatus> {
        let addr = self.addr(spur_learner::ADDR_FILE)?;
        let mut c = LearnerClient::connect(addr).await.ok()?;
        Some(c.get_status(StatusRequest {}).await.ok()?.into_inner())
    }

    async fn judge(&self) -> Option<RewardServiceStatus> {
        let addr = self.addr(spur_reward_service::ADDR_FILE)?;
        let mut c = RewardServiceClient::connect(addr).await.ok()?;
        Some(
            c.get_status(RewardStatusRequest {})
                .await
                .ok()?
                .into_inner(),
        )
    }

    fn logs(&self) -> String {
        ["learner", "reward-service", "actor-0", "actor-1"]
            .iter()
            .map(|r| {
                let log = read_log(&self.dir.join("logs").join(format!("{r}.log")));
                format!("--- {r}\n{log}\n")
            })
            .collect()
    }

    /// Polls the learner's status until `pred` holds.
    async fn wait_learner(
        &mut self,
        what: &str,
        pred: impl Fn(&LearnerStatus) -> bool,
    ) -> LearnerStatus {
        let deadline = Instant::now() + RECOVERY;
        let mut last = None;
        loop {
            if let Some(s) = self.learner().await {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "spur local exited ({status}) waiting for {what}\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {last:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_judge(
        &mut self,
        what: &str,
        pred: impl Fn(&RewardServiceStatus) -> bool,
    ) -> RewardServiceStatus {
        let deadline = Instant::now() + RECOVERY;
        loop {
            if let Some(s) = self.judge().await {
                if pred(&s) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9 of a role, then its replacement's pid.
    async fn kill_and_wait_replacement(&mut self, role: &str) -> u32 {
        let old = self
            .pid(role)
            .unwrap_or_else(|| panic!("no pid for {role}"));
        kill_9(old);
        let deadline = Instant::now() + RECOVERY;
        loop {
            if let Some(new) = self.pid(role).filter(|&p| p != old) {
                return new;
            }
            assert!(
                Instant::now() < deadline,
                "{role} was not restarted\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn spur_local(dir: &Path, judge_url: &str) -> Child {
    let extra = [
        "stop.env_steps=100000000".to_string(),
        "run.max_restarts=2".into(),
        "run.drain_timeout_ms=10000".into(),
        "actor.max_backoff_ms=500".into(),
        format!("learner.checkpoint_every={CHECKPOINT_EVERY}"),
    ];
    keyroom_with_judge(dir, dir, judge_url, "stub-model", &extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_survives_kill_9_and_the_run_reaches_its_target() {
    let (judge_url, stub) = start_stub(Duration::from_millis(5), 0).await;
    let dir = temp_dir("faults");
    let child = spur_local(&dir, &judge_url);
    let mut run = Run {
        dir: dir.clone(),
        child,
    };
    let start = run
        .wait_learner("the first updates", |s| s.policy_version >= 5)
        .await;

    // Actors run `run.actor_nice` (by default 19, the lowest priority) steps nicer
    // than the learner. (Niceness stops at 19, for a test that itself runs nice.)
    let default_nice = spur_core::config::RunConfig::default().actor_nice as i32;
    assert!(default_nice > 0, "actors at a lower priority by default");
    let actor_nice = (run.niceness("learner") + default_nice).min(19);
    assert_eq!(run.niceness("actor-0"), actor_nice);

    // 1. An actor.
    let t = Instant::now();
    run.kill_and_wait_replacement("actor-0").await;
    assert_eq!(run.niceness("actor-0"), actor_nice, "the replacement too");
    let after_actor = run
        .wait_learner("training after an actor was killed", |s| {
            s.policy_version >= start.policy_version + 5 && s.env_steps > start.env_steps
        })
        .await;

    eprintln!(
        "actor killed: training went on {:.1} s later",
        t.elapsed().as_secs_f64()
    );

    // 2. The reward service, once every text it has seen is labelled (so nothing is
    // in flight: texts judged so far are exactly the labelled ones).
    let judged = run
        .wait_judge("the labels of every text seen", |j| {
            j.labels > 0 && j.backlog == 0 && j.labels == j.unique_texts
        })
        .await;
    let labelled_before = stub.calls();
    assert_eq!(labelled_before.len() as u64, judged.labels);
    assert!(
        labelled_before.values().all(|&n| n == 1),
        "{labelled_before:?}"
    );
    let t = Instant::now();
    run.kill_and_wait_replacement("reward-service").await;
    let after_judge = run
        .wait_learner("training after the reward service was killed", |s| {
            s.policy_version >= after_actor.policy_version + 5
                && s.env_steps > after_actor.env_steps
        })
        .await;
    let rejudged = run
        .wait_judge("the restarted service to serve its labels", |j| {
            j.labels >= judged.labels
        })
        .await;
    assert!(
        rejudged.labels >= judged.labels,
        "labels lost: {rejudged:?}"
    );
    eprintln!(
        "reward service killed: back with every label {:.1} s later",
        t.elapsed().as_secs_f64()
    );

    // 3. The learner, when its newest checkpoint is older than the actors' weights.
    let before = run
        .wait_learner("a checkpoint older than the weights", |s| {
            let since = s.policy_version % CHECKPOINT_EVERY;
            s.policy_version > after_judge.policy_version
                && (4..CHECKPOINT_EVERY - 4).contains(&since)
        })
        .await;
    let t = Instant::now();
    run.kill_and_wait_replacement("learner").await;
    let resumed = run
        .wait_learner("the resumed learner", |s| {
            s.learner_incarnation != before.learner_incarnation
        })
        .await;
    assert!(
        resumed.policy_version < before.policy_version,
        "resumed from an older checkpoint: {resumed:?} vs {before:?}"
    );
    assert!(resumed.updates >= before.updates.saturating_sub(CHECKPOINT_EVERY));
    let moved_on = run
        .wait_learner("the resumed learner to pass its old version", |s| {
            s.learner_incarnation == resumed.learner_incarnation
                && s.policy_version >= before.policy_version + 5
        })
        .await;
    assert!(moved_on.env_steps > resumed.env_steps, "{moved_on:?}");

    eprintln!(
        "learner killed at v{}, resumed at v{}, past v{} {:.1} s after the kill",
        before.policy_version,
        resumed.policy_version,
        moved_on.policy_version,
        t.elapsed().as_secs_f64()
    );

    // Learning goes on to the target, measured on episodes after the last fault (a
    // resumed learner's episode window starts empty).
    let done = run
        .wait_learner("80% success after the faults", |s| {
            s.learner_incarnation == resumed.learner_incarnation
                && s.episodes >= resumed.episodes + 100
                && s.success_rate >= 0.8
        })
        .await;
    assert!(done.env_steps_received >= done.env_steps);

    // No labelled text went to the judge again, through both restarts.
    let calls = stub.calls();
    for (text, n) in &labelled_before {
        assert_eq!(
            calls.get(text),
            Some(n),
            "{text:?} was labelled, then judged again"
        );
    }

    // Ctrl-C: everything stops in order, the learner with a final checkpoint.
    // SAFETY: kill(2) with a pid this test started and a valid signal number.
    unsafe { libc::kill(run.child.id() as libc::pid_t, libc::SIGINT) };
    let status = run.child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "{}",
        read_log(&dir.join("local.log"))
    );
    let last = spur_core::checkpoint::load_latest(&dir.join("checkpoints"))
        .unwrap()
        .unwrap();
    assert!(last.version >= done.policy_version);
    let _ = std::fs::remove_dir_all(&dir);
}
