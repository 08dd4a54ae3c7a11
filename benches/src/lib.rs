//! Shared helpers for repl's criterion benchmarks: workloads, baselines and the
//! measurement of memory per key.

pub mod cluster;

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use repl_engine::{Store, WriteBatch};
use repl_wire::transport::{
    accept, client_endpoint, connect, recv_message, server_endpoint, AllowedPeers, CertificateAuthority,
    Identity, TlsSetup, Validity,
};
use repl_wire::{
    Collection, Dot, Entry, FrameReader, Hlc, Incarnation, NodeId, Op, PeerMessage, StreamId, VersionVector,
    ALPN_PEER,
};

/// Whether criterion runs in `--test` mode (each benchmark once, scaled down for CI).
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--test")
}

/// Whether the part `name` of a bench runs: criterion's filter argument (after `--`,
/// not a flag) selects parts by substring, alternatives separated by `|`; none
/// selects all. Lets `cargo bench --bench replication -- 'catch_up|mesh'` skip the
/// set-up of the other parts.
pub fn wanted(name: &str) -> bool {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    filters.is_empty() || filters.iter().flat_map(|f| f.split('|')).any(|f| name.contains(f))
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

/// The key of record `i`: `user-` and `i` in ten decimal digits (written without
/// `format!`, whose cost would be counted in every put of the store benches).
///
/// ```
/// assert_eq!(&repl_benches::key(42), b"user-0000000042\0");
/// ```
pub fn key(i: u64) -> [u8; 16] {
    let mut k = *b"user-0000000000\0";
    let mut n = i % 10_000_000_000;
    for d in k[5..15].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    k
}

/// The key of record `i` when keys are spread over the key space, as user and session
/// ids are: `user-` and eleven hex digits of `i` times an odd constant modulo 2^44 (a
/// bijection, so distinct records never share a key). Ascending keys are a B-tree's
/// best case: every insert lands on its right edge.
///
/// ```
/// let (a, b) = (repl_benches::key_spread(1), repl_benches::key_spread(2));
/// assert_ne!(a, b);
/// assert!(a.starts_with(b"user-") && b.starts_with(b"user-"));
/// ```
pub fn key_spread(i: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut k = *b"user-00000000000";
    let mut n = i.wrapping_mul(0x9e37_79b9_7f4b) & ((1 << 44) - 1);
    for d in k[5..16].iter_mut().rev() {
        *d = HEX[(n & 15) as usize];
        n >>= 4;
    }
    k
}

/// Baseline: a plain CRC-framed append loop, `[len u32][crc u32][payload]`, with one
/// fdatasync per `sync_every` records. Returns after the final fdatasync.
pub fn plain_log_append(dir: &Path, records: u64, sync_every: u64) -> std::io::Result<()> {
    let mut file = File::create(dir.join("plain.log"))?;
    let mut buf = Vec::with_capacity(sync_every as usize * 300);
    for i in 0..records {
        let payload = value_256(i);
        buf.extend_from_slice(&record_header(&payload));
        buf.extend_from_slice(&payload);
        if (i + 1) % sync_every == 0 || i + 1 == records {
            file.write_all(&buf)?;
            file.sync_data()?;
            buf.clear();
        }
    }
    Ok(())
}

/// The header of the baselines' log record `[len u32][crc u32][payload]`: the length,
/// and the CRC (seeded) over the length and the payload.
fn record_header(payload: &[u8]) -> [u8; 8] {
    let len = (payload.len() as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new_with_initial(0x5250_4c46);
    h.update(&len);
    h.update(payload);
    let mut header = [0; 8];
    header[..4].copy_from_slice(&len);
    header[4..].copy_from_slice(&h.finalize().to_le_bytes());
    header
}

/// Baseline: the plain log's records appended by concurrent writers through the least
/// a group commit needs (no index, no versions, no encoding): a writer frames its
/// record, queues it and takes a ticket; [`GroupLog::wait`] returns once the ticket is
/// durable, the first waiter to find no leader writing and syncing everything queued.
/// With the store bench's writers and writes in flight, it is the rate any store of
/// this design could reach on this disk: the group sizes, and so the fdatasyncs, are
/// set by the writes in flight.
pub struct GroupLog {
    file: File,
    state: std::sync::Mutex<GroupState>,
    changed: std::sync::Condvar,
}

#[derive(Default)]
struct GroupState {
    queued: Vec<u8>,
    spare: Vec<u8>,
    last_ticket: u64,
    durable_ticket: u64,
    leading: bool,
    end: u64,
}

impl GroupLog {
    /// A new log at `path` (truncated, as the plain log's file is).
    pub fn create(path: &Path) -> std::io::Result<GroupLog> {
        Ok(GroupLog { file: File::create(path)?, state: Default::default(), changed: Default::default() })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `payload` as one record; returns its ticket.
    pub fn append(&self, payload: &[u8]) -> u64 {
        let header = record_header(payload);
        let mut st = self.state();
        st.queued.extend_from_slice(&header);
        st.queued.extend_from_slice(payload);
        st.last_ticket += 1;
        st.last_ticket
    }

    /// Returns once the record of `ticket` is durable.
    pub fn wait(&self, ticket: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut st = self.state();
        while st.durable_ticket < ticket {
            if st.leading {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.leading = true;
            let spare = std::mem::take(&mut st.spare);
            let mut group = std::mem::replace(&mut st.queued, spare);
            let (last, at) = (st.last_ticket, st.end);
            st.end += group.len() as u64;
            drop(st);
            let written = self.file.write_all_at(&group, at).and_then(|()| self.file.sync_data());
            group.clear();
            st = self.state();
            st.spare = group;
            st.leading = false;
            if written.is_ok() {
                st.durable_ticket = last;
            }
            self.changed.notify_all();
            written?;
        }
        Ok(())
    }
}

/// Baseline: redb alone, inserting records `base..base + records` (256-byte values,
/// keys from `keys`) into `db` with a durable commit per `commit_every`.
pub fn redb_insert(
    db: &redb::Database,
    keys: fn(u64) -> [u8; 16],
    base: u64,
    records: u64,
    commit_every: u64,
) -> Result<(), Box<redb::Error>> {
    const TABLE: redb::TableDefinition<'_, &[u8], &[u8]> = redb::TableDefinition::new("users");
    let mut i = base;
    while i < base + records {
        let tx = db.begin_write().map_err(|e| Box::new(e.into()))?;
        {
            let mut table = tx.open_table(TABLE).map_err(|e| Box::new(e.into()))?;
            let end = (i + commit_every).min(base + records);
            while i < end {
                table.insert(&keys(i)[..], &value_256(i)[..]).map_err(|e| Box::new(e.into()))?;
                i += 1;
            }
        }
        tx.commit().map_err(|e| Box::new(e.into()))?;
    }
    Ok(())
}

/// A new redb database in `dir`, for [`redb_insert`].
pub fn redb_create(dir: &Path) -> Result<redb::Database, Box<redb::Error>> {
    redb::Database::create(dir.join("redb.db")).map_err(|e| Box::new(e.into()))
}

/// Entries per batch message.
pub const BATCH: usize = 256;

/// An `Entries` message of [`BATCH`] entries with `value_bytes`-byte values.
pub fn batch(value_bytes: usize, first_seq: u64) -> PeerMessage {
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

/// A QUIC connection (mutual TLS, AES-256-GCM) to a server on loopback that decodes
/// every entry batch on each unidirectional stream and reports how many entries it got.
pub struct Link {
    /// The runtime both ends run on.
    pub rt: tokio::runtime::Runtime,
    /// The client's connection.
    pub conn: quinn::Connection,
    /// Entries received per finished stream.
    pub done: tokio::sync::mpsc::UnboundedReceiver<usize>,
    _server: quinn::Endpoint,
}

/// A server that decodes every entry batch on each uni stream and reports the count.
pub fn link() -> Link {
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

impl Link {
    /// Sends `frames` on a new unidirectional stream and waits until the server has
    /// decoded them all; returns the entries it counted.
    pub fn transfer(&mut self, frames: &std::sync::Arc<Vec<Vec<u8>>>) -> usize {
        let (conn, frames) = (self.conn.clone(), frames.clone());
        self.rt.block_on(async move {
            let mut send = conn.open_uni().await.expect("stream");
            for f in frames.iter() {
                send.write_all(f).await.expect("write");
            }
            send.finish().expect("finish");
        });
        self.rt.block_on(self.done.recv()).expect("server reported")
    }
}

/// Writes each of the eight pipelined writers of the replication benches keeps in
/// flight.
pub const IN_FLIGHT: usize = 128;

/// What one writer thread writes: record `i` as a batch.
pub type Make<'a> = &'a (dyn Fn(u64) -> WriteBatch + Sync);

/// `writers` threads write records `base..base + records` to `store`, record `i` made
/// by `make`; one writer waits for each write before the next, several writers each
/// keep up to [`IN_FLIGHT`] in flight. `after_write` runs after each durable write
/// (the node's notify when replicating).
pub fn write_all(
    store: &Store,
    writers: u64,
    records: u64,
    base: u64,
    make: Make<'_>,
    after_write: &(dyn Fn() + Sync),
) {
    let in_flight = if writers == 1 { 1 } else { IN_FLIGHT };
    write_pipelined(store, writers, in_flight, records, base, make, after_write);
}

/// [`write_all`] with each writer keeping up to `in_flight` writes in flight.
pub fn write_pipelined(
    store: &Store,
    writers: u64,
    in_flight: usize,
    records: u64,
    base: u64,
    make: Make<'_>,
    after_write: &(dyn Fn() + Sync),
) {
    std::thread::scope(|s| {
        for w in 0..writers {
            s.spawn(move || {
                let mut pending = VecDeque::with_capacity(in_flight);
                let mut i = w;
                while i < records {
                    pending.push_back(store.submit(make(base + i)).expect("submit"));
                    if pending.len() == in_flight {
                        pending.pop_front().expect("non-empty").wait().expect("durable");
                        after_write();
                    }
                    i += writers;
                }
                for p in pending {
                    p.wait().expect("durable");
                    after_write();
                }
            });
        }
    });
}

/// A user record of `size` bytes.
pub fn user(size: usize) -> impl Fn(u64) -> WriteBatch + Sync {
    move |i| {
        let mut b = WriteBatch::new();
        b.put(Collection::Users, &key(i), &vec![(i as u8).wrapping_mul(31); size]);
        b
    }
}
