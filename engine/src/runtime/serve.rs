//! The client protocol (`repl-client/1`): one bidirectional stream per request, one
//! [`ClientRequest`] in, one [`ClientReply`] out.
//!
//! Writes are idempotent by the request's key: the answer (the causal token) is stored
//! durably as an expiring record of the `requests` collection, which replicates with
//! the sessions stream, so a retry here or, after a failover, at the site peer or the
//! other database appliance returns the first answer instead of writing again. A read
//! carrying a causal token waits until this appliance holds that write. A G4 service
//! appliance forwards everything but audit appends to its database appliances, with
//! the client's own idempotency key.

use std::sync::Arc;
use std::time::Duration;

use repl_wire::transport::{recv_message, send_message, Identity};
use repl_wire::{
    AdminCall, ClientCall, ClientReply, ClientRequest, Collection, ConflictView, Dot, ErrorCode, FrameReader,
    ProtocolError, StreamId, ValueView,
};
use serde::{Deserialize, Serialize};

use super::{now_ms, PairMode, PairTimeout, Shared};
use crate::audit::AuditQuery;
use crate::error::Error;
use crate::store::{PendingWrite, WriteBatch};
use crate::topology::Role;

/// Serves one client connection until it closes.
pub(super) async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection, identity: Identity) {
    let identity = Arc::new(identity);
    while let Ok((send, recv)) = conn.accept_bi().await {
        let shared = shared.clone();
        let identity = identity.clone();
        tokio::spawn(async move { serve_stream(&shared, &identity, send, recv).await });
    }
}

