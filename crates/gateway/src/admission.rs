//! Admission at the gateway: per-class shares of the concurrent-stream limit (review M6: BATCH
//! cannot take the places INTERACTIVE needs) and the retry hint every RESOURCE_EXHAUSTED
//! carries (issue 16).
//!
//! The retry hint is the admission queue's expected wait where the gateway knows the request
//! (`scheduler::queue::expected_wait`, through [`retry_hint`]), [`RETRY_HINT`] where it does not
//! (a request refused before its body was read). gRPC clients get it in milliseconds
//! (`retry-after-ms`, `grpc-retry-pushback-ms`); the HTTP API answers the same value rounded up
//! to whole seconds in `Retry-After` ([`retry_after_secs`]).
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

/// How long a refused client should wait before trying again when the gateway knows no better
/// (the request was refused before it was read), and the least hint it ever gives.
pub const RETRY_HINT: Duration = Duration::from_secs(1);

/// The longest hint given: beyond it an estimate says little (the workers' `--queue-timeout` is
/// 30 s by default), and a client should rather look elsewhere.
pub const MAX_RETRY_HINT: Duration = Duration::from_secs(60);

/// The retry hint for a request that should expect to wait `expected_wait` for a worker to start
/// it (`scheduler::queue::expected_wait`): that wait, at least [`RETRY_HINT`], at most
/// [`MAX_RETRY_HINT`]; [`RETRY_HINT`] when there is no estimate.
pub fn retry_hint(expected_wait: Option<Duration>) -> Duration {
    expected_wait
        .unwrap_or(RETRY_HINT)
        .clamp(RETRY_HINT, MAX_RETRY_HINT)
}

/// The hint a status carries (`retry-after-ms`), rounded up to whole seconds and at least 1:
/// the HTTP API's `Retry-After` for the same refusal.
pub fn retry_after_secs(status: &Status) -> Option<u64> {
    let ms: u64 = status
        .metadata()
        .get(RETRY_AFTER_MS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(ms.div_ceil(1000).max(1))
}

/// RESOURCE_EXHAUSTED with the default retry hint ([`RETRY_HINT`]): trailing metadata
/// `retry-after-ms` (as API-key limits use) and `grpc-retry-pushback-ms`, and the message
/// ending `retry-after N s`.
pub fn exhausted(message: impl std::fmt::Display) -> Status {
    with_retry_hint(Status::resource_exhausted(message.to_string()))
}

/// [`exhausted`] with the hint `hint` (see [`retry_hint`]).
pub fn exhausted_after(message: impl std::fmt::Display, hint: Duration) -> Status {
    with_retry_hint_after(Status::resource_exhausted(message.to_string()), hint)
}

/// `status` with the default retry hint added when it is RESOURCE_EXHAUSTED and has none yet;
/// see [`with_retry_hint_after`].
pub fn with_retry_hint(status: Status) -> Status {
    with_retry_hint_after(status, RETRY_HINT)
}

/// `status` with the retry hint `hint` added when it is RESOURCE_EXHAUSTED and has none yet (a
/// worker's refusal, relayed); one that has its own `retry-after-ms` (an API-key limit) gets the
/// same value as `grpc-retry-pushback-ms`. Other statuses unchanged.
pub fn with_retry_hint_after(status: Status, hint: Duration) -> Status {
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
    let ms = hint.as_millis().max(1) as u64;
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

    /// A place for one stream of `class`, or RESOURCE_EXHAUSTED (with the default retry hint)
    /// at once.
    pub fn try_acquire(&self, class: LatencyClass) -> Result<OwnedSemaphorePermit, Status> {
        self.try_acquire_or(class, || RETRY_HINT)
    }

    /// [`Self::try_acquire`], the refusal's retry hint from `hint` (called only on refusal).
    pub fn try_acquire_or(
        &self,
        class: LatencyClass,
        hint: impl FnOnce() -> Duration,
    ) -> Result<OwnedSemaphorePermit, Status> {
        if let Ok(p) = self.shared.clone().try_acquire_owned() {
            return Ok(p);
        }
        match class {
            LatencyClass::Interactive => {
                self.interactive.clone().try_acquire_owned().map_err(|_| {
                    exhausted_after(
                        format!(
                            "gateway is at its limit of {} concurrent streams (--max-concurrency)",
                            self.max
                        ),
                        hint(),
                    )
                })
            }
            LatencyClass::Batch => Err(exhausted_after(
                format!(
                    "gateway is at its limit of {} concurrent BATCH streams ({} of \
                 --max-concurrency {} are kept for INTERACTIVE requests, \
                 --interactive-reserved-streams)",
                    self.max - self.reserved,
                    self.reserved,
                    self.max
                ),
                hint(),
            )),
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
