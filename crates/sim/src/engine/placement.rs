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
use moe_gateway::scheduler::{self, Demand, Reservation};

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
        for attempt in 0..self.config.front.max_attempts {
            let started = Instant::now();
            let chosen = self.choose(job, gateway, &tried, migrating || attempt > 0);
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

    fn choose(
        &mut self,
        job: Job,
        gateway: usize,
        tried: &HashSet<String>,
        retry: bool,
    ) -> Option<usize> {
        let reservations = &self.reservations[gateway];
        let id = match self.kind {
            PolicyKind::Ours | PolicyKind::OursScan | PolicyKind::Prefix => {
                let demand = Demand {
                    model: "",
                    class: job.class,
                    prompt_tokens: job.prompt,
                    max_tokens: job.answer,
                    needs: Default::default(),
                };
                let (snapshot, policy) = (&self.snapshot, &self.policy);
                let ranking = if self.kind == PolicyKind::Prefix {
                    // Stands for a hash of the conversation's first prompt block.
                    let key = affinity::stable_hash(
                        &self.trace.requests[job.req].conversation.to_le_bytes(),
                    );
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
