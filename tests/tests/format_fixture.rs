//! The committed fixture `tests/fixtures/format-v1` is a data directory written by
//! format version 1. The current code must open it and read back every record, and
//! must refuse a copy with one flipped byte. Regenerate (only when the format version
//! changes, into a new directory) with
//! `REPL_WRITE_FIXTURE=1 cargo test -p repl-tests --test format_fixture -- --test-threads=1`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use repl_engine::{AuditEvent, AuditQuery, Error, ManualClock, Session, Store, StoreOptions, User};
use repl_wire::{Collection, StreamId};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("format-v1")
}

fn opts() -> StoreOptions {
    StoreOptions {
        segment_bytes: 8 * 1024,
        clock: Arc::new(ManualClock::new(1_700_000_000_000)),
        incarnation_seed: Some(0x0123_4567_89ab_cdef),
        ..StoreOptions::default()
    }
}

fn user(i: u32) -> User {
    User {
        id: format!("u{i}"),
        login: format!("user{i}"),
        display_name: format!("User Number {i}"),
        email: format!("user{i}@example.org"),
        disabled: i % 7 == 0,
        groups: vec!["staff".into()],
    }
}

fn write_fixture(dir: &Path) {
    let store = Store::open_dir(dir, opts()).expect("create fixture");
    for i in 0..60 {
        store.put_record(&user(i)).expect("user");
    }
    store.put(Collection::UserPolicies, b"p1", b"lock-after=300").expect("policy");
    store
        .put_record(&Session {
            id: "s1".into(),
            user_id: "u1".into(),
            computer: "pc1".into(),
            appliance: "a1".into(),
            created_ms: 1_700_000_000_000,
            expires_ms: u64::MAX,
        })
        .expect("session");
    for i in 0..10 {
        store
            .append_audit(AuditEvent {
                time_ms: 1_700_000_000_000 + i,
                user: format!("user{}", i % 2),
                appliance: "a1".into(),
                action: "login".into(),
                detail: String::new(),
            })
            .expect("audit");
    }
    store.checkpoint().expect("checkpoint");
    for i in 60..80 {
        store.put_record(&user(i)).expect("user after the checkpoint");
    }
    store.delete(Collection::Users, b"u3").expect("delete");
}

fn copy_dir(from: &Path, to: &Path) {
    for e in fs::read_dir(from).expect("list fixture") {
        let e = e.expect("entry");
        fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn current_code_reads_the_v1_fixture() {
    if std::env::var_os("REPL_WRITE_FIXTURE").is_some() {
        let _ = fs::remove_dir_all(fixture_dir());
        write_fixture(&fixture_dir());
    }
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&fixture_dir(), tmp.path());
    let store = Store::open_dir(tmp.path(), opts()).expect("the v1 fixture opens");
    assert_eq!(store.incarnation().0, 0x0123_4567_89ab_cdef);
    assert!(store.recovery().streams[&StreamId::Enterprise].hint_generation.is_some());
    for i in 0..80 {
        let got = store.get_record::<User>(format!("u{i}").as_bytes()).expect("read");
        if i == 3 {
            assert!(got.is_empty(), "u3 was deleted");
        } else {
            assert_eq!(got, vec![user(i)]);
        }
    }
    assert_eq!(
        store.get(Collection::UserPolicies, b"p1").expect("read").value(),
        Some(&b"lock-after=300"[..])
    );
    assert_eq!(store.get_record::<Session>(b"s1").expect("read").len(), 1);
    assert_eq!(store.audit_verify().expect("chain"), 10);
    assert_eq!(
        store.audit_query(&AuditQuery { user: Some("user1".into()), ..Default::default() }).expect("q").len(),
        5
    );
}

#[test]
fn a_corrupted_copy_of_the_fixture_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    copy_dir(&fixture_dir(), tmp.path());
    let mut logs: Vec<PathBuf> = fs::read_dir(tmp.path())
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.to_string_lossy().contains("enterprise-") && p.to_string_lossy().ends_with(".log"))
        .collect();
    logs.sort();
    let active = logs.pop().expect("an enterprise log segment");
    let mut bytes = fs::read(&active).expect("read");
    bytes[64 + 20] ^= 0x40;
    fs::write(&active, &bytes).expect("write");
    match Store::open_dir(tmp.path(), opts()) {
        Err(Error::Corrupt(c)) => assert!(active.ends_with(&c.file), "names {c}"),
        other => panic!("a corrupted fixture must be refused, got {other:?}"),
    }
}
