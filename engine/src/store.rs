//! The public face of the engine: [`Store`].

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use repl_wire::{
    Collection, Dot, EncodedEntry, Entry, Hlc, HlcClock, Incarnation, Op, StreamId, VersionVector,
};

use crate::audit::{AuditEvent, AuditQuery, StoredAudit};
use crate::error::{io_err, Corruption, Error, Result};
use crate::options::{StoreOptions, SyncPoint, BUFFERED_BYTES_MAX};
use crate::records::Record;
use crate::segment::frame_bytes;
use crate::storage::{FileStorage, Storage};
use crate::stream::{
    encode_into_spare, parse_name, CompactionReport, ConflictRecord, Draft, Drafts, FileKind, StreamRecovery,
    StreamStore,
};

const IDENTITY_FILE: &str = "identity";
const IDENTITY_TMP: &str = "identity.tmp";
const IDENTITY_MAGIC: [u8; 8] = *b"REPLID\0\0";
const IDENTITY_BYTES: usize = 8 + 8 + 4;

/// Whether a write is acknowledged only once durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledged after fdatasync (the default).
    #[default]
    Durable,
    /// Acknowledged at once; may be lost on a crash (like `synchronous_commit=off`).
    /// Never shipped to a peer before it is durable.
    Buffered,
}

/// One version of a value as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// The write that made this version.
    pub dot: Dot,
    /// When it was made.
    pub hlc: Hlc,
    /// When it expires, if it does.
    pub expires_at_ms: Option<u64>,
}

/// The result of a read: the live values (more than one only for siblings of a
/// `KeepSiblings` collection) and the causal context to pass back to a write.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Read {
    /// Live values; empty when the key is absent, deleted or expired.
    pub values: Vec<Value>,
    /// Everything the key's versions have seen; a write with this context supersedes
    /// them all (a compare-and-set when written with [`Store::compare_and_put`]).
    pub context: VersionVector,
}

impl Read {
    /// The value when there is exactly one.
    pub fn value(&self) -> Option<&[u8]> {
        match self.values.as_slice() {
            [one] => Some(&one.bytes),
            _ => None,
        }
    }
}

/// A set of writes to one stream committed atomically (one frame, one fdatasync).
#[derive(Debug, Clone, Default)]
pub struct WriteBatch {
    drafts: Drafts,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        WriteBatch::default()
    }

    /// Sets `key` to `value`, superseding what this appliance holds (LWW collections)
    /// or adding a sibling (`KeepSiblings` collections).
    pub fn put(&mut self, collection: Collection, key: &[u8], value: &[u8]) -> &mut Self {
        self.put_value(collection, key, value, None, false)
    }

    /// Sets `key` superseding exactly the versions `context` covers.
    pub fn put_with_context(
        &mut self,
        collection: Collection,
        key: &[u8],
        value: &[u8],
        context: &VersionVector,
    ) -> &mut Self {
        self.put_value(collection, key, value, Some(context), false)
    }

    /// Sets `key` only if `context` is still the key's current context.
    pub fn compare_and_put(
        &mut self,
        collection: Collection,
        key: &[u8],
        value: &[u8],
        context: &VersionVector,
    ) -> &mut Self {
        self.put_value(collection, key, value, Some(context), true)
    }

    fn put_value(
        &mut self,
        collection: Collection,
        key: &[u8],
        value: &[u8],
        context: Option<&VersionVector>,
        cas: bool,
    ) -> &mut Self {
        let op = Op::Put { value: value.to_vec(), expires_at_ms: None };
        self.push(collection, key, op, context.cloned(), cas)
    }

    /// Sets `key` to a value that expires at `expires_at_ms` (sessions).
    pub fn put_expiring(
        &mut self,
        collection: Collection,
        key: &[u8],
        value: &[u8],
        expires_at_ms: u64,
    ) -> &mut Self {
        self.push(
            collection,
            key,
            Op::Put { value: value.to_vec(), expires_at_ms: Some(expires_at_ms) },
            None,
            false,
        )
    }

    /// Deletes `key` (a tombstone superseding everything held, or what `context` covers).
    pub fn delete(
        &mut self,
        collection: Collection,
        key: &[u8],
        context: Option<&VersionVector>,
    ) -> &mut Self {
        self.push(collection, key, Op::Delete, context.cloned(), false)
    }

    /// Appends an audit event (chained to this appliance's previous audit record).
    pub fn audit(&mut self, event: AuditEvent) -> &mut Self {
        self.drafts.push(Draft::Audit(event));
        self
    }

    /// Stores a typed record.
    pub fn record<R: Record>(&mut self, record: &R) -> Result<&mut Self> {
        let value = postcard::to_allocvec(record).map_err(|e| Error::Record(e.to_string()))?;
        let op = Op::Put { value, expires_at_ms: record.expires_at_ms() };
        Ok(self.push(R::COLLECTION, &record.key(), op, None, false))
    }

    /// Number of writes in the batch.
    pub fn len(&self) -> usize {
        self.drafts.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.drafts.is_empty()
    }

    fn push(
        &mut self,
        collection: Collection,
        key: &[u8],
        op: Op,
        context: Option<VersionVector>,
        cas: bool,
    ) -> &mut Self {
        self.drafts.push(Draft::Local { collection, key: key.to_vec(), op, context, cas });
        self
    }

    fn stream(&self) -> Result<StreamId> {
        let stream_of = |d: &Draft| match d {
            Draft::Local { collection, .. } => collection.stream(),
            Draft::Audit(_) => StreamId::Audit,
            Draft::Remote(e, _) => e.collection.stream(),
        };
        let first = self.drafts.first().map(stream_of).ok_or(Error::Request("empty batch"))?;
        if self.drafts.iter().any(|d| stream_of(d) != first) {
            return Err(Error::Request("a batch must stay within one stream"));
        }
        Ok(first)
    }
}

