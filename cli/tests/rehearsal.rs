//! A cluster rehearsal without a cluster: the `dev` overlay, rendered by `kubectl
//! kustomize`, run as local processes, one `spur` per pod (learner 1, reward service
//! 1, actors 2 with distinct pod names), each with the command line, environment and
//! mounted config its manifest gives it (`k8s/rehearse.py` resolves ConfigMaps,
//! Secrets and `$(VAR)`, writes mounted files under a temp dir and rewrites mount
//! paths). It waits on every pod's gRPC readiness probe, trains keyroom with ONI
//! rewards to a success target, then "deletes" the learner pod the way a StatefulSet
//! does (SIGTERM, exit within the grace period, a fresh pod from the same manifest on
//! the same volume), sees the actors turn unready while no learner serves, and checks
//! that training goes on under a new learner incarnation.
//!
//! Networking: where this process may make network namespaces (root, `ip`, a trial
//! namespace), each pod runs in its own (`netns/mod.rs`) on a bridge, with a hosts file
//! that maps the Service names to the pods behind them, so the manifests' URLs and
//! 0.0.0.0 listeners are used as they are. Elsewhere each pod gets a loopback address
//! and rehearse.py rewrites the Service URLs to pod addresses; the test says which
//! mode ran (`SPUR_REHEARSAL_NET=loopback` asks for the latter). As root the pods
//! run as their securityContext's uid and gid (`setpriv`). Not done either way:
//! NetworkPolicies, DNS, Service virtual IPs, kubelet probes, the image itself.

