//! Chat fidelity helpers shared by gateway and worker: strict request parsing (unknown fields are
//! named, never ignored) and incremental parsers for what chat models emit — harmony channels,
//! `<think>` reasoning and tool-call formats. The parsers accept text cut anywhere (inside a marker
//! too) and hold back only what may still become a marker.

mod delta;
pub mod grammar;
pub mod harmony;
pub mod parser;
pub mod strict;
pub mod support;
pub mod think;
pub mod tools;

pub use delta::ChatDelta;
pub use parser::{ChatFormat, ChatParser, ReasoningFormat};
pub use tools::ToolFormat;
