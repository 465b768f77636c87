//! Settings of a `wecom` channel, checked field by field; secrets resolved at load time.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

use super::crypto::CallbackCipher;
use crate::config::{Error, RawChannel, check_http_url};

/// A WeCom channel's settings, with its secrets already resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// The corp id (`corpid` of `gettoken`, and the receive id of callbacks).
    pub corp_id: String,
    /// The customer-contact secret (`corpsecret`), from `secret_env`.
    pub secret: SecretString,
    /// API root, `https://qyapi.weixin.qq.com` unless `base_url` says otherwise.
    pub base_url: reqwest::Url,
    /// Budget of one HTTP call.
    pub timeout: Duration,
    /// First wait between two `get_groupmsg_send_result` polls; it doubles up to a minute.
    pub confirm_poll: Duration,
    /// How long a send task may wait for the member to send it before the step fails.
    pub confirm_timeout: Duration,
    /// What a rate-limit errcode (45009, 45033) asks the scheduler to wait.
    pub rate_limit_retry_after: Duration,
    /// The member (userid) who sends, when the step's params name none.
    pub sender: Option<String>,
    /// The channel `add_contact` delivers its link on, when the step's params name none.
    pub fallback_channel: Option<String>,
    /// The callback endpoint, when `callback_listen` is set.
    pub callback: Option<CallbackConfig>,
}

/// Where WeCom's encrypted callbacks come in, and how to check and open them.
#[derive(Debug, Clone)]
pub struct CallbackConfig {
    /// Address the HTTP endpoint listens on.
    pub listen: SocketAddr,
    /// Path of the endpoint (GET: URL verification, POST: events).
    pub path: String,
    /// The callback Token (from `token_env`).
    pub token: SecretString,
    /// The EncodingAESKey (from `encoding_aes_key_env`).
    pub cipher: CallbackCipher,
}

impl Config {
    /// The public API.
    pub const DEFAULT_BASE_URL: &str = "https://qyapi.weixin.qq.com";
    /// Budget of one HTTP call when `timeout` is not set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
    /// First poll interval when `confirm_poll` is not set.
    pub const DEFAULT_CONFIRM_POLL: Duration = Duration::from_secs(5);
    /// Confirmation limit when `confirm_timeout` is not set.
    pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30 * 60);
    /// WeCom lifts its frequency blocks after the period they count over (a minute at least).
    pub const DEFAULT_RATE_LIMIT_RETRY_AFTER: Duration = Duration::from_secs(60);
    /// Callback path when `callback_path` is not set.
    pub const DEFAULT_CALLBACK_PATH: &str = "/wecom/callback";

    /// Checks a `[[channel]]` of kind `wecom` found at `at` (e.g. `channel[2]`).
    pub(crate) fn from_raw(
        raw: &RawChannel,
        at: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        if raw.url.is_some() {
            return Err(Error::field(
                format!("{at}.url"),
                "not allowed for kind \"wecom\" (use base_url)",
            ));
        }
        raw.reject_settings_except(
            at,
            "kind \"wecom\"",
            &[
                "corp_id",
                "secret_env",
                "base_url",
                "timeout",
                "token_env",
                "confirm_poll",
                "confirm_timeout",
                "rate_limit_retry_after",
                "sender",
                "fallback_channel",
                "callback_listen",
                "callback_path",
                "encoding_aes_key_env",
            ],
        )?;
        let corp_id = required_text(at, "corp_id", raw.corp_id.as_deref())?;
        let Some(variable) = &raw.secret_env else {
            return Err(Error::field(
                format!("{at}.secret_env"),
                "required for kind \"wecom\" (the environment variable holding the corp secret)",
            ));
        };
        let secret = secret(&format!("{at}.secret_env"), variable, env)?;
        let base_url = check_http_url(
            &format!("{at}.base_url"),
            raw.base_url.as_deref().unwrap_or(Self::DEFAULT_BASE_URL),
        )?;
        let duration = |field: &str, text: Option<&String>, default: Duration| match text {
            Some(text) => parse_duration(&format!("{at}.{field}"), text),
            None => Ok(default),
        };
        let timeout = duration("timeout", raw.timeout.as_ref(), Self::DEFAULT_TIMEOUT)?;
        let confirm_poll = duration(
            "confirm_poll",
            raw.confirm_poll.as_ref(),
            Self::DEFAULT_CONFIRM_POLL,
        )?;
        let confirm_timeout = duration(
            "confirm_timeout",
            raw.confirm_timeout.as_ref(),
            Self::DEFAULT_CONFIRM_TIMEOUT,
        )?;
        if confirm_timeout < confirm_poll {
            return Err(Error::field(
                format!("{at}.confirm_timeout"),
                "expected at least confirm_poll",
            ));
        }
        let rate_limit_retry_after = duration(
            "rate_limit_retry_after",
            raw.rate_limit_retry_after.as_ref(),
            Self::DEFAULT_RATE_LIMIT_RETRY_AFTER,
        )?;
        let sender = optional_text(at, "sender", raw.sender.as_deref())?;
        let fallback_channel =
            optional_text(at, "fallback_channel", raw.fallback_channel.as_deref())?;
        let callback = CallbackConfig::from_raw(raw, at, env)?;
        Ok(Self {
            corp_id,
            secret,
            base_url,
            timeout,
            confirm_poll,
            confirm_timeout,
            rate_limit_retry_after,
            sender,
            fallback_channel,
            callback,
        })
    }
}

