//! One stream's log and keydir, with group commit. The heart of the store.
//!
//! Locks, in the order they are taken: `upkeep`, `io`, `merging`, `state`, the key
//! shards (see [`Keys`]), the ordered index. The group-commit leader holds `io` while
//! it takes, writes and syncs a group, then takes `merging` and lets `io` go, so the
//! next group is written while this one merges (first into the shards, then into the
//! state). Everything that needs the keys and the state to agree (a checkpoint, a
//! snapshot chunk, the hash tree, the sweeps, compaction's choice and repointing)
//! holds `merging`: no group is then half merged. Submitters take `state` and the
//! shards of their keys, briefly, so they keep queueing while the leader syncs and
//! merges.
//!
//! The keydir (in the shards) is exactly the state of the durable log as far as it is
//! merged; writes not yet merged live in the overlay beside it, which reads and
//! compare-and-set consult first. Only the commit path moves a write into the keydir,
//! after its fdatasync.

use std::collections::{btree_map, BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use repl_wire::{Collection, Dot, EncodedEntry, Entry, HlcClock, Incarnation, Op, StreamId, VersionVector};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::audit::{audit_key, chain_hash, AuditEvent, AuditIndex, AuditRecord};
use crate::error::{io_err, Corruption, Error, Result};
use crate::keydir::{key_hash, KeyMap, Keydir, Keys, OrderRef, Shard};
use crate::options::{StoreOptions, SyncPoint, CONFLICT_RECORDS_MAX};
use crate::segment::{
    self, build_frame, build_frame_into, frame_bytes, SegmentHeader, SegmentKind, Wanted, FRAME_BYTES_MAX,
    FRAME_COUNT_BYTES, FRAME_HEADER_BYTES, HEADER_BYTES,
};
use crate::storage::{is_out_of_space, Storage, StorageFile};
use crate::tree::{key_digest, leaf_of, HashTree};
use crate::versions::{context_of, merge, Loc, Merge, Version};

pub(crate) use crate::keydir::{KeyId, KeyView};

/// A batch's drafts: a single write (most of them) needs no allocation for its list.
pub(crate) type Drafts = SmallVec<[Draft; 1]>;

/// A write waiting to be turned into an entry.
#[derive(Debug, Clone)]
pub(crate) enum Draft {
    Local {
        collection: Collection,
        key: Vec<u8>,
        op: Op,
        context: Option<VersionVector>,
        cas: bool,
    },
    Audit(AuditEvent),
    /// An entry from a peer, with its encoding.
    Remote(Entry, Arc<Vec<u8>>),
}

/// What a draft will need under the state lock that can be allocated before it: the
/// state lock serializes every writer and the group commit, so an allocation made
/// there is paid by all of them.
struct Prepared {
    /// The key, as the overlay and keydir hold it (audit keys come from the dot).
    id: Option<KeyId>,
    /// The key's [`key_hash`].
    hash: Option<u64>,
    /// An empty list for the key's versions after the write.
    versions: Vec<Version>,
    /// A buffer sized for the entry's encoding, for an entry too large for the spare
    /// buffers ([`StreamStore::ENCODING_KEPT_CAPACITY`]): it is encoded under the state
    /// lock, and this keeps the allocation out of it.
    encoding: Option<Arc<Vec<u8>>>,
}

impl Prepared {
    fn for_draft(draft: &Draft) -> Self {
        match draft {
            Draft::Local { collection, key, op, context, .. } => {
                // A context left to the store is the key's current one: not known here.
                let dots = context.as_ref().map_or(0, VersionVector::len);
                let room = Entry::encoded_len_max(key, dots, op);
                Prepared {
                    id: Some((*collection, key.as_slice().into())),
                    hash: Some(key_hash(&(*collection, key.as_slice()))),
                    versions: Vec::with_capacity(2),
                    encoding: (room > StreamStore::ENCODING_KEPT_CAPACITY)
                        .then(|| Arc::new(Vec::with_capacity(room))),
                }
            }
            Draft::Remote(entry, _) => Prepared {
                id: Some((entry.collection, entry.key.as_slice().into())),
                hash: Some(key_hash(&(entry.collection, entry.key.as_slice()))),
                versions: Vec::with_capacity(2),
                encoding: None,
            },
            Draft::Audit(_) => Prepared { id: None, hash: None, versions: Vec::new(), encoding: None },
        }
    }
}

/// `entry` encoded into `buffer` (a spare one, not shared), or into a new one.
pub(crate) fn encode_into_spare(buffer: Option<Arc<Vec<u8>>>, entry: &Entry) -> Arc<Vec<u8>> {
    let mut buffer = buffer.unwrap_or_default();
    let written = Arc::get_mut(&mut buffer).expect("a spare encoding is not shared");
    written.clear();
    entry.encode_into(written);
    buffer
}

/// Moves what `emptied` holds into `spare`, up to `kept` in all; frees the rest.
fn refill<T>(spare: &mut Vec<T>, emptied: &mut Vec<T>, kept: usize) {
    let handed = emptied.len().min(kept.saturating_sub(spare.len()));
    spare.extend(emptied.drain(..handed));
    emptied.clear();
}

/// A value that lost a last-writer-wins resolution, kept so no write is lost silently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// The collection.
    pub collection: Collection,
    /// The key.
    pub key: Vec<u8>,
    /// The losing write.
    pub loser: Dot,
    /// Its value (`None` for a losing delete).
    pub value: Option<Vec<u8>>,
    /// The write that won.
    pub winner: Dot,
}

/// A queued entry, its encoding, and its key's [`key_hash`].
type QueuedEntry = (Entry, Arc<Vec<u8>>, u64);

#[derive(Debug)]
struct Queued {
    ticket: u64,
    entries: Vec<QueuedEntry>,
    bytes: u64,
}

#[derive(Debug)]
struct FileMeta {
    file: Arc<dyn StorageFile>,
    name: String,
    kind: SegmentKind,
    /// End of the durable records (the next append offset for the active segment).
    end: u64,
    /// Highest sequence per origin in the segment.
    vector: VersionVector,
    /// Whether the directory entry is known durable.
    dir_synced: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileImage {
    number: u32,
    compacted: bool,
    end: u64,
    vector: VersionVector,
}

/// An origin-index point as stored: (first sequence, file, frame offset).
type IndexPoint = (u64, u32, u32);

/// The checkpoint of one stream, as stored in a hint file.
#[derive(Debug, Serialize, Deserialize)]
struct StreamImage {
    stream: StreamId,
    files: Vec<FileImage>,
    active: Option<u32>,
    next_file: u32,
    keydir: Vec<KeyImage>,
    vector: VersionVector,
    origin_index: Vec<(Incarnation, Vec<IndexPoint>)>,
    conflicts: Vec<ConflictRecord>,
    conflicts_dropped: u64,
    audit: AuditIndex,
}

/// One key of [`StreamImage::keydir`]: collection, key bytes (one byte string, not
/// a sequence of `u8`s: the same bytes in postcard, read and written at once),
/// versions.
#[derive(Debug, Serialize, Deserialize)]
struct KeyImage(Collection, #[serde(with = "repl_wire::bytes")] Vec<u8>, Vec<Version>);

/// Key bytes written as one byte string (see [`KeyImage`]); the hint's keydir is
/// written by hand ([`KeydirView::encode_into`]), tests hold it to this.
#[cfg(test)]
struct KeyBytes<'a>(&'a [u8]);

#[cfg(test)]
impl Serialize for KeyBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        repl_wire::bytes::serialize(self.0, serializer)
    }
}

/// [`StreamImage`] as written: the same fields in the same order, borrowed from the
/// state, so a checkpoint serializes the keydir in place instead of copying it first
/// (the copy was most of a checkpoint's time under the state lock). The bytes are the
/// same (a test holds them equal).
#[cfg_attr(test, derive(Serialize))]
struct StreamImageView<'a> {
    stream: StreamId,
    files: Vec<FileImage>,
    active: Option<u32>,
    next_file: u32,
    keydir: KeydirView<'a>,
    vector: &'a VersionVector,
    origin_index: Vec<(Incarnation, Vec<IndexPoint>)>,
    conflicts: ConflictsView<'a>,
    conflicts_dropped: u64,
    audit: &'a AuditIndex,
}

impl StreamImageView<'_> {
    /// Appends the image's bytes to `out`: what postcard writes for it (a struct is its
    /// fields one after another), with the keydir, nearly all of it, written by hand.
    /// The checkpoint does this under the state lock, where serde's postcard took
    /// about 0.5 us per key.
    fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        let record = |e: postcard::Error| Error::Record(e.to_string());
        let head = (self.stream, &self.files, self.active, self.next_file);
        let mut taken = postcard::to_extend(&head, std::mem::take(out)).map_err(record)?;
        self.keydir.encode_into(&mut taken)?;
        let tail = (self.vector, &self.origin_index, &self.conflicts, self.conflicts_dropped, self.audit);
        *out = postcard::to_extend(&tail, taken).map_err(record)?;
        Ok(())
    }
}

/// The keydir, written as `StreamImage::keydir` is (a sequence of (collection, key
/// bytes, versions)).
struct KeydirView<'a>(&'a Keydir<'a>);

impl KeydirView<'_> {
    /// Room taken ahead per key: a 16-byte key with one version of a short context.
    const BYTES_PER_KEY_EXPECTED: usize = 48;

    /// Appends the keydir as postcard writes it through serde (a test holds the bytes
    /// equal): per key its collection's variant, its bytes, and each version's dot,
    /// HLC, context, tombstone flag, expiry and disk location.
    fn encode_into(&self, out: &mut Vec<u8>) -> Result<()> {
        use repl_wire::bytes::{put_bytes, put_varint, put_vector};
        out.reserve(self.0.len() * Self::BYTES_PER_KEY_EXPECTED);
        put_varint(out, self.0.len() as u64);
        for ((c, k), versions) in self.0.iter() {
            put_varint(out, u64::from(c.index()));
            put_bytes(out, k);
            put_varint(out, versions.len() as u64);
            for v in versions {
                put_varint(out, v.dot.origin.0);
                put_varint(out, v.dot.seq);
                put_varint(out, v.hlc.wall_ms);
                put_varint(out, u64::from(v.hlc.logical));
                put_vector(out, &v.context);
                out.push(u8::from(v.tombstone));
                match v.expires_at_ms {
                    None => out.push(0),
                    Some(t) => {
                        out.push(1);
                        put_varint(out, t);
                    }
                }
                match v.loc {
                    Loc::Disk { file, offset, len } => {
                        // `Loc::Disk` is the enum's first variant.
                        out.push(0);
                        put_varint(out, u64::from(file));
                        put_varint(out, u64::from(offset));
                        put_varint(out, u64::from(len));
                    }
                    Loc::Pending(_) => {
                        return Err(Error::Record("a checkpoint met a version not yet durable".into()))
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
impl Serialize for KeydirView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for ((c, k), v) in self.0.iter() {
            seq.serialize_element(&(c, KeyBytes(k), v))?;
        }
        seq.end()
    }
}

/// Every conflict record, oldest first per collection, as `StreamImage::conflicts`.
struct ConflictsView<'a>(&'a BTreeMap<Collection, VecDeque<ConflictRecord>>);

impl Serialize for ConflictsView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.0.values().map(VecDeque::len).sum()))?;
        for record in self.0.values().flatten() {
            seq.serialize_element(record)?;
        }
        seq.end()
    }
}

#[derive(Debug, Default)]
struct State {
    vector: VersionVector,
    submitted: VersionVector,
    /// The previous `submitted`, kept for its allocation (see `submit`).
    submitted_spare: VersionVector,
    /// Emptied lists, kept for their allocations: a batch's staged keys, and the entry
    /// lists of committed batches (handed back by the group commit), which submitting
    /// batches take instead of allocating.
    staged_spare: Vec<(u64, KeyId, Vec<Version>)>,
    entries_spare: Vec<Vec<QueuedEntry>>,
    encodings_spare: Vec<Arc<Vec<u8>>>,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    next_ticket: u64,
    files: BTreeMap<u32, FileMeta>,
    active: Option<u32>,
    /// Where the next queued batch would land in the worst case (file, offset).
    reserve: Option<(u32, u64)>,
    /// Where the next group's frame goes (segment, offset): past the segment's `end`
    /// while a group written there is not merged yet.
    write_at: Option<(u32, u64)>,
    /// How much of the `reserve` segment is allocated (it grows by
    /// [`StreamStore::ALLOCATION_STEP`], so a reopen reads no more zeros than that).
    allocated: u64,
    next_file: u32,
    /// Per origin: first sequence of that origin in each frame -> (file, frame offset).
    origin_index: BTreeMap<Incarnation, BTreeMap<u64, (u32, u32)>>,
    conflicts: BTreeMap<Collection, VecDeque<ConflictRecord>>,
    conflicts_dropped: u64,
    audit: AuditIndex,
    submitted_heads: BTreeMap<Incarnation, [u8; 32]>,
    hint_generation: u64,
    /// Audit records every holder acknowledged (a non-holder may drop them).
    audit_released: VersionVector,
    /// The anti-entropy hash tree, built at its first use and kept current after.
    tree: Option<HashTree>,
    /// No version held expires before this (a lower bound: lowered by every merge of
    /// an expiring version, raised by an expiry sweep). The sweep runs every second on
    /// every stream; without this it walked every key of a stream that holds nothing
    /// expiring, under the state lock (a third of all CPU with a million users).
    next_expiry_ms: Option<u64>,
}

/// The earliest expiry of any version in `keydir`.
fn earliest_expiry(keydir: &Keydir<'_>) -> Option<u64> {
    keydir.values().flatten().filter_map(|v| v.expires_at_ms).min()
}

/// What merging a durable entry into its key did, for the state's indexes.
struct KeyMerged {
    outcome: Merge,
    /// The key's first version after the merge, when it held versions before.
    winner: Option<Dot>,
    /// The key's digests before and after, when the hash tree is kept.
    old_digest: Option<[u64; 4]>,
    new_digest: Option<[u64; 4]>,
    /// The entry's expiry.
    expires: Option<u64>,
}

/// What recovery found and did for one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamRecovery {
    /// The hint generation recovery started from, if a valid hint was found.
    pub hint_generation: Option<u64>,
    /// Entries replayed from segments after the hint.
    pub entries_replayed: u64,
    /// Bytes of torn tail cut (zeroed) from the last segment.
    pub torn_bytes_cut: u64,
    /// Stale files removed (superseded segments and hints).
    pub stale_files_removed: u64,
}

/// What one compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Log segments compacted away.
    pub segments_compacted: usize,
    /// Live entries copied into the compacted segment.
    pub entries_kept: usize,
    /// Segments compacted although the horizon did not cover them, because the log
    /// exceeded its retention limit: peers behind them need anti-entropy.
    pub forced: bool,
}

