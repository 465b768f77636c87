//! Results on their way to the schedulers, kept across re-attaches.
//!
//! The worker holds one stream per scheduler it knows of. A delivery's result goes out
//! on the stream its task came on when that is open, else on any open one (a scheduler
//! applies a result for a task another scheduler handed out by its fencing token). While
//! no stream is open (a network blip, a lapsed keepalive, restarting schedulers) results
//! are kept, and the next stream sends them first, right after Welcome, whichever
//! scheduler it reaches: the fencing token in each result makes one whose lease is gone
//! harmless there.
//!
//! A result handed to a stream that breaks soon after may never have left the machine
//! (the stream has no acknowledgements), so results stay kept, "in doubt", for
//! [`IN_DOUBT_FOR`] after they were sent, and when their stream breaks meanwhile they
//! are sent again on another open stream, or on the next one. A scheduler refuses the
//! second copy of a result it already recorded like any stale result, so that costs
//! nothing but a lookup.
//!
//! At most [`MAX_KEPT`] results are kept; beyond that the oldest is dropped (with a
//! warning when it was never sent) and its step goes out again when its lease expires.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use touchpoint_proto::v1::{TaskProgress, TaskResult, WorkerMessage, worker_message};
use tracing::{debug, info, warn};

/// Most results kept (never sent, or sent and still in doubt).
pub(crate) const MAX_KEPT: usize = 10_000;

/// How long a sent result is kept in case its stream turns out to be broken: longer than
/// the keepalive takes to notice a connection that died silently (a ping every 10 s,
/// answered within 5 s).
pub(crate) const IN_DOUBT_FOR: Duration = Duration::from_secs(20);

/// Names one of the worker's streams (one per scheduler address it attaches to).
pub(crate) type StreamId = u64;

#[derive(Debug)]
struct Kept {
    result: TaskResult,
    /// The stream its task came on.
    origin: StreamId,
    /// The stream it was handed to and when; `None` while it waits for one.
    sent: Option<(StreamId, Instant)>,
}

#[derive(Debug, Default)]
struct State {
    /// The open streams, in the order they opened.
    streams: Vec<(StreamId, mpsc::UnboundedSender<WorkerMessage>)>,
    /// Oldest first.
    kept: VecDeque<Kept>,
    /// Results dropped unsent since the link went down.
    dropped: u64,
    /// "Link down" was logged since a stream last opened.
    told_down: bool,
}

/// The worker's outgoing messages, shared by every stream and every delivery.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outbox {
    state: Arc<Mutex<State>>,
}

fn message(result: TaskResult) -> WorkerMessage {
    WorkerMessage {
        kind: Some(worker_message::Kind::Result(result)),
    }
}

impl State {
    /// Forgets sent results older than [`IN_DOUBT_FOR`] from the front (oldest first).
    fn forget_confirmed(&mut self, now: Instant) {
        while self
            .kept
            .front()
            .and_then(|k| k.sent)
            .is_some_and(|(_, at)| now.duration_since(at) >= IN_DOUBT_FOR)
        {
            self.kept.pop_front();
        }
    }

    fn keep(&mut self, kept: Kept) {
        if self.kept.len() >= MAX_KEPT
            && let Some(oldest) = self.kept.pop_front()
        {
            if oldest.sent.is_none() {
                if self.dropped == 0 {
                    warn!(
                        max = MAX_KEPT,
                        "too many results kept while the scheduler link is down; dropping the oldest (their steps go out again when their leases expire)"
                    );
                }
                self.dropped += 1;
            } else {
                debug!("forgetting a sent result early: too many kept");
            }
        }
        self.kept.push_back(kept);
    }

    /// Sends `message` on stream `preferred` if it is open, else on the first open one;
    /// forgets streams found closed. Returns the stream it went on.
    fn route(&mut self, preferred: StreamId, message: WorkerMessage) -> Option<StreamId> {
        let mut order: Vec<StreamId> = self.streams.iter().map(|(id, _)| *id).collect();
        // Stable: the preferred stream first, then the others in the order they opened.
        order.sort_by_key(|id| *id != preferred);
        for id in order {
            let Some(at) = self.streams.iter().position(|(open, _)| *open == id) else {
                continue;
            };
            if self.streams[at].1.send(message.clone()).is_ok() {
                return Some(id);
            }
            // The stream's receiving side is gone; its `detach` follows shortly.
            debug!("stream closed under a message; trying another");
            self.streams.remove(at);
        }
        None
    }

