use std::collections::HashMap;
use std::time::Duration;

use secrecy::ExposeSecret as _;

use super::*;

const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let vars: HashMap<String, String> = pairs
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect();
    move |name| vars.get(name).cloned()
}

fn parse(text: &str) -> Result<WorkerConfig, Error> {
    WorkerConfig::from_toml(
        text,
        env(&[
            ("CRM_WEBHOOK_SECRET", SECRET),
            // examples/worker.toml's sms and smtp channels.
            ("ALIYUN_ACCESS_KEY_SECRET", "aliyun-secret"),
            ("SMS_GATEWAY_TOKEN", "gateway-token"),
            ("SMTP_PASSWORD", "smtp-password"),
            // examples/worker.toml's wecom channel.
            ("WECOM_CORP_SECRET", "corp-secret"),
            ("WECOM_CALLBACK_TOKEN", "QDG6eK"),
            (
                "WECOM_ENCODING_AES_KEY",
                "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C",
            ),
        ]),
    )
}

fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

#[test]
fn reads_the_example_from_spec() {
    let config = parse(
        r#"
        server = "http://127.0.0.1:50051"
        concurrency = 256

        [[channel]]
        name = "crm"                  # the name playbooks use
        kind = "webhook"
        url = "http://127.0.0.1:8099/hook"
        secret_env = "CRM_WEBHOOK_SECRET"   # Standard Webhooks secret

        [[channel]]
        name = "console"
        kind = "log"
        "#,
    )
    .unwrap();
    assert_eq!(config.server, "http://127.0.0.1:50051");
    assert!(config.channels.iter().all(|c| c.concurrency == 256));
    assert_eq!(config.worker_id, None);
    assert_eq!(config.channels.len(), 2);
    assert_eq!(config.channels[0].name, "crm");
    let ChannelKind::Webhook(webhook) = &config.channels[0].kind else {
        panic!("crm is not a webhook: {:?}", config.channels[0].kind);
    };
    assert_eq!(webhook.url.as_str(), "http://127.0.0.1:8099/hook");
    assert_eq!(webhook.timeout, Duration::from_secs(10));
    let key = webhook.secret.as_ref().unwrap();
    assert_eq!(key.expose_secret().len(), 24);
    assert_eq!(config.channels[1].name, "console");
    assert!(matches!(config.channels[1].kind, ChannelKind::Log));
    assert_eq!(
        config.channels[1].concurrency, 256,
        "the worker's concurrency is the default"
    );
}

#[test]
fn the_example_worker_toml_parses() {
    let text = include_str!("../../../examples/worker.toml");
    let config = parse(text).unwrap();
    assert!(!config.channels.is_empty());
}

#[test]
fn defaults_apply() {
    let config = parse(
        r#"
        [[channel]]
        name = "crm"
        kind = "webhook"
        url = "https://crm.example.com/hook"
        timeout = "2500ms"
        "#,
    )
    .unwrap();
    assert_eq!(config.server, DEFAULT_SERVER);
    assert!(
        config
            .channels
            .iter()
            .all(|c| c.concurrency == DEFAULT_CONCURRENCY)
    );
    let ChannelKind::Webhook(webhook) = &config.channels[0].kind else {
        panic!("not a webhook");
    };
    assert!(webhook.secret.is_none());
    assert_eq!(webhook.timeout, Duration::from_millis(2500));
}

#[test]
fn worker_id_defaults_to_host_and_pid() {
    let config = WorkerConfig::console(DEFAULT_SERVER, &["console"]);
    let id = config.resolved_worker_id();
    assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
    let named = WorkerConfig {
        worker_id: Some("worker-a".to_owned()),
        ..config
    };
    assert_eq!(named.resolved_worker_id(), "worker-a");
}

#[test]
fn console_serves_each_name_with_the_log_adapter() {
    let config = WorkerConfig::console("http://127.0.0.1:4000", &["console", "sms"]);
    assert_eq!(config.server, "http://127.0.0.1:4000");
    let names: Vec<_> = config.channels.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["console", "sms"]);
    assert!(
        config
            .channels
            .iter()
            .all(|c| matches!(c.kind, ChannelKind::Log))
    );
}

#[test]
fn secrets_never_show_in_debug_output() {
    let config = parse(
        r#"
        [[channel]]
        name = "crm"
        kind = "webhook"
        url = "http://127.0.0.1:8099/hook"
        secret_env = "CRM_WEBHOOK_SECRET"
        "#,
    )
    .unwrap();
    let printed = format!("{config:?}");
    assert!(printed.contains("REDACTED"), "{printed}");
    assert!(!printed.contains("C2FVsBQIhrscChlQIMV"), "{printed}");
}