async fn serve_stream(
    shared: &Arc<Shared>,
    identity: &Identity,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::new();
    let reply = match recv_message::<ClientRequest>(&mut recv, &mut reader).await {
        Ok(Some(request)) => handle(shared, identity, request).await,
        Ok(None) => return,
        Err(e) => refuse(ErrorCode::BadRequest, format!("malformed request: {e}")),
    };
    {
        let mut state = shared.state();
        state.client_requests += 1;
        if matches!(reply, ClientReply::Error(_)) {
            state.client_errors += 1;
        }
    }
    if send_message(&mut send, &reply).await.is_ok() {
        let _ = send.finish();
        // Wait for the client to read the reply (or go away) before dropping the stream.
        let _ = send.stopped().await;
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> ClientReply {
    ClientReply::Error(ProtocolError { code, message: message.into() })
}

fn store_error(e: &Error) -> ClientReply {
    let code = match e {
        Error::ContextMismatch => ErrorCode::ContextMismatch,
        Error::Request(_) | Error::BatchTooLarge { .. } | Error::Record(_) => ErrorCode::BadRequest,
        _ => ErrorCode::Unavailable,
    };
    refuse(code, e.to_string())
}

/// What a `requests` record holds: the answer of a write.
#[derive(Debug, Serialize, Deserialize)]
struct Answered {
    stream: u8,
    token: Dot,
}

async fn handle(shared: &Arc<Shared>, identity: &Identity, request: ClientRequest) -> ClientReply {
    if let ClientCall::Admin(call) = &request.body {
        return match identity {
            Identity::Admin(_) => admin(shared, call),
            // An appliance joining through this one reads the topology.
            Identity::Appliance(_) if matches!(call, AdminCall::TopologyShow) => admin(shared, call),
            _ => refuse(ErrorCode::NotAuthorized, "administrative calls need an admin certificate"),
        };
    }
    if let Some(upstream) = &shared.config.upstream {
        // A service appliance: audit is recorded here and forwarded by the audit
        // stream; everything else is the database appliances' business.
        if !matches!(request.body, ClientCall::AuditAppend(_)) {
            return upstream.call_with_key(request.idempotency_key, request.body).await.unwrap_or_else(|e| {
                refuse(ErrorCode::Unavailable, format!("no database appliance answered: {e}"))
            });
        }
    }
    let Some(stream) = request.body.write_stream() else { return read(shared, request.body).await };
    // One request per key at a time: a retry racing its original waits for it.
    let slot = {
        let mut in_flight = super::lock(&shared.in_flight);
        in_flight.entry(request.idempotency_key).or_default().clone()
    };
    let reply = {
        let _turn = slot.lock().await;
        idempotent_write(shared, request.idempotency_key, stream, request.body).await
    };
    {
        let mut in_flight = super::lock(&shared.in_flight);
        if Arc::strong_count(&slot) <= 2 {
            in_flight.remove(&request.idempotency_key);
        }
    }
    reply
}

async fn idempotent_write(
    shared: &Arc<Shared>,
    key: [u8; 16],
    stream: StreamId,
    call: ClientCall,
) -> ClientReply {
    let store = &shared.store;
    let known = tokio::task::block_in_place(|| earlier_answer(store, &key));
    let answered = match known {
        Ok(answered) => answered,
        Err(e) => return store_error(&e),
    };
    if let Some(answered) = answered {
        // A retry: the first answer, once this appliance holds that write.
        let stream = StreamId::from_code(answered.stream).unwrap_or(stream);
        if !wait_for(shared, stream, answered.token, shared.config.serve.causal_wait_ms).await {
            return refuse(
                ErrorCode::Timeout,
                "the first attempt's write has not reached this appliance yet",
            );
        }
        return confirm(shared, &[(stream, answered.token)]).await;
    }
    let expires = now_ms() + shared.config.serve.request_ttl_ms;
    // In the enterprise stream the answer goes into the write's own batch: one durable
    // commit makes both durable, atomically, so an answer never exists without its write.
    let in_batch = stream == StreamId::Enterprise;
    let answer = in_batch.then_some((&key, expires));
    let pending = match tokio::task::block_in_place(|| submit(shared, call, answer)) {
        Ok(pending) => pending,
        Err(reply) => return reply,
    };
    if in_batch {
        let written = tokio::task::block_in_place(|| pending.wait());
        shared.notify();
        return match written.as_deref() {
            Ok([token, answer]) => confirm(shared, &[(stream, *token), (stream, *answer)]).await,
            Ok(_) => refuse(ErrorCode::Internal, "the write and its answer did not make two entries"),
            Err(e) => store_error(e),
        };
    }
    let Some(&token) = pending.dots().first() else {
        return refuse(ErrorCode::Internal, "the write produced no entry");
    };
    // The answer is remembered only once the write is durable, so a crash can only
    // make a retry write again, never answer for a write that is not there. A write
    // in the sessions stream shares the log with the answer, which is queued behind
    // it: one group commit makes both durable. An audit append is waited for first.
    let pending = if stream == StreamId::Sessions {
        Some(pending)
    } else {
        if let Err(e) = tokio::task::block_in_place(|| pending.wait()) {
            return store_error(&e);
        }
        None
    };
    let record = postcard::to_allocvec(&Answered { stream: stream.code(), token }).unwrap_or_default();
    // Outer error: the write itself failed (never acknowledged); inner: only its
    // answer could not be remembered (the write is durable; a retry may write again).
    let remembered = tokio::task::block_in_place(|| {
        let mut answer = WriteBatch::new();
        answer.put_expiring(Collection::Requests, &key, &record, expires);
        let answer = store.submit(answer);
        if let Some(pending) = pending {
            pending.wait()?;
        }
        Ok::<_, Error>(answer.and_then(|a| a.wait()))
    });
    shared.notify();
    match remembered {
        Err(e) => store_error(&e),
        // In synchronous pair mode the pair must hold the answer too, so that a retry
        // there after a failover finds it.
        Ok(Ok(dots)) => match dots.first() {
            Some(answer) => confirm(shared, &[(stream, token), (StreamId::Sessions, *answer)]).await,
            None => confirm(shared, &[(stream, token)]).await,
        },
        Ok(Err(e)) => {
            shared.error(format!("could not remember a request's answer: {e}"));
            confirm(shared, &[(stream, token)]).await
        }
    }
}

/// The answer given to an earlier attempt of the request `key`, if this appliance
/// holds one: a `requests` record, or a `write-answers` record whose write is the
/// entry just before it.
fn earlier_answer(store: &crate::Store, key: &[u8; 16]) -> Result<Option<Answered>, Error> {
    let read = store.get(Collection::WriteAnswers, key)?;
    if let [answer] = read.values.as_slice() {
        if let Some(seq) = answer.dot.seq.checked_sub(1).filter(|s| *s > 0) {
            let token = Dot { origin: answer.dot.origin, seq };
            return Ok(Some(Answered { stream: StreamId::Enterprise.code(), token }));
        }
    }
    let read = store.get(Collection::Requests, key)?;
    Ok(read.value().and_then(|v| postcard::from_bytes::<Answered>(v).ok()))
}

/// Collections the engine writes itself (audit through its own call, the answers of
/// requests): a client never puts or deletes their records.
fn engine_kept(collection: Collection) -> bool {
    matches!(collection, Collection::Audit | Collection::Requests | Collection::WriteAnswers)
}

/// The batch of a write call, submitted (not yet durable); its first dot is the
/// causal token.
/// `answer`, for a write in the enterprise stream, is the request's idempotency key and
/// its expiry: the answer record is added to the batch right after the write.
fn submit(
    shared: &Shared,
    call: ClientCall,
    answer: Option<(&[u8; 16], u64)>,
) -> Result<PendingWrite, ClientReply> {
    let store = &shared.store;
    let mut batch = WriteBatch::new();
    match call {
        ClientCall::Put { collection, key, value, context, cas } => {
            if engine_kept(collection) || collection == Collection::Sessions {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    format!("{collection} is written through its own calls, not put"),
                ));
            }
            match (context, cas) {
                (Some(ctx), true) => batch.compare_and_put(collection, &key, &value, &ctx),
                (None, true) => batch.compare_and_put(collection, &key, &value, &Default::default()),
                (Some(ctx), false) => batch.put_with_context(collection, &key, &value, &ctx),
                (None, false) => batch.put(collection, &key, &value),
            };
        }
        ClientCall::Delete { collection, key, context } => {
            if engine_kept(collection) {
                return Err(refuse(
                    ErrorCode::BadRequest,
                    format!("{collection} records are not deleted by clients"),
                ));
            }
            batch.delete(collection, &key, context.as_ref());
        }
        ClientCall::SessionCreate { id, record, expires_at_ms } => {
            batch.put_expiring(Collection::Sessions, id.as_bytes(), &record, expires_at_ms);
        }
        ClientCall::SessionTouch { id, expires_at_ms } => {
            let read = store.get(Collection::Sessions, id.as_bytes()).map_err(|e| store_error(&e))?;
            let Some(record) = read.value() else {
                return Err(refuse(ErrorCode::NotFound, format!("no live session {id}")));
            };
            batch.put_expiring(Collection::Sessions, id.as_bytes(), record, expires_at_ms);
        }
        ClientCall::SessionEnd { id } => {
            batch.delete(Collection::Sessions, id.as_bytes(), None);
        }
        ClientCall::AuditAppend(event) => {
            batch.audit(event);
        }
        _ => return Err(refuse(ErrorCode::BadRequest, "not a write")),
    }
    if let Some((key, expires)) = answer {
        batch.put_expiring(Collection::WriteAnswers, key, &[], expires);
    }
    store.submit(batch).map_err(|e| store_error(&e))
}

