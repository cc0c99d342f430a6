//! One streaming request against either protocol, timed on the client: the time to the first
//! generated token, the time between the first and the last token, and the token counts.

mod grpc;
mod llama_server;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::target::Target;
use moe_common::LatencyClass;

/// What one request asks for.
#[derive(Clone, Debug)]
pub struct RequestSpec {
    pub prompt: String,
    pub max_tokens: u32,
    pub class: LatencyClass,
    /// Incremented while this request streams (from its first token to its end): lets the
    /// background load say how many of its streams are really decoding.
    pub streaming: Option<Arc<AtomicU32>>,
    /// Incremented by every generated token as it arrives, whether or not the request then
    /// completes: lets the background load count the tokens of the streams it cancels.
    pub received: Option<Arc<AtomicU64>>,
}

/// What one successful request measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// When the request went out (for per-request timings relative to the level's start).
    pub sent: tokio::time::Instant,
    /// Request sent → first generated token received.
    pub ttft: Duration,
    /// First → last generated token received.
    pub decode: Duration,
    pub completion_tokens: u32,
    /// As counted by the server, where it says.
    pub prompt_tokens: Option<u32>,
}

impl Sample {
    /// Tokens per second after the first one; None for a single token.
    pub fn decode_tokens_per_second(&self) -> Option<f64> {
        let secs = self.decode.as_secs_f64();
        (self.completion_tokens > 1 && secs > 0.0)
            .then(|| f64::from(self.completion_tokens - 1) / secs)
    }
}

/// Why a request failed; `kind()` is the bounded label used in reports.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("connecting: {0}")]
    Connect(String),
    #[error("gRPC status {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("request took longer than {0:?}")]
    Timeout(Duration),
    #[error("stream ended without generating a token")]
    NoTokens,
}

/// The longest message kept in an error's [`BenchError::detail`].
const DETAIL_CHARS: usize = 160;

impl BenchError {
    /// `kind()` and a short message, e.g. `grpc_resourceexhausted: gateway is reading as many
    /// requests as BATCH may at once (…)`: the bounded label plus what the server said, for
    /// counting errors per distinct cause. Messages longer than [`DETAIL_CHARS`] are cut (…).
    pub fn detail(&self) -> String {
        let text = match self {
            BenchError::Status { message, .. } if message.trim().is_empty() => {
                return self.kind();
            }
            BenchError::Status { message, .. } => message.trim().to_string(),
            other => other.to_string(),
        };
        // One line: messages may carry newlines.
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let short = match text.char_indices().nth(DETAIL_CHARS) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text,
        };
        format!("{}: {short}", self.kind())
    }

    pub fn kind(&self) -> String {
        match self {
            BenchError::Connect(_) => "connect".into(),
            BenchError::Status { code, .. } => format!("grpc_{code:?}").to_lowercase(),
            BenchError::Http(_) => "http".into(),
            BenchError::Protocol(_) => "protocol".into(),
            BenchError::Timeout(_) => "timeout".into(),
            BenchError::NoTokens => "no_tokens".into(),
        }
    }
}

/// A connected client for the target; cheap to clone (one shared connection pool).
#[derive(Clone, Debug)]
pub enum Client {
    Grpc(grpc::GrpcClient),
    LlamaServer(llama_server::LlamaServerClient),
}

impl Client {
    pub async fn connect(target: &Target) -> Result<Client, BenchError> {
        match target {
            Target::Grpc { addr } => Ok(Client::Grpc(grpc::GrpcClient::connect(*addr).await?)),
            Target::LlamaServer { addr } => Ok(Client::LlamaServer(
                llama_server::LlamaServerClient::new(*addr)?,
            )),
        }
    }

    /// Sends one request and reads its stream to the end, within `timeout`.
    pub async fn generate(
        &self,
        spec: &RequestSpec,
        timeout: Duration,
    ) -> Result<Sample, BenchError> {
        let run = async {
            match self {
                Client::Grpc(c) => c.generate(spec, StreamClock::start(spec)).await,
                Client::LlamaServer(c) => c.generate(spec, StreamClock::start(spec)).await,
            }
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| BenchError::Timeout(timeout))?
    }
}

/// Client-side clock of one stream.
#[derive(Debug)]
struct StreamClock {
    sent: tokio::time::Instant,
    first: Option<tokio::time::Instant>,
    last: Option<tokio::time::Instant>,
    tokens: u32,
    streaming: Option<Arc<AtomicU32>>,
    received: Option<Arc<AtomicU64>>,
}

impl StreamClock {
    fn start(spec: &RequestSpec) -> Self {
        StreamClock {
            sent: tokio::time::Instant::now(),
            first: None,
            last: None,
            tokens: 0,
            streaming: spec.streaming.clone(),
            received: spec.received.clone(),
        }
    }

    /// Restarts the clock just before the request goes out.
    fn restart(&mut self) {
        self.sent = tokio::time::Instant::now();
    }

    fn tokens(&mut self, n: u32) {
        if n == 0 {
            return;
        }
        let now = tokio::time::Instant::now();
        if self.first.is_none() {
            self.first = Some(now);
            if let Some(c) = &self.streaming {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.last = Some(now);
        self.tokens += n;
        if let Some(c) = &self.received {
            c.fetch_add(u64::from(n), Ordering::Relaxed);
        }
    }

    /// `server_tokens` (the server's completion count) wins over the client's count.
    fn finish(
        &self,
        server_tokens: Option<u32>,
        prompt_tokens: Option<u32>,
    ) -> Result<Sample, BenchError> {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return Err(BenchError::NoTokens);
        };
        Ok(Sample {
            sent: self.sent,
            ttft: first - self.sent,
            decode: last - first,
            completion_tokens: server_tokens.filter(|&n| n > 0).unwrap_or(self.tokens),
            prompt_tokens,
        })
    }
}

impl Drop for StreamClock {
    fn drop(&mut self) {
        if let (Some(c), Some(_)) = (&self.streaming, self.first) {
            c.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_details_are_the_kind_and_a_short_one_line_message() {
        let status = |code, message: &str| BenchError::Status {
            code,
            message: message.into(),
        };
        assert_eq!(
            status(
                tonic::Code::ResourceExhausted,
                "  queue full;\n retry-after 1 s "
            )
            .detail(),
            "grpc_resourceexhausted: queue full; retry-after 1 s"
        );
        assert_eq!(
            status(tonic::Code::Unavailable, "").detail(),
            "grpc_unavailable"
        );
        let long = status(tonic::Code::Internal, &"é".repeat(500)).detail();
        assert_eq!(
            long,
            format!("grpc_internal: {}…", "é".repeat(DETAIL_CHARS))
        );
        assert_eq!(
            BenchError::Timeout(Duration::from_secs(150)).detail(),
            "timeout: request took longer than 150s"
        );
        assert_eq!(
            BenchError::NoTokens.detail(),
            "no_tokens: stream ended without generating a token"
        );
    }
}
