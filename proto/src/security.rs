//! Reaching a scheduler safely, shared by `tp`, the worker, the scheduler and the tests:
//! PEM files checked with readable errors, client endpoints over plaintext or TLS
//! (optionally with a client certificate), and the bearer token sent on every call.
//!
//! TLS is rustls with the aws-lc-rs provider only; every `main` calls
//! [`install_crypto_provider`] once before anything opens a connection.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Environment variable of the CA a client trusts (`--ca`).
pub const CA_ENV: &str = "TOUCHPOINT_CA";
/// Environment variable of a client's certificate for mutual TLS (`--tls-client-cert`).
pub const CLIENT_CERT_ENV: &str = "TOUCHPOINT_TLS_CLIENT_CERT";
/// Environment variable of a client's private key for mutual TLS (`--tls-client-key`).
pub const CLIENT_KEY_ENV: &str = "TOUCHPOINT_TLS_CLIENT_KEY";
/// Environment variable of the bearer token of `tp` and the worker (`--token`).
pub const TOKEN_ENV: &str = "TOUCHPOINT_TOKEN";

/// A security setting that cannot be used, saying which one and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl ConfigError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Makes aws-lc-rs the process's rustls provider. Call it once at the start of every
/// `main` (and of tests that open TLS connections); calling it again does nothing.
pub fn install_crypto_provider() {
    // An error only says that a provider is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Reads a PEM file of one or more certificates; `setting` (e.g. `TOUCHPOINT_CA`) names
/// it in errors.
pub fn read_certificate(path: &Path, setting: &str) -> Result<Certificate, ConfigError> {
    let pem = read(path, setting)?;
    let mut found = false;
    for item in CertificateDer::pem_slice_iter(&pem) {
        item.map_err(|e| {
            ConfigError::new(format!(
                "{setting} {}: not a PEM certificate: {e}",
                path.display()
            ))
        })?;
        found = true;
    }
    if !found {
        return Err(ConfigError::new(format!(
            "{setting} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file",
            path.display()
        )));
    }
    Ok(Certificate::from_pem(pem))
}

/// Reads a certificate and its private key (both PEM) as an identity; `cert_setting`
/// and `key_setting` name them in errors.
pub fn read_identity(
    cert: &Path,
    key: &Path,
    cert_setting: &str,
    key_setting: &str,
) -> Result<Identity, ConfigError> {
    let cert_pem = read_certificate(cert, cert_setting)?;
    let key_pem = read(key, key_setting)?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        // Never the key's bytes: only where it is and what kind of problem.
        ConfigError::new(format!(
            "{key_setting} {}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {}",
            key.display(),
            describe_pem_error(&e)
        ))
    })?;
    Ok(Identity::from_pem(cert_pem.into_inner(), key_pem))
}

fn read(path: &Path, setting: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::new(format!("{setting} {}: cannot read: {e}", path.display())))
}

/// A PEM parse error without the file's contents (which may be a private key).
fn describe_pem_error(error: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error;
    match error {
        Error::NoItemsFound => "none found",
        Error::MissingSectionEnd { .. } => "a section has no END line",
        Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        Error::Base64Decode(_) => "bad base64",
        Error::Io(_) => "cannot read",
        _ => "malformed PEM",
    }
}

/// How a client checks the scheduler and, for mutual TLS, proves who it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM of the CA that signed the scheduler's certificate ([`CA_ENV`]); `None` trusts
    /// the system's CA certificates.
    pub ca: Option<PathBuf>,
    /// PEM certificate presented to a scheduler that requires one ([`CLIENT_CERT_ENV`]).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` ([`CLIENT_KEY_ENV`]).
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// Whether any TLS setting is given (so the server must be `https://`).
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// The rustls configuration: the CA (or the system's roots) and the client identity.
    fn config(&self) -> Result<ClientTlsConfig, ConfigError> {
        let config = ClientTlsConfig::new();
        let config = match &self.ca {
            Some(ca) => config.ca_certificate(read_certificate(ca, CA_ENV)?),
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                Ok(config.identity(read_identity(cert, key, CLIENT_CERT_ENV, CLIENT_KEY_ENV)?))
            }
            (None, None) => Ok(config),
            (Some(_), None) | (None, Some(_)) => Err(ConfigError::new(format!(
                "{CLIENT_CERT_ENV} and {CLIENT_KEY_ENV} go together: set both or neither"
            ))),
        }
    }
}

