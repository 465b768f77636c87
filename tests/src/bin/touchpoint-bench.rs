//! `touchpoint-bench SCENARIO --redis-url URL [--contacts N] [--steps K] [--json]`: the
//! real scheduler and worker (in this process, talking over loopback gRPC and a real
//! Redis) with a no-op channel, measured from Redis's own counters. See
//! docs/performance.md for what each scenario does and the figures.
//!
//! It flushes the Redis it is pointed at: give it a throwaway one.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use serde_json::json;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use touchpoint_proto::telemetry::{LogFormat, Telemetry};
use touchpoint_proto::v1::{
    EnrollBatchRequest, EnrollItem, GetStatsRequest, PausePlaybookRequest, ResumePlaybookRequest,
};
use touchpoint_scheduler::SchedulerArgs;
use touchpoint_tests::{TouchpointClient, contact};
use touchpoint_worker::WorkerConfig;
use touchpoint_worker::channel::{
    ChannelAdapter, Delivered, Delivery, Error as ChannelError, Registry,
};

/// The allocator the scheduler and worker binaries use.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The channel every benchmark playbook sends on.
const CHANNEL: &str = "bench";
/// Runs per `EnrollBatch` call.
const BATCH: usize = 1000;

#[derive(Parser, Debug)]
#[command(name = "touchpoint-bench", about)]
struct Args {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// A throwaway Redis (it is flushed), on this machine (its CPU time is read from INFO).
    #[arg(long, default_value = "redis://127.0.0.1:6390")]
    redis_url: String,
    /// Contacts (runs); default per scenario: chain 20,000, burst 50,000, enroll and
    /// idle 100,000.
    #[arg(long)]
    contacts: Option<usize>,
    /// Steps per run in `chain`.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// The scheduler's partitions.
    #[arg(long, default_value_t = 64)]
    partitions: u16,
    /// The scheduler's claim batch.
    #[arg(long, default_value_t = 512)]
    claim_batch: usize,
    /// The worker's concurrency on the bench channel.
    #[arg(long, default_value_t = 512)]
    concurrency: u32,
    /// The scheduler's `--hand-out-ahead` (e.g. `5s`, `0s` for off): sends ending a wait
    /// within it are handed to the worker before their due time.
    #[arg(long, default_value = "5s")]
    hand_out_ahead: String,
    /// The worker's `hold_ahead`: most of those it keeps waiting at once.
    #[arg(long, default_value_t = touchpoint_worker::config::DEFAULT_HOLD_AHEAD)]
    hold_ahead: u32,
    /// Concurrent EnrollBatch calls.
    #[arg(long, default_value_t = 4)]
    enrollers: usize,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Scenario {
    /// Runs of K send steps back to back: steps/s and Redis cost per step.
    Chain,
    /// N sends due at one instant (a `wait_until` minute): hand-out lag.
    Burst,
    /// Batched gRPC enrollment into a three-day wait: runs/s.
    Enroll,
    /// Runs waiting on a three-day timer: Redis bytes per run.
    Idle,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The scheduler's and worker's logs on stderr, when RUST_LOG asks for them.
    let telemetry =
        std::env::var_os("RUST_LOG").map(|_| Telemetry::init("touchpoint-bench", LogFormat::Text));
    let redis = Redis::connect(&args.redis_url).await?;
    redis.flush().await?;
    let bench = Bench::start(&args).await?;
    let report = match args.scenario {
        Scenario::Chain => chain(&args, &bench, &redis).await?,
        Scenario::Burst => burst(&args, &bench, &redis).await?,
        Scenario::Enroll => enroll(&args, &bench, &redis, true).await?,
        Scenario::Idle => enroll(&args, &bench, &redis, false).await?,
    };
    bench.stop().await;
    if let Some(telemetry) = telemetry {
        telemetry.shutdown();
    }
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// `--steps` sends per run, enrolled while the playbook is paused, then resumed: from
/// the first delivery to the last run completed.
async fn chain(args: &Args, bench: &Bench, redis: &Redis) -> anyhow::Result<serde_json::Value> {
    let contacts = args.contacts.unwrap_or(20_000);
    let steps = args.steps.max(1);
    let mut yaml = "name: chain\nsteps:\n".to_owned();
    for n in 1..=steps {
        yaml.push_str(&format!(
            "  - {{id: s{n}, action: send_message, channel: {CHANNEL}}}\n"
        ));
    }
    let mut client = bench.client.clone();
    bench.apply(&yaml).await?;
    client
        .playbooks
        .pause_playbook(PausePlaybookRequest {
            name: "chain".to_owned(),
        })
        .await?;
    bench
        .enroll_all("chain", contacts, args.enrollers, true)
        .await?;
    // Every run's first step was claimed and parked by the paused playbook.
    bench.wait_for_no_due(Duration::from_secs(120)).await?;
    let total = contacts * steps;
    bench.recorder.expect(total);
    let before = redis.snapshot().await?;
    client
        .playbooks
        .resume_playbook(ResumePlaybookRequest {
            name: "chain".to_owned(),
        })
        .await?;
    bench.recorder.wait(Duration::from_secs(600)).await?;
    bench
        .wait_for_completed("chain", contacts, Duration::from_secs(60))
        .await?;
    let finished = now_ms();
    let after = redis.snapshot().await?;
    let first = bench.recorder.first_ms().await;
    let seconds = (finished - first).max(1) as f64 / 1000.0;
    Ok(json!({
        "scenario": "chain",
        "contacts": contacts,
        "steps": steps,
        "total_steps": total,
        "steps_per_s": (total as f64 / seconds).round(),
        "span_s": seconds,
        "redis_cmds_per_step": after.commands_since(&before) as f64 / total as f64,
        "redis_cpu_us_per_step": after.cpu_us_since(&before) / total as f64,
        "top_cmds_per_step": after.top_commands_since(&before, total),
        "faults": bench.faults().await,
        "partitions": args.partitions,
        "claim_batch": args.claim_batch,
        "concurrency": args.concurrency,
    }))
}

/// `--contacts` runs whose send step is due at one minute boundary (`wait_until`, UTC):
/// lag from that instant to each delivery reaching the worker's adapter.
async fn burst(args: &Args, bench: &Bench, redis: &Redis) -> anyhow::Result<serde_json::Value> {
    let contacts = args.contacts.unwrap_or(50_000);
    // Far enough ahead that every run is enrolled and parked on its timer first.
    let margin_ms = 15_000 + i64::try_from(contacts / 10).unwrap_or(i64::MAX);
    let minute = 60_000;
    let due_ms = (now_ms() + margin_ms) / minute * minute + minute;
    let secs = due_ms / 1000;
    let at = format!("{:02}:{:02}", secs / 3600 % 24, secs / 60 % 60);
    let yaml = format!(
        "name: burst\nsteps:\n  - {{id: at, wait_until: \"{at}\"}}\n  \
         - {{id: send, action: send_message, channel: {CHANNEL}}}\n"
    );
    bench.apply(&yaml).await?;
    bench.recorder.expect(contacts);
    bench
        .enroll_all("burst", contacts, args.enrollers, true)
        .await?;
    let wait = due_ms - now_ms() - 1000;
    if wait < 0 {
        bail!("enrolling took past the due minute; give fewer --contacts");
    }
    tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())).await;
    let before = redis.snapshot().await?;
    bench.recorder.wait(Duration::from_secs(600)).await?;
    bench
        .wait_for_completed("burst", contacts, Duration::from_secs(60))
        .await?;
    let after = redis.snapshot().await?;
    let mut lags: Vec<i64> = bench
        .recorder
        .times()
        .await
        .iter()
        .map(|at| at - due_ms)
        .collect();
    lags.sort_unstable();
    Ok(json!({
        "scenario": "burst",
        "contacts": contacts,
        "due_at": at,
        "lag_ms_p50": percentile(&lags, 0.50),
        "lag_ms_p99": percentile(&lags, 0.99),
        "lag_ms_max": lags.last().copied().unwrap_or(0),
        "steps_per_s": (contacts as f64 * 1000.0 / lags.last().copied().unwrap_or(1).max(1) as f64).round(),
        "redis_cmds_per_step": after.commands_since(&before) as f64 / contacts as f64,
        "redis_cpu_us_per_step": after.cpu_us_since(&before) / contacts as f64,
        "top_cmds_per_step": after.top_commands_since(&before, contacts),
        "faults": bench.faults().await,
        "partitions": args.partitions,
        "claim_batch": args.claim_batch,
        "hand_out_ahead": args.hand_out_ahead,
        "hold_ahead": args.hold_ahead,
    }))
}

