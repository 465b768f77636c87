//! The example journey (`examples/welcome.yaml`, with a 2 s wait) end to end for two
//! contacts, one tagged `paid`: real Redis, scheduler and worker processes, and a real HTTP
//! receiver behind the worker's webhook channels. Once over plaintext, once locked down:
//! mutual TLS and bearer tokens (the client a `marketer`, the worker a `worker`).

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::json;
use touchpoint_proto::v1::{ApplyStatus, ListRunsRequest, Run, RunStatus, StepStatus};
use touchpoint_tests::{
    ReceivedRequest, Security, Stack, contact, request_id, run_summary, to_map, verify_signature,
    welcome_yaml,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const PLAYBOOK: &str = "welcome-new-customer";
const TIMEOUT: Duration = Duration::from_secs(30);

/// What one contact should receive, in order: (step, action, group param).
const PAID_STEPS: [(&str, &str); 4] = [
    ("add", "add_contact"),
    ("coupon", "send_message"),
    ("invite-vip", "invite_to_group"),
    ("remind", "send_message"),
];
const UNPAID_STEPS: [(&str, &str); 4] = [
    ("add", "add_contact"),
    ("coupon", "send_message"),
    ("invite-edu", "invite_to_group"),
    ("remind", "send_message"),
];
const TIMELINE: [&str; 6] = [
    "add",
    "coupon",
    "invite-vip",
    "invite-edu",
    "three-days",
    "remind",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_journey_for_a_paid_and_an_unpaid_contact() {
    welcome_journey(Security::plaintext()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_journey_over_mutual_tls_with_tokens() {
    touchpoint_proto::security::install_crypto_provider();
    welcome_journey(Security::mutual_tls().with_tokens()).await;
}

async fn welcome_journey(security: Security) {
    let yaml = welcome_yaml("2s");
    let mut stack = Stack::start_secured(NODE, &[], &["wecom", "sms"], security).await;

    let applied = stack.apply(&yaml).await;
    assert_eq!(applied.status(), ApplyStatus::Created, "{applied:?}");
    assert_eq!(
        (applied.name.as_str(), applied.version, applied.step_count),
        (PLAYBOOK, 1, 6)
    );
    let again = stack.apply(&yaml).await;
    assert_eq!(again.status(), ApplyStatus::Unchanged, "{again:?}");
    assert_eq!(again.version, 1);

    let mut wang = contact("c-1001", &[("name", "王芳")], &["paid"]);
    wang.tz = "Asia/Shanghai".to_owned();
    wang.identities = to_map(&[("wecom", "wm-1001"), ("phone", "+8613800001001")]);
    let mut li = contact("c-1002", &[("name", "李雷")], &[]);
    li.tz = "Asia/Shanghai".to_owned();
    li.identities = to_map(&[("wecom", "wm-1002")]);

    let wang_request = request_id();
    let wang_run = stack.enroll(PLAYBOOK, wang.clone(), &wang_request).await;
    assert!(wang_run.created, "{wang_run:?}");
    assert_eq!(wang_run.version, 1);
    let li_run = stack.enroll(PLAYBOOK, li.clone(), &request_id()).await;
    assert!(li_run.created, "{li_run:?}");
    assert_ne!(wang_run.run_id, li_run.run_id);

    // The same request_id again: the same run, not a new one.
    let replay = stack.enroll(PLAYBOOK, wang.clone(), &wang_request).await;
    assert_eq!(
        replay.run_id, wang_run.run_id,
        "a replayed Enroll started another run"
    );
    assert!(
        !replay.created,
        "a replayed Enroll says created: {replay:?}"
    );

    let wang_done = stack
        .client
        .wait_for_status(&wang_run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let li_done = stack
        .client
        .wait_for_status(&li_run.run_id, RunStatus::Completed, TIMEOUT)
        .await;

    // A run completes only after its last delivery was answered, so all are recorded.
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    assert_eq!(
        requests.len(),
        8,
        "expected 4 deliveries per contact, got:\n{summary}"
    );

    check_deliveries(
        &requests,
        &wang_done,
        &wang,
        &PAID_STEPS,
        "vip-club",
        &stack.secret,
        &summary,
    );
    check_deliveries(
        &requests,
        &li_done,
        &li,
        &UNPAID_STEPS,
        "product-school",
        &stack.secret,
        &summary,
    );

    let ids: HashSet<&str> = requests.iter().map(ReceivedRequest::webhook_id).collect();
    assert!(
        !ids.contains(""),
        "a delivery without webhook-id:\n{summary}"
    );
    assert_eq!(
        ids.len(),
        8,
        "webhook-id must differ per (run, step):\n{summary}"
    );

    check_timeline(&wang_done, &wang.id, "invite-edu");
    check_timeline(&li_done, &li.id, "invite-vip");

    // ListRuns filtered by playbook and status finds both, and only them.
    let completed = list_runs(&mut stack, PLAYBOOK, RunStatus::Completed).await;
    assert_eq!(
        completed,
        [wang_run.run_id.clone(), li_run.run_id.clone()]
            .into_iter()
            .collect::<HashSet<_>>()
    );
    assert!(
        list_runs(&mut stack, PLAYBOOK, RunStatus::Active)
            .await
            .is_empty()
    );
    assert!(
        list_runs(&mut stack, PLAYBOOK, RunStatus::Failed)
            .await
            .is_empty()
    );
    assert!(
        list_runs(&mut stack, "another-playbook", RunStatus::Unspecified)
            .await
            .is_empty()
    );
}

/// The deliveries of one run: exactly `expected` steps in order, each body as SPEC shows,
/// signed, with a traceparent of the run's trace; the wait between invite and remind.
fn check_deliveries(
    all: &[ReceivedRequest],
    run: &Run,
    contact: &touchpoint_proto::v1::Contact,
    expected: &[(&str, &str)],
    group: &str,
    secret: &str,
    summary: &str,
) {
    let mine: Vec<&ReceivedRequest> = all.iter().filter(|r| r.run_id() == run.run_id).collect();
    let steps: Vec<(&str, &str)> = mine.iter().map(|r| (r.step(), r.field("action"))).collect();
    assert_eq!(
        steps, expected,
        "{}: wrong deliveries or order:\n{summary}",
        contact.id
    );
    let name = &contact.attrs["name"];
    for r in &mine {
        let what = format!("{} step {}", contact.id, r.step());
        assert_eq!(r.method, "POST", "{what}");
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{what}: content-type {:?}",
            r.header("content-type")
        );
        assert!(
            verify_signature(r, secret),
            "{what}: signature does not verify: id={:?} ts={:?} sig={:?}",
            r.header("webhook-id"),
            r.header("webhook-timestamp"),
            r.header("webhook-signature")
        );
        check_timestamp(r, &what);
        check_traceparent(r, run, &what);

        let body = r.json.as_ref().unwrap_or_else(|| {
            panic!(
                "{what}: body is not JSON: {}",
                String::from_utf8_lossy(&r.body)
            )
        });
        assert_eq!(body["playbook"], PLAYBOOK, "{what}");
        assert_eq!(body["version"], 1, "{what}");
        assert_eq!(body["attempt"], 1, "{what}");
        assert_eq!(body["contact"]["id"], contact.id.as_str(), "{what}");
        assert_eq!(body["contact"]["attrs"], json!({ "name": name }), "{what}");
        assert_eq!(body["contact"]["tags"], json!(contact.tags), "{what}");
        assert_eq!(body["contact"]["tz"], contact.tz.as_str(), "{what}");
        let identities: BTreeMap<&String, &String> = contact.identities.iter().collect();
        assert_eq!(body["contact"]["identities"], json!(identities), "{what}");
        match r.step() {
            "coupon" => {
                assert_eq!(
                    body["message"],
                    format!("{name}，欢迎！新人券 WELCOME10 已到账"),
                    "{what}"
                );
                assert_eq!(body["params"], json!({ "coupon": "WELCOME10" }), "{what}");
            }
            "invite-vip" | "invite-edu" => {
                assert_eq!(body["params"], json!({ "group": group }), "{what}");
            }
            "remind" => assert_eq!(body["message"], "您的新人券还有 4 天到期", "{what}"),
            _ => {}
        }
    }
    // The 2 s wait sits between the invite and the reminder.
    let invite = mine[2].received_at;
    let remind = mine[3].received_at;
    assert!(
        remind.duration_since(invite) >= Duration::from_secs(2),
        "{}: remind came {:?} after the invite, before the 2s wait ended:\n{summary}",
        contact.id,
        remind.duration_since(invite)
    );
}

/// `webhook-timestamp`: Unix seconds, close to when the request arrived.
fn check_timestamp(r: &ReceivedRequest, what: &str) {
    let ts: u64 = r
        .header("webhook-timestamp")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "{what}: webhook-timestamp {:?}",
                r.header("webhook-timestamp")
            )
        });
    let arrived = r
        .received_at_wall
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    assert!(
        ts.abs_diff(arrived) <= 60,
        "{what}: webhook-timestamp {ts} is far from the arrival time {arrived}"
    );
    assert!(
        ts <= SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("now")
            .as_secs()
            + 60
    );
}

/// W3C `traceparent`: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, in the run's trace.
fn check_traceparent(r: &ReceivedRequest, run: &Run, what: &str) {
    let header = r
        .header("traceparent")
        .unwrap_or_else(|| panic!("{what}: no traceparent header"));
    let parts: Vec<&str> = header.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2)
            && parts[1] != "0".repeat(32),
        "{what}: malformed traceparent {header:?}"
    );
    assert_eq!(
        parts[1], run.trace_id,
        "{what}: traceparent {header:?} is not in the run's trace {:?}",
        run.trace_id
    );
}