/// Waits until this appliance holds `dot` in `stream`, up to `wait_ms`.
async fn wait_for(shared: &Shared, stream: StreamId, dot: Dot, wait_ms: u64) -> bool {
    let mut progress = shared.progress.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        if shared.store.vector(stream).contains(dot) {
            return true;
        }
        if tokio::time::timeout_at(deadline, progress.changed()).await.is_err() {
            return false;
        }
    }
}

/// In synchronous pair mode, waits until the other database appliance acknowledged
/// the `writes` (the first is the client's causal token); then answers the client.
async fn confirm(shared: &Shared, writes: &[(StreamId, Dot)]) -> ClientReply {
    let Some(&(_, token)) = writes.first() else {
        return refuse(ErrorCode::Internal, "nothing to confirm");
    };
    let PairMode::Sync { timeout_ms, on_timeout } = shared.config.serve.pair else {
        return ClientReply::Written { token };
    };
    let topology = shared.topology();
    let me = &shared.config.me;
    let pair: Vec<_> = topology
        .appliances
        .iter()
        .filter(|a| {
            &a.id != me && a.has(Role::Database) && topology.scope(me, &a.id).send.contains(&writes[0].0)
        })
        .map(|a| a.id.clone())
        .collect();
    let mut progress = shared.progress.subscribe();
    // Once degraded, later writes wait only a tenth of the timeout until the pair
    // confirms one again: the pair may be dead but not yet noticed by its session.
    let degraded = shared.state().pair_degraded_mode;
    let wait_ms = if degraded && on_timeout == PairTimeout::Degrade { timeout_ms / 10 } else { timeout_ms };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    loop {
        let held = {
            let state = shared.state();
            pair.iter().all(|p| {
                writes.iter().all(|(stream, dot)| {
                    state.peers.get(p).and_then(|s| s.acked.get(stream)).is_some_and(|v| v.contains(*dot))
                })
            })
        };
        if held {
            if degraded {
                tracing::info!("pair mode restored: the other database appliance confirms again");
                shared.state().pair_degraded_mode = false;
            }
            return ClientReply::Written { token };
        }
        // Degrading mode does not make every write wait out the timeout while the
        // pair is known to be down.
        let pair_down = {
            let state = shared.state();
            pair.iter().any(|p| state.peers.get(p).is_none_or(|s| s.live == 0))
        };
        if pair_down && on_timeout == PairTimeout::Degrade {
            return degrade(shared, token);
        }
        if tokio::time::timeout_at(deadline, progress.changed()).await.is_err() {
            return match on_timeout {
                PairTimeout::FailClosed => refuse(
                    ErrorCode::Unavailable,
                    format!("the other database appliance did not confirm within {timeout_ms} ms"),
                ),
                PairTimeout::Degrade => degrade(shared, token),
            };
        }
    }
}

