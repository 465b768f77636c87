//! Contacts, events, pausing, the policy record and funnel counters in Redis.

use std::collections::{BTreeMap, HashSet};

use redis::AsyncCommands;

use super::{Applied, ContactRecord, Result, Store, StoredPlaybook, protocol};
use crate::run::partition_of_contact;

/// How long an event's request id is remembered.
const EVENT_REQUEST_TTL_SECS: u64 = 24 * 3600;
/// Most events kept in a contact's lookback.
const LOOKBACK_LEN: usize = 32;

/// What recording an event did to the contact's runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordedEvent {
    /// The request id was recorded before: nothing was done.
    pub duplicate: bool,
    pub woken: Vec<String>,
    pub converted: Vec<String>,
}

/// A change to one contact.
#[derive(Debug, Clone, Default)]
pub struct ContactChange {
    /// Attributes and identities to set, tags to add, the time zone (when not empty).
    pub contact: ContactRecord,
    pub remove_tags: Vec<String>,
    pub remove_attrs: Vec<String>,
}

impl Store {
    /// Records `event` (JSON of name and attrs) for a contact: goals, wait_for wake-ups and
    /// the lookback, in one script on the contact's partition.
    pub async fn record_event(
        &self,
        contact_id: &str,
        name: &str,
        event_json: &str,
        request_id: Option<&str>,
        now_ms: i64,
        lookback_ms: u64,
    ) -> Result<RecordedEvent> {
        let mut conn = self.conn.clone();
        let p = partition_of_contact(contact_id, self.partitions);
        let mut invocation = self.scripts.event.prepare_invoke();
        invocation
            .key(self.keys.due(p))
            .key(self.keys.lease(p))
            .key(self.keys.later(p));
        if let Some(request_id) = request_id {
            invocation.key(self.keys.event_request(p, contact_id, request_id));
        }
        invocation
            .arg(self.keys.run_prefix(p))
            .arg(contact_id)
            .arg(name)
            .arg(now_ms)
            .arg(lookback_ms.max(1))
            .arg(LOOKBACK_LEN)
            .arg(EVENT_REQUEST_TTL_SECS)
            .arg(self.retention_secs)
            .arg(self.keys.stats_prefix(p))
            .arg(self.keys.waits_prefix(p))
            .arg(self.keys.goals_prefix(p))
            .arg(self.keys.events_prefix(p))
            .arg(self.keys.paused_runs_prefix(p))
            .arg(event_json);
        let (duplicate, woken, converted): (u8, Vec<String>, Vec<String>) =
            invocation.invoke_async(&mut conn).await?;
        Ok(RecordedEvent {
            duplicate: duplicate == 1,
            woken,
            converted,
        })
    }

    /// Creates or updates a contact (and its tag index); returns it as stored.
    pub async fn upsert_contact(&self, change: &ContactChange) -> Result<ContactRecord> {
        let mut conn = self.conn.clone();
        let id = &change.contact.id;
        let p = partition_of_contact(id, self.partitions);
        let sets = change.contact.to_fields();
        let removes: Vec<String> = change
            .remove_attrs
            .iter()
            .map(|a| format!("a:{a}"))
            .chain(change.remove_tags.iter().map(|t| format!("t:{t}")))
            .collect();
        let mut invocation = self.scripts.upsert_contact.prepare_invoke();
        invocation
            .key(format!("{}{id}", self.keys.contact_prefix(p)))
            .arg(self.keys.tag_prefix(p))
            .arg(id)
            .arg(sets.len())
            .arg(removes.len())
            .arg(change.contact.tags.len());
        for (field, value) in &sets {
            invocation.arg(field).arg(value);
        }
        for field in &removes {
            invocation.arg(field);
        }
        for tag in change.contact.tags.iter().chain(&change.remove_tags) {
            invocation.arg(tag);
        }
        let fields: Vec<String> = invocation.invoke_async(&mut conn).await?;
        Ok(contact_from_flat(id, &fields))
    }

    /// A contact, or `None` when it does not exist.
    pub async fn get_contact(&self, id: &str) -> Result<Option<ContactRecord>> {
        let mut conn = self.conn.clone();
        let p = partition_of_contact(id, self.partitions);
        let fields: Vec<String> = conn
            .hgetall(format!("{}{id}", self.keys.contact_prefix(p)))
            .await?;
        Ok((!fields.is_empty()).then(|| contact_from_flat(id, &fields)))
    }

