use serde::{Deserialize, Serialize};

use crate::bytes::{put_bytes, put_varint, put_vector};
use crate::error::DecodeError;
use crate::hlc::Hlc;
use crate::limits::{ENTRY_BYTES_MAX, KEY_BYTES_MAX, VALUE_BYTES_MAX};
use crate::stream::Collection;
use crate::version::{Dot, VersionVector};

/// What a write does to its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Op {
    /// Sets the value. `expires_at_ms` (HLC wall time) makes the version vanish on
    /// every replica once passed, without a tombstone; used by sessions.
    Put {
        /// The value bytes.
        #[serde(with = "crate::bytes")]
        value: Vec<u8>,
        /// When the version expires, if it does.
        expires_at_ms: Option<u64>,
    },
    /// Deletes the key: stored as a tombstone until every replica has seen it.
    Delete,
}

/// The replicated unit: one write, as it is logged and shipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Who wrote it and which of their writes it is.
    pub dot: Dot,
    /// When, in hybrid logical time.
    pub hlc: Hlc,
    /// Which collection the key lives in (and so which stream).
    pub collection: Collection,
    /// The key.
    #[serde(with = "crate::bytes")]
    pub key: Vec<u8>,
    /// The causal context the write supersedes: every held version whose dot this
    /// vector covers is replaced. It never covers `dot` itself (a dotted version
    /// vector), so a context-free write can sit beside earlier writes of its own origin.
    pub context: VersionVector,
    /// What the write does.
    pub op: Op,
}

/// An entry in its encoding, with its dot read off the front: what a log holds and
/// what an `Entries` message carries, passed on without decoding the rest (a sender
/// ships entries from its log this way; [`crate::encode_entries_frame`] frames them).
///
/// ```
/// # use repl_wire::*;
/// let e = Entry {
///     dot: Dot { origin: Incarnation(7), seq: 3 },
///     hlc: Hlc { wall_ms: 5, logical: 0 },
///     collection: Collection::Users,
///     key: b"alice".to_vec(),
///     context: VersionVector::new(),
///     op: Op::Delete,
/// };
/// let encoded = EncodedEntry::new(e.encode()).unwrap();
/// assert_eq!(encoded.dot(), e.dot);
/// assert_eq!(encoded.decode(), Ok(e));
/// assert!(EncodedEntry::new(vec![0xff; 3]).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedEntry {
    dot: Dot,
    bytes: Vec<u8>,
}

impl EncodedEntry {
    /// Takes `bytes` as an entry's encoding, reading only its dot: the rest is the
    /// caller's word (a log frame whose checksum held). [`EncodedEntry::decode`], which
    /// a receiver runs, checks everything.
    pub fn new(bytes: Vec<u8>) -> Result<EncodedEntry, DecodeError> {
        if bytes.len() > ENTRY_BYTES_MAX {
            return Err(DecodeError::TooLarge { what: "entry", actual: bytes.len(), limit: ENTRY_BYTES_MAX });
        }
        let (dot, _): (Dot, _) =
            postcard::take_from_bytes(&bytes).map_err(|e| DecodeError::from_postcard("entry", e))?;
        Ok(EncodedEntry { dot, bytes })
    }

    /// The entry's dot.
    pub fn dot(&self) -> Dot {
        self.dot
    }

    /// The encoding.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The encoding, taken out.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Decodes the entry, checking every bound.
    pub fn decode(&self) -> Result<Entry, DecodeError> {
        Entry::decode(&self.bytes)
    }

