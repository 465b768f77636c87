//! No phone number, email address, message body or secret in any log line: a full
//! journey (with a retry and a permanent failure) runs with every process at debug level,
//! then every log is searched for them.

use std::time::Duration;

use touchpoint_proto::v1::{ApplyPlaybookRequest, Contact, EnrollRequest, RunStatus};
use touchpoint_tests::{
    ChannelConfig, Process, RedisServer, TouchpointClient, WebhookReceiver, WorkerConfig,
    WorkerNode, free_port, generate_secret, to_map,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);
const PHONE: &str = "+8613800138000";
const EMAIL: &str = "wang.fang@example.com";
const NAME: &str = "王芳";
const BODY: &str = "欢迎！新人券";

const PLAYBOOK: &str = r#"name: pii
steps:
  - id: coupon
    action: send_message
    channel: wecom
    template: "{{ contact.attrs.name }}，欢迎！新人券 {{ params.coupon }} 已到账 {{ contact.identities.phone }}"
    params: { coupon: WELCOME10 }
    retry: { initial: 100ms, max: 200ms }
  - id: remind
    action: send_message
    channel: wecom
    template: "{{ contact.identities.email }} 欢迎！新人券"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_logs_no_personal_data_or_secrets() {
    let redis = RedisServer::start();
    let receiver = WebhookReceiver::start().await;
    // coupon: 503 then 200 (a retry); remind: 400 (a permanent failure).
    receiver.respond_with(&[503, 200, 400]);
    let port = free_port();
    let debug = [("RUST_LOG", "debug")];
    let scheduler = Process::spawn_named(
        "scheduler",
        NODE,
        [
            "scheduler",
            "--redis-url",
            &redis.url(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        &debug,
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut client = TouchpointClient::connect(&endpoint, TIMEOUT).await;
    let secret = generate_secret();
    let config = WorkerConfig::new().channel(ChannelConfig::webhook(
        "wecom",
        &receiver.url(),
        "PII_SECRET",
    ));
    let mut worker = WorkerNode::start(
        NODE,
        &endpoint,
        "w-1",
        &config,
        &[("PII_SECRET", secret.as_str()), ("RUST_LOG", "debug")],
    );

    client
        .playbooks
        .apply_playbook(ApplyPlaybookRequest {
            yaml: PLAYBOOK.into(),
            dry_run: false,
        })
        .await
        .unwrap();
    let run_id = client
        .enrollments
        .enroll(EnrollRequest {
            playbook: "pii".into(),
            contact: Some(Contact {
                id: "c-9001".into(),
                attrs: to_map(&[("name", NAME)]),
                tags: vec!["paid".into()],
                tz: "Asia/Shanghai".into(),
                identities: to_map(&[("phone", PHONE), ("email", EMAIL)]),
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .run_id;
    let run = client
        .wait_for_status(&run_id, RunStatus::Failed, TIMEOUT)
        .await;
    assert_eq!(run.steps[0].attempts, 2, "the coupon was retried once");
    // The receiver did get the personal data: the search below is not vacuous.
    let delivered = receiver.requests();
    assert!(delivered.iter().any(|r| r.field("message").contains(PHONE)));

    let logs = [
        ("scheduler", scheduler.log()),
        ("worker", worker.process().log()),
    ];
    for (who, log) in &logs {
        assert!(
            log.lines().count() > 10,
            "{who} logged almost nothing at debug:\n{log}"
        );
        for (what, needle) in [
            ("phone number", PHONE),
            ("email address", EMAIL),
            ("contact name", NAME),
            ("message body", BODY),
            ("webhook secret", secret.as_str()),
            (
                "webhook secret (base64 part)",
                secret.trim_start_matches("whsec_"),
            ),
        ] {
            let hits: Vec<&str> = log.lines().filter(|line| line.contains(needle)).collect();
            assert!(
                hits.is_empty(),
                "the {who} log contains the {what}:\n{}",
                hits.join("\n")
            );
        }
    }
}
