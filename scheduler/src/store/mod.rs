//! The only code that touches Redis.
//!
//! Multi-key decisions are Lua scripts (`lua/*.lua`, one per operation) on keys of one
//! partition, so they are atomic and Redis-Cluster-legal. See [`keys`] for the layout.
//! Reads that span partitions (listings, stats, the backlog) go through
//! [`RedisConnection::query_each`], which works on one server and on a cluster alike.

mod budget;
mod connection;
mod contact;
mod dead_letters;
mod events;
pub mod keys;
mod ownership;
mod rate;
mod run_lists;
mod schedules;

use std::{collections::BTreeMap, sync::Arc};

use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};

pub use budget::{CapCheck, Send, Spent};
pub use connection::{RedisConnection, RedisEndpoint, RedisTls, URL_FORMS, subscribe};
pub use contact::ContactRecord;
pub use dead_letters::{DeadLetterCursor, DeadLetterEntry, Retried};
pub use events::{ContactChange, RecordedEvent};
pub use keys::Keys;
pub use ownership::Member;
pub use rate::{Rate, Taken};
pub use run_lists::{ListPosition, Listed};
pub use schedules::{AudiencePage, ScheduleState, TickClaim, TickCounts, TickProgress};

use crate::{
    playbook::Reentry,
    run::{RunStatus, TimelineEntry, created_ms_of_run, partition_of_run},
};

/// Redis errors, as the API reports them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered something unexpected: {0}")]
    Protocol(String),
    #[error("{0}")]
    Config(String),
    /// One failure shared by every item of a batch call.
    #[error("{0}")]
    Shared(Arc<Error>),
}

impl From<redis::ParsingError> for Error {
    fn from(err: redis::ParsingError) -> Self {
        Self::Protocol(err.to_string())
    }
}

/// Store result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How long an enrollment's request id is remembered.
const REQUEST_ID_TTL_SECS: u64 = 24 * 3600;

/// The layout of Touchpoint's data this scheduler writes, kept in `meta` as `format`;
/// a scheduler refuses a Redis written by a later one (docs/redis-keys.md, "Data format").
/// 2: runs without `ca`, a binary `tp`, timers far ahead in hourly lists.
pub const DATA_FORMAT: u32 = 2;

struct Scripts {
    apply_playbook: Script,
    enroll: Script,
    claim: Script,
    complete: Script,
    extend: Script,
    moved_on: Script,
    cancel: Script,
    retry_dead: Script,
    event: Script,
    spend: Script,
    resume: Script,
    upsert_contact: Script,
    rate_take: Script,
    rate_penalize: Script,
    progress: Script,
    partition_acquire: Script,
    partition_release: Script,
}

impl Scripts {
    fn load() -> Self {
        Self {
            apply_playbook: Script::new(include_str!("lua/apply_playbook.lua")),
            enroll: with_preludes(include_str!("lua/enroll.lua")),
            claim: with_preludes(include_str!("lua/claim.lua")),
            complete: with_preludes(include_str!("lua/complete.lua")),
            extend: Script::new(include_str!("lua/extend.lua")),
            moved_on: Script::new(include_str!("lua/moved_on.lua")),
            cancel: Script::new(include_str!("lua/cancel.lua")),
            retry_dead: Script::new(include_str!("lua/retry_dead.lua")),
            event: with_preludes(include_str!("lua/event.lua")),
            spend: Script::new(include_str!("lua/spend.lua")),
            resume: Script::new(include_str!("lua/resume.lua")),
            upsert_contact: Script::new(include_str!("lua/upsert_contact.lua")),
            rate_take: Script::new(include_str!("lua/rate_take.lua")),
            rate_penalize: Script::new(include_str!("lua/rate_penalize.lua")),
            progress: Script::new(include_str!("lua/progress.lua")),
            partition_acquire: Script::new(include_str!("lua/partition_acquire.lua")),
            partition_release: Script::new(include_str!("lua/partition_release.lua")),
        }
    }
}

/// A script that counts funnel stats and schedules steps: `lua/counts.lua` (its `count`
/// and `write_counts`) and `lua/later.lua` (`in_chunks`, `schedule`, `write_later`,
/// `promote`) go first.
fn with_preludes(body: &str) -> Script {
    Script::new(&format!(
        "{}{}{body}",
        include_str!("lua/counts.lua"),
        include_str!("lua/later.lua")
    ))
}

/// Touchpoint's state in Redis.
#[derive(Clone)]
pub struct Store {
    conn: RedisConnection,
    keys: Keys,
    partitions: u16,
    retention_secs: u64,
    scripts: std::sync::Arc<Scripts>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.keys)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

/// A version of a playbook as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredPlaybook {
    pub yaml: String,
    pub created_at_ms: i64,
}

/// What applying a playbook did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created(u32),
    Unchanged(u32),
    WouldCreate(u32),
}

/// Everything needed to start a run.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub run_id: String,
    pub partition: u16,
    pub playbook: String,
    pub version: u32,
    pub contact: ContactRecord,
    pub first_step: usize,
    pub due_ms: i64,
    /// When the first step is a `wait`: the step the claim at `due_ms` moves the run
    /// straight on to (see [`crate::run::after_wait`]).
    pub then_step: Option<usize>,
    pub now_ms: i64,
    pub traceparent: String,
    pub request_id: Option<String>,
    pub reentry: Reentry,
    /// The playbook's goal event: the run ends, converted, when the contact records it.
    pub goal: Option<String>,
    /// The event that started the run (`event` in templates), as JSON.
    pub trigger: Option<String>,
}

