//! Syscall helpers of the server: every name is relative to an open directory and never followed when it is a symlink.

use super::*;

pub(super) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

pub(super) fn lstat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out-pointer.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

pub(super) fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out-pointer.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

pub(super) fn open_at(dir: RawFd, name: &CStr, flags: libc::c_int, mode: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: valid descriptor and C string; the result is owned below.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, mode) })?;
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

fn read_link_at(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; wire::PATH_BYTES_MAX + 1];
    // SAFETY: valid descriptor, C string, and a buffer of the given length.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n > wire::PATH_BYTES_MAX {
        return Err(io::Error::other(format!("symlink target longer than {} bytes", wire::PATH_BYTES_MAX)));
    }
    buf.truncate(n);
    Ok(buf)
}

pub(super) fn unlink_at(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid descriptor and C string.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub(super) fn rename_at(dir: RawFd, from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: valid descriptor and C strings.
    cvt(unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) }).map(drop)
}

/// `[atime untouched, mtime]`.
fn mtime_spec(mtime: (i64, u32)) -> [libc::timespec; 2] {
    [
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT as _ },
        libc::timespec { tv_sec: mtime.0 as _, tv_nsec: mtime.1 as _ },
    ]
}

pub(super) fn set_mtime_at(dir: RawFd, name: &CStr, mtime: (i64, u32)) -> io::Result<()> {
    let ts = mtime_spec(mtime);
    // SAFETY: valid descriptor, C string and timespec array.
    cvt(unsafe { libc::utimensat(dir, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

pub(super) fn set_mtime_fd(fd: RawFd, mtime: (i64, u32)) -> io::Result<()> {
    let ts = mtime_spec(mtime);
    // SAFETY: valid descriptor and timespec array.
    cvt(unsafe { libc::futimens(fd, ts.as_ptr()) }).map(drop)
}

pub(super) fn fsync_fd(fd: RawFd) -> io::Result<()> {
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fsync(fd) }).map(drop)
}

fn clear_errno() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    // SAFETY: errno is thread-local.
    unsafe {
        *libc::__errno_location() = 0
    };
    #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
    // SAFETY: errno is thread-local.
    unsafe {
        *libc::__error() = 0
    };
}

/// The names in directory `dir` (not `.` and `..`; nor our temporaries with `skip_temporaries`), sorted bytewise. The
/// directory is reopened (`openat(dir, ".")`) so that the read has its own offset, whoever else shares `dir`.
pub(super) fn read_names(dir: RawFd, skip_temporaries: bool) -> io::Result<Vec<CString>> {
    let fd = open_at(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // SAFETY: a descriptor we own; fdopendir takes it over on success.
    let d = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(fd); // now owned by `d`, closed by closedir below
    let mut names = Vec::new();
    let result = loop {
        clear_errno();
        // SAFETY: `d` is an open DIR stream used by this thread only.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().is_none_or(|n| n == 0) { Ok(()) } else { Err(e) };
        }
        // SAFETY: d_name is a NUL-terminated string inside the entry, valid until the next readdir.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b == b"." || b == b".." || (skip_temporaries && stale::is_temporary(OsStr::from_bytes(b))) {
            continue;
        }
        names.push(name.to_owned());
    };
    // SAFETY: `d` is open and not used after this.
    unsafe { libc::closedir(d) };
    result?;
    names.sort_unstable();
    Ok(names)
}

pub(super) fn kind_of(st: &libc::stat) -> EntryKind {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

// mode_t is u32 on Linux and u16 on macOS.
#[allow(clippy::unnecessary_cast)]
pub(super) fn entry(path: Vec<u8>, st: &libc::stat, target: Vec<u8>) -> EntryMeta {
    EntryMeta {
        path,
        kind: kind_of(st),
        mode: (st.st_mode as u32) & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime_sec: st.st_mtime as i64,
        mtime_nsec: (st.st_mtime_nsec as u32).min(999_999_999),
        target,
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
    }
}

/// The entry for `name` in `dir`, with its target when it is a symlink.
pub(super) fn entry_at(dir: RawFd, name: &CStr, path: Vec<u8>) -> io::Result<EntryMeta> {
    let st = lstat_at(dir, name)?;
    let target = if kind_of(&st) == EntryKind::Symlink { read_link_at(dir, name)? } else { Vec::new() };
    Ok(entry(path, &st, target))
}