fn degrade(shared: &Shared, token: Dot) -> ClientReply {
    let mut state = shared.state();
    if !state.pair_degraded_mode {
        tracing::warn!(?token, "pair mode degraded: acknowledging without the other database appliance");
    }
    state.pair_degraded_mode = true;
    state.pair_degraded += 1;
    drop(state);
    shared.error(format!("pair mode degraded: {token:?} acknowledged without the pair"));
    ClientReply::Written { token }
}

async fn read(shared: &Arc<Shared>, call: ClientCall) -> ClientReply {
    let store = &shared.store;
    match call {
        ClientCall::Get { collection, key, after } => {
            if let Some(dot) = after {
                let wait = shared.config.serve.causal_wait_ms;
                if !wait_for(shared, collection.stream(), dot, wait).await {
                    return refuse(
                        ErrorCode::Timeout,
                        format!("this appliance did not receive write {dot:?} within {wait} ms"),
                    );
                }
            }
            match tokio::task::block_in_place(|| store.get(collection, &key)) {
                Ok(read) => ClientReply::Values {
                    values: read
                        .values
                        .into_iter()
                        .map(|v| ValueView { value: v.bytes, dot: v.dot, hlc: v.hlc })
                        .collect(),
                    context: read.context,
                },
                Err(e) => store_error(&e),
            }
        }
        ClientCall::Scan { collection, start, limit } => {
            ClientReply::Keys(store.scan_keys(collection, &start, limit.min(10_000) as usize))
        }
        ClientCall::AuditQuery { from_ms, until_ms, user, appliance, limit } => {
            let query =
                AuditQuery { from_ms, until_ms, user, appliance, limit: Some(limit.min(10_000) as usize) };
            match tokio::task::block_in_place(|| store.audit_query(&query)) {
                Ok(found) => {
                    // An event appended twice (a retry after its appliance died before
                    // answering and before shipping it) stays twice in the append-only
                    // chain, but is reported once: the copies are identical.
                    let mut seen = std::collections::BTreeSet::new();
                    let unique = found
                        .into_iter()
                        .filter(|a| seen.insert(postcard::to_allocvec(&a.record.event).unwrap_or_default()))
                        .map(|a| (a.dot, a.record.event))
                        .collect();
                    ClientReply::Audit(unique)
                }
                Err(e) => store_error(&e),
            }
        }
        _ => refuse(ErrorCode::BadRequest, "this call is not served here"),
    }
}

