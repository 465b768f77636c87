//! Security end to end, against real scheduler and worker processes and a real Redis:
//! every role against every RPC (over plaintext and over TLS), no token and a wrong token,
//! workers attaching with the right and the wrong role, mutual TLS, and a scheduler that
//! refuses to start on a bad auth file or bad TLS settings.

use std::{collections::HashMap, path::Path, time::Duration};

use tonic::{Code, Status};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use touchpoint_proto::{
    security::{self, ClientTls},
    v1::{
        ApplyPlaybookRequest, CancelRunRequest, EnrollRequest, GetPlaybookRequest, GetRunRequest,
        Hello, ListDeadLettersRequest, ListPlaybooksRequest, ListRunsRequest,
        RetryDeadLettersRequest, RunStatus, StepStatus, WorkerMessage,
        retry_dead_letters_request::Target, scheduler_message, worker_message,
    },
};
use touchpoint_tests::{
    ClientOptions, ROLES, RedisServer, SchedulerNode, Security, Stack, TouchpointClient, contact,
    eventually, request_id,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

/// Who may call what, as docs/security.md promises it; written out here, apart from the
/// scheduler's own table, so that a change to either shows up as a failure.
const EXPECTED: &[(&str, &[&str])] = &[
    ("PlaybookService/ApplyPlaybook", &["admin", "marketer"]),
    (
        "PlaybookService/GetPlaybook",
        &["admin", "marketer", "viewer"],
    ),
    (
        "PlaybookService/ListPlaybooks",
        &["admin", "marketer", "viewer"],
    ),
    (
        "EnrollmentService/Enroll",
        &["admin", "marketer", "service"],
    ),
    ("RunService/GetRun", &["admin", "marketer", "viewer"]),
    ("RunService/ListRuns", &["admin", "marketer", "viewer"]),
    ("RunService/CancelRun", &["admin", "marketer"]),
    (
        "DeadLetterService/ListDeadLetters",
        &["admin", "marketer", "viewer"],
    ),
    ("DeadLetterService/RetryDeadLetters", &["admin", "marketer"]),
    ("WorkerService/Attach", &["admin", "worker"]),
];

const PLAYBOOK_YAML: &str = "name: auth-matrix
steps:
  - id: hello
    action: send_message
    channel: wecom
    template: \"hi\"
";

/// Calls `rpc` with a harmless request (a dry run, unknown names and ids) and returns
/// how it ended: `Ok` or the status. Only the authorization outcome matters here.
async fn call(client: &mut TouchpointClient, rpc: &str) -> Result<(), Status> {
    match rpc {
        "PlaybookService/ApplyPlaybook" => client
            .playbooks
            .apply_playbook(ApplyPlaybookRequest {
                yaml: PLAYBOOK_YAML.to_owned(),
                dry_run: true,
            })
            .await
            .map(drop),
        "PlaybookService/GetPlaybook" => client
            .playbooks
            .get_playbook(GetPlaybookRequest {
                name: "auth-matrix".to_owned(),
                ..GetPlaybookRequest::default()
            })
            .await
            .map(drop),
        "PlaybookService/ListPlaybooks" => client
            .playbooks
            .list_playbooks(ListPlaybooksRequest {})
            .await
            .map(drop),
        "EnrollmentService/Enroll" => client
            .enrollments
            .enroll(EnrollRequest {
                playbook: "auth-matrix".to_owned(),
                contact: Some(contact("c-auth", &[], &[])),
                request_id: request_id(),
            })
            .await
            .map(drop),
        "RunService/GetRun" => client
            .runs
            .get_run(GetRunRequest {
                run_id: "no-such-run".to_owned(),
            })
            .await
            .map(drop),
        "RunService/ListRuns" => client
            .runs
            .list_runs(ListRunsRequest::default())
            .await
            .map(drop),
        "RunService/CancelRun" => client
            .runs
            .cancel_run(CancelRunRequest {
                run_id: "no-such-run".to_owned(),
            })
            .await
            .map(drop),
        "DeadLetterService/ListDeadLetters" => client
            .dead_letters
            .list_dead_letters(ListDeadLettersRequest::default())
            .await
            .map(drop),
        "DeadLetterService/RetryDeadLetters" => client
            .dead_letters
            .retry_dead_letters(RetryDeadLettersRequest {
                target: Some(Target::RunId("no-such-run".to_owned())),
            })
            .await
            .map(drop),
        "WorkerService/Attach" => attach(client).await,
        other => panic!("no call for {other}"),
    }
}

/// Opens a worker stream (Hello with no channels) and reads the Welcome.
async fn attach(client: &mut TouchpointClient) -> Result<(), Status> {
    let hello = WorkerMessage {
        kind: Some(worker_message::Kind::Hello(Hello {
            worker_id: "auth-matrix".to_owned(),
            channels: Vec::new(),
            capacity: 1,
            ..Hello::default()
        })),
    };
    let mut stream = client
        .workers
        .attach(tokio_stream::iter([hello]))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no Welcome within 10s"))??;
    match first.and_then(|m| m.kind) {
        Some(scheduler_message::Kind::Welcome(_)) => Ok(()),
        other => Err(Status::internal(format!("expected Welcome, got {other:?}"))),
    }
}

fn is_auth_code(code: Code) -> bool {
    matches!(code, Code::Unauthenticated | Code::PermissionDenied)
}

/// Every role against every RPC, then no token and a wrong token against every RPC;
/// returns one line per mismatch.
async fn role_matrix(security: Security) {
    let redis = RedisServer::start();
    let mut scheduler = SchedulerNode::start_secured(NODE, &redis.url(), &[], &security);
    let _ready = scheduler.client().await;
    let endpoint = scheduler.endpoint();
    let mut mismatches = Vec::new();
    let mut matrix = String::new();

    for role in ROLES {
        let mut client = TouchpointClient::open(&endpoint, &security.client(role))
            .await
            .unwrap_or_else(|e| panic!("{role}: cannot connect to {endpoint}: {e}"));
        matrix.push_str(&format!("{role:<9}"));
        for (rpc, allowed) in EXPECTED {
            let outcome = call(&mut client, rpc).await;
            let code = outcome.as_ref().map_or_else(Status::code, |()| Code::Ok);
            matrix.push_str(&format!(" {rpc}={code:?}"));
            if allowed.contains(&role) {
                if is_auth_code(code) {
                    mismatches.push(format!("{role} {rpc}: expected allowed, got {outcome:?}"));
                }
            } else {
                let method = format!("touchpoint.v1.{rpc}");
                match &outcome {
                    Err(status)
                        if status.code() == Code::PermissionDenied
                            && status.message().contains(&format!("role {role} "))
                            && status.message().contains(&method) => {}
                    _ => mismatches.push(format!(
                        "{role} {rpc}: expected PERMISSION_DENIED naming the role and {method}, got {outcome:?}"
                    )),
                }
            }
        }
        matrix.push('\n');
    }

    let tls = security.client_tls();
    let strangers = [
        ("no token", None),
        ("a wrong token", Some("tp_not-a-known-token".to_owned())),
        (
            "the hash instead of the token",
            Some(touchpoint_tests::sha256_hex(
                &security.token("admin").unwrap_or_default(),
            )),
        ),
    ];
    for (who, token) in strangers {
        let options = ClientOptions {
            tls: tls.clone(),
            token,
        };
        let mut client = TouchpointClient::open(&endpoint, &options)
            .await
            .unwrap_or_else(|e| panic!("{who}: cannot connect to {endpoint}: {e}"));
        for (rpc, _) in EXPECTED {
            match call(&mut client, rpc).await {
                Err(status) if status.code() == Code::Unauthenticated => {}
                other => mismatches.push(format!(
                    "{who} {rpc}: expected UNAUTHENTICATED, got {other:?}"
                )),
            }
        }
    }

    // Health stays open, token or not, so probes work.
    let channel = security::client_endpoint(&endpoint, &tls)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect for health");
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    if let Err(status) = health {
        mismatches.push(format!("health check without a token: {status:?}"));
    }

    let log = scheduler.process().log();
    for role in ROLES {
        let token = security.token(role).unwrap_or_default();
        assert!(
            !log.contains(&token),
            "the {role} token is in the scheduler's log"
        );
    }
    assert!(
        log.contains("call refused"),
        "refusals are logged (without tokens)"
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}\n\nmatrix:\n{matrix}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_rpc_over_plaintext() {
    role_matrix(Security::plaintext().with_tokens()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_rpc_over_tls() {
    security::install_crypto_provider();
    role_matrix(Security::tls().with_tokens()).await;
}

/// A worker with the `worker` token attaches over TLS and delivers; one with a `viewer`
/// token is refused with PERMISSION_DENIED and one with no token with UNAUTHENTICATED, and
/// neither ever takes a step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_worker_token_attaches_and_delivers() {
    security::install_crypto_provider();
    let security = Security::tls().with_tokens();
    let mut stack = Stack::start_secured(NODE, &[], &["wecom"], security.clone()).await;
    let viewer = security.token("viewer");
    stack.start_worker_with_token("w-viewer", viewer.as_deref());
    stack.start_worker_with_token("w-anonymous", None);

    let refused = eventually(TIMEOUT, || {
        let viewer_log = stack.worker("w-viewer").process().log();
        let anonymous_log = stack.worker("w-anonymous").process().log();
        async move {
            viewer_log.contains(
                "PermissionDenied: role viewer may not call touchpoint.v1.WorkerService/Attach",
            ) && anonymous_log.contains("Unauthenticated: missing bearer token")
        }
    })
    .await;
    assert!(
        refused,
        "the viewer and token-less workers were not refused:\n{}\n{}",
        stack.worker("w-viewer").process().log_tail(20),
        stack.worker("w-anonymous").process().log_tail(20)
    );

    stack.apply(PLAYBOOK_YAML).await;
    let mut runs = Vec::new();
    for i in 0..4 {
        let contact = contact(&format!("c-{i}"), &[], &[]);
        runs.push(
            stack
                .enroll("auth-matrix", contact, &request_id())
                .await
                .run_id,
        );
    }
    for run_id in &runs {
        let run = stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
        let step = &run.steps[0];
        assert_eq!(step.status(), StepStatus::Done, "{run:?}");
        assert_eq!(
            step.worker, "w-1",
            "only the worker token delivers: {run:?}"
        );
    }
    assert_eq!(
        stack.receiver.count(),
        runs.len(),
        "{}",
        stack.receiver.summary()
    );

    for name in ["w-1", "w-viewer", "w-anonymous"] {
        let log = stack.worker(name).process().log();
        for role in ROLES {
            let token = security.token(role).unwrap_or_default();
            assert!(!log.contains(&token), "a token is in {name}'s log");
        }
    }
}

/// Under mutual TLS a client needs a certificate signed by the client CA: none, one from
/// another CA, a client that does not trust the server's CA and a plaintext client all
/// fail; the right certificate gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_certificate_signed_by_the_client_ca() {
    security::install_crypto_provider();
    let security = Security::mutual_tls();
    let pki = security.pki.clone().expect("TLS is on");
    let redis = RedisServer::start();
    let mut scheduler = SchedulerNode::start_secured(NODE, &redis.url(), &[], &security);
    let mut client = scheduler.client().await;
    client
        .playbooks
        .list_playbooks(ListPlaybooksRequest {})
        .await
        .expect("a client with a certificate signed by the client CA gets in");
    let endpoint = scheduler.endpoint();

    let refused = [
        (
            "no client certificate",
            ClientTls {
                ca: Some(pki.ca()),
                ..ClientTls::default()
            },
        ),
        (
            "a certificate from another CA",
            ClientTls {
                ca: Some(pki.ca()),
                cert: Some(pki.rogue_cert()),
                key: Some(pki.rogue_key()),
            },
        ),
        (
            "not trusting the server's CA",
            ClientTls {
                ca: Some(pki.client_ca()),
                cert: Some(pki.client_cert()),
                key: Some(pki.client_key()),
            },
        ),
    ];
    for (who, tls) in refused {
        let options = ClientOptions { tls, token: None };
        let result = TouchpointClient::try_connect_with(&endpoint, &options).await;
        assert!(result.is_err(), "a client with {who} got in");
    }
    let plaintext = endpoint.replace("https://", "http://");
    let result = TouchpointClient::try_connect_with(&plaintext, &ClientOptions::default()).await;
    assert!(result.is_err(), "a plaintext client got in");

    // Without an auth file the scheduler says it accepts only loopback clients.
    let log = scheduler.process().log();
    assert!(
        log.contains("transport=\"mutual TLS\"") || log.contains("transport=mutual TLS"),
        "{log}"
    );
    assert!(log.contains("accepting only loopback clients"), "{log}");
}

/// Starts a scheduler that should refuse to start and returns its log once it exited.
async fn refused_start(redis: &RedisServer, flags: &[&str]) -> String {
    let mut scheduler = SchedulerNode::start(NODE, &redis.url(), flags);
    let exited = eventually(TIMEOUT, || {
        let running = scheduler.is_running();
        async move { !running }
    })
    .await;
    let log = scheduler.process().log();
    assert!(exited, "the scheduler started with {flags:?}:\n{log}");
    log
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path.to_string_lossy().into_owned()
}

/// A bad auth file or bad TLS settings stop the start with a message naming the line and
/// field, or the setting and the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_security_settings_stop_the_start_with_a_clear_message() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temporary folder");
    let pki = touchpoint_tests::TestPki::generate();
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let hash = "a".repeat(64);
    let cases: HashMap<&str, (Vec<String>, &str)> = [
        (
            "bad role",
            (
                vec![
                    "--auth-file".to_owned(),
                    write(
                        dir.path(),
                        "role.toml",
                        &format!("[[token]]\nname = \"crm\"\nrole = \"root\"\nsha256 = \"{hash}\"\n"),
                    ),
                ],
                "line 3: token[0].role: unknown role \"root\" (expected one of admin, marketer, service, worker, viewer)",
            ),
        ),
        (
            "unknown key",
            (
                vec![
                    "--auth-file".to_owned(),
                    write(
                        dir.path(),
                        "key.toml",
                        &format!("[[token]]\nname = \"crm\"\nrole = \"admin\"\nsha256 = \"{hash}\"\ntoken = \"s3cret\"\n"),
                    ),
                ],
                "line 5: token[0]",
            ),
        ),
        (
            "missing auth file",
            (
                vec!["--auth-file".to_owned(), "/nonexistent/auth.toml".to_owned()],
                "cannot use the auth file /nonexistent/auth.toml (TOUCHPOINT_AUTH_FILE): cannot read the file",
            ),
        ),
        (
            "unreadable certificate",
            (
                vec![
                    "--tls-cert".to_owned(),
                    "/nonexistent/cert.pem".to_owned(),
                    "--tls-key".to_owned(),
                    "/nonexistent/key.pem".to_owned(),
                ],
                "cannot set up TLS: TOUCHPOINT_TLS_CERT /nonexistent/cert.pem: cannot read",
            ),
        ),
        (
            "a certificate that is not PEM",
            (
                vec![
                    "--tls-cert".to_owned(),
                    write(dir.path(), "cert.pem", "hello\n"),
                    "--tls-key".to_owned(),
                    write(dir.path(), "key.pem", "hello\n"),
                ],
                "no PEM certificate",
            ),
        ),
        (
            "a key that is not the certificate's",
            (
                vec![
                    "--tls-cert".to_owned(),
                    path(pki.server_cert()),
                    "--tls-key".to_owned(),
                    path(pki.client_key()),
                ],
                "cannot set up TLS: TOUCHPOINT_TLS_KEY is not the private key of TOUCHPOINT_TLS_CERT",
            ),
        ),
        (
            "a certificate without its key",
            (
                vec!["--tls-cert".to_owned(), "/nonexistent/cert.pem".to_owned()],
                "--tls-key",
            ),
        ),
    ]
    .into_iter()
    .collect();
    for (case, (flags, expected)) in &cases {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let log = refused_start(&redis, &flags).await;
        assert!(
            log.contains(expected),
            "{case}: expected {expected:?} in:\n{log}"
        );
        assert!(
            !log.contains("s3cret"),
            "{case}: a secret from the file is in the log"
        );
    }
}
