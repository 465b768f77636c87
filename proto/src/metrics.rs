//! Every Prometheus metric Touchpoint exports, defined here and nowhere else.
//!
//! Names follow `touchpoint_<component>_<thing>_<unit>` (counters get `_total` when
//! encoded). Labels stay bounded: playbook, step, channel, outcome, gRPC method and code,
//! Redis command; never a run, contact or worker id. The scheduler and the worker serve
//! them on `/metrics` (with `/healthz`) at `--metrics-listen` / `TOUCHPOINT_METRICS_LISTEN`.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A step of a playbook on a channel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// Playbook name.
    pub playbook: String,
    /// Step id.
    pub step: String,
    /// Channel name.
    pub channel: String,
}

/// A step's outcome: delivered, failed, retried, skipped, dead_lettered.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// Playbook name.
    pub playbook: String,
    /// Step id.
    pub step: String,
    /// Channel name.
    pub channel: String,
    /// What became of the attempt.
    pub outcome: &'static str,
}

/// A channel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    /// Channel name.
    pub channel: String,
}

/// A delivery's outcome at the worker: ok, retryable, permanent, skipped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// Channel name.
    pub channel: String,
    /// The adapter's answer.
    pub outcome: &'static str,
}

/// A Redis script or command.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// The script (claim, complete, enroll, ...) or command.
    pub command: &'static str,
}

/// A gRPC method and its status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    /// `/package.Service/Method`.
    pub method: String,
    /// The gRPC status code name, e.g. `OK`, `UNAVAILABLE`.
    pub code: &'static str,
}

type Seconds = Family<ChannelLabels, Histogram, fn() -> Histogram>;

fn latency_buckets() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The scheduler's metrics.
#[derive(Debug)]
pub struct SchedulerMetrics {
    /// Steps that came due and were claimed.
    pub steps_claimed: Counter,
    /// Steps handed to a worker.
    pub steps_dispatched: Family<StepLabels, Counter>,
    /// What became of each attempt.
    pub step_outcomes: Family<OutcomeLabels, Counter>,
    /// Due → handed out.
    pub timer_lag: Seconds,
    /// Steps due now and not yet handed out (sampled).
    pub due_backlog: Gauge,
    /// Steps handed out and not yet reported.
    pub leases_in_flight: Gauge,
    /// Leases that ran out and went back to due.
    pub leases_expired: Counter,
    /// Sends handed to a worker before their due time (`--hand-out-ahead`).
    pub handed_out_ahead: Counter,
    /// Sends handed out ahead and revoked before their due time (run moved on, paused).
    pub ahead_revoked: Counter,
    /// Worker results refused because their lease had expired or been superseded.
    pub stale_results: Counter,
    /// Connected workers serving each channel.
    pub workers_connected: Family<ChannelLabels, Gauge>,
    /// Steps held back by a channel's rate limit.
    pub rate_limit_waits: Family<ChannelLabels, Counter>,
    /// Runs in the dead-letter list (sampled).
    pub dead_letters: Gauge,
    /// Latency of each Redis script or command.
    pub redis_command_duration: Family<CommandLabels, Histogram, fn() -> Histogram>,
    /// Redis calls that failed.
    pub redis_errors: Family<CommandLabels, Counter>,
    /// gRPC calls by method and status code.
    pub grpc_requests: Family<GrpcLabels, Counter>,
}

/// The worker's metrics.
#[derive(Debug)]
pub struct WorkerMetrics {
    /// Deliveries by channel and outcome.
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// How long a delivery took (the adapter's call).
    pub delivery_duration: Seconds,
    /// Deliveries running now.
    pub deliveries_in_flight: Gauge,
    /// Deliveries a provider answered with "slow down".
    pub rate_limited: Family<ChannelLabels, Counter>,
    /// Schedulers the worker holds a stream to (0: none).
    pub scheduler_connected: Gauge,
    /// Tasks handed out ahead waiting for their due time (at most `hold_ahead`).
    pub held_ahead: Gauge,
}

