//! `tp event send`: report something a contact did (e.g. `order.placed`).

use clap::{Args, Subcommand};
use serde::Serialize;
use touchpoint_proto::v1::{RecordEventRequest, RecordEventResponse};

use crate::client::Client;
use crate::commands::parse_attr;
use crate::output::{self, Format, Tabular, fields};

#[derive(Subcommand, Debug)]
pub(crate) enum EventCommand {
    /// Record an event of a contact: it converts runs whose goal it is, wakes runs
    /// waiting for it and starts runs of playbooks it is the entry event of.
    Send(SendArgs),
}

#[derive(Args, Debug)]
pub(crate) struct SendArgs {
    /// The contact the event is about.
    contact_id: String,
    /// The event's name, e.g. order.placed.
    event: String,
    /// A fact of the event (`event.attrs` in templates); repeat for more.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    attrs: Vec<(String, String)>,
    /// Idempotency key: sending the same one again does nothing new.
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
}

pub(crate) async fn run(
    command: EventCommand,
    client: &Client,
    format: Format,
) -> anyhow::Result<()> {
    let EventCommand::Send(args) = command;
    let request = RecordEventRequest {
        contact_id: args.contact_id.clone(),
        name: args.event.clone(),
        attrs: args.attrs.into_iter().collect(),
        request_id: args.request_id.unwrap_or_default(),
    };
    let response = client
        .events()
        .record_event(request)
        .await
        .map_err(|status| client.error(status))?
        .into_inner();
    output::print(
        format,
        &RecordedView::new(response, args.contact_id, args.event),
    )
}

/// What recording an event did.
#[derive(Debug, Serialize)]
struct RecordedView {
    contact_id: String,
    event: String,
    /// The request id was seen before: nothing was done again.
    duplicate: bool,
    woken_run_ids: Vec<String>,
    converted_run_ids: Vec<String>,
    started_run_ids: Vec<String>,
    /// Entry playbooks that started no run, with why.
    not_started: Vec<String>,
}

impl RecordedView {
    fn new(response: RecordEventResponse, contact_id: String, event: String) -> Self {
        Self {
            contact_id,
            event,
            duplicate: response.duplicate,
            woken_run_ids: response.woken_run_ids,
            converted_run_ids: response.converted_run_ids,
            started_run_ids: response.started_run_ids,
            not_started: response.not_started,
        }
    }
}

impl Tabular for RecordedView {
    fn table(&self) -> String {
        let Self {
            contact_id,
            event,
            duplicate,
            ..
        } = self;
        let head = if *duplicate {
            format!(
                "event/{event} of contact/{contact_id} was already recorded: nothing done again"
            )
        } else {
            format!("event/{event} of contact/{contact_id} recorded")
        };
        let runs = |ids: &[String]| {
            if ids.is_empty() {
                "none".to_owned()
            } else {
                ids.iter()
                    .map(|id| format!("run/{id}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        let not_started = if self.not_started.is_empty() {
            "none".to_owned()
        } else {
            self.not_started.join("; ")
        };
        let details = fields(&[
            ("converted", runs(&self.converted_run_ids)),
            ("woken", runs(&self.woken_run_ids)),
            ("started", runs(&self.started_run_ids)),
            ("not started", not_started),
        ]);
        format!("{head}\n{details}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_list_every_effect() -> anyhow::Result<()> {
        let response = RecordEventResponse {
            duplicate: false,
            woken_run_ids: vec!["r-1".into()],
            converted_run_ids: vec!["r-2".into(), "r-3".into()],
            started_run_ids: vec![],
            not_started: vec!["vip-upsell: reentry: never".into()],
        };
        let view = RecordedView::new(response, "c-1".into(), "order.placed".into());
        assert_eq!(
            view.table(),
            "event/order.placed of contact/c-1 recorded\n\
             converted:    run/r-2, run/r-3\n\
             woken:        run/r-1\n\
             started:      none\n\
             not started:  vip-upsell: reentry: never"
        );
        let json: serde_json::Value = serde_json::from_str(&output::render(Format::Json, &view)?)?;
        assert_eq!(json["converted_run_ids"], serde_json::json!(["r-2", "r-3"]));
        assert_eq!(json["duplicate"], false);
        assert_eq!(json["not_started"][0], "vip-upsell: reentry: never");

        let replay = RecordedView::new(
            RecordEventResponse {
                duplicate: true,
                ..RecordEventResponse::default()
            },
            "c-1".into(),
            "order.placed".into(),
        );
        assert!(
            replay
                .table()
                .starts_with("event/order.placed of contact/c-1 was already recorded"),
            "{}",
            replay.table()
        );
        Ok(())
    }
}
