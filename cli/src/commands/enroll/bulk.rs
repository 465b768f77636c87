//! `tp enroll NAME --file FILE`: every contact of a CSV or JSONL file, streamed in
//! `EnrollBatch` calls of [`BATCH_SIZE`], [`IN_FLIGHT`] at a time, with a progress bar.
//!
//! Each contact's request id is `bulk:<playbook>:<contact id>`, so a rerun of the same
//! file starts nobody twice (while the scheduler remembers request ids).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::mpsc;
use touchpoint_proto::v1::{EnrollBatchRequest, EnrollBatchResponse, EnrollItem};

use super::contacts_file::{ContactReader, FileFormat, Record};
use crate::client::Client;
use crate::commands::{UsageError, count};
use crate::output::{self, Format, Tabular, fields};

/// Contacts per `EnrollBatch` call (the scheduler takes at most 1000).
const BATCH_SIZE: usize = 500;
/// `EnrollBatch` calls in flight at once.
const IN_FLIGHT: usize = 4;
/// Distinct "not started" reasons the summary counts one by one; the rest are "other".
const MAX_REASONS: usize = 10;

/// The request id of `contact_id`'s enrollment into `playbook` from a file.
pub(crate) fn request_id(playbook: &str, contact_id: &str) -> String {
    format!("bulk:{playbook}:{contact_id}")
}

/// Enrolls every contact of `file` (`-`: stdin) into `playbook`, then prints a summary.
/// Fails (after finishing) when any line was bad.
pub(crate) async fn run(
    playbook: String,
    file: &Path,
    format: Option<FileFormat>,
    client: &Client,
    output: Format,
) -> anyhow::Result<()> {
    let stdin = file.as_os_str() == "-";
    let Some(file_format) = format.or_else(|| FileFormat::from_path(file)) else {
        let message = if stdin {
            "reading contacts from stdin needs --format csv|jsonl".to_owned()
        } else {
            format!(
                "cannot tell the format of {} from its name: give --format csv|jsonl",
                file.display()
            )
        };
        return Err(UsageError(message).into());
    };
    let (input, size): (Box<dyn Read + Send>, Option<u64>) = if stdin {
        (Box::new(std::io::stdin()), None)
    } else {
        let opened = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let size = opened.metadata().ok().map(|metadata| metadata.len());
        (Box::new(opened), size)
    };
    let progress = progress_bar(size, output);

    let (batches_tx, batches) = mpsc::channel(IN_FLIGHT);
    let reading = {
        let playbook = playbook.clone();
        tokio::task::spawn_blocking(move || {
            read_batches(file_format, input, &playbook, &batches_tx)
        })
    };
    let batches = futures::stream::unfold(batches, |mut batches| async move {
        batches.recv().await.map(|batch| (batch, batches))
    });
    let answers = batches
        .map(|batch: anyhow::Result<Batch>| async move {
            let batch = batch?;
            let response = send(client, &batch).await;
            Ok::<_, anyhow::Error>((batch, response))
        })
        .buffered(IN_FLIGHT);
    let mut answers = std::pin::pin!(answers);

    let mut summary = Summary::new(playbook);
    while let Some(answer) = answers.next().await {
        let (batch, response) = answer?;
        let response = response.map_err(|err| {
            if summary.enrolled() > 0 {
                err.context(format!(
                    "stopped after {} of the file's contacts (running it again starts nobody twice)",
                    summary.enrolled()
                ))
            } else {
                err
            }
        })?;
        let bad = summary.add(&batch, response)?;
        progress.suspend(|| {
            for (line, what) in bad {
                eprintln!("line {line}: {what}");
            }
        });
        progress.set_position(batch.end_offset);
        progress.set_message(rate(summary.read, progress.elapsed()));
    }
    // The reader has sent its last batch (or its error) and ended.
    reading.await.context("the file reader stopped")?;
    progress.finish_and_clear();

    output::print(output, &summary)?;
    if summary.bad_lines > 0 {
        bail!(
            "{} in the file (see above); every other line was enrolled",
            count(summary.bad_lines, "bad line", "bad lines")
        );
    }
    Ok(())
}

