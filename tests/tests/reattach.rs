//! A worker's stream breaks while it delivers (the scheduler restarts, or the network
//! between them fails) and the worker is alive: the delivery finishes while it is cut
//! off, its result is kept and reported on the next stream, and the step goes out once.
//! The scheduler does not hand the step out again at the disconnect; only a lease that
//! runs out does (a worker that really died: `restarts.rs`,
//! `worker_killed_mid_delivery_is_redelivered_with_the_same_webhook_id`).

use std::time::{Duration, Instant};

use touchpoint_proto::v1::{ApplyStatus, Run, RunStatus, StepStatus};
use touchpoint_tests::{
    ChannelConfig, ReceivedRequest, SECRET_ENV, Stack, TcpProxy, WorkerConfig, WorkerNode, contact,
    eventually, request_id, run_summary,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);
/// Far longer than the tests take to recover: only a result can move the run on in time.
const LEASE: &str = "20s";
/// How long the receiver holds the first delivery.
const HOLD: Duration = Duration::from_secs(3);
/// The next step must go out well before the first step's lease would have run out.
const WELL_BEFORE_THE_LEASE: Duration = Duration::from_secs(15);

const PLAYBOOK: &str = r#"
name: cut-off
steps:
  - id: greet
    action: send_message
    channel: wecom
  - id: follow-up
    action: send_message
    channel: wecom
"#;

/// Waits until the held delivery of `first` has been answered (plus a margin), so that it
/// finishes while the worker is cut off.
async fn until_answered(first: &ReceivedRequest) {
    let answered = first.received_at + HOLD + Duration::from_millis(500);
    tokio::time::sleep_until(answered.into()).await;
}

/// Each step once, at attempt 1, by `worker`; the follow-up did not wait for the lease.
fn assert_delivered_once(stack: &Stack, done: &Run, worker: &str) {
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    let timeline = run_summary(done);
    let steps: Vec<(&str, u64)> = requests.iter().map(|r| (r.step(), r.attempt())).collect();
    assert_eq!(
        steps,
        [("greet", 1), ("follow-up", 1)],
        "each step exactly once:\n{summary}\n{timeline}"
    );
    assert_ne!(requests[0].webhook_id(), requests[1].webhook_id());
    let waited = requests[1]
        .received_at
        .duration_since(requests[0].received_at);
    assert!(
        waited >= HOLD && waited < WELL_BEFORE_THE_LEASE,
        "the follow-up came {waited:?} after the greeting: it should follow the held \
         greeting's result, not its lease:\n{summary}"
    );
    for step in &done.steps {
        assert_eq!(step.status(), StepStatus::Done, "{timeline}");
        assert_eq!(step.attempts, 1, "{timeline}");
        assert_eq!(step.worker, worker, "{timeline}");
    }
}

/// kill -9 the scheduler while the receiver holds the first delivery, and start it again
/// on the same port once the delivery has finished. The worker keeps the result while no
/// scheduler is there and sends it first on its new stream; the restarted scheduler,
/// which remembers nothing of the step, applies it under its fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_kept_across_a_scheduler_restart_counts_and_nothing_goes_out_twice() {
    let mut stack = Stack::start(NODE, &["--lease", LEASE], &["wecom"]).await;
    assert_eq!(stack.apply(PLAYBOOK).await.status(), ApplyStatus::Created);
    stack.receiver.hold_next(HOLD);
    let run = stack
        .enroll("cut-off", contact("c-9001", &[], &[]), &request_id())
        .await;
    let first = stack.receiver.wait_for(1, TIMEOUT).await.remove(0);
    assert_eq!((first.step(), first.attempt()), ("greet", 1));

    stack.scheduler.kill9();
    until_answered(&first).await;
    let worker = stack.worker("w-1");
    let kept = eventually(Duration::from_secs(5), || {
        let log = worker.process().log();
        async move { log.contains("scheduler link down; keeping results for the next stream") }
    })
    .await;
    assert!(
        kept,
        "the worker did not keep the result:\n{}",
        stack.worker("w-1").process().log_tail(20)
    );

    let restarted_at = Instant::now();
    stack.restart_scheduler().await;
    let done = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    eprintln!("completed {:?} after the restart", restarted_at.elapsed());
    assert_delivered_once(&stack, &done, "w-1");
    let worker_log = stack.worker("w-1").process().log();
    assert!(
        worker_log.contains("sending results kept while the scheduler link was down"),
        "{worker_log}"
    );
    let log = stack.scheduler.process().log();
    assert!(
        !log.contains("leases expired; steps go out again"),
        "a lease expired although the worker reported:\n{}",
        stack.scheduler.process().log_tail(30)
    );
}

/// The scheduler stays up; the network between it and the worker fails (a TCP proxy is
/// cut) while the receiver holds the first delivery, and comes back after the delivery
/// finished. The scheduler keeps the step, detached from the dead stream, rather than
/// handing it out again; the worker re-attaches under the same id, gets the step back,
/// and its kept result counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_mid_delivery_reattaches_and_its_step_goes_out_once() {
    let mut stack = Stack::start(NODE, &["--lease", LEASE], &[]).await;
    let scheduler = format!("127.0.0.1:{}", stack.scheduler.port())
        .parse()
        .expect("scheduler address");
    let proxy = TcpProxy::start(scheduler).await;
    let config = WorkerConfig::new().channel(ChannelConfig::webhook(
        "wecom",
        &stack.receiver.url(),
        SECRET_ENV,
    ));
    let worker = WorkerNode::start(
        NODE,
        &proxy.url(),
        "w-1",
        &config,
        &[(SECRET_ENV, &stack.secret)],
    );
    stack.workers.push(worker);
    assert_eq!(stack.apply(PLAYBOOK).await.status(), ApplyStatus::Created);
    stack.receiver.hold_next(HOLD);
    let run = stack
        .enroll("cut-off", contact("c-9002", &[], &[]), &request_id())
        .await;
    let first = stack.receiver.wait_for(1, TIMEOUT).await.remove(0);
    assert_eq!((first.step(), first.attempt()), ("greet", 1));

    proxy.cut();
    let scheduler = stack.scheduler.process();
    let detached = eventually(Duration::from_secs(10), || {
        let log = scheduler.log();
        async move { log.contains("worker's stream ended while it held steps") }
    })
    .await;
    assert!(
        detached,
        "the scheduler did not notice the cut:\n{}",
        scheduler.log_tail(20)
    );
    until_answered(&first).await;
    assert_eq!(
        stack.receiver.count(),
        1,
        "the step went out again while its worker was cut off:\n{}",
        stack.receiver.summary()
    );
    let in_flight = stack.client.run(&run.run_id).await;
    assert_eq!(
        in_flight.steps[0].status(),
        StepStatus::InFlight,
        "{}",
        run_summary(&in_flight)
    );

    proxy.restore();
    let done = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_delivered_once(&stack, &done, "w-1");
    let log = stack.scheduler.process().log();
    assert!(
        log.contains("worker re-attached; the steps it held are its again"),
        "{}",
        stack.scheduler.process().log_tail(30)
    );
    assert!(
        !log.contains("leases expired; steps go out again"),
        "{}",
        stack.scheduler.process().log_tail(30)
    );
}