/// What an enrollment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    /// A new run.
    Started(String),
    /// The request id had started this run before.
    Replayed(String),
    /// The playbook's reentry rule refused a new run: why, and the contact's last run.
    Refused { reason: String, last_run: String },
}

impl Enrolled {
    /// The run started or found (the last run, when refused).
    pub fn run_id(&self) -> &str {
        match self {
            Self::Started(id) | Self::Replayed(id) => id,
            Self::Refused { last_run, .. } => last_run,
        }
    }
}

/// A run whose step came due, now leased to this scheduler.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub run_id: String,
    pub partition: u16,
    pub fence: u64,
    pub playbook: String,
    pub version: u32,
    pub contact: ContactRecord,
    pub step_index: usize,
    pub attempt: u32,
    pub traceparent: String,
    pub due_ms: i64,
    /// The step whose `wait_until` / `wait_for` is scheduled (its second claim ends it).
    pub waiting_step: Option<usize>,
    pub created_ms: i64,
    /// The event that started or last woke the run, as JSON (`event` in templates).
    pub trigger: Option<String>,
    /// What an earlier attempt of this step saved with TaskProgress (empty when none).
    pub resume_state: String,
}

/// One claim call's result.
#[derive(Debug, Default)]
pub struct Claim {
    pub runs: Vec<ClaimedRun>,
    /// Leases that had expired and went back to due.
    pub expired: u64,
    pub next_due_ms: Option<i64>,
    pub next_lease_ms: Option<i64>,
}

/// What [`Store::complete_and_claim`] did.
#[derive(Debug, Default)]
pub struct Completed {
    /// Outcomes recorded.
    pub applied: u64,
    /// Outcomes refused: their lease had ended or been superseded.
    pub stale: u64,
    /// Runs leased again at once, their next step due now.
    pub claimed: Vec<ClaimedRun>,
}

/// What an outcome does to a leased run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Move to step `index`, due at `due_ms`, first attempt.
    Next {
        index: usize,
        due_ms: i64,
        /// When step `index` is a `wait`: the step it leads to, which the claim at
        /// `due_ms` moves the run straight on to (see [`crate::run::after_wait`]).
        then_step: Option<usize>,
    },
    /// Try step `index` again at `due_ms` as attempt `attempt`.
    Retry {
        index: usize,
        due_ms: i64,
        attempt: u32,
    },
    /// End the run at step `index`.
    Finish { index: usize, status: RunStatus },
    /// Keep the run at its step (a `wait_until` or `wait_for` now waiting) until
    /// `due_ms`; a `wait_for` also registers for its event (see [`WaitRegistration`]).
    Hold {
        due_ms: i64,
        wait: Option<WaitRegistration>,
        /// For a `wait_until`: the step the claim at `due_ms` moves the run straight on
        /// to (see [`crate::run::after_wait`]).
        then_step: Option<usize>,
    },
    /// Put a run of a paused playbook aside, keeping when its step came due.
    Park { due_ms: i64 },
}

/// A `wait_for` registering for its event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitRegistration {
    pub event: String,
    /// Where the run goes when the event comes: step `index` after `delay_ms`, or the
    /// end of the run (completed).
    pub then: AfterEvent,
    /// The timeline line of the wait_for when its event already came.
    pub matched_entry: TimelineEntry,
}

/// Where a run in a `wait_for` goes when its event comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterEvent {
    Step { index: usize, delay_ms: i64 },
    Complete { index: usize },
}

impl AfterEvent {
    /// "<op> <index> <delay ms>", as the scripts store it.
    fn packed(self) -> String {
        match self {
            Self::Step { index, delay_ms } => format!("next {index} {delay_ms}"),
            Self::Complete { index } => format!("finish {index} 0"),
        }
    }
}

/// A funnel counter of a step (see `GetStats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    Done,
    Skipped,
    Capped,
    Deferred,
    Failed,
    TimedOut,
}

impl Stat {
    fn as_str(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Skipped => "skipped",
            Self::Capped => "capped",
            Self::Deferred => "deferred",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
        }
    }
}

/// An outcome for a leased run, applied under its fencing token.
#[derive(Debug, Clone)]
pub struct Completion {
    pub run_id: String,
    pub fence: u64,
    pub op: Op,
    pub detail: String,
    pub entry: Option<TimelineEntry>,
    /// The funnel counter this outcome bumps for the step it leaves or holds.
    pub stat: Option<Stat>,
    /// The run leaves a `wait_for` (its registration goes).
    pub unwait: bool,
    /// A send counted against the contact's frequency caps that did not go out: it is
    /// uncounted with the outcome.
    pub refund: Option<Refund>,
}

