//! `repld demo`: a local enterprise of real `repld` processes on loopback.
//!
//! It generates an enterprise CA and certificates, a topology and one configuration
//! per appliance in a temporary directory, starts the appliances as child processes,
//! drives a workload of users, policies, enrollments, sessions and audit through the
//! client protocol, kills one appliance with SIGKILL in the middle of the workload,
//! shows that its site's agents fail over and keep their sessions, restarts it, and
//! checks that every acknowledged write is on every appliance that should hold it,
//! that replicas agree, and that audit reached every holder. Exit 0 only if every
//! check passed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use repl_engine::runtime::{RemoteStore, RemoteTarget};
use repl_engine::topology::{Appliance, ExternalServers, Generation, Role, Site, SiteKind, Topology};
use repl_wire::transport::{AllowedPeers, CertificateAuthority, Identity, TlsSetup, Validity};
use repl_wire::{
    AdminCall, AuditEvent, ClientCall, ClientReply, Collection, NodeId, StreamId, VersionVector,
};

/// Arguments of `repld demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// A G4 enterprise: two database and two service appliances over two sites
    /// (default: G3, two sites of two appliances, one audit holder per site).
    #[arg(long)]
    pub g4: bool,
    /// Logical writes per workload phase (each makes several records).
    #[arg(long, default_value_t = 300)]
    pub writes: u32,
    /// Keep certificates, configurations, data and logs in this directory.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// Setting up the enterprise failed.
    #[error("setup: {0}")]
    Setup(String),
    /// An appliance process failed.
    #[error("appliance {0}: {1}")]
    Appliance(String, String),
    /// A check failed.
    #[error("{count} check(s) failed: {list}")]
    Checks {
        /// How many.
        count: usize,
        /// Which, with details.
        list: String,
    },
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

fn free_udp() -> Result<SocketAddr, DemoError> {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map_err(setup("a free UDP port"))
}

