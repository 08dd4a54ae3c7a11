//! An enterprise of in-process appliances for the replication benches: each a real
//! node runtime (QUIC with mutual TLS on loopback, AES-256-GCM) over a real store on
//! real files in a temporary directory, all on one tokio runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use repl_engine::runtime::{
    database_targets, MaintenanceConfig, Node, NodeConfig, PairMode, RemoteStore, RemoteTarget,
};
use repl_engine::topology::{Appliance, ExternalServers, Generation, Role, Site, SiteKind, Topology};
use repl_engine::{FileStorage, Store, StoreOptions, SyncLatency};
use repl_wire::transport::{AllowedPeers, CertificateAuthority, Identity, TlsSetup, Validity};
use repl_wire::{NodeId, StreamId};

/// One appliance of a layout: id, site id, roles.
pub type Member = (&'static str, &'static str, &'static [Role]);

/// The G4 database pair. The second (the one the benches stop and restart) has the
/// smaller id: of a pair the smaller id dials, so its restart reconnects at once
/// instead of waiting for the other's dial backoff.
pub const G4_PAIR: &[Member] = &[("db2", "a", &[Role::Database]), ("db1", "b", &[Role::Database])];

/// The G4 pair and one service appliance in site a.
pub const G4_PAIR_AND_SERVICE: &[Member] =
    &[("db2", "a", &[Role::Database]), ("db1", "b", &[Role::Database]), ("svc1", "a", &[Role::Service])];

/// A G3 enterprise of two sites with three appliances each, one audit holder per site
/// (the soak's).
pub const G3_MESH: &[Member] = repl_tools::soak::SOAK_G3;

/// A running enterprise.
pub struct Cluster {
    /// The runtime every node runs on.
    pub rt: tokio::runtime::Runtime,
    nodes: Vec<Option<Node>>,
    configs: Vec<NodeConfig>,
    latency: Vec<Arc<SyncLatency>>,
    dirs: Vec<tempfile::TempDir>,
    ca: CertificateAuthority,
    topology: Topology,
    options: StoreOptions,
}

fn free_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free port")
}

fn site(id: &str, range: &str) -> Site {
    Site {
        id: id.into(),
        name: id.into(),
        kind: SiteKind::Active,
        ranges: vec![range.parse().expect("range")],
        primary_failover: None,
        secondary_failover: None,
        external: None,
    }
}

impl Cluster {
    /// Starts every appliance of `layout` and waits until each has a live session
    /// with every peer in its scope. `pair` is the database appliances' pair mode.
    pub fn start(generation: Generation, layout: &[Member], pair: PairMode) -> Cluster {
        Cluster::start_with(generation, layout, pair, StoreOptions::default())
    }

    /// [`Cluster::start`] with every store opened with `options`.
    pub fn start_with(
        generation: Generation,
        layout: &[Member],
        pair: PairMode,
        options: StoreOptions,
    ) -> Cluster {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
        let ca = CertificateAuthority::create("bench", Validity::days_from_now(2)).expect("ca");
        let topology = Topology {
            enterprise: "bench".into(),
            generation,
            epoch: 1,
            external: ExternalServers::default(),
            bootstrap: None,
            sites: vec![site("a", "10.1.0.0/16"), site("b", "10.2.0.0/16")],
            appliances: layout
                .iter()
                .map(|(id, site, roles)| Appliance {
                    id: NodeId::new(*id).expect("id"),
                    name: id.to_string(),
                    site: site.to_string(),
                    address: free_port(),
                    roles: roles.iter().copied().collect(),
                })
                .collect(),
        };
        let ids: Vec<NodeId> = topology.appliances.iter().map(|a| a.id.clone()).collect();
        let mut cluster = Cluster {
            rt,
            nodes: Vec::new(),
            configs: Vec::new(),
            latency: Vec::new(),
            dirs: Vec::new(),
            ca,
            topology: topology.clone(),
            options,
        };
        for (i, appliance) in topology.appliances.iter().enumerate() {
            let tls = cluster.tls(Identity::Appliance(appliance.id.clone()), &ids);
            let upstream =
                (generation == Generation::G4 && appliance.roles.contains(&Role::Service)).then(|| {
                    let _guard = cluster.rt.enter();
                    RemoteStore::new(tls.clone(), database_targets(&topology, &appliance.site))
                        .expect("upstream client")
                        .with_timeouts(Duration::from_millis(1_500), Duration::from_secs(4))
                });
            let mut config = NodeConfig::new(appliance.id.clone(), topology.clone(), tls, appliance.address);
            config.serve.pair = pair;
            config.upstream = upstream;
            // The benches measure the replication path. Compaction rewrites every live
            // record once a sealed segment falls below the horizon, and the catch-up
            // bench's appliance keeps every sample's million keys: upkeep would land
            // in the middle of later samples.
            config.maintenance = MaintenanceConfig::off();
            cluster.configs.push(config);
            cluster.dirs.push(tempfile::tempdir().expect("dir"));
            cluster.nodes.push(None);
            let storage = FileStorage::new(cluster.dirs[i].path()).expect("storage");
            cluster.latency.push(storage.sync_latency());
            cluster.start_on(i, storage);
        }
        cluster.wait_connected();
        cluster
    }

