//! The etcd registry: workers advertise themselves under a lease at
//! `<prefix>/workers/<id>`; gateways watch the prefix. See docs/registry.md.

mod advert;
mod registrar;
mod watcher;

pub use advert::{
    ADVERT_SCHEMA, AdvertError, Capacity, DeviceInfo, DeviceKind, Load, MemoryInfo, ModelInfo,
    OffloadInfo, Speed, WorkerAdvert, WorkerState,
};
pub use registrar::{Registrar, RegistrarConfig};
pub use watcher::{ClusterSnapshot, Watcher};

use std::time::Duration;

/// The default key prefix; every key of a cluster lives under it.
pub const DEFAULT_PREFIX: &str = "/moe/v1";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd at {endpoints} did not answer within {timeout:?}")]
    Timeout {
        endpoints: String,
        timeout: Duration,
    },
    #[error("encoding advert: {0}")]
    Encode(#[from] serde_json::Error),
}

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Endpoints such as `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix, e.g. `/moe/v1` (no trailing slash).
    pub prefix: String,
    /// Username and password, when etcd has auth enabled.
    pub user: Option<(String, String)>,
    pub connect_timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            user: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// The prefix under which worker adverts live: `<prefix>/workers/`.
    pub fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix.trim_end_matches('/'))
    }

    /// The key of one worker's advert.
    pub fn worker_key(&self, id: &str) -> String {
        format!("{}{id}", self.workers_prefix())
    }

    /// Connects, failing after `connect_timeout` instead of hanging on an unreachable etcd.
    pub async fn connect(&self) -> Result<etcd_client::Client, RegistryError> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some((user, password)) = &self.user {
            opts = opts.with_user(user, password);
        }
        let connect = etcd_client::Client::connect(&self.endpoints, Some(opts));
        let mut client = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| self.timeout())??;
        // `connect` is lazy about reachability: make one cheap call to prove etcd answers.
        tokio::time::timeout(self.connect_timeout, client.status())
            .await
            .map_err(|_| self.timeout())??;
        Ok(client)
    }

    fn timeout(&self) -> RegistryError {
        RegistryError::Timeout {
            endpoints: self.endpoints.join(","),
            timeout: self.connect_timeout,
        }
    }
}
