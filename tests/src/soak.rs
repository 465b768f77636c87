//! A bounded chaos soak (`touchpoint-soak`): many runs through several schedulers and
//! workers, real processes, while a chaos loop kills (SIGKILL) and restarts a random one
//! every few seconds. It checks what `docs/delivery-semantics.md` promises: every (run,
//! step) reaches the receiver (nothing lost), always under one `webhook-id` (so a receiver
//! deduplicating by it sees each step once), every run completes, and the same
//! `request_id` never starts two runs.
//!
//! Not part of `cargo test` (it runs for minutes); see the README's "Soak". Everything it
//! starts listens on loopback only and is killed when [`run`]'s future is dropped (the
//! chaos task owns the schedulers and workers; dropping the runtime drops it), also on a
//! panic: [`Process`] and [`RedisServer`] kill their child on drop.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode};
use tempfile::TempDir;
use tokio::{sync::watch, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};
use touchpoint_proto::v1::{
    ApplyPlaybookRequest, EnrollRequest, ListPlaybooksRequest, ListRunsRequest, Run, RunStatus,
    enrollment_service_client::EnrollmentServiceClient,
    playbook_service_client::PlaybookServiceClient, run_service_client::RunServiceClient,
};

use crate::{
    ChannelConfig, Process, RedisServer, SECRET_ENV, SchedulerNode, WorkerConfig, contact,
    generate_secret, run_summary, sign,
};

/// The soak's playbook: send, a short wait, send.
pub const PLAYBOOK_NAME: &str = "soak-send-wait-send";

/// The action steps of [`playbook_yaml`]: each must reach the receiver once per run.
pub const ACTION_STEPS: [&str; 2] = ["hello", "follow-up"];

/// The channel name the workers serve (a webhook to the soak's receiver).
const CHANNEL: &str = "wecom";

/// How long a starting scheduler may take to answer, and workers to attach.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the main loop looks at the progress.
const TICK: Duration = Duration::from_millis(500);

/// How often the run statuses are read (`ListRuns`) before every step has been delivered;
/// once it has, at every tick.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// `ListRuns` page size.
const PAGE_SIZE: u32 = 500;

/// Run timelines and log lines shown per problem.
const SHOW_PROBLEMS: usize = 10;

/// The playbook, with `wait` between the two sends (e.g. `2s`).
pub fn playbook_yaml(wait: &str) -> String {
    format!(
        r#"name: {PLAYBOOK_NAME}
description: chaos soak (send, wait, send)
steps:
  - id: {first}
    action: send_message
    channel: {CHANNEL}
    template: "hello {{{{ contact.id }}}}"
  - id: pause
    wait: {wait}
  - id: {second}
    action: send_message
    channel: {CHANNEL}
    template: "still there, {{{{ contact.id }}}}?"
"#,
        first = ACTION_STEPS[0],
        second = ACTION_STEPS[1],
    )
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The `touchpoint-node` binary.
    pub node: PathBuf,
    /// Runs to enroll.
    pub runs: usize,
    pub schedulers: usize,
    pub workers: usize,
    /// Time between two kills; zero: no chaos.
    pub chaos_every: Duration,
    /// Longest time a killed process stays down before its restart (a random part of it).
    pub max_down: Duration,
    /// Seeds the choice of victims and down times.
    pub seed: u64,
    /// Everything (enrollment and drain) ends by then, finished or not.
    pub deadline: Duration,
    /// The schedulers' `--lease`.
    pub lease: Duration,
    /// The receiver answers each request after a random delay up to this, so that kills
    /// catch deliveries in flight (zero: at once).
    pub receiver_delay: Duration,
    /// The playbook's wait, in its syntax (`2s`).
    pub wait: String,
    /// Each worker's `concurrency`.
    pub concurrency: u32,
    /// Enrollments in flight at once.
    pub enroll_parallelism: usize,
    /// Enrollments started per second at most; zero: as fast as they go.
    pub rate: f64,
    /// Progress lines on stderr.
    pub progress: bool,
    /// Copy every process's log here, also when the soak passes.
    pub keep_logs: Option<PathBuf>,
}

impl SoakOptions {
    /// The defaults of `touchpoint-soak` for `node`.
    pub fn new(node: impl Into<PathBuf>) -> Self {
        Self {
            node: node.into(),
            runs: 5000,
            schedulers: 2,
            workers: 3,
            chaos_every: Duration::from_secs(3),
            max_down: Duration::from_secs(1),
            seed: 1,
            deadline: Duration::from_secs(600),
            lease: Duration::from_secs(5),
            receiver_delay: Duration::from_millis(200),
            wait: "2s".to_owned(),
            concurrency: 16,
            enroll_parallelism: 8,
            rate: 25.0,
            progress: true,
            keep_logs: None,
        }
    }
}

/// `500ms`, `3s`, `2m`, `1h`, and sums of them (`1m30s`); a bare number is seconds.
///
/// # Errors
/// When the text is not such a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration".to_owned());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?} (expected e.g. 500ms, 3s, 2m)"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("number too large in {text:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => return Err(format!("unknown unit {other:?} in {text:?} (ms, s, m, h)")),
        };
        rest = &rest[unit_len..];
        let value = u32::try_from(value).map_err(|_| format!("number too large in {text:?}"))?;
        total += unit * value;
    }
    Ok(total)
}

/// SplitMix64: a small seeded generator, so a seed picks the same victims again.
#[derive(Debug, Clone)]
pub struct SoakRng(u64);

impl SoakRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

// ---------------------------------------------------------------------------------------
// The receiver
// ---------------------------------------------------------------------------------------

/// What the receiver saw of one `webhook-id`.
#[derive(Debug, Clone)]
struct IdTally {
    requests: u32,
    max_attempt: u64,
}

