//! Handing sends out ahead of their due time (`--hand-out-ahead`).
//!
//! A burst due at one instant (50,000 contacts at 20:00) would otherwise go out over the
//! seconds its claims and completions take in Redis. Instead, once a partition has
//! nothing due now, its sends due within the window are claimed (`claim.lua` with a
//! horizon and the eligible steps), decided as of their due time, and handed to workers
//! with a delay (`Task.delay_ms`); the worker keeps each until its due time and then
//! delivers it, so the instant costs no Redis work at all.
//!
//! Only plain sends at the end of a wait go ahead (`wait`, `wait_until`: the timers a
//! marketer sets, where bursts come from): action steps of unpaused playbook versions on
//! channels without a rate limit, served by a worker that holds tasks ahead
//! (`Hello.hold_ahead`). Everything else waits for its due time as usual; in particular
//! a step due again after a retry, a busy worker or a rate limit waits in Redis for
//! whichever worker is free then, not in one worker's hold room. The lease of a step
//! handed out ahead runs until a lease after its due time, and is not heartbeated
//! before it.
//!
//! GetRun shows such a run still in its wait until the wait's end (`as_of` in
//! `api/run_service.rs`), though the claim recorded the wait as done at that time.
//!
//! Half a second before the due time each such step is checked once more
//! (`moved_on.lua`): a run cancelled, converted or moved on meanwhile, or a playbook
//! paused, revokes it on its worker (`Revoke`); a paused one is due again at its time.
//! A worker whose stream has ended by then gets the revoke when it re-attaches. A
//! cancel after that check is too late, as for a step already in flight.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use tokio::sync::Notify;

use super::{Completion, Engine, InFlight, Op, StepKind, lock, millis, now_ms, v1};
use crate::store::ClaimedRun;
use crate::workers::ConnectionId;
use touchpoint_proto::metrics::metrics;
use touchpoint_proto::v1::{SchedulerMessage, scheduler_message};
use tracing::{debug, info, warn};

/// How long before its due time a step handed out ahead is checked for the last time.
const CHECK_BEFORE_MS: i64 = 500;

/// A step handed out ahead, to check before it is due.
#[derive(Debug)]
struct Check {
    partition: u16,
    run_id: String,
    fence: u64,
    playbook: String,
}

/// A revoke for a worker whose stream had ended: sent when it re-attaches, until the
/// step's lease runs out.
#[derive(Debug)]
struct Unsent {
    revoke: v1::Revoke,
    until_ms: i64,
}

/// The steps handed out ahead, by when to check them (ms), and the revokes waiting for
/// their worker to re-attach, by worker id.
#[derive(Debug, Default)]
pub(crate) struct AheadChecks {
    queue: std::sync::Mutex<BTreeMap<i64, Vec<Check>>>,
    added: Notify,
    unsent: std::sync::Mutex<HashMap<String, Vec<Unsent>>>,
}

impl AheadChecks {
    fn add(&self, at: i64, check: Check) {
        let earliest = {
            let mut queue = lock(&self.queue);
            let earlier = queue.first_key_value().is_none_or(|(first, _)| at < *first);
            queue.entry(at).or_default().push(check);
            earlier
        };
        if earliest {
            self.added.notify_one();
        }
    }

    /// Keeps `revoke` for `worker_id` until `until_ms`.
    fn keep_unsent(&self, worker_id: &str, revoke: v1::Revoke, until_ms: i64) {
        lock(&self.unsent)
            .entry(worker_id.to_owned())
            .or_default()
            .push(Unsent { revoke, until_ms });
    }

    /// Drops the kept revokes whose steps' leases have run out by `now` (their workers
    /// did not come back in time).
    fn forget_unsent(&self, now: i64) {
        lock(&self.unsent).retain(|_, revokes| {
            revokes.retain(|r| r.until_ms > now);
            !revokes.is_empty()
        });
    }

    /// The revokes kept for `worker_id` whose steps' leases still run.
    fn take_unsent(&self, worker_id: &str, now: i64) -> Vec<v1::Revoke> {
        let kept = lock(&self.unsent).remove(worker_id).unwrap_or_default();
        kept.into_iter()
            .filter(|r| r.until_ms > now)
            .map(|r| r.revoke)
            .collect()
    }

    /// The checks due by `now`, and when the next one is.
    fn take_due(&self, now: i64) -> (Vec<Check>, Option<i64>) {
        let mut queue = lock(&self.queue);
        let later = queue.split_off(&(now + 1));
        let due = std::mem::replace(&mut *queue, later);
        let next = queue.first_key_value().map(|(at, _)| *at);
        (due.into_values().flatten().collect(), next)
    }
}

