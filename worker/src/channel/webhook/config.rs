//! Settings of a `webhook` channel: `url`, `secret_env`, `timeout`.

use std::time::Duration;

use secrecy::SecretSlice;

use super::signature;
use crate::config::{Error, RawChannel, check_http_url};

/// A webhook channel's settings, with its secret already resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where deliveries are POSTed.
    pub url: reqwest::Url,
    /// Standard Webhooks signing key (decoded); `None` sends no `webhook-signature`.
    pub secret: Option<SecretSlice<u8>>,
    /// Budget of one attempt, from connecting to reading the answer.
    pub timeout: Duration,
}

impl Config {
    /// Timeout of one attempt when `timeout` is not set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Checks a `[[channel]]` of kind `webhook` found at `at` (e.g. `channel[1]`).
    pub(crate) fn from_raw(
        raw: &RawChannel,
        at: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        raw.reject_settings_except(at, "kind \"webhook\"", &["url", "secret_env", "timeout"])?;
        let Some(url) = &raw.url else {
            return Err(Error::field(
                format!("{at}.url"),
                "required for kind \"webhook\"",
            ));
        };
        let url = check_http_url(&format!("{at}.url"), url)?;
        let secret = match &raw.secret_env {
            Some(variable) => Some(resolve_secret(&format!("{at}.secret_env"), variable, env)?),
            None => None,
        };
        let timeout = match &raw.timeout {
            Some(text) => parse_timeout(&format!("{at}.timeout"), text)?,
            None => Self::DEFAULT_TIMEOUT,
        };
        Ok(Self {
            url,
            secret,
            timeout,
        })
    }
}

/// Reads the secret from the environment variable named in `secret_env` and decodes it.
/// Error messages name the variable, never its value.
fn resolve_secret(
    field: &str,
    variable: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SecretSlice<u8>, Error> {
    let value = env(variable).ok_or_else(|| {
        Error::field(
            field,
            format!("environment variable {variable:?} is not set"),
        )
    })?;
    match signature::decode_secret(&value) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(Error::field(
            field,
            format!("environment variable {variable:?} is empty"),
        )),
        Err(_) => Err(Error::field(
            field,
            format!(
                "environment variable {variable:?} is not a Standard Webhooks secret \
                 (expected base64, with or without \"whsec_\")"
            ),
        )),
    }
}

fn parse_timeout(field: &str, text: &str) -> Result<Duration, Error> {
    match humantime::parse_duration(text) {
        Ok(timeout) if !timeout.is_zero() => Ok(timeout),
        _ => Err(Error::field(
            field,
            format!("invalid duration {text:?} (expected e.g. 500ms, 10s, 1m)"),
        )),
    }
}
