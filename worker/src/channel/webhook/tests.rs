//! The webhook adapter against a real HTTP receiver on 127.0.0.1.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::{Config, WebhookAdapter};
use crate::channel::tests::delivery;
use crate::channel::{ChannelAdapter, Delivered, Error};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What the receiver answers to one request.
#[derive(Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: String,
    delay: Duration,
}

impl Reply {
    fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
}

/// One request as the receiver saw it.
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone)]
struct Receiver {
    /// Answers in order; the last one repeats.
    replies: Arc<Mutex<VecDeque<Reply>>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    /// Serves `replies` on a free port and returns the receiver and its URL.
    async fn start(replies: Vec<Reply>) -> (Self, reqwest::Url) {
        let receiver = Self {
            replies: Arc::new(Mutex::new(replies.into())),
            received: Arc::default(),
        };
        let app = Router::new()
            .route("/hook", axum::routing::post(answer))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url.parse().unwrap())
    }

    fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.received.lock().unwrap())
    }
}

async fn answer(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> Response {
    receiver
        .received
        .lock()
        .unwrap()
        .push(Received { headers, body });
    let reply = {
        let mut replies = receiver.replies.lock().unwrap();
        if replies.len() > 1 {
            replies.pop_front().unwrap()
        } else {
            replies.front().unwrap().clone()
        }
    };
    tokio::time::sleep(reply.delay).await;
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

fn adapter(url: reqwest::Url, secret: Option<&str>, timeout: Duration) -> WebhookAdapter {
    let secret = secret.map(|secret| super::signature::decode_secret(secret).unwrap().unwrap());
    WebhookAdapter::new(Config {
        url,
        secret,
        timeout,
    })
    .unwrap()
}

fn header<'a>(received: &'a Received, name: &str) -> Option<&'a str> {
    received
        .headers
        .get(name)
        .map(|value| value.to_str().unwrap())
}

#[tokio::test]
async fn posts_the_body_spec_shows() {
    let (receiver, url) = Receiver::start(vec![Reply::status(200)]).await;
    let delivered = adapter(url, None, Config::DEFAULT_TIMEOUT)
        .deliver(&delivery())
        .await
        .unwrap();
    assert_eq!(delivered, Delivered::new("HTTP 200"));

    let received = receiver.take();
    assert_eq!(received.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&received[0].body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "run_id": "run-1", "playbook": "welcome-new-customer", "version": 3,
            "step": "coupon", "action": "send_message", "attempt": 1,
            "contact": { "id": "c-1001", "attrs": {"name": "王芳"}, "tags": ["paid"], "tz": "Asia/Shanghai",
                         "identities": {"wecom": "wmXXXX", "phone": "+8613800000000"} },
            "message": "王芳，欢迎！新人券 WELCOME10 已到账",
            "params": { "coupon": "WELCOME10" }
        })
    );
}

#[tokio::test]
async fn sends_standard_webhooks_headers_with_a_signature_that_verifies() {
    let (receiver, url) = Receiver::start(vec![Reply::status(200)]).await;
    adapter(url, Some(SECRET), Config::DEFAULT_TIMEOUT)
        .deliver(&delivery())
        .await
        .unwrap();

    let received = receiver.take();
    let request = &received[0];
    assert_eq!(header(request, "content-type"), Some("application/json"));
    // The receiver continues the HTTP call's span, in the delivery's trace.
    let traceparent = header(request, "traceparent").unwrap();
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
    assert_ne!(
        traceparent,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    );
    let id = header(request, "webhook-id").unwrap();
    assert_eq!(id, "run-1:coupon");
    let timestamp: u64 = header(request, "webhook-timestamp")
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        now.abs_diff(timestamp) < 60,
        "timestamp {timestamp}, now {now}"
    );

    // Verified the way a receiver would, independently of the adapter's signing code.
    let signature = header(request, "webhook-signature").unwrap();
    let signature = STANDARD
        .decode(signature.strip_prefix("v1,").unwrap())
        .unwrap();
    let key = STANDARD
        .decode(SECRET.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&request.body);
    mac.verify_slice(&signature).unwrap();
}

