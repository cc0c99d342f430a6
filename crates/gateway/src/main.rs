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
    moe_common::telemetry::init("info");
    let shutdown = moe_common::shutdown::on_signals();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    moe_gateway::run(config, shutdown, listener).await?;
    Ok(())
}