pub(crate) struct StreamStore {
    pub(crate) stream: StreamId,
    storage: Arc<dyn Storage>,
    options: Arc<StoreOptions>,
    incarnation: Incarnation,
    state: Mutex<State>,
    /// Every key: durable versions and queued ones, in shards with a lock each.
    keys: Keys,
    /// Held while taking, writing and syncing a group (and while a snapshot is
    /// installed); holds the commit path's reusable frame buffers.
    io: Mutex<FrameScratch>,
    /// Held while merging a group into the keys and the state, taken before `io` is
    /// let go, so groups merge in the order they were written, one group's merge
    /// overlapping the next one's write and sync. Held too by whatever needs the keys
    /// and the state to agree (no group half merged).
    merging: Mutex<MergeScratch>,
    /// The last ticket taken into a group (being written, or written).
    taken_ticket: AtomicU64,
    /// Entry lists of merged groups, emptied with no lock held, handed to
    /// `State::entries_spare` when the next group merges.
    emptied: Mutex<Emptied>,
    /// Held by checkpoints, compactions and snapshot installs, one at a time (taken
    /// before `io`). A checkpoint or a compaction's copy does not hold `io`: commits
    /// go on meanwhile, and only the short sections under `merging` exclude them.
    upkeep: Mutex<()>,
    /// Whether a group-commit leader is active; waiters sleep on `leader_changed`.
    leader: Mutex<bool>,
    leader_changed: Condvar,
    poisoned: Arc<AtomicBool>,
    durable_ticket: AtomicU64,
    /// A copy of `state.vector`, set under the state lock wherever that changes, and
    /// read under this lock alone: [`StreamStore::vector`] does not wait for the state
    /// lock, which a checkpoint holds while it encodes the whole keydir (an async
    /// driver reads the vector on every turn of its loop).
    durable_vector: Mutex<VersionVector>,
    pub(crate) hlc_drift_alarms: AtomicU64,
    queued_bytes: std::sync::atomic::AtomicUsize,
    /// Snapshots being received, by the peer sending them.
    staging: Mutex<BTreeMap<String, Staging>>,
}

/// A snapshot being received: a compacted segment under a temporary name, and where
/// each staged entry is in it.
#[derive(Debug)]
struct Staging {
    number: u32,
    name: String,
    file: Arc<dyn StorageFile>,
    end: u64,
    /// Each staged entry (its value dropped unless an audit record's: only those are
    /// read at the merge) with its place in the staged segment (offset, length): the
    /// install merges these instead of reading back and decoding what it wrote.
    staged: Vec<(Entry, u32, u32)>,
    /// The leaf buckets the snapshot covers (`None`: every bucket).
    buckets: Option<Vec<u32>>,
}

/// What a merged group hands back to the submitters: its emptied entry lists, and
/// the encodings no version points at any more.
#[derive(Debug, Default)]
struct Emptied {
    lists: Vec<Vec<QueuedEntry>>,
    encodings: Vec<Arc<Vec<u8>>>,
}

/// The buffers a group commit builds its frame in, kept between groups.
#[derive(Debug, Default)]
struct FrameScratch {
    frame: Vec<u8>,
    spans: Vec<(u32, u32)>,
}

/// The group-commit leadership, given up when dropped.
struct Leadership<'a>(&'a StreamStore);

impl Drop for Leadership<'_> {
    fn drop(&mut self) {
        *lock(&self.0.leader) = false;
        self.0.leader_changed.notify_all();
    }
}

/// The merge's reusable list.
#[derive(Default)]
struct MergeScratch {
    /// The group's entry spans in its frame.
    spans: Vec<(u32, u32)>,
}

impl FrameScratch {
    /// Kept up to this capacity; a larger one (after a big batch) is given back.
    const KEPT_BYTES_MAX: usize = 2 * 1024 * 1024;

    fn trim(&mut self) {
        if self.frame.capacity() > Self::KEPT_BYTES_MAX {
            self.frame = Vec::new();
            self.spans = Vec::new();
        }
    }
}

impl std::fmt::Debug for StreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamStore").field("stream", &self.stream).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state is only mutated in ways that keep it consistent between statements
    // that can panic; a panicking thread is a bug that the poison flag already stops.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn log_name(stream: StreamId, n: u32) -> String {
    format!("{}-{:010}.log", stream.name(), n)
}
pub(crate) fn compacted_name(stream: StreamId, n: u32) -> String {
    format!("{}-{:010}.cmp", stream.name(), n)
}
fn hint_name(stream: StreamId, generation: u64) -> String {
    format!("{}-{:010}.hint", stream.name(), generation)
}
fn hint_tmp_name(stream: StreamId) -> String {
    format!("{}.hint.tmp", stream.name())
}

/// The kinds of file a stream owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Log,
    Compacted,
    /// A compacted segment still being written (renamed into place once synced).
    CompactedTmp,
    Hint,
    HintTmp,
}

/// Parses a data-directory file name of one of our streams.
pub(crate) fn parse_name(name: &str) -> Option<(StreamId, FileKind, u64)> {
    for stream in StreamId::ALL {
        if name == hint_tmp_name(stream) {
            return Some((stream, FileKind::HintTmp, 0));
        }
        let Some(rest) = name.strip_prefix(stream.name()).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let (num, ext) = rest.split_once('.')?;
        if num.len() != 10 || !num.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = num.parse().ok()?;
        let kind = match ext {
            "log" => FileKind::Log,
            "cmp" => FileKind::Compacted,
            "cmp.tmp" => FileKind::CompactedTmp,
            "hint" => FileKind::Hint,
            _ => return None,
        };
        return Some((stream, kind, n));
    }
    None
}

const HINT_MAGIC: [u8; 8] = *b"REPLHNT\0";
const HINT_VERSION: u16 = 1;
const HINT_HEADER_BYTES: usize = 8 + 2 + 6 + 8 + 32;

impl StreamStore {
    /// Opens (recovers) one stream from the files named for it.
    pub(crate) fn open(
        stream: StreamId,
        storage: Arc<dyn Storage>,
        options: Arc<StoreOptions>,
        incarnation: Incarnation,
        poisoned: Arc<AtomicBool>,
        names: &[(String, FileKind, u64)],
    ) -> Result<(StreamStore, StreamRecovery)> {
        let s = StreamStore {
            stream,
            storage,
            options,
            incarnation,
            state: Mutex::new(State::default()),
            keys: Keys::default(),
            io: Mutex::new(FrameScratch::default()),
            merging: Mutex::new(MergeScratch::default()),
            taken_ticket: AtomicU64::new(0),
            emptied: Mutex::default(),
            upkeep: Mutex::new(()),
            leader: Mutex::new(false),
            leader_changed: Condvar::new(),
            poisoned,
            durable_ticket: AtomicU64::new(0),
            durable_vector: Mutex::new(VersionVector::new()),
            hlc_drift_alarms: AtomicU64::new(0),
            queued_bytes: std::sync::atomic::AtomicUsize::new(0),
            staging: Mutex::new(BTreeMap::new()),
        };
        let report = s.recover(names)?;
        Ok((s, report))
    }

    pub(crate) fn frame_max(&self) -> u64 {
        FRAME_BYTES_MAX.min(self.options.segment_bytes.saturating_sub(HEADER_BYTES + FRAME_HEADER_BYTES))
    }

    // ----- recovery -------------------------------------------------------------

    fn recover(&self, names: &[(String, FileKind, u64)]) -> Result<StreamRecovery> {
        let mut report = StreamRecovery::default();
        let mut st = lock(&self.state);
        let mut kd = self.keys.lock_all();
        let mut logs: Vec<(u32, String)> = Vec::new();
        let mut cmps: Vec<(u32, String)> = Vec::new();
        let mut hints: Vec<(u64, String)> = Vec::new();
        for (name, kind, n) in names {
            let number = || {
                u32::try_from(*n).map_err(|_| {
                    Error::Corrupt(Corruption {
                        file: name.clone(),
                        offset: 0,
                        what: "file number out of range",
                    })
                })
            };
            match kind {
                FileKind::Log => logs.push((number()?, name.clone())),
                FileKind::Compacted => cmps.push((number()?, name.clone())),
                FileKind::Hint => hints.push((*n, name.clone())),
                FileKind::HintTmp | FileKind::CompactedTmp => {
                    self.storage.remove(name).map_err(io_err(name, "remove"))?;
                    report.stale_files_removed += 1;
                }
            }
        }
        logs.sort();
        cmps.sort();
        hints.sort();
        st.next_file = logs.iter().chain(cmps.iter()).map(|(n, _)| n + 1).max().unwrap_or(1);

        // Newest valid hint first; an invalid one is skipped (an older one, or a full
        // replay, still has every record).
        let mut image = None;
        for (generation, name) in hints.iter().rev() {
            let Ok(img) = self.load_hint(name) else { continue };
            let present = img.files.iter().all(|f| {
                let set = if f.compacted { &cmps } else { &logs };
                set.iter().any(|(n, _)| *n == f.number)
            });
            if present {
                image = Some((*generation, img));
                break;
            }
        }

        let mut replay_from: BTreeMap<u32, u64> = BTreeMap::new();
        match image {
            Some((generation, img)) => {
                report.hint_generation = Some(generation);
                st.hint_generation = generation;
                let listed: BTreeMap<u32, &FileImage> = img.files.iter().map(|f| (f.number, f)).collect();
                // Log segments older than the oldest listed one were compacted away;
                // any other unlisted log segment was created after the checkpoint.
                let oldest_listed_log =
                    img.files.iter().filter(|f| !f.compacted).map(|f| f.number).min().unwrap_or(0);
                for f in &img.files {
                    let name = if f.compacted {
                        compacted_name(self.stream, f.number)
                    } else {
                        log_name(self.stream, f.number)
                    };
                    let file =
                        self.storage.open(&name).map_err(io_err(&name, "open segment named by hint"))?;
                    let kind = if f.compacted { SegmentKind::Compacted } else { SegmentKind::Log };
                    st.files.insert(
                        f.number,
                        FileMeta { file, name, kind, end: f.end, vector: f.vector.clone(), dir_synced: true },
                    );
                    if Some(f.number) == img.active {
                        replay_from.insert(f.number, f.end);
                    }
                }
                // Log segments after the active one were created (and maybe written)
                // after the checkpoint: replay them whole. Unlisted older segments and
                // unlisted compacted segments were superseded.
                let active = img.active.unwrap_or(0);
                for (n, name) in logs.iter().chain(cmps.iter()) {
                    let is_log = logs.iter().any(|(l, _)| l == n);
                    if is_log && *n > active {
                        replay_from.insert(*n, HEADER_BYTES);
                        st.files.remove(n);
                    } else if !listed.contains_key(n) {
                        if is_log && *n > oldest_listed_log {
                            return Err(Error::Corrupt(Corruption {
                                file: name.clone(),
                                offset: 0,
                                what: "log segment missing from the checkpoint that covers it",
                            }));
                        }
                        self.storage.remove(name).map_err(io_err(name, "remove stale segment"))?;
                        report.stale_files_removed += 1;
                    }
                }
                for (g, name) in &hints {
                    if *g != generation {
                        self.storage.remove(name).map_err(io_err(name, "remove stale hint"))?;
                        report.stale_files_removed += 1;
                    }
                }
                kd.load(img.keydir.into_iter().map(|KeyImage(c, k, v)| ((c, k.into_boxed_slice()), v)));
                // Unknown until the first sweep, which walks the keydir once and sets
                // it (no extra pass over the keydir while opening).
                st.next_expiry_ms = Some(0);
                st.vector = img.vector;
                st.origin_index = img
                    .origin_index
                    .into_iter()
                    .map(|(o, v)| (o, v.into_iter().map(|(s, f, off)| (s, (f, off))).collect()))
                    .collect();
                for c in img.conflicts {
                    st.conflicts.entry(c.collection).or_default().push_back(c);
                }
                st.conflicts_dropped = img.conflicts_dropped;
                st.audit = img.audit;
                st.active = img.active;
                st.next_file = st.next_file.max(img.next_file);
            }
            None => {
                for (n, _) in cmps.iter().chain(logs.iter()) {
                    replay_from.insert(*n, HEADER_BYTES);
                }
            }
        }

        // Log segments at the end that hold no record: preallocated spares. One whose
        // header never became durable was being created at the crash and is removed;
        // the scan backwards stops at the first segment with data (whose damage, if
        // any, the scan below reports).
        let mut order: Vec<u32> = replay_from.keys().copied().collect();
        let name_of =
            |n: u32| logs.iter().chain(cmps.iter()).find(|(x, _)| *x == n).map(|(_, name)| name.clone());
        // Compacted segments replay first (they hold the oldest live records).
        order.sort_by_key(|n| (!cmps.iter().any(|(c, _)| c == n), *n));
        let mut keep = Vec::new();
        while let Some(&last) = order.last() {
            if st.files.contains_key(&last) || cmps.iter().any(|(c, _)| *c == last) {
                break;
            }
            let name = name_of(last).unwrap_or_default();
            let file = self.storage.open(&name).map_err(io_err(&name, "open segment"))?;
            let len =
                file.len().map_err(io_err(&name, "stat"))?.min(self.options.segment_bytes.max(HEADER_BYTES));
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, 0).map_err(io_err(&name, "read segment"))?;
            if bytes.iter().skip(HEADER_BYTES as usize).any(|&b| b != 0) {
                break;
            }
            match SegmentHeader::decode(&bytes, &name) {
                Ok(_) => keep.push(last),
                Err(Error::Corrupt(_)) => {
                    self.storage.remove(&name).map_err(io_err(&name, "remove aborted segment"))?;
                    report.stale_files_removed += 1;
                }
                Err(e) => return Err(e),
            }
            order.pop();
        }
        order.extend(keep.into_iter().rev());

