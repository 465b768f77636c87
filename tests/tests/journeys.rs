//! The marketing brain end to end, on real processes and a real Redis: step kinds and
//! jumps, events (entry, wait_for, goal) and their race, reentry, the contact budget
//! (caps across playbooks and schedulers, quiet hours), pause/resume, bulk cancel,
//! versions and the funnel.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use touchpoint_proto::v1::{
    ApplyPolicyRequest, CancelRunsRequest, Contact, EnrollRequest, GetStatsRequest,
    PausePlaybookRequest, PlaybookStats, RecordEventRequest, RecordEventResponse,
    ResumePlaybookRequest, Run, RunStatus, StepStatus, UpsertContactRequest,
};
use touchpoint_tests::{
    SECRET_ENV, SchedulerNode, Stack, TouchpointClient, WorkerNode, contact, eventually,
    request_id, run_summary, stays, to_map,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

async fn event(
    client: &mut TouchpointClient,
    contact_id: &str,
    name: &str,
    attrs: &[(&str, &str)],
) -> RecordEventResponse {
    client
        .events
        .record_event(RecordEventRequest {
            contact_id: contact_id.to_owned(),
            name: name.to_owned(),
            attrs: to_map(attrs),
            request_id: request_id(),
        })
        .await
        .unwrap_or_else(|e| panic!("RecordEvent {name} failed: {e}"))
        .into_inner()
}

async fn stats(client: &mut TouchpointClient, name: &str) -> PlaybookStats {
    client
        .playbooks
        .get_stats(GetStatsRequest {
            name: name.to_owned(),
            version: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("GetStats {name} failed: {e}"))
        .into_inner()
}

fn step<'a>(run: &'a Run, id: &str) -> &'a touchpoint_proto::v1::StepRecord {
    run.steps
        .iter()
        .find(|s| s.step_id == id)
        .unwrap_or_else(|| panic!("no step {id}"))
}

/// The steps the receiver got for one contact, in order.
fn delivered(stack: &Stack, contact_id: &str) -> Vec<String> {
    stack
        .receiver
        .requests()
        .iter()
        .filter(|r| r.pointer("/contact/id").and_then(|v| v.as_str()) == Some(contact_id))
        .map(|r| r.step().to_owned())
        .collect()
}

const FLOW: &str = r#"
name: flow
steps:
  - id: hello
    action: send
    channel: crm
  - id: wait-order
    wait_for: { event: order.placed, timeout: 4s }
    on_event: thanks
    on_timeout: remind
  - id: remind
    action: remind
    channel: crm
    goto: done
  - id: thanks
    action: thanks
    channel: crm
    template: "thanks for order {{ event.attrs.order }}"
  - id: done
    exit: true
    if: '"vip" in contact.tags'
  - id: after
    action: after
    channel: crm
"#;

