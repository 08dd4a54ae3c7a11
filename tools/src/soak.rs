//! `repl-soak`: real `repld` processes under faults for as long as asked, then proof
//! that nothing acknowledged was lost.
//!
//! It starts an enterprise (G3: 2 sites x 3 appliances; `--g4`: 2 database and 2
//! service appliances), drives agents that write unique users, policies, enrollments,
//! sessions and audit events through the client protocol, and meanwhile, at seeded
//! random intervals, SIGKILLs and restarts appliances and SIGSTOPs and resumes them
//! (one fault at a time per site, so agents always have an appliance to fail over
//! to). At the end it heals everything and checks: replicas agree (hash-tree roots at
//! equal vectors), every acknowledged write is on every appliance that should hold
//! it, every session is readable in its site, every audit record is on every holder.
//! Partitions and bad networks come from the kernel when the soak runs as root
//! (`--network netns`, the default then: every appliance in a network namespace of
//! its own behind a router namespace, links cut by blackhole rules; see
//! [`crate::netns`]), else from a loopback UDP relay in front of every appliance
//! (`--network relay`: drops, delays, duplicates and reorders; see [`crate::relay`]).
//!
//! A CSV time series (acknowledged and failed operations per second, faults, memory
//! and open files of every appliance) is written beside the run. Exit 1 on any
//! violation.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use repl_engine::rng::SplitMix64;
use repl_engine::topology::Role;
use repl_wire::transport::Identity;
use repl_wire::{Collection, NodeId, StreamId};

use crate::demo::{
    agent_work, audit_details, converge, lacking, missing_on, Acked, Demo, DemoError, G4_LAYOUT,
};
use crate::netns::Namespaces;
use crate::relay::{Lossy, Relay};

/// Arguments of `repl-soak`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "repl-soak", version, about = "Soak a local repl enterprise under faults")]
pub struct SoakArgs {
    /// How long to run the workload under faults, in seconds.
    #[arg(long, default_value_t = 180)]
    pub duration: u64,
    /// A G4 enterprise instead of G3.
    #[arg(long)]
    pub g4: bool,
    /// Seed of the fault schedule (printed; replays the same schedule).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep everything (configs, data, logs, CSV) in this directory.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// How partitions are made: `netns` (root: network namespaces, cuts in the
    /// kernel), `relay` (a loopback UDP relay; also delays, duplicates, reorders), or
    /// `auto` (netns where it can, else relay).
    #[arg(long, value_enum, default_value_t = NetworkMode::Auto)]
    pub network: NetworkMode,
}

/// How `repl-soak` makes partitions and bad networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkMode {
    /// Network namespaces where this process may make them, else the relay.
    Auto,
    /// Network namespaces (needs root and iproute2).
    Netns,
    /// A loopback UDP relay in front of every appliance.
    Relay,
}

/// The network between the appliances, and how it fails.
enum Network {
    Relay(Relay),
    Namespaces(Namespaces),
}

/// During a lossy period in namespaces: each direction of each pair of appliances
/// is cut for a tick with this probability, in percent.
const FLAP_PCT: u64 = 5;

impl Network {
    /// Builds the network the arguments ask for and places `demo`'s appliances in it.
    async fn create(mode: NetworkMode, demo: &mut Demo, seed: u64) -> Result<Network, DemoError> {
        let namespaces = match mode {
            NetworkMode::Netns => true,
            NetworkMode::Relay => false,
            NetworkMode::Auto => crate::netns::available(),
        };
        if namespaces {
            let ids = demo.ids();
            let names: Vec<&str> = ids.iter().map(NodeId::as_str).collect();
            let ns = Namespaces::create(&names).map_err(|e| DemoError::Setup(format!("namespaces: {e}")))?;
            // Each appliance on its own address, all on the product's peer port.
            let placement =
                (0..ids.len()).map(|i| ((ns.address(i), PEER_PORT).into(), ns.name(i).to_string())).collect();
            demo.place(placement)?;
            Ok(Network::Namespaces(ns))
        } else {
            let addresses = demo.interpose()?;
            let relay = Relay::start(&addresses, seed ^ 0x5eed)
                .await
                .map_err(|e| DemoError::Setup(format!("relays: {e}")))?;
            Ok(Network::Relay(relay))
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Network::Relay(_) => "a loopback UDP relay per appliance",
            Network::Namespaces(_) => "a network namespace per appliance behind a router namespace",
        }
    }

