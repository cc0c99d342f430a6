//! Issue 16, faults caused by clients and the network, end to end (real etcd, real llama.cpp
//! workers, a real gateway), each bounded by small timeouts and asserting a clear status, never a
//! hang: a client that stops reading a long stream is let go after the stream idle timeout and
//! the worker frees its slot (review H6); a slow HTTP upload is refused after the read timeout
//! while health probes keep answering (M7); a gateway started while etcd is down is NOT_SERVING
//! until it has listed the registry (H7); and a network partition between gateway and worker
//! (network namespace, veth pair, packets dropped) moves the stream to another worker, where the
//! machine permits building one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use moe_common::pb::FinishReason;
use moe_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const PROMPT: &str = "Once upon a time, in a small village by the sea,";

/// The gateway's `moe.v1.Inference` health (what the chart's readiness probe asks), or None when
/// the gateway does not answer.
async fn gateway_health(url: &str) -> Option<i32> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string())
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let r = tokio::time::timeout(
        Duration::from_secs(1),
        HealthClient::new(ch).check(HealthCheckRequest {
            service: "moe.v1.Inference".into(),
        }),
    )
    .await
    .ok()?
    .ok()?;
    Some(r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_is_let_go_and_the_worker_frees_its_slot() {
    let etcd = Etcd::start().await;
    let prefix = "/f-client-stall";
    // One sequence of 2048 cells: a 1500-token stream fits it and takes far longer than the
    // timeouts below.
    let mut spec = WorkerSpec::new("w", "full");
    spec.parallel = 1;
    let worker = Worker::start(spec, Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &["--stream-idle-timeout", "1s"]).await;
    // A client whose HTTP/2 stream window is 1 KiB: once it stops reading, the gateway can send
    // it at most that much more before its relay has to wait.
    let channel = tonic::transport::Endpoint::from_shared(gateway.url())
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .expect("connect to the gateway");
    let mut c = moe_common::pb::v1::inference_client::InferenceClient::new(channel);
    let mut stream = c
        .generate(greedy(PROMPT, 1500))
        .await
        .expect("stream starts")
        .into_inner();
    let mut tokens = 0;
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("first tokens")
            .expect("stream runs")
            .expect("stream continues");
        tokens += m.token_ids.len();
    }
    eventually(
        Duration::from_secs(5),
        "the sequence to show as active",
        || async {
            etcd.advert(prefix, "w")
                .await
                .filter(|a| a.load.active == 1)
        },
    )
    .await;
    // The client stops reading but keeps its connection open.
    let stopped = Instant::now();
    let advert = eventually(
        Duration::from_secs(30),
        "the worker to free the slot of the stream nobody reads",
        || async {
            etcd.advert(prefix, "w")
                .await
                .filter(|a| a.load.active == 0 && a.capacity.free_kv_tokens == 2048)
        },
    )
    .await;
    let freed = stopped.elapsed();
    assert_eq!(advert.load.queued, 0);
    // What was queued for the client, then the gateway's verdict: not a finished stream.
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    assert_eq!(
                        m.finish_reason,
                        FinishReason::Unspecified as i32,
                        "the stream must not have run to its end"
                    );
                    tokens += m.token_ids.len();
                }
                Ok(None) => panic!("the stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the rest of the stream and its status arrive at once");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("stream idle timeout"),
        "{status:?}"
    );
    assert!(tokens < 1500, "{tokens} tokens: the stream was cut");
    eprintln!("client stopped reading: slot freed after {freed:?}, {tokens} tokens delivered");
    // The gateway still serves, and the worker's slot is usable again.
    let done = generate(&gateway.url(), greedy(PROMPT, 4))
        .await
        .expect("a new request is served");
    assert_eq!(done.finish(), FinishReason::Length);
    gateway.stop().await;
    worker.stop().await;
}

