//! The engine shards that move `fastsync://` payloads (`FASTSYNC_ZEROCOPY=shards`, the default, or `shards-zc`, see
//! [`super::zerocopy::Mode`]): one engine session per process, started once, whose shards run the socket jobs
//! ([`fastsync_engine::net`]) that the stream threads hand them — a large file's chunks, read with READ_FIXED into
//! a registered slot, hashed and sent with SEND (or SEND_ZC) by the io_uring engine; received, checked and written with
//! WRITE_FIXED. The stream threads keep the protocol (requests, answers, retries, reconnections); each hands one
//! frame at a time to a shard and waits for its completion, so the shards hold at most one job per stream.

use std::io;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};
use fastsync_engine::net::HEAD_ROOM_BYTES;
use fastsync_engine::{Completion, Engine, EngineConfig, EngineKind, Job, Session, Submitter};

use super::wire::CHUNK_BYTES_MAX;

/// Bytes of one buffer slot: the largest payload (`CHUNK_BYTES_MAX`) after the room for its frame head.
pub const SLOT_BYTES: usize = CHUNK_BYTES_MAX + HEAD_ROOM_BYTES;

/// Payloads smaller than this move on the stream's own thread (the ordinary path: read into memory, checked,
/// written; or sent from the page cache): a small file's few bytes mostly sit in the connection's read buffer already,
/// and the hand-off to a shard and back costs more than it saves. Large files' chunks (1-4 MiB) are far above it.
pub const PAYLOAD_BYTES_MIN: usize = 64 << 10;

/// Buffer slots per io_uring shard at most (jobs in flight per core); a fallback shard runs one job at a time.
const URING_SLOTS_PER_SHARD_MAX: usize = 8;

/// Fallback shard threads at least: each blocks on its socket for a whole frame, so fewer threads than streams
/// would make streams wait for each other.
const FALLBACK_SHARDS_MIN: usize = 8;

/// The process's socket shards.
pub struct NetShards {
    submitter: Submitter,
    zerocopy: bool,
    kind: EngineKind,
}

static SHARDS: OnceLock<NetShards> = OnceLock::new();
/// The session behind [`SHARDS`], kept alive for the rest of the process.
static SESSION: Mutex<Option<Session>> = Mutex::new(None);

/// The engine sizing for socket jobs of at most `streams` streams at once within `memory_limit_bytes`: buffers take
/// at most a quarter of it, as for local copies (at least one shard of one slot).
pub fn config(kind: EngineKind, cores: usize, streams: usize, memory_limit_bytes: u64) -> EngineConfig {
    let budget_bytes = memory_limit_bytes / 4;
    // Shards of one slot each (in whole huge pages) that the budget affords, at least one.
    let afford = (budget_bytes / fastsync_engine::AlignedArena::footprint_bytes(SLOT_BYTES, 1) as u64).max(1) as usize;
    let shards = match kind {
        EngineKind::Uring => cores.max(1).min(afford),
        EngineKind::Fallback => (cores * 2).max(FALLBACK_SHARDS_MIN).min(streams.max(2)).min(afford),
    };
    let budget = (budget_bytes / SLOT_BYTES as u64 / shards as u64) as usize;
    let slots = match kind {
        EngineKind::Uring => streams.div_ceil(shards).min(budget).clamp(1, URING_SLOTS_PER_SHARD_MAX),
        EngineKind::Fallback => 1,
    };
    EngineConfig {
        shards,
        pin: kind == EngineKind::Uring,
        block_bytes: SLOT_BYTES,
        slots_per_shard: slots,
        jobs_in_flight_max: shards * slots,
        buffered_writes_nonblocking: false,
        buffers_up_front: false,
    }
}

/// Start the process's socket shards on `engine` (once; later calls do nothing). `zerocopy`: send with io_uring's
/// zero-copy send where the engine has it.
pub fn start(engine: &dyn Engine, config: &EngineConfig, zerocopy: bool) -> Result<(), fastsync_engine::EngineError> {
    let mut held = SESSION.lock().expect("not poisoned");
    if SHARDS.get().is_some() {
        return Ok(());
    }
    let session = engine.start(config)?;
    let shards = NetShards {
        submitter: session.submitter(),
        zerocopy: zerocopy && engine.capabilities().zerocopy_send,
        kind: engine.kind(),
    };
    *held = Some(session);
    let _ = SHARDS.set(shards);
    Ok(())
}

/// The process's socket shards, when started.
pub fn get() -> Option<&'static NetShards> {
    SHARDS.get()
}

impl NetShards {
    /// Whether sends go out with io_uring's zero-copy send.
    pub fn zerocopy(&self) -> bool {
        self.zerocopy
    }

    /// Which engine runs the shards.
    pub fn kind(&self) -> EngineKind {
        self.kind
    }

    /// Hand one socket job to the shards and wait for its completion (the job's own timeout bounds the wait; a
    /// shard that dies ends it too).
    pub fn run(&self, job: impl FnOnce(Sender<Completion>) -> Job) -> io::Result<Completion> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.submitter.submit(job(tx)).map_err(io::Error::other)?;
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(c) => return Ok(c),
                Err(RecvTimeoutError::Timeout) if !self.submitter.died() => {}
                _ => return Err(io::Error::other("an engine shard stopped before completing a socket job")),
            }
        }
    }
}
