//! `touchpoint.v1.EnrollmentService` and `touchpoint.v1.RunService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use touchpoint_proto::v1::{
    self, RunStatus as ProtoRunStatus, StepStatus, enrollment_service_server::EnrollmentService,
    run_service_server::RunService,
};

use super::status::{from_store, invalid_field};
use crate::{
    clock::now_ms,
    engine::RATE_LIMITED,
    enrollment::{Enroller, Enrollment},
    localtime,
    observe::CallTrace,
    playbook::StepKind,
    playbook_cache::{LoadedPlaybook, PlaybookCache},
    run::{RunStatus, StepOutcome, TimelineEntry},
    store::{ContactRecord, Enrolled, ListPosition, Listed, RunRecord, Store},
};

/// Limits on what one enrollment may carry.
const MAX_ID_BYTES: usize = 256;
const MAX_ATTRS: usize = 256;
const MAX_VALUE_BYTES: usize = 4096;
const MAX_PAGE_SIZE: u32 = 1000;
const DEFAULT_PAGE_SIZE: u32 = 50;

/// Most contacts in one EnrollBatch call.
const MAX_BATCH: usize = 1000;

/// Starts runs.
#[derive(Debug, Clone)]
pub(crate) struct EnrollmentApi {
    store: Store,
    playbooks: Arc<PlaybookCache>,
    enroller: Enroller,
}

impl EnrollmentApi {
    /// The service over `store`, starting runs through `enroller`.
    pub(crate) fn new(store: Store, playbooks: Arc<PlaybookCache>, enroller: Enroller) -> Self {
        Self {
            store,
            playbooks,
            enroller,
        }
    }
}

/// An id, key or name: not empty, printable, at most [`MAX_ID_BYTES`].
pub(super) fn check_id(field: &str, id: &str) -> Result<(), Status> {
    if id.is_empty() {
        Err(invalid_field(field, "required"))
    } else if id.len() > MAX_ID_BYTES || id.chars().any(char::is_control) {
        Err(invalid_field(
            field,
            format!("expected at most {MAX_ID_BYTES} bytes of printable text"),
        ))
    } else {
        Ok(())
    }
}

pub(super) fn check_contact(contact: &v1::Contact) -> Result<(), Status> {
    check_id("contact.id", &contact.id)?;
    if !contact.tz.is_empty() {
        localtime::parse_tz(&contact.tz).map_err(|e| invalid_field("contact.tz", e))?;
    }
    if contact.attrs.len() > MAX_ATTRS {
        return Err(invalid_field(
            "contact.attrs",
            format!("{} attributes (at most {MAX_ATTRS})", contact.attrs.len()),
        ));
    }
    for (map, name) in [
        (&contact.attrs, "attrs"),
        (&contact.identities, "identities"),
    ] {
        for (key, value) in map {
            check_id(&format!("contact.{name}"), key)?;
            if value.len() > MAX_VALUE_BYTES {
                return Err(invalid_field(
                    &format!("contact.{name}.{key}"),
                    format!("longer than {MAX_VALUE_BYTES} bytes"),
                ));
            }
        }
    }
    for tag in &contact.tags {
        check_id("contact.tags", tag)?;
    }
    Ok(())
}

impl EnrollmentApi {
    /// Checks one contact and starts its run of `loaded`.
    async fn enroll_one(
        &self,
        loaded: &LoadedPlaybook,
        contact: Option<v1::Contact>,
        request_id: String,
        caller_trace: Option<String>,
    ) -> Result<Enrolled, Status> {
        let enrollment = enrollment(contact, request_id, caller_trace)?;
        Ok(self.enroller.enroll(loaded, enrollment).await?)
    }
}

/// A checked enrollment of one contact.
fn enrollment(
    contact: Option<v1::Contact>,
    request_id: String,
    caller_trace: Option<String>,
) -> Result<Enrollment, Status> {
    let contact = contact.ok_or_else(|| invalid_field("contact", "required"))?;
    check_contact(&contact)?;
    if request_id.len() > MAX_ID_BYTES {
        return Err(invalid_field(
            "request_id",
            format!("longer than {MAX_ID_BYTES} bytes"),
        ));
    }
    Ok(Enrollment {
        contact: contact_record(contact),
        request_id: (!request_id.is_empty()).then_some(request_id),
        caller_trace,
        trigger: None,
    })
}

