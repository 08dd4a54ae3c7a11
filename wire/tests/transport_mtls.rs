//! Real QUIC on loopback with certificates from one enterprise CA: messages flow over
//! TLS 1.3 with AES-256-GCM (checked through the key log: SHA-384 suites have 48-byte
//! secrets), and every way of not belonging is refused by the server before any
//! application data is accepted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use repl_wire::transport::{
    accept, client_endpoint, connect, recv_message, send_message, server_endpoint, AllowedPeers,
    CertificateAuthority, Identity, IssuedCertificate, KeyLogRecorder, TlsSetup, TransportError, Validity,
};
use repl_wire::{
    FrameReader, Handshake, Incarnation, NodeId, PeerMessage, ALPN_CLIENT, ALPN_PEER, PROTOCOL_MAJOR,
};
use time::{Duration as TimeDuration, OffsetDateTime};
use tokio::sync::mpsc;

fn node(id: &str) -> NodeId {
    NodeId::new(id).expect("valid id")
}

fn hello(id: &str) -> PeerMessage {
    PeerMessage::Hello(Handshake {
        major: PROTOCOL_MAJOR,
        minor: 0,
        features: 0,
        appliance: node(id),
        incarnation: Incarnation(7),
        topology_epoch: 1,
        session: 1,
        seen_session: None,
        streams: vec![],
    })
}

struct Pki {
    ca: CertificateAuthority,
}

impl Pki {
    fn new() -> Pki {
        Pki { ca: CertificateAuthority::create("acme", Validity::days_from_now(365)).expect("CA") }
    }

    fn issue(&self, identity: Identity) -> IssuedCertificate {
        self.ca.issue(&identity, Validity::days_from_now(30)).expect("issue")
    }

    fn setup(&self, cert: &IssuedCertificate, crls: &[String], allowed: &[&str]) -> TlsSetup {
        TlsSetup::from_pem(
            self.ca.cert_pem(),
            &cert.cert_pem,
            &cert.key_pem,
            crls,
            AllowedPeers::new(allowed.iter().map(|a| node(a))),
        )
        .expect("setup")
    }
}

/// What the server saw of one connection attempt.
#[derive(Debug)]
enum Seen {
    Accepted(Identity),
    Refused(String),
}

struct Server {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    messages: Arc<AtomicUsize>,
    endpoint: quinn::Endpoint,
}

/// A server that records each connection's outcome and echoes one Hello per stream.
fn start_server(setup: &TlsSetup) -> Server {
    let endpoint = server_endpoint("127.0.0.1:0".parse().expect("addr"), setup, &[ALPN_PEER, ALPN_CLIENT])
        .expect("server");
    let addr = endpoint.local_addr().expect("bound");
    let (tx, seen) = mpsc::unbounded_channel();
    let messages = Arc::new(AtomicUsize::new(0));
    let (ep, count) = (endpoint.clone(), messages.clone());
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let (tx, count) = (tx.clone(), count.clone());
            tokio::spawn(async move {
                match accept(incoming).await {
                    Ok((conn, identity)) => {
                        let _ = tx.send(Seen::Accepted(identity));
                        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                            let mut reader = FrameReader::new();
                            if let Ok(Some(PeerMessage::Hello(_))) =
                                recv_message::<PeerMessage>(&mut recv, &mut reader).await
                            {
                                count.fetch_add(1, Ordering::SeqCst);
                                let _ = send_message(&mut send, &hello("server")).await;
                                let _ = send.finish();
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Seen::Refused(e.to_string()));
                    }
                }
            });
        }
    });
    Server { addr, seen, messages, endpoint }
}

