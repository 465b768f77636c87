//! `touchpoint.v1.ContactService` and `touchpoint.v1.EventService`.

use std::{sync::Arc, time::Duration};

use tonic::{Request, Response, Status};
use touchpoint_proto::v1::{
    self, contact_service_server::ContactService, event_service_server::EventService,
};

use super::{
    run_service::{check_contact, check_id, contact_record},
    status::invalid_field,
};
use crate::{
    clock::now_ms,
    engine::Engine,
    enrollment::{Enroller, Enrollment, Trigger},
    playbook::is_event_name,
    playbook_cache::PlaybookCache,
    run::{partition_of_contact, partition_of_run},
    store::{ContactChange, ContactRecord, Enrolled, Store},
};

/// Reads and writes contacts.
#[derive(Debug, Clone)]
pub(crate) struct ContactApi {
    store: Store,
}

impl ContactApi {
    pub(crate) fn new(store: Store) -> Self {
        Self { store }
    }
}

fn to_proto(contact: ContactRecord) -> v1::Contact {
    v1::Contact {
        id: contact.id,
        attrs: contact.attrs.into_iter().collect(),
        tags: contact.tags,
        tz: contact.tz,
        identities: contact.identities.into_iter().collect(),
    }
}

#[tonic::async_trait]
impl ContactService for ContactApi {
    async fn upsert_contact(
        &self,
        request: Request<v1::UpsertContactRequest>,
    ) -> Result<Response<v1::Contact>, Status> {
        let request = request.into_inner();
        let contact = request
            .contact
            .ok_or_else(|| invalid_field("contact", "required"))?;
        check_contact(&contact)?;
        for tag in &request.remove_tags {
            check_id("remove_tags", tag)?;
        }
        for attr in &request.remove_attrs {
            check_id("remove_attrs", attr)?;
        }
        let change = ContactChange {
            contact: contact_record(contact),
            remove_tags: request.remove_tags,
            remove_attrs: request.remove_attrs,
        };
        let stored = self.store.upsert_contact(&change).await?;
        Ok(Response::new(to_proto(stored)))
    }

    async fn get_contact(
        &self,
        request: Request<v1::GetContactRequest>,
    ) -> Result<Response<v1::Contact>, Status> {
        let id = request.into_inner().id;
        check_id("id", &id)?;
        match self.store.get_contact(&id).await? {
            Some(contact) => Ok(Response::new(to_proto(contact))),
            None => Err(Status::not_found(format!("contact {id:?} not found"))),
        }
    }
}

/// Records events: goals, wait_for wake-ups, entries.
#[derive(Debug, Clone)]
pub(crate) struct EventApi {
    store: Store,
    playbooks: Arc<PlaybookCache>,
    engine: Arc<Engine>,
    enroller: Enroller,
    lookback: Duration,
}

impl EventApi {
    pub(crate) fn new(
        store: Store,
        playbooks: Arc<PlaybookCache>,
        engine: Arc<Engine>,
        lookback: Duration,
    ) -> Self {
        Self {
            enroller: Enroller::new(store.clone(), Arc::clone(&engine)),
            store,
            playbooks,
            engine,
            lookback,
        }
    }
}

/// Most attributes one event may carry, and the longest value.
const MAX_EVENT_ATTRS: usize = 64;
const MAX_EVENT_VALUE_BYTES: usize = 4096;

#[tonic::async_trait]
impl EventService for EventApi {
    async fn record_event(
        &self,
        request: Request<v1::RecordEventRequest>,
    ) -> Result<Response<v1::RecordEventResponse>, Status> {
        let request = request.into_inner();
        check_id("contact_id", &request.contact_id)?;
        if !is_event_name(&request.name) {
            return Err(invalid_field(
                "name",
                format!(
                    "invalid event name {:?} (expected 1-63 characters of a-z, A-Z, 0-9, ., _ and -, such as order.placed)",
                    request.name
                ),
            ));
        }
        if request.attrs.len() > MAX_EVENT_ATTRS {
            return Err(invalid_field(
                "attrs",
                format!(
                    "{} attributes (at most {MAX_EVENT_ATTRS})",
                    request.attrs.len()
                ),
            ));
        }
        for (key, value) in &request.attrs {
            check_id("attrs", key)?;
            if value.len() > MAX_EVENT_VALUE_BYTES {
                return Err(invalid_field(
                    &format!("attrs.{key}"),
                    format!("longer than {MAX_EVENT_VALUE_BYTES} bytes"),
                ));
            }
        }
        if !request.request_id.is_empty() {
            check_id("request_id", &request.request_id)?;
        }
        let trigger = Trigger {
            name: request.name.clone(),
            attrs: request.attrs.into_iter().collect(),
        };
        let event_json =
            serde_json::to_string(&trigger).map_err(|e| Status::internal(e.to_string()))?;
        let request_id = (!request.request_id.is_empty()).then_some(request.request_id);
        let now = now_ms();
        let recorded = self
            .store
            .record_event(
                &request.contact_id,
                &request.name,
                &event_json,
                request_id.as_deref(),
                now,
                u64::try_from(self.lookback.as_millis()).unwrap_or(u64::MAX),
            )
            .await?;
        let partitions = self.store.partitions();
        for run_id in &recorded.woken {
            if let Some(partition) = partition_of_run(run_id, partitions) {
                self.engine.schedule_check(partition, now);
            }
        }
        // Entries come after, each idempotent: a replayed event finds its runs again.
        let mut started = Vec::new();
        let mut not_started = Vec::new();
        for playbook in self.store.entry_playbooks(&request.name).await? {
            let loaded = self.playbooks.latest(&self.store, &playbook).await?;
            // The entry may have moved to another event in a newer version.
            if loaded.playbook.entry.event.as_deref() != Some(request.name.as_str()) {
                continue;
            }
            let enrollment = Enrollment {
                contact: ContactRecord {
                    id: request.contact_id.clone(),
                    ..ContactRecord::default()
                },
                request_id: request_id
                    .as_ref()
                    .map(|id| format!("event:{id}:{playbook}")),
                caller_trace: None,
                trigger: Some(trigger.clone()),
            };
            match self.enroller.enroll(&loaded, enrollment).await? {
                Enrolled::Started(run_id) | Enrolled::Replayed(run_id) => started.push(run_id),
                Enrolled::Refused { reason, .. } => {
                    not_started.push(format!("{playbook}: {reason}"));
                }
            }
        }
        tracing::debug!(
            partition = partition_of_contact(&request.contact_id, partitions),
            event = %request.name,
            duplicate = recorded.duplicate,
            woken = recorded.woken.len(),
            converted = recorded.converted.len(),
            started = started.len(),
            "event recorded"
        );
        Ok(Response::new(v1::RecordEventResponse {
            duplicate: recorded.duplicate,
            woken_run_ids: recorded.woken,
            converted_run_ids: recorded.converted,
            started_run_ids: started,
            not_started,
        }))
    }
}
