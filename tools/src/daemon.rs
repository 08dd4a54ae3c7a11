//! The daemon: opens the store, starts the node, serves metrics, stops on a signal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use repl_engine::runtime::{database_targets, serve_http, Node, NodeConfig, RemoteStore, RemoteTarget};
use repl_engine::topology::{Generation, Role, Topology};
use repl_engine::{FileStorage, Store, StoreOptions};
use repl_wire::transport::{AllowedPeers, TlsSetup};
use repl_wire::{AdminCall, ClientCall, ClientReply, NodeId};

use crate::config::{check_membership, Config, ConfigError, TopologySource};

/// How long a stopping daemon lets connected peers catch up.
const DRAIN: Duration = Duration::from_secs(5);

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// The configuration (or a file it names) is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened (damaged data is never cut silently).
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: repl_engine::Error,
    },
    /// The node could not start (the listen address is in use, ...).
    #[error(transparent)]
    Start(#[from] repl_engine::runtime::NodeError),
    /// The metrics server could not start.
    #[error(transparent)]
    Metrics(#[from] repl_engine::runtime::HttpError),
    /// Another process holds the data directory (a running repld, or a restore).
    #[error(transparent)]
    Locked(crate::backup::BackupError),
    /// Joining through a peer failed.
    #[error("cannot join through {peer}: {message}")]
    Join {
        /// The peer.
        peer: String,
        /// Why.
        message: String,
    },
}

impl DaemonError {
    /// The process exit code: 2 for what the operator must fix in the configuration or
    /// environment (bad field, missing certificate, address in use), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Config(_)
            | DaemonError::Start(_)
            | DaemonError::Metrics(_)
            | DaemonError::Locked(_) => 2,
            DaemonError::Store { .. } | DaemonError::Join { .. } => 1,
        }
    }
}

fn read_pem(config: &Config, field: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
        file: config.file.clone(),
        field,
        message: format!("cannot read {}: {e}", path.display()),
    })
}

/// The TLS setup of `config`'s appliance, allowing the appliances of `topology`.
pub fn tls_setup(config: &Config, topology: &Topology) -> Result<TlsSetup, ConfigError> {
    let ca = read_pem(config, "tls.ca", &config.tls.ca)?;
    let cert = read_pem(config, "tls.cert", &config.tls.cert)?;
    let key = read_pem(config, "tls.key", &config.tls.key)?;
    let mut crls =
        config.tls.crls.iter().map(|c| read_pem(config, "tls.crls", c)).collect::<Result<Vec<_>, _>>()?;
    // A CRL installed at runtime (replctl certs revoke) applies again after a restart.
    if let Ok(kept) = std::fs::read_to_string(config.data_dir.join("crl.pem")) {
        crls.push(kept);
    }
    let allowed = AllowedPeers::new(topology.appliances.iter().map(|a| a.id.clone()));
    TlsSetup::from_pem(&ca, &cert, &key, &crls, allowed).map_err(|e| ConfigError::Invalid {
        file: config.file.clone(),
        field: "tls",
        message: e.to_string(),
    })
}

/// The topology and whether this appliance waits to be added: the newest of the
/// bootstrap file's and the one kept from a committed change or a join; or, at the
/// first start of a joining appliance, the one fetched from the peer (and kept).
async fn topology(config: &Config) -> Result<(Topology, bool), DaemonError> {
    let kept_path = config.data_dir.join("topology.bin");
    let kept = match std::fs::read(&kept_path) {
        Ok(bytes) => Some(Topology::decode(&bytes).map_err(|e| DaemonError::Join {
            peer: "kept topology".into(),
            message: format!("{}: {e}", kept_path.display()),
        })?),
        Err(_) => None,
    };
    let (topology, source) = match (&config.topology, kept) {
        (TopologySource::Bootstrap(t), Some(k)) if k.epoch > t.epoch => (k, kept_path.clone()),
        (TopologySource::Bootstrap(t), _) => ((**t).clone(), config.file.clone()),
        (TopologySource::Join(..), Some(k)) => (k, kept_path.clone()),
        (TopologySource::Join(peer, address), None) => {
            let t = match fetch_topology(config, peer, *address).await {
                Ok(t) => t,
                // Not an appliance of the enterprise yet (the member refuses our
                // certificate), or the member is unreachable: wait, with no view, for
                // the topology change that adds this appliance.
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot read the topology: waiting to be added by a topology change");
                    return Ok((empty_topology(), true));
                }
            };
            std::fs::create_dir_all(&config.data_dir)
                .and_then(|()| repl_engine::write_file_atomically(&kept_path, &t.encode()))
                .map_err(|e| DaemonError::Join {
                    peer: peer.to_string(),
                    message: format!("cannot keep the topology in {}: {e}", kept_path.display()),
                })?;
            (t, kept_path.clone())
        }
    };
    // A joining appliance not yet in the topology waits to be added.
    let pending = matches!(config.topology, TopologySource::Join(..))
        && topology.appliance(&config.appliance).is_none();
    if !pending {
        check_membership(config, &topology, &source)?;
    }
    Ok((topology, pending))
}

