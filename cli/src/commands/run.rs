//! `tp run list | get | cancel`.

use clap::{ArgGroup, Subcommand, ValueEnum};
use jiff::Timestamp;
use serde::Serialize;
use touchpoint_proto::v1::{
    CancelRunRequest, CancelRunsRequest, GetRunRequest, ListRunsRequest, Run, RunStatus, StepRecord,
};

use crate::client::Client;
use crate::commands::count;
use crate::output::{self, Format, Tabular, fields, local_time, timestamp, word};

/// Most runs the scheduler returns in one page.
const MAX_PAGE_SIZE: u32 = 1000;

#[derive(Subcommand, Debug)]
pub(crate) enum RunCommand {
    /// Runs, newest first.
    List {
        /// Only runs of this playbook.
        #[arg(long)]
        playbook: Option<String>,
        /// Only runs in this state.
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// At most this many runs.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// A run's timeline: each step with its status, attempts, times, worker and channel.
    Get {
        /// The run's id, as `enroll` and `run list` print it.
        run_id: String,
    },
    /// Stop a run that has not finished, or every active run of a playbook (optionally
    /// only those at one step); nothing more is sent for them.
    #[command(group(ArgGroup::new("target").required(true).args(["run_id", "playbook"])))]
    Cancel {
        /// The run's id.
        run_id: Option<String>,
        /// Cancel every active run of this playbook.
        #[arg(long)]
        playbook: Option<String>,
        /// With --playbook: only the runs at this step.
        #[arg(long = "step", value_name = "STEP_ID", conflicts_with = "run_id")]
        step_id: Option<String>,
    },
}

/// The `--status` values of `run list`.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub(crate) enum StatusFilter {
    Active,
    Completed,
    Failed,
    Cancelled,
    Converted,
}

impl From<StatusFilter> for RunStatus {
    fn from(status: StatusFilter) -> Self {
        match status {
            StatusFilter::Active => RunStatus::Active,
            StatusFilter::Completed => RunStatus::Completed,
            StatusFilter::Failed => RunStatus::Failed,
            StatusFilter::Cancelled => RunStatus::Cancelled,
            StatusFilter::Converted => RunStatus::Converted,
        }
    }
}

pub(crate) async fn run(
    command: RunCommand,
    client: &Client,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        RunCommand::List {
            playbook,
            status,
            limit,
        } => {
            let runs = list(client, playbook.unwrap_or_default(), status, limit).await?;
            output::print(format, &RunList(runs))
        }
        RunCommand::Get { run_id } => {
            let run = client
                .runs()
                .get_run(GetRunRequest { run_id })
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            output::print(format, &RunView::from(run))
        }
        RunCommand::Cancel {
            run_id: Some(run_id),
            ..
        } => {
            let run = client
                .runs()
                .cancel_run(CancelRunRequest { run_id })
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            output::print(format, &Cancelled(RunView::from(run)))
        }
        RunCommand::Cancel {
            run_id: None,
            playbook,
            step_id,
        } => {
            // clap requires a run id or --playbook.
            let playbook = playbook.unwrap_or_default();
            let request = CancelRunsRequest {
                playbook: playbook.clone(),
                step_id: step_id.clone().unwrap_or_default(),
            };
            let response = client
                .runs()
                .cancel_runs(request)
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            let view = BulkCancelled {
                cancelled: response.cancelled,
                playbook,
                step_id,
            };
            output::print(format, &view)
        }
    }
}

/// Up to `limit` runs, following page tokens.
async fn list(
    client: &Client,
    playbook: String,
    status: Option<StatusFilter>,
    limit: u32,
) -> anyhow::Result<Vec<RunView>> {
    let mut request = ListRunsRequest {
        playbook,
        status: status
            .map_or(RunStatus::Unspecified, RunStatus::from)
            .into(),
        ..ListRunsRequest::default()
    };
    let mut runs = Vec::new();
    loop {
        let remaining = limit.saturating_sub(runs.len().try_into()?);
        request.page_size = remaining.min(MAX_PAGE_SIZE);
        let page = client
            .runs()
            .list_runs(request.clone())
            .await
            .map_err(|status| client.error(status))?
            .into_inner();
        runs.extend(page.runs.into_iter().map(RunView::from));
        if page.next_page_token.is_empty() || runs.len() >= limit as usize {
            runs.truncate(limit as usize);
            return Ok(runs);
        }
        request.page_token = page.next_page_token;
    }
}

/// A run and its timeline.
#[derive(Debug, Serialize)]
struct RunView {
    run_id: String,
    playbook: String,
    version: u32,
    contact_id: String,
    status: String,
    current_step: String,
    trace_id: String,
    created_at: Option<Timestamp>,
    updated_at: Option<Timestamp>,
    steps: Vec<StepView>,
}

/// One step of a run's timeline.
#[derive(Debug, Serialize)]
struct StepView {
    step_id: String,
    kind: String,
    status: String,
    attempts: u32,
    due_at: Option<Timestamp>,
    done_at: Option<Timestamp>,
    worker: String,
    channel: String,
    detail: String,
}

