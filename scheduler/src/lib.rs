//! Touchpoint scheduler: the gRPC API, all state in Redis, durable timers, dispatch.
//!
//! - [`playbook`]: the model; parsing and validation with field paths; templates.
//! - [`store`]: the only code that touches Redis: key layout ([`store::keys`]) and Lua.
//! - [`run`]: run states, timeline entries, step transitions, backoff.
//! - `engine`: the timer loop (claim due steps, settle or dispatch) and outcomes.
//! - `workers`: connected workers and credit-based flow control.
//! - `ownership`: scheduler membership and partition leases: which scheduler runs
//!   which partition's timers.
//! - `api`: thin tonic services.
//! - [`auth`]: bearer tokens with roles, one tower layer in front of every service;
//!   `tls`: the server's certificate and, for mutual TLS, the client CA.
//!
//! [`run`](fn@run) serves on a listener until a shutdown future completes; `main` and
//! `tp dev` both call it.

mod api;
pub mod auth;
pub mod campaigns;
mod clock;
mod engine;
pub mod enrollment;
mod list_sweeper;
pub mod localtime;
mod observe;
pub mod ownership;
pub mod playbook;
mod playbook_cache;
pub mod policy;
pub mod run;
pub mod schedule;
pub mod store;
mod tls;
mod wake;
mod workers;

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use touchpoint_proto::{
    MAX_MESSAGE_BYTES,
    v1::{
        contact_service_server::ContactServiceServer,
        dead_letter_service_server::DeadLetterServiceServer,
        enrollment_service_server::EnrollmentServiceServer,
        event_service_server::EventServiceServer, playbook_service_server::PlaybookServiceServer,
        policy_service_server::PolicyServiceServer, run_service_server::RunServiceServer,
        worker_service_server::WorkerServiceServer,
    },
};
use tracing::info;

use crate::{
    api::{
        ContactApi, DeadLetterApi, EnrollmentApi, EventApi, PlaybookApi, PolicyApi, RunApi,
        WorkerApi,
    },
    auth::{AuthLayer, Policy, Tokens},
    engine::{Engine, EngineConfig},
    enrollment::Enroller,
    ownership::Ownership,
    playbook_cache::PlaybookCache,
    store::{RedisEndpoint, RedisTls, Store},
};

