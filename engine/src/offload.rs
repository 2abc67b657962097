//! Copies the kernel does for us on Linux: reflinks (`FICLONE`) and `copy_file_range`, shared by both engines. Elsewhere
//! these report that nothing was copied and the engine's read/write path does all the work.
//!
//! A kernel copy moves page-cache data once, inside the kernel; a read and a write through a user buffer move it twice.

/// Where an offloaded copy stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
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

    use crate::{JobError, Op};

    use super::Offload;
    use super::sys;

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

    /// Copy a whole file in the kernel: a reflink when the filesystem has them, else `copy_file_range` to end of
    /// file. Counts into `written_bytes` what was copied. Errors only when a reflink attempt failed for real; they
    /// name `dst_name`, the destination as the user knows it.
    pub fn offload_file(
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        dst_name: &Path,
        calls: &mut u64,
        written_bytes: &mut u64,
    ) -> Result<Offload, JobError> {
        match sys::ficlone(dst, src, calls) {
            Ok(()) => {
                // The clone is a snapshot of the whole source: its size is what the destination received.
                *written_bytes = sys::file_size(dst).map_err(|e| JobError::new(Op::Write, dst_name, e))?;
                return Ok(Offload::Complete);
            }
            Err(e) if clone_refused(&e) => {}
            // Anything else (ENOSPC, EIO, EPERM on an immutable file, ...) is a real failure writing the destination.
            Err(e) => return Err(JobError::new(Op::Write, dst_name, e)),
        }
        Ok(offload_range(src, dst, 0, None, calls, written_bytes))
    }

    /// Copy `[start, end)` (or from `start` to end of file) with `copy_file_range` at the same offsets in both
    /// files, adding what was copied to `written_bytes`. Never fails: whatever it cannot copy is left to the
    /// read/write path.
    pub fn offload_range(
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

/// Elsewhere nothing is offloaded: every byte goes through the engine's read/write path.
#[cfg(not(target_os = "linux"))]
mod imp {
    use std::os::fd::BorrowedFd;
    use std::path::Path;

    use crate::JobError;

    use super::Offload;

    pub fn offload_file(
        _src: BorrowedFd<'_>,
        _dst: BorrowedFd<'_>,
        _dst_name: &Path,
        _calls: &mut u64,
        _written_bytes: &mut u64,
    ) -> Result<Offload, JobError> {
        Ok(Offload::ResumeAt(0))
    }

    pub fn offload_range(
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

pub use imp::{offload_file, offload_range};

/// The syscalls behind the offloads, retried on EINTR and counted into `calls`.
#[cfg(target_os = "linux")]
mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// The error of a syscall that returned -1, or `None` when it was only interrupted by a signal (`EINTR`).
    fn failure() -> Option<io::Error> {
        let e = io::Error::last_os_error();
        (e.kind() != io::ErrorKind::Interrupted).then_some(e)
    }

    /// `ioctl(dst, FICLONE, src)`: make `dst` share all of `src`'s extents (a reflink: btrfs, XFS, bcachefs, ...).
    #[cfg(target_os = "linux")]
    pub(super) fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>, calls: &mut u64) -> io::Result<()> {
        loop {
            *calls += 1;
            // SAFETY: FICLONE takes the source descriptor as its integer argument.
            if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
                return Ok(());
            }
            if let Some(e) = failure() {
                return Err(e);
            }
        }
    }

    /// One `copy_file_range` of up to `len` bytes at `offset` in both files (explicit offsets: neither descriptor's file
    /// position moves). Returns the bytes copied; 0 means the source has no data at `offset` (end of file).
    #[cfg(target_os = "linux")]
    pub(super) fn copy_file_range(
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        calls: &mut u64,
    ) -> io::Result<usize> {
        let offset = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        loop {
            // The kernel advances these copies, not the descriptors' positions.
            let (mut src_offset, mut dst_offset) = (offset, offset);
            *calls += 1;
            // SAFETY: both offset pointers are valid for the call; loff_t is 64-bit on every Linux target.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    (&raw mut src_offset).cast(),
                    dst.as_raw_fd(),
                    (&raw mut dst_offset).cast(),
                    len,
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            if let Some(e) = failure() {
                return Err(e);
            }
        }
    }

    /// The size of an open file (`fstat`).
    #[cfg(target_os = "linux")]
    pub(super) fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is valid for writes of one `struct stat`; it is read only after fstat succeeded.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fstat returned 0, so it filled `st`.
        let st = unsafe { st.assume_init() };
        Ok(st.st_size as u64)
    }
}
