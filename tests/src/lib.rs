//! Touchpoint's test harness: real parts, no mocks.
//!
//! End-to-end suites in `tests/tests/` and the store tests of other crates build on:
//! - [`RedisServer`]: a `redis-server` from `PATH` on a free loopback port, with its own
//!   temporary data folder, that can be killed and restarted on the same port and folder;
//! - [`RedisCluster`]: three such servers made a Redis Cluster (`redis-cli --cluster create`);
//! - [`Process`]: a child process (usually `touchpoint-node`) whose output goes to a log file,
//!   killed with SIGKILL on drop (and whose log tail is printed when a test panics);
//! - [`SchedulerNode`] and [`WorkerNode`]: a scheduler or worker running as a real process of
//!   the `touchpoint-node` binary, with [`WorkerConfig`] writing its `worker.toml`;
//! - [`TouchpointClient`]: the scheduler's gRPC clients, connected with retries, over
//!   plaintext or TLS, with a bearer token ([`ClientOptions`]);
//! - [`Security`]: TLS (a throwaway PKI, [`TestPki`]) and one token per role
//!   ([`TestTokens`]) for a scheduler, its workers and its clients;
//! - [`WebhookReceiver`]: a real HTTP server recording every delivery, with scripted answers,
//!   and [`verify_signature`], a Standard Webhooks verifier written independently of the worker;
//! - [`OtlpReceiver`]: an in-process OpenTelemetry collector (OTLP gRPC and HTTP) keeping
//!   every span the processes export;
//! - [`SmsServer`] (Aliyun-compatible, verifying signatures, and a generic gateway),
//!   [`SmtpServer`] (aiosmtpd with STARTTLS or implicit TLS) and [`PythonAdapter`] (an
//!   external gRPC channel adapter in Python, from a venv [`python`] makes once);
//! - [`eventually`]: polling instead of sleeping;
//! - [`TcpProxy`]: a TCP proxy to cut and restore, a network failure between two processes;
//! - [`Stack`]: all of the above for one test (Redis, receiver, scheduler, workers) on one
//!   server or, with `TOUCHPOINT_TEST_REDIS=cluster`, a Redis Cluster ([`TestRedis`]), and
//!   [`welcome_yaml`], the repository's example journey with a short wait.
//! - [`soak`]: the bounded chaos soak behind the `touchpoint-soak` binary (not run by
//!   `cargo test`).
//!
//! Every helper starts its own resources on free ports, so tests run in parallel.

mod client;
mod eventually;
mod metrics;
mod node;
mod otlp;
mod ports;
mod process;
mod proxy;
pub mod python;
mod raw_worker;
mod receiver;
mod redis_cluster;
mod redis_server;
mod security;
mod signature;
pub mod sms_server;
pub mod smtp_server;
pub mod soak;
mod stack;
pub mod wecom_server;

pub use client::{Authorized, Credentials, TouchpointClient, run_summary};
pub use eventually::{eventually, eventually_some, stays};
pub use metrics::{gauge, scrape};
pub use node::{ChannelConfig, SchedulerNode, WorkerConfig, WorkerNode};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use ports::free_port;
pub use process::Process;
pub use proxy::TcpProxy;
pub use python::PythonAdapter;
pub use raw_worker::{RawWorker, next_message};
pub use receiver::{ReceivedRequest, Reply, WebhookReceiver};
pub use redis_cluster::RedisCluster;
pub use redis_server::RedisServer;
pub use security::{ClientOptions, ROLES, Security, TestPki, TestTokens, sha256_hex};
pub use signature::{generate_secret, sign, verify_signature};
pub use sms_server::SmsServer;
pub use smtp_server::{SmtpServer, SmtpTls};
pub use stack::{
    SECRET_ENV, Stack, TEST_REDIS_ENV, TestRedis, contact, request_id, to_map, welcome_yaml,
};
pub use wecom_server::{CallbackSender, WecomServer, generate_encoding_aes_key};
