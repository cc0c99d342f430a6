//! Shared routing state: the cluster snapshot, this gateway's reservations, worker channels and
//! the retry and drain-migration budgets, and passive outlier ejection (`outliers`). The policy
//! itself lives in `scheduler.rs`.

mod outliers;

pub use outliers::OutlierConfig;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_common::registry::ClusterSnapshot;
use moe_common::tls::ClientTls;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use self::outliers::Outliers;
use crate::scheduler::{
    self, Demand, Policy, PrefixHits, Ranking, Reservation, Reservations, ScheduleError,
};

/// Idle time after which the TCP connection to a worker sends keepalive probes.
const WORKER_TCP_KEEPALIVE: Duration = Duration::from_secs(30);

pub struct RoutingState {
    snapshots: watch::Receiver<Arc<ClusterSnapshot>>,
    reservations: Mutex<Reservations>,
    /// The snapshot whose advert receipts were recorded last (see `adverts_received`).
    receipts_of: Mutex<Option<Arc<ClusterSnapshot>>>,
    channels: Mutex<HashMap<String, Channel>>,
    policy: Policy,
    retry_budget: RetryBudget,
    /// Migrations of streams a draining worker gave back: budgeted apart from retries, so a
    /// rollout does not spend the budget that protects the fleet from retry storms (M4).
    drain_budget: RetryBudget,
    outliers: Outliers,
    /// TLS to workers; when set, only `https://` workers are dialled.
    worker_tls: Option<ClientTls>,
    /// Name checked against worker certificates instead of the advertised host.
    worker_tls_server_name: Option<String>,
    /// Generation of `worker_tls` the cached channels were made with.
    tls_generation: AtomicU64,
}

/// Why a worker cannot be dialled.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{0}")]
    Endpoint(#[from] tonic::transport::Error),
    #[error("worker endpoint {0} is plaintext and this gateway requires TLS to workers (--tls-ca)")]
    Plaintext(String),
    #[error("worker endpoint {0} is https but this gateway has no --tls-ca to check it with")]
    NoTls(String),
}

impl RoutingState {
    pub fn new(snapshots: watch::Receiver<Arc<ClusterSnapshot>>, policy: Policy) -> Self {
        RoutingState {
            snapshots,
            reservations: Mutex::new(Reservations::default()),
            receipts_of: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            policy,
            retry_budget: RetryBudget::new(0.2, 10),
            drain_budget: RetryBudget::new(1.0, 100),
            outliers: Outliers::default(),
            worker_tls: None,
            worker_tls_server_name: None,
            tls_generation: AtomicU64::new(0),
        }
    }

    /// Replaces the default retry budget (a fifth of the request rate, floor 10).
    pub fn with_retry_budget(mut self, ratio: f64, floor: u64) -> Self {
        self.retry_budget = RetryBudget::new(ratio, floor);
        self
    }

    /// Replaces the default drain-migration budget (one per request, floor 100).
    pub fn with_drain_budget(mut self, ratio: f64, floor: u64) -> Self {
        self.drain_budget = RetryBudget::new(ratio, floor);
        self
    }

    /// Ejects workers that fail `config.failures` attempts in a row (default: 3, for 5 s).
    pub fn with_outliers(mut self, config: OutlierConfig) -> Self {
        self.outliers = Outliers::new(config);
        self
    }

    /// Credits the retry and drain-migration budgets for one new request.
    pub fn request_started(&self) {
        self.retry_budget.deposit();
        self.drain_budget.deposit();
    }

    /// Takes one migration of a stream that a draining worker gave back; false when that
    /// budget is spent.
    pub fn take_drain_migration(&self) -> bool {
        self.drain_budget.withdraw()
    }

    /// An attempt on `worker` failed in a way that says the worker is unwell (not a capacity
    /// refusal, not a drain); enough of these in a row eject it for a while. True when this
    /// failure ejected it.
    pub fn worker_failed(&self, worker: &str) -> bool {
        let period = self.outliers.failed(worker, Instant::now());
        if let Some(period) = period {
            tracing::warn!(worker, ?period, "worker ejected after consecutive failures");
        }
        period.is_some()
    }

    /// A stream finished on `worker`: its failure count starts again.
    pub fn worker_succeeded(&self, worker: &str) {
        self.outliers.succeeded(worker);
    }

    /// Workers left out of placement now (ejected outliers).
    pub fn ejected(&self) -> Vec<String> {
        self.outliers.ejected(Instant::now())
    }

