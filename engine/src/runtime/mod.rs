//! The node runtime (feature `runtime`): drives one [`PeerSync`](crate::sync::PeerSync)
//! per in-scope peer over QUIC with mutual TLS, serves the client protocol, and keeps
//! the counters behind the metrics. This is the only part of the engine that touches
//! tokio, sockets and the wall clock; the machines it drives are the ones the
//! simulator drives.
//!
//! Connections: of each pair of appliances the one with the smaller id dials, the
//! other accepts; the dialer reconnects with jittered exponential backoff. One
//! bidirectional stream per connection carries every message of a peer session, in
//! order. Clients (agents, admins, G4 service appliances) speak `repl-client/1`: one
//! bidirectional stream per request. A local write made directly on the [`Store`]
//! must be announced with [`Node::notify`]; writes served over the client protocol
//! announce themselves, and entries applied from one peer wake every other session,
//! which pushes or relays them.

mod client;
mod maintain;
mod metrics;
mod peer;
mod serve;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use repl_wire::transport::{server_endpoint, TlsSetup, TransportError};
use repl_wire::{Collection, Incarnation, NodeId, StreamId, VersionVector, ALPN_CLIENT, ALPN_PEER};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use client::{ClientError, RemoteStore, RemoteTarget};
pub use maintain::MaintenanceConfig;
pub use metrics::{serve_http, HttpError};

use crate::records::{Record, TopologyRecord};
use crate::storage::{write_file_atomically, SyncLatency};
use crate::store::Store;
use crate::sync::SyncConfig;
use crate::topology::Topology;

/// How a G4 database appliance acknowledges client writes with respect to its pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PairMode {
    /// Acknowledge once durable here; the pair catches up asynchronously.
    #[default]
    Async,
    /// Acknowledge only once the other database appliance holds the write durably too.
    Sync {
        /// How long to wait for the pair's acknowledgement.
        timeout_ms: u64,
        /// What to do when it does not come in time.
        on_timeout: PairTimeout,
    },
}

/// What synchronous pair mode does when the pair does not confirm in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairTimeout {
    /// Answer the client `Unavailable` (the write is durable here and will still
    /// replicate; a retry with the same idempotency key returns the same token once the
    /// pair confirms).
    FailClosed,
    /// Acknowledge anyway, count it and raise the degraded alarm.
    Degrade,
}

/// How the node serves clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeConfig {
    /// How long a read carrying a causal token waits for that write to arrive.
    pub causal_wait_ms: u64,
    /// Synchronous pair mode (G4 database appliances only).
    pub pair: PairMode,
    /// How long answered requests are remembered for retries, in milliseconds.
    pub request_ttl_ms: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig { causal_wait_ms: 5_000, pair: PairMode::Async, request_ttl_ms: 600_000 }
    }
}

/// What a node needs to run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This appliance.
    pub me: NodeId,
    /// The enterprise topology (its addresses are where peers are dialed).
    pub topology: Topology,
    /// Mutual TLS: the enterprise CA, this appliance's certificate and the allowed peers.
    pub tls: TlsSetup,
    /// Where to accept peers and clients.
    pub listen: SocketAddr,
    /// Sync tunables.
    pub sync: SyncConfig,
    /// Client-protocol tunables.
    pub serve: ServeConfig,
    /// G4 service appliances: the database appliances client calls are forwarded to.
    pub upstream: Option<RemoteStore>,
    /// The data directory's fsync latency histogram, for the metrics.
    pub sync_latency: Option<Arc<SyncLatency>>,
    /// Where an installed CRL is kept (so it applies again after a restart).
    pub crl_file: Option<std::path::PathBuf>,
    /// Where a committed topology change is kept (so it applies after a restart).
    pub topology_file: Option<std::path::PathBuf>,
    /// Start even though this appliance is not in the topology: it waits to be added
    /// by a topology change (it votes on it), then connects and bootstraps.
    pub pending: bool,
    /// Compaction below the peers' acknowledgements, tombstone collection, checkpoints.
    pub maintenance: MaintenanceConfig,
}

