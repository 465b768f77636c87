//! `tp dev`: the whole local stack in the foreground: an ephemeral `redis-server`
//! on a free port with its data in a temporary folder, a scheduler and a worker
//! whose channels print every delivery. Ctrl-C or SIGTERM stops it all and removes
//! the data.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};
use tokio_util::sync::CancellationToken;
use touchpoint_proto::v1::{ApplyPlaybookRequest, Contact, EnrollRequest, ListPlaybooksRequest};
use touchpoint_scheduler::SchedulerArgs;
use touchpoint_worker::WorkerConfig;
use tracing_subscriber::EnvFilter;

use crate::client::{Client, DEFAULT_SERVER, ServerArgs};
use crate::commands::{enroll, playbook};

/// How long Redis and then the scheduler may take to answer after starting.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the scheduler and the worker may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The example journey that `--demo` runs.
const EXAMPLE_PLAYBOOK: &str = include_str!("../../../examples/welcome.yaml");
/// The name the demo gives the example journey.
const DEMO_PLAYBOOK: &str = "welcome-demo";

#[derive(Args, Debug)]
pub(crate) struct DevArgs {
    /// Where the scheduler listens for gRPC.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub(crate) listen: SocketAddr,
    /// Channels the worker serves, each printing its deliveries.
    #[arg(long, value_delimiter = ',', default_value = "console,wecom,sms,email")]
    pub(crate) channels: Vec<String>,
    /// Also apply the example journey (with a 20s wait) and enroll two contacts.
    #[arg(long)]
    pub(crate) demo: bool,
}

/// Runs the stack until Ctrl-C or SIGTERM; `call_timeout` is the deadline of the demo's calls.
pub(crate) async fn run(args: DevArgs, call_timeout: Duration) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let binary = find_on_path("redis-server").ok_or_else(|| {
        anyhow!(
            "redis-server not found on PATH; install it \
             (Debian/Ubuntu: apt-get install redis-server, macOS: brew install redis)"
        )
    })?;
    let listener = TcpListener::bind(args.listen).await.map_err(|err| {
        anyhow!(
            "cannot listen on {}: {err}; choose another address with --listen",
            args.listen
        )
    })?;
    let stop = shutdown_signal().context("cannot catch Ctrl-C")?;
    let data = tempfile::Builder::new()
        .prefix("touchpoint-dev-")
        .tempdir()
        .context("cannot create a temporary folder for Redis")?;
    let mut redis = Redis::start(&binary, data.path()).await?;
    let outcome = serve(&args, listener, &redis.url, data.path(), call_timeout, stop).await;
    redis.stop().await;
    data.close().context("cannot remove the temporary folder")?;
    eprintln!("stopped");
    outcome
}

/// Runs the scheduler on `listener` and the worker against `redis_url` until `stop`
/// completes or one of them stops, then stops both.
async fn serve(
    args: &DevArgs,
    listener: TcpListener,
    redis_url: &str,
    data: &Path,
    call_timeout: Duration,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let server = format!("http://{}", reachable(addr));
    let mut scheduler_args = SchedulerArgs::parse_from([
        "touchpoint-scheduler",
        "--redis-url",
        redis_url,
        "--listen",
        &addr.to_string(),
    ]);
    // A local stack: plaintext and loopback-only, whatever TOUCHPOINT_* the shell has.
    scheduler_args.auth_file = None;
    scheduler_args.tls_cert = None;
    scheduler_args.tls_key = None;
    scheduler_args.tls_client_ca = None;
    let channels: Vec<&str> = args.channels.iter().map(String::as_str).collect();
    let worker_config = WorkerConfig::console(&server, &channels);

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let stopped = shutdown.clone().cancelled_owned();
    tasks.spawn(async move {
        let result = touchpoint_scheduler::run(scheduler_args, listener, stopped).await;
        ("scheduler", result)
    });
    let stopped = shutdown.clone().cancelled_owned();
    tasks.spawn(async move {
        (
            "worker",
            touchpoint_worker::run(worker_config, stopped).await,
        )
    });

    let tp = tp_command(&server);
    let banner = format!(
        "\nTouchpoint dev stack is up (Ctrl-C stops it and removes its data)\n\
         \x20 redis      {redis_url} (data in {data})\n\
         \x20 scheduler  {server}\n\
         \x20 worker     channels {channels}; deliveries print below\n\
         try:\n\
         \x20 {tp} playbook apply -f examples/welcome.yaml\n\
         \x20 {tp} enroll welcome-new-customer --contact c-1001 --attr name=王芳 --tag paid\n\
         \x20 {tp} run list\n",
        data = data.display(),
        channels = args.channels.join(", "),
    );
    let client = ServerArgs {
        server,
        token: None,
        ca: None,
        tls_client_cert: None,
        tls_client_key: None,
        timeout: call_timeout,
    };
    let demo = args.demo;
    let welcome = tokio::spawn(async move {
        if let Err(err) = welcome(&client, &banner, demo).await {
            eprintln!("error: {err:#}");
        }
    });

    let outcome = tokio::select! {
        () = stop => Ok(()),
        Some(stopped) = tasks.join_next() => Err(match stopped {
            Ok((name, Ok(()))) => anyhow!("the {name} stopped unexpectedly"),
            Ok((name, Err(err))) => err.context(format!("the {name} failed")),
            Err(err) => anyhow!("a task of tp dev failed: {err}"),
        }),
    };
    eprintln!("stopping...");
    welcome.abort();
    shutdown.cancel();
    let drain = async {
        while let Some(stopped) = tasks.join_next().await {
            match stopped {
                Ok((_, Ok(()))) => {}
                Ok((name, Err(err))) => tracing::error!("the {name} failed: {err:#}"),
                Err(err) => tracing::error!("a task of tp dev failed: {err}"),
            }
        }
    };
    if timeout(STOP_TIMEOUT, drain).await.is_err() {
        tracing::warn!("the scheduler or the worker did not stop within {STOP_TIMEOUT:?}");
    }
    outcome
}

