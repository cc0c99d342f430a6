//! Upstream llama-server: `POST /completion` with `"stream": true`, read as server-sent events
//! (`data: {json}` lines, one per generated token, the last with `"stop": true`).

use std::net::SocketAddr;

use futures::StreamExt;
use serde::Deserialize;

use super::{BenchError, RequestSpec, Sample, StreamClock};

#[derive(Clone, Debug)]
pub struct LlamaServerClient {
    http: reqwest::Client,
    url: String,
}

/// The fields of one streamed chunk that matter here.
#[derive(Debug, Default, Deserialize)]
struct Chunk {
    #[serde(default)]
    content: String,
    /// Token ids of the chunk (asked for with `return_tokens`).
    #[serde(default)]
    tokens: Vec<i64>,
    #[serde(default)]
    stop: bool,
    #[serde(default)]
    tokens_predicted: Option<u32>,
    #[serde(default)]
    tokens_evaluated: Option<u32>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

impl LlamaServerClient {
    pub fn new(addr: SocketAddr) -> Result<Self, BenchError> {
        // No connection reuse: llama-server (cpp-httplib) closes kept-alive connections after a
        // few requests or seconds, and a request sent on such a connection fails before it reaches
        // the server. A fresh loopback connection per request costs well under a millisecond.
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| BenchError::Connect(e.to_string()))?;
        Ok(LlamaServerClient {
            http,
            url: format!("http://{addr}/completion"),
        })
    }

    pub(super) async fn generate(
        &self,
        spec: &RequestSpec,
        mut clock: StreamClock,
    ) -> Result<Sample, BenchError> {
        let body = serde_json::json!({
            "prompt": spec.prompt,
            "n_predict": spec.max_tokens,
            "stream": true,
            "cache_prompt": false,
            "temperature": 0.0,
            "return_tokens": true,
        });
        clock.restart();
        let response = self
            .http
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| BenchError::Http(e.to_string()))?;
        if !response.status().is_success() {
            let code = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(BenchError::Http(format!(
                "{code}: {}",
                text.chars().take(200).collect::<String>()
            )));
        }
        let mut body = response.bytes_stream();
        let mut buf = Vec::<u8>::new();
        while let Some(bytes) = body.next().await {
            buf.extend_from_slice(&bytes.map_err(|e| BenchError::Http(e.to_string()))?);
            while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Some(chunk) = parse_line(&line)? else {
                    continue;
                };
                if let Some(err) = chunk.error {
                    return Err(BenchError::Http(format!("server error: {err}")));
                }
                // One chunk per token; a chunk can hold more (or, for an incomplete UTF-8
                // character, text of several tokens) — token ids say exactly.
                let n = if chunk.tokens.is_empty() {
                    u32::from(!chunk.content.is_empty())
                } else {
                    chunk.tokens.len() as u32
                };
                clock.tokens(n);
                if chunk.stop {
                    return clock.finish(chunk.tokens_predicted, chunk.tokens_evaluated);
                }
            }
        }
        Err(BenchError::Protocol(
            "event stream ended without a stop chunk".into(),
        ))
    }
}

/// `data: {...}` → the chunk; blank lines, comments and other fields → None.
fn parse_line(line: &[u8]) -> Result<Option<Chunk>, BenchError> {
    let line = std::str::from_utf8(line)
        .map_err(|e| BenchError::Protocol(e.to_string()))?
        .trim();
    let Some(data) = line.strip_prefix("data:") else {
        if let Some(err) = line.strip_prefix("error:") {
            return Err(BenchError::Http(format!("server error: {}", err.trim())));
        }
        return Ok(None);
    };
    let data = data.trim();
    if data.is_empty() || data == "[DONE]" {
        return Ok(None);
    }
    serde_json::from_str(data)
        .map(Some)
        .map_err(|e| BenchError::Protocol(format!("bad chunk {data:.120}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_token_and_final_chunks() {
        let c = parse_line(br#"data: {"content":" Paris","tokens":[12],"stop":false}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.content.as_str(), c.tokens.len(), c.stop),
            (" Paris", 1, false)
        );
        let f = parse_line(
            br#"data: {"content":"","stop":true,"tokens_predicted":64,"tokens_evaluated":130}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (f.stop, f.tokens_predicted, f.tokens_evaluated),
            (true, Some(64), Some(130))
        );
        assert!(parse_line(b"\n").unwrap().is_none());
        assert!(parse_line(br#"error: {"code":500}"#).is_err());
    }
}
