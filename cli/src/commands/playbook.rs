//! `tp playbook apply | list | get | pause | resume`.

use std::path::PathBuf;

use clap::Subcommand;
use jiff::Timestamp;
use serde::Serialize;
use touchpoint_proto::v1::{
    ApplyPlaybookRequest, ApplyPlaybookResponse, ApplyStatus, GetPlaybookRequest,
    ListPlaybooksRequest, PausePlaybookRequest, Playbook, ResumePlaybookRequest,
};

use crate::client::Client;
use crate::commands::read_source;
use crate::output::{self, Format, Tabular, fields, local_time, timestamp, word};

#[derive(Subcommand, Debug)]
pub(crate) enum PlaybookCommand {
    /// Validate a playbook file and store it as a new version.
    Apply {
        /// The playbook YAML; `-` reads stdin.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Only validate: store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Every playbook at its latest version.
    List,
    /// One playbook with its YAML source.
    Get {
        /// The playbook's name.
        name: String,
        /// A past version (default: the latest).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        version: Option<u32>,
    },
    /// Stop sending for a playbook: steps that come due wait (runs still start and
    /// events are still recorded) until it is resumed.
    Pause {
        /// The playbook's name.
        name: String,
    },
    /// Send again for a paused playbook: every step that came due meanwhile goes out now.
    Resume {
        /// The playbook's name.
        name: String,
    },
}

pub(crate) async fn run(
    command: PlaybookCommand,
    client: &Client,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        PlaybookCommand::Apply { file, dry_run } => {
            let request = ApplyPlaybookRequest {
                yaml: read_source(&file, "the playbook")?,
                dry_run,
            };
            let applied = apply(client, request).await?;
            output::print(format, &applied)
        }
        PlaybookCommand::List => {
            let list = client
                .playbooks()
                .list_playbooks(ListPlaybooksRequest {})
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            let views = list
                .playbooks
                .into_iter()
                .map(|playbook| PlaybookView::new(playbook, false))
                .collect();
            output::print(format, &PlaybookList(views))
        }
        PlaybookCommand::Get { name, version } => {
            let request = GetPlaybookRequest {
                name,
                version: version.unwrap_or(0),
            };
            let playbook = client
                .playbooks()
                .get_playbook(request)
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            output::print(format, &PlaybookView::new(playbook, true))
        }
        PlaybookCommand::Pause { name } => {
            let playbook = client
                .playbooks()
                .pause_playbook(PausePlaybookRequest { name })
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            output::print(format, &Switched(PlaybookView::new(playbook, false)))
        }
        PlaybookCommand::Resume { name } => {
            let playbook = client
                .playbooks()
                .resume_playbook(ResumePlaybookRequest { name })
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            output::print(format, &Switched(PlaybookView::new(playbook, false)))
        }
    }
}

/// Sends a playbook to the scheduler, which validates it and (unless a dry run) stores it.
pub(crate) async fn apply(
    client: &Client,
    request: ApplyPlaybookRequest,
) -> anyhow::Result<AppliedView> {
    let response = client
        .playbooks()
        .apply_playbook(request)
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    Ok(AppliedView::from(response))
}

/// The outcome of `apply`.
#[derive(Debug, Serialize)]
pub(crate) struct AppliedView {
    pub(crate) name: String,
    pub(crate) version: u32,
    /// `created`, `unchanged` or `valid` (dry run).
    #[serde(serialize_with = "apply_status")]
    status: ApplyStatus,
    steps: u32,
    /// Runs still going on older versions (they stay on their version).
    runs_on_older_versions: u64,
}

fn apply_status<S: serde::Serializer>(status: &ApplyStatus, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&word(status.as_str_name(), "APPLY_STATUS_"))
}

impl From<ApplyPlaybookResponse> for AppliedView {
    fn from(response: ApplyPlaybookResponse) -> Self {
        Self {
            status: response.status(),
            name: response.name,
            version: response.version,
            steps: response.step_count,
            runs_on_older_versions: response.runs_on_older_versions,
        }
    }
}

impl Tabular for AppliedView {
    fn table(&self) -> String {
        let Self {
            name,
            version,
            status,
            steps,
            runs_on_older_versions,
        } = self;
        let line = match status {
            ApplyStatus::Unchanged => format!("playbook/{name} unchanged (version {version})"),
            ApplyStatus::Valid => {
                format!("playbook/{name} is valid (would be version {version}, {steps} steps)")
            }
            ApplyStatus::Created | ApplyStatus::Unspecified => {
                format!("playbook/{name} created (version {version}, {steps} steps)")
            }
        };
        match runs_on_older_versions {
            0 => line,
            1 => format!("{line}; 1 run still on an older version"),
            n => format!("{line}; {n} runs still on older versions"),
        }
    }
}

/// One version of a playbook.
#[derive(Debug, Serialize)]
struct PlaybookView {
    name: String,
    version: u32,
    latest_version: u32,
    /// Paused: nothing of it is sent until resumed.
    paused: bool,
    description: String,
    steps: Vec<String>,
    created_at: Option<Timestamp>,
    /// The YAML source, for `get` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    yaml: Option<String>,
}

impl PlaybookView {
    fn new(playbook: Playbook, with_source: bool) -> Self {
        Self {
            created_at: timestamp(playbook.created_at_ms),
            yaml: with_source.then_some(playbook.yaml),
            name: playbook.name,
            version: playbook.version,
            latest_version: playbook.latest_version,
            paused: playbook.paused,
            description: playbook.description,
            steps: playbook.step_ids,
        }
    }
}

