//! The Lua scripts of the scheduler's store, against a real redis-server (or a Redis
//! Cluster with `TOUCHPOINT_TEST_REDIS=cluster`): claims are exclusive, leases expire
//! back to due with the attempt counted, and an outcome only counts under the fencing
//! token of the lease it was handed out under.

use std::collections::HashSet;

use touchpoint_scheduler::{
    playbook::Reentry,
    run::{RunStatus, new_run_id},
    store::{Completion, ContactRecord, Enrolled, Listed, NewRun, Op, Retried, Store},
};
use touchpoint_tests::TestRedis;

const PARTITIONS: u16 = 4;

async fn store(redis: &TestRedis) -> Store {
    Store::connect(&redis.url(), "t", PARTITIONS, 60)
        .await
        .expect("connect to the test redis")
}

fn new_run(partition: u16, contact: &str, request_id: Option<&str>, now: i64) -> NewRun {
    NewRun {
        run_id: new_run_id(partition),
        partition,
        playbook: "p".into(),
        version: 1,
        contact: ContactRecord {
            id: contact.into(),
            tags: vec!["paid".into()],
            ..ContactRecord::default()
        },
        first_step: 0,
        due_ms: now,
        then_step: None,
        now_ms: now,
        traceparent: String::new(),
        request_id: request_id.map(str::to_owned),
        reentry: Reentry::Always,
        goal: None,
        trigger: None,
    }
}

/// `Store::enroll` as (run id, started).
async fn enroll(store: &Store, run: &NewRun) -> (String, bool) {
    let enrolled = store.enroll(run).await.expect("enroll");
    (
        enrolled.run_id().to_owned(),
        matches!(enrolled, Enrolled::Started(_)),
    )
}

fn finish(run_id: &str, fence: u64) -> Completion {
    Completion {
        run_id: run_id.into(),
        fence,
        op: Op::Finish {
            index: 1,
            status: RunStatus::Completed,
        },
        detail: String::new(),
        entry: None,
        stat: None,
        unwait: false,
        refund: None,
    }
}

#[tokio::test]
async fn a_stale_outcome_is_refused_after_its_lease_expired() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let now = 1_000_000;
    let (run_id, _) = enroll(&store, &new_run(1, "c-1", None, now)).await;

    let first = store.claim(1, now, 10, 100).await.unwrap();
    assert_eq!(first.runs.len(), 1);
    let first_fence = first.runs[0].fence;
    assert_eq!(first.runs[0].attempt, 1);
    assert_eq!(first.runs[0].contact.tags, vec!["paid".to_owned()]);

    // Not due again while leased.
    assert!(
        store
            .claim(1, now + 50, 10, 100)
            .await
            .unwrap()
            .runs
            .is_empty()
    );

    // The lease expires: the same call returns it to due and hands it out again.
    let second = store.claim(1, now + 200, 10, 100).await.unwrap();
    assert_eq!(second.expired, 1);
    assert_eq!(second.runs.len(), 1);
    assert_eq!(
        second.runs[0].attempt, 2,
        "an expired lease counts as an attempt"
    );
    assert!(second.runs[0].fence > first_fence);

    let (applied, stale) = store
        .complete(1, now + 210, &[finish(&run_id, first_fence)])
        .await
        .unwrap();
    assert_eq!(
        (applied, stale),
        (0, 1),
        "the old holder's outcome must be refused"
    );
    let (applied, stale) = store
        .complete(1, now + 220, &[finish(&run_id, second.runs[0].fence)])
        .await
        .unwrap();
    assert_eq!((applied, stale), (1, 0));
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed);

    // A finished run expires after the retention period.
    let mut conn = redis.connection().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("t:{{p1}}:run:{run_id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 60, "ttl {ttl}");
}

#[tokio::test]
async fn the_same_request_id_starts_one_run() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let (first, created) = enroll(&store, &new_run(2, "c-2", Some("req-1"), 10)).await;
    assert!(created);
    let (again, created) = enroll(&store, &new_run(2, "c-2", Some("req-1"), 20)).await;
    assert!(!created);
    assert_eq!(first, again);
    let claimed = store.claim(2, 100, 10, 1000).await.unwrap();
    assert_eq!(claimed.runs.len(), 1, "one run, scheduled once");
}