/// The endpoint of `server` (`http://host:port` or `https://host:port`): plaintext, or
/// TLS checked against `tls.ca` (the system's roots without one) with the client
/// certificate when given. TLS settings with an `http://` server are an error, so a
/// token is never sent in clear by mistake.
pub fn client_endpoint(server: &str, tls: &ClientTls) -> Result<Endpoint, ConfigError> {
    let endpoint = Endpoint::from_shared(server.to_owned()).map_err(|e| {
        ConfigError::new(format!(
            "invalid server address {server:?}: {e} (expected http://host:port or https://host:port)"
        ))
    })?;
    match endpoint.uri().scheme_str() {
        Some("https") => endpoint.tls_config(tls.config()?).map_err(|e| {
            ConfigError::new(format!("cannot set up TLS to {server}: {}", root_cause(&e)))
        }),
        Some("http") if tls.is_set() => Err(ConfigError::new(format!(
            "{server} is plaintext but a TLS setting ({CA_ENV}, {CLIENT_CERT_ENV} or \
             {CLIENT_KEY_ENV}) is given: use an https:// address"
        ))),
        Some("http") => Ok(endpoint),
        _ => Err(ConfigError::new(format!(
            "invalid server address {server:?}: expected http://host:port or https://host:port"
        ))),
    }
}

/// The innermost error of a chain ("Connection refused (os error 111)"), which says more
/// than an outer "transport error".
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = error;
    while let Some(source) = inner.source() {
        inner = source;
    }
    inner.to_string()
}

/// A bearer token, sent as `authorization: Bearer <token>`. Its `Debug` never shows it,
/// and the header is marked sensitive so HTTP/2 never indexes it.
#[derive(Clone)]
pub struct BearerToken(AsciiMetadataValue);

impl BearerToken {
    /// Checks that `token` can travel in a header (visible ASCII, no spaces).
    pub fn parse(token: &str) -> Result<Self, ConfigError> {
        if token.is_empty() {
            return Err(ConfigError::new("the token is empty"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                "the token must be visible ASCII without spaces",
            ));
        }
        let mut value = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| ConfigError::new("the token is not a valid header value"))?;
        value.set_sensitive(true);
        Ok(Self(value))
    }

    /// Adds the `authorization` header to `metadata`.
    pub fn apply(&self, metadata: &mut MetadataMap) {
        metadata.insert("authorization", self.0.clone());
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken([redacted])")
    }
}

impl std::str::FromStr for BearerToken {
    type Err = ConfigError;

    fn from_str(token: &str) -> Result<Self, Self::Err> {
        Self::parse(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_becomes_a_sensitive_bearer_header_that_debug_hides() -> Result<(), ConfigError> {
        let token = BearerToken::parse("s3cret-token")?;
        let mut metadata = MetadataMap::new();
        token.apply(&mut metadata);
        let value = metadata.get("authorization");
        assert_eq!(
            value.and_then(|v| v.to_str().ok()),
            Some("Bearer s3cret-token")
        );
        assert!(value.is_some_and(AsciiMetadataValue::is_sensitive));
        assert!(!format!("{token:?}").contains("s3cret"));
        Ok(())
    }

    #[test]
    fn tokens_that_cannot_travel_in_a_header_are_refused() {
        for bad in ["", "two words", "line\nbreak", "naïve"] {
            assert!(BearerToken::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tls_settings_with_a_plaintext_server_are_an_error() {
        let tls = ClientTls {
            ca: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..ClientTls::default()
        };
        let err = client_endpoint("http://127.0.0.1:50051", &tls)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("use an https:// address"), "{err}");
        assert!(client_endpoint("http://127.0.0.1:50051", &ClientTls::default()).is_ok());
        assert!(client_endpoint("ftp://127.0.0.1:50051", &ClientTls::default()).is_err());
    }

    #[test]
    fn missing_and_malformed_pem_files_name_the_setting_and_the_path() -> std::io::Result<()> {
        install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("tp-security-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not pem at all\n")?;
        let https = "https://127.0.0.1:50051";

        let missing = ClientTls {
            ca: Some(dir.join("missing.pem")),
            ..ClientTls::default()
        };
        let err = client_endpoint(https, &missing)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("TOUCHPOINT_CA ") && err.contains("missing.pem: cannot read"),
            "{err}"
        );

        let junk_ca = ClientTls {
            ca: Some(junk.clone()),
            ..ClientTls::default()
        };
        let err = client_endpoint(https, &junk_ca)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("no PEM certificate"), "{err}");

        let half = ClientTls {
            cert: Some(junk),
            ..ClientTls::default()
        };
        let err = client_endpoint(https, &half)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("set both or neither"), "{err}");
        std::fs::remove_dir_all(&dir)
    }
}
