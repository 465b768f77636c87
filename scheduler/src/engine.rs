//! The engine: durable timers and the step life cycle.
//!
//! One timer loop per scheduler walks the partitions it owns (see `crate::ownership`)
//! whose next due time has come, claims their due steps in batches (`claim.lua`:
//! expired leases go back to due, due runs move into the lease set under a fresh
//! fencing token), and for each claimed run either settles it at once (a wait that
//! elapsed, a step whose `if` is false, a step with no worker to take it) or hands it to
//! a worker. Workers' results come back through [`Engine::on_result`] and are applied
//! in batches per partition (`complete.lua`), which schedules the next step in the same
//! atomic call. Workers' heartbeats extend the leases of what they still hold
//! ([`Engine::on_heartbeat`], `extend.lua`).
//!
//! Channels with a rate limit (announced by workers, see [`Workers::channel_rate`]) take
//! tokens from a bucket in Redis shared by every scheduler, once per channel per claim
//! batch; steps beyond the tokens granted go back to due, their attempt not counted. A
//! provider's "too many requests" holds the channel back for everyone (see
//! `docs/channels.md`, "Rate limits").
//!
//! With `--hand-out-ahead`, sends due within that window are claimed and handed to
//! workers before their due time, to go out at it (see the `ahead` module).
//!
//! Nothing lives only in memory: a scheduler killed at any point leaves every run
//! either due or leased in Redis, and leases expire back to due.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use touchpoint_proto::metrics::{ChannelLabels, OutcomeLabels, StepLabels, metrics};
use touchpoint_proto::telemetry::continue_trace;
use touchpoint_proto::v1::{self, Outcome, SchedulerMessage, TaskResult, scheduler_message};
use tracing::{Span, debug, field::Empty, info, info_span, warn};

use crate::{
    clock::now_ms,
    localtime,
    ownership::Ownership,
    playbook::{Action, Hold, Playbook, RetryPolicy, Step, StepKind},
    playbook_cache::{LoadError, LoadedPlaybook, PlaybookCache},
    policy::{self, Policy},
    run::{
        Next, RunStatus, StepOutcome, TimelineEntry, after_wait, after_wait_entered,
        idempotency_key, next_step, partition_of_run, retry_delay,
    },
    store::{
        AfterEvent, CapCheck, ClaimedRun, Completion, ContactRecord, Op, Rate, Refund, Send, Spent,
        Stat, Store, WaitRegistration,
    },
    wake::{self, Wake},
    workers::{ConnectionId, NoWorker, WorkerSender, Workers},
};

mod ahead;

use ahead::AheadChecks;

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
    /// How long before their due time sends are handed out (zero: at their due time).
    pub hand_out_ahead: Duration,
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
    /// The attempt's `dispatch` span: from hand-out to outcome.
    span: Span,
    /// Handed out ahead of `due_ms` (counted against the worker's `hold_ahead`).
    ahead: bool,
}

impl InFlight {
    /// Its step, when it is an action that frequency caps apply to (not transactional).
    fn capped_action(&self) -> Option<(&Step, &Action)> {
        let step = self.playbook.playbook.steps.get(self.step_index)?;
        match &step.kind {
            StepKind::Action(action) if !action.transactional => Some((step, action)),
            _ => None,
        }
    }
}

/// The `connection` of a step whose worker's stream ended: it waits for the worker to
/// re-attach until its lease runs out. (Connection ids start at 1.)
const DETACHED: ConnectionId = 0;

/// A provider's "too many requests" holds its channel back for at least this long...
const PENALTY_MIN_MS: i64 = 1000;
/// ... and at most this long, whatever its `Retry-After` says.
const PENALTY_MAX_MS: i64 = 5 * 60 * 1000;
/// After the hold, the channel's rate stays halved for this long.
const PENALTY_HALVED_MS: i64 = 60 * 1000;
/// The largest resume state kept (TaskProgress.state); a larger one is ignored.
const MAX_RESUME_STATE: usize = 4096;
/// The longest progress detail kept; a longer one is cut.
const MAX_PROGRESS_DETAIL: usize = 256;
/// The run detail of a step held back by its channel's rate limit (then the channel).
pub(crate) const RATE_LIMITED: &str = "rate limited: waiting for ";

/// The timer loop, dispatch and outcome handling of one scheduler.
#[derive(Debug)]
pub(crate) struct Engine {
    store: Store,
    playbooks: Arc<PlaybookCache>,
    workers: Workers,
    config: EngineConfig,
    /// The partitions this scheduler owns: the only ones it claims from.
    ownership: Arc<Ownership>,
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
    /// Set while outcomes wait for Redis: claims hold off until they are recorded, so a
    /// lease that ran out during an outage is not handed out again over a known result.
    outcomes_pending: AtomicBool,
    /// The contact budget in force (version, policy), reloaded when a new version appears.
    budget: Mutex<(u32, Arc<Policy>)>,
    /// Paused playbooks, as last read from Redis (refreshed every second).
    paused: Mutex<HashSet<String>>,
    /// Playbooks whose runs this scheduler parked: swept back to due once they are no
    /// longer paused (covers a run parked just after another scheduler resumed them).
    parked: Mutex<HashSet<String>>,
    /// Channels a provider asked to slow down, as far as this scheduler knows (from its
    /// workers' results, and every second from the list other schedulers announce
    /// holds in), with when the hold ends (ms). While listed, a
    /// channel without a rate of its own still asks its bucket before each hand-out;
    /// other channels without a rate cost no Redis call.
    penalized: Mutex<HashMap<String, i64>>,
    /// Tells the owners of partitions this scheduler wrote to but does not own.
    wakes: wake::Publisher,
    /// Steps handed out ahead, checked once more just before they are due.
    pub(crate) ahead_checks: AheadChecks,
}

/// A claimed step ready to be handed to a worker.
type Ready = (InFlight, v1::Task);