        let data_files: Vec<u32> = order.clone();
        for (i, n) in data_files.iter().enumerate() {
            let name =
                name_of(*n).unwrap_or_else(|| st.files.get(n).map(|m| m.name.clone()).unwrap_or_default());
            let file = match st.files.get(n) {
                Some(meta) => meta.file.clone(),
                None => self.storage.open(&name).map_err(io_err(&name, "open segment"))?,
            };
            let len = file.len().map_err(io_err(&name, "stat"))?;
            // (A compacted segment holds every live record it replaced: any size.)
            let compacted = cmps.iter().any(|(c, _)| c == n);
            if !compacted && len > self.options.segment_bytes.max(FRAME_BYTES_MAX + HEADER_BYTES) * 2 {
                return Err(Error::Corrupt(Corruption {
                    file: name,
                    offset: len,
                    what: "segment larger than any we write",
                }));
            }
            let mut bytes = vec![0u8; len as usize];
            file.read_exact_at(&mut bytes, 0).map_err(io_err(&name, "read segment"))?;
            let scanned = segment::scan(&bytes, &name, self.frame_max().max(FRAME_BYTES_MAX))?;
            if scanned.header.stream != self.stream {
                return Err(Error::Corrupt(Corruption {
                    file: name,
                    offset: 11,
                    what: "segment belongs to another stream",
                }));
            }
            let is_last = i + 1 == data_files.len();
            if let Some(until) = scanned.torn_until {
                if !is_last {
                    return Err(Error::Corrupt(Corruption {
                        file: name,
                        offset: scanned.end,
                        what: "damaged record in a segment that later segments follow",
                    }));
                }
                // Zero the torn bytes so no fragment of them is ever read as a record.
                // The next append's fdatasync makes the zeros durable with it.
                let zeros = vec![0u8; (until - scanned.end) as usize];
                file.write_all_at(&zeros, scanned.end).map_err(io_err(&name, "cut torn tail"))?;
                report.torn_bytes_cut += until - scanned.end;
            }
            let from = replay_from.get(n).copied().unwrap_or(HEADER_BYTES);
            let kind = scanned.header.kind;
            let meta = st.files.entry(*n).or_insert_with(|| FileMeta {
                file: file.clone(),
                name: name.clone(),
                kind,
                end: HEADER_BYTES,
                vector: VersionVector::new(),
                dir_synced: true,
            });
            meta.end = meta.end.max(scanned.end);
            for frame in &scanned.frames {
                if frame.offset < from {
                    continue;
                }
                let mut seen: Vec<Incarnation> = Vec::new();
                for e in &frame.entries {
                    let loc = Loc::Disk { file: *n, offset: e.offset, len: e.len };
                    let index_at =
                        first_of_origin(&mut seen, e.entry.dot.origin).then_some(frame.offset as u32);
                    self.apply_durable(&mut st, &mut kd, &e.entry, loc, index_at);
                    report.entries_replayed += 1;
                }
            }
            if kind == SegmentKind::Log {
                st.active = Some(st.active.map_or(*n, |a| a.max(*n)));
            }
        }
        st.submitted = st.vector.clone();
        self.publish_vector(&st);
        st.submitted_heads = st.audit.heads.clone();
        if let Some(a) = st.active {
            let end = st.files.get(&a).map_or(HEADER_BYTES, |m| m.end);
            st.reserve = Some((a, end));
            st.allocated = match st.files.get(&a) {
                Some(m) => m.file.len().map_err(io_err(&m.name, "stat"))?,
                None => 0,
            };
        }
        Ok(report)
    }

    fn load_hint(&self, name: &str) -> Result<StreamImage> {
        let corrupt = |what| Error::Corrupt(Corruption { file: name.to_string(), offset: 0, what });
        let file = self.storage.open(name).map_err(io_err(name, "open hint"))?;
        let len = file.len().map_err(io_err(name, "stat hint"))?;
        let mut bytes = vec![0u8; len as usize];
        file.read_exact_at(&mut bytes, 0).map_err(io_err(name, "read hint"))?;
        let head = bytes.get(..HINT_HEADER_BYTES).ok_or_else(|| corrupt("hint shorter than its header"))?;
        if head[0..8] != HINT_MAGIC {
            return Err(corrupt("bad hint magic"));
        }
        let version = u16::from_le_bytes([head[8], head[9]]);
        if version != HINT_VERSION {
            return Err(Error::UnsupportedFormat { file: name.to_string(), version });
        }
        let plen = u64::from_le_bytes(head[16..24].try_into().expect("slice of 8"));
        let payload = bytes.get(HINT_HEADER_BYTES..).ok_or_else(|| corrupt("hint truncated"))?;
        if payload.len() as u64 != plen || blake3::hash(payload).as_bytes()[..] != head[24..56] {
            return Err(corrupt("hint checksum mismatch"));
        }
        let img: StreamImage =
            postcard::from_bytes(payload).map_err(|_| corrupt("hint payload malformed"))?;
        if img.stream != self.stream {
            return Err(corrupt("hint belongs to another stream"));
        }
        Ok(img)
    }

    // ----- applying durable entries -------------------------------------------

    /// Applies one durable entry to the keys and the state, with every key locked:
    /// recovery's replay. The commit path does the same in two steps (the keys, then
    /// the state), so both build the same state. `index_at` is the frame's offset when
    /// this is the first entry of its origin in the frame: the per-origin index keeps
    /// one point per frame, not per entry.
    fn apply_durable(
        &self,
        st: &mut State,
        kd: &mut Keydir<'_>,
        entry: &Entry,
        loc: Loc,
        index_at: Option<u32>,
    ) {
        self.record_durable(st, entry, &loc, index_at);
        self.merge_durable(st, kd, entry, loc, None);
    }

    /// Records a durable entry in the state: its segment's vector, the stream's, and
    /// the per-origin index.
    fn record_durable(&self, st: &mut State, entry: &Entry, loc: &Loc, index_at: Option<u32>) {
        let Loc::Disk { file, .. } = *loc else { unreachable!("durable entries have a disk location") };
        let meta = st.files.get_mut(&file).expect("a durable entry's segment is open");
        meta.vector.advance(entry.dot);
        if let (Some(frame_offset), SegmentKind::Log) = (index_at, meta.kind) {
            st.origin_index.entry(entry.dot.origin).or_default().insert(entry.dot.seq, (file, frame_offset));
        }
        st.vector.advance(entry.dot);
    }

    /// Merges a durable entry's version into its key and the state's indexes, with
    /// every key locked (recovery, snapshot installs). `covered`, for entries that
    /// arrive out of order (a snapshot), applies the obsolete-version rule.
    fn merge_durable(
        &self,
        st: &mut State,
        kd: &mut Keydir<'_>,
        entry: &Entry,
        loc: Loc,
        covered: Option<&VersionVector>,
    ) {
        let hash = key_hash(&(entry.collection, entry.key.as_slice()));
        let tracked = st.tree.is_some();
        let (shard, mut order) = kd.shard_mut(hash);
        let merged = self.merge_key(shard, &mut order, hash, entry, loc, covered, None, tracked);
        self.merged(st, entry, merged);
    }

    /// Merges a durable entry's version into its key's versions in `shard` (whose
    /// ordered index `order` reaches). `owned` is the entry's key when the caller
    /// already holds a copy to give, with a spare list of versions (the commit path
    /// takes both from the overlay), so a new key's key and versions are not allocated
    /// twice. `tracked`: the hash tree is kept, so the key's digests before and after
    /// are wanted.
    #[allow(clippy::too_many_arguments)] // the key's shard, index and hash, the entry and its place, three options
    fn merge_key(
        &self,
        shard: &mut Shard,
        order: &mut OrderRef<'_>,
        hash: u64,
        entry: &Entry,
        loc: Loc,
        covered: Option<&VersionVector>,
        owned: Option<(KeyId, Vec<Version>)>,
        tracked: bool,
    ) -> KeyMerged {
        let policy = self.options.policy(entry.collection);
        let incoming = Version::from_entry(entry, loc);
        let expires = incoming.expires_at_ms;
        let digest = |versions: &[Version]| {
            if tracked {
                key_digest(entry.collection, &entry.key, versions, 0)
            } else {
                None
            }
        };
        let view = (entry.collection, entry.key.as_slice());
        let view = &view as &dyn KeyView;
        // One lookup finds the key or makes its place; recovery and snapshots copy the
        // key only when it is new.
        let make = || {
            owned.unwrap_or_else(|| ((entry.collection, entry.key.as_slice().into()), Vec::with_capacity(1)))
        };
        let (held, fresh) = shard.slot(hash, view, make, order);
        let old_digest = if fresh { None } else { digest(held) };
        let outcome = merge(policy, held, incoming, covered);
        let (winner, new_digest) = (held.first().map(|v| v.dot).filter(|_| !fresh), digest(held));
        if held.is_empty() {
            shard.remove(view, order);
        }
        KeyMerged { outcome, winner, old_digest, new_digest, expires }
    }

    /// What follows a merge into the keydir, in the state: the next expiry, the hash
    /// tree, conflict records, the audit indexes.
    fn merged(&self, st: &mut State, entry: &Entry, merged: KeyMerged) {
        let KeyMerged { outcome, winner, old_digest, new_digest, expires } = merged;
        if let Some(t) = expires {
            st.next_expiry_ms = Some(st.next_expiry_ms.map_or(t, |n| n.min(t)));
        }
        if let Some(tree) = st.tree.as_mut() {
            tree.update(entry.collection, &entry.key, old_digest, new_digest);
        }
        let applied = matches!(outcome, Merge::Applied { .. });
        if let Merge::Applied { losers } = outcome {
            let winner = winner.unwrap_or(entry.dot);
            for loser in losers {
                let value = match read_loc(&st.files, &loser.loc) {
                    Ok(Entry { op: Op::Put { value, .. }, .. }) => Some(value),
                    _ => None,
                };
                let record = ConflictRecord {
                    collection: entry.collection,
                    key: entry.key.clone(),
                    loser: loser.dot,
                    value,
                    winner,
                };
                let list = st.conflicts.entry(entry.collection).or_default();
                list.push_back(record);
                if list.len() > CONFLICT_RECORDS_MAX {
                    list.pop_front();
                    st.conflicts_dropped += 1;
                }
            }
        }
        // A record merged again (a snapshot brings what is held, or what was pruned
        // here) is indexed and chained already: chaining it again would make its
        // origin's head the hash of no record, and this appliance's next record would
        // break its own chain. The head is the hash of the newest record merged.
        if entry.collection == Collection::Audit && applied {
            if let Op::Put { value, .. } = &entry.op {
                let record = postcard::from_bytes::<AuditRecord>(value).ok();
                if let Some(record) = &record {
                    st.audit.insert(entry.dot, &record.event);
                }
                let prev = match record {
                    Some(r) => r.prev_hash,
                    None => st.audit.heads.get(&entry.dot.origin).copied().unwrap_or([0; 32]),
                };
                st.audit.heads.insert(entry.dot.origin, chain_hash(&prev, entry.dot, value));
            }
        }
    }

    // ----- submitting writes ----------------------------------------------------

    /// Turns drafts into entries, reserves log space for them, and queues them as one
    /// atomic batch. Returns the batch's ticket and the dots given. Nothing changes on
    /// error.
    pub(crate) fn submit(&self, drafts: Drafts, hlc: &Mutex<HlcClock>) -> Result<(u64, Vec<Dot>)> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        let now_ms = self.options.clock.now_ms();
        let prepared: SmallVec<[Prepared; 1]> = drafts.iter().map(Prepared::for_draft).collect();
        let mut dots = Vec::with_capacity(drafts.len());
        // Values taken from entries once encoded, freed after the state lock.
        let mut values: SmallVec<[Vec<u8>; 1]> = SmallVec::new();
        let mut st = lock(&self.state);
        // A copy of the submitted vector in an allocation kept between writes.
        let mut next = std::mem::take(&mut st.submitted_spare);
        next.clone_from(&st.submitted);
        let mut heads = BTreeMap::new();
        // Keys this batch touches, with their versions after the batch.
        let mut staged = Staged::new(std::mem::take(&mut st.staged_spare));
        let mut encoded = st.entries_spare.pop().unwrap_or_default();
        encoded.reserve(drafts.len());
        for (draft, prep) in drafts.into_iter().zip(prepared) {
            let Prepared { id: prepared_id, hash: prepared_hash, versions: spare, encoding: sized } = prep;
            let mut spare = Some(spare);
            let mut held: Option<Vec<Version>> = None;
            let (mut entry, encoding) = match draft {
                Draft::Remote(entry, encoding) => {
                    if entry.collection.stream() != self.stream {
                        return Err(Error::Request("entry belongs to another stream"));
                    }
                    let expected = next.get(entry.dot.origin) + 1;
                    if entry.dot.seq < expected {
                        continue; // already applied (arrived by another path)
                    }
                    if entry.dot.seq > expected && !self.options.unsafe_skip_order_check {
                        return Err(Error::Gap { origin: entry.dot.origin, expected, got: entry.dot.seq });
                    }
                    if lock(hlc).observe(entry.hlc, now_ms).is_err() {
                        // Applied anyway (the origin's order must not stall), but counted
                        // so the operator sees a clock that runs ahead.
                        self.hlc_drift_alarms.fetch_add(1, Ordering::Relaxed);
                    }
                    (entry, Some(encoding))
                }
                Draft::Local { collection, key, op, context, cas } => {
                    if collection.stream() != self.stream {
                        return Err(Error::Request("collection belongs to another stream"));
                    }
                    let hash = prepared_hash.unwrap_or_else(|| key_hash(&(collection, key.as_slice())));
                    let current = match staged.find(hash, collection, &key) {
                        Some(i) => &staged.keys[i].2[..],
                        None => {
                            // Kept for staging below, so the key is looked up once.
                            held = Some(self.held_copy(hash, collection, &key, spare.take()));
                            held.as_deref().expect("just copied")
                        }
                    };
                    let current_ctx = context_of(current);
                    if cas && context.as_ref() != Some(&current_ctx) {
                        return Err(Error::ContextMismatch);
                    }
                    let keep_siblings =
                        self.options.policy(collection) == crate::ConflictPolicy::KeepSiblings;
                    let context = match context {
                        Some(c) => c,
                        None if keep_siblings && !matches!(op, Op::Delete) => VersionVector::new(),
                        None => current_ctx,
                    };
                    (self.local_entry(&mut next, hlc, now_ms, collection, key, context, op), None)
                }
                Draft::Audit(event) => {
                    // Fail closed: a non-holder that cannot hand its audit records to
                    // the holders refuses new audit-producing operations past the cap.
                    if let Some(cap) = self.options.audit_backlog_max {
                        let own = next.get(self.incarnation);
                        let released = st.audit_released.get(self.incarnation);
                        if own.saturating_sub(released) >= cap {
                            return Err(Error::AuditBacklogFull { backlog: own - released, cap });
                        }
                    }
                    let prev = next_head(&heads, &st.submitted_heads, self.incarnation);
                    let record = AuditRecord { event, prev_hash: prev };
                    let value = postcard::to_allocvec(&record).map_err(|e| Error::Record(e.to_string()))?;
                    let seq = next.get(self.incarnation) + 1;
                    let dot = Dot { origin: self.incarnation, seq };
                    heads.insert(self.incarnation, chain_hash(&prev, dot, &value));
                    let entry = self.local_entry(
                        &mut next,
                        hlc,
                        now_ms,
                        Collection::Audit,
                        audit_key(dot),
                        VersionVector::new(),
                        Op::Put { value, expires_at_ms: None },
                    );
                    (entry, None)
                }
            };
            entry.validate()?;
            next.advance(entry.dot);
            // A buffer of a committed entry, handed back by the group commit: neither
            // this thread nor the commit allocates or frees one per write.
            let bytes = encoding
                .unwrap_or_else(|| encode_into_spare(sized.or_else(|| st.encodings_spare.pop()), &entry));
            let incoming = Version::from_entry(&entry, Loc::Pending(bytes.clone()));
            // The value is in the encoding now, and only an audit record's is read again
            // (the merge indexes it): freed here, by the thread that made it, rather
            // than by the group commit's merge, which frees what the whole group made.
            if entry.collection != Collection::Audit {
                if let Op::Put { value, .. } = &mut entry.op {
                    values.push(std::mem::take(value));
                }
            }
            let policy = self.options.policy(entry.collection);
            let hash = prepared_hash.unwrap_or_else(|| key_hash(&(entry.collection, entry.key.as_slice())));
            match staged.find(hash, entry.collection, &entry.key) {
                Some(i) => {
                    merge(policy, &mut staged.keys[i].2, incoming, None);
                }
                None => {
                    let mut versions = held
                        .take()
                        .unwrap_or_else(|| self.held_copy(hash, entry.collection, &entry.key, spare.take()));
                    merge(policy, &mut versions, incoming, None);
                    // Prepared from the draft, whose key the entry carries (audit keys
                    // come from the dot).
                    let id = prepared_id.unwrap_or_else(|| (entry.collection, entry.key.as_slice().into()));
                    staged.push(hash, id, versions);
                }
            }
            encoded.push((entry, bytes, hash));
        }
        if encoded.is_empty() {
            // Every remote entry was a duplicate: nothing to wait for beyond what is queued.
            return Ok((st.next_ticket, Vec::new()));
        }
        let bytes = frame_bytes(encoded.iter().map(|(_, b, _)| b.len()));
        if bytes > self.frame_max() {
            return Err(Error::BatchTooLarge { bytes, max: self.frame_max() });
        }
        self.reserve(&mut st, bytes)?;

        // From here on nothing can fail: publish the batch.
        st.next_ticket += 1;
        let ticket = st.next_ticket;
        std::mem::swap(&mut st.submitted, &mut next);
        st.submitted_spare = next;
        for (o, h) in heads {
            st.submitted_heads.insert(o, h);
        }
        for (hash, id, versions) in staged.keys.drain(..) {
            self.keys.shard(hash).overlay.insert_hashed(hash, id, (versions, ticket));
        }
        st.staged_spare = staged.keys;
        st.queued_bytes += bytes as usize;
        self.queued_bytes.store(st.queued_bytes, Ordering::Relaxed);
        dots.extend(encoded.iter().map(|(e, _, _)| e.dot));
        st.queue.push_back(Queued { ticket, entries: encoded, bytes });
        Ok((ticket, dots))
    }

    #[allow(clippy::too_many_arguments)] // one call site per draft kind; a struct would only rename them
    fn local_entry(
        &self,
        next: &mut VersionVector,
        hlc: &Mutex<HlcClock>,
        now_ms: u64,
        collection: Collection,
        key: Vec<u8>,
        context: VersionVector,
        op: Op,
    ) -> Entry {
        let dot = Dot { origin: self.incarnation, seq: next.get(self.incarnation) + 1 };
        let mut context = context;
        // A context never covers the write's own dot (it may come from a peer that
        // already saw a later write of ours; then it is clipped).
        if context.contains(dot) {
            context.remove(dot.origin);
            context.advance(Dot { origin: dot.origin, seq: dot.seq - 1 });
        }
        let hlc = lock(hlc).tick(now_ms);
        Entry { dot, hlc, collection, key, context, op }
    }

    /// A copy of the versions of a key (queued, else durable; before the batch being
    /// submitted), with room for the one a write adds, in `spare` if given. Called
    /// with the state lock held, which keeps other submitters off the key until the
    /// batch is queued.
    fn held_copy(&self, hash: u64, c: Collection, key: &[u8], spare: Option<Vec<Version>>) -> Vec<Version> {
        versions_plus_one(self.keys.shard(hash).held(hash, &(c, key)), spare)
    }

    /// Segments are allocated this much at a time ahead of the reserved space, not
    /// whole: an appends' fdatasync still finds its blocks allocated (about half the
    /// time of one that extends the file), and a reopen, which must read a segment
    /// to its end to tell a torn tail from damage, reads at most this many zeros
    /// instead of a whole segment's (64 MiB of them on every open).
    const ALLOCATION_STEP: u64 = 4 * 1024 * 1024;

    /// Makes sure the log has preallocated room for `bytes` more in the worst case,
    /// creating segments and allocating them further as needed. A full disk is
    /// refused here, before any state changes, so it poisons nothing.
    fn reserve(&self, st: &mut State, bytes: u64) -> Result<()> {
        let cap = self.options.segment_bytes;
        if let Some((number, offset)) = st.reserve {
            if offset + bytes <= cap {
                if offset + bytes > st.allocated {
                    // Allocate the next step of the segment before anything depends on it.
                    let meta = st.files.get(&number).expect("the reserve segment is open");
                    let want = (offset + bytes + Self::ALLOCATION_STEP).min(cap);
                    if let Err(e) = meta.file.allocate(want) {
                        return Err(if is_out_of_space(&e) {
                            Error::StorageFull { stream: self.stream }
                        } else {
                            io_err(&meta.name, "allocate segment")(e)
                        });
                    }
                    st.allocated = want;
                }
                st.reserve = Some((number, offset + bytes));
                return Ok(());
            }
        }
        let number = st.next_file;
        let name = log_name(self.stream, number);
        let file = match self.storage.create(&name) {
            Ok(f) => f,
            Err(e) if is_out_of_space(&e) => return Err(Error::StorageFull { stream: self.stream }),
            Err(e) => return Err(io_err(&name, "create segment")(e)),
        };
        let header = SegmentHeader {
            kind: SegmentKind::Log,
            stream: self.stream,
            incarnation: self.incarnation,
            number: number as u64,
        };
        // The header is made durable before any frame goes into the segment, so a
        // damaged header can only ever be corruption, never a torn creation whose
        // later pages survived.
        let allocated = (HEADER_BYTES + bytes + Self::ALLOCATION_STEP).min(cap);
        let made = file.allocate(allocated).and_then(|_| file.write_all_at(&header.encode(), 0));
        let synced = match made {
            Ok(()) if self.options.syncs(SyncPoint::SegmentHeader) => file.sync_data(),
            _ => Ok(()),
        };
        if let Err(e) = synced {
            // Fail-stop on any fsync error, even one nothing depends on yet.
            self.poisoned.store(true, Ordering::Release);
            return Err(io_err(&name, "sync new segment header")(e));
        }
        if let Err(e) = made {
            // Nothing points at the new file yet: remove it and refuse the write.
            let _ = self.storage.remove(&name);
            return if is_out_of_space(&e) {
                Err(Error::StorageFull { stream: self.stream })
            } else {
                Err(io_err(&name, "preallocate segment")(e))
            };
        }
        st.next_file += 1;
        st.files.insert(
            number,
            FileMeta {
                file,
                name,
                kind: SegmentKind::Log,
                end: HEADER_BYTES,
                vector: VersionVector::new(),
                dir_synced: false,
            },
        );
        if st.active.is_none() {
            st.active = Some(number);
        }
        st.reserve = Some((number, HEADER_BYTES + bytes));
        st.allocated = allocated;
        Ok(())
    }

    // ----- group commit ---------------------------------------------------------

    /// Returns once the batch with `ticket` is durable. A waiter whose batch is still
    /// queued and finds no leader becomes the leader: it takes a group, writes and
    /// syncs it, hands leadership on (the next group is written while this one
    /// merges), merges it and wakes the others. The others sleep, so nobody queues
    /// behind the I/O just to learn that their write is already durable.
    pub(crate) fn wait(&self, ticket: u64) -> Result<()> {
        // Most waits of a pipelined writer find their write already durable (it went
        // in the group that woke them for an older one): no lock for those.
        if self.durable_ticket.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        loop {
            {
                let mut leading = lock(&self.leader);
                loop {
                    if self.durable_ticket.load(Ordering::Acquire) >= ticket {
                        return Ok(());
                    }
                    if self.poisoned.load(Ordering::Acquire) {
                        return Err(Error::Poisoned);
                    }
                    // A batch already taken into a group is on its way: wait for it.
                    if !*leading && self.taken_ticket.load(Ordering::Acquire) < ticket {
                        break;
                    }
                    leading = self.leader_changed.wait(leading).unwrap_or_else(|p| p.into_inner());
                }
                *leading = true;
            }
            self.commit_one_group(Leadership(self))?;
        }
    }

    /// Wakes the waiters. The leader lock is taken first, so a waiter that found the
    /// old state is already asleep and hears this.
    fn wake_waiters(&self) {
        drop(lock(&self.leader));
        self.leader_changed.notify_all();
    }

    /// Emptied entry lists kept for submitters to reuse (a group holds at most one per
    /// batch; beyond this many they are freed).
    const ENTRY_LISTS_KEPT: usize = 1024;
    /// Only small lists are kept (single writes are the ones that pay most for an
    /// allocation); a large batch's list is freed.
    const ENTRY_LIST_KEPT_CAPACITY: usize = 16;
    /// Encoding buffers kept for submitters to reuse: a group's worth of single writes
    /// from each of a few writers (each is about as large as its entry).
    const ENCODINGS_KEPT: usize = 2048;
    /// Only buffers of small entries are kept; a large value's buffer is freed.
    const ENCODING_KEPT_CAPACITY: usize = 1024;

    /// Up to `n` encoding buffers handed back by merged groups (none shared), for a
    /// batch of remote entries to be encoded into outside the state lock.
    pub(crate) fn spare_encodings(&self, n: usize) -> Vec<Arc<Vec<u8>>> {
        let mut st = lock(&self.state);
        let at = st.encodings_spare.len().saturating_sub(n);
        st.encodings_spare.split_off(at)
    }

    /// Commits everything queued so far.
    pub(crate) fn flush(&self) -> Result<()> {
        let ticket = lock(&self.state).next_ticket;
        self.wait(ticket)
    }

    /// Whether the queue holds more buffered bytes than a writer may leave pending.
    pub(crate) fn queued_bytes(&self) -> usize {
        // A mirror of `state.queued_bytes`, read without the lock on every submit.
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Takes a group of queued batches, writes it as one frame to one segment, syncs
    /// it, hands `leadership` on and merges the group.
    fn commit_one_group(&self, leadership: Leadership<'_>) -> Result<()> {
        let mut io_held = lock(&self.io);
        let scratch = &mut *io_held;
        let (file_no, meta_file, meta_name, offset, mut group, needs_dir_sync, frame_end) = {
            let mut st = lock(&self.state);
            let Some(mut active) = st.active else { return Ok(()) };
            let mut end = match st.write_at {
                Some((file, at)) if file == active => at,
                _ => st.files.get(&active).map_or(HEADER_BYTES, |m| m.end),
            };
            let cap = self.options.segment_bytes;
            let first = match st.queue.front() {
                Some(q) => q.bytes,
                None => return Ok(()),
            };
            if end + first > cap {
                // Roll over to the next log segment, which reservation created.
                let next = st
                    .files
                    .range(active + 1..)
                    .find(|(_, m)| m.kind == SegmentKind::Log)
                    .map(|(n, _)| *n)
                    .expect("reservation preallocates the segment a queued batch lands in");
                st.active = Some(next);
                active = next;
                end = HEADER_BYTES;
            }
            let mut group: Vec<Queued> = Vec::new();
            let mut size = FRAME_HEADER_BYTES + FRAME_COUNT_BYTES;
            while let Some(q) = st.queue.front() {
                let add = q.bytes - FRAME_HEADER_BYTES - FRAME_COUNT_BYTES;
                if !group.is_empty() && (end + size + add > cap || size + add > self.frame_max()) {
                    break;
                }
                size += add;
                let q = st.queue.pop_front().expect("front exists");
                st.queued_bytes -= q.bytes as usize;
                self.queued_bytes.store(st.queued_bytes, Ordering::Relaxed);
                self.taken_ticket.store(q.ticket, Ordering::Release);
                group.push(q);
            }
            st.write_at = Some((active, end + size));
            let meta = st.files.get(&active).expect("active segment is open");
            (active, meta.file.clone(), meta.name.clone(), end, group, !meta.dir_synced, end + size)
        };

        let refs: Vec<&[u8]> = group.iter().flat_map(|q| q.entries.iter().map(|(_, b, _)| &b[..])).collect();
        build_frame_into(&refs, &mut scratch.frame, &mut scratch.spans);
        let frame = &scratch.frame;
        let io = || -> std::io::Result<()> {
            meta_file.write_all_at(frame, offset)?;
            if self.options.syncs(SyncPoint::LogAppend) {
                meta_file.sync_data()?;
            }
            if needs_dir_sync && self.options.syncs(SyncPoint::SegmentCreateDir) {
                self.storage.sync_dir()?;
            }
            Ok(())
        };
        if let Err(e) = io() {
            // Fail-stop: a failed fsync may have dropped pages; retrying could report
            // success for data that is gone. Nothing in this group is acknowledged.
            self.poisoned.store(true, Ordering::Release);
            return Err(io_err(&meta_name, "append and sync")(e));
        }
        let entry_count = refs.len();
        drop(refs);

        // The merge: after the previous group's, and before the next group is taken.
        let mut merging = lock(&self.merging);
        let spans = &mut merging.spans;
        spans.clone_from(&scratch.spans);
        debug_assert_eq!(offset + scratch.frame.len() as u64, frame_end, "the frame is as long as reckoned");
        scratch.trim();
        drop(io_held);
        drop(leadership);

        // First the keys, one shard at a time with no other lock: submitters go on
        // queueing meanwhile. A key's overlay entry goes when its last queued write
        // commits; its key then moves into the keydir. The hash tree is built and
        // dropped only under `merging`, which this holds.
        let tracked = lock(&self.state).tree.is_some();
        let mut span = spans.iter();
        let mut merged = Vec::with_capacity(entry_count);
        for q in &group {
            for (entry, _, hash) in &q.entries {
                let &(rel, len) = span.next().expect("one span per entry");
                let loc = Loc::Disk { file: file_no, offset: offset as u32 + rel, len };
                let view = (entry.collection, entry.key.as_slice());
                let view = &view as &dyn KeyView;
                let mut shard = self.keys.shard(*hash);
                // One lookup when this was the key's last queued write (the usual case);
                // else the entry goes back for the later one.
                let owned = match shard.overlay.remove_entry_hashed(*hash, view) {
                    Some((k, (v, t))) if t == q.ticket => Some((k, v)),
                    Some((k, later)) => {
                        shard.overlay.insert_hashed(*hash, k, later);
                        None
                    }
                    None => None,
                };
                let mut order = self.keys.order();
                merged.push(self.merge_key(&mut shard, &mut order, *hash, entry, loc, None, owned, tracked));
            }
        }

        let mut st = lock(&self.state);
        {
            let emptied = &mut *lock(&self.emptied);
            refill(&mut st.entries_spare, &mut emptied.lists, Self::ENTRY_LISTS_KEPT);
            refill(&mut st.encodings_spare, &mut emptied.encodings, Self::ENCODINGS_KEPT);
        }
        if needs_dir_sync {
            for m in st.files.values_mut() {
                m.dir_synced = true;
            }
        }
        let mut span = spans.iter();
        let mut merged = merged.into_iter();
        let mut last_ticket = 0;
        let mut seen: Vec<Incarnation> = Vec::new();
        for q in &group {
            for (entry, _, _) in &q.entries {
                let &(rel, len) = span.next().expect("one span per entry");
                let loc = Loc::Disk { file: file_no, offset: offset as u32 + rel, len };
                let index_at = first_of_origin(&mut seen, entry.dot.origin).then_some(offset as u32);
                self.record_durable(&mut st, entry, &loc, index_at);
                self.merged(&mut st, entry, merged.next().expect("one merge per entry"));
            }
            last_ticket = q.ticket;
        }
        if let Some(m) = st.files.get_mut(&file_no) {
            m.end = frame_end;
        }
        self.publish_vector(&st);
        self.durable_ticket.store(last_ticket, Ordering::Release);
        drop(st);
        drop(merging);
        self.wake_waiters();
        // The entries are dropped here, with no lock that a commit or a submitter
        // needs; their lists go back to the submitters with the next group.
        let mut lists = Vec::with_capacity(group.len());
        let mut encodings = Vec::with_capacity(entry_count);
        for q in &mut group {
            let mut entries = std::mem::take(&mut q.entries);
            for (_, mut bytes, _) in entries.drain(..) {
                let kept =
                    Arc::get_mut(&mut bytes).is_some_and(|b| b.capacity() <= Self::ENCODING_KEPT_CAPACITY);
                if kept {
                    encodings.push(bytes);
                }
            }
            if entries.capacity() <= Self::ENTRY_LIST_KEPT_CAPACITY {
                lists.push(entries);
            }
        }
        let mut emptied = lock(&self.emptied);
        emptied.lists.append(&mut lists);
        emptied.encodings.append(&mut encodings);
        Ok(())
    }
}

