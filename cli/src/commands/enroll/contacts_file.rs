//! Contacts files for bulk enrollment, read one contact at a time (never whole):
//!
//! - CSV with a header line: `id` (required), `tags` (separated by `;`), `tz`, the
//!   identities `phone`, `email` and `wecom`, and any other column as an attribute; an
//!   empty cell sets nothing. Cells are trimmed.
//! - JSONL: one `{"id", "attrs", "tags", "tz", "identities"}` object per line; other keys
//!   are an error for that line; blank lines are skipped.
//!
//! A bad line is a [`Record`] with what is wrong, and reading goes on; only a file that
//! cannot be read (or a CSV header that makes no sense) stops it.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use serde::Deserialize;
use serde_json::Value;
use touchpoint_proto::v1::Contact;

use crate::commands::contact::IDENTITY_KINDS;

/// The format of a contacts file.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileFormat {
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

impl FileFormat {
    /// The format a file name's extension tells (`.csv`; `.jsonl` or `.ndjson`), if any.
    pub(crate) fn from_path(path: &Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "csv" => Some(Self::Csv),
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            _ => None,
        }
    }
}

/// One contact of a file, or what is wrong with its line.
#[derive(Debug, PartialEq)]
pub(crate) struct Record {
    /// The line the contact starts on (the file's first line is 1).
    pub(crate) line: u64,
    pub(crate) contact: Result<Contact, String>,
}

/// Contacts read one at a time from a CSV or JSONL stream.
#[derive(Debug)]
pub(crate) enum ContactReader<R: Read> {
    Csv(CsvContacts<R>),
    Jsonl(JsonlContacts<R>),
}

impl<R: Read> ContactReader<R> {
    /// A reader of `input` in `format` (for CSV, this reads the header).
    pub(crate) fn new(format: FileFormat, input: R) -> anyhow::Result<Self> {
        Ok(match format {
            FileFormat::Csv => Self::Csv(CsvContacts::new(input)?),
            FileFormat::Jsonl => Self::Jsonl(JsonlContacts::new(input)),
        })
    }

    /// Bytes of the input consumed by the records read so far.
    pub(crate) fn bytes_read(&self) -> u64 {
        match self {
            Self::Csv(csv) => csv.reader.position().byte(),
            Self::Jsonl(jsonl) => jsonl.bytes,
        }
    }
}

impl<R: Read> Iterator for ContactReader<R> {
    /// A record, or an error that stops reading (the input cannot be read).
    type Item = anyhow::Result<Record>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::Csv(csv) => csv.next_record().transpose(),
            Self::Jsonl(jsonl) => jsonl.next_record().transpose(),
        }
    }
}

/// What a CSV column holds.
#[derive(Debug, Clone, PartialEq)]
enum Column {
    Id,
    Tags,
    Tz,
    Identity(String),
    Attr(String),
}

/// Contacts of a CSV stream.
#[derive(Debug)]
pub(crate) struct CsvContacts<R: Read> {
    reader: csv::Reader<EndWithNewline<R>>,
    columns: Vec<Column>,
    record: csv::ByteRecord,
}

impl<R: Read> CsvContacts<R> {
    fn new(input: R) -> anyhow::Result<Self> {
        // Records end at `\n` only (a `\r` before it is trimmed with the last cell), so
        // the line count after a record tells where it started (see `next_record`).
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .terminator(csv::Terminator::Any(b'\n'))
            .from_reader(EndWithNewline::new(input));
        let header = reader
            .byte_headers()
            .context("cannot read the header (line 1)")?;
        let columns = columns(header)?;
        Ok(Self {
            reader,
            columns,
            record: csv::ByteRecord::new(),
        })
    }

    fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        loop {
            // Flexible and reading bytes: only reading the input can fail.
            if !self
                .reader
                .read_byte_record(&mut self.record)
                .context("cannot read the file")?
            {
                return Ok(None);
            }
            if self.record.len() == 1 && self.record.as_slice().trim_ascii().is_empty() {
                continue; // a line of blanks
            }
            // Every record ends with its line's `\n`, so the reader is on the line after
            // it; quoted cells may span lines.
            let newlines = self
                .record
                .as_slice()
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            let line = self
                .reader
                .position()
                .line()
                .saturating_sub(1 + newlines as u64);
            let contact = contact_of_row(&self.columns, &self.record);
            return Ok(Some(Record { line, contact }));
        }
    }
}

/// `input`, with a `\n` added when its last line has none, so that every CSV record
/// ends with one.
#[derive(Debug)]
struct EndWithNewline<R> {
    input: R,
    last: Option<u8>,
    done: bool,
}

impl<R> EndWithNewline<R> {
    fn new(input: R) -> Self {
        Self {
            input,
            last: None,
            done: false,
        }
    }
}

