//! Network namespaces for `repl-soak` when it runs as root: every appliance gets a
//! network of its own, and partitions are made by the kernel, not by a relay.
//!
//! The layout: one namespace per appliance (`rsoak<pid>-<id>`), each with one veth
//! link to a router namespace (`rsoak<pid>-r`) that forwards between them, and one
//! veth link from the router to the namespace the soak runs in, so agents and the
//! operator's checks reach every appliance as a remote client would. Appliance `i`
//! is `10.N.(i+1).2`, its router side `10.N.(i+1).1`; the soak's side is `10.N.0.2`,
//! with a route for `10.N.0.0/16` through the router. `N` is picked from the process
//! id and skipped while the host already uses it.
//!
//! A cut link is a policy rule in the router (`from A to B blackhole`): packets from
//! A to B leave A normally and vanish in the router, as on a real network that
//! fails; A sees no error. Traffic from the soak (agents, checks) is never cut. This
//! kernel offers neither netem nor traffic-control actions, so there is no delay,
//! duplication or reordering here; a lossy period flaps links instead (each
//! direction of each pair cut for a tick at random), and the relay (`relay.rs`)
//! stays the tool for the rest.
//!
//! Everything is removed on drop; namespaces left by a soak that was killed are
//! removed by the next one (their process id is gone).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use repl_engine::rng::SplitMix64;

/// What went wrong while building or changing the namespaces.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// An `ip` command failed.
    #[error("`ip {command}` failed: {detail}")]
    Command {
        /// The arguments.
        command: String,
        /// Its standard error, or why it could not run.
        detail: String,
    },
    /// Every candidate network `10.N.0.0/16` is in use on this host.
    #[error("no free 10.N.0.0/16 network for the namespaces (every candidate is in use)")]
    NoFreeNetwork,
}

