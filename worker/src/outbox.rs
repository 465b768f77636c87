//! Results on their way to the scheduler, kept across re-attaches.
//!
//! A delivery's result goes out on whichever stream is open when it finishes. While no
//! stream is open (the link is down: a network blip, a lapsed keepalive, a restarting
//! scheduler) results are kept, and the next stream sends them first, right after
//! Welcome, whichever scheduler it reaches: the fencing token in each result makes one
//! whose lease is gone harmless there.
//!
//! A result handed to a stream that breaks soon after may never have left the machine
//! (the stream has no acknowledgements), so results stay kept, "in doubt", for
//! [`IN_DOUBT_FOR`] after they were sent, and a stream that breaks meanwhile has them
//! sent again on the next one. A scheduler refuses the second copy of a result it
//! already recorded like any stale result, so that costs nothing but a lookup.
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

#[derive(Debug)]
struct Kept {
    result: TaskResult,
    /// When it was handed to a stream; `None` while it waits for one.
    sent_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    /// The open stream, if any.
    stream: Option<mpsc::UnboundedSender<WorkerMessage>>,
    /// Oldest first. While a stream is open, every entry was sent on it.
    kept: VecDeque<Kept>,
    /// Results dropped unsent since the link went down.
    dropped: u64,
    /// "Link down" was logged since the last stream opened.
    told_down: bool,
}

/// The worker's outgoing results, shared by every stream and every delivery.
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
    /// Forgets sent results older than [`IN_DOUBT_FOR`] (kept in sending order).
    fn forget_confirmed(&mut self, now: Instant) {
        while self
            .kept
            .front()
            .and_then(|k| k.sent_at)
            .is_some_and(|at| now.duration_since(at) >= IN_DOUBT_FOR)
        {
            self.kept.pop_front();
        }
    }

    fn keep(&mut self, kept: Kept) {
        if self.kept.len() >= MAX_KEPT
            && let Some(oldest) = self.kept.pop_front()
        {
            if oldest.sent_at.is_none() {
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
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here is left half-updated by a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `progress` on the open stream; drops it when the link is down (progress is
    /// advisory: the result that follows is what counts).
    pub(crate) fn progress(&self, progress: TaskProgress) {
        let state = self.lock();
        if let Some(stream) = &state.stream {
            let _ = stream.send(WorkerMessage {
                kind: Some(worker_message::Kind::Progress(progress)),
            });
        }
    }

    /// Sends `result` on the open stream, or keeps it for the next one.
    pub(crate) fn send(&self, result: TaskResult) {
        self.send_at(result, Instant::now());
    }

    fn send_at(&self, result: TaskResult, now: Instant) {
        let mut state = self.lock();
        state.forget_confirmed(now);
        let sent = match &state.stream {
            Some(stream) => stream.send(message(result.clone())).is_ok(),
            None => false,
        };
        if !sent && state.stream.take().is_some() {
            // The stream's receiving side is gone; `detach` follows shortly.
            debug!("stream closed under a result; keeping it for the next stream");
        }
        if !sent && !state.told_down {
            state.told_down = true;
            info!("scheduler link down; keeping results for the next stream");
        }
        state.keep(Kept {
            result,
            sent_at: sent.then_some(now),
        });
    }

    /// A stream is open (Welcome received): sends every kept result on it first, oldest
    /// first, then sends new results on it until [`Outbox::detach`]. Returns how many
    /// were sent again.
    pub(crate) fn attach(&self, stream: mpsc::UnboundedSender<WorkerMessage>) -> usize {
        self.attach_at(stream, Instant::now())
    }

    fn attach_at(&self, stream: mpsc::UnboundedSender<WorkerMessage>, now: Instant) -> usize {
        let mut state = self.lock();
        state.forget_confirmed(now);
        let unsent = state.kept.iter().filter(|k| k.sent_at.is_none()).count();
        let in_doubt = state.kept.len() - unsent;
        let dropped = std::mem::take(&mut state.dropped);
        state.told_down = false;
        let mut resent = 0;
        for kept in &mut state.kept {
            if stream.send(message(kept.result.clone())).is_err() {
                break;
            }
            kept.sent_at = Some(now);
            resent += 1;
        }
        if resent > 0 || dropped > 0 {
            info!(
                unsent,
                in_doubt, dropped, "sending results kept while the scheduler link was down"
            );
        }
        state.stream = Some(stream);
        resent
    }

    /// The stream broke: results are kept from now on, and those sent on it lately are
    /// sent again on the next one.
    pub(crate) fn detach(&self) {
        self.detach_at(Instant::now());
    }

    fn detach_at(&self, now: Instant) {
        let mut state = self.lock();
        state.forget_confirmed(now);
        state.stream = None;
        for kept in &mut state.kept {
            kept.sent_at = None;
        }
    }

    /// Sends `message` (a heartbeat) on the open stream; nothing is kept for later.
    pub(crate) fn send_now(&self, message: WorkerMessage) {
        if let Some(stream) = &self.lock().stream {
            let _ = stream.send(message);
        }
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
        outbox.send(result("run-1"));
        outbox.send(result("run-2"));

        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(outbox.attach(tx), 2);
        outbox.send(result("run-3"));
        assert_eq!(received(&mut rx), ["run-1", "run-2", "run-3"]);
    }

    #[test]
    fn results_sent_just_before_a_break_are_sent_again() {
        let outbox = Outbox::default();
        let start = Instant::now();
        let later = start + IN_DOUBT_FOR;
        let (tx, mut rx) = mpsc::unbounded_channel();
        outbox.attach_at(tx, start);
        outbox.send_at(result("old"), start);
        outbox.send_at(result("recent"), later);
        assert_eq!(received(&mut rx), ["old", "recent"]);

        outbox.detach_at(later);
        outbox.send_at(result("while-down"), later + IN_DOUBT_FOR);
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(
            outbox.attach_at(tx, later + IN_DOUBT_FOR * 2),
            2,
            "the old result was confirmed by time, nothing is confirmed while down"
        );
        assert_eq!(received(&mut rx), ["recent", "while-down"]);
    }

    #[test]
    fn a_closed_stream_keeps_the_result() {
        let outbox = Outbox::default();
        let (tx, rx) = mpsc::unbounded_channel();
        outbox.attach(tx);
        drop(rx);
        outbox.send(result("run-1"));
        let (tx, mut rx) = mpsc::unbounded_channel();
        outbox.attach(tx);
        assert_eq!(received(&mut rx), ["run-1"]);
    }

    #[test]
    fn at_most_max_kept_results_the_oldest_dropped() {
        let outbox = Outbox::default();
        for i in 0..MAX_KEPT + 2 {
            outbox.send(result(&format!("run-{i}")));
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(outbox.attach(tx), MAX_KEPT);
        let got = received(&mut rx);
        assert_eq!(got.len(), MAX_KEPT);
        assert_eq!(got[0], "run-2");
        assert_eq!(got[MAX_KEPT - 1], format!("run-{}", MAX_KEPT + 1));
    }

    #[test]
    fn heartbeats_are_not_kept() {
        let outbox = Outbox::default();
        let beat = || crate::heartbeat::message(touchpoint_proto::v1::Heartbeat::default());
        outbox.send_now(beat());
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert_eq!(outbox.attach(tx), 0);
        outbox.send_now(beat());
        assert_eq!(received(&mut rx).len(), 1);
    }
}
