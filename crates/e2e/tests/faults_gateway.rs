//! Issue 16, faults on the gateway's serving path end to end (real etcd, real llama.cpp workers,
//! a real gateway): a worker wedged mid-stream (SIGSTOP: its TCP connection stays up, it sends
//! nothing) is given up after the gateway's stream idle timeout and the stream moves to another
//! worker byte for byte (review H6), instead of hanging until the connection's keepalive or the
//! client's deadline. A gateway process killed (SIGKILL) mid-stream: the client's stream ends
//! with an error instead of hanging, the worker frees the slot, and a gateway started again on
//! the same port serves at once.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moe_common::pb::FinishReason;
use moe_e2e::*;

const PROMPT: &str = "Once upon a time, in a small village by the sea,";
const TOKENS: u32 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_wedged_mid_stream_is_left_after_the_idle_timeout_and_the_stream_moves() {
    let etcd = Etcd::start().await;
    let prefix = "/f-gw-wedge";
    let a = WorkerProcess::start(WorkerSpec::new("a", "full"), &etcd, prefix).await;
    let reference = generate(&format!("http://{}", a.addr), greedy(PROMPT, TOKENS))
        .await
        .expect("reference stream");
    assert_eq!(
        reference.token_ids.len(),
        TOKENS as usize,
        "a long reference"
    );
    let b = WorkerProcess::start(WorkerSpec::new("b", "cpu-moe"), &etcd, prefix).await;
    have_free_kv(&etcd, prefix, &["a", "b"]).await;
    let gateway = Gateway::start(&etcd, prefix, &["--stream-idle-timeout", "1s"]).await;

    let mut c = client(&gateway.url()).await;
    let mut stream = c
        .generate(greedy(PROMPT, TOKENS))
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
        assert_eq!(m.finish_reason, FinishReason::Unspecified as i32);
        text.push_str(&m.text);
        ids.extend(&m.token_ids);
    }
    a.signal("STOP");
    let wedged = Instant::now();
    let last = read_to_end(&mut stream, &mut text, &mut ids).await;
    let took = wedged.elapsed();
    a.signal("CONT");
    assert_eq!(last.migrations, 1, "the stream moved once");
    assert_eq!(last.worker_id, "b");
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert_eq!(text, reference.text, "byte for byte");
    assert_eq!(ids, reference.token_ids);
    // The idle timeout (1 s) fired, not the 15 s of HTTP/2 keepalive to the worker.
    assert!(took < Duration::from_secs(10), "moved after {took:?}");
    drop(a);
    drop(b);
    gateway.stop().await;
}