#[tokio::test]
async fn wait_for_event_timeout_goto_and_exit() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    stack.apply(FLOW).await;
    // No order: hello, the timeout jumps to remind, goto done, the exit's `if` is false.
    let quiet = stack
        .enroll("flow", contact("c-quiet", &[], &[]), &request_id())
        .await;
    // An order after hello: thanks (with the event's attrs), then the vip exits.
    let buyer = stack
        .enroll("flow", contact("c-buyer", &[], &["vip"]), &request_id())
        .await;
    assert!(
        eventually(TIMEOUT, || async {
            delivered(&stack, "c-buyer") == ["hello"]
        })
        .await
    );
    let client = &mut stack.client;
    client
        .wait_for_run(&buyer.run_id, TIMEOUT, "waiting for the order", |run| {
            run.steps
                .iter()
                .any(|s| s.step_id == "wait-order" && s.status == StepStatus::Waiting as i32)
        })
        .await;
    let woken = event(client, "c-buyer", "order.placed", &[("order", "A-17")]).await;
    assert_eq!(woken.woken_run_ids, vec![buyer.run_id.clone()]);

    let run = client
        .wait_for_status(&buyer.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(step(&run, "wait-order").status, StepStatus::Done as i32);
    assert_eq!(step(&run, "thanks").status, StepStatus::Done as i32);
    assert_eq!(step(&run, "done").status, StepStatus::Done as i32);
    assert_eq!(step(&run, "remind").status, StepStatus::Pending as i32);
    assert_eq!(step(&run, "after").status, StepStatus::Pending as i32);
    assert_eq!(delivered(&stack, "c-buyer"), ["hello", "thanks"]);
    let thanks = stack
        .receiver
        .requests()
        .into_iter()
        .find(|r| r.step() == "thanks")
        .expect("thanks delivered");
    assert_eq!(thanks.field("message"), "thanks for order A-17");

    let run = stack
        .client
        .wait_for_status(&quiet.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert!(
        step(&run, "wait-order").detail.starts_with("timed out"),
        "{:?}",
        step(&run, "wait-order")
    );
    assert_eq!(step(&run, "thanks").status, StepStatus::Pending as i32);
    assert_eq!(step(&run, "done").status, StepStatus::Skipped as i32);
    assert_eq!(delivered(&stack, "c-quiet"), ["hello", "remind", "after"]);

    let funnel = stats(&mut stack.client, "flow").await;
    let by_id = |id: &str| {
        funnel
            .steps
            .iter()
            .find(|s| s.step_id == id)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(funnel.entered, 2);
    assert_eq!(funnel.completed, 2);
    assert_eq!(by_id("hello").done, 2);
    assert_eq!(by_id("wait-order").entered, 2);
    assert_eq!(by_id("wait-order").done, 1);
    assert_eq!(by_id("wait-order").timed_out, 1);
    assert_eq!(by_id("remind").entered, 1);
    assert_eq!(by_id("thanks").entered, 1);
    assert_eq!(by_id("done").done, 1);
    assert_eq!(by_id("done").skipped, 1);
    assert_eq!(by_id("after").done, 1);
    assert!(funnel.steps.iter().all(|s| s.waiting == 0), "{funnel:?}");
}

/// The order comes in while the step before the wait_for is still being delivered: the
/// wait_for, registered after, finds it in the contact's lookback and goes on at once
/// (its timeout is an hour, so a missed event would leave the run waiting).
#[tokio::test]
async fn an_event_just_before_the_wait_for_is_not_missed() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    stack
        .apply(&FLOW.replace("timeout: 4s", "timeout: 1h"))
        .await;
    stack.receiver.hold_next(Duration::from_secs(2));
    let run = stack
        .enroll("flow", contact("c-race", &[], &["vip"]), &request_id())
        .await;
    assert!(
        eventually(TIMEOUT, || async { stack.receiver.count() == 1 }).await,
        "hello reached the receiver (and is held there)"
    );
    let recorded = event(
        &mut stack.client,
        "c-race",
        "order.placed",
        &[("order", "B-2")],
    )
    .await;
    assert!(
        recorded.woken_run_ids.is_empty(),
        "the run was not waiting yet"
    );
    let run = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert!(
        step(&run, "wait-order").detail.contains("just before"),
        "{:?}",
        step(&run, "wait-order")
    );
    assert_eq!(delivered(&stack, "c-race"), ["hello", "thanks"]);
}

/// A run waiting three days for an order (its timeout kept in an hourly list, not in the
/// due set: see `store/lua/later.lua`) is woken by the order at once.
#[tokio::test]
async fn an_order_wakes_a_run_waiting_three_days() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    stack
        .apply(&FLOW.replace("timeout: 4s", "timeout: 3d"))
        .await;
    let run = stack
        .enroll("flow", contact("c-patient", &[], &["vip"]), &request_id())
        .await;
    stack
        .client
        .wait_for_run(&run.run_id, TIMEOUT, "waiting for the order", |run| {
            run.steps
                .iter()
                .any(|s| s.step_id == "wait-order" && s.status == StepStatus::Waiting as i32)
        })
        .await;
    let woken = event(
        &mut stack.client,
        "c-patient",
        "order.placed",
        &[("order", "C-3")],
    )
    .await;
    assert_eq!(woken.woken_run_ids, vec![run.run_id.clone()]);
    stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(delivered(&stack, "c-patient"), ["hello", "thanks"]);
}

