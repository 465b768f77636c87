//! One delivery as one signed POST, and the answer classified: 2xx done, 429/5xx retry,
//! any other status fails the step.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use reqwest::header::CONTENT_TYPE;
use reqwest::{Response, StatusCode};
use secrecy::ExposeSecret as _;
use serde::Serialize;

use super::{Config, signature};
use crate::channel::{
    ChannelAdapter, Contact, Delivered, Delivery, Error, retry_after, send_traced, transport_error,
};

/// Characters of a rejecting receiver's answer kept in the step's detail.
const DETAIL_BODY_CHARS: usize = 200;

/// POSTs each delivery to the channel's URL with Standard Webhooks headers.
#[derive(Debug)]
pub struct WebhookAdapter {
    config: Config,
    http: reqwest::Client,
}

impl WebhookAdapter {
    /// An adapter with its own connection pool.
    pub fn new(config: Config) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            // Following a redirect would resend the delivery somewhere the channel does not name.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("touchpoint-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { config, http })
    }
}

/// The JSON body SPEC's "Webhook channel" section shows.
#[derive(Serialize)]
struct Body<'a> {
    run_id: &'a str,
    playbook: &'a str,
    version: u32,
    step: &'a str,
    action: &'a str,
    attempt: u32,
    contact: &'a Contact,
    message: &'a str,
    params: &'a serde_json::Value,
}

impl<'a> From<&'a Delivery> for Body<'a> {
    fn from(delivery: &'a Delivery) -> Self {
        Self {
            run_id: &delivery.run_id,
            playbook: &delivery.playbook,
            version: delivery.version,
            step: &delivery.step_id,
            action: &delivery.action,
            attempt: delivery.attempt,
            contact: &delivery.contact,
            message: &delivery.message,
            params: &delivery.params,
        }
    }
}

#[async_trait]
impl ChannelAdapter for WebhookAdapter {
    async fn deliver(&self, delivery: &Delivery) -> Result<Delivered, Error> {
        let body = serde_json::to_vec(&Body::from(delivery))
            .map_err(|error| Error::permanent(format!("cannot encode the body: {error}")))?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |now| now.as_secs());
        // `webhook-id` is the step's idempotency key, so every attempt carries the same one.
        let id = &delivery.idempotency_key;
        let mut request = self
            .http
            .post(self.config.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(secret) = &self.config.secret {
            let signature = signature::sign(secret.expose_secret(), id, timestamp, &body);
            request = request.header("webhook-signature", signature);
        }
        // The receiver continues the HTTP call's span, within the run's trace.
        let response = send_traced(&self.http, request.body(body), &delivery.traceparent)
            .await
            .map_err(|error| transport_error(error, self.config.timeout))?;
        classify(response).await
    }
}

async fn classify(response: Response) -> Result<Delivered, Error> {
    let status = response.status();
    let code = status.as_u16();
    if status.is_success() {
        return Ok(Delivered::new(format!("HTTP {code}")));
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let detail = format!("HTTP {code}");
        let after = retry_after(response.headers(), SystemTime::now());
        return Err(if status == StatusCode::TOO_MANY_REQUESTS {
            Error::rate_limited(detail, after)
        } else {
            Error::Retryable {
                detail,
                retry_after: after,
                rate_limited: false,
            }
        });
    }
    let excerpt = body_excerpt(response).await;
    Err(Error::permanent(if excerpt.is_empty() {
        format!("HTTP {code}")
    } else {
        format!("HTTP {code}: {excerpt}")
    }))
}

/// The first [`DETAIL_BODY_CHARS`] characters of the answer, on one line. Reads only
/// what it needs, however large the answer.
async fn body_excerpt(mut response: Response) -> String {
    // A character is at most 4 bytes in UTF-8.
    let wanted = DETAIL_BODY_CHARS * 4;
    let mut bytes = Vec::new();
    while bytes.len() < wanted {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let excerpt: String = String::from_utf8_lossy(&bytes)
        .chars()
        .take(DETAIL_BODY_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    excerpt.trim().to_owned()
}
