//! The event loop in virtual time: arrivals from the trace, worker steps, adverts refreshed
//! every `advert_interval` (the only view of a worker the policies get, besides their gateway's
//! reservations), and lease churn. Placement itself is in `placement`.

mod placement;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use moe_common::registry::{
    ADVERT_SCHEMA, Capacity, ClusterSnapshot, Load, MemoryInfo, ModelInfo, OffloadInfo, Speed,
    WorkerAdvert, WorkerState,
};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::baseline::RoundRobin;
use super::trace::{ChurnKind, Trace};
use super::worker::{Job, Profile, SimWorker};
use super::{AdvertFreeKv, Micros, PolicyKind, SimConfig, micros};
use moe_gateway::scheduler::{Policy, Reservations, Sampling};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Request i arrives from the trace (and schedules the next arrival).
    Arrive(usize),
    /// Request i's client sends it again after a refusal.
    Resend(usize),
    /// Worker i ends its step.
    StepDone(usize),
    /// Worker i publishes its advert.
    Advert(usize),
    /// Churn event i of the trace.
    Churn(usize),
}

/// What happened to one request.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub first_token: Option<Micros>,
    pub done: Option<Micros>,
    /// Placements accepted by a worker (first, re-placements, client resends).
    pub placements: u32,
    /// Placements onto a worker without room for prompt + max_tokens once its queue is admitted.
    pub violations: u32,
    /// Placements outside the class's pool (interactive on cpu-moe, batch on full).
    pub spills: u32,
    /// Times the request was re-placed because its worker left.
    pub replaced: u32,
    /// Times the gateway could not place it (the client backs off and sends it again).
    pub refused: u32,
    /// The client gave up after its retries.
    pub failed: bool,
    /// Its last placement found its conversation in the worker's prefix cache.
    pub prefix_hit: bool,
}

/// How full one pool was between the warm-up and the end of arrivals (time-weighted).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PoolUsage {
    /// Share of sequence slots holding an admitted sequence.
    pub slots: f64,
    /// Share of KV cells reserved by admitted sequences.
    pub kv: f64,
    /// Busiest worker's mean admitted sequences over the pool's mean (1 = perfectly even).
    pub imbalance: f64,
}

/// Everything one policy's run produced.
pub struct RunResult {
    /// One per trace request.
    pub outcomes: Vec<Outcome>,
    /// The `full` and `cpu-moe` pools.
    pub usage: [PoolUsage; 2],
    pub decisions: u64,
    /// Mean wall-clock microseconds of one placement decision (`rank` for ours).
    pub decision_us: f64,
}

/// Where a request runs now, and the reservation its gateway holds for it.
#[derive(Clone, Copy, Debug)]
struct Placement {
    worker: usize,
    gateway: usize,
    placed_ms: u64,
    kv: u32,
}

struct Node {
    worker: SimWorker,
    alive: bool,
    joined: Micros,
    left: Option<Micros>,
    /// Admitted sequences × step seconds and reserved KV × step seconds, for the steps started
    /// in the measured window.
    seq_s: f64,
    kv_s: f64,
    /// The advert without its live fields.
    template: WorkerAdvert,
    /// Conversations in the prefix cache, most recent last.
    prefix: VecDeque<u64>,
}

struct Engine<'a> {
    config: &'a SimConfig,
    trace: &'a Trace,
    kind: PolicyKind,
    policy: Policy,
    now: Micros,
    events: BinaryHeap<Reverse<(Micros, u64, Event)>>,
    pushed: u64,
    nodes: Vec<Node>,
    index: HashMap<String, usize>,
    snapshot: ClusterSnapshot,
    /// One per gateway.
    reservations: Vec<Reservations>,
    rng: StdRng,
    round_robin: RoundRobin,
    /// The work each request asks for now (less after a migration).
    jobs: Vec<Job>,
    at: Vec<Option<Placement>>,
    outcomes: Vec<Outcome>,
    /// Requests arrived and neither done nor given up.
    open: usize,
    decisions: u64,
    decision_time: Duration,
}

