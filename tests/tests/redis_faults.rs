//! The scheduler against an unfriendly Redis: one configured to evict keys is refused,
//! one without an append-only file is used with a warning, and one that is stopped for
//! a few seconds makes API calls fail fast while timers pause and then catch up, late
//! but never skipped and never doubled.

use std::{collections::HashMap, time::Duration};

use tonic::Code;
use touchpoint_proto::v1::{ListPlaybooksRequest, RunStatus};
use touchpoint_tests::{RedisServer, SchedulerNode, Stack, contact, eventually, request_id};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_keys_is_refused() {
    let redis = RedisServer::start();
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut scheduler = SchedulerNode::start(NODE, &redis.url(), &[]);
    assert!(
        eventually(TIMEOUT, || {
            let running = scheduler.is_running();
            async move { !running }
        })
        .await,
        "the scheduler kept running on an evicting Redis"
    );
    let log = scheduler.process().log();
    assert!(
        log.contains("maxmemory-policy is allkeys-lru") && log.contains("noeviction"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_without_an_append_only_file_is_used_with_a_warning() {
    let redis = RedisServer::start_with(false);
    let mut scheduler = SchedulerNode::start(NODE, &redis.url(), &[]);
    let mut client = scheduler.client().await;
    client
        .playbooks
        .list_playbooks(ListPlaybooksRequest {})
        .await
        .unwrap();
    let log = scheduler.process().log();
    assert!(log.contains("appendonly no"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_five_seconds_fails_calls_fast_and_timers_catch_up() {
    // A short lease: a claim whose answer Redis could not send before stopping comes
    // back after it.
    let mut stack = Stack::start(NODE, &["--lease", "5s"], &["wecom"]).await;
    stack
        .apply(
            "name: outage\nsteps:\n  - {id: greet, action: send_message, channel: wecom}\n  \
             - {id: pause, wait: 2s}\n  - {id: follow-up, action: send_message, channel: wecom}\n",
        )
        .await;
    let mut runs = Vec::new();
    for i in 0..5 {
        let id = format!("c-70{i}");
        runs.push(
            stack
                .enroll("outage", contact(&id, &[], &[]), &request_id())
                .await
                .run_id,
        );
    }
    stack.receiver.wait_for(5, TIMEOUT).await;

    // Stop Redis cleanly (it writes out its append-only file and exits).
    let mut conn = stack
        .redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut conn).await;
    assert!(
        eventually(TIMEOUT, || {
            let running = stack.redis.is_running();
            async move { !running }
        })
        .await
    );
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        stack
            .client
            .playbooks
            .list_playbooks(ListPlaybooksRequest {}),
    )
    .await
    .expect("an API call must not hang while Redis is down")
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("Redis"), "{err:?}");
    eprintln!("UNAVAILABLE after {:?}", started.elapsed());

    // Every wait ends while Redis is down.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        stack.receiver.requests().len(),
        5,
        "nothing can go out without Redis"
    );
    stack.redis.restart();

    for run_id in &runs {
        let run = stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
        assert_eq!(run.steps[2].attempts, 1, "{run:?}");
    }
    let requests = stack.receiver.requests();
    assert_eq!(
        requests.len(),
        10,
        "each run: greet and follow-up, once each"
    );
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for request in &requests {
        *per_id.entry(request.webhook_id().to_owned()).or_default() += 1;
    }
    assert!(per_id.values().all(|n| *n == 1), "{per_id:?}");
    let log = stack.scheduler.process().log();
    assert!(log.contains("Redis is reachable again"), "{log}");
    assert!(
        log.matches("timers pause").count() == 1,
        "one warning per outage, not one per partition:\n{log}"
    );
}
