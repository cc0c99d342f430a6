//! `moe-worker` binary: parse config, set up telemetry and signals, run.

use clap::Parser;
use moe_worker::WorkerConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = WorkerConfig::parse();
    if let Err(e) = config.validate() {
        eprintln!("moe-worker: {e}");
        std::process::exit(64);
    }
    let telemetry = moe_common::telemetry::init(
        "moe-worker",
        "info,llama-cpp-2=warn,llama_cpp_2=warn",
        &config.telemetry,
    )?;
    let shutdown = moe_common::shutdown::on_signals();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = moe_worker::run(config, shutdown, listener).await;
    // Flushing blocks on the exporter, which needs the runtime's other threads.
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    if let Err(e) = result {
        // Exit at once: after an engine fault the engine thread may still be stuck, and
        // dropping the runtime must not wait on anything it holds.
        eprintln!("moe-worker: {e}");
        std::process::exit(1);
    }
    Ok(())
}
