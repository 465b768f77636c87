//! `tp dev` (a real redis-server, scheduler and console worker) in the background, and
//! `tp` commands against it, for the end-to-end tests of this folder.

// Each test binary uses its own part of these helpers.
#![allow(dead_code)]

use std::{
    io::Write,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// The `tp` binary under test.
pub(crate) const TP: &str = env!("CARGO_BIN_EXE_tp");
/// How long anything may take to happen.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `tp dev` in the background; SIGINT (its clean stop) on drop.
pub(crate) struct Dev {
    child: Child,
    server: String,
    log: tempfile::NamedTempFile,
}

impl Dev {
    /// Starts `tp dev` on a free port and waits until it answers.
    pub(crate) fn start() -> Self {
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
    pub(crate) fn tp(&self, args: &[&str]) -> Output {
        Command::new(TP)
            .args(["--server", &self.server])
            .args(args)
            .output()
            .expect("run tp")
    }

    /// `tp --server <dev> ARGS...` with `input` on its stdin.
    pub(crate) fn tp_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = Command::new(TP)
            .args(["--server", &self.server])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tp");
        let mut stdin = child.stdin.take().expect("tp's stdin");
        stdin.write_all(input).expect("write tp's stdin");
        drop(stdin);
        child.wait_with_output().expect("wait for tp")
    }

    /// `tp ARGS...`, which must succeed; its stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let output = self.tp(args);
        assert!(
            output.status.success(),
            "tp {args:?} exited with {:?}: {}",
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `tp ARGS... -o json`, which must succeed, parsed.
    pub(crate) fn json(&self, args: &[&str]) -> serde_json::Value {
        let args: Vec<&str> = args.iter().copied().chain(["-o", "json"]).collect();
        let stdout = self.ok(&args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("tp {args:?}: {e}: {stdout}"))
    }

    /// `tp ARGS...`, which must fail with `code` and one line on stderr; that line.
    pub(crate) fn fails(&self, args: &[&str], code: i32) -> String {
        let output = self.tp(args);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(
            output.status.code(),
            Some(code),
            "tp {args:?}: {}{stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
        if code == 1 {
            assert_eq!(stderr.lines().count(), 1, "tp {args:?}: {stderr}");
        }
        stderr
    }

    /// Polls `tp ARGS -o json` until `done` holds.
    pub(crate) fn wait_for(
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

    /// Applies the playbook (or policy) `yaml` with `tp KIND apply -f`; its stdout.
    pub(crate) fn apply(&self, kind: &str, yaml: &str) -> String {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let file = write(dir.path(), "source.yaml", yaml);
        self.ok(&[kind, "apply", "-f", &file])
    }

    /// What `tp dev` logged so far.
    pub(crate) fn log(&self) -> String {
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

/// Writes `text` to `dir/name`; the path.
pub(crate) fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a file");
    path.to_string_lossy().into_owned()
}

/// The `run_id` of `tp enroll ... -o json`.
pub(crate) fn run_id(enrolled: &serde_json::Value) -> String {
    enrolled["run_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run id in {enrolled:#}"))
        .to_owned()
}