impl<R: Read> Read for EndWithNewline<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let read = self.input.read(buf)?;
        if let Some(&last) = buf.get(..read).and_then(<[u8]>::last) {
            self.last = Some(last);
            return Ok(read);
        }
        self.done = true;
        match (self.last, buf.first_mut()) {
            (Some(last), Some(first)) if last != b'\n' => {
                *first = b'\n';
                Ok(1)
            }
            _ => Ok(0),
        }
    }
}

/// A CSV cell as trimmed text; `column` counts from 1.
fn cell(bytes: &[u8], column: usize) -> Result<&str, String> {
    std::str::from_utf8(bytes)
        .map(str::trim)
        .map_err(|_| format!("column {column} is not valid UTF-8"))
}

/// The meaning of each column of a CSV header.
fn columns(header: &csv::ByteRecord) -> anyhow::Result<Vec<Column>> {
    if header.is_empty() {
        bail!("the file is empty: expected a header line naming the columns, with `id` among them");
    }
    let mut seen = HashSet::new();
    let mut columns = Vec::with_capacity(header.len());
    for (index, name) in header.iter().enumerate() {
        let name = cell(name, index + 1).map_err(|err| anyhow!("the header (line 1): {err}"))?;
        // A UTF-8 byte order mark, as spreadsheets write, is not part of the first name.
        let name = name.trim_start_matches('\u{feff}').trim();
        if name.is_empty() {
            bail!("column {} of the header (line 1) has no name", index + 1);
        }
        if !seen.insert(name.to_owned()) {
            bail!("column `{name}` appears twice in the header (line 1)");
        }
        columns.push(match name {
            "id" => Column::Id,
            "tags" => Column::Tags,
            "tz" => Column::Tz,
            _ if IDENTITY_KINDS.contains(&name) => Column::Identity(name.to_owned()),
            _ => Column::Attr(name.to_owned()),
        });
    }
    if !columns.contains(&Column::Id) {
        bail!("the header (line 1) has no `id` column");
    }
    Ok(columns)
}

/// The contact of one CSV row.
fn contact_of_row(columns: &[Column], row: &csv::ByteRecord) -> Result<Contact, String> {
    if row.len() != columns.len() {
        return Err(format!(
            "expected {} columns, found {}",
            columns.len(),
            row.len()
        ));
    }
    let mut contact = Contact::default();
    for (index, (column, value)) in columns.iter().zip(row.iter()).enumerate() {
        let value = cell(value, index + 1)?;
        if value.is_empty() {
            continue;
        }
        match column {
            Column::Id => value.clone_into(&mut contact.id),
            Column::Tags => contact.tags = split_tags(value),
            Column::Tz => value.clone_into(&mut contact.tz),
            Column::Identity(kind) => {
                contact.identities.insert(kind.clone(), value.to_owned());
            }
            Column::Attr(key) => {
                contact.attrs.insert(key.clone(), value.to_owned());
            }
        }
    }
    if contact.id.is_empty() {
        return Err("empty id".to_owned());
    }
    Ok(contact)
}

/// `paid; vip;` → `["paid", "vip"]`.
fn split_tags(cell: &str) -> Vec<String> {
    cell.split(';')
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Contacts of a JSONL stream.
#[derive(Debug)]
pub(crate) struct JsonlContacts<R: Read> {
    reader: BufReader<R>,
    line: u64,
    bytes: u64,
    buffer: Vec<u8>,
}

/// One JSONL line as written: anything but these keys is an error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonContact {
    id: Option<Value>,
    #[serde(default)]
    attrs: HashMap<String, Value>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    tz: Option<String>,
    #[serde(default)]
    identities: HashMap<String, String>,
}

impl<R: Read> JsonlContacts<R> {
    fn new(input: R) -> Self {
        Self {
            reader: BufReader::new(input),
            line: 0,
            bytes: 0,
            buffer: Vec::new(),
        }
    }

    fn next_record(&mut self) -> anyhow::Result<Option<Record>> {
        loop {
            self.buffer.clear();
            let read = self
                .reader
                .read_until(b'\n', &mut self.buffer)
                .context("cannot read the file")?;
            if read == 0 {
                return Ok(None);
            }
            self.line += 1;
            self.bytes += read as u64;
            if self.buffer.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return Ok(Some(Record {
                line: self.line,
                contact: contact_of_json(&self.buffer),
            }));
        }
    }
}

