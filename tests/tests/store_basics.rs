//! The store's API contract: reads, writes, versions, conflicts, sessions, audit and
//! the replication hooks, on the simulated disk.

use repl_engine::{
    AuditEvent, AuditQuery, AuditRecord, ConflictPolicy, Durability, Error, ManualClock, Session, SimConfig,
    SimStorage, Store, User, WriteBatch,
};
use repl_tests::{options, sim_store};
use repl_wire::{Collection, Dot, Entry, Hlc, Incarnation, Op, StreamId, VersionVector};
use std::sync::Arc;

fn remote(origin: u64, seq: u64, wall: u64, key: &[u8], value: &[u8], context: VersionVector) -> Entry {
    Entry {
        dot: Dot { origin: Incarnation(origin), seq },
        hlc: Hlc { wall_ms: wall, logical: 0 },
        collection: Collection::Users,
        key: key.to_vec(),
        context,
        op: Op::Put { value: value.to_vec(), expires_at_ms: None },
    }
}

#[test]
fn put_get_delete_and_compare_and_set() {
    let (_disk, store, _clock) = sim_store(1);
    assert!(store.get(Collection::Users, b"bob").expect("read").values.is_empty());
    let d1 = store.put(Collection::Users, b"bob", b"v1").expect("put");
    let read = store.get(Collection::Users, b"bob").expect("read");
    assert_eq!(read.value(), Some(&b"v1"[..]));
    assert!(read.context.contains(d1));
    store.compare_and_put(Collection::Users, b"bob", b"v2", &read.context).expect("current context wins");
    let err =
        store.compare_and_put(Collection::Users, b"bob", b"v3", &read.context).expect_err("stale context");
    assert!(matches!(err, Error::ContextMismatch));
    assert_eq!(store.get(Collection::Users, b"bob").expect("read").value(), Some(&b"v2"[..]));
    store.delete(Collection::Users, b"bob").expect("delete");
    let gone = store.get(Collection::Users, b"bob").expect("read");
    assert!(gone.values.is_empty());
    assert!(!gone.context.is_empty(), "a tombstone keeps its context");
    assert!(store.scan_keys(Collection::Users, b"", 10).is_empty());
}

#[test]
fn sequences_are_per_stream_and_contiguous() {
    let (_disk, store, _clock) = sim_store(2);
    let me = store.incarnation();
    store.put(Collection::Users, b"a", b"1").expect("put");
    store.put(Collection::UserPolicies, b"p", b"1").expect("put");
    let s = store.write(
        std::mem::take(WriteBatch::new().put_expiring(Collection::Sessions, b"s", b"x", 9_999_999)),
        Durability::Durable,
    );
    assert_eq!(s.expect("session")[0], Dot { origin: me, seq: 1 });
    assert_eq!(store.vector(StreamId::Enterprise).get(me), 2);
    assert_eq!(store.vector(StreamId::Sessions).get(me), 1);
    assert_eq!(store.vector(StreamId::Audit).get(me), 0);
    let mixed = std::mem::take(WriteBatch::new().put(Collection::Users, b"x", b"1").put(
        Collection::Sessions,
        b"y",
        b"1",
    ));
    assert!(matches!(store.write(mixed, Durability::Durable), Err(Error::Request(_))));
}

#[test]
fn concurrent_remote_write_lww_keeps_a_conflict_record() {
    let (_disk, store, _clock) = sim_store(3);
    let local = store.put(Collection::Users, b"carol", b"local").expect("put");
    // A peer wrote the same key without having seen ours, later in HLC time.
    let theirs = remote(42, 1, 5_000_000, b"carol", b"remote", VersionVector::new());
    store.apply_remote(StreamId::Enterprise, vec![theirs.clone()]).expect("apply").wait().expect("durable");
    let read = store.get(Collection::Users, b"carol").expect("read");
    assert_eq!(read.value(), Some(&b"remote"[..]));
    assert!(read.context.contains(local) && read.context.contains(theirs.dot));
    let (conflicts, dropped) = store.conflicts(Collection::Users);
    assert_eq!(dropped, 0);
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].loser, local);
    assert_eq!(conflicts[0].value.as_deref(), Some(&b"local"[..]));
    assert_eq!(conflicts[0].winner, theirs.dot);
}