impl Engine {
    /// After a claim of `partition` left nothing due now: hands out ahead its eligible
    /// sends due within the window. `next_due` is the partition's earliest due time,
    /// `next` when the claim would look again; returns when to look again.
    pub(super) async fn hand_out_ahead(
        &self,
        partition: u16,
        next_due: Option<i64>,
        next: i64,
    ) -> crate::store::Result<i64> {
        let window = millis(self.config.hand_out_ahead);
        let now = now_ms();
        let Some(next_due) = next_due else {
            return Ok(next);
        };
        if next_due > now + window {
            return Ok(next.min(next_due - window));
        }
        let room = usize::try_from(self.workers.free_ahead_total()).unwrap_or(usize::MAX);
        let eligible = if room == 0 {
            Vec::new()
        } else {
            self.eligible_steps().await
        };
        if eligible.is_empty() {
            // Looked at again when due, or at the next poll.
            return Ok(next);
        }
        let limit = room.min(self.config.claim_batch.max(16));
        let lease_ms = u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX);
        let claim = self
            .store
            .claim_ahead(partition, now, (now + window, &eligible), limit, lease_ms)
            .await?;
        metrics()
            .scheduler
            .steps_claimed
            .inc_by(claim.runs.len() as u64);
        let full = claim.runs.len() >= limit;
        let settled_next = self.act_ahead(partition, claim.runs, now).await?;
        if full {
            return Ok(now);
        }
        // What is still due within the window is not eligible: its due time, or the
        // next poll; what is due later, a window before it.
        let after = match claim.next_due_ms {
            Some(due) if due <= now + window => next.min(due),
            Some(due) => next.min(due - window),
            None => next,
        };
        Ok(after.min(settled_next.saturating_sub(window)))
    }

    /// "<playbook> <version> <step index>" of every step that may be handed out ahead:
    /// the action steps of loaded versions of unpaused playbooks, on channels without
    /// a rate limit (or a provider's hold) that some worker holds tasks ahead for.
    async fn eligible_steps(&self) -> Vec<String> {
        let mut eligible = Vec::new();
        let mut channel_ok: HashMap<String, bool> = HashMap::new();
        for (name, loaded) in self.playbooks.loaded().await {
            if self.is_paused(&name) {
                continue;
            }
            for (index, step) in loaded.playbook.steps.iter().enumerate() {
                let StepKind::Action(action) = &step.kind else {
                    continue;
                };
                let ok = *channel_ok.entry(action.channel.clone()).or_insert_with(|| {
                    self.workers.channel_rate(&action.channel).is_none()
                        && !lock(&self.penalized).contains_key(&action.channel)
                        && self.workers.free_ahead(&action.channel) > 0
                });
                if ok {
                    eligible.push(format!("{name} {} {index}", loaded.version));
                }
            }
        }
        eligible
    }

    /// Decides runs claimed ahead as of their due times and hands their sends out ahead;
    /// records what was settled instead. Returns the earliest due time among those.
    async fn act_ahead(
        &self,
        partition: u16,
        runs: Vec<ClaimedRun>,
        now: i64,
    ) -> crate::store::Result<i64> {
        let mut by_due: BTreeMap<i64, Vec<ClaimedRun>> = BTreeMap::new();
        for run in runs {
            by_due.entry(run.due_ms.max(now)).or_default().push(run);
        }
        let mut settled = Vec::new();
        for (due, runs) in by_due {
            for (in_flight, task) in self.sends(partition, runs, due, &mut settled).await? {
                if let Some(completion) = self.deliver_ahead(in_flight, task, due) {
                    settled.push(completion);
                }
            }
        }
        let mut next = i64::MAX;
        for completion in &settled {
            if let Op::Next { due_ms, .. } | Op::Retry { due_ms, .. } = completion.op {
                next = next.min(due_ms);
            }
        }
        // Everything settled here is due at its own time, after now: nothing is
        // claimed at once.
        self.store.complete(partition, now_ms(), &settled).await?;
        Ok(next)
    }

    /// Hands `task`, due at `due`, to a worker that holds it until then; without one,
    /// returns its completion: due again at its time, as it was.
    fn deliver_ahead(
        &self,
        mut in_flight: InFlight,
        mut task: v1::Task,
        due: i64,
    ) -> Option<Completion> {
        let reserved = self.workers.reserve_ahead(&task.channel);
        let Some(reserved) =
            reserved.filter(|_| !self.draining.load(std::sync::atomic::Ordering::SeqCst))
        else {
            return Some(back_at(
                &in_flight,
                &task.run_id,
                due,
                "no worker holds it ahead",
            ));
        };
        let now = now_ms();
        task.delay_ms = u64::try_from(due - now).unwrap_or(0);
        in_flight.ahead = true;
        in_flight.due_ms = due;
        // As in Redis (`claim.lua`): a lease after the due time. The worker paces its
        // heartbeats and adapters their calls by it.
        in_flight.lease_deadline_ms = due + millis(self.config.lease);
        task.deadline_ms = in_flight.lease_deadline_ms;
        let check = Check {
            partition: in_flight.partition,
            run_id: task.run_id.clone(),
            fence: task.fencing_token,
            playbook: task.playbook.clone(),
        };
        let not_sent = self.hand_to(reserved, in_flight, task, now);
        if not_sent.is_none() {
            metrics().scheduler.handed_out_ahead.inc();
            self.ahead_checks.add(due - CHECK_BEFORE_MS, check);
        }
        not_sent
    }

    /// A step handed out ahead that its worker handed back unstarted, or that was
    /// revoked for a paused playbook: due again at its time, the attempt not counted.
    pub(super) fn give_back(&self, run_id: &str, in_flight: &InFlight, detail: &str) {
        let completion = back_at(in_flight, run_id, in_flight.due_ms, detail);
        let _ = self.completions.send((in_flight.partition, completion));
    }

    /// Tells the worker holding `f` (handed out ahead, for run `run_id`) to drop it; a
    /// worker whose stream has ended is told when it re-attaches (it keeps the step
    /// until its due time whether or not it has a stream).
    pub(super) fn revoke(&self, run_id: &str, f: &InFlight) {
        let revoke = v1::Revoke {
            run_id: run_id.to_owned(),
            fencing_token: f.fence,
        };
        let Some(sender) = self.workers.sender(f.connection) else {
            debug!(worker = %f.worker_id, run_id, "revoke kept for when the worker re-attaches: its stream has ended");
            self.ahead_checks
                .keep_unsent(&f.worker_id, revoke, f.lease_deadline_ms);
            return;
        };
        if sender.try_send(Ok(revoke_message(revoke))).is_err() {
            warn!(
                run_id,
                "could not revoke a step handed out ahead: the worker's stream is full or gone"
            );
        }
    }

    /// Sends `worker_id`, re-attached on `connection`, the revokes kept while it was away.
    pub(super) fn send_unsent_revokes(&self, connection: ConnectionId, worker_id: &str) {
        let revokes = self.ahead_checks.take_unsent(worker_id, now_ms());
        if revokes.is_empty() {
            return;
        }
        let Some(sender) = self.workers.sender(connection) else {
            return;
        };
        info!(worker = %worker_id, revokes = revokes.len(), "sending revokes kept while the worker was away");
        for revoke in revokes {
            if sender.try_send(Ok(revoke_message(revoke))).is_err() {
                warn!(worker = %worker_id, "could not send a kept revoke: the worker's stream is full or gone");
            }
        }
    }

    /// Checks the steps handed out ahead half a second before they are due, and revokes
    /// those whose run moved on or whose playbook was paused (see the module doc).
    pub(super) async fn ahead_check_loop(
        self: std::sync::Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let (due, next) = self.ahead_checks.take_due(now_ms());
            if !due.is_empty() {
                self.check_ahead(due).await;
                continue;
            }
            let sleep = next.map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0))
            });
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.ahead_checks.added.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    async fn check_ahead(&self, checks: Vec<Check>) {
        self.ahead_checks.forget_unsent(now_ms());
        let mut by_partition: HashMap<u16, Vec<Check>> = HashMap::new();
        for check in checks {
            by_partition.entry(check.partition).or_default().push(check);
        }
        for (partition, checks) in by_partition {
            let tasks: Vec<(String, u64)> =
                checks.iter().map(|c| (c.run_id.clone(), c.fence)).collect();
            let moved = match self.store.moved_on(partition, &tasks).await {
                Ok(moved) => moved,
                Err(err) => {
                    // Sent as handed out: like a step already in flight.
                    warn!(partition, error = %err, "checking steps handed out ahead failed; they go out as handed out");
                    continue;
                }
            };
            let mut revoked = 0_usize;
            for check in checks {
                let gone = moved.contains(&check.run_id);
                let paused = !gone && self.is_paused(&check.playbook);
                if !gone && !paused {
                    continue;
                }
                let in_flight = {
                    let mut map = lock(&self.in_flight);
                    match map.get(&check.run_id) {
                        Some(f) if f.fence == check.fence && f.ahead => map.remove(&check.run_id),
                        _ => None,
                    }
                };
                let Some(in_flight) = in_flight else {
                    continue;
                };
                self.revoke(&check.run_id, &in_flight);
                self.workers
                    .release(in_flight.connection, &in_flight.channel, true);
                revoked += 1;
                if paused {
                    self.give_back(&check.run_id, &in_flight, "paused before it was due");
                } else {
                    debug!(run_id = %check.run_id, "run moved on before its step handed out ahead was due; revoked");
                }
            }
            if revoked > 0 {
                metrics().scheduler.ahead_revoked.inc_by(revoked as u64);
                info!(
                    partition,
                    revoked, "steps handed out ahead revoked before they were due"
                );
            }
        }
    }
}

fn revoke_message(revoke: v1::Revoke) -> SchedulerMessage {
    SchedulerMessage {
        kind: Some(scheduler_message::Kind::Revoke(revoke)),
    }
}

/// The completion that puts a step handed out ahead back as it was: due at `due_ms`,
/// the same attempt.
fn back_at(f: &InFlight, run_id: &str, due_ms: i64, detail: &str) -> Completion {
    Completion {
        run_id: run_id.to_owned(),
        fence: f.fence,
        op: Op::Retry {
            index: f.step_index,
            due_ms,
            attempt: f.attempt,
        },
        detail: detail.to_owned(),
        entry: None,
        stat: None,
        unwait: false,
        refund: None,
    }
}
