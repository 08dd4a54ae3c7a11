//! Framing and bounded decoding of messages.
//!
//! A frame is `[len u32 LE][payload]` with `1 <= len <= FRAME_BYTES_MAX`; the payload
//! is the postcard encoding of one message. Decoding refuses oversized frames before
//! reading them, never allocates more than the frame, and then checks every list and
//! string against the named limits ([`WireMessage::check`]).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bytes::{put_bytes, put_varint, put_vector};
use crate::entry::{EncodedEntry, Entry};
use crate::error::DecodeError;
use crate::limits::{
    BATCH_ENTRIES_MAX, FRAME_BYTES_MAX, KEY_BYTES_MAX, LIST_ITEMS_MAX, STRING_BYTES_MAX, VALUE_BYTES_MAX,
};
use crate::message::{AdminCall, ClientCall, ClientReply, ClientRequest, PeerMessage};
use crate::stream::StreamId;
use crate::version::VersionVector;

/// Bytes of the frame length prefix.
pub const FRAME_PREFIX_BYTES: usize = 4;

/// A message type of one of the protocols.
pub trait WireMessage: Serialize + DeserializeOwned {
    /// Name used in errors.
    const NAME: &'static str;
    /// Checks every bound the decoder alone cannot: list lengths, string lengths,
    /// entry invariants.
    fn check(&self) -> Result<(), DecodeError>;

    /// Appends the message's encoding to `out` without serde when the message has a
    /// hand-written encoder (the same bytes), and says whether it had.
    fn encode_by_hand(&self, _out: &mut Vec<u8>) -> bool {
        false
    }
}

fn list(what: &'static str, n: usize, limit: usize) -> Result<(), DecodeError> {
    if n > limit {
        return Err(DecodeError::TooLarge { what, actual: n, limit });
    }
    Ok(())
}

fn text(what: &'static str, s: &str) -> Result<(), DecodeError> {
    list(what, s.len(), STRING_BYTES_MAX)
}

fn entries(e: &[Entry]) -> Result<(), DecodeError> {
    list("entry batch", e.len(), BATCH_ENTRIES_MAX)?;
    e.iter().try_for_each(Entry::validate)
}

fn key(k: &[u8]) -> Result<(), DecodeError> {
    list("key", k.len(), KEY_BYTES_MAX)
}

impl WireMessage for PeerMessage {
    const NAME: &'static str = "peer message";

    /// The messages that carry entries in bulk (a catch-up, a bootstrap, audit
    /// forwarding), written out by hand with [`Entry`]'s own encoder, into a buffer
    /// reserved once for all entries. A test holds the bytes equal to serde's.
    fn encode_by_hand(&self, out: &mut Vec<u8>) -> bool {
        // Variant positions in `PeerMessage`, as serde numbers them.
        const AUDIT_FORWARD: u64 = 10;
        let list = |out: &mut Vec<u8>, entries: &[Entry]| {
            put_varint(out, entries.len() as u64);
            out.reserve(entries.iter().map(Entry::encoded_len).sum());
            entries.iter().for_each(|e| e.write_to(out));
        };
        match self {
            PeerMessage::Entries { stream, entries } => {
                put_varint(out, ENTRIES_VARIANT);
                put_varint(out, u64::from(stream.index()));
                list(out, entries);
            }
            PeerMessage::AuditForward { entries } => {
                put_varint(out, AUDIT_FORWARD);
                list(out, entries);
            }
            PeerMessage::SnapshotChunk { stream, at, from, entries, checksum, resume, last } => {
                put_varint(out, SNAPSHOT_CHUNK_VARIANT);
                put_varint(out, u64::from(stream.index()));
                put_vector(out, at);
                put_bytes(out, from);
                list(out, entries);
                out.extend_from_slice(checksum);
                put_bytes(out, resume);
                out.push(u8::from(*last));
            }
            _ => return false,
        }
        true
    }

