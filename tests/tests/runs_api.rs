//! The run and health surface of a live scheduler: cancel, NOT_FOUND, a channel no
//! worker serves, and the gRPC health and reflection services grpcurl relies on.

use std::time::Duration;

use tonic::Code;
use touchpoint_proto::v1::{CancelRunRequest, GetRunRequest, RunStatus, StepStatus};
use touchpoint_tests::{Stack, contact, request_id, run_summary, stays};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

const GREET_WAIT_FOLLOW_UP: &str = r#"name: cancel-me
steps:
  - id: greet
    action: send_message
    channel: wecom
  - id: pause
    wait: 2s
  - id: follow-up
    action: send_message
    channel: wecom
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_sends_nothing_more() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    stack.apply(GREET_WAIT_FOLLOW_UP).await;
    let run_id = stack
        .enroll("cancel-me", contact("c-5001", &[], &[]), &request_id())
        .await
        .run_id;
    stack.receiver.wait_for(1, TIMEOUT).await;
    let run = stack
        .client
        .wait_for_run(&run_id, TIMEOUT, "the pause", |r| r.current_step == "pause")
        .await;
    assert_eq!(
        run.steps[1].status(),
        StepStatus::Scheduled,
        "{}",
        run_summary(&run)
    );

    let cancelled = stack
        .client
        .runs
        .cancel_run(CancelRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        cancelled.status(),
        RunStatus::Cancelled,
        "{}",
        run_summary(&cancelled)
    );
    assert_eq!(cancelled.steps[1].status(), StepStatus::Cancelled);
    assert_eq!(cancelled.steps[2].status(), StepStatus::Pending);

    let receiver = &stack.receiver;
    assert!(
        stays(Duration::from_secs(3), || async {
            receiver.requests().len() == 1
        })
        .await,
        "a cancelled run delivered its follow-up"
    );
    let again = stack
        .client
        .runs
        .cancel_run(CancelRunRequest { run_id })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_runs_and_playbooks_are_not_found() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    for run_id in ["nonsense", "01a2091ea1b2c3d4e5f60718293a4b5c-3"] {
        let err = stack
            .client
            .runs
            .get_run(GetRunRequest {
                run_id: run_id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{run_id}: {err:?}");
    }
    let err = stack
        .client
        .enrollments
        .enroll(touchpoint_proto::v1::EnrollRequest {
            playbook: "missing".into(),
            contact: Some(contact("c-1", &[], &[])),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = stack
        .client
        .enrollments
        .enroll(touchpoint_proto::v1::EnrollRequest {
            playbook: "missing".into(),
            contact: Some(contact("", &[], &[])),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("contact.id: required"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_waits_for_a_worker_that_serves_its_channel() {
    // The worker serves wecom only; the step is for sms.
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    stack
        .apply("name: sms-only\nsteps:\n  - {id: text, action: send_message, channel: sms}\n")
        .await;
    let run_id = stack
        .enroll("sms-only", contact("c-5002", &[], &[]), &request_id())
        .await
        .run_id;
    let run = stack
        .client
        .wait_for_run(&run_id, TIMEOUT, "a hold for sms", |r| {
            r.steps[0].detail.contains("channel \"sms\"")
        })
        .await;
    assert_eq!(run.status(), RunStatus::Active, "{}", run_summary(&run));
    assert_eq!(
        run.steps[0].attempts, 0,
        "waiting for a worker is not an attempt"
    );
    assert!(stack.receiver.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer_like_grpcurl_expects() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };

    let stack = Stack::start(NODE, &[], &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(stack.scheduler.endpoint())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in [
        "",
        "touchpoint.v1.PlaybookService",
        "touchpoint.v1.WorkerService",
        "touchpoint.v1.DeadLetterService",
    ] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "{service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "touchpoint.v1.PlaybookService",
        "touchpoint.v1.EnrollmentService",
        "touchpoint.v1.RunService",
        "touchpoint.v1.WorkerService",
        "touchpoint.v1.DeadLetterService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_fails_to_render_fails_the_run_and_sends_nothing() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    let yaml = r#"name: broken-render
steps:
  - id: notify
    action: send_message
    channel: wecom
    template: "{{ params.n // 0 }}"
    params: { n: 1 }
"#;
    stack.apply(yaml).await;
    let run_id = stack
        .enroll("broken-render", contact("c-5003", &[], &[]), &request_id())
        .await
        .run_id;
    let run = stack
        .client
        .wait_for_status(&run_id, RunStatus::Failed, TIMEOUT)
        .await;
    assert_eq!(
        run.steps[0].status(),
        StepStatus::Failed,
        "{}",
        run_summary(&run)
    );
    assert!(
        run.steps[0].detail.starts_with("template:"),
        "{}",
        run_summary(&run)
    );
    assert!(stack.receiver.requests().is_empty());
}

/// How many entries the `brief` playbook's run lists hold, over 4 partitions.
async fn brief_list_entries(stack: &Stack) -> u64 {
    let mut conn = stack.redis.connection().await;
    let mut total = 0;
    for partition in 0..4 {
        let entries: u64 = redis::cmd("XLEN")
            .arg(format!("tp:{{p{partition}}}:runlog:brief"))
            .query_async(&mut conn)
            .await
            .expect("XLEN");
        total += entries;
    }
    total
}

/// A finished run's hash expires after `--retention`; its entry in the playbook's run
/// list goes too, swept by the partition's owner without anyone listing the runs, so
/// the lists do not grow without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_list_entries_of_expired_runs_are_swept() {
    let mut stack = Stack::start(NODE, &["--partitions", "4", "--retention", "1s"], &[]).await;
    stack
        .apply("name: brief\nsteps:\n  - id: pause\n    wait: 2s\n")
        .await;
    let mut runs = Vec::new();
    for n in 0..6 {
        let run = stack
            .enroll(
                "brief",
                contact(&format!("c-brief-{n}"), &[], &[]),
                &request_id(),
            )
            .await;
        runs.push(run.run_id);
    }
    assert_eq!(
        brief_list_entries(&stack).await,
        6,
        "every run listed while it exists"
    );
    for run_id in &runs {
        stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
    }
    let swept =
        touchpoint_tests::eventually(TIMEOUT, || async { brief_list_entries(&stack).await == 0 })
            .await;
    assert!(swept, "run-list entries of expired runs should be swept");
}
