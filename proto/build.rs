//! Compiles `spur/v1/spur.proto` and `spur/v1/env.proto` with the vendored protoc, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=spur/v1/spur.proto");
    println!("cargo:rerun-if-changed=spur/v1/env.proto");
    tonic_prost_build::configure()
        .compile_protos(&["spur/v1/spur.proto", "spur/v1/env.proto"], &["."])?;
    Ok(())
}
