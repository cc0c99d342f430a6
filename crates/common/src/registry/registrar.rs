//! Worker side of the registry: grant a lease, keep the advert under it fresh, re-register when
//! the lease is lost, and revoke it on deregistration (which deletes the advert at once).
//!
//! etcd being away is never fatal here: a worker that starts while etcd is down serves anyway
//! and registers when etcd answers (review H7). Every etcd call is bounded by
//! [`RegistrarConfig::call_timeout`], so a stalled put cannot starve the lease keep-alives
//! (review M2), and the advert is written only when it changes meaningfully ([`WritePolicy`],
//! review M5).

use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::write_policy::WritePolicy;
use super::{EtcdConfig, RegistryError, WorkerAdvert};
use crate::unix_ms;

#[derive(Clone, Debug)]
pub struct RegistrarConfig {
    pub etcd: EtcdConfig,
    /// Lease time to live: a worker that stops keeping it alive vanishes after this long.
    pub lease_ttl: Duration,
    /// Changes that move routing (saturation, queueing, low KV headroom) are written at most this
    /// often; state changes at once, drift once a lease TTL ([`WritePolicy`]).
    pub min_update_interval: Duration,
}

impl RegistrarConfig {
    /// The bound on each etcd call: a quarter of the lease TTL (at most 3 s, at least 200 ms), so
    /// that a keep-alive sent every TTL/3 still lands in time after one stalled call.
    pub fn call_timeout(&self) -> Duration {
        (self.lease_ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(3))
    }

    /// The write rule: drift (load below saturation, KV headroom away from low, speed jitter,
    /// device memory) is written once a lease TTL, so no advert is staler than that.
    pub fn write_policy(&self) -> WritePolicy {
        WritePolicy {
            min_interval: self.min_update_interval,
            max_interval: self.lease_ttl.max(self.min_update_interval),
        }
    }
}

/// A running registration. Drop it only through [`Registrar::deregister`].
pub struct Registrar {
    stop: CancellationToken,
    task: JoinHandle<()>,
    status: watch::Receiver<RegistrationStatus>,
    revoke_timeout: Duration,
}

/// Where the registration stands, for metrics and health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegistrationStatus {
    /// The lease is held and the advert written under it.
    pub registered: bool,
    /// Leases granted so far: the first registration plus every re-registration.
    pub registrations: u64,
}

struct Lease {
    id: i64,
    keeper: etcd_client::LeaseKeeper,
    responses: etcd_client::LeaseKeepAliveStream,
}

struct Session {
    client: Option<Client>,
    key: String,
    config: RegistrarConfig,
    status: watch::Sender<RegistrationStatus>,
    /// The advert last written and when.
    written: Option<(WorkerAdvert, Instant)>,
}

impl Registrar {
    /// Connects to etcd, grants a lease and writes the current advert under it, then keeps
    /// lease and advert fresh in a background task until [`Registrar::deregister`]. When etcd
    /// cannot be reached the task keeps trying with backoff (logging each failure); only etcd
    /// refusing the credentials ([`RegistryError::Auth`]) is returned as an error.
    pub async fn start(
        config: RegistrarConfig,
        adverts: watch::Receiver<WorkerAdvert>,
    ) -> Result<Registrar, RegistryError> {
        let first = adverts.borrow().clone();
        let key = config.etcd.worker_key(&first.id);
        let (status_tx, status) = watch::channel(RegistrationStatus::default());
        let revoke_timeout = config.call_timeout();
        let mut session = Session {
            client: None,
            key,
            config,
            status: status_tx,
            written: None,
        };
        let lease = match session.register(&first).await {
            Ok(lease) => Some(lease),
            Err(e) => match e.explain(&session.config.etcd) {
                e @ RegistryError::Auth { .. } => return Err(e),
                e => {
                    tracing::warn!(error = %e, "etcd unreachable: serving unregistered, retrying registration in the background");
                    None
                }
            },
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(session.run(lease, adverts, stop.clone()));
        Ok(Registrar {
            stop,
            task,
            status,
            revoke_timeout,
        })
    }

    /// Follows the registration: registered or not, and how many leases were granted.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// Revokes the lease (removing the advert) and stops, bounded by the call timeout: when
    /// etcd does not answer in time the advert expires with its lease TTL instead.
    pub async fn deregister(self) {
        self.stop.cancel();
        let bound = self.revoke_timeout + Duration::from_secs(1);
        match tokio::time::timeout(bound, self.task).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "registrar task failed"),
            Err(_) => tracing::warn!("deregistration timed out; the advert expires with its lease"),
            Ok(Ok(())) => {}
        }
    }
}