    fn check(&self) -> Result<(), DecodeError> {
        match self {
            PeerMessage::Hello(h) => {
                list("handshake streams", h.streams.len(), 16)?;
                h.streams.iter().try_for_each(|s| list("log floors", s.floors.len(), LIST_ITEMS_MAX))
            }
            PeerMessage::Entries { entries: e, .. } | PeerMessage::AuditForward { entries: e } => entries(e),
            PeerMessage::SnapshotChunk { entries: e, from, resume, .. } => {
                list("resume token", from.len(), KEY_BYTES_MAX + 1)?;
                list("resume token", resume.len(), KEY_BYTES_MAX + 1)?;
                entries(e)
            }
            PeerMessage::TreeRequest { buckets, .. } => list("buckets", buckets.len(), LIST_ITEMS_MAX),
            PeerMessage::TreeReply { hashes, .. } => list("bucket hashes", hashes.len(), LIST_ITEMS_MAX),
            PeerMessage::SnapshotRequest { buckets, resume, .. } => {
                list("buckets", buckets.len(), LIST_ITEMS_MAX)?;
                list("resume token", resume.len(), KEY_BYTES_MAX + 1)
            }
            PeerMessage::TopologyPrepare { topology, .. } => {
                list("topology", topology.len(), VALUE_BYTES_MAX)
            }
            PeerMessage::TopologyVote { reason, .. } | PeerMessage::Goodbye { reason } => {
                text("reason", reason)
            }
            PeerMessage::Error(e) => text("error message", &e.message),
            PeerMessage::Ack { .. }
            | PeerMessage::Credit { .. }
            | PeerMessage::Rewind { .. }
            | PeerMessage::NotCovered { .. }
            | PeerMessage::AuditAck { .. }
            | PeerMessage::TopologyCommit { .. }
            | PeerMessage::TopologyAbort { .. } => Ok(()),
        }
    }
}

impl WireMessage for ClientRequest {
    const NAME: &'static str = "client request";

    fn check(&self) -> Result<(), DecodeError> {
        match &self.body {
            ClientCall::Get { key: k, .. } | ClientCall::Delete { key: k, .. } => key(k),
            ClientCall::Put { key: k, value, .. } => {
                key(k)?;
                list("value", value.len(), VALUE_BYTES_MAX)
            }
            ClientCall::Scan { start, limit, .. } => {
                key(start)?;
                list("scan limit", *limit as usize, LIST_ITEMS_MAX)
            }
            ClientCall::SessionCreate { id, record, .. } => {
                text("session id", id)?;
                list("session record", record.len(), VALUE_BYTES_MAX)
            }
            ClientCall::SessionTouch { id, .. } | ClientCall::SessionEnd { id } => text("session id", id),
            ClientCall::AuditAppend(e) => {
                for s in [&e.user, &e.appliance, &e.action, &e.detail] {
                    text("audit field", s)?;
                }
                Ok(())
            }
            ClientCall::AuditQuery { user, appliance, limit, .. } => {
                for s in [user, appliance].into_iter().flatten() {
                    text("audit filter", s)?;
                }
                list("audit limit", *limit as usize, LIST_ITEMS_MAX)
            }
            ClientCall::Admin(
                AdminCall::TopologyPrepare { topology, .. } | AdminCall::TopologyAbort { topology, .. },
            ) => list("topology", topology.len(), VALUE_BYTES_MAX),
            ClientCall::Admin(AdminCall::Tree { buckets, .. }) => {
                list("buckets", buckets.len(), LIST_ITEMS_MAX)
            }
            ClientCall::Admin(AdminCall::InstallCrl { pem }) => list("CRL", pem.len(), VALUE_BYTES_MAX),
            ClientCall::Admin(AdminCall::BackupChunk { resume, .. }) => {
                list("resume token", resume.len(), KEY_BYTES_MAX + 1)
            }
            ClientCall::Admin(_) => Ok(()),
        }
    }
}

impl WireMessage for ClientReply {
    const NAME: &'static str = "client reply";

