//! `repl-soak`: real `repld` processes under faults, then proof that nothing
//! acknowledged was lost. Exit 0 clean, 1 a violation, 2 usage or setup error.

use std::process::ExitCode;

use repl_tools::demo::DemoError;
use repl_tools::soak::{self, SoakArgs};

fn main() -> ExitCode {
    let (args, rt) = match repl_tools::start::<SoakArgs>("repl-soak", 2) {
        Ok(started) => started,
        Err(code) => return code,
    };
    repl_tools::logging::init(repl_tools::config::LogFormat::Human);
    match rt.block_on(soak::run(args)) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e @ DemoError::Checks { .. }) => {
            eprintln!("repl-soak: VIOLATION: {e}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("repl-soak: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        repl_tools::soak::SoakArgs::command().debug_assert();
    }
}
