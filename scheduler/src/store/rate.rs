//! Per-channel rate limits in Redis: one token bucket per channel, shared by every
//! scheduler, taken from once per channel per claim batch (`rate_take.lua`) and held
//! back by providers' "too many requests" answers (`rate_penalize.lua`). Each call
//! touches the channel's bucket only (its own slot on Redis Cluster).

use super::{Result, Store};

/// A channel's token bucket: `per_second` tokens a second on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

/// What one take from a bucket gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Tokens granted (at most the number asked for).
    pub granted: usize,
    /// Ms until the next token (0 when all were granted).
    pub wait_ms: i64,
    /// Ms per token at the rate in force (halved after a penalty); 0 without a rate.
    pub per_token_ms: i64,
}

impl Store {
    /// Takes up to `wanted` tokens from `channel`'s bucket. Without a `rate` only a
    /// penalty holds the channel back (all or nothing). `now_ms` is for tests; `None`
    /// uses Redis's clock, which every scheduler shares.
    pub async fn rate_take(
        &self,
        channel: &str,
        rate: Option<Rate>,
        wanted: usize,
        now_ms: Option<i64>,
    ) -> Result<Taken> {
        let mut conn = self.conn.clone();
        let (per_second, burst) = rate.map_or((0.0, 0), |r| (r.per_second, r.burst));
        let (granted, wait_ms, per_token_ms): (usize, i64, i64) = self
            .scripts
            .rate_take
            .key(self.keys.rate_bucket(channel))
            .arg(now_ms.map(|ms| ms.to_string()).unwrap_or_default())
            .arg(per_second)
            .arg(burst)
            .arg(wanted)
            .invoke_async(&mut conn)
            .await?;
        Ok(Taken {
            granted: granted.min(wanted),
            wait_ms,
            per_token_ms,
        })
    }

    /// Holds `channel` back for every scheduler for `block_ms`, then halves its rate for
    /// `halved_ms`. Returns the ms until the channel is free again (a longer block
    /// recorded earlier is kept).
    pub async fn rate_penalize(
        &self,
        channel: &str,
        block_ms: i64,
        halved_ms: i64,
        now_ms: Option<i64>,
    ) -> Result<i64> {
        let mut conn = self.conn.clone();
        let remaining: i64 = self
            .scripts
            .rate_penalize
            .key(self.keys.rate_bucket(channel))
            .arg(now_ms.map(|ms| ms.to_string()).unwrap_or_default())
            .arg(block_ms)
            .arg(halved_ms)
            .invoke_async(&mut conn)
            .await?;
        Ok(remaining)
    }

    /// Lists `channel` as held back until `until_ms`, for the schedulers that hand it
    /// out without a rate (they would not look at its bucket otherwise). Entries past
    /// their time are dropped on the way.
    pub async fn announce_penalty(&self, channel: &str, until_ms: i64, now_ms: i64) -> Result<()> {
        let key = self.keys.rate_penalties();
        let mut conn = self.conn.clone();
        let () = redis::pipe()
            .cmd("ZADD")
            .arg(&key)
            .arg("GT")
            .arg(until_ms)
            .arg(channel)
            .ignore()
            .zrembyscore(&key, "-inf", now_ms)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// The channels held back now, with when their hold (and halved rate) ends.
    pub async fn penalties(&self, now_ms: i64) -> Result<Vec<(String, i64)>> {
        let mut conn = self.conn.clone();
        let listed: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.keys.rate_penalties())
            .arg(now_ms)
            .arg("+inf")
            .arg("BYSCORE")
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        // Scores are whole ms, well inside f64's exact range.
        let listed = listed
            .into_iter()
            .map(|(channel, until)| (channel, until as i64))
            .collect();
        Ok(listed)
    }
}
