//! Several schedulers against one Redis (or one Redis Cluster with
//! `TOUCHPOINT_TEST_REDIS=cluster`): they split the partitions between them through
//! leases in Redis (each claims only from the partitions it owns; `claim.lua` and the
//! fencing tokens keep a step from going out twice even when two claim at once), and
//! workers attach to every scheduler they learn of. When one scheduler is killed with
//! SIGKILL the others take over its partitions within about a partition lease, and the
//! results of the steps it handed out reach them on the workers' other streams.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use touchpoint_proto::v1::{ApplyPlaybookRequest, ApplyStatus, EnrollRequest, RunStatus};
use touchpoint_scheduler::{run::partition_of_contact, store::Store};
use touchpoint_tests::{
    ChannelConfig, ReceivedRequest, Reply, SECRET_ENV, SchedulerNode, TestRedis, TouchpointClient,
    WebhookReceiver, WorkerConfig, WorkerNode, contact, eventually, eventually_some, free_port,
    gauge, generate_secret, request_id, run_summary, scrape, stays, verify_signature,
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

/// Redis, one receiver, schedulers `a` and `b` on that Redis (2 s partition leases), and
/// two workers configured with each one's address, which attach to the other too. A
/// worker's webhook goes to `<receiver>/hook/<its configured scheduler>`.
///
/// Fields drop in order: workers, schedulers, receiver, then Redis.
struct Cluster {
    workers: Vec<WorkerNode>,
    schedulers: Vec<SchedulerNode>,
    clients: Vec<TouchpointClient>,
    receiver: WebhookReceiver,
    store: Store,
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
            let mut flags = vec!["--scheduler-id", side, "--partition-lease", "2s"];
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
        let store = Store::connect(&redis.url(), "tp", 256, 3600)
            .await
            .expect("connect to Redis");
        wait_for_owners(&store, &SIDES, Duration::from_secs(20)).await;
        // Every worker attached to both schedulers.
        for scheduler in &mut schedulers {
            let attached = eventually(Duration::from_secs(20), || {
                let log = scheduler.process().log();
                async move { log.matches("worker connected").count() >= 4 }
            })
            .await;
            assert!(
                attached,
                "every worker should attach to both schedulers:\n{}",
                scheduler.process().log_tail(30)
            );
        }
        apply_new(&mut clients[0], PLAYBOOK).await;
        Self {
            workers,
            schedulers,
            clients,
            receiver,
            store,
            _redis: redis,
            secret,
        }
    }

    /// Enrolls `n` contacts, alternately through scheduler a and b; returns the run ids.
    async fn enroll(&mut self, n: usize) -> Vec<String> {
        let mut runs = Vec::with_capacity(n);
        for i in 0..n {
            let client = &mut self.clients[i % 2];
            runs.push(enroll(client, "three-touches", &format!("c-{i}")).await);
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
/// every (run, step) reaches the receiver exactly once, and both schedulers own a share
/// of the partitions throughout.
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
    let split = wait_for_owners(&cluster.store, &SIDES, Duration::from_secs(5)).await;
    eprintln!("partitions owned: {split:?}");
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

/// Two schedulers with 2 s leases, every worker attached to both; the receiver holds
/// every first delivery for 4 s. While they are all in flight, scheduler a is killed with
/// SIGKILL. b takes over a's partitions within about a partition lease; the deliveries a
/// handed out go on, and their heartbeats and results reach b on the workers' other
/// streams, where they count by their fencing tokens. Nothing is handed out again: every
/// step reaches the receiver exactly once, at attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_scheduler_loses_no_step_and_sends_none_twice() {
    const RUNS: usize = 30;
    let mut cluster = Cluster::start(&["--lease", "2s"]).await;
    cluster
        .receiver
        .script((0..RUNS).map(|_| Reply::status(200).held_for(Duration::from_secs(4))));
    let runs = cluster.enroll(RUNS).await;
    let in_flight = cluster.receiver.wait_for(RUNS, TIMEOUT).await;
    let summary = cluster.receiver.summary();
    assert!(in_flight.iter().all(|r| r.step() == "first"), "{summary}");

    cluster.schedulers[0].kill9();
    assert!(!cluster.schedulers[0].is_running());
    let split = wait_for_owners(&cluster.store, &["b"], Duration::from_secs(15)).await;
    eprintln!("after the kill: {split:?}");

    Cluster::wait_for_all(&mut cluster.clients[1], &runs).await;
    let requests = cluster.receiver.requests();
    let summary = cluster.receiver.summary();
    let delivered = assert_every_step_delivered(&runs, &requests, &cluster.secret, &summary);
    for ((run_id, step), got) in &delivered {
        assert_eq!(got.len(), 1, "{step} of {run_id}:\n{summary}");
        assert_eq!(got[0].attempt(), 1, "{step} of {run_id}:\n{summary}");
    }
    for run_id in &runs {
        let run = cluster.clients[1].run(run_id).await;
        let timeline = run_summary(&run);
        assert_eq!(run.steps[0].attempts, 1, "{timeline}");
    }
    assert!(cluster.workers.iter_mut().all(WorkerNode::is_running));
}

/// Partitions of the ownership test: few, so every scheduler's share is quick to check.
const PARTITIONS: u16 = 32;

/// The owner of every partition, as Redis has it.
async fn owners(store: &Store) -> Vec<Option<String>> {
    store
        .partition_owners()
        .await
        .expect("read partition owners")
}

/// Waits until every partition is owned, by exactly the schedulers `ids`, each owning
/// some; returns how many each owns.
async fn wait_for_owners(store: &Store, ids: &[&str], within: Duration) -> BTreeMap<String, usize> {
    let expected: BTreeSet<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    let split = eventually_some(within, || async {
        let owners = owners(store).await;
        let mut split: BTreeMap<String, usize> = BTreeMap::new();
        for owner in &owners {
            *split.entry(owner.clone()?).or_default() += 1;
        }
        (split.keys().cloned().collect::<BTreeSet<_>>() == expected).then_some(split)
    })
    .await;
    match split {
        Some(split) => split,
        None => panic!(
            "partitions not owned by exactly {ids:?} within {within:?}: {:?}",
            owners(store).await
        ),
    }
}

/// Enrolls contact `contact_id` (no attributes) in `playbook`: the run id.
async fn enroll(client: &mut TouchpointClient, playbook: &str, contact_id: &str) -> String {
    client
        .enrollments
        .enroll(EnrollRequest {
            playbook: playbook.to_owned(),
            contact: Some(contact(contact_id, &[], &[])),
            request_id: request_id(),
        })
        .await
        .expect("Enroll")
        .into_inner()
        .run_id
}

/// Applies `yaml`, a playbook new to the deployment.
async fn apply_new(client: &mut TouchpointClient, yaml: &str) {
    let applied = client
        .playbooks
        .apply_playbook(ApplyPlaybookRequest {
            yaml: yaml.to_owned(),
            dry_run: false,
        })
        .await
        .expect("ApplyPlaybook")
        .into_inner();
    assert_eq!(applied.status(), ApplyStatus::Created);
}

/// Flags of scheduler `id` in the ownership tests: 32 partitions under 2 s leases, then
/// `extra`.
fn ownership_flags<'a>(id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--scheduler-id",
        id,
        "--partitions",
        "32",
        "--partition-lease",
        "2s",
    ];
    flags.extend_from_slice(extra);
    flags
}

