//! The dead-letter list: runs that failed at an action step (retries exhausted, or a
//! permanent failure), kept without expiry until they are retried.
//!
//! Each partition holds a sorted set of its dead-lettered runs (run id → failed-at ms)
//! and one such set per playbook, both written by `complete.lua` in the call that fails
//! the run and emptied by `retry_dead.lua`, so they never disagree with the runs. A
//! listing merges the partitions' sets newest first.

use std::collections::VecDeque;

use redis::AsyncCommands;

use super::{Completion, Op, Result, Store};
use crate::run::{RunStatus, StepOutcome, partition_of_run};

/// Where a listing of dead letters stopped: the last entry returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCursor {
    pub failed_at_ms: i64,
    pub run_id: String,
}

/// One run in the dead-letter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterEntry {
    pub run_id: String,
    pub partition: u16,
    pub failed_at_ms: i64,
}

impl DeadLetterEntry {
    /// The cursor that continues a listing after this entry.
    pub fn cursor(&self) -> DeadLetterCursor {
        DeadLetterCursor {
            failed_at_ms: self.failed_at_ms,
            run_id: self.run_id.clone(),
        }
    }
}

/// What retrying one run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retried {
    /// The run is active again at the step it failed at, due now.
    Retried,
    /// The run exists but is not in the dead-letter list.
    NotDeadLettered,
    /// No such run.
    NotFound,
}

impl Completion {
    /// Whether this outcome puts its run into the dead-letter list: it fails the run
    /// at an action step (the engine then records a `failed` timeline entry). Runs that
    /// fail for other reasons (their playbook version cannot be loaded) and cancelled
    /// runs are not dead letters.
    pub fn dead_letters(&self) -> bool {
        matches!(
            self.op,
            Op::Finish {
                status: RunStatus::Failed,
                ..
            }
        ) && self
            .entry
            .as_ref()
            .is_some_and(|entry| entry.outcome == StepOutcome::Failed)
    }
}

/// One partition's part of a listing: entries fetched and not yet merged.
struct Source {
    partition: u16,
    key: String,
    buffer: VecDeque<(i64, String)>,
    /// The partition may hold entries older than the buffer's.
    more: bool,
    /// The oldest entry fetched so far (the next fetch starts after it).
    cursor: Option<(i64, String)>,
}

impl Source {
    fn head(&self) -> Option<&(i64, String)> {
        self.buffer.front()
    }
}

impl Store {
    /// Up to `count` dead letters, newest first (by failed-at, then run id), strictly
    /// after `after`; only those of `playbook` when given.
    pub async fn dead_letters(
        &self,
        playbook: Option<&str>,
        after: Option<&DeadLetterCursor>,
        count: usize,
    ) -> Result<Vec<DeadLetterEntry>> {
        let per_fetch = count.div_ceil(4).clamp(16, 1000);
        let mut sources: Vec<Source> = (0..self.partitions)
            .map(|partition| Source {
                partition,
                key: match playbook {
                    Some(name) => self.keys.dead_playbook(partition, name),
                    None => self.keys.dead(partition),
                },
                buffer: VecDeque::new(),
                more: true,
                cursor: after.map(|c| (c.failed_at_ms, c.run_id.clone())),
            })
            .collect();
        let mut out = Vec::with_capacity(count);
        loop {
            self.refill(&mut sources, per_fetch).await?;
            // Merge while every partition that may hold more has a buffered head to compare.
            while out.len() < count && !sources.iter().any(|s| s.more && s.buffer.is_empty()) {
                let newest = sources
                    .iter_mut()
                    .filter(|s| !s.buffer.is_empty())
                    .max_by(|a, b| a.head().cmp(&b.head()));
                let Some(source) = newest else {
                    return Ok(out);
                };
                if let Some((failed_at_ms, run_id)) = source.buffer.pop_front() {
                    out.push(DeadLetterEntry {
                        run_id,
                        partition: source.partition,
                        failed_at_ms,
                    });
                }
            }
            if out.len() >= count {
                return Ok(out);
            }
        }
    }

