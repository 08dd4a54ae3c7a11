use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Storage, StorageFile};
use crate::rng::SplitMix64;

const PAGE_BYTES: u64 = 4096;
const SECTOR_BYTES: u64 = 512;

/// Faults a [`SimStorage`] injects. Every choice it makes is drawn from `seed`.
#[derive(Debug, Clone, Default)]
pub struct SimConfig {
    /// Seeds the choice of which unsynced pages and directory operations survive a crash.
    pub seed: u64,
    /// Total bytes the disk holds; writes past it fail with `StorageFull`.
    pub capacity_bytes: Option<u64>,
    /// Sync calls (file or directory) from this index on fail with `EIO`.
    pub fail_syncs_from: Option<u64>,
    /// At the sync call with this index the power is cut: the call fails, and so does
    /// every later call, until [`SimStorage::crash`] brings up the surviving disk.
    pub power_cut_at_sync: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct Inode {
    written: Vec<u8>,
    durable: Vec<u8>,
    dirty_pages: BTreeSet<u64>,
    last_write_end: u64,
}

#[derive(Debug, Clone)]
enum DirOp {
    Create(String, u64),
    Remove(String),
    Rename(String, String),
}

#[derive(Debug)]
struct State {
    config: SimConfig,
    inodes: BTreeMap<u64, Inode>,
    next_inode: u64,
    dir: BTreeMap<String, u64>,
    durable_dir: BTreeMap<String, u64>,
    pending_dir_ops: Vec<DirOp>,
    syncs: u64,
    powered_off: bool,
}

/// A simulated disk: written bytes and durable bytes kept apart.
///
/// On [`SimStorage::crash`] each page written since its file's last sync is
/// independently kept or lost, the page holding the end of a file's last write may be
/// torn at a sector boundary, and each directory operation since the last directory
/// sync is independently kept or lost. A file's data sync does not make its directory
/// entry durable: that takes a directory sync, as on a strict POSIX file system.
#[derive(Debug, Clone)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct SimFile {
    state: Arc<Mutex<State>>,
    inode: u64,
}

fn power_cut() -> io::Error {
    io::Error::other("simulated power cut: the disk is gone until restart")
}

