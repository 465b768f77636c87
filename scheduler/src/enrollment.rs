//! Starting runs: one path for every way in (API and CLI enrollments, bulk files, entry
//! events, schedule ticks), so the reentry rule, goals and the funnel hold for all.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    clock::now_ms,
    engine::Engine,
    playbook::Playbook,
    playbook_cache::LoadedPlaybook,
    run::{Next, after_wait_entered, new_run_id, next_step, partition_of_contact},
    store::{self, ContactRecord, Enrolled, NewRun, Store},
};
use touchpoint_proto::telemetry::continue_trace;

/// An event that starts or wakes runs: `event` in templates.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trigger {
    pub name: String,
    pub attrs: BTreeMap<String, String>,
}

/// One contact to start a run for.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// Upserted with the run (attributes and identities set, tags added).
    pub contact: ContactRecord,
    /// Idempotency key: the same one starts one run.
    pub request_id: Option<String>,
    /// The caller's W3C traceparent, continued by the run's trace.
    pub caller_trace: Option<String>,
    pub trigger: Option<Trigger>,
}

/// Starts runs and wakes the timer loop for them.
#[derive(Debug, Clone)]
pub(crate) struct Enroller {
    store: Store,
    engine: Arc<Engine>,
}

impl Enroller {
    pub(crate) fn new(store: Store, engine: Arc<Engine>) -> Self {
        Self { store, engine }
    }

    /// Starts a run of `playbook` (a loaded version) for one contact.
    pub(crate) async fn enroll(
        &self,
        playbook: &LoadedPlaybook,
        enrollment: Enrollment,
    ) -> store::Result<Enrolled> {
        let run = new_run(
            &playbook.playbook,
            playbook.version,
            enrollment,
            self.store.partitions(),
            now_ms(),
        );
        let enrolled = self.store.enroll(&run).await?;
        if let Enrolled::Started(run_id) = &enrolled {
            self.engine.schedule_check(run.partition, run.due_ms);
            tracing::debug!(run_id = %run_id, playbook = %run.playbook, version = run.version, "run started");
        }
        Ok(enrolled)
    }

    /// Starts a run of `playbook` for each enrollment: one Redis call per partition.
    /// Results follow `enrollments`.
    pub(crate) async fn enroll_many(
        &self,
        playbook: &LoadedPlaybook,
        enrollments: Vec<Enrollment>,
    ) -> Vec<store::Result<Enrolled>> {
        let now = now_ms();
        let runs: Vec<NewRun> = enrollments
            .into_iter()
            .map(|enrollment| {
                new_run(
                    &playbook.playbook,
                    playbook.version,
                    enrollment,
                    self.store.partitions(),
                    now,
                )
            })
            .collect();
        let results = self.store.enroll_many(&runs).await;
        for (run, result) in runs.iter().zip(&results) {
            if let Ok(Enrolled::Started(_)) = result {
                self.engine.schedule_check(run.partition, run.due_ms);
            }
        }
        results
    }
}

/// The run that `enrollment` starts in version `version` of `playbook` at `now`, for
/// [`Store::enroll`].
pub fn new_run(
    playbook: &Playbook,
    version: u32,
    enrollment: Enrollment,
    partitions: u16,
    now: i64,
) -> NewRun {
    let partition = partition_of_contact(&enrollment.contact.id, partitions);
    let (first_step, due_ms) = match next_step(playbook, 0, now) {
        Next::Step { index, due_ms } => (index, due_ms),
        // Validation refuses playbooks without steps.
        Next::Completed => (0, now),
    };
    let then_step = after_wait_entered(playbook, first_step, due_ms);
    let mut contact = enrollment.contact;
    contact.tags.sort();
    contact.tags.dedup();
    let run_id = new_run_id(partition);
    // The run's root span: its traceparent is the parent of every step's dispatch.
    let span = tracing::info_span!(
        "enroll",
        otel.name = %format!("enroll {}", playbook.name),
        touchpoint.playbook = %playbook.name,
        touchpoint.version = version,
        touchpoint.run_id = %run_id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let traceparent = continue_trace(
        &span,
        enrollment.caller_trace.as_deref().unwrap_or_default(),
    );
    NewRun {
        run_id,
        partition,
        playbook: playbook.name.clone(),
        version,
        contact,
        first_step,
        due_ms,
        then_step,
        now_ms: now,
        traceparent,
        request_id: enrollment.request_id,
        reentry: playbook.entry.reentry,
        goal: playbook.goal.clone(),
        trigger: enrollment
            .trigger
            .and_then(|trigger| serde_json::to_string(&trigger).ok()),
    }
}
