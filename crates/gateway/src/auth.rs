//! API keys at the gateway: who may call, which models and latency classes each key may use, and
//! how many tokens a minute and streams at once. Checked at the start of
//! `GatewayService::start`, so gRPC and HTTP share it; the gRPC front also checks the key on the
//! headers before reading the body (`grpc`). The keys file is re-read when it changes.
//! Keys are compared by SHA-256 digest in constant time and never logged: logs name a key by its
//! `name=` or by `key-` and the first 8 hex digits of its digest.

mod keys;

pub use keys::{KeySpec, KeysError, parse_keys};

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_common::LatencyClass;
use moe_common::pb::GenerateRequest;
use moe_common::reload::{Build, Reloading};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

/// How often the keys file is checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Trailing metadata that tells a refused client when to retry, in milliseconds.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

pub type KeyDigest = [u8; 32];

pub fn digest(key: &str) -> KeyDigest {
    Sha256::digest(key.as_bytes()).into()
}

/// A name for logs that does not reveal the key: `key-` and 8 hex digits of its digest.
pub fn short_hash(d: &KeyDigest) -> String {
    let hex: String = d[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("key-{hex}")
}

/// The key in an `authorization: Bearer KEY` value (gRPC metadata or HTTP header).
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let v = authorization?.trim();
    let (scheme, key) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| key.trim())
        .filter(|k| !k.is_empty())
}

/// The bearer key of a gRPC request.
pub fn grpc_bearer(metadata: &MetadataMap) -> Option<&str> {
    bearer(metadata.get("authorization").and_then(|v| v.to_str().ok()))
}

/// A token bucket holding up to a minute's worth of tokens.
#[derive(Debug)]
pub struct Bucket {
    per_minute: u32,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    pub fn new(per_minute: u32, now: Instant) -> Self {
        Bucket {
            per_minute,
            tokens: per_minute as f64,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * self.per_minute as f64 / 60.0).min(self.per_minute as f64);
        self.refilled = now;
    }

    /// Takes `n` tokens, or says how long until there are enough.
    pub fn take(&mut self, n: u32, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            return Ok(());
        }
        let missing = n as f64 - self.tokens;
        Err(Duration::from_secs_f64(
            missing * 60.0 / self.per_minute as f64,
        ))
    }

    pub fn refund(&mut self, n: u32, now: Instant) {
        self.refill(now);
        self.tokens = (self.tokens + n as f64).min(self.per_minute as f64);
    }
}

/// One key's settings and its live counters (kept across reloads while its limits stay).
struct KeyState {
    spec: KeySpec,
    bucket: Option<Arc<Mutex<Bucket>>>,
    streams: Option<Arc<Semaphore>>,
}

impl KeyState {
    fn new(spec: KeySpec, previous: Option<&Arc<KeyState>>) -> Self {
        let keep_bucket = previous
            .filter(|p| p.spec.tokens_per_minute == spec.tokens_per_minute)
            .and_then(|p| p.bucket.clone());
        let keep_streams = previous
            .filter(|p| p.spec.max_concurrent == spec.max_concurrent)
            .and_then(|p| p.streams.clone());
        KeyState {
            bucket: keep_bucket.or_else(|| {
                spec.tokens_per_minute
                    .map(|n| Arc::new(Mutex::new(Bucket::new(n, Instant::now()))))
            }),
            streams: keep_streams.or_else(|| {
                spec.max_concurrent
                    .map(|n| Arc::new(Semaphore::new(n as usize)))
            }),
            spec,
        }
    }
}

/// The keys in force. Cheap to share; swapped whole on reload.
pub struct ApiKeys {
    table: Arc<Reloading<Table, KeysError>>,
}

type Table = Arc<Vec<Arc<KeyState>>>;

