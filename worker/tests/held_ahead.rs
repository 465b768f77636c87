//! `touchpoint_worker_held_ahead` counts the tasks a worker holds ahead of their due time:
//! up while they wait, down when one is revoked and when they go out. (Its own test
//! binary: the gauge is process-wide, and other tests hold tasks ahead too.)

// Test helpers, like tests, fail by panicking (clippy.toml only covers `#[test]` bodies).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use tonic::Status;
use touchpoint_proto::metrics::metrics;
use touchpoint_proto::v1::{Contact, Revoke, SchedulerMessage, Task, scheduler_message};
use touchpoint_worker::WorkerConfig;

use common::{FakeScheduler, start_worker, within};

fn ahead(run_id: &str, delay_ms: u64) -> Result<SchedulerMessage, Status> {
    Ok(SchedulerMessage {
        kind: Some(scheduler_message::Kind::Task(Task {
            run_id: run_id.to_owned(),
            fencing_token: 7,
            playbook: "p".to_owned(),
            version: 1,
            step_id: "greet".to_owned(),
            action: "send_message".to_owned(),
            channel: "console".to_owned(),
            attempt: 1,
            contact: Some(Contact {
                id: "c-1".to_owned(),
                ..Contact::default()
            }),
            idempotency_key: format!("{run_id}:greet"),
            delay_ms,
            ..Task::default()
        })),
    })
}

async fn held_becomes(expected: i64) {
    let gauge = &metrics().worker.held_ahead;
    within(async {
        while gauge.get() != expected {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn the_gauge_counts_tasks_held_ahead_until_they_go_out_or_are_revoked() {
    let (mut scheduler, server) = FakeScheduler::start().await;
    let (stop, worker) = start_worker(WorkerConfig::console(&server, &["console"]));
    let (_, outbox) = scheduler.attached().await;

    for run_id in ["a", "b", "c"] {
        outbox.send(ahead(run_id, 1500)).unwrap();
    }
    held_becomes(3).await;
    let revoke = Revoke {
        run_id: "b".to_owned(),
        fencing_token: 7,
    };
    outbox
        .send(Ok(SchedulerMessage {
            kind: Some(scheduler_message::Kind::Revoke(revoke)),
        }))
        .unwrap();
    held_becomes(2).await;

    let mut sent = vec![
        scheduler.result().await.run_id,
        scheduler.result().await.run_id,
    ];
    sent.sort();
    assert_eq!(sent, ["a", "c"]);
    held_becomes(0).await;

    stop.send(()).unwrap();
    within(worker).await.unwrap().unwrap();
}