    /// The entry with its context replaced by `context`: the same encoding, unchanged
    /// and not copied, when the context is that already; else the bytes before and
    /// after the context around `context`'s encoding. Reads only the fields before the
    /// context; an encoding too short to hold them is refused.
    ///
    /// ```
    /// use repl_wire::{Collection, Dot, EncodedEntry, Entry, Hlc, Incarnation, Op, VersionVector};
    /// let mut e = Entry {
    ///     dot: Dot { origin: Incarnation(7), seq: 2 },
    ///     hlc: Hlc { wall_ms: 1_000, logical: 0 },
    ///     collection: Collection::Users,
    ///     key: b"alice".to_vec(),
    ///     context: VersionVector::new(),
    ///     op: Op::Delete,
    /// };
    /// let wider = VersionVector::from_dot(Dot { origin: Incarnation(9), seq: 4 });
    /// let patched = EncodedEntry::from(&e).with_context(&wider).unwrap();
    /// e.context = wider;
    /// assert_eq!(patched.as_bytes(), e.encode());
    /// ```
    pub fn with_context(self, context: &VersionVector) -> Result<EncodedEntry, DecodeError> {
        let short = || DecodeError::from_postcard("entry", postcard::Error::DeserializeUnexpectedEnd);
        let b = &self.bytes;
        // dot (origin, seq), HLC (wall, logical), collection, then the key's length.
        let mut at = 0;
        for _ in 0..5 {
            at = skip_varint(b, at).ok_or_else(short)?;
        }
        let (key_len, after_len) = read_varint(b, at).ok_or_else(short)?;
        let start = usize::try_from(key_len).ok().and_then(|k| after_len.checked_add(k)).ok_or_else(short)?;
        let (dots, mut end) = read_varint(b, start).ok_or_else(short)?;
        for _ in 0..dots.saturating_mul(2) {
            end = skip_varint(b, end).ok_or_else(short)?;
        }
        let mut encoded = Vec::with_capacity(1 + 20 * context.len());
        put_vector(&mut encoded, context);
        // `skip_varint` only returns positions within `b`, and `end` follows `start`.
        let (before, rest) = b.split_at_checked(start).ok_or_else(short)?;
        let (logged, after) = rest.split_at_checked(end - start).ok_or_else(short)?;
        if logged == encoded {
            return Ok(self);
        }
        let mut bytes = Vec::with_capacity(before.len() + encoded.len() + after.len());
        bytes.extend_from_slice(before);
        bytes.extend_from_slice(&encoded);
        bytes.extend_from_slice(after);
        EncodedEntry::new(bytes)
    }
}

/// The varint at `at` and the position after it; `None` past the end or beyond 64 bits.
fn read_varint(bytes: &[u8], mut at: usize) -> Option<(u64, usize)> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(at)?;
        at += 1;
        n |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((n, at));
        }
    }
    None
}

/// The position after the varint at `at`.
fn skip_varint(bytes: &[u8], at: usize) -> Option<usize> {
    read_varint(bytes, at).map(|(_, next)| next)
}

impl From<&Entry> for EncodedEntry {
    fn from(entry: &Entry) -> Self {
        EncodedEntry { dot: entry.dot, bytes: entry.encode() }
    }
}

/// The bytes a varint of `n` takes: one per started group of seven significant
/// bits, at least one (`(bits * 9 + 64) / 64` is `ceil(bits / 7)` for 1..=64).
fn varint_len(n: u64) -> usize {
    let bits = 64 - (n | 1).leading_zeros() as usize;
    (bits * 9 + 64) / 64
}

/// The bytes the operation takes in an entry's encoding (it ends the entry).
fn op_len(op: &Op) -> usize {
    match op {
        Op::Put { value, expires_at_ms } => {
            1 + varint_len(value.len() as u64) + value.len() + 1 + expires_at_ms.map_or(0, varint_len)
        }
        Op::Delete => 1,
    }
}