/// Reads and parses the keys file; a key whose limits did not change keeps its live counters
/// from `last`, the table in force.
fn load_table(path: &Path, last: Option<&Table>) -> Result<Table, KeysError> {
    let text = std::fs::read_to_string(path).map_err(|e| KeysError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let specs = parse_keys(&text)?;
    let by_digest: HashMap<KeyDigest, &Arc<KeyState>> = last
        .map(|t| t.iter().map(|k| (k.spec.digest, k)).collect())
        .unwrap_or_default();
    Ok(Arc::new(
        specs
            .into_iter()
            .map(|spec| {
                let prev = by_digest.get(&spec.digest).copied();
                Arc::new(KeyState::new(spec, prev))
            })
            .collect(),
    ))
}

/// What an admitted request holds until it ends: its stream slot, and the tokens charged at
/// admission, of which those not generated are refunded on drop.
pub struct Grant {
    pub key_name: String,
    charged: u32,
    generated: AtomicU32,
    bucket: Option<Arc<Mutex<Bucket>>>,
    _stream: Option<OwnedSemaphorePermit>,
}

impl Grant {
    /// Counts generated tokens (the refund is what was charged minus these).
    pub fn generated(&self, tokens: usize) {
        self.generated
            .fetch_add(tokens.min(u32::MAX as usize) as u32, Ordering::Relaxed);
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        let unused = self
            .charged
            .saturating_sub(self.generated.load(Ordering::Relaxed));
        if let (Some(b), true) = (&self.bucket, unused > 0) {
            b.lock()
                .expect("bucket lock")
                .refund(unused, Instant::now());
        }
    }
}

/// Why [`ApiKeys::admit`] refused a request; mapped to a gRPC status in one place
/// (`From<AuthError> for Status`), and from there to HTTP by the HTTP front end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No key, or not one of ours: UNAUTHENTICATED.
    #[error("{0}")]
    Unauthenticated(String),
    /// The key may not use this model or class: PERMISSION_DENIED.
    #[error("{0}")]
    Forbidden(String),
    /// The request can never fit the key's allowance: INVALID_ARGUMENT.
    #[error("{0}")]
    TooLarge(String),
    /// Over a limit for now: RESOURCE_EXHAUSTED with `retry-after-ms` metadata.
    #[error("{message}; retry-after {} s", retry_after.as_millis().max(1).div_ceil(1000))]
    RetryLater {
        message: String,
        retry_after: Duration,
    },
}

impl AuthError {
    pub fn code(&self) -> tonic::Code {
        match self {
            AuthError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            AuthError::Forbidden(_) => tonic::Code::PermissionDenied,
            AuthError::TooLarge(_) => tonic::Code::InvalidArgument,
            AuthError::RetryLater { .. } => tonic::Code::ResourceExhausted,
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        let mut md = MetadataMap::new();
        if let AuthError::RetryLater { retry_after, .. } = &e {
            let ms = retry_after.as_millis().max(1);
            md.insert(RETRY_AFTER_MS, MetadataValue::from(ms as u64));
        }
        Status::with_metadata(e.code(), e.to_string(), md)
    }
}

fn retry_later(message: String, retry_after: Duration) -> AuthError {
    AuthError::RetryLater {
        message,
        retry_after,
    }
}

impl ApiKeys {
    /// Reads the keys file (failing on any error in it) and re-reads it every
    /// [`RELOAD_INTERVAL`] while it changes, until `stop` is cancelled. A file that no longer
    /// parses keeps the previous keys in force.
    pub fn start(path: &Path, stop: CancellationToken) -> Result<Arc<ApiKeys>, KeysError> {
        let keys = Arc::new(ApiKeys::load(path)?);
        keys.table.spawn(stop);
        Ok(keys)
    }

    pub fn load(path: &Path) -> Result<ApiKeys, KeysError> {
        let file = path.to_path_buf();
        let build: Build<Table, KeysError> = Box::new(move |last| load_table(&file, last));
        let table = Reloading::new(
            "API keys file",
            vec![path.to_path_buf()],
            RELOAD_INTERVAL,
            build,
        )?;
        let keys = ApiKeys {
            table: Arc::new(table),
        };
        tracing::info!(path = %path.display(), keys = keys.table().len(), "API keys loaded");
        Ok(keys)
    }

    /// Re-reads the file and swaps the table; returns the number of keys.
    pub fn reload(&self) -> Result<usize, KeysError> {
        self.table.rebuild()?;
        Ok(self.table().len())
    }

