//! Work done with plain blocking syscalls on the shard thread: hashing whole files (the fallback engine; the uring
//! engine hashes through its ring) and ranges (resume checks), and checking that a source did not change while it
//! was copied.
//!
//! Hashing is CPU-bound (BLAKE3 runs at memory speed per core), so overlapping its reads through the ring would buy
//! little; running it on the shards still spreads it across every core.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::finish::cstr;
use crate::{JobError, Op, SourceStamp, Timestamp};

/// Read at `offset` until `buf` is full or the file ends, retrying `EINTR` and counting syscalls into `calls`.
/// Returns the bytes read, fewer than `buf.len()` only when a read returned 0 (end of file): a short read alone
/// proves nothing (a signal, or a file still growing).
pub fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64, calls: &mut u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let at =
            libc::off_t::try_from(offset + done as u64).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        *calls += 1;
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::pread(fd.as_raw_fd(), buf[done..].as_mut_ptr().cast(), buf.len() - done, at) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// BLAKE3 of a whole file, read through `buf`. Returns the digest and the bytes hashed.
pub fn hash_file(path: &Path, follow: bool, buf: &mut [u8]) -> Result<([u8; 32], u64), JobError> {
    let c = cstr(path).map_err(|e| JobError::new(Op::Hash, path, e))?;
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    // SAFETY: valid C string; the descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC | nofollow) };
    if fd < 0 {
        return Err(JobError::last_os(Op::Hash, path));
    }
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    advise_sequential(&fd);
    let mut hasher = blake3::Hasher::new();
    let mut offset = 0u64;
    loop {
        let n = pread_full(borrow(&fd), buf, offset, &mut 0).map_err(|e| JobError::new(Op::Hash, path, e))?;
        hasher.update(&buf[..n]);
        offset += n as u64;
        if n < buf.len() {
            return Ok((*hasher.finalize().as_bytes(), offset));
        }
    }
}

/// Whether `[offset, offset + len)` holds the same bytes in both files (BLAKE3 of each side, block by block, with
/// `buf` split in two halves). Reads are rounded to 4096 bytes, so descriptors opened with O_DIRECT work when
/// `offset` is aligned and `buf` is (an arena slot).
pub fn range_matches(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    src_name: &Path,
    dst_name: &Path,
) -> Result<bool, JobError> {
    let half = (buf.len() / 2) & !4095;
    assert!(half > 0, "buffer too small to compare ranges");
    let (a, b) = buf.split_at_mut(half);
    let (mut ha, mut hb) = (blake3::Hasher::new(), blake3::Hasher::new());
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let want = ((end - at) as usize).min(half);
        let ask = want.next_multiple_of(4096).min(half);
        let na =
            pread_full(src, &mut a[..ask], at, &mut 0).map_err(|e| JobError::new(Op::Read, src_name, e))?.min(want);
        let nb =
            pread_full(dst, &mut b[..ask], at, &mut 0).map_err(|e| JobError::new(Op::Read, dst_name, e))?.min(want);
        if na != want || nb != want {
            return Ok(false);
        }
        ha.update(&a[..want]);
        hb.update(&b[..want]);
        at += want as u64;
    }
    Ok(ha.finalize() == hb.finalize())
}

/// Bytes at the start of a file whose read is started at once when it is opened for hashing.
#[cfg(target_os = "linux")]
const READ_AHEAD_BYTES: libc::off_t = 8 << 20;

/// A file about to be read once from start to end: ask the kernel for a large read-ahead window and to start
/// reading its first blocks now, so the device is busy while the previous file is still being hashed. Advice only:
/// errors are ignored.
fn advise_sequential(fd: &OwnedFd) {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on a descriptor we own.
    unsafe {
        libc::posix_fadvise(fd.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        libc::posix_fadvise(fd.as_raw_fd(), 0, READ_AHEAD_BYTES, libc::POSIX_FADV_WILLNEED);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = fd;
}

fn borrow(fd: &OwnedFd) -> BorrowedFd<'_> {
    use std::os::fd::AsFd;
    fd.as_fd()
}

/// Fail with [`Op::SourceChanged`] when `src` no longer matches the stamp taken when it was walked.
pub fn check_source(src: &Path, stamp: &SourceStamp) -> Result<(), JobError> {
    let md = if stamp.follow { std::fs::metadata(src) } else { std::fs::symlink_metadata(src) }
        .map_err(|e| JobError::new(Op::SourceChanged, src, e))?;
    if stamp_of(&md, stamp.follow) == *stamp {
        return Ok(());
    }
    Err(JobError::new(
        Op::SourceChanged,
        src,
        io::Error::other("its size, modification time or change time differ before and after the copy"),
    ))
}

/// The stamp of a file's metadata (as returned by `stat`, or `lstat` when `follow` is false).
pub fn stamp_of(md: &std::fs::Metadata, follow: bool) -> SourceStamp {
    use std::os::unix::fs::MetadataExt;
    SourceStamp {
        size: md.size(),
        mtime: Timestamp { sec: md.mtime(), nsec: md.mtime_nsec() },
        ctime: Timestamp { sec: md.ctime(), nsec: md.ctime_nsec() },
        ino: md.ino(),
        follow,
    }
}