#[test]
fn keep_siblings_until_resolved() {
    let disk = SimStorage::new(SimConfig::default());
    let clock = Arc::new(ManualClock::new(1_000));
    let mut opts = options(&clock, 16 * 1024);
    opts.policies.insert(Collection::SsoEnrollments, ConflictPolicy::KeepSiblings);
    let store = Store::open(Arc::new(disk), opts).expect("open");
    store.put(Collection::SsoEnrollments, b"e", b"mine").expect("put");
    let mut theirs = remote(7, 1, 1, b"e", b"theirs", VersionVector::new());
    theirs.collection = Collection::SsoEnrollments;
    store.apply_remote(StreamId::Enterprise, vec![theirs]).expect("apply").wait().expect("durable");
    let read = store.get(Collection::SsoEnrollments, b"e").expect("read");
    let mut values: Vec<_> = read.values.iter().map(|v| v.bytes.clone()).collect();
    values.sort();
    assert_eq!(values, vec![b"mine".to_vec(), b"theirs".to_vec()]);
    assert!(store.conflicts(Collection::SsoEnrollments).0.is_empty());
    store.put_with_context(Collection::SsoEnrollments, b"e", b"merged", &read.context).expect("resolve");
    assert_eq!(store.get(Collection::SsoEnrollments, b"e").expect("read").value(), Some(&b"merged"[..]));
}

#[test]
fn remote_entries_apply_in_order_only() {
    let (_disk, store, _clock) = sim_store(4);
    let e1 = remote(9, 1, 10, b"k1", b"a", VersionVector::new());
    let e3 = remote(9, 3, 12, b"k3", b"c", VersionVector::new());
    let gap = store.apply_remote(StreamId::Enterprise, vec![e3]).expect_err("gap");
    assert!(matches!(gap, Error::Gap { expected: 1, got: 3, .. }));
    store.apply_remote(StreamId::Enterprise, vec![e1.clone()]).expect("in order").wait().expect("durable");
    // A duplicate (arrived by another path) is skipped, not an error.
    let dup = store.apply_remote(StreamId::Enterprise, vec![e1]).expect("duplicate is fine");
    assert!(dup.dots().is_empty());
    assert_eq!(store.vector(StreamId::Enterprise).get(Incarnation(9)), 1);
}

#[test]
fn a_snapshot_drops_what_the_peer_saw_and_no_longer_holds_and_keeps_the_rest() {
    let (_disk, store, _clock) = sim_store(5);
    let users = |k: &[u8]| store.get(Collection::Users, k).expect("read").value().map(<[u8]>::to_vec);
    // From the peer (origin 9): "gone" (which the peer later deleted and collected),
    // "same" (still there) and "late".
    let entries = vec![
        remote(9, 1, 10, b"gone", b"a", VersionVector::new()),
        remote(9, 2, 11, b"same", b"b", VersionVector::new()),
        remote(9, 3, 12, b"late", b"c", VersionVector::new()),
    ];
    store.apply_remote(StreamId::Enterprise, entries.clone()).expect("apply").wait().expect("durable");
    // A local write the peer has not seen.
    store.put(Collection::Users, b"mine", b"m").expect("put");
    // The peer's snapshot at {9: 2} holds "same" only; "late" (9:3) is above what it
    // had seen when it took it.
    let at: VersionVector = [Dot { origin: Incarnation(9), seq: 2 }].into_iter().collect();
    store.begin_snapshot(StreamId::Enterprise, "peer", None).expect("begin");
    store.stage_snapshot(StreamId::Enterprise, "peer", entries[1..2].to_vec()).expect("stage");
    store.finish_snapshot(StreamId::Enterprise, "peer", &at).expect("finish");
    assert_eq!(users(b"gone"), None, "the peer saw it and no longer holds it");
    assert_eq!(users(b"same"), Some(b"b".to_vec()));
    assert_eq!(users(b"late"), Some(b"c".to_vec()), "the peer had not seen it");
    assert_eq!(users(b"mine"), Some(b"m".to_vec()), "the peer had not seen it");
}

