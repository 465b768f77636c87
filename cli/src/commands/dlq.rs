//! `tp dlq list | retry`: runs that failed at a step, and putting them back.

use clap::{ArgGroup, Subcommand};
use jiff::Timestamp;
use serde::Serialize;
use touchpoint_proto::v1::{
    DeadLetter, ListDeadLettersRequest, RetryDeadLettersRequest, retry_dead_letters_request::Target,
};

use crate::client::Client;
use crate::output::{self, Format, Tabular, local_time, timestamp};

/// Most dead letters the scheduler returns in one page.
const MAX_PAGE_SIZE: u32 = 1000;

#[derive(Subcommand, Debug)]
pub(crate) enum DlqCommand {
    /// Runs that failed at a step (retries exhausted or a permanent error), newest first.
    List {
        /// Only dead letters of this playbook.
        #[arg(long)]
        playbook: Option<String>,
        /// At most this many dead letters.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
    },
    /// Put a dead-lettered run (or every one of a playbook) back at the step it failed
    /// at; the step is delivered again with the same idempotency key.
    #[command(group(ArgGroup::new("target").required(true).args(["run_id", "playbook"])))]
    Retry {
        /// The run's id, as `dlq list` prints it.
        run_id: Option<String>,
        /// Retry every dead letter of this playbook.
        #[arg(long)]
        playbook: Option<String>,
    },
}

pub(crate) async fn run(
    command: DlqCommand,
    client: &Client,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { playbook, limit } => {
            let entries = list(client, playbook.unwrap_or_default(), limit).await?;
            output::print(format, &DeadLetterList(entries))
        }
        DlqCommand::Retry { run_id, playbook } => {
            let target = match (run_id, playbook) {
                (Some(run_id), _) => Target::RunId(run_id),
                (None, Some(playbook)) => Target::Playbook(playbook),
                // clap requires one of them.
                (None, None) => anyhow::bail!("give a run id or --playbook NAME"),
            };
            let request = RetryDeadLettersRequest {
                target: Some(target.clone()),
            };
            let response = client
                .dead_letters()
                .retry_dead_letters(request)
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            let view = match target {
                Target::RunId(run_id) => RetriedView {
                    retried: response.retried,
                    run_id: Some(run_id),
                    playbook: None,
                },
                Target::Playbook(playbook) => RetriedView {
                    retried: response.retried,
                    run_id: None,
                    playbook: Some(playbook),
                },
            };
            output::print(format, &view)
        }
    }
}

/// Up to `limit` dead letters, following page tokens.
async fn list(
    client: &Client,
    playbook: String,
    limit: u32,
) -> anyhow::Result<Vec<DeadLetterView>> {
    let mut request = ListDeadLettersRequest {
        playbook,
        ..ListDeadLettersRequest::default()
    };
    let mut entries = Vec::new();
    loop {
        let remaining = limit.saturating_sub(entries.len().try_into()?);
        request.page_size = remaining.min(MAX_PAGE_SIZE);
        let page = client
            .dead_letters()
            .list_dead_letters(request.clone())
            .await
            .map_err(|status| client.error(status))?
            .into_inner();
        entries.extend(page.dead_letters.into_iter().map(DeadLetterView::from));
        if page.next_page_token.is_empty() || entries.len() >= limit as usize {
            entries.truncate(limit as usize);
            return Ok(entries);
        }
        request.page_token = page.next_page_token;
    }
}

/// One dead-lettered run.
#[derive(Debug, Serialize)]
struct DeadLetterView {
    run_id: String,
    playbook: String,
    version: u32,
    contact_id: String,
    step_id: String,
    attempts: u32,
    failed_at: Option<Timestamp>,
    last_error: String,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(entry: DeadLetter) -> Self {
        Self {
            failed_at: timestamp(entry.failed_at_ms),
            run_id: entry.run_id,
            playbook: entry.playbook,
            version: entry.version,
            contact_id: entry.contact_id,
            step_id: entry.step_id,
            attempts: entry.attempts,
            last_error: entry.last_error,
        }
    }
}

