use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::{Storage, StorageFile};

/// Real files in one directory.
#[derive(Debug, Clone)]
pub struct FileStorage {
    dir: PathBuf,
    latency: Arc<SyncLatency>,
}

/// Replaces the file at `path` with `bytes` so that a crash leaves either the old
/// file or the new one: writes `<path>.tmp`, syncs it, renames it over `path`, and
/// syncs the directory. For small files kept beside the store (a topology, a CRL, a
/// backup).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = File::create(&tmp)?;
        std::io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Upper bounds, in microseconds, of the buckets of [`SyncLatency`] (the last bucket
/// is unbounded).
pub const SYNC_LATENCY_BOUNDS_US: [u64; 12] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000];

/// A histogram of `fdatasync` latencies of one [`FileStorage`] (measured at the I/O
/// edge; the store's logic never reads a clock).
#[derive(Debug, Default)]
pub struct SyncLatency {
    buckets: [AtomicU64; SYNC_LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl SyncLatency {
    fn record(&self, us: u64) {
        let i = SYNC_LATENCY_BOUNDS_US.iter().position(|b| us <= *b).unwrap_or(SYNC_LATENCY_BOUNDS_US.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Count per bucket (not cumulative), the last one past every bound.
    pub fn counts(&self) -> Vec<u64> {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect()
    }

    /// Total of all recorded latencies, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }
}

impl FileStorage {
    /// Uses `dir`, creating it (and its parents) if needed.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        Ok(FileStorage { dir, latency: Arc::default() })
    }

    /// The `fdatasync` latency histogram of every file of this storage.
    pub fn sync_latency(&self) -> Arc<SyncLatency> {
        self.latency.clone()
    }

    /// The directory this storage lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> io::Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad file name {name:?}")));
        }
        Ok(self.dir.join(name))
    }
}

#[derive(Debug)]
struct RealFile(File, Arc<SyncLatency>);

impl Storage for FileStorage {
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(self.path(name)?)?;
        Ok(Arc::new(RealFile(file, self.latency.clone())))
    }

    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).open(self.path(name)?)?;
        Ok(Arc::new(RealFile(file, self.latency.clone())))
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for item in fs::read_dir(&self.dir)? {
            let item = item?;
            if item.file_type()?.is_file() {
                names.push(item.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.path(name)?)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.path(from)?, self.path(to)?)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl StorageFile for RealFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        let start = Instant::now();
        let done = self.0.sync_data();
        self.1.record(start.elapsed().as_micros() as u64);
        done
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        // Real blocks, not a sparse hole: fdatasync on a preallocated file need not
        // update block maps, and ENOSPC surfaces here instead of mid-commit.
        match rustix::fs::fallocate(&self.0, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {
                if self.len()? < len {
                    self.0.set_len(len)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("topology.bin");
        write_file_atomically(&path, b"first").expect("write");
        write_file_atomically(&path, b"second").expect("replace");
        assert_eq!(fs::read(&path).expect("read"), b"second");
        let names: Vec<_> =
            fs::read_dir(dir.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("topology.bin")]);
    }
}
