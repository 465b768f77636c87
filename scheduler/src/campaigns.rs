//! Recurring campaigns: each second, every scheduler looks for due ticks of the
//! playbooks with a `schedule:` and enrolls their audiences.
//!
//! Redis decides who works what ([`crate::store::Store::claim_tick`]): a playbook's ticks
//! are worked one at a time, oldest first, each by one scheduler at a time under a lease
//! of [`TICK_LEASE`], renewed after every page of the audience. The owner records the
//! next partition to work as it goes; if it dies, another scheduler takes the tick over
//! once the lease expires and works on from that partition. A partition worked twice
//! starts nobody twice: each enrollment's request id names the tick and the contact.
//!
//! Missed ticks: the first time a scheduler sees a schedule, it starts from that moment
//! (no past ticks). A tick noticed more than the schedule's `catch_up` after its time is
//! skipped (counted in the schedule hash and logged); the others are caught up in order.
//! A tick once claimed is always finished, however late. Ticks of a paused playbook wait:
//! after `tp playbook resume`, the same catch-up rule applies to them.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    clock::now_ms,
    enrollment::{Enrollment, new_run},
    playbook::Playbook,
    playbook_cache::PlaybookCache,
    schedule::Schedule,
    store::{self, ContactRecord, Enrolled, Store, TickClaim, TickCounts, TickProgress},
};

/// How long a scheduler holds a tick without recording progress before another may take
/// it over.
pub const TICK_LEASE: Duration = Duration::from_secs(30);

/// Contacts read (and enrolled concurrently) per Redis scan call.
const AUDIENCE_PAGE: usize = 500;

/// Most missed ticks one call of [`run_due_ticks`] skips (the next call goes on).
const MAX_SKIPPED_PER_CALL: u64 = 100_000;

/// Longest sleep of the loop between two looks for due ticks.
const LOOP_INTERVAL: Duration = Duration::from_secs(1);

/// What one call of [`run_due_ticks`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickReport {
    /// Ticks this call finished, oldest first, with the whole tick's enrollments (pages
    /// worked by an earlier owner included).
    pub worked: Vec<WorkedTick>,
    /// Ticks this call skipped because they were more than `catch_up` late.
    pub skipped: u64,
    /// Stopped at a tick another scheduler holds (or took over from this one).
    pub held: bool,
    /// The playbook's first tick after `now`.
    pub next_tick_ms: Option<i64>,
}

/// A tick that was worked to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkedTick {
    pub tick_ms: i64,
    pub counts: TickCounts,
}

/// Works the due ticks of one recurring playbook (version `version`) at `now_ms`, as
/// scheduler `owner`: skips the ones more than `catch_up` late, then enrolls the
/// audience of each of the others, oldest first. Stops at a tick another scheduler
/// holds. Does nothing for a playbook without a schedule.
pub async fn run_due_ticks(
    store: &Store,
    playbook: &Playbook,
    version: u32,
    owner: &str,
    now_ms: i64,
) -> store::Result<TickReport> {
    let mut report = TickReport::default();
    let Some(schedule) = &playbook.schedule else {
        return Ok(report);
    };
    let name = &playbook.name;
    let clock = Clock::starting_at(now_ms);
    let catch_up = i64::try_from(schedule.catch_up.as_millis()).unwrap_or(i64::MAX);
    // Ticks before this instant are too late to enroll anybody.
    let too_late = now_ms.saturating_sub(catch_up);
    loop {
        let state = store.schedule_state(name, now_ms).await?;
        let tick = match state.current {
            Some(current) => current,
            None => {
                let missed = schedule.ticks(state.last, too_late.saturating_sub(1));
                if let (Some(&oldest), Some(&newest)) = (missed.first(), missed.last()) {
                    let count = missed.len() as u64;
                    if report.skipped >= MAX_SKIPPED_PER_CALL
                        || !store.skip_ticks(name, state.last, newest, count).await?
                    {
                        break;
                    }
                    warn!(
                        playbook = %name,
                        skipped = count,
                        oldest = %time(oldest),
                        newest = %time(newest),
                        catch_up = %humantime::format_duration(schedule.catch_up),
                        "missed ticks skipped: noticed more than catch_up after their time"
                    );
                    report.skipped += count;
                    continue;
                }
                match schedule.next_tick(state.last) {
                    Some(due) if due <= now_ms => due,
                    _ => break,
                }
            }
        };
        let work = TickWork {
            store,
            playbook,
            schedule,
            version,
            owner,
            tick_ms: tick,
            clock: &clock,
        };
        match work.run().await? {
            Worked::Finished(counts) => {
                info!(
                    playbook = %name,
                    tick = %time(tick),
                    enrolled = counts.enrolled,
                    already = counts.already,
                    refused = counts.refused,
                    "schedule tick done"
                );
                report.worked.push(WorkedTick {
                    tick_ms: tick,
                    counts,
                });
            }
            Worked::Handled => {}
            Worked::Held => {
                report.held = true;
                break;
            }
        }
    }
    report.next_tick_ms = schedule.next_tick(now_ms);
    Ok(report)
}

