//! Runs: their states, timeline entries, how a run moves to its next step, and backoff.

mod backoff;

use serde::{Deserialize, Serialize};

use crate::playbook::{Playbook, StepKind};

pub use backoff::retry_delay;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Active,
    Completed,
    Failed,
    Cancelled,
    /// Ended because the contact reached the playbook's goal.
    Converted,
}

impl RunStatus {
    /// The word stored in Redis.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Converted => "converted",
        }
    }

    /// Reads a stored status word.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "active" => Self::Active,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "converted" => Self::Converted,
            _ => return None,
        })
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    Done,
    Skipped,
    Failed,
    Cancelled,
}

/// One finished step in a run's timeline (stored as one JSON line in the run hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Step index in the playbook version.
    #[serde(rename = "i")]
    pub index: usize,
    #[serde(rename = "s")]
    pub outcome: StepOutcome,
    #[serde(rename = "a")]
    pub attempts: u32,
    #[serde(rename = "due")]
    pub due_ms: i64,
    #[serde(rename = "at")]
    pub done_ms: i64,
    #[serde(rename = "w", default, skip_serializing_if = "String::is_empty")]
    pub worker: String,
    #[serde(rename = "ch", default, skip_serializing_if = "String::is_empty")]
    pub channel: String,
    #[serde(rename = "d", default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl TimelineEntry {
    /// The stored line.
    pub fn to_line(&self) -> String {
        // Serializing a struct of strings and numbers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What comes after a step: the next step due at a time, or the end of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Step { index: usize, due_ms: i64 },
    Completed,
}

/// The step a run moves to when it arrives at `index` at `now_ms`: a wait is "due" when
/// it has elapsed (claiming it then completes it); every other step is due at once. (A
/// `wait_until` or `wait_for` needs the contact, which the claim reads: its first claim
/// schedules it, its second completes it.)
pub fn next_step(playbook: &Playbook, index: usize, now_ms: i64) -> Next {
    match playbook.steps.get(index) {
        None => Next::Completed,
        Some(step) => match &step.kind {
            StepKind::Action(_)
            | StepKind::WaitUntil { .. }
            | StepKind::WaitFor(_)
            | StepKind::Exit { .. } => Next::Step {
                index,
                due_ms: now_ms,
            },
            StepKind::Wait { duration } => Next::Step {
                index,
                due_ms: now_ms
                    .saturating_add(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)),
            },
        },
    }
}

/// The step a run waiting at `wait_index` (a `wait` or `wait_until`) goes straight on to
/// when the wait ends at `due_ms`: the step after it, when that one is due at once (not
/// another `wait`, not the end of the run). The claim at `due_ms` then completes the wait
/// and hands that step out in one pass (`wn` in the run hash, see `claim.lua`), rather
/// than completing the wait in one script call and leasing the next step in another.
pub fn after_wait(playbook: &Playbook, wait_index: usize, due_ms: i64) -> Option<usize> {
    let step = playbook.steps.get(wait_index)?;
    if !matches!(
        step.kind,
        StepKind::Wait { .. } | StepKind::WaitUntil { .. }
    ) {
        return None;
    }
    match next_step(playbook, playbook.after(wait_index), due_ms) {
        Next::Step {
            index,
            due_ms: then,
        } if then == due_ms => Some(index),
        _ => None,
    }
}

/// [`after_wait`] for a run entering step `index`, due at `due_ms`: only a `wait` starts
/// on entry (a `wait_until` is scheduled by its first claim, see the engine).
pub fn after_wait_entered(playbook: &Playbook, index: usize, due_ms: i64) -> Option<usize> {
    let step = playbook.steps.get(index)?;
    matches!(step.kind, StepKind::Wait { .. })
        .then(|| after_wait(playbook, index, due_ms))
        .flatten()
}

/// Digits of run ids, in ASCII order so that ids of one length sort as their numbers.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Base-62 digits of a 128-bit number (62^22 > 2^128).
const RUN_ID_DIGITS: usize = 22;

/// A new run id: a UUIDv7 (so ids sort by creation time) in 22 base-62 digits, then
/// `-` and the run's partition, e.g. `0BnkvQ4yS1ZKF7Qm2Hc3aR-17`. Every run id is kept
/// in Redis several times (its key, its due entry, its playbook's list), so it is short.
pub fn new_run_id(partition: u16) -> String {
    let mut number = uuid::Uuid::now_v7().as_u128();
    let mut digits = [b'0'; RUN_ID_DIGITS];
    for digit in digits.iter_mut().rev() {
        *digit = BASE62[usize::try_from(number % 62).unwrap_or(0)];
        number /= 62;
    }
    let id: String = digits.iter().map(|&b| char::from(b)).collect();
    format!("{id}-{partition}")
}

/// The partition a run id names, if it is well formed for `partitions` (also the
/// 32-hex-digit ids of earlier versions).
pub fn partition_of_run(run_id: &str, partitions: u16) -> Option<u16> {
    let (id, partition) = run_id.rsplit_once('-')?;
    let well_formed = match id.len() {
        RUN_ID_DIGITS => id.bytes().all(|b| b.is_ascii_alphanumeric()),
        32 => id.bytes().all(|b| b.is_ascii_hexdigit()),
        _ => false,
    };
    if !well_formed {
        return None;
    }
    partition.parse().ok().filter(|p| *p < partitions)
}

