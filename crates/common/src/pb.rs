//! Generated protobuf and gRPC code for `moe.v1`, plus the descriptor set for reflection.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("moe.v1");
}

/// Encoded `FileDescriptorSet` of `moe.v1`, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("moe_v1_descriptor");

pub use v1::{
    ChatMessage, FinishReason, GenerateRequest, GenerateResponse, LatencyClass, PrefixCacheEvent,
    SamplingParams, Timings, TokenizeResponse, Usage, WatchPrefixCacheRequest,
};
