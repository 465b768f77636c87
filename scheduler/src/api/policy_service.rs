//! `touchpoint.v1.PolicyService`: the contact budget, versioned like playbooks.

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};
use touchpoint_proto::v1::{self, ApplyPolicyStatus, policy_service_server::PolicyService};

use super::status::invalid_playbook;
use crate::{
    clock::now_ms,
    policy,
    store::{Applied, Store, StoredPlaybook},
};

/// Applies and reads the policy.
#[derive(Debug, Clone)]
pub(crate) struct PolicyApi {
    store: Store,
}

impl PolicyApi {
    pub(crate) fn new(store: Store) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl PolicyService for PolicyApi {
    async fn apply_policy(
        &self,
        request: Request<v1::ApplyPolicyRequest>,
    ) -> Result<Response<v1::ApplyPolicyResponse>, Status> {
        let request = request.into_inner();
        let parsed = policy::parse(&request.yaml).map_err(|v| invalid_playbook(&v))?;
        let canonical = serde_json::to_vec(&parsed).map_err(|e| Status::internal(e.to_string()))?;
        let digest = hex::encode(Sha256::digest(&canonical));
        let stored = StoredPlaybook {
            yaml: request.yaml,
            created_at_ms: now_ms(),
        };
        let (version, status) = match self
            .store
            .apply_policy(&digest, &stored, request.dry_run)
            .await?
        {
            Applied::Created(v) => (v, ApplyPolicyStatus::Created),
            Applied::Unchanged(v) => (v, ApplyPolicyStatus::Unchanged),
            Applied::WouldCreate(v) => (v, ApplyPolicyStatus::Valid),
        };
        tracing::info!(version, status = status.as_str_name(), "policy applied");
        Ok(Response::new(v1::ApplyPolicyResponse {
            version,
            status: status.into(),
        }))
    }

    async fn get_policy(
        &self,
        _request: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::Policy>, Status> {
        let Some((version, stored)) = self.store.get_policy().await? else {
            return Err(Status::not_found(
                "no policy was applied (tp policy apply -f policy.yaml)",
            ));
        };
        Ok(Response::new(v1::Policy {
            version,
            yaml: stored.yaml,
            created_at_ms: stored.created_at_ms,
        }))
    }
}
