//! Shared helpers for repl's criterion benchmarks: workloads, baselines and the
//! measurement of memory per key.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Whether criterion runs in `--test` mode (each benchmark once, scaled down for CI).
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--test")
}

/// A 256-byte value that differs per index.
pub fn value_256(i: u64) -> [u8; 256] {
    let mut v = [0u8; 256];
    v[..8].copy_from_slice(&i.to_le_bytes());
    for (j, b) in v.iter_mut().enumerate().skip(8) {
        *b = (i as u8).wrapping_add(j as u8);
    }
    v
}

/// The key of record `i`.
pub fn key(i: u64) -> [u8; 16] {
    let mut k = *b"user-0000000000\0";
    k[5..15].copy_from_slice(format!("{:010}", i % 10_000_000_000).as_bytes());
    k
}

/// Baseline: a plain CRC-framed append loop, `[len u32][crc u32][payload]`, with one
/// fdatasync per `sync_every` records. Returns after the final fdatasync.
pub fn plain_log_append(dir: &Path, records: u64, sync_every: u64) -> std::io::Result<()> {
    let mut file = File::create(dir.join("plain.log"))?;
    let mut buf = Vec::with_capacity(sync_every as usize * 300);
    for i in 0..records {
        let payload = value_256(i);
        let len = (payload.len() as u32).to_le_bytes();
        let mut h = crc32fast::Hasher::new_with_initial(0x5250_4c46);
        h.update(&len);
        h.update(&payload);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&h.finalize().to_le_bytes());
        buf.extend_from_slice(&payload);
        if (i + 1) % sync_every == 0 || i + 1 == records {
            file.write_all(&buf)?;
            file.sync_data()?;
            buf.clear();
        }
    }
    Ok(())
}

/// Baseline: redb alone, inserting `records` 256-byte values with a durable commit per
/// `commit_every`.
pub fn redb_insert(dir: &Path, records: u64, commit_every: u64) -> Result<(), Box<redb::Error>> {
    const TABLE: redb::TableDefinition<'_, &[u8], &[u8]> = redb::TableDefinition::new("users");
    let db = redb::Database::create(dir.join("redb.db")).map_err(|e| Box::new(e.into()))?;
    let mut i = 0;
    while i < records {
        let tx = db.begin_write().map_err(|e| Box::new(e.into()))?;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| Box::new(e.into()))?;
            let end = (i + commit_every).min(records);
            while i < end {
                table.insert(&key(i)[..], &value_256(i)[..]).map_err(|e| Box::new(e.into()))?;
                i += 1;
            }
        }
        tx.commit().map_err(|e| Box::new(e.into()))?;
    }
    Ok(())
}