    /// Marks a playbook paused or not.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<()> {
        let mut conn = self.conn.clone();
        let key = self.keys.paused_playbooks();
        if paused {
            let _: () = conn.sadd(key, name).await?;
        } else {
            let _: () = conn.srem(key, name).await?;
        }
        Ok(())
    }

    /// Names of the paused playbooks.
    pub async fn paused_playbooks(&self) -> Result<HashSet<String>> {
        let mut conn = self.conn.clone();
        Ok(conn.smembers(self.keys.paused_playbooks()).await?)
    }

    /// Puts the parked runs of `playbook` back to due, in every partition; returns how
    /// many went back.
    pub async fn resume_parked(&self, playbook: &str) -> Result<u64> {
        let mut conn = self.conn.clone();
        let mut resumed = 0;
        for p in 0..self.partitions {
            let n: u64 = self
                .scripts
                .resume
                .key(self.keys.due(p))
                .key(self.keys.paused_runs(p, playbook))
                .invoke_async(&mut conn)
                .await?;
            resumed += n;
        }
        Ok(resumed)
    }

    /// Records the event a playbook's latest version enters on (or none).
    pub async fn set_entry_event(&self, playbook: &str, event: Option<&str>) -> Result<()> {
        let mut conn = self.conn.clone();
        let key = self.keys.entry_events();
        match event {
            Some(event) => {
                let _: () = conn.hset(key, playbook, event).await?;
            }
            None => {
                let _: () = conn.hdel(key, playbook).await?;
            }
        }
        Ok(())
    }

    /// The playbooks that enter on `event`.
    pub async fn entry_playbooks(&self, event: &str) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        let all: BTreeMap<String, String> = conn.hgetall(self.keys.entry_events()).await?;
        Ok(all
            .into_iter()
            .filter_map(|(playbook, e)| (e == event).then_some(playbook))
            .collect())
    }

    /// Stores a policy version unless unchanged (or only reports, for a dry run).
    pub async fn apply_policy(
        &self,
        digest: &str,
        stored: &StoredPlaybook,
        dry_run: bool,
    ) -> Result<Applied> {
        self.apply_versioned(&self.keys.policy(), digest, stored, dry_run)
            .await
    }

    /// The latest policy version, or `None` when none was applied.
    pub async fn get_policy(&self) -> Result<Option<(u32, StoredPlaybook)>> {
        let mut conn = self.conn.clone();
        let key = self.keys.policy();
        let latest: Option<u32> = conn.hget(&key, "latest").await?;
        let Some(latest) = latest else {
            return Ok(None);
        };
        let record: Option<String> = conn.hget(&key, format!("v{latest}")).await?;
        let Some(record) = record else {
            return Ok(None);
        };
        let stored = serde_json::from_str(&record)
            .map_err(|e| protocol(&format!("policy v{latest}: {e}")))?;
        Ok(Some((latest, stored)))
    }

    /// The latest policy version number (0: none).
    pub async fn policy_version(&self) -> Result<u32> {
        let mut conn = self.conn.clone();
        let latest: Option<u32> = conn.hget(self.keys.policy(), "latest").await?;
        Ok(latest.unwrap_or(0))
    }

    /// The funnel counters of one playbook version, summed over partitions: fields
    /// `runs:<in|completed|failed|cancelled|converted>` and `<step index>:<counter>`.
    pub async fn stats(&self, playbook: &str, version: u32) -> Result<BTreeMap<String, i64>> {
        let mut totals = BTreeMap::new();
        let partitions: Vec<u16> = (0..self.partitions).collect();
        for chunk in partitions.chunks(64) {
            let commands = chunk
                .iter()
                .map(|&p| {
                    let mut counters = redis::cmd("HGETALL");
                    counters.arg(self.stats_key(p, playbook, version));
                    counters
                })
                .collect();
            for answer in self.conn.query_each(commands).await? {
                let answer: BTreeMap<String, i64> = redis::from_redis_value(answer)?;
                for (field, n) in answer {
                    *totals.entry(field).or_insert(0) += n;
                }
            }
        }
        Ok(totals)
    }
}

fn contact_from_flat(id: &str, fields: &[String]) -> ContactRecord {
    ContactRecord::from_fields(
        id,
        fields.chunks(2).filter_map(|kv| match kv {
            [k, v] => Some((k.as_str(), v.as_str())),
            _ => None,
        }),
    )
}
