//! THE Redis key layout. Every key Touchpoint writes is built here.
//!
//! Keys about one contact carry their partition's hash tag `{pN}`, so every script
//! that decides something about a contact or its runs touches one slot (atomic on a
//! single Redis, legal on Redis Cluster). Global keys are few and used on their own.
//! See `docs/redis-keys.md` for the writers, readers and lifetimes of each key.

/// Builds key names under one prefix (default `tp`; tests use their own).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// Hash: deployment facts: `partitions` (written once at first start) and `format`
    /// (the data format of the latest scheduler started, `store::DATA_FORMAT`).
    pub fn meta(&self) -> String {
        format!("{}:meta", self.prefix)
    }

    /// Set of playbook names.
    pub fn playbook_names(&self) -> String {
        format!("{}:playbooks", self.prefix)
    }

    /// Hash: `latest` version, `digest` of the latest content, `v<N>` = stored version (JSON).
    pub fn playbook(&self, name: &str) -> String {
        format!("{}:playbook:{{{name}}}", self.prefix)
    }

    /// Set of the names of playbooks with a `schedule:` (recurring campaigns).
    pub fn scheduled(&self) -> String {
        format!("{}:scheduled", self.prefix)
    }

    /// Hash: playbook name → the event its latest version enters on (`entry.event`).
    pub fn entry_events(&self) -> String {
        format!("{}:entries", self.prefix)
    }

    /// Set of the names of paused playbooks.
    pub fn paused_playbooks(&self) -> String {
        format!("{}:paused", self.prefix)
    }

    /// Hash: the contact-budget policy: `latest`, `digest`, `v<N>` (as for playbooks).
    pub fn policy(&self) -> String {
        format!("{}:policy", self.prefix)
    }

    /// Hash: progress of a recurring playbook's ticks (`last` tick handled, ms).
    pub fn schedule_state(&self, name: &str) -> String {
        format!("{}:schedule:{{{name}}}", self.prefix)
    }

    /// Hash: one tick of a recurring playbook, claimed by one scheduler at a time.
    pub fn tick(&self, name: &str, tick_ms: i64) -> String {
        format!("{}:tick:{{{name}}}:{tick_ms}", self.prefix)
    }

    /// Hash: the token bucket of a channel's rate limit, shared by every scheduler
    /// (`tk` tokens, `ts` last refill ms, `bu` blocked until ms, `pu` rate halved until
    /// ms). Tagged by the channel, so each bucket is one slot of its own.
    pub fn rate_bucket(&self, channel: &str) -> String {
        format!("{}:{{rl:{channel}}}:bucket", self.prefix)
    }

    /// Sorted set: channels held back by a provider's "too many requests", scored by
    /// when their halved rate ends; every scheduler reads it to learn of holds on
    /// channels it hands out without a rate.
    pub fn rate_penalties(&self) -> String {
        format!("{}:rl-penalties", self.prefix)
    }

    /// Sorted set: scheduler id → when its membership expires (ms, the scheduler's
    /// clock). Each scheduler renews its own entry; any scheduler prunes expired ones.
    pub fn schedulers(&self) -> String {
        format!("{}:schedulers", self.prefix)
    }

    /// String: the advertised gRPC address of scheduler `id`, expiring with its
    /// membership (told to workers, see `docs/scaling.md`).
    pub fn scheduler_address(&self, id: &str) -> String {
        format!("{}:scheduler:{id}", self.prefix)
    }

    /// Pub/sub channel (not a key): "partition N is due at T" from a scheduler that
    /// wrote to a partition it does not own, to its owner (see `crate::wake`).
    pub fn wake_channel(&self) -> String {
        format!("{}:wake", self.prefix)
    }

    /// Hash tag prefix of every key of `partition`.
    fn partition(&self, partition: u16) -> String {
        format!("{}:{{p{partition}}}", self.prefix)
    }

    /// Sorted set: run id → when its current step is due (ms).
    pub fn due(&self, partition: u16) -> String {
        format!("{}:due", self.partition(partition))
    }

    /// Sorted set: hour number → when the hour begins (ms), one entry per hourly list of
    /// timers far ahead (`lua/later.lua`); each list is this key, `:`, the hour.
    pub fn later(&self, partition: u16) -> String {
        format!("{}:later", self.partition(partition))
    }

    /// String: the id of the scheduler that owns the partition (runs its timers), set
    /// with an expiry and renewed by its owner (`partition_acquire.lua`).
    pub fn partition_owner(&self, partition: u16) -> String {
        format!("{}:owner", self.partition(partition))
    }

    /// Sorted set: run id → lease deadline (ms) of its handed-out step.
    pub fn lease(&self, partition: u16) -> String {
        format!("{}:lease", self.partition(partition))
    }

    /// Prefix of run hashes; the run id follows.
    pub fn run_prefix(&self, partition: u16) -> String {
        format!("{}:run:", self.partition(partition))
    }

    /// Prefix of contact hashes; the contact id follows.
    pub fn contact_prefix(&self, partition: u16) -> String {
        format!("{}:contact:", self.partition(partition))
    }

    /// String: enrollment request id → run id, expiring after a day.
    pub fn enroll_request(&self, partition: u16, request_id: &str) -> String {
        format!("{}{request_id}", self.enroll_request_prefix(partition))
    }

    /// Prefix of the enrollment request keys of a partition; the request id follows.
    pub fn enroll_request_prefix(&self, partition: u16) -> String {
        format!("{}:req:", self.partition(partition))
    }

    /// Stream, one entry (`r` = run id) per run: the partition's runs of one playbook,
    /// for listing (see `run_lists`).
    pub fn playbook_runs(&self, partition: u16, playbook: &str) -> String {
        format!("{}{playbook}", self.playbook_runs_prefix(partition))
    }

    /// Prefix of the per-playbook run lists of a partition; the playbook name follows.
    pub fn playbook_runs_prefix(&self, partition: u16) -> String {
        format!("{}:runlog:", self.partition(partition))
    }

    /// Sorted set: run id → when it failed (ms), for every dead-lettered run of the
    /// partition (failed at an action step, waiting to be retried).
    pub fn dead(&self, partition: u16) -> String {
        format!("{}:dead", self.partition(partition))
    }

    /// Prefix of the per-playbook dead-letter sets of a partition (same members and
    /// scores as [`Keys::dead`], one set per playbook); the playbook name follows.
    pub fn dead_playbook_prefix(&self, partition: u16) -> String {
        format!("{}:dead:", self.partition(partition))
    }

    /// Set: ids of the partition's contacts that carry `tag` (audiences of schedules).
    pub fn tag(&self, partition: u16, tag: &str) -> String {
        format!("{}:tag:{tag}", self.partition(partition))
    }

    /// Prefix of the tag sets of a partition; the tag follows.
    pub fn tag_prefix(&self, partition: u16) -> String {
        format!("{}:tag:", self.partition(partition))
    }

    /// Prefix of per-contact hashes run id → wait_for registration; the contact id follows.
    pub fn waits_prefix(&self, partition: u16) -> String {
        format!("{}:waits:", self.partition(partition))
    }

    /// Prefix of per-contact hashes run id → goal event; the contact id follows.
    pub fn goals_prefix(&self, partition: u16) -> String {
        format!("{}:goals:", self.partition(partition))
    }

    /// Prefix of per-contact lists of recent events (`<ms> <name>`); the contact id follows.
    pub fn events_prefix(&self, partition: u16) -> String {
        format!("{}:ev:", self.partition(partition))
    }

    /// String: an event's request id (for one contact), expiring after a day.
    pub fn event_request(&self, partition: u16, contact_id: &str, request_id: &str) -> String {
        format!(
            "{}:evreq:{}:{contact_id}:{request_id}",
            self.partition(partition),
            contact_id.len()
        )
    }

    /// Prefix of per-contact sorted sets of counted sends (member `run.step`, score ms);
    /// `<contact id>|<cap channel>` follows.
    pub fn sent_prefix(&self, partition: u16) -> String {
        format!("{}:sent:", self.partition(partition))
    }

    /// Prefix of the funnel counters (hash) of a playbook version in the partition;
    /// `<playbook>:<version>` follows.
    pub fn stats_prefix(&self, partition: u16) -> String {
        format!("{}:stats:", self.partition(partition))
    }

    /// Sorted set: runs of a paused playbook whose step came due (score: when it was due).
    pub fn paused_runs(&self, partition: u16, playbook: &str) -> String {
        format!("{}:paused:{playbook}", self.partition(partition))
    }

    /// Prefix of the paused-run sets of a partition; the playbook name follows.
    pub fn paused_runs_prefix(&self, partition: u16) -> String {
        format!("{}:paused:", self.partition(partition))
    }

    /// Sorted set: the dead-lettered runs of one playbook in one partition.
    pub fn dead_playbook(&self, partition: u16, playbook: &str) -> String {
        format!("{}{playbook}", self.dead_playbook_prefix(partition))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash tag of a key: the text between the first `{` and the next `}`.
    fn hash_tag(key: &str) -> &str {
        let start = key.find('{').unwrap() + 1;
        let end = start + key[start..].find('}').unwrap();
        &key[start..end]
    }

    #[test]
    fn every_partition_key_shares_one_hash_tag() {
        let keys = Keys::new("tp");
        let p = 17;
        let all = [
            keys.due(p),
            keys.later(p),
            format!("{}:490000", keys.later(p)),
            keys.lease(p),
            keys.partition_owner(p),
            format!("{}r1", keys.run_prefix(p)),
            format!("{}c1", keys.contact_prefix(p)),
            keys.enroll_request(p, "req"),
            keys.dead(p),
            keys.dead_playbook(p, "welcome"),
            keys.tag(p, "paid"),
            format!("{}c1", keys.waits_prefix(p)),
            format!("{}c1", keys.goals_prefix(p)),
            format!("{}c1", keys.events_prefix(p)),
            keys.event_request(p, "c1", "r1"),
            format!("{}c1|*", keys.sent_prefix(p)),
            format!("{}welcome:1", keys.stats_prefix(p)),
            keys.paused_runs(p, "welcome"),
            keys.playbook_runs(p, "welcome"),
        ];
        for key in &all {
            assert_eq!(hash_tag(key), "p17", "{key}");
        }
    }

    #[test]
    fn playbook_keys_are_tagged_by_name() {
        let keys = Keys::new("tp");
        assert_eq!(hash_tag(&keys.playbook("welcome")), "welcome");
    }

    #[test]
    fn a_rate_bucket_is_tagged_by_its_channel() {
        let keys = Keys::new("tp");
        assert_eq!(keys.rate_bucket("wecom"), "tp:{rl:wecom}:bucket");
        assert_eq!(hash_tag(&keys.rate_bucket("wecom")), "rl:wecom");
    }
}
