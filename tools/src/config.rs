//! `repld.toml`: the daemon's configuration, checked field by field. Every error names
//! the file and the field that is wrong.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use repl_engine::runtime::{MaintenanceConfig, PairMode, PairTimeout, ServeConfig};
use repl_engine::sync::SyncConfig;
use repl_engine::topology::{Role, Topology};
use repl_wire::NodeId;
use serde::Deserialize;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is not valid TOML or does not fit the schema (the message names the
    /// field and line).
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// The parser's explanation.
        message: String,
    },
    /// A field has a value that cannot be used.
    #[error("{file}: field `{field}`: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The field, dotted for nested tables.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Certificate files (PEM).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The enterprise CA certificate.
    pub ca: PathBuf,
    /// This appliance's certificate.
    pub cert: PathBuf,
    /// This appliance's private key.
    pub key: PathBuf,
    /// Certificate revocation lists.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
}

/// A peer to join through (it hands over the topology).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Join {
    /// The appliance's id.
    pub appliance: String,
    /// Where it listens.
    pub address: SocketAddr,
}

/// Pair mode of a G4 database appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairModeName {
    /// Acknowledge when durable here.
    #[default]
    Async,
    /// Acknowledge when durable on both; refuse when the pair does not confirm.
    SyncFailClosed,
    /// Acknowledge when durable on both; without the pair, acknowledge and alarm.
    SyncDegrade,
}

/// Client-serving tunables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeFile {
    /// Pair mode (G4 database appliances).
    pub pair_mode: PairModeName,
    /// How long synchronous pair mode waits for the pair.
    pub pair_timeout_ms: u64,
    /// How long a read with a causal token waits for it.
    pub causal_wait_ms: u64,
}

impl Default for ServeFile {
    fn default() -> Self {
        ServeFile { pair_mode: PairModeName::Async, pair_timeout_ms: 2_000, causal_wait_ms: 5_000 }
    }
}

/// Log upkeep tunables (`[maintenance]`); an interval of 0 turns that upkeep off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceFile {
    /// Seconds between compactions below what every in-scope peer acknowledged.
    pub compact_interval_s: u64,
    /// Seconds between tombstone collections.
    pub tombstone_interval_s: u64,
    /// Seconds between checkpoints while the store changes (bounds crash recovery).
    pub checkpoint_interval_s: u64,
    /// Log kept per stream for a peer that is away, in MiB; past it the log is
    /// compacted anyway (an alarm) and the peer repairs by anti-entropy.
    pub log_retained_mib: u64,
}

impl Default for MaintenanceFile {
    fn default() -> Self {
        let every = |d: Option<std::time::Duration>| d.map_or(0, |d| d.as_secs());
        let defaults = MaintenanceConfig::default();
        MaintenanceFile {
            compact_interval_s: every(defaults.compact_every),
            tombstone_interval_s: every(defaults.collect_tombstones_every),
            checkpoint_interval_s: every(defaults.checkpoint_every),
            log_retained_mib: repl_engine::LOG_RETAINED_BYTES_MAX >> 20,
        }
    }
}

/// The smallest retention limit accepted: a few segments, so one busy minute cannot
/// force a compaction past a peer that is merely a little behind.
const LOG_RETAINED_MIB_MIN: u64 = 256;

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    appliance: String,
    site: String,
    #[serde(default)]
    roles: BTreeSet<Role>,
    data_dir: PathBuf,
    listen: SocketAddr,
    #[serde(default)]
    metrics: Option<SocketAddr>,
    #[serde(default)]
    log_format: LogFormat,
    #[serde(default)]
    topology_file: Option<PathBuf>,
    #[serde(default)]
    join: Option<Join>,
    tls: TlsFiles,
    #[serde(default)]
    serve: ServeFile,
    #[serde(default)]
    maintenance: MaintenanceFile,
    /// Collections that keep concurrent writes as siblings instead of
    /// last-writer-wins (the same list on every appliance).
    #[serde(default)]
    keep_siblings: Vec<String>,
}

/// Where the topology comes from.
#[derive(Debug, Clone)]
pub enum TopologySource {
    /// Bootstrapped from a file (every appliance gets the same one).
    Bootstrap(Box<Topology>),
    /// Fetched from a member at the first start, then kept in the data directory.
    Join(NodeId, SocketAddr),
}

/// A checked configuration, paths resolved against the file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub file: PathBuf,
    /// This appliance.
    pub appliance: NodeId,
    /// Its site (checked against the topology).
    pub site: String,
    /// Its roles (checked against the topology).
    pub roles: BTreeSet<Role>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Where peers and clients reach it.
    pub listen: SocketAddr,
    /// The loopback address of the metrics and status page.
    pub metrics: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// The topology's source.
    pub topology: TopologySource,
    /// Certificate files.
    pub tls: TlsFiles,
    /// Client-serving tunables.
    pub serve: ServeConfig,
    /// Sync tunables.
    pub sync: SyncConfig,
    /// Log upkeep: compaction, tombstone collection, checkpoints.
    pub maintenance: MaintenanceConfig,
    /// Log bytes per stream kept for a peer that is away.
    pub log_retained_bytes_max: u64,
    /// Collections that keep siblings.
    pub keep_siblings: Vec<repl_wire::Collection>,
}

