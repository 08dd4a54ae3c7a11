//! Deterministic simulation of replication: G3 (2 sites x 3) and G4 (2 database + 2
//! service appliances) under loss, duplication, delay, reordering, partitions, crashes
//! and clock skew. After healing, every in-scope replica must be equal, no
//! acknowledged write lost, sessions in their site, audit on every holder. A failure
//! prints the seed: `SEED=<n> cargo test -p repl-tests --test sim_convergence`.
//! `SIM_SEEDS=N` runs more seeds, and `SIM_FIRST_SEED=F` starts them at F instead of
//! 0: a sweep beyond the default range, e.g. `SIM_FIRST_SEED=200 SIM_SEEDS=5000`
//! (a run stops at its first failing seed, which the panic names).

use repl_engine::topology::Generation;
use repl_tests::sim::{simulate, SimOptions, SimReport};

fn seeds(default: u64) -> std::ops::Range<u64> {
    if let Some(seed) = std::env::var("SEED").ok().and_then(|s| s.parse().ok()) {
        return seed..seed + 1;
    }
    let n = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let first = std::env::var("SIM_FIRST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    first..first + n
}

/// Runs one seed; panics with the violations and the command that replays it.
fn converges(generation: Generation, seed: u64) -> SimReport {
    let report = simulate(SimOptions::new(seed, generation));
    assert!(
        report.violations.is_empty(),
        "{generation:?} seed {seed}: {:?}\nreplay: SEED={seed} cargo test -p repl-tests --test sim_convergence",
        report.violations
    );
    report
}

fn run_many(generation: Generation, default: u64) {
    let mut compacted = 0;
    let (mut repairs, mut restores, mut joins, mut collected) = (0, 0, 0, 0);
    let (mut commits, mut refusals, mut adoptions, mut siblings) = (0, 0, 0, 0);
    for seed in seeds(default) {
        let report = converges(generation, seed);
        repairs += report.repairs;
        restores += report.restores;
        joins += report.joins;
        collected += report.tombstones_collected;
        commits += report.topology_commits;
        refusals += report.topology_refusals;
        adoptions += report.topology_adoptions;
        siblings = siblings.max(report.siblings_max);
        assert!(report.writes_acked > 0 && report.delivered > 0);
        compacted += report.segments_compacted;
    }
    println!(
        "{generation:?}: {compacted} segments compacted, {repairs} repairs, {restores} restores, \
         {joins} joins, {collected} tombstones collected; topology: {commits} commits, {refusals} \
         refusals retried, {adoptions} adopted at handshake; at most {siblings} siblings"
    );
    if seeds(default).count() >= 20 {
        assert!(compacted > 0, "compaction under the retention horizon never ran");
        assert!(repairs > 0 && restores > 0 && collected > 0, "the schedule missed a fault class");
        assert!(commits > 0 && refusals > 0, "topology changes were never refused and retried");
        assert!(siblings > 1, "concurrent policy writes never made siblings");
        assert!(generation != Generation::G3 || joins > 0, "no appliance joined");
    }
}

/// Seeds beyond the default range that once failed, each for a bug since mended
/// (found by running seeds 200-5,209 of both generations): a stale `NotCovered` left
/// its sender on its old view of the peer, repeating it for good (G3 556, 614, 1756
/// among eleven) or never sending the origins it skipped (G3 2564); a delete
/// acknowledged before a restore from backup was no longer counted as superseding
/// (G4 663, 1722); a topology commit lost on its way to every appliance (G4 582,
/// 1490).
#[test]
fn seeds_that_found_bugs_converge() {
    let seeds = [(Generation::G3, [556, 614, 1756, 2564]), (Generation::G4, [663, 1722, 582, 1490])];
    for (generation, list) in seeds {
        for seed in list {
            converges(generation, seed);
        }
    }
}

#[test]
fn g3_converges_under_faults() {
    run_many(Generation::G3, 200);
}

#[test]
fn g4_converges_under_faults() {
    run_many(Generation::G4, 100);
}

#[test]
fn the_same_seed_replays_the_same_trace() {
    let opts = SimOptions { writes: 80, ..SimOptions::new(42, Generation::G3) };
    let a = simulate(opts.clone());
    let b = simulate(opts);
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.delivered, b.delivered);
}

#[test]
fn without_faults_each_write_crosses_the_network_about_once_per_replica() {
    let r = simulate(SimOptions { writes: 300, faults: false, ..SimOptions::new(7, Generation::G3) });
    assert!(r.violations.is_empty(), "{:?}", r.violations);
    // (The appliance that joins mid-run gets what came before by snapshot.)
    let sent = r.entries_sent + r.repair_entries;
    let ratio = sent as f64 / r.replica_deliveries_needed as f64;
    println!(
        "steady state: {sent} entries sent ({} by snapshot) for {} replica deliveries needed ({ratio:.2}x), \
         {} relayed",
        r.repair_entries, r.replica_deliveries_needed, r.entries_relayed
    );
    assert!((0.99..1.2).contains(&ratio), "ratio {ratio}");
}

#[test]
fn the_simulator_catches_a_planted_ordering_bug() {
    let caught = (0..30).any(|seed| {
        let r = simulate(SimOptions { skip_order_check: true, ..SimOptions::new(seed, Generation::G3) });
        !r.violations.is_empty()
    });
    assert!(caught, "with the ordering check off, no seed found a lost or diverged write");
}

#[test]
fn the_simulator_catches_shipping_a_non_durable_entry() {
    // Since retransmissions back off (a peer that stays silent is resent its window
    // after 0.3, 0.6, 1.2 s ...), the schedules that expose the bug are rarer: of seeds
    // 0..400, 45, 65, 85, 92 and 8 more catch it (before, one below 40 did).
    let caught = (0..60).any(|seed| {
        let r = simulate(SimOptions {
            writes: 150,
            ship_buffered: true,
            ..SimOptions::new(seed, Generation::G3)
        });
        !r.violations.is_empty()
    });
    assert!(caught, "with buffered entries shipped before they are durable, no seed found a divergence");
}

#[test]
fn the_simulator_catches_tombstones_collected_too_early() {
    let caught = (0..200).any(|seed| {
        let r =
            simulate(SimOptions { collect_tombstones_early: true, ..SimOptions::new(seed, Generation::G3) });
        if !r.violations.is_empty() {
            println!("early collection caught at seed {seed}: {:?}", r.violations);
        }
        !r.violations.is_empty()
    });
    assert!(caught, "with tombstones collected before every replica saw them, no seed found a resurrection");
}
