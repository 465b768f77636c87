//! The `state` of a contact way: WeCom hands it back in the contact-added callback, and
//! allows at most 30 characters of which we use only `[0-9A-Za-z]`. Every form is
//! reversible by [`run_id_from_state`] except the last:
//! - a run id `<22 base-62 digits>-<partition>` becomes `n` + the digits + the partition
//!   (at most 28 characters);
//! - a run id of earlier versions, `<32 hex>-<partition>` (up to 38 characters), is
//!   packed: its 16 uuid bytes and 2 partition bytes as one base-62 number of exactly 25
//!   digits, after an `r`;
//! - a run id of another shape becomes `h` + the first 29 hex digits of its SHA-256
//!   (stable, not reversible).

use sha2::{Digest as _, Sha256};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Base-62 digits of an 18-byte number: 62^25 > 2^144.
const DIGITS: usize = 25;
/// Base-62 digits of a run id's UUIDv7 (62^22 > 2^128).
const RUN_ID_DIGITS: usize = 22;

/// The contact way `state` for `run_id` (at most 30 characters).
pub fn state_for_run(run_id: &str) -> String {
    if let Some((id, partition)) = base62_run_id(run_id) {
        return format!("n{id}{partition}");
    }
    if let Some(bytes) = run_id_bytes(run_id) {
        return format!("r{}", to_base62(bytes));
    }
    let digest = Sha256::digest(run_id.as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("h{}", &hex[..29])
}

/// The run id a `state` made by [`state_for_run`] stands for, when it is reversible.
pub fn run_id_from_state(state: &str) -> Option<String> {
    if let Some(packed) = state.strip_prefix('n') {
        let (id, partition) = packed.split_at_checked(RUN_ID_DIGITS)?;
        let run_id = format!("{id}-{partition}");
        return base62_run_id(&run_id).is_some().then_some(run_id);
    }
    let digits = state.strip_prefix('r')?;
    if digits.len() != DIGITS {
        return None;
    }
    let bytes = from_base62(digits)?;
    let uuid: String = bytes[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    let partition = u16::from_be_bytes([bytes[16], bytes[17]]);
    Some(format!("{uuid}-{partition}"))
}

/// The id digits and canonical decimal partition of a run id of the current shape.
fn base62_run_id(run_id: &str) -> Option<(&str, &str)> {
    let (id, partition) = run_id.rsplit_once('-')?;
    let canonical = partition.parse::<u16>().ok()?.to_string() == partition;
    (id.len() == RUN_ID_DIGITS && id.bytes().all(|b| b.is_ascii_alphanumeric()) && canonical)
        .then_some((id, partition))
}

fn run_id_bytes(run_id: &str) -> Option<[u8; 18]> {
    let (uuid, partition) = run_id.rsplit_once('-')?;
    if uuid.len() != 32
        || !uuid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    // Only the canonical decimal form round-trips.
    let partition_number: u16 = partition.parse().ok()?;
    if partition_number.to_string() != partition {
        return None;
    }
    let mut bytes = [0u8; 18];
    for (index, byte) in bytes[..16].iter_mut().enumerate() {
        *byte = u8::from_str_radix(uuid.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    bytes[16..].copy_from_slice(&partition_number.to_be_bytes());
    Some(bytes)
}

/// Long division of a big-endian number by 62, digit by digit.
fn to_base62(mut number: [u8; 18]) -> String {
    let mut digits = [b'0'; DIGITS];
    for digit in digits.iter_mut().rev() {
        let mut remainder: u32 = 0;
        for byte in &mut number {
            let value = (remainder << 8) | u32::from(*byte);
            *byte = u8::try_from(value / 62).unwrap_or(u8::MAX);
            remainder = value % 62;
        }
        *digit = ALPHABET[remainder as usize];
    }
    String::from_utf8_lossy(&digits).into_owned()
}

fn from_base62(digits: &str) -> Option<[u8; 18]> {
    let mut number = [0u8; 18];
    for c in digits.bytes() {
        let mut carry = u32::try_from(ALPHABET.iter().position(|&a| a == c)?).ok()?;
        for byte in number.iter_mut().rev() {
            let value = u32::from(*byte) * 62 + carry;
            *byte = (value & 0xff) as u8;
            carry = value >> 8;
        }
        if carry != 0 {
            return None;
        }
    }
    Some(number)
}