/// GetRun's timeline: every playbook step in order, `skipped` SKIPPED, the others DONE, each
/// action once on worker w-1 through its channel.
fn check_timeline(run: &Run, contact_id: &str, skipped: &str) {
    let summary = run_summary(run);
    assert_eq!(run.status(), RunStatus::Completed, "{summary}");
    assert_eq!(run.playbook, PLAYBOOK, "{summary}");
    assert_eq!(run.version, 1, "{summary}");
    assert_eq!(run.contact_id, contact_id, "{summary}");
    assert!(
        run.current_step.is_empty(),
        "a finished run has no current step:\n{summary}"
    );
    let ids: Vec<&str> = run.steps.iter().map(|s| s.step_id.as_str()).collect();
    assert_eq!(ids, TIMELINE, "{summary}");
    for step in &run.steps {
        let what = format!("{contact_id} step {}:\n{summary}", step.step_id);
        if step.step_id == skipped {
            assert_eq!(step.status(), StepStatus::Skipped, "{what}");
            assert_eq!(step.kind, "action", "{what}");
            continue;
        }
        assert_eq!(step.status(), StepStatus::Done, "{what}");
        assert!(step.done_at_ms > 0, "{what}");
        if step.step_id == "three-days" {
            assert_eq!(step.kind, "wait", "{what}");
            continue;
        }
        assert_eq!(step.kind, "action", "{what}");
        assert_eq!(step.attempts, 1, "{what}");
        assert_eq!(step.worker, "w-1", "{what}");
        let channel = if step.step_id == "remind" {
            "sms"
        } else {
            "wecom"
        };
        assert_eq!(step.channel, channel, "{what}");
    }
    // The wait step ended no earlier than 2 s after it started.
    let wait = &run.steps[4];
    let invite_done = run.steps[2].done_at_ms.max(run.steps[3].done_at_ms);
    assert!(
        wait.done_at_ms - invite_done >= 1990,
        "the wait ended {} ms after the invite:\n{summary}",
        wait.done_at_ms - invite_done
    );
}

/// Run ids from ListRuns with the filters, across pages.
async fn list_runs(stack: &mut Stack, playbook: &str, status: RunStatus) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut page_token = String::new();
    loop {
        let page = stack
            .client
            .runs
            .list_runs(ListRunsRequest {
                playbook: playbook.to_owned(),
                status: status as i32,
                page_size: 1,
                page_token: page_token.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("ListRuns {playbook} {status:?}: {e}"))
            .into_inner();
        for run in &page.runs {
            assert_eq!(
                run.playbook, playbook,
                "ListRuns ignored the playbook filter"
            );
            if status != RunStatus::Unspecified {
                assert_eq!(run.status(), status, "ListRuns ignored the status filter");
            }
            assert!(
                ids.insert(run.run_id.clone()),
                "ListRuns repeated {}",
                run.run_id
            );
        }
        if page.next_page_token.is_empty() {
            return ids;
        }
        assert!(ids.len() < 100, "ListRuns pages never end");
        page_token = page.next_page_token;
    }
}
