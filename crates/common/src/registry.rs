//! The etcd registry: workers advertise themselves under a lease at
//! `<prefix>/workers/<id>`; gateways watch the prefix. See docs/registry.md.

mod advert;
mod backoff;
mod features;
mod registrar;
mod watcher;
mod write_policy;

pub use advert::{
    ADVERT_SCHEMA, AdvertError, Capacity, DeviceInfo, DeviceKind, Load, MemoryInfo, ModelInfo,
    OffloadInfo, Speed, WorkerAdvert, WorkerState,
};
pub use features::{Feature, Features};
pub use registrar::{Registrar, RegistrarConfig, RegistrationStatus};
pub use watcher::{ClusterSnapshot, Watcher};
pub use write_policy::{Change, WritePolicy};

use std::path::PathBuf;
use std::time::Duration;

use crate::tls::{ClientTlsFiles, TlsError};

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
    #[error(
        "etcd at {endpoints} refused the request ({message}): check --etcd-user/--etcd-password and the user's role on the key prefix"
    )]
    Auth { endpoints: String, message: String },
    #[error("etcd TLS: {0}")]
    Tls(#[from] TlsError),
}

impl RegistryError {
    /// Turns etcd's authentication and permission refusals into [`RegistryError::Auth`], which
    /// says what to fix.
    pub fn explain(self, config: &EtcdConfig) -> RegistryError {
        let RegistryError::Etcd(etcd_client::Error::GRpcStatus(status)) = &self else {
            return self;
        };
        let message = status.message();
        let auth = matches!(
            status.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ) || message.contains("user name is empty")
            || message.contains("invalid auth token")
            || message.contains("authentication failed");
        if !auth {
            return self;
        }
        RegistryError::Auth {
            endpoints: config.endpoints.join(","),
            message: message.to_string(),
        }
    }
}

/// The etcd flags, the same on every binary that talks to etcd (gateway, worker, `moectl
/// workers`, `moectl top`): `--etcd`, `--etcd-prefix`, `--etcd-user`, `--etcd-password` and the
/// TLS flags. `--etcd` has no default here: each binary says what an empty list means
/// ([`EtcdArgs::require`], [`EtcdArgs::or_local`], or "unregistered" on the worker).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints (comma-separated or repeated).
    #[arg(long, env = "MOE_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// etcd key prefix of the cluster.
    #[arg(long, env = "MOE_ETCD_PREFIX", default_value = DEFAULT_PREFIX)]
    pub etcd_prefix: String,
    /// etcd user name (with --etcd-password).
    #[arg(long, env = "MOE_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// etcd password (with --etcd-user).
    #[arg(long, env = "MOE_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    #[command(flatten)]
    pub etcd_tls: EtcdTlsArgs,
}

/// Where `moectl` looks for etcd when `--etcd` is not given.
pub const LOCAL_ETCD: &str = "http://127.0.0.1:2379";

impl EtcdArgs {
    /// Cross-flag checks clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.etcd_user.is_some() != self.etcd_password.is_some() {
            return Err("--etcd-user and --etcd-password go together".into());
        }
        Ok(())
    }

    /// [`EtcdArgs::validate`], and at least one endpoint.
    pub fn require(&self) -> Result<(), String> {
        if self.etcd.is_empty() {
            return Err("--etcd (or MOE_ETCD) is required".into());
        }
        self.validate()
    }

    /// With no `--etcd`, the local default [`LOCAL_ETCD`].
    pub fn or_local(mut self) -> Self {
        if self.etcd.is_empty() {
            self.etcd.push(LOCAL_ETCD.to_string());
        }
        self
    }

    /// How to reach etcd as these flags say.
    pub fn config(&self) -> EtcdConfig {
        let mut c = EtcdConfig::new(self.etcd.clone());
        c.prefix = self.etcd_prefix.clone();
        c.user = self.etcd_user.clone().zip(self.etcd_password.clone());
        c.tls = self.etcd_tls.files();
        c
    }
}

/// etcd TLS flags, the same on every binary that talks to etcd.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct EtcdTlsArgs {
    /// PEM CA bundle etcd's server certificate must chain to (use https:// endpoints).
    #[arg(long, env = "MOE_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd's client-certificate auth (with --etcd-key).
    #[arg(long, env = "MOE_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of --etcd-cert.
    #[arg(long, env = "MOE_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The TLS files, or None when no flag is given (plaintext etcd).
    pub fn files(&self) -> Option<ClientTlsFiles> {
        if self.etcd_ca.is_none() && self.etcd_cert.is_none() {
            return None;
        }
        Some(ClientTlsFiles {
            ca: self.etcd_ca.clone(),
            identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
        })
    }
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
    /// TLS to etcd (files read at connect); None is plaintext.
    pub tls: Option<ClientTlsFiles>,
    pub connect_timeout: Duration,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: DEFAULT_PREFIX.to_string(),
            user: None,
            tls: None,
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

    /// Connects, failing after `connect_timeout` instead of hanging on an unreachable etcd, and
    /// with [`RegistryError::Auth`] when etcd refuses the credentials.
    pub async fn connect(&self) -> Result<etcd_client::Client, RegistryError> {
        self.connect_once().await.map_err(|e| e.explain(self))
    }

    async fn connect_once(&self) -> Result<etcd_client::Client, RegistryError> {
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some((user, password)) = &self.user {
            opts = opts.with_user(user, password);
        }
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.config()?);
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

    pub(crate) fn timeout(&self) -> RegistryError {
        RegistryError::Timeout {
            endpoints: self.endpoints.join(","),
            timeout: self.connect_timeout,
        }
    }
}