#[test]
fn entries_since_ships_in_order_and_floors_rise_after_compaction() {
    let (_disk, store, _clock) = sim_store(5);
    let me = store.incarnation();
    for i in 0..400u32 {
        store.put(Collection::Users, format!("user{:03}", i % 50).as_bytes(), &[7u8; 100]).expect("put");
    }
    let all = store.entries_since(StreamId::Enterprise, &VersionVector::new(), 10_000).expect("ship");
    assert_eq!(all.len(), 400);
    assert!(all.windows(2).all(|w| w[0].dot.seq + 1 == w[1].dot.seq));
    let from: VersionVector = [Dot { origin: me, seq: 390 }].into_iter().collect();
    let tail = store.entries_since(StreamId::Enterprise, &from, 5).expect("ship tail");
    assert_eq!(tail.iter().map(|e| e.dot.seq).collect::<Vec<_>>(), vec![391, 392, 393, 394, 395]);

    let horizon = store.vector(StreamId::Enterprise);
    let report = store.compact(StreamId::Enterprise, &horizon).expect("compact");
    assert!(report.segments_compacted > 0);
    let floor = store.log_floors(StreamId::Enterprise)[&me];
    assert!(floor > 1, "the floor rose to {floor}");
    assert!(matches!(
        store.entries_since(StreamId::Enterprise, &VersionVector::new(), 10),
        Err(Error::NotCovered { .. })
    ));
    // Every live value survived compaction.
    for i in 0..50u32 {
        let read = store.get(Collection::Users, format!("user{i:03}").as_bytes()).expect("read");
        assert_eq!(read.value(), Some(&[7u8; 100][..]));
    }
}

#[test]
fn remote_batches_larger_than_a_frame_are_split_and_shipped_back_in_part() {
    // Segments of 16 KiB: 300 remote entries of 200 B from two origins need several
    // frames; each frame then holds both origins interleaved.
    let (_disk, store, _clock) = sim_store(12);
    let batch: Vec<Entry> = (1..=150u64)
        .flat_map(|seq| {
            [7u64, 8].map(|origin| {
                let key = format!("k{origin}-{seq:03}");
                remote(origin, seq, 1_000 + seq, key.as_bytes(), &[origin as u8; 200], VersionVector::new())
            })
        })
        .collect();
    let pending = store.apply_remote(StreamId::Enterprise, batch.clone()).expect("split, not refused");
    assert_eq!(pending.dots().len(), 300);
    pending.wait().expect("durable");
    assert_eq!(store.vector(StreamId::Enterprise).get(Incarnation(7)), 150);
    assert_eq!(store.vector(StreamId::Enterprise).get(Incarnation(8)), 150);
    let read = store.get(Collection::Users, b"k8-150").expect("read");
    assert_eq!(read.value(), Some(&[8u8; 200][..]));

    // Shipping from the middle of frames, a few at a time, gives each entry once, in
    // each origin's order, equal to what was applied.
    let mut from: VersionVector = [Dot { origin: Incarnation(7), seq: 40 }].into_iter().collect();
    let mut shipped = Vec::new();
    loop {
        let part = store.entries_since(StreamId::Enterprise, &from, 7).expect("ship");
        if part.is_empty() {
            break;
        }
        assert!(part.len() <= 7);
        for e in &part {
            assert_eq!(e.dot.seq, from.get(e.dot.origin) + 1, "{} out of order", e.dot);
            from.advance(e.dot);
        }
        shipped.extend(part);
    }
    let expected: Vec<&Entry> =
        batch.iter().filter(|e| e.dot.origin == Incarnation(8) || e.dot.seq > 40).collect();
    assert_eq!(shipped.len(), expected.len());
    for e in &shipped {
        assert!(expected.contains(&e), "shipped {} that was not applied as is", e.dot);
    }
}

#[test]
fn sessions_expire_without_tombstones() {
    let (_disk, store, clock) = sim_store(6);
    let session = Session {
        id: "s1".into(),
        user_id: "u1".into(),
        computer: "pc-17".into(),
        appliance: "a1".into(),
        created_ms: 1_000_000,
        expires_ms: 1_000_500,
    };
    store.put_record(&session).expect("put session");
    assert_eq!(store.get_record::<Session>(b"s1").expect("read"), vec![session]);
    clock.advance(501);
    assert!(store.get_record::<Session>(b"s1").expect("read").is_empty());
    assert_eq!(store.expire(), 1);
}

