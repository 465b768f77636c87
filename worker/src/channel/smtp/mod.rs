//! The `smtp` channel: one e-mail per delivery, over a pooled SMTP connection (lettre,
//! rustls with aws-lc-rs).
//!
//! - To: the contact's `email` identity; From: the channel's `from`.
//! - Subject: `params.subject`; text body: the rendered message; HTML body:
//!   `params.html` (both together make a `multipart/alternative`).
//! - `Message-ID: <{first 32 hex digits of SHA-256(idempotency key)}@{from's domain}>`, the
//!   same for every attempt of a step, so receivers and mail stores can deduplicate.
//! - A 5xx reply fails the step; a 4xx reply, a connection or TLS error or a timeout is
//!   retried. A 4xx reply that asks the sender to slow down (421, or a sending rate or
//!   connection limit in its text) also holds the whole channel back, as an HTTP 429
//!   does. Addresses never reach a log line or a step's detail.

mod config;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use secrecy::ExposeSecret as _;
use sha2::{Digest as _, Sha256};
use touchpoint_proto::security::root_cause;

pub use config::{Config, TlsMode};

use crate::channel::{ChannelAdapter, Delivered, Delivery, Error};

/// Most connections the pool keeps open to the server.
const POOL_MAX_SIZE: u32 = 8;
/// Characters of a server's reply kept in a step's detail.
const DETAIL_CHARS: usize = 160;

/// Sends each delivery as an e-mail through one SMTP server.
pub struct SmtpAdapter {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    timeout: Duration,
}

impl std::fmt::Debug for SmtpAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpAdapter")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SmtpAdapter {
    /// An adapter with its own connection pool (connections open on first use).
    pub fn new(config: Config) -> Result<Self, lettre::transport::smtp::Error> {
        let tls = match config.tls {
            TlsMode::None => Tls::None,
            TlsMode::StartTls | TlsMode::Implicit => {
                let mut parameters = TlsParameters::builder(config.host.clone());
                if let Some(pem) = &config.ca_pem {
                    parameters = parameters.add_root_certificate(Certificate::from_pem(pem)?);
                }
                let parameters = parameters.build_rustls()?;
                if config.tls == TlsMode::Implicit {
                    Tls::Wrapper(parameters)
                } else {
                    Tls::Required(parameters)
                }
            }
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .tls(tls)
            .timeout(Some(config.timeout))
            .pool_config(PoolConfig::new().max_size(POOL_MAX_SIZE));
        if let Some((username, password)) = &config.credentials {
            builder = builder.credentials(Credentials::new(
                username.clone(),
                password.expose_secret().to_owned(),
            ));
        }
        Ok(Self {
            transport: builder.build(),
            from: config.from,
            timeout: config.timeout,
        })
    }

    /// The message for one delivery.
    fn message(&self, delivery: &Delivery) -> Result<Message, Error> {
        let to = match delivery.contact.identities.get("email").map(|e| e.trim()) {
            Some(email) if !email.is_empty() => email
                .parse::<Mailbox>()
                .map_err(|_| Error::permanent("the contact's email identity is not an address"))?,
            _ => return Err(Error::permanent("contact has no email identity")),
        };
        let subject = match delivery.params.get("subject") {
            Some(serde_json::Value::String(subject)) => subject.clone(),
            None | Some(serde_json::Value::Null) => {
                return Err(Error::permanent("params.subject: required for an e-mail"));
            }
            Some(_) => return Err(Error::permanent("params.subject: expected a string")),
        };
        let html = match delivery.params.get("html") {
            Some(serde_json::Value::String(html)) if !html.is_empty() => Some(html.clone()),
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(_)) => None,
            Some(_) => return Err(Error::permanent("params.html: expected a string")),
        };
        let text = delivery.message.clone();
        let builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(message_id(
                &delivery.idempotency_key,
                self.from.email.domain(),
            )));
        let built = match (text.is_empty(), html) {
            (true, None) => {
                return Err(Error::permanent(
                    "nothing to send: the message is empty and params.html is not set",
                ));
            }
            (false, None) => builder.singlepart(SinglePart::plain(text)),
            (true, Some(html)) => builder.singlepart(SinglePart::html(html)),
            (false, Some(html)) => builder.multipart(MultiPart::alternative_plain_html(text, html)),
        };
        built.map_err(|error| Error::permanent(format!("cannot build the e-mail: {error}")))
    }
}

