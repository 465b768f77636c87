//! `touchpoint-soak`: the bounded chaos soak (not part of `cargo test`).
//!
//! ```sh
//! cargo run --release -p touchpoint-tests --bin touchpoint-soak -- [--runs 5000] \
//!     [--schedulers 2] [--workers 3] [--chaos-every 3s] [--seed N] [--json]
//! ```
//!
//! Starts its own `redis-server` (AOF on), schedulers and workers (the `touchpoint-node`
//! binary next to this one; when run by `cargo run` it is built first, a no-op when up to
//! date) and a webhook receiver deduplicating by `webhook-id`, all on loopback; enrolls the
//! runs while killing (SIGKILL) and restarting a random scheduler or worker every few
//! seconds; waits until every run finished or the deadline; prints the report. Exit code 0
//! when nothing was lost and every run completed, 1 otherwise, 2 for bad usage, 130 when
//! interrupted. Every child process is killed on exit, Ctrl-C, SIGTERM and panic.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use clap::Parser;
use touchpoint_tests::soak::{self, SoakOptions, parse_duration};

/// A bounded chaos soak of Touchpoint: runs through several schedulers and workers while
/// a random one is killed with SIGKILL and restarted every few seconds.
#[derive(Debug, Parser)]
#[command(name = "touchpoint-soak")]
struct Args {
    /// Runs to enroll (a 3-step playbook: send, wait, send).
    #[arg(long, default_value_t = 5000)]
    runs: usize,
    /// Scheduler processes (one Redis).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    schedulers: u16,
    /// Worker processes; worker n talks to scheduler n mod schedulers.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// Time between two kills (0: no chaos).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    chaos_every: Duration,
    /// Longest time a killed process stays down before it is started again.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    max_down: Duration,
    /// Seed for the choice of victims and down times (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Give up after this long (enrollment and drain), finished or not.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    deadline: Duration,
    /// The schedulers' `--lease` (a killed scheduler's steps go out again after it).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    lease: Duration,
    /// The receiver answers each webhook after a random delay up to this (real receivers
    /// take time; kills then catch deliveries in flight). 0: at once.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    receiver_delay: Duration,
    /// The playbook's wait between the two sends.
    #[arg(long, default_value = "2s")]
    wait: String,
    /// Each worker's concurrency.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 8)]
    enroll_parallelism: usize,
    /// Enrollments started per second at most (0: as fast as the schedulers take them,
    /// which here is 5,000 runs in seconds, too quick for many kills). The default spreads
    /// 5,000 runs over about 200 s, so runs are at every stage at every kill.
    #[arg(long, default_value_t = 25.0)]
    rate: f64,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Copy every process's log into this folder (logs are kept in a temporary folder
    /// anyway when the soak fails).
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// The `touchpoint-node` binary (default: next to this one, built first under cargo).
    #[arg(long)]
    node: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = parse_duration(&args.wait) {
        eprintln!("error: --wait: {e}");
        return ExitCode::from(2);
    }
    let node = match args.node.clone() {
        Some(node) => node,
        None => match sibling_node() {
            Ok(node) => node,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let options = SoakOptions {
        node,
        runs: args.runs,
        schedulers: usize::from(args.schedulers),
        workers: usize::from(args.workers),
        chaos_every: args.chaos_every,
        max_down: args.max_down,
        seed,
        deadline: args.deadline,
        lease: args.lease,
        receiver_delay: args.receiver_delay,
        wait: args.wait.clone(),
        concurrency: args.concurrency,
        enroll_parallelism: args.enroll_parallelism,
        rate: args.rate,
        progress: !args.quiet,
        keep_logs: args.keep_logs.clone(),
    };

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        tokio::select! {
            report = soak::run(options) => match report {
                Ok(report) => {
                    if args.json {
                        println!("{}", report.to_json());
                    } else {
                        print!("{}", report.to_text());
                    }
                    if report.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
            signal = interrupted() => {
                eprintln!("soak: {signal}: stopping every process it started");
                ExitCode::from(130)
            }
        }
    });
    // Dropping the runtime drops the chaos task, which owns the schedulers and workers:
    // each is killed with SIGKILL. Redis and the receiver went with `soak::run`'s future.
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

/// Resolves on Ctrl-C, SIGTERM or SIGHUP, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return "interrupted";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    }
}

/// `touchpoint-node` in this executable's folder. Under `cargo run` (which builds only
/// this binary) it is built first with the same profile and target folder, so it matches
/// the sources; otherwise it must exist.
fn sibling_node() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no folder", exe.display()))?;
    let node = dir.join("touchpoint-node");
    if let Some(cargo) = std::env::var_os("CARGO") {
        build_node(Path::new(&cargo), dir)?;
    }
    if node.is_file() {
        Ok(node)
    } else {
        Err(format!(
            "{} not found: build it first with `cargo build --release -p touchpoint-tests --bins`, \
             or pass --node PATH",
            node.display()
        ))
    }
}

/// `cargo build [--release | --profile P] -p touchpoint-tests --bin touchpoint-node`
/// into the target folder that holds `dir` (`target/release`, `target/debug`, ...).
fn build_node(cargo: &Path, dir: &Path) -> Result<(), String> {
    let profile = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let target_dir = dir
        .parent()
        .ok_or_else(|| format!("{} has no parent folder", dir.display()))?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "touchpoint-tests", "--bin", "touchpoint-node"])
        .arg("--target-dir")
        .arg(target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    eprintln!("soak: building touchpoint-node ({profile})");
    let status = command
        .status()
        .map_err(|e| format!("cannot run {}: {e}", cargo.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("building touchpoint-node failed ({status})"))
    }
}
