//! `tp event send` against `tp dev`: one event converts the run whose goal it is, wakes
//! the run waiting for it and starts the playbook it is the entry event of; a replay of
//! its request id does nothing new, and `reentry: never` refuses a second entry.

mod common;

use common::{Dev, run_id};

const GOAL: &str = "name: ev-goal
goal:
  event: order.placed
steps:
  - id: hold
    wait: 1d
";

const WAIT_FOR: &str = "name: ev-wait
steps:
  - id: until-order
    wait_for: { event: order.placed, timeout: 1d }
  - id: after
    wait: 1d
";

const ENTRY: &str = "name: ev-entry
entry:
  event: order.placed
  reentry: never
steps:
  - id: hold
    wait: 1d
";

fn ids(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn event_send_converts_wakes_and_starts_runs() {
    let dev = Dev::start();
    for yaml in [GOAL, WAIT_FOR, ENTRY] {
        dev.apply("playbook", yaml);
    }
    let goal_run = run_id(&dev.json(&["enroll", "ev-goal", "--contact", "c-1"]));
    let wait_run = run_id(&dev.json(&["enroll", "ev-wait", "--contact", "c-1"]));
    // Registered for its event (its first claim), not just enrolled at the step: an
    // event before that would be matched from the lookback instead of waking it.
    dev.wait_for(
        &["run", "get", &wait_run],
        "the wait_for step waiting",
        |run| {
            run["steps"].as_array().is_some_and(|steps| {
                steps
                    .iter()
                    .any(|step| step["step_id"] == "until-order" && step["status"] == "waiting")
            })
        },
    );

    let sent = dev.json(&[
        "event",
        "send",
        "c-1",
        "order.placed",
        "--attr",
        "order=o-1",
        "--request-id",
        "order-o-1",
    ]);
    assert_eq!(sent["duplicate"], false, "{sent:#}");
    assert_eq!(
        ids(&sent["converted_run_ids"]),
        [goal_run.as_str()],
        "{sent:#}"
    );
    assert_eq!(ids(&sent["woken_run_ids"]), [wait_run.as_str()], "{sent:#}");
    let started = ids(&sent["started_run_ids"]);
    assert_eq!(started.len(), 1, "{sent:#}");
    assert_eq!(ids(&sent["not_started"]), Vec::<String>::new(), "{sent:#}");

    let goal = dev.json(&["run", "get", &goal_run]);
    assert_eq!(goal["status"], "converted", "{goal:#}");
    dev.wait_for(&["run", "get", &wait_run], "the woken run", |run| {
        run["current_step"] == "after"
    });
    let entered = dev.json(&["run", "get", &started[0]]);
    assert_eq!(entered["playbook"], "ev-entry", "{entered:#}");
    assert_eq!(entered["contact_id"], "c-1", "{entered:#}");

    // The same request id again: nothing new.
    let replay = dev.ok(&[
        "event",
        "send",
        "c-1",
        "order.placed",
        "--request-id",
        "order-o-1",
    ]);
    assert!(
        replay.starts_with("event/order.placed of contact/c-1 was already recorded"),
        "{replay}"
    );

    // Another order: the entry playbook's `reentry: never` refuses a second run.
    let again = dev.json(&["event", "send", "c-1", "order.placed"]);
    assert_eq!(again["duplicate"], false, "{again:#}");
    assert_eq!(
        ids(&again["started_run_ids"]),
        Vec::<String>::new(),
        "{again:#}"
    );
    assert_eq!(ids(&again["not_started"]).len(), 1, "{again:#}");
    let table = dev.ok(&["event", "send", "c-1", "order.placed"]);
    let mut lines = table.lines();
    assert_eq!(
        lines.next(),
        Some("event/order.placed of contact/c-1 recorded"),
        "{table}"
    );
    assert!(table.contains("\nstarted:      none\n"), "{table}");
    assert!(
        lines.any(|line| line.starts_with("not started:") && !line.ends_with("none")),
        "{table}"
    );

    dev.fails(&["event", "send", "c-1"], 2);
    dev.fails(&["event", "send", "c-1", "order.placed", "--attr", "x"], 2);
}
