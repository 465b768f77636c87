//! Scheduler membership and partition ownership leases in Redis (the decisions are in
//! `crate::ownership`).
//!
//! Membership is global: a sorted set of scheduler ids scored by when each membership
//! expires, and one string per scheduler with its advertised address (expiring with
//! it), used by plain commands only. A partition's ownership lease is one string with
//! the partition's hash tag, taken and given up by one-key scripts, so nothing here
//! crosses slots on Redis Cluster.

use redis::AsyncCommands;

use super::{Result, Store};

/// A live scheduler, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its scheduler id.
    pub id: String,
    /// The gRPC address it advertises to workers.
    pub address: String,
}

impl Store {
    /// Registers scheduler `id` at `address` until `now_ms + ttl_ms`, or renews it.
    pub async fn register_scheduler(
        &self,
        id: &str,
        address: &str,
        now_ms: i64,
        ttl_ms: u64,
    ) -> Result<()> {
        let expires = now_ms.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
        let commands = vec![
            redis::cmd("SET")
                .arg(self.keys.scheduler_address(id))
                .arg(address)
                .arg("PX")
                .arg(ttl_ms)
                .to_owned(),
            redis::cmd("ZADD")
                .arg(self.keys.schedulers())
                .arg(expires)
                .arg(id)
                .to_owned(),
        ];
        self.conn.query_each(commands).await?;
        Ok(())
    }

    /// The schedulers whose membership has not expired at `now_ms`, by id; expired
    /// entries are pruned on the way.
    pub async fn live_schedulers(&self, now_ms: i64) -> Result<Vec<Member>> {
        let mut conn = self.conn.clone();
        let key = self.keys.schedulers();
        let _: u64 = conn.zrembyscore(&key, "-inf", now_ms).await?;
        let ids: Vec<String> = conn
            .zrangebyscore(&key, format!("({now_ms}"), "+inf")
            .await?;
        let gets = ids
            .iter()
            .map(|id| {
                redis::cmd("GET")
                    .arg(self.keys.scheduler_address(id))
                    .to_owned()
            })
            .collect();
        let addresses = self.conn.query_each(gets).await?;
        let mut members = Vec::with_capacity(ids.len());
        for (id, address) in ids.into_iter().zip(addresses) {
            // An address that expired just now: the member is gone too.
            if let Some(address) = redis::from_redis_value::<Option<String>>(address)? {
                members.push(Member { id, address });
            }
        }
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(members)
    }

    /// Removes scheduler `id`'s membership (a graceful stop).
    pub async fn deregister_scheduler(&self, id: &str) -> Result<()> {
        let commands = vec![
            redis::cmd("ZREM")
                .arg(self.keys.schedulers())
                .arg(id)
                .to_owned(),
            redis::cmd("DEL")
                .arg(self.keys.scheduler_address(id))
                .to_owned(),
        ];
        self.conn.query_each(commands).await?;
        Ok(())
    }

    /// Takes or renews the ownership leases of `partitions` for scheduler `id`, for
    /// `lease_ms` each (one script call per partition, all at once). Returns each
    /// partition's owner after the call (`id` where taken), or the error of its call.
    pub async fn acquire_partitions(
        &self,
        id: &str,
        partitions: &[u16],
        lease_ms: u64,
    ) -> Vec<(u16, Result<String>)> {
        let calls = partitions.iter().map(|&partition| {
            let mut conn = self.conn.clone();
            let script = &self.scripts.partition_acquire;
            let key = self.keys.partition_owner(partition);
            async move {
                let owner = script
                    .key(key)
                    .arg(id)
                    .arg(lease_ms)
                    .invoke_async::<String>(&mut conn)
                    .await;
                (partition, owner.map_err(Into::into))
            }
        });
        futures::future::join_all(calls).await
    }

    /// Gives up the ownership leases of `partitions` that scheduler `id` still holds;
    /// returns how many it held.
    pub async fn release_partitions(&self, id: &str, partitions: &[u16]) -> Result<usize> {
        let calls = partitions.iter().map(|&partition| {
            let mut conn = self.conn.clone();
            let script = &self.scripts.partition_release;
            let key = self.keys.partition_owner(partition);
            async move { script.key(key).arg(id).invoke_async::<u8>(&mut conn).await }
        });
        let mut released = 0;
        for result in futures::future::join_all(calls).await {
            released += usize::from(result? == 1);
        }
        Ok(released)
    }

    /// The owner of every partition (index = partition), `None` where no lease is held.
    pub async fn partition_owners(&self) -> Result<Vec<Option<String>>> {
        let gets = (0..self.partitions)
            .map(|p| {
                redis::cmd("GET")
                    .arg(self.keys.partition_owner(p))
                    .to_owned()
            })
            .collect();
        self.conn
            .query_each(gets)
            .await?
            .into_iter()
            .map(|owner| Ok(redis::from_redis_value(owner)?))
            .collect()
    }
}