/// What to do with a claimed run.
enum Decision {
    Settle(Box<Completion>),
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
        ownership: Arc<Ownership>,
        config: EngineConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (completions, completion_rx) = mpsc::unbounded_channel();
        let partitions = usize::from(store.partitions());
        let store_for_wakes = store.clone();
        let engine = Arc::new(Self {
            store,
            playbooks,
            workers: Workers::default(),
            config,
            ownership,
            next_check: Mutex::new(vec![0; partitions]),
            wake: Notify::new(),
            in_flight: Mutex::new(HashMap::new()),
            completions,
            tasks: TaskTracker::new(),
            shutdown: shutdown.clone(),
            draining: AtomicBool::new(false),
            outcomes_pending: AtomicBool::new(false),
            budget: Mutex::new((0, Arc::new(Policy::default()))),
            paused: Mutex::new(HashSet::new()),
            parked: Mutex::new(HashSet::new()),
            penalized: Mutex::new(HashMap::new()),
            wakes: wake::Publisher::start(store_for_wakes, shutdown.clone()),
            ahead_checks: AheadChecks::default(),
        });
        engine
            .tasks
            .spawn(Arc::clone(&engine).timer_loop(shutdown.clone()));
        engine
            .tasks
            .spawn(Arc::clone(&engine).completion_loop(completion_rx, shutdown.clone()));
        if !engine.config.hand_out_ahead.is_zero() {
            engine
                .tasks
                .spawn(Arc::clone(&engine).ahead_check_loop(shutdown));
        }
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

    /// Makes the timer loop look at `partition` no later than `due_ms` (a hand-out-ahead
    /// before it); only the owner of a partition claims from it, so for a partition
    /// this scheduler does not own, the owner is told (see `crate::wake`).
    pub(crate) fn schedule_check(&self, partition: u16, due_ms: i64) {
        let now = now_ms();
        let due_ms = due_ms.saturating_sub(millis(self.config.hand_out_ahead));
        if self.ownership.owns(partition, now) {
            self.check_at(partition, due_ms);
        } else if due_ms <= now + millis(self.config.poll_interval) {
            // (The owner's idle poll reads anything due later from the due set.)
            self.wakes.wake(Wake::Partition(partition, due_ms));
        }
    }

    /// A wake from another scheduler: acted on for the partitions this one owns.
    pub(crate) fn on_wake(&self, wake: Wake) {
        match wake {
            Wake::Partition(partition, due_ms) if self.ownership.owns(partition, now_ms()) => {
                self.check_at(partition, due_ms);
            }
            Wake::Partition(..) => {}
            Wake::All => self.check_all(),
        }
    }

    fn check_at(&self, partition: u16, due_ms: i64) {
        let mut next = lock(&self.next_check);
        if let Some(slot) = next.get_mut(usize::from(partition))
            && due_ms < *slot
        {
            *slot = due_ms;
            drop(next);
            self.wake.notify_one();
        }
    }

    /// The contact budget in force.
    fn policy(&self) -> Arc<Policy> {
        Arc::clone(&lock(&self.budget).1)
    }

    fn is_paused(&self, playbook: &str) -> bool {
        lock(&self.paused).contains(playbook)
    }

    /// Pauses or resumes a playbook on this scheduler at once (others follow within a
    /// second, when they next read the paused set).
    pub(crate) fn set_paused(&self, playbook: &str, paused: bool) {
        let mut set = lock(&self.paused);
        if paused {
            set.insert(playbook.to_owned());
        } else {
            set.remove(playbook);
        }
    }

    /// Reads the paused playbooks and the policy version; reloads a new policy; sweeps
    /// back runs this scheduler parked for playbooks no longer paused.
    async fn refresh_settings(&self) -> crate::store::Result<()> {
        let paused = self.store.paused_playbooks().await?;
        let unpaused: Vec<String> = lock(&self.parked)
            .iter()
            .filter(|name| !paused.contains(*name))
            .cloned()
            .collect();
        *lock(&self.paused) = paused;
        for name in unpaused {
            let resumed = self.store.resume_parked(&name).await?;
            lock(&self.parked).remove(&name);
            if resumed > 0 {
                info!(playbook = %name, resumed, "steps held while the playbook was paused go out now");
                self.wake_all();
            }
        }
        let now = now_ms();
        for (channel, until) in self.store.penalties(now).await? {
            let mut penalized = lock(&self.penalized);
            let slot = penalized.entry(channel).or_insert(until);
            *slot = (*slot).max(until);
        }
        let version = self.store.policy_version().await?;
        let changed = version != lock(&self.budget).0;
        if changed && let Some((version, stored)) = self.store.get_policy().await? {
            match policy::parse(&stored.yaml) {
                Ok(policy) => {
                    info!(version, "contact budget policy loaded");
                    *lock(&self.budget) = (version, Arc::new(policy));
                }
                Err(err) => {
                    warn!(version, error = %err, "stored policy no longer parses; keeping the previous one");
                    lock(&self.budget).0 = version;
                }
            }
        }
        Ok(())
    }

    /// Makes every partition due for a claim now, on every scheduler.
    pub(crate) fn wake_all(&self) {
        self.check_all();
        self.wakes.wake(Wake::All);
    }

