//! The engine: durable timers and the step life cycle.
//!
//! One timer loop per scheduler walks the partitions whose next due time has come,
//! claims their due steps in batches (`claim.lua`: expired leases go back to due, due
//! runs move into the lease set under a fresh fencing token), and for each claimed run
//! either settles it at once (a wait that elapsed, a step whose `if` is false, a step
//! with no worker to take it) or hands it to a worker. Workers' results come back
//! through [`Engine::on_result`] and are applied in batches per partition
//! (`complete.lua`), which schedules the next step in the same atomic call. Workers'
//! heartbeats extend the leases of what they still hold ([`Engine::on_heartbeat`],
//! `extend.lua`).
//!
//! Nothing lives only in memory: a scheduler killed at any point leaves every run
//! either due or leased in Redis, and leases expire back to due.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use touchpoint_proto::v1::{self, Outcome, SchedulerMessage, TaskResult, scheduler_message};
use tracing::{debug, info, warn};

use crate::{
    clock::now_ms,
    playbook::{Action, Playbook, RetryPolicy, StepKind},
    playbook_cache::{LoadError, LoadedPlaybook, PlaybookCache},
    run::{
        Next, RunStatus, StepOutcome, TimelineEntry, idempotency_key, next_step, partition_of_run,
        retry_delay,
    },
    store::{ClaimedRun, Completion, ContactRecord, Op, Store},
    trace,
    workers::{ConnectionId, NoWorker, Workers},
};

/// Tuning of the engine.
#[derive(Debug, Clone)]
pub(crate) struct EngineConfig {
    pub scheduler_id: String,
    /// How long a worker holds a step before it is handed out again.
    pub lease: Duration,
    /// Most steps claimed by one script call.
    pub claim_batch: usize,
    /// How often an idle partition is looked at anyway (writes by other schedulers).
    pub poll_interval: Duration,
}

/// A step handed to a worker and not yet reported.
#[derive(Debug)]
struct InFlight {
    /// The worker's stream, or [`DETACHED`] while the worker is away.
    connection: ConnectionId,
    worker_id: String,
    /// When its lease runs out, as far as this scheduler knows (ms): the claim's deadline,
    /// moved on by heartbeats. A detached step is forgotten after it.
    lease_deadline_ms: i64,
    partition: u16,
    fence: u64,
    step_index: usize,
    attempt: u32,
    due_ms: i64,
    channel: String,
    playbook: Arc<LoadedPlaybook>,
}

/// The `connection` of a step whose worker's stream ended: it waits for the worker to
/// re-attach until its lease runs out. (Connection ids start at 1.)
const DETACHED: ConnectionId = 0;

/// The timer loop, dispatch and outcome handling of one scheduler.
#[derive(Debug)]
pub(crate) struct Engine {
    store: Store,
    playbooks: Arc<PlaybookCache>,
    workers: Workers,
    config: EngineConfig,
    /// When each partition should next be claimed from (ms); the timer loop sleeps
    /// until the earliest and is woken early through `wake`.
    next_check: Mutex<Vec<i64>>,
    wake: Notify,
    in_flight: Mutex<HashMap<String, InFlight>>,
    completions: mpsc::UnboundedSender<(u16, Completion)>,
    tasks: TaskTracker,
    /// Cancelled when the scheduler stops; ends worker streams.
    shutdown: CancellationToken,
    /// Set by [`Engine::begin_shutdown`]: nothing more is handed out.
    draining: AtomicBool,
}

