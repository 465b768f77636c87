//! `--hand-out-ahead`: sends due within the window are handed to workers before their
//! due time and go out at it, never before; a run cancelled meanwhile is revoked; a
//! worker that dies holding them, or a scheduler that stops, loses nothing and sends
//! nothing twice.

use std::time::{Duration, Instant};

use touchpoint_proto::v1::{CancelRunRequest, Run, RunStatus, StepStatus, scheduler_message};
use touchpoint_tests::{
    RawWorker, ReceivedRequest, Stack, contact, eventually, free_port, gauge, request_id,
    run_summary, scrape, stays,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);
const HANDED_OUT_AHEAD: &str = "touchpoint_scheduler_handed_out_ahead_total";
/// How long the runs wait before their send: longer than the window, so the send is
/// handed out ahead some time after enrollment.
const WAIT: Duration = Duration::from_secs(5);
const PLAYBOOK: &str = "
name: at-five
steps:
  - {id: pause, wait: 5s}
  - {id: greet, action: send_message, channel: wecom}
";

async fn start(flags: &[&str]) -> Stack {
    let mut args = vec!["--hand-out-ahead", "3s"];
    args.extend_from_slice(flags);
    let mut stack = Stack::start(NODE, &args, &["wecom"]).await;
    stack.apply(PLAYBOOK).await;
    stack
}

/// Enrolls `count` contacts; returns their run ids and a moment before any was enrolled.
async fn enroll(stack: &mut Stack, count: usize) -> (Vec<String>, Instant) {
    let before = Instant::now();
    let mut runs = Vec::new();
    for n in 0..count {
        let c = contact(&format!("c-{n}"), &[], &[]);
        runs.push(stack.enroll("at-five", c, &request_id()).await.run_id);
    }
    (runs, before)
}

/// Checks that the run's send is with a worker (leased, in flight) while the run is
/// still in its wait, as GetRun shows it.
async fn assert_handed_out(stack: &mut Stack, run_id: &str) {
    let run = stack.client.run(run_id).await;
    assert_eq!(
        (
            run.current_step.as_str(),
            run.steps[0].status(),
            run.steps[1].status()
        ),
        ("pause", StepStatus::Scheduled, StepStatus::InFlight),
        "not handed out ahead:\n{}",
        run_summary(&run)
    );
}

/// Waits for each of `runs` to complete; returns them.
async fn completed(stack: &mut Stack, runs: &[String]) -> Vec<Run> {
    let mut done = Vec::new();
    for run_id in runs {
        let run = stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
        done.push(run);
    }
    done
}

/// Checks that no request reached the receiver before its due time (`WAIT` after
/// `before`, a moment before the runs were enrolled).
fn assert_none_early(stack: &Stack, requests: &[ReceivedRequest], before: Instant) {
    for request in requests {
        assert!(
            request.received_at >= before + WAIT,
            "delivered {:?} after enrollment began, before its due time:\n{}",
            request.received_at - before,
            stack.receiver.summary()
        );
    }
}

/// Four seconds in (after the hand-out at about two, before the due time at five), every
/// send is with the worker, none delivered; each reaches the receiver once, not before
/// its due time, at its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_handed_out_ahead_go_out_at_their_due_time() {
    let port = free_port();
    let mut stack = start(&["--metrics-listen", &format!("127.0.0.1:{port}")]).await;
    let (runs, before) = enroll(&mut stack, 5).await;
    tokio::time::sleep_until((before + Duration::from_secs(4)).into()).await;
    for run_id in &runs {
        assert_handed_out(&mut stack, run_id).await;
    }
    assert_eq!(stack.receiver.count(), 0, "{}", stack.receiver.summary());
    let metrics = scrape(port).await;
    assert_eq!(gauge(&metrics, HANDED_OUT_AHEAD), Some(5), "{metrics}");

    let requests = stack.receiver.wait_for(runs.len(), TIMEOUT).await;
    assert_none_early(&stack, &requests, before);
    for request in &requests {
        assert_eq!((request.step(), request.attempt()), ("greet", 1));
    }
    for done in completed(&mut stack, &runs).await {
        assert_eq!(done.steps[1].attempts, 1, "{}", run_summary(&done));
    }
    assert_eq!(stack.receiver.count(), runs.len());
}