#[test]
fn sessions_from_a_hint_checkpoint_and_from_peers_still_expire() {
    // The sweep skips a stream until its earliest expiry is due; that bound must come
    // back from a hint checkpoint, and follow remote entries and later, earlier expiries.
    let disk = SimStorage::new(SimConfig::default());
    let clock = Arc::new(ManualClock::new(1_000_000));
    let store = Store::open(Arc::new(disk.clone()), options(&clock, 16 * 1024)).expect("open");
    let session = |id: &str, expires_ms: u64| Session {
        id: id.into(),
        user_id: "u1".into(),
        computer: "pc-17".into(),
        appliance: "a1".into(),
        created_ms: 1_000_000,
        expires_ms,
    };
    store.put_record(&session("late", 1_009_000)).expect("put");
    store.put_record(&session("early", 1_002_000)).expect("put");
    store.checkpoint().expect("hint");
    drop(store);
    let store = Store::open(Arc::new(disk.crash()), options(&clock, 16 * 1024)).expect("reopen");
    assert_eq!(store.expire(), 0, "nothing is due yet");
    clock.advance(2_500);
    assert_eq!(store.expire(), 1, "the early session expires after a reopen from the hint");
    let remote = Entry {
        dot: Dot { origin: Incarnation(99), seq: 1 },
        hlc: Hlc { wall_ms: 1_002_500, logical: 0 },
        collection: Collection::Sessions,
        key: b"remote".to_vec(),
        context: VersionVector::new(),
        op: Op::Put { value: b"x".to_vec(), expires_at_ms: Some(1_004_000) },
    };
    store.apply_remote(StreamId::Sessions, vec![remote]).expect("apply").wait().expect("durable");
    clock.advance(2_000);
    assert_eq!(store.expire(), 1, "a remote session expires before the late local one");
    clock.advance(10_000);
    assert_eq!(store.expire(), 1);
    assert!(store.scan_keys(Collection::Sessions, b"", 10).is_empty());
}

#[test]
fn typed_records_round_trip() {
    let (_disk, store, _clock) = sim_store(7);
    let user = User {
        id: "u-1".into(),
        login: "alice".into(),
        display_name: "Alice".into(),
        email: "alice@example.org".into(),
        disabled: false,
        groups: vec!["staff".into()],
    };
    store.put_record(&user).expect("put");
    assert_eq!(store.get_record::<User>(b"u-1").expect("get"), vec![user]);
}

#[test]
fn audit_chain_indexes_and_tamper_evidence() {
    let (disk, store, _clock) = sim_store(8);
    for i in 0..30u64 {
        store
            .append_audit(AuditEvent {
                time_ms: 1_000 + i,
                user: format!("user{}", i % 3),
                appliance: if i % 2 == 0 { "a1".into() } else { "a2".into() },
                action: "login".into(),
                detail: format!("event {i}"),
            })
            .expect("append");
    }
    assert_eq!(store.audit_verify().expect("chain verifies"), 30);
    let by_user =
        store.audit_query(&AuditQuery { user: Some("user1".into()), ..Default::default() }).expect("q");
    assert_eq!(by_user.len(), 10);
    assert!(by_user.iter().all(|r| r.record.event.user == "user1"));
    let window = AuditQuery {
        from_ms: Some(1_010),
        until_ms: Some(1_020),
        appliance: Some("a1".into()),
        ..Default::default()
    };
    let hits = store.audit_query(&window).expect("q");
    assert_eq!(
        hits.iter().map(|r| r.record.event.time_ms).collect::<Vec<_>>(),
        vec![1010, 1012, 1014, 1016, 1018]
    );
    let both = AuditQuery { user: Some("user0".into()), appliance: Some("a2".into()), ..Default::default() };
    assert!(store
        .audit_query(&both)
        .expect("q")
        .iter()
        .all(|r| r.record.event.user == "user0" && r.record.event.appliance == "a2"));

    // A peer (or a disk editor) rewrites one record but keeps every checksum valid:
    // the store that receives the stream sees the chain break at the next record.
    let victim = hits[0].dot;
    let forged: Vec<Entry> = store
        .entries_since(StreamId::Audit, &VersionVector::new(), 1_000)
        .expect("ship the audit stream")
        .into_iter()
        .map(|mut e| {
            if e.dot == victim {
                let Op::Put { value, .. } = &e.op else { panic!("audit entries are puts") };
                let mut record: AuditRecord = postcard::from_bytes(value).expect("decodes");
                record.event.detail = "nothing happened".into();
                e.op =
                    Op::Put { value: postcard::to_allocvec(&record).expect("encodes"), expires_at_ms: None };
            }
            e
        })
        .collect();
    let (_disk2, receiver, _clock2) = sim_store(80);
    receiver.apply_remote(StreamId::Audit, forged).expect("apply").wait().expect("durable");
    match receiver.audit_verify() {
        Err(Error::AuditChainBroken { dot, .. }) => assert_eq!(dot.seq, victim.seq + 1),
        other => panic!("expected a broken chain, got {other:?}"),
    }
    drop(disk);
}

