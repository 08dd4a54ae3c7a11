use thiserror::Error;

/// Why bytes could not be decoded into a protocol value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the value did.
    #[error("input truncated")]
    Truncated,
    /// The input is larger than the named limit allows.
    #[error("{what} is {actual} bytes or items, more than the limit of {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size.
        actual: usize,
        /// The limit it broke.
        limit: usize,
    },
    /// The bytes do not form a valid value (bad tag, bad varint, bad UTF-8, ...).
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// What was wrong, as the decoder saw it.
        reason: String,
    },
    /// Bytes were left over after a complete value.
    #[error("{0} trailing bytes after the value")]
    Trailing(usize),
    /// A value decoded but breaks an invariant of the vocabulary.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid.
        what: &'static str,
        /// Which invariant it broke.
        reason: &'static str,
    },
}

impl DecodeError {
    pub(crate) fn from_postcard(what: &'static str, err: postcard::Error) -> Self {
        match err {
            postcard::Error::DeserializeUnexpectedEnd => DecodeError::Truncated,
            other => DecodeError::Malformed { what, reason: other.to_string() },
        }
    }
}
