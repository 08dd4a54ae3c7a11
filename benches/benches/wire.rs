//! Wire benchmarks: encode and decode throughput of entry batches, and a bulk
//! transfer of entry batches through the real transport (QUIC, TLS 1.3 AES-256-GCM,
//! mutual certificates) on loopback: the ceiling replication is measured against.
#![allow(missing_docs)] // criterion_group! and criterion_main! generate undocumented public items

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use repl_benches::quick;
use repl_wire::transport::{
    accept, client_endpoint, connect, recv_message, server_endpoint, AllowedPeers, CertificateAuthority,
    Identity, TlsSetup, Validity,
};
use repl_wire::{
    decode_frame, encode_frame, Collection, Dot, Entry, FrameReader, Hlc, Incarnation, NodeId, Op,
    PeerMessage, StreamId, VersionVector, ALPN_PEER,
};

const BATCH: usize = 256;

fn batch(value_bytes: usize, first_seq: u64) -> PeerMessage {
    let entries = (0..BATCH as u64)
        .map(|i| Entry {
            dot: Dot { origin: Incarnation(0xABCD), seq: first_seq + i },
            hlc: Hlc { wall_ms: 1_700_000_000_000 + i, logical: 0 },
            collection: Collection::Users,
            key: format!("user-{:010}", first_seq + i).into_bytes(),
            context: VersionVector::new(),
            op: Op::Put { value: vec![(i % 251) as u8; value_bytes], expires_at_ms: None },
        })
        .collect();
    PeerMessage::Entries { stream: StreamId::Enterprise, entries }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec_entry_batch");
    for size in [256usize, 2048] {
        let msg = batch(size, 1);
        let frame = encode_frame(&msg).expect("encodes");
        g.throughput(Throughput::Bytes((BATCH * size) as u64));
        g.bench_function(BenchmarkId::new("encode", size), |b| {
            b.iter(|| encode_frame(&msg).expect("encodes"))
        });
        g.bench_function(BenchmarkId::new("decode", size), |b| {
            b.iter(|| decode_frame::<PeerMessage>(&frame[4..]).expect("decodes"))
        });
    }
    g.finish();
}

struct Link {
    rt: tokio::runtime::Runtime,
    conn: quinn::Connection,
    done: tokio::sync::mpsc::UnboundedReceiver<usize>,
    _server: quinn::Endpoint,
}

/// A server that decodes every entry batch on each uni stream and reports the count.
fn link() -> Link {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let ca = CertificateAuthority::create("bench", Validity::days_from_now(2)).expect("ca");
    let setup = |id: &str| {
        let cert = ca
            .issue(&Identity::Appliance(NodeId::new(id).expect("id")), Validity::days_from_now(1))
            .expect("cert");
        let allowed = AllowedPeers::new(["a", "b"].map(|x| NodeId::new(x).expect("id")));
        TlsSetup::from_pem(ca.cert_pem(), &cert.cert_pem, &cert.key_pem, &[], allowed).expect("setup")
    };
    let (server_setup, client_setup) = (setup("a"), setup("b"));
    let (tx, done) = tokio::sync::mpsc::unbounded_channel();
    let (conn, server) = rt.block_on(async move {
        let server =
            server_endpoint("127.0.0.1:0".parse::<SocketAddr>().expect("addr"), &server_setup, &[ALPN_PEER])
                .expect("server");
        let addr = server.local_addr().expect("addr");
        let ep = server.clone();
        tokio::spawn(async move {
            let incoming = ep.accept().await.expect("incoming");
            let (conn, _) = accept(incoming).await.expect("authorized");
            while let Ok(mut recv) = conn.accept_uni().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut reader = FrameReader::new();
                    let mut n = 0;
                    while let Ok(Some(PeerMessage::Entries { entries, .. })) =
                        recv_message::<PeerMessage>(&mut recv, &mut reader).await
                    {
                        n += entries.len();
                    }
                    let _ = tx.send(n);
                });
            }
        });
        let client = client_endpoint("127.0.0.1:0".parse().expect("addr")).expect("client");
        let conn = connect(&client, &client_setup, ALPN_PEER, addr, &NodeId::new("a").expect("id"))
            .await
            .expect("connect");
        (conn, server)
    });
    Link { rt, conn, done, _server: server }
}

fn quic_bulk(c: &mut Criterion) {
    let mut link = link();
    let mut g = c.benchmark_group("quic_bulk_transfer");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(if quick() { 1 } else { 6 }));
    for size in [256usize, 2048] {
        let batches: u64 = if quick() { 4 } else { 80 };
        let frames: Vec<Vec<u8>> = (0..batches)
            .map(|i| encode_frame(&batch(size, 1 + i * BATCH as u64)).expect("encodes"))
            .collect();
        let frames = Arc::new(frames);
        g.throughput(Throughput::Bytes(batches * (BATCH * size) as u64));
        g.bench_function(BenchmarkId::new("entries_256_per_batch", size), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let (conn, frames) = (link.conn.clone(), frames.clone());
                    link.rt.block_on(async move {
                        let mut send = conn.open_uni().await.expect("stream");
                        for f in frames.iter() {
                            send.write_all(f).await.expect("write");
                        }
                        send.finish().expect("finish");
                    });
                    let got = link.rt.block_on(link.done.recv()).expect("server reported");
                    assert_eq!(got as u64, batches * BATCH as u64);
                }
                start.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec, quic_bulk);
criterion_main!(benches);