impl From<Run> for RunView {
    fn from(run: Run) -> Self {
        Self {
            status: word(run.status().as_str_name(), "RUN_STATUS_"),
            created_at: timestamp(run.created_at_ms),
            updated_at: timestamp(run.updated_at_ms),
            run_id: run.run_id,
            playbook: run.playbook,
            version: run.version,
            contact_id: run.contact_id,
            current_step: run.current_step,
            trace_id: run.trace_id,
            steps: run.steps.into_iter().map(StepView::from).collect(),
        }
    }
}

impl From<StepRecord> for StepView {
    fn from(step: StepRecord) -> Self {
        Self {
            status: word(step.status().as_str_name(), "STEP_STATUS_"),
            due_at: timestamp(step.due_at_ms),
            done_at: timestamp(step.done_at_ms),
            step_id: step.step_id,
            kind: step.kind,
            attempts: step.attempts,
            worker: step.worker,
            channel: step.channel,
            detail: step.detail,
        }
    }
}

impl Tabular for RunView {
    fn table(&self) -> String {
        let header = fields(&[
            ("run", self.run_id.clone()),
            ("playbook", format!("{}@{}", self.playbook, self.version)),
            ("contact", self.contact_id.clone()),
            ("status", self.status.clone()),
            ("current step", self.current_step.clone()),
            ("trace id", self.trace_id.clone()),
            ("created", local_time(self.created_at)),
            ("updated", local_time(self.updated_at)),
        ]);
        let mut steps = output::table([
            "STEP", "KIND", "STATUS", "ATTEMPTS", "DUE", "DONE", "WORKER", "CHANNEL", "DETAIL",
        ]);
        for step in &self.steps {
            steps.add_row([
                step.step_id.clone(),
                step.kind.clone(),
                step.status.clone(),
                step.attempts.to_string(),
                local_time(step.due_at),
                local_time(step.done_at),
                step.worker.clone(),
                step.channel.clone(),
                step.detail.clone(),
            ]);
        }
        format!("{header}\n\n{}", steps.trim_fmt())
    }
}

/// `run list`: a JSON or YAML array.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct RunList(Vec<RunView>);

impl Tabular for RunList {
    fn table(&self) -> String {
        let mut table = output::table([
            "RUN", "PLAYBOOK", "CONTACT", "STATUS", "STEP", "CREATED", "UPDATED",
        ]);
        for run in &self.0 {
            table.add_row([
                run.run_id.clone(),
                format!("{}@{}", run.playbook, run.version),
                run.contact_id.clone(),
                run.status.clone(),
                run.current_step.clone(),
                local_time(run.created_at),
                local_time(run.updated_at),
            ]);
        }
        table.trim_fmt()
    }
}

/// `run cancel`: one line, or the cancelled run as JSON or YAML.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct Cancelled(RunView);

impl Tabular for Cancelled {
    fn table(&self) -> String {
        format!("run/{} {}", self.0.run_id, self.0.status)
    }
}

/// `run cancel --playbook`: one line, or `{cancelled, playbook, step_id}` as JSON or YAML.
#[derive(Debug, Serialize)]
struct BulkCancelled {
    cancelled: u64,
    playbook: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    step_id: Option<String>,
}

impl Tabular for BulkCancelled {
    fn table(&self) -> String {
        let runs = count(self.cancelled, "run", "runs");
        match &self.step_id {
            Some(step) => format!("playbook/{} step {step}: {runs} cancelled", self.playbook),
            None => format!("playbook/{}: {runs} cancelled", self.playbook),
        }
    }
}

#[cfg(test)]
mod tests {
    use touchpoint_proto::v1::StepStatus;

    use super::*;

    const DUE_MS: i64 = 1_795_417_445_000;

    fn step(id: &str, kind: &str, status: StepStatus, done_at_ms: i64) -> StepRecord {
        StepRecord {
            step_id: id.into(),
            kind: kind.into(),
            status: status.into(),
            attempts: u32::from(done_at_ms > 0),
            due_at_ms: DUE_MS,
            done_at_ms,
            worker: if kind == "action" {
                "w-1".into()
            } else {
                String::new()
            },
            channel: if kind == "action" {
                "wecom".into()
            } else {
                String::new()
            },
            detail: if done_at_ms > 0 {
                "HTTP 200".into()
            } else {
                String::new()
            },
        }
    }

    fn sample() -> RunView {
        RunView::from(Run {
            run_id: "0197a1b2-run".into(),
            playbook: "welcome-new-customer".into(),
            version: 3,
            contact_id: "c-1001".into(),
            status: RunStatus::Active.into(),
            current_step: "three-days".into(),
            created_at_ms: DUE_MS,
            updated_at_ms: DUE_MS + 1_000,
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            steps: vec![
                step("coupon", "action", StepStatus::Done, DUE_MS + 500),
                step("three-days", "wait", StepStatus::Scheduled, 0),
                step("remind", "action", StepStatus::InFlight, 0),
            ],
        })
    }