/// A checked wire contact as stored.
pub(super) fn contact_record(contact: v1::Contact) -> ContactRecord {
    ContactRecord {
        id: contact.id,
        attrs: contact.attrs.into_iter().collect(),
        tags: contact.tags,
        tz: contact.tz,
        identities: contact.identities.into_iter().collect(),
    }
}

/// The timeline line of a run cancelled at its current step.
fn cancelled_entry(record: &RunRecord, now: i64, detail: &str) -> TimelineEntry {
    TimelineEntry {
        index: record.step_index,
        outcome: StepOutcome::Cancelled,
        attempts: record.attempt.saturating_sub(u32::from(!record.leased)),
        due_ms: record.due_ms,
        done_ms: now,
        worker: String::new(),
        channel: String::new(),
        detail: detail.to_owned(),
    }
}

/// The run's timeline as of `now`, and the wait it is still in if its send was handed
/// out ahead (`--hand-out-ahead`). Claiming such a send records its wait as done at the
/// wait's end, a time still to come: until then the wait is shown as running (and the
/// send, with its worker, as in flight), and a run cancelled or converted before then
/// as ended in its wait, its send not begun.
fn as_of(record: &RunRecord, now: i64) -> (Vec<TimelineEntry>, Option<TimelineEntry>) {
    let mut timeline = record.timeline.clone();
    let ended_ahead = |wait: &TimelineEntry, after: usize| {
        wait.outcome == StepOutcome::Done && wait.index < after
    };
    match timeline.as_mut_slice() {
        [.., last]
            if record.status == RunStatus::Active
                && record.leased
                && last.done_ms > now
                && ended_ahead(last, record.step_index) =>
        {
            let wait = timeline.pop();
            (timeline, wait)
        }
        [.., wait, last]
            if record.status != RunStatus::Active
                && wait.done_ms > last.done_ms
                && ended_ahead(wait, last.index) =>
        {
            *wait = TimelineEntry {
                index: wait.index,
                attempts: 0,
                due_ms: wait.due_ms,
                ..last.clone()
            };
            timeline.pop();
            (timeline, None)
        }
        _ => (timeline, None),
    }
}

/// The traceparent of the call's span (which continues the caller's `traceparent`): a
/// run started by a single `Enroll` continues the call's trace.
fn caller_trace<T>(request: &Request<T>) -> Option<String> {
    request
        .extensions()
        .get::<CallTrace>()
        .map(|trace| trace.0.clone())
}

fn not_started(enrolled: &Enrolled) -> String {
    match enrolled {
        Enrolled::Refused { reason, .. } => reason.clone(),
        _ => String::new(),
    }
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        let caller_trace = caller_trace(&request);
        let request = request.into_inner();
        if request.playbook.is_empty() {
            return Err(invalid_field("playbook", "required"));
        }
        // A bad contact is reported as such, whatever the playbook.
        if let Some(contact) = &request.contact {
            check_contact(contact)?;
        }
        let loaded = self
            .playbooks
            .latest(&self.store, &request.playbook)
            .await?;
        let enrolled = self
            .enroll_one(&loaded, request.contact, request.request_id, caller_trace)
            .await?;
        Ok(Response::new(v1::EnrollResponse {
            run_id: enrolled.run_id().to_owned(),
            version: loaded.version,
            created: matches!(enrolled, Enrolled::Started(_)),
            not_started: not_started(&enrolled),
        }))
    }

    async fn enroll_batch(
        &self,
        request: Request<v1::EnrollBatchRequest>,
    ) -> Result<Response<v1::EnrollBatchResponse>, Status> {
        // One run is one trace: the runs of a batch each start their own, rather than
        // hundreds of runs sharing the batch call's trace.
        let request = request.into_inner();
        if request.playbook.is_empty() {
            return Err(invalid_field("playbook", "required"));
        }
        if request.items.len() > MAX_BATCH {
            return Err(invalid_field(
                "items",
                format!(
                    "{} items (at most {MAX_BATCH} per call)",
                    request.items.len()
                ),
            ));
        }
        let loaded = self
            .playbooks
            .latest(&self.store, &request.playbook)
            .await?;
        // Items are checked one by one; the good ones go to Redis together, one script
        // call per partition.
        let mut results = vec![v1::EnrollItemResult::default(); request.items.len()];
        let mut positions = Vec::with_capacity(request.items.len());
        let mut enrollments = Vec::with_capacity(request.items.len());
        for (n, item) in request.items.into_iter().enumerate() {
            match enrollment(item.contact, item.request_id, None) {
                Ok(enrollment) => {
                    positions.push(n);
                    enrollments.push(enrollment);
                }
                Err(status) => results[n].error = status.message().to_owned(),
            }
        }
        let enrolled = self.enroller.enroll_many(&loaded, enrollments).await;
        for (n, result) in positions.into_iter().zip(enrolled) {
            results[n] = match result {
                Ok(enrolled) => v1::EnrollItemResult {
                    run_id: enrolled.run_id().to_owned(),
                    created: matches!(enrolled, Enrolled::Started(_)),
                    not_started: not_started(&enrolled),
                    error: String::new(),
                },
                Err(err) => v1::EnrollItemResult {
                    error: from_store(&err).message().to_owned(),
                    ..v1::EnrollItemResult::default()
                },
            };
        }
        Ok(Response::new(v1::EnrollBatchResponse {
            results,
            version: loaded.version,
        }))
    }
}

