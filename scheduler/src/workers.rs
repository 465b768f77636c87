//! Connected workers: which channels each serves, how many tasks it holds, and the
//! sender of its stream. Tasks go to the least-loaded worker serving their channel, and
//! never beyond the capacity it announced, in all and per channel (credit-based flow
//! control), so a channel whose provider hangs fills only its own slots. Workers also
//! announce their channels' rate limits; see [`Workers::channel_rate`]. Steps handed
//! out ahead of their due time count apart, against what each worker said it holds
//! ahead (`Hello.hold_ahead`).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{playbook::RetryOverrides, store::Rate};
use tonic::Status;
use touchpoint_proto::v1::SchedulerMessage;

/// How long a worker marked unresponsive gets no new tasks (unless it speaks first).
const UNRESPONSIVE_FOR: Duration = Duration::from_secs(5);

/// The sending half of one worker's stream.
pub(crate) type WorkerSender = mpsc::Sender<Result<SchedulerMessage, Status>>;

/// Identifies one worker connection (a reconnecting worker gets a new one).
pub(crate) type ConnectionId = u64;

#[derive(Debug)]
struct Worker {
    worker_id: String,
    /// Slots by channel name: the channels it serves.
    channels: HashMap<String, Slots>,
    capacity: u32,
    in_flight: u32,
    /// Most steps handed out ahead it holds, and how many it holds.
    hold_ahead: u32,
    ahead: u32,
    /// What it announced at Hello (capacity, hold ahead): a share never exceeds it.
    announced: (u32, u32),
    /// Lost a lease without reporting or heartbeating (hung, or frozen): gets no new
    /// tasks until it says anything again, or until then. (An idle worker sends
    /// nothing, so a mark for good would leave a live one that lost a task unused.)
    unresponsive_until: Option<Instant>,
    /// When it last sent anything.
    last_heard: Instant,
    /// Retry defaults it announced, by channel name.
    retry: HashMap<String, RetryOverrides>,
    /// Rate limits it announced, by channel name.
    rate: HashMap<String, Rate>,
    sender: WorkerSender,
}

/// Tasks of one channel a worker may hold, and holds.
#[derive(Debug, Clone, Copy)]
struct Slots {
    capacity: u32,
    in_flight: u32,
}

impl Worker {
    /// Not marked unresponsive, or past the mark.
    fn responsive(&self) -> bool {
        self.unresponsive_until
            .is_none_or(|until| Instant::now() >= until)
    }

    fn has_room_for(&self, channel: &str) -> bool {
        self.responsive()
            && self.in_flight < self.capacity
            && self
                .channels
                .get(channel)
                .is_some_and(|slots| slots.in_flight < slots.capacity)
    }

    /// Free slots: the least of the worker's and the sum of its channels'.
    fn free(&self) -> u32 {
        let channels: u32 = self
            .channels
            .values()
            .map(|slots| slots.capacity.saturating_sub(slots.in_flight))
            .fold(0, u32::saturating_add);
        self.capacity.saturating_sub(self.in_flight).min(channels)
    }

    fn take(&mut self, channel: &str, count: u32) {
        self.in_flight = self.in_flight.saturating_add(count);
        if let Some(slots) = self.channels.get_mut(channel) {
            slots.in_flight = slots.in_flight.saturating_add(count);
        }
    }

    fn give_back(&mut self, channel: &str) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(slots) = self.channels.get_mut(channel) {
            slots.in_flight = slots.in_flight.saturating_sub(1);
        }
    }
}

/// Why a task could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoWorker {
    /// No connected worker serves the channel.
    ForChannel,
    /// Every worker serving it is at capacity.
    AllBusy,
}

/// The connected workers of this scheduler.
#[derive(Debug, Default)]
pub(crate) struct Workers {
    inner: Mutex<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: ConnectionId,
    workers: HashMap<ConnectionId, Worker>,
}