    #[test]
    fn table_shows_header_then_timeline() {
        let table = sample().table();
        let mut lines = table.lines();
        assert_eq!(lines.next(), Some("run:           0197a1b2-run"));
        assert_eq!(lines.next(), Some("playbook:      welcome-new-customer@3"));
        assert!(table.contains("\nstatus:        active\n"), "{table}");
        assert!(table.contains("\ncurrent step:  three-days\n"), "{table}");
        assert!(
            table.contains("\ntrace id:      4bf92f3577b34da6a3ce929d0e0e4736\n"),
            "{table}"
        );

        let rows: Vec<Vec<&str>> = table
            .split("\n\n")
            .nth(1)
            .unwrap_or_default()
            .lines()
            .map(|line| line.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            [
                "STEP", "KIND", "STATUS", "ATTEMPTS", "DUE", "DONE", "WORKER", "CHANNEL", "DETAIL"
            ]
        );
        let due = local_time(timestamp(DUE_MS));
        let done = local_time(timestamp(DUE_MS + 500));
        let row = format!("coupon action done 1 {due} {done} w-1 wecom HTTP 200");
        assert_eq!(rows[1].join(" "), row);
        assert_eq!(
            rows[2].join(" "),
            format!("three-days wait scheduled 0 {due}")
        );
        assert_eq!(
            rows[3].join(" "),
            format!("remind action in_flight 0 {due} w-1 wecom")
        );
    }

    #[test]
    fn json_uses_words_and_rfc3339() -> anyhow::Result<()> {
        let json: serde_json::Value =
            serde_json::from_str(&output::render(Format::Json, &sample())?)?;
        assert_eq!(json["status"], "active");
        assert_eq!(json["created_at"], "2026-11-23T07:04:05Z");
        assert_eq!(json["steps"][0]["status"], "done");
        assert_eq!(json["steps"][0]["done_at"], "2026-11-23T07:04:05.5Z");
        assert_eq!(json["steps"][1]["done_at"], serde_json::Value::Null);
        assert_eq!(json["steps"][2]["status"], "in_flight");
        Ok(())
    }

    #[test]
    fn yaml_round_trips() -> anyhow::Result<()> {
        let yaml = output::render(Format::Yaml, &sample())?;
        let value: serde_json::Value = serde_saphyr::from_str(&yaml)?;
        let json: serde_json::Value =
            serde_json::from_str(&output::render(Format::Json, &sample())?)?;
        assert_eq!(value, json, "{yaml}");
        assert!(yaml.contains("status: active\n"), "{yaml}");
        Ok(())
    }

    #[test]
    fn list_and_cancel() -> anyhow::Result<()> {
        let table = RunList(vec![sample()]).table();
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(
            rows[0].split_whitespace().collect::<Vec<_>>(),
            [
                "RUN", "PLAYBOOK", "CONTACT", "STATUS", "STEP", "CREATED", "UPDATED"
            ]
        );
        assert_eq!(
            rows[1].split_whitespace().take(5).collect::<Vec<_>>(),
            [
                "0197a1b2-run",
                "welcome-new-customer@3",
                "c-1001",
                "active",
                "three-days"
            ]
        );
        let json: serde_json::Value =
            serde_json::from_str(&output::render(Format::Json, &RunList(vec![sample()]))?)?;
        assert_eq!(json[0]["run_id"], "0197a1b2-run");

        let mut run = sample();
        run.status = "cancelled".into();
        assert_eq!(Cancelled(run).table(), "run/0197a1b2-run cancelled");
        Ok(())
    }

    #[test]
    fn bulk_cancel_lines() -> anyhow::Result<()> {
        let all = BulkCancelled {
            cancelled: 12,
            playbook: "welcome".into(),
            step_id: None,
        };
        assert_eq!(all.table(), "playbook/welcome: 12 runs cancelled");
        let json: serde_json::Value = serde_json::from_str(&output::render(Format::Json, &all)?)?;
        assert_eq!(
            json,
            serde_json::json!({"cancelled": 12, "playbook": "welcome"})
        );
        let one_step = BulkCancelled {
            cancelled: 1,
            playbook: "welcome".into(),
            step_id: Some("remind".into()),
        };
        assert_eq!(
            one_step.table(),
            "playbook/welcome step remind: 1 run cancelled"
        );
        Ok(())
    }

    #[test]
    fn new_statuses_are_words() {
        let mut run = Run {
            status: RunStatus::Converted.into(),
            ..Run::default()
        };
        run.steps.push(StepRecord {
            status: StepStatus::Waiting.into(),
            ..StepRecord::default()
        });
        run.steps.push(StepRecord {
            status: StepStatus::Paused.into(),
            ..StepRecord::default()
        });
        let view = RunView::from(run);
        assert_eq!(view.status, "converted");
        assert_eq!(view.steps[0].status, "waiting");
        assert_eq!(view.steps[1].status, "paused");
    }
}
