//! What the receiver answers decides the step: 5xx and 429 retry (honouring `Retry-After`),
//! other 4xx fail the step and the run at once, and retries run out.

use std::time::Duration;

use touchpoint_proto::v1::{ApplyStatus, RunStatus, StepStatus};
use touchpoint_tests::{Reply, Stack, contact, request_id, run_summary, stays, verify_signature};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

/// A playbook `name` with the given steps.
fn playbook(name: &str, steps: &str) -> String {
    format!("name: {name}\nsteps:\n{steps}")
}

/// Applies `yaml`, enrolls one contact in it and returns the run id.
async fn enroll_one(stack: &mut Stack, yaml: &str, name: &str) -> String {
    let applied = stack.apply(yaml).await;
    assert_eq!(applied.status(), ApplyStatus::Created, "{applied:?}");
    stack
        .enroll(
            name,
            contact("c-3001", &[("name", "李雷")], &[]),
            &request_id(),
        )
        .await
        .run_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_503s_then_200_is_delivered_on_the_third_attempt() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    stack.receiver.respond_with(&[503, 503]);
    let yaml = playbook(
        "retry-503",
        r#"  - id: notify
    action: send_message
    channel: wecom
    template: "hi {{ contact.attrs.name }}"
    retry: { max_attempts: 5, initial: 200ms, max: 1s }
"#,
    );
    let run_id = enroll_one(&mut stack, &yaml, "retry-503").await;

    let done = stack
        .client
        .wait_for_status(&run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    let seen: Vec<(&str, u64, u16)> = requests
        .iter()
        .map(|r| (r.step(), r.attempt(), r.status))
        .collect();
    assert_eq!(
        seen,
        [("notify", 1, 503), ("notify", 2, 503), ("notify", 3, 200)],
        "{summary}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.webhook_id() == requests[0].webhook_id() && !r.webhook_id().is_empty()),
        "every attempt carries the same webhook-id:\n{summary}"
    );
    assert!(requests.iter().all(|r| verify_signature(r, &stack.secret)));
    let timeline = run_summary(&done);
    let step = &done.steps[0];
    assert_eq!(step.status(), StepStatus::Done, "{timeline}");
    assert_eq!(step.attempts, 3, "{timeline}");
    assert_eq!(step.worker, "w-1", "{timeline}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_fails_the_run_at_that_step_and_sends_nothing_after_it() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    // `first` gets 200, `second` gets 400 (and has retries to spare: a 400 must not use them).
    stack.receiver.respond_with(&[200, 400]);
    let yaml = playbook(
        "permanent-failure",
        r#"  - id: first
    action: send_message
    channel: wecom
    template: "one"
  - id: second
    action: send_message
    channel: wecom
    template: "two"
    retry: { max_attempts: 5, initial: 200ms, max: 1s }
  - id: pause
    wait: 1s
  - id: third
    action: send_message
    channel: wecom
    template: "three"
"#,
    );
    let run_id = enroll_one(&mut stack, &yaml, "permanent-failure").await;

    let failed = stack
        .client
        .wait_for_status(&run_id, RunStatus::Failed, TIMEOUT)
        .await;
    let timeline = run_summary(&failed);
    let statuses: Vec<(&str, StepStatus)> = failed
        .steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.status()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("first", StepStatus::Done),
            ("second", StepStatus::Failed),
            ("pause", StepStatus::Pending),
            ("third", StepStatus::Pending),
        ],
        "{timeline}"
    );
    let second = &failed.steps[1];
    assert!(
        second.detail.starts_with("HTTP 400"),
        "the timeline should show the receiver's status:\n{timeline}"
    );
    assert_eq!(second.attempts, 1, "a 400 is not retried:\n{timeline}");

    // Nothing more goes out for a failed run (give a wrongly scheduled step time to show up).
    let delivered_only_two = stays(Duration::from_secs(2), || async {
        stack.receiver.count() == 2
    })
    .await;
    let summary = stack.receiver.summary();
    assert!(delivered_only_two, "a failed run kept sending:\n{summary}");
    let requests = stack.receiver.requests();
    let seen: Vec<(&str, u16)> = requests.iter().map(|r| (r.step(), r.status)).collect();
    assert_eq!(seen, [("first", 200), ("second", 400)], "{summary}");
    let still = stack.client.run(&run_id).await;
    assert_eq!(still.status(), RunStatus::Failed, "{}", run_summary(&still));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    stack.receiver.script([Reply::status(429).retry_after(2)]);
    let yaml = playbook(
        "retry-after",
        r#"  - id: notify
    action: send_message
    channel: wecom
    retry: { max_attempts: 5, initial: 200ms, max: 5s }
"#,
    );
    let run_id = enroll_one(&mut stack, &yaml, "retry-after").await;
    let done = stack
        .client
        .wait_for_status(&run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    assert_eq!(requests.len(), 2, "{summary}\n{}", run_summary(&done));
    let gap = requests[1]
        .received_at
        .duration_since(requests[0].received_at);
    assert!(
        gap >= Duration::from_millis(1900),
        "the retry came {gap:?} after a 429 with Retry-After: 2 (backoff alone is ~200ms):\n{summary}"
    );
    assert_eq!(requests[1].attempt(), 2, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_fail_the_run() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    stack.receiver.respond_with(&[503; 10]);
    let yaml = playbook(
        "retries-exhausted",
        r#"  - id: notify
    action: send_message
    channel: wecom
    retry: { max_attempts: 3, initial: 100ms, max: 200ms }
  - id: never
    action: send_message
    channel: wecom
"#,
    );
    let run_id = enroll_one(&mut stack, &yaml, "retries-exhausted").await;
    let failed = stack
        .client
        .wait_for_status(&run_id, RunStatus::Failed, TIMEOUT)
        .await;
    let timeline = run_summary(&failed);
    let notify = &failed.steps[0];
    assert_eq!(notify.status(), StepStatus::Failed, "{timeline}");
    assert_eq!(notify.attempts, 3, "{timeline}");
    assert!(
        notify.detail.contains("HTTP 503"),
        "the timeline should show the receiver's last status:\n{timeline}"
    );
    assert_eq!(failed.steps[1].status(), StepStatus::Pending, "{timeline}");
    let only_three = stays(Duration::from_secs(1), || async {
        stack.receiver.count() == 3
    })
    .await;
    let summary = stack.receiver.summary();
    assert!(
        only_three,
        "max_attempts: 3 allows three deliveries:\n{summary}"
    );
    let attempts: Vec<u64> = stack
        .receiver
        .requests()
        .iter()
        .map(|r| r.attempt())
        .collect();
    assert_eq!(attempts, [1, 2, 3], "{summary}");
}