/// Reads and cancels runs.
#[derive(Debug, Clone)]
pub(crate) struct RunApi {
    store: Store,
    playbooks: Arc<PlaybookCache>,
}

impl RunApi {
    /// The service over `store`.
    pub(crate) fn new(store: Store, playbooks: Arc<PlaybookCache>) -> Self {
        Self { store, playbooks }
    }

    /// A stored run with one record per playbook step.
    async fn to_proto(&self, record: RunRecord) -> Result<v1::Run, Status> {
        let loaded = self
            .playbooks
            .get(&self.store, &record.playbook, record.version)
            .await?;
        let steps = &loaded.playbook.steps;
        let mut records: Vec<v1::StepRecord> = steps
            .iter()
            .map(|step| v1::StepRecord {
                step_id: step.id.clone(),
                kind: step.kind_name().to_owned(),
                status: StepStatus::Pending.into(),
                channel: step.channel().unwrap_or_default().to_owned(),
                ..Default::default()
            })
            .collect();
        let (timeline, ahead_wait) = as_of(&record, now_ms());
        for entry in &timeline {
            if let Some(slot) = records.get_mut(entry.index) {
                *slot = v1::StepRecord {
                    status: match entry.outcome {
                        StepOutcome::Done => StepStatus::Done,
                        StepOutcome::Skipped => StepStatus::Skipped,
                        StepOutcome::Failed => StepStatus::Failed,
                        StepOutcome::Cancelled => StepStatus::Cancelled,
                    }
                    .into(),
                    attempts: entry.attempts,
                    due_at_ms: entry.due_ms,
                    done_at_ms: entry.done_ms,
                    worker: entry.worker.clone(),
                    channel: if entry.channel.is_empty() {
                        slot.channel.clone()
                    } else {
                        entry.channel.clone()
                    },
                    detail: entry.detail.clone(),
                    ..slot.clone()
                };
            }
        }
        let current = steps.get(record.step_index);
        if record.status == RunStatus::Active
            && let (Some(step), Some(slot)) = (current, records.get_mut(record.step_index))
        {
            // A step held back by its channel's rate limit is not retrying.
            let retrying = record.attempt > 1
                || !(record.detail.is_empty() || record.detail.starts_with(RATE_LIMITED));
            let waiting = record.waiting_step == Some(record.step_index);
            slot.status = match (&step.kind, record.leased) {
                (_, true) => StepStatus::InFlight,
                (StepKind::WaitFor(_), false) if waiting => StepStatus::Waiting,
                (StepKind::Action(_), false) if retrying => StepStatus::Retrying,
                _ if record.detail.starts_with("paused") => StepStatus::Paused,
                _ => StepStatus::Scheduled,
            }
            .into();
            slot.attempts = if record.leased {
                record.attempt
            } else {
                record.attempt.saturating_sub(1)
            };
            slot.done_at_ms = 0;
            slot.worker = String::new();
            slot.due_at_ms = record.due_ms;
            slot.detail = if ahead_wait.is_some() {
                "handed out ahead: goes out at its due time".to_owned()
            } else {
                record.detail.clone()
            };
        }
        if let Some(wait) = &ahead_wait
            && let Some(slot) = records.get_mut(wait.index)
        {
            slot.status = StepStatus::Scheduled.into();
            slot.due_at_ms = wait.done_ms;
        }
        let current = ahead_wait
            .as_ref()
            .map_or(current, |wait| steps.get(wait.index));
        Ok(v1::Run {
            run_id: record.run_id,
            playbook: record.playbook,
            version: record.version,
            contact_id: record.contact_id,
            status: match record.status {
                RunStatus::Active => ProtoRunStatus::Active,
                RunStatus::Completed => ProtoRunStatus::Completed,
                RunStatus::Failed => ProtoRunStatus::Failed,
                RunStatus::Cancelled => ProtoRunStatus::Cancelled,
                RunStatus::Converted => ProtoRunStatus::Converted,
            }
            .into(),
            current_step: match record.status {
                RunStatus::Active => current.map(|s| s.id.clone()).unwrap_or_default(),
                _ => String::new(),
            },
            created_at_ms: record.created_ms,
            updated_at_ms: record.updated_ms,
            trace_id: touchpoint_proto::telemetry::trace_id(&record.traceparent)
                .unwrap_or_default()
                .to_owned(),
            steps: records,
        })
    }

