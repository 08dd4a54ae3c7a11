//! `repl-wire`: the protocol vocabulary of repl.
//!
//! This crate names the things every appliance agrees on: who wrote an entry
//! ([`Incarnation`], [`NodeId`]), where it belongs ([`StreamId`], [`Collection`]),
//! when and after what it happened ([`Hlc`], [`Dot`], [`VersionVector`]), and the
//! replicated unit itself ([`Entry`]), with a bounded codec for it.
//!
//! What it does not do: any I/O, reading the clock, or spawning tasks. Time enters
//! [`HlcClock`] as an argument, so the simulator and the real runtime drive the same
//! code. Decoding never panics on hostile bytes and never allocates more than the
//! input it was handed: every failure is a typed [`DecodeError`].
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

mod audit;
pub mod bytes;
mod codec;
mod entry;
mod error;
mod hlc;
mod id;
pub mod limits;
mod message;
mod stream;
#[cfg(feature = "transport")]
pub mod transport;
mod version;

pub use audit::AuditEvent;
pub use codec::{
    decode_frame, encode_entries_frame, encode_frame, encode_snapshot_chunk_frame, FrameReader,
    SnapshotChunkFrame, WireMessage, FRAME_PREFIX_BYTES,
};
pub use entry::{EncodedEntry, Entry, Op};
pub use error::DecodeError;
pub use hlc::{Hlc, HlcClock, HlcDrift, HLC_DRIFT_MAX_MS};
pub use id::{Incarnation, NodeId, NodeIdError};
pub use message::*;
pub use stream::{Collection, StreamId};
pub use version::{Causality, Dot, VersionVector};
