//! What the worker's integration tests share: a fake scheduler (a real gRPC
//! `WorkerService` on 127.0.0.1), a webhook receiver that holds requests, and helpers.

// Each test file uses a part of this module.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use touchpoint_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use touchpoint_proto::v1::{
    Hello, SchedulerMessage, TaskResult, Welcome, WorkerMessage, scheduler_message, worker_message,
};
use touchpoint_worker::WorkerConfig;

/// The sending side of one stream: the test sends Tasks on it and closes the stream by
/// dropping it.
pub(crate) type Outbox = mpsc::UnboundedSender<Result<SchedulerMessage, Status>>;

/// A message the worker sent: on which stream (1, 2, ...), when, and what.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) stream: usize,
    pub(crate) at: Instant,
    pub(crate) kind: worker_message::Kind,
}

#[derive(Clone)]
struct Service {
    refusing: Arc<AtomicBool>,
    attached: Arc<AtomicUsize>,
    messages: mpsc::UnboundedSender<Received>,
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
        let mut inbound = request.into_inner();
        let Some(hello @ worker_message::Kind::Hello(_)) =
            inbound.message().await?.and_then(|message| message.kind)
        else {
            return Err(Status::invalid_argument("Hello must come first"));
        };
        let stream = self.attached.fetch_add(1, Ordering::SeqCst) + 1;
        let received = move |kind| Received {
            stream,
            at: Instant::now(),
            kind,
        };
        self.messages.send(received(hello)).unwrap();
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
                    let _ = messages.send(received(kind));
                }
            }
        });
        self.streams.send(outbox).unwrap();
        Ok(Response::new(UnboundedReceiverStream::new(tasks)))
    }
}

/// The test's view of the scheduler.
pub(crate) struct FakeScheduler {
    /// While set, attaches are refused, as if the scheduler were down.
    pub(crate) refusing: Arc<AtomicBool>,
    /// Everything the worker sent, Hello included.
    pub(crate) messages: mpsc::UnboundedReceiver<Received>,
    /// The sending side of each stream, in the order the worker attached.
    pub(crate) streams: mpsc::UnboundedReceiver<Outbox>,
}

impl FakeScheduler {
    /// Serves on `listener` until the test ends.
    pub(crate) fn serve(listener: TcpListener) -> Self {
        let refusing = Arc::new(AtomicBool::new(false));
        let (messages, messages_rx) = mpsc::unbounded_channel();
        let (streams, streams_rx) = mpsc::unbounded_channel();
        let service = Service {
            refusing: Arc::clone(&refusing),
            attached: Arc::default(),
            messages,
            streams,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(service))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self {
            refusing,
            messages: messages_rx,
            streams: streams_rx,
        }
    }

    /// Serves on a free port; returns the scheduler and its `http://` address.
    pub(crate) async fn start() -> (Self, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        (Self::serve(listener), server)
    }

    /// The next message the worker sent.
    pub(crate) async fn next(&mut self) -> Received {
        within(self.messages.recv()).await.unwrap()
    }

    /// The next worker to attach: its Hello and the stream to send it tasks on.
    pub(crate) async fn attached(&mut self) -> (Hello, Outbox) {
        let hello = loop {
            if let worker_message::Kind::Hello(hello) = self.next().await.kind {
                break hello;
            }
        };
        let outbox = within(self.streams.recv()).await.unwrap();
        (hello, outbox)
    }

    /// The next result the worker reported.
    pub(crate) async fn result(&mut self) -> TaskResult {
        loop {
            if let worker_message::Kind::Result(result) = self.next().await.kind {
                return result;
            }
        }
    }
}

/// Runs a worker until the returned switch is flipped.
pub(crate) fn start_worker(
    config: WorkerConfig,
) -> (oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(touchpoint_worker::run(config, async move {
        let _ = stopped.await;
    }));
    (stop, handle)
}

/// A webhook receiver at `/<name>` for each name, each holding its requests until its
/// `Notify` is signalled; `arrived` gets the name of every request as it comes in.
pub(crate) async fn held_receiver(
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

/// `future`, or a panic after 10 s.
pub(crate) async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("timed out")
}

/// Wall-clock milliseconds, as task deadlines use.
pub(crate) fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// A receiver with one route, `/hook`: its URL and the switch that answers one request.
pub(crate) async fn held_hook() -> (String, Arc<Notify>) {
    let (base, mut releases, _) = held_receiver(&["hook"]).await;
    (format!("{base}/hook"), releases.remove(0))
}
