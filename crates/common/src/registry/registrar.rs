//! Worker side of the registry: grant a lease, keep the advert under it fresh, re-register when
//! the lease is lost, and revoke it on deregistration (which deletes the advert at once).

use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{EtcdConfig, RegistryError, WorkerAdvert};
use crate::unix_ms;

#[derive(Clone, Debug)]
pub struct RegistrarConfig {
    pub etcd: EtcdConfig,
    /// Lease time to live: a worker that stops keeping it alive vanishes after this long.
    pub lease_ttl: Duration,
    /// Load changes are written at most this often; state changes are written at once.
    pub min_update_interval: Duration,
}

/// A running registration. Drop it only through [`Registrar::deregister`].
pub struct Registrar {
    stop: CancellationToken,
    task: JoinHandle<()>,
    status: watch::Receiver<RegistrationStatus>,
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
    client: Client,
    key: String,
    config: RegistrarConfig,
    status: watch::Sender<RegistrationStatus>,
}

impl Registrar {
    /// Connects to etcd, grants a lease and writes the current advert under it, then keeps
    /// lease and advert fresh in a background task until [`Registrar::deregister`].
    pub async fn start(
        config: RegistrarConfig,
        adverts: watch::Receiver<WorkerAdvert>,
    ) -> Result<Registrar, RegistryError> {
        let client = config.etcd.connect().await?;
        let first = adverts.borrow().clone();
        let key = config.etcd.worker_key(&first.id);
        let (status_tx, status) = watch::channel(RegistrationStatus::default());
        let mut session = Session {
            client,
            key,
            config,
            status: status_tx,
        };
        let lease = session
            .register(&first)
            .await
            .map_err(|e| e.explain(&session.config.etcd))?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(session.run(lease, adverts, stop.clone()));
        Ok(Registrar { stop, task, status })
    }

    /// Follows the registration: registered or not, and how many leases were granted.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// Writes the latest advert, revokes the lease (removing the advert) and stops.
    pub async fn deregister(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::warn!(error = %e, "registrar task failed");
        }
    }
}

impl Session {
    async fn register(&mut self, advert: &WorkerAdvert) -> Result<Lease, RegistryError> {
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let id = self.client.lease_grant(ttl, None).await?.id();
        self.put(advert, id).await?;
        let (keeper, responses) = self.client.lease_keep_alive(id).await?;
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
        let mut advert = advert.clone();
        advert.updated_unix_ms = unix_ms();
        let opts = PutOptions::new().with_lease(lease);
        self.client
            .put(self.key.as_str(), advert.to_json()?, Some(opts))
            .await?;
        Ok(())
    }

    async fn run(
        mut self,
        lease: Lease,
        mut adverts: watch::Receiver<WorkerAdvert>,
        stop: CancellationToken,
    ) {
        let mut lease = Some(lease);
        let mut keepalive = tokio::time::interval(self.config.lease_ttl / 3);
        let mut flush = tokio::time::interval(self.config.min_update_interval);
        let mut dirty = false;
        let mut last_state = adverts.borrow().state;
        let mut last_put = Instant::now();
        loop {
            if lease.is_none() {
                let advert = adverts.borrow().clone();
                match self.register(&advert).await {
                    Ok(l) => lease = Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "re-registration failed; retrying");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                }
            }
            let l = lease.as_mut().expect("lease present");
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = keepalive.tick() => {
                    if let Err(e) = l.keeper.keep_alive().await {
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
                    let state = adverts.borrow().state;
                    let urgent = state != last_state
                        || last_put.elapsed() >= self.config.min_update_interval;
                    if urgent {
                        last_state = state;
                        let advert = adverts.borrow_and_update().clone();
                        if let Err(e) = self.put(&advert, l.id).await {
                            tracing::warn!(error = %e, "advert update failed");
                            dirty = true;
                        } else {
                            dirty = false;
                            last_put = Instant::now();
                        }
                    } else {
                        dirty = true;
                    }
                }
                _ = flush.tick(), if dirty => {
                    let advert = adverts.borrow_and_update().clone();
                    if self.put(&advert, l.id).await.is_ok() {
                        dirty = false;
                        last_put = Instant::now();
                    }
                }
            }
        }
        self.status.send_modify(|s| s.registered = false);
        if let Some(l) = lease {
            match self.client.lease_revoke(l.id).await {
                Ok(_) => tracing::info!(key = %self.key, "deregistered from etcd"),
                Err(e) => {
                    tracing::warn!(error = %e, "lease revoke failed; advert expires with its TTL")
                }
            }
        }
    }
}
