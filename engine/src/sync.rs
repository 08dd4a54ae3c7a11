//! Replication between two appliances: a sans-IO state machine per peer.
//!
//! # Driving contract
//! The driver (the simulator in `tests/`, or the node runtime) owns the transport and
//! the clock. It feeds the machine inputs and drains its outputs:
//! - inputs: [`PeerSync::handle_message`] for every message from the peer,
//!   [`PeerSync::handle_local_durable`] whenever new entries became durable in a
//!   stream (local writes or entries applied from other peers), and
//!   [`PeerSync::handle_timeout`] once [`PeerSync::poll_timeout`]'s time has come;
//! - outputs: [`PeerSync::poll_outgoing`] until `None` after every input (what to
//!   send to the peer, in order; entries from the log stay in their encoding, framed
//!   by [`Outgoing::encode_frame`]; [`PeerSync::poll_transmit`] gives the same as
//!   decoded messages), [`PeerSync::poll_event`] for what the driver must act on, and
//!   [`PeerSync::poll_timeout`] for when to call back.
//!
//! Time is wall-clock milliseconds passed in, monotonic per machine. The machine reads
//! and writes the local store only through [`Replica`], synchronously; it never
//! touches sockets, tasks or the clock. The network below it may lose, duplicate,
//! delay and reorder messages: every step is idempotent, gaps are answered with
//! `Rewind`, and unacknowledged entries are retransmitted after
//! [`SyncConfig::retransmit_ms`].
//!
//! # Protocol (DESIGN section 5)
//! Both sides send `Hello` (version, appliance, incarnation, epoch, session nonce,
//! per-stream vectors and log floors) until they hear the other's. Each side then
//! streams, for every stream in its send scope, the entries above the peer's vector
//! in log order (so each origin's in sequence), at most `window` entries ahead of the
//! peer's acknowledgement. The receiver applies them in order through the store,
//! which skips duplicates and refuses gaps, acknowledges its durable vector, and
//! answers a gap with `Rewind`. Own entries are pushed at once; another origin's
//! entries are relayed only when the peer's acknowledgement of that origin stood
//! still for `relay_delay_ms` while we held more (no flooding: a peer that keeps
//! receiving an origin from elsewhere, however far behind, is not sent it again, so
//! in steady state each write crosses the network once per replica), and relaying
//! stops once the peer acknowledges more of the origin than we relayed. A peer below
//! the log floor gets `NotCovered` (anti-entropy).

use std::collections::{btree_map, BTreeMap, VecDeque};

use repl_wire::{
    encode_entries_frame, encode_frame, encode_snapshot_chunk_frame, BucketHash, DecodeError, Dot,
    EncodedEntry, Entry, ErrorCode, Handshake, Incarnation, NodeId, PeerMessage, ProtocolError,
    SnapshotChunkFrame, StreamId, StreamPosition, VersionVector, PROTOCOL_MAJOR, PROTOCOL_MINOR,
};

use crate::error::Error;
use crate::store::Store;
use crate::topology::Scope;
use crate::tree::{buckets_at, children, TREE_LEAF_LEVEL, TREE_LEAVES};

/// The local store as the sync machine sees it.
pub trait Replica {
    /// This appliance's incarnation.
    fn incarnation(&self) -> Incarnation;
    /// The durable vector of a stream.
    fn vector(&self, stream: StreamId) -> VersionVector;
    /// How many keys a stream holds.
    fn key_count(&self, stream: StreamId) -> usize;
    /// Per origin, the lowest sequence the stream's log holds.
    fn log_floors(&self, stream: StreamId) -> BTreeMap<Incarnation, u64>;
    /// Durable entries above `from` and at or below `upto` (per origin; none of an
    /// origin `upto` lacks) in log order, at most `max`, each in its encoding.
    fn entries_between(
        &self,
        stream: StreamId,
        from: &VersionVector,
        upto: &VersionVector,
        max: usize,
    ) -> Result<Vec<EncodedEntry>, Error>;
    /// Applies entries from a peer durably (duplicates skipped, gaps refused).
    fn apply(&self, stream: StreamId, entries: Vec<Entry>) -> Result<(), Error>;
    /// Applies entries from a peer like [`Replica::apply`] but returns before they are
    /// durable; they join the next group commit, which the driver starts.
    fn queue_apply(&self, stream: StreamId, entries: Vec<Entry>) -> Result<(), Error>;
    /// The vector and the hash-tree hashes of `buckets` at `level`.
    fn tree_hashes(
        &self,
        stream: StreamId,
        cutoff_ms: u64,
        level: u8,
        buckets: &[u32],
    ) -> (VersionVector, Vec<BucketHash>);
    /// The vector and a chunk of the keys of leaf `buckets` (all when empty) after
    /// `resume`, each entry in its encoding, with the token to resume from (empty
    /// after the last).
    fn snapshot_chunk(
        &self,
        stream: StreamId,
        buckets: &[u32],
        resume: &[u8],
        max_entries: usize,
    ) -> Result<(VersionVector, Vec<EncodedEntry>, Vec<u8>), Error>;
    /// Starts receiving a snapshot of leaf `buckets` (`None`: all) from `peer`.
    fn begin_snapshot(&self, stream: StreamId, peer: &str, buckets: Option<&[u32]>) -> Result<(), Error>;
    /// Stages a chunk of the snapshot from `peer` durably.
    fn stage_snapshot(&self, stream: StreamId, peer: &str, entries: Vec<Entry>) -> Result<(), Error>;
    /// Installs the snapshot from `peer` and raises the vector to include `at`.
    fn finish_snapshot(&self, stream: StreamId, peer: &str, at: &VersionVector) -> Result<(), Error>;
}

impl Replica for Store {
    fn incarnation(&self) -> Incarnation {
        Store::incarnation(self)
    }
    fn vector(&self, stream: StreamId) -> VersionVector {
        Store::vector(self, stream)
    }
    fn key_count(&self, stream: StreamId) -> usize {
        Store::key_count(self, stream)
    }
    fn log_floors(&self, stream: StreamId) -> BTreeMap<Incarnation, u64> {
        Store::log_floors(self, stream)
    }
    fn entries_between(
        &self,
        stream: StreamId,
        from: &VersionVector,
        upto: &VersionVector,
        max: usize,
    ) -> Result<Vec<EncodedEntry>, Error> {
        Store::encoded_between(self, stream, from, upto, max)
    }
    fn apply(&self, stream: StreamId, entries: Vec<Entry>) -> Result<(), Error> {
        self.apply_remote(stream, entries)?.wait().map(|_| ())
    }
    fn queue_apply(&self, stream: StreamId, entries: Vec<Entry>) -> Result<(), Error> {
        // Dropping the pending write leaves it queued: the next commit of the stream
        // makes it durable.
        self.apply_remote(stream, entries).map(drop)
    }
    fn tree_hashes(
        &self,
        stream: StreamId,
        cutoff_ms: u64,
        level: u8,
        buckets: &[u32],
    ) -> (VersionVector, Vec<BucketHash>) {
        Store::tree_hashes(self, stream, cutoff_ms, level, buckets)
    }
    fn snapshot_chunk(
        &self,
        stream: StreamId,
        buckets: &[u32],
        resume: &[u8],
        max_entries: usize,
    ) -> Result<(VersionVector, Vec<EncodedEntry>, Vec<u8>), Error> {
        Store::snapshot_chunk_encoded(self, stream, buckets, resume, max_entries)
    }
    fn begin_snapshot(&self, stream: StreamId, peer: &str, buckets: Option<&[u32]>) -> Result<(), Error> {
        Store::begin_snapshot(self, stream, peer, buckets)
    }
    fn stage_snapshot(&self, stream: StreamId, peer: &str, entries: Vec<Entry>) -> Result<(), Error> {
        Store::stage_snapshot(self, stream, peer, entries)
    }
    fn finish_snapshot(&self, stream: StreamId, peer: &str, at: &VersionVector) -> Result<(), Error> {
        Store::finish_snapshot(self, stream, peer, at)
    }
}

/// What a sync machine sends: a message, or entries as the log holds them, shipped
/// without decoding them (on the wire, the same bytes as [`PeerMessage::Entries`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A message.
    Message(PeerMessage),
    /// [`PeerMessage::Entries`] with its entries still encoded.
    Entries {
        /// The stream.
        stream: StreamId,
        /// The entries, each origin's in sequence order.
        entries: Vec<EncodedEntry>,
    },
    /// [`PeerMessage::SnapshotChunk`] with its entries still encoded.
    SnapshotChunk {
        /// The stream.
        stream: StreamId,
        /// The sender's vector when it read the chunk.
        at: VersionVector,
        /// The resume token of the request this answers.
        from: Vec<u8>,
        /// Every version of the keys in this chunk, in key order.
        entries: Vec<EncodedEntry>,
        /// blake3 of the chunk's encoded entries, in order.
        checksum: [u8; 32],
        /// Where the next chunk starts (empty after the last chunk).
        resume: Vec<u8>,
        /// Whether this is the last chunk.
        last: bool,
    },
}

impl Outgoing {
    /// One frame of it (length prefix included), as [`repl_wire::encode_frame`] makes.
    pub fn encode_frame(&self) -> Result<Vec<u8>, DecodeError> {
        match self {
            Outgoing::Message(m) => encode_frame(m),
            Outgoing::Entries { stream, entries } => encode_entries_frame(*stream, entries),
            Outgoing::SnapshotChunk { stream, at, from, entries, checksum, resume, last } => {
                encode_snapshot_chunk_frame(&SnapshotChunkFrame {
                    stream: *stream,
                    at,
                    from,
                    entries,
                    checksum,
                    resume,
                    last: *last,
                })
            }
        }
    }

    /// The message it is, its entries decoded (and checked).
    pub fn into_message(self) -> Result<PeerMessage, DecodeError> {
        match self {
            Outgoing::Message(m) => Ok(m),
            Outgoing::Entries { stream, entries } => {
                let entries = entries.iter().map(EncodedEntry::decode).collect::<Result<_, _>>()?;
                Ok(PeerMessage::Entries { stream, entries })
            }
            Outgoing::SnapshotChunk { stream, at, from, entries, checksum, resume, last } => {
                let entries = entries.iter().map(EncodedEntry::decode).collect::<Result<_, _>>()?;
                Ok(PeerMessage::SnapshotChunk { stream, at, from, entries, checksum, resume, last })
            }
        }
    }
}

