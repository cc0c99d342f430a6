//! The gateway's gRPC front (`moe_gateway::grpc::router`) on 127.0.0.1: API keys are checked on
//! the headers before any of the body is read (review H1), `Generate` requests being read at once
//! are bounded and the excess is refused at once, and health answers while that bound is
//! saturated (M7), and a request whose body does not arrive in time is refused. Raw gRPC calls
//! whose bodies never finish stand in for slow or hostile clients. The same for the OpenAI HTTP
//! API (raw HTTP/1.1 over TCP): 401 on the head, 408 for a slow upload, 429 when the body
//! budget is spent, health answering throughout; and gRPC health NOT_SERVING until the registry
//! has been listed. A request gives its decoding place back once its body is decoded, so BATCH
//! requests whose prompt sizing (a fake worker's slow `Tokenize`) is slow are not refused, and
//! the limit's refusals are counted by reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_common::registry::ClusterSnapshot;
use moe_common::request::RequestLimits;
use moe_gateway::RoutingState;
use moe_gateway::auth::ApiKeys;
use moe_gateway::grpc::{GrpcLimits, router};
use moe_gateway::http::{Intake, IntakeLimits};
use moe_gateway::proxy::{GatewayService, ProxyConfig};
use moe_gateway::scheduler::Policy;
use tokio_stream::StreamExt;
use tokio_util::bytes::BufMut;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

// The fake worker of tests/drive.rs; this file uses only part of it.
#[allow(dead_code)]
mod fake_worker;

const KEY: &str = "k-0123456789abcdef";

/// Raw bytes as gRPC messages (whatever the method), responses ignored.
#[derive(Clone, Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = ();
    type Error = Status;
    fn decode(&mut self, _: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        Ok(Some(()))
    }
}

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// A gateway front on 127.0.0.1:0 with health; stops when the token is dropped.
/// A gateway service over an empty cluster (no workers), and the sender that keeps its
/// snapshot channel open.
fn empty_service() -> (
    tokio::sync::watch::Sender<Arc<ClusterSnapshot>>,
    GatewayService,
) {
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(ClusterSnapshot::default()));
    let routing = Arc::new(RoutingState::new(rx, Policy::default()));
    let service = GatewayService::new(
        routing,
        ProxyConfig {
            max_streams: 16,
            request_timeout: Duration::from_secs(10),
            max_attempts: 3,
            stream_idle_timeout: Duration::from_secs(30),
            first_message_timeout: Duration::from_secs(30),
            limits: RequestLimits::default(),
        },
    );
    (tx, service)
}

async fn front(
    limits: GrpcLimits,
    keys: Option<Arc<ApiKeys>>,
) -> (Channel, tokio_util::sync::DropGuard) {
    let (_tx, service) = empty_service();
    let service = service.with_api_keys(keys.clone());
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    serve(router(&limits, service, keys).add_service(health), _tx).await
}

/// Serves `server` on a loopback port, keeping `keep` alive with it, until the returned guard
/// drops; a channel connected to it.
async fn serve(
    server: tonic::transport::server::Router,
    keep: impl Send + 'static,
) -> (Channel, tokio_util::sync::DropGuard) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _keep = keep;
        server
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                s.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, stop.drop_guard())
}

fn limits(max_decoding: usize) -> GrpcLimits {
    GrpcLimits {
        max_decoding,
        interactive_reserved_decoding: 0,
        read_timeout: Duration::from_secs(30),
        max_message_bytes: 4 << 20,
        max_concurrent_streams: 64,
        keepalive_interval: Duration::from_secs(20),
        keepalive_timeout: Duration::from_secs(10),
    }
}

/// Calls Generate with `body` as the request stream and `key` as the bearer key.
async fn call(
    channel: Channel,
    key: Option<&str>,
    body: impl futures::Stream<Item = Vec<u8>> + Send + 'static,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(e.to_string()))?;
    let mut req = tonic::Request::new(body);
    if let Some(k) = key {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    grpc.streaming(
        req,
        PathAndQuery::from_static("/moe.v1.Inference/Generate"),
        Raw,
    )
    .await
    .map(drop)
}

/// A body that sends `chunks` frames of 64 KiB, then nothing more, never ending.
fn endless(chunks: usize) -> impl futures::Stream<Item = Vec<u8>> + Send + 'static {
    futures::stream::iter((0..chunks).map(|_| vec![0x0a; 64 << 10]))
        .chain(futures::stream::pending())
}

