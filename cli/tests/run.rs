//! `tp run cancel` against `tp dev`: one run by id, or every active run of a playbook
//! (optionally at one step) with `--playbook`.

mod common;

use common::{Dev, run_id};

const PLAYBOOK: &str = "name: cancel-cli
steps:
  - id: first
    wait: 1d
  - id: second
    wait: 1d
";

#[test]
fn cancel_one_run_or_a_playbook_s_runs() {
    let dev = Dev::start();
    dev.apply("playbook", PLAYBOOK);
    let runs: Vec<String> = (1..=4)
        .map(|n| {
            let contact = format!("c-{n}");
            run_id(&dev.json(&["enroll", "cancel-cli", "--contact", &contact]))
        })
        .collect();
    for run in &runs {
        dev.wait_for(&["run", "get", run], "the run at its first step", |run| {
            run["current_step"] == "first"
        });
    }

    // One run, as before.
    assert_eq!(
        dev.ok(&["run", "cancel", &runs[0]]).trim(),
        format!("run/{} cancelled", runs[0])
    );

    // Runs at a step nobody is at: none.
    assert_eq!(
        dev.ok(&[
            "run",
            "cancel",
            "--playbook",
            "cancel-cli",
            "--step",
            "second"
        ])
        .trim(),
        "playbook/cancel-cli step second: 0 runs cancelled"
    );
    assert_eq!(
        dev.json(&[
            "run",
            "cancel",
            "--playbook",
            "cancel-cli",
            "--step",
            "first"
        ]),
        serde_json::json!({"cancelled": 3, "playbook": "cancel-cli", "step_id": "first"})
    );
    let cancelled = dev.json(&[
        "run",
        "list",
        "--playbook",
        "cancel-cli",
        "--status",
        "cancelled",
    ]);
    assert_eq!(cancelled.as_array().map(Vec::len), Some(4), "{cancelled:#}");

    // Every active run of the playbook.
    dev.ok(&["enroll", "cancel-cli", "--contact", "c-5"]);
    assert_eq!(
        dev.ok(&["run", "cancel", "--playbook", "cancel-cli"])
            .trim(),
        "playbook/cancel-cli: 1 run cancelled"
    );
    let active = dev.json(&[
        "run",
        "list",
        "--playbook",
        "cancel-cli",
        "--status",
        "active",
    ]);
    assert_eq!(active, serde_json::json!([]));

    // Exactly one of a run id and --playbook.
    dev.fails(&["run", "cancel"], 2);
    dev.fails(&["run", "cancel", &runs[1], "--playbook", "cancel-cli"], 2);
    dev.fails(&["run", "cancel", &runs[1], "--step", "first"], 2);
    dev.fails(&["run", "cancel", "--step", "first"], 2);
}