/// Tunables of a sync machine, with units in their names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConfig {
    /// Most entries sent but not yet acknowledged, per stream.
    pub window_entries: u64,
    /// Most entries in one `Entries` message.
    pub batch_entries: usize,
    /// Resend `Hello`, and rewind to the acknowledged vector, after this long without progress.
    pub retransmit_ms: u64,
    /// Relay another origin's entries only after the peer lagged on it this long.
    pub relay_delay_ms: u64,
    /// About how many entries one snapshot chunk carries (anti-entropy and bootstrap).
    pub snapshot_chunk_entries: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            // Larger batches (1,024 in a window of 16,384) were tried for catch-up: a
            // receiver stalled past `retransmit_ms` then had four times as much
            // resent, and the G3 mesh moved 8.6x the pair's bytes per entry received.
            window_entries: 4096,
            batch_entries: 256,
            retransmit_ms: 200,
            relay_delay_ms: 1_000,
            snapshot_chunk_entries: 1024,
        }
    }
}

impl SyncConfig {
    /// The tunables for sessions over QUIC (the node runtime): a session's stream is
    /// reliable and ordered, so nothing sent is lost while it lasts (a broken
    /// connection starts a new session, which resends from the handshake). Entries go
    /// unacknowledged only while the peer is slow or after an apply failed there, so
    /// the retransmission is a safety net that waits 1 s (doubling from there): at
    /// 200 ms, a G3 mesh of six appliances saturating two cores resent its whole
    /// window hundreds of times per 100,000 writes.
    pub fn over_quic() -> Self {
        SyncConfig { retransmit_ms: 1_000, ..SyncConfig::default() }
    }
}

/// Who a sync machine connects and how.
#[derive(Debug, Clone)]
pub struct SyncSetup {
    /// This appliance.
    pub me: NodeId,
    /// The peer.
    pub peer: NodeId,
    /// The streams the topology puts in scope for the pair, each way.
    pub scope: Scope,
    /// This appliance's topology epoch.
    pub epoch: u64,
    /// A nonce for this session, fresh at every start (so the peer tells a restart
    /// from a retransmitted handshake).
    pub session: u64,
    /// The peer's current incarnation per the topology, when known: a handshake from
    /// any other incarnation (an older one, before a restore) is refused.
    pub peer_incarnation: Option<Incarnation>,
    /// Tunables.
    pub config: SyncConfig,
}

/// Something the driver must know or act on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncEvent {
    /// The peer's handshake arrived (a new session of the peer).
    PeerSession {
        /// The peer's incarnation.
        incarnation: Incarnation,
    },
    /// This appliance is below the peer's log floor: it needs anti-entropy from the peer.
    NeedAntiEntropy {
        /// The stream.
        stream: StreamId,
        /// The origin whose entries the peer compacted.
        origin: Incarnation,
        /// The peer's floor.
        floor: u64,
    },
    /// The peer sent an error.
    PeerError(ProtocolError),
    /// The peer's topology epoch differs: the side behind must adopt the newer
    /// topology (from the replicated record, or the peer) and start new sessions with
    /// the scope it gives. Until then only streams both views put in scope flow.
    EpochDiffers {
        /// This appliance's epoch.
        ours: u64,
        /// The peer's.
        theirs: u64,
    },
    /// Entries from the peer could not be applied (not a gap).
    ApplyFailed(String),
    /// Anti-entropy (or a bootstrap) with the peer completed: this appliance's vector
    /// now includes the peer's snapshot vector.
    Repaired {
        /// The stream.
        stream: StreamId,
        /// Leaf buckets fetched (every bucket for a bootstrap).
        buckets_fetched: usize,
        /// Entries received in snapshot chunks.
        entries: u64,
    },
}

/// Where a repair (anti-entropy or bootstrap) of one stream stands.
#[derive(Debug, Clone)]
enum RepairStep {
    /// Comparing hash-tree hashes of `asked` buckets at `level`.
    Tree { level: u8, asked: Vec<u32> },
    /// Fetching the keys of leaf `buckets` (all when empty) from `resume`.
    Fetch { buckets: Vec<u32>, resume: Vec<u8>, begun: bool },
}

/// A snapshot being sent, as the sender: up to [`SNAPSHOT_CHUNKS_AHEAD`] chunks go
/// before the receiver asks for the next, so reading a chunk here, the wire and
/// staging one there overlap (one chunk per round trip would leave a WAN link idle
/// most of the time). The receiver's requests are unchanged: it asks for the chunk
/// after each one it took, which acknowledges that one; a request for anything else
/// (a chunk was lost, a new repair) starts over from where it asks.
#[derive(Debug, Clone)]
struct Serving {
    buckets: Vec<u32>,
    /// The resume token of each chunk sent and not yet acknowledged, oldest first.
    outstanding: VecDeque<Vec<u8>>,
    /// Where the next chunk starts; `None` once the last was sent.
    next: Option<Vec<u8>>,
}

/// Snapshot chunks sent ahead of the receiver's requests.
const SNAPSHOT_CHUNKS_AHEAD: usize = 4;

#[derive(Debug, Clone)]
struct Repair {
    step: RepairStep,
    /// The peer's vector at its first answer: what the receiver may claim at the end.
    at: Option<VersionVector>,
    cutoff_ms: u64,
    sent_ms: u64,
    entries: u64,
}

#[derive(Debug, Default)]
struct StreamState {
    send: bool,
    receive: bool,
    /// What the peer holds durably (handshake and acks).
    acked: VersionVector,
    /// How far entries were sent (the cursor; at or above `acked`).
    sent: VersionVector,
    /// When the peer's acknowledgement last moved or we last had nothing in flight.
    progress_ms: u64,
    /// Retransmissions since the acknowledgement last moved: each doubles the wait
    /// before the next (up to [`RETRANSMIT_BACKOFF_MAX`] doublings), so a peer that is
    /// only slow (its commits queued behind a busy disk or CPU) is not sent the whole
    /// window again every `retransmit_ms`, which made it slower still.
    backoff: u32,
    /// Per origin (not us) the peer lags on: how its acknowledgement moves.
    lag: BTreeMap<Incarnation, Lag>,
    /// Origins we reported `NotCovered` for, and when (repeated while the peer does not
    /// move past them: the report may have been lost).
    not_covered: BTreeMap<Incarnation, u64>,
    /// The vector we last acknowledged to the peer.
    told: VersionVector,
    /// When we last acknowledged, and how many more times to repeat it (an
    /// acknowledgement can be lost, and the peer's retention and tombstone collection
    /// wait on it; repeated a bounded number of times so an idle pair goes quiet).
    told_at_ms: u64,
    ack_repeats_left: u8,
    /// When we last rewound our cursor at the peer's request (as the sender).
    rewound_ms: Option<u64>,
    /// When we last asked the peer to rewind (as the receiver).
    rewind_asked_ms: Option<u64>,
}

impl StreamState {
    /// The acknowledgement moved (or nothing is in flight): the retransmission timer
    /// starts over from its first interval.
    fn progressed(&mut self, now_ms: u64) {
        self.progress_ms = now_ms;
        self.backoff = 0;
    }

    /// When entries still unacknowledged are sent again.
    fn retransmit_at(&self, config: &SyncConfig) -> u64 {
        self.progress_ms + (config.retransmit_ms << self.backoff)
    }
}

/// Whether a rewind last done (or asked for) at `last` still stands at `now_ms`: one
/// per retransmission interval and stream. A receiver that finds a gap finds one in
/// every message that was in flight behind it, and each rewind makes the sender queue
/// its whole window again: in the soak, 173 rewinds in 100 s left one appliance with
/// some 200 MB of entries queued for a peer that was still reading the first copy.
/// The resent entries are on their way after the first rewind, and should they be
/// lost, the retransmission timer sends them again.
fn rewind_stands(last: Option<u64>, now_ms: u64, config: &SyncConfig) -> bool {
    last.is_some_and(|at| now_ms < at.saturating_add(config.retransmit_ms))
}

/// Most doublings of the retransmission wait (200 ms grows to 3.2 s by default).
const RETRANSMIT_BACKOFF_MAX: u32 = 4;

/// How a peer's acknowledgement of another origin moves, while it lags on the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lag {
    /// The peer's acknowledged sequence of the origin when last looked at.
    acked: u64,
    /// Since when that acknowledgement stood still (or we began relaying).
    since_ms: u64,
    /// While relaying: the highest sequence of the origin we sent. An
    /// acknowledgement above it came from elsewhere.
    relayed: Option<u64>,
}

/// Counters of what crossed the wire, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Entries sent (retransmissions included).
    pub entries_sent: u64,
    /// Entries sent that this appliance did not write (relayed).
    pub entries_relayed: u64,
    /// Messages queued for the peer.
    pub messages_sent: u64,
    /// Rewinds received.
    pub rewinds: u64,
    /// Times entries went unacknowledged for `retransmit_ms` and sending restarted from
    /// what the peer acknowledged.
    pub retransmits: u64,
    /// Repairs (anti-entropy or bootstrap) completed as the receiver.
    pub repairs: u64,
    /// Hash-tree hashes received while repairing.
    pub repair_hashes: u64,
    /// Snapshot entries received while repairing.
    pub repair_entries: u64,
}

/// The replication machine for one peer.
#[derive(Debug)]
pub struct PeerSync {
    me: NodeId,
    peer: NodeId,
    epoch: u64,
    session: u64,
    config: SyncConfig,
    streams: BTreeMap<StreamId, StreamState>,
    peer_session: Option<u64>,
    peer_incarnation: Option<Incarnation>,
    expected_incarnation: Option<Incarnation>,
    hello_at_ms: u64,
    transmit: VecDeque<Outgoing>,
    events: VecDeque<SyncEvent>,
    stats: SyncStats,
    repairs: BTreeMap<StreamId, Repair>,
    /// Snapshots being sent to the peer, per stream.
    serving: BTreeMap<StreamId, Serving>,
    /// Whether received entries are queued rather than applied durably in place.
    queued_apply: bool,
    /// Whether entries were queued since the driver last asked.
    queued: bool,
}