/// The injected `now` moved on by the real time elapsed since, for leases and run times.
#[derive(Debug)]
struct Clock {
    start_ms: i64,
    started: Instant,
}

impl Clock {
    fn starting_at(start_ms: i64) -> Self {
        Self {
            start_ms,
            started: Instant::now(),
        }
    }

    fn now(&self) -> i64 {
        let elapsed = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.start_ms.saturating_add(elapsed)
    }
}

/// How working on a tick ended.
enum Worked {
    Finished(TickCounts),
    /// Another scheduler finished it.
    Handled,
    /// Another scheduler holds it (or took it over).
    Held,
}

/// One tick of one playbook, worked by `owner`.
struct TickWork<'a> {
    store: &'a Store,
    playbook: &'a Playbook,
    schedule: &'a Schedule,
    version: u32,
    owner: &'a str,
    tick_ms: i64,
    clock: &'a Clock,
}

impl TickWork<'_> {
    /// Claims the tick and enrolls its audience, partition by partition from where the
    /// last owner left off.
    async fn run(&self) -> store::Result<Worked> {
        let store = self.store;
        let lease = lease_ms();
        let cursor = match store
            .claim_tick(
                &self.playbook.name,
                self.tick_ms,
                self.owner,
                self.clock.now(),
                lease,
            )
            .await?
        {
            TickClaim::Claimed { cursor } => cursor,
            TickClaim::Handled => return Ok(Worked::Handled),
            TickClaim::Held { .. } | TickClaim::Blocked { .. } => return Ok(Worked::Held),
        };
        for partition in cursor..store.partitions() {
            if !self.work_partition(partition).await? {
                return Ok(Worked::Held);
            }
        }
        let done = TickProgress {
            cursor: store.partitions(),
            counts: TickCounts::default(),
            done: true,
        };
        Ok(match self.record(done).await? {
            Some(totals) => Worked::Finished(totals),
            None => Worked::Held,
        })
    }

    /// Enrolls the audience of one partition, a page at a time. False when another
    /// scheduler took the tick over.
    async fn work_partition(&self, partition: u16) -> store::Result<bool> {
        let next = partition + 1;
        let Some(tags) = self.scan_order(partition).await? else {
            let empty = TickProgress {
                cursor: next,
                counts: TickCounts::default(),
                done: false,
            };
            return Ok(self.record(empty).await?.is_some());
        };
        let mut scan = 0;
        loop {
            let page = self
                .store
                .audience_page(partition, &tags, scan, AUDIENCE_PAGE)
                .await?;
            let counts = self.enroll(page.contact_ids).await?;
            let progress = TickProgress {
                cursor: if page.next.is_some() { partition } else { next },
                counts,
                done: false,
            };
            if self.record(progress).await?.is_none() {
                return Ok(false);
            }
            match page.next {
                Some(cursor) => scan = cursor,
                None => return Ok(true),
            }
        }
    }

    /// The audience tags with the smallest set in `partition` first (the one to scan),
    /// or `None` when some tag has no contact there.
    async fn scan_order(&self, partition: u16) -> store::Result<Option<Vec<String>>> {
        let tags = &self.schedule.audience_tags;
        let sizes = self.store.tag_sizes(partition, tags).await?;
        if sizes.contains(&0) {
            return Ok(None);
        }
        let mut sized: Vec<(u64, &String)> = sizes.into_iter().zip(tags).collect();
        sized.sort_by_key(|(size, _)| *size);
        Ok(Some(
            sized.into_iter().map(|(_, tag)| tag.clone()).collect(),
        ))
    }

    /// Starts a run for each contact, concurrently.
    async fn enroll(&self, contact_ids: Vec<String>) -> store::Result<TickCounts> {
        let now = self.clock.now();
        let runs: Vec<_> = contact_ids
            .into_iter()
            .map(|id| {
                let request_id = format!("tick:{}:{}:{id}", self.playbook.name, self.tick_ms);
                let enrollment = Enrollment {
                    contact: ContactRecord {
                        id,
                        ..ContactRecord::default()
                    },
                    request_id: Some(request_id),
                    caller_trace: None,
                    trigger: None,
                };
                new_run(
                    self.playbook,
                    self.version,
                    enrollment,
                    self.store.partitions(),
                    now,
                )
            })
            .collect();
        let mut counts = TickCounts::default();
        for enrolled in self.store.enroll_many(&runs).await {
            match enrolled? {
                Enrolled::Started(_) => counts.enrolled += 1,
                Enrolled::Replayed(_) => counts.already += 1,
                Enrolled::Refused { .. } => counts.refused += 1,
            }
        }
        Ok(counts)
    }

    /// Records progress and renews the lease; `None` when the tick was taken over.
    async fn record(&self, progress: TickProgress) -> store::Result<Option<TickCounts>> {
        self.store
            .record_tick_progress(
                &self.playbook.name,
                self.tick_ms,
                self.owner,
                self.clock.now(),
                lease_ms(),
                progress,
            )
            .await
    }
}

