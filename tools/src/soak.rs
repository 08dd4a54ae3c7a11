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

use crate::demo::{agent_work, audit_details, converge, missing_on, Acked, Demo, DemoError, G4_LAYOUT};

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
}

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
    println!(
        "repl-soak: {} appliances ({}), {} s under faults, seed {seed}; files in {}",
        layout.len(),
        if args.g4 { "G4" } else { "G3" },
        args.duration,
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
    let mut csv = String::from("t_s,acked_ops,failed_ops,faults");
    for id in &ids {
        let _ = write!(csv, ",{id}_rss_kib,{id}_fds");
    }
    csv.push('\n');
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    let mut down: Vec<(usize, Instant, &'static str)> = Vec::new();
    let mut next_fault = start + Duration::from_secs(2);
    let mut faults = 0u64;
    let mut events = Vec::new();
    let mut last_sample = start;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        // Heal faults whose time is up.
        let mut healed = Vec::new();
        for (i, until, kind) in &down {
            if now >= *until {
                match *kind {
                    "kill" => {
                        demo.start(*i)?;
                        demo.wait_ready(*i).await?;
                    }
                    _ => demo.signal(*i, rustix::process::Signal::CONT),
                }
                events.push(format!("{:>6.1}s {} back", now.duration_since(start).as_secs_f64(), ids[*i]));
                healed.push(*i);
            }
        }
        down.retain(|(i, _, _)| !healed.contains(i));
        // A new fault, on a site with nothing down.
        if now >= next_fault {
            let candidates: Vec<usize> = faultable
                .iter()
                .copied()
                .filter(|&i| !down.iter().any(|(d, _, _)| site_of(*d) == site_of(i)))
                .collect();
            if !candidates.is_empty() {
                let i = candidates[rng.below(candidates.len() as u64) as usize];
                let length = Duration::from_millis(1_000 + rng.below(3_000));
                let kind = if rng.below(2) == 0 { "kill" } else { "pause" };
                match kind {
                    "kill" => demo.kill(i)?,
                    _ => demo.signal(i, rustix::process::Signal::STOP),
                }
                faults += 1;
                events.push(format!(
                    "{:>6.1}s {} {kind} for {:?}",
                    now.duration_since(start).as_secs_f64(),
                    ids[i],
                    length
                ));
                down.push((i, now + length, kind));
            }
            next_fault = now + Duration::from_millis(2_000 + rng.below(4_000));
        }
        if now.duration_since(last_sample) >= Duration::from_secs(1) {
            last_sample = now;
            let (ops, failed) = {
                let a = acked.lock().unwrap_or_else(|p| p.into_inner());
                (a.ops, a.failed)
            };
            let _ =
                write!(csv, "{:.1},{ops},{failed},{}", now.duration_since(start).as_secs_f64(), down.len());
            for i in 0..ids.len() {
                let (rss, fds) = demo.pid(i).map_or((0, 0), proc_stat);
                let _ = write!(csv, ",{rss},{fds}");
            }
            csv.push('\n');
            if now.duration_since(start).as_secs() % 10 == 0 {
                println!(
                    "  {:>4} s: {ops} operations acknowledged, {failed} failed, {faults} faults, {} down",
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
    for (i, _, kind) in down.drain(..) {
        match kind {
            "kill" => {
                demo.start(i)?;
                demo.wait_ready(i).await?;
            }
            _ => demo.signal(i, rustix::process::Signal::CONT),
        }
    }
    let csv_path = demo.dir().join("soak.csv");
    let kept = args.dir.is_some();
    std::fs::write(&csv_path, &csv)
        .map_err(|e| DemoError::Setup(format!("write {}: {e}", csv_path.display())))?;

    // Verify.
    let mut violations = Vec::new();
    for stream in StreamId::ALL {
        if let Err(e) = converge(&demo, stream, Duration::from_secs(120)).await {
            violations.push(e);
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
            let mut missing = 0;
            for s in list {
                match reader.get(Collection::Sessions, s.as_bytes()).await {
                    Ok((values, _)) if !values.is_empty() => {}
                    _ => missing += 1,
                }
            }
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