fn free_tcp() -> Result<SocketAddr, DemoError> {
    TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map_err(setup("a free TCP port"))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One appliance of the demo: its files and, while running, its process.
struct Member {
    id: NodeId,
    site: String,
    roles: Vec<Role>,
    /// Its address in the topology (what peers and agents dial).
    address: SocketAddr,
    /// Where it listens: its address, unless a relay sits in between.
    listen: SocketAddr,
    metrics: SocketAddr,
    /// The network namespace it runs in (the soak as root), else the host's.
    netns: Option<String>,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A local enterprise of `repld` processes on loopback: its files, its processes,
/// and clients to reach them. `repld demo` drives one; the process tests too.
pub struct Demo {
    exe: PathBuf,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    ca: CertificateAuthority,
    topology: Topology,
    members: Vec<Member>,
    g4: bool,
    checks: Vec<(String, bool, String)>,
}

fn site(id: &str, name: &str, range: &str, failover: &str) -> Result<Site, DemoError> {
    Ok(Site {
        id: id.into(),
        name: name.into(),
        kind: SiteKind::Active,
        ranges: vec![range.parse().map_err(setup("range"))?],
        primary_failover: Some(failover.into()),
        secondary_failover: None,
        external: None,
    })
}

/// The demo's G3 enterprise: two sites of two appliances, one audit holder per site.
pub const G3_LAYOUT: &[(&str, &str, &[Role])] =
    &[("a1", "a", &[Role::Audit]), ("a2", "a", &[]), ("b1", "b", &[Role::Audit]), ("b2", "b", &[])];

/// The demo's G4 enterprise: a database and a service appliance in each of two sites.
pub const G4_LAYOUT: &[(&str, &str, &[Role])] = &[
    ("db1", "a", &[Role::Database]),
    ("db2", "b", &[Role::Database]),
    ("svc1", "a", &[Role::Service]),
    ("svc2", "b", &[Role::Service]),
];

impl Demo {
    /// Writes the files of an enterprise of `layout` ((id, site, roles); sites `a`
    /// and `b`) into `dir` (a fresh temporary directory when `None`); `exe` is the
    /// `repld` binary to start.
    pub fn create(
        exe: PathBuf,
        dir: Option<PathBuf>,
        g4: bool,
        layout: &[(&str, &str, &[Role])],
    ) -> Result<Demo, DemoError> {
        let (dir, temp) = match dir {
            Some(d) => {
                std::fs::create_dir_all(&d).map_err(setup("demo directory"))?;
                (d, None)
            }
            None => {
                let t =
                    tempfile::Builder::new().prefix("repld-demo-").tempdir().map_err(setup("temp dir"))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let ca = CertificateAuthority::create("demo", Validity::days_from_now(2)).map_err(setup("CA"))?;
        let mut members = Vec::new();
        for (id, site, roles) in layout {
            let address = free_udp()?;
            members.push(Member {
                id: NodeId::new(*id).map_err(setup("id"))?,
                site: site.to_string(),
                roles: roles.to_vec(),
                address,
                listen: address,
                metrics: free_tcp()?,
                netns: None,
                config: dir.join(format!("{id}.toml")),
                log: dir.join(format!("{id}.log")),
                child: None,
            });
        }
        let topology = Topology {
            enterprise: "demo".into(),
            generation: if g4 { Generation::G4 } else { Generation::G3 },
            epoch: 1,
            external: ExternalServers::default(),
            bootstrap: Some(members[0].id.clone()),
            sites: vec![
                site("a", "Headquarters", "10.1.0.0/16", "b")?,
                site("b", "Branch", "10.2.0.0/16", "a")?,
            ],
            appliances: members
                .iter()
                .map(|m| Appliance {
                    id: m.id.clone(),
                    name: m.id.to_string(),
                    site: m.site.clone(),
                    address: m.address,
                    roles: m.roles.iter().copied().collect(),
                })
                .collect(),
        };
        let demo = Demo { exe, dir, _temp: temp, ca, topology, members, g4, checks: Vec::new() };
        demo.write_files()?;
        Ok(demo)
    }

    fn write_files(&self) -> Result<(), DemoError> {
        let write = |name: &str, text: &str| {
            std::fs::write(self.dir.join(name), text)
                .map_err(|e| DemoError::Setup(format!("write {name}: {e}")))
        };
        write("ca.pem", self.ca.cert_pem())?;
        // The CA key, so `replctl certs` can issue and revoke for this enterprise.
        repl_wire::transport::KeyFile::Secret
            .write(&self.dir.join("ca.key"), self.ca.key_pem())
            .map_err(setup("write ca.key"))?;
        let topology = toml::to_string(&self.topology).map_err(setup("topology TOML"))?;
        write("topology.toml", &topology)?;
        for m in &self.members {
            let cert = self
                .ca
                .issue(&Identity::Appliance(m.id.clone()), Validity::days_from_now(2))
                .map_err(setup("issue"))?;
            write(&format!("{}.pem", m.id), &cert.cert_pem)?;
            write(&format!("{}.key", m.id), &cert.key_pem)?;
            let roles: Vec<String> = m.roles.iter().map(|r| format!("\"{}\"", role_name(*r))).collect();
            let pair = if m.roles.contains(&Role::Database) {
                "\n[serve]\npair_mode = \"sync-degrade\"\npair_timeout_ms = 500\n"
            } else {
                ""
            };
            let config = format!(
                "# repld configuration written by `repld demo`\n\
                 appliance = \"{id}\"\nsite = \"{site}\"\nroles = [{roles}]\ndata_dir = \"data/{id}\"\n\
                 listen = \"{listen}\"\nmetrics = \"{metrics}\"\ntopology_file = \"topology.toml\"\n\n\
                 [tls]\nca = \"ca.pem\"\ncert = \"{id}.pem\"\nkey = \"{id}.key\"\n{pair}",
                id = m.id,
                site = m.site,
                roles = roles.join(", "),
                listen = m.listen,
                metrics = m.metrics,
            );
            std::fs::write(&m.config, config).map_err(setup("write config"))?;
        }
        Ok(())
    }

    /// Moves every appliance to a new listening port, so that a relay can take its
    /// topology address (before any appliance starts); returns (topology address,
    /// listening address) per appliance, in layout order.
    pub fn interpose(&mut self) -> Result<Vec<(SocketAddr, SocketAddr)>, DemoError> {
        for m in &mut self.members {
            m.listen = free_udp()?;
        }
        self.write_files()?;
        Ok(self.members.iter().map(|m| (m.address, m.listen)).collect())
    }

    /// Moves appliance `i` to `address` inside network namespace `netns` (before any
    /// appliance starts): it listens there, and the topology names that address.
    pub fn place(&mut self, placement: Vec<(SocketAddr, String)>) -> Result<(), DemoError> {
        for ((m, a), (address, netns)) in
            self.members.iter_mut().zip(self.topology.appliances.iter_mut()).zip(placement)
        {
            m.address = address;
            m.listen = address;
            m.netns = Some(netns);
            a.address = address;
        }
        self.write_files()
    }

    /// `GET path` on the metrics port of appliance `index` (inside its namespace).
    pub async fn metrics_get(&self, index: usize, path: &str) -> std::io::Result<String> {
        let m = &self.members[index];
        match &m.netns {
            None => http_get(m.metrics, path).await,
            Some(ns) => {
                let (ns, addr) = (ns.clone(), m.metrics);
                let socket = tokio::task::spawn_blocking(move || {
                    crate::netns::connect_in(&ns, addr, HTTP_CONNECT_MAX)
                })
                .await
                .map_err(std::io::Error::other)??;
                socket.set_nonblocking(true)?;
                http_exchange(tokio::net::TcpStream::from_std(socket)?, path).await
            }
        }
    }

    /// The directory of the enterprise's files.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The appliances' ids, in layout order.
    pub fn ids(&self) -> Vec<NodeId> {
        self.members.iter().map(|m| m.id.clone()).collect()
    }

    /// The metrics address of appliance `index`.
    pub fn metrics(&self, index: usize) -> SocketAddr {
        self.members[index].metrics
    }

    /// The log of appliance `index` so far.
    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(&self.members[index].log).unwrap_or_default()
    }

    fn tls(&self, identity: Identity) -> Result<TlsSetup, DemoError> {
        let cert = self.ca.issue(&identity, Validity::days_from_now(2)).map_err(setup("issue"))?;
        let allowed = AllowedPeers::new(self.topology.appliances.iter().map(|a| a.id.clone()));
        TlsSetup::from_pem(self.ca.cert_pem(), &cert.cert_pem, &cert.key_pem, &[], allowed)
            .map_err(setup("tls"))
    }

    /// A client as `identity` of the appliances `ids`, tried in order.
    pub fn client(&self, identity: Identity, ids: &[&NodeId]) -> Result<RemoteStore, DemoError> {
        let targets = ids
            .iter()
            .filter_map(|id| self.member(id))
            .map(|m| RemoteTarget { id: m.id.clone(), address: m.address })
            .collect();
        Ok(RemoteStore::new(self.tls(identity)?, targets)
            .map_err(setup("client"))?
            .with_timeouts(Duration::from_secs(5), Duration::from_secs(30)))
    }

    fn member(&self, id: &NodeId) -> Option<&Member> {
        self.members.iter().find(|m| &m.id == id)
    }

    /// Starts appliance `index` as a child process (`repld --config`).
    pub fn start(&mut self, index: usize) -> Result<(), DemoError> {
        let exe = self.exe.clone();
        let m = &mut self.members[index];
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(&m.log).map_err(setup("log file"))?;
        let mut command = match &m.netns {
            // `ip netns exec` enters the namespace and execs repld: the process id
            // stays the appliance's, for signals and /proc.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let child = command
            .arg("--config")
            .arg(&m.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| DemoError::Appliance(m.id.to_string(), format!("cannot start: {e}")))?;
        m.child = Some(child);
        Ok(())
    }

    /// Waits until the appliance answers on its metrics port (it is ready then).
    pub async fn wait_ready(&mut self, index: usize) -> Result<(), DemoError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ready(index).await? {
            if Instant::now() > deadline {
                let id = self.members[index].id.to_string();
                return Err(DemoError::Appliance(id, "not ready within 30 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Whether appliance `index` answers on its metrics port yet; an error if its
    /// process exited.
    pub async fn ready(&mut self, index: usize) -> Result<bool, DemoError> {
        if self.metrics_get(index, "/metrics").await.is_ok() {
            return Ok(true);
        }
        let m = &mut self.members[index];
        if let Some(Ok(Some(status))) = m.child.as_mut().map(|c| c.try_wait()) {
            let log = std::fs::read_to_string(&m.log).unwrap_or_default();
            return Err(DemoError::Appliance(m.id.to_string(), format!("exited with {status}:\n{log}")));
        }
        Ok(false)
    }

    /// Sends `signal` to appliance `index` (SIGSTOP and SIGCONT pause and resume it).
    pub fn signal(&self, index: usize, signal: rustix::process::Signal) {
        if let Some(child) = &self.members[index].child {
            if let Some(pid) = i32::try_from(child.id()).ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, signal);
            }
        }
    }

    /// The process id of appliance `index`, while it runs.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.members[index].child.as_ref().map(Child::id)
    }

    /// Kills appliance `index` with SIGKILL and reaps it.
    pub fn kill(&mut self, index: usize) -> Result<(), DemoError> {
        let m = &mut self.members[index];
        if let Some(mut child) = m.child.take() {
            // std's kill sends SIGKILL: no drain, no flush, as in a power-cut-free crash.
            child.kill().map_err(|e| DemoError::Appliance(m.id.to_string(), format!("kill: {e}")))?;
            let _ = child.wait();
        }
        Ok(())
    }

    /// Stops appliance `index` with SIGTERM and waits for it to exit (up to 20 s,
    /// then SIGKILL); true if it exited cleanly.
    pub async fn stop(&mut self, index: usize) -> bool {
        self.signal(index, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        matches!(self.reap(index, deadline).await, Some(Some(status)) if status.success())
    }

    /// Waits until appliance `index` exits, or kills it at `deadline`: `None` if it was
    /// not running, `Some(None)` if it had to be killed, else its exit status.
    async fn reap(&mut self, index: usize, deadline: Instant) -> Option<Option<std::process::ExitStatus>> {
        let mut child = self.members[index].child.take()?;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(Some(status)),
                Ok(None) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Some(None);
                }
            }
        }
    }

    /// Stops every running appliance with SIGTERM (graceful) and checks the exits.
    pub async fn stop_all(&mut self) {
        for i in 0..self.members.len() {
            self.signal(i, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut exits = Vec::new();
        for i in 0..self.members.len() {
            let id = self.members[i].id.to_string();
            match self.reap(i, deadline).await {
                Some(Some(status)) => exits.push((id, status.success(), format!("{status}"))),
                Some(None) => exits.push((id, false, "did not stop within 20 s of SIGTERM".into())),
                None => {}
            }
        }
        let clean = exits.iter().all(|(_, ok, _)| *ok);
        let detail = exits.iter().map(|(id, _, s)| format!("{id}: {s}")).collect::<Vec<_>>().join(", ");
        self.check("every appliance stopped cleanly on SIGTERM", clean, detail);
    }

    /// Whether every check so far passed.
    pub fn all_passed(&self) -> bool {
        self.checks.iter().all(|(_, ok, _)| *ok)
    }

    fn check(&mut self, what: &str, ok: bool, detail: String) {
        println!(
            "  [{}] {what}{}",
            if ok { " ok " } else { "FAIL" },
            if detail.is_empty() { String::new() } else { format!(" ({detail})") }
        );
        self.checks.push((what.to_string(), ok, detail));
    }

    /// The appliances that hold `stream`.
    pub fn holders(&self, stream: StreamId) -> Vec<NodeId> {
        self.topology.holders(stream)
    }

    /// Groups of appliances that must hold the same data of `stream`.
    pub fn replica_groups(&self, stream: StreamId) -> Vec<Vec<NodeId>> {
        self.topology.replica_groups(stream)
    }
}

impl Drop for Demo {
    /// Never leaves a child behind (a failed check or a panic in a test included).
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Database => "database",
        Role::Service => "service",
        Role::Audit => "audit",
    }
}

/// How long a metrics request may take to connect.
const HTTP_CONNECT_MAX: Duration = Duration::from_secs(2);

/// A minimal HTTP/1.1 GET on loopback; the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let socket = tokio::time::timeout(HTTP_CONNECT_MAX, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
    http_exchange(socket, path).await
}

/// The request and answer of [`http_get`] on a connected socket.
async fn http_exchange(mut socket: tokio::net::TcpStream, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    socket.write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_string(&mut text))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read"))??;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    if text.starts_with("HTTP/1.1 200") {
        Ok(body)
    } else {
        Err(std::io::Error::other(format!("HTTP status: {}", text.lines().next().unwrap_or(""))))
    }
}

/// What the workload had acknowledged.
#[derive(Debug, Default)]
pub(crate) struct Acked {
    /// Enterprise records: (collection, key) → value.
    pub(crate) enterprise: BTreeMap<(Collection, Vec<u8>), Vec<u8>>,
    /// Sessions by the site of the agent that created them.
    pub(crate) sessions: BTreeMap<String, Vec<String>>,
    /// Audit events appended, by detail (unique).
    pub(crate) audit: Vec<String>,
    /// Operations acknowledged.
    pub(crate) ops: u64,
    /// Operations that failed after every retry.
    pub(crate) failed: u64,
}

/// One agent's share of a phase: `count` logical writes numbered from `first`.
pub(crate) async fn agent_work(
    client: RemoteStore,
    site: String,
    phase: u32,
    first: u32,
    count: u32,
    acked: Arc<std::sync::Mutex<Acked>>,
    progress: Arc<AtomicU64>,
) {
    for i in first..first + count {
        let user = format!("user-{site}-{phase}-{i}");
        let mut records: Vec<(Collection, Vec<u8>, Vec<u8>)> = vec![(
            Collection::Users,
            user.clone().into_bytes(),
            format!("{{\"name\":\"{user}\"}}").into_bytes(),
        )];
        if i % 3 == 0 {
            records.push((
                Collection::UserPolicies,
                format!("policy-{user}").into_bytes(),
                b"mfa=required".to_vec(),
            ));
            records.push((
                Collection::ComputerPolicies,
                format!("pc-{site}-{phase}-{i}").into_bytes(),
                b"lock=5m".to_vec(),
            ));
            records.push((
                Collection::SsoEnrollments,
                format!("{user}\u{1f}mail").into_bytes(),
                b"enrolled".to_vec(),
            ));
        }
        for (collection, key, value) in records {
            match client.put(collection, &key, &value).await {
                Ok(_) => {
                    let mut a = acked.lock().unwrap_or_else(|p| p.into_inner());
                    a.enterprise.insert((collection, key), value);
                    a.ops += 1;
                }
                Err(_) => acked.lock().unwrap_or_else(|p| p.into_inner()).failed += 1,
            }
        }
        let session = format!("sess-{site}-{phase}-{i}");
        let expires = now_ms() + 3_600_000;
        match client.session_create(&session, user.as_bytes(), expires).await {
            Ok(_) => {
                let mut a = acked.lock().unwrap_or_else(|p| p.into_inner());
                a.sessions.entry(site.clone()).or_default().push(session);
                a.ops += 1;
            }
            Err(_) => acked.lock().unwrap_or_else(|p| p.into_inner()).failed += 1,
        }
        let detail = format!("login {site}-{phase}-{i}");
        let event = AuditEvent {
            time_ms: now_ms(),
            user: user.clone(),
            appliance: site.clone(),
            action: "login".into(),
            detail: detail.clone(),
        };
        match client.append_audit(event).await {
            Ok(_) => {
                let mut a = acked.lock().unwrap_or_else(|p| p.into_inner());
                a.audit.push(detail);
                a.ops += 1;
            }
            Err(_) => acked.lock().unwrap_or_else(|p| p.into_inner()).failed += 1,
        }
        progress.fetch_add(1, Ordering::Relaxed);
    }
}

/// Prints progress until `done` reaches `total`.
async fn show_progress(label: String, total: u64, done: Arc<AtomicU64>, acked: Arc<std::sync::Mutex<Acked>>) {
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let ops_before = acked.lock().unwrap_or_else(|p| p.into_inner()).ops;
    loop {
        let n = done.load(Ordering::Relaxed);
        let ops = acked.lock().unwrap_or_else(|p| p.into_inner()).ops - ops_before;
        let width = 30;
        let filled = (n * width / total.max(1)) as usize;
        let rate = ops as f64 / start.elapsed().as_secs_f64().max(0.001);
        let bar = format!(
            "  {label} [{}{}] {n}/{total} writes, {ops} records, {rate:.0} records/s",
            "=".repeat(filled),
            " ".repeat(width as usize - filled)
        );
        if tty {
            print!("\r{bar}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        } else if n == total || start.elapsed().as_millis() % 2000 < 250 {
            println!("{bar}");
        }
        if n >= total {
            if tty {
                println!();
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs one workload phase on every agent, 4 concurrent writers each.
async fn phase(
    agents: &[(String, RemoteStore)],
    number: u32,
    writes: u32,
    acked: &Arc<std::sync::Mutex<Acked>>,
    progress: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    const WRITERS: u32 = 4;
    let per_agent = writes / agents.len() as u32;
    let mut tasks = Vec::new();
    for (site, client) in agents {
        for w in 0..WRITERS {
            let count = per_agent / WRITERS + u32::from(w < per_agent % WRITERS);
            let first = w * (per_agent / WRITERS) + w.min(per_agent % WRITERS);
            tasks.push(tokio::spawn(agent_work(
                client.clone(),
                site.clone(),
                number,
                first,
                count,
                acked.clone(),
                progress.clone(),
            )));
        }
    }
    tasks
}

/// The hash-tree root of `stream` on one appliance, read together with its vector
/// (sessions expired at `cutoff_ms` left out).
async fn tree_root(
    admin: &RemoteStore,
    stream: StreamId,
    cutoff_ms: u64,
) -> Option<(VersionVector, [u8; 32])> {
    let call = AdminCall::Tree { stream, cutoff_ms, level: 0, buckets: vec![0] };
    match admin.call(ClientCall::Admin(call)).await {
        Ok((_, ClientReply::Tree { at, hashes })) => Some((at, hashes.first()?.hash)),
        _ => None,
    }
}

/// Waits until every replica group of `stream` has equal vectors and hash-tree roots;
/// returns the time it took, or what still differs.
pub async fn converge(demo: &Demo, stream: StreamId, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let groups = demo.replica_groups(stream);
    let admins: BTreeMap<NodeId, RemoteStore> = groups
        .iter()
        .flatten()
        .filter_map(|id| demo.client(Identity::Admin("demo".into()), &[id]).ok().map(|c| (id.clone(), c)))
        .collect();
    let mut next_report = Duration::from_secs(10);
    loop {
        let mut differing = Vec::new();
        let cutoff_ms = now_ms();
        for group in &groups {
            let mut roots = Vec::new();
            for id in group {
                let root = match admins.get(id) {
                    Some(admin) => tree_root(admin, stream, cutoff_ms).await,
                    None => None,
                };
                roots.push((id, root));
            }
            let first = roots.first().and_then(|(_, r)| r.clone());
            if first.is_none() || roots.iter().any(|(_, r)| r != &first) {
                // Each appliance's entries held (the sum of its vector) and the root's
                // first bytes: a lagging replica, or equal vectors with other roots.
                let each: Vec<String> = roots
                    .iter()
                    .map(|(id, r)| match r {
                        Some((at, root)) => format!(
                            "{id} holds {} root {:02x}{:02x}{:02x}{:02x}",
                            at.iter().map(|d| d.seq).sum::<u64>(),
                            root[0],
                            root[1],
                            root[2],
                            root[3]
                        ),
                        None => format!("{id} did not answer"),
                    })
                    .collect();
                differing.push(format!(
                    "{} ({})",
                    group.iter().map(|i| i.to_string()).collect::<Vec<_>>().join("/"),
                    each.join("; ")
                ));
            }
        }
        if differing.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            return Err(format!("{stream} differs on {}", differing.join(", ")));
        }
        // A slow agreement says what still differs, every ten seconds.
        if start.elapsed() >= next_report {
            eprintln!(
                "  {stream} not yet equal after {:.0} s: {}",
                start.elapsed().as_secs_f64(),
                differing.join(", ")
            );
            next_report += Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many of the acknowledged `records` appliance `id` does not hold (with the
/// acknowledged value).
pub(crate) async fn missing_on(
    demo: &Demo,
    id: &NodeId,
    records: &BTreeMap<(Collection, Vec<u8>), Vec<u8>>,
) -> Result<usize, DemoError> {
    let reader = demo.client(Identity::Client("checker".into()), &[id])?;
    let wanted = records.iter().map(|((c, k), v)| (*c, k.clone(), Some(v.clone()))).collect();
    lacking(&reader, wanted).await
}

/// Reads running at once when checking what an appliance holds (one read at a time
/// took most of a long soak's verification: a round trip per key and holder).
const CHECK_READS_IN_FLIGHT: usize = 32;

/// How many of `keys` the appliance `reader` reaches lacks: a key is lacking unless
/// it has a live value, equal to the one given if one is. Reads run
/// [`CHECK_READS_IN_FLIGHT`] at a time; a read that fails counts as lacking.
pub(crate) async fn lacking(
    reader: &RemoteStore,
    keys: Vec<(Collection, Vec<u8>, Option<Vec<u8>>)>,
) -> Result<usize, DemoError> {
    let keys = Arc::new(keys);
    let mut readers = tokio::task::JoinSet::new();
    for first in 0..CHECK_READS_IN_FLIGHT.min(keys.len()) {
        let (reader, keys) = (reader.clone(), keys.clone());
        readers.spawn(async move {
            let mut lacking = 0;
            for (collection, key, want) in keys.iter().skip(first).step_by(CHECK_READS_IN_FLIGHT) {
                let held = match reader.get(*collection, key).await {
                    Ok((values, _)) => match want {
                        Some(want) => values.iter().any(|v| &v.value == want),
                        None => !values.is_empty(),
                    },
                    Err(_) => false,
                };
                lacking += usize::from(!held);
            }
            lacking
        });
    }
    let mut total = 0;
    while let Some(done) = readers.join_next().await {
        total += done.map_err(|e| DemoError::Setup(format!("a checking read task failed: {e}")))?;
    }
    Ok(total)
}

/// The details of every audit record appliance `id` holds, read in pages of 10,000
/// (the server's most per query), oldest first.
pub(crate) async fn audit_details(
    demo: &Demo,
    id: &NodeId,
) -> Result<std::collections::BTreeSet<String>, DemoError> {
    const PAGE: u32 = 10_000;
    let reader = demo.client(Identity::Client("checker".into()), &[id])?;
    let mut details = std::collections::BTreeSet::new();
    let mut from_ms = 0u64;
    loop {
        let call = ClientCall::AuditQuery {
            from_ms: Some(from_ms),
            until_ms: None,
            user: None,
            appliance: None,
            limit: PAGE,
        };
        let page = match reader.call(call).await {
            Ok((_, ClientReply::Audit(rows))) => rows,
            Ok((_, other)) => {
                return Err(DemoError::Appliance(id.to_string(), format!("unexpected answer {other:?}")))
            }
            Err(e) => return Err(DemoError::Appliance(id.to_string(), e.to_string())),
        };
        let Some(last) = page.last().map(|(_, e)| e.time_ms) else { return Ok(details) };
        let before = details.len();
        details.extend(page.into_iter().map(|(_, e)| e.detail));
        // A page is not known to be the last by its length (identical events are
        // reported once, so a page can come back short): read on from the last time
        // seen (inclusive; the set drops the overlap) until a page brings nothing new.
        if details.len() == before {
            return Ok(details);
        }
        from_ms = if last > from_ms { last } else { last + 1 };
    }
}

/// Runs the demo; prints progress, checks and the summary.
pub async fn run(args: DemoArgs) -> Result<(), DemoError> {
    let exe = std::env::current_exe().map_err(setup("own executable"))?;
    let layout = if args.g4 { G4_LAYOUT } else { G3_LAYOUT };
    let mut demo = Demo::create(exe, args.dir.clone(), args.g4, layout)?;
    let kind = if demo.g4 { "G4: 2 database + 2 service appliances" } else { "G3: 2 sites x 2 appliances" };
    println!("repld demo — {kind}, on loopback, files in {}", demo.dir.display());
    let outcome = drive(&mut demo, &args).await;
    demo.stop_all().await;
    let summary = match outcome {
        Ok(summary) => summary,
        Err(e) => {
            println!("  appliance logs are in {}", demo.dir.display());
            if args.dir.is_none() {
                // Keep the evidence of a failed run.
                if let Some(t) = demo._temp.take() {
                    let _ = t.keep();
                }
            }
            return Err(e);
        }
    };
    println!("\nSummary\n{summary}");
    let failed: Vec<String> = demo
        .checks
        .iter()
        .filter(|(_, ok, _)| !ok)
        .map(|(what, _, detail)| format!("{what} ({detail})"))
        .collect();
    if failed.is_empty() {
        println!("all {} checks passed", demo.checks.len());
        Ok(())
    } else {
        if let Some(t) = demo._temp.take() {
            println!("  appliance logs kept in {}", t.keep().display());
        }
        Err(DemoError::Checks { count: failed.len(), list: failed.join("; ") })
    }
}

async fn drive(demo: &mut Demo, args: &DemoArgs) -> Result<String, DemoError> {
    let started = Instant::now();
    for i in 0..demo.members.len() {
        demo.start(i)?;
    }
    for i in 0..demo.members.len() {
        demo.wait_ready(i).await?;
    }
    println!("  {} appliances started in {:.1} s", demo.members.len(), started.elapsed().as_secs_f64());

    // The agents of each site, and the appliance the demo will kill.
    let ids: Vec<NodeId> = demo.members.iter().map(|m| m.id.clone()).collect();
    let (victim, agent_a, agent_b) = if demo.g4 {
        // Agents reach the service appliances; db1 (site a's database) is killed.
        (0, vec![&ids[2], &ids[3]], vec![&ids[3], &ids[2]])
    } else {
        // Site a's agent uses a2 first, then its site peer a1: a2 is killed.
        (1, vec![&ids[1], &ids[0]], vec![&ids[2], &ids[3]])
    };
    let agents = vec![
        ("a".to_string(), demo.client(Identity::Client("agent-a".into()), &agent_a)?),
        ("b".to_string(), demo.client(Identity::Client("agent-b".into()), &agent_b)?),
    ];
    let acked = Arc::new(std::sync::Mutex::new(Acked::default()));

    // Phase 1: the workload on a healthy enterprise.
    let progress = Arc::new(AtomicU64::new(0));
    let writes = args.writes.max(8);
    let t1 = Instant::now();
    let shown = tokio::spawn(show_progress("phase 1".into(), writes as u64, progress.clone(), acked.clone()));
    for t in phase(&agents, 1, writes, &acked, &progress).await {
        let _ = t.await;
    }
    // Timed when the last write was acknowledged, not when the progress display
    // (which wakes every 250 ms) noticed.
    let written = Instant::now();
    let phase1_secs = written.duration_since(t1).as_secs_f64();
    let phase1_ops = acked.lock().unwrap_or_else(|p| p.into_inner()).ops;
    let lag1 = converge(demo, StreamId::Enterprise, Duration::from_secs(60)).await.map(|_| written.elapsed());
    let _ = shown.await;
    demo.check(
        "enterprise data converged after phase 1",
        lag1.is_ok(),
        lag1.as_ref()
            .map(|d| format!("{} ms after the last write", d.as_millis()))
            .unwrap_or_else(|e| e.clone()),
    );
    let sessions_before: Vec<String> = {
        let a = acked.lock().unwrap_or_else(|p| p.into_inner());
        a.sessions.get("a").cloned().unwrap_or_default()
    };
    let sessions_synced = converge(demo, StreamId::Sessions, Duration::from_secs(60)).await;
    demo.check(
        "sessions replicated within their site",
        sessions_synced.is_ok(),
        sessions_synced.err().unwrap_or_default(),
    );

    // Phase 2: the workload again; the victim is killed half-way through.
    let progress = Arc::new(AtomicU64::new(0));
    let shown = tokio::spawn(show_progress("phase 2".into(), writes as u64, progress.clone(), acked.clone()));
    let tasks = phase(&agents, 2, writes, &acked, &progress).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Relaxed) < writes as u64 / 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let victim_id = demo.members[victim].id.clone();
    demo.kill(victim)?;
    let killed_at = Instant::now();
    println!("\n  killed {victim_id} with SIGKILL mid-workload");
    for t in tasks {
        let _ = t.await;
    }
    let _ = shown.await;
    let failovers = agents[0].1.failovers();
    let (failed_ops, ops_after) = {
        let a = acked.lock().unwrap_or_else(|p| p.into_inner());
        (a.failed, a.ops)
    };
    demo.check(
        &format!("agents kept working through the loss of {victim_id}"),
        failed_ops == 0,
        format!("{failed_ops} operations failed after retries, {failovers} failover(s) by site a's agent"),
    );

    // The sessions created before the kill are served by the survivors, no new login.
    let mut missing = 0;
    for id in &sessions_before {
        match agents[0].1.get(Collection::Sessions, id.as_bytes()).await {
            Ok((values, _)) if !values.is_empty() => {}
            _ => missing += 1,
        }
    }
    demo.check(
        &format!(
            "sessions of site a survive without a new login (served by {})",
            agents[0].1.current().map(|c| c.to_string()).unwrap_or_default()
        ),
        missing == 0,
        format!("{} sessions read, {missing} missing", sessions_before.len()),
    );

    // Restart the victim: it catches up.
    demo.start(victim)?;
    demo.wait_ready(victim).await?;
    let restarted = Instant::now();
    let caught_up = converge(demo, StreamId::Enterprise, Duration::from_secs(60)).await;
    demo.check(
        &format!("{victim_id} caught up after its restart"),
        caught_up.is_ok(),
        caught_up
            .as_ref()
            .map(|d| format!("{} ms after it was ready", d.as_millis()))
            .unwrap_or_else(|e| e.clone()),
    );
    let sessions_synced = converge(demo, StreamId::Sessions, Duration::from_secs(60)).await;
    demo.check(
        "sessions agree within each site",
        sessions_synced.is_ok(),
        sessions_synced.err().unwrap_or_default(),
    );
    let audit_synced = converge(demo, StreamId::Audit, Duration::from_secs(60)).await;
    demo.check("audit holders agree", audit_synced.is_ok(), audit_synced.err().unwrap_or_default());

    // Every acknowledged write is on every appliance that should hold it.
    let (enterprise, audit) = {
        let a = acked.lock().unwrap_or_else(|p| p.into_inner());
        (a.enterprise.clone(), a.audit.clone())
    };
    for id in demo.holders(StreamId::Enterprise) {
        let lost = missing_on(demo, &id, &enterprise).await?;
        demo.check(
            &format!("every acknowledged enterprise write is on {id}"),
            lost == 0,
            format!("{} records, {lost} missing", enterprise.len()),
        );
    }
    for id in demo.holders(StreamId::Audit) {
        let details = audit_details(demo, &id).await?;
        let missing = audit.iter().filter(|d| !details.contains(d.as_str())).count();
        demo.check(
            &format!("every acknowledged audit record reached holder {id}"),
            missing == 0 && details.len() == audit.len(),
            format!("{} appended, {} held, {missing} missing", audit.len(), details.len()),
        );
    }

    // Metrics: every appliance reports its peers connected again.
    let mut metric_lines = Vec::new();
    for m in &demo.members {
        let text = http_get(m.metrics, "/metrics").await.unwrap_or_default();
        let connected =
            text.lines().filter(|l| l.starts_with("repl_peer_connected") && l.ends_with(" 1")).count();
        let peers = text.lines().filter(|l| l.starts_with("repl_peer_connected{")).count();
        metric_lines.push((m.id.to_string(), connected, peers));
    }
    let all_connected = metric_lines.iter().all(|(_, c, p)| c == p && *p > 0);
    demo.check(
        "metrics show every appliance connected to its peers",
        all_connected,
        metric_lines.iter().map(|(id, c, p)| format!("{id} {c}/{p}")).collect::<Vec<_>>().join(", "),
    );

    let mut summary = String::new();
    let _ = writeln!(summary, "  enterprise:        {kind}", kind = if demo.g4 { "G4" } else { "G3" });
    let _ = writeln!(
        summary,
        "  phase 1:           {phase1_ops} records in {phase1_secs:.2} s = {:.0} records/s (durable, over QUIC)",
        phase1_ops as f64 / phase1_secs
    );
    let _ = writeln!(
        summary,
        "  replication lag:   {} ms from the last phase-1 write to equal enterprise roots",
        lag1.map(|d| d.as_millis()).unwrap_or(0)
    );
    let _ = writeln!(summary, "  killed:            {victim_id} (SIGKILL) mid phase 2; site a's agent failed over {failovers} time(s)");
    let _ = writeln!(
        summary,
        "  catch-up:          {} ms after the restart ({} ms from the kill)",
        caught_up.as_ref().map(|d| d.as_millis()).unwrap_or(0),
        (restarted - killed_at).as_millis() + caught_up.as_ref().map(|d| d.as_millis()).unwrap_or(0)
    );
    let _ = writeln!(
        summary,
        "  acknowledged:      {ops_after} records ({} enterprise, {} audit), {failed_ops} failed",
        enterprise.len(),
        audit.len()
    );
    Ok(summary)
}
