//! A cluster rehearsal without a cluster: the `dev` overlay, rendered by `kubectl
//! kustomize`, run as local processes, one `spur` per pod (learner 1, reward service
//! 1, actors 2 with distinct pod names), each with the command line, environment and
//! mounted config its manifest gives it (`k8s/rehearse.py` resolves ConfigMaps,
//! Secrets and `$(VAR)`, writes mounted files under a temp dir and rewrites mount
//! paths). It trains keyroom with ONI rewards to a success target, then "deletes" the
//! learner pod the way a StatefulSet does (SIGTERM, exit within the grace period, a
//! fresh pod from the same manifest on the same volume) and checks that training
//! goes on under a new learner incarnation.
//!
//! Networking is emulated, not real: each pod gets a loopback address of its own
//! (127.0.0.2, 127.0.0.3, ...; Linux routes all of 127/8 to lo) and the Service DNS
//! names in the env and config the pods get are rewritten to the address of the pod
//! the Service selects (see k8s/rehearse.py). Not done: network namespaces per pod
//! (truer isolation), NetworkPolicies, DNS, kubelet probes, the image itself.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::{LearnerStatus, StatusRequest};
use support::{kill_9, on_path, python, read_log, temp_dir, ROOT};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long one phase (readiness, training to the target, recovery) may take.
const PHASE: Duration = Duration::from_secs(60);
/// What the test changes, as an overlay patch could (SPUR_* env on every container):
/// a small room so training reaches the target quickly, frequent checkpoints.
const OVERRIDES: &[&str] = &[
    "SPUR_ENV__KEYROOM_SIZE=5",
    "SPUR_ENV__MAX_EPISODE_STEPS=100",
    "SPUR_LEARNER__BATCH_STEPS=2048",
    "SPUR_LEARNER__CHECKPOINT_EVERY=5",
];
const SUCCESS_TARGET: f64 = 0.8;

/// One pod as k8s/rehearse.py describes it, and its process.
struct Pod {
    spec: Value,
    child: Option<Child>,
    starts: u32,
}

impl Pod {
    fn name(&self) -> &str {
        self.spec["pod"].as_str().expect("pods have names")
    }

    fn log_path(&self, dir: &Path) -> PathBuf {
        dir.join("logs")
            .join(format!("{}.{}.log", self.name(), self.starts))
    }

    /// Starts the pod's container command as a local process ("the kubelet").
    fn start(&mut self, dir: &Path) {
        self.starts += 1;
        let argv: Vec<&str> = self.spec["argv"]
            .as_array()
            .expect("argv is a list")
            .iter()
            .map(|a| a.as_str().expect("args are strings"))
            .collect();
        let log = std::fs::File::create(self.log_path(dir)).expect("log file");
        // The container's env only (a pod inherits nothing from the node), plus PATH.
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spur"));
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir)
            .current_dir(self.spec["cwd"].as_str().expect("cwd"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (k, v) in self.spec["env"].as_object().expect("env is a map") {
            cmd.env(k, v.as_str().expect("env values are strings"));
        }
        self.child = Some(cmd.spawn().expect("spur starts"));
    }

    /// SIGTERM, then the exit status, which must come within the grace period.
    fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut child = self.child.take().expect("the pod runs");
        let grace = Duration::from_secs(self.spec["grace_s"].as_u64().expect("grace"));
        // SAFETY: kill(2) with a pid this test started and a valid signal number.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let t = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait works") {
                return (status, t.elapsed());
            }
            if t.elapsed() > grace {
                kill_9(child.id());
                let _ = child.wait();
                panic!(
                    "{} did not exit within its grace period {grace:?}",
                    self.name()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every pod of the rehearsal; kills what is left on drop (a failed assertion).
struct Cluster {
    dir: PathBuf,
    pods: Vec<Pod>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.pods {
            if let Some(mut c) = p.child.take() {
                kill_9(c.id());
                let _ = c.wait();
            }
        }
    }
}

impl Cluster {
    fn pod(&mut self, workload: &str) -> &mut Pod {
        self.pods
            .iter_mut()
            .find(|p| p.spec["workload"] == workload)
            .expect("the workload has a pod")
    }

    fn logs(&self) -> String {
        self.pods
            .iter()
            .map(|p| {
                let log = read_log(&p.log_path(&self.dir));
                format!("--- {} (start {})\n{log}\n", p.name(), p.starts)
            })
            .collect()
    }

    /// Fails the test with every pod's log if a pod's process has exited.
    fn assert_running(&mut self) {
        let mut dead = vec![];
        for p in &mut self.pods {
            if let Some(c) = p.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    dead.push(format!("{} exited: {status}", p.name()));
                }
            }
        }
        assert!(dead.is_empty(), "{dead:?}\n{}", self.logs());
    }

