//! Channel conformance: the same checks against every adapter kind, each adapter built
//! in-process from `worker.toml` text (`WorkerConfig::from_toml` + `Registry::from_config`)
//! and talking to its real local provider; the last check runs real processes.
//!
//! 1. **Retry classification**: the provider's busy answer → `Retryable` (not rate
//!    limited), its rate-limit answer → `Retryable` with `is_rate_limited()`, its
//!    bad-request / invalid-recipient answer → `Permanent`, a normal answer → delivered;
//!    every one of them really reached the provider.
//! 2. **Idempotency key**: a busy attempt then a successful one of the same step; the
//!    provider saw the same key, in its own field, on both.
//! 3. **No secret or personal data in logs**: everything traced (TRACE, every target,
//!    span fields included) while delivering successes and failures, plus every outcome's
//!    detail, holds none of the configured secrets, provider-issued tokens, the phone
//!    number, the e-mail address or the message body.
//! 4. **Timeouts bounded**: against a provider that accepts the connection and never
//!    answers, each adapter with `timeout = "500ms"` answers `Retryable` within 3 s.
//! 5. **A slow provider never blocks other channels** (end to end, `touchpoint-node`
//!    processes): while one worker's deliveries on a hanging channel are in flight, its
//!    steps on another channel are delivered, also when the hanging deliveries hold
//!    every one of the slow channel's `concurrency` slots (each channel has its own).
//!
//! What each provider answers, and where it takes the idempotency key:
//!
//! | case | busy | rate limited | invalid | idempotency key |
//! |---|---|---|---|---|
//! | webhook | HTTP 503 | HTTP 429 | HTTP 400 | `webhook-id` header |
//! | wecom (`send_welcome`) | errcode -1 | errcode 45009 | errcode 41050 (unknown welcome code) | **none**: WeCom's API has no such field; `send_welcome_msg`'s welcome code is single-use, so a replay of a delivered step is refused (`Permanent`), never sent twice |
//! | sms-aliyun | `isp.SYSTEM_ERROR` | `isv.BUSINESS_LIMIT_CONTROL` | `isv.MOBILE_NUMBER_ILLEGAL` | `OutId` parameter |
//! | sms-generic | HTTP 503 | HTTP 429 | HTTP 400 | `Idempotency-Key` header |
//! | smtp | 451 at DATA | **none**: SMTP has no standard rate-limit reply (a 4xx is retried like busy) | 550 at DATA | `Message-ID: <{32 hex of SHA-256(key)}@{from domain}>` |
//! | grpc | `OUTCOME_RETRYABLE` | `OUTCOME_RETRYABLE` + `rate_limited` | `OUTCOME_PERMANENT` | `DeliverRequest.idempotency_key` |
//!
//! A new adapter kind is one more [`Case`] implementation and one more row in [`cases`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::task::JoinHandle;
use touchpoint_proto::v1::RunStatus;
use touchpoint_tests::{
    ChannelConfig, PythonAdapter, SECRET_ENV, SmsServer, SmtpServer, SmtpTls, Stack,
    WebhookReceiver, WecomServer, WorkerConfig, WorkerNode, contact, eventually, generate_secret,
    request_id, run_summary,
};
use touchpoint_worker::channel::{
    ChannelAdapter, Contact, Delivered, Delivery, Error, Progress, Registry,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");

const PHONE: &str = "+8613800004321";
/// The phone number without its country code: no log may hold even that.
const PHONE_DIGITS: &str = "13800004321";
const NAME: &str = "王芳";
const BODY: &str = "王芳，您的专属券 CONFORMANCE-77 已到账";
const SUBJECT: &str = "Your coupon";
const FROM_DOMAIN: &str = "brand.example";

const WEBHOOK_SECRET_ENV: &str = "CONFORMANCE_WEBHOOK_SECRET";
const WECOM_CORP_ID: &str = "wwconformance0001";
const WECOM_SECRET: &str = "wecom-corp-secret-5f1e";
const ALIYUN_KEY_ID: &str = "LTAI-conformance";
const ALIYUN_SECRET: &str = "aliyun-secret-9c2d";
const GATEWAY_TOKEN: &str = "gateway-token-3b7a";
const SMTP_USER: &str = "mailer";
const SMTP_PASSWORD: &str = "smtp-pass-8e4f";

/// The kinds whose provider takes no idempotency key (see the table above).
const NO_IDEMPOTENCY_FIELD: &[&str] = &["wecom"];

/// What a provider is made to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accept,
    Busy,
    RateLimited,
    Invalid,
}

