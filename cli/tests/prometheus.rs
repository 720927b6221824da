//! `run.prometheus_listen` end to end: `spur local` starts every role with its own
//! `/metrics` port, and each serves the role's gauges and counters over HTTP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The port a child of `spur local` reported for its metrics listener, once it has.
fn reported_port(run_dir: &Path, name: &str) -> Option<u16> {
    let text =
        std::fs::read_to_string(run_dir.join("metrics").join(format!("{name}.addr"))).ok()?;
    text.trim().parse::<SocketAddr>().ok().map(|a| a.port())
}

/// The body of `GET /metrics`, or None while nothing listens there.
fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.1 200").then_some(body)
}

/// The value of the first sample of `name` in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn every_role_serves_its_metrics() {
    let run_dir = std::env::temp_dir().join(format!("spur-prom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run_dir);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut child = Command::new(env!("CARGO_BIN_EXE_spur"))
        .current_dir(root)
        .args(["local", "--config", "configs/keyroom-oni.toml", "--run-dir"])
        .arg(&run_dir)
        // Port 0: every child binds a free port of its own and says which.
        .args(["--set", "run.prometheus_listen=127.0.0.1:0"])
        .args(["--set", "stop.env_steps=50000000"])
        .args(["--set", "learner.batch_steps=1024"])
        .args([
            "--set",
            &format!("reward_service.store={}/labels.redb", run_dir.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // reward service, learner, then the 2 actors
    let wanted = [
        ("reward-service", "spur_reward_labels"),
        ("learner", "spur_learner_episode_return_mean"),
        ("actor-0", "spur_actor_env_steps_total"),
        ("actor-1", "spur_actor_env_steps_total"),
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pages = vec![None; wanted.len()];
    while pages.iter().any(Option::is_none) && Instant::now() < deadline {
        for (i, (role, name)) in wanted.iter().enumerate() {
            if pages[i].is_none() {
                pages[i] = reported_port(&run_dir, role)
                    .and_then(scrape)
                    .filter(|p| sample(p, name).is_some());
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // Stop the run the way a person would (Ctrl-C), then look at what we got.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    for ((role, name), page) in wanted.iter().zip(&pages) {
        let page = page
            .as_ref()
            .unwrap_or_else(|| panic!("no {name} from the {role}"));
        assert!(sample(page, name).unwrap() >= 0.0);
    }
    // Each page came from the process it was asked of.
    for ((role, _), page) in wanted.iter().zip(&pages) {
        let kind = role
            .trim_end_matches(char::is_numeric)
            .trim_end_matches('-');
        let label = format!("role=\"{kind}\"");
        assert!(
            page.as_ref().unwrap().contains(&label),
            "{role}: no {label}"
        );
    }
    let learner = pages[1].as_ref().unwrap();
    assert!(learner.contains("role=\"learner\""), "{learner}");
    assert!(sample(learner, "spur_learner_updates").unwrap() >= 1.0);
    assert!(sample(pages[2].as_ref().unwrap(), "spur_actor_env_steps_total").unwrap() > 0.0);
    assert_eq!(status.code(), Some(130), "a clean interrupted stop");
    let _ = std::fs::remove_dir_all(&run_dir);
}