    /// Applies one change of the links: `relay` on the relay, `namespaces` on the
    /// namespaces (only the latter runs commands that can fail).
    fn change(
        &self,
        relay: impl FnOnce(&Relay),
        namespaces: impl FnOnce(&Namespaces) -> Result<(), crate::netns::NetnsError>,
    ) -> Result<(), DemoError> {
        match self {
            Network::Relay(r) => {
                relay(r);
                Ok(())
            }
            Network::Namespaces(n) => namespaces(n).map_err(|e| DemoError::Setup(format!("network: {e}"))),
        }
    }

    fn isolate(&self, i: usize) -> Result<(), DemoError> {
        self.change(|r| r.isolate(i), |n| n.isolate(i))
    }

    fn rejoin(&self, i: usize) -> Result<(), DemoError> {
        self.change(|r| r.rejoin(i), |n| n.rejoin(i))
    }

    /// Ends every fault of the network, a lossy period included.
    fn heal(&self) -> Result<(), DemoError> {
        self.change(Relay::heal, Namespaces::heal)
    }

    /// Starts a lossy period.
    fn lossy_start(&self, rng: &mut SplitMix64) -> Result<(), DemoError> {
        self.change(|r| r.set_lossy(Some(LOSSY)), |n| n.flap(FLAP_PCT, rng))
    }

    /// Each tick of a lossy period: namespaces draw new flapping links.
    fn lossy_tick(&self, rng: &mut SplitMix64) -> Result<(), DemoError> {
        self.change(|_| {}, |n| n.flap(FLAP_PCT, rng))
    }

    /// Ends a lossy period.
    fn lossy_end(&self) -> Result<(), DemoError> {
        self.change(|r| r.set_lossy(None), Namespaces::end_flapping)
    }

    fn lossy_description(&self) -> String {
        match self {
            Network::Relay(_) => format!(
                "{}% loss, {}% duplicates, 0-{} ms delay",
                LOSSY.drop_pct, LOSSY.duplicate_pct, LOSSY.delay_max_ms
            ),
            Network::Namespaces(_) => format!("each link direction cut {FLAP_PCT}% of 100 ms ticks"),
        }
    }

    /// The CSV column of the network's state, and its value now.
    fn column(&self) -> (&'static str, u64) {
        match self {
            Network::Relay(r) => ("packets_dropped", r.stats().dropped),
            Network::Namespaces(n) => ("links_cut", n.links_cut() as u64),
        }
    }

    fn report(&self) -> String {
        match self {
            Network::Relay(r) => {
                let s = r.stats();
                format!(
                    "relays: {} packets dropped (partitions and loss), {} duplicated, {} delayed",
                    s.dropped, s.duplicated, s.delayed
                )
            }
            Network::Namespaces(n) => format!(
                "namespaces: {} blackhole rules added or removed in the router (partitions and flapping links)",
                n.rule_changes()
            ),
        }
    }
}

/// The port appliances listen on inside their namespaces (the product's peer port).
const PEER_PORT: u16 = 7809;

/// The soak's G3 enterprise: two sites of three appliances, one audit holder each.
pub const SOAK_G3: &[(&str, &str, &[Role])] = &[
    ("a1", "a", &[Role::Audit]),
    ("a2", "a", &[]),
    ("a3", "a", &[]),
    ("b1", "b", &[Role::Audit]),
    ("b2", "b", &[]),
    ("b3", "b", &[]),
];

fn proc_stat(pid: u32) -> (u64, u64) {
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (rss_kib, fds)
}