/// Where a provider got the idempotency key.
enum Idempotency {
    /// In its own field: `expected` (the key, or what the adapter derives from it) should
    /// be every value `seen`, request by request.
    Carried { expected: String, seen: Vec<String> },
    /// The provider takes none.
    NoField,
}

/// One adapter kind against its real provider.
trait Case {
    /// The channel's name (also the case's name in failures).
    fn name(&self) -> &'static str;
    /// `kind = ...` of its `[[channel]]`.
    fn kind(&self) -> &'static str;
    /// The `[[channel]]`'s settings (TOML lines) for the real provider, or for a provider
    /// at `hanging` that never answers; one attempt's budget is `timeout`.
    fn settings(&self, hanging: Option<SocketAddr>, timeout: &str) -> String;
    /// The environment the settings read secrets from.
    fn env(&self) -> Vec<(&'static str, String)>;
    /// Values no log may hold: the configured secrets and any the provider issued.
    fn secrets(&self) -> Vec<String>;
    /// Makes the provider answer `answer` to `delivery` (changing the delivery where the
    /// provider answers by it); `false` when the provider has no such answer.
    fn script(&self, answer: Answer, delivery: &mut Delivery) -> bool;
    /// The idempotency key as the provider got it, for a step whose key is `key`.
    fn idempotency(&self, key: &str) -> Idempotency;
    /// Requests (sends) the provider has received.
    fn received(&self) -> usize;
    /// Messages the provider accepted.
    fn accepted(&self) -> usize;
}

// ---------------------------------------------------------------------------------------
// The rows.

struct Webhook {
    receiver: WebhookReceiver,
    secret: String,
}

impl Case for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }
    fn kind(&self) -> &'static str {
        "webhook"
    }
    fn settings(&self, hanging: Option<SocketAddr>, timeout: &str) -> String {
        let url = hanging.map_or_else(|| self.receiver.url(), |a| format!("http://{a}/hook"));
        format!("url = \"{url}\"\nsecret_env = \"{WEBHOOK_SECRET_ENV}\"\ntimeout = \"{timeout}\"")
    }
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![(WEBHOOK_SECRET_ENV, self.secret.clone())]
    }
    fn secrets(&self) -> Vec<String> {
        let bare = self.secret.trim_start_matches("whsec_").to_owned();
        vec![self.secret.clone(), bare]
    }
    fn script(&self, answer: Answer, _: &mut Delivery) -> bool {
        self.receiver.respond_with(&[match answer {
            Answer::Accept => 200,
            Answer::Busy => 503,
            Answer::RateLimited => 429,
            Answer::Invalid => 400,
        }]);
        true
    }
    fn idempotency(&self, key: &str) -> Idempotency {
        Idempotency::Carried {
            expected: key.to_owned(),
            seen: self
                .receiver
                .requests()
                .iter()
                .map(|r| r.webhook_id().to_owned())
                .collect(),
        }
    }
    fn received(&self) -> usize {
        self.receiver.count()
    }
    fn accepted(&self) -> usize {
        let ok = |r: &&touchpoint_tests::ReceivedRequest| (200..300).contains(&r.status);
        self.receiver.requests().iter().filter(ok).count()
    }
}

struct Wecom {
    server: WecomServer,
}

const WELCOME_ENDPOINT: &str = "externalcontact/send_welcome_msg";