/// A submitted write whose acknowledgement can be awaited later (pipelining).
#[derive(Debug)]
#[must_use = "a pending write is acknowledged only by wait()"]
pub struct PendingWrite {
    store: Store,
    stream: StreamId,
    ticket: u64,
    dots: Vec<Dot>,
}

impl PendingWrite {
    /// The dots the writes were given (their causal tokens).
    pub fn dots(&self) -> &[Dot] {
        &self.dots
    }

    /// Blocks until the writes are durable (joining or leading a group commit).
    pub fn wait(self) -> Result<Vec<Dot>> {
        self.store.stream(self.stream).wait(self.ticket)?;
        Ok(self.dots)
    }
}

/// What opening the store found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Whether the store was created by this open.
    pub created: bool,
    /// Per stream, what recovery did.
    pub streams: BTreeMap<StreamId, StreamRecovery>,
}

struct Inner {
    storage: Arc<dyn Storage>,
    options: Arc<StoreOptions>,
    incarnation: Incarnation,
    streams: Vec<StreamStore>,
    hlc: Mutex<HlcClock>,
    poisoned: Arc<AtomicBool>,
    recovery: Recovery,
}

/// A durable, versioned, log-structured store of one appliance.
///
/// Writes append to one log per stream with group commit, and are acknowledged once
/// durable unless [`Durability::Buffered`] is asked for. Reads come from an in-memory
/// keydir and one positioned read. The handle is cheap to clone and shared by threads.
///
/// ```
/// # use repl_engine::{Store, StoreOptions, SimStorage, SimConfig};
/// # use repl_wire::Collection;
/// # use std::sync::Arc;
/// let disk = SimStorage::new(SimConfig::default());
/// let store = Store::open(Arc::new(disk.clone()), StoreOptions::default())?;
/// store.put(Collection::Users, b"alice", b"Alice Liddell")?;
/// let read = store.get(Collection::Users, b"alice")?;
/// assert_eq!(read.value(), Some(&b"Alice Liddell"[..]));
/// // A compare-and-set with a stale context is refused.
/// store.put(Collection::Users, b"alice", b"changed")?;
/// assert!(store.compare_and_put(Collection::Users, b"alice", b"x", &read.context).is_err());
/// # Ok::<(), repl_engine::Error>(())
/// ```
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("incarnation", &self.inner.incarnation).finish_non_exhaustive()
    }
}

fn stream_index(stream: StreamId) -> usize {
    StreamId::ALL.iter().position(|s| *s == stream).expect("ALL lists every stream")
}

impl Store {
    /// Opens the store in a directory of real files, creating it if empty.
    pub fn open_dir(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let path = dir.as_ref();
        let storage =
            FileStorage::new(path).map_err(io_err(&path.display().to_string(), "create data directory"))?;
        Store::open(Arc::new(storage), options)
    }

    /// Gives the (closed) store on `storage` a new incarnation: what a restore from a
    /// backup does before the store opens again. Its writes from then on carry the new
    /// origin, so they can never reuse a sequence number its older incarnation gave out
    /// after the backup was taken; its peers refuse the older incarnation from then on.
    /// The new incarnation is `options.incarnation_seed` if set, else random.
    pub fn reincarnate(storage: &dyn Storage, options: &StoreOptions) -> Result<Incarnation> {
        read_identity(storage)?;
        create_identity(storage, options)
    }

