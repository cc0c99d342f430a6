//! The gateway's gRPC front (`moe_gateway::grpc::router`) on 127.0.0.1: API keys are checked on
//! the headers before any of the body is read (review H1), `Generate` requests being read at once
//! are bounded and the excess is refused at once, and health answers while that bound is
//! saturated (M7), and a request whose body does not arrive in time is refused. Raw gRPC calls whose bodies never finish stand in for slow or hostile clients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moe_common::registry::ClusterSnapshot;
use moe_common::request::RequestLimits;
use moe_gateway::RoutingState;
use moe_gateway::auth::ApiKeys;
use moe_gateway::grpc::{GrpcLimits, router};
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
async fn front(
    limits: GrpcLimits,
    keys: Option<Arc<ApiKeys>>,
) -> (Channel, tokio_util::sync::DropGuard) {
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(ClusterSnapshot::default()));
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
    )
    .with_api_keys(keys.clone());
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = router(&limits, service, keys).add_service(health);
    let s = stop.clone();
    tokio::spawn(async move {
        let _keep = _tx;
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
