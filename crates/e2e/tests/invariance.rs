//! Issue 14.1 on the real model: greedy output does not depend on which other sequences share
//! the batch, on how a prompt's prefill is chunked, on the prefix cache, or on the offload
//! profile. Each worker runs with the default per-sequence KV streams (`--kv-unified` off).

use std::time::Duration;

use moe_e2e::observe::scrape;
use moe_e2e::*;

/// These tests each run 8–16 concurrent sequences on in-process workers: run them one at a time,
/// so two of them never share the 2 cores of a CI machine (and their timings stay meaningful).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const STORY: &str = "Once upon a time, in a small village by the sea,";
const TOKENS: u32 = 128;

/// Prompts of different lengths and topics, the last one long enough to need several prefill
/// chunks at `--batch-size 32`.
fn prompts() -> Vec<String> {
    let mut p: Vec<String> = [
        STORY,
        "The capital of France is",
        "Water boils at a temperature of",
        "A week has seven days. The days are",
        "The tallest mountain on Earth is",
        "Photosynthesis is the process by which",
        "Here is a short poem about the moon:",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let long = "The history of the lighthouse begins with fires lit on hills to guide ships home. \
        Later, towers of stone carried lamps of oil, and lenses made their light reach far out \
        over the water. Keepers lived in small houses beside them, trimming wicks each night. "
        .repeat(3);
    p.push(format!(
        "{long}Tell me what a lighthouse keeper did each day."
    ));
    p
}

/// A worker with per-sequence KV streams of 512 cells (8 x 512 = 4096). Queued requests wait
/// as long as a loaded CI machine needs for 8 streams of 128 tokens.
fn spec(id: &str, offload: &str) -> WorkerSpec {
    WorkerSpec {
        parallel: 8,
        ctx_size: 4096,
        ..WorkerSpec::new(id, offload)
    }
    .with("--queue-timeout", "300s")
}

async fn solo(url: &str, prompt: &str) -> Collected {
    generate(url, greedy(prompt, TOKENS)).await.expect("solo")
}

/// Sends all prompts at once and returns the outputs in order.
async fn together(url: &str, prompts: &[String]) -> Vec<Collected> {
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, p) = (url.to_string(), p.clone());
            tokio::spawn(async move { generate(&url, greedy(&p, TOKENS)).await })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        let c = tokio::time::timeout(Duration::from_secs(300), h)
            .await
            .expect("concurrent requests finish")
            .expect("task")
            .expect("concurrent");
        out.push(c);
    }
    out
}

fn assert_same(what: &str, expected: &Collected, got: &[Collected]) {
    let differ: Vec<usize> = got
        .iter()
        .enumerate()
        .filter(|(_, c)| c.token_ids != expected.token_ids)
        .map(|(i, _)| i)
        .collect();
    assert!(
        differ.is_empty(),
        "{what}: {} of {} differ from the solo output (first: {:?})\nsolo: {:?}\ngot:  {:?}",
        differ.len(),
        got.len(),
        differ,
        expected.text,
        got[differ[0]].text
    );
    for c in got {
        assert_eq!(c.finish(), expected.finish());
    }
}

