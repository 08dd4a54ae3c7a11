//! 10,000 agents over a 2-site G4 and a 3-site G3 enterprise: sessions spread over
//! the appliances of each site, appliances and a whole site are killed and restored,
//! and the report gives the load spread per site (max/mean, goal under 1.1 in steady
//! state) and how many agents needed re-authentication in each scenario. Run with
//! `cargo test -p repl-tests --test routing_simulation -- --nocapture` for the report.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use repl_engine::routing::{Agent, AgentConfig, Reauth, SeededRandom, Session};
use repl_engine::topology::{Appliance, ExternalServers, Generation, Role, Site, SiteKind, Topology};
use repl_tests::seed_from_env;
use repl_wire::NodeId;

const AGENTS: usize = 10_000;
const HOUR_MS: u64 = 3_600_000;

fn topology(generation: Generation, sites: &[(&str, &[&str], &str, Option<&str>)]) -> Topology {
    let mut appliances = Vec::new();
    let mut port = 7000;
    for (site, members, _, _) in sites.iter() {
        for (j, m) in members.iter().enumerate() {
            port += 1;
            let roles: BTreeSet<Role> = match generation {
                Generation::G4 if j == 0 => [Role::Database].into_iter().collect(),
                Generation::G4 => [Role::Service].into_iter().collect(),
                Generation::G3 if j == 0 => [Role::Audit].into_iter().collect(),
                Generation::G3 => BTreeSet::new(),
            };
            appliances.push(Appliance {
                id: NodeId::new(*m).expect("id"),
                name: m.to_string(),
                site: site.to_string(),
                address: SocketAddr::from(([127, 0, 0, 1], port)),
                roles,
            });
        }
    }
    let t = Topology {
        enterprise: "sim".into(),
        generation,
        epoch: 1,
        external: ExternalServers::default(),
        bootstrap: Some(appliances[0].id.clone()),
        sites: sites
            .iter()
            .enumerate()
            .map(|(i, (id, _, primary, secondary))| Site {
                id: id.to_string(),
                name: id.to_string(),
                kind: SiteKind::Active,
                ranges: vec![format!("10.{}.0.0/16", i + 1).parse().expect("range")],
                primary_failover: Some(primary.to_string()),
                secondary_failover: secondary.map(str::to_string),
                external: None,
            })
            .collect(),
        appliances,
    };
    assert!(t.validate().is_ok(), "{:?}", t.validate());
    t
}

struct Sim {
    topology: Topology,
    agents: Vec<Agent>,
    sessions: Vec<Option<Session>>,
    down: BTreeSet<NodeId>,
    rng: SeededRandom,
}

impl Sim {
    fn new(topology: Topology, seed: u64) -> Sim {
        let sites = topology.sites.len();
        let bootstrap = topology.bootstrap.clone().expect("bootstrap");
        let agents = (0..AGENTS)
            .map(|i| {
                let site = i % sites;
                let host =
                    IpAddr::V4(Ipv4Addr::new(10, site as u8 + 1, (i / 256 % 256) as u8, (i % 256) as u8));
                let mut a = Agent::new(
                    AgentConfig { bootstrap: bootstrap.clone(), retry_interval_ms: 60_000 },
                    host,
                    vec![],
                );
                a.receive_topology(topology.clone());
                a
            })
            .collect();
        Sim {
            topology,
            agents,
            sessions: vec![None; AGENTS],
            down: BTreeSet::new(),
            rng: SeededRandom::new(seed),
        }
    }

    /// Every agent (re)starts its session: logout/login goes through rule 4 again.
    fn login_all(&mut self, now: u64) {
        for i in 0..AGENTS {
            let attempt = self.agents[i].plan_new_session(now, &mut self.rng);
            let served = attempt.candidates.iter().find(|c| !self.down.contains(&c.appliance)).cloned();
            self.sessions[i] = match served {
                Some(c) => Some(self.agents[i].session_started(&attempt, &c, now)),
                None => {
                    self.agents[i].attempt_failed(now);
                    None
                }
            };
        }
    }

    /// Kills appliances; their sessions fail over. Returns (moved, re-authenticated).
    fn kill(&mut self, ids: &[&str], now: u64) -> (usize, usize) {
        self.down.extend(ids.iter().map(|i| NodeId::new(*i).expect("id")));
        let (mut moved, mut reauth) = (0, 0);
        for i in 0..AGENTS {
            let Some(session) = self.sessions[i].clone() else { continue };
            if !self.down.contains(&session.appliance) {
                continue;
            }
            let attempt = self.agents[i].plan_session_failover(&session, now, &mut self.rng);
            let served = attempt.candidates.iter().find(|c| !self.down.contains(&c.appliance)).cloned();
            self.sessions[i] = served.map(|c| {
                moved += 1;
                if Agent::reauth(&session, &c, now, None) == Reauth::Required {
                    reauth += 1;
                }
                Session { appliance: c.appliance, site: c.site, home_site: session.home_site.clone() }
            });
        }
        (moved, reauth)
    }

