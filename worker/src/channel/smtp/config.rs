//! Settings of an `smtp` channel: `host`, `port`, `tls`, `username`, `password_env`,
//! `from`, `ca_file`, `timeout`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use lettre::message::Mailbox;
use secrecy::SecretString;

use crate::config::{Error, RawChannel, duration_or, env_secret};

/// An smtp channel's settings, with its password and CA already read.
#[derive(Debug, Clone)]
pub struct Config {
    /// The SMTP server's host name (checked against its certificate) or address.
    pub host: String,
    /// Its port: by default 587 for STARTTLS, 465 for implicit TLS, 25 without TLS.
    pub port: u16,
    /// How the connection is secured.
    pub tls: TlsMode,
    /// `username` and the password from `password_env`, when the server wants a login.
    pub credentials: Option<(String, SecretString)>,
    /// The `From` mailbox; its domain also names Message-IDs.
    pub from: Mailbox,
    /// A PEM CA certificate trusted besides the public roots (a test server's own CA).
    pub ca_pem: Option<Vec<u8>>,
    /// Budget of one attempt, from connecting to the server's last answer.
    pub timeout: Duration,
}

/// `tls = "starttls" | "implicit" | "none"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain connection upgraded with STARTTLS, which the server must offer.
    StartTls,
    /// TLS from the first byte (SMTPS).
    Implicit,
    /// No TLS: only for a server on a loopback address (tests).
    None,
}

