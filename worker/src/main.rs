//! `touchpoint-worker`: flags and environment in, [`touchpoint_worker::main_with_args`] out.

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    // Logs go to stderr: stdout belongs to the `log` channel's deliveries.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    // reqwest (webhooks) uses rustls; pin its crypto provider once for the process.
    // An error only means one is already installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args = touchpoint_worker::WorkerArgs::parse();
    if let Err(error) = touchpoint_worker::main_with_args(args).await {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
