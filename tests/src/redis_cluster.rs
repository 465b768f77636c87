//! A real Redis Cluster per test: three primaries on free loopback ports.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::RedisServer;

/// How long a new (or restarted) cluster may take to serve every slot.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A Redis Cluster of three primaries and no replicas, made with `redis-cli --cluster
/// create`: each node a [`RedisServer`] (AOF on, `noeviction`, its own data folder) on
/// a free port whose cluster bus port (+10000) is free too.
///
/// Dropping it kills every node.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three nodes, creates the cluster (the 16384 slots split evenly between
    /// them) and waits until every node reports `cluster_state:ok`.
    ///
    /// # Panics
    /// When `redis-server` or `redis-cli` is missing, or the cluster is not ready
    /// within 30 s.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_cluster_node()).collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-cli (Debian/Ubuntu package `redis-tools`): {e}")
            });
        assert!(
            created.status.success(),
            "redis-cli --cluster create {} failed:\n{}{}",
            addresses.join(" "),
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_until_ready();
        cluster
    }

    /// `redis+cluster://127.0.0.1:<p1>,127.0.0.1:<p2>,127.0.0.1:<p3>`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// The primaries (to ask one of them directly, e.g. `DBSIZE`).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Kills every node with SIGKILL and starts them again on the same ports and data
    /// (AOF and `nodes.conf`), waiting until the cluster serves every slot again.
    pub fn restart(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        for node in &mut self.nodes {
            node.restart();
        }
        self.wait_until_ready();
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        for node in &self.nodes {
            loop {
                let state = cluster_info(node);
                if state.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the Redis Cluster node on port {} is not ready within {READY_TIMEOUT:?}:\n{state}",
                    node.port()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `CLUSTER INFO` of one node (or why it could not be read).
fn cluster_info(node: &RedisServer) -> String {
    let answer = node
        .client()
        .get_connection()
        .and_then(|mut conn| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut conn));
    answer.unwrap_or_else(|e| format!("CLUSTER INFO failed: {e}"))
}
