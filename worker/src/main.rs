//! `touchpoint-worker`: flags and environment in, [`touchpoint_worker::main_with_args`] out.

use clap::Parser as _;
use touchpoint_proto::telemetry::Telemetry;

/// mimalloc: the hot path allocates many small, short-lived buffers (protobuf, Redis
/// replies), where it measured about 15% faster than the system allocator
/// (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let args = touchpoint_worker::WorkerArgs::parse();
    // Logs go to stderr: stdout belongs to the `log` channel's deliveries.
    let telemetry = Telemetry::init("touchpoint-worker", args.telemetry.log_format);
    // reqwest (webhooks) uses rustls; pin its crypto provider once for the process.
    // An error only means one is already installed.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let result = touchpoint_worker::main_with_args(args).await;
    telemetry.shutdown();
    if let Err(error) = result {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}