impl Wecom {
    /// A welcome code the server issued (once per delivery: a retry reuses it).
    fn ensure_code(&self, delivery: &mut Delivery) {
        if delivery.params.get("welcome_code").is_none() {
            delivery.params["welcome_code"] = self.server.issue_welcome_code().into();
        }
    }
}

impl Case for Wecom {
    fn name(&self) -> &'static str {
        "wecom"
    }
    fn kind(&self) -> &'static str {
        "wecom"
    }
    fn settings(&self, hanging: Option<SocketAddr>, timeout: &str) -> String {
        let base = hanging.map_or_else(|| self.server.url(), |a| format!("http://{a}"));
        format!(
            "corp_id = \"{WECOM_CORP_ID}\"\nsecret_env = \"CONFORMANCE_WECOM_SECRET\"\n\
             base_url = \"{base}\"\nsender = \"zhangsan\"\ntimeout = \"{timeout}\""
        )
    }
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("CONFORMANCE_WECOM_SECRET", WECOM_SECRET.to_owned())]
    }
    fn secrets(&self) -> Vec<String> {
        let mut secrets = self.server.access_tokens();
        secrets.push(WECOM_SECRET.to_owned());
        secrets
    }
    fn script(&self, answer: Answer, delivery: &mut Delivery) -> bool {
        "send_welcome".clone_into(&mut delivery.action);
        match answer {
            Answer::Accept => self.ensure_code(delivery),
            Answer::Busy => {
                self.ensure_code(delivery);
                self.server.inject(WELCOME_ENDPOINT, -1, 1);
            }
            Answer::RateLimited => {
                self.ensure_code(delivery);
                self.server.inject(WELCOME_ENDPOINT, 45009, 1);
            }
            // A code WeCom never issued: 41050.
            Answer::Invalid => delivery.params["welcome_code"] = "WC-never-issued".into(),
        }
        true
    }
    fn idempotency(&self, _: &str) -> Idempotency {
        Idempotency::NoField
    }
    fn received(&self) -> usize {
        self.server.calls(WELCOME_ENDPOINT)
    }
    fn accepted(&self) -> usize {
        self.server.welcomes().len()
    }
}

struct Aliyun {
    sms: SmsServer,
}

impl Case for Aliyun {
    fn name(&self) -> &'static str {
        "sms-aliyun"
    }
    fn kind(&self) -> &'static str {
        "sms"
    }
    fn settings(&self, hanging: Option<SocketAddr>, timeout: &str) -> String {
        let url = hanging.map_or_else(|| self.sms.aliyun_url(), |a| format!("http://{a}/"));
        format!(
            "provider = \"aliyun\"\nurl = \"{url}\"\naccess_key_id = \"{ALIYUN_KEY_ID}\"\n\
             access_key_secret_env = \"CONFORMANCE_ALIYUN_SECRET\"\nsign_name = \"品牌商城\"\n\
             template_code = \"SMS_100\"\ntimeout = \"{timeout}\""
        )
    }
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("CONFORMANCE_ALIYUN_SECRET", ALIYUN_SECRET.to_owned())]
    }
    fn secrets(&self) -> Vec<String> {
        vec![ALIYUN_SECRET.to_owned()]
    }
    fn script(&self, answer: Answer, _: &mut Delivery) -> bool {
        self.sms.script_codes(&[match answer {
            Answer::Accept => "OK",
            Answer::Busy => "isp.SYSTEM_ERROR",
            Answer::RateLimited => "isv.BUSINESS_LIMIT_CONTROL",
            Answer::Invalid => "isv.MOBILE_NUMBER_ILLEGAL",
        }]);
        true
    }
    fn idempotency(&self, key: &str) -> Idempotency {
        Idempotency::Carried {
            expected: key.to_owned(),
            seen: self
                .sms
                .aliyun_requests()
                .iter()
                .map(|r| r.param("OutId").to_owned())
                .collect(),
        }
    }
    fn received(&self) -> usize {
        self.sms.aliyun_requests().len()
    }
    fn accepted(&self) -> usize {
        let requests = self.sms.aliyun_requests();
        requests.iter().filter(|r| r.code == "OK").count()
    }
}