    fn tls(&self, identity: Identity, ids: &[NodeId]) -> TlsSetup {
        let cert = self.ca.issue(&identity, Validity::days_from_now(1)).expect("cert");
        TlsSetup::from_pem(
            self.ca.cert_pem(),
            &cert.cert_pem,
            &cert.key_pem,
            &[],
            AllowedPeers::new(ids.to_vec()),
        )
        .expect("tls")
    }

    fn start_on(&mut self, i: usize, storage: FileStorage) {
        let mut config = self.configs[i].clone();
        // A restarted appliance has a new storage, and its histogram with it.
        self.latency[i] = storage.sync_latency();
        config.sync_latency = Some(storage.sync_latency());
        let store = Store::open(Arc::new(storage), self.options.clone()).expect("store");
        self.nodes[i] = Some(self.rt.block_on(Node::start(store, config)).expect("node"));
    }

    /// How many appliances there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the layout was empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Appliance `i`, while it runs.
    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("the appliance runs")
    }

    /// Appliance `i`'s store's fdatasync latency histogram.
    pub fn sync_latency(&self, i: usize) -> &Arc<SyncLatency> {
        &self.latency[i]
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Stops appliance `i` cleanly (what it holds is durable).
    pub fn stop(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            self.rt.block_on(node.shutdown(Duration::ZERO));
        }
    }

    /// Starts appliance `i` again on its own data.
    pub fn restart(&mut self, i: usize) {
        let storage = FileStorage::new(self.dirs[i].path()).expect("storage");
        self.start_on(i, storage);
    }

    /// Starts appliance `i` again with an empty data directory (a replacement
    /// appliance with the same identity and a new incarnation).
    pub fn restart_empty(&mut self, i: usize) {
        self.stop(i);
        self.dirs[i] = tempfile::tempdir().expect("dir");
        self.restart(i);
    }

    /// Waits until every running appliance has a live session with every running
    /// peer in its scope.
    pub fn wait_connected(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            let me = &self.topology.appliances[i].id;
            let want: Vec<NodeId> = repl_engine::runtime::peers_in_scope(&self.topology, me)
                .into_keys()
                .filter(|p| self.index(p).is_some_and(|j| self.nodes[j].is_some()))
                .collect();
            while !want.iter().all(|p| node.status().connected.contains(p)) {
                assert!(Instant::now() < deadline, "{me} did not connect to all of {want:?}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn index(&self, id: &NodeId) -> Option<usize> {
        self.topology.appliances.iter().position(|a| &a.id == id)
    }

    /// A client (its own certificate and QUIC endpoint) of appliances `targets`,
    /// tried in order. Call inside the runtime (`rt.enter()`).
    pub fn client(&self, name: &str, targets: &[usize]) -> RemoteStore {
        let ids: Vec<NodeId> = self.topology.appliances.iter().map(|a| a.id.clone()).collect();
        let tls = self.tls(Identity::Client(name.into()), &ids);
        let targets = targets
            .iter()
            .map(|&i| RemoteTarget {
                id: self.topology.appliances[i].id.clone(),
                address: self.topology.appliances[i].address,
            })
            .collect();
        RemoteStore::new(tls, targets)
            .expect("client")
            .with_timeouts(Duration::from_secs(5), Duration::from_secs(30))
    }

    /// How many of `origin`'s entries of `stream` appliance `i` holds durably.
    pub fn held(&self, i: usize, stream: StreamId, origin: usize) -> u64 {
        self.node(i).store().vector(stream).get(self.node(origin).store().incarnation())
    }

    /// Waits until appliance `i` holds `seq` of `origin`'s entries of `stream`.
    pub fn wait_held(&self, i: usize, stream: StreamId, origin: usize, seq: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.held(i, stream, origin) < seq {
            assert!(Instant::now() < deadline, "appliance {i} did not receive {seq} entries of {origin}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Waits until every running appliance has published an acknowledgement of
    /// everything it sent to each peer (lag zero in every stream it sends); the byte
    /// counters are published with the acknowledgements.
    pub fn wait_acknowledged(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for node in self.nodes.iter().flatten() {
            while node.status().peers.iter().any(|p| p.lag.iter().any(|l| l.entries > 0)) {
                assert!(Instant::now() < deadline, "{} has peers that did not acknowledge", node.id());
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Bytes sent and received by appliance `i` on its peer connections so far.
    pub fn peer_bytes(&self, i: usize) -> (u64, u64) {
        let status = self.node(i).status();
        (status.peers.iter().map(|p| p.bytes_out).sum(), status.peers.iter().map(|p| p.bytes_in).sum())
    }

    /// What appliance `i` sent its peers so far: entries (retransmissions and relays
    /// included), entries relayed, and retransmissions (restarts from an
    /// acknowledgement).
    pub fn entries_sent(&self, i: usize) -> [u64; 3] {
        let peers = self.node(i).status().peers;
        [
            peers.iter().map(|p| p.entries_out).sum(),
            peers.iter().map(|p| p.entries_relayed).sum(),
            peers.iter().map(|p| p.retransmits).sum(),
        ]
    }

    /// Stops every appliance.
    pub fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i);
        }
    }
}

/// CPU seconds this process has used (user and system), from `/proc/self/stat`.
pub fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; the first field after ')' is
    // field 3, so they sit at indices 11 and 12. Both count USER_HZ ticks (100 on Linux).
    let ticks: u64 = [11usize, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    ticks as f64 / 100.0
}