    fn check(&self) -> Result<(), DecodeError> {
        match self {
            ClientReply::Values { values, .. } => {
                list("values", values.len(), LIST_ITEMS_MAX)?;
                values.iter().try_for_each(|v| list("value", v.value.len(), VALUE_BYTES_MAX))
            }
            ClientReply::Keys(keys) => {
                list("keys", keys.len(), LIST_ITEMS_MAX)?;
                keys.iter().try_for_each(|k| key(k))
            }
            ClientReply::Audit(rows) => list("audit rows", rows.len(), LIST_ITEMS_MAX),
            ClientReply::Status { streams, .. } => list("streams", streams.len(), 16),
            ClientReply::Error(e) => text("error message", &e.message),
            ClientReply::Conflicts { records, .. } => list("conflicts", records.len(), LIST_ITEMS_MAX),
            ClientReply::Tree { hashes, .. } => list("hashes", hashes.len(), LIST_ITEMS_MAX),
            ClientReply::Entries { entries, .. } => list("entries", entries.len(), LIST_ITEMS_MAX),
            ClientReply::Count(_) => Ok(()),
            ClientReply::Chunk { entries, resume, .. } => {
                list("entries", entries.len(), LIST_ITEMS_MAX)?;
                list("resume token", resume.len(), KEY_BYTES_MAX + 1)
            }
            ClientReply::Written { .. }
            | ClientReply::Blob(_)
            | ClientReply::Root { .. }
            | ClientReply::Done => Ok(()),
        }
    }
}

/// The position of `PeerMessage::Entries` among the variants, as serde numbers them.
const ENTRIES_VARIANT: u64 = 1;
/// The position of `PeerMessage::SnapshotChunk` among the variants.
const SNAPSHOT_CHUNK_VARIANT: u64 = 8;

/// Encodes a message as one frame (length prefix included).
pub fn encode_frame<M: WireMessage>(message: &M) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![0u8; FRAME_PREFIX_BYTES];
    if !message.encode_by_hand(&mut out) {
        out = postcard::to_extend(message, out)
            .map_err(|e| DecodeError::Malformed { what: M::NAME, reason: e.to_string() })?;
    }
    finish_frame(out)
}

/// Encodes `PeerMessage::Entries` of `stream` as one frame from entries in their
/// encoding, which are copied as they are: the bytes [`encode_frame`] makes of the
/// decoded message, without decoding anything.
///
/// ```
/// # use repl_wire::*;
/// let e = Entry {
///     dot: Dot { origin: Incarnation(7), seq: 1 },
///     hlc: Hlc { wall_ms: 5, logical: 0 },
///     collection: Collection::Users,
///     key: b"alice".to_vec(),
///     context: VersionVector::new(),
///     op: Op::Put { value: b"v".to_vec(), expires_at_ms: None },
/// };
/// let frame = encode_entries_frame(StreamId::Enterprise, &[EncodedEntry::from(&e)]).unwrap();
/// let message = PeerMessage::Entries { stream: StreamId::Enterprise, entries: vec![e] };
/// assert_eq!(frame, encode_frame(&message).unwrap());
/// ```
pub fn encode_entries_frame(stream: StreamId, entries: &[EncodedEntry]) -> Result<Vec<u8>, DecodeError> {
    // The prefix, two one-byte tags and a count of at most three bytes.
    let mut out = frame_for_entries(entries, 5)?;
    put_varint(&mut out, ENTRIES_VARIANT);
    put_varint(&mut out, u64::from(stream.index()));
    put_encoded(&mut out, entries);
    finish_frame(out)
}

/// A frame buffer holding only the room for its length prefix, with capacity for
/// `entries` and `other` bytes more; refuses more entries than a batch may hold.
fn frame_for_entries(entries: &[EncodedEntry], other: usize) -> Result<Vec<u8>, DecodeError> {
    if entries.len() > BATCH_ENTRIES_MAX {
        return Err(DecodeError::TooLarge {
            what: "entry batch",
            actual: entries.len(),
            limit: BATCH_ENTRIES_MAX,
        });
    }
    let bytes: usize = entries.iter().map(|e| e.as_bytes().len()).sum();
    let mut out = Vec::with_capacity(FRAME_PREFIX_BYTES + other + bytes);
    out.resize(FRAME_PREFIX_BYTES, 0);
    Ok(out)
}

