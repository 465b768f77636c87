//! Standard Webhooks signatures: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::SecretSlice;
use sha2::Sha256;

/// Decodes a secret as Standard Webhooks hands it out: base64, optionally prefixed
/// `whsec_`. `Ok(None)` for an empty key.
pub(super) fn decode_secret(secret: &str) -> Result<Option<SecretSlice<u8>>, base64::DecodeError> {
    let encoded = secret.trim();
    let encoded = encoded.strip_prefix("whsec_").unwrap_or(encoded);
    let key = STANDARD.decode(encoded)?;
    Ok((!key.is_empty()).then(|| key.into()))
}

/// The `webhook-signature` header value for one request.
pub(super) fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    /// The test vector the Standard Webhooks reference libraries check against.
    #[test]
    fn signs_like_the_reference_implementation() {
        let key = decode_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")
            .unwrap()
            .unwrap();
        let signature = sign(
            key.expose_secret(),
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(signature, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn secret_prefix_is_optional() {
        let with = decode_secret("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let without = decode_secret("C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        assert_eq!(
            with.unwrap().expose_secret(),
            without.unwrap().expose_secret()
        );
    }

    #[test]
    fn bad_or_empty_secrets_are_refused() {
        assert!(decode_secret("not base64!").is_err());
        assert!(decode_secret("whsec_").unwrap().is_none());
    }
}