/// Both components' metrics and the registry they are encoded from.
#[derive(Debug)]
pub struct Metrics {
    /// The scheduler's.
    pub scheduler: SchedulerMetrics,
    /// The worker's.
    pub worker: WorkerMetrics,
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let scheduler = SchedulerMetrics {
            steps_claimed: Counter::default(),
            steps_dispatched: Family::default(),
            step_outcomes: Family::default(),
            timer_lag: Family::new_with_constructor(latency_buckets),
            due_backlog: Gauge::default(),
            leases_in_flight: Gauge::default(),
            leases_expired: Counter::default(),
            handed_out_ahead: Counter::default(),
            ahead_revoked: Counter::default(),
            stale_results: Counter::default(),
            workers_connected: Family::default(),
            rate_limit_waits: Family::default(),
            dead_letters: Gauge::default(),
            redis_command_duration: Family::new_with_constructor(latency_buckets),
            redis_errors: Family::default(),
            grpc_requests: Family::default(),
        };
        let worker = WorkerMetrics {
            deliveries: Family::default(),
            delivery_duration: Family::new_with_constructor(latency_buckets),
            deliveries_in_flight: Gauge::default(),
            rate_limited: Family::default(),
            scheduler_connected: Gauge::default(),
            held_ahead: Gauge::default(),
        };
        let s = &scheduler;
        let r = &mut registry;
        r.register(
            "touchpoint_scheduler_steps_claimed",
            "Steps that came due and were claimed",
            s.steps_claimed.clone(),
        );
        r.register(
            "touchpoint_scheduler_steps_dispatched",
            "Steps handed to a worker",
            s.steps_dispatched.clone(),
        );
        r.register(
            "touchpoint_scheduler_step_outcomes",
            "Step attempts by outcome: delivered, failed, retried, skipped, dead_lettered",
            s.step_outcomes.clone(),
        );
        r.register(
            "touchpoint_scheduler_timer_lag_seconds",
            "From a step's due time to its hand-out",
            s.timer_lag.clone(),
        );
        r.register(
            "touchpoint_scheduler_due_backlog",
            "Steps due now and not yet handed out",
            s.due_backlog.clone(),
        );
        r.register(
            "touchpoint_scheduler_leases_in_flight",
            "Steps handed out and not yet reported",
            s.leases_in_flight.clone(),
        );
        r.register(
            "touchpoint_scheduler_leases_expired",
            "Leases that ran out and went back to due",
            s.leases_expired.clone(),
        );
        r.register(
            "touchpoint_scheduler_handed_out_ahead",
            "Sends handed to a worker before their due time",
            s.handed_out_ahead.clone(),
        );
        r.register(
            "touchpoint_scheduler_ahead_revoked",
            "Sends handed out ahead and revoked before their due time",
            s.ahead_revoked.clone(),
        );
        r.register(
            "touchpoint_scheduler_stale_results",
            "Worker results refused because their lease had expired or been superseded",
            s.stale_results.clone(),
        );
        r.register(
            "touchpoint_scheduler_workers_connected",
            "Connected workers serving each channel",
            s.workers_connected.clone(),
        );
        r.register(
            "touchpoint_scheduler_rate_limit_waits",
            "Steps held back by a channel's rate limit",
            s.rate_limit_waits.clone(),
        );
        r.register(
            "touchpoint_scheduler_dead_letters",
            "Runs in the dead-letter list",
            s.dead_letters.clone(),
        );
        r.register(
            "touchpoint_scheduler_redis_command_duration_seconds",
            "Latency of Redis scripts and commands",
            s.redis_command_duration.clone(),
        );
        r.register(
            "touchpoint_scheduler_redis_errors",
            "Redis calls that failed",
            s.redis_errors.clone(),
        );
        r.register(
            "touchpoint_scheduler_grpc_requests",
            "gRPC calls by method and status code",
            s.grpc_requests.clone(),
        );
        let w = &worker;
        r.register(
            "touchpoint_worker_deliveries",
            "Deliveries by channel and outcome",
            w.deliveries.clone(),
        );
        r.register(
            "touchpoint_worker_delivery_duration_seconds",
            "How long a delivery took",
            w.delivery_duration.clone(),
        );
        r.register(
            "touchpoint_worker_deliveries_in_flight",
            "Deliveries running now",
            w.deliveries_in_flight.clone(),
        );
        r.register(
            "touchpoint_worker_rate_limited",
            "Deliveries a provider answered with slow down",
            w.rate_limited.clone(),
        );
        r.register(
            "touchpoint_worker_scheduler_connected",
            "Schedulers the worker holds a stream to (0: none)",
            w.scheduler_connected.clone(),
        );
        r.register(
            "touchpoint_worker_held_ahead",
            "Tasks handed out ahead waiting for their due time",
            w.held_ahead.clone(),
        );
        Self {
            scheduler,
            worker,
            registry,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Observes `elapsed` in seconds.
pub fn observe(histogram: &Histogram, elapsed: Duration) {
    histogram.observe(elapsed.as_secs_f64());
}

/// Serves `GET /metrics` (Prometheus text) and `GET /healthz` on `addr` until the
/// process ends. Binding fails loudly: a port in use is a configuration error.
pub async fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics().encode(),
                )
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::warn!(error = %err, "the metrics endpoint stopped");
        }
    });
    tracing::info!(addr = %bound, "serving /metrics and /healthz");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_follows_the_convention() {
        let m = metrics();
        m.scheduler.steps_claimed.inc();
        m.worker
            .deliveries
            .get_or_create(&DeliveryLabels {
                channel: "sms".to_owned(),
                outcome: "ok",
            })
            .inc();
        let text = m.encode();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap_or_default();
            assert!(
                name.starts_with("touchpoint_scheduler_") || name.starts_with("touchpoint_worker_"),
                "{name}"
            );
        }
        assert!(
            text.contains("touchpoint_scheduler_steps_claimed_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"touchpoint_worker_deliveries_total{channel="sms",outcome="ok"} 1"#),
            "{text}"
        );
    }
}
