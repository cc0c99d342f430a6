//! Issue 14 with real workers: a stream that moves to another worker (SIGKILL, drain) gives the
//! client exactly the uninterrupted greedy text, byte for byte, even when the hand-over falls
//! inside a multi-byte character or a stop string; it never moves to a worker serving another
//! model; and a "too long for this worker" refusal is retried on a worker whose context fits.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use moe_common::pb::{FinishReason, GenerateRequest, GenerateResponse, LatencyClass};
use moe_e2e::*;
use tonic::Code;

/// Makes the SmolLM2 MoE write French with accents, a curly apostrophe and emoji: " je suis allé
/// à la plage aujourd’hui 🌊☀️ …" (checked by every test that uses it). Each emoji is split over
/// byte-level tokens, so the worker holds its first bytes back until the character is whole.
const TWEET: &str = "Tweet: Je suis allé à la plage aujourd’hui 🌊☀️ et";

/// A stop string in the middle of the greedy text, many tokens long, with split characters.
const STOP: &str = " plage aujourd’hui 🌊";

/// Tokens per test stream: long enough for the divergence a wrong hand-over causes to show.
const TOKENS: u32 = 64;

/// A worker process with a short drain grace (the harness's is 20 s), so that SIGTERM cancels
/// its streams at once and the gateway migrates them.
async fn draining_worker(spec: WorkerSpec, etcd: &Etcd, prefix: &str) -> WorkerProcess {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let model = spec.model.clone().unwrap_or_else(smollm2_moe);
    let child = Command::new(bin("moe-worker"))
        .args(["--model", &model.to_string_lossy()])
        .args(["--offload", &spec.offload, "--listen", &addr.to_string()])
        .args(["--id", &spec.id, "--ctx-size", &spec.ctx_size.to_string()])
        .args(["--parallel", &spec.parallel.to_string(), "--threads", "1"])
        .args(["--lease-ttl", "3s", "--drain-grace", "0s"])
        .args(["--etcd", &etcd.endpoint, "--etcd-prefix", prefix])
        .env("RUST_LOG", "warn")
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn moe-worker");
    let p = WorkerProcess {
        child,
        addr,
        id: spec.id.clone(),
    };
    eventually(
        Duration::from_secs(60),
        "worker process to register",
        || etcd.advert(prefix, &spec.id),
    )
    .await;
    p
}

/// Every message of a stream, the final one included.
async fn messages(url: &str, req: GenerateRequest) -> Vec<GenerateResponse> {
    let fut = async {
        let mut c = client(url).await;
        let mut stream = c.generate(req).await.expect("stream starts").into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await.expect("stream runs") {
            let last = m.finish_reason != FinishReason::Unspecified as i32;
            out.push(m);
            if last {
                break;
            }
        }
        out
    };
    tokio::time::timeout(Duration::from_secs(120), fut)
        .await
        .expect("stream finished within 120 s")
}

fn text_of(ms: &[GenerateResponse]) -> String {
    ms.iter().map(|m| m.text.as_str()).collect()
}

fn ids_of(ms: &[GenerateResponse]) -> Vec<u32> {
    ms.iter()
        .flat_map(|m| m.token_ids.iter().copied())
        .collect()
}

fn finish_of(ms: &[GenerateResponse]) -> FinishReason {
    let last = ms.last().expect("a final message");
    FinishReason::try_from(last.finish_reason).expect("finish reason")
}

/// Indexes of messages that carry more than one token: text the worker held back (a character
/// split over tokens, or text that might have become a stop string) released with its ids.
fn held_releases(ms: &[GenerateResponse]) -> Vec<usize> {
    ms.iter()
        .enumerate()
        .filter(|(_, m)| m.token_ids.len() > 1)
        .map(|(i, _)| i)
        .collect()
}

/// The reference: the uninterrupted greedy stream, which must contain multi-byte characters,
/// some of them split over tokens (so held back by the worker).
async fn french_reference(url: &str) -> Vec<GenerateResponse> {
    let reference = messages(url, greedy(TWEET, TOKENS)).await;
    let text = text_of(&reference);
    assert!(
        text.chars().filter(|c| c.len_utf8() > 1).count() >= 2,
        "the prompt must make the model write multi-byte characters: {text:?}"
    );
    assert!(
        !held_releases(&reference).is_empty(),
        "some character must be split over tokens: {text:?}"
    );
    assert_eq!(finish_of(&reference), FinishReason::Length);
    assert_eq!(ids_of(&reference).len(), TOKENS as usize);
    reference
}

