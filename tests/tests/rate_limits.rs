//! Per-channel rate limits: a token bucket per channel in Redis (`rate_take.lua`), shared
//! by every scheduler and so by every worker; a provider's "too many requests" holds the
//! channel back for everyone (`rate_penalize.lua`).
//!
//! The store tests drive the scripts with an explicit clock; the end-to-end tests run real
//! scheduler and worker processes against a real receiver and check arrival times. They
//! check that the limit holds, not how fast anything is.

use std::time::{Duration, Instant};

use touchpoint_proto::v1::{EnrollRequest, RunStatus, StepStatus};
use touchpoint_scheduler::store::{Rate, Store, Taken};
use touchpoint_tests::{
    ChannelConfig, RedisServer, Reply, SECRET_ENV, SchedulerNode, Stack, WorkerConfig, WorkerNode,
    contact, eventually, request_id, run_summary,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(60);

async fn store(redis: &RedisServer) -> Store {
    Store::connect(&redis.url(), "t", 4, 60)
        .await
        .expect("connect to the test redis")
}

fn rate(per_second: f64, burst: u32) -> Option<Rate> {
    Some(Rate { per_second, burst })
}

async fn take(store: &Store, channel: &str, rate: Option<Rate>, wanted: usize, now: i64) -> Taken {
    store
        .rate_take(channel, rate, wanted, Some(now))
        .await
        .expect("rate_take")
}

fn taken(granted: usize, wait_ms: i64, per_token_ms: i64) -> Taken {
    Taken {
        granted,
        wait_ms,
        per_token_ms,
    }
}

#[tokio::test]
async fn a_bucket_grants_its_burst_then_one_token_per_interval() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let now = 1_000_000;
    let limit = rate(10.0, 3);

    // A new bucket is full: the burst goes at once, then the next token is 100 ms away.
    assert_eq!(take(&store, "sms", limit, 5, now).await, taken(3, 100, 100));
    assert_eq!(take(&store, "sms", limit, 5, now).await, taken(0, 100, 100));
    assert_eq!(
        take(&store, "sms", limit, 5, now + 50).await,
        taken(0, 50, 100)
    );
    assert_eq!(
        take(&store, "sms", limit, 5, now + 100).await,
        taken(1, 100, 100)
    );
    assert_eq!(
        take(&store, "sms", limit, 2, now + 350).await,
        taken(2, 0, 100)
    );
    // A long pause refills it up to the burst, never beyond.
    assert_eq!(
        take(&store, "sms", limit, 10, now + 60_000).await,
        taken(3, 100, 100)
    );
    // Another channel has a bucket of its own.
    assert_eq!(take(&store, "wecom", limit, 1, now).await, taken(1, 0, 100));
    // A channel without a rate is not held back.
    assert_eq!(take(&store, "crm", None, 50, now).await, taken(50, 0, 0));

    // The bucket expires once it would be full again anyway.
    let mut conn = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg("t:{rl:sms}:bucket")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=1300).contains(&ttl), "{ttl}");
    let exists: bool = redis::cmd("EXISTS")
        .arg("t:{rl:crm}:bucket")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "a channel without a rate keeps no bucket");
}

