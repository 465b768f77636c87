//! Settings of an `sms` channel: `provider = "aliyun"` (`url`, `access_key_id`,
//! `access_key_secret_env`, `sign_name`, `template_code`) or `provider = "generic"`
//! (`url`, `format`, `fields`, `token_env`); `timeout` for both.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::SecretString;

use crate::config::{Error, RawChannel, check_http_url, duration_or, env_secret, reject_unused};

/// Aliyun's SMS endpoint when `url` is not set.
pub(crate) const ALIYUN_DEFAULT_URL: &str = "https://dysmsapi.aliyuncs.com/";

/// The placeholders `fields` values may use, each `{name}`.
pub(crate) const PLACEHOLDERS: [&str; 8] = [
    "phone",
    "message",
    "idempotency_key",
    "run_id",
    "step_id",
    "playbook",
    "action",
    "contact_id",
];

/// An sms channel's settings, with its secrets already resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// Who sends the message.
    pub provider: Provider,
    /// Budget of one attempt, from connecting to reading the answer.
    pub timeout: Duration,
}

/// The SMS provider behind the channel.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Provider {
    /// Aliyun SMS `SendSms`.
    Aliyun(AliyunConfig),
    /// An HTTP gateway taking one POST per message.
    Generic(GenericConfig),
}

/// `provider = "aliyun"`.
#[derive(Debug, Clone)]
pub struct AliyunConfig {
    /// Base URL of the API (tests point it at a local server).
    pub url: reqwest::Url,
    /// `AccessKeyId`.
    pub access_key_id: String,
    /// `AccessKeySecret`, from `access_key_secret_env`.
    pub access_key_secret: SecretString,
    /// `SignName` unless a step's `params.sign_name` says otherwise.
    pub sign_name: String,
    /// `TemplateCode` unless a step's `params.template_code` says otherwise; when unset,
    /// every step must give one.
    pub template_code: Option<String>,
}

/// `provider = "generic"`.
#[derive(Debug, Clone)]
pub struct GenericConfig {
    /// Where each message is POSTed.
    pub url: reqwest::Url,
    /// How the fields are encoded.
    pub format: Format,
    /// Body field → value template with `{placeholder}`s (see [`PLACEHOLDERS`]).
    pub fields: BTreeMap<String, String>,
    /// Sent as `Authorization: Bearer ...`, from `token_env`.
    pub token: Option<SecretString>,
}

/// The body of a generic gateway's POST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`: one object of string fields.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
}

impl Config {
    /// Timeout of one attempt when `timeout` is not set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Checks a `[[channel]]` of kind `sms` found at `at` (e.g. `channel[1]`).
    pub(crate) fn from_raw(
        raw: &RawChannel,
        at: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        raw.reject_settings_except(
            at,
            "kind \"sms\"",
            &[
                "url",
                "timeout",
                "provider",
                "access_key_id",
                "access_key_secret_env",
                "sign_name",
                "template_code",
                "format",
                "fields",
                "token_env",
            ],
        )?;
        let timeout = duration_or(
            &format!("{at}.timeout"),
            raw.timeout.as_deref(),
            Self::DEFAULT_TIMEOUT,
        )?;
        let provider = match raw.provider.as_deref() {
            Some("aliyun") => Provider::Aliyun(aliyun(raw, at, env)?),
            Some("generic") => Provider::Generic(generic(raw, at, env)?),
            None => {
                return Err(Error::field(
                    format!("{at}.provider"),
                    "required for kind \"sms\" (supported: aliyun, generic)",
                ));
            }
            Some(other) => {
                return Err(Error::field(
                    format!("{at}.provider"),
                    format!("unsupported provider {other:?} (supported: aliyun, generic)"),
                ));
            }
        };
        Ok(Self { provider, timeout })
    }
}

fn required<'a>(value: &'a Option<String>, field: &str) -> Result<&'a str, Error> {
    match value.as_deref().map(str::trim) {
        None => Err(Error::field(field, "required")),
        Some("") => Err(Error::field(field, "expected a value, got an empty string")),
        Some(value) => Ok(value),
    }
}

