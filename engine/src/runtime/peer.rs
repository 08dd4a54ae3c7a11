//! Peer connections: dialing with backoff, accepting (peers and clients), and the
//! session loop that drives one sync machine over one ordered QUIC stream.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use repl_wire::transport::{accept, connect, negotiated_alpn, recv_message, Identity};
use repl_wire::{FrameReader, NodeId, PeerMessage, StreamId, VersionVector, ALPN_PEER};

use super::{now_ms, serve, Shared};
use crate::rng::random_u64;
use crate::sync::{Outgoing, PeerSync, SyncEvent, SyncSetup};

/// Backoff between dial attempts: starts here, doubles, capped at [`BACKOFF_MAX_MS`].
const BACKOFF_MIN_MS: u64 = 100;
const BACKOFF_MAX_MS: u64 = 5_000;

/// Dials `peer` at `addr` for as long as the node runs.
pub(super) async fn dial(shared: Arc<Shared>, endpoint: quinn::Endpoint, peer: NodeId, addr: SocketAddr) {
    let mut backoff_ms = BACKOFF_MIN_MS;
    let mut last_failure = String::new();
    loop {
        if !super::peers_in_scope(&shared.topology(), &shared.config.me).contains_key(&peer) {
            super::lock(&shared.dialing).remove(&peer);
            return;
        }
        let attempt = async {
            let conn = match connect(&endpoint, &shared.tls(), ALPN_PEER, addr, &peer).await {
                Ok(conn) => conn,
                Err(e) => {
                    // Logged when the failure changes, not at every retry.
                    let failure = e.to_string();
                    if failure != last_failure {
                        tracing::warn!(%peer, %addr, error = %failure, "cannot connect to peer; retrying");
                        shared.error(format!("{peer}: cannot connect: {failure}"));
                        last_failure = failure;
                    }
                    return None;
                }
            };
            last_failure.clear();
            shared.track(&conn);
            let (send, recv) = conn.open_bi().await.ok()?;
            run_session(&shared, &conn, peer.clone(), send, recv).await;
            conn.close(quinn::VarInt::from_u32(0), b"session over");
            Some(())
        };
        if attempt.await.is_some() {
            backoff_ms = BACKOFF_MIN_MS;
        }
        // Jittered exponential backoff: half the step plus up to half again.
        let jitter = random_u64() % (backoff_ms / 2 + 1);
        tokio::time::sleep(Duration::from_millis(backoff_ms / 2 + jitter)).await;
        backoff_ms = (backoff_ms * 2).min(BACKOFF_MAX_MS);
    }
}

/// Accepts connections until the endpoint closes: appliances of the topology on the
/// peer protocol, clients on the client protocol.
pub(super) async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let (conn, identity) = match accept(incoming).await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(%remote, error = %e, "refused a connection");
                    shared.state().refused += 1;
                    shared.error(format!("refused a connection from {remote}: {e}"));
                    return;
                }
            };
            shared.track(&conn);
            if negotiated_alpn(&conn) != ALPN_PEER {
                return serve::serve_connection(shared, conn, identity).await;
            }
            let id = match identity {
                Identity::Appliance(id) if shared.state().peers.contains_key(&id) => id,
                other => {
                    tracing::warn!(%remote, identity = %other.uri(), "refused: not an in-scope appliance");
                    shared.state().refused += 1;
                    shared.error(format!("refused {} from {remote}: not an in-scope appliance", other.uri()));
                    conn.close(quinn::VarInt::from_u32(1), b"not an in-scope appliance");
                    return;
                }
            };
            let Ok((send, recv)) = conn.accept_bi().await else { return };
            run_session(&shared, &conn, id, send, recv).await;
            conn.close(quinn::VarInt::from_u32(0), b"session over");
        });
    }
}

fn vectors(shared: &Shared) -> Vec<VersionVector> {
    StreamId::ALL.iter().map(|s| shared.store.vector(*s)).collect()
}

