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
pub use parse::{Violation, Violations, parse};
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
    pub steps: Vec<Step>,
}

/// One step of a playbook.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Step {
    pub id: String,
    pub kind: StepKind,
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
    /// "action" or "wait", as shown in run timelines.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            StepKind::Action(_) => "action",
            StepKind::Wait { .. } => "wait",
        }
    }

    /// The channel of an action step.
    pub fn channel(&self) -> Option<&str> {
        match &self.kind {
            StepKind::Action(action) => Some(&action.channel),
            StepKind::Wait { .. } => None,
        }
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
