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
        Etcd::start_with(free_port(), true).await
    }

    /// An etcd answering on `client_port`, e.g. one a test gave a gateway and a worker before
    /// etcd was up ([`Etcd::endpoint_on`]).
    pub async fn start_on(client_port: u16) -> Etcd {
        Etcd::start_with(client_port, false).await
    }

    /// Starts etcd, trying again on fresh ports when it exits before it answers: most often
    /// another process took a port between [`free_port`] and etcd's bind (tests start many
    /// servers at once). The peer port is always fresh; the client port only when the caller
    /// did not choose it (`any_client_port`).
    async fn start_with(client_port: u16, any_client_port: bool) -> Etcd {
        const ATTEMPTS: u32 = 3;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut etcd = Etcd {
            child: None,
            endpoint: Etcd::endpoint_on(client_port),
            client_port,
            peer_port: free_port(),
            data: dir.path().join("data"),
            _dir: dir,
        };
        for attempt in 1..=ATTEMPTS {
            match etcd.launch().await {
                Ok(()) => return etcd,
                Err(why) if attempt < ATTEMPTS => {
                    eprintln!("etcd attempt {attempt} of {ATTEMPTS}: {why}; trying fresh ports");
                    etcd.kill();
                    let _ = std::fs::remove_dir_all(&etcd.data);
                    etcd.peer_port = free_port();
                    if any_client_port {
                        etcd.client_port = free_port();
                        etcd.endpoint = Etcd::endpoint_on(etcd.client_port);
                    }
                }
                Err(why) => panic!("{why}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The endpoint an etcd on `client_port` will have.
    pub fn endpoint_on(client_port: u16) -> String {
        format!("http://127.0.0.1:{client_port}")
    }

    /// Starts etcd on this instance's ports and data (a restart keeps them) and waits until it
    /// answers; panics, with etcd's last log lines, when it exits first or does not answer.
    async fn spawn(&mut self) {
        if let Err(why) = self.launch().await {
            panic!("{why}");
        }
    }

    /// etcd's own log (stdout and stderr), next to its data directory.
    fn log_path(&self) -> PathBuf {
        self.data.with_file_name("etcd.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Spawns etcd and waits until it answers: Err when the process exits first (its status and
    /// last log lines); panics when it neither answers nor exits within 20 s.
    async fn launch(&mut self) -> Result<(), String> {
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log file");
        let child = Command::new(std::env::var("MOE_ETCD_BIN").unwrap_or_else(|_| "etcd".into()))
            .args(["--name", "test", "--data-dir"])
            .arg(&self.data)
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::from(log.try_clone().expect("etcd log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start etcd (apt-get install etcd-server)");
        self.child = Some(child);
        let config = self.config("/probe");
        let exited = eventually(Duration::from_secs(20), "etcd to answer", || {
            let c = config.clone();
            let status = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            async move {
                match status {
                    Some(status) => Some(Some(status)),
                    // Short tries, so that an etcd that exited is noticed within a second.
                    None => tokio::time::timeout(Duration::from_secs(1), c.connect())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(|_| None),
                }
            }
        })
        .await;
        match exited {
            None => Ok(()),
            Some(status) => {
                self.child = None;
                Err(format!(
                    "etcd on client port {} / peer port {} exited before it answered ({status}): {}",
                    self.client_port,
                    self.peer_port,
                    self.log_tail()
                ))
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A client port some other process holds: etcd exits at once, which start-up reports with
    /// etcd's own words instead of waiting out its timeout; where the port was not the
    /// caller's choice, the next attempt takes a fresh one.
    #[tokio::test]
    async fn etcd_that_cannot_bind_is_retried_on_fresh_ports_or_reported() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let etcd = Etcd::start_with(port, true).await;
        assert_ne!(etcd.client_port(), port, "a fresh client port");
        etcd.client().await.status().await.expect("etcd answers");
        drop(etcd);
        let started = std::time::Instant::now();
        let fixed = tokio::spawn(async move { Etcd::start_on(port).await.endpoint.clone() }).await;
        let panic = fixed.expect_err("the caller's port is taken: no etcd");
        let msg = panic
            .into_panic()
            .downcast::<String>()
            .map(|m| *m)
            .unwrap_or_default();
        assert!(msg.contains("exited before it answered"), "{msg}");
        assert!(msg.contains(&port.to_string()), "{msg}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "three failed starts, not a 20 s timeout: {:?}",
            started.elapsed()
        );
    }
}