/// The greedy text before `STOP`, checking that `STOP` starts where a message (whole tokens)
/// starts and spans several tokens, so that the worker holds it back while it grows.
fn before_stop(reference: &[GenerateResponse]) -> String {
    let text = text_of(reference);
    let at = text
        .find(STOP)
        .expect("the stop string is in the greedy text");
    let starts: Vec<usize> = reference
        .iter()
        .scan(0, |len, m| {
            let start = *len;
            *len += m.text.len();
            Some(start)
        })
        .collect();
    let first = starts
        .iter()
        .position(|&s| s == at)
        .expect("stop starts a token");
    let n = starts
        .iter()
        .filter(|&&s| s >= at && s < at + STOP.len())
        .count();
    assert!(n >= 5, "the stop string spans {n} messages from {first}");
    text[..at].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resuming_where_the_client_text_ends_is_byte_exact_across_profiles() {
    // What the gateway does on a migration, done by hand so that the hand-over falls exactly
    // where the first worker holds text back: the second worker (another offload profile)
    // gets the ids the client received as `resume_token_ids`.
    let full = Worker::start(WorkerSpec::new("full", "full"), None).await;
    let offload = Worker::start(WorkerSpec::new("offload", "cpu-moe"), None).await;
    let reference = french_reference(&full.url()).await;
    let text = text_of(&reference);

    // Inside a split character: the client has everything before the message that completed it.
    for &held in held_releases(&reference).iter().take(2) {
        let before = &reference[..held];
        let mut req = greedy(TWEET, TOKENS);
        req.resume_token_ids = ids_of(before);
        let rest = messages(&offload.url(), req).await;
        assert_eq!(
            format!("{}{}", text_of(before), text_of(&rest)),
            text,
            "hand-over before message {held}"
        );
        assert_eq!(finish_of(&rest), FinishReason::Length);
    }

    // Inside a stop string: the first worker holds the stop's tokens, so the client's ids end
    // before it, and the second worker regenerates them and stops there.
    let expected = before_stop(&reference);
    let mut req = greedy(TWEET, TOKENS);
    req.stop = vec![STOP.into()];
    let stopped = messages(&full.url(), req.clone()).await;
    assert_eq!(text_of(&stopped), expected);
    assert_eq!(finish_of(&stopped), FinishReason::Stop);
    req.resume_token_ids = ids_of(&stopped);
    let rest = messages(&offload.url(), req).await;
    assert_eq!(text_of(&rest), "", "nothing after the stop string");
    assert_eq!(finish_of(&rest), FinishReason::Stop, "stop string {STOP:?}");
    full.stop().await;
    offload.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_inside_a_split_character_migrates_full_to_cpu_moe_byte_exact() {
    let etcd = Etcd::start().await;
    let prefix = "/t-mig-kill";
    let a = WorkerProcess::start(WorkerSpec::new("a", "full"), &etcd, prefix).await;
    let reference = french_reference(&format!("http://{}", a.addr)).await;
    let b = WorkerProcess::start(WorkerSpec::new("b", "cpu-moe"), &etcd, prefix).await;
    have_free_kv(&etcd, prefix, &["a", "b"]).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;

    // Interactive work starts on the full worker; kill it when the client has the text just
    // before the first split character, i.e. while the worker holds that character's bytes.
    let held = held_releases(&reference)[0];
    let mut c = client(&gateway.url()).await;
    let mut stream = c
        .generate(greedy(TWEET, TOKENS))
        .await
        .unwrap()
        .into_inner();
    let (mut text, mut ids) = (String::new(), Vec::new());
    read_until(
        &mut stream,
        &mut text,
        &mut ids,
        text_of(&reference[..held]).len(),
    )
    .await;
    // No round trip to etcd before the kill: it must land inside the held character.
    a.signal("KILL");
    let last = read_to_end(&mut stream, &mut text, &mut ids).await;
    assert_eq!(last.migrations, 1, "the stream moved once");
    assert_eq!(
        (last.worker_id.as_str(), last.offload_profile.as_str()),
        ("b", "cpu-moe")
    );
    assert_eq!(last.finish_reason, FinishReason::Length as i32);
    assert_eq!(last.usage.unwrap().completion_tokens, TOKENS);
    assert_eq!(text, text_of(&reference), "byte for byte");
    assert_eq!(ids, ids_of(&reference));
    drop(a);
    drop(b);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_inside_a_stop_string_migrates_and_the_stop_string_still_ends_the_stream() {
    let etcd = Etcd::start().await;
    let prefix = "/t-mig-drain";
    let a = draining_worker(WorkerSpec::new("a", "full"), &etcd, prefix).await;
    let reference = french_reference(&format!("http://{}", a.addr)).await;
    let expected = before_stop(&reference);
    let b = draining_worker(WorkerSpec::new("b", "cpu-moe"), &etcd, prefix).await;
    have_free_kv(&etcd, prefix, &["a", "b"]).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;

    let mut req = greedy(TWEET, TOKENS);
    req.stop = vec![STOP.into()];
    let mut c = client(&gateway.url()).await;
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let (mut text, mut ids) = (String::new(), Vec::new());
    // All the text before the stop string has arrived: the worker is inside the stop string.
    read_until(&mut stream, &mut text, &mut ids, expected.len()).await;
    assert_eq!(text, expected);
    // Interactive work starts on the full worker `a` (checked by where the stream ends).
    a.signal("TERM");
    let last = read_to_end(&mut stream, &mut text, &mut ids).await;
    assert_eq!(
        last.migrations, 1,
        "the drain cancelled the stream inside the stop string and it moved"
    );
    assert_eq!(last.worker_id, "b");
    assert_eq!(
        last.finish_reason,
        FinishReason::Stop as i32,
        "stop string {STOP:?} spanning the hand-over ends the stream"
    );
    assert_eq!(
        text, expected,
        "byte for byte, nothing past the stop string"
    );
    drop(a);
    drop(b);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_without_a_model_never_migrates_to_a_worker_of_another_model() {
    let etcd = Etcd::start().await;
    let prefix = "/t-mig-model";
    // Batch work stays in the cpu-moe pool (spill off) and goes to the most free KV: the
    // SmolLM2 worker `a` (4096 cells) first. When it dies, the only cpu-moe worker left serves
    // tiny-moe; the only SmolLM2 worker left is in the full pool (a fallback for retries).
    let mut spec = WorkerSpec::new("a", "cpu-moe");
    spec.ctx_size = 4096;
    let a = WorkerProcess::start(spec, &etcd, prefix).await;
    let tiny = WorkerProcess::start(
        WorkerSpec::new("tiny", "cpu-moe").with_model(tiny_moe()),
        &etcd,
        prefix,
    )
    .await;
    let b = WorkerProcess::start(WorkerSpec::new("b", "full"), &etcd, prefix).await;
    let reference = french_reference(&format!("http://{}", b.addr)).await;
    have_free_kv(&etcd, prefix, &["a", "tiny", "b"]).await;
    let gateway = Gateway::start(&etcd, prefix, &["--batch-spill", "off"]).await;

    let mut req = greedy(TWEET, TOKENS);
    req.latency_class = LatencyClass::Batch as i32;
    assert!(req.model.is_empty());
    let mut c = client(&gateway.url()).await;
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let (mut text, mut ids) = (String::new(), Vec::new());
    read_until(&mut stream, &mut text, &mut ids, 8).await;
    // The stream ends on `b` after one migration, so it started on `a`.
    a.signal("KILL");
    let last = read_to_end(&mut stream, &mut text, &mut ids).await;
    assert_eq!(last.migrations, 1);
    assert_eq!(
        last.worker_id, "b",
        "continued by the same model (SmolLM2), not by the tiny-moe worker"
    );
    assert_eq!(text, text_of(&reference), "byte for byte");
    assert_eq!(ids, ids_of(&reference));
    drop(a);
    drop(tiny);
    drop(b);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn too_long_for_one_worker_is_retried_on_a_worker_whose_context_fits() {
    let etcd = Etcd::start().await;
    let prefix = "/t-mig-long";
    // Digits are one token each, so the gateway's estimate (3 bytes a token) is a third of the
    // real prompt: it places on the small full worker, which refuses.
    let prompt = "0123456789".repeat(40);
    // Two sequences each: 256 KV cells a request on the small worker, 1024 on the big one.
    let mut small = WorkerSpec::new("small", "full");
    small.ctx_size = 512;
    small.parallel = 2;
    let small = Worker::start(small, Some((&etcd, prefix))).await;
    let gateway = Gateway::start(&etcd, prefix, &[]).await;
    have_free_kv(&etcd, prefix, &["small"]).await;
    let refused = generate(&gateway.url(), greedy(&prompt, 8))
        .await
        .expect_err("no worker's context fits");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");

    let mut big = WorkerSpec::new("big", "cpu-moe");
    big.ctx_size = 2048;
    big.parallel = 2;
    let big = Worker::start(big, Some((&etcd, prefix))).await;
    have_free_kv(&etcd, prefix, &["big"]).await;
    // Once the gateway's table has the big worker, the refusal is retried there.
    let out = eventually(
        Duration::from_secs(10),
        "a retry on the worker whose context fits",
        || {
            let (url, prompt) = (gateway.url(), prompt.clone());
            async move { generate(&url, greedy(&prompt, 8)).await.ok() }
        },
    )
    .await;
    assert_eq!(out.last.worker_id, "big");
    assert_eq!(out.last.migrations, 0);
    assert_eq!(out.finish(), FinishReason::Length);
    assert!(out.last.usage.unwrap().prompt_tokens > 256);
    gateway.stop().await;
    small.stop().await;
    big.stop().await;
}
