//! Recovery on real files: checkpoints shorten replay, a torn tail is cut, and bad
//! input (mid-log corruption, an unknown format version, a garbage file, a damaged
//! hint) gives a typed error naming the file and offset, or a safe fallback.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use repl_engine::{Error, Store, StoreOptions};
use repl_wire::{Collection, StreamId};

const SEGMENT: u64 = 64 * 1024;

fn opts() -> StoreOptions {
    StoreOptions { segment_bytes: SEGMENT, ..StoreOptions::default() }
}

fn fill(dir: &Path, from: u32, to: u32) {
    let store = Store::open_dir(dir, opts()).expect("open");
    for i in from..to {
        store
            .put(Collection::Users, format!("k{i:05}").as_bytes(), format!("v{i}").repeat(20).as_bytes())
            .expect("put");
    }
}

fn assert_all(store: &Store, to: u32) {
    for i in 0..to {
        let read = store.get(Collection::Users, format!("k{i:05}").as_bytes()).expect("read");
        assert_eq!(read.value(), Some(format!("v{i}").repeat(20).as_bytes()), "k{i:05}");
    }
}

fn log_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("enterprise-") && n.to_string_lossy().ends_with(".log")
            })
        })
        .collect();
    v.sort();
    v
}

/// Offset just past the last non-zero byte of a file (the end of the written records).
fn data_end(path: &Path) -> u64 {
    let bytes = fs::read(path).expect("read");
    bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p as u64 + 1)
}

fn patch(path: &Path, offset: u64, f: impl FnOnce(&mut [u8])) {
    let mut file = OpenOptions::new().read(true).write(true).open(path).expect("open for patch");
    let mut buf = [0u8; 1];
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.read_exact(&mut buf).expect("read");
    f(&mut buf);
    file.seek(SeekFrom::Start(offset)).expect("seek");
    file.write_all(&buf).expect("write");
}

#[test]
fn reopen_replays_and_checkpoint_shortens_replay() {
    let dir = tempfile::tempdir().expect("tmp");
    fill(dir.path(), 0, 500);
    let store = Store::open_dir(dir.path(), opts()).expect("reopen");
    assert_eq!(store.recovery().streams[&StreamId::Enterprise].entries_replayed, 500);
    assert_all(&store, 500);
    store.checkpoint().expect("checkpoint");
    for i in 500..510 {
        store
            .put(Collection::Users, format!("k{i:05}").as_bytes(), format!("v{i}").repeat(20).as_bytes())
            .expect("put");
    }
    drop(store);
    let store = Store::open_dir(dir.path(), opts()).expect("reopen");
    let rec = &store.recovery().streams[&StreamId::Enterprise];
    assert!(rec.hint_generation.is_some());
    assert_eq!(rec.entries_replayed, 10);
    assert_all(&store, 510);
}

#[test]
fn torn_tail_is_cut_and_writing_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    fill(dir.path(), 0, 100);
    let last = log_files(dir.path()).pop().expect("a log segment");
    let end = data_end(&last);
    // Damage the last record's tail bytes as a torn write would.
    patch(&last, end - 3, |b| b[0] ^= 0xff);
    let store = Store::open_dir(dir.path(), opts()).expect("a torn tail is not an error");
    assert!(store.recovery().streams[&StreamId::Enterprise].torn_bytes_cut > 0);
    assert_all(&store, 99);
    assert!(
        store.get(Collection::Users, b"k00099").expect("read").values.is_empty(),
        "the torn write is gone"
    );
    store.put(Collection::Users, b"k00099", "v99".repeat(20).as_bytes()).expect("writes resume");
    drop(store);
    let store = Store::open_dir(dir.path(), opts()).expect("reopen");
    assert_eq!(store.recovery().streams[&StreamId::Enterprise].torn_bytes_cut, 0);
    assert_all(&store, 100);
}

#[test]
fn mid_log_corruption_is_refused_with_file_and_offset() {
    let dir = tempfile::tempdir().expect("tmp");
    fill(dir.path(), 0, 100);
    let first = log_files(dir.path()).into_iter().next().expect("segment");
    patch(&first, 64 + 30, |b| b[0] ^= 0x10);
    match Store::open_dir(dir.path(), opts()) {
        Err(Error::Corrupt(c)) => {
            assert!(c.file.starts_with("enterprise-"), "names the file: {c}");
            assert_eq!(c.offset, 64, "names the damaged record's offset: {c}");
        }
        other => panic!("expected a corruption error, got {other:?}"),
    }
    // Nothing was cut: undoing the damage gives every record back.
    patch(&first, 64 + 30, |b| b[0] ^= 0x10);
    assert_all(&Store::open_dir(dir.path(), opts()).expect("repaired"), 100);
}

#[test]
fn unknown_format_version_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    fill(dir.path(), 0, 10);
    let seg = log_files(dir.path()).pop().expect("segment");
    patch(&seg, 8, |b| b[0] = 99);
    match Store::open_dir(dir.path(), opts()) {
        Err(Error::UnsupportedFormat { file, version }) => {
            assert!(file.starts_with("enterprise-"));
            assert_eq!(version, 99);
        }
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
}

#[test]
fn garbage_file_in_data_dir_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    fill(dir.path(), 0, 3);
    fs::write(dir.path().join("notes.txt"), b"hello").expect("write");
    match Store::open_dir(dir.path(), opts()) {
        Err(Error::UnknownFile { file }) => assert_eq!(file, "notes.txt"),
        other => panic!("expected UnknownFile, got {other:?}"),
    }
}

#[test]
fn damaged_hint_falls_back_to_replay() {
    let dir = tempfile::tempdir().expect("tmp");
    fill(dir.path(), 0, 50);
    Store::open_dir(dir.path(), opts()).expect("open").checkpoint().expect("checkpoint");
    let hint = fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .find(|p| p.to_string_lossy().contains("enterprise-") && p.to_string_lossy().ends_with(".hint"))
        .expect("a hint file");
    let len = fs::metadata(&hint).expect("stat").len();
    patch(&hint, len / 2, |b| b[0] ^= 0xff);
    let store = Store::open_dir(dir.path(), opts()).expect("a bad hint is skipped");
    assert_eq!(store.recovery().streams[&StreamId::Enterprise].hint_generation, None);
    assert_eq!(store.recovery().streams[&StreamId::Enterprise].entries_replayed, 50);
    assert_all(&store, 50);
}