impl NodeConfig {
    /// A configuration with the sync tunables for QUIC ([`SyncConfig::over_quic`]),
    /// default serving tunables, no upstream and no fsync histogram.
    pub fn new(me: NodeId, topology: Topology, tls: TlsSetup, listen: SocketAddr) -> NodeConfig {
        NodeConfig {
            me,
            topology,
            tls,
            listen,
            sync: SyncConfig::over_quic(),
            serve: ServeConfig::default(),
            upstream: None,
            sync_latency: None,
            crl_file: None,
            topology_file: None,
            pending: false,
            maintenance: MaintenanceConfig::default(),
        }
    }
}

/// The database appliances of a G4 `topology` as client targets: those of `site`
/// first, then the others, each group in topology order.
pub fn database_targets(topology: &Topology, site: &str) -> Vec<RemoteTarget> {
    let mut dbs: Vec<&crate::topology::Appliance> =
        topology.appliances.iter().filter(|a| a.has(crate::topology::Role::Database)).collect();
    dbs.sort_by_key(|a| a.site != site);
    dbs.into_iter().map(|a| RemoteTarget { id: a.id.clone(), address: a.address }).collect()
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The listen address could not be bound (in use, or not ours).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: TransportError,
    },
    /// This appliance is not in the topology it was given.
    #[error("appliance {0} is not in the topology")]
    NotInTopology(NodeId),
    /// The store refused a write at start (its incarnation record).
    #[error("store: {0}")]
    Store(crate::Error),
}

/// Per peer and stream: how far behind the peer is on what this node sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLag {
    /// The stream.
    pub stream: StreamId,
    /// Entries this node holds that the peer has not acknowledged.
    pub entries: u64,
    /// How long the peer has been behind, in milliseconds (0 when caught up).
    pub behind_ms: u64,
}

/// What a node knows of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer.
    pub id: NodeId,
    /// Whether a session is established now.
    pub connected: bool,
    /// Sessions established so far.
    pub sessions: u64,
    /// Lag per stream this node sends the peer.
    pub lag: Vec<StreamLag>,
    /// Entries received from and sent to the peer.
    pub entries_in: u64,
    /// Entries sent (retransmissions included).
    pub entries_out: u64,
    /// Of those, entries another appliance wrote (relayed to a peer that lagged on them).
    pub entries_relayed: u64,
    /// Times the peer asked to be sent again from what it holds (a gap).
    pub rewinds: u64,
    /// Times entries went unacknowledged so long that sending restarted from what the
    /// peer acknowledged (resending what was in flight).
    pub retransmits: u64,
    /// UDP bytes received on the peer's connections.
    pub bytes_in: u64,
    /// UDP bytes sent.
    pub bytes_out: u64,
}

/// Counters of a running node, for status pages and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// Peers with an established session.
    pub connected: Vec<NodeId>,
    /// Connections refused (bad certificate, unknown appliance, wrong protocol).
    pub refused: u64,
    /// Errors raised by sessions (a peer's protocol error, a failed apply), newest last.
    pub errors: Vec<String>,
    /// Every in-scope peer.
    pub peers: Vec<PeerStatus>,
    /// Client requests served, and how many of them failed.
    pub client_requests: u64,
    /// Client requests answered with an error.
    pub client_errors: u64,
    /// Writes acknowledged without the pair's confirmation (synchronous mode degraded).
    pub pair_degraded: u64,
    /// Log segments compacted away since the node started.
    pub segments_compacted: u64,
    /// Compactions that went below a peer's acknowledgement because the log reached its
    /// retention limit (an alarm: that peer repairs by anti-entropy).
    pub compactions_forced: u64,
    /// Tombstones collected since the node started.
    pub tombstones_collected: u64,
}