impl PeerSync {
    /// A machine for the pair `setup` describes, starting a session at `now_ms` (its
    /// `Hello` is queued at once).
    pub fn new(setup: SyncSetup, now_ms: u64, replica: &dyn Replica) -> PeerSync {
        let SyncSetup { me, peer, scope, epoch, session, peer_incarnation, config } = setup;
        let mut streams = BTreeMap::new();
        for stream in StreamId::ALL {
            let (send, receive) = (scope.send.contains(&stream), scope.receive.contains(&stream));
            if send || receive {
                streams.insert(
                    stream,
                    StreamState { send, receive, progress_ms: now_ms, ..StreamState::default() },
                );
            }
        }
        let mut m = PeerSync {
            me,
            peer,
            epoch,
            session,
            config,
            streams,
            peer_session: None,
            peer_incarnation: None,
            expected_incarnation: peer_incarnation,
            hello_at_ms: now_ms,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            stats: SyncStats::default(),
            repairs: BTreeMap::new(),
            serving: BTreeMap::new(),
            queued_apply: false,
            queued: false,
        };
        m.queue_hello(replica);
        m
    }

    /// Queues received entries instead of waiting for each message's fdatasync before
    /// reading the next ([`Replica::queue_apply`]): messages that arrive while one
    /// group syncs share the next. The driver then commits whenever
    /// [`PeerSync::take_queued`] says entries were queued, and calls
    /// [`PeerSync::handle_local_durable`] once they are durable; only then are they
    /// acknowledged to the peer. Off by default (each message applied durably).
    pub fn set_queued_apply(&mut self, on: bool) {
        self.queued_apply = on;
    }

    /// Whether received entries were queued since the last call: the driver must
    /// commit them (nothing else may).
    pub fn take_queued(&mut self) -> bool {
        std::mem::take(&mut self.queued)
    }

    /// The peer this machine talks to.
    pub fn peer(&self) -> &NodeId {
        &self.peer
    }

    /// What crossed the wire so far.
    pub fn stats(&self) -> SyncStats {
        self.stats
    }

    /// Whether the peer's handshake has arrived.
    pub fn is_established(&self) -> bool {
        self.peer_session.is_some()
    }

    /// A one-line description of each stream's cursors, for diagnostics.
    pub fn debug_state(&self, replica: &dyn Replica) -> String {
        let mut out = format!("established={} ", self.is_established());
        for (stream, s) in &self.streams {
            out.push_str(&format!(
                "{stream}: ours={} acked={} sent={} lag={:?} not_covered={:?} told={} ack_repeats_left={}; ",
                replica.vector(*stream),
                s.acked,
                s.sent,
                s.lag,
                s.not_covered,
                s.told,
                s.ack_repeats_left
            ));
        }
        for (stream, r) in &self.repairs {
            out.push_str(&format!("repairing {stream}: {:?} sent at {} ms; ", r.step, r.sent_ms));
        }
        out
    }

    /// Whether this machine sends `stream` to its peer.
    pub fn sends(&self, stream: StreamId) -> bool {
        self.streams.get(&stream).is_some_and(|s| s.send)
    }

    /// The vector the peer acknowledged for a stream (retention feedback).
    pub fn acked(&self, stream: StreamId) -> Option<&VersionVector> {
        self.streams.get(&stream).map(|s| &s.acked)
    }

    fn push(&mut self, m: PeerMessage) {
        self.push_outgoing(Outgoing::Message(m));
    }

    fn push_outgoing(&mut self, m: Outgoing) {
        self.stats.messages_sent += 1;
        self.transmit.push_back(m);
    }

    fn queue_hello(&mut self, replica: &dyn Replica) {
        let streams = self
            .streams
            .keys()
            .map(|&stream| StreamPosition {
                stream,
                vector: replica.vector(stream),
                floors: replica.log_floors(stream).into_iter().collect(),
            })
            .collect();
        let hello = Handshake {
            major: PROTOCOL_MAJOR,
            minor: PROTOCOL_MINOR,
            features: 0,
            appliance: self.me.clone(),
            incarnation: replica.incarnation(),
            topology_epoch: self.epoch,
            session: self.session,
            seen_session: self.peer_session,
            streams,
        };
        self.push(PeerMessage::Hello(hello));
    }

