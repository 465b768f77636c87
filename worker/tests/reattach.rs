//! A stream that breaks while deliveries run, against a real gRPC `WorkerService` on
//! 127.0.0.1 that plays the scheduler and refuses attaches for a while: a delivery that
//! finishes while no stream is open keeps its result, the next stream sends it first,
//! right after Hello, and heartbeats the tasks still held.

// Test helpers, like tests, fail by panicking (clippy.toml only covers `#[test]` bodies).
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use touchpoint_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use touchpoint_proto::v1::{
    Contact, Outcome, SchedulerMessage, Task, Welcome, WorkerMessage, scheduler_message,
    worker_message,
};
use touchpoint_worker::WorkerConfig;

type Outbox = mpsc::UnboundedSender<Result<SchedulerMessage, Status>>;

/// What the worker sent: the stream it came on (1, 2, ...) and the message.
type Inbox = mpsc::UnboundedReceiver<(usize, worker_message::Kind)>;

#[derive(Clone)]
struct Service {
    /// While set, attaches are refused (the scheduler is "down").
    refusing: Arc<AtomicBool>,
    attached: Arc<std::sync::atomic::AtomicUsize>,
    messages: mpsc::UnboundedSender<(usize, worker_message::Kind)>,
    streams: mpsc::UnboundedSender<Outbox>,
}

#[tonic::async_trait]
impl WorkerService for Service {
    type AttachStream = UnboundedReceiverStream<Result<SchedulerMessage, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        if self.refusing.load(Ordering::SeqCst) {
            return Err(Status::unavailable("down for the test"));
        }
        let stream = self.attached.fetch_add(1, Ordering::SeqCst) + 1;
        let mut inbound = request.into_inner();
        let (outbox, tasks) = mpsc::unbounded_channel();
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
                    let _ = messages.send((stream, kind));
                }
            }
        });
        self.streams.send(outbox).unwrap();
        Ok(Response::new(UnboundedReceiverStream::new(tasks)))
    }
}

async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("timed out")
}

/// A webhook receiver at `/<name>` for each name, each holding its requests until its
/// `Notify` is signalled; `arrived` gets the name of every request as it comes in.
async fn held_receiver(
    names: &[&str],
) -> (String, Vec<Arc<Notify>>, mpsc::UnboundedReceiver<String>) {
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    let mut app = axum::Router::new();
    let mut releases = Vec::new();
    for name in names {
        let release = Arc::new(Notify::new());
        releases.push(Arc::clone(&release));
        let arrived_tx = arrived_tx.clone();
        let name = (*name).to_owned();
        app = app.route(
            &format!("/{name}"),
            axum::routing::post(move || {
                let release = Arc::clone(&release);
                let _ = arrived_tx.send(name.clone());
                async move {
                    release.notified().await;
                    "ok"
                }
            }),
        );
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, releases, arrived)
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let refusing = Arc::new(AtomicBool::new(false));
    let (messages, mut inbox): (_, Inbox) = mpsc::unbounded_channel();
    let (streams, mut streams_rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(Service {
                refusing: Arc::clone(&refusing),
                attached: Arc::default(),
                messages,
                streams,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let (base, releases, mut arrived) = held_receiver(&["fast", "slow"]).await;
    let text = format!(
        "server = {server:?}\nconcurrency = 4\nworker_id = \"w-1\"\n\
         [[channel]]\nname = \"fast\"\nkind = \"webhook\"\nurl = \"{base}/fast\"\n\
         [[channel]]\nname = \"slow\"\nkind = \"webhook\"\nurl = \"{base}/slow\"\n"
    );
    let config = WorkerConfig::from_toml(&text, |_| None).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(touchpoint_worker::run(config, async move {
        let _ = stopped.await;
    }));

    // Stream 1: both tasks reach their receivers and are held there.
    let first = within(streams_rx.recv()).await.unwrap();
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
    let _second = within(streams_rx.recv()).await.unwrap();
    let mut next_on_second = async || loop {
        let (stream, message) = within(inbox.recv()).await.unwrap();
        if stream == 2 {
            break message;
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
        match within(inbox.recv()).await.unwrap() {
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
        if let (2, worker_message::Kind::Result(result)) = within(inbox.recv()).await.unwrap() {
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
