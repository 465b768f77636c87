//! `worker.toml`: read, checked field by field, secrets resolved at load time.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use touchpoint_proto::MAX_HOLD_AHEAD;
use touchpoint_proto::security::{BearerToken, ClientTls};

use crate::channel::webhook;
use crate::channel::wecom;
use crate::channel::{grpc, sms, smtp};

/// The scheduler a worker attaches to when the file names none.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";
/// Deliveries in flight at once on each channel when the file does not say.
pub const DEFAULT_CONCURRENCY: u32 = 256;
/// Tasks handed out ahead of their due time a worker keeps waiting by default (a few
/// KiB each at most).
pub const DEFAULT_HOLD_AHEAD: u32 = 50_000;

/// A worker's configuration: the scheduler to attach to and the channels to serve.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// gRPC address of the scheduler, e.g. `http://127.0.0.1:50051`.
    pub server: String,
    /// Name shown in run timelines; `None` means `<hostname>-<pid>`.
    pub worker_id: Option<String>,
    /// The channels this worker serves, in file order.
    pub channels: Vec<ChannelConfig>,
    /// Bearer token sent to the scheduler (`--token`, `TOUCHPOINT_TOKEN`); never printed.
    pub token: Option<BearerToken>,
    /// How to check an `https://` scheduler and, for mutual TLS, the client certificate.
    pub tls: ClientTls,
    /// Most tasks handed out ahead of their due time (`--hand-out-ahead` on the
    /// scheduler) kept waiting at once (`hold_ahead`; 0 turns it off for this worker).
    pub hold_ahead: u32,
}

/// One `[[channel]]` table.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// The name playbooks use (`channel: crm`).
    pub name: String,
    /// The adapter behind the name, with its settings.
    pub kind: ChannelKind,
    /// Retry defaults for steps on this channel whose playbook does not set them;
    /// unset fields are left to the scheduler's defaults.
    pub retry: ChannelRetry,
    /// The provider's quota (`rate`, `burst`), announced to the schedulers, which hand
    /// out this channel's steps no faster, over every worker together.
    pub rate: Option<ChannelRate>,
    /// Most deliveries of this channel in flight at once: its own `concurrency`, or the
    /// file's top-level one (the default for every channel). Each channel has its own
    /// slots, so a provider that hangs holds only its channel's; the capacity announced
    /// to the scheduler is their sum.
    pub concurrency: u32,
}

/// `rate = "600/min"`, `burst = 20` on a `[[channel]]`: a token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelRate {
    /// Steps a second on average.
    pub per_second: f64,
    /// Steps at once (default: one second's worth, at least 1).
    pub burst: u32,
}

/// `retry = { max_attempts = 5, initial = "1s", max = "5m" }` on a `[[channel]]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelRetry {
    /// Attempts in all, the first included (1 to 100).
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt; it doubles after each failure.
    pub initial: Option<Duration>,
    /// Longest delay between attempts.
    pub max: Option<Duration>,
}

/// The adapter behind a channel, with its settings.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ChannelKind {
    /// Prints each delivery on stdout.
    Log,
    /// POSTs each delivery to a URL, signed with Standard Webhooks.
    Webhook(webhook::Config),
    /// Sends a text message through Aliyun SMS or a generic HTTP SMS gateway.
    Sms(sms::Config),
    /// Sends an e-mail over SMTP.
    Smtp(smtp::Config),
    /// Hands each delivery to an external adapter process over gRPC.
    Grpc(grpc::Config),
    /// WeCom customer contact: welcome messages, send tasks, contact ways, group
    /// invites and tags, plus the encrypted callback endpoint.
    Wecom(wecom::Config),
}

/// What is wrong with a configuration, naming the field and what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("cannot read the file: {0}")]
    Read(std::io::Error),
    /// The text is not TOML.
    #[error("line {line}: {message}")]
    Syntax {
        /// 1-based line of the problem.
        line: usize,
        /// What the TOML parser expected.
        message: String,
    },
    /// A field is missing, unknown, or holds a bad value.
    #[error("{field}: {problem}")]
    Field {
        /// Path of the field, e.g. `channel[1].url`.
        field: String,
        /// What is wrong and what was expected.
        problem: String,
    },
}

