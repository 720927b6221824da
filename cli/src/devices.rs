//! `spur devices`: what this machine's torch can do with CUDA, before a run is
//! pointed at a GPU (and in the image's build, where it proves the CUDA backend is
//! there). It loads torch's CUDA library and makes one tensor on `cuda:0`.

use std::process::ExitCode;

use clap::Args;
use spur_core::device::CudaReport;

#[derive(Args)]
pub struct DevicesArgs {
    /// Exit with failure unless a CUDA device takes a tensor (for a GPU node's
    /// readiness check, or a script that must not run on the CPU by mistake).
    #[arg(long)]
    require_gpu: bool,
}

pub fn run(args: DevicesArgs) -> ExitCode {
    let report = CudaReport::probe();
    match &report.library {
        Ok(()) => println!("torch's CUDA library: loaded"),
        Err(why) => println!("torch's CUDA library: not loaded ({why})"),
    }
    println!("CUDA devices: {}", report.devices);
    println!(
        "cuDNN: {}",
        if report.cudnn {
            "available"
        } else {
            "not available"
        }
    );
    match &report.tensor {
        Ok(()) => println!("a tensor on cuda:0: made"),
        Err(why) => println!("a tensor on cuda:0: not made ({why})"),
    }
    println!("device = \"auto\" picks: {:?}", report.auto);
    if args.require_gpu && report.tensor.is_err() {
        eprintln!("error: --require-gpu: no CUDA device took a tensor");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
