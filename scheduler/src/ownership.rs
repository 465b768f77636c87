//! Which scheduler runs which partition's timers.
//!
//! Every scheduler registers itself (id, advertised address) in Redis with an expiry and
//! renews it every third of `--partition-lease`. On each renewal it reads the live
//! members and computes, by rendezvous hashing, the partitions it should own
//! ([`owner_of`]: the member with the highest hash of (member, partition)); it takes or
//! renews their leases (`partition_acquire.lua`: set if free or already its own, with an
//! expiry of one partition lease) and gives up those it should no longer own, so their
//! new owner takes them at its next renewal. A scheduler that dies stops renewing: its
//! membership and its leases expire within one partition lease, and the others take its
//! partitions at their next renewal after that. A graceful stop gives them up at once.
//!
//! Ownership only decides who claims; it is not what keeps a step from going out twice:
//! `claim.lua` is atomic per partition and every hand-out carries a fencing token, so two
//! schedulers claiming the same partition for a moment (a lease that lapsed under a
//! stalled owner) is harmless.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    clock::now_ms,
    store::{Member, Store},
};

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The member that owns `partition`: the one with the highest rendezvous hash, `None`
/// when there are no members. Every scheduler computes the same answer from the same
/// members, whatever their order.
pub fn owner_of<'a>(partition: u16, members: &[&'a str]) -> Option<&'a str> {
    members
        .iter()
        .copied()
        .max_by_key(|member| (rendezvous_hash(member, partition), *member))
}

