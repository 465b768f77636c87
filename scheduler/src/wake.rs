//! Waking a partition's owner when another scheduler writes to the partition.
//!
//! Only a partition's owner claims from it (see `crate::ownership`). A scheduler that
//! enrolls a run, records an event or retries a dead letter in a partition it does not
//! own publishes which partition is due when on the `<prefix>:wake` channel; every
//! scheduler listens and looks at the partitions it owns at once, rather than at its
//! next idle poll of them. Publishing is best effort: a lost message costs only that
//! wait (at most `--poll-interval`).
//!
//! A message is `all` (every partition, e.g. a playbook resumed) or space-separated
//! `<partition>:<due ms>` pairs, the wakes of one moment coalesced.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{self, RedisEndpoint, Store};

/// Most wakes coalesced into one message.
const BATCH: usize = 4096;

/// A wake for other schedulers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// Partition `.0` has something due at `.1` (ms).
    Partition(u16, i64),
    /// Every partition should be looked at now.
    All,
}

/// Sends wakes to the other schedulers (see the module doc).
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    wakes: mpsc::UnboundedSender<Wake>,
}

impl Publisher {
    /// A publisher whose messages go out through `store` until `stop`.
    pub(crate) fn start(store: Store, stop: CancellationToken) -> Self {
        let (wakes, rx) = mpsc::unbounded_channel();
        tokio::spawn(publish(store, rx, stop));
        Self { wakes }
    }

    /// Tells the other schedulers about `wake`.
    pub(crate) fn wake(&self, wake: Wake) {
        // Closed only once the scheduler stops; then nobody needs the wake.
        let _ = self.wakes.send(wake);
    }
}

async fn publish(store: Store, mut rx: mpsc::UnboundedReceiver<Wake>, stop: CancellationToken) {
    let mut batch = Vec::new();
    loop {
        let received = tokio::select! {
            () = stop.cancelled() => return,
            received = rx.recv_many(&mut batch, BATCH) => received,
        };
        if received == 0 {
            return;
        }
        let message = encode(&batch);
        batch.clear();
        if let Err(err) = store.publish_wake(&message).await {
            debug!(error = %err, "publishing a wake failed; the owner finds the write at its next poll");
        }
    }
}

/// One message for `wakes`: `all`, or the earliest due time of each partition.
fn encode(wakes: &[Wake]) -> String {
    let mut earliest: HashMap<u16, i64> = HashMap::new();
    for wake in wakes {
        match *wake {
            Wake::All => return "all".to_owned(),
            Wake::Partition(partition, due_ms) => {
                let slot = earliest.entry(partition).or_insert(due_ms);
                *slot = (*slot).min(due_ms);
            }
        }
    }
    let mut pairs: Vec<String> = earliest
        .into_iter()
        .map(|(partition, due_ms)| format!("{partition}:{due_ms}"))
        .collect();
    pairs.sort_unstable();
    pairs.join(" ")
}

/// The wakes a message holds; malformed pairs are skipped.
fn decode(message: &str) -> Vec<Wake> {
    if message == "all" {
        return vec![Wake::All];
    }
    message
        .split(' ')
        .filter_map(|pair| {
            let (partition, due_ms) = pair.split_once(':')?;
            Some(Wake::Partition(
                partition.parse().ok()?,
                due_ms.parse().ok()?,
            ))
        })
        .collect()
}

/// Listens on the wake channel of `redis` until `stop`, handing each wake
/// to `on_wake`; re-subscribes every second while Redis cannot be reached.
pub(crate) async fn listen(
    redis: RedisEndpoint,
    channel: String,
    on_wake: Arc<dyn Fn(Wake) + Send + Sync>,
    stop: CancellationToken,
) {
    let mut warned = false;
    loop {
        match store::subscribe(&redis, &channel).await {
            Ok(mut messages) => {
                if warned {
                    info!("listening for wakes from other schedulers again");
                    warned = false;
                }
                loop {
                    let message = tokio::select! {
                        () = stop.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(message) = message else { break };
                    let Ok(payload) = message.get_payload::<String>() else {
                        continue;
                    };
                    for wake in decode(&payload) {
                        on_wake(wake);
                    }
                }
            }
            Err(err) if !warned => {
                warn!(error = %err, "cannot listen for wakes from other schedulers; writes through them wait for the next poll");
                warned = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Wake, decode, encode};

    #[test]
    fn wakes_of_one_moment_go_in_one_message_earliest_first() {
        let message = encode(&[
            Wake::Partition(3, 500),
            Wake::Partition(12, 90),
            Wake::Partition(3, 200),
        ]);
        assert_eq!(message, "12:90 3:200");
        let mut back = decode(&message);
        back.sort_by_key(|wake| match wake {
            Wake::Partition(p, _) => *p,
            Wake::All => u16::MAX,
        });
        assert_eq!(back, [Wake::Partition(3, 200), Wake::Partition(12, 90)]);
        assert_eq!(encode(&[Wake::Partition(1, 5), Wake::All]), "all");
        assert_eq!(decode("all"), [Wake::All]);
        assert_eq!(decode("x 4:7 5: :9 6:z"), [Wake::Partition(4, 7)]);
    }
}