/// Flags and environment of the scheduler.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "touchpoint-scheduler", version, about)]
pub struct SchedulerArgs {
    /// Logs and metrics.
    #[command(flatten)]
    pub telemetry: touchpoint_proto::telemetry::TelemetryArgs,
    /// Redis holding all state: `redis://host:port/db`, or
    /// `redis+cluster://host:port[,host:port...]` for a Redis Cluster.
    #[arg(
        long,
        env = "TOUCHPOINT_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/0"
    )]
    pub redis_url: String,
    /// For a `rediss://` URL: PEM of the CA that signed Redis's certificate (default: the
    /// system's roots).
    #[arg(long, env = "TOUCHPOINT_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// For a `rediss://` URL to a Redis that asks for client certificates: ours (PEM);
    /// needs --redis-key.
    #[arg(long, env = "TOUCHPOINT_REDIS_CERT", requires = "redis_key")]
    pub redis_cert: Option<PathBuf>,
    /// The private key (PEM) of --redis-cert.
    #[arg(long, env = "TOUCHPOINT_REDIS_KEY", requires = "redis_cert")]
    pub redis_key: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "TOUCHPOINT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// How long a worker holds a handed-out step before it is handed out again.
    #[arg(long, env = "TOUCHPOINT_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// How often the scheduler pings each connection (workers and API clients) over
    /// HTTP/2; one that does not answer within the lesser of this and 5s is closed, so
    /// a worker whose machine died or whose network went silent stops getting steps
    /// and its steps wait for it to re-attach (as for any broken stream). 0s: off.
    #[arg(long, env = "TOUCHPOINT_KEEPALIVE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,
    /// Partitions of the deployment: fixed when it is created.
    #[arg(long, env = "TOUCHPOINT_PARTITIONS", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..=16384))]
    pub partitions: u16,
    /// Prefix of every Redis key.
    #[arg(long, env = "TOUCHPOINT_KEY_PREFIX", default_value = "tp")]
    pub key_prefix: String,
    /// How long finished runs are kept.
    #[arg(long, env = "TOUCHPOINT_RETENTION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,
    /// How often an idle partition is checked for steps scheduled by other schedulers.
    #[arg(long, env = "TOUCHPOINT_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// How long a contact's events are remembered for a `wait_for` that begins just after
    /// them (an order placed while the step before the wait was still going out).
    #[arg(long, env = "TOUCHPOINT_EVENT_LOOKBACK", default_value = "10m", value_parser = humantime::parse_duration)]
    pub event_lookback: Duration,
    /// Hand sends that end a wait within this window to workers before their due time,
    /// to go out at it: a burst due at one instant (a flash sale at 20:00) then goes out
    /// at that instant instead of over the seconds its claims take. A cancel, goal or
    /// pause up to half a second before the due time still stops such a send. 0s: off.
    #[arg(long, env = "TOUCHPOINT_HAND_OUT_AHEAD", default_value = "5s", value_parser = humantime::parse_duration)]
    pub hand_out_ahead: Duration,
    /// Most due steps claimed in one Redis call.
    #[arg(long, env = "TOUCHPOINT_CLAIM_BATCH", default_value_t = 256)]
    pub claim_batch: usize,
    /// Name of this scheduler (default: a random one).
    #[arg(long, env = "TOUCHPOINT_SCHEDULER_ID")]
    pub scheduler_id: Option<String>,
    /// How long a scheduler's membership and partition leases last unless renewed
    /// (every third of it; at least 300ms): the partitions of a scheduler that dies move
    /// to the others within about this long.
    #[arg(long, env = "TOUCHPOINT_PARTITION_LEASE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub partition_lease: Duration,
    /// The gRPC address (`host:port`, a host or IP taking the listen port, or a URL) at
    /// which workers reach this scheduler, told to every attached worker (default: the
    /// listen address; the host name and port when listening on all interfaces).
    #[arg(long, env = "TOUCHPOINT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Bearer tokens with roles (TOML, see docs/security.md). Without one, only
    /// loopback clients are accepted.
    #[arg(long, env = "TOUCHPOINT_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// Serve TLS with this certificate (PEM, with its chain); needs --tls-key.
    #[arg(long, env = "TOUCHPOINT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "TOUCHPOINT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by this CA (PEM).
    #[arg(long, env = "TOUCHPOINT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn run(
    args: SchedulerArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Security settings first: a bad one stops the start before anything else happens.
    let policy = match &args.auth_file {
        Some(path) => Policy::Tokens(Tokens::load(path).with_context(|| {
            format!(
                "cannot use the auth file {} (TOUCHPOINT_AUTH_FILE)",
                path.display()
            )
        })?),
        None => Policy::LoopbackOnly,
    };
    let server_tls = tls::ServerTls {
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        client_ca: args.tls_client_ca.clone(),
    };
    let server = server_tls
        .server(args.keepalive)
        .context("cannot set up TLS")?;
    let redis = RedisEndpoint {
        url: args.redis_url.clone(),
        tls: RedisTls::from_files(
            args.redis_ca_file.as_deref(),
            args.redis_cert.as_deref(),
            args.redis_key.as_deref(),
        )?,
    };
    let store = Store::connect(
        redis.clone(),
        &args.key_prefix,
        args.partitions,
        args.retention.as_secs().max(1),
    )
    .await
    .with_context(|| format!("cannot use Redis at {}", redact_url(&args.redis_url)))?;
    let stop = CancellationToken::new();
    let playbooks = Arc::new(PlaybookCache::default());
    let scheduler_id = args.scheduler_id.clone().unwrap_or_else(|| {
        format!(
            "scheduler-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    });
    let addr = listener.local_addr()?;
    let ownership = Arc::new(Ownership::new(
        scheduler_id.clone(),
        advertised(args.advertise.as_deref(), addr),
        args.partitions,
        args.partition_lease.max(Duration::from_millis(300)),
    ));
    ownership.join(&store).await;
    let renewing = tokio::spawn(Arc::clone(&ownership).run(store.clone(), stop.clone()));
    let engine = Engine::start(
        store.clone(),
        Arc::clone(&playbooks),
        Arc::clone(&ownership),
        EngineConfig {
            scheduler_id: scheduler_id.clone(),
            lease: args.lease,
            claim_batch: args.claim_batch,
            poll_interval: args.poll_interval,
            hand_out_ahead: args.hand_out_ahead,
        },
        stop.clone(),
    );

    tokio::spawn(list_sweeper::run(
        store.clone(),
        Arc::clone(&ownership),
        stop.clone(),
    ));
    let woken = Arc::clone(&engine);
    tokio::spawn(wake::listen(
        redis,
        store.wake_channel(),
        Arc::new(move |wake| woken.on_wake(wake)),
        stop.clone(),
    ));
    if args.telemetry.metrics_listen.is_some() {
        observe::sample_backlog(store.clone(), stop.clone());
    }
    let campaigns = campaigns::start(
        store.clone(),
        Arc::clone(&playbooks),
        scheduler_id.clone(),
        stop.clone(),
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PlaybookServiceServer<PlaybookApi>>()
        .await;
    health
        .set_serving::<EnrollmentServiceServer<EnrollmentApi>>()
        .await;
    health.set_serving::<RunServiceServer<RunApi>>().await;
    health
        .set_serving::<ContactServiceServer<ContactApi>>()
        .await;
    health.set_serving::<EventServiceServer<EventApi>>().await;
    health.set_serving::<PolicyServiceServer<PolicyApi>>().await;
    health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    health
        .set_serving::<DeadLetterServiceServer<DeadLetterApi>>()
        .await;
    let reflection = |builder: tonic_reflection::server::Builder<'static>| {
        builder
            .register_encoded_file_descriptor_set(touchpoint_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection(tonic_reflection::server::Builder::configure()).build_v1()?;
    let reflection_v1alpha =
        reflection(tonic_reflection::server::Builder::configure()).build_v1alpha()?;

    info!(%addr, scheduler = %scheduler_id, partitions = args.partitions, transport = server_tls.describe(), "touchpoint-scheduler listening");
    match &policy {
        Policy::Tokens(tokens) => info!(tokens = tokens.len(), "bearer tokens with roles required"),
        Policy::LoopbackOnly if addr.ip().is_loopback() => {
            info!("no auth file (TOUCHPOINT_AUTH_FILE): accepting only loopback clients")
        }
        Policy::LoopbackOnly => tracing::warn!(
            "no auth file (TOUCHPOINT_AUTH_FILE): accepting only loopback clients, so clients on other hosts are refused; give tokens in an auth file (docs/security.md)"
        ),
    }
    let stop_on_shutdown = stop.clone();
    let engine_on_shutdown = Arc::clone(&engine);
    let result = server
        .layer(observe::ObserveLayer)
        .layer(AuthLayer::new(policy))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            PlaybookServiceServer::new(PlaybookApi::new(
                store.clone(),
                Arc::clone(&playbooks),
                Arc::clone(&engine),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            EnrollmentServiceServer::new(EnrollmentApi::new(
                store.clone(),
                Arc::clone(&playbooks),
                Enroller::new(store.clone(), Arc::clone(&engine)),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            RunServiceServer::new(RunApi::new(store.clone(), Arc::clone(&playbooks)))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            DeadLetterServiceServer::new(DeadLetterApi::new(
                store.clone(),
                Arc::clone(&playbooks),
                Arc::clone(&engine),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            ContactServiceServer::new(ContactApi::new(store.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            EventServiceServer::new(EventApi::new(
                store.clone(),
                Arc::clone(&playbooks),
                Arc::clone(&engine),
                args.event_lookback,
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            PolicyServiceServer::new(PolicyApi::new(store.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            WorkerServiceServer::new(WorkerApi::new(Arc::clone(&engine), ownership.members()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            info!("stopping: no more steps are handed out");
            engine_on_shutdown.begin_shutdown();
            stop_on_shutdown.cancel();
        })
        .await;
    stop.cancel();
    let stopped = async {
        engine.stopped().await;
        let _ = campaigns.await;
        let _ = renewing.await;
    };
    if tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .is_err()
    {
        tracing::warn!(
            "background tasks did not stop within 5s; unfinished steps go out again when their leases expire"
        );
    }
    info!("touchpoint-scheduler stopped");
    Ok(result?)
}

/// What `main` does: binds `args.listen` and serves until SIGINT or SIGTERM.
pub async fn main_with_args(args: SchedulerArgs) -> anyhow::Result<()> {
    args.telemetry
        .serve_metrics()
        .await
        .context("cannot serve metrics (--metrics-listen, TOUCHPOINT_METRICS_LISTEN)")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (set --listen or TOUCHPOINT_LISTEN)",
                args.listen
            )
        })?;
    run(args, listener, shutdown_signal()).await
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut terminate) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return interrupt.await.unwrap_or(());
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    interrupt.await.unwrap_or(());
}

/// The address workers reach a scheduler listening on `listen` at: `advertise` (a host
/// or IP without a port takes the listen port), else the listen address, or the host
/// name and port when listening on all interfaces.
fn advertised(advertise: Option<&str>, listen: SocketAddr) -> String {
    let port = listen.port();
    match advertise.map(str::trim).filter(|a| !a.is_empty()) {
        Some(url) if url.contains("://") => url.to_owned(),
        Some(address) => match address.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port).to_string(),
            Err(_) if address.contains(':') => address.to_owned(),
            Err(_) => format!("{address}:{port}"),
        },
        None if listen.ip().is_unspecified() => {
            format!("{}:{port}", gethostname::gethostname().to_string_lossy())
        }
        None => listen.to_string(),
    }
}

/// A Redis URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://[redacted]@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_takes_the_listen_port_when_it_has_none() {
        let listen: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        assert_eq!(advertised(None, listen), "127.0.0.1:50051");
        assert_eq!(advertised(Some("10.1.2.3"), listen), "10.1.2.3:50051");
        assert_eq!(advertised(Some("fd00::7"), listen), "[fd00::7]:50051");
        assert_eq!(advertised(Some("scheduler-1"), listen), "scheduler-1:50051");
        assert_eq!(
            advertised(Some("scheduler-1:6000"), listen),
            "scheduler-1:6000"
        );
        assert_eq!(
            advertised(Some("https://s1.example:443"), listen),
            "https://s1.example:443"
        );
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        assert!(advertised(None, any).ends_with(":50051"));
        assert!(!advertised(None, any).starts_with("0.0.0.0"));
    }
}