/// `dlq list`: a JSON or YAML array.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct DeadLetterList(Vec<DeadLetterView>);

impl Tabular for DeadLetterList {
    fn table(&self) -> String {
        let mut table = output::table([
            "RUN",
            "PLAYBOOK",
            "CONTACT",
            "STEP",
            "ATTEMPTS",
            "FAILED",
            "LAST ERROR",
        ]);
        for entry in &self.0 {
            table.add_row([
                entry.run_id.clone(),
                format!("{}@{}", entry.playbook, entry.version),
                entry.contact_id.clone(),
                entry.step_id.clone(),
                entry.attempts.to_string(),
                local_time(entry.failed_at),
                entry.last_error.clone(),
            ]);
        }
        table.trim_fmt()
    }
}

/// `dlq retry`: one line, or `{retried, run_id | playbook}` as JSON or YAML.
#[derive(Debug, Serialize)]
struct RetriedView {
    retried: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    playbook: Option<String>,
}

impl Tabular for RetriedView {
    fn table(&self) -> String {
        match (&self.run_id, &self.playbook) {
            (Some(run_id), _) => format!("run/{run_id} retried"),
            (None, Some(playbook)) => {
                let runs = if self.retried == 1 { "run" } else { "runs" };
                format!("playbook/{playbook}: {} {runs} retried", self.retried)
            }
            (None, None) => format!("{} retried", self.retried),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILED_MS: i64 = 1_795_417_445_000;

    fn sample() -> DeadLetterView {
        DeadLetterView::from(DeadLetter {
            run_id: "0197a1b2-run".into(),
            playbook: "welcome-new-customer".into(),
            version: 3,
            contact_id: "c-1001".into(),
            step_id: "coupon".into(),
            attempts: 5,
            failed_at_ms: FAILED_MS,
            last_error: "gave up after 5 attempts: HTTP 503".into(),
        })
    }

    #[test]
    fn list_table_has_one_row_per_dead_letter() {
        let table = DeadLetterList(vec![sample()]).table();
        let rows: Vec<&str> = table.lines().collect();
        assert_eq!(
            rows[0].split_whitespace().collect::<Vec<_>>(),
            [
                "RUN", "PLAYBOOK", "CONTACT", "STEP", "ATTEMPTS", "FAILED", "LAST", "ERROR"
            ]
        );
        let failed = local_time(timestamp(FAILED_MS));
        assert_eq!(
            rows[1].split_whitespace().collect::<Vec<_>>().join(" "),
            format!(
                "0197a1b2-run welcome-new-customer@3 c-1001 coupon 5 {failed} gave up after 5 attempts: HTTP 503"
            )
        );
    }

    #[test]
    fn list_json_and_yaml() -> anyhow::Result<()> {
        let list = DeadLetterList(vec![sample()]);
        let json: serde_json::Value = serde_json::from_str(&output::render(Format::Json, &list)?)?;
        assert_eq!(json[0]["run_id"], "0197a1b2-run");
        assert_eq!(json[0]["step_id"], "coupon");
        assert_eq!(json[0]["attempts"], 5);
        assert_eq!(json[0]["failed_at"], "2026-11-23T07:04:05Z");
        assert_eq!(json[0]["last_error"], "gave up after 5 attempts: HTTP 503");
        let yaml: serde_json::Value =
            serde_saphyr::from_str(&output::render(Format::Yaml, &list)?)?;
        assert_eq!(yaml, json);
        Ok(())
    }

    #[test]
    fn retried_lines() -> anyhow::Result<()> {
        let one = RetriedView {
            retried: 1,
            run_id: Some("r-1".into()),
            playbook: None,
        };
        assert_eq!(one.table(), "run/r-1 retried");
        let json: serde_json::Value = serde_json::from_str(&output::render(Format::Json, &one)?)?;
        assert_eq!(json, serde_json::json!({"retried": 1, "run_id": "r-1"}));
        let many = RetriedView {
            retried: 3,
            run_id: None,
            playbook: Some("welcome".into()),
        };
        assert_eq!(many.table(), "playbook/welcome: 3 runs retried");
        Ok(())
    }
}
