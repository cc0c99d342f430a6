use clap::Parser;
use moe_bench::config::BenchConfig;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = BenchConfig::parse();
    if let Err(why) = config.validate() {
        eprintln!("moe-bench: {why}");
        std::process::exit(64);
    }
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    if config.chat_conversations > 0 {
        let report = moe_bench::chat::run(&config, cancel).await?;
        print!("{}", report.table());
        if let Some(path) = &config.json {
            std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")?;
        }
        return Ok(());
    }
    let report = moe_bench::run(&config, cancel).await?;
    print!("{}", report.table());
    if let Some(path) = &config.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    Ok(())
}
