//! Touchpoint on a real Redis Cluster: three primaries made with `redis-cli --cluster
//! create`, the scheduler given `redis+cluster://...`, and a worker delivering to a
//! webhook receiver. Runs land on every primary (each is asked which run hashes it holds),
//! and everything that spans partitions (listings, the funnel, dead letters, resume, the
//! audience of a recurring tick) gathers them from all three.
//!
//! The other Stack-based suites run on a cluster too with `TOUCHPOINT_TEST_REDIS=cluster`
//! (see docs/scaling.md).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use touchpoint_proto::v1::{
    ApplyPolicyRequest, DeadLetter, EnrollBatchRequest, EnrollItem, GetStatsRequest,
    ListDeadLettersRequest, ListRunsRequest, PausePlaybookRequest, PlaybookStats,
    RecordEventRequest, ResumePlaybookRequest, RetryDeadLettersRequest, RunStatus, StepStats,
    StepStatus, UpsertContactRequest, retry_dead_letters_request::Target,
};
use touchpoint_scheduler::store::{DeadLetterEntry, RedisConnection, Store};
use touchpoint_tests::{
    RedisCluster, Stack, TestRedis, TouchpointClient, contact, eventually, free_port, request_id,
    run_summary, scrape, stays,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(60);

/// A stack whose scheduler (with `flags`) runs on a new three-primary cluster, with a
/// worker serving `channels`.
async fn stack_on_cluster(flags: &[&str], channels: &[&str]) -> Stack {
    let cluster = TestRedis::Cluster(RedisCluster::start());
    let stack = Stack::start_on(cluster, NODE, flags, channels).await;
    assert!(stack.redis.url().starts_with("redis+cluster://"));
    stack
}

/// How many of `run_ids`' hashes each primary holds, asked of each node directly (a
/// node answers `EXISTS` for its own slots and `MOVED` for the others).
fn runs_per_primary(stack: &Stack, run_ids: &[String]) -> Vec<usize> {
    let TestRedis::Cluster(cluster) = &stack.redis else {
        panic!("these tests run on a cluster");
    };
    cluster
        .nodes()
        .iter()
        .map(|node| {
            let mut conn = node.client().get_connection().expect("connect to a node");
            run_ids
                .iter()
                .filter(|run_id| {
                    let partition = run_id.rsplit('-').next().expect("a partition suffix");
                    redis::cmd("EXISTS")
                        .arg(format!("tp:{{p{partition}}}:run:{run_id}"))
                        .query::<u8>(&mut conn)
                        .is_ok_and(|n| n == 1)
                })
                .count()
        })
        .collect()
}

/// Asserts every run's hash is on exactly one primary and every primary holds some.
fn assert_on_every_primary(stack: &Stack, run_ids: &[String]) {
    let counts = runs_per_primary(stack, run_ids);
    assert_eq!(
        counts.iter().sum::<usize>(),
        run_ids.len(),
        "each run on one primary: {counts:?}"
    );
    assert!(
        counts.iter().all(|&n| n > 0),
        "runs on every primary: {counts:?}"
    );
}

/// `EnrollBatch` of `ids` (new contacts) into `playbook`: the run ids, all created.
async fn enroll_batch(stack: &mut Stack, playbook: &str, ids: &[String]) -> Vec<String> {
    let response = stack
        .client
        .enrollments
        .enroll_batch(EnrollBatchRequest {
            playbook: playbook.to_owned(),
            items: ids
                .iter()
                .map(|id| EnrollItem {
                    contact: Some(contact(id, &[], &[])),
                    request_id: request_id(),
                })
                .collect(),
        })
        .await
        .unwrap_or_else(|e| panic!("EnrollBatch {playbook}: {e}"))
        .into_inner();
    assert!(
        response.results.iter().all(|r| r.created),
        "{:?}",
        response.results
    );
    response.results.into_iter().map(|r| r.run_id).collect()
}

async fn record_event(stack: &mut Stack, contact_id: &str, name: &str) -> Vec<String> {
    let response = stack
        .client
        .events
        .record_event(RecordEventRequest {
            contact_id: contact_id.to_owned(),
            name: name.to_owned(),
            request_id: request_id(),
            ..RecordEventRequest::default()
        })
        .await
        .unwrap_or_else(|e| panic!("RecordEvent {name}: {e}"))
        .into_inner();
    [response.woken_run_ids, response.converted_run_ids].concat()
}

async fn stats(stack: &mut Stack, name: &str) -> PlaybookStats {
    stack
        .client
        .playbooks
        .get_stats(GetStatsRequest {
            name: name.to_owned(),
            version: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("GetStats {name}: {e}"))
        .into_inner()
}

fn step_stats(funnel: &PlaybookStats, id: &str) -> StepStats {
    funnel
        .steps
        .iter()
        .find(|s| s.step_id == id)
        .cloned()
        .unwrap_or_else(|| panic!("no step {id} in {funnel:?}"))
}

/// Every run id `ListRuns` gives for `playbook` (with `status`, unless unspecified),
/// following page tokens.
async fn list_runs(stack: &mut Stack, playbook: &str, status: RunStatus) -> Vec<String> {
    let mut request = ListRunsRequest {
        playbook: playbook.to_owned(),
        status: status as i32,
        page_size: 7,
        page_token: String::new(),
    };
    let mut ids = Vec::new();
    loop {
        let page = stack
            .client
            .runs
            .list_runs(request.clone())
            .await
            .unwrap_or_else(|e| panic!("ListRuns {playbook}: {e}"))
            .into_inner();
        ids.extend(page.runs.into_iter().map(|run| run.run_id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        request.page_token = page.next_page_token;
    }
}

/// Every dead letter, newest first, five a page.
async fn dead_letters(mut client: TouchpointClient) -> Vec<DeadLetter> {
    let mut request = ListDeadLettersRequest {
        playbook: String::new(),
        page_size: 5,
        page_token: String::new(),
    };
    let mut all = Vec::new();
    loop {
        let page = client
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

/// The steps sent to each contact (every attempt), in order of arrival.
fn delivered(stack: &Stack) -> BTreeMap<String, Vec<String>> {
    let mut by_contact: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for request in stack.receiver.requests() {
        let contact = request
            .pointer("/contact/id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        by_contact
            .entry(contact)
            .or_default()
            .push(request.step().to_owned());
    }
    by_contact
}

/// Asserts no step of any run was delivered (answered 2xx) twice.
fn assert_each_step_once(stack: &Stack) {
    let mut seen = BTreeMap::new();
    for request in stack.receiver.requests() {
        if !(200..300).contains(&request.status) {
            continue;
        }
        *seen
            .entry((request.run_id().to_owned(), request.step().to_owned()))
            .or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "delivered more than once: {twice:?}\n{}",
        stack.receiver.summary()
    );
}

const JOURNEY: &str = r#"
name: journey
goal: { event: order.placed }
steps:
  - id: hello
    action: send_message
    channel: crm
  - id: pause
    wait: 1s
  - id: wait-click
    wait_for: { event: link.clicked, timeout: 8s }
    on_event: thanks
    on_timeout: remind
  - id: remind
    action: send_message
    channel: crm
  - id: stop
    exit: true
  - id: thanks
    action: send_message
    channel: crm
"#;

/// Contacts `k-00..k-29`: a third click (thanks), a third order (the goal converts
/// them), a third do nothing (the wait times out: remind). Half enroll one by one, half
/// in one `EnrollBatch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journey_spreads_over_every_primary_and_sends_each_step_once() {
    let metrics = free_port();
    let listen = format!("127.0.0.1:{metrics}");
    let mut stack = stack_on_cluster(&["--metrics-listen", &listen], &["crm"]).await;
    // The backlog gauges are sampled over every partition, so on every primary.
    let sampled = eventually(TIMEOUT, || async {
        scrape(metrics).await.contains(
            "touchpoint_scheduler_redis_command_duration_seconds_count{command=\"backlog\"}",
        )
    })
    .await;
    assert!(
        sampled,
        "the backlog was sampled:\n{}",
        scrape(metrics).await
    );
    assert!(
        !scrape(metrics)
            .await
            .contains("touchpoint_scheduler_redis_errors_total{command=\"backlog\"}")
    );
    stack.apply(JOURNEY).await;
    let ids: Vec<String> = (0..30).map(|n| format!("k-{n:02}")).collect();
    let mut runs = Vec::new();
    for id in &ids[..15] {
        let run = stack
            .enroll("journey", contact(id, &[], &[]), &request_id())
            .await;
        assert!(run.created);
        runs.push(run.run_id);
    }
    runs.extend(enroll_batch(&mut stack, "journey", &ids[15..]).await);
    assert_on_every_primary(&stack, &runs);

    for (n, (id, run_id)) in ids.iter().zip(&runs).enumerate() {
        let event = match n % 3 {
            0 => "link.clicked",
            1 => "order.placed",
            _ => continue,
        };
        stack
            .client
            .wait_for_run(run_id, TIMEOUT, "waiting for a click", |run| {
                run.steps
                    .iter()
                    .any(|s| s.step_id == "wait-click" && s.status == StepStatus::Waiting as i32)
            })
            .await;
        assert_eq!(record_event(&mut stack, id, event).await, [run_id.as_str()]);
    }
    for (n, run_id) in runs.iter().enumerate() {
        let status = if n % 3 == 1 {
            RunStatus::Converted
        } else {
            RunStatus::Completed
        };
        stack.client.wait_for_status(run_id, status, TIMEOUT).await;
    }

    let delivered = delivered(&stack);
    for (n, id) in ids.iter().enumerate() {
        let expected: &[&str] = match n % 3 {
            0 => &["hello", "thanks"],
            1 => &["hello"],
            _ => &["hello", "remind"],
        };
        assert_eq!(
            delivered.get(id).cloned().unwrap_or_default(),
            expected,
            "{id}"
        );
    }
    assert_each_step_once(&stack);

    let listed: BTreeSet<String> = list_runs(&mut stack, "journey", RunStatus::Unspecified)
        .await
        .into_iter()
        .collect();
    assert_eq!(
        listed,
        runs.iter().cloned().collect(),
        "ListRuns gives every run once"
    );
    let converted = list_runs(&mut stack, "journey", RunStatus::Converted).await;
    assert_eq!(converted.len(), 10);

    let funnel = stats(&mut stack, "journey").await;
    assert_eq!(
        (
            funnel.entered,
            funnel.completed,
            funnel.converted,
            funnel.active
        ),
        (30, 20, 10, 0),
        "{funnel:?}"
    );
    assert_eq!(step_stats(&funnel, "hello").done, 30);
    let wait = step_stats(&funnel, "wait-click");
    assert_eq!(
        (wait.done, wait.timed_out, wait.left),
        (10, 10, 10),
        "{wait:?}"
    );
    assert_eq!(step_stats(&funnel, "thanks").done, 10);
    assert_eq!(step_stats(&funnel, "remind").done, 10);

    // Pause: a new run's first step is put aside on its primary; resume sends it.
    stack
        .client
        .playbooks
        .pause_playbook(PausePlaybookRequest {
            name: "journey".to_owned(),
        })
        .await
        .expect("PausePlaybook");
    let before = stack.receiver.count();
    let paused: Vec<String> = (0..6).map(|n| format!("paused-{n}")).collect();
    let paused_runs = enroll_batch(&mut stack, "journey", &paused).await;
    assert!(
        stays(Duration::from_secs(2), || async {
            stack.receiver.count() == before
        })
        .await,
        "nothing is sent while paused:\n{}",
        stack.receiver.summary()
    );
    stack
        .client
        .playbooks
        .resume_playbook(ResumePlaybookRequest {
            name: "journey".to_owned(),
        })
        .await
        .expect("ResumePlaybook");
    assert!(
        eventually(TIMEOUT, || async {
            stack.receiver.count() == before + paused.len()
        })
        .await,
        "the held steps go out after resume:\n{}",
        stack.receiver.summary()
    );
    for run_id in &paused_runs {
        let run = stack.client.run(run_id).await;
        assert_eq!(
            run.steps[0].status,
            StepStatus::Done as i32,
            "{}",
            run_summary(&run)
        );
    }
    assert_each_step_once(&stack);
}

/// Dead letters on every primary, listed newest first and retried (one by id, the rest
/// by playbook); a frequency cap spent per contact on its own primary; a recurring
/// playbook whose tick enrolls its audience from every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_caps_and_recurring_ticks_work_across_primaries() {
    let mut stack = stack_on_cluster(&[], &["crm", "sms"]).await;

    // Dead letters: the first 12 deliveries are refused for good (HTTP 400).
    stack
        .apply("name: fragile\nsteps:\n  - { id: notify, action: send_message, channel: crm }\n")
        .await;
    stack.receiver.respond_with(&[400; 12]);
    let fragile: Vec<String> = (0..12).map(|n| format!("d-{n:02}")).collect();
    let runs = enroll_batch(&mut stack, "fragile", &fragile).await;
    assert_on_every_primary(&stack, &runs);
    let all_dead = eventually(TIMEOUT, || {
        let client = stack.client.clone();
        let expected = runs.len();
        async move { dead_letters(client).await.len() == expected }
    })
    .await;
    assert!(all_dead, "{}", stack.receiver.summary());
    let listed = dead_letters(stack.client.clone()).await;
    let listed_ids: BTreeSet<&str> = listed.iter().map(|d| d.run_id.as_str()).collect();
    assert_eq!(
        listed_ids,
        runs.iter().map(String::as_str).collect(),
        "{listed:?}"
    );
    assert!(
        listed
            .windows(2)
            .all(|pair| pair[0].failed_at_ms >= pair[1].failed_at_ms),
        "newest first: {listed:?}"
    );
    let retried = |target: Target| {
        let mut client = stack.client.clone();
        async move {
            client
                .dead_letters
                .retry_dead_letters(RetryDeadLettersRequest {
                    target: Some(target),
                })
                .await
                .expect("RetryDeadLetters")
                .into_inner()
                .retried
        }
    };
    assert_eq!(retried(Target::RunId(runs[0].clone())).await, 1);
    assert_eq!(retried(Target::Playbook("fragile".to_owned())).await, 11);
    for run_id in &runs {
        stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
    }
    for run_id in &runs {
        let attempts: Vec<_> = stack
            .receiver
            .requests()
            .into_iter()
            .filter(|r| r.run_id() == run_id)
            .collect();
        assert_eq!(attempts.len(), 2, "a 400, then the retry's 200");
        assert_eq!(attempts[0].webhook_id(), attempts[1].webhook_id());
    }

    // A cap of one SMS a day: each contact gets the first of two.
    stack
        .client
        .policy
        .apply_policy(ApplyPolicyRequest {
            yaml: "caps:\n  - { channel: sms, max: 1, per: 1d }\n".to_owned(),
            dry_run: false,
        })
        .await
        .expect("ApplyPolicy");
    stack
        .apply(
            "name: twice\nsteps:\n  - { id: first, action: send_message, channel: sms }\n  \
             - { id: second, action: send_message, channel: sms }\n",
        )
        .await;
    // Let the scheduler load the policy (it reads it every second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let capped: Vec<String> = (0..12).map(|n| format!("s-{n:02}")).collect();
    let runs = enroll_batch(&mut stack, "twice", &capped).await;
    assert_on_every_primary(&stack, &runs);
    for run_id in &runs {
        let run = stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
        assert!(
            run.steps[1].detail.starts_with("capped"),
            "{}",
            run_summary(&run)
        );
    }
    let delivered_now = delivered(&stack);
    for id in &capped {
        assert_eq!(
            delivered_now.get(id).cloned().unwrap_or_default(),
            ["first"],
            "{id}"
        );
    }
    let funnel = stats(&mut stack, "twice").await;
    assert_eq!(step_stats(&funnel, "first").done, 12);
    assert_eq!(step_stats(&funnel, "second").capped, 12);

    // A recurring playbook, a tick every second, for contacts tagged `vip` (once each).
    let vips: Vec<String> = (0..12).map(|n| format!("v-{n:02}")).collect();
    for id in &vips {
        stack
            .client
            .contacts
            .upsert_contact(UpsertContactRequest {
                contact: Some(contact(id, &[], &["vip"])),
                ..UpsertContactRequest::default()
            })
            .await
            .expect("UpsertContact");
    }
    stack
        .apply(
            "name: every-second\nentry: { reentry: never }\n\
             schedule: { cron: \"* * * * * *\", tz: UTC, audience: { tags: [vip] } }\n\
             steps:\n  - { id: ping, action: send_message, channel: crm }\n",
        )
        .await;
    let pinged = || {
        let delivered = delivered(&stack);
        vips.iter()
            .filter(|id| {
                delivered
                    .get(*id)
                    .is_some_and(|steps| steps.contains(&"ping".to_owned()))
            })
            .count()
    };
    assert!(
        eventually(TIMEOUT, || async { pinged() == vips.len() }).await,
        "every vip is pinged:\n{}",
        stack.receiver.summary()
    );
    let ticked = list_runs(&mut stack, "every-second", RunStatus::Unspecified).await;
    assert_on_every_primary(&stack, &ticked);
    assert!(
        stays(Duration::from_secs(3), || async {
            let delivered = delivered(&stack);
            let pings: usize = delivered
                .values()
                .map(|steps| steps.iter().filter(|s| *s == "ping").count())
                .sum();
            pings == vips.len()
        })
        .await,
        "later ticks enroll nobody again (reentry: never), and only vips:\n{}",
        stack.receiver.summary()
    );
    assert_each_step_once(&stack);
}

/// Commands on keys of many slots are answered in order by `query_each` (one pipeline
/// on a single server, command by command on a cluster), where a cluster refuses one
/// pipeline across slots.
#[tokio::test]
async fn commands_across_slots_are_answered_in_order() {
    let cluster = RedisCluster::start();
    let conn = RedisConnection::connect(&cluster.url())
        .await
        .expect("connect to the cluster");
    let keys: Vec<String> = (0..64).map(|p| format!("t:{{p{p}}}:n")).collect();
    let command = |name: &str, key: &str| {
        let mut command = redis::cmd(name);
        command.arg(key);
        command
    };
    let sets = keys
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let mut set = command("SET", key);
            set.arg(i);
            set
        })
        .collect();
    conn.query_each(sets).await.expect("SET on every slot");
    let answers = conn
        .query_each(keys.iter().map(|key| command("GET", key)).collect())
        .await
        .expect("GET on every slot");
    let values: Vec<usize> = answers
        .into_iter()
        .map(|value| redis::from_redis_value(value).expect("a number"))
        .collect();
    assert_eq!(values, (0..keys.len()).collect::<Vec<_>>());

    let mut pipe = redis::pipe();
    for key in &keys {
        pipe.get(key);
    }
    let refused = pipe
        .query_async::<Vec<usize>>(&mut conn.clone())
        .await
        .expect_err("a pipeline across slots");
    assert!(
        refused.to_string().to_lowercase().contains("cross"),
        "{refused}"
    );

    // The store's one transaction (MULTI/EXEC) keeps to one partition's slot.
    let store = Store::connect(&cluster.url(), "t", 16, 60)
        .await
        .expect("a store on the cluster");
    let entry = DeadLetterEntry {
        run_id: "gone-3".to_owned(),
        partition: 3,
        failed_at_ms: 0,
    };
    store
        .forget_dead_letter(&entry, Some("welcome"))
        .await
        .expect("a transaction on one slot");
}

/// The scheduler refuses a cluster with one primary that could evict keys, naming it.
#[tokio::test]
async fn a_primary_that_may_evict_keys_is_refused() {
    let cluster = RedisCluster::start();
    let evicting = &cluster.nodes()[1];
    let mut conn = evicting
        .client()
        .get_connection()
        .expect("connect to a node");
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query(&mut conn)
        .expect("CONFIG SET");
    let refused = Store::connect(&cluster.url(), "tp", 16, 60)
        .await
        .map(|_| ())
        .expect_err("an evicting primary");
    let message = refused.to_string();
    assert!(
        message.contains(&format!(
            "at 127.0.0.1:{} maxmemory-policy is allkeys-lru",
            evicting.port()
        )),
        "{message}"
    );
}