#[tokio::test]
async fn unauthenticated_client_streaming_a_large_body_is_refused_before_it_is_read() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{KEY}\n")).unwrap();
    let keys = Arc::new(ApiKeys::load(file.path()).unwrap());
    let (channel, _stop) = front(limits(4), Some(keys)).await;
    for key in [None, Some("not-a-key-of-this-gateway")] {
        let t = Instant::now();
        // 64 MiB offered, far beyond the message limit: never read, so never refused for size.
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            call(channel.clone(), key, endless(1024)),
        )
        .await
        .expect("refused without waiting for the body");
        let err = r.expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
}

#[tokio::test]
async fn health_answers_while_the_decoding_limit_is_saturated() {
    let (channel, _stop) = front(limits(2), None).await;
    // Requests whose bodies never come hold the decoding permits; once both are taken, the
    // next request is refused at once rather than queued.
    let mut held = Vec::new();
    let refused = loop {
        assert!(held.len() <= 2, "more requests admitted than the limit");
        let mut c = Box::pin(call(channel.clone(), None, endless(0)));
        match tokio::time::timeout(Duration::from_millis(500), &mut c).await {
            Ok(r) => break r.expect_err("refused"),
            Err(_) => held.push(tokio::spawn(c)),
        }
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(held.len(), 2);
    let t = Instant::now();
    let health = tokio::time::timeout(
        Duration::from_secs(2),
        HealthClient::new(channel.clone()).check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("health answers while the limit is saturated")
    .expect("health ok");
    assert_eq!(health.into_inner().status, ServingStatus::Serving as i32);
    assert!(t.elapsed() < Duration::from_secs(1));
    for h in &held {
        assert!(!h.is_finished(), "the held requests are still being read");
    }
}

#[tokio::test]
async fn a_request_whose_body_does_not_arrive_is_refused_and_frees_its_place() {
    let limits = GrpcLimits {
        read_timeout: Duration::from_millis(300),
        ..limits(1)
    };
    let (channel, _stop) = front(limits, None).await;
    for _ in 0..2 {
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            call(channel.clone(), None, endless(0)),
        )
        .await
        .expect("refused, not held");
        let err = r.expect_err("refused");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
}

// ---- The HTTP API's intake (`moe_gateway::http::intake`) and the gRPC health gate. ----

/// The OpenAI HTTP API of a gateway with an empty cluster on 127.0.0.1:0.
async fn http_front(
    limits: IntakeLimits,
    keys: Option<Arc<ApiKeys>>,
) -> (std::net::SocketAddr, tokio_util::sync::DropGuard) {
    let (tx, service) = empty_service();
    let service = service.with_api_keys(keys.clone());
    let app =
        moe_gateway::http::router(service, CancellationToken::new(), Intake::new(limits, keys));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let _keep = tx;
        axum::serve(listener, app)
            .with_graceful_shutdown(s.cancelled_owned())
            .await
            .unwrap();
    });
    (addr, stop.drop_guard())
}

/// Opens a connection and sends a request head (and `body`, which may be partial).
async fn send(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    s.write_all(body).await.unwrap();
    s
}

/// `POST path` with `headers` (each `Name: value`) and a declared Content-Length.
fn post_head(path: &str, content_length: Option<usize>, headers: &[&str]) -> String {
    let mut h = format!("POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n");
    match content_length {
        Some(n) => h.push_str(&format!("Content-Length: {n}\r\n")),
        None => h.push_str("Transfer-Encoding: chunked\r\n"),
    }
    for line in headers {
        h.push_str(line);
        h.push_str("\r\n");
    }
    h
}

/// Reads one response: its status code and body (`Content-Length` framed).
async fn response(s: &mut tokio::net::TcpStream) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
    (status, body)
}

/// `GET /health` on a new connection, answered within a second.
async fn health_answers(addr: std::net::SocketAddr) -> String {
    let t = Instant::now();
    let mut s = send(addr, "GET /health HTTP/1.1\r\nHost: gw\r\n", b"").await;
    let (_, body) = tokio::time::timeout(Duration::from_secs(1), response(&mut s))
        .await
        .expect("health answers within a second");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(body.contains("\"status\""), "{body}");
    body
}

fn http_limits(max_body_bytes: usize, max_bytes_in_flight: usize, read: Duration) -> IntakeLimits {
    IntakeLimits {
        max_body_bytes,
        max_bytes_in_flight,
        interactive_reserved_bytes: 0,
        read_timeout: read,
    }
}

