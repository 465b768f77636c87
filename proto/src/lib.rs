//! Touchpoint's wire contract.
//!
//! `proto/touchpoint/v1/*.proto` compiled at build time (no protoc needed):
//! - [`v1::playbook_service_server`] / client: apply, get, list playbooks;
//! - [`v1::enrollment_service_server`] and [`v1::run_service_server`]: start, read, cancel runs;
//! - [`v1::dead_letter_service_server`]: list and retry runs that failed at a step;
//! - [`v1::worker_service_server`]: the worker stream (Hello, Task, TaskResult);
//! - [`adapter::v1::channel_adapter_client`] / server: external channel adapters
//!   (`proto/touchpoint/adapter/v1/adapter.proto`) that workers call for `kind = "grpc"`.
//!
//! [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection; [`security`] connects clients over
//! plaintext or TLS with a bearer token; [`telemetry`] sets up logs and trace export, and
//! [`metrics`] defines every Prometheus metric.

pub mod metrics;
pub mod security;
pub mod telemetry;

/// Generated messages and services of package `touchpoint.v1`.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    missing_debug_implementations
)]
pub mod v1 {
    tonic::include_proto!("touchpoint.v1");
}

/// Generated messages and services of package `touchpoint.adapter.v1`: the contract of
/// external channel adapters (`ChannelAdapter.Describe` / `Deliver`), which a worker's
/// `kind = "grpc"` channel calls.
pub mod adapter {
    /// Version 1 of the external adapter contract.
    #[allow(
        missing_docs,
        unreachable_pub,
        clippy::all,
        missing_debug_implementations
    )]
    pub mod v1 {
        tonic::include_proto!("touchpoint.adapter.v1");
    }
}

/// Encoded descriptors of every Touchpoint proto file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/touchpoint_descriptor.bin"));

/// Largest gRPC message either side accepts (16 MiB): bulk enrollment batches
/// and full run listings stay well below it.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// HTTP/2 flow-control windows of the worker stream, both ends (bytes). Larger than
/// hyper's defaults because h2 closes a connection (GOAWAY `too_many_data_frames`,
/// ENHANCE_YOUR_CALM) once too many small DATA frames wait unread, with a budget of half
/// the connection window: a burst's results (tens of thousands of small messages within
/// a second) broke the stream with the defaults.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// See [`CONNECTION_WINDOW_BYTES`].
pub const STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// Most tasks one worker may hold at once (`Hello.capacity`); a worker whose channels
/// add up to more announces this.
pub const MAX_WORKER_CAPACITY: u32 = 10_000;
/// Most tasks handed out ahead of their due time one worker may hold
/// (`Hello.hold_ahead`); a larger announcement counts as this.
pub const MAX_HOLD_AHEAD: u32 = 200_000;

/// A gRPC status for a log line: its code, its message, and the causes below it (a
/// broken stream's message alone, "h2 protocol error: error reading a body from
/// connection", does not say what broke it).
pub fn describe_status(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        // A status wrapping another repeats its message (and its Display lists its own
        // fields); the causes below it say the rest.
        let cause_text = cause.to_string();
        if cause.downcast_ref::<tonic::Status>().is_none() && !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::describe_status;

    #[test]
    fn a_status_is_described_with_its_causes_once_each() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "broken pipe");
        let status = tonic::Status::from_error(Box::new(io));
        assert_eq!(describe_status(&status), "Unknown: broken pipe");
        let plain = tonic::Status::unavailable("scheduler stopping");
        assert_eq!(describe_status(&plain), "Unavailable: scheduler stopping");
    }
}
