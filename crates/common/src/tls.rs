//! TLS for the servers (gRPC, HTTP) and for outgoing calls, with rustls and the ring provider.
//! Certificates and keys are PEM files, re-read when they change ([`crate::reload`]), so a rotated
//! Kubernetes Secret takes effect without a restart: new handshakes (servers) and new
//! connections (clients) use the new files, established connections keep theirs.

mod incoming;

pub use incoming::{Conn, ServerListener, incoming};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::reload::Reloading;

const WHAT: &str = "TLS files";

/// How often, at most, the files are checked for changes (on the next handshake or connection).
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable or holds no usable PEM item. Never carries file contents.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA: {0}")]
    ClientCa(String),
}

fn file_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Serving flags, the same on both binaries.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain to serve TLS with (needs --tls-key); without it the port is
    /// plaintext. A gateway also presents it to workers as its client certificate unless
    /// --worker-tls-cert is given.
    #[arg(long, env = "MOE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MOE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: clients must present a certificate signed by it (mutual TLS).
    #[arg(long, env = "MOE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The files to serve with, or None for plaintext.
    pub fn files(&self) -> Option<ServerTlsFiles> {
        Some(ServerTlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
}

#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    /// CA bundle the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate chain and key, for servers that require one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Server TLS settings, rebuilt when the files change. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    inner: Arc<Reloading<Arc<ServerConfig>, TlsError>>,
}

impl ServerTls {
    /// For gRPC (ALPN `h2`). Fails now if a file is missing or unusable.
    pub fn grpc(files: ServerTlsFiles) -> Result<Self, TlsError> {
        Self::load(files, vec![b"h2".to_vec()], RELOAD_CHECK_INTERVAL)
    }

    /// For the HTTP/1.1 API.
    pub fn http(files: ServerTlsFiles) -> Result<Self, TlsError> {
        Self::load(files, vec![b"http/1.1".to_vec()], RELOAD_CHECK_INTERVAL)
    }

    /// `check_every`: how often, at most, the files are looked at (tests use a short one).
    pub fn load(
        files: ServerTlsFiles,
        alpn: Vec<Vec<u8>>,
        check_every: Duration,
    ) -> Result<Self, TlsError> {
        let mut paths = vec![files.cert.clone(), files.key.clone()];
        paths.extend(files.client_ca.clone());
        let build = move |_: Option<&_>| server_config(&files, &alpn).map(Arc::new);
        Ok(ServerTls {
            inner: Arc::new(Reloading::new(WHAT, paths, check_every, Box::new(build))?),
        })
    }

    /// The settings for the next handshake (reloaded first if the files changed).
    pub fn config(&self) -> Arc<ServerConfig> {
        self.inner.get().1
    }
}

/// Client TLS settings for tonic channels, rebuilt when the files change. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    inner: Arc<Reloading<ClientTlsConfig, TlsError>>,
}

impl ClientTls {
    pub fn load(files: ClientTlsFiles) -> Result<Self, TlsError> {
        Self::load_with(files, RELOAD_CHECK_INTERVAL)
    }

    pub fn load_with(files: ClientTlsFiles, check_every: Duration) -> Result<Self, TlsError> {
        let mut paths: Vec<PathBuf> = files.ca.iter().cloned().collect();
        if let Some((cert, key)) = &files.identity {
            paths.extend([cert.clone(), key.clone()]);
        }
        let build = move |_: Option<&_>| files.config();
        Ok(ClientTls {
            inner: Arc::new(Reloading::new(WHAT, paths, check_every, Box::new(build))?),
        })
    }

    /// The current settings and their generation, which goes up on every reload: a caller that
    /// caches channels drops them when it changes, so new connections use the new files.
    pub fn current(&self) -> (u64, ClientTlsConfig) {
        self.inner.get()
    }
}

impl ClientTlsFiles {
    /// Reads and checks the files once (etcd and moectl connections, which are not rebuilt).
    pub fn config(&self) -> Result<ClientTlsConfig, TlsError> {
        let mut c = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            read_certs(ca)?;
            c = c.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let Some((cert, key)) = &self.identity {
            read_certs(cert)?;
            read_key(key)?;
            c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(c)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(path, e))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    // The parse error names the PEM section at fault, never the key material.
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| file_error(path, format!("no usable PEM private key: {e}")))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(files: &ServerTlsFiles, alpn: &[Vec<u8>]) -> Result<ServerConfig, TlsError> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| file_error(ca, format!("unusable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}