/// `--contacts` runs enrolled (batched gRPC) into a three-day wait: runs/s, Redis cost
/// and bytes per run (with its new contact). `idle` leaves out request ids and then
/// enrolls the same contacts into a second playbook (bytes of a run whose contact is
/// already stored); `enroll` sends request ids, as a service would.
async fn enroll(
    args: &Args,
    bench: &Bench,
    redis: &Redis,
    with_request_ids: bool,
) -> anyhow::Result<serde_json::Value> {
    let contacts = args.contacts.unwrap_or(100_000);
    bench
        .apply(&format!(
            "name: idle\nsteps:\n  - {{id: wait, wait: 3d}}\n  \
             - {{id: send, action: send_message, channel: {CHANNEL}}}\n"
        ))
        .await?;
    let before = redis.snapshot().await?;
    let started = Instant::now();
    bench
        .enroll_all("idle", contacts, args.enrollers, with_request_ids)
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    let after = redis.snapshot().await?;
    let bytes = after.used_memory.saturating_sub(before.used_memory);
    let by_part = redis.bytes_by_part(args.partitions).await?;
    // The same contacts again, into a second playbook: what a run costs on its own, its
    // contact already stored (its hash grows by the playbook it entered).
    let mut known_contact_bytes = serde_json::Value::Null;
    if !with_request_ids {
        bench
            .apply(&format!(
                "name: idle-again\nsteps:\n  - {{id: wait, wait: 3d}}\n  \
                 - {{id: send, action: send_message, channel: {CHANNEL}}}\n"
            ))
            .await?;
        let before = redis.snapshot().await?;
        bench
            .enroll_all("idle-again", contacts, args.enrollers, false)
            .await?;
        let after = redis.snapshot().await?;
        let bytes = after.used_memory.saturating_sub(before.used_memory);
        known_contact_bytes = json!(bytes as f64 / contacts as f64);
    }
    Ok(json!({
        "scenario": if with_request_ids { "enroll" } else { "idle" },
        "contacts": contacts,
        "runs_per_s": (contacts as f64 / seconds).round(),
        "redis_cmds_per_run": after.commands_since(&before) as f64 / contacts as f64,
        "redis_cpu_us_per_run": after.cpu_us_since(&before) / contacts as f64,
        "redis_bytes_per_run": bytes as f64 / contacts as f64,
        "redis_bytes_per_run_of_a_known_contact": known_contact_bytes,
        "redis_bytes_by_part": by_part,
        "top_cmds_per_run": after.top_commands_since(&before, contacts),
        "request_ids": with_request_ids,
        "partitions": args.partitions,
    }))
}

