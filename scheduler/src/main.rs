//! `touchpoint-scheduler`: flags and environment in, [`touchpoint_scheduler::run`] out.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    // rustls (TLS) with aws-lc-rs, once for the process.
    touchpoint_proto::security::install_crypto_provider();
    let args = touchpoint_scheduler::SchedulerArgs::parse();
    if let Err(err) = touchpoint_scheduler::main_with_args(args).await {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
