//! Recurring campaigns in Redis: which playbooks are scheduled, how far each one's ticks
//! went, one tick worked at a time under a lease, and audiences read page by page.
//!
//! A playbook's schedule hash ([`Keys::schedule_state`]) holds `last` (ticks at or
//! before it, in ms, are handled or skipped), `current` (the tick being worked, if any)
//! and `skipped` (ticks missed by more than `catch_up`). A tick's hash ([`Keys::tick`])
//! holds its `owner`, `lease` deadline, `cursor` (next partition to work), `enrolled`,
//! `already` and `refused` counts, and `done` time; it expires a week after it was first
//! claimed. Both keys carry the playbook's hash tag, so each script touches one slot.
//!
//! [`Keys::schedule_state`]: super::Keys::schedule_state
//! [`Keys::tick`]: super::Keys::tick

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::{Result, Store, protocol};

/// How long a tick's hash is kept after it was first claimed.
const TICK_TTL_SECS: u64 = 7 * 24 * 3600;

static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("lua/tick_claim.lua")));
static PROGRESS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/tick_progress.lua")));
static SKIP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/schedule_skip.lua")));

/// Where a recurring playbook's ticks stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleState {
    /// Ticks at or before this instant (ms) are handled or skipped.
    pub last: i64,
    /// The tick being worked (claimed and not finished), which comes before any other.
    pub current: Option<i64>,
    /// Ticks skipped so far because they were noticed more than `catch_up` late.
    pub skipped: u64,
}

/// What claiming a tick found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickClaim {
    /// The caller holds the tick until `now + lease`: work on from partition `cursor`.
    Claimed { cursor: u16 },
    /// Another scheduler holds the tick until `lease_until_ms`.
    Held { owner: String, lease_until_ms: i64 },
    /// The tick was handled (or skipped) already.
    Handled,
    /// Another (older) tick of the playbook is being worked; it goes first.
    Blocked { current: i64 },
}

/// Enrollments of a tick (or of a page of its audience).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TickCounts {
    /// New runs.
    pub enrolled: u64,
    /// Contacts this tick had enrolled already (a page worked again after a takeover).
    pub already: u64,
    /// Contacts the playbook's reentry rule refused.
    pub refused: u64,
}

/// Progress on a claimed tick, recorded by its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickProgress {
    /// The partition to work on from if another scheduler takes the tick over.
    pub cursor: u16,
    /// Enrollments since the last record.
    pub counts: TickCounts,
    /// The whole audience was enrolled: the tick is handled.
    pub done: bool,
}

/// One page of a partition's audience.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudiencePage {
    /// Contacts carrying every tag (a contact may come twice in one scan).
    pub contact_ids: Vec<String>,
    /// Where the scan goes on; `None` at the end of the partition.
    pub next: Option<u64>,
}

impl Store {
    /// Adds a playbook to, or removes it from, the recurring ones. Removing it forgets
    /// its progress, so a schedule added again later starts afresh, without past ticks.
    pub async fn set_scheduled(&self, name: &str, scheduled: bool) -> Result<()> {
        let mut conn = self.conn.clone();
        if scheduled {
            let _: () = conn.sadd(self.keys.scheduled(), name).await?;
        } else {
            // Two slots on a cluster: the set of names, and the playbook's own.
            let _: () = conn.srem(self.keys.scheduled(), name).await?;
            let _: () = conn.del(self.keys.schedule_state(name)).await?;
        }
        Ok(())
    }

    /// Names of the recurring playbooks, sorted.
    pub async fn scheduled_playbooks(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn.smembers(self.keys.scheduled()).await?;
        names.sort();
        Ok(names)
    }

    /// The latest version number of a playbook (without reading its source).
    pub async fn latest_playbook_version(&self, name: &str) -> Result<Option<u32>> {
        let mut conn = self.conn.clone();
        Ok(conn.hget(self.keys.playbook(name), "latest").await?)
    }

    /// Where a recurring playbook's ticks stand. The first time, records `now_ms` as
    /// `last`, so a new schedule has no past ticks.
    pub async fn schedule_state(&self, name: &str, now_ms: i64) -> Result<ScheduleState> {
        let mut conn = self.conn.clone();
        let key = self.keys.schedule_state(name);
        let (fields,): ((Option<String>, Option<String>, Option<String>),) = redis::pipe()
            .hset_nx(&key, "last", now_ms)
            .ignore()
            .cmd("HMGET")
            .arg(&key)
            .arg(&["last", "current", "skipped"])
            .query_async(&mut conn)
            .await?;
        let (last, current, skipped) = fields;
        let number = |field: &str, value: Option<String>| -> Result<Option<i64>> {
            value
                .map(|text| {
                    text.parse::<i64>()
                        .map_err(|_| protocol(&format!("schedule {name}: {field} {text:?}")))
                })
                .transpose()
        };
        Ok(ScheduleState {
            last: number("last", last)?.unwrap_or(now_ms),
            current: number("current", current)?,
            skipped: number("skipped", skipped)?.map_or(0, |n| u64::try_from(n).unwrap_or(0)),
        })
    }

