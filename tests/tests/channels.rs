//! SMS and e-mail end to end: playbooks with `sms` and `smtp` steps delivered by real
//! worker processes to real local servers: an Aliyun-compatible SMS API that verifies every
//! signature on its own, a generic HTTP SMS gateway, and aiosmtpd over STARTTLS (with AUTH)
//! and implicit TLS, trusting a throwaway CA through `ca_file`.

use std::time::Duration;

use touchpoint_proto::v1::{Contact, Run, RunStatus, StepRecord};
use touchpoint_tests::{
    ChannelConfig, SmsServer, SmtpServer, SmtpTls, Stack, WorkerConfig, WorkerNode, request_id,
    run_summary, to_map,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(60);
const PHONE: &str = "+8613800001234";
const ACCESS_KEY_ID: &str = "LTAI-test-key";
const ACCESS_KEY_SECRET: &str = "aliyun-test-secret";

fn customer(id: &str, email: &str) -> Contact {
    Contact {
        id: id.to_owned(),
        attrs: to_map(&[("name", "王芳")]),
        tags: Vec::new(),
        tz: String::new(),
        identities: to_map(&[("phone", PHONE), ("email", email)]),
    }
}

fn step<'a>(run: &'a Run, id: &str) -> &'a StepRecord {
    run.steps
        .iter()
        .find(|s| s.step_id == id)
        .unwrap_or_else(|| panic!("no step {id}: {}", run_summary(run)))
}

const RETRY: &str = "retry = { max_attempts = 3, initial = \"100ms\", max = \"200ms\" }";

fn aliyun_channel(name: &str, sms: &SmsServer, secret_env: &str) -> ChannelConfig {
    ChannelConfig::raw(
        name,
        "sms",
        &format!(
            "provider = \"aliyun\"\nurl = \"{}\"\naccess_key_id = \"{ACCESS_KEY_ID}\"\n\
             access_key_secret_env = \"{secret_env}\"\nsign_name = \"品牌商城\"\n\
             template_code = \"SMS_100\"\ntimeout = \"5s\"\n{RETRY}",
            sms.aliyun_url()
        ),
    )
}

fn smtp_channel(name: &str, smtp: &SmtpServer, login: bool) -> ChannelConfig {
    let mut toml = format!(
        "host = \"localhost\"\nport = {}\ntls = \"{}\"\nfrom = \"Brand <news@brand.example>\"\n\
         ca_file = {:?}\ntimeout = \"10s\"\n{RETRY}\n",
        smtp.port(),
        smtp.tls().setting(),
        smtp.ca_file().to_string_lossy()
    );
    if login {
        toml.push_str("username = \"mailer\"\npassword_env = \"TEST_SMTP_PASSWORD\"\n");
    }
    ChannelConfig::raw(name, "smtp", &toml)
}

