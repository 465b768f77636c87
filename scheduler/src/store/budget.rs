//! The contact budget in Redis: frequency-cap counters, checked and spent in one script.

use super::{Result, Store};

/// One send to check against the caps that apply to it.
#[derive(Debug, Clone)]
pub struct Send {
    /// Identifies the send (run id and step): a retry of it is not counted twice.
    pub member: String,
    pub contact_id: String,
    pub caps: Vec<CapCheck>,
}

/// One cap as it applies to one contact now.
#[derive(Debug, Clone)]
pub struct CapCheck {
    /// `*` or a channel name: whose sends the cap counts.
    pub channel: String,
    /// Sends since this instant count.
    pub window_start_ms: i64,
    pub max: u32,
    /// How long a counted send is kept.
    pub keep_ms: i64,
}

/// The answer for one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    /// Within every cap, and now counted.
    Allowed,
    /// Refused by the cap at this index of [`Send::caps`]; the oldest send counted in
    /// its window, when known.
    Refused { cap: usize, oldest_ms: Option<i64> },
}

impl Store {
    /// Checks and counts `sends` of contacts of `partition`, atomically.
    pub async fn spend(&self, partition: u16, now_ms: i64, sends: &[Send]) -> Result<Vec<Spent>> {
        if sends.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut invocation = self.scripts.spend.prepare_invoke();
        invocation
            .key(self.keys.due(partition))
            .arg(self.keys.sent_prefix(partition))
            .arg(now_ms);
        for send in sends {
            invocation
                .arg(&send.member)
                .arg(&send.contact_id)
                .arg(send.caps.len());
            for cap in &send.caps {
                invocation
                    .arg(&cap.channel)
                    .arg(cap.window_start_ms)
                    .arg(cap.max)
                    .arg(cap.keep_ms);
            }
        }
        let answers: Vec<(usize, String)> = invocation.invoke_async(&mut conn).await?;
        Ok(answers
            .into_iter()
            .map(|(refused, oldest)| match refused {
                0 => Spent::Allowed,
                k => Spent::Refused {
                    cap: k - 1,
                    oldest_ms: oldest.parse::<f64>().ok().map(|ms| ms as i64),
                },
            })
            .collect())
    }
}