/// Up to [`BATCH_SIZE`] contacts of consecutive lines, and the bad lines among them.
#[derive(Debug)]
struct Batch {
    request: EnrollBatchRequest,
    /// The line of each item of `request`.
    lines: Vec<u64>,
    /// Lines that could not be read, with what is wrong.
    bad: Vec<(u64, String)>,
    /// Records (good and bad lines) in the batch.
    records: u64,
    /// Bytes of the file consumed after the batch's last line.
    end_offset: u64,
}

impl Batch {
    fn new(playbook: &str) -> Self {
        Self {
            request: EnrollBatchRequest {
                playbook: playbook.to_owned(),
                items: Vec::with_capacity(BATCH_SIZE),
            },
            lines: Vec::with_capacity(BATCH_SIZE),
            bad: Vec::new(),
            records: 0,
            end_offset: 0,
        }
    }

    fn push(&mut self, record: Record) {
        self.records += 1;
        match record.contact {
            Ok(contact) => {
                let request_id = request_id(&self.request.playbook, &contact.id);
                self.request.items.push(EnrollItem {
                    contact: Some(contact),
                    request_id,
                });
                self.lines.push(record.line);
            }
            Err(what) => self.bad.push((record.line, what)),
        }
    }

    fn is_full(&self) -> bool {
        self.request.items.len() + self.bad.len() >= BATCH_SIZE
    }
}

/// Reads `input` into batches sent to `batches`, until the end, an error (sent too) or
/// the receiver hanging up. Runs on a blocking thread: the file is read synchronously.
fn read_batches(
    format: FileFormat,
    input: Box<dyn Read + Send>,
    playbook: &str,
    batches: &mpsc::Sender<anyhow::Result<Batch>>,
) {
    let mut contacts = match ContactReader::new(format, input) {
        Ok(contacts) => contacts,
        Err(err) => {
            let _ = batches.blocking_send(Err(err));
            return;
        }
    };
    let mut batch = Batch::new(playbook);
    loop {
        let record = match contacts.next() {
            None => break,
            Some(Ok(record)) => record,
            Some(Err(err)) => {
                let _ = batches.blocking_send(Err(err));
                return;
            }
        };
        batch.push(record);
        if batch.is_full() {
            batch.end_offset = contacts.bytes_read();
            let full = std::mem::replace(&mut batch, Batch::new(playbook));
            if batches.blocking_send(Ok(full)).is_err() {
                return;
            }
        }
    }
    if batch.records > 0 {
        batch.end_offset = contacts.bytes_read();
        let _ = batches.blocking_send(Ok(batch));
    }
}

/// One `EnrollBatch` call (none for a batch of bad lines only).
async fn send(client: &Client, batch: &Batch) -> anyhow::Result<EnrollBatchResponse> {
    if batch.request.items.is_empty() {
        return Ok(EnrollBatchResponse::default());
    }
    Ok(client
        .enrollment()
        .enroll_batch(batch.request.clone())
        .await
        .map_err(|status| client.error(status))?
        .into_inner())
}

/// A progress bar on stderr by bytes of the file (a counter for stdin); hidden unless
/// stderr is a terminal and the output is a table.
fn progress_bar(size: Option<u64>, output: Format) -> ProgressBar {
    if output != Format::Table || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let (bar, template) = match size {
        Some(size) => (
            ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr()),
            "{bar:30} {percent:>3}% {msg}, ETA {eta}",
        ),
        None => (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            "{spinner} {msg} ({bytes} read)",
        ),
    };
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(rate(0, Duration::ZERO));
    bar
}

/// `12000 contacts (3000/s)`: contacts read and the rate so far.
fn rate(contacts: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    if seconds < 0.1 {
        return format!("{contacts} contacts");
    }
    format!("{contacts} contacts ({:.0}/s)", contacts as f64 / seconds)
}