/// The contact of one JSONL line.
fn contact_of_json(line: &[u8]) -> Result<Contact, String> {
    let value: Value = serde_json::from_slice(line).map_err(|err| {
        let message = err.to_string();
        let message = message
            .rsplit_once(" at line ")
            .map_or(message.as_str(), |(message, _)| message);
        format!("invalid JSON: {message} (column {})", err.column())
    })?;
    if !value.is_object() {
        return Err("expected a JSON object, e.g. {\"id\": \"c-1001\"}".to_owned());
    }
    let written: JsonContact = serde_json::from_value(value).map_err(|err| err.to_string())?;
    let id = match written.id {
        None | Some(Value::Null) => return Err("missing id".to_owned()),
        Some(id) => scalar(&id).ok_or("id: expected a string")?,
    };
    let id = id.trim();
    if id.is_empty() {
        return Err("empty id".to_owned());
    }
    let mut attrs = HashMap::with_capacity(written.attrs.len());
    for (key, value) in written.attrs {
        let value =
            scalar(&value).ok_or_else(|| format!("attrs.{key}: expected a string or a number"))?;
        attrs.insert(key, value);
    }
    Ok(Contact {
        id: id.to_owned(),
        attrs,
        tags: written.tags,
        tz: written.tz.unwrap_or_default(),
        identities: written.identities,
    })
}

