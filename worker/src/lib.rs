//! Touchpoint's worker: attaches to a scheduler and delivers the steps it is handed.
//!
//! - [`config`]: `worker.toml` ([`WorkerConfig`]), checked field by field; secrets are
//!   read from the environment at load time and never printed.
//! - [`channel`]: the adapter seam ([`channel::ChannelAdapter`], [`channel::Delivery`],
//!   a self-classifying [`channel::Error`]), the [`channel::Registry`] of channel names,
//!   and one folder per adapter kind: [`channel::log`], [`channel::webhook`],
//!   [`channel::sms`] (Aliyun, generic HTTP), [`channel::smtp`], [`channel::grpc`]
//!   (external adapters).
//! - `link`: the `WorkerService.Attach` stream to the scheduler: Hello, Tasks in,
//!   TaskResults out, bounded concurrency, re-attach with backoff, drain on shutdown.
//! - `heartbeat`: the tasks the worker holds, and the `Heartbeat`s that keep their leases.
//! - `outbox`: results on their way out, kept while the link is down and sent first on
//!   the next stream.
//!
//! [`run`] serves the binary, `tp dev` and tests alike; [`main_with_args`] adds the
//! command line and the signal handling.

pub mod channel;
pub mod config;
mod heartbeat;
mod link;
mod outbox;

use std::future::Future;
use std::path::PathBuf;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use touchpoint_proto::security::{BearerToken, ClientTls};
use tracing::{info, warn};

pub use config::{ChannelConfig, ChannelKind, ChannelRate, ChannelRetry, WorkerConfig};

/// The worker's command line; each flag also reads an environment variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "touchpoint-worker",
    version,
    about = "Delivers Touchpoint steps through channel adapters"
)]
pub struct WorkerArgs {
    /// Logs and metrics.
    #[command(flatten)]
    pub telemetry: touchpoint_proto::telemetry::TelemetryArgs,
    /// The worker configuration file.
    #[arg(long, env = "TOUCHPOINT_WORKER_CONFIG", default_value = "worker.toml")]
    pub config: PathBuf,
    /// gRPC address of the scheduler; overrides `server` in the file.
    #[arg(long, env = "TOUCHPOINT_SERVER")]
    pub server: Option<String>,
    /// Name shown in run timelines; overrides `worker_id` in the file.
    #[arg(long, env = "TOUCHPOINT_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Bearer token for a scheduler that requires one (role `worker`).
    #[arg(long, env = "TOUCHPOINT_TOKEN", hide_env_values = true)]
    #[arg(value_parser = BearerToken::parse)]
    pub token: Option<BearerToken>,
    /// CA certificate (PEM) that signed an https:// scheduler's certificate
    /// (default: the system's CA certificates).
    #[arg(long, env = "TOUCHPOINT_CA")]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for a scheduler that requires mutual TLS.
    #[arg(long, env = "TOUCHPOINT_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert.
    #[arg(long, env = "TOUCHPOINT_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
}

/// Attaches to `config.server` and delivers steps until `shutdown` completes, then
/// waits up to 10s for in-flight deliveries to report. Re-attaches by itself whenever
/// the scheduler goes away; fails only on a configuration it cannot use.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let registry = channel::Registry::from_config(&config.channels)?;
    serve(config, registry, shutdown).await
}

/// [`run`] with the adapters of `registry`, which may hold adapters of the embedding
/// program's own in place of configured ones (e.g. a benchmark's no-op recorder);
/// `config.channels` still gives each channel's slots, rate and retry defaults.
pub async fn serve(
    config: WorkerConfig,
    registry: channel::Registry,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    channel::wecom::serve_callbacks(registry.wecom_adapters(), &config, stop.clone()).await?;
    let link = link::Link::new(&config, registry)?;
    let serving = link.run(stop.clone());
    tokio::pin!(serving);
    tokio::select! {
        () = &mut serving => {}
        () = shutdown => {
            stop.cancel();
            serving.await;
        }
    }
    info!("worker stopped");
    Ok(())
}

/// The binary's body: loads the configuration, applies the command line's overrides and
/// runs until SIGINT or SIGTERM. Does not set up logging.
pub async fn main_with_args(args: WorkerArgs) -> anyhow::Result<()> {
    args.telemetry
        .serve_metrics()
        .await
        .context("cannot serve metrics (--metrics-listen, TOUCHPOINT_METRICS_LISTEN)")?;
    let mut config = WorkerConfig::load(&args.config)
        .with_context(|| format!("worker config {}", args.config.display()))?;
    if let Some(server) = args.server {
        config.server = server;
    }
    if let Some(worker_id) = args.worker_id {
        config.worker_id = Some(worker_id);
    }
    config.token = args.token;
    config.tls = ClientTls {
        ca: args.ca,
        cert: args.tls_client_cert,
        key: args.tls_client_key,
    };
    run(config, shutdown_signal()).await
}

/// Completes on the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(error) => {
                warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    info!("shutting down");
}
