//! fastsync's portable engine: one thread per shard doing blocking syscalls, for hosts without io_uring.
//!
//! Each shard runs one job at a time from start to end. Data moves with `pread`/`pwrite` through one page-aligned
//! block of the shard's arena; on Linux, when nothing has to be verified, the kernel copies instead: a reflink
//! (`FICLONE`) for whole files, else `copy_file_range`, falling back to `pread`/`pwrite` wherever those are refused.
//! Finishing (metadata, fsync, rename) is [`fastsync_engine::finish_file`], shared with the io_uring engine.
//!
//! The engine honours the contract in [`fastsync_engine`]. On Linux it takes O_DIRECT ranges
//! ([`Capabilities::direct_io`]): aligned blocks through the arena with `pread`/`pwrite`, one at a time per shard
//! thread; elsewhere it declines them, so the planner never hands it a [`fastsync_engine::ChunkedFile`] with
//! `direct` set.

mod bench;
mod net;
mod shard;
mod sys;

use fastsync_engine::{
    AlignedArena, Capabilities, Engine, EngineConfig, EngineError, EngineKind, Session, ShardCtx, ShardStats,
};

use crate::shard::Shard;

/// The portable engine: a pool of shard threads doing blocking syscalls.
#[derive(Clone, Copy, Debug, Default)]
pub struct FallbackEngine;

impl FallbackEngine {
    pub fn new() -> Self {
        FallbackEngine
    }
}

impl Engine for FallbackEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Fallback
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { direct_io: cfg!(target_os = "linux"), zerocopy_send: false }
    }

    fn start(&self, config: &EngineConfig) -> Result<Session, EngineError> {
        let (block_bytes, slots) = (config.block_bytes, config.slots_per_shard);
        Session::start(config, "fs-fallback", move |_shard| {
            let arena = AlignedArena::new(block_bytes, slots);
            Ok(move |ctx: &mut ShardCtx| shard_main(ctx, arena))
        })
    }
}

/// A shard's life: run every job it can find, sleep when there is none, stop when the session shuts down.
fn shard_main(ctx: &mut ShardCtx, arena: AlignedArena) -> ShardStats {
    let mut shard = Shard::new(arena);
    loop {
        while let Some(job) = ctx.next_job() {
            let reply = job.reply().cloned();
            let completion = shard.run(job, ctx.index);
            ctx.complete_to(reply.as_ref(), completion);
        }
        if !ctx.wait_for_work() {
            break;
        }
    }
    shard.into_stats()
}
