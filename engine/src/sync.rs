//! Replication between two appliances: a sans-IO state machine per peer.
//!
//! # Driving contract
//! The driver (the simulator in `tests/`, or the node runtime) owns the transport and
//! the clock. It feeds the machine inputs and drains its outputs:
//! - inputs: [`PeerSync::handle_message`] for every message from the peer,
//!   [`PeerSync::handle_local_durable`] whenever new entries became durable in a
//!   stream (local writes or entries applied from other peers), and
//!   [`PeerSync::handle_timeout`] once [`PeerSync::poll_timeout`]'s time has come;
//! - outputs: [`PeerSync::poll_transmit`] until `None` after every input (messages to
//!   send to the peer, in order), [`PeerSync::poll_event`] for what the driver must
//!   act on, and [`PeerSync::poll_timeout`] for when to call back.
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
//! entries are relayed only when the peer still lags on that origin after
//! `relay_delay_ms` (no flooding: in steady state each write crosses the network
//! once per replica). A peer below the log floor gets `NotCovered` (anti-entropy).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use repl_wire::{
    Dot, Entry, ErrorCode, Handshake, Incarnation, NodeId, PeerMessage, ProtocolError, StreamId,
    StreamPosition, VersionVector, PROTOCOL_MAJOR, PROTOCOL_MINOR,
};

use crate::error::Error;
use crate::store::Store;
use crate::topology::Scope;

/// The local store as the sync machine sees it.
pub trait Replica {
    /// This appliance's incarnation.
    fn incarnation(&self) -> Incarnation;
    /// The durable vector of a stream.
    fn vector(&self, stream: StreamId) -> VersionVector;
    /// Per origin, the lowest sequence the stream's log holds.
    fn log_floors(&self, stream: StreamId) -> BTreeMap<Incarnation, u64>;
    /// Durable entries above `from` in log order, at most `max`.
    fn entries_since(&self, stream: StreamId, from: &VersionVector, max: usize) -> Result<Vec<Entry>, Error>;
    /// Applies entries from a peer durably (duplicates skipped, gaps refused).
    fn apply(&self, stream: StreamId, entries: Vec<Entry>) -> Result<(), Error>;
}