/// When the run was created (ms since the epoch): the UUIDv7 timestamp its id is made
/// of (also for the 32-hex-digit ids of earlier versions). Runs no longer store it.
pub fn created_ms_of_run(run_id: &str) -> Option<i64> {
    let (id, _) = run_id.rsplit_once('-')?;
    let number = match id.len() {
        RUN_ID_DIGITS => id.bytes().try_fold(0_u128, |number, byte| {
            let digit = BASE62.iter().position(|&c| c == byte)?;
            number.checked_mul(62)?.checked_add(digit as u128)
        })?,
        32 => u128::from_str_radix(id, 16).ok()?,
        _ => return None,
    };
    i64::try_from(number >> 80).ok()
}

/// The partition of a contact: FNV-1a of its id, stable across versions and platforms.
pub fn partition_of_contact(contact_id: &str, partitions: u16) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in contact_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    u16::try_from(hash % u32::from(partitions.max(1))).unwrap_or(0)
}

/// The idempotency key of one step of one run: the same for every attempt.
pub fn idempotency_key(run_id: &str, step_id: &str) -> String {
    format!("{run_id}.{step_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::playbook::parse;

    #[test]
    fn run_ids_tell_when_they_were_made() {
        let before = chrono::Utc::now().timestamp_millis();
        let id = new_run_id(3);
        let after = chrono::Utc::now().timestamp_millis();
        let created = created_ms_of_run(&id).expect("a new id");
        assert!(
            (before..=after).contains(&created),
            "{before} {created} {after}"
        );
        // An id of an earlier version: a UUIDv7 starts with its 48-bit ms timestamp.
        assert_eq!(
            created_ms_of_run("019ae3f2c0a87c3d9b1e5f6a7b8c9d0e-5"),
            Some(0x019a_e3f2_c0a8)
        );
        assert_eq!(created_ms_of_run("nonsense"), None);
        assert_eq!(created_ms_of_run("0BnkvQ4yS1ZKF7Qm2Hc3a_-1"), None);
    }

    #[test]
    fn run_ids_name_their_partition() {
        let id = new_run_id(17);
        assert_eq!(partition_of_run(&id, 256), Some(17));
        assert_eq!(partition_of_run(&id, 16), None);
        assert_eq!(partition_of_run("nonsense", 256), None);
        assert_eq!(partition_of_run("zz-1", 256), None);
        assert_eq!(partition_of_run("0BnkvQ4yS1ZKF7Qm2Hc3a_-1", 256), None);
        // Ids of earlier versions still name their partition.
        assert_eq!(
            partition_of_run("019ae3f2c0a87c3d9b1e5f6a7b8c9d0e-5", 256),
            Some(5)
        );
    }

    #[test]
    fn run_ids_are_short_and_sort_by_creation() {
        let ids: Vec<String> = (0..50)
            .map(|n| {
                if n % 10 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                new_run_id(n % 7)
            })
            .collect();
        for id in &ids {
            assert!(id.len() <= RUN_ID_DIGITS + 2, "{id}");
        }
        let cores: Vec<&str> = ids.iter().map(|id| &id[..RUN_ID_DIGITS]).collect();
        let mut sorted = cores.clone();
        sorted.sort_unstable();
        assert_eq!(cores, sorted, "ids sort in the order they were made");
    }

    #[test]
    fn contact_partition_is_stable_and_in_range() {
        assert_eq!(
            partition_of_contact("c-1001", 256),
            partition_of_contact("c-1001", 256)
        );
        for id in ["", "a", "c-1001", "王芳"] {
            assert!(partition_of_contact(id, 7) < 7);
        }
    }

    #[test]
    fn waits_are_due_when_elapsed_and_actions_at_once() {
        let playbook = parse(
            "name: p\nsteps:\n  - {id: a, action: send, channel: c}\n  - {id: w, wait: 2s}\n",
        )
        .unwrap();
        assert_eq!(
            next_step(&playbook, 0, 1000),
            Next::Step {
                index: 0,
                due_ms: 1000
            }
        );
        assert_eq!(
            next_step(&playbook, 1, 1000),
            Next::Step {
                index: 1,
                due_ms: 3000
            }
        );
        assert_eq!(next_step(&playbook, 2, 1000), Next::Completed);
    }

    #[test]
    fn a_wait_leads_straight_on_only_to_a_step_due_at_once() {
        let playbook = parse(
            "name: p\nsteps:\n  - {id: w1, wait: 2s}\n  - {id: a, action: send, channel: c}\n  \
             - {id: w2, wait: 1s, goto: w4}\n  - {id: never, action: send, channel: c}\n  \
             - {id: w4, wait_until: \"20:00\"}\n  - {id: w5, wait: 1s}\n  - {id: w6, wait: 1s}\n",
        )
        .unwrap();
        assert_eq!(
            after_wait(&playbook, 0, 3000),
            Some(1),
            "wait, then an action"
        );
        assert_eq!(after_wait(&playbook, 1, 3000), None, "not a wait");
        assert_eq!(after_wait(&playbook, 2, 3000), Some(4), "its goto");
        assert_eq!(after_wait(&playbook, 4, 3000), None, "then another wait");
        assert_eq!(after_wait(&playbook, 6, 3000), None, "then the end");
        assert_eq!(after_wait_entered(&playbook, 0, 3000), Some(1));
        assert_eq!(
            after_wait_entered(&playbook, 4, 3000),
            None,
            "a wait_until starts at its first claim, not on entry"
        );
    }

    #[test]
    fn timeline_lines_round_trip() {
        let entry = TimelineEntry {
            index: 2,
            outcome: StepOutcome::Done,
            attempts: 3,
            due_ms: 10,
            done_ms: 20,
            worker: "w1".into(),
            channel: "wecom".into(),
            detail: "HTTP 200".into(),
        };
        let back: TimelineEntry = serde_json::from_str(&entry.to_line()).unwrap();
        assert_eq!(back, entry);
    }
}
