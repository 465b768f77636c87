//! A real SMTP server for tests: `tests/adapters/python/smtp_server.py` (aiosmtpd) on a
//! free loopback port, with STARTTLS, implicit TLS or none, a certificate from a throwaway
//! CA ([`TestPki`]), optional AUTH, and every message it accepts or turns away written to
//! a folder this helper reads.
//!
//! Replies by the first recipient's local part: `tempfail-once...` gets 451 the first time
//! (then 250), `tempfail...` always 451, `reject...` always 550, anything else 250.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tempfile::TempDir;

use crate::python::{python, python_dir, wait_for_port};
use crate::{Process, TestPki, free_port};

/// How the server secures connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain, upgraded with STARTTLS (required before MAIL).
    StartTls,
    /// TLS from the first byte.
    Implicit,
    /// No TLS.
    None,
}

impl SmtpTls {
    /// The worker's `tls` setting for this mode.
    pub fn setting(self) -> &'static str {
        match self {
            Self::StartTls => "starttls",
            Self::Implicit => "implicit",
            Self::None => "none",
        }
    }
}

/// One message the server got, as written to its folder.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    /// The raw message (headers and body).
    pub raw: String,
}

impl ReceivedMail {
    /// The first header `name` (case-insensitive), unfolded; `None` when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let head = self
            .raw
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .replace("\r\n ", " ")
            .replace("\r\n\t", " ");
        head.split("\r\n").find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }
}

/// A running SMTP server; killed on drop.
#[derive(Debug)]
pub struct SmtpServer {
    process: Process,
    port: u16,
    tls: SmtpTls,
    maildir: TempDir,
    pki: TestPki,
}

impl SmtpServer {
    /// Starts a server securing connections as `tls` and, with `login`, requiring AUTH
    /// with that username and password.
    ///
    /// # Panics
    /// When Python is missing or the server does not start.
    pub fn start(tls: SmtpTls, login: Option<(&str, &str)>) -> Self {
        let pki = TestPki::generate();
        let maildir = tempfile::Builder::new()
            .prefix("touchpoint-smtp-")
            .tempdir()
            .expect("create a temporary mail folder");
        let port = free_port();
        let mut args = vec![
            python_dir()
                .join("smtp_server.py")
                .to_string_lossy()
                .into_owned(),
            "--port".to_owned(),
            port.to_string(),
            "--tls".to_owned(),
            tls.setting().to_owned(),
            "--maildir".to_owned(),
            maildir.path().to_string_lossy().into_owned(),
            "--cert".to_owned(),
            pki.server_cert().to_string_lossy().into_owned(),
            "--key".to_owned(),
            pki.server_key().to_string_lossy().into_owned(),
        ];
        if let Some((username, password)) = login {
            args.extend([
                "--username".to_owned(),
                username.to_owned(),
                "--password".to_owned(),
                password.to_owned(),
            ]);
        }
        let mut process = Process::spawn_named(
            &format!("smtp-{}", tls.setting()),
            python(),
            args,
            &[("PYTHONUNBUFFERED", "1")],
        );
        wait_for_port(&mut process, port, Duration::from_secs(30));
        Self {
            process,
            port,
            tls,
            maildir,
            pki,
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How it secures connections.
    pub fn tls(&self) -> SmtpTls {
        self.tls
    }

    /// The CA that signed its certificate (for the worker's `ca_file`); the certificate
    /// names `localhost` and `127.0.0.1`.
    pub fn ca_file(&self) -> PathBuf {
        self.pki.ca()
    }

    /// Messages accepted (250), in order.
    pub fn accepted(&self) -> Vec<ReceivedMail> {
        read_folder(&self.maildir.path().join("accepted"))
    }

    /// Messages turned away at DATA (451 or 550), in order.
    pub fn rejected(&self) -> Vec<ReceivedMail> {
        read_folder(&self.maildir.path().join("rejected"))
    }

    /// The process (for its log).
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

fn read_folder(dir: &Path) -> Vec<ReceivedMail> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "eml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .map(|bytes| ReceivedMail {
            raw: String::from_utf8_lossy(&bytes).into_owned(),
        })
        .collect()
}
