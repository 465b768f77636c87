//! `tp` against a scheduler that requires mutual TLS and bearer tokens (a real
//! redis-server; the scheduler in this process): the right certificate and a `marketer`
//! token work; a `viewer` token reads but may not apply; no token, no client certificate
//! and a plaintext address each fail with a one-line error that says what to do.

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use clap::Parser as _;
use tokio_util::sync::CancellationToken;
use touchpoint_proto::security::install_crypto_provider;
use touchpoint_scheduler::SchedulerArgs;
use touchpoint_tests::{RedisServer, Security};

const TP: &str = env!("CARGO_BIN_EXE_tp");
const TIMEOUT: Duration = Duration::from_secs(30);

const PLAYBOOK: &str = "name: tp-secured
steps:
  - id: hello
    action: send_message
    channel: console
    template: \"hi\"
";

/// `tp ARGS...` with exactly `env` (nothing inherited).
fn tp(env: &[(&str, String)], args: &[&str]) -> Output {
    Command::new(TP)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .args(args)
        .output()
        .expect("run tp")
}

fn text(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tp_over_mutual_tls_with_tokens() {
    install_crypto_provider();
    let security = Security::mutual_tls().with_tokens();
    let pki = security.pki.clone().expect("TLS is on");
    let redis = RedisServer::start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let addr = listener.local_addr().expect("the address");
    let redis_url = redis.url();
    let listen = addr.to_string();
    let mut argv: Vec<String> = [
        "touchpoint-scheduler",
        "--redis-url",
        &redis_url,
        "--listen",
        &listen,
    ]
    .iter()
    .map(|&a| a.to_owned())
    .collect();
    argv.extend(security.scheduler_flags());
    let args = SchedulerArgs::parse_from(argv);
    let stop = CancellationToken::new();
    let scheduler = tokio::spawn(touchpoint_scheduler::run(
        args,
        listener,
        stop.clone().cancelled_owned(),
    ));

    let dir = tempfile::tempdir().expect("a temporary folder");
    let playbook = dir.path().join("playbook.yaml");
    std::fs::write(&playbook, PLAYBOOK).expect("write the playbook");
    let playbook = playbook.to_string_lossy().into_owned();
    let path = |p: std::path::PathBuf| p.to_string_lossy().into_owned();
    let server = format!("https://localhost:{}", addr.port());
    let tls = vec![
        ("TOUCHPOINT_SERVER", server.clone()),
        ("TOUCHPOINT_CA", path(pki.ca())),
        ("TOUCHPOINT_TLS_CLIENT_CERT", path(pki.client_cert())),
        ("TOUCHPOINT_TLS_CLIENT_KEY", path(pki.client_key())),
    ];
    let as_role = |role: &str| {
        let mut env = tls.clone();
        env.push(("TOUCHPOINT_TOKEN", security.token(role).unwrap_or_default()));
        env
    };
    let marketer = as_role("marketer");

    let run = |env: Vec<(&'static str, String)>, args: Vec<&'static str>| {
        let playbook = playbook.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args
                .into_iter()
                .map(|a| {
                    if a == "PLAYBOOK" {
                        playbook.as_str()
                    } else {
                        a
                    }
                })
                .collect();
            tp(&env, &args)
        })
    };

    // The scheduler starts in the background: wait until the marketer gets an answer.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let output = run(marketer.clone(), vec!["playbook", "list"])
            .await
            .expect("tp ran");
        if output.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the scheduler never answered: {}",
            text(&output)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let applied = run(
        marketer.clone(),
        vec!["playbook", "apply", "-f", "PLAYBOOK"],
    )
    .await
    .expect("tp ran");
    assert!(
        applied.status.success(),
        "marketer apply: {}",
        text(&applied)
    );

    let viewer = as_role("viewer");
    let listed = run(viewer.clone(), vec!["playbook", "list"])
        .await
        .expect("tp ran");
    assert!(listed.status.success(), "viewer list: {}", text(&listed));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("tp-secured"));
    let denied = run(viewer, vec!["playbook", "apply", "-f", "PLAYBOOK"])
        .await
        .expect("tp ran");
    assert_eq!(denied.status.code(), Some(1), "{}", text(&denied));
    assert_eq!(
        String::from_utf8_lossy(&denied.stderr).trim(),
        "error: role viewer may not call touchpoint.v1.PlaybookService/ApplyPlaybook (token \"viewer-token\")"
    );

    let anonymous = run(tls.clone(), vec!["playbook", "list"])
        .await
        .expect("tp ran");
    assert_eq!(anonymous.status.code(), Some(1), "{}", text(&anonymous));
    assert!(
        String::from_utf8_lossy(&anonymous.stderr)
            .contains("missing bearer token: this scheduler requires `authorization: Bearer <token>` (pass a token with --token or TOUCHPOINT_TOKEN)"),
        "{}",
        text(&anonymous)
    );

    let no_cert: Vec<_> = marketer
        .iter()
        .filter(|(k, _)| !k.starts_with("TOUCHPOINT_TLS_CLIENT_"))
        .cloned()
        .collect();
    let refused = run(no_cert, vec!["playbook", "list"])
        .await
        .expect("tp ran");
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("TOUCHPOINT_TLS_CLIENT_CERT"),
        "{}",
        text(&refused)
    );

    let mut plaintext = marketer.clone();
    plaintext[0].1 = format!("http://127.0.0.1:{}", addr.port());
    let refused = run(plaintext, vec!["playbook", "list"])
        .await
        .expect("tp ran");
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("use an https:// address"),
        "{}",
        text(&refused)
    );

    stop.cancel();
    scheduler
        .await
        .expect("the scheduler task")
        .expect("the scheduler stopped cleanly");
}
