//! The scheduler's gRPC clients, connected with retries, and run helpers.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use tonic::{
    Request, Status,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use touchpoint_proto::{
    security::{self, BearerToken},
    v1::{
        self, GetRunRequest, Run, RunStatus, contact_service_client::ContactServiceClient,
        dead_letter_service_client::DeadLetterServiceClient,
        enrollment_service_client::EnrollmentServiceClient,
        event_service_client::EventServiceClient, playbook_service_client::PlaybookServiceClient,
        policy_service_client::PolicyServiceClient, run_service_client::RunServiceClient,
        worker_service_client::WorkerServiceClient,
    },
};

use crate::ClientOptions;

/// A channel that adds the bearer token (if any) to every call.
pub type Authorized = InterceptedService<Channel, Credentials>;

/// Adds `authorization: Bearer <token>` to every call when there is a token.
#[derive(Debug, Clone, Default)]
pub struct Credentials(Option<BearerToken>);

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            token.apply(request.metadata_mut());
        }
        Ok(request)
    }
}

/// The services of one scheduler over one channel (plaintext or TLS), each call carrying
/// the token of the [`ClientOptions`] it was opened with.
#[derive(Debug, Clone)]
pub struct TouchpointClient {
    pub playbooks: PlaybookServiceClient<Authorized>,
    pub enrollments: EnrollmentServiceClient<Authorized>,
    pub runs: RunServiceClient<Authorized>,
    pub dead_letters: DeadLetterServiceClient<Authorized>,
    pub contacts: ContactServiceClient<Authorized>,
    pub events: EventServiceClient<Authorized>,
    pub policy: PolicyServiceClient<Authorized>,
    /// The worker stream (for tests of who may attach).
    pub workers: WorkerServiceClient<Authorized>,
}

impl TouchpointClient {
    /// Connects to `endpoint` (`http://127.0.0.1:PORT`), retrying every 100 ms until the
    /// scheduler answers a `ListPlaybooks` call.
    ///
    /// # Panics
    /// When it does not answer within `timeout`.
    pub async fn connect(endpoint: &str, timeout: Duration) -> Self {
        let deadline = Instant::now() + timeout;
        loop {
            let error = match Self::try_connect(endpoint).await {
                Ok(client) => return client,
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "scheduler at {endpoint} did not answer within {timeout:?}: {error}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(crate) async fn try_connect(endpoint: &str) -> Result<Self, String> {
        Self::try_connect_with(endpoint, &ClientOptions::default()).await
    }

    /// Opens a channel to `endpoint` (`http://` or `https://`) with `options`, without
    /// calling anything: every call then carries the options' token.
    ///
    /// # Errors
    /// When the settings are unusable or the connection (or TLS handshake) fails, with
    /// the innermost cause.
    pub async fn open(endpoint: &str, options: &ClientOptions) -> Result<Self, String> {
        let credentials = Credentials(
            options
                .token
                .as_deref()
                .map(BearerToken::parse)
                .transpose()
                .map_err(|e| e.to_string())?,
        );
        let channel = security::client_endpoint(endpoint, &options.tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("connect: {e}: {}", root_cause(&e)))?;
        let with = |channel: Channel| InterceptedService::new(channel, credentials.clone());
        Ok(Self {
            playbooks: PlaybookServiceClient::new(with(channel.clone())),
            enrollments: EnrollmentServiceClient::new(with(channel.clone())),
            runs: RunServiceClient::new(with(channel.clone())),
            dead_letters: DeadLetterServiceClient::new(with(channel.clone())),
            contacts: ContactServiceClient::new(with(channel.clone())),
            events: EventServiceClient::new(with(channel.clone())),
            policy: PolicyServiceClient::new(with(channel.clone())),
            workers: WorkerServiceClient::new(with(channel)),
        })
    }

    /// [`TouchpointClient::open`], then one `ListPlaybooks` call that must succeed.
    ///
    /// # Errors
    /// When connecting or the call fails.
    pub async fn try_connect_with(endpoint: &str, options: &ClientOptions) -> Result<Self, String> {
        let mut client = Self::open(endpoint, options).await?;
        client
            .playbooks
            .list_playbooks(v1::ListPlaybooksRequest {})
            .await
            .map_err(|e| format!("ListPlaybooks: {e}"))?;
        Ok(client)
    }

    /// `GetRun`, panicking on error.
    pub async fn run(&mut self, run_id: &str) -> Run {
        self.runs
            .get_run(GetRunRequest {
                run_id: run_id.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("GetRun {run_id}: {e}"))
            .into_inner()
    }

    /// Polls `GetRun` until `done(&run)` holds and returns that run. Errors while polling
    /// (a scheduler restarting) count as "not yet".
    ///
    /// # Panics
    /// After `timeout`, showing the last run seen.
    pub async fn wait_for_run(
        &mut self,
        run_id: &str,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&Run) -> bool,
    ) -> Run {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self
                .runs
                .get_run(GetRunRequest {
                    run_id: run_id.to_owned(),
                })
                .await
                .map(tonic::Response::into_inner);
            if let Ok(run) = &last
                && done(run)
            {
                return run.clone();
            }
            if Instant::now() >= deadline {
                let last = match last {
                    Ok(run) => run_summary(&run),
                    Err(e) => format!("GetRun failed: {e}"),
                };
                panic!("run {run_id} did not reach {what} within {timeout:?}; last seen:\n{last}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until the run has `status` (see [`TouchpointClient::wait_for_run`]).
    pub async fn wait_for_status(
        &mut self,
        run_id: &str,
        status: RunStatus,
        timeout: Duration,
    ) -> Run {
        self.wait_for_run(run_id, timeout, status.as_str_name(), |run| {
            run.status == status as i32
        })
        .await
    }
}

/// The innermost error of a chain ("invalid peer certificate: UnknownIssuer").
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = error;
    while let Some(source) = inner.source() {
        inner = source;
    }
    inner.to_string()
}

/// A run and its timeline, one step a line, for failure messages.
pub fn run_summary(run: &Run) -> String {
    let status = RunStatus::try_from(run.status).map_or("?", |s| s.as_str_name());
    let mut out = format!(
        "run {} playbook={} v{} contact={} status={} current_step={:?}\n",
        run.run_id, run.playbook, run.version, run.contact_id, status, run.current_step
    );
    for step in &run.steps {
        let status = v1::StepStatus::try_from(step.status).map_or("?", |s| s.as_str_name());
        let _ = writeln!(
            out,
            "  {:<12} {:<6} {:<22} attempts={} due={} done={} worker={:?} channel={:?} detail={:?}",
            step.step_id,
            step.kind,
            status,
            step.attempts,
            step.due_at_ms,
            step.done_at_ms,
            step.worker,
            step.channel,
            step.detail
        );
    }
    out
}