#[test]
fn every_error_names_the_field_and_what_was_expected() {
    let cases = [
        (
            "servr = \"http://x\"\n[[channel]]\nname = \"c\"\nkind = \"log\"",
            "servr: unknown field `servr`, expected one of `server`, `concurrency`, `worker_id`, `hold_ahead`, `channel`",
        ),
        (
            "[[channel]]\nname = \"c\"\nkind = \"log\"\ncolour = \"red\"",
            "channel[0].colour: unknown field `colour`, expected one of `name`, `kind`, `url`, `secret_env`, `timeout`",
        ),
        (
            "concurrency = \"many\"\n[[channel]]\nname = \"c\"\nkind = \"log\"",
            "concurrency: invalid type: string \"many\", expected u32",
        ),
        (
            "concurrency = 0\n[[channel]]\nname = \"c\"\nkind = \"log\"",
            "concurrency: expected at least 1, got 0",
        ),
        (
            "server = \"127.0.0.1:50051\"\n[[channel]]\nname = \"c\"\nkind = \"log\"",
            "server: expected an http:// or https:// URL, got \"127.0.0.1:50051\"",
        ),
        (
            "worker_id = \"\"\n[[channel]]\nname = \"c\"\nkind = \"log\"",
            "worker_id: expected a name, got an empty string",
        ),
        (
            "server = \"http://127.0.0.1:50051\"",
            "channel: expected at least one [[channel]] table",
        ),
        ("[[channel]]\nkind = \"log\"", "channel[0].name: required"),
        (
            "[[channel]]\nname = \"c\"",
            "channel[0].kind: required (supported: log, webhook, sms, smtp, grpc, wecom)",
        ),
        (
            "[[channel]]\nname = \"c\"\nkind = \"fax\"",
            "channel[0].kind: unsupported kind \"fax\" (supported: log, webhook, sms, smtp, grpc, wecom)",
        ),
        (
            "[[channel]]\nname = \"a\"\nkind = \"log\"\n[[channel]]\nname = \"b\"\nkind = \"webhook\"",
            "channel[1].url: required for kind \"webhook\"",
        ),
        (
            "[[channel]]\nname = \"b\"\nkind = \"webhook\"\nurl = \"not a url\"",
            "channel[0].url: expected an http:// or https:// URL, got \"not a url\"",
        ),
        (
            "[[channel]]\nname = \"b\"\nkind = \"webhook\"\nurl = \"ftp://example.com/\"",
            "channel[0].url: expected an http:// or https:// URL, got \"ftp://example.com/\"",
        ),
        (
            "[[channel]]\nname = \"b\"\nkind = \"webhook\"\nurl = \"http://x/\"\ntimeout = \"10x\"",
            "channel[0].timeout: invalid duration \"10x\" (expected e.g. 500ms, 10s, 1m)",
        ),
        (
            "[[channel]]\nname = \"b\"\nkind = \"webhook\"\nurl = \"http://x/\"\ntimeout = \"0s\"",
            "channel[0].timeout: invalid duration \"0s\" (expected e.g. 500ms, 10s, 1m)",
        ),
        (
            "[[channel]]\nname = \"b\"\nkind = \"webhook\"\nurl = \"http://x/\"\nsecret_env = \"MISSING\"",
            "channel[0].secret_env: environment variable \"MISSING\" is not set",
        ),
        (
            "[[channel]]\nname = \"c\"\nkind = \"log\"\nurl = \"http://x/\"",
            "channel[0].url: not allowed for kind \"log\"",
        ),
        (
            "[[channel]]\nname = \"crm\"\nkind = \"log\"\n[[channel]]\nname = \"crm\"\nkind = \"log\"",
            "channel[1].name: duplicate channel name \"crm\" (also channel[0])",
        ),
        (
            "hold_ahead = 300000\n[[channel]]\nname = \"c\"\nkind = \"log\"",
            "hold_ahead: expected at most 200000, got 300000",
        ),
        ("[[channel]\nname = \"c\"", "line 1: "),
    ];
    for (text, expected) in cases {
        let message = error(text);
        assert!(
            message.starts_with(expected),
            "for {text:?}\n  got: {message}\n want: {expected}"
        );
    }
}

#[test]
fn a_secret_that_is_not_base64_is_refused_without_showing_it() {
    let text =
        "[[channel]]\nname = \"b\"\nkind = \"webhook\"\nurl = \"http://x/\"\nsecret_env = \"S\"";
    for value in ["whsec_%%%not-base64%%%", "whsec_"] {
        let message = WorkerConfig::from_toml(text, env(&[("S", value)]))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("channel[0].secret_env: environment variable \"S\" is"),
            "{message}"
        );
        assert!(!message.contains("not-base64"), "{message}");
    }
}

#[test]
fn syntax_errors_name_the_line() {
    let message = error("[[channel]]\nname = \"c\"\nkind = log\n");
    assert!(message.starts_with("line 3: "), "{message}");
}

#[test]
fn load_reads_a_file_and_reports_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, "[[channel]]\nname = \"console\"\nkind = \"log\"\n").unwrap();
    assert_eq!(
        WorkerConfig::load(&path).unwrap().channels[0].name,
        "console"
    );
    drop(dir);
    let message = WorkerConfig::load(&path).unwrap_err().to_string();
    assert!(message.starts_with("cannot read the file: "), "{message}");
}

