//! Redis over TLS (`rediss://`): the scheduler checks Redis's certificate against
//! `--redis-ca-file` and presents `--redis-cert`/`--redis-key` to a Redis that asks for
//! a client certificate; without them it refuses to start, saying why.

use std::time::Duration;

use redis::AsyncCommands as _;
use touchpoint_proto::v1::{ApplyPlaybookRequest, EnrollRequest};
use touchpoint_tests::{
    ChannelConfig, RedisServer, SECRET_ENV, SchedulerNode, TestPki, WebhookReceiver, WorkerConfig,
    WorkerNode, contact, eventually, generate_secret, request_id,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

/// A Redis serving TLS with the PKI's server certificate and asking clients for one
/// signed by the PKI's client CA.
fn tls_redis(pki: &TestPki) -> RedisServer {
    RedisServer::start_tls(
        &pki.server_cert(),
        &pki.server_key(),
        Some(&pki.client_ca()),
    )
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// Over mutual TLS, a playbook is stored and a run goes all the way to the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_uses_redis_over_mutual_tls() {
    let pki = TestPki::generate();
    let redis = tls_redis(&pki);
    let receiver = WebhookReceiver::start().await;
    let (ca, cert, key) = (
        path(&pki.ca()),
        path(&pki.client_cert()),
        path(&pki.client_key()),
    );
    let flags = [
        "--redis-ca-file",
        ca.as_str(),
        "--redis-cert",
        cert.as_str(),
        "--redis-key",
        key.as_str(),
    ];
    let mut scheduler = SchedulerNode::start(NODE, &redis.tls_url(), &flags);
    let mut client = scheduler.client().await;
    client
        .playbooks
        .apply_playbook(ApplyPlaybookRequest {
            yaml: "name: tls\nsteps:\n  - {id: hello, action: send_message, channel: wecom}\n"
                .to_owned(),
            ..ApplyPlaybookRequest::default()
        })
        .await
        .unwrap_or_else(|e| panic!("apply: {e}"));
    let secret = generate_secret();
    let config =
        WorkerConfig::new().channel(ChannelConfig::webhook("wecom", &receiver.url(), SECRET_ENV));
    let _worker = WorkerNode::start(
        NODE,
        &scheduler.endpoint(),
        "w-1",
        &config,
        &[(SECRET_ENV, &secret)],
    );
    client
        .enrollments
        .enroll(EnrollRequest {
            playbook: "tls".to_owned(),
            contact: Some(contact("c-1", &[], &[])),
            request_id: request_id(),
        })
        .await
        .unwrap_or_else(|e| panic!("enroll: {e}"));
    let requests = receiver.wait_for(1, TIMEOUT).await;
    assert_eq!(requests[0].step(), "hello");

    // The state is in that Redis (read through its plain port).
    let mut plain = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("plain connection");
    let keys: Vec<String> = plain.keys("tp:playbook*").await.expect("KEYS");
    assert!(!keys.is_empty(), "no playbook in the TLS Redis");
}

/// Without the CA, Redis's certificate is not trusted; without a client certificate,
/// Redis refuses the connection: either way the scheduler exits, naming the Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_that_cannot_trust_or_satisfy_redis_refuses_to_start() {
    let pki = TestPki::generate();
    let redis = tls_redis(&pki);
    let ca = path(&pki.ca());
    for (flags, why) in [
        (vec![], "UnknownIssuer"),
        (vec!["--redis-ca-file", ca.as_str()], "CertificateRequired"),
    ] {
        let mut scheduler = SchedulerNode::start(NODE, &redis.tls_url(), &flags);
        let process = scheduler.process();
        let exited = eventually(TIMEOUT, || {
            let running = process.is_running();
            async move { !running }
        })
        .await;
        let log = scheduler.process().log();
        assert!(exited, "{flags:?}: still running:\n{log}");
        assert!(
            log.contains(&format!("cannot use Redis at {}", redis.tls_url())) && log.contains(why),
            "{flags:?}: expected {why}:\n{log}"
        );
    }
}
