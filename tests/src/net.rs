//! Helpers for tests of real appliances on loopback: topologies, certificates, ports
//! and waiting on a condition with a deadline.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use repl_engine::topology::{Appliance, ExternalServers, Generation, Role, Site, SiteKind, Topology};
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
