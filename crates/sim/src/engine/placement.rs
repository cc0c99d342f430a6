//! Placement as the gateway does it: the policy under test picks a worker, the worker queues
//! or refuses, the next attempt excludes the workers tried (the proxy's `Drive`), and a request
//! no worker took goes back to its client, which sends it again after a back-off.

use std::collections::HashSet;
use std::time::Instant;

use super::super::baseline::least_loaded;
use super::super::worker::{Job, Profile};
use super::{Engine, Event, Placement};
use crate::PolicyKind;
use moe_common::LatencyClass;
use moe_gateway::scheduler::affinity::{self, Affinity};
use moe_gateway::scheduler::{self, Demand, PrefixHits, Reservation};

/// Stands for the prefix key of a conversation (a hash of its start).
fn conversation_key(conversation: u64) -> u64 {
    affinity::stable_hash(&conversation.to_le_bytes())
}

impl Engine<'_> {
    /// Places request `r`, or counts a refusal and lets its client send it again later.
    pub(super) fn try_place(&mut self, r: usize, migrating: bool) {
        if self.place(r, migrating) {
            return;
        }
        self.outcomes[r].refused += 1;
        if self.outcomes[r].refused <= self.config.front.client_retries {
            let t = &self.trace.requests[r];
            // The client starts over: the whole prompt and answer.
            self.jobs[r] = Job {
                req: r,
                class: t.class,
                prompt: t.prompt,
                answer: t.max_tokens,
                cached: 0,
            };
            self.push(
                self.now + self.config.front.client_backoff,
                Event::Resend(r),
            );
        } else {
            self.outcomes[r].failed = true;
            self.open -= 1;
        }
    }

    /// Tries up to `max_attempts` workers; a migration may use the policy's fallback list at
    /// once, a new request only from its second attempt.
    fn place(&mut self, r: usize, migrating: bool) -> bool {
        let job = self.jobs[r];
        let gateway = r % self.reservations.len();
        let mut tried = HashSet::new();
        // The live gateway learns these from its prefix index before ranking (not timed here,
        // as the tokenizing round trip that comes with it is not).
        let hits = (self.kind == PolicyKind::Hits).then(|| self.hits(job));
        for attempt in 0..self.config.front.max_attempts {
            let started = Instant::now();
            let chosen = self.choose(
                job,
                gateway,
                &tried,
                migrating || attempt > 0,
                hits.as_ref(),
            );
            self.decisions += 1;
            self.decision_time += started.elapsed();
            let Some(w) = chosen else {
                return false;
            };
            let conversation = self.trace.requests[r].conversation;
            let node = &mut self.nodes[w];
            let hit = node.prefix.contains(&conversation);
            let share = self.config.workload.prefix_share;
            let offered = Job {
                cached: if hit {
                    (job.prompt as f64 * share) as u32
                } else {
                    0
                },
                ..job
            };
            let violation = node.worker.unclaimed_kv() < job.kv();
            if node.worker.offer(offered).is_ok() {
                // The worker keeps the conversation (most recent last, bounded).
                node.prefix.retain(|&c| c != conversation);
                node.prefix.push_back(conversation);
                if node.prefix.len() > self.config.cluster.prefix_cache {
                    node.prefix.pop_front();
                }
                self.outcomes[r].prefix_hit = hit;
                self.accept(r, w, gateway, violation);
                return true;
            }
            tried.insert(self.nodes[w].template.id.clone());
        }
        false
    }

    /// What the workers' prefix caches hold of `job`'s prompt: `prompt × prefix_share` tokens on
    /// every worker holding its conversation, and the conversation's key.
    fn hits(&self, job: Job) -> PrefixHits {
        let conversation = self.trace.requests[job.req].conversation;
        let cached = (job.prompt as f64 * self.config.workload.prefix_share) as u32;
        PrefixHits {
            cached_tokens: self
                .nodes
                .iter()
                .filter(|n| cached > 0 && n.prefix.contains(&conversation))
                .map(|n| (n.template.id.clone(), cached))
                .collect(),
            key: Some(conversation_key(conversation)),
            shared: None,
        }
    }

    fn choose(
        &mut self,
        job: Job,
        gateway: usize,
        tried: &HashSet<String>,
        retry: bool,
        hits: Option<&PrefixHits>,
    ) -> Option<usize> {
        let reservations = &self.reservations[gateway];
        let id = match self.kind {
            PolicyKind::Ours | PolicyKind::OursScan | PolicyKind::Prefix | PolicyKind::Hits => {
                let demand = Demand {
                    model: "",
                    class: job.class,
                    prompt_tokens: job.prompt,
                    max_tokens: job.answer,
                    needs: Default::default(),
                    batch_invariant: false,
                };
                let (snapshot, policy) = (&self.snapshot, &self.policy);
                let ranking = if let Some(hits) = hits {
                    affinity::rank_with_hits(
                        &demand,
                        hits,
                        snapshot,
                        reservations,
                        tried,
                        (policy, Affinity::default()),
                        &mut self.rng,
                    )
                } else if self.kind == PolicyKind::Prefix {
                    let key = conversation_key(self.trace.requests[job.req].conversation);
                    affinity::rank_with_prefix(
                        &demand,
                        Some(key),
                        snapshot,
                        reservations,
                        tried,
                        (policy, Affinity::default()),
                        &mut self.rng,
                    )
                } else {
                    scheduler::rank(
                        &demand,
                        snapshot,
                        reservations,
                        tried,
                        policy,
                        &mut self.rng,
                    )
                }
                .ok()?;
                // The proxy's `pick`: the first candidate; the fallback list only on a retry.
                let best = match ranking.candidates.first() {
                    Some(c) => c,
                    None if retry => ranking.fallback.first()?,
                    None => return None,
                };
                return self.index.get(&best.worker.id).copied();
            }
            PolicyKind::RoundRobin => self.round_robin.pick(&self.snapshot, tried)?,
            PolicyKind::LeastLoaded => {
                least_loaded(&self.snapshot, reservations, tried, &mut self.rng)?
            }
        };
        self.index.get(id).copied()
    }

    fn accept(&mut self, r: usize, w: usize, gateway: usize, violation: bool) {
        let job = self.jobs[r];
        let placed_ms = self.now / 1000;
        let node = &self.nodes[w];
        self.reservations[gateway]
            .by_worker
            .entry(node.template.id.clone())
            .or_default()
            .push(Reservation {
                kv_tokens: job.kv(),
                placed_unix_ms: placed_ms,
            });
        self.at[r] = Some(Placement {
            worker: w,
            gateway,
            placed_ms,
            kv: job.kv(),
        });
        let spill = matches!(
            (job.class, node.worker.profile),
            (LatencyClass::Interactive, Profile::CpuMoe) | (LatencyClass::Batch, Profile::Full)
        );
        let o = &mut self.outcomes[r];
        o.placements += 1;
        o.violations += violation as u32;
        o.spills += spill as u32;
        self.kick(w);
    }

    /// Drops the reservation of request `r` whose stream ended at its worker, and records the
    /// end as the gateway does (`Reservations::finished`: credited back until the next advert).
    pub(super) fn release_ended(&mut self, r: usize) {
        if let Some(p) = self.at[r] {
            let id = self.nodes[p.worker].template.id.clone();
            self.reservations[p.gateway].finished(&id, p.kv, p.placed_ms, self.now / 1000);
        }
        self.release(r);
    }

    /// Drops the reservation of request `r` (its stream ended or its worker left).
    pub(super) fn release(&mut self, r: usize) {
        let Some(p) = self.at[r].take() else { return };
        let id = &self.nodes[p.worker].template.id;
        let by_worker = &mut self.reservations[p.gateway].by_worker;
        if let Some(list) = by_worker.get_mut(id) {
            let same = |x: &Reservation| x.placed_unix_ms == p.placed_ms && x.kv_tokens == p.kv;
            if let Some(i) = list.iter().position(same) {
                list.swap_remove(i);
            }
            if list.is_empty() {
                by_worker.remove(id);
            }
        }
    }
}