/// A batch goes to Redis as one script call per partition, yet each run is decided as
/// if enrolled alone, in order: a request id repeated within the batch starts one run,
/// a contact's second run in the batch meets the reentry rule, and results follow the
/// batch's order.
#[tokio::test]
async fn a_batch_is_decided_run_by_run_in_order() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let now = 50_000;
    let never = |partition, contact: &str, request: Option<&str>| {
        let mut run = new_run(partition, contact, request, now);
        run.reentry = Reentry::Never;
        run
    };
    let mut batch = vec![
        never(0, "c-a", Some("r-1")),
        never(1, "c-b", None),
        never(0, "c-c", Some("r-1")),
        never(1, "c-b", None),
        never(2, "c-d", None),
    ];
    // The refused enrollment still updates its contact.
    batch[3]
        .contact
        .attrs
        .insert("tier".to_owned(), "gold".to_owned());
    let results: Vec<Enrolled> = store
        .enroll_many(&batch)
        .await
        .into_iter()
        .map(|result| result.expect("enroll"))
        .collect();
    assert_eq!(results[0], Enrolled::Started(batch[0].run_id.clone()));
    assert_eq!(results[1], Enrolled::Started(batch[1].run_id.clone()));
    assert_eq!(
        results[2],
        Enrolled::Replayed(batch[0].run_id.clone()),
        "the request id was used by the batch's first run"
    );
    assert!(
        matches!(&results[3], Enrolled::Refused { last_run, .. } if *last_run == batch[1].run_id),
        "{:?}",
        results[3]
    );
    assert_eq!(results[4], Enrolled::Started(batch[4].run_id.clone()));
    let contact = store
        .get_contact("c-b")
        .await
        .expect("read the contact")
        .expect("the contact exists");
    assert_eq!(contact.attrs.get("tier").map(String::as_str), Some("gold"));

    // The three started runs are due once each, in their partitions.
    let mut due = Vec::new();
    for partition in 0..PARTITIONS {
        let claim = store.claim(partition, now, 100, 1000).await.expect("claim");
        due.extend(claim.runs.into_iter().map(|run| run.run_id));
    }
    due.sort();
    let mut started = vec![
        batch[0].run_id.clone(),
        batch[1].run_id.clone(),
        batch[4].run_id.clone(),
    ];
    started.sort();
    assert_eq!(due, started);
}

/// Listing a playbook's runs merges the partitions' lists newest first: pages of any
/// size return every run once, in order, however the runs fall on the partitions.
#[tokio::test]
async fn a_playbooks_runs_list_newest_first_across_partitions() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    // Uneven: most runs in partition 2, a few elsewhere, none in partition 3.
    let mut batch = Vec::new();
    for n in 0..60 {
        let partition = match n % 10 {
            0 => 0,
            1 => 1,
            _ => 2,
        };
        batch.push(new_run(partition, &format!("c-{n}"), None, 1000 + n));
    }
    // Two batches, so that the second is newer in every partition.
    let (first, second) = batch.split_at(30);
    for half in [first, second] {
        for result in store.enroll_many(half).await {
            result.expect("enroll");
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut whole: Option<Vec<String>> = None;
    for page_size in [1, 7, 60, 100] {
        let mut listed: Vec<Listed> = Vec::new();
        let mut before = None;
        loop {
            let page = store
                .playbook_run_ids("p", before, page_size)
                .await
                .expect("list");
            assert!(page.len() <= page_size);
            let Some(last) = page.last() else { break };
            before = Some(last.position);
            listed.extend(page);
        }
        assert!(
            listed.windows(2).all(|w| w[0].position > w[1].position),
            "newest first, each once: {listed:?}"
        );
        let ids: Vec<String> = listed.into_iter().map(|l| l.run_id).collect();
        // Every run once; within a partition, in reverse order of enrollment.
        let mut sorted = ids.clone();
        sorted.sort();
        let mut enrolled: Vec<String> = batch.iter().map(|run| run.run_id.clone()).collect();
        enrolled.sort();
        assert_eq!(sorted, enrolled, "pages of {page_size}");
        for partition in 0..PARTITIONS {
            let in_partition = |ids: Vec<&String>| -> Vec<String> {
                ids.into_iter()
                    .filter(|id| id.ends_with(&format!("-{partition}")))
                    .cloned()
                    .collect()
            };
            let mut newest_first = in_partition(batch.iter().map(|run| &run.run_id).collect());
            newest_first.reverse();
            assert_eq!(in_partition(ids.iter().collect()), newest_first);
        }
        // The second batch before the first.
        let second_ids: Vec<&String> = second.iter().map(|run| &run.run_id).collect();
        assert!(
            ids[..30].iter().all(|id| second_ids.contains(&id)),
            "{ids:?}"
        );
        match &whole {
            None => whole = Some(ids),
            Some(whole) => assert_eq!(&ids, whole, "the same order whatever the page size"),
        }
    }
}

#[tokio::test]
async fn concurrent_claims_never_hand_out_a_run_twice() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let mut enrolled = HashSet::new();
    for i in 0..200 {
        let (run_id, _) = enroll(&store, &new_run(3, &format!("c-{i}"), None, 10)).await;
        enrolled.insert(run_id);
    }
    let claims = futures_claims(&store).await;
    let mut seen = HashSet::new();
    for run in claims {
        assert!(seen.insert(run), "a run was claimed twice");
    }
    assert_eq!(seen, enrolled);
}

