//! The gateway's security flags: TLS on its ports, TLS to workers (with its client certificate),
//! and the API keys file. See docs/security.md.

use std::path::PathBuf;
use std::sync::Arc;

use moe_common::tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsArgs, TlsError};
use tokio_util::sync::CancellationToken;

use crate::auth::{ApiKeys, KeysError};

#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Keys(#[from] KeysError),
}

/// Everything loaded from the security flags; files are checked at startup and re-read when
/// they change.
pub struct Security {
    /// TLS on the gRPC port; None is plaintext.
    pub grpc_tls: Option<ServerTls>,
    /// TLS on the HTTP port (same certificate); None is plaintext.
    pub http_tls: Option<ServerTls>,
    /// TLS to workers; None dials plaintext workers only.
    pub worker_tls: Option<ClientTls>,
    pub api_keys: Option<Arc<ApiKeys>>,
}

#[derive(Clone, Debug, Default, clap::Args)]
pub struct SecurityArgs {
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// PEM CA bundle worker certificates must chain to. With it the gateway dials workers over
    /// TLS only (plaintext `http://` adverts are refused), presenting --worker-tls-cert, or else
    /// --tls-cert, as its client certificate.
    #[arg(long, env = "MOE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Name worker certificates must carry (SNI and verification), instead of the host of each
    /// advertised endpoint: workers advertise pod IPs while their certificate names a service.
    #[arg(long, env = "MOE_WORKER_TLS_SERVER_NAME", requires = "tls_ca")]
    pub worker_tls_server_name: Option<String>,
    /// PEM client certificate presented to workers, when it must differ from --tls-cert.
    #[arg(long, env = "MOE_WORKER_TLS_CERT", requires = "worker_tls_key")]
    pub worker_tls_cert: Option<PathBuf>,
    /// PEM private key of --worker-tls-cert.
    #[arg(long, env = "MOE_WORKER_TLS_KEY", requires = "worker_tls_cert")]
    pub worker_tls_key: Option<PathBuf>,
    /// API keys file: one key a line, optionally with `name=`, `models=`, `classes=`,
    /// `tokens_per_minute=` and `max_concurrent=`; `#` comments. Without it the gateway serves
    /// anyone who can reach it. Re-read when it changes.
    #[arg(long, env = "MOE_API_KEYS_FILE")]
    pub api_keys: Option<PathBuf>,
}

impl SecurityArgs {
    pub fn validate(&self) -> Result<(), String> {
        if self.worker_tls_cert.is_some() && self.tls_ca.is_none() {
            return Err("--worker-tls-cert needs --tls-ca (the CA of the workers)".into());
        }
        if self.worker_tls_server_name.is_some() && self.tls_ca.is_none() {
            return Err("--worker-tls-server-name needs --tls-ca (the CA of the workers)".into());
        }
        if self
            .worker_tls_server_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return Err("--worker-tls-server-name must not be empty".into());
        }
        Ok(())
    }

    /// TLS to workers: None dials plaintext workers only.
    pub fn worker_tls(&self) -> Option<ClientTlsFiles> {
        let ca = self.tls_ca.clone()?;
        let own = self.tls.tls_cert.clone().zip(self.tls.tls_key.clone());
        let identity = self
            .worker_tls_cert
            .clone()
            .zip(self.worker_tls_key.clone())
            .or(own);
        Some(ClientTlsFiles {
            ca: Some(ca),
            identity,
        })
    }
}

impl Security {
    /// Loads every file (failing on the first unusable one); the API keys file is then watched
    /// until `stop` is cancelled.
    pub fn load(args: &SecurityArgs, stop: CancellationToken) -> Result<Security, SecurityError> {
        let files = args.tls.files();
        let security = Security {
            grpc_tls: files.clone().map(ServerTls::grpc).transpose()?,
            http_tls: files.map(ServerTls::http).transpose()?,
            worker_tls: args.worker_tls().map(ClientTls::load).transpose()?,
            api_keys: args
                .api_keys
                .as_deref()
                .map(|p| ApiKeys::start(p, stop))
                .transpose()?,
        };
        if security.api_keys.is_none() {
            tracing::warn!("no --api-keys: anyone who reaches the gateway may use it");
        }
        Ok(security)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::GatewayConfig;

    fn parse(extra: &[&str]) -> Result<GatewayConfig, clap::Error> {
        let mut args = vec!["moe-gateway", "--etcd", "http://127.0.0.1:2379"];
        args.extend_from_slice(extra);
        GatewayConfig::try_parse_from(args)
    }

    #[test]
    fn worker_tls_server_name_needs_the_worker_ca() {
        assert!(parse(&["--worker-tls-server-name", "moe-worker.moe.svc"]).is_err());
        let c = parse(&[
            "--tls-ca",
            "/etc/moe/worker-ca/ca.crt",
            "--worker-tls-server-name",
            "moe-worker.moe.svc",
        ])
        .expect("parses");
        c.validate().expect("valid");
        assert_eq!(
            c.security.worker_tls_server_name.as_deref(),
            Some("moe-worker.moe.svc")
        );
    }
}