fn lease_ms() -> u64 {
    u64::try_from(TICK_LEASE.as_millis()).unwrap_or(u64::MAX)
}

/// A tick for logs: RFC 3339 in UTC.
fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |at| at.to_rfc3339())
}

/// Starts the loop that works due ticks of every recurring playbook, as scheduler
/// `scheduler_id`, until `shutdown` is cancelled. A tick being worked at shutdown is
/// taken over by another scheduler when its lease expires.
pub(crate) fn start(
    store: Store,
    playbooks: Arc<PlaybookCache>,
    scheduler_id: String,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(run_loop(store, playbooks, scheduler_id, shutdown))
}

async fn run_loop(
    store: Store,
    playbooks: Arc<PlaybookCache>,
    owner: String,
    shutdown: CancellationToken,
) {
    // One task per playbook with due work, so a large audience does not hold up the
    // ticks of other playbooks.
    let mut tasks: JoinSet<Option<i64>> = JoinSet::new();
    let mut running: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut next_ticks: HashMap<String, i64> = HashMap::new();
    loop {
        while let Some(joined) = tasks.try_join_next_with_id() {
            let (id, next) = match joined {
                Ok((id, next)) => (id, next),
                Err(err) => {
                    warn!(error = %err, "schedule task failed");
                    (err.id(), None)
                }
            };
            if let Some(name) = running.remove(&id) {
                match next {
                    Some(next) => next_ticks.insert(name, next),
                    None => next_ticks.remove(&name),
                };
            }
        }
        match due_playbooks(&store).await {
            Ok(names) => {
                next_ticks.retain(|name, _| names.contains(name));
                let busy: HashSet<&String> = running.values().collect();
                let idle: Vec<String> = names
                    .into_iter()
                    .filter(|name| !busy.contains(name))
                    .collect();
                for name in idle {
                    let task = tick_playbook(
                        store.clone(),
                        Arc::clone(&playbooks),
                        owner.clone(),
                        name.clone(),
                    );
                    running.insert(tasks.spawn(task).id(), name);
                }
            }
            Err(err) => warn!(error = %err, "cannot list recurring playbooks"),
        }
        let now = now_ms();
        let sleep = next_ticks
            .values()
            .filter(|&&next| next > now)
            .min()
            .map_or(LOOP_INTERVAL, |&next| {
                LOOP_INTERVAL.min(Duration::from_millis(
                    u64::try_from(next - now).unwrap_or_default(),
                ))
            });
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(sleep) => {}
        }
    }
    tasks.shutdown().await;
}

/// The recurring playbooks that are not paused.
async fn due_playbooks(store: &Store) -> store::Result<HashSet<String>> {
    let paused = store.paused_playbooks().await?;
    Ok(store
        .scheduled_playbooks()
        .await?
        .into_iter()
        .filter(|name| !paused.contains(name))
        .collect())
}

/// Works the due ticks of one playbook's latest version; returns its next tick.
async fn tick_playbook(
    store: Store,
    playbooks: Arc<PlaybookCache>,
    owner: String,
    name: String,
) -> Option<i64> {
    let now = now_ms();
    let version = match store.latest_playbook_version(&name).await {
        Ok(version) => version?,
        Err(err) => {
            warn!(playbook = %name, error = %err, "cannot read the playbook's latest version");
            return None;
        }
    };
    let loaded = match playbooks.get(&store, &name, version).await {
        Ok(loaded) => loaded,
        Err(err) => {
            warn!(playbook = %name, version, error = %err, "cannot load the recurring playbook");
            return None;
        }
    };
    match run_due_ticks(&store, &loaded.playbook, loaded.version, &owner, now).await {
        Ok(report) => report.next_tick_ms,
        Err(err) => {
            warn!(playbook = %name, error = %err, "schedule ticks failed; trying again in a second");
            None
        }
    }
}
