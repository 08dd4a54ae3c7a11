use serde::{Deserialize, Serialize};

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

impl Entry {
    /// Appends the encoded entry to `out`.
    ///
    /// The encoding is postcard 1.x of the struct, fields in declaration order;
    /// `docs/format.md` has the byte layout.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        // Encoding into a Vec fails only on allocation failure, which aborts anyway.
        let taken = std::mem::take(out);
        *out = postcard::to_extend(self, taken).expect("postcard encoding into a Vec is infallible");
    }

    /// The encoded entry as a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        // Sized up front: growing from empty would reallocate once per doubling.
        let value_len = match &self.op {
            Op::Put { value, .. } => value.len(),
            Op::Delete => 0,
        };
        let mut out = Vec::with_capacity(64 + self.key.len() + value_len + self.context.len() * 20);
        self.encode_into(&mut out);
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