    fn restore(&mut self, ids: &[&str]) {
        for id in ids {
            self.down.remove(&NodeId::new(*id).expect("id"));
        }
    }

    /// Per site: max/mean of sessions over the site's live appliances.
    fn spread(&self) -> BTreeMap<String, f64> {
        let mut load: BTreeMap<&NodeId, usize> = BTreeMap::new();
        for s in self.sessions.iter().flatten() {
            *load.entry(&s.appliance).or_default() += 1;
        }
        self.topology
            .sites
            .iter()
            .map(|site| {
                let counts: Vec<usize> = self
                    .topology
                    .appliances_of(&site.id)
                    .filter(|a| !self.down.contains(&a.id))
                    .map(|a| load.get(&a.id).copied().unwrap_or(0))
                    .collect();
                let mean = counts.iter().sum::<usize>() as f64 / counts.len().max(1) as f64;
                let max = counts.iter().copied().max().unwrap_or(0) as f64;
                (site.id.clone(), if mean > 0.0 { max / mean } else { 0.0 })
            })
            .collect()
    }
}

fn report(name: &str, spread: &BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = spread.iter().map(|(s, r)| format!("{s} {r:.3}")).collect();
    format!("{name}: max/mean per site: {}", parts.join(", "))
}

#[test]
fn ten_thousand_agents_g4_two_sites() {
    let t = topology(
        Generation::G4,
        &[("east", &["db1", "s1"], "west", None), ("west", &["db2", "s2"], "east", None)],
    );
    let mut sim = Sim::new(t, seed_from_env(1));
    sim.login_all(0);
    let steady = sim.spread();
    println!("{}", report("G4 steady", &steady));
    assert!(steady.values().all(|r| *r < 1.1), "{steady:?}");
    let (moved, reauth) = sim.kill(&["db1"], HOUR_MS);
    println!("G4 kill db1: {moved} sessions moved, {reauth} needed re-authentication");
    assert!(moved > 2_000 && reauth == 0, "in-site failover needs no login");
    let (moved, reauth) = sim.kill(&["s1"], 2 * HOUR_MS);
    println!("G4 kill s1 (east down): {moved} sessions moved, {reauth} needed re-authentication");
    assert_eq!(moved, reauth, "every cross-site move asks for a login");
    sim.restore(&["db1", "s1"]);
    sim.login_all(6 * HOUR_MS);
    let after = sim.spread();
    println!("{}", report("G4 after restore and re-login", &after));
    assert!(after.values().all(|r| *r < 1.1), "{after:?}");
}

#[test]
fn ten_thousand_agents_g3_three_sites() {
    let t = topology(
        Generation::G3,
        &[
            ("a", &["a1", "a2", "a3"], "b", Some("c")),
            ("b", &["b1", "b2", "b3"], "c", Some("a")),
            ("c", &["c1", "c2"], "a", Some("b")),
        ],
    );
    let mut sim = Sim::new(t, seed_from_env(2));
    sim.login_all(0);
    let steady = sim.spread();
    println!("{}", report("G3 steady", &steady));
    assert!(steady.values().all(|r| *r < 1.1), "{steady:?}");
    let (moved, reauth) = sim.kill(&["a1"], HOUR_MS);
    println!("G3 kill a1: {moved} sessions moved, {reauth} needed re-authentication");
    assert_eq!(reauth, 0);
    let spread = sim.spread();
    println!("{}", report("G3 with a1 down", &spread));
    let (moved, reauth) = sim.kill(&["a2", "a3"], 2 * HOUR_MS);
    println!("G3 kill site a: {moved} sessions moved, {reauth} needed re-authentication");
    assert_eq!(moved, reauth);
    let (moved, reauth) = sim.kill(&["b1", "b2", "b3"], 3 * HOUR_MS);
    println!("G3 then kill site b: {moved} sessions moved, {reauth} needed re-authentication");
    sim.restore(&["a1", "a2", "a3", "b1", "b2", "b3"]);
    sim.login_all(8 * HOUR_MS);
    let after = sim.spread();
    println!("{}", report("G3 after restore and re-login", &after));
    assert!(after.values().all(|r| *r < 1.1), "{after:?}");
}