#[test]
fn a_channel_may_set_retry_defaults() {
    let config = parse(
        "[[channel]]\nname = \"c\"\nkind = \"log\"\nretry = { max_attempts = 3, initial = \"250ms\" }\n",
    )
    .unwrap();
    let retry = config.channels[0].retry;
    assert_eq!(retry.max_attempts, Some(3));
    assert_eq!(retry.initial, Some(std::time::Duration::from_millis(250)));
    assert_eq!(retry.max, None);
    for (text, expected) in [
        (
            "retry = { max_attempts = 0 }",
            "channel[0].retry.max_attempts: expected 1 to 100, got 0",
        ),
        (
            "retry = { initial = \"soon\" }",
            "channel[0].retry.initial: invalid duration \"soon\"",
        ),
        ("retry = { tries = 3 }", "channel[0].retry.tries"),
    ] {
        let message = error(&format!(
            "[[channel]]\nname = \"c\"\nkind = \"log\"\n{text}\n"
        ));
        assert!(message.starts_with(expected), "{text}: {message}");
    }
}

#[test]
fn a_channel_may_set_a_rate_and_burst() {
    let config = parse(
        "[[channel]]\nname = \"a\"\nkind = \"log\"\nrate = \"600/min\"\n\
         [[channel]]\nname = \"b\"\nkind = \"log\"\nrate = \"5/s\"\nburst = 20\n\
         [[channel]]\nname = \"c\"\nkind = \"log\"\nrate = \"90/h\"\n\
         [[channel]]\nname = \"d\"\nkind = \"log\"\n",
    )
    .unwrap();
    let rates: Vec<Option<ChannelRate>> = config.channels.iter().map(|c| c.rate).collect();
    assert_eq!(
        rates,
        vec![
            // The default burst is one second's worth...
            Some(ChannelRate {
                per_second: 10.0,
                burst: 10
            }),
            Some(ChannelRate {
                per_second: 5.0,
                burst: 20
            }),
            // ... and at least 1.
            Some(ChannelRate {
                per_second: 0.025,
                burst: 1
            }),
            None,
        ]
    );
}

#[test]
fn a_bad_rate_or_burst_is_refused_naming_the_field() {
    for (text, expected) in [
        (
            "rate = \"fast\"",
            "channel[1].rate: expected \"<count>/<s|min|h>\", got \"fast\"",
        ),
        (
            "rate = \"10/day\"",
            "channel[1].rate: expected \"<count>/<s|min|h>\", got \"10/day\"",
        ),
        (
            "rate = \"-1/s\"",
            "channel[1].rate: expected \"<count>/<s|min|h>\", got \"-1/s\"",
        ),
        (
            "rate = \"0/min\"",
            "channel[1].rate: expected at least 1, got \"0/min\"",
        ),
        (
            "rate = \"5/s\"\nburst = 0",
            "channel[1].burst: expected at least 1, got 0",
        ),
        ("burst = 5", "channel[1].burst: needs a rate"),
        ("rate = 5", "channel[1].rate"),
    ] {
        let message = error(&format!(
            "[[channel]]\nname = \"ok\"\nkind = \"log\"\n\
             [[channel]]\nname = \"c\"\nkind = \"log\"\n{text}\n"
        ));
        assert!(message.starts_with(expected), "{text}: {message}");
    }
}

#[test]
fn a_channel_may_set_its_own_concurrency() {
    let config = parse(
        "concurrency = 8\n[[channel]]\nname = \"slow\"\nkind = \"log\"\nconcurrency = 2\n\
         [[channel]]\nname = \"fast\"\nkind = \"log\"\n",
    )
    .unwrap();
    let per_channel: Vec<_> = config
        .channels
        .iter()
        .map(|c| (c.name.as_str(), c.concurrency))
        .collect();
    assert_eq!(per_channel, [("slow", 2), ("fast", 8)]);
    let error = parse("[[channel]]\nname = \"c\"\nkind = \"log\"\nconcurrency = 0\n").unwrap_err();
    assert_eq!(
        error.to_string(),
        "channel[0].concurrency: expected at least 1, got 0"
    );
}

#[test]
fn each_kind_refuses_the_settings_of_other_kinds() {
    let cases = [
        (
            "log",
            "corp_id = \"ww1\"",
            "channel[0].corp_id: not allowed for kind \"log\"",
        ),
        (
            "webhook",
            "url = \"http://127.0.0.1:1/h\"\nhost = \"smtp.example.com\"",
            "channel[0].host: not allowed for kind \"webhook\"",
        ),
        (
            "grpc",
            "endpoint = \"http://127.0.0.1:7000\"\nsender = \"zhangsan\"",
            "channel[0].sender: not allowed for kind \"grpc\"",
        ),
    ];
    for (kind, settings, expected) in cases {
        let text = format!("[[channel]]\nname = \"c\"\nkind = \"{kind}\"\n{settings}\n");
        let error = parse(&text).unwrap_err();
        assert_eq!(error.to_string(), expected, "{text}");
    }
}
