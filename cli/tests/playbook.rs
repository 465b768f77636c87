//! `tp playbook pause | resume` and what `apply`, `list` and `get` say about versions
//! and pausing, against `tp dev`.

mod common;

use common::Dev;

fn playbook(wait: &str) -> String {
    format!(
        "name: pb-cli
steps:
  - id: hold
    wait: {wait}
"
    )
}

#[test]
fn pause_resume_and_older_versions() {
    let dev = Dev::start();
    assert_eq!(
        dev.apply("playbook", &playbook("1d")).trim(),
        "playbook/pb-cli created (version 1, 1 steps)"
    );
    dev.ok(&["enroll", "pb-cli", "--contact", "c-1"]);
    dev.ok(&["enroll", "pb-cli", "--contact", "c-2"]);
    assert_eq!(
        dev.apply("playbook", &playbook("2d")).trim(),
        "playbook/pb-cli created (version 2, 1 steps); 2 runs still on older versions"
    );

    let list = dev.json(&["playbook", "list"]);
    assert_eq!(list[0]["name"], "pb-cli", "{list:#}");
    assert_eq!(list[0]["paused"], false, "{list:#}");

    assert_eq!(
        dev.ok(&["playbook", "pause", "pb-cli"]).trim(),
        "playbook/pb-cli paused"
    );
    // Idempotent.
    let paused = dev.json(&["playbook", "pause", "pb-cli"]);
    assert_eq!(paused["paused"], true, "{paused:#}");
    assert_eq!(dev.json(&["playbook", "list"])[0]["paused"], true);
    let table = dev.ok(&["playbook", "list"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["NAME", "VERSION", "LATEST", "PAUSED", "STEPS", "CREATED"],
        "{table}"
    );
    assert_eq!(rows[1][..5], ["pb-cli", "2", "2", "yes", "1"], "{table}");
    let get = dev.ok(&["playbook", "get", "pb-cli"]);
    assert!(get.contains("\npaused:       yes\n"), "{get}");

    // Runs still start while paused.
    dev.ok(&["enroll", "pb-cli", "--contact", "c-3"]);

    assert_eq!(
        dev.ok(&["playbook", "resume", "pb-cli"]).trim(),
        "playbook/pb-cli resumed"
    );
    assert_eq!(dev.json(&["playbook", "get", "pb-cli"])["paused"], false);

    let stderr = dev.fails(&["playbook", "pause", "nonexistent"], 1);
    assert!(stderr.to_lowercase().contains("not found"), "{stderr}");
    dev.fails(&["playbook", "resume"], 2);
}
