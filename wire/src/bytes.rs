//! Byte strings through serde as one `bytes` call instead of a sequence of `u8`s, and
//! postcard's integer, byte-string and version-vector layouts for encoders by hand.
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

/// Appends `n` as postcard writes an unsigned integer (seven bits per byte, low bits
/// first, the top bit set on every byte but the last), for encoders written by hand
/// beside serde's (entries, frames, the store's hint keys), whose tests hold the two
/// to the same bytes.
///
/// ```
/// let mut out = Vec::new();
/// repl_wire::bytes::put_varint(&mut out, 300);
/// assert_eq!(out, postcard::to_allocvec(&300u64).unwrap());
/// ```
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Appends `bytes` as postcard writes a byte string: its length, then the bytes.
///
/// ```
/// let mut out = Vec::new();
/// repl_wire::bytes::put_bytes(&mut out, b"key");
/// assert_eq!(out, [3, b'k', b'e', b'y']);
/// ```
#[inline]
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends `vector` as postcard writes a [`VersionVector`](crate::VersionVector):
/// its length, then each dot's origin and sequence.
///
/// ```
/// use repl_wire::{Dot, Incarnation, VersionVector};
/// let v = VersionVector::from_dot(Dot { origin: Incarnation(7), seq: 200 });
/// let mut out = Vec::new();
/// repl_wire::bytes::put_vector(&mut out, &v);
/// assert_eq!(out, postcard::to_allocvec(&v).unwrap());
/// ```
#[inline]
pub fn put_vector(out: &mut Vec<u8>, vector: &crate::VersionVector) {
    put_varint(out, vector.len() as u64);
    for dot in vector.iter() {
        put_varint(out, dot.origin.0);
        put_varint(out, dot.seq);
    }
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