/// Tries a full exchange as a client; returns whether a reply came back.
async fn try_exchange(
    client: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<PeerMessage, String> {
    let endpoint = client_endpoint("127.0.0.1:0".parse().expect("addr")).map_err(|e| e.to_string())?;
    let conn = endpoint
        .connect_with(client, addr, server_name)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send_message(&mut send, &hello("client")).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let mut reader = FrameReader::new();
    let reply = recv_message::<PeerMessage>(&mut recv, &mut reader).await.map_err(|e| e.to_string())?;
    reply.ok_or_else(|| "no reply".to_string())
}

async fn next_seen(server: &mut Server) -> Seen {
    tokio::time::timeout(Duration::from_secs(20), server.seen.recv())
        .await
        .expect("the server decided within the deadline")
        .expect("server task alive")
}

fn server_setup(pki: &Pki, crls: &[String], log: Option<Arc<KeyLogRecorder>>) -> TlsSetup {
    let cert = pki.issue(Identity::Appliance(node("db1")));
    let setup = pki.setup(&cert, crls, &["db1", "db2"]);
    match log {
        Some(l) => setup.with_key_log(l),
        None => setup,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_exchange_messages_over_tls13_aes_256_gcm() {
    let pki = Pki::new();
    let server_log = Arc::new(KeyLogRecorder::default());
    let mut server = start_server(&server_setup(&pki, &[], Some(server_log.clone())));
    let client_log = Arc::new(KeyLogRecorder::default());
    let client = pki
        .setup(&pki.issue(Identity::Appliance(node("db2"))), &[], &["db1"])
        .with_key_log(client_log.clone());
    let endpoint = client_endpoint("127.0.0.1:0".parse().expect("addr")).expect("client");
    let conn = connect(&endpoint, &client, ALPN_PEER, server.addr, &node("db1")).await.expect("connect");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send_message(&mut send, &hello("db2")).await.expect("send");
    send.finish().expect("finish");
    let mut reader = FrameReader::new();
    let reply = recv_message::<PeerMessage>(&mut recv, &mut reader).await.expect("recv").expect("a reply");
    assert_eq!(reply, hello("server"));
    match next_seen(&mut server).await {
        Seen::Accepted(Identity::Appliance(id)) => assert_eq!(id, node("db2")),
        other => panic!("expected db2 accepted, got {other:?}"),
    }
    assert_eq!(server.messages.load(Ordering::SeqCst), 1);
    for log in [client_log.entries(), server_log.entries()] {
        let traffic: Vec<_> = log.iter().filter(|(label, _)| label.contains("TRAFFIC_SECRET")).collect();
        assert!(traffic.iter().any(|(l, _)| l == "CLIENT_TRAFFIC_SECRET_0"), "TLS 1.3 labels: {log:?}");
        assert!(
            traffic.iter().all(|(_, len)| *len == 48),
            "every secret is SHA-384 sized (AES-256-GCM suite): {log:?}"
        );
    }
    server.endpoint.close(0u32.into(), b"done");
}

/// Runs one refused attempt: the server must refuse it and receive no message.
async fn assert_refused(
    server: &mut Server,
    client: quinn::ClientConfig,
    name: &str,
    why: &str,
    expect: &str,
) {
    let outcome = try_exchange(client, server.addr, name).await;
    assert!(outcome.is_err(), "{why}: the client got a reply: {outcome:?}");
    match next_seen(server).await {
        Seen::Refused(reason) => {
            assert!(reason.contains(expect), "{why}: refused for another reason: {reason}")
        }
        Seen::Accepted(id) => panic!("{why}: the server accepted {id:?}"),
    }
    assert_eq!(server.messages.load(Ordering::SeqCst), 0, "{why}: application data was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outsiders_are_refused_before_any_data() {
    let pki = Pki::new();
    let insider = pki.issue(Identity::Appliance(node("db2")));
    let revoked = pki.issue(Identity::Appliance(node("db2")));
    let crl = pki.ca.revocation_list(&[revoked.serial], 1).expect("crl");
    let mut server = start_server(&server_setup(&pki, &[crl], None));

    // No client certificate at all.
    let setup = pki.setup(&insider, &[], &[]);
    assert_refused(
        &mut server,
        setup.client_config_without_certificate_for_tests(ALPN_PEER).expect("cfg"),
        "db1",
        "no certificate",
        "no certificates",
    )
    .await;

    // A certificate from another CA (the client still trusts our CA for the server).
    let other = Pki::new();
    let foreign = other.issue(Identity::Appliance(node("db2")));
    let setup = TlsSetup::from_pem(
        pki.ca.cert_pem(),
        &foreign.cert_pem,
        &foreign.key_pem,
        &[],
        AllowedPeers::default(),
    )
    .expect("setup");
    assert_refused(
        &mut server,
        setup.client_config(ALPN_PEER).expect("cfg"),
        "db1",
        "other CA",
        "BadSignature",
    )
    .await;

    // An expired certificate.
    let past = Validity {
        not_before: OffsetDateTime::now_utc() - TimeDuration::days(10),
        not_after: OffsetDateTime::now_utc() - TimeDuration::days(1),
    };
    let expired = pki.ca.issue(&Identity::Appliance(node("db2")), past).expect("issue");
    assert_refused(
        &mut server,
        pki.setup(&expired, &[], &[]).client_config(ALPN_PEER).expect("cfg"),
        "db1",
        "expired",
        "expired",
    )
    .await;

    // A revoked certificate.
    assert_refused(
        &mut server,
        pki.setup(&revoked, &[], &[]).client_config(ALPN_PEER).expect("cfg"),
        "db1",
        "revoked",
        "Revoked",
    )
    .await;

    // An appliance that is not in the topology.
    let intruder = pki.issue(Identity::Appliance(node("intruder")));
    assert_refused(
        &mut server,
        pki.setup(&intruder, &[], &[]).client_config(ALPN_PEER).expect("cfg"),
        "db1",
        "not allowed",
        "ApplicationVerificationFailure",
    )
    .await;

    // A wrong ALPN.
    assert_refused(
        &mut server,
        pki.setup(&insider, &[], &[]).client_config(b"repl-peer/9").expect("cfg"),
        "db1",
        "wrong ALPN",
        "protocol",
    )
    .await;

    // A client that offers only AES-128-GCM for traffic.
    let weak = pki.setup(&insider, &[], &[]).with_traffic_suites_for_tests(vec![
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ]);
    assert_refused(
        &mut server,
        weak.client_config(ALPN_PEER).expect("cfg"),
        "db1",
        "AES-128 only",
        "NoCipherSuitesInCommon",
    )
    .await;

    // A client certificate on the peer protocol.
    let agent = pki.issue(Identity::Client("agent-1".into()));
    assert_refused(
        &mut server,
        pki.setup(&agent, &[], &[]).client_config(ALPN_PEER).expect("cfg"),
        "db1",
        "client on peer ALPN",
        "not allowed on repl-peer/1",
    )
    .await;

    // And the insider still gets in, so the refusals above were about the credentials.
    let reply = try_exchange(
        pki.setup(&insider, &[], &[]).client_config(ALPN_PEER).expect("cfg"),
        server.addr,
        "db1",
    )
    .await;
    assert_eq!(reply, Ok(hello("server")));
    assert!(matches!(next_seen(&mut server).await, Seen::Accepted(_)));
    server.endpoint.close(0u32.into(), b"done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_server_that_is_not_the_appliance_it_dialled() {
    let pki = Pki::new();
    let server = start_server(&server_setup(&pki, &[], None));
    let client = pki.setup(&pki.issue(Identity::Appliance(node("db2"))), &[], &[]);
    let endpoint = client_endpoint("127.0.0.1:0".parse().expect("addr")).expect("client");
    let err =
        connect(&endpoint, &client, ALPN_PEER, server.addr, &node("db9")).await.expect_err("wrong name");
    assert!(matches!(err, TransportError::Connection(_)), "{err}");
    server.endpoint.close(0u32.into(), b"done");
}