/// The most session errors a status keeps.
const ERRORS_KEPT: usize = 64;

#[derive(Debug, Default)]
struct PeerState {
    /// Live sessions (an old session of a restarted peer may linger until its
    /// connection times out, beside the new one).
    live: u32,
    sessions: u64,
    sends: BTreeSet<StreamId>,
    acked: BTreeMap<StreamId, VersionVector>,
    behind: BTreeMap<StreamId, Behind>,
    entries_in: u64,
    entries_out: u64,
    entries_relayed: u64,
    rewinds: u64,
    retransmits: u64,
    bytes_in: u64,
    bytes_out: u64,
}

#[derive(Debug, Default)]
struct State {
    refused: u64,
    errors: Vec<String>,
    peers: BTreeMap<NodeId, PeerState>,
    client_requests: u64,
    client_errors: u64,
    pair_degraded: u64,
    /// Synchronous pair mode is degraded (the pair did not confirm in time).
    pair_degraded_mode: bool,
    segments_compacted: u64,
    compactions_forced: u64,
    tombstones_collected: u64,
}

/// What every task of a node shares.
#[derive(Debug)]
struct Shared {
    config: NodeConfig,
    store: Store,
    /// Bumped when entries become durable here (local writes, applied entries): peer
    /// sessions push or relay.
    wake: watch::Sender<u64>,
    /// Bumped when anything a waiting request may wait on moved: the store's vectors
    /// or a peer's acknowledgements.
    progress: watch::Sender<u64>,
    state: std::sync::Mutex<State>,
    /// The TLS setup in force (a CRL installed at runtime replaces it).
    tls: std::sync::RwLock<TlsSetup>,
    endpoint: quinn::Endpoint,
    /// Live connections and the serial of the certificate their other end presented.
    connections: std::sync::Mutex<Vec<(u64, quinn::Connection)>>,
    /// The topology in force and the membership that changes it.
    topology: std::sync::RwLock<Arc<Topology>>,
    membership: std::sync::Mutex<crate::membership::Membership>,
    /// Peers with a dialer running.
    dialing: std::sync::Mutex<BTreeSet<NodeId>>,
    /// Tasks to stop at shutdown.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Per peer, over the last housekeeping interval: entries/s in and out, bytes/s
    /// in and out.
    rates: std::sync::Mutex<BTreeMap<NodeId, [f64; 4]>>,
    /// Requests being served, by idempotency key: a concurrent retry waits its turn.
    in_flight: std::sync::Mutex<BTreeMap<[u8; 16], Arc<tokio::sync::Mutex<()>>>>,
    /// Signalled when a session queued entries from a peer: the committer makes them
    /// durable.
    commit: tokio::sync::Notify,
}