struct Generic {
    sms: SmsServer,
}

impl Case for Generic {
    fn name(&self) -> &'static str {
        "sms-generic"
    }
    fn kind(&self) -> &'static str {
        "sms"
    }
    fn settings(&self, hanging: Option<SocketAddr>, timeout: &str) -> String {
        let url = hanging.map_or_else(|| self.sms.generic_url(), |a| format!("http://{a}/generic"));
        format!(
            "provider = \"generic\"\nurl = \"{url}\"\nformat = \"json\"\n\
             fields = {{ to = \"{{phone}}\", text = \"{{message}}\" }}\n\
             token_env = \"CONFORMANCE_GATEWAY_TOKEN\"\ntimeout = \"{timeout}\""
        )
    }
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("CONFORMANCE_GATEWAY_TOKEN", GATEWAY_TOKEN.to_owned())]
    }
    fn secrets(&self) -> Vec<String> {
        vec![GATEWAY_TOKEN.to_owned()]
    }
    fn script(&self, answer: Answer, _: &mut Delivery) -> bool {
        self.sms.script_statuses(&[match answer {
            Answer::Accept => 200,
            Answer::Busy => 503,
            Answer::RateLimited => 429,
            Answer::Invalid => 400,
        }]);
        true
    }
    fn idempotency(&self, key: &str) -> Idempotency {
        Idempotency::Carried {
            expected: key.to_owned(),
            seen: self
                .sms
                .generic_requests()
                .iter()
                .map(|r| r.idempotency_key.clone())
                .collect(),
        }
    }
    fn received(&self) -> usize {
        self.sms.generic_requests().len()
    }
    fn accepted(&self) -> usize {
        let requests = self.sms.generic_requests();
        requests.iter().filter(|r| r.status == 200).count()
    }
}

struct Smtp {
    server: SmtpServer,
    /// Makes each recipient unique (the server answers by the local part).
    next: AtomicUsize,
}

impl Case for Smtp {
    fn name(&self) -> &'static str {
        "smtp"
    }
    fn kind(&self) -> &'static str {
        "smtp"
    }
    fn settings(&self, hanging: Option<SocketAddr>, timeout: &str) -> String {
        let from = format!("from = \"Brand <news@{FROM_DOMAIN}>\"\ntimeout = \"{timeout}\"");
        match hanging {
            Some(addr) => format!(
                "host = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n{from}",
                addr.port()
            ),
            None => format!(
                "host = \"localhost\"\nport = {}\ntls = \"{}\"\nca_file = {:?}\n\
                 username = \"{SMTP_USER}\"\npassword_env = \"CONFORMANCE_SMTP_PASSWORD\"\n{from}",
                self.server.port(),
                self.server.tls().setting(),
                self.server.ca_file().to_string_lossy(),
            ),
        }
    }
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("CONFORMANCE_SMTP_PASSWORD", SMTP_PASSWORD.to_owned())]
    }
    fn secrets(&self) -> Vec<String> {
        vec![SMTP_PASSWORD.to_owned()]
    }
    fn script(&self, answer: Answer, delivery: &mut Delivery) -> bool {
        let prefix = match answer {
            Answer::Accept => "",
            Answer::Busy => "tempfail-",
            Answer::Invalid => "reject-",
            Answer::RateLimited => return false,
        };
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let email = format!("{prefix}wang.fang.{n}@example.com");
        delivery
            .contact
            .identities
            .insert("email".to_owned(), email);
        true
    }
    fn idempotency(&self, key: &str) -> Idempotency {
        let digest = hex::encode(Sha256::digest(key.as_bytes()));
        let id = |mail: &touchpoint_tests::smtp_server::ReceivedMail| {
            mail.header("Message-ID").unwrap_or_default()
        };
        // Rejected first: the check's busy attempt comes before its accepted one.
        let mut seen: Vec<String> = self.server.rejected().iter().map(id).collect();
        seen.extend(self.server.accepted().iter().map(id));
        Idempotency::Carried {
            expected: format!("<{}@{FROM_DOMAIN}>", &digest[..32]),
            seen,
        }
    }
    fn received(&self) -> usize {
        self.server.accepted().len() + self.server.rejected().len()
    }
    fn accepted(&self) -> usize {
        self.server.accepted().len()
    }
}