/// Appends `entries` as postcard writes a `Vec<Entry>`: the count, then each encoding.
fn put_encoded(out: &mut Vec<u8>, entries: &[EncodedEntry]) {
    put_varint(out, entries.len() as u64);
    for e in entries {
        out.extend_from_slice(e.as_bytes());
    }
}

/// [`PeerMessage::SnapshotChunk`] as one frame, from entries still in their encoding
/// (a snapshot's sender ships log records without decoding them); the bytes
/// [`encode_frame`] makes of the message with the entries decoded.
///
/// ```
/// use repl_wire::{
///     encode_frame, encode_snapshot_chunk_frame, Collection, Dot, EncodedEntry, Entry, Hlc,
///     Incarnation, Op, PeerMessage, SnapshotChunkFrame, StreamId, VersionVector,
/// };
/// let e = Entry {
///     dot: Dot { origin: Incarnation(7), seq: 1 },
///     hlc: Hlc { wall_ms: 1_000, logical: 0 },
///     collection: Collection::Users,
///     key: b"alice".to_vec(),
///     context: VersionVector::new(),
///     op: Op::Put { value: b"v".to_vec(), expires_at_ms: None },
/// };
/// let at = VersionVector::from_dot(e.dot);
/// let chunk = SnapshotChunkFrame {
///     stream: StreamId::Enterprise,
///     at: &at,
///     from: b"",
///     entries: &[EncodedEntry::from(&e)],
///     checksum: &[3; 32],
///     resume: b"\x00alice",
///     last: false,
/// };
/// let message = PeerMessage::SnapshotChunk {
///     stream: StreamId::Enterprise,
///     at: at.clone(),
///     from: Vec::new(),
///     entries: vec![e],
///     checksum: [3; 32],
///     resume: b"\x00alice".to_vec(),
///     last: false,
/// };
/// assert_eq!(encode_snapshot_chunk_frame(&chunk).unwrap(), encode_frame(&message).unwrap());
/// ```
pub fn encode_snapshot_chunk_frame(chunk: &SnapshotChunkFrame<'_>) -> Result<Vec<u8>, DecodeError> {
    let SnapshotChunkFrame { stream, at, from, entries, checksum, resume, last } = *chunk;
    // Tags, counts and lengths take at most 30 bytes, the checksum 32, a dot 20.
    let mut out = frame_for_entries(entries, 64 + 20 * at.len() + from.len() + resume.len())?;
    put_varint(&mut out, SNAPSHOT_CHUNK_VARIANT);
    put_varint(&mut out, u64::from(stream.index()));
    put_vector(&mut out, at);
    put_bytes(&mut out, from);
    put_encoded(&mut out, entries);
    out.extend_from_slice(checksum);
    put_bytes(&mut out, resume);
    out.push(u8::from(last));
    finish_frame(out)
}

/// The fields of a [`PeerMessage::SnapshotChunk`] with its entries in their encoding,
/// borrowed, for [`encode_snapshot_chunk_frame`].
#[derive(Debug, Clone, Copy)]
pub struct SnapshotChunkFrame<'a> {
    /// The stream.
    pub stream: StreamId,
    /// The sender's vector when it read the chunk.
    pub at: &'a VersionVector,
    /// The resume token of the request this answers.
    pub from: &'a [u8],
    /// Every version of the keys in this chunk, in key order, encoded.
    pub entries: &'a [EncodedEntry],
    /// blake3 of the entries' encodings, in order.
    pub checksum: &'a [u8; 32],
    /// Where the next chunk starts (empty after the last chunk).
    pub resume: &'a [u8],
    /// Whether this is the last chunk.
    pub last: bool,
}

/// Checks the payload after the prefix room of `out` and writes its length there.
fn finish_frame(mut out: Vec<u8>) -> Result<Vec<u8>, DecodeError> {
    let len = out.len() - FRAME_PREFIX_BYTES;
    if len > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge { what: "frame", actual: len, limit: FRAME_BYTES_MAX });
    }
    if let Some(prefix) = out.get_mut(..FRAME_PREFIX_BYTES) {
        prefix.copy_from_slice(&(len as u32).to_le_bytes());
    }
    Ok(out)
}

