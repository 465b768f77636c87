//! Settings of a `grpc` channel: `endpoint`, `timeout`.

use std::time::Duration;

use crate::config::{Error, RawChannel, check_http_url, duration_or};

/// A grpc channel's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The adapter's address, `http://host:port` (or `https://` with a publicly trusted
    /// certificate).
    pub endpoint: String,
    /// Longest wait for one call (connecting included); a delivery's own deadline may
    /// shorten it.
    pub timeout: Duration,
}

impl Config {
    /// Timeout of one call when `timeout` is not set.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// Checks a `[[channel]]` of kind `grpc` found at `at` (e.g. `channel[1]`).
    pub(crate) fn from_raw(
        raw: &RawChannel,
        at: &str,
        _env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, Error> {
        raw.reject_settings_except(at, "kind \"grpc\"", &["endpoint", "timeout"])?;
        let Some(endpoint) = &raw.endpoint else {
            return Err(Error::field(
                format!("{at}.endpoint"),
                "required for kind \"grpc\" (e.g. \"http://127.0.0.1:7000\")",
            ));
        };
        let url = check_http_url(&format!("{at}.endpoint"), endpoint)?;
        if url.host_str().is_none_or(str::is_empty) || url.port_or_known_default().is_none() {
            return Err(Error::field(
                format!("{at}.endpoint"),
                format!("expected http://host:port, got {endpoint:?}"),
            ));
        }
        let timeout = duration_or(
            &format!("{at}.timeout"),
            raw.timeout.as_deref(),
            Self::DEFAULT_TIMEOUT,
        )?;
        Ok(Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{ChannelKind, WorkerConfig};

    use super::*;

    fn parse(channel: &str) -> Result<Config, String> {
        let text = format!("[[channel]]\nname = \"ext\"\nkind = \"grpc\"\n{channel}");
        let config = WorkerConfig::from_toml(&text, |_| None).map_err(|e| e.to_string())?;
        match config.channels.into_iter().next().map(|c| c.kind) {
            Some(ChannelKind::Grpc(config)) => Ok(config),
            other => panic!("not a grpc channel: {other:?}"),
        }
    }

    #[test]
    fn reads_a_channel() {
        let config = parse("endpoint = \"http://127.0.0.1:7000/\"\ntimeout = \"2s\"").unwrap();
        assert_eq!(config.endpoint, "http://127.0.0.1:7000");
        assert_eq!(config.timeout, Duration::from_secs(2));
        assert_eq!(
            parse("endpoint = \"http://127.0.0.1:7000\"")
                .unwrap()
                .timeout,
            Config::DEFAULT_TIMEOUT
        );
    }

    #[test]
    fn errors_name_the_field_and_the_expectation() {
        let cases = [
            (
                "",
                "channel[0].endpoint: required for kind \"grpc\" (e.g. \"http://127.0.0.1:7000\")",
            ),
            (
                "endpoint = \"127.0.0.1:7000\"",
                "channel[0].endpoint: expected an http:// or https:// URL, got \"127.0.0.1:7000\"",
            ),
            (
                "endpoint = \"http://127.0.0.1:7000\"\nurl = \"http://x/\"",
                "channel[0].url: not allowed for kind \"grpc\"",
            ),
            (
                "endpoint = \"http://127.0.0.1:7000\"\ntimeout = \"soon\"",
                "channel[0].timeout: invalid duration \"soon\" (expected e.g. 500ms, 10s, 1m)",
            ),
        ];
        for (channel, expected) in cases {
            assert_eq!(parse(channel).unwrap_err(), expected, "for {channel:?}");
        }
    }
}
