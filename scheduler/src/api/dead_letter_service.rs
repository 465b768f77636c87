//! `touchpoint.v1.DeadLetterService`: list and retry runs that failed at a step.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use touchpoint_proto::v1::{
    self, dead_letter_service_server::DeadLetterService, retry_dead_letters_request::Target,
};

use super::status::invalid_field;
use crate::{
    clock::now_ms,
    engine::Engine,
    playbook_cache::{LoadError, PlaybookCache},
    run::StepOutcome,
    store::{DeadLetterCursor, DeadLetterEntry, Retried, RunRecord, Store},
};

const MAX_PAGE_SIZE: u32 = 1000;
const DEFAULT_PAGE_SIZE: u32 = 50;
/// Runs retried per script call when retrying a whole playbook.
const RETRY_BATCH: usize = 256;

/// Lists and retries dead letters.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetterApi {
    store: Store,
    playbooks: Arc<PlaybookCache>,
    engine: Arc<Engine>,
}

impl DeadLetterApi {
    /// The service over `store`, waking `engine` for retried runs.
    pub(crate) fn new(store: Store, playbooks: Arc<PlaybookCache>, engine: Arc<Engine>) -> Self {
        Self {
            store,
            playbooks,
            engine,
        }
    }

    /// NOT_FOUND unless the playbook exists.
    async fn check_playbook(&self, name: &str) -> Result<(), Status> {
        if self.store.get_playbook(name, None).await?.is_none() {
            return Err(Status::not_found(format!("playbook {name:?} not found")));
        }
        Ok(())
    }

    /// The entry for a dead-lettered run: the step it failed at and its last error.
    async fn to_proto(
        &self,
        entry: &DeadLetterEntry,
        record: RunRecord,
    ) -> Result<v1::DeadLetter, Status> {
        let step_id = match self
            .playbooks
            .get(&self.store, &record.playbook, record.version)
            .await
        {
            Ok(loaded) => loaded
                .playbook
                .steps
                .get(record.step_index)
                .map(|step| step.id.clone()),
            Err(LoadError::Store(err)) => return Err(err.into()),
            Err(_) => None,
        };
        let failed = record
            .timeline
            .iter()
            .rev()
            .find(|e| e.index == record.step_index && e.outcome == StepOutcome::Failed);
        Ok(v1::DeadLetter {
            run_id: record.run_id,
            playbook: record.playbook,
            version: record.version,
            contact_id: record.contact_id,
            step_id: step_id.unwrap_or_else(|| format!("#{}", record.step_index)),
            attempts: failed.map_or(record.attempt, |e| e.attempts),
            failed_at_ms: entry.failed_at_ms,
            last_error: failed.map_or(record.detail, |e| e.detail.clone()),
        })
    }
}

/// Page tokens name the last entry returned and the playbook filter they belong to.
fn page_token(last: &DeadLetterEntry, playbook: &str) -> String {
    hex::encode(format!(
        "{}\n{}\n{playbook}",
        last.failed_at_ms, last.run_id
    ))
}

fn parse_page_token(token: &str, playbook: &str) -> Result<Option<DeadLetterCursor>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        invalid_field(
            "page_token",
            "not a token from a ListDeadLetters response with this playbook",
        )
    };
    let text =
        String::from_utf8(hex::decode(token).map_err(|_| invalid())?).map_err(|_| invalid())?;
    let mut parts = text.split('\n');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(ms), Some(run_id), Some(p), None) if p == playbook => Ok(Some(DeadLetterCursor {
            failed_at_ms: ms.parse().map_err(|_| invalid())?,
            run_id: run_id.to_owned(),
        })),
        _ => Err(invalid()),
    }
}

