//! The enterprise topology: sites, appliances, roles, and the scope rule that says
//! which streams flow between two appliances. Pure data and rules, no I/O.
//!
//! The topology is itself replicated data: it is encoded with [`Topology::encode`]
//! and stored in the `topology` collection; a change goes through a two-phase commit
//! on [`Topology::epoch`].

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use repl_wire::{NodeId, StreamId};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Format version of [`Topology::encode`].
const TOPOLOGY_FORMAT: u16 = 1;

/// The product generation, which decides who holds what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Generation {
    /// Every appliance holds the enterprise database; sessions per site; audit on holders.
    G3,
    /// Two database appliances hold everything; service appliances hold nothing.
    G4,
}

/// Whether a site serves agents or only stands by as a failover target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SiteKind {
    /// Serves the agents of its ranges.
    #[default]
    Active,
    /// Idle and current; used only as a failover site.
    HotStandby,
}

/// An appliance role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// G4: holds the synchronized database.
    Database,
    /// G4: serves agents through a database appliance.
    Service,
    /// Holds the audit records.
    Audit,
}

/// A range of IP addresses, written `first-last` or as a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpRange {
    first: IpAddr,
    last: IpAddr,
}

/// An address, range or topology that does not parse or does not hold together.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// An IP range that does not parse.
    #[error("invalid IP range {text:?}: {reason}")]
    Range {
        /// The text given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Encoded topology bytes that do not decode.
    #[error("topology does not decode: {0}")]
    Decode(String),
}

fn to_u128(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (false, u32::from(a) as u128),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

impl IpRange {
    /// A range from `first` to `last` inclusive (same family, `first <= last`).
    pub fn new(first: IpAddr, last: IpAddr) -> Option<IpRange> {
        let ((f6, f), (l6, l)) = (to_u128(first), to_u128(last));
        (f6 == l6 && f <= l).then_some(IpRange { first, last })
    }

    /// The first address.
    pub fn first(&self) -> IpAddr {
        self.first
    }

    /// The last address.
    pub fn last(&self) -> IpAddr {
        self.last
    }

    fn bounds(&self) -> (bool, u128, u128) {
        let (v6, f) = to_u128(self.first);
        (v6, f, to_u128(self.last).1)
    }

    /// Whether `ip` lies in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (v6, f, l) = self.bounds();
        let (ip6, x) = to_u128(ip);
        v6 == ip6 && f <= x && x <= l
    }

    /// Whether all of `other` lies in this range.
    pub fn covers(&self, other: &IpRange) -> bool {
        self.contains(other.first) && self.contains(other.last)
    }

    /// Whether the ranges share an address.
    pub fn overlaps(&self, other: &IpRange) -> bool {
        let (a6, af, al) = self.bounds();
        let (b6, bf, bl) = other.bounds();
        a6 == b6 && af <= bl && bf <= al
    }

    /// Whether this is a default route (all of IPv4 or all of IPv6).
    pub fn is_default(&self) -> bool {
        let (v6, f, l) = self.bounds();
        f == 0 && l == if v6 { u128::MAX } else { u32::MAX as u128 }
    }
}

impl FromStr for IpRange {
    type Err = TopologyError;

    fn from_str(text: &str) -> Result<IpRange, TopologyError> {
        let err = |reason| TopologyError::Range { text: text.to_string(), reason };
        let text_t = text.trim();
        if let Some((addr, bits)) = text_t.split_once('/') {
            let ip: IpAddr = addr.trim().parse().map_err(|_| err("bad address"))?;
            let bits: u32 = bits.trim().parse().map_err(|_| err("bad prefix length"))?;
            let (v6, x) = to_u128(ip);
            let width = if v6 { 128 } else { 32 };
            if bits > width {
                return Err(err("prefix length longer than the address"));
            }
            let host_bits = width - bits;
            let mask: u128 = if host_bits == 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
            if x & mask != 0 {
                return Err(err("address has bits set past the prefix"));
            }
            let (first, last) = (x, x | mask);
            let make = |v: u128| {
                if v6 {
                    IpAddr::from(std::net::Ipv6Addr::from(v))
                } else {
                    IpAddr::from(std::net::Ipv4Addr::from(v as u32))
                }
            };
            return Ok(IpRange { first: make(first), last: make(last) });
        }
        let (a, b) = text_t.split_once('-').ok_or_else(|| err("expected first-last or a CIDR block"))?;
        let first: IpAddr = a.trim().parse().map_err(|_| err("bad first address"))?;
        let last: IpAddr = b.trim().parse().map_err(|_| err("bad last address"))?;
        IpRange::new(first, last).ok_or_else(|| err("first and last differ in family or are out of order"))
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl Serialize for IpRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<IpRange, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// External servers (directory, token) a site may override.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalServers {
    /// Directory servers (LDAP, AD), in preference order.
    #[serde(default)]
    pub directory: Vec<String>,
    /// Token (OTP) servers, in preference order.
    #[serde(default)]
    pub token: Vec<String>,
}

/// A site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    /// Immutable id.
    pub id: String,
    /// Display name (may be renamed).
    pub name: String,
    /// Active or hot standby.
    #[serde(default)]
    pub kind: SiteKind,
    /// The IP ranges whose agents the site serves.
    #[serde(default)]
    pub ranges: Vec<IpRange>,
    /// Primary failover site id.
    #[serde(default)]
    pub primary_failover: Option<String>,
    /// Secondary failover site id.
    #[serde(default)]
    pub secondary_failover: Option<String>,
    /// Overrides of the enterprise's external servers.
    #[serde(default)]
    pub external: Option<ExternalServers>,
}

