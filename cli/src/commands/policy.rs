//! `tp policy apply | get`: the contact budget (frequency caps, quiet hours) that every
//! send of every playbook is checked against.

use std::path::PathBuf;

use clap::Subcommand;
use jiff::Timestamp;
use serde::Serialize;
use touchpoint_proto::v1::{ApplyPolicyRequest, ApplyPolicyResponse, GetPolicyRequest, Policy};

use crate::client::Client;
use crate::commands::read_source;
use crate::output::{self, Format, Tabular, fields, local_time, timestamp, word};

#[derive(Subcommand, Debug)]
pub(crate) enum PolicyCommand {
    /// Validate a policy file and store it as the next version, in force at once.
    Apply {
        /// The policy YAML; `-` reads stdin.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Only validate: store nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The policy in force, with its YAML source.
    Get,
}

pub(crate) async fn run(
    command: PolicyCommand,
    client: &Client,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Apply { file, dry_run } => {
            let request = ApplyPolicyRequest {
                yaml: read_source(&file, "the policy")?,
                dry_run,
            };
            let response = client
                .policies()
                .apply_policy(request)
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            output::print(format, &AppliedView::from(response))
        }
        PolicyCommand::Get => {
            let policy = client
                .policies()
                .get_policy(GetPolicyRequest {})
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            output::print(format, &PolicyView::from(policy))
        }
    }
}

/// The outcome of `policy apply`.
#[derive(Debug, Serialize)]
struct AppliedView {
    version: u32,
    /// `created`, `unchanged` or `valid` (dry run).
    status: String,
}

impl From<ApplyPolicyResponse> for AppliedView {
    fn from(response: ApplyPolicyResponse) -> Self {
        Self {
            status: word(response.status().as_str_name(), "APPLY_POLICY_STATUS_"),
            version: response.version,
        }
    }
}

impl Tabular for AppliedView {
    fn table(&self) -> String {
        let version = self.version;
        match self.status.as_str() {
            "unchanged" => format!("policy unchanged (version {version})"),
            "valid" => format!("policy is valid (would be version {version})"),
            _ => format!("policy created (version {version})"),
        }
    }
}

/// The policy in force.
#[derive(Debug, Serialize)]
struct PolicyView {
    version: u32,
    created_at: Option<Timestamp>,
    yaml: String,
}

impl From<Policy> for PolicyView {
    fn from(policy: Policy) -> Self {
        Self {
            version: policy.version,
            created_at: timestamp(policy.created_at_ms),
            yaml: policy.yaml,
        }
    }
}

impl Tabular for PolicyView {
    fn table(&self) -> String {
        let header = fields(&[
            ("version", self.version.to_string()),
            ("created", local_time(self.created_at)),
        ]);
        format!("{header}\n\n{}", self.yaml)
    }
}

#[cfg(test)]
mod tests {
    use touchpoint_proto::v1::ApplyPolicyStatus;

    use super::*;

    fn applied(status: ApplyPolicyStatus, version: u32) -> String {
        AppliedView::from(ApplyPolicyResponse {
            version,
            status: status.into(),
        })
        .table()
    }

    #[test]
    fn apply_lines() {
        assert_eq!(
            applied(ApplyPolicyStatus::Created, 2),
            "policy created (version 2)"
        );
        assert_eq!(
            applied(ApplyPolicyStatus::Unchanged, 2),
            "policy unchanged (version 2)"
        );
        assert_eq!(
            applied(ApplyPolicyStatus::Valid, 3),
            "policy is valid (would be version 3)"
        );
    }

    #[test]
    fn get_shows_version_then_source() -> anyhow::Result<()> {
        let view = PolicyView::from(Policy {
            version: 2,
            yaml: "frequency:\n  - max: 3\n    per: 1d\n".into(),
            created_at_ms: 1_795_417_445_000,
        });
        let table = view.table();
        assert!(table.starts_with("version:  2\ncreated:  "), "{table}");
        assert!(
            table.ends_with("\n\nfrequency:\n  - max: 3\n    per: 1d\n"),
            "{table}"
        );
        let json: serde_json::Value = serde_json::from_str(&output::render(Format::Json, &view)?)?;
        assert_eq!(json["version"], 2);
        assert_eq!(json["created_at"], "2026-11-23T07:04:05Z");
        Ok(())
    }
}
