//! Prometheus text metrics and a small status page, served on a loopback HTTP port.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use repl_wire::{Collection, StreamId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Node, Shared};
use crate::storage::SYNC_LATENCY_BOUNDS_US;

/// Why the metrics server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The address is not a loopback address: metrics are never exposed beyond the host.
    #[error("metrics address {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

fn line(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

fn help(out: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(out, "# HELP {name} {text}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The node's metrics in the Prometheus text exposition format.
pub(super) fn render(shared: &Shared) -> String {
    let status = shared.status();
    let store = &shared.store;
    let me = shared.config.me.as_str();
    let mut out = String::new();
    help(&mut out, "repl_peer_connected", "gauge", "1 when a session with the peer is established");
    for p in &status.peers {
        line(
            &mut out,
            "repl_peer_connected",
            &format!("appliance=\"{me}\",peer=\"{}\"", p.id),
            u8::from(p.connected),
        );
    }
    help(&mut out, "repl_peer_sessions_total", "counter", "sessions established with the peer");
    for p in &status.peers {
        line(&mut out, "repl_peer_sessions_total", &format!("peer=\"{}\"", p.id), p.sessions);
    }
    help(&mut out, "repl_lag_entries", "gauge", "entries held here that the peer has not acknowledged");
    help(&mut out, "repl_lag_seconds", "gauge", "how long the peer has been behind on the stream");
    for p in &status.peers {
        for l in &p.lag {
            let labels = format!("peer=\"{}\",stream=\"{}\"", p.id, l.stream);
            line(&mut out, "repl_lag_entries", &labels, l.entries);
            line(&mut out, "repl_lag_seconds", &labels, l.behind_ms as f64 / 1000.0);
        }
    }
    help(&mut out, "repl_entries_total", "counter", "entries received from (in) and sent to (out) the peer");
    help(&mut out, "repl_bytes_total", "counter", "UDP bytes received from (in) and sent to (out) the peer");
    for p in &status.peers {
        for (dir, entries, bytes) in [("in", p.entries_in, p.bytes_in), ("out", p.entries_out, p.bytes_out)] {
            let labels = format!("peer=\"{}\",direction=\"{dir}\"", p.id);
            line(&mut out, "repl_entries_total", &labels, entries);
            line(&mut out, "repl_bytes_total", &labels, bytes);
        }
    }
    help(
        &mut out,
        "repl_entries_relayed_total",
        "counter",
        "entries sent to the peer that another appliance wrote",
    );
    help(
        &mut out,
        "repl_rewinds_total",
        "counter",
        "times the peer asked to be sent again from what it holds",
    );
    help(
        &mut out,
        "repl_retransmits_total",
        "counter",
        "times entries went unacknowledged so long that sending restarted from the peer's acknowledgement",
    );
    for p in &status.peers {
        let labels = format!("peer=\"{}\"", p.id);
        line(&mut out, "repl_entries_relayed_total", &labels, p.entries_relayed);
        line(&mut out, "repl_rewinds_total", &labels, p.rewinds);
        line(&mut out, "repl_retransmits_total", &labels, p.retransmits);
    }
    help(&mut out, "repl_entries_per_second", "gauge", "entries per second in and out over the last second");
    help(&mut out, "repl_bytes_per_second", "gauge", "UDP bytes per second in and out over the last second");
    for (peer, r) in super::lock(&shared.rates).iter() {
        for (dir, entries, bytes) in [("in", r[0], r[2]), ("out", r[1], r[3])] {
            let labels = format!("peer=\"{peer}\",direction=\"{dir}\"");
            line(&mut out, "repl_entries_per_second", &labels, entries);
            line(&mut out, "repl_bytes_per_second", &labels, bytes);
        }
    }
    help(&mut out, "repl_stream_entries", "gauge", "entries of the stream held here (sum of the vector)");
    for s in StreamId::ALL {
        let held: u64 = store.vector(s).iter().map(|d| d.seq).sum();
        line(&mut out, "repl_stream_entries", &format!("stream=\"{s}\""), held);
    }
    help(&mut out, "repl_conflicts_total", "counter", "last-writer-wins conflicts recorded, per collection");
    for c in Collection::ALL {
        if c == Collection::Audit {
            continue;
        }
        let (_, total) = store.conflicts(c);
        line(&mut out, "repl_conflicts_total", &format!("collection=\"{c}\""), total);
    }
    help(&mut out, "repl_audit_backlog", "gauge", "audit records an audit holder has not acknowledged");
    let holders = shared.config.topology.appliances.iter().filter(|a| {
        a.id != shared.config.me
            && shared.config.topology.scope(&shared.config.me, &a.id).send.contains(&StreamId::Audit)
    });
    for h in holders {
        let backlog = status
            .peers
            .iter()
            .find(|p| p.id == h.id)
            .and_then(|p| p.lag.iter().find(|l| l.stream == StreamId::Audit))
            .map_or(0, |l| l.entries);
        line(&mut out, "repl_audit_backlog", &format!("holder=\"{}\"", h.id), backlog);
    }
    help(
        &mut out,
        "repl_audit_unreleased",
        "gauge",
        "audit records kept here until every holder acknowledges",
    );
    line(&mut out, "repl_audit_unreleased", "", store.audit_backlog());
    if let Some(latency) = &shared.config.sync_latency {
        help(&mut out, "repl_fsync_seconds", "histogram", "fdatasync latency of the data directory");
        let counts = latency.counts();
        let mut cumulative = 0;
        for (i, count) in counts.iter().enumerate() {
            cumulative += count;
            let le = SYNC_LATENCY_BOUNDS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            line(&mut out, "repl_fsync_seconds_bucket", &format!("le=\"{le}\""), cumulative);
        }
        line(&mut out, "repl_fsync_seconds_sum", "", latency.sum_us() as f64 / 1e6);
        line(&mut out, "repl_fsync_seconds_count", "", cumulative);
    }
    help(&mut out, "repl_client_requests_total", "counter", "client requests served");
    line(&mut out, "repl_client_requests_total", "", status.client_requests);
    help(&mut out, "repl_client_errors_total", "counter", "client requests answered with an error");
    line(&mut out, "repl_client_errors_total", "", status.client_errors);
    help(
        &mut out,
        "repl_connections_refused_total",
        "counter",
        "connections refused (certificate, identity)",
    );
    line(&mut out, "repl_connections_refused_total", "", status.refused);
    help(&mut out, "repl_pair_degraded_total", "counter", "writes acknowledged without the pair (sync mode)");
    line(&mut out, "repl_pair_degraded_total", "", status.pair_degraded);
    help(
        &mut out,
        "repl_segments_compacted_total",
        "counter",
        "log segments compacted below the peers' acknowledgements",
    );
    line(&mut out, "repl_segments_compacted_total", "", status.segments_compacted);
    help(
        &mut out,
        "repl_compactions_forced_total",
        "counter",
        "compactions past the retention limit, below a peer's acknowledgement (alarm)",
    );
    line(&mut out, "repl_compactions_forced_total", "", status.compactions_forced);
    help(
        &mut out,
        "repl_tombstones_collected_total",
        "counter",
        "tombstones every replica acknowledged, collected",
    );
    line(&mut out, "repl_tombstones_collected_total", "", status.tombstones_collected);
    help(&mut out, "repl_hlc_drift_alarms_total", "counter", "remote clocks seen too far ahead");
    line(&mut out, "repl_hlc_drift_alarms_total", "", store.hlc_drift_alarms());
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A small HTML page: peers, lag and the latest errors.
pub(super) fn status_page(shared: &Shared) -> String {
    let status = shared.status();
    let mut out = String::new();
    let me = escape(shared.config.me.as_str());
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>repld {me}</title></head><body>\
         <h1>{me}</h1><p>incarnation {:?}, topology epoch {}, {} client requests ({} errors), \
         {} connections refused</p><table border=\"1\"><tr><th>peer</th><th>connected</th>\
         <th>sessions</th><th>lag (entries / s) per stream</th><th>entries in/out</th><th>bytes in/out</th>\
         <th>entries/s in/out</th><th>bytes/s in/out</th></tr>",
        shared.store.incarnation(),
        shared.topology().epoch,
        status.client_requests,
        status.client_errors,
        status.refused,
    );
    let rates = super::lock(&shared.rates).clone();
    for p in &status.peers {
        let r = rates.get(&p.id).copied().unwrap_or_default();
        let lag: Vec<String> = p
            .lag
            .iter()
            .map(|l| format!("{}: {} / {:.1}", l.stream, l.entries, l.behind_ms as f64 / 1000.0))
            .collect();
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{} / {}</td>\
             <td>{:.0} / {:.0}</td><td>{:.0} / {:.0}</td></tr>",
            escape(p.id.as_str()),
            if p.connected { "yes" } else { "no" },
            p.sessions,
            escape(&lag.join(", ")),
            p.entries_in,
            p.entries_out,
            p.bytes_in,
            p.bytes_out,
            r[0],
            r[1],
            r[2],
            r[3],
        );
    }
    out.push_str("</table><h2>Latest errors</h2><ul>");
    for e in status.errors.iter().rev().take(20) {
        let _ = write!(out, "<li>{}</li>", escape(e));
    }
    out.push_str("</ul><p><a href=\"/metrics\">metrics</a></p></body></html>");
    out
}

/// Serves `GET /metrics` (Prometheus text) and `GET /` (the status page) of `node` on
/// the loopback address `addr` until the returned task is aborted. Returns the bound
/// address and the task.
pub async fn serve_http(
    node: Arc<Node>,
    addr: SocketAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    if !addr.ip().is_loopback() {
        return Err(HttpError::NotLoopback(addr));
    }
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|source| HttpError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| HttpError::Bind { addr, source })?;
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let node = node.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                // Read the request head (bounded); the body, if any, is ignored.
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&request);
                let path = head.split_whitespace().nth(1).unwrap_or("");
                let (code, kind, body) = match (head.split_whitespace().next(), path) {
                    (Some("GET"), "/metrics") => ("200 OK", "text/plain; version=0.0.4", node.metrics_text()),
                    (Some("GET"), "/") => ("200 OK", "text/html; charset=utf-8", node.status_page()),
                    (Some("GET"), _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
                    _ => ("405 Method Not Allowed", "text/plain", "only GET\n".to_string()),
                };
                let response = format!(
                    "HTTP/1.1 {code}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok((bound, task))
}
