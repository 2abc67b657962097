//! Thin wrappers over the blocking syscalls a shard issues: EINTR is retried, short transfers are continued, and
//! every data syscall is counted (retries included) into the caller's counter.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Open a source for reading: `O_RDONLY | O_CLOEXEC | O_NOFOLLOW` (std adds `O_CLOEXEC` and retries EINTR).
/// `O_NOFOLLOW` makes a source replaced by a symlink after the walk fail with `ELOOP` instead of being followed;
/// `follow` (for `-L`) drops it.
pub(crate) fn open_source(path: &Path, follow: bool) -> io::Result<OwnedFd> {
    let file = OpenOptions::new().read(true).custom_flags(if follow { 0 } else { libc::O_NOFOLLOW }).open(path)?;
    Ok(file.into())
}

/// A file offset as `off_t`; one that does not fit (32-bit `off_t`) is `EOVERFLOW`, as the kernel would say.
fn off_t(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// The error of a syscall that returned -1, or `None` when it was only interrupted by a signal (`EINTR`).
fn failure() -> Option<io::Error> {
    let e = io::Error::last_os_error();
    (e.kind() != io::ErrorKind::Interrupted).then_some(e)
}

pub(crate) use fastsync_engine::blocking::pread_full;

/// Write all of `buf` at `offset`, continuing after short writes and retrying `EINTR`.
pub(crate) fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], offset: u64, calls: &mut u64) -> io::Result<()> {
    let mut done_bytes = 0;
    while done_bytes < buf.len() {
        let at = off_t(offset + done_bytes as u64)?;
        let rest = &buf[done_bytes..];
        *calls += 1;
        // SAFETY: `rest` is valid for reads of `rest.len()` bytes.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), at) };
        if n > 0 {
            done_bytes += n as usize;
        } else if n == 0 {
            // Regular files never do this; looping would spin forever.
            return Err(io::Error::new(io::ErrorKind::WriteZero, "write accepted no bytes"));
        } else if let Some(e) = failure() {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn pread_full_stops_only_at_end_of_file() {
        let dir = std::env::temp_dir().join(format!("fastsync-fallback-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let _ = std::fs::remove_file(&path);
        let fd: OwnedFd =
            std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap().into();
        let mut calls = 0;
        pwrite_all(fd.as_fd(), b"hello world", 0, &mut calls).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(pread_full(fd.as_fd(), &mut buf, 6, &mut calls).unwrap(), 5);
        assert_eq!(&buf[..5], b"world");
        // One write, then one read with data and one that found the end.
        assert_eq!(calls, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
