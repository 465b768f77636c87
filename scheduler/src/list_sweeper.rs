//! Keeps the playbooks' run lists from growing without bound.
//!
//! A finished run's hash expires after `--retention`, but its entry in its playbook's run
//! list (see `store::run_lists`) stays until something drops it. Each scheduler walks the
//! lists of the partitions it owns, one page of entries at a time at a steady pace, and
//! drops the entries of runs that no longer exist: a full pass over every list, then the
//! next, for as long as the scheduler runs. A run's hash expires a retention after the
//! run finished, so only entries of runs enrolled more than a retention ago are looked at:
//! a young deployment, or a burst of fresh enrollments, costs the sweep nothing.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::{clock::now_ms, ownership::Ownership, store::Store};

/// Entries looked at per script call.
const PAGE: usize = 500;
/// The pause between two calls: at most `PAGE` entries per `PACE` (about 5,000 a second,
/// around 1% of a Redis core).
const PACE: Duration = Duration::from_millis(100);

/// Sweeps the run lists of the partitions `ownership` holds until `stop`.
pub(crate) async fn run(store: Store, ownership: Arc<Ownership>, stop: CancellationToken) {
    // (partition, playbook, where to go on from)
    let mut pending: VecDeque<(u16, String, Option<String>)> = VecDeque::new();
    loop {
        if pending.is_empty() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(PACE) => {}
            }
            match store.playbook_names().await {
                Ok(names) => {
                    for partition in 0..store.partitions() {
                        for name in &names {
                            pending.push_back((partition, name.clone(), None));
                        }
                    }
                }
                Err(err) => debug!(error = %err, "listing playbooks for the run-list sweep failed"),
            }
            continue;
        }
        let Some((partition, playbook, after)) = pending.pop_front() else {
            continue;
        };
        if !ownership.owns(partition, now_ms()) {
            continue;
        }
        let retention_ms = i64::try_from(store.retention().as_millis()).unwrap_or(i64::MAX);
        let enrolled_by = now_ms().saturating_sub(retention_ms);
        match store
            .sweep_run_list(
                partition,
                &playbook,
                after.as_deref(),
                Some(enrolled_by),
                PAGE,
            )
            .await
        {
            Ok((dropped, next)) => {
                if dropped > 0 {
                    debug!(partition, playbook = %playbook, dropped, "dropped run-list entries of expired runs");
                }
                if let Some(next) = next {
                    pending.push_front((partition, playbook, Some(next)));
                }
            }
            Err(err) => {
                debug!(error = %err, partition, playbook = %playbook, "sweeping a run list failed; trying again later");
                pending.push_back((partition, playbook, after));
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(PACE) => {}
        }
    }
}