/// Sends a raw HTTP/1.1 request head (and `body`, which may be partial) on a new connection.
async fn send(addr: SocketAddr, head: &str, body: &[u8]) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    s.write_all(body).await.unwrap();
    s
}

/// The status code and the text of one HTTP response (`Content-Length` framed).
async fn response(s: &mut tokio::net::TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    (
        status,
        String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_http_upload_is_refused_after_the_read_timeout_while_health_probes_answer() {
    let etcd = Etcd::start().await;
    let prefix = "/f-client-upload";
    let worker = Worker::start(WorkerSpec::new("w", "full"), Some((&etcd, prefix))).await;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http_arg = http.to_string();
    let gateway = Gateway::start(
        &etcd,
        prefix,
        &["--http-listen", &http_arg, "--request-read-timeout", "1s"],
    )
    .await;
    let url = gateway.url();
    eventually(Duration::from_secs(20), "the gateway to be ready", || {
        let url = url.clone();
        async move { (gateway_health(&url).await == Some(ServingStatus::Serving as i32)).then_some(()) }
    })
    .await;
    eventually(Duration::from_secs(20), "the HTTP port to open", || async {
        tokio::net::TcpStream::connect(http).await.ok()
    })
    .await;
    // Ten uploads that declare 4 KiB and send 9 bytes of it.
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n";
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..10 {
        let mut s = send(http, head, b"{\"message").await;
        slow.push(tokio::spawn(async move { response(&mut s).await }));
    }
    // Health answers at once, on both ports, while the uploads trickle.
    for _ in 0..3 {
        let t = Instant::now();
        let mut s = send(http, "GET /health HTTP/1.1\r\nHost: gw\r\n", b"").await;
        let (status, body) = tokio::time::timeout(Duration::from_secs(1), response(&mut s))
            .await
            .expect("HTTP health answers within a second");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            gateway_health(&gateway.url()).await,
            Some(ServingStatus::Serving as i32),
            "gRPC health answers SERVING"
        );
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for h in slow {
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), h)
            .await
            .expect("the slow upload is answered, not held")
            .unwrap();
        assert_eq!(status, 408, "{body}");
        assert!(body.contains("request_timeout"), "{body}");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    // A whole request is served as before.
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"{PROMPT}"}}],"max_tokens":4,"temperature":0}}"#
    );
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    let mut s = send(http, &head, body.as_bytes()).await;
    let (status, text) = tokio::time::timeout(Duration::from_secs(60), response(&mut s))
        .await
        .expect("served");
    assert_eq!(status, 200, "{text}");
    gateway.stop().await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_started_while_etcd_is_down_is_not_serving_until_it_has_listed_the_registry() {
    let port = free_port();
    let gateway = Gateway::start_at(&Etcd::endpoint_on(port), "/f-client-health", &[]).await;
    let url = gateway.url();
    let status = eventually(
        Duration::from_secs(20),
        "the gateway to answer health",
        || {
            let url = url.clone();
            async move { gateway_health(&url).await }
        },
    )
    .await;
    assert_eq!(status, ServingStatus::NotServing as i32);
    // Still NOT_SERVING a while later, and alive (a liveness probe asks for "").
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        gateway_health(&url).await,
        Some(ServingStatus::NotServing as i32)
    );
    assert!(!gateway.exited());
    let etcd = Etcd::start_on(port).await;
    let t = Instant::now();
    eventually(
        Duration::from_secs(15),
        "SERVING once etcd answers",
        || {
            let url = url.clone();
            async move { (gateway_health(&url).await == Some(ServingStatus::Serving as i32)).then_some(()) }
        },
    )
    .await;
    eprintln!("SERVING {:?} after etcd started", t.elapsed());
    gateway.stop().await;
    drop(etcd);
}