impl Config {
    /// Timeout of one attempt when `timeout` is not set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    /// Checks a `[[channel]]` of kind `smtp` found at `at` (e.g. `channel[1]`).
    pub(crate) fn from_raw(
        raw: &RawChannel,
        at: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        raw.reject_settings_except(
            at,
            "kind \"smtp\"",
            &[
                "timeout",
                "host",
                "port",
                "username",
                "password_env",
                "from",
                "tls",
                "ca_file",
            ],
        )?;
        let host = match raw.host.as_deref().map(str::trim) {
            None => {
                return Err(Error::field(
                    format!("{at}.host"),
                    "required for kind \"smtp\"",
                ));
            }
            Some("") => {
                return Err(Error::field(
                    format!("{at}.host"),
                    "expected a host name, got an empty string",
                ));
            }
            Some(host) => host.to_owned(),
        };
        let tls = match raw.tls.as_deref() {
            None | Some("starttls") => TlsMode::StartTls,
            Some("implicit") => TlsMode::Implicit,
            Some("none") if is_loopback(&host) => TlsMode::None,
            Some("none") => {
                return Err(Error::field(
                    format!("{at}.tls"),
                    format!(
                        "\"none\" is only allowed for a loopback host (localhost, 127.0.0.1, ::1), \
                         got {host:?}"
                    ),
                ));
            }
            Some(other) => {
                return Err(Error::field(
                    format!("{at}.tls"),
                    format!("expected \"starttls\", \"implicit\" or \"none\", got {other:?}"),
                ));
            }
        };
        let port = match raw.port {
            Some(0) => {
                return Err(Error::field(
                    format!("{at}.port"),
                    "expected 1 to 65535, got 0",
                ));
            }
            Some(port) => port,
            None => match tls {
                TlsMode::StartTls => 587,
                TlsMode::Implicit => 465,
                TlsMode::None => 25,
            },
        };
        let credentials = match (&raw.username, &raw.password_env) {
            (None, None) => None,
            (Some(username), Some(variable)) => Some((
                username.clone(),
                env_secret(&format!("{at}.password_env"), variable, env)?,
            )),
            (Some(_), None) => {
                return Err(Error::field(
                    format!("{at}.password_env"),
                    "required when username is set",
                ));
            }
            (None, Some(_)) => {
                return Err(Error::field(
                    format!("{at}.username"),
                    "required when password_env is set",
                ));
            }
        };
        let from = match raw.from.as_deref() {
            None => {
                return Err(Error::field(
                    format!("{at}.from"),
                    "required for kind \"smtp\"",
                ));
            }
            Some(text) => text.parse::<Mailbox>().map_err(|_| {
                Error::field(
                    format!("{at}.from"),
                    format!(
                        "expected a mailbox such as \"Brand <news@example.com>\", got {text:?}"
                    ),
                )
            })?,
        };
        let ca_pem = match &raw.ca_file {
            None => None,
            Some(path) => {
                let field = format!("{at}.ca_file");
                let pem = std::fs::read(PathBuf::from(path))
                    .map_err(|e| Error::field(&field, format!("cannot read {path:?}: {e}")))?;
                lettre::transport::smtp::client::Certificate::from_pem(&pem).map_err(|_| {
                    Error::field(&field, format!("{path:?} is not a PEM certificate"))
                })?;
                Some(pem)
            }
        };
        if tls == TlsMode::None && ca_pem.is_some() {
            return Err(Error::field(
                format!("{at}.ca_file"),
                "not allowed with tls = \"none\"",
            ));
        }
        let timeout = duration_or(
            &format!("{at}.timeout"),
            raw.timeout.as_deref(),
            Self::DEFAULT_TIMEOUT,
        )?;
        Ok(Self {
            host,
            port,
            tls,
            credentials,
            from,
            ca_pem,
            timeout,
        })
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use crate::config::{ChannelKind, WorkerConfig};

    use super::*;

    fn parse(channel: &str) -> Result<Config, String> {
        let text = format!("[[channel]]\nname = \"mail\"\nkind = \"smtp\"\n{channel}");
        let config = WorkerConfig::from_toml(&text, |name| {
            (name == "SMTP_PASSWORD").then(|| "pw".to_owned())
        })
        .map_err(|e| e.to_string())?;
        match config.channels.into_iter().next().map(|c| c.kind) {
            Some(ChannelKind::Smtp(config)) => Ok(config),
            other => panic!("not an smtp channel: {other:?}"),
        }
    }

    #[test]
    fn reads_a_channel_with_defaults() {
        let config = parse(
            "host = \"smtp.example.com\"\nfrom = \"Brand <news@example.com>\"\n\
             username = \"news\"\npassword_env = \"SMTP_PASSWORD\"",
        )
        .unwrap();
        assert_eq!((config.port, config.tls), (587, TlsMode::StartTls));
        assert_eq!(config.from.email.domain(), "example.com");
        assert!(config.credentials.is_some());
        assert_eq!(config.timeout, Config::DEFAULT_TIMEOUT);
        let implicit = parse("host = \"h\"\nfrom = \"a@b.c\"\ntls = \"implicit\"").unwrap();
        assert_eq!(implicit.port, 465);
        let none =
            parse("host = \"127.0.0.1\"\nfrom = \"a@b.c\"\ntls = \"none\"\nport = 2525").unwrap();
        assert_eq!((none.port, none.tls), (2525, TlsMode::None));
    }

    #[test]
    fn errors_name_the_field_and_the_expectation() {
        let cases = [
            (
                "from = \"a@b.c\"",
                "channel[0].host: required for kind \"smtp\"",
            ),
            (
                "host = \"h\"",
                "channel[0].from: required for kind \"smtp\"",
            ),
            (
                "host = \"h\"\nfrom = \"not an address\"",
                "channel[0].from: expected a mailbox such as \"Brand <news@example.com>\", got \"not an address\"",
            ),
            (
                "host = \"smtp.example.com\"\nfrom = \"a@b.c\"\ntls = \"none\"",
                "channel[0].tls: \"none\" is only allowed for a loopback host (localhost, 127.0.0.1, ::1), got \"smtp.example.com\"",
            ),
            (
                "host = \"h\"\nfrom = \"a@b.c\"\ntls = \"ssl\"",
                "channel[0].tls: expected \"starttls\", \"implicit\" or \"none\", got \"ssl\"",
            ),
            (
                "host = \"h\"\nfrom = \"a@b.c\"\nusername = \"u\"",
                "channel[0].password_env: required when username is set",
            ),
            (
                "host = \"h\"\nfrom = \"a@b.c\"\nusername = \"u\"\npassword_env = \"MISSING\"",
                "channel[0].password_env: environment variable \"MISSING\" is not set",
            ),
            (
                "host = \"h\"\nfrom = \"a@b.c\"\nca_file = \"/nonexistent/ca.pem\"",
                "channel[0].ca_file: cannot read \"/nonexistent/ca.pem\": No such file or directory (os error 2)",
            ),
            (
                "host = \"h\"\nfrom = \"a@b.c\"\nurl = \"http://x/\"",
                "channel[0].url: not allowed for kind \"smtp\"",
            ),
        ];
        for (channel, expected) in cases {
            assert_eq!(parse(channel).unwrap_err(), expected, "for {channel:?}");
        }
    }
}
