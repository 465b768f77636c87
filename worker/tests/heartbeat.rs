//! Lease heartbeats, against a real gRPC `WorkerService` on 127.0.0.1 that plays the
//! scheduler: while a delivery runs longer than a third of its lease, the worker sends
//! `Heartbeat`s listing the task, at least every second; none once the result is sent,
//! none for a task without a deadline; and they go on while the worker drains at shutdown.

// Test helpers, like tests, fail by panicking (clippy.toml only covers `#[test]` bodies).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use tonic::Status;
use touchpoint_proto::v1::{Contact, SchedulerMessage, Task, scheduler_message, worker_message};
use touchpoint_worker::WorkerConfig;

use common::{FakeScheduler, held_hook, now_ms, start_worker, within};

fn config(server: &str, url: &str) -> WorkerConfig {
    let text = format!(
        "server = {server:?}\nconcurrency = 4\n\
         [[channel]]\nname = \"crm\"\nkind = \"webhook\"\nurl = {url:?}\n"
    );
    WorkerConfig::from_toml(&text, |_| None).unwrap()
}

/// A task on `crm` whose lease ends `lease_ms` from now (0: no deadline).
fn task(run_id: &str, fencing_token: u64, lease_ms: i64) -> Result<SchedulerMessage, Status> {
    Ok(SchedulerMessage {
        kind: Some(scheduler_message::Kind::Task(Task {
            run_id: run_id.to_owned(),
            fencing_token,
            playbook: "p".to_owned(),
            version: 1,
            step_id: "greet".to_owned(),
            action: "send_message".to_owned(),
            channel: "crm".to_owned(),
            attempt: 1,
            contact: Some(Contact {
                id: "c-1".to_owned(),
                ..Contact::default()
            }),
            idempotency_key: format!("{run_id}.greet"),
            deadline_ms: if lease_ms == 0 {
                0
            } else {
                now_ms() + lease_ms
            },
            ..Task::default()
        })),
    })
}

/// The heartbeats' (run id, fence) lists and arrival times until the first result.
async fn heartbeats_until_result(
    scheduler: &mut FakeScheduler,
) -> Vec<(Instant, Vec<(String, u64)>)> {
    let mut beats = Vec::new();
    loop {
        let received = scheduler.next().await;
        match (received.at, received.kind) {
            (at, worker_message::Kind::Heartbeat(beat)) => {
                let mut tasks: Vec<(String, u64)> = beat
                    .tasks
                    .into_iter()
                    .map(|t| (t.run_id, t.fencing_token))
                    .collect();
                tasks.sort();
                beats.push((at, tasks));
            }
            (_, worker_message::Kind::Result(_)) => return beats,
            // (Its share of the slots, after attaching.)
            (_, worker_message::Kind::Share(_)) => {}
            (_, other) => panic!("unexpected message {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_long_delivery_is_heartbeated_every_third_of_its_lease_until_it_reports() {
    let (mut scheduler, server) = FakeScheduler::start().await;
    let (url, release) = held_hook().await;
    let (stop, worker) = start_worker(config(&server, &url));
    let (_, outbox) = scheduler.attached().await;

    let sent = Instant::now();
    outbox.send(task("run-1", 7, 900)).unwrap();
    outbox.send(task("run-2", 3, 30_000)).unwrap();
    outbox.send(task("run-3", 5, 0)).unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // One held request answered: which run it was does not matter here.
    release.notify_one();
    let beats = heartbeats_until_result(&mut scheduler).await;

    // run-1's lease is 900 ms: a heartbeat every ~300 ms, each listing both leased tasks.
    assert!(beats.len() >= 3, "{beats:?}");
    let both = vec![("run-1".to_owned(), 7), ("run-2".to_owned(), 3)];
    for (_, tasks) in &beats[..3] {
        assert_eq!(tasks, &both);
    }
    let first = beats[0].0.duration_since(sent);
    assert!(
        first >= Duration::from_millis(250) && first < Duration::from_millis(700),
        "first heartbeat after {first:?}"
    );
    for pair in beats.windows(2) {
        let gap = pair[1].0.duration_since(pair[0].0);
        assert!(gap < Duration::from_millis(600), "gap {gap:?}: {beats:?}");
    }

    // Shutdown with two deliveries still held: heartbeats go on while the worker drains.
    let stopped_at = Instant::now();
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    release.notify_one();
    release.notify_one();
    let mut draining = Vec::new();
    let mut results = 0;
    while results < 2 {
        let received = scheduler.next().await;
        match (received.at, received.kind) {
            (at, worker_message::Kind::Heartbeat(beat)) => draining.push((at, beat.tasks.len())),
            (_, worker_message::Kind::Result(_)) => results += 1,
            (_, other) => panic!("unexpected message {other:?}"),
        }
    }
    assert!(
        draining
            .iter()
            .any(|(at, n)| *at > stopped_at + Duration::from_millis(200) && *n >= 1),
        "no heartbeat while draining: {draining:?}"
    );
    within(worker).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Nothing was held any more: no heartbeat followed the last result.
    assert!(
        scheduler.messages.try_recv().is_err(),
        "a message after the last result"
    );
}
