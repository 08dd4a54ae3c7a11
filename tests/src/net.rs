//! Helpers for tests of real appliances on loopback: topologies, certificates, ports
//! and waiting on a condition with a deadline.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use repl_engine::runtime::NodeConfig;
use repl_engine::topology::{Appliance, ExternalServers, Generation, Role, Site, SiteKind, Topology};
use repl_engine::{Store, StoreOptions};
use repl_wire::transport::{AllowedPeers, CertificateAuthority, Identity, TlsSetup, Validity};
use repl_wire::NodeId;

/// A free loopback UDP port: bound and released; the node binds it right after.
pub fn free_port() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free loopback port")
}

/// A two-site topology (`a`, `b`, each the other's failover) of `appliances`:
/// (id, site, roles, address).
pub fn topology(generation: Generation, appliances: &[(&str, &str, &[Role], SocketAddr)]) -> Topology {
    let site = |id: &str, range: &str, failover: &str| Site {
        id: id.into(),
        name: id.into(),
        kind: SiteKind::Active,
        ranges: vec![range.parse().expect("range")],
        primary_failover: Some(failover.into()),
        secondary_failover: None,
        external: None,
    };
    Topology {
        enterprise: "loopback".into(),
        generation,
        epoch: 1,
        external: ExternalServers::default(),
        bootstrap: None,
        sites: vec![site("a", "10.1.0.0/16", "b"), site("b", "10.2.0.0/16", "a")],
        appliances: appliances
            .iter()
            .map(|(id, site, roles, address)| Appliance {
                id: NodeId::new(*id).expect("id"),
                name: id.to_string(),
                site: site.to_string(),
                address: *address,
                roles: roles.iter().copied().collect(),
            })
            .collect(),
    }
}

/// A TLS setup for `identity`, issued by `ca`, allowing the appliances of `topology`.
pub fn tls_for(ca: &CertificateAuthority, identity: Identity, topology: &Topology) -> TlsSetup {
    let cert = ca.issue(&identity, Validity::days_from_now(1)).expect("issue a certificate");
    let allowed = AllowedPeers::new(topology.appliances.iter().map(|a| a.id.clone()));
    TlsSetup::from_pem(ca.cert_pem(), &cert.cert_pem, &cert.key_pem, &[], allowed).expect("tls setup")
}

/// A TLS setup for appliance `id`.
pub fn appliance_tls(ca: &CertificateAuthority, id: &str, topology: &Topology) -> TlsSetup {
    tls_for(ca, Identity::Appliance(NodeId::new(id).expect("id")), topology)
}

/// Polls `done` until it holds; panics naming `what` after `deadline`.
pub async fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two audit holders of a G3 enterprise on loopback, `a1` in site `a` and `b1` in site
/// `b`, each with a data directory that outlives its node: what tests that stop and
/// restart one side need.
pub struct AppliancePair {
    ca: CertificateAuthority,
    specs: [(&'static str, &'static str, &'static [Role], SocketAddr); 2],
    topology: Topology,
    dirs: [tempfile::TempDir; 2],
}

impl Default for AppliancePair {
    fn default() -> Self {
        const AUDIT: &[Role] = &[Role::Audit];
        let specs = [("a1", "a", AUDIT, free_port()), ("b1", "b", AUDIT, free_port())];
        AppliancePair {
            ca: CertificateAuthority::create("loopback", Validity::days_from_now(1)).expect("ca"),
            topology: topology(Generation::G3, &specs),
            specs,
            dirs: [(); 2].map(|_| tempfile::tempdir().expect("data dir")),
        }
    }
}

impl AppliancePair {
    /// Starts appliance `i` (0: a1, 1: b1) on its directory with `options`, after
    /// `adjust` edits the default node configuration.
    pub async fn start(
        &self,
        i: usize,
        options: StoreOptions,
        adjust: impl FnOnce(&mut NodeConfig),
    ) -> repl_engine::runtime::Node {
        let (id, _, _, addr) = self.specs[i];
        let store = Store::open_dir(self.dirs[i].path(), options).expect("open the store");
        let tls = appliance_tls(&self.ca, id, &self.topology);
        let mut config = NodeConfig::new(NodeId::new(id).expect("id"), self.topology.clone(), tls, addr);
        adjust(&mut config);
        repl_engine::runtime::Node::start(store, config).await.expect("start the node")
    }

    /// The data directory of appliance `i`.
    pub fn dir(&self, i: usize) -> &std::path::Path {
        self.dirs[i].path()
    }
}