    /// Sends every kept result not sent yet, oldest first, each on its task's stream if
    /// open, else on any; returns how many went.
    fn send_unsent(&mut self, now: Instant) -> usize {
        let mut sent = 0;
        for at in 0..self.kept.len() {
            let Some(kept) = self.kept.get(at).filter(|k| k.sent.is_none()) else {
                continue;
            };
            let (origin, result) = (kept.origin, kept.result.clone());
            let Some(stream) = self.route(origin, message(result)) else {
                break;
            };
            if let Some(kept) = self.kept.get_mut(at) {
                kept.sent = Some((stream, now));
            }
            sent += 1;
        }
        sent
    }
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here is left half-updated by a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many streams are open.
    pub(crate) fn open_streams(&self) -> usize {
        self.lock().streams.len()
    }

    /// Sends `progress` of a task that came on `origin`, on that stream or any open one;
    /// drops it when none is open (progress is advisory: the result that follows is what
    /// counts).
    pub(crate) fn progress(&self, progress: TaskProgress, origin: StreamId) {
        let message = WorkerMessage {
            kind: Some(worker_message::Kind::Progress(progress)),
        };
        self.lock().route(origin, message);
    }

    /// Sends `result` of a task that came on `origin`, on that stream or any open one, or
    /// keeps it for the next one.
    pub(crate) fn send(&self, result: TaskResult, origin: StreamId) {
        self.send_at(result, origin, Instant::now());
    }

    fn send_at(&self, result: TaskResult, origin: StreamId, now: Instant) {
        let mut state = self.lock();
        state.forget_confirmed(now);
        let sent = state
            .route(origin, message(result.clone()))
            .map(|stream| (stream, now));
        if sent.is_none() && !state.told_down {
            state.told_down = true;
            info!("scheduler link down; keeping results for the next stream");
        }
        state.keep(Kept {
            result,
            origin,
            sent,
        });
    }

    /// Stream `id` is open (Welcome received): sends every kept result not sent yet on
    /// it first, oldest first, then sends on it until [`Outbox::detach`]. Returns how
    /// many were sent.
    pub(crate) fn attach(
        &self,
        id: StreamId,
        stream: mpsc::UnboundedSender<WorkerMessage>,
    ) -> usize {
        self.attach_at(id, stream, Instant::now())
    }

    fn attach_at(
        &self,
        id: StreamId,
        stream: mpsc::UnboundedSender<WorkerMessage>,
        now: Instant,
    ) -> usize {
        let mut state = self.lock();
        state.forget_confirmed(now);
        let unsent = state.kept.iter().filter(|k| k.sent.is_none()).count();
        let dropped = std::mem::take(&mut state.dropped);
        state.told_down = false;
        state.streams.retain(|(open, _)| *open != id);
        state.streams.push((id, stream));
        let resent = state.send_unsent(now);
        if resent > 0 || dropped > 0 {
            info!(
                unsent,
                dropped, "sending results kept while the scheduler link was down"
            );
        }
        resent
    }

    /// Stream `id` broke: the results sent on it lately are sent again on another open
    /// stream, or kept for the next one.
    pub(crate) fn detach(&self, id: StreamId) {
        self.detach_at(id, Instant::now());
    }

    fn detach_at(&self, id: StreamId, now: Instant) {
        let mut state = self.lock();
        state.forget_confirmed(now);
        state.streams.retain(|(open, _)| *open != id);
        for kept in &mut state.kept {
            if kept.sent.is_some_and(|(stream, _)| stream == id) {
                kept.sent = None;
            }
        }
        state.send_unsent(now);
    }

    /// Sends `message` on every open stream.
    pub(crate) fn send_to_each(&self, message: &WorkerMessage) {
        for (_, stream) in &self.lock().streams {
            let _ = stream.send(message.clone());
        }
    }

