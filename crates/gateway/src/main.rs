//! `moe-gateway` binary: parse config, set up telemetry and signals, run.

use clap::Parser;
use moe_gateway::GatewayConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = GatewayConfig::parse();
    if let Err(e) = config.validate() {
        eprintln!("moe-gateway: {e}");
        std::process::exit(64);
    }
    let telemetry = moe_common::telemetry::init("moe-gateway", "info", &config.telemetry)?;
    let shutdown = moe_common::shutdown::on_signals();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = moe_gateway::run(config, shutdown, listener).await;
    // Flushing blocks on the exporter, which needs the runtime's other threads.
    tokio::task::spawn_blocking(move || telemetry.shutdown()).await?;
    Ok(result?)
}
