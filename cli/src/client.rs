//! Connecting to the scheduler: the global connection flags, a deadline and the
//! bearer token on every call, message limits, and one-line errors for failed calls.

use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::{Interceptor, interceptor::InterceptedService};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status, TimeoutExpired};
use touchpoint_proto::MAX_MESSAGE_BYTES;
use touchpoint_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
use touchpoint_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use touchpoint_proto::v1::playbook_service_client::PlaybookServiceClient;
use touchpoint_proto::v1::run_service_client::RunServiceClient;

/// The scheduler's address when neither `--server` nor `TOUCHPOINT_SERVER` says otherwise.
pub(crate) const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// The help heading of the flags every command takes.
pub(crate) const GLOBAL: &str = "Global options";

/// Where the scheduler is and how to call it.
#[derive(Args, Debug, Clone)]
pub(crate) struct ServerArgs {
    /// The scheduler's gRPC address.
    #[arg(long, global = true, help_heading = GLOBAL, env = "TOUCHPOINT_SERVER")]
    #[arg(default_value = DEFAULT_SERVER)]
    pub(crate) server: String,
    /// Bearer token, when the scheduler requires one.
    #[arg(long, global = true, help_heading = GLOBAL, env = "TOUCHPOINT_TOKEN")]
    #[arg(hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Deadline of each call (e.g. 30s, 2m).
    #[arg(long, global = true, help_heading = GLOBAL, default_value = "30s")]
    #[arg(value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
}

/// A channel with [`CallMetadata`] added to every call.
pub(crate) type Service = InterceptedService<Channel, CallMetadata>;

/// Sets the deadline and the `authorization` header of every call.
#[derive(Debug, Clone)]
pub(crate) struct CallMetadata {
    authorization: Option<AsciiMetadataValue>,
    timeout: Duration,
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.set_timeout(self.timeout);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to one scheduler.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    server: String,
    timeout: Duration,
    channel: Channel,
    metadata: CallMetadata,
}

impl Client {
    /// Connects to `args.server` (a bare `host:port` means `http://host:port`).
    pub(crate) async fn connect(args: &ServerArgs) -> anyhow::Result<Self> {
        let server = if args.server.contains("://") {
            args.server.clone()
        } else {
            format!("http://{}", args.server)
        };
        let authorization = args
            .token
            .as_ref()
            .map(|token| MetadataValue::try_from(format!("Bearer {token}")))
            .transpose()
            .context("the token is not a valid header value")?;
        let endpoint = Endpoint::from_shared(server.clone())
            .with_context(|| format!("invalid server address {server:?}"))?
            .connect_timeout(args.timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| anyhow!("cannot reach the scheduler at {server}: {}", cause(&err)))?;
        Ok(Self {
            server,
            timeout: args.timeout,
            channel,
            metadata: CallMetadata {
                authorization,
                timeout: args.timeout,
            },
        })
    }

    /// The playbook service.
    pub(crate) fn playbooks(&self) -> PlaybookServiceClient<Service> {
        PlaybookServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The enrollment service.
    pub(crate) fn enrollment(&self) -> EnrollmentServiceClient<Service> {
        EnrollmentServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The run service.
    pub(crate) fn runs(&self) -> RunServiceClient<Service> {
        RunServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The dead-letter service.
    pub(crate) fn dead_letters(&self) -> DeadLetterServiceClient<Service> {
        DeadLetterServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The readable error for a failed call: the status message, or what went wrong
    /// on the way to the scheduler.
    pub(crate) fn error(&self, status: Status) -> anyhow::Error {
        let server = &self.server;
        let message = status.message();
        match status.code() {
            // Connecting already failed loudly; here the scheduler answered UNAVAILABLE itself
            // (e.g. its Redis is down) or the connection dropped mid-call.
            Code::Unavailable => anyhow!("the scheduler at {server} is unavailable: {message}"),
            Code::DeadlineExceeded => self.timed_out(),
            Code::Cancelled if message == TimeoutExpired(()).to_string() => self.timed_out(),
            Code::Unauthenticated => {
                anyhow!("{message} (pass a token with --token or TOUCHPOINT_TOKEN)")
            }
            code if message.is_empty() => anyhow!("{}", code.description()),
            _ => anyhow!("{message}"),
        }
    }

    fn timed_out(&self) -> anyhow::Error {
        anyhow!(
            "no answer from the scheduler at {} within {} (raise it with --timeout)",
            self.server,
            humantime::format_duration(self.timeout)
        )
    }
}

/// The innermost error of a chain ("Connection refused (os error 111)"), which
/// says more than tonic's outer "transport error".
fn cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = err;
    while let Some(source) = inner.source() {
        inner = source;
    }
    inner.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        Client {
            server: "http://127.0.0.1:1".into(),
            timeout: Duration::from_secs(30),
            channel,
            metadata: CallMetadata {
                authorization: None,
                timeout: Duration::from_secs(30),
            },
        }
    }

    #[tokio::test]
    async fn statuses_become_one_line_errors() {
        let client = client();
        let cases = [
            (
                Status::invalid_argument("steps[1].wait: invalid duration \"3x\""),
                "steps[1].wait: invalid duration \"3x\"",
            ),
            (
                Status::unavailable("Redis is unavailable: connection refused"),
                "the scheduler at http://127.0.0.1:1 is unavailable: Redis is unavailable: connection refused",
            ),
            (
                Status::deadline_exceeded("deadline"),
                "no answer from the scheduler at http://127.0.0.1:1 within 30s (raise it with --timeout)",
            ),
            (
                Status::cancelled("Timeout expired"),
                "no answer from the scheduler at http://127.0.0.1:1 within 30s (raise it with --timeout)",
            ),
            (Status::not_found(""), "Some requested entity was not found"),
        ];
        for (status, expected) in cases {
            assert_eq!(client.error(status).to_string(), expected);
        }
    }

    #[tokio::test]
    async fn unreachable_scheduler_names_the_address() {
        let args = ServerArgs {
            server: "127.0.0.1:1".into(),
            token: None,
            timeout: Duration::from_secs(5),
        };
        let err = Client::connect(&args)
            .await
            .err()
            .map(|err| err.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.starts_with("cannot reach the scheduler at http://127.0.0.1:1: "),
            "{err}"
        );
    }

    #[test]
    fn metadata_carries_deadline_and_token() -> anyhow::Result<()> {
        let mut metadata = CallMetadata {
            authorization: Some(MetadataValue::try_from("Bearer s3cret")?),
            timeout: Duration::from_secs(7),
        };
        let request = metadata.call(Request::new(()))?;
        let headers = request.metadata();
        assert_eq!(
            headers
                .get("authorization")
                .map(|v| v.to_str())
                .transpose()?,
            Some("Bearer s3cret")
        );
        assert_eq!(
            headers
                .get("grpc-timeout")
                .map(|v| v.to_str())
                .transpose()?,
            Some("7000000u")
        );
        Ok(())
    }
}
