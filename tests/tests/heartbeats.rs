//! Lease heartbeats: a worker keeps the lease of a delivery that takes longer than the
//! lease, so the step is not handed out again while it is still being delivered.
//! (A worker that sends no heartbeats, because it hangs, loses its lease: see
//! `restarts.rs`, `hung_worker_loses_its_lease_and_its_late_result_is_ignored`.)

use std::time::Duration;

use touchpoint_proto::v1::{ApplyStatus, Outcome, RunStatus, StepStatus};
use touchpoint_tests::{
    ChannelConfig, RawWorker, SECRET_ENV, Stack, WorkerConfig, WorkerNode, contact, eventually,
    free_port, gauge, request_id, run_summary, scrape, stays,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

/// With a 2 s lease, the receiver holds the first delivery for 6 s (three leases): the
/// worker's heartbeats keep the lease, the step reaches the receiver once, and the run
/// completes with the step done at attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_longer_than_its_lease_keeps_it_and_goes_out_once() {
    a_held_delivery_keeps_its_lease(&["--lease", "2s"], None).await;
}

/// The same for a send handed out ahead (after a wait): the worker heartbeats it from
/// its due time, when its delivery starts (it used to wait for something else to wake
/// the worker, and the lease ran out under the delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_handed_out_ahead_and_longer_than_its_lease_goes_out_once() {
    let flags = ["--lease", "2s", "--hand-out-ahead", "3s"];
    a_held_delivery_keeps_its_lease(&flags, Some("2s")).await;
}

/// Runs playbook `slow-receiver` (a wait of `pause`, if any, then `greet` and
/// `follow-up`) with the receiver holding the greeting for 6 s, three 2 s leases: it
/// reaches the receiver once, stays in flight at attempt 1, and no lease expires.
async fn a_held_delivery_keeps_its_lease(flags: &[&str], pause: Option<&str>) {
    let pause_step = pause
        .map(|wait| format!("  - {{id: pause, wait: {wait}}}\n"))
        .unwrap_or_default();
    let yaml = format!(
        "name: slow-receiver\nsteps:\n{pause_step}  \
         - {{id: greet, action: send_message, channel: wecom}}\n  \
         - {{id: follow-up, action: send_message, channel: wecom}}\n"
    );
    let greet = usize::from(pause.is_some());
    let mut stack = Stack::start(NODE, flags, &["wecom"]).await;
    assert_eq!(stack.apply(&yaml).await.status(), ApplyStatus::Created);
    stack.receiver.hold_next(Duration::from_secs(6));
    let run = stack
        .enroll("slow-receiver", contact("c-3001", &[], &[]), &request_id())
        .await;
    let first = stack.receiver.wait_for(1, TIMEOUT).await.remove(0);
    assert_eq!((first.step(), first.attempt()), ("greet", 1));

    // Past two lease lengths, the step is still in flight and was not handed out again.
    let receiver = &stack.receiver;
    let client = stack.client.clone();
    let held = stays(Duration::from_secs(5), || {
        let count = receiver.count();
        let mut client = client.clone();
        let run_id = run.run_id.clone();
        async move {
            let now = client.run(&run_id).await;
            count == 1
                && now.steps[greet].status() == StepStatus::InFlight
                && now.steps[greet].attempts == 1
        }
    })
    .await;
    let now = stack.client.run(&run.run_id).await;
    assert!(
        held,
        "the held step went out again or left in_flight:\n{}\n{}",
        stack.receiver.summary(),
        run_summary(&now)
    );

    let done = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    let timeline = run_summary(&done);
    let steps: Vec<(&str, u64)> = requests.iter().map(|r| (r.step(), r.attempt())).collect();
    assert_eq!(
        steps,
        [("greet", 1), ("follow-up", 1)],
        "each step exactly once:\n{summary}\n{timeline}"
    );
    assert!(
        requests[1]
            .received_at
            .duration_since(requests[0].received_at)
            >= Duration::from_secs(6),
        "the follow-up came before the held greeting was answered:\n{summary}"
    );
    let step = &done.steps[greet];
    assert_eq!(step.status(), StepStatus::Done, "{timeline}");
    assert_eq!(step.attempts, 1, "{timeline}");
    assert_eq!(step.worker, "w-1", "{timeline}");
    assert_eq!(done.steps[greet + 1].attempts, 1, "{timeline}");
    let log = stack.scheduler.process().log();
    assert!(
        !log.contains("leases expired; steps go out again"),
        "a lease expired although the worker was heartbeating:\n{}",
        stack.scheduler.process().log_tail(30)
    );
}

/// Starts a worker of `stack` with concurrency 1 (its webhook channel `wecom` goes to the
/// stack's receiver).
fn start_single_slot_worker(stack: &mut Stack, worker_id: &str) {
    let config = WorkerConfig {
        concurrency: 1,
        ..WorkerConfig::new()
    }
    .channel(ChannelConfig::webhook(
        "wecom",
        &stack.receiver.url(),
        SECRET_ENV,
    ));
    let worker = WorkerNode::start(
        NODE,
        &stack.scheduler.endpoint(),
        worker_id,
        &config,
        &[(SECRET_ENV, &stack.secret)],
    );
    stack.workers.push(worker);
}

