//! The modelled worker, shaped like `moe-worker`'s batcher: a request is admitted between steps
//! when a sequence slot and its whole KV reservation (prompt + max_tokens) are free, otherwise it
//! waits in the worker's queue (head-of-line: nothing overtakes a request that does not fit).
//! Each step decodes one token of every decoding sequence plus prompt chunks under a token
//! budget, and lasts `base + per_seq × decoding + prefill_tokens / prefill_tps`.

use std::collections::VecDeque;

use moe_common::LatencyClass;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Every expert on the GPU.
    Full,
    /// Every layer's routed experts in (pinned) host memory.
    CpuMoe,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Full => "full",
            Profile::CpuMoe => "cpu-moe",
        }
    }
}

/// Which queued request a worker admits next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueDiscipline {
    /// Arrival order.
    Fifo,
    /// Interactive before batch, arrival order within a class (what `moe-worker` does).
    InteractiveFirst,
}

impl std::str::FromStr for QueueDiscipline {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fifo" => Ok(QueueDiscipline::Fifo),
            "interactive-first" => Ok(QueueDiscipline::InteractiveFirst),
            _ => Err(format!(
                "worker queue must be fifo or interactive-first, not {s:?}"
            )),
        }
    }
}

/// Capacity and speed of one profile.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileModel {
    /// KV cells shared by all sequences (`--ctx-size`).
    pub kv_tokens: u32,
    /// Sequence slots (`--parallel`).
    pub max_sequences: u32,
    /// Fixed seconds of one step.
    pub step_base_s: f64,
    /// Seconds each decoding sequence adds to a step.
    pub step_per_seq_s: f64,
    /// Prompt tokens per second.
    pub prefill_tps: f64,
    /// Tokens per step: decodes plus prompt chunks (`--batch-size`).
    pub step_tokens: u32,
}

impl ProfileModel {
    /// Calibrated on the H100 numbers in docs/benchmarks/scheduler-simulation.md: one stream
    /// 4.0 ms/token (250 tok/s; measured 252–267), 512-token TTFT ≈ 88 ms (78–91); 16 and 64
    /// concurrent streams need ≈ 1.2 ms per decoding sequence to match 433 and 534 tok/s.
    pub fn full() -> Self {
        ProfileModel {
            kv_tokens: 16384,
            max_sequences: 16,
            step_base_s: 0.0028,
            step_per_seq_s: 0.0012,
            prefill_tps: 6000.0,
            step_tokens: 512,
        }
    }

    /// `--cpu-moe` with pinned host memory: one stream 38 ms/token (26.3 tok/s measured),
    /// 512-token TTFT ≈ 500 ms (497); 64 streams at 140 tok/s aggregate with TTFT p50 14 s need
    /// ≈ 2.5 ms per decoding sequence.
    pub fn cpu_moe() -> Self {
        ProfileModel {
            kv_tokens: 32768,
            max_sequences: 64,
            step_base_s: 0.0355,
            step_per_seq_s: 0.0025,
            prefill_tps: 1100.0,
            step_tokens: 512,
        }
    }

    pub fn step_seconds(&self, decoding: u32, prefill_tokens: u32) -> f64 {
        self.step_base_s
            + self.step_per_seq_s * decoding as f64
            + prefill_tokens as f64 / self.prefill_tps
    }

    /// Applies `key=value,…` overrides: kv, slots, base_ms, per_seq_ms, prefill_tps, step_tokens.
    pub fn with_overrides(mut self, spec: &str) -> Result<Self, String> {
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not key=value"))?;
            let number: f64 = value
                .parse()
                .map_err(|_| format!("{key}: {value:?} is not a number"))?;
            match key {
                "kv" => self.kv_tokens = number as u32,
                "slots" => self.max_sequences = number as u32,
                "base_ms" => self.step_base_s = number / 1e3,
                "per_seq_ms" => self.step_per_seq_s = number / 1e3,
                "prefill_tps" => self.prefill_tps = number,
                "step_tokens" => self.step_tokens = number as u32,
                _ => {
                    return Err(format!(
                        "unknown key {key:?} (kv, slots, base_ms, per_seq_ms, prefill_tps, step_tokens)"
                    ));
                }
            }
        }
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.kv_tokens == 0 || self.max_sequences == 0 || self.step_tokens < self.max_sequences {
            return Err("kv and slots must be positive, step_tokens at least slots".into());
        }
        if !(self.step_base_s > 0.0 && self.step_per_seq_s >= 0.0 && self.prefill_tps > 0.0) {
            return Err("base_ms and prefill_tps must be positive, per_seq_ms not negative".into());
        }
        Ok(())
    }
}

/// Work handed to a worker: prefill `prompt` tokens, then generate `answer` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Job {
    /// Index of the request in the trace.
    pub req: usize,
    pub class: LatencyClass,
    pub prompt: u32,
    pub answer: u32,
    /// Prompt tokens the worker has in its prefix cache: prefill starts after them (they still
    /// take KV cells).
    pub cached: u32,
}

