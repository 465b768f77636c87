//! `tp dlq list | retry` against `tp dev` (a real redis-server, scheduler and console
//! worker): a step whose template fails to render dead-letters its run; once the
//! contact is fixed, `tp dlq retry` puts the run back and it completes.

mod common;

use common::{Dev, write};

/// Divides by the contact's `d` attribute: fails to render for `d=0`.
const PLAYBOOK: &str = r#"name: dlq-cli
steps:
  - id: notify
    action: send_message
    channel: console
    template: "{{ params.n // (contact.attrs.d | int) }}"
    params: { n: 6 }
"#;

#[test]
fn dlq_list_and_retry() {
    let dev = Dev::start();
    let dir = tempfile::tempdir().expect("a temporary folder");
    dev.ok(&[
        "playbook",
        "apply",
        "-f",
        &write(dir.path(), "p.yaml", PLAYBOOK),
    ]);
    let enrolled = dev.json(&["enroll", "dlq-cli", "--contact", "c-1", "--attr", "d=0"]);
    let run_id = enrolled["run_id"].as_str().expect("a run id").to_owned();

    let listed = dev.wait_for(&["dlq", "list"], "a dead letter", |v| {
        v.as_array().is_some_and(|a| !a.is_empty())
    });
    assert_eq!(listed[0]["run_id"], run_id.as_str(), "{listed:#}");
    assert_eq!(listed[0]["playbook"], "dlq-cli", "{listed:#}");
    assert_eq!(listed[0]["step_id"], "notify", "{listed:#}");
    let last_error = listed[0]["last_error"].as_str().unwrap_or_default();
    assert!(last_error.starts_with("template:"), "{listed:#}");
    let table = dev.ok(&["dlq", "list", "--playbook", "dlq-cli"]);
    let mut lines = table.lines();
    assert!(
        lines.next().is_some_and(|h| h.starts_with("RUN ")),
        "{table}"
    );
    assert!(
        lines.next().is_some_and(|row| row.starts_with(&run_id)),
        "{table}"
    );

    // Bad usage exits 2; a failed request exits 1 with one line on stderr.
    assert_eq!(dev.tp(&["dlq", "retry"]).status.code(), Some(2));
    let missing = dev.tp(&["dlq", "retry", "nonsense"]);
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");

    // Fix the contact, then retry the dead letter: it renders now and is delivered.
    dev.ok(&["contact", "upsert", "c-1", "--attr", "d=2"]);
    assert_eq!(
        dev.ok(&["dlq", "retry", &run_id]).trim(),
        format!("run/{run_id} retried")
    );
    let run = dev.wait_for(&["run", "get", &run_id], "the retried run", |v| {
        v["status"] == "completed"
    });
    assert_eq!(run["steps"][0]["status"], "done", "{run:#}");
    assert_eq!(run["steps"][0]["attempts"], 1, "{run:#}");
    assert_eq!(dev.json(&["dlq", "list"]), serde_json::json!([]));
    assert_eq!(
        dev.json(&["dlq", "retry", "--playbook", "dlq-cli"]),
        serde_json::json!({"retried": 0, "playbook": "dlq-cli"})
    );
    let again = dev.tp(&["dlq", "retry", &run_id]);
    assert_eq!(again.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("not in the dead-letter list"), "{stderr}");
}