/// A counted send to uncount from the contact's caps (its `*` and channel send sets).
#[derive(Debug, Clone)]
pub struct Refund {
    /// The send as counted: its idempotency key.
    pub member: String,
    pub channel: String,
}

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub run_id: String,
    pub playbook: String,
    pub version: u32,
    pub contact_id: String,
    pub status: RunStatus,
    pub step_index: usize,
    pub attempt: u32,
    pub due_ms: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub traceparent: String,
    pub detail: String,
    pub timeline: Vec<TimelineEntry>,
    /// A worker holds its current step.
    pub leased: bool,
    /// The fencing token of the current (or last) lease.
    pub fence: u64,
    /// The step whose `wait_until` / `wait_for` is waiting (see [`ClaimedRun`]).
    pub waiting_step: Option<usize>,
}

impl Store {
    /// Connects to the Redis or Redis Cluster `url` names (see [`URL_FORMS`]), checks
    /// that it keeps every key, and checks the deployment's partition count.
    pub async fn connect(
        endpoint: impl Into<RedisEndpoint>,
        prefix: &str,
        partitions: u16,
        retention_secs: u64,
    ) -> Result<Self> {
        let conn = RedisConnection::connect(endpoint).await?;
        let store = Self {
            conn,
            keys: Keys::new(prefix),
            partitions,
            retention_secs,
            scripts: std::sync::Arc::new(Scripts::load()),
        };
        store.check_redis_config().await?;
        store.check_partitions().await?;
        store.check_data_format().await?;
        Ok(store)
    }