/// A fault of one appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL, restarted when the fault ends.
    Kill,
    /// SIGSTOP, SIGCONT when it ends.
    Pause,
    /// Cut from every other appliance by the relays (its agents still reach it).
    Isolate,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Isolate => "isolate",
        }
    }

    fn colour(self) -> crate::plot::Rgb {
        match self {
            Fault::Kill => [255, 190, 190],
            Fault::Pause => [255, 235, 170],
            Fault::Isolate => [190, 215, 255],
        }
    }
}

/// The network while a lossy period lasts: every packet between appliances.
const LOSSY: Lossy = Lossy { drop_pct: 5, duplicate_pct: 2, delay_max_ms: 20 };

/// The largest replication lag any running appliance reports, in milliseconds.
async fn max_lag_ms(demo: &Demo, running: impl Iterator<Item = usize>) -> u64 {
    let mut worst = 0.0f64;
    for i in running {
        let Ok(text) = demo.metrics_get(i, "/metrics").await else { continue };
        for line in text.lines().filter(|l| l.starts_with("repl_lag_seconds{")) {
            if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                worst = worst.max(v);
            }
        }
    }
    (worst * 1000.0) as u64
}

/// What the chart shows.
#[derive(Default)]
struct Series {
    /// (seconds, operations acknowledged so far, largest lag in ms).
    samples: Vec<(f64, u64, u64)>,
    /// Appliance faults: (from, to, kind).
    faults: Vec<(f64, f64, Fault)>,
    /// Lossy network periods.
    lossy: Vec<(f64, f64)>,
}

const LOSSY_COLOUR: crate::plot::Rgb = [215, 215, 215];

/// Throughput and lag over time, faults shaded, as a PNG.
fn draw(series: &Series, duration_s: f64, path: &std::path::Path) -> std::io::Result<()> {
    use crate::plot::{chart, Band, Panel};
    let ops: Vec<(f64, f64)> = series
        .samples
        .windows(2)
        .map(|w| (w[1].0, (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0).max(0.001)))
        .collect();
    let lag: Vec<(f64, f64)> = series.samples.iter().map(|s| (s.0, s.2 as f64)).collect();
    let mut bands: Vec<Band> = series
        .lossy
        .iter()
        .map(|&(from_s, to_s)| Band { from_s, to_s, colour: LOSSY_COLOUR, strip: true })
        .collect();
    bands.extend(series.faults.iter().map(|&(from_s, to_s, f)| Band {
        from_s,
        to_s,
        colour: f.colour(),
        strip: false,
    }));
    chart(
        path,
        duration_s,
        &[
            Panel { title: "OPERATIONS/S", points: &ops, colour: [20, 60, 200] },
            Panel { title: "LAG MS", points: &lag, colour: [200, 30, 30] },
        ],
        &bands,
        &[
            ("KILL", Fault::Kill.colour()),
            ("PAUSE", Fault::Pause.colour()),
            ("ISOLATE", Fault::Isolate.colour()),
            ("LOSSY", LOSSY_COLOUR),
        ],
    )
}