impl Workers {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a worker that said Hello: `capacity` tasks at most in all, and on each of
    /// `channels` at most its `channel_capacity` (`capacity` when it gives none); and
    /// besides them `hold_ahead` steps handed out ahead.
    pub(crate) fn register(
        &self,
        worker_id: String,
        channels: Vec<String>,
        (capacity, hold_ahead): (u32, u32),
        channel_capacity: &HashMap<String, u32>,
        sender: WorkerSender,
    ) -> ConnectionId {
        let channels: HashMap<String, Slots> = channels
            .into_iter()
            .map(|channel| {
                let slots = Slots {
                    capacity: channel_capacity
                        .get(&channel)
                        .copied()
                        .unwrap_or(capacity)
                        .min(capacity),
                    in_flight: 0,
                };
                (channel, slots)
            })
            .collect();
        for channel in channels.keys() {
            connected(channel).inc();
        }
        let mut registry = self.registry();
        registry.next_id += 1;
        let id = registry.next_id;
        registry.workers.insert(
            id,
            Worker {
                worker_id,
                channels,
                capacity,
                in_flight: 0,
                hold_ahead,
                ahead: 0,
                announced: (capacity, hold_ahead),
                unresponsive_until: None,
                last_heard: Instant::now(),
                retry: HashMap::new(),
                rate: HashMap::new(),
                sender,
            },
        );
        id
    }

    /// A worker attached to several schedulers gave this one a share of its slots
    /// (`Share`): from now on it is handed no more than that (at least one slot in all
    /// and per channel; channels it did not announce at Hello are ignored).
    pub(crate) fn set_share(
        &self,
        connection: ConnectionId,
        capacity: u32,
        channel_capacity: &HashMap<String, u32>,
        hold_ahead: u32,
    ) {
        if let Some(worker) = self.registry().workers.get_mut(&connection) {
            worker.capacity = capacity.clamp(1, worker.announced.0);
            worker.hold_ahead = hold_ahead.min(worker.announced.1);
            for (channel, slots) in &mut worker.channels {
                let share = channel_capacity.get(channel).copied().unwrap_or(capacity);
                slots.capacity = share.clamp(1, worker.capacity);
            }
        }
    }

    /// Records the retry defaults a worker announced for its channels.
    pub(crate) fn set_channel_retry(
        &self,
        connection: ConnectionId,
        retry: HashMap<String, RetryOverrides>,
    ) {
        if let Some(worker) = self.registry().workers.get_mut(&connection) {
            worker.retry = retry;
        }
    }

    /// The retry defaults announced for `channel` (by any connected worker serving it;
    /// workers of one channel are expected to share one configuration).
    pub(crate) fn channel_retry(&self, channel: &str) -> RetryOverrides {
        self.registry()
            .workers
            .values()
            .find_map(|w| w.retry.get(channel).copied())
            .unwrap_or_default()
    }

    /// Records the rate limits a worker announced for its channels.
    pub(crate) fn set_channel_rate(&self, connection: ConnectionId, rate: HashMap<String, Rate>) {
        if let Some(worker) = self.registry().workers.get_mut(&connection) {
            worker.rate = rate;
        }
    }

    /// The rate limit of `channel`: the lowest rate and the lowest burst announced by
    /// the connected workers (so a worker configured more strictly, e.g. for a smaller
    /// provider quota, is honoured by all); `None` when none announced one. The limit
    /// holds for the channel as a whole, over every worker and every scheduler.
    pub(crate) fn channel_rate(&self, channel: &str) -> Option<Rate> {
        self.registry()
            .workers
            .values()
            .filter_map(|w| w.rate.get(channel))
            .fold(None, |lowest: Option<Rate>, rate| {
                Some(match lowest {
                    None => *rate,
                    Some(low) => Rate {
                        per_second: low.per_second.min(rate.per_second),
                        burst: low.burst.min(rate.burst),
                    },
                })
            })
    }