/// Once the scheduler answers: prints the banner, then runs the demo if asked.
async fn welcome(server: &ServerArgs, banner: &str, demo: bool) -> anyhow::Result<()> {
    let client = wait_until_serving(server).await?;
    eprintln!("{banner}");
    if demo {
        run_demo(&client, &tp_command(&server.server))
            .await
            .context("demo")?;
    }
    Ok(())
}

/// How to call `tp` against `server`.
fn tp_command(server: &str) -> String {
    if server == DEFAULT_SERVER {
        "tp".to_owned()
    } else {
        format!("tp --server {server}")
    }
}

/// Applies the example journey as `welcome-demo` and enrolls two contacts.
async fn run_demo(client: &Client, tp: &str) -> anyhow::Result<()> {
    let request = ApplyPlaybookRequest {
        yaml: demo_playbook(EXAMPLE_PLAYBOOK),
        dry_run: false,
    };
    let applied = playbook::apply(client, request).await?;
    eprintln!(
        "demo: playbook/{} version {} applied: examples/welcome.yaml with `wait: 3d` shortened to `wait: 20s`",
        applied.name, applied.version
    );
    for (id, name, tag) in [("c-1001", "王芳", Some("paid")), ("c-1002", "李雷", None)] {
        let contact = Contact {
            id: id.to_owned(),
            attrs: [("name".to_owned(), name.to_owned())].into(),
            tags: tag.iter().map(|tag| (*tag).to_owned()).collect(),
            ..Contact::default()
        };
        let request = EnrollRequest {
            playbook: DEMO_PLAYBOOK.to_owned(),
            contact: Some(contact),
            request_id: String::new(),
        };
        let run_id = enroll::enroll(client, request).await?.run_id;
        let tags = tag.map_or("no tags".to_owned(), |tag| format!("tag {tag}"));
        eprintln!("demo: enrolled {id} ({name}, {tags}) in run/{run_id}; its timeline:");
        eprintln!("  {tp} run get {run_id}");
    }
    Ok(())
}

/// The example journey renamed to `welcome-demo`, with its three-day wait cut to 20 seconds.
fn demo_playbook(example: &str) -> String {
    let mut yaml: String = example
        .lines()
        .map(|line| {
            if line.starts_with("name:") {
                format!("name: {DEMO_PLAYBOOK}")
            } else if line.trim() == "wait: 3d" {
                line.replace("3d", "20s")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    yaml.push('\n');
    yaml
}

/// Calls the scheduler until it answers, for at most [`START_TIMEOUT`].
async fn wait_until_serving(server: &ServerArgs) -> anyhow::Result<Client> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let answer = async {
            let client = Client::connect(server).await?;
            client
                .playbooks()
                .list_playbooks(ListPlaybooksRequest {})
                .await
                .map_err(|status| client.error(status))?;
            anyhow::Ok(client)
        };
        match answer.await {
            Ok(client) => return Ok(client),
            Err(err) if Instant::now() >= deadline => {
                return Err(err.context(format!(
                    "the scheduler did not answer within {START_TIMEOUT:?}"
                )));
            }
            Err(_) => sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The address clients dial for a listener on `addr` (loopback for 0.0.0.0 or ::).
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// Catches Ctrl-C (SIGINT), SIGTERM and a closed terminal (SIGHUP) from now on, so that
/// none kills `tp` without cleaning up; the future completes on the first of them.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
        }
    })
}