/// A worker with one slot hangs (SIGSTOP: no heartbeats) and loses its lease; the step goes
/// to another worker of the same scheduler. Once the hung worker wakes up and reports its
/// stale attempt, its slot is free again: with the other worker gone, it takes the next
/// step instead of being counted busy forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_gets_its_slot_back() {
    let mut stack = Stack::start(NODE, &["--lease", "2s"], &[]).await;
    start_single_slot_worker(&mut stack, "w-1");
    let yaml = "name: one-step\nsteps:\n  - {id: greet, action: send_message, channel: wecom}\n";
    assert_eq!(stack.apply(yaml).await.status(), ApplyStatus::Created);
    stack.receiver.hold_next(Duration::from_secs(4));
    let first = stack
        .enroll("one-step", contact("c-3002", &[], &[]), &request_id())
        .await;
    stack.receiver.wait_for(1, TIMEOUT).await;
    stack.worker("w-1").process().freeze();
    start_single_slot_worker(&mut stack, "w-2");
    let done = stack
        .client
        .wait_for_status(&first.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(done.steps[0].worker, "w-2", "{}", run_summary(&done));

    stack.worker("w-1").process().thaw();
    stack.worker("w-2").kill9();
    let second = stack
        .enroll("one-step", contact("c-3003", &[], &[]), &request_id())
        .await;
    let done = stack
        .client
        .wait_for_status(&second.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let timeline = run_summary(&done);
    assert_eq!(done.steps[0].worker, "w-1", "{timeline}");
    assert_eq!(done.steps[0].attempts, 1, "{timeline}");
}

/// A worker that lost a task without a word (no result, no heartbeat for it) and is
/// otherwise silent: the step's lease runs out and it goes out again, and the worker is
/// set aside as unresponsive. The mark passes after a few seconds (an idle worker sends
/// nothing that would clear it; a mark for good left every later step due forever), so
/// a step of another run still reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_set_aside_gets_tasks_again() {
    let mut stack = Stack::start(NODE, &["--lease", "1s"], &[]).await;
    let mut worker = RawWorker::attach(&stack, "raw-lost", &["crm"]).await;
    let yaml = "name: one-step\nsteps:\n  - {id: greet, action: send_message, channel: crm}\n";
    assert_eq!(stack.apply(yaml).await.status(), ApplyStatus::Created);
    let first = stack
        .enroll("one-step", contact("c-3010", &[], &[]), &request_id())
        .await
        .run_id;

    let lost = worker.task().await;
    assert_eq!((lost.run_id.as_str(), lost.attempt), (first.as_str(), 1));
    // Nothing is said about it: the lease runs out, and the step comes again, which
    // sets the silent worker aside.
    let again = worker.task().await;
    assert_eq!((again.run_id.as_str(), again.attempt), (first.as_str(), 2));
    assert!(again.fencing_token > lost.fencing_token);

    // Still silent; a step of another run reaches it once the mark passes.
    let second = stack
        .enroll("one-step", contact("c-3011", &[], &[]), &request_id())
        .await
        .run_id;
    let task = loop {
        let task = worker.task().await;
        if task.run_id == second {
            break task;
        }
    };
    worker.result(&task, Outcome::Ok, "sent");
    let done = stack
        .client
        .wait_for_status(&second, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(done.steps[0].attempts, 1, "{}", run_summary(&done));
}

/// A worker whose machine goes silent (SIGSTOP: its connection stays open and nothing
/// answers on it) is dropped by the scheduler's keepalive: it no longer counts as
/// connected and gets no new steps, so steps enrolled meanwhile go to the live worker at
/// their first attempt instead of waiting out a lease on the silent one. Woken up, the
/// worker attaches again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_worker_is_dropped_by_the_keepalive() {
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let flags = [
        "--keepalive",
        "1s",
        "--lease",
        "20s",
        "--metrics-listen",
        &metrics,
    ];
    let mut stack = Stack::start(NODE, &flags, &["wecom"]).await;
    let connected = || async {
        let text = scrape(port).await;
        gauge(
            &text,
            "touchpoint_scheduler_workers_connected{channel=\"wecom\"}",
        )
    };
    assert!(eventually(TIMEOUT, || async { connected().await == Some(1) }).await);

    stack.worker("w-1").process().freeze();
    let dropped = eventually(TIMEOUT, || {
        let log = stack.scheduler.process().log();
        async move {
            log.lines().any(|l| {
                l.contains("worker=w-1")
                    && (l.contains("worker disconnected") || l.contains("worker stream failed"))
            })
        }
    })
    .await;
    assert!(
        dropped,
        "the silent worker was not dropped:\n{}",
        stack.scheduler.process().log_tail(20)
    );
    assert_eq!(connected().await, Some(0));

    stack.start_worker("w-2");
    let yaml = "name: one-step\nsteps:\n  - {id: greet, action: send_message, channel: wecom}\n";
    assert_eq!(stack.apply(yaml).await.status(), ApplyStatus::Created);
    let mut runs = Vec::new();
    for n in 0..4 {
        let contact = contact(&format!("c-31{n:02}"), &[], &[]);
        runs.push(
            stack
                .enroll("one-step", contact, &request_id())
                .await
                .run_id,
        );
    }
    for run in &runs {
        let done = stack
            .client
            .wait_for_status(run, RunStatus::Completed, TIMEOUT)
            .await;
        let timeline = run_summary(&done);
        assert_eq!(done.steps[0].worker, "w-2", "{timeline}");
        assert_eq!(done.steps[0].attempts, 1, "{timeline}");
    }

    stack.worker("w-1").process().thaw();
    assert!(
        eventually(TIMEOUT, || async { connected().await == Some(2) }).await,
        "the woken worker did not attach again:\n{}",
        stack.worker("w-1").process().log_tail(20)
    );
}