/// An order placed before the run started does not satisfy the run's wait_for: the
/// lookback counts events since the run was created, which its id tells (the script
/// decodes the id's timestamp); the timeout path follows.
#[tokio::test]
async fn an_event_before_the_run_started_does_not_satisfy_its_wait_for() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    stack.apply(FLOW).await;
    event(
        &mut stack.client,
        "c-early",
        "order.placed",
        &[("order", "A-1")],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let run = stack
        .enroll("flow", contact("c-early", &[], &[]), &request_id())
        .await;
    let run = stack
        .client
        .wait_for_status(&run.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(
        delivered(&stack, "c-early"),
        ["hello", "remind", "after"],
        "{}",
        run_summary(&run)
    );
}

const ENTRY: &str = r#"
name: welcome-entry
entry:
  event: contact.added
goal:
  event: order.placed
steps:
  - id: welcome
    action: send_welcome
    channel: crm
    template: "code {{ event.attrs.welcome_code }}"
  - id: three-days
    wait: 3d
  - id: remind
    action: remind
    channel: crm
"#;

#[tokio::test]
async fn entry_events_start_runs_and_goals_convert_them() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    stack.apply(ENTRY).await;
    let client = &mut stack.client;
    let added = event(client, "c-new", "contact.added", &[("welcome_code", "W-1")]).await;
    assert_eq!(added.started_run_ids.len(), 1, "{added:?}");
    let run_id = added.started_run_ids[0].clone();
    client
        .wait_for_run(&run_id, TIMEOUT, "the three-day wait", |run| {
            run.current_step == "three-days"
        })
        .await;
    let welcome = stack.receiver.requests();
    assert_eq!(welcome.len(), 1);
    assert_eq!(welcome[0].field("message"), "code W-1");

    let ordered = event(&mut stack.client, "c-new", "order.placed", &[]).await;
    assert_eq!(ordered.converted_run_ids, vec![run_id.clone()]);
    let run = stack
        .client
        .wait_for_status(&run_id, RunStatus::Converted, TIMEOUT)
        .await;
    assert!(step(&run, "three-days").detail.contains("goal reached"));

    // reentry defaults to never: adding the contact again starts nothing.
    let again = event(&mut stack.client, "c-new", "contact.added", &[]).await;
    assert!(again.started_run_ids.is_empty(), "{again:?}");
    assert!(again.not_started[0].contains("reentry: never"), "{again:?}");

    let funnel = stats(&mut stack.client, "welcome-entry").await;
    assert_eq!((funnel.entered, funnel.converted), (1, 1));
    assert!((funnel.conversion_rate - 1.0).abs() < f64::EPSILON);
    assert_eq!(funnel.steps[1].left, 1);
    assert!(
        stays(Duration::from_millis(500), || async {
            stack.receiver.count() == 1
        })
        .await,
        "a converted run sends nothing more"
    );
}

#[tokio::test]
async fn reentry_never_always_and_after() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    for (name, reentry) in [
        ("once", "never"),
        ("every-time", "always"),
        ("lottery", "after 2s"),
    ] {
        stack
            .apply(&format!(
                "name: {name}\nentry: {{ reentry: {reentry} }}\nsteps:\n  - {{ id: w, wait: 1h }}\n"
            ))
            .await;
    }
    let started = |name: &'static str| {
        let client = stack.client.clone();
        async move {
            let mut client = client;
            let answer = client
                .enrollments
                .enroll(EnrollRequest {
                    playbook: name.to_owned(),
                    contact: Some(contact("c-1", &[], &[])),
                    request_id: request_id(),
                })
                .await
                .expect("Enroll")
                .into_inner();
            (answer.created, answer.not_started)
        }
    };
    assert!(started("once").await.0);
    let (created, why) = started("once").await;
    assert!(!created && why.contains("reentry: never"), "{why}");
    assert!(started("every-time").await.0);
    assert!(started("every-time").await.0);
    assert!(started("lottery").await.0);
    let (created, why) = started("lottery").await;
    assert!(!created && why.contains("reentry: after"), "{why}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(started("lottery").await.0, "allowed again after 2s");
}

/// A single-step playbook over channel `channel`.
fn one_send(name: &str, channel: &str, extra: &str) -> String {
    format!("name: {name}\nsteps:\n  - id: send\n    action: send\n    channel: {channel}\n{extra}")
}

