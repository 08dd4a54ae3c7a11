//! The deterministic simulator: appliances made of a real `Store` on a simulated disk
//! and one `PeerSync` machine per in-scope peer, on a fake network that delays, loses,
//! duplicates and reorders messages and can be partitioned, with crashes that lose
//! unsynced bytes. One seed drives every choice; virtual time jumps to the next event.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use repl_engine::membership::{Membership, TopologyChange};
use repl_engine::sync::{PeerSync, SyncConfig, SyncSetup};
use repl_engine::topology::{Appliance, ExternalServers, Generation, Role, Site, SiteKind, Topology};
use repl_engine::{AuditEvent, ManualClock, SimConfig, SimStorage, Store, StoreOptions, WriteBatch};
use repl_wire::{
    decode_frame, encode_frame, Collection, Dot, NodeId, PeerMessage, StreamId, FRAME_PREFIX_BYTES,
};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Drives every choice.
    pub seed: u64,
    /// G3 (2 sites x 3, two audit holders) or G4 (2 database + 2 service).
    pub generation: Generation,
    /// Local writes to make.
    pub writes: usize,
    /// Whether to inject loss, duplication, partitions, crashes and clock skew.
    pub faults: bool,
    /// Planted bug: stores apply entries past a gap.
    pub skip_order_check: bool,
    /// Planted bug: replication reads buffered (not yet durable) writes.
    pub ship_buffered: bool,
    /// Planted bug: tombstones are collected before every replica has seen them.
    pub collect_tombstones_early: bool,
}