    /// Fetches the next `per_fetch` entries of every partition whose buffer ran dry
    /// (one pipelined round trip; one per primary on a cluster).
    async fn refill(&self, sources: &mut [Source], per_fetch: usize) -> Result<()> {
        let dry: Vec<usize> = (0..sources.len())
            .filter(|&i| sources[i].more && sources[i].buffer.is_empty())
            .collect();
        if dry.is_empty() {
            return Ok(());
        }
        let mut commands = Vec::new();
        for &i in &dry {
            let source = &sources[i];
            let (max, min) = match &source.cursor {
                // Entries with the cursor's score and a smaller id, then older ones.
                Some((score, _)) => {
                    let mut ties = redis::cmd("ZRANGEBYSCORE");
                    ties.arg(&source.key).arg(score).arg(score);
                    commands.push(ties);
                    (format!("({score}"), "-inf")
                }
                None => ("+inf".to_owned(), "-inf"),
            };
            let mut older = redis::cmd("ZREVRANGEBYSCORE");
            older
                .arg(&source.key)
                .arg(max)
                .arg(min)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(per_fetch);
            commands.push(older);
        }
        let mut answers: VecDeque<redis::Value> = self.conn.query_each(commands).await?.into();
        let mut next = || {
            answers
                .pop_front()
                .ok_or_else(|| super::protocol("a short pipeline answer"))
        };
        for &i in &dry {
            let source = &mut sources[i];
            if let Some((score, after_id)) = &source.cursor {
                let mut ties: Vec<String> = redis::from_redis_value(next()?)?;
                ties.retain(|id| id < after_id);
                ties.sort_unstable_by(|a, b| b.cmp(a));
                let score = *score;
                source.buffer.extend(ties.into_iter().map(|id| (score, id)));
            }
            let older: Vec<(String, f64)> = redis::from_redis_value(next()?)?;
            source.more = older.len() >= per_fetch;
            // Scores are whole milliseconds, exact in an f64.
            source
                .buffer
                .extend(older.into_iter().map(|(id, score)| (score as i64, id)));
            if let Some(last) = source.buffer.back() {
                source.cursor = Some(last.clone());
            }
        }
        Ok(())
    }

    /// Drops a dead-letter entry whose run no longer exists (from the partition's set
    /// and, when given, its playbook's).
    pub async fn forget_dead_letter(
        &self,
        entry: &DeadLetterEntry,
        playbook: Option<&str>,
    ) -> Result<()> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic()
            .zrem(self.keys.dead(entry.partition), &entry.run_id)
            .ignore();
        if let Some(name) = playbook {
            pipe.zrem(
                self.keys.dead_playbook(entry.partition, name),
                &entry.run_id,
            )
            .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Retries one dead-lettered run (see `retry_dead.lua`).
    pub async fn retry_dead_letter(&self, run_id: &str, now_ms: i64) -> Result<Retried> {
        let Some(partition) = partition_of_run(run_id, self.partitions) else {
            return Ok(Retried::NotFound);
        };
        let codes = self
            .retry_dead_in(partition, None, &[run_id.to_owned()], now_ms)
            .await?;
        Ok(match codes.first() {
            Some(1) => Retried::Retried,
            Some(0) => Retried::NotDeadLettered,
            _ => Retried::NotFound,
        })
    }

    /// Retries every dead letter of `playbook`, `batch` runs per script call; returns
    /// the partitions where runs were retried, with how many.
    pub async fn retry_dead_letters_of_playbook(
        &self,
        playbook: &str,
        batch: usize,
        now_ms: i64,
    ) -> Result<Vec<(u16, u64)>> {
        let commands = (0..self.partitions)
            .map(|partition| {
                let mut size = redis::cmd("ZCARD");
                size.arg(self.keys.dead_playbook(partition, playbook));
                size
            })
            .collect();
        let sizes = self
            .conn
            .query_each(commands)
            .await?
            .into_iter()
            .map(redis::from_redis_value)
            .collect::<Result<Vec<u64>, _>>()?;
        let mut retried = Vec::new();
        for (partition, size) in (0..self.partitions).zip(sizes) {
            if size == 0 {
                continue;
            }
            let count = self
                .retry_dead_letters_in(playbook, partition, batch, now_ms)
                .await?;
            if count > 0 {
                retried.push((partition, count));
            }
        }
        Ok(retried)
    }

    /// Retries every dead letter of `playbook` in `partition`, `batch` runs per script
    /// call; returns how many were retried.
    async fn retry_dead_letters_in(
        &self,
        playbook: &str,
        partition: u16,
        batch: usize,
        now_ms: i64,
    ) -> Result<u64> {
        let key = self.keys.dead_playbook(partition, playbook);
        let mut retried = 0;
        loop {
            let mut conn = self.conn.clone();
            let ids: Vec<String> = conn
                .zrange(
                    &key,
                    0,
                    isize::try_from(batch.max(1)).unwrap_or(isize::MAX) - 1,
                )
                .await?;
            if ids.is_empty() {
                return Ok(retried);
            }
            // The script drops every id it is given from the playbook's set (retried or
            // stale), so each round makes progress.
            let codes = self
                .retry_dead_in(partition, Some(playbook), &ids, now_ms)
                .await?;
            retried += codes.iter().filter(|&&code| code == 1).count() as u64;
        }
    }

    async fn retry_dead_in(
        &self,
        partition: u16,
        playbook: Option<&str>,
        run_ids: &[String],
        now_ms: i64,
    ) -> Result<Vec<i64>> {
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.retry_dead.prepare_invoke();
        invocation
            .key(self.keys.due(partition))
            .key(self.keys.dead(partition))
            .arg(self.keys.run_prefix(partition))
            .arg(self.keys.dead_playbook_prefix(partition))
            .arg(now_ms)
            .arg(playbook.unwrap_or_default())
            .arg(self.keys.stats_prefix(partition));
        for run_id in run_ids {
            invocation.arg(run_id);
        }
        Ok(invocation.invoke_async(&mut conn).await?)
    }
}
