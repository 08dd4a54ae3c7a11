//! `repld`: the replication daemon of an appliance, and `repld demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use repl_tools::config::{Config, LogFormat};
use repl_tools::{daemon, demo, logging};

#[derive(Debug, Parser)]
#[command(name = "repld", version, about = "The repl replication daemon")]
struct Cli {
    /// The configuration file (see repld.example.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Starts a local enterprise on loopback, drives a workload, kills and restarts an
    /// appliance, and checks failover, convergence and audit delivery.
    Demo(demo::DemoArgs),
    /// Checks a configuration file and exits.
    Check {
        /// The configuration file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let (cli, rt) = match repl_tools::start::<Cli>("repld", 1) {
        Ok(started) => started,
        Err(code) => return code,
    };
    match (cli.command, cli.config) {
        (Some(Command::Demo(args)), _) => {
            logging::init(LogFormat::Human);
            match rt.block_on(demo::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("repld demo: FAILED: {e}");
                    ExitCode::from(1)
                }
            }
        }
        (Some(Command::Check { config }), _) => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("repld: {e}");
                ExitCode::from(2)
            }
        },
        (None, Some(path)) => {
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("repld: {e}");
                    return ExitCode::from(2);
                }
            };
            logging::init(config.log_format);
            match rt.block_on(daemon::run(&config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "repld stopped");
                    eprintln!("repld: {e}");
                    ExitCode::from(e.exit_code() as u8)
                }
            }
        }
        (None, None) => {
            eprintln!("repld: give --config FILE, or a subcommand (repld demo); see repld --help");
            ExitCode::from(2)
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
