//! The steps that end every file copy, shared by both engines: metadata, durability, rename, cleanup.
//!
//! These are plain synchronous syscalls: io_uring has no opcodes for fchmod/fchown/futimens, and running the same
//! code in both engines keeps their results identical.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::{FinishSpec, JobError, Op};

/// A path as a C string (paths from the OS never contain NUL; one that does is reported as invalid input).
pub fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int, op: Op, path: &Path) -> Result<(), JobError> {
    if rc == 0 { Ok(()) } else { Err(JobError::last_os(op, path)) }
}

/// Finish a destination whose bytes are all written: check that the source `src` did not change meanwhile (when
/// the spec has a stamp), optional truncate (O_DIRECT tails), xattrs, owner, mode, times, fsync, rename `tmp` onto
/// `dst`, fsync the directory. Order matters: xattrs need write permission, `chown` clears setuid bits so `chmod`
/// comes after it, and times come last so nothing after them touches the mtime.
pub fn finish_file(
    fd: BorrowedFd<'_>,
    truncate_to: Option<u64>,
    src: &Path,
    tmp: &Path,
    dst: &Path,
    spec: &FinishSpec,
) -> Result<(), JobError> {
    if let Some(stamp) = &spec.source_stamp {
        crate::blocking::check_source(src, stamp)?;
    }
    let raw = fd.as_raw_fd();
    if let Some(size) = truncate_to {
        // SAFETY: plain syscall on a descriptor we borrow.
        check(unsafe { libc::ftruncate(raw, size as libc::off_t) }, Op::Truncate, tmp)?;
    }
    for (name, value) in &spec.xattrs {
        set_xattr(raw, name, value).map_err(|e| JobError::new(Op::SetXattr, tmp, e))?;
    }
    if let Some((uid, gid)) = spec.owner {
        // SAFETY: plain syscall.
        if unsafe { libc::fchown(raw, uid, gid) } != 0 {
            let e = io::Error::last_os_error();
            // Preserving the owner is best effort for ordinary users, like `cp -a`.
            if e.raw_os_error() != Some(libc::EPERM) {
                return Err(JobError::new(Op::SetOwner, tmp, e));
            }
        }
    }
    if let Some(mode) = spec.mode {
        // SAFETY: plain syscall.
        check(unsafe { libc::fchmod(raw, (mode & 0o7777) as libc::mode_t) }, Op::SetPermissions, tmp)?;
    }
    if let Some([atime, mtime]) = spec.times {
        let ts = [
            libc::timespec { tv_sec: atime.sec as _, tv_nsec: atime.nsec as _ },
            libc::timespec { tv_sec: mtime.sec as _, tv_nsec: mtime.nsec as _ },
        ];
        // SAFETY: `ts` is a valid array of two timespecs.
        check(unsafe { libc::futimens(raw, ts.as_ptr()) }, Op::SetTimes, tmp)?;
    }
    if spec.fsync {
        // SAFETY: plain syscall.
        check(unsafe { libc::fsync(raw) }, Op::Fsync, tmp)?;
    }
    std::fs::rename(tmp, dst).map_err(|e| JobError::new(Op::Rename, dst, e))?;
    if spec.fsync {
        fsync_dir(dst).map_err(|e| JobError::new(Op::Fsync, dst.parent().unwrap_or(Path::new(".")), e))?;
    }
    Ok(())
}

/// fsync the directory that holds `path`, making a rename or create in it durable.
fn fsync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let f = std::fs::File::open(dir)?;
    f.sync_all()
}

/// Remove a temporary file after a failure. Errors are ignored: the file may never have been created.
pub fn abandon(tmp: &Path) {
    let _ = std::fs::remove_file(tmp);
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_xattr(fd: libc::c_int, name: &[u8], value: &[u8]) -> io::Result<()> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: name is NUL-terminated, value is a valid slice.
    let rc = unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(target_os = "macos")]
fn set_xattr(fd: libc::c_int, name: &[u8], value: &[u8]) -> io::Result<()> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: name is NUL-terminated, value is a valid slice.
    let rc = unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), 0, 0) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "macos")))]
fn set_xattr(_fd: libc::c_int, _name: &[u8], _value: &[u8]) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}