impl Shared {
    fn topology(&self) -> Arc<Topology> {
        self.topology.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Starts dialers for in-scope peers that sort after this appliance and have none,
    /// and keeps a state entry for every in-scope peer.
    fn connect_peers(self: &Arc<Self>) {
        let topology = self.topology();
        let me = &self.config.me;
        let in_scope = peers_in_scope(&topology, me);
        {
            let mut state = self.state();
            state.peers.retain(|id, _| in_scope.contains_key(id));
            for peer in in_scope.keys() {
                let sends = topology.scope(me, peer).send;
                state.peers.entry(peer.clone()).or_default().sends = sends;
            }
        }
        for (peer, addr) in in_scope {
            if *me < peer && lock(&self.dialing).insert(peer.clone()) {
                let task = tokio::spawn(peer::dial(self.clone(), self.endpoint.clone(), peer, addr));
                lock(&self.tasks).push(task);
            }
        }
    }

    /// Makes a committed topology current: kept on disk and in the replicated
    /// topology record, the allowed appliances replaced, every peer connection closed
    /// (sessions start again with the new scopes; removed appliances are refused from
    /// now on), dialers started for new peers.
    fn apply_topology(self: &Arc<Self>, topology: Topology) -> Result<(), String> {
        let encoded = topology.encode();
        if let Some(path) = &self.config.topology_file {
            write_file_atomically(path, &encoded)
                .map_err(|e| format!("cannot keep the topology in {}: {e}", path.display()))?;
        }
        let record = TopologyRecord { kind: TOPOLOGY_KIND.into(), id: TOPOLOGY_ID.into(), body: encoded };
        tokio::task::block_in_place(|| self.store.put_record(&record)).map_err(|e| e.to_string())?;
        self.tls().allowed().replace(topology.appliances.iter().map(|a| a.id.clone()));
        tracing::info!(epoch = topology.epoch, appliances = topology.appliances.len(), "topology committed");
        *self.topology.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(topology);
        for (_, conn) in lock(&self.connections).iter() {
            if repl_wire::transport::negotiated_alpn(conn) == ALPN_PEER {
                conn.close(quinn::VarInt::from_u32(5), b"topology changed");
            }
        }
        self.notify();
        self.connect_peers();
        Ok(())
    }

    /// After a handshake showed a newer epoch: adopts the newer topology if the
    /// replicated record holds it.
    fn adopt_recorded_topology(self: &Arc<Self>) {
        let key = record_key(TOPOLOGY_KIND, TOPOLOGY_ID);
        let recorded: Vec<TopologyRecord> = self.store.get_record(&key).unwrap_or_default();
        let newest = recorded.iter().filter_map(|r| Topology::decode(&r.body).ok()).max_by_key(|t| t.epoch);
        if let Some(t) = newest {
            let adopted = lock(&self.membership).adopt(t.clone());
            if adopted {
                if let Err(e) = self.apply_topology(t) {
                    self.error(format!("cannot adopt the newer topology: {e}"));
                }
            }
        }
    }

    fn tls(&self) -> TlsSetup {
        self.tls.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Remembers a live connection, so a revocation can close it.
    fn track(&self, conn: &quinn::Connection) {
        let serial = repl_wire::transport::peer_serial(conn).unwrap_or(0);
        let mut connections = lock(&self.connections);
        connections.retain(|(_, c)| c.close_reason().is_none());
        connections.push((serial, conn.clone()));
    }

    /// Installs a CRL: new handshakes check it at once, live connections of revoked
    /// certificates are closed, and the CRL is kept for the next start. Returns how
    /// many connections were closed.
    fn install_crl(&self, pem: &str) -> Result<usize, String> {
        let revoked = repl_wire::transport::crl_serials(pem).map_err(|e| e.to_string())?;
        let tls = self.tls().with_crls(&[pem.to_string()]).map_err(|e| e.to_string())?;
        let server = tls.server_config(&[ALPN_PEER, ALPN_CLIENT]).map_err(|e| e.to_string())?;
        if let Some(path) = &self.config.crl_file {
            write_file_atomically(path, pem.as_bytes())
                .map_err(|e| format!("cannot keep the CRL in {}: {e}", path.display()))?;
        }
        self.endpoint.set_server_config(Some(server));
        *self.tls.write().unwrap_or_else(|p| p.into_inner()) = tls;
        let mut closed = 0;
        for (serial, conn) in lock(&self.connections).iter() {
            if revoked.contains(serial) {
                conn.close(quinn::VarInt::from_u32(3), b"certificate revoked");
                closed += 1;
            }
        }
        tracing::info!(revoked = revoked.len(), closed, "certificate revocation list installed");
        Ok(closed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn error(&self, message: String) {
        let mut state = self.state();
        if state.errors.len() == ERRORS_KEPT {
            state.errors.remove(0);
        }
        state.errors.push(message);
    }

    fn notify(&self) {
        self.wake.send_modify(|v| *v += 1);
        self.progress.send_modify(|v| *v += 1);
    }

    fn status(&self) -> NodeStatus {
        let now = now_ms();
        let ours: BTreeMap<StreamId, VersionVector> =
            StreamId::ALL.iter().map(|s| (*s, self.store.vector(*s))).collect();
        let state = self.state();
        let mut peers = Vec::new();
        for (id, p) in &state.peers {
            let lag = p
                .sends
                .iter()
                .map(|stream| {
                    let acked = p.acked.get(stream).cloned().unwrap_or_default();
                    StreamLag {
                        stream: *stream,
                        entries: lag_entries(&ours[stream], &acked),
                        behind_ms: p.behind.get(stream).map_or(0, |b| now.saturating_sub(b.since_ms)),
                    }
                })
                .collect();
            peers.push(PeerStatus {
                id: id.clone(),
                connected: p.live > 0,
                sessions: p.sessions,
                lag,
                entries_in: p.entries_in,
                entries_out: p.entries_out,
                entries_relayed: p.entries_relayed,
                rewinds: p.rewinds,
                retransmits: p.retransmits,
                bytes_in: p.bytes_in,
                bytes_out: p.bytes_out,
            });
        }
        NodeStatus {
            connected: state.peers.iter().filter(|(_, p)| p.live > 0).map(|(id, _)| id.clone()).collect(),
            refused: state.refused,
            errors: state.errors.clone(),
            peers,
            client_requests: state.client_requests,
            client_errors: state.client_errors,
            pair_degraded: state.pair_degraded,
            segments_compacted: state.segments_compacted,
            compactions_forced: state.compactions_forced,
            tombstones_collected: state.tombstones_collected,
        }
    }
}

/// Entries `ours` holds beyond `acked`.
/// How long a peer has lagged on a stream. Under a steady stream of writes the peer's
/// acknowledged vector is rarely equal to ours at the instant it is looked at, so
/// "since when is it not equal" grows without bound; instead this keeps marks of our
/// vector over time. Once the peer acknowledged a mark, everything written before the
/// mark's time has reached it, so the oldest entry it still lacks is younger than the
/// newest acknowledged mark: `since_ms` is that mark's time, an upper bound on the lag
/// that is at most [`LAG_MARK_INTERVAL_MS`] too high while marks keep up.
#[derive(Debug)]
struct Behind {
    since_ms: u64,
    /// Our vector at successive times, oldest first, none acknowledged yet.
    marks: std::collections::VecDeque<(u64, VersionVector)>,
}

/// How often a lagging peer's lag is marked.
const LAG_MARK_INTERVAL_MS: u64 = 20;
/// The most marks kept per peer and stream (past that the resolution coarsens).
const LAG_MARKS_MAX: usize = 256;

impl PeerState {
    /// Updates the lag of `stream` from our vector and what the peer acknowledged.
    fn track_lag(&mut self, stream: StreamId, now_ms: u64, ours: &VersionVector, acked: &VersionVector) {
        if lag_entries(ours, acked) == 0 {
            self.behind.remove(&stream);
            return;
        }
        let b = self
            .behind
            .entry(stream)
            .or_insert_with(|| Behind { since_ms: now_ms, marks: Default::default() });
        while let Some((at, mark)) = b.marks.front() {
            if !acked.descends(mark) {
                break;
            }
            b.since_ms = b.since_ms.max(*at);
            b.marks.pop_front();
        }
        let due = b.marks.back().is_none_or(|(at, _)| now_ms >= at + LAG_MARK_INTERVAL_MS);
        if due && b.marks.len() < LAG_MARKS_MAX {
            b.marks.push_back((now_ms, ours.clone()));
        }
    }
}

fn lag_entries(ours: &VersionVector, acked: &VersionVector) -> u64 {
    ours.iter().map(|d| d.seq.saturating_sub(acked.get(d.origin))).sum()
}

/// A running appliance.
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// Starts serving `store` as appliance `config.me`: listens for peers and clients,
    /// dials the in-scope peers whose id sorts after ours. Must run inside a
    /// multi-threaded tokio runtime (store calls block on fdatasync).
    pub async fn start(store: Store, config: NodeConfig) -> Result<Node, NodeError> {
        if config.topology.appliance(&config.me).is_none() && !config.pending {
            return Err(NodeError::NotInTopology(config.me));
        }
        if let Err(e) = tokio::task::block_in_place(|| claim_incarnation(&store, &config.me)) {
            return Err(NodeError::Store(e));
        }
        let endpoint = server_endpoint(config.listen, &config.tls, &[ALPN_PEER, ALPN_CLIENT])
            .map_err(|source| NodeError::Listen { addr: config.listen, source })?;
        let tls = std::sync::RwLock::new(config.tls.clone());
        let topology = std::sync::RwLock::new(Arc::new(config.topology.clone()));
        let membership = std::sync::Mutex::new(if config.pending {
            crate::membership::Membership::joining(config.topology.clone(), config.me.clone())
        } else {
            crate::membership::Membership::new(config.topology.clone())
        });
        let shared = Arc::new(Shared {
            config,
            store,
            tls,
            endpoint: endpoint.clone(),
            connections: std::sync::Mutex::default(),
            wake: watch::channel(0).0,
            progress: watch::channel(0).0,
            state: std::sync::Mutex::default(),
            topology,
            membership,
            dialing: std::sync::Mutex::default(),
            tasks: std::sync::Mutex::default(),
            rates: std::sync::Mutex::default(),
            in_flight: std::sync::Mutex::default(),
            commit: tokio::sync::Notify::new(),
        });
        shared.connect_peers();
        lock(&shared.tasks).extend([
            tokio::spawn(peer::accept_loop(shared.clone(), endpoint)),
            tokio::spawn(housekeeping(shared.clone())),
            tokio::spawn(commit_received(shared.clone())),
        ]);
        Ok(Node { shared })
    }

    /// The store this node serves.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// This appliance's id.
    pub fn id(&self) -> &NodeId {
        &self.shared.config.me
    }

    /// Where the node accepts peers and clients.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.shared.endpoint.local_addr().ok()
    }

    /// Announces new durable local writes to every session.
    pub fn notify(&self) {
        self.shared.notify();
    }

    /// A snapshot of the node's counters.
    pub fn status(&self) -> NodeStatus {
        self.shared.status()
    }

    /// The node's metrics in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        metrics::render(&self.shared)
    }

    /// A small HTML status page.
    pub fn status_page(&self) -> String {
        metrics::status_page(&self.shared)
    }

    /// Waits until every connected peer has acknowledged everything this node holds in
    /// the streams it sends it, or `timeout` passes; true if they did.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let mut progress = self.shared.progress.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.shared.status();
            if status.peers.iter().filter(|p| p.connected).all(|p| p.lag.iter().all(|l| l.entries == 0)) {
                return true;
            }
            if tokio::time::timeout_at(deadline, progress.changed()).await.is_err() {
                return false;
            }
        }
    }

    /// Stops gracefully: stops accepting new connections, gives connected peers up to
    /// `drain` to acknowledge what this node holds, then closes every connection and
    /// waits for the sessions to end. Everything acknowledged is already durable; a
    /// checkpoint is written last, so the next start does not replay the whole log.
    pub async fn shutdown(self, drain: Duration) {
        let endpoint = self.shared.endpoint.clone();
        endpoint.set_server_config(None);
        let connected = !self.shared.status().connected.is_empty();
        if connected && !drain.is_zero() {
            let _ = self.drained(drain).await;
        }
        endpoint.close(quinn::VarInt::from_u32(0), b"shutting down");
        let tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        endpoint.wait_idle().await;
        // A clean stop commits what sessions queued and leaves a checkpoint, so the
        // next start loads it instead of replaying the whole log.
        let store = self.shared.store.clone();
        let checkpointed =
            tokio::task::spawn_blocking(move || store.flush().and_then(|()| store.checkpoint()))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(error) = checkpointed {
            tracing::warn!(%error, "no checkpoint at shutdown: the next start replays the log");
        }
    }
}

