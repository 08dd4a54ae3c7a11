//! The two protocols: appliance to appliance (`repl-peer/1`) and client to
//! appliance (`repl-client/1`). The major version is in the ALPN; the minor version
//! and feature bits are in the handshake. Every variant is bounded on decode by
//! [`crate::WireMessage::check`].

use serde::{Deserialize, Serialize};

use crate::audit::AuditEvent;
use crate::entry::Entry;
use crate::hlc::Hlc;
use crate::id::{Incarnation, NodeId};
use crate::stream::{Collection, StreamId};
use crate::version::{Dot, VersionVector};

/// Major protocol version, carried in the ALPN (`repl-peer/1`, `repl-client/1`).
pub const PROTOCOL_MAJOR: u16 = 1;
/// Minor protocol version, carried in the handshake.
pub const PROTOCOL_MINOR: u16 = 0;
/// ALPN of the peer protocol.
pub const ALPN_PEER: &[u8] = b"repl-peer/1";
/// ALPN of the client (agent and admin) protocol.
pub const ALPN_CLIENT: &[u8] = b"repl-client/1";

/// One stream's position in a handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    /// The stream.
    pub stream: StreamId,
    /// The sender's durable vector of the stream.
    pub vector: VersionVector,
    /// Per origin, the lowest sequence the sender's log still holds.
    pub floors: Vec<(Incarnation, u64)>,
}

/// The first message each side sends on a peer connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    /// Major version (must equal [`PROTOCOL_MAJOR`]).
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// Optional features the sender supports (bit set).
    pub features: u64,
    /// The sender's appliance id.
    pub appliance: NodeId,
    /// The sender's current incarnation.
    pub incarnation: Incarnation,
    /// The sender's topology membership epoch.
    pub topology_epoch: u64,
    /// A nonce of this session of the sender: a repeated Hello with the same nonce is
    /// a retransmission, a new nonce is a new session (the sender restarted).
    pub session: u64,
    /// The receiver's session nonce the sender has already seen, if any: a handshake
    /// that does not name the receiver's current session asks for the receiver's.
    pub seen_session: Option<u64>,
    /// Per stream in scope: vector and log floors.
    pub streams: Vec<StreamPosition>,
}

impl Handshake {
    /// Checks the peer's version: an unknown major version is refused with a clear error.
    pub fn check_version(&self) -> Result<(), ProtocolError> {
        if self.major != PROTOCOL_MAJOR {
            return Err(ProtocolError {
                code: ErrorCode::UnsupportedVersion,
                message: format!(
                    "peer speaks protocol {}.{}, this appliance speaks {}.{}",
                    self.major, self.minor, PROTOCOL_MAJOR, PROTOCOL_MINOR
                ),
            });
        }
        Ok(())
    }
}

/// Why a request or session failed, as a code the other side can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer's protocol major version is not spoken here.
    UnsupportedVersion,
    /// The sender is not (or no longer) in the topology, or is an old incarnation.
    NotAuthorized,
    /// A message arrived that the state of the session does not allow.
    UnexpectedMessage,
    /// The request is malformed or breaks a limit.
    BadRequest,
    /// A compare-and-set context was stale.
    ContextMismatch,
    /// The key or record does not exist.
    NotFound,
    /// The store refused the write (full disk, poisoned store, ...).
    Unavailable,
    /// A causal token was not reached in time after failover.
    Timeout,
    /// Anything else.
    Internal,
}

/// A typed protocol error with a human explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What went wrong, for logs and operators.
    pub message: String,
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// A bucket of a hash tree and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketHash {
    /// Bucket index at its level.
    pub bucket: u32,
    /// blake3 over the bucket's sorted (key, version digest) pairs.
    pub hash: [u8; 32],
}