async fn futures_claims(store: &Store) -> Vec<String> {
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let claim = store.claim(3, 100, 17, 60_000).await.expect("claim");
                    if claim.runs.is_empty() {
                        return ids;
                    }
                    ids.extend(claim.runs.into_iter().map(|r| r.run_id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("claiming task"));
    }
    all
}

#[tokio::test]
async fn a_retry_is_due_at_its_backoff_and_keeps_its_attempt_count() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let (run_id, _) = enroll(&store, &new_run(0, "c-3", None, 10)).await;
    let claim = store.claim(0, 10, 10, 1000).await.unwrap();
    let retry = Completion {
        run_id: run_id.clone(),
        fence: claim.runs[0].fence,
        op: Op::Retry {
            index: 0,
            due_ms: 500,
            attempt: 2,
        },
        detail: "attempt 1: HTTP 503".into(),
        entry: None,
        stat: None,
        unwait: false,
        refund: None,
    };
    assert_eq!(store.complete(0, 20, &[retry]).await.unwrap(), (1, 0));
    assert!(store.claim(0, 499, 10, 1000).await.unwrap().runs.is_empty());
    let again = store.claim(0, 500, 10, 1000).await.unwrap();
    assert_eq!(again.runs[0].attempt, 2);
}

/// A worker that re-attached may report one result twice (it cannot know whether the
/// copy on its broken stream arrived), and both copies can land in one batch: only the
/// first counts. The run's lease and fencing token are what a scheduler with no record of
/// the step looks up before applying a result.
#[tokio::test]
async fn the_same_outcome_twice_in_one_batch_counts_once() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let (run_id, _) = enroll(&store, &new_run(2, "c-5", None, 10)).await;
    let claim = store.claim(2, 10, 10, 60_000).await.unwrap();
    let fence = claim.runs[0].fence;
    let leased = store.get_run(&run_id).await.unwrap().unwrap();
    assert!(leased.leased);
    assert_eq!(leased.fence, fence);

    let next = Completion {
        run_id: run_id.clone(),
        fence,
        op: Op::Next {
            index: 1,
            due_ms: 500,
            then_step: None,
        },
        detail: "attempt 1: HTTP 200".into(),
        entry: Some(failed_entry(0, "done")),
        stat: None,
        unwait: false,
        refund: None,
    };
    assert_eq!(
        store
            .complete(2, 20, &[next.clone(), next.clone()])
            .await
            .unwrap(),
        (1, 1)
    );
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.timeline.len(), 1, "one timeline entry");
    assert_eq!((run.step_index, run.leased), (1, false));
    assert_eq!(
        store.complete(2, 30, &[next]).await.unwrap(),
        (0, 1),
        "and refused later"
    );
}

#[tokio::test]
async fn cancelling_fences_out_the_worker_holding_the_step() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let (run_id, _) = enroll(&store, &new_run(1, "c-4", None, 10)).await;
    let claim = store.claim(1, 10, 10, 60_000).await.unwrap();
    let entry = touchpoint_scheduler::run::TimelineEntry {
        index: 0,
        outcome: touchpoint_scheduler::run::StepOutcome::Cancelled,
        attempts: 1,
        due_ms: 10,
        done_ms: 20,
        worker: String::new(),
        channel: String::new(),
        detail: "cancelled".into(),
    };
    assert!(store.cancel(&run_id, 20, &entry, None).await.unwrap());
    assert!(
        !store.cancel(&run_id, 30, &entry, None).await.unwrap(),
        "already finished"
    );
    let outcome = finish(&run_id, claim.runs[0].fence);
    assert_eq!(store.complete(1, 40, &[outcome]).await.unwrap(), (0, 1));
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Cancelled);
    assert_eq!(run.timeline.len(), 1);
}

#[tokio::test]
async fn a_deployment_keeps_its_partition_count() {
    let redis = TestRedis::from_env();
    store(&redis).await;
    let err = Store::connect(&redis.url(), "t", PARTITIONS * 2, 60)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--partitions 4"), "{err}");
}

/// A scheduler records the data format it writes, and refuses a Redis written by a later
/// one (a rollback would misread its runs and miss its timers).
#[tokio::test]
async fn a_scheduler_refuses_data_written_by_a_later_one() {
    let redis = TestRedis::from_env();
    store(&redis).await;
    let mut conn = redis.connection().await;
    let format: u32 = redis::cmd("HGET")
        .arg("t:meta")
        .arg("format")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert_eq!(format, touchpoint_scheduler::store::DATA_FORMAT);
    let () = redis::cmd("HSET")
        .arg("t:meta")
        .arg("format")
        .arg(format + 1)
        .query_async(&mut conn)
        .await
        .expect("HSET");
    let err = Store::connect(&redis.url(), "t", PARTITIONS, 60)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("data in format {}", format + 1)),
        "{err}"
    );
}

