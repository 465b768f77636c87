//! A generic HTTP SMS gateway: one POST per message, its fields rendered from the
//! channel's `fields` templates, as JSON or as a form. 2xx done; 429 rate limited
//! (honouring `Retry-After`); 5xx retryable; any other status fails the step.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use secrecy::ExposeSecret as _;

use super::aliyun::percent_encode;
use super::config::{Format, GenericConfig, render};
use super::scrub;
use crate::channel::{Delivered, Delivery, Error, retry_after, send_traced, transport_error};

/// Characters of a rejecting gateway's answer kept in the step's detail.
const DETAIL_CHARS: usize = 160;

/// The body fields for one delivery.
fn fields(config: &GenericConfig, delivery: &Delivery, phone: &str) -> BTreeMap<String, String> {
    let value = |name: &str| -> String {
        match name {
            "phone" => phone.to_owned(),
            "message" => delivery.message.clone(),
            "idempotency_key" => delivery.idempotency_key.clone(),
            "run_id" => delivery.run_id.clone(),
            "step_id" => delivery.step_id.clone(),
            "playbook" => delivery.playbook.clone(),
            "action" => delivery.action.clone(),
            "contact_id" => delivery.contact.id.clone(),
            // The configuration was checked: no other placeholder gets here.
            _ => String::new(),
        }
    };
    config
        .fields
        .iter()
        .map(|(name, template)| (name.clone(), render(template, value)))
        .collect()
}

/// `application/x-www-form-urlencoded` text of `fields`.
fn form(fields: &BTreeMap<String, String>) -> String {
    fields
        .iter()
        .map(|(name, value)| format!("{}={}", percent_encode(name), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

pub(super) async fn send(
    http: &reqwest::Client,
    config: &GenericConfig,
    timeout: Duration,
    delivery: &Delivery,
    phone: &str,
) -> Result<Delivered, Error> {
    let fields = fields(config, delivery, phone);
    let (content_type, body) = match config.format {
        Format::Json => (
            "application/json",
            serde_json::to_vec(&fields)
                .map_err(|error| Error::permanent(format!("cannot encode the body: {error}")))?,
        ),
        Format::Form => (
            "application/x-www-form-urlencoded",
            form(&fields).into_bytes(),
        ),
    };
    let mut request = http
        .post(config.url.clone())
        .header(CONTENT_TYPE, content_type)
        .header("idempotency-key", &delivery.idempotency_key)
        .body(body);
    if let Some(token) = &config.token {
        request = request.header(AUTHORIZATION, format!("Bearer {}", token.expose_secret()));
    }
    let response = send_traced(http, request, &delivery.traceparent)
        .await
        .map_err(|error| transport_error(error, timeout))?;
    let status = response.status();
    let code = status.as_u16();
    if status.is_success() {
        return Ok(Delivered::new(format!("HTTP {code}")));
    }
    let after = retry_after(response.headers(), std::time::SystemTime::now());
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Err(Error::rate_limited(format!("HTTP {code}"), after));
    }
    if status.is_server_error() {
        return Err(Error::Retryable {
            detail: format!("HTTP {code}"),
            retry_after: after,
            rate_limited: false,
        });
    }
    let text = response.text().await.unwrap_or_default();
    let excerpt = scrub(&text, DETAIL_CHARS);
    Err(Error::permanent(if excerpt.is_empty() {
        format!("HTTP {code}")
    } else {
        format!("HTTP {code}: {excerpt}")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::tests::delivery;

    #[test]
    fn renders_fields_from_the_delivery() {
        let config = GenericConfig {
            url: reqwest::Url::parse("http://127.0.0.1:9/").unwrap(),
            format: Format::Form,
            fields: BTreeMap::from([
                ("to".to_owned(), "{phone}".to_owned()),
                ("text".to_owned(), "{message}".to_owned()),
                ("ref".to_owned(), "tp-{idempotency_key}".to_owned()),
            ]),
            token: None,
        };
        let fields = fields(&config, &delivery(), "+8613800000000");
        assert_eq!(fields["to"], "+8613800000000");
        assert_eq!(fields["ref"], "tp-run-1:coupon");
        assert_eq!(fields["text"], "王芳，欢迎！新人券 WELCOME10 已到账");
        assert_eq!(
            form(&BTreeMap::from([("to".to_owned(), "+86 1".to_owned())])),
            "to=%2B86%201"
        );
    }
}