/// Appliance-to-appliance messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum PeerMessage {
    /// Opens a session: versions, identity, epoch, vectors and floors.
    Hello(Handshake),
    /// Entries of one stream, each origin's in sequence order.
    Entries {
        /// The stream.
        stream: StreamId,
        /// The entries.
        entries: Vec<Entry>,
    },
    /// The receiver's durable vector of a stream (entries up to it may be released).
    Ack {
        /// The stream.
        stream: StreamId,
        /// What the acker holds durably.
        vector: VersionVector,
    },
    /// More bytes the sender may have in flight on a stream.
    Credit {
        /// The stream.
        stream: StreamId,
        /// Additional unacknowledged bytes allowed.
        bytes: u64,
    },
    /// A gap was seen: restart the per-origin cursors at this vector.
    Rewind {
        /// The stream.
        stream: StreamId,
        /// Where to restart.
        vector: VersionVector,
    },
    /// The sender's log no longer covers the receiver's vector: run anti-entropy.
    NotCovered {
        /// The stream.
        stream: StreamId,
        /// The origin whose entries were compacted.
        origin: Incarnation,
        /// The lowest sequence the log still holds.
        floor: u64,
    },
    /// Asks for hash-tree digests of buckets at a level of a pinned snapshot.
    TreeRequest {
        /// The stream.
        stream: StreamId,
        /// The snapshot's vector both sides compare at.
        at: VersionVector,
        /// Session expiry cut-off both sides agree on (wall-clock ms).
        expiry_cutoff_ms: u64,
        /// Tree level (0 = root).
        level: u8,
        /// Buckets wanted.
        buckets: Vec<u32>,
    },
    /// Digests for a [`PeerMessage::TreeRequest`].
    TreeReply {
        /// The stream.
        stream: StreamId,
        /// The replier's vector when it computed the digests (the first reply of a
        /// repair pins the snapshot vector).
        at: VersionVector,
        /// Tree level.
        level: u8,
        /// The digests.
        hashes: Vec<BucketHash>,
    },
    /// A chunk of a snapshot (anti-entropy keys or a new appliance's bootstrap).
    SnapshotChunk {
        /// The stream.
        stream: StreamId,
        /// The sender's vector when it read the chunk.
        at: VersionVector,
        /// The resume token of the request this answers.
        from: Vec<u8>,
        /// Every version of the keys in this chunk, in key order.
        entries: Vec<Entry>,
        /// blake3 of the chunk's encoded entries, in order.
        checksum: [u8; 32],
        /// Where the next chunk starts (empty after the last chunk).
        resume: Vec<u8>,
        /// Whether this is the last chunk.
        last: bool,
    },
    /// Asks for the keys of some leaf buckets (every bucket when empty), in key order,
    /// from a resume token (empty to start).
    SnapshotRequest {
        /// The stream.
        stream: StreamId,
        /// Leaf buckets wanted, ascending; empty for all (a bootstrap).
        buckets: Vec<u32>,
        /// Where to start: empty, or the `resume` of the previous chunk.
        resume: Vec<u8>,
    },
    /// Audit records forwarded from a non-holder to a holder.
    AuditForward {
        /// The records, each origin's in sequence order.
        entries: Vec<Entry>,
    },
    /// A holder's durable audit vector: the forwarder may drop what it covers.
    AuditAck {
        /// What the holder holds durably.
        vector: VersionVector,
    },
    /// Phase one of a topology change: compare-and-set on the epoch.
    TopologyPrepare {
        /// The epoch the coordinator expects.
        expected_epoch: u64,
        /// The proposed new epoch.
        new_epoch: u64,
        /// The encoded new topology.
        topology: Vec<u8>,
    },
    /// Answer to a prepare.
    TopologyVote {
        /// The proposed epoch voted on.
        new_epoch: u64,
        /// Whether the voter accepts.
        accept: bool,
        /// Why not, when it refuses.
        reason: String,
    },
    /// Phase two: make the prepared topology current.
    TopologyCommit {
        /// The epoch to commit.
        new_epoch: u64,
    },
    /// Phase two when a vote was no or missing: forget the prepared topology.
    TopologyAbort {
        /// The epoch that was prepared.
        new_epoch: u64,
    },
    /// A typed protocol error; the session may continue or close per the code.
    Error(ProtocolError),
    /// The sender is closing the session.
    Goodbye {
        /// Why.
        reason: String,
    },
}

