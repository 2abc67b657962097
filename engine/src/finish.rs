//! The steps that end every file copy, shared by both engines: metadata, durability, rename, cleanup.
//!
//! These are plain synchronous syscalls: io_uring has no opcodes for fchmod/fchown/futimens, and running the same
//! code in both engines keeps their results identical.

use std::ffi::{CStr, CString};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::{FinishSpec, JobError, Op};

/// A path as a C string (paths from the OS never contain NUL; one that does is reported as invalid input).
pub fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int, op: Op, path: &Path) -> Result<(), JobError> {
    if rc == 0 { Ok(()) } else { Err(JobError::last_os(op, path)) }
}

/// How a whole file's destination was created by [`create_dst`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The named temporary (`tmp`): renamed onto the final name when complete, removed on failure.
    Named,
    /// An unnamed file (`O_TMPFILE`) in the final name's directory: linked to the final name when complete, gone
    /// by itself on failure or crash.
    Unnamed,
}

/// Create the destination of a whole-file copy, with `mode` (the [`crate::FinishSpec::create_mode`]), readable too
/// when `readable` (to read written blocks back).
///
/// When `vacant` (nothing was at `dst` when the tree was walked) it is an unnamed file in `dst`'s directory
/// (Linux `O_TMPFILE`), linked to `dst` by [`finish_file`] once complete: one directory operation per file instead
/// of two (create the temporary, rename it), which is what two threads filling the same directory wait on, and
/// nothing is left behind by a crash. Otherwise — or where the filesystem, the kernel or a missing `/proc` rule it
/// out — the named temporary `tmp`, created exclusively (`EEXIST` means the name is someone else's file: it is
/// reported, never removed).
pub fn create_dst(tmp: &Path, dst: &Path, vacant: bool, readable: bool, mode: u32) -> io::Result<(OwnedFd, Created)> {
    if vacant {
        let dir = parent_dir(dst);
        if let Some(fd) = cstr(dir).ok().and_then(|d| unnamed::create(libc::AT_FDCWD, &d, readable, mode)) {
            return Ok((fd, Created::Unnamed));
        }
    }
    let file = OpenOptions::new().write(true).read(readable).create_new(true).mode(mode).open(tmp)?;
    Ok((file.into(), Created::Named))
}

/// Remove what a failed whole-file copy created: the named temporary (an unnamed file needs nothing).
pub fn discard(created: Created, tmp: &Path) {
    if created == Created::Named {
        abandon(tmp);
    }
}

/// `FASTSYNC_TMPFILE=0` turns unnamed files off: every file is written under a named temporary.
pub const TMPFILE_ENV: &str = "FASTSYNC_TMPFILE";

/// An unnamed file (`O_TMPFILE`) in the directory `dir`, read-write, with `mode`, for [`place_unnamed_at`] to name once
/// it is complete; `None` where the filesystem, the kernel or a missing `/proc` rule that out (use a named temporary).
pub fn create_unnamed_at(dir: BorrowedFd<'_>, mode: u32) -> Option<OwnedFd> {
    unnamed::create(dir.as_raw_fd(), c".", true, mode)
}

/// Give the complete unnamed file `fd` the name `name` in `dir`, replacing whatever is there as a rename would:
/// linked straight to `name` when it is free, else linked to the unused temporary name `tmp` and renamed over
/// `name` (the temporary is removed again when that fails).
pub fn place_unnamed_at(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr, tmp: &CStr) -> io::Result<()> {
    place_unnamed(fd, dir.as_raw_fd(), name, tmp)
}

fn place_unnamed(fd: BorrowedFd<'_>, dir: RawFd, name: &CStr, tmp: &CStr) -> io::Result<()> {
    match unnamed::link(fd, dir, name) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            unnamed::link(fd, dir, tmp)?;
            // SAFETY: valid descriptor (or AT_FDCWD) and C strings.
            if unsafe { libc::renameat(dir, tmp.as_ptr(), dir, name.as_ptr()) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            // SAFETY: as above.
            unsafe { libc::unlinkat(dir, tmp.as_ptr(), 0) };
            Err(e)
        }
        linked => linked,
    }
}

#[cfg(target_os = "linux")]
mod unnamed {
    //! `O_TMPFILE` files and linking them into place: by descriptor (`AT_EMPTY_PATH`) where the process may, else
    //! through `/proc/self/fd`.

    use std::ffi::{CStr, CString};
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
    use std::path::Path;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set once a filesystem answered that it has no `O_TMPFILE`: later files take named temporaries at once.
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

    /// `/proc/self/fd` is there to link through, and `FASTSYNC_TMPFILE=0` did not turn unnamed files off.
    fn enabled() -> bool {
        static USABLE: OnceLock<bool> = OnceLock::new();
        *USABLE.get_or_init(|| {
            std::env::var_os(super::TMPFILE_ENV).is_none_or(|v| v != "0") && Path::new("/proc/self/fd").is_dir()
        })
    }

