//! Byte strings through serde as one `bytes` call instead of a sequence of `u8`s.
//!
//! postcard writes both forms identically (a varint length, then the bytes), so this
//! changes no byte on disk or on the wire; it only avoids a per-byte serde call.
//! For `#[serde(with = "repl_wire::bytes")]` on a `Vec<u8>` field.

use std::fmt;

use serde::de::{Error, SeqAccess, Visitor};
use serde::{Deserializer, Serializer};

/// Writes `bytes` as one byte string.
pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_bytes(bytes)
}

/// Reads a byte string (or, from a format that wrote one, a sequence of `u8`s).
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    deserializer.deserialize_byte_buf(BytesVisitor)
}

struct BytesVisitor;

impl<'de> Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        // Bounded by what the input holds; the cap keeps a lying size hint harmless.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
        while let Some(b) = seq.next_element()? {
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct AsBytes(#[serde(with = "super")] Vec<u8>);

    #[test]
    fn same_encoding_as_a_plain_vec() {
        let v: Vec<u8> = (0..=255).collect();
        let plain = postcard::to_allocvec(&v).expect("encodes");
        let fast = postcard::to_allocvec(&AsBytes(v.clone())).expect("encodes");
        assert_eq!(plain, fast);
        assert_eq!(postcard::from_bytes::<AsBytes>(&plain).expect("decodes"), AsBytes(v));
    }
}
