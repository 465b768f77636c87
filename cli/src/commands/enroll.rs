//! `tp enroll NAME --contact ID ...`: start a run for one contact.

use clap::Args;
use serde::Serialize;
use touchpoint_proto::v1::{Contact, EnrollRequest, EnrollResponse};

use crate::client::Client;
use crate::output::{self, Format, Tabular};

#[derive(Args, Debug)]
pub(crate) struct EnrollArgs {
    /// The playbook; the run starts on its latest version.
    playbook: String,
    /// The contact's id (e.g. the CRM's customer id).
    #[arg(long, value_name = "ID")]
    contact: String,
    /// A contact attribute; repeat for more.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    attrs: Vec<(String, String)>,
    /// A contact tag; repeat for more.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// The contact's IANA time zone, e.g. Asia/Shanghai.
    #[arg(long)]
    tz: Option<String>,
    /// Phone number identity.
    #[arg(long)]
    phone: Option<String>,
    /// Email identity.
    #[arg(long)]
    email: Option<String>,
    /// WeCom external user id.
    #[arg(long, value_name = "ID")]
    wecom: Option<String>,
    /// Idempotency key: sending the same one again starts no second run.
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
}

impl EnrollArgs {
    /// The request these arguments describe.
    pub(crate) fn request(&self) -> EnrollRequest {
        let identities = [
            ("wecom", &self.wecom),
            ("phone", &self.phone),
            ("email", &self.email),
        ]
        .into_iter()
        .filter_map(|(kind, id)| Some((kind.to_owned(), id.clone()?)))
        .collect();
        EnrollRequest {
            playbook: self.playbook.clone(),
            contact: Some(Contact {
                id: self.contact.clone(),
                attrs: self.attrs.iter().cloned().collect(),
                tags: self.tags.clone(),
                tz: self.tz.clone().unwrap_or_default(),
                identities,
            }),
            request_id: self.request_id.clone().unwrap_or_default(),
        }
    }
}

/// `KEY=VALUE` (the value may itself contain `=`).
fn parse_attr(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {arg:?}")),
    }
}

pub(crate) async fn run(args: EnrollArgs, client: &Client, format: Format) -> anyhow::Result<()> {
    let request = args.request();
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
    let response = client
        .enrollment()
        .enroll(request)
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    Ok(EnrolledView::new(response, playbook, request_id))
}

/// The run an enrollment started.
#[derive(Debug, Serialize)]
pub(crate) struct EnrolledView {
    pub(crate) run_id: String,
    playbook: String,
    version: u32,
    /// False when the request id had already started this run.
    created: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    request_id: String,
}

impl EnrolledView {
    fn new(response: EnrollResponse, playbook: String, request_id: String) -> Self {
        Self {
            run_id: response.run_id,
            playbook,
            version: response.version,
            created: response.created,
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
            created,
            request_id,
        } = self;
        if *created {
            format!("run/{run_id} started ({playbook} v{version})")
        } else {
            format!("run/{run_id} already started by request {request_id}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs() {
        assert_eq!(parse_attr("name=王芳"), Ok(("name".into(), "王芳".into())));
        assert_eq!(parse_attr("empty="), Ok(("empty".into(), String::new())));
        assert_eq!(parse_attr("url=a=b"), Ok(("url".into(), "a=b".into())));
        assert!(parse_attr("name").is_err());
        assert!(parse_attr("=x").is_err());
    }

    #[test]
    fn enroll_lines() {
        let response = EnrollResponse {
            run_id: "r-1".into(),
            version: 3,
            created: true,
        };
        let view = EnrolledView::new(response.clone(), "welcome-new-customer".into(), "".into());
        assert_eq!(view.table(), "run/r-1 started (welcome-new-customer v3)");
        let replay = EnrollResponse {
            created: false,
            ..response
        };
        let view = EnrolledView::new(replay, "welcome-new-customer".into(), "req-7".into());
        assert_eq!(view.table(), "run/r-1 already started by request req-7");
    }
}
