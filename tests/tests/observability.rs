//! What on-call engineers see: one trace per run across the scheduler, the worker and the
//! receiver (exported over OTLP, gRPC from one process and http/protobuf from the other),
//! Prometheus counters that move as a run does, and JSON logs that carry the trace.

use std::time::Duration;

use touchpoint_proto::v1::{EnrollRequest, RunStatus};
use touchpoint_tests::{
    ChannelConfig, OtlpReceiver, RedisServer, SchedulerNode, WebhookReceiver, WorkerConfig,
    WorkerNode, contact, eventually, free_port, request_id,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);
const SECRET_ENV: &str = "OBS_WEBHOOK_SECRET";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The caller's trace: the run continues it.
const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

const PLAYBOOK: &str = "name: observed\nsteps:\n  \
    - {id: greet, action: send_message, channel: crm, template: \"你好 {{ contact.attrs.name }}\"}\n  \
    - {id: pause, wait: 1s}\n  \
    - {id: follow-up, action: send_message, channel: crm}\n";

async fn scrape(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    http_get(&url).await.unwrap_or_default()
}

/// A plain HTTP GET over a TCP stream (the harness has no HTTP client dependency).
async fn http_get(url: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut stream = tokio::net::TcpStream::connect(host).await.ok()?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The value of the first sample line starting with `prefix` (name and labels).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_ties_the_enroll_call_each_dispatch_the_delivery_and_the_receiver() {
    let otlp = OtlpReceiver::start().await;
    let redis = RedisServer::start();
    let receiver = WebhookReceiver::start().await;
    let (scheduler_metrics, worker_metrics) = (free_port(), free_port());
    let scheduler_metrics_addr = format!("127.0.0.1:{scheduler_metrics}");
    let grpc = otlp.grpc_endpoint();
    let mut scheduler = SchedulerNode::start_with_env(
        NODE,
        &redis.url(),
        &["--metrics-listen", &scheduler_metrics_addr],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", grpc.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    );
    let mut client = scheduler.client().await;
    let http = otlp.http_endpoint();
    let worker_metrics_addr = format!("127.0.0.1:{worker_metrics}");
    let mut worker = WorkerNode::start(
        NODE,
        &scheduler.endpoint(),
        "w-obs",
        &WorkerConfig::new().channel(ChannelConfig::webhook("crm", &receiver.url(), SECRET_ENV)),
        &[
            (SECRET_ENV, SECRET),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", http.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("TOUCHPOINT_METRICS_LISTEN", worker_metrics_addr.as_str()),
            ("TOUCHPOINT_LOG_FORMAT", "json"),
            ("RUST_LOG", "info,touchpoint_worker=debug"),
        ],
    );
    client
        .playbooks
        .apply_playbook(touchpoint_proto::v1::ApplyPlaybookRequest {
            yaml: PLAYBOOK.to_owned(),
            ..Default::default()
        })
        .await
        .expect("apply");
    let before = scrape(scheduler_metrics).await;
    assert!(
        before.contains("# TYPE touchpoint_scheduler_leases_expired counter"),
        "{before}"
    );

    let mut request = tonic::Request::new(EnrollRequest {
        playbook: "observed".to_owned(),
        contact: Some(contact("c-obs-1", &[("name", "王芳")], &[])),
        request_id: request_id(),
    });
    request
        .metadata_mut()
        .insert("traceparent", CALLER.parse().expect("traceparent"));
    let run_id = client
        .enrollments
        .enroll(request)
        .await
        .expect("enroll")
        .into_inner()
        .run_id;
    let run = client
        .wait_for_status(&run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(run.trace_id, TRACE, "tp run get prints this id");

    // The receiver continued the run's trace.
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        let traceparent = request.header("traceparent").expect("traceparent header");
        assert!(
            traceparent.starts_with(&format!("00-{TRACE}-")),
            "{traceparent}"
        );
    }

    // Every span of the run, from both processes, in one trace.
    assert!(
        eventually(TIMEOUT, || {
            let spans = otlp.spans();
            async move {
                let names: Vec<&str> = spans
                    .iter()
                    .filter(|s| s.trace_id == TRACE)
                    .map(|s| s.name.as_str())
                    .collect();
                names.iter().filter(|n| n.starts_with("send ")).count() >= 2
                    && names.iter().filter(|n| n.starts_with("process ")).count() >= 2
                    && names.iter().filter(|n| **n == "POST").count() >= 2
                    && names.iter().any(|n| n.starts_with("enroll "))
                    && names.contains(&"touchpoint.v1.EnrollmentService/Enroll")
            }
        })
        .await,
        "spans received: {:#?}",
        otlp.spans()
    );
    let spans: Vec<_> = otlp
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == TRACE)
        .collect();
    let by_id = |id: &str| spans.iter().find(|s| s.span_id == id);
    let call = spans
        .iter()
        .find(|s| s.name == "touchpoint.v1.EnrollmentService/Enroll")
        .expect("the call's span");
    assert_eq!(call.service, "touchpoint-scheduler");
    assert_eq!(
        call.parent_span_id, "00f067aa0ba902b7",
        "continues the caller"
    );
    assert_eq!(call.kind, 2, "server");
    assert_eq!(call.attr("rpc.system"), Some("grpc"));
    assert_eq!(call.attr("rpc.method"), Some("Enroll"));
    let enroll = spans
        .iter()
        .find(|s| s.name == "enroll observed")
        .expect("the run's root span");
    assert_eq!(enroll.parent_span_id, call.span_id);
    assert_eq!(enroll.attr("touchpoint.run_id"), Some(run_id.as_str()));
    for dispatch in spans.iter().filter(|s| s.name == "send crm") {
        assert_eq!(dispatch.service, "touchpoint-scheduler");
        assert_eq!(dispatch.kind, 4, "producer");
        assert_eq!(
            dispatch.parent_span_id, enroll.span_id,
            "each step under the run"
        );
        assert_eq!(dispatch.attr("touchpoint.playbook"), Some("observed"));
        assert_eq!(dispatch.attr("touchpoint.channel"), Some("crm"));
        assert_eq!(dispatch.attr("touchpoint.attempt"), Some("1"));
        assert_eq!(dispatch.attr("touchpoint.outcome"), Some("delivered"));
        assert_eq!(dispatch.attr("messaging.destination.name"), Some("crm"));
        assert!(dispatch.attr("touchpoint.step").is_some());
    }
    for delivery in spans.iter().filter(|s| s.name == "process crm") {
        assert_eq!(
            delivery.service, "touchpoint-worker",
            "exported over http/protobuf"
        );
        assert_eq!(delivery.kind, 5, "consumer");
        let parent = by_id(&delivery.parent_span_id).expect("its dispatch");
        assert_eq!(parent.name, "send crm");
        assert_eq!(delivery.attr("touchpoint.outcome"), Some("ok"));
    }
    for post in spans.iter().filter(|s| s.name == "POST") {
        assert_eq!(post.kind, 3, "client");
        assert_eq!(
            by_id(&post.parent_span_id).map(|p| p.name.as_str()),
            Some("process crm")
        );
        assert_eq!(post.attr("http.response.status_code"), Some("200"));
        // The receiver got this span as its parent.
        assert!(
            requests.iter().any(|r| r
                .header("traceparent")
                .is_some_and(|t| t.contains(&post.span_id))),
            "no request carried {}",
            post.span_id
        );
    }
    // No contact data in any span.
    for span in &otlp.spans() {
        for value in span.attributes.values() {
            assert!(
                !value.contains("王芳") && !value.contains("你好"),
                "{span:?}"
            );
        }
    }

    // The counters moved with the run.
    let after = scrape(scheduler_metrics).await;
    let dispatched = r#"touchpoint_scheduler_steps_dispatched_total{playbook="observed""#;
    assert_eq!(sample(&after, dispatched), 2.0, "{after}");
    assert_eq!(
        sample(
            &after,
            r#"touchpoint_scheduler_step_outcomes_total{playbook="observed",step="greet",channel="crm",outcome="delivered"}"#
        ),
        1.0,
        "{after}"
    );
    assert!(sample(&after, "touchpoint_scheduler_timer_lag_seconds_count") >= 2.0);
    assert!(
        sample(
            &after,
            r#"touchpoint_scheduler_grpc_requests_total{method="touchpoint.v1.EnrollmentService/Enroll",code="OK"}"#
        ) >= 1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            r#"touchpoint_scheduler_redis_command_duration_seconds_count{command="claim"}"#
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &after,
            r#"touchpoint_scheduler_workers_connected{channel="crm"}"#
        ),
        1.0
    );
    let worker_text = scrape(worker_metrics).await;
    assert_eq!(
        sample(
            &worker_text,
            r#"touchpoint_worker_deliveries_total{channel="crm",outcome="ok"}"#
        ),
        2.0,
        "{worker_text}"
    );
    assert_eq!(
        sample(&worker_text, "touchpoint_worker_scheduler_connected"),
        1.0
    );
    let health = http_get(&format!("http://127.0.0.1:{worker_metrics}/healthz")).await;
    assert_eq!(health.as_deref(), Some("ok\n"));

    // JSON logs inside the delivery carry the run's trace id.
    let log = worker.process().log();
    let delivered: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["span"] == "http" || l["span"] == "deliver")
        .collect();
    let all_json: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect();
    assert!(!all_json.is_empty(), "no JSON log lines:\n{log}");
    assert!(
        !delivered.is_empty(),
        "no log line inside a delivery:\n{log}"
    );
    for line in &delivered {
        assert_eq!(line["trace_id"], TRACE, "{line}");
        assert!(
            line["span_id"].as_str().is_some_and(|s| s.len() == 16),
            "{line}"
        );
    }
    drop(worker);
}