/// Schedulers `ids` on `redis` with [`ownership_flags`], and a client of each once it
/// answers.
async fn start_schedulers(
    redis: &TestRedis,
    ids: &[&str],
    extra: &[&str],
) -> (Vec<SchedulerNode>, Vec<TouchpointClient>) {
    let mut schedulers: Vec<SchedulerNode> = ids
        .iter()
        .map(|id| SchedulerNode::start(NODE, &redis.url(), &ownership_flags(id, extra)))
        .collect();
    let mut clients = Vec::new();
    for scheduler in &mut schedulers {
        clients.push(scheduler.client().await);
    }
    (schedulers, clients)
}

/// A worker (`w-1`, webhooks to `receiver` on channel `wecom`) given the first
/// scheduler's address only; returns once every scheduler logged it connected.
async fn worker_on_every_scheduler(
    schedulers: &mut [SchedulerNode],
    receiver: &WebhookReceiver,
    secret: &str,
    concurrency: u32,
) -> WorkerNode {
    let config = WorkerConfig {
        concurrency,
        ..WorkerConfig::new()
    }
    .channel(ChannelConfig::webhook(
        "wecom",
        &format!("{}/w", receiver.url()),
        SECRET_ENV,
    ));
    let mut worker = WorkerNode::start(
        NODE,
        &schedulers[0].endpoint(),
        "w-1",
        &config,
        &[(SECRET_ENV, secret)],
    );
    for scheduler in schedulers.iter_mut() {
        let attached = eventually(Duration::from_secs(20), || {
            let log = scheduler.process().log();
            async move { log.contains("worker connected") }
        })
        .await;
        assert!(
            attached,
            "the worker did not attach to every scheduler:\n{}",
            worker.process().log_tail(30)
        );
    }
    worker
}

