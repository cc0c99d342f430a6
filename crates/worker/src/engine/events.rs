//! A job's event channel (review H6): bounded by what the job can produce, so the engine thread
//! never waits on a slow consumer and never holds more than one job's worth of events for it.
//!
//! A job sends at most [`job_capacity`] events: one `Chat` (sent by the service before the job
//! is submitted), one `Delta` per sampled token (at most `max_tokens`; resumed tokens are not
//! sent again), one `Delta` flushing held-back text at the end, and one `Done` or `Failed`. The
//! channel holds exactly that many, so a consumer that reads nothing until the end still
//! receives every event, and the engine's `send` never waits: it only queues or finds the
//! consumer gone.
//!
//! Why not a smaller fixed bound that fails the job when full: a gateway relaying to a client
//! on a slow link reads the worker's stream at the client's pace, and would have its streams
//! failed for being slow although the client is still reading. How long an unread stream can
//! hold a slot is the gateway's business (`--stream-idle-timeout` lets a client that stops
//! reading go, which drops the worker stream and frees the slot at the engine's next step).
//! The memory is lazy: the channel allocates blocks of 32 events as they are queued, so
//! capacity costs nothing until used, and at most `max_tokens` (bounded by
//! `--max-tokens-limit`) events are ever buffered.
//!
//! If the bound were ever wrong (a send finding the channel full), the job is failed instead of
//! blocking the engine: the sender reports itself closed, so the engine frees the slot at its
//! next step as for a client that went away, and the consumer's stream ends with
//! [`EventReceiver::overflowed`] set, which the service turns into INTERNAL with a message
//! naming the cause.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use super::Event;

/// Events beyond one per generated token: `Chat`, the final flush `Delta`, `Done`/`Failed`.
pub const EXTRA_EVENTS: usize = 3;

/// The most events a job of `max_tokens` tokens can send (see the module docs).
pub fn job_capacity(max_tokens: u32) -> usize {
    (max_tokens as usize).saturating_add(EXTRA_EVENTS)
}

/// The engine's end: queues events without ever waiting.
#[derive(Clone, Debug)]
pub struct EventSender {
    tx: mpsc::Sender<Event>,
    overflowed: Arc<AtomicBool>,
}

/// The consumer's end (the service's response stream).
#[derive(Debug)]
pub struct EventReceiver {
    rx: mpsc::Receiver<Event>,
    overflowed: Arc<AtomicBool>,
    capacity: usize,
}

/// Why an event was not queued; the event comes back.
#[derive(Debug, thiserror::Error)]
pub enum EventSendError {
    #[error("the job's consumer is gone")]
    Closed(Event),
    #[error("the job's event channel is full")]
    Overflow(Event),
}

/// A channel for a job of `max_tokens` tokens, holding [`job_capacity`] events.
pub fn job_channel(max_tokens: u32) -> (EventSender, EventReceiver) {
    let capacity = job_capacity(max_tokens).min(tokio::sync::Semaphore::MAX_PERMITS);
    let (tx, rx) = mpsc::channel(capacity);
    let overflowed = Arc::new(AtomicBool::new(false));
    (
        EventSender {
            tx,
            overflowed: overflowed.clone(),
        },
        EventReceiver {
            rx,
            overflowed,
            capacity,
        },
    )
}

impl EventSender {
    /// Queues `event` at once. A full channel marks the job overflowed: the sender then reports
    /// itself closed (the engine drops the job) and the consumer learns why at the end.
    pub fn send(&self, event: Event) -> Result<(), EventSendError> {
        if self.overflowed.load(Ordering::Acquire) {
            return Err(EventSendError::Overflow(event));
        }
        match self.tx.try_send(event) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(e)) => Err(EventSendError::Closed(e)),
            Err(mpsc::error::TrySendError::Full(e)) => {
                self.overflowed.store(true, Ordering::Release);
                tracing::error!(
                    capacity = self.tx.max_capacity(),
                    "a job's event channel is full; failing the job (a bug in job_capacity)"
                );
                Err(EventSendError::Overflow(e))
            }
        }
    }

    /// The consumer is gone, or the job overflowed its channel: either way, stop the job.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed() || self.overflowed.load(Ordering::Acquire)
    }
}

impl EventReceiver {
    /// The next event; None once the engine has dropped the job and every event was read.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The job was failed because its channel was full (see the module docs).
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Events the channel holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}