    /// Removes a worker whose stream ended.
    pub(crate) fn remove(&self, connection: ConnectionId) {
        if let Some(worker) = self.registry().workers.remove(&connection) {
            for channel in worker.channels.keys() {
                connected(channel).dec();
            }
        }
    }

    /// Reserves a slot on the least-loaded worker serving `channel`.
    pub(crate) fn reserve(
        &self,
        channel: &str,
    ) -> Result<(ConnectionId, String, WorkerSender), NoWorker> {
        let mut registry = self.registry();
        let mut serving = registry
            .workers
            .iter_mut()
            .filter(|(_, w)| w.channels.contains_key(channel))
            .peekable();
        if serving.peek().is_none() {
            return Err(NoWorker::ForChannel);
        }
        let (id, worker) = serving
            .filter(|(_, w)| w.has_room_for(channel))
            .min_by_key(|(_, w)| u64::from(w.in_flight) * 1_000_000 / u64::from(w.capacity.max(1)))
            .ok_or(NoWorker::AllBusy)?;
        worker.take(channel, 1);
        Ok((*id, worker.worker_id.clone(), worker.sender.clone()))
    }

    /// Reserves room for a step handed out ahead on the worker serving `channel` that
    /// holds the fewest.
    pub(crate) fn reserve_ahead(
        &self,
        channel: &str,
    ) -> Option<(ConnectionId, String, WorkerSender)> {
        let mut registry = self.registry();
        let (id, worker) = registry
            .workers
            .iter_mut()
            .filter(|(_, w)| {
                w.responsive() && w.ahead < w.hold_ahead && w.channels.contains_key(channel)
            })
            .min_by_key(|(_, w)| w.ahead)?;
        worker.ahead += 1;
        Some((*id, worker.worker_id.clone(), worker.sender.clone()))
    }

    /// Room for steps handed out ahead over all workers serving `channel`.
    pub(crate) fn free_ahead(&self, channel: &str) -> u32 {
        self.registry()
            .workers
            .values()
            .filter(|w| w.responsive() && w.channels.contains_key(channel))
            .map(|w| w.hold_ahead.saturating_sub(w.ahead))
            .fold(0, u32::saturating_add)
    }

    /// Room for steps handed out ahead over all workers.
    pub(crate) fn free_ahead_total(&self) -> u32 {
        self.registry()
            .workers
            .values()
            .filter(|w| w.responsive())
            .map(|w| w.hold_ahead.saturating_sub(w.ahead))
            .fold(0, u32::saturating_add)
    }

    /// The sender of `connection`'s stream, while it is open.
    pub(crate) fn sender(&self, connection: ConnectionId) -> Option<WorkerSender> {
        self.registry()
            .workers
            .get(&connection)
            .map(|w| w.sender.clone())
    }

    /// A step this worker held went to another attempt because its lease (`lease`)
    /// expired. A worker that said nothing for that long (hung, or frozen) gets no new
    /// tasks for [`UNRESPONSIVE_FOR`], or until it says anything; one heard from since
    /// is alive and merely lost the step (a result dropped on the way), and keeps
    /// getting tasks.
    pub(crate) fn mark_unresponsive(&self, connection: ConnectionId, lease: Duration) {
        self.mark_unresponsive_until(connection, lease, Instant::now() + UNRESPONSIVE_FOR);
    }

    /// An earlier stream of a worker that attached again (not yet seen to break): no
    /// new tasks on it unless it speaks again.
    pub(crate) fn set_aside(&self, connection: ConnectionId) {
        let until = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        self.mark_unresponsive_until(connection, Duration::ZERO, until);
    }

    fn mark_unresponsive_until(&self, connection: ConnectionId, lease: Duration, until: Instant) {
        if let Some(worker) = self.registry().workers.get_mut(&connection)
            && worker.last_heard.elapsed() >= lease
        {
            worker.unresponsive_until = Some(until);
        }
    }

