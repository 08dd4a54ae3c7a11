//! Real appliances over real QUIC on loopback: the node runtime drives the sync
//! machines with mutual TLS. Three appliances of a G3 enterprise replicate users to
//! each other and sessions only within their site; an appliance whose certificate
//! comes from another CA is refused and receives nothing.

use std::time::Duration;

use repl_engine::runtime::{Node, NodeConfig};
use repl_engine::topology::{Generation, Role};
use repl_engine::{Store, StoreOptions, WriteBatch};
use repl_tests::net::{appliance_tls as tls, free_port, topology, wait_until as wait_for, AppliancePair};
use repl_wire::transport::{CertificateAuthority, Validity};
use repl_wire::{Collection, NodeId, StreamId};

const AUDIT: &[Role] = &[Role::Audit];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_appliances_replicate_over_quic_and_a_foreign_certificate_is_refused() {
    let ca = CertificateAuthority::create("loopback", Validity::days_from_now(1)).expect("ca");
    let rogue_ca = CertificateAuthority::create("elsewhere", Validity::days_from_now(1)).expect("ca");
    let specs = [
        ("a1", "a", AUDIT, free_port()),
        ("a2", "a", &[], free_port()),
        ("b1", "b", AUDIT, free_port()),
        ("b2", "b", &[], free_port()),
    ];
    let t = topology(Generation::G3, &specs);
    let dirs: Vec<tempfile::TempDir> = specs.iter().map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes = Vec::new();
    for (i, (id, _, _, addr)) in specs.iter().enumerate() {
        let store = Store::open_dir(dirs[i].path(), StoreOptions::default()).expect("open");
        // b2 holds a certificate from another CA: it is not part of this enterprise.
        let ca = if *id == "b2" { &rogue_ca } else { &ca };
        let config = NodeConfig::new(NodeId::new(*id).expect("id"), t.clone(), tls(ca, id, &t), *addr);
        nodes.push(Node::start(store, config).await.expect("start"));
    }

    // Users written on a1 reach every appliance of the enterprise.
    let mut batch = WriteBatch::new();
    for i in 0..50u32 {
        batch.put(Collection::Users, format!("user{i}").as_bytes(), format!("v{i}").as_bytes());
    }
    nodes[0].store().write(batch, repl_engine::Durability::Durable).expect("write");
    nodes[0].notify();
    // A session on a2 stays in site a.
    let mut session = WriteBatch::new();
    session.put_expiring(Collection::Sessions, b"s-1", b"session", u64::MAX);
    nodes[1].store().write(session, repl_engine::Durability::Durable).expect("session");
    nodes[1].notify();

    let has_all = |n: &Node| {
        (0..50u32).all(|i| {
            n.store().get(Collection::Users, format!("user{i}").as_bytes()).is_ok_and(|r| r.value().is_some())
        })
    };
    wait_for("users on a2 and b1", Duration::from_secs(30), || has_all(&nodes[1]) && has_all(&nodes[2]))
        .await;
    wait_for("the session on a1", Duration::from_secs(30), || {
        nodes[0].store().get(Collection::Sessions, b"s-1").is_ok_and(|r| r.value().is_some())
    })
    .await;
    assert!(
        nodes[2].store().get(Collection::Sessions, b"s-1").expect("read").value().is_none(),
        "a session left its site"
    );
    // The foreign appliance was refused by the appliances it talked to, and got nothing.
    wait_for("b2 refused", Duration::from_secs(30), || nodes.iter().any(|n| n.status().refused > 0)).await;
    assert!(!has_all(&nodes[3]), "an appliance with a foreign certificate received data");
    assert!(nodes[3].store().get(Collection::Users, b"user0").expect("read").value().is_none());

    for n in nodes {
        n.shutdown(Duration::ZERO).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appliance_that_stops_catches_up_when_it_comes_back() {
    let pair = AppliancePair::default();
    let start = |i: usize| pair.start(i, StoreOptions::default(), |_| {});
    let a1 = start(0).await;
    let b1 = start(1).await;
    let put = |n: &Node, i: u32| {
        n.store().put(Collection::Users, format!("user{i}").as_bytes(), b"v").expect("put");
        n.notify();
    };
    let has = |n: &Node, i: u32| {
        n.store().get(Collection::Users, format!("user{i}").as_bytes()).is_ok_and(|r| r.value().is_some())
    };
    put(&a1, 0);
    wait_for("user0 on b1", Duration::from_secs(30), || has(&b1, 0)).await;

    // b1 stops; a1 keeps writing; b1 comes back on the same data and address.
    b1.shutdown(Duration::ZERO).await;
    for i in 1..=20 {
        put(&a1, i);
    }
    let b1 = start(1).await;
    // The clean stop left a checkpoint: the restart replays nothing.
    let recovered = &b1.store().recovery().streams[&StreamId::Enterprise];
    assert!(recovered.hint_generation.is_some(), "no checkpoint after a clean stop: {recovered:?}");
    assert_eq!(recovered.entries_replayed, 0, "{recovered:?}");
    wait_for("b1 to catch up after its restart", Duration::from_secs(30), || (0..=20).all(|i| has(&b1, i)))
        .await;
    // And writes flow the other way too.
    put(&b1, 100);
    wait_for("user100 on a1", Duration::from_secs(30), || has(&a1, 100)).await;
    a1.shutdown(Duration::ZERO).await;
    b1.shutdown(Duration::ZERO).await;
}