    /// Sends `message` (a heartbeat) for tasks that came on `origin`, on that stream or
    /// any open one; nothing is kept for later.
    pub(crate) fn send_now(&self, message: WorkerMessage, origin: StreamId) {
        self.lock().route(origin, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(run_id: &str) -> TaskResult {
        TaskResult {
            run_id: run_id.to_owned(),
            fencing_token: 7,
            ..TaskResult::default()
        }
    }

    fn received(rx: &mut mpsc::UnboundedReceiver<WorkerMessage>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(message) = rx.try_recv() {
            match message.kind {
                Some(worker_message::Kind::Result(r)) => out.push(r.run_id),
                other => out.push(format!("{other:?}")),
            }
        }
        out
    }

    #[test]
    fn results_kept_while_down_go_first_on_the_next_stream() {
        let outbox = Outbox::default();
        outbox.send(result("run-1"), 1);
        outbox.send(result("run-2"), 1);

        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(outbox.attach(2, tx), 2);
        outbox.send(result("run-3"), 1);
        assert_eq!(received(&mut rx), ["run-1", "run-2", "run-3"]);
    }

    #[test]
    fn results_sent_just_before_a_break_are_sent_again() {
        let outbox = Outbox::default();
        let start = Instant::now();
        let later = start + IN_DOUBT_FOR;
        let (tx, mut rx) = mpsc::unbounded_channel();
        outbox.attach_at(1, tx, start);
        outbox.send_at(result("old"), 1, start);
        outbox.send_at(result("recent"), 1, later);
        assert_eq!(received(&mut rx), ["old", "recent"]);

        outbox.detach_at(1, later);
        outbox.send_at(result("while-down"), 1, later + IN_DOUBT_FOR);
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(
            outbox.attach_at(1, tx, later + IN_DOUBT_FOR * 2),
            2,
            "the old result was confirmed by time, nothing is confirmed while down"
        );
        assert_eq!(received(&mut rx), ["recent", "while-down"]);
    }

    #[test]
    fn a_result_goes_back_on_its_tasks_stream_else_on_another() {
        let outbox = Outbox::default();
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        outbox.attach(1, tx1);
        outbox.attach(2, tx2);
        outbox.send(result("from-2"), 2);
        outbox.send(result("from-1"), 1);
        outbox.send(result("from-gone"), 3);
        assert_eq!(received(&mut rx1), ["from-1", "from-gone"]);
        assert_eq!(received(&mut rx2), ["from-2"]);

        outbox.detach(2);
        assert_eq!(
            received(&mut rx1),
            ["from-2"],
            "what stream 2 had in doubt goes again on stream 1"
        );
        outbox.send(result("late-from-2"), 2);
        assert_eq!(received(&mut rx1), ["late-from-2"]);
        assert_eq!(outbox.open_streams(), 1);
    }

    #[test]
    fn a_closed_stream_keeps_the_result() {
        let outbox = Outbox::default();
        let (tx, rx) = mpsc::unbounded_channel();
        outbox.attach(1, tx);
        drop(rx);
        outbox.send(result("run-1"), 1);
        let (tx, mut rx) = mpsc::unbounded_channel();
        outbox.attach(1, tx);
        assert_eq!(received(&mut rx), ["run-1"]);
    }

    #[test]
    fn at_most_max_kept_results_the_oldest_dropped() {
        let outbox = Outbox::default();
        for i in 0..MAX_KEPT + 2 {
            outbox.send(result(&format!("run-{i}")), 1);
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(outbox.attach(1, tx), MAX_KEPT);
        let got = received(&mut rx);
        assert_eq!(got.len(), MAX_KEPT);
        assert_eq!(got[0], "run-2");
        assert_eq!(got[MAX_KEPT - 1], format!("run-{}", MAX_KEPT + 1));
    }

    #[test]
    fn heartbeats_are_not_kept() {
        let outbox = Outbox::default();
        let beat = || crate::heartbeat::message(touchpoint_proto::v1::Heartbeat::default());
        outbox.send_now(beat(), 1);
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(outbox.attach(1, tx), 0);
        outbox.send_now(beat(), 1);
        assert_eq!(received(&mut rx).len(), 1);
    }
}