/// Runs `ip args...` (with `input` on standard input, for `-batch -`).
fn ip(args: &[&str], input: Option<&str>) -> Result<String, NetnsError> {
    let failed = |detail: String| NetnsError::Command { command: args.join(" "), detail };
    let mut child = Command::new("ip")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(|e| failed(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(failed(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

/// The directory where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The rule preference of cut links (before the main table's lookup).
const CUT_RULE_PREF: &str = "100";

/// The state of the links between appliances.
#[derive(Debug, Default)]
struct Links {
    isolated: BTreeSet<usize>,
    /// Directed links cut by a lossy period's flapping.
    flapped: BTreeSet<(usize, usize)>,
    /// Directed links the router drops now (its rules).
    installed: BTreeSet<(usize, usize)>,
    /// Rules added or removed so far.
    changes: u64,
}

/// One namespace per appliance behind a router namespace; see the module docs.
#[derive(Debug)]
pub struct Namespaces {
    /// `rsoak<pid>`: the prefix of every name made here.
    tag: String,
    /// The second octet of every address.
    octet: u8,
    router: String,
    appliances: Vec<String>,
    links: Mutex<Links>,
}

/// Whether this process can make network namespaces: root, with iproute2, in a
/// sandbox that allows it (tried by making and removing one).
pub fn available() -> bool {
    if !rustix::process::geteuid().is_root() {
        return false;
    }
    let probe = format!("rsoak{}-probe", std::process::id());
    let made = ip(&["netns", "add", &probe], None).is_ok();
    made && ip(&["netns", "del", &probe], None).is_ok()
}

/// Connects a TCP stream from inside namespace `ns` (to reach an address only the
/// namespace has, such as an appliance's loopback metrics port).
pub fn connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    in_namespace(ns, move || TcpStream::connect_timeout(&addr, timeout))
}

/// Runs `work` in network namespace `ns`, on a thread spawned for it (so no other
/// thread's network changes); sockets it makes stay in `ns` after it returns, and
/// `/proc/sys/net` is that namespace's.
fn in_namespace<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let path = format!("{NETNS_DIR}/{ns}");
    std::thread::spawn(move || {
        let handle = std::fs::File::open(&path)?;
        rustix::thread::move_into_link_name_space(
            handle.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        work()
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

impl Namespaces {
    /// Builds the namespaces of `ids` (appliance ids, in layout order) and the router.
    pub fn create(ids: &[&str]) -> Result<Namespaces, NetnsError> {
        remove_stale();
        let pid = std::process::id();
        let octet = free_octet(pid)?;
        let tag = format!("rsoak{pid}");
        let ns = Namespaces {
            router: format!("{tag}-r"),
            appliances: ids.iter().map(|id| format!("{tag}-{id}")).collect(),
            tag,
            octet,
            links: Mutex::default(),
        };
        // On an error part-way, drop removes what was made.
        ns.build()?;
        Ok(ns)
    }

    fn build(&self) -> Result<(), NetnsError> {
        let (t, n, r) = (&self.tag, self.octet, self.router.as_str());
        ip(&["netns", "add", r], None)?;
        ip(&["-n", r, "link", "set", "lo", "up"], None)?;
        // Forwarding is a per-namespace setting: the host's own stays as it is.
        in_namespace(r, || std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")).map_err(|e| {
            NetnsError::Command {
                command: format!("netns exec {r} (write /proc/sys/net/ipv4/ip_forward)"),
                detail: e.to_string(),
            }
        })?;
        // The soak's own link to the router.
        let (host, gate) = (format!("{t}h"), format!("{t}g"));
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &gate], None)?;
        ip(&["link", "set", &gate, "netns", r], None)?;
        ip(&["addr", "add", &format!("10.{n}.0.2/24"), "dev", &host], None)?;
        ip(&["link", "set", &host, "up"], None)?;
        ip(&["-n", r, "addr", "add", &format!("10.{n}.0.1/24"), "dev", &gate], None)?;
        ip(&["-n", r, "link", "set", &gate, "up"], None)?;
        ip(&["route", "add", &format!("10.{n}.0.0/16"), "via", &format!("10.{n}.0.1")], None)?;
        for (i, name) in self.appliances.iter().enumerate() {
            let (inner, outer) = (format!("{t}a{i}"), format!("{t}b{i}"));
            let subnet = i + 1;
            ip(&["netns", "add", name], None)?;
            ip(&["-n", name, "link", "set", "lo", "up"], None)?;
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer], None)?;
            ip(&["link", "set", &inner, "netns", name], None)?;
            ip(&["link", "set", &outer, "netns", r], None)?;
            ip(&["-n", name, "addr", "add", &format!("10.{n}.{subnet}.2/24"), "dev", &inner], None)?;
            ip(&["-n", name, "link", "set", &inner, "up"], None)?;
            ip(&["-n", name, "route", "add", "default", "via", &format!("10.{n}.{subnet}.1")], None)?;
            ip(&["-n", r, "addr", "add", &format!("10.{n}.{subnet}.1/24"), "dev", &outer], None)?;
            ip(&["-n", r, "link", "set", &outer, "up"], None)?;
        }
        Ok(())
    }

    /// The namespace of appliance `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.appliances[i]
    }

    /// The address of appliance `i` (its only interface besides loopback).
    pub fn address(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octet, (i + 1) as u8, 2)
    }

    /// Cuts appliance `i` from every other appliance (agents still reach it).
    pub fn isolate(&self, i: usize) -> Result<(), NetnsError> {
        self.change(|l| {
            l.isolated.insert(i);
        })
    }

    /// Ends the isolation of appliance `i`.
    pub fn rejoin(&self, i: usize) -> Result<(), NetnsError> {
        self.change(|l| {
            l.isolated.remove(&i);
        })
    }

    /// During a lossy period: cuts each direction of each pair with probability
    /// `pct` percent until the next call.
    pub fn flap(&self, pct: u64, rng: &mut SplitMix64) -> Result<(), NetnsError> {
        let count = self.appliances.len();
        let cut = (0..count)
            .flat_map(|a| (0..count).map(move |b| (a, b)))
            .filter(|&(a, b)| a != b && rng.below(100) < pct)
            .collect();
        self.change(|l| l.flapped = cut)
    }

    /// Ends a lossy period: no link stays cut by flapping.
    pub fn end_flapping(&self) -> Result<(), NetnsError> {
        self.change(|l| l.flapped.clear())
    }

    /// Ends every cut.
    pub fn heal(&self) -> Result<(), NetnsError> {
        self.change(|l| {
            l.isolated.clear();
            l.flapped.clear();
        })
    }

    /// Directed links cut now.
    pub fn links_cut(&self) -> usize {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).installed.len()
    }

    /// Rules added and removed in the router so far.
    pub fn rule_changes(&self) -> u64 {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).changes
    }

    /// Applies `edit` to the links, then brings the router's rules in line with one
    /// `ip -batch`.
    fn change(&self, edit: impl FnOnce(&mut Links)) -> Result<(), NetnsError> {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        edit(&mut links);
        let count = self.appliances.len();
        let wanted: BTreeSet<(usize, usize)> = (0..count)
            .flat_map(|a| (0..count).map(move |b| (a, b)))
            .filter(|&(a, b)| {
                a != b
                    && (links.isolated.contains(&a)
                        || links.isolated.contains(&b)
                        || links.flapped.contains(&(a, b)))
            })
            .collect();
        let mut batch = String::new();
        let rule = |verb: &str, (a, b): (usize, usize)| {
            format!(
                "rule {verb} from {} to {} blackhole pref {CUT_RULE_PREF}\n",
                self.address(a),
                self.address(b)
            )
        };
        for &link in links.installed.difference(&wanted) {
            batch.push_str(&rule("del", link));
        }
        for &link in wanted.difference(&links.installed) {
            batch.push_str(&rule("add", link));
        }
        if batch.is_empty() {
            return Ok(());
        }
        ip(&["-n", &self.router, "-batch", "-"], Some(&batch))?;
        links.changes += batch.lines().count() as u64;
        links.installed = wanted;
        Ok(())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.appliances.iter().chain(std::iter::once(&self.router)) {
            let _ = ip(&["netns", "del", name], None);
        }
        // A namespace's links go with it, but asynchronously: remove the soak's end
        // now so its route is gone when this returns.
        let _ = ip(&["link", "del", &format!("{}h", self.tag)], None);
    }
}