struct Grpc {
    adapter: PythonAdapter,
}

impl Case for Grpc {
    fn name(&self) -> &'static str {
        "grpc"
    }
    fn kind(&self) -> &'static str {
        "grpc"
    }
    fn settings(&self, hanging: Option<SocketAddr>, timeout: &str) -> String {
        let endpoint = hanging.map_or_else(|| self.adapter.endpoint(), |a| format!("http://{a}"));
        format!("endpoint = \"{endpoint}\"\ntimeout = \"{timeout}\"")
    }
    fn env(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
    fn secrets(&self) -> Vec<String> {
        Vec::new()
    }
    fn script(&self, answer: Answer, delivery: &mut Delivery) -> bool {
        // tests/adapters/python/adapter.py answers by action ("flaky": busy on attempt 1).
        let action = match answer {
            Answer::Accept => "send_message",
            Answer::Busy => "flaky",
            Answer::RateLimited => "throttle",
            Answer::Invalid => "refuse",
        };
        action.clone_into(&mut delivery.action);
        true
    }
    fn idempotency(&self, key: &str) -> Idempotency {
        let seen = self.adapter.deliveries();
        Idempotency::Carried {
            expected: key.to_owned(),
            seen: seen
                .iter()
                .map(|d| d["idempotency_key"].as_str().unwrap_or_default().to_owned())
                .collect(),
        }
    }
    fn received(&self) -> usize {
        self.adapter.deliveries().len()
    }
    fn accepted(&self) -> usize {
        let delivered = |d: &&serde_json::Value| {
            d["action"] == "send_message" || (d["action"] == "flaky" && d["attempt"] != 1)
        };
        self.adapter.deliveries().iter().filter(delivered).count()
    }
}

/// Every adapter kind against its own, freshly started provider.
async fn cases() -> Vec<Box<dyn Case>> {
    // The Python venv first (a minute the first time), shared by SMTP and gRPC.
    touchpoint_tests::python::python();
    vec![
        Box::new(Webhook {
            receiver: WebhookReceiver::start().await,
            secret: generate_secret(),
        }),
        Box::new(Wecom {
            server: WecomServer::start(WECOM_CORP_ID, WECOM_SECRET).await,
        }),
        Box::new(Aliyun {
            sms: SmsServer::start(ALIYUN_KEY_ID, ALIYUN_SECRET).await,
        }),
        Box::new(Generic {
            sms: SmsServer::start(ALIYUN_KEY_ID, ALIYUN_SECRET).await,
        }),
        Box::new(Smtp {
            server: SmtpServer::start(SmtpTls::StartTls, Some((SMTP_USER, SMTP_PASSWORD))),
            next: AtomicUsize::new(0),
        }),
        Box::new(Grpc {
            adapter: PythonAdapter::start(),
        }),
    ]
}

// ---------------------------------------------------------------------------------------
// Shared pieces.

