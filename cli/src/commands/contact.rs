//! `tp contact upsert | get`: the people a brand reaches.

use std::collections::{BTreeMap, HashMap};

use clap::{Args, Subcommand};
use serde::Serialize;
use touchpoint_proto::v1::{Contact, GetContactRequest, UpsertContactRequest};

use crate::client::Client;
use crate::commands::{count, parse_attr};
use crate::output::{self, Format, Tabular, fields};

/// The identity kinds that have a flag of their own (`--wecom`, `--phone`, `--email`)
/// and a column of their own in a contacts file.
pub(crate) const IDENTITY_KINDS: [&str; 3] = ["wecom", "phone", "email"];

#[derive(Subcommand, Debug)]
pub(crate) enum ContactCommand {
    /// Create a contact or change one: attributes and identities given are set (the
    /// others are kept), tags given are added, a time zone given replaces the old one.
    Upsert {
        /// The contact's id (e.g. the CRM's customer id).
        id: String,
        #[command(flatten)]
        fields: ContactFields,
        /// Remove this tag; repeat for more.
        #[arg(long = "remove-tag", value_name = "TAG")]
        remove_tags: Vec<String>,
        /// Remove this attribute; repeat for more.
        #[arg(long = "remove-attr", value_name = "KEY")]
        remove_attrs: Vec<String>,
    },
    /// A contact's attributes, tags, time zone and channel identities.
    Get {
        /// The contact's id.
        id: String,
    },
}

/// What a command line can say about a contact besides its id.
#[derive(Args, Debug, Default)]
pub(crate) struct ContactFields {
    /// A contact attribute; repeat for more.
    #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = parse_attr)]
    pub(crate) attrs: Vec<(String, String)>,
    /// A contact tag; repeat for more.
    #[arg(long = "tag", value_name = "TAG")]
    pub(crate) tags: Vec<String>,
    /// The contact's IANA time zone, e.g. Asia/Shanghai.
    #[arg(long)]
    pub(crate) tz: Option<String>,
    /// WeCom external user id.
    #[arg(long, value_name = "ID")]
    pub(crate) wecom: Option<String>,
    /// Phone number identity.
    #[arg(long)]
    pub(crate) phone: Option<String>,
    /// Email identity.
    #[arg(long)]
    pub(crate) email: Option<String>,
}

impl ContactFields {
    /// The contact with `id` and these fields.
    pub(crate) fn contact(&self, id: &str) -> Contact {
        let identities = IDENTITY_KINDS
            .into_iter()
            .zip([&self.wecom, &self.phone, &self.email])
            .filter_map(|(kind, value)| Some((kind.to_owned(), value.clone()?)))
            .collect();
        Contact {
            id: id.to_owned(),
            attrs: self.attrs.iter().cloned().collect(),
            tags: self.tags.clone(),
            tz: self.tz.clone().unwrap_or_default(),
            identities,
        }
    }
}

pub(crate) async fn run(
    command: ContactCommand,
    client: &Client,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        ContactCommand::Upsert {
            id,
            fields,
            remove_tags,
            remove_attrs,
        } => {
            let request = UpsertContactRequest {
                contact: Some(fields.contact(&id)),
                remove_tags,
                remove_attrs,
            };
            let contact = client
                .contacts()
                .upsert_contact(request)
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            output::print(format, &Upserted(ContactView::from(contact)))
        }
        ContactCommand::Get { id } => {
            let contact = client
                .contacts()
                .get_contact(GetContactRequest { id })
                .await
                .map_err(|status| client.error(status))?
                .into_inner();
            output::print(format, &ContactView::from(contact))
        }
    }
}

/// A contact as stored; maps sorted by key so the output is stable.
#[derive(Debug, Serialize)]
struct ContactView {
    id: String,
    tz: String,
    tags: Vec<String>,
    identities: BTreeMap<String, String>,
    attrs: BTreeMap<String, String>,
}

impl From<Contact> for ContactView {
    fn from(contact: Contact) -> Self {
        Self {
            id: contact.id,
            tz: contact.tz,
            tags: contact.tags,
            identities: sorted(contact.identities),
            attrs: sorted(contact.attrs),
        }
    }
}