/// Runs `ip ARGS...` (in network namespace `ns` when given); the error names the command.
fn ip(ns: Option<&str>, args: &[&str]) -> Result<(), String> {
    let mut cmd = std::process::Command::new("ip");
    if let Some(ns) = ns {
        cmd.args(["netns", "exec", ns, "ip"]);
    }
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace joined to this one by a veth pair (`host_ip` here, `ns_ip` there), and
/// the means to drop every packet between them: iptables DROP on both ends where iptables
/// exists, else static neighbour entries pointing at a MAC nobody has (the receiving end drops
/// such frames silently, as DROP would). Dropping it deletes the namespace, its end of the pair
/// and any rules it added.
struct Partitionable {
    ns: String,
    host_dev: String,
    ns_dev: String,
    host_ip: String,
    ns_ip: String,
    iptables: bool,
    dropping: bool,
}

impl Partitionable {
    fn create() -> Result<Partitionable, String> {
        let id = std::process::id();
        let n = Partitionable {
            ns: format!("moe-part-{id}"),
            host_dev: format!("moeh{}", id % 100_000),
            ns_dev: format!("moen{}", id % 100_000),
            host_ip: format!("10.203.{}.1", id % 250),
            ns_ip: format!("10.203.{}.2", id % 250),
            iptables: std::process::Command::new("iptables")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            dropping: false,
        };
        ip(None, &["netns", "add", &n.ns])?;
        // From here on Drop cleans up whatever was made.
        ip(
            None,
            &[
                "link",
                "add",
                &n.host_dev,
                "type",
                "veth",
                "peer",
                "name",
                &n.ns_dev,
            ],
        )?;
        ip(None, &["link", "set", &n.ns_dev, "netns", &n.ns])?;
        ip(
            None,
            &[
                "addr",
                "add",
                &format!("{}/30", n.host_ip),
                "dev",
                &n.host_dev,
            ],
        )?;
        ip(None, &["link", "set", &n.host_dev, "up"])?;
        let ns = Some(n.ns.as_str());
        ip(
            ns,
            &["addr", "add", &format!("{}/30", n.ns_ip), "dev", &n.ns_dev],
        )?;
        ip(ns, &["link", "set", &n.ns_dev, "up"])?;
        ip(ns, &["link", "set", "lo", "up"])?;
        Ok(n)
    }

    fn method(&self) -> &'static str {
        if self.iptables {
            "iptables DROP on both ends"
        } else {
            "neighbour entries to an absent MAC on both ends (no iptables here)"
        }
    }

    /// Drops (`on`) or passes again (`!on`) every packet between the two ends.
    fn drop_packets(&mut self, on: bool) -> Result<(), String> {
        if self.iptables {
            let op = if on { "-A" } else { "-D" };
            run(
                "iptables",
                &[op, "INPUT", "-i", &self.host_dev, "-j", "DROP"],
            )?;
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &self.ns,
                    "iptables",
                    op,
                    "INPUT",
                    "-i",
                    &self.ns_dev,
                    "-j",
                    "DROP",
                ],
            )?;
        } else if on {
            ip(
                None,
                &[
                    "neigh",
                    "replace",
                    &self.ns_ip,
                    "lladdr",
                    "02:00:5e:00:53:01",
                    "dev",
                    &self.host_dev,
                    "nud",
                    "permanent",
                ],
            )?;
            ip(
                Some(&self.ns),
                &[
                    "neigh",
                    "replace",
                    &self.host_ip,
                    "lladdr",
                    "02:00:5e:00:53:02",
                    "dev",
                    &self.ns_dev,
                    "nud",
                    "permanent",
                ],
            )?;
        } else {
            ip(None, &["neigh", "del", &self.ns_ip, "dev", &self.host_dev])?;
            ip(
                Some(&self.ns),
                &["neigh", "del", &self.host_ip, "dev", &self.ns_dev],
            )?;
        }
        self.dropping = on;
        Ok(())
    }
}

