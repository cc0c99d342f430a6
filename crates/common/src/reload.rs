//! One way to follow files that change on disk: TLS certificates and keys, the gateway's API keys
//! file. A [`Reloading`] value is built from its files by the caller's function, and rebuilt when
//! a file's modification time, size or content hash changes. A rebuild that fails keeps the last
//! good value in force (logged, and retried when the files change again), so a half-written
//! rotation never takes a server down. The value is published through a tokio watch channel.
//!
//! Two ways to drive the checks, one per user today:
//! - on demand, [`Reloading::get`]: looks at the files at most once per interval, when asked (TLS,
//!   on the next handshake or connection);
//! - in the background, [`Reloading::spawn`]: a task looks every interval until cancelled (API
//!   keys, so a key removed from the file is refused even before the next request asks).

use std::fmt::Display;
use std::hash::{DefaultHasher, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What identifies a file's version: modification time, size and a hash of the content (None when
/// unreadable). The hash catches a rewrite of the same size within the clock's resolution.
pub type Stamp = Option<(SystemTime, u64, u64)>;

/// The stamps of `paths`, in order. Follows symlinks: Kubernetes swaps a `..data` link when a
/// Secret or ConfigMap changes.
pub fn stamps(paths: &[PathBuf]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            let bytes = std::fs::read(p).ok()?;
            let mut h = DefaultHasher::new();
            h.write(&bytes);
            Some((m.modified().ok()?, m.len(), h.finish()))
        })
        .collect()
}

/// A value and its generation, which goes up by one on every successful reload.
#[derive(Clone, Debug)]
pub struct Loaded<T> {
    pub generation: u64,
    pub value: T,
}

/// Builds the value from the files; gets the last good value on a reload (None the first time),
/// for callers that carry state across reloads.
pub type Build<T, E> = Box<dyn Fn(Option<&T>) -> Result<T, E> + Send + Sync>;

/// What happened on one look at the files.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    /// No file changed.
    Unchanged,
    /// A file changed and the new value is in force, with this generation.
    Reloaded(u64),
    /// A file changed but the build failed; the previous value stays (the message says why).
    Kept(String),
}

/// A value built from files and rebuilt when they change.
pub struct Reloading<T, E> {
    /// What the files are, for logs: "TLS files", "API keys file".
    what: &'static str,
    paths: Vec<PathBuf>,
    every: Duration,
    build: Build<T, E>,
    look: Mutex<Look>,
    tx: watch::Sender<Loaded<T>>,
}

struct Look {
    stamps: Vec<Stamp>,
    at: Instant,
}

impl<T, E> Reloading<T, E>
where
    T: Clone + Send + Sync + 'static,
    E: Display,
{
    /// Builds the value now (failing with the build's error) and remembers the files' stamps.
    pub fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        every: Duration,
        build: Build<T, E>,
    ) -> Result<Self, E> {
        let stamps = stamps(&paths);
        let value = build(None)?;
        let (tx, _) = watch::channel(Loaded {
            generation: 0,
            value,
        });
        Ok(Reloading {
            what,
            paths,
            every,
            build,
            look: Mutex::new(Look {
                stamps,
                at: Instant::now(),
            }),
            tx,
        })
    }

    /// The value in force and its generation, without looking at the files.
    pub fn current(&self) -> (u64, T) {
        let l = self.tx.borrow();
        (l.generation, l.value.clone())
    }

    /// Looks at the files first if the last look is at least one interval old, then returns the
    /// value in force.
    pub fn get(&self) -> (u64, T) {
        let due = {
            let mut look = self.look.lock().expect("reload lock");
            let due = look.at.elapsed() >= self.every;
            if due {
                look.at = Instant::now();
            }
            due
        };
        if due {
            self.check();
        }
        self.current()
    }

    /// Receives every new value.
    pub fn subscribe(&self) -> watch::Receiver<Loaded<T>> {
        self.tx.subscribe()
    }

    /// Looks at the files now and rebuilds the value if one changed.
    pub fn check(&self) -> Checked {
        let now = stamps(&self.paths);
        {
            let mut look = self.look.lock().expect("reload lock");
            if now == look.stamps {
                return Checked::Unchanged;
            }
            look.stamps = now;
        }
        match self.rebuild() {
            Ok(generation) => {
                tracing::info!(files = ?self.paths, generation, "{} changed: reloaded", self.what);
                Checked::Reloaded(generation)
            }
            Err(e) => {
                tracing::warn!(error = %e, files = ?self.paths,
                    "{} changed but cannot be used; keeping the previous value", self.what);
                Checked::Kept(e.to_string())
            }
        }
    }

    /// Rebuilds the value now whether or not the files changed; on success returns the new
    /// generation, on failure keeps the value in force.
    pub fn rebuild(&self) -> Result<u64, E> {
        let (_, last) = self.current();
        let value = (self.build)(Some(&last))?;
        let mut generation = 0;
        self.tx.send_modify(|l| {
            l.generation += 1;
            l.value = value;
            generation = l.generation;
        });
        Ok(generation)
    }

    /// Looks at the files every interval in a task, until `stop` is cancelled.
    pub fn spawn(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()>
    where
        E: Send + Sync + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; the files were just read
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                me.check();
            }
        })
    }
}

#[cfg(test)]
mod tests;
