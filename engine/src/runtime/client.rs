//! The remote store client: the store's API over the client protocol, with failover.
//!
//! A G4 service appliance (or any agent) holds an ordered list of appliances — the
//! database appliance of its own site first, then the other. Each call carries a fresh
//! idempotency key and is retried with the same key on the next appliance when the
//! current one does not answer, so a retry never applies twice. Every write returns a
//! causal token (its dot); reads carry the newest token of their stream, so after a
//! failover the other appliance answers only once it holds the client's own writes
//! (or answers a typed timeout).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use repl_wire::transport::{
    certificate_alert_name, client_endpoint, connect, recv_message, send_message, TlsSetup, TransportError,
};
use repl_wire::{
    AuditEvent, ClientCall, ClientReply, ClientRequest, Collection, Dot, ErrorCode, FrameReader, NodeId,
    ProtocolError, StreamId, ValueView, VersionVector, ALPN_CLIENT,
};

use super::lock;
use crate::rng::random_u64;

/// An appliance the client may talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTarget {
    /// Its id (checked against its certificate).
    pub id: NodeId,
    /// Where it listens.
    pub address: SocketAddr,
}

/// Why a remote call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No appliance of the list answered within the call's deadline.
    #[error("no appliance answered ({attempts} attempts); last failure: {last}")]
    Unavailable {
        /// Attempts made.
        attempts: u32,
        /// The last failure seen.
        last: String,
    },
    /// The appliance answered with an error.
    #[error("appliance {appliance} refused: {error}")]
    Refused {
        /// Who answered.
        appliance: NodeId,
        /// What it said.
        error: ProtocolError,
    },
    /// Every appliance of the list ended the TLS handshake over a certificate: it
    /// refused this client's (revoked, expired, from another CA, not allowed), or this
    /// client refused its. Retrying cannot help until a certificate changes, so the
    /// call ends at once instead of at its deadline.
    #[error(
        "every appliance's TLS handshake failed on a certificate (last {appliance}: TLS alert {alert} {}): {detail}",
        certificate_alert_name(*alert)
    )]
    Certificate {
        /// The last appliance tried.
        appliance: NodeId,
        /// The TLS alert (RFC 8446 section 6.2), e.g. 44 certificate_revoked.
        alert: u8,
        /// The transport's account of it.
        detail: String,
    },
    /// The appliance answered something that does not fit the call.
    #[error("appliance {0} answered out of protocol")]
    Unexpected(NodeId),
    /// The client endpoint could not be created.
    #[error("client endpoint: {0}")]
    Endpoint(#[from] TransportError),
}

impl ClientError {
    /// The error code, when the appliance answered one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { error, .. } => Some(error.code),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Index into the targets of the appliance in use, and its connection.
    current: usize,
    connection: Option<quinn::Connection>,
    /// Newest causal token per stream this client wrote.
    tokens: BTreeMap<StreamId, Dot>,
    failovers: u64,
}

/// The store's API over the client protocol, failing over along a list of appliances.
#[derive(Debug, Clone)]
pub struct RemoteStore {
    endpoint: quinn::Endpoint,
    tls: Arc<TlsSetup>,
    targets: Arc<Vec<RemoteTarget>>,
    /// How long one attempt may take.
    attempt_timeout: Duration,
    /// How long a call keeps trying the list.
    call_timeout: Duration,
    inner: Arc<std::sync::Mutex<Inner>>,
}

