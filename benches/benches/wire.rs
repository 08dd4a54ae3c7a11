//! Wire benchmarks: encode and decode throughput of entry batches, and a bulk
//! transfer of entry batches through the real transport (QUIC, TLS 1.3 AES-256-GCM,
//! mutual certificates) on loopback: the ceiling replication is measured against.
#![allow(missing_docs)] // criterion_group! and criterion_main! generate undocumented public items

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use repl_benches::{batch, link, quick, BATCH};
use repl_wire::{decode_frame, encode_frame, PeerMessage};

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
                    let got = link.transfer(&frames);
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