/// What bulk enrollment did, line by line.
#[derive(Debug, Serialize)]
struct Summary {
    playbook: String,
    /// The playbook version the runs started on (0 when nothing was sent).
    version: u32,
    /// Contact lines read (good and bad; blank lines aside).
    read: u64,
    /// New runs.
    started: u64,
    /// Contacts a previous run of the same file had already enrolled.
    already_enrolled: u64,
    /// Contacts the playbook's `reentry` refused a new run.
    not_started: u64,
    bad_lines: u64,
    /// How many contacts were not started for each reason.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    not_started_reasons: BTreeMap<String, u64>,
}

impl Summary {
    fn new(playbook: String) -> Self {
        Self {
            playbook,
            version: 0,
            read: 0,
            started: 0,
            already_enrolled: 0,
            not_started: 0,
            bad_lines: 0,
            not_started_reasons: BTreeMap::new(),
        }
    }

    /// Contacts the scheduler has answered for.
    fn enrolled(&self) -> u64 {
        self.started + self.already_enrolled + self.not_started
    }

    /// Counts a batch and its answer; returns its bad lines in order, with what is wrong.
    fn add(
        &mut self,
        batch: &Batch,
        response: EnrollBatchResponse,
    ) -> anyhow::Result<Vec<(u64, String)>> {
        if response.results.len() != batch.lines.len() {
            return Err(anyhow!(
                "the scheduler answered {} results for {} contacts",
                response.results.len(),
                batch.lines.len()
            ));
        }
        self.version = self.version.max(response.version);
        self.read += batch.records;
        let mut bad = batch.bad.clone();
        for (&line, result) in batch.lines.iter().zip(response.results) {
            if !result.error.is_empty() {
                bad.push((line, result.error));
            } else if result.created {
                self.started += 1;
            } else if result.not_started.is_empty() {
                self.already_enrolled += 1;
            } else {
                self.not_started += 1;
                let reason = if self.not_started_reasons.len() < MAX_REASONS
                    || self.not_started_reasons.contains_key(&result.not_started)
                {
                    result.not_started
                } else {
                    "other".to_owned()
                };
                *self.not_started_reasons.entry(reason).or_default() += 1;
            }
        }
        bad.sort_by_key(|&(line, _)| line);
        self.bad_lines += bad.len() as u64;
        Ok(bad)
    }
}

impl Tabular for Summary {
    fn table(&self) -> String {
        let playbook = match self.version {
            0 => format!("playbook/{}", self.playbook),
            version => format!("playbook/{} v{version}", self.playbook),
        };
        let reasons = self
            .not_started_reasons
            .iter()
            .map(|(reason, n)| format!("{reason}: {n}"))
            .collect::<Vec<_>>();
        let not_started = if reasons.is_empty() {
            self.not_started.to_string()
        } else {
            format!("{} ({})", self.not_started, reasons.join("; "))
        };
        let counts = fields(&[
            ("started", self.started.to_string()),
            ("already enrolled", self.already_enrolled.to_string()),
            ("not started", not_started),
            ("bad lines", self.bad_lines.to_string()),
        ]);
        format!(
            "{playbook}: {} read\n{counts}",
            count(self.read, "contact", "contacts")
        )
    }
}

#[cfg(test)]
mod tests {
    use touchpoint_proto::v1::{Contact, EnrollItemResult};

    use super::*;

    fn batch(lines: &[(u64, Result<&str, &str>)]) -> Batch {
        let mut batch = Batch::new("welcome");
        for &(line, contact) in lines {
            batch.push(Record {
                line,
                contact: contact
                    .map(|id| Contact {
                        id: id.to_owned(),
                        ..Contact::default()
                    })
                    .map_err(str::to_owned),
            });
        }
        batch
    }

    fn result(created: bool, not_started: &str, error: &str) -> EnrollItemResult {
        EnrollItemResult {
            run_id: "r".into(),
            created,
            not_started: not_started.into(),
            error: error.into(),
        }
    }

