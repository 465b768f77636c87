//! Playbook versions are immutable, so each scheduler parses and compiles a version
//! once and keeps it.

use std::{collections::HashMap, sync::Arc};

use tokio::sync::RwLock;

use crate::{
    playbook::{Compiled, Playbook, parse},
    store::{self, Store},
};

/// A playbook version ready to run.
#[derive(Debug)]
pub(crate) struct LoadedPlaybook {
    pub version: u32,
    pub playbook: Playbook,
    pub compiled: Compiled,
}

/// Why a version could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("playbook {name:?} version {version} not found")]
    NotFound { name: String, version: u32 },
    #[error("stored playbook {name:?} version {version} no longer parses: {reason}")]
    Invalid {
        name: String,
        version: u32,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Parsed and compiled playbook versions by (name, version).
#[derive(Debug, Default)]
pub(crate) struct PlaybookCache {
    versions: RwLock<HashMap<(String, u32), Arc<LoadedPlaybook>>>,
}

impl PlaybookCache {
    /// A version, loaded from Redis the first time.
    pub(crate) async fn get(
        &self,
        store: &Store,
        name: &str,
        version: u32,
    ) -> Result<Arc<LoadedPlaybook>, LoadError> {
        let key = (name.to_owned(), version);
        if let Some(loaded) = self.versions.read().await.get(&key) {
            return Ok(Arc::clone(loaded));
        }
        let not_found = || LoadError::NotFound {
            name: name.to_owned(),
            version,
        };
        let (version, _, stored) = store
            .get_playbook(name, Some(version))
            .await?
            .ok_or_else(not_found)?;
        let loaded = Arc::new(load(name, version, &stored.yaml)?);
        self.versions.write().await.insert(key, Arc::clone(&loaded));
        Ok(loaded)
    }

    /// Every version loaded so far, with its playbook's name.
    pub(crate) async fn loaded(&self) -> Vec<(String, Arc<LoadedPlaybook>)> {
        self.versions
            .read()
            .await
            .iter()
            .map(|((name, _), loaded)| (name.clone(), Arc::clone(loaded)))
            .collect()
    }

    /// The latest version of a playbook.
    pub(crate) async fn latest(
        &self,
        store: &Store,
        name: &str,
    ) -> Result<Arc<LoadedPlaybook>, LoadError> {
        let (version, _, _) =
            store
                .get_playbook(name, None)
                .await?
                .ok_or_else(|| LoadError::NotFound {
                    name: name.to_owned(),
                    version: 0,
                })?;
        self.get(store, name, version).await
    }
}

fn load(name: &str, version: u32, yaml: &str) -> Result<LoadedPlaybook, LoadError> {
    let invalid = |reason: String| LoadError::Invalid {
        name: name.to_owned(),
        version,
        reason,
    };
    let playbook = parse(yaml).map_err(|v| invalid(v.to_string()))?;
    let compiled = Compiled::new(&playbook).map_err(|e| invalid(e.to_string()))?;
    Ok(LoadedPlaybook {
        version,
        playbook,
        compiled,
    })
}
