//! The dead-letter list against a live scheduler, worker, Redis and webhook receiver: a
//! run that fails at a step (a 400, or retries exhausted on 503s) is listed with its last
//! error and kept without expiry; retrying it delivers the step again with the same
//! `webhook-id`, and the run carries on from there.

use std::time::Duration;

use tonic::Code;
use touchpoint_proto::v1::{
    ApplyStatus, CancelRunRequest, DeadLetter, ListDeadLettersRequest, RecordEventRequest,
    RetryDeadLettersRequest, RunStatus, StepStatus, retry_dead_letters_request::Target,
};
use touchpoint_tests::{Stack, contact, request_id, run_summary, stays};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

/// `notify` (a webhook to the receiver), then `thanks`.
fn two_steps(name: &str, retry: &str) -> String {
    format!(
        r#"name: {name}
steps:
  - id: notify
    action: send_message
    channel: wecom
    template: "hi {{{{ contact.attrs.name }}}}"
    retry: {retry}
  - id: thanks
    action: send_message
    channel: wecom
    template: "thanks"
"#
    )
}

/// Applies `yaml` (a new playbook) and enrolls `contacts` in it; returns the run ids.
async fn enroll(stack: &mut Stack, yaml: &str, name: &str, contacts: &[&str]) -> Vec<String> {
    let applied = stack.apply(yaml).await;
    assert_eq!(applied.status(), ApplyStatus::Created, "{applied:?}");
    let mut runs = Vec::new();
    for id in contacts {
        let run = stack
            .enroll(name, contact(id, &[("name", "李雷")], &[]), &request_id())
            .await;
        runs.push(run.run_id);
    }
    runs
}

/// Every dead letter (of `playbook` when not empty), following page tokens.
async fn list(stack: &mut Stack, playbook: &str, page_size: u32) -> Vec<DeadLetter> {
    let mut request = ListDeadLettersRequest {
        playbook: playbook.to_owned(),
        page_size,
        page_token: String::new(),
    };
    let mut all = Vec::new();
    loop {
        let page = stack
            .client
            .dead_letters
            .list_dead_letters(request.clone())
            .await
            .unwrap_or_else(|e| panic!("ListDeadLetters: {e}"))
            .into_inner();
        all.extend(page.dead_letters);
        if page.next_page_token.is_empty() {
            return all;
        }
        request.page_token = page.next_page_token;
    }
}

/// `RetryDeadLetters`, panicking on error: how many runs were retried.
async fn retried(stack: &mut Stack, target: Target) -> u32 {
    let what = format!("{target:?}");
    retry(stack, target)
        .await
        .unwrap_or_else(|e| panic!("RetryDeadLetters {what}: {e}"))
}

async fn retry(stack: &mut Stack, target: Target) -> Result<u32, tonic::Status> {
    stack
        .client
        .dead_letters
        .retry_dead_letters(RetryDeadLettersRequest {
            target: Some(target),
        })
        .await
        .map(|r| r.into_inner().retried)
}

