//! The only code that touches Redis.
//!
//! Multi-key decisions are Lua scripts (`lua/*.lua`, one per operation) on keys of one
//! partition, so they are atomic and Redis-Cluster-legal. See [`keys`] for the layout.

mod contact;
mod dead_letters;
pub mod keys;

use std::collections::BTreeMap;

use redis::{AsyncCommands, Script, aio::ConnectionManager};
use serde::{Deserialize, Serialize};

pub use contact::ContactRecord;
pub use dead_letters::{DeadLetterCursor, DeadLetterEntry, Retried};
pub use keys::Keys;

use crate::run::{RunStatus, TimelineEntry, partition_of_run};

/// Redis errors, as the API reports them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis answered something unexpected: {0}")]
    Protocol(String),
    #[error("{0}")]
    Config(String),
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

struct Scripts {
    apply_playbook: Script,
    enroll: Script,
    claim: Script,
    complete: Script,
    extend: Script,
    cancel: Script,
    retry_dead: Script,
}

impl Scripts {
    fn load() -> Self {
        Self {
            apply_playbook: Script::new(include_str!("lua/apply_playbook.lua")),
            enroll: Script::new(include_str!("lua/enroll.lua")),
            claim: Script::new(include_str!("lua/claim.lua")),
            complete: Script::new(include_str!("lua/complete.lua")),
            extend: Script::new(include_str!("lua/extend.lua")),
            cancel: Script::new(include_str!("lua/cancel.lua")),
            retry_dead: Script::new(include_str!("lua/retry_dead.lua")),
        }
    }
}

/// Touchpoint's state in Redis.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
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
    pub now_ms: i64,
    pub traceparent: String,
    pub request_id: Option<String>,
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

/// What an outcome does to a leased run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Move to step `index`, due at `due_ms`, first attempt.
    Next { index: usize, due_ms: i64 },
    /// Try step `index` again at `due_ms` as attempt `attempt`.
    Retry {
        index: usize,
        due_ms: i64,
        attempt: u32,
    },
    /// End the run at step `index`.
    Finish { index: usize, status: RunStatus },
}

/// An outcome for a leased run, applied under its fencing token.
#[derive(Debug, Clone)]
pub struct Completion {
    pub run_id: String,
    pub fence: u64,
    pub op: Op,
    pub detail: String,
    pub entry: Option<TimelineEntry>,
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
}

