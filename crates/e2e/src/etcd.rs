//! A real etcd for tests: free loopback ports, its own data directory, and the faults tests
//! inject (SIGSTOP/SIGCONT, kill and restart on the same ports, snapshot save and restore).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use moe_common::registry::{EtcdConfig, WorkerAdvert};

use crate::{eventually, free_port};

/// A real etcd server on free loopback ports with its own data directory.
pub struct Etcd {
    child: Option<Child>,
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub async fn start() -> Etcd {
        Etcd::start_on(free_port()).await
    }

    /// An etcd answering on `client_port`, e.g. one a test gave a gateway and a worker before
    /// etcd was up ([`Etcd::endpoint_on`]).
    pub async fn start_on(client_port: u16) -> Etcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut etcd = Etcd {
            child: None,
            endpoint: Etcd::endpoint_on(client_port),
            client_port,
            peer_port: free_port(),
            data: dir.path().join("data"),
            _dir: dir,
        };
        etcd.spawn().await;
        etcd
    }

    /// The endpoint an etcd on `client_port` will have.
    pub fn endpoint_on(client_port: u16) -> String {
        format!("http://127.0.0.1:{client_port}")
    }

    async fn spawn(&mut self) {
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(std::env::var("MOE_ETCD_BIN").unwrap_or_else(|_| "etcd".into()))
            .args(["--name", "test", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (apt-get install etcd-server)");
        self.child = Some(child);
        let config = self.config("/probe");
        eventually(Duration::from_secs(20), "etcd to answer", || {
            let c = config.clone();
            async move { c.connect().await.ok().map(|_| ()) }
        })
        .await;
    }

    /// Sends `sig` (`STOP`, `CONT`, ...) to the etcd process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} etcd");
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("etcd running").id()
    }

    /// SIGKILLs etcd and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd and starts it again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// `etcdctl snapshot save` into `path`.
    pub fn snapshot_save(&self, path: &Path) {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint, "snapshot", "save"])
            .arg(path)
            .output()
            .expect("run etcdctl");
        assert!(out.status.success(), "etcdctl snapshot save: {out:?}");
    }

    /// Kills etcd, replaces its data with `snapshot` (`etcdctl snapshot restore`; the revision
    /// goes back to the snapshot's) and starts it again on the same ports.
    pub async fn restore(&mut self, snapshot: &Path) {
        self.kill();
        std::fs::remove_dir_all(&self.data).expect("remove etcd data");
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["snapshot", "restore"])
            .arg(snapshot)
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--name", "test", "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .output()
            .expect("run etcdctl");
        assert!(out.status.success(), "etcdctl snapshot restore: {out:?}");
        self.spawn().await;
    }

    /// The etcd client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// Registry settings for one test's own key prefix.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        let mut c = EtcdConfig::new(vec![self.endpoint.clone()]);
        c.prefix = prefix.to_string();
        c
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint.as_str()], None)
            .await
            .expect("etcd client")
    }

    /// The advert stored at `<prefix>/workers/<id>`, if any.
    pub async fn advert(&self, prefix: &str, id: &str) -> Option<WorkerAdvert> {
        let key = self.config(prefix).worker_key(id);
        let resp = self.client().await.get(key.as_str(), None).await.ok()?;
        let kv = resp.kvs().first()?;
        Some(WorkerAdvert::from_json(&key, kv.value()).expect("valid advert"))
    }

    /// The raw JSON of an advert.
    pub async fn advert_json(&self, prefix: &str, id: &str) -> Option<serde_json::Value> {
        let key = self.config(prefix).worker_key(id);
        let resp = self.client().await.get(key.as_str(), None).await.ok()?;
        let kv = resp.kvs().first()?;
        serde_json::from_slice(kv.value()).ok()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