/// An appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appliance {
    /// The appliance id (also in its certificate).
    pub id: NodeId,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// The site it belongs to.
    pub site: String,
    /// Where peers and agents reach it.
    pub address: SocketAddr,
    /// Its roles.
    #[serde(default)]
    pub roles: BTreeSet<Role>,
}

impl Appliance {
    /// Whether it has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// The whole enterprise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Enterprise name.
    pub enterprise: String,
    /// G3 or G4.
    pub generation: Generation,
    /// Membership epoch; every committed change raises it.
    #[serde(default)]
    pub epoch: u64,
    /// Enterprise-wide external servers.
    #[serde(default)]
    pub external: ExternalServers,
    /// The last-resort appliance agents bootstrap from ("IPTXPrimServer").
    pub bootstrap: Option<NodeId>,
    /// Sites, in topology order.
    pub sites: Vec<Site>,
    /// Appliances, in topology order.
    pub appliances: Vec<Appliance>,
}

/// A finding of [`Topology::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Finding {
    /// G4 needs exactly two database appliances.
    DatabaseCount(usize),
    /// G4 with more than two sites makes little sense.
    TooManySitesForG4(usize),
    /// G3 needs at least two audit holders.
    TooFewAuditHolders(usize),
    /// All G3 audit holders are in one site: a site loss loses the audit copies.
    AuditHoldersInOneSite(String),
    /// Two ranges overlap (site ids and the ranges).
    OverlappingRanges(String, IpRange, String, IpRange),
    /// A failover site that does not exist.
    UnknownFailoverSite(String, String),
    /// A site that names itself as its failover site.
    SelfFailover(String),
    /// A site with no appliances.
    EmptySite(String),
    /// An appliance in a site that does not exist.
    UnknownSite(NodeId, String),
    /// An id used twice.
    Duplicate(String),
    /// The bootstrap appliance is not in the topology.
    UnknownBootstrap(NodeId),
}

/// Errors (the topology is refused) and warnings (it works, but look).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validation {
    /// Findings that make the topology unusable.
    pub errors: Vec<Finding>,
    /// Findings that deserve an operator's look.
    pub warnings: Vec<Finding>,
}

impl Validation {
    /// Whether there are no errors.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Which streams flow each way between this appliance and a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Streams this appliance sends to the peer.
    pub send: BTreeSet<StreamId>,
    /// Streams this appliance accepts from the peer.
    pub receive: BTreeSet<StreamId>,
}