/// The record naming an appliance's current incarnation.
const INCARNATION_KIND: &str = "incarnation";
/// The records naming incarnations an appliance retired (by a restore).
const RETIRED_KIND: &str = "retired-incarnation";
/// The record holding the committed topology (so an appliance that missed a commit
/// adopts it from the replicated data).
const TOPOLOGY_KIND: &str = "enterprise";
const TOPOLOGY_ID: &str = "topology";

/// The key of the topology record of `kind` and `id`.
fn record_key(kind: &str, id: &str) -> Vec<u8> {
    TopologyRecord { kind: kind.into(), id: id.into(), body: Vec::new() }.key()
}

fn retired_id(appliance: &NodeId, incarnation: Incarnation) -> String {
    format!("{appliance}/{:016x}", incarnation.0)
}

/// Records this appliance's incarnation in the replicated topology collection. After
/// a restore the store holds the previous incarnation's record: that one is retired
/// (a record every peer learns), and peers refuse its sessions from then on.
fn claim_incarnation(store: &Store, me: &NodeId) -> crate::Result<()> {
    let ours = store.incarnation();
    let key = record_key(INCARNATION_KIND, me.as_str());
    let held: Vec<TopologyRecord> = store.get_record(&key)?;
    let previous: Vec<Incarnation> = held
        .iter()
        .filter_map(|r| r.body.as_slice().try_into().ok().map(|b| Incarnation(u64::from_le_bytes(b))))
        .filter(|i| *i != ours)
        .collect();
    if !held.is_empty() && previous.is_empty() {
        return Ok(());
    }
    let mut batch = crate::store::WriteBatch::new();
    batch.record(&TopologyRecord {
        kind: INCARNATION_KIND.into(),
        id: me.to_string(),
        body: ours.0.to_le_bytes().to_vec(),
    })?;
    for old in &previous {
        tracing::info!(retired = %format!("{:016x}", old.0), "this appliance was restored: its previous incarnation is retired");
        batch.record(&TopologyRecord {
            kind: RETIRED_KIND.into(),
            id: retired_id(me, *old),
            body: Vec::new(),
        })?;
    }
    store.write(batch, crate::store::Durability::Durable)?;
    Ok(())
}

