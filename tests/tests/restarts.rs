//! Processes die and come back: nothing is lost and nothing is sent twice.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use touchpoint_proto::v1::{ApplyStatus, RunStatus, StepStatus};
use touchpoint_tests::{
    ReceivedRequest, Stack, contact, request_id, run_summary, stays, verify_signature, welcome_yaml,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

/// Nothing handed out ahead: the timer in Redis is the subject here (a kill just after a
/// claim leaves the step to its lease, ahead or not; hand_out_ahead.rs kills a scheduler
/// whose worker holds sends ahead).
const TIMERS_ONLY: [&str; 2] = ["--hand-out-ahead", "0s"];

/// kill -9 the scheduler while a run sits in a 3 s wait, start it again on the same port:
/// the wait still ends, the reminder goes out once, every step is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_killed_during_a_wait_resumes_it_and_sends_nothing_twice() {
    let mut stack = Stack::start(NODE, &TIMERS_ONLY, &["wecom", "sms"]).await;
    let applied = stack.apply(&welcome_yaml("3s")).await;
    assert_eq!(applied.status(), ApplyStatus::Created);
    let run = stack
        .enroll(
            "welcome-new-customer",
            contact("c-1001", &[("name", "王芳")], &["paid"]),
            &request_id(),
        )
        .await;

    // The invite's outcome is recorded and the run is in its wait.
    let waiting = stack
        .client
        .wait_for_run(&run.run_id, TIMEOUT, "its 3s wait", |r| {
            r.current_step == "three-days"
                && r.steps
                    .iter()
                    .any(|s| s.step_id == "three-days" && s.status() == StepStatus::Scheduled)
        })
        .await;
    let before_kill = stack.receiver.count();
    assert_eq!(
        before_kill,
        3,
        "add, coupon and invite should be delivered before the wait:\n{}\n{}",
        stack.receiver.summary(),
        run_summary(&waiting)
    );

    stack.scheduler.kill9();
    assert!(!stack.scheduler.is_running());
    stack.restart_scheduler().await;

    let done = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    let steps: Vec<&str> = requests.iter().map(ReceivedRequest::step).collect();
    assert_eq!(
        steps,
        ["add", "coupon", "invite-vip", "remind"],
        "each step exactly once, in order:\n{summary}"
    );
    assert_eq!(
        count_by_webhook_id(&requests).values().max(),
        Some(&1),
        "a webhook-id was delivered twice:\n{summary}"
    );
    assert!(requests.iter().all(|r| r.attempt() == 1), "{summary}");
    assert!(requests.iter().all(|r| verify_signature(r, &stack.secret)));
    let waited = requests[3]
        .received_at
        .duration_since(requests[2].received_at);
    assert!(
        waited >= Duration::from_secs(3),
        "the reminder came {waited:?} after the invite, before the 3s wait ended:\n{summary}"
    );
    let summary = run_summary(&done);
    for step in &done.steps {
        let expected = if step.step_id == "invite-edu" {
            StepStatus::Skipped
        } else {
            StepStatus::Done
        };
        assert_eq!(step.status(), expected, "{summary}");
    }
}

/// kill -9 Redis (AOF on, `appendfsync always`) while a run sits in its wait and start it
/// again on the same port and data: the scheduler reconnects, the wait ends, nothing is
/// lost or sent twice. (Under `everysec` Redis may acknowledge writes it has not written
/// yet, up to about two seconds of them: a kill then costs at most redeliveries with the
/// same webhook-id; see docs/delivery-semantics.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_a_wait_loses_nothing() {
    let mut stack = Stack::start(NODE, &TIMERS_ONLY, &["wecom", "sms"]).await;
    let mut conn = stack.redis.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("always")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        stack.apply(&welcome_yaml("3s")).await.status(),
        ApplyStatus::Created
    );
    let run = stack
        .enroll(
            "welcome-new-customer",
            contact("c-1002", &[("name", "李雷")], &[]),
            &request_id(),
        )
        .await;
    stack
        .client
        .wait_for_run(&run.run_id, TIMEOUT, "its 3s wait", |r| {
            r.current_step == "three-days"
        })
        .await;
    assert_eq!(stack.receiver.count(), 3, "{}", stack.receiver.summary());

    stack.redis.restart();

    let done = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    let steps: Vec<&str> = requests.iter().map(ReceivedRequest::step).collect();
    assert_eq!(
        steps,
        ["add", "coupon", "invite-edu", "remind"],
        "each step exactly once, in order:\n{summary}\n{}",
        run_summary(&done)
    );
    assert_eq!(
        count_by_webhook_id(&requests).len(),
        4,
        "four distinct webhook-ids:\n{summary}"
    );
}

/// The receiver holds the first delivery; kill -9 the worker while it is in flight and start
/// another: the scheduler does not hand the step out again when the dead worker's stream
/// ends (it might be alive and re-attach with its result), but once the 2 s lease, no longer
/// heartbeated, expires. Then it goes out with the same webhook-id and `attempt` 2, and the
/// run completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_delivery_is_redelivered_with_the_same_webhook_id() {
    let mut stack = Stack::start(NODE, &["--lease", "2s"], &["wecom"]).await;
    let yaml = r#"
name: lease-expiry
steps:
  - id: greet
    action: send_message
    channel: wecom
    template: "你好，{{ contact.attrs.name }}"
  - id: follow-up
    action: send_message
    channel: wecom
    template: "再见"