    fn check_all(&self) {
        lock(&self.next_check).iter_mut().for_each(|slot| *slot = 0);
        self.wake.notify_one();
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
                let held = {
                    let mut in_flight = lock(&self.in_flight);
                    forget_expired(&mut in_flight, now);
                    in_flight.len()
                };
                metrics()
                    .scheduler
                    .leases_in_flight
                    .set(i64::try_from(held).unwrap_or(i64::MAX));
                next_sweep = now + 1000;
                if let Err(err) = self.refresh_settings().await {
                    debug!(error = %err, "reading paused playbooks and the policy failed; keeping the last ones");
                }
            }
            if self.outcomes_pending.load(Ordering::Acquire) {
                if !redis_down {
                    redis_down = true;
                    warn!("outcomes wait for Redis; timers pause until they are recorded");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
            let due: Vec<u16> = {
                let mut next_check = lock(&self.next_check);
                let mut due = Vec::new();
                for (p, at) in next_check.iter_mut().enumerate() {
                    let Ok(partition) = u16::try_from(p) else {
                        break;
                    };
                    if *at > now {
                        continue;
                    }
                    if self.ownership.owns(partition, now) {
                        due.push(partition);
                    } else {
                        // Another scheduler's: looked at again if it becomes ours
                        // (`gained` below), or at the next poll.
                        *at = now + millis(self.config.poll_interval);
                    }
                }
                due
            };
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
                gained = self.ownership.gained() => {
                    let mut next_check = lock(&self.next_check);
                    for partition in gained {
                        if let Some(slot) = next_check.get_mut(usize::from(partition)) {
                            *slot = 0;
                        }
                    }
                }
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
        let m = &metrics().scheduler;
        m.steps_claimed.inc_by(claim.runs.len() as u64);
        m.leases_expired.inc_by(claim.expired);
        if claim.expired > 0 {
            info!(
                partition,
                expired = claim.expired,
                "leases expired; steps go out again"
            );
        }
        let full_batch = claim.runs.len() >= limit;
        let next = [claim.next_due_ms, claim.next_lease_ms]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(i64::MAX)
            .min(now + millis(self.config.poll_interval));
        let next = next.min(self.act_on(partition, claim.runs, now).await?);
        if full_batch {
            return Ok(now);
        }
        if self.config.hand_out_ahead.is_zero() {
            return Ok(next);
        }
        self.hand_out_ahead(partition, claim.next_due_ms, next)
            .await
    }

    /// Acts on leased runs of `partition`: settles those that need no worker, hands the
    /// rest out, and records the settled outcomes. Runs whose next step is due at once
    /// come back leased from that same script call (see `complete.lua`) and are acted on
    /// in turn; steps only move forward, so this ends. Returns when the partition has
    /// something due next among what was settled (`i64::MAX` for nothing).
    async fn act_on(
        &self,
        partition: u16,
        mut runs: Vec<ClaimedRun>,
        mut now: i64,
    ) -> crate::store::Result<i64> {
        let lease_ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
        let mut next = i64::MAX;
        while !runs.is_empty() {
            let mut settled = Vec::new();
            let ready = self.sends(partition, runs, now, &mut settled).await?;
            for (in_flight, task) in self.rate_limit(ready, now, &mut settled).await? {
                if let Some(completion) = self.deliver(in_flight, task, now) {
                    settled.push(completion);
                }
            }
            for completion in &settled {
                match completion.op {
                    // Due now: leased again by the script below.
                    Op::Next { due_ms, .. } if due_ms <= now => {}
                    Op::Next { due_ms, .. } | Op::Retry { due_ms, .. } => next = next.min(due_ms),
                    _ => {}
                }
            }
            runs = self
                .store
                .complete_and_claim(partition, now, &settled, Some(lease_ms))
                .await?
                .claimed;
            metrics().scheduler.steps_claimed.inc_by(runs.len() as u64);
            now = now_ms();
        }
        Ok(next)
    }

    /// Decides `runs` as of `now`: the sends that may go (within the contact budget's
    /// caps) are returned, the rest settled into `settled`.
    async fn sends(
        &self,
        partition: u16,
        runs: Vec<ClaimedRun>,
        now: i64,
        settled: &mut Vec<Completion>,
    ) -> crate::store::Result<Vec<Ready>> {
        let mut ready = Vec::new();
        for run in runs {
            match self.decide(run, now).await {
                Decision::Settle(completion) => settled.push(*completion),
                Decision::Deliver(delivery) => ready.push(*delivery),
            }
        }
        self.spend_budget(partition, ready, now, settled).await
    }

    async fn decide(&self, run: ClaimedRun, now: i64) -> Decision {
        let index = run.step_index;
        let settle = |op: Op, detail: String, entry: Option<TimelineEntry>, stat: Option<Stat>| {
            Decision::Settle(Box::new(Completion {
                run_id: run.run_id.clone(),
                fence: run.fence,
                op,
                detail,
                entry,
                stat,
                unwait: false,
                refund: None,
            }))
        };
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
                return settle(
                    op,
                    format!("loading the playbook failed: {err}"),
                    None,
                    None,
                );
            }
            Err(err) => {
                warn!(run_id = %run.run_id, error = %err, "cannot load the run's playbook");
                let status = RunStatus::Failed;
                return settle(Op::Finish { index, status }, err.to_string(), None, None);
            }
        };
        let entry = |outcome, detail: &str| TimelineEntry {
            index,
            outcome,
            attempts: 0,
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
            let failed = TimelineEntry {
                attempts: run.attempt,
                ..entry(StepOutcome::Failed, &detail)
            };
            settle(op, detail, Some(failed), Some(Stat::Failed))
        };
        let pb = &playbook.playbook;
        let Some(step) = pb.steps.get(index) else {
            let status = RunStatus::Completed;
            return settle(Op::Finish { index, status }, String::new(), None, None);
        };
        if self.is_paused(&run.playbook) {
            lock(&self.parked).insert(run.playbook.clone());
            let op = Op::Park { due_ms: run.due_ms };
            return settle(
                op,
                "paused: waits for the playbook to be resumed".to_owned(),
                None,
                None,
            );
        }
        let ctx = TemplateContext {
            contact: &run.contact,
            params: step_params(step),
            // No event: an empty one, so `event.attrs.x` renders empty rather than failing.
            event: run
                .trigger
                .as_deref()
                .and_then(|json| serde_json::from_str(json).ok())
                .unwrap_or_else(|| serde_json::json!({"name": "", "attrs": {}})),
        };
        let done = |detail: &str| {
            let op = advance(pb, pb.after(index), now);
            settle(
                op,
                String::new(),
                Some(entry(StepOutcome::Done, detail)),
                Some(Stat::Done),
            )
        };
        let action = match &step.kind {
            StepKind::Wait { .. } => return done(""),
            StepKind::WaitUntil { hour, minute } => {
                if run.waiting_step == Some(index) {
                    return done("");
                }
                let tz = self.policy().tz_of(&run.contact.tz);
                let due_ms = localtime::next_local_time(tz, now, *hour, *minute);
                let detail = format!("until {hour:02}:{minute:02} {tz}");
                let op = Op::Hold {
                    due_ms,
                    wait: None,
                    then_step: after_wait(pb, index, due_ms),
                };
                return settle(op, detail, None, None);
            }
            StepKind::WaitFor(wait_for) => {
                let target = |jump: Option<usize>| jump.unwrap_or(index + 1);
                if run.waiting_step == Some(index) {
                    let op = advance(pb, target(wait_for.on_timeout), now);
                    let detail = format!(
                        "timed out: no {} within {}",
                        wait_for.event,
                        humantime::format_duration(wait_for.timeout)
                    );
                    let timed_out = entry(StepOutcome::Done, &detail);
                    return Decision::Settle(Box::new(Completion {
                        run_id: run.run_id.clone(),
                        fence: run.fence,
                        op,
                        detail: String::new(),
                        entry: Some(timed_out),
                        stat: Some(Stat::TimedOut),
                        unwait: true,
                        refund: None,
                    }));
                }
                let then = match advance(pb, target(wait_for.on_event), now) {
                    Op::Next { index, due_ms, .. } => AfterEvent::Step {
                        index,
                        delay_ms: due_ms - now,
                    },
                    _ => AfterEvent::Complete {
                        index: pb.steps.len(),
                    },
                };
                let wait = WaitRegistration {
                    event: wait_for.event.clone(),
                    then,
                    matched_entry: entry(
                        StepOutcome::Done,
                        &format!("{} arrived (just before the wait began)", wait_for.event),
                    ),
                };
                let op = Op::Hold {
                    due_ms: now + millis(wait_for.timeout),
                    wait: Some(wait),
                    then_step: None,
                };
                return settle(op, format!("waiting for {}", wait_for.event), None, None);
            }
            StepKind::Exit { .. } => {
                return match playbook.compiled.condition_holds(index, &ctx) {
                    Ok(true) => {
                        let op = Op::Finish {
                            index,
                            status: RunStatus::Completed,
                        };
                        settle(
                            op,
                            String::new(),
                            Some(entry(StepOutcome::Done, "exit")),
                            Some(Stat::Done),
                        )
                    }
                    Ok(false) => {
                        let op = advance(pb, index + 1, now);
                        let skipped = entry(StepOutcome::Skipped, "if was false");
                        settle(op, String::new(), Some(skipped), Some(Stat::Skipped))
                    }
                    Err(err) => fail(format!("if: {err}")),
                };
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
        match playbook.compiled.condition_holds(index, &ctx) {
            Ok(true) => {}
            Ok(false) => {
                let op = advance(pb, index + 1, now);
                let skipped = entry(StepOutcome::Skipped, "if was false");
                return settle(op, String::new(), Some(skipped), Some(Stat::Skipped));
            }
            Err(err) => return fail(format!("if: {err}")),
        }
        let step_deadline_ms = action
            .deadline
            .map(|deadline| run.created_ms + millis(deadline));
        if step_deadline_ms.is_some_and(|deadline| now >= deadline) {
            let op = advance(pb, index + 1, now);
            let skipped = entry(StepOutcome::Skipped, "deadline passed before delivery");
            return settle(op, String::new(), Some(skipped), Some(Stat::Skipped));
        }
        if !action.transactional {
            let budget = self.policy();
            let tz = budget.tz_of(&run.contact.tz);
            if let Some(until) = budget.quiet_until(tz, now) {
                let detail = format!("quiet hours in {tz} until {}", local_time(tz, until));
                return match action.on_quiet_hours {
                    Hold::Defer => {
                        let op = Op::Retry {
                            index,
                            due_ms: until,
                            attempt: run.attempt,
                        };
                        settle(
                            op,
                            format!("deferred: {detail}"),
                            None,
                            Some(Stat::Deferred),
                        )
                    }
                    Hold::Skip => {
                        let op = advance(pb, index + 1, now);
                        let skipped = entry(StepOutcome::Skipped, &detail);
                        settle(op, String::new(), Some(skipped), Some(Stat::Skipped))
                    }
                };
            }
        }
        let message = match playbook.compiled.render(index, &ctx) {
            Ok(message) => message.unwrap_or_default(),
            Err(err) => return fail(format!("template: {err}")),
        };
        let params = match playbook.compiled.render_params(index, &action.params, &ctx) {
            Ok(params) => params,
            Err(err) => return fail(format!("template: {err}")),
        };
        let task = build_task(
            &run,
            &step.id,
            action,
            message,
            params,
            now + millis(self.config.lease),
            step_deadline_ms.unwrap_or(0),
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
            playbook: Arc::clone(&playbook),
            span: Span::none(),
            ahead: false,
        };
        Decision::Deliver(Box::new((in_flight, task)))
    }

    /// Checks and counts the sends of one claim batch against the contact budget's
    /// caps (one script call): returns the sends that may go; capped ones are settled
    /// (skipped or deferred, as their step says) into `settled`.
    async fn spend_budget(
        &self,
        partition: u16,
        ready: Vec<(InFlight, v1::Task)>,
        now: i64,
        settled: &mut Vec<Completion>,
    ) -> crate::store::Result<Vec<(InFlight, v1::Task)>> {
        let budget = self.policy();
        let mut checked = Vec::new();
        let mut sends = Vec::new();
        let mut free = Vec::new();
        for (in_flight, task) in ready {
            let Some((_, action)) = in_flight.capped_action() else {
                free.push((in_flight, task));
                continue;
            };
            let on_cap = action.on_cap;
            let caps: Vec<&policy::Cap> = budget
                .caps_for(&in_flight.channel)
                .map(|(_, c)| c)
                .collect();
            if caps.is_empty() {
                free.push((in_flight, task));
                continue;
            }
            let tz = budget.tz_of(task.contact.as_ref().map_or("", |c| c.tz.as_str()));
            sends.push(Send {
                member: task.idempotency_key.clone(),
                contact_id: task
                    .contact
                    .as_ref()
                    .map(|c| c.id.clone())
                    .unwrap_or_default(),
                caps: caps
                    .iter()
                    .map(|cap| CapCheck {
                        channel: cap.channel.clone(),
                        window_start_ms: cap.window_start(tz, now),
                        max: cap.max,
                        keep_ms: cap.keep_ms(),
                    })
                    .collect(),
            });
            checked.push((in_flight, task, caps, tz, on_cap));
        }
        if sends.is_empty() {
            return Ok(free);
        }
        let answers = self.store.spend(partition, now, &sends).await?;
        for ((in_flight, task, caps, tz, on_cap), answer) in checked.into_iter().zip(answers) {
            let Spent::Refused { cap, oldest_ms } = answer else {
                free.push((in_flight, task));
                continue;
            };
            let Some(cap) = caps.get(cap) else { continue };
            let detail = format!("capped: {}", cap.describe());
            let index = in_flight.step_index;
            let (op, entry, stat) = match on_cap {
                Hold::Skip => {
                    let entry = TimelineEntry {
                        index,
                        outcome: StepOutcome::Skipped,
                        attempts: 0,
                        due_ms: in_flight.due_ms,
                        done_ms: now,
                        worker: String::new(),
                        channel: in_flight.channel.clone(),
                        detail: detail.clone(),
                    };
                    let next = advance(&in_flight.playbook.playbook, index + 1, now);
                    (next, Some(entry), Stat::Capped)
                }
                Hold::Defer => {
                    let due_ms = policy::room_at(cap, tz, now, oldest_ms).max(now + 1000);
                    let op = Op::Retry {
                        index,
                        due_ms,
                        attempt: in_flight.attempt,
                    };
                    (op, None, Stat::Deferred)
                }
            };
            settled.push(Completion {
                run_id: task.run_id,
                fence: in_flight.fence,
                op,
                detail: match on_cap {
                    Hold::Skip => String::new(),
                    Hold::Defer => format!("deferred: {detail}"),
                },
                entry,
                stat: Some(stat),
                unwait: false,
                refund: None,
            });
        }
        Ok(free)
    }

    /// Takes rate-limit tokens for the sends of one claim batch: one `rate_take.lua` call
    /// per channel that has a rate (or a penalty this scheduler knows of), none for the
    /// others. Returns the sends that may go; the rest go back to due, each when its
    /// token should be there, at the same attempt, into `settled`.
    async fn rate_limit(
        &self,
        ready: Vec<(InFlight, v1::Task)>,
        now: i64,
        settled: &mut Vec<Completion>,
    ) -> crate::store::Result<Vec<(InFlight, v1::Task)>> {
        let mut free = Vec::new();
        // (channel, its rate, its sends), in the order the channels first came.
        let mut limited: Vec<(String, Option<Rate>, Vec<Ready>)> = Vec::new();
        {
            let mut penalized = lock(&self.penalized);
            penalized.retain(|_, until| *until > now);
            let mut rates: HashMap<String, Option<Rate>> = HashMap::new();
            for (in_flight, task) in ready {
                let rate = *rates
                    .entry(in_flight.channel.clone())
                    .or_insert_with(|| self.workers.channel_rate(&in_flight.channel));
                if rate.is_none() && !penalized.contains_key(&in_flight.channel) {
                    free.push((in_flight, task));
                    continue;
                }
                match limited.iter_mut().find(|(c, ..)| *c == in_flight.channel) {
                    Some((.., sends)) => sends.push((in_flight, task)),
                    None => {
                        limited.push((in_flight.channel.clone(), rate, vec![(in_flight, task)]))
                    }
                }
            }
        }
        if limited.is_empty() {
            return Ok(free);
        }
        let takes = limited
            .iter()
            .map(|(channel, rate, sends)| self.store.rate_take(channel, *rate, sends.len(), None));
        let taken = futures::future::join_all(takes).await;
        for ((channel, _, sends), taken) in limited.into_iter().zip(taken) {
            let taken = taken?;
            let mut waiting = 0_i64;
            for (k, (in_flight, task)) in sends.into_iter().enumerate() {
                if k < taken.granted {
                    free.push((in_flight, task));
                    continue;
                }
                // Spread the held-back sends over the times their tokens come, so they
                // are not all claimed (and held back) again at the next token.
                let due_ms = now + taken.wait_ms.max(1) + waiting * taken.per_token_ms;
                waiting += 1;
                settled.push(Completion {
                    run_id: task.run_id,
                    fence: in_flight.fence,
                    op: Op::Retry {
                        index: in_flight.step_index,
                        due_ms,
                        attempt: in_flight.attempt,
                    },
                    detail: format!("{RATE_LIMITED}{channel}"),
                    entry: None,
                    stat: None,
                    unwait: false,
                    refund: None,
                });
            }
            if waiting > 0 {
                metrics()
                    .scheduler
                    .rate_limit_waits
                    .get_or_create(&ChannelLabels {
                        channel: channel.clone(),
                    })
                    .inc_by(u64::try_from(waiting).unwrap_or(0));
                debug!(channel = %channel, granted = taken.granted, held_back = waiting, wait_ms = taken.wait_ms, "rate limited");
            }
        }
        Ok(free)
    }

    /// A provider asked to slow down on `channel` (HTTP 429, WeCom 45009): the channel is
    /// held back for every scheduler for its `Retry-After` (at least 1 s, at most 5 min),
    /// then goes at half its rate for a minute.
    fn on_rate_limited(self: &Arc<Self>, channel: String, retry_after_ms: u64) {
        let block_ms = penalty_ms(retry_after_ms);
        let engine = Arc::clone(self);
        tokio::spawn(async move { engine.penalize(channel, block_ms).await });
    }

    async fn penalize(&self, channel: String, block_ms: i64) {
        // Known before the write lands, so the next batch already asks the bucket.
        let now = now_ms();
        lock(&self.penalized)
            .entry(channel.clone())
            .and_modify(|until| *until = (*until).max(now + block_ms))
            .or_insert(now + block_ms);
        match self
            .store
            .rate_penalize(&channel, block_ms, PENALTY_HALVED_MS, None)
            .await
        {
            Ok(remaining) => {
                let now = now_ms();
                let until = now + remaining;
                {
                    let mut penalized = lock(&self.penalized);
                    let slot = penalized.entry(channel.clone()).or_insert(until);
                    *slot = (*slot).max(until);
                }
                info!(channel = %channel, hold_ms = remaining, "the provider asked to slow down; the channel is held back for every worker");
                // Schedulers that hand the channel out without a rate learn of the hold
                // from this list (within a second); the bucket itself holds the rest.
                if let Err(err) = self.store.announce_penalty(&channel, until, now).await {
                    warn!(channel = %channel, error = %err, "announcing a provider's rate limit failed; other schedulers learn of it only if the channel has a rate");
                }
            }
            Err(err) => {
                warn!(channel = %channel, error = %err, "recording a provider's rate limit failed; only this scheduler holds the channel back");
            }
        }
    }

    /// A worker's progress on a step it holds: `detail` becomes the run's detail and
    /// `state` the step's resume state (handed to its next attempt), recorded only under
    /// the current fencing token (checked again in `progress.lua`, atomically). A report
    /// on a run this scheduler has no record of goes to Redis as it is: the token decides.
    pub(crate) fn on_progress(self: &Arc<Self>, progress: v1::TaskProgress) {
        let partition = {
            let map = lock(&self.in_flight);
            match map.get(&progress.run_id) {
                Some(f) if f.fence == progress.fencing_token => Some(f.partition),
                None if !self.draining.load(Ordering::SeqCst) => {
                    partition_of_run(&progress.run_id, self.store.partitions())
                }
                _ => None,
            }
        };
        let Some(partition) = partition else {
            debug!(run_id = %progress.run_id, "progress on a task no longer held under its fencing token; ignored");
            return;
        };
        let v1::TaskProgress {
            run_id,
            fencing_token,
            mut detail,
            mut state,
        } = progress;
        if state.len() > MAX_RESUME_STATE {
            warn!(run_id = %run_id, bytes = state.len(), max = MAX_RESUME_STATE, "resume state too large; not kept");
            state.clear();
        }
        if detail.len() > MAX_PROGRESS_DETAIL {
            let mut end = MAX_PROGRESS_DETAIL;
            while !detail.is_char_boundary(end) {
                end -= 1;
            }
            detail.truncate(end);
        }
        if detail.is_empty() && state.is_empty() {
            return;
        }
        let engine = Arc::clone(self);
        tokio::spawn(async move {
            let recorded = engine
                .store
                .progress(partition, now_ms(), &run_id, fencing_token, &detail, &state)
                .await;
            match recorded {
                Ok(true) => debug!(run_id = %run_id, "progress recorded"),
                Ok(false) => {
                    debug!(run_id = %run_id, "progress under an expired or superseded lease; ignored");
                }
                Err(err) => warn!(run_id = %run_id, error = %err, "recording progress failed"),
            }
        });
    }

    /// Hands a task to a worker, or returns the completion that puts it back in due.
    fn deliver(&self, in_flight: InFlight, task: v1::Task, now: i64) -> Option<Completion> {
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
            stat: None,
            unwait: false,
            refund: None,
        };
        if self.draining.load(Ordering::SeqCst) {
            return Some(hold_back("the scheduler is stopping".to_owned(), 0));
        }
        let reserved = match self.workers.reserve(&task.channel) {
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
        self.hand_to(reserved, in_flight, task, now)
    }

    /// Sends `task` to the worker `reserved` for it and records it as in flight; when the
    /// worker's stream is gone or full, gives the slot back and returns the step's
    /// completion (due again shortly, or at its due time if that is later).
    fn hand_to(
        &self,
        (connection, worker_id, sender): (ConnectionId, String, WorkerSender),
        mut in_flight: InFlight,
        task: v1::Task,
        now: i64,
    ) -> Option<Completion> {
        in_flight.connection = connection;
        in_flight.worker_id = worker_id;
        let mut task = task;
        in_flight.span = dispatch_span(&task);
        // The task carried the run's traceparent; the worker continues the dispatch span.
        task.traceparent = continue_trace(&in_flight.span, &task.traceparent);
        let m = &metrics().scheduler;
        let step = StepLabels {
            playbook: task.playbook.clone(),
            step: task.step_id.clone(),
            channel: task.channel.clone(),
        };
        m.steps_dispatched.get_or_create(&step).inc();
        m.timer_lag
            .get_or_create(&ChannelLabels {
                channel: task.channel.clone(),
            })
            .observe(
                Duration::from_millis(u64::try_from(now - in_flight.due_ms).unwrap_or(0))
                    .as_secs_f64(),
            );
        let run_id = task.run_id.clone();
        debug!(parent: &in_flight.span, run_id = %run_id, step = %task.step_id, channel = %task.channel, attempt = task.attempt, "dispatching");
        let message = SchedulerMessage {
            kind: Some(scheduler_message::Kind::Task(task)),
        };
        let superseded = lock(&self.in_flight).insert(run_id.clone(), in_flight);
        if let Some(old) = superseded {
            // The step's earlier lease expired while a worker of this scheduler held it.
            // That worker's late result will be ignored (its fence is stale), so give its
            // slot back now, or it would count as busy for as long as it stays connected,
            // and hand it nothing new until it shows signs of life.
            self.workers
                .release(old.connection, &old.channel, old.ahead);
            self.workers
                .mark_unresponsive(old.connection, self.config.lease);
        }
        if sender.try_send(Ok(message)).is_err() {
            // The worker's stream is gone or full; take the step back.
            let in_flight = lock(&self.in_flight).remove(&run_id)?;
            self.workers
                .release(connection, &in_flight.channel, in_flight.ahead);
            return Some(Completion {
                run_id,
                fence: in_flight.fence,
                op: Op::Retry {
                    index: in_flight.step_index,
                    due_ms: (now + 250).max(in_flight.due_ms),
                    attempt: in_flight.attempt,
                },
                detail: "worker stream unavailable".to_owned(),
                entry: None,
                stat: None,
                unwait: false,
                refund: None,
            });
        }
        None
    }

    /// Applies a worker's report on a task it held. The fencing token names the attempt,
    /// whichever stream the report comes on (a worker attached to several schedulers,
    /// or through two streams for a moment, sends results on any open one). A report
    /// on a run this scheduler has no record of is looked up in Redis instead
    /// ([`Engine::adopt_result`]).
    pub(crate) fn on_result(self: &Arc<Self>, connection: ConnectionId, result: TaskResult) {
        let (in_flight, known) = {
            let mut map = lock(&self.in_flight);
            match map.get(&result.run_id) {
                Some(f) if f.fence == result.fencing_token => (map.remove(&result.run_id), true),
                found => (None, found.is_some()),
            }
        };
        let Some(in_flight) = in_flight else {
            if known || self.draining.load(Ordering::SeqCst) {
                if known {
                    metrics().scheduler.stale_results.inc();
                }
                debug!(run_id = %result.run_id, "result for a task this scheduler no longer holds; ignored");
            } else {
                self.adopt_result(connection, result);
            }
            return;
        };
        self.workers
            .release(in_flight.connection, &in_flight.channel, in_flight.ahead);
        if in_flight.ahead && result.outcome() == Outcome::Retryable && now_ms() < in_flight.due_ms
        {
            // Handed back unstarted (its worker is stopping): due again at its time,
            // the attempt not counted.
            self.give_back(&result.run_id, &in_flight, &result.detail);
            return;
        }
        if result.rate_limited {
            self.on_rate_limited(in_flight.channel.clone(), result.retry_after_ms);
        }
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
                metrics().scheduler.stale_results.inc();
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
        if result.rate_limited {
            let block_ms = penalty_ms(result.retry_after_ms);
            self.penalize(action.channel.clone(), block_ms).await;
        }
        let now = now_ms();
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
            span: Span::none(),
            // A step leased before its due time was handed out ahead.
            ahead: run.due_ms > now,
        };
        if in_flight.ahead && result.outcome() == Outcome::Retryable {
            // Handed out ahead by an earlier scheduler, and handed back unstarted by its
            // stopping worker: due again at its time, the attempt not counted.
            self.give_back(&result.run_id, &in_flight, &result.detail);
            return;
        }
        self.finish_reported(in_flight, result);
    }