impl Error {
    pub(crate) fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Field {
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn from_toml(text: &str, error: &toml::de::Error) -> Self {
        let offset = error.span().map_or(0, |span| span.start);
        let line = text
            .get(..offset)
            .map_or(1, |before| before.lines().count().max(1));
        Self::Syntax {
            line,
            message: error.message().trim_end().to_owned(),
        }
    }
}

impl WorkerConfig {
    /// Parses `worker.toml` text. `env` looks up environment variables (for `secret_env`),
    /// so tests pass a map instead of touching the process environment.
    pub fn from_toml(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let document =
            toml::Deserializer::parse(text).map_err(|error| Error::from_toml(text, &error))?;
        let raw: RawConfig = serde_path_to_error::deserialize(document).map_err(|error| {
            let field = error.path().to_string();
            let error = error.into_inner();
            if field == "." {
                Error::from_toml(text, &error)
            } else {
                Error::field(field, error.message().trim_end())
            }
        })?;
        raw.validate(&env)
    }

    /// Reads and parses a `worker.toml` file, resolving secrets from the process environment.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(Error::Read)?;
        Self::from_toml(&text, |name| std::env::var(name).ok())
    }

    /// A worker serving each named channel with the `log` adapter (used by `tp dev`).
    pub fn console(server: &str, channel_names: &[&str]) -> Self {
        Self {
            server: server.to_owned(),
            worker_id: None,
            channels: channel_names
                .iter()
                .map(|name| ChannelConfig {
                    name: (*name).to_owned(),
                    kind: ChannelKind::Log,
                    retry: ChannelRetry::default(),
                    rate: None,
                    concurrency: DEFAULT_CONCURRENCY,
                })
                .collect(),
            token: None,
            tls: ClientTls::default(),
            hold_ahead: DEFAULT_HOLD_AHEAD,
        }
    }

    /// The configured worker id, or `<hostname>-<pid>` (`worker-<pid>` without a hostname).
    pub fn resolved_worker_id(&self) -> String {
        if let Some(id) = &self.worker_id {
            return id.clone();
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let host = if host.is_empty() { "worker" } else { &host };
        format!("{host}-{}", std::process::id())
    }
}

/// The file as written; [`RawConfig::validate`] turns it into a [`WorkerConfig`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: Option<String>,
    concurrency: Option<u32>,
    worker_id: Option<String>,
    hold_ahead: Option<u32>,
    #[serde(default)]
    channel: Vec<RawChannel>,
}

/// One `[[channel]]` as written: every kind's settings, checked against the kind later.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawChannel {
    name: Option<String>,
    kind: Option<String>,
    pub(crate) url: Option<String>,
    pub(crate) secret_env: Option<String>,
    pub(crate) timeout: Option<String>,
    retry: Option<RawRetry>,
    // any kind: deliveries in flight at once (default: the worker's `concurrency`)
    concurrency: Option<u32>,
    // any kind: the provider's quota
    rate: Option<String>,
    burst: Option<u32>,
    // kind = "sms" (`url` and `timeout` above too)
    pub(crate) provider: Option<String>,
    pub(crate) access_key_id: Option<String>,
    pub(crate) access_key_secret_env: Option<String>,
    pub(crate) sign_name: Option<String>,
    pub(crate) template_code: Option<String>,
    pub(crate) format: Option<String>,
    pub(crate) fields: Option<std::collections::BTreeMap<String, String>>,
    pub(crate) token_env: Option<String>,
    // kind = "smtp" (`timeout` too)
    pub(crate) host: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) username: Option<String>,
    pub(crate) password_env: Option<String>,
    pub(crate) from: Option<String>,
    pub(crate) tls: Option<String>,
    pub(crate) ca_file: Option<String>,
    // kind = "grpc" (`timeout` too)
    pub(crate) endpoint: Option<String>,
    // kind = "wecom" (`secret_env`, `timeout` and `token_env` too)
    pub(crate) corp_id: Option<String>,
    pub(crate) base_url: Option<String>,
    pub(crate) confirm_poll: Option<String>,
    pub(crate) confirm_timeout: Option<String>,
    pub(crate) rate_limit_retry_after: Option<String>,
    pub(crate) sender: Option<String>,
    pub(crate) fallback_channel: Option<String>,
    pub(crate) callback_listen: Option<String>,
    pub(crate) callback_path: Option<String>,
    pub(crate) encoding_aes_key_env: Option<String>,
}

/// A channel's `retry` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    initial: Option<String>,
    max: Option<String>,
}

impl RawRetry {
    fn validate(&self, at: &str) -> Result<ChannelRetry, Error> {
        if let Some(n) = self.max_attempts
            && !(1..=100).contains(&n)
        {
            return Err(Error::field(
                format!("{at}.retry.max_attempts"),
                format!("expected 1 to 100, got {n}"),
            ));
        }
        let duration = |field: &str, text: &Option<String>| -> Result<Option<Duration>, Error> {
            text.as_deref()
                .map(|text| {
                    humantime::parse_duration(text).map_err(|_| {
                        Error::field(
                            format!("{at}.retry.{field}"),
                            format!("invalid duration {text:?} (expected e.g. 500ms, 1s, 5m)"),
                        )
                    })
                })
                .transpose()
        };
        Ok(ChannelRetry {
            max_attempts: self.max_attempts,
            initial: duration("initial", &self.initial)?,
            max: duration("max", &self.max)?,
        })
    }
}

