//! [`RequestId`]: a request id as the store keeps it, inline when it is short.
//!
//! Ids of up to [`RequestId::INLINE`] bytes of UTF-8 (most ids: `"req-000123"`, `"chat-7"`, a
//! 20-digit number) live inside the 24-byte value itself, so a stored message costs no heap
//! block for its id (a `Box<str>` is 16 bytes plus a 32-byte heap block for a short id); longer
//! ids are boxed as before. Either way it reads as a `&str`.

use std::fmt;
use std::ops::Deref;

/// The length of an inline id, `0..=23`: the compiler uses the other 232 values of the byte to
/// tell the two representations apart, so a [`RequestId`] is 24 bytes, as an `Option` of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[rustfmt::skip]
enum InlineLen {
    L0, L1, L2, L3, L4, L5, L6, L7, L8, L9, L10, L11, L12, L13, L14, L15, L16, L17, L18, L19, L20,
    L21, L22, L23,
}

impl InlineLen {
    #[rustfmt::skip]
    const ALL: [Self; RequestId::INLINE + 1] = [
        Self::L0, Self::L1, Self::L2, Self::L3, Self::L4, Self::L5, Self::L6, Self::L7, Self::L8,
        Self::L9, Self::L10, Self::L11, Self::L12, Self::L13, Self::L14, Self::L15, Self::L16,
        Self::L17, Self::L18, Self::L19, Self::L20, Self::L21, Self::L22, Self::L23,
    ];
}

#[derive(Clone)]
enum Repr {
    Inline { len: InlineLen, bytes: [u8; RequestId::INLINE] },
    Boxed(Box<str>),
}

/// A request id: a string, stored inline up to [`RequestId::INLINE`] bytes.
#[derive(Clone)]
pub struct RequestId(Repr);

const _: () = assert!(std::mem::size_of::<RequestId>() == 24);
const _: () = assert!(std::mem::size_of::<Option<RequestId>>() == 24);

impl RequestId {
    /// The longest id (in bytes of UTF-8) kept inline.
    pub const INLINE: usize = 23;

    /// Whether the id is kept inline (no heap block).
    pub fn is_inline(&self) -> bool {
        matches!(self.0, Repr::Inline { .. })
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                let bytes = &bytes[..*len as usize];
                // SAFETY: the bytes were copied from a `&str` whole (see `From<&str>`), so they
                // are valid UTF-8.
                unsafe { std::str::from_utf8_unchecked(bytes) }
            }
            Repr::Boxed(text) => text,
        }
    }
}

impl From<&str> for RequestId {
    fn from(text: &str) -> Self {
        let len = text.len();
        if len <= Self::INLINE {
            let mut bytes = [0u8; Self::INLINE];
            bytes[..len].copy_from_slice(text.as_bytes());
            Self(Repr::Inline { len: InlineLen::ALL[len], bytes })
        } else {
            Self(Repr::Boxed(text.into()))
        }
    }
}

impl From<String> for RequestId {
    fn from(text: String) -> Self {
        if text.len() <= Self::INLINE {
            Self::from(text.as_str())
        } else {
            Self(Repr::Boxed(text.into_boxed_str()))
        }
    }
}

impl From<Box<str>> for RequestId {
    fn from(text: Box<str>) -> Self {
        if text.len() <= Self::INLINE {
            Self::from(&*text)
        } else {
            Self(Repr::Boxed(text))
        }
    }
}

impl From<RequestId> for Box<str> {
    fn from(id: RequestId) -> Self {
        match id.0 {
            Repr::Inline { .. } => id.as_str().into(),
            Repr::Boxed(text) => text,
        }
    }
}

impl From<&RequestId> for Box<str> {
    fn from(id: &RequestId) -> Self {
        id.as_str().into()
    }
}

impl Deref for RequestId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for RequestId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for RequestId {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for RequestId {}

impl PartialEq<str> for RequestId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for RequestId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::hash::Hash for RequestId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, RandomState};

    use super::*;

    /// Ids of every length around the inline limit, ASCII and multi-byte (a character may not
    /// straddle the limit: it is kept whole or the id is boxed).
    fn ids() -> Vec<String> {
        let mut ids = Vec::new();
        for len in 0..=RequestId::INLINE + 3 {
            ids.push("x".repeat(len));
            ids.push(format!("{}é", "y".repeat(len.saturating_sub(2))));
            ids.push(format!("{}😀", "z".repeat(len.saturating_sub(4))));
        }
        ids.push("ß".repeat(12)); // 24 bytes
        ids.push("ß".repeat(11) + "a"); // 23 bytes
        ids
    }

    #[test]
    fn every_length_reads_back_the_same_string() {
        for text in ids() {
            for id in [
                RequestId::from(text.as_str()),
                RequestId::from(text.clone()),
                RequestId::from(text.clone().into_boxed_str()),
            ] {
                assert_eq!(id.as_str(), text);
                assert_eq!(&*id, text.as_str());
                assert_eq!(id.is_inline(), text.len() <= RequestId::INLINE, "{text:?}");
                assert_eq!(&*Box::<str>::from(&id), text.as_str());
                assert_eq!(format!("{id}"), text);
                assert_eq!(format!("{id:?}"), format!("{text:?}"));
                assert_eq!(&*Box::<str>::from(id.clone()), text.as_str());
                assert_eq!(id.clone(), id);
            }
        }
    }

    #[test]
    fn equal_and_hashed_as_the_string() {
        let hasher = RandomState::new();
        let all = ids();
        for a in &all {
            let id = RequestId::from(a.as_str());
            assert_eq!(hasher.hash_one(&*id), hasher.hash_one(a.as_str()));
            assert_eq!(hasher.hash_one(&id), hasher.hash_one(a.as_str()));
            for b in &all {
                let other = RequestId::from(b.as_str());
                assert_eq!(id.eq(&other), a == b);
                assert_eq!(id == *b.as_str(), a == b);
            }
        }
    }
}
