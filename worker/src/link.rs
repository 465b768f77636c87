//! The scheduler links: one long-lived `WorkerService.Attach` stream per scheduler,
//! each re-attached forever.
//!
//! The worker attaches to the scheduler it is configured with, which tells it the live
//! schedulers (`Peers`, after Welcome and whenever they change); it attaches to each of
//! them too, one attach loop per advertised address, and drops a loop whose scheduler
//! has been absent from `Peers` and unreachable for [`ABSENT_FOR`]. A scheduler reached
//! through two addresses (the configured one and its advertised one) gets one stream.
//!
//! On each stream the worker says Hello (id, channels, capacity), waits for Welcome, then
//! receives Tasks; each runs in its own tokio task, bounded by the per-channel slots that
//! every stream shares, so a slow receiver never holds up a stream and the worker never
//! delivers more at once than its channels' `concurrency`, however many schedulers hand
//! it tasks. Results go back on the stream the task came on, or on any open one (see
//! `outbox`); while it holds Tasks the worker sends Heartbeats that keep their leases
//! (see `heartbeat`). Deliveries outlive the stream they came on. Prost types stop here:
//! adapters see [`Delivery`].
//!
//! A task handed out ahead of its due time (`delay_ms`, at most `hold_ahead` of them)
//! waits here, unheartbeated, and starts when the delay is over, unless a `Revoke`
//! drops it first; a worker that stops meanwhile hands it back (a retryable result
//! before its due time, which the scheduler takes as "never started").

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use rand::Rng as _;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinError, JoinSet};
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::Endpoint;
use touchpoint_proto::MAX_WORKER_CAPACITY;
use touchpoint_proto::metrics::{ChannelLabels, DeliveryLabels, metrics};
use touchpoint_proto::security::{self, BearerToken, ClientTls};
use touchpoint_proto::telemetry::continue_trace;
use touchpoint_proto::v1::worker_service_client::WorkerServiceClient;
use touchpoint_proto::v1::{
    self as pb, Hello, Outcome, Peer, RetryDefaults, SchedulerMessage, Task, TaskProgress,
    TaskResult, WorkerMessage, scheduler_message, worker_message,
};
use tracing::{Instrument as _, debug, error, field::Empty, info, info_span, warn};

use crate::channel::{self, Contact, Delivered, Delivery, Progress, Registry};
use crate::config::{ChannelRetry, WorkerConfig};
use crate::heartbeat::{self, HeldTasks};
use crate::outbox::{Outbox, StreamId};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the scheduler may take to answer Hello.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight deliveries to report.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A scheduler absent from `Peers` this long, and not attached to, is let go.
const ABSENT_FOR: Duration = Duration::from_secs(30);
/// The stream of the configured scheduler.
const SEED: StreamId = 0;

/// A worker's side of the streams: what it announces and what it delivers with.
#[derive(Debug)]
pub(crate) struct Link {
    /// The configured scheduler's address: attached to for as long as the worker runs.
    seed: String,
    /// How to reach every scheduler (TLS settings of the configured one).
    tls: ClientTls,
    /// Sent on every attach; its `Debug` is redacted.
    token: Option<BearerToken>,
    hello: Hello,
    registry: Registry,
    /// One permit per delivery in flight, per channel (a hanging provider holds only
    /// its own channel's); shared by every stream so that several schedulers, or
    /// re-attaching while old deliveries still run, never exceed a channel's
    /// `concurrency`.
    slots: HashMap<String, Arc<Semaphore>>,
    /// The tasks received and not reported yet, whichever stream they came on: their
    /// heartbeats keep their leases across re-attaches.
    held: HeldTasks,
    /// Results go out through it; it keeps them while no stream is open.
    outbox: Outbox,
    /// Tasks handed out ahead, waiting for their due time: (run id, fencing token) →
    /// what drops them on a `Revoke`.
    waiting: Arc<Mutex<HashMap<(String, u64), CancellationToken>>>,
    /// The scheduler each open stream is attached to: scheduler id → (stream, the
    /// token that stops its attach loop).
    attached: Mutex<HashMap<String, (StreamId, CancellationToken)>>,
    /// The id of the next attach loop's stream (never reused).
    next_stream: AtomicU64,
}

/// An open stream: messages go out through `results`, tasks come in on `tasks`.
struct Attached {
    scheduler_id: String,
    results: mpsc::UnboundedSender<WorkerMessage>,
    tasks: Streaming<SchedulerMessage>,
}