impl RawConfig {
    fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<WorkerConfig, Error> {
        let server = self.server.unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        check_http_url("server", &server)?;
        let concurrency = self.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
        if concurrency == 0 {
            return Err(Error::field("concurrency", "expected at least 1, got 0"));
        }
        if self
            .worker_id
            .as_deref()
            .is_some_and(|id| id.trim().is_empty())
        {
            return Err(Error::field(
                "worker_id",
                "expected a name, got an empty string",
            ));
        }
        if self.channel.is_empty() {
            return Err(Error::field(
                "channel",
                "expected at least one [[channel]] table",
            ));
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut channels = Vec::with_capacity(self.channel.len());
        for (index, raw) in self.channel.into_iter().enumerate() {
            let at = format!("channel[{index}]");
            let channel = raw.validate(&at, concurrency, env)?;
            if let Some(first) = seen.insert(channel.name.clone(), index) {
                return Err(Error::field(
                    format!("{at}.name"),
                    format!(
                        "duplicate channel name {:?} (also channel[{first}])",
                        channel.name
                    ),
                ));
            }
            channels.push(channel);
        }
        let hold_ahead = self.hold_ahead.unwrap_or(DEFAULT_HOLD_AHEAD);
        if hold_ahead > MAX_HOLD_AHEAD {
            return Err(Error::field(
                "hold_ahead",
                format!("expected at most {MAX_HOLD_AHEAD}, got {hold_ahead}"),
            ));
        }
        Ok(WorkerConfig {
            server,
            worker_id: self.worker_id,
            channels,
            token: None,
            tls: ClientTls::default(),
            hold_ahead,
        })
    }
}

impl RawChannel {
    fn validate(
        self,
        at: &str,
        default_concurrency: u32,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ChannelConfig, Error> {
        let name = match self.name.as_deref().map(str::trim) {
            None => return Err(Error::field(format!("{at}.name"), "required")),
            Some("") => {
                return Err(Error::field(
                    format!("{at}.name"),
                    "expected a name, got an empty string",
                ));
            }
            Some(name) => name.to_owned(),
        };
        let kind = match self.kind.as_deref() {
            None => {
                return Err(Error::field(
                    format!("{at}.kind"),
                    "required (supported: log, webhook, sms, smtp, grpc, wecom)",
                ));
            }
            Some("log") => {
                self.reject_settings_except(at, "kind \"log\"", &[])?;
                ChannelKind::Log
            }
            Some("webhook") => ChannelKind::Webhook(webhook::Config::from_raw(&self, at, env)?),
            Some("sms") => ChannelKind::Sms(sms::Config::from_raw(&self, at, env)?),
            Some("smtp") => ChannelKind::Smtp(smtp::Config::from_raw(&self, at, env)?),
            Some("grpc") => ChannelKind::Grpc(grpc::Config::from_raw(&self, at, env)?),
            Some("wecom") => ChannelKind::Wecom(wecom::Config::from_raw(&self, at, env)?),
            Some(other) => {
                return Err(Error::field(
                    format!("{at}.kind"),
                    format!(
                        "unsupported kind {other:?} (supported: log, webhook, sms, smtp, grpc, wecom)"
                    ),
                ));
            }
        };
        let retry = match &self.retry {
            Some(raw) => raw.validate(at)?,
            None => ChannelRetry::default(),
        };
        let rate = channel_rate(at, self.rate.as_deref(), self.burst)?;
        let concurrency = match self.concurrency {
            Some(0) => {
                return Err(Error::field(
                    format!("{at}.concurrency"),
                    "expected at least 1, got 0",
                ));
            }
            Some(n) => n,
            None => default_concurrency,
        };
        Ok(ChannelConfig {
            name,
            kind,
            retry,
            rate,
            concurrency,
        })
    }

    /// Every kind-specific setting, with whether it is set (`name`, `kind`, `retry`,
    /// `rate`, `burst` and `concurrency` apply to every kind and are not listed).
    fn kind_settings(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("url", self.url.is_some()),
            ("secret_env", self.secret_env.is_some()),
            ("timeout", self.timeout.is_some()),
            ("provider", self.provider.is_some()),
            ("access_key_id", self.access_key_id.is_some()),
            (
                "access_key_secret_env",
                self.access_key_secret_env.is_some(),
            ),
            ("sign_name", self.sign_name.is_some()),
            ("template_code", self.template_code.is_some()),
            ("format", self.format.is_some()),
            ("fields", self.fields.is_some()),
            ("token_env", self.token_env.is_some()),
            ("host", self.host.is_some()),
            ("port", self.port.is_some()),
            ("username", self.username.is_some()),
            ("password_env", self.password_env.is_some()),
            ("from", self.from.is_some()),
            ("tls", self.tls.is_some()),
            ("ca_file", self.ca_file.is_some()),
            ("endpoint", self.endpoint.is_some()),
            ("corp_id", self.corp_id.is_some()),
            ("base_url", self.base_url.is_some()),
            ("confirm_poll", self.confirm_poll.is_some()),
            ("confirm_timeout", self.confirm_timeout.is_some()),
            (
                "rate_limit_retry_after",
                self.rate_limit_retry_after.is_some(),
            ),
            ("sender", self.sender.is_some()),
            ("fallback_channel", self.fallback_channel.is_some()),
            ("callback_listen", self.callback_listen.is_some()),
            ("callback_path", self.callback_path.is_some()),
            ("encoding_aes_key_env", self.encoding_aes_key_env.is_some()),
        ]
    }