fn invalid(file: &Path, field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { file: file.to_path_buf(), field, message: message.into() }
}

/// Reads a TOML file into `T`.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: path.into(), source })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse { file: path.into(), message: e.to_string() })
}

/// Reads and checks a topology file.
pub fn read_topology(path: &Path) -> Result<Topology, ConfigError> {
    let topology: Topology = read_toml(path)?;
    let validation = topology.validate();
    if !validation.is_ok() {
        return Err(invalid(path, "topology", format!("{:?}", validation)));
    }
    Ok(topology)
}

/// Checks that `topology` has `config`'s appliance with the same site and roles.
pub fn check_membership(
    config: &Config,
    topology: &Topology,
    topology_file: &Path,
) -> Result<(), ConfigError> {
    let Some(me) = topology.appliance(&config.appliance) else {
        return Err(invalid(
            &config.file,
            "appliance",
            format!(
                "{} is not an appliance of the topology in {}",
                config.appliance,
                topology_file.display()
            ),
        ));
    };
    if me.site != config.site {
        return Err(invalid(
            &config.file,
            "site",
            format!("is {:?} but the topology puts {} in site {:?}", config.site, config.appliance, me.site),
        ));
    }
    if me.roles != config.roles {
        return Err(invalid(
            &config.file,
            "roles",
            format!(
                "are {:?} but the topology gives {} the roles {:?}",
                config.roles, config.appliance, me.roles
            ),
        ));
    }
    Ok(())
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let f: File = read_toml(path)?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let appliance = NodeId::new(&f.appliance).map_err(|e| invalid(path, "appliance", e.to_string()))?;
        if let Some(m) = f.metrics {
            if !m.ip().is_loopback() {
                return Err(invalid(path, "metrics", format!("{m} is not a loopback address")));
            }
        }
        let topology = match (&f.topology_file, &f.join) {
            (Some(t), None) => TopologySource::Bootstrap(Box::new(read_topology(&resolve(t))?)),
            (None, Some(j)) => {
                let id =
                    NodeId::new(&j.appliance).map_err(|e| invalid(path, "join.appliance", e.to_string()))?;
                TopologySource::Join(id, j.address)
            }
            (Some(_), Some(_)) => {
                return Err(invalid(path, "join", "give either topology_file or join, not both"))
            }
            (None, None) => {
                return Err(invalid(
                    path,
                    "topology_file",
                    "missing: give topology_file (bootstrap) or [join]",
                ))
            }
        };
        let tls = TlsFiles {
            ca: resolve(&f.tls.ca),
            cert: resolve(&f.tls.cert),
            key: resolve(&f.tls.key),
            crls: f.tls.crls.iter().map(|c| resolve(c)).collect(),
        };
        let pair = match f.serve.pair_mode {
            PairModeName::Async => PairMode::Async,
            PairModeName::SyncFailClosed => {
                PairMode::Sync { timeout_ms: f.serve.pair_timeout_ms, on_timeout: PairTimeout::FailClosed }
            }
            PairModeName::SyncDegrade => {
                PairMode::Sync { timeout_ms: f.serve.pair_timeout_ms, on_timeout: PairTimeout::Degrade }
            }
        };
        if pair != PairMode::Async && !f.roles.contains(&Role::Database) {
            return Err(invalid(path, "serve.pair_mode", "synchronous pair mode is for database appliances"));
        }
        let mut keep_siblings = Vec::new();
        for name in &f.keep_siblings {
            match repl_wire::Collection::from_name(name) {
                Some(c) if c.stream() == repl_wire::StreamId::Enterprise => keep_siblings.push(c),
                _ => {
                    return Err(invalid(
                        path,
                        "keep_siblings",
                        format!("{name:?} is not an enterprise collection (users, user-policies, computer-policies, sso-enrollments, topology)"),
                    ))
                }
            }
        }
        let m = &f.maintenance;
        if m.log_retained_mib < LOG_RETAINED_MIB_MIN {
            return Err(invalid(
                path,
                "maintenance.log_retained_mib",
                format!("{} MiB is below the minimum of {LOG_RETAINED_MIB_MIN} MiB", m.log_retained_mib),
            ));
        }
        let every = |s: u64| (s > 0).then(|| std::time::Duration::from_secs(s));
        let maintenance = MaintenanceConfig {
            compact_every: every(m.compact_interval_s),
            collect_tombstones_every: every(m.tombstone_interval_s),
            checkpoint_every: every(m.checkpoint_interval_s),
        };
        let config = Config {
            maintenance,
            log_retained_bytes_max: m.log_retained_mib << 20,
            keep_siblings,
            file: path.to_path_buf(),
            appliance,
            site: f.site,
            roles: f.roles,
            data_dir: resolve(&f.data_dir),
            listen: f.listen,
            metrics: f.metrics,
            log_format: f.log_format,
            topology,
            tls,
            serve: ServeConfig { causal_wait_ms: f.serve.causal_wait_ms, pair, ..ServeConfig::default() },
            sync: SyncConfig::over_quic(),
        };
        if let (TopologySource::Bootstrap(t), Some(file)) = (&config.topology, &f.topology_file) {
            check_membership(&config, t, &resolve(file))?;
        }
        Ok(config)
    }
}