/// Keys a batch being submitted touches, with their versions after the batch so far.
/// Small batches search linearly; large ones (a peer's batch of 256, the batch API's
/// 1,000) keep an index by hash, so a batch is not quadratic and indexing a key costs
/// no copy of it.
struct Staged {
    /// (the key's hash, the key, its versions)
    keys: Vec<(u64, KeyId, Vec<Version>)>,
    /// Once past [`Staged::LINEAR_MAX`] keys: their positions in `keys`, by hash.
    index: hashbrown::HashTable<usize>,
}

impl Staged {
    const LINEAR_MAX: usize = 16;

    /// `keys` is an empty list kept for its allocation.
    fn new(keys: Vec<(u64, KeyId, Vec<Version>)>) -> Self {
        debug_assert!(keys.is_empty());
        Staged { keys, index: hashbrown::HashTable::new() }
    }

    /// The position of the key whose [`key_hash`] is `hash`.
    fn find(&self, hash: u64, c: Collection, key: &[u8]) -> Option<usize> {
        let same = |i: usize| self.keys[i].1 .0 == c && *self.keys[i].1 .1 == *key;
        if self.keys.len() <= Self::LINEAR_MAX {
            return (0..self.keys.len()).rev().find(|&i| same(i));
        }
        self.index.find(hash, |&i| same(i)).copied()
    }