/// Applies the policy: one message a day per contact, on every channel.
async fn one_message_a_day(stack: &mut Stack) {
    stack
        .client
        .policy
        .apply_policy(ApplyPolicyRequest {
            yaml: "caps:\n  - { channel: \"*\", max: 1, per: 1d }\n".to_owned(),
            dry_run: false,
        })
        .await
        .expect("ApplyPolicy");
}

/// Two playbooks, two schedulers (each with its own worker), one cap of one message a
/// day: every contact gets exactly one of the two messages, whichever scheduler and
/// playbook got there first; the other is capped (skipped).
#[tokio::test]
async fn caps_hold_across_playbooks_and_schedulers() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    let mut second = SchedulerNode::start(NODE, &stack.redis.url(), &[]);
    let second_client = second.client().await;
    let _second_worker = WorkerNode::start(
        NODE,
        &second.endpoint(),
        "w-2",
        &stack.worker_config(),
        &[(SECRET_ENV, &stack.secret)],
    );
    one_message_a_day(&mut stack).await;
    stack.apply(&one_send("promo-a", "crm", "")).await;
    stack.apply(&one_send("promo-b", "crm", "")).await;
    // Let both schedulers load the policy (they read it every second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    const CONTACTS: usize = 30;
    let mut calls = Vec::new();
    for n in 0..CONTACTS {
        for (playbook, client) in [("promo-a", &stack.client), ("promo-b", &second_client)] {
            let mut client = client.clone();
            calls.push(async move {
                client
                    .enrollments
                    .enroll(EnrollRequest {
                        playbook: playbook.to_owned(),
                        contact: Some(contact(&format!("c-{n}"), &[], &[])),
                        request_id: request_id(),
                    })
                    .await
                    .expect("Enroll")
            });
        }
    }
    futures::future::join_all(calls).await;
    let settled = eventually(TIMEOUT, || {
        let mut client = second_client.clone();
        async move {
            let a = stats(&mut client, "promo-a").await;
            let b = stats(&mut client, "promo-b").await;
            a.completed + b.completed == 2 * CONTACTS as u64
        }
    })
    .await;
    assert!(settled, "every run finished");
    for n in 0..CONTACTS {
        let got = delivered(&stack, &format!("c-{n}"));
        assert_eq!(got.len(), 1, "c-{n} got {got:?}");
    }
    let a = stats(&mut stack.client, "promo-a").await;
    let b = stats(&mut stack.client, "promo-b").await;
    assert_eq!(a.steps[0].done + b.steps[0].done, CONTACTS as u64);
    assert_eq!(a.steps[0].capped + b.steps[0].capped, CONTACTS as u64);
    drop(second);
}

/// Enrolls `contact_id` into `playbook` and waits for the run to end as `status`.
async fn finished(stack: &mut Stack, playbook: &str, contact_id: &str, status: RunStatus) -> Run {
    let run = stack
        .enroll(playbook, contact(contact_id, &[], &[]), &request_id())
        .await;
    stack
        .client
        .wait_for_status(&run.run_id, status, TIMEOUT)
        .await
}

/// One message a day per contact: a send the provider refused (HTTP 400, a permanent
/// failure) did not reach the contact, so it is uncounted and the contact's next
/// message goes out; one whose retries ran out on 503s may have reached them, so it
/// stays counted and the next message is capped.
#[tokio::test]
async fn a_send_refused_for_good_is_uncounted_from_the_caps() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    one_message_a_day(&mut stack).await;
    let retry = "    retry: { max_attempts: 2, initial: 100ms, max: 100ms }\n";
    stack.apply(&one_send("first", "crm", retry)).await;
    stack.apply(&one_send("second", "crm", "")).await;
    // Let the scheduler load the policy (it reads it every second).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Refused: uncounted, so the second message goes out.
    stack.receiver.respond_with(&[400]);
    finished(&mut stack, "first", "c-refused", RunStatus::Failed).await;
    let next = finished(&mut stack, "second", "c-refused", RunStatus::Completed).await;
    assert_eq!(
        next.steps[0].status(),
        StepStatus::Done,
        "{}",
        run_summary(&next)
    );

    // Given up after 503s: still counted, so the second message is capped.
    stack.receiver.respond_with(&[503, 503]);
    let gave_up = finished(&mut stack, "first", "c-gave-up", RunStatus::Failed).await;
    assert_eq!(gave_up.steps[0].attempts, 2, "{}", run_summary(&gave_up));
    let next = finished(&mut stack, "second", "c-gave-up", RunStatus::Completed).await;
    assert_eq!(
        next.steps[0].status(),
        StepStatus::Skipped,
        "{}",
        run_summary(&next)
    );
    assert_eq!(delivered(&stack, "c-refused"), ["send", "send"]);
    assert_eq!(delivered(&stack, "c-gave-up"), ["send", "send"]);
}