/// A topology with nothing in it: the view of an appliance waiting to be added.
fn empty_topology() -> Topology {
    Topology {
        enterprise: String::new(),
        generation: Generation::G3,
        epoch: 0,
        external: Default::default(),
        bootstrap: None,
        sites: Vec::new(),
        appliances: Vec::new(),
    }
}

/// Fetches the topology from the member `peer` (our certificate is the credential).
async fn fetch_topology(
    config: &Config,
    peer: &NodeId,
    address: std::net::SocketAddr,
) -> Result<Topology, DaemonError> {
    let join_err = |message: String| DaemonError::Join { peer: peer.to_string(), message };
    let tls = tls_setup(config, &empty_topology())?;
    let client = RemoteStore::new(tls, vec![RemoteTarget { id: peer.clone(), address }])
        .map_err(|e| join_err(e.to_string()))?;
    match client.call(ClientCall::Admin(AdminCall::TopologyShow)).await {
        Ok((_, ClientReply::Blob(bytes))) => Topology::decode(&bytes).map_err(|e| join_err(e.to_string())),
        Ok((_, other)) => Err(join_err(format!("unexpected answer {other:?}"))),
        Err(e) => Err(join_err(e.to_string())),
    }
}

/// A started daemon.
#[derive(Debug)]
pub struct Daemon {
    /// The node.
    pub node: Arc<Node>,
    /// Where metrics are served, if configured.
    pub metrics: Option<std::net::SocketAddr>,
    http: Option<tokio::task::JoinHandle<()>>,
    /// Held while running: no second repld and no restore on this data directory.
    _lock: std::fs::File,
}

impl Daemon {
    /// Opens the store and starts the node and the metrics server.
    pub async fn start(config: &Config) -> Result<Daemon, DaemonError> {
        let lock = crate::backup::lock_data_dir(&config.data_dir).map_err(DaemonError::Locked)?;
        let (topology, pending) = topology(config).await?;
        if pending {
            tracing::info!(appliance = %config.appliance, "not in the topology yet: waiting to be added");
        }
        let tls = tls_setup(config, &topology)?;
        let store_dir = config.data_dir.join("store");
        let storage = FileStorage::new(&store_dir).map_err(|e| DaemonError::Store {
            dir: store_dir.clone(),
            source: repl_engine::Error::Io { file: store_dir.display().to_string(), op: "create", source: e },
        })?;
        let latency = storage.sync_latency();
        let mut options =
            StoreOptions { log_retained_bytes_max: config.log_retained_bytes_max, ..StoreOptions::default() };
        for c in &config.keep_siblings {
            options.policies.insert(*c, repl_engine::ConflictPolicy::KeepSiblings);
        }
        let store = tokio::task::block_in_place(|| Store::open(Arc::new(storage), options))
            .map_err(|source| DaemonError::Store { dir: store_dir.clone(), source })?;
        let recovery = store.recovery();
        tracing::info!(
            appliance = %config.appliance,
            incarnation = ?store.incarnation(),
            recovery = ?recovery,
            "store open"
        );
        let upstream = if topology.generation == Generation::G4 && config.roles.contains(&Role::Service) {
            let targets = database_targets(&topology, &config.site);
            // Short attempts: the service appliance fails over to the other database
            // appliance well within its own clients' attempt timeout.
            let client = RemoteStore::new(tls.clone(), targets).map_err(|e| DaemonError::Join {
                peer: "database appliances".into(),
                message: e.to_string(),
            })?;
            Some(client.with_timeouts(Duration::from_millis(1_500), Duration::from_secs(4)))
        } else {
            None
        };
        let mut node_config = NodeConfig::new(config.appliance.clone(), topology, tls, config.listen);
        node_config.serve = config.serve;
        node_config.sync = config.sync;
        node_config.maintenance = config.maintenance;
        node_config.upstream = upstream;
        node_config.sync_latency = Some(latency);
        node_config.crl_file = Some(config.data_dir.join("crl.pem"));
        node_config.topology_file = Some(config.data_dir.join("topology.bin"));
        node_config.pending = pending;
        let node = Arc::new(Node::start(store, node_config).await?);
        let (metrics, http) = match config.metrics {
            Some(addr) => {
                let (bound, task) = serve_http(node.clone(), addr).await?;
                (Some(bound), Some(task))
            }
            None => (None, None),
        };
        tracing::info!(
            appliance = %config.appliance,
            listen = %config.listen,
            metrics = ?metrics,
            "ready"
        );
        Ok(Daemon { node, metrics, http, _lock: lock })
    }

    /// Stops: lets connected peers catch up (bounded), then closes everything.
    pub async fn stop(self) {
        if let Some(http) = self.http {
            http.abort();
            let _ = http.await;
        }
        match Arc::try_unwrap(self.node) {
            Ok(node) => node.shutdown(DRAIN).await,
            Err(_) => tracing::warn!("node still shared at shutdown; closing without drain"),
        }
        tracing::info!("stopped");
    }
}

/// Runs the daemon of `config` until SIGTERM or SIGINT.
pub async fn run(config: &Config) -> Result<(), DaemonError> {
    let daemon = Daemon::start(config).await?;
    wait_for_signal().await;
    tracing::info!("stopping");
    daemon.stop().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