    /// The worker sent something (a result or a heartbeat): it is alive again.
    pub(crate) fn heard_from(&self, connection: ConnectionId) {
        if let Some(worker) = self.registry().workers.get_mut(&connection) {
            worker.unresponsive_until = None;
            worker.last_heard = Instant::now();
        }
    }

    /// Gives back a slot of `channel` reserved with [`Self::reserve`], or with `ahead`,
    /// the room reserved with [`Self::reserve_ahead`].
    pub(crate) fn release(&self, connection: ConnectionId, channel: &str, ahead: bool) {
        if let Some(worker) = self.registry().workers.get_mut(&connection) {
            if ahead {
                worker.ahead = worker.ahead.saturating_sub(1);
            } else {
                worker.give_back(channel);
            }
        }
    }

    /// Counts one more task of `channel` (`ahead`: handed out ahead) as held by
    /// `connection` (a step it took over from an earlier stream of the same worker); it
    /// is given back with [`Self::release`].
    pub(crate) fn hold(&self, connection: ConnectionId, channel: &str, ahead: bool) {
        if let Some(worker) = self.registry().workers.get_mut(&connection) {
            if ahead {
                worker.ahead += 1;
            } else {
                worker.take(channel, 1);
            }
        }
    }

    /// The worker id that `connection` announced.
    pub(crate) fn worker_id(&self, connection: ConnectionId) -> Option<String> {
        self.registry()
            .workers
            .get(&connection)
            .map(|w| w.worker_id.clone())
    }

