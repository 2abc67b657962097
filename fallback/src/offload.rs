//! Copies the kernel does for us on Linux: reflinks (`FICLONE`) and `copy_file_range`. Elsewhere these report that
//! nothing was copied and the shard's read/write path does all the work.

use std::os::fd::BorrowedFd;
use std::path::Path;

use fastsync_engine::JobError;

/// Where an offloaded copy stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offload {
    /// Everything asked for was copied.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    Complete,
    /// Bytes before this offset were copied; the read/write path must copy (or diagnose) the rest.
    ResumeAt(u64),
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::os::fd::BorrowedFd;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};

    use fastsync_engine::{JobError, Op};

    use super::Offload;
    use crate::sys;

    /// Bytes asked of one `copy_file_range` when copying to end of file (the kernel caps a call at about 2 GiB).
    const OFFLOAD_CHUNK_BYTES: usize = 1 << 30;

    /// Set once `copy_file_range` answered `ENOSYS` (kernel before 4.5, or a seccomp filter): never ask again.
    static COPY_FILE_RANGE_MISSING: AtomicBool = AtomicBool::new(false);

    /// Whether a failed `FICLONE` only means "no reflink here", leaving the destination untouched.
    fn clone_refused(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            // The filesystem has no reflinks (ext4, tmpfs, ...); on Linux ENOTSUP is the same number.
            Some(libc::EOPNOTSUPP)
            // Source and destination are on different filesystems (or mounts, before Linux 5.18).
            | Some(libc::EXDEV)
            // The filesystem supports reflinks but not for these files (e.g. inline data, different block sizes).
            | Some(libc::EINVAL)
            // The filesystem implements no such ioctl at all.
            | Some(libc::ENOTTY)
            // Some filesystems (and special files) refuse the descriptors themselves.
            | Some(libc::EBADF)
        )
    }

    pub(crate) fn offload_file(
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        tmp: &Path,
        calls: &mut u64,
        written_bytes: &mut u64,
    ) -> Result<Offload, JobError> {
        match sys::ficlone(dst, src, calls) {
            Ok(()) => {
                // The clone is a snapshot of the whole source: its size is what the destination received.
                *written_bytes = sys::file_size(dst).map_err(|e| JobError::new(Op::Write, tmp, e))?;
                return Ok(Offload::Complete);
            }
            Err(e) if clone_refused(&e) => {}
            // Anything else (ENOSPC, EIO, EPERM on an immutable file, ...) is a real failure writing the destination.
            Err(e) => return Err(JobError::new(Op::Write, tmp, e)),
        }
        Ok(offload_range(src, dst, 0, None, calls, written_bytes))
    }

    pub(crate) fn offload_range(
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        start: u64,
        end: Option<u64>,
        calls: &mut u64,
        written_bytes: &mut u64,
    ) -> Offload {
        if COPY_FILE_RANGE_MISSING.load(Ordering::Relaxed) {
            return Offload::ResumeAt(start);
        }
        let mut offset = start;
        loop {
            let len = match end {
                None => OFFLOAD_CHUNK_BYTES,
                Some(end) if offset >= end => return Offload::Complete,
                Some(end) => (end - offset).min(OFFLOAD_CHUNK_BYTES as u64) as usize,
            };
            match sys::copy_file_range(src, dst, offset, len, calls) {
                // After some data, 0 is the end of a file copied to its end.
                Ok(0) if end.is_none() && offset > start => return Offload::Complete,
                // 0 at once can be a lie: procfs/sysfs files report size 0 and copy_file_range copies nothing
                // though read() returns data. And 0 before the end of a range means the source shrank. Either way
                // the read path decides (and reports a shrink with the right error).
                Ok(0) => return Offload::ResumeAt(offset),
                Ok(n) => {
                    offset += n as u64;
                    *written_bytes += n as u64;
                }
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ENOSYS) {
                        COPY_FILE_RANGE_MISSING.store(true, Ordering::Relaxed);
                    }
                    // EXDEV (different filesystems before 5.3, or ones the kernel won't cross), EINVAL, EOPNOTSUPP
                    // and ENOSYS mean "not here". Other errors cannot say which side failed (EIO from source or
                    // destination?), so those also go to the read/write path, which copies the rest if the error
                    // was transient and otherwise reports the failing operation on the right path. Nothing is lost:
                    // bytes at and after `offset` are written again.
                    return Offload::ResumeAt(offset);
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::os::fd::BorrowedFd;
    use std::path::Path;

    use fastsync_engine::JobError;

    use super::Offload;

    pub(crate) fn offload_file(
        _src: BorrowedFd<'_>,
        _dst: BorrowedFd<'_>,
        _tmp: &Path,
        _calls: &mut u64,
        _written_bytes: &mut u64,
    ) -> Result<Offload, JobError> {
        Ok(Offload::ResumeAt(0))
    }

    pub(crate) fn offload_range(
        _src: BorrowedFd<'_>,
        _dst: BorrowedFd<'_>,
        start: u64,
        _end: Option<u64>,
        _calls: &mut u64,
        _written_bytes: &mut u64,
    ) -> Offload {
        Offload::ResumeAt(start)
    }
}

/// Copy a whole file in the kernel: a reflink when the filesystem has them, else `copy_file_range` to end of file.
/// Counts into `written_bytes` what was copied. Errors only when a reflink attempt failed for real.
pub(crate) fn offload_file(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    tmp: &Path,
    calls: &mut u64,
    written_bytes: &mut u64,
) -> Result<Offload, JobError> {
    imp::offload_file(src, dst, tmp, calls, written_bytes)
}

/// Copy `[start, end)` (or from `start` to end of file) with `copy_file_range` at the same offsets in both files,
/// adding what was copied to `written_bytes`. Never fails: whatever it cannot copy is left to the read/write path.
pub(crate) fn offload_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    start: u64,
    end: Option<u64>,
    calls: &mut u64,
    written_bytes: &mut u64,
) -> Offload {
    imp::offload_range(src, dst, start, end, calls, written_bytes)
}
