//! Server and client TLS settings follow their files: a rotated certificate is served on the
//! next handshake without a restart, and a broken rotation keeps the previous one.

use std::path::Path;
use std::time::{Duration, Instant};

use moe_common::tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles, incoming};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

struct Ca(CertifiedIssuer<'static, KeyPair>);

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca(CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap())
    }

    /// Writes a 127.0.0.1 leaf signed by this CA to `cert` and `key`.
    fn leaf_to(&self, cert: &Path, key: &Path) {
        let p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let k = KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &self.0).unwrap();
        std::fs::write(key, k.serialize_pem()).unwrap();
        std::fs::write(cert, c.pem()).unwrap();
    }

    fn trust(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.0.pem()))
    }
}

async fn healthy(addr: std::net::SocketAddr, tls: ClientTlsConfig) -> bool {
    let ep = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    let Ok(ch) = ep.connect().await else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_ok()
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_rotated_server_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let (old_ca, new_ca) = (Ca::new("old"), Ca::new("new"));
    old_ca.leaf_to(&cert, &key);
    let files = ServerTlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: None,
    };
    let tls = ServerTls::load(files, vec![b"h2".to_vec()], Duration::from_millis(50)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming(listener, Some(tls), "test")),
    );

    assert!(
        healthy(addr, old_ca.trust()).await,
        "serves the first certificate"
    );
    assert!(!healthy(addr, new_ca.trust()).await, "not yet the new one");

    new_ca.leaf_to(&cert, &key);
    until("the new certificate", async || {
        healthy(addr, new_ca.trust()).await
    })
    .await;
    assert!(
        !healthy(addr, old_ca.trust()).await,
        "the old certificate is gone"
    );

    // A broken rotation (a key that does not parse) keeps the last good certificate.
    std::fs::write(&key, "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(
        healthy(addr, new_ca.trust()).await,
        "still serving after a bad rotation"
    );
}

#[tokio::test]
async fn client_settings_move_to_a_new_generation_when_files_change() {
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, Ca::new("one").0.pem()).unwrap();
    let tls = ClientTls::load_with(
        ClientTlsFiles {
            ca: Some(ca_file.clone()),
            identity: None,
        },
        Duration::from_millis(20),
    )
    .unwrap();
    assert_eq!(tls.current().0, 0);
    std::fs::write(&ca_file, Ca::new("two").0.pem() + "\n").unwrap();
    until("a reload", async || tls.current().0 == 1).await;
}

#[test]
fn unusable_files_fail_at_startup_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, "garbage").unwrap();
    std::fs::write(&key, "garbage").unwrap();
    let e = ServerTls::grpc(ServerTlsFiles {
        cert: cert.clone(),
        key,
        client_ca: None,
    })
    .err()
    .expect("garbage is refused")
    .to_string();
    assert!(e.contains("c.pem"), "{e}");
    let missing = ServerTls::grpc(ServerTlsFiles {
        cert: dir.path().join("missing.pem"),
        key: dir.path().join("missing.key"),
        client_ca: None,
    });
    assert!(missing.is_err());
}
