//! A loopback UDP relay in front of every appliance, for partitions and a bad network
//! without root: each appliance listens on a private port and the topology names the
//! relay's port instead. Every packet between two appliances crosses the relay of the
//! one it is sent to, which can drop it (a partition, or loss), delay it (reordering
//! what follows) or send it twice.
//!
//! The relay knows which appliance sent a packet by its source address: an appliance
//! dials from the socket it listens on. Packets from any other address (agents,
//! operators) are forwarded untouched. For each source the relay opens its own socket
//! towards the appliance, so the appliance sees one stable address per peer and its
//! answers can be told apart and sent back through the relay's public port.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use repl_engine::rng::SplitMix64;
use tokio::net::UdpSocket;

/// Loss, delay and duplication applied to every packet between two appliances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lossy {
    /// Packets dropped, in percent.
    pub drop_pct: u64,
    /// Packets sent twice, in percent.
    pub duplicate_pct: u64,
    /// Each copy is delayed by a uniform 0..=this many milliseconds (packets overtake
    /// each other).
    pub delay_max_ms: u64,
}

#[derive(Debug)]
struct Faults {
    /// Unordered pairs of appliance indices that cannot reach each other.
    cut: BTreeSet<(usize, usize)>,
    /// Appliances that reach no other appliance.
    isolated: BTreeSet<usize>,
    lossy: Option<Lossy>,
    rng: SplitMix64,
    dropped: u64,
    duplicated: u64,
    delayed: u64,
}

impl Faults {
    /// The delays of the copies of a packet `from` -> `to` to send (none: dropped).
    fn fate(&mut self, from: Option<usize>, to: usize) -> Vec<u64> {
        let Some(from) = from else { return vec![0] };
        if self.cut.contains(&(from.min(to), from.max(to)))
            || self.isolated.contains(&from)
            || self.isolated.contains(&to)
        {
            self.dropped += 1;
            return Vec::new();
        }
        let Some(l) = self.lossy else { return vec![0] };
        if self.rng.below(100) < l.drop_pct {
            self.dropped += 1;
            return Vec::new();
        }
        let copies = if self.rng.below(100) < l.duplicate_pct {
            self.duplicated += 1;
            2
        } else {
            1
        };
        let delays: Vec<u64> = (0..copies).map(|_| self.rng.below(l.delay_max_ms + 1)).collect();
        self.delayed += delays.iter().filter(|d| **d > 0).count() as u64;
        delays
    }
}

/// What the relay did to packets between appliances so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Packets dropped (partitions and loss).
    pub dropped: u64,
    /// Packets sent twice.
    pub duplicated: u64,
    /// Packet copies delayed.
    pub delayed: u64,
}