/// Drives one session until the stream breaks or the node stops.
async fn run_session(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    peer: NodeId,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let config = &shared.config;
    let topology = shared.topology();
    let setup = SyncSetup {
        me: config.me.clone(),
        peer: peer.clone(),
        scope: topology.scope(&config.me, &peer),
        epoch: topology.epoch,
        session: random_u64(),
        peer_incarnation: None,
        config: config.sync,
    };
    let store = shared.store.clone();
    let mut machine = tokio::task::block_in_place(|| PeerSync::new(setup, now_ms(), &store));
    machine.set_queued_apply(true);
    let mut woken = shared.wake.subscribe();
    let mut reader = FrameReader::new();
    let mut established = false;
    let (mut entries_in, mut bytes_base) = (0u64, (0u64, 0u64));
    // The machine's counters as last added to the node's (they count per session).
    let mut published = crate::sync::SyncStats::default();
    // Sending never blocks reading: a writer task drains a small queue into the QUIC
    // stream while this loop keeps reading. (When both sides wrote inline, two peers
    // with full flow-control windows each waited for the other to read, forever: seen
    // after a SIGSTOPped appliance resumed.) Messages wait in `outbox` while the
    // writer is behind.
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<Outgoing>(OUT_QUEUE);
    let _writer = AbortOnDrop(tokio::spawn(write_messages(send, out_rx)));
    let mut outbox: VecDeque<Outgoing> = VecDeque::new();
    loop {
        while let Some(m) = machine.poll_outgoing() {
            queue_coalesced(&mut outbox, m);
        }
        while let Some(event) = machine.poll_event() {
            match event {
                SyncEvent::PeerError(e) => {
                    tracing::warn!(%peer, error = %e, "peer reported an error");
                    shared.error(format!("{peer}: {e}"))
                }
                SyncEvent::ApplyFailed(e) => {
                    tracing::error!(%peer, error = %e, "entries from the peer could not be applied");
                    shared.error(format!("{peer}: apply failed: {e}"))
                }
                SyncEvent::EpochDiffers { ours, theirs } => {
                    tracing::warn!(%peer, ours, theirs, "topology epochs differ");
                    shared.error(format!("{peer}: topology epoch {theirs} differs from ours {ours}"));
                    if theirs > ours {
                        shared.adopt_recorded_topology();
                    }
                }
                SyncEvent::PeerSession { incarnation } if super::is_retired(&store, &peer, incarnation) => {
                    tracing::warn!(%peer, %incarnation, "refused a retired incarnation (restored from a backup)");
                    shared.state().refused += 1;
                    shared.error(format!("{peer}: refused retired incarnation {incarnation}"));
                    conn.close(quinn::VarInt::from_u32(4), b"retired incarnation");
                    return closed(shared, &peer, established);
                }
                SyncEvent::NeedAntiEntropy { stream, origin, floor } => {
                    tracing::info!(%peer, %stream, %origin, floor, "the peer's log starts above what we hold: repairing")
                }
                SyncEvent::Repaired { stream, buckets_fetched, entries } => {
                    tracing::info!(%peer, %stream, buckets_fetched, entries, "repair from the peer completed")
                }
                _ => {}
            }
        }
        if machine.is_established() && !established {
            established = true;
            tracing::info!(%peer, "session established");
            let mut state = shared.state();
            let p = state.peers.entry(peer.clone()).or_default();
            p.live += 1;
            p.sessions += 1;
        }
        // Publish what the machine knows: the peer's acknowledgements and the counters.
        let stats = machine.stats();
        let udp = conn.stats().udp_rx.bytes;
        let udp_out = conn.stats().udp_tx.bytes;
        let acked_moved = {
            let now = now_ms();
            let mut state = shared.state();
            let p = state.peers.entry(peer.clone()).or_default();
            p.entries_out += stats.entries_sent - published.entries_sent;
            p.entries_relayed += stats.entries_relayed - published.entries_relayed;
            p.rewinds += stats.rewinds - published.rewinds;
            p.retransmits += stats.retransmits - published.retransmits;
            published = stats;
            p.entries_in += entries_in;
            entries_in = 0;
            p.bytes_in += udp - bytes_base.0;
            p.bytes_out += udp_out - bytes_base.1;
            bytes_base = (udp, udp_out);
            let mut moved = false;
            for stream in StreamId::ALL {
                let Some(acked) = machine.acked(stream) else { continue };
                if p.acked.get(&stream) != Some(acked) {
                    p.acked.insert(stream, acked.clone());
                    moved = true;
                }
                if p.sends.contains(&stream) {
                    p.track_lag(stream, now, &store.vector(stream), acked);
                }
            }
            moved
        };
        if acked_moved {
            shared.progress.send_modify(|v| *v += 1);
        }
        // Called in place: it reads the machine and the streams' vectors, whose reads
        // take no lock a commit or a checkpoint holds for long. `block_in_place` hands
        // the worker's queue to another thread on every call, and this runs on every
        // turn of the loop.
        let deadline = machine.poll_timeout(&store);
        let sleep =
            deadline.map_or(Duration::from_secs(3600), |t| Duration::from_millis(t.saturating_sub(now_ms())));
        tokio::select! {
            permit = out_tx.reserve(), if !outbox.is_empty() => {
                let (Ok(permit), Some(m)) = (permit, outbox.pop_front()) else {
                    return closed(shared, &peer, established);
                };
                permit.send(m);
            }
            () = out_tx.closed() => return closed(shared, &peer, established),
            message = recv_message::<PeerMessage>(&mut recv, &mut reader) => {
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => return closed(shared, &peer, established),
                    Err(e) => {
                        tracing::info!(%peer, error = %e, "session ended");
                        shared.error(format!("{peer}: session ended: {e}"));
                        return closed(shared, &peer, established);
                    }
                };
                if let PeerMessage::Entries { entries, .. } = &message {
                    entries_in += entries.len() as u64;
                }
                let before = vectors(shared);
                tokio::task::block_in_place(|| machine.handle_message(now_ms(), message, &store));
                if machine.take_queued() {
                    shared.commit.notify_one();
                }
                if vectors(shared) != before {
                    // Entries arrived: other sessions may push or relay them, and
                    // requests waiting on a causal token may proceed.
                    shared.notify();
                }
            }
            // Timers wait while messages are still queued here: what is not yet
            // written is not lost, and resending it would only grow the queue.
            () = tokio::time::sleep(sleep), if outbox.is_empty() => {
                tokio::task::block_in_place(|| machine.handle_timeout(now_ms(), &store));
            }
            changed = woken.changed() => {
                if changed.is_err() {
                    return closed(shared, &peer, established);
                }
                tokio::task::block_in_place(|| {
                    for stream in StreamId::ALL {
                        machine.handle_local_durable(now_ms(), stream, &store);
                    }
                });
            }
        }
    }
}