/// Decodes one message from a frame's payload (without the length prefix).
pub fn decode_frame<M: WireMessage>(payload: &[u8]) -> Result<M, DecodeError> {
    if payload.len() > FRAME_BYTES_MAX {
        return Err(DecodeError::TooLarge { what: "frame", actual: payload.len(), limit: FRAME_BYTES_MAX });
    }
    let (message, rest): (M, _) =
        postcard::take_from_bytes(payload).map_err(|e| DecodeError::from_postcard(M::NAME, e))?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len()));
    }
    message.check()?;
    Ok(message)
}

/// Splits a byte stream into frame payloads, refusing a bad length before buffering it.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Where the bytes not yet returned start in `buf` (those before were returned).
    start: usize,
}

impl FrameReader {
    /// An empty reader.
    pub fn new() -> Self {
        FrameReader::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Returned bytes are dropped once they are at least half the buffer: each
            // byte moves at most about once, not once per frame after it.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet returned.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame's payload, `None` if more bytes are needed, or an error
    /// if the length prefix is zero or over [`FRAME_BYTES_MAX`] (the stream is then
    /// unusable and must be closed).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, DecodeError> {
        self.next_frame_with(<[u8]>::to_vec)
    }

    /// [`FrameReader::next_frame`], handing the payload to `read` where it lies in the
    /// buffer instead of copying it out (a decoder reads it in place).
    pub fn next_frame_with<T>(&mut self, read: impl FnOnce(&[u8]) -> T) -> Result<Option<T>, DecodeError> {
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let Some(Ok(prefix)) = pending.get(..FRAME_PREFIX_BYTES).map(<[u8; 4]>::try_from) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(prefix) as usize;
        if len == 0 {
            return Err(DecodeError::Invalid { what: "frame", reason: "zero length" });
        }
        if len > FRAME_BYTES_MAX {
            return Err(DecodeError::TooLarge { what: "frame", actual: len, limit: FRAME_BYTES_MAX });
        }
        let Some(payload) = pending.get(FRAME_PREFIX_BYTES..FRAME_PREFIX_BYTES + len) else {
            return Ok(None);
        };
        let out = read(payload);
        self.start += FRAME_PREFIX_BYTES + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::message::*;
    use crate::{AuditEvent, Collection, Dot, Hlc, Incarnation, NodeId, Op, StreamId, VersionVector};

    fn vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::vec((any::<u64>(), 1u64..1000), 0..4)
            .prop_map(|p| p.into_iter().map(|(o, seq)| Dot { origin: Incarnation(o), seq }).collect())
    }

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..max)
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (any::<u64>(), 1u64..1000, bytes(32), bytes(64), any::<bool>()).prop_map(
            |(o, seq, key, value, del)| Entry {
                dot: Dot { origin: Incarnation(o), seq },
                hlc: Hlc { wall_ms: seq, logical: 1 },
                collection: Collection::Users,
                key,
                context: VersionVector::new(),
                op: if del { Op::Delete } else { Op::Put { value, expires_at_ms: Some(seq) } },
            },
        )
    }

    fn stream() -> impl Strategy<Value = StreamId> {
        prop_oneof![Just(StreamId::Enterprise), Just(StreamId::Sessions), Just(StreamId::Audit)]
    }

    fn event() -> impl Strategy<Value = AuditEvent> {
        (any::<u64>(), "[a-z]{0,8}", "[a-z]{0,8}").prop_map(|(t, user, action)| AuditEvent {
            time_ms: t,
            user,
            appliance: "a1".into(),
            action,
            detail: String::new(),
        })
    }

    fn peer() -> impl Strategy<Value = PeerMessage> {
        let entries = || proptest::collection::vec(entry(), 0..4);
        prop_oneof![
            (any::<u16>(), any::<u64>(), vv(), stream()).prop_map(|(minor, inc, vector, stream)| {
                PeerMessage::Hello(Handshake {
                    major: PROTOCOL_MAJOR,
                    minor,
                    features: 0,
                    appliance: NodeId::new("db1").expect("valid"),
                    incarnation: Incarnation(inc),
                    topology_epoch: 3,
                    session: 1,
                    seen_session: None,
                    streams: vec![StreamPosition { stream, vector, floors: vec![(Incarnation(inc), 4)] }],
                })
            }),
            (stream(), entries()).prop_map(|(stream, entries)| PeerMessage::Entries { stream, entries }),
            (stream(), vv()).prop_map(|(stream, vector)| PeerMessage::Ack { stream, vector }),
            (stream(), any::<u64>()).prop_map(|(stream, bytes)| PeerMessage::Credit { stream, bytes }),
            (stream(), vv()).prop_map(|(stream, vector)| PeerMessage::Rewind { stream, vector }),
            (stream(), any::<u64>()).prop_map(|(stream, f)| PeerMessage::NotCovered {
                stream,
                origin: Incarnation(f),
                floor: f
            }),
            (stream(), vv(), proptest::collection::vec(any::<u32>(), 0..8)).prop_map(
                |(stream, at, buckets)| {
                    PeerMessage::TreeRequest { stream, at, expiry_cutoff_ms: 9, level: 1, buckets }
                }
            ),
            (stream(), any::<u32>(), any::<[u8; 32]>()).prop_map(|(stream, bucket, hash)| {
                PeerMessage::TreeReply {
                    stream,
                    at: VersionVector::new(),
                    level: 2,
                    hashes: vec![BucketHash { bucket, hash }],
                }
            }),
            (stream(), vv(), entries(), any::<[u8; 32]>(), any::<bool>()).prop_map(
                |(stream, at, entries, checksum, last)| {
                    PeerMessage::SnapshotChunk {
                        stream,
                        at,
                        from: vec![1],
                        entries,
                        checksum,
                        resume: vec![2, 3],
                        last,
                    }
                }
            ),
            (stream(), proptest::collection::vec(any::<u32>(), 0..8), bytes(8)).prop_map(
                |(stream, buckets, resume)| PeerMessage::SnapshotRequest { stream, buckets, resume }
            ),
            entries().prop_map(|entries| PeerMessage::AuditForward { entries }),
            vv().prop_map(|vector| PeerMessage::AuditAck { vector }),
            (any::<u64>(), bytes(64)).prop_map(|(e, topology)| PeerMessage::TopologyPrepare {
                expected_epoch: e,
                new_epoch: e.wrapping_add(1),
                topology
            }),
            (any::<u64>(), any::<bool>(), "[a-z ]{0,20}").prop_map(|(new_epoch, accept, reason)| {
                PeerMessage::TopologyVote { new_epoch, accept, reason }
            }),
            any::<u64>().prop_map(|new_epoch| PeerMessage::TopologyCommit { new_epoch }),
            any::<u64>().prop_map(|new_epoch| PeerMessage::TopologyAbort { new_epoch }),
            "[a-z ]{0,20}".prop_map(|message| PeerMessage::Error(ProtocolError {
                code: ErrorCode::BadRequest,
                message
            })),
            "[a-z ]{0,20}".prop_map(|reason| PeerMessage::Goodbye { reason }),
        ]
    }

    fn collection() -> impl Strategy<Value = Collection> {
        (0..Collection::ALL.len()).prop_map(|i| Collection::ALL[i])
    }

    fn call() -> impl Strategy<Value = ClientCall> {
        prop_oneof![
            (collection(), bytes(16)).prop_map(|(collection, key)| ClientCall::Get {
                collection,
                key,
                after: None
            }),
            (collection(), bytes(16), bytes(64), proptest::option::of(vv()), any::<bool>()).prop_map(
                |(collection, key, value, context, cas)| ClientCall::Put {
                    collection,
                    key,
                    value,
                    context,
                    cas
                }
            ),
            (collection(), bytes(16), proptest::option::of(vv()))
                .prop_map(|(collection, key, context)| ClientCall::Delete { collection, key, context }),
            (collection(), bytes(16), any::<u16>()).prop_map(|(collection, start, l)| ClientCall::Scan {
                collection,
                start,
                limit: l as u32
            }),
            ("[a-z0-9]{1,12}", bytes(32), any::<u64>()).prop_map(|(id, record, expires_at_ms)| {
                ClientCall::SessionCreate { id, record, expires_at_ms }
            }),
            ("[a-z0-9]{1,12}", any::<u64>())
                .prop_map(|(id, expires_at_ms)| ClientCall::SessionTouch { id, expires_at_ms }),
            "[a-z0-9]{1,12}".prop_map(|id| ClientCall::SessionEnd { id }),
            event().prop_map(ClientCall::AuditAppend),
            (proptest::option::of(any::<u64>()), proptest::option::of("[a-z]{1,8}")).prop_map(
                |(from_ms, user)| {
                    ClientCall::AuditQuery { from_ms, until_ms: None, user, appliance: None, limit: 10 }
                }
            ),
            prop_oneof![
                Just(AdminCall::Status),
                Just(AdminCall::TopologyShow),
                bytes(32).prop_map(|topology| AdminCall::TopologyPrepare { expected_epoch: 1, topology }),
                any::<u64>().prop_map(|new_epoch| AdminCall::TopologyCommit { new_epoch }),
                Just(AdminCall::Backup),
                any::<[u8; 32]>().prop_map(|checksum| AdminCall::Restore { checksum }),
                stream().prop_map(|stream| AdminCall::Verify { stream }),
                collection().prop_map(|collection| AdminCall::Conflicts { collection }),
            ]
            .prop_map(ClientCall::Admin),
        ]
    }

    fn reply() -> impl Strategy<Value = ClientReply> {
        prop_oneof![
            (bytes(32), vv()).prop_map(|(value, context)| ClientReply::Values {
                values: vec![ValueView {
                    value,
                    dot: Dot { origin: Incarnation(1), seq: 1 },
                    hlc: Hlc::default()
                }],
                context
            }),
            any::<u64>().prop_map(|o| ClientReply::Written { token: Dot { origin: Incarnation(o), seq: 1 } }),
            proptest::collection::vec(bytes(8), 0..4).prop_map(ClientReply::Keys),
            event().prop_map(|e| ClientReply::Audit(vec![(Dot { origin: Incarnation(2), seq: 3 }, e)])),
            vv().prop_map(|vector| ClientReply::Status {
                appliance: NodeId::new("svc1").expect("valid"),
                incarnation: Incarnation(5),
                topology_epoch: 2,
                streams: vec![StreamStatus { stream: StreamId::Audit, vector, lag: vec![] }],
            }),
            bytes(64).prop_map(ClientReply::Blob),
            (vv(), any::<[u8; 32]>()).prop_map(|(at, root)| ClientReply::Root { at, root }),
            Just(ClientReply::Done),
            "[a-z]{0,10}"
                .prop_map(|message| ClientReply::Error(ProtocolError { code: ErrorCode::NotFound, message })),
        ]
    }

    fn round_trip<M: WireMessage + PartialEq + std::fmt::Debug>(m: &M) -> Result<(), TestCaseError> {
        let frame = encode_frame(m).expect("encodes");
        let mut reader = FrameReader::new();
        // Byte by byte for the first few, then the rest: partial frames must wait.
        for b in frame.iter().take(3) {
            reader.push(&[*b]);
            prop_assert_eq!(reader.next_frame().expect("no error on a partial frame"), None);
        }
        reader.push(frame.get(3..).unwrap_or_default());
        let payload = reader.next_frame().expect("valid").expect("complete");
        prop_assert_eq!(&decode_frame::<M>(&payload).expect("decodes"), m);
        for cut in 0..payload.len() {
            prop_assert!(decode_frame::<M>(&payload[..cut]).is_err(), "truncation at {} decoded", cut);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn peer_messages_round_trip(m in peer()) { round_trip(&m)?; }

        #[test]
        fn hand_written_encodings_are_serdes(m in peer()) {
            let by_serde = postcard::to_allocvec(&m).expect("postcard encodes every message");
            let frame = encode_frame(&m).expect("encodes");
            prop_assert_eq!(&frame[FRAME_PREFIX_BYTES..], &by_serde[..]);
        }

        #[test]
        fn entries_framed_in_their_encoding_are_the_decoded_messages_frame(
            entries in proptest::collection::vec(entry(), 0..20),
        ) {
            let encoded: Vec<EncodedEntry> = entries.iter().map(EncodedEntry::from).collect();
            for (e, x) in entries.iter().zip(&encoded) {
                prop_assert_eq!(x.dot(), e.dot);
                prop_assert_eq!(EncodedEntry::new(e.encode()).expect("an encoding"), x.clone());
            }
            let frame = encode_entries_frame(StreamId::Sessions, &encoded).expect("encodes");
            let message = PeerMessage::Entries { stream: StreamId::Sessions, entries };
            prop_assert_eq!(&frame, &encode_frame(&message).expect("encodes"));
        }

        #[test]
        fn client_requests_round_trip(body in call(), key in any::<[u8; 16]>()) {
            round_trip(&ClientRequest { idempotency_key: key, body })?;
        }

        #[test]
        fn client_replies_round_trip(m in reply()) { round_trip(&m)?; }

        #[test]
        fn a_stream_cut_anywhere_yields_its_messages_in_order(
            ms in proptest::collection::vec(peer(), 1..12),
            cuts in proptest::collection::vec(1usize..300, 1..40),
        ) {
            let stream: Vec<u8> = ms.iter().flat_map(|m| encode_frame(m).expect("encodes")).collect();
            let mut r = FrameReader::new();
            let (mut got, mut at) = (Vec::new(), 0);
            for cut in cuts.iter().cycle() {
                if at == stream.len() {
                    break;
                }
                let end = (at + cut).min(stream.len());
                r.push(&stream[at..end]);
                at = end;
                while let Some(m) = r.next_frame_with(decode_frame::<PeerMessage>).expect("valid frames") {
                    got.push(m.expect("decodes"));
                }
            }
            prop_assert_eq!(got, ms);
            prop_assert_eq!(r.buffered(), 0);
        }

        #[test]
        fn random_bytes_never_panic(b in bytes(600)) {
            let _ = decode_frame::<PeerMessage>(&b);
            let _ = decode_frame::<ClientRequest>(&b);
            let _ = decode_frame::<ClientReply>(&b);
            let mut r = FrameReader::new();
            r.push(&b);
            while let Ok(Some(_)) = r.next_frame() {}
        }
    }

    #[test]
    fn oversized_and_zero_frames_are_refused_before_buffering() {
        let mut r = FrameReader::new();
        r.push(&((FRAME_BYTES_MAX as u32) + 1).to_le_bytes());
        assert!(matches!(r.next_frame(), Err(DecodeError::TooLarge { .. })));
        let mut r = FrameReader::new();
        r.push(&[0, 0, 0, 0, 1]);
        assert!(matches!(r.next_frame(), Err(DecodeError::Invalid { .. })));
    }

    #[test]
    fn batch_limits_are_enforced() {
        let e = Entry {
            dot: Dot { origin: Incarnation(1), seq: 1 },
            hlc: Hlc::default(),
            collection: Collection::Audit,
            key: vec![],
            context: VersionVector::new(),
            op: Op::Delete,
        };
        let m = PeerMessage::AuditForward { entries: vec![e; BATCH_ENTRIES_MAX + 1] };
        let frame = encode_frame(&m).expect("encodes");
        assert!(matches!(decode_frame::<PeerMessage>(&frame[4..]), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn unknown_major_version_is_refused_with_a_clear_error() {
        let h = Handshake {
            major: PROTOCOL_MAJOR + 1,
            minor: 0,
            features: 0,
            appliance: NodeId::new("db2").expect("valid"),
            incarnation: Incarnation(1),
            topology_epoch: 1,
            session: 1,
            seen_session: None,
            streams: vec![],
        };
        let err = h.check_version().expect_err("unknown major");
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        assert!(err.message.contains("protocol 2.0"), "{}", err.message);
    }
}
