//! Issue 8, end to end: API keys at the gateway (gRPC and HTTP), mutual TLS between gateway and
//! workers with certificates made at test time, etcd with authentication, malformed adverts, and
//! the hostile-request corpus replayed as raw bytes against a real gateway and worker.

#[path = "../../common/tests/corpus/mod.rs"]
mod corpus;

use std::io::Write;
use std::time::Duration;

use moe_common::pb::{GenerateRequest, GenerateResponse, LatencyClass};
use moe_e2e::pki::TestCa;
use moe_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use tonic_prost::prost::bytes::BufMut;

const MODEL: &str = "smollm2-moe-4x2";
const OPEN_KEY: &str = "open-key-000000000000000000000001";
const LIMITED_KEY: &str = "limited-key-00000000000000000001";
const SINGLE_KEY: &str = "single-key-000000000000000000001";
const LATER_KEY: &str = "later-key-0000000000000000000001";

fn bounded<F: std::future::Future>(
    what: &str,
    f: F,
) -> impl std::future::Future<Output = F::Output> {
    let what = what.to_string();
    async move {
        tokio::time::timeout(Duration::from_secs(120), f)
            .await
            .unwrap_or_else(|_| panic!("{what} did not finish within 120 s"))
    }
}

async fn grpc_code(
    url: &str,
    request: tonic::Request<GenerateRequest>,
) -> Result<Collected, tonic::Status> {
    collect(client(url).await, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_refuse_missing_wrong_unallowed_and_over_rate_callers() {
    let etcd = Etcd::start().await;
    let prefix = "/t-keys";
    let worker = Worker::start(WorkerSpec::new("k1", "full"), Some((&etcd, prefix))).await;
    let mut keys = tempfile::NamedTempFile::new().expect("keys file");
    writeln!(
        keys,
        "# test keys\n{OPEN_KEY} name=open\n{LIMITED_KEY} name=limited models={MODEL} classes=interactive tokens_per_minute=40\n{SINGLE_KEY} name=single max_concurrent=1"
    )
    .unwrap();
    let http_addr = format!("127.0.0.1:{}", free_port());
    let keys_path = keys.path().to_string_lossy().into_owned();
    let gateway = Gateway::start(
        &etcd,
        prefix,
        &["--api-keys", &keys_path, "--http-listen", &http_addr],
    )
    .await;
    let url = gateway.url();
    let code = |r: Result<Collected, tonic::Status>| r.err().map(|s| s.code());

    assert_eq!(
        code(grpc_code(&url, tonic::Request::new(greedy("Hi", 2))).await),
        Some(Code::Unauthenticated),
        "no key"
    );
    assert_eq!(
        code(
            grpc_code(
                &url,
                with_key(greedy("Hi", 2), "open-key-00000000000000000000000X")
            )
            .await
        ),
        Some(Code::Unauthenticated),
        "wrong key"
    );
    let mut other_model = greedy("Hi", 2);
    other_model.model = "another-model".into();
    assert_eq!(
        code(grpc_code(&url, with_key(other_model, LIMITED_KEY)).await),
        Some(Code::PermissionDenied),
        "model not allowed"
    );
    let mut batch = greedy("Hi", 2);
    batch.model = MODEL.into();
    batch.latency_class = LatencyClass::Batch as i32;
    assert_eq!(
        code(grpc_code(&url, with_key(batch, LIMITED_KEY)).await),
        Some(Code::PermissionDenied),
        "class not allowed"
    );

    // 40 tokens a minute: a 30-token request passes, the next one is over the rate.
    let mut big = greedy("The capital of France is", 30);
    big.model = MODEL.into();
    let out = bounded(
        "limited request",
        grpc_code(&url, with_key(big.clone(), LIMITED_KEY)),
    )
    .await
    .expect("within the rate");
    assert_eq!(out.last.worker_id, "k1");
    let over = grpc_code(&url, with_key(big, LIMITED_KEY))
        .await
        .expect_err("over the rate");
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    assert!(over.message().contains("retry-after"), "{}", over.message());
    let retry_ms: u64 = over
        .metadata()
        .get("retry-after-ms")
        .expect("retry-after-ms metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_ms > 0 && retry_ms <= 60_000, "{retry_ms}");

    // One stream at a time for `single`: a second one while the first runs is refused.
    let mut c = client(&url).await;
    let mut first = c
        .generate(with_key(greedy("Once upon a time", 200), SINGLE_KEY))
        .await
        .expect("first stream")
        .into_inner();
    first
        .message()
        .await
        .expect("first message")
        .expect("a message");
    let second = grpc_code(&url, with_key(greedy("Hi", 2), SINGLE_KEY)).await;
    assert_eq!(code(second), Some(Code::ResourceExhausted), "second stream");
    drop(first);
    eventually(
        Duration::from_secs(10),
        "slot freed after the client left",
        || {
            let url = url.clone();
            async move {
                grpc_code(&url, with_key(greedy("Hi", 2), SINGLE_KEY))
                    .await
                    .ok()
            }
        },
    )
    .await;

    // The open key may do anything; health needs no key.
    let mut any = greedy("Hi", 2);
    any.latency_class = LatencyClass::Batch as i32;
    grpc_code(&url, with_key(any, OPEN_KEY))
        .await
        .expect("open key");
    let ch = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a key");
    assert_eq!(health.into_inner().status, 1);

    // The HTTP API shares the check.
    let body = r#"{"prompt": "Hi", "max_tokens": 2, "temperature": 0}"#;
    let status = http_post(&http_addr, "/v1/completions", body, None)
        .await
        .status;
    assert_eq!(status, 401, "HTTP without a key");
    let status = http_post(
        &http_addr,
        "/v1/completions",
        body,
        Some("nope-nope-nope-nope-nope"),
    )
    .await
    .status;
    assert_eq!(status, 401, "HTTP with a wrong key");
    let reply = http_post(&http_addr, "/v1/completions", body, Some(OPEN_KEY)).await;
    assert_eq!(reply.status, 200, "HTTP with a key: {}", reply.body);

    // A key added to the file works once the gateway has re-read it.
    writeln!(keys, "{LATER_KEY} name=later").unwrap();
    keys.flush().unwrap();
    eventually(Duration::from_secs(15), "the new key to be loaded", || {
        let url = url.clone();
        async move {
            grpc_code(&url, with_key(greedy("Hi", 1), LATER_KEY))
                .await
                .ok()
        }
    })
    .await;

    gateway.stop().await;
    worker.stop().await;
}

struct Pki {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    ca_pem: String,
    worker: moe_e2e::pki::CertFiles,
    gateway: moe_e2e::pki::CertFiles,
    rogue_worker: moe_e2e::pki::CertFiles,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("moe test CA");
    let rogue = TestCa::new("rogue CA");
    Pki {
        ca: ca.write(dir.path(), "ca.crt"),
        ca_pem: ca.pem(),
        worker: ca.leaf(dir.path(), "worker"),
        gateway: ca.leaf(dir.path(), "gateway"),
        rogue_worker: rogue.leaf(dir.path(), "rogue-worker"),
        _dir: dir,
    }
}

/// GET over HTTPS, trusting `ca_pem`; returns the whole answer.
async fn https_get(addr: &str, path: &str, ca_pem: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    // The gateway binds its HTTP port once it has read the registry.
    let tcp = eventually(
        Duration::from_secs(20),
        "the HTTPS port to open",
        || async { tokio::net::TcpStream::connect(addr).await.ok() },
    )
    .await;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the HTTP API");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), tls.read_to_string(&mut out))
        .await
        .expect("answer in time")
        .ok();
    out
}

fn tls_to(pki: &Pki, with_cert: bool) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca_pem));
    if with_cert {
        let cert = std::fs::read(&pki.gateway.cert).unwrap();
        let key = std::fs::read(&pki.gateway.key).unwrap();
        c = c.identity(Identity::from_pem(cert, key));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_admits_only_the_right_gateway_and_the_right_workers() {
    let etcd = Etcd::start().await;
    let pki = pki();
    let ca = pki.ca.to_string_lossy().into_owned();

    // A worker that requires client certificates from the CA.
    let good_prefix = "/t-mtls";
    let spec = WorkerSpec::new("tls-worker", "full")
        .with("--tls-cert", &pki.worker.cert_arg())
        .with("--tls-key", &pki.worker.key_arg())
        .with("--tls-client-ca", &ca)
        .with_client_tls(tls_to(&pki, true));
    let worker = Worker::start(spec, Some((&etcd, good_prefix))).await;
    let advert = etcd
        .advert_json(good_prefix, "tls-worker")
        .await
        .expect("advert");
    assert_eq!(advert["endpoint"], worker.url());
    assert!(worker.url().starts_with("https://"), "{}", worker.url());

    // Correct mTLS: the gateway serves TLS too and presents its certificate to the worker.
    let gw_cert = pki.gateway.cert_arg();
    let gw_key = pki.gateway.key_arg();
    let https_addr = format!("127.0.0.1:{}", free_port());
    let gateway = Gateway::start(
        &etcd,
        good_prefix,
        &[
            "--tls-cert",
            &gw_cert,
            "--tls-key",
            &gw_key,
            "--tls-ca",
            &ca,
            "--http-listen",
            &https_addr,
        ],
    )
    .await;
    let health = https_get(&https_addr, "/health", &pki.ca_pem).await;
    assert!(
        health.starts_with("HTTP/1.1 200"),
        "HTTPS /health: {health}"
    );
    let gw_url = format!("https://{}", gateway.addr);
    let out = bounded(
        "request over mTLS",
        collect(
            tls_client(&gw_url, tls_to(&pki, false)),
            tonic::Request::new(greedy("The capital of France is", 8)),
        ),
    )
    .await
    .expect("request through TLS gateway and mTLS worker");
    assert_eq!(out.last.worker_id, "tls-worker");
    assert!(!out.text.is_empty());
    // A plaintext client cannot talk to the TLS gateway.
    let plain = collect(
        InferenceClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{}", gateway.addr))
                .unwrap()
                .connect_lazy(),
        ),
        tonic::Request::new(greedy("Hi", 2)),
    )
    .await;
    assert!(
        plain.is_err(),
        "plaintext client got an answer from a TLS port"
    );

    // Misconfigured: trusts the CA but has no client certificate, so the worker refuses it.
    let no_cert = Gateway::start(&etcd, good_prefix, &["--tls-ca", &ca]).await;
    let refused = bounded(
        "request without a client cert",
        generate(&no_cert.url(), greedy("Hi", 2)),
    )
    .await
    .expect_err("the worker must refuse a gateway without a client certificate");
    println!(
        "gateway without a client certificate: {}",
        refused.message()
    );
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // A worker whose certificate is from another CA is not trusted by the gateway.
    let rogue_prefix = "/t-mtls-rogue";
    let rogue_spec = WorkerSpec::new("rogue-worker", "full")
        .with("--tls-cert", &pki.rogue_worker.cert_arg())
        .with("--tls-key", &pki.rogue_worker.key_arg());
    let rogue = Worker::spawn(rogue_spec, Some((&etcd, rogue_prefix))).await;
    eventually(
        Duration::from_secs(60),
        "rogue worker to register",
        || async { etcd.advert(rogue_prefix, "rogue-worker").await },
    )
    .await;
    let to_rogue = Gateway::start(
        &etcd,
        rogue_prefix,
        &[
            "--tls-cert",
            &gw_cert,
            "--tls-key",
            &gw_key,
            "--tls-ca",
            &ca,
        ],
    )
    .await;
    let rogue_url = format!("https://{}", to_rogue.addr);
    let refused = bounded(
        "request to a rogue worker",
        collect(
            tls_client(&rogue_url, tls_to(&pki, false)),
            tonic::Request::new(greedy("Hi", 2)),
        ),
    )
    .await
    .expect_err("the gateway must not talk to a worker outside its CA");
    println!("gateway to a worker outside its CA: {}", refused.message());
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // With --tls-ca a gateway refuses plaintext workers: prompts never travel in the clear.
    let plain_prefix = "/t-mtls-plain";
    let plain = Worker::start(
        WorkerSpec::new("plain-worker", "full"),
        Some((&etcd, plain_prefix)),
    )
    .await;
    let to_plain = Gateway::start(&etcd, plain_prefix, &["--tls-ca", &ca]).await;
    let refused = bounded(
        "request to a plaintext worker",
        generate(&to_plain.url(), greedy("Hi", 2)),
    )
    .await
    .expect_err("a TLS gateway must not send prompts to a plaintext worker");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("plaintext"),
        "{}",
        refused.message()
    );

    for g in [gateway, no_cert, to_rogue, to_plain] {
        g.stop().await;
    }
    plain.stop().await;
    rogue.stop().await;
    worker.stop().await;
}