#[tokio::test]
async fn http_unauthenticated_request_is_refused_before_its_body_is_read() {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{KEY}\n")).unwrap();
    let keys = Arc::new(ApiKeys::load(file.path()).unwrap());
    // A minute to read a body: only a refusal on the head answers within two seconds.
    let limits = http_limits(8 << 20, 8 << 20, Duration::from_secs(60));
    let (addr, _stop) = http_front(limits, Some(keys)).await;
    for auth in [
        None,
        Some("Authorization: Bearer not-a-key-of-this-gateway"),
    ] {
        for length in [Some(8 << 20), None] {
            let t = Instant::now();
            let head = post_head("/v1/chat/completions", length, auth.as_slice());
            // The head only: the 8 MiB (or chunked) body never comes.
            let mut s = send(addr, &head, b"").await;
            let (status, body) = tokio::time::timeout(Duration::from_secs(5), response(&mut s))
                .await
                .expect("refused without waiting for the body");
            assert_eq!(status, 401, "{body}");
            assert!(body.contains("authentication_error"), "{body}");
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        }
    }
    // The right key passes the head check; then the body is read and parsed as before.
    let auth = format!("Authorization: Bearer {KEY}");
    let body = br#"{"messages":[{"role":"user","content":"hi"}],"junk":1}"#;
    let head = post_head("/v1/chat/completions", Some(body.len()), &[&auth]);
    let mut s = send(addr, &head, body).await;
    let (status, text) = response(&mut s).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("junk"), "the unknown field is named: {text}");
}