impl Store {
    /// Connects and checks the deployment's partition count.
    pub async fn connect(
        url: &str,
        prefix: &str,
        partitions: u16,
        retention_secs: u64,
    ) -> Result<Self> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(3)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config).await?;
        let store = Self {
            conn,
            keys: Keys::new(prefix),
            partitions,
            retention_secs,
            scripts: std::sync::Arc::new(Scripts::load()),
        };
        store.check_redis_config().await?;
        store.check_partitions().await?;
        Ok(store)
    }

    /// Partitions of this deployment.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Refuses a Redis that may evict keys (a lost timer is a lost reminder, a lost
    /// request id a duplicate enrollment) and warns when it keeps no append-only file.
    /// Reads `INFO`, which managed Redis services allow even where `CONFIG` is disabled.
    async fn check_redis_config(&self) -> Result<()> {
        let mut conn = self.conn.clone();
        let memory: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await?;
        let persistence: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut conn)
            .await?;
        let field = |info: &str, name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .map(|value| value.trim().to_owned())
        };
        match field(&memory, "maxmemory_policy") {
            Some(policy) if policy != "noeviction" => {
                return Err(Error::Config(format!(
                    "Redis maxmemory-policy is {policy}: Redis could evict Touchpoint's keys (timers, runs, idempotency keys); set maxmemory-policy noeviction"
                )));
            }
            _ => {}
        }
        if field(&persistence, "aof_enabled").as_deref() == Some("0") {
            tracing::warn!(
                "Redis keeps no append-only file (appendonly no): enrollments and outcomes since the last snapshot are lost if Redis restarts; set appendonly yes"
            );
        }
        Ok(())
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

    /// Stores a playbook version unless unchanged (or only reports, for a dry run).
    pub async fn apply_playbook(
        &self,
        name: &str,
        digest: &str,
        stored: &StoredPlaybook,
        dry_run: bool,
    ) -> Result<Applied> {
        let mut conn = self.conn.clone();
        let record = serde_json::to_string(stored).map_err(|e| Error::Protocol(e.to_string()))?;
        let (status, version): (u8, u32) = self
            .scripts
            .apply_playbook
            .key(self.keys.playbook(name))
            .arg(digest)
            .arg(record)
            .arg(if dry_run { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await?;
        let applied = match status {
            0 => Applied::Unchanged(version),
            1 => Applied::Created(version),
            _ => Applied::WouldCreate(version),
        };
        if let Applied::Created(_) = applied {
            let _: () = conn.sadd(self.keys.playbook_names(), name).await?;
        }
        Ok(applied)
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

    /// Starts a run (or finds the one its request id already started): `(run id, created)`.
    pub async fn enroll(&self, run: &NewRun) -> Result<(String, bool)> {
        let mut conn = self.conn.clone();
        let p = run.partition;
        let run_fields: Vec<(&str, String)> = vec![
            ("st", RunStatus::Active.as_str().to_owned()),
            ("pb", run.playbook.clone()),
            ("v", run.version.to_string()),
            ("c", run.contact.id.clone()),
            ("i", run.first_step.to_string()),
            ("a", "1".to_owned()),
            ("f", "0".to_owned()),
            ("due", run.due_ms.to_string()),
            ("ca", run.now_ms.to_string()),
            ("ua", run.now_ms.to_string()),
            ("tp", run.traceparent.clone()),
        ];
        let mut invocation = self.scripts.enroll.prepare_invoke();
        invocation
            .key(format!("{}{}", self.keys.run_prefix(p), run.run_id))
            .key(self.keys.due(p))
            .key(format!("{}{}", self.keys.contact_prefix(p), run.contact.id));
        if let Some(request_id) = &run.request_id {
            invocation.key(self.keys.enroll_request(p, request_id));
        }
        invocation
            .arg(&run.run_id)
            .arg(run.due_ms)
            .arg(REQUEST_ID_TTL_SECS)
            .arg(run_fields.len());
        for (field, value) in &run_fields {
            invocation.arg(*field).arg(value);
        }
        for (field, value) in run.contact.to_fields() {
            invocation.arg(field).arg(value);
        }
        let (created, run_id): (u8, String) = invocation.invoke_async(&mut conn).await?;
        if created == 1 {
            let _: () = conn
                .zadd(self.keys.playbook_runs(&run.playbook), &run_id, 0)
                .await?;
        }
        Ok((run_id, created == 1))
    }

    /// Claims up to `limit` due steps of `partition` under leases of `lease_ms`.
    pub async fn claim(
        &self,
        partition: u16,
        now_ms: i64,
        limit: usize,
        lease_ms: u64,
    ) -> Result<Claim> {
        let mut conn = self.conn.clone();
        let value: redis::Value = self
            .scripts
            .claim
            .key(self.keys.due(partition))
            .key(self.keys.lease(partition))
            .arg(now_ms)
            .arg(limit)
            .arg(lease_ms)
            .arg(self.keys.run_prefix(partition))
            .arg(self.keys.contact_prefix(partition))
            .invoke_async(&mut conn)
            .await?;
        parse_claim(partition, value)
    }

    /// Applies outcomes for leased runs of one partition: `(applied, stale)`.
    pub async fn complete(
        &self,
        partition: u16,
        now_ms: i64,
        completions: &[Completion],
    ) -> Result<(u64, u64)> {
        if completions.is_empty() {
            return Ok((0, 0));
        }
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.complete.prepare_invoke();
        invocation
            .key(self.keys.due(partition))
            .key(self.keys.lease(partition))
            .key(self.keys.dead(partition))
            .arg(self.keys.run_prefix(partition))
            .arg(now_ms)
            .arg(self.retention_secs)
            .arg(self.keys.dead_playbook_prefix(partition));
        for completion in completions {
            let (op, index, due_ms, attempt, status) = match &completion.op {
                Op::Next { index, due_ms } => ("next", *index, *due_ms, 1, ""),
                Op::Retry {
                    index,
                    due_ms,
                    attempt,
                } => ("retry", *index, *due_ms, *attempt, ""),
                Op::Finish { index, status } => ("finish", *index, 0, 0, status.as_str()),
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
                .arg(
                    completion
                        .entry
                        .as_ref()
                        .map(TimelineEntry::to_line)
                        .unwrap_or_default(),
                )
                .arg(if completion.dead_letters() { "1" } else { "" });
        }
        let (applied, stale): (u64, u64) = invocation.invoke_async(&mut conn).await?;
        Ok((applied, stale))
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
        let extended: Vec<String> = invocation.invoke_async(&mut conn).await?;
        Ok(extended)
    }

    /// Cancels an active run; false when it is missing or already finished.
    pub async fn cancel(&self, run_id: &str, now_ms: i64, entry: &TimelineEntry) -> Result<bool> {
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
            .invoke_async(&mut conn)
            .await?;
        Ok(cancelled == 1)
    }

    /// A run, or `None` when the id is unknown (or the run expired).
    pub async fn get_run(&self, run_id: &str) -> Result<Option<RunRecord>> {
        Ok(self.get_runs(&[run_id.to_owned()]).await?.pop().flatten())
    }

    /// Several runs in one round trip, in order.
    pub async fn get_runs(&self, run_ids: &[String]) -> Result<Vec<Option<RunRecord>>> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        let mut known = Vec::with_capacity(run_ids.len());
        for run_id in run_ids {
            if let Some(p) = partition_of_run(run_id, self.partitions) {
                pipe.hgetall(format!("{}{run_id}", self.keys.run_prefix(p)));
                pipe.zscore(self.keys.lease(p), run_id);
                known.push(true);
            } else {
                known.push(false);
            }
        }
        let answers: Vec<(BTreeMap<String, String>, Option<f64>)> = if known.iter().any(|k| *k) {
            let flat: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
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

    /// A page of run ids of one playbook, newest first, strictly older than `before`.
    pub async fn playbook_run_ids(
        &self,
        playbook: &str,
        before: Option<&str>,
        count: usize,
    ) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let max = before.map_or_else(|| "+".to_owned(), |id| format!("({id}"));
        let ids: Vec<String> = redis::cmd("ZREVRANGEBYLEX")
            .arg(self.keys.playbook_runs(playbook))
            .arg(max)
            .arg("-")
            .arg("LIMIT")
            .arg(0)
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(ids)
    }

    /// Drops index entries of runs that expired.
    pub async fn forget_runs(&self, playbook: &str, run_ids: &[String]) -> Result<()> {
        if run_ids.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: () = conn
            .zrem(self.keys.playbook_runs(playbook), run_ids)
            .await?;
        Ok(())
    }
}

fn protocol(what: &str) -> Error {
    Error::Protocol(what.to_owned())
}

fn parse_claim(partition: u16, value: redis::Value) -> Result<Claim> {
    let (entries, expired, next_due, next_lease): (Vec<redis::Value>, u64, String, String) =
        redis::from_redis_value(value)?;
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
            Option<String>,
            Option<i64>,
            Vec<String>,
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
        ): Row = redis::from_redis_value(entry)?;
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
            traceparent: traceparent.unwrap_or_default(),
            due_ms: due_ms.unwrap_or_default(),
        });
    }
    let score = |text: String| text.parse::<f64>().ok().map(|ms| ms as i64);
    Ok(Claim {
        runs,
        expired,
        next_due_ms: score(next_due),
        next_lease_ms: score(next_lease),
    })
}

fn run_record(
    run_id: &str,
    fields: &BTreeMap<String, String>,
    leased: bool,
) -> Result<Option<RunRecord>> {
    if fields.is_empty() {
        return Ok(None);
    }
    let text = |name: &str| fields.get(name).cloned().unwrap_or_default();
    let number = |name: &str| {
        fields
            .get(name)
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or_default()
    };
    let status = RunStatus::parse(&text("st")).ok_or_else(|| protocol("run without a status"))?;
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
        created_ms: number("ca"),
        updated_ms: number("ua"),
        traceparent: text("tp"),
        detail: text("d"),
        timeline,
        leased,
        fence: u64::try_from(number("f")).unwrap_or_default(),
    }))
}