const JOURNEY: &str = r#"
name: sms-and-mail
steps:
  - id: sms
    action: send_message
    channel: sms
    params: { code: "8888", amount: 20 }
  - id: gateway
    action: send_message
    channel: sms-gw
    template: "{{ contact.attrs.name }}，您的券已到账"
  - id: mail
    action: send_message
    channel: mail
    template: "Hello {{ contact.attrs.name }}, welcome aboard."
    params: { subject: "Welcome aboard", html: "<p>Hello <b>{{ contact.attrs.name }}</b></p>" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_and_email_steps_reach_real_servers() {
    touchpoint_tests::python::python();
    let sms = SmsServer::start(ACCESS_KEY_ID, ACCESS_KEY_SECRET).await;
    let smtp = SmtpServer::start(SmtpTls::StartTls, Some(("mailer", "mail-pass")));
    let mut stack = Stack::start(NODE, &[], &[]).await;
    let config = WorkerConfig::new()
        .channel(aliyun_channel("sms", &sms, "TEST_ALIYUN_SECRET"))
        .channel(ChannelConfig::raw(
            "sms-gw",
            "sms",
            &format!(
                "provider = \"generic\"\nurl = \"{}\"\nformat = \"form\"\n\
                 fields = {{ to = \"{{phone}}\", text = \"{{message}}\", ref = \"tp-{{idempotency_key}}\" }}\n\
                 token_env = \"TEST_SMS_TOKEN\"\n{RETRY}",
                sms.generic_url()
            ),
        ))
        .channel(smtp_channel("mail", &smtp, true));
    let mut worker = WorkerNode::start(
        NODE,
        &stack.scheduler.endpoint(),
        "w-1",
        &config,
        &[
            ("TEST_ALIYUN_SECRET", ACCESS_KEY_SECRET),
            ("TEST_SMS_TOKEN", "gw-token"),
            ("TEST_SMTP_PASSWORD", "mail-pass"),
        ],
    );
    stack.apply(JOURNEY).await;
    let run_id = stack
        .enroll(
            "sms-and-mail",
            customer("c-1", "wang.fang@example.com"),
            &request_id(),
        )
        .await
        .run_id;
    let run = stack
        .client
        .wait_for_status(&run_id, RunStatus::Completed, TIMEOUT)
        .await;

    // Aliyun: one signed SendSms (the server checked the signature), OutId = idempotency key.
    let requests = sms.aliyun_requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    let sent = &requests[0];
    assert_eq!(sent.code, "OK");
    assert_eq!(sent.param("PhoneNumbers"), PHONE);
    assert_eq!(sent.param("OutId"), format!("{run_id}.sms"));
    assert_eq!(sent.param("SignName"), "品牌商城");
    assert_eq!(sent.param("TemplateCode"), "SMS_100");
    assert_eq!(
        sent.param("TemplateParam"),
        r#"{"amount":"20","code":"8888"}"#
    );
    assert!(
        step(&run, "sms").detail.starts_with("aliyun OK BizId="),
        "{}",
        run_summary(&run)
    );

    // The generic gateway: a form with the configured fields and the bearer token.
    let posts = sms.generic_requests();
    assert_eq!(posts.len(), 1, "{posts:#?}");
    let post = &posts[0];
    assert_eq!(post.content_type, "application/x-www-form-urlencoded");
    assert_eq!(post.authorization, "Bearer gw-token");
    assert_eq!(post.fields["to"], PHONE);
    assert_eq!(post.fields["text"], "王芳，您的券已到账");
    assert_eq!(post.fields["ref"], format!("tp-{run_id}.gateway"));
    assert_eq!(post.idempotency_key, format!("{run_id}.gateway"));
    assert_eq!(step(&run, "gateway").detail, "HTTP 200");

    // The e-mail: over STARTTLS with AUTH, multipart/alternative, a stable Message-ID.
    let mails = smtp.accepted();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.header("Subject").as_deref(), Some("Welcome aboard"));
    assert_eq!(mail.header("To").as_deref(), Some("wang.fang@example.com"));
    assert!(
        mail.header("From")
            .is_some_and(|from| from.contains("news@brand.example")),
        "{}",
        mail.raw
    );
    assert!(
        mail.header("Content-Type")
            .is_some_and(|t| t.starts_with("multipart/alternative")),
        "{}",
        mail.raw
    );
    assert!(mail.raw.contains("text/plain") && mail.raw.contains("text/html"));
    let message_id = mail.header("Message-ID").unwrap_or_default();
    assert!(
        message_id.starts_with('<') && message_id.ends_with("@brand.example>"),
        "{message_id}"
    );
    assert_eq!(
        message_id.len(),
        "<@brand.example>".len() + 32,
        "{message_id}"
    );
    assert!(
        step(&run, "mail").detail.starts_with("SMTP 250"),
        "{}",
        run_summary(&run)
    );

    // Phone numbers and e-mail addresses never reach the worker's log.
    let log = worker.process().log();
    for secret in [
        "13800001234",
        "wang.fang@example.com",
        ACCESS_KEY_SECRET,
        "mail-pass",
    ] {
        assert!(!log.contains(secret), "{secret} leaked into the worker log");
    }
}

