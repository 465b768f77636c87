//! `touchpoint.v1.PlaybookService`.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};
use touchpoint_proto::v1::{self, ApplyStatus, playbook_service_server::PlaybookService};

use super::status::invalid_playbook;
use crate::{
    clock::now_ms,
    engine::Engine,
    playbook::parse,
    playbook_cache::PlaybookCache,
    store::{Applied, Store, StoredPlaybook},
};

/// Applies, reads, lists, pauses and resumes playbooks; reads their funnels.
#[derive(Debug, Clone)]
pub(crate) struct PlaybookApi {
    store: Store,
    playbooks: Arc<PlaybookCache>,
    engine: Arc<Engine>,
}

impl PlaybookApi {
    /// The service over `store`; pausing takes effect on `engine` at once.
    pub(crate) fn new(store: Store, playbooks: Arc<PlaybookCache>, engine: Arc<Engine>) -> Self {
        Self {
            store,
            playbooks,
            engine,
        }
    }

    /// Runs not finished on versions before `version`.
    async fn runs_on_older_versions(&self, name: &str, version: u32) -> Result<u64, Status> {
        let mut active = 0;
        for older in 1..version {
            let counters = self.store.stats(name, older).await?;
            active += run_totals(&counters).active;
        }
        Ok(active)
    }

    /// The latest version of `name` with its paused flag.
    async fn latest(&self, name: &str) -> Result<v1::Playbook, Status> {
        let Some((version, latest, stored)) = self.store.get_playbook(name, None).await? else {
            return Err(Status::not_found(format!("playbook {name:?} not found")));
        };
        let paused = self.store.paused_playbooks().await?.contains(name);
        Ok(to_proto(name, version, latest, stored, paused))
    }

    /// The funnel of one version, keyed by step id.
    async fn version_stats(
        &self,
        name: &str,
        version: u32,
    ) -> Result<(v1::PlaybookStats, Vec<v1::StepStats>), Status> {
        let loaded = self.playbooks.get(&self.store, name, version).await?;
        let counters = self.store.stats(name, version).await?;
        let totals = run_totals(&counters);
        let count = |index: usize, what: &str| -> u64 {
            counters
                .get(&format!("{index}:{what}"))
                .map_or(0, |n| u64::try_from(*n).unwrap_or(0))
        };
        let steps = loaded
            .playbook
            .steps
            .iter()
            .enumerate()
            .map(|(i, step)| {
                let entered = count(i, "in");
                let finished = ["done", "skipped", "capped", "failed", "timed_out", "left"]
                    .iter()
                    .map(|what| count(i, what))
                    .sum::<u64>();
                v1::StepStats {
                    step_id: step.id.clone(),
                    kind: step.kind_name().to_owned(),
                    entered,
                    done: count(i, "done"),
                    skipped: count(i, "skipped"),
                    capped: count(i, "capped"),
                    deferred: count(i, "deferred"),
                    failed: count(i, "failed"),
                    waiting: entered.saturating_sub(finished),
                    timed_out: count(i, "timed_out"),
                    left: count(i, "left"),
                }
            })
            .collect();
        let stats = v1::PlaybookStats {
            name: name.to_owned(),
            version,
            entered: totals.entered,
            completed: totals.completed,
            converted: totals.converted,
            failed: totals.failed,
            cancelled: totals.cancelled,
            active: totals.active,
            conversion_rate: 0.0,
            steps: Vec::new(),
        };
        Ok((stats, steps))
    }
}

/// Run-level funnel counters.
#[derive(Debug, Default)]
struct RunTotals {
    entered: u64,
    completed: u64,
    converted: u64,
    failed: u64,
    cancelled: u64,
    active: u64,
}

fn run_totals(counters: &std::collections::BTreeMap<String, i64>) -> RunTotals {
    let get = |what: &str| {
        counters
            .get(&format!("runs:{what}"))
            .map_or(0, |n| u64::try_from(*n).unwrap_or(0))
    };
    let (entered, completed, converted, failed, cancelled) = (
        get("in"),
        get("completed"),
        get("converted"),
        get("failed"),
        get("cancelled"),
    );
    RunTotals {
        entered,
        completed,
        converted,
        failed,
        cancelled,
        active: entered.saturating_sub(completed + converted + failed + cancelled),
    }
}

/// Adds `from`'s counters to `into`.
fn add_step(into: &mut v1::StepStats, from: &v1::StepStats) {
    into.entered += from.entered;
    into.done += from.done;
    into.skipped += from.skipped;
    into.capped += from.capped;
    into.deferred += from.deferred;
    into.failed += from.failed;
    into.waiting += from.waiting;
    into.timed_out += from.timed_out;
    into.left += from.left;
}

