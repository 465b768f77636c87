//! Channel name → adapter, built once from the worker's configuration.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;

use super::ChannelAdapter;
use super::log::LogAdapter;
use super::webhook::WebhookAdapter;
use super::wecom::WecomAdapter;
use super::{grpc::GrpcAdapter, sms::SmsAdapter, smtp::SmtpAdapter};
use crate::config::{ChannelConfig, ChannelKind};

/// The adapters a worker serves, by channel name.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    adapters: BTreeMap<String, Arc<dyn ChannelAdapter>>,
    /// The `wecom` adapters among them (for their callback endpoints).
    wecom: Vec<Arc<WecomAdapter>>,
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
                ChannelKind::Sms(config) => Arc::new(
                    SmsAdapter::new(config.clone())
                        .with_context(|| format!("channel {}", channel.name))?,
                ),
                ChannelKind::Smtp(config) => Arc::new(
                    SmtpAdapter::new(config.clone())
                        .with_context(|| format!("channel {}", channel.name))?,
                ),
                ChannelKind::Grpc(config) => Arc::new(
                    GrpcAdapter::new(&channel.name, config.clone())
                        .with_context(|| format!("channel {}", channel.name))?,
                ),
                ChannelKind::Wecom(config) => {
                    let adapter = Arc::new(
                        WecomAdapter::new(&channel.name, config.clone())
                            .with_context(|| format!("channel {}", channel.name))?,
                    );
                    registry.wecom.push(Arc::clone(&adapter));
                    adapter
                }
            };
            registry.insert(&channel.name, adapter);
        }
        // WeCom's `add_contact` sends its link on another channel of this worker. The
        // adapters get the others only (no wecom channel), so no adapter holds itself.
        let mut others = registry.clone();
        for adapter in &registry.wecom {
            others.adapters.remove(adapter.name());
        }
        others.wecom.clear();
        for adapter in &registry.wecom {
            adapter.bind_fallbacks(others.clone())?;
        }
        Ok(registry)
    }

    /// The `wecom` adapters served.
    pub fn wecom_adapters(&self) -> &[Arc<WecomAdapter>] {
        &self.wecom
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
