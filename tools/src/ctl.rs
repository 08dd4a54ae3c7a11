//! `replctl`: the operator's command line. Certificates are files; everything else
//! talks to appliances over the client protocol with an admin certificate.
//!
//! Exit codes: 0 success, 1 a check failed (verify, audit verify, unreachable
//! appliance in status), 2 usage, input or connection error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use repl_engine::runtime::{RemoteStore, RemoteTarget};
use repl_engine::topology::Topology;
use repl_wire::transport::{
    certificate_serial, read_pem, AllowedPeers, CertificateAuthority, Identity, KeyFile, TlsSetup, Validity,
};
use repl_wire::{AdminCall, ClientCall, ClientReply, Collection, NodeId, StreamId, VersionVector};
use serde_json::json;

use crate::config::read_topology;

/// A failure of a `replctl` command, with its exit code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CtlError {
    /// Bad input: an argument, a file, a value.
    #[error("{0}")]
    Usage(String),
    /// An appliance could not be reached or refused.
    #[error("{0}")]
    Connection(String),
    /// A check ran and failed.
    #[error("{0}")]
    CheckFailed(String),
}

impl CtlError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::CheckFailed(_) => 1,
            CtlError::Usage(_) | CtlError::Connection(_) => 2,
        }
    }
}

fn usage(e: impl std::fmt::Display) -> CtlError {
    CtlError::Usage(e.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

// ----- certificates ---------------------------------------------------------------

/// `certs init`: a new enterprise CA in `dir` (ca.pem, ca.key 0600).
pub fn certs_init(dir: &Path, enterprise: &str, days: i64) -> Result<String, CtlError> {
    if dir.join("ca.key").exists() {
        return Err(usage(format!("{} already holds a CA (ca.key); refusing to replace it", dir.display())));
    }
    std::fs::create_dir_all(dir).map_err(|e| usage(format!("{}: {e}", dir.display())))?;
    let ca = CertificateAuthority::create(enterprise, Validity::days_from_now(days)).map_err(usage)?;
    KeyFile::Public.write(&dir.join("ca.pem"), ca.cert_pem()).map_err(usage)?;
    KeyFile::Secret.write(&dir.join("ca.key"), ca.key_pem()).map_err(usage)?;
    Ok(format!(
        "enterprise CA for {enterprise:?} written to {}/ca.pem (key ca.key, mode 0600)",
        dir.display()
    ))
}

fn load_ca(dir: &Path) -> Result<CertificateAuthority, CtlError> {
    let cert = read_pem(&dir.join("ca.pem"), KeyFile::Public).map_err(usage)?;
    let key = read_pem(&dir.join("ca.key"), KeyFile::Secret).map_err(usage)?;
    CertificateAuthority::from_pem(&cert, &key).map_err(usage)
}

/// `certs issue`: a certificate for `identity` signed by the CA in `dir`, written to
/// `out/<name>.pem` and `<name>.key`.
pub fn certs_issue(dir: &Path, identity: Identity, out: &Path, days: i64) -> Result<String, CtlError> {
    let ca = load_ca(dir)?;
    let issued = ca.issue(&identity, Validity::days_from_now(days)).map_err(usage)?;
    let name = match &identity {
        Identity::Appliance(id) => id.to_string(),
        Identity::Client(n) | Identity::Admin(n) => n.clone(),
    };
    std::fs::create_dir_all(out).map_err(|e| usage(format!("{}: {e}", out.display())))?;
    KeyFile::Public.write(&out.join(format!("{name}.pem")), &issued.cert_pem).map_err(usage)?;
    KeyFile::Secret.write(&out.join(format!("{name}.key")), &issued.key_pem).map_err(usage)?;
    Ok(format!("{} issued: {}/{name}.pem, serial {}", identity.uri(), out.display(), issued.serial))
}

/// `certs revoke`: adds `serial` to the CA's revocation list (`dir/revoked.txt`) and
/// writes the new CRL to `dir/crl.pem`. Returns the CRL.
pub fn certs_revoke(dir: &Path, serial: u64) -> Result<String, CtlError> {
    let ca = load_ca(dir)?;
    let list = dir.join("revoked.txt");
    let mut revoked: BTreeSet<u64> = std::fs::read_to_string(&list)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    revoked.insert(serial);
    let serials: Vec<u64> = revoked.iter().copied().collect();
    // The CRL number grows with every CRL this CA issues.
    let crl = ca.revocation_list(&serials, serials.len() as u64 + now_ms() / 1000).map_err(usage)?;
    let text: String = serials.iter().map(|s| format!("{s}\n")).collect();
    KeyFile::Public.write(&list, &text).map_err(usage)?;
    KeyFile::Public.write(&dir.join("crl.pem"), &crl).map_err(usage)?;
    Ok(crl)
}

/// The serial of a certificate file.
pub fn serial_of(cert: &Path) -> Result<u64, CtlError> {
    let pem = read_pem(cert, KeyFile::Public).map_err(usage)?;
    certificate_serial(&pem).map_err(|e| usage(format!("{}: {e}", cert.display())))
}

// ----- connections ----------------------------------------------------------------

/// How `replctl` reaches the enterprise: admin credentials and the topology.
#[derive(Debug)]
pub struct Enterprise {
    topology: Topology,
    topology_file: PathBuf,
    tls: TlsSetup,
}

impl Enterprise {
    /// Loads credentials (`ca`, `cert`, `key`) and the topology file.
    pub fn load(ca: &Path, cert: &Path, key: &Path, topology_path: &Path) -> Result<Enterprise, CtlError> {
        let topology = read_topology(topology_path).map_err(usage)?;
        let ca = read_pem(ca, KeyFile::Public).map_err(usage)?;
        let cert = read_pem(cert, KeyFile::Public).map_err(usage)?;
        let key = read_pem(key, KeyFile::Secret).map_err(usage)?;
        let allowed = AllowedPeers::new(topology.appliances.iter().map(|a| a.id.clone()));
        let tls = TlsSetup::from_pem(&ca, &cert, &key, &[], allowed).map_err(usage)?;
        Ok(Enterprise { topology, topology_file: topology_path.to_path_buf(), tls })
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// A client of one appliance.
    pub fn one(&self, id: &NodeId) -> Result<RemoteStore, CtlError> {
        let a = self.topology.appliance(id).ok_or_else(|| usage(format!("{id} is not in the topology")))?;
        self.at(id, a.address)
    }

    /// A client of appliance `id` at `address` (one not in the topology file yet).
    pub fn at(&self, id: &NodeId, address: std::net::SocketAddr) -> Result<RemoteStore, CtlError> {
        let target = RemoteTarget { id: id.clone(), address };
        Ok(RemoteStore::new(self.tls.clone(), vec![target])
            .map_err(|e| CtlError::Connection(e.to_string()))?
            .with_timeouts(Duration::from_secs(3), Duration::from_secs(5)))
    }

    /// A client of `id`, or of every appliance that holds `stream` (in topology order,
    /// failing over).
    pub fn for_stream(&self, id: Option<&NodeId>, stream: StreamId) -> Result<RemoteStore, CtlError> {
        if let Some(id) = id {
            return self.one(id);
        }
        let targets = self
            .topology
            .holders(stream)
            .into_iter()
            .filter_map(|id| self.topology.appliance(&id).map(|a| RemoteTarget { id, address: a.address }))
            .collect();
        Ok(RemoteStore::new(self.tls.clone(), targets)
            .map_err(|e| CtlError::Connection(e.to_string()))?
            .with_timeouts(Duration::from_secs(3), Duration::from_secs(10)))
    }
}

async fn admin(client: &RemoteStore, call: AdminCall) -> Result<ClientReply, CtlError> {
    client
        .call(ClientCall::Admin(call))
        .await
        .map(|(_, r)| r)
        .map_err(|e| CtlError::Connection(e.to_string()))
}

fn vector_json(v: &VersionVector) -> serde_json::Value {
    serde_json::Value::Object(v.iter().map(|d| (format!("{:016x}", d.origin.0), json!(d.seq))).collect())
}

// ----- status ---------------------------------------------------------------------

/// `status`: every appliance, reachable or not, with its vectors and lag.
pub async fn status(e: &Enterprise, as_json: bool) -> Result<String, CtlError> {
    let mut rows = Vec::new();
    let mut unreachable = Vec::new();
    for a in &e.topology.appliances {
        let roles: Vec<String> = a.roles.iter().map(|r| format!("{r:?}").to_lowercase()).collect();
        let reply = admin(&e.one(&a.id)?, AdminCall::Status).await;
        let row = match reply {
            Ok(ClientReply::Status { incarnation, topology_epoch, streams, .. }) => json!({
                "appliance": a.id.as_str(), "site": a.site, "roles": roles, "reachable": true,
                "incarnation": format!("{:016x}", incarnation.0), "epoch": topology_epoch,
                "audit_backlog": streams.iter().filter(|s| s.stream == StreamId::Audit)
                    .flat_map(|s| s.lag.iter().map(|(_, n)| *n)).max().unwrap_or(0),
                "streams": streams.iter().map(|s| json!({
                    "stream": s.stream.name(),
                    "entries": s.vector.iter().map(|d| d.seq).sum::<u64>(),
                    "vector": vector_json(&s.vector),
                    "lag": s.lag.iter().map(|(p, n)| (p.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                })).collect::<Vec<_>>(),
            }),
            other => {
                unreachable.push(a.id.to_string());
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(r) => format!("unexpected answer {r:?}"),
                };
                json!({"appliance": a.id.as_str(), "site": a.site, "roles": roles, "reachable": false, "error": why})
            }
        };
        rows.push(row);
    }
    let out = if as_json {
        serde_json::to_string_pretty(&json!({ "enterprise": e.topology.enterprise, "appliances": rows }))
            .unwrap_or_default()
    } else {
        let mut text = format!(
            "{:<10} {:<6} {:<10} {:<10} {:>10} {:>10} {:>10}  lag (entries) per peer\n",
            "appliance", "site", "roles", "reachable", "enterprise", "sessions", "audit"
        );
        for r in &rows {
            let count = |name: &str| {
                r["streams"]
                    .as_array()
                    .and_then(|s| s.iter().find(|x| x["stream"] == name))
                    .map_or("-".to_string(), |x| x["entries"].to_string())
            };
            let lag: Vec<String> = r["streams"]
                .as_array()
                .map(|streams| {
                    streams
                        .iter()
                        .flat_map(|s| {
                            s["lag"]
                                .as_object()
                                .into_iter()
                                .flatten()
                                .filter(|(_, n)| n.as_u64() != Some(0))
                                .map(move |(p, n)| format!("{p}:{}={n}", s["stream"].as_str().unwrap_or("")))
                        })
                        .collect()
                })
                .unwrap_or_default();
            text.push_str(&format!(
                "{:<10} {:<6} {:<10} {:<10} {:>10} {:>10} {:>10}  {}\n",
                r["appliance"].as_str().unwrap_or(""),
                r["site"].as_str().unwrap_or(""),
                r["roles"]
                    .as_array()
                    .map(|v| v.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(","))
                    .unwrap_or_default(),
                if r["reachable"] == true { "yes" } else { "NO" },
                count("enterprise"),
                count("sessions"),
                count("audit"),
                if r["reachable"] == true {
                    if lag.is_empty() {
                        "caught up".to_string()
                    } else {
                        lag.join(" ")
                    }
                } else {
                    r["error"].as_str().unwrap_or("").to_string()
                },
            ));
        }
        text
    };
    if unreachable.is_empty() {
        Ok(out)
    } else {
        println!("{out}");
        Err(CtlError::CheckFailed(format!("unreachable: {}", unreachable.join(", "))))
    }
}

// ----- verify ---------------------------------------------------------------------

async fn tree(
    client: &RemoteStore,
    stream: StreamId,
    cutoff_ms: u64,
    level: u8,
    buckets: Vec<u32>,
) -> Result<(VersionVector, BTreeMap<u32, [u8; 32]>), CtlError> {
    match admin(client, AdminCall::Tree { stream, cutoff_ms, level, buckets }).await? {
        ClientReply::Tree { at, hashes } => {
            Ok((at, hashes.into_iter().map(|h| (h.bucket, h.hash)).collect()))
        }
        other => Err(CtlError::Connection(format!("unexpected answer {other:?}"))),
    }
}

/// `verify`: for each stream and group of appliances that must agree, compares the
/// hash-tree roots read at equal vectors (retrying while writes move them); when they
/// differ, descends to the differing leaf buckets and lists the keys whose versions
/// differ. Returns the report; an error of kind `CheckFailed` when anything differs.
pub async fn verify(e: &Enterprise, streams: &[StreamId]) -> Result<String, CtlError> {
    let mut report = String::new();
    let mut failures = Vec::new();
    for &stream in streams {
        for group in e.topology.replica_groups(stream) {
            let clients: Vec<(NodeId, RemoteStore)> =
                group.iter().map(|id| e.one(id).map(|c| (id.clone(), c))).collect::<Result<_, _>>()?;
            let cutoff = now_ms();
            let mut attempt = 0;
            let roots = loop {
                let mut roots = Vec::new();
                for (id, c) in &clients {
                    roots.push((id.clone(), tree(c, stream, cutoff, 0, vec![0]).await?));
                }
                let equal_vectors = roots.windows(2).all(|w| w[0].1 .0 == w[1].1 .0);
                attempt += 1;
                if equal_vectors || attempt >= 50 {
                    break (roots, equal_vectors);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            let (roots, equal_vectors) = roots;
            let names = group.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(", ");
            let same_root = roots.windows(2).all(|w| w[0].1 .1 == w[1].1 .1);
            if equal_vectors && same_root {
                report.push_str(&format!("{stream}: {names} agree at {} entries\n", sum(&roots[0].1 .0)));
                continue;
            }
            let why = if equal_vectors {
                "DIFFER at equal vectors"
            } else {
                "never held equal vectors in 10 s (writes ongoing or a replica behind); they differ"
            };
            // Descend: buckets whose hashes differ, level by level.
            let mut differing = vec![0u32];
            for level in 1..=repl_engine::tree::TREE_LEAF_LEVEL {
                let asked: Vec<u32> =
                    differing.iter().flat_map(|b| repl_engine::tree::children(*b)).collect();
                let mut per: Vec<BTreeMap<u32, [u8; 32]>> = Vec::new();
                for (_, c) in &clients {
                    per.push(tree(c, stream, cutoff, level, asked.clone()).await?.1);
                }
                differing = asked
                    .into_iter()
                    .filter(|b| per.windows(2).any(|w| w[0].get(b) != w[1].get(b)))
                    .collect();
            }
            let mut keys = BTreeSet::new();
            for bucket in &differing {
                let mut per = Vec::new();
                for (_, c) in &clients {
                    match admin(c, AdminCall::BucketEntries { stream, bucket: *bucket }).await? {
                        ClientReply::Entries { entries, .. } => per.push(
                            entries
                                .into_iter()
                                .map(|en| ((en.collection, en.key), en.dot))
                                .collect::<BTreeSet<_>>(),
                        ),
                        other => return Err(CtlError::Connection(format!("unexpected answer {other:?}"))),
                    }
                }
                let all: BTreeSet<_> = per.iter().flatten().cloned().collect();
                for item in all {
                    if per.iter().any(|p| !p.contains(&item)) {
                        keys.insert((item.0 .0, String::from_utf8_lossy(&item.0 .1).into_owned()));
                    }
                }
            }
            let line = format!(
                "{stream}: {names} {why} in {} leaf bucket(s) {:?}; keys: {}",
                differing.len(),
                differing.iter().take(20).collect::<Vec<_>>(),
                keys.iter().take(50).map(|(c, k)| format!("{c}/{k}")).collect::<Vec<_>>().join(", ")
            );
            report.push_str(&format!("{line}\n"));
            failures.push(line);
        }
    }
    if failures.is_empty() {
        Ok(report)
    } else {
        print!("{report}");
        Err(CtlError::CheckFailed(format!("{} group(s) differ", failures.len())))
    }
}

fn sum(v: &VersionVector) -> u64 {
    v.iter().map(|d| d.seq).sum()
}

// ----- topology changes -----------------------------------------------------------

/// Changes the topology by two-phase commit: reads the current topology from the
/// first appliance that answers, applies `edit`, sends the prepare to every appliance
/// of the proposed topology, and commits only if every one accepted (else aborts,
/// naming who refused or did not answer). On success the topology file is rewritten.
pub async fn change_topology(
    e: &Enterprise,
    edit: impl FnOnce(&mut Topology) -> Result<(), CtlError>,
) -> Result<String, CtlError> {
    let mut current = None;
    for a in &e.topology.appliances {
        if let Ok(ClientReply::Blob(bytes)) = admin(&e.one(&a.id)?, AdminCall::TopologyShow).await {
            current = Topology::decode(&bytes).ok();
            break;
        }
    }
    let current = current.ok_or_else(|| CtlError::Connection("no appliance answered".into()))?;
    let mut proposed = current.clone();
    edit(&mut proposed)?;
    let mut change = repl_engine::membership::TopologyChange::new(&current, proposed.clone(), now_ms(), 0)
        .map_err(|err| usage(err.to_string()))?;
    proposed.epoch = current.epoch + 1;
    let address = |id: &NodeId| proposed.appliance(id).map(|a| a.address);
    // Phase one: every vote, in parallel.
    let mut votes = Vec::new();
    while let Some((id, message)) = change.poll_transmit() {
        let repl_wire::PeerMessage::TopologyPrepare { expected_epoch, topology, .. } = message else {
            continue;
        };
        let Some(addr) = address(&id) else { continue };
        let client = e.at(&id, addr)?;
        votes.push(tokio::spawn(async move {
            let reply = admin(&client, AdminCall::TopologyPrepare { expected_epoch, topology }).await;
            (id, reply)
        }));
    }
    for vote in votes {
        let Ok((id, reply)) = vote.await else { continue };
        match reply {
            Ok(ClientReply::Done) => change.handle_vote(&id, proposed.epoch, true, String::new()),
            Ok(ClientReply::Error(err)) => change.handle_vote(&id, proposed.epoch, false, err.message),
            Ok(other) => {
                change.handle_vote(&id, proposed.epoch, false, format!("unexpected answer {other:?}"))
            }
            Err(CtlError::Connection(m)) if m.contains("refused") => {
                change.handle_vote(&id, proposed.epoch, false, m)
            }
            Err(_) => {} // no vote: named as unreachable below
        }
    }
    change.handle_timeout(u64::MAX);
    // Phase two: commit or abort everywhere.
    let encoded = postcard::to_allocvec(&proposed).map_err(usage)?;
    let mut not_applied = Vec::new();
    while let Some((id, message)) = change.poll_transmit() {
        let call = match message {
            repl_wire::PeerMessage::TopologyCommit { new_epoch } => AdminCall::TopologyCommit { new_epoch },
            repl_wire::PeerMessage::TopologyAbort { new_epoch } => {
                AdminCall::TopologyAbort { new_epoch, topology: encoded.clone() }
            }
            _ => continue,
        };
        let commit = matches!(call, AdminCall::TopologyCommit { .. });
        if let Some(addr) = address(&id) {
            if let Err(err) = admin(&e.at(&id, addr)?, call).await {
                if commit {
                    not_applied.push(format!("{id}: {err}"));
                }
            }
        }
    }
    match change.outcome() {
        Some(Ok(_)) if !not_applied.is_empty() => Err(CtlError::CheckFailed(format!(
            "committed, but not applied on: {} (they adopt it from their peers)",
            not_applied.join("; ")
        ))),
        Some(Ok(t)) => {
            let text = toml::to_string(t).map_err(usage)?;
            std::fs::write(&e.topology_file, text).map_err(|err| {
                usage(format!("committed, but cannot rewrite {}: {err}", e.topology_file.display()))
            })?;
            Ok(format!("topology epoch {} committed on {} appliance(s)\n", t.epoch, t.appliances.len()))
        }
        Some(Err(err)) => Err(CtlError::CheckFailed(format!("change refused: {err}"))),
        None => Err(CtlError::CheckFailed("change undecided".into())),
    }
}

/// `audit verify`: every audit holder checks every origin's hash chain.
pub async fn audit_verify(e: &Enterprise) -> Result<String, CtlError> {
    let mut out = String::new();
    let mut broken = Vec::new();
    for id in e.topology.holders(StreamId::Audit) {
        match admin(&e.one(&id)?, AdminCall::AuditVerify).await {
            Ok(ClientReply::Count(n)) => out.push_str(&format!("{id}: {n} audit records, chains intact\n")),
            Ok(other) => broken.push(format!("{id}: unexpected answer {other:?}")),
            Err(err) => broken.push(format!("{id}: {err}")),
        }
    }
    if broken.is_empty() {
        Ok(out)
    } else {
        print!("{out}");
        Err(CtlError::CheckFailed(broken.join("; ")))
    }
}

/// `certs revoke --push`: installs `crl` on every appliance; returns a line per
/// appliance.
pub async fn push_crl(e: &Enterprise, crl: &str) -> Result<String, CtlError> {
    let mut out = String::new();
    let mut failed = Vec::new();
    for a in &e.topology.appliances {
        match admin(&e.one(&a.id)?, AdminCall::InstallCrl { pem: crl.to_string() }).await {
            Ok(ClientReply::Count(closed)) => {
                out.push_str(&format!("{}: CRL installed, {closed} live connection(s) closed\n", a.id))
            }
            Ok(other) => failed.push(format!("{}: unexpected answer {other:?}", a.id)),
            Err(err) => failed.push(format!("{}: {err}", a.id)),
        }
    }
    if failed.is_empty() {
        Ok(out)
    } else {
        print!("{out}");
        Err(CtlError::Connection(format!("CRL not installed on: {}", failed.join("; "))))
    }
}

/// Parses a collection name.
pub fn collection(name: &str) -> Result<Collection, CtlError> {
    Collection::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Collection::ALL.iter().map(|c| c.name()).collect();
        usage(format!("unknown collection {name:?}; one of {}", names.join(", ")))
    })
}

/// Parses a stream name.
pub fn stream(name: &str) -> Result<StreamId, CtlError> {
    StreamId::ALL
        .into_iter()
        .find(|s| s.name() == name)
        .ok_or_else(|| usage(format!("unknown stream {name:?}; one of enterprise, sessions, audit")))
}

/// A path given on the command line or in an environment variable.
pub fn path_arg(given: Option<PathBuf>, env: &str, what: &str) -> Result<PathBuf, CtlError> {
    given
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
        .ok_or_else(|| usage(format!("give --{what} or set {env}")))
}
