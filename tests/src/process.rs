//! A child process with its output in a log file, killed when dropped.

use std::{
    ffi::OsStr,
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

/// Lines of log printed when a test panics while the process is alive.
const TAIL_LINES_ON_PANIC: usize = 60;

/// A child process whose stdout and stderr are appended to `<tempdir>/<name>.log`.
///
/// Environment variables starting with `TOUCHPOINT_` or `OTEL_` are removed from the child's
/// environment (so a developer's shell cannot redirect a test), and `RUST_LOG` defaults to
/// `info`. Dropping it kills the process with SIGKILL; when the drop happens because a test
/// panicked, the last lines of the log are printed to stderr and the log is kept.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log_dir: Option<TempDir>,
    log_path: PathBuf,
}

impl Process {
    /// Starts `program` with `args` and the extra `envs`. The process is named after the
    /// program's file name in messages and its log file.
    pub fn spawn<I, S>(program: impl AsRef<Path>, args: I, envs: &[(&str, &str)]) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let program = program.as_ref();
        let name = program.file_name().map_or_else(
            || "process".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        Self::spawn_named(&name, program, args, envs)
    }

    /// Like [`Process::spawn`], with `name` used in messages and as the log file's name.
    pub fn spawn_named<I, S>(
        name: &str,
        program: impl AsRef<Path>,
        args: I,
        envs: &[(&str, &str)],
    ) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("touchpoint-{name}-"))
            .tempdir()
            .expect("create a temporary log folder");
        let log_path = log_dir.path().join(format!("{name}.log"));
        let mut process = Self {
            name: name.to_owned(),
            child: None,
            log_dir: Some(log_dir),
            log_path,
        };
        process.start(program.as_ref(), args, envs);
        process
    }

    /// Starts the program again (after [`Process::kill9`]), appending to the same log.
    ///
    /// # Panics
    /// When the process is still running.
    pub fn respawn<I, S>(&mut self, program: impl AsRef<Path>, args: I, envs: &[(&str, &str)])
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        assert!(!self.is_running(), "{} is still running", self.name);
        self.start(program.as_ref(), args, envs);
    }

    fn start<I, S>(&mut self, program: &Path, args: I, envs: &[(&str, &str)])
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open the process log");
        let log_err = log.try_clone().expect("clone the log file handle");
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (key, _) in std::env::vars_os() {
            let key_str = key.to_string_lossy();
            if key_str.starts_with("TOUCHPOINT_") || key_str.starts_with("OTEL_") {
                command.env_remove(&key);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        command.envs(envs.iter().copied());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        self.child = Some(child);
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running (it has not exited or been killed).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process with SIGKILL (no chance to clean up) and waits until it is gone.
    /// Does nothing when it is not running.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only when the process has already exited, which is what we want.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (a name `kill -s` understands, e.g. `STOP`, `CONT`, `TERM`) to the
    /// process with the system's `kill` command.
    ///
    /// # Panics
    /// When the process is not running or `kill` fails.
    pub fn signal(&mut self, signal: &str) {
        let pid = self
            .id()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        let status = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -s {signal} {pid} failed: {status}");
    }

    /// Stops the process with SIGTERM and waits for it to exit.
    ///
    /// # Panics
    /// When it is still running after 15 s (its log tail is printed).
    pub async fn terminate(&mut self) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.is_running() {
            assert!(
                Instant::now() < deadline,
                "{} did not exit within 15 s of SIGTERM:\n{}",
                self.name,
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Freezes the process (SIGSTOP): it keeps its sockets open but does nothing, like a
    /// hung process. Dropping or [`Process::kill9`] still ends it.
    pub fn freeze(&mut self) {
        self.signal("STOP");
    }

    /// Lets a frozen process go on (SIGCONT).
    pub fn thaw(&mut self) {
        self.signal("CONT");
    }

    /// Where the process's output goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The whole log so far (lossy UTF-8).
    pub fn log(&self) -> String {
        let mut text = Vec::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let _ = file.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut file = match File::open(&self.log_path) {
            Ok(file) => file,
            Err(e) => return format!("(no log: {e})"),
        };
        // Logs of one test stay small; read at most the last 256 KiB.
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)));
        let mut text = Vec::new();
        let _ = file.read_to_end(&mut text);
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "----- last {TAIL_LINES_ON_PANIC} lines of {} ({}) -----\n{}\n----- end of {} -----",
                self.name,
                self.log_path.display(),
                self.log_tail(TAIL_LINES_ON_PANIC),
                self.name,
            );
            // Keep the whole log for a closer look.
            if let Some(dir) = self.log_dir.take() {
                let _ = dir.keep();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventually;
    use std::time::Duration;

    #[tokio::test]
    async fn output_goes_to_the_log_and_kill9_stops_the_process() {
        let mut process = Process::spawn(
            "sh",
            [
                "-c",
                "echo out-$GREETING; echo err-line >&2; exec sleep 600",
            ],
            &[("GREETING", "hello")],
        );
        assert!(process.is_running());
        let logged = eventually(Duration::from_secs(10), || async {
            let log = process.log();
            log.contains("out-hello") && log.contains("err-line")
        })
        .await;
        assert!(logged, "log was: {}", process.log());
        process.freeze();
        assert!(process.is_running(), "a frozen process is still there");
        process.thaw();
        process.kill9();
        assert!(!process.is_running());
        assert_eq!(process.log_tail(1), "err-line");
    }
}
