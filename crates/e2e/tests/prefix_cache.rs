//! Issue 17, worker half, on the real model: the prefix cache keeps what is valuable. Four
//! multi-turn chats sharing a system prompt take turns on one worker with two decode slots and
//! four cache-only KV streams (`--cache-sequences 4`): every chat keeps its history between
//! turns (a new chat never overwrites another's longer history), and a chat's first turn gets
//! the shared system prompt copied from another stream instead of recomputing it.

use moe_common::pb::{ChatMessage, GenerateRequest};
use moe_e2e::*;

const CHATS: usize = 4;
const TURNS: usize = 4;

/// About 100 tokens, the same for every chat.
const SYSTEM: &str = "You are a helpful assistant for a small seaside village. You answer questions \
    about the harbour, the lighthouse, the fishing boats, the weather and the tides, the bakery \
    on the main street, the school, the library and the old church on the hill. Keep answers \
    short, friendly and factual, and say so when you do not know something. Never invent \
    opening hours or prices.";

const TOPICS: [&str; CHATS] = ["the lighthouse", "the bakery", "the tides", "the school"];

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interleaved_chats_keep_their_history_and_share_the_system_prompt() {
    // 2 + 4 streams of 512 cells: more chats than decode slots, each within its stream.
    let spec = WorkerSpec {
        parallel: 2,
        ctx_size: 1024,
        ..WorkerSpec::new("prefix-cache", "full")
    }
    .with("--cache-sequences", "4");
    let worker = Worker::start(spec, None).await;
    let url = worker.url();
    let mut chats: Vec<Vec<ChatMessage>> = (0..CHATS)
        .map(|_| vec![message("system", SYSTEM)])
        .collect();
    // (chat, turn, prompt tokens, cached prompt tokens)
    let mut usage = Vec::new();
    for turn in 0..TURNS {
        for (chat, messages) in chats.iter_mut().enumerate() {
            let question = match turn {
                0 => format!("Tell me about {}.", TOPICS[chat]),
                1 => "Why is that?".to_string(),
                2 => "Tell me more.".to_string(),
                _ => "Thank you. Anything else?".to_string(),
            };
            messages.push(message("user", &question));
            let req = GenerateRequest {
                messages: messages.clone(),
                ..greedy("", 24)
            };
            let out = generate(&url, req).await.expect("chat turn");
            let u = out.last.usage.expect("usage");
            usage.push((chat, turn, u.prompt_tokens, u.cached_prompt_tokens));
            messages.push(message("assistant", &out.text));
        }
    }
    worker.stop().await;
    let report = format!("(chat, turn, prompt, cached): {usage:?}");
    eprintln!("{report}");
    for &(chat, turn, prompt, cached) in &usage {
        if turn == 0 && chat > 0 {
            // The rendered system prompt is well over 64 tokens; another stream held it.
            assert!(
                cached >= 64,
                "chat {chat}'s first turn reused the shared system prompt: {report}"
            );
        }
        if turn > 0 {
            assert!(
                cached as f64 >= 0.8 * prompt as f64,
                "chat {chat} turn {turn} reused its history: {report}"
            );
        }
    }
}