#[test]
fn an_audit_snapshot_that_brings_back_held_records_leaves_the_chain_whole() {
    // A holder repairs its audit stream from the other holder: the snapshot carries
    // some of the holder's own records again (the other holder had the first two when
    // it took it). After a restart (the chain head comes from the checkpoint the
    // repair wrote), its next record must still link to its last.
    let (disk, store, clock) = sim_store(81);
    let event = |i: u64| AuditEvent {
        time_ms: 2_000 + i,
        user: "user".into(),
        appliance: "a1".into(),
        action: "login".into(),
        detail: format!("event {i}"),
    };
    for i in 0..3 {
        store.append_audit(event(i)).expect("append");
    }
    let held = store.entries_since(StreamId::Audit, &VersionVector::new(), 100).expect("own records");
    assert_eq!(held.len(), 3);
    let at = store.vector(StreamId::Audit);
    store.begin_snapshot(StreamId::Audit, "a2", None).expect("begin");
    store.stage_snapshot(StreamId::Audit, "a2", held[..2].to_vec()).expect("stage");
    store.finish_snapshot(StreamId::Audit, "a2", &at).expect("finish");
    drop(store);
    let store = Store::open(Arc::new(disk.crash()), options(&clock, 16 * 1024)).expect("reopen");
    let next = store.append_audit(event(3)).expect("append after the repair");
    assert_eq!(next.seq, 4);
    assert_eq!(store.audit_verify().expect("the chain links across the repair"), 4);
    assert_eq!(store.audit_query(&AuditQuery::default()).expect("query").len(), 4, "no record indexed twice");
}

#[test]
fn buffered_writes_are_not_shipped_before_they_are_durable() {
    let (_disk, store, _clock) = sim_store(9);
    let dots = store
        .write(std::mem::take(WriteBatch::new().put(Collection::Users, b"fast", b"1")), Durability::Buffered)
        .expect("buffered write is acknowledged at once");
    // Visible to reads on this appliance, but not durable, so not shipped.
    assert_eq!(store.get(Collection::Users, b"fast").expect("read").value(), Some(&b"1"[..]));
    assert!(store.vector(StreamId::Enterprise).is_empty());
    assert!(store.entries_since(StreamId::Enterprise, &VersionVector::new(), 10).expect("ship").is_empty());
    store.flush().expect("flush");
    let shipped = store.entries_since(StreamId::Enterprise, &VersionVector::new(), 10).expect("ship");
    assert_eq!(shipped.iter().map(|e| e.dot).collect::<Vec<_>>(), dots);
}

#[test]
fn tombstones_are_collected_only_when_every_replica_has_them() {
    let (_disk, store, _clock) = sim_store(10);
    store.put(Collection::Users, b"gone", b"v").expect("put");
    let del = store.delete(Collection::Users, b"gone").expect("delete");
    let local = store.vector(StreamId::Enterprise);
    let behind: VersionVector = [Dot { origin: del.origin, seq: del.seq - 1 }].into_iter().collect();
    // A replica that has not seen the delete keeps the tombstone alive.
    assert_eq!(store.collect_tombstones(StreamId::Enterprise, &[local.clone(), behind]), 0);
    // A replica that has seen something this one has not: a concurrent write may be in flight.
    let mut ahead = local.clone();
    ahead.advance(Dot { origin: Incarnation(77), seq: 1 });
    assert_eq!(store.collect_tombstones(StreamId::Enterprise, &[local.clone(), ahead]), 0);
    assert!(!store.get(Collection::Users, b"gone").expect("read").context.is_empty());
    assert_eq!(store.collect_tombstones(StreamId::Enterprise, &[local.clone(), local]), 1);
    assert!(store.get(Collection::Users, b"gone").expect("read").context.is_empty());
}