/// The relays of one enterprise, and the faults they apply.
pub struct Relay {
    faults: Arc<Mutex<Faults>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn lock(faults: &Mutex<Faults>) -> std::sync::MutexGuard<'_, Faults> {
    faults.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Relay {
    /// Starts a relay at each appliance's topology address forwarding to where it
    /// listens; `appliances` as [`crate::demo::Demo::interpose`] returns them. The
    /// seed makes loss and delays repeatable.
    pub async fn start(appliances: &[(SocketAddr, SocketAddr)], seed: u64) -> std::io::Result<Relay> {
        let faults = Arc::new(Mutex::new(Faults {
            cut: BTreeSet::new(),
            isolated: BTreeSet::new(),
            lossy: None,
            rng: SplitMix64::new(seed),
            dropped: 0,
            duplicated: 0,
            delayed: 0,
        }));
        let senders: Arc<HashMap<SocketAddr, usize>> =
            Arc::new(appliances.iter().enumerate().map(|(i, (_, listen))| (*listen, i)).collect());
        let mut tasks = Vec::new();
        for (to, (front, listen)) in appliances.iter().enumerate() {
            let socket = Arc::new(UdpSocket::bind(front).await?);
            tasks.push(tokio::spawn(front_loop(socket, *listen, to, senders.clone(), faults.clone())));
        }
        Ok(Relay { faults, tasks })
    }

    /// Appliances `a` and `b` cannot reach each other until healed.
    pub fn cut(&self, a: usize, b: usize) {
        if a != b {
            lock(&self.faults).cut.insert((a.min(b), a.max(b)));
        }
    }

    /// Appliance `a` reaches no other appliance (agents still reach it) until it
    /// rejoins.
    pub fn isolate(&self, a: usize) {
        lock(&self.faults).isolated.insert(a);
    }

    /// Appliance `a` is no longer isolated (pairs cut stay cut).
    pub fn rejoin(&self, a: usize) {
        lock(&self.faults).isolated.remove(&a);
    }

    /// No pair is cut, no appliance isolated, the network is clean.
    pub fn heal(&self) {
        let mut f = lock(&self.faults);
        f.cut.clear();
        f.isolated.clear();
        f.lossy = None;
    }

    /// Loss, delay and duplication between appliances from now on (`None`: a clean
    /// network).
    pub fn set_lossy(&self, lossy: Option<Lossy>) {
        lock(&self.faults).lossy = lossy;
    }

    /// What was done to packets so far.
    pub fn stats(&self) -> RelayStats {
        let f = lock(&self.faults);
        RelayStats { dropped: f.dropped, duplicated: f.duplicated, delayed: f.delayed }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Sends `packet` through `socket` (to `dest`, or where it is connected) after each
/// of `delays`; a delayed copy goes from a task of its own, so later packets overtake it.
async fn forward(socket: &Arc<UdpSocket>, dest: Option<SocketAddr>, packet: &[u8], delays: Vec<u64>) {
    async fn send(socket: &UdpSocket, dest: Option<SocketAddr>, packet: &[u8]) {
        let _ = match dest {
            Some(dest) => socket.send_to(packet, dest).await,
            None => socket.send(packet).await,
        };
    }
    for delay in delays {
        if delay == 0 {
            send(socket, dest, packet).await;
        } else {
            let (socket, packet) = (socket.clone(), packet.to_vec());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                send(&socket, dest, &packet).await;
            });
        }
    }
}

/// Receives on an appliance's topology address and forwards to where it listens,
/// through one socket per source (whose answers go back to that source).
async fn front_loop(
    front: Arc<UdpSocket>,
    listen: SocketAddr,
    to: usize,
    senders: Arc<HashMap<SocketAddr, usize>>,
    faults: Arc<Mutex<Faults>>,
) {
    let mut upstream: HashMap<SocketAddr, (Arc<UdpSocket>, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, source) = match front.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let from = senders.get(&source).copied();
        let socket = match upstream.get(&source) {
            Some((socket, _)) => socket.clone(),
            None => {
                let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else { continue };
                if socket.connect(listen).await.is_err() {
                    continue;
                }
                let socket = Arc::new(socket);
                let back = tokio::spawn(back_loop(
                    socket.clone(),
                    front.clone(),
                    source,
                    (to, from),
                    faults.clone(),
                ));
                upstream.insert(source, (socket.clone(), back));
                socket
            }
        };
        let delays = lock(&faults).fate(from, to);
        forward(&socket, None, &buf[..n], delays).await;
    }
}