#[tokio::test]
async fn http_slow_upload_gets_408_after_the_read_timeout_while_health_answers() {
    let limits = http_limits(1 << 20, 8 << 20, Duration::from_millis(800));
    let (addr, _stop) = http_front(limits, None).await;
    let t = Instant::now();
    // 10 of 100 declared bytes, then nothing.
    let head = post_head("/v1/completions", Some(100), &[]);
    let mut slow = send(addr, &head, br#"{"prompt":"#).await;
    let reply = tokio::spawn(async move { response(&mut slow).await });
    for _ in 0..3 {
        health_answers(addr).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!reply.is_finished(), "the upload is still being waited for");
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), reply)
        .await
        .expect("the slow upload is answered")
        .unwrap();
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("request_timeout"), "{body}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn http_request_bytes_in_flight_are_bounded_and_the_excess_is_refused_at_once() {
    // Room for two bodies of the largest size; a chunked body reserves that size.
    let limits = http_limits(64 << 10, 128 << 10, Duration::from_secs(2));
    let (addr, _stop) = http_front(limits, None).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let head = post_head("/v1/completions", None, &[]);
        let mut s = send(addr, &head, b"5\r\n{\"pro\r\n").await;
        held.push(tokio::spawn(async move { response(&mut s).await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let head = post_head("/v1/completions", Some(20), &[]);
    let mut s = send(addr, &head, b"").await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(1), response(&mut s))
        .await
        .expect("refused at once");
    assert_eq!(status, 429, "{body}");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    health_answers(addr).await;
    // A body larger than allowed is refused on its declared length, unread.
    let head = post_head("/v1/completions", Some(65 << 10), &[]);
    let mut s = send(addr, &head, b"").await;
    assert_eq!(response(&mut s).await.0, 413);
    // The held uploads time out and free their bytes: a whole request then gets through the
    // intake to the service (no workers: 503).
    for h in held {
        let (status, _) = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("held upload answered")
            .unwrap();
        assert_eq!(status, 408);
    }
    let body = br#"{"prompt":"hi","max_tokens":4}"#;
    let head = post_head("/v1/completions", Some(body.len()), &[]);
    let mut s = send(addr, &head, body).await;
    let (status, text) = response(&mut s).await;
    assert_eq!(status, 503, "{text}");
}

#[tokio::test]
async fn grpc_health_is_not_serving_until_the_registry_is_listed() {
    const SERVICE: &str = "moe.v1.Inference";
    async fn status(addr: std::net::SocketAddr) -> i32 {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = HealthClient::new(channel);
        c.check(HealthCheckRequest {
            service: SERVICE.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
    }
    for drained_first in [false, true] {
        let (reporter, health) = tonic_health::server::health_reporter();
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(ClusterSnapshot::default()));
        let stop = CancellationToken::new();
        let gate = tokio::spawn(moe_gateway::grpc::serve_once_synced(
            reporter,
            rx,
            stop.clone(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_stop = CancellationToken::new();
        let _guard = server_stop.clone().drop_guard();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    server_stop.cancelled_owned(),
                ),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(status(addr).await, ServingStatus::NotServing as i32);
        if drained_first {
            stop.cancel();
        }
        tx.send_replace(Arc::new(ClusterSnapshot {
            revision: 7,
            ..ClusterSnapshot::default()
        }));
        tokio::time::timeout(Duration::from_secs(2), gate)
            .await
            .expect("the gate ends")
            .unwrap();
        let want = if drained_first {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        };
        assert_eq!(
            status(addr).await,
            want as i32,
            "drained first: {drained_first}"
        );
    }
}

// ---- The HTTP API while the gateway drains (issue 16: a request that reached a gateway in the
// same instant as its SIGTERM got a TCP reset and no status). ----

/// `moe_gateway::http::serve_http` (as `run` starts it) with an empty cluster on 127.0.0.1:0;
/// cancelling the token starts the drain, with `accept_window` before the listener closes.
async fn http_serve(
    accept_window: Duration,
) -> (
    std::net::SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (tx, service) = empty_service();
    let intake = Intake::new(http_limits(1 << 20, 8 << 20, Duration::from_secs(5)), None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(moe_gateway::http::serve_http(
        service,
        listener,
        None,
        intake,
        shutdown.clone(),
        accept_window,
    ));
    tokio::spawn(async move {
        let _keep = tx;
        std::future::pending::<()>().await
    });
    (addr, shutdown, server)
}

/// Reads one response like [`response`], with its head (status line and headers) too. A reset
/// or an end of the connection before a whole response fails the test.
async fn response_with_head(s: &mut tokio::net::TcpStream) -> (u16, String, String) {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s
            .read(&mut chunk)
            .await
            .expect("no reset before a response");
        assert!(n > 0, "connection closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k == "content-length").then(|| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await.expect("no reset inside the body");
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
    (status, head, body)
}

/// A drain answer: 503 `draining`, `Retry-After`, and the connection closed after it, cleanly.
async fn assert_draining(s: &mut tokio::net::TcpStream, what: &str) {
    use tokio::io::AsyncReadExt;
    let (status, head, body) = tokio::time::timeout(Duration::from_secs(3), response_with_head(s))
        .await
        .unwrap_or_else(|_| panic!("{what}: answered in time"));
    assert_eq!(status, 503, "{what}: {head}{body}");
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{what}: {head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{what}: {head}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "draining", "{what}: {body}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("draining"),
        "{body}"
    );
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest))
        .await
        .expect("closed after the answer")
        .expect("closed with a FIN, not a reset");
    assert_eq!(n, 0, "{what}: nothing after the answer");
}

#[tokio::test]
async fn http_requests_arriving_during_the_drain_get_503_draining_not_a_reset() {
    use tokio::io::AsyncWriteExt;
    let window = Duration::from_secs(3);
    let (addr, shutdown, server) = http_serve(window).await;
    let body = br#"{"prompt":"hi","max_tokens":4}"#;
    let post = post_head("/v1/completions", Some(body.len()), &[]);
    // A keep-alive connection that has served a request and is idle at the drain.
    let mut idle = send(addr, "GET /v1/models HTTP/1.1\r\nHost: gw\r\n", b"").await;
    let (status, head, _) = response_with_head(&mut idle).await;
    assert_eq!(status, 200);
    assert!(!head.contains("connection: close"), "{head}");
    // A request in flight at the drain: its head is read, its body still coming.
    let mut running = send(addr, &post, &body[..5]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Connections opened in the same instant as the drain, their requests sent right after.
    let racing: Vec<_> = (0..16)
        .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)))
        .collect();
    let t = Instant::now();
    shutdown.cancel();
    for (i, c) in racing.into_iter().enumerate() {
        let mut c = c.await.unwrap().expect("accepted during the window");
        c.write_all(format!("{post}\r\n").as_bytes()).await.unwrap();
        c.write_all(body).await.unwrap();
        assert_draining(&mut c, &format!("racing connection {i}")).await;
    }
    // The idle keep-alive connection: answered, not closed under the request.
    idle.write_all(format!("{post}\r\n").as_bytes())
        .await
        .unwrap();
    idle.write_all(body).await.unwrap();
    assert_draining(&mut idle, "keep-alive connection").await;
    // A new connection during the window.
    let mut fresh = send(addr, &post, body).await;
    assert_draining(&mut fresh, "new connection").await;
    // Health says so too.
    let mut health = send(addr, "GET /health HTTP/1.1\r\nHost: gw\r\n", b"").await;
    let (status, head, text) = response_with_head(&mut health).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("draining"), "{text}");
    assert!(head.contains("connection: close"), "{head}");
    // The request that was in flight is served to its end (no workers here: the service's own
    // 503 `unavailable`, not the drain's refusal).
    running.write_all(&body[5..]).await.unwrap();
    let (status, head, text) = response_with_head(&mut running).await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("\"unavailable\""),
        "served, not refused: {text}"
    );
    assert!(head.contains("connection: close"), "{head}");
    assert!(t.elapsed() < window, "the checks ran inside the window");
    // After the window the server stops accepting and returns.
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server ends after the window")
        .unwrap()
        .unwrap();
    assert!(t.elapsed() >= window, "{:?}", t.elapsed());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

// ---- The INTERACTIVE share of the decoding limit (issue 16). ----

/// Calls Generate with a real request of `class` (the front has no workers: a request that
/// gets through the decoding limit ends UNAVAILABLE).
async fn generate(channel: Channel, class: moe_common::LatencyClass) -> Status {
    let mut client = moe_common::pb::v1::inference_client::InferenceClient::new(channel);
    let req = moe_common::pb::GenerateRequest {
        prompt: "hello".into(),
        max_tokens: 4,
        latency_class: class.to_proto() as i32,
        ..Default::default()
    };
    tokio::time::timeout(Duration::from_secs(5), client.generate(req))
        .await
        .expect("answered at once")
        .expect_err("no workers: refused")
}

#[tokio::test]
async fn batch_requests_cannot_take_the_interactive_share_of_the_decoding_limit() {
    use moe_common::LatencyClass::{Batch, Interactive};
    let limits = GrpcLimits {
        interactive_reserved_decoding: 1,
        ..limits(3)
    };
    let (channel, _stop) = front(limits, None).await;
    // Two requests whose bodies never come hold the two shared places.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = Box::pin(call(channel.clone(), None, endless(0)));
        let r = tokio::time::timeout(Duration::from_millis(300), &mut c).await;
        assert!(r.is_err(), "a shared place: held, not refused ({r:?})");
        held.push(tokio::spawn(c));
    }
    // BATCH is read under the reserve and refused once decoded, with the retry hint; the
    // reserve is then free again, so this holds for every BATCH request.
    for _ in 0..2 {
        let batch = generate(channel.clone(), Batch).await;
        assert_eq!(batch.code(), Code::ResourceExhausted, "{batch:?}");
        assert!(batch.message().contains("BATCH"), "{}", batch.message());
        assert!(batch.metadata().get("retry-after-ms").is_some());
    }
    // INTERACTIVE gets through to the service (no workers: UNAVAILABLE, not refused here).
    let interactive = generate(channel.clone(), Interactive).await;
    assert_eq!(interactive.code(), Code::Unavailable, "{interactive:?}");
    for h in &held {
        assert!(!h.is_finished(), "the held requests are still being read");
    }
}