impl Attached {
    /// Ends the stream in order: closes the worker's half, which goes out after every
    /// message queued on it (the results of a stopping worker's last deliveries and
    /// hand-backs), and waits up to [`CLOSE_TIMEOUT`] for the scheduler to close its
    /// half. Dropping the stream instead resets it, and what was still queued is lost.
    async fn close(mut self) {
        // The outbox let go of its sender (`detach`); this was the other one.
        self.results = mpsc::unbounded_channel().0;
        let closed = async {
            while let Ok(Some(_)) = self.tasks.message().await {
                // Tasks that come now stay unread (see the main loop).
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, closed).await.is_err() {
            debug!("the scheduler did not close its half of the stream in time");
        }
    }
}

/// How long a stopping worker waits for a scheduler to close its half of the stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the streams hand to the worker's main loop.
enum Received {
    /// A task, and the stream it came on.
    Task(Box<Task>, StreamId),
    /// The live schedulers, as one of them sees them.
    Peers(Vec<Peer>),
    /// Drop a task handed out ahead that has not started.
    Revoke(pb::Revoke),
}

/// An attach loop to a scheduler learned from `Peers`.
struct PeerLoop {
    stream: StreamId,
    stop: CancellationToken,
    task: AbortHandle,
    /// When `Peers` last listed it.
    listed_at: Instant,
}

/// What every attach loop shares.
#[derive(Clone)]
struct Loops {
    received: mpsc::UnboundedSender<Received>,
    /// No more tasks are taken (the worker is stopping).
    shutdown: CancellationToken,
    /// Streams close (in-flight deliveries have reported or were given up).
    closing: CancellationToken,
}

impl Link {
    pub(crate) fn new(config: &WorkerConfig, registry: Registry) -> anyhow::Result<Self> {
        // Fails early on an address or TLS setting that cannot work.
        endpoint(&config.server, &config.tls)?;
        let hello = Hello {
            worker_id: config.resolved_worker_id(),
            channels: registry.names(),
            capacity: config
                .channels
                .iter()
                .map(|c| c.concurrency)
                .fold(0, u32::saturating_add)
                .min(MAX_WORKER_CAPACITY),
            channel_capacity: config
                .channels
                .iter()
                .map(|c| (c.name.clone(), c.concurrency))
                .collect(),
            channel_retry: config
                .channels
                .iter()
                .filter(|c| c.retry != ChannelRetry::default())
                .map(|c| (c.name.clone(), retry_defaults(&c.retry)))
                .collect(),
            channel_rate: config
                .channels
                .iter()
                .filter_map(|c| {
                    let rate = c.rate?;
                    let limit = pb::RateLimit {
                        per_second: rate.per_second,
                        burst: rate.burst,
                    };
                    Some((c.name.clone(), limit))
                })
                .collect::<HashMap<_, _>>(),
            hold_ahead: config.hold_ahead,
        };
        Ok(Self {
            seed: config.server.clone(),
            tls: config.tls.clone(),
            token: config.token.clone(),
            hello,
            registry,
            slots: config
                .channels
                .iter()
                .map(|c| {
                    let slots = Semaphore::new(c.concurrency as usize);
                    (c.name.clone(), Arc::new(slots))
                })
                .collect(),
            held: HeldTasks::default(),
            outbox: Outbox::default(),
            waiting: Arc::default(),
            attached: Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(SEED + 1),
        })
    }

