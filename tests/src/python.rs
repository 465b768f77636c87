//! Python for test-only processes: a virtual environment with `tests/adapters/python/
//! requirements.txt` installed (grpcio, grpcio-tools, aiosmtpd), made once per target dir,
//! and the external gRPC channel adapter written in Python ([`PythonAdapter`]).
//!
//! The venv lives in `<target>/touchpoint-python-venv` (`CARGO_TARGET_DIR`, or the
//! workspace's `target/`). Test binaries running at the same time take a file lock while
//! one of them creates it; a `.requirements` stamp holding the requirements file's text
//! makes a changed file rebuild it. A missing `python3` fails the test, saying what to
//! install: these tests never skip silently.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::{Process, free_port};

/// What to install when Python is missing, for the failure messages.
const INSTALL_HINT: &str = "install Python 3 with venv and pip, e.g. \
                            `apt-get install python3 python3-venv` (Debian/Ubuntu) or \
                            `brew install python` (macOS)";

/// `tests/adapters/python`.
pub fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("adapters/python")
}

/// The folder of `.proto` files (`proto/proto`).
pub fn proto_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/proto")
}

/// The cargo target dir: `CARGO_TARGET_DIR`, or `target/` beside the workspace manifest.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir)
            }
        }
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}

/// The venv's interpreter, creating the venv first when needed.
///
/// # Panics
/// When `python3` is missing, cannot make a venv, or pip cannot install the requirements;
/// the message says what to install.
pub fn python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(ensure_venv).clone()
}

fn ensure_venv() -> PathBuf {
    let target = target_dir();
    std::fs::create_dir_all(&target)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", target.display()));
    let venv = target.join("touchpoint-python-venv");
    let interpreter = venv.join("bin/python");
    let stamp = venv.join(".requirements");
    let requirements_path = python_dir().join("requirements.txt");
    let requirements = std::fs::read_to_string(&requirements_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", requirements_path.display()));

    let lock_path = target.join("touchpoint-python-venv.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock_path.display()));
    // Held until this function returns: other test binaries wait here.
    lock.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", lock_path.display()));

    let ready = interpreter.exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|text| text == requirements);
    if ready {
        return interpreter;
    }
    let python3 = which_python3();
    if venv.exists() {
        std::fs::remove_dir_all(&venv)
            .unwrap_or_else(|e| panic!("cannot remove the stale {}: {e}", venv.display()));
    }
    run(
        Command::new(&python3).args(["-m", "venv"]).arg(&venv),
        &format!(
            "`{} -m venv` failed (is the venv module installed?): {INSTALL_HINT}",
            python3.display()
        ),
    );
    run(
        Command::new(&interpreter)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "-q",
                "-r",
            ])
            .arg(&requirements_path),
        &format!(
            "pip could not install {} into {}",
            requirements_path.display(),
            venv.display()
        ),
    );
    std::fs::write(&stamp, &requirements)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", stamp.display()));
    drop(lock);
    interpreter
}

/// `python3` from `PATH`.
fn which_python3() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("python3"))
            .find(|candidate| candidate.is_file())
    });
    let Some(python3) = found else {
        panic!("python3 is not on PATH; these tests run real Python processes: {INSTALL_HINT}");
    };
    let works = Command::new(&python3)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(works, "{} does not run; {INSTALL_HINT}", python3.display());
    python3
}

fn run(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start it: {e}"));
    assert!(
        output.status.success(),
        "{what} ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Generates the Python stubs of `touchpoint/adapter/v1/adapter.proto` into `out` with
/// `grpc_tools.protoc`.
///
/// # Panics
/// When protoc fails.
pub fn generate_adapter_stubs(out: &Path) {
    let proto = proto_dir();
    run(
        Command::new(python())
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(&proto)
            .arg(format!("--python_out={}", out.display()))
            .arg(format!("--grpc_python_out={}", out.display()))
            .arg("touchpoint/adapter/v1/adapter.proto"),
        "grpc_tools.protoc could not compile adapter.proto",
    );
    // Make the generated folders importable as packages on any Python.
    for package in ["touchpoint", "touchpoint/adapter", "touchpoint/adapter/v1"] {
        let init = out.join(package).join("__init__.py");
        if !init.exists() {
            std::fs::write(&init, "").expect("write __init__.py");
        }
    }
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`.
///
/// # Panics
/// When `process` exits first or nothing listens within `timeout` (with its log tail).
pub fn wait_for_port(process: &mut Process, port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        assert!(
            process.is_running(),
            "the process exited before listening on {port}:\n{}",
            process.log_tail(40)
        );
        assert!(
            Instant::now() < deadline,
            "nothing listens on {port} after {timeout:?}:\n{}",
            process.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tests/adapters/python/adapter.py` running on a free port, its stubs generated into a
/// temporary folder, every `Deliver` it got recorded as a JSON line.
#[derive(Debug)]
pub struct PythonAdapter {
    process: Process,
    port: u16,
    dir: TempDir,
}

impl PythonAdapter {
    /// Starts the adapter and waits until it listens (the venv may take a minute to make
    /// the first time).
    ///
    /// # Panics
    /// When Python is missing (see [`python`]) or the adapter does not start.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// [`PythonAdapter::start`] on `port` (e.g. one a worker was told about before the
    /// adapter came up).
    ///
    /// # Panics
    /// When Python is missing (see [`python`]) or the adapter does not start.
    pub fn start_on(port: u16) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("touchpoint-py-adapter-")
            .tempdir()
            .expect("create a temporary folder");
        generate_adapter_stubs(dir.path());
        let record = dir.path().join("deliveries.jsonl");
        File::create(&record).expect("create the record file");
        let script = python_dir().join("adapter.py");
        let pythonpath = dir.path().to_string_lossy().into_owned();
        let mut process = Process::spawn_named(
            "py-adapter",
            python(),
            [
                script.to_string_lossy().into_owned(),
                "--port".to_owned(),
                port.to_string(),
                "--record".to_owned(),
                record.to_string_lossy().into_owned(),
            ],
            &[("PYTHONPATH", &pythonpath), ("PYTHONUNBUFFERED", "1")],
        );
        wait_for_port(&mut process, port, Duration::from_secs(30));
        Self { process, port, dir }
    }

    /// `http://127.0.0.1:<port>`, for a worker's `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every `Deliver` call so far, in order.
    pub fn deliveries(&self) -> Vec<serde_json::Value> {
        let Ok(file) = File::open(self.dir.path().join("deliveries.jsonl")) else {
            return Vec::new();
        };
        BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str(&line).ok())
            .collect()
    }

    /// The process (for its log, or to kill it).
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}