/// A client request: an idempotency key and what is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRequest {
    /// Unique per logical request; a retry with the same key never applies twice.
    pub idempotency_key: [u8; 16],
    /// The request.
    pub body: ClientCall,
}

/// What a client asks an appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClientCall {
    /// Read a key with its causal context.
    Get {
        /// Collection.
        collection: Collection,
        /// Key.
        key: Vec<u8>,
        /// Serve only once this write is held (read-your-writes after failover).
        after: Option<Dot>,
    },
    /// Write a key, superseding what `context` covers (a compare-and-set if `cas`).
    Put {
        /// Collection.
        collection: Collection,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Causal context from a read.
        context: Option<VersionVector>,
        /// Refuse unless `context` is current.
        cas: bool,
    },
    /// Delete a key.
    Delete {
        /// Collection.
        collection: Collection,
        /// Key.
        key: Vec<u8>,
        /// Causal context from a read.
        context: Option<VersionVector>,
    },
    /// List keys from `start`.
    Scan {
        /// Collection.
        collection: Collection,
        /// First key (inclusive).
        start: Vec<u8>,
        /// At most this many.
        limit: u32,
    },
    /// Create a session.
    SessionCreate {
        /// Session id.
        id: String,
        /// Encoded session record.
        record: Vec<u8>,
        /// Expiry (wall-clock ms).
        expires_at_ms: u64,
    },
    /// Extend a session.
    SessionTouch {
        /// Session id.
        id: String,
        /// New expiry.
        expires_at_ms: u64,
    },
    /// End a session.
    SessionEnd {
        /// Session id.
        id: String,
    },
    /// Append an audit event.
    AuditAppend(AuditEvent),
    /// Query audit events.
    AuditQuery {
        /// Inclusive lower time bound.
        from_ms: Option<u64>,
        /// Exclusive upper time bound.
        until_ms: Option<u64>,
        /// Only this user.
        user: Option<String>,
        /// Only this appliance.
        appliance: Option<String>,
        /// At most this many.
        limit: u32,
    },
    /// An administrator's call (needs an admin certificate).
    Admin(AdminCall),
}

impl ClientCall {
    /// The stream a call writes, or `None` for calls that only read (or administer).
    pub fn write_stream(&self) -> Option<StreamId> {
        match self {
            ClientCall::Put { collection, .. } | ClientCall::Delete { collection, .. } => {
                Some(collection.stream())
            }
            ClientCall::SessionCreate { .. }
            | ClientCall::SessionTouch { .. }
            | ClientCall::SessionEnd { .. } => Some(StreamId::Sessions),
            ClientCall::AuditAppend(_) => Some(StreamId::Audit),
            ClientCall::Get { .. }
            | ClientCall::Scan { .. }
            | ClientCall::AuditQuery { .. }
            | ClientCall::Admin(_) => None,
        }
    }
}