/// A failed timeline entry at step `index`, as the engine records one.
fn failed_entry(index: usize, detail: &str) -> touchpoint_scheduler::run::TimelineEntry {
    touchpoint_scheduler::run::TimelineEntry {
        index,
        outcome: touchpoint_scheduler::run::StepOutcome::Failed,
        attempts: 3,
        due_ms: 10,
        done_ms: 20,
        worker: "w-1".into(),
        channel: "wecom".into(),
        detail: detail.into(),
    }
}

/// Enrolls a run of `playbook` at `now` in `partition`, claims it and fails it at step 0
/// with a failed timeline entry (a dead letter) or without one (`entry: false`).
async fn fail_run(store: &Store, partition: u16, playbook: &str, now: i64, entry: bool) -> String {
    let mut run = new_run(partition, &format!("c-{now}"), None, now);
    run.playbook = playbook.into();
    let (run_id, _) = enroll(store, &run).await;
    let claim = store
        .claim(partition, now, 1000, 60_000)
        .await
        .expect("claim");
    let fence = claim
        .runs
        .iter()
        .find(|r| r.run_id == run_id)
        .map(|r| r.fence)
        .expect("the new run is claimed");
    let failed = Completion {
        run_id: run_id.clone(),
        fence,
        op: Op::Finish {
            index: 0,
            status: RunStatus::Failed,
        },
        detail: "attempt 3: HTTP 503".into(),
        entry: entry.then(|| failed_entry(0, "gave up after 3 attempts: HTTP 503")),
        stat: None,
        unwait: false,
        refund: None,
    };
    assert_eq!(
        store
            .complete(partition, now, &[failed])
            .await
            .expect("complete"),
        (1, 0)
    );
    run_id
}

async fn ttl(redis: &TestRedis, run_id: &str, partition: u16) -> i64 {
    let mut conn = redis.connection().await;
    redis::cmd("TTL")
        .arg(format!("t:{{p{partition}}}:run:{run_id}"))
        .query_async(&mut conn)
        .await
        .expect("TTL")
}

#[tokio::test]
async fn a_run_failed_at_a_step_is_dead_lettered_without_expiry_until_retried() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let dead = fail_run(&store, 1, "p", 100, true).await;
    // Failing without a step entry (the playbook version cannot be loaded) is not a dead letter.
    let not_dead = fail_run(&store, 1, "p", 200, false).await;

    let listed = store.dead_letters(None, None, 10).await.unwrap();
    assert_eq!(
        listed.iter().map(|e| e.run_id.as_str()).collect::<Vec<_>>(),
        [dead.as_str()]
    );
    assert_eq!(listed[0].failed_at_ms, 100);
    assert_eq!(listed[0].partition, 1);
    assert_eq!(
        ttl(&redis, &dead, 1).await,
        -1,
        "a dead letter does not expire"
    );
    let other = ttl(&redis, &not_dead, 1).await;
    assert!(other > 0 && other <= 60, "ttl {other}");

    assert_eq!(
        store.retry_dead_letter(&not_dead, 300).await.unwrap(),
        Retried::NotDeadLettered
    );
    assert_eq!(
        store.retry_dead_letter(&new_run_id(1), 300).await.unwrap(),
        Retried::NotFound
    );
    assert_eq!(
        store.retry_dead_letter("nonsense", 300).await.unwrap(),
        Retried::NotFound
    );

    assert_eq!(
        store.retry_dead_letter(&dead, 300).await.unwrap(),
        Retried::Retried
    );
    assert!(store.dead_letters(None, None, 10).await.unwrap().is_empty());
    assert!(
        store
            .dead_letters(Some("p"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let run = store.get_run(&dead).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Active);
    assert_eq!((run.step_index, run.attempt, run.due_ms), (0, 1, 300));
    assert!(run.timeline.is_empty(), "{:?}", run.timeline);
    assert!(run.detail.is_empty(), "{}", run.detail);
    assert_eq!(ttl(&redis, &dead, 1).await, -1);
    assert_eq!(
        store.retry_dead_letter(&dead, 310).await.unwrap(),
        Retried::NotDeadLettered,
        "retried once"
    );

    // Due again at the same step, first attempt.
    let claim = store.claim(1, 300, 10, 60_000).await.unwrap();
    assert_eq!(claim.runs.len(), 1);
    assert_eq!(claim.runs[0].run_id, dead);
    assert_eq!((claim.runs[0].step_index, claim.runs[0].attempt), (0, 1));
}

#[tokio::test]
async fn the_retry_keeps_the_timeline_of_earlier_steps() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let (run_id, _) = enroll(&store, &new_run(2, "c-t", None, 10)).await;
    let claim = store.claim(2, 10, 10, 60_000).await.unwrap();
    let mut done = failed_entry(0, "HTTP 200");
    done.outcome = touchpoint_scheduler::run::StepOutcome::Done;
    let next = Completion {
        run_id: run_id.clone(),
        fence: claim.runs[0].fence,
        op: Op::Next {
            index: 1,
            due_ms: 20,
            then_step: None,
        },
        detail: String::new(),
        entry: Some(done.clone()),
        stat: None,
        unwait: false,
        refund: None,
    };
    assert_eq!(store.complete(2, 10, &[next]).await.unwrap(), (1, 0));
    let claim = store.claim(2, 20, 10, 60_000).await.unwrap();
    let failed = Completion {
        run_id: run_id.clone(),
        fence: claim.runs[0].fence,
        op: Op::Finish {
            index: 1,
            status: RunStatus::Failed,
        },
        detail: "attempt 1: HTTP 400".into(),
        entry: Some(failed_entry(1, "HTTP 400")),
        stat: None,
        unwait: false,
        refund: None,
    };
    assert_eq!(store.complete(2, 30, &[failed]).await.unwrap(), (1, 0));
    assert_eq!(
        store
            .get_run(&run_id)
            .await
            .unwrap()
            .unwrap()
            .timeline
            .len(),
        2
    );

    assert_eq!(
        store.retry_dead_letter(&run_id, 40).await.unwrap(),
        Retried::Retried
    );
    let run = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.timeline, [done], "only the failed line is dropped");
    assert_eq!((run.status, run.step_index), (RunStatus::Active, 1));
}

