//! Where Touchpoint's state lives: one Redis server or a Redis Cluster, chosen by the
//! URL's scheme.
//!
//! - `redis://[user:password@]host:port[/db]`: one server.
//! - `redis+cluster://[user:password@]host:port[,host:port...]`: a Redis Cluster, reached
//!   through any of the seed nodes listed; the user and password apply to every node.
//!
//! `rediss://` and `rediss+cluster://` ask for TLS (rustls): Redis's certificate is
//! checked against the system's roots, or the CA of [`RedisTls::ca_pem`]; with a client
//! certificate and key, the connection is mutual TLS (`tls-auth-clients yes`).
//!
//! Every script keeps to one hash slot by construction (see [`super::keys`]), so scripts
//! and single-key commands run alike on both. What differs is a batch of commands whose
//! keys span slots: [`RedisConnection::query_each`] sends it as one pipeline to a single
//! server and command by command, concurrently, to a cluster.

use std::time::Duration;

use futures::future::try_join_all;
use redis::{
    Cmd, ConnectionInfo, IntoConnectionInfo, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};

use super::{Error, Result};

/// The URL forms the scheduler takes, for error messages.
pub const URL_FORMS: &str = "redis://[user:password@]host:port[/db] for one Redis, or \
     redis+cluster://[user:password@]host:port[,host:port...] for a Redis Cluster";

const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How TLS connections (`rediss://`) check Redis and prove who they are.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// PEM of the CA that signed Redis's certificate (default: the system's roots).
    pub ca_pem: Option<Vec<u8>>,
    /// PEM of a client certificate and its key, for Redis that asks for one.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca_pem", &self.ca_pem.is_some())
            .field("client_pem", &self.client_pem.is_some())
            .finish()
    }
}

impl RedisTls {
    /// Reads the PEM files (any may be absent; a client certificate needs its key).
    ///
    /// # Errors
    /// [`Error::Config`] naming the file that cannot be read, or the one missing.
    pub fn from_files(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
    ) -> Result<Self> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                Error::Config(format!("reading the Redis {what} {}: {e}", path.display()))
            })
        };
        let client_pem = match (cert, key) {
            (Some(cert), Some(key)) => {
                Some((read(cert, "client certificate")?, read(key, "client key")?))
            }
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "a Redis client certificate needs its key, and a key its certificate"
                        .to_owned(),
                ));
            }
        };
        Ok(Self {
            ca_pem: ca.map(|ca| read(ca, "CA file")).transpose()?,
            client_pem,
        })
    }

    fn is_default(&self) -> bool {
        self.ca_pem.is_none() && self.client_pem.is_none()
    }

    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self
                .client_pem
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca_pem.clone(),
        }
    }

    /// A client for one node, with these settings when they say anything.
    fn client(&self, node: ConnectionInfo) -> RedisResult<redis::Client> {
        if self.is_default() {
            redis::Client::open(node)
        } else {
            redis::Client::build_with_tls(node, self.certificates())
        }
    }
}

/// Where Redis is: its URL (see [`URL_FORMS`]) and, for `rediss://`, how to trust it.
#[derive(Clone, Debug)]
pub struct RedisEndpoint {
    pub url: String,
    pub tls: RedisTls,
}

impl From<&str> for RedisEndpoint {
    fn from(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            tls: RedisTls::default(),
        }
    }
}

impl From<&String> for RedisEndpoint {
    fn from(url: &String) -> Self {
        url.as_str().into()
    }
}

/// A connection to one Redis server (reconnecting when it drops) or to a Redis Cluster
/// (commands go to their slot's primary, following `MOVED` and `ASK`). Cheap to clone:
/// clones share the connection.
#[derive(Clone)]
pub enum RedisConnection {
    /// One server.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConnection::Single",
            Self::Cluster(_) => "RedisConnection::Cluster",
        })
    }
}

/// What a Redis URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// One server: the URL as given.
    Single(String),
    /// A cluster's seed nodes as `redis://` (or `rediss://`) URLs; only the first carries
    /// the user, password and query.
    Cluster(Vec<String>),
}