    /// The connections of `worker_id` other than `connection` (earlier streams of a
    /// worker that re-attached, not yet noticed as broken).
    pub(crate) fn other_connections(
        &self,
        worker_id: &str,
        connection: ConnectionId,
    ) -> Vec<ConnectionId> {
        self.registry()
            .workers
            .iter()
            .filter(|(id, w)| **id != connection && w.worker_id == worker_id)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Free slots over all workers.
    pub(crate) fn free_capacity(&self) -> u32 {
        self.registry()
            .workers
            .values()
            .filter(|w| w.responsive())
            .map(Worker::free)
            .fold(0, u32::saturating_add)
    }
}

/// The `workers_connected` gauge of `channel`.
fn connected(channel: &str) -> touchpoint_proto::metrics::Gauge {
    touchpoint_proto::metrics::metrics()
        .scheduler
        .workers_connected
        .get_or_create_owned(&touchpoint_proto::metrics::ChannelLabels {
            channel: channel.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn a_channels_rate_is_the_lowest_its_connected_workers_announced() {
        let workers = Workers::default();
        let register = |id: &str| {
            let (sender, _) = mpsc::channel(1);
            workers.register(
                id.to_owned(),
                vec!["sms".to_owned()],
                (4, 0),
                &HashMap::new(),
                sender,
            )
        };
        let (a, b, c) = (register("a"), register("b"), register("c"));
        assert_eq!(workers.channel_rate("sms"), None);
        workers.set_channel_rate(a, HashMap::from([("sms".to_owned(), rate(10.0, 5))]));
        workers.set_channel_rate(b, HashMap::from([("sms".to_owned(), rate(20.0, 2))]));
        // c announces none: the others' limits still hold.
        assert_eq!(workers.channel_rate("sms"), Some(rate(10.0, 2)));
        assert_eq!(workers.channel_rate("wecom"), None);
        workers.remove(a);
        assert_eq!(workers.channel_rate("sms"), Some(rate(20.0, 2)));
        workers.remove(b);
        workers.remove(c);
        assert_eq!(workers.channel_rate("sms"), None);
    }

    #[test]
    fn an_unresponsive_worker_gets_tasks_again_once_it_speaks_or_its_mark_passes() {
        let workers = Workers::default();
        let (sender, _receiver) = mpsc::channel(1);
        let worker = workers.register(
            "w".to_owned(),
            vec!["sms".to_owned()],
            (4, 0),
            &HashMap::new(),
            sender,
        );
        assert_eq!(workers.free_capacity(), 4);
        workers.mark_unresponsive(worker, Duration::ZERO);
        assert_eq!(workers.free_capacity(), 0);
        assert!(workers.reserve("sms").is_err());
        workers.heard_from(worker);
        assert_eq!(workers.free_capacity(), 4);
        // Heard from within the lease: alive, it merely lost the step.
        workers.mark_unresponsive(worker, Duration::from_secs(30));
        assert_eq!(workers.free_capacity(), 4);
        // An idle worker sends nothing: the mark passes by itself.
        workers.mark_unresponsive_until(worker, Duration::ZERO, Instant::now());
        assert_eq!(workers.free_capacity(), 4);
        assert!(workers.reserve("sms").is_ok());
    }

    #[test]
    fn a_full_channel_leaves_the_workers_other_channels_their_slots() {
        let workers = Workers::default();
        let (sender, _receiver) = mpsc::channel(1);
        let per_channel = HashMap::from([("slow".to_owned(), 2), ("fast".to_owned(), 2)]);
        let channels = vec!["slow".to_owned(), "fast".to_owned()];
        let worker = workers.register("w".to_owned(), channels, (4, 0), &per_channel, sender);
        assert_eq!(workers.free_capacity(), 4);
        for _ in 0..2 {
            assert!(workers.reserve("slow").is_ok());
        }
        assert_eq!(workers.reserve("slow").err(), Some(NoWorker::AllBusy));
        assert_eq!(workers.free_capacity(), 2);
        assert!(workers.reserve("fast").is_ok());
        workers.release(worker, "slow", false);
        assert!(workers.reserve("slow").is_ok());
        assert_eq!(workers.reserve("other").err(), Some(NoWorker::ForChannel));
    }

    #[test]
    fn a_share_bounds_what_the_worker_is_handed() {
        let workers = Workers::default();
        let (sender, _) = mpsc::channel(1);
        let channels = vec!["sms".to_owned(), "mail".to_owned()];
        let per_channel = HashMap::from([("sms".to_owned(), 4), ("mail".to_owned(), 2)]);
        let worker = workers.register("w".to_owned(), channels, (6, 10), &per_channel, sender);
        assert_eq!(workers.free_capacity(), 6);
        // Attached to two schedulers: half each, rounded up by the worker.
        let share = HashMap::from([("sms".to_owned(), 2), ("mail".to_owned(), 1)]);
        workers.set_share(worker, 3, &share, 5);
        assert_eq!(workers.free_capacity(), 3);
        assert_eq!(workers.free_ahead_total(), 5);
        for _ in 0..2 {
            assert!(workers.reserve("sms").is_ok());
        }
        assert_eq!(workers.reserve("sms").err(), Some(NoWorker::AllBusy));
        assert!(workers.reserve("mail").is_ok());
        assert_eq!(workers.reserve("mail").err(), Some(NoWorker::AllBusy));
        // A share is never more than Hello announced, nor zero.
        workers.set_share(worker, 100, &HashMap::new(), 100);
        assert_eq!(workers.free_ahead_total(), 10);
        workers.set_share(worker, 0, &HashMap::new(), 0);
        assert_eq!(workers.free_capacity(), 0, "three held, one slot");
    }

    #[test]
    fn a_worker_without_channel_capacities_is_bounded_by_its_capacity() {
        let workers = Workers::default();
        let (sender, _receiver) = mpsc::channel(1);
        let channels = vec!["a".to_owned(), "b".to_owned()];
        workers.register("w".to_owned(), channels, (2, 0), &HashMap::new(), sender);
        assert!(workers.reserve("a").is_ok());
        assert!(workers.reserve("b").is_ok());
        assert_eq!(workers.reserve("a").err(), Some(NoWorker::AllBusy));
        assert_eq!(workers.free_capacity(), 0);
    }
}
