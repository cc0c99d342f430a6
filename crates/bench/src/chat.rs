//! Multi-turn chat workload (`--chat-conversations N --chat-turns T`, gRPC targets): N
//! conversations run at once, each sending T turns one after another. Every conversation starts
//! with the same system prompt (`--chat-system-tokens`) and its own first user message
//! (`--prompt-tokens`); later turns add the assistant's reply and a short question, so each
//! turn's prompt begins with the whole previous turn. Reported per turn: client-measured time to
//! first token and the share of prompt tokens the serving worker reused from its prefix cache
//! (`usage.cached_prompt_tokens / usage.prompt_tokens`). `--chat-think-ms` pauses before each
//! later turn (a user reading the answer); without it the next turn follows at once.

use std::fmt::Write as _;
use std::time::Duration;

use moe_common::pb::v1::inference_client::InferenceClient;
use moe_common::pb::{ChatMessage, FinishReason, GenerateRequest, SamplingParams};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::client::BenchError;
use crate::config::BenchConfig;
use crate::report::percentile;
use crate::target::Target;

/// One turn as the client saw it.
#[derive(Clone, Debug, Serialize)]
pub struct ChatTurn {
    pub conversation: u32,
    /// 1-based.
    pub turn: u32,
    pub ttft_seconds: f64,
    /// When the turn was sent, seconds after the first turns were (which turns overlapped).
    pub started_seconds: f64,
    /// The worker's own view (`Timings` of the final message): arrival to admission, and
    /// arrival to first token. The client's TTFT less the worker's is the gateway's share
    /// (tokenizing for placement, ranking, proxying) and the network.
    pub worker_queue_seconds: f64,
    pub worker_ttft_seconds: f64,
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
    pub worker_id: String,
    /// Whether the previous turn of the conversation was served by the same worker (later
    /// turns only; false for turn 1).
    pub same_worker: bool,
}

/// Turns summarised together (one turn number, or all later turns).
#[derive(Clone, Debug, Serialize)]
pub struct TurnSummary {
    pub turns: String,
    pub requests: usize,
    pub ttft_p50_seconds: Option<f64>,
    pub ttft_p90_seconds: Option<f64>,
    /// p50 of the worker-measured TTFT (arrival at the worker to first token) and of the
    /// worker's admission queue: where the client's TTFT went.
    pub worker_ttft_p50_seconds: Option<f64>,
    pub worker_queue_p50_seconds: Option<f64>,
    /// Turns served by the worker that served the conversation's previous turn.
    pub same_worker: usize,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub cached_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChatReport {
    pub label: String,
    pub target: String,
    pub conversations: u32,
    pub turns: u32,
    pub system_tokens: u32,
    pub first_message_tokens: u32,
    pub max_tokens: u32,
    pub think_ms: u64,
    /// Seed of the conversations' first messages (`--chat-seed`, else from the label).
    pub seed: u64,
    pub errors: Vec<String>,
    pub by_turn: Vec<TurnSummary>,
    /// Turns 2 and later together.
    pub later_turns: TurnSummary,
    pub all: Vec<ChatTurn>,
}

fn msg(role: &str, content: String) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content,
        ..Default::default()
    }
}