    #[test]
    fn items_carry_deterministic_request_ids() {
        let batch = batch(&[(2, Ok("c-1")), (3, Err("empty id")), (4, Ok("c-3"))]);
        let ids: Vec<&str> = batch
            .request
            .items
            .iter()
            .map(|item| item.request_id.as_str())
            .collect();
        assert_eq!(ids, ["bulk:welcome:c-1", "bulk:welcome:c-3"]);
        assert_eq!(batch.request.playbook, "welcome");
        assert_eq!(batch.lines, [2, 4]);
        assert_eq!(batch.bad, [(3, "empty id".to_owned())]);
        assert_eq!(batch.records, 3);
    }

    #[test]
    fn summary_counts_each_outcome_and_orders_bad_lines() -> anyhow::Result<()> {
        let batch = batch(&[
            (2, Ok("c-1")),
            (3, Ok("c-2")),
            (4, Err("expected 3 columns, found 4")),
            (5, Ok("c-4")),
            (6, Ok("c-5")),
            (7, Ok("c-6")),
        ]);
        let response = EnrollBatchResponse {
            results: vec![
                result(true, "", ""),
                result(false, "", ""),
                result(false, "reentry: never", ""),
                result(false, "", "contact.tz: unknown time zone \"Mars/Base\""),
                result(false, "reentry: never", ""),
            ],
            version: 3,
        };
        let mut summary = Summary::new("welcome".into());
        let bad = summary.add(&batch, response)?;
        assert_eq!(
            bad,
            [
                (4, "expected 3 columns, found 4".to_owned()),
                (6, "contact.tz: unknown time zone \"Mars/Base\"".to_owned()),
            ]
        );
        assert_eq!(
            (
                summary.read,
                summary.started,
                summary.already_enrolled,
                summary.not_started,
                summary.bad_lines
            ),
            (6, 1, 1, 2, 2)
        );
        assert_eq!(
            summary.table(),
            "playbook/welcome v3: 6 contacts read\n\
             started:           1\n\
             already enrolled:  1\n\
             not started:       2 (reentry: never: 2)\n\
             bad lines:         2"
        );
        let json: serde_json::Value =
            serde_json::from_str(&output::render(Format::Json, &summary)?)?;
        assert_eq!(
            json,
            serde_json::json!({
                "playbook": "welcome",
                "version": 3,
                "read": 6,
                "started": 1,
                "already_enrolled": 1,
                "not_started": 2,
                "bad_lines": 2,
                "not_started_reasons": {"reentry: never": 2},
            })
        );
        Ok(())
    }

    #[test]
    fn a_short_answer_is_an_error() {
        let batch = batch(&[(2, Ok("c-1")), (3, Ok("c-2"))]);
        let response = EnrollBatchResponse {
            results: vec![result(true, "", "")],
            version: 1,
        };
        let err = Summary::new("welcome".into())
            .add(&batch, response)
            .err()
            .map(|err| err.to_string());
        assert_eq!(
            err.as_deref(),
            Some("the scheduler answered 1 results for 2 contacts")
        );
    }

    #[test]
    fn reasons_are_capped() -> anyhow::Result<()> {
        let lines: Vec<(u64, Result<&str, &str>)> =
            (0..15).map(|line| (line + 2, Ok("c"))).collect();
        let reasons: Vec<String> = (0..15).map(|n| format!("reason {n:02}")).collect();
        let response = EnrollBatchResponse {
            results: reasons.iter().map(|r| result(false, r, "")).collect(),
            version: 1,
        };
        let mut summary = Summary::new("welcome".into());
        summary.add(&batch(&lines), response)?;
        assert_eq!(summary.not_started, 15);
        assert_eq!(summary.not_started_reasons.len(), MAX_REASONS + 1);
        assert_eq!(summary.not_started_reasons.get("other"), Some(&5));
        Ok(())
    }

    #[test]
    fn rates() {
        assert_eq!(rate(0, Duration::ZERO), "0 contacts");
        assert_eq!(
            rate(12_000, Duration::from_secs(4)),
            "12000 contacts (3000/s)"
        );
    }

    #[test]
    fn nothing_read() {
        let summary = Summary::new("welcome".into());
        assert_eq!(
            summary.table(),
            "playbook/welcome: 0 contacts read\n\
             started:           0\n\
             already enrolled:  0\n\
             not started:       0\n\
             bad lines:         0"
        );
    }
}