#[tokio::test]
async fn dead_letters_list_newest_first_across_partitions_by_page() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    // 30 dead letters over every partition, two playbooks.
    let mut expected = Vec::new();
    for i in 0..30_i64 {
        // Pairs fail in the same ms in one partition, and pairs of pairs in two.
        let partition = u16::try_from(i / 2 % 4).unwrap();
        let playbook = if i % 3 == 0 { "a" } else { "b" };
        let now = 1000 + i / 4 * 10;
        let run_id = fail_run(&store, partition, playbook, now, true).await;
        expected.push((now, run_id, playbook));
    }
    expected.sort_by(|x, y| (y.0, &y.1).cmp(&(x.0, &x.1)));

    for (filter, page) in [
        (None, 1),
        (None, 7),
        (Some("a"), 3),
        (Some("b"), 16),
        (None, 100),
    ] {
        let want: Vec<&str> = expected
            .iter()
            .filter(|(_, _, p)| filter.is_none_or(|f| f == *p))
            .map(|(_, id, _)| id.as_str())
            .collect();
        let mut got = Vec::new();
        let mut cursor = None;
        loop {
            let entries = store
                .dead_letters(filter, cursor.as_ref(), page)
                .await
                .unwrap();
            assert!(entries.len() <= page);
            cursor = entries.last().map(|e| e.cursor());
            let full = entries.len() == page;
            got.extend(entries.into_iter().map(|e| e.run_id));
            if !full {
                break;
            }
        }
        assert_eq!(got, want, "filter {filter:?}, page {page}");
    }

    let retried = store
        .retry_dead_letters_of_playbook("a", 2, 5000)
        .await
        .unwrap();
    let total: u64 = retried.iter().map(|(_, n)| n).sum();
    assert_eq!(total, 10);
    assert!(
        store
            .dead_letters(Some("a"), None, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.dead_letters(None, None, 100).await.unwrap().len(), 20);
}

/// The lease deadline of `run_id` in `partition` (None: not leased).
async fn lease_deadline(redis: &TestRedis, run_id: &str, partition: u16) -> Option<i64> {
    let mut conn = redis.connection().await;
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(format!("t:{{p{partition}}}:lease"))
        .arg(run_id)
        .query_async(&mut conn)
        .await
        .expect("ZSCORE");
    score.map(|s| s as i64)
}