/// Whether `incarnation` of `appliance` was retired by a restore.
fn is_retired(store: &Store, appliance: &NodeId, incarnation: Incarnation) -> bool {
    let key = record_key(RETIRED_KIND, &retired_id(appliance, incarnation));
    store.get(Collection::Topology, &key).is_ok_and(|r| r.value().is_some())
}

/// Commits the entries sessions queued from peers, then wakes the sessions to
/// acknowledge what became durable. A session does not wait for the fdatasync of
/// what it received: it goes on reading, and what arrives meanwhile joins the next
/// group commit. One commit runs at a time; a signal during it starts another.
async fn commit_received(shared: Arc<Shared>) {
    loop {
        shared.commit.notified().await;
        let store = shared.store.clone();
        match tokio::task::spawn_blocking(move || store.flush()).await {
            Ok(Ok(())) => shared.notify(),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "entries received from peers could not be committed");
                shared.error(format!("commit of received entries failed: {e}"));
            }
            Err(_) => return, // the runtime is shutting down
        }
    }
}

/// How often the housekeeping task runs.
const HOUSEKEEPING_MS: u64 = 1_000;

/// Periodic upkeep: drops expired sessions from memory, on an appliance that forwards
/// audit records to holders releases those every holder acknowledged, and runs the
/// log maintenance that is due (`maintain`).
async fn housekeeping(shared: Arc<Shared>) {
    let mut previous: BTreeMap<NodeId, [u64; 4]> = BTreeMap::new();
    let mut schedule = maintain::Schedule::new(std::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(HOUSEKEEPING_MS)).await;
        let counters: BTreeMap<NodeId, [u64; 4]> = shared
            .status()
            .peers
            .into_iter()
            .map(|p| (p.id, [p.entries_in, p.entries_out, p.bytes_in, p.bytes_out]))
            .collect();
        let per_second = 1000.0 / HOUSEKEEPING_MS as f64;
        *lock(&shared.rates) = counters
            .iter()
            .map(|(id, now)| {
                let before = previous.get(id).copied().unwrap_or(*now);
                (id.clone(), std::array::from_fn(|i| now[i].saturating_sub(before[i]) as f64 * per_second))
            })
            .collect();
        previous = counters;
        let release = audit_release_point(&shared);
        tokio::task::block_in_place(|| {
            shared.store.expire();
            if let Some(acked) = release {
                let released = shared.store.release_audit(&acked);
                if released > 0 {
                    tracing::debug!(released, "audit records released: every holder has them");
                }
            }
            maintain::run(&shared, &mut schedule, std::time::Instant::now());
        });
    }
}