/// A string, number or boolean as text; `None` for anything else.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(format: FileFormat, text: &str) -> anyhow::Result<Vec<Record>> {
        ContactReader::new(format, text.as_bytes())?.collect()
    }

    /// `(line, id or error)` of every record.
    fn summary(records: &[Record]) -> Vec<(u64, String)> {
        records
            .iter()
            .map(|record| match &record.contact {
                Ok(contact) => (record.line, contact.id.clone()),
                Err(err) => (record.line, format!("error: {err}")),
            })
            .collect()
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    #[test]
    fn formats_from_extensions() {
        assert_eq!(
            FileFormat::from_path(Path::new("a/contacts.csv")),
            Some(FileFormat::Csv)
        );
        assert_eq!(
            FileFormat::from_path(Path::new("contacts.JSONL")),
            Some(FileFormat::Jsonl)
        );
        assert_eq!(
            FileFormat::from_path(Path::new("contacts.ndjson")),
            Some(FileFormat::Jsonl)
        );
        assert_eq!(FileFormat::from_path(Path::new("contacts.txt")), None);
        assert_eq!(FileFormat::from_path(Path::new("-")), None);
    }

    #[test]
    fn csv_columns_become_fields() -> anyhow::Result<()> {
        let text = "id,name,tags,tz,phone,email,wecom,city\n\
                    c-1, 王芳 ,paid; vip,Asia/Shanghai,+8613800000000,wang@example.com,wm-1,上海\n\
                    c-2,,,,,,,\n";
        let records = read(FileFormat::Csv, text)?;
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].line, 2);
        assert_eq!(
            records[0].contact,
            Ok(Contact {
                id: "c-1".into(),
                attrs: map(&[("name", "王芳"), ("city", "上海")]),
                tags: vec!["paid".into(), "vip".into()],
                tz: "Asia/Shanghai".into(),
                identities: map(&[
                    ("phone", "+8613800000000"),
                    ("email", "wang@example.com"),
                    ("wecom", "wm-1")
                ]),
            })
        );
        // Empty cells set nothing.
        assert_eq!(
            records[1].contact,
            Ok(Contact {
                id: "c-2".into(),
                ..Contact::default()
            })
        );
        Ok(())
    }

    #[test]
    fn csv_bad_lines_are_reported_with_their_line_numbers() -> anyhow::Result<()> {
        let text = "id,name\n\
                    c-1,a\n\
                    c-2,b,extra\n\
                    ,c\n\
                    c-4\n\
                    \"c-5\",\"two\nlines\"\n\
                    c-6,f\n";
        let records = read(FileFormat::Csv, text)?;
        assert_eq!(
            summary(&records),
            [
                (2, "c-1".to_owned()),
                (3, "error: expected 2 columns, found 3".to_owned()),
                (4, "error: empty id".to_owned()),
                (5, "error: expected 2 columns, found 1".to_owned()),
                (6, "c-5".to_owned()),
                // The quoted cell spans lines 6 and 7.
                (8, "c-6".to_owned()),
            ]
        );
        let Ok(c5) = &records[4].contact else {
            panic!("c-5 should parse");
        };
        assert_eq!(c5.attrs.get("name").map(String::as_str), Some("two\nlines"));
        Ok(())
    }

    #[test]
    fn csv_not_utf8_is_a_bad_line_and_reading_goes_on() -> anyhow::Result<()> {
        let mut bytes = b"id,name\nc-1,a\nc-2,".to_vec();
        bytes.extend([0xff, 0xfe]);
        bytes.extend(b"\nc-3,c\n");
        let records: Vec<Record> =
            ContactReader::new(FileFormat::Csv, bytes.as_slice())?.collect::<Result<_, _>>()?;
        assert_eq!(
            summary(&records),
            [
                (2, "c-1".to_owned()),
                (3, "error: column 2 is not valid UTF-8".to_owned()),
                (4, "c-3".to_owned()),
            ]
        );
        Ok(())
    }

    #[test]
    fn csv_header_problems_stop_reading() {
        let cases = [
            ("", "the file is empty"),
            ("name,tags\nx,y\n", "the header (line 1) has no `id` column"),
            ("id,,name\n", "column 2 of the header (line 1) has no name"),
            (
                "id,name,name\n",
                "column `name` appears twice in the header (line 1)",
            ),
        ];
        for (text, expected) in cases {
            let err = read(FileFormat::Csv, text)
                .err()
                .map(|err| err.to_string())
                .unwrap_or_default();
            assert!(err.starts_with(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn csv_byte_order_mark_crlf_and_offsets() -> anyhow::Result<()> {
        let text = "\u{feff}id,name\r\nc-1,a\r\nc-2,b\r\n";
        let mut reader = ContactReader::new(FileFormat::Csv, text.as_bytes())?;
        let first = reader.next().transpose()?;
        assert_eq!(first.map(|r| r.line), Some(2));
        assert_eq!(
            reader.bytes_read(),
            "\u{feff}id,name\r\nc-1,a\r\n".len() as u64
        );
        let second = reader.next().transpose()?;
        assert_eq!(
            second.and_then(|r| r.contact.ok()).map(|c| c.id),
            Some("c-2".to_owned())
        );
        assert!(reader.next().is_none());
        assert_eq!(reader.bytes_read(), text.len() as u64);
        Ok(())
    }

    #[test]
    fn csv_blank_lines_count_and_the_last_line_needs_no_newline() -> anyhow::Result<()> {
        let text = "id,name\n\nc-1,a\n  \n\r\n\"c-2\",\"b\"\r\n\nc-3,\"x\ny\"";
        let records = read(FileFormat::Csv, text)?;
        assert_eq!(
            summary(&records),
            [
                (3, "c-1".to_owned()),
                (6, "c-2".to_owned()),
                (8, "c-3".to_owned()),
            ]
        );
        let Ok(c2) = &records[1].contact else {
            panic!("c-2 should parse");
        };
        assert_eq!(c2.attrs.get("name").map(String::as_str), Some("b"));
        Ok(())
    }

    #[test]
    fn jsonl_objects_become_contacts() -> anyhow::Result<()> {
        let text = r#"{"id": "c-1", "attrs": {"name": "王芳", "age": 31, "vip": true}, "tags": ["paid"], "tz": "Asia/Shanghai", "identities": {"phone": "+8613800000000"}}

{"id": 1002}
"#;
        let records = read(FileFormat::Jsonl, text)?;
        assert_eq!(
            records[0],
            Record {
                line: 1,
                contact: Ok(Contact {
                    id: "c-1".into(),
                    attrs: map(&[("name", "王芳"), ("age", "31"), ("vip", "true")]),
                    tags: vec!["paid".into()],
                    tz: "Asia/Shanghai".into(),
                    identities: map(&[("phone", "+8613800000000")]),
                }),
            }
        );
        // The blank line is skipped, but counted.
        assert_eq!(summary(&records[1..]), [(3, "1002".to_owned())]);
        Ok(())
    }

    #[test]
    fn jsonl_bad_lines_are_reported_with_their_line_numbers() -> anyhow::Result<()> {
        let text = "{\"id\": \"c-1\"}\n\
                    {\"id\": \"c-2\", \"name\": \"x\"}\n\
                    {\"attrs\": {}}\n\
                    {\"id\": \"  \"}\n\
                    {\"id\": \"c-5\",\n\
                    [1, 2]\n\
                    {\"id\": \"c-7\", \"attrs\": {\"a\": [1]}}\n\
                    \r\n\
                    {\"id\": \"c-9\"}";
        let records = read(FileFormat::Jsonl, text)?;
        let lines = summary(&records);
        assert_eq!(lines[0], (1, "c-1".to_owned()));
        assert_eq!(lines[1].0, 2);
        assert!(
            lines[1].1.starts_with("error: unknown field `name`"),
            "{lines:?}"
        );
        assert_eq!(lines[2], (3, "error: missing id".to_owned()));
        assert_eq!(lines[3], (4, "error: empty id".to_owned()));
        assert_eq!(lines[4].0, 5);
        assert!(lines[4].1.starts_with("error: invalid JSON: "), "{lines:?}");
        assert!(!lines[4].1.contains("line"), "{lines:?}");
        assert_eq!(
            lines[5],
            (
                6,
                "error: expected a JSON object, e.g. {\"id\": \"c-1001\"}".to_owned()
            )
        );
        assert_eq!(
            lines[6],
            (
                7,
                "error: attrs.a: expected a string or a number".to_owned()
            )
        );
        // Line 8 is blank; the last line has no newline.
        assert_eq!(lines[7], (9, "c-9".to_owned()));
        assert_eq!(lines.len(), 8);
        Ok(())
    }
}