    async fn load(&self, run_id: &str) -> Result<RunRecord, Status> {
        self.store.get_run(run_id).await?.ok_or_else(|| {
            Status::not_found(format!(
                "run {run_id:?} not found (finished runs expire after the retention period)"
            ))
        })
    }
}

fn status_word(status: ProtoRunStatus) -> Option<RunStatus> {
    match status {
        ProtoRunStatus::Unspecified => None,
        ProtoRunStatus::Active => Some(RunStatus::Active),
        ProtoRunStatus::Completed => Some(RunStatus::Completed),
        ProtoRunStatus::Failed => Some(RunStatus::Failed),
        ProtoRunStatus::Converted => Some(RunStatus::Converted),
        ProtoRunStatus::Cancelled => Some(RunStatus::Cancelled),
    }
}

/// Page tokens name the last run id returned and the filters they belong to.
fn page_token(last: ListPosition, playbook: &str, status: i32) -> String {
    hex::encode(format!("{}\n{playbook}\n{status}", last.to_token()))
}

fn parse_page_token(
    token: &str,
    playbook: &str,
    status: i32,
) -> Result<Option<ListPosition>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        invalid_field(
            "page_token",
            "not a token from a ListRuns response with these filters",
        )
    };
    let text =
        String::from_utf8(hex::decode(token).map_err(|_| invalid())?).map_err(|_| invalid())?;
    let mut parts = text.split('\n');
    let (last, token_playbook, token_status) = (parts.next(), parts.next(), parts.next());
    match (last, token_playbook, token_status) {
        (Some(last), Some(p), Some(s)) if p == playbook && s == status.to_string() => {
            ListPosition::parse(last).map(Some).ok_or_else(invalid)
        }
        _ => Err(invalid()),
    }
}

#[tonic::async_trait]
impl RunService for RunApi {
    async fn get_run(
        &self,
        request: Request<v1::GetRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let record = self.load(&request.into_inner().run_id).await?;
        Ok(Response::new(self.to_proto(record).await?))
    }

