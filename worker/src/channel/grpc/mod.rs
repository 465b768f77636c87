//! The `grpc` channel: each delivery handed to an external adapter process over the
//! `touchpoint.adapter.v1.ChannelAdapter` service (`proto/touchpoint/adapter/v1/adapter.proto`).
//!
//! The worker connects lazily and asks `Describe` at startup; an adapter that is not up
//! yet only gets a warning, and its deliveries fail as retryable until it answers. A step
//! whose action is not in `Describe`'s list fails for good. Each `Deliver` call's gRPC
//! deadline is the channel's `timeout`, shortened to the delivery's own deadline, and the
//! run's `traceparent` goes in the call's metadata as well as in the request.
//!
//! Outcomes map one to one (`OUTCOME_OK` → delivered, `OUTCOME_RETRYABLE` → retried after
//! `retry_after_ms`, rate limited when `rate_limited`, `OUTCOME_PERMANENT` → failed,
//! `OUTCOME_SKIPPED` → skipped). Call errors: `UNAVAILABLE`, `DEADLINE_EXCEEDED`,
//! `ABORTED`, `INTERNAL`, `UNKNOWN`, `CANCELLED` are retried, `RESOURCE_EXHAUSTED` is
//! retried as rate limited, every other code fails the step.

mod config;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tokio::sync::{OnceCell, RwLock};
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use touchpoint_proto::adapter::v1 as wire;
use touchpoint_proto::adapter::v1::channel_adapter_client::ChannelAdapterClient;

pub use config::Config;

use crate::channel::{ChannelAdapter, Delivered, Delivery, Error};

/// Longest wait for a connection, within the call's own deadline.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An action missing from a `Describe` answer older than this asks `Describe` again
/// (the adapter may have been upgraded).
const DESCRIBE_REFRESH: Duration = Duration::from_secs(30);
/// Characters of an adapter's error message kept in a step's detail.
const DETAIL_CHARS: usize = 200;

/// Delivers through an external adapter process.
#[derive(Debug, Clone)]
pub struct GrpcAdapter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The worker channel's name, for logs.
    channel: String,
    endpoint: Endpoint,
    timeout: Duration,
    connection: OnceCell<Channel>,
    described: RwLock<Option<Arc<Described>>>,
}

/// A `Describe` answer and when it came.
#[derive(Debug)]
struct Described {
    name: String,
    version: String,
    actions: BTreeSet<String>,
    at: Instant,
}

impl GrpcAdapter {
    /// An adapter for the worker channel `channel`. Connects on first use; when called
    /// inside a tokio runtime, asks `Describe` right away in the background.
    pub fn new(channel: &str, config: Config) -> Result<Self, tonic::transport::Error> {
        let mut endpoint = Endpoint::from_shared(config.endpoint.clone())?
            .connect_timeout(CONNECT_TIMEOUT.min(config.timeout))
            .timeout(config.timeout);
        if config.endpoint.starts_with("https://") {
            endpoint = endpoint.tls_config(ClientTlsConfig::new().with_native_roots())?;
        }
        let adapter = Self {
            inner: Arc::new(Inner {
                channel: channel.to_owned(),
                endpoint,
                timeout: config.timeout,
                connection: OnceCell::new(),
                described: RwLock::new(None),
            }),
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let inner = Arc::clone(&adapter.inner);
            runtime.spawn(async move {
                match inner.describe(inner.timeout).await {
                    Ok(described) => tracing::info!(
                        channel = %inner.channel,
                        adapter = %described.name,
                        version = %described.version,
                        actions = ?described.actions,
                        "external adapter ready"
                    ),
                    Err(status) => tracing::warn!(
                        channel = %inner.channel,
                        endpoint = %inner.endpoint.uri(),
                        code = ?status.code(),
                        error = %status.message(),
                        "external adapter not reachable yet; its deliveries fail as retryable until it answers"
                    ),
                }
            });
        }
        Ok(adapter)
    }
}

impl Inner {
    async fn client(&self) -> ChannelAdapterClient<Channel> {
        let connection = self
            .connection
            .get_or_init(|| async { self.endpoint.connect_lazy() })
            .await
            .clone();
        ChannelAdapterClient::new(connection)
            .max_decoding_message_size(touchpoint_proto::MAX_MESSAGE_BYTES)
    }

