//! `tp policy apply | get` against `tp dev`: a dry run stores nothing, applying stores a
//! version (the same content again is unchanged), `get` prints it, and a bad policy says
//! which field is wrong.

mod common;

use common::{Dev, write};

const POLICY: &str = r#"caps:
  - { channel: "*", max: 2, per: 1d }
  - { channel: wecom, max: 4, per: month }
quiet_hours: { start: "22:00", end: "08:00" }
default_tz: Asia/Shanghai
"#;

const BAD: &str = r#"caps:
  - { channel: "*", max: 0, per: 1d }
"#;

#[test]
fn policy_apply_and_get() {
    let dev = Dev::start();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let file = write(dir.path(), "policy.yaml", POLICY);

    // Nothing applied yet.
    dev.fails(&["policy", "get"], 1);

    assert_eq!(
        dev.ok(&["policy", "apply", "-f", &file, "--dry-run"])
            .trim(),
        "policy is valid (would be version 1)"
    );
    dev.fails(&["policy", "get"], 1);
    assert_eq!(
        dev.ok(&["policy", "apply", "-f", &file]).trim(),
        "policy created (version 1)"
    );
    assert_eq!(
        dev.json(&["policy", "apply", "-f", &file]),
        serde_json::json!({"version": 1, "status": "unchanged"})
    );

    let policy = dev.json(&["policy", "get"]);
    assert_eq!(policy["version"], 1, "{policy:#}");
    assert_eq!(policy["yaml"], POLICY, "{policy:#}");
    assert!(policy["created_at"].is_string(), "{policy:#}");
    let table = dev.ok(&["policy", "get"]);
    assert!(table.starts_with("version:  1\ncreated:  "), "{table}");
    assert!(table.contains("\n\ncaps:\n"), "{table}");

    // A bad policy changes nothing and names the field.
    let bad = write(dir.path(), "bad.yaml", BAD);
    let stderr = dev.fails(&["policy", "apply", "-f", &bad], 1);
    assert!(stderr.contains("caps[0]"), "{stderr}");
    assert_eq!(dev.json(&["policy", "get"])["version"], 1);

    // From stdin too.
    let output = dev.tp_with_stdin(&["policy", "apply", "-f", "-"], POLICY.as_bytes());
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "policy unchanged (version 1)"
    );
    dev.fails(&["policy", "apply"], 2);
}
