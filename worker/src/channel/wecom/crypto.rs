//! WeCom's callback encryption ("加解密方案"): a SHA1 `msg_signature` over the sorted
//! `[token, timestamp, nonce, encrypt]`, and AES-256-CBC with
//! key = base64(EncodingAESKey + "="), IV = the key's first 16 bytes, PKCS#7 padding to
//! 32-byte blocks, plaintext = 16 random bytes + 4-byte big-endian length + message +
//! receive id (the corp id).

use aes::Aes256;
use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeDecrypt as _, KeyIvInit as _};
use sha1::{Digest as _, Sha1};

/// WeCom pads to 32 bytes, not to the cipher's 16.
const PAD_BLOCK: usize = 32;

/// EncodingAESKeys are 43 characters whose last one usually has non-zero trailing bits
/// (WeCom's own samples do), which strict base64 refuses.
const KEY_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a callback payload was refused. Never carries the payload itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// `EncodingAESKey` is not 43 characters of base64 decoding to 32 bytes.
    #[error("the EncodingAESKey is not 43 base64 characters (32 bytes)")]
    BadKey,
    /// The `Encrypt` text is not base64 of whole AES blocks.
    #[error("the ciphertext is not base64 of whole AES blocks")]
    BadCiphertext,
    /// The padding or the length prefix does not fit the plaintext.
    #[error("the decrypted payload is malformed")]
    Malformed,
    /// The payload is for another corp (or suite).
    #[error("the payload's receive id does not match corp_id")]
    WrongReceiver,
}

/// The AES key of one callback configuration.
#[derive(Clone)]
pub struct CallbackCipher {
    key: [u8; 32],
}

// Hand-written: the key is a secret.
impl std::fmt::Debug for CallbackCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallbackCipher")
    }
}

impl CallbackCipher {
    /// From the 43-character EncodingAESKey of the WeCom admin console.
    pub fn new(encoding_aes_key: &str) -> Result<Self, CryptoError> {
        if encoding_aes_key.len() != 43 {
            return Err(CryptoError::BadKey);
        }
        let bytes = KEY_BASE64
            .decode(encoding_aes_key)
            .map_err(|_| CryptoError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadKey)?;
        Ok(Self { key })
    }

    /// Decrypts an `Encrypt` field (or `echostr`) and checks that its receive id is
    /// `receive_id`; answers the message (XML, or the echo string).
    pub fn decrypt(&self, encrypted: &str, receive_id: &str) -> Result<Vec<u8>, CryptoError> {
        let mut buffer = STANDARD
            .decode(encrypted.trim())
            .map_err(|_| CryptoError::BadCiphertext)?;
        if buffer.is_empty() || buffer.len() % 16 != 0 {
            return Err(CryptoError::BadCiphertext);
        }
        let iv: [u8; 16] = self.key[..16].try_into().map_err(|_| CryptoError::BadKey)?;
        let plain = cbc::Decryptor::<Aes256>::new(&self.key.into(), &iv.into())
            .decrypt_padded::<NoPadding>(&mut buffer)
            .map_err(|_| CryptoError::BadCiphertext)?;
        let pad = usize::from(*plain.last().ok_or(CryptoError::Malformed)?);
        if pad == 0 || pad > PAD_BLOCK || pad > plain.len() {
            return Err(CryptoError::Malformed);
        }
        let unpadded = &plain[..plain.len() - pad];
        let length_bytes: [u8; 4] = unpadded
            .get(16..20)
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(CryptoError::Malformed)?;
        let length = usize::try_from(u32::from_be_bytes(length_bytes))
            .map_err(|_| CryptoError::Malformed)?;
        let message = unpadded
            .get(20..20usize.saturating_add(length))
            .ok_or(CryptoError::Malformed)?;
        let receiver = &unpadded[20 + length..];
        if receiver != receive_id.as_bytes() {
            return Err(CryptoError::WrongReceiver);
        }
        Ok(message.to_vec())
    }

    /// Encrypts `message` for `receive_id` with the 16 `random` bytes in front, as WeCom
    /// does (tests use it to check [`CallbackCipher::decrypt`] both ways).
    #[cfg(test)]
    pub(crate) fn encrypt(&self, random: [u8; 16], message: &[u8], receive_id: &str) -> String {
        use cbc::cipher::BlockModeEncrypt as _;
        let mut plain = random.to_vec();
        plain.extend_from_slice(&u32::try_from(message.len()).expect("short").to_be_bytes());
        plain.extend_from_slice(message);
        plain.extend_from_slice(receive_id.as_bytes());
        let pad = PAD_BLOCK - plain.len() % PAD_BLOCK;
        plain.extend(std::iter::repeat_n(u8::try_from(pad).expect("≤ 32"), pad));
        let iv: [u8; 16] = self.key[..16].try_into().expect("16 bytes");
        let length = plain.len();
        let cipher = cbc::Encryptor::<Aes256>::new(&self.key.into(), &iv.into())
            .encrypt_padded::<NoPadding>(&mut plain, length)
            .expect("whole blocks")
            .to_vec();
        STANDARD.encode(cipher)
    }
}

/// `msg_signature`: hex SHA1 of the four strings sorted and concatenated.
pub fn signature(token: &str, timestamp: &str, nonce: &str, encrypted: &str) -> String {
    let mut parts = [token, timestamp, nonce, encrypted];
    parts.sort_unstable();
    let digest = Sha1::digest(parts.concat().as_bytes());
    hex_lower(&digest)
}

/// Whether `given` is the signature of the four strings (compared in constant time).
pub fn verify_signature(
    token: &str,
    timestamp: &str,
    nonce: &str,
    encrypted: &str,
    given: &str,
) -> bool {
    let expected = signature(token, timestamp, nonce, encrypted);
    let given = given.to_ascii_lowercase();
    expected.len() == given.len()
        && expected
            .bytes()
            .zip(given.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}