impl Tabular for PlaybookView {
    fn table(&self) -> String {
        let header = fields(&[
            ("name", self.name.clone()),
            (
                "version",
                format!("{} (latest {})", self.version, self.latest_version),
            ),
            ("paused", yes_no(self.paused).to_owned()),
            ("description", self.description.clone()),
            (
                "steps",
                format!("{} ({})", self.steps.len(), self.steps.join(", ")),
            ),
            ("created", local_time(self.created_at)),
        ]);
        match &self.yaml {
            Some(yaml) => format!("{header}\n\n{yaml}"),
            None => header,
        }
    }
}

/// `playbook list`: a JSON or YAML array.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct PlaybookList(Vec<PlaybookView>);

impl Tabular for PlaybookList {
    fn table(&self) -> String {
        let mut table = output::table(["NAME", "VERSION", "LATEST", "PAUSED", "STEPS", "CREATED"]);
        for playbook in &self.0 {
            table.add_row([
                playbook.name.clone(),
                playbook.version.to_string(),
                playbook.latest_version.to_string(),
                yes_no(playbook.paused).to_owned(),
                playbook.steps.len().to_string(),
                local_time(playbook.created_at),
            ]);
        }
        table.trim_fmt()
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

/// `playbook pause | resume`: one line, or the playbook as JSON or YAML.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct Switched(PlaybookView);

impl Tabular for Switched {
    fn table(&self) -> String {
        let Self(playbook) = self;
        let state = if playbook.paused { "paused" } else { "resumed" };
        format!("playbook/{} {state}", playbook.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(status: ApplyStatus, version: u32) -> AppliedView {
        AppliedView::from(ApplyPlaybookResponse {
            name: "welcome-new-customer".into(),
            version,
            status: status.into(),
            step_count: 6,
            runs_on_older_versions: 0,
        })
    }

    #[test]
    fn apply_lines() {
        assert_eq!(
            applied(ApplyStatus::Created, 3).table(),
            "playbook/welcome-new-customer created (version 3, 6 steps)"
        );
        assert_eq!(
            applied(ApplyStatus::Unchanged, 3).table(),
            "playbook/welcome-new-customer unchanged (version 3)"
        );
        assert_eq!(
            applied(ApplyStatus::Valid, 4).table(),
            "playbook/welcome-new-customer is valid (would be version 4, 6 steps)"
        );
        let mut older = applied(ApplyStatus::Created, 4);
        older.runs_on_older_versions = 12;
        assert_eq!(
            older.table(),
            "playbook/welcome-new-customer created (version 4, 6 steps); \
             12 runs still on older versions"
        );
        older.runs_on_older_versions = 1;
        assert!(
            older.table().ends_with("; 1 run still on an older version"),
            "{}",
            older.table()
        );
    }

    #[test]
    fn pause_and_resume_lines() -> anyhow::Result<()> {
        let mut playbook = Playbook {
            name: "welcome".into(),
            version: 2,
            latest_version: 2,
            paused: true,
            ..Playbook::default()
        };
        let paused = Switched(PlaybookView::new(playbook.clone(), false));
        assert_eq!(paused.table(), "playbook/welcome paused");
        let json: serde_json::Value =
            serde_json::from_str(&output::render(Format::Json, &paused)?)?;
        assert_eq!(json["paused"], true);
        assert_eq!(json["name"], "welcome");
        playbook.paused = false;
        let resumed = Switched(PlaybookView::new(playbook, false));
        assert_eq!(resumed.table(), "playbook/welcome resumed");
        Ok(())
    }

    #[test]
    fn get_shows_fields_then_source() -> anyhow::Result<()> {
        let playbook = Playbook {
            name: "welcome-new-customer".into(),
            version: 2,
            description: "新客欢迎".into(),
            yaml: "name: welcome-new-customer\nsteps: []\n".into(),
            step_ids: vec!["add".into(), "coupon".into()],
            created_at_ms: 1_795_417_445_000,
            latest_version: 3,
            paused: true,
        };
        let view = PlaybookView::new(playbook, true);
        let table = view.table();
        assert!(
            table.starts_with("name:         welcome-new-customer\n"),
            "{table}"
        );
        assert!(table.contains("version:      2 (latest 3)\n"), "{table}");
        assert!(table.contains("paused:       yes\n"), "{table}");
        assert!(table.contains("steps:        2 (add, coupon)\n"), "{table}");
        assert!(
            table.ends_with("\n\nname: welcome-new-customer\nsteps: []\n"),
            "{table}"
        );

        let json: serde_json::Value = serde_json::from_str(&output::render(Format::Json, &view)?)?;
        assert_eq!(json["yaml"], "name: welcome-new-customer\nsteps: []\n");
        assert_eq!(json["created_at"], "2026-11-23T07:04:05Z");
        assert_eq!(json["latest_version"], 3);

        assert_eq!(json["paused"], true);

        let list = PlaybookList(vec![PlaybookView::new(Playbook::default(), false)]);
        let json: serde_json::Value = serde_json::from_str(&output::render(Format::Json, &list)?)?;
        assert!(json[0].get("yaml").is_none(), "{json}");
        assert_eq!(json[0]["paused"], false);
        let table = list.table();
        let header: Vec<&str> = table
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            header,
            ["NAME", "VERSION", "LATEST", "PAUSED", "STEPS", "CREATED"]
        );
        assert_eq!(
            table
                .lines()
                .nth(1)
                .map(|row| row.split_whitespace().nth(2)),
            Some(Some("no"))
        );
        Ok(())
    }
}
