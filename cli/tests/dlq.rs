//! `tp dlq list | retry` against `tp dev` (a real redis-server, scheduler and console
//! worker): a step whose template fails to render dead-letters its run; once the
//! contact is fixed, `tp dlq retry` puts the run back and it completes.

use std::{
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

const TP: &str = env!("CARGO_BIN_EXE_tp");
const TIMEOUT: Duration = Duration::from_secs(30);

/// Divides by the contact's `d` attribute: fails to render for `d=0`.
const PLAYBOOK: &str = r#"name: dlq-cli
steps:
  - id: notify
    action: send_message
    channel: console
    template: "{{ params.n // (contact.attrs.d | int) }}"
    params: { n: 6 }
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `tp dev` in the background; SIGINT (its clean stop) on drop.
struct Dev {
    child: Child,
    server: String,
    log: tempfile::NamedTempFile,
}

impl Dev {
    fn start() -> Self {
        let listen = format!("127.0.0.1:{}", free_port());
        let log = tempfile::NamedTempFile::new().expect("a log file");
        let child = Command::new(TP)
            .args(["dev", "--listen", &listen])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("the log file"))
            .spawn()
            .expect("start tp dev");
        let dev = Self {
            child,
            server: format!("http://{listen}"),
            log,
        };
        let deadline = Instant::now() + TIMEOUT;
        while !dev.tp(&["playbook", "list"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "tp dev did not answer:\n{}",
                dev.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        dev
    }

    /// `tp --server <dev> ARGS...`.
    fn tp(&self, args: &[&str]) -> Output {
        Command::new(TP)
            .args(["--server", &self.server])
            .args(args)
            .output()
            .expect("run tp")
    }

    /// `tp ARGS...`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.tp(args);
        assert!(
            output.status.success(),
            "tp {args:?} exited with {:?}: {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `tp ARGS... -o json`, parsed.
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let args: Vec<&str> = args.iter().copied().chain(["-o", "json"]).collect();
        let stdout = self.ok(&args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("tp {args:?}: {e}: {stdout}"))
    }

    /// Polls `tp ARGS -o json` until `done` holds.
    fn wait_for(
        &self,
        args: &[&str],
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let value = self.json(args);
            if done(&value) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not happen; last seen: {value:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the playbook");
    path.to_string_lossy().into_owned()
}

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

    // Fix the contact (enrolling upserts it; that second run renders and completes),
    // then retry the dead letter: it renders now and is delivered.
    dev.ok(&["enroll", "dlq-cli", "--contact", "c-1", "--attr", "d=2"]);
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
