//! The soak's machinery, briefly and without chaos, so that `touchpoint-soak` keeps working
//! as the system changes: the soak itself (thousands of runs, minutes of kills) is run by
//! hand (README, "Soak").

use std::time::Duration;

use touchpoint_tests::soak::{self, SoakOptions};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");

/// 20 runs through 2 schedulers and 2 workers, no kills: everything is delivered once,
/// every run completes, and the report says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_without_chaos_delivers_every_step_once() {
    let options = SoakOptions {
        runs: 20,
        workers: 2,
        chaos_every: Duration::ZERO,
        receiver_delay: Duration::from_millis(20),
        wait: "300ms".to_owned(),
        rate: 0.0,
        deadline: Duration::from_secs(60),
        progress: false,
        ..SoakOptions::new(NODE)
    };
    let report = soak::run(options).await.expect("the soak starts");
    let text = report.to_text();
    assert!(report.passed(), "{text}");
    assert_eq!(report.enrolled, 20, "{text}");
    assert_eq!(report.steps_expected, 40, "{text}");
    assert_eq!(report.delivered, 40, "{text}");
    assert_eq!(report.duplicates, 0, "{text}");
    assert_eq!(report.lost, 0, "{text}");
    assert_eq!(report.runs_completed, 20, "{text}");
    assert_eq!(report.kills_scheduler + report.kills_worker, 0, "{text}");
    assert!(report.drain.is_some(), "{text}");
    let json = report.to_json();
    assert_eq!(json["passed"], true, "{json}");
    assert_eq!(json["lost"], 0, "{json}");
    assert_eq!(json["kills"]["total"], 0, "{json}");
}