/// Every log-probability of `got` has the bits of `expected`'s (the last bits are what differ
/// between kernels, and greedy tokens can hide that).
fn assert_same_bits(what: &str, expected: &Collected, got: &Collected) {
    let bits = |c: &Collected| -> Vec<Vec<u32>> {
        c.logprobs
            .iter()
            .map(|l| l.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    let (want, have) = (bits(expected), bits(got));
    let first = (0..want.len().max(have.len())).find(|&t| want.get(t) != have.get(t));
    assert!(
        first.is_none(),
        "{what}: log-probabilities differ from the solo run's in their bits from token {first:?} \
         on (solo {:?}, got {:?})",
        first.and_then(|t| expected.logprobs.get(t)),
        first.and_then(|t| got.logprobs.get(t))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_concurrent_greedy_requests_equal_the_solo_output() {
    let _serial = SERIAL.lock().await;
    let worker = Worker::start(spec("inv-same", "full"), None).await;
    let url = worker.url();
    let cold = solo(&url, STORY).await;
    assert_eq!(cold.token_ids.len(), TOKENS as usize, "{:?}", cold.text);
    // Again: the whole prompt but its last token comes from the slot's prefix cache.
    let warm = solo(&url, STORY).await;
    assert!(warm.last.usage.unwrap().cached_prompt_tokens > 0);
    assert_eq!(warm.token_ids, cold.token_ids, "prefix cache warm vs cold");
    let eight = vec![STORY.to_string(); 8];
    assert_same("8 together", &cold, &together(&url, &eight).await);
    // 16 on 8 slots: half wait and are admitted while the others decode.
    let sixteen = vec![STORY.to_string(); 16];
    assert_same("16 together", &cold, &together(&url, &sixteen).await);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_prompts_with_chunked_prefill_equal_their_solo_outputs() {
    let _serial = SERIAL.lock().await;
    let prompts = prompts();
    // Small steps: the long prompt is prefilled in chunks whose size depends on how many
    // sequences decode beside it.
    let small_steps = |id: &str| spec(id, "full").with("--batch-size", "32");
    let alone = Worker::start(small_steps("inv-alone"), None).await;
    let mut expected = Vec::new();
    for p in &prompts {
        expected.push(solo(&alone.url(), p).await);
    }
    alone.stop().await;
    let lengths: Vec<usize> = expected.iter().map(|c| c.token_ids.len()).collect();
    assert!(
        lengths.iter().filter(|&&n| n >= 64).count() >= 6,
        "most outputs are long enough to diverge: {lengths:?}"
    );
    // Cold: a fresh worker, nothing cached.
    let worker = Worker::start(small_steps("inv-mixed"), None).await;
    let url = worker.url();
    let cold = together(&url, &prompts).await;
    // Warm: every slot now caches one of the prompts; sent again in reverse order, each lands
    // on the slot caching its prompt.
    let reversed: Vec<String> = prompts.iter().rev().cloned().collect();
    let mut warm = together(&url, &reversed).await;
    warm.reverse();
    for (i, p) in prompts.iter().enumerate() {
        assert_same(&format!("cold {p:?}"), &expected[i], &cold[i..=i]);
        assert_same(&format!("warm {p:?}"), &expected[i], &warm[i..=i]);
    }
    let cached: u32 = warm
        .iter()
        .map(|c| c.last.usage.unwrap().cached_prompt_tokens)
        .sum();
    assert!(cached > 0, "the second round reused cached prefixes");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_offload_profile_gives_the_batched_output_of_full_alone() {
    let _serial = SERIAL.lock().await;
    let full = Worker::start(spec("inv-full", "full"), None).await;
    let expected = solo(&full.url(), STORY).await;
    full.stop().await;
    let eight = vec![STORY.to_string(); 8];
    for profile in ["full", "cpu-moe", "n-cpu-moe:15"] {
        let id = format!("inv-{}", profile.replace(':', "-"));
        let worker = Worker::start(spec(&id, profile), None).await;
        assert_same(profile, &expected, &together(&worker.url(), &eight).await);
        worker.stop().await;
    }
}

/// Issue 14 on the GPU needs sequential decode to be exact also with the prefix cache: prompts
/// are prefilled in `--batch-size` chunks at fixed boundaries and only whole chunks are reused
/// or copied, so a warm request computes the cold run's shapes. Checked here on the CPU with a
/// prompt of several 32-token chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequential_mode_with_a_warm_prefix_cache_equals_the_solo_run() {
    let _serial = SERIAL.lock().await;
    // The long prompt (several 32-token chunks), continued as a story (its question gets an
    // empty greedy answer from this model).
    let prompt = prompts()
        .pop()
        .expect("the long prompt")
        .replace("Tell me what a lighthouse keeper did each day.", STORY);
    let worker = Worker::start(
        spec("inv-sequential", "full")
            .with("--batch-size", "32")
            .with("--decode-mode", "sequential"),
        None,
    )
    .await;
    let url = worker.url();
    let run = |url: String, p: String| async move {
        generate(&url, greedy(&p, 64)).await.expect("sequential")
    };
    let cold = run(url.clone(), prompt.clone()).await;
    assert_eq!(cold.token_ids.len(), 64, "{:?}", cold.text);
    let warm = run(url.clone(), prompt.clone()).await;
    let usage = warm.last.usage.unwrap();
    assert!(
        usage.cached_prompt_tokens >= 64 && usage.cached_prompt_tokens % 32 == 0,
        "whole chunks reused: {usage:?}"
    );
    assert_same("warm", &cold, std::slice::from_ref(&warm));
    let handles: Vec<_> = (0..8)
        .map(|_| tokio::spawn(run(url.clone(), prompt.clone())))
        .collect();
    let mut eight = Vec::new();
    for h in handles {
        eight.push(h.await.expect("task"));
    }
    assert_same("8 together, warm", &cold, &eight);
    worker.stop().await;
}

/// `--decode-mode grouped` on the CPU: prompts prefilled one sequence per call in 32-token
/// chunks at fixed boundaries (as `sequential`), and the step's decodes together in one
/// llama.cpp call. CPU kernels compute each row of that call as alone, so 8 concurrent copies
/// of a request (arriving a step or so apart, so prompt calls share steps with decodes, and
/// warm: whole chunks reused or copied from the prefix cache) equal the solo run, and the solo
/// run equals a `sequential` worker's. The worker's count of llama.cpp calls shows the decodes
/// ran together: one call per sequence and token would be 8 × 63 and more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_mode_decodes_together_and_equals_the_sequential_solo_run() {
    let _serial = SERIAL.lock().await;
    const N: u32 = 64;
    let prompt = prompts()
        .pop()
        .expect("the long prompt")
        .replace("Tell me what a lighthouse keeper did each day.", STORY);
    let run = |url: String, p: String| async move {
        generate(&url, greedy(&p, N)).await.expect("greedy run")
    };
    let mode = |id: &str, mode: &str| {
        spec(id, "full")
            .with("--batch-size", "32")
            .with("--decode-mode", mode)
    };
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let grouped = Worker::start(
        mode("inv-grouped", "grouped").with("--metrics-listen", &metrics.to_string()),
        None,
    )
    .await;
    let url = grouped.url();
    // The counter follows the engine's stats, published every 100 ms while it runs and when
    // it goes idle: read once two scrapes 300 ms apart agree.
    let calls = || async move {
        let read = || async {
            scrape(metrics)
                .await
                .sum("moe_worker_llama_decode_calls_total", &[])
        };
        let mut last = read().await;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = read().await;
            if now == last {
                return now;
            }
            last = now;
        }
    };
    let solo = run(url.clone(), prompt.clone()).await;
    assert_eq!(solo.token_ids.len(), N as usize, "{:?}", solo.text);
    let before = calls().await;
    assert!(before >= N as f64 - 1.0, "{before} calls for the solo run");
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let (url, p) = (url.clone(), prompt.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(150 * i)).await;
                run(url, p).await
            })
        })
        .collect();
    let mut eight = Vec::new();
    for h in handles {
        eight.push(h.await.expect("task"));
    }
    assert_same("grouped, 8 together", &solo, &eight);
    let made = calls().await - before;
    // Each step: at most one call of decodes (8 sequences, within the default
    // --grouped-rows 16), plus the prompt chunks of arrivals (whole
    // chunks of the prompt are cached: its tail, or a few chunks, each).
    assert!(
        (N as f64 - 1.0..4.0 * N as f64).contains(&made),
        "{made} llama.cpp calls for 8 × {N} tokens: decodes not grouped"
    );
    grouped.stop().await;
    let sequential = Worker::start(mode("inv-grouped-seq", "sequential"), None).await;
    let reference = run(sequential.url(), prompt.clone()).await;
    sequential.stop().await;
    assert_same(
        "grouped solo vs sequential solo",
        &reference,
        std::slice::from_ref(&solo),
    );
}

