//! Config device strings to `tch::Device`: `auto` picks CUDA when a GPU is there,
//! `cuda`/`cuda:N` insist on one.
//!
//! libtorch keeps its CUDA backend in `libtorch_cuda.so`, which registers itself from
//! static initialisers when it is loaded. Nothing in spur calls into that library, so
//! the linker leaves it out of the binary (and should: loading it costs each process
//! about 125 MB of private memory and 0.15 s, for nothing when it runs on the CPU).
//! [`load_cuda`] loads it at run time instead, for configs that may use a GPU, and it
//! must run before the first tensor operation: libtorch asks once per process whether
//! a CUDA backend is registered (`tch::manual_seed` is enough to ask) and keeps the
//! answer.

use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::error::ModelError;

/// The file name of torch's CUDA library; found through the binary's run path (torch's
/// lib folder, baked in by the build script) or `LD_LIBRARY_PATH`.
const CUDA_LIBRARY: &str = "libtorch_cuda.so";

/// A config device string, checked but not looked up on the machine: parsing asks
/// torch nothing, so config validation can run before [`load_cuda`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when there is one, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

pub fn parse_device(spec: &str) -> Result<DeviceSpec, String> {
    match spec {
        "auto" => Ok(DeviceSpec::Auto),
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(DeviceSpec::Cuda)
            .ok_or_else(|| format!("unknown device `{other}`")),
    }
}

/// Loads torch's CUDA library into this process once; later calls return the first
/// answer. `Err` says why not: a CPU-only torch has no such library, which is not an
/// error for `auto`. Call it before any tensor exists (see the module's comment).
pub fn load_cuda() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let name = std::ffi::CString::new(CUDA_LIBRARY).expect("no NUL in the name");
            // SAFETY: dlopen with a valid C string; the handle is kept (never closed), so
            // the library stays loaded for the life of the process.
            let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if handle.is_null() {
                // SAFETY: dlerror returns a thread-local C string or null.
                let why = unsafe { libc::dlerror() };
                let why = if why.is_null() {
                    "unknown error".to_string()
                } else {
                    unsafe { std::ffi::CStr::from_ptr(why) }
                        .to_string_lossy()
                        .into_owned()
                };
                tracing::debug!(error = %why, "torch's CUDA library not loaded");
                return Err(why);
            }
            Ok(())
        })
        .clone()
}

/// Loads torch's CUDA library when any of `specs` (config device strings) may pick a
/// GPU; the CPU-only case loads nothing.
pub fn load_cuda_for<'a>(specs: impl IntoIterator<Item = &'a str>) {
    if specs.into_iter().any(|s| s != "cpu") {
        let _ = load_cuda();
    }
}

/// The device a validated config string names on this machine. `auto` falls back to
/// the CPU without a GPU; an explicit `cuda` or `cuda:N` that is not there is an error
/// naming `key` (a run asked to train on a GPU should not train on the CPU for days).
pub fn resolve_device(key: &str, spec: &str) -> Result<Device, ModelError> {
    load_cuda_for([spec]);
    let error = |message| ModelError::Device {
        key: key.to_string(),
        spec: spec.to_string(),
        message,
    };
    let device = match parse_device(spec).map_err(error)? {
        DeviceSpec::Auto => {
            let device = Device::cuda_if_available();
            if device == Device::Cpu && nvidia_driver_present() {
                // A GPU machine where torch sees no device: a driver too old for this
                // torch, a container without the device, or a tensor made before the
                // CUDA library was loaded. Say so rather than train on the CPU quietly.
                tracing::warn!(
                    key,
                    reason = cuda_tensor().err().unwrap_or_default(),
                    "an NVIDIA driver is installed but torch sees no CUDA device; using the cpu"
                );
            }
            device
        }
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(n) => Device::Cuda(n),
    };
    if let Device::Cuda(n) = device {
        let count = tch::Cuda::device_count();
        if n as i64 >= count {
            let message = match load_cuda() {
                Err(why) => format!("this torch has no CUDA backend ({why})"),
                Ok(()) if count == 0 => {
                    let why = cuda_tensor().err().unwrap_or_default();
                    format!("no CUDA device ({why})")
                }
                Ok(()) => format!("torch sees {count} CUDA device(s)"),
            };
            return Err(error(message));
        }
    }
    tracing::info!(key, spec, device = ?device, "device");
    Ok(device)
}

/// What this process's torch can do with CUDA: for `spur devices`.
#[derive(Debug, Clone)]
pub struct CudaReport {
    /// Whether torch's CUDA library loaded, or why not.
    pub library: Result<(), String>,
    /// CUDA devices torch sees.
    pub devices: i64,
    pub cudnn: bool,
    /// A one-element tensor made on `cuda:0`: `Ok` on a GPU, else libtorch's error.
    pub tensor: Result<(), String>,
    /// What `auto` resolves to.
    pub auto: Device,
}

impl CudaReport {
    /// Loads the CUDA library first, so call it before any other tensor work.
    pub fn probe() -> Self {
        let library = load_cuda();
        let tensor = cuda_tensor();
        Self {
            library,
            devices: tch::Cuda::device_count(),
            cudnn: tch::Cuda::cudnn_is_available(),
            tensor,
            auto: Device::cuda_if_available(),
        }
    }
}

/// Whether the machine has an NVIDIA kernel driver loaded (its `/proc` entry).
fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
}

/// Makes a one-element tensor on `cuda:0`; `Err` is why not (libtorch's first line:
/// the rest is a C++ backtrace).
fn cuda_tensor() -> Result<(), String> {
    Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0)))
        .map(|_| ())
        .map_err(|e| {
            e.to_string()
                .lines()
                .next()
                .unwrap_or("unknown error")
                .to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings_parse_without_asking_torch() {
        assert_eq!(parse_device("auto"), Ok(DeviceSpec::Auto));
        assert_eq!(parse_device("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(parse_device("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CPU", ""] {
            let err = parse_device(bad).unwrap_err();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn an_unknown_device_is_refused_naming_the_key() {
        let err = resolve_device("learner.device", "tpu")
            .unwrap_err()
            .to_string();
        assert!(err.contains("learner.device = \"tpu\""), "{err}");
        assert_eq!(resolve_device("model.device", "cpu").unwrap(), Device::Cpu);
    }
}