/// Administrative calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AdminCall {
    /// Appliance status.
    Status,
    /// The current topology.
    TopologyShow,
    /// Phase one of a topology change.
    TopologyPrepare {
        /// Expected current epoch.
        expected_epoch: u64,
        /// Encoded new topology.
        topology: Vec<u8>,
    },
    /// Phase two.
    TopologyCommit {
        /// Epoch to commit.
        new_epoch: u64,
    },
    /// Take a consistent online backup.
    Backup,
    /// Restore from a backup image (the appliance restarts under a new incarnation).
    Restore {
        /// The backup's checksum, to refuse a damaged upload.
        checksum: [u8; 32],
    },
    /// Hash-tree roots of a stream at a pinned vector.
    Verify {
        /// The stream.
        stream: StreamId,
    },
    /// Recorded conflicts of a collection.
    Conflicts {
        /// The collection.
        collection: Collection,
    },
    /// Hashes of hash-tree buckets of a stream, read atomically with its vector.
    Tree {
        /// The stream.
        stream: StreamId,
        /// Sessions expired at this time are left out (the caller picks one for all).
        cutoff_ms: u64,
        /// The level (0 is the root).
        level: u8,
        /// The buckets at that level.
        buckets: Vec<u32>,
    },
    /// The versions held in one leaf bucket of a stream's hash tree.
    BucketEntries {
        /// The stream.
        stream: StreamId,
        /// The leaf bucket.
        bucket: u32,
    },
    /// Verify every origin's audit hash chain.
    AuditVerify,
    /// Phase two of a refused change: forget what was prepared, if it is this change
    /// (another change to the same epoch may have won there).
    TopologyAbort {
        /// The epoch that was prepared.
        new_epoch: u64,
        /// The refused proposal, as sent in the prepare.
        topology: Vec<u8>,
    },
    /// A chunk of an online backup: every version of `stream` in key order after
    /// `resume` (empty for the first chunk), with the stream's vector.
    BackupChunk {
        /// The stream.
        stream: StreamId,
        /// Where the previous chunk ended.
        resume: Vec<u8>,
    },
    /// Install a certificate revocation list: refused on new connections at once,
    /// live connections of a revoked certificate closed.
    InstallCrl {
        /// The CRL, PEM.
        pem: String,
    },
}

/// A recorded last-writer-wins conflict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictView {
    /// The key.
    pub key: Vec<u8>,
    /// The losing write.
    pub loser: Dot,
    /// Its value (`None` for a losing delete).
    pub value: Option<Vec<u8>>,
    /// The write that won.
    pub winner: Dot,
}

/// A value in a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueView {
    /// The bytes.
    pub value: Vec<u8>,
    /// The write that made it.
    pub dot: Dot,
    /// When.
    pub hlc: Hlc,
}

/// Per-stream status of an appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStatus {
    /// The stream.
    pub stream: StreamId,
    /// Durable vector.
    pub vector: VersionVector,
    /// Per peer: entries behind.
    pub lag: Vec<(NodeId, u64)>,
}

/// An appliance's answer to a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ClientReply {
    /// A read: live values and the causal context.
    Values {
        /// Live values (several only for siblings).
        values: Vec<ValueView>,
        /// Context to pass to a write.
        context: VersionVector,
    },
    /// A write was made durable; the dot is its causal token.
    Written {
        /// The causal token.
        token: Dot,
    },
    /// Keys from a scan.
    Keys(Vec<Vec<u8>>),
    /// Audit events found.
    Audit(Vec<(Dot, AuditEvent)>),
    /// Appliance status.
    Status {
        /// The appliance.
        appliance: NodeId,
        /// Its incarnation.
        incarnation: Incarnation,
        /// Its topology epoch.
        topology_epoch: u64,
        /// Per stream.
        streams: Vec<StreamStatus>,
    },
    /// Encoded topology, backup bytes or other opaque payload.
    Blob(Vec<u8>),
    /// Hash-tree root of a stream at a vector.
    Root {
        /// The vector compared at.
        at: VersionVector,
        /// The root digest.
        root: [u8; 32],
    },
    /// Done, nothing to return.
    Done,
    /// Recorded conflicts (the newest kept) and how many were ever recorded.
    Conflicts {
        /// The kept records.
        records: Vec<ConflictView>,
        /// All recorded since the start.
        total: u64,
    },
    /// Hash-tree bucket hashes and the vector they were read at.
    Tree {
        /// The vector.
        at: VersionVector,
        /// The hashes.
        hashes: Vec<BucketHash>,
    },
    /// Versions (as entries) and the vector they were read at.
    Entries {
        /// The vector.
        at: VersionVector,
        /// The versions.
        entries: Vec<Entry>,
    },
    /// A count (audit records verified, ...).
    Count(u64),
    /// A chunk of versions, the vector read with it, and where the next begins
    /// (empty after the last).
    Chunk {
        /// The vector.
        at: VersionVector,
        /// The versions.
        entries: Vec<Entry>,
        /// The resume token.
        resume: Vec<u8>,
    },
    /// The call failed.
    Error(ProtocolError),
}
