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
    moe_common::telemetry::init("info,llama-cpp-2=warn,llama_cpp_2=warn");
    let shutdown = moe_common::shutdown::on_signals();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    moe_worker::run(config, shutdown, listener).await?;
    Ok(())
}