impl Replica for Store {
    fn incarnation(&self) -> Incarnation {
        Store::incarnation(self)
    }
    fn vector(&self, stream: StreamId) -> VersionVector {
        Store::vector(self, stream)
    }
    fn log_floors(&self, stream: StreamId) -> BTreeMap<Incarnation, u64> {
        Store::log_floors(self, stream)
    }
    fn entries_since(&self, stream: StreamId, from: &VersionVector, max: usize) -> Result<Vec<Entry>, Error> {
        Store::entries_since(self, stream, from, max)
    }
    fn apply(&self, stream: StreamId, entries: Vec<Entry>) -> Result<(), Error> {
        self.apply_remote(stream, entries)?.wait().map(|_| ())
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
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig { window_entries: 4096, batch_entries: 256, retransmit_ms: 200, relay_delay_ms: 1_000 }
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
    /// Entries from the peer could not be applied (not a gap).
    ApplyFailed(String),
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
    /// Per origin (not us): since when the peer lags on it.
    lag_since: BTreeMap<Incarnation, u64>,
    /// Origins we reported `NotCovered` for in this session.
    not_covered: BTreeSet<Incarnation>,
    /// The vector we last acknowledged to the peer.
    told: VersionVector,
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
    transmit: VecDeque<PeerMessage>,
    events: VecDeque<SyncEvent>,
    stats: SyncStats,
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
        };
        m.queue_hello(replica);
        m
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
                "{stream}: ours={} acked={} sent={} lag={:?}; ",
                replica.vector(*stream),
                s.acked,
                s.sent,
                s.lag_since
            ));
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

    /// Next message to send to the peer.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<PeerMessage> {
        self.transmit.pop_front()
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
        for (stream, s) in &self.streams {
            if !s.send {
                continue;
            }
            if !s.acked.descends(&s.sent) {
                at(s.progress_ms + self.config.retransmit_ms);
            }
            // A relay timer matters only while the origin's entries are not yet sent.
            let ours = replica.vector(*stream);
            for (origin, since) in &s.lag_since {
                if ours.get(*origin) > s.sent.get(*origin) {
                    at(since + self.config.relay_delay_ms);
                }
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
        for s in self.streams.values_mut() {
            if s.send && !s.acked.descends(&s.sent) && now_ms >= s.progress_ms + self.config.retransmit_ms {
                // Lost in transit (or only slow): send again from what the peer holds.
                s.sent = s.acked.clone();
                s.progress_ms = now_ms;
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
                    s.told = vector.clone();
                    self.push(PeerMessage::Ack { stream, vector });
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
            PeerMessage::Entries { stream, entries } => self.on_entries(stream, entries, replica),
            PeerMessage::Ack { stream, vector } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    if !s.acked.descends(&vector) {
                        s.acked.merge(&vector);
                        s.progress_ms = now_ms;
                    }
                    s.sent.merge(&s.acked);
                }
                self.pump(now_ms, stream, replica);
            }
            PeerMessage::Rewind { stream, vector } => {
                self.stats.rewinds += 1;
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.acked.merge(&vector);
                    s.sent = s.acked.clone();
                    s.progress_ms = now_ms;
                }
                self.pump(now_ms, stream, replica);
            }
            PeerMessage::NotCovered { stream, origin, floor } => {
                self.events.push_back(SyncEvent::NeedAntiEntropy { stream, origin, floor });
            }
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
        for pos in h.streams {
            if let Some(s) = self.streams.get_mut(&pos.stream) {
                s.acked = pos.vector.clone();
                s.sent = pos.vector;
                s.progress_ms = now_ms;
                s.lag_since.clear();
                s.not_covered.clear();
            }
        }
        self.events.push_back(SyncEvent::PeerSession { incarnation: h.incarnation });
        if wants_ours {
            self.queue_hello(replica);
        }
        self.pump_all(now_ms, replica);
    }

    fn on_entries(&mut self, stream: StreamId, entries: Vec<Entry>, replica: &dyn Replica) {
        if !self.streams.get(&stream).is_some_and(|s| s.receive) {
            let message = format!("{} may not send the {stream} stream to {}", self.peer, self.me);
            self.push(PeerMessage::Error(ProtocolError { code: ErrorCode::NotAuthorized, message }));
            return;
        }
        match replica.apply(stream, entries) {
            Ok(()) => {
                let vector = replica.vector(stream);
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.told = vector.clone();
                }
                self.push(PeerMessage::Ack { stream, vector })
            }
            Err(Error::Gap { .. }) => {
                self.push(PeerMessage::Rewind { stream, vector: replica.vector(stream) })
            }
            Err(e) => self.events.push_back(SyncEvent::ApplyFailed(e.to_string())),
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
        // once the peer has lagged on it for the relay delay.
        let mut from = s.sent.clone();
        for d in ours.iter() {
            let behind = s.acked.get(d.origin) < d.seq;
            if !behind {
                s.lag_since.remove(&d.origin);
                continue;
            }
            if d.origin == me {
                continue;
            }
            if Some(d.origin) == peer_incarnation {
                // The peer wrote these itself; an older acknowledgement only looks behind.
                from.advance(Dot { origin: d.origin, seq: d.seq });
                continue;
            }
            let since = *s.lag_since.entry(d.origin).or_insert(now_ms);
            let relay = now_ms >= since + config.relay_delay_ms;
            if !relay {
                from.advance(Dot { origin: d.origin, seq: d.seq });
            }
        }
        let mut in_flight: u64 = s.sent.iter().map(|d| d.seq.saturating_sub(s.acked.get(d.origin))).sum();
        let mut batches = Vec::new();
        while in_flight < config.window_entries {
            let room = (config.window_entries - in_flight).min(config.batch_entries as u64) as usize;
            let batch = match replica.entries_since(stream, &from, room) {
                Ok(b) => b,
                Err(Error::NotCovered { origin, floor, .. }) => {
                    if s.not_covered.insert(origin) {
                        batches.push(PeerMessage::NotCovered { stream, origin, floor });
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
                s.sent.advance(e.dot);
                from.advance(e.dot);
                if e.dot.origin != me {
                    self.stats.entries_relayed += 1;
                }
            }
            in_flight += batch.len() as u64;
            self.stats.entries_sent += batch.len() as u64;
            batches.push(PeerMessage::Entries { stream, entries: batch });
        }
        if s.acked.descends(&s.sent) {
            s.progress_ms = now_ms;
        }
        for m in batches {
            self.push(m);
        }
    }
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

    /// Delivers everything queued both ways until both sides are silent.
    fn exchange(a: &mut PeerSync, sa: &Store, b: &mut PeerSync, sb: &Store) -> usize {
        let mut delivered = 0;
        loop {
            let mut moved = false;
            while let Some(m) = a.poll_transmit() {
                b.handle_message(0, m, sb);
                moved = true;
                delivered += 1;
            }
            while let Some(m) = b.poll_transmit() {
                a.handle_message(0, m, sa);
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
        assert_eq!(a.poll_timeout(&sa), None, "nothing in flight, nothing to wait for");
        // Live push: a new write flows at once.
        sa.put(Collection::Users, b"late", b"z").expect("put");
        a.handle_local_durable(0, StreamId::Enterprise, &sa);
        exchange(&mut a, &sa, &mut b, &sb);
        assert_eq!(sb.get(Collection::Users, b"late").expect("read").value(), Some(&b"z"[..]));
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
