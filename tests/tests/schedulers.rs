//! Several schedulers against one Redis (or one Redis Cluster with
//! `TOUCHPOINT_TEST_REDIS=cluster`): they split the work without handing a step out
//! twice (every scheduler claims from every partition; `claim.lua` hands each due step to
//! one of them), and when one is killed with SIGKILL the others carry on and hand its
//! leased steps out again, with the same webhook-id, once the leases expire.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use touchpoint_proto::v1::{ApplyPlaybookRequest, ApplyStatus, EnrollRequest, RunStatus};
use touchpoint_tests::{
    ChannelConfig, ReceivedRequest, Reply, SECRET_ENV, SchedulerNode, TestRedis, TouchpointClient,
    WebhookReceiver, WorkerConfig, WorkerNode, contact, eventually, generate_secret, request_id,
    run_summary, verify_signature,
};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(60);

/// Three deliveries with short waits between them.
const PLAYBOOK: &str = r#"
name: three-touches
steps:
  - id: first
    action: send_message
    channel: wecom
  - id: pause-1
    wait: 300ms
  - id: second
    action: send_message
    channel: wecom
  - id: pause-2
    wait: 300ms
  - id: third
    action: send_message
    channel: wecom
"#;
const ACTIONS: [&str; 3] = ["first", "second", "third"];

/// Redis, one receiver, schedulers `a` and `b` on that Redis, and two workers attached to
/// each. A worker's webhook goes to `<receiver>/hook/<its scheduler>`, so every request
/// tells which scheduler's workers delivered it.
///
/// Fields drop in order: workers, schedulers, receiver, then Redis.
struct Cluster {
    workers: Vec<WorkerNode>,
    schedulers: Vec<SchedulerNode>,
    clients: Vec<TouchpointClient>,
    receiver: WebhookReceiver,
    _redis: TestRedis,
    secret: String,
}

const SIDES: [&str; 2] = ["a", "b"];

impl Cluster {
    async fn start(scheduler_flags: &[&str]) -> Self {
        let redis = TestRedis::from_env();
        let receiver = WebhookReceiver::start().await;
        let secret = generate_secret();
        let mut schedulers = Vec::new();
        let mut clients = Vec::new();
        let mut workers = Vec::new();
        for side in SIDES {
            let mut flags = vec!["--scheduler-id", side];
            flags.extend_from_slice(scheduler_flags);
            let mut scheduler = SchedulerNode::start(NODE, &redis.url(), &flags);
            clients.push(scheduler.client().await);
            let config = WorkerConfig {
                concurrency: 32,
                ..WorkerConfig::new()
            }
            .channel(ChannelConfig::webhook(
                "wecom",
                &format!("{}/{side}", receiver.url()),
                SECRET_ENV,
            ));
            for n in 1..=2 {
                workers.push(WorkerNode::start(
                    NODE,
                    &scheduler.endpoint(),
                    &format!("{side}-{n}"),
                    &config,
                    &[(SECRET_ENV, &secret)],
                ));
            }
            // Steps claimed before a worker is attached are held back for 2 s; wait for
            // both, so the work is split from the start.
            let attached = eventually(Duration::from_secs(20), || {
                let log = scheduler.process().log();
                async move { log.matches("worker connected").count() >= 2 }
            })
            .await;
            assert!(
                attached,
                "the workers of scheduler {side} did not attach:\n{}",
                scheduler.process().log_tail(30)
            );
            schedulers.push(scheduler);
        }
        let applied = clients[0]
            .playbooks
            .apply_playbook(ApplyPlaybookRequest {
                yaml: PLAYBOOK.to_owned(),
                dry_run: false,
            })
            .await
            .expect("ApplyPlaybook")
            .into_inner();
        assert_eq!(applied.status(), ApplyStatus::Created);
        Self {
            workers,
            schedulers,
            clients,
            receiver,
            _redis: redis,
            secret,
        }
    }