/// A `moe-gateway` process on 127.0.0.1:`port`.
fn gateway_process(port: u16, etcd: &Etcd, prefix: &str, extra: &[&str]) -> std::process::Child {
    Command::new(bin("moe-gateway"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--etcd", &etcd.endpoint, "--etcd-prefix", prefix])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn moe-gateway")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_mid_stream_frees_the_worker_slot_and_its_restart_serves_at_once() {
    let etcd = Etcd::start().await;
    let prefix = "/f-gw-kill";
    // One sequence of 2048 cells: a 1500-token stream takes far longer than the test.
    let mut spec = WorkerSpec::new("a", "full");
    spec.parallel = 1;
    let _a = WorkerProcess::start(spec, &etcd, prefix).await;
    have_free_kv(&etcd, prefix, &["a"]).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut g = gateway_process(port, &etcd, prefix, &[]);
    let serves = || async {
        let c = tonic::transport::Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .ok()?;
        let mut c = moe_common::pb::v1::inference_client::InferenceClient::new(c);
        let mut s = c.generate(greedy(PROMPT, 2)).await.ok()?.into_inner();
        while let Some(m) = s.message().await.ok()? {
            if m.finish_reason != FinishReason::Unspecified as i32 {
                return Some(());
            }
        }
        None
    };
    eventually(Duration::from_secs(30), "the gateway serves", serves).await;
    let mut stream = client(&url)
        .await
        .generate(greedy(PROMPT, 1500))
        .await
        .expect("stream starts")
        .into_inner();
    let (mut text, mut ids) = (String::new(), Vec::<u32>::new());
    read_until(&mut stream, &mut text, &mut ids, 8).await;
    serving_worker(&etcd, prefix, &["a"]).await;
    g.kill().expect("SIGKILL");
    g.wait().unwrap();
    let killed = Instant::now();
    // The client's stream ends with an error (there is no client-side resume), never hangs.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(m)) => assert_eq!(m.finish_reason, FinishReason::Unspecified as i32),
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the client's stream ends after the kill");
    assert!(end.is_some(), "ended with an error status");
    // The worker saw its gateway connection go and freed the slot and its KV.
    eventually(
        Duration::from_secs(10),
        "the worker frees the slot",
        || async {
            let a = etcd.advert(prefix, "a").await?;
            (a.load.active == 0 && a.capacity.free_kv_tokens == 2048).then_some(())
        },
    )
    .await;
    let freed = killed.elapsed();
    // A gateway started again on the same port serves at once.
    let restarted = Instant::now();
    let mut g = gateway_process(port, &etcd, prefix, &[]);
    eventually(
        Duration::from_secs(30),
        "the restarted gateway serves",
        serves,
    )
    .await;
    let took = restarted.elapsed();
    let _ = g.kill();
    let _ = g.wait();
    assert!(
        freed < Duration::from_secs(5),
        "slot freed {freed:?} after the kill"
    );
    assert!(
        took < Duration::from_secs(10),
        "restarted gateway served after {took:?}"
    );
}

/// Issue 16 (M11): on SIGTERM a gateway process lets a running stream finish, cuts what still
/// runs once `--drain-grace` is over, and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_sigterm_finishes_running_streams_and_exits_after_the_drain_grace() {
    let etcd = Etcd::start().await;
    let prefix = "/f-gw-drain";
    let mut spec = WorkerSpec::new("a", "full");
    spec.parallel = 2;
    let _a = WorkerProcess::start(spec, &etcd, prefix).await;
    have_free_kv(&etcd, prefix, &["a"]).await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut g = gateway_process(port, &etcd, prefix, &["--drain-grace", "4s"]);
    let c = eventually(Duration::from_secs(30), "the gateway listens", || async {
        let ch = tonic::transport::Channel::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .ok()?;
        Some(moe_common::pb::v1::inference_client::InferenceClient::new(
            ch,
        ))
    })
    .await;
    let start = |n| {
        let c = c.clone();
        async move {
            eventually(Duration::from_secs(30), "a stream starts", || {
                let mut c = c.clone();
                async move { Some(c.generate(greedy(PROMPT, n)).await.ok()?.into_inner()) }
            })
            .await
        }
    };
    let mut short = start(12).await;
    let mut long = start(900).await;
    let (mut text, mut ids) = (String::new(), Vec::<u32>::new());
    read_until(&mut short, &mut text, &mut ids, 4).await;
    let (mut long_text, mut long_ids) = (String::new(), Vec::<u32>::new());
    read_until(&mut long, &mut long_text, &mut long_ids, 4).await;
    let term = Command::new("kill")
        .args(["-TERM", &g.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let draining = Instant::now();
    let last = read_to_end(&mut short, &mut text, &mut ids).await;
    assert_eq!(last.finish_reason, FinishReason::Length as i32, "finished");
    // The long stream ends by the grace (cut) or before it (done); never later.
    let long_end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match long.message().await {
                Ok(Some(m)) if m.finish_reason != FinishReason::Unspecified as i32 => break,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    })
    .await;
    assert!(long_end.is_ok(), "the long stream ends within the grace");
    let code = eventually(Duration::from_secs(15), "the gateway exits", || {
        let status = g.try_wait().unwrap();
        async move { status }
    })
    .await;
    let took = draining.elapsed();
    assert_eq!(code.code(), Some(0), "a drained gateway exits 0");
    assert!(
        took < Duration::from_secs(9),
        "exited {took:?} after SIGTERM"
    );
}