/// A heartbeat extends a lease only under its current fencing token and only before it
/// expired; a stale token (superseded by a later claim or a cancel) extends nothing.
#[tokio::test]
async fn a_heartbeat_extends_only_a_live_lease_under_its_fence() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let now = 1_000_000;
    let (a, _) = enroll(&store, &new_run(2, "c-a", None, now)).await;
    let (b, _) = enroll(&store, &new_run(2, "c-b", None, now)).await;
    let claim = store.claim(2, now, 10, 100).await.unwrap();
    let fence = |id: &str| claim.runs.iter().find(|r| r.run_id == id).unwrap().fence;
    let (fa, fb) = (fence(&a), fence(&b));

    // One call per partition; b is listed under a fence it never had.
    let extended = store
        .extend(2, now + 50, 100, &[(a.clone(), fa), (b.clone(), fb + 1)])
        .await
        .unwrap();
    assert_eq!(extended, std::slice::from_ref(&a));
    assert_eq!(lease_deadline(&redis, &a, 2).await, Some(now + 150));
    assert_eq!(lease_deadline(&redis, &b, 2).await, Some(now + 100));
    // A shorter lease never moves a deadline earlier.
    assert_eq!(
        store
            .extend(2, now + 60, 10, &[(a.clone(), fa)])
            .await
            .unwrap(),
        std::slice::from_ref(&a)
    );
    assert_eq!(lease_deadline(&redis, &a, 2).await, Some(now + 150));

    // At now + 120 only b's lease has expired: a is still held, b goes out again.
    let second = store.claim(2, now + 120, 10, 100).await.unwrap();
    assert_eq!(second.expired, 1);
    assert_eq!(second.runs.len(), 1);
    assert_eq!(second.runs[0].run_id, b);
    let fb2 = second.runs[0].fence;
    assert!(fb2 > fb);
    // The old holder of b is superseded: its heartbeat extends nothing.
    assert!(
        store
            .extend(2, now + 130, 100, &[(b.clone(), fb)])
            .await
            .unwrap()
            .is_empty(),
        "a superseded lease must not be extended"
    );
    assert_eq!(lease_deadline(&redis, &b, 2).await, Some(now + 220));

    // a's lease ran out at now + 150 and no claim has taken it back yet: still in the lease
    // set, but expired, so a late heartbeat does not revive it.
    assert!(
        store
            .extend(2, now + 150, 100, &[(a.clone(), fa)])
            .await
            .unwrap()
            .is_empty(),
        "an expired lease must not be extended"
    );
    assert_eq!(lease_deadline(&redis, &a, 2).await, Some(now + 150));

    // Cancelling b bumps its fence and drops its lease: nothing to extend.
    let entry = touchpoint_scheduler::run::TimelineEntry {
        outcome: touchpoint_scheduler::run::StepOutcome::Cancelled,
        ..failed_entry(0, "cancelled")
    };
    assert!(store.cancel(&b, now + 160, &entry, None).await.unwrap());
    assert!(
        store
            .extend(2, now + 170, 100, &[(b.clone(), fb2)])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(lease_deadline(&redis, &b, 2).await, None);

    // The outcome under the extended, then expired, lease of a: refused once it went out
    // again, as any stale outcome.
    let third = store.claim(2, now + 200, 10, 100).await.unwrap();
    assert_eq!(third.runs.len(), 1);
    assert_eq!(
        store
            .complete(2, now + 210, &[finish(&a, fa)])
            .await
            .unwrap(),
        (0, 1)
    );
}

/// The run hash's `wn` field, read straight from Redis.
async fn wait_next(redis: &TestRedis, run_id: &str, partition: u16) -> Option<String> {
    let mut conn = redis.connection().await;
    redis::cmd("HGET")
        .arg(format!("t:{{p{partition}}}:run:{run_id}"))
        .arg("wn")
        .query_async(&mut conn)
        .await
        .expect("HGET")
}

#[tokio::test]
async fn the_claim_at_a_waits_end_moves_the_run_straight_on_to_the_next_step() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let now = 1_000_000;
    let wait_ends = now + 3_000;
    let waiting = NewRun {
        due_ms: wait_ends,
        then_step: Some(1),
        ..new_run(2, "c-wait", None, now)
    };
    let (run_id, _) = enroll(&store, &waiting).await;
    assert_eq!(wait_next(&redis, &run_id, 2).await.as_deref(), Some("0 1"));
    assert!(store.claim(2, now, 10, 100).await.unwrap().runs.is_empty());

    let claim = store.claim(2, wait_ends + 5, 10, 100).await.unwrap();
    assert_eq!(claim.runs.len(), 1);
    let run = &claim.runs[0];
    assert_eq!(
        (run.step_index, run.attempt),
        (1, 1),
        "claimed at the step after the wait"
    );
    assert_eq!(
        run.due_ms, wait_ends,
        "due when the wait ended (its lag shows)"
    );
    let record = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(record.step_index, 1);
    assert_eq!(record.fence, run.fence);
    let [wait] = record.timeline.as_slice() else {
        panic!("one timeline entry, the wait's: {:?}", record.timeline);
    };
    assert_eq!(
        (wait.index, wait.due_ms, wait.done_ms, wait.attempts),
        (0, wait_ends, wait_ends + 5, 0)
    );
    let stats = store.stats("p", 1).await.unwrap();
    assert_eq!(stats.get("0:done"), Some(&1), "{stats:?}");
    assert_eq!(stats.get("1:in"), Some(&1), "{stats:?}");

    // Its lease runs out: claimed again at the same step, the wait not done twice.
    let again = store.claim(2, wait_ends + 200, 10, 100).await.unwrap();
    assert_eq!(again.expired, 1);
    assert_eq!(again.runs.len(), 1);
    assert_eq!((again.runs[0].step_index, again.runs[0].attempt), (1, 2));
    let record = store.get_run(&run_id).await.unwrap().unwrap();
    assert_eq!(record.timeline.len(), 1, "{:?}", record.timeline);
    assert_eq!(store.stats("p", 1).await.unwrap().get("0:done"), Some(&1));

    // Its outcome moves it on like any claimed step's.
    let (applied, stale) = store
        .complete(2, wait_ends + 210, &[finish(&run_id, again.runs[0].fence)])
        .await
        .unwrap();
    assert_eq!((applied, stale), (1, 0));
}

