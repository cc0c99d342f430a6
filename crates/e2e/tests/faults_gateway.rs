//! Issue 16, faults on the gateway's serving path end to end (real etcd, real llama.cpp workers,
//! a real gateway): a worker wedged mid-stream (SIGSTOP: its TCP connection stays up, it sends
//! nothing) is given up after the gateway's stream idle timeout and the stream moves to another
//! worker byte for byte (review H6), instead of hanging until the connection's keepalive or the
//! client's deadline.

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