    /// Opens (recovering) or creates the store on `storage`.
    pub fn open(storage: Arc<dyn Storage>, options: StoreOptions) -> Result<Store> {
        let options = Arc::new(options);
        let names = storage.list().map_err(io_err("data directory", "list"))?;
        let mut per_stream: BTreeMap<StreamId, Vec<(String, FileKind, u64)>> = BTreeMap::new();
        let mut has_identity = false;
        for name in names {
            if name == IDENTITY_FILE {
                has_identity = true;
            } else if name == IDENTITY_TMP {
                storage.remove(&name).map_err(io_err(&name, "remove"))?;
            } else if let Some((stream, kind, n)) = parse_name(&name) {
                per_stream.entry(stream).or_default().push((name, kind, n));
            } else {
                return Err(Error::UnknownFile { file: name });
            }
        }
        let created = !has_identity;
        if created && !per_stream.is_empty() {
            return Err(Error::Corrupt(Corruption {
                file: IDENTITY_FILE.into(),
                offset: 0,
                what: "identity file missing beside data",
            }));
        }
        let incarnation =
            if created { create_identity(&*storage, &options)? } else { read_identity(&*storage)? };
        let poisoned = Arc::new(AtomicBool::new(false));
        let mut streams = Vec::new();
        let mut recovery = Recovery { created, streams: BTreeMap::new() };
        for stream in StreamId::ALL {
            let names = per_stream.remove(&stream).unwrap_or_default();
            let (s, report) = StreamStore::open(
                stream,
                storage.clone(),
                options.clone(),
                incarnation,
                poisoned.clone(),
                &names,
            )?;
            recovery.streams.insert(stream, report);
            streams.push(s);
        }
        // Never issue a timestamp at or below one already stored, even if the wall clock
        // went backwards across the restart: start from the newest durable version.
        let newest = streams.iter().map(StreamStore::newest_hlc).max().unwrap_or_default();
        let hlc = HlcClock::starting_at(newest);
        Ok(Store {
            inner: Arc::new(Inner {
                storage,
                options,
                incarnation,
                streams,
                hlc: Mutex::new(hlc),
                poisoned,
                recovery,
            }),
        })
    }

    fn stream(&self, stream: StreamId) -> &StreamStore {
        &self.inner.streams[stream_index(stream)]
    }

    /// This appliance's incarnation: the origin of its writes.
    pub fn incarnation(&self) -> Incarnation {
        self.inner.incarnation
    }

    /// What recovery found when the store was opened.
    pub fn recovery(&self) -> &Recovery {
        &self.inner.recovery
    }

    /// Whether an I/O failure has poisoned the store.
    pub fn is_poisoned(&self) -> bool {
        self.inner.poisoned.load(Ordering::Acquire)
    }

    /// How many remote timestamps ran further ahead of the local clock than
    /// `HLC_DRIFT_MAX_MS` (absorbed only up to the limit, and applied).
    pub fn hlc_drift_alarms(&self) -> u64 {
        self.inner.streams.iter().map(|s| s.hlc_drift_alarms.load(Ordering::Relaxed)).sum()
    }

    /// The storage the store runs on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }

    fn now_ms(&self) -> u64 {
        self.inner.options.clock.now_ms()
    }

    // ----- writes ---------------------------------------------------------------------

    /// Queues a batch (atomic, one stream) and returns at once; [`PendingWrite::wait`]
    /// acknowledges it. Many writes may be in flight; they share fdatasyncs.
    pub fn submit(&self, batch: WriteBatch) -> Result<PendingWrite> {
        let stream = batch.stream()?;
        let s = self.stream(stream);
        let (ticket, entries) = s.submit(batch.drafts, &self.inner.hlc)?;
        if s.queued_bytes() > BUFFERED_BYTES_MAX {
            s.wait(ticket)?;
        }
        Ok(PendingWrite { store: self.clone(), stream, ticket, dots: entries })
    }

    /// Writes a batch atomically with the given durability; returns the dots.
    pub fn write(&self, batch: WriteBatch, durability: Durability) -> Result<Vec<Dot>> {
        let pending = self.submit(batch)?;
        match durability {
            Durability::Durable => pending.wait(),
            Durability::Buffered => Ok(pending.dots),
        }
    }

    fn write_one(&self, batch: WriteBatch) -> Result<Dot> {
        let dots = self.write(batch, Durability::Durable)?;
        dots.first().copied().ok_or(Error::Request("write produced no entry"))
    }

    /// Durably sets `key` (see [`WriteBatch::put`]).
    pub fn put(&self, collection: Collection, key: &[u8], value: &[u8]) -> Result<Dot> {
        self.write_one(std::mem::take(WriteBatch::new().put(collection, key, value)))
    }