    fn push(&mut self, hash: u64, id: KeyId, versions: Vec<Version>) {
        self.keys.push((hash, id, versions));
        if self.keys.len() <= Self::LINEAR_MAX {
            return;
        }
        // Index whatever is not indexed yet (all of it when the batch first grows past
        // the linear search). A key is staged once, so each position is new.
        let Staged { keys, index } = self;
        for i in index.len()..keys.len() {
            index.insert_unique(keys[i].0, i, |&j| keys[j].0);
        }
    }
}

/// A copy of `versions` with room for the one a write adds (a copy of an empty list
/// would otherwise grow on the merge that follows), in `spare` if given.
fn versions_plus_one(versions: &[Version], spare: Option<Vec<Version>>) -> Vec<Version> {
    let mut copy = spare.unwrap_or_default();
    copy.clear();
    copy.reserve(versions.len() + 1);
    copy.extend_from_slice(versions);
    copy
}

/// Whether `origin` appears for the first time in the current frame (and notes it).
fn first_of_origin(seen: &mut Vec<Incarnation>, origin: Incarnation) -> bool {
    if seen.contains(&origin) {
        false
    } else {
        seen.push(origin);
        true
    }
}

fn next_head(
    staged: &BTreeMap<Incarnation, [u8; 32]>,
    submitted: &BTreeMap<Incarnation, [u8; 32]>,
    origin: Incarnation,
) -> [u8; 32] {
    staged.get(&origin).or_else(|| submitted.get(&origin)).copied().unwrap_or([0; 32])
}

/// Reads the entry a location points at.
/// Keeps the versions `keep` accepts, drops keys left without any, and keeps the hash
/// tree current. Returns how many versions were dropped.
fn retain_versions(
    tree: &mut Option<HashTree>,
    keydir: &mut Keydir<'_>,
    mut keep: impl FnMut(&KeyId, &Version) -> bool,
) -> usize {
    let mut dropped = 0;
    keydir.retain(|id, versions| {
        if versions.iter().all(|v| keep(id, v)) {
            return true;
        }
        dropped += prune_key(tree, id, versions, |v| keep(id, v));
        !versions.is_empty()
    });
    dropped
}

/// Keeps the versions of `id` that `keep` accepts, and the hash tree current; returns
/// how many went. A key left without versions must be removed from the keydir.
fn prune_key(
    tree: &mut Option<HashTree>,
    id: &KeyId,
    versions: &mut Vec<Version>,
    keep: impl FnMut(&Version) -> bool,
) -> usize {
    let before = versions.len();
    let old = tree.as_ref().and_then(|_| key_digest(id.0, &id.1, versions, 0));
    versions.retain(keep);
    if let Some(t) = tree.as_mut() {
        t.update(id.0, &id.1, old, key_digest(id.0, &id.1, versions, 0));
    }
    before - versions.len()
}

/// Live records a compaction reads at a time (in key order, each batch read in runs).
const COMPACTION_READ_ENTRIES: usize = 4096;

/// A record in a segment: (segment, offset, length).
type RecordAt = (u32, u32, u32);

/// A live record in [`LiveRecords`]: collection, where its key is in the key bytes
/// (start, length), and where the record is.
type LiveRecord = (Collection, u32, u32, RecordAt);

/// The live records a compaction copies, with their keys, collected under the locks
/// and put in key order after them.
#[derive(Default)]
struct LiveRecords {
    /// Every record's key bytes, one after another.
    keys: Vec<u8>,
    records: Vec<LiveRecord>,
}

impl LiveRecords {
    fn push(&mut self, collection: Collection, key: &[u8], at: RecordAt) {
        let start = self.keys.len() as u32;
        self.keys.extend_from_slice(key);
        self.records.push((collection, start, key.len() as u32, at));
    }

    /// The records by collection, key, then segment and offset (a key's versions in
    /// the order written), each once.
    fn in_key_order(self) -> Vec<RecordAt> {
        let LiveRecords { keys, mut records } = self;
        let key = |&(c, start, len, _): &LiveRecord| (c, &keys[start as usize..(start + len) as usize]);
        records.sort_unstable_by(|a, b| key(a).cmp(&key(b)).then(a.3.cmp(&b.3)));
        let mut out: Vec<RecordAt> = records.iter().map(|r| r.3).collect();
        out.dedup();
        out
    }
}

/// Payload bytes after which a snapshot chunk ends (at a key boundary).
const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

fn read_loc(files: &BTreeMap<u32, FileMeta>, loc: &Loc) -> Result<Entry> {
    let handle = match loc {
        Loc::Disk { file, .. } => files.get(file).map(|m| (&*m.file, m.name.as_str())),
        Loc::Pending(_) => None,
    };
    read_entry(handle, loc)
}

/// The file handle and name of each segment `locs` point into, taken under the state
/// lock so the records can be read after it (a handle keeps a segment readable even
/// if a compaction removes it meanwhile).
fn segment_handles<'a>(
    files: &BTreeMap<u32, FileMeta>,
    locs: impl Iterator<Item = &'a Loc>,
) -> BTreeMap<u32, (Arc<dyn StorageFile>, String)> {
    let mut handles = BTreeMap::new();
    for loc in locs {
        if let Loc::Disk { file, .. } = loc {
            if let (btree_map::Entry::Vacant(slot), Some(m)) = (handles.entry(*file), files.get(file)) {
                slot.insert((m.file.clone(), m.name.clone()));
            }
        }
    }
    handles
}

/// A location's segment is not open (the keydir points past what is on disk).
fn segment_missing(file: u32, offset: u32) -> Error {
    Error::Corrupt(Corruption {
        file: format!("segment {file}"),
        offset: u64::from(offset),
        what: "segment missing",
    })
}

/// Reads the entry at `loc` through `handle` (the segment's file and name): one
/// positioned read, verified by the entry's checksum.
fn read_entry(handle: Option<(&dyn StorageFile, &str)>, loc: &Loc) -> Result<Entry> {
    match loc {
        Loc::Pending(bytes) => Ok(Entry::decode(bytes)?),
        Loc::Disk { file, offset, len } => {
            let (file_handle, name) = handle.ok_or_else(|| segment_missing(*file, *offset))?;
            let mut buf = vec![0u8; *len as usize];
            file_handle.read_exact_at(&mut buf, *offset as u64).map_err(io_err(name, "read entry"))?;
            segment::decode_entry_at(&buf, name, *offset as u64)
        }
    }
}

/// Records at most this far apart are read together ([`read_entries`]).
const READ_RUN_GAP_MAX: u64 = 16 * 1024;
/// Most bytes one read of a run takes.
const READ_RUN_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Reads the entries at `locs`, returned in the same order, with one positioned read
/// per run of records near each other in a segment instead of one per record (a
/// snapshot reads thousands of records, mostly neighbours). `handle` gives a segment's
/// file and name; each entry is verified by its checksum.
fn read_entries<'a, T: LogItem>(
    locs: &[Loc],
    handle: impl Fn(u32) -> Option<(&'a dyn StorageFile, &'a str)>,
) -> Result<Vec<T>> {
    let mut read: Vec<Option<T>> = (0..locs.len()).map(|_| None).collect();
    let disk = |i: usize| match locs[i] {
        Loc::Disk { file, offset, len } => Some((file, u64::from(offset), u64::from(len))),
        Loc::Pending(_) => None,
    };
    let mut order: Vec<usize> = (0..locs.len()).collect();
    order.sort_unstable_by_key(|&i| disk(i).map(|(f, o, _)| (f, o)));
    let mut buf = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let Some((file, start, len)) = disk(order[i]) else {
            if let Loc::Pending(bytes) = &locs[order[i]] {
                let item = T::from_log(bytes).ok_or(Error::Request("a queued entry does not decode"))?;
                read[order[i]] = Some(item);
            }
            i += 1;
            continue;
        };
        let mut end = start + len;
        let mut j = i + 1;
        while let Some((f, o, l)) = order.get(j).and_then(|&k| disk(k)) {
            if f != file || o > end + READ_RUN_GAP_MAX || o + l - start > READ_RUN_BYTES_MAX {
                break;
            }
            end = end.max(o + l);
            j += 1;
        }
        let (h, name) = handle(file).ok_or_else(|| segment_missing(file, start as u32))?;
        buf.resize((end - start) as usize, 0);
        h.read_exact_at(&mut buf, start).map_err(io_err(name, "read entries"))?;
        for &k in &order[i..j] {
            let (_, o, l) = disk(k).expect("a run holds disk locations only");
            let at = (o - start) as usize;
            let body = segment::entry_body_at(&buf[at..at + l as usize], name, o)?;
            read[k] = Some(T::from_log(body).ok_or_else(|| segment::bad_entry_at(name, o))?);
        }
        i = j;
    }
    Ok(read.into_iter().map(|e| e.expect("every location was read")).collect())
}

/// How a read of the log hands out each entry: decoded, or in its encoding (what a
/// sender ships, without decoding it only to encode it again).
pub(crate) trait LogItem: Sized {
    /// From an entry's encoding in a log frame whose checksum held; `None` when it
    /// does not decode.
    fn from_log(bytes: &[u8]) -> Option<Self>;
    /// The entry's dot.
    fn dot(&self) -> Dot;
}

impl LogItem for Entry {
    fn from_log(bytes: &[u8]) -> Option<Self> {
        Entry::decode(bytes).ok()
    }
    fn dot(&self) -> Dot {
        self.dot
    }
}

impl LogItem for EncodedEntry {
    fn from_log(bytes: &[u8]) -> Option<Self> {
        EncodedEntry::new(bytes.to_vec()).ok()
    }
    fn dot(&self) -> Dot {
        EncodedEntry::dot(self)
    }
}

/// A log item a snapshot ships, with the context it is shipped with.
pub(crate) trait SnapshotItem: LogItem {
    /// The item with `context` as its context.
    fn with_context(self, context: VersionVector) -> Result<Self>;
}

impl SnapshotItem for Entry {
    fn with_context(mut self, context: VersionVector) -> Result<Self> {
        self.context = context;
        Ok(self)
    }
}

impl SnapshotItem for EncodedEntry {
    fn with_context(self, context: VersionVector) -> Result<Self> {
        // Usually the context it was logged with: then the encoding goes as it is.
        Ok(EncodedEntry::with_context(self, &context)?)
    }
}

/// A version read back with its value.
#[derive(Debug, Clone)]
pub(crate) struct ReadVersion {
    pub(crate) version: Version,
    pub(crate) value: Vec<u8>,
}

impl StreamStore {
    // ----- reads ----------------------------------------------------------------

    /// The live versions of a key (tombstones and expired versions hidden) and the
    /// causal context of everything held (tombstones included).
    pub(crate) fn read(&self, id: &KeyId, now_ms: u64) -> Result<(Vec<ReadVersion>, VersionVector)> {
        let (versions, handles) = {
            // The state lock keeps the versions' segments open until their handles are
            // taken (a compaction removes segments with it held).
            let st = lock(&self.state);
            let hash = key_hash(id);
            let versions = self.keys.shard(hash).held(hash, id).to_vec();
            let handles = segment_handles(&st.files, versions.iter().map(|v| &v.loc));
            (versions, handles)
        };
        let context = context_of(&versions);
        let mut out = Vec::new();
        for v in versions {
            if v.tombstone || v.is_expired(now_ms) {
                continue;
            }
            let handle = match v.loc {
                Loc::Disk { file, .. } => handles.get(&file).map(|(h, n)| (&**h, n.as_str())),
                Loc::Pending(_) => None,
            };
            let entry = read_entry(handle, &v.loc)?;
            if let Op::Put { value, .. } = entry.op {
                out.push(ReadVersion { version: v, value });
            }
        }
        Ok((out, context))
    }