/// The CPU's own batch invariance (llama.cpp patch 0002, applied by scripts/test.sh): on the
/// tiny random MoE, whose F32 router and F16 weights take different ggml-cpu kernels for one row
/// and for several (llamafile's sgemm from 2 rows, `vec_dot` for one) unless the worker switches
/// the row-invariant kernels on, `--decode-mode grouped` advertises itself as invariant, and 8
/// staggered concurrent copies of a request equal the solo run not only in their tokens but in
/// every log-probability, bit for bit (the last bits are what differ between kernels, and
/// greedy tokens can hide that).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cpu_grouped_is_bit_exact_with_the_patched_kernels_on_a_model_with_a_real_router() {
    let _serial = SERIAL.lock().await;
    const N: u32 = 64;
    let worker = Worker::start(
        spec("inv-cpu-grouped", "full")
            .with_model(tiny_moe())
            .with("--decode-mode", "grouped"),
        None,
    )
    .await;
    let url = worker.url();
    let run = |url: String| async move {
        let mut req = greedy(STORY, N);
        req.logprobs = true;
        req.top_logprobs = 4;
        generate(&url, req).await.expect("greedy run")
    };
    let solo = run(url.clone()).await;
    assert!(
        solo.last.batch_invariant,
        "a CPU grouped worker with llama.cpp patch 0002 (AVX2 build) is batch-invariant (is the \
         build unpatched? scripts/test.sh runs scripts/patch-llama.sh --registry)"
    );
    assert_eq!(
        solo.logprobs.len(),
        solo.token_ids.len(),
        "a logprob per token"
    );
    assert!(solo.token_ids.len() >= 16, "{:?}", solo.text);
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100 * i)).await;
                run(url).await
            })
        })
        .collect();
    let mut eight = Vec::new();
    for h in handles {
        eight.push(h.await.expect("task"));
    }
    assert_same("CPU grouped, 8 together", &solo, &eight);
    for (i, c) in eight.iter().enumerate() {
        assert_same_bits(&format!("request {i}"), &solo, c);
    }
    worker.stop().await;
}

