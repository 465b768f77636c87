//! `touchpoint.v1.PlaybookService`.

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};
use touchpoint_proto::v1::{self, ApplyStatus, playbook_service_server::PlaybookService};

use super::status::invalid_playbook;
use crate::{
    clock::now_ms,
    playbook::parse,
    store::{Applied, Store, StoredPlaybook},
};

/// Applies, reads and lists playbooks.
#[derive(Debug, Clone)]
pub(crate) struct PlaybookApi {
    store: Store,
}

impl PlaybookApi {
    /// The service over `store`.
    pub(crate) fn new(store: Store) -> Self {
        Self { store }
    }
}

fn to_proto(name: &str, version: u32, latest: u32, stored: StoredPlaybook) -> v1::Playbook {
    let parsed = parse(&stored.yaml).ok();
    v1::Playbook {
        name: name.to_owned(),
        version,
        description: parsed
            .as_ref()
            .map(|p| p.description.clone())
            .unwrap_or_default(),
        step_ids: parsed
            .map(|p| p.steps.into_iter().map(|s| s.id).collect())
            .unwrap_or_default(),
        yaml: stored.yaml,
        created_at_ms: stored.created_at_ms,
        latest_version: latest,
    }
}

#[tonic::async_trait]
impl PlaybookService for PlaybookApi {
    async fn apply_playbook(
        &self,
        request: Request<v1::ApplyPlaybookRequest>,
    ) -> Result<Response<v1::ApplyPlaybookResponse>, Status> {
        let request = request.into_inner();
        let parsed = parse(&request.yaml).map_err(|v| invalid_playbook(&v))?;
        // Identity is the parsed content, so comments and formatting are not a change.
        let canonical = serde_json::to_vec(&parsed).map_err(|e| Status::internal(e.to_string()))?;
        let digest = hex::encode(Sha256::digest(&canonical));
        let stored = StoredPlaybook {
            yaml: request.yaml,
            created_at_ms: now_ms(),
        };
        let applied = self
            .store
            .apply_playbook(&parsed.name, &digest, &stored, request.dry_run)
            .await?;
        let (version, status) = match applied {
            Applied::Created(v) => (v, ApplyStatus::Created),
            Applied::Unchanged(v) => (v, ApplyStatus::Unchanged),
            Applied::WouldCreate(v) => (v, ApplyStatus::Valid),
        };
        tracing::info!(playbook = %parsed.name, version, status = status.as_str_name(), "playbook applied");
        Ok(Response::new(v1::ApplyPlaybookResponse {
            name: parsed.name,
            version,
            status: status.into(),
            step_count: u32::try_from(parsed.steps.len()).unwrap_or(u32::MAX),
        }))
    }

    async fn get_playbook(
        &self,
        request: Request<v1::GetPlaybookRequest>,
    ) -> Result<Response<v1::Playbook>, Status> {
        let request = request.into_inner();
        let version = (request.version > 0).then_some(request.version);
        let Some((version, latest, stored)) =
            self.store.get_playbook(&request.name, version).await?
        else {
            return Err(match version {
                Some(v) => {
                    Status::not_found(format!("playbook {:?} has no version {v}", request.name))
                }
                None => Status::not_found(format!("playbook {:?} not found", request.name)),
            });
        };
        Ok(Response::new(to_proto(
            &request.name,
            version,
            latest,
            stored,
        )))
    }

    async fn list_playbooks(
        &self,
        _request: Request<v1::ListPlaybooksRequest>,
    ) -> Result<Response<v1::ListPlaybooksResponse>, Status> {
        let mut playbooks = Vec::new();
        for name in self.store.playbook_names().await? {
            if let Some((version, latest, stored)) = self.store.get_playbook(&name, None).await? {
                playbooks.push(to_proto(&name, version, latest, stored));
            }
        }
        Ok(Response::new(v1::ListPlaybooksResponse { playbooks }))
    }
}