/// The case's adapter, built from `worker.toml` text as the worker builds it.
fn adapter(case: &dyn Case, hanging: Option<SocketAddr>, timeout: &str) -> Arc<dyn ChannelAdapter> {
    let toml = format!(
        "[[channel]]\nname = \"{}\"\nkind = \"{}\"\n{}\n",
        case.name(),
        case.kind(),
        case.settings(hanging, timeout)
    );
    let env = case.env();
    let config = touchpoint_worker::WorkerConfig::from_toml(&toml, |name| {
        env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone())
    })
    .unwrap_or_else(|e| panic!("{}: {e}\n{toml}", case.name()));
    let registry = Registry::from_config(&config.channels)
        .unwrap_or_else(|e| panic!("{}: {e:#}", case.name()));
    Arc::clone(registry.get(case.name()).expect("the channel is served"))
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// A first attempt of a fresh step on the case's channel, for a contact with a phone
/// number, an e-mail address and a WeCom id.
fn delivery(case: &dyn Case) -> Delivery {
    let run_id = format!("run-{}", RUNS.fetch_add(1, Ordering::Relaxed));
    Delivery {
        idempotency_key: format!("{run_id}.hello"),
        run_id,
        playbook: "conformance".to_owned(),
        version: 1,
        step_id: "hello".to_owned(),
        action: "send_message".to_owned(),
        channel: case.name().to_owned(),
        attempt: 1,
        message: BODY.to_owned(),
        params: serde_json::json!({ "subject": SUBJECT }),
        contact: Contact {
            id: "c-conformance".to_owned(),
            attrs: BTreeMap::from([("name".to_owned(), NAME.to_owned())]),
            tags: Vec::new(),
            tz: "Asia/Shanghai".to_owned(),
            identities: BTreeMap::from([
                ("phone".to_owned(), PHONE.to_owned()),
                ("email".to_owned(), "wang.fang@example.com".to_owned()),
                ("wecom".to_owned(), "wmConformance01".to_owned()),
            ]),
        },
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        deadline: None,
        step_deadline: None,
        resume_state: String::new(),
        progress: Progress::default(),
    }
}

/// What `result` is, in a word or two.
fn class(result: &Result<Delivered, Error>) -> &'static str {
    match result {
        Ok(_) => "delivered",
        Err(e) if e.is_rate_limited() => "retryable (rate limited)",
        Err(Error::Retryable { .. }) => "retryable",
        Err(Error::Permanent { .. }) => "permanent",
        Err(Error::Skipped { .. }) => "skipped",
    }
}

