//! `tp enroll NAME --contact ID ...`: start a run for one contact;
//! `tp enroll NAME --file FILE`: for every contact of a CSV or JSONL file ([`bulk`]).

mod bulk;
mod contacts_file;

use std::path::PathBuf;

use clap::{ArgGroup, Args};
use serde::Serialize;
use touchpoint_proto::v1::{EnrollRequest, EnrollResponse};

use crate::client::Client;
use crate::commands::contact::ContactFields;
use crate::output::{self, Format, Tabular};

use contacts_file::FileFormat;

/// `tp enroll --help`, after the options: the contacts file formats and reruns.
const FILE_HELP: &str = "\
Contacts files (--file):
  CSV    A header line, then one contact per line. `id` is required; `tags` holds tags
         separated by `;`; `tz` is the time zone; `phone`, `email` and `wecom` become
         identities; every other column is an attribute. An empty cell sets nothing.
  JSONL  One object per line: {\"id\": \"c-1001\", \"attrs\": {\"name\": \"王芳\"},
         \"tags\": [\"paid\"], \"tz\": \"Asia/Shanghai\", \"identities\": {\"phone\": \"...\"}};
         other keys are an error. Blank lines are skipped.
  The format comes from the extension (.csv, .jsonl, .ndjson) unless --format says;
  `--file -` reads stdin and needs --format.

  A bad line (wrong number of columns, no id, invalid JSON, or refused by the scheduler)
  is reported on stderr as `line N: what is wrong` and skipped; the others are enrolled,
  and tp exits with 1 at the end. A summary counts contacts read, started, already
  enrolled, not started (the playbook's reentry refused them) and bad lines.

  Reruns are safe: each contact's request id is `bulk:<playbook>:<contact id>`, so
  running the same file again within 24 h starts nobody twice (they count as already
  enrolled); after that, the playbook's `reentry` decides.";

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("source").required(true).args(["contact", "file"])))]
#[command(after_long_help = FILE_HELP)]
pub(crate) struct EnrollArgs {
    /// The playbook; runs start on its latest version.
    playbook: String,
    /// The contact's id (e.g. the CRM's customer id).
    #[arg(long, value_name = "ID")]
    contact: Option<String>,
    #[command(flatten)]
    fields: ContactFields,
    /// Idempotency key: sending the same one again starts no second run.
    #[arg(long, value_name = "ID", conflicts_with = "file")]
    request_id: Option<String>,
    /// Enroll every contact of a CSV or JSONL file (`-`: stdin); running the same file
    /// again within 24 h starts nobody twice (formats: see --help).
    #[arg(short = 'f', long, value_name = "FILE")]
    #[arg(conflicts_with_all = ["attrs", "tags", "tz", "wecom", "phone", "email"])]
    file: Option<PathBuf>,
    /// The file's format (default: from its extension).
    #[arg(
        long,
        value_enum,
        conflicts_with = "contact",
        required_if_eq("file", "-")
    )]
    format: Option<FileFormat>,
}

impl EnrollArgs {
    /// The single enrollment these arguments describe (`None` for a file).
    pub(crate) fn request(&self) -> Option<EnrollRequest> {
        let id = self.contact.as_deref()?;
        Some(EnrollRequest {
            playbook: self.playbook.clone(),
            contact: Some(self.fields.contact(id)),
            request_id: self.request_id.clone().unwrap_or_default(),
        })
    }
}

pub(crate) async fn run(args: EnrollArgs, client: &Client, format: Format) -> anyhow::Result<()> {
    if let Some(file) = &args.file {
        return bulk::run(args.playbook, file, args.format, client, format).await;
    }
    // clap requires --contact or --file.
    let Some(request) = args.request() else {
        anyhow::bail!("give --contact ID or --file FILE");
    };
    let enrolled = enroll(client, request).await?;
    output::print(format, &enrolled)
}

/// Starts a run (or finds the one its request id already started).
pub(crate) async fn enroll(
    client: &Client,
    request: EnrollRequest,
) -> anyhow::Result<EnrolledView> {
    let playbook = request.playbook.clone();
    let request_id = request.request_id.clone();
    let contact_id = request
        .contact
        .as_ref()
        .map(|contact| contact.id.clone())
        .unwrap_or_default();
    let response = client
        .enrollment()
        .enroll(request)
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    Ok(EnrolledView::new(
        response, playbook, contact_id, request_id,
    ))
}

/// The run an enrollment started (or why it started none).
#[derive(Debug, Serialize)]
pub(crate) struct EnrolledView {
    pub(crate) run_id: String,
    playbook: String,
    version: u32,
    contact_id: String,
    /// False when the request id had already started this run, or when the playbook's
    /// `reentry` refused a new run (then `not_started` says why).
    created: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    not_started: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    request_id: String,
}

impl EnrolledView {
    fn new(
        response: EnrollResponse,
        playbook: String,
        contact_id: String,
        request_id: String,
    ) -> Self {
        Self {
            run_id: response.run_id,
            playbook,
            version: response.version,
            contact_id,
            created: response.created,
            not_started: response.not_started,
            request_id,
        }
    }
}

impl Tabular for EnrolledView {
    fn table(&self) -> String {
        let Self {
            run_id,
            playbook,
            version,
            contact_id,
            created,
            not_started,
            request_id,
        } = self;
        if *created {
            format!("run/{run_id} started ({playbook} v{version})")
        } else if !not_started.is_empty() {
            let last = if run_id.is_empty() {
                String::new()
            } else {
                format!(" (last run: run/{run_id})")
            };
            format!("contact/{contact_id} not started on {playbook}: {not_started}{last}")
        } else {
            format!("run/{run_id} already started by request {request_id}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_lines() {
        let response = EnrollResponse {
            run_id: "r-1".into(),
            version: 3,
            created: true,
            not_started: String::new(),
        };
        let view = |response: &EnrollResponse, request_id: &str| {
            EnrolledView::new(
                response.clone(),
                "welcome-new-customer".into(),
                "c-1".into(),
                request_id.into(),
            )
        };
        assert_eq!(
            view(&response, "").table(),
            "run/r-1 started (welcome-new-customer v3)"
        );
        let replay = EnrollResponse {
            created: false,
            ..response.clone()
        };
        assert_eq!(
            view(&replay, "req-7").table(),
            "run/r-1 already started by request req-7"
        );
        let refused = EnrollResponse {
            created: false,
            not_started: "reentry: never".into(),
            ..response
        };
        assert_eq!(
            view(&refused, "").table(),
            "contact/c-1 not started on welcome-new-customer: reentry: never (last run: run/r-1)"
        );
        let refused = EnrollResponse {
            run_id: String::new(),
            ..refused
        };
        assert_eq!(
            view(&refused, "").table(),
            "contact/c-1 not started on welcome-new-customer: reentry: never"
        );
    }

    #[test]
    fn json_says_why_nothing_started() -> anyhow::Result<()> {
        let view = EnrolledView::new(
            EnrollResponse {
                run_id: "r-1".into(),
                version: 2,
                created: false,
                not_started: "reentry: after 3d".into(),
            },
            "welcome".into(),
            "c-1".into(),
            String::new(),
        );
        let json: serde_json::Value = serde_json::from_str(&output::render(Format::Json, &view)?)?;
        assert_eq!(json["created"], false);
        assert_eq!(json["not_started"], "reentry: after 3d");
        assert!(json.get("request_id").is_none(), "{json}");
        Ok(())
    }
}