    /// Durably sets `key`, superseding the versions `context` covers.
    pub fn put_with_context(
        &self,
        collection: Collection,
        key: &[u8],
        value: &[u8],
        context: &VersionVector,
    ) -> Result<Dot> {
        self.write_one(std::mem::take(WriteBatch::new().put_with_context(collection, key, value, context)))
    }

    /// Durably sets `key` if `context` is still current, else [`Error::ContextMismatch`].
    pub fn compare_and_put(
        &self,
        collection: Collection,
        key: &[u8],
        value: &[u8],
        context: &VersionVector,
    ) -> Result<Dot> {
        self.write_one(std::mem::take(WriteBatch::new().compare_and_put(collection, key, value, context)))
    }

    /// Durably deletes `key`.
    pub fn delete(&self, collection: Collection, key: &[u8]) -> Result<Dot> {
        self.write_one(std::mem::take(WriteBatch::new().delete(collection, key, None)))
    }

    /// Durably stores a typed record.
    pub fn put_record<R: Record>(&self, record: &R) -> Result<Dot> {
        let mut batch = WriteBatch::new();
        batch.record(record)?;
        self.write_one(batch)
    }

    /// Durably appends an audit event.
    pub fn append_audit(&self, event: AuditEvent) -> Result<Dot> {
        self.write_one(std::mem::take(WriteBatch::new().audit(event)))
    }

    /// Commits everything queued (including buffered writes) and waits for it.
    pub fn flush(&self) -> Result<()> {
        for s in &self.inner.streams {
            s.flush()?;
        }
        Ok(())
    }

    /// Applies entries received from a peer, in order. Entries at or below the stream
    /// vector are skipped as duplicates; one that skips ahead is [`Error::Gap`]. A
    /// call of more entries than fit one frame of a segment is applied in frame-sized
    /// parts, in order: a gap then leaves the parts before it applied (a prefix of the
    /// origin's order, so nothing is out of place) and nothing after it. Await the
    /// result before acknowledging to the peer.
    pub fn apply_remote(&self, stream: StreamId, entries: Vec<Entry>) -> Result<PendingWrite> {
        let s = self.stream(stream);
        // Remote entries need no atomicity beyond order: entries too many for one
        // frame of a segment are applied as several batches, each as large as fits.
        // Each entry is encoded once here, for both the sizing and the log.
        let frame_max = s.frame_max();
        let empty = frame_bytes(std::iter::empty());
        let (mut ticket, mut applied) = (0, Vec::new());
        let mut group = Drafts::new();
        let mut size = empty;
        let mut submit = |group: &mut Drafts| -> Result<()> {
            let (t, dots) = s.submit(std::mem::take(group), &self.inner.hlc)?;
            ticket = ticket.max(t);
            applied.extend(dots);
            Ok(())
        };
        // Encoded into buffers earlier groups handed back (and that the commit of these
        // hands back again), as local writes are.
        let mut spare = s.spare_encodings(entries.len());
        for entry in entries {
            let bytes = encode_into_spare(spare.pop(), &entry);
            let add = frame_bytes(std::iter::once(bytes.len())) - empty;
            if !group.is_empty() && size + add > frame_max {
                submit(&mut group)?;
                size = empty;
            }
            size += add;
            group.push(Draft::Remote(entry, bytes));
        }
        if !group.is_empty() {
            submit(&mut group)?;
        }
        Ok(PendingWrite { store: self.clone(), stream, ticket, dots: applied })
    }

    // ----- reads ----------------------------------------------------------------------

    /// Reads a key: its live values and causal context.
    pub fn get(&self, collection: Collection, key: &[u8]) -> Result<Read> {
        let id = (collection, key.to_vec().into_boxed_slice());
        let (versions, context) = self.stream(collection.stream()).read(&id, self.now_ms())?;
        let values = versions
            .into_iter()
            .map(|rv| Value {
                bytes: rv.value,
                dot: rv.version.dot,
                hlc: rv.version.hlc,
                expires_at_ms: rv.version.expires_at_ms,
            })
            .collect();
        Ok(Read { values, context })
    }

    /// Reads typed records under `key` (several only for siblings).
    pub fn get_record<R: Record>(&self, key: &[u8]) -> Result<Vec<R>> {
        self.get(R::COLLECTION, key)?
            .values
            .iter()
            .map(|v| postcard::from_bytes(&v.bytes).map_err(|e| Error::Record(e.to_string())))
            .collect()
    }