impl SimStorage {
    /// An empty simulated disk.
    pub fn new(config: SimConfig) -> Self {
        SimStorage {
            state: Arc::new(Mutex::new(State {
                config,
                inodes: BTreeMap::new(),
                next_inode: 1,
                dir: BTreeMap::new(),
                durable_dir: BTreeMap::new(),
                pending_dir_ops: Vec::new(),
                syncs: 0,
                powered_off: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// How many sync calls (file and directory) have been made so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Whether the power has been cut.
    pub fn is_powered_off(&self) -> bool {
        self.lock().powered_off
    }

    /// Changes the disk's capacity (for example to free space after a full disk).
    pub fn set_capacity(&self, capacity_bytes: Option<u64>) {
        self.lock().config.capacity_bytes = capacity_bytes;
    }

    /// Makes sync calls from index `from` on fail (or none, with `None`).
    pub fn set_fail_syncs_from(&self, from: Option<u64>) {
        self.lock().config.fail_syncs_from = from;
    }

    /// Overwrites durable bytes directly, as bit rot would (for corruption tests).
    pub fn corrupt(&self, name: &str, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.lock();
        let inode = *state.dir.get(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let node = state.inodes.get_mut(&inode).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        for buf in [&mut node.written, &mut node.durable] {
            let end = offset as usize + bytes.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[offset as usize..end].copy_from_slice(bytes);
        }
        Ok(())
    }

    /// Cuts the power now and returns the disk as it comes back: only synced data and
    /// synced directory entries are certain; the rest survives by the seed's choice.
    /// This handle stays powered off.
    pub fn crash(&self) -> SimStorage {
        self.image(true)
    }

    /// The disk as a crash now would leave it, while this handle keeps running: a
    /// crash-consistent backup (the weakest kind an operator can take).
    pub fn backup_image(&self) -> SimStorage {
        self.image(false)
    }

    fn image(&self, power_off: bool) -> SimStorage {
        let mut state = self.lock();
        state.powered_off |= power_off;
        let mut rng = SplitMix64::new(state.config.seed ^ state.syncs.wrapping_mul(0x9e37_79b9));
        let mut dir = state.durable_dir.clone();
        for op in &state.pending_dir_ops {
            if !rng.chance(1, 2) {
                continue;
            }
            match op {
                DirOp::Create(name, inode) => {
                    dir.insert(name.clone(), *inode);
                }
                DirOp::Remove(name) => {
                    dir.remove(name);
                }
                DirOp::Rename(from, to) => {
                    if let Some(inode) = dir.remove(from) {
                        dir.insert(to.clone(), inode);
                    }
                }
            }
        }
        let mut inodes = BTreeMap::new();
        for inode in dir.values() {
            let Some(node) = state.inodes.get(inode) else { continue };
            inodes.insert(*inode, survive(node, &mut rng));
        }
        let mut config = state.config.clone();
        config.power_cut_at_sync = None;
        config.fail_syncs_from = None;
        config.seed = rng.next_u64();
        SimStorage {
            state: Arc::new(Mutex::new(State {
                config,
                inodes,
                next_inode: state.next_inode,
                durable_dir: dir.clone(),
                dir,
                pending_dir_ops: Vec::new(),
                syncs: 0,
                powered_off: false,
            })),
        }
    }
}

/// The bytes of one file after a power cut.
fn survive(node: &Inode, rng: &mut SplitMix64) -> Inode {
    let mut out = node.durable.clone();
    for &page in &node.dirty_pages {
        if !rng.chance(1, 2) {
            continue;
        }
        let start = page * PAGE_BYTES;
        let mut end = ((page + 1) * PAGE_BYTES).min(node.written.len() as u64);
        let holds_last_write_end = node.last_write_end > start && node.last_write_end <= end;
        if holds_last_write_end && rng.chance(1, 2) {
            // A torn write: only some leading sectors of the page reached the platter.
            let sectors = (end - start).div_ceil(SECTOR_BYTES);
            end = start + rng.below(sectors + 1) * SECTOR_BYTES;
            end = end.min(node.written.len() as u64);
        }
        if end <= start {
            continue;
        }
        if (out.len() as u64) < end {
            out.resize(end as usize, 0);
        }
        out[start as usize..end as usize].copy_from_slice(&node.written[start as usize..end as usize]);
    }
    Inode { written: out.clone(), durable: out, dirty_pages: BTreeSet::new(), last_write_end: 0 }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding this lock can only come from a bug in this file; the
    // state is still a plain value, so carrying on is sound.
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl State {
    fn check_power(&self) -> io::Result<()> {
        if self.powered_off {
            Err(power_cut())
        } else {
            Ok(())
        }
    }

    fn sync_point(&mut self) -> io::Result<()> {
        self.check_power()?;
        let index = self.syncs;
        self.syncs += 1;
        if self.config.power_cut_at_sync == Some(index) {
            self.powered_off = true;
            return Err(power_cut());
        }
        if self.config.fail_syncs_from.is_some_and(|from| index >= from) {
            return Err(io::Error::other("simulated EIO on sync"));
        }
        Ok(())
    }

    fn used_bytes(&self) -> u64 {
        self.dir.values().filter_map(|i| self.inodes.get(i)).map(|n| n.written.len() as u64).sum()
    }

    fn grow(&mut self, inode: u64, new_len: u64) -> io::Result<&mut Inode> {
        let current = self.inodes.get(&inode).map_or(0, |n| n.written.len() as u64);
        if new_len > current {
            if let Some(cap) = self.config.capacity_bytes {
                if self.used_bytes() + (new_len - current) > cap {
                    return Err(io::Error::new(io::ErrorKind::StorageFull, "simulated disk full"));
                }
            }
        }
        let node = self.inodes.get_mut(&inode).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        if new_len > current {
            node.written.resize(new_len as usize, 0);
            for page in current / PAGE_BYTES..new_len.div_ceil(PAGE_BYTES) {
                node.dirty_pages.insert(page);
            }
        }
        Ok(node)
    }
}

impl Storage for SimStorage {
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.lock();
        state.check_power()?;
        if state.dir.contains_key(name) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        let inode = state.next_inode;
        state.next_inode += 1;
        state.inodes.insert(inode, Inode::default());
        state.dir.insert(name.to_string(), inode);
        state.pending_dir_ops.push(DirOp::Create(name.to_string(), inode));
        Ok(Arc::new(SimFile { state: self.state.clone(), inode }))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let state = self.lock();
        state.check_power()?;
        let inode = *state.dir.get(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(Arc::new(SimFile { state: self.state.clone(), inode }))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let state = self.lock();
        state.check_power()?;
        Ok(state.dir.keys().cloned().collect())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.lock();
        state.check_power()?;
        state.dir.remove(name).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state.pending_dir_ops.push(DirOp::Remove(name.to_string()));
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.lock();
        state.check_power()?;
        let inode = state.dir.remove(from).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        state.dir.insert(to.to_string(), inode);
        state.pending_dir_ops.push(DirOp::Rename(from.to_string(), to.to_string()));
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.sync_point()?;
        state.durable_dir = state.dir.clone();
        state.pending_dir_ops.clear();
        Ok(())
    }
}

impl StorageFile for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = lock(&self.state);
        state.check_power()?;
        let node = state.inodes.get(&self.inode).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= node.written.len() as u64);
        let end = end.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&node.written[offset as usize..end as usize]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.check_power()?;
        let end = offset + buf.len() as u64;
        let node = state.grow(self.inode, end)?;
        node.written[offset as usize..end as usize].copy_from_slice(buf);
        for page in offset / PAGE_BYTES..end.div_ceil(PAGE_BYTES) {
            node.dirty_pages.insert(page);
        }
        node.last_write_end = end;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.sync_point()?;
        let node =
            state.inodes.get_mut(&self.inode).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        node.durable = node.written.clone();
        node.dirty_pages.clear();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let state = lock(&self.state);
        state.check_power()?;
        Ok(state.inodes.get(&self.inode).map_or(0, |n| n.written.len() as u64))
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.check_power()?;
        state.grow(self.inode, len).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_data_and_entries_can_vanish_synced_ones_cannot() {
        let mut lost_unsynced = false;
        for seed in 0..32 {
            let disk = SimStorage::new(SimConfig { seed, ..SimConfig::default() });
            let a = disk.create("a").expect("create");
            a.write_all_at(&[7u8; 10_000], 0).expect("write");
            a.sync_data().expect("sync");
            disk.sync_dir().expect("dir sync");
            a.write_all_at(&[9u8; 10_000], 10_000).expect("write");
            let b = disk.create("b").expect("create");
            b.write_all_at(b"x", 0).expect("write");
            b.sync_data().expect("sync");
            let after = disk.crash();
            let a = after.open("a").expect("synced entry survives");
            let mut buf = vec![0u8; 10_000];
            a.read_exact_at(&mut buf, 0).expect("synced data survives");
            assert!(buf.iter().all(|&x| x == 7));
            let whole = a.len().expect("len") == 20_000 && {
                let mut tail = vec![0u8; 10_000];
                a.read_exact_at(&mut tail, 10_000).is_ok() && tail.iter().all(|&x| x == 9)
            };
            lost_unsynced |= !whole || after.open("b").is_err();
        }
        assert!(lost_unsynced, "some seed must lose unsynced data or an unsynced entry");
    }

    #[test]
    fn power_cut_and_capacity() {
        let disk = SimStorage::new(SimConfig {
            power_cut_at_sync: Some(1),
            capacity_bytes: Some(100),
            ..Default::default()
        });
        let f = disk.create("f").expect("create");
        assert_eq!(f.write_all_at(&[0; 101], 0).expect_err("full").kind(), io::ErrorKind::StorageFull);
        f.write_all_at(&[1; 50], 0).expect("fits");
        f.sync_data().expect("sync 0 works");
        assert!(f.sync_data().is_err());
        assert!(disk.is_powered_off());
        assert!(f.write_all_at(b"x", 0).is_err());
    }
}