impl Drop for Partitionable {
    fn drop(&mut self) {
        if self.dropping && self.iptables {
            let _ = run(
                "iptables",
                &["-D", "INPUT", "-i", &self.host_dev, "-j", "DROP"],
            );
        }
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = ip(None, &["netns", "del", &self.ns]);
        let _ = ip(None, &["link", "del", &self.host_dev]);
    }
}

/// Forwards TCP connections accepted on `listen` to `to` (the test's etcd, which listens on
/// loopback only, for a worker inside the namespace). Packets dropped on the veth cut it too.
async fn forward(listen: SocketAddr, to: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .expect("bind the etcd forwarder");
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

/// A `moe-worker` process inside network namespace `ns`; killed when dropped.
struct NsWorker(std::process::Child);

impl Drop for NsWorker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_network_partition_between_gateway_and_worker_moves_the_stream_and_the_worker_returns_when_healed()
 {
    let mut net = match Partitionable::create() {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "SKIP a_network_partition_between_gateway_and_worker...: this machine does not let the test build a network namespace with a veth pair (needs root / CAP_NET_ADMIN and iproute2): {e}"
            );
            return;
        }
    };
    eprintln!("partition by {}", net.method());
    let etcd = Etcd::start().await;
    let prefix = "/f-client-partition";
    let etcd_addr: SocketAddr = etcd.endpoint.trim_start_matches("http://").parse().unwrap();
    let forward_addr: SocketAddr = format!("{}:{}", net.host_ip, free_port()).parse().unwrap();
    let forwarder = forward(forward_addr, etcd_addr).await;

    // Worker "a" (full) inside the namespace, reached over the veth pair.
    let a_listen = format!("{}:{}", net.ns_ip, free_port());
    let model = smollm2_moe();
    let worker_bin = bin("moe-worker");
    let args = [
        "netns",
        "exec",
        &net.ns,
        worker_bin.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--offload",
        "full",
        "--listen",
        &a_listen,
        "--id",
        "a",
        "--ctx-size",
        "2048",
        "--parallel",
        "4",
        "--threads",
        "1",
        "--lease-ttl",
        "3s",
        "--etcd",
        &format!("http://{forward_addr}"),
        "--etcd-prefix",
        prefix,
    ];
    let _a = NsWorker(
        std::process::Command::new("ip")
            .args(args)
            .env("RUST_LOG", "warn")
            .env("OMP_WAIT_POLICY", "PASSIVE")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn moe-worker in the namespace"),
    );
    // Worker "b" (cpu-moe) on this side; interactive requests prefer "a" (full).
    let b = Worker::start(WorkerSpec::new("b", "cpu-moe"), Some((&etcd, prefix))).await;
    let reference = generate(&b.url(), greedy(PROMPT, 32))
        .await
        .expect("reference stream");
    for id in ["a", "b"] {
        eventually(
            Duration::from_secs(180),
            "both workers advertised ready with free KV",
            || async {
                let free = etcd.advert(prefix, id).await?.capacity.free_kv_tokens;
                (free > 0).then_some(())
            },
        )
        .await;
    }
    let gateway = Gateway::start(&etcd, prefix, &["--stream-idle-timeout", "1s"]).await;
    let mut c = client(&gateway.url()).await;
    let mut stream = c
        .generate(greedy(PROMPT, 32))
        .await
        .expect("stream starts")
        .into_inner();
    let (mut text, mut ids) = (String::new(), Vec::<u32>::new());
    while ids.len() < 4 {
        let m = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("first tokens")
            .expect("stream runs")
            .expect("stream continues");
        text.push_str(&m.text);
        ids.extend(&m.token_ids);
    }
    net.drop_packets(true).expect("partition");
    let cut = Instant::now();
    let last = tokio::time::timeout(Duration::from_secs(60), async {
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
    })
    .await
    .expect("the stream finished despite the partition");
    let moved = cut.elapsed();
    // It started on "a" across the veth pair (interactive prefers the full worker) and moved.
    assert_eq!(last.migrations, 1, "the stream moved once");
    assert_eq!(last.worker_id, "b");
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert_eq!(text, reference.text, "byte for byte");
    assert_eq!(ids, reference.token_ids);
    // Moved well before the gateway's HTTP/2 keepalive to workers (10 + 5 s) would notice.
    assert!(moved < Duration::from_secs(10), "moved after {moved:?}");
    // Cut off from etcd too, "a" loses its lease (3 s) and leaves every table.
    eventually(
        Duration::from_secs(15),
        "the partitioned worker's advert to expire",
        || async { etcd.advert(prefix, "a").await.is_none().then_some(()) },
    )
    .await;
    let gone = cut.elapsed();
    // New requests go to "b" meanwhile, without waiting on "a".
    let t = Instant::now();
    let during = generate(&gateway.url(), greedy(PROMPT, 4))
        .await
        .expect("served during the partition");
    assert_eq!(during.last.worker_id, "b");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    eprintln!("partition: stream moved after {moved:?}, advert gone after {gone:?}");
    net.drop_packets(false).expect("heal");
    let healed = Instant::now();
    eventually(
        Duration::from_secs(30),
        "the worker to register again once healed",
        || async { etcd.advert(prefix, "a").await.map(drop) },
    )
    .await;
    eprintln!("partition healed: advert back after {:?}", healed.elapsed());
    gateway.stop().await;
    b.stop().await;
    forwarder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_client_that_stops_reading_its_event_stream_is_let_go_and_the_worker_frees_its_slot()
 {
    let etcd = Etcd::start().await;
    let prefix = "/f-client-stall-http";
    let mut spec = WorkerSpec::new("w", "full");
    spec.parallel = 1;
    let worker = Worker::start(spec, Some((&etcd, prefix))).await;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http_arg = http.to_string();
    let gateway = Gateway::start(
        &etcd,
        prefix,
        &["--http-listen", &http_arg, "--stream-idle-timeout", "1s"],
    )
    .await;
    eventually(Duration::from_secs(20), "the HTTP port to open", || async {
        tokio::net::TcpStream::connect(http).await.ok()
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the gateway to see the worker",
        || async {
            let mut s = send(http, "GET /health HTTP/1.1\r\nHost: gw\r\n", b"").await;
            (response(&mut s).await.0 == 200).then_some(())
        },
    )
    .await;
    // A client with a small receive buffer: once it stops reading, the gateway's socket and
    // relay fill after a few hundred events.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(http).await.expect("connect");
    let body =
        format!(r#"{{"prompt":"{PROMPT}","max_tokens":1500,"temperature":0,"stream":true}}"#);
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while got.windows(5).filter(|w| w == b"data:").count() < 3 {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk))
            .await
            .expect("first events")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    eventually(
        Duration::from_secs(5),
        "the sequence to show as active",
        || async {
            etcd.advert(prefix, "w")
                .await
                .filter(|a| a.load.active == 1)
        },
    )
    .await;
    // The client stops reading, its connection open.
    let stopped = Instant::now();
    eventually(
        Duration::from_secs(60),
        "the worker to free the slot of the event stream nobody reads",
        || async {
            etcd.advert(prefix, "w")
                .await
                .filter(|a| a.load.active == 0 && a.capacity.free_kv_tokens == 2048)
        },
    )
    .await;
    let freed = stopped.elapsed();
    // The rest, then the end: an error event, not a finished stream.
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
        .await
        .expect("the response ends once read")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("stream idle timeout"),
        "no idle-timeout error event: ...{}",
        &text[text.len().saturating_sub(600)..]
    );
    assert!(
        !text.contains("[DONE]"),
        "the stream must not have run to its end"
    );
    let events = text.matches("data:").count();
    eprintln!("HTTP client stopped reading: slot freed after {freed:?}, {events} events");
    gateway.stop().await;
    worker.stop().await;
}
