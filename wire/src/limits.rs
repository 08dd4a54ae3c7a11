//! Named bounds on everything that crosses a disk or a network boundary.
//!
//! Decoders check these before trusting a length; writers refuse to produce
//! anything larger, so whatever one appliance writes another can read.

/// Largest key, in bytes.
pub const KEY_BYTES_MAX: usize = 1024;
/// Largest value, in bytes.
pub const VALUE_BYTES_MAX: usize = 1024 * 1024;
/// Most origins a version vector may name.
pub const VECTOR_ORIGINS_MAX: usize = 4096;
/// Longest appliance id, in bytes.
pub const NODE_ID_BYTES_MAX: usize = 63;
/// Largest encoded entry: a maximal key and value plus a full vector and framing slack.
pub const ENTRY_BYTES_MAX: usize = KEY_BYTES_MAX + VALUE_BYTES_MAX + VECTOR_ORIGINS_MAX * 20 + 256;
/// Largest frame on a QUIC stream: the `len` of `[len u32][payload]`.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most entries in one batch message.
pub const BATCH_ENTRIES_MAX: usize = 4096;
/// Longest free-text string in a message (reasons, details, names).
pub const STRING_BYTES_MAX: usize = 4096;
/// Most items in any other list in a message (buckets, hashes, keys, streams).
pub const LIST_ITEMS_MAX: usize = 65_536;
