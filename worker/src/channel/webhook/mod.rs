//! The `webhook` channel: a signed JSON POST per delivery (SPEC "Webhook channel").

mod client;
mod config;
mod signature;

pub use client::WebhookAdapter;
pub use config::Config;

#[cfg(test)]
mod tests;