    fn table(&self) -> Table {
        self.table.current().1
    }

    /// Checks only that `key` is one of ours: what a front end runs on the headers, before it
    /// reads the body (the gRPC interceptor). [`ApiKeys::admit`] checks it again with the rest.
    pub fn authenticate(&self, key: Option<&str>) -> Result<(), AuthError> {
        self.find(key).map(drop)
    }

    /// The key's entry, compared in constant time; UNAUTHENTICATED when missing or unknown.
    fn find(&self, key: Option<&str>) -> Result<Arc<KeyState>, AuthError> {
        let Some(key) = key else {
            return Err(AuthError::Unauthenticated(
                "missing API key: send `authorization: Bearer <key>`".into(),
            ));
        };
        let presented = digest(key);
        let table = self.table();
        // Every entry is compared, each in constant time: no early exit on a match.
        let mut found: Option<&Arc<KeyState>> = None;
        for k in table.iter() {
            let same: bool = k.spec.digest.ct_eq(&presented).into();
            if same {
                found = Some(k);
            }
        }
        let Some(k) = found else {
            tracing::info!(key = %short_hash(&presented), "refused: unknown API key");
            return Err(AuthError::Unauthenticated("invalid API key".into()));
        };
        Ok(k.clone())
    }

    /// Authenticates `key`, checks the request's model and class against the key's allowances,
    /// then charges its max_tokens and takes a stream slot. UNAUTHENTICATED, PERMISSION_DENIED
    /// or RESOURCE_EXHAUSTED (with `retry-after-ms` metadata) otherwise.
    pub fn admit(&self, key: Option<&str>, req: &GenerateRequest) -> Result<Grant, AuthError> {
        let k = self.find(key)?;
        let spec = &k.spec;
        if let Some(models) = &spec.models {
            if req.model.is_empty() {
                return Err(AuthError::Forbidden(format!(
                    "API key {} may use only models {models:?}: name one in `model`",
                    spec.name
                )));
            }
            if !models.iter().any(|m| m == &req.model) {
                tracing::info!(key = %spec.name, "refused: model not allowed");
                return Err(AuthError::Forbidden(format!(
                    "API key {} may not use model {:?}",
                    spec.name, req.model
                )));
            }
        }
        let class = LatencyClass::try_from(req.latency_class).unwrap_or_default();
        if let Some(classes) = &spec.classes
            && !classes.contains(&class)
        {
            tracing::info!(key = %spec.name, "refused: latency class not allowed");
            return Err(AuthError::Forbidden(format!(
                "API key {} may not use latency class {}",
                spec.name,
                class.as_str()
            )));
        }
        let stream = match &k.streams {
            Some(s) => Some(s.clone().try_acquire_owned().map_err(|_| {
                retry_later(
                    format!(
                        "API key {} already has {} streams running, its limit",
                        spec.name,
                        spec.max_concurrent.unwrap_or_default()
                    ),
                    Duration::from_secs(1),
                )
            })?),
            None => None,
        };
        let charged = req.max_tokens;
        if let (Some(b), Some(per_minute)) = (&k.bucket, spec.tokens_per_minute) {
            if charged > per_minute {
                return Err(AuthError::TooLarge(format!(
                    "max_tokens {charged} is more than API key {} may use in a minute ({per_minute})",
                    spec.name
                )));
            }
            let taken = b.lock().expect("bucket lock").take(charged, Instant::now());
            if let Err(wait) = taken {
                tracing::info!(key = %spec.name, "refused: over the token rate");
                return Err(retry_later(
                    format!(
                        "API key {} is over its limit of {per_minute} tokens a minute",
                        spec.name
                    ),
                    wait,
                ));
            }
        }
        Ok(Grant {
            key_name: spec.name.clone(),
            charged: if k.bucket.is_some() { charged } else { 0 },
            generated: AtomicU32::new(0),
            bucket: k.bucket.clone(),
            _stream: stream,
        })
    }
}

#[cfg(test)]
mod tests;