/// Every request the receiver got, reduced to what the checks need.
#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    /// By `webhook-id`.
    by_id: HashMap<String, IdTally>,
    /// (run, step) from the body → the first `webhook-id` it came with.
    by_step: HashMap<(String, String), String>,
    /// Requests of a (run, step) under another `webhook-id` than its first.
    id_mismatches: u64,
    /// Requests whose Standard Webhooks signature does not verify.
    bad_signatures: u64,
    /// Requests without a `webhook-id`, or whose body has no `run_id` or `step`.
    malformed: u64,
    /// When the last new `webhook-id` arrived.
    last_new_at: Option<Instant>,
}

impl Tally {
    fn record(&mut self, webhook_id: &str, run_id: &str, step: &str, attempt: u64, signed: bool) {
        self.requests += 1;
        if !signed {
            self.bad_signatures += 1;
        }
        if webhook_id.is_empty() || run_id.is_empty() || step.is_empty() {
            self.malformed += 1;
            return;
        }
        match self.by_id.get_mut(webhook_id) {
            Some(seen) => {
                seen.requests += 1;
                seen.max_attempt = seen.max_attempt.max(attempt);
            }
            None => {
                self.by_id.insert(
                    webhook_id.to_owned(),
                    IdTally {
                        requests: 1,
                        max_attempt: attempt,
                    },
                );
                self.last_new_at = Some(Instant::now());
            }
        }
        let key = (run_id.to_owned(), step.to_owned());
        match self.by_step.get(&key) {
            Some(first) if first != webhook_id => self.id_mismatches += 1,
            Some(_) => {}
            None => {
                self.by_step.insert(key, webhook_id.to_owned());
            }
        }
    }

    /// Requests beyond the first per `webhook-id`.
    fn duplicates(&self) -> u64 {
        self.by_id
            .values()
            .map(|t| u64::from(t.requests.saturating_sub(1)))
            .sum()
    }
}

#[derive(Debug)]
struct ReceiverShared {
    secret: String,
    /// Longest answer delay, in milliseconds.
    delay_ms: u64,
    tally: Mutex<Tally>,
}

impl ReceiverShared {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An HTTP server on 127.0.0.1 that records every webhook and deduplicates by
/// `webhook-id`: it answers `200` to every request (a duplicate is acknowledged, not acted
/// on twice) and counts, per `webhook-id`, how often it came.
#[derive(Debug)]
struct DedupReceiver {
    url: String,
    shared: Arc<ReceiverShared>,
    server: JoinHandle<()>,
}

impl DedupReceiver {
    async fn start(secret: &str, delay: Duration) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the webhook receiver")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(ReceiverShared {
            secret: secret.to_owned(),
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            tally: Mutex::new(Tally::default()),
        });
        let app = Router::new().fallback(receive).with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("soak: the webhook receiver stopped: {e}");
            }
        });
        Ok(Self {
            url: format!("http://{addr}/hook"),
            shared,
            server,
        })
    }

    /// Distinct `webhook-id`s so far.
    fn distinct(&self) -> usize {
        self.shared.tally().by_id.len()
    }
}

impl Drop for DedupReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    State(shared): State<Arc<ReceiverShared>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let webhook_id = header("webhook-id");
    let timestamp = header("webhook-timestamp");
    let signed = sign(&shared.secret, webhook_id, timestamp, &body).is_some_and(|expected| {
        header("webhook-signature")
            .split(' ')
            .any(|candidate| candidate == expected)
    });
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let field = |name: &str| json.get(name).and_then(|v| v.as_str()).unwrap_or_default();
    let attempt = json
        .get("attempt")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    let nth = {
        let mut tally = shared.tally();
        tally.record(webhook_id, field("run_id"), field("step"), attempt, signed);
        tally.requests
    };
    if shared.delay_ms > 0 {
        // Recorded on arrival: a worker killed while it waits has delivered the step.
        let delay = SoakRng::new(nth).below(shared.delay_ms.saturating_add(1));
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    StatusCode::OK
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// A worker process that can be killed and started again with the same id, config and log.
#[derive(Debug)]
struct WorkerProcess {
    id: String,
    args: Vec<String>,
    process: Process,
    _config_dir: TempDir,
}

/// The processes the chaos loop may kill. Dropping it kills them all.
#[derive(Debug)]
struct Nodes {
    bin: PathBuf,
    secret: String,
    workers: Vec<WorkerProcess>,
    schedulers: Vec<SchedulerNode>,
}

impl Nodes {
    fn len(&self) -> usize {
        self.schedulers.len() + self.workers.len()
    }

    fn name(&self, index: usize) -> String {
        match index.checked_sub(self.schedulers.len()) {
            None => format!("scheduler s-{}", index + 1),
            Some(w) => format!("worker {}", self.workers[w].id),
        }
    }

    fn is_running(&mut self, index: usize) -> bool {
        match index.checked_sub(self.schedulers.len()) {
            None => self.schedulers[index].is_running(),
            Some(w) => self.workers[w].process.is_running(),
        }
    }

    fn kill9(&mut self, index: usize) {
        match index.checked_sub(self.schedulers.len()) {
            None => self.schedulers[index].kill9(),
            Some(w) => self.workers[w].process.kill9(),
        }
    }

    fn restart(&mut self, index: usize) {
        match index.checked_sub(self.schedulers.len()) {
            None => self.schedulers[index].restart(),
            Some(w) => {
                let worker = &mut self.workers[w];
                worker.process.kill9();
                worker.process.respawn(
                    &self.bin,
                    &worker.args,
                    &[(SECRET_ENV, self.secret.as_str())],
                );
            }
        }
    }

    fn log_tail(&mut self, index: usize, lines: usize) -> String {
        match index.checked_sub(self.schedulers.len()) {
            None => self.schedulers[index].process().log_tail(lines),
            Some(w) => self.workers[w].process.log_tail(lines),
        }
    }

    /// (file name, log path) of every process.
    fn logs(&mut self) -> Vec<(String, PathBuf)> {
        let mut logs = Vec::new();
        for (i, s) in self.schedulers.iter_mut().enumerate() {
            logs.push((
                format!("scheduler-s-{}.log", i + 1),
                s.process().log_path().to_path_buf(),
            ));
        }
        for w in &self.workers {
            logs.push((
                format!("worker-{}.log", w.id),
                w.process.log_path().to_path_buf(),
            ));
        }
        logs
    }
}

/// One kill of the chaos loop, or a process found dead that the loop had not killed.
#[derive(Debug, Clone)]
pub struct ChaosEvent {
    /// Since the soak started.
    pub at: Duration,
    /// `scheduler s-1`, `worker w-2`.
    pub target: String,
    /// How long it stayed down.
    pub down: Duration,
    /// The loop found it dead (crashed or exited on its own), with its log's tail.
    pub unexpected_exit: Option<String>,
}

impl ChaosEvent {
    fn kind(&self) -> &str {
        self.target.split(' ').next().unwrap_or_default()
    }
}

/// Every `every`: restart whatever exited on its own, then kill a random process with
/// SIGKILL, keep it down a random moment (at most `max_down`) and start it again on the
/// same port, id and log. Stops when `stop` says so; returns the processes.
async fn chaos_loop(
    mut nodes: Nodes,
    every: Duration,
    max_down: Duration,
    mut rng: SoakRng,
    mut stop: watch::Receiver<bool>,
    events: Arc<Mutex<Vec<ChaosEvent>>>,
    started: Instant,
) -> Nodes {
    let push = |event: ChaosEvent| events.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    let period = if every.is_zero() {
        Duration::from_secs(1)
    } else {
        every
    };
    // Kills are `every` apart (or right after the last restart, if it stayed down longer).
    let mut next = tokio::time::Instant::now() + period;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            () = tokio::time::sleep_until(next) => {}
        }
        next = (next + period).max(tokio::time::Instant::now());
        if *stop.borrow() {
            break;
        }
        for index in 0..nodes.len() {
            if !nodes.is_running(index) {
                let tail = nodes.log_tail(index, 40);
                push(ChaosEvent {
                    at: started.elapsed(),
                    target: nodes.name(index),
                    down: Duration::ZERO,
                    unexpected_exit: Some(tail),
                });
                nodes.restart(index);
            }
        }
        if every.is_zero() {
            continue;
        }
        let victim = usize::try_from(rng.below(nodes.len() as u64)).unwrap_or(0);
        let max_down_ms = u64::try_from(max_down.as_millis()).unwrap_or(u64::MAX);
        let down = Duration::from_millis(rng.below(max_down_ms.saturating_add(1)));
        let at = started.elapsed();
        nodes.kill9(victim);
        // Always started again, even when asked to stop meanwhile.
        tokio::time::sleep(down).await;
        nodes.restart(victim);
        push(ChaosEvent {
            at,
            target: nodes.name(victim),
            down,
            unexpected_exit: None,
        });
    }
    nodes
}