    /// Live keys of a collection in key order, from `start`, at most `limit`.
    pub fn scan_keys(&self, collection: Collection, start: &[u8], limit: usize) -> Vec<Vec<u8>> {
        self.stream(collection.stream()).keys(collection, start, limit, self.now_ms())
    }

    /// Recorded LWW losses of a collection (oldest first), and how many older ones were
    /// dropped past `CONFLICT_RECORDS_MAX`.
    pub fn conflicts(&self, collection: Collection) -> (Vec<ConflictRecord>, u64) {
        self.stream(collection.stream()).conflicts(collection)
    }

    /// Audit records matching a query, through the time, user and appliance indexes.
    pub fn audit_query(&self, query: &AuditQuery) -> Result<Vec<StoredAudit>> {
        self.stream(StreamId::Audit).audit_query(query, self.now_ms())
    }

    /// On an audit forwarder: drops the audit records every holder acknowledged
    /// (`acked`: the meet of the holders' acknowledged audit vectors). Returns how many.
    pub fn release_audit(&self, acked: &VersionVector) -> usize {
        self.stream(StreamId::Audit).release_audit(acked)
    }

    /// Own audit records not yet acknowledged by every holder.
    pub fn audit_backlog(&self) -> u64 {
        self.stream(StreamId::Audit).audit_backlog()
    }

    /// Verifies every origin's audit hash chain; returns the records checked.
    pub fn audit_verify(&self) -> Result<u64> {
        self.stream(StreamId::Audit).audit_verify()
    }

    // ----- replication hooks --------------------------------------------------------

    /// A digest of the stream's durable state (live versions and values in key order),
    /// for comparing replicas.
    pub fn digest(&self, stream: StreamId) -> Result<[u8; 32]> {
        self.stream(stream).digest(self.now_ms())
    }

    /// The stream's durable version vector: a contiguous prefix per origin.
    pub fn vector(&self, stream: StreamId) -> VersionVector {
        self.stream(stream).vector()
    }

    /// How many keys `stream` holds (with a durable version, tombstones included).
    pub fn key_count(&self, stream: StreamId) -> usize {
        self.stream(stream).key_count()
    }

    /// Per origin, the lowest sequence number the stream's log still holds.
    pub fn log_floors(&self, stream: StreamId) -> BTreeMap<Incarnation, u64> {
        self.stream(stream).log_floors()
    }

    /// Durable entries above `from` in log order (at most `max`): what to ship a peer
    /// whose vector is `from`. [`Error::NotCovered`] when compaction removed some.
    pub fn entries_since(&self, stream: StreamId, from: &VersionVector, max: usize) -> Result<Vec<Entry>> {
        self.stream(stream).entries_since(from, None, max)
    }