#[tokio::test]
async fn http_batch_requests_cannot_take_the_interactive_share_of_the_body_budget() {
    // 3 KiB in flight, 1 KiB of it INTERACTIVE's; two 1 KiB uploads that never finish hold
    // the shared 2 KiB.
    let limits = IntakeLimits {
        interactive_reserved_bytes: 1 << 10,
        ..http_limits(1 << 10, 3 << 10, Duration::from_secs(10))
    };
    let (addr, _stop) = http_front(limits, None).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let head = post_head("/v1/completions", Some(1 << 10), &[]);
        held.push(send(addr, &head, b"{").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = br#"{"prompt":"hi","max_tokens":4}"#;
    let batch_in_body = br#"{"prompt":"hi","max_tokens":4,"metadata":{"latency_class":"batch"}}"#;
    // Declared BATCH in the header: refused on the head; BATCH in the body: refused once
    // parsed; either way 429 with Retry-After, and the reserve stays free.
    for (headers, body) in [
        (&["x-moe-latency-class: batch"][..], &body[..]),
        (&[][..], &batch_in_body[..]),
    ] {
        let head = post_head("/v1/completions", Some(body.len()), headers);
        let mut s = send(addr, &head, body).await;
        let (status, text) = tokio::time::timeout(Duration::from_secs(2), response(&mut s))
            .await
            .expect("refused at once");
        assert_eq!(status, 429, "{text}");
        assert!(text.contains("BATCH"), "{text}");
    }
    // INTERACTIVE is read under the reserve and reaches the service (no workers: 503).
    let head = post_head("/v1/completions", Some(body.len()), &[]);
    let mut s = send(addr, &head, body).await;
    let (status, text) = response(&mut s).await;
    assert_eq!(status, 503, "{text}");
    drop(held);
}

// ---- The gRPC front while the gateway drains (issue 16). ----

async fn connect(url: String) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(url).unwrap().connect().await
}

