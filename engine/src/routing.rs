//! How an agent finds and keeps an appliance (sans-IO: time and randomness are
//! inputs). The rules, in the product's words:
//!
//! 1. Site ranges are `first-last` ranges or CIDR blocks, IPv4 and IPv6.
//! 2. Home site: the active site owning a range that holds the host's address; else
//!    the first non-default route (table order) whose destination covers a range of a
//!    site (several sites: topology order); else none. Hot standby sites never are.
//! 3. A newer topology takes effect at the next new session or failover only.
//! 4. New sessions go to a random appliance of the home site, kept for 3 hours, then
//!    re-picked among the others when there are any.
//! 5. Failover order: the other home-site appliances (random order), a random
//!    appliance of the home site's primary failover site, then of its secondary, then
//!    the bootstrap appliance; nothing twice; all down means offline with retries.
//! 6. A session stays on its appliance; when that fails it moves within its site
//!    (no new login); once on another site it never fails back.
//! 7. Cross-site failover needs re-authentication unless a grace period applies.
//! 8. Every decision carries its reason.
//!
//! The driving contract: call [`Agent::plan_new_session`] (or
//! [`Agent::plan_session_failover`]), try the candidates in order, and report the
//! outcome with [`Agent::session_started`] or [`Agent::attempt_failed`]. Times are
//! wall-clock milliseconds and must not go backwards.

use std::net::IpAddr;

use repl_wire::NodeId;

use crate::rng::SplitMix64;
use crate::topology::{IpRange, SiteKind, Topology};

/// How long an agent keeps its chosen appliance for new sessions.
pub const REPICK_AFTER_MS: u64 = 3 * 60 * 60 * 1000;

/// A source of random choices (seeded in tests and the simulator).
pub trait Randomness {
    /// A value in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize;
}

/// A seeded [`Randomness`].
#[derive(Debug, Clone)]
pub struct SeededRandom(SplitMix64);

impl SeededRandom {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRandom(SplitMix64::new(seed))
    }
}

impl Randomness for SeededRandom {
    fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }
}

/// Why the agent has the home site it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomeReason {
    /// The host's address lies in this range of the site.
    Range(IpRange),
    /// This non-default route covers this range of the site.
    Route {
        /// The route's destination.
        route: IpRange,
        /// The site range it covers.
        range: IpRange,
    },
    /// No active site's range holds the address and no route covers one.
    NoMatch,
}

/// The home-site decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HomeSite {
    /// The site id, if any.
    pub site: Option<String>,
    /// Why.
    pub reason: HomeReason,
}

/// Rule 2: the home site of a host at `host` with routing table `routes`.
pub fn home_site(topology: &Topology, host: IpAddr, routes: &[IpRange]) -> HomeSite {
    let active = || topology.sites.iter().filter(|s| s.kind == SiteKind::Active);
    for site in active() {
        if let Some(range) = site.ranges.iter().find(|r| r.contains(host)) {
            return HomeSite { site: Some(site.id.clone()), reason: HomeReason::Range(*range) };
        }
    }
    for route in routes.iter().filter(|r| !r.is_default()) {
        for site in active() {
            if let Some(range) = site.ranges.iter().find(|r| route.covers(r)) {
                return HomeSite {
                    site: Some(site.id.clone()),
                    reason: HomeReason::Route { route: *route, range: *range },
                };
            }
        }
    }
    HomeSite { site: None, reason: HomeReason::NoMatch }
}

/// Which step of the order a candidate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The appliance chosen for new sessions (rule 4).
    Chosen,
    /// Another appliance of the home site (rule 5).
    HomeSite,
    /// The appliance a session was on failed: another of the session's site (rule 6).
    SessionSite,
    /// The home site's primary failover site.
    PrimaryFailover,
    /// The home site's secondary failover site.
    SecondaryFailover,
    /// The bootstrap appliance, last resort.
    Bootstrap,
}

/// One appliance to try, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The appliance.
    pub appliance: NodeId,
    /// Its site.
    pub site: String,
    /// The step of the order.
    pub step: Step,
}

/// An ordered plan of appliances to try, with the home-site decision behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The home site and its reason.
    pub home: HomeSite,
    /// Appliances to try, in order; none appears twice.
    pub candidates: Vec<Candidate>,
}

/// Whether moving a session needs the user to authenticate again (rule 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reauth {
    /// Same site: the session is replicated there, no new login.
    NotNeeded,
    /// Another site, within the user policy's grace period (until this time).
    GracePeriod {
        /// When the grace period ends.
        until_ms: u64,
    },
    /// Another site, no grace: the user must authenticate again.
    Required,
}

/// An active session's placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The appliance serving it.
    pub appliance: NodeId,
    /// The site the session belongs to (the bootstrap appliance's site when reached
    /// through it).
    pub site: String,
    /// The agent's home site when the session started.
    pub home_site: Option<String>,
}

/// Agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The bootstrap appliance ("IPTXPrimServer").
    pub bootstrap: NodeId,
    /// How long to wait between background retries while offline.
    pub retry_interval_ms: u64,
}

/// One agent's routing state.
#[derive(Debug, Clone)]
pub struct Agent {
    config: AgentConfig,
    host: IpAddr,
    routes: Vec<IpRange>,
    topology: Option<Topology>,
    pending: Option<Topology>,
    chosen: Option<(NodeId, u64)>,
    offline_until: Option<u64>,
}

fn shuffle<T>(items: &mut [T], rng: &mut dyn Randomness) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i + 1));
    }
}

impl Agent {
    /// An agent on `host` with routing table `routes` (destinations, table order).
    pub fn new(config: AgentConfig, host: IpAddr, routes: Vec<IpRange>) -> Agent {
        Agent { config, host, routes, topology: None, pending: None, chosen: None, offline_until: None }
    }

    /// Rule 3: a topology from an appliance. The first one takes effect at once (it is
    /// what the agent fetched from its bootstrap appliance); a newer one waits for the
    /// next new session or failover; an older one is ignored.
    pub fn receive_topology(&mut self, topology: Topology) {
        let current = self.pending.as_ref().or(self.topology.as_ref()).map(|t| t.epoch);
        match current {
            None => self.topology = Some(topology),
            Some(epoch) if topology.epoch > epoch => self.pending = Some(topology),
            Some(_) => {}
        }
    }

    /// The topology new decisions use (the pending one once promoted).
    pub fn topology(&self) -> Option<&Topology> {
        self.topology.as_ref()
    }

    /// The appliance kept for new sessions and since when.
    pub fn chosen(&self) -> Option<&(NodeId, u64)> {
        self.chosen.as_ref()
    }