    async fn list_runs(
        &self,
        request: Request<v1::ListRunsRequest>,
    ) -> Result<Response<v1::ListRunsResponse>, Status> {
        let request = request.into_inner();
        let status_filter = status_word(
            ProtoRunStatus::try_from(request.status)
                .map_err(|_| invalid_field("status", "unknown status"))?,
        );
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        } as usize;
        let names = if request.playbook.is_empty() {
            self.store.playbook_names().await?
        } else {
            vec![request.playbook.clone()]
        };
        let mut cursor = parse_page_token(&request.page_token, &request.playbook, request.status)?;
        let mut runs = Vec::new();
        // Merge the per-playbook indexes newest first, skipping runs that expired or do
        // not match, a bounded number of rounds per call.
        for _round in 0..20 {
            let mut candidates = Vec::new();
            for name in &names {
                for listed in self
                    .store
                    .playbook_run_ids(name, cursor, page_size + 1)
                    .await?
                {
                    candidates.push((listed, name.clone()));
                }
            }
            if candidates.is_empty() {
                cursor = None;
                break;
            }
            candidates.sort_by_key(|(listed, _)| std::cmp::Reverse(listed.position));
            candidates.truncate(page_size + 1);
            let ids: Vec<String> = candidates.iter().map(|(l, _)| l.run_id.clone()).collect();
            let records = self.store.get_runs(&ids).await?;
            let mut gone: Vec<(String, Listed)> = Vec::new();
            for ((listed, name), record) in candidates.into_iter().zip(records) {
                cursor = Some(listed.position);
                match record {
                    None => gone.push((name, listed)),
                    Some(record) if status_filter.is_none_or(|s| s == record.status) => {
                        if runs.len() == page_size {
                            break;
                        }
                        runs.push((listed.position, record));
                    }
                    Some(_) => {}
                }
            }
            for (name, listed) in gone {
                self.store.forget_runs(&name, &[listed]).await?;
            }
            if runs.len() == page_size {
                break;
            }
        }
        let next_page_token = match (cursor, runs.len() == page_size) {
            (Some(_), true) => runs
                .last()
                .map(|(at, _)| page_token(*at, &request.playbook, request.status))
                .unwrap_or_default(),
            (Some(last), false) => page_token(last, &request.playbook, request.status),
            (None, _) => String::new(),
        };
        let mut out = Vec::with_capacity(runs.len());
        for (_, record) in runs {
            out.push(self.to_proto(record).await?);
        }
        Ok(Response::new(v1::ListRunsResponse {
            runs: out,
            next_page_token,
        }))
    }

    async fn cancel_run(
        &self,
        request: Request<v1::CancelRunRequest>,
    ) -> Result<Response<v1::Run>, Status> {
        let run_id = request.into_inner().run_id;
        let record = self.load(&run_id).await?;
        let now = now_ms();
        let entry = cancelled_entry(&record, now, "cancelled");
        if !self.store.cancel(&run_id, now, &entry, None).await? {
            return Err(Status::failed_precondition(format!(
                "run {run_id:?} has already finished"
            )));
        }
        tracing::info!(run_id = %run_id, "run cancelled");
        let record = self.load(&run_id).await?;
        Ok(Response::new(self.to_proto(record).await?))
    }

    async fn cancel_runs(
        &self,
        request: Request<v1::CancelRunsRequest>,
    ) -> Result<Response<v1::CancelRunsResponse>, Status> {
        let request = request.into_inner();
        if request.playbook.is_empty() {
            return Err(invalid_field("playbook", "required"));
        }
        if self
            .store
            .get_playbook(&request.playbook, None)
            .await?
            .is_none()
        {
            return Err(Status::not_found(format!(
                "playbook {:?} not found",
                request.playbook
            )));
        }
        let mut cancelled = 0;
        let mut before = None;
        loop {
            let listed = self
                .store
                .playbook_run_ids(&request.playbook, before, 500)
                .await?;
            let Some(last) = listed.last() else { break };
            before = Some(last.position);
            let ids: Vec<String> = listed.into_iter().map(|l| l.run_id).collect();
            for record in self.store.get_runs(&ids).await?.into_iter().flatten() {
                if record.status != RunStatus::Active {
                    continue;
                }
                // The step is matched by id in the run's own version.
                let at_step = if request.step_id.is_empty() {
                    None
                } else {
                    let loaded = self
                        .playbooks
                        .get(&self.store, &record.playbook, record.version)
                        .await?;
                    match loaded
                        .playbook
                        .steps
                        .iter()
                        .position(|s| s.id == request.step_id)
                    {
                        Some(index) if index == record.step_index => Some(index),
                        _ => continue,
                    }
                };
                let now = now_ms();
                let entry = cancelled_entry(&record, now, "cancelled in bulk");
                if self
                    .store
                    .cancel(&record.run_id, now, &entry, at_step)
                    .await?
                {
                    cancelled += 1;
                }
            }
        }
        tracing::info!(playbook = %request.playbook, step = %request.step_id, cancelled, "runs cancelled in bulk");
        Ok(Response::new(v1::CancelRunsResponse { cancelled }))
    }
}