#[test]
fn far_future_remote_clock_raises_an_alarm_but_applies() {
    let (_disk, store, clock) = sim_store(11);
    let now = repl_engine::Clock::now_ms(&*clock);
    let e =
        remote(5, 1, now + repl_wire::HLC_DRIFT_MAX_MS + 10_000, b"clock", b"skewed", VersionVector::new());
    store.apply_remote(StreamId::Enterprise, vec![e]).expect("apply").wait().expect("durable");
    assert_eq!(store.hlc_drift_alarms(), 1);
    assert_eq!(store.get(Collection::Users, b"clock").expect("read").value(), Some(&b"skewed"[..]));
    // Local writes stay within the drift limit of local time.
    let d = store.put(Collection::Users, b"mine", b"x").expect("put");
    let hlc = store.get(Collection::Users, b"mine").expect("read").values[0].hlc;
    assert!(hlc.wall_ms <= now + repl_wire::HLC_DRIFT_MAX_MS, "{hlc} for {d}");
}

#[test]
fn retention_limit_forces_compaction_past_a_dead_peer() {
    let disk = SimStorage::new(SimConfig::default());
    let clock = Arc::new(ManualClock::new(1_000));
    let mut opts = options(&clock, 4 * 1024);
    opts.log_retained_bytes_max = 16 * 1024;
    let store = Store::open(Arc::new(disk), opts).expect("open");
    for i in 0..300u32 {
        store.put(Collection::Users, format!("k{}", i % 20).as_bytes(), &[1u8; 120]).expect("put");
    }
    // A dead peer acknowledged nothing: the horizon is empty.
    let report = store.compact(StreamId::Enterprise, &VersionVector::new()).expect("compact");
    assert!(report.forced && report.segments_compacted > 0, "{report:?}");
    assert!(store.log_floors(StreamId::Enterprise)[&store.incarnation()] > 1);
    for i in 0..20u32 {
        assert_eq!(
            store.get(Collection::Users, format!("k{i}").as_bytes()).expect("read").value(),
            Some(&[1u8; 120][..])
        );
    }
}

#[test]
fn an_audit_forwarder_fails_closed_past_its_backlog_and_drops_only_acknowledged_records() {
    let disk = SimStorage::new(SimConfig::default());
    let clock = Arc::new(ManualClock::new(1_000));
    let mut opts = options(&clock, 16 * 1024);
    opts.audit_backlog_max = Some(3);
    let store = Store::open(Arc::new(disk), opts).expect("open");
    let event = |i: u64| AuditEvent {
        time_ms: i,
        user: "u".into(),
        appliance: "svc1".into(),
        action: "login".into(),
        detail: String::new(),
    };
    let dots: Vec<Dot> = (0..3).map(|i| store.append_audit(event(i)).expect("under the cap")).collect();
    assert!(matches!(store.append_audit(event(9)), Err(Error::AuditBacklogFull { backlog: 3, cap: 3 })));
    assert_eq!(store.audit_backlog(), 3);
    // Both holders acknowledged the first two: those may go, the third stays.
    let acked: VersionVector = [dots[1]].into_iter().collect();
    assert_eq!(store.release_audit(&acked), 2);
    assert_eq!(store.audit_backlog(), 1);
    let left = store.audit_query(&AuditQuery::default()).expect("query");
    assert_eq!(left.iter().map(|r| r.dot).collect::<Vec<_>>(), vec![dots[2]]);
    store.append_audit(event(10)).expect("room again once the holders caught up");
    // The chain still verifies from the first record kept.
    assert_eq!(store.audit_verify().expect("chain"), 2);
}

#[test]
fn the_clock_never_goes_back_across_a_restart() {
    let disk = SimStorage::new(SimConfig::default());
    let clock = Arc::new(ManualClock::new(5_000_000));
    let store = Store::open(Arc::new(disk.clone()), options(&clock, 16 * 1024)).expect("open");
    store.put(Collection::Users, b"k", b"before").expect("put");
    let before = store.get(Collection::Users, b"k").expect("read").values[0].hlc;
    drop(store);
    // The wall clock jumped back an hour while the appliance was down.
    clock.set(5_000_000 - 3_600_000);
    let store = Store::open(Arc::new(disk.crash()), options(&clock, 16 * 1024)).expect("reopen");
    store.put(Collection::Users, b"k", b"after").expect("put");
    let after = store.get(Collection::Users, b"k").expect("read").values[0].hlc;
    assert!(after > before, "{after} must follow {before}");
}