fn admin(shared: &Arc<Shared>, call: &AdminCall) -> ClientReply {
    let store = &shared.store;
    match call {
        AdminCall::Status => {
            let status = shared.status();
            ClientReply::Status {
                appliance: shared.config.me.clone(),
                incarnation: store.incarnation(),
                topology_epoch: shared.topology().epoch,
                streams: StreamId::ALL
                    .iter()
                    .map(|s| repl_wire::StreamStatus {
                        stream: *s,
                        vector: store.vector(*s),
                        lag: status
                            .peers
                            .iter()
                            .filter_map(|p| {
                                p.lag.iter().find(|l| l.stream == *s).map(|l| (p.id.clone(), l.entries))
                            })
                            .collect(),
                    })
                    .collect(),
            }
        }
        AdminCall::TopologyShow => ClientReply::Blob(shared.topology().encode()),
        AdminCall::TopologyPrepare { expected_epoch, topology } => {
            let Ok(proposed) = postcard::from_bytes::<crate::topology::Topology>(topology) else {
                return refuse(ErrorCode::BadRequest, "the proposed topology does not decode");
            };
            let vote = super::lock(&shared.membership).on_prepare(
                now_ms(),
                *expected_epoch,
                proposed.epoch,
                topology,
            );
            match vote {
                repl_wire::PeerMessage::TopologyVote { accept: true, .. } => ClientReply::Done,
                repl_wire::PeerMessage::TopologyVote { reason, .. } => refuse(
                    ErrorCode::ContextMismatch,
                    format!("{} refused the change: {reason}", shared.config.me),
                ),
                _ => refuse(ErrorCode::Internal, "no vote"),
            }
        }
        AdminCall::TopologyCommit { new_epoch } => {
            let committed = super::lock(&shared.membership).on_commit(*new_epoch).cloned();
            match committed {
                Some(t) => match shared.apply_topology(t) {
                    Ok(()) => ClientReply::Done,
                    Err(e) => refuse(ErrorCode::Unavailable, e),
                },
                None if shared.topology().epoch == *new_epoch => ClientReply::Done,
                None => {
                    refuse(ErrorCode::NotFound, format!("no change to epoch {new_epoch} is prepared here"))
                }
            }
        }
        AdminCall::TopologyAbort { topology, .. } => {
            super::lock(&shared.membership).on_abort_of(topology);
            ClientReply::Done
        }
        AdminCall::Tree { stream, cutoff_ms, level, buckets } => {
            let (at, hashes) =
                tokio::task::block_in_place(|| store.tree_hashes(*stream, *cutoff_ms, *level, buckets));
            ClientReply::Tree { at, hashes }
        }
        AdminCall::BucketEntries { stream, bucket } => {
            let mut entries = Vec::new();
            let mut resume = Vec::new();
            let at = loop {
                let chunk =
                    tokio::task::block_in_place(|| store.snapshot_chunk(*stream, &[*bucket], &resume, 4096));
                match chunk {
                    Ok((vector, mut found, next)) => {
                        entries.append(&mut found);
                        if next.is_empty() || entries.len() >= 60_000 {
                            break vector;
                        }
                        resume = next;
                    }
                    Err(e) => return store_error(&e),
                }
            };
            ClientReply::Entries { at, entries }
        }
        AdminCall::BackupChunk { stream, resume } => {
            // About 1 MiB of entries per chunk keeps each reply far below a frame.
            match tokio::task::block_in_place(|| store.snapshot_chunk(*stream, &[], resume, 2048)) {
                Ok((at, entries, resume)) => ClientReply::Chunk { at, entries, resume },
                Err(e) => store_error(&e),
            }
        }
        AdminCall::AuditVerify => match tokio::task::block_in_place(|| store.audit_verify()) {
            Ok(n) => ClientReply::Count(n),
            Err(e) => refuse(ErrorCode::Internal, format!("audit chain broken: {e}")),
        },
        AdminCall::InstallCrl { pem } => match shared.install_crl(pem) {
            Ok(closed) => ClientReply::Count(closed as u64),
            Err(e) => refuse(ErrorCode::BadRequest, format!("CRL not installed: {e}")),
        },
        AdminCall::Conflicts { collection } => {
            let (records, total) = store.conflicts(*collection);
            let records = records
                .into_iter()
                .map(|c| ConflictView { key: c.key, loser: c.loser, value: c.value, winner: c.winner })
                .collect();
            ClientReply::Conflicts { records, total }
        }
        AdminCall::Verify { stream } => {
            let at = store.vector(*stream);
            match tokio::task::block_in_place(|| store.digest(*stream)) {
                Ok(root) => ClientReply::Root { at, root },
                Err(e) => store_error(&e),
            }
        }
        _ => refuse(ErrorCode::BadRequest, "this administrative call is not served by this build yet"),
    }
}
