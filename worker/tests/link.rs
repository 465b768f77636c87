//! The worker's scheduler link against a real gRPC `WorkerService` on 127.0.0.1 that
//! plays the scheduler: Hello, Welcome, Tasks, TaskResults, re-attach, drain.

// Test helpers, like tests, fail by panicking (clippy.toml only covers `#[test]` bodies).
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;
use touchpoint_proto::v1::{Contact, Outcome, SchedulerMessage, Task, scheduler_message};
use touchpoint_worker::WorkerConfig;

use common::{FakeScheduler as Scheduler, held_hook, within};

fn task(run_id: &str, channel: &str) -> Result<SchedulerMessage, Status> {
    Ok(SchedulerMessage {
        kind: Some(scheduler_message::Kind::Task(Task {
            run_id: run_id.to_owned(),
            fencing_token: 42,
            playbook: "welcome-new-customer".to_owned(),
            version: 1,
            step_id: "coupon".to_owned(),
            action: "send_message".to_owned(),
            channel: channel.to_owned(),
            attempt: 1,
            message: "welcome".to_owned(),
            params_json: r#"{"coupon":"WELCOME10"}"#.to_owned(),
            contact: Some(Contact {
                id: "c-1".to_owned(),
                ..Contact::default()
            }),
            idempotency_key: format!("{run_id}:coupon"),
            traceparent: String::new(),
            deadline_ms: 0,
            step_deadline_ms: 0,
            resume_state: String::new(),
            delay_ms: 0,
        })),
    })
}

/// A running worker and the switch that stops it.
struct Worker {
    stop: oneshot::Sender<()>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    fn start(config: WorkerConfig) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let handle = tokio::spawn(touchpoint_worker::run(config, shutdown));
        Self { stop, handle }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        within(self.handle).await.unwrap().unwrap();
    }
}

fn config_with_held_webhook(server: &str, url: &str) -> WorkerConfig {
    let text = format!(
        "server = {server:?}\nconcurrency = 4\n\
         [[channel]]\nname = \"crm\"\nkind = \"webhook\"\nurl = {url:?}\n\
         [[channel]]\nname = \"console\"\nkind = \"log\"\n"
    );
    WorkerConfig::from_toml(&text, |_| None).unwrap()
}

#[tokio::test]
async fn says_hello_then_reports_each_task() {
    let (mut scheduler, server) = Scheduler::start().await;
    let mut config = WorkerConfig::console(&server, &["console", "wecom"]);
    for channel in &mut config.channels {
        channel.concurrency = 4;
    }
    config.worker_id = Some("worker-a".to_owned());
    let worker = Worker::start(config);

    let (hello, outbox) = scheduler.attached().await;
    assert_eq!(hello.worker_id, "worker-a");
    assert_eq!(hello.channels, ["console", "wecom"]);
    assert_eq!(hello.capacity, 8, "the sum of its channels' slots");
    let per_channel: std::collections::BTreeMap<_, _> =
        hello.channel_capacity.into_iter().collect();
    assert_eq!(
        per_channel,
        [("console".to_owned(), 4), ("wecom".to_owned(), 4)].into()
    );

    outbox.send(task("run-1", "console")).unwrap();
    let result = scheduler.result().await;
    assert_eq!(
        (
            result.run_id.as_str(),
            result.fencing_token,
            result.outcome()
        ),
        ("run-1", 42, Outcome::Ok)
    );
    assert_eq!(result.detail, "printed");

    outbox.send(task("run-2", "sms")).unwrap();
    let result = scheduler.result().await;
    assert_eq!(result.run_id, "run-2");
    assert_eq!(result.outcome(), Outcome::Permanent);
    assert_eq!(
        result.detail,
        "channel sms is not configured on this worker"
    );

    worker.stop().await;
}

#[tokio::test]
async fn a_slow_delivery_does_not_hold_up_the_others() {
    let (mut scheduler, server) = Scheduler::start().await;
    let (url, release) = held_hook().await;
    let worker = Worker::start(config_with_held_webhook(&server, &url));
    let (_, outbox) = scheduler.attached().await;

    outbox.send(task("slow", "crm")).unwrap();
    outbox.send(task("fast", "console")).unwrap();
    assert_eq!(scheduler.result().await.run_id, "fast");

    release.notify_one();
    let result = scheduler.result().await;
    assert_eq!(result.run_id, "slow");
    assert_eq!(
        (result.outcome(), result.detail.as_str()),
        (Outcome::Ok, "HTTP 200")
    );

    worker.stop().await;
}

