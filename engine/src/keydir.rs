//! The keydir: every key of a stream with its durable versions.
//!
//! Point lookups (two per write: one when it is submitted, one when it commits, and
//! one per read) go through a hash map, with the key's hash computed once per write
//! ([`KeyMap`]). In a B-tree each of them cost about 30 key
//! comparisons, a third of a durable put's instructions (callgrind, 40,000 puts of 8
//! writers). The key order that listings and snapshot chunks need comes from an
//! ordered index of the keys, built at the first ordered use and kept current from
//! then on (as the anti-entropy hash tree is): a store that is never listed nor asked
//! for a snapshot does not pay for it on every new key.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use hashbrown::hash_table::{self, HashTable};

use repl_wire::Collection;

use crate::keyhash::BuildKeyHasher;
use crate::versions::Version;

/// A key of a stream: its collection and bytes.
pub(crate) type KeyId = (Collection, Box<[u8]>);

/// A key as `(collection, bytes)`, owned or borrowed: the keydir and the overlay are
/// searched with a borrowed key (`&(c, key) as &dyn KeyView`), so a lookup does not
/// allocate a copy of the key first.
pub(crate) trait KeyView {
    fn view(&self) -> (Collection, &[u8]);
}

impl KeyView for KeyId {
    fn view(&self) -> (Collection, &[u8]) {
        (self.0, &self.1)
    }
}

impl KeyView for (Collection, &[u8]) {
    fn view(&self) -> (Collection, &[u8]) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn KeyView + 'a> for KeyId {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

// The same order as `KeyId`'s own (collection, then bytes), as `Borrow` requires.
impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl Eq for dyn KeyView + '_ {}

impl PartialOrd for dyn KeyView + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for dyn KeyView + '_ {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.view().cmp(&other.view())
    }
}

// The same hash as `KeyId`'s derived one (the collection, then the bytes as a slice).
impl std::hash::Hash for dyn KeyView + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (collection, key) = self.view();
        collection.hash(state);
        key.hash(state);
    }
}

/// A hash map from keys to `V` that takes a key's hash from its caller when the
/// caller has it: a write hashes its key once, before the state lock, and the overlay
/// and the keydir (two lookups when it is submitted, two when it commits) reuse it.
/// All maps use the process's [`BuildKeyHasher::shared`], so their hashes agree.
///
/// Each slot keeps its key's hash beside the key: growing the table moves every key
/// by that hash instead of hashing every key again (a read of each key's separate
/// allocation; 3% of a catch-up's samples), for 8 bytes per key.
#[derive(Debug)]
pub(crate) struct KeyMap<V> {
    table: HashTable<(u64, KeyId, V)>,
}

impl<V> Default for KeyMap<V> {
    fn default() -> Self {
        KeyMap { table: HashTable::new() }
    }
}

/// The hash every key map gives `id`.
pub(crate) fn key_hash(id: &dyn KeyView) -> u64 {
    BuildKeyHasher::shared().hash_one(id)
}

fn rehash<V>(entry: &(u64, KeyId, V)) -> u64 {
    entry.0
}

fn same_key<V>(hash: u64, id: &dyn KeyView) -> impl Fn(&(u64, KeyId, V)) -> bool + '_ {
    let (c, key) = id.view();
    move |(h, held, _)| *h == hash && held.0 == c && *held.1 == *key
}

impl<V> KeyMap<V> {
    pub(crate) fn with_capacity(n: usize) -> Self {
        KeyMap { table: HashTable::with_capacity(n) }
    }

    /// `hash` is [`key_hash`] of `id`.
    pub(crate) fn get_hashed(&self, hash: u64, id: &dyn KeyView) -> Option<&V> {
        self.table.find(hash, same_key(hash, id)).map(|(_, _, v)| v)
    }