/// Three schedulers on one Redis with 2 s partition leases and one worker configured
/// with the first scheduler's address only. The schedulers split the partitions (each
/// owns some); the worker learns of the other two from the first and attaches to all
/// three. Runs enrolled through all three complete with every step delivered exactly
/// once, although one scheduler is killed with SIGKILL while deliveries are in flight:
/// its partitions move to the other two within about a lease, and the results of the
/// steps it had handed out reach them on the worker's other streams. A fourth scheduler
/// then takes a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedulers_split_the_partitions_and_take_over_a_killed_ones() {
    const RUNS: usize = 30;
    let lease = Duration::from_secs(2);
    let redis = TestRedis::from_env();
    let receiver = WebhookReceiver::start().await;
    let secret = generate_secret();
    let (mut schedulers, mut clients) =
        start_schedulers(&redis, &["s1", "s2", "s3"], &["--lease", "2s"]).await;
    let store = Store::connect(&redis.url(), "tp", PARTITIONS, 3600)
        .await
        .expect("connect to Redis");
    let split = wait_for_owners(&store, &["s1", "s2", "s3"], Duration::from_secs(20)).await;
    eprintln!("partitions owned: {split:?}");

    let mut worker = worker_on_every_scheduler(&mut schedulers, &receiver, &secret, 8).await;
    apply_new(&mut clients[0], PLAYBOOK).await;

    // Deliveries take a while, so some are in flight when s2 is killed.
    receiver.script((0..RUNS).map(|_| Reply::status(200).held_for(Duration::from_millis(500))));
    let mut runs = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        runs.push(enroll(&mut clients[i % 3], "three-touches", &format!("c-{i}")).await);
    }
    receiver.wait_for(RUNS / 3, TIMEOUT).await;
    schedulers[1].kill9();
    let killed = std::time::Instant::now();
    let split = wait_for_owners(&store, &["s1", "s3"], Duration::from_secs(15)).await;
    let took = killed.elapsed();
    eprintln!("s2 killed: its partitions moved within {took:?}: {split:?}");
    assert!(
        took <= lease * 3,
        "the partitions of a killed scheduler should move within about a lease (2 s), took {took:?}"
    );

    for run_id in &runs {
        let run = clients[0]
            .wait_for_status(run_id, RunStatus::Completed, TIMEOUT)
            .await;
        assert_eq!(run.steps.len(), 5, "{}", run_summary(&run));
    }
    let requests = receiver.requests();
    let summary = receiver.summary();
    let delivered = assert_every_step_delivered(&runs, &requests, &secret, &summary);
    for ((run_id, step), got) in &delivered {
        assert_eq!(
            got.len(),
            1,
            "{step} of {run_id} was delivered {} times:\n{summary}",
            got.len()
        );
    }

    let mut fourth = SchedulerNode::start(
        NODE,
        &redis.url(),
        &ownership_flags("s4", &["--lease", "2s"]),
    );
    let split = wait_for_owners(&store, &["s1", "s3", "s4"], Duration::from_secs(15)).await;
    eprintln!("s4 started: {split:?}");
    let attached = eventually(Duration::from_secs(20), || {
        let log = fourth.process().log();
        async move { log.contains("worker connected") }
    })
    .await;
    assert!(
        attached,
        "the worker should attach to a new scheduler:\n{}",
        worker.process().log_tail(30)
    );
    drop(fourth);
}

