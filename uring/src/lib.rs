//! The thread-per-core io_uring engine: one ring, one registered buffer arena and one fixed-file table per pinned core.
//!
//! [`UringEngine::probe`] checks at start-up that io_uring is usable here (not disabled by sysctl or seccomp, the
//! opcodes we use are supported, fixed-file slots can be allocated) and sizes the registered arena from
//! RLIMIT_MEMLOCK. Each shard then runs [`shard`]'s event loop: it admits as many jobs as it has buffer slots, drives
//! each through open → read → write (→ verify) → finish as a small state machine, and batches all its submissions
//! into one `io_uring_enter` per turn.

#[cfg(target_os = "linux")]
mod bench;
#[cfg(target_os = "linux")]
mod probe;
#[cfg(target_os = "linux")]
mod shard;

use fastsync_engine::{Capabilities, Engine, EngineConfig, EngineError, EngineKind, Session};

/// The io_uring engine, configured by what the probe found.
#[derive(Debug, Clone)]
pub struct UringEngine {
    /// Bytes of buffer memory that may be registered (pinned) per shard; `usize::MAX` when unlimited.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    registrable_bytes_total: usize,
    /// The kernel has IORING_OP_SEND_ZC.
    zerocopy_send: bool,
    notes: Vec<String>,
}

impl UringEngine {
    /// Probe io_uring on this host. An error says why it cannot be used and, where there is one, the fix.
    pub fn probe() -> Result<UringEngine, EngineError> {
        #[cfg(target_os = "linux")]
        {
            let found = probe::probe()?;
            Ok(UringEngine {
                registrable_bytes_total: found.registrable_bytes,
                zerocopy_send: found.zerocopy_send,
                notes: found.notes,
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            Err(EngineError::UringUnavailable { reason: "io_uring exists only on Linux".into() })
        }
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { direct_io: true, zerocopy_send: self.zerocopy_send }
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }

    fn start(&self, config: &EngineConfig) -> Result<Session, EngineError> {
        #[cfg(target_os = "linux")]
        {
            shard::start(config, self.registrable_bytes_total)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = config;
            Err(EngineError::UringUnavailable { reason: "io_uring exists only on Linux".into() })
        }
    }
}