/// Forwards an appliance's answers to `source` back through its topology address.
async fn back_loop(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    source: SocketAddr,
    (appliance, peer): (usize, Option<usize>),
    faults: Arc<Mutex<Faults>>,
) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = match upstream.recv(&mut buf).await {
            Ok(n) => n,
            // While the appliance is down (killed) the kernel reports the ICMP port
            // unreachable of an earlier packet on this connected socket; it answers
            // again once restarted on the same port, so this socket must live on.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let delays = match peer {
            Some(peer) => lock(&faults).fate(Some(appliance), peer),
            None => vec![0],
        };
        forward(&front, Some(source), &buf[..n], delays).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        echo_at("127.0.0.1:0".parse().expect("addr")).await
    }

    /// An echo server on `addr`.
    async fn echo_at(addr: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let s = UdpSocket::bind(addr).await.expect("bind");
        let addr = s.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        (addr, task)
    }

    async fn free() -> SocketAddr {
        UdpSocket::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr")
    }

    /// Appliance 0 is an echo server behind a relay; appliance 1 is a socket of ours.
    struct Setup {
        relay: Relay,
        one: UdpSocket,
        front0: SocketAddr,
        echo_addr: SocketAddr,
        echo: tokio::task::JoinHandle<()>,
    }

    async fn setup(seed: u64) -> Setup {
        let (echo_addr, echo) = echo().await;
        let one = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let (front0, front1) = (free().await, free().await);
        let relay = Relay::start(&[(front0, echo_addr), (front1, one.local_addr().expect("addr"))], seed)
            .await
            .expect("relay");
        Setup { relay, one, front0, echo_addr, echo }
    }

    /// Sends `payload` to `to`; the echo back within `within`, if any.
    async fn round_trip(
        from: &UdpSocket,
        to: SocketAddr,
        payload: &[u8],
        within: Duration,
    ) -> Option<Vec<u8>> {
        from.send_to(payload, to).await.expect("send");
        let mut buf = [0u8; 1500];
        match tokio::time::timeout(within, from.recv_from(&mut buf)).await {
            Ok(Ok((n, source))) => {
                assert_eq!(source, to, "answers come back from the relay's address");
                Some(buf[..n].to_vec())
            }
            _ => None,
        }
    }

    /// The echo of `payload` comes back (waited for up to 5 s).
    async fn passes(from: &UdpSocket, to: SocketAddr, payload: &[u8]) -> bool {
        round_trip(from, to, payload, Duration::from_secs(5)).await.as_deref() == Some(payload)
    }

    /// Nothing comes back for 300 ms.
    async fn dropped(from: &UdpSocket, to: SocketAddr, payload: &[u8]) -> bool {
        round_trip(from, to, payload, Duration::from_millis(300)).await.is_none()
    }

    #[tokio::test]
    async fn forwards_both_ways_and_a_cut_drops_until_healed() {
        let Setup { relay, one, front0, .. } = setup(7).await;
        assert!(passes(&one, front0, b"hello").await);
        relay.cut(1, 0);
        assert!(dropped(&one, front0, b"cut").await);
        assert!(relay.stats().dropped >= 1);
        // Someone who is not an appliance is never cut.
        let agent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        assert!(passes(&agent, front0, b"agent").await);
        relay.heal();
        assert!(passes(&one, front0, b"again").await);
        relay.isolate(0);
        assert!(dropped(&one, front0, b"isolated").await);
        relay.rejoin(0);
        assert!(passes(&one, front0, b"back").await);
    }

    #[tokio::test]
    async fn an_appliance_restarted_on_its_port_is_reached_again() {
        //! Regression: the relay's socket towards an appliance got "connection refused"
        //! while the appliance was down (SIGKILLed) and its answer task ended, so a
        //! restarted appliance's answers never came back and its peers could not
        //! reconnect: the soak saw sessions dead for good after a kill.
        let Setup { relay: _relay, one, front0, echo_addr, echo } = setup(5).await;
        assert!(passes(&one, front0, b"up").await);
        echo.abort();
        let _ = echo.await;
        // Down: packets are refused by the kernel, nothing comes back.
        for _ in 0..3 {
            assert!(dropped(&one, front0, b"down").await);
        }
        // Restarted on the same port.
        let (_, _echo) = echo_at(echo_addr).await;
        assert!(passes(&one, front0, b"back").await);
    }

    #[tokio::test]
    async fn a_lossy_network_drops_duplicates_and_reorders() {
        let Setup { relay, one, front0, echo: _echo, .. } = setup(11).await;
        relay.set_lossy(Some(Lossy { drop_pct: 20, duplicate_pct: 20, delay_max_ms: 20 }));
        for i in 0..200u32 {
            one.send_to(&i.to_be_bytes(), front0).await.expect("send");
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_millis(300), one.recv_from(&mut buf)).await
        {
            got.push(u32::from_be_bytes(buf[..n].try_into().expect("4 bytes")));
        }
        let distinct: BTreeSet<u32> = got.iter().copied().collect();
        assert!(distinct.len() < 200, "nothing was dropped");
        assert!(got.len() > distinct.len(), "nothing was duplicated");
        assert!(got.windows(2).any(|w| w[0] > w[1]), "nothing was reordered");
        let stats = relay.stats();
        assert!(stats.dropped > 0 && stats.duplicated > 0 && stats.delayed > 0, "{stats:?}");
    }
}