/// `HH:MM` in UTC, `minutes` from now (wrapping at midnight).
fn utc_clock(minutes: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let minute_of_day = (now / 60 + minutes).rem_euclid(24 * 60);
    format!("{:02}:{:02}", minute_of_day / 60, minute_of_day % 60)
}

#[tokio::test]
async fn quiet_hours_defer_or_skip_and_transactional_bypasses_them() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    // Quiet from an hour ago to an hour from now, in UTC (the default zone).
    let policy = format!(
        "quiet_hours: {{ start: \"{}\", end: \"{}\" }}\n",
        utc_clock(-60),
        utc_clock(60)
    );
    stack
        .client
        .policy
        .apply_policy(ApplyPolicyRequest {
            yaml: policy,
            dry_run: false,
        })
        .await
        .expect("ApplyPolicy");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.apply(&one_send("night-defer", "crm", "")).await;
    stack
        .apply(
            "name: night-skip\nsteps:\n  - { id: promo, action: send, channel: crm, on_quiet_hours: skip }\n  - { id: receipt, action: send, channel: crm, transactional: true }\n",
        )
        .await;
    let deferred = stack
        .enroll("night-defer", contact("c-1", &[], &[]), &request_id())
        .await;
    let skipped = stack
        .enroll("night-skip", contact("c-2", &[], &[]), &request_id())
        .await;
    let run = stack
        .client
        .wait_for_status(&skipped.run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(step(&run, "promo").status, StepStatus::Skipped as i32);
    assert!(step(&run, "promo").detail.contains("quiet hours"));
    assert_eq!(delivered(&stack, "c-2"), ["receipt"]);

    let run = stack
        .client
        .wait_for_run(&deferred.run_id, TIMEOUT, "deferred", |run| {
            run.steps[0].detail.starts_with("deferred: quiet hours")
        })
        .await;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    let due = run.steps[0].due_at_ms;
    assert!(
        due > now_ms + 50 * 60_000 && due < now_ms + 61 * 60_000,
        "due at the end of the quiet hours, about an hour from now: {due} vs {now_ms}"
    );
    assert!(delivered(&stack, "c-1").is_empty());
    assert_eq!(
        stats(&mut stack.client, "night-defer").await.steps[0].deferred,
        1
    );
}

#[tokio::test]
async fn wait_until_waits_for_the_contacts_local_time() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    stack
        .apply("name: evening\nsteps:\n  - { id: at-eight, wait_until: \"20:00\" }\n")
        .await;
    let mut shanghai = contact("c-sh", &[], &[]);
    shanghai.tz = "Asia/Shanghai".to_owned();
    let run = stack.enroll("evening", shanghai, &request_id()).await;
    let run = stack
        .client
        .wait_for_run(&run.run_id, TIMEOUT, "waiting", |run| {
            run.steps[0].detail.starts_with("until 20:00")
        })
        .await;
    // 20:00 in Shanghai (UTC+8, no daylight saving) is 12:00 UTC.
    let due = run.steps[0].due_at_ms;
    let day = 86_400_000;
    assert_eq!(
        due.rem_euclid(day),
        12 * 3_600_000,
        "due at 12:00 UTC: {due}"
    );
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    assert!(due > now_ms && due <= now_ms + day, "the next one: {due}");

    // A bad time zone is refused with the field named.
    let mut bad = contact("c-bad", &[], &[]);
    bad.tz = "Mars/Olympus".to_owned();
    let err = stack
        .client
        .enrollments
        .enroll(EnrollRequest {
            playbook: "evening".to_owned(),
            contact: Some(bad),
            request_id: String::new(),
        })
        .await
        .expect_err("unknown time zone");
    assert!(err.message().starts_with("contact.tz"), "{}", err.message());
}

