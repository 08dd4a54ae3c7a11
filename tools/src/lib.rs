//! repl binaries: `repld` (the daemon and its demo). The library part holds what the
//! binaries and their process tests share: the configuration, the daemon, the demo.

pub mod config;
pub mod daemon;
pub mod demo;
pub mod logging;