/// Memory and open files of one appliance since it last started, after warm-up:
/// a violation if open files grew by more than 10% (and 2), or memory by more than
/// 10% plus [`RSS_BUDGET_PER_OP`] for each operation acknowledged meanwhile (the data
/// set grows with every write: the keydir, indexes and remembered answers).
fn flatness(id: &str, run: &[(f64, u64, u64)], ops_at: impl Fn(f64) -> u64) -> (String, Option<String>) {
    let (Some(first), Some(last)) = (run.first(), run.last()) else {
        return (format!("{id}: no sample after warm-up"), None);
    };
    if last.0 - first.0 < 10.0 {
        return (format!("{id}: under 10 s after warm-up since its last start"), None);
    }
    let ops = ops_at(last.0).saturating_sub(ops_at(first.0));
    let grown_kib = last.1.saturating_sub(first.1);
    let allowed_kib = first.1 / 10 + ops * RSS_BUDGET_PER_OP / 1024;
    let line = format!(
        "{id}: RSS {} -> {} MiB over {:.0} s ({} B per operation acknowledged meanwhile, budget {} B), open files {} -> {}",
        first.1 / 1024,
        last.1 / 1024,
        last.0 - first.0,
        (grown_kib * 1024).checked_div(ops).unwrap_or(0),
        RSS_BUDGET_PER_OP,
        first.2,
        last.2
    );
    let mut problems = Vec::new();
    if grown_kib > allowed_kib {
        problems.push(format!("{id}: memory grew {grown_kib} KiB, allowed {allowed_kib} KiB"));
    }
    if last.2 > first.2 + (first.2 / 10).max(2) {
        problems.push(format!("{id}: open files grew from {} to {}", first.2, last.2));
    }
    (line, (!problems.is_empty()).then(|| problems.join("; ")))
}

/// Memory an appliance may gain per acknowledged operation (of all appliances) and
/// still count as flat. Each operation adds data every holder keeps in memory: a
/// keydir entry (about 200 bytes per key in the store bench), the remembered answer
/// of the request (an expiring record), audit index entries on holders, the hash
/// tree's share. Measured in 40 s runs: 1.3 to 2.0 KB per operation. A leak per
/// packet, per connection or per fault grows far faster than the operations do.
const RSS_BUDGET_PER_OP: u64 = 4096;

/// How long a killed appliance may take to answer after its restart.
const RESTART_READY_MAX: Duration = Duration::from_secs(60);

/// Seconds after a restarted appliance answers before its resources are counted.
const RESTART_WARM_S: f64 = 5.0;

/// Ends `fault` of appliance `i`.
async fn heal(demo: &mut Demo, network: &Network, i: usize, fault: Fault) -> Result<(), DemoError> {
    match fault {
        Fault::Kill => {
            demo.start(i)?;
            demo.wait_ready(i).await?;
        }
        Fault::Pause => demo.signal(i, rustix::process::Signal::CONT),
        Fault::Isolate => network.rejoin(i)?,
    }
    Ok(())
}

