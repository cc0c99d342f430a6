//! Test harness: a real etcd on free loopback ports, real workers (in-process through
//! `moe_worker::run`, or as `moe-worker` processes when a test needs to kill one), real gateways,
//! and a client that collects a whole stream. Every wait is bounded.

pub mod observe;

pub mod pki;

mod etcd;
pub use etcd::Etcd;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moe_common::pb::v1::inference_client::InferenceClient;
use moe_common::pb::{FinishReason, GenerateRequest, GenerateResponse, SamplingParams};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::transport::{Channel, ClientTlsConfig};

/// Root of the workspace.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The SmolLM2 MoE test model made by `scripts/make_test_models.py`.
pub fn smollm2_moe() -> PathBuf {
    let p = std::env::var_os("MOE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("models/smollm2-moe-4x2.gguf"));
    assert!(
        p.exists(),
        "{} is missing: run `python3 scripts/make_test_models.py` first",
        p.display()
    );
    p
}

/// The tiny random-weight MoE made by `scripts/make_test_models.py`.
pub fn tiny_moe() -> PathBuf {
    let p = workspace().join("models/tiny-moe.gguf");
    assert!(
        p.exists(),
        "{} is missing: run `python3 scripts/make_test_models.py` first",
        p.display()
    );
    p
}

/// A binary of this workspace (`moe-worker`, `moe-gateway`), built by `cargo build`.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("MOE_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // target/debug/deps/<test> -> target/debug/<name>
    let exe = std::env::current_exe().expect("current exe");
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bins` first",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Waits until the worker at `url` answers its health check SERVING (180 s at most).
async fn wait_serving(url: String, tls: Option<ClientTlsConfig>) {
    eventually(Duration::from_secs(180), "worker to serve", || {
        let url = url.clone();
        let tls = tls.clone();
        async move {
            let mut ep = tonic::transport::Endpoint::from_shared(url).ok()?;
            if let Some(tls) = tls {
                ep = ep.tls_config(tls).ok()?;
            }
            let ch = ep.connect().await.ok()?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
            let r = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?;
            (r.into_inner().status == 1).then_some(())
        }
    })
    .await;
}

/// Polls `check` until it returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The one worker of `ids` whose advert shows an active sequence: the worker serving a test's
/// only stream, to kill or wedge it. Waits until exactly one does (the worker of an earlier
/// reference run may still advertise its finished sequence until its next write, within the
/// lease TTL, since one stream of several slots is drift for the advert), or panics after 10 s.
pub async fn serving_worker<'a>(etcd: &Etcd, prefix: &str, ids: &[&'a str]) -> &'a str {
    eventually(
        Duration::from_secs(10),
        "exactly one advert showing the stream",
        || async {
            let mut busy = Vec::new();
            for &id in ids {
                if etcd
                    .advert(prefix, id)
                    .await
                    .is_some_and(|w| w.load.active == 1)
                {
                    busy.push(id);
                }
            }
            (busy.len() == 1).then(|| busy[0])
        },
    )
    .await
}

/// Waits until every worker of `ids` advertises free KV (a worker's first advert may show none
/// until its engine has published its numbers), so that the gateway can place on it.
pub async fn have_free_kv(etcd: &Etcd, prefix: &str, ids: &[&str]) {
    for id in ids {
        eventually(
            Duration::from_secs(10),
            "an advert with free KV",
            || async {
                let free = etcd.advert(prefix, id).await?.capacity.free_kv_tokens;
                (free > 0).then_some(())
            },
        )
        .await;
    }
}

/// One answer of the gateway's HTTP API, read to the end of the connection.
pub struct HttpReply {
    /// The status code (0 when the status line does not parse).
    pub status: u16,
    /// Status line and headers, lower-cased.
    pub head: String,
    /// Everything after the blank line.
    pub body: String,
}

/// POSTs JSON to `path` over plain TCP (`Connection: close`), with `Authorization: Bearer KEY`
/// when `key` is given, and reads the whole answer (60 s at most).
pub async fn http_post(addr: &str, path: &str, body: &str, key: Option<&str>) -> HttpReply {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write http");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_string(&mut out))
        .await
        .expect("http answer in time")
        .expect("read http");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    HttpReply {
        status,
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

/// Reads `stream` into `text`/`ids` until the client's text is at least `until` bytes long.
pub async fn read_until(
    stream: &mut tonic::Streaming<GenerateResponse>,
    text: &mut String,
    ids: &mut Vec<u32>,
    until: usize,
) {
    while text.len() < until {
        let m = stream.message().await.unwrap().expect("stream continues");
        assert_eq!(
            m.finish_reason,
            FinishReason::Unspecified as i32,
            "{text:?}"
        );
        text.push_str(&m.text);
        ids.extend(&m.token_ids);
    }
}

/// Reads `stream` to its final message.
pub async fn read_to_end(
    stream: &mut tonic::Streaming<GenerateResponse>,
    text: &mut String,
    ids: &mut Vec<u32>,
) -> GenerateResponse {
    let fut = async {
        loop {
            let m = stream
                .message()
                .await
                .expect("one unbroken stream")
                .expect("a final message");
            text.push_str(&m.text);
            ids.extend(&m.token_ids);
            if m.finish_reason != FinishReason::Unspecified as i32 {
                return m;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), fut)
        .await
        .expect("stream finished within 120 s")
}

/// Options for a test worker.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub id: String,
    pub offload: String,
    pub ctx_size: u32,
    pub parallel: u32,
    /// The GGUF file; the SmolLM2 MoE when None.
    pub model: Option<PathBuf>,
    pub extra: Vec<String>,
    /// How the harness reaches the worker when it serves TLS (and the URL becomes https://).
    pub client_tls: Option<ClientTlsConfig>,
}

impl WorkerSpec {
    pub fn new(id: &str, offload: &str) -> Self {
        WorkerSpec {
            id: id.into(),
            offload: offload.into(),
            ctx_size: 2048,
            parallel: 4,
            model: None,
            extra: vec![],
            client_tls: None,
        }
    }

    /// The worker serves TLS; the harness checks its health with `tls`.
    pub fn with_client_tls(mut self, tls: ClientTlsConfig) -> Self {
        self.client_tls = Some(tls);
        self
    }

    pub fn with_model(mut self, model: PathBuf) -> Self {
        self.model = Some(model);
        self
    }

    pub fn with(mut self, flag: &str, value: &str) -> Self {
        self.extra.push(flag.into());
        self.extra.push(value.into());
        self
    }

    fn args(&self, listen: &str, etcd: Option<(&Etcd, &str)>) -> Vec<String> {
        let mut a = vec![
            "moe-worker".to_string(),
            "--model".into(),
            self.model
                .clone()
                .unwrap_or_else(smollm2_moe)
                .to_string_lossy()
                .into_owned(),
            "--offload".into(),
            self.offload.clone(),
            "--listen".into(),
            listen.into(),
            "--id".into(),
            self.id.clone(),
            "--ctx-size".into(),
            self.ctx_size.to_string(),
            "--parallel".into(),
            self.parallel.to_string(),
            // One llama.cpp thread per test worker: tests run several workers at once on a
            // small machine, and OpenMP's spinning barriers collapse when oversubscribed.
            "--threads".into(),
            "1".into(),
            "--lease-ttl".into(),
            "3s".into(),
            "--drain-grace".into(),
            "20s".into(),
        ];
        if let Some((etcd, prefix)) = etcd {
            a.extend([
                "--etcd".into(),
                etcd.endpoint.clone(),
                "--etcd-prefix".into(),
                prefix.into(),
            ]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }
}

/// A worker running inside the test process through `moe_worker::run`.
pub struct Worker {
    pub addr: SocketAddr,
    pub id: String,
    tls: Option<ClientTlsConfig>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), moe_worker::WorkerError>>,
}

impl Worker {
    pub async fn start(spec: WorkerSpec, etcd: Option<(&Etcd, &str)>) -> Worker {
        let mut worker = Worker::spawn(spec, etcd).await;
        // A worker that stopped (bad flags, load failure) will never serve: say why now.
        let serving = wait_serving(worker.url(), worker.tls.clone());
        tokio::select! {
            () = serving => {}
            r = &mut worker.task => panic!("worker {} stopped before serving: {r:?}", worker.id),
        }
        worker
    }

    /// Starts a worker without waiting for it to serve (for workers the harness cannot reach).
    pub async fn spawn(spec: WorkerSpec, etcd: Option<(&Etcd, &str)>) -> Worker {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = <moe_worker::WorkerConfig as clap::Parser>::parse_from(
            spec.args(&addr.to_string(), etcd),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(moe_worker::run(config, shutdown.clone(), listener));
        Worker {
            addr,
            id: spec.id,
            tls: spec.client_tls,
            shutdown,
            task,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Graceful shutdown (as SIGTERM) and wait for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("worker stops")
            .expect("worker task")
            .expect("worker run ok");
    }
}

/// `moe-worker` as a child process, for tests that kill it.
pub struct WorkerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub id: String,
}

impl WorkerProcess {
    pub async fn start(spec: WorkerSpec, etcd: &Etcd, prefix: &str) -> WorkerProcess {
        WorkerProcess::start_with_env(spec, etcd, prefix, &[]).await
    }

    /// [`WorkerProcess::start`] with extra environment variables (test hooks).
    pub async fn start_with_env(
        spec: WorkerSpec,
        etcd: &Etcd,
        prefix: &str,
        env: &[(&str, &str)],
    ) -> WorkerProcess {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let args = spec.args(&addr.to_string(), Some((etcd, prefix)));
        let child = Command::new(bin("moe-worker"))
            .args(&args[1..])
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn moe-worker");
        let p = WorkerProcess {
            child,
            addr,
            id: spec.id,
        };
        let prefix = prefix.to_string();
        let id = p.id.clone();
        eventually(
            Duration::from_secs(60),
            "worker process to register",
            || {
                let (prefix, id) = (prefix.clone(), id.clone());
                async move { etcd.advert(&prefix, &id).await }
            },
        )
        .await;
        p
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, returning its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code();
            }
            assert!(
                start.elapsed() < timeout,
                "worker did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway running inside the test process.
pub struct Gateway {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), moe_gateway::GatewayError>>,
}

impl Gateway {
    pub async fn start(etcd: &Etcd, prefix: &str, extra: &[&str]) -> Gateway {
        Gateway::start_at(&etcd.endpoint, prefix, extra).await
    }

    /// A gateway watching the etcd at `endpoint`, which need not be up yet.
    pub async fn start_at(endpoint: &str, prefix: &str, extra: &[&str]) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut args = vec![
            "moe-gateway",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            endpoint,
            "--etcd-prefix",
            prefix,
        ];
        args.extend_from_slice(extra);
        let config = <moe_gateway::GatewayConfig as clap::Parser>::parse_from(args);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(moe_gateway::run(config, shutdown.clone(), listener));
        Gateway {
            addr,
            shutdown,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Whether `moe_gateway::run` has returned (it should not while the test runs).
    pub fn exited(&self) -> bool {
        self.task.is_finished()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// A greedy request for `prompt`.
pub fn greedy(prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        max_tokens,
        sampling: Some(SamplingParams::default()),
        ..Default::default()
    }
}

/// A whole stream: text, token ids, and the final message.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub messages: usize,
    pub last: GenerateResponse,
    /// With `logprobs`: per token, its log-probability then its alternatives', in order.
    pub logprobs: Vec<Vec<f32>>,
}

impl Collected {
    pub fn finish(&self) -> FinishReason {
        FinishReason::try_from(self.last.finish_reason).unwrap_or(FinishReason::Unspecified)
    }
}

pub async fn client(url: &str) -> InferenceClient<tonic::transport::Channel> {
    InferenceClient::connect(url.to_string())
        .await
        .expect("connect")
}

/// Sends a request and collects the whole stream (bounded by 120 s).
pub async fn generate(url: &str, req: GenerateRequest) -> Result<Collected, Status> {
    collect(client(url).await, tonic::Request::new(req)).await
}

/// A client over TLS with `tls`, connecting lazily (a failed handshake fails the first call).
pub fn tls_client(url: &str, tls: ClientTlsConfig) -> InferenceClient<Channel> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .tls_config(tls)
        .expect("tls config")
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    InferenceClient::new(ch)
}

/// `req` with `authorization: Bearer <key>`.
pub fn with_key(req: GenerateRequest, key: &str) -> tonic::Request<GenerateRequest> {
    let mut r = tonic::Request::new(req);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ascii key"),
    );
    r
}

/// Sends `request` on `c` and collects the whole stream (bounded by 120 s).
pub async fn collect(
    mut c: InferenceClient<Channel>,
    request: tonic::Request<GenerateRequest>,
) -> Result<Collected, Status> {
    let fut = async {
        let mut stream = c.generate(request).await?.into_inner();
        let mut out = Collected::default();
        while let Some(m) = stream.message().await? {
            out.text.push_str(&m.text);
            out.token_ids.extend_from_slice(&m.token_ids);
            out.logprobs.extend(m.logprobs.iter().map(|l| {
                std::iter::once(l.logprob)
                    .chain(l.top_logprobs.iter().map(|t| t.logprob))
                    .collect()
            }));
            out.messages += 1;
            let last = m.finish_reason != FinishReason::Unspecified as i32;
            out.last = m;
            if last {
                break;
            }
        }
        Ok(out)
    };
    tokio::time::timeout(Duration::from_secs(120), fut)
        .await
        .expect("stream finished within 120 s")
}
