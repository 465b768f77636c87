//! Schedulers and workers as real processes of the `touchpoint-node` binary.
//!
//! Integration tests pass the binary's path: `env!("CARGO_BIN_EXE_touchpoint-node")`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tempfile::TempDir;

use crate::{ClientOptions, Process, Security, TouchpointClient, free_port};

/// How long a starting scheduler may take to answer.
const SCHEDULER_START_TIMEOUT: Duration = Duration::from_secs(20);

/// `touchpoint-node scheduler --redis-url URL --listen 127.0.0.1:PORT [extra...]` on a free
/// port. It can be killed with SIGKILL and started again on the same port.
#[derive(Debug)]
pub struct SchedulerNode {
    bin: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    port: u16,
    process: Process,
    security: Security,
}

/// The role [`SchedulerNode::client`] connects as when the scheduler requires tokens: it
/// may apply, enroll, read and cancel runs and retry dead letters.
const CLIENT_ROLE: &str = "marketer";

impl SchedulerNode {
    /// Starts a scheduler on a free port against `redis_url`, with `extra` flags such as
    /// `["--lease", "2s"]`. Does not wait for it: [`SchedulerNode::client`] does.
    pub fn start(bin: impl AsRef<Path>, redis_url: &str, extra: &[&str]) -> Self {
        Self::start_secured(bin, redis_url, extra, &Security::plaintext())
    }