    pub(crate) fn get_mut(&mut self, id: &dyn KeyView) -> Option<&mut V> {
        let hash = key_hash(id);
        self.table.find_mut(hash, same_key(hash, id)).map(|(_, _, v)| v)
    }

    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Sets `id`'s value; returns the one it replaces.
    pub(crate) fn insert_hashed(&mut self, hash: u64, id: KeyId, value: V) -> Option<V> {
        match self.table.entry(hash, same_key(hash, &id), rehash) {
            hash_table::Entry::Occupied(mut held) => Some(std::mem::replace(&mut held.get_mut().2, value)),
            hash_table::Entry::Vacant(place) => {
                place.insert((hash, id, value));
                None
            }
        }
    }

    pub(crate) fn remove_entry_hashed(&mut self, hash: u64, id: &dyn KeyView) -> Option<(KeyId, V)> {
        self.table.find_entry(hash, same_key(hash, id)).ok().map(|held| {
            let ((_, id, value), _) = held.remove();
            (id, value)
        })
    }

    pub(crate) fn remove_entry(&mut self, id: &dyn KeyView) -> Option<(KeyId, V)> {
        self.remove_entry_hashed(key_hash(id), id)
    }

    /// `id` as held and its value, or the key and value `make()` gives inserted for
    /// it and `true`: one lookup for both.
    pub(crate) fn slot_hashed(
        &mut self,
        hash: u64,
        id: &dyn KeyView,
        make: impl FnOnce() -> (KeyId, V),
    ) -> (&KeyId, &mut V, bool) {
        let (held, fresh) = match self.table.entry(hash, same_key(hash, id), rehash) {
            hash_table::Entry::Occupied(held) => (held.into_mut(), false),
            hash_table::Entry::Vacant(place) => {
                let (id, value) = make();
                (place.insert((hash, id, value)).into_mut(), true)
            }
        };
        (&held.1, &mut held.2, fresh)
    }

    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = (&KeyId, &V)> + '_ {
        self.table.iter().map(|(_, id, v)| (id, v))
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> + '_ {
        self.table.iter().map(|(_, _, v)| v)
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> + '_ {
        self.table.iter_mut().map(|(_, _, v)| v)
    }

    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&KeyId, &mut V) -> bool) {
        self.table.retain(|(_, id, v)| keep(id, v));
    }
}

/// How many shards a stream's keys are spread over, each behind its own lock: the
/// group commit merges a group into the keydir one key at a time, holding only that
/// key's shard, while writers look up and queue keys under the state lock and the
/// shards of theirs. One lock for all of it kept the two cores from working at once
/// (a store of eight writers used 1.2 of them).
pub(crate) const SHARDS: usize = 16;

/// The shard of a key whose [`key_hash`] is `hash`: bits the tables do not use (they
/// take a bucket from the low bits and a tag from the top seven).
fn shard_of(hash: u64) -> usize {
    (hash >> 40) as usize % SHARDS
}

/// A shard or the ordered index, locked. A panic while one is held leaves it
/// consistent between statements (as the stream's state lock), so poison is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The ordered index of a stream's keys, `None` until something needed key order.
pub(crate) type Order = Option<BTreeSet<KeyId>>;

/// One shard of a stream's keys: their durable versions (the keydir: exactly the
/// durable log) and, for keys with writes queued, their versions including the queue
/// and the ticket of the last queued write (the overlay). A key's two entries are in
/// the same shard, so its move from the overlay into the keydir is atomic.
#[derive(Debug, Default)]
pub(crate) struct Shard {
    keydir: KeyMap<Vec<Version>>,
    /// (Hashed: each write looks it up four times, and in a B-tree those searches
    /// were most of the key comparisons of a write.)
    pub(crate) overlay: KeyMap<(Vec<Version>, u64)>,
    /// Whether the ordered index is built (it then follows every key added or removed).
    ordered: bool,
}

/// The ordered index as a caller of [`Shard`] reaches it: held already (all shards
/// locked), or behind its lock, taken only when a key comes or goes.
pub(crate) enum OrderRef<'a> {
    Held(&'a mut Order),
    Lock(&'a Mutex<Order>),
}

impl OrderRef<'_> {
    fn update(&mut self, change: impl FnOnce(&mut BTreeSet<KeyId>)) {
        match self {
            OrderRef::Held(order) => order.as_mut().map(change),
            OrderRef::Lock(m) => lock(m).as_mut().map(change),
        };
    }
}

