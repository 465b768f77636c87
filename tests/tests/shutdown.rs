//! A scheduler stopped with SIGTERM exits promptly even with workers attached, and gives
//! the steps its workers held back at once instead of leaving them to lease expiry.

use std::time::{Duration, Instant};

use touchpoint_proto::v1::RunStatus;
use touchpoint_tests::{Stack, contact, request_id};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_held_steps_back_at_once_and_exits() {
    // A lease far longer than the test: only the hand-back can make the step go out again.
    let mut stack = Stack::start(NODE, &["--lease", "5m"], &["wecom"]).await;
    stack
        .apply("name: held\nsteps:\n  - {id: greet, action: send_message, channel: wecom}\n")
        .await;
    stack.receiver.hold_next(Duration::from_secs(60));
    let run_id = stack
        .enroll("held", contact("c-8001", &[], &[]), &request_id())
        .await
        .run_id;
    let first = stack.receiver.wait_for(1, TIMEOUT).await;

    let stopped_at = Instant::now();
    stack.scheduler.terminate().await;
    eprintln!("scheduler exited {:?} after SIGTERM", stopped_at.elapsed());

    // A new scheduler on the same port: the worker re-attaches and the step goes out
    // again long before its 5-minute lease would have expired.
    stack.restart_scheduler().await;
    let again = stack.receiver.wait_for(2, TIMEOUT).await;
    assert_eq!(again[1].webhook_id(), first[0].webhook_id());
    let run = stack
        .client
        .wait_for_status(&run_id, RunStatus::Completed, TIMEOUT)
        .await;
    assert_eq!(
        run.steps[0].attempts, 1,
        "a hand-back at shutdown is not a failed attempt"
    );
}
