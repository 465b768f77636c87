//! The channel seam against a real scheduler process: a worker's TaskProgress shows in
//! the run and its state comes back to the step's next attempt as `resume_state`, only
//! under the current fencing token; a step past its `deadline` is skipped, never late.

use std::time::Duration;

use touchpoint_proto::v1::{Outcome, RunStatus, StepStatus};
use touchpoint_tests::{RawWorker, Stack, contact, request_id, run_summary, stays};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

/// The run's hash in Redis (default key prefix `tp`; run ids end in their partition).
fn run_key(run_id: &str) -> String {
    let partition = run_id.rsplit('-').next().expect("a partition suffix");
    format!("tp:{{p{partition}}}:run:{run_id}")
}

async fn resume_state_in_redis(stack: &Stack, run_id: &str) -> Option<String> {
    let mut conn = stack.redis.connection().await;
    redis::cmd("HGET")
        .arg(run_key(run_id))
        .arg("rs")
        .query_async(&mut conn)
        .await
        .expect("HGET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_shows_in_the_run_and_its_state_resumes_the_next_attempt() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    let mut worker = RawWorker::attach(&stack, "raw-1", &["crm"]).await;
    stack
        .apply(
            "name: resumable\nsteps:\n  - {id: send, action: send_message, channel: crm, \
             retry: {max_attempts: 3, initial: 100ms, max: 200ms}}\n",
        )
        .await;
    let run_id = stack
        .enroll("resumable", contact("c-1", &[], &[]), &request_id())
        .await
        .run_id;

    let first = worker.task().await;
    assert_eq!((first.run_id.as_str(), first.attempt), (run_id.as_str(), 1));
    assert_eq!(first.resume_state, "");
    worker.progress(
        &first,
        first.fencing_token,
        "awaiting_confirmation",
        "task-42",
    );
    let run = stack
        .client
        .wait_for_run(&run_id, TIMEOUT, "the progress detail", |run| {
            run.steps[0].detail == "awaiting_confirmation"
        })
        .await;
    assert_eq!(
        run.steps[0].status,
        i32::from(StepStatus::InFlight),
        "{}",
        run_summary(&run)
    );
    assert_eq!(
        resume_state_in_redis(&stack, &run_id).await.as_deref(),
        Some("task-42")
    );

    // Progress under another fencing token is ignored.
    worker.progress(&first, first.fencing_token + 1, "stale", "stale-state");
    worker.progress(&first, first.fencing_token - 1, "stale", "stale-state");
    let unchanged = stays(Duration::from_millis(700), || {
        let mut client = stack.client.clone();
        let run_id = run_id.clone();
        async move { client.run(&run_id).await.steps[0].detail == "awaiting_confirmation" }
    })
    .await;
    assert!(
        unchanged,
        "{}",
        run_summary(&stack.client.run(&run_id).await)
    );

    // A retryable failure: the next attempt carries the saved state.
    worker.result(&first, Outcome::Retryable, "HTTP 503");
    let second = worker.task().await;
    assert_eq!(
        (second.run_id.as_str(), second.attempt),
        (run_id.as_str(), 2)
    );
    assert_eq!(second.resume_state, "task-42");
    assert!(second.fencing_token > first.fencing_token);

    // The first attempt's token no longer counts; a state over 4 KiB is not kept (the
    // detail is).
    worker.progress(&first, first.fencing_token, "stale", "stale-state");
    worker.progress(&second, second.fencing_token, "resumed", &"x".repeat(5000));
    stack
        .client
        .wait_for_run(&run_id, TIMEOUT, "the second progress detail", |run| {
            run.steps[0].detail == "resumed"
        })
        .await;
    assert_eq!(
        resume_state_in_redis(&stack, &run_id).await.as_deref(),
        Some("task-42")
    );

    // Done: the state goes with the step.
    worker.result(&second, Outcome::Ok, "sent");
    let run = stack
        .client
        .wait_for_status(&run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(run.steps[0].attempts, 2, "{}", run_summary(&run));
    assert_eq!(run.steps[0].detail, "sent");
    assert_eq!(resume_state_in_redis(&stack, &run_id).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_past_its_deadline_is_skipped_not_sent_late() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    stack
        .apply(
            "name: short-lived\nsteps:\n  - {id: pause, wait: 2s}\n  \
             - {id: code, action: send_message, channel: crm, deadline: 1s}\n  \
             - {id: after, action: send_message, channel: crm}\n",
        )
        .await;
    let run_id = stack
        .enroll("short-lived", contact("c-1", &[], &[]), &request_id())
        .await
        .run_id;
    let run = stack
        .client
        .wait_for_status(&run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let code = &run.steps[1];
    assert_eq!(
        code.status,
        i32::from(StepStatus::Skipped),
        "{}",
        run_summary(&run)
    );
    assert!(
        code.detail.contains("deadline passed"),
        "{}",
        run_summary(&run)
    );
    assert_eq!(run.steps[2].status, i32::from(StepStatus::Done));
    // Only the step after it reached the receiver.
    let requests = stack.receiver.wait_for(1, TIMEOUT).await;
    assert_eq!(requests[0].step(), "after");
    let only_one = stays(Duration::from_millis(500), || {
        let count = stack.receiver.count();
        async move { count == 1 }
    })
    .await;
    assert!(only_one, "{}", stack.receiver.summary());
}