use moe_common::pb::v1::inference_client::InferenceClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_with_authentication_serves_with_credentials_and_refuses_without() {
    let etcd = Etcd::start().await;
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new(
            std::env::var("MOE_ETCDCTL_BIN").unwrap_or_else(|_| "etcdctl".into()),
        )
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoint])
        .args(args)
        .output()
        .expect("run etcdctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = etcdctl(&["user", "add", "root", "--new-user-password", "pw"]);
    assert!(ok, "user add: {out}");
    let _ = etcdctl(&["role", "add", "root"]);
    let (ok, out) = etcdctl(&["user", "grant-role", "root", "root"]);
    assert!(ok || out.contains("already"), "grant-role: {out}");
    let (ok, out) = etcdctl(&["auth", "enable"]);
    assert!(ok, "auth enable: {out}");

    let prefix = "/t-etcd-auth";
    // Without credentials the worker fails to register, saying what to fix.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let args = vec![
        "moe-worker".to_string(),
        "--model".into(),
        smollm2_moe().to_string_lossy().into_owned(),
        "--listen".into(),
        addr,
        "--id".into(),
        "anon".into(),
        "--threads".into(),
        "1".into(),
        "--ctx-size".into(),
        "512".into(),
        "--etcd".into(),
        etcd.endpoint.clone(),
        "--etcd-prefix".into(),
        prefix.into(),
    ];
    let config = <moe_worker::WorkerConfig as clap::Parser>::parse_from(args);
    let err = bounded(
        "unauthenticated worker",
        moe_worker::run(config, tokio_util::sync::CancellationToken::new(), listener),
    )
    .await
    .expect_err("registration without credentials must fail");
    let msg = err.to_string();
    println!("worker without etcd credentials: {msg}");
    assert!(
        msg.contains("--etcd-user"),
        "the error says what to fix: {msg}"
    );

    // The gateway without credentials fails the same way.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = <moe_gateway::GatewayConfig as clap::Parser>::parse_from([
        "moe-gateway",
        "--etcd",
        &etcd.endpoint,
        "--etcd-prefix",
        prefix,
    ]);
    let err = bounded(
        "unauthenticated gateway",
        moe_gateway::run(config, tokio_util::sync::CancellationToken::new(), listener),
    )
    .await
    .expect_err("watching without credentials must fail");
    assert!(err.to_string().contains("--etcd-user"), "{err}");

    // With credentials both register and serve.
    let spec = WorkerSpec::new("authed", "full")
        .with("--etcd-user", "root")
        .with("--etcd-password", "pw");
    let worker = Worker::start(spec, Some((&etcd, prefix))).await;
    let gateway = Gateway::start(
        &etcd,
        prefix,
        &["--etcd-user", "root", "--etcd-password", "pw"],
    )
    .await;
    let out = eventually(
        Duration::from_secs(20),
        "a completion via the authenticated registry",
        || {
            let url = gateway.url();
            async move {
                generate(&url, greedy("The capital of France is", 4))
                    .await
                    .ok()
            }
        },
    )
    .await;
    assert_eq!(out.last.worker_id, "authed");
    gateway.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_adverts_neither_crash_the_gateway_nor_receive_traffic() {
    let etcd = Etcd::start().await;
    let prefix = "/t-bad-adverts";
    let worker = Worker::start(WorkerSpec::new("good", "full"), Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    // A trap: any connection to it is traffic a bad advert should not have got.
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_url = format!("http://{}", trap.local_addr().unwrap());
    let mut good = etcd.advert_json(prefix, "good").await.expect("good advert");
    let workers = etcd.config(prefix).workers_prefix();
    let mut kv = etcd.client().await;
    let mut bad: Vec<(String, Vec<u8>)> = vec![
        ("not-json".into(), b"{not json".to_vec()),
        ("binary".into(), vec![0xff, 0x00, 0xfe, 0x7b]),
        ("huge".into(), vec![b'['; 1 << 20]),
        ("empty".into(), vec![]),
    ];
    type Mutation = fn(&mut serde_json::Value);
    let mutations: [(&str, Mutation); 6] = [
        ("schema", |a| a["schema"] = 99.into()),
        ("id-mismatch", |a| a["id"] = "good".into()),
        ("bad-endpoint", |a| {
            a["endpoint"] = "127.0.0.1; rm -rf /".into()
        }),
        ("bad-capacity", |a| {
            a["capacity"]["free_kv_tokens"] = 1_000_000_000u64.into()
        }),
        ("no-sequences", |a| {
            a["capacity"]["max_sequences"] = 0.into()
        }),
        ("negative-load", |a| a["load"]["active"] = (-1).into()),
    ];
    for (id, mutate) in mutations {
        good["id"] = id.into();
        good["endpoint"] = trap_url.clone().into();
        let mut a = good.clone();
        mutate(&mut a);
        bad.push((id.to_string(), serde_json::to_vec(&a).unwrap()));
    }
    for (id, value) in &bad {
        kv.put(format!("{workers}{id}"), value.clone(), None)
            .await
            .expect("put bad advert");
    }
    // Every request still goes to the good worker, and the gateway stays up.
    for i in 0..4 {
        let out = bounded(
            "request next to bad adverts",
            generate(&gateway.url(), greedy("Hi", 2)),
        )
        .await
        .unwrap_or_else(|e| panic!("request {i}: {e:?}"));
        assert_eq!(out.last.worker_id, "good");
    }
    let accepted = tokio::time::timeout(Duration::from_millis(200), trap.accept()).await;
    assert!(
        accepted.is_err(),
        "a malformed advert received a connection"
    );
    gateway.stop().await;
    worker.stop().await;
}

/// Sends already-encoded request bytes (what a typed client cannot: invalid UTF-8, truncation).
#[derive(Default)]
struct RawCodec;

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

struct ResponseDecoder(tonic_prost::ProstDecoder<GenerateResponse>);

impl Decoder for ResponseDecoder {
    type Item = GenerateResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut DecodeBuf<'_>,
    ) -> Result<Option<GenerateResponse>, tonic::Status> {
        self.0.decode(buf)
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = GenerateResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder(tonic_prost::ProstDecoder::default())
    }
}