/// Runs one policy over the trace.
pub fn simulate(config: &SimConfig, trace: &Trace, kind: PolicyKind) -> RunResult {
    let n = trace.requests.len();
    let jobs = trace.requests.iter().enumerate().map(|(req, r)| Job {
        req,
        class: r.class,
        prompt: r.prompt,
        answer: r.max_tokens,
        cached: 0,
    });
    let mut e = Engine {
        config,
        trace,
        kind,
        policy: Policy {
            sampling: if kind == PolicyKind::OursScan {
                Sampling::FullScan
            } else {
                Sampling::PowerOfK {
                    k: config.front.sample_k,
                    scan_below: 16,
                }
            },
            ..Policy::default()
        },
        now: 0,
        events: BinaryHeap::new(),
        pushed: 0,
        nodes: Vec::new(),
        index: HashMap::new(),
        snapshot: ClusterSnapshot::default(),
        reservations: vec![Reservations::default(); config.front.gateways],
        rng: StdRng::seed_from_u64(config.seed ^ 0x5eed_0003),
        round_robin: RoundRobin::default(),
        jobs: jobs.collect(),
        at: vec![None; n],
        outcomes: vec![Outcome::default(); n],
        open: 0,
        decisions: 0,
        decision_time: Duration::ZERO,
    };
    for (i, &profile) in trace.workers.iter().enumerate() {
        e.add_worker(profile, trace.advert_phase[i]);
    }
    if let Some(first) = trace.requests.first() {
        e.push(first.at, Event::Arrive(0));
    }
    for (i, c) in trace.churn.iter().enumerate() {
        e.push(c.at, Event::Churn(i));
    }
    e.run();
    RunResult {
        usage: [Profile::Full, Profile::CpuMoe].map(|p| e.usage(p)),
        decisions: e.decisions,
        decision_us: e.decision_time.as_secs_f64() * 1e6 / e.decisions.max(1) as f64,
        outcomes: e.outcomes,
    }
}

