//! The `log` channel: prints each delivery on stdout (the `console` channel of `tp dev`).

use std::io::Write as _;

use async_trait::async_trait;

use super::{ChannelAdapter, Delivered, Delivery, Error};

/// Prints one line per delivery on stdout; never fails.
///
/// Stdout rather than `tracing`: this is the dev console's output, not a diagnostic,
/// and it shows the rendered message that logs must never carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogAdapter;

#[async_trait]
impl ChannelAdapter for LogAdapter {
    async fn deliver(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        let line = line(delivery);
        // A closed stdout (e.g. `| head`) must not fail or retry the step.
        let _ = writeln!(std::io::stdout().lock(), "{line}");
        Ok(Delivered::new("printed"))
    }
}

/// `[console:<channel>] <playbook> v<version> step <step> (<action>) attempt <n> -> contact <id>: <message> <params>`,
/// leaving out an empty message and empty params.
fn line(delivery: &Delivery) -> String {
    let mut line = format!(
        "[console:{}] {} v{} step {} ({}) attempt {} -> contact {}",
        delivery.channel,
        delivery.playbook,
        delivery.version,
        delivery.step_id,
        delivery.action,
        delivery.attempt,
        delivery.contact.id,
    );
    if !delivery.message.is_empty() {
        line.push_str(": ");
        line.push_str(&delivery.message);
    }
    let has_params = delivery
        .params
        .as_object()
        .is_some_and(|params| !params.is_empty());
    if has_params {
        line.push(' ');
        line.push_str(&delivery.params.to_string());
    }
    line
}

#[cfg(test)]
mod tests;
