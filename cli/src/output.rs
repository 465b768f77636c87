//! Rendering answers as a table (for people), JSON or YAML (for scripts).
//!
//! Proto messages do not derive `Serialize`: each command converts them into small
//! view structs that do, with enum values as lowercase words and times as RFC 3339.

use std::io::{ErrorKind, Write};

use comfy_table::{Table, presets::NOTHING};
use jiff::{Timestamp, tz::TimeZone};
use serde::Serialize;

/// The `-o` flag.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Table,
    Json,
    Yaml,
}

/// A value that prints with `-o table` as well as JSON and YAML.
pub(crate) trait Tabular: Serialize {
    /// The text shown for `-o table`.
    fn table(&self) -> String;
}

/// `value` in `format`, ending without a newline.
pub(crate) fn render<T: Tabular>(format: Format, value: &T) -> anyhow::Result<String> {
    let text = match format {
        Format::Table => value.table(),
        Format::Json => serde_json::to_string_pretty(value)?,
        Format::Yaml => serde_saphyr::to_string(value)?,
    };
    Ok(text.trim_end().to_owned())
}

/// Prints `value` in `format` to stdout (a closed pipe, as in `tp run list | head`, is fine).
pub(crate) fn print<T: Tabular>(format: Format, value: &T) -> anyhow::Result<()> {
    let text = render(format, value)?;
    match writeln!(std::io::stdout().lock(), "{text}") {
        Err(err) if err.kind() != ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(()),
    }
}

/// A borderless table in kubectl's style: upper-case headers, columns apart.
pub(crate) fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table.load_style(NOTHING).set_header(header);
    for column in table.column_iter_mut() {
        column.set_padding((0, 3));
    }
    table
}

/// `name: value` lines with the values aligned.
pub(crate) fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0) + 3;
    rows.iter()
        .map(|(name, value)| {
            let line = format!("{:width$}{value}", format!("{name}:"));
            line.trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A proto time in milliseconds since the epoch; 0 (unset) is `None`.
pub(crate) fn timestamp(ms: i64) -> Option<Timestamp> {
    if ms <= 0 {
        return None;
    }
    Timestamp::from_millisecond(ms).ok()
}

/// `2026-11-23 15:04:05` in the local time zone; empty for `None`.
pub(crate) fn local_time(time: Option<Timestamp>) -> String {
    time.map(|time| {
        time.to_zoned_datetime(TimeZone::system())
            .strftime("%Y-%m-%d %H:%M:%S")
            .to_string()
    })
    .unwrap_or_default()
}

/// A proto enum value's name as a lowercase word: `RUN_STATUS_ACTIVE` → `active`.
pub(crate) fn word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(timestamp(0), None);
        assert_eq!(local_time(None), "");
        let time = timestamp(1_795_417_445_000);
        assert_eq!(
            time.map(|t| t.to_string()).as_deref(),
            Some("2026-11-23T07:04:05Z")
        );
        assert_eq!(local_time(time).len(), "2026-11-23 15:04:05".len());
    }

    #[test]
    fn words() {
        assert_eq!(word("STEP_STATUS_IN_FLIGHT", "STEP_STATUS_"), "in_flight");
    }

    #[test]
    fn aligned_fields() {
        let text = fields(&[("run", "r-1".into()), ("trace id", "abc".into())]);
        assert_eq!(text, "run:       r-1\ntrace id:  abc");
    }
}
