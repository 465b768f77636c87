//! The scheduler's TLS: its certificate and key and, for mutual TLS, the CA that signs
//! client certificates. rustls with aws-lc-rs, through tonic.

use std::{path::PathBuf, time::Duration};

use tonic::transport::{Server, ServerTlsConfig};
use touchpoint_proto::security::{ConfigError, read_certificate, read_identity};

/// Environment variable of the scheduler's certificate (PEM, with its chain).
pub(crate) const CERT_ENV: &str = "TOUCHPOINT_TLS_CERT";
/// Environment variable of the scheduler's private key (PEM).
pub(crate) const KEY_ENV: &str = "TOUCHPOINT_TLS_KEY";
/// Environment variable of the CA that client certificates must be signed by.
pub(crate) const CLIENT_CA_ENV: &str = "TOUCHPOINT_TLS_CLIENT_CA";

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection may take to answer a keepalive ping.
const KEEPALIVE_TIMEOUT_MAX: Duration = Duration::from_secs(5);

/// The scheduler's TLS settings, as given.
#[derive(Debug, Clone, Default)]
pub(crate) struct ServerTls {
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// The tonic configuration, `None` for plaintext. Both or neither of the certificate
    /// and the key; a client CA only with them (then every client needs a certificate
    /// signed by it).
    pub(crate) fn config(&self) -> Result<Option<ServerTlsConfig>, ConfigError> {
        let (cert, key) = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) if self.client_ca.is_some() => {
                return Err(ConfigError::new(format!(
                    "{CLIENT_CA_ENV} (mutual TLS) needs {CERT_ENV} and {KEY_ENV} too"
                )));
            }
            (None, None) => return Ok(None),
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::new(format!(
                    "{CERT_ENV} and {KEY_ENV} go together: set both or neither"
                )));
            }
        };
        let config = ServerTlsConfig::new()
            .identity(read_identity(cert, key, CERT_ENV, KEY_ENV)?)
            .timeout(HANDSHAKE_TIMEOUT);
        Ok(Some(match &self.client_ca {
            Some(ca) => config.client_ca_root(read_certificate(ca, CLIENT_CA_ENV)?),
            None => config,
        }))
    }

    /// A server builder, serving TLS when configured, that pings every connection each
    /// `keepalive` (none when zero) and closes one that does not answer in time.
    pub(crate) fn server(&self, keepalive: Duration) -> Result<Server, ConfigError> {
        let keepalive = (!keepalive.is_zero()).then_some(keepalive);
        let server = Server::builder()
            .initial_connection_window_size(touchpoint_proto::CONNECTION_WINDOW_BYTES)
            .initial_stream_window_size(touchpoint_proto::STREAM_WINDOW_BYTES)
            .http2_keepalive_interval(keepalive)
            .http2_keepalive_timeout(keepalive.map(|every| every.min(KEEPALIVE_TIMEOUT_MAX)));
        let Some(config) = self.config()? else {
            return Ok(server);
        };
        server.tls_config(config).map_err(|e| {
            let mut cause: &dyn std::error::Error = &e;
            while let Some(source) = cause.source() {
                cause = source;
            }
            let cause = cause.to_string();
            if cause.contains("KeyMismatch") {
                ConfigError::new(format!("{KEY_ENV} is not the private key of {CERT_ENV}"))
            } else {
                ConfigError::new(cause)
            }
        })
    }

    /// How it is described at start.
    pub(crate) fn describe(&self) -> &'static str {
        match (&self.cert, &self.client_ca) {
            (None, _) => "plaintext",
            (Some(_), None) => "TLS",
            (Some(_), Some(_)) => "mutual TLS",
        }
    }
}