    /// Enrolls `n` contacts, alternately through scheduler a and b; returns the run ids.
    async fn enroll(&mut self, n: usize) -> Vec<String> {
        let mut runs = Vec::with_capacity(n);
        for i in 0..n {
            let client = &mut self.clients[i % 2];
            let run = client
                .enrollments
                .enroll(EnrollRequest {
                    playbook: "three-touches".to_owned(),
                    contact: Some(contact(&format!("c-{i}"), &[], &[])),
                    request_id: request_id(),
                })
                .await
                .expect("Enroll")
                .into_inner();
            runs.push(run.run_id);
        }
        runs
    }

    /// Waits until every run completed, asking `client`.
    async fn wait_for_all(client: &mut TouchpointClient, runs: &[String]) {
        for run_id in runs {
            let run = client
                .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
                .await;
            assert_eq!(run.steps.len(), 5, "{}", run_summary(&run));
        }
    }
}

/// Which scheduler's workers delivered a request: `a` or `b`.
fn side(request: &ReceivedRequest) -> &str {
    request.path.rsplit('/').next().unwrap_or_default()
}

/// The requests of each (run, step).
fn by_step(requests: &[ReceivedRequest]) -> BTreeMap<(String, String), Vec<&ReceivedRequest>> {
    let mut map: BTreeMap<(String, String), Vec<&ReceivedRequest>> = BTreeMap::new();
    for r in requests {
        map.entry((r.run_id().to_owned(), r.step().to_owned()))
            .or_default()
            .push(r);
    }
    map
}

/// Every (run, step) reached the receiver, always with the webhook-id `<run>.<step>` and
/// a valid signature; returns the requests of each (run, step).
fn assert_every_step_delivered<'r>(
    runs: &[String],
    requests: &'r [ReceivedRequest],
    secret: &str,
    summary: &str,
) -> BTreeMap<(String, String), Vec<&'r ReceivedRequest>> {
    let delivered = by_step(requests);
    for run_id in runs {
        for step in ACTIONS {
            let key = (run_id.clone(), step.to_owned());
            let Some(got) = delivered.get(&key) else {
                panic!("{step} of {run_id} never reached the receiver:\n{summary}");
            };
            for r in got {
                assert_eq!(r.webhook_id(), format!("{run_id}.{step}"), "{summary}");
                assert!(verify_signature(r, secret), "bad signature:\n{summary}");
            }
        }
    }
    assert_eq!(
        delivered.len(),
        runs.len() * ACTIONS.len(),
        "deliveries for runs or steps that were not enrolled:\n{summary}"
    );
    delivered
}

/// Two schedulers, two workers each, 40 runs enrolled through both: every run completes,
/// every (run, step) reaches the receiver exactly once, and both schedulers did work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_split_the_work_and_deliver_every_step_once() {
    let mut cluster = Cluster::start(&[]).await;
    let runs = cluster.enroll(40).await;
    Cluster::wait_for_all(&mut cluster.clients[0], &runs).await;

    let requests = cluster.receiver.requests();
    let summary = cluster.receiver.summary();
    let delivered = assert_every_step_delivered(&runs, &requests, &cluster.secret, &summary);
    for ((run_id, step), got) in &delivered {
        assert_eq!(
            got.len(),
            1,
            "{step} of {run_id} was delivered {} times:\n{summary}",
            got.len()
        );
        assert_eq!(got[0].attempt(), 1, "{summary}");
    }
    let by_a = requests.iter().filter(|r| side(r) == "a").count();
    eprintln!(
        "{} deliveries: {by_a} by a's workers, {} by b's",
        requests.len(),
        requests.len() - by_a
    );
    let sides: BTreeSet<&str> = requests.iter().map(side).collect();
    assert_eq!(
        sides,
        BTreeSet::from(["a", "b"]),
        "both schedulers' workers should have delivered:\n{summary}"
    );
    // Both schedulers served the API too: a run reads the same through either.
    let through_b = cluster.clients[1].run(&runs[0]).await;
    let through_a = cluster.clients[0].run(&runs[0]).await;
    assert_eq!(through_a, through_b);
    for scheduler in &mut cluster.schedulers {
        let log = scheduler.process().log();
        assert!(
            !log.contains("leases expired") && !log.contains("were refused"),
            "nothing failed, yet:\n{}",
            scheduler.process().log_tail(30)
        );
    }
}