impl RemoteStore {
    /// A client of `targets`, tried in order, authenticating with `tls` (a client,
    /// admin or appliance certificate of the enterprise). Needs a tokio runtime.
    pub fn new(tls: TlsSetup, targets: Vec<RemoteTarget>) -> Result<RemoteStore, ClientError> {
        let bind = match targets.first().map(|t| t.address) {
            Some(SocketAddr::V6(_)) => SocketAddr::from(([0u16; 8], 0)),
            _ => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        Ok(RemoteStore {
            endpoint: client_endpoint(bind)?,
            tls: Arc::new(tls),
            targets: Arc::new(targets),
            attempt_timeout: Duration::from_secs(2),
            call_timeout: Duration::from_secs(10),
            inner: Arc::default(),
        })
    }

    /// Sets how long one attempt and a whole call (over every target) may take.
    pub fn with_timeouts(mut self, attempt: Duration, call: Duration) -> RemoteStore {
        self.attempt_timeout = attempt;
        self.call_timeout = call;
        self
    }

    /// The appliance currently in use.
    pub fn current(&self) -> Option<NodeId> {
        let inner = lock(&self.inner);
        self.targets.get(inner.current).map(|t| t.id.clone())
    }

    /// How many times the client moved to another appliance.
    pub fn failovers(&self) -> u64 {
        lock(&self.inner).failovers
    }

    /// Reads a key; waits (at the appliance) for this client's own newest write of the
    /// stream.
    pub async fn get(
        &self,
        collection: Collection,
        key: &[u8],
    ) -> Result<(Vec<ValueView>, VersionVector), ClientError> {
        let after = lock(&self.inner).tokens.get(&collection.stream()).copied();
        match self.call(ClientCall::Get { collection, key: key.to_vec(), after }).await? {
            (_, ClientReply::Values { values, context }) => Ok((values, context)),
            (who, _) => Err(ClientError::Unexpected(who)),
        }
    }

    /// Sets a key.
    pub async fn put(&self, collection: Collection, key: &[u8], value: &[u8]) -> Result<Dot, ClientError> {
        self.write(ClientCall::Put {
            collection,
            key: key.to_vec(),
            value: value.to_vec(),
            context: None,
            cas: false,
        })
        .await
    }

    /// Sets a key, superseding what `context` covers.
    pub async fn put_with_context(
        &self,
        collection: Collection,
        key: &[u8],
        value: &[u8],
        context: &VersionVector,
    ) -> Result<Dot, ClientError> {
        self.put_in_context(collection, key, value, context, false).await
    }

    /// Sets a key if `context` is still current (else `ContextMismatch`).
    pub async fn compare_and_put(
        &self,
        collection: Collection,
        key: &[u8],
        value: &[u8],
        context: &VersionVector,
    ) -> Result<Dot, ClientError> {
        self.put_in_context(collection, key, value, context, true).await
    }

    async fn put_in_context(
        &self,
        collection: Collection,
        key: &[u8],
        value: &[u8],
        context: &VersionVector,
        cas: bool,
    ) -> Result<Dot, ClientError> {
        let context = Some(context.clone());
        self.write(ClientCall::Put { collection, key: key.to_vec(), value: value.to_vec(), context, cas })
            .await
    }

    /// Deletes a key.
    pub async fn delete(&self, collection: Collection, key: &[u8]) -> Result<Dot, ClientError> {
        self.write(ClientCall::Delete { collection, key: key.to_vec(), context: None }).await
    }

    /// Keys of a collection from `start`.
    pub async fn scan_keys(
        &self,
        collection: Collection,
        start: &[u8],
        limit: u32,
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        match self.call(ClientCall::Scan { collection, start: start.to_vec(), limit }).await? {
            (_, ClientReply::Keys(keys)) => Ok(keys),
            (who, _) => Err(ClientError::Unexpected(who)),
        }
    }

    /// Creates a session record expiring at `expires_at_ms`.
    pub async fn session_create(
        &self,
        id: &str,
        record: &[u8],
        expires_at_ms: u64,
    ) -> Result<Dot, ClientError> {
        self.write(ClientCall::SessionCreate { id: id.to_string(), record: record.to_vec(), expires_at_ms })
            .await
    }

    /// Extends a live session.
    pub async fn session_touch(&self, id: &str, expires_at_ms: u64) -> Result<Dot, ClientError> {
        self.write(ClientCall::SessionTouch { id: id.to_string(), expires_at_ms }).await
    }

    /// Ends a session.
    pub async fn session_end(&self, id: &str) -> Result<Dot, ClientError> {
        self.write(ClientCall::SessionEnd { id: id.to_string() }).await
    }

    /// Appends an audit event.
    pub async fn append_audit(&self, event: AuditEvent) -> Result<Dot, ClientError> {
        self.write(ClientCall::AuditAppend(event)).await
    }

    /// Audit events of `user` (all users when `None`), oldest first.
    pub async fn audit_query(
        &self,
        user: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(Dot, AuditEvent)>, ClientError> {
        let call = ClientCall::AuditQuery {
            from_ms: None,
            until_ms: None,
            user: user.map(str::to_string),
            appliance: None,
            limit,
        };
        match self.call(call).await? {
            (_, ClientReply::Audit(found)) => Ok(found),
            (who, _) => Err(ClientError::Unexpected(who)),
        }
    }

    async fn write(&self, call: ClientCall) -> Result<Dot, ClientError> {
        let stream = call.write_stream().unwrap_or(StreamId::Sessions);
        match self.call(call).await? {
            (_, ClientReply::Written { token }) => {
                let mut inner = lock(&self.inner);
                let newest = inner.tokens.entry(stream).or_insert(token);
                if token.origin != newest.origin || token.seq > newest.seq {
                    *newest = token;
                }
                Ok(token)
            }
            (who, _) => Err(ClientError::Unexpected(who)),
        }
    }

    /// Sends `body` under a fresh idempotency key.
    pub async fn call(&self, body: ClientCall) -> Result<(NodeId, ClientReply), ClientError> {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&random_u64().to_le_bytes());
        key[8..].copy_from_slice(&random_u64().to_le_bytes());
        let reply = self.call_with_key(key, body).await?;
        let who =
            self.current().ok_or(ClientError::Unavailable { attempts: 0, last: "no targets".into() })?;
        match reply {
            ClientReply::Error(error) => Err(ClientError::Refused { appliance: who, error }),
            reply => Ok((who, reply)),
        }
    }

    /// Sends `body` under `key`, moving along the targets until one answers (an
    /// `Unavailable` or `Timeout` answer also moves on). Returns the answer as given.
    pub async fn call_with_key(&self, key: [u8; 16], body: ClientCall) -> Result<ClientReply, ClientError> {
        let request = ClientRequest { idempotency_key: key, body };
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let mut attempts = 0u32;
        let mut last = String::from("no attempt");
        let mut backoff = Duration::from_millis(50);
        // Which targets failed the handshake over a certificate in this call.
        let mut refused = vec![false; self.targets.len()];
        while tokio::time::Instant::now() < deadline && !self.targets.is_empty() {
            attempts += 1;
            let (index, target) = {
                let inner = lock(&self.inner);
                (inner.current, self.targets[inner.current % self.targets.len()].clone())
            };
            let attempt =
                tokio::time::timeout(self.attempt_timeout, self.attempt(index, &target, &request)).await;
            match attempt {
                Ok(Ok(ClientReply::Error(e)))
                    if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) =>
                {
                    last = format!("{}: {e}", target.id);
                }
                Ok(Ok(reply)) => return Ok(reply),
                Ok(Err(e)) => {
                    if let Some((alert, end)) = e.certificate_alert() {
                        refused[index % self.targets.len()] = true;
                        if refused.iter().all(|r| *r) {
                            let detail = end.to_string();
                            return Err(ClientError::Certificate {
                                appliance: target.id.clone(),
                                alert,
                                detail,
                            });
                        }
                    }
                    last = format!("{}: {e}", target.id);
                }
                Err(_) => last = format!("{}: no answer within {:?}", target.id, self.attempt_timeout),
            }
            // Move on to the next appliance of the list.
            {
                let mut inner = lock(&self.inner);
                if inner.current == index {
                    inner.current = (index + 1) % self.targets.len();
                    inner.connection = None;
                    inner.failovers += 1;
                }
            }
            if attempts as usize % self.targets.len() == 0 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        Err(ClientError::Unavailable { attempts, last })
    }

    async fn attempt(
        &self,
        index: usize,
        target: &RemoteTarget,
        request: &ClientRequest,
    ) -> Result<ClientReply, TransportError> {
        let cached = lock(&self.inner).connection.clone().filter(|c| c.close_reason().is_none());
        let conn = match cached {
            Some(c) => c,
            None => {
                let c = connect(&self.endpoint, &self.tls, ALPN_CLIENT, target.address, &target.id).await?;
                let mut inner = lock(&self.inner);
                if inner.current == index {
                    inner.connection = Some(c.clone());
                }
                c
            }
        };
        let (mut send, mut recv) = conn.open_bi().await?;
        send_message(&mut send, request).await?;
        let _ = send.finish();
        let mut reader = FrameReader::new();
        recv_message::<ClientReply>(&mut recv, &mut reader).await?.ok_or(TransportError::Truncated)
    }
}