    /// Polls the gRPC health service a pod's readinessProbe asks until it serves.
    async fn wait_ready(&mut self, workload: &str) {
        let health = self.pod(workload).spec["health"].clone();
        let addr = health["addr"].as_str().expect("a gRPC probe").to_string();
        let service = health["service"].as_str().unwrap_or_default().to_string();
        let deadline = Instant::now() + PHASE;
        loop {
            if let Ok(ch) = channel(&addr).await {
                let req = HealthCheckRequest {
                    service: service.clone(),
                };
                if let Ok(r) = HealthClient::new(ch).check(req).await {
                    if r.into_inner().status == ServingStatus::Serving as i32 {
                        return;
                    }
                }
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{workload} not ready on {addr}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `spur.v1.Learner/GetStatus` at the learner's Service address, with the token
    /// from its Secret.
    async fn learner_status(&mut self) -> Option<LearnerStatus> {
        let spec = &self.pod("spur-learner").spec;
        let ip = spec["ip"].as_str()?.to_string();
        let listen = spec["health"]["addr"].as_str()?.to_string();
        let token = spec["env"]["SPUR_SERVICE_TOKEN"].as_str()?.to_string();
        // The dev overlay probes the main port, so the probe's address is the learner's.
        assert!(listen.starts_with(&format!("{ip}:")));
        let bearer: tonic::metadata::MetadataValue<_> =
            format!("Bearer {token}").parse().expect("ascii token");
        let mut client = LearnerClient::with_interceptor(
            channel(&listen).await.ok()?,
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", bearer.clone());
                Ok(r)
            },
        );
        Some(client.get_status(StatusRequest {}).await.ok()?.into_inner())
    }

    async fn wait_learner(
        &mut self,
        what: &str,
        pred: impl Fn(&LearnerStatus) -> bool,
    ) -> LearnerStatus {
        let deadline = Instant::now() + PHASE;
        let mut last = None;
        loop {
            if let Some(s) = self.learner_status().await {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {last:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

async fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// The pods of an overlay, their files written under `dir`.
fn render_pods(kubectl: &Path, overlay: &str, dir: &Path) -> Vec<Value> {
    let mut cmd = Command::new(python());
    cmd.current_dir(ROOT)
        .args(["k8s/rehearse.py", "--overlay", overlay, "--root"])
        .arg(dir)
        .arg("--kubectl")
        .arg(kubectl);
    for o in OVERRIDES {
        cmd.args(["--env", o]);
    }
    let out = cmd.output().expect("k8s/rehearse.py runs");
    assert!(
        out.status.success(),
        "k8s/rehearse.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("rehearse.py prints JSON") {
        Value::Array(pods) => pods,
        other => panic!("expected a list of pods, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_overlay_trains_and_survives_a_learner_pod_deletion() {
    let Some(kubectl) = on_path("kubectl") else {
        eprintln!("\n*** SKIPPED the cluster rehearsal: no kubectl on PATH ***\n");
        return;
    };
    let started = Instant::now();
    let dir = temp_dir("rehearsal");
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let specs = render_pods(&kubectl, "dev", &dir);
    let count = |w: &str| specs.iter().filter(|p| p["workload"] == w).count();
    assert_eq!(
        (
            count("spur-learner"),
            count("spur-reward-service"),
            count("spur-actor")
        ),
        (1, 1, 2),
        "{specs:?}"
    );
    let mut names: Vec<&str> = specs.iter().filter_map(|p| p["pod"].as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 4, "pod names must be distinct: {names:?}");
    let mut cluster = Cluster {
        dir: dir.clone(),
        pods: specs
            .into_iter()
            .map(|spec| Pod {
                spec,
                child: None,
                starts: 0,
            })
            .collect(),
    };
    // Every pod at once, as `kubectl apply` would: actors retry until the learner and
    // the reward service serve.
    for p in &mut cluster.pods {
        p.start(&dir);
    }
    cluster.wait_ready("spur-reward-service").await;
    cluster.wait_ready("spur-learner").await;

    let trained = cluster
        .wait_learner("the success target", |s| {
            s.connected_actors == 2 && s.episodes >= 100 && s.success_rate >= SUCCESS_TARGET
        })
        .await;
    eprintln!(
        "success {:.2} after {} env steps, policy {} ({:.1} s)",
        trained.success_rate,
        trained.env_steps,
        trained.policy_version,
        started.elapsed().as_secs_f64()
    );

    // `kubectl delete pod spur-learner-0`: SIGTERM, exit within the grace period (the
    // learner checkpoints on the way out), then the StatefulSet's fresh pod on the
    // same volume.
    let before = cluster.learner_status().await.unwrap_or(trained);
    let learner = cluster.pod("spur-learner");
    let (status, took) = learner.terminate();
    assert!(
        status.success(),
        "the learner exited with {status}\n{}",
        cluster.logs()
    );
    eprintln!("learner exited {:.1} s after SIGTERM", took.as_secs_f64());
    cluster.pod("spur-learner").start(&dir);
    cluster.wait_ready("spur-learner").await;
    let after = cluster
        .wait_learner("training under the new learner", |s| {
            s.learner_incarnation != before.learner_incarnation
                && s.policy_version > before.policy_version
                && s.env_steps > before.env_steps
                && s.connected_actors == 2
        })
        .await;
    eprintln!(
        "new incarnation {}: policy {} -> {}, env steps {} -> {} ({:.1} s in all)",
        after.learner_incarnation,
        before.policy_version,
        after.policy_version,
        before.env_steps,
        after.env_steps,
        started.elapsed().as_secs_f64()
    );
    // The reward service and the actors were never restarted.
    for p in &cluster.pods {
        let want = if p.spec["workload"] == "spur-learner" {
            2
        } else {
            1
        };
        assert_eq!(p.starts, want, "{}", p.name());
    }
    cluster.assert_running();

    // `kubectl delete -k`: every pod drains and exits cleanly within its grace period.
    for p in &mut cluster.pods {
        let (status, _) = p.terminate();
        assert!(status.success(), "{} exited with {status}", p.name());
    }
}
