//! A real `redis-server` per test, on a free loopback port.

use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::{free_port, ports::free_cluster_port};

/// How long a starting `redis-server` may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process on `127.0.0.1:<free port>` with its own temporary data
/// folder (removed on drop). RDB snapshots are off (`--save ""`); AOF is on unless started
/// with [`RedisServer::start_with`]`(false)`. `maxmemory-policy` is `noeviction`, which
/// the scheduler requires.
///
/// Dropping it kills the server.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    appendonly: bool,
    /// A Redis Cluster node (see [`crate::RedisCluster`]).
    cluster: bool,
    /// A TLS port besides the plain one (see [`RedisServer::start_tls`]).
    tls: Option<TlsPort>,
    dir: TempDir,
}

/// A TLS port: its certificate and key, and the CA its clients' certificates must come
/// from (none: clients need no certificate).
#[derive(Debug)]
struct TlsPort {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl RedisServer {
    /// Starts a server with AOF persistence on (`--appendonly yes`), so that
    /// [`RedisServer::restart`] keeps the data.
    ///
    /// # Panics
    /// When `redis-server` is not on `PATH` (the message names the apt package) or does not
    /// answer PING within 10 s.
    pub fn start() -> Self {
        Self::start_with(true)
    }

    /// Starts a server with AOF persistence on or off.
    ///
    /// # Panics
    /// As [`RedisServer::start`].
    pub fn start_with(appendonly: bool) -> Self {
        Self::launch(free_port(), appendonly, false)
    }

    /// Starts a Redis Cluster node (`cluster-enabled yes`, its `nodes.conf` and AOF in its
    /// data folder) on a port whose cluster bus port (+10000) is free too. It serves no
    /// slots until [`crate::RedisCluster`] creates the cluster.
    pub(crate) fn start_cluster_node() -> Self {
        Self::launch(free_cluster_port(), true, true)
    }

    /// Starts a server (AOF off) that also serves TLS on another port with `cert` and `key`
    /// (PEM), asking clients for a certificate from `client_ca` when given; see
    /// [`RedisServer::tls_url`]. The plain port stays open for the test's own checks.
    pub fn start_tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Self {
        let tls = TlsPort {
            port: free_port(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
        };
        Self::launch_with(free_port(), false, false, Some(tls))
    }

    /// `rediss://127.0.0.1:<TLS port>/0`.
    ///
    /// # Panics
    /// When the server was not started with [`RedisServer::start_tls`].
    pub fn tls_url(&self) -> String {
        let tls = self.tls.as_ref().expect("a server started with start_tls");
        format!("rediss://127.0.0.1:{}/0", tls.port)
    }

    fn launch(port: u16, appendonly: bool, cluster: bool) -> Self {
        Self::launch_with(port, appendonly, cluster, None)
    }

    fn launch_with(port: u16, appendonly: bool, cluster: bool, tls: Option<TlsPort>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("touchpoint-redis-")
            .tempdir()
            .expect("create a temporary Redis folder");
        let mut server = Self {
            child: None,
            port,
            appendonly,
            cluster,
            tls,
            dir,
        };
        server.spawn();
        server
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data folder (AOF files and `redis.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client for `url()` (connections are opened on demand).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("a valid Redis URL")
    }

    /// Kills the server with SIGKILL and waits until it is gone. With AOF on, every write it
    /// acknowledged is already in the AOF file (Redis writes it before answering), so a
    /// restart finds it; only an OS crash could lose the last second (`appendfsync everysec`).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server (if running) and starts it again on the same port with the same
    /// data folder, waiting until it answers PING (it loads the AOF first).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    fn spawn(&mut self) {
        let dir = self.dir.path();
        let port = self.port.to_string();
        let log = dir.join("redis.log");
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--port".as_ref(),
            port.as_ref(),
            "--bind".as_ref(),
            "127.0.0.1".as_ref(),
            "--dir".as_ref(),
            dir.as_os_str(),
            "--save".as_ref(),
            "".as_ref(),
            "--appendonly".as_ref(),
            (if self.appendonly { "yes" } else { "no" }).as_ref(),
            "--appendfsync".as_ref(),
            "everysec".as_ref(),
            "--maxmemory-policy".as_ref(),
            "noeviction".as_ref(),
            "--daemonize".as_ref(),
            "no".as_ref(),
            "--logfile".as_ref(),
            log.as_os_str(),
        ];
        if self.cluster {
            args.extend::<[&std::ffi::OsStr; 6]>([
                "--cluster-enabled".as_ref(),
                "yes".as_ref(),
                "--cluster-config-file".as_ref(),
                "nodes.conf".as_ref(),
                "--cluster-node-timeout".as_ref(),
                "5000".as_ref(),
            ]);
        }
        let tls_port;
        if let Some(tls) = &self.tls {
            tls_port = tls.port.to_string();
            args.extend::<[&std::ffi::OsStr; 8]>([
                "--tls-port".as_ref(),
                tls_port.as_ref(),
                "--tls-cert-file".as_ref(),
                tls.cert.as_os_str(),
                "--tls-key-file".as_ref(),
                tls.key.as_os_str(),
                "--tls-auth-clients".as_ref(),
                (if tls.client_ca.is_some() { "yes" } else { "no" }).as_ref(),
            ]);
            if let Some(ca) = &tls.client_ca {
                args.extend::<[&std::ffi::OsStr; 2]>([
                    "--tls-ca-cert-file".as_ref(),
                    ca.as_os_str(),
                ]);
            }
        }
        let child = match Command::new("redis-server")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == ErrorKind::NotFound => panic!(
                "redis-server was not found on PATH: these tests start their own Redis. \
                 Install the `redis-server` package (Debian/Ubuntu: `apt-get install redis-server`)"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        self.child = Some(child);
        self.wait_until_ready(&log);
    }

    fn wait_until_ready(&mut self, log: &Path) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ping(self.port) {
                return;
            }
            if !self.is_running() {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                panic!("redis-server on port {} exited at start:\n{log}", self.port);
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(log).unwrap_or_default();
                panic!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}:\n{log}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis on `127.0.0.1:port` answers PING with PONG (not `-LOADING`).
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(port: u16, cmd: &[&str]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut request = format!("*{}\r\n", cmd.len());
        for part in cmd {
            request.push_str(&format!("${}\r\n{part}\r\n", part.len()));
        }
        stream.write_all(request.as_bytes()).expect("write");
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).expect("read");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn data_survives_a_restart_with_aof() {
        let mut redis = RedisServer::start();
        assert!(redis.url().ends_with(&format!(":{}/0", redis.port())));
        assert_eq!(command(redis.port(), &["SET", "k", "v"]), "+OK\r\n");
        // Redis writes the AOF before it answers, so SIGKILL loses nothing acknowledged.
        redis.restart();
        assert_eq!(command(redis.port(), &["GET", "k"]), "$1\r\nv\r\n");
        assert!(
            command(redis.port(), &["CONFIG", "GET", "maxmemory-policy"]).contains("noeviction")
        );
    }

    #[test]
    fn without_aof_a_restart_starts_empty() {
        let mut redis = RedisServer::start_with(false);
        assert_eq!(command(redis.port(), &["SET", "k", "v"]), "+OK\r\n");
        redis.kill();
        assert!(!redis.is_running());
        redis.restart();
        assert_eq!(command(redis.port(), &["GET", "k"]), "$-1\r\n");
    }
}