    /// `openat(dir, path, O_TMPFILE)`: an inode with no name in the directory `path` (relative to `dir`).
    pub(super) fn create(dir: RawFd, path: &CStr, readable: bool, mode: u32) -> Option<OwnedFd> {
        if UNSUPPORTED.load(Ordering::Relaxed) || !enabled() {
            return None;
        }
        let access = if readable { libc::O_RDWR } else { libc::O_WRONLY };
        // O_TMPFILE includes O_DIRECTORY: the directory is opened to create an inode in it, with no name.
        let flags = libc::O_TMPFILE | access | libc::O_CLOEXEC;
        // SAFETY: valid descriptor (or AT_FDCWD) and C string; the result is owned below.
        let fd = unsafe { libc::openat(dir, path.as_ptr(), flags, mode as libc::c_uint) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor, owned by nobody else.
            return Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        // No O_TMPFILE here (EOPNOTSUPP; EISDIR or EINVAL from kernels or filesystems that predate it). Anything
        // else (ENOSPC, EACCES, ...) the named temporary will meet and report too.
        if matches!(io::Error::last_os_error().raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)) {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
        None
    }

    /// Set once `linkat(AT_EMPTY_PATH)` was refused (it needs `CAP_DAC_READ_SEARCH`): links go through `/proc`.
    static NO_EMPTY_PATH: AtomicBool = AtomicBool::new(false);

    /// Give the unnamed file `fd` the name `to` (relative to `dir`); `EEXIST` when something is there. Linking a
    /// file with no name is allowed because it was not opened with `O_EXCL`.
    pub(super) fn link(fd: BorrowedFd<'_>, dir: RawFd, to: &CStr) -> io::Result<()> {
        if !NO_EMPTY_PATH.load(Ordering::Relaxed) {
            // The descriptor itself, where the caller may (root): no path through /proc to resolve.
            // SAFETY: valid descriptors and C strings.
            let rc = unsafe { libc::linkat(fd.as_raw_fd(), c"".as_ptr(), dir, to.as_ptr(), libc::AT_EMPTY_PATH) };
            if rc == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                return Err(e);
            }
            // ENOENT without the capability (or refused otherwise): the /proc link decides, and if it works, is
            // used from now on.
            link_through_proc(fd, dir, to)?;
            NO_EMPTY_PATH.store(true, Ordering::Relaxed);
            return Ok(());
        }
        link_through_proc(fd, dir, to)
    }

    fn link_through_proc(fd: BorrowedFd<'_>, dir: RawFd, to: &CStr) -> io::Result<()> {
        let from = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number");
        // SAFETY: valid C strings and descriptor. AT_SYMLINK_FOLLOW resolves the /proc link to the open file itself.
        let rc = unsafe { libc::linkat(libc::AT_FDCWD, from.as_ptr(), dir, to.as_ptr(), libc::AT_SYMLINK_FOLLOW) };
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }
}

#[cfg(not(target_os = "linux"))]
mod unnamed {
    //! No `O_TMPFILE` outside Linux: every destination is a named temporary.

    use std::ffi::CStr;
    use std::io;
    use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

    pub(super) fn create(_dir: RawFd, _path: &CStr, _readable: bool, _mode: u32) -> Option<OwnedFd> {
        None
    }

    pub(super) fn link(_fd: BorrowedFd<'_>, _dir: RawFd, _to: &CStr) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Put a complete destination under its final name: rename the named temporary onto it, or link the unnamed file
/// to it. Something that appeared at `dst` since the walk is replaced as a rename replaces it: the unnamed file is
/// linked to the named temporary `tmp` first, then renamed.
fn put_in_place(fd: BorrowedFd<'_>, created: Created, tmp: &Path, dst: &Path) -> Result<(), JobError> {
    let placed = match created {
        Created::Unnamed => cstr(dst).and_then(|d| cstr(tmp).and_then(|t| place_unnamed(fd, libc::AT_FDCWD, &d, &t))),
        Created::Named => std::fs::rename(tmp, dst),
    };
    placed.map_err(|e| JobError::new(Op::Rename, dst, e))
}

/// Finish a destination whose bytes are all written: check that the source `src` did not change meanwhile (when
/// the spec has a stamp), optional truncate (O_DIRECT tails), xattrs, owner, mode, times, fsync, rename `tmp` onto
/// `dst` (or link the unnamed file there, see [`Created`]), fsync the directory. Order matters: xattrs need write
/// permission, `chown` clears setuid bits so `chmod` comes after it, and times come last so nothing after them
/// touches the mtime.
pub fn finish_file(
    fd: BorrowedFd<'_>,
    truncate_to: Option<u64>,
    src: &Path,
    (tmp, created): (&Path, Created),
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
    set_xattrs(fd, &spec.xattrs).map_err(|e| JobError::new(Op::SetXattr, tmp, e))?;
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
    put_in_place(fd, created, tmp, dst)?;
    if spec.fsync {
        fsync_dir(dst).map_err(|e| JobError::new(Op::Fsync, dst.parent().unwrap_or(Path::new(".")), e))?;
    }
    Ok(())
}

/// The directory that holds `path` (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsync the directory that holds `path`, making a rename or create in it durable.
fn fsync_dir(path: &Path) -> io::Result<()> {
    let f = std::fs::File::open(parent_dir(path))?;
    f.sync_all()
}

/// Remove a temporary file after a failure. Errors are ignored: the file may never have been created.
pub fn abandon(tmp: &Path) {
    let _ = std::fs::remove_file(tmp);
}

/// Set extended attributes (name, value) on the open file `fd` (a no-op where the platform has none).
pub fn set_xattrs(fd: BorrowedFd<'_>, xattrs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    for (name, value) in xattrs {
        set_xattr(fd.as_raw_fd(), name, value)?;
    }
    Ok(())
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
