//! Start-up checks: is io_uring usable here, which opcodes exist, how much memory may be registered.

use std::io;

use fastsync_engine::EngineError;
use io_uring::{IoUring, Probe, opcode};

pub(crate) struct Found {
    pub registrable_bytes: usize,
    /// IORING_OP_SEND_ZC exists (Linux 6.0): socket jobs may send from registered buffers without a copy.
    pub zerocopy_send: bool,
    pub notes: Vec<String>,
}

fn unavailable(reason: impl Into<String>) -> EngineError {
    EngineError::UringUnavailable { reason: reason.into() }
}

pub(crate) fn probe() -> Result<Found, EngineError> {
    let mut notes = Vec::new();
    // kernel.io_uring_disabled: 0 = allowed, 1 = only for members of kernel.io_uring_group (or CAP_SYS_ADMIN),
    // 2 = disabled for everyone (Linux 6.6+).
    if std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|v| v.trim() == "2") {
        return Err(unavailable("disabled by the sysctl kernel.io_uring_disabled=2 (set it to 0 to allow io_uring)"));
    }
    let ring = match IoUring::new(8) {
        Ok(r) => r,
        Err(e) => {
            let why = match e.raw_os_error() {
                // ENOSYS: kernel older than 5.1 or built without CONFIG_IO_URING; seccomp filters often return it too.
                Some(libc::ENOSYS) => "the kernel has no io_uring, or a seccomp profile (e.g. a container's) blocks it",
                // EPERM: io_uring_disabled=1 and we are not in io_uring_group, or seccomp/LSM denies it.
                Some(libc::EPERM) => {
                    "not permitted (kernel.io_uring_disabled=1 without membership of kernel.io_uring_group, or a \
                     seccomp/LSM policy)"
                }
                // ENOMEM: ring memory is charged to RLIMIT_MEMLOCK on kernels before 5.12.
                Some(libc::ENOMEM) => "out of locked memory for the ring (raise RLIMIT_MEMLOCK: ulimit -l)",
                _ => "io_uring_setup failed",
            };
            return Err(unavailable(format!("{why}: {e}")));
        }
    };
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| unavailable(format!("the kernel cannot report io_uring opcodes (older than 5.6?): {e}")))?;
    let needed = [
        (opcode::OpenAt::CODE, "OPENAT"),
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::ReadFixed::CODE, "READ_FIXED"),
        (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    ];
    let missing: Vec<&str> = needed.iter().filter(|(c, _)| !probe.is_supported(*c)).map(|(_, n)| *n).collect();
    if !missing.is_empty() {
        return Err(unavailable(format!("the kernel lacks io_uring opcodes {}", missing.join(", "))));
    }
    // Opening straight into an allocated fixed-file slot needs Linux 5.19.
    ring.submitter()
        .register_files_sparse(4)
        .map_err(|e| unavailable(format!("sparse fixed-file tables are unsupported (Linux 5.19+ needed): {e}")))?;
    let registrable_bytes = match memlock_budget() {
        Ok(None) => usize::MAX,
        Ok(Some(bytes)) => {
            notes.push(format!(
                "registered buffers are limited to {} KiB by RLIMIT_MEMLOCK; blocks beyond it use plain reads and \
                 writes (raise it with `ulimit -l unlimited`, LimitMEMLOCK=infinity in a systemd unit, or \
                 --ulimit memlock=-1 for a container)",
                bytes / 1024
            ));
            bytes
        }
        Err(e) => {
            notes.push(format!("cannot read RLIMIT_MEMLOCK ({e}); registering no buffers"));
            0
        }
    };
    let zerocopy_send = probe.is_supported(opcode::SendZc::CODE);
    Ok(Found { registrable_bytes, zerocopy_send, notes })
}

/// Bytes of memory we may pin, or `None` when unlimited (root with CAP_IPC_LOCK, or an infinite limit).
fn memlock_budget() -> io::Result<Option<usize>> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into `lim`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root || lim.rlim_cur == libc::RLIM_INFINITY {
        return Ok(None);
    }
    // Keep a quarter for the rings themselves and other pinned memory.
    Ok(Some((lim.rlim_cur as usize) / 4 * 3))
}