mod netns;
mod support;

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns::Network;
use serde_json::Value;
use spur_proto::v1::learner_client::LearnerClient;
use spur_proto::v1::{LearnerStatus, StatusRequest};
use support::{kill_9, on_path, python, read_log, temp_dir, ROOT};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The learner's port in the manifests (its Service and container port).
const LEARNER_PORT: u16 = 50051;
/// One rehearsal at a time: both tests' pods use the same ports, and two trainings
/// at once would share the machine's cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
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
    /// The pod's network namespace, in netns mode.
    netns: Option<String>,
    /// `setpriv` and the uid and gid of the pod's securityContext, when this test
    /// can switch users (it runs as root).
    user: Option<(PathBuf, u32, u32)>,
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

    /// Starts the pod's container command as a local process ("the kubelet"), in
    /// the pod's network namespace when it has one.
    fn start(&mut self, dir: &Path, net: Option<&Network>) {
        self.starts += 1;
        let argv: Vec<&str> = self.spec["argv"]
            .as_array()
            .expect("argv is a list")
            .iter()
            .map(|a| a.as_str().expect("args are strings"))
            .collect();
        let log = std::fs::File::create(self.log_path(dir)).expect("log file");
        // The container's env only (a pod inherits nothing from the node), plus PATH.
        let mut line: Vec<OsString> = vec![];
        if let Some((setpriv, uid, gid)) = &self.user {
            line.push(setpriv.into());
            for a in ["--reuid", &uid.to_string(), "--regid", &gid.to_string()] {
                line.push(a.into());
            }
            line.push("--clear-groups".into());
        }
        line.push(env!("CARGO_BIN_EXE_spur").into());
        line.extend(argv[1..].iter().map(OsString::from));
        let mut cmd = match (net, &self.netns) {
            (Some(net), Some(ns)) => net.exec(ns, Path::new(&line[0])),
            _ => Command::new(&line[0]),
        };
        cmd.args(&line[1..])
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

/// Every pod of the rehearsal; kills what is left on drop (a failed assertion), then
/// removes the network namespaces (fields drop after `drop` ran).
struct Cluster {
    dir: PathBuf,
    pods: Vec<Pod>,
    /// How the test reaches the learner's main port under mutual TLS (dev-tls).
    tls: Option<ClientTlsConfig>,
    net: Option<Network>,
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
    fn start(&mut self, workload: &str) {
        let (dir, net) = (&self.dir, self.net.as_ref());
        for p in self
            .pods
            .iter_mut()
            .filter(|p| p.spec["workload"] == workload)
        {
            p.start(dir, net);
        }
    }

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

    /// Polls the gRPC health service of every pod of `workload`, as its
    /// readinessProbe asks, until each reports `want`.
    async fn wait_health(&mut self, workload: &str, want: ServingStatus) {
        let probes: Vec<(String, String)> = self
            .pods
            .iter()
            .filter(|p| p.spec["workload"] == workload)
            .map(|p| {
                let h = &p.spec["health"];
                let addr = h["addr"].as_str().expect("a gRPC readiness probe");
                (
                    addr.to_string(),
                    h["service"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert!(!probes.is_empty(), "no pods of {workload}");
        let deadline = Instant::now() + PHASE;
        for (addr, service) in probes {
            let mut last = None;
            loop {
                last = probe(&addr, &service).await.or(last);
                if last == Some(want) {
                    break;
                }
                self.assert_running();
                assert!(
                    Instant::now() < deadline,
                    "{workload} at {addr} not {want:?} (last {last:?})\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    async fn wait_ready(&mut self, workload: &str) {
        self.wait_health(workload, ServingStatus::Serving).await;
    }

    /// `spur.v1.Learner/GetStatus` at the learner's Service address, with the token
    /// from its Secret.
    async fn learner_status(&mut self) -> Option<LearnerStatus> {
        let spec = &self.pod("spur-learner").spec;
        let main = format!("{}:{LEARNER_PORT}", spec["ip"].as_str()?);
        let token = spec["env"]["SPUR_SERVICE_TOKEN"].as_str()?.to_string();
        let tls = self.tls.clone();
        learner_client(&main, tls, Some(&token))
            .await
            .ok()?
            .get_status(StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
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

/// A learner client at `addr` (`host:port`), over mutual TLS when `tls` is given,
/// sending `token` if any.
async fn learner_client(
    addr: &str,
    tls: Option<ClientTlsConfig>,
    token: Option<&str>,
) -> Result<LearnerClient<InterceptedService<Channel, impl Interceptor>>, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let bearer: Option<MetadataValue<_>> =
        token.map(|t| format!("Bearer {t}").parse().expect("an ascii token"));
    Ok(LearnerClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            if let Some(b) = &bearer {
                r.metadata_mut().insert("authorization", b.clone());
            }
            Ok(r)
        },
    ))
}

/// What the gRPC health service at `addr` says of `service`, as a kubelet's probe
/// would see it; None when it does not answer.
async fn probe(addr: &str, service: &str) -> Option<ServingStatus> {
    let req = HealthCheckRequest {
        service: service.to_string(),
    };
    let r = HealthClient::new(channel(addr).await.ok()?)
        .check(req)
        .await
        .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

async fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// The pods of an overlay, their files written under `dir`, on `net`'s subnet or on
/// loopback addresses.
fn render_pods(
    kubectl: &Path,
    overlay: &str,
    dir: &Path,
    net: Option<&Network>,
    secrets: &[String],
) -> Vec<Value> {
    let mut cmd = Command::new(python());
    cmd.current_dir(ROOT)
        .args(["k8s/rehearse.py", "--overlay", overlay, "--root"])
        .arg(dir)
        .arg("--kubectl")
        .arg(kubectl);
    if let Some(net) = net {
        cmd.args(["--net", "netns", "--subnet", &net.subnet]);
    }
    for s in secrets {
        cmd.args(["--secret", s]);
    }
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

/// Network namespaces when this process can make them, else None (loopback
/// addresses); prints which, and why not.
fn pod_network() -> Option<Network> {
    let ip = on_path("ip").or_else(|| Some(PathBuf::from("/usr/sbin/ip")).filter(|p| p.is_file()));
    let why_not = if std::env::var("SPUR_REHEARSAL_NET").as_deref() == Ok("loopback") {
        Err("SPUR_REHEARSAL_NET=loopback".to_string())
    } else {
        netns::usable(ip.as_deref())
    };
    match why_not.and_then(|()| Network::new(ip.as_deref().expect("usable() found ip"))) {
        Ok(net) => {
            eprintln!(
                "\n*** rehearsal: one network namespace per pod on {}.0/24 ***\n",
                net.subnet
            );
            Some(net)
        }
        Err(why) => {
            eprintln!(
                "\n*** rehearsal: NO network namespaces ({why}); pods on loopback \
                 addresses, Service URLs rewritten ***\n"
            );
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_overlay_trains_and_survives_a_learner_pod_deletion() {
    let Some(kubectl) = on_path("kubectl") else {
        eprintln!("\n*** SKIPPED the cluster rehearsal: no kubectl on PATH ***\n");
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let started = Instant::now();
    let mut cluster = boot(&kubectl, "dev", pod_network(), &[]);
    // Every pod at once, as `kubectl apply` would: actors retry until the learner and
    // the reward service serve.
    for w in ["spur-learner", "spur-reward-service", "spur-actor"] {
        cluster.start(w);
    }
    cluster.wait_ready("spur-reward-service").await;
    cluster.wait_ready("spur-learner").await;
    cluster.wait_ready("spur-actor").await;
    if cluster.net.is_some() {
        pods_are_apart(&mut cluster);
    }

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

    learner_runs_as_its_user(&mut cluster);

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
    // With no learner the actors' trajectory streams are down: not ready.
    cluster
        .wait_health("spur-actor", ServingStatus::NotServing)
        .await;
    cluster.start("spur-learner");
    cluster.wait_ready("spur-learner").await;
    let after = cluster
        .wait_learner("training under the new learner", |s| {
            s.learner_incarnation != before.learner_incarnation
                && s.policy_version > before.policy_version
                && s.env_steps > before.env_steps
                && s.connected_actors == 2
        })
        .await;
    cluster.wait_ready("spur-actor").await;
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

/// The pods of `overlay` (1 learner, 1 reward service, 2 actors), in their network
/// namespaces when `net` is given; nothing started yet.
fn boot(kubectl: &Path, overlay: &str, mut net: Option<Network>, secrets: &[String]) -> Cluster {
    let dir = temp_dir(&format!("rehearsal-{overlay}"));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let specs = render_pods(kubectl, overlay, &dir, net.as_ref(), secrets);
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
    // SAFETY: geteuid(2) has no preconditions.
    let setpriv = on_path("setpriv").filter(|_| unsafe { libc::geteuid() } == 0);
    if setpriv.is_none() {
        eprintln!("*** rehearsal: pods run as this test's user (not root, or no setpriv) ***");
    }
    let mut usable = std::collections::HashMap::new();
    let mut pods = vec![];
    for spec in specs {
        let user = setpriv.as_ref().and_then(|bin| {
            let id = |k: &str| spec["run_as"][k].as_u64().map(|v| v as u32);
            let (uid, gid) = (id("uid")?, id("gid")?);
            let can = usable
                .entry((uid, gid))
                .or_insert_with(|| user_can_run(bin, uid, gid));
            if let Err(why) = can {
                eprintln!("*** rehearsal: pods run as this test's user: {why} ***");
                return None;
            }
            // As fsGroup does for a pod's volumes: its mounts are its own.
            for m in spec["mounts"].as_array().expect("mounts are a list") {
                chown_tree(Path::new(m.as_str().expect("a path")), uid, gid);
            }
            Some((bin.clone(), uid, gid))
        });
        let netns = net.as_mut().map(|net| {
            let (pod, ip) = (spec["pod"].as_str().unwrap(), spec["ip"].as_str().unwrap());
            let hosts = spec["hosts"]
                .as_str()
                .expect("netns pods have a hosts file");
            net.add_pod(pod, ip, hosts)
                .unwrap_or_else(|e| panic!("{e}"))
        });
        pods.push(Pod {
            spec,
            netns,
            user,
            child: None,
            starts: 0,
        });
    }
    Cluster {
        dir,
        pods,
        tls: None,
        net,
    }
}

/// Whether uid and gid can start the spur binary (its libraries load) and read the
/// repository (prompts, rules): a checkout under a private home directory cannot.
fn user_can_run(setpriv: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let run = |args: &[&OsStr]| {
        let out = Command::new(setpriv)
            .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
            .arg("--clear-groups")
            .args(args)
            .output()
            .map_err(|e| format!("setpriv: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "uid {uid} cannot run {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let rules = Path::new(ROOT).join("judges/keyroom.rules");
    run(&[
        OsStr::new(env!("CARGO_BIN_EXE_spur")),
        OsStr::new("--version"),
    ])?;
    run(&[OsStr::new("test"), OsStr::new("-r"), rules.as_os_str()])?;
    eprintln!("*** rehearsal: pods run as their securityContext's user (uid {uid}) ***");
    Ok(())
}

/// `chown -R uid:gid path`.
fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("a readable directory") {
            chown_tree(&e.expect("a directory entry").path(), uid, gid);
        }
    }
}

/// A CA and one certificate for every Service name the pods use, as
/// k8s/components/tls/certificate.yaml has cert-manager make them: the spur-tls
/// Secret's keys, as rehearse.py `--secret` arguments, plus the CA and a client
/// identity for the test.
fn spur_tls(dir: &Path) -> (Vec<String>, Certificate, Identity) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("no names");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "spur-ca");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("a key")).expect("a CA");
    let names: Vec<String> = ["spur-learner", "spur-reward-service"]
        .iter()
        .flat_map(|s| {
            [
                s.to_string(),
                format!("{s}.spur.svc"),
                format!("{s}.spur.svc.cluster.local"),
            ]
        })
        .collect();
    let mut leaf = CertificateParams::new(names).expect("valid names");
    leaf.distinguished_name.push(DnType::CommonName, "spur");
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().expect("a key");
    let cert = leaf.signed_by(&key, &ca).expect("a signed certificate");
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    let files = [
        ("tls.crt", cert.pem()),
        ("tls.key", key.serialize_pem()),
        ("ca.crt", ca.pem()),
    ];
    let mut args = vec![];
    for (name, pem) in &files {
        std::fs::write(pki.join(name), pem).unwrap();
        args.push(format!("spur-tls/{name}={}", pki.join(name).display()));
    }
    (
        args,
        Certificate::from_pem(ca.pem()),
        Identity::from_pem(cert.pem(), key.serialize_pem()),
    )
}

/// The dev-tls overlay: every connection between pods is mutual TLS with the bearer
/// token, to the Service names the certificate carries, across namespaces; the
/// kubelet's probes use the plain health ports. Needs namespaces: on loopback
/// addresses the URLs would name addresses the certificate does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_tls_overlay_trains_over_mutual_tls_between_namespaces() {
    let Some(kubectl) = on_path("kubectl") else {
        eprintln!("\n*** SKIPPED the dev-tls rehearsal: no kubectl on PATH ***\n");
        return;
    };
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(net) = pod_network() else {
        eprintln!("\n*** SKIPPED the dev-tls rehearsal: it needs network namespaces ***\n");
        return;
    };
    let started = Instant::now();
    let scratch = temp_dir("rehearsal-pki");
    let (secrets, ca, identity) = spur_tls(&scratch);
    let mut cluster = boot(&kubectl, "dev-tls", Some(net), &secrets);
    let tls = ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(identity)
        .domain_name("spur-learner");
    cluster.tls = Some(tls.clone());
    for w in ["spur-learner", "spur-reward-service", "spur-actor"] {
        cluster.start(w);
    }
    cluster.wait_ready("spur-reward-service").await;
    cluster.wait_ready("spur-learner").await;
    cluster.wait_ready("spur-actor").await;
    let first = cluster
        .wait_learner("actors training over mutual TLS", |s| {
            s.connected_actors == 2 && s.policy_version >= 2
        })
        .await;
    let s = cluster
        .wait_learner("more updates", |s| {
            s.policy_version >= first.policy_version + 3
        })
        .await;
    eprintln!(
        "dev-tls: policy {} after {} env steps from 2 actors over mutual TLS ({:.1} s)",
        s.policy_version,
        s.env_steps,
        started.elapsed().as_secs_f64()
    );
    // The learner's main port refuses what the manifests do not give: a client
    // without a certificate, and one with the certificate but a wrong token.
    let spec = cluster.pod("spur-learner").spec.clone();
    let main = format!("{}:{LEARNER_PORT}", spec["ip"].as_str().unwrap());
    let token = spec["env"]["SPUR_SERVICE_TOKEN"]
        .as_str()
        .unwrap()
        .to_string();
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(scratch.join("pki/ca.crt")).unwrap(),
        ))
        .domain_name("spur-learner");
    let refused = match learner_client(&main, Some(anonymous), Some(&token)).await {
        Err(_) => true,
        Ok(mut c) => c.get_status(StatusRequest {}).await.is_err(),
    };
    assert!(
        refused,
        "a client without a certificate got the learner's status"
    );
    let wrong = learner_client(&main, Some(tls), Some("wrong-token"))
        .await
        .expect("the certificate is accepted")
        .get_status(StatusRequest {})
        .await
        .expect_err("a wrong token is refused");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");
    for p in &mut cluster.pods {
        let (status, _) = p.terminate();
        assert!(status.success(), "{} exited with {status}", p.name());
    }
}

/// The learner's run directory, on its volume, belongs to the securityContext's
/// user when the pods run as it: the process wrote it as that user.
fn learner_runs_as_its_user(cluster: &mut Cluster) {
    let learner = cluster.pod("spur-learner");
    let Some((_, uid, _)) = learner.user else {
        return;
    };
    let argv = learner.spec["argv"].as_array().expect("argv");
    let at = argv
        .iter()
        .position(|a| a == "--run-dir")
        .expect("--run-dir");
    let checkpoints = Path::new(argv[at + 1].as_str().expect("a path")).join("checkpoints");
    let owner = std::fs::metadata(&checkpoints)
        .unwrap_or_else(|e| panic!("{}: {e}", checkpoints.display()))
        .uid();
    assert_eq!(
        owner,
        uid,
        "{} belongs to uid {owner}",
        checkpoints.display()
    );
}

/// What the namespaces make real: an actor reaches the learner by the Service name in
/// its unrewritten config (through its hosts file), the learner's address from inside
/// the actor's namespace, but not a port of the learner on its own loopback (the
/// learner is in another pod); every pod listens on 0.0.0.0 as its manifest says.
fn pods_are_apart(cluster: &mut Cluster) {
    let learner = cluster.pod("spur-learner").spec.clone();
    let actor = cluster.pod("spur-actor");
    let ns = actor.netns.clone().expect("netns mode");
    let config = actor.spec["argv"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .position(|x| x == "--config")
                .map(|i| a[i + 1].clone())
        })
        .and_then(|p| std::fs::read_to_string(p.as_str()?).ok())
        .expect("the actor's mounted config");
    assert!(
        config.contains("learner_addr = \"http://spur-learner:50051\"")
            && config.contains("prometheus_listen = \"0.0.0.0:9100\""),
        "the config must reach the pod unrewritten:\n{config}"
    );
    let at = |host: &str| -> SocketAddr { format!("{host}:50051").parse().expect("an address") };
    let learner_ip = learner["ip"].as_str().expect("an address");
    netns::connect_from(&ns, at(learner_ip))
        .unwrap_or_else(|e| panic!("{ns} cannot reach the learner at {learner_ip}: {e}"));
    let local = netns::connect_from(&ns, at("127.0.0.1"));
    assert!(
        matches!(&local, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "port 50051 on the actor pod's own loopback: {local:?}"
    );
    eprintln!("{ns}: the learner is at {learner_ip}:50051, not on the pod's own loopback");
}
