//! Typed errors of the engines: what failed, on which path, and why.

use std::io;
use std::path::PathBuf;

use crate::Show;

/// The operation that failed, named the way users know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Open,
    Create,
    Read,
    Write,
    Fsync,
    SetPermissions,
    SetOwner,
    SetTimes,
    SetXattr,
    Truncate,
    Rename,
    Verify,
    /// The source changed (size, times or inode) while it was copied.
    SourceChanged,
    /// The run was interrupted (SIGINT/SIGTERM) before the job ran.
    Interrupted,
    /// Reading a file to compute its digest.
    Hash,
    /// `stat` of a file (the metadata benchmark).
    Stat,
    /// Removing a file (the metadata benchmark).
    Remove,
    /// A benchmark job could not run as asked.
    Bench,
    /// Sending a frame on a connection (socket jobs).
    Send,
    /// Receiving a frame's payload from a connection (socket jobs).
    Recv,
}

impl Op {
    fn verb(self) -> &'static str {
        match self {
            Op::Open => "cannot open",
            Op::Create => "cannot create",
            Op::Read => "error reading",
            Op::Write => "error writing",
            Op::Fsync => "cannot fsync",
            Op::SetPermissions => "cannot set permissions on",
            Op::SetOwner => "cannot set owner of",
            Op::SetTimes => "cannot set times on",
            Op::SetXattr => "cannot set extended attributes on",
            Op::Truncate => "cannot truncate",
            Op::Rename => "cannot rename into place",
            Op::Verify => "verification failed for",
            Op::SourceChanged => "source changed while copying",
            Op::Interrupted => "interrupted before copying",
            Op::Hash => "cannot compute the checksum of",
            Op::Stat => "cannot stat",
            Op::Remove => "cannot remove",
            Op::Bench => "cannot benchmark",
            Op::Send => "error sending",
            Op::Recv => "error receiving",
        }
    }
}

/// One job's failure: the operation, the path it was applied to, and the OS's reason.
#[derive(Debug, thiserror::Error)]
#[error("{} '{}': {}", .op.verb(), .path.shown(), .source)]
pub struct JobError {
    pub op: Op,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl JobError {
    pub fn new(op: Op, path: impl Into<PathBuf>, source: io::Error) -> Self {
        JobError { op, path: path.into(), source }
    }
    /// The current `errno` as a job error.
    pub fn last_os(op: Op, path: impl Into<PathBuf>) -> Self {
        Self::new(op, path, io::Error::last_os_error())
    }
}

/// Why an engine could not start or keep running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// io_uring cannot be used on this host.
    #[error("io_uring is unavailable: {reason}")]
    UringUnavailable { reason: String },
    /// A shard could not be set up.
    #[error("cannot start engine shard {shard}: {source}")]
    ShardSetup { shard: usize, source: io::Error },
    /// A shard thread died; its jobs cannot complete.
    #[error("engine shard {shard} stopped unexpectedly: {message}")]
    ShardDied { shard: usize, message: String },
    /// The configuration is unusable.
    #[error("invalid engine configuration: {0}")]
    Config(String),
}