#[tokio::test]
async fn pause_holds_steps_resume_sends_them_and_bulk_cancel_stops_runs() {
    let mut stack = Stack::start(NODE, &[], &["crm"]).await;
    stack
        .apply(
            "name: paused\nsteps:\n  - { id: w, wait: 500ms }\n  - { id: send, action: send, channel: crm }\n",
        )
        .await;
    let paused = stack
        .client
        .playbooks
        .pause_playbook(PausePlaybookRequest {
            name: "paused".to_owned(),
        })
        .await
        .expect("PausePlaybook")
        .into_inner();
    assert!(paused.paused);
    for n in 0..5 {
        stack
            .enroll(
                "paused",
                contact(&format!("c-{n}"), &[], &[]),
                &request_id(),
            )
            .await;
    }
    assert!(
        stays(Duration::from_secs(2), || async {
            stack.receiver.count() == 0
        })
        .await,
        "nothing is sent while paused"
    );
    stack
        .client
        .playbooks
        .resume_playbook(ResumePlaybookRequest {
            name: "paused".to_owned(),
        })
        .await
        .expect("ResumePlaybook");
    assert!(
        eventually(TIMEOUT, || async { stack.receiver.count() == 5 }).await,
        "held steps go out after resume: {}",
        stack.receiver.summary()
    );

    stack
        .apply("name: long\nsteps:\n  - { id: w, wait: 1h }\n  - { id: send, action: send, channel: crm }\n")
        .await;
    for n in 0..4 {
        stack
            .enroll("long", contact(&format!("d-{n}"), &[], &[]), &request_id())
            .await;
    }
    let other_step = stack
        .client
        .runs
        .cancel_runs(CancelRunsRequest {
            playbook: "long".to_owned(),
            step_id: "send".to_owned(),
        })
        .await
        .expect("CancelRuns")
        .into_inner();
    assert_eq!(other_step.cancelled, 0, "no run is at step send");
    let cancelled = stack
        .client
        .runs
        .cancel_runs(CancelRunsRequest {
            playbook: "long".to_owned(),
            step_id: "w".to_owned(),
        })
        .await
        .expect("CancelRuns")
        .into_inner();
    assert_eq!(cancelled.cancelled, 4);
    let funnel = stats(&mut stack.client, "long").await;
    assert_eq!((funnel.cancelled, funnel.active), (4, 0));
    assert_eq!(funnel.steps[0].left, 4);
}

#[tokio::test]
async fn contacts_upsert_and_new_versions_leave_runs_on_theirs() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    let upsert = |contact: Contact, remove_tags: &[&str]| {
        let mut client = stack.client.clone();
        let remove_tags = remove_tags.iter().map(|t| (*t).to_owned()).collect();
        async move {
            client
                .contacts
                .upsert_contact(UpsertContactRequest {
                    contact: Some(contact),
                    remove_tags,
                    remove_attrs: Vec::new(),
                })
                .await
                .expect("UpsertContact")
                .into_inner()
        }
    };
    upsert(contact("c-9", &[("name", "王芳")], &["paid", "new"]), &[]).await;
    let stored = upsert(contact("c-9", &[("city", "杭州")], &[]), &["new"]).await;
    assert_eq!(stored.tags, ["paid"]);
    assert_eq!(stored.attrs.get("name").map(String::as_str), Some("王芳"));
    assert_eq!(stored.attrs.get("city").map(String::as_str), Some("杭州"));

    stack
        .apply("name: versions\nentry: { reentry: always }\nsteps:\n  - { id: w, wait: 1h }\n")
        .await;
    for _ in 0..3 {
        stack
            .enroll("versions", contact("c-9", &[], &[]), &request_id())
            .await;
    }
    let applied = stack
        .apply("name: versions\nentry: { reentry: always }\nsteps:\n  - { id: w, wait: 2h }\n")
        .await;
    assert_eq!((applied.version, applied.runs_on_older_versions), (2, 3));
}
