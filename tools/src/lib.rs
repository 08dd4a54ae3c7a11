//! repl binaries: `repld` (the daemon and its demo). The library part holds what the
//! binaries and their process tests share: the configuration, the daemon, the demo,
//! the operator commands.

pub mod backup;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod demo;
pub mod logging;
pub mod netns;
pub mod plot;
pub mod relay;
pub mod soak;

/// Parses the command line of a binary named `name` and builds its tokio runtime. On a
/// bad argument prints clap's message and returns exit code 2 (0 for `--help` and
/// `--version`); on a runtime failure returns `failure_code`.
pub fn start<P: clap::Parser>(
    name: &str,
    failure_code: u8,
) -> Result<(P, tokio::runtime::Runtime), std::process::ExitCode> {
    let cli = P::try_parse().map_err(|e| {
        let _ = e.print();
        std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 })
    })?;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| {
            eprintln!("{name}: cannot start the async runtime: {e}");
            std::process::ExitCode::from(failure_code)
        })?;
    Ok((cli, rt))
}