    /// [`Store::entries_since`], bounded above: per origin only the entries at or below
    /// `upto`'s sequence (none of an origin `upto` lacks). What a sender decided to
    /// ship from a vector it read earlier: entries that became durable since (a
    /// commit running meanwhile) are left for its next look, not shipped to a peer it
    /// meant to send none of that origin.
    ///
    /// ```
    /// use repl_engine::{Store, StoreOptions};
    /// use repl_wire::{Collection, StreamId, VersionVector};
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::open_dir(dir.path(), StoreOptions::default())?;
    /// store.put(Collection::Users, b"alice", b"v1")?;
    /// let upto = store.vector(StreamId::Enterprise);
    /// store.put(Collection::Users, b"bob", b"v1")?;
    /// let shipped = store.entries_between(StreamId::Enterprise, &VersionVector::new(), &upto, 100)?;
    /// assert_eq!(shipped.len(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn entries_between(
        &self,
        stream: StreamId,
        from: &VersionVector,
        upto: &VersionVector,
        max: usize,
    ) -> Result<Vec<Entry>> {
        self.stream(stream).entries_since(from, Some(upto), max)
    }

    /// [`Store::entries_between`] with each entry in its encoding, as the log holds it:
    /// what the sync machine ships, framed by [`repl_wire::encode_entries_frame`]
    /// without decoding an entry only to encode it again.
    pub fn encoded_between(
        &self,
        stream: StreamId,
        from: &VersionVector,
        upto: &VersionVector,
        max: usize,
    ) -> Result<Vec<EncodedEntry>> {
        self.stream(stream).entries_since(from, Some(upto), max)
    }

    // ----- anti-entropy ------------------------------------------------------------------

    /// The stream's vector and the hashes of `buckets` at `level` of its hash tree
    /// (see [`crate::tree`]); session versions expired at `cutoff_ms` are left out.
    pub fn tree_hashes(
        &self,
        stream: StreamId,
        cutoff_ms: u64,
        level: u8,
        buckets: &[u32],
    ) -> (VersionVector, Vec<repl_wire::BucketHash>) {
        self.stream(stream).tree_hashes(cutoff_ms, level, buckets)
    }

    /// A chunk of a snapshot: the stream's vector, then every version of the keys in
    /// leaf `buckets` (every key when empty) in key order after `resume`, whole keys,
    /// about `max_entries`; and the token to resume from (empty after the last key).
    pub fn snapshot_chunk(
        &self,
        stream: StreamId,
        buckets: &[u32],
        resume: &[u8],
        max_entries: usize,
    ) -> Result<(VersionVector, Vec<Entry>, Vec<u8>)> {
        self.stream(stream).snapshot_chunk(buckets, resume, max_entries)
    }

    /// [`Store::snapshot_chunk`] with each entry in its encoding (as logged, unless
    /// shipped with another context): what a peer is sent, without decoding it first.
    pub(crate) fn snapshot_chunk_encoded(
        &self,
        stream: StreamId,
        buckets: &[u32],
        resume: &[u8],
        max_entries: usize,
    ) -> Result<(VersionVector, Vec<EncodedEntry>, Vec<u8>)> {
        self.stream(stream).snapshot_chunk(buckets, resume, max_entries)
    }

    /// Starts receiving a snapshot of `stream`'s leaf `buckets` (`None`: every bucket)
    /// from `peer`, dropping one in progress.
    pub fn begin_snapshot(&self, stream: StreamId, peer: &str, buckets: Option<&[u32]>) -> Result<()> {
        self.stream(stream).begin_snapshot(peer, buckets)
    }

    /// Stages a snapshot chunk from `peer` on disk (and keeps the entries, without
    /// their values, for the install).
    pub fn stage_snapshot(&self, stream: StreamId, peer: &str, entries: Vec<Entry>) -> Result<()> {
        self.stream(stream).stage_snapshot(peer, entries)
    }

    /// Installs the snapshot from `peer` taken at `at` and raises the vector to
    /// include `at`, atomically (a crash before it returns changes nothing).
    pub fn finish_snapshot(&self, stream: StreamId, peer: &str, at: &VersionVector) -> Result<()> {
        self.stream(stream).finish_snapshot(peer, at)
    }

    /// Drops the snapshot being received from `peer`, if any.
    pub fn abort_snapshot(&self, stream: StreamId, peer: &str) {
        self.stream(stream).abort_snapshot(peer)
    }

    // ----- maintenance ------------------------------------------------------------------

    /// Writes a hint checkpoint of every stream; recovery then replays only what follows.
    pub fn checkpoint(&self) -> Result<()> {
        for s in &self.inner.streams {
            s.checkpoint()?;
        }
        Ok(())
    }

    /// Compacts a stream's sealed segments below `horizon` (what every in-scope peer
    /// acknowledged; a store with no peers may pass its own vector).
    pub fn compact(&self, stream: StreamId, horizon: &VersionVector) -> Result<CompactionReport> {
        self.stream(stream).compact(horizon)
    }

    /// Drops expired session versions from memory; returns how many.
    pub fn expire(&self) -> usize {
        let now = self.now_ms();
        self.inner.streams.iter().map(|s| s.expire(now)).sum()
    }

    /// Drops tombstones of `stream` that every replica has acknowledged (`acked`: the
    /// vector each in-scope replica acknowledged); returns how many.
    pub fn collect_tombstones(&self, stream: StreamId, acked: &[VersionVector]) -> usize {
        self.stream(stream).collect_tombstones(acked)
    }
}

fn identity_bytes(incarnation: Incarnation) -> [u8; IDENTITY_BYTES] {
    let mut out = [0u8; IDENTITY_BYTES];
    out[0..8].copy_from_slice(&IDENTITY_MAGIC);
    out[8..16].copy_from_slice(&incarnation.0.to_le_bytes());
    let crc = crc32fast::hash(&out[0..16]);
    out[16..20].copy_from_slice(&crc.to_le_bytes());
    out
}

fn create_identity(storage: &dyn Storage, options: &StoreOptions) -> Result<Incarnation> {
    let incarnation = Incarnation(options.incarnation_seed.unwrap_or_else(crate::rng::random_u64));
    let io = || -> std::io::Result<()> {
        let file = storage.create(IDENTITY_TMP)?;
        file.write_all_at(&identity_bytes(incarnation), 0)?;
        if options.syncs(SyncPoint::IdentityData) {
            file.sync_data()?;
        }
        storage.rename(IDENTITY_TMP, IDENTITY_FILE)?;
        if options.syncs(SyncPoint::IdentityDir) {
            storage.sync_dir()?;
        }
        Ok(())
    };
    io().map_err(io_err(IDENTITY_FILE, "create identity"))?;
    Ok(incarnation)
}

