//! External channel adapters (`kind = "grpc"`): a worker process drives a real adapter
//! written in Python (grpcio, `tests/adapters/python/adapter.py`, stubs generated with
//! grpc_tools.protoc at test time) through `touchpoint.adapter.v1.ChannelAdapter`.

use std::time::Duration;

use touchpoint_proto::v1::{Contact, Run, RunStatus, StepRecord};
use touchpoint_tests::{
    ChannelConfig, PythonAdapter, Stack, WorkerConfig, WorkerNode, free_port, request_id,
    run_summary, to_map,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(60);

const PLAYBOOKS: [&str; 3] = [
    r#"
name: ext-journey
steps:
  - id: hello
    action: send_message
    channel: ext
    template: "你好 {{ contact.attrs.name }}"
    params: { coupon: WELCOME10 }
  - id: flaky
    action: flaky
    channel: ext
"#,
    "name: ext-refused\nsteps:\n  - {id: refused, action: refuse, channel: ext}\n",
    "name: ext-unsupported\nsteps:\n  - {id: fax, action: fax, channel: ext}\n",
];

fn customer(id: &str) -> Contact {
    Contact {
        id: id.to_owned(),
        attrs: to_map(&[("name", "王芳")]),
        tags: Vec::new(),
        tz: String::new(),
        identities: to_map(&[("phone", "+8613800001234")]),
    }
}

fn step<'a>(run: &'a Run, id: &str) -> &'a StepRecord {
    run.steps
        .iter()
        .find(|s| s.step_id == id)
        .unwrap_or_else(|| panic!("no step {id}: {}", run_summary(run)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_drives_a_python_adapter_end_to_end() {
    // Make the venv first (a minute the first time), so the adapter starts at once later.
    touchpoint_tests::python::python();
    let mut stack = Stack::start(NODE, &[], &[]).await;
    // The worker starts before the adapter: it only warns, and its deliveries are retried.
    let port = free_port();
    let config = WorkerConfig::new().channel(ChannelConfig::raw(
        "ext",
        "grpc",
        &format!(
            "endpoint = \"http://127.0.0.1:{port}\"\ntimeout = \"5s\"\n\
             retry = {{ max_attempts = 40, initial = \"200ms\", max = \"500ms\" }}"
        ),
    ));
    let mut worker = WorkerNode::start(NODE, &stack.scheduler.endpoint(), "w-ext", &config, &[]);
    for playbook in PLAYBOOKS {
        stack.apply(playbook).await;
    }

    let early = stack
        .enroll("ext-journey", customer("c-1"), &request_id())
        .await
        .run_id;
    let waiting = stack
        .client
        .wait_for_run(
            &early,
            TIMEOUT,
            "a retry while the adapter is down",
            |run| {
                run.steps
                    .iter()
                    .any(|s| s.step_id == "hello" && s.detail.contains("adapter unreachable"))
            },
        )
        .await;
    assert_ne!(
        waiting.status,
        RunStatus::Failed as i32,
        "{}",
        run_summary(&waiting)
    );

    let adapter = PythonAdapter::start_on(port);
    let run = stack
        .client
        .wait_for_status(&early, RunStatus::Completed, TIMEOUT)
        .await;
    let hello = step(&run, "hello");
    assert!(hello.attempts >= 2, "{}", run_summary(&run));
    assert_eq!(
        hello.detail,
        format!("sent by py-test-adapter (attempt {})", hello.attempts),
        "{}",
        run_summary(&run)
    );
    // A RETRYABLE answer was retried (after the adapter's retry_after_ms) and then delivered.
    let flaky = step(&run, "flaky");
    assert_eq!(flaky.attempts, 2, "{}", run_summary(&run));
    assert_eq!(flaky.detail, "sent by py-test-adapter (attempt 2)");

    let deliveries = adapter.deliveries();
    let of = |step_id: &str| -> Vec<&serde_json::Value> {
        deliveries
            .iter()
            .filter(|d| d["run_id"] == early.as_str() && d["step_id"] == step_id)
            .collect()
    };
    let hello_calls = of("hello");
    assert_eq!(hello_calls.len(), 1, "{deliveries:#?}");
    let call = hello_calls[0];
    assert_eq!(call["idempotency_key"], format!("{early}.hello"));
    assert_eq!(call["action"], "send_message");
    assert_eq!(call["channel"], "ext");
    assert_eq!(call["playbook"], "ext-journey");
    assert_eq!(call["message"], "你好 王芳");
    assert_eq!(call["params"]["coupon"], "WELCOME10");
    assert_eq!(call["contact_id"], "c-1");
    assert_eq!(call["identities"]["phone"], "+8613800001234");
    assert!(call["deadline_ms"].as_i64().unwrap_or(0) > 0, "{call}");
    // The gRPC deadline is bounded by the channel's 5 s timeout.
    let remaining = call["time_remaining"].as_f64().unwrap_or(f64::MAX);
    assert!(remaining > 0.0 && remaining <= 5.0, "{call}");
    let traceparent = call["traceparent"].as_str().unwrap_or_default();
    assert_eq!(call["traceparent_metadata"], traceparent, "{call}");

    let flaky_calls = of("flaky");
    assert_eq!(flaky_calls.len(), 2, "{deliveries:#?}");
    for (n, call) in flaky_calls.iter().enumerate() {
        assert_eq!(call["attempt"], n + 1);
        assert_eq!(call["idempotency_key"], format!("{early}.flaky"));
    }

    // A PERMANENT answer fails the run with the adapter's detail.
    let refused = stack
        .enroll("ext-refused", customer("c-2"), &request_id())
        .await
        .run_id;
    let run = stack
        .client
        .wait_for_status(&refused, RunStatus::Failed, TIMEOUT)
        .await;
    let step_record = step(&run, "refused");
    assert_eq!(step_record.attempts, 1, "{}", run_summary(&run));
    assert!(
        step_record
            .detail
            .contains("recipient refused by the python adapter"),
        "{}",
        run_summary(&run)
    );

    // An action the adapter does not list fails without being sent.
    let unsupported = stack
        .enroll("ext-unsupported", customer("c-3"), &request_id())
        .await
        .run_id;
    let run = stack
        .client
        .wait_for_status(&unsupported, RunStatus::Failed, TIMEOUT)
        .await;
    assert!(
        step(&run, "fax")
            .detail
            .contains("action \"fax\" not supported by adapter \"py-test-adapter\""),
        "{}",
        run_summary(&run)
    );
    assert!(
        !adapter
            .deliveries()
            .iter()
            .any(|d| d["run_id"] == unsupported.as_str()),
        "the adapter got a step it does not support"
    );
    // Phone numbers never reach the worker's log.
    let log = worker.process().log();
    assert!(!log.contains("13800001234"), "a phone number leaked: {log}");
}
