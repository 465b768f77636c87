//! The scheduler against an unfriendly Redis: one configured to evict keys is refused,
//! one without an append-only file is used with a warning, and one that is stopped for
//! a few seconds makes API calls fail fast while timers pause and then catch up, late
//! but never skipped and never doubled. Each stops or restarts one `redis-server`, so
//! they run on one server whatever `TOUCHPOINT_TEST_REDIS` says (tests/cluster.rs
//! refuses an evicting cluster primary).

use std::{collections::HashMap, time::Duration};

use tonic::Code;
use touchpoint_proto::v1::{ListPlaybooksRequest, RunStatus};
use touchpoint_tests::{
    RedisServer, SchedulerNode, Stack, TestRedis, contact, eventually, request_id,
};

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
    // back after it. Nothing handed out ahead: the timers due during the outage are the
    // subject (a send handed out ahead would go out with Redis down, as any step already
    // with a worker does).
    let redis = TestRedis::Server(RedisServer::start());
    let flags = ["--lease", "5s", "--hand-out-ahead", "0s"];
    let mut stack = Stack::start_on(redis, NODE, &flags, &["wecom"]).await;
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
        .server()
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut conn).await;
    assert!(
        eventually(TIMEOUT, || {
            let running = stack.redis.server_mut().is_running();
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
    // Logged once the first claim after the outage succeeds, which may be after the
    // last run completed; the log file may lag behind too.
    let scheduler = stack.scheduler.process();
    let back = eventually(TIMEOUT, || {
        let found = scheduler.log().contains("Redis is reachable again");
        async move { found }
    })
    .await;
    let log = scheduler.log();
    assert!(back, "{log}");
    assert!(
        log.matches("timers pause").count() == 1,
        "one warning per outage, not one per partition:\n{log}"
    );
}

/// Enrolls `n` runs, each acknowledged, then restarts Redis as `restart` says and checks
/// that every one of them is still there.
async fn enrollments_survive(
    appendfsync: &str,
    restart: impl FnOnce(&mut touchpoint_tests::RedisServer),
) {
    use touchpoint_proto::v1::GetRunRequest;

    // No worker: the runs stay scheduled, only their records matter here.
    let redis = TestRedis::Server(RedisServer::start());
    let mut stack = Stack::start_on(redis, NODE, &[], &[]).await;
    let mut conn = stack
        .redis
        .server()
        .client()
        .get_multiplexed_async_connection()
        .await
        .expect("a connection");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg(appendfsync)
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET appendfsync");
    stack
        .apply("name: durable\nsteps:\n  - {id: notify, action: send_message, channel: wecom}\n")
        .await;
    let mut acknowledged = Vec::new();
    for i in 0..100 {
        let id = format!("c-{i}");
        acknowledged.push(
            stack
                .enroll("durable", contact(&id, &[], &[]), &request_id())
                .await
                .run_id,
        );
    }
    restart(stack.redis.server_mut());
    for run_id in &acknowledged {
        let found = eventually(TIMEOUT, || {
            let mut runs = stack.client.runs.clone();
            let run_id = run_id.clone();
            async move { runs.get_run(GetRunRequest { run_id }).await.is_ok() }
        })
        .await;
        assert!(
            found,
            "run {run_id} was acknowledged but is gone after the restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_enrollments_survive_a_redis_kill_under_appendfsync_always() {
    enrollments_survive("always", |redis| {
        redis.kill();
        redis.restart();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_enrollments_survive_a_clean_redis_restart_under_everysec() {
    enrollments_survive("everysec", |redis| {
        let mut conn = redis.client().get_connection().expect("a connection");
        let _ = redis::cmd("SHUTDOWN").query::<()>(&mut conn);
        redis.restart();
    })
    .await;
}