/// A scheduler that stops gracefully (SIGTERM) gives up its partitions and its
/// membership at once: the other takes them at its next renewal (every third of the 6 s
/// partition lease), long before the leases would have expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_stopping_gracefully_hands_its_partitions_over_at_once() {
    let redis = TestRedis::from_env();
    let flags = |id: &'static str| ["--scheduler-id", id, "--partition-lease", "6s"];
    let mut leaving = SchedulerNode::start(NODE, &redis.url(), &flags("s1"));
    let mut staying = SchedulerNode::start(NODE, &redis.url(), &flags("s2"));
    leaving.client().await;
    staying.client().await;
    let store = Store::connect(&redis.url(), "tp", 256, 3600)
        .await
        .expect("connect to Redis");
    wait_for_owners(&store, &["s1", "s2"], Duration::from_secs(20)).await;

    leaving.process().signal("TERM");
    let stopped = std::time::Instant::now();
    wait_for_owners(&store, &["s2"], Duration::from_secs(15)).await;
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "a graceful stop should hand the partitions over within a renewal (2 s), took {took:?}"
    );
    let members = store.live_schedulers(0).await.expect("read members");
    assert_eq!(
        members.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["s2"],
        "the stopped scheduler left the members"
    );
}

/// A worker configured with another name for its scheduler (`localhost` where the
/// scheduler advertises `127.0.0.1`) holds one stream to it, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_holds_one_stream_to_a_scheduler_it_knows_by_two_addresses() {
    let redis = TestRedis::from_env();
    let mut scheduler = SchedulerNode::start(NODE, &redis.url(), &[]);
    scheduler.client().await;
    let config = WorkerConfig::new().channel(ChannelConfig::log("log"));
    let mut worker = WorkerNode::start(
        NODE,
        &format!("http://localhost:{}", scheduler.port()),
        "w-1",
        &config,
        &[],
    );
    let attached = eventually(Duration::from_secs(20), || {
        let log = scheduler.process().log();
        async move { log.contains("worker connected") }
    })
    .await;
    assert!(attached, "{}", worker.process().log_tail(20));
    // Peers (sent after Welcome) names the scheduler by its advertised 127.0.0.1 address.
    let once = stays(Duration::from_secs(2), || {
        let log = scheduler.process().log();
        async move { log.matches("worker connected").count() == 1 }
    })
    .await;
    assert!(
        once,
        "the worker attached twice:\n{}\n{}",
        scheduler.process().log_tail(20),
        worker.process().log_tail(20)
    );
}