/// Runs the soak; returns the report, or the violations.
pub async fn run(args: SoakArgs) -> Result<String, DemoError> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let exe = std::env::current_exe()
        .map_err(|e| DemoError::Setup(format!("own executable: {e}")))?
        .with_file_name("repld");
    let layout = if args.g4 { G4_LAYOUT } else { SOAK_G3 };
    let mut demo = Demo::create(exe, args.dir.clone(), args.g4, layout)?;
    // Every appliance behind a relay or in a namespace, for partitions and a lossy network.
    let network = Network::create(args.network, &mut demo, seed).await?;
    println!(
        "repl-soak: {} appliances ({}), {} s under faults, seed {seed}; {}; files in {}",
        layout.len(),
        if args.g4 { "G4" } else { "G3" },
        args.duration,
        network.describe(),
        demo.dir().display()
    );
    for i in 0..layout.len() {
        demo.start(i)?;
    }
    for i in 0..layout.len() {
        demo.wait_ready(i).await?;
    }
    let ids = demo.ids();
    let site_of = |i: usize| layout[i].1;
    // Agents reach the appliances of their site (G4: the service appliances).
    let mut agents = Vec::new();
    for site in ["a", "b"] {
        let targets: Vec<&NodeId> = (0..layout.len())
            .filter(|&i| site_of(i) == site && (!args.g4 || layout[i].2.contains(&Role::Service)))
            .map(|i| &ids[i])
            .collect();
        let client = demo.client(Identity::Client(format!("agent-{site}")), &targets)?;
        agents.push((site.to_string(), client));
    }
    // What may fail: G3 any appliance; G4 the database and service appliances, one
    // fault at a time per site.
    let faultable: Vec<usize> = (0..layout.len()).collect();

    let acked = Arc::new(std::sync::Mutex::new(Acked::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for (site, client) in &agents {
        for w in 0..4u32 {
            let (client, site, acked, stop, progress) =
                (client.clone(), site.clone(), acked.clone(), stop.clone(), progress.clone());
            workers.push(tokio::spawn(async move {
                let mut round = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    // Unique ids: writer w, round r, 20 writes per round.
                    agent_work(
                        client.clone(),
                        site.clone(),
                        1000 + w,
                        round * 20,
                        20,
                        acked.clone(),
                        progress.clone(),
                    )
                    .await;
                    round += 1;
                }
            }));
        }
    }

    let mut rng = SplitMix64::new(seed);
    // Flapping links draw from their own generator: the fault schedule is the same
    // for a seed whichever network the soak runs on.
    let mut flap_rng = SplitMix64::new(seed ^ 0xf1a9);
    let mut csv = format!("t_s,acked_ops,failed_ops,faults,lossy,lag_ms,{}", network.column().0);
    for id in &ids {
        let _ = write!(csv, ",{id}_rss_kib,{id}_fds");
    }
    csv.push('\n');
    let start = Instant::now();
    let secs_since = |t: Instant| t.duration_since(start).as_secs_f64();
    let deadline = start + Duration::from_secs(args.duration);
    let mut down: Vec<(usize, Instant, Fault)> = Vec::new();
    // Killed appliances started again, not answering yet: (index, restarted at).
    let mut starting: Vec<(usize, Instant)> = Vec::new();
    let mut next_fault = start + Duration::from_secs(2);
    let mut lossy_until: Option<Instant> = None;
    let mut next_lossy = start + Duration::from_millis(8_000 + rng.below(8_000));
    let mut faults = 0u64;
    let mut events = Vec::new();
    let mut plot = Series::default();
    // Per appliance: (seconds, RSS KiB, open files) since it last started.
    let mut runs: Vec<Vec<(f64, u64, u64)>> = vec![Vec::new(); ids.len()];
    let mut last_sample = start;
    // Resources count from here on, per appliance: after the run's warm-up (a fifth
    // of it, at least 10 s), or a while after a restart.
    let warm_s = (args.duration as f64 / 5.0).max(10.0);
    let mut warm_after = vec![warm_s; ids.len()];
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        // Heal faults whose time is up.
        // (A killed appliance is started again without waiting for it: the schedule
        // and the samples go on while it recovers; it is back once it answers.)
        let mut healed = Vec::new();
        for (i, until, fault) in &down {
            if now >= *until {
                if *fault == Fault::Kill {
                    demo.start(*i)?;
                    runs[*i].clear();
                    starting.push((*i, now));
                } else {
                    heal(&mut demo, &network, *i, *fault).await?;
                    events.push(format!("{:>6.1}s {} back", secs_since(now), ids[*i]));
                }
                healed.push(*i);
            }
        }
        down.retain(|(i, _, _)| !healed.contains(i));
        let mut ready = Vec::new();
        for (i, since) in &starting {
            if demo.ready(*i).await? {
                events.push(format!(
                    "{:>6.1}s {} back (ready {:.1} s after its restart)",
                    secs_since(now),
                    ids[*i],
                    now.duration_since(*since).as_secs_f64()
                ));
                ready.push(*i);
                // Its recovery rebuilt the keydir: counted from a while after that.
                warm_after[*i] = secs_since(now) + RESTART_WARM_S;
            } else if now.duration_since(*since) > RESTART_READY_MAX {
                return Err(DemoError::Appliance(
                    ids[*i].to_string(),
                    "not ready within 60 s of its restart".into(),
                ));
            }
        }
        starting.retain(|(i, _)| !ready.contains(i));
        // A new fault, on a site with nothing down.
        if now >= next_fault {
            let candidates: Vec<usize> = faultable
                .iter()
                .copied()
                .filter(|&i| !down.iter().any(|(d, _, _)| site_of(*d) == site_of(i)))
                .filter(|&i| !starting.iter().any(|(d, _)| site_of(*d) == site_of(i)))
                .collect();
            if !candidates.is_empty() {
                let i = candidates[rng.below(candidates.len() as u64) as usize];
                let length = Duration::from_millis(1_000 + rng.below(3_000));
                let fault = [Fault::Kill, Fault::Pause, Fault::Isolate][rng.below(3) as usize];
                match fault {
                    Fault::Kill => demo.kill(i)?,
                    Fault::Pause => demo.signal(i, rustix::process::Signal::STOP),
                    Fault::Isolate => network.isolate(i)?,
                }
                faults += 1;
                events.push(format!("{:>6.1}s {} {} for {length:?}", secs_since(now), ids[i], fault.name()));
                plot.faults.push((secs_since(now), secs_since(now + length), fault));
                down.push((i, now + length, fault));
            }
            next_fault = now + Duration::from_millis(2_000 + rng.below(4_000));
        }
        // Now and then a lossy network for everyone: loss, duplicates, reordering.
        if lossy_until.is_some_and(|t| now >= t) {
            network.lossy_end()?;
            lossy_until = None;
            events.push(format!("{:>6.1}s network clean again", secs_since(now)));
        }
        if lossy_until.is_none() && now >= next_lossy {
            let length = Duration::from_millis(2_000 + rng.below(4_000));
            network.lossy_start(&mut flap_rng)?;
            lossy_until = Some(now + length);
            next_lossy = now + length + Duration::from_millis(8_000 + rng.below(12_000));
            faults += 1;
            events.push(format!(
                "{:>6.1}s network lossy for {length:?} ({})",
                secs_since(now),
                network.lossy_description()
            ));
            plot.lossy.push((secs_since(now), secs_since(now + length)));
        } else if lossy_until.is_some() {
            network.lossy_tick(&mut flap_rng)?;
        }
        if now.duration_since(last_sample) >= Duration::from_secs(1) {
            last_sample = now;
            let (ops, failed) = {
                let a = acked.lock().unwrap_or_else(|p| p.into_inner());
                (a.ops, a.failed)
            };
            // Stopped, killed or not answering yet: no lag to ask for, no resources to count.
            let paused: Vec<usize> = down
                .iter()
                .filter(|(_, _, f)| *f != Fault::Isolate)
                .map(|(i, _, _)| *i)
                .chain(starting.iter().map(|(i, _)| *i))
                .collect();
            let lag_ms = max_lag_ms(&demo, (0..ids.len()).filter(|i| !paused.contains(i))).await;
            let t = secs_since(now);
            plot.samples.push((t, ops, lag_ms));
            let _ = write!(
                csv,
                "{t:.1},{ops},{failed},{},{},{lag_ms},{}",
                down.len(),
                u8::from(lossy_until.is_some()),
                network.column().1
            );
            for (i, run) in runs.iter_mut().enumerate() {
                let (rss, fds) = demo.pid(i).map_or((0, 0), proc_stat);
                let _ = write!(csv, ",{rss},{fds}");
                if rss > 0 && !paused.contains(&i) && t >= warm_after[i] {
                    run.push((t, rss, fds));
                }
            }
            csv.push('\n');
            if now.duration_since(start).as_secs() % 10 == 0 {
                println!(
                    "  {:>4} s: {ops} operations acknowledged, {failed} failed, {faults} faults, {} down, lag {lag_ms} ms",
                    now.duration_since(start).as_secs(),
                    down.len()
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    // Heal everything.
    for (i, _, fault) in down.drain(..) {
        heal(&mut demo, &network, i, fault).await?;
    }
    for (i, _) in starting.drain(..) {
        demo.wait_ready(i).await?;
    }
    network.heal()?;
    let csv_path = demo.dir().join("soak.csv");
    let kept = args.dir.is_some();
    std::fs::write(&csv_path, &csv)
        .map_err(|e| DemoError::Setup(format!("write {}: {e}", csv_path.display())))?;

    let png_path = demo.dir().join("soak.png");
    draw(&plot, args.duration as f64, &png_path)
        .map_err(|e| DemoError::Setup(format!("write {}: {e}", png_path.display())))?;

    // Verify.
    let mut violations = Vec::new();
    // Memory and open files flat after warm-up (a fifth of the run, at least 10 s).
    let ops_at = |t: f64| plot.samples.iter().take_while(|s| s.0 <= t).last().map_or(0, |s| s.1);
    let mut resources = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let (line, problem) = flatness(ids[i].as_str(), run, ops_at);
        resources.push(line);
        violations.extend(problem);
    }
    // How long each stream took to agree everywhere once healed.
    let mut converged = Vec::new();
    for stream in StreamId::ALL {
        match converge(&demo, stream, Duration::from_secs(120)).await {
            Ok(took) => converged.push(format!("{stream} {:.1} s", took.as_secs_f64())),
            Err(e) => violations.push(e),
        }
    }
    let (enterprise, sessions, audit, ops, failed) = {
        let a = acked.lock().unwrap_or_else(|p| p.into_inner());
        (a.enterprise.clone(), a.sessions.clone(), a.audit.clone(), a.ops, a.failed)
    };
    for id in demo.holders(StreamId::Enterprise) {
        let lost = missing_on(&demo, &id, &enterprise).await?;
        if lost > 0 {
            violations
                .push(format!("{id} lacks {lost} of {} acknowledged enterprise records", enterprise.len()));
        }
    }
    for (site, list) in &sessions {
        let holders = demo.holders(StreamId::Sessions);
        let in_site =
            |id: &&NodeId| args.g4 || (0..layout.len()).any(|i| &ids[i] == *id && site_of(i) == site);
        for id in holders.iter().filter(in_site) {
            let reader = demo.client(Identity::Client("checker".into()), &[id])?;
            let keys = list.iter().map(|s| (Collection::Sessions, s.as_bytes().to_vec(), None)).collect();
            let missing = lacking(&reader, keys).await?;
            if missing > 0 {
                violations.push(format!("{id} lacks {missing} of site {site}'s {} sessions", list.len()));
            }
        }
    }
    for id in demo.holders(StreamId::Audit) {
        let held = audit_details(&demo, &id).await?;
        let missing = audit.iter().filter(|d| !held.contains(d.as_str())).count();
        if missing > 0 {
            violations.push(format!("audit holder {id} lacks {missing} of {} audit records", audit.len()));
        }
    }
    demo.stop_all().await;
    if !demo.all_passed() {
        violations.push("an appliance did not stop cleanly on SIGTERM".into());
    }
    let secs = args.duration.max(1) as f64;
    let mut report = format!(
        "repl-soak seed {seed}: {faults} faults in {} s; {ops} operations acknowledged ({:.0}/s), {failed} failed after retries; \
         {} enterprise records, {} sessions, {} audit records checked; time series {}\n",
        args.duration,
        ops as f64 / secs,
        enterprise.len(),
        sessions.values().map(Vec::len).sum::<usize>(),
        audit.len(),
        if kept { format!("in {}", csv_path.display()) } else { "not kept (give --dir DIR to keep it)".to_string() }
    );
    let _ = writeln!(report, "{}", network.report());
    let _ = writeln!(report, "replicas agreed after healing: {}", converged.join(", "));
    report.push_str("memory and open files after warm-up:\n");
    for line in &resources {
        let _ = writeln!(report, "  {line}");
    }
    let _ = writeln!(
        report,
        "chart (throughput, lag, faults shaded) {}",
        if kept { format!("in {}", png_path.display()) } else { "not kept".to_string() }
    );
    for e in &events {
        let _ = writeln!(report, "  {e}");
    }
    if violations.is_empty() {
        report.push_str("no violation: replicas agree, nothing acknowledged was lost\n");
        Ok(report)
    } else {
        print!("{report}");
        Err(DemoError::Checks { count: violations.len(), list: violations.join("; ") })
    }
}
