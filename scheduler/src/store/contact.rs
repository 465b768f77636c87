//! A contact as stored: one hash with prefixed fields, so an upsert is one HSET.

use std::collections::BTreeMap;

use serde::Serialize;

/// A person the brand can reach; also the `contact` variable of templates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ContactRecord {
    pub id: String,
    pub attrs: BTreeMap<String, String>,
    pub tags: Vec<String>,
    pub tz: String,
    pub identities: BTreeMap<String, String>,
}

impl ContactRecord {
    /// Hash fields: `id`, `tz`, `a:<attr>`, `t:<tag>`, `i:<identity kind>`.
    pub fn to_fields(&self) -> Vec<(String, String)> {
        let mut fields = vec![("id".to_owned(), self.id.clone())];
        if !self.tz.is_empty() {
            fields.push(("tz".to_owned(), self.tz.clone()));
        }
        fields.extend(
            self.attrs
                .iter()
                .map(|(k, v)| (format!("a:{k}"), v.clone())),
        );
        fields.extend(self.tags.iter().map(|t| (format!("t:{t}"), "1".to_owned())));
        fields.extend(
            self.identities
                .iter()
                .map(|(k, v)| (format!("i:{k}"), v.clone())),
        );
        fields
    }

    /// Reads the hash fields written by [`Self::to_fields`].
    pub fn from_fields<'a>(id: &str, fields: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut contact = Self {
            id: id.to_owned(),
            ..Self::default()
        };
        for (field, value) in fields {
            if let Some(attr) = field.strip_prefix("a:") {
                contact.attrs.insert(attr.to_owned(), value.to_owned());
            } else if let Some(tag) = field.strip_prefix("t:") {
                contact.tags.push(tag.to_owned());
            } else if let Some(kind) = field.strip_prefix("i:") {
                contact.identities.insert(kind.to_owned(), value.to_owned());
            } else if field == "tz" {
                contact.tz = value.to_owned();
            }
        }
        contact.tags.sort();
        contact
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let contact = ContactRecord {
            id: "c-1".into(),
            attrs: [("name".into(), "王芳".into())].into(),
            tags: vec!["a".into(), "paid".into()],
            tz: "Asia/Shanghai".into(),
            identities: [("phone".into(), "+86".into())].into(),
        };
        let fields = contact.to_fields();
        let back =
            ContactRecord::from_fields("c-1", fields.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(back, contact);
    }
}
