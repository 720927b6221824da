//! Turns a config device string into a `tch::Device`; `auto` picks CUDA when present.

use tch::Device;

pub fn parse_device(spec: &str) -> Result<Device, String> {
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device `{other}`")),
    }
}

/// Like [`parse_device`], for a string that already passed config validation; a CUDA
/// device asked for on a machine without one falls back to the CPU with a warning.
pub fn resolve_device(spec: &str) -> Device {
    let device = parse_device(spec).unwrap_or(Device::Cpu);
    if device.is_cuda() && !tch::Cuda::is_available() {
        tracing::warn!(device = spec, "cuda is not available, using the cpu");
        return Device::Cpu;
    }
    device
}