#[tokio::test]
async fn a_penalty_blocks_the_channel_then_halves_its_rate() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let now = 1_000_000;
    let limit = rate(10.0, 5);
    assert_eq!(take(&store, "sms", limit, 1, now).await.granted, 1);

    let remaining = store
        .rate_penalize("sms", 2000, 60_000, Some(now))
        .await
        .unwrap();
    assert_eq!(remaining, 2000);
    // Blocked: nothing until 2 s from now, then the first token at the halved rate.
    assert_eq!(
        take(&store, "sms", limit, 3, now + 1000).await,
        taken(0, 1200, 200)
    );
    assert_eq!(
        take(&store, "sms", limit, 3, now + 2000).await,
        taken(0, 200, 200)
    );
    assert_eq!(
        take(&store, "sms", limit, 3, now + 2200).await,
        taken(1, 200, 200)
    );
    assert_eq!(
        take(&store, "sms", limit, 3, now + 2600).await,
        taken(2, 200, 200)
    );
    // A shorter penalty does not shorten the block in force.
    let remaining = store
        .rate_penalize("sms", 1000, 60_000, Some(now + 2600))
        .await
        .unwrap();
    assert_eq!(remaining, 1000);
    let remaining = store
        .rate_penalize("sms", 10, 60_000, Some(now + 2700))
        .await
        .unwrap();
    assert_eq!(remaining, 900);
    // Once the halved minute is over, the full rate is back.
    let later = now + 3600 + 60_000 + 10_000;
    assert_eq!(
        take(&store, "sms", limit, 9, later).await,
        taken(5, 100, 100)
    );

    // A channel without a rate is blocked by a penalty alone, all or nothing.
    store
        .rate_penalize("crm", 1500, 60_000, Some(now))
        .await
        .unwrap();
    assert_eq!(
        take(&store, "crm", None, 4, now + 500).await,
        taken(0, 1000, 0)
    );
    assert_eq!(
        take(&store, "crm", None, 4, now + 1500).await,
        taken(4, 0, 0)
    );
}

#[tokio::test]
async fn announced_holds_are_listed_until_they_end() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let now = 1_000_000;
    store
        .announce_penalty("crm", now + 2000, now)
        .await
        .unwrap();
    store.announce_penalty("sms", now + 500, now).await.unwrap();
    // A shorter hold announced later does not shorten the one listed.
    store
        .announce_penalty("crm", now + 1000, now)
        .await
        .unwrap();
    let mut listed = store.penalties(now).await.unwrap();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("crm".to_owned(), now + 2000),
            ("sms".to_owned(), now + 500)
        ]
    );
    assert_eq!(
        store.penalties(now + 1000).await.unwrap(),
        [("crm".to_owned(), now + 2000)]
    );
    // Ended holds are dropped when the next one is announced.
    store
        .announce_penalty("wecom", now + 5000, now + 3000)
        .await
        .unwrap();
    assert_eq!(
        store.penalties(0).await.unwrap(),
        [("wecom".to_owned(), now + 5000)]
    );
}

#[tokio::test]
async fn redis_time_is_the_clock_when_none_is_given() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let first = store.rate_take("sms", rate(1.0, 2), 3, None).await.unwrap();
    assert_eq!(first.granted, 2);
    assert!((1..=1000).contains(&first.wait_ms), "{first:?}");
    let remaining = store.rate_penalize("sms", 5000, 1000, None).await.unwrap();
    assert!((4900..=5000).contains(&remaining), "{remaining}");
    let blocked = store.rate_take("sms", rate(1.0, 2), 1, None).await.unwrap();
    assert_eq!(blocked.granted, 0);
    assert!(blocked.wait_ms > 4900, "{blocked:?}");
}

/// A playbook of one webhook step on `crm`.
const ONE_SEND: &str =
    "name: one-send\nsteps:\n  - {id: send, action: send_message, channel: crm}\n";

/// Starts `count` worker processes serving `crm` as a webhook to the stack's receiver,
/// with `rate`/`burst` when given, and waits until the scheduler has them all.
async fn start_workers(stack: &mut Stack, count: usize, rate: Option<(&str, Option<u32>)>) {
    let mut channel = ChannelConfig::webhook("crm", &stack.receiver.url(), SECRET_ENV);
    if let Some((rate, burst)) = rate {
        channel = channel.with_rate(rate, burst);
    }
    let config = WorkerConfig::new().channel(channel);
    for n in 1..=count {
        let worker = WorkerNode::start(
            NODE,
            &stack.scheduler.endpoint(),
            &format!("w-{n}"),
            &config,
            &[(SECRET_ENV, &stack.secret)],
        );
        stack.workers.push(worker);
    }
    let attached = eventually(Duration::from_secs(20), || {
        let log = stack.scheduler.process().log();
        async move { log.matches("worker connected").count() >= count }
    })
    .await;
    assert!(
        attached,
        "the workers did not attach:\n{}",
        stack.scheduler.process().log_tail(30)
    );
}

