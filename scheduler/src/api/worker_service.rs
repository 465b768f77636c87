//! `touchpoint.v1.WorkerService`: the long-lived stream each worker holds.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt as _};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use touchpoint_proto::v1::{
    Peer, Peers, RateLimit, RetryDefaults, SchedulerMessage, Welcome, WorkerMessage,
    scheduler_message, worker_message, worker_service_server::WorkerService,
};
use touchpoint_proto::{MAX_HOLD_AHEAD, MAX_WORKER_CAPACITY};
use tracing::{info, warn};

use super::status::invalid_field;
use crate::{
    engine::Engine,
    playbook::RetryOverrides,
    store::{Member, Rate},
};

/// Accepts worker streams and feeds their results to the engine.
#[derive(Debug, Clone)]
pub(crate) struct WorkerApi {
    engine: Arc<Engine>,
    /// The live schedulers, told to every worker (`Peers`).
    members: watch::Receiver<Vec<Member>>,
}

impl WorkerApi {
    /// The service feeding `engine`, telling workers the schedulers in `members`.
    pub(crate) fn new(engine: Arc<Engine>, members: watch::Receiver<Vec<Member>>) -> Self {
        Self { engine, members }
    }
}

/// The live schedulers as `Peers` messages: the current ones, then each change (none
/// while nobody is known yet, e.g. before the first renewal).
fn peer_messages(
    members: watch::Receiver<Vec<Member>>,
) -> impl Stream<Item = Result<SchedulerMessage, Status>> {
    futures::stream::unfold((members, true), |(mut members, first)| async move {
        if !first {
            members.changed().await.ok()?;
        }
        let peers = members
            .borrow_and_update()
            .iter()
            .map(|m| Peer {
                id: m.id.clone(),
                address: m.address.clone(),
            })
            .collect();
        let message = SchedulerMessage {
            kind: Some(scheduler_message::Kind::Peers(Peers { peers })),
        };
        Some((Ok(message), (members, false)))
    })
    .filter(|message| {
        let empty = matches!(message, Ok(SchedulerMessage { kind: Some(scheduler_message::Kind::Peers(p)) }) if p.peers.is_empty());
        std::future::ready(!empty)
    })
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
        if hello.capacity == 0 || hello.capacity > MAX_WORKER_CAPACITY {
            return Err(invalid_field(
                "hello.capacity",
                format!("expected 1 to {MAX_WORKER_CAPACITY}"),
            ));
        }
        if let Some((channel, _)) = hello.channel_capacity.iter().find(|(_, n)| **n == 0) {
            return Err(invalid_field(
                &format!("hello.channel_capacity[{channel:?}]"),
                "expected at least 1",
            ));
        }
        let hold_ahead = hello.hold_ahead.min(MAX_HOLD_AHEAD);
        // Room for every task the worker may hold, and as many revokes.
        let capacity = usize::try_from(hello.capacity.saturating_add(hold_ahead.saturating_mul(2)))
            .unwrap_or(1);
        let (sender, receiver) = mpsc::channel(capacity);
        let welcome = SchedulerMessage {
            kind: Some(scheduler_message::Kind::Welcome(Welcome {
                scheduler_id: self.engine.scheduler_id().to_owned(),
            })),
        };
        info!(worker = %hello.worker_id, channels = ?hello.channels, capacity = hello.capacity, "worker connected");
        let worker_id = hello.worker_id.clone();
        let channel_retry = retry_defaults(&hello.channel_retry)?;
        let channel_rate = rate_limits(&hello.channel_rate)?;
        let connection = self.engine.workers().register(
            hello.worker_id,
            hello.channels,
            (hello.capacity, hold_ahead),
            &hello.channel_capacity,
            sender,
        );
        self.engine
            .workers()
            .set_channel_retry(connection, channel_retry);
        self.engine
            .workers()
            .set_channel_rate(connection, channel_rate);
        // Before any of its messages is read: its buffered results and heartbeats may be
        // for steps it held on an earlier stream.
        self.engine.on_worker_attached(connection, &worker_id);
        self.engine.nudge();
        let engine = Arc::clone(&self.engine);
        let stopped = self.engine.shutdown_token().clone();
        // Cancelled once the worker's half of the stream has ended.
        let worker_gone = CancellationToken::new();
        let reader_done = worker_gone.clone();
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
                        engine.on_heartbeat(heartbeat);
                    }
                    Ok(Some(WorkerMessage {
                        kind: Some(worker_message::Kind::Progress(progress)),
                    })) => {
                        engine.on_progress(progress);
                    }
                    Ok(Some(WorkerMessage {
                        kind: Some(worker_message::Kind::Share(share)),
                    })) => {
                        info!(worker = %worker_id, capacity = share.capacity, "worker's share of its slots");
                        engine.workers().set_share(
                            connection,
                            share.capacity,
                            &share.channel_capacity,
                            share.hold_ahead.min(MAX_HOLD_AHEAD),
                        );
                        engine.nudge();
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        info!(worker = %worker_id, "worker disconnected");
                        break;
                    }
                    Err(status) => {
                        warn!(worker = %worker_id, error = %touchpoint_proto::describe_status(&status), "worker stream failed");
                        break;
                    }
                }
            }
            engine.on_worker_gone(connection);
            engine.nudge();
            reader_done.cancel();
        });
        // The stream ends when the scheduler stops, so the worker re-attaches elsewhere
        // and the server's graceful shutdown is not held up by it; and once the worker
        // closed its half (it stops, and waits for this end to know that everything it
        // sent arrived).
        let shutdown = self.engine.shutdown_token().clone();
        let ended = async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = worker_gone.cancelled() => {}
            }
        };
        // Welcome first, then tasks and the live schedulers as they come.
        let tasks = futures::stream::once(std::future::ready(Ok(welcome)))
            .chain(futures::stream::select(
                ReceiverStream::new(receiver),
                peer_messages(self.members.clone()),
            ))
            .take_until(ended);
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

/// The rate limits a worker announced: a positive rate; a burst of 0 means one second's
/// worth (at least 1).
fn rate_limits(
    announced: &std::collections::HashMap<String, RateLimit>,
) -> Result<std::collections::HashMap<String, Rate>, Status> {
    announced
        .iter()
        .map(|(channel, limit)| {
            if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
                return Err(invalid_field(
                    &format!("hello.channel_rate.{channel}.per_second"),
                    format!("{} (expected more than 0)", limit.per_second),
                ));
            }
            let burst = if limit.burst > 0 {
                limit.burst
            } else {
                // Saturates at u32::MAX for an absurd rate.
                (limit.per_second.floor() as u32).max(1)
            };
            let rate = Rate {
                per_second: limit.per_second,
                burst,
            };
            Ok((channel.clone(), rate))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announced(per_second: f64, burst: u32) -> std::collections::HashMap<String, RateLimit> {
        std::collections::HashMap::from([("sms".to_owned(), RateLimit { per_second, burst })])
    }

    #[test]
    fn announced_rates_need_a_positive_rate_and_default_the_burst() {
        let rates = rate_limits(&announced(2.5, 0)).unwrap();
        assert_eq!(
            rates["sms"],
            Rate {
                per_second: 2.5,
                burst: 2
            }
        );
        let rates = rate_limits(&announced(0.01, 0)).unwrap();
        assert_eq!(rates["sms"].burst, 1);
        assert_eq!(rate_limits(&announced(10.0, 3)).unwrap()["sms"].burst, 3);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let status = rate_limits(&announced(bad, 1)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
