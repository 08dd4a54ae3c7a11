//! Writes every kind of record durably in a child process, kills the child with
//! SIGKILL in the middle of its writes, reopens the store and shows that every
//! acknowledged record came back. Exits 0 only if nothing acknowledged was lost.
//!
//! Run: `cargo run --release -p repl-engine --example crash_demo [DATA_DIR]`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use repl_engine::{
    AuditEvent, AuditQuery, ComputerPolicy, Session, SsoEnrollment, Store, StoreOptions, User, UserPolicy,
};

const RECORDS: u64 = 2_000;

fn user(i: u64) -> User {
    User {
        id: format!("u{i:05}"),
        login: format!("user{i}"),
        display_name: format!("User {i}"),
        email: format!("user{i}@example.org"),
        disabled: false,
        groups: vec!["staff".into()],
    }
}

/// Writes record `i` of every kind; each put is acknowledged only once durable.
fn write_all_kinds(store: &Store, i: u64) -> repl_engine::Result<()> {
    store.put_record(&user(i))?;
    if i % 10 == 0 {
        store.put_record(&UserPolicy {
            id: format!("up{i}"),
            name: format!("policy {i}"),
            applies_to: vec![format!("u{i:05}")],
            settings: vec![("lock-after".into(), "300".into())],
            priority: 1,
        })?;
        store.put_record(&ComputerPolicy {
            id: format!("cp{i}"),
            name: format!("computers {i}"),
            applies_to: vec!["ou=lab".into()],
            settings: vec![("usb".into(), "deny".into())],
        })?;
    }
    store.put_record(&SsoEnrollment {
        user_id: format!("u{i:05}"),
        application: "mail".into(),
        login: format!("user{i}"),
        sealed_secret: vec![0x5a; 48],
        updated_ms: 1_700_000_000_000 + i,
    })?;
    store.put_record(&Session {
        id: format!("s{i}"),
        user_id: format!("u{i:05}"),
        computer: format!("pc{}", i % 40),
        appliance: "demo".into(),
        created_ms: 1_700_000_000_000,
        expires_ms: u64::MAX,
    })?;
    store.append_audit(AuditEvent {
        time_ms: 1_700_000_000_000 + i,
        user: format!("u{i:05}"),
        appliance: "demo".into(),
        action: "login".into(),
        detail: format!("session s{i}"),
    })?;
    Ok(())
}

fn child(dir: &str) {
    let store = Store::open_dir(dir, StoreOptions::default()).expect("child opens the store");
    let mut out = std::io::stdout();
    for i in 0.. {
        write_all_kinds(&store, i).expect("durable write");
        writeln!(out, "{i}").and_then(|_| out.flush()).expect("report the ack");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(args.get(2).expect("--child DIR"));
        return;
    }
    let tmp;
    let dir = match args.get(1) {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("repl-crash-demo-{}", std::process::id()));
            tmp.display().to_string()
        }
    };
    println!("repl crash demo: data directory {dir}");
    let mut child = Command::new(&args[0])
        .args(["--child", &dir])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the writer process");
    let mut acked = None;
    let started = Instant::now();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let i: u64 = line.expect("ack line").trim().parse().expect("a record number");
        acked = Some(i);
        if i + 1 == RECORDS {
            break;
        }
    }
    child.kill().expect("SIGKILL the writer");
    child.wait().expect("reap the writer");
    let acked = acked.expect("the writer acknowledged something") + 1;
    println!(
        "writer acknowledged {acked} rounds of records in {:.2?}, then was killed with SIGKILL mid-write",
        started.elapsed()
    );

    let store = Store::open_dir(&dir, StoreOptions::default()).expect("reopen after the crash");
    for (stream, r) in &store.recovery().streams {
        println!(
            "recovered {stream:<10}: {} entries replayed, {} torn bytes cut",
            r.entries_replayed, r.torn_bytes_cut
        );
    }
    let mut missing = 0;
    for i in 0..acked {
        let found = store
            .get_record::<User>(format!("u{i:05}").as_bytes())
            .map(|v| v == vec![user(i)])
            .unwrap_or(false)
            && store.get_record::<Session>(format!("s{i}").as_bytes()).map(|v| v.len() == 1).unwrap_or(false)
            && store
                .get_record::<SsoEnrollment>(format!("u{i:05}\u{1f}mail").as_bytes())
                .map(|v| v.len() == 1)
                .unwrap_or(false);
        if !found {
            missing += 1;
            println!("MISSING round {i}");
        }
    }
    let audit = store.audit_query(&AuditQuery::default()).expect("audit query").len() as u64;
    let chain = store.audit_verify().expect("audit chain verifies");
    println!("users, sessions, enrollments: {} of {acked} acknowledged rounds present", acked - missing);
    println!(
        "audit records: {audit} present (at least {acked} acknowledged), hash chain verified over {chain}"
    );
    let sample = store.get_record::<User>(b"u00000").expect("read");
    println!("sample record u00000: {sample:?}");
    if args.get(1).is_none() {
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
    if missing > 0 || audit < acked {
        println!("FAILED: acknowledged records were lost");
        std::process::exit(1);
    }
    println!("OK: every acknowledged record survived the crash");
}