fn percentile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The scheduler and the worker of one benchmark, in this process.
struct Bench {
    client: TouchpointClient,
    recorder: Arc<Recorder>,
    store: touchpoint_scheduler::store::Store,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Bench {
    async fn start(args: &Args) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let scheduler = SchedulerArgs::try_parse_from([
            "touchpoint-scheduler",
            "--redis-url",
            &args.redis_url,
            "--partitions",
            &args.partitions.to_string(),
            "--claim-batch",
            &args.claim_batch.to_string(),
            "--scheduler-id",
            "bench",
            "--hand-out-ahead",
            &args.hand_out_ahead,
        ])?;
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let stopped = stop.clone();
        tasks.push(tokio::spawn(async move {
            touchpoint_scheduler::run(scheduler, listener, async move {
                stopped.cancelled().await;
            })
            .await
        }));
        let client = TouchpointClient::connect(&endpoint, Duration::from_secs(30)).await;

        let mut config = WorkerConfig::console(&endpoint, &[CHANNEL]);
        config.worker_id = Some("bench-worker".to_owned());
        for channel in &mut config.channels {
            channel.concurrency = args.concurrency;
        }
        config.hold_ahead = args.hold_ahead;
        let mut registry = Registry::from_config(&config.channels)?;
        let recorder = Arc::new(Recorder::default());
        registry.insert(CHANNEL, Arc::clone(&recorder) as Arc<dyn ChannelAdapter>);
        let stopped = stop.clone();
        tasks.push(tokio::spawn(async move {
            touchpoint_worker::serve(config, registry, async move {
                stopped.cancelled().await;
            })
            .await
        }));
        let store =
            touchpoint_scheduler::store::Store::connect(&args.redis_url, "tp", args.partitions, 60)
                .await?;
        Ok(Self {
            client,
            recorder,
            store,
            stop,
            tasks,
        })
    }