/// Queues `m` for the peer, folding an acknowledgement into one of the same stream that
/// is still waiting in `outbox`: each is the whole durable vector, so the newer says
/// all the older did. A peer that reads slowly was otherwise owed one per local commit.
fn queue_coalesced(outbox: &mut VecDeque<Outgoing>, m: Outgoing) {
    if let Outgoing::Message(PeerMessage::Ack { stream, vector }) = &m {
        let waiting = outbox.iter_mut().find_map(|q| match q {
            Outgoing::Message(PeerMessage::Ack { stream: s, vector: v }) if s == stream => Some(v),
            _ => None,
        });
        if let Some(waiting) = waiting {
            waiting.merge(vector);
            return;
        }
    }
    outbox.push_back(m);
}

/// Messages queued for the writer task beyond the one it is writing.
const OUT_QUEUE: usize = 64;

/// Writes queued messages until the queue closes or the stream fails.
async fn write_messages(mut send: quinn::SendStream, mut queue: tokio::sync::mpsc::Receiver<Outgoing>) {
    while let Some(m) = queue.recv().await {
        let frame = match m.encode_frame() {
            Ok(frame) => frame,
            Err(error) => {
                // Nothing the machine queues is too large for a frame; if something
                // were, the session ends (as a failed write ends it) rather than skip it.
                tracing::error!(%error, "a message to the peer does not encode");
                return;
            }
        };
        if send.write_all(&frame).await.is_err() {
            return;
        }
    }
}

/// Aborts a task when the session ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn closed(shared: &Shared, peer: &NodeId, established: bool) {
    if established {
        tracing::info!(%peer, "session closed");
        if let Some(p) = shared.state().peers.get_mut(peer) {
            p.live = p.live.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use repl_wire::{Dot, Incarnation, PeerMessage, StreamId, VersionVector};

    use super::*;

    fn ack(stream: StreamId, seq: u64) -> Outgoing {
        let vector: VersionVector = [Dot { origin: Incarnation(7), seq }].into_iter().collect();
        Outgoing::Message(PeerMessage::Ack { stream, vector })
    }

    #[test]
    fn a_waiting_acknowledgement_takes_in_later_ones_of_its_stream_only() {
        let mut outbox = VecDeque::new();
        let entries = Outgoing::Entries { stream: StreamId::Enterprise, entries: Vec::new() };
        for m in [
            ack(StreamId::Enterprise, 1),
            entries.clone(),
            ack(StreamId::Audit, 4),
            ack(StreamId::Enterprise, 2),
            ack(StreamId::Enterprise, 3),
            entries.clone(),
        ] {
            queue_coalesced(&mut outbox, m);
        }
        let want = vec![ack(StreamId::Enterprise, 3), entries.clone(), ack(StreamId::Audit, 4), entries];
        assert_eq!(Vec::from(outbox), want);
    }
}