/// `name`'s path in a folder of `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|folder| folder.join(name))
        .find(|path| path.is_file())
}

/// The command that starts `redis-server` at `binary`. On Linux, through util-linux's
/// `setpriv --pdeathsig KILL` when it is there, so that Redis dies with `tp` even when
/// `tp` itself is killed with SIGKILL and cannot stop it (its data folder is then left
/// in the temporary folder).
fn redis_command(binary: &Path) -> Command {
    if cfg!(target_os = "linux")
        && let Some(setpriv) = find_on_path("setpriv")
    {
        let mut command = Command::new(setpriv);
        command.args(["--pdeathsig", "KILL", "--"]).arg(binary);
        return command;
    }
    Command::new(binary)
}

/// An ephemeral `redis-server`, killed when dropped.
#[derive(Debug)]
struct Redis {
    child: Child,
    url: String,
}

impl Redis {
    /// Starts `binary` on a free port with its data and log in `data`, and waits
    /// until it answers PING.
    async fn start(binary: &Path, data: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|probe| probe.local_addr())
            .context("cannot find a free port for Redis")?
            .port();
        let log = data.join("redis.log");
        let child = redis_command(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--appendonly", "yes", "--save", ""])
            .arg("--dir")
            .arg(data)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Its own process group: Ctrl-C reaches tp only, which stops Redis last.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut redis = Self {
            child,
            url: format!("redis://127.0.0.1:{port}/0"),
        };
        redis.wait_for_pong(port, &log).await?;
        Ok(redis)
    }

    async fn wait_for_pong(&mut self, port: u16, log: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "redis-server exited ({status}) at start: {}",
                    last_line(log)
                );
            }
            if ping(port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "redis-server did not answer PING on port {port} within {START_TIMEOUT:?}: {}",
                    last_line(log)
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(&mut self) {
        if let Err(err) = self.child.kill().await {
            tracing::warn!("cannot stop redis-server: {err}");
        }
    }
}

/// Whether Redis on `port` answers `PING` with `+PONG`.
async fn ping(port: u16) -> bool {
    let exchange = async {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut answer = [0; 7];
        stream.read_exact(&mut answer).await?;
        std::io::Result::Ok(answer == *b"+PONG\r\n")
    };
    matches!(
        timeout(Duration::from_secs(1), exchange).await,
        Ok(Ok(true))
    )
}

/// The last line of Redis's log, which says why it stopped.
fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "no log".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_playbook_is_renamed_and_short() -> anyhow::Result<()> {
        let example: serde_json::Value = serde_saphyr::from_str(EXAMPLE_PLAYBOOK)?;
        let yaml = demo_playbook(EXAMPLE_PLAYBOOK);
        let demo: serde_json::Value = serde_saphyr::from_str(&yaml)?;
        assert_eq!(demo["name"], "welcome-demo");
        let waits: Vec<&serde_json::Value> = demo["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|step| step.get("wait"))
            .collect();
        assert_eq!(waits, ["20s"]);
        // Everything else is the example's.
        let mut restored = demo.clone();
        restored["name"] = example["name"].clone();
        for step in restored["steps"].as_array_mut().into_iter().flatten() {
            if step.get("wait").is_some() {
                step["wait"] = "3d".into();
            }
        }
        assert_eq!(restored, example);
        // The comments stay.
        assert!(yaml.starts_with("# The seeds' journey"), "{yaml}");
        Ok(())
    }

    #[test]
    fn listeners_on_any_address_are_dialled_on_loopback() -> anyhow::Result<()> {
        assert_eq!(
            reachable("0.0.0.0:50051".parse()?).to_string(),
            "127.0.0.1:50051"
        );
        assert_eq!(reachable("[::]:7".parse()?).to_string(), "[::1]:7");
        assert_eq!(reachable("10.1.2.3:7".parse()?).to_string(), "10.1.2.3:7");
        Ok(())
    }
}