/// A stable 64-bit hash of (member, partition): FNV-1a of the member's name, mixed with
/// the partition through the SplitMix64 finalizer, so that similar names ("s1", "s2")
/// still spread evenly. Fixed here (not `std`'s hasher) so schedulers of different
/// builds agree.
fn rendezvous_hash(member: &str, partition: u16) -> u64 {
    let mut name: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in member.bytes() {
        name ^= u64::from(byte);
        name = name.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let partition = mix(u64::from(partition).wrapping_add(0x9e37_79b9_7f4a_7c15));
    mix(mix(name) ^ partition)
}

/// The SplitMix64 finalizer: every input bit affects every output bit.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// This scheduler's membership and partition leases, shared by the renew loop
/// ([`Ownership::run`]), the timer loop (which claims only owned partitions) and the
/// worker streams (which tell workers the live schedulers).
#[derive(Debug)]
pub(crate) struct Ownership {
    id: String,
    address: String,
    lease: Duration,
    /// Per partition: until when (ms, this scheduler's clock) it holds the lease; 0 when
    /// it does not. Counted from before the renewal was sent, so it ends no later than
    /// the lease in Redis.
    held_until: Mutex<Vec<i64>>,
    /// Partitions taken since the timer loop last asked ([`Ownership::gained`]), so it
    /// looks at them at once.
    gained: Mutex<Vec<u16>>,
    /// Notified when `gained` gets partitions.
    gained_some: Notify,
    /// The live schedulers, as last read.
    members: watch::Sender<Vec<Member>>,
}

impl Ownership {
    /// Scheduler `id`, reachable by workers at `address`, over `partitions` partitions
    /// with leases of `lease`. Owns nothing until [`Ownership::join`].
    pub(crate) fn new(id: String, address: String, partitions: u16, lease: Duration) -> Self {
        Self {
            id,
            address,
            lease,
            held_until: Mutex::new(vec![0; usize::from(partitions)]),
            gained: Mutex::new(Vec::new()),
            gained_some: Notify::new(),
            members: watch::Sender::new(Vec::new()),
        }
    }

    /// Whether this scheduler holds `partition`'s lease at `now` (ms).
    pub(crate) fn owns(&self, partition: u16, now: i64) -> bool {
        self.held()
            .get(usize::from(partition))
            .is_some_and(|until| *until > now)
    }

    /// The partitions taken since the last call, once there are some.
    pub(crate) async fn gained(&self) -> Vec<u16> {
        loop {
            let gained = std::mem::take(&mut *lock(&self.gained));
            if !gained.is_empty() {
                return gained;
            }
            self.gained_some.notified().await;
        }
    }

    /// The live schedulers, updated whenever they change.
    pub(crate) fn members(&self) -> watch::Receiver<Vec<Member>> {
        self.members.subscribe()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<i64>> {
        lock(&self.held_until)
    }

    /// Joins the schedulers and takes the partitions that are free to take: the first
    /// renewal, before the scheduler serves, so that a lone scheduler's timers run from
    /// its first moment.
    pub(crate) async fn join(&self, store: &Store) {
        if let Err(err) = self.renew(store).await {
            warn!(error = %err, "joining the schedulers failed; retrying every third of the partition lease");
        }
        // The timer loop starts by looking at every partition anyway.
        lock(&self.gained).clear();
    }

    /// Renews every third of the lease (after [`Ownership::join`]) until `stop`, then
    /// gives up the leases and the membership.
    pub(crate) async fn run(self: Arc<Self>, store: Store, stop: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(self.lease / 3) => {}
            }
            match self.renew(&store).await {
                Ok(()) if failing => {
                    failing = false;
                    info!("partition leases renewed again");
                }
                Ok(()) => {}
                Err(err) if !failing => {
                    failing = true;
                    warn!(error = %err, "renewing partition leases failed; partitions held are claimed until their leases run out");
                }
                Err(_) => {}
            }
        }
        self.leave(&store).await;
    }

    /// One renewal: membership, then the leases of the partitions this scheduler should
    /// own now; gives up those it should not.
    async fn renew(&self, store: &Store) -> crate::store::Result<()> {
        let started = now_ms();
        let lease_ms = u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX);
        store
            .register_scheduler(&self.id, &self.address, started, lease_ms)
            .await?;
        let members = store.live_schedulers(started).await?;
        let mut ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        if !ids.contains(&self.id.as_str()) {
            ids.push(&self.id);
        }
        let partitions = u16::try_from(self.held().len()).unwrap_or(u16::MAX);
        let (wanted, unwanted): (Vec<u16>, Vec<u16>) =
            (0..partitions).partition(|&p| owner_of(p, &ids) == Some(self.id.as_str()));
        let given_up: Vec<u16> = {
            let mut held = self.held();
            unwanted
                .into_iter()
                .filter(|&p| std::mem::take(&mut held[usize::from(p)]) > 0)
                .collect()
        };
        if !given_up.is_empty() {
            store.release_partitions(&self.id, &given_up).await?;
        }
        let until = started.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
        let mut taken = Vec::new();
        let mut waiting = 0_usize;
        let mut first_error = None;
        for (partition, owner) in store.acquire_partitions(&self.id, &wanted, lease_ms).await {
            let slot = &mut self.held()[usize::from(partition)];
            match owner {
                Ok(owner) if owner == self.id => {
                    if *slot <= started {
                        taken.push(partition);
                    }
                    *slot = until;
                }
                Ok(_) => {
                    *slot = 0;
                    waiting += 1;
                }
                // Unknown: what was held stays held until it runs out.
                Err(err) => first_error = first_error.or(Some(err)),
            }
        }
        if !taken.is_empty() || !given_up.is_empty() {
            info!(
                members = ids.len(),
                owned = wanted.len() - waiting,
                taken = taken.len(),
                given_up = given_up.len(),
                waiting_for_others = waiting,
                "partition ownership changed"
            );
        }
        if !taken.is_empty() {
            lock(&self.gained).extend(taken);
            self.gained_some.notify_one();
        }
        self.members.send_if_modified(|known| {
            let changed = *known != members;
            *known = members;
            changed
        });
        first_error.map_or(Ok(()), Err)
    }

    /// Gives up every lease held and the membership (a graceful stop), so the others
    /// take the partitions at their next renewal.
    async fn leave(&self, store: &Store) {
        let held: Vec<u16> = {
            let mut held = self.held();
            (0..held.len())
                .filter(|&p| std::mem::take(&mut held[p]) > 0)
                .filter_map(|p| u16::try_from(p).ok())
                .collect()
        };
        if let Err(err) = store.deregister_scheduler(&self.id).await {
            warn!(error = %err, "leaving the schedulers failed; the membership expires by itself");
        }
        match store.release_partitions(&self.id, &held).await {
            Ok(released) => info!(released, "partition leases given up"),
            Err(err) => {
                warn!(error = %err, "giving up partition leases failed; they expire by themselves");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(member: &str, members: &[&str], partitions: u16) -> Vec<u16> {
        (0..partitions)
            .filter(|&p| owner_of(p, members) == Some(member))
            .collect()
    }

    #[test]
    fn no_members_own_nothing() {
        assert_eq!(owner_of(3, &[]), None);
    }

    #[test]
    fn the_owner_does_not_depend_on_the_members_order() {
        let members = ["s-a", "s-b", "s-c"];
        let reversed = ["s-c", "s-b", "s-a"];
        for p in 0..256 {
            assert_eq!(owner_of(p, &members), owner_of(p, &reversed));
        }
    }

    #[test]
    fn partitions_are_split_evenly() {
        // Names that differ in one character spread as well as any.
        let similar = ["s1", "s2", "s3"];
        for member in similar {
            let share = owned(member, &similar, 256).len();
            assert!((60..=110).contains(&share), "{member}: {share}");
        }
        let members = ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"];
        for member in members {
            let share = owned(member, &members, 256).len();
            // 85 each on average; rendezvous hashing stays within a few percent.
            assert!((60..=110).contains(&share), "{member}: {share}");
        }
        let many: Vec<String> = (0..8).map(|i| format!("scheduler-{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        for member in &many {
            let share = owned(member, &many, 256).len();
            assert!((16..=48).contains(&share), "{member}: {share}");
        }
    }

    #[test]
    fn a_join_or_a_leave_moves_only_the_partitions_it_must() {
        let three = ["s-a", "s-b", "s-c"];
        let four = ["s-a", "s-b", "s-c", "s-d"];
        for p in 0..256 {
            let before = owner_of(p, &three);
            let after = owner_of(p, &four);
            // Joining: a partition moves only to the newcomer.
            assert!(after == before || after == Some("s-d"), "partition {p}");
            // Leaving is the same move backwards: only the leaver's partitions move.
        }
        let moved = (0..256)
            .filter(|&p| owner_of(p, &three) != owner_of(p, &four))
            .count();
        assert!((40..=90).contains(&moved), "{moved} of 256 moved");
        let two = ["s-a", "s-c"];
        for p in 0..256 {
            if owner_of(p, &three) != Some("s-b") {
                assert_eq!(owner_of(p, &two), owner_of(p, &three), "partition {p}");
            }
        }
    }
}
