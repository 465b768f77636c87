//! The seam between the scheduler link and the adapters that deliver steps.
//!
//! The link turns each wire task into a [`Delivery`] and hands it to the
//! [`ChannelAdapter`] the [`Registry`] holds under the task's channel name. An adapter
//! answers [`Delivered`] or an [`Error`] that says whether another attempt may succeed.

pub mod grpc;
mod http;
pub mod log;
mod registry;

pub use http::send_traced;
pub(crate) use http::{retry_after, transport_error};
pub mod sms;
pub mod smtp;
pub mod webhook;
pub mod wecom;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::Serialize;

pub use registry::Registry;

/// One attempt of one action step of one run, as adapters see it.
#[derive(Clone, PartialEq)]
pub struct Delivery {
    /// The run this step belongs to.
    pub run_id: String,
    /// Playbook name.
    pub playbook: String,
    /// Playbook version the run is on.
    pub version: u32,
    /// The step's id in the playbook.
    pub step_id: String,
    /// What to do: `send_message`, `add_contact`, `invite_to_group`, ...
    pub action: String,
    /// The channel name the playbook used.
    pub channel: String,
    /// 1 for the first attempt of this step.
    pub attempt: u32,
    /// The rendered template; empty when the step has none.
    pub message: String,
    /// The step's params, always a JSON object.
    pub params: serde_json::Value,
    /// Who the step is for.
    pub contact: Contact,
    /// The same for every attempt of this step of this run: receivers deduplicate on it.
    pub idempotency_key: String,
    /// W3C traceparent of the run's trace; empty when there is none.
    pub traceparent: String,
    /// When the scheduler stops waiting for this attempt's outcome; `None` when unknown.
    pub deadline: Option<SystemTime>,
    /// After this the step must not be delivered at all (answer [`Error::Skipped`]);
    /// `None` when the step has no `deadline`.
    pub step_deadline: Option<SystemTime>,
    /// What an earlier attempt of this step saved through [`Progress::report`]; empty
    /// when none. An adapter resumes from it instead of starting over.
    pub resume_state: String,
    /// Reports how a long delivery is going, and saves state for a later attempt.
    pub progress: Progress,
}

impl Delivery {
    /// Whether the step's deadline has passed (so it must not be sent).
    pub fn past_step_deadline(&self) -> bool {
        self.step_deadline
            .is_some_and(|deadline| SystemTime::now() >= deadline)
    }
}

/// Where an adapter reports progress of a long delivery: the detail shows in the run's
/// step (e.g. `awaiting_confirmation`) and `state` reaches the next attempt as
/// [`Delivery::resume_state`]. Best effort: dropped while the scheduler link is down.
#[derive(Clone, Default)]
pub struct Progress {
    report: Option<Arc<ReportFn>>,
}

/// `report(detail, state)`.
type ReportFn = dyn Fn(&str, &str) + Send + Sync;

impl Progress {
    /// A sink that hands each report to `report(detail, state)`.
    pub fn new(report: impl Fn(&str, &str) + Send + Sync + 'static) -> Self {
        Self {
            report: Some(Arc::new(report)),
        }
    }

    /// Reports `detail` (PII-free, for the timeline) and `state` (opaque to the scheduler).
    pub fn report(&self, detail: &str, state: &str) {
        if let Some(report) = &self.report {
            report(detail, state);
        }
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Progress")
    }
}

// Every sink is alike as far as a delivery's identity goes.
impl PartialEq for Progress {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

// Hand-written so that a `?delivery` in a log line never prints the message or the contact.
impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("run_id", &self.run_id)
            .field("playbook", &self.playbook)
            .field("version", &self.version)
            .field("step_id", &self.step_id)
            .field("action", &self.action)
            .field("channel", &self.channel)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// A person the brand can reach; serialized as the webhook body's `contact`.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
pub struct Contact {
    /// The brand's stable id for the contact.
    pub id: String,
    /// Attributes such as `name`.
    pub attrs: BTreeMap<String, String>,
    /// Tags such as `paid`.
    pub tags: Vec<String>,
    /// IANA time zone, e.g. `Asia/Shanghai`; empty when unknown.
    pub tz: String,
    /// Channel identities: `wecom`, `phone`, `email`, ...
    pub identities: BTreeMap<String, String>,
}

// Hand-written: identities are phone numbers and e-mail addresses.
impl fmt::Debug for Contact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Contact")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// A successful delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// Short, PII-free description for the run timeline, e.g. `HTTP 200`.
    pub detail: String,
}

impl Delivered {
    /// A success described by `detail`.
    pub fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
        }
    }
}

