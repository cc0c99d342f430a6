//! The HTTP API while the gateway drains (issue 16). `axum::serve`'s graceful shutdown stops
//! accepting and closes every connection that has no request in flight: a request already in
//! the accept backlog, or sent on an idle keep-alive connection, in the same instant as SIGTERM
//! was then closed with its bytes unread — a TCP reset, no status. So for a short window
//! ([`DRAIN_ACCEPT_WINDOW`]) the server keeps accepting and reading, and [`gate`] answers every
//! request that arrives after the drain began with 503 `draining` (`Retry-After: 1`,
//! `Connection: close`), having read its body so that closing the connection resets nothing.
//! Requests that arrived before it run to the end; their answers carry `Connection: close` too.
//! After the window the server stops accepting, closes idle connections and waits for the rest
//! (bounded by `--drain-grace` in `crate::run`).

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, Version, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{ApiError, MAX_BODY_BYTES};

/// How long the HTTP listener keeps accepting (and answering 503) once the drain began; capped
/// by `--drain-grace`. Long enough for requests already on the wire at SIGTERM; a load balancer
/// should have dropped the gateway before (the chart's preStop sleep).
pub const DRAIN_ACCEPT_WINDOW: Duration = Duration::from_secs(1);

/// Longest the refusal of a request waits for the request's body to arrive (and be discarded).
const DISCARD_TIMEOUT: Duration = Duration::from_secs(1);

/// The middleware over every route: refuses requests that arrive while `shutdown` is cancelled
/// (`/health` excepted: it answers 503 `draining` itself), and asks HTTP/1 clients to close the
/// connection after any answer given during the drain.
pub async fn gate(State(shutdown): State<CancellationToken>, req: Request, next: Next) -> Response {
    let http1 = req.version() < Version::HTTP_2;
    let mut response = if shutdown.is_cancelled() && req.uri().path() != "/health" {
        refuse(req).await
    } else {
        next.run(req).await
    };
    if http1 && shutdown.is_cancelled() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// 503 `draining`: nothing was started for the request, so a client can retry it elsewhere.
pub fn draining() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        message: "the gateway is draining (shutting down) and takes no new requests; \
                  retry on another gateway"
            .into(),
        param: None,
        code: Some("draining"),
        retry_after: None,
    }
}

async fn refuse(req: Request) -> Response {
    tracing::debug!(method = %req.method(), path = %req.uri().path(), "draining: refused a request");
    // A body left unread when the connection closes makes the kernel reset it, and a reset can
    // destroy the answer before the client reads it. Read (and drop) what comes, bounded in
    // bytes and time; a client waiting for `100 Continue` sends nothing, so do not ask.
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !expects_continue {
        let mut body = req.into_body().into_data_stream();
        let discard = async {
            let mut seen = 0usize;
            while let Some(Ok(chunk)) = body.next().await {
                seen += chunk.len();
                if seen > MAX_BODY_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DISCARD_TIMEOUT, discard).await;
    }
    draining().into_response()
}