#[tokio::test]
async fn without_secret_or_trace_there_is_no_signature_or_traceparent() {
    let (receiver, url) = Receiver::start(vec![Reply::status(204)]).await;
    let mut delivery = delivery();
    delivery.traceparent = String::new();
    let delivered = adapter(url, None, Config::DEFAULT_TIMEOUT)
        .deliver(&delivery)
        .await
        .unwrap();
    assert_eq!(delivered.detail, "HTTP 204");

    let received = receiver.take();
    assert_eq!(header(&received[0], "webhook-signature"), None);
    assert_eq!(header(&received[0], "traceparent"), None);
    assert_eq!(header(&received[0], "webhook-id"), Some("run-1:coupon"));
}

#[tokio::test]
async fn every_attempt_of_a_step_carries_the_same_webhook_id() {
    let (receiver, url) = Receiver::start(vec![Reply::status(503), Reply::status(200)]).await;
    let adapter = adapter(url, Some(SECRET), Config::DEFAULT_TIMEOUT);
    let mut delivery = delivery();
    assert!(adapter.deliver(&delivery).await.unwrap_err().is_retryable());
    delivery.attempt = 2;
    adapter.deliver(&delivery).await.unwrap();

    let received = receiver.take();
    assert_eq!(received.len(), 2);
    assert_eq!(
        header(&received[0], "webhook-id"),
        header(&received[1], "webhook-id")
    );
    let attempts: Vec<serde_json::Value> = received
        .iter()
        .map(|request| {
            serde_json::from_slice::<serde_json::Value>(&request.body).unwrap()["attempt"].clone()
        })
        .collect();
    assert_eq!(attempts, [1, 2]);
}

#[tokio::test]
async fn answers_are_classified_by_status() {
    let long_answer = "x".repeat(1000);
    let cases = [
        (
            Reply {
                headers: vec![("retry-after", "7")],
                ..Reply::status(503)
            },
            Error::Retryable {
                detail: "HTTP 503".to_owned(),
                retry_after: Some(Duration::from_secs(7)),
                rate_limited: false,
            },
        ),
        (Reply::status(429), Error::rate_limited("HTTP 429", None)),
        (
            Reply {
                body: "missing field\n`contact`".to_owned(),
                ..Reply::status(400)
            },
            Error::permanent("HTTP 400: missing field `contact`"),
        ),
        (
            Reply {
                body: long_answer.clone(),
                ..Reply::status(404)
            },
            Error::permanent(format!("HTTP 404: {}", &long_answer[..200])),
        ),
        (
            Reply {
                headers: vec![("location", "http://127.0.0.1:9/elsewhere")],
                ..Reply::status(302)
            },
            Error::permanent("HTTP 302"),
        ),
    ];
    for (reply, expected) in cases {
        let (_receiver, url) = Receiver::start(vec![reply]).await;
        let error = adapter(url, None, Config::DEFAULT_TIMEOUT)
            .deliver(&delivery())
            .await
            .unwrap_err();
        assert_eq!(error, expected);
    }
}

#[tokio::test]
async fn a_slow_receiver_times_out_as_retryable() {
    let (_receiver, url) = Receiver::start(vec![Reply {
        delay: Duration::from_secs(5),
        ..Reply::status(200)
    }])
    .await;
    let error = adapter(url, None, Duration::from_millis(200))
        .deliver(&delivery())
        .await
        .unwrap_err();
    assert_eq!(error, Error::retryable("timeout after 200ms"));
}

#[tokio::test]
async fn a_refused_connection_is_retryable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    drop(listener);
    let error = adapter(url.parse().unwrap(), None, Config::DEFAULT_TIMEOUT)
        .deliver(&delivery())
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert!(error.detail().starts_with("connect error: "), "{error:?}");
    assert!(!error.detail().contains("127.0.0.1"), "{error:?}");
}
