//! The inputs every policy shares, drawn once from the seed: Poisson request arrivals with their
//! class and sizes, the initial worker profiles and advert phases, and lease churn. Each part
//! has its own random stream, so changing one (say the churn rate) leaves the others alone.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{Micros, Profile, SimConfig, micros};
use moe_common::LatencyClass;

/// Prompt and answer sizes of one class.
#[derive(Clone, Debug)]
pub struct ClassShape {
    /// Prompt tokens, uniform in `prompt_min..=prompt_max`.
    pub prompt_min: u32,
    pub prompt_max: u32,
    /// Answer tokens; every request generates all of them (its KV reservation is exact).
    pub max_tokens: u32,
}

#[derive(Clone, Debug)]
pub struct Workload {
    /// Mean arrivals per second (Poisson).
    pub rate: f64,
    /// Arrivals stop after this much virtual time.
    pub duration: Micros,
    pub interactive_fraction: f64,
    pub interactive: ClassShape,
    pub batch: ClassShape,
    /// Requests belong to this many ongoing conversations (uniformly); 0: each its own.
    pub conversations: u64,
    /// Share of a prompt a worker that served the conversation before has cached.
    pub prefix_share: f64,
}

impl Workload {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.rate > 0.0 && self.rate.is_finite()) || self.duration == 0 {
            return Err("--rate and --duration must be positive".into());
        }
        if !(0.0..1.0).contains(&self.prefix_share) {
            return Err("--prefix-share must be within 0..1".into());
        }
        if !(0.0..=1.0).contains(&self.interactive_fraction) {
            return Err("--interactive-fraction must be within 0..=1".into());
        }
        for s in [&self.interactive, &self.batch] {
            if s.prompt_min == 0 || s.prompt_min > s.prompt_max || s.max_tokens == 0 {
                return Err("prompt ranges must be 1 ≤ min ≤ max and max_tokens positive".into());
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct TraceRequest {
    pub at: Micros,
    pub class: LatencyClass,
    pub prompt: u32,
    pub max_tokens: u32,
    /// The conversation the request continues (its prefix-cache key).
    pub conversation: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChurnKind {
    /// A worker (chosen by `nonce` among those alive) leaves at once.
    Leave,
    /// A fresh worker (profile chosen by `nonce`) starts and advertises shortly after.
    Join,
}

#[derive(Clone, Debug)]
pub struct ChurnEvent {
    pub at: Micros,
    pub kind: ChurnKind,
    pub nonce: u64,
}

impl ChurnEvent {
    /// The profile a joining worker gets, with the cluster's full fraction.
    pub fn join_profile(&self, full_fraction: f64) -> Profile {
        let unit = (self.nonce >> 11) as f64 / (1u64 << 53) as f64;
        if unit < full_fraction {
            Profile::Full
        } else {
            Profile::CpuMoe
        }
    }
}

#[derive(Clone, Debug)]
pub struct Trace {
    pub requests: Vec<TraceRequest>,
    /// Profile of each initial worker.
    pub workers: Vec<Profile>,
    /// When each initial worker first advertises (spread over one advert interval).
    pub advert_phase: Vec<Micros>,
    pub churn: Vec<ChurnEvent>,
}

impl Trace {
    pub fn generate(config: &SimConfig) -> Trace {
        let w = &config.workload;
        let c = &config.cluster;
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut requests = Vec::with_capacity((w.rate * w.duration as f64 / 1e6 * 1.05) as usize);
        let mut t = 0.0f64;
        loop {
            t += exponential(&mut rng, w.rate);
            let at = micros(t);
            if at >= w.duration {
                break;
            }
            let class = if rng.random::<f64>() < w.interactive_fraction {
                LatencyClass::Interactive
            } else {
                LatencyClass::Batch
            };
            let shape = if class == LatencyClass::Interactive {
                &w.interactive
            } else {
                &w.batch
            };
            requests.push(TraceRequest {
                at,
                class,
                prompt: rng.random_range(shape.prompt_min..=shape.prompt_max),
                max_tokens: shape.max_tokens,
                conversation: requests.len() as u64,
            });
        }
        if w.conversations > 0 {
            let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5eed_0004);
            for r in &mut requests {
                r.conversation = rng.random_range(0..w.conversations);
            }
        }

        let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5eed_0001);
        let n_full = (c.workers as f64 * c.full_fraction).round() as usize;
        let mut workers: Vec<Profile> = (0..c.workers)
            .map(|i| {
                if i < n_full {
                    Profile::Full
                } else {
                    Profile::CpuMoe
                }
            })
            .collect();
        workers.shuffle(&mut rng);
        let advert_phase = (0..c.workers)
            .map(|_| rng.random_range(0..c.advert_interval))
            .collect();

        let mut rng = StdRng::seed_from_u64(config.seed ^ 0x5eed_0002);
        let mut churn = Vec::new();
        let per_second = c.churn_per_minute * c.workers as f64 / 60.0;
        if per_second > 0.0 {
            for kind in [ChurnKind::Leave, ChurnKind::Join] {
                let mut t = 0.0f64;
                loop {
                    t += exponential(&mut rng, per_second);
                    let at = micros(t);
                    if at >= w.duration {
                        break;
                    }
                    churn.push(ChurnEvent {
                        at,
                        kind,
                        nonce: rng.random(),
                    });
                }
            }
            churn.sort_by_key(|e| e.at);
        }
        Trace {
            requests,
            workers,
            advert_phase,
            churn,
        }
    }
}

/// Seconds to the next event of a Poisson process with `rate` per second.
fn exponential(rng: &mut StdRng, rate: f64) -> f64 {
    let u: f64 = rng.random();
    -(1.0 - u).ln() / rate
}