    /// Next thing to send to the peer, entries from the log still in their encoding.
    #[must_use]
    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.transmit.pop_front()
    }

    /// Next message to send to the peer, decoded ([`PeerSync::poll_outgoing`] for a
    /// driver that frames what it sends). An entry of the log that does not decode (a
    /// damaged log) is reported as [`SyncEvent::ApplyFailed`] and its message left out.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<PeerMessage> {
        loop {
            match self.transmit.pop_front()?.into_message() {
                Ok(m) => return Some(m),
                Err(e) => {
                    self.events.push_back(SyncEvent::ApplyFailed(format!("a logged entry to send: {e}")))
                }
            }
        }
    }

    /// Next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SyncEvent> {
        self.events.pop_front()
    }

    /// When [`PeerSync::handle_timeout`] should next be called, if anything waits.
    #[must_use]
    pub fn poll_timeout(&self, replica: &dyn Replica) -> Option<u64> {
        if !self.is_established() {
            return Some(self.hello_at_ms + self.config.retransmit_ms);
        }
        let mut next: Option<u64> = None;
        let mut at = |t: u64| next = Some(next.map_or(t, |n| n.min(t)));
        for r in self.repairs.values() {
            at(r.sent_ms + self.config.retransmit_ms);
        }
        for (stream, s) in &self.streams {
            if !s.send {
                continue;
            }
            if !s.acked.descends(&s.sent) {
                at(s.retransmit_at(&self.config));
            }
            // A relay timer matters only while the origin's entries are not yet sent.
            let ours = replica.vector(*stream);
            for (origin, lag) in &s.lag {
                // (An origin the peer must repair for is not sent until it has.)
                if lag.relayed.is_none()
                    && ours.get(*origin) > s.sent.get(*origin)
                    && !s.not_covered.contains_key(origin)
                {
                    at(lag.since_ms + self.config.relay_delay_ms);
                }
            }
            for sent in s.not_covered.values() {
                at(sent + NOT_COVERED_REPEAT * self.config.retransmit_ms);
            }
        }
        for s in self.streams.values() {
            if s.ack_repeats_left > 0 {
                at(s.told_at_ms + ACK_REPEAT_INTERVALS * self.config.retransmit_ms);
            }
        }
        next
    }

    /// Time has come: resend a handshake that got no answer, rewind a stream whose
    /// entries were not acknowledged, start relaying to a peer that still lags.
    pub fn handle_timeout(&mut self, now_ms: u64, replica: &dyn Replica) {
        if !self.is_established() {
            if now_ms >= self.hello_at_ms + self.config.retransmit_ms {
                self.hello_at_ms = now_ms;
                self.queue_hello(replica);
            }
            return;
        }
        let stale: Vec<StreamId> = self
            .repairs
            .iter()
            .filter(|(_, r)| now_ms >= r.sent_ms + self.config.retransmit_ms)
            .map(|(s, _)| *s)
            .collect();
        for stream in stale {
            self.send_repair_request(now_ms, stream, replica);
        }
        let repeat: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                s.ack_repeats_left > 0
                    && now_ms >= s.told_at_ms + ACK_REPEAT_INTERVALS * self.config.retransmit_ms
            })
            .map(|(id, _)| *id)
            .collect();
        for stream in repeat {
            let left = self.streams.get(&stream).map_or(0, |s| s.ack_repeats_left);
            self.tell(now_ms, stream, replica.vector(stream));
            if let Some(s) = self.streams.get_mut(&stream) {
                s.ack_repeats_left = left - 1;
            }
        }
        for s in self.streams.values_mut() {
            s.not_covered.retain(|_, sent| now_ms < *sent + NOT_COVERED_REPEAT * self.config.retransmit_ms);
            if s.send && !s.acked.descends(&s.sent) && now_ms >= s.retransmit_at(&self.config) {
                // Lost in transit (or only slow): send again from what the peer holds.
                s.sent = s.acked.clone();
                s.progress_ms = now_ms;
                s.backoff = (s.backoff + 1).min(RETRANSMIT_BACKOFF_MAX);
                self.stats.retransmits += 1;
            }
        }
        self.pump_all(now_ms, replica);
    }

    /// New durable entries in `stream` (local writes, or entries from another peer).
    /// Besides pushing them, tells the peer our new vector if it sends us this stream,
    /// so it does not relay what we already got from elsewhere.
    pub fn handle_local_durable(&mut self, now_ms: u64, stream: StreamId, replica: &dyn Replica) {
        if !self.is_established() {
            return;
        }
        if let Some(s) = self.streams.get_mut(&stream) {
            if s.receive {
                let vector = replica.vector(stream);
                if s.told != vector {
                    self.tell(now_ms, stream, vector);
                }
            }
        }
        self.pump(now_ms, stream, replica);
    }

    /// A message from the peer.
    pub fn handle_message(&mut self, now_ms: u64, message: PeerMessage, replica: &dyn Replica) {
        match message {
            PeerMessage::Hello(h) => self.on_hello(now_ms, h, replica),
            _ if !self.is_established() => {} // from an older session of ours: ignore
            PeerMessage::Entries { stream, entries } => self.on_entries(now_ms, stream, entries, replica),
            PeerMessage::Ack { stream, vector } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    // A peer that moved past an origin (a repair) may need another
                    // `NotCovered` for it later.
                    for d in vector.iter() {
                        if d.seq > s.acked.get(d.origin) {
                            s.not_covered.remove(&d.origin);
                        }
                    }
                    if !s.acked.descends(&vector) {
                        s.acked.merge(&vector);
                        s.progressed(now_ms);
                    }
                    s.sent.merge(&s.acked);
                }
                self.pump(now_ms, stream, replica);
            }
            PeerMessage::Rewind { stream, vector } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.acked.merge(&vector);
                    if rewind_stands(s.rewound_ms, now_ms, &self.config) {
                        s.sent.merge(&s.acked);
                    } else {
                        self.stats.rewinds += 1;
                        s.sent = s.acked.clone();
                        s.progress_ms = now_ms;
                        s.rewound_ms = Some(now_ms);
                    }
                }
                self.pump(now_ms, stream, replica);
            }
            // Past what we hold, the origin leaves a gap: repaired by anti-entropy.
            // Stale when we hold the origin up to just below the floor: the peer had
            // not yet heard of what we gained since (a repair that just finished), and
            // its log follows on from what we hold. A repair then is wasted work; the
            // peer is told what we hold instead, or it would go on sending from its old
            // view of us (and repeating the `NotCovered`) for as long as the session
            // lasts, holding its log for us meanwhile.
            PeerMessage::NotCovered { stream, origin, floor } => {
                let held = replica.vector(stream);
                if held.get(origin).saturating_add(1) >= floor {
                    self.tell(now_ms, stream, held);
                } else {
                    self.events.push_back(SyncEvent::NeedAntiEntropy { stream, origin, floor });
                    self.start_repair(now_ms, stream, replica);
                }
            }
            PeerMessage::TreeRequest { stream, expiry_cutoff_ms, level, buckets, .. } => {
                self.on_tree_request(stream, expiry_cutoff_ms, level, buckets, replica)
            }
            PeerMessage::TreeReply { stream, at, level, hashes } => {
                self.on_tree_reply(now_ms, stream, at, level, hashes, replica)
            }
            PeerMessage::SnapshotRequest { stream, buckets, resume } => {
                self.on_snapshot_request(stream, buckets, resume, replica)
            }
            chunk @ PeerMessage::SnapshotChunk { .. } => self.on_snapshot_chunk(now_ms, chunk, replica),
            PeerMessage::Error(e) => self.events.push_back(SyncEvent::PeerError(e)),
            _ => {}
        }
    }

    fn on_hello(&mut self, now_ms: u64, h: Handshake, replica: &dyn Replica) {
        if let Err(e) = h.check_version() {
            self.push(PeerMessage::Error(e));
            return;
        }
        if self.expected_incarnation.is_some_and(|i| i != h.incarnation) {
            let message = format!(
                "{} is incarnation {} here; {} is retired (restored from a backup)",
                self.peer,
                self.expected_incarnation.map_or_else(String::new, |i| i.to_string()),
                h.incarnation
            );
            self.push(PeerMessage::Error(ProtocolError { code: ErrorCode::NotAuthorized, message }));
            return;
        }
        if h.appliance != self.peer {
            let message = format!("expected appliance {}, got {}", self.peer, h.appliance);
            self.push(PeerMessage::Error(ProtocolError { code: ErrorCode::NotAuthorized, message }));
            return;
        }
        let wants_ours = h.seen_session != Some(self.session);
        if self.peer_session == Some(h.session) {
            // A retransmission. Answer only if the peer has not seen our session yet
            // (our handshake was lost); answering every copy would never end.
            if wants_ours {
                self.queue_hello(replica);
            }
            return;
        }
        // A new session of the peer: restart every cursor from what it holds, and make
        // sure it has our handshake (it may have restarted and lost it).
        self.peer_session = Some(h.session);
        self.peer_incarnation = Some(h.incarnation);
        // What it had been sent of a snapshot is gone with its old session.
        self.serving.clear();
        if h.topology_epoch != self.epoch {
            self.events.push_back(SyncEvent::EpochDiffers { ours: self.epoch, theirs: h.topology_epoch });
            // Views differ: a stream flows only if the peer's view has it in scope too.
            for (stream, s) in self.streams.iter_mut() {
                if !h.streams.iter().any(|p| p.stream == *stream) {
                    s.send = false;
                    s.receive = false;
                }
            }
        }
        for pos in h.streams {
            if let Some(s) = self.streams.get_mut(&pos.stream) {
                s.acked = pos.vector.clone();
                s.sent = pos.vector;
                s.progress_ms = now_ms;
                s.lag.clear();
                s.not_covered.clear();
            }
        }
        self.events.push_back(SyncEvent::PeerSession { incarnation: h.incarnation });
        if wants_ours {
            self.queue_hello(replica);
        }
        self.pump_all(now_ms, replica);
    }

    /// Acknowledges our durable vector of `stream` to the peer.
    fn tell(&mut self, now_ms: u64, stream: StreamId, vector: VersionVector) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.told = vector.clone();
            s.told_at_ms = now_ms;
            s.ack_repeats_left = ACK_REPEATS;
        }
        self.push(PeerMessage::Ack { stream, vector });
    }

    fn on_entries(&mut self, now_ms: u64, stream: StreamId, entries: Vec<Entry>, replica: &dyn Replica) {
        if !self.streams.get(&stream).is_some_and(|s| s.receive) {
            let message = format!("{} may not send the {stream} stream to {}", self.peer, self.me);
            self.push(PeerMessage::Error(ProtocolError { code: ErrorCode::NotAuthorized, message }));
            return;
        }
        if self.queued_apply {
            // What the message carries, per origin: if all of it is durable already (a
            // retransmission), it is acknowledged now; else once its commit is done.
            let mut carried = VersionVector::new();
            for e in &entries {
                carried.advance(e.dot);
            }
            let result = replica.queue_apply(stream, entries);
            if result.is_ok() {
                let durable = replica.vector(stream);
                if durable.descends(&carried) {
                    self.tell(now_ms, stream, durable);
                } else {
                    self.queued = true;
                }
            }
            return self.applied(now_ms, stream, result, replica);
        }
        let result = replica.apply(stream, entries);
        if result.is_ok() {
            self.tell(now_ms, stream, replica.vector(stream));
        }
        self.applied(now_ms, stream, result, replica)
    }

    /// Answers a failed apply: a gap asks the peer to rewind to what we hold (once per
    /// retransmission interval: the messages behind the first gap are gaps too).
    fn applied(&mut self, now_ms: u64, stream: StreamId, result: Result<(), Error>, replica: &dyn Replica) {
        match result {
            Ok(()) => {}
            Err(Error::Gap { .. }) => {
                let config = self.config;
                let Some(s) = self.streams.get_mut(&stream) else { return };
                if !rewind_stands(s.rewind_asked_ms, now_ms, &config) {
                    s.rewind_asked_ms = Some(now_ms);
                    self.push(PeerMessage::Rewind { stream, vector: replica.vector(stream) })
                }
            }
            Err(e) => self.events.push_back(SyncEvent::ApplyFailed(e.to_string())),
        }
    }

    // ----- repair: anti-entropy and bootstrap, as the receiver ---------------------

    /// Starts repairing `stream` from the peer unless a repair runs: a replica that
    /// holds at most a chunk of keys fetches every bucket (a bootstrap: comparing trees
    /// could spare at most the keys it holds, and costs four round trips and the
    /// peer's tree); any other compares hash trees from the root down and fetches only
    /// differing leaves.
    fn start_repair(&mut self, now_ms: u64, stream: StreamId, replica: &dyn Replica) {
        if self.repairs.contains_key(&stream) || !self.streams.get(&stream).is_some_and(|s| s.receive) {
            return;
        }
        let step = if replica.key_count(stream) <= self.config.snapshot_chunk_entries {
            RepairStep::Fetch { buckets: Vec::new(), resume: Vec::new(), begun: false }
        } else {
            RepairStep::Tree { level: 0, asked: vec![0] }
        };
        self.repairs
            .insert(stream, Repair { step, at: None, cutoff_ms: now_ms, sent_ms: now_ms, entries: 0 });
        self.send_repair_request(now_ms, stream, replica);
    }

    fn send_repair_request(&mut self, now_ms: u64, stream: StreamId, replica: &dyn Replica) {
        let Some(r) = self.repairs.get_mut(&stream) else { return };
        r.sent_ms = now_ms;
        let m = match &r.step {
            RepairStep::Tree { level, asked } => PeerMessage::TreeRequest {
                stream,
                at: replica.vector(stream),
                expiry_cutoff_ms: r.cutoff_ms,
                level: *level,
                buckets: asked.clone(),
            },
            RepairStep::Fetch { buckets, resume, .. } => {
                PeerMessage::SnapshotRequest { stream, buckets: buckets.clone(), resume: resume.clone() }
            }
        };
        self.push(m);
    }

    fn on_tree_reply(
        &mut self,
        now_ms: u64,
        stream: StreamId,
        at: VersionVector,
        level: u8,
        hashes: Vec<BucketHash>,
        replica: &dyn Replica,
    ) {
        let Some(r) = self.repairs.get_mut(&stream) else { return };
        let RepairStep::Tree { level: want, asked } = &r.step else { return };
        if *want != level || hashes.iter().map(|h| h.bucket).ne(asked.iter().copied()) {
            return; // an answer to an earlier request, or a malformed one
        }
        self.stats.repair_hashes += hashes.len() as u64;
        let at = r.at.get_or_insert(at).clone();
        let (_, ours) = replica.tree_hashes(stream, r.cutoff_ms, level, asked);
        let differing: Vec<u32> =
            hashes.iter().zip(ours.iter()).filter(|(t, o)| t.hash != o.hash).map(|(t, _)| t.bucket).collect();
        if differing.is_empty() {
            // Equal trees: everything the peer held at `at` (or something newer) is here.
            self.repairs.remove(&stream);
            let done = replica
                .begin_snapshot(stream, self.peer.as_str(), Some(&[]))
                .and_then(|()| replica.finish_snapshot(stream, self.peer.as_str(), &at));
            self.repair_done(now_ms, stream, 0, 0, done, replica);
            return;
        }
        r.step = if level < TREE_LEAF_LEVEL {
            RepairStep::Tree {
                level: level + 1,
                asked: differing.iter().flat_map(|&b| children(b)).collect(),
            }
        } else if differing.len() as u32 > TREE_LEAVES / 2 {
            // Most leaves differ (a replica that holds little): fetching every key costs
            // at most about twice the bytes, and the sender walks its keys without
            // testing each against a list of tens of thousands of buckets.
            RepairStep::Fetch { buckets: Vec::new(), resume: Vec::new(), begun: false }
        } else {
            RepairStep::Fetch { buckets: differing, resume: Vec::new(), begun: false }
        };
        self.send_repair_request(now_ms, stream, replica);
    }

    fn on_snapshot_chunk(&mut self, now_ms: u64, chunk: PeerMessage, replica: &dyn Replica) {
        let PeerMessage::SnapshotChunk { stream, at, from, entries, checksum, resume: next, last } = chunk
        else {
            return;
        };
        let peer = self.peer.as_str().to_string();
        let Some(r) = self.repairs.get_mut(&stream) else { return };
        let RepairStep::Fetch { buckets, resume, begun } = &mut r.step else { return };
        if *resume != from {
            return; // a duplicate or an answer to an earlier request
        }
        if chunk_checksum(&entries) != checksum {
            self.send_repair_request(now_ms, stream, replica);
            return;
        }
        let at = r.at.get_or_insert(at).clone();
        let mut staged = Ok(());
        if !*begun {
            let covered = if buckets.is_empty() { None } else { Some(buckets.as_slice()) };
            staged = replica.begin_snapshot(stream, &peer, covered);
            *begun = true;
        }
        let count = entries.len() as u64;
        let staged = staged.and_then(|()| replica.stage_snapshot(stream, &peer, entries));
        r.entries += count;
        self.stats.repair_entries += count;
        if staged.is_err() || last {
            let fetched = if buckets.is_empty() { TREE_LEAVES as usize } else { buckets.len() };
            let entries = r.entries;
            self.repairs.remove(&stream);
            let done = staged.and_then(|()| replica.finish_snapshot(stream, &peer, &at));
            self.repair_done(now_ms, stream, fetched, entries, done, replica);
            return;
        }
        *resume = next;
        self.send_repair_request(now_ms, stream, replica);
    }

    fn repair_done(
        &mut self,
        now_ms: u64,
        stream: StreamId,
        buckets_fetched: usize,
        entries: u64,
        done: Result<(), Error>,
        replica: &dyn Replica,
    ) {
        match done {
            Ok(()) => {
                self.stats.repairs += 1;
                self.events.push_back(SyncEvent::Repaired { stream, buckets_fetched, entries });
                self.tell(now_ms, stream, replica.vector(stream));
            }
            Err(e) => self.events.push_back(SyncEvent::ApplyFailed(format!("repair of {stream}: {e}"))),
        }
    }

    // ----- repair, as the sender ----------------------------------------------------

    fn refuse(&mut self, what: String) {
        self.push(PeerMessage::Error(ProtocolError { code: ErrorCode::NotAuthorized, message: what }));
    }

    fn on_tree_request(
        &mut self,
        stream: StreamId,
        cutoff_ms: u64,
        level: u8,
        buckets: Vec<u32>,
        replica: &dyn Replica,
    ) {
        if !self.sends(stream) {
            return self.refuse(format!("{} may not read the {stream} tree of {}", self.peer, self.me));
        }
        if level > TREE_LEAF_LEVEL || buckets.iter().any(|&b| b >= buckets_at(level)) {
            return self.refuse(format!("tree request for level {level} names buckets outside it"));
        }
        let (at, hashes) = replica.tree_hashes(stream, cutoff_ms, level, &buckets);
        self.push(PeerMessage::TreeReply { stream, at, level, hashes });
    }

    fn on_snapshot_request(
        &mut self,
        stream: StreamId,
        buckets: Vec<u32>,
        resume: Vec<u8>,
        replica: &dyn Replica,
    ) {
        if !self.sends(stream) {
            return self.refuse(format!("{} may not read a {stream} snapshot of {}", self.peer, self.me));
        }
        if buckets.windows(2).any(|w| w[0] >= w[1]) || buckets.iter().any(|&b| b >= TREE_LEAVES) {
            return self.refuse("snapshot request buckets must be ascending leaf buckets".into());
        }
        let acknowledged =
            self.serving.get_mut(&stream).filter(|s| s.buckets == buckets && s.outstanding.contains(&resume));
        match acknowledged {
            Some(s) => {
                // The receiver took the chunk that ends at `resume` (and any before it).
                while s.outstanding.pop_front().is_some_and(|t| t != resume) {}
            }
            None => {
                let fresh = Serving { buckets, outstanding: VecDeque::new(), next: Some(resume) };
                self.serving.insert(stream, fresh);
            }
        }
        self.serve(stream, replica);
    }

    /// Sends snapshot chunks of `stream` until [`SNAPSHOT_CHUNKS_AHEAD`] are
    /// unacknowledged or the last is sent.
    fn serve(&mut self, stream: StreamId, replica: &dyn Replica) {
        let Some(s) = self.serving.get_mut(&stream) else { return };
        while s.outstanding.len() < SNAPSHOT_CHUNKS_AHEAD {
            let Some(from) = s.next.take() else { break };
            match replica.snapshot_chunk(stream, &s.buckets, &from, self.config.snapshot_chunk_entries) {
                Ok((at, entries, next)) => {
                    let checksum = chunk_checksum_encoded(&entries);
                    let last = next.is_empty();
                    if !last {
                        s.outstanding.push_back(next.clone());
                        s.next = Some(next.clone());
                    }
                    let chunk =
                        Outgoing::SnapshotChunk { stream, at, from, entries, checksum, resume: next, last };
                    self.stats.messages_sent += 1;
                    self.transmit.push_back(chunk);
                }
                Err(e) => {
                    self.events.push_back(SyncEvent::ApplyFailed(format!("snapshot of {stream}: {e}")));
                    s.outstanding.clear();
                    break;
                }
            }
        }
        if s.next.is_none() && s.outstanding.is_empty() {
            self.serving.remove(&stream);
        }
    }

    fn pump_all(&mut self, now_ms: u64, replica: &dyn Replica) {
        let streams: Vec<StreamId> = self.streams.keys().copied().collect();
        for stream in streams {
            self.pump(now_ms, stream, replica);
        }
    }

    /// Sends what the window allows of the entries the peer lacks.
    fn pump(&mut self, now_ms: u64, stream: StreamId, replica: &dyn Replica) {
        let me = replica.incarnation();
        let peer_incarnation = self.peer_incarnation;
        let config = self.config;
        let Some(s) = self.streams.get_mut(&stream) else { return };
        if !s.send {
            return;
        }
        let ours = replica.vector(stream);
        // Which origins may go to this peer now: our own always; another origin's only
        // once the peer's acknowledgement of it stood still for the relay delay, and
        // until the peer acknowledges more of it than we relayed.
        let mut from = s.sent.clone();
        for d in ours.iter() {
            let behind = s.acked.get(d.origin) < d.seq;
            if !behind {
                // It holds all we have of the origin: nothing of it to send.
                s.lag.remove(&d.origin);
                from.advance(d);
                continue;
            }
            if d.origin == me {
                continue;
            }
            if Some(d.origin) == peer_incarnation {
                // The peer wrote these itself, durably before anyone got them, so it
                // holds them whatever its last acknowledgement said (that one may
                // have been lost, and retention and tombstone collection wait on it).
                s.acked.advance(d);
                s.sent.advance(d);
                from.advance(d);
                continue;
            }
            let acked = s.acked.get(d.origin);
            let still = Lag { acked, since_ms: now_ms, relayed: None };
            let lag = s.lag.entry(d.origin).or_insert(still);
            match lag.relayed {
                // It gets the origin from elsewhere again: stop, and watch anew.
                Some(relayed) if acked > relayed => *lag = still,
                Some(_) => {}
                // It moved: whoever sends it the origin does.
                None if acked != lag.acked => *lag = still,
                None if now_ms >= lag.since_ms + config.relay_delay_ms => {
                    lag.relayed = Some(acked);
                    lag.since_ms = now_ms;
                }
                None => {}
            }
            if lag.relayed.is_none() {
                from.advance(Dot { origin: d.origin, seq: d.seq });
            }
        }
        let mut in_flight: u64 = s.sent.iter().map(|d| d.seq.saturating_sub(s.acked.get(d.origin))).sum();
        let mut batches = Vec::new();
        while in_flight < config.window_entries {
            // All the window's room in one read, cut into messages below: a read
            // starts at the frame holding `from`, so reading a message's worth at a
            // time read a frame of 1,000 entries four times.
            let room = (config.window_entries - in_flight) as usize;
            // Bounded by `ours`: an origin left out above is left out by setting its
            // `from` to what we held then, and a commit running meanwhile (entries
            // from another peer) may have made more of it durable since. Read
            // unbounded, those were sent to a peer that lacked the origin's earlier
            // entries: a gap at the receiver, which refused the whole message (the
            // soak's bursts of rewinds), and a relay the rules above did not allow.
            let batch = match replica.entries_between(stream, &from, &ours, room) {
                Ok(b) => b,
                Err(Error::NotCovered { origin, floor, .. }) => {
                    if let btree_map::Entry::Vacant(v) = s.not_covered.entry(origin) {
                        v.insert(now_ms);
                        batches.push(Outgoing::Message(PeerMessage::NotCovered { stream, origin, floor }));
                    }
                    // Skip that origin; the peer catches up on it by anti-entropy.
                    from.advance(Dot { origin, seq: ours.get(origin) });
                    continue;
                }
                Err(_) => break,
            };
            if batch.is_empty() {
                break;
            }
            for e in &batch {
                s.sent.advance(e.dot());
                from.advance(e.dot());
                if e.dot().origin != me {
                    self.stats.entries_relayed += 1;
                    if let Some(Lag { relayed: Some(r), .. }) = s.lag.get_mut(&e.dot().origin) {
                        *r = (*r).max(e.dot().seq);
                    }
                }
            }
            in_flight += batch.len() as u64;
            self.stats.entries_sent += batch.len() as u64;
            let mut rest = batch;
            while rest.len() > config.batch_entries.max(1) {
                let tail = rest.split_off(config.batch_entries.max(1));
                batches.push(Outgoing::Entries { stream, entries: rest });
                rest = tail;
            }
            batches.push(Outgoing::Entries { stream, entries: rest });
        }
        if s.acked.descends(&s.sent) {
            s.progressed(now_ms);
        }
        for m in batches {
            self.push_outgoing(m);
        }
    }
}

