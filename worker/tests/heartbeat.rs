//! Lease heartbeats, against a real gRPC `WorkerService` on 127.0.0.1 that plays the
//! scheduler: while a delivery runs longer than a third of its lease, the worker sends
//! `Heartbeat`s listing the task, at least every second; none once the result is sent,
//! none for a task without a deadline; and they go on while the worker drains at shutdown.

// Test helpers, like tests, fail by panicking (clippy.toml only covers `#[test]` bodies).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use touchpoint_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use touchpoint_proto::v1::{
    Contact, SchedulerMessage, Task, Welcome, WorkerMessage, scheduler_message, worker_message,
};
use touchpoint_worker::WorkerConfig;

type Outbox = mpsc::UnboundedSender<Result<SchedulerMessage, Status>>;

/// What the worker sent after Hello, with when it arrived.
type Inbox = mpsc::UnboundedReceiver<(Instant, worker_message::Kind)>;

#[derive(Clone)]
struct Service {
    messages: mpsc::UnboundedSender<(Instant, worker_message::Kind)>,
    streams: mpsc::UnboundedSender<Outbox>,
}

#[tonic::async_trait]
impl WorkerService for Service {
    type AttachStream = UnboundedReceiverStream<Result<SchedulerMessage, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let Some(worker_message::Kind::Hello(_)) =
            inbound.message().await?.and_then(|message| message.kind)
        else {
            return Err(Status::invalid_argument("Hello must come first"));
        };
        let (outbox, stream) = mpsc::unbounded_channel();
        outbox
            .send(Ok(SchedulerMessage {
                kind: Some(scheduler_message::Kind::Welcome(Welcome {
                    scheduler_id: "test-scheduler".to_owned(),
                })),
            }))
            .unwrap();
        let messages = self.messages.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(kind) = message.kind {
                    let _ = messages.send((Instant::now(), kind));
                }
            }
        });
        self.streams.send(outbox).unwrap();
        Ok(Response::new(UnboundedReceiverStream::new(stream)))
    }
}

/// Serves a fake scheduler; returns its address, the worker's messages and its streams.
async fn scheduler() -> (String, Inbox, mpsc::UnboundedReceiver<Outbox>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let (messages, inbox) = mpsc::unbounded_channel();
    let (streams, streams_rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(Service { messages, streams }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (server, inbox, streams_rx)
}

/// A webhook receiver that holds every request until the test releases it.
async fn held_receiver() -> (String, Arc<Notify>) {
    let release = Arc::new(Notify::new());
    let held = Arc::clone(&release);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let held = Arc::clone(&held);
            async move {
                held.notified().await;
                "ok"
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, release)
}

fn config(server: &str, url: &str) -> WorkerConfig {
    let text = format!(
        "server = {server:?}\nconcurrency = 4\n\
         [[channel]]\nname = \"crm\"\nkind = \"webhook\"\nurl = {url:?}\n"
    );
    WorkerConfig::from_toml(&text, |_| None).unwrap()
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
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

async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("timed out")
}

/// The heartbeats' (run id, fence) lists and arrival times until the first result.
async fn heartbeats_until_result(inbox: &mut Inbox) -> Vec<(Instant, Vec<(String, u64)>)> {
    let mut beats = Vec::new();
    loop {
        match within(inbox.recv()).await.unwrap() {
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
            (_, other) => panic!("unexpected message {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_long_delivery_is_heartbeated_every_third_of_its_lease_until_it_reports() {
    let (server, mut inbox, mut streams) = scheduler().await;
    let (url, release) = held_receiver().await;
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(touchpoint_worker::run(config(&server, &url), async move {
        let _ = stopped.await;
    }));
    let outbox = within(streams.recv()).await.unwrap();

    let sent = Instant::now();
    outbox.send(task("run-1", 7, 900)).unwrap();
    outbox.send(task("run-2", 3, 30_000)).unwrap();
    outbox.send(task("run-3", 5, 0)).unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    // One held request answered: which run it was does not matter here.
    release.notify_one();
    let beats = heartbeats_until_result(&mut inbox).await;

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
        match within(inbox.recv()).await.unwrap() {
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
    assert!(inbox.try_recv().is_err(), "a message after the last result");
}