/// On an audit forwarder (not a holder itself): the meet of the holders'
/// acknowledged audit vectors (empty while a holder has not answered); `None` on a
/// holder or with no holder.
fn audit_release_point(shared: &Shared) -> Option<VersionVector> {
    let topology = shared.topology();
    let me = &shared.config.me;
    let i_hold = topology
        .appliances
        .iter()
        .any(|a| &a.id != me && topology.scope(&a.id, me).send.contains(&StreamId::Audit));
    if i_hold {
        return None;
    }
    let acked = maintain::acknowledged(shared, StreamId::Audit);
    let (first, rest) = acked.split_first()?;
    Some(rest.iter().fold(first.clone(), |m, a| m.meet(a)))
}

/// The peers of `me` in `topology` (those sharing a stream with it), by id.
pub fn peers_in_scope(topology: &Topology, me: &NodeId) -> BTreeMap<NodeId, SocketAddr> {
    topology
        .appliances
        .iter()
        .filter(|a| &a.id != me)
        .filter(|a| {
            let s = topology.scope(me, &a.id);
            !(s.send.is_empty() && s.receive.is_empty())
        })
        .map(|a| (a.id.clone(), a.address))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use repl_wire::Dot;

    fn vector(seq: u64) -> VersionVector {
        VersionVector::from_dot(Dot { origin: Incarnation(7), seq })
    }

    fn lag_ms(p: &PeerState, now: u64) -> u64 {
        p.behind.get(&StreamId::Enterprise).map_or(0, |b| now.saturating_sub(b.since_ms))
    }

    #[test]
    fn lag_stays_at_the_acknowledgement_delay_under_steady_writes() {
        // One write per millisecond; the peer acknowledges each 5 ms after it was
        // written, so it is never fully caught up when looked at.
        let mut p = PeerState::default();
        let mut worst = 0;
        for now in 10..5_000u64 {
            p.track_lag(StreamId::Enterprise, now, &vector(now), &vector(now - 5));
            worst = worst.max(lag_ms(&p, now));
        }
        assert!(worst >= 5, "a lag of 5 ms was reported as {worst} ms");
        assert!(worst <= 5 + LAG_MARK_INTERVAL_MS, "a steady 5 ms lag grew to {worst} ms");
    }

    #[test]
    fn lag_grows_while_nothing_is_acknowledged_and_ends_when_caught_up() {
        let mut p = PeerState::default();
        for now in 0..3_000u64 {
            p.track_lag(StreamId::Enterprise, now, &vector(now + 1), &vector(0));
        }
        assert!(lag_ms(&p, 3_000) >= 2_999);
        assert!(p.behind[&StreamId::Enterprise].marks.len() <= LAG_MARKS_MAX);
        p.track_lag(StreamId::Enterprise, 3_001, &vector(3_001), &vector(3_001));
        assert_eq!(lag_ms(&p, 3_002), 0);
    }
}
