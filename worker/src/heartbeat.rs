//! Lease heartbeats: while the worker holds tasks, it says so on the open stream often enough
//! that no lease runs out under a delivery that is still going.
//!
//! Each task is held from the moment it arrives (waiting for a free slot counts) until its
//! result is sent. A task's heartbeat interval comes from its `deadline_ms`: a third of
//! the lease that remained when it arrived, at most 1 s and at least 100 ms. Whenever the
//! interval of some held task has passed, one `Heartbeat` per stream the held tasks came
//! on goes out (on that stream if open, else on another), listing them, and every task's
//! interval starts over. A delivery shorter than its
//! interval (most of them) never causes a heartbeat.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{sync::Notify, time::Instant};
use touchpoint_proto::v1::{Heartbeat, Task, TaskRef, WorkerMessage, worker_message};

use crate::outbox::StreamId;

/// The longest time between two heartbeats for a held task.
pub(crate) const MAX_INTERVAL: Duration = Duration::from_secs(1);
/// The shortest (a lease already short or gone when the task arrived, or clocks apart).
pub(crate) const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// How often a task handed out with `deadline_ms` is heartbeated when it arrives at
/// `now_ms` (both wall-clock ms); `None` when the task has no deadline (nothing to keep).
pub(crate) fn interval(deadline_ms: i64, now_ms: i64) -> Option<Duration> {
    if deadline_ms <= 0 {
        return None;
    }
    let remaining = u64::try_from(deadline_ms.saturating_sub(now_ms)).unwrap_or(0);
    Some(Duration::from_millis(remaining / 3).clamp(MIN_INTERVAL, MAX_INTERVAL))
}

#[derive(Debug)]
struct Entry {
    every: Duration,
    next: Instant,
    /// The stream the task came on.
    origin: StreamId,
}

/// The tasks the worker holds (whichever stream they came on), keyed by (run id, fencing
/// token).
#[derive(Debug, Clone, Default)]
pub(crate) struct HeldTasks {
    inner: Arc<Mutex<Held>>,
    /// Told when a task is held whose heartbeat is due before any other's: wakes
    /// [`Self::due`] (tasks handed out ahead are held by their delivery, later).
    sooner: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Held {
    tasks: HashMap<(String, u64), Entry>,
    /// No held task's heartbeat is due before this (a task let go may have been the one
    /// due then): finding the next heartbeat costs nothing, and the tasks are walked
    /// only when it comes, however many are held.
    earliest: Option<Instant>,
}

/// Keeps a task in its [`HeldTasks`] until dropped (the result was sent, or the delivery
/// was aborted).
#[derive(Debug)]
pub(crate) struct Hold {
    held: HeldTasks,
    key: Option<(String, u64)>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.held.lock().tasks.remove(&key);
        }
    }
}

impl HeldTasks {
    fn lock(&self) -> MutexGuard<'_, Held> {
        // Nothing here can be left half-updated by a panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds `task`, which came on stream `origin`, from now until the returned [`Hold`]
    /// is dropped. A task without a deadline is not heartbeated.
    pub(crate) fn hold(&self, task: &Task, origin: StreamId) -> Hold {
        let Some(every) = interval(task.deadline_ms, wall_clock_ms()) else {
            return Hold {
                held: self.clone(),
                key: None,
            };
        };
        let key = (task.run_id.clone(), task.fencing_token);
        let entry = Entry {
            every,
            next: Instant::now() + every,
            origin,
        };
        let mut held = self.lock();
        let sooner = held.tasks.is_empty() || held.earliest.is_none_or(|at| entry.next < at);
        held.earliest = Some(held.earliest.map_or(entry.next, |at| at.min(entry.next)));
        held.tasks.insert(key.clone(), entry);
        drop(held);
        if sooner {
            self.sooner.notify_waiters();
        }
        Hold {
            held: self.clone(),
            key: Some(key),
        }
    }