/// Panics listing every failure, so one run shows every adapter that misses a check.
fn report(check: &str, failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{check}: {} failure(s):\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// A TCP server that accepts every connection and never reads, writes or closes it.
struct Hanging {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Hanging {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the hanging provider");
        let addr = listener.local_addr().expect("its address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
                count.fetch_add(1, Ordering::SeqCst);
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Hanging {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// 1. Retry classification.

#[tokio::test]
async fn provider_answers_are_classified_alike() {
    let cases = cases().await;
    let mut failures = Vec::new();
    let mut table = String::new();
    for case in &cases {
        let adapter = adapter(case.as_ref(), None, "5s");
        for (answer, expected) in [
            (Answer::Accept, "delivered"),
            (Answer::Busy, "retryable"),
            (Answer::RateLimited, "retryable (rate limited)"),
            (Answer::Invalid, "permanent"),
        ] {
            let mut delivery = delivery(case.as_ref());
            if !case.script(answer, &mut delivery) {
                let _ = writeln!(table, "{:12} {answer:?}: no such answer", case.name());
                continue;
            }
            let before = case.received();
            let result = adapter.deliver(&delivery).await;
            let got = class(&result);
            let _ = writeln!(table, "{:12} {answer:?}: {got} {result:?}", case.name());
            if got != expected {
                failures.push(format!(
                    "{}: {answer:?} answer → {got} ({result:?}), expected {expected}",
                    case.name()
                ));
            }
            // The outcome came from the provider, not from a check before sending.
            let received = case.received() - before;
            if received != 1 {
                failures.push(format!(
                    "{}: {answer:?}: the provider got {received} requests, expected 1",
                    case.name()
                ));
            }
        }
    }
    println!("{table}");
    report("retry classification", &failures);
}

// 2. The idempotency key reaches the provider.

#[tokio::test]
async fn the_idempotency_key_reaches_the_provider() {
    let cases = cases().await;
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.name();
        let adapter = adapter(case.as_ref(), None, "5s");
        let accepted_before = case.accepted();
        // A busy first attempt, then a second attempt of the same step.
        let mut first = delivery(case.as_ref());
        let key = first.idempotency_key.clone();
        assert!(
            case.script(Answer::Busy, &mut first),
            "{name}: no busy answer"
        );
        let outcome = adapter.deliver(&first).await;
        if !matches!(outcome, Err(Error::Retryable { .. })) {
            failures.push(format!("{name}: busy attempt → {outcome:?}"));
        }
        let mut second = first.clone();
        second.attempt = 2;
        assert!(case.script(Answer::Accept, &mut second));
        let outcome = adapter.deliver(&second).await;
        if outcome.is_err() {
            failures.push(format!("{name}: second attempt → {outcome:?}"));
        }
        let accepted = case.accepted() - accepted_before;
        if accepted != 1 {
            failures.push(format!("{name}: the provider accepted {accepted} messages"));
        }
        match case.idempotency(&key) {
            Idempotency::Carried { expected, seen } => {
                if NO_IDEMPOTENCY_FIELD.contains(&name) {
                    failures.push(format!("{name}: carries a key, but is listed as not"));
                }
                let last_two = &seen[seen.len().saturating_sub(2)..];
                if last_two != [expected.clone(), expected.clone()] {
                    failures.push(format!(
                        "{name}: the provider saw {last_two:?} on the two attempts, \
                         expected {expected:?} on both"
                    ));
                }
            }
            Idempotency::NoField => {
                if !NO_IDEMPOTENCY_FIELD.contains(&name) {
                    failures.push(format!("{name}: carries no key and is not an exception"));
                }
                // The exception's own guard (WeCom: a welcome code is single-use): a
                // replay of the delivered step is refused, never sent twice.
                let replay = adapter.deliver(&second).await;
                if !matches!(replay, Err(Error::Permanent { .. })) {
                    failures.push(format!("{name}: a replay of a sent step → {replay:?}"));
                }
                if case.accepted() - accepted_before != 1 {
                    failures.push(format!("{name}: a replay was sent again"));
                }
            }
        }
    }
    report("idempotency key", &failures);
}

// 3. No secret or personal data in logs.

#[tokio::test]
async fn no_secret_or_personal_data_reaches_the_logs() {
    let cases = cases().await;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // This test's runtime has one thread: everything the adapters do runs under it.
    let _guard = tracing_subscriber::util::SubscriberInitExt::set_default(subscriber);

    let mut failures = Vec::new();
    for case in &cases {
        let start = captured.text().len();
        let adapter = adapter(case.as_ref(), None, "5s");
        let mut personal = vec![
            PHONE.to_owned(),
            PHONE_DIGITS.to_owned(),
            BODY.to_owned(),
            "CONFORMANCE-77".to_owned(),
        ];
        let mut outcomes = String::new();
        for answer in [
            Answer::Accept,
            Answer::Busy,
            Answer::RateLimited,
            Answer::Invalid,
        ] {
            let mut delivery = delivery(case.as_ref());
            if !case.script(answer, &mut delivery) {
                continue;
            }
            personal.push(delivery.contact.identities["email"].clone());
            let result = adapter.deliver(&delivery).await;
            // Details go to the run timeline and to the worker's own log lines.
            let _ = writeln!(outcomes, "{result:?}");
        }
        let log = captured.text()[start..].to_owned() + &outcomes;
        for secret in case.secrets().into_iter().chain(personal) {
            if log.contains(&secret) {
                let line = log.lines().find(|l| l.contains(&secret)).unwrap_or("");
                failures.push(format!("{}: {secret:?} in: {line}", case.name()));
            }
        }
    }
    let log = captured.text();
    // The capture works: the SMS adapter's debug line and the webhook's HTTP span are in.
    assert!(
        log.contains("sending sms") && log.contains("http.request.method"),
        "nothing captured:\n{log}"
    );
    report("secrets and personal data in logs", &failures);
}

// 4. Timeouts bounded.

#[tokio::test]
async fn a_provider_that_never_answers_times_out_in_time() {
    let cases = cases().await;
    let hanging = Hanging::start().await;
    let mut failures = Vec::new();
    for case in &cases {
        let adapter = adapter(case.as_ref(), Some(hanging.addr), "500ms");
        let mut delivery = delivery(case.as_ref());
        case.script(Answer::Accept, &mut delivery);
        let connections = hanging.accepted();
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), adapter.deliver(&delivery))
            .await
            .unwrap_or_else(|_| Err(Error::permanent("still waiting after 10s")));
        let took = started.elapsed();
        if !matches!(result, Err(Error::Retryable { .. })) || took >= Duration::from_secs(3) {
            failures.push(format!(
                "{}: {result:?} after {took:?}, expected retryable within 3s",
                case.name()
            ));
        }
        // It did wait on the connection rather than fail at once.
        if hanging.accepted() == connections || took < Duration::from_millis(400) {
            failures.push(format!(
                "{}: did not wait on the hanging provider ({took:?}, {result:?})",
                case.name()
            ));
        }
    }
    report("bounded timeouts", &failures);
}

// 5. A slow provider never blocks other channels (real processes).

/// The worker's `concurrency` (per channel) in the end-to-end checks.
const CONCURRENCY: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_never_blocks_other_channels() {
    slow_and_fast(CONCURRENCY - 1).await;
}

/// The same with the slow deliveries holding every one of the slow channel's slots: each
/// channel has its own `concurrency` slots on the worker, and the scheduler fills them per
/// channel, so the fast channel's steps still go out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_holding_every_slot_never_blocks_other_channels() {
    slow_and_fast(CONCURRENCY).await;
}

/// One worker (`concurrency` [`CONCURRENCY`]) serving `slow`, a webhook to a provider that
/// never answers (timeout 60 s), and `fast`, a webhook to the stack's receiver: with
/// `slow_steps` slow deliveries hanging, three steps on `fast` are delivered.
async fn slow_and_fast(slow_steps: usize) {
    let hanging = Hanging::start().await;
    let mut stack = Stack::start(NODE, &[], &[]).await;
    let config = WorkerConfig {
        concurrency: u32::try_from(CONCURRENCY).expect("small"),
        channels: Vec::new(),
    }
    .channel(ChannelConfig::raw(
        "slow",
        "webhook",
        &format!("url = \"http://{}/hook\"\ntimeout = \"60s\"", hanging.addr),
    ))
    .channel(ChannelConfig::webhook(
        "fast",
        &stack.receiver.url(),
        SECRET_ENV,
    ));
    let _worker = WorkerNode::start(
        NODE,
        &stack.scheduler.endpoint(),
        "w-1",
        &config,
        &[(SECRET_ENV, &stack.secret)],
    );
    for channel in ["slow", "fast"] {
        stack
            .apply(&format!(
                "name: {channel}\nsteps:\n  - {{id: hello, action: send_message, \
                 channel: {channel}, template: hello}}\n"
            ))
            .await;
    }
    let mut slow_runs = Vec::new();
    for n in 0..slow_steps {
        let contact = contact(&format!("slow-{n}"), &[], &[]);
        slow_runs.push(stack.enroll("slow", contact, &request_id()).await.run_id);
    }
    assert!(
        eventually(Duration::from_secs(20), || async {
            hanging.accepted() >= slow_steps
        })
        .await,
        "the slow deliveries never reached the hanging provider ({} of {slow_steps})",
        hanging.accepted()
    );

    for n in 0..3 {
        let contact = contact(&format!("fast-{n}"), &[], &[]);
        let fast = stack.enroll("fast", contact, &request_id()).await.run_id;
        stack
            .client
            .wait_for_status(&fast, RunStatus::Completed, Duration::from_secs(15))
            .await;
    }
    assert_eq!(stack.receiver.count(), 3, "{}", stack.receiver.summary());
    // ... while every slow delivery is still on its first, hanging attempt.
    assert_eq!(
        hanging.accepted(),
        slow_steps,
        "a slow delivery was retried: its first attempt did not hang throughout"
    );
    for run_id in &slow_runs {
        let run = stack.client.run(run_id).await;
        assert_eq!(
            run.status,
            RunStatus::Active as i32,
            "{}",
            run_summary(&run)
        );
    }
}