/// Two schedulers with 2 s leases; the receiver holds every first delivery for 4 s. While
/// they are all in flight, scheduler a is killed with SIGKILL. Its workers' deliveries are
/// answered but their results go nowhere; scheduler b hands those steps out again once
/// their leases expire (attempt 2, same webhook-id) to its own workers, and carries every
/// run to completion. b's own held deliveries keep their leases by heartbeats and are
/// delivered once. Duplicates are exactly a's in-flight steps, each with one webhook-id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_scheduler_hands_its_leased_steps_to_the_other() {
    const RUNS: usize = 30;
    let mut cluster = Cluster::start(&["--lease", "2s"]).await;
    cluster
        .receiver
        .script((0..RUNS).map(|_| Reply::status(200).held_for(Duration::from_secs(4))));
    let runs = cluster.enroll(RUNS).await;
    let in_flight = cluster.receiver.wait_for(RUNS, TIMEOUT).await;
    let summary = cluster.receiver.summary();
    assert!(in_flight.iter().all(|r| r.step() == "first"), "{summary}");
    let held_by_a: BTreeSet<String> = in_flight
        .iter()
        .filter(|r| side(r) == "a")
        .map(|r| r.run_id().to_owned())
        .collect();
    assert!(
        !held_by_a.is_empty() && held_by_a.len() < RUNS,
        "each scheduler should hold some first steps:\n{summary}"
    );

    eprintln!(
        "scheduler a held {} of {RUNS} first steps when it was killed",
        held_by_a.len()
    );
    cluster.schedulers[0].kill9();
    assert!(!cluster.schedulers[0].is_running());

    Cluster::wait_for_all(&mut cluster.clients[1], &runs).await;
    let requests = cluster.receiver.requests();
    let summary = cluster.receiver.summary();
    let delivered = assert_every_step_delivered(&runs, &requests, &cluster.secret, &summary);
    for ((run_id, step), got) in &delivered {
        if step == "first" && held_by_a.contains(run_id) {
            // a's worker got it out (its result was lost with a), then b's worker again.
            let attempts: Vec<(&str, u64)> = got.iter().map(|r| (side(r), r.attempt())).collect();
            assert_eq!(
                attempts,
                [("a", 1), ("b", 2)],
                "{step} of {run_id}:\n{summary}"
            );
        } else {
            assert_eq!(got.len(), 1, "{step} of {run_id}:\n{summary}");
            assert_eq!(
                side(got[0]),
                "b",
                "after the kill only b delivers:\n{summary}"
            );
            assert_eq!(got[0].attempt(), 1, "{summary}");
        }
    }
    for run_id in &runs {
        let run = cluster.clients[1].run(run_id).await;
        let timeline = run_summary(&run);
        let first = &run.steps[0];
        assert!(first.worker.starts_with("b-"), "{timeline}");
        let expected = if held_by_a.contains(run_id) { 2 } else { 1 };
        assert_eq!(first.attempts, expected, "{timeline}");
    }
    // b noticed the expired leases: they were a's, not its own.
    let log = cluster.schedulers[1].process().log();
    assert!(
        log.contains("leases expired; steps go out again"),
        "{}",
        cluster.schedulers[1].process().log_tail(30)
    );
    // a's workers are still trying to reach a; nothing else went to them.
    assert!(
        cluster
            .workers
            .iter_mut()
            .take(2)
            .all(WorkerNode::is_running)
    );
}