    /// Takes one retry or migration from the budget; false when it is spent.
    pub fn take_retry(&self) -> bool {
        self.retry_budget.withdraw()
    }

    /// Dial workers over TLS with these settings (and refuse plaintext workers).
    pub fn with_worker_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.worker_tls = tls;
        self
    }

    /// Checks worker certificates against `name` rather than the host in each advert (workers
    /// advertise pod IPs; their certificates name a service): `--worker-tls-server-name`.
    pub fn with_worker_tls_server_name(mut self, name: Option<String>) -> Self {
        self.worker_tls_server_name = name;
        self
    }

    pub fn snapshot(&self) -> Arc<ClusterSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// Records when this gateway first saw each worker's current advert, on its own clock, so
    /// reservations are weighed against adverts without comparing two machines' clocks (M14).
    /// Called on every snapshot change and before each decision; forgets workers that left.
    pub fn adverts_received(&self, snapshot: &Arc<ClusterSnapshot>) {
        {
            let mut last = self.receipts_of.lock().expect("receipts lock");
            if last.as_ref().is_some_and(|l| Arc::ptr_eq(l, snapshot)) {
                return;
            }
            *last = Some(snapshot.clone());
        }
        let now = moe_common::unix_ms();
        let mut res = self.reservations.lock().expect("reservations lock");
        for w in snapshot.workers.values() {
            res.advert_received(&w.id, w.updated_unix_ms, now);
        }
        if res.received.len() > snapshot.workers.len() {
            res.retain_received(|id| snapshot.workers.contains_key(id));
        }
    }

    /// Ranks candidates for `demand` on the current snapshot, logging the decision. Ejected
    /// outliers are left out, unless no other worker could take the request.
    pub fn rank(
        &self,
        demand: &Demand,
        exclude: &HashSet<String>,
    ) -> Result<Ranking, ScheduleError> {
        self.rank_with_hits(demand, &PrefixHits::default(), exclude)
    }

    /// How long `demand` should expect to wait before a worker could start it
    /// (`scheduler::queue::expected_wait` on the current snapshot and this gateway's
    /// reservations): the retry hint of its refusals and what its deadline is checked against.
    pub fn expected_wait(&self, demand: &Demand) -> Option<std::time::Duration> {
        let snapshot = scheduler::features::capable(self.snapshot(), demand).ok()?;
        let reservations = self.reservations.lock().expect("reservations lock");
        scheduler::queue::expected_wait(demand, &snapshot, &reservations, &self.policy)
    }

    /// [`Self::rank`] with the prompt tokens each worker holds as a term of the scores
    /// (`scheduler::affinity::rank_with_hits`); empty hits rank exactly as `rank`.
    pub fn rank_with_hits(
        &self,
        demand: &Demand,
        hits: &PrefixHits,
        exclude: &HashSet<String>,
    ) -> Result<Ranking, ScheduleError> {
        let snapshot = self.snapshot();
        self.adverts_received(&snapshot);
        let snapshot = scheduler::features::capable(snapshot, demand)?;
        // Held (not cloned) for the decision: a clone cost 85–163 µs at 1,000 workers.
        let reservations = self.reservations.lock().expect("reservations lock");
        let rank = |exclude: &HashSet<String>| {
            let ranked = scheduler::affinity::rank_with_hits(
                demand,
                hits,
                &snapshot,
                &reservations,
                exclude,
                (&self.policy, scheduler::affinity::Affinity::default()),
                &mut rand::rng(),
            );
            // No headroom anywhere: wait in a worker's admission queue rather than be refused.
            scheduler::queue::or_wait(
                ranked,
                demand,
                &snapshot,
                &reservations,
                exclude,
                &self.policy,
            )
        };
        let ejected = self.ejected();
        let without_outliers = (!ejected.is_empty())
            .then(|| {
                let mut more = exclude.clone();
                more.extend(ejected);
                rank(&more)
            })
            .and_then(Result::ok)
            .filter(|r| !r.candidates.is_empty() || !r.fallback.is_empty());
        let ranking = match without_outliers {
            Some(r) => Ok(r),
            None => rank(exclude),
        };
        match &ranking {
            Ok(r) => tracing::debug!(
                class = ?demand.class,
                kv = demand.kv_tokens(),
                queued = r.queued,
                candidates = ?r.candidates.iter().map(|c| (c.worker.id.as_str(), c.worker.offload.profile.as_str(), c.score)).collect::<Vec<_>>(),
                fallback = r.fallback.len(),
                "placement"
            ),
            Err(e) => tracing::debug!(class = ?demand.class, error = %e, "placement failed"),
        }
        ranking
    }

    /// Records a placement until the returned guard is dropped.
    pub fn reserve(self: &Arc<Self>, worker: &str, kv_tokens: u32) -> ReservationGuard {
        let placed_unix_ms = moe_common::unix_ms();
        self.reservations
            .lock()
            .expect("reservations lock")
            .by_worker
            .entry(worker.to_string())
            .or_default()
            .push(Reservation {
                kv_tokens,
                placed_unix_ms,
            });
        ReservationGuard {
            router: self.clone(),
            worker: worker.to_string(),
            placed_unix_ms,
            kv_tokens,
        }
    }

    /// A (lazily connecting) channel to a worker endpoint, shared by all requests. When the
    /// TLS files change, cached channels are dropped so new connections use the new files.
    pub fn channel(&self, endpoint: &str) -> Result<Channel, ChannelError> {
        let tls = self.worker_tls.as_ref().map(ClientTls::current);
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some((generation, _)) = &tls
            && self.tls_generation.swap(*generation, Ordering::Relaxed) != *generation
        {
            channels.clear();
        }
        if let Some(c) = channels.get(endpoint) {
            return Ok(c.clone());
        }
        let https = endpoint.starts_with("https://");
        let mut ep = Endpoint::from_shared(endpoint.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .tcp_keepalive(Some(WORKER_TCP_KEEPALIVE))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        match (tls, https) {
            (Some((_, config)), true) => {
                let config = match &self.worker_tls_server_name {
                    Some(name) => config.domain_name(name.clone()),
                    None => config,
                };
                ep = ep.tls_config(config)?
            }
            (Some(_), false) => return Err(ChannelError::Plaintext(endpoint.to_string())),
            (None, true) => return Err(ChannelError::NoTls(endpoint.to_string())),
            (None, false) => {}
        }
        let channel = ep.connect_lazy();
        channels.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }

    /// Forgets channels (and outlier records) of workers no longer in the snapshot.
    pub fn prune_channels(&self) {
        let snapshot = self.snapshot();
        self.outliers.retain(|id| snapshot.workers.contains_key(id));
        let live: HashSet<&str> = snapshot
            .workers
            .values()
            .map(|w| w.endpoint.as_str())
            .collect();
        self.channels
            .lock()
            .expect("channels lock")
            .retain(|e, _| live.contains(e.as_str()));
    }
}