/// A failed delivery that says whether another attempt may succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Worth another attempt (a 5xx, a 429, a timeout, a refused connection).
    #[error("{detail}")]
    Retryable {
        /// Short, PII-free description, e.g. `HTTP 503`.
        detail: String,
        /// How long the receiver asked us to wait, if it did.
        retry_after: Option<Duration>,
        /// The provider said slow down (HTTP 429, a rate-limit errcode): the schedulers
        /// slow the channel down for every worker.
        rate_limited: bool,
    },
    /// Will never succeed (a 4xx, an unknown channel): the step fails now.
    #[error("{detail}")]
    Permanent {
        /// Short description, e.g. `HTTP 400: missing field`.
        detail: String,
    },
    /// Not sent on purpose (past the step's deadline): the run goes on without it.
    #[error("{detail}")]
    Skipped {
        /// Why, e.g. `deadline passed`.
        detail: String,
    },
}

impl Error {
    /// A failure worth retrying after the scheduler's own backoff.
    pub fn retryable(detail: impl Into<String>) -> Self {
        Self::Retryable {
            detail: detail.into(),
            retry_after: None,
            rate_limited: false,
        }
    }

    /// The provider asked us to slow down, for `retry_after` when it said.
    pub fn rate_limited(detail: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Self::Retryable {
            detail: detail.into(),
            retry_after,
            rate_limited: true,
        }
    }

    /// A step not sent on purpose.
    pub fn skipped(detail: impl Into<String>) -> Self {
        Self::Skipped {
            detail: detail.into(),
        }
    }

    /// Whether the provider asked us to slow down.
    pub fn is_rate_limited(&self) -> bool {
        matches!(
            self,
            Self::Retryable {
                rate_limited: true,
                ..
            }
        )
    }

    /// A failure that no retry will fix.
    pub fn permanent(detail: impl Into<String>) -> Self {
        Self::Permanent {
            detail: detail.into(),
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }

    /// The wait the receiver asked for before the next attempt.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Retryable { retry_after, .. } => *retry_after,
            Self::Permanent { .. } | Self::Skipped { .. } => None,
        }
    }

    /// The description that goes into the run timeline.
    pub fn detail(&self) -> &str {
        match self {
            Self::Retryable { detail, .. }
            | Self::Permanent { detail }
            | Self::Skipped { detail } => detail,
        }
    }
}

/// Delivers steps through one kind of channel (webhook, log, ...).
#[async_trait]
pub trait ChannelAdapter: Send + Sync + fmt::Debug {
    /// Makes one attempt. Called concurrently; may be called again for the same step
    /// (with the same [`Delivery::idempotency_key`]) after a failure or a lost result.
    async fn deliver(&self, delivery: &Delivery) -> Result<Delivered, Error>;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The seeds' welcome coupon for 王芳, first attempt.
    pub(crate) fn delivery() -> Delivery {
        Delivery {
            run_id: "run-1".to_owned(),
            playbook: "welcome-new-customer".to_owned(),
            version: 3,
            step_id: "coupon".to_owned(),
            action: "send_message".to_owned(),
            channel: "crm".to_owned(),
            attempt: 1,
            message: "王芳，欢迎！新人券 WELCOME10 已到账".to_owned(),
            params: serde_json::json!({ "coupon": "WELCOME10" }),
            contact: Contact {
                id: "c-1001".to_owned(),
                attrs: BTreeMap::from([("name".to_owned(), "王芳".to_owned())]),
                tags: vec!["paid".to_owned()],
                tz: "Asia/Shanghai".to_owned(),
                identities: BTreeMap::from([
                    ("wecom".to_owned(), "wmXXXX".to_owned()),
                    ("phone".to_owned(), "+8613800000000".to_owned()),
                ]),
            },
            idempotency_key: "run-1:coupon".to_owned(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            deadline: None,
            step_deadline: None,
            resume_state: String::new(),
            progress: Progress::default(),
        }
    }

    #[test]
    fn debug_output_leaves_out_message_and_contact_details() {
        let printed = format!("{:?}", delivery());
        assert!(printed.contains("run-1") && printed.contains("coupon"));
        for secret in ["王芳", "WELCOME10", "+8613800000000", "wmXXXX"] {
            assert!(!printed.contains(secret), "{secret} leaked into {printed}");
        }
    }

    #[test]
    fn errors_classify_themselves() {
        let busy = Error::Retryable {
            detail: "HTTP 503".to_owned(),
            retry_after: Some(Duration::from_secs(7)),
            rate_limited: false,
        };
        assert!(busy.is_retryable());
        assert_eq!(busy.retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(busy.detail(), "HTTP 503");

        let rejected = Error::permanent("HTTP 400: bad");
        assert!(!rejected.is_retryable());
        assert_eq!(rejected.retry_after(), None);
        assert_eq!(rejected.to_string(), "HTTP 400: bad");
    }
}
