//! The engine interface: jobs that per-core shards execute, their completions, and the contract both engines honour.
//!
//! A transfer is planned (in the `fastsync` crate, without syscalls) as a stream of [`Job`]s: whole small files and
//! byte ranges of large ones. An engine ([`Engine`]) starts one shard per core; a [`Session`] hands jobs to the shards
//! over bounded lock-free queues and returns one [`Completion`] per job. The engines never see CLI flags: everything a
//! job needs (paths, sizes, what metadata to apply, whether to fsync or verify) is data in the job.
//!
//! # Contract (both engines)
//! - A file appears under its final name only when all of its bytes were written (and, with
//!   [`FinishSpec::fsync`], made durable: data, then rename, then the directory). On any error the temporary file is
//!   removed and the completion carries a [`JobError`] naming the operation and the path. A [`FileJob`] whose
//!   destination is vacant may be an unnamed file instead, linked (not renamed) into place ([`create_dst`]).
//! - Every job submitted yields exactly one completion, even when the engine fails.
//! - Holes are never read: a [`RangeJob`] covers data only; the destination's size is set when it is created.
//! - With [`FinishSpec::verify`], each block is hashed with BLAKE3 as it is read from the source, read back from the
//!   destination after it was written, and compared; a mismatch fails the job before the rename.
//! - With [`FinishSpec::source_stamp`], a source that changed while it was copied fails the job
//!   ([`Op::SourceChanged`]) instead of being renamed into place torn; the planner decides whether to retry.
//! - A [`ChunkedFile`] with a journal keeps its temporary and journal when it fails, for the next run to resume;
//!   a [`RangeJob::resume`] range is copied only if the destination's bytes differ from the source's (BLAKE3).
//! - After [`Session::cancel`], jobs not yet started complete at once with [`Op::Interrupted`]; started ones finish.
//! - Socket jobs ([`net::SendJob`], [`net::RecvJob`]) move one `fastsync://` frame between a file and a connection;
//!   who owns the socket meanwhile, short transfers, timeouts, resets, shrinking files and cancellation are in
//!   [`net`]'s contract. Their completions go to the job's own channel, and any thread may submit them
//!   ([`Submitter`]).

pub mod bench;
pub mod blocking;
pub mod error;
pub mod finish;
pub mod job;
pub mod journal;
pub mod net;
pub mod offload;
pub mod pool;
pub mod session;
pub mod show;

pub use error::{EngineError, JobError, Op};
pub use finish::{Created, abandon, create_dst, discard, finish_file};
pub use job::{ChunkedFile, Completion, FileJob, FinishSpec, HashJob, Job, Outcome, RangeJob, SourceStamp, Timestamp};
pub use journal::Journal;
pub use net::{RecvJob, SendJob};
pub use pool::AlignedArena;
pub use session::{Session, ShardCtx, ShardStats, Submitter};
pub use show::Show;

/// Which engine runs the shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// One io_uring per pinned core (Linux).
    Uring,
    /// A portable thread pool doing blocking syscalls.
    Fallback,
}

impl EngineKind {
    /// The name users type and see (`--engine uring`).
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Fallback => "fallback",
        }
    }
}

/// What an engine can do, as data (so callers plan around it instead of probing by trial).
#[derive(Clone, Copy, Debug, Default)]
pub struct Capabilities {
    /// Ranges of files opened with O_DIRECT are honoured (aligned buffers, aligned lengths, tail fixed by truncate).
    pub direct_io: bool,
    /// Socket jobs can send from registered buffers without a copy (io_uring `SEND_ZC`, Linux 6.0); where not,
    /// [`net::SendJob::zerocopy`] must be false.
    pub zerocopy_send: bool,
}

/// Sizing of an engine session: the memory profile turned into counts. All limits are hard bounds.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Number of shards (threads), one per core used.
    pub shards: usize,
    /// Pin shard `i` to the i-th allowed core.
    pub pin: bool,
    /// Bytes of one I/O block (one buffer slot); a multiple of 4096.
    pub block_bytes: usize,
    /// Buffer slots per shard; also the shard's maximum number of I/Os in flight.
    pub slots_per_shard: usize,
    /// Jobs handed to the engine and not yet completed, all shards together.
    pub jobs_in_flight_max: usize,
    /// The destination filesystem accepts non-blocking buffered writes (XFS, btrfs). Where it does not (ext4 as of
    /// Linux 6.18), io_uring hands every buffered WRITE to a kernel worker thread, and a plain `pwrite` from the shard
    /// costs less; engines that only block anyway ignore this.
    pub buffered_writes_nonblocking: bool,
    /// Register (pin, and so fault in) every buffer when a shard starts, not when a job first uses it: for
    /// benchmarks, which time from their first I/O and use every buffer anyway.
    pub buffers_up_front: bool,
}

impl EngineConfig {
    /// Buffer memory the session allocates, all shards together (arenas in whole huge pages).
    pub fn buffer_bytes(&self) -> usize {
        self.shards * AlignedArena::footprint_bytes(self.block_bytes, self.slots_per_shard)
    }
}

/// An engine: something that can start shards that execute [`Job`]s.
///
/// # Contract
/// `start` either returns a session whose shards are all running, or an error that says why the engine cannot run
/// here (and how to fix it, when there is a fix). The module docs list what every job must guarantee.
pub trait Engine: Send + Sync {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;
    /// What this engine supports on this host.
    fn capabilities(&self) -> Capabilities;
    /// Start the shards.
    fn start(&self, config: &EngineConfig) -> Result<Session, EngineError>;
    /// Notes gathered while probing (e.g. registered buffers limited by RLIMIT_MEMLOCK), shown once with `-v`.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}