/// A free second octet: `10.N.0.0/16` with no address or route of the host in it.
fn free_octet(pid: u32) -> Result<u8, NetnsError> {
    let used = ip(&["-o", "addr", "show"], None)? + &ip(&["route", "show"], None)?;
    (0..100u32)
        .map(|k| (100 + (pid + k) % 100) as u8)
        .find(|n| !used.contains(&format!("10.{n}.")))
        .ok_or(NetnsError::NoFreeNetwork)
}

/// Removes namespaces of soaks whose process is gone (killed before their drop ran).
fn remove_stale() {
    let Ok(list) = ip(&["netns", "list"], None) else { return };
    let mut stale_tags = BTreeSet::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix("rsoak") else { continue };
        let Some((pid, _)) = rest.split_once('-') else { continue };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name], None);
            stale_tags.insert(format!("rsoak{pid}h"));
        }
    }
    for host in stale_tags {
        let _ = ip(&["link", "del", &host], None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends a UDP datagram from appliance `from` to appliance `to` and reports
    /// whether it arrived within 800 ms. Both sockets are bound before anything is
    /// sent, so only the network can lose it.
    fn datagram_arrives(ns: &Namespaces, from: usize, to: usize) -> bool {
        let target = SocketAddr::from((ns.address(to), 47_000 + to as u16));
        let receiver =
            in_namespace(ns.name(to), move || std::net::UdpSocket::bind(target)).expect("receiver");
        receiver.set_read_timeout(Some(Duration::from_millis(800))).expect("timeout");
        let sender = in_namespace(ns.name(from), || std::net::UdpSocket::bind("0.0.0.0:0")).expect("sender");
        sender.send_to(b"probe", target).expect("send");
        let mut buf = [0u8; 16];
        receiver.recv_from(&mut buf).is_ok()
    }

    #[test]
    fn a_cut_link_drops_what_crosses_it_and_healing_restores_it() {
        if !available() {
            // CI runs as root where namespaces can be made, so there this test runs.
            eprintln!("skipped: this process cannot make network namespaces (root and iproute2 needed)");
            return;
        }
        let ns = Namespaces::create(&["x1", "x2", "x3"]).expect("namespaces");
        assert!(datagram_arrives(&ns, 0, 1), "x1 -> x2 before any cut");
        ns.isolate(1).expect("isolate");
        assert_eq!(ns.links_cut(), 4, "both directions of x2's two links");
        assert!(!datagram_arrives(&ns, 0, 1), "x1 -> x2 while x2 is isolated");
        assert!(!datagram_arrives(&ns, 1, 2), "x2 -> x3 while x2 is isolated");
        assert!(datagram_arrives(&ns, 0, 2), "x1 -> x3 is not cut");
        ns.rejoin(1).expect("rejoin");
        assert_eq!(ns.links_cut(), 0);
        assert!(datagram_arrives(&ns, 0, 1), "x1 -> x2 after healing");
        let router = ns.router.clone();
        drop(ns);
        assert!(
            !ip(&["netns", "list"], None).expect("list").contains(&router),
            "the router namespace is removed on drop"
        );
    }
}
