//! `tp stats` against `tp dev`: the per-step funnel with bars in a table, raw numbers in
//! JSON, and the conversion rate once a contact reaches the goal.

mod common;

use common::Dev;

const PLAYBOOK: &str = r#"name: stats-cli
goal:
  event: order.placed
steps:
  - id: hello
    action: send_message
    channel: console
    template: "hi"
  - id: hold
    wait: 1d
"#;

#[test]
fn stats_show_the_funnel() {
    let dev = Dev::start();
    dev.apply("playbook", PLAYBOOK);
    for n in 1..=4 {
        dev.ok(&["enroll", "stats-cli", "--contact", &format!("c-{n}")]);
    }
    let stats = dev.wait_for(&["stats", "stats-cli"], "four runs waiting", |stats| {
        stats["steps"][1]["waiting"] == 4
    });
    assert_eq!(stats["name"], "stats-cli", "{stats:#}");
    assert_eq!(stats["version"], 0, "{stats:#}");
    assert_eq!(stats["entered"], 4, "{stats:#}");
    assert_eq!(stats["active"], 4, "{stats:#}");
    assert_eq!(stats["steps"][0]["step_id"], "hello", "{stats:#}");
    assert_eq!(stats["steps"][0]["kind"], "action", "{stats:#}");
    assert_eq!(stats["steps"][0]["entered"], 4, "{stats:#}");
    assert_eq!(stats["steps"][0]["done"], 4, "{stats:#}");
    assert_eq!(stats["steps"][1]["kind"], "wait", "{stats:#}");
    assert_eq!(stats["steps"][1]["entered"], 4, "{stats:#}");

    dev.ok(&["event", "send", "c-1", "order.placed"]);
    let stats = dev.json(&["stats", "stats-cli", "--version", "1"]);
    assert_eq!(stats["version"], 1, "{stats:#}");
    assert_eq!(stats["converted"], 1, "{stats:#}");
    assert_eq!(stats["active"], 3, "{stats:#}");
    assert_eq!(stats["conversion_rate"], 0.25, "{stats:#}");
    assert_eq!(stats["steps"][1]["waiting"], 3, "{stats:#}");
    assert_eq!(stats["steps"][1]["left"], 1, "{stats:#}");

    let table = dev.ok(&["stats", "stats-cli"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0], "playbook:         stats-cli (all versions)",
        "{table}"
    );
    assert_eq!(lines[2], "conversion rate:  25.0% (1 of 4)", "{table}");
    assert!(lines[4].starts_with("STEP "), "{table}");
    assert!(lines[4].trim_end().ends_with("FUNNEL"), "{table}");
    let full = "█".repeat(20);
    assert!(lines[5].starts_with("hello "), "{table}");
    assert!(
        lines[5].trim_end().ends_with(&format!("{full} 100%")),
        "{table}"
    );
    assert!(
        lines[6].trim_end().ends_with(&format!("{full} 100%")),
        "{table}"
    );

    let yaml = dev.ok(&["stats", "stats-cli", "-o", "yaml"]);
    assert!(!yaml.contains('█'), "{yaml}");
    let stderr = dev.fails(&["stats", "nonexistent"], 1);
    assert!(stderr.to_lowercase().contains("not found"), "{stderr}");
    dev.fails(&["stats"], 2);
}