impl CallbackConfig {
    fn from_raw(
        raw: &RawChannel,
        at: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, Error> {
        let Some(listen) = &raw.callback_listen else {
            let stray = [
                ("callback_path", raw.callback_path.is_some()),
                ("token_env", raw.token_env.is_some()),
                ("encoding_aes_key_env", raw.encoding_aes_key_env.is_some()),
            ];
            return match stray.iter().find(|(_, present)| *present) {
                Some((field, _)) => Err(Error::field(
                    format!("{at}.{field}"),
                    "only allowed with callback_listen",
                )),
                None => Ok(None),
            };
        };
        let listen = listen.parse::<SocketAddr>().map_err(|_| {
            Error::field(
                format!("{at}.callback_listen"),
                format!("expected an address such as \"127.0.0.1:8090\", got {listen:?}"),
            )
        })?;
        let path = raw
            .callback_path
            .clone()
            .unwrap_or_else(|| Config::DEFAULT_CALLBACK_PATH.to_owned());
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c == '?') {
            return Err(Error::field(
                format!("{at}.callback_path"),
                format!("expected a path such as \"/wecom/callback\", got {path:?}"),
            ));
        }
        let Some(token_variable) = &raw.token_env else {
            return Err(Error::field(
                format!("{at}.token_env"),
                "required with callback_listen (the environment variable holding the callback Token)",
            ));
        };
        let token = secret(&format!("{at}.token_env"), token_variable, env)?;
        let Some(key_variable) = &raw.encoding_aes_key_env else {
            return Err(Error::field(
                format!("{at}.encoding_aes_key_env"),
                "required with callback_listen (the environment variable holding the EncodingAESKey)",
            ));
        };
        let field = format!("{at}.encoding_aes_key_env");
        let key = secret(&field, key_variable, env)?;
        let cipher =
            CallbackCipher::new(secrecy::ExposeSecret::expose_secret(&key)).map_err(|_| {
                Error::field(
                    field,
                    format!(
                        "environment variable {key_variable:?} is not an EncodingAESKey \
                     (expected 43 characters of base64)"
                    ),
                )
            })?;
        Ok(Some(Self {
            listen,
            path,
            token,
            cipher,
        }))
    }
}

fn required_text(at: &str, field: &str, value: Option<&str>) -> Result<String, Error> {
    optional_text(at, field, value)?
        .ok_or_else(|| Error::field(format!("{at}.{field}"), "required for kind \"wecom\""))
}

fn optional_text(at: &str, field: &str, value: Option<&str>) -> Result<Option<String>, Error> {
    match value.map(str::trim) {
        None => Ok(None),
        Some("") => Err(Error::field(
            format!("{at}.{field}"),
            "expected a value, got an empty string",
        )),
        Some(value) => Ok(Some(value.to_owned())),
    }
}

/// The value of the environment variable `variable`; errors name the variable only.
fn secret(
    field: &str,
    variable: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SecretString, Error> {
    match env(variable) {
        None => Err(Error::field(
            field,
            format!("environment variable {variable:?} is not set"),
        )),
        Some(value) if value.trim().is_empty() => Err(Error::field(
            field,
            format!("environment variable {variable:?} is empty"),
        )),
        Some(value) => Ok(SecretString::from(value.trim().to_owned())),
    }
}

fn parse_duration(field: &str, text: &str) -> Result<Duration, Error> {
    match humantime::parse_duration(text) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(Error::field(
            field,
            format!("invalid duration {text:?} (expected e.g. 500ms, 10s, 1m)"),
        )),
    }
}
