//! `moectl`: stream a completion, list the workers in etcd, watch the fleet live, plan expert
//! offload for a GGUF file.

mod top;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moe_common::LatencyClass;
use moe_common::gguf::GgufHeader;
use moe_common::offload::OffloadProfile;
use moe_common::pb::v1::inference_client::InferenceClient;
use moe_common::pb::{ChatMessage, FinishReason, GenerateRequest, SamplingParams};
use moe_common::plan::{KvCacheType, KvLayout, ModelShape};
use moe_common::registry::{EtcdArgs, Watcher, WorkerAdvert};
use moe_common::size::ByteSize;

#[derive(Parser)]
#[command(name = "moectl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream a completion from a gateway (or a worker) to the terminal.
    Generate(GenerateArgs),
    /// Print the workers registered in etcd as a table.
    Workers(WorkersArgs),
    /// Live view of the fleet: per worker profile, VRAM, KV headroom, load and speed.
    Top(top::TopArgs),
    /// Print the memory plan of every offload profile for a GGUF file, without loading it.
    Plan(PlanArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Gateway address, `host:port` or `http://host:port`.
    #[arg(long, env = "MOE_GATEWAY", default_value = "127.0.0.1:50051")]
    gateway: String,
    /// The prompt (with --chat: the user message).
    prompt: String,
    /// Send the prompt as a chat message rendered with the model's template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Require a batch-invariant worker (`batch_invariant`): output that does not depend on
    /// other traffic, or FAILED_PRECONDITION when no worker serving the model is one.
    #[arg(long)]
    batch_invariant: bool,
    #[arg(long, value_enum, default_value_t = LatencyClass::Interactive)]
    class: LatencyClass,
    #[arg(long, default_value = "")]
    model: String,
    #[arg(long)]
    stop: Vec<String>,
    /// Give up after this long (seconds).
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// API key, sent as `authorization: Bearer KEY`.
    #[arg(long, env = "MOE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// PEM CA bundle the gateway's certificate must chain to (use an https:// address).
    #[arg(long, env = "MOE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a gateway that requires one (with --tls-key).
    #[arg(long, env = "MOE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "MOE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(clap::Args)]
struct WorkersArgs {
    /// etcd endpoints (default http://127.0.0.1:2379), prefix, credentials and TLS.
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Print the raw adverts as JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// GGUF model file.
    model: PathBuf,
    /// Accelerator memory available, e.g. 8GiB.
    #[arg(long)]
    vram_budget: Option<ByteSize>,
    /// KV cache cells.
    #[arg(long, default_value_t = 4096)]
    ctx: u32,
    /// Sequences, as the worker's --parallel: each has its own KV stream of ctx / parallel
    /// cells unless --kv-unified (sliding-window layers keep a window per stream).
    #[arg(long, default_value_t = 4)]
    parallel: u32,
    /// One KV cache shared by all sequences, as the worker's --kv-unified.
    #[arg(long)]
    kv_unified: bool,
    /// Tokens per micro-batch, as the worker's --ubatch-size (its default with the default
    /// --batch-size: 512). Compute buffers and sliding-window KV scale with it.
    #[arg(long, default_value_t = moe_common::plan::UBATCH_TOKENS as u32)]
    ubatch_size: u32,
    /// Element type of the K cache, as the worker's --cache-type-k (f16, q8_0, q4_0, ...).
    #[arg(long, default_value_t = KvCacheType::F16)]
    cache_type_k: KvCacheType,
    /// Element type of the V cache, as the worker's --cache-type-v.
    #[arg(long, default_value_t = KvCacheType::F16)]
    cache_type_v: KvCacheType,
}

#[tokio::main]
async fn main() {
    let result = match Cli::parse().command {
        Command::Generate(a) => generate(a).await,
        Command::Workers(a) => workers(a).await,
        Command::Top(a) => top::run(a).await,
        Command::Plan(a) => plan(a),
    };
    if let Err(e) = result {
        match e.downcast_ref::<tonic::Status>() {
            Some(s) => eprintln!("moectl: {:?}: {}", s.code(), s.message()),
            None => eprintln!("moectl: {e:#}"),
        }
        std::process::exit(1);
    }
}

async fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let url = if a.gateway.contains("://") {
        a.gateway.clone()
    } else {
        format!("http://{}", a.gateway)
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("gateway address {url}"))?;
    if a.tls_ca.is_some() || a.tls_cert.is_some() {
        let files = moe_common::tls::ClientTlsFiles {
            ca: a.tls_ca.clone(),
            identity: a.tls_cert.clone().zip(a.tls_key.clone()),
        };
        endpoint = endpoint.tls_config(files.config()?)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let mut client = InferenceClient::new(channel);
    let mut req = GenerateRequest {
        max_tokens: a.max_tokens,
        sampling: Some(SamplingParams {
            temperature: a.temperature,
            seed: a.seed,
            ..Default::default()
        }),
        stop: a.stop,
        latency_class: a.class.to_proto() as i32,
        model: a.model,
        batch_invariant: a.batch_invariant,
        ..Default::default()
    };
    if a.chat {
        req.messages = vec![ChatMessage {
            role: "user".into(),
            content: a.prompt,
            ..Default::default()
        }];
    } else {
        req.prompt = a.prompt;
    }
    let mut request = tonic::Request::new(req);
    request.set_timeout(Duration::from_secs_f64(a.timeout));
    if let Some(key) = &a.api_key {
        let value = format!("Bearer {key}")
            .parse()
            .context("--api-key is not valid in a header")?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut stream = client.generate(request).await?.into_inner();
    let mut out = std::io::stdout();
    while let Some(msg) = stream.message().await? {
        out.write_all(msg.text.as_bytes())?;
        out.flush()?;
        if msg.finish_reason != FinishReason::Unspecified as i32 {
            let finish = FinishReason::try_from(msg.finish_reason)
                .map(|f| f.as_str_name())
                .unwrap_or("?");
            let usage = msg.usage.unwrap_or_default();
            let t = msg.timings.unwrap_or_default();
            eprintln!(
                "\n[{finish}] worker={} profile={} prompt={} completion={} ttft={:.0}ms decode={:.1} tok/s migrations={} batch_invariant={} system_fingerprint={}",
                msg.worker_id,
                msg.offload_profile,
                usage.prompt_tokens,
                usage.completion_tokens,
                t.time_to_first_token_seconds * 1e3,
                t.decode_tokens_per_second,
                msg.migrations,
                msg.batch_invariant,
                if msg.system_fingerprint.is_empty() {
                    "-"
                } else {
                    &msg.system_fingerprint
                }
            );
        }
    }
    Ok(())
}

async fn workers(a: WorkersArgs) -> anyhow::Result<()> {
    a.etcd.validate().map_err(anyhow::Error::msg)?;
    let etcd = a.etcd.or_local().config();
    let stop = tokio_util::sync::CancellationToken::new();
    let watcher = Watcher::start(etcd, stop.clone()).await?;
    let snap = watcher.current();
    stop.cancel();
    if a.json {
        for w in snap.workers.values() {
            println!("{}", serde_json::to_string(w.as_ref())?);
        }
        return Ok(());
    }
    println!("{}", table_header());
    for w in snap.workers.values() {
        println!("{}", table_row(w));
    }
    for (key, why) in &snap.rejected {
        eprintln!("invalid advert at {key}: {why}");
    }
    Ok(())
}

fn table_header() -> String {
    format!(
        "{:<24} {:<10} {:<14} {:<10} {:<15} {:<16} {:>22} {:>14} {:>8} {:>8}",
        "ID",
        "STATE",
        "PROFILE",
        "DECODE",
        "BATCH_INVARIANT",
        "MODEL",
        "GPU USED/TOTAL",
        "KV FREE",
        "ACTIVE",
        "QUEUED"
    )
}

fn table_row(w: &WorkerAdvert) -> String {
    let gpu: Vec<_> = w
        .devices
        .iter()
        .filter(|d| d.kind != moe_common::registry::DeviceKind::Cpu)
        .collect();
    let vram = if gpu.is_empty() {
        "cpu only".to_string()
    } else {
        let total: u64 = gpu.iter().map(|d| d.total_bytes).sum();
        let free: u64 = gpu.iter().map(|d| d.free_bytes).sum();
        format!("{}/{}", ByteSize(total - free), ByteSize(total))
    };
    format!(
        "{:<24} {:<10} {:<14} {:<10} {:<15} {:<16} {:>22} {:>14} {:>8} {:>8}",
        w.id,
        format!("{:?}", w.state).to_lowercase(),
        w.offload.profile,
        // Workers older than the advert's decode_mode do not say.
        w.decode_mode.as_deref().unwrap_or("-"),
        // Nor do workers older than its batch_invariant.
        match w.batch_invariant {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        },
        w.model.name,
        vram,
        format!(
            "{}/{}",
            w.capacity.free_kv_tokens, w.capacity.context_tokens
        ),
        w.load.active,
        w.load.queued
    )
}

fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let header = GgufHeader::open(&a.model).with_context(|| a.model.display().to_string())?;
    let shape = ModelShape::from_gguf(&header);
    let kv = KvLayout {
        cells: a.ctx,
        sequences: a.parallel.max(1),
        unified: a.kv_unified,
        ubatch: a.ubatch_size.max(1),
        swa_full: false,
        // The worker samples at most one position per sequence per decode call.
        outputs_max: a.parallel.max(1),
        type_k: a.cache_type_k,
        type_v: a.cache_type_v,
    };
    println!(
        "model {} ({}), {} layers, {} experts ({} used), weights {}, ctx {} (KV {}), parallel {}, \
         micro-batch {}{}{}",
        header.name().unwrap_or("?"),
        header.architecture().unwrap_or("?"),
        shape.n_layer,
        shape.expert_count,
        shape.expert_used_count,
        ByteSize(shape.total_weight_bytes),
        a.ctx,
        ByteSize(shape.kv_bytes_for(&kv)),
        a.parallel,
        kv.ubatch,
        if a.kv_unified { ", unified KV" } else { "" },
        if (kv.type_k, kv.type_v) == (KvCacheType::F16, KvCacheType::F16) {
            String::new()
        } else {
            format!(", KV cache {}/{}", kv.type_k, kv.type_v)
        }
    );
    if shape.swa_layers > 0 {
        let (streams, full, swa) = kv.cells_per_stream(shape.n_swa);
        println!(
            "sliding window {} on {} of {} layers: {streams} KV stream(s) of {full} cells, {swa} on \
             sliding layers",
            shape.n_swa, shape.swa_layers, shape.n_layer
        );
    }
    println!(
        "{:<16} {:>10} {:>16} {:>16} {:>16} {:>16} {:>16}",
        "PROFILE", "N_CPU_MOE", "GPU WEIGHTS", "GPU KV", "HOST EXPERTS", "GPU COMPUTE", "GPU TOTAL"
    );
    let mut profiles = vec![OffloadProfile::Full, OffloadProfile::CpuMoe];
    if shape.n_layer > 1 {
        profiles.push(OffloadProfile::NCpuMoe(shape.n_layer / 2));
    }
    let mut rows: Vec<(String, moe_common::plan::MemoryPlan)> = profiles
        .iter()
        .map(|p| {
            (
                p.to_string(),
                shape.plan_for(p.n_cpu_moe(shape.n_layer), &kv),
            )
        })
        .collect();
    if let Some(budget) = a.vram_budget {
        match shape.fit_for(budget.0, moe_common::plan::ACCELERATOR_OVERHEAD_BYTES, &kv) {
            Some(p) => rows.push((format!("auto@{budget}"), p)),
            None => eprintln!("auto: nothing fits {budget}"),
        }
    }
    for (name, p) in rows {
        println!(
            "{:<16} {:>10} {:>16} {:>16} {:>16} {:>16} {:>16}",
            name,
            p.n_cpu_moe,
            ByteSize(p.device_weight_bytes).to_string(),
            ByteSize(p.kv_bytes).to_string(),
            ByteSize(p.host_expert_bytes).to_string(),
            ByteSize(p.compute_bytes).to_string(),
            ByteSize(p.device_bytes() + moe_common::plan::ACCELERATOR_OVERHEAD_BYTES).to_string()
        );
    }
    println!(
        "host memory also holds the input embeddings ({}); GPU TOTAL adds {} per process for the \
         CUDA context, cuBLAS and pools",
        ByteSize(shape.input_embedding_bytes),
        ByteSize(moe_common::plan::ACCELERATOR_OVERHEAD_BYTES)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An advert as a worker older than `decode_mode` and `batch_invariant` writes it.
    fn advert_json() -> serde_json::Value {
        serde_json::json!({
            "schema": moe_common::registry::ADVERT_SCHEMA,
            "id": "w1",
            "endpoint": "http://127.0.0.1:50061",
            "state": "ready",
            "model": {"name": "m", "architecture": "llama", "n_layer": 2, "expert_count": 4,
                      "expert_used_count": 2, "weight_bytes": 1},
            "offload": {"mode": "full", "n_cpu_moe": 0, "profile": "full"},
            "devices": [],
            "memory": {"weight_bytes": 1, "kv_bytes": 1, "host_expert_bytes": 0},
            "capacity": {"context_tokens": 4096, "free_kv_tokens": 1024, "max_sequences": 4},
            "load": {"active": 3, "queued": 2},
            "version": "0",
            "updated_unix_ms": 0
        })
    }

    #[test]
    fn the_workers_table_shows_the_decode_mode() {
        let mut json = advert_json();
        // A worker older than the field says nothing about its mode.
        let old: WorkerAdvert = serde_json::from_value(json.clone()).unwrap();
        let row = table_row(&old);
        assert_eq!(row.split_whitespace().nth(3), Some("-"), "{row}");
        json["decode_mode"] = "sequential".into();
        let new: WorkerAdvert = serde_json::from_value(json).unwrap();
        let row = table_row(&new);
        assert_eq!(row.split_whitespace().nth(3), Some("sequential"), "{row}");
        assert_eq!(table_header().split_whitespace().nth(3), Some("DECODE"));
    }

    #[test]
    fn the_workers_table_shows_batch_invariance_next_to_the_decode_mode() {
        let header = table_header();
        let columns: Vec<&str> = header.split_whitespace().collect();
        assert_eq!(columns[3..5], ["DECODE", "BATCH_INVARIANT"], "{header}");
        let mut json = advert_json();
        json["decode_mode"] = "batched".into();
        let cell = |json: &serde_json::Value| {
            let w: WorkerAdvert = serde_json::from_value(json.clone()).unwrap();
            let row = table_row(&w);
            // The column lines up under its header.
            let at = header.find("BATCH_INVARIANT").unwrap();
            assert_eq!(row.len(), header.len(), "{row}\n{header}");
            row[at..at + 15].trim().to_string()
        };
        // A worker older than the field says nothing.
        assert_eq!(cell(&json), "-");
        json["batch_invariant"] = true.into();
        assert_eq!(cell(&json), "yes");
        json["batch_invariant"] = false.into();
        assert_eq!(cell(&json), "no");
    }
}