    /// Asks `Describe` and keeps the answer.
    async fn describe(&self, budget: Duration) -> Result<Arc<Described>, tonic::Status> {
        let mut request = tonic::Request::new(wire::DescribeRequest {});
        request.set_timeout(budget);
        let answer = self.client().await.describe(request).await?.into_inner();
        let described = Arc::new(Described {
            name: if answer.name.is_empty() {
                self.channel.clone()
            } else {
                answer.name
            },
            version: answer.version,
            actions: answer.actions.into_iter().collect(),
            at: Instant::now(),
        });
        *self.described.write().await = Some(Arc::clone(&described));
        Ok(described)
    }

    /// The adapter's description, asked again when there is none or when `action` is
    /// missing from an old one.
    async fn description_for(
        &self,
        action: &str,
        budget: Duration,
    ) -> Result<Arc<Described>, tonic::Status> {
        let cached = self.described.read().await.clone();
        match cached {
            Some(described)
                if described.actions.contains(action)
                    || described.at.elapsed() < DESCRIBE_REFRESH =>
            {
                Ok(described)
            }
            _ => self.describe(budget).await,
        }
    }
}

#[async_trait]
impl ChannelAdapter for GrpcAdapter {
    async fn deliver(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        let inner = &self.inner;
        let describe_budget = budget(inner.timeout, delivery.deadline)
            .ok_or_else(|| Error::retryable("deadline passed before the adapter was called"))?;
        let described = inner
            .description_for(&delivery.action, describe_budget)
            .await
            .map_err(|status| {
                Error::retryable(format!(
                    "adapter unreachable ({}): {}",
                    code_name(status.code()),
                    excerpt(status.message())
                ))
            })?;
        if !described.actions.contains(&delivery.action) {
            return Err(Error::permanent(format!(
                "action {:?} not supported by adapter {:?}",
                delivery.action, described.name
            )));
        }
        // Describe may have used part of the budget.
        let call_budget = budget(inner.timeout, delivery.deadline)
            .ok_or_else(|| Error::retryable("deadline passed before the adapter was called"))?;
        let mut request = tonic::Request::new(deliver_request(delivery)?);
        request.set_timeout(call_budget);
        if !delivery.traceparent.is_empty()
            && let Ok(value) = delivery.traceparent.parse()
        {
            request.metadata_mut().insert("traceparent", value);
        }
        let answer = inner
            .client()
            .await
            .deliver(request)
            .await
            .map_err(|status| status_error(&status))?
            .into_inner();
        outcome(&described.name, answer)
    }
}

/// The time left for one call: the channel's timeout, cut to the delivery's deadline;
/// `None` when that deadline has passed.
fn budget(timeout: Duration, deadline: Option<SystemTime>) -> Option<Duration> {
    match deadline {
        None => Some(timeout),
        Some(deadline) => deadline
            .duration_since(SystemTime::now())
            .ok()
            .filter(|left| !left.is_zero())
            .map(|left| left.min(timeout)),
    }
}

fn deliver_request(delivery: &Delivery) -> Result<wire::DeliverRequest, Error> {
    let params_json = serde_json::to_string(&delivery.params)
        .map_err(|error| Error::permanent(format!("cannot encode params: {error}")))?;
    let contact = &delivery.contact;
    Ok(wire::DeliverRequest {
        run_id: delivery.run_id.clone(),
        playbook: delivery.playbook.clone(),
        version: delivery.version,
        step_id: delivery.step_id.clone(),
        action: delivery.action.clone(),
        channel: delivery.channel.clone(),
        attempt: delivery.attempt,
        message: delivery.message.clone(),
        params_json,
        contact: Some(wire::Contact {
            id: contact.id.clone(),
            attrs: contact.attrs.clone().into_iter().collect(),
            tags: contact.tags.clone(),
            tz: contact.tz.clone(),
            identities: contact.identities.clone().into_iter().collect(),
        }),
        idempotency_key: delivery.idempotency_key.clone(),
        traceparent: delivery.traceparent.clone(),
        deadline_ms: delivery
            .deadline
            .and_then(|deadline| deadline.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |ms| i64::try_from(ms.as_millis()).unwrap_or(i64::MAX)),
    })
}

