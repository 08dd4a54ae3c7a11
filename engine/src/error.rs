use std::io;

use repl_wire::{DecodeError, Dot, Incarnation, StreamId};
use thiserror::Error;

/// Where a file's bytes stopped making sense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The file's name in the data directory.
    pub file: String,
    /// Byte offset of the damaged record or field.
    pub offset: u64,
    /// What was wrong there.
    pub what: &'static str,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at offset {}: {}", self.file, self.offset, self.what)
    }
}

/// Everything a store operation can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O call failed; `file` names what it was working on.
    #[error("I/O error during {op} on {file}: {source}")]
    Io {
        /// The file (or directory) involved.
        file: String,
        /// What the store was doing.
        op: &'static str,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Stored bytes are damaged somewhere other than a torn tail. The store refuses to
    /// open: repair from a peer or salvage explicitly; nothing is cut silently.
    #[error("corrupt data: {0}")]
    Corrupt(Corruption),
    /// A file was written by a format version this code does not read.
    #[error("{file} has format version {version}, which this build does not read")]
    UnsupportedFormat {
        /// The file.
        file: String,
        /// Its format version.
        version: u16,
    },
    /// A file in the data directory that the store did not write.
    #[error("unexpected file {file:?} in the data directory")]
    UnknownFile {
        /// The file's name.
        file: String,
    },
    /// An earlier fsync or write failed; the store accepts nothing until reopened.
    #[error("store is poisoned by an earlier I/O failure and must be reopened")]
    Poisoned,
    /// The disk is full; nothing was written and nothing is poisoned. Writes resume once
    /// space is freed.
    #[error("no space left to append to the {stream} log")]
    StorageFull {
        /// The stream whose log could not grow.
        stream: StreamId,
    },
    /// A compare-and-set write carried a context that is no longer current.
    #[error("the key changed since its context was read")]
    ContextMismatch,
    /// A remote entry skipped ahead of its origin's sequence: the sender must rewind.
    #[error("gap from origin {origin}: expected seq {expected}, got {got}")]
    Gap {
        /// The origin.
        origin: Incarnation,
        /// The next sequence number this store can apply.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// Entries below the log floor were compacted away: the peer needs anti-entropy.
    #[error("the {stream} log no longer holds {origin} below seq {floor}")]
    NotCovered {
        /// The stream.
        stream: StreamId,
        /// The origin whose entries were compacted.
        origin: Incarnation,
        /// The lowest sequence still in the log.
        floor: u64,
    },
    /// An entry, key or value breaks a limit or an invariant.
    #[error("invalid entry: {0}")]
    Invalid(#[from] DecodeError),
    /// A write batch mixes streams, or a collection was used on the wrong API.
    #[error("invalid request: {0}")]
    Request(&'static str),
    /// A batch does not fit one frame of a segment (it must be split).
    #[error("a batch of {bytes} bytes is larger than one frame of a segment ({max} bytes)")]
    BatchTooLarge {
        /// The batch's framed size.
        bytes: u64,
        /// The largest frame.
        max: u64,
    },
    /// A typed record could not be encoded or decoded.
    #[error("record encoding failed: {0}")]
    Record(String),
    /// This appliance forwards audit records and too many await the holders'
    /// acknowledgement: audit-producing operations are refused until they catch up.
    #[error("{backlog} audit records await the holders' acknowledgement (cap {cap}); refusing new ones")]
    AuditBacklogFull {
        /// Records waiting.
        backlog: u64,
        /// The configured cap.
        cap: u64,
    },
    /// An audit hash chain does not verify.
    #[error("audit chain of {origin} broken at {dot}")]
    AuditChainBroken {
        /// The origin whose chain broke.
        origin: Incarnation,
        /// The first record that does not verify.
        dot: Dot,
    },
}

/// Shorthand for results of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err<'a>(file: &'a str, op: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io { file: file.to_string(), op, source }
}
