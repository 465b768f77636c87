//! Each playbook's runs, for listing newest first.
//!
//! Every partition keeps one Redis stream per playbook (`runlog:<playbook>`), one entry
//! (`r` = run id) per run, appended by `enroll.lua` in the call that writes the run. A
//! stream stores its entries in packed listpacks, about 40 bytes each, where a sorted set
//! of run ids took about 120. Entries are ordered by their stream id (when the run was
//! listed); across partitions a listing merges the streams by [`ListPosition`], which adds
//! the partition to the stream id so that the order is total and a page can resume
//! exactly where the last one stopped. Entries of runs that expired are dropped when a
//! listing meets them, and by each partition's owner sweeping its lists page by page
//! ([`Store::sweep_run_list`]), so the lists do not grow without bound.

use std::sync::LazyLock;

use redis::Script;

use super::{Result, Store, timed};

static SWEEP: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/sweep_run_list.lua")));

/// A place in a playbook's run list: its stream entry id and its partition, ordered
/// newest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListPosition {
    ms: u64,
    seq: u64,
    partition: u16,
}

impl ListPosition {
    /// `<ms>-<seq>-<partition>`, as a page token holds it.
    pub fn to_token(self) -> String {
        format!("{}-{}-{}", self.ms, self.seq, self.partition)
    }

    /// The position a [`ListPosition::to_token`] text names.
    pub fn parse(token: &str) -> Option<Self> {
        let mut parts = token.split('-');
        let position = Self {
            ms: parts.next()?.parse().ok()?,
            seq: parts.next()?.parse().ok()?,
            partition: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(position)
    }

    fn from_entry(entry_id: &str, partition: u16) -> Option<Self> {
        let (ms, seq) = entry_id.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
            partition,
        })
    }

    fn entry_id(self) -> String {
        format!("{}-{}", self.ms, self.seq)
    }
}

/// A run in a playbook's run list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub position: ListPosition,
    pub run_id: String,
}

impl Store {
    /// A page of one playbook's runs, newest first, strictly older than `before`: a
    /// merge of the partitions' lists, a few entries from each per round trip.
    pub async fn playbook_run_ids(
        &self,
        playbook: &str,
        before: Option<ListPosition>,
        count: usize,
    ) -> Result<Vec<Listed>> {
        let mut cursor = before;
        let mut out = Vec::with_capacity(count);
        // Enough per partition that one round usually fills the page.
        let mut per_partition = (2 * count / usize::from(self.partitions.max(1))).max(4);
        while out.len() < count {
            let commands = (0..self.partitions)
                .map(|partition| {
                    // Entries of a lower partition at the cursor's own stream id come
                    // after it in the merged order; the rest must be strictly older.
                    let end = match cursor {
                        None => "+".to_owned(),
                        Some(at) if partition < at.partition => at.entry_id(),
                        Some(at) => format!("({}", at.entry_id()),
                    };
                    let mut command = redis::cmd("XREVRANGE");
                    command
                        .arg(self.keys.playbook_runs(partition, playbook))
                        .arg(end)
                        .arg("-")
                        .arg("COUNT")
                        .arg(per_partition);
                    command
                })
                .collect();
            let answers = timed("list_runs", self.conn.query_each(commands)).await?;
            let mut lists = Vec::with_capacity(answers.len());
            for (partition, answer) in (0..self.partitions).zip(answers) {
                let entries: Vec<(String, Vec<String>)> = redis::from_redis_value(answer)?;
                let listed: Vec<Listed> = entries
                    .into_iter()
                    .filter_map(|(entry_id, fields)| {
                        Some(Listed {
                            position: ListPosition::from_entry(&entry_id, partition)?,
                            run_id: fields.get(1)?.clone(),
                        })
                    })
                    .collect();
                lists.push(listed);
            }
            // A partition that filled its share may hold more entries newer than others'
            // last ones: only entries at or above the newest such cut-off are certain.
            let frontier = lists
                .iter()
                .filter(|listed| listed.len() == per_partition)
                .filter_map(|listed| listed.last().map(|last| last.position))
                .max();
            let mut merged: Vec<Listed> = lists
                .into_iter()
                .flatten()
                .filter(|listed| frontier.is_none_or(|cut| listed.position >= cut))
                .collect();
            merged.sort_unstable_by_key(|listed| std::cmp::Reverse(listed.position));
            for listed in merged.into_iter().take(count - out.len()) {
                cursor = Some(listed.position);
                out.push(listed);
            }
            if frontier.is_none() {
                break;
            }
            per_partition = per_partition.saturating_mul(2);
        }
        Ok(out)
    }

    /// Drops the entries of runs that no longer exist from `playbook`'s list in
    /// `partition`, looking at up to `count` entries after `after` (from the start for
    /// `None`) of runs enrolled by `enrolled_by_ms` (`None`: all): how many were dropped,
    /// and where to go on from (`None`: the list, or its part looked at, ended).
    pub async fn sweep_run_list(
        &self,
        partition: u16,
        playbook: &str,
        after: Option<&str>,
        enrolled_by_ms: Option<i64>,
        count: usize,
    ) -> Result<(u64, Option<String>)> {
        let mut conn = self.conn.clone();
        let mut invocation = SWEEP.prepare_invoke();
        invocation
            .key(self.keys.playbook_runs(partition, playbook))
            .arg(self.keys.run_prefix(partition))
            .arg(after.unwrap_or_default())
            .arg(count)
            .arg(enrolled_by_ms.map_or_else(|| "+".to_owned(), |ms| ms.to_string()));
        let (dropped, last): (u64, String) =
            timed("sweep_run_list", invocation.invoke_async(&mut conn)).await?;
        Ok((dropped, (!last.is_empty()).then_some(last)))
    }

    /// Drops list entries of runs that expired.
    pub async fn forget_runs(&self, playbook: &str, listed: &[Listed]) -> Result<()> {
        let commands = listed
            .iter()
            .map(|entry| {
                let mut command = redis::cmd("XDEL");
                command
                    .arg(self.keys.playbook_runs(entry.position.partition, playbook))
                    .arg(entry.position.entry_id());
                command
            })
            .collect();
        self.conn.query_each(commands).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ListPosition;

    #[test]
    fn positions_order_by_entry_then_partition_and_round_trip() {
        let at = |ms, seq, partition| ListPosition { ms, seq, partition };
        assert!(at(5, 0, 9) < at(5, 1, 0));
        assert!(at(5, 1, 0) < at(5, 1, 3));
        assert!(at(5, 9, 3) < at(6, 0, 0));
        let position = at(1_764_740_000_000, 12, 255);
        assert_eq!(ListPosition::parse(&position.to_token()), Some(position));
        for bad in ["", "1-2", "1-2-3-4", "a-2-3", "1-2-70000"] {
            assert_eq!(ListPosition::parse(bad), None, "{bad}");
        }
    }
}