    async fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let request = touchpoint_proto::v1::ApplyPlaybookRequest {
            yaml: yaml.to_owned(),
            dry_run: false,
        };
        self.client
            .clone()
            .playbooks
            .apply_playbook(request)
            .await?;
        Ok(())
    }

    /// Enrolls contacts `c-0` .. `c-{count-1}` in batches of [`BATCH`], `enrollers`
    /// calls at a time.
    async fn enroll_all(
        &self,
        playbook: &str,
        count: usize,
        enrollers: usize,
        with_request_ids: bool,
    ) -> anyhow::Result<()> {
        let next = Arc::new(AtomicUsize::new(0));
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..enrollers.max(1) {
            let (next, mut client) = (Arc::clone(&next), self.client.clone());
            let playbook = playbook.to_owned();
            calls.spawn(async move {
                loop {
                    let start = next.fetch_add(BATCH, Ordering::Relaxed);
                    if start >= count {
                        return anyhow::Ok(());
                    }
                    let items = (start..count.min(start + BATCH))
                        .map(|n| {
                            let mut contact = contact(&format!("c-{n}"), &[], &[]);
                            contact.tz = "UTC".to_owned();
                            EnrollItem {
                                contact: Some(contact),
                                request_id: if with_request_ids {
                                    format!("bench-{playbook}-{n}")
                                } else {
                                    String::new()
                                },
                            }
                        })
                        .collect();
                    let request = EnrollBatchRequest {
                        playbook: playbook.clone(),
                        items,
                    };
                    let response = client.enrollments.enroll_batch(request).await?;
                    if let Some(refused) = response
                        .into_inner()
                        .results
                        .iter()
                        .find(|r| !r.error.is_empty())
                    {
                        bail!("an enrollment was refused: {}", refused.error);
                    }
                }
            });
        }
        while let Some(done) = calls.join_next().await {
            done??;
        }
        Ok(())
    }

    async fn wait_for_no_due(&self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let (due, _) = self.store.backlog(now_ms()).await?;
            if due == 0 {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!("{due} steps still due after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_for_completed(
        &self,
        playbook: &str,
        runs: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let stats = self
                .client
                .clone()
                .playbooks
                .get_stats(GetStatsRequest {
                    name: playbook.to_owned(),
                    version: 0,
                })
                .await?
                .into_inner();
            if stats.completed >= runs as u64 {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "{} of {runs} runs completed after {timeout:?} ({})",
                    stats.completed,
                    self.faults().await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What went wrong along the way: steps delivered twice, worker results refused as
    /// stale, leases that expired.
    async fn faults(&self) -> serde_json::Value {
        let scheduler = &touchpoint_proto::metrics::metrics().scheduler;
        json!({
            "duplicate_deliveries": self.recorder.duplicates().await,
            "stale_results": scheduler.stale_results.get(),
            "leases_expired": scheduler.leases_expired.get(),
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// The no-op channel: records when each delivery reached it (ms) and answers at once.
/// A step delivered more than once (same idempotency key) counts once toward what is
/// expected, and as a duplicate.
#[derive(Debug, Default)]
struct Recorder {
    deliveries: Mutex<Deliveries>,
    expected: AtomicUsize,
    all_in: Notify,
}

#[derive(Debug, Default)]
struct Deliveries {
    /// When each step was first delivered (ms).
    times: Vec<i64>,
    /// The steps delivered (idempotency keys).
    seen: HashSet<String>,
    /// Deliveries of a step delivered before.
    duplicates: usize,
}

impl Recorder {
    fn expect(&self, count: usize) {
        self.expected.store(count, Ordering::SeqCst);
    }

    async fn wait(&self, timeout: Duration) -> anyhow::Result<()> {
        let expected = self.expected.load(Ordering::SeqCst);
        tokio::time::timeout(timeout, async {
            loop {
                let notified = self.all_in.notified();
                if self.deliveries.lock().await.times.len() >= expected {
                    return;
                }
                notified.await;
            }
        })
        .await
        .with_context(|| format!("fewer than {expected} deliveries within {timeout:?}"))
    }

    async fn first_ms(&self) -> i64 {
        let deliveries = self.deliveries.lock().await;
        deliveries.times.iter().copied().min().unwrap_or(0)
    }

    async fn times(&self) -> Vec<i64> {
        self.deliveries.lock().await.times.clone()
    }

    async fn duplicates(&self) -> usize {
        self.deliveries.lock().await.duplicates
    }
}

#[async_trait::async_trait]
impl ChannelAdapter for Recorder {
    async fn deliver(&self, delivery: &Delivery) -> Result<Delivered, ChannelError> {
        let mut deliveries = self.deliveries.lock().await;
        if deliveries.seen.insert(delivery.idempotency_key.clone()) {
            deliveries.times.push(now_ms());
        } else {
            deliveries.duplicates += 1;
        }
        if deliveries.times.len() >= self.expected.load(Ordering::SeqCst) {
            self.all_in.notify_waiters();
        }
        Ok(Delivered::new("ok"))
    }
}

/// A connection for INFO and FLUSHALL.
struct Redis {
    conn: redis::aio::MultiplexedConnection,
}

/// Redis's own counters at one moment.
struct Snapshot {
    /// `total_commands_processed` (those inside Lua scripts included, like the BullMQ
    /// harness counts them).
    commands: u64,
    /// Calls by command (INFO commandstats).
    by_command: BTreeMap<String, u64>,
    /// used_cpu_user + used_cpu_sys, in µs.
    cpu_us: f64,
    used_memory: u64,
}

impl Snapshot {
    fn commands_since(&self, before: &Self) -> u64 {
        self.commands.saturating_sub(before.commands)
    }

    fn cpu_us_since(&self, before: &Self) -> f64 {
        self.cpu_us - before.cpu_us
    }

    /// The most called commands since `before`, per `unit` (step or run).
    fn top_commands_since(&self, before: &Self, unit: usize) -> serde_json::Value {
        let mut calls: Vec<(&String, u64)> = self
            .by_command
            .iter()
            .map(|(name, n)| {
                (
                    name,
                    n.saturating_sub(*before.by_command.get(name).unwrap_or(&0)),
                )
            })
            .filter(|(name, n)| *n > 0 && !name.starts_with("info") && !name.starts_with("config"))
            .collect();
        calls.sort_by_key(|call| std::cmp::Reverse(call.1));
        let top: serde_json::Map<String, serde_json::Value> = calls
            .into_iter()
            .take(12)
            .map(|(name, n)| {
                let per = (n as f64 / unit.max(1) as f64 * 1000.0).round() / 1000.0;
                (name.clone(), json!(per))
            })
            .collect();
        serde_json::Value::Object(top)
    }
}

impl Redis {
    /// Where a waiting run's bytes go, by `MEMORY USAGE` (which leaves out the ~40 bytes
    /// each key costs in Redis's key table): the run hash and the contact hash (mean of
    /// a sample), and one entry of the partition's due set, of its hourly lists of timers
    /// far ahead, and of its playbook list.
    async fn bytes_by_part(&self, partitions: u16) -> anyhow::Result<serde_json::Value> {
        let mut conn = self.conn.clone();
        let keys = touchpoint_scheduler::store::Keys::new("tp");
        let sample = |pattern: String| {
            let mut conn = conn.clone();
            async move {
                let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(0)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(20_000)
                    .query_async(&mut conn)
                    .await?;
                let mut total = 0u64;
                for key in keys.iter().take(200) {
                    let bytes: u64 = redis::cmd("MEMORY")
                        .arg("USAGE")
                        .arg(key)
                        .query_async(&mut conn)
                        .await?;
                    total += bytes;
                }
                anyhow::Ok(total as f64 / keys.len().clamp(1, 200) as f64)
            }
        };
        let run = sample("tp:{p*}:run:*".to_owned()).await?;
        let contact = sample("tp:{p*}:contact:*".to_owned()).await?;
        let (mut due_bytes, mut due_entries, mut list_bytes, mut list_entries) =
            (0u64, 0u64, 0u64, 0u64);
        for partition in 0..partitions {
            for (key, length, bytes, entries) in [
                (
                    keys.due(partition),
                    "ZCARD",
                    &mut due_bytes,
                    &mut due_entries,
                ),
                (
                    keys.playbook_runs(partition, "idle"),
                    "XLEN",
                    &mut list_bytes,
                    &mut list_entries,
                ),
            ] {
                let (usage, count): (Option<u64>, u64) = redis::pipe()
                    .cmd("MEMORY")
                    .arg("USAGE")
                    .arg(&key)
                    .arg("SAMPLES")
                    .arg(0)
                    .cmd(length)
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?;
                *bytes += usage.unwrap_or(0);
                *entries += count;
            }
        }
        // Timers far ahead wait in hourly lists instead of the due set.
        let (mut later_bytes, mut later_entries) = (0u64, 0u64);
        for partition in 0..partitions {
            let later = keys.later(partition);
            let hours: Vec<String> = redis::cmd("ZRANGE")
                .arg(&later)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await?;
            for hour in hours {
                let list = format!("{later}:{hour}");
                let (usage, count): (Option<u64>, u64) = redis::pipe()
                    .cmd("MEMORY")
                    .arg("USAGE")
                    .arg(&list)
                    .arg("SAMPLES")
                    .arg(0)
                    .cmd("LLEN")
                    .arg(&list)
                    .query_async(&mut conn)
                    .await?;
                later_bytes += usage.unwrap_or(0);
                later_entries += count;
            }
        }
        let per = |bytes: u64, entries: u64| (bytes as f64 / entries.max(1) as f64).round();
        Ok(json!({
            "run_hash": run.round(),
            "contact_hash": contact.round(),
            "due_entries": due_entries,
            "due_entry": per(due_bytes, due_entries),
            "later_entries": later_entries,
            "later_entry": per(later_bytes, later_entries),
            "list_entry": per(list_bytes, list_entries),
        }))
    }

    async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        // FLUSHALL of an earlier run's data takes longer than the default reply timeout
        // on a busy machine.
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .with_context(|| format!("cannot reach Redis at {url}"))?;
        Ok(Self { conn })
    }

    async fn flush(&self) -> anyhow::Result<()> {
        let mut conn = self.conn.clone();
        let () = redis::cmd("FLUSHALL").query_async(&mut conn).await?;
        let () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut conn = self.conn.clone();
        let info: String = redis::cmd("INFO").arg("all").query_async(&mut conn).await?;
        let field = |name: &str| -> f64 {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|value| value.trim().parse().ok())
                .unwrap_or(0.0)
        };
        let by_command = info
            .lines()
            .filter_map(|line| line.strip_prefix("cmdstat_"))
            .filter_map(|line| {
                let (name, stats) = line.split_once(':')?;
                let calls = stats.split_once("calls=")?.1.split(',').next()?;
                Some((name.to_owned(), calls.parse::<u64>().ok()?))
            })
            .collect();
        let used_memory = field("used_memory") as u64;
        Ok(Snapshot {
            commands: field("total_commands_processed") as u64,
            by_command,
            cpu_us: (field("used_cpu_user") + field("used_cpu_sys")) * 1e6,
            used_memory,
        })
    }
}