    /// When the next background retry is due while offline.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.offline_until
    }

    /// Whether the agent is offline at `now_ms` (all appliances failed and the retry
    /// is not yet due).
    pub fn is_offline(&self, now_ms: u64) -> bool {
        self.offline_until.is_some_and(|t| now_ms < t)
    }

    fn promote(&mut self) {
        if let Some(t) = self.pending.take() {
            self.topology = Some(t);
        }
    }

    fn site_of(&self, id: &NodeId) -> Option<String> {
        self.topology.as_ref()?.appliance(id).map(|a| a.site.clone())
    }

    fn random_of_site(&self, site: &str, exclude: &[NodeId], rng: &mut dyn Randomness) -> Option<NodeId> {
        let t = self.topology.as_ref()?;
        let pool: Vec<&NodeId> =
            t.appliances_of(site).map(|a| &a.id).filter(|id| !exclude.contains(id)).collect();
        (!pool.is_empty()).then(|| pool[rng.below(pool.len())].clone())
    }

    /// Rules 4 and 5: the order in which to try appliances for a new session.
    pub fn plan_new_session(&mut self, now_ms: u64, rng: &mut dyn Randomness) -> Attempt {
        self.promote();
        let Some(t) = self.topology.clone() else {
            // Nothing known yet: only the bootstrap appliance (which hands out the topology).
            let candidates = vec![Candidate {
                appliance: self.config.bootstrap.clone(),
                site: String::new(),
                step: Step::Bootstrap,
            }];
            return Attempt { home: HomeSite { site: None, reason: HomeReason::NoMatch }, candidates };
        };
        let home = home_site(&t, self.host, &self.routes);
        let mut out: Vec<Candidate> = Vec::new();
        if let Some(site) = &home.site {
            let members: Vec<NodeId> = t.appliances_of(site).map(|a| a.id.clone()).collect();
            let keep = match &self.chosen {
                Some((id, since)) if members.contains(id) => {
                    if now_ms.saturating_sub(*since) < REPICK_AFTER_MS {
                        Some((id.clone(), *since))
                    } else {
                        // Re-pick among the others when there are any, else keep.
                        let others: Vec<&NodeId> = members.iter().filter(|m| *m != id).collect();
                        let next = if others.is_empty() {
                            id.clone()
                        } else {
                            others[rng.below(others.len())].clone()
                        };
                        Some((next, now_ms))
                    }
                }
                _ => (!members.is_empty()).then(|| (members[rng.below(members.len())].clone(), now_ms)),
            };
            if let Some((id, since)) = keep {
                out.push(Candidate { appliance: id.clone(), site: site.clone(), step: Step::Chosen });
                self.chosen = Some((id, since));
            }
            let mut rest: Vec<NodeId> =
                members.into_iter().filter(|m| out.iter().all(|c| &c.appliance != m)).collect();
            shuffle(&mut rest, rng);
            out.extend(rest.into_iter().map(|a| Candidate {
                appliance: a,
                site: site.clone(),
                step: Step::HomeSite,
            }));
            self.push_failover_sites(&t, site, &mut out, rng);
        }
        self.push_bootstrap(&mut out);
        Attempt { home, candidates: out }
    }

    fn push_failover_sites(
        &self,
        t: &Topology,
        home: &str,
        out: &mut Vec<Candidate>,
        rng: &mut dyn Randomness,
    ) {
        let Some(site) = t.site(home) else { return };
        for (failover, step) in [
            (&site.primary_failover, Step::PrimaryFailover),
            (&site.secondary_failover, Step::SecondaryFailover),
        ] {
            let Some(f) = failover else { continue };
            if f == home || out.iter().any(|c| &c.site == f) {
                continue;
            }
            let tried: Vec<NodeId> = out.iter().map(|c| c.appliance.clone()).collect();
            if let Some(a) = self.random_of_site(f, &tried, rng) {
                out.push(Candidate { appliance: a, site: f.clone(), step });
            }
        }
    }

    fn push_bootstrap(&self, out: &mut Vec<Candidate>) {
        let b = &self.config.bootstrap;
        if out.iter().all(|c| &c.appliance != b) {
            let site = self.site_of(b).unwrap_or_default();
            out.push(Candidate { appliance: b.clone(), site, step: Step::Bootstrap });
        }
    }

    /// A session was established on `served_by` (one of the attempt's candidates).
    /// The agent is online again; an appliance of the home site that served becomes
    /// the chosen one (a failed chosen appliance is not kept).
    pub fn session_started(&mut self, attempt: &Attempt, served_by: &Candidate, now_ms: u64) -> Session {
        self.offline_until = None;
        if served_by.step == Step::HomeSite {
            self.chosen = Some((served_by.appliance.clone(), now_ms));
        }
        let site = if served_by.site.is_empty() {
            self.site_of(&served_by.appliance).unwrap_or_default()
        } else {
            served_by.site.clone()
        };
        Session { appliance: served_by.appliance.clone(), site, home_site: attempt.home.site.clone() }
    }

    /// Every candidate failed: the agent goes offline and retries at the returned time.
    pub fn attempt_failed(&mut self, now_ms: u64) -> u64 {
        let at = now_ms + self.config.retry_interval_ms;
        self.offline_until = Some(at);
        at
    }

    /// Rule 6: the session's appliance failed. Try the other appliances of the
    /// session's site first (no new login), then the home site's failover sites that
    /// come after the session's site in the order (never back), then the bootstrap.
    pub fn plan_session_failover(
        &mut self,
        session: &Session,
        now_ms: u64,
        rng: &mut dyn Randomness,
    ) -> Attempt {
        // Time is not needed by today's rules; it stays in the signature so a future
        // rule (say, a failover hold-down) keeps the driving contract.
        let _ = now_ms;
        self.promote();
        let home = match &self.topology {
            Some(t) => home_site(t, self.host, &self.routes),
            None => HomeSite { site: None, reason: HomeReason::NoMatch },
        };
        let mut out = Vec::new();
        if let Some(t) = self.topology.clone() {
            let mut same: Vec<NodeId> = t
                .appliances_of(&session.site)
                .map(|a| a.id.clone())
                .filter(|id| id != &session.appliance)
                .collect();
            shuffle(&mut same, rng);
            out.extend(same.into_iter().map(|a| Candidate {
                appliance: a,
                site: session.site.clone(),
                step: Step::SessionSite,
            }));
            if let Some(home_id) = session.home_site.as_ref().and_then(|h| t.site(h)) {
                let order: Vec<(&Option<String>, Step)> = vec![
                    (&home_id.primary_failover, Step::PrimaryFailover),
                    (&home_id.secondary_failover, Step::SecondaryFailover),
                ];
                // Sites strictly after the session's current site in the home order.
                let position = if session.site == home_id.id {
                    0
                } else {
                    order
                        .iter()
                        .position(|(s, _)| s.as_deref() == Some(session.site.as_str()))
                        .map_or(order.len(), |p| p + 1)
                };
                for (failover, step) in order.into_iter().skip(position) {
                    let Some(f) = failover else { continue };
                    if f == &home_id.id || f == &session.site {
                        continue;
                    }
                    let mut tried: Vec<NodeId> = out.iter().map(|c| c.appliance.clone()).collect();
                    tried.push(session.appliance.clone());
                    if let Some(a) = self.random_of_site(f, &tried, rng) {
                        out.push(Candidate { appliance: a, site: f.clone(), step });
                    }
                }
            }
        }
        if self.config.bootstrap != session.appliance {
            self.push_bootstrap(&mut out);
        }
        Attempt { home, candidates: out }
    }

    /// Rule 7: whether moving `session` to `to` needs a new login, given the user
    /// policy's grace period (if any).
    pub fn reauth(session: &Session, to: &Candidate, now_ms: u64, grace_until_ms: Option<u64>) -> Reauth {
        if to.site == session.site {
            Reauth::NotNeeded
        } else {
            match grace_until_ms {
                Some(until_ms) if now_ms < until_ms => Reauth::GracePeriod { until_ms },
                _ => Reauth::Required,
            }
        }
    }
}
