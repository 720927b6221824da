//! The `spur.v1` gRPC protocol, generated from `spur/v1/spur.proto` at build time.
//!
//! Everything that crosses a process boundary is defined there (and in `env.proto`, the
//! environment bridge): trajectory chunks,
//! versioned weights and status. Conversions between these messages and tensors live
//! in `spur-core` (`tensor.rs`, `trajectory.rs`).

/// The type of `Tensor.data` and `WeightsChunk.data`: a view into a shared buffer.
pub use prost::bytes::Bytes;

pub mod codec;

pub mod v1 {
    tonic::include_proto!("spur.v1");
}

/// Default gRPC message limit used by every spur server and client (16 MiB).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