impl RedisConnection {
    /// Connects to the Redis (or Redis Cluster) `url` names.
    ///
    /// # Errors
    /// [`Error::Config`] for a URL that is not one of [`URL_FORMS`] (the message never
    /// repeats the password); [`Error::Redis`] when Redis cannot be reached.
    pub async fn connect(endpoint: impl Into<RedisEndpoint>) -> Result<Self> {
        let RedisEndpoint { url, tls } = endpoint.into();
        match parse(&url).map_err(|why| bad_url(&why))? {
            Target::Single(url) => {
                let node = url
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| bad_url(&e.to_string()))?;
                let client = tls.client(node).map_err(|e| bad_url(&e.to_string()))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECTION_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(2);
                Ok(Self::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            Target::Cluster(nodes) => {
                let client = cluster_client(&nodes, &tls)?;
                Ok(Self::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// Answers `commands` in order, each command's keys in one hash slot but different
    /// commands' possibly not: one pipeline on a single server; on a cluster, every
    /// command at once, each to its slot's primary (the cluster connection pipelines
    /// what goes to one node). Not atomic on either.
    ///
    /// # Errors
    /// The first command's error, or the connection's.
    pub async fn query_each(&self, commands: Vec<Cmd>) -> RedisResult<Vec<Value>> {
        match self {
            Self::Single(conn) => {
                if commands.is_empty() {
                    return Ok(Vec::new());
                }
                let mut pipe = redis::pipe();
                for command in commands {
                    pipe.add_command(command);
                }
                pipe.query_async(&mut conn.clone()).await
            }
            Self::Cluster(conn) => {
                try_join_all(commands.into_iter().map(|command| {
                    let mut conn = conn.clone();
                    async move { command.query_async::<Value>(&mut conn).await }
                }))
                .await
            }
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    /// A pipeline goes to one node: on a cluster, all its keys must share one slot
    /// (else Redis Cluster answers `CROSSSLOT`; see [`RedisConnection::query_each`]).
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Subscribes to `channel` on the Redis `url` names (on a cluster, the first seed node
/// that answers: a cluster forwards every `PUBLISH` to all its nodes).
///
/// # Errors
/// [`Error::Config`] for a bad URL; [`Error::Redis`] when no node can be reached.
pub async fn subscribe(
    endpoint: &RedisEndpoint,
    channel: &str,
) -> Result<redis::aio::PubSubStream> {
    let nodes = match parse(&endpoint.url).map_err(|why| bad_url(&why))? {
        Target::Single(url) => vec![
            url.as_str()
                .into_connection_info()
                .map_err(|e| bad_url(&e.to_string()))?,
        ],
        Target::Cluster(nodes) => seed_nodes(&nodes)?,
    };
    let mut last_error = None;
    for node in nodes {
        let attempt = async {
            let client = endpoint.tls.client(node)?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            RedisResult::Ok(pubsub.into_on_message())
        };
        match tokio::time::timeout(CONNECTION_TIMEOUT, attempt).await {
            Ok(Ok(messages)) => return Ok(messages),
            Ok(Err(err)) => last_error = Some(Error::Redis(err)),
            Err(_) => {
                let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "subscribing");
                last_error = Some(Error::Redis(timed_out.into()));
            }
        }
    }
    Err(last_error.unwrap_or_else(|| bad_url("no node")))
}

fn bad_url(why: &str) -> Error {
    Error::Config(format!("invalid Redis URL: {why}; expected {URL_FORMS}"))
}

/// What `url` names. Errors say what is wrong without repeating the user or password.
fn parse(url: &str) -> std::result::Result<Target, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("no scheme".to_owned());
    };
    let node_scheme = match scheme {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        _ => return Ok(Target::Single(url.to_owned())),
    };
    // The authority ends at the path or query; the user and password end at its last '@'.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path_and_query) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    if path.contains('#') || query.is_some_and(|q| q.contains('#')) {
        return Err("a cluster URL takes no #fragment".to_owned());
    }
    if !matches!(path, "" | "/" | "/0") {
        return Err(format!(
            "Redis Cluster has only database 0, not {:?}",
            path.trim_start_matches('/')
        ));
    }
    if hosts.is_empty() {
        return Err("no host in the cluster URL".to_owned());
    }
    let mut nodes = Vec::new();
    for (i, host) in hosts.split(',').enumerate() {
        if host.is_empty() {
            return Err(format!("seed node {} is empty", i + 1));
        }
        if host.contains(['@', ' ']) {
            return Err(format!("seed node {} is not host:port", i + 1));
        }
        let node = match (i, userinfo) {
            (0, Some(userinfo)) => format!("{node_scheme}://{userinfo}@{host}"),
            _ => format!("{node_scheme}://{host}"),
        };
        nodes.push(match (i, query) {
            (0, Some(query)) => format!("{node}/?{query}"),
            _ => node,
        });
    }
    Ok(Target::Cluster(nodes))
}

/// A cluster client for `nodes` (as [`parse`] gives them).
fn cluster_client(nodes: &[String], tls: &RedisTls) -> Result<redis::cluster::ClusterClient> {
    let mut builder = ClusterClientBuilder::new(seed_nodes(nodes)?)
        .connection_timeout(CONNECTION_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT);
    if !tls.is_default() {
        builder = builder.certs(tls.certificates());
    }
    builder.build().map_err(|e| bad_url(&e.to_string()))
}

/// The seed nodes' connection settings, each with the first node's user, password and
/// protocol.
fn seed_nodes(nodes: &[String]) -> Result<Vec<ConnectionInfo>> {
    let mut infos = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let info = node.as_str().into_connection_info().map_err(|e| {
            bad_url(&format!(
                "seed node {} ({}): {e}",
                i + 1,
                node_address(node)
            ))
        })?;
        infos.push(info);
    }
    let settings = infos
        .first()
        .map(|first| first.redis_settings().clone())
        .ok_or_else(|| bad_url("no seed node"))?;
    Ok(infos
        .into_iter()
        .map(|info| info.set_redis_settings(settings.clone()))
        .collect())
}

/// `host:port` of a node URL, without its user and password.
fn node_address(node: &str) -> &str {
    let rest = node.split_once("://").map_or(node, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, hosts)| hosts);
    rest.split(['/', '?']).next().unwrap_or(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(url: &str) -> Vec<String> {
        match parse(url) {
            Ok(Target::Cluster(nodes)) => nodes,
            other => panic!("{url}: {other:?}"),
        }
    }

    fn refused(url: &str) -> String {
        match parse(url) {
            Err(why) => bad_url(&why).to_string(),
            Ok(target) => panic!("{url} was taken: {target:?}"),
        }
    }

    #[test]
    fn single_server_urls_pass_through() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "rediss://user:pw@redis.example:6380/2",
            "redis+unix:///run/redis.sock",
        ] {
            assert_eq!(parse(url), Ok(Target::Single(url.to_owned())));
        }
    }

    #[test]
    fn cluster_urls_list_their_seed_nodes() {
        assert_eq!(
            cluster("redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002"),
            [
                "redis://127.0.0.1:7000",
                "redis://127.0.0.1:7001",
                "redis://127.0.0.1:7002"
            ]
        );
        assert_eq!(
            cluster("redis+cluster://redis-0:6379/"),
            ["redis://redis-0:6379"]
        );
        assert_eq!(
            cluster("redis+cluster://redis-0:6379/0"),
            ["redis://redis-0:6379"]
        );
        assert_eq!(
            cluster("redis+cluster://[::1]:7000"),
            ["redis://[::1]:7000"]
        );
    }

    #[test]
    fn the_first_authority_carries_credentials_and_settings_for_all() {
        assert_eq!(
            cluster("rediss+cluster://app:s%40cret@a:7000,b:7001?protocol=resp3"),
            [
                "rediss://app:s%40cret@a:7000/?protocol=resp3",
                "rediss://b:7001"
            ]
        );
    }

    #[test]
    fn credentials_reach_every_node() {
        let nodes = seed_nodes(&cluster("redis+cluster://app:s%40cret@a:7000,b:7001"))
            .expect("valid seed nodes");
        assert_eq!(nodes.len(), 2);
        for node in &nodes {
            assert_eq!(node.redis_settings().username(), Some("app"));
            assert_eq!(node.redis_settings().password(), Some("s@cret"));
        }
        let nodes = cluster("redis+cluster://app:pw@a:7000,b:7001");
        assert!(cluster_client(&nodes, &RedisTls::default()).is_ok());
    }

    #[test]
    fn bad_cluster_urls_say_what_is_wrong_and_the_expected_form() {
        for (url, why) in [
            ("127.0.0.1:7000", "no scheme"),
            ("redis+cluster://", "no host"),
            ("redis+cluster://app:hunter2@", "no host"),
            ("redis+cluster://a:7000,,b:7001", "seed node 2 is empty"),
            ("redis+cluster://a:7000/3", "only database 0"),
            ("redis+cluster://a:7000#insecure", "no #fragment"),
        ] {
            let message = refused(url);
            assert!(message.contains(why), "{url}: {message}");
            assert!(message.contains("redis+cluster://[user:password@]host:port[,host:port...]"));
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn a_bad_seed_node_is_named_without_the_password() {
        let nodes = cluster("redis+cluster://app:hunter2@a:notaport,b:7001");
        let message = seed_nodes(&nodes)
            .map(|_| ())
            .expect_err("a port that is not a number")
            .to_string();
        assert!(message.contains("seed node 1 (a:notaport)"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
    }

    #[tokio::test]
    async fn a_bad_single_server_url_names_the_expected_forms() {
        let message = RedisConnection::connect("http://127.0.0.1:6379")
            .await
            .map(|_| ())
            .expect_err("not a Redis scheme")
            .to_string();
        assert!(message.starts_with("invalid Redis URL: "), "{message}");
        assert!(message.contains(URL_FORMS), "{message}");
    }

    /// A client certificate needs its key; an unreadable file is named.
    #[test]
    fn tls_files_are_checked() {
        let missing = std::path::Path::new("/nonexistent/redis-ca.pem");
        let message = RedisTls::from_files(Some(missing), None, None)
            .expect_err("no such file")
            .to_string();
        assert!(
            message.contains("Redis CA file /nonexistent/redis-ca.pem"),
            "{message}"
        );
        let message = RedisTls::from_files(None, Some(missing), None)
            .expect_err("no key")
            .to_string();
        assert!(message.contains("needs its key"), "{message}");
        let none = RedisTls::from_files(None, None, None).expect("nothing to read");
        assert!(none.is_default());
        assert_eq!(
            format!("{none:?}"),
            "RedisTls { ca_pem: false, client_pem: false }"
        );
    }
}