fn sorted(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

impl Tabular for ContactView {
    fn table(&self) -> String {
        let header = fields(&[
            ("id", self.id.clone()),
            ("tz", self.tz.clone()),
            ("tags", self.tags.join(", ")),
        ]);
        [
            header,
            section("identities", &self.identities),
            section("attributes", &self.attrs),
        ]
        .join("\n")
    }
}

/// `title:` and then one indented, aligned `key  value` line per entry (`none` when empty).
fn section(title: &str, entries: &BTreeMap<String, String>) -> String {
    if entries.is_empty() {
        return format!("{title}:  none");
    }
    let width = entries
        .keys()
        .map(|key| key.chars().count())
        .max()
        .unwrap_or(0)
        + 3;
    let lines: Vec<String> = entries
        .iter()
        .map(|(key, value)| format!("  {key:width$}{value}").trim_end().to_owned())
        .collect();
    format!("{title}:\n{}", lines.join("\n"))
}

/// `contact upsert`: one line, or the contact as stored as JSON or YAML.
#[derive(Debug, Serialize)]
#[serde(transparent)]
struct Upserted(ContactView);

impl Tabular for Upserted {
    fn table(&self) -> String {
        let contact = &self.0;
        format!(
            "contact/{} saved ({}, {}, {})",
            contact.id,
            count(contact.attrs.len() as u64, "attribute", "attributes"),
            count(contact.tags.len() as u64, "tag", "tags"),
            count(contact.identities.len() as u64, "identity", "identities"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ContactView {
        ContactView::from(Contact {
            id: "c-1001".into(),
            attrs: [("name", "王芳"), ("city", "上海")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            tags: vec!["paid".into(), "vip".into()],
            tz: "Asia/Shanghai".into(),
            identities: [("phone", "+8613800000000"), ("email", "wang@example.com")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        })
    }

    #[test]
    fn fields_become_a_contact() {
        let fields = ContactFields {
            attrs: vec![("name".into(), "王芳".into())],
            tags: vec!["paid".into()],
            tz: Some("Asia/Shanghai".into()),
            wecom: Some("wm-1".into()),
            phone: None,
            email: Some("wang@example.com".into()),
        };
        let contact = fields.contact("c-1");
        assert_eq!(contact.id, "c-1");
        assert_eq!(contact.attrs.get("name").map(String::as_str), Some("王芳"));
        assert_eq!(contact.tags, ["paid"]);
        assert_eq!(contact.tz, "Asia/Shanghai");
        assert_eq!(contact.identities.len(), 2);
        assert_eq!(
            contact.identities.get("wecom").map(String::as_str),
            Some("wm-1")
        );
        assert!(!contact.identities.contains_key("phone"));
    }

    #[test]
    fn get_shows_everything_sorted() {
        let table = sample().table();
        let lines: Vec<&str> = table.lines().map(str::trim_end).collect();
        assert_eq!(
            lines,
            [
                "id:    c-1001",
                "tz:    Asia/Shanghai",
                "tags:  paid, vip",
                "identities:",
                "  email   wang@example.com",
                "  phone   +8613800000000",
                "attributes:",
                "  city   上海",
                "  name   王芳",
            ],
            "{table}"
        );
        let empty = ContactView::from(Contact {
            id: "c-2".into(),
            ..Contact::default()
        });
        assert!(
            empty
                .table()
                .ends_with("identities:  none\nattributes:  none"),
            "{}",
            empty.table()
        );
    }

    #[test]
    fn json_and_upsert_line() -> anyhow::Result<()> {
        let json: serde_json::Value =
            serde_json::from_str(&output::render(Format::Json, &sample())?)?;
        assert_eq!(json["identities"]["phone"], "+8613800000000");
        assert_eq!(json["attrs"]["name"], "王芳");
        assert_eq!(json["tags"], serde_json::json!(["paid", "vip"]));
        assert_eq!(
            Upserted(sample()).table(),
            "contact/c-1001 saved (2 attributes, 2 tags, 2 identities)"
        );
        let yaml: serde_json::Value =
            serde_saphyr::from_str(&output::render(Format::Yaml, &Upserted(sample()))?)?;
        assert_eq!(yaml, json);
        Ok(())
    }
}