    /// [`SchedulerNode::start`] with extra environment `envs` (e.g. `OTEL_*`), kept for
    /// [`SchedulerNode::restart`].
    pub fn start_with_env(
        bin: impl AsRef<Path>,
        redis_url: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Self {
        Self::launch(bin.as_ref(), redis_url, extra, &Security::plaintext(), envs)
    }

    /// [`SchedulerNode::start`] with TLS and tokens as `security` says; its
    /// [`SchedulerNode::client`] then connects over TLS as a `marketer`.
    pub fn start_secured(
        bin: impl AsRef<Path>,
        redis_url: &str,
        extra: &[&str],
        security: &Security,
    ) -> Self {
        Self::launch(bin.as_ref(), redis_url, extra, security, &[])
    }

    fn launch(
        bin: &Path,
        redis_url: &str,
        extra: &[&str],
        security: &Security,
        envs: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let mut args = vec![
            "scheduler".to_owned(),
            "--redis-url".to_owned(),
            redis_url.to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(security.scheduler_flags());
        args.extend(extra.iter().map(|&a| a.to_owned()));
        let bin = bin.to_path_buf();
        let process = Process::spawn_named("scheduler", &bin, &args, envs);
        Self {
            bin,
            args,
            envs: envs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            port,
            process,
            security: security.clone(),
        }
    }

    /// `http://127.0.0.1:<port>`, or `https://` with TLS.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.security.scheme(), self.port)
    }

    /// How it was secured.
    pub fn security(&self) -> &Security {
        &self.security
    }

    /// The gRPC port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connects, retrying until the scheduler answers.
    ///
    /// # Panics
    /// When the process exits or does not answer within 20 s (its log tail is printed).
    pub async fn client(&mut self) -> TouchpointClient {
        let options = self.security.client(CLIENT_ROLE);
        self.client_with(&options).await
    }

    /// [`SchedulerNode::client`] with other settings (a role that may call `ListPlaybooks`).
    ///
    /// # Panics
    /// When the process exits or does not answer within 20 s (its log tail is printed).
    pub async fn client_with(&mut self, options: &ClientOptions) -> TouchpointClient {
        let deadline = Instant::now() + SCHEDULER_START_TIMEOUT;
        loop {
            let error = match TouchpointClient::try_connect_with(&self.endpoint(), options).await {
                Ok(client) => return client,
                Err(e) => e,
            };
            assert!(
                self.process.is_running(),
                "the scheduler exited instead of serving {}: {error}",
                self.endpoint()
            );
            assert!(
                Instant::now() < deadline,
                "the scheduler at {} did not answer within {SCHEDULER_START_TIMEOUT:?}: {error}",
                self.endpoint()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the scheduler with SIGKILL (no shutdown, no cleanup).
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Stops the scheduler with SIGTERM and waits for it to exit (see
    /// [`Process::terminate`]).
    pub async fn terminate(&mut self) {
        self.process.terminate().await;
    }

    /// Starts it again with the same flags and port (after [`SchedulerNode::kill9`]).
    pub fn restart(&mut self) {
        self.process.kill9();
        let envs: Vec<(&str, &str)> = self
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.process.respawn(&self.bin, &self.args, &envs);
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The process (for its log, or to [`Process::freeze`] it).
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// `touchpoint-node worker --config <tmp>/worker.toml --server URL --worker-id ID`.
#[derive(Debug)]
pub struct WorkerNode {
    worker_id: String,
    process: Process,
    config_path: PathBuf,
    _config_dir: TempDir,
}

impl WorkerNode {
    /// Writes `config` (with `server = server`) to a temporary `worker.toml` and starts a
    /// worker on it with extra environment `envs` (the channels' secrets).
    pub fn start(
        bin: impl AsRef<Path>,
        server: &str,
        worker_id: &str,
        config: &WorkerConfig,
        envs: &[(&str, &str)],
    ) -> Self {
        Self::start_secured(
            bin,
            server,
            worker_id,
            config,
            envs,
            &Security::plaintext(),
            None,
        )
    }

    /// [`WorkerNode::start`] trusting `security`'s CA (with its client certificate under
    /// mutual TLS) and, given a `token`, sending it (from `TOUCHPOINT_TOKEN`).
    pub fn start_secured(
        bin: impl AsRef<Path>,
        server: &str,
        worker_id: &str,
        config: &WorkerConfig,
        envs: &[(&str, &str)],
        security: &Security,
        token: Option<&str>,
    ) -> Self {
        let config_dir = tempfile::Builder::new()
            .prefix("touchpoint-worker-config-")
            .tempdir()
            .expect("create a temporary config folder");
        let config_path = config_dir.path().join("worker.toml");
        std::fs::write(&config_path, config.to_toml(server)).expect("write worker.toml");
        let config_arg = config_path.to_string_lossy().into_owned();
        let mut args: Vec<String> = [
            "worker",
            "--config",
            &config_arg,
            "--server",
            server,
            "--worker-id",
            worker_id,
        ]
        .iter()
        .map(|&a| a.to_owned())
        .collect();
        args.extend(security.worker_flags());
        let mut envs = envs.to_vec();
        if let Some(token) = token {
            envs.push(("TOUCHPOINT_TOKEN", token));
        }
        let process = Process::spawn_named(worker_id, bin.as_ref(), &args, &envs);
        Self {
            worker_id: worker_id.to_owned(),
            process,
            config_path,
            _config_dir: config_dir,
        }
    }

    /// The `--worker-id` it was started with.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Where its `worker.toml` is.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Kills the worker with SIGKILL (whatever it was delivering is left unreported).
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// The process (for its log, or to [`Process::freeze`] it).
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// One `[[channel]]` of a `worker.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelConfig {
    /// `kind = "webhook"`.
    Webhook {
        name: String,
        url: String,
        /// Name of the environment variable holding the Standard Webhooks secret.
        secret_env: Option<String>,
        /// e.g. `"30s"`.
        timeout: String,
        /// `rate = "10/s"` (the provider's quota), when set.
        rate: Option<String>,
        /// `burst = 1`, when set.
        burst: Option<u32>,
    },
    /// `kind = "log"`.
    Log { name: String },
    /// `kind = "wecom"`, with its settings as written (`corp_id`, `secret_env`,
    /// `base_url`, `callback_listen`, ...), in order.
    Wecom {
        name: String,
        settings: Vec<(String, String)>,
    },
    /// Any other kind (`sms`, `smtp`, `grpc`, ...), its settings written as given: TOML
    /// lines such as `port = 2525` or `fields = { to = "{phone}" }`.
    Raw {
        name: String,
        kind: String,
        toml: String,
    },
}

impl ChannelConfig {
    /// A webhook channel to `url`, signed with the secret in `secret_env`, timeout 30 s.
    pub fn webhook(name: &str, url: &str, secret_env: &str) -> Self {
        Self::Webhook {
            name: name.to_owned(),
            url: url.to_owned(),
            secret_env: Some(secret_env.to_owned()),
            timeout: "30s".to_owned(),
            rate: None,
            burst: None,
        }
    }

    /// The same channel with `rate = <rate>` (e.g. `"10/s"`) and, when given, `burst`
    /// (a log channel takes neither).
    #[must_use]
    pub fn with_rate(mut self, rate: &str, burst: Option<u32>) -> Self {
        if let Self::Webhook {
            rate: r, burst: b, ..
        } = &mut self
        {
            *r = Some(rate.to_owned());
            *b = burst;
        }
        self
    }

    /// A log channel.
    pub fn log(name: &str) -> Self {
        Self::Log {
            name: name.to_owned(),
        }
    }

    /// A channel of `kind` whose settings are the TOML lines `toml`.
    pub fn raw(name: &str, kind: &str, toml: &str) -> Self {
        Self::Raw {
            name: name.to_owned(),
            kind: kind.to_owned(),
            toml: toml.to_owned(),
        }
    }

    /// A wecom channel with `settings` (string values), e.g. `[("corp_id", "ww1")]`.
    pub fn wecom(name: &str, settings: &[(&str, &str)]) -> Self {
        Self::Wecom {
            name: name.to_owned(),
            settings: settings
                .iter()
                .map(|&(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
        }
    }
}

/// A `worker.toml` as SPEC describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    pub concurrency: u32,
    pub channels: Vec<ChannelConfig>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            channels: Vec::new(),
        }
    }
}

impl WorkerConfig {
    /// No channels, concurrency 16.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a channel.
    #[must_use]
    pub fn channel(mut self, channel: ChannelConfig) -> Self {
        self.channels.push(channel);
        self
    }

    /// The TOML text, with `server = server`.
    pub fn to_toml(&self, server: &str) -> String {
        let mut out = format!(
            "server = {}\nconcurrency = {}\n",
            toml_str(server),
            self.concurrency
        );
        for channel in &self.channels {
            out.push_str("\n[[channel]]\n");
            match channel {
                ChannelConfig::Webhook {
                    name,
                    url,
                    secret_env,
                    timeout,
                    rate,
                    burst,
                } => {
                    out.push_str(&format!("name = {}\nkind = \"webhook\"\n", toml_str(name)));
                    out.push_str(&format!("url = {}\n", toml_str(url)));
                    if let Some(env) = secret_env {
                        out.push_str(&format!("secret_env = {}\n", toml_str(env)));
                    }
                    out.push_str(&format!("timeout = {}\n", toml_str(timeout)));
                    if let Some(rate) = rate {
                        out.push_str(&format!("rate = {}\n", toml_str(rate)));
                    }
                    if let Some(burst) = burst {
                        out.push_str(&format!("burst = {burst}\n"));
                    }
                }
                ChannelConfig::Log { name } => {
                    out.push_str(&format!("name = {}\nkind = \"log\"\n", toml_str(name)));
                }
                ChannelConfig::Raw { name, kind, toml } => {
                    out.push_str(&format!(
                        "name = {}\nkind = {}\n{}\n",
                        toml_str(name),
                        toml_str(kind),
                        toml.trim_end()
                    ));
                }
                ChannelConfig::Wecom { name, settings } => {
                    out.push_str(&format!("name = {}\nkind = \"wecom\"\n", toml_str(name)));
                    for (key, value) in settings {
                        out.push_str(&format!("{key} = {}\n", toml_str(value)));
                    }
                }
            }
        }
        out
    }
}

/// A TOML basic string (JSON's escapes are valid TOML escapes).
fn toml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_worker_toml_of_spec() {
        let config = WorkerConfig::new()
            .channel(ChannelConfig::webhook(
                "wecom",
                "http://127.0.0.1:8099/hook",
                "TEST_WEBHOOK_SECRET",
            ))
            .channel(ChannelConfig::log("console"));
        assert_eq!(
            config.to_toml("http://127.0.0.1:50051"),
            "server = \"http://127.0.0.1:50051\"\nconcurrency = 16\n\
             \n[[channel]]\nname = \"wecom\"\nkind = \"webhook\"\n\
             url = \"http://127.0.0.1:8099/hook\"\nsecret_env = \"TEST_WEBHOOK_SECRET\"\n\
             timeout = \"30s\"\n\
             \n[[channel]]\nname = \"console\"\nkind = \"log\"\n"
        );
    }
}