#[tonic::async_trait]
impl DeadLetterService for DeadLetterApi {
    async fn list_dead_letters(
        &self,
        request: Request<v1::ListDeadLettersRequest>,
    ) -> Result<Response<v1::ListDeadLettersResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        } as usize;
        let cursor = parse_page_token(&request.page_token, &request.playbook)?;
        let playbook = (!request.playbook.is_empty()).then_some(request.playbook.as_str());
        if let Some(name) = playbook {
            self.check_playbook(name).await?;
        }
        let mut entries = self
            .store
            .dead_letters(playbook, cursor.as_ref(), page_size + 1)
            .await?;
        let more = entries.len() > page_size;
        entries.truncate(page_size);
        let ids: Vec<String> = entries.iter().map(|e| e.run_id.clone()).collect();
        let records = self.store.get_runs(&ids).await?;
        let mut dead_letters = Vec::with_capacity(entries.len());
        for (entry, record) in entries.iter().zip(records) {
            match record {
                Some(record) => dead_letters.push(self.to_proto(entry, record).await?),
                // Deleted behind Touchpoint's back: nothing left to retry.
                None => self.store.forget_dead_letter(entry, playbook).await?,
            }
        }
        let next_page_token = match entries.last() {
            Some(last) if more => page_token(last, &request.playbook),
            _ => String::new(),
        };
        Ok(Response::new(v1::ListDeadLettersResponse {
            dead_letters,
            next_page_token,
        }))
    }

    async fn retry_dead_letters(
        &self,
        request: Request<v1::RetryDeadLettersRequest>,
    ) -> Result<Response<v1::RetryDeadLettersResponse>, Status> {
        let now = now_ms();
        let retried = match request.into_inner().target {
            None => return Err(invalid_field("target", "set run_id or playbook")),
            Some(Target::RunId(run_id)) if run_id.is_empty() => {
                return Err(invalid_field("run_id", "required"));
            }
            Some(Target::Playbook(name)) if name.is_empty() => {
                return Err(invalid_field("playbook", "required"));
            }
            Some(Target::RunId(run_id)) => {
                match self.store.retry_dead_letter(&run_id, now).await? {
                    Retried::Retried => {
                        if let Some(partition) =
                            crate::run::partition_of_run(&run_id, self.store.partitions())
                        {
                            self.engine.schedule_check(partition, now);
                        }
                        tracing::info!(run_id = %run_id, "dead letter retried");
                        1
                    }
                    Retried::NotDeadLettered => {
                        let status = self
                            .store
                            .get_run(&run_id)
                            .await?
                            .map_or("finished", |run| run.status.as_str());
                        return Err(Status::failed_precondition(format!(
                            "run {run_id:?} is {status}, not in the dead-letter list (only runs that failed at a step are)"
                        )));
                    }
                    Retried::NotFound => {
                        return Err(Status::not_found(format!("run {run_id:?} not found")));
                    }
                }
            }
            Some(Target::Playbook(name)) => {
                self.check_playbook(&name).await?;
                let by_partition = self
                    .store
                    .retry_dead_letters_of_playbook(&name, RETRY_BATCH, now)
                    .await?;
                let mut total = 0;
                for (partition, count) in by_partition {
                    self.engine.schedule_check(partition, now);
                    total += count;
                }
                tracing::info!(playbook = %name, retried = total, "dead letters retried");
                total
            }
        };
        Ok(Response::new(v1::RetryDeadLettersResponse {
            retried: u32::try_from(retried).unwrap_or(u32::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_belong_to_their_filter() {
        let entry = DeadLetterEntry {
            run_id: "0197a1b2c3d4e5f60718293a4b5c6d7e-3".into(),
            partition: 3,
            failed_at_ms: 1_795_417_445_000,
        };
        let token = page_token(&entry, "welcome");
        let cursor = parse_page_token(&token, "welcome").ok().flatten();
        assert_eq!(cursor, Some(entry.cursor()));
        assert!(parse_page_token(&token, "other").is_err());
        assert!(parse_page_token("zz", "welcome").is_err());
        assert!(matches!(parse_page_token("", "welcome"), Ok(None)));
    }
}