/// `NotCovered` is repeated after this many retransmit intervals while the peer has
/// not moved past the origin (it may have been lost, or the repair failed).
const NOT_COVERED_REPEAT: u64 = 4;

/// An acknowledgement is repeated this many times, this many retransmit intervals apart.
const ACK_REPEATS: u8 = 2;
const ACK_REPEAT_INTERVALS: u64 = 3;

/// blake3 over a chunk's encoded entries, in order.
fn chunk_checksum(entries: &[Entry]) -> [u8; 32] {
    checksum_in_runs(entries, Entry::encode_into)
}

/// [`chunk_checksum`] of the entries these encode (an entry has one encoding).
fn chunk_checksum_encoded(entries: &[EncodedEntry]) -> [u8; 32] {
    checksum_in_runs(entries, |e, run| run.extend_from_slice(e.as_bytes()))
}

const CHECKSUM_RUN_BYTES: usize = 64 * 1024;

/// blake3 over what `write` appends for each item, in order, hashed in runs of
/// [`CHECKSUM_RUN_BYTES`]: blake3 hashes a long input several 1 KiB chunks at a time
/// (SIMD), an entry at a time one 64-byte block at a time; the digest is the same.
fn checksum_in_runs<T>(items: &[T], write: impl Fn(&T, &mut Vec<u8>)) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let mut run = Vec::with_capacity(CHECKSUM_RUN_BYTES + 4096);
    for item in items {
        write(item, &mut run);
        if run.len() >= CHECKSUM_RUN_BYTES {
            h.update(&run);
            run.clear();
        }
    }
    h.update(&run);
    *h.finalize().as_bytes()
}