/// Runs the chat workload against a gRPC target.
pub async fn run(
    config: &BenchConfig,
    cancel: CancellationToken,
) -> Result<ChatReport, BenchError> {
    let Target::Grpc { addr } = config.target else {
        return Err(BenchError::Connect(
            "the chat workload needs a grpc:// target".into(),
        ));
    };
    let channel = Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| BenchError::Connect(e.to_string()))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| BenchError::Connect(format!("{addr}: {e}")))?;
    let client = InferenceClient::new(channel);
    // Gateways answer UNAVAILABLE until they have seen a worker: probe until one answers.
    let deadline = Instant::now() + config.wait_ready;
    loop {
        let probe = GenerateRequest {
            messages: vec![msg("user", "Hello.".into())],
            max_tokens: 1,
            sampling: Some(SamplingParams::default()),
            ..Default::default()
        };
        match turn(&mut client.clone(), probe).await {
            Ok(_) => break,
            Err(e) if Instant::now() >= deadline || cancel.is_cancelled() => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let system = crate::prompt::build(config.chat_system_tokens, 7_777_777);
    // A separate range of prompt indexes per run label, so two runs against the same workers
    // do not share their conversations' documents.
    let seed = config
        .chat_seed
        .unwrap_or_else(|| u64::from(label_hash(&config.label)) * 1_000);
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..config.chat_conversations {
        let (mut client, cancel) = (client.clone(), cancel.clone());
        let system = system.clone();
        let config = config.clone();
        tasks.spawn(async move {
            let mut history = vec![
                msg("system", system),
                msg(
                    "user",
                    crate::prompt::build(config.prompt_tokens, seed + u64::from(c)),
                ),
            ];
            let mut turns = Vec::new();
            let mut previous: Option<String> = None;
            for t in 1..=config.chat_turns {
                if cancel.is_cancelled() {
                    break;
                }
                if t > 1 {
                    let pause = think_ms(config.chat_think_ms, c, t);
                    if pause > 0 {
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                    history.push(msg("user", format!("Now tell me more about part {t}.")));
                }
                let req = GenerateRequest {
                    messages: history.clone(),
                    max_tokens: config.max_tokens,
                    sampling: Some(SamplingParams::default()),
                    latency_class: config.class.to_proto() as i32,
                    ..Default::default()
                };
                let started = t0.elapsed().as_secs_f64();
                let r = tokio::time::timeout(config.request_timeout, turn(&mut client, req)).await;
                match r {
                    Ok(Ok((text, mut record))) => {
                        record.conversation = c;
                        record.turn = t;
                        record.started_seconds = started;
                        record.same_worker = previous.as_deref() == Some(record.worker_id.as_str());
                        previous = Some(record.worker_id.clone());
                        history.push(msg("assistant", text));
                        turns.push(Ok(record));
                    }
                    Ok(Err(e)) => {
                        turns.push(Err(format!("conversation {c} turn {t}: {e}")));
                        break;
                    }
                    Err(_) => {
                        turns.push(Err(format!(
                            "conversation {c} turn {t}: timed out after {:?}",
                            config.request_timeout
                        )));
                        break;
                    }
                }
            }
            turns
        });
    }
    let mut all = Vec::new();
    let mut errors = Vec::new();
    while let Some(done) = tasks.join_next().await {
        for r in done.map_err(|e| BenchError::Protocol(e.to_string()))? {
            match r {
                Ok(t) => all.push(t),
                Err(e) => errors.push(e),
            }
        }
    }
    all.sort_by_key(|t| (t.turn, t.conversation));
    let by_turn = (1..=config.chat_turns)
        .map(|t| summarise(&t.to_string(), all.iter().filter(|x| x.turn == t)))
        .collect();
    let later_turns = summarise("2+", all.iter().filter(|x| x.turn >= 2));
    Ok(ChatReport {
        label: config.label.clone(),
        target: config.target.to_string(),
        conversations: config.chat_conversations,
        turns: config.chat_turns,
        system_tokens: config.chat_system_tokens,
        first_message_tokens: config.prompt_tokens,
        max_tokens: config.max_tokens,
        think_ms: config.chat_think_ms,
        seed,
        errors,
        by_turn,
        later_turns,
        all,
    })
}

/// The pause before turn `t` of conversation `c`: uniform in 0..=`max` ms, the same every run
/// (splitmix64 of conversation and turn).
fn think_ms(max: u64, c: u32, t: u32) -> u64 {
    if max == 0 {
        return 0;
    }
    let mut x = (u64::from(c) << 32 | u64::from(t)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x % (max + 1)
}

/// A stable small number from the run label (FNV-1a), for prompt indexes.
fn label_hash(label: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in label.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % 100_000
}

async fn turn(
    client: &mut InferenceClient<Channel>,
    req: GenerateRequest,
) -> Result<(String, ChatTurn), BenchError> {
    let status = |s: tonic::Status| BenchError::Status {
        code: s.code(),
        message: s.message().to_string(),
    };
    let started = Instant::now();
    let mut first: Option<Duration> = None;
    let mut text = String::new();
    let mut stream = client.generate(req).await.map_err(status)?.into_inner();
    while let Some(m) = stream.message().await.map_err(status)? {
        if first.is_none() && !m.token_ids.is_empty() {
            first = Some(started.elapsed());
        }
        text.push_str(&m.text);
        if m.finish_reason != FinishReason::Unspecified as i32 {
            let usage = m.usage.unwrap_or_default();
            let timings = m.timings.unwrap_or_default();
            let ttft = first.ok_or(BenchError::NoTokens)?;
            return Ok((
                text,
                ChatTurn {
                    conversation: 0,
                    turn: 0,
                    ttft_seconds: ttft.as_secs_f64(),
                    started_seconds: 0.0,
                    worker_queue_seconds: timings.queue_seconds,
                    worker_ttft_seconds: timings.time_to_first_token_seconds,
                    prompt_tokens: usage.prompt_tokens,
                    cached_prompt_tokens: usage.cached_prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                    worker_id: m.worker_id,
                    same_worker: false,
                },
            ));
        }
    }
    Err(BenchError::Protocol(
        "stream ended without a final message".into(),
    ))
}

fn summarise<'a>(label: &str, turns: impl Iterator<Item = &'a ChatTurn>) -> TurnSummary {
    let turns: Vec<&ChatTurn> = turns.collect();
    let sorted = |f: fn(&ChatTurn) -> f64| {
        let mut v: Vec<f64> = turns.iter().map(|t| f(t)).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let ttft = sorted(|t| t.ttft_seconds);
    let worker_ttft = sorted(|t| t.worker_ttft_seconds);
    let worker_queue = sorted(|t| t.worker_queue_seconds);
    let prompt: u64 = turns.iter().map(|t| u64::from(t.prompt_tokens)).sum();
    let cached: u64 = turns
        .iter()
        .map(|t| u64::from(t.cached_prompt_tokens))
        .sum();
    TurnSummary {
        turns: label.to_string(),
        requests: turns.len(),
        ttft_p50_seconds: percentile(&ttft, 50.0),
        ttft_p90_seconds: percentile(&ttft, 90.0),
        worker_ttft_p50_seconds: percentile(&worker_ttft, 50.0),
        worker_queue_p50_seconds: percentile(&worker_queue, 50.0),
        same_worker: turns.iter().filter(|t| t.same_worker).count(),
        prompt_tokens: prompt,
        cached_prompt_tokens: cached,
        cached_ratio: cached as f64 / prompt.max(1) as f64,
    }
}

impl ChatReport {
    /// The per-turn table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} ({}): {} conversations x {} turns, system prompt ~{} tokens, first message ~{} tokens, {} tokens per reply",
            self.label,
            self.target,
            self.conversations,
            self.turns,
            self.system_tokens,
            self.first_message_tokens,
            self.max_tokens
        );
        let _ = writeln!(
            out,
            "{:>6} {:>8} {:>12} {:>12} {:>14} {:>16} {:>14} {:>12}",
            "turn",
            "requests",
            "ttft p50 s",
            "ttft p90 s",
            "cached/prompt",
            "worker ttft p50",
            "queue p50 s",
            "same worker"
        );
        for s in self
            .by_turn
            .iter()
            .chain(std::iter::once(&self.later_turns))
        {
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
            let _ = writeln!(
                out,
                "{:>6} {:>8} {:>12} {:>12} {:>14.3} {:>16} {:>14} {:>12}",
                s.turns,
                s.requests,
                f(s.ttft_p50_seconds),
                f(s.ttft_p90_seconds),
                s.cached_ratio,
                f(s.worker_ttft_p50_seconds),
                f(s.worker_queue_p50_seconds),
                s.same_worker
            );
        }
        for e in &self.errors {
            let _ = writeln!(out, "error: {e}");
        }
        out
    }
}