    /// Keys of a collection in order, from `start` (inclusive), at most `limit`.
    pub(crate) fn keys(
        &self,
        collection: Collection,
        start: &[u8],
        limit: usize,
        now_ms: u64,
    ) -> Vec<Vec<u8>> {
        let mut kd = self.keys.lock_all();
        kd.order_keys();
        let from: KeyId = (collection, start.to_vec().into_boxed_slice());
        let live = |v: &[Version]| v.iter().any(|x| !x.tombstone && !x.is_expired(now_ms));
        // Merge the durable keydir with queued writes (both sorted), the queued side
        // winning on equal keys, until `limit` live keys are found.
        let in_collection = |id: &&KeyId| id.0 == collection;
        let mut durable = kd.range(Bound::Included(&from)).take_while(|(id, _)| in_collection(id)).peekable();
        // The overlay is unordered and small (bounded by the queue): its keys in range, sorted.
        let mut queued: Vec<_> = kd.overlay().filter(|(id, _)| in_collection(id) && id.1 >= from.1).collect();
        queued.sort_unstable_by(|a, b| a.0 .1.cmp(&b.0 .1));
        let mut queued = queued.into_iter().peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let (key, versions) = match (durable.peek(), queued.peek()) {
                (Some((d, _)), Some((q, _))) if d.1 < q.1 => {
                    let (id, v) = durable.next().expect("peeked");
                    (&id.1, v.as_slice())
                }
                (Some((d, _)), Some((q, _))) if d.1 == q.1 => {
                    durable.next();
                    let (id, (v, _)) = queued.next().expect("peeked");
                    (&id.1, v.as_slice())
                }
                (_, Some(_)) => {
                    let (id, (v, _)) = queued.next().expect("peeked");
                    (&id.1, v.as_slice())
                }
                (Some(_), None) => {
                    let (id, v) = durable.next().expect("peeked");
                    (&id.1, v.as_slice())
                }
                (None, None) => break,
            };
            if live(versions) {
                out.push(key.to_vec());
            }
        }
        out
    }

    /// The newest HLC among the versions held (seeds the clock at open).
    pub(crate) fn newest_hlc(&self) -> repl_wire::Hlc {
        self.keys.lock_all().values().flatten().map(|v| v.hlc).max().unwrap_or_default()
    }

    /// The durable vector of the stream.
    pub(crate) fn vector(&self) -> VersionVector {
        lock(&self.durable_vector).clone()
    }

    /// Makes `st.vector` what [`StreamStore::vector`] reads. Called with the state lock
    /// held, after every change of the vector (recovery, a group's merge, a snapshot's
    /// install), so readers see the changes in the order they were made.
    fn publish_vector(&self, st: &State) {
        lock(&self.durable_vector).clone_from(&st.vector);
    }

    /// The vector as the state holds it, to check the published copy against.
    #[cfg(test)]
    pub(crate) fn state_vector(&self) -> VersionVector {
        lock(&self.state).vector.clone()
    }

    /// Keys held (with at least one durable version).
    pub(crate) fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Per origin, the lowest sequence number the log still holds.
    pub(crate) fn log_floors(&self) -> BTreeMap<Incarnation, u64> {
        let st = lock(&self.state);
        st.vector
            .iter()
            .map(|d| {
                let floor = st
                    .origin_index
                    .get(&d.origin)
                    .and_then(|m| m.keys().next().copied())
                    .unwrap_or(d.seq + 1);
                (d.origin, floor)
            })
            .collect()
    }

    /// Durable entries above `from` (and, given `upto`, at or below it), in log order,
    /// at most `max` of them: what replication ships next. Each origin's entries come
    /// in sequence order. `T` is how each is handed out: decoded, or in its encoding.
    pub(crate) fn entries_since<T: LogItem>(
        &self,
        from: &VersionVector,
        upto: Option<&VersionVector>,
        max: usize,
    ) -> Result<Vec<T>> {
        let mut out: Vec<T> = self.durable_entries_since(from, upto, max)?;
        if self.options.unsafe_ship_buffered && out.len() < max {
            // The planted bug: hand out queued entries that are not yet durable.
            let mut seen = from.clone();
            for e in &out {
                seen.advance(e.dot());
            }
            let st = lock(&self.state);
            for (e, bytes, _) in st.queue.iter().flat_map(|q| q.entries.iter()) {
                if out.len() < max && !seen.contains(e.dot) && e.dot.seq == seen.get(e.dot.origin) + 1 {
                    seen.advance(e.dot);
                    // A queued entry's encoding is the one its log record will hold.
                    out.extend(T::from_log(bytes));
                }
            }
        }
        Ok(out)
    }

    fn durable_entries_since<T: LogItem>(
        &self,
        from: &VersionVector,
        upto: Option<&VersionVector>,
        max: usize,
    ) -> Result<Vec<T>> {
        let last = |origin: Incarnation, held: u64| upto.map_or(held, |u| u.get(origin).min(held));
        let (start, files) = {
            let st = lock(&self.state);
            let mut start: Option<(u32, u32)> = None;
            for d in st.vector.iter() {
                let want = from.get(d.origin) + 1;
                if want > last(d.origin, d.seq) {
                    continue;
                }
                let index = st.origin_index.get(&d.origin);
                let pos = index.and_then(|m| m.range(..=want).next_back()).map(|(_, p)| *p);
                let floor = index.and_then(|m| m.keys().next().copied()).unwrap_or(d.seq + 1);
                match pos {
                    Some(p) if want >= floor => start = Some(start.map_or(p, |s: (u32, u32)| s.min(p))),
                    _ => return Err(Error::NotCovered { stream: self.stream, origin: d.origin, floor }),
                }
            }
            let Some(start) = start else { return Ok(Vec::new()) };
            let files: Vec<(u32, Arc<dyn StorageFile>, String, u64)> = st
                .files
                .range(start.0..)
                .filter(|(_, m)| m.kind == SegmentKind::Log)
                .map(|(n, m)| (*n, m.file.clone(), m.name.clone(), m.end))
                .collect();
            (start, files)
        };
        let mut out = Vec::new();
        let mut out_len = 0;
        let mut seen = from.clone();
        for (n, file, name, end) in files {
            let mut at = if n == start.0 { start.1 as u64 } else { HEADER_BYTES };
            while at < end && out.len() < max {
                let mut head = [0u8; FRAME_HEADER_BYTES as usize];
                file.read_exact_at(&mut head, at).map_err(io_err(&name, "read frame"))?;
                let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as u64;
                let mut buf = vec![0u8; (FRAME_HEADER_BYTES + len) as usize];
                file.read_exact_at(&mut buf, at).map_err(io_err(&name, "read frame"))?;
                let mut skipped: Option<Dot> = None;
                let want = |dot: Dot| {
                    if out_len >= max {
                        return Wanted::Stop;
                    }
                    if seen.contains(dot) || upto.is_some_and(|u| !u.contains(dot)) {
                        return Wanted::Skip;
                    }
                    if dot.seq != seen.get(dot.origin) + 1 {
                        // The log skips part of this origin (a snapshot raised the
                        // vector past it): the peer needs anti-entropy.
                        skipped = Some(dot);
                        return Wanted::Stop;
                    }
                    seen.advance(dot);
                    out_len += 1;
                    Wanted::Take
                };
                let frame_max = self.frame_max().max(FRAME_BYTES_MAX);
                segment::scan_frame_wanted(&buf, &name, at, frame_max, want, T::from_log, &mut out)?;
                if let Some(dot) = skipped {
                    return Err(Error::NotCovered {
                        stream: self.stream,
                        origin: dot.origin,
                        floor: dot.seq,
                    });
                }
                at += buf.len() as u64;
            }
        }
        Ok(out)
    }

    /// A digest of the durable state: every key's live versions (dot, tombstone flag and
    /// value), in key order; versions expired at `now_ms` are left out. Two replicas
    /// with equal digests hold the same data.
    pub(crate) fn digest(&self, now_ms: u64) -> Result<[u8; 32]> {
        let mut items: Vec<(KeyId, Vec<Version>)> =
            self.keys.lock_all().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        // Key order, so replicas agree whatever order their maps hold the keys in.
        items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut h = blake3::Hasher::new();
        for ((c, key), mut versions) in items {
            versions.retain(|v| !v.is_expired(now_ms));
            if versions.is_empty() {
                continue;
            }
            versions.sort_by_key(|v| v.dot);
            h.update(c.name().as_bytes());
            h.update(&(key.len() as u64).to_le_bytes());
            h.update(&key);
            for v in versions {
                h.update(&v.dot.origin.0.to_le_bytes());
                h.update(&v.dot.seq.to_le_bytes());
                h.update(&[v.tombstone as u8]);
                if !v.tombstone {
                    let entry = {
                        let st = lock(&self.state);
                        read_loc(&st.files, &v.loc)?
                    };
                    if let Op::Put { value, .. } = entry.op {
                        h.update(&(value.len() as u64).to_le_bytes());
                        h.update(&value);
                    }
                }
            }
        }
        Ok(*h.finalize().as_bytes())
    }

    /// Recorded LWW losses of a collection, oldest first, and how many were dropped.
    pub(crate) fn conflicts(&self, collection: Collection) -> (Vec<ConflictRecord>, u64) {
        let st = lock(&self.state);
        (
            st.conflicts.get(&collection).map(|l| l.iter().cloned().collect()).unwrap_or_default(),
            st.conflicts_dropped,
        )
    }

    /// Audit index lookups and the values of the records found.
    pub(crate) fn audit_query(
        &self,
        q: &crate::audit::AuditQuery,
        now_ms: u64,
    ) -> Result<Vec<crate::StoredAudit>> {
        let dots = lock(&self.state).audit.query(q);
        let mut out = Vec::with_capacity(dots.len());
        for dot in dots {
            let id: KeyId = (Collection::Audit, audit_key(dot).into_boxed_slice());
            for rv in self.read(&id, now_ms)?.0 {
                let record = postcard::from_bytes(&rv.value).map_err(|e| Error::Record(e.to_string()))?;
                out.push(crate::StoredAudit { dot, record });
            }
        }
        Ok(out)
    }

    /// Verifies every origin's audit chain over the durable records; returns how many
    /// records were checked.
    pub(crate) fn audit_verify(&self) -> Result<u64> {
        let mut keys: Vec<(Dot, Loc)> = {
            self.keys
                .lock_all()
                .iter()
                .filter(|((c, _), _)| *c == Collection::Audit)
                .filter_map(|(_, v)| v.first().map(|v| (v.dot, v.loc.clone())))
                .collect()
        };
        // Each origin's chain in sequence order.
        keys.sort_unstable_by_key(|(dot, _)| (dot.origin, dot.seq));
        let mut running: BTreeMap<Incarnation, [u8; 32]> = BTreeMap::new();
        let mut checked = 0;
        for (dot, loc) in keys {
            let entry = {
                let st = lock(&self.state);
                read_loc(&st.files, &loc)?
            };
            let Op::Put { value, .. } = &entry.op else { continue };
            let record: AuditRecord =
                postcard::from_bytes(value).map_err(|e| Error::Record(e.to_string()))?;
            // The first record kept of an origin anchors its chain (older ones may have
            // been pruned by retention); every later one must link to its predecessor.
            let prev = running.get(&dot.origin).copied().unwrap_or(record.prev_hash);
            if record.prev_hash != prev || entry.dot != dot {
                return Err(Error::AuditChainBroken { origin: dot.origin, dot });
            }
            running.insert(dot.origin, chain_hash(&prev, dot, value));
            checked += 1;
        }
        Ok(checked)
    }

    /// Creates the next compacted segment under a temporary name: written there and
    /// renamed once synced, a compacted segment that exists under its own name never
    /// holds unsynced bytes. A full disk is `StorageFull`.
    fn create_compacted_tmp(&self, what: &'static str) -> Result<(u32, String, Arc<dyn StorageFile>)> {
        let number = {
            let mut st = lock(&self.state);
            st.next_file += 1;
            st.next_file - 1
        };
        let name = format!("{}.tmp", compacted_name(self.stream, number));
        let file = self.storage.create(&name).map_err(|e| {
            if is_out_of_space(&e) {
                Error::StorageFull { stream: self.stream }
            } else {
                io_err(&name, what)(e)
            }
        })?;
        Ok((number, name, file))
    }

    // ----- anti-entropy -----------------------------------------------------------

    /// The stream's vector and the hashes of `buckets` at `level` of its hash tree.
    /// Sessions are hashed with versions expired at `cutoff_ms` left out, the other
    /// streams from the tree kept current by every write.
    pub(crate) fn tree_hashes(
        &self,
        cutoff_ms: u64,
        level: u8,
        buckets: &[u32],
    ) -> (VersionVector, Vec<repl_wire::BucketHash>) {
        let (vector, tree) = {
            // No group half merged: the tree and the vector match the keys.
            let _merging = lock(&self.merging);
            let mut st = lock(&self.state);
            let kd = self.keys.lock_all();
            let build = |cutoff: u64| {
                let mut t = HashTree::default();
                for ((c, k), v) in kd.iter() {
                    t.update(*c, k, None, key_digest(*c, k, v, cutoff));
                }
                t
            };
            let tree = if self.stream == StreamId::Sessions {
                build(cutoff_ms)
            } else {
                if st.tree.is_none() {
                    st.tree = Some(build(0));
                }
                st.tree.clone().expect("built above")
            };
            (st.vector.clone(), tree)
        };
        (vector, tree.hashes(level, buckets))
    }

    /// The stream's vector and, in key order from after `resume`, every version of the
    /// keys in leaf `buckets` (all keys when empty), whole keys only, stopping past
    /// `max_entries`. Also returns the token to resume from, empty after the last key.
    pub(crate) fn snapshot_chunk<T: SnapshotItem>(
        &self,
        buckets: &[u32],
        resume: &[u8],
        max_entries: usize,
    ) -> Result<(VersionVector, Vec<T>, Vec<u8>)> {
        // No group half merged: the vector covers every version picked.
        let merging = lock(&self.merging);
        let st = lock(&self.state);
        let mut kd = self.keys.lock_all();
        kd.order_keys();
        let start = match resume.split_first() {
            None => None,
            Some((&c, key)) => {
                let c = *Collection::ALL.get(c as usize).ok_or(Error::Request("bad resume token"))?;
                Some((c, key.to_vec().into_boxed_slice()))
            }
        };
        let range = kd.range(match &start {
            Some(id) => Bound::Excluded(id),
            None => Bound::Unbounded,
        });
        // The versions are picked under the lock and read after it: records never
        // change, and the handles keep a segment readable even if a compaction
        // removes it meanwhile.
        let mut picked: Vec<(Loc, Option<VersionVector>)> = Vec::new();
        let mut bytes = 0usize;
        let mut last: Option<&KeyId> = None;
        let mut more = false;
        for (id, versions) in range {
            if !buckets.is_empty() && buckets.binary_search(&leaf_of(id.0, &id.1)).is_err() {
                continue;
            }
            if picked.len() >= max_entries || bytes >= SNAPSHOT_CHUNK_BYTES {
                more = true;
                break;
            }
            for v in versions {
                // Ship what the version supersedes here (a last-writer-wins merge joins
                // the loser in), not only what its writer had seen, so the receiver
                // reaches the same resolution.
                let context = (!v.context.contains(v.dot)).then(|| v.context.clone());
                bytes += match v.loc {
                    Loc::Disk { len, .. } => len as usize,
                    Loc::Pending(ref b) => b.len(),
                };
                picked.push((v.loc.clone(), context));
            }
            last = Some(id);
        }
        let token = match (more, last) {
            (true, Some((c, key))) => {
                let code = Collection::ALL.iter().position(|x| x == c).unwrap_or(0) as u8;
                let mut t = vec![code];
                t.extend_from_slice(key);
                t
            }
            _ => Vec::new(),
        };
        let handles = segment_handles(&st.files, picked.iter().map(|(loc, _)| loc));
        let vector = st.vector.clone();
        drop(kd);
        drop(st);
        drop(merging);
        let locs: Vec<Loc> = picked.iter().map(|(loc, _)| loc.clone()).collect();
        let read: Vec<T> = read_entries(&locs, |f| handles.get(&f).map(|(h, n)| (&**h, n.as_str())))?;
        let mut out = Vec::with_capacity(read.len());
        for (entry, (_, context)) in read.into_iter().zip(picked) {
            out.push(match context {
                Some(context) => entry.with_context(context)?,
                None => entry,
            });
        }
        Ok((vector, out, token))
    }

    /// Every durable version's key and place (segment, offset), for tests.
    #[cfg(test)]
    pub(crate) fn disk_locations(&self) -> Vec<(KeyId, u32, u32)> {
        let mut out = Vec::new();
        for (id, versions) in self.keys.lock_all().iter() {
            for v in versions {
                if let Loc::Disk { file, offset, .. } = v.loc {
                    out.push((id.clone(), file, offset));
                }
            }
        }
        out
    }

    /// Starts receiving a snapshot of leaf `buckets` (`None`: all) from `peer`
    /// (dropping one it had started).
    pub(crate) fn begin_snapshot(&self, peer: &str, buckets: Option<&[u32]>) -> Result<()> {
        self.abort_snapshot(peer);
        let (number, name, file) = self.create_compacted_tmp("create snapshot segment")?;
        let header = SegmentHeader {
            kind: SegmentKind::Compacted,
            stream: self.stream,
            incarnation: self.incarnation,
            number: u64::from(number),
        };
        file.write_all_at(&header.encode(), 0).map_err(io_err(&name, "write snapshot header"))?;
        let staging = Staging {
            number,
            name,
            file,
            end: HEADER_BYTES,
            staged: Vec::new(),
            buckets: buckets.map(<[u32]>::to_vec),
        };
        lock(&self.staging).insert(peer.to_string(), staging);
        Ok(())
    }

    /// Appends a chunk's entries to the snapshot from `peer`.
    pub(crate) fn stage_snapshot(&self, peer: &str, entries: Vec<Entry>) -> Result<()> {
        let mut staging = lock(&self.staging);
        let s = staging.get_mut(peer).ok_or(Error::Request("no snapshot in progress from this peer"))?;
        // Versions newer than `at` are staged too: one may be what superseded a version
        // `at` covers (the receiver will claim that one, so it must get its successor).
        let mut entries: Vec<Entry> =
            entries.into_iter().filter(|e| e.collection.stream() == self.stream).collect();
        let encoded: Vec<Vec<u8>> = entries.iter().map(Entry::encode).collect();
        if self.stream != StreamId::Audit {
            for e in &mut entries {
                if let Op::Put { value, .. } = &mut e.op {
                    *value = Vec::new();
                }
            }
        }
        let mut entries = entries.into_iter();
        // Frames no larger than recovery accepts, at offsets the keydir can address.
        let mut groups: Vec<Vec<&[u8]>> = Vec::new();
        let mut size = 0;
        for e in &encoded {
            let add = segment::ENTRY_HEADER_BYTES + e.len() as u64;
            if groups.is_empty() || size + add > self.frame_max().max(FRAME_BYTES_MAX) {
                groups.push(Vec::new());
                size = FRAME_HEADER_BYTES + FRAME_COUNT_BYTES;
            }
            size += add;
            groups.last_mut().expect("a group was opened").push(e);
        }
        for refs in groups {
            let (frame, spans) = build_frame(&refs);
            if s.end + frame.len() as u64 > u64::from(u32::MAX) {
                return Err(Error::Request("snapshot larger than one segment can address"));
            }
            s.file.write_all_at(&frame, s.end).map_err(io_err(&s.name, "write snapshot frame"))?;
            for (rel, len) in spans {
                let entry = entries.next().expect("one entry per span");
                s.staged.push((entry, s.end as u32 + rel, len));
            }
            s.end += frame.len() as u64;
        }
        Ok(())
    }

    /// Drops the snapshot being received from `peer`, if any.
    pub(crate) fn abort_snapshot(&self, peer: &str) {
        if let Some(s) = lock(&self.staging).remove(peer) {
            let _ = self.storage.remove(&s.name);
        }
    }

    /// Completes the snapshot from `peer` taken at `at`: syncs and installs its segment,
    /// merges its versions (the obsolete rule keeps anything already superseded or
    /// collected here from coming back), drops local versions of the covered keys that
    /// the peer has seen (`at` covers them) but no longer holds (it superseded them, or
    /// deleted them and collected the tombstone: without this a replica restored from
    /// an old backup would bring them back), raises the vector to include `at`, and
    /// drops the log's index below the new floors; then checkpoints, which makes it all
    /// durable at once. A crash before that leaves the store as it was.
    pub(crate) fn finish_snapshot(&self, peer: &str, at: &VersionVector) -> Result<()> {
        let Some(s) = lock(&self.staging).remove(peer) else {
            return Err(Error::Request("no snapshot in progress from this peer"));
        };
        let _upkeep = lock(&self.upkeep);
        let _io = lock(&self.io);
        let _merging = lock(&self.merging);
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        let final_name = compacted_name(self.stream, s.number);
        let installed = (|| -> Result<()> {
            if self.options.syncs(SyncPoint::CompactedData) {
                s.file.sync_data().map_err(io_err(&s.name, "sync snapshot segment"))?;
            }
            self.storage.rename(&s.name, &final_name).map_err(io_err(&final_name, "rename snapshot segment"))
        })();
        if let Err(e) = installed {
            let _ = self.storage.remove(&s.name);
            return Err(e);
        }
        {
            let mut st = lock(&self.state);
            let mut kd = self.keys.lock_all();
            st.files.insert(
                s.number,
                FileMeta {
                    file: s.file.clone(),
                    name: final_name.clone(),
                    kind: SegmentKind::Compacted,
                    end: s.end,
                    vector: at.clone(),
                    dir_synced: true,
                },
            );
            let before = st.vector.clone();
            // Audit records are never superseded: their absence at the sender means
            // only that it forwarded and dropped them (a non-holder), so none go.
            let audit = self.stream == StreamId::Audit;
            let covers = |id: &KeyId| match &s.buckets {
                None => true,
                Some(b) => b.binary_search(&leaf_of(id.0, &id.1)).is_ok(),
            };
            // The local versions of covered keys that the peer has seen (`at` covers
            // them): those the snapshot does not bring, the peer no longer holds.
            // Listed before the merge (a store that held little lists little) and
            // struck off as the snapshot's versions go in.
            let mut doubtful: KeyMap<Vec<Dot>> = KeyMap::default();
            // Tracking the hash tree through an install larger than what is held costs
            // two digests per key it brings; built anew when next asked for, one.
            if s.staged.len() > kd.len() {
                st.tree = None;
            }
            if !audit {
                for (id, versions) in kd.iter() {
                    let dots: Vec<Dot> = versions.iter().map(|v| v.dot).filter(|&d| at.contains(d)).collect();
                    if !dots.is_empty() && covers(id) {
                        doubtful.insert_hashed(key_hash(id), id.clone(), dots);
                    }
                }
            }
            for (entry, offset, len) in &s.staged {
                if !doubtful.is_empty() {
                    if let Some(dots) = doubtful.get_mut(&(entry.collection, entry.key.as_slice())) {
                        dots.retain(|&d| d != entry.dot);
                    }
                }
                let loc = Loc::Disk { file: s.number, offset: *offset, len: *len };
                self.merge_durable(&mut st, &mut kd, entry, loc, Some(&before));
            }
            for (id, dots) in doubtful.iter() {
                let Some(versions) = kd.get_mut(id).filter(|_| !dots.is_empty()) else { continue };
                prune_key(&mut st.tree, id, versions, |v| !dots.contains(&v.dot));
                if versions.is_empty() {
                    kd.remove(id);
                }
            }
            // Audit records are never superseded, and a non-holder drops the ones every
            // holder acknowledged: claim only what is here without a gap (the rest comes
            // from another holder), never what a forwarder merely saw.
            let mut claim = at.clone();
            if self.stream == StreamId::Audit {
                claim = VersionVector::new();
                for d in at.iter() {
                    let mut seq = before.get(d.origin);
                    while seq < d.seq {
                        let next = Dot { origin: d.origin, seq: seq + 1 };
                        if !kd.contains_key(&(Collection::Audit, audit_key(next).into_boxed_slice())) {
                            break;
                        }
                        seq += 1;
                    }
                    claim.advance(Dot { origin: d.origin, seq });
                }
            }
            for d in claim.iter() {
                if d.seq > before.get(d.origin) {
                    st.origin_index.remove(&d.origin);
                }
            }
            st.vector.merge(&claim);
            st.submitted.merge(&claim);
            self.publish_vector(&st);
        }
        self.checkpoint_locked(true)?;
        Ok(())
    }

    // ----- maintenance ------------------------------------------------------------

    /// On an appliance that only forwards audit records: drops the records every holder
    /// has acknowledged durably (`acked` is the meet of the holders' acknowledged
    /// vectors), so compaction can reclaim them. Returns how many were dropped.
    pub(crate) fn release_audit(&self, acked: &VersionVector) -> usize {
        let _merging = lock(&self.merging);
        let mut st = lock(&self.state);
        st.audit_released.merge(acked);
        let mut kd = self.keys.lock_all();
        retain_versions(&mut st.tree, &mut kd, |(c, _), v| *c != Collection::Audit || !acked.contains(v.dot))
    }

    /// Own audit records not yet acknowledged by every holder.
    pub(crate) fn audit_backlog(&self) -> u64 {
        let st = lock(&self.state);
        st.submitted.get(self.incarnation).saturating_sub(st.audit_released.get(self.incarnation))
    }

    /// Removes expired versions from the keydir (sessions vanish without tombstones).
    pub(crate) fn expire(&self, now_ms: u64) -> usize {
        if lock(&self.state).next_expiry_ms.is_none_or(|t| t > now_ms) {
            return 0;
        }
        // No group half merged: its digests are of the versions before this sweep.
        let _merging = lock(&self.merging);
        let mut st = lock(&self.state);
        let mut kd = self.keys.lock_all();
        let dropped = retain_versions(&mut st.tree, &mut kd, |_, v| !v.is_expired(now_ms));
        st.next_expiry_ms = earliest_expiry(&kd);
        dropped
    }

    /// Drops tombstones every replica has seen: covered by every acked vector, with
    /// the local vector covering every acked vector (so nothing concurrent is in flight).
    pub(crate) fn collect_tombstones(&self, acked: &[VersionVector]) -> usize {
        let _merging = lock(&self.merging);
        let mut st = lock(&self.state);
        let local = st.vector.clone();
        let early = self.options.unsafe_collect_tombstones_early;
        if !early && !acked.iter().all(|a| local.descends(a)) {
            return 0;
        }
        let stable = acked
            .iter()
            .skip(1)
            .fold(acked.first().cloned().unwrap_or_else(|| local.clone()), |m, a| m.meet(a));
        let mut kd = self.keys.lock_all();
        retain_versions(&mut st.tree, &mut kd, |_, v| {
            !(v.tombstone && (early || (stable.contains(v.dot) && stable.descends(&v.context))))
        })
    }

    /// Writes a checkpoint of the keydir (hint file) covering the durable log.
    pub(crate) fn checkpoint(&self) -> Result<u64> {
        let _upkeep = lock(&self.upkeep);
        self.checkpoint_locked(false)
    }

    /// Writes a hint of the state as it is now. Called with the upkeep lock held, and
    /// `holding_merging` when the caller holds `merging` too. The image is taken under
    /// `merging` (no group half merged) and the state lock, so it pairs the keydir with the segment
    /// ends it was built from: a group being written meanwhile is past those ends and
    /// is replayed after the hint if it became durable. The image is serialized from
    /// the keydir in place (no copy of it); writing and syncing the file happen with
    /// no lock that commits need.
    fn checkpoint_locked(&self, holding_merging: bool) -> Result<u64> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        let (mut bytes, generation, old) = {
            let _merging = (!holding_merging).then(|| lock(&self.merging));
            let mut st = lock(&self.state);
            let kd = self.keys.lock_all();
            st.hint_generation += 1;
            let image = StreamImageView {
                stream: self.stream,
                files: st
                    .files
                    .iter()
                    // Spares after the active segment are found again by number at
                    // open; listing them would make the hint depend on their entries.
                    .filter(|(n, m)| m.kind == SegmentKind::Compacted || st.active.is_some_and(|a| **n <= a))
                    .map(|(n, m)| FileImage {
                        number: *n,
                        compacted: m.kind == SegmentKind::Compacted,
                        end: m.end,
                        vector: m.vector.clone(),
                    })
                    .collect(),
                active: st.active,
                next_file: st.next_file,
                keydir: KeydirView(&kd),
                vector: &st.vector,
                origin_index: st
                    .origin_index
                    .iter()
                    .map(|(o, m)| (*o, m.iter().map(|(s, (f, off))| (*s, *f, *off)).collect()))
                    .collect(),
                conflicts: ConflictsView(&st.conflicts),
                conflicts_dropped: st.conflicts_dropped,
                audit: &st.audit,
            };
            debug_assert!(kd.values().flatten().all(|v| matches!(v.loc, Loc::Disk { .. })));
            // The payload goes after room for the header, filled in below: no copy.
            let mut bytes = vec![0u8; HINT_HEADER_BYTES];
            image.encode_into(&mut bytes)?;
            (bytes, st.hint_generation, st.hint_generation - 1)
        };
        let payload = &bytes[HINT_HEADER_BYTES..];
        let mut head = Vec::with_capacity(HINT_HEADER_BYTES);
        head.extend_from_slice(&HINT_MAGIC);
        head.extend_from_slice(&HINT_VERSION.to_le_bytes());
        head.extend_from_slice(&[0u8; 6]);
        head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        head.extend_from_slice(blake3::hash(payload).as_bytes());
        bytes[..HINT_HEADER_BYTES].copy_from_slice(&head);
        let tmp = hint_tmp_name(self.stream);
        let name = hint_name(self.stream, generation);
        let _ = self.storage.remove(&tmp);
        let io = || -> std::io::Result<()> {
            let file = self.storage.create(&tmp)?;
            file.write_all_at(&bytes, 0)?;
            if self.options.syncs(SyncPoint::HintData) {
                file.sync_data()?;
            }
            self.storage.rename(&tmp, &name)?;
            if self.options.syncs(SyncPoint::HintDir) {
                self.storage.sync_dir()?;
            }
            Ok(())
        };
        io().map_err(|e| {
            if is_out_of_space(&e) {
                Error::StorageFull { stream: self.stream }
            } else {
                self.poisoned.store(true, Ordering::Release);
                io_err(&name, "write hint")(e)
            }
        })?;
        if old > 0 {
            // Older hints are no longer needed; a leftover one is removed at open.
            let _ = self.storage.remove(&hint_name(self.stream, old));
        }
        Ok(generation)
    }

    /// Compacts sealed log segments whose entries `horizon` covers (and, past the
    /// retention limit, the oldest ones regardless) into one compacted segment.
    ///
    /// Commits go on while it copies: the segments it reads are sealed (no commit
    /// writes to them, and only upkeep, which this holds, removes them), and a version
    /// superseded meanwhile is copied in vain but never repointed. Only choosing the
    /// live records and repointing the keydir hold the state lock.
    pub(crate) fn compact(&self, horizon: &VersionVector) -> Result<CompactionReport> {
        let _upkeep = lock(&self.upkeep);
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        let mut report = CompactionReport::default();
        let (selected, old_compacted, live, sources) = {
            // With no group merging, every segment before the active one holds only
            // merged groups: a group not merged yet is the last one taken, in the
            // active segment.
            let _merging = lock(&self.merging);
            let st = lock(&self.state);
            let Some(active) = st.active else { return Ok(report) };
            let logs: Vec<(u32, u64, bool)> = st
                .files
                .iter()
                .filter(|(n, m)| m.kind == SegmentKind::Log && **n < active)
                .map(|(n, m)| (*n, m.end, horizon.descends(&m.vector)))
                .collect();
            let mut total: u64 =
                st.files.values().filter(|m| m.kind == SegmentKind::Log).map(|m| m.end).sum();
            let mut selected = Vec::new();
            for (n, end, covered) in logs {
                let over = total > self.options.log_retained_bytes_max;
                if !(covered || over) {
                    break;
                }
                report.forced |= !covered;
                total -= end;
                selected.push(n);
            }
            if selected.is_empty() {
                return Ok(report);
            }
            let old_compacted: Vec<u32> =
                st.files.iter().filter(|(_, m)| m.kind == SegmentKind::Compacted).map(|(n, _)| *n).collect();
            let sources: Vec<u32> = old_compacted.iter().chain(selected.iter()).copied().collect();
            // The live records and their keys (copied into one buffer, to be sorted
            // after the locks go).
            let mut live = LiveRecords::default();
            for ((c, k), versions) in self.keys.lock_all().iter() {
                for v in versions {
                    if let Loc::Disk { file, offset, len } = v.loc {
                        if sources.contains(&file) {
                            live.push(*c, k, (file, offset, len));
                        }
                    }
                }
            }
            // Handles to read them through without the state lock.
            let sources: HashMap<u32, (Arc<dyn StorageFile>, String)> = sources
                .iter()
                .filter_map(|n| st.files.get(n).map(|m| (*n, (m.file.clone(), m.name.clone()))))
                .collect();
            (selected, old_compacted, live, sources)
        };

        // The new segment holds its records in key order: a snapshot or a repair walks
        // keys in order and then reads a few long runs instead of a record here and
        // there (the records of one key stay in log order).
        let live = live.in_key_order();
        // Copy live entries into a new compacted segment.
        let (number, name, file) = self.create_compacted_tmp("create compacted segment")?;
        let header = SegmentHeader {
            kind: SegmentKind::Compacted,
            stream: self.stream,
            incarnation: self.incarnation,
            number: number as u64,
        };
        let mut moved: HashMap<(u32, u32), Loc> = HashMap::with_capacity(live.len());
        let mut vector = VersionVector::new();
        let mut at = HEADER_BYTES;
        let mut copy = || -> Result<u64> {
            file.write_all_at(&header.encode(), 0).map_err(io_err(&name, "write compacted header"))?;
            let mut pending: Vec<(u32, u32, Vec<u8>)> = Vec::new();
            let mut pending_bytes = FRAME_HEADER_BYTES + FRAME_COUNT_BYTES;
            let mut flush = |pending: &mut Vec<(u32, u32, Vec<u8>)>, at: &mut u64| -> Result<()> {
                if pending.is_empty() {
                    return Ok(());
                }
                let refs: Vec<&[u8]> = pending.iter().map(|(_, _, b)| b.as_slice()).collect();
                let (frame, spans) = build_frame(&refs);
                file.write_all_at(&frame, *at).map_err(io_err(&name, "write compacted frame"))?;
                for ((f, o, _), (rel, len)) in pending.iter().zip(spans) {
                    moved.insert((*f, *o), Loc::Disk { file: number, offset: *at as u32 + rel, len });
                }
                *at += frame.len() as u64;
                pending.clear();
                Ok(())
            };
            for batch in live.chunks(COMPACTION_READ_ENTRIES) {
                let locs: Vec<Loc> =
                    batch.iter().map(|&(file, offset, len)| Loc::Disk { file, offset, len }).collect();
                // Copied in their encoding: checked by their checksums, not decoded.
                let entries: Vec<EncodedEntry> =
                    read_entries(&locs, |f| sources.get(&f).map(|(file, name)| (&**file, name.as_str())))?;
                for (&(f, o, _), entry) in batch.iter().zip(entries) {
                    vector.advance(entry.dot());
                    let bytes = entry.into_bytes();
                    let add = segment::ENTRY_HEADER_BYTES + bytes.len() as u64;
                    if pending_bytes + add > self.frame_max().max(FRAME_BYTES_MAX) {
                        flush(&mut pending, &mut at)?;
                        pending_bytes = FRAME_HEADER_BYTES + FRAME_COUNT_BYTES;
                    }
                    pending_bytes += add;
                    pending.push((f, o, bytes));
                }
            }
            flush(&mut pending, &mut at)?;
            if self.options.syncs(SyncPoint::CompactedData) {
                file.sync_data().map_err(io_err(&name, "sync compacted segment"))?;
            }
            // No directory fsync here: the hint written next syncs the directory
            // before any old segment is removed, which makes this entry durable too.
            Ok(at)
        };
        let final_name = compacted_name(self.stream, number);
        let end = match copy().and_then(|end| {
            self.storage
                .rename(&name, &final_name)
                .map_err(io_err(&final_name, "rename compacted segment"))?;
            Ok(end)
        }) {
            Ok(end) => end,
            Err(e) => {
                // Nothing points into the new file yet; the old segments are intact.
                let _ = self.storage.remove(&name);
                if !matches!(e, Error::StorageFull { .. })
                    && !matches!(&e, Error::Io { source, .. } if is_out_of_space(source))
                {
                    self.poisoned.store(true, Ordering::Release);
                }
                return Err(e);
            }
        };

        let removed_names = {
            // No group half merged: one merging now may record a loser's value, read
            // from a segment this removes.
            let _merging = lock(&self.merging);
            let mut st = lock(&self.state);
            let repoint = |v: &mut Version| {
                if let Loc::Disk { file, offset, .. } = v.loc {
                    if let Some(new) = moved.get(&(file, offset)) {
                        v.loc = new.clone();
                    }
                }
            };
            self.keys.lock_all().for_each_version_mut(repoint);
            st.files.insert(
                number,
                FileMeta {
                    file: file.clone(),
                    name: final_name.clone(),
                    kind: SegmentKind::Compacted,
                    end,
                    vector,
                    dir_synced: true,
                },
            );
            let mut removed = Vec::new();
            for n in selected.iter().chain(old_compacted.iter()) {
                if let Some(m) = st.files.remove(n) {
                    removed.push(m.name);
                }
            }
            for index in st.origin_index.values_mut() {
                index.retain(|_, (f, _)| !selected.contains(f));
            }
            st.origin_index.retain(|_, m| !m.is_empty());
            removed
        };
        report.segments_compacted = selected.len();
        report.entries_kept = live.len();
        // The hint records the new file set before the old files go.
        self.checkpoint_locked(false)?;
        for name in removed_names {
            let _ = self.storage.remove(&name);
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use repl_wire::Hlc;

    use super::*;

    fn version(origin: u64, seq: u64, tombstone: bool) -> Version {
        Version {
            dot: Dot { origin: Incarnation(origin), seq },
            hlc: Hlc { wall_ms: 1_000 + seq, logical: 0 },
            context: VersionVector::from_dot(Dot { origin: Incarnation(origin), seq: seq.saturating_sub(1) }),
            tombstone,
            expires_at_ms: (seq % 2 == 0).then_some(5_000),
            loc: Loc::Disk { file: 3, offset: 64 * seq as u32, len: 40 },
        }
    }

    #[test]
    fn a_large_batch_finds_its_keys_through_the_hash_index_even_when_hashes_collide() {
        let key = |i: u32| format!("user{i:04}").into_bytes();
        let real = |c: Collection, k: &[u8]| key_hash(&(c, k));
        for hash in [real, |_: Collection, _: &[u8]| 7] {
            let mut staged = Staged::new(Vec::new());
            for i in 0..100u32 {
                let h = hash(Collection::Users, &key(i));
                assert_eq!(staged.find(h, Collection::Users, &key(i)), None, "key {i} before it is staged");
                staged.push(
                    h,
                    (Collection::Users, key(i).into_boxed_slice()),
                    vec![version(7, u64::from(i) + 1, false)],
                );
            }
            for i in 0..100u32 {
                let h = hash(Collection::Users, &key(i));
                assert_eq!(staged.find(h, Collection::Users, &key(i)), Some(i as usize), "key {i}");
            }
            let h = hash(Collection::UserPolicies, &key(5));
            assert_eq!(staged.find(h, Collection::UserPolicies, &key(5)), None, "another collection");
            let h = hash(Collection::Users, b"user9999");
            assert_eq!(staged.find(h, Collection::Users, b"user9999"), None, "a key never staged");
        }
    }

    #[test]
    fn a_hint_serialized_in_place_has_the_bytes_of_the_copied_image() {
        let keys = Keys::default();
        let mut keydir = keys.lock_all();
        for i in 0..50u64 {
            let key: KeyId = (Collection::Users, format!("user{i}").into_bytes().into_boxed_slice());
            let mut versions = vec![version(7, i + 1, i % 5 == 0)];
            if i % 7 == 0 {
                versions.push(version(9, i + 1, false));
            }
            keydir.insert_new(key, versions);
        }
        // Integers of every varint width, a key longer than one length byte holds, a
        // wide context and the other collections.
        for (i, c) in Collection::ALL.iter().enumerate() {
            let i = i as u64;
            let mut v = version(u64::MAX - i, (1 << 40) + i, i % 2 == 1);
            v.hlc = Hlc { wall_ms: 1_800_000_000_000 + i, logical: u32::MAX - i as u32 };
            v.expires_at_ms = (i % 3 != 0).then_some(u64::MAX / (i + 1));
            v.loc = Loc::Disk { file: u32::MAX, offset: 1 << (20 + i), len: 300 };
            for o in 0..20 {
                v.context.advance(Dot { origin: Incarnation(o << (3 * o)), seq: (1 << (3 * o)) + 1 });
            }
            keydir.insert_new((*c, vec![i as u8; 200 + i as usize].into_boxed_slice()), vec![v]);
        }
        let record = |i: u64| ConflictRecord {
            collection: Collection::UserPolicies,
            key: vec![i as u8; 3],
            loser: Dot { origin: Incarnation(9), seq: i },
            value: (i % 2 == 0).then(|| vec![1, 2, 3]),
            winner: Dot { origin: Incarnation(7), seq: i },
        };
        let mut conflicts: BTreeMap<Collection, VecDeque<ConflictRecord>> = BTreeMap::new();
        conflicts.insert(Collection::Users, (0..3).map(record).collect());
        conflicts.insert(Collection::UserPolicies, (3..5).map(record).collect());
        let vector = VersionVector::from_dot(Dot { origin: Incarnation(7), seq: 50 });
        let files = vec![FileImage { number: 3, compacted: false, end: 4_096, vector: vector.clone() }];
        let origin_index = vec![(Incarnation(7), vec![(1, 3, 64)])];
        let audit = AuditIndex::default();

        let copied = StreamImage {
            stream: StreamId::Enterprise,
            files: files.clone(),
            active: Some(3),
            next_file: 4,
            keydir: keydir.iter().map(|((c, k), v)| KeyImage(*c, k.to_vec(), v.clone())).collect(),
            vector: vector.clone(),
            origin_index: origin_index.clone(),
            conflicts: conflicts.values().flatten().cloned().collect(),
            conflicts_dropped: 2,
            audit: audit.clone(),
        };
        let view = StreamImageView {
            stream: StreamId::Enterprise,
            files,
            active: Some(3),
            next_file: 4,
            keydir: KeydirView(&keydir),
            vector: &vector,
            origin_index,
            conflicts: ConflictsView(&conflicts),
            conflicts_dropped: 2,
            audit: &audit,
        };
        // Keys as byte strings are the bytes keys as sequences of `u8` were.
        let as_seq: Vec<(Collection, Vec<u8>, Vec<Version>)> =
            copied.keydir.iter().map(|KeyImage(c, k, v)| (*c, k.clone(), v.clone())).collect();
        assert_eq!(
            postcard::to_allocvec(&as_seq).expect("serialize keys as sequences"),
            postcard::to_allocvec(&copied.keydir).expect("serialize keys as byte strings"),
        );
        let old = postcard::to_allocvec(&copied).expect("serialize the copy");
        let new = postcard::to_allocvec(&view).expect("serialize in place");
        assert_eq!(old, new, "a hint written in place must read as before");
        let mut by_hand = vec![0xAA; 5];
        view.encode_into(&mut by_hand).expect("encode by hand");
        assert_eq!(by_hand[..5], [0xAA; 5], "what the buffer held stays");
        assert_eq!(by_hand[5..], new[..], "the keydir written by hand has serde's bytes");
        let back: StreamImage = postcard::from_bytes(&new).expect("read back");
        assert_eq!(back.keydir.len(), 50 + Collection::ALL.len());
        assert_eq!(back.conflicts.len(), 5);
    }
}
