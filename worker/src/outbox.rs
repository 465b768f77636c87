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
//! At most [`MAX_IN_DOUBT`] sent results are kept; beyond that the oldest is forgotten
//! early. Results never sent are bounded by the tasks a worker can hold (its capacity
//! and what it holds ahead, a burst of tens of thousands due at one instant), so they
//! are kept up to [`MAX_UNSENT`], beyond which the oldest is dropped with a warning and
//! its step goes out again when its lease expires.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use touchpoint_proto::v1::{TaskProgress, TaskResult, WorkerMessage, worker_message};
use tracing::{debug, info, warn};

/// Most sent results kept while in doubt.
pub(crate) const MAX_IN_DOUBT: usize = 10_000;

/// Most results kept unsent: every task a worker may hold (its capacity and what it
/// holds ahead, at their most), and the results in doubt when a stream breaks.
pub(crate) const MAX_UNSENT: usize = touchpoint_proto::MAX_WORKER_CAPACITY as usize
    + touchpoint_proto::MAX_HOLD_AHEAD as usize
    + MAX_IN_DOUBT;

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
}

/// A result sent on `stream` at `at`, kept while in doubt.
#[derive(Debug)]
struct InDoubt {
    kept: Kept,
    stream: StreamId,
    at: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// The open streams, in the order they opened.
    streams: Vec<(StreamId, mpsc::UnboundedSender<WorkerMessage>)>,
    /// Results waiting for a stream, oldest first.
    unsent: VecDeque<Kept>,
    /// Results sent lately, oldest first.
    in_doubt: VecDeque<InDoubt>,
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
    /// Forgets sent results older than [`IN_DOUBT_FOR`].
    fn forget_confirmed(&mut self, now: Instant) {
        while self
            .in_doubt
            .front()
            .is_some_and(|sent| now.duration_since(sent.at) >= IN_DOUBT_FOR)
        {
            self.in_doubt.pop_front();
        }
    }

    fn keep_sent(&mut self, kept: Kept, stream: StreamId, at: Instant) {
        if self.in_doubt.len() >= MAX_IN_DOUBT {
            self.in_doubt.pop_front();
        }
        self.in_doubt.push_back(InDoubt { kept, stream, at });
    }

    fn keep_unsent(&mut self, kept: Kept) {
        if self.unsent.len() >= MAX_UNSENT {
            self.unsent.pop_front();
            if self.dropped == 0 {
                warn!(
                    max = MAX_UNSENT,
                    "too many results kept while the scheduler link is down; dropping the oldest (their steps go out again when their leases expire)"
                );
            }
            self.dropped += 1;
        }
        self.unsent.push_back(kept);
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
        while let Some(kept) = self.unsent.pop_front() {
            let Some(stream) = self.route(kept.origin, message(kept.result.clone())) else {
                self.unsent.push_front(kept);
                break;
            };
            self.keep_sent(kept, stream, now);
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
        let kept = Kept { result, origin };
        match state.route(origin, message(kept.result.clone())) {
            Some(stream) => state.keep_sent(kept, stream, now),
            None => {
                if !state.told_down {
                    state.told_down = true;
                    info!("scheduler link down; keeping results for the next stream");
                }
                state.keep_unsent(kept);
            }
        }
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
        let unsent = state.unsent.len();
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
        // What went on it lately goes again, before what waited already (oldest first).
        let (lost, kept): (VecDeque<InDoubt>, VecDeque<InDoubt>) =
            std::mem::take(&mut state.in_doubt)
                .into_iter()
                .partition(|sent| sent.stream == id);
        state.in_doubt = kept;
        for sent in lost.into_iter().rev() {
            state.unsent.push_front(sent.kept);
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
    fn at_most_max_unsent_results_the_oldest_dropped() {
        let outbox = Outbox::default();
        for i in 0..MAX_UNSENT + 2 {
            outbox.send(result(&format!("run-{i}")), 1);
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(outbox.attach(1, tx), MAX_UNSENT);
        let got = received(&mut rx);
        assert_eq!(got.len(), MAX_UNSENT);
        assert_eq!(got[0], "run-2");
        assert_eq!(got[MAX_UNSENT - 1], format!("run-{}", MAX_UNSENT + 1));
    }

    #[test]
    fn a_burst_of_results_in_doubt_when_the_stream_breaks_is_kept_whole() {
        // A burst due at one instant: more results than are kept in doubt go out at
        // once, the stream breaks, more come while it is down; none may be dropped.
        let outbox = Outbox::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        outbox.attach(1, tx);
        let burst = MAX_IN_DOUBT * 3;
        for i in 0..burst {
            outbox.send(result(&format!("run-{i}")), 1);
        }
        assert_eq!(received(&mut rx).len(), burst);
        outbox.detach(1);
        for i in burst..burst * 2 {
            outbox.send(result(&format!("run-{i}")), 1);
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(outbox.attach(2, tx), MAX_IN_DOUBT + burst);
        let got = received(&mut rx);
        assert_eq!(
            got[0],
            format!("run-{}", burst - MAX_IN_DOUBT),
            "the latest in doubt first"
        );
        assert_eq!(got.last(), Some(&format!("run-{}", burst * 2 - 1)));
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
