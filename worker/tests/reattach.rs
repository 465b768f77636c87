//! A stream that breaks while deliveries run, against a real gRPC `WorkerService` on
//! 127.0.0.1 that plays the scheduler and refuses attaches for a while: a delivery that
//! finishes while no stream is open keeps its result, the next stream sends it first,
//! right after Hello, and heartbeats the tasks still held.

// Test helpers, like tests, fail by panicking (clippy.toml only covers `#[test]` bodies).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::Status;
use touchpoint_proto::v1::{
    Contact, Outcome, SchedulerMessage, Task, scheduler_message, worker_message,
};
use touchpoint_worker::WorkerConfig;

use common::{FakeScheduler, held_receiver, now_ms, start_worker, within};

/// A task on `channel` whose lease ends 30 s from now (heartbeated every second).
fn task(run_id: &str, channel: &str) -> Result<SchedulerMessage, Status> {
    Ok(SchedulerMessage {
        kind: Some(scheduler_message::Kind::Task(Task {
            run_id: run_id.to_owned(),
            fencing_token: 42,
            playbook: "p".to_owned(),
            version: 1,
            step_id: "greet".to_owned(),
            action: "send_message".to_owned(),
            channel: channel.to_owned(),
            attempt: 1,
            contact: Some(Contact {
                id: "c-1".to_owned(),
                ..Contact::default()
            }),
            idempotency_key: format!("{run_id}.greet"),
            deadline_ms: now_ms() + 30_000,
            ..Task::default()
        })),
    })
}

#[tokio::test]
async fn a_result_finished_while_the_link_is_down_goes_first_on_the_next_stream() {
    let (mut scheduler, server) = FakeScheduler::start().await;
    let refusing = std::sync::Arc::clone(&scheduler.refusing);
    let (base, releases, mut arrived) = held_receiver(&["fast", "slow"]).await;
    let text = format!(
        "server = {server:?}\nconcurrency = 4\nworker_id = \"w-1\"\n\
         [[channel]]\nname = \"fast\"\nkind = \"webhook\"\nurl = \"{base}/fast\"\n\
         [[channel]]\nname = \"slow\"\nkind = \"webhook\"\nurl = \"{base}/slow\"\n"
    );
    let config = WorkerConfig::from_toml(&text, |_| None).unwrap();
    let (stop, worker) = start_worker(config);

    // Stream 1: both tasks reach their receivers and are held there.
    let first = within(scheduler.streams.recv()).await.unwrap();
    first.send(task("run-fast", "fast")).unwrap();
    first.send(task("run-slow", "slow")).unwrap();
    let mut names = vec![
        within(arrived.recv()).await.unwrap(),
        within(arrived.recv()).await.unwrap(),
    ];
    names.sort();
    assert_eq!(names, ["fast", "slow"]);

    // The scheduler goes away; the fast delivery finishes while no stream is open.
    refusing.store(true, Ordering::SeqCst);
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    releases[0].notify_one();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The scheduler is back: the kept result is the first message after Hello.
    refusing.store(false, Ordering::SeqCst);
    let _second = within(scheduler.streams.recv()).await.unwrap();
    let mut next_on_second = async || loop {
        let received = scheduler.next().await;
        if received.stream == 2 {
            break received.kind;
        }
    };
    let hello = next_on_second().await;
    assert!(
        matches!(&hello, worker_message::Kind::Hello(h) if h.worker_id == "w-1"),
        "{hello:?}"
    );
    let message = next_on_second().await;
    let worker_message::Kind::Result(result) = message else {
        panic!("expected the kept result right after Hello, got {message:?}");
    };
    assert_eq!(
        (
            result.run_id.as_str(),
            result.fencing_token,
            result.outcome()
        ),
        ("run-fast", 42, Outcome::Ok)
    );

    // The slow delivery is still held: the new stream heartbeats it.
    let beat = loop {
        let received = scheduler.next().await;
        match (received.stream, received.kind) {
            (2, worker_message::Kind::Heartbeat(beat)) => break beat,
            (2, worker_message::Kind::Result(r)) => panic!("unexpected result {r:?}"),
            _ => {}
        }
    };
    let listed: Vec<(&str, u64)> = beat
        .tasks
        .iter()
        .map(|t| (t.run_id.as_str(), t.fencing_token))
        .collect();
    assert_eq!(listed, [("run-slow", 42)]);

    // And its result goes out on the new stream too.
    releases[1].notify_one();
    let result = loop {
        let received = scheduler.next().await;
        if let (2, worker_message::Kind::Result(result)) = (received.stream, received.kind) {
            break result;
        }
    };
    assert_eq!(
        (result.run_id.as_str(), result.outcome()),
        ("run-slow", Outcome::Ok)
    );

    stop.send(()).unwrap();
    within(worker).await.unwrap().unwrap();
}
