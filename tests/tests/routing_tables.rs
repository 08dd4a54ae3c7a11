//! Table tests of the agent routing rules: each file in `testdata/routing/` holds a
//! topology and cases; a case is a script of steps (new session, session failover,
//! topology change) with the appliances that are down at that step and what the
//! agent must decide, and why.

use std::collections::BTreeSet;
use std::path::Path;

use repl_engine::routing::{Agent, AgentConfig, Attempt, HomeReason, Reauth, SeededRandom, Session, Step};
use repl_engine::topology::{IpRange, Topology};
use repl_wire::NodeId;
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    topology: Topology,
    #[serde(rename = "case")]
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    host: String,
    #[serde(default)]
    routes: Vec<String>,
    #[serde(default)]
    seed: u64,
    #[serde(rename = "step")]
    steps: Vec<StepSpec>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StepSpec {
    at_h: f64,
    action: String,
    #[serde(default)]
    down: Vec<String>,
    expect_home: Option<String>,
    expect_reason: Option<String>,
    expect_steps: Option<Vec<String>>,
    expect_sites: Option<Vec<String>>,
    expect_served: Option<String>,
    expect_served_site: Option<String>,
    expect_offline: Option<bool>,
    expect_same_as_previous: Option<bool>,
    expect_reauth: Option<String>,
    grace_until_h: Option<f64>,
    expect_session_appliance: Option<String>,
    // For action = "topology": the change to apply (epoch + 1).
    set_ranges: Option<(String, Vec<String>)>,
    remove: Option<Vec<String>>,
}

fn step_name(s: Step) -> &'static str {
    match s {
        Step::Chosen => "chosen",
        Step::HomeSite => "home-site",
        Step::SessionSite => "session-site",
        Step::PrimaryFailover => "primary-failover",
        Step::SecondaryFailover => "secondary-failover",
        Step::Bootstrap => "bootstrap",
    }
}

fn hours(h: f64) -> u64 {
    (h * 3_600_000.0) as u64
}

fn check_attempt(ctx: &str, spec: &StepSpec, attempt: &Attempt) {
    if let Some(home) = &spec.expect_home {
        let got = attempt.home.site.clone().unwrap_or_else(|| "none".into());
        assert_eq!(&got, home, "{ctx}: home site");
    }
    if let Some(reason) = &spec.expect_reason {
        let got = match &attempt.home.reason {
            HomeReason::Range(r) => format!("range {r}"),
            HomeReason::Route { route, range } => format!("route {route} covers {range}"),
            HomeReason::NoMatch => "none".into(),
        };
        assert!(got.starts_with(reason.as_str()), "{ctx}: reason {got:?} does not start with {reason:?}");
    }
    if let Some(steps) = &spec.expect_steps {
        let got: Vec<&str> = attempt.candidates.iter().map(|c| step_name(c.step)).collect();
        assert_eq!(&got, steps, "{ctx}: failover steps");
    }
    if let Some(sites) = &spec.expect_sites {
        let got: Vec<&str> = attempt.candidates.iter().map(|c| c.site.as_str()).collect();
        assert_eq!(&got, sites, "{ctx}: candidate sites");
    }
    let unique: BTreeSet<&NodeId> = attempt.candidates.iter().map(|c| &c.appliance).collect();
    assert_eq!(unique.len(), attempt.candidates.len(), "{ctx}: an appliance appears twice");
}

fn run_case(file: &str, topology: &Topology, case: &Case) {
    let host = case.host.parse().expect("host address");
    let routes: Vec<IpRange> = case.routes.iter().map(|r| r.parse().expect("route")).collect();
    let bootstrap = topology.bootstrap.clone().expect("the table topologies name a bootstrap appliance");
    let mut agent = Agent::new(AgentConfig { bootstrap, retry_interval_ms: 60_000 }, host, routes);
    agent.receive_topology(topology.clone());
    let mut current = topology.clone();
    let mut rng = SeededRandom::new(case.seed);
    let mut session: Option<Session> = None;
    let mut previous: Option<NodeId> = None;
    for (i, spec) in case.steps.iter().enumerate() {
        let ctx = format!("{file} / {} / step {i} ({})", case.name, spec.action);
        let now = hours(spec.at_h);
        let down: BTreeSet<String> = spec.down.iter().cloned().collect();
        match spec.action.as_str() {
            "new-session" | "fail-session" => {
                let attempt = if spec.action == "new-session" {
                    agent.plan_new_session(now, &mut rng)
                } else {
                    let s = session.as_ref().expect("a session to fail over");
                    agent.plan_session_failover(s, now, &mut rng)
                };
                check_attempt(&ctx, spec, &attempt);
                let served = attempt.candidates.iter().find(|c| !down.contains(c.appliance.as_str()));
                assert_eq!(spec.expect_offline.unwrap_or(false), served.is_none(), "{ctx}: offline");
                let Some(served) = served else {
                    let retry = agent.attempt_failed(now);
                    assert!(
                        agent.is_offline(now) && !agent.is_offline(retry),
                        "{ctx}: retry at the interval"
                    );
                    continue;
                };
                if let Some(want) = &spec.expect_served {
                    assert_eq!(served.appliance.as_str(), want, "{ctx}: served by");
                }
                if let Some(want) = &spec.expect_served_site {
                    assert_eq!(&served.site, want, "{ctx}: served by site");
                }
                if let Some(same) = spec.expect_same_as_previous {
                    assert_eq!(
                        previous.as_ref() == Some(&served.appliance),
                        same,
                        "{ctx}: same appliance as before"
                    );
                }
                if spec.action == "fail-session" {
                    let s = session.as_mut().expect("session");
                    let reauth = Agent::reauth(s, served, now, spec.grace_until_h.map(hours));
                    let got = match reauth {
                        Reauth::NotNeeded => "none",
                        Reauth::GracePeriod { .. } => "grace",
                        Reauth::Required => "required",
                    };
                    if let Some(want) = &spec.expect_reauth {
                        assert_eq!(got, want, "{ctx}: re-authentication");
                    }
                    s.appliance = served.appliance.clone();
                    s.site = served.site.clone();
                } else {
                    session = Some(agent.session_started(&attempt, served, now));
                }
                previous = Some(served.appliance.clone());
            }
            "topology" => {
                current.epoch += 1;
                if let Some((site, ranges)) = &spec.set_ranges {
                    let s = current.sites.iter_mut().find(|s| &s.id == site).expect("site to change");
                    s.ranges = ranges.iter().map(|r| r.parse().expect("range")).collect();
                }
                if let Some(remove) = &spec.remove {
                    current.appliances.retain(|a| !remove.contains(&a.id.as_str().to_string()));
                }
                agent.receive_topology(current.clone());
            }
            other => panic!("{ctx}: unknown action {other}"),
        }
        if let Some(want) = &spec.expect_session_appliance {
            assert_eq!(
                session.as_ref().map(|s| s.appliance.as_str()),
                Some(want.as_str()),
                "{ctx}: session stays put"
            );
        }
    }
}

#[test]
fn routing_tables() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata").join("routing");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).expect("testdata/routing").map(|e| e.expect("entry").path()).collect();
    files.sort();
    let mut cases = 0;
    for path in files.iter().filter(|p| p.extension().is_some_and(|e| e == "toml")) {
        let text = std::fs::read_to_string(path).expect("read table");
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let file: File = toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(file.topology.validate().is_ok(), "{name}: {:?}", file.topology.validate());
        for case in &file.cases {
            run_case(&name, &file.topology, case);
            cases += 1;
        }
    }
    assert!(cases >= 15, "only {cases} table cases ran");
}
