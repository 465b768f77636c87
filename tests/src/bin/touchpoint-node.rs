//! `touchpoint-node scheduler <scheduler flags>` or `touchpoint-node worker <worker flags>`:
//! the scheduler or worker exactly as their own binaries run them (same `main_with_args`),
//! in one executable that end-to-end tests spawn as real processes and kill with SIGKILL.
//!
//! Logs go to stderr (`RUST_LOG`, default `info`).

use std::{ffi::OsString, process::ExitCode};

use clap::Parser;
use touchpoint_proto::telemetry::Telemetry;
use touchpoint_scheduler::SchedulerArgs;
use touchpoint_worker::WorkerArgs;

const USAGE: &str = "usage: touchpoint-node scheduler|worker [FLAGS...]";

fn main() -> ExitCode {
    let mut argv = std::env::args_os().skip(1);
    let Some(role) = argv.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    // clap sees the role as argv[0], so `--help` names it.
    let args: Vec<OsString> = std::iter::once(role.clone()).chain(argv).collect();
    let role = role.to_string_lossy().into_owned();
    if role != "scheduler" && role != "worker" {
        eprintln!("unknown role {role:?}; {USAGE}");
        return ExitCode::from(2);
    }

    // Already installed is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if role == "scheduler" {
        let args = SchedulerArgs::parse_from(args);
        runtime.block_on(async {
            let telemetry = Telemetry::init("touchpoint-scheduler", args.telemetry.log_format);
            let result = touchpoint_scheduler::main_with_args(args).await;
            telemetry.shutdown();
            result
        })
    } else {
        let args = WorkerArgs::parse_from(args);
        runtime.block_on(async {
            let telemetry = Telemetry::init("touchpoint-worker", args.telemetry.log_format);
            let result = touchpoint_worker::main_with_args(args).await;
            telemetry.shutdown();
            result
        })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