"#;
    assert_eq!(stack.apply(yaml).await.status(), ApplyStatus::Created);
    stack.receiver.hold_next(Duration::from_secs(120));
    let run = stack
        .enroll(
            "lease-expiry",
            contact("c-2001", &[("name", "王芳")], &[]),
            &request_id(),
        )
        .await;

    let first = stack.receiver.wait_for(1, TIMEOUT).await.remove(0);
    assert_eq!((first.step(), first.attempt()), ("greet", 1));
    let in_flight = stack.client.run(&run.run_id).await;
    assert_eq!(
        in_flight.steps[0].status(),
        StepStatus::InFlight,
        "the held step should be in flight:\n{}",
        run_summary(&in_flight)
    );

    stack.worker("w-1").kill9();
    let killed_at = Instant::now();
    stack.start_worker("w-2");

    let again = stack
        .receiver
        .wait_for_request(TIMEOUT, |r| r.step() == "greet" && r.attempt() != 1)
        .await;
    let summary = stack.receiver.summary();
    // w-1 heartbeated every 666 ms until the kill, so its lease ran at least 1.3 s past it.
    let after = again.received_at.duration_since(killed_at);
    assert!(
        after >= Duration::from_secs(1),
        "the step went out again {after:?} after the kill, before the lease expired:\n{summary}"
    );
    let log = stack.scheduler.process().log();
    assert!(
        log.contains("worker's stream ended while it held steps")
            && log.contains("leases expired; steps go out again"),
        "the step should go out again by lease expiry:\n{}",
        stack.scheduler.process().log_tail(30)
    );
    assert_eq!(
        again.webhook_id(),
        first.webhook_id(),
        "the redelivery must carry the same webhook-id:\n{summary}"
    );
    assert!(!first.webhook_id().is_empty());
    assert_eq!(again.attempt(), 2, "{summary}");
    assert_eq!(again.run_id(), run.run_id);
    assert_eq!(again.field("message"), "你好，王芳");
    assert_eq!(again.field("message"), first.field("message"));
    assert!(verify_signature(&first, &stack.secret));
    assert!(verify_signature(&again, &stack.secret));

    let done = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    let steps: Vec<(&str, u64)> = requests.iter().map(|r| (r.step(), r.attempt())).collect();
    assert_eq!(
        steps,
        [("greet", 1), ("greet", 2), ("follow-up", 1)],
        "{summary}"
    );
    let timeline = run_summary(&done);
    let greet = &done.steps[0];
    assert_eq!(greet.status(), StepStatus::Done, "{timeline}");
    assert_eq!(greet.attempts, 2, "{timeline}");
    assert_eq!(greet.worker, "w-2", "{timeline}");
    let follow_up = &done.steps[1];
    assert_eq!(follow_up.status(), StepStatus::Done, "{timeline}");
    assert_eq!(follow_up.attempts, 1, "{timeline}");
    assert_eq!(follow_up.worker, "w-2", "{timeline}");
}

/// A worker that hangs (SIGSTOP: its stream stays open, but no heartbeats and no result)
/// loses its step when the 2 s lease expires; another worker delivers it with the same
/// webhook-id. When the hung worker wakes up and reports its stale attempt, the fencing token
/// makes the scheduler ignore it: the step is not completed twice, the next step is not
/// scheduled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_worker_loses_its_lease_and_its_late_result_is_ignored() {
    let mut stack = Stack::start(NODE, &["--lease", "2s"], &["wecom"]).await;
    let yaml = r#"
name: hung-worker
steps:
  - id: greet
    action: send_message
    channel: wecom
  - id: follow-up
    action: send_message
    channel: wecom
"#;
    assert_eq!(stack.apply(yaml).await.status(), ApplyStatus::Created);
    // The first attempt is answered 200 only after 4 s; by then its lease has expired.
    stack.receiver.hold_next(Duration::from_secs(4));
    let run = stack
        .enroll("hung-worker", contact("c-2002", &[], &[]), &request_id())
        .await;
    let first = stack.receiver.wait_for(1, TIMEOUT).await.remove(0);
    assert_eq!((first.step(), first.attempt()), ("greet", 1));

    stack.worker("w-1").process().freeze();
    stack.start_worker("w-2");

    let again = stack
        .receiver
        .wait_for_request(TIMEOUT, |r| r.step() == "greet" && r.attempt() != 1)
        .await;
    let summary = stack.receiver.summary();
    assert_eq!(again.webhook_id(), first.webhook_id(), "{summary}");
    assert!(again.attempt() >= 2, "{summary}");
    let done = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let timeline = run_summary(&done);
    assert_eq!(done.steps[0].worker, "w-2", "{timeline}");
    assert_eq!(
        u64::from(done.steps[0].attempts),
        again.attempt(),
        "{timeline}"
    );

    // w-1 wakes up, gets its (late) 200 and reports an attempt whose lease is gone.
    stack.worker("w-1").process().thaw();
    let follow_ups = || {
        stack
            .receiver
            .requests()
            .iter()
            .filter(|r| r.step() == "follow-up")
            .count()
    };
    let unchanged = stays(Duration::from_secs(3), || async {
        follow_ups() == 1 && stack.receiver.count() >= 3
    })
    .await;
    let summary = stack.receiver.summary();
    assert!(
        unchanged,
        "the late result of the hung worker changed the run:\n{summary}"
    );
    let after = stack.client.run(&run.run_id).await;
    let timeline = run_summary(&after);
    assert_eq!(after.status(), RunStatus::Completed, "{timeline}");
    assert_eq!(after.steps[0].worker, "w-2", "{timeline}");
    assert_eq!(
        after.steps[0].attempts, done.steps[0].attempts,
        "{timeline}"
    );
    assert_eq!(after.steps[1].attempts, 1, "{timeline}");
}

fn count_by_webhook_id(requests: &[ReceivedRequest]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for r in requests {
        *counts.entry(r.webhook_id()).or_default() += 1;
    }
    counts
}
