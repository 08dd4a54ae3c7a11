//! The node runtime (feature `runtime`): drives one [`PeerSync`] per in-scope peer
//! over QUIC with mutual TLS. This is the only part of the engine that touches tokio,
//! sockets and the wall clock; the machines it drives are the ones the simulator
//! drives.
//!
//! Connections: of each pair of appliances the one with the smaller id dials, the
//! other accepts; the dialer reconnects with jittered exponential backoff. One
//! bidirectional stream per connection carries every message of the session, in
//! order. A local write must be announced with [`Node::notify`] (the store has no
//! callback); entries applied from one peer wake every other session, which pushes
//! or relays them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use repl_wire::transport::{
    accept, connect, recv_message, send_message, server_endpoint, Identity, TlsSetup, TransportError,
};
use repl_wire::{FrameReader, NodeId, PeerMessage, StreamId, VersionVector, ALPN_CLIENT, ALPN_PEER};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::rng::random_u64;
use crate::store::Store;
use crate::sync::{PeerSync, SyncConfig, SyncEvent, SyncSetup};
use crate::topology::Topology;

/// What a node needs to run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This appliance.
    pub me: NodeId,
    /// The enterprise topology (its addresses are where peers are dialed).
    pub topology: Topology,
    /// Mutual TLS: the enterprise CA, this appliance's certificate and the allowed peers.
    pub tls: TlsSetup,
    /// Where to accept peers.
    pub listen: SocketAddr,
    /// Sync tunables.
    pub sync: SyncConfig,
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
}

/// Counters of a running node, for status pages and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// Peers with an established session.
    pub connected: Vec<NodeId>,
    /// Connections refused (bad certificate, unknown appliance, wrong protocol).
    pub refused: u64,
    /// Errors raised by sessions (a peer's protocol error, a failed apply).
    pub errors: Vec<String>,
}

/// A running appliance.
#[derive(Debug)]
pub struct Node {
    store: Store,
    endpoint: quinn::Endpoint,
    wake: watch::Sender<u64>,
    status: Arc<std::sync::Mutex<NodeStatus>>,
    tasks: Vec<JoinHandle<()>>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Node {
    /// Starts serving `store` as appliance `config.me`: listens for peers, dials the
    /// in-scope peers whose id sorts after ours. Must run inside a multi-threaded
    /// tokio runtime (store calls block on fdatasync).
    pub async fn start(store: Store, config: NodeConfig) -> Result<Node, NodeError> {
        if config.topology.appliance(&config.me).is_none() {
            return Err(NodeError::NotInTopology(config.me));
        }
        let endpoint = server_endpoint(config.listen, &config.tls, &[ALPN_PEER, ALPN_CLIENT])
            .map_err(|source| NodeError::Listen { addr: config.listen, source })?;
        let (wake, _) = watch::channel(0u64);
        let status = Arc::new(std::sync::Mutex::new(NodeStatus::default()));
        let config = Arc::new(config);
        let mut tasks = Vec::new();
        for (peer, addr) in peers_in_scope(&config.topology, &config.me) {
            if config.me < peer {
                let dialer = Dialer {
                    config: config.clone(),
                    store: store.clone(),
                    endpoint: endpoint.clone(),
                    peer,
                    addr,
                    wake: wake.clone(),
                    status: status.clone(),
                };
                tasks.push(tokio::spawn(dialer.run()));
            }
        }
        let acceptor = Acceptor {
            config: config.clone(),
            store: store.clone(),
            endpoint: endpoint.clone(),
            wake: wake.clone(),
            status: status.clone(),
        };
        tasks.push(tokio::spawn(acceptor.run()));
        Ok(Node { store, endpoint, wake, status, tasks })
    }

    /// The store this node serves.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Where the node accepts peers.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Announces new durable local writes to every session.
    pub fn notify(&self) {
        self.wake.send_modify(|v| *v += 1);
    }

    /// A snapshot of the node's counters.
    pub fn status(&self) -> NodeStatus {
        lock(&self.status).clone()
    }

    /// Stops accepting and dialing, closes every connection, and waits for the
    /// sessions to end. Everything acknowledged is already durable in the store.
    pub async fn shutdown(self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"shutting down");
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.endpoint.wait_idle().await;
    }
}

struct Dialer {
    config: Arc<NodeConfig>,
    store: Store,
    /// The node's own endpoint: it dials as well as accepts.
    endpoint: quinn::Endpoint,
    peer: NodeId,
    addr: SocketAddr,
    wake: watch::Sender<u64>,
    status: Arc<std::sync::Mutex<NodeStatus>>,
}

