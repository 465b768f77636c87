//! Connecting to the scheduler: the global connection flags, plaintext or TLS, a deadline
//! and the bearer token on every call, message limits, and one-line errors for failed calls.

use std::path::PathBuf;
use std::time::Duration;
use touchpoint_proto::security::root_cause;

use anyhow::anyhow;
use clap::Args;
use tonic::service::{Interceptor, interceptor::InterceptedService};
use tonic::transport::Channel;
use tonic::{Code, Request, Status, TimeoutExpired};
use touchpoint_proto::MAX_MESSAGE_BYTES;
use touchpoint_proto::security::{self, BearerToken, ClientTls};
use touchpoint_proto::v1::contact_service_client::ContactServiceClient;
use touchpoint_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
use touchpoint_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use touchpoint_proto::v1::event_service_client::EventServiceClient;
use touchpoint_proto::v1::playbook_service_client::PlaybookServiceClient;
use touchpoint_proto::v1::policy_service_client::PolicyServiceClient;
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
    #[arg(hide_env_values = true, value_parser = BearerToken::parse)]
    pub(crate) token: Option<BearerToken>,
    /// CA certificate (PEM) that signed an https:// scheduler's certificate
    /// (default: the system's CA certificates).
    #[arg(long, global = true, help_heading = GLOBAL, env = "TOUCHPOINT_CA")]
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate (PEM) for a scheduler that requires mutual TLS.
    #[arg(long, global = true, help_heading = GLOBAL, env = "TOUCHPOINT_TLS_CLIENT_CERT")]
    #[arg(requires = "tls_client_key")]
    pub(crate) tls_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-client-cert.
    #[arg(long, global = true, help_heading = GLOBAL, env = "TOUCHPOINT_TLS_CLIENT_KEY")]
    #[arg(requires = "tls_client_cert")]
    pub(crate) tls_client_key: Option<PathBuf>,
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
    authorization: Option<BearerToken>,
    timeout: Duration,
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.set_timeout(self.timeout);
        if let Some(token) = &self.authorization {
            token.apply(request.metadata_mut());
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
    /// TLS without a client certificate: a scheduler that requires one just hangs up.
    without_client_cert: bool,
}

impl Client {
    /// Connects to `args.server` (a bare `host:port` means `http://host:port`, or
    /// `https://host:port` when a TLS setting is given).
    pub(crate) async fn connect(args: &ServerArgs) -> anyhow::Result<Self> {
        let tls = ClientTls {
            ca: args.ca.clone(),
            cert: args.tls_client_cert.clone(),
            key: args.tls_client_key.clone(),
        };
        let server = if args.server.contains("://") {
            args.server.clone()
        } else if tls.is_set() {
            format!("https://{}", args.server)
        } else {
            format!("http://{}", args.server)
        };
        let endpoint = security::client_endpoint(&server, &tls)?.connect_timeout(args.timeout);
        let channel = endpoint.connect().await.map_err(|err| {
            let cause = root_cause(&err);
            anyhow!(
                "cannot reach the scheduler at {server}: {cause}{}",
                tls_hint(&cause)
            )
        })?;
        Ok(Self {
            without_client_cert: server.starts_with("https://") && tls.cert.is_none(),
            server,
            timeout: args.timeout,
            channel,
            metadata: CallMetadata {
                authorization: args.token.clone(),
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

    /// The contact service.
    pub(crate) fn contacts(&self) -> ContactServiceClient<Service> {
        ContactServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The event service.
    pub(crate) fn events(&self) -> EventServiceClient<Service> {
        EventServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The policy service.
    pub(crate) fn policies(&self) -> PolicyServiceClient<Service> {
        PolicyServiceClient::with_interceptor(self.channel.clone(), self.metadata.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The readable error for a failed call: the status message, or what went wrong
    /// on the way to the scheduler.
    pub(crate) fn error(&self, status: Status) -> anyhow::Error {
        let server = &self.server;
        // A failure on our side of the connection (a TLS alert, a protocol mismatch)
        // says what happened only in its source.
        let detailed;
        let message = match std::error::Error::source(&status).map(root_cause) {
            Some(cause) if !status.message().contains(&cause) => {
                // Under TLS 1.3 the server refuses a missing client certificate after the
                // client's handshake is done, so the client sees the connection go away in
                // one of several ways, depending on timing.
                let lower = cause.to_lowercase();
                let dropped = ["connection closed", "broken pipe", "connection reset"]
                    .iter()
                    .any(|way| lower.contains(way));
                let hint = if self.without_client_cert && dropped {
                    " (if the scheduler requires mutual TLS, set TOUCHPOINT_TLS_CLIENT_CERT \
                     and TOUCHPOINT_TLS_CLIENT_KEY)"
                } else {
                    tls_hint(&cause)
                };
                detailed = format!("{}: {cause}{hint}", status.message());
                detailed.as_str()
            }
            _ => status.message(),
        };
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

/// What to do about a TLS failure, from its cause; empty for anything else.
fn tls_hint(cause: &str) -> &'static str {
    if cause.contains("UnknownIssuer") || cause.contains("NotValidForName") {
        " (TOUCHPOINT_CA or --ca must be the CA that signed the scheduler's certificate, \
         for the name in the address)"
    } else if cause.contains("CertificateRequired") || cause.contains("BadCertificate") {
        " (the scheduler requires a client certificate signed by its client CA: \
         set TOUCHPOINT_TLS_CLIENT_CERT and TOUCHPOINT_TLS_CLIENT_KEY)"
    } else if cause.contains("InvalidContentType") {
        " (the scheduler does not serve TLS here: use an http:// address)"
    } else if cause.contains("http2 error") || cause.contains("frame with invalid size") {
        " (if the scheduler serves TLS, use an https:// address and TOUCHPOINT_CA)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        Client {
            server: "http://127.0.0.1:1".into(),
            timeout: Duration::from_secs(30),
            channel,
            metadata: CallMetadata {
                authorization: None,
                timeout: Duration::from_secs(30),
            },
            without_client_cert: false,
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
            ca: None,
            tls_client_cert: None,
            tls_client_key: None,
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
            authorization: Some(BearerToken::parse("s3cret")?),
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