/// Retention feedback: the vector every peer a stream is sent to has acknowledged (the
/// meet of their acknowledged vectors). The log may be compacted below it; with no
/// such peer, everything local may be.
pub fn retention_horizon<'a>(
    machines: impl IntoIterator<Item = &'a PeerSync>,
    stream: StreamId,
    local: &VersionVector,
) -> VersionVector {
    machines
        .into_iter()
        .filter(|m| m.sends(stream))
        .map(|m| m.acked(stream).cloned().unwrap_or_default())
        .fold(local.clone(), |h, a| h.meet(&a))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use repl_wire::Collection;

    use super::*;
    use crate::storage::{SimConfig, SimStorage};
    use crate::store::Store;
    use crate::StoreOptions;

    fn store(seed: u64) -> Store {
        let options = StoreOptions {
            segment_bytes: 64 * 1024,
            incarnation_seed: Some(seed),
            ..StoreOptions::default()
        };
        Store::open(Arc::new(SimStorage::new(SimConfig::default())), options).expect("open")
    }

    fn both_ways() -> Scope {
        let all: BTreeSet<StreamId> = [StreamId::Enterprise].into_iter().collect();
        Scope { send: all.clone(), receive: all }
    }

    fn machine(
        me: &str,
        peer: &str,
        session: u64,
        peer_incarnation: Option<Incarnation>,
        s: &Store,
    ) -> PeerSync {
        let setup = SyncSetup {
            me: NodeId::new(me).expect("id"),
            peer: NodeId::new(peer).expect("id"),
            scope: both_ways(),
            epoch: 1,
            session,
            peer_incarnation,
            config: SyncConfig::default(),
        };
        PeerSync::new(setup, 0, s)
    }

    /// Exchanges messages and fires timers until neither side waits for anything;
    /// returns the time that took. Fails if the pair never goes quiet.
    /// Two stores and their machines, handshake done.
    fn established_pair() -> (Store, Store, PeerSync, PeerSync) {
        let (sa, sb) = (store(1), store(2));
        let mut a = machine("a", "b", 10, Some(sb.incarnation()), &sa);
        let mut b = machine("b", "a", 20, Some(sa.incarnation()), &sb);
        exchange(&mut a, &sa, &mut b, &sb);
        (sa, sb, a, b)
    }

    fn settle(a: &mut PeerSync, sa: &Store, b: &mut PeerSync, sb: &Store) -> u64 {
        let mut now = 0;
        for _ in 0..100 {
            exchange(a, sa, b, sb);
            let next = [a.poll_timeout(sa), b.poll_timeout(sb)].into_iter().flatten().min();
            let Some(t) = next else { return now };
            now = now.max(t);
            a.handle_timeout(now, sa);
            b.handle_timeout(now, sb);
        }
        panic!("the pair does not go quiet");
    }

    /// Delivers everything queued both ways until both sides are silent.
    fn exchange(a: &mut PeerSync, sa: &Store, b: &mut PeerSync, sb: &Store) -> usize {
        exchange_at(0, a, sa, b, sb)
    }

    /// [`exchange`] at time `now`.
    fn exchange_at(now: u64, a: &mut PeerSync, sa: &Store, b: &mut PeerSync, sb: &Store) -> usize {
        let mut delivered = 0;
        loop {
            let mut moved = false;
            while let Some(m) = a.poll_transmit() {
                b.handle_message(now, m, sb);
                moved = true;
                delivered += 1;
            }
            while let Some(m) = b.poll_transmit() {
                a.handle_message(now, m, sa);
                moved = true;
                delivered += 1;
            }
            if !moved {
                return delivered;
            }
            assert!(delivered < 10_000, "the exchange does not settle");
        }
    }

    #[test]
    fn a_chunk_checksum_over_encodings_is_the_one_the_receiver_computes_from_entries() {
        let s = store(1);
        for i in 0..300u32 {
            s.put(Collection::Users, format!("user{i:03}").as_bytes(), &vec![i as u8; i as usize])
                .expect("put");
        }
        let (_, encoded, _) = s.snapshot_chunk_encoded(StreamId::Enterprise, &[], &[], 1_000).expect("chunk");
        let decoded: Vec<Entry> = encoded.iter().map(|e| e.decode().expect("decodes")).collect();
        assert_eq!(encoded.len(), 300);
        assert_eq!(chunk_checksum_encoded(&encoded), chunk_checksum(&decoded));
        assert_ne!(chunk_checksum_encoded(&encoded[1..]), chunk_checksum(&decoded));
    }

    #[test]
    fn queued_entries_are_acknowledged_only_once_committed() {
        let (sa, sb) = (store(1), store(2));
        for i in 0..40u32 {
            sa.put(Collection::Users, format!("a{i}").as_bytes(), b"x").expect("put");
        }
        let mut a = machine("a", "b", 10, Some(sb.incarnation()), &sa);
        let mut b = machine("b", "a", 20, Some(sa.incarnation()), &sb);
        b.set_queued_apply(true);
        exchange(&mut a, &sa, &mut b, &sb);
        let ours = sa.vector(StreamId::Enterprise);
        // Received and queued, not yet durable: nothing acknowledged, and the driver
        // is told to commit.
        assert!(sb.vector(StreamId::Enterprise).is_empty());
        assert!(!a.acked(StreamId::Enterprise).expect("sends").descends(&ours));
        assert!(b.take_queued() && !b.take_queued());
        assert_eq!(sb.get(Collection::Users, b"a7").expect("get").value(), Some(&b"x"[..]));
        sb.flush().expect("commit");
        b.handle_local_durable(0, StreamId::Enterprise, &sb);
        exchange(&mut a, &sa, &mut b, &sb);
        assert!(a.acked(StreamId::Enterprise).expect("sends").descends(&ours));
        assert_eq!(sb.vector(StreamId::Enterprise), ours);
        // A retransmission of what is durable is acknowledged at once, with nothing queued.
        let again = sa.entries_since(StreamId::Enterprise, &VersionVector::new(), 10).expect("entries");
        b.handle_message(0, PeerMessage::Entries { stream: StreamId::Enterprise, entries: again }, &sb);
        assert!(!b.take_queued());
        assert!(
            matches!(b.poll_transmit(), Some(PeerMessage::Ack { vector, .. }) if vector == ours),
            "a retransmission is acknowledged with the durable vector"
        );
    }

    /// Origin O's entries `from..=to`, applied durably to `to_store`.
    fn take_from(origin: &Store, to_store: &Store, from: u64, to: u64) {
        let o = origin.incarnation();
        let since: VersionVector = [Dot { origin: o, seq: from - 1 }].into_iter().collect();
        let entries =
            origin.entries_since(StreamId::Enterprise, &since, (to + 1 - from) as usize).expect("ship");
        assert_eq!(entries.last().map(|e| e.dot.seq), Some(to));
        to_store.apply_remote(StreamId::Enterprise, entries).expect("apply").wait().expect("durable");
    }

    /// Takes what `m` transmits: the messages, and how many entries of `origin` they carry.
    fn relayed_sent(m: &mut PeerSync, origin: Incarnation) -> (u64, Vec<PeerMessage>) {
        let mut out = Vec::new();
        let mut n = 0;
        while let Some(msg) = m.poll_transmit() {
            if let PeerMessage::Entries { entries, .. } = &msg {
                n += entries.iter().filter(|e| e.dot.origin == origin).count() as u64;
            }
            out.push(msg);
        }
        (n, out)
    }

    /// A pair A-B, handshake done, and a third appliance O that made `writes` writes:
    /// A holds the first `held` of them, B none.
    fn pair_and_an_origin(writes: u32, held: u64) -> (Store, Store, Store, PeerSync, PeerSync) {
        let (sa, sb, so) = (store(1), store(2), store(3));
        for i in 0..writes {
            so.put(Collection::Users, format!("o{i}").as_bytes(), b"x").expect("put");
        }
        take_from(&so, &sa, 1, held);
        let mut a = machine("a", "b", 10, Some(sb.incarnation()), &sa);
        let mut b = machine("b", "a", 20, Some(sa.incarnation()), &sb);
        exchange(&mut a, &sa, &mut b, &sb);
        assert_eq!(a.stats().entries_relayed, 0, "nothing is relayed at once");
        (sa, sb, so, a, b)
    }

    #[test]
    fn an_origin_is_relayed_only_while_the_peers_acknowledgement_of_it_stands_still() {
        let (sa, sb, so, mut a, mut b) = pair_and_an_origin(20, 10);
        let o = so.incarnation();
        let delay = SyncConfig::default().relay_delay_ms;

        // B gets O's writes 1-5 from elsewhere and says so: it is behind, but moving.
        take_from(&so, &sb, 1, 5);
        b.handle_local_durable(600, StreamId::Enterprise, &sb);
        exchange_at(600, &mut a, &sa, &mut b, &sb);
        a.handle_timeout(delay + 200, &sa);
        assert_eq!(relayed_sent(&mut a, o).0, 0, "B's acknowledgement of O moved 400 ms ago");

        // It stood still for the relay delay: A relays what B lacks.
        a.handle_timeout(600 + delay, &sa);
        let (relayed, messages) = relayed_sent(&mut a, o);
        assert_eq!(relayed, 5);
        for m in messages {
            b.handle_message(600 + delay, m, &sb);
        }
        exchange_at(600 + delay, &mut a, &sa, &mut b, &sb);
        assert_eq!(sb.vector(StreamId::Enterprise).get(o), 10);

        // B gets O's 11-15 from elsewhere again, beyond what A relayed: A stops, even
        // for the O writes it then receives that B lacks.
        take_from(&so, &sb, 11, 15);
        b.handle_local_durable(700 + delay, StreamId::Enterprise, &sb);
        exchange_at(700 + delay, &mut a, &sa, &mut b, &sb);
        take_from(&so, &sa, 11, 20);
        a.handle_local_durable(700 + delay, StreamId::Enterprise, &sa);
        assert_eq!(relayed_sent(&mut a, o).0, 0, "B receives O from elsewhere again");
        assert_eq!(a.stats().entries_relayed, 5);
    }

    #[test]
    fn a_peers_own_writes_count_as_acknowledged_once_held() {
        let (sa, sb, mut a, _b) = established_pair();
        for i in 0..3u32 {
            sb.put(Collection::Users, format!("b{i}").as_bytes(), b"y").expect("put");
        }
        // A gets B's writes by another path and hears no acknowledgement of them (the
        // one B sent after writing was lost): B wrote them, so B holds them.
        take_from(&sb, &sa, 1, 3);
        a.handle_local_durable(0, StreamId::Enterprise, &sa);
        assert_eq!(a.acked(StreamId::Enterprise).expect("sends").get(sb.incarnation()), 3);
    }

    #[test]
    fn retransmissions_back_off_while_unacknowledged_and_start_over_after_an_ack() {
        let (sa, sb, mut a, mut b) = established_pair();
        let lose_all = |m: &mut PeerSync| while m.poll_transmit().is_some() {};
        sa.put(Collection::Users, b"u1", b"x").expect("put");
        a.handle_local_durable(0, StreamId::Enterprise, &sa);
        lose_all(&mut a);
        let retransmits_at = |a: &mut PeerSync, now: u64| {
            a.handle_timeout(now, &sa);
            while a.poll_transmit().is_some() {}
            a.stats().retransmits
        };
        let base = SyncConfig::default().retransmit_ms;
        assert_eq!(retransmits_at(&mut a, base - 1), 0);
        assert_eq!(retransmits_at(&mut a, base), 1);
        // The next waits twice as long, then four times.
        assert_eq!(retransmits_at(&mut a, 3 * base - 1), 1);
        assert_eq!(retransmits_at(&mut a, 3 * base), 2);
        assert_eq!(retransmits_at(&mut a, 7 * base - 1), 2);
        assert_eq!(retransmits_at(&mut a, 7 * base), 3);
        // Delivered and acknowledged: the next loss waits the first interval again.
        a.handle_timeout(15 * base, &sa);
        exchange_at(15 * base, &mut a, &sa, &mut b, &sb);
        assert_eq!(a.stats().retransmits, 4, "the fourth resend is the one delivered");
        sa.put(Collection::Users, b"u2", b"y").expect("put");
        a.handle_local_durable(15 * base, StreamId::Enterprise, &sa);
        lose_all(&mut a);
        assert_eq!(retransmits_at(&mut a, 16 * base), 5);
    }

    /// A store whose durable vector moves while the sync machine reads it: the first
    /// read of the log first applies `late` (another origin's entries a commit made
    /// durable meanwhile), as the node's commit task may at any moment.
    struct Racing<'a> {
        store: &'a Store,
        late: std::cell::RefCell<Vec<Entry>>,
    }

    impl Replica for Racing<'_> {
        fn incarnation(&self) -> Incarnation {
            self.store.incarnation()
        }
        fn vector(&self, stream: StreamId) -> VersionVector {
            self.store.vector(stream)
        }
        fn key_count(&self, stream: StreamId) -> usize {
            self.store.key_count(stream)
        }
        fn log_floors(&self, stream: StreamId) -> BTreeMap<Incarnation, u64> {
            self.store.log_floors(stream)
        }
        fn entries_between(
            &self,
            stream: StreamId,
            from: &VersionVector,
            upto: &VersionVector,
            max: usize,
        ) -> Result<Vec<EncodedEntry>, Error> {
            let late = std::mem::take(&mut *self.late.borrow_mut());
            if !late.is_empty() {
                self.store.apply(stream, late)?;
            }
            Replica::entries_between(self.store, stream, from, upto, max)
        }
        fn apply(&self, stream: StreamId, entries: Vec<Entry>) -> Result<(), Error> {
            Replica::apply(self.store, stream, entries)
        }
        fn queue_apply(&self, stream: StreamId, entries: Vec<Entry>) -> Result<(), Error> {
            self.store.queue_apply(stream, entries)
        }
        fn tree_hashes(
            &self,
            stream: StreamId,
            cutoff_ms: u64,
            level: u8,
            buckets: &[u32],
        ) -> (VersionVector, Vec<BucketHash>) {
            self.store.tree_hashes(stream, cutoff_ms, level, buckets)
        }
        fn snapshot_chunk(
            &self,
            stream: StreamId,
            buckets: &[u32],
            resume: &[u8],
            max_entries: usize,
        ) -> Result<(VersionVector, Vec<EncodedEntry>, Vec<u8>), Error> {
            self.store.snapshot_chunk_encoded(stream, buckets, resume, max_entries)
        }
        fn begin_snapshot(&self, stream: StreamId, peer: &str, buckets: Option<&[u32]>) -> Result<(), Error> {
            self.store.begin_snapshot(stream, peer, buckets)
        }
        fn stage_snapshot(&self, stream: StreamId, peer: &str, entries: Vec<Entry>) -> Result<(), Error> {
            self.store.stage_snapshot(stream, peer, entries)
        }
        fn finish_snapshot(&self, stream: StreamId, peer: &str, at: &VersionVector) -> Result<(), Error> {
            self.store.finish_snapshot(stream, peer, at)
        }
    }

    #[test]
    fn an_origin_made_durable_while_pumping_is_not_sent_to_a_peer_that_lacks_its_start() {
        // B is not behind on O for the relay delay yet: A sends it nothing of O.
        let (sa, sb, so, mut a, mut b) = pair_and_an_origin(10, 5);
        let o = so.incarnation();

        // A writes, and while its machine reads the log for the peer, O's writes 6-10
        // become durable on A (from another peer).
        sa.put(Collection::Users, b"a1", b"y").expect("put");
        let since: VersionVector = [Dot { origin: o, seq: 5 }].into_iter().collect();
        let late = so.entries_since(StreamId::Enterprise, &since, 5).expect("ship");
        let racing = Racing { store: &sa, late: std::cell::RefCell::new(late) };
        a.handle_local_durable(0, StreamId::Enterprise, &racing);
        assert_eq!(sa.vector(StreamId::Enterprise).get(o), 10, "the late entries landed mid-pump");
        let (relayed, messages) = relayed_sent(&mut a, o);
        assert_eq!(relayed, 0, "O's 6-10 went to a peer that lacks O's 1-5");
        for m in messages {
            b.handle_message(0, m, &sb);
        }
        // B applied A's write without a gap, and asks for no rewind.
        assert_eq!(sb.vector(StreamId::Enterprise).get(sa.incarnation()), 1);
        let (_, answers) = relayed_sent(&mut b, o);
        assert!(
            answers.iter().all(|m| !matches!(m, PeerMessage::Rewind { .. })),
            "B found a gap: {answers:?}"
        );
    }

    #[test]
    fn a_burst_of_rewinds_resends_the_window_once_per_interval() {
        let (sa, sb, mut a, mut b) = established_pair();
        let o = sa.incarnation();
        let rewinds_asked = |m: &mut PeerSync| {
            relayed_sent(m, o).1.iter().filter(|m| matches!(m, PeerMessage::Rewind { .. })).count()
        };
        for i in 0..600u32 {
            sa.put(Collection::Users, format!("k{i}").as_bytes(), b"x").expect("put");
        }
        a.handle_local_durable(0, StreamId::Enterprise, &sa);
        assert_eq!(relayed_sent(&mut a, o).0, 600, "the first window");
        // The receiver finds a gap in every message of the window that was in flight
        // behind the first one (here: all of them skip the first entry).
        let since: VersionVector = [Dot { origin: o, seq: 1 }].into_iter().collect();
        let late = sa.entries_since(StreamId::Enterprise, &since, 256).expect("entries");
        for _ in 0..5 {
            let m = PeerMessage::Entries { stream: StreamId::Enterprise, entries: late.clone() };
            b.handle_message(10, m, &sb);
        }
        assert_eq!(rewinds_asked(&mut b), 1, "the receiver asks once per interval");
        let rewind = PeerMessage::Rewind { stream: StreamId::Enterprise, vector: VersionVector::new() };
        for _ in 0..5 {
            a.handle_message(20, rewind.clone(), &sa);
        }
        assert_eq!(relayed_sent(&mut a, o).0, 600, "five rewinds at once resend the window once");
        assert_eq!(a.stats().rewinds, 1);
        // An interval later a rewind is a new one (the resent window may have been lost).
        let later = 20 + SyncConfig::default().retransmit_ms;
        a.handle_message(later, rewind, &sa);
        assert_eq!(relayed_sent(&mut a, o).0, 600);
        b.handle_message(later, PeerMessage::Entries { stream: StreamId::Enterprise, entries: late }, &sb);
        assert_eq!(rewinds_asked(&mut b), 1, "and the receiver asks again");
    }

    #[test]
    fn two_replicas_converge_and_go_quiet() {
        let (sa, sb) = (store(1), store(2));
        for i in 0..50u32 {
            sa.put(Collection::Users, format!("a{i}").as_bytes(), b"x").expect("put");
            sb.put(Collection::Users, format!("b{i}").as_bytes(), b"y").expect("put");
        }
        let mut a = machine("a", "b", 10, Some(sb.incarnation()), &sa);
        let mut b = machine("b", "a", 20, Some(sa.incarnation()), &sb);
        exchange(&mut a, &sa, &mut b, &sb);
        assert!(a.is_established() && b.is_established());
        assert_eq!(
            sa.digest(StreamId::Enterprise).expect("digest"),
            sb.digest(StreamId::Enterprise).expect("digest")
        );
        // Only the acknowledgements' bounded repeats remain, then nothing.
        let quiet_after_ms = settle(&mut a, &sa, &mut b, &sb);
        assert!(
            quiet_after_ms <= 10 * SyncConfig::default().retransmit_ms,
            "quiet after {quiet_after_ms} ms"
        );
        assert_eq!(a.poll_timeout(&sa), None, "nothing in flight, nothing to wait for");
        // Live push: a new write flows at once.
        sa.put(Collection::Users, b"late", b"z").expect("put");
        a.handle_local_durable(0, StreamId::Enterprise, &sa);
        exchange(&mut a, &sa, &mut b, &sb);
        assert_eq!(sb.get(Collection::Users, b"late").expect("read").value(), Some(&b"z"[..]));
    }

    fn small_log_store(seed: u64) -> Store {
        let options = StoreOptions {
            segment_bytes: 16 * 1024,
            log_retained_bytes_max: 16 * 1024,
            incarnation_seed: Some(seed),
            ..StoreOptions::default()
        };
        Store::open(Arc::new(SimStorage::new(SimConfig::default())), options).expect("open")
    }

    fn digests_equal(a: &Store, b: &Store) -> bool {
        a.digest(StreamId::Enterprise).expect("digest") == b.digest(StreamId::Enterprise).expect("digest")
    }

    #[test]
    fn a_peer_behind_a_compacted_log_is_repaired_by_comparing_hash_trees() {
        let (sa, sb) = (small_log_store(1), small_log_store(2));
        for i in 0..2_000u32 {
            sa.put(Collection::Users, format!("user{i}").as_bytes(), b"first").expect("put");
        }
        let mut a = machine("a", "b", 10, None, &sa);
        let mut b = machine("b", "a", 20, None, &sb);
        exchange(&mut a, &sa, &mut b, &sb);
        assert!(digests_equal(&sa, &sb));
        // b goes away; a changes 100 keys and compacts its log past what b holds.
        drop((a, b));
        // Rewritten a few times with large values, so the log rolls over many segments
        // (the keys that differ are still 100).
        for round in 0..3u8 {
            for i in 0..100u32 {
                sa.put(Collection::Users, format!("user{}", i * 7).as_bytes(), &[round; 1024]).expect("put");
            }
        }
        sa.compact(StreamId::Enterprise, &VersionVector::new()).expect("compact");
        assert!(sa.entries_since(StreamId::Enterprise, &sb.vector(StreamId::Enterprise), 10).is_err());
        let mut a = machine("a", "b", 11, None, &sa);
        let mut b = machine("b", "a", 21, None, &sb);
        exchange(&mut a, &sa, &mut b, &sb);
        assert!(digests_equal(&sa, &sb), "repaired replicas must be equal");
        assert_eq!(sb.vector(StreamId::Enterprise), sa.vector(StreamId::Enterprise));
        let st = b.stats();
        assert_eq!(st.repairs, 1);
        // Cost follows the difference: about one key per differing leaf, not 2,000.
        assert!(
            (100..=200).contains(&st.repair_entries),
            "{} entries fetched for 100 changed keys",
            st.repair_entries
        );
        assert!(std::iter::from_fn(|| b.poll_event()).any(|e| matches!(e, SyncEvent::Repaired { .. })));
        // Quiet afterwards, and live writes flow again.
        settle(&mut a, &sa, &mut b, &sb);
        assert_eq!(b.poll_timeout(&sb), None);
        sa.put(Collection::Users, b"after", b"x").expect("put");
        a.handle_local_durable(0, StreamId::Enterprise, &sa);
        exchange(&mut a, &sa, &mut b, &sb);
        assert!(digests_equal(&sa, &sb));
    }

    #[test]
    fn a_not_covered_behind_what_the_receiver_holds_starts_no_repair_and_tells_what_it_holds() {
        let (sa, sb, mut a, mut b) = established_pair();
        for i in 0..10u32 {
            sa.put(Collection::Users, format!("user{i}").as_bytes(), b"x").expect("put");
        }
        a.handle_local_durable(0, StreamId::Enterprise, &sa);
        exchange(&mut a, &sa, &mut b, &sb);
        let origin = sa.incarnation();
        assert_eq!(sb.vector(StreamId::Enterprise).get(origin), 10);
        let sent = |b: &mut PeerSync| std::iter::from_fn(|| b.poll_transmit()).collect::<Vec<_>>();
        let repairs = |sent: &[PeerMessage]| {
            sent.iter()
                .filter(|m| {
                    matches!(m, PeerMessage::TreeRequest { .. } | PeerMessage::SnapshotRequest { .. })
                })
                .count()
        };
        let held = sb.vector(StreamId::Enterprise);
        // The peer's log starts at 11 (or lower): it follows on from what b holds. The
        // peer is told what b holds, so it sends from there (and stops repeating).
        for floor in [3, 11] {
            let stale = PeerMessage::NotCovered { stream: StreamId::Enterprise, origin, floor };
            b.handle_message(0, stale, &sb);
            let out = sent(&mut b);
            assert_eq!(repairs(&out), 0, "a repair for a log floor of {floor}");
            assert!(
                out.iter().any(|m| matches!(m, PeerMessage::Ack { vector, .. } if *vector == held)),
                "a stale NotCovered (floor {floor}) must be answered with what b holds: {out:?}"
            );
        }
        // A floor past what b holds leaves a gap: that one repairs.
        let gap = PeerMessage::NotCovered { stream: StreamId::Enterprise, origin, floor: 12 };
        b.handle_message(0, gap, &sb);
        assert_eq!(repairs(&sent(&mut b)), 1);
        assert!(std::iter::from_fn(|| b.poll_event()).any(|e| matches!(e, SyncEvent::NeedAntiEntropy { .. })));
    }

    #[test]
    fn a_new_replica_bootstraps_in_chunks_and_resumes_after_a_lost_chunk() {
        let (sa, sc) = (small_log_store(1), small_log_store(3));
        for i in 0..1_500u32 {
            sa.put(Collection::Users, format!("user{i}").as_bytes(), format!("v{i}").as_bytes())
                .expect("put");
        }
        sa.delete(Collection::Users, b"user3").expect("delete");
        sa.compact(StreamId::Enterprise, &VersionVector::new()).expect("compact");
        let config = SyncConfig { snapshot_chunk_entries: 100, ..SyncConfig::default() };
        let setup = |me: &str, peer: &str, session| SyncSetup {
            me: NodeId::new(me).expect("id"),
            peer: NodeId::new(peer).expect("id"),
            scope: both_ways(),
            epoch: 1,
            session,
            peer_incarnation: None,
            config,
        };
        let mut a = PeerSync::new(setup("a", "c", 1), 0, &sa);
        let mut c = PeerSync::new(setup("c", "a", 2), 0, &sc);
        let (mut now, mut chunks, mut dropped, mut most_ahead) = (0u64, 0, false, 0);
        for _ in 0..10_000 {
            let mut moved = false;
            let mut ahead = 0;
            while let Some(m) = a.poll_transmit() {
                moved = true;
                if matches!(m, PeerMessage::SnapshotChunk { .. }) {
                    chunks += 1;
                    ahead += 1;
                    most_ahead = most_ahead.max(ahead);
                    if chunks == 5 && !dropped {
                        dropped = true;
                        continue; // lost in transit
                    }
                }
                c.handle_message(now, m, &sc);
            }
            while let Some(m) = c.poll_transmit() {
                moved = true;
                a.handle_message(now, m, &sa);
            }
            if !moved {
                match c.poll_timeout(&sc) {
                    Some(t) => {
                        now = now.max(t);
                        c.handle_timeout(now, &sc);
                    }
                    None => break,
                }
            }
        }
        assert!(dropped && chunks > 10, "{chunks} chunks");
        // The sender keeps chunks in flight rather than one per round trip, and no
        // more than its window.
        assert!((2..=SNAPSHOT_CHUNKS_AHEAD).contains(&most_ahead), "{most_ahead} chunks sent at once");
        assert!(digests_equal(&sa, &sc));
        assert_eq!(sc.get(Collection::Users, b"user3").expect("read").value(), None);
        assert_eq!(sc.get(Collection::Users, b"user1499").expect("read").value(), Some(&b"v1499"[..]));
        assert_eq!(sc.vector(StreamId::Enterprise), sa.vector(StreamId::Enterprise));
        // The repair is durable: it survives a reopen.
        let storage = sc.storage().clone();
        drop((c, sc));
        let reopened =
            Store::open(storage, StoreOptions { incarnation_seed: Some(3), ..StoreOptions::default() })
                .expect("reopen");
        assert!(digests_equal(&sa, &reopened));
        assert_eq!(reopened.vector(StreamId::Enterprise), sa.vector(StreamId::Enterprise));
    }

    #[test]
    fn a_retired_incarnation_and_an_unknown_major_version_are_refused() {
        let (sa, sb) = (store(1), store(2));
        // `a` expects b's incarnation to be 999 (b was restored since): refuse b.
        let mut a = machine("a", "b", 10, Some(Incarnation(999)), &sa);
        let mut b = machine("b", "a", 20, None, &sb);
        exchange(&mut a, &sa, &mut b, &sb);
        assert!(!a.is_established());
        assert!(std::iter::from_fn(|| b.poll_event())
            .any(|e| matches!(e, SyncEvent::PeerError(ref p) if p.code == ErrorCode::NotAuthorized)));

        let mut c = machine("a", "b", 11, None, &sa);
        let mut hello = match machine("b", "a", 21, None, &sb).poll_transmit() {
            Some(PeerMessage::Hello(h)) => h,
            other => panic!("expected a hello, got {other:?}"),
        };
        hello.major = PROTOCOL_MAJOR + 1;
        let _ = c.poll_transmit();
        c.handle_message(0, PeerMessage::Hello(hello), &sa);
        assert!(!c.is_established());
        assert!(
            matches!(c.poll_transmit(), Some(PeerMessage::Error(ref p)) if p.code == ErrorCode::UnsupportedVersion)
        );
    }

    #[test]
    fn entries_outside_the_scope_are_refused() {
        let (sa, sb) = (store(1), store(2));
        sb.append_audit(repl_wire::AuditEvent {
            time_ms: 1,
            user: "u".into(),
            appliance: "b".into(),
            action: "login".into(),
            detail: String::new(),
        })
        .expect("audit");
        let mut a = machine("a", "b", 10, None, &sa);
        let mut b = machine("b", "a", 20, None, &sb);
        exchange(&mut a, &sa, &mut b, &sb);
        let entries = sb.entries_since(StreamId::Audit, &VersionVector::new(), 10).expect("read");
        a.handle_message(0, PeerMessage::Entries { stream: StreamId::Audit, entries }, &sa);
        assert!(sa.vector(StreamId::Audit).is_empty(), "nothing applied");
        assert!(
            matches!(a.poll_transmit(), Some(PeerMessage::Error(ref p)) if p.code == ErrorCode::NotAuthorized)
        );
    }
}
