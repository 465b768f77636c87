//! Retry defaults per channel: a `retry` table on a worker's `[[channel]]` governs steps
//! whose playbook sets none; a step's own `retry:` fields win over it.

use std::time::Duration;

use touchpoint_proto::v1::RunStatus;
use touchpoint_tests::{Process, Stack, contact, request_id, run_summary};

const NODE: &str = env!("CARGO_BIN_EXE_touchpoint-node");
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channels_retry_defaults_apply_unless_the_step_sets_its_own() {
    let mut stack = Stack::start(NODE, &[], &[]).await;
    stack.receiver.respond_with(&[503; 12]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "server = \"{}\"\n[[channel]]\nname = \"wecom\"\nkind = \"webhook\"\nurl = \"{}\"\n\
             retry = {{ max_attempts = 2, initial = \"100ms\", max = \"200ms\" }}\n",
            stack.scheduler.endpoint(),
            stack.receiver.url()
        ),
    )
    .unwrap();
    let config = config.to_string_lossy().into_owned();
    let _worker = Process::spawn_named(
        "w-1",
        NODE,
        ["worker", "--config", &config, "--worker-id", "w-1"],
        &[],
    );

    stack
        .apply("name: channel-default\nsteps:\n  - {id: notify, action: send_message, channel: wecom}\n")
        .await;
    stack
        .apply(
            "name: step-override\nsteps:\n  - {id: notify, action: send_message, channel: wecom, \
             retry: {max_attempts: 3}}\n",
        )
        .await;

    let by_channel = stack
        .enroll("channel-default", contact("c-1", &[], &[]), &request_id())
        .await
        .run_id;
    let run = stack
        .client
        .wait_for_status(&by_channel, RunStatus::Failed, TIMEOUT)
        .await;
    assert_eq!(run.steps[0].attempts, 2, "{}", run_summary(&run));
    assert!(
        run.steps[0].detail.contains("gave up after 2 attempts"),
        "{}",
        run_summary(&run)
    );

    let by_step = stack
        .enroll("step-override", contact("c-2", &[], &[]), &request_id())
        .await
        .run_id;
    let run = stack
        .client
        .wait_for_status(&by_step, RunStatus::Failed, TIMEOUT)
        .await;
    assert_eq!(run.steps[0].attempts, 3, "{}", run_summary(&run));

    let requests = stack.receiver.requests();
    let count = |run_id: &str| requests.iter().filter(|r| r.run_id() == run_id).count();
    assert_eq!((count(&by_channel), count(&by_step)), (2, 3));
    // The channel's 100 ms initial delay applied to the step that only set max_attempts.
    let step_times: Vec<_> = requests
        .iter()
        .filter(|r| r.run_id() == by_step)
        .map(|r| r.received_at)
        .collect();
    assert!(
        step_times[1] - step_times[0] < Duration::from_millis(900),
        "{step_times:?}"
    );
}
