//! The playbook model: what a marketer writes, parsed and validated in one place.
//!
//! [`parse`] turns YAML into a [`Playbook`] or a list of [`Violation`]s, each naming
//! the field path (`steps[1].wait`) and what was expected. Every check that can be made
//! at apply time is made here (syntax of templates and `if` expressions included), so a
//! run never reaches a step that cannot work.

mod duration;
mod parse;
mod template;

use std::time::Duration;

pub use duration::parse_duration;
pub(crate) use parse::read_document;
pub use parse::{Violation, Violations, is_event_name, parse};
pub use template::{Compiled, RenderError};

/// Most steps one playbook may have.
pub const MAX_STEPS: usize = 200;
/// Largest YAML source accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 256 * 1024;

/// A validated playbook.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Playbook {
    /// `[a-z0-9-]{1,63}`.
    pub name: String,
    pub description: String,
    pub entry: Entry,
    /// The event that ends a run as converted (`goal.event`).
    pub goal: Option<String>,
    /// Recurring campaign: enroll an audience on every cron tick.
    pub schedule: Option<crate::schedule::Schedule>,
    pub steps: Vec<Step>,
}

/// How contacts enter a playbook.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    /// Recording this event for a contact starts a run (`entry.event`).
    pub event: Option<String>,
    pub reentry: Reentry,
}

/// Whether a contact that already entered a playbook may enter it again. It holds for
/// every way in: API and CLI enrollments, entry events and schedule ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Reentry {
    /// Once per contact, ever (the default; recurring playbooks default to `Always`).
    Never,
    Always,
    /// Again once this long has passed since the contact last entered.
    After(#[serde(with = "millis")] Duration),
}

/// One step of a playbook.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
    /// Index of the step the run goes to after this one (`goto:`), when not the next.
    /// A step whose `if` is false falls through to the next step instead.
    pub goto: Option<usize>,
}

/// What a step does: a closed set.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum StepKind {
    /// Send something through a channel.
    Action(Action),
    /// Let time pass.
    Wait {
        #[serde(with = "millis")]
        duration: Duration,
    },
    /// Wait until the next time the contact's clock shows `HH:MM`.
    WaitUntil { hour: u8, minute: u8 },
    /// Wait for an event of the contact, at most `timeout`.
    WaitFor(WaitFor),
    /// End the run (completed), unless its `if` is false.
    Exit { condition: Option<String> },
}

/// A `wait_for:` step.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WaitFor {
    pub event: String,
    #[serde(with = "millis")]
    pub timeout: Duration,
    /// Where the run goes when the event comes (default: the next step).
    pub on_event: Option<usize>,
    /// Where the run goes when the timeout passes first (default: the next step).
    pub on_timeout: Option<usize>,
}

/// What a capped or quiet-hours send does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Hold {
    /// Skip the step (the run goes on).
    Skip,
    /// Send it later: when the quiet hours end, or the cap's window has room.
    Defer,
}

/// An action step: handed to a worker that serves `channel`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Action {
    pub action: String,
    pub channel: String,
    /// Jinja template rendered into the delivery's `message`.
    pub template: Option<String>,
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Jinja expression; the step is skipped when it is false.
    pub condition: Option<String>,
    /// The step's own `retry:` fields; the rest come from the channel's defaults (announced
    /// by its workers) and then [`RetryPolicy::default`].
    pub retry: RetryOverrides,
    /// Bypasses the contact budget (caps and quiet hours): order confirmations and the like.
    pub transactional: bool,
    /// What a send over a frequency cap does (default skip).
    pub on_cap: Hold,
    /// What a send in the contact's quiet hours does (default defer).
    pub on_quiet_hours: Hold,
    /// Not sent at all once this long has passed since the run started (a WeCom welcome
    /// code is good for about 20 s after the contact was added): skipped, never late.
    pub deadline: Option<Duration>,
}

/// Retry settings that may leave fields unset, to be filled from a wider default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetryOverrides {
    pub max_attempts: Option<u32>,
    #[serde(with = "opt_millis")]
    pub initial: Option<Duration>,
    #[serde(with = "opt_millis")]
    pub max: Option<Duration>,
}

impl RetryOverrides {
    /// The policy for a step: its own fields, then the channel's, then the defaults.
    /// A delay that starts above the cap raises the cap.
    pub fn resolve(&self, channel: &RetryOverrides) -> RetryPolicy {
        let default = RetryPolicy::default();
        let initial = self.initial.or(channel.initial).unwrap_or(default.initial);
        let max = self.max.or(channel.max).unwrap_or(default.max);
        RetryPolicy {
            max_attempts: self
                .max_attempts
                .or(channel.max_attempts)
                .unwrap_or(default.max_attempts),
            initial,
            max: max.max(initial),
        }
    }
}

/// How often and how fast a failed delivery is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    #[serde(with = "millis")]
    pub initial: Duration,
    #[serde(with = "millis")]
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl Step {
    /// "action", "wait", "wait_until", "wait_for" or "exit", as shown in run timelines.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            StepKind::Action(_) => "action",
            StepKind::Wait { .. } => "wait",
            StepKind::WaitUntil { .. } => "wait_until",
            StepKind::WaitFor(_) => "wait_for",
            StepKind::Exit { .. } => "exit",
        }
    }

    /// The channel of an action step.
    pub fn channel(&self) -> Option<&str> {
        match &self.kind {
            StepKind::Action(action) => Some(&action.channel),
            _ => None,
        }
    }
}

impl Playbook {
    /// Where a run goes after step `index` ran (not skipped): its `goto`, or the next step.
    pub fn after(&self, index: usize) -> usize {
        self.steps
            .get(index)
            .and_then(|step| step.goto)
            .unwrap_or(index + 1)
    }
}

mod opt_millis {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_millis()),
            None => s.serialize_none(),
        }
    }
}

mod millis {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_fields_come_from_the_step_then_the_channel_then_the_defaults() {
        let step = RetryOverrides {
            max_attempts: Some(3),
            ..RetryOverrides::default()
        };
        let channel = RetryOverrides {
            max_attempts: Some(7),
            initial: Some(Duration::from_millis(100)),
            max: None,
        };
        let policy = step.resolve(&channel);
        assert_eq!(policy.max_attempts, 3);
        assert_eq!(policy.initial, Duration::from_millis(100));
        assert_eq!(policy.max, RetryPolicy::default().max);
        assert_eq!(
            RetryOverrides::default().resolve(&RetryOverrides::default()),
            RetryPolicy::default()
        );
        // A delay that starts above the cap raises the cap.
        let slow = RetryOverrides {
            initial: Some(Duration::from_secs(600)),
            ..RetryOverrides::default()
        };
        assert_eq!(
            slow.resolve(&RetryOverrides::default()).max,
            Duration::from_secs(600)
        );
    }
}
