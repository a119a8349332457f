//! Receipt handles and message ids: their string forms, and the randomness behind them.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::OnceLock;

/// A receipt handle: which slot, which receive of it, and which epoch of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptHandle {
    /// The store's handle epoch (random, renewed by `purge`).
    pub epoch: u64,
    /// Slab slot of the message.
    pub slot: u32,
    /// The slot's generation at the receive that issued this handle.
    pub generation: u32,
}

impl ReceiptHandle {
    /// Length of the string form: 32 lowercase hex digits.
    pub const LEN: usize = 32;

    /// Parses the string form; None for anything that is not exactly 32 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != Self::LEN {
            return None;
        }
        Some(Self {
            epoch: parse_hex(&bytes[..16])?,
            slot: parse_hex(&bytes[16..24])? as u32,
            generation: parse_hex(&bytes[24..])? as u32,
        })
    }
}

impl ReceiptHandle {
    /// Writes the string form into `out` without allocating and returns it.
    pub fn encode_into<'a>(&self, out: &'a mut [u8; Self::LEN]) -> &'a str {
        write_hex(&mut out[..16], self.epoch);
        write_hex(&mut out[16..24], u64::from(self.slot));
        write_hex(&mut out[24..], u64::from(self.generation));
        // Hex digits are ASCII.
        std::str::from_utf8(out).unwrap_or_default()
    }
}

impl fmt::Display for ReceiptHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.encode_into(&mut [0u8; Self::LEN]))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn write_hex(out: &mut [u8], mut value: u64) {
    for byte in out.iter_mut().rev() {
        *byte = HEX[(value & 0xf) as usize];
        value >>= 4;
    }
}

fn parse_hex(digits: &[u8]) -> Option<u64> {
    // Only lowercase hex: `u64::from_str_radix` would also take a sign and uppercase, which
    // would let several strings name one handle.
    digits.iter().try_fold(0u64, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some((acc << 4) | u64::from(v))
    })
}

pub(crate) fn random_u64() -> u64 {
    // std's RandomState is seeded from the OS and advanced per instance: enough for ids that
    // must not collide across stores or processes, without another dependency.
    RandomState::new().hash_one(0x5eed_u64)
}

fn process_nonce() -> u64 {
    static NONCE: OnceLock<u64> = OnceLock::new();
    *NONCE.get_or_init(random_u64)
}

/// Message ids come from one process-wide counter, so they are unique across stores (a message
/// moved to a dead-letter store gets a new one there) and increase within each store.
static NEXT_MESSAGE_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn take_message_ids(count: u64) -> u64 {
    NEXT_MESSAGE_ID.fetch_add(count, AtomicOrdering::Relaxed)
}

/// Length of [`format_message_id`]'s output.
pub const MESSAGE_ID_LEN: usize = 36;

/// Writes the string form of a message id (UUID-shaped: the process nonce, then the id) into
/// `out`, returning it as `&str`.
pub fn format_message_id_into(id: u64, out: &mut [u8; MESSAGE_ID_LEN]) -> &str {
    let nonce = process_nonce();
    write_hex(&mut out[0..8], nonce >> 32);
    out[8] = b'-';
    write_hex(&mut out[9..13], (nonce >> 16) & 0xffff);
    out[13] = b'-';
    write_hex(&mut out[14..18], nonce & 0xffff);
    out[18] = b'-';
    write_hex(&mut out[19..23], id >> 48);
    out[23] = b'-';
    write_hex(&mut out[24..36], id & 0xffff_ffff_ffff);
    // Every byte written above is ASCII.
    std::str::from_utf8(out).unwrap_or_default()
}

/// Rewrites the part of a message id's string form (as [`format_message_id_into`] wrote it into
/// `out`) that differs between ids sharing their top 16 bits: the last 12 hex digits.
pub fn format_message_id_tail(id: u64, out: &mut [u8; MESSAGE_ID_LEN]) {
    write_hex(&mut out[24..36], id & 0xffff_ffff_ffff);
}

/// The string form of a message id.
pub fn format_message_id(id: u64) -> String {
    let mut buf = [0u8; MESSAGE_ID_LEN];
    format_message_id_into(id, &mut buf).to_owned()
}
