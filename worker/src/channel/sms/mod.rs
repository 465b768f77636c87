//! The `sms` channel: one text message per delivery, through Aliyun SMS (`SendSms`,
//! signed RPC-style requests) or a generic HTTP SMS gateway (configurable JSON or form
//! fields). Phone numbers never reach a log line or a step's detail.

mod aliyun;
mod config;
mod generic;

use async_trait::async_trait;

pub use config::{AliyunConfig, Config, Format, GenericConfig, Provider};

use crate::channel::{ChannelAdapter, Delivered, Delivery, Error};

/// Sends each delivery as a text message to the contact's `phone` identity.
#[derive(Debug)]
pub struct SmsAdapter {
    config: Config,
    http: reqwest::Client,
}

impl SmsAdapter {
    /// An adapter with its own connection pool.
    pub fn new(config: Config) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            // A redirect would resend the message somewhere the channel does not name.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("touchpoint-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { config, http })
    }
}

#[async_trait]
impl ChannelAdapter for SmsAdapter {
    async fn deliver(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        let phone = phone_of(delivery)?;
        tracing::debug!(
            run_id = %delivery.run_id,
            step = %delivery.step_id,
            to = %mask_phone(phone),
            "sending sms"
        );
        match &self.config.provider {
            Provider::Aliyun(aliyun) => {
                aliyun::send(&self.http, aliyun, self.config.timeout, delivery, phone).await
            }
            Provider::Generic(generic) => {
                generic::send(&self.http, generic, self.config.timeout, delivery, phone).await
            }
        }
    }
}

/// The contact's `phone` identity, or a permanent failure.
fn phone_of(delivery: &Delivery) -> Result<&str, Error> {
    match delivery.contact.identities.get("phone").map(|p| p.trim()) {
        Some(phone) if !phone.is_empty() => Ok(phone),
        _ => Err(Error::permanent("contact has no phone identity")),
    }
}

/// `+8613800001234` → `+86*******34`: enough to tell two numbers apart in a debug log,
/// not enough to call anyone.
pub(crate) fn mask_phone(phone: &str) -> String {
    let chars: Vec<char> = phone.chars().collect();
    let keep_head = if phone.starts_with('+') { 3 } else { 0 };
    let keep_tail = 2;
    chars
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if i < keep_head || i + keep_tail >= chars.len() {
                *c
            } else {
                '*'
            }
        })
        .collect()
}

/// A provider's free text made safe for a step's detail: at most `max` characters on one
/// line, with every run of 5 or more digits (a phone number, an account) replaced by `***`.
pub(crate) fn scrub(text: &str, max: usize) -> String {
    let mut out = String::new();
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if digits.len() >= 5 {
            out.push_str("***");
        } else {
            out.push_str(digits);
        }
        digits.clear();
    };
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        flush(&mut digits, &mut out);
        out.push(if c.is_control() { ' ' } else { c });
    }
    flush(&mut digits, &mut out);
    out.trim().chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::tests::delivery;

    #[test]
    fn masks_phone_numbers() {
        assert_eq!(mask_phone("+8613800001234"), "+86*********34");
        assert_eq!(mask_phone("13800001234"), "*********34");
        assert_eq!(mask_phone("12"), "12");
    }

    #[test]
    fn scrubs_numbers_and_control_characters_from_provider_text() {
        assert_eq!(
            scrub("bad number 13800001234\nretry in 5s", 100),
            "bad number *** retry in 5s"
        );
        assert_eq!(scrub("abcdef", 3), "abc");
    }

    #[test]
    fn a_contact_without_a_phone_fails_for_good() {
        let mut delivery = delivery();
        delivery.contact.identities.remove("phone");
        let error = phone_of(&delivery).unwrap_err();
        assert!(!error.is_retryable());
        assert_eq!(error.detail(), "contact has no phone identity");
    }
}
