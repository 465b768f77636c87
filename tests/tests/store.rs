//! The Lua scripts of the scheduler's store, against a real redis-server: claims are
//! exclusive, leases expire back to due with the attempt counted, and an outcome only
//! counts under the fencing token of the lease it was handed out under.

use std::collections::HashSet;

use touchpoint_scheduler::{
    run::{RunStatus, new_run_id},
    store::{Completion, ContactRecord, NewRun, Op, Store},
};
use touchpoint_tests::RedisServer;

const PARTITIONS: u16 = 4;

async fn store(redis: &RedisServer) -> Store {
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
        now_ms: now,
        traceparent: String::new(),
        request_id: request_id.map(str::to_owned),
    }
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
    }
}

#[tokio::test]
async fn a_stale_outcome_is_refused_after_its_lease_expired() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let now = 1_000_000;
    let (run_id, _) = store.enroll(&new_run(1, "c-1", None, now)).await.unwrap();

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
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("t:{{p1}}:run:{run_id}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 60, "ttl {ttl}");
}

#[tokio::test]
async fn the_same_request_id_starts_one_run() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let (first, created) = store
        .enroll(&new_run(2, "c-2", Some("req-1"), 10))
        .await
        .unwrap();
    assert!(created);
    let (again, created) = store
        .enroll(&new_run(2, "c-2", Some("req-1"), 20))
        .await
        .unwrap();
    assert!(!created);
    assert_eq!(first, again);
    let claimed = store.claim(2, 100, 10, 1000).await.unwrap();
    assert_eq!(claimed.runs.len(), 1, "one run, scheduled once");
}

#[tokio::test]
async fn concurrent_claims_never_hand_out_a_run_twice() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let mut enrolled = HashSet::new();
    for i in 0..200 {
        let (run_id, _) = store
            .enroll(&new_run(3, &format!("c-{i}"), None, 10))
            .await
            .unwrap();
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
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let (run_id, _) = store.enroll(&new_run(0, "c-3", None, 10)).await.unwrap();
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
    };
    assert_eq!(store.complete(0, 20, &[retry]).await.unwrap(), (1, 0));
    assert!(store.claim(0, 499, 10, 1000).await.unwrap().runs.is_empty());
    let again = store.claim(0, 500, 10, 1000).await.unwrap();
    assert_eq!(again.runs[0].attempt, 2);
}

#[tokio::test]
async fn cancelling_fences_out_the_worker_holding_the_step() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let (run_id, _) = store.enroll(&new_run(1, "c-4", None, 10)).await.unwrap();
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
    assert!(store.cancel(&run_id, 20, &entry).await.unwrap());
    assert!(
        !store.cancel(&run_id, 30, &entry).await.unwrap(),
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
    let redis = RedisServer::start();
    store(&redis).await;
    let err = Store::connect(&redis.url(), "t", PARTITIONS * 2, 60)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--partitions 4"), "{err}");
}