impl Engine<'_> {
    fn push(&mut self, at: Micros, event: Event) {
        self.pushed += 1;
        self.events.push(Reverse((at, self.pushed, event)));
    }

    fn run(&mut self) {
        let end = self.config.workload.duration + self.config.drain;
        let mut arrivals_over = self.trace.requests.is_empty();
        while let Some(Reverse((at, _, event))) = self.events.pop() {
            if at > end {
                break;
            }
            self.now = at;
            match event {
                Event::Arrive(r) => {
                    match self.trace.requests.get(r + 1) {
                        Some(next) => self.push(next.at, Event::Arrive(r + 1)),
                        None => arrivals_over = true,
                    }
                    self.open += 1;
                    self.try_place(r, false);
                }
                Event::Resend(r) => self.try_place(r, false),
                Event::StepDone(w) => self.on_step(w),
                Event::Advert(w) => self.on_advert(w),
                Event::Churn(i) => self.on_churn(i),
            }
            if arrivals_over && self.open == 0 {
                break;
            }
        }
    }

    fn add_worker(&mut self, profile: Profile, first_advert_in: Micros) {
        let c = &self.config.cluster;
        let (model, n_cpu_moe) = match profile {
            Profile::Full => (c.full.clone(), 0),
            Profile::CpuMoe => (c.cpu_moe.clone(), 24),
        };
        let w = self.nodes.len();
        let id = format!("w{w:05}");
        let template = WorkerAdvert {
            schema: ADVERT_SCHEMA,
            id: id.clone(),
            endpoint: format!("http://{id}.sim:50061"),
            state: WorkerState::Ready,
            model: ModelInfo {
                name: "sim".into(),
                architecture: "gpt-oss".into(),
                n_layer: 24,
                ..Default::default()
            },
            model_fingerprint: String::new(),
            decode_mode: None,
            batch_invariant: None,
            system_fingerprint: None,
            features: moe_common::registry::Features::all(),
            offload: OffloadInfo {
                mode: profile.name().into(),
                n_cpu_moe,
                profile: profile.name().into(),
            },
            devices: vec![],
            memory: MemoryInfo::default(),
            capacity: Capacity {
                context_tokens: model.kv_tokens,
                free_kv_tokens: 0,
                max_sequences: model.max_sequences,
            },
            load: Load::default(),
            speed: Speed::default(),
            version: "sim".into(),
            updated_unix_ms: 0,
        };
        let worker = SimWorker::new(profile, model, c.queue, c.max_queue);
        self.nodes.push(Node {
            worker,
            alive: true,
            joined: self.now,
            left: None,
            seq_s: 0.0,
            kv_s: 0.0,
            template,
            prefix: VecDeque::new(),
        });
        self.index.insert(id, w);
        self.push(self.now + first_advert_in, Event::Advert(w));
    }

    fn on_advert(&mut self, w: usize) {
        let node = &self.nodes[w];
        if !node.alive {
            return;
        }
        let mut advert = node.template.clone();
        advert.capacity.free_kv_tokens = match self.config.cluster.advert_free_kv {
            AdvertFreeKv::Admitted => node.worker.free_kv(),
            AdvertFreeKv::Unclaimed => node.worker.unclaimed_kv(),
        };
        advert.load = Load {
            active: node.worker.active(),
            queued: node.worker.queued(),
        };
        advert.speed = Speed {
            decode_tokens_per_second: node.worker.decode_tps(),
            prefill_tokens_per_second: node.worker.model().prefill_tps,
        };
        advert.updated_unix_ms = self.now / 1000;
        self.snapshot
            .workers
            .insert(advert.id.clone(), Arc::new(advert));
        self.snapshot.revision += 1;
        self.push(
            self.now + self.config.cluster.advert_interval,
            Event::Advert(w),
        );
    }

    fn on_step(&mut self, w: usize) {
        if !self.nodes[w].alive {
            return;
        }
        let (mut first, mut done) = (Vec::new(), Vec::new());
        self.nodes[w].worker.finish_step(&mut first, &mut done);
        for r in first {
            self.outcomes[r].first_token.get_or_insert(self.now);
        }
        for r in done {
            self.outcomes[r].done = Some(self.now);
            self.release_ended(r);
            self.open -= 1;
        }
        self.kick(w);
    }

    /// Starts a step on an idle worker.
    fn kick(&mut self, w: usize) {
        let node = &mut self.nodes[w];
        if node.worker.is_stepping() {
            return;
        }
        if let Some(seconds) = node.worker.start_step() {
            if (self.config.warmup..self.config.workload.duration).contains(&self.now) {
                let reserved = node.worker.model().kv_tokens - node.worker.free_kv();
                node.seq_s += seconds * node.worker.active() as f64;
                node.kv_s += seconds * reserved as f64;
            }
            self.push(self.now + micros(seconds).max(1), Event::StepDone(w));
        }
    }

    fn usage(&self, profile: Profile) -> PoolUsage {
        let (from, to) = (self.config.warmup, self.config.workload.duration);
        let (mut slot_s, mut cell_s, mut seq_s, mut kv_s) = (0.0, 0.0, 0.0, 0.0);
        let mut busiest = 0.0f64;
        for n in self.nodes.iter().filter(|n| n.worker.profile == profile) {
            let until = n.left.unwrap_or(to).min(to);
            let span = until.saturating_sub(n.joined.max(from)) as f64 / 1e6;
            if span > 1.0 {
                busiest = busiest.max(n.seq_s / span);
            }
            slot_s += span * n.worker.model().max_sequences as f64;
            cell_s += span * n.worker.model().kv_tokens as f64;
            seq_s += n.seq_s;
            kv_s += n.kv_s;
        }
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let slots = self
            .nodes
            .iter()
            .find(|n| n.worker.profile == profile)
            .map_or(1.0, |n| n.worker.model().max_sequences as f64);
        // Mean admitted sequences per worker: sequence-seconds over worker-seconds.
        let mean = ratio(seq_s, slot_s) * slots;
        PoolUsage {
            slots: ratio(seq_s, slot_s),
            kv: ratio(kv_s, cell_s),
            imbalance: ratio(busiest, mean),
        }
    }

    fn on_churn(&mut self, i: usize) {
        let event = &self.trace.churn[i];
        match event.kind {
            ChurnKind::Join => {
                let profile = event.join_profile(self.config.cluster.full_fraction);
                let startup = event.nonce % self.config.cluster.advert_interval;
                self.add_worker(profile, startup);
            }
            ChurnKind::Leave => {
                let alive: Vec<usize> = (0..self.nodes.len())
                    .filter(|&w| self.nodes[w].alive)
                    .collect();
                if alive.is_empty() {
                    return;
                }
                let w = alive[(event.nonce % alive.len() as u64) as usize];
                let node = &mut self.nodes[w];
                node.alive = false;
                node.left = Some(self.now);
                self.snapshot.workers.remove(&node.template.id);
                self.snapshot.revision += 1;
                let evicted = node.worker.evict();
                for (job, generated) in evicted {
                    let r = job.req;
                    self.release(r);
                    self.outcomes[r].replaced += 1;
                    // Like the proxy's migration: the tokens so far join the prompt.
                    self.jobs[r] = Job {
                        prompt: job.prompt + generated,
                        answer: job.answer - generated,
                        cached: 0,
                        ..job
                    };
                    self.try_place(r, true);
                }
            }
        }
    }
}