/// The TTL of a run's hash in Redis (-1: none; -2: no such key).
async fn run_ttl(stack: &Stack, run_id: &str) -> i64 {
    let partition = run_id.rsplit('-').next().unwrap_or_default();
    let mut conn = stack.redis.connection().await;
    redis::cmd("TTL")
        .arg(format!("tp:{{p{partition}}}:run:{run_id}"))
        .query_async(&mut conn)
        .await
        .expect("TTL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_dead_letters_the_run_and_a_retry_resends_the_step_with_the_same_webhook_id() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    stack.receiver.respond_with(&[400]);
    let yaml = two_steps("dlq-400", "{ max_attempts: 5, initial: 200ms, max: 1s }");
    let run_id = enroll(&mut stack, &yaml, "dlq-400", &["c-7001"])
        .await
        .remove(0);

    let failed = stack
        .client
        .wait_for_status(&run_id, RunStatus::Failed, TIMEOUT)
        .await;
    let timeline = run_summary(&failed);
    assert_eq!(failed.steps[0].status(), StepStatus::Failed, "{timeline}");

    let listed = list(&mut stack, "", 0).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let entry = &listed[0];
    assert_eq!(entry.run_id, run_id);
    assert_eq!(entry.playbook, "dlq-400");
    assert_eq!(entry.version, 1);
    assert_eq!(entry.contact_id, "c-7001");
    assert_eq!(entry.step_id, "notify");
    assert_eq!(entry.attempts, 1, "a 400 is not retried: {entry:?}");
    assert!(entry.last_error.starts_with("HTTP 400"), "{entry:?}");
    assert!(entry.failed_at_ms >= failed.created_at_ms, "{entry:?}");
    assert_eq!(list(&mut stack, "dlq-400", 0).await, listed);
    assert_eq!(
        run_ttl(&stack, &run_id).await,
        -1,
        "a dead-lettered run must not expire"
    );

    // The receiver answers 200 from now on (its script is used up).
    assert_eq!(retried(&mut stack, Target::RunId(run_id.clone())).await, 1);
    let again = stack.client.run(&run_id).await;
    assert_ne!(again.status(), RunStatus::Failed, "{}", run_summary(&again));
    let mut seen = Vec::new();
    let done = stack
        .client
        .wait_for_run(&run_id, TIMEOUT, "COMPLETED", |run| {
            seen.push((run.status(), run.steps[0].status()));
            run.status() == RunStatus::Completed
        })
        .await;
    // While the run is active again, its step reads as scheduled, then in flight, then done.
    assert!(
        seen.iter().all(|(run, step)| *run == RunStatus::Completed
            || matches!(
                step,
                StepStatus::Scheduled | StepStatus::InFlight | StepStatus::Done
            )),
        "{seen:?}"
    );
    let timeline = run_summary(&done);
    assert_eq!(done.steps[0].status(), StepStatus::Done, "{timeline}");
    assert_eq!(done.steps[0].attempts, 1, "{timeline}");
    assert_eq!(done.steps[1].status(), StepStatus::Done, "{timeline}");

    let requests = stack.receiver.wait_for(3, TIMEOUT).await;
    let summary = stack.receiver.summary();
    let got: Vec<(&str, u64, u16)> = requests
        .iter()
        .map(|r| (r.step(), r.attempt(), r.status))
        .collect();
    assert_eq!(
        got,
        [("notify", 1, 400), ("notify", 1, 200), ("thanks", 1, 200)],
        "{summary}"
    );
    assert!(!requests[0].webhook_id().is_empty(), "{summary}");
    assert_eq!(
        requests[0].webhook_id(),
        requests[1].webhook_id(),
        "the retried delivery carries the same webhook-id:\n{summary}"
    );
    assert_eq!(requests[0].webhook_id(), format!("{run_id}.notify"));

    assert!(list(&mut stack, "", 0).await.is_empty());
    let ttl = run_ttl(&stack, &run_id).await;
    assert!(
        ttl > 0,
        "a completed run expires after the retention (ttl {ttl})"
    );
    // Retried once: it is no longer a dead letter.
    let twice = retry(&mut stack, Target::RunId(run_id)).await.unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition, "{twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_playbook_retries_each_of_its_dead_letters() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    stack.receiver.respond_with(&[400; 5]);
    let policy = "{ max_attempts: 3, initial: 200ms, max: 1s }";
    let contacts = ["c-8001", "c-8002", "c-8003", "c-8004"];
    let mine = enroll(
        &mut stack,
        &two_steps("dlq-mine", policy),
        "dlq-mine",
        &contacts,
    )
    .await;
    let other = enroll(
        &mut stack,
        &two_steps("dlq-other", policy),
        "dlq-other",
        &["c-8100"],
    )
    .await
    .remove(0);
    for run_id in mine.iter().chain([&other]) {
        stack
            .client
            .wait_for_status(run_id, RunStatus::Failed, TIMEOUT)
            .await;
    }

    // Newest first, over the partitions of five contacts, page by page.
    let all = list(&mut stack, "", 2).await;
    assert_eq!(all.len(), 5, "{all:?}");
    assert!(
        all.windows(2)
            .all(|w| (w[0].failed_at_ms, &w[0].run_id) > (w[1].failed_at_ms, &w[1].run_id)),
        "{all:?}"
    );
    let listed = list(&mut stack, "dlq-mine", 3).await;
    let mut ids: Vec<&str> = listed.iter().map(|e| e.run_id.as_str()).collect();
    ids.sort_unstable();
    let mut want: Vec<&str> = mine.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(ids, want);

    assert_eq!(
        retried(&mut stack, Target::Playbook("dlq-mine".into())).await,
        4
    );
    for run_id in &mine {
        stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
    }
    let left = list(&mut stack, "", 0).await;
    assert_eq!(
        left.iter().map(|e| e.run_id.as_str()).collect::<Vec<_>>(),
        [other.as_str()]
    );
    assert!(list(&mut stack, "dlq-mine", 0).await.is_empty());
    let still = stack.client.run(&other).await;
    assert_eq!(still.status(), RunStatus::Failed, "{}", run_summary(&still));
    assert_eq!(
        retried(&mut stack, Target::Playbook("dlq-mine".into())).await,
        0,
        "nothing left to retry"
    );

    // Every (run, notify) reached the receiver twice with one webhook-id.
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    for run_id in &mine {
        let notify: Vec<&str> = requests
            .iter()
            .filter(|r| r.run_id() == run_id && r.step() == "notify")
            .map(|r| r.webhook_id())
            .collect();
        assert_eq!(notify.len(), 2, "{summary}");
        assert_eq!(notify[0], notify[1], "{summary}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_dead_letters_can_be_retried() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    let yaml = r#"name: dlq-not
steps:
  - id: greet
    action: send_message
    channel: wecom
  - id: pause
    wait: 1h
"#;
    let runs = enroll(&mut stack, yaml, "dlq-not", &["c-9001", "c-9002"]).await;
    stack
        .client
        .wait_for_run(&runs[0], TIMEOUT, "the pause", |r| {
            r.current_step == "pause"
        })
        .await;

    // Active (waiting), cancelled: not dead letters.
    let active = retry(&mut stack, Target::RunId(runs[0].clone()))
        .await
        .unwrap_err();
    assert_eq!(active.code(), Code::FailedPrecondition, "{active:?}");
    assert!(active.message().contains("active"), "{active:?}");
    stack
        .client
        .runs
        .cancel_run(CancelRunRequest {
            run_id: runs[1].clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("CancelRun: {e}"));
    let cancelled = retry(&mut stack, Target::RunId(runs[1].clone()))
        .await
        .unwrap_err();
    assert_eq!(cancelled.code(), Code::FailedPrecondition, "{cancelled:?}");
    assert!(list(&mut stack, "", 0).await.is_empty());
    let waiting = stack.client.run(&runs[0]).await;
    assert_eq!(waiting.status(), RunStatus::Active);
    assert_eq!(waiting.current_step, "pause", "{}", run_summary(&waiting));

    // Unknown runs and playbooks, and requests naming nothing.
    let unknown_run = format!("{}-0", "0".repeat(32));
    for run_id in [unknown_run.as_str(), "nonsense"] {
        let err = retry(&mut stack, Target::RunId(run_id.into()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{run_id}: {err:?}");
    }
    let err = retry(&mut stack, Target::Playbook("no-such-playbook".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = stack
        .client
        .dead_letters
        .list_dead_letters(ListDeadLettersRequest {
            playbook: "no-such-playbook".into(),
            ..ListDeadLettersRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = stack
        .client
        .dead_letters
        .retry_dead_letters(RetryDeadLettersRequest { target: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = retry(&mut stack, Target::RunId(String::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = stack
        .client
        .dead_letters
        .list_dead_letters(ListDeadLettersRequest {
            page_token: "not-a-token".into(),
            ..ListDeadLettersRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausting_retries_on_503s_dead_letters_the_run() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    stack.receiver.respond_with(&[503; 3]);
    let yaml = two_steps("dlq-503", "{ max_attempts: 3, initial: 100ms, max: 200ms }");
    let run_id = enroll(&mut stack, &yaml, "dlq-503", &["c-9501"])
        .await
        .remove(0);
    let failed = stack
        .client
        .wait_for_status(&run_id, RunStatus::Failed, TIMEOUT)
        .await;
    let timeline = run_summary(&failed);

    let listed = list(&mut stack, "dlq-503", 0).await;
    assert_eq!(listed.len(), 1, "{listed:?}\n{timeline}");
    assert_eq!(listed[0].run_id, run_id);
    assert_eq!(listed[0].step_id, "notify");
    assert_eq!(listed[0].attempts, 3, "{listed:?}");
    assert!(
        listed[0]
            .last_error
            .starts_with("gave up after 3 attempts: HTTP 503"),
        "{listed:?}"
    );
    assert_eq!(run_ttl(&stack, &run_id).await, -1);
    let receiver = &stack.receiver;
    assert!(
        stays(Duration::from_secs(1), || async { receiver.count() == 3 }).await,
        "{}",
        receiver.summary()
    );

    // Retried: the step starts over at attempt 1 (the receiver now answers 200).
    assert_eq!(retried(&mut stack, Target::RunId(run_id.clone())).await, 1);
    let done = stack
        .client
        .wait_for_status(&run_id, RunStatus::Completed, TIMEOUT)
        .await;
    let requests = stack.receiver.requests();
    let summary = stack.receiver.summary();
    let got: Vec<(&str, u64, u16)> = requests
        .iter()
        .map(|r| (r.step(), r.attempt(), r.status))
        .collect();
    assert_eq!(
        got,
        [
            ("notify", 1, 503),
            ("notify", 2, 503),
            ("notify", 3, 503),
            ("notify", 1, 200),
            ("thanks", 1, 200)
        ],
        "{summary}\n{}",
        run_summary(&done)
    );
    assert!(
        requests[..4]
            .iter()
            .all(|r| r.webhook_id() == requests[0].webhook_id()),
        "{summary}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_dead_letter_still_ends_at_its_goal() {
    let mut stack = Stack::start(NODE, &[], &["wecom"]).await;
    stack.receiver.respond_with(&[400]);
    let yaml = r#"name: dlq-goal
goal: { event: order.placed }
steps:
  - id: notify
    action: send_message
    channel: wecom
    template: "hi"
  - id: remind-later
    wait: 1d
"#;
    let run_id = enroll(&mut stack, yaml, "dlq-goal", &["c-7101"])
        .await
        .remove(0);
    stack
        .client
        .wait_for_status(&run_id, RunStatus::Failed, TIMEOUT)
        .await;
    assert_eq!(retried(&mut stack, Target::RunId(run_id.clone())).await, 1);
    stack
        .client
        .wait_for_run(&run_id, TIMEOUT, "waiting at remind-later", |run| {
            run.current_step == "remind-later"
        })
        .await;

    let recorded = stack
        .client
        .events
        .record_event(RecordEventRequest {
            contact_id: "c-7101".to_owned(),
            name: "order.placed".to_owned(),
            request_id: request_id(),
            ..RecordEventRequest::default()
        })
        .await
        .unwrap_or_else(|e| panic!("RecordEvent: {e}"))
        .into_inner();
    assert_eq!(
        recorded.converted_run_ids,
        [run_id.as_str()],
        "{recorded:?}"
    );
    let converted = stack.client.run(&run_id).await;
    assert_eq!(
        converted.status(),
        RunStatus::Converted,
        "{}",
        run_summary(&converted)
    );
}