impl Shard {
    /// The versions of a key: queued, else durable. `hash` is [`key_hash`] of `id`.
    pub(crate) fn held(&self, hash: u64, id: &dyn KeyView) -> &[Version] {
        self.overlay
            .get_hashed(hash, id)
            .map(|(v, _)| v)
            .or_else(|| self.keydir.get_hashed(hash, id))
            .map_or(&[], |v| v.as_slice())
    }

    /// The durable versions held for `id` (whose [`key_hash`] is `hash`), or a new
    /// empty list for them, with the key, from `make` (a spare list is emptied, kept
    /// for its allocation) and `true`: one lookup for both. A new key left without
    /// versions must be removed again ([`Shard::remove`]).
    pub(crate) fn slot(
        &mut self,
        hash: u64,
        id: &dyn KeyView,
        make: impl FnOnce() -> (KeyId, Vec<Version>),
        order: &mut OrderRef<'_>,
    ) -> (&mut Vec<Version>, bool) {
        let (key, held, fresh) = self.keydir.slot_hashed(hash, id, make);
        if fresh {
            held.clear();
            if self.ordered {
                order.update(|o| {
                    o.insert(key.clone());
                });
            }
        }
        (held, fresh)
    }

    /// Removes `id` and its durable versions.
    pub(crate) fn remove(&mut self, id: &dyn KeyView, order: &mut OrderRef<'_>) {
        if let Some((key, _)) = self.keydir.remove_entry(id) {
            if self.ordered {
                order.update(|o| {
                    o.remove(&key);
                });
            }
        }
    }
}

/// Every key of a stream, in [`SHARDS`] shards. Lock order: the stream's state lock,
/// then shards (all of them in index order, or one at a time), then the order lock.
#[derive(Debug)]
pub(crate) struct Keys {
    shards: Box<[Mutex<Shard>]>,
    order: Mutex<Order>,
}

impl Default for Keys {
    fn default() -> Self {
        Keys { shards: (0..SHARDS).map(|_| Mutex::default()).collect(), order: Mutex::new(None) }
    }
}

impl Keys {
    /// The shard of the key whose [`key_hash`] is `hash`, locked.
    pub(crate) fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        lock(&self.shards[shard_of(hash)])
    }

    /// The ordered index's lock, for [`Shard::slot`] and [`Shard::remove`] with one
    /// shard locked.
    pub(crate) fn order(&self) -> OrderRef<'_> {
        OrderRef::Lock(&self.order)
    }

    /// Every shard locked: a view of all keys at once.
    pub(crate) fn lock_all(&self) -> Keydir<'_> {
        let shards = self.shards.iter().map(lock).collect();
        let order = lock(&self.order);
        Keydir { shards, order }
    }

    /// Keys held with at least one durable version.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|m| lock(m).keydir.len()).sum()
    }
}

/// Every key of a stream and its durable versions, all shards locked; no key is held
/// without a version.
pub(crate) struct Keydir<'a> {
    shards: Vec<MutexGuard<'a, Shard>>,
    order: MutexGuard<'a, Order>,
}

