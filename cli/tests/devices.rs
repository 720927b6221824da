//! CUDA through the real binary: torch's CUDA backend is there when a process asks for
//! a device that may be a GPU, and a run that insists on a GPU it does not have stops
//! at once, naming the key.
//!
//! These run on machines without a GPU too, where they check what can be checked
//! there: libtorch answers "no NVIDIA driver" when its CUDA backend is registered and
//! "Cannot initialize CUDA without ATen_cuda library" when it is not (torch's CUDA
//! library never loaded, or loaded after the first tensor operation).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod support;

use support::{spur, temp_dir, text, ROOT};

/// The error libtorch gives for CUDA work when its CUDA backend is not registered.
const NO_BACKEND: &str = "without ATen_cuda library";

/// Whether the torch this project built against ships a CUDA library (the PyPI wheel
/// for Linux does; a CPU-only build does not).
fn torch_has_cuda() -> bool {
    Path::new(env!("SPUR_TORCH_LIB"))
        .join("libtorch_cuda.so")
        .exists()
}

/// `spur devices`' stdout, and whether a tensor was made on `cuda:0`.
fn devices() -> (String, bool) {
    let out = spur(&["devices"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let gpu = stdout.contains("a tensor on cuda:0: made");
    (stdout, gpu)
}

/// `spur learner <args> --run-dir <run_dir>`, logging at info to a pipe.
fn learner(args: &[&str], run_dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spur"))
        .current_dir(ROOT)
        .env("RUST_LOG", "info")
        .arg("learner")
        .args(args)
        .arg("--run-dir")
        .arg(run_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the spur binary starts")
}

#[test]
fn devices_finds_torchs_cuda_backend() {
    let (stdout, gpu) = devices();
    if !torch_has_cuda() {
        assert!(
            stdout.contains("torch's CUDA library: not loaded"),
            "{stdout}"
        );
        return;
    }
    assert!(stdout.contains("torch's CUDA library: loaded"), "{stdout}");
    assert!(stdout.contains("a tensor on cuda:0:"), "{stdout}");
    assert!(
        !stdout.contains(NO_BACKEND),
        "CUDA backend not registered:\n{stdout}"
    );
    let required = spur(&["devices", "--require-gpu"], &[]);
    assert_eq!(required.status.success(), gpu, "{}", text(&required.stderr));
    if !gpu {
        assert!(text(&required.stderr).contains("--require-gpu"));
    }
}

#[test]
fn a_learner_told_to_use_a_missing_gpu_stops_naming_the_key() {
    let (stdout, gpu) = devices();
    if gpu {
        eprintln!("this machine has a GPU: nothing to refuse\n{stdout}");
        return;
    }
    let run_dir = temp_dir("devices-learner");
    let base = [
        "learner",
        "--config",
        "configs/cartpole.toml",
        "--set",
        "learner.device=cuda",
        "--set",
        "learner.listen=127.0.0.1:0",
        "--set",
        "run.prometheus_listen=",
    ];
    // The config itself is valid: the refusal below is the device's.
    let checked = spur(&[&base[..], &["--check-config"]].concat(), &[]);
    assert!(checked.status.success(), "{}", text(&checked.stderr));

    let mut child = learner(&base[1..], &run_dir);
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("a learner told learner.device=cuda kept running without a GPU");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("learner.device = \"cuda\""), "{stderr}");
    if torch_has_cuda() {
        // The backend was registered before the learner's first tensor: what is
        // missing is the device, not torch's CUDA support.
        assert!(stderr.contains("no CUDA device"), "{stderr}");
        assert!(!stderr.contains(NO_BACKEND), "{stderr}");
    }
}

/// Whether process `pid` has torch's CUDA library mapped.
fn maps_cuda_library(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .contains("libtorch_cuda.so")
}

#[test]
fn torchs_cuda_library_is_loaded_only_where_the_learners_device_may_be_a_gpu() {
    if !torch_has_cuda() {
        return;
    }
    // The learner goes by `learner.device` alone: `model.device` is the actors'.
    for (device, wanted) in [("cpu", false), ("auto", true)] {
        let run_dir = temp_dir(&format!("devices-maps-{device}"));
        let learner_device = format!("learner.device={device}");
        let args = [
            "--config",
            "configs/cartpole.toml",
            "--set",
            "model.device=auto",
            "--set",
            &learner_device,
            "--set",
            "learner.listen=127.0.0.1:0",
        ];
        let mut child = learner(&args, &run_dir);
        // Past start-up: the learner has built its model when it logs its device.
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0 {
            seen.push_str(&line);
            if line.contains("key=\"learner.device\"") {
                break;
            }
            line.clear();
        }
        let mapped = maps_cuda_library(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(seen.contains("key=\"learner.device\""), "{seen}");
        assert_eq!(
            mapped, wanted,
            "devices {device}: libtorch_cuda.so mapped: {mapped}"
        );
    }
}