/// What to do with a claimed run.
enum Decision {
    Settle(Completion),
    Deliver(Box<(InFlight, v1::Task)>),
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Engine {
    /// Starts the engine's background tasks; they stop when `shutdown` is cancelled.
    pub(crate) fn start(
        store: Store,
        playbooks: Arc<PlaybookCache>,
        config: EngineConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (completions, completion_rx) = mpsc::unbounded_channel();
        let partitions = usize::from(store.partitions());
        let engine = Arc::new(Self {
            store,
            playbooks,
            workers: Workers::default(),
            config,
            next_check: Mutex::new(vec![0; partitions]),
            wake: Notify::new(),
            in_flight: Mutex::new(HashMap::new()),
            completions,
            tasks: TaskTracker::new(),
            shutdown: shutdown.clone(),
            draining: AtomicBool::new(false),
        });
        engine
            .tasks
            .spawn(Arc::clone(&engine).timer_loop(shutdown.clone()));
        engine
            .tasks
            .spawn(Arc::clone(&engine).completion_loop(completion_rx, shutdown));
        engine.tasks.close();
        engine
    }

    /// Completes once the background tasks have stopped (after `shutdown` is cancelled),
    /// outcomes already received from workers recorded.
    pub(crate) async fn stopped(&self) {
        self.tasks.wait().await;
    }

    /// The connected workers.
    pub(crate) fn workers(&self) -> &Workers {
        &self.workers
    }

    /// The scheduler's id, told to workers.
    pub(crate) fn scheduler_id(&self) -> &str {
        &self.config.scheduler_id
    }

    /// Makes the timer loop look at `partition` no later than `due_ms`.
    pub(crate) fn schedule_check(&self, partition: u16, due_ms: i64) {
        let mut next = lock(&self.next_check);
        if let Some(slot) = next.get_mut(usize::from(partition))
            && due_ms < *slot
        {
            *slot = due_ms;
            drop(next);
            self.wake.notify_one();
        }
    }

    /// Wakes the timer loop (e.g. a worker connected, so held-back steps can go).
    pub(crate) fn nudge(&self) {
        self.wake.notify_one();
    }

    async fn timer_loop(self: Arc<Self>, shutdown: CancellationToken) {
        info!(scheduler = %self.config.scheduler_id, "timer loop started");
        let mut redis_down = false;
        let mut next_sweep = 0;
        loop {
            let now = now_ms();
            if now >= next_sweep {
                forget_expired(&mut lock(&self.in_flight), now);
                next_sweep = now + 1000;
            }
            let due: Vec<u16> = lock(&self.next_check)
                .iter()
                .enumerate()
                .filter(|(_, at)| **at <= now)
                .filter_map(|(p, _)| u16::try_from(p).ok())
                .collect();
            let mut pause = Duration::ZERO;
            for partition in due {
                if shutdown.is_cancelled() {
                    return;
                }
                // While the claim runs, a write through this scheduler may lower the
                // slot again (schedule_check); keep the earlier of the two.
                lock(&self.next_check)[usize::from(partition)] = i64::MAX;
                let next = match self.claim_partition(partition).await {
                    Ok(next) => {
                        if redis_down {
                            redis_down = false;
                            info!(
                                "Redis is reachable again; timers resume (steps that came due meanwhile go out now)"
                            );
                        }
                        next
                    }
                    Err(err) => {
                        if !redis_down {
                            redis_down = true;
                            warn!(error = %err, "claiming due steps failed; timers pause and retry every second");
                        }
                        // This partition and every one not yet visited stay due: the
                        // next pass starts over once Redis answers.
                        pause = Duration::from_secs(1);
                        now_ms()
                    }
                };
                let mut next_check = lock(&self.next_check);
                let slot = &mut next_check[usize::from(partition)];
                *slot = (*slot).min(next);
                if !pause.is_zero() {
                    break;
                }
            }
            let earliest = lock(&self.next_check)
                .iter()
                .copied()
                .min()
                .unwrap_or(i64::MAX);
            let sleep_ms = (earliest - now_ms()).clamp(0, millis(self.config.poll_interval));
            let sleep = pause.max(Duration::from_millis(u64::try_from(sleep_ms).unwrap_or(0)));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.wake.notified(), if pause.is_zero() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Claims one batch of `partition` and acts on it; returns when to look again.
    async fn claim_partition(&self, partition: u16) -> crate::store::Result<i64> {
        let now = now_ms();
        let free = usize::try_from(self.workers.free_capacity()).unwrap_or(usize::MAX);
        let limit = free.clamp(16, self.config.claim_batch.max(16));
        let lease_ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
        let claim = self.store.claim(partition, now, limit, lease_ms).await?;
        if claim.expired > 0 {
            info!(
                partition,
                expired = claim.expired,
                "leases expired; steps go out again"
            );
        }
        let full_batch = claim.runs.len() >= limit;
        let mut settled = Vec::new();
        for run in claim.runs {
            match self.decide(run, now).await {
                Decision::Settle(completion) => settled.push(completion),
                Decision::Deliver(delivery) => {
                    let (in_flight, task) = *delivery;
                    if let Some(completion) = self.deliver(in_flight, task, now) {
                        settled.push(completion);
                    }
                }
            }
        }
        let mut next = [claim.next_due_ms, claim.next_lease_ms]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(i64::MAX)
            .min(now + millis(self.config.poll_interval));
        for completion in &settled {
            if let Op::Next { due_ms, .. } | Op::Retry { due_ms, .. } = completion.op {
                next = next.min(due_ms);
            }
        }
        self.store.complete(partition, now, &settled).await?;
        Ok(if full_batch { now } else { next })
    }

    async fn decide(&self, run: ClaimedRun, now: i64) -> Decision {
        let settle = |op: Op, detail: String, entry: Option<TimelineEntry>| {
            Decision::Settle(Completion {
                run_id: run.run_id.clone(),
                fence: run.fence,
                op,
                detail,
                entry,
            })
        };
        let index = run.step_index;
        let playbook = match self
            .playbooks
            .get(&self.store, &run.playbook, run.version)
            .await
        {
            Ok(playbook) => playbook,
            // Redis hiccup: try again shortly, the run is not at fault.
            Err(LoadError::Store(err)) => {
                warn!(run_id = %run.run_id, error = %err, "cannot load the run's playbook; retrying");
                let op = Op::Retry {
                    index,
                    due_ms: now + 1000,
                    attempt: run.attempt,
                };
                return settle(op, format!("loading the playbook failed: {err}"), None);
            }
            Err(err) => {
                warn!(run_id = %run.run_id, error = %err, "cannot load the run's playbook");
                let status = RunStatus::Failed;
                return settle(Op::Finish { index, status }, err.to_string(), None);
            }
        };
        let entry = |outcome, detail: &str| TimelineEntry {
            index,
            outcome,
            attempts: run.attempt,
            due_ms: run.due_ms,
            done_ms: now,
            worker: String::new(),
            channel: String::new(),
            detail: detail.to_owned(),
        };
        let fail = |detail: String| {
            let op = Op::Finish {
                index,
                status: RunStatus::Failed,
            };
            let failed = entry(StepOutcome::Failed, &detail);
            settle(op, detail, Some(failed))
        };
        let Some(step) = playbook.playbook.steps.get(index) else {
            let status = RunStatus::Completed;
            return settle(Op::Finish { index, status }, String::new(), None);
        };
        let action = match &step.kind {
            StepKind::Wait { .. } => {
                let op = advance(&playbook.playbook, index + 1, now);
                let waited = TimelineEntry {
                    attempts: 0,
                    ..entry(StepOutcome::Done, "")
                };
                return settle(op, String::new(), Some(waited));
            }
            StepKind::Action(action) => action,
        };
        let policy = action
            .retry
            .resolve(&self.workers.channel_retry(&action.channel));
        if run.attempt > policy.max_attempts {
            return fail(format!(
                "gave up after {} attempts (lease expired)",
                policy.max_attempts
            ));
        }
        let ctx = TemplateContext {
            contact: &run.contact,
            params: &action.params,
        };
        match playbook.compiled.condition_holds(index, &ctx) {
            Ok(true) => {}
            Ok(false) => {
                let op = advance(&playbook.playbook, index + 1, now);
                let skipped = TimelineEntry {
                    attempts: 0,
                    ..entry(StepOutcome::Skipped, "if was false")
                };
                return settle(op, String::new(), Some(skipped));
            }
            Err(err) => return fail(format!("if: {err}")),
        }
        let message = match playbook.compiled.render(index, &ctx) {
            Ok(message) => message.unwrap_or_default(),
            Err(err) => return fail(format!("template: {err}")),
        };
        let task = build_task(
            &run,
            &step.id,
            action,
            message,
            now + millis(self.config.lease),
        );
        let in_flight = InFlight {
            connection: DETACHED,
            worker_id: String::new(),
            lease_deadline_ms: now + millis(self.config.lease),
            partition: run.partition,
            fence: run.fence,
            step_index: index,
            attempt: run.attempt,
            due_ms: run.due_ms,
            channel: action.channel.clone(),
            playbook,
        };
        Decision::Deliver(Box::new((in_flight, task)))
    }

    /// Hands a task to a worker, or returns the completion that puts it back in due.
    fn deliver(&self, mut in_flight: InFlight, task: v1::Task, now: i64) -> Option<Completion> {
        let hold_back = |detail: String, delay_ms: i64| Completion {
            run_id: task.run_id.clone(),
            fence: task.fencing_token,
            op: Op::Retry {
                index: in_flight.step_index,
                due_ms: now + delay_ms,
                attempt: in_flight.attempt,
            },
            detail,
            entry: None,
        };
        if self.draining.load(Ordering::SeqCst) {
            return Some(hold_back("the scheduler is stopping".to_owned(), 0));
        }
        let (connection, worker_id, sender) = match self.workers.reserve(&task.channel) {
            Ok(reserved) => reserved,
            Err(NoWorker::ForChannel) => {
                debug!(channel = %task.channel, "no connected worker serves the channel");
                let detail = format!(
                    "waiting for a worker that serves channel {:?}",
                    task.channel
                );
                return Some(hold_back(detail, 2000));
            }
            Err(NoWorker::AllBusy) => {
                let detail = format!("waiting for a free worker on channel {:?}", task.channel);
                return Some(hold_back(detail, 250));
            }
        };
        in_flight.connection = connection;
        in_flight.worker_id = worker_id;
        let run_id = task.run_id.clone();
        debug!(run_id = %run_id, step = %task.step_id, channel = %task.channel, attempt = task.attempt, "dispatching");
        let message = SchedulerMessage {
            kind: Some(scheduler_message::Kind::Task(task)),
        };
        let superseded = lock(&self.in_flight).insert(run_id.clone(), in_flight);
        if let Some(old) = superseded {
            // The step's earlier lease expired while a worker of this scheduler held it.
            // That worker's late result will be ignored (its fence is stale), so give its
            // slot back now, or it would count as busy for as long as it stays connected,
            // and hand it nothing new until it shows signs of life.
            self.workers.release(old.connection);
            self.workers.mark_unresponsive(old.connection);
        }
        if sender.try_send(Ok(message)).is_err() {
            // The worker's stream is gone or full; take the step back.
            let in_flight = lock(&self.in_flight).remove(&run_id)?;
            self.workers.release(connection);
            return Some(Completion {
                run_id,
                fence: in_flight.fence,
                op: Op::Retry {
                    index: in_flight.step_index,
                    due_ms: now + 250,
                    attempt: in_flight.attempt,
                },
                detail: "worker stream unavailable".to_owned(),
                entry: None,
            });
        }
        None
    }

    /// Applies a worker's report on a task it held. A report on a run this scheduler has
    /// no record of is looked up in Redis instead ([`Engine::adopt_result`]).
    pub(crate) fn on_result(self: &Arc<Self>, connection: ConnectionId, result: TaskResult) {
        let (in_flight, known) = {
            let mut map = lock(&self.in_flight);
            match map.get(&result.run_id) {
                Some(f) if f.fence == result.fencing_token && f.connection == connection => {
                    (map.remove(&result.run_id), true)
                }
                found => (None, found.is_some()),
            }
        };
        let Some(in_flight) = in_flight else {
            if known || self.draining.load(Ordering::SeqCst) {
                debug!(run_id = %result.run_id, "result for a task this scheduler no longer holds; ignored");
            } else {
                self.adopt_result(connection, result);
            }
            return;
        };
        self.workers.release(connection);
        self.finish_reported(in_flight, result);
    }

    fn finish_reported(&self, in_flight: InFlight, result: TaskResult) {
        let outcome = Outcome::try_from(result.outcome).unwrap_or(Outcome::Permanent);
        let retry_after =
            (result.retry_after_ms > 0).then(|| Duration::from_millis(result.retry_after_ms));
        self.finish_attempt(
            result.run_id,
            in_flight,
            outcome,
            result.detail,
            retry_after,
        );
    }

    /// A result for a run this scheduler holds no step of: its step was handed out by
    /// this scheduler before it restarted, or by another scheduler the worker was
    /// attached to before its stream broke. It counts if the run is still leased under
    /// the result's fencing token (`complete.lua` checks that again, atomically), so a
    /// delivery that finished while its worker was cut off is not sent again; otherwise
    /// it is ignored like any stale result.
    fn adopt_result(self: &Arc<Self>, connection: ConnectionId, result: TaskResult) {
        let Some(partition) = partition_of_run(&result.run_id, self.store.partitions()) else {
            debug!(run_id = %result.run_id, "result for an unknown run; ignored");
            return;
        };
        let worker_id = self.workers.worker_id(connection).unwrap_or_default();
        let engine = Arc::clone(self);
        tokio::spawn(async move { engine.adopt(partition, worker_id, result).await });
    }

    async fn adopt(&self, partition: u16, worker_id: String, result: TaskResult) {
        let run = match self.store.get_run(&result.run_id).await {
            Ok(Some(run)) if run.leased && run.fence == result.fencing_token => run,
            Ok(_) => {
                debug!(run_id = %result.run_id, "result for a step no longer leased under its fencing token; ignored");
                return;
            }
            Err(err) => {
                warn!(run_id = %result.run_id, error = %err, "cannot look up the run of a reported step; it goes out again when its lease expires");
                return;
            }
        };
        let playbook = match self
            .playbooks
            .get(&self.store, &run.playbook, run.version)
            .await
        {
            Ok(playbook) => playbook,
            Err(err) => {
                warn!(run_id = %result.run_id, error = %err, "cannot load the playbook of a reported step; it goes out again when its lease expires");
                return;
            }
        };
        let Some(StepKind::Action(action)) =
            playbook.playbook.steps.get(run.step_index).map(|s| &s.kind)
        else {
            debug!(run_id = %result.run_id, "result for a step that is not an action; ignored");
            return;
        };
        debug!(run_id = %result.run_id, worker = %worker_id, "result for a step handed out before a restart or by another scheduler; applying it under its fencing token");
        let in_flight = InFlight {
            connection: DETACHED,
            worker_id,
            lease_deadline_ms: 0,
            partition,
            fence: run.fence,
            step_index: run.step_index,
            attempt: run.attempt,
            due_ms: run.due_ms,
            channel: action.channel.clone(),
            playbook: Arc::clone(&playbook),
        };
        self.finish_reported(in_flight, result);
    }

    /// A worker's heartbeat: extends the lease of every listed task that this connection
    /// holds under the listed fencing token, by the lease duration from now, one
    /// `extend.lua` call per partition (in the background, so the worker's results keep
    /// flowing meanwhile). Tasks the connection does not hold (reported, handed back,
    /// another's) are left out; leases that expired or were superseded in Redis are
    /// not extended, and the late result of such a task is refused as any stale outcome.
    /// A task of a run this scheduler has no record of (handed out before it restarted,
    /// or by another scheduler) goes to `extend.lua` as it is: the fencing token decides.
    pub(crate) fn on_heartbeat(
        self: &Arc<Self>,
        connection: ConnectionId,
        heartbeat: v1::Heartbeat,
    ) {
        let mut by_partition: HashMap<u16, Vec<(String, u64)>> = HashMap::new();
        {
            let map = lock(&self.in_flight);
            let draining = self.draining.load(Ordering::SeqCst);
            for task in heartbeat.tasks {
                let partition = match map.get(&task.run_id) {
                    Some(f) if f.fence == task.fencing_token && f.connection == connection => {
                        Some(f.partition)
                    }
                    None if !draining => partition_of_run(&task.run_id, self.store.partitions()),
                    _ => None,
                };
                if let Some(partition) = partition {
                    by_partition
                        .entry(partition)
                        .or_default()
                        .push((task.run_id, task.fencing_token));
                }
            }
        }
        if by_partition.is_empty() {
            return;
        }
        let engine = Arc::clone(self);
        tokio::spawn(async move { engine.extend_leases(by_partition).await });
    }

    async fn extend_leases(&self, by_partition: HashMap<u16, Vec<(String, u64)>>) {
        let lease_ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        let calls = by_partition.iter().map(|(partition, tasks)| async move {
            (
                *partition,
                tasks,
                self.store.extend(*partition, now, lease_ms, tasks).await,
            )
        });
        for (partition, tasks, extended) in futures::future::join_all(calls).await {
            if let Ok(extended) = &extended {
                // A step whose worker goes away is kept until this deadline.
                let deadline = now.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
                let extended: std::collections::HashSet<&str> =
                    extended.iter().map(String::as_str).collect();
                let mut map = lock(&self.in_flight);
                for (run_id, fence) in tasks
                    .iter()
                    .filter(|(id, _)| extended.contains(id.as_str()))
                {
                    if let Some(f) = map.get_mut(run_id)
                        && f.fence == *fence
                    {
                        f.lease_deadline_ms = f.lease_deadline_ms.max(deadline);
                    }
                }
            }
            match extended {
                Ok(extended) if extended.len() < tasks.len() => {
                    let lost: Vec<&str> = tasks
                        .iter()
                        .map(|(run_id, _)| run_id.as_str())
                        .filter(|run_id| !extended.iter().any(|e| e == run_id))
                        .collect();
                    info!(partition, runs = ?lost, "heartbeat for leases that expired or were superseded; not extended (their results will be refused)");
                }
                Ok(extended) => {
                    debug!(partition, count = extended.len(), "leases extended");
                }
                Err(err) => {
                    warn!(partition, error = %err, count = tasks.len(), "extending leases failed; they expire unless the next heartbeat gets through");
                }
            }
        }
    }

    /// Completes when the scheduler stops; worker streams end with it.
    pub(crate) fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Stops handing out steps and gives every step held by a worker (or waiting for its
    /// worker to re-attach) back to `due` at once, so another scheduler hands it out
    /// without waiting for the lease. The attempt is not counted (its outcome is unknown,
    /// and a restart must not fail runs); the idempotency key stays the same. A late
    /// report of such a step is refused.
    pub(crate) fn begin_shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let held: Vec<(String, InFlight)> = lock(&self.in_flight).drain().collect();
        if !held.is_empty() {
            info!(count = held.len(), "handing back steps held by workers");
        }
        let now = now_ms();
        for (run_id, f) in held {
            let completion = Completion {
                run_id,
                fence: f.fence,
                op: Op::Retry {
                    index: f.step_index,
                    due_ms: now,
                    attempt: f.attempt,
                },
                detail: "handed back when the scheduler stopped".to_owned(),
                entry: None,
            };
            let _ = self.completions.send((f.partition, completion));
        }
    }

    /// A worker's stream ended. The steps it held are not handed out again now: the
    /// worker may well be alive (a network blip, a lapsed keepalive) and still delivering.
    /// They stay recorded, detached, until their leases run out, so that when the worker
    /// re-attaches ([`Engine::on_worker_attached`]) its results and heartbeats for them
    /// count. A worker that is gone for good sends neither: its leases expire and the
    /// claim script hands its steps out again, the attempt counted, with the same
    /// idempotency key.
    pub(crate) fn on_worker_gone(&self, connection: ConnectionId) {
        self.workers.remove(connection);
        let mut detached = 0_usize;
        let mut worker = String::new();
        {
            let mut map = lock(&self.in_flight);
            for f in map.values_mut().filter(|f| f.connection == connection) {
                f.connection = DETACHED;
                detached += 1;
                worker.clone_from(&f.worker_id);
            }
            forget_expired(&mut map, now_ms());
        }
        if detached > 0 {
            info!(worker = %worker, steps = detached, "worker's stream ended while it held steps; they wait for it to re-attach until their leases expire");
        }
    }

    /// A worker said Hello on `connection`. Steps handed to the same worker id on an
    /// earlier stream (detached when it ended, or on one not noticed as broken yet) and
    /// whose leases still run are its again: its results and heartbeats for them count on
    /// the new stream, and they take up its slots. Earlier streams of the id get no new
    /// tasks unless they speak again (a worker holds one stream; ids must be unique).
    pub(crate) fn on_worker_attached(&self, connection: ConnectionId, worker_id: &str) {
        let mut earlier = Vec::new();
        let mut taken: u32 = 0;
        {
            let mut map = lock(&self.in_flight);
            forget_expired(&mut map, now_ms());
            for f in map.values_mut() {
                if f.worker_id == worker_id && f.connection != connection {
                    if f.connection != DETACHED {
                        earlier.push(f.connection);
                    }
                    f.connection = connection;
                    taken = taken.saturating_add(1);
                }
            }
        }
        for old in earlier {
            self.workers.release(old);
        }
        for old in self.workers.other_connections(worker_id, connection) {
            self.workers.mark_unresponsive(old);
        }
        if taken > 0 {
            self.workers.hold(connection, taken);
            info!(worker = %worker_id, steps = taken, "worker re-attached; the steps it held are its again");
        }
    }

    fn finish_attempt(
        &self,
        run_id: String,
        f: InFlight,
        outcome: Outcome,
        detail: String,
        retry_after: Option<Duration>,
    ) {
        let now = now_ms();
        let policy: RetryPolicy =
            match &f.playbook.playbook.steps.get(f.step_index).map(|s| &s.kind) {
                Some(StepKind::Action(action)) => action
                    .retry
                    .resolve(&self.workers.channel_retry(&action.channel)),
                _ => RetryPolicy::default(),
            };
        let entry = |outcome, detail: String| TimelineEntry {
            index: f.step_index,
            outcome,
            attempts: f.attempt,
            due_ms: f.due_ms,
            done_ms: now,
            worker: f.worker_id.clone(),
            channel: f.channel.clone(),
            detail,
        };
        let failed = |detail: String| {
            (
                Op::Finish {
                    index: f.step_index,
                    status: RunStatus::Failed,
                },
                Some(entry(StepOutcome::Failed, detail)),
            )
        };
        let (op, entry) = match outcome {
            Outcome::Ok => (
                advance(&f.playbook.playbook, f.step_index + 1, now),
                Some(entry(StepOutcome::Done, detail.clone())),
            ),
            Outcome::Retryable if f.attempt < policy.max_attempts => {
                let delay = retry_delay(&policy, f.attempt, retry_after);
                let op = Op::Retry {
                    index: f.step_index,
                    due_ms: now + millis(delay),
                    attempt: f.attempt + 1,
                };
                (op, None)
            }
            Outcome::Retryable => failed(format!("gave up after {} attempts: {detail}", f.attempt)),
            Outcome::Permanent | Outcome::Unspecified => failed(detail.clone()),
        };
        debug!(run_id = %run_id, step = f.step_index, channel = %f.channel, attempt = f.attempt, outcome = outcome.as_str_name(), "step attempt finished");
        let completion = Completion {
            run_id,
            fence: f.fence,
            op,
            detail: format!("attempt {}: {detail}", f.attempt),
            entry,
        };
        // The receiver only goes away at shutdown, when leases take over.
        let _ = self.completions.send((f.partition, completion));
    }

    /// Applies workers' outcomes in batches, one script call per partition. Outcomes that
    /// cannot be recorded (Redis unreachable) are kept and tried again every 500 ms, so a
    /// short outage does not turn delivered steps into redeliveries; a retry that comes
    /// after the lease expired is refused by `complete.lua` like any stale outcome.
    async fn completion_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<(u16, Completion)>,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::new();
        let mut unrecorded: Vec<(u16, Completion)> = Vec::new();
        let mut stopping = false;
        loop {
            let retry_due = !unrecorded.is_empty();
            let received = tokio::select! {
                // Stop taking new outcomes, but record those already received.
                () = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    rx.close();
                    rx.recv_many(&mut batch, usize::MAX).await
                }
                received = rx.recv_many(&mut batch, 512), if !stopping => received,
                () = tokio::time::sleep(Duration::from_millis(500)), if retry_due => 0,
            };
            batch.append(&mut unrecorded);
            if batch.is_empty() && (received == 0 || stopping) {
                return;
            }
            let mut by_partition: HashMap<u16, Vec<Completion>> = HashMap::new();
            for (partition, completion) in batch.drain(..) {
                by_partition.entry(partition).or_default().push(completion);
            }
            for (partition, completions) in by_partition {
                match self.store.complete(partition, now_ms(), &completions).await {
                    Ok((_, stale)) => {
                        if stale > 0 {
                            info!(
                                partition,
                                stale, "outcomes under an expired or superseded lease were refused"
                            );
                        }
                        for completion in &completions {
                            if let Op::Next { due_ms, .. } | Op::Retry { due_ms, .. } =
                                completion.op
                            {
                                self.schedule_check(partition, due_ms);
                            }
                        }
                    }
                    // At shutdown the leases take over: they expire back to due.
                    Err(err) if stopping => {
                        warn!(partition, error = %err, count = completions.len(), "recording outcomes failed at shutdown; their steps go out again when the leases expire");
                    }
                    Err(err) => {
                        if unrecorded.is_empty() {
                            warn!(partition, error = %err, count = completions.len(), "recording outcomes failed; retrying every 500 ms");
                        }
                        unrecorded.extend(completions.into_iter().map(|c| (partition, c)));
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }
}

/// Forgets detached steps whose leases ran out: the claim script hands them out again,
/// and a late result of theirs is looked up like any other unknown one.
fn forget_expired(map: &mut HashMap<String, InFlight>, now: i64) {
    map.retain(|_, f| f.connection != DETACHED || f.lease_deadline_ms > now);
}

/// The op that moves a run to step `index` (or ends it, completed).
fn advance(playbook: &Playbook, index: usize, now: i64) -> Op {
    match next_step(playbook, index, now) {
        Next::Step { index, due_ms } => Op::Next { index, due_ms },
        Next::Completed => Op::Finish {
            index: playbook.steps.len(),
            status: RunStatus::Completed,
        },
    }
}

/// Variables of templates and conditions.
#[derive(serde::Serialize)]
struct TemplateContext<'a> {
    contact: &'a ContactRecord,
    params: &'a serde_json::Map<String, serde_json::Value>,
}

fn build_task(
    run: &ClaimedRun,
    step_id: &str,
    action: &Action,
    message: String,
    deadline_ms: i64,
) -> v1::Task {
    let contact = &run.contact;
    v1::Task {
        run_id: run.run_id.clone(),
        fencing_token: run.fence,
        playbook: run.playbook.clone(),
        version: run.version,
        step_id: step_id.to_owned(),
        action: action.action.clone(),
        channel: action.channel.clone(),
        attempt: run.attempt,
        message,
        params_json: serde_json::Value::Object(action.params.clone()).to_string(),
        contact: Some(v1::Contact {
            id: contact.id.clone(),
            attrs: contact.attrs.clone().into_iter().collect(),
            tags: contact.tags.clone(),
            tz: contact.tz.clone(),
            identities: contact.identities.clone().into_iter().collect(),
        }),
        idempotency_key: idempotency_key(&run.run_id, step_id),
        traceparent: trace::child_of(&run.traceparent),
        deadline_ms,
    }
}