async fn enroll_many(stack: &mut Stack, prefix: &str, count: usize) -> Vec<String> {
    let mut runs = Vec::with_capacity(count);
    for n in 0..count {
        let contact = contact(&format!("{prefix}-{n}"), &[], &[]);
        runs.push(
            stack
                .enroll("one-send", contact, &request_id())
                .await
                .run_id,
        );
    }
    runs
}

/// The most arrivals within any `window`.
fn busiest(arrivals: &[Instant], window: Duration) -> usize {
    (0..arrivals.len())
        .map(|i| {
            arrivals[i..]
                .iter()
                .take_while(|t| **t - arrivals[i] < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_together_keep_one_channel_rate() {
    const STEPS: usize = 30;
    let mut stack = Stack::start(NODE, &[], &[]).await;
    // Each delivery takes 150 ms, longer than a token's 100 ms, so both workers are busy.
    stack
        .receiver
        .script((0..STEPS).map(|_| Reply::status(200).held_for(Duration::from_millis(150))));
    start_workers(&mut stack, 2, Some(("10/s", Some(1)))).await;
    stack.apply(ONE_SEND).await;

    let runs = enroll_many(&mut stack, "c", STEPS).await;
    let requests = stack.receiver.wait_for(STEPS, TIMEOUT).await;
    let mut arrivals: Vec<Instant> = requests.iter().map(|r| r.received_at).collect();
    arrivals.sort();
    let span = arrivals[STEPS - 1] - arrivals[0];
    // 10/s with a burst of 1: 29 intervals of 100 ms after the first. One rate per worker
    // (20/s together) would take about half that.
    assert!(
        span >= Duration::from_millis(2400),
        "{STEPS} deliveries in {span:?}: faster than 10/s"
    );
    let most = busiest(&arrivals, Duration::from_secs(1));
    assert!(
        most <= 14,
        "{most} deliveries within one second (rate 10/s, burst 1)"
    );

    let mut workers = std::collections::HashSet::new();
    for run_id in &runs {
        let run = stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
        // Held back by the rate limit is not an attempt.
        assert_eq!(run.steps[0].attempts, 1, "{}", run_summary(&run));
        workers.insert(run.steps[0].worker.clone());
    }
    assert_eq!(workers.len(), 2, "both workers delivered: {workers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_answer_holds_the_channel_back_for_every_worker() {
    const STEPS: usize = 12;
    let mut stack = Stack::start(NODE, &[], &[]).await;
    // Each delivery takes longer than a token's 200 ms, so both workers are busy.
    let held = Duration::from_millis(300);
    stack.receiver.script(
        [
            Reply::status(200).held_for(held),
            Reply::status(200).held_for(held),
            Reply::status(429).retry_after(2),
        ]
        .into_iter()
        .chain((0..STEPS).map(|_| Reply::status(200).held_for(held))),
    );
    start_workers(&mut stack, 2, Some(("5/s", Some(1)))).await;
    stack.apply(ONE_SEND).await;

    let runs = enroll_many(&mut stack, "c", STEPS).await;
    // Every run delivered, the one answered 429 twice.
    let requests = stack.receiver.wait_for(STEPS + 1, TIMEOUT).await;
    let limited = requests
        .iter()
        .find(|r| r.status == 429)
        .expect("the 429 answer");
    let at = limited.received_at;
    // Requests already handed out when the 429 came may still arrive (one token is 200 ms);
    // after that nothing until the 2 s Retry-After has passed, on either worker.
    let early: Vec<Duration> = requests
        .iter()
        .filter(|r| r.received_at > at + Duration::from_millis(400))
        .map(|r| r.received_at - at)
        .filter(|after| *after < Duration::from_millis(2000))
        .collect();
    assert!(
        early.is_empty(),
        "deliveries during the hold, this long after the 429: {early:?}\n{}",
        stack.receiver.summary()
    );
    let retried = requests
        .iter()
        .find(|r| r.run_id() == limited.run_id() && r.status == 200)
        .expect("the rate-limited step was retried");
    assert!(retried.received_at - at >= Duration::from_secs(2));

    let mut workers = std::collections::HashSet::new();
    for run_id in &runs {
        let run = stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
        let expected = if *run_id == limited.run_id() { 2 } else { 1 };
        assert_eq!(run.steps[0].attempts, expected, "{}", run_summary(&run));
        workers.insert(run.steps[0].worker.clone());
    }
    assert_eq!(workers.len(), 2, "both workers delivered: {workers:?}");
    let log = stack.scheduler.process().log();
    assert!(
        log.contains("the provider asked to slow down"),
        "{}",
        stack.scheduler.process().log_tail(30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_answer_holds_back_a_channel_without_a_rate() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    stack.receiver.script([Reply::status(429).retry_after(2)]);
    start_workers(&mut stack, 1, None).await;
    stack.apply(ONE_SEND).await;

    let first = enroll_many(&mut stack, "first", 1).await;
    let limited = stack.receiver.wait_for(1, TIMEOUT).await;
    let at = limited[0].received_at;
    assert_eq!(limited[0].status, 429);
    // Sends that come due during the hold wait for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = enroll_many(&mut stack, "later", 3).await;
    let held = eventually(TIMEOUT, || {
        let mut client = stack.client.clone();
        let run_id = later[0].clone();
        async move {
            let run = client.run(&run_id).await;
            run.steps[0].detail == "rate limited: waiting for crm"
                && run.steps[0].status == i32::from(StepStatus::Scheduled)
        }
    })
    .await;
    assert!(held, "{}", run_summary(&stack.client.run(&later[0]).await));
    let requests = stack.receiver.wait_for(5, TIMEOUT).await;
    for request in &requests[1..] {
        assert!(
            request.received_at - at >= Duration::from_secs(2),
            "delivered {:?} after the 429\n{}",
            request.received_at - at,
            stack.receiver.summary()
        );
    }
    for run_id in first.iter().chain(&later) {
        stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
    }
}

/// The 429 reaches one scheduler's worker; the other scheduler, which hands the same
/// channel (no rate of its own) to its own worker, learns of the hold from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_answer_at_one_scheduler_holds_the_channel_back_at_another() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    stack.receiver.script([Reply::status(429).retry_after(3)]);
    let mut other = SchedulerNode::start(NODE, &stack.redis.url(), &[]);
    let config = WorkerConfig::new().channel(ChannelConfig::webhook(
        "crm",
        &stack.receiver.url(),
        SECRET_ENV,
    ));
    let secret = [(SECRET_ENV, stack.secret.as_str())];
    let _w1 = WorkerNode::start(NODE, &stack.scheduler.endpoint(), "w-1", &config, &secret);
    let _w2 = WorkerNode::start(NODE, &other.endpoint(), "w-2", &config, &secret);
    for scheduler in [&mut stack.scheduler, &mut other] {
        let attached = eventually(Duration::from_secs(20), || {
            let log = scheduler.process().log();
            async move { log.contains("worker connected") }
        })
        .await;
        assert!(attached, "{}", scheduler.process().log_tail(30));
    }
    stack.apply(ONE_SEND).await;

    enroll_many(&mut stack, "first", 1).await;
    let limited = stack.receiver.wait_for(1, TIMEOUT).await;
    let at = limited[0].received_at;
    assert_eq!(limited[0].status, 429);
    // Past the once-a-second refresh of the announced holds.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Enrolled at the other scheduler, which claims them at once and whose worker
    // never saw the 429.
    let mut client = other.client().await;
    let mut later = Vec::new();
    for n in 0..6 {
        let request = EnrollRequest {
            playbook: "one-send".to_owned(),
            contact: Some(contact(&format!("later-{n}"), &[], &[])),
            request_id: request_id(),
        };
        let enrolled = client.enrollments.enroll(request).await.expect("enroll");
        later.push(enrolled.into_inner().run_id);
    }
    let requests = stack.receiver.wait_for(8, TIMEOUT).await;
    for request in &requests[1..] {
        assert!(
            request.received_at - at >= Duration::from_secs(3),
            "delivered {:?} after the 429\n{}\n{}",
            request.received_at - at,
            stack.receiver.summary(),
            other.process().log_tail(20)
        );
    }
    for run_id in &later {
        stack
            .client
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
    }
}
