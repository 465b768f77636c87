//! Touchpoint scheduler (API stub while the implementation lands).
use std::{future::Future, net::SocketAddr, time::Duration};

/// Flags and environment of the scheduler.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "touchpoint-scheduler", version, about)]
pub struct SchedulerArgs {
    /// Redis holding all state.
    #[arg(long, env = "TOUCHPOINT_REDIS_URL", default_value = "redis://127.0.0.1:6379/0")]
    pub redis_url: String,
    /// gRPC listen address.
    #[arg(long, env = "TOUCHPOINT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// How long a worker holds a handed-out step before it is handed out again.
    #[arg(long, env = "TOUCHPOINT_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn run(
    _args: SchedulerArgs,
    _listener: tokio::net::TcpListener,
    _shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Ok(())
}

/// What `main` does: binds `args.listen` and serves until SIGINT or SIGTERM.
pub async fn main_with_args(_args: SchedulerArgs) -> anyhow::Result<()> {
    Ok(())
}