impl Keydir<'_> {
    /// The shard of `hash` and the ordered index, for [`Shard::slot`] and
    /// [`Shard::remove`].
    pub(crate) fn shard_mut(&mut self, hash: u64) -> (&mut Shard, OrderRef<'_>) {
        (&mut self.shards[shard_of(hash)], OrderRef::Held(&mut self.order))
    }

    /// `hash` is [`key_hash`] of `id`.
    pub(crate) fn get_hashed(&self, hash: u64, id: &dyn KeyView) -> Option<&Vec<Version>> {
        self.shards[shard_of(hash)].keydir.get_hashed(hash, id)
    }

    pub(crate) fn contains_key(&self, id: &dyn KeyView) -> bool {
        self.get_hashed(key_hash(id), id).is_some()
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.keydir.len()).sum()
    }

    /// The versions of `id`; a caller that empties them must remove the key
    /// ([`Keydir::remove`]).
    pub(crate) fn get_mut(&mut self, id: &dyn KeyView) -> Option<&mut Vec<Version>> {
        let hash = key_hash(id);
        self.shards[shard_of(hash)].keydir.get_mut(id)
    }

    /// Adds a key that is not held yet, with its (non-empty) versions.
    #[cfg(test)]
    pub(crate) fn insert_new(&mut self, id: KeyId, versions: Vec<Version>) {
        debug_assert!(!versions.is_empty(), "the keydir holds no key without versions");
        let hash = key_hash(&id);
        let (shard, mut order) = self.shard_mut(hash);
        let (held, fresh) = shard.slot(hash, &id.view(), || (id.clone(), Vec::new()), &mut order);
        debug_assert!(fresh, "insert_new of a key already held");
        *held = versions;
    }

    /// Removes `id` and its versions.
    pub(crate) fn remove(&mut self, id: &dyn KeyView) {
        let (shard, mut order) = self.shard_mut(key_hash(id));
        shard.remove(id, &mut order);
    }

    /// Every key and its versions, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&KeyId, &Vec<Version>)> + '_ {
        self.shards.iter().flat_map(|s| s.keydir.iter())
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &Vec<Version>> + '_ {
        self.shards.iter().flat_map(|s| s.keydir.values())
    }

    /// Every key with writes queued, and its versions including them.
    pub(crate) fn overlay(&self) -> impl Iterator<Item = (&KeyId, &(Vec<Version>, u64))> + '_ {
        self.shards.iter().flat_map(|s| s.overlay.iter())
    }

    /// Calls `f` on every version held, durable and queued.
    pub(crate) fn for_each_version_mut(&mut self, mut f: impl FnMut(&mut Version)) {
        for shard in self.shards.iter_mut() {
            let Shard { keydir, overlay, .. } = &mut **shard;
            keydir.values_mut().flatten().for_each(&mut f);
            overlay.values_mut().flat_map(|(v, _)| v.iter_mut()).for_each(&mut f);
        }
    }

    /// Keeps the keys `keep` accepts (it may change their versions; a key it accepts
    /// must still have some).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&KeyId, &mut Vec<Version>) -> bool) {
        let Keydir { shards, order } = self;
        for shard in shards.iter_mut() {
            shard.keydir.retain(|id, versions| {
                let kept = keep(id, versions);
                if !kept {
                    if let Some(order) = order.as_mut() {
                        order.remove(id);
                    }
                }
                kept
            });
        }
    }

    /// Builds the ordered index if it is not built yet. Taken before [`Keydir::range`],
    /// which needs it; it stays built and current from then on.
    pub(crate) fn order_keys(&mut self) {
        if self.order.is_none() {
            *self.order = Some(self.iter().map(|(id, _)| id.clone()).collect());
            for shard in self.shards.iter_mut() {
                shard.ordered = true;
            }
        }
    }

    /// The keys after `start` in order, with their versions. The ordered index must be
    /// built ([`Keydir::order_keys`]).
    pub(crate) fn range<'b>(
        &'b self,
        start: Bound<&'b KeyId>,
    ) -> impl Iterator<Item = (&'b KeyId, &'b Vec<Version>)> + 'b {
        let order = self.order.as_ref().expect("order_keys before an ordered walk");
        order.range::<KeyId, _>((start, Bound::Unbounded)).map(move |id| {
            let versions = self.get_hashed(key_hash(id), id).expect("the ordered index holds only held keys");
            (id, versions)
        })
    }

    /// Replaces every key with those of a loaded hint (each key once, as its writer
    /// held them in a map). Inserting a million keys in the hint's order writes all
    /// over a 100 MB table (a cache miss each, twice the time a B-tree took to build
    /// from the sorted keys); in the order of the slot each key hashes to, the writes
    /// sweep each shard's table once from start to end.
    pub(crate) fn load(&mut self, keys: impl IntoIterator<Item = (KeyId, Vec<Version>)>) {
        let mut parts: Vec<Vec<(u64, KeyId, Vec<Version>)>> = (0..SHARDS).map(|_| Vec::new()).collect();
        for (id, versions) in keys {
            let hash = key_hash(&id);
            parts[shard_of(hash)].push((hash, id, versions));
        }
        *self.order = None;
        for (shard, mut items) in self.shards.iter_mut().zip(parts) {
            // The table starts probing at the hash's low bits under its power-of-two mask.
            let buckets = (items.len().saturating_mul(8) / 7).next_power_of_two().max(1) as u64;
            items.sort_unstable_by_key(|(hash, _, _)| hash & (buckets - 1));
            let mut map = KeyMap::with_capacity(items.len());
            for (hash, id, versions) in items {
                map.insert_hashed(hash, id, versions);
            }
            shard.keydir = map;
            shard.ordered = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use repl_wire::{Dot, Hlc, Incarnation, VersionVector};

    use super::*;
    use crate::versions::Loc;

    fn version(seq: u64) -> Version {
        Version {
            dot: Dot { origin: Incarnation(1), seq },
            hlc: Hlc::default(),
            context: VersionVector::new(),
            tombstone: false,
            expires_at_ms: None,
            loc: Loc::Disk { file: 0, offset: 0, len: 0 },
        }
    }

    fn id(c: Collection, key: &str) -> KeyId {
        (c, key.as_bytes().into())
    }

    #[test]
    fn the_ordered_index_follows_inserts_and_removals_after_it_is_built() {
        let keys = Keys::default();
        let mut kd = keys.lock_all();
        for (i, k) in ["m", "c", "x"].iter().enumerate() {
            kd.insert_new(id(Collection::Users, k), vec![version(i as u64 + 1)]);
        }
        kd.insert_new(id(Collection::UserPolicies, "a"), vec![version(9)]);
        assert!(kd.order.is_none(), "no ordered index before an ordered walk");
        kd.order_keys();
        kd.insert_new(id(Collection::Users, "e"), vec![version(4)]);
        kd.retain(|id, _| &*id.1 != b"m");
        let walk: Vec<(Collection, String)> = kd
            .range(Bound::Unbounded)
            .map(|((c, k), _)| (*c, String::from_utf8_lossy(k).into_owned()))
            .collect();
        let users = |k: &str| (Collection::Users, k.to_string());
        assert_eq!(walk, [users("c"), users("e"), users("x"), (Collection::UserPolicies, "a".into())]);
        let from = id(Collection::Users, "e");
        let after: Vec<u64> = kd.range(Bound::Excluded(&from)).map(|(_, v)| v[0].dot.seq).collect();
        assert_eq!(after, [3, 9]);
        let view = (Collection::Users, &b"x"[..]);
        assert_eq!(kd.get_hashed(key_hash(&view), &view).map(|v| v[0].dot.seq), Some(3));
        assert_eq!(kd.iter().count(), 4);
    }

    #[test]
    fn keys_added_and_removed_through_one_shard_reach_the_ordered_index() {
        let keys = Keys::default();
        let add = |k: &str, seq: u64| {
            let id = id(Collection::Users, k);
            let hash = key_hash(&id);
            let mut shard = keys.shard(hash);
            let (held, fresh) = shard.slot(hash, &id.view(), || (id.clone(), Vec::new()), &mut keys.order());
            assert!(fresh, "{k} is new");
            held.push(version(seq));
        };
        let walk = || -> Vec<String> {
            let mut kd = keys.lock_all();
            kd.order_keys();
            kd.range(Bound::Unbounded).map(|((_, k), _)| String::from_utf8_lossy(k).into_owned()).collect()
        };
        add("b", 1);
        assert_eq!(walk(), ["b"], "built from what the shards hold");
        // Enough keys that every shard gets some, added after the index is built.
        let names: Vec<String> = (0..64).map(|i| format!("k{i:02}")).collect();
        for (i, k) in names.iter().enumerate() {
            add(k, i as u64 + 2);
        }
        let gone = id(Collection::Users, "k07");
        keys.shard(key_hash(&gone)).remove(&gone.view(), &mut keys.order());
        let mut expected: Vec<String> = names.into_iter().filter(|k| k != "k07").collect();
        expected.insert(0, "b".into());
        assert_eq!(walk(), expected);
        assert_eq!(keys.len(), 64);
    }
}
