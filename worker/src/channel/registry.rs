//! Channel name → adapter, built once from the worker's configuration.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;

use super::ChannelAdapter;
use super::log::LogAdapter;
use super::webhook::WebhookAdapter;
use crate::config::{ChannelConfig, ChannelKind};

/// The adapters a worker serves, by channel name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    adapters: BTreeMap<String, Arc<dyn ChannelAdapter>>,
}

impl Registry {
    /// Builds one adapter per configured channel.
    pub fn from_config(channels: &[ChannelConfig]) -> anyhow::Result<Self> {
        let mut registry = Self::default();
        for channel in channels {
            let adapter: Arc<dyn ChannelAdapter> = match &channel.kind {
                ChannelKind::Log => Arc::new(LogAdapter),
                ChannelKind::Webhook(config) => Arc::new(
                    WebhookAdapter::new(config.clone())
                        .with_context(|| format!("channel {}", channel.name))?,
                ),
            };
            registry.insert(&channel.name, adapter);
        }
        Ok(registry)
    }

    /// Serves `name` with `adapter`, replacing any adapter already under that name.
    pub fn insert(&mut self, name: &str, adapter: Arc<dyn ChannelAdapter>) {
        self.adapters.insert(name.to_owned(), adapter);
    }

    /// The adapter serving `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn ChannelAdapter>> {
        self.adapters.get(name)
    }

    /// The channel names served, sorted.
    pub fn names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }
}