fn aliyun(
    raw: &RawChannel,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<AliyunConfig, Error> {
    reject_unused(
        at,
        "provider \"aliyun\"",
        &[
            ("format", raw.format.is_some()),
            ("fields", raw.fields.is_some()),
            ("token_env", raw.token_env.is_some()),
        ],
    )?;
    let url = check_http_url(
        &format!("{at}.url"),
        raw.url.as_deref().unwrap_or(ALIYUN_DEFAULT_URL),
    )?;
    let access_key_id = required(&raw.access_key_id, &format!("{at}.access_key_id"))?.to_owned();
    let secret_field = format!("{at}.access_key_secret_env");
    let variable = required(&raw.access_key_secret_env, &secret_field)?;
    let access_key_secret = env_secret(&secret_field, variable, env)?;
    let sign_name = required(&raw.sign_name, &format!("{at}.sign_name"))?.to_owned();
    let template_code = match &raw.template_code {
        Some(_) => Some(required(&raw.template_code, &format!("{at}.template_code"))?.to_owned()),
        None => None,
    };
    Ok(AliyunConfig {
        url,
        access_key_id,
        access_key_secret,
        sign_name,
        template_code,
    })
}

fn generic(
    raw: &RawChannel,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<GenericConfig, Error> {
    reject_unused(
        at,
        "provider \"generic\"",
        &[
            ("access_key_id", raw.access_key_id.is_some()),
            ("access_key_secret_env", raw.access_key_secret_env.is_some()),
            ("sign_name", raw.sign_name.is_some()),
            ("template_code", raw.template_code.is_some()),
        ],
    )?;
    let Some(url) = &raw.url else {
        return Err(Error::field(
            format!("{at}.url"),
            "required for provider \"generic\"",
        ));
    };
    let url = check_http_url(&format!("{at}.url"), url)?;
    let format = match raw.format.as_deref() {
        None | Some("json") => Format::Json,
        Some("form") => Format::Form,
        Some(other) => {
            return Err(Error::field(
                format!("{at}.format"),
                format!("expected \"json\" or \"form\", got {other:?}"),
            ));
        }
    };
    let fields = match &raw.fields {
        Some(fields) if fields.is_empty() => {
            return Err(Error::field(
                format!("{at}.fields"),
                "expected at least one field",
            ));
        }
        Some(fields) => fields.clone(),
        None => BTreeMap::from([
            ("to".to_owned(), "{phone}".to_owned()),
            ("text".to_owned(), "{message}".to_owned()),
            ("ref".to_owned(), "{idempotency_key}".to_owned()),
        ]),
    };
    for (name, template) in &fields {
        check_template(&format!("{at}.fields.{name}"), template)?;
    }
    let token = match &raw.token_env {
        Some(variable) => Some(env_secret(&format!("{at}.token_env"), variable, env)?),
        None => None,
    };
    Ok(GenericConfig {
        url,
        format,
        fields,
        token,
    })
}

/// Checks that every `{...}` in `template` names a known placeholder.
fn check_template(field: &str, template: &str) -> Result<(), Error> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(Error::field(field, "unclosed \"{\" (expected {name})"));
        };
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(Error::field(
                field,
                format!(
                    "unknown placeholder {{{name}}} (expected one of: {})",
                    PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                ),
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// `template` with each placeholder replaced through `value`.
pub(crate) fn render(template: &str, value: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                out.push_str(&value(&after[..close]));
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use crate::config::{ChannelKind, WorkerConfig};

    use super::*;

    fn parse(channel: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let text = format!("[[channel]]\nname = \"sms\"\nkind = \"sms\"\n{channel}");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let config = WorkerConfig::from_toml(&text, |name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .map_err(|e| e.to_string())?;
        match config.channels.into_iter().next().map(|c| c.kind) {
            Some(ChannelKind::Sms(config)) => Ok(config),
            other => panic!("not an sms channel: {other:?}"),
        }
    }

    #[test]
    fn reads_an_aliyun_channel() {
        let config = parse(
            "provider = \"aliyun\"\naccess_key_id = \"LTAI\"\naccess_key_secret_env = \"ALI\"\n\
             sign_name = \"阿里云\"\ntemplate_code = \"SMS_1\"\ntimeout = \"3s\"",
            &[("ALI", "s3cret")],
        )
        .unwrap();
        assert_eq!(config.timeout, Duration::from_secs(3));
        let Provider::Aliyun(aliyun) = config.provider else {
            panic!("not aliyun")
        };
        assert_eq!(aliyun.url.as_str(), ALIYUN_DEFAULT_URL);
        assert_eq!(aliyun.access_key_secret.expose_secret(), "s3cret");
        assert_eq!(aliyun.template_code.as_deref(), Some("SMS_1"));
    }

    #[test]
    fn reads_a_generic_channel_with_defaults() {
        let config = parse(
            "provider = \"generic\"\nurl = \"http://127.0.0.1:9/sms\"\nformat = \"form\"\n\
             fields = { mobile = \"{phone}\", content = \"Ref {idempotency_key}: {message}\" }\n\
             token_env = \"TOKEN\"",
            &[("TOKEN", "t")],
        )
        .unwrap();
        let Provider::Generic(generic) = config.provider else {
            panic!("not generic")
        };
        assert_eq!(generic.format, Format::Form);
        assert_eq!(generic.fields.len(), 2);
        assert!(generic.token.is_some());
    }

    #[test]
    fn errors_name_the_field_and_the_expectation() {
        let cases = [
            (
                "",
                "channel[0].provider: required for kind \"sms\" (supported: aliyun, generic)",
            ),
            (
                "provider = \"twilio\"",
                "channel[0].provider: unsupported provider \"twilio\" (supported: aliyun, generic)",
            ),
            (
                "provider = \"aliyun\"\naccess_key_secret_env = \"ALI\"\nsign_name = \"s\"",
                "channel[0].access_key_id: required",
            ),
            (
                "provider = \"aliyun\"\naccess_key_id = \"id\"\naccess_key_secret_env = \"NOPE\"\nsign_name = \"s\"",
                "channel[0].access_key_secret_env: environment variable \"NOPE\" is not set",
            ),
            (
                "provider = \"aliyun\"\naccess_key_id = \"id\"\naccess_key_secret_env = \"ALI\"",
                "channel[0].sign_name: required",
            ),
            (
                "provider = \"aliyun\"\naccess_key_id = \"id\"\naccess_key_secret_env = \"ALI\"\nsign_name = \"s\"\nformat = \"json\"",
                "channel[0].format: not allowed for provider \"aliyun\"",
            ),
            (
                "provider = \"generic\"",
                "channel[0].url: required for provider \"generic\"",
            ),
            (
                "provider = \"generic\"\nurl = \"http://x/\"\nformat = \"xml\"",
                "channel[0].format: expected \"json\" or \"form\", got \"xml\"",
            ),
            (
                "provider = \"generic\"\nurl = \"http://x/\"\nfields = { to = \"{email}\" }",
                "channel[0].fields.to: unknown placeholder {email} (expected one of: {phone}, \
                 {message}, {idempotency_key}, {run_id}, {step_id}, {playbook}, {action}, {contact_id})",
            ),
            (
                "provider = \"generic\"\nurl = \"http://x/\"\nhost = \"smtp\"",
                "channel[0].host: not allowed for kind \"sms\"",
            ),
            (
                "provider = \"generic\"\nurl = \"http://x/\"\ntimeout = \"0s\"",
                "channel[0].timeout: invalid duration \"0s\" (expected e.g. 500ms, 10s, 1m)",
            ),
        ];
        for (channel, expected) in cases {
            assert_eq!(
                parse(channel, &[("ALI", "s")]).unwrap_err(),
                expected,
                "for {channel:?}"
            );
        }
    }

    #[test]
    fn renders_placeholders() {
        let rendered = render("Ref {idempotency_key}: {message}", |name| match name {
            "idempotency_key" => "run-1:a".to_owned(),
            "message" => "hi".to_owned(),
            _ => String::new(),
        });
        assert_eq!(rendered, "Ref run-1:a: hi");
        assert_eq!(render("{ open", |_| "x".to_owned()), "{ open");
    }
}
