//! `moectl top`: a live view of the fleet from the etcd registry — per worker its profile, VRAM,
//! KV headroom, load and speed — redrawn in place every interval (`--once` prints one frame).

use std::io::Write;
use std::time::Duration;

use moe_common::registry::{ClusterSnapshot, DeviceKind, EtcdArgs, Watcher, WorkerAdvert};
use moe_common::size::ByteSize;

/// Clear the screen and home the cursor.
const CLEAR: &str = "\x1b[2J\x1b[H";

#[derive(clap::Args)]
pub struct TopArgs {
    /// etcd endpoints (default http://127.0.0.1:2379), prefix, credentials and TLS.
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Print one frame without clearing the screen and exit (for scripts and tests).
    #[arg(long)]
    once: bool,
    /// Time between frames, e.g. 1s or 500ms.
    #[arg(long, default_value = "1s", value_parser = moe_common::flags::parse_duration_flag)]
    interval: Duration,
}

pub async fn run(a: TopArgs) -> anyhow::Result<()> {
    a.etcd.validate().map_err(anyhow::Error::msg)?;
    let etcd = a.etcd.or_local().config();
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = Watcher::start(etcd.clone(), stop.clone()).await?;
    let title = format!("{} {}", etcd.endpoints.join(","), etcd.prefix);
    if a.once {
        print!("{}", frame(&title, &watcher.current()));
        stop.cancel();
        return Ok(());
    }
    let mut tick = tokio::time::interval(a.interval);
    let mut out = std::io::stdout();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        write!(out, "{CLEAR}{}", frame(&title, &watcher.current()))?;
        out.flush()?;
    }
    stop.cancel();
    Ok(())
}

/// One screen: a summary line, a header and a row per worker (sorted by id).
pub fn frame(title: &str, snap: &ClusterSnapshot) -> String {
    let workers: Vec<&WorkerAdvert> = snap.workers.values().map(|w| w.as_ref()).collect();
    let ready = workers.iter().filter(|w| w.is_ready()).count();
    let active: u32 = workers.iter().map(|w| w.load.active).sum();
    let queued: u32 = workers.iter().map(|w| w.load.queued).sum();
    let kv_free: u64 = workers
        .iter()
        .map(|w| w.capacity.free_kv_tokens as u64)
        .sum();
    let kv_total: u64 = workers
        .iter()
        .map(|w| w.capacity.context_tokens as u64)
        .sum();
    let mut s = format!(
        "moectl top — {title} — {} workers ({ready} ready), {active} active, {queued} queued, KV free {kv_free}/{kv_total}\n\n",
        workers.len()
    );
    s.push_str(&format!(
        "{:<20} {:<9} {:<13} {:>19} {:>16} {:>9} {:>6} {:>9} {:>9}\n",
        "WORKER",
        "STATE",
        "PROFILE",
        "VRAM USED/TOTAL",
        "KV FREE",
        "ACT/MAX",
        "QUEUE",
        "DEC TOK/S",
        "PRE TOK/S"
    ));
    for w in workers {
        s.push_str(&row(w));
        s.push('\n');
    }
    for (key, why) in &snap.rejected {
        s.push_str(&format!("invalid advert at {key}: {why}\n"));
    }
    s
}

fn row(w: &WorkerAdvert) -> String {
    let gpus: Vec<_> = w
        .devices
        .iter()
        .filter(|d| d.kind != DeviceKind::Cpu)
        .collect();
    let vram = if gpus.is_empty() {
        "cpu only".to_string()
    } else {
        let total: u64 = gpus.iter().map(|d| d.total_bytes).sum();
        let free: u64 = gpus.iter().map(|d| d.free_bytes).sum();
        format!(
            "{}/{}",
            ByteSize(total.saturating_sub(free)),
            ByteSize(total)
        )
    };
    let c = &w.capacity;
    let pct = 100 * c.free_kv_tokens as u64 / c.context_tokens.max(1) as u64;
    format!(
        "{:<20} {:<9} {:<13} {:>19} {:>16} {:>9} {:>6} {:>9.1} {:>9.1}",
        truncate(&w.id, 20),
        format!("{:?}", w.state).to_lowercase(),
        truncate(&w.offload.profile, 13),
        vram,
        format!("{}/{} {pct}%", c.free_kv_tokens, c.context_tokens),
        format!("{}/{}", w.load.active, c.max_sequences),
        w.load.queued,
        w.speed.decode_tokens_per_second,
        w.speed.prefill_tokens_per_second,
    )
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_common::registry::{DeviceInfo, WorkerState};
    use std::sync::Arc;

    fn advert(id: &str, profile: &str) -> WorkerAdvert {
        let json = serde_json::json!({
            "schema": moe_common::registry::ADVERT_SCHEMA,
            "id": id,
            "endpoint": "http://127.0.0.1:50061",
            "state": "ready",
            "model": {"name": "m", "architecture": "llama", "n_layer": 2, "expert_count": 4,
                      "expert_used_count": 2, "weight_bytes": 1},
            "offload": {"mode": profile, "n_cpu_moe": 0, "profile": profile},
            "devices": [],
            "memory": {"weight_bytes": 1, "kv_bytes": 1, "host_expert_bytes": 0},
            "capacity": {"context_tokens": 4096, "free_kv_tokens": 1024, "max_sequences": 4},
            "load": {"active": 3, "queued": 2},
            "speed": {"decode_tokens_per_second": 41.25, "prefill_tokens_per_second": 900.0},
            "version": "0",
            "updated_unix_ms": 0
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_frame_shows_each_workers_profile_memory_headroom_load_and_speed() {
        let mut gpu = advert("gpu-0", "full");
        gpu.devices.push(DeviceInfo {
            name: "CUDA0".into(),
            description: "L4".into(),
            kind: DeviceKind::Gpu,
            total_bytes: 24 << 30,
            free_bytes: 8 << 30,
            weight_bytes: 12 << 30,
            kv_bytes: 1 << 30,
            ..Default::default()
        });
        let mut cpu = advert("cpu-0", "cpu-moe");
        cpu.state = WorkerState::Draining;
        let mut snap = ClusterSnapshot::default();
        snap.workers.insert("gpu-0".into(), Arc::new(gpu));
        snap.workers.insert("cpu-0".into(), Arc::new(cpu));
        let f = frame("etcd", &snap);
        assert!(
            f.starts_with(
                "moectl top — etcd — 2 workers (1 ready), 6 active, 4 queued, KV free 2048/8192"
            ),
            "{f}"
        );
        let gpu_row = f.lines().find(|l| l.starts_with("gpu-0")).expect(&f);
        assert!(gpu_row.contains("full"), "{gpu_row}");
        assert!(gpu_row.contains("16.0 GiB/24.0 GiB"), "{gpu_row}");
        assert!(gpu_row.contains("1024/4096 25%"), "{gpu_row}");
        assert!(gpu_row.contains("3/4"), "{gpu_row}");
        assert!(gpu_row.contains("41.2"), "{gpu_row}");
        let cpu_row = f.lines().find(|l| l.starts_with("cpu-0")).expect(&f);
        assert!(
            cpu_row.contains("draining") && cpu_row.contains("cpu only"),
            "{cpu_row}"
        );
        assert!(!f.contains(CLEAR), "--once frames never clear the screen");
    }
}