// ---------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------

/// Plain gRPC clients of one scheduler (loopback, no token: a scheduler without an auth
/// file accepts loopback clients). The channel connects lazily and again after the
/// scheduler was restarted.
#[derive(Debug, Clone)]
struct Api {
    enrollments: EnrollmentServiceClient<Channel>,
    runs: RunServiceClient<Channel>,
    playbooks: PlaybookServiceClient<Channel>,
}

impl Api {
    fn new(endpoint: &str) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(endpoint.to_owned())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self {
            enrollments: EnrollmentServiceClient::new(channel.clone()),
            runs: RunServiceClient::new(channel.clone()),
            playbooks: PlaybookServiceClient::new(channel),
        })
    }
}

/// Calls `ListPlaybooks` until the scheduler answers.
async fn wait_until_serving(api: &mut Api, scheduler: &mut SchedulerNode) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match api.playbooks.list_playbooks(ListPlaybooksRequest {}).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => bail!(
                "the scheduler at {} did not answer within {START_TIMEOUT:?}: {e}\n{}",
                scheduler.endpoint(),
                scheduler.process().log_tail(30)
            ),
            Err(e) if !scheduler.is_running() => bail!(
                "the scheduler at {} exited at start: {e}\n{}",
                scheduler.endpoint(),
                scheduler.process().log_tail(30)
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Every run of the playbook, by id (one pass of `ListRuns`, each page tried on every
/// scheduler in turn, a few times).
async fn sweep(apis: &[Api]) -> anyhow::Result<HashMap<String, Run>> {
    let mut runs = HashMap::new();
    let mut token = String::new();
    let mut try_no = 0usize;
    // Bounded: 5,000 runs are 10 pages; a million would be 2,000.
    for _page in 0..10_000 {
        let mut failures = 0;
        let page = loop {
            let mut api = apis[try_no % apis.len()].clone();
            try_no += 1;
            match api
                .runs
                .list_runs(ListRunsRequest {
                    playbook: PLAYBOOK_NAME.to_owned(),
                    status: RunStatus::Unspecified as i32,
                    page_size: PAGE_SIZE,
                    page_token: token.clone(),
                })
                .await
            {
                Ok(page) => break page.into_inner(),
                Err(e) => {
                    failures += 1;
                    if failures >= 3 * apis.len() {
                        bail!("ListRuns failed {failures} times: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        for run in page.runs {
            runs.insert(run.run_id.clone(), run);
        }
        if page.next_page_token.is_empty() {
            return Ok(runs);
        }
        token = page.next_page_token;
    }
    bail!("ListRuns did not end after 10,000 pages")
}

// ---------------------------------------------------------------------------------------
// Enrollment
// ---------------------------------------------------------------------------------------

/// One acknowledged enrollment.
#[derive(Debug, Clone)]
struct Enrolled {
    run_id: String,
    at: Instant,
}

#[derive(Debug, Default)]
struct EnrollCounters {
    done: AtomicUsize,
    /// Calls that failed (scheduler down, timeout) and were sent again.
    retries: AtomicU64,
    /// Answers with `created = false`: an earlier call with the same request id had
    /// started the run, and its answer was lost.
    replays: AtomicU64,
}

/// Acknowledged enrollments by index (`None`: not yet, or given up).
type EnrollResults = Arc<Mutex<Vec<Option<Enrolled>>>>;

/// Enrolls contact `c-<index>` for every index, spread over the schedulers (index mod
/// schedulers first, the next one after a failure), `parallelism` at a time, each with one
/// request id that its retries repeat. Gives up on what is not enrolled by `deadline`.
fn spawn_enrollment(
    apis: Vec<Api>,
    runs: usize,
    parallelism: usize,
    rate: f64,
    deadline: Instant,
    counters: Arc<EnrollCounters>,
) -> (JoinHandle<()>, EnrollResults) {
    let results: EnrollResults = Arc::new(Mutex::new(vec![None; runs]));
    let shared = results.clone();
    let handle = tokio::spawn(async move {
        let next = Arc::new(AtomicUsize::new(0));
        let started = tokio::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..parallelism.max(1) {
            let apis = apis.clone();
            let next = next.clone();
            let results = shared.clone();
            let counters = counters.clone();
            tasks.spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    if index >= runs {
                        return;
                    }
                    if rate > 0.0 {
                        #[allow(clippy::cast_precision_loss)]
                        let offset = Duration::from_secs_f64(index as f64 / rate);
                        tokio::time::sleep_until(started + offset).await;
                    }
                    let enrolled = if Instant::now() < deadline {
                        enroll_one(&apis, index, deadline, &counters).await
                    } else {
                        None
                    };
                    if enrolled.is_some() {
                        counters.done.fetch_add(1, Ordering::Relaxed);
                    }
                    results.lock().unwrap_or_else(|p| p.into_inner())[index] = enrolled;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    });
    (handle, results)
}

async fn enroll_one(
    apis: &[Api],
    index: usize,
    deadline: Instant,
    counters: &EnrollCounters,
) -> Option<Enrolled> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let contact_id = format!("c-{index:06}");
    let mut backoff = Duration::from_millis(50);
    for attempt in 0usize.. {
        let mut api = apis[(index + attempt) % apis.len()].clone();
        let result = api
            .enrollments
            .enroll(EnrollRequest {
                playbook: PLAYBOOK_NAME.to_owned(),
                contact: Some(contact(&contact_id, &[("soak", "yes")], &[])),
                request_id: request_id.clone(),
            })
            .await;
        match result {
            Ok(response) => {
                let response = response.into_inner();
                if !response.created {
                    counters.replays.fetch_add(1, Ordering::Relaxed);
                }
                return Some(Enrolled {
                    run_id: response.run_id,
                    at: Instant::now(),
                });
            }
            Err(_) if Instant::now() >= deadline => return None,
            Err(_) => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------

/// A (run, step) that never reached the receiver.
#[derive(Debug, Clone)]
pub struct LostStep {
    pub run_id: String,
    pub step: String,
    /// The run's status at the end (`RUN_STATUS_COMPLETED` means the scheduler recorded
    /// the step as delivered while the receiver never saw it).
    pub run_status: String,
}

/// A run that did not complete, with its timeline and the log lines naming it.
#[derive(Debug, Clone)]
pub struct StuckRun {
    pub run_id: String,
    pub status: String,
    pub timeline: String,
    pub log_lines: Vec<String>,
}

/// What the soak found.
#[derive(Debug, Clone)]
pub struct SoakReport {
    pub options: SoakOptions,
    /// Runs acknowledged by `Enroll`.
    pub enrolled: usize,
    pub enroll_retries: u64,
    pub enroll_replays: u64,
    pub enroll_gave_up: u64,
    /// Runs of the playbook in the store; more than `enrolled` means a request id started
    /// two runs.
    pub runs_in_store: usize,
    /// Runs in the store that no `Enroll` answered with.
    pub unknown_runs: usize,
    /// Action steps of every enrolled run.
    pub steps_expected: usize,
    /// Distinct expected (run, step)s that reached the receiver.
    pub delivered: usize,
    pub requests: u64,
    /// Requests beyond the first per `webhook-id`.
    pub duplicates: u64,
    /// `webhook-id`s that arrived more than once.
    pub redelivered_ids: usize,
    pub max_attempt: u64,
    /// Expected (run, step)s that never arrived.
    pub lost: usize,
    /// Of those, the ones whose run says completed.
    pub lost_in_completed_runs: usize,
    pub lost_examples: Vec<LostStep>,
    /// Deliveries for a (run, step) that was not expected.
    pub unexpected: usize,
    pub id_mismatches: u64,
    pub bad_signatures: u64,
    pub malformed: u64,
    pub runs_completed: usize,
    pub runs_not_completed: usize,
    pub not_completed_by_status: BTreeMap<String, usize>,
    pub stuck_examples: Vec<StuckRun>,
    pub kills_scheduler: usize,
    pub kills_worker: usize,
    pub unexpected_exits: Vec<ChaosEvent>,
    pub events: Vec<ChaosEvent>,
    /// First to last acknowledged enrollment.
    pub enroll_time: Duration,
    /// Last acknowledged enrollment to every run seen finished (`None`: not by the deadline).
    pub drain: Option<Duration>,
    /// Last acknowledged enrollment to the last new `webhook-id` at the receiver.
    pub last_delivery_after_enroll: Option<Duration>,
    pub total: Duration,
    pub timed_out: bool,
    /// Where the processes' logs were copied (on failure or when asked).
    pub logs: Option<PathBuf>,
}

impl SoakReport {
    /// Nothing lost, every run completed, no process died on its own, no request id
    /// started two runs, every delivery signed and under its step's one `webhook-id`.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.runs_not_completed == 0
            && self.enrolled == self.options.runs
            && self.unknown_runs == 0
            && self.unexpected == 0
            && self.id_mismatches == 0
            && self.bad_signatures == 0
            && self.malformed == 0
            && self.unexpected_exits.is_empty()
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        let secs = |d: Duration| (d.as_secs_f64() * 1000.0).round() / 1000.0;
        let event = |e: &ChaosEvent| {
            serde_json::json!({
                "at_secs": secs(e.at),
                "target": e.target,
                "down_ms": e.down.as_millis() as u64,
            })
        };
        serde_json::json!({
            "passed": self.passed(),
            "seed": self.options.seed,
            "config": {
                "runs": self.options.runs,
                "schedulers": self.options.schedulers,
                "workers": self.options.workers,
                "worker_concurrency": self.options.concurrency,
                "chaos_every_secs": secs(self.options.chaos_every),
                "max_down_secs": secs(self.options.max_down),
                "lease_secs": secs(self.options.lease),
                "receiver_delay_max_secs": secs(self.options.receiver_delay),
                "wait": self.options.wait,
                "rate_per_sec": self.options.rate,
                "deadline_secs": secs(self.options.deadline),
                "playbook": PLAYBOOK_NAME,
                "action_steps": ACTION_STEPS,
            },
            "runs": self.options.runs,
            "enrolled": self.enrolled,
            "enroll_retries": self.enroll_retries,
            "enroll_replays": self.enroll_replays,
            "enroll_gave_up": self.enroll_gave_up,
            "runs_in_store": self.runs_in_store,
            "unknown_runs": self.unknown_runs,
            "steps_expected": self.steps_expected,
            "delivered": self.delivered,
            "requests": self.requests,
            "duplicates": self.duplicates,
            "redelivered_webhook_ids": self.redelivered_ids,
            "max_attempt": self.max_attempt,
            "lost": self.lost,
            "lost_in_completed_runs": self.lost_in_completed_runs,
            "lost_examples": self.lost_examples.iter().map(|l| serde_json::json!({
                "run_id": l.run_id, "step": l.step, "run_status": l.run_status,
            })).collect::<Vec<_>>(),
            "unexpected_deliveries": self.unexpected,
            "webhook_id_mismatches": self.id_mismatches,
            "bad_signatures": self.bad_signatures,
            "malformed_requests": self.malformed,
            "runs_completed": self.runs_completed,
            "runs_not_completed": self.runs_not_completed,
            "not_completed_by_status": self.not_completed_by_status,
            "stuck_examples": self.stuck_examples.iter().map(|s| serde_json::json!({
                "run_id": s.run_id, "status": s.status, "timeline": s.timeline,
                "log_lines": s.log_lines,
            })).collect::<Vec<_>>(),
            "kills": {
                "scheduler": self.kills_scheduler,
                "worker": self.kills_worker,
                "total": self.kills_scheduler + self.kills_worker,
            },
            "unexpected_exits": self.unexpected_exits.iter().map(|e| serde_json::json!({
                "at_secs": secs(e.at), "target": e.target,
                "log_tail": e.unexpected_exit.clone().unwrap_or_default(),
            })).collect::<Vec<_>>(),
            "kill_events": self.events.iter().filter(|e| e.unexpected_exit.is_none()).map(event).collect::<Vec<_>>(),
            "enroll_secs": secs(self.enroll_time),
            "drain_secs": self.drain.map(secs),
            "last_delivery_after_enroll_secs": self.last_delivery_after_enroll.map(secs),
            "total_secs": secs(self.total),
            "timed_out": self.timed_out,
            "logs": self.logs.as_ref().map(|p| p.display().to_string()),
        })
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let o = &self.options;
        let mut out = String::new();
        let verdict = if self.passed() { "PASSED" } else { "FAILED" };
        let _ = writeln!(
            out,
            "touchpoint soak {verdict} (seed {}): {} schedulers, {} workers x {} slots, \
             a kill every {:?} (down up to {:?}), lease {:?}, receiver answers within {:?}, \
             playbook send / wait {} / send, {} runs/s",
            o.seed,
            o.schedulers,
            o.workers,
            o.concurrency,
            o.chaos_every,
            o.max_down,
            o.lease,
            o.receiver_delay,
            o.wait,
            o.rate
        );
        let _ = writeln!(
            out,
            "  runs                {} of {} enrolled ({} calls sent again, {} answered as replays \
             of the same request id, {} given up); {} runs in the store, {} unknown",
            self.enrolled,
            o.runs,
            self.enroll_retries,
            self.enroll_replays,
            self.enroll_gave_up,
            self.runs_in_store,
            self.unknown_runs
        );
        let _ = writeln!(
            out,
            "  steps expected      {} ({} sends per run)",
            self.steps_expected,
            ACTION_STEPS.len()
        );
        let _ = writeln!(
            out,
            "  delivered           {} distinct webhook-ids ({} requests, highest attempt {})",
            self.delivered, self.requests, self.max_attempt
        );
        let _ = writeln!(
            out,
            "  duplicates          {} requests beyond the first per webhook-id ({} webhook-ids \
             came more than once)",
            self.duplicates, self.redelivered_ids
        );
        let _ = writeln!(
            out,
            "  lost                {} ({} of them in runs recorded as completed)",
            self.lost, self.lost_in_completed_runs
        );
        let _ = writeln!(
            out,
            "  runs not completed  {} {:?}",
            self.runs_not_completed, self.not_completed_by_status
        );
        let _ = writeln!(
            out,
            "  kills (SIGKILL)     {} (scheduler {}, worker {}); processes that died on their \
             own: {}",
            self.kills_scheduler + self.kills_worker,
            self.kills_scheduler,
            self.kills_worker,
            self.unexpected_exits.len()
        );
        let _ = writeln!(
            out,
            "  checks              unexpected deliveries {}, webhook-id mismatches {}, bad \
             signatures {}, malformed requests {}",
            self.unexpected, self.id_mismatches, self.bad_signatures, self.malformed
        );
        let _ = writeln!(
            out,
            "  enrollment          {:.1} s",
            self.enroll_time.as_secs_f64()
        );
        match self.drain {
            Some(drain) => {
                let _ = writeln!(
                    out,
                    "  drain               {:.1} s after the last enrollment (last new \
                     webhook-id {:.1} s after it)",
                    drain.as_secs_f64(),
                    self.last_delivery_after_enroll
                        .unwrap_or_default()
                        .as_secs_f64()
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  drain               not finished by the deadline ({:?})",
                    o.deadline
                );
            }
        }
        let _ = writeln!(
            out,
            "  total               {:.1} s",
            self.total.as_secs_f64()
        );
        for lost in &self.lost_examples {
            let _ = writeln!(
                out,
                "  LOST {} of run {} (run {})",
                lost.step, lost.run_id, lost.run_status
            );
        }
        for stuck in &self.stuck_examples {
            let _ = writeln!(out, "  NOT COMPLETED {} ({})", stuck.run_id, stuck.status);
            for line in stuck.timeline.lines() {
                let _ = writeln!(out, "    {line}");
            }
            for line in &stuck.log_lines {
                let _ = writeln!(out, "    | {line}");
            }
        }
        for exit in &self.unexpected_exits {
            let _ = writeln!(
                out,
                "  DIED ON ITS OWN: {} (found at {:.1} s); log tail:",
                exit.target,
                exit.at.as_secs_f64()
            );
            for line in exit.unexpected_exit.as_deref().unwrap_or_default().lines() {
                let _ = writeln!(out, "    | {line}");
            }
        }
        if let Some(logs) = &self.logs {
            let _ = writeln!(out, "  logs                {}", logs.display());
        }
        out
    }
}

/// The report's counts from what was enrolled, delivered and stored (pure, for tests).
#[derive(Debug, Default, PartialEq, Eq)]
struct Reckoning {
    steps_expected: usize,
    delivered: usize,
    lost: Vec<(String, String)>,
    unexpected: usize,
}

fn reckon(run_ids: &[String], tally: &Tally) -> Reckoning {
    let mut reckoning = Reckoning {
        steps_expected: run_ids.len() * ACTION_STEPS.len(),
        ..Reckoning::default()
    };
    let mut expected: HashSet<(&str, &str)> = HashSet::new();
    for run_id in run_ids {
        for step in ACTION_STEPS {
            expected.insert((run_id, step));
            if tally
                .by_step
                .contains_key(&(run_id.clone(), step.to_owned()))
            {
                reckoning.delivered += 1;
            } else {
                reckoning.lost.push((run_id.clone(), step.to_owned()));
            }
        }
    }
    reckoning.unexpected = tally
        .by_step
        .keys()
        .filter(|(run, step)| !expected.contains(&(run.as_str(), step.as_str())))
        .count();
    reckoning
}

fn status_name(status: i32) -> String {
    RunStatus::try_from(status).map_or_else(
        |_| format!("status {status}"),
        |s| s.as_str_name().to_owned(),
    )
}

/// Lines of the processes' logs that mention `needle` (at most `limit`).
fn grep_logs(logs: &[(String, PathBuf)], needle: &str, limit: usize) -> Vec<String> {
    let mut found = Vec::new();
    for (name, path) in logs {
        let Ok(text) = std::fs::read(path) else {
            continue;
        };
        for line in String::from_utf8_lossy(&text).lines() {
            if line.contains(needle) {
                found.push(format!("{name}: {line}"));
                if found.len() >= limit {
                    return found;
                }
            }
        }
    }
    found
}

fn copy_logs(logs: &[(String, PathBuf)], redis_dir: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    for (name, path) in logs {
        std::fs::copy(path, to.join(name))
            .with_context(|| format!("copy {} to {}", path.display(), to.display()))?;
    }
    let _ = std::fs::copy(redis_dir.join("redis.log"), to.join("redis.log"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The soak
// ---------------------------------------------------------------------------------------

/// Starts Redis (AOF on), the receiver, the schedulers and workers, applies the playbook,
/// enrolls the runs while the chaos loop kills and restarts processes, waits until every
/// run finished (or the deadline), stops everything and reports.
///
/// # Errors
/// When the system cannot be started (a scheduler does not answer, the playbook is
/// refused). What the soak finds is in the report, not an error.
pub async fn run(options: SoakOptions) -> anyhow::Result<SoakReport> {
    if options.schedulers == 0 || options.workers == 0 || options.runs == 0 {
        bail!("--runs, --schedulers and --workers must be at least 1");
    }
    if !options.node.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p touchpoint-tests --bins`",
            options.node.display()
        );
    }
    let started = Instant::now();
    let progress = |message: &str| {
        if options.progress {
            eprintln!("[{:>6.1}s] {message}", started.elapsed().as_secs_f64());
        }
    };

    let redis = RedisServer::start();
    progress(&format!("redis-server on {} (AOF on)", redis.url()));
    let secret = generate_secret();
    let receiver = DedupReceiver::start(&secret, options.receiver_delay).await?;
    let lease = format!("{}ms", options.lease.as_millis());

    let mut nodes = Nodes {
        bin: options.node.clone(),
        secret: secret.clone(),
        workers: Vec::new(),
        schedulers: Vec::new(),
    };
    let mut apis = Vec::new();
    for n in 1..=options.schedulers {
        let id = format!("s-{n}");
        let scheduler = SchedulerNode::start(
            &options.node,
            &redis.url(),
            &["--scheduler-id", &id, "--lease", &lease],
        );
        apis.push(Api::new(&scheduler.endpoint())?);
        nodes.schedulers.push(scheduler);
    }
    for (api, scheduler) in apis.iter_mut().zip(&mut nodes.schedulers) {
        wait_until_serving(api, scheduler).await?;
    }
    progress(&format!(
        "{} schedulers serving: {}",
        options.schedulers,
        nodes
            .schedulers
            .iter()
            .map(SchedulerNode::endpoint)
            .collect::<Vec<_>>()
            .join(", ")
    ));

    let config = WorkerConfig {
        concurrency: options.concurrency,
        ..WorkerConfig::new()
    }
    .channel(ChannelConfig::webhook(CHANNEL, &receiver.url, SECRET_ENV));
    for n in 1..=options.workers {
        // Worker n talks to scheduler n mod S: each scheduler has workers (when there are
        // enough), and a killed scheduler's workers wait for it to come back on its port.
        let server = nodes.schedulers[(n - 1) % options.schedulers].endpoint();
        let id = format!("w-{n}");
        let dir = tempfile::Builder::new()
            .prefix("touchpoint-soak-worker-")
            .tempdir()
            .context("create a worker config folder")?;
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, config.to_toml(&server)).context("write worker.toml")?;
        let args: Vec<String> = [
            "worker",
            "--config",
            &path.to_string_lossy(),
            "--server",
            &server,
            "--worker-id",
            &id,
        ]
        .iter()
        .map(|&a| a.to_owned())
        .collect();
        let process = Process::spawn_named(&id, &options.node, &args, &[(SECRET_ENV, &secret)]);
        nodes.workers.push(WorkerProcess {
            id,
            args,
            process,
            _config_dir: dir,
        });
    }
    // Steps claimed while no worker is attached wait 2 s; start once all are attached.
    let attach_deadline = Instant::now() + START_TIMEOUT;
    loop {
        let attached = nodes
            .workers
            .iter()
            .filter(|w| w.process.log().contains("attached to the scheduler"))
            .count();
        if attached == options.workers {
            progress(&format!("{attached} workers attached"));
            break;
        }
        if Instant::now() >= attach_deadline {
            progress(&format!(
                "only {attached} of {} workers logged \"attached to the scheduler\"; going on",
                options.workers
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let applied = apis[0]
        .playbooks
        .apply_playbook(ApplyPlaybookRequest {
            yaml: playbook_yaml(&options.wait),
            dry_run: false,
        })
        .await
        .context("ApplyPlaybook")?
        .into_inner();
    progress(&format!(
        "playbook {PLAYBOOK_NAME} v{} applied; enrolling {} runs",
        applied.version, options.runs
    ));

    // Chaos and enrollment start together.
    let deadline = Instant::now() + options.deadline;
    let events = Arc::new(Mutex::new(Vec::new()));
    let (stop_chaos, stop_rx) = watch::channel(false);
    let mut chaos = AbortOnDrop(tokio::spawn(chaos_loop(
        nodes,
        options.chaos_every,
        options.max_down,
        SoakRng::new(options.seed),
        stop_rx,
        events.clone(),
        started,
    )));
    let counters = Arc::new(EnrollCounters::default());
    let enroll_started = Instant::now();
    let (enrollment, enroll_results) = spawn_enrollment(
        apis.clone(),
        options.runs,
        options.enroll_parallelism,
        options.rate,
        deadline,
        counters.clone(),
    );
    let mut enrollment = Some(AbortOnDrop(enrollment));
    let acknowledged = || -> Vec<Enrolled> {
        enroll_results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect()
    };
    let mut enrolled: Vec<Enrolled> = Vec::new();
    let mut last_enrolled_at = enroll_started;
    let mut last_sweep = Instant::now();
    let mut last_progress = Instant::now();
    let mut finished_at = None;
    let mut runs_seen: HashMap<String, Run> = HashMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        if chaos.0.is_finished() {
            bail!("the chaos loop ended early (it panicked?)");
        }
        if let Some(mut handle) = enrollment.take_if(|h| h.0.is_finished()) {
            (&mut handle.0)
                .await
                .context("the enrollment task panicked")?;
            enrolled = acknowledged();
            last_enrolled_at = enrolled
                .iter()
                .map(|e| e.at)
                .max()
                .unwrap_or(enroll_started);
            progress(&format!(
                "enrollment done: {} runs in {:.1} s",
                enrolled.len(),
                (last_enrolled_at - enroll_started).as_secs_f64()
            ));
        }
        let distinct = receiver.distinct();
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            let (s, w) = kill_counts(&events);
            progress(&format!(
                "enrolled {}/{}  delivered {distinct}/{}  duplicates {}  kills {} (scheduler {s}, worker {w})",
                counters.done.load(Ordering::Relaxed),
                options.runs,
                options.runs * ACTION_STEPS.len(),
                receiver.shared.tally().duplicates(),
                s + w,
            ));
        }
        if Instant::now() >= deadline {
            progress("deadline reached");
            break;
        }
        if enrollment.is_some() {
            continue;
        }
        let all_delivered = distinct >= enrolled.len() * ACTION_STEPS.len();
        if all_delivered || last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            if let Ok(runs) = sweep(&apis).await {
                let done = enrolled.iter().all(|e| {
                    runs.get(&e.run_id).is_some_and(|r| {
                        r.status != RunStatus::Active as i32
                            && r.status != RunStatus::Unspecified as i32
                    })
                });
                runs_seen = runs;
                if done {
                    finished_at = Some(Instant::now());
                    progress("every run finished");
                    break;
                }
            }
        }
    }

    // Stop the chaos (it restarts its last victim first), let stragglers arrive.
    let _ = stop_chaos.send(true);
    let mut nodes = (&mut chaos.0).await.context("the chaos loop panicked")?;
    if let Some(mut handle) = enrollment.take() {
        handle.0.abort();
        let _ = (&mut handle.0).await;
        // What was acknowledged before the deadline counts; the rest was given up.
        enrolled = acknowledged();
        last_enrolled_at = enrolled
            .iter()
            .map(|e| e.at)
            .max()
            .unwrap_or(enroll_started);
        progress("enrollment did not finish by the deadline");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    if finished_at.is_none() {
        // A last look, with every process up and no more kills.
        for _ in 0..10 {
            if let Ok(runs) = sweep(&apis).await {
                runs_seen = runs;
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let total = started.elapsed();

    let tally = std::mem::take(&mut *receiver.shared.tally());
    let run_ids: Vec<String> = enrolled.iter().map(|e| e.run_id.clone()).collect();
    let reckoning = reckon(&run_ids, &tally);
    let known: HashSet<&str> = run_ids.iter().map(String::as_str).collect();
    let status_of = |run_id: &str| {
        runs_seen
            .get(run_id)
            .map_or_else(|| "MISSING".to_owned(), |r| status_name(r.status))
    };
    let logs = nodes.logs();
    let mut not_completed_by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut stuck_examples = Vec::new();
    let mut runs_completed = 0;
    for run_id in &run_ids {
        match runs_seen.get(run_id) {
            Some(run) if run.status == RunStatus::Completed as i32 => runs_completed += 1,
            other => {
                let status = status_of(run_id);
                *not_completed_by_status.entry(status.clone()).or_default() += 1;
                if stuck_examples.len() < SHOW_PROBLEMS {
                    stuck_examples.push(StuckRun {
                        run_id: run_id.clone(),
                        status,
                        timeline: other.map_or_else(|| "(not in ListRuns)".to_owned(), run_summary),
                        log_lines: grep_logs(&logs, run_id, 30),
                    });
                }
            }
        }
    }
    let lost_in_completed_runs = reckoning
        .lost
        .iter()
        .filter(|(run_id, _)| {
            runs_seen
                .get(run_id)
                .is_some_and(|r| r.status == RunStatus::Completed as i32)
        })
        .count();
    let lost_examples = reckoning
        .lost
        .iter()
        .take(SHOW_PROBLEMS)
        .map(|(run_id, step)| LostStep {
            run_id: run_id.clone(),
            step: step.clone(),
            run_status: status_of(run_id),
        })
        .collect();
    let events = std::mem::take(&mut *events.lock().unwrap_or_else(|p| p.into_inner()));
    let (kills_scheduler, kills_worker) = count_kills(&events);
    let first_enrolled_at = enrolled
        .iter()
        .map(|e| e.at)
        .min()
        .unwrap_or(enroll_started);
    let mut report = SoakReport {
        enrolled: enrolled.len(),
        enroll_retries: counters.retries.load(Ordering::Relaxed),
        enroll_replays: counters.replays.load(Ordering::Relaxed),
        enroll_gave_up: (options.runs - enrolled.len()) as u64,
        runs_in_store: runs_seen.len(),
        unknown_runs: runs_seen
            .keys()
            .filter(|id| !known.contains(id.as_str()))
            .count(),
        steps_expected: reckoning.steps_expected,
        delivered: reckoning.delivered,
        requests: tally.requests,
        duplicates: tally.duplicates(),
        redelivered_ids: tally.by_id.values().filter(|t| t.requests > 1).count(),
        max_attempt: tally
            .by_id
            .values()
            .map(|t| t.max_attempt)
            .max()
            .unwrap_or(0),
        lost: reckoning.lost.len(),
        lost_in_completed_runs,
        lost_examples,
        unexpected: reckoning.unexpected,
        id_mismatches: tally.id_mismatches,
        bad_signatures: tally.bad_signatures,
        malformed: tally.malformed,
        runs_completed,
        runs_not_completed: run_ids.len() - runs_completed,
        not_completed_by_status,
        stuck_examples,
        kills_scheduler,
        kills_worker,
        unexpected_exits: events
            .iter()
            .filter(|e| e.unexpected_exit.is_some())
            .cloned()
            .collect(),
        events,
        enroll_time: last_enrolled_at.saturating_duration_since(first_enrolled_at),
        drain: finished_at.map(|at| at.saturating_duration_since(last_enrolled_at)),
        last_delivery_after_enroll: tally
            .last_new_at
            .map(|at| at.saturating_duration_since(last_enrolled_at)),
        total,
        timed_out: finished_at.is_none(),
        logs: None,
        options: options.clone(),
    };
    let keep = match (&options.keep_logs, report.passed()) {
        (Some(dir), _) => Some(dir.clone()),
        (None, false) => Some(
            tempfile::Builder::new()
                .prefix("touchpoint-soak-logs-")
                .tempdir()
                .context("create a folder for the logs")?
                .keep(),
        ),
        (None, true) => None,
    };
    if let Some(dir) = keep {
        copy_logs(&logs, redis.dir(), &dir)?;
        report.logs = Some(dir);
    }
    // Workers and schedulers first, then Redis.
    drop(nodes);
    drop(redis);
    Ok(report)
}

/// Aborts the task when dropped: when [`run`] returns early (an error) or its future is
/// dropped, the chaos task and the processes it owns go too.
#[derive(Debug)]
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn count_kills(events: &[ChaosEvent]) -> (usize, usize) {
    let kills = events.iter().filter(|e| e.unexpected_exit.is_none());
    let schedulers = kills.clone().filter(|e| e.kind() == "scheduler").count();
    (schedulers, kills.count() - schedulers)
}

fn kill_counts(events: &Mutex<Vec<ChaosEvent>>) -> (usize, usize) {
    count_kills(&events.lock().unwrap_or_else(|p| p.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn the_same_seed_picks_the_same_victims() {
        let picks = |seed| {
            let mut rng = SoakRng::new(seed);
            (0..20).map(|_| rng.below(5)).collect::<Vec<_>>()
        };
        assert_eq!(picks(7), picks(7));
        assert_ne!(picks(7), picks(8));
        assert!(picks(7).iter().all(|&p| p < 5));
    }

    #[test]
    fn lost_duplicates_and_mismatches_are_counted() {
        let mut tally = Tally::default();
        tally.record("r1.hello", "r1", "hello", 1, true);
        tally.record("r1.hello", "r1", "hello", 2, true);
        tally.record("r1.follow-up", "r1", "follow-up", 1, true);
        tally.record("r2.hello", "r2", "hello", 1, false);
        tally.record("other", "r2", "hello", 3, true);
        tally.record("", "r3", "hello", 1, true);
        tally.record("r9.hello", "r9", "hello", 1, true);
        assert_eq!(tally.requests, 7);
        assert_eq!(tally.duplicates(), 1);
        assert_eq!(tally.id_mismatches, 1);
        assert_eq!(tally.bad_signatures, 1);
        assert_eq!(tally.malformed, 1);
        assert_eq!(tally.by_id["r1.hello"].max_attempt, 2);

        let reckoning = reckon(&["r1".to_owned(), "r2".to_owned()], &tally);
        assert_eq!(
            reckoning,
            Reckoning {
                steps_expected: 4,
                delivered: 3,
                lost: vec![("r2".to_owned(), "follow-up".to_owned())],
                unexpected: 1,
            }
        );
    }

    #[test]
    fn the_playbook_has_a_wait_between_two_sends() {
        let yaml = playbook_yaml("2s");
        assert!(yaml.contains("wait: 2s"));
        assert!(yaml.contains("template: \"hello {{ contact.id }}\""));
        for step in ACTION_STEPS {
            assert!(yaml.contains(&format!("- id: {step}\n")));
        }
    }
}
