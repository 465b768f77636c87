//! `touchpoint.v1.WorkerService`: the long-lived stream each worker holds.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use touchpoint_proto::v1::{
    RetryDefaults, SchedulerMessage, Welcome, WorkerMessage, scheduler_message, worker_message,
    worker_service_server::WorkerService,
};
use tracing::{info, warn};

use super::status::invalid_field;
use crate::{engine::Engine, playbook::RetryOverrides};

/// Most tasks one worker may ask to hold at once.
const MAX_CAPACITY: u32 = 10_000;

/// Accepts worker streams and feeds their results to the engine.
#[derive(Debug, Clone)]
pub(crate) struct WorkerApi {
    engine: Arc<Engine>,
}

impl WorkerApi {
    /// The service feeding `engine`.
    pub(crate) fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<SchedulerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    type AttachStream = TaskStream;

    async fn attach(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?;
        let Some(WorkerMessage {
            kind: Some(worker_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message on a worker stream must be Hello",
            ));
        };
        if hello.worker_id.is_empty() {
            return Err(invalid_field("hello.worker_id", "required"));
        }
        if hello.capacity == 0 || hello.capacity > MAX_CAPACITY {
            return Err(invalid_field(
                "hello.capacity",
                format!("expected 1 to {MAX_CAPACITY}"),
            ));
        }
        let capacity = usize::try_from(hello.capacity).unwrap_or(1);
        // Room for every task the worker may hold plus the welcome.
        let (sender, receiver) = mpsc::channel(capacity + 1);
        let welcome = SchedulerMessage {
            kind: Some(scheduler_message::Kind::Welcome(Welcome {
                scheduler_id: self.engine.scheduler_id().to_owned(),
            })),
        };
        sender
            .send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("worker went away"))?;
        info!(worker = %hello.worker_id, channels = ?hello.channels, capacity = hello.capacity, "worker connected");
        let worker_id = hello.worker_id.clone();
        let channel_retry = retry_defaults(&hello.channel_retry)?;
        let connection =
            self.engine
                .workers()
                .register(hello.worker_id, hello.channels, hello.capacity, sender);
        self.engine
            .workers()
            .set_channel_retry(connection, channel_retry);
        // Before any of its messages is read: its buffered results and heartbeats may be
        // for steps it held on an earlier stream.
        self.engine.on_worker_attached(connection, &worker_id);
        self.engine.nudge();
        let engine = Arc::clone(&self.engine);
        let stopped = self.engine.shutdown_token().clone();
        tokio::spawn(async move {
            loop {
                // At shutdown stop reading too: dropping our half resets the stream, so
                // a worker still sending cannot hold the server's graceful shutdown.
                let message = tokio::select! {
                    () = stopped.cancelled() => break,
                    message = inbound.message() => message,
                };
                if let Ok(Some(_)) = &message {
                    engine.workers().heard_from(connection);
                }
                match message {
                    Ok(Some(WorkerMessage {
                        kind: Some(worker_message::Kind::Result(result)),
                    })) => {
                        engine.on_result(connection, result);
                    }
                    Ok(Some(WorkerMessage {
                        kind: Some(worker_message::Kind::Heartbeat(heartbeat)),
                    })) => {
                        engine.on_heartbeat(connection, heartbeat);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        info!(worker = %worker_id, "worker disconnected");
                        break;
                    }
                    Err(status) => {
                        warn!(worker = %worker_id, error = %status.message(), "worker stream failed");
                        break;
                    }
                }
            }
            engine.on_worker_gone(connection);
            engine.nudge();
        });
        // The stream ends when the scheduler stops, so the worker re-attaches elsewhere
        // and the server's graceful shutdown is not held up by it.
        let tasks = ReceiverStream::new(receiver)
            .take_until(self.engine.shutdown_token().clone().cancelled_owned());
        Ok(Response::new(Box::pin(tasks)))
    }
}

/// The retry defaults a worker announced; 0 leaves a field to the scheduler's default.
fn retry_defaults(
    announced: &std::collections::HashMap<String, RetryDefaults>,
) -> Result<std::collections::HashMap<String, RetryOverrides>, Status> {
    let millis = |ms: u64| (ms > 0).then(|| std::time::Duration::from_millis(ms));
    announced
        .iter()
        .map(|(channel, defaults)| {
            if defaults.max_attempts > 100 {
                return Err(invalid_field(
                    &format!("hello.channel_retry.{channel}.max_attempts"),
                    format!("{} (expected 1 to 100)", defaults.max_attempts),
                ));
            }
            let overrides = RetryOverrides {
                max_attempts: (defaults.max_attempts > 0).then_some(defaults.max_attempts),
                initial: millis(defaults.initial_ms),
                max: millis(defaults.max_ms),
            };
            Ok((channel.clone(), overrides))
        })
        .collect()
}