    /// No heartbeat is due before this (exact after [`Self::beat`], and never later
    /// than the next one); `None` while nothing is held.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let held = self.lock();
        if held.tasks.is_empty() {
            return None;
        }
        held.earliest
    }

    /// Completes when the next heartbeat is due (never while nothing is held), including
    /// that of a task held meanwhile.
    pub(crate) async fn due(&self) {
        loop {
            let sooner = self.sooner.notified();
            tokio::pin!(sooner);
            // Registered before reading the state, so a task held in between is not missed.
            sooner.as_mut().enable();
            match self.next_due() {
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at) => return,
                    () = &mut sooner => {}
                },
                None => sooner.await,
            }
        }
    }

    /// The heartbeats to send at `now`, when some held task's interval has passed: one
    /// per stream the held tasks came on, listing every such task; every task's interval
    /// starts over.
    pub(crate) fn beat(&self, now: Instant) -> Vec<(StreamId, Heartbeat)> {
        let mut held = self.lock();
        if held.earliest.is_none_or(|at| at > now) {
            return Vec::new();
        }
        let due = held.tasks.values().map(|e| e.next).min();
        if due.is_none_or(|at| at > now) {
            // The task due then was let go: look again when the next one is due.
            held.earliest = due;
            return Vec::new();
        }
        let mut beats: HashMap<StreamId, Heartbeat> = HashMap::new();
        let mut earliest: Option<Instant> = None;
        for ((run_id, fencing_token), entry) in &mut held.tasks {
            entry.next = now + entry.every;
            earliest = Some(earliest.map_or(entry.next, |at| at.min(entry.next)));
            beats.entry(entry.origin).or_default().tasks.push(TaskRef {
                run_id: run_id.clone(),
                fencing_token: *fencing_token,
            });
        }
        held.earliest = earliest;
        beats.into_iter().collect()
    }
}

/// A heartbeat as a stream message.
pub(crate) fn message(heartbeat: Heartbeat) -> WorkerMessage {
    WorkerMessage {
        kind: Some(worker_message::Kind::Heartbeat(heartbeat)),
    }
}

fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_a_third_of_the_remaining_lease_between_100ms_and_1s() {
        let now = 1_700_000_000_000;
        assert_eq!(interval(0, now), None, "no deadline, no heartbeat");
        assert_eq!(interval(now + 30_000, now), Some(MAX_INTERVAL));
        assert_eq!(interval(now + 2_000, now), Some(Duration::from_millis(666)));
        assert_eq!(interval(now + 150, now), Some(MIN_INTERVAL));
        assert_eq!(
            interval(now - 5_000, now),
            Some(MIN_INTERVAL),
            "clocks apart"
        );
    }

    fn task(run_id: &str, fencing_token: u64, lease_ms: i64) -> Task {
        Task {
            run_id: run_id.to_owned(),
            fencing_token,
            deadline_ms: wall_clock_ms() + lease_ms,
            ..Task::default()
        }
    }

    /// A task held while `due` waits (a send handed out ahead, held once its delay is
    /// over) is heartbeated on time, not when something else wakes the worker.
    #[tokio::test]
    async fn due_wakes_for_a_task_held_while_it_waits() {
        let held = HeldTasks::default();
        let waiting = tokio::spawn({
            let held = held.clone();
            async move { held.due().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "nothing is held");
        let _task = held.hold(&task("run-1", 1, 600), 1);
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("due() completes by the new task's interval")
            .expect("no panic");
    }

    #[test]
    fn one_heartbeat_per_stream_lists_its_held_tasks_once_some_interval_passed() {
        let held = HeldTasks::default();
        let before = Instant::now();
        let slow = held.hold(&task("run-1", 7, 30_000), 1);
        let short = held.hold(&task("run-2", 3, 600), 1);
        let other = held.hold(&task("run-3", 4, 30_000), 2);
        let _unleased = held.hold(&Task::default(), 1);
        let after = Instant::now();
        let due = held.next_due().expect("run-2 is held");
        assert!(
            due >= before + Duration::from_millis(190) && due <= after + Duration::from_millis(200)
        );
        assert!(held.beat(before).is_empty(), "nothing is due yet");

        let at = after + Duration::from_millis(200);
        let mut listed: Vec<(StreamId, String, u64)> = held
            .beat(at)
            .into_iter()
            .flat_map(|(stream, beat)| {
                beat.tasks
                    .into_iter()
                    .map(move |t| (stream, t.run_id, t.fencing_token))
            })
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                (1, "run-1".to_owned(), 7),
                (1, "run-2".to_owned(), 3),
                (2, "run-3".to_owned(), 4)
            ]
        );
        assert!(held.beat(at).is_empty(), "every interval starts over");
        assert_eq!(held.next_due(), Some(at + Duration::from_millis(200)));

        drop(short);
        let then = at + Duration::from_millis(200);
        assert!(
            held.beat(then).is_empty(),
            "run-2 was let go: nothing is due"
        );
        assert_eq!(held.next_due(), Some(at + MAX_INTERVAL));
        drop((slow, other));
        assert_eq!(
            held.next_due(),
            None,
            "a task without a deadline is not heartbeated"
        );
    }
}