/// `<{32 hex digits of SHA-256(key)}@{domain}>`: stable across attempts, opaque.
fn message_id(idempotency_key: &str, domain: &str) -> String {
    let digest = Sha256::digest(idempotency_key.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("<{hex}@{domain}>")
}

#[async_trait]
impl ChannelAdapter for SmtpAdapter {
    async fn deliver(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        let message = self.message(delivery)?;
        // Bounded by the channel's timeout and by when the scheduler stops waiting.
        let budget = delivery
            .deadline
            .and_then(|deadline| deadline.duration_since(SystemTime::now()).ok())
            .map_or(self.timeout, |left| left.min(self.timeout));
        match tokio::time::timeout(budget, self.transport.send(message)).await {
            Err(_) => Err(Error::retryable(format!(
                "timeout after {}",
                humantime::format_duration(budget)
            ))),
            Ok(Ok(response)) => Ok(Delivered::new(format!("SMTP {}", response.code()))),
            Ok(Err(error)) => Err(classify(&error)),
        }
    }
}

/// 5xx fails the step; everything else (4xx, connection, TLS, timeout) is retried.
fn classify(error: &lettre::transport::smtp::Error) -> Error {
    let reason = scrub_addresses(&root_cause(error));
    match error.status() {
        Some(code) if error.is_permanent() => {
            Error::permanent(detail(&format!("SMTP {code}"), &reason))
        }
        Some(code) => {
            let detail = detail(&format!("SMTP {code}"), &reason);
            if asks_to_slow_down(&code.to_string(), &reason) {
                Error::rate_limited(detail, None)
            } else {
                Error::retryable(detail)
            }
        }
        None if error.is_timeout() => Error::retryable("SMTP timeout"),
        None if error.is_tls() => Error::retryable(detail("SMTP TLS error", &reason)),
        None => Error::retryable(detail("SMTP error", &reason)),
    }
}

/// Words of a 4xx reply that asks the sender to slow down, rather than turning one
/// message away (a full mailbox, too many recipients).
const SLOW_DOWN: [&str; 7] = [
    "rate limit",
    "ratelimit",
    "sending rate",
    "throttl",
    "slow down",
    "too many messages",
    "too many connections",
];

/// Whether a 4xx reply (`code`, its text `reason`) asks the sender to slow down: a 421
/// (the server closes the connection: overloaded or limiting connections) or a rate or
/// connection limit named in its text.
fn asks_to_slow_down(code: &str, reason: &str) -> bool {
    let reason = reason.to_ascii_lowercase();
    code == "421" || SLOW_DOWN.iter().any(|sign| reason.contains(sign))
}

fn detail(head: &str, reason: &str) -> String {
    if reason.is_empty() {
        head.to_owned()
    } else {
        format!("{head}: {reason}")
    }
}

/// A server's reply on one line, at most [`DETAIL_CHARS`] characters, with every word
/// holding an `@` (an address, quoted or in `<...>`) replaced by `***`.
fn scrub_addresses(text: &str) -> String {
    let words: Vec<String> = text
        .split_whitespace()
        .map(|word| {
            if word.contains('@') {
                "***".to_owned()
            } else {
                word.chars().filter(|c| !c.is_control()).collect()
            }
        })
        .collect();
    words.join(" ").chars().take(DETAIL_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::tests::delivery;

    fn adapter() -> SmtpAdapter {
        SmtpAdapter::new(Config {
            host: "127.0.0.1".to_owned(),
            port: 2525,
            tls: TlsMode::None,
            credentials: None,
            from: "Brand <news@brand.example>".parse().unwrap(),
            ca_pem: None,
            timeout: Duration::from_secs(5),
        })
        .unwrap()
    }

    fn email_delivery(params: serde_json::Value) -> Delivery {
        let mut delivery = delivery();
        delivery
            .contact
            .identities
            .insert("email".to_owned(), "wang.fang@example.com".to_owned());
        delivery.params = params;
        delivery
    }

    #[test]
    fn replies_asking_to_slow_down_are_told_apart() {
        assert!(asks_to_slow_down(
            "421",
            "4.7.0 Try again later, closing connection"
        ));
        assert!(asks_to_slow_down(
            "451",
            "4.7.1 sending rate limit exceeded"
        ));
        assert!(asks_to_slow_down(
            "454",
            "Throttling failure: Maximum sending rate exceeded"
        ));
        assert!(asks_to_slow_down(
            "450",
            "Too many connections from your IP"
        ));
        assert!(!asks_to_slow_down("451", "4.3.0 try again later"));
        assert!(!asks_to_slow_down("452", "4.5.3 too many recipients"));
        assert!(!asks_to_slow_down(
            "450",
            "4.2.1 The user is receiving mail at a rate that prevents additional messages"
        ));
    }

    #[test]
    fn message_ids_are_stable_per_key_and_opaque() {
        let id = message_id("run-1:coupon", "brand.example");
        assert_eq!(id, message_id("run-1:coupon", "brand.example"));
        assert_ne!(id, message_id("run-1:other", "brand.example"));
        assert!(id.starts_with('<') && id.ends_with("@brand.example>"));
        assert_eq!(id.len(), 1 + 32 + 1 + "brand.example".len() + 1);
        assert!(!id.contains("run-1"));
    }

    #[tokio::test]
    async fn builds_a_multipart_alternative_when_both_bodies_are_given() {
        let delivery =
            email_delivery(serde_json::json!({ "subject": "欢迎", "html": "<p>hello</p>" }));
        let text = String::from_utf8(adapter().message(&delivery).unwrap().formatted()).unwrap();
        assert!(text.contains("multipart/alternative"), "{text}");
        assert!(
            text.contains("text/plain") && text.contains("text/html"),
            "{text}"
        );
        assert!(text.contains(&format!(
            "Message-ID: {}",
            message_id("run-1:coupon", "brand.example")
        )));

        let plain = email_delivery(serde_json::json!({ "subject": "hi" }));
        let text = String::from_utf8(adapter().message(&plain).unwrap().formatted()).unwrap();
        assert!(
            !text.contains("multipart") && text.contains("text/plain"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn bad_deliveries_fail_for_good_without_naming_the_address() {
        let no_subject = adapter()
            .message(&email_delivery(serde_json::json!({})))
            .unwrap_err();
        assert_eq!(
            no_subject,
            Error::permanent("params.subject: required for an e-mail")
        );
        let mut no_email = email_delivery(serde_json::json!({ "subject": "s" }));
        no_email.contact.identities.remove("email");
        assert_eq!(
            adapter().message(&no_email).unwrap_err(),
            Error::permanent("contact has no email identity")
        );
        let mut bad = email_delivery(serde_json::json!({ "subject": "s" }));
        bad.contact
            .identities
            .insert("email".to_owned(), "wang.fang at example".to_owned());
        let error = adapter().message(&bad).unwrap_err();
        assert_eq!(
            error,
            Error::permanent("the contact's email identity is not an address")
        );
    }

    #[test]
    fn scrubs_addresses_from_replies() {
        assert_eq!(
            scrub_addresses("5.1.1 <wang.fang@example.com>: Recipient\naddress rejected"),
            "5.1.1 *** Recipient address rejected"
        );
    }
}