/// With per-sequence KV streams llama.cpp computes a call's sequences as one graph only when
/// their stream ids are consecutive, so the worker moves running sequences to close gaps
/// (`BatcherConfig::compact_streams`). A sequence moved in the middle of its generation must
/// go on bit for bit: after solo runs of two prompts (streams 0 and 1 keep their caches), the
/// same two requests and a short one between them take streams 2, 3 and 4 of a CPU `grouped`
/// worker; the short one stops after 2 tokens, its cache moves aside to an empty stream and the
/// sequence of stream 4 moves into stream 3; both long requests still equal their solo runs in
/// every token and log-probability bit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequence_moved_to_close_a_stream_gap_continues_bit_for_bit() {
    let _serial = SERIAL.lock().await;
    const N: u32 = 64;
    const LONG_A: &str = STORY;
    const SHORT: &str = "The capital of France is";
    const LONG_C: &str = "Photosynthesis is the process by which";
    let run = |url: String, prompt: &'static str, n: u32| async move {
        let mut req = greedy(prompt, n);
        req.logprobs = true;
        req.top_logprobs = 2;
        generate(&url, req).await.expect("greedy run")
    };
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let worker = Worker::start(
        spec("inv-move", "full")
            .with_model(tiny_moe())
            .with("--decode-mode", "grouped")
            .with("--metrics-listen", &metrics.to_string()),
        None,
    )
    .await;
    let url = worker.url();
    let solo_a = run(url.clone(), LONG_A, N).await;
    let solo_c = run(url.clone(), LONG_C, N).await;
    assert!(solo_a.token_ids.len() >= 16 && solo_c.token_ids.len() >= 16);
    // The counter follows the engine's stats, published while it runs and when it goes idle.
    let moves = || async move {
        scrape(metrics)
            .await
            .sum("moe_worker_stream_moves_total", &[])
    };
    let before = moves().await;
    let a = tokio::spawn(run(url.clone(), LONG_A, N));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = tokio::spawn(run(url.clone(), SHORT, 2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = tokio::spawn(run(url.clone(), LONG_C, N));
    let (a, b, c) = (
        a.await.expect("a"),
        b.await.expect("b"),
        c.await.expect("c"),
    );
    assert_eq!(b.token_ids.len(), 2);
    let mut moved = 0.0;
    for _ in 0..20 {
        moved = moves().await - before;
        if moved >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        moved >= 2.0,
        "{moved} stream moves: the finished request's cache and then the sequence after it \
         should have moved"
    );
    for (what, solo, got) in [("A", &solo_a, &a), ("C (moved)", &solo_c, &c)] {
        assert_same(what, solo, std::slice::from_ref(got));
        assert_same_bits(what, solo, got);
    }
    worker.stop().await;
}

/// The row-invariant kernels' switches are global to the process (llama.cpp patches 0001 and
/// 0002), and a `grouped` engine leaves them on after its last decode call. A worker started
/// after another in the same process (as these in-process test workers are) must not run its
/// first prompt with them on: two `grouped` workers one after the other give the same first
/// request, bit for bit (before the worker switched them off at load, the second worker's first
/// prompt differed in the last bits of its log-probabilities).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_does_not_inherit_an_earlier_engines_kernel_switches() {
    let _serial = SERIAL.lock().await;
    let first_request = |id: &'static str| async move {
        let worker = Worker::start(
            spec(id, "full")
                .with_model(tiny_moe())
                .with("--decode-mode", "grouped"),
            None,
        )
        .await;
        let mut req = greedy(STORY, 8);
        req.logprobs = true;
        req.top_logprobs = 4;
        let out = generate(&worker.url(), req).await.expect("greedy run");
        worker.stop().await;
        out
    };
    let one = first_request("inv-switch-1").await;
    let two = first_request("inv-switch-2").await;
    assert_eq!(one.token_ids, two.token_ids);
    assert_same_bits(
        "the second worker's first request (kernel switches left on by the first worker?)",
        &one,
        &two,
    );
}