    /// Attaches to the configured scheduler and to every scheduler it tells of, and
    /// serves their tasks until `shutdown`; then waits (bounded) for in-flight
    /// deliveries to report, with the streams still open.
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        info!(
            worker_id = %self.hello.worker_id,
            channels = ?self.hello.channels,
            capacity = self.hello.capacity,
            "worker starting"
        );
        let link = Arc::new(self);
        let (received, mut incoming) = mpsc::unbounded_channel();
        let loops = Loops {
            received,
            shutdown: shutdown.clone(),
            closing: CancellationToken::new(),
        };
        // Deliveries and attach loops live here, not in a stream, so deliveries survive
        // a re-attach; dropping the sets (when `run` is dropped) aborts whatever runs.
        let mut deliveries = JoinSet::new();
        let mut attach_loops = JoinSet::new();
        attach_loops.spawn(Arc::clone(&link).attach_loop(
            SEED,
            link.seed.clone(),
            loops.clone(),
            CancellationToken::new(),
        ));
        let mut peers: HashMap<String, PeerLoop> = HashMap::new();
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                // Tasks received from now on stay unread; the schedulers hand them out
                // again when their leases expire.
                () = shutdown.cancelled() => break,
                Some(received) = incoming.recv() => match received {
                    Received::Task(task, stream) => {
                        link.start(*task, stream, &shutdown, &mut deliveries);
                    }
                    Received::Revoke(revoke) => {
                        let key = (revoke.run_id, revoke.fencing_token);
                        if let Some(waiting) = lock(&link.waiting).remove(&key) {
                            debug!(run_id = %key.0, "task revoked before its due time");
                            waiting.cancel();
                        }
                    }
                    Received::Peers(listed) => {
                        for peer in listed {
                            link.on_peer(&peer, &mut peers, &mut attach_loops, &loops);
                        }
                    }
                },
                Some(finished) = deliveries.join_next(), if !deliveries.is_empty() => {
                    report_panic(finished);
                }
                Some(_) = attach_loops.join_next(), if !attach_loops.is_empty() => {}
                () = link.held.due() => send_heartbeats(&link.held, &link.outbox),
                _ = sweep.tick() => link.let_go_of_absent(&mut peers),
            }
        }
        // The streams stay open meanwhile, so results still reach the schedulers.
        tokio::select! {
            () = drain(&mut deliveries) => {}
            () = keep_beating(&link.held, &link.outbox) => {}
        }
        loops.closing.cancel();
        while attach_loops.join_next().await.is_some() {}
    }

    /// A scheduler listed in `Peers`: starts an attach loop to its address unless one
    /// runs, it is the configured address, or a stream is attached to it already.
    fn on_peer(
        self: &Arc<Self>,
        peer: &Peer,
        peers: &mut HashMap<String, PeerLoop>,
        attach_loops: &mut JoinSet<()>,
        loops: &Loops,
    ) {
        if peer.address.is_empty() {
            return;
        }
        let address = peer_url(&self.seed, &peer.address);
        if let Some(known) = peers.get_mut(&address).filter(|p| !p.task.is_finished()) {
            known.listed_at = Instant::now();
            return;
        }
        if address == self.seed || lock(&self.attached).contains_key(&peer.id) {
            return;
        }
        let stream = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let stop = CancellationToken::new();
        info!(scheduler_id = %peer.id, %address, "attaching to another scheduler");
        let task = attach_loops.spawn(Arc::clone(self).attach_loop(
            stream,
            address.clone(),
            loops.clone(),
            stop.clone(),
        ));
        let listed_at = Instant::now();
        peers.insert(
            address,
            PeerLoop {
                stream,
                stop,
                task,
                listed_at,
            },
        );
    }

    /// Stops the attach loops of schedulers not listed for [`ABSENT_FOR`] and not
    /// attached to (gone for good, or restarted under another address).
    fn let_go_of_absent(&self, peers: &mut HashMap<String, PeerLoop>) {
        let attached: Vec<StreamId> = lock(&self.attached).values().map(|(s, _)| *s).collect();
        peers.retain(|address, peer| {
            let absent = peer.listed_at.elapsed() >= ABSENT_FOR;
            let gone = absent && !attached.contains(&peer.stream);
            if gone {
                info!(%address, "no longer attaching to a scheduler that is gone");
                peer.stop.cancel();
            }
            !gone && !peer.task.is_finished()
        });
    }

    /// Attaches to `address` as stream `stream` and serves it, re-attaching with backoff
    /// whenever it ends, until the worker shuts down (then keeps the stream open until
    /// `closing`) or `stop`.
    async fn attach_loop(
        self: Arc<Self>,
        stream: StreamId,
        address: String,
        loops: Loops,
        stop: CancellationToken,
    ) {
        let endpoint = match endpoint(&address, &self.tls) {
            Ok(endpoint) => endpoint,
            Err(error) => {
                warn!(%address, error = %describe_error(&error), "cannot attach to a scheduler at this address");
                return;
            }
        };
        let mut backoff = Backoff::default();
        let mut told = false;
        loop {
            let attached = tokio::select! {
                () = loops.shutdown.cancelled() => return,
                () = stop.cancelled() => return,
                attached = self.attach(&endpoint) => attached,
            };
            let lost = match attached {
                Ok(mut attached) => {
                    if !self.claim(&attached.scheduler_id, stream, &stop) {
                        // Attached to through another address already: this one goes.
                        drop(attached);
                        return;
                    }
                    backoff.reset();
                    told = false;
                    // Results kept while the link was down go first.
                    self.outbox.attach(stream, attached.results.clone());
                    self.count_streams();
                    let served = self.serve(stream, &mut attached, &loops, &stop).await;
                    let closing = served.is_ok() && loops.shutdown.is_cancelled();
                    if closing {
                        // Results of the deliveries still running go on this stream.
                        loops.closing.cancelled().await;
                    }
                    self.outbox.detach(stream);
                    if closing {
                        attached.close().await;
                    }
                    lock(&self.attached).retain(|_, (s, _)| *s != stream);
                    self.count_streams();
                    match served {
                        Ok(()) => return,
                        Err(lost) => lost,
                    }
                }
                Err(error) => error,
            };
            let delay = backoff.next_delay();
            // Once per outage, and each time while the worker has no stream at all.
            if !told || (stream == SEED && self.outbox.open_streams() == 0) {
                warn!(
                    %address,
                    error = %describe_error(&lost),
                    retry_in_ms = delay.as_millis(),
                    "scheduler link down; re-attaching"
                );
            }
            told = true;
            tokio::select! {
                () = loops.shutdown.cancelled() => return,
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Records that `stream` is attached to `scheduler_id`. The configured scheduler's
    /// stream takes over from a stream of another address that reached the same
    /// scheduler (that loop stops); any other stream gives way (`false`).
    fn claim(&self, scheduler_id: &str, stream: StreamId, stop: &CancellationToken) -> bool {
        let mut attached = lock(&self.attached);
        match attached.get(scheduler_id) {
            Some((other, _)) if *other == stream => true,
            Some((_, other_stop)) if stream == SEED => {
                other_stop.cancel();
                attached.insert(scheduler_id.to_owned(), (stream, stop.clone()));
                true
            }
            Some((other, _)) => {
                let other = *other;
                drop(attached);
                debug!(
                    scheduler_id,
                    "already attached to this scheduler through another address"
                );
                // Our Hello made the scheduler set the other stream aside until it
                // hears from it again.
                self.outbox
                    .send_now(heartbeat::message(pb::Heartbeat::default()), other);
                false
            }
            None => {
                attached.insert(scheduler_id.to_owned(), (stream, stop.clone()));
                true
            }
        }
    }

    /// Counts the open streams and tells each scheduler its share of the slots.
    fn count_streams(&self) {
        let streams = self.outbox.open_streams();
        let open = i64::try_from(streams).unwrap_or(i64::MAX);
        metrics().worker.scheduler_connected.set(open);
        if streams > 0 {
            let share = share(&self.hello, u32::try_from(streams).unwrap_or(u32::MAX));
            self.outbox.send_to_each(&WorkerMessage {
                kind: Some(worker_message::Kind::Share(share)),
            });
        }
    }

    /// Connects, sends Hello and waits for Welcome.
    async fn attach(&self, endpoint: &Endpoint) -> anyhow::Result<Attached> {
        let channel = endpoint
            .connect()
            .await
            .context("cannot connect to the scheduler")?;
        let mut client = WorkerServiceClient::new(channel)
            .max_decoding_message_size(touchpoint_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(touchpoint_proto::MAX_MESSAGE_BYTES);
        // Unbounded: at most `concurrency` results wait in it (plus, right after attaching,
        // those the outbox kept: at most 10,000), and a delivery must never block on a
        // stream that is going away.
        let (results, outbox) = mpsc::unbounded_channel();
        let hello = WorkerMessage {
            kind: Some(worker_message::Kind::Hello(self.hello.clone())),
        };
        let outgoing = tokio_stream::iter([hello]).chain(UnboundedReceiverStream::new(outbox));
        let mut request = tonic::Request::new(outgoing);
        if let Some(token) = &self.token {
            token.apply(request.metadata_mut());
        }
        let mut tasks = client
            .attach(request)
            .await
            .map_err(|status| {
                anyhow::anyhow!(
                    "attach refused: {}",
                    touchpoint_proto::describe_status(&status)
                )
            })?
            .into_inner();
        let first = tokio::time::timeout(WELCOME_TIMEOUT, tasks.message())
            .await
            .context("no Welcome from the scheduler")?
            .map_err(|status| {
                anyhow::anyhow!(
                    "stream failed: {}",
                    touchpoint_proto::describe_status(&status)
                )
            })?;
        match first.and_then(|message| message.kind) {
            Some(scheduler_message::Kind::Welcome(welcome)) => {
                info!(scheduler_id = %welcome.scheduler_id, "attached to the scheduler");
                Ok(Attached {
                    scheduler_id: welcome.scheduler_id,
                    results,
                    tasks,
                })
            }
            Some(_) => bail!("expected Welcome first"),
            None => bail!("the scheduler closed the stream before Welcome"),
        }
    }

    /// Hands each task and `Peers` to the main loop until the stream ends (an error),
    /// the worker shuts down or `stop` (`Ok`).
    async fn serve(
        &self,
        stream: StreamId,
        attached: &mut Attached,
        loops: &Loops,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            let message = tokio::select! {
                () = loops.shutdown.cancelled() => return Ok(()),
                () = stop.cancelled() => return Ok(()),
                message = attached.tasks.message() => message,
            };
            let received = match message {
                Ok(Some(SchedulerMessage {
                    kind: Some(scheduler_message::Kind::Task(task)),
                })) => Received::Task(Box::new(task), stream),
                Ok(Some(SchedulerMessage {
                    kind: Some(scheduler_message::Kind::Peers(peers)),
                })) => Received::Peers(peers.peers),
                Ok(Some(SchedulerMessage {
                    kind: Some(scheduler_message::Kind::Revoke(revoke)),
                })) => Received::Revoke(revoke),
                Ok(Some(_)) => {
                    debug!("ignoring an unexpected scheduler message");
                    continue;
                }
                Ok(None) => bail!("the scheduler closed the stream"),
                Err(status) => bail!(
                    "stream failed: {}",
                    touchpoint_proto::describe_status(&status)
                ),
            };
            if loops.received.send(received).is_err() {
                return Ok(());
            }
        }
    }

    /// Runs one task, which came on `stream`, in its own tokio task and hands its result
    /// to the outbox (sent on that stream or another open one, or kept for the next
    /// one); the task is heartbeated from when it may start until then. A task handed
    /// out ahead first waits out its `delay_ms` (see the module doc).
    fn start(
        &self,
        mut task: Task,
        stream: StreamId,
        shutdown: &CancellationToken,
        deliveries: &mut JoinSet<()>,
    ) {
        let ahead = self.wait_ahead(&task, stream, shutdown);
        let hold = ahead.is_none().then(|| self.held.hold(&task, stream));
        let span = info_span!(
            "deliver",
            otel.name = %format!("process {}", task.channel),
            otel.kind = "consumer",
            messaging.system = "touchpoint",
            messaging.operation.type = "process",
            messaging.destination.name = %task.channel,
            touchpoint.playbook = %task.playbook,
            touchpoint.version = task.version,
            touchpoint.step = %task.step_id,
            touchpoint.channel = %task.channel,
            touchpoint.attempt = task.attempt,
            touchpoint.run_id = %task.run_id,
            touchpoint.outcome = Empty,
            run_id = %task.run_id,
            step = %task.step_id,
            channel = %task.channel,
            attempt = task.attempt,
            trace_id = Empty,
            span_id = Empty,
        );
        // Adapters continue the delivery's span (their calls, the receiver).
        task.traceparent = continue_trace(&span, &task.traceparent);
        let recorded = span.clone();
        let adapter = self.registry.get(&task.channel).cloned();
        let slots = self.slots.get(&task.channel).cloned();
        let outbox = self.outbox.clone();
        let held = self.held.clone();
        let delivery = async move {
            let _hold = match ahead {
                None => hold,
                Some(ahead) => {
                    if !ahead.wait().await {
                        return;
                    }
                    Some(held.hold(&task, stream))
                }
            };
            // The semaphores are never closed, so this only waits for a free slot. A
            // channel this worker does not serve has none: it fails at once below.
            let _slot = match slots {
                Some(slots) => match slots.acquire_owned().await {
                    Ok(slot) => Some(slot),
                    Err(_) => return,
                },
                None => None,
            };
            let (run_id, fencing_token) = (task.run_id.clone(), task.fencing_token);
            let progress = progress_sink(&outbox, stream, &run_id, fencing_token);
            let m = &metrics().worker;
            let channel_labels = ChannelLabels {
                channel: task.channel.clone(),
            };
            m.deliveries_in_flight.inc();
            let started = std::time::Instant::now();
            let channel_name = task.channel.clone();
            let outcome = match adapter {
                Some(adapter) => {
                    let delivery = delivery_from_task(task, progress);
                    if delivery.past_step_deadline() {
                        Err(channel::Error::skipped("deadline passed before delivery"))
                    } else {
                        adapter.deliver(&delivery).await
                    }
                }
                None => Err(channel::Error::permanent(format!(
                    "channel {} is not configured on this worker",
                    task.channel
                ))),
            };
            m.deliveries_in_flight.dec();
            m.delivery_duration
                .get_or_create(&channel_labels)
                .observe(started.elapsed().as_secs_f64());
            let counted = outcome_name(&outcome);
            m.deliveries
                .get_or_create(&DeliveryLabels {
                    channel: channel_name,
                    outcome: counted,
                })
                .inc();
            if matches!(&outcome, Err(error) if error.is_rate_limited()) {
                m.rate_limited.get_or_create(&channel_labels).inc();
            }
            recorded.record("touchpoint.outcome", counted);
            log_outcome(&outcome);
            // The stream the task came on if it is still open, else any open one, or
            // the next one.
            outbox.send(task_result(run_id, fencing_token, &outcome), stream);
        };
        deliveries.spawn(delivery.instrument(span));
    }
}

/// One of `streams` schedulers' share of what `hello` announced: each count divided
/// among them, rounded up (at least 1 where there was any).
fn share(hello: &Hello, streams: u32) -> pb::Share {
    let part = |n: u32| n.div_ceil(streams.max(1));
    pb::Share {
        capacity: part(hello.capacity),
        channel_capacity: hello
            .channel_capacity
            .iter()
            .map(|(channel, n)| (channel.clone(), part(*n)))
            .collect(),
        hold_ahead: part(hello.hold_ahead),
    }
}

/// A task handed out ahead, waiting for its due time.
struct Ahead {
    until: Instant,
    key: (String, u64),
    revoked: CancellationToken,
    shutdown: CancellationToken,
    waiting: Arc<Mutex<HashMap<(String, u64), CancellationToken>>>,
    outbox: Outbox,
    stream: StreamId,
    _counted: HeldAhead,
}

/// Counts a task in `touchpoint_worker_held_ahead` for as long as it waits.
struct HeldAhead;

impl HeldAhead {
    fn count() -> Self {
        metrics().worker.held_ahead.inc();
        Self
    }
}

impl Drop for HeldAhead {
    fn drop(&mut self) {
        metrics().worker.held_ahead.dec();
    }
}

impl Ahead {
    /// Waits until the task is due: `true` then, `false` when it was revoked or handed
    /// back because the worker stops.
    async fn wait(self) -> bool {
        let started = tokio::select! {
            () = tokio::time::sleep_until(self.until) => true,
            () = self.revoked.cancelled() => return false,
            () = self.shutdown.cancelled() => false,
        };
        lock(&self.waiting).remove(&self.key);
        if !started {
            let left = self.until.saturating_duration_since(Instant::now());
            let (run_id, fencing_token) = self.key;
            let result = TaskResult {
                run_id,
                fencing_token,
                outcome: Outcome::Retryable.into(),
                detail: "the worker stopped before the step was due".to_owned(),
                retry_after_ms: u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
                rate_limited: false,
            };
            self.outbox.send(result, self.stream);
        }
        started
    }
}

impl Link {
    /// For a task handed out ahead (`delay_ms` > 0): registers it as waiting.
    fn wait_ahead(
        &self,
        task: &Task,
        stream: StreamId,
        shutdown: &CancellationToken,
    ) -> Option<Ahead> {
        if task.delay_ms == 0 {
            return None;
        }
        let key = (task.run_id.clone(), task.fencing_token);
        let revoked = CancellationToken::new();
        lock(&self.waiting).insert(key.clone(), revoked.clone());
        Some(Ahead {
            until: Instant::now() + Duration::from_millis(task.delay_ms),
            key,
            revoked,
            shutdown: shutdown.clone(),
            waiting: Arc::clone(&self.waiting),
            outbox: self.outbox.clone(),
            stream,
            _counted: HeldAhead::count(),
        })
    }
}

/// The `outcome` label of a delivery.
fn outcome_name(outcome: &Result<Delivered, channel::Error>) -> &'static str {
    match outcome {
        Ok(_) => "ok",
        Err(channel::Error::Retryable { .. }) => "retryable",
        Err(channel::Error::Skipped { .. }) => "skipped",
        Err(_) => "permanent",
    }
}

/// Progress reports of one attempt that came on `stream`, sent on it or another open
/// stream (dropped if none).
fn progress_sink(outbox: &Outbox, stream: StreamId, run_id: &str, fencing_token: u64) -> Progress {
    let (outbox, run_id) = (outbox.clone(), run_id.to_owned());
    Progress::new(move |detail, state| {
        let progress = TaskProgress {
            run_id: run_id.clone(),
            fencing_token,
            detail: detail.to_owned(),
            state: state.to_owned(),
        };
        outbox.progress(progress, stream);
    })
}

/// The wire task as adapters see it. Params that are not a JSON object become `{}`.
fn delivery_from_task(task: Task, progress: Progress) -> Delivery {
    let params = match serde_json::from_str::<serde_json::Value>(&task.params_json) {
        Ok(params @ serde_json::Value::Object(_)) => params,
        _ => {
            if !task.params_json.trim().is_empty() {
                warn!("params_json is not a JSON object; delivering empty params");
            }
            serde_json::Value::Object(serde_json::Map::new())
        }
    };
    let contact = task.contact.map(contact_from_wire).unwrap_or_default();
    let deadline = wall_clock(task.deadline_ms);
    let step_deadline = wall_clock(task.step_deadline_ms);
    Delivery {
        run_id: task.run_id,
        playbook: task.playbook,
        version: task.version,
        step_id: task.step_id,
        action: task.action,
        channel: task.channel,
        attempt: task.attempt,
        message: task.message,
        params,
        contact,
        idempotency_key: task.idempotency_key,
        traceparent: task.traceparent,
        deadline,
        step_deadline,
        resume_state: task.resume_state,
        progress,
    }
}

/// A wire time (ms since the epoch; 0 = none).
fn wall_clock(ms: i64) -> Option<SystemTime> {
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

fn contact_from_wire(contact: pb::Contact) -> Contact {
    Contact {
        id: contact.id,
        attrs: contact.attrs.into_iter().collect(),
        tags: contact.tags,
        tz: contact.tz,
        identities: contact.identities.into_iter().collect(),
    }
}

fn task_result(
    run_id: String,
    fencing_token: u64,
    outcome: &Result<Delivered, channel::Error>,
) -> TaskResult {
    let rate_limited = matches!(outcome, Err(error) if error.is_rate_limited());
    let (outcome, detail, retry_after) = match outcome {
        Ok(delivered) => (Outcome::Ok, delivered.detail.clone(), None),
        Err(error @ channel::Error::Retryable { .. }) => (
            Outcome::Retryable,
            error.detail().to_owned(),
            error.retry_after(),
        ),
        Err(error @ channel::Error::Skipped { .. }) => {
            (Outcome::Skipped, error.detail().to_owned(), None)
        }
        Err(error) => (Outcome::Permanent, error.detail().to_owned(), None),
    };

    TaskResult {
        run_id,
        fencing_token,
        outcome: outcome.into(),
        detail,
        retry_after_ms: retry_after.map_or(0, |wait| {
            u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
        }),
        rate_limited,
    }
}

/// One line per delivery, inside the `deliver` span (run, step, channel, attempt).
fn log_outcome(outcome: &Result<Delivered, channel::Error>) {
    match outcome {
        Ok(delivered) => debug!(outcome = "ok", detail = %delivered.detail, "delivered"),
        Err(error) if error.is_retryable() => warn!(
            outcome = "retryable",
            detail = error.detail(),
            retry_after_ms = error.retry_after().map(|wait| wait.as_millis()),
            "delivery failed; the scheduler will retry"
        ),
        // No detail here: it may quote the receiver's answer, which can echo personal
        // data. It goes to the run timeline instead (`tp run get`).
        Err(_) => warn!(outcome = "permanent", "delivery failed for good"),
    }
}

fn report_panic(finished: Result<(), JoinError>) {
    if let Err(error) = finished
        && error.is_panic()
    {
        error!(
            "a delivery panicked; the scheduler hands its step out again when the lease expires"
        );
    }
}

/// Sends the heartbeats that are due (if still due) for the tasks held, each on the
/// stream its tasks came on, or another open one.
fn send_heartbeats(held: &HeldTasks, outbox: &Outbox) {
    for (stream, beat) in held.beat(Instant::now()) {
        // A closed stream is noticed by its attach loop; the next one heartbeats again.
        outbox.send_now(heartbeat::message(beat), stream);
    }
}

/// Sends heartbeats whenever they are due; never completes (deliveries that outlast
/// their lease during shutdown keep it, so their results still count).
async fn keep_beating(held: &HeldTasks, outbox: &Outbox) {
    loop {
        held.due().await;
        send_heartbeats(held, outbox);
    }
}

/// Waits up to [`DRAIN_TIMEOUT`] for in-flight deliveries. Those still running then are
/// aborted; the scheduler hands their steps out again when their leases expire.
async fn drain(deliveries: &mut JoinSet<()>) {
    if deliveries.is_empty() {
        return;
    }
    info!(
        in_flight = deliveries.len(),
        "waiting for in-flight deliveries"
    );
    let all_finished = async {
        while let Some(finished) = deliveries.join_next().await {
            report_panic(finished);
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, all_finished)
        .await
        .is_err()
    {
        warn!(
            in_flight = deliveries.len(),
            "gave up waiting for in-flight deliveries"
        );
        deliveries.abort_all();
    }
}

/// The attach endpoint of the scheduler at `server` (`http://` or `https://`).
fn endpoint(server: &str, tls: &ClientTls) -> anyhow::Result<Endpoint> {
    // Plaintext or TLS (with the client certificate for mutual TLS) by the URL's scheme.
    Ok(security::client_endpoint(server, tls)?
        .connect_timeout(CONNECT_TIMEOUT)
        // Room for a burst of small messages (see the constants' doc).
        .initial_connection_window_size(touchpoint_proto::CONNECTION_WINDOW_BYTES)
        .initial_stream_window_size(touchpoint_proto::STREAM_WINDOW_BYTES)
        // Notices a scheduler that vanished without closing the connection.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true))
}

/// The URL of a scheduler advertised as `address`: a URL as it is; `host:port` with the
/// scheme of the configured scheduler's URL `seed`.
fn peer_url(seed: &str, address: &str) -> String {
    if address.contains("://") {
        return address.to_owned();
    }
    let scheme = seed.split_once("://").map_or("http", |(scheme, _)| scheme);
    format!("{scheme}://{address}")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here is left half-updated by a panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The error and its root cause, without the layers in between (tonic and hyper repeat
/// themselves: "transport error: tcp connect error: tcp connect error: ...").
fn describe_error(error: &anyhow::Error) -> String {
    if error.chain().len() > 1 {
        format!("{error}: {}", error.root_cause())
    } else {
        error.to_string()
    }
}

/// Re-attach delays: 100ms doubling up to 2s, each with up to half taken off at random
/// so that workers of a restarted scheduler do not all come back at once.
#[derive(Debug)]
struct Backoff {
    step: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(2);

    fn reset(&mut self) {
        self.step = Self::FIRST;
    }

    fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(Self::MAX);
        step.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self { step: Self::FIRST }
    }
}

/// A channel's retry settings as announced in Hello (0: the scheduler's default).
fn retry_defaults(retry: &ChannelRetry) -> RetryDefaults {
    let millis =
        |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    RetryDefaults {
        max_attempts: retry.max_attempts.unwrap_or(0),
        initial_ms: millis(retry.initial),
        max_ms: millis(retry.max),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advertised_address_takes_the_configured_scheme() {
        assert_eq!(
            peer_url("https://scheduler:50051", "10.0.0.7:50051"),
            "https://10.0.0.7:50051"
        );
        assert_eq!(peer_url("http://a:1", "b:2"), "http://b:2");
        assert_eq!(peer_url("http://a:1", "https://b:2"), "https://b:2");
    }

    #[test]
    fn backoff_doubles_to_two_seconds_with_jitter() {
        let mut backoff = Backoff::default();
        let steps = [100, 200, 400, 800, 1600, 2000, 2000];
        for step in steps {
            let delay = backoff.next_delay();
            let step = Duration::from_millis(step);
            assert!(delay >= step / 2 && delay <= step, "{delay:?} for {step:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn each_scheduler_gets_its_share_rounded_up() {
        let hello = Hello {
            capacity: 5,
            channel_capacity: HashMap::from([("a".to_owned(), 3), ("b".to_owned(), 1)]),
            hold_ahead: 7,
            ..Hello::default()
        };
        let half = share(&hello, 2);
        assert_eq!((half.capacity, half.hold_ahead), (3, 4));
        assert_eq!(
            half.channel_capacity,
            HashMap::from([("a".to_owned(), 2), ("b".to_owned(), 1)])
        );
        assert_eq!(share(&hello, 1).capacity, 5, "one scheduler gets it all");
    }

    fn task(params_json: &str) -> Task {
        Task {
            run_id: "run-1".to_owned(),
            fencing_token: 7,
            playbook: "welcome-new-customer".to_owned(),
            version: 3,
            step_id: "coupon".to_owned(),
            action: "send_message".to_owned(),
            channel: "crm".to_owned(),
            attempt: 2,
            message: "欢迎".to_owned(),
            params_json: params_json.to_owned(),
            contact: Some(pb::Contact {
                id: "c-1001".to_owned(),
                attrs: HashMap::from([("name".to_owned(), "王芳".to_owned())]),
                tags: vec!["paid".to_owned()],
                tz: "Asia/Shanghai".to_owned(),
                identities: HashMap::from([("wecom".to_owned(), "wmXXXX".to_owned())]),
            }),
            idempotency_key: "run-1:coupon".to_owned(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            deadline_ms: 1_700_000_000_000,
            step_deadline_ms: 1_700_000_020_000,
            resume_state: "msgid-1".to_owned(),
            delay_ms: 0,
        }
    }

    #[test]
    fn a_task_becomes_a_delivery() {
        let delivery = delivery_from_task(task(r#"{"coupon":"WELCOME10"}"#), Progress::default());
        assert_eq!(delivery.params, serde_json::json!({"coupon": "WELCOME10"}));
        assert_eq!(delivery.contact.attrs["name"], "王芳");
        assert_eq!(delivery.contact.identities["wecom"], "wmXXXX");
        assert_eq!(delivery.attempt, 2);
        assert_eq!(delivery.idempotency_key, "run-1:coupon");
        assert_eq!(
            delivery.deadline,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_000))
        );
        assert_eq!(
            delivery.step_deadline,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_020_000))
        );
        assert!(delivery.past_step_deadline());
        assert_eq!(delivery.resume_state, "msgid-1");
    }

    #[test]
    fn params_that_are_not_a_json_object_become_empty() {
        for params_json in ["", "not json", "[1, 2]", "\"text\""] {
            let delivery = delivery_from_task(task(params_json), Progress::default());
            assert_eq!(delivery.params, serde_json::json!({}), "{params_json:?}");
        }
    }

    #[test]
    fn outcomes_become_task_results() {
        let ok = task_result("run-1".to_owned(), 7, &Ok(Delivered::new("HTTP 200")));
        assert_eq!(ok.outcome(), Outcome::Ok);
        assert_eq!((ok.detail.as_str(), ok.fencing_token), ("HTTP 200", 7));

        let busy = channel::Error::rate_limited("HTTP 429", Some(Duration::from_secs(7)));
        let retry = task_result("run-1".to_owned(), 7, &Err(busy));
        assert_eq!(retry.outcome(), Outcome::Retryable);
        assert_eq!(retry.retry_after_ms, 7000);
        assert!(retry.rate_limited);

        let rejected = task_result(
            "run-1".to_owned(),
            7,
            &Err(channel::Error::permanent("HTTP 400")),
        );
        assert_eq!(rejected.outcome(), Outcome::Permanent);
        assert_eq!(rejected.retry_after_ms, 0);
    }
}
