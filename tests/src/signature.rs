//! Standard Webhooks signatures, computed here independently of the worker's signer.
//!
//! <https://www.standardwebhooks.com/>: `webhook-signature` is a space-separated list of
//! `v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>`, where the key
//! is the base64-decoded secret without its optional `whsec_` prefix.

use base64::{Engine, engine::general_purpose::STANDARD};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::ReceivedRequest;

type HmacSha256 = Hmac<Sha256>;

/// A fresh random secret in Standard Webhooks form: `whsec_` + base64 of 32 random bytes.
pub fn generate_secret() -> String {
    let mut key = Vec::with_capacity(32);
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    key.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    format!("whsec_{}", STANDARD.encode(key))
}

fn key(secret: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .ok()
}

fn mac(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> Option<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(&key(secret)?).ok()?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    Some(mac)
}

/// The `webhook-signature` value (`v1,<base64>`) for a message; `None` when `secret` is not
/// base64.
pub fn sign(secret: &str, id: &str, timestamp: &str, body: &[u8]) -> Option<String> {
    let tag = mac(secret, id, timestamp, body)?.finalize().into_bytes();
    Some(format!("v1,{}", STANDARD.encode(tag)))
}

/// Whether `request` carries `webhook-id`, `webhook-timestamp` and a `webhook-signature`
/// in which one `v1` signature matches its raw body under `secret`.
pub fn verify_signature(request: &ReceivedRequest, secret: &str) -> bool {
    let (Some(id), Some(timestamp), Some(signatures)) = (
        request.header("webhook-id"),
        request.header("webhook-timestamp"),
        request.header("webhook-signature"),
    ) else {
        return false;
    };
    signatures.split(' ').any(|candidate| {
        let Some(encoded) = candidate.strip_prefix("v1,") else {
            return false;
        };
        let Ok(tag) = STANDARD.decode(encoded) else {
            return false;
        };
        mac(secret, id, timestamp, &request.body).is_some_and(|mac| mac.verify_slice(&tag).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};
    use std::time::{Instant, SystemTime};

    // The test vector of the Standard Webhooks reference libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TIMESTAMP: &str = "1614265330";
    const BODY: &str = r#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn request(signature: &str, body: &str) -> ReceivedRequest {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", HeaderValue::from_static(ID));
        headers.insert("webhook-timestamp", HeaderValue::from_static(TIMESTAMP));
        headers.insert(
            "webhook-signature",
            HeaderValue::from_str(signature).expect("header value"),
        );
        ReceivedRequest {
            method: "POST".into(),
            path: "/hook".into(),
            headers,
            body: body.as_bytes().to_vec(),
            json: serde_json::from_str(body).ok(),
            received_at: Instant::now(),
            received_at_wall: SystemTime::now(),
            status: 200,
        }
    }

    #[test]
    fn signs_the_reference_vector() {
        assert_eq!(
            sign(SECRET, ID, TIMESTAMP, BODY.as_bytes()).as_deref(),
            Some(SIGNATURE)
        );
        // The prefix is optional.
        assert_eq!(
            sign(&SECRET["whsec_".len()..], ID, TIMESTAMP, BODY.as_bytes()).as_deref(),
            Some(SIGNATURE)
        );
    }

    #[test]
    fn verifies_good_and_rejects_bad_signatures() {
        assert!(verify_signature(&request(SIGNATURE, BODY), SECRET));
        assert!(verify_signature(
            &request(&format!("v1,bm9wZQ== {SIGNATURE}"), BODY),
            SECRET
        ));
        assert!(!verify_signature(
            &request(SIGNATURE, r#"{"test": 2432232315}"#),
            SECRET
        ));
        assert!(!verify_signature(
            &request(SIGNATURE, BODY),
            &generate_secret()
        ));
        assert!(!verify_signature(
            &request(&SIGNATURE.replace("v1,", "v2,"), BODY),
            SECRET
        ));
    }

    #[test]
    fn generated_secrets_are_random_32_byte_keys() {
        let a = generate_secret();
        assert_ne!(a, generate_secret());
        assert_eq!(key(&a).map(|k| k.len()), Some(32));
    }
}
