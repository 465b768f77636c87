//! A whole local system for one test: Redis (one server or a Redis Cluster), a webhook
//! receiver, a scheduler process and worker processes whose webhook channels all point at
//! the receiver.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use touchpoint_proto::v1::{
    ApplyPlaybookRequest, ApplyPlaybookResponse, Contact, EnrollRequest, EnrollResponse,
};
use touchpoint_scheduler::store::RedisConnection;

use crate::{
    ChannelConfig, RedisCluster, RedisServer, SchedulerNode, Security, TouchpointClient,
    WebhookReceiver, WorkerConfig, WorkerNode, generate_secret,
};

/// The environment variable the workers' webhook channels read their secret from.
pub const SECRET_ENV: &str = "TEST_WEBHOOK_SECRET";

/// The environment variable choosing what [`Stack::start`] runs on: `cluster` for a
/// three-primary Redis Cluster, `single` (or unset) for one `redis-server`.
pub const TEST_REDIS_ENV: &str = "TOUCHPOINT_TEST_REDIS";

/// The Redis a [`Stack`] runs on.
#[derive(Debug)]
pub enum TestRedis {
    /// One `redis-server`.
    Server(RedisServer),
    /// A Redis Cluster of three primaries.
    Cluster(RedisCluster),
}

impl TestRedis {
    /// What [`TEST_REDIS_ENV`] asks for.
    ///
    /// # Panics
    /// When it is set to something other than `single` or `cluster`.
    pub fn from_env() -> Self {
        match std::env::var(TEST_REDIS_ENV).as_deref() {
            Ok("cluster") => Self::Cluster(RedisCluster::start()),
            Ok("single" | "") | Err(_) => Self::Server(RedisServer::start()),
            Ok(other) => panic!("{TEST_REDIS_ENV}={other:?}: expected `single` or `cluster`"),
        }
    }

    /// The URL the scheduler takes (`redis://...` or `redis+cluster://...`).
    pub fn url(&self) -> String {
        match self {
            Self::Server(server) => server.url(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }

    /// A connection as the scheduler makes it, to look at keys directly.
    ///
    /// # Panics
    /// When Redis cannot be reached.
    pub async fn connection(&self) -> RedisConnection {
        RedisConnection::connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("connect to the test Redis: {e}"))
    }

    /// Kills Redis (every node of a cluster) with SIGKILL and starts it again on the same
    /// ports and data.
    pub fn restart(&mut self) {
        match self {
            Self::Server(server) => server.restart(),
            Self::Cluster(cluster) => cluster.restart(),
        }
    }

    /// The one server, for tests that only make sense on one (MONITOR, stopping it).
    ///
    /// # Panics
    /// On a cluster.
    pub fn server(&self) -> &RedisServer {
        match self {
            Self::Server(server) => server,
            Self::Cluster(_) => panic!("this test needs a single redis-server, not a cluster"),
        }
    }

    /// [`TestRedis::server`], to stop or restart it.
    ///
    /// # Panics
    /// On a cluster.
    pub fn server_mut(&mut self) -> &mut RedisServer {
        match self {
            Self::Server(server) => server,
            Self::Cluster(_) => panic!("this test needs a single redis-server, not a cluster"),
        }
    }
}

/// Redis (AOF on), a [`WebhookReceiver`], a scheduler and, once started, workers serving
/// `channels` as webhooks to the receiver, signed with [`Stack::secret`].
///
/// Fields drop in order: workers, scheduler, receiver, then Redis.
#[derive(Debug)]
pub struct Stack {
    pub workers: Vec<WorkerNode>,
    pub scheduler: SchedulerNode,
    pub client: TouchpointClient,
    pub receiver: WebhookReceiver,
    pub redis: TestRedis,
    /// The Standard Webhooks secret (`whsec_...`) the workers sign with.
    pub secret: String,
    bin: PathBuf,
    channels: Vec<String>,
    security: Security,
}

impl Stack {
    /// Starts Redis ([`TestRedis::from_env`]), the receiver and a scheduler (with
    /// `scheduler_flags` such as `["--lease", "2s"]`), waits until the scheduler answers,
    /// then starts worker `w-1` serving `channels` (none when `channels` is empty).
    pub async fn start(bin: impl AsRef<Path>, scheduler_flags: &[&str], channels: &[&str]) -> Self {
        Self::start_secured(bin, scheduler_flags, channels, Security::plaintext()).await
    }

    /// [`Stack::start`] on `redis`, whatever [`TEST_REDIS_ENV`] says.
    pub async fn start_on(
        redis: TestRedis,
        bin: impl AsRef<Path>,
        scheduler_flags: &[&str],
        channels: &[&str],
    ) -> Self {
        Self::launch(redis, bin, scheduler_flags, channels, Security::plaintext()).await
    }

    /// [`Stack::start`] secured as `security` says: the scheduler serves TLS and requires
    /// tokens accordingly, [`Stack::client`] connects as a `marketer`, and workers trust the
    /// CA (presenting the client certificate under mutual TLS) and send the `worker` token.
    pub async fn start_secured(
        bin: impl AsRef<Path>,
        scheduler_flags: &[&str],
        channels: &[&str],
        security: Security,
    ) -> Self {
        Self::launch(
            TestRedis::from_env(),
            bin,
            scheduler_flags,
            channels,
            security,
        )
        .await
    }