/// The drain's answer: UNAVAILABLE `draining` with a one-second retry hint.
fn assert_drained(s: Status) {
    assert!(s.message().contains("draining"), "{s:?}");
    assert_eq!(s.metadata().get("retry-after-ms").unwrap(), "1000");
    assert_eq!(s.metadata().get("grpc-retry-pushback-ms").unwrap(), "1000");
}

/// A `Generate` call on `channel` (no workers: UNAVAILABLE either way).
async fn unavailable(channel: Channel) -> Status {
    let s = generate(channel, moe_common::LatencyClass::Interactive).await;
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    s
}

#[tokio::test]
async fn grpc_calls_arriving_during_the_drain_get_unavailable_with_a_retry_hint_not_a_reset() {
    // The whole gateway (`run`), started while etcd is down (nothing listens on port 1).
    let config = moe_gateway::GatewayConfig::for_etcd(&["http://127.0.0.1:1".to_string()]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let gateway = tokio::spawn(moe_gateway::run(config, shutdown.clone(), listener));
    let url = format!("http://{addr}");
    let established = connect(url.clone()).await.expect("serving");
    let before = unavailable(established.clone()).await;
    assert!(!before.message().contains("draining"), "{before:?}");
    // Connections opened as the drain starts: in the accept backlog, or accepted just after.
    let racing: Vec<_> = (0..8)
        .map(|_| {
            let c = connect(url.clone());
            tokio::spawn(async move { unavailable(c.await.expect("accepted")).await })
        })
        .collect();
    shutdown.cancel();
    for r in racing {
        let s = r.await.unwrap();
        // A call that won the race with the signal was started (no workers, not draining).
        if s.message().contains("draining") {
            assert_drained(s);
        }
    }
    // After the signal: a new connection and a new stream on an established one.
    assert_drained(unavailable(connect(url.clone()).await.expect("still accepting")).await);
    assert_drained(unavailable(established.clone()).await);
    // After the window the listener is closed and the gateway stops.
    tokio::time::timeout(Duration::from_secs(5), gateway)
        .await
        .expect("the gateway stops after the window")
        .unwrap()
        .expect("clean stop");
    assert!(
        connect(url).await.is_err(),
        "listener closed after the window"
    );
}

// ---- The decoding limit holds bodies being decoded, not requests being sized. ----

/// A gRPC front over one fake worker (8 slots) whose `Tokenize` answers after `tokenize_delay`,
/// the gateway sizing prompts with it (`--tokenize-timeout` 5 s) and recording its metrics in
/// the returned registry.
async fn sizing_front(
    limits: GrpcLimits,
    tokenize_delay: Duration,
) -> (
    Channel,
    Arc<prometheus_client::registry::Registry>,
    fake_worker::FakeWorker,
    tokio_util::sync::DropGuard,
) {
    let worker = fake_worker::FakeWorker::start_tokenizing(
        "a",
        fake_worker::Script::Tokens {
            gap: Duration::from_millis(1),
        },
        tokenize_delay,
    )
    .await;
    let snapshot = ClusterSnapshot {
        revision: 1,
        workers: [(worker.id.clone(), Arc::new(worker.advert("full")))].into(),
        rejected: Default::default(),
    };
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(snapshot));
    let routing = Arc::new(RoutingState::new(rx, Policy::default()));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = moe_gateway::metrics::GatewayMetrics::register(&mut registry);
    let service = GatewayService::new(
        routing,
        ProxyConfig {
            max_streams: 16,
            request_timeout: Duration::from_secs(10),
            max_attempts: 3,
            stream_idle_timeout: Duration::from_secs(30),
            first_message_timeout: Duration::from_secs(30),
            limits: RequestLimits::default(),
        },
    )
    .with_metrics(metrics)
    .with_prompt_sizing(moe_gateway::tokenize::PromptSizing {
        index: None,
        timeout: Duration::from_secs(5),
    });
    let (channel, stop) = serve(router(&limits, service, None), tx).await;
    (channel, Arc::new(registry), worker, stop)
}