impl Job {
    /// KV cells the worker reserves on admission.
    pub fn kv(&self) -> u32 {
        self.prompt + self.answer
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Larger than the whole KV cache.
    TooLong,
    /// The admission queue is full.
    QueueFull,
}

#[derive(Debug)]
struct Seq {
    job: Job,
    prefilled: u32,
    generated: u32,
    /// Prompt tokens in the step under way.
    chunk: u32,
    /// Decodes a token in the step under way.
    decoding: bool,
}

#[derive(Debug)]
pub struct SimWorker {
    pub profile: Profile,
    model: ProfileModel,
    discipline: QueueDiscipline,
    max_queue: usize,
    running: Vec<Seq>,
    queue: VecDeque<Job>,
    /// KV reserved by running sequences.
    reserved: u32,
    /// KV the queued requests will reserve.
    queued_kv: u32,
    stepping: bool,
}

impl SimWorker {
    pub fn new(
        profile: Profile,
        model: ProfileModel,
        discipline: QueueDiscipline,
        max_queue: usize,
    ) -> Self {
        SimWorker {
            profile,
            model,
            discipline,
            max_queue,
            running: Vec::new(),
            queue: VecDeque::new(),
            reserved: 0,
            queued_kv: 0,
            stepping: false,
        }
    }

    pub fn model(&self) -> &ProfileModel {
        &self.model
    }

    /// Queues `job`; it is admitted at the next step boundary if it fits.
    pub fn offer(&mut self, job: Job) -> Result<(), Refusal> {
        if job.kv() > self.model.kv_tokens {
            return Err(Refusal::TooLong);
        }
        if self.queue.len() >= self.max_queue {
            return Err(Refusal::QueueFull);
        }
        self.queued_kv += job.kv();
        self.queue.push_back(job);
        Ok(())
    }

    /// KV not reserved by admitted sequences (what the advert reports).
    pub fn free_kv(&self) -> u32 {
        self.model.kv_tokens - self.reserved
    }

    /// KV left for a new request once everything queued ahead of it is admitted.
    pub fn unclaimed_kv(&self) -> u32 {
        self.free_kv().saturating_sub(self.queued_kv)
    }

    pub fn active(&self) -> u32 {
        self.running.len() as u32
    }

    pub fn queued(&self) -> u32 {
        self.queue.len() as u32
    }

    pub fn is_stepping(&self) -> bool {
        self.stepping
    }

    /// Decode tokens per second of one sequence at the current batch size.
    pub fn decode_tps(&self) -> f64 {
        1.0 / self.model.step_seconds(self.active().max(1), 0)
    }

    fn admit(&mut self) {
        while (self.running.len() as u32) < self.model.max_sequences {
            let next = match self.discipline {
                QueueDiscipline::Fifo => 0,
                QueueDiscipline::InteractiveFirst => self
                    .queue
                    .iter()
                    .position(|j| j.class == LatencyClass::Interactive)
                    .unwrap_or(0),
            };
            match self.queue.get(next) {
                Some(job) if job.kv() <= self.free_kv() => {}
                _ => break,
            }
            let job = self.queue.remove(next).expect("checked above");
            self.queued_kv -= job.kv();
            self.reserved += job.kv();
            self.running.push(Seq {
                job,
                prefilled: job.cached.min(job.prompt.saturating_sub(1)),
                generated: 0,
                chunk: 0,
                decoding: false,
            });
        }
    }

    /// Admits what fits and plans the next step; returns its duration in seconds, or None when
    /// there is nothing to do.
    pub fn start_step(&mut self) -> Option<f64> {
        debug_assert!(!self.stepping, "a step is already under way");
        self.admit();
        let mut decoding = 0u32;
        for s in &mut self.running {
            s.decoding = s.prefilled == s.job.prompt;
            decoding += s.decoding as u32;
        }
        let mut budget = self.model.step_tokens.saturating_sub(decoding);
        let mut prefill = 0u32;
        let interactive_first = self.discipline == QueueDiscipline::InteractiveFirst;
        for pass in [Some(LatencyClass::Interactive), None] {
            for s in self
                .running
                .iter_mut()
                .filter(|s| !s.decoding && s.chunk == 0)
            {
                if interactive_first && pass.is_some_and(|c| c != s.job.class) {
                    continue;
                }
                let take = (s.job.prompt - s.prefilled).min(budget);
                s.chunk = take;
                budget -= take;
                prefill += take;
            }
        }
        if decoding == 0 && prefill == 0 {
            return None;
        }
        self.stepping = true;
        Some(self.model.step_seconds(decoding, prefill))
    }

    /// Ends the step under way: pushes the requests that got their first token and those that
    /// finished (their KV and slot are freed).
    pub fn finish_step(&mut self, first_token: &mut Vec<usize>, finished: &mut Vec<usize>) {
        self.stepping = false;
        let mut freed = 0;
        self.running.retain_mut(|s| {
            if s.chunk > 0 {
                s.prefilled += s.chunk;
                s.chunk = 0;
                if s.prefilled == s.job.prompt {
                    s.generated = 1;
                    first_token.push(s.job.req);
                }
            } else if s.decoding {
                s.generated += 1;
            }
            let done = s.generated >= s.job.answer;
            if done {
                finished.push(s.job.req);
                freed += s.job.kv();
            }
            !done
        });
        self.reserved -= freed;
    }

    /// The worker leaves: every running and queued request with the tokens it had generated.
    pub fn evict(&mut self) -> Vec<(Job, u32)> {
        let mut out: Vec<(Job, u32)> = self
            .running
            .drain(..)
            .map(|s| (s.job, s.generated))
            .collect();
        out.extend(self.queue.drain(..).map(|j| (j, 0)));
        self.reserved = 0;
        self.queued_kv = 0;
        self.stepping = false;
        out
    }
}

#[cfg(test)]
mod tests;