impl Dialer {
    async fn run(self) {
        let mut backoff_ms = 100u64;
        loop {
            let session = async {
                let conn =
                    connect(&self.endpoint, &self.config.tls, ALPN_PEER, self.addr, &self.peer).await.ok()?;
                let (send, recv) = conn.open_bi().await.ok()?;
                let session = Session {
                    config: self.config.clone(),
                    store: self.store.clone(),
                    peer: self.peer.clone(),
                    wake: self.wake.clone(),
                    status: self.status.clone(),
                };
                session.run(send, recv).await;
                conn.close(quinn::VarInt::from_u32(0), b"session over");
                Some(())
            };
            if session.await.is_some() {
                backoff_ms = 100;
            }
            // Jittered exponential backoff, capped at 5 s.
            let jitter = random_u64() % (backoff_ms / 2 + 1);
            tokio::time::sleep(Duration::from_millis(backoff_ms / 2 + jitter)).await;
            backoff_ms = (backoff_ms * 2).min(5_000);
        }
    }
}

struct Acceptor {
    config: Arc<NodeConfig>,
    store: Store,
    endpoint: quinn::Endpoint,
    wake: watch::Sender<u64>,
    status: Arc<std::sync::Mutex<NodeStatus>>,
}

impl Acceptor {
    async fn run(self) {
        while let Some(incoming) = self.endpoint.accept().await {
            let config = self.config.clone();
            let store = self.store.clone();
            let wake = self.wake.clone();
            let status = self.status.clone();
            tokio::spawn(async move {
                let peer = match accept(incoming).await {
                    Ok((conn, Identity::Appliance(id))) if config.topology.appliance(&id).is_some() => {
                        (conn, id)
                    }
                    Ok((conn, _)) => {
                        // Clients are served by the client protocol (not built yet).
                        conn.close(quinn::VarInt::from_u32(2), b"no client protocol here yet");
                        return;
                    }
                    Err(_) => {
                        lock(&status).refused += 1;
                        return;
                    }
                };
                let (conn, id) = peer;
                let Ok((send, recv)) = conn.accept_bi().await else { return };
                let session = Session { config, store, peer: id, wake, status };
                session.run(send, recv).await;
                conn.close(quinn::VarInt::from_u32(0), b"session over");
            });
        }
    }
}

struct Session {
    config: Arc<NodeConfig>,
    store: Store,
    peer: NodeId,
    wake: watch::Sender<u64>,
    status: Arc<std::sync::Mutex<NodeStatus>>,
}

impl Session {
    fn vectors(&self) -> Vec<VersionVector> {
        StreamId::ALL.iter().map(|s| self.store.vector(*s)).collect()
    }

    async fn run(self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let setup = SyncSetup {
            me: self.config.me.clone(),
            peer: self.peer.clone(),
            scope: self.config.topology.scope(&self.config.me, &self.peer),
            epoch: self.config.topology.epoch,
            session: random_u64(),
            peer_incarnation: None,
            config: self.config.sync,
        };
        let store = self.store.clone();
        let mut machine = tokio::task::block_in_place(|| PeerSync::new(setup, now_ms(), &store));
        let mut woken = self.wake.subscribe();
        let mut reader = FrameReader::new();
        let mut established = false;
        loop {
            let mut out = Vec::new();
            while let Some(m) = machine.poll_transmit() {
                out.push(m);
            }
            for m in &out {
                if send_message(&mut send, m).await.is_err() {
                    return self.closed(established);
                }
            }
            while let Some(event) = machine.poll_event() {
                match event {
                    SyncEvent::PeerError(e) => lock(&self.status).errors.push(format!("{}: {e}", self.peer)),
                    SyncEvent::ApplyFailed(e) => {
                        lock(&self.status).errors.push(format!("{}: {e}", self.peer))
                    }
                    _ => {}
                }
            }
            if machine.is_established() && !established {
                established = true;
                lock(&self.status).connected.push(self.peer.clone());
            }
            let deadline = tokio::task::block_in_place(|| machine.poll_timeout(&store));
            let sleep = deadline
                .map_or(Duration::from_secs(3600), |t| Duration::from_millis(t.saturating_sub(now_ms())));
            tokio::select! {
                message = recv_message::<PeerMessage>(&mut recv, &mut reader) => {
                    let Ok(Some(message)) = message else { return self.closed(established) };
                    let before = self.vectors();
                    tokio::task::block_in_place(|| machine.handle_message(now_ms(), message, &store));
                    if self.vectors() != before {
                        // Entries arrived: other sessions may push or relay them.
                        self.wake.send_modify(|v| *v += 1);
                    }
                }
                () = tokio::time::sleep(sleep) => {
                    tokio::task::block_in_place(|| machine.handle_timeout(now_ms(), &store));
                }
                changed = woken.changed() => {
                    if changed.is_err() {
                        return self.closed(established);
                    }
                    tokio::task::block_in_place(|| {
                        for stream in StreamId::ALL {
                            machine.handle_local_durable(now_ms(), stream, &store);
                        }
                    });
                }
            }
        }
    }

    fn closed(&self, established: bool) {
        if established {
            lock(&self.status).connected.retain(|p| p != &self.peer);
        }
    }
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
