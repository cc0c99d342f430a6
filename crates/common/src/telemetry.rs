//! Logging set-up shared by the binaries: `RUST_LOG`-style filtering, human or JSON output.

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. `MOE_LOG_FORMAT=json` switches to JSON lines.
/// Safe to call more than once (later calls are no-ops), which tests rely on.
pub fn init(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var("MOE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
