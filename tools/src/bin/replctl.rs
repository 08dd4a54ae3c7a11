//! `replctl`: certificates, status, verify, audit, conflicts and data access for an
//! enterprise of `repld` appliances. Exit 0 success, 1 a check failed, 2 usage or
//! connection error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use repl_engine::topology::{Appliance, Role};
use repl_tools::backup;
use repl_tools::config::Config;
use repl_tools::ctl::{self, CtlError, Enterprise};
use repl_wire::transport::Identity;
use repl_wire::{AdminCall, ClientCall, ClientReply, NodeId, StreamId, VersionVector};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(name = "replctl", version, about = "Operate a repl enterprise")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How to reach the enterprise (also from REPLCTL_CA, REPLCTL_CERT, REPLCTL_KEY,
/// REPLCTL_TOPOLOGY).
#[derive(Debug, Clone, Args)]
struct Conn {
    /// The enterprise CA certificate.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// An admin certificate (`replctl certs issue --admin NAME`).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Its key.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// The topology file (the appliances and their addresses).
    #[arg(long, value_name = "FILE")]
    topology: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl Conn {
    fn load(&self) -> Result<Enterprise, CtlError> {
        Enterprise::load(
            &ctl::path_arg(self.ca.clone(), "REPLCTL_CA", "ca")?,
            &ctl::path_arg(self.cert.clone(), "REPLCTL_CERT", "cert")?,
            &ctl::path_arg(self.key.clone(), "REPLCTL_KEY", "key")?,
            &ctl::path_arg(self.topology.clone(), "REPLCTL_TOPOLOGY", "topology")?,
        )
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Certificates: the enterprise CA, appliance, client and admin certificates, revocation.
    #[command(subcommand)]
    Certs(Certs),
    /// Every appliance: reachable, role, site, per-stream entries, lag to each peer.
    Status(Conn),
    /// The topology.
    #[command(subcommand)]
    Topology(TopologyCmd),
    /// Compare hash-tree roots of every stream across the appliances that must agree.
    Verify {
        #[command(flatten)]
        conn: Conn,
        /// Only this stream (enterprise, sessions, audit).
        #[arg(long)]
        stream: Option<String>,
    },
    /// Audit records: query, or verify the hash chains.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Recorded last-writer-wins conflicts of a collection.
    Conflicts {
        #[command(flatten)]
        conn: Conn,
        /// The collection.
        #[arg(long)]
        collection: String,
        /// Ask this appliance (default: the first that answers).
        #[arg(long)]
        appliance: Option<String>,
    },
    /// Take an online backup of one appliance into a file (it keeps serving).
    Backup {
        #[command(flatten)]
        conn: Conn,
        /// The appliance.
        #[arg(long)]
        appliance: String,
        /// The backup file to write.
        file: PathBuf,
    },
    /// Restore a stopped appliance from a backup (run on its host, with its repld
    /// configuration); it starts again under a new incarnation and catches up.
    Restore {
        /// The appliance's repld configuration.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The backup file.
        file: PathBuf,
    },
    /// Read a key: its values and causal context.
    Get(KeyArgs),
    /// Write a key.
    Put {
        #[command(flatten)]
        key: KeyArgs,
        /// The value (text).
        value: String,
        /// Compare-and-set: the context printed by `get --json` (refused if stale).
        #[arg(long, value_name = "JSON")]
        if_context: Option<String>,
    },
    /// Delete a key.
    Delete(KeyArgs),
    /// List keys of a collection.
    Scan {
        #[command(flatten)]
        conn: Conn,
        /// The collection.
        #[arg(long)]
        collection: String,
        /// First key.
        #[arg(long, default_value = "")]
        start: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Ask this appliance.
        #[arg(long)]
        appliance: Option<String>,
    },
}

#[derive(Debug, Args)]
struct KeyArgs {
    #[command(flatten)]
    conn: Conn,
    /// The collection.
    #[arg(long)]
    collection: String,
    /// The key (text).
    #[arg(value_name = "KEY")]
    name: String,
    /// Ask this appliance (default: the holders in topology order, failing over).
    #[arg(long)]
    appliance: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Certs {
    /// Create the enterprise CA in a directory (ca.pem, ca.key).
    Init {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The enterprise's name.
        #[arg(long)]
        enterprise: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a certificate signed by the CA.
    Issue {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// For an appliance.
        #[arg(long, group = "who")]
        appliance: Option<String>,
        /// For a client (agent).
        #[arg(long, group = "who")]
        client: Option<String>,
        /// For an administrator.
        #[arg(long, group = "who")]
        admin: Option<String>,
        /// Where to write NAME.pem and NAME.key (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Revoke a certificate: a new CRL in the CA directory, pushed to every appliance
    /// with --push (they refuse it at once and close its live connections).
    Revoke {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The certificate file to revoke.
        #[arg(long, group = "what")]
        cert_file: Option<PathBuf>,
        /// Or its serial number.
        #[arg(long, group = "what")]
        serial: Option<u64>,
        /// Install the CRL on every appliance of the topology.
        #[arg(long)]
        push: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
enum TopologyCmd {
    /// Add an appliance (two-phase commit; every appliance, the new one included,
    /// must be online: start the new one first with `[join]` in its repld.toml).
    AddAppliance {
        #[command(flatten)]
        conn: Conn,
        /// Its id.
        #[arg(long)]
        id: String,
        /// Its site.
        #[arg(long)]
        site: String,
        /// Where it listens.
        #[arg(long)]
        address: std::net::SocketAddr,
        /// Its roles (audit, database, service), comma-separated.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
    },
    /// Remove appliances (two-phase commit among the remaining ones, which must all
    /// be online); they are refused from then on.
    RemoveAppliance {
        #[command(flatten)]
        conn: Conn,
        /// The appliances to remove.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Rename a site (its id stays).
    RenameSite {
        #[command(flatten)]
        conn: Conn,
        /// The site's id.
        #[arg(long)]
        site: String,
        /// The new display name.
        #[arg(long)]
        name: String,
    },
    /// The topology an appliance runs with.
    Show {
        #[command(flatten)]
        conn: Conn,
        /// Ask this appliance.
        #[arg(long)]
        appliance: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Query audit records on a holder.
    Query {
        #[command(flatten)]
        conn: Conn,
        /// Only this user.
        #[arg(long)]
        user: Option<String>,
        /// Only records of this appliance.
        #[arg(long, value_name = "ID")]
        from_appliance: Option<String>,
        /// From this time (ms since the epoch, inclusive).
        #[arg(long)]
        since_ms: Option<u64>,
        /// Until this time (ms, exclusive).
        #[arg(long)]
        until_ms: Option<u64>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Verify every origin's hash chain on every holder.
    Verify(Conn),
}

fn node(id: &Option<String>) -> Result<Option<NodeId>, CtlError> {
    id.as_deref()
        .map(|s| NodeId::new(s).map_err(|e| CtlError::Usage(format!("--appliance: {e}"))))
        .transpose()
}

fn connection(e: impl std::fmt::Display) -> CtlError {
    CtlError::Connection(e.to_string())
}

async fn run(command: Command) -> Result<String, CtlError> {
    match command {
        Command::Certs(Certs::Init { dir, enterprise, days }) => ctl::certs_init(&dir, &enterprise, days),
        Command::Certs(Certs::Issue { dir, appliance, client, admin, out, days }) => {
            let identity = match (appliance, client, admin) {
                (Some(a), None, None) => Identity::Appliance(
                    NodeId::new(a).map_err(|e| CtlError::Usage(format!("--appliance: {e}")))?,
                ),
                (None, Some(c), None) => Identity::Client(c),
                (None, None, Some(a)) => Identity::Admin(a),
                _ => return Err(CtlError::Usage("give one of --appliance, --client, --admin".into())),
            };
            if Identity::from_uri(&identity.uri()).as_ref() != Some(&identity) {
                return Err(CtlError::Usage(format!("{} is not a valid name", identity.uri())));
            }
            let out = out.unwrap_or_else(|| dir.clone());
            ctl::certs_issue(&dir, identity, &out, days)
        }
        Command::Certs(Certs::Revoke { dir, cert_file, serial, push, conn }) => {
            let serial = match (cert_file, serial) {
                (Some(f), None) => ctl::serial_of(&f)?,
                (None, Some(s)) => s,
                _ => return Err(CtlError::Usage("give --cert-file or --serial".into())),
            };
            let crl = ctl::certs_revoke(&dir, serial)?;
            let mut out = format!("serial {serial} revoked; CRL written to {}/crl.pem\n", dir.display());
            if push {
                out.push_str(&ctl::push_crl(&conn.load()?, &crl).await?);
            }
            Ok(out)
        }
        Command::Backup { conn, appliance, file } => {
            let e = conn.load()?;
            let id = node(&Some(appliance))?.ok_or_else(|| CtlError::Usage("--appliance".into()))?;
            let taken = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let body = backup::take(&e.one(&id)?, id.as_str(), taken).await.map_err(connection)?;
            let entries: usize = body.streams.iter().map(|s| s.entries.len()).sum();
            let bytes = backup::write(&file, &body).map_err(|e| CtlError::Usage(e.to_string()))?;
            Ok(format!("backup of {id}: {entries} versions, {bytes} bytes, written to {}\n", file.display()))
        }
        Command::Restore { config, file } => {
            let config = Config::load(&config).map_err(|e| CtlError::Usage(e.to_string()))?;
            let body = backup::read(&file).map_err(|e| CtlError::Usage(e.to_string()))?;
            if body.appliance != config.appliance.as_str() {
                let e = backup::BackupError::WrongAppliance {
                    file,
                    found: body.appliance,
                    expected: config.appliance.to_string(),
                };
                return Err(CtlError::Usage(e.to_string()));
            }
            let incarnation = tokio::task::block_in_place(|| backup::restore(&config.data_dir, &body))
                .map_err(|e| CtlError::Usage(e.to_string()))?;
            Ok(format!(
                "{} restored from {} (taken at {} ms) as incarnation {:016x}; start its repld to catch up\n",
                config.appliance,
                file.display(),
                body.taken_ms,
                incarnation.0
            ))
        }
        Command::Status(conn) => ctl::status(&conn.load()?, conn.json).await,
        Command::Topology(TopologyCmd::AddAppliance { conn, id, site, address, roles }) => {
            let id = NodeId::new(id).map_err(|e| CtlError::Usage(format!("--id: {e}")))?;
            let roles = roles
                .iter()
                .map(|r| match r.as_str() {
                    "audit" => Ok(Role::Audit),
                    "database" => Ok(Role::Database),
                    "service" => Ok(Role::Service),
                    other => Err(CtlError::Usage(format!(
                        "--roles: unknown role {other:?} (audit, database, service)"
                    ))),
                })
                .collect::<Result<_, _>>()?;
            ctl::change_topology(&conn.load()?, |t| {
                if t.appliance(&id).is_some() {
                    return Err(CtlError::Usage(format!("{id} is already in the topology")));
                }
                if t.site(&site).is_none() {
                    return Err(CtlError::Usage(format!("--site: no site {site:?}")));
                }
                t.appliances.push(Appliance { id: id.clone(), name: id.to_string(), site, address, roles });
                Ok(())
            })
            .await
        }
        Command::Topology(TopologyCmd::RemoveAppliance { conn, ids }) => {
            let ids: Vec<NodeId> = ids
                .into_iter()
                .map(|i| NodeId::new(i).map_err(|e| CtlError::Usage(format!("{e}"))))
                .collect::<Result<_, _>>()?;
            ctl::change_topology(&conn.load()?, |t| {
                for id in &ids {
                    if t.appliance(id).is_none() {
                        return Err(CtlError::Usage(format!("{id} is not in the topology")));
                    }
                }
                t.appliances.retain(|a| !ids.contains(&a.id));
                if t.bootstrap.as_ref().is_some_and(|b| ids.contains(b)) {
                    t.bootstrap = t.appliances.first().map(|a| a.id.clone());
                }
                Ok(())
            })
            .await
        }
        Command::Topology(TopologyCmd::RenameSite { conn, site, name }) => {
            ctl::change_topology(&conn.load()?, |t| {
                let s = t
                    .sites
                    .iter_mut()
                    .find(|s| s.id == site)
                    .ok_or_else(|| CtlError::Usage(format!("--site: no site {site:?}")))?;
                s.name = name;
                Ok(())
            })
            .await
        }
        Command::Topology(TopologyCmd::Show { conn, appliance }) => {
            let e = conn.load()?;
            let client = e.for_stream(node(&appliance)?.as_ref(), StreamId::Enterprise)?;
            match client.call(ClientCall::Admin(AdminCall::TopologyShow)).await.map_err(connection)? {
                (_, ClientReply::Blob(bytes)) => {
                    let t = repl_engine::topology::Topology::decode(&bytes).map_err(connection)?;
                    if conn.json {
                        serde_json::to_string_pretty(&t).map_err(connection)
                    } else {
                        toml::to_string(&t).map_err(connection)
                    }
                }
                (_, other) => Err(connection(format!("unexpected answer {other:?}"))),
            }
        }
        Command::Verify { conn, stream } => {
            let streams = match stream {
                Some(s) => vec![ctl::stream(&s)?],
                None => StreamId::ALL.to_vec(),
            };
            ctl::verify(&conn.load()?, &streams).await
        }
        Command::Audit(AuditCmd::Verify(conn)) => ctl::audit_verify(&conn.load()?).await,
        Command::Audit(AuditCmd::Query { conn, user, from_appliance, since_ms, until_ms, limit }) => {
            let e = conn.load()?;
            let call = ClientCall::AuditQuery {
                from_ms: since_ms,
                until_ms,
                user,
                appliance: from_appliance,
                limit,
            };
            match e.for_stream(None, StreamId::Audit)?.call(call).await.map_err(connection)? {
                (_, ClientReply::Audit(rows)) => {
                    if conn.json {
                        let rows: Vec<_> = rows
                            .iter()
                            .map(|(d, ev)| {
                                json!({"origin": format!("{:016x}", d.origin.0), "seq": d.seq,
                                "time_ms": ev.time_ms, "user": ev.user, "appliance": ev.appliance,
                                "action": ev.action, "detail": ev.detail})
                            })
                            .collect();
                        serde_json::to_string_pretty(&rows).map_err(connection)
                    } else {
                        Ok(rows
                            .iter()
                            .map(|(_, ev)| {
                                format!(
                                    "{} {} {} {} {}\n",
                                    ev.time_ms, ev.appliance, ev.user, ev.action, ev.detail
                                )
                            })
                            .collect())
                    }
                }
                (_, other) => Err(connection(format!("unexpected answer {other:?}"))),
            }
        }
        Command::Conflicts { conn, collection, appliance } => {
            let e = conn.load()?;
            let c = ctl::collection(&collection)?;
            let client = e.for_stream(node(&appliance)?.as_ref(), c.stream())?;
            match client
                .call(ClientCall::Admin(AdminCall::Conflicts { collection: c }))
                .await
                .map_err(connection)?
            {
                (who, ClientReply::Conflicts { records, total }) => {
                    let rows: Vec<_> = records
                        .iter()
                        .map(|r| {
                            json!({"key": String::from_utf8_lossy(&r.key),
                            "loser": format!("{:016x}:{}", r.loser.origin.0, r.loser.seq),
                            "winner": format!("{:016x}:{}", r.winner.origin.0, r.winner.seq),
                            "lost_value": r.value.as_ref().map(|v| String::from_utf8_lossy(v).into_owned())})
                        })
                        .collect();
                    // Sibling sets: keys holding several concurrent values.
                    let mut siblings = Vec::new();
                    for key in client.scan_keys(c, b"", 10_000).await.map_err(connection)? {
                        let (values, _) = client.get(c, &key).await.map_err(connection)?;
                        if values.len() > 1 {
                            siblings.push(json!({"key": String::from_utf8_lossy(&key),
                                "values": values.iter().map(|v| String::from_utf8_lossy(&v.value).into_owned()).collect::<Vec<_>>()}));
                        }
                    }
                    let out = json!({"appliance": who.as_str(), "total": total, "kept": rows, "siblings": siblings});
                    if conn.json {
                        serde_json::to_string_pretty(&out).map_err(connection)
                    } else {
                        let mut text = format!("{who}: {total} conflict(s) recorded in {c}\n");
                        for r in &rows {
                            text.push_str(&format!(
                                "{} lost {} to {} (lost value {})\n",
                                r["key"], r["loser"], r["winner"], r["lost_value"]
                            ));
                        }
                        for sib in &siblings {
                            text.push_str(&format!("{} has siblings {}\n", sib["key"], sib["values"]));
                        }
                        Ok(text)
                    }
                }
                (_, other) => Err(connection(format!("unexpected answer {other:?}"))),
            }
        }
        Command::Get(k) => {
            let e = k.conn.load()?;
            let c = ctl::collection(&k.collection)?;
            let client = e.for_stream(node(&k.appliance)?.as_ref(), c.stream())?;
            let (values, context) = client.get(c, k.name.as_bytes()).await.map_err(connection)?;
            let out = json!({
                "values": values.iter().map(|v| String::from_utf8_lossy(&v.value).into_owned()).collect::<Vec<_>>(),
                "context": context.iter().map(|d| json!([d.origin.0, d.seq])).collect::<Vec<_>>(),
            });
            if k.conn.json {
                serde_json::to_string(&out).map_err(connection)
            } else if values.is_empty() {
                Err(CtlError::CheckFailed(format!("{}/{}: not found", c, k.name)))
            } else {
                Ok(values.iter().map(|v| format!("{}\n", String::from_utf8_lossy(&v.value))).collect())
            }
        }
        Command::Put { key: k, value, if_context } => {
            let e = k.conn.load()?;
            let c = ctl::collection(&k.collection)?;
            let client = e.for_stream(node(&k.appliance)?.as_ref(), c.stream())?;
            let token = match if_context {
                Some(text) => {
                    let pairs: Vec<(u64, u64)> = serde_json::from_str(&text).map_err(|e| {
                        CtlError::Usage(format!("--if-context: {e} (want [[origin, seq], ...])"))
                    })?;
                    let ctx: VersionVector = pairs
                        .into_iter()
                        .map(|(o, s)| repl_wire::Dot { origin: repl_wire::Incarnation(o), seq: s })
                        .collect();
                    client.compare_and_put(c, k.name.as_bytes(), value.as_bytes(), &ctx).await
                }
                None => client.put(c, k.name.as_bytes(), value.as_bytes()).await,
            }
            .map_err(|e| match e.code() {
                Some(repl_wire::ErrorCode::ContextMismatch) => CtlError::CheckFailed(e.to_string()),
                _ => connection(e),
            })?;
            Ok(format!("written: {:016x}:{}\n", token.origin.0, token.seq))
        }
        Command::Delete(k) => {
            let e = k.conn.load()?;
            let c = ctl::collection(&k.collection)?;
            let client = e.for_stream(node(&k.appliance)?.as_ref(), c.stream())?;
            let token = client.delete(c, k.name.as_bytes()).await.map_err(connection)?;
            Ok(format!("deleted: {:016x}:{}\n", token.origin.0, token.seq))
        }
        Command::Scan { conn, collection, start, limit, appliance } => {
            let e = conn.load()?;
            let c = ctl::collection(&collection)?;
            let client = e.for_stream(node(&appliance)?.as_ref(), c.stream())?;
            let keys = client.scan_keys(c, start.as_bytes(), limit).await.map_err(connection)?;
            let keys: Vec<String> = keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
            if conn.json {
                serde_json::to_string(&keys).map_err(connection)
            } else {
                Ok(keys.iter().map(|k| format!("{k}\n")).collect())
            }
        }
    }
}

fn main() -> ExitCode {
    let (cli, rt) = match repl_tools::start::<Cli>("replctl", 2) {
        Ok(started) => started,
        Err(code) => return code,
    };
    match rt.block_on(run(cli.command)) {
        Ok(out) => {
            print!("{out}");
            if !out.ends_with('\n') && !out.is_empty() {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("replctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
