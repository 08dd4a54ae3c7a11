//! Backups: an online snapshot of an appliance's streams in one checksummed file, and
//! the offline restore of a stopped appliance from it under a new incarnation.
//!
//! File layout: the magic `REPLBKUP`, a format version (u16 LE), the body length (u64
//! LE), the body (postcard: [`BackupBody`]), and blake3 over everything before it.
//! A file that is truncated, damaged, of another format or of another appliance is
//! refused before anything on the appliance changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use repl_engine::runtime::RemoteStore;
use repl_engine::{FileStorage, Store, StoreOptions};
use repl_wire::{AdminCall, ClientCall, ClientReply, Entry, StreamId, VersionVector};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"REPLBKUP";
const FORMAT: u16 = 1;
const HEADER: usize = 8 + 2 + 8;
/// The peer name snapshot staging uses for a restore.
const SOURCE: &str = "backup";

/// A backup that cannot be used, or a restore that could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// The file could not be read or written.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a backup file.
    #[error("{0}: not a repl backup (bad magic)")]
    BadMagic(PathBuf),
    /// A format this build does not read.
    #[error("{file}: backup format {version}, this build reads {FORMAT}")]
    Format {
        /// The file.
        file: PathBuf,
        /// Its format.
        version: u16,
    },
    /// Shorter than its header says.
    #[error("{file}: truncated: {actual} bytes, the header says {expected}")]
    Truncated {
        /// The file.
        file: PathBuf,
        /// Bytes the file should have.
        expected: u64,
        /// Bytes it has.
        actual: u64,
    },
    /// The checksum does not match: the file is damaged.
    #[error("{0}: checksum mismatch: the backup is damaged")]
    Checksum(PathBuf),
    /// The body does not decode.
    #[error("{file}: malformed: {reason}")]
    Malformed {
        /// The file.
        file: PathBuf,
        /// Why.
        reason: String,
    },
    /// The backup is of another appliance.
    #[error("{file}: a backup of {found}, not of {expected}")]
    WrongAppliance {
        /// The file.
        file: PathBuf,
        /// The appliance it was taken of.
        found: String,
        /// The appliance being restored.
        expected: String,
    },
    /// The appliance did not answer or refused.
    #[error("backup: {0}")]
    Remote(String),
    /// The appliance is running on this data directory.
    #[error("{0}: the appliance is running on this data directory; stop it first (SIGTERM)")]
    Running(PathBuf),
    /// The store refused the restore.
    #[error("restore into {dir}: {source}")]
    Store {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: repl_engine::Error,
    },
}

/// One stream of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamImage {
    /// The stream's code.
    pub stream: u8,
    /// The vector the appliance held when the stream's first chunk was read: every
    /// entry at or below it is in the image (newer ones may be too).
    pub at: VersionVector,
    /// Every version held, in key order.
    pub entries: Vec<Entry>,
}

/// What a backup file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupBody {
    /// The appliance it was taken of.
    pub appliance: String,
    /// When (wall-clock ms).
    pub taken_ms: u64,
    /// Each stream.
    pub streams: Vec<StreamImage>,
}

/// Takes an online backup through `client` (one appliance, admin certificate).
pub async fn take(client: &RemoteStore, appliance: &str, taken_ms: u64) -> Result<BackupBody, BackupError> {
    let mut streams = Vec::new();
    for stream in StreamId::ALL {
        let mut image = StreamImage { stream: stream.code(), at: VersionVector::new(), entries: Vec::new() };
        let mut resume = Vec::new();
        let mut first = true;
        loop {
            let call = ClientCall::Admin(AdminCall::BackupChunk { stream, resume: resume.clone() });
            match client.call(call).await.map_err(|e| BackupError::Remote(e.to_string()))? {
                (_, ClientReply::Chunk { at, mut entries, resume: next }) => {
                    if first {
                        image.at = at;
                        first = false;
                    }
                    image.entries.append(&mut entries);
                    if next.is_empty() {
                        break;
                    }
                    resume = next;
                }
                (_, other) => return Err(BackupError::Remote(format!("unexpected answer {other:?}"))),
            }
        }
        streams.push(image);
    }
    Ok(BackupBody { appliance: appliance.to_string(), taken_ms, streams })
}