fn to_proto(
    name: &str,
    version: u32,
    latest: u32,
    stored: StoredPlaybook,
    paused: bool,
) -> v1::Playbook {
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
        paused,
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
        if let Applied::Created(_) = applied {
            self.store
                .set_entry_event(&parsed.name, parsed.entry.event.as_deref())
                .await?;
            self.store
                .set_scheduled(&parsed.name, parsed.schedule.is_some())
                .await?;
        }
        let (version, status) = match applied {
            Applied::Created(v) => (v, ApplyStatus::Created),
            Applied::Unchanged(v) => (v, ApplyStatus::Unchanged),
            Applied::WouldCreate(v) => (v, ApplyStatus::Valid),
        };
        let runs_on_older_versions = match applied {
            Applied::Created(version) => self.runs_on_older_versions(&parsed.name, version).await?,
            _ => 0,
        };
        tracing::info!(playbook = %parsed.name, version, status = status.as_str_name(), runs_on_older_versions, "playbook applied");
        Ok(Response::new(v1::ApplyPlaybookResponse {
            name: parsed.name,
            version,
            status: status.into(),
            step_count: u32::try_from(parsed.steps.len()).unwrap_or(u32::MAX),
            runs_on_older_versions,
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
        let paused = self.store.paused_playbooks().await?.contains(&request.name);
        Ok(Response::new(to_proto(
            &request.name,
            version,
            latest,
            stored,
            paused,
        )))
    }

    async fn list_playbooks(
        &self,
        _request: Request<v1::ListPlaybooksRequest>,
    ) -> Result<Response<v1::ListPlaybooksResponse>, Status> {
        let mut playbooks = Vec::new();
        let paused = self.store.paused_playbooks().await?;
        for name in self.store.playbook_names().await? {
            if let Some((version, latest, stored)) = self.store.get_playbook(&name, None).await? {
                let paused = paused.contains(&name);
                playbooks.push(to_proto(&name, version, latest, stored, paused));
            }
        }
        Ok(Response::new(v1::ListPlaybooksResponse { playbooks }))
    }

    async fn pause_playbook(
        &self,
        request: Request<v1::PausePlaybookRequest>,
    ) -> Result<Response<v1::Playbook>, Status> {
        let name = request.into_inner().name;
        let mut playbook = self.latest(&name).await?;
        self.store.set_paused(&name, true).await?;
        self.engine.set_paused(&name, true);
        tracing::info!(playbook = %name, "playbook paused");
        playbook.paused = true;
        Ok(Response::new(playbook))
    }

    async fn resume_playbook(
        &self,
        request: Request<v1::ResumePlaybookRequest>,
    ) -> Result<Response<v1::Playbook>, Status> {
        let name = request.into_inner().name;
        let mut playbook = self.latest(&name).await?;
        self.store.set_paused(&name, false).await?;
        self.engine.set_paused(&name, false);
        let resumed = self.store.resume_parked(&name).await?;
        self.engine.wake_all();
        tracing::info!(playbook = %name, resumed, "playbook resumed");
        playbook.paused = false;
        Ok(Response::new(playbook))
    }

    async fn get_stats(
        &self,
        request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::PlaybookStats>, Status> {
        let request = request.into_inner();
        let latest = self.latest(&request.name).await?;
        let versions: Vec<u32> = if request.version > 0 {
            if request.version > latest.latest_version {
                return Err(Status::not_found(format!(
                    "playbook {:?} has no version {}",
                    request.name, request.version
                )));
            }
            vec![request.version]
        } else {
            (1..=latest.latest_version).rev().collect()
        };
        // Newest version first: its steps give the order; older versions add to the
        // steps they share by id, and append the ones they alone had.
        let mut total = v1::PlaybookStats {
            name: request.name.clone(),
            version: request.version,
            ..v1::PlaybookStats::default()
        };
        for version in versions {
            let (stats, steps) = self.version_stats(&request.name, version).await?;
            total.entered += stats.entered;
            total.completed += stats.completed;
            total.converted += stats.converted;
            total.failed += stats.failed;
            total.cancelled += stats.cancelled;
            total.active += stats.active;
            for step in steps {
                match total.steps.iter_mut().find(|s| s.step_id == step.step_id) {
                    Some(existing) => add_step(existing, &step),
                    None => total.steps.push(step),
                }
            }
        }
        total.conversion_rate = if total.entered == 0 {
            0.0
        } else {
            total.converted as f64 / total.entered as f64
        };
        Ok(Response::new(total))
    }
}