async fn send_raw(url: &str, bytes: Vec<u8>) -> Result<(), tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/moe.v1.Inference/Generate");
    let mut stream = grpc
        .server_streaming(tonic::Request::new(bytes), path, RawCodec)
        .await?
        .into_inner();
    while let Some(m) = stream.message().await? {
        if m.finish_reason != 0 {
            break;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_corpus_gets_invalid_argument_from_gateway_and_worker() {
    let etcd = Etcd::start().await;
    let prefix = "/t-corpus";
    let worker = Worker::start(WorkerSpec::new("c1", "full"), Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &["--max-message-bytes", "2000000"]).await;
    for case in corpus::load() {
        for (who, url) in [("gateway", gateway.url()), ("worker", worker.url())] {
            let r = bounded(&case.name, send_raw(&url, case.bytes.clone())).await;
            if case.invalid && !(case.gateway_only && who == "worker") {
                let code = r.as_ref().err().map(|s| s.code());
                assert_eq!(
                    code,
                    Some(Code::InvalidArgument),
                    "{who}: {}: {r:?}",
                    case.name
                );
            } else {
                assert!(r.is_ok(), "{who}: {}: {r:?}", case.name);
            }
        }
    }
    // Larger than --max-message-bytes: refused before decoding.
    let huge = GenerateRequest {
        prompt: "a".repeat(2_100_000),
        max_tokens: 1,
        ..Default::default()
    };
    let r = send_raw(
        &gateway.url(),
        tonic_prost::prost::Message::encode_to_vec(&huge),
    )
    .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::OutOfRange));
    // And the gateway still serves.
    generate(&gateway.url(), greedy("Hi", 2))
        .await
        .expect("still serving");
    gateway.stop().await;
    worker.stop().await;
}