/// A send due again after a retryable failure is not handed out ahead, though its
/// backoff (1.25 to 2.5 s) ends within the window: only the end of a wait goes ahead; a
/// retry waits in Redis for whichever worker is free at its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_not_handed_out_ahead() {
    let mut stack = start(&[]).await;
    stack
        .apply(
            "name: retry-soon\nsteps:\n  - {id: greet, action: send_message, channel: wecom, \
             retry: {initial: 2500ms, max: 2500ms}}\n",
        )
        .await;
    stack.receiver.respond_with(&[503, 200]);
    let c = contact("r-1", &[], &[]);
    let run_id = stack.enroll("retry-soon", c, &request_id()).await.run_id;
    stack
        .client
        .wait_for_run(&run_id, TIMEOUT, "the first attempt's failure", |r| {
            r.steps[0].status() == StepStatus::Retrying
        })
        .await;

    let client = stack.client.clone();
    assert!(
        stays(Duration::from_millis(1000), || {
            let mut client = client.clone();
            let run_id = run_id.clone();
            async move { client.run(&run_id).await.steps[0].status() != StepStatus::InFlight }
        })
        .await,
        "the retry was handed out ahead:\n{}",
        run_summary(&stack.client.run(&run_id).await)
    );
    let done = stack
        .client
        .wait_for_status(&run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(done.steps[0].attempts, 2, "{}", run_summary(&done));
    assert_eq!(stack.receiver.count(), 2, "{}", stack.receiver.summary());
}

/// A run cancelled after its send was handed out ahead, before the last check, is
/// revoked on the worker: nothing goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cancelled_before_its_due_time_is_revoked() {
    let port = free_port();
    let mut stack = start(&["--metrics-listen", &format!("127.0.0.1:{port}")]).await;
    let (runs, before) = enroll(&mut stack, 2).await;
    tokio::time::sleep_until((before + Duration::from_millis(3500)).into()).await;
    assert_handed_out(&mut stack, &runs[0]).await;
    stack
        .client
        .runs
        .cancel_run(CancelRunRequest {
            run_id: runs[0].clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("CancelRun: {e}"));

    // The other run's send goes out; the cancelled one's never does.
    let requests = stack.receiver.wait_for(1, TIMEOUT).await;
    assert_eq!(requests[0].run_id(), runs[1]);
    let receiver = &stack.receiver;
    let quiet = stays(
        Duration::from_secs(3),
        || async move { receiver.count() == 1 },
    )
    .await;
    assert!(
        quiet,
        "the cancelled run's send went out:\n{}",
        receiver.summary()
    );
    // Cancelled in its wait, its send never begun.
    let cancelled = stack.client.run(&runs[0]).await;
    assert_eq!(
        (
            cancelled.status(),
            cancelled.steps[0].status(),
            cancelled.steps[1].status()
        ),
        (
            RunStatus::Cancelled,
            StepStatus::Cancelled,
            StepStatus::Pending
        ),
        "{}",
        run_summary(&cancelled)
    );
    let metrics = scrape(port).await;
    assert_eq!(gauge(&metrics, HANDED_OUT_AHEAD), Some(2), "{metrics}");
    assert_eq!(
        gauge(&metrics, "touchpoint_scheduler_ahead_revoked_total"),
        Some(1),
        "{metrics}"
    );
    let log = stack.scheduler.process().log();
    assert!(
        log.contains("steps handed out ahead revoked"),
        "{}",
        stack.scheduler.process().log_tail(30)
    );
}

/// The worker holding the sends ahead is killed; another worker takes them once their
/// leases (a lease after the due time) run out: each goes out once, never early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_holding_sends_ahead_loses_none() {
    let mut stack = start(&["--lease", "2s"]).await;
    let (runs, before) = enroll(&mut stack, 3).await;
    tokio::time::sleep_until((before + Duration::from_millis(3500)).into()).await;
    assert_handed_out(&mut stack, &runs[0]).await;
    stack.worker("w-1").kill9();
    stack.start_worker("w-2");

    let requests = stack.receiver.wait_for(runs.len(), TIMEOUT).await;
    assert_none_early(&stack, &requests, before);
    for done in completed(&mut stack, &runs).await {
        assert_eq!(done.steps[1].worker, "w-2", "{}", run_summary(&done));
    }
    assert_eq!(
        stack.receiver.count(),
        runs.len(),
        "a send went out twice:\n{}",
        stack.receiver.summary()
    );
}

/// The scheduler is stopped (SIGTERM) while its worker holds sends ahead: they stay with
/// the worker, which sends them at their due time and reports to the next scheduler.
/// Each goes out once (a revoke lost with the closing stream sent one twice), not before
/// its due time, at its first attempt, long before the lease (a lease after the due
/// time) would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_stopped_while_its_worker_holds_sends_ahead_loses_none() {
    scheduler_gone_while_its_worker_holds_sends_ahead(false).await;
}

/// The same with the scheduler killed (kill -9) instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_killed_while_its_worker_holds_sends_ahead_loses_none() {
    scheduler_gone_while_its_worker_holds_sends_ahead(true).await;
}