impl Entry {
    /// Appends the encoded entry to `out`.
    ///
    /// The encoding is postcard 1.x of the struct, fields in declaration order;
    /// `docs/format.md` has the byte layout.
    ///
    /// Written out by hand rather than through serde, after reserving the exact
    /// length: the store encodes every write under its state lock. A batch of 256
    /// entries encodes in 12.1 us instead of 12.9 us with 256-byte values, 22.1 us
    /// instead of 29.9 us with 2 KiB ones (`cargo bench --bench wire -- codec`). A
    /// test holds the two encodings equal.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        self.write_to(out);
    }

    /// [`Entry::encode_into`] without reserving first.
    pub(crate) fn write_to(&self, out: &mut Vec<u8>) {
        put_varint(out, self.dot.origin.0);
        put_varint(out, self.dot.seq);
        put_varint(out, self.hlc.wall_ms);
        put_varint(out, u64::from(self.hlc.logical));
        put_varint(out, u64::from(self.collection.index()));
        put_bytes(out, &self.key);
        put_vector(out, &self.context);
        match &self.op {
            Op::Put { value, expires_at_ms } => {
                out.push(0);
                put_bytes(out, value);
                match expires_at_ms {
                    None => out.push(0),
                    Some(t) => {
                        out.push(1);
                        put_varint(out, *t);
                    }
                }
            }
            Op::Delete => out.push(1),
        }
    }

    /// The length of the encoding, exactly.
    pub fn encoded_len(&self) -> usize {
        let context: usize = self.context.iter().map(|d| varint_len(d.origin.0) + varint_len(d.seq)).sum();
        varint_len(self.dot.origin.0)
            + varint_len(self.dot.seq)
            + varint_len(self.hlc.wall_ms)
            + varint_len(u64::from(self.hlc.logical))
            + varint_len(u64::from(self.collection.index()))
            + varint_len(self.key.len() as u64)
            + self.key.len()
            + varint_len(self.context.len() as u64)
            + context
            + op_len(&self.op)
    }

    /// The most [`Entry::encoded_len`] can be for an entry with this key, a context of
    /// `context_dots` dots and this operation, whatever its dot, HLC, collection and
    /// the context's values: what a writer can size a buffer to before those are
    /// assigned.
    pub fn encoded_len_max(key: &[u8], context_dots: usize, op: &Op) -> usize {
        const U64: usize = 10;
        const U32: usize = 5;
        // The dot and the HLC's wall clock (u64), its logical counter and the
        // collection's index (u32); each context dot is two u64s.
        3 * U64
            + 2 * U32
            + varint_len(key.len() as u64)
            + key.len()
            + varint_len(context_dots as u64)
            + context_dots * 2 * U64
            + op_len(op)
    }

    /// The encoded entry as a new buffer of exactly its length.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.write_to(&mut out);
        out
    }

    /// Decodes exactly one entry from `bytes`, checking every bound.
    ///
    /// ```
    /// # use repl_wire::*;
    /// let dot = Dot { origin: Incarnation(7), seq: 1 };
    /// let e = Entry {
    ///     dot,
    ///     hlc: Hlc { wall_ms: 5, logical: 0 },
    ///     collection: Collection::Users,
    ///     key: b"alice".to_vec(),
    ///     context: VersionVector::new(),
    ///     op: Op::Delete,
    /// };
    /// assert_eq!(Entry::decode(&e.encode()), Ok(e));
    /// assert!(Entry::decode(&[0xff; 3]).is_err());
    /// ```
    pub fn decode(bytes: &[u8]) -> Result<Entry, DecodeError> {
        if bytes.len() > ENTRY_BYTES_MAX {
            return Err(DecodeError::TooLarge { what: "entry", actual: bytes.len(), limit: ENTRY_BYTES_MAX });
        }
        let (entry, rest): (Entry, _) =
            postcard::take_from_bytes(bytes).map_err(|e| DecodeError::from_postcard("entry", e))?;
        if !rest.is_empty() {
            return Err(DecodeError::Trailing(rest.len()));
        }
        entry.validate()?;
        Ok(entry)
    }

    /// Checks the invariants a decoded or locally built entry must hold.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.key.len() > KEY_BYTES_MAX {
            return Err(DecodeError::TooLarge { what: "key", actual: self.key.len(), limit: KEY_BYTES_MAX });
        }
        if let Op::Put { value, .. } = &self.op {
            if value.len() > VALUE_BYTES_MAX {
                return Err(DecodeError::TooLarge {
                    what: "value",
                    actual: value.len(),
                    limit: VALUE_BYTES_MAX,
                });
            }
        }
        if self.dot.seq == 0 {
            return Err(DecodeError::Invalid { what: "entry", reason: "sequence numbers start at 1" });
        }
        if self.context.contains(self.dot) {
            return Err(DecodeError::Invalid {
                what: "entry",
                reason: "context must not cover the entry's own dot",
            });
        }
        Ok(())
    }

    /// Whether the entry deletes its key.
    pub fn is_delete(&self) -> bool {
        matches!(self.op, Op::Delete)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::id::Incarnation;

    fn entry() -> impl Strategy<Value = Entry> {
        (
            any::<u64>(),
            1u64..1_000_000,
            any::<u64>(),
            0..Collection::ALL.len(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::option::of((
                proptest::collection::vec(any::<u8>(), 0..256),
                proptest::option::of(any::<u64>()),
            )),
            proptest::collection::vec((any::<u64>(), 1u64..100), 0..4),
        )
            .prop_map(|(origin, seq, wall, c, key, value, others)| {
                let dot = Dot { origin: Incarnation(origin), seq };
                let mut context: VersionVector =
                    others.into_iter().map(|(o, s)| Dot { origin: Incarnation(o), seq: s }).collect();
                context.remove(dot.origin);
                context.advance(Dot { origin: dot.origin, seq: dot.seq - 1 });
                Entry {
                    dot,
                    hlc: Hlc { wall_ms: wall, logical: 0 },
                    collection: Collection::ALL[c],
                    key,
                    context,
                    op: match value {
                        Some((value, expires_at_ms)) => Op::Put { value, expires_at_ms },
                        None => Op::Delete,
                    },
                }
            })
    }

    proptest! {
        #[test]
        fn a_context_replaced_in_the_encoding_is_the_encoding_of_the_entry_with_it(
            e in entry(),
            wider in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..6),
        ) {
            let wider: VersionVector =
                wider.into_iter().map(|(o, s)| Dot { origin: Incarnation(o), seq: s }).collect();
            let encoded = EncodedEntry::from(&e);
            // The context it has: the same bytes.
            let same = encoded.clone().with_context(&e.context).expect("its own context");
            prop_assert_eq!(same.as_bytes(), encoded.as_bytes());
            let patched = encoded.clone().with_context(&wider).expect("another context");
            let mut expected = e.clone();
            expected.context = wider.clone();
            prop_assert_eq!(patched.as_bytes(), &expected.encode()[..]);
            prop_assert_eq!(patched.decode().expect("decodes"), expected);
            // Cut short before the context ends: refused, never a panic.
            let bytes = encoded.as_bytes();
            let context_end = bytes.len() - op_len(&e.op);
            for cut in 0..context_end {
                let short = EncodedEntry { dot: e.dot, bytes: bytes[..cut].to_vec() };
                prop_assert!(short.with_context(&wider).is_err(), "cut at {cut} of {context_end}");
            }
        }

        #[test]
        fn the_hand_written_encoding_is_postcards(e in entry(), logical in any::<u32>(), big in any::<bool>()) {
            let mut e = e;
            e.hlc.logical = logical;
            if big {
                // Varints of every length, up to ten bytes.
                e.dot.seq = u64::MAX >> (e.dot.seq % 64);
            }
            let by_serde = postcard::to_allocvec(&e).expect("postcard encodes an entry");
            prop_assert_eq!(e.encoded_len(), by_serde.len());
            prop_assert_eq!(e.encode(), by_serde);
        }

        #[test]
        fn the_bound_before_the_dot_covers_every_encoding(e in entry(), logical in any::<u32>(), big in any::<bool>()) {
            let mut e = e;
            e.hlc.logical = logical;
            let bound = Entry::encoded_len_max(&e.key, e.context.len(), &e.op);
            prop_assert!(e.encoded_len() <= bound, "{} > {bound}", e.encoded_len());
            if big {
                // Every varint at its longest: the bound is reached but for the
                // collection's index, which fits one byte of its five.
                e.dot = Dot { origin: Incarnation(u64::MAX), seq: u64::MAX };
                e.hlc = Hlc { wall_ms: u64::MAX, logical: u32::MAX };
                let dots = e.context.len() as u64;
                e.context = (0..dots).map(|i| Dot { origin: Incarnation(u64::MAX - i), seq: u64::MAX }).collect();
                prop_assert_eq!(e.encoded_len() + 4, Entry::encoded_len_max(&e.key, e.context.len(), &e.op));
            }
        }

        #[test]
        fn round_trip(e in entry()) {
            prop_assert_eq!(Entry::decode(&e.encode()), Ok(e));
        }

        #[test]
        fn every_truncation_is_an_error(e in entry()) {
            let bytes = e.encode();
            for cut in 0..bytes.len() {
                prop_assert!(Entry::decode(bytes.get(..cut).unwrap_or_default()).is_err());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Entry::decode(&bytes);
        }
    }

    #[test]
    fn context_must_not_cover_own_dot() {
        let dot = Dot { origin: Incarnation(1), seq: 2 };
        let e = Entry {
            dot,
            hlc: Hlc::default(),
            collection: Collection::Users,
            key: vec![1],
            context: VersionVector::from_dot(dot),
            op: Op::Delete,
        };
        assert!(matches!(Entry::decode(&e.encode()), Err(DecodeError::Invalid { .. })));
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let big = vec![0u8; ENTRY_BYTES_MAX + 1];
        assert!(matches!(Entry::decode(&big), Err(DecodeError::TooLarge { what: "entry", .. })));
    }
}
