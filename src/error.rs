//! Errors that stop a command before or outside any single entry, with the exit code each maps to.

use std::io;
use std::path::PathBuf;

use fastsync_engine::{EngineError, Show};

/// Exit codes (documented in the README).
pub mod exit {
    /// Everything was copied.
    pub const OK: i32 = 0;
    /// Some entries failed (each was reported), or the run could not start.
    pub const PARTIAL: i32 = 1;
    /// Bad usage: invalid arguments or a request that is refused (copy onto itself, ...).
    pub const USAGE: i32 = 2;
}

/// A failure of the whole command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A syscall on a path failed; `what` is the verb phrase ("cannot stat").
    #[error("{what} '{}': {source}", .path.shown())]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    /// The request is refused (exit code 2).
    #[error("{0}")]
    Refused(String),
    /// The engine could not start or died.
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// A benchmark job failed (its message names the operation and the path).
    #[error("{0}")]
    Bench(String),
    /// The user forced an engine that cannot run here.
    #[error("--engine {engine}: {source}")]
    EngineForced { engine: &'static str, source: EngineError },
}

impl Error {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io { what, path: path.into(), source }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Refused(_) => exit::USAGE,
            _ => exit::PARTIAL,
        }
    }
}