/// `moe_gateway_decoding_refused_total{front="grpc",reason}` (0 while absent).
fn decoding_refused(registry: &prometheus_client::registry::Registry, reason: &str) -> u64 {
    let text = moe_common::telemetry::metrics::encode(registry);
    let series =
        format!("moe_gateway_decoding_refused_total{{front=\"grpc\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Generate with a BATCH request, read to its end: the number of messages, or the status.
async fn batch_generate(channel: Channel) -> Result<usize, Status> {
    let mut client = moe_common::pb::v1::inference_client::InferenceClient::new(channel);
    let req = moe_common::pb::GenerateRequest {
        prompt: "hello".into(),
        max_tokens: 2,
        latency_class: moe_common::LatencyClass::Batch.to_proto() as i32,
        ..Default::default()
    };
    let mut stream = client.generate(req).await?.into_inner();
    let mut n = 0;
    while let Some(m) = stream.next().await {
        m?;
        n += 1;
    }
    Ok(n)
}

#[tokio::test]
async fn batch_requests_whose_sizing_is_slow_do_not_hold_the_decoding_limit() {
    // 4 places, 1 of them INTERACTIVE's: 3 BATCH bodies may be decoded at once. Six BATCH
    // requests arrive 50 ms apart while each one's Tokenize takes 1.5 s, so all six are being
    // sized at once; the worker has 8 slots. A request that held its place until it was sized
    // and placed (before this fix) made the 4th to 6th be refused RESOURCE_EXHAUSTED.
    let limits = GrpcLimits {
        interactive_reserved_decoding: 1,
        ..limits(4)
    };
    let (channel, registry, worker, _stop) =
        sizing_front(limits, Duration::from_millis(1500)).await;
    let mut calls = Vec::new();
    for _ in 0..6 {
        calls.push(tokio::spawn(batch_generate(channel.clone())));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        worker
            .seen
            .tokenized
            .load(std::sync::atomic::Ordering::SeqCst),
        6,
        "all six requests are being sized at once"
    );
    assert!(calls.iter().all(|c| !c.is_finished()), "still being sized");
    for c in calls {
        let r = tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("answered")
            .unwrap();
        // Two tokens and the final message.
        assert_eq!(r.expect("served, not refused"), 3);
    }
    assert_eq!(worker.calls(), 6);
    for reason in ["limit", "batch_share", "read_timeout"] {
        assert_eq!(decoding_refused(&registry, reason), 0, "{reason}");
    }
}

/// A Generate call whose body never comes, holding a place of the decoding limit.
async fn hold_a_place(channel: Channel) -> tokio::task::JoinHandle<Result<(), Status>> {
    let mut c = Box::pin(call(channel, None, endless(0)));
    let r = tokio::time::timeout(Duration::from_millis(300), &mut c).await;
    assert!(r.is_err(), "a place: held, not refused ({r:?})");
    tokio::spawn(c)
}

#[tokio::test]
async fn refusals_of_the_decoding_limit_are_counted_by_reason() {
    let limits = GrpcLimits {
        interactive_reserved_decoding: 1,
        ..limits(4)
    };
    let (channel, registry, worker, _stop) = sizing_front(limits, Duration::ZERO).await;
    // Three uploads that never finish hold the shared places.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(hold_a_place(channel.clone()).await);
    }
    // A BATCH request is read under the reserve and refused once decoded.
    let batch = batch_generate(channel.clone()).await.unwrap_err();
    assert_eq!(batch.code(), Code::ResourceExhausted, "{batch:?}");
    assert_eq!(decoding_refused(&registry, "batch_share"), 1);
    assert_eq!(decoding_refused(&registry, "limit"), 0);
    // A fourth upload takes the reserve; then every place is taken.
    held.push(hold_a_place(channel.clone()).await);
    let err = call(channel.clone(), None, endless(0)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("--max-decoding-requests"), "{err:?}");
    assert_eq!(decoding_refused(&registry, "limit"), 1);
    assert_eq!(worker.calls(), 0);
    drop(held);
}
