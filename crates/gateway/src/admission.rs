//! Admission at the gateway: per-class shares of the concurrent-stream limit (review M6: BATCH
//! cannot take the places INTERACTIVE needs) and the retry hint every RESOURCE_EXHAUSTED
//! carries (issue 16).
//!
//! Requests that find no worker with KV headroom are not refused here: they wait in a worker's
//! admission queue (`scheduler::queue`). What is refused at once is a request over this
//! gateway's `--max-concurrency` (load shedding), and what a worker refuses (its queue full, or
//! the wait over its `--queue-timeout`) on every worker tried.

use std::sync::Arc;
use std::time::Duration;

use moe_common::LatencyClass;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::auth::RETRY_AFTER_MS;

/// The standard gRPC retry pushback header: clients with a retry policy wait this long.
pub const GRPC_RETRY_PUSHBACK_MS: &str = "grpc-retry-pushback-ms";

/// How long a refused client should wait before trying again: about the time a slot or a queue
/// place takes to free on a busy worker. The HTTP API answers `Retry-After: 1` likewise.
pub const RETRY_HINT: Duration = Duration::from_secs(1);

/// RESOURCE_EXHAUSTED with the retry hint: trailing metadata `retry-after-ms` (as API-key
/// limits use) and `grpc-retry-pushback-ms`, and the message ending `retry-after N s`.
pub fn exhausted(message: impl std::fmt::Display) -> Status {
    with_retry_hint(Status::resource_exhausted(message.to_string()))
}

/// `status` with the retry hint added when it is RESOURCE_EXHAUSTED and has none yet (a worker's
/// refusal, relayed); one that has its own `retry-after-ms` (an API-key limit) gets the same
/// value as `grpc-retry-pushback-ms`. Other statuses unchanged.
pub fn with_retry_hint(status: Status) -> Status {
    if status.code() != Code::ResourceExhausted {
        return status;
    }
    if let Some(own) = status.metadata().get(RETRY_AFTER_MS).cloned() {
        if status.metadata().get(GRPC_RETRY_PUSHBACK_MS).is_some() {
            return status;
        }
        let mut md = status.metadata().clone();
        md.insert(GRPC_RETRY_PUSHBACK_MS, own);
        return Status::with_metadata(Code::ResourceExhausted, status.message(), md);
    }
    let ms = RETRY_HINT.as_millis() as u64;
    let mut md: MetadataMap = status.metadata().clone();
    md.insert(RETRY_AFTER_MS, MetadataValue::from(ms));
    md.insert(GRPC_RETRY_PUSHBACK_MS, MetadataValue::from(ms));
    let message = format!("{}; retry-after {} s", status.message(), ms.div_ceil(1000));
    Status::with_metadata(Code::ResourceExhausted, message, md)
}

/// The gateway's concurrent-stream limit, with a share only INTERACTIVE requests may take.
#[derive(Clone, Debug)]
pub struct StreamLimit {
    /// Places either class may take: the limit less the interactive reserve.
    shared: Arc<Semaphore>,
    /// Places only INTERACTIVE requests take, once the shared ones are gone.
    interactive: Arc<Semaphore>,
    max: usize,
    reserved: usize,
}

/// The default interactive reserve for a limit of `max` streams: an eighth, at least one when
/// the limit is 2 or more (so one class never holds every place).
pub fn default_interactive_reserve(max: usize) -> usize {
    if max >= 2 { (max / 8).max(1) } else { 0 }
}

impl StreamLimit {
    /// `max` streams at once, `reserved` of them (at most `max - 1`) for INTERACTIVE only.
    pub fn new(max: usize, reserved: usize) -> Self {
        let reserved = reserved.min(max.saturating_sub(1));
        StreamLimit {
            shared: Arc::new(Semaphore::new(max - reserved)),
            interactive: Arc::new(Semaphore::new(reserved)),
            max,
            reserved,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// A place for one stream of `class`, or RESOURCE_EXHAUSTED (with the retry hint) at once.
    pub fn try_acquire(&self, class: LatencyClass) -> Result<OwnedSemaphorePermit, Status> {
        if let Ok(p) = self.shared.clone().try_acquire_owned() {
            return Ok(p);
        }
        match class {
            LatencyClass::Interactive => {
                self.interactive.clone().try_acquire_owned().map_err(|_| {
                    exhausted(format!(
                        "gateway is at its limit of {} concurrent streams (--max-concurrency)",
                        self.max
                    ))
                })
            }
            LatencyClass::Batch => Err(exhausted(format!(
                "gateway is at its limit of {} concurrent BATCH streams ({} of \
                 --max-concurrency {} are kept for INTERACTIVE requests, \
                 --interactive-reserved-streams)",
                self.max - self.reserved,
                self.reserved,
                self.max
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_cannot_take_the_interactive_reserve() {
        let limit = StreamLimit::new(4, 1);
        let held: Vec<_> = (0..3)
            .map(|_| {
                limit
                    .try_acquire(LatencyClass::Batch)
                    .expect("shared place")
            })
            .collect();
        let refused = limit.try_acquire(LatencyClass::Batch).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.metadata().get(RETRY_AFTER_MS).is_some());
        let interactive = limit
            .try_acquire(LatencyClass::Interactive)
            .expect("the reserve is INTERACTIVE's");
        let over = limit.try_acquire(LatencyClass::Interactive).unwrap_err();
        assert_eq!(over.code(), Code::ResourceExhausted);
        drop(interactive);
        drop(held);
        // INTERACTIVE takes shared places first, so BATCH is not starved by an idle reserve.
        let _all: Vec<_> = (0..4)
            .map(|_| limit.try_acquire(LatencyClass::Interactive).unwrap())
            .collect();
        assert!(limit.try_acquire(LatencyClass::Batch).is_err());
    }

    #[test]
    fn reserve_defaults_to_an_eighth_and_never_takes_every_place() {
        assert_eq!(default_interactive_reserve(1), 0);
        assert_eq!(default_interactive_reserve(2), 1);
        assert_eq!(default_interactive_reserve(1024), 128);
        let one = StreamLimit::new(1, 5);
        assert_eq!(one.reserved(), 0);
        assert!(one.try_acquire(LatencyClass::Batch).is_ok());
    }

    #[test]
    fn the_retry_hint_is_added_once_and_only_to_resource_exhausted() {
        let s = exhausted("queue full");
        assert_eq!(s.metadata().get(RETRY_AFTER_MS).unwrap(), "1000");
        assert_eq!(s.metadata().get(GRPC_RETRY_PUSHBACK_MS).unwrap(), "1000");
        assert!(s.message().ends_with("retry-after 1 s"), "{}", s.message());
        let again = with_retry_hint(s.clone());
        assert_eq!(again.message(), s.message());
        let other = with_retry_hint(Status::unavailable("down"));
        assert!(other.metadata().get(RETRY_AFTER_MS).is_none());
        // An API-key limit's own hint is kept and given as pushback too.
        let mut md = MetadataMap::new();
        md.insert(RETRY_AFTER_MS, MetadataValue::from(7500u64));
        let quota = with_retry_hint(Status::with_metadata(
            Code::ResourceExhausted,
            "over the key's tokens per minute; retry-after 8 s",
            md,
        ));
        assert_eq!(quota.metadata().get(RETRY_AFTER_MS).unwrap(), "7500");
        assert_eq!(
            quota.metadata().get(GRPC_RETRY_PUSHBACK_MS).unwrap(),
            "7500"
        );
        assert!(quota.message().ends_with("retry-after 8 s"));
    }
}