    /// Partitions of this deployment.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// How long finished runs are kept.
    pub fn retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.retention_secs)
    }

    /// Refuses a Redis that may evict keys (a lost timer is a lost reminder, a lost
    /// request id a duplicate enrollment) and warns when it keeps no append-only file;
    /// on a cluster, checks every primary. Reads `INFO`, which managed Redis services
    /// allow even where `CONFIG` is disabled.
    async fn check_redis_config(&self) -> Result<()> {
        let field = |info: &str, name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(|value| value.trim().to_owned())
        };
        for (node, memory) in self.info("memory").await? {
            match field(&memory, "maxmemory_policy") {
                Some(policy) if policy != "noeviction" => {
                    return Err(Error::Config(format!(
                        "Redis{node} maxmemory-policy is {policy}: Redis could evict Touchpoint's keys (timers, runs, idempotency keys); set maxmemory-policy noeviction"
                    )));
                }
                _ => {}
            }
        }
        for (node, persistence) in self.info("persistence").await? {
            if field(&persistence, "aof_enabled").as_deref() == Some("0") {
                tracing::warn!(
                    "Redis{node} keeps no append-only file (appendonly no): enrollments and outcomes since the last snapshot are lost if Redis restarts; set appendonly yes"
                );
            }
        }
        Ok(())
    }

    /// `INFO <section>` of the server, or of every primary of a cluster: the text, with
    /// `" at <address>"` naming the primary on a cluster (empty on one server).
    async fn info(&self, section: &str) -> Result<Vec<(String, String)>> {
        let mut conn = self.conn.clone();
        let answer: redis::Value = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await?;
        Ok(match answer {
            // A cluster connection asks every primary and answers address → text.
            redis::Value::Map(nodes) => nodes
                .into_iter()
                .map(|(node, info)| {
                    let node: String = redis::from_redis_value(node)?;
                    Ok((format!(" at {node}"), redis::from_redis_value(info)?))
                })
                .collect::<Result<_>>()?,
            info => vec![(String::new(), redis::from_redis_value(info)?)],
        })
    }

    async fn check_partitions(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let meta = self.keys.meta();
        let _: bool = conn.hset_nx(&meta, "partitions", self.partitions).await?;
        let stored: u16 = conn.hget(&meta, "partitions").await?;
        if stored != self.partitions {
            return Err(Error::Config(format!(
                "this Redis holds a deployment with {stored} partitions; start the scheduler with --partitions {stored}"
            )));
        }
        Ok(())
    }

    /// Refuses data written by a later scheduler (which an earlier one could misread:
    /// a rollback); records this scheduler's format when the stored one is earlier.
    async fn check_data_format(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let meta = self.keys.meta();
        let stored: Option<u32> = conn.hget(&meta, "format").await?;
        match stored {
            Some(stored) if stored > DATA_FORMAT => Err(Error::Config(format!(
                "this Redis holds data in format {stored}, written by a later Touchpoint; this scheduler reads formats up to {DATA_FORMAT}: run the later version (rolling back needs the data it wrote migrated)"
            ))),
            Some(stored) if stored == DATA_FORMAT => Ok(()),
            _ => {
                let () = conn.hset(&meta, "format", DATA_FORMAT).await?;
                Ok(())
            }
        }
    }

    /// Stores a playbook version unless unchanged (or only reports, for a dry run).
    pub async fn apply_playbook(
        &self,
        name: &str,
        digest: &str,
        stored: &StoredPlaybook,
        dry_run: bool,
    ) -> Result<Applied> {
        let applied = self
            .apply_versioned(&self.keys.playbook(name), digest, stored, dry_run)
            .await?;
        if let Applied::Created(_) = applied {
            let mut conn = self.conn.clone();
            let _: () = conn.sadd(self.keys.playbook_names(), name).await?;
        }
        Ok(applied)
    }

    /// Stores the next version in a versioned hash (`latest`, `digest`, `v<N>`).
    async fn apply_versioned(
        &self,
        key: &str,
        digest: &str,
        stored: &StoredPlaybook,
        dry_run: bool,
    ) -> Result<Applied> {
        let mut conn = self.conn.clone();
        let record = serde_json::to_string(stored).map_err(|e| Error::Protocol(e.to_string()))?;
        let (status, version): (u8, u32) = self
            .scripts
            .apply_playbook
            .key(key)
            .arg(digest)
            .arg(record)
            .arg(if dry_run { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        Ok(match status {
            0 => Applied::Unchanged(version),
            1 => Applied::Created(version),
            _ => Applied::WouldCreate(version),
        })
    }

    /// One version of a playbook (`None`: the latest) and the latest version number.
    pub async fn get_playbook(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(u32, u32, StoredPlaybook)>> {
        let mut conn = self.conn.clone();
        let key = self.keys.playbook(name);
        let latest: Option<u32> = conn.hget(&key, "latest").await?;
        let Some(latest) = latest else {
            return Ok(None);
        };
        let version = version.unwrap_or(latest);
        let record: Option<String> = conn.hget(&key, format!("v{version}")).await?;
        let Some(record) = record else {
            return Ok(None);
        };
        let stored = serde_json::from_str(&record)
            .map_err(|e| Error::Protocol(format!("playbook {name} v{version}: {e}")))?;
        Ok(Some((version, latest, stored)))
    }

    /// Names of all playbooks, sorted.
    pub async fn playbook_names(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let mut names: Vec<String> = conn.smembers(self.keys.playbook_names()).await?;
        names.sort();
        Ok(names)
    }

    /// Starts a run, or finds the one its request id already started, or is refused by
    /// the playbook's reentry rule.
    pub async fn enroll(&self, run: &NewRun) -> Result<Enrolled> {
        let mut enrolled = self.enroll_partition(run.partition, &[run]).await?;
        enrolled
            .pop()
            .ok_or_else(|| protocol("enroll answered no result"))
    }

    /// Enrolls a batch (as [`Store::enroll`] each, in order per contact): one script
    /// call per partition, the partitions' calls concurrent. Results follow `runs`; a
    /// failed call fails the runs of its partition, which share its error.
    pub async fn enroll_many(&self, runs: &[NewRun]) -> Vec<Result<Enrolled>> {
        let mut by_partition: BTreeMap<u16, Vec<usize>> = BTreeMap::new();
        for (n, run) in runs.iter().enumerate() {
            by_partition.entry(run.partition).or_default().push(n);
        }
        let calls = by_partition
            .into_iter()
            .map(|(partition, positions)| async move {
                let batch: Vec<&NewRun> = positions.iter().map(|&n| &runs[n]).collect();
                (positions, self.enroll_partition(partition, &batch).await)
            });
        let mut results: Vec<Option<Result<Enrolled>>> = runs.iter().map(|_| None).collect();
        for (positions, answer) in futures::future::join_all(calls).await {
            match answer {
                Ok(enrolled) => {
                    for (n, one) in positions.into_iter().zip(enrolled) {
                        results[n] = Some(Ok(one));
                    }
                }
                Err(err) => {
                    let err = Arc::new(err);
                    for n in positions {
                        results[n] = Some(Err(Error::Shared(Arc::clone(&err))));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|result| result.unwrap_or_else(|| Err(protocol("enroll lost a run"))))
            .collect()
    }

    /// One `enroll.lua` call for runs of one partition.
    async fn enroll_partition(&self, p: u16, runs: &[&NewRun]) -> Result<Vec<Enrolled>> {
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.enroll.prepare_invoke();
        invocation
            .key(self.keys.due(p))
            .key(self.keys.later(p))
            .arg(runs.first().map_or(0, |run| run.now_ms))
            .arg(REQUEST_ID_TTL_SECS)
            .arg(self.keys.run_prefix(p))
            .arg(self.keys.contact_prefix(p))
            .arg(self.keys.enroll_request_prefix(p))
            .arg(self.keys.goals_prefix(p))
            .arg(self.keys.tag_prefix(p))
            .arg(self.keys.playbook_runs_prefix(p))
            .arg(self.keys.stats_prefix(p));
        for run in runs {
            let mut run_fields: Vec<(&str, Vec<u8>)> = vec![
                ("st", RunStatus::Active.as_str().into()),
                ("pb", run.playbook.clone().into_bytes()),
                ("v", run.version.to_string().into_bytes()),
                ("c", run.contact.id.clone().into_bytes()),
                ("i", run.first_step.to_string().into_bytes()),
                ("a", b"1".to_vec()),
                ("f", b"1".to_vec()),
                ("due", run.due_ms.to_string().into_bytes()),
                // No `ca`: a run is as old as its id says (`created_ms_of_run`), and no
                // `ua` yet: a run not updated since is that old.
                ("tp", pack_traceparent(&run.traceparent)),
            ];
            if let Some(step) = run.then_step {
                run_fields.push(("wn", format!("{} {step}", run.first_step).into_bytes()));
            }
            if run.goal.is_some() {
                run_fields.push(("g", b"1".to_vec()));
            }
            if let Some(trigger) = &run.trigger {
                run_fields.push(("ev", trigger.clone().into_bytes()));
            }
            let reentry = match run.reentry {
                Reentry::Never => "never".to_owned(),
                Reentry::Always => "always".to_owned(),
                Reentry::After(wait) => wait.as_millis().to_string(),
            };
            let contact_fields = run.contact.to_fields();
            invocation
                .arg(&run.run_id)
                .arg(run.due_ms)
                .arg(run.request_id.as_deref().unwrap_or_default())
                .arg(&run.playbook)
                .arg(reentry)
                .arg(run.goal.as_deref().unwrap_or_default())
                .arg(run.version)
                .arg(run.first_step)
                .arg(&run.contact.id)
                .arg(run.contact.tags.len())
                .arg(run_fields.len())
                .arg(contact_fields.len());
            for tag in &run.contact.tags {
                invocation.arg(tag);
            }
            for (field, value) in &run_fields {
                invocation.arg(*field).arg(value);
            }
            for (field, value) in contact_fields {
                invocation.arg(field).arg(value);
            }
        }
        let answers: Vec<(u8, String, String)> =
            timed("enroll", invocation.invoke_async(&mut conn)).await?;
        if answers.len() != runs.len() {
            return Err(protocol("enroll answered a result per run"));
        }
        Ok(answers
            .into_iter()
            .map(|(code, run_id, detail)| match code {
                1 => Enrolled::Started(run_id),
                0 => Enrolled::Replayed(run_id),
                _ => Enrolled::Refused {
                    reason: detail,
                    last_run: run_id,
                },
            })
            .collect())
    }

    /// The funnel counters of one playbook version in one partition.
    fn stats_key(&self, partition: u16, playbook: &str, version: u32) -> String {
        format!("{}{playbook}:{version}", self.keys.stats_prefix(partition))
    }

    /// Steps due by `now_ms` (not leased) and runs in the dead-letter lists, over every
    /// partition: one pipelined round trip (one per primary on a cluster). Steps due counts
    /// every entry of an hourly list whose hour has begun (`lua/later.lua`): such a list
    /// should have moved into the due set an hour before, so a stalled move shows here.
    pub async fn backlog(&self, now_ms: i64) -> Result<(u64, u64)> {
        let mut commands = Vec::with_capacity(3 * usize::from(self.partitions));
        for partition in 0..self.partitions {
            let mut due = redis::cmd("ZCOUNT");
            due.arg(self.keys.due(partition)).arg("-inf").arg(now_ms);
            let mut dead = redis::cmd("ZCARD");
            dead.arg(self.keys.dead(partition));
            let mut late = redis::cmd("ZRANGEBYSCORE");
            late.arg(self.keys.later(partition)).arg("-inf").arg(now_ms);
            commands.extend([due, dead, late]);
        }
        let replies = timed("backlog", self.conn.query_each(commands)).await?;
        let (mut due, mut dead) = (0, 0);
        let mut late_lists = Vec::new();
        for (n, reply) in replies.into_iter().enumerate() {
            match n % 3 {
                0 => due += redis::from_redis_value::<u64>(reply)?,
                1 => dead += redis::from_redis_value::<u64>(reply)?,
                _ => {
                    let partition = u16::try_from(n / 3).unwrap_or(u16::MAX);
                    for hour in redis::from_redis_value::<Vec<String>>(reply)? {
                        let mut length = redis::cmd("LLEN");
                        length.arg(format!("{}:{hour}", self.keys.later(partition)));
                        late_lists.push(length);
                    }
                }
            }
        }
        if !late_lists.is_empty() {
            for reply in timed("backlog", self.conn.query_each(late_lists)).await? {
                due += redis::from_redis_value::<u64>(reply)?;
            }
        }
        Ok((due, dead))
    }

    /// Claims up to `limit` due steps of `partition` under leases of `lease_ms`.
    pub async fn claim(
        &self,
        partition: u16,
        now_ms: i64,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Claim> {
        self.claim_until(partition, now_ms, None, limit, lease_ms)
            .await
    }

    /// Claims, to hand out ahead, up to `limit` runs of `partition` due after `now_ms`
    /// and by `horizon_ms` that end a wait there and go on to one of `eligible` (each
    /// "<playbook> <version> <step index>"); each run's lease lasts until `lease_ms`
    /// after its due time. Runs due again after a retry, a busy worker or a rate limit
    /// are left due, as are expired leases (both for [`Store::claim`]).
    pub async fn claim_ahead(
        &self,
        partition: u16,
        now_ms: i64,
        (horizon_ms, eligible): (i64, &[String]),
        limit: usize,
        lease_ms: u64,
    ) -> Result<Claim> {
        self.claim_until(
            partition,
            now_ms,
            Some((horizon_ms, eligible)),
            limit,
            lease_ms,
        )
        .await
    }

    async fn claim_until(
        &self,
        partition: u16,
        now_ms: i64,
        ahead: Option<(i64, &[String])>,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Claim> {
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.claim.prepare_invoke();
        invocation
            .key(self.keys.due(partition))
            .key(self.keys.lease(partition))
            .key(self.keys.later(partition))
            .arg(now_ms)
            .arg(limit)
            .arg(lease_ms)
            .arg(self.keys.run_prefix(partition))
            .arg(self.keys.contact_prefix(partition))
            .arg(self.keys.stats_prefix(partition))
            .arg(self.keys.paused_runs_prefix(partition));
        if let Some((horizon_ms, eligible)) = ahead {
            invocation.arg(horizon_ms).arg(eligible);
        }
        let value: redis::Value = timed("claim", invocation.invoke_async(&mut conn)).await?;
        parse_claim(partition, value)
    }

    /// Applies outcomes for leased runs of one partition: `(applied, stale)`.
    pub async fn complete(
        &self,
        partition: u16,
        now_ms: i64,
        completions: &[Completion],
    ) -> Result<(u64, u64)> {
        let completed = self
            .complete_and_claim(partition, now_ms, completions, None)
            .await?;
        Ok((completed.applied, completed.stale))
    }

    /// [`Store::complete`], and with `lease_ms`, leases at once each run whose next
    /// step is due now and returns it as [`Store::claim`] would: a chain of steps then
    /// costs one script call per step.
    pub async fn complete_and_claim(
        &self,
        partition: u16,
        now_ms: i64,
        completions: &[Completion],
        lease_ms: Option<u64>,
    ) -> Result<Completed> {
        if completions.is_empty() {
            return Ok(Completed::default());
        }
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.complete.prepare_invoke();
        invocation
            .key(self.keys.due(partition))
            .key(self.keys.lease(partition))
            .key(self.keys.dead(partition))
            .key(self.keys.later(partition))
            .arg(self.keys.run_prefix(partition))
            .arg(now_ms)
            .arg(self.retention_secs)
            .arg(self.keys.dead_playbook_prefix(partition))
            .arg(self.keys.stats_prefix(partition))
            .arg(self.keys.waits_prefix(partition))
            .arg(self.keys.goals_prefix(partition))
            .arg(self.keys.events_prefix(partition))
            .arg(self.keys.paused_runs_prefix(partition))
            .arg(lease_ms.map(|ms| ms.to_string()).unwrap_or_default())
            .arg(self.keys.contact_prefix(partition))
            .arg(self.keys.sent_prefix(partition));
        for completion in completions {
            let mut wait_event = "";
            let mut then = String::new();
            let mut line = completion
                .entry
                .as_ref()
                .map(TimelineEntry::to_line)
                .unwrap_or_default();
            // 'hold' and 'park' keep the step index the run is at.
            let (op, index, due_ms, attempt, status) = match &completion.op {
                Op::Next {
                    index,
                    due_ms,
                    then_step,
                } => {
                    then = then_step.map(|step| step.to_string()).unwrap_or_default();
                    ("next", *index, *due_ms, 1, "")
                }
                Op::Retry {
                    index,
                    due_ms,
                    attempt,
                } => ("retry", *index, *due_ms, *attempt, ""),
                Op::Finish { index, status } => ("finish", *index, 0, 0, status.as_str()),
                Op::Hold {
                    due_ms,
                    wait,
                    then_step,
                } => {
                    if let Some(wait) = wait {
                        wait_event = &wait.event;
                        then = wait.then.packed();
                        line = wait.matched_entry.to_line();
                    } else if let Some(step) = then_step {
                        then = step.to_string();
                    }
                    ("hold", 0, *due_ms, 1, "")
                }
                Op::Park { due_ms } => ("park", 0, *due_ms, 1, ""),
            };
            invocation
                .arg(&completion.run_id)
                .arg(completion.fence)
                .arg(op)
                .arg(index)
                .arg(due_ms)
                .arg(attempt)
                .arg(status)
                .arg(&completion.detail)
                .arg(line)
                .arg(if completion.dead_letters() { "1" } else { "" })
                .arg(completion.stat.map(Stat::as_str).unwrap_or_default())
                .arg(if completion.unwait { "1" } else { "" })
                .arg(wait_event)
                .arg(then);
            match &completion.refund {
                Some(refund) => invocation.arg(&refund.member).arg(&refund.channel),
                None => invocation.arg("").arg(""),
            };
        }
        let (applied, stale, claimed): (u64, u64, Vec<redis::Value>) =
            timed("complete", invocation.invoke_async(&mut conn)).await?;
        Ok(Completed {
            applied,
            stale,
            claimed: parse_claimed(partition, claimed)?,
        })
    }

    /// Extends the leases of `tasks` (run id, fencing token) of `partition` to
    /// `now_ms + lease_ms`, each only while it is still held under that token and has not
    /// expired. Returns the ids of the runs whose leases were extended.
    pub async fn extend(
        &self,
        partition: u16,
        now_ms: i64,
        lease_ms: u64,
        tasks: &[(String, u64)],
    ) -> Result<Vec<String>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let deadline = now_ms.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX));
        let mut invocation = self.scripts.extend.prepare_invoke();
        invocation
            .key(self.keys.lease(partition))
            .arg(self.keys.run_prefix(partition))
            .arg(now_ms)
            .arg(deadline);
        for (run_id, fence) in tasks {
            invocation.arg(run_id).arg(*fence);
        }
        let extended: Vec<String> = timed("extend", invocation.invoke_async(&mut conn)).await?;
        Ok(extended)
    }

    /// Of `tasks` (run id, fencing token) of `partition`, the runs that no longer hold
    /// the lease of that token: finished, cancelled, converted, or on another attempt.
    pub async fn moved_on(&self, partition: u16, tasks: &[(String, u64)]) -> Result<Vec<String>> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.moved_on.prepare_invoke();
        invocation
            .key(self.keys.lease(partition))
            .arg(self.keys.run_prefix(partition));
        for (run_id, fence) in tasks {
            invocation.arg(run_id).arg(*fence);
        }
        Ok(timed("moved_on", invocation.invoke_async(&mut conn)).await?)
    }

    /// Records a worker's progress on a leased step (TaskProgress): `detail` as the run's
    /// detail and `state` as the step's resume state (empty: each left as it is), only
    /// while the run is leased under `fence` and the lease has not run out. Returns
    /// whether it was recorded.
    pub async fn progress(
        &self,
        partition: u16,
        now_ms: i64,
        run_id: &str,
        fence: u64,
        detail: &str,
        state: &str,
    ) -> Result<bool> {
        let mut conn = self.conn.clone();
        let recorded: u8 = self
            .scripts
            .progress
            .key(self.keys.lease(partition))
            .arg(self.keys.run_prefix(partition))
            .arg(now_ms)
            .arg(run_id)
            .arg(fence)
            .arg(detail)
            .arg(state)
            .invoke_async(&mut conn)
            .await?;
        Ok(recorded == 1)
    }

    /// Cancels an active run (only while it is at step `at_step`, when given); false
    /// when it is missing, already finished, or at another step.
    pub async fn cancel(
        &self,
        run_id: &str,
        now_ms: i64,
        entry: &TimelineEntry,
        at_step: Option<usize>,
    ) -> Result<bool> {
        let Some(p) = partition_of_run(run_id, self.partitions) else {
            return Ok(false);
        };
        let mut conn = self.conn.clone();
        let cancelled: u8 = self
            .scripts
            .cancel
            .key(self.keys.due(p))
            .key(self.keys.lease(p))
            .key(format!("{}{run_id}", self.keys.run_prefix(p)))
            .arg(run_id)
            .arg(now_ms)
            .arg(self.retention_secs)
            .arg(entry.to_line())
            .arg(self.keys.paused_runs_prefix(p))
            .arg(self.keys.waits_prefix(p))
            .arg(self.keys.goals_prefix(p))
            .arg(self.keys.stats_prefix(p))
            .arg(at_step.map(|i| i.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await?;
        Ok(cancelled == 1)
    }

    /// A run, or `None` when the id is unknown (or the run expired).
    pub async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        Ok(self.get_runs(&[run_id.to_owned()]).await?.pop().flatten())
    }

    /// Several runs in one round trip (one per primary on a cluster), in order.
    pub async fn get_runs(&self, run_ids: &[String]) -> Result<Vec<Option<RunRecord>>> {
        let mut commands = Vec::with_capacity(2 * run_ids.len());
        let mut known = Vec::with_capacity(run_ids.len());
        for run_id in run_ids {
            if let Some(p) = partition_of_run(run_id, self.partitions) {
                let mut run = redis::cmd("HGETALL");
                run.arg(format!("{}{run_id}", self.keys.run_prefix(p)));
                let mut lease = redis::cmd("ZSCORE");
                lease.arg(self.keys.lease(p)).arg(run_id);
                commands.extend([run, lease]);
                known.push(true);
            } else {
                known.push(false);
            }
        }
        let answers: Vec<(RunFields, Option<f64>)> = if known.iter().any(|k| *k) {
            let flat = self.conn.query_each(commands).await?;
            flat.chunks(2)
                .map(|pair| {
                    let fields = redis::from_redis_value(pair[0].clone()).unwrap_or_default();
                    let leased = redis::from_redis_value(pair[1].clone()).unwrap_or(None);
                    (fields, leased)
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut answers = answers.into_iter();
        let mut out = Vec::with_capacity(run_ids.len());
        for (run_id, known) in run_ids.iter().zip(known) {
            if !known {
                out.push(None);
                continue;
            }
            let Some((fields, leased)) = answers.next() else {
                out.push(None);
                continue;
            };
            out.push(run_record(run_id, &fields, leased.is_some())?);
        }
        Ok(out)
    }

    /// Publishes `message` on the wake channel (see `crate::wake`).
    pub async fn publish_wake(&self, message: &str) -> Result<()> {
        let mut conn = self.conn.clone();
        let _receivers: i64 = redis::cmd("PUBLISH")
            .arg(self.keys.wake_channel())
            .arg(message)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The wake channel's name.
    pub fn wake_channel(&self) -> String {
        self.keys.wake_channel()
    }
}

/// A sampled W3C traceparent (`00-<32 hex trace id>-<16 hex span id>-01`) as kept in a
/// run hash: its trace and span ids as 24 raw bytes, 31 bytes fewer in every run (which
/// takes a run hash a size class down); any other is kept whole as text.
fn pack_traceparent(traceparent: &str) -> Vec<u8> {
    let ids = match traceparent.split('-').collect::<Vec<_>>().as_slice() {
        ["00", trace, span, "01"] if trace.len() == 32 && span.len() == 16 => {
            hex::decode(format!("{trace}{span}")).ok()
        }
        _ => None,
    };
    ids.unwrap_or_else(|| traceparent.as_bytes().to_vec())
}

/// The traceparent a [`pack_traceparent`] value stands for (also the 48 hex digits
/// earlier versions kept).
fn unpack_traceparent(kept: &[u8]) -> String {
    let text = String::from_utf8_lossy(kept);
    let old_hex = kept.len() == 48 && kept.iter().all(u8::is_ascii_hexdigit);
    match kept.len() {
        24 => {
            let ids = hex::encode(kept);
            format!("00-{}-{}-01", &ids[..32], &ids[32..])
        }
        48 if old_hex => format!("00-{}-{}-01", &text[..32], &text[32..]),
        _ => text.into_owned(),
    }
}

fn protocol(what: &str) -> Error {
    Error::Protocol(what.to_owned())
}

fn parse_claim(partition: u16, value: redis::Value) -> Result<Claim> {
    let (entries, expired, next_due, next_lease): (Vec<redis::Value>, u64, String, String) =
        redis::from_redis_value(value)?;
    let score = |text: String| text.parse::<f64>().ok().map(|ms| ms as i64);
    Ok(Claim {
        runs: parse_claimed(partition, entries)?,
        expired,
        next_due_ms: score(next_due),
        next_lease_ms: score(next_lease),
    })
}

/// The runs a script leased, each as claim.lua lists them.
fn parse_claimed(partition: u16, entries: Vec<redis::Value>) -> Result<Vec<ClaimedRun>> {
    let mut runs = Vec::with_capacity(entries.len());
    for entry in entries {
        type Row = (
            String,
            u64,
            String,
            u32,
            String,
            usize,
            u32,
            Option<Vec<u8>>,
            Option<i64>,
            Vec<String>,
            (String, String, String, String),
        );
        let (
            run_id,
            fence,
            playbook,
            version,
            contact_id,
            step_index,
            attempt,
            traceparent,
            due_ms,
            contact,
            (waiting_step, created_ms, trigger, resume_state),
        ): Row = redis::from_redis_value(entry)?;
        // Earlier versions kept `ca`; a run is as old as its id says.
        let created_ms = created_ms
            .parse()
            .ok()
            .filter(|ms| *ms > 0)
            .or_else(|| created_ms_of_run(&run_id))
            .unwrap_or_default();
        runs.push(ClaimedRun {
            run_id,
            partition,
            fence,
            playbook,
            version,
            contact: ContactRecord::from_fields(
                &contact_id,
                contact.chunks(2).filter_map(|kv| match kv {
                    [k, v] => Some((k.as_str(), v.as_str())),
                    _ => None,
                }),
            ),
            step_index,
            attempt,
            traceparent: unpack_traceparent(&traceparent.unwrap_or_default()),
            due_ms: due_ms.unwrap_or_default(),
            waiting_step: waiting_step.parse().ok(),
            created_ms,
            trigger: (!trigger.is_empty()).then_some(trigger),
            resume_state,
        });
    }
    Ok(runs)
}

/// A run hash's fields as read (values are bytes: `tp` is binary).
type RunFields = BTreeMap<String, Vec<u8>>;

fn run_record(run_id: &str, fields: &RunFields, leased: bool) -> Result<Option<RunRecord>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let text = |name: &str| {
        fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let number = |name: &str| text(name).parse::<i64>().unwrap_or_default();
    let status = RunStatus::parse(&text("st")).ok_or_else(|| protocol("run without a status"))?;
    // Earlier versions kept `ca`; a run is as old as its id says.
    let created_ms = text("ca")
        .parse()
        .ok()
        .or_else(|| created_ms_of_run(run_id))
        .unwrap_or_default();
    let timeline = text("t")
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    Ok(Some(RunRecord {
        run_id: run_id.to_owned(),
        playbook: text("pb"),
        version: u32::try_from(number("v")).unwrap_or_default(),
        contact_id: text("c"),
        status,
        step_index: usize::try_from(number("i")).unwrap_or_default(),
        attempt: u32::try_from(number("a")).unwrap_or_default(),
        due_ms: number("due"),
        created_ms,
        updated_ms: text("ua").parse().unwrap_or(created_ms),
        traceparent: unpack_traceparent(fields.get("tp").map_or(&[], Vec::as_slice)),
        detail: text("d"),
        timeline,
        leased,
        fence: u64::try_from(number("f")).unwrap_or_default(),
        waiting_step: text("ws").parse().ok(),
    }))
}

/// Runs one Redis call, recording its latency and failures by `command` (the script's
/// name) in `touchpoint_scheduler_redis_command_duration_seconds` / `_errors_total`.
async fn timed<T>(
    command: &'static str,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    use touchpoint_proto::metrics::{CommandLabels, metrics};
    let started = std::time::Instant::now();
    let result = call.await;
    let m = &metrics().scheduler;
    let labels = CommandLabels { command };
    m.redis_command_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        m.redis_errors.get_or_create(&labels).inc();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::{pack_traceparent, unpack_traceparent};

    #[test]
    fn sampled_traceparents_are_kept_short_and_come_back_whole() {
        let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let kept = pack_traceparent(sampled);
        assert_eq!(kept.len(), 24);
        assert_eq!(unpack_traceparent(&kept), sampled);
        // As earlier versions kept it.
        assert_eq!(
            unpack_traceparent(b"0af7651916cd43dd8448eb211c80319cb7ad6b7169203331"),
            sampled
        );
        for other in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333x-01",
        ] {
            assert_eq!(pack_traceparent(other), other.as_bytes());
            assert_eq!(unpack_traceparent(other.as_bytes()), other);
        }
    }
}
