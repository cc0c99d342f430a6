//! The shared vocabulary: one latency class, one worker id, one wall clock in milliseconds.
//! Every crate (gateway, worker, moectl, bench, sim) spells these concepts with these types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::pb;

/// How a request wants to be placed and scheduled. The proto's `LATENCY_CLASS_UNSPECIFIED`
/// (0) means [`LatencyClass::Interactive`].
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum LatencyClass {
    /// A person is waiting: prefer full-GPU workers, minimise time to first token.
    #[default]
    Interactive,
    /// Throughput work: prefer expert-offloaded workers, keep the fast pool free.
    Batch,
}

impl LatencyClass {
    pub const ALL: [LatencyClass; 2] = [LatencyClass::Interactive, LatencyClass::Batch];

    /// The name used in flags, API keys, metric labels and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            LatencyClass::Interactive => "interactive",
            LatencyClass::Batch => "batch",
        }
    }

    /// The proto enum value to put on the wire.
    pub fn to_proto(self) -> pb::LatencyClass {
        match self {
            LatencyClass::Interactive => pb::LatencyClass::Interactive,
            LatencyClass::Batch => pb::LatencyClass::Batch,
        }
    }
}

/// A `latency_class` value outside the proto enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown latency_class {0}")]
pub struct UnknownClass(pub i32);

impl TryFrom<i32> for LatencyClass {
    type Error = UnknownClass;
    /// The raw `GenerateRequest.latency_class`: unset (0) is interactive.
    fn try_from(v: i32) -> Result<Self, UnknownClass> {
        match pb::LatencyClass::try_from(v) {
            Ok(c) => Ok(c.into()),
            Err(_) => Err(UnknownClass(v)),
        }
    }
}

impl From<pb::LatencyClass> for LatencyClass {
    fn from(c: pb::LatencyClass) -> Self {
        match c {
            pb::LatencyClass::Batch => LatencyClass::Batch,
            pb::LatencyClass::Interactive | pb::LatencyClass::Unspecified => {
                LatencyClass::Interactive
            }
        }
    }
}

impl From<LatencyClass> for pb::LatencyClass {
    fn from(c: LatencyClass) -> Self {
        c.to_proto()
    }
}

/// A class name that is neither `interactive` nor `batch`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown class {0:?} (interactive or batch)")]
pub struct UnknownClassName(pub String);

impl FromStr for LatencyClass {
    type Err = UnknownClassName;
    /// Exactly `interactive` or `batch` (callers that accept other spellings lower-case first).
    fn from_str(s: &str) -> Result<Self, UnknownClassName> {
        match s {
            "interactive" => Ok(LatencyClass::Interactive),
            "batch" => Ok(LatencyClass::Batch),
            _ => Err(UnknownClassName(s.to_string())),
        }
    }
}

impl fmt::Display for LatencyClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker's id: the last segment of its registry key, unique in the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub String);

impl WorkerId {
    pub fn new(id: impl Into<String>) -> Self {
        WorkerId(id.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for WorkerId {
    fn from(s: String) -> Self {
        WorkerId(s)
    }
}

impl From<&str> for WorkerId {
    fn from(s: &str) -> Self {
        WorkerId(s.to_string())
    }
}

impl std::borrow::Borrow<str> for WorkerId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Milliseconds since the Unix epoch by the wall clock (0 if the clock is before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_values_map_with_unset_as_interactive() {
        assert_eq!(LatencyClass::try_from(0), Ok(LatencyClass::Interactive));
        assert_eq!(LatencyClass::try_from(1), Ok(LatencyClass::Interactive));
        assert_eq!(LatencyClass::try_from(2), Ok(LatencyClass::Batch));
        assert_eq!(LatencyClass::try_from(7), Err(UnknownClass(7)));
        assert_eq!(LatencyClass::Batch.to_proto() as i32, 2);
    }

    #[test]
    fn names_round_trip() {
        for c in LatencyClass::ALL {
            assert_eq!(c.as_str().parse::<LatencyClass>(), Ok(c));
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.as_str())
            );
        }
        assert!("BATCH".parse::<LatencyClass>().is_err());
        assert!("fast".parse::<LatencyClass>().is_err());
    }

    #[test]
    fn worker_id_is_a_plain_string_in_json() {
        let id = WorkerId::new("w-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"w-1\"");
    }
}