#[tokio::test]
async fn a_wait_next_mark_of_a_step_the_run_left_is_ignored() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let now = 1_000_000;
    let stale = NewRun {
        first_step: 2,
        then_step: Some(3),
        ..new_run(3, "c-stale", None, now)
    };
    let (run_id, _) = enroll(&store, &stale).await;
    let mut conn = redis.connection().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("t:{{p3}}:run:{run_id}"))
        .arg("wn")
        .arg("0 1")
        .query_async(&mut conn)
        .await
        .expect("HSET");

    let claim = store.claim(3, now, 10, 100).await.unwrap();
    assert_eq!(claim.runs.len(), 1);
    assert_eq!(claim.runs[0].step_index, 2, "still at its own step");
    let record = store.get_run(&run_id).await.unwrap().unwrap();
    assert!(record.timeline.is_empty(), "{:?}", record.timeline);
}

#[tokio::test]
async fn the_run_list_sweep_drops_only_entries_of_runs_that_are_gone() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let batch: Vec<NewRun> = (0..25)
        .map(|n| new_run(1, &format!("c-sweep-{n}"), None, 1000 + n))
        .collect();
    for result in store.enroll_many(&batch).await {
        result.expect("enroll");
    }
    // Every third run expired (its hash is gone).
    let mut conn = redis.connection().await;
    let mut kept = Vec::new();
    for (n, run) in batch.iter().enumerate() {
        if n % 3 == 0 {
            let _: () = redis::cmd("DEL")
                .arg(format!("t:{{p1}}:run:{}", run.run_id))
                .query_async(&mut conn)
                .await
                .expect("DEL");
        } else {
            kept.push(run.run_id.clone());
        }
    }

    // Only entries of runs enrolled by the time given are looked at: none yet.
    let before = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms")
        - 60_000;
    let early = store
        .sweep_run_list(1, "p", None, Some(before), 100)
        .await
        .expect("sweep the older part");
    assert_eq!(
        early,
        (0, None),
        "runs enrolled after the bound were looked at"
    );

    // Pages of 10: three calls, the last one ending the list.
    let mut after = None;
    let mut dropped = 0;
    let mut calls = 0;
    loop {
        let (gone, next) = store
            .sweep_run_list(1, "p", after.as_deref(), None, 10)
            .await
            .expect("sweep");
        dropped += gone;
        calls += 1;
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!((dropped, calls), (9, 3));
    let mut listed: Vec<String> = store
        .playbook_run_ids("p", None, 100)
        .await
        .expect("list")
        .into_iter()
        .map(|l| l.run_id)
        .collect();
    listed.sort();
    kept.sort();
    assert_eq!(listed, kept);
    let (gone, next) = store
        .sweep_run_list(1, "p", None, None, 100)
        .await
        .expect("sweep again");
    assert_eq!((gone, next), (0, None), "nothing left to drop");
}

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// Entries of `partition`'s due set and of its hourly lists of timers far ahead.
async fn timers(redis: &TestRedis, partition: u16) -> (u64, u64) {
    let mut conn = redis.connection().await;
    let later = format!("t:{{p{partition}}}:later");
    let due: u64 = redis::cmd("ZCARD")
        .arg(format!("t:{{p{partition}}}:due"))
        .query_async(&mut conn)
        .await
        .expect("ZCARD");
    let hours: Vec<String> = redis::cmd("ZRANGE")
        .arg(&later)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .expect("ZRANGE");
    let mut listed = 0;
    for hour in hours {
        let length: u64 = redis::cmd("LLEN")
            .arg(format!("{later}:{hour}"))
            .query_async(&mut conn)
            .await
            .expect("LLEN");
        listed += length;
    }
    (due, listed)
}

/// A step three days ahead waits in its hour's list, not in the due set; the claims
/// move it into the due set an hour or two before it is due, and it is claimed at its
/// time, not before.
#[tokio::test]
async fn a_step_days_ahead_waits_in_an_hourly_list_and_comes_due_on_time() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let now = 20_000 * DAY;
    let mut run = new_run(2, "c-far", None, now);
    run.due_ms = now + 3 * DAY + 1234;
    let due = run.due_ms;
    let (run_id, _) = enroll(&store, &run).await;
    assert_eq!(timers(&redis, 2).await, (0, 1));

    let early = store.claim(2, due - 2 * HOUR, 10, 1000).await.unwrap();
    assert!(early.runs.is_empty());
    assert_eq!(early.next_due_ms, None);
    assert_eq!(timers(&redis, 2).await, (0, 1), "its hour is not near yet");

    let near = store.claim(2, due - HOUR, 10, 1000).await.unwrap();
    assert!(near.runs.is_empty());
    assert_eq!(near.next_due_ms, Some(due));
    assert_eq!(timers(&redis, 2).await, (1, 0), "moved into the due set");

    assert!(
        store
            .claim(2, due - 1, 10, 1000)
            .await
            .unwrap()
            .runs
            .is_empty()
    );
    let claimed = store.claim(2, due, 10, 1000).await.unwrap();
    assert_eq!(claimed.runs.len(), 1);
    assert_eq!(claimed.runs[0].run_id, run_id);
}

