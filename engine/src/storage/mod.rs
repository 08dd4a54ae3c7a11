//! The narrow storage trait the store does all its I/O through.
//!
//! Two implementations: [`FileStorage`] (real files in one directory, real
//! `fdatasync`, `fallocate` and directory fsync) and [`SimStorage`] (a simulated
//! disk that keeps written bytes apart from durable bytes, so a simulated power cut
//! drops whatever was never synced). The store never touches `std::fs` directly.

mod file;
mod sim;

use std::io;
use std::sync::Arc;

pub use file::{write_file_atomically, FileStorage, SyncLatency, SYNC_LATENCY_BOUNDS_US};
pub use sim::{SimConfig, SimStorage};

/// A flat directory of files.
///
/// Names are plain file names (no separators). Creating, removing and renaming are
/// durable only after [`Storage::sync_dir`] returns.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Creates a new empty file; fails if it exists.
    fn create(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, name: &str) -> io::Result<Arc<dyn StorageFile>>;
    /// The names of every file in the directory, sorted.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Renames a file, replacing any file of the new name.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes every create, remove and rename so far durable.
    fn sync_dir(&self) -> io::Result<()>;
}

/// One open file.
#[allow(clippy::len_without_is_empty)] // a file's length is a fallible query, not a collection size
pub trait StorageFile: Send + Sync + std::fmt::Debug {
    /// Fills `buf` from `offset`; a read past the end is `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the file's data (and the size needed to read it) durable.
    fn sync_data(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Reserves space so the file is at least `len` bytes, zero-filled; a full disk
    /// is reported here, before any record is written into the space.
    fn allocate(&self, len: u64) -> io::Result<()>;
}

/// Whether an I/O error means the device is out of space.
pub(crate) fn is_out_of_space(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::StorageFull || err.raw_os_error() == Some(28)
}