/// A run enrolled through a scheduler that does not own the run's partition goes out
/// at once: the owner is woken over Redis pub/sub, not left to find it at its next idle
/// poll (set to a minute here, longer than the test waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_another_scheduler_wakes_the_partitions_owner() {
    const ONE_SEND: &str =
        "name: one-send\nsteps:\n  - id: hello\n    action: send_message\n    channel: wecom\n";
    let redis = TestRedis::from_env();
    let receiver = WebhookReceiver::start().await;
    let secret = generate_secret();
    let (mut schedulers, mut clients) =
        start_schedulers(&redis, &["s1", "s2"], &["--poll-interval", "60s"]).await;
    let store = Store::connect(&redis.url(), "tp", PARTITIONS, 3600)
        .await
        .expect("connect to Redis");
    wait_for_owners(&store, &["s1", "s2"], Duration::from_secs(20)).await;
    let _worker = worker_on_every_scheduler(&mut schedulers, &receiver, &secret, 8).await;
    apply_new(&mut clients[0], ONE_SEND).await;

    // Contacts whose partitions s2 owns, enrolled through s1.
    let owners = owners(&store).await;
    let of_s2: Vec<String> = (0..)
        .map(|n| format!("c-{n}"))
        .filter(|id| {
            let partition = partition_of_contact(id, PARTITIONS);
            owners[usize::from(partition)].as_deref() == Some("s2")
        })
        .take(3)
        .collect();
    let mut runs = Vec::new();
    for id in &of_s2 {
        runs.push(enroll(&mut clients[0], "one-send", id).await);
    }
    let requests = receiver.wait_for(3, Duration::from_secs(20)).await;
    assert_eq!(requests.len(), 3, "{}", receiver.summary());
    for run_id in &runs {
        clients[1]
            .wait_for_status(run_id, RunStatus::Completed, Duration::from_secs(20))
            .await;
    }
}

/// A worker attached to two schedulers gives each a share of its slots (`Share`: half,
/// rounded up): together they hand it no more steps than its concurrency (the sum of
/// their `leases_in_flight`), and the rest wait in Redis, for whichever worker frees a
/// slot first, instead of queueing on it. Fails without the share: each hands it 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedulers_share_a_workers_slots() {
    const RUNS: usize = 12;
    const IN_FLIGHT: &str = "touchpoint_scheduler_leases_in_flight";
    let redis = TestRedis::from_env();
    let ports = [free_port(), free_port()];
    let mut schedulers: Vec<SchedulerNode> = ["a", "b"]
        .iter()
        .zip(ports)
        .map(|(id, port)| {
            let listen = format!("127.0.0.1:{port}");
            let flags = ownership_flags(id, &["--metrics-listen", &listen]);
            SchedulerNode::start(NODE, &redis.url(), &flags)
        })
        .collect();
    let mut clients = Vec::new();
    for scheduler in &mut schedulers {
        clients.push(scheduler.client().await);
    }
    let store = Store::connect(&redis.url(), "tp", PARTITIONS, 60)
        .await
        .expect("store");
    wait_for_owners(&store, &["a", "b"], TIMEOUT).await;
    apply_new(
        &mut clients[0],
        "name: slow\nsteps:\n  - {id: hello, action: send_message, channel: wecom}\n",
    )
    .await;
    let receiver = WebhookReceiver::start().await;
    // Every delivery hangs for a long while: what is handed out stays out.
    receiver.script((0..RUNS).map(|_| Reply::status(200).held_for(Duration::from_secs(30))));
    let secret = generate_secret();
    let _worker = worker_on_every_scheduler(&mut schedulers, &receiver, &secret, 2).await;
    // Until its shares arrive, each scheduler counts the worker's whole capacity (the
    // moment between a Hello and the Share that follows the next attach).
    for scheduler in &mut schedulers {
        let shared = eventually(TIMEOUT, || {
            let log = scheduler.process().log();
            async move { log.contains("worker's share of its slots worker=w-1 capacity=1") }
        })
        .await;
        assert!(
            shared,
            "no share of 1 slot:\n{}",
            scheduler.process().log_tail(20)
        );
    }

    for n in 0..RUNS {
        let client = &mut clients[n % 2];
        enroll(client, "slow", &format!("c-share-{n}")).await;
    }
    receiver.wait_for(2, TIMEOUT).await;
    let handed_out = || async {
        let mut sum = 0;
        for port in ports {
            sum += gauge(&scrape(port).await, IN_FLIGHT).unwrap_or(0);
        }
        sum
    };
    // (The gauge is sampled every second.)
    let full = eventually(TIMEOUT, || async { handed_out().await >= 2 }).await;
    assert!(full, "never 2 steps out: {}", handed_out().await);
    let within = stays(Duration::from_secs(3), || async { handed_out().await <= 2 }).await;
    assert!(
        within,
        "{} steps handed to a worker with 2 slots:\n{}",
        handed_out().await,
        receiver.summary()
    );
}