async fn scheduler_gone_while_its_worker_holds_sends_ahead(kill: bool) {
    let mut stack = start(&["--lease", "5m"]).await;
    let (runs, before) = enroll(&mut stack, 3).await;
    tokio::time::sleep_until((before + Duration::from_millis(3500)).into()).await;
    for run_id in &runs {
        assert_handed_out(&mut stack, run_id).await;
    }
    if kill {
        stack.scheduler.kill9();
    } else {
        stack.scheduler.terminate().await;
    }
    stack.restart_scheduler().await;

    let requests = stack.receiver.wait_for(runs.len(), TIMEOUT).await;
    assert_none_early(&stack, &requests, before);
    for request in &requests {
        assert_eq!(request.attempt(), 1, "{}", stack.receiver.summary());
    }
    for done in completed(&mut stack, &runs).await {
        assert_eq!(done.steps[1].attempts, 1, "{}", run_summary(&done));
    }
    let sent = runs.len();
    assert!(
        stays(Duration::from_secs(2), || {
            let count = stack.receiver.count();
            async move { count == sent }
        })
        .await,
        "a send went out twice:\n{}",
        stack.receiver.summary()
    );
}

/// The scheduler stops while its worker holds sends ahead, then the worker stops too,
/// before the due time: the next scheduler, which never handed them out, takes the
/// worker's hand-back as one (due again at its time, the attempt not counted), and
/// another worker sends each once, at its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_ahead_handed_back_to_the_next_scheduler_go_out_at_their_time() {
    let mut stack = start(&["--lease", "5m"]).await;
    let (runs, before) = enroll(&mut stack, 3).await;
    // As soon as all are handed out (about two seconds in), for room before the due time.
    let client = &mut stack.client;
    assert!(
        eventually(TIMEOUT, || {
            let mut client = client.clone();
            let runs = runs.clone();
            async move {
                for run_id in &runs {
                    if client.run(run_id).await.steps[1].status() != StepStatus::InFlight {
                        return false;
                    }
                }
                true
            }
        })
        .await
    );
    stack.scheduler.terminate().await;
    stack.restart_scheduler().await;
    // Once it is attached to the new scheduler (a worker with no stream open when it
    // stops has nowhere to hand its sends back: they wait for their leases).
    let worker = stack.worker("w-1");
    assert!(
        eventually(TIMEOUT, || {
            let attached = worker
                .process()
                .log()
                .matches("attached to the scheduler")
                .count();
            async move { attached >= 2 }
        })
        .await,
        "w-1 did not re-attach"
    );
    worker.process().terminate().await;
    assert!(
        Instant::now() < before + WAIT,
        "too slow: the worker stopped after the due time"
    );
    stack.start_worker("w-2");

    let requests = stack.receiver.wait_for(runs.len(), TIMEOUT).await;
    assert_none_early(&stack, &requests, before);
    for done in completed(&mut stack, &runs).await {
        assert_eq!(done.steps[1].worker, "w-2", "{}", run_summary(&done));
        assert_eq!(done.steps[1].attempts, 1, "{}", run_summary(&done));
    }
    assert_eq!(
        stack.receiver.count(),
        runs.len(),
        "{}",
        stack.receiver.summary()
    );
}

/// A worker's stream ends while it holds a send ahead (it keeps the send, to go out at its
/// due time), and the run is cancelled meanwhile: the last check before the due time
/// cannot reach the worker, so the revoke is kept and sent when the worker re-attaches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_for_a_worker_away_reaches_it_when_it_re_attaches() {
    let mut stack = Stack::start(NODE, &["--hand-out-ahead", "3s"], &[]).await;
    let yaml = "name: away\nsteps:\n  - {id: pause, wait: 5s}\n  \
                - {id: greet, action: send_message, channel: crm}\n";
    stack.apply(yaml).await;
    let worker = RawWorker::attach_holding_ahead(&stack, "raw-away", &["crm"], 8).await;
    let mut worker = Some(worker);
    let run_id = stack
        .enroll("away", contact("c-4001", &[], &[]), &request_id())
        .await
        .run_id;
    let task = worker.as_mut().expect("attached").task().await;
    assert_eq!(task.run_id, run_id);
    assert!(task.delay_ms > 0, "not handed out ahead: {task:?}");

    drop(worker.take());
    let detached = eventually(TIMEOUT, || {
        let log = stack.scheduler.process().log();
        async move { log.contains("worker disconnected worker=raw-away") }
    })
    .await;
    assert!(detached, "{}", stack.scheduler.process().log_tail(20));
    stack
        .client
        .runs
        .cancel_run(CancelRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .expect("CancelRun");
    let kept = eventually(TIMEOUT, || {
        let log = stack.scheduler.process().log();
        async move { log.contains("steps handed out ahead revoked before they were due") }
    })
    .await;
    assert!(kept, "{}", stack.scheduler.process().log_tail(20));

    let mut again = RawWorker::attach_holding_ahead(&stack, "raw-away", &["crm"], 8).await;
    match again.message().await {
        scheduler_message::Kind::Revoke(revoke) => {
            assert_eq!(
                (revoke.run_id.as_str(), revoke.fencing_token),
                (run_id.as_str(), task.fencing_token)
            );
        }
        other => panic!("expected the kept Revoke, got {other:?}"),
    }
}
