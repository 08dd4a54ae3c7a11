//! The client protocol over real QUIC on loopback: a G4 pair of database appliances
//! and a service appliance; the remote store client with idempotency keys, causal
//! tokens and failover; synchronous pair mode; admin authorization; metrics over HTTP.

use std::time::Duration;

use repl_engine::runtime::{
    database_targets, serve_http, ClientError, Node, NodeConfig, PairMode, PairTimeout, RemoteStore,
};
use repl_engine::topology::{Generation, Role, Topology};
use repl_engine::{Store, StoreOptions};
use repl_tests::net::{appliance_tls, free_port, tls_for, topology, wait_until};
use repl_wire::transport::{AllowedPeers, CertificateAuthority, Identity, TlsSetup, Validity};
use repl_wire::{
    AdminCall, AuditEvent, ClientCall, ClientReply, Collection, Dot, ErrorCode, NodeId, StreamId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DB: &[Role] = &[Role::Database];
const SERVICE: &[Role] = &[Role::Service];

struct Enterprise {
    ca: CertificateAuthority,
    topology: Topology,
    dirs: Vec<tempfile::TempDir>,
}

impl Enterprise {
    fn g4() -> Enterprise {
        let ca = CertificateAuthority::create("loopback", Validity::days_from_now(1)).expect("ca");
        let topology = topology(
            Generation::G4,
            &[
                ("db1", "a", DB, free_port()),
                ("db2", "b", DB, free_port()),
                ("svc1", "a", SERVICE, free_port()),
            ],
        );
        let dirs = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
        Enterprise { ca, topology, dirs }
    }

    fn config(&self, i: usize) -> NodeConfig {
        let a = &self.topology.appliances[i];
        NodeConfig::new(
            a.id.clone(),
            self.topology.clone(),
            appliance_tls(&self.ca, a.id.as_str(), &self.topology),
            a.address,
        )
    }

    async fn start(&self, i: usize, config: NodeConfig) -> Node {
        let store = Store::open_dir(self.dirs[i].path(), StoreOptions::default()).expect("open");
        Node::start(store, config).await.expect("start")
    }

    fn client(&self, identity: Identity, site: &str) -> RemoteStore {
        RemoteStore::new(tls_for(&self.ca, identity, &self.topology), database_targets(&self.topology, site))
            .expect("client")
            .with_timeouts(Duration::from_millis(1_500), Duration::from_secs(8))
    }
}

fn agent() -> Identity {
    Identity::Client("agent-1".into())
}

fn seqs(node: &Node, stream: StreamId) -> u64 {
    node.store().vector(stream).iter().map(|d| d.seq).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_store_is_idempotent_causal_and_fails_over() {
    let e = Enterprise::g4();
    let db1 = e.start(0, e.config(0)).await;
    let mut config = e.config(1);
    config.serve.causal_wait_ms = 300;
    let db2 = e.start(1, config).await;
    let client = e.client(agent(), "a");
    assert_eq!(client.current(), Some(NodeId::new("db1").expect("id")), "own site's database first");

    // A write and a read of it.
    let token = client.put(Collection::Users, b"alice", b"v1").await.expect("put");
    let (values, _) = client.get(Collection::Users, b"alice").await.expect("get");
    assert_eq!(values.iter().map(|v| v.value.as_slice()).collect::<Vec<_>>(), vec![b"v1".as_slice()]);
    assert_eq!(values[0].dot, token);

    // The same idempotency key twice: one write, the same token.
    let key = [7u8; 16];
    let call = || ClientCall::Put {
        collection: Collection::Users,
        key: b"bob".to_vec(),
        value: b"b1".to_vec(),
        context: None,
        cas: false,
    };
    let before = seqs(&db1, StreamId::Enterprise);
    let first = client.call_with_key(key, call()).await.expect("first");
    let again = client.call_with_key(key, call()).await.expect("retry");
    assert!(matches!(first, ClientReply::Written { .. }), "{first:?}");
    assert_eq!(first, again, "a retry must return the first answer");
    assert_eq!(
        seqs(&db1, StreamId::Enterprise),
        before + 2,
        "the write and its answer, once (a retry wrote again)"
    );
    // The answer was written in the write's own batch: the entry right after it.
    let ClientReply::Written { token } = first else { unreachable!("checked above") };
    let answer = db1.store().get(Collection::WriteAnswers, &key).expect("answer");
    assert_eq!(answer.values.len(), 1, "one answer record");
    assert_eq!(answer.values[0].dot, Dot { origin: token.origin, seq: token.seq + 1 });
    // Clients cannot touch answers.
    let tamper =
        ClientCall::Delete { collection: Collection::WriteAnswers, key: key.to_vec(), context: None };
    match client.call_with_key([8; 16], tamper).await {
        Ok(ClientReply::Error(e)) if e.code == ErrorCode::BadRequest => {}
        other => panic!("a client deleted an answer record: {other:?}"),
    }

    // The retry at the other database appliance (a failover after a lost reply) gets
    // the same answer once the request record and the write reached it, and writes
    // nothing there.
    wait_until("bob and the answer on db2", Duration::from_secs(30), || {
        db2.store().get(Collection::Users, b"bob").is_ok_and(|r| r.value().is_some())
            && db2.store().get(Collection::WriteAnswers, &key).is_ok_and(|r| r.values.len() == 1)
    })
    .await;
    let only_db2 = RemoteStore::new(
        tls_for(&e.ca, agent(), &e.topology),
        database_targets(&e.topology, "b").into_iter().take(1).collect(),
    )
    .expect("client");
    // db2's own writes: entries from db1 may still become durable meanwhile (a `get`
    // sees queued entries before their commit), so the whole vector may move.
    let own = |n: &Node| n.store().vector(StreamId::Enterprise).get(n.store().incarnation());
    let db2_before = own(&db2);
    let at_db2 = only_db2.call_with_key(key, call()).await.expect("retry at db2");
    assert_eq!(at_db2, first, "the other database appliance must return the first answer");
    assert_eq!(own(&db2), db2_before, "the retry wrote again at db2");

    // A read carrying a token nobody holds times out with a typed error (each attempt
    // waits db2's 300 ms for it, until the call's deadline).
    let unknown = Dot { origin: db1.store().incarnation(), seq: 1_000_000 };
    let impatient = RemoteStore::new(
        tls_for(&e.ca, agent(), &e.topology),
        database_targets(&e.topology, "b").into_iter().take(1).collect(),
    )
    .expect("client")
    .with_timeouts(Duration::from_millis(1_500), Duration::from_millis(1_500));
    let (_, reply) = (
        (),
        impatient
            .call_with_key(
                [9; 16],
                ClientCall::Get { collection: Collection::Users, key: b"bob".to_vec(), after: Some(unknown) },
            )
            .await,
    );
    match reply {
        Err(ClientError::Unavailable { last, .. }) => assert!(last.contains("Timeout"), "{last}"),
        other => panic!("expected a causal timeout, got {other:?}"),
    }

    // db1 goes away: the client fails over to db2 and reads its own writes there.
    db1.shutdown(Duration::from_secs(5)).await;
    let token = client.put(Collection::Users, b"carol", b"c1").await.expect("put after failover");
    assert_eq!(client.current(), Some(NodeId::new("db2").expect("id")));
    assert!(client.failovers() >= 1);
    assert_eq!(token.origin, db2.store().incarnation());
    let (values, _) = client.get(Collection::Users, b"alice").await.expect("read own earlier write");
    assert_eq!(values[0].value, b"v1");
    db2.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_appliance_forwards_to_the_database_and_keeps_audit_for_it() {
    let e = Enterprise::g4();
    let db1 = e.start(0, e.config(0)).await;
    let db2 = e.start(1, e.config(1)).await;
    let mut config = e.config(2);
    let upstream_tls = appliance_tls(&e.ca, "svc1", &e.topology);
    config.upstream =
        Some(RemoteStore::new(upstream_tls, database_targets(&e.topology, "a")).expect("upstream"));
    let svc = e.start(2, config).await;

    // An agent talks to the service appliance only.
    let target = e.topology.appliances[2].clone();
    let agent_client = RemoteStore::new(
        tls_for(&e.ca, agent(), &e.topology),
        vec![repl_engine::runtime::RemoteTarget { id: target.id, address: target.address }],
    )
    .expect("client");
    agent_client.put(Collection::UserPolicies, b"p1", b"policy").await.expect("put through svc1");
    assert!(
        db1.store().get(Collection::UserPolicies, b"p1").expect("read").value().is_some(),
        "the write must be durable on a database appliance when acknowledged"
    );
    assert!(
        svc.store().get(Collection::UserPolicies, b"p1").expect("read").value().is_none(),
        "svc1 holds data"
    );
    let event = AuditEvent {
        time_ms: 1,
        user: "alice".into(),
        appliance: "svc1".into(),
        action: "login".into(),
        detail: String::new(),
    };
    agent_client.append_audit(event).await.expect("audit");
    wait_until("the audit record on both database appliances", Duration::from_secs(30), || {
        [&db1, &db2].iter().all(|n| seqs(n, StreamId::Audit) == 1)
    })
    .await;
    // Once both holders acknowledged it, the service appliance lets it go.
    wait_until("svc1 to release the forwarded audit record", Duration::from_secs(30), || {
        svc.store().audit_backlog() == 0
    })
    .await;
    for n in [svc, db1, db2] {
        n.shutdown(Duration::ZERO).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_pair_mode_fails_closed_or_degrades_without_the_pair() {
    let e = Enterprise::g4();
    let only_db1 = |e: &Enterprise| {
        RemoteStore::new(
            tls_for(&e.ca, agent(), &e.topology),
            database_targets(&e.topology, "a").into_iter().take(1).collect(),
        )
        .expect("client")
        .with_timeouts(Duration::from_millis(1_000), Duration::from_millis(1_500))
    };
    // With the pair up, a synchronous write is on both when acknowledged.
    let mut config = e.config(0);
    config.serve.pair = PairMode::Sync { timeout_ms: 500, on_timeout: PairTimeout::FailClosed };
    let db1 = e.start(0, config).await;
    let db2 = e.start(1, e.config(1)).await;
    let client = only_db1(&e);
    wait_until("the pair to connect", Duration::from_secs(30), || !db1.status().connected.is_empty()).await;
    client.put(Collection::Users, b"u1", b"v").await.expect("sync put");
    assert!(
        db2.store().get(Collection::Users, b"u1").expect("read").value().is_some(),
        "acknowledged before the pair held it"
    );

    // Pair down, fail closed: the client is refused.
    db2.shutdown(Duration::ZERO).await;
    match client.put(Collection::Users, b"u2", b"v").await {
        Err(ClientError::Unavailable { last, .. }) => assert!(last.contains("did not confirm"), "{last}"),
        other => panic!("expected a fail-closed refusal, got {other:?}"),
    }
    db1.shutdown(Duration::ZERO).await;

    // Pair down, degrade: acknowledged, counted and alarmed.
    let mut config = e.config(0);
    config.serve.pair = PairMode::Sync { timeout_ms: 200, on_timeout: PairTimeout::Degrade };
    let db1 = e.start(0, config).await;
    let client = only_db1(&e);
    client.put(Collection::Users, b"u3", b"v").await.expect("degraded put");
    assert_eq!(db1.status().pair_degraded, 1);
    assert!(db1.metrics_text().contains("repl_pair_degraded_total 1"));
    db1.shutdown(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_an_admin_certificate_and_metrics_are_served() {
    let e = Enterprise::g4();
    let db1 = std::sync::Arc::new(e.start(0, e.config(0)).await);
    let db2 = e.start(1, e.config(1)).await;
    let agent_client = e.client(agent(), "a");
    match agent_client.call(ClientCall::Admin(AdminCall::Status)).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::NotAuthorized), "{e}"),
        Ok(reply) => panic!("an agent got an admin answer: {reply:?}"),
    }
    let admin = e.client(Identity::Admin("ops".into()), "a");
    match admin.call(ClientCall::Admin(AdminCall::Status)).await.expect("status") {
        (_, ClientReply::Status { appliance, .. }) => assert_eq!(appliance.as_str(), "db1"),
        (_, other) => panic!("unexpected {other:?}"),
    }
    agent_client.put(Collection::Users, b"m", b"v").await.expect("put");
    wait_until("db2 to acknowledge", Duration::from_secs(30), || {
        let db2 = db1.status().peers.into_iter().find(|p| p.id.as_str() == "db2").expect("db2 in scope");
        db2.connected && db2.lag.iter().all(|l| l.entries == 0)
    })
    .await;

    wait_until("per-second rates in the metrics", Duration::from_secs(10), || {
        db1.metrics_text().contains("repl_entries_per_second{peer=\"db2\",direction=\"out\"}")
    })
    .await;
    let (addr, task) = serve_http(db1.clone(), "127.0.0.1:0".parse().expect("addr")).await.expect("http");
    let get = |path: &'static str| async move {
        let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
        socket.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.expect("send");
        let mut text = String::new();
        socket.read_to_string(&mut text).await.expect("read");
        text
    };
    let metrics = get("/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("repl_peer_connected{appliance=\"db1\",peer=\"db2\"} 1"), "{metrics}");
    assert!(metrics.contains("repl_lag_entries{peer=\"db2\",stream=\"enterprise\"} 0"), "{metrics}");
    assert!(metrics.contains("repl_client_requests_total"), "{metrics}");
    let page = get("/").await;
    assert!(page.contains("<h1>db1</h1>") && page.contains("db2") && page.contains("entries/s"), "{page}");
    assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
    assert!(
        serve_http(db1.clone(), "0.0.0.0:0".parse().expect("addr")).await.is_err(),
        "metrics beyond loopback"
    );
    task.abort();
    db2.shutdown(Duration::ZERO).await;
    if let Ok(db1) = std::sync::Arc::try_unwrap(db1) {
        db1.shutdown(Duration::ZERO).await;
    }
}

/// A client whose certificate every appliance refuses (issued by another CA), or
/// which refuses every appliance's (it trusts another CA), gets a typed answer at
/// once, not `Unavailable` at the call's deadline: retrying cannot help.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_refused_by_every_appliance_ends_the_call_at_once() {
    let e = Enterprise::g4();
    let _db1 = e.start(0, e.config(0)).await;
    let _db2 = e.start(1, e.config(1)).await;
    let elsewhere = CertificateAuthority::create("elsewhere", Validity::days_from_now(1)).expect("ca");
    let foreign = elsewhere.issue(&agent(), Validity::days_from_now(1)).expect("certificate");
    let allowed = AllowedPeers::new(e.topology.appliances.iter().map(|a| a.id.clone()));
    let refused_by_them =
        TlsSetup::from_pem(e.ca.cert_pem(), &foreign.cert_pem, &foreign.key_pem, &[], allowed).expect("tls");
    let refusing_them = tls_for(&elsewhere, agent(), &e.topology);
    for (who, tls) in [("the appliances", refused_by_them), ("the client", refusing_them)] {
        // A deadline far beyond the handshakes: reaching it is the failure.
        let client = RemoteStore::new(tls, database_targets(&e.topology, "a"))
            .expect("client")
            .with_timeouts(Duration::from_millis(1_500), Duration::from_secs(20));
        match client.put(Collection::Users, b"k", b"v").await {
            // 48: unknown_ca, raised by whichever side did not know the issuer.
            Err(e @ ClientError::Certificate { alert: 48, .. }) => {
                assert!(e.to_string().contains("TLS alert 48 unknown_ca"), "{who}: {e}");
            }
            other => panic!("a certificate refused by {who} gave {other:?}"),
        }
    }
    // The enterprise's own client certificate is served as before.
    e.client(agent(), "a").put(Collection::Users, b"k", b"v").await.expect("put");
}
