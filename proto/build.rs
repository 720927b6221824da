//! Compiles `spur/v1/spur.proto` and `spur/v1/env.proto` with the vendored protoc, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=spur/v1/spur.proto");
    println!("cargo:rerun-if-changed=spur/v1/env.proto");
    // Tensor and weight payloads decode as views into the received buffer instead of
    // being copied out of it, and weight pieces are slices of one published payload.
    tonic_prost_build::configure()
        .bytes(".spur.v1.Tensor.data")
        .bytes(".spur.v1.WeightsChunk.data")
        // Each message's buffer is reserved at its encoded length (`codec.rs`).
        .codec_path("crate::codec::SizedCodec")
        .compile_protos(&["spur/v1/spur.proto", "spur/v1/env.proto"], &["."])?;
    Ok(())
}