/// The due backlog counts the entries of an hourly list whose hour has begun without the
/// list having moved (nothing claimed the partition): a stalled move is seen, not silent.
#[tokio::test]
async fn an_hourly_list_not_moved_in_time_counts_as_due() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let now = 20_000 * DAY;
    let mut run = new_run(0, "c-late", None, now);
    run.due_ms = now + 3 * DAY + 10;
    enroll(&store, &run).await;
    assert_eq!(store.backlog(now).await.unwrap().0, 0);
    assert_eq!(store.backlog(now + 3 * DAY - HOUR).await.unwrap().0, 0);
    assert_eq!(store.backlog(now + 3 * DAY + 20).await.unwrap().0, 1);
    store
        .claim(0, now + 3 * DAY - HOUR / 2, 10, 1000)
        .await
        .unwrap();
    assert_eq!(
        store.backlog(now + 3 * DAY + 20).await.unwrap().0,
        1,
        "moved into the due set, and due"
    );
}

/// Steps due soon go straight into the due set; one claim moves at most a thousand
/// entries of the hourly lists and asks to be called again at once while some are left.
#[tokio::test]
async fn hourly_lists_move_a_thousand_entries_per_claim() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let now = 20_000 * DAY;
    let mut soon = new_run(3, "c-soon", None, now);
    soon.due_ms = now + HOUR / 2;
    enroll(&store, &soon).await;
    assert_eq!(timers(&redis, 3).await, (1, 0));

    let runs: Vec<NewRun> = (0..2500)
        .map(|n| {
            let mut run = new_run(3, &format!("c-{n}"), None, now);
            run.due_ms = now + DAY + n;
            run
        })
        .collect();
    for result in store.enroll_many(&runs).await {
        result.expect("enroll");
    }
    assert_eq!(timers(&redis, 3).await, (1, 2500));

    let at = now + DAY - HOUR / 2;
    let first = store.claim(3, at, 10, 1000).await.unwrap();
    assert_eq!(first.runs.len(), 1, "the step due soon");
    assert_eq!(first.next_due_ms, Some(at), "more to move: call again now");
    assert_eq!(timers(&redis, 3).await, (1000, 1500));
    store.claim(3, at, 10, 1000).await.unwrap();
    let last = store.claim(3, at, 10, 1000).await.unwrap();
    assert!(last.runs.is_empty());
    assert_eq!(timers(&redis, 3).await, (2500, 0));
    assert_eq!(last.next_due_ms, Some(now + DAY));
}

/// A list entry stays when its run moves on (here: cancelled). When its hour comes,
/// only runs still due in that hour go into the due set.
#[tokio::test]
async fn hourly_list_entries_of_runs_that_moved_on_are_dropped() {
    let redis = TestRedis::from_env();
    let store = store(&redis).await;
    let now = 20_000 * DAY;
    let far = |contact: &str| {
        let mut run = new_run(1, contact, None, now);
        run.due_ms = now + 3 * DAY;
        run
    };
    let (kept, _) = enroll(&store, &far("c-kept")).await;
    let (cancelled, _) = enroll(&store, &far("c-cancelled")).await;
    let entry = touchpoint_scheduler::run::TimelineEntry {
        index: 0,
        outcome: touchpoint_scheduler::run::StepOutcome::Cancelled,
        attempts: 0,
        due_ms: now + 3 * DAY,
        done_ms: now + 1,
        worker: String::new(),
        channel: String::new(),
        detail: "cancelled".into(),
    };
    assert!(
        store
            .cancel(&cancelled, now + 1, &entry, None)
            .await
            .unwrap()
    );
    assert_eq!(timers(&redis, 1).await, (0, 2), "the entry stays");

    let moved = store
        .claim(1, now + 3 * DAY - HOUR / 2, 10, 1000)
        .await
        .unwrap();
    assert!(moved.runs.is_empty());
    assert_eq!(timers(&redis, 1).await, (1, 0));
    let claimed = store.claim(1, now + 3 * DAY, 10, 1000).await.unwrap();
    let ids: Vec<&str> = claimed.runs.iter().map(|r| r.run_id.as_str()).collect();
    assert_eq!(ids, [kept.as_str()]);
}