impl SimOptions {
    /// The standard run of a seed: 120 writes, every fault, no planted bug.
    pub fn new(seed: u64, generation: Generation) -> SimOptions {
        SimOptions {
            seed,
            generation,
            writes: 120,
            faults: true,
            skip_order_check: false,
            ship_buffered: false,
            collect_tombstones_early: false,
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// blake3 of every delivery and the final digests: equal for equal seeds.
    pub trace_hash: [u8; 32],
    /// Messages delivered.
    pub delivered: u64,
    /// Entries sent by all machines (retransmissions included).
    pub entries_sent: u64,
    /// Entries relayed (sent by an appliance that did not write them).
    pub entries_relayed: u64,
    /// Local writes acknowledged.
    pub writes_acked: u64,
    /// Entries that had to reach replicas: each acknowledged write times its replicas.
    pub replica_deliveries_needed: u64,
    /// Log segments compacted under the retention horizon.
    pub segments_compacted: u64,
    /// `NotCovered` answers received (a peer's log no longer held what was needed).
    pub not_covered: u64,
    /// Repairs (anti-entropy or bootstrap) completed.
    pub repairs: u64,
    /// Entries fetched by repairs.
    pub repair_entries: u64,
    /// Tombstones collected.
    pub tombstones_collected: u64,
    /// Appliances restored from an old backup under a new incarnation.
    pub restores: u64,
    /// Appliances that joined the running enterprise with an empty store.
    pub joins: u64,
    /// The most sibling values any policy key held at the end.
    pub siblings_max: u64,
    /// Appliances that committed a topology change (by two-phase commit).
    pub topology_commits: u64,
    /// Topology changes refused (an appliance unreachable, or a vote no), then retried.
    pub topology_refusals: u64,
    /// Appliances that adopted a newer topology after a handshake showed epochs differ.
    pub topology_adoptions: u64,
    /// Invariant violations; empty on success.
    pub violations: Vec<String>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// In G3 the last appliance joins during the run, with an empty store.
fn late_joiner(t: &Topology) -> Option<usize> {
    (t.generation == Generation::G3).then(|| t.appliances.len() - 1)
}

/// Audit records a forwarder may hold unacknowledged in the simulation.
const AUDIT_BACKLOG_MAX: u64 = 10_000;

fn is_audit_holder(t: &Topology, i: usize) -> bool {
    t.holds(&t.appliances[i], StreamId::Audit)
}

struct Node {
    id: NodeId,
    disk: SimStorage,
    clock: Arc<ManualClock>,
    store: Option<Store>,
    peers: BTreeMap<usize, PeerSync>,
    skew_ms: u64,
    /// A crash-consistent backup, once taken.
    backup: Option<SimStorage>,
    /// The incarnation its peers must see (set once it was restored).
    incarnation: Option<repl_wire::Incarnation>,
    /// Its view of the topology and any prepared change.
    membership: Membership,
}

#[derive(Clone)]
enum Action {
    Write(usize),
    Crash(usize),
    Restart(usize),
    Partition(Vec<usize>),
    Heal,
    /// Compaction below the retention horizon, and a checkpoint now and then.
    Maintain(usize, u64),
    /// The node's wall clock jumps to a new skew (back or forward).
    ClockJump(usize, u64),
    /// A crash-consistent backup of the node's disk is taken.
    Backup(usize),
    /// The node is restored from its backup and restarts under a new incarnation.
    Restore(usize),
    /// Node 0 starts the topology change (retried until every appliance has it).
    Change,
}

/// (appliance id, site id, roles) of a simulated appliance.
type NodeSpec<'a> = (&'a str, &'a str, Vec<Role>);

/// The topology simulated.
pub fn sim_topology(generation: Generation) -> Topology {
    let (sites, nodes): (Vec<&str>, Vec<NodeSpec<'_>>) = match generation {
        Generation::G3 => (
            vec!["a", "b"],
            vec![
                ("a1", "a", vec![Role::Audit]),
                ("a2", "a", vec![]),
                ("a3", "a", vec![]),
                ("b1", "b", vec![Role::Audit]),
                ("b2", "b", vec![]),
                ("b3", "b", vec![]),
                // Joins the running enterprise with an empty store (see `LATE_JOINER`).
                ("a4", "a", vec![]),
            ],
        ),
        Generation::G4 => (
            vec!["a", "b"],
            vec![
                ("db1", "a", vec![Role::Database]),
                ("s1", "a", vec![Role::Service]),
                ("db2", "b", vec![Role::Database]),
                ("s2", "b", vec![Role::Service]),
            ],
        ),
    };
    Topology {
        enterprise: "sim".into(),
        generation,
        epoch: 1,
        external: ExternalServers::default(),
        bootstrap: None,
        sites: sites
            .iter()
            .enumerate()
            .map(|(i, s)| Site {
                id: s.to_string(),
                name: s.to_string(),
                kind: SiteKind::Active,
                ranges: vec![format!("10.{}.0.0/16", i + 1).parse().expect("range")],
                primary_failover: Some(sites[1 - i].to_string()),
                secondary_failover: None,
                external: None,
            })
            .collect(),
        appliances: nodes
            .into_iter()
            .enumerate()
            .map(|(i, (id, site, roles))| Appliance {
                id: NodeId::new(id).expect("id"),
                name: id.into(),
                site: site.into(),
                address: format!("127.0.0.1:{}", 7000 + i).parse().expect("addr"),
                roles: roles.into_iter().collect(),
            })
            .collect(),
    }
}

struct World {
    opts: SimOptions,
    /// Every appliance that ever exists in the run (node index = position here).
    full: Topology,
    /// The topology the run changes to by two-phase commit: G3 adds the late joiner,
    /// G4 renames a site.
    target: Topology,
    /// The change in progress, coordinated by node 0.
    change: Option<TopologyChange>,
    /// When to try the change again after a refusal.
    change_retry_at: Option<u64>,
    nodes: Vec<Node>,
    rng: Rng,
    now: u64,
    net: BTreeMap<(u64, u64), (usize, usize, PeerMessage)>,
    net_seq: u64,
    blocked: BTreeSet<(usize, usize)>,
    trace: blake3::Hasher,
    report: SimReport,
    /// Acknowledged writes to users: key, dot, and the context it superseded.
    acked_users: Vec<(Vec<u8>, Dot, repl_wire::VersionVector)>,
    /// Buffered writes to users (they may or may not have survived): the same shape,
    /// used to follow chains of supersession, never required to be present.
    buffered_users: Vec<(Vec<u8>, Dot, repl_wire::VersionVector)>,
    acked_audit: Vec<Dot>,
    session_writers: BTreeMap<Vec<u8>, usize>,
    write_counter: u64,
    /// Per node and stream: the highest own sequence acknowledged.
    own_acked: BTreeMap<(usize, StreamId), u64>,
    sync_config: SyncConfig,
    session_nonce: u64,
    /// Every delete of a user acknowledged to its writer, kept when a restore from
    /// backup moves it among the buffered writes: a replica whose vector covers one has
    /// applied it, whatever became of its tombstone. Those still guaranteed are the
    /// ones among `acked_users`.
    deletes: BTreeSet<Dot>,
    /// Which appliance each incarnation belongs to.
    origins: BTreeMap<repl_wire::Incarnation, NodeId>,
    /// Last-writer-wins losers recorded by appliances before they crashed or were
    /// restored.
    losses_seen: BTreeSet<Dot>,
    /// Nodes holding entries received from peers but not yet committed (sessions queue
    /// them, as the runtime's do), and when their commit runs.
    commit_due: BTreeMap<usize, u64>,
}

fn store_options(clock: &Arc<ManualClock>, seed: u64, opts: &SimOptions) -> StoreOptions {
    StoreOptions {
        segment_bytes: if opts.seed % 2 == 0 { 1024 } else { 4 * 1024 },
        clock: clock.clone(),
        incarnation_seed: Some(seed),
        // Every other seed keeps so little log that compaction outruns a peer that is
        // down or partitioned, which then catches up by anti-entropy.
        log_retained_bytes_max: if opts.seed % 2 == 0 { 0 } else { 1 << 30 },
        unsafe_skip_order_check: opts.skip_order_check,
        unsafe_ship_buffered: opts.ship_buffered,
        unsafe_collect_tombstones_early: opts.collect_tombstones_early,
        // User policies keep concurrent versions as siblings (bounded), users use LWW.
        policies: [(Collection::UserPolicies, repl_engine::ConflictPolicy::KeepSiblings)]
            .into_iter()
            .collect(),
        ..StoreOptions::default()
    }
}

impl World {
    fn new(opts: SimOptions) -> World {
        let topology = sim_topology(opts.generation);
        // The run starts at epoch 1 without the late joiner; the target is epoch 2.
        let mut initial = topology.clone();
        if let Some(j) = late_joiner(&topology) {
            initial.appliances.remove(j);
        }
        let mut target = topology.clone();
        target.epoch = 2;
        if late_joiner(&topology).is_none() {
            target.sites[1].name = "renamed".into();
        }
        let mut rng = Rng(opts.seed ^ 0x5151_5151);
        let nodes = topology
            .appliances
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let disk = SimStorage::new(SimConfig { seed: rng.next(), ..SimConfig::default() });
                let skew_ms = if opts.faults { rng.below(3_000) } else { 0 };
                let clock = Arc::new(ManualClock::new(1_700_000_000_000 + skew_ms));
                let mut options = store_options(&clock, 1000 + i as u64, &opts);
                if !is_audit_holder(&topology, i) {
                    options.audit_backlog_max = Some(AUDIT_BACKLOG_MAX);
                }
                let store = (late_joiner(&topology) != Some(i)).then(|| {
                    Store::open(Arc::new(disk.clone()), options).expect("open a fresh simulated store")
                });
                Node {
                    id: a.id.clone(),
                    disk,
                    clock,
                    store,
                    peers: BTreeMap::new(),
                    skew_ms,
                    backup: None,
                    incarnation: None,
                    membership: Membership::new(initial.clone()),
                }
            })
            .collect();
        let sync_config = SyncConfig {
            window_entries: 512,
            batch_entries: 32,
            retransmit_ms: 300,
            relay_delay_ms: 800,
            snapshot_chunk_entries: 16,
        };
        let mut w = World {
            opts,
            full: topology,
            target,
            change: None,
            change_retry_at: None,
            nodes,
            rng,
            now: 0,
            net: BTreeMap::new(),
            net_seq: 0,
            blocked: BTreeSet::new(),
            trace: blake3::Hasher::new(),
            report: SimReport::default(),
            acked_users: Vec::new(),
            buffered_users: Vec::new(),
            acked_audit: Vec::new(),
            session_writers: BTreeMap::new(),
            write_counter: 0,
            own_acked: BTreeMap::new(),
            sync_config,
            session_nonce: 1,
            deletes: BTreeSet::new(),
            origins: BTreeMap::new(),
            losses_seen: BTreeSet::new(),
            commit_due: BTreeMap::new(),
        };
        for n in 0..w.nodes.len() {
            w.start_machines(n);
        }
        w
    }

    fn set_clocks(&self) {
        for n in &self.nodes {
            n.clock.set(1_700_000_000_000 + self.now + n.skew_ms);
        }
    }

    fn start_machines(&mut self, n: usize) {
        for p in 0..self.nodes.len() {
            if p != n {
                self.start_machine(n, p);
            }
        }
        self.drain(n);
    }

    /// Starts node `n`'s machine for peer `p`, if the pair shares a stream.
    fn start_machine(&mut self, n: usize, p: usize) {
        let Some(store) = self.nodes[n].store.clone() else { return };
        self.origins.insert(store.incarnation(), self.nodes[n].id.clone());
        {
            let view = self.nodes[n].membership.current();
            let scope = view.scope(&self.nodes[n].id, &self.nodes[p].id);
            let epoch = view.epoch;
            if scope.send.is_empty() && scope.receive.is_empty() {
                return;
            }
            self.session_nonce += 1;
            let setup = SyncSetup {
                me: self.nodes[n].id.clone(),
                peer: self.nodes[p].id.clone(),
                scope,
                epoch,
                session: self.session_nonce ^ self.rng.next(),
                peer_incarnation: self.nodes[p].incarnation,
                config: self.sync_config,
            };
            let mut m = PeerSync::new(setup, self.now, &store);
            m.set_queued_apply(true);
            self.nodes[n].peers.insert(p, m);
        }
    }

    /// Sends what node `n`'s machines queued.
    fn drain(&mut self, n: usize) {
        let peers: Vec<usize> = self.nodes[n].peers.keys().copied().collect();
        for p in peers {
            while let Some(out) = self.nodes[n].peers.get_mut(&p).and_then(|m| m.poll_outgoing()) {
                // Through the bytes the runtime sends: entries from the log go out in
                // their encoding and are decoded as a peer decodes them.
                let through = out.encode_frame().and_then(|f| {
                    decode_frame::<PeerMessage>(f.get(FRAME_PREFIX_BYTES..).unwrap_or_default())
                });
                match through {
                    Ok(msg) => self.send(n, p, msg),
                    Err(e) => self.report.violations.push(format!(
                        "a message of node {} does not go through a frame: {e}",
                        self.nodes[n].id
                    )),
                }
            }
            while let Some(ev) = self.nodes[n].peers.get_mut(&p).and_then(|m| m.poll_event()) {
                match ev {
                    repl_engine::sync::SyncEvent::ApplyFailed(e) => self.report.violations.push(format!(
                        "node {} failed to apply from {}: {e}",
                        self.nodes[n].id, self.nodes[p].id
                    )),
                    repl_engine::sync::SyncEvent::NeedAntiEntropy { .. } => self.report.not_covered += 1,
                    repl_engine::sync::SyncEvent::EpochDiffers { ours, theirs } if theirs > ours => {
                        // Behind: adopt the peer's topology (the replicated record) first.
                        let newer = self.nodes[p].membership.current().clone();
                        if newer.epoch == theirs && self.nodes[n].membership.adopt(newer) {
                            self.report.topology_adoptions += 1;
                            self.rebuild(n);
                            return;
                        }
                    }
                    repl_engine::sync::SyncEvent::Repaired { entries, stream, buckets_fetched } => {
                        if std::env::var_os("SIM_DEBUG").is_some() {
                            eprintln!(
                                "t={} {} repaired {stream} from {}: {buckets_fetched} buckets, {entries} entries",
                                self.now, self.nodes[n].id, self.nodes[p].id
                            );
                        }
                        self.report.repairs += 1;
                        self.report.repair_entries += entries;
                    }
                    _ => {}
                }
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: PeerMessage) {
        if self.blocked.contains(&(from, to)) {
            return;
        }
        let faults = self.opts.faults;
        if faults && self.rng.chance(20) {
            return; // lost
        }
        let copies = if faults && self.rng.chance(20) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(if faults { 60 } else { 5 });
            self.net_seq += 1;
            self.net.insert((self.now + delay, self.net_seq), (from, to, msg.clone()));
        }
    }

    fn deliver(&mut self, from: usize, to: usize, msg: PeerMessage) {
        if self.blocked.contains(&(from, to)) {
            return;
        }
        let Some(store) = self.nodes[to].store.clone() else { return };
        if self.deliver_topology(from, to, &msg) {
            return;
        }
        if let PeerMessage::Hello(h) = &msg {
            // A handshake from an appliance this one has no session with (it is not in
            // this view yet): a newer epoch means this view is stale; adopt and restart.
            if !self.nodes[to].peers.contains_key(&from)
                && h.topology_epoch > self.nodes[to].membership.epoch()
            {
                let newer = self.nodes[from].membership.current().clone();
                if newer.epoch == h.topology_epoch && self.nodes[to].membership.adopt(newer) {
                    self.report.topology_adoptions += 1;
                    self.rebuild(to);
                }
                return;
            }
        }
        let Some(m) = self.nodes[to].peers.get_mut(&from) else { return };
        self.report.delivered += 1;
        self.trace.update(&self.now.to_le_bytes());
        self.trace.update(&[from as u8, to as u8]);
        if let Ok(frame) = encode_frame(&msg) {
            self.trace.update(&frame);
        }
        let audit_ack =
            matches!(&msg, PeerMessage::Ack { stream: StreamId::Audit, .. } | PeerMessage::Hello(_));
        let before: Vec<_> = StreamId::ALL.iter().map(|s| store.vector(*s)).collect();
        m.handle_message(self.now, msg, &store);
        if m.take_queued() && !self.commit_due.contains_key(&to) {
            // The commit runs a little later: messages arriving meanwhile share it,
            // and a crash before it loses what was queued (never acknowledged).
            let at = self.now + 1 + self.rng.below(5);
            self.commit_due.insert(to, at);
        }
        // Entries applied (or a repair completed) here may need relaying to other peers.
        for (s, before) in StreamId::ALL.into_iter().zip(before) {
            if store.vector(s) != before {
                let others: Vec<usize> =
                    self.nodes[to].peers.keys().copied().filter(|p| *p != from).collect();
                for p in others {
                    if let Some(m) = self.nodes[to].peers.get_mut(&p) {
                        m.handle_local_durable(self.now, s, &store);
                    }
                }
            }
        }
        if audit_ack && !is_audit_holder(&self.full, to) {
            self.release_audit(to, &store);
        }
        self.drain(to);
    }

    /// A forwarder drops the audit records every holder acknowledged.
    fn release_audit(&mut self, n: usize, store: &Store) {
        let holders: Vec<usize> = (0..self.nodes.len()).filter(|&h| is_audit_holder(&self.full, h)).collect();
        let mut acked: Option<repl_wire::VersionVector> = None;
        for h in holders {
            let Some(v) = self.nodes[n].peers.get(&h).and_then(|m| m.acked(StreamId::Audit)).cloned() else {
                return;
            };
            acked = Some(match acked {
                Some(a) => a.meet(&v),
                None => v,
            });
        }
        if let Some(a) = acked {
            store.release_audit(&a);
        }
    }

    fn local_write(&mut self, n: usize) {
        let Some(store) = self.nodes[n].store.clone() else { return };
        // An appliance outside the topology (one still joining) serves no writes.
        if self.nodes[n].membership.current().appliance(&self.nodes[n].id).is_none() {
            return;
        }
        let holds_enterprise = match self.full.generation {
            Generation::G3 => true,
            Generation::G4 => self.full.appliances[n].has(Role::Database),
        };
        self.write_counter += 1;
        let roll = self.rng.below(100);
        let (stream, result) = if roll < 10 && holds_enterprise {
            // A buffered write: acknowledged before it is durable, so it may be lost in a
            // crash and is not counted as acknowledged; it must never reach a peer first.
            let key = format!("user{}", self.rng.below(12)).into_bytes();
            let mut b = WriteBatch::new();
            b.put(Collection::Users, &key, format!("b{}", self.write_counter).as_bytes());
            let before = store.get(Collection::Users, &key).map(|r| r.context).unwrap_or_default();
            match store.write(b, repl_engine::Durability::Buffered) {
                Ok(dots) => {
                    self.buffered_users.retain(|(_, b, _)| !dots.contains(b));
                    self.buffered_users.extend(dots.into_iter().map(|d| (key.clone(), d, before.clone())));
                }
                Err(e) => {
                    self.report.violations.push(format!("buffered write on {} failed: {e}", self.nodes[n].id))
                }
            }
            let peers: Vec<usize> = self.nodes[n].peers.keys().copied().collect();
            for p in peers {
                if let Some(m) = self.nodes[n].peers.get_mut(&p) {
                    m.handle_local_durable(self.now, StreamId::Enterprise, &store);
                }
            }
            self.drain(n);
            return;
        } else if roll < 16 && holds_enterprise {
            // Concurrent writes to a few policies from many appliances make siblings.
            let key = format!("policy{}", self.rng.below(3)).into_bytes();
            let value = format!("p{}-{}", self.write_counter, self.nodes[n].id).into_bytes();
            (StreamId::Enterprise, store.put(Collection::UserPolicies, &key, &value).map(|_| ()))
        } else if roll < 70 && holds_enterprise {
            let key = format!("user{}", self.rng.below(12)).into_bytes();
            let value = format!("v{}-{}", self.write_counter, self.nodes[n].id).into_bytes();
            let before = store.get(Collection::Users, &key).map(|r| r.context).unwrap_or_default();
            let r = store.put(Collection::Users, &key, &value);
            if let Ok(dot) = &r {
                self.acked_users.push((key, *dot, before));
            }
            (StreamId::Enterprise, r.map(|_| ()))
        } else if roll < 78 && holds_enterprise {
            let key = format!("user{}", self.rng.below(12)).into_bytes();
            let before = store.get(Collection::Users, &key).map(|r| r.context).unwrap_or_default();
            let r = store.delete(Collection::Users, &key);
            if let Ok(dot) = &r {
                self.acked_users.push((key, *dot, before));
                self.deletes.insert(*dot);
            }
            (StreamId::Enterprise, r.map(|_| ()))
        } else if roll < 88 && holds_enterprise {
            let key = format!("s-{n}-{}", self.write_counter).into_bytes();
            let mut b = WriteBatch::new();
            b.put_expiring(Collection::Sessions, &key, b"session", u64::MAX);
            let r = store.write(b, repl_engine::Durability::Durable);
            if r.is_ok() {
                self.session_writers.insert(key, n);
            }
            (StreamId::Sessions, r.map(|_| ()))
        } else {
            let r = store.append_audit(AuditEvent {
                time_ms: self.now,
                user: format!("user{}", self.rng.below(12)),
                appliance: self.nodes[n].id.to_string(),
                action: "login".into(),
                detail: String::new(),
            });
            if let Ok(dot) = &r {
                self.acked_audit.push(*dot);
            }
            (StreamId::Audit, r.map(|_| ()))
        };
        if let Err(e) = result {
            self.report.violations.push(format!("local write on {} failed: {e}", self.nodes[n].id));
            return;
        }
        self.report.writes_acked += 1;
        // A buffered write whose dot was given out again was lost in a crash: it can
        // no longer vouch for anything it superseded.
        if let Some((_, d, _)) = self.acked_users.last() {
            let d = *d;
            self.buffered_users.retain(|(_, b, _)| *b != d);
        }
        let own = store.vector(stream).get(store.incarnation());
        self.own_acked.insert((n, stream), own);
        let peers: Vec<usize> = self.nodes[n].peers.keys().copied().collect();
        for p in peers {
            if let Some(m) = self.nodes[n].peers.get_mut(&p) {
                m.handle_local_durable(self.now, stream, &store);
            }
        }
        self.drain(n);
    }

    fn crash(&mut self, n: usize) {
        let Some(store) = self.nodes[n].store.as_ref() else { return };
        // Conflict records are an appliance's trail of resolutions it ran; a crash or a
        // restore may lose recent ones, not the fact that the write lost.
        self.losses_seen.extend(store.conflicts(Collection::Users).0.into_iter().map(|c| c.loser));
        self.nodes[n].store = None;
        self.commit_due.remove(&n);
        // Its connections die with it: what was in flight on them is not delivered to
        // the sessions that follow (in the runtime each session is its own connection
        // and machine; here one machine per pair outlives them).
        self.net.retain(|_, (from, to, _)| *from != n && *to != n);
        self.retire(n);
        self.nodes[n].disk = self.nodes[n].disk.crash();
        // The committed topology is replicated data and survives; a prepared change
        // lived in memory only.
        let current = self.nodes[n].membership.current().clone();
        self.nodes[n].membership = Membership::new(current);
    }

    /// Node 0 coordinates the change to the target topology, unless one runs or every
    /// appliance already has it.
    fn start_change(&mut self) {
        if self.change.as_ref().is_some_and(|c| c.outcome().is_none())
            || self.nodes[0].membership.epoch() >= self.target.epoch
        {
            return;
        }
        if self.nodes[0].store.is_none() {
            self.change_retry_at = Some(self.now + 1_000);
            return;
        }
        self.change_retry_at = None;
        let current = self.nodes[0].membership.current().clone();
        match TopologyChange::new(&current, self.target.clone(), self.now, 1_500) {
            Ok(c) => self.change = Some(c),
            Err(e) => self.report.violations.push(format!("the target topology was refused: {e}")),
        }
        self.drain_change();
    }

    /// Sends the coordinator's messages; schedules a retry if the change was refused
    /// (an appliance down or cut off: the product needs them all online).
    fn drain_change(&mut self) {
        let mut out = Vec::new();
        if let Some(c) = self.change.as_mut() {
            while let Some((to, m)) = c.poll_transmit() {
                out.push((to, m));
            }
            match c.outcome() {
                Some(Err(e)) if self.change_retry_at.is_none() => {
                    self.report.topology_refusals += 1;
                    if std::env::var_os("SIM_DEBUG").is_some() {
                        eprintln!("t={} topology change refused: {e}", self.now);
                    }
                    self.change_retry_at = Some(self.now + 1_000);
                }
                // Committed, but each commit is sent once and may be lost: an appliance
                // that missed it adopts the topology from a peer that has it, and if none
                // has it, `replctl` reports the change as not applied anywhere and the
                // administrator runs it again (the prepared appliances accept the same
                // proposal again). Checked a while later, as that administrator would.
                Some(Ok(_)) if self.change_retry_at.is_none() => {
                    self.change_retry_at = Some(self.now + 2_000);
                }
                _ => {}
            }
        }
        for (to, m) in out {
            if let Some(p) = self.nodes.iter().position(|n| n.id == to) {
                self.send(0, p, m);
            }
        }
    }

    /// Node `n`'s topology changed: every session restarts with the new scope.
    fn rebuild(&mut self, n: usize) {
        self.retire(n);
        self.start_machines(n);
    }

    /// Handles a topology message at node `to`; false if it is not one.
    fn deliver_topology(&mut self, from: usize, to: usize, msg: &PeerMessage) -> bool {
        match msg {
            PeerMessage::TopologyPrepare { expected_epoch, new_epoch, topology } => {
                let vote =
                    self.nodes[to].membership.on_prepare(self.now, *expected_epoch, *new_epoch, topology);
                self.send(to, from, vote);
            }
            PeerMessage::TopologyVote { new_epoch, accept, reason } => {
                let voter = self.nodes[from].id.clone();
                if let Some(c) = self.change.as_mut() {
                    c.handle_vote(&voter, *new_epoch, *accept, reason.clone());
                }
                self.drain_change();
            }
            PeerMessage::TopologyCommit { new_epoch } => {
                if self.nodes[to].membership.on_commit(*new_epoch).is_some() {
                    self.report.topology_commits += 1;
                    self.rebuild(to);
                }
            }
            PeerMessage::TopologyAbort { new_epoch } => self.nodes[to].membership.on_abort(*new_epoch),
            _ => return false,
        }
        true
    }

    fn restart(&mut self, n: usize) {
        if self.nodes[n].store.is_some() {
            return;
        }
        // Used only if the disk holds no identity (a joiner's first start, or one whose
        // identity never became durable): always a fresh incarnation, never a reused one.
        let seed = 1000 + n as u64 + 1000 * (1 + self.rng.below(1 << 20));
        let mut opts = store_options(&self.nodes[n].clock, seed, &self.opts);
        if !is_audit_holder(&self.full, n) {
            opts.audit_backlog_max = Some(AUDIT_BACKLOG_MAX);
        }
        match Store::open(Arc::new(self.nodes[n].disk.clone()), opts) {
            Ok(s) => {
                if s.recovery().created {
                    self.report.joins += 1;
                }
                for stream in StreamId::ALL {
                    let acked = self.own_acked.get(&(n, stream)).copied().unwrap_or(0);
                    let have = s.vector(stream).get(s.incarnation());
                    if have < acked {
                        self.report.violations.push(format!(
                            "{} came back from a crash with {stream} seq {have} of its own, but {acked} were acknowledged (t={})",
                            self.nodes[n].id, self.now
                        ));
                    }
                }
                self.nodes[n].store = Some(s);
                self.start_machines(n);
            }
            Err(e) => {
                self.report.violations.push(format!("{} did not reopen after a crash: {e}", self.nodes[n].id))
            }
        }
    }

    /// Restores node `n` from its backup: it loses what it wrote or received since,
    /// restarts under a new incarnation that its peers expect from then on (refusing
    /// the old one), and catches up from them. Its own writes that no other live
    /// appliance held are lost with the restore, as an operator would expect; every
    /// other acknowledged write must come back.
    fn restore(&mut self, n: usize) {
        let Some(backup) = self.nodes[n].backup.take() else { return };
        self.crash(n);
        let disk = backup.backup_image();
        let mut opts = store_options(&self.nodes[n].clock, 5000 + n as u64, &self.opts);
        if !is_audit_holder(&self.full, n) {
            opts.audit_backlog_max = Some(AUDIT_BACKLOG_MAX);
        }
        let incarnation = match Store::reincarnate(&disk, &opts) {
            Ok(i) => i,
            Err(e) => {
                self.report.violations.push(format!("restore of {} failed: {e}", self.nodes[n].id));
                return;
            }
        };
        let held_elsewhere = |w: &World, stream: StreamId, dot: Dot| {
            w.nodes.iter().enumerate().any(|(i, node)| {
                i != n && node.store.as_ref().is_some_and(|s| s.vector(stream).contains(dot))
            })
        };
        let me = &self.nodes[n].id;
        let lost: Vec<usize> = (0..self.acked_users.len())
            .filter(|&i| {
                let dot = self.acked_users[i].1;
                self.written_by(dot) == Some(me.clone()) && !held_elsewhere(self, StreamId::Enterprise, dot)
            })
            .collect();
        for i in lost.into_iter().rev() {
            let w = self.acked_users.remove(i);
            self.buffered_users.push(w);
        }
        let audit: Vec<Dot> = self.acked_audit.clone();
        self.acked_audit = audit
            .into_iter()
            .filter(|d| self.written_by(*d) != Some(me.clone()) || held_elsewhere(self, StreamId::Audit, *d))
            .collect();
        for stream in StreamId::ALL {
            self.own_acked.remove(&(n, stream));
        }
        self.nodes[n].disk = disk;
        self.nodes[n].incarnation = Some(incarnation);
        self.report.restores += 1;
        if std::env::var_os("SIM_DEBUG").is_some() {
            eprintln!("t={} restored {} as {incarnation}", self.now, self.nodes[n].id);
        }
        // Every peer starts a new session that accepts only the new incarnation.
        for p in 0..self.nodes.len() {
            if let Some(m) = self.nodes[p].peers.remove(&n).filter(|_| p != n) {
                self.count(&m);
                self.start_machine(p, n);
                self.drain(p);
            }
        }
        self.restart(n);
    }

    /// The appliance whose incarnation gave out `dot`, as far as the run knows.
    fn written_by(&self, dot: Dot) -> Option<NodeId> {
        self.origins.get(&dot.origin).cloned()
    }

    fn next_timer(&self) -> Option<u64> {
        let change = self.change.as_ref().and_then(TopologyChange::poll_timeout);
        self.nodes
            .iter()
            .filter_map(|n| {
                let store = n.store.as_ref()?;
                n.peers.values().filter_map(|m| m.poll_timeout(store)).min()
            })
            .chain(change)
            .chain(self.change_retry_at)
            .min()
    }

    fn fire_timers(&mut self) {
        if let Some(c) = self.change.as_mut() {
            if c.poll_timeout().is_some_and(|t| t <= self.now) {
                c.handle_timeout(self.now);
                self.drain_change();
            }
        }
        if self.change_retry_at.is_some_and(|t| t <= self.now) {
            self.change_retry_at = None;
            self.start_change();
        }
        for n in 0..self.nodes.len() {
            let Some(store) = self.nodes[n].store.clone() else { continue };
            let due: Vec<usize> = self.nodes[n]
                .peers
                .iter()
                .filter(|(_, m)| m.poll_timeout(&store).is_some_and(|t| t <= self.now))
                .map(|(p, _)| *p)
                .collect();
            for p in due {
                if let Some(m) = self.nodes[n].peers.get_mut(&p) {
                    m.handle_timeout(self.now, &store);
                }
            }
            self.drain(n);
        }
    }

    /// Runs until nothing is in flight and no timer is pending, or `deadline`.
    fn run(&mut self, mut schedule: BTreeMap<(u64, u64), Action>, deadline: u64) -> bool {
        loop {
            let next_net = self.net.keys().next().map(|k| k.0);
            let next_action = schedule.keys().next().map(|k| k.0);
            let next_timer = self.next_timer();
            let next_commit = self.commit_due.values().min().copied();
            let Some(t) = [next_net, next_action, next_timer, next_commit].into_iter().flatten().min() else {
                return true;
            };
            if t > deadline {
                return false;
            }
            self.now = self.now.max(t);
            self.set_clocks();
            if next_commit == Some(t) {
                let n = self
                    .commit_due
                    .iter()
                    .find(|(_, at)| **at == t)
                    .map(|(n, _)| *n)
                    .expect("a commit is due");
                self.commit_due.remove(&n);
                self.commit_received(n);
            } else if next_action == Some(t) {
                let (_, a) = schedule.pop_first().expect("an action is due");
                match a {
                    Action::Write(n) => self.local_write(n),
                    Action::Crash(n) => self.crash(n),
                    Action::Restart(n) => self.restart(n),
                    Action::Partition(group) => {
                        for &a in &group {
                            for b in 0..self.nodes.len() {
                                if !group.contains(&b) {
                                    self.blocked.insert((a, b));
                                    self.blocked.insert((b, a));
                                }
                            }
                        }
                    }
                    Action::Heal => self.blocked.clear(),
                    Action::Maintain(n, round) => self.maintain(n, round),
                    Action::ClockJump(n, skew) => {
                        self.nodes[n].skew_ms = skew;
                        self.set_clocks();
                    }
                    Action::Backup(n) => {
                        if self.nodes[n].store.is_some() {
                            self.nodes[n].backup = Some(self.nodes[n].disk.backup_image());
                        }
                    }
                    Action::Restore(n) => self.restore(n),
                    Action::Change => self.start_change(),
                }
            } else if next_net == Some(t) {
                let (_, (from, to, msg)) = self.net.pop_first().expect("a message is due");
                self.deliver(from, to, msg);
            } else {
                self.fire_timers();
            }
        }
    }

    fn schedule(&mut self) -> BTreeMap<(u64, u64), Action> {
        let mut s = BTreeMap::new();
        let mut seq = 0;
        let mut add = |s: &mut BTreeMap<(u64, u64), Action>, t: u64, a: Action| {
            seq += 1;
            s.insert((t, seq), a);
        };
        let nodes = self.nodes.len() as u64;
        for _ in 0..self.opts.writes {
            let t = self.rng.below(10_000);
            let n = self.rng.below(nodes) as usize;
            add(&mut s, t, Action::Write(n));
        }
        if self.opts.faults {
            let half: Vec<usize> = (0..self.nodes.len() / 2).collect();
            let p1 = 1_000 + self.rng.below(2_000);
            add(&mut s, p1, Action::Partition(half));
            add(&mut s, p1 + 1_500, Action::Heal);
            let lone = self.rng.below(nodes) as usize;
            let p2 = 4_000 + self.rng.below(1_000);
            add(&mut s, p2, Action::Partition(vec![lone]));
            add(&mut s, p2 + 1_000, Action::Heal);
            for _ in 0..2 {
                let n = self.rng.below(nodes) as usize;
                let c = 1_000 + self.rng.below(7_000);
                add(&mut s, c, Action::Crash(n));
                add(&mut s, c + 300 + self.rng.below(1_500), Action::Restart(n));
            }
            add(&mut s, 10_000, Action::Heal);
            // One clock jumps back by up to two seconds, another forward.
            let back = self.rng.below(nodes) as usize;
            add(&mut s, 2_500 + self.rng.below(5_000), Action::ClockJump(back, 0));
            let fwd = self.rng.below(nodes) as usize;
            add(&mut s, 2_500 + self.rng.below(5_000), Action::ClockJump(fwd, 5_000));
            let join_at = 3_000 + self.rng.below(3_000);
            if let Some(j) = late_joiner(&self.full) {
                add(&mut s, join_at, Action::Restart(j));
            }
            add(&mut s, join_at + 100, Action::Change);
            // Every third seed restores one appliance from a backup taken earlier.
            if self.opts.seed % 3 == 0 {
                let r = self.rng.below(nodes - u64::from(late_joiner(&self.full).is_some())) as usize;
                add(&mut s, 1_000 + self.rng.below(2_000), Action::Backup(r));
                add(&mut s, 5_000 + self.rng.below(3_000), Action::Restore(r));
            }
        } else {
            if let Some(j) = late_joiner(&self.full) {
                add(&mut s, 3_000, Action::Restart(j));
            }
            add(&mut s, 3_100, Action::Change);
        }
        for round in 0..14u64 {
            for n in 0..self.nodes.len() {
                let t = 700 * (round + 1) + self.rng.below(300);
                add(&mut s, t, Action::Maintain(n, round));
            }
        }
        s
    }

    /// The runtime's committer: makes what the sessions queued durable, then lets every
    /// session acknowledge it (and push or relay it).
    fn commit_received(&mut self, n: usize) {
        let Some(store) = self.nodes[n].store.clone() else { return };
        if let Err(e) = store.flush() {
            self.report
                .violations
                .push(format!("commit of received entries on {} failed: {e}", self.nodes[n].id));
            return;
        }
        self.push_durable(n, &store, &StreamId::ALL);
    }

    /// Lets every session of node `n` push and acknowledge what is durable in `streams`.
    fn push_durable(&mut self, n: usize, store: &Store, streams: &[StreamId]) {
        let now = self.now;
        for m in self.nodes[n].peers.values_mut() {
            for stream in streams {
                m.handle_local_durable(now, *stream, store);
            }
        }
        self.drain(n);
    }

    /// Compacts every stream below what all peers it is sent to acknowledged, so the
    /// log shrinks under replication without leaving any peer behind its floor.
    fn maintain(&mut self, n: usize, round: u64) {
        let Some(store) = self.nodes[n].store.clone() else { return };
        if let Err(e) = store.flush() {
            self.report.violations.push(format!("flush on {} failed: {e}", self.nodes[n].id));
        }
        self.push_durable(n, &store, &[StreamId::Enterprise]);
        for stream in StreamId::ALL {
            let horizon = repl_engine::sync::retention_horizon(
                self.nodes[n].peers.values(),
                stream,
                &store.vector(stream),
            );
            match store.compact(stream, &horizon) {
                Ok(r) => self.report.segments_compacted += r.segments_compacted as u64,
                Err(e) => {
                    self.report.violations.push(format!("compaction on {} failed: {e}", self.nodes[n].id))
                }
            }
        }
        self.collect_tombstones(n);
        if round % 3 == 2 {
            if let Err(e) = store.checkpoint() {
                self.report.violations.push(format!("checkpoint on {} failed: {e}", self.nodes[n].id));
            }
        }
    }

    /// With `SIM_DEBUG` set: every version (key, dot, delete flag, context) of each
    /// member's replica of `stream`, one line per appliance, for diffing.
    fn dump_versions(&self, tag: &str, stream: StreamId, members: &[usize], live: &[(usize, Store)]) {
        if std::env::var_os("SIM_DEBUG").is_none() {
            return;
        }
        for &i in members {
            let store = &live[i].1;
            let Ok((_, all, _)) = store.snapshot_chunk(stream, &[], &[], usize::MAX) else { continue };
            let versions: Vec<String> = all
                .iter()
                .map(|e| {
                    format!("{}:{}:{}:{}", String::from_utf8_lossy(&e.key), e.dot, e.is_delete(), e.context)
                })
                .collect();
            eprintln!("{tag} {} vector {} {versions:?}", self.nodes[i].id, store.vector(stream));
        }
    }

    /// Collects the tombstones every in-scope replica acknowledged.
    fn collect_tombstones(&mut self, n: usize) {
        let Some(store) = self.nodes[n].store.clone() else { return };
        let acked: Vec<repl_wire::VersionVector> = self.nodes[n]
            .peers
            .values()
            .filter(|m| m.sends(StreamId::Enterprise))
            .map(|m| m.acked(StreamId::Enterprise).cloned().unwrap_or_default())
            .collect();
        self.report.tombstones_collected += store.collect_tombstones(StreamId::Enterprise, &acked) as u64;
    }

    fn check(&mut self) {
        let live: Vec<(usize, Store)> =
            self.nodes.iter().enumerate().filter_map(|(i, n)| n.store.clone().map(|s| (i, s))).collect();
        if live.len() != self.nodes.len() {
            self.report.violations.push("a node is still down at the end".into());
            return;
        }
        if let Ok(k) = std::env::var("SIM_DEBUG_KEY") {
            let writes: Vec<String> = self
                .acked_users
                .iter()
                .map(|w| (w, "acked"))
                .chain(self.buffered_users.iter().map(|w| (w, "buffered")))
                .filter(|((key, _, _), _)| key == k.as_bytes())
                .map(|((_, d, c), kind)| format!("{kind} {d} over {c} del={}", self.deletes.contains(d)))
                .collect();
            eprintln!("history of {k}: {writes:?}");
        }
        // Every appliance committed (or adopted) the target topology.
        for n in &self.nodes {
            if n.membership.current() != &self.target {
                self.report.violations.push(format!(
                    "{} ended at topology epoch {}, not the committed {}",
                    n.id,
                    n.membership.epoch(),
                    self.target.epoch
                ));
            }
        }
        // Replicas in scope agree.
        for stream in StreamId::ALL {
            let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (i, a) in self.full.appliances.iter().enumerate() {
                let holds = match (self.full.generation, stream) {
                    // (sessions stay in their site only in G3; G4's pair holds them all)
                    (Generation::G3, StreamId::Enterprise) => Some("all".to_string()),
                    (Generation::G3, StreamId::Sessions) => Some(a.site.clone()),
                    (Generation::G3, StreamId::Audit) => a.has(Role::Audit).then(|| "holders".to_string()),
                    (Generation::G4, _) => a.has(Role::Database).then(|| "db".to_string()),
                    _ => None,
                };
                if let Some(g) = holds {
                    groups.entry(g).or_default().push(i);
                }
            }
            for (g, members) in groups {
                let digests: Vec<[u8; 32]> =
                    members.iter().map(|&i| live[i].1.digest(stream).unwrap_or([0; 32])).collect();
                // The anti-entropy roots agree too.
                let roots: Vec<Vec<repl_wire::BucketHash>> = members
                    .iter()
                    .map(|&i| live[i].1.tree_hashes(stream, 1_700_000_000_000 + self.now, 0, &[0]).1)
                    .collect();
                for d in &digests {
                    self.trace.update(d);
                }
                let names: Vec<String> = members.iter().map(|&i| self.nodes[i].id.to_string()).collect();
                if roots.windows(2).any(|w| w[0] != w[1]) {
                    self.dump_versions("ROOTS", stream, &members, &live);
                    self.report
                        .violations
                        .push(format!("{stream} hash-tree roots of group {g} differ: {names:?}"));
                }
                if digests.windows(2).any(|w| w[0] != w[1]) {
                    self.dump_versions("VERSIONS", stream, &members, &live);
                    self.report.violations.push(format!("{stream} replicas of group {g} differ: {names:?}"));
                }
                // Each appliance's own writes must reach every member it sends the
                // stream to (audit records reach the holders from every appliance;
                // sessions stay in their site).
                for (i, s) in &live {
                    let writes = s.vector(stream).get(s.incarnation());
                    let to = members
                        .iter()
                        .filter(|&&j| {
                            j != *i
                                && self
                                    .target
                                    .scope(&self.nodes[*i].id, &self.nodes[j].id)
                                    .send
                                    .contains(&stream)
                        })
                        .count() as u64;
                    self.report.replica_deliveries_needed += writes * to;
                }
            }
        }
        // Every acknowledged user write is present or superseded, on every holder. A
        // last-writer-wins loss is recorded where the resolution ran, which for a
        // replica repaired from a snapshot is another appliance.
        let mut losses: BTreeSet<Dot> =
            live.iter().flat_map(|(_, s)| s.conflicts(Collection::Users).0).map(|c| c.loser).collect();
        losses.extend(self.losses_seen.iter().copied());
        let history: Vec<(Vec<u8>, Dot, repl_wire::VersionVector)> =
            self.acked_users.iter().chain(self.buffered_users.iter()).cloned().collect();
        for (key, dot, _) in &self.acked_users {
            for (i, s) in &live {
                if !self.holds(*i, StreamId::Enterprise) {
                    continue;
                }
                let covered = accounted_for(s, &history, &self.deletes, &losses, key, *dot, 0);
                if !covered {
                    let detail = if std::env::var_os("SIM_DEBUG").is_some() {
                        let r = s.get(Collection::Users, key).ok();
                        let entry = s
                            .entries_since(StreamId::Enterprise, &repl_wire::VersionVector::new(), usize::MAX)
                            .ok()
                            .and_then(|es| es.into_iter().find(|e| e.dot == *dot));
                        let history: Vec<String> = s
                            .entries_since(StreamId::Enterprise, &repl_wire::VersionVector::new(), usize::MAX)
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|e| &e.key == key)
                            .map(|e| {
                                format!(
                                    "{}@{} ctx{} {}",
                                    e.dot,
                                    e.hlc,
                                    e.context,
                                    if e.is_delete() { "DEL" } else { "put" }
                                )
                            })
                            .collect();
                        let conflicts: Vec<String> = s
                            .conflicts(Collection::Users)
                            .0
                            .iter()
                            .filter(|c| &c.key == key)
                            .map(|c| format!("{} lost to {}", c.loser, c.winner))
                            .collect();
                        let others: Vec<String> = live
                            .iter()
                            .map(|(j, o)| {
                                let r = o.get(Collection::Users, key).ok().map(|r| r.context.to_string());
                                format!("{}: {:?}", self.nodes[*j].id, r)
                            })
                            .collect();
                        let writes: Vec<String> = self
                            .acked_users
                            .iter()
                            .chain(self.buffered_users.iter())
                            .filter(|(k, _, _)| k == key)
                            .map(|(_, d, c)| format!("{d} over {c}"))
                            .collect();
                        format!(
                            " (now: {r:?}; the entry: {entry:?}; log: {history:?}; conflicts: {conflicts:?}; others: {others:?}; writes: {writes:?})"
                        )
                    } else {
                        String::new()
                    };
                    self.report.violations.push(format!(
                        "{} lost acknowledged write {dot} to {}{detail}",
                        self.nodes[*i].id,
                        String::from_utf8_lossy(key)
                    ));
                }
            }
        }
        // No deleted record comes back: a key whose causally latest writes (those no
        // other write superseded) are all acknowledged deletes reads as absent.
        let acked: BTreeSet<Dot> = self.acked_users.iter().map(|(_, d, _)| *d).collect();
        let mut keys: BTreeSet<&Vec<u8>> = BTreeSet::new();
        keys.extend(history.iter().map(|(k, _, _)| k));
        for key in keys {
            let writes: Vec<&(Vec<u8>, Dot, repl_wire::VersionVector)> =
                history.iter().filter(|(k, _, _)| k == key).collect();
            let latest: Vec<Dot> = writes
                .iter()
                .filter(|(_, d, _)| !writes.iter().any(|(_, o, ctx)| o != d && ctx.contains(*d)))
                .map(|(_, d, _)| *d)
                .collect();
            if latest.is_empty() || !latest.iter().all(|d| acked.contains(d) && self.deletes.contains(d)) {
                continue;
            }
            for (i, s) in &live {
                if !self.holds(*i, StreamId::Enterprise) {
                    continue;
                }
                if let Ok(r) = s.get(Collection::Users, key) {
                    if r.value().is_some() {
                        self.report.violations.push(format!(
                            "{} brought deleted {} back (deleted by {latest:?})",
                            self.nodes[*i].id,
                            String::from_utf8_lossy(key)
                        ));
                    }
                }
            }
        }
        // Sibling sets stay within their bound.
        for (i, s) in &live {
            for key in s.scan_keys(Collection::UserPolicies, b"", usize::MAX) {
                let n = s.get(Collection::UserPolicies, &key).map(|r| r.values.len()).unwrap_or(0);
                if n > repl_engine::SIBLINGS_MAX {
                    self.report.violations.push(format!(
                        "{} holds {n} siblings of {}",
                        self.nodes[*i].id,
                        String::from_utf8_lossy(&key)
                    ));
                }
                self.report.siblings_max = self.report.siblings_max.max(n as u64);
            }
        }
        // Sessions stay in their site (G3; in G4 the database pair holds all of them).
        for (i, s) in live.iter().filter(|_| self.full.generation == Generation::G3) {
            for key in s.scan_keys(Collection::Sessions, b"", usize::MAX) {
                if let Some(&w) = self.session_writers.get(&key) {
                    if self.full.appliances[w].site != self.full.appliances[*i].site {
                        self.report
                            .violations
                            .push(format!("session {} left its site", String::from_utf8_lossy(&key)));
                    }
                }
            }
        }
        // Every audit record reaches every holder, and chains verify there; forwarders
        // have handed everything over and dropped it.
        for (i, s) in &live {
            if !self.holds(*i, StreamId::Audit) {
                if s.audit_backlog() != 0 {
                    self.report.violations.push(format!(
                        "forwarder {} still holds {} audit records every holder acknowledged",
                        self.nodes[*i].id,
                        s.audit_backlog()
                    ));
                }
                continue;
            }
            let v = s.vector(StreamId::Audit);
            if let Some(d) = self.acked_audit.iter().find(|d| !v.contains(**d)) {
                self.report
                    .violations
                    .push(format!("audit record {d} missing on holder {}", self.nodes[*i].id));
            }
            if let Err(e) = s.audit_verify() {
                self.report.violations.push(format!("audit chain on {}: {e}", self.nodes[*i].id));
            }
        }
        for n in 0..self.nodes.len() {
            self.retire(n);
        }
    }

    /// Drops node `n`'s machines, counting what they sent.
    fn retire(&mut self, n: usize) {
        let machines = std::mem::take(&mut self.nodes[n].peers);
        for m in machines.values() {
            self.count(m);
        }
    }

    fn count(&mut self, m: &PeerSync) {
        let st = m.stats();
        self.report.entries_sent += st.entries_sent;
        self.report.entries_relayed += st.entries_relayed;
    }

    fn holds(&self, i: usize, stream: StreamId) -> bool {
        let a = &self.full.appliances[i];
        match (self.full.generation, stream) {
            (Generation::G3, StreamId::Audit) => a.has(Role::Audit),
            (Generation::G3, _) => true,
            (Generation::G4, _) => a.has(Role::Database),
        }
    }
}

/// Whether a write to `key` is accounted for on a replica: present or superseded (the
/// key's context covers it), a recorded last-writer-wins loss (`losses`: recorded on
/// any appliance), or superseded by a later
/// acknowledged write (whose context covered it) that is itself accounted for.
fn accounted_for(
    s: &Store,
    history: &[(Vec<u8>, Dot, repl_wire::VersionVector)],
    deletes: &BTreeSet<Dot>,
    losses: &BTreeSet<Dot>,
    key: &[u8],
    dot: Dot,
    depth: usize,
) -> bool {
    if s.get(Collection::Users, key).map(|r| r.context.contains(dot)).unwrap_or(false)
        || losses.contains(&dot)
    {
        return true;
    }
    // A delete whose tombstone was collected leaves no context behind; the replica
    // has it when its vector covers it (that nothing came back is checked apart).
    if deletes.contains(&dot) && s.vector(StreamId::Enterprise).contains(dot) {
        return true;
    }
    depth < 64
        && history
            .iter()
            .filter(|(k, d, ctx)| k == key && *d != dot && ctx.contains(dot))
            .any(|(_, d, _)| accounted_for(s, history, deletes, losses, key, *d, depth + 1))
}

/// Runs one simulation: the workload and fault schedule, then heal and quiescence,
/// then the invariants.
pub fn simulate(opts: SimOptions) -> SimReport {
    let mut w = World::new(opts);
    let schedule = w.schedule();
    // Everything is restarted and healed by 12 s; then the system must go quiet.
    let mut tail = schedule;
    if w.opts.faults {
        for n in 0..w.nodes.len() {
            tail.insert((11_000, 1_000_000 + n as u64), Action::Restart(n));
        }
    }
    let quiet = w.run(tail, 600_000);
    if !quiet {
        let mut detail = String::new();
        for n in &w.nodes {
            let Some(store) = n.store.as_ref() else { continue };
            for (p, m) in &n.peers {
                if let Some(t) = m.poll_timeout(store) {
                    detail.push_str(&format!(
                        " [{}->{} timer {t} {:?}]",
                        n.id,
                        w.nodes[*p].id,
                        m.debug_state(store)
                    ));
                }
            }
        }
        w.report
            .violations
            .push(format!("the system did not go quiet after healing (still busy at 600 s):{detail}"));
    }
    // Tombstones wait for every replica's acknowledgement; once everything is quiet,
    // every replica can collect the same ones.
    for n in 0..w.nodes.len() {
        w.collect_tombstones(n);
        if std::env::var_os("SIM_DEBUG").is_some() {
            if let Some(store) = w.nodes[n].store.as_ref() {
                for (p, m) in &w.nodes[n].peers {
                    eprintln!(
                        "ACKED {} by {}: {:?} (ours {})",
                        w.nodes[n].id,
                        w.nodes[*p].id,
                        m.acked(StreamId::Enterprise),
                        store.vector(StreamId::Enterprise)
                    );
                }
            }
        }
    }
    w.check();
    w.report.trace_hash = *w.trace.finalize().as_bytes();
    w.report
}