    async fn launch(
        redis: TestRedis,
        bin: impl AsRef<Path>,
        scheduler_flags: &[&str],
        channels: &[&str],
        security: Security,
    ) -> Self {
        let receiver = WebhookReceiver::start().await;
        let mut scheduler =
            SchedulerNode::start_secured(bin.as_ref(), &redis.url(), scheduler_flags, &security);
        let client = scheduler.client().await;
        let mut stack = Self {
            workers: Vec::new(),
            scheduler,
            client,
            receiver,
            redis,
            secret: generate_secret(),
            bin: bin.as_ref().to_path_buf(),
            channels: channels.iter().map(|&c| c.to_owned()).collect(),
            security,
        };
        if !channels.is_empty() {
            stack.start_worker("w-1");
        }
        stack
    }

    /// The `worker.toml` every worker of this stack gets: one webhook channel to the
    /// receiver per channel name.
    pub fn worker_config(&self) -> WorkerConfig {
        self.channels
            .iter()
            .fold(WorkerConfig::new(), |config, name| {
                config.channel(ChannelConfig::webhook(
                    name,
                    &self.receiver.url(),
                    SECRET_ENV,
                ))
            })
    }

    /// Starts another worker process with `worker_id` (with the `worker` token when the
    /// stack requires tokens).
    pub fn start_worker(&mut self, worker_id: &str) -> &mut WorkerNode {
        let token = self.security.token("worker");
        self.start_worker_with_token(worker_id, token.as_deref())
    }

    /// Starts another worker process with `worker_id` sending `token` (or none).
    pub fn start_worker_with_token(
        &mut self,
        worker_id: &str,
        token: Option<&str>,
    ) -> &mut WorkerNode {
        let worker = WorkerNode::start_secured(
            &self.bin,
            &self.scheduler.endpoint(),
            worker_id,
            &self.worker_config(),
            &[(SECRET_ENV, &self.secret)],
            &self.security,
            token,
        );
        self.workers.push(worker);
        self.workers.last_mut().expect("just pushed")
    }

    /// The worker started with `worker_id`.
    ///
    /// # Panics
    /// When there is none.
    pub fn worker(&mut self, worker_id: &str) -> &mut WorkerNode {
        self.workers
            .iter_mut()
            .find(|w| w.worker_id() == worker_id)
            .unwrap_or_else(|| panic!("no worker {worker_id}"))
    }

    /// Kills the scheduler with SIGKILL, starts it again on the same port and reconnects
    /// [`Stack::client`].
    pub async fn restart_scheduler(&mut self) {
        self.scheduler.kill9();
        self.scheduler.restart();
        self.client = self.scheduler.client().await;
    }

    /// `ApplyPlaybook` (not a dry run), panicking on error.
    pub async fn apply(&mut self, yaml: &str) -> ApplyPlaybookResponse {
        self.client
            .playbooks
            .apply_playbook(ApplyPlaybookRequest {
                yaml: yaml.to_owned(),
                dry_run: false,
            })
            .await
            .unwrap_or_else(|e| panic!("ApplyPlaybook failed: {e}"))
            .into_inner()
    }

    /// `Enroll`, panicking on error.
    pub async fn enroll(
        &mut self,
        playbook: &str,
        contact: Contact,
        request_id: &str,
    ) -> EnrollResponse {
        self.client
            .enrollments
            .enroll(EnrollRequest {
                playbook: playbook.to_owned(),
                contact: Some(contact),
                request_id: request_id.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("Enroll {playbook} failed: {e}"))
            .into_inner()
    }
}

/// A contact with attributes and tags (no time zone, no identities).
pub fn contact(id: &str, attrs: &[(&str, &str)], tags: &[&str]) -> Contact {
    Contact {
        id: id.to_owned(),
        attrs: to_map(attrs),
        tags: tags.iter().map(|&t| t.to_owned()).collect(),
        tz: String::new(),
        identities: HashMap::new(),
    }
}

/// `[("k", "v")]` as a map.
pub fn to_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|&(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A fresh request id (UUIDv4), as AIP-155 suggests.
pub fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// `examples/welcome.yaml` from the repository, with its `wait: 3d` replaced by
/// `wait: <wait>` so a test does not wait three days.
///
/// # Panics
/// When the example no longer has a `wait: 3d` step.
pub fn welcome_yaml(wait: &str) -> String {
    const WELCOME: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/welcome.yaml"
    ));
    assert_eq!(
        WELCOME.matches("wait: 3d").count(),
        1,
        "examples/welcome.yaml should have exactly one `wait: 3d` step"
    );
    WELCOME.replace("wait: 3d", &format!("wait: {wait}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_journey_gets_a_short_wait() {
        let yaml = welcome_yaml("2s");
        assert!(yaml.contains("name: welcome-new-customer"));
        assert!(yaml.contains("    wait: 2s\n"));
        assert!(!yaml.contains("3d\n"));
    }
}
