//! Shared pieces of moe-cluster: the protobuf API, the etcd registry (advert schema, registrar,
//! watcher), the GGUF reader used for planning, telemetry set-up and shutdown wiring.

pub mod chat;
pub mod class;
pub mod codec;
pub mod flags;
pub mod gguf;
pub mod grpc;
pub mod offload;
pub mod pb;
pub mod plan;
pub mod prefix;
pub mod registry;
pub mod reload;
pub mod request;
pub mod shutdown;
pub mod size;
pub mod telemetry;
pub mod tls;

pub use class::{LatencyClass, WorkerId, unix_ms};

/// The version every binary reports (advert `version`, `--version`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