impl Topology {
    /// The site with id `id`.
    pub fn site(&self, id: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.id == id)
    }

    /// The appliance with id `id`.
    pub fn appliance(&self, id: &NodeId) -> Option<&Appliance> {
        self.appliances.iter().find(|a| &a.id == id)
    }

    /// The appliances of a site, in topology order.
    pub fn appliances_of<'a>(&'a self, site: &'a str) -> impl Iterator<Item = &'a Appliance> + 'a {
        self.appliances.iter().filter(move |a| a.site == site)
    }

    /// Encodes the topology for storage and replication: a format version, then the
    /// postcard encoding of the topology (ranges as text, as in configuration files).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(&(TOPOLOGY_FORMAT, self)).expect("a topology always encodes")
    }

    /// Decodes an encoded topology.
    pub fn decode(bytes: &[u8]) -> Result<Topology, TopologyError> {
        let (version, t): (u16, Topology) =
            postcard::from_bytes(bytes).map_err(|e| TopologyError::Decode(e.to_string()))?;
        if version != TOPOLOGY_FORMAT {
            return Err(TopologyError::Decode(format!("unknown topology format {version}")));
        }
        Ok(t)
    }

    /// Checks the rules of the product.
    pub fn validate(&self) -> Validation {
        let mut v = Validation::default();
        let mut ids = BTreeSet::new();
        for s in &self.sites {
            if !ids.insert(format!("site {}", s.id)) {
                v.errors.push(Finding::Duplicate(format!("site {}", s.id)));
            }
        }
        for a in &self.appliances {
            if !ids.insert(format!("appliance {}", a.id)) {
                v.errors.push(Finding::Duplicate(format!("appliance {}", a.id)));
            }
            if self.site(&a.site).is_none() {
                v.errors.push(Finding::UnknownSite(a.id.clone(), a.site.clone()));
            }
        }
        for s in &self.sites {
            for f in [&s.primary_failover, &s.secondary_failover].into_iter().flatten() {
                if f == &s.id {
                    v.errors.push(Finding::SelfFailover(s.id.clone()));
                } else if self.site(f).is_none() {
                    v.errors.push(Finding::UnknownFailoverSite(s.id.clone(), f.clone()));
                }
            }
            if self.appliances_of(&s.id).next().is_none() {
                v.warnings.push(Finding::EmptySite(s.id.clone()));
            }
        }
        let ranges: Vec<(&str, &IpRange)> =
            self.sites.iter().flat_map(|s| s.ranges.iter().map(move |r| (s.id.as_str(), r))).collect();
        for (i, (sa, ra)) in ranges.iter().enumerate() {
            for (sb, rb) in ranges.iter().skip(i + 1) {
                if ra.overlaps(rb) {
                    v.errors.push(Finding::OverlappingRanges(sa.to_string(), **ra, sb.to_string(), **rb));
                }
            }
        }
        if let Some(b) = &self.bootstrap {
            if self.appliance(b).is_none() {
                v.errors.push(Finding::UnknownBootstrap(b.clone()));
            }
        }
        match self.generation {
            Generation::G4 => {
                let dbs = self.appliances.iter().filter(|a| a.has(Role::Database)).count();
                if dbs != 2 {
                    v.errors.push(Finding::DatabaseCount(dbs));
                }
                if self.sites.len() > 2 {
                    v.warnings.push(Finding::TooManySitesForG4(self.sites.len()));
                }
            }
            Generation::G3 => {
                let holders: Vec<&Appliance> =
                    self.appliances.iter().filter(|a| a.has(Role::Audit)).collect();
                if holders.len() < 2 {
                    v.errors.push(Finding::TooFewAuditHolders(holders.len()));
                } else {
                    let sites: BTreeSet<&str> = holders.iter().map(|a| a.site.as_str()).collect();
                    if sites.len() == 1 && self.sites.len() > 1 {
                        v.warnings.push(Finding::AuditHoldersInOneSite(holders[0].site.clone()));
                    }
                }
            }
        }
        v
    }

    /// Whether `appliance` holds `stream`: in G3 every appliance holds the enterprise
    /// data and its site's sessions, audit holders the audit records; in G4 the
    /// database appliances hold everything.
    pub fn holds(&self, appliance: &Appliance, stream: StreamId) -> bool {
        match (self.generation, stream) {
            (Generation::G4, _) => appliance.has(Role::Database),
            (Generation::G3, StreamId::Audit) => appliance.has(Role::Audit),
            (Generation::G3, _) => true,
        }
    }

    /// The ids of the appliances that hold `stream`, in topology order.
    pub fn holders(&self, stream: StreamId) -> Vec<NodeId> {
        self.appliances.iter().filter(|a| self.holds(a, stream)).map(|a| a.id.clone()).collect()
    }

    /// Groups of appliances that must hold the same data of `stream`: in G3 the
    /// sessions of each site (sites of one appliance left out); otherwise one group of
    /// every holder.
    pub fn replica_groups(&self, stream: StreamId) -> Vec<Vec<NodeId>> {
        if stream != StreamId::Sessions || self.generation != Generation::G3 {
            return vec![self.holders(stream)];
        }
        let mut by_site: std::collections::BTreeMap<&str, Vec<NodeId>> = std::collections::BTreeMap::new();
        for a in &self.appliances {
            by_site.entry(a.site.as_str()).or_default().push(a.id.clone());
        }
        by_site.into_values().filter(|g| g.len() > 1).collect()
    }

    /// Which streams flow between `me` and `peer` (empty when either is unknown).
    ///
    /// G3: enterprise everywhere, sessions within a site, audit to audit holders.
    /// G4: everything between the two database appliances; service appliances forward
    /// audit to the database appliances and receive nothing.
    pub fn scope(&self, me: &NodeId, peer: &NodeId) -> Scope {
        let (Some(a), Some(b)) = (self.appliance(me), self.appliance(peer)) else { return Scope::default() };
        if a.id == b.id {
            return Scope::default();
        }
        let mut scope = Scope::default();
        let flow = |from: &Appliance, to: &Appliance, set: &mut BTreeSet<StreamId>| match self.generation {
            Generation::G3 => {
                set.insert(StreamId::Enterprise);
                if from.site == to.site {
                    set.insert(StreamId::Sessions);
                }
                if to.has(Role::Audit) {
                    set.insert(StreamId::Audit);
                }
            }
            Generation::G4 => {
                if from.has(Role::Database) && to.has(Role::Database) {
                    set.extend([StreamId::Enterprise, StreamId::Sessions, StreamId::Audit]);
                } else if to.has(Role::Database) {
                    set.insert(StreamId::Audit);
                }
            }
        };
        flow(a, b, &mut scope.send);
        flow(b, a, &mut scope.receive);
        scope
    }

    /// The external servers that apply to a site (its override, else the enterprise's).
    pub fn external_for(&self, site: &str) -> &ExternalServers {
        self.site(site).and_then(|s| s.external.as_ref()).unwrap_or(&self.external)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn range(s: &str) -> IpRange {
        s.parse().expect("valid range")
    }

    pub(crate) fn appliance(id: &str, site: &str, roles: &[Role]) -> Appliance {
        Appliance {
            id: NodeId::new(id).expect("id"),
            name: id.to_uppercase(),
            site: site.into(),
            address: "127.0.0.1:7809".parse().expect("addr"),
            roles: roles.iter().copied().collect(),
        }
    }

    fn site(id: &str, ranges: &[&str], primary: Option<&str>) -> Site {
        Site {
            id: id.into(),
            name: id.into(),
            kind: SiteKind::Active,
            ranges: ranges.iter().map(|r| range(r)).collect(),
            primary_failover: primary.map(str::to_string),
            secondary_failover: None,
            external: None,
        }
    }

    pub(crate) fn g3() -> Topology {
        Topology {
            enterprise: "acme".into(),
            generation: Generation::G3,
            epoch: 1,
            external: ExternalServers::default(),
            bootstrap: Some(NodeId::new("a1").expect("id")),
            sites: vec![
                site("a", &["10.1.0.0/16"], Some("b")),
                site("b", &["10.2.0.0-10.2.255.255"], Some("a")),
            ],
            appliances: vec![
                appliance("a1", "a", &[Role::Audit]),
                appliance("a2", "a", &[]),
                appliance("b1", "b", &[Role::Audit]),
                appliance("b2", "b", &[]),
            ],
        }
    }

    #[test]
    fn ranges_parse_in_both_forms_and_families() {
        let r = range("10.0.0.0/8");
        assert!(r.contains("10.255.1.2".parse().expect("ip")));
        assert!(!r.contains("11.0.0.0".parse().expect("ip")));
        assert_eq!(range("10.0.0.0-10.255.255.255"), r);
        let v6 = range("2001:db8::/32");
        assert!(v6.contains("2001:db8:1::5".parse().expect("ip")));
        assert!(!v6.contains("10.0.0.1".parse().expect("ip")));
        assert!(range("0.0.0.0/0").is_default() && range("::/0").is_default());
        assert!(range("10.0.0.0/8").covers(&range("10.1.0.0/16")));
        for bad in ["10.0.0.0/33", "10.0.0.1/8", "10.0.0.9-10.0.0.1", "10.0.0.1-::1", "ten", "1.2.3.4"] {
            match bad.parse::<IpRange>() {
                Err(TopologyError::Range { text, .. }) => assert_eq!(text, bad),
                other => panic!("{bad} should be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_valid_g3_passes_and_round_trips() {
        let t = g3();
        assert_eq!(t.validate(), Validation::default());
        assert_eq!(Topology::decode(&t.encode()), Ok(t));
        assert!(Topology::decode(b"\x05junk").is_err());
    }

    #[test]
    fn validation_finds_every_rule() {
        let mut t = g3();
        t.appliances[2].roles.clear();
        assert_eq!(t.validate().errors, vec![Finding::TooFewAuditHolders(1)]);
        let mut t = g3();
        t.appliances[2].roles.clear();
        t.appliances[1].roles.insert(Role::Audit);
        assert_eq!(t.validate().warnings, vec![Finding::AuditHoldersInOneSite("a".into())]);
        let mut t = g3();
        t.sites[1].ranges.push(range("10.1.5.0/24"));
        assert!(
            matches!(t.validate().errors.as_slice(), [Finding::OverlappingRanges(a, _, b, _)] if a == "a" && b == "b")
        );
        let mut t = g3();
        t.sites[0].primary_failover = Some("a".into());
        t.sites[1].primary_failover = Some("zz".into());
        assert_eq!(
            t.validate().errors,
            vec![Finding::SelfFailover("a".into()), Finding::UnknownFailoverSite("b".into(), "zz".into())]
        );
        let mut t = g3();
        t.sites.push(site("c", &[], None));
        assert_eq!(t.validate().warnings, vec![Finding::EmptySite("c".into())]);
        let mut t = g3();
        t.generation = Generation::G4;
        t.sites.push(site("c", &[], None));
        t.appliances.push(appliance("c1", "c", &[]));
        t.appliances[0].roles.insert(Role::Database);
        let v = t.validate();
        assert_eq!(v.errors, vec![Finding::DatabaseCount(1)]);
        assert_eq!(v.warnings, vec![Finding::TooManySitesForG4(3)]);
        let mut t = g3();
        t.appliances.push(appliance("a1", "nowhere", &[]));
        let errors = t.validate().errors;
        assert!(errors.contains(&Finding::Duplicate("appliance a1".into())));
        assert!(errors.contains(&Finding::UnknownSite(NodeId::new("a1").expect("id"), "nowhere".into())));
    }

    #[test]
    fn g3_scopes() {
        let t = g3();
        let id = |s: &str| NodeId::new(s).expect("id");
        let s = t.scope(&id("a2"), &id("a1"));
        assert_eq!(s.send, [StreamId::Enterprise, StreamId::Sessions, StreamId::Audit].into_iter().collect());
        assert_eq!(s.receive, [StreamId::Enterprise, StreamId::Sessions].into_iter().collect());
        let cross = t.scope(&id("a1"), &id("b2"));
        assert_eq!(cross.send, [StreamId::Enterprise].into_iter().collect());
        assert_eq!(cross.receive, [StreamId::Enterprise, StreamId::Audit].into_iter().collect());
        assert_eq!(t.scope(&id("a1"), &id("a1")), Scope::default());
        assert_eq!(t.scope(&id("a1"), &id("zz")), Scope::default());
    }

    #[test]
    fn g4_scopes() {
        let mut t = g3();
        t.generation = Generation::G4;
        t.appliances = vec![
            appliance("db1", "a", &[Role::Database]),
            appliance("db2", "b", &[Role::Database]),
            appliance("s1", "a", &[Role::Service]),
            appliance("s2", "b", &[Role::Service]),
        ];
        t.bootstrap = None;
        assert!(t.validate().is_ok());
        let id = |s: &str| NodeId::new(s).expect("id");
        let all: BTreeSet<StreamId> = StreamId::ALL.into_iter().collect();
        assert_eq!(t.scope(&id("db1"), &id("db2")), Scope { send: all.clone(), receive: all });
        let audit: BTreeSet<StreamId> = [StreamId::Audit].into_iter().collect();
        assert_eq!(t.scope(&id("s1"), &id("db2")), Scope { send: audit.clone(), receive: BTreeSet::new() });
        assert_eq!(t.scope(&id("db1"), &id("s1")), Scope { send: BTreeSet::new(), receive: audit });
        assert_eq!(t.scope(&id("s1"), &id("s2")), Scope::default());
        let dbs = vec![id("db1"), id("db2")];
        for stream in StreamId::ALL {
            assert_eq!(t.holders(stream), dbs);
            assert_eq!(t.replica_groups(stream), vec![dbs.clone()]);
        }
    }

    #[test]
    fn g3_holders_and_replica_groups() {
        let t = g3();
        let ids = |v: &[&str]| v.iter().map(|s| NodeId::new(*s).expect("id")).collect::<Vec<_>>();
        assert_eq!(t.holders(StreamId::Enterprise), ids(&["a1", "a2", "b1", "b2"]));
        assert_eq!(t.holders(StreamId::Audit), ids(&["a1", "b1"]));
        assert_eq!(t.replica_groups(StreamId::Enterprise), vec![ids(&["a1", "a2", "b1", "b2"])]);
        assert_eq!(t.replica_groups(StreamId::Sessions), vec![ids(&["a1", "a2"]), ids(&["b1", "b2"])]);
        assert_eq!(t.replica_groups(StreamId::Audit), vec![ids(&["a1", "b1"])]);
    }
}