/// aiosmtpd over implicit TLS, a stack with a worker whose channel `mail` sends to it, and
/// playbook `mail` (one e-mail).
async fn mail_stack() -> (SmtpServer, Stack, WorkerNode) {
    touchpoint_tests::python::python();
    let smtp = SmtpServer::start(SmtpTls::Implicit, None);
    let mut stack = Stack::start(NODE, &[], &[]).await;
    let config = WorkerConfig::new().channel(smtp_channel("mail", &smtp, false));
    let worker = WorkerNode::start(NODE, &stack.scheduler.endpoint(), "w-1", &config, &[]);
    stack
        .apply(
            "name: mail\nsteps:\n  - {id: mail, action: send_message, channel: mail, \
             template: hello, params: {subject: Hi}}\n",
        )
        .await;
    (smtp, stack, worker)
}

/// Enrolls `contact_id` (e-mail `address`) into `mail` and waits for the run to end as
/// `status`.
async fn mail(stack: &mut Stack, contact_id: &str, address: &str, status: RunStatus) -> Run {
    let run_id = stack
        .enroll("mail", customer(contact_id, address), &request_id())
        .await
        .run_id;
    stack.client.wait_for_status(&run_id, status, TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_retries_a_4xx_with_the_same_message_id_and_fails_on_a_5xx() {
    let (smtp, mut stack, _worker) = mail_stack().await;

    let run = mail(
        &mut stack,
        "c-1",
        "tempfail-once@example.com",
        RunStatus::Completed,
    )
    .await;
    assert_eq!(step(&run, "mail").attempts, 2, "{}", run_summary(&run));
    let (rejected, accepted) = (smtp.rejected(), smtp.accepted());
    assert_eq!((rejected.len(), accepted.len()), (1, 1));
    let first = rejected[0].header("Message-ID");
    assert!(first.is_some(), "{}", rejected[0].raw);
    assert_eq!(first, accepted[0].header("Message-ID"));
    assert_eq!(accepted[0].header("Subject").as_deref(), Some("Hi"));
    assert!(
        accepted[0]
            .header("Content-Type")
            .is_some_and(|t| t.starts_with("text/plain"))
    );

    let run = mail(&mut stack, "c-2", "reject@example.com", RunStatus::Failed).await;
    let sent = step(&run, "mail");
    assert_eq!(sent.attempts, 1, "{}", run_summary(&run));
    assert!(sent.detail.starts_with("SMTP 550"), "{}", run_summary(&run));
    assert!(
        !sent.detail.contains("reject@example.com"),
        "{}",
        sent.detail
    );
}

/// An SMTP server that answers "sending rate limit exceeded" asks the sender to slow
/// down: the step is retried and the channel held back for every worker, as for an
/// HTTP 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_throttling_holds_the_channel_back() {
    let (smtp, mut stack, _worker) = mail_stack().await;
    let run = mail(
        &mut stack,
        "c-1",
        "throttled-once@example.com",
        RunStatus::Completed,
    )
    .await;
    assert_eq!(step(&run, "mail").attempts, 2, "{}", run_summary(&run));
    assert_eq!((smtp.rejected().len(), smtp.accepted().len()), (1, 1));
    let log = stack.scheduler.process().log();
    assert!(
        log.contains("the provider asked to slow down; the channel is held back")
            && log.contains("channel=mail"),
        "{}",
        stack.scheduler.process().log_tail(20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_answers_are_classified() {
    let sms = SmsServer::start(ACCESS_KEY_ID, ACCESS_KEY_SECRET).await;
    let mut stack = Stack::start(NODE, &[], &[]).await;
    let config = WorkerConfig::new()
        .channel(aliyun_channel("sms", &sms, "TEST_ALIYUN_SECRET"))
        .channel(aliyun_channel("sms-wrong-key", &sms, "TEST_WRONG_SECRET"))
        .channel(ChannelConfig::raw(
            "sms-gw",
            "sms",
            &format!(
                "provider = \"generic\"\nurl = \"{}\"\nformat = \"json\"\n{RETRY}",
                sms.generic_url()
            ),
        ));
    let _worker = WorkerNode::start(
        NODE,
        &stack.scheduler.endpoint(),
        "w-1",
        &config,
        &[
            ("TEST_ALIYUN_SECRET", ACCESS_KEY_SECRET),
            ("TEST_WRONG_SECRET", "not-the-secret"),
        ],
    );
    for channel in ["sms", "sms-wrong-key", "sms-gw"] {
        stack
            .apply(&format!(
                "name: {channel}\nsteps:\n  - {{id: text, action: send_message, channel: {channel}, \
                 template: hello}}\n"
            ))
            .await;
    }
    // A new contact each time: enrolling the same one again would find its run.
    let contacts = std::sync::atomic::AtomicUsize::new(0);
    let enroll_and_wait = async |stack: &mut Stack, playbook: &str, status: RunStatus| {
        let n = contacts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let run_id = stack
            .enroll(
                playbook,
                customer(&format!("c-{n}"), "a@example.com"),
                &request_id(),
            )
            .await
            .run_id;
        stack.client.wait_for_status(&run_id, status, TIMEOUT).await
    };

    // Rate limited, then delivered.
    sms.script_codes(&["isv.BUSINESS_LIMIT_CONTROL", "OK"]);
    let run = enroll_and_wait(&mut stack, "sms", RunStatus::Completed).await;
    assert_eq!(step(&run, "text").attempts, 2, "{}", run_summary(&run));
    // A wrong number fails at once.
    sms.script_codes(&["isv.MOBILE_NUMBER_ILLEGAL"]);
    let run = enroll_and_wait(&mut stack, "sms", RunStatus::Failed).await;
    let text = step(&run, "text");
    assert_eq!(text.attempts, 1, "{}", run_summary(&run));
    assert!(
        text.detail.starts_with("aliyun isv.MOBILE_NUMBER_ILLEGAL"),
        "{}",
        text.detail
    );
    // A provider-side error is retried.
    sms.script_codes(&["isp.SYSTEM_ERROR", "OK"]);
    let run = enroll_and_wait(&mut stack, "sms", RunStatus::Completed).await;
    assert_eq!(step(&run, "text").attempts, 2, "{}", run_summary(&run));
    // A wrong secret: the server's own verification says SignatureDoesNotMatch.
    let run = enroll_and_wait(&mut stack, "sms-wrong-key", RunStatus::Failed).await;
    let text = step(&run, "text");
    assert_eq!(text.attempts, 1, "{}", run_summary(&run));
    assert!(
        text.detail.starts_with("aliyun SignatureDoesNotMatch"),
        "{}",
        text.detail
    );
    assert!(
        sms.aliyun_requests()
            .iter()
            .any(|r| r.code == "SignatureDoesNotMatch")
    );

    // The generic gateway: 503 retried, 429 retried, 400 fails.
    sms.script_statuses(&[503, 429, 200]);
    let run = enroll_and_wait(&mut stack, "sms-gw", RunStatus::Completed).await;
    assert_eq!(step(&run, "text").attempts, 3, "{}", run_summary(&run));
    sms.script_statuses(&[400]);
    let run = enroll_and_wait(&mut stack, "sms-gw", RunStatus::Failed).await;
    assert_eq!(
        step(&run, "text").detail,
        "HTTP 400",
        "{}",
        run_summary(&run)
    );
    let posts = sms.generic_requests();
    let first = &posts[0];
    assert_eq!(first.content_type, "application/json");
    assert_eq!(first.fields["to"], PHONE);
    assert_eq!(first.fields["text"], "hello");
    assert!(
        posts
            .iter()
            .take(3)
            .all(|p| p.fields["ref"] == first.fields["ref"])
    );
}
