//! `tp enroll NAME --file` against `tp dev`: 100,000 contacts from a CSV with three bad
//! lines start 99,997 runs, report each bad line by its line number and exit 1; running
//! the same file again starts nobody. JSONL works too, from stdin.

mod common;

use std::fmt::Write as _;

use common::{Dev, write};

/// One long wait: nothing is delivered while the test runs.
const PLAYBOOK: &str = "name: bulk-cli
steps:
  - id: hold
    wait: 1d
";

const CONTACTS: usize = 100_000;
/// File lines (the header is line 1) that are bad, and how.
const BAD_LINES: [(usize, &str); 3] = [
    (
        10,
        "c-bad-columns,x,paid,Asia/Shanghai,+8613800000000,extra",
    ),
    (50_000, " ,no id,,,"),
    (99_999, "c-short-line,y"),
];

/// The CSV: a header, then `CONTACTS` lines, `BAD_LINES` among them.
fn contacts_csv() -> String {
    let mut csv = String::from("id,name,tags,tz,phone\n");
    for line in 2..=CONTACTS + 1 {
        match BAD_LINES.iter().find(|(bad, _)| *bad == line) {
            Some((_, text)) => csv.push_str(text),
            None => {
                let _ = write!(
                    csv,
                    "c-{line:06},客户{line},paid;vip,Asia/Shanghai,+86138{line:08}"
                );
            }
        }
        csv.push('\n');
    }
    csv
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bulk_enroll_a_csv_of_100k_contacts_twice() {
    let dev = Dev::start();
    dev.apply("playbook", PLAYBOOK);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let file = write(dir.path(), "contacts.csv", &contacts_csv());

    let first = dev.tp(&["enroll", "bulk-cli", "--file", &file]);
    let err = stderr(&first);
    assert_eq!(first.status.code(), Some(1), "{err}");
    let reported: Vec<&str> = err.lines().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(reported.len(), 3, "{err}");
    assert!(
        reported[0].starts_with("line 10: expected 5 columns, found 6"),
        "{err}"
    );
    assert!(reported[1].starts_with("line 50000: empty id"), "{err}");
    assert!(
        reported[2].starts_with("line 99999: expected 5 columns, found 2"),
        "{err}"
    );
    // No progress bar when stderr is not a terminal: only the bad lines and the error.
    assert_eq!(err.lines().count(), 4, "{err}");
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.starts_with("error: 3 bad lines in the file")),
        "{err}"
    );
    let summary = stdout(&first);
    assert_eq!(
        summary.trim(),
        "playbook/bulk-cli v1: 100000 contacts read\n\
         started:           99997\n\
         already enrolled:  0\n\
         not started:       0\n\
         bad lines:         3"
    );

    // The same file again: everybody is already enrolled, nobody starts twice.
    let second = dev.tp(&["enroll", "bulk-cli", "--file", &file, "-o", "json"]);
    assert_eq!(second.status.code(), Some(1), "{}", stderr(&second));
    let summary: serde_json::Value =
        serde_json::from_str(&stdout(&second)).expect("a JSON summary");
    assert_eq!(
        summary,
        serde_json::json!({
            "playbook": "bulk-cli",
            "version": 1,
            "read": 100_000,
            "started": 0,
            "already_enrolled": 99_997,
            "not_started": 0,
            "bad_lines": 3,
        })
    );
    let stats = dev.json(&["stats", "bulk-cli"]);
    assert_eq!(stats["entered"], 99_997, "{stats:#}");
    assert_eq!(stats["steps"][0]["waiting"], 99_997, "{stats:#}");

    // Contacts came with their columns.
    let contact = dev.json(&["contact", "get", "c-000002"]);
    assert_eq!(contact["attrs"]["name"], "客户2", "{contact:#}");
    assert_eq!(contact["tz"], "Asia/Shanghai", "{contact:#}");
    assert_eq!(
        contact["identities"]["phone"], "+8613800000002",
        "{contact:#}"
    );
}

#[test]
fn bulk_enroll_jsonl_from_stdin() {
    let dev = Dev::start();
    dev.apply("playbook", PLAYBOOK);
    let jsonl = r#"{"id": "j-1", "attrs": {"name": "王芳", "age": 31}, "tags": ["paid"], "tz": "Asia/Shanghai", "identities": {"email": "wang@example.com"}}

{"id": "j-2", "nickname": "x"}
not json
{"id": "j-3", "tz": "Mars/Olympus_Mons"}
{"id": "j-4"}
{"id": "j-1"}
"#;
    let output = dev.tp_with_stdin(
        &[
            "enroll", "bulk-cli", "--file", "-", "--format", "jsonl", "-o", "json",
        ],
        jsonl.as_bytes(),
    );
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    let reported: Vec<&str> = err.lines().filter(|l| l.starts_with("line ")).collect();
    assert_eq!(reported.len(), 3, "{err}");
    assert!(
        reported[0].starts_with("line 3: unknown field `nickname`"),
        "{err}"
    );
    assert!(reported[1].starts_with("line 4: invalid JSON: "), "{err}");
    // Refused by the scheduler: an unknown time zone.
    assert!(reported[2].starts_with("line 5: "), "{err}");
    let summary: serde_json::Value =
        serde_json::from_str(&stdout(&output)).expect("a JSON summary");
    assert_eq!(summary["read"], 6, "{summary:#}");
    assert_eq!(summary["started"], 2, "{summary:#}");
    // j-1 twice in one file: the second is the same request.
    assert_eq!(summary["already_enrolled"], 1, "{summary:#}");
    assert_eq!(summary["bad_lines"], 3, "{summary:#}");
    let contact = dev.json(&["contact", "get", "j-1"]);
    assert_eq!(contact["attrs"]["age"], "31", "{contact:#}");
    assert_eq!(
        contact["identities"]["email"], "wang@example.com",
        "{contact:#}"
    );

    // Usage: stdin needs --format; a name that tells no format needs it too; a file
    // and a contact together are one source too many.
    dev.fails(&["enroll", "bulk-cli", "--file", "-"], 2);
    let dir = tempfile::tempdir().expect("a temporary folder");
    let txt = write(dir.path(), "contacts.txt", "id\nc-1\n");
    let stderr = dev.fails(&["enroll", "bulk-cli", "--file", &txt], 2);
    assert!(stderr.contains("--format"), "{stderr}");
    dev.fails(
        &["enroll", "bulk-cli", "--file", &txt, "--contact", "c-1"],
        2,
    );
    // A missing file is a failed request.
    dev.fails(
        &["enroll", "bulk-cli", "--file", "/nonexistent/contacts.csv"],
        1,
    );
}