#[tokio::test]
async fn reattaches_when_the_scheduler_closes_the_stream() {
    let (mut scheduler, server) = Scheduler::start().await;
    let worker = Worker::start(WorkerConfig::console(&server, &["console"]));

    let (first, outbox) = scheduler.attached().await;
    drop(outbox);
    let (second, outbox) = scheduler.attached().await;
    assert_eq!(first.worker_id, second.worker_id);

    outbox.send(task("run-1", "console")).unwrap();
    assert_eq!(scheduler.result().await.outcome(), Outcome::Ok);

    worker.stop().await;
}

#[tokio::test]
async fn waits_for_a_scheduler_that_is_not_up_yet() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    let worker = Worker::start(WorkerConfig::console(
        &format!("http://{address}"),
        &["console"],
    ));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut scheduler = Scheduler::serve(TcpListener::bind(address).await.unwrap());
    let (hello, _outbox) = scheduler.attached().await;
    assert_eq!(hello.channels, ["console"]);

    worker.stop().await;
}

#[tokio::test]
async fn shutdown_waits_for_in_flight_deliveries_to_report() {
    let (mut scheduler, server) = Scheduler::start().await;
    let (url, release) = held_hook().await;
    let Worker { stop, mut handle } = Worker::start(config_with_held_webhook(&server, &url));
    let (_, outbox) = scheduler.attached().await;

    outbox.send(task("run-1", "crm")).unwrap();
    // Let the delivery reach the receiver, then ask the worker to stop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(()).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut handle)
            .await
            .is_err(),
        "the worker stopped with a delivery in flight"
    );

    release.notify_one();
    let result = scheduler.result().await;
    assert_eq!(
        (result.run_id.as_str(), result.outcome()),
        ("run-1", Outcome::Ok)
    );
    within(handle).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_server_address_that_is_not_a_url_is_refused() {
    let config = WorkerConfig::console("not a url", &["console"]);
    let error = touchpoint_worker::run(config, std::future::pending())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("invalid server address"),
        "{error}"
    );
}

fn ahead(run_id: &str, delay_ms: u64) -> Result<SchedulerMessage, Status> {
    let mut message = task(run_id, "console")?;
    if let Some(scheduler_message::Kind::Task(task)) = &mut message.kind {
        task.delay_ms = delay_ms;
    }
    Ok(message)
}

/// A task handed out ahead waits for its delay (a task due now does not wait behind
/// it), and one revoked before then is dropped without a result.
#[tokio::test]
async fn a_task_handed_out_ahead_waits_for_its_time_unless_revoked() {
    let (mut scheduler, server) = Scheduler::start().await;
    let worker = Worker::start(WorkerConfig::console(&server, &["console"]));
    let (hello, outbox) = scheduler.attached().await;
    assert_eq!(
        hello.hold_ahead,
        touchpoint_worker::config::DEFAULT_HOLD_AHEAD
    );

    let sent = std::time::Instant::now();
    outbox.send(ahead("later", 800)).unwrap();
    outbox.send(ahead("revoked", 800)).unwrap();
    outbox.send(task("now", "console")).unwrap();
    outbox
        .send(Ok(SchedulerMessage {
            kind: Some(scheduler_message::Kind::Revoke(
                touchpoint_proto::v1::Revoke {
                    run_id: "revoked".to_owned(),
                    fencing_token: 42,
                },
            )),
        }))
        .unwrap();

    assert_eq!(scheduler.result().await.run_id, "now");
    let later = scheduler.result().await;
    assert_eq!(
        (later.run_id.as_str(), later.outcome()),
        ("later", Outcome::Ok)
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(800),
        "delivered {:?} after it was sent, before its delay",
        sent.elapsed()
    );
    let more = tokio::time::timeout(Duration::from_secs(1), scheduler.result()).await;
    assert!(more.is_err(), "the revoked task was delivered: {more:?}");

    worker.stop().await;
}

/// A worker that stops while it holds a task ahead hands it back unstarted: retryable
/// after the rest of its delay (the scheduler takes that as never started).
#[tokio::test]
async fn a_stopping_worker_hands_back_what_it_holds_ahead() {
    let (mut scheduler, server) = Scheduler::start().await;
    let worker = Worker::start(WorkerConfig::console(&server, &["console"]));
    let (_, outbox) = scheduler.attached().await;

    outbox.send(ahead("held", 10_000)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(worker.stop());
    let result = scheduler.result().await;
    assert_eq!(
        (
            result.run_id.as_str(),
            result.outcome(),
            result.detail.as_str()
        ),
        (
            "held",
            Outcome::Retryable,
            "the worker stopped before the step was due"
        )
    );
    assert!(
        (8_000..10_000).contains(&result.retry_after_ms),
        "retry after {} ms, expected the rest of the delay",
        result.retry_after_ms
    );
    within(stopping).await.unwrap();
}