/// Runs `call` bounded by `limit`, a timeout becoming [`RegistryError::Timeout`].
async fn bounded<T>(
    config: &RegistrarConfig,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    let limit = config.call_timeout();
    match tokio::time::timeout(limit, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RegistryError::Timeout {
            endpoints: config.etcd.endpoints.join(","),
            timeout: limit,
        }),
    }
}

impl Session {
    async fn register(&mut self, advert: &WorkerAdvert) -> Result<Lease, RegistryError> {
        let result = self.try_register(advert).await;
        if result.is_err() {
            // Start the next attempt from a fresh connection.
            self.client = None;
        }
        result
    }

    async fn try_register(&mut self, advert: &WorkerAdvert) -> Result<Lease, RegistryError> {
        if self.client.is_none() {
            self.client = Some(self.config.etcd.connect().await?);
        }
        let client = self.client.as_mut().expect("connected above");
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let id = bounded(&self.config, client.lease_grant(ttl, None))
            .await?
            .id();
        self.put(advert, id).await?;
        let client = self.client.as_mut().expect("connected above");
        let (keeper, responses) = bounded(&self.config, client.lease_keep_alive(id)).await?;
        self.status.send_modify(|s| {
            s.registered = true;
            s.registrations += 1;
        });
        tracing::info!(key = %self.key, lease = id, ttl, "registered in etcd");
        Ok(Lease {
            id,
            keeper,
            responses,
        })
    }

    async fn put(&mut self, advert: &WorkerAdvert, lease: i64) -> Result<(), RegistryError> {
        let Some(client) = self.client.as_mut() else {
            return Err(self.config.etcd.timeout());
        };
        let mut stamped = advert.clone();
        stamped.updated_unix_ms = unix_ms();
        let opts = PutOptions::new().with_lease(lease);
        let put = client.put(self.key.as_str(), stamped.to_json()?, Some(opts));
        bounded(&self.config, put).await?;
        self.written = Some((advert.clone(), Instant::now()));
        Ok(())
    }

    /// Writes `advert` when the write policy says it is due.
    async fn maybe_put(&mut self, advert: &WorkerAdvert, lease: i64, policy: &WritePolicy) {
        let due = match &self.written {
            None => true,
            Some((written, at)) => policy.due(written, at.elapsed(), advert),
        };
        if due && let Err(e) = self.put(advert, lease).await {
            tracing::warn!(error = %e, "advert update failed; retrying at the next tick");
        }
    }

    async fn run(
        mut self,
        lease: Option<Lease>,
        mut adverts: watch::Receiver<WorkerAdvert>,
        stop: CancellationToken,
    ) {
        let policy = self.config.write_policy();
        let mut lease = lease;
        let mut backoff = Backoff::registrar();
        let mut keepalive = tokio::time::interval(self.config.lease_ttl / 3);
        let mut flush = tokio::time::interval(self.config.min_update_interval);
        loop {
            if lease.is_none() {
                let advert = adverts.borrow_and_update().clone();
                let registered = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.register(&advert) => r,
                };
                match registered {
                    Ok(l) => {
                        lease = Some(l);
                        backoff.reset();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff.delay(), "registration in etcd failed; retrying");
                        if !backoff.failed(&stop).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let l = lease.as_mut().expect("lease present");
            let id = l.id;
            // Biased: a due keep-alive goes before any advert write, so writes that each take up
            // to the call timeout cannot push keep-alives past the TTL.
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = keepalive.tick() => {
                    let sent = bounded(&self.config, l.keeper.keep_alive()).await;
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "lease keep-alive failed; re-registering");
                        self.status.send_modify(|s| s.registered = false);
                        lease = None;
                    }
                }
                msg = l.responses.message() => match msg {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    other => {
                        tracing::warn!(response = ?other.map(|m| m.map(|r| r.ttl())), "lease lost; re-registering");
                        self.status.send_modify(|s| s.registered = false);
                        lease = None;
                    }
                },
                changed = adverts.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let advert = adverts.borrow_and_update().clone();
                    self.maybe_put(&advert, id, &policy).await;
                }
                _ = flush.tick() => {
                    let advert = adverts.borrow().clone();
                    self.maybe_put(&advert, id, &policy).await;
                }
            }
        }
        self.status.send_modify(|s| s.registered = false);
        if let (Some(l), Some(client)) = (lease, self.client.as_mut()) {
            match bounded(&self.config, client.lease_revoke(l.id)).await {
                Ok(_) => tracing::info!(key = %self.key, "deregistered from etcd"),
                Err(e) => {
                    tracing::warn!(error = %e, "lease revoke failed; advert expires with its TTL")
                }
            }
        }
    }
}