fn read_identity(storage: &dyn Storage) -> Result<Incarnation> {
    let corrupt = |what| Error::Corrupt(Corruption { file: IDENTITY_FILE.into(), offset: 0, what });
    let file = storage.open(IDENTITY_FILE).map_err(io_err(IDENTITY_FILE, "open"))?;
    let mut buf = [0u8; IDENTITY_BYTES];
    file.read_exact_at(&mut buf, 0).map_err(|_| corrupt("identity file truncated"))?;
    if buf[0..8] != IDENTITY_MAGIC {
        return Err(corrupt("bad identity magic"));
    }
    if crc32fast::hash(&buf[0..16]).to_le_bytes() != buf[16..20] {
        return Err(corrupt("identity checksum mismatch"));
    }
    Ok(Incarnation(u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{SimConfig, SimStorage};

    #[test]
    fn expiring_records_leave_the_kept_trees_alone_but_count_in_the_sessions_tree() {
        let store = Store::open(Arc::new(SimStorage::new(SimConfig::default())), StoreOptions::default())
            .expect("open");
        let root = |stream: StreamId, cutoff: u64| store.tree_hashes(stream, cutoff, 0, &[0]).1[0].hash;
        store.put(Collection::Users, b"alice", b"Alice").expect("put");
        let now = store.now_ms();
        let before = root(StreamId::Enterprise, now);
        // A write answer expires, at each replica's own moment: it must not move the root.
        let mut answer = WriteBatch::new();
        answer.put_expiring(Collection::WriteAnswers, b"request-1", b"", now + 60_000);
        store.write(answer, Durability::Durable).expect("answer");
        assert_eq!(root(StreamId::Enterprise, now), before, "an expiring record changed the kept tree");
        store.put(Collection::Users, b"bob", b"Bob").expect("put");
        assert_ne!(root(StreamId::Enterprise, now), before, "a lasting record must change it");
        // The sessions tree is built at the cutoff asked for: a live session counts.
        let empty = root(StreamId::Sessions, now);
        let mut session = WriteBatch::new();
        session.put_expiring(Collection::Sessions, b"s-1", b"token", now + 60_000);
        store.write(session, Durability::Durable).expect("session");
        assert_ne!(root(StreamId::Sessions, now), empty, "a live session is compared");
        assert_eq!(root(StreamId::Sessions, now + 60_000), empty, "an expired one is not");
    }

    #[test]
    fn the_vector_read_without_the_state_lock_follows_commits_installs_and_recovery() {
        let stream = StreamId::Enterprise;
        let agrees = |store: &Store, what: &str| {
            let (published, held) = (store.vector(stream), store.stream(stream).state_vector());
            assert_eq!(published, held, "after {what}: the published vector is not the state's");
            published
        };
        let disk = SimStorage::new(SimConfig::default());
        let a = Store::open(Arc::new(disk.clone()), StoreOptions::default()).expect("open A");
        for i in 0..20u32 {
            a.put(Collection::Users, format!("user{i:02}").as_bytes(), &[i as u8; 40]).expect("put");
        }
        let remote = Entry {
            dot: Dot { origin: Incarnation(0xfeed), seq: 1 },
            hlc: Hlc { wall_ms: a.now_ms(), logical: 0 },
            collection: Collection::Users,
            key: b"theirs".to_vec(),
            context: VersionVector::new(),
            op: Op::Put { value: b"v".to_vec(), expires_at_ms: None },
        };
        a.apply_remote(stream, vec![remote]).expect("apply").wait().expect("durable");
        let written = agrees(&a, "commits");
        assert_eq!((written.get(a.incarnation()), written.get(Incarnation(0xfeed))), (20, 1));

        // A new appliance installs A's snapshot: the vector it claims is published too.
        let b = Store::open(Arc::new(SimStorage::new(SimConfig::default())), StoreOptions::default())
            .expect("open B");
        assert!(agrees(&b, "opening empty").is_empty());
        b.begin_snapshot(stream, "a", None).expect("begin");
        let mut resume = Vec::new();
        let at = loop {
            let (vector, entries, next) = a.snapshot_chunk(stream, &[], &resume, 8).expect("chunk");
            b.stage_snapshot(stream, "a", entries).expect("stage");
            if next.is_empty() {
                break vector;
            }
            resume = next;
        };
        b.finish_snapshot(stream, "a", &at).expect("install");
        assert_eq!(agrees(&b, "a snapshot's install"), written);

        // Recovery publishes what it replayed.
        drop(a);
        let a = Store::open(Arc::new(disk.crash()), StoreOptions::default()).expect("reopen A");
        assert_eq!(agrees(&a, "recovery"), written);
    }

    #[test]
    fn a_snapshot_chunk_in_encodings_is_the_decoded_chunk_with_merged_contexts_shipped() {
        let store = Store::open(Arc::new(SimStorage::new(SimConfig::default())), StoreOptions::default())
            .expect("open");
        for i in 0..50u32 {
            store.put(Collection::Users, format!("user{i:02}").as_bytes(), &[i as u8; 40]).expect("put");
        }
        store.delete(Collection::Users, b"user07").expect("delete");
        // A concurrent write from another appliance: last-writer-wins keeps one version
        // whose context joins both, which is not the context either entry was logged with.
        let remote = Entry {
            dot: Dot { origin: Incarnation(0xfeed), seq: 1 },
            hlc: Hlc { wall_ms: store.now_ms() + 1, logical: 0 },
            collection: Collection::Users,
            key: b"user03".to_vec(),
            context: VersionVector::new(),
            op: Op::Put { value: b"theirs".to_vec(), expires_at_ms: None },
        };
        store.apply_remote(StreamId::Enterprise, vec![remote]).expect("apply").wait().expect("durable");
        let (mut shipped, mut resume) = (Vec::new(), Vec::new());
        loop {
            let (at, decoded, next) =
                store.snapshot_chunk(StreamId::Enterprise, &[], &resume, 16).expect("chunk");
            let (at_encoded, encoded, next_encoded) =
                store.snapshot_chunk_encoded(StreamId::Enterprise, &[], &resume, 16).expect("encoded chunk");
            assert_eq!((at, &next), (at_encoded, &next_encoded));
            let back: Vec<Entry> = encoded.iter().map(|e| e.decode().expect("decodes")).collect();
            assert_eq!(back, decoded, "the encoded chunk after {resume:?}");
            shipped.extend(back);
            if next.is_empty() {
                break;
            }
            resume = next;
        }
        assert_eq!(shipped.len(), 50);
        let winner = shipped.iter().find(|e| e.key == b"user03").expect("user03 shipped");
        let (ours, theirs) =
            (Dot { origin: store.incarnation(), seq: 4 }, Dot { origin: Incarnation(0xfeed), seq: 1 });
        let loser = if winner.dot == theirs { ours } else { theirs };
        assert!(winner.context.contains(loser), "the shipped context covers the loser: {winner:?}");
    }

    #[test]
    fn a_compacted_segment_holds_its_records_in_key_order() {
        let disk = SimStorage::new(SimConfig::default());
        let options = StoreOptions { segment_bytes: 8 * 1024, ..StoreOptions::default() };
        let store = Store::open(Arc::new(disk), options).expect("open");
        // Written in descending key order, some keys twice: log order is the reverse
        // of key order, and some records are dead.
        for i in (0..300u32).rev() {
            store.put(Collection::Users, format!("user{i:04}").as_bytes(), &[i as u8; 100]).expect("put");
            if i % 7 == 0 {
                store.put(Collection::UserPolicies, format!("p{i:04}").as_bytes(), b"first").expect("put");
                store.put(Collection::UserPolicies, format!("p{i:04}").as_bytes(), b"second").expect("put");
            }
        }
        let stream = StreamId::Enterprise;
        let report = store.compact(stream, &store.vector(stream)).expect("compact");
        assert!(report.segments_compacted > 1, "{report:?}");
        let mut at = store.stream(stream).disk_locations();
        at.sort();
        // The compacted segment is the one holding most records.
        let mut per_file: BTreeMap<u32, usize> = BTreeMap::new();
        for r in &at {
            *per_file.entry(r.1).or_default() += 1;
        }
        let compacted = per_file.iter().max_by_key(|(_, n)| **n).map(|(f, _)| *f).expect("records");
        let in_compacted: Vec<u32> = at.iter().filter(|r| r.1 == compacted).map(|r| r.2).collect();
        assert!(in_compacted.len() > 200, "most records were compacted: {}", in_compacted.len());
        assert!(
            in_compacted.windows(2).all(|w| w[0] < w[1]),
            "the compacted segment's records are not in key order"
        );
        for i in 0..300u32 {
            let read = store.get(Collection::Users, format!("user{i:04}").as_bytes()).expect("get");
            assert_eq!(read.value(), Some(&[i as u8; 100][..]));
        }
        let read = store.get(Collection::UserPolicies, b"p0007").expect("get");
        assert_eq!(read.value(), Some(&b"second"[..]));
    }
}