/// Removes its reservation when dropped (the stream ended, one way or another).
pub struct ReservationGuard {
    router: Arc<RoutingState>,
    worker: String,
    placed_unix_ms: u64,
    kv_tokens: u32,
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        let mut res = self.router.reservations.lock().expect("reservations lock");
        if let Some(list) = res.by_worker.get_mut(&self.worker) {
            if let Some(i) = list.iter().position(|r| {
                r.placed_unix_ms == self.placed_unix_ms && r.kv_tokens == self.kv_tokens
            }) {
                list.swap_remove(i);
            }
            if list.is_empty() {
                res.by_worker.remove(&self.worker);
            }
        }
        // Until the worker's next advert, credit the stream back (issue 17: a chat's next turn).
        let now = moe_common::unix_ms();
        res.finished(&self.worker, self.kv_tokens, self.placed_unix_ms, now);
    }
}

/// Retries may add at most `ratio` of the request rate (plus a small floor), so a failing
/// fleet is not hammered by retry storms.
pub struct RetryBudget {
    /// Balance in thousandths of a retry.
    balance: AtomicU64,
    deposit: u64,
    cap: u64,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor: u64) -> Self {
        RetryBudget {
            balance: AtomicU64::new(floor * 1000),
            deposit: (ratio * 1000.0) as u64,
            cap: (floor + 100) * 1000,
        }
    }

    /// Called once per request.
    pub fn deposit(&self) {
        let _ = self
            .balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((b + self.deposit).min(self.cap))
            });
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        self.balance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                b.checked_sub(1000)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_budget_allows_a_fraction_of_requests() {
        let b = RetryBudget::new(0.5, 1);
        assert!(b.withdraw());
        assert!(!b.withdraw(), "floor spent");
        b.deposit();
        assert!(!b.withdraw(), "half a retry is not a retry");
        b.deposit();
        assert!(b.withdraw());
    }
}
