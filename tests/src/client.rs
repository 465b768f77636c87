//! The scheduler's gRPC clients, connected with retries, and run helpers.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use tonic::transport::{Channel, Endpoint};
use touchpoint_proto::v1::{
    self, GetRunRequest, Run, RunStatus, dead_letter_service_client::DeadLetterServiceClient,
    enrollment_service_client::EnrollmentServiceClient,
    playbook_service_client::PlaybookServiceClient, run_service_client::RunServiceClient,
};

/// The client-facing services of one scheduler over one channel.
#[derive(Debug, Clone)]
pub struct TouchpointClient {
    pub playbooks: PlaybookServiceClient<Channel>,
    pub enrollments: EnrollmentServiceClient<Channel>,
    pub runs: RunServiceClient<Channel>,
    pub dead_letters: DeadLetterServiceClient<Channel>,
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
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = Self {
            playbooks: PlaybookServiceClient::new(channel.clone()),
            enrollments: EnrollmentServiceClient::new(channel.clone()),
            runs: RunServiceClient::new(channel.clone()),
            dead_letters: DeadLetterServiceClient::new(channel),
        };
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