    /// A worker's heartbeat: extends the lease of every listed task handed out under the
    /// listed fencing token (whichever of the worker's streams the heartbeat comes on),
    /// by the lease duration from now, one `extend.lua` call per partition (in the
    /// background, so the worker's results keep flowing meanwhile). Tasks this scheduler
    /// no longer holds under that token (reported, handed back) are left out; leases that
    /// expired or were superseded in Redis are not extended, and the late result of such
    /// a task is refused as any stale outcome. A task of a run this scheduler has no
    /// record of (handed out before it restarted, or by another scheduler) goes to
    /// `extend.lua` as it is: the fencing token decides.
    pub(crate) fn on_heartbeat(self: &Arc<Self>, heartbeat: v1::Heartbeat) {
        let mut by_partition: HashMap<u16, Vec<(String, u64)>> = HashMap::new();
        {
            let map = lock(&self.in_flight);
            let draining = self.draining.load(Ordering::SeqCst);
            for task in heartbeat.tasks {
                let partition = match map.get(&task.run_id) {
                    Some(f) if f.fence == task.fencing_token => Some(f.partition),
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
    /// report of such a step is refused. Steps handed out ahead stay with their workers.
    pub(crate) fn begin_shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let held: Vec<(String, InFlight)> = lock(&self.in_flight).drain().collect();
        if !held.is_empty() {
            info!(count = held.len(), "handing back steps held by workers");
        }
        let now = now_ms();
        for (run_id, f) in held {
            if f.ahead {
                // Not started: left with its worker, which sends it at its due time and
                // reports to whichever scheduler it is attached to then (the result is
                // applied under its fencing token). A revoke could be lost with the
                // closing stream, and the step would then go out twice.
                continue;
            }
            let completion = Completion {
                run_id,
                fence: f.fence,
                op: Op::Retry {
                    index: f.step_index,
                    due_ms: now.max(f.due_ms),
                    attempt: f.attempt,
                },
                detail: "handed back when the scheduler stopped".to_owned(),
                entry: None,
                stat: None,
                unwait: false,
                refund: None,
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
        let mut taken = Vec::new();
        {
            let mut map = lock(&self.in_flight);
            forget_expired(&mut map, now_ms());
            for f in map.values_mut() {
                if f.worker_id == worker_id && f.connection != connection {
                    if f.connection != DETACHED {
                        earlier.push((f.connection, f.channel.clone(), f.ahead));
                    }
                    f.connection = connection;
                    taken.push((f.channel.clone(), f.ahead));
                }
            }
        }
        for (old, channel, ahead) in earlier {
            self.workers.release(old, &channel, ahead);
        }
        for old in self.workers.other_connections(worker_id, connection) {
            self.workers.set_aside(old);
        }
        for (channel, ahead) in &taken {
            self.workers.hold(connection, channel, *ahead);
        }
        if !taken.is_empty() {
            info!(worker = %worker_id, steps = taken.len(), "worker re-attached; the steps it held are its again");
        }
        self.send_unsent_revokes(connection, worker_id);
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
                advance(
                    &f.playbook.playbook,
                    f.playbook.playbook.after(f.step_index),
                    now,
                ),
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
            Outcome::Skipped => (
                advance(&f.playbook.playbook, f.step_index + 1, now),
                Some(entry(StepOutcome::Skipped, detail.clone())),
            ),
            Outcome::Permanent | Outcome::Unspecified => failed(detail.clone()),
        };
        debug!(run_id = %run_id, step = f.step_index, channel = %f.channel, attempt = f.attempt, outcome = outcome.as_str_name(), "step attempt finished");
        let stat = match &op {
            Op::Finish {
                status: RunStatus::Failed,
                ..
            } => Some(Stat::Failed),
            Op::Retry { .. } => None,
            _ if outcome == Outcome::Skipped => Some(Stat::Skipped),
            _ => Some(Stat::Done),
        };
        let counted = match (&op, stat) {
            (Op::Retry { .. }, _) => "retried",
            (_, Some(Stat::Failed)) => "failed",
            (_, Some(Stat::Skipped)) => "skipped",
            _ => "delivered",
        };
        f.span.record("touchpoint.outcome", counted);
        let labels = |outcome| OutcomeLabels {
            playbook: f.playbook.playbook.name.clone(),
            step: f
                .playbook
                .playbook
                .steps
                .get(f.step_index)
                .map(|s| s.id.clone())
                .unwrap_or_default(),
            channel: f.channel.clone(),
            outcome,
        };
        let outcomes = &metrics().scheduler.step_outcomes;
        outcomes.get_or_create(&labels(counted)).inc();
        if counted == "failed" {
            // A run whose step fails for good is dead-lettered.
            outcomes.get_or_create(&labels("dead_lettered")).inc();
        }
        let refund = matches!(outcome, Outcome::Permanent | Outcome::Skipped)
            .then(|| self.counted_send(&run_id, &f))
            .flatten();
        let completion = Completion {
            run_id,
            fence: f.fence,
            op,
            detail: format!("attempt {}: {detail}", f.attempt),
            entry,
            stat,
            unwait: false,
            refund,
        };
        // The receiver only goes away at shutdown, when leases take over.
        let _ = self.completions.send((f.partition, completion));
    }

    /// The send of `f` as `spend_budget` counted it against the contact's caps, if it
    /// was: an action step that is not transactional, on a channel the policy caps.
    fn counted_send(&self, run_id: &str, f: &InFlight) -> Option<Refund> {
        let (step, _) = f.capped_action()?;
        // No cap on the channel: nothing was counted.
        self.policy().caps_for(&f.channel).next()?;
        Some(Refund {
            member: idempotency_key(run_id, &step.id),
            channel: f.channel.clone(),
        })
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
                let lease_ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
                let now = now_ms();
                // Stopping: record only, hand nothing more out.
                let lease_ms = Some(lease_ms).filter(|_| !stopping);
                let recorded = self
                    .store
                    .complete_and_claim(partition, now, &completions, lease_ms)
                    .await;
                match recorded {
                    Ok(completed) => {
                        let stale = completed.stale;
                        if !completed.claimed.is_empty() {
                            metrics()
                                .scheduler
                                .steps_claimed
                                .inc_by(completed.claimed.len() as u64);
                            // The runs whose next step is due now, leased already.
                            match self.act_on(partition, completed.claimed, now_ms()).await {
                                Ok(next) => self.schedule_check(partition, next),
                                Err(err) => {
                                    warn!(partition, error = %err, "acting on steps due at once failed; they go out again when their leases expire")
                                }
                            }
                        }
                        if stale > 0 {
                            metrics().scheduler.stale_results.inc_by(stale);
                            info!(
                                partition,
                                stale, "outcomes under an expired or superseded lease were refused"
                            );
                        }
                        for completion in &completions {
                            match completion.op {
                                // Due now: leased again already (unless stopping).
                                Op::Next { due_ms, .. } if !stopping && due_ms <= now => {}
                                Op::Next { due_ms, .. } | Op::Retry { due_ms, .. } => {
                                    self.schedule_check(partition, due_ms);
                                }
                                _ => {}
                            }
                        }
                    }
                    // At shutdown the leases take over: they expire back to due.
                    Err(err) if stopping => {
                        warn!(partition, error = %err, count = completions.len(), "recording outcomes failed at shutdown; their steps go out again when the leases expire");
                    }
                    Err(err) => {
                        if !self.outcomes_pending.swap(true, Ordering::AcqRel) {
                            warn!(partition, error = %err, count = completions.len(), "recording outcomes failed; claims hold off and recording retries every 500 ms");
                        }
                        unrecorded.extend(completions.into_iter().map(|c| (partition, c)));
                    }
                }
            }
            if unrecorded.is_empty() {
                self.outcomes_pending.store(false, Ordering::Release);
            }
            if stopping {
                return;
            }
        }
    }
}

/// The span of one attempt's hand-out, with the run's attributes (never the contact's).
fn dispatch_span(task: &v1::Task) -> Span {
    info_span!(
        "dispatch",
        otel.name = %format!("send {}", task.channel),
        otel.kind = "producer",
        messaging.system = "touchpoint",
        messaging.operation.type = "send",
        messaging.destination.name = %task.channel,
        touchpoint.playbook = %task.playbook,
        touchpoint.version = task.version,
        touchpoint.step = %task.step_id,
        touchpoint.channel = %task.channel,
        touchpoint.attempt = task.attempt,
        touchpoint.run_id = %task.run_id,
        touchpoint.outcome = Empty,
        trace_id = Empty,
        span_id = Empty,
    )
}

/// Forgets detached steps whose leases ran out: the claim script hands them out again,
/// and a late result of theirs is looked up like any other unknown one.
fn forget_expired(map: &mut HashMap<String, InFlight>, now: i64) {
    map.retain(|_, f| f.connection != DETACHED || f.lease_deadline_ms > now);
}

/// How long a provider's "too many requests" holds its channel back: its `Retry-After`,
/// at least 1 s and at most 5 min.
fn penalty_ms(retry_after_ms: u64) -> i64 {
    i64::try_from(retry_after_ms)
        .unwrap_or(i64::MAX)
        .clamp(PENALTY_MIN_MS, PENALTY_MAX_MS)
}

/// The op that moves a run to step `index` (or ends it, completed).
fn advance(playbook: &Playbook, index: usize, now: i64) -> Op {
    match next_step(playbook, index, now) {
        Next::Step { index, due_ms } => Op::Next {
            index,
            due_ms,
            then_step: after_wait_entered(playbook, index, due_ms),
        },
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
    /// The event that started or last woke the run (`null` when none).
    event: serde_json::Value,
}

/// `2026-11-23 08:00` in `tz`.
fn local_time(tz: chrono_tz::Tz, ms: i64) -> String {
    use chrono::TimeZone;
    tz.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

/// The params of an action step (none for other steps).
fn step_params(step: &Step) -> &serde_json::Map<String, serde_json::Value> {
    static NONE: std::sync::LazyLock<serde_json::Map<String, serde_json::Value>> =
        std::sync::LazyLock::new(serde_json::Map::new);
    match &step.kind {
        StepKind::Action(action) => &action.params,
        _ => &NONE,
    }
}

fn build_task(
    run: &ClaimedRun,
    step_id: &str,
    action: &Action,
    message: String,
    params: serde_json::Map<String, serde_json::Value>,
    deadline_ms: i64,
    step_deadline_ms: i64,
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
        params_json: serde_json::Value::Object(params).to_string(),
        contact: Some(v1::Contact {
            id: contact.id.clone(),
            attrs: contact.attrs.clone().into_iter().collect(),
            tags: contact.tags.clone(),
            tz: contact.tz.clone(),
            identities: contact.identities.clone().into_iter().collect(),
        }),
        idempotency_key: idempotency_key(&run.run_id, step_id),
        // Replaced by the dispatch span's when the task is handed out.
        traceparent: run.traceparent.clone(),
        deadline_ms,
        step_deadline_ms,
        resume_state: run.resume_state.clone(),
        delay_ms: 0,
    }
}