/// Encodes a backup file.
pub fn encode(body: &BackupBody) -> Result<Vec<u8>, BackupError> {
    let payload = postcard::to_allocvec(body)
        .map_err(|e| BackupError::Malformed { file: PathBuf::new(), reason: e.to_string() })?;
    let mut out = Vec::with_capacity(HEADER + payload.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    Ok(out)
}

/// Decodes and checks a backup file's bytes.
pub fn decode(file: &Path, bytes: &[u8]) -> Result<BackupBody, BackupError> {
    let file = file.to_path_buf();
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(BackupError::BadMagic(file));
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT {
        return Err(BackupError::Format { file, version });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[10..HEADER]);
    let len = u64::from_le_bytes(len);
    let expected = (HEADER as u64).saturating_add(len).saturating_add(32);
    if bytes.len() as u64 != expected {
        return Err(BackupError::Truncated { file, expected, actual: bytes.len() as u64 });
    }
    let body_end = HEADER + len as usize;
    if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..] {
        return Err(BackupError::Checksum(file));
    }
    postcard::from_bytes(&bytes[HEADER..body_end])
        .map_err(|e| BackupError::Malformed { file, reason: e.to_string() })
}

/// Reads and checks a backup file.
pub fn read(file: &Path) -> Result<BackupBody, BackupError> {
    let bytes = std::fs::read(file).map_err(|source| BackupError::Io { file: file.into(), source })?;
    decode(file, &bytes)
}

/// Writes a backup file durably and atomically.
pub fn write(file: &Path, body: &BackupBody) -> Result<u64, BackupError> {
    let bytes = encode(body)?;
    repl_engine::write_file_atomically(file, &bytes)
        .map_err(|source| BackupError::Io { file: file.into(), source })?;
    Ok(bytes.len() as u64)
}

/// The lock a running `repld` holds on its data directory.
pub fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, BackupError> {
    let path = data_dir.join("repld.lock");
    let io = |source| BackupError::Io { file: path.clone(), source };
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let file =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(_) => Err(BackupError::Running(data_dir.to_path_buf())),
    }
}

/// Restores the stopped appliance whose data directory is `data_dir` from `body`: a
/// new store (a new incarnation) is built beside the old one from the backup's
/// streams, then replaces it. Writes of the old incarnation after the backup come
/// back from the peers that hold them. Returns the new store's incarnation.
pub fn restore(data_dir: &Path, body: &BackupBody) -> Result<repl_wire::Incarnation, BackupError> {
    let _lock = lock_data_dir(data_dir)?;
    let live = data_dir.join("store");
    let fresh = data_dir.join("store.restore");
    let old = data_dir.join("store.replaced");
    let io = |file: &Path| {
        let file = file.to_path_buf();
        move |source| BackupError::Io { file, source }
    };
    for dir in [&fresh, &old] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io(dir))?;
        }
    }
    let store_err = |source| BackupError::Store { dir: fresh.clone(), source };
    let storage = FileStorage::new(&fresh).map_err(io(&fresh))?;
    let store = Store::open(Arc::new(storage), StoreOptions::default()).map_err(store_err)?;
    for image in &body.streams {
        let Some(stream) = StreamId::from_code(image.stream) else {
            return Err(BackupError::Malformed {
                file: PathBuf::new(),
                reason: format!("stream code {}", image.stream),
            });
        };
        store.begin_snapshot(stream, SOURCE, None).map_err(store_err)?;
        for chunk in image.entries.chunks(1024) {
            store.stage_snapshot(stream, SOURCE, chunk.to_vec()).map_err(store_err)?;
        }
        store.finish_snapshot(stream, SOURCE, &image.at).map_err(store_err)?;
    }
    store.checkpoint().map_err(store_err)?;
    let incarnation = store.incarnation();
    drop(store);
    if live.exists() {
        std::fs::rename(&live, &old).map_err(io(&live))?;
    }
    std::fs::rename(&fresh, &live).map_err(io(&fresh))?;
    std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(io(data_dir))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    Ok(incarnation)
}