    /// Fails on the first kind-specific setting that is set but not among `takes`, the
    /// settings of `what` (e.g. `kind "grpc"`).
    pub(crate) fn reject_settings_except(
        &self,
        at: &str,
        what: &str,
        takes: &[&str],
    ) -> Result<(), Error> {
        let mut unused = self.kind_settings();
        unused.retain(|(name, _)| !takes.contains(name));
        reject_unused(at, what, &unused)
    }
}

/// A channel's `rate` (`<count>/<s|min|h>`) and `burst` (at least 1; default one
/// second's worth, at least 1). `burst` alone is refused.
fn channel_rate(
    at: &str,
    rate: Option<&str>,
    burst: Option<u32>,
) -> Result<Option<ChannelRate>, Error> {
    let Some(text) = rate else {
        return match burst {
            Some(_) => Err(Error::field(
                format!("{at}.burst"),
                "needs a rate (e.g. rate = \"600/min\")",
            )),
            None => Ok(None),
        };
    };
    let bad = || {
        Error::field(
            format!("{at}.rate"),
            format!("expected \"<count>/<s|min|h>\", got {text:?}"),
        )
    };
    let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let seconds = match unit.trim() {
        "s" => 1.0,
        "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(Error::field(
            format!("{at}.rate"),
            format!("expected at least 1, got {text:?}"),
        ));
    }
    let per_second = f64::from(count) / seconds;
    let burst = match burst {
        Some(0) => {
            return Err(Error::field(
                format!("{at}.burst"),
                "expected at least 1, got 0",
            ));
        }
        Some(burst) => burst,
        // One second's worth: at most `count` (a u32), so the cast cannot overflow.
        None => (per_second.floor() as u32).max(1),
    };
    Ok(Some(ChannelRate { per_second, burst }))
}

/// Checks that `value` is an absolute `http://` or `https://` URL.
pub(crate) fn check_http_url(field: &str, value: &str) -> Result<reqwest::Url, Error> {
    reqwest::Url::parse(value)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https"))
        .ok_or_else(|| {
            Error::field(
                field,
                format!("expected an http:// or https:// URL, got {value:?}"),
            )
        })
}

/// The value of the environment variable named by the setting `field` (e.g.
/// `channel[2].password_env`), as is. Error messages name the variable, never its value.
pub(crate) fn env_secret(
    field: &str,
    variable: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<secrecy::SecretString, Error> {
    match env(variable) {
        None => Err(Error::field(
            field,
            format!("environment variable {variable:?} is not set"),
        )),
        Some(value) if value.is_empty() => Err(Error::field(
            field,
            format!("environment variable {variable:?} is empty"),
        )),
        Some(value) => Ok(secrecy::SecretString::from(value)),
    }
}

/// A non-zero duration such as `10s`, or `default` when the setting is absent.
pub(crate) fn duration_or(
    field: &str,
    text: Option<&str>,
    default: Duration,
) -> Result<Duration, Error> {
    let Some(text) = text else {
        return Ok(default);
    };
    match humantime::parse_duration(text) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(Error::field(
            field,
            format!("invalid duration {text:?} (expected e.g. 500ms, 10s, 1m)"),
        )),
    }
}

/// Fails on the first setting of `present` (name, is set) that `what` (e.g.
/// `kind "smtp"`) takes no part of.
pub(crate) fn reject_unused(at: &str, what: &str, present: &[(&str, bool)]) -> Result<(), Error> {
    match present.iter().find(|(_, set)| *set) {
        Some((setting, _)) => Err(Error::field(
            format!("{at}.{setting}"),
            format!("not allowed for {what}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