    /// Skips the `count` ticks after `last` up to `newest` (missed by more than
    /// `catch_up`): false when nothing changed because a tick is being worked or another
    /// scheduler moved `last` first.
    pub async fn skip_ticks(&self, name: &str, last: i64, newest: i64, count: u64) -> Result<bool> {
        let mut conn = self.conn.clone();
        let skipped: u8 = SKIP
            .key(self.keys.schedule_state(name))
            .arg(last)
            .arg(newest)
            .arg(count)
            .invoke_async(&mut conn)
            .await?;
        Ok(skipped == 1)
    }

    /// Claims a tick of a recurring playbook for `owner` until `now_ms + lease_ms`: when
    /// unclaimed, when `owner` holds it already, or when its holder's lease expired.
    pub async fn claim_tick(
        &self,
        name: &str,
        tick_ms: i64,
        owner: &str,
        now_ms: i64,
        lease_ms: u64,
    ) -> Result<TickClaim> {
        let mut conn = self.conn.clone();
        let raw: Vec<String> = CLAIM
            .key(self.keys.schedule_state(name))
            .key(self.keys.tick(name, tick_ms))
            .arg(tick_ms)
            .arg(owner)
            .arg(now_ms)
            .arg(deadline(now_ms, lease_ms))
            .arg(TICK_TTL_SECS)
            .invoke_async(&mut conn)
            .await?;
        let unexpected = || protocol(&format!("tick {name} {tick_ms}: claim answered {raw:?}"));
        let answer: Vec<&str> = raw.iter().map(String::as_str).collect();
        Ok(match answer[..] {
            ["1", cursor] => TickClaim::Claimed {
                cursor: cursor.parse().map_err(|_| unexpected())?,
            },
            ["0", owner, lease] => TickClaim::Held {
                owner: owner.to_owned(),
                lease_until_ms: lease.parse().map_err(|_| unexpected())?,
            },
            ["2"] => TickClaim::Handled,
            ["3", current] => TickClaim::Blocked {
                current: current.parse().map_err(|_| unexpected())?,
            },
            _ => return Err(unexpected()),
        })
    }

    /// Records `owner`'s progress on a claimed tick and renews its lease until
    /// `now_ms + lease_ms`. Returns the tick's totals, or `None` when another scheduler
    /// took the tick over (stop working on it).
    pub async fn record_tick_progress(
        &self,
        name: &str,
        tick_ms: i64,
        owner: &str,
        now_ms: i64,
        lease_ms: u64,
        progress: TickProgress,
    ) -> Result<Option<TickCounts>> {
        let mut conn = self.conn.clone();
        let answer: Vec<u64> = PROGRESS
            .key(self.keys.schedule_state(name))
            .key(self.keys.tick(name, tick_ms))
            .arg(owner)
            .arg(deadline(now_ms, lease_ms))
            .arg(progress.cursor)
            .arg(progress.counts.enrolled)
            .arg(progress.counts.already)
            .arg(progress.counts.refused)
            .arg(if progress.done { "1" } else { "0" })
            .arg(tick_ms)
            .arg(now_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(match answer[..] {
            [1, enrolled, already, refused] => Some(TickCounts {
                enrolled,
                already,
                refused,
            }),
            _ => None,
        })
    }

    /// How many contacts of `partition` carry each tag, in order.
    pub async fn tag_sizes(&self, partition: u16, tags: &[String]) -> Result<Vec<u64>> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        for tag in tags {
            pipe.scard(self.keys.tag(partition, tag));
        }
        Ok(pipe.query_async(&mut conn).await?)
    }

    /// One page (about `count` contacts) of the contacts of `partition` carrying every
    /// tag in `tags`: scans the first tag's set from `cursor` (0 to start) and keeps the
    /// contacts that carry the others too. Put the smallest set first.
    pub async fn audience_page(
        &self,
        partition: u16,
        tags: &[String],
        cursor: u64,
        count: usize,
    ) -> Result<AudiencePage> {
        let Some((first, others)) = tags.split_first() else {
            return Ok(AudiencePage {
                contact_ids: Vec::new(),
                next: None,
            });
        };
        let mut conn = self.conn.clone();
        let (next, mut ids): (u64, Vec<String>) = redis::cmd("SSCAN")
            .arg(self.keys.tag(partition, first))
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        if !others.is_empty() && !ids.is_empty() {
            let mut pipe = redis::pipe();
            for tag in others {
                pipe.cmd("SMISMEMBER")
                    .arg(self.keys.tag(partition, tag))
                    .arg(&ids);
            }
            let members: Vec<Vec<bool>> = pipe.query_async(&mut conn).await?;
            let mut index = 0;
            ids.retain(|_| {
                let keep = members
                    .iter()
                    .all(|tag| tag.get(index).copied().unwrap_or(false));
                index += 1;
                keep
            });
        }
        Ok(AudiencePage {
            contact_ids: ids,
            next: (next != 0).then_some(next),
        })
    }
}

/// `now_ms + lease_ms`, saturating.
fn deadline(now_ms: i64, lease_ms: u64) -> i64 {
    now_ms.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX))
}
