//! Per-sequence token choice: a llama.cpp sampler chain built from the request's [`Sampling`],
//! with a direct arg-max fast path for plain greedy decoding. The engine loop only calls
//! [`SeqSampler::new`], [`SeqSampler::accept`] (tokens already in the sequence, e.g. resumed after
//! a migration) and [`SeqSampler::sample`]; new sampling features (grammars, logprobs,
//! penalties) belong here.

use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;

use super::Sampling;

/// How one sequence picks its next token.
pub(super) struct SeqSampler {
    chain: LlamaSampler,
    /// The chain is greedy alone: take the arg-max of the logits directly (see `argmax`).
    greedy: bool,
    /// Alternatives to report with each token's log-probability (None: off).
    logprobs: Option<u32>,
    /// The last sampled token's log-probability and top alternatives.
    last: Option<(f32, Vec<(u32, f32)>)>,
}

impl SeqSampler {
    pub(super) fn new(s: &Sampling, n_vocab: i32) -> Self {
        SeqSampler {
            chain: build_chain(s, n_vocab),
            greedy: is_plain_greedy(s),
            logprobs: s.logprobs,
            last: None,
        }
    }

    /// The log-probability (and top alternatives) of the token `sample` returned last.
    pub(super) fn take_logprob(&mut self) -> Option<(f32, Vec<(u32, f32)>)> {
        self.last.take()
    }

    /// Constrains the sequence to a GBNF grammar (root rule `root`), ahead of the rest.
    pub(super) fn with_grammar(
        mut self,
        model: &llama_cpp_2::model::LlamaModel,
        gbnf: &str,
    ) -> Result<Self, String> {
        let grammar = LlamaSampler::grammar(model, gbnf, "root")
            .map_err(|e| format!("output grammar: {e:?}"))?;
        self.chain = LlamaSampler::chain_simple([grammar, self.chain]);
        self.greedy = false;
        Ok(self)
    }

    /// Feeds tokens that are already part of the sequence (no sampling), so stateful samplers
    /// (penalties) see them.
    pub(super) fn accept(&mut self, tokens: &[u32]) {
        self.chain
            .accept_many(tokens.iter().map(|&t| LlamaToken(t as i32)));
    }

    /// Picks the token after the batch row `idx` (whose logits were requested) and records it.
    pub(super) fn sample(&mut self, ctx: &LlamaContext<'_>, idx: i32) -> LlamaToken {
        let token = if self.greedy {
            LlamaToken(argmax(ctx.get_logits_ith(idx)))
        } else {
            self.chain.sample(ctx, idx)
        };
        if let Some(n) = self.logprobs {
            self.last = Some(logprobs(
                ctx.get_logits_ith(idx),
                token.0 as usize,
                n as usize,
            ));
        }
        token
    }
}

/// Log-softmax of `logits` at `token`, and the `top` most likely tokens with theirs.
fn logprobs(logits: &[f32], token: usize, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut all: Vec<(u32, f32)> = (0u32..).zip(logits.iter().copied()).collect();
        let k = top.min(all.len());
        all.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        all.truncate(k);
        all.sort_by(|a, b| b.1.total_cmp(&a.1));
        best = all.into_iter().map(|(t, l)| (t, l - log_sum)).collect();
    }
    (
        logits.get(token).map_or(f32::NEG_INFINITY, |l| l - log_sum),
        best,
    )
}

/// Whether `build_chain` makes a chain of the greedy sampler alone.
fn is_plain_greedy(s: &Sampling) -> bool {
    s.temperature <= 0.0
        && (s.repeat_penalty <= 0.0 || s.repeat_penalty == 1.0)
        && s.presence_penalty == 0.0
        && s.frequency_penalty == 0.0
}

/// The first index of the largest logit, as llama.cpp's greedy sampler picks it — without
/// first copying the whole vocabulary into a candidate array for every sequence and token
/// (201k entries for gpt-oss: a fifth of a millisecond per sequence per step).
fn argmax(logits: &[f32]) -> i32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > logits[best] {
            best = i;
        }
    }
    best as i32
}

fn build_chain(s: &Sampling, n_vocab: i32) -> LlamaSampler {
    let mut chain = Vec::new();
    let repeat = if s.repeat_penalty > 0.0 {
        s.repeat_penalty
    } else {
        1.0
    };
    let openai = s.presence_penalty != 0.0 || s.frequency_penalty != 0.0;
    if repeat != 1.0 || openai {
        // OpenAI's penalties count every generated token; llama.cpp's repeat penalty a window.
        let window = if openai { 4096 } else { 64 };
        chain.push(LlamaSampler::penalties(
            n_vocab,
            window,
            repeat,
            s.frequency_penalty,
            s.presence_penalty,
        ));
    }
    if s.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        if s.top_k > 0 {
            chain.push(LlamaSampler::top_k(s.top_k));
        }
        if s.top_p > 0.0 && s.top_p < 1.0 {
            chain.push(LlamaSampler::top_p(s.top_p, 1));
        }
        if s.min_p > 0.0 {
            chain.push(LlamaSampler::min_p(s.min_p, 1));
        }
        chain.push(LlamaSampler::temp(s.temperature));
        let seed = s
            .seed
            .map(|v| (v ^ (v >> 32)) as u32)
            .unwrap_or_else(random_seed);
        chain.push(LlamaSampler::dist(seed));
    }
    LlamaSampler::chain_simple(chain)
}

fn random_seed() -> u32 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_equal_maxima_like_the_greedy_sampler() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[-5.0, -2.0, -3.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0]), 2);
    }

    #[test]
    fn only_temperature_zero_without_penalty_takes_the_arg_max_path() {
        assert!(is_plain_greedy(&Sampling::default()));
        let penalised = Sampling {
            repeat_penalty: 1.1,
            ..Default::default()
        };
        assert!(!is_plain_greedy(&penalised));
        let warm = Sampling {
            temperature: 0.7,
            ..Default::default()
        };
        assert!(!is_plain_greedy(&warm));
    }
}