/// An adapter's answer as the worker's outcome.
fn outcome(adapter: &str, answer: wire::DeliverResponse) -> Result<Delivered, Error> {
    let detail = excerpt(&answer.detail);
    let named = |fallback: &str| {
        if detail.is_empty() {
            format!("adapter {adapter:?}: {fallback}")
        } else {
            detail.clone()
        }
    };
    match wire::Outcome::try_from(answer.outcome) {
        Ok(wire::Outcome::Ok) => Ok(Delivered::new(named("delivered"))),
        Ok(wire::Outcome::Retryable) => Err(Error::Retryable {
            detail: named("retryable"),
            retry_after: (answer.retry_after_ms > 0)
                .then(|| Duration::from_millis(answer.retry_after_ms)),
            rate_limited: answer.rate_limited,
        }),
        Ok(wire::Outcome::Permanent) => Err(Error::permanent(named("permanent failure"))),
        Ok(wire::Outcome::Skipped) => Err(Error::skipped(named("skipped"))),
        Ok(wire::Outcome::Unspecified) | Err(_) => Err(Error::retryable(format!(
            "adapter {adapter:?} answered without an outcome ({})",
            answer.outcome
        ))),
    }
}

/// A failed call: worth retrying when the adapter (or the network) may recover.
fn status_error(status: &tonic::Status) -> Error {
    let detail = format!(
        "adapter call failed ({}): {}",
        code_name(status.code()),
        excerpt(status.message())
    );
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled => Error::retryable(detail),
        Code::ResourceExhausted => Error::rate_limited(detail, None),
        _ => Error::permanent(detail),
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// One line of at most [`DETAIL_CHARS`] characters.
fn excerpt(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(DETAIL_CHARS)
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::tests::delivery;

    #[test]
    fn maps_outcomes() {
        let answer = |outcome: wire::Outcome, detail: &str| wire::DeliverResponse {
            outcome: outcome as i32,
            detail: detail.to_owned(),
            retry_after_ms: 1500,
            rate_limited: true,
        };
        assert_eq!(
            outcome("py", answer(wire::Outcome::Ok, "sent 1")),
            Ok(Delivered::new("sent 1"))
        );
        let retry = outcome("py", answer(wire::Outcome::Retryable, "")).unwrap_err();
        assert_eq!(retry.detail(), "adapter \"py\": retryable");
        assert_eq!(retry.retry_after(), Some(Duration::from_millis(1500)));
        assert!(retry.is_rate_limited());
        assert_eq!(
            outcome("py", answer(wire::Outcome::Permanent, "no such user")),
            Err(Error::permanent("no such user"))
        );
        assert_eq!(
            outcome("py", answer(wire::Outcome::Skipped, "opted out")),
            Err(Error::skipped("opted out"))
        );
        assert!(
            outcome("py", answer(wire::Outcome::Unspecified, ""))
                .unwrap_err()
                .is_retryable()
        );
    }

    #[test]
    fn maps_call_errors() {
        assert!(status_error(&tonic::Status::unavailable("down")).is_retryable());
        assert!(status_error(&tonic::Status::deadline_exceeded("slow")).is_retryable());
        assert!(status_error(&tonic::Status::resource_exhausted("quota")).is_rate_limited());
        let bad = status_error(&tonic::Status::invalid_argument("bad params"));
        assert_eq!(
            bad,
            Error::permanent("adapter call failed (InvalidArgument): bad params")
        );
    }

    #[test]
    fn the_call_budget_never_passes_the_deadline() {
        let timeout = Duration::from_secs(10);
        assert_eq!(budget(timeout, None), Some(timeout));
        let soon = SystemTime::now() + Duration::from_secs(2);
        let left = budget(timeout, Some(soon)).unwrap();
        assert!(left <= Duration::from_secs(2) && left > Duration::from_secs(1));
        assert_eq!(
            budget(timeout, Some(SystemTime::now() - Duration::from_secs(1))),
            None
        );
    }

    #[test]
    fn carries_the_whole_delivery() {
        let mut delivery = delivery();
        delivery.deadline = Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123));
        let request = deliver_request(&delivery).unwrap();
        assert_eq!(request.idempotency_key, "run-1:coupon");
        assert_eq!(request.params_json, r#"{"coupon":"WELCOME10"}"#);
        assert_eq!(request.deadline_ms, 1_700_000_000_123);
        let contact = request.contact.unwrap();
        assert_eq!(contact.identities["phone"], "+8613800000000");
        assert_eq!(request.traceparent, delivery.traceparent);
    }

    #[tokio::test]
    async fn an_unreachable_adapter_fails_deliveries_as_retryable() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let adapter = GrpcAdapter::new(
            "ext",
            Config {
                endpoint: format!("http://127.0.0.1:{port}"),
                timeout: Duration::from_secs(2),
            },
        )
        .unwrap();
        let error = adapter.deliver(&delivery()).await.unwrap_err();
        assert!(error.is_retryable(), "{error:?}");
        assert!(
            error
                .detail()
                .starts_with("adapter unreachable (Unavailable)"),
            "{error:?}"
        );
    }
}
