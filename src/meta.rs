//! Metadata of source entries and how it is applied to directories and symlinks (files are finished by the engine).

use std::ffi::CString;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use fastsync_engine::{FinishSpec, Show, Timestamp};

/// What the user asked to preserve beyond the defaults (mode, owner where permitted, times).
#[derive(Clone, Copy, Debug, Default)]
pub struct Preserve {
    pub xattrs: bool,
}

/// What kind of special file `md` is (a device, a FIFO or a socket), or `None` for a regular file, a directory or a
/// symlink. A copy never renames a file over a special one: `copy big.iso /dev/null` would otherwise replace the
/// device node with a regular file (cp writes into it instead; fastsync refuses, see [`refuse_special_target`]).
pub fn special_kind(md: &Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = md.file_type();
    if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else {
        None
    }
}

/// The message refusing to replace `target` (its `lstat` is `md`) with the copy of the file `shown`, if it is a
/// special file.
pub fn refuse_special_target(target: &Path, md: &Metadata, shown: &str) -> Option<String> {
    special_kind(md).map(|kind| {
        format!(
            "refusing to replace '{}', {kind}, with '{shown}': fastsync writes a file under a temporary name and \
             renames it into place, which would replace the special file itself; name a regular file or a directory",
            target.shown()
        )
    })
}

pub(crate) fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// `mkdir -p`: `dir` and its missing parents. Where a file is in the way, the error says "Not a directory" (as cp's
/// does), not the "File exists" that `mkdir` returns for it.
pub fn make_dirs(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists { io::Error::from_raw_os_error(libc::ENOTDIR) } else { e }
    })
}

/// Access and modification times of `md`, with nanoseconds.
pub fn times(md: &Metadata) -> [Timestamp; 2] {
    [Timestamp { sec: md.atime(), nsec: md.atime_nsec() }, Timestamp { sec: md.mtime(), nsec: md.mtime_nsec() }]
}

/// Who we are and what our umask takes away, read once: they decide which `chown`/`chmod` calls are no-ops.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub euid: u32,
    pub egid: u32,
    pub umask: u32,
}

impl Identity {
    /// Read the identity. Call it before starting threads: reading the umask means setting it and back.
    pub fn current() -> Identity {
        // SAFETY: no preconditions; the umask is restored at once.
        let umask = unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            m as u32
        };
        // SAFETY: no preconditions.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Identity { euid, egid, umask }
    }
}

/// The finish spec for a copy of an entry with metadata `md` (xattrs read from `src` when asked). The file is created
/// with its final permission bits when the umask lets them through, and `chown` is skipped when the new file is
/// already ours with the right group (`setgid_dir`: the destination directory hands its own group to new files).
pub fn finish_spec(
    src: &Path,
    md: &Metadata,
    preserve: Preserve,
    id: &Identity,
    setgid_dir: bool,
    fsync: bool,
    verify: bool,
) -> io::Result<FinishSpec> {
    let mode = md.mode() & 0o7777;
    let create_mode = mode & 0o777;
    let owner = (md.uid(), md.gid());
    Ok(FinishSpec {
        create_mode,
        mode: (create_mode & !id.umask != mode).then_some(mode),
        owner: (owner != (id.euid, id.egid) || setgid_dir).then_some(owner),
        times: Some(times(md)),
        xattrs: if preserve.xattrs { read_xattrs(src)? } else { Vec::new() },
        fsync,
        verify,
        source_stamp: None,
    })
}

/// All extended attributes of `path` (not following symlinks). An unsupporting filesystem yields none.
#[cfg(target_os = "linux")]
pub fn read_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    xattrs_of(path, false)
}

/// As [`read_xattrs`], following a final symlink (the server reads those of what a `/proc/self/fd/N` link leads to).
#[cfg(target_os = "linux")]
pub fn read_xattrs_following(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    xattrs_of(path, true)
}

#[cfg(target_os = "linux")]
fn xattrs_of(path: &Path, follow: bool) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    type List = unsafe extern "C" fn(*const libc::c_char, *mut libc::c_char, libc::size_t) -> libc::ssize_t;
    type Get = unsafe extern "C" fn(
        *const libc::c_char,
        *const libc::c_char,
        *mut libc::c_void,
        libc::size_t,
    ) -> libc::ssize_t;
    let (list, get): (List, Get) =
        if follow { (libc::listxattr, libc::getxattr) } else { (libc::llistxattr, libc::lgetxattr) };
    let p = c_path(path)?;
    let mut names = vec![0u8; 1024];
    let len = loop {
        // SAFETY: the buffer is valid for `names.len()` bytes.
        let n = unsafe { list(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names[..len].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split on NUL");
        let mut value = vec![0u8; 256];
        loop {
            // SAFETY: the buffer is valid for `value.len()` bytes.
            let n = unsafe { get(p.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
            if n >= 0 {
                value.truncate(n as usize);
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => value.resize(value.len() * 4, 0),
                // Removed between list and get.
                Some(libc::ENODATA) => {
                    value.clear();
                    break;
                }
                _ => return Err(e),
            }
        }
        out.push((name.to_vec(), value));
    }
    Ok(out)
}

#[cfg(not(target_os = "linux"))]
pub fn read_xattrs(_path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    Ok(Vec::new())
}

#[cfg(not(target_os = "linux"))]
pub fn read_xattrs_following(_path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    Ok(Vec::new())
}

/// Set extended attributes on `path` (not following symlinks).
#[cfg(target_os = "linux")]
pub fn write_xattrs(path: &Path, xattrs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    let p = c_path(path)?;
    for (name, value) in xattrs {
        let cname = CString::new(name.as_slice()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: valid C strings and slice.
        let rc = unsafe { libc::lsetxattr(p.as_ptr(), cname.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
pub fn write_xattrs(_path: &Path, _xattrs: &[(Vec<u8>, Vec<u8>)]) -> io::Result<()> {
    Ok(())
}

/// Which step of applying metadata failed.
#[derive(Debug)]
pub struct MetaError {
    pub what: &'static str,
    pub source: io::Error,
}

/// Apply a finish spec to a directory or symlink by path (never following a final symlink).
pub fn apply_by_path(path: &Path, spec: &FinishSpec, is_symlink: bool) -> Result<(), MetaError> {
    let p = c_path(path).map_err(|source| MetaError { what: "invalid path", source })?;
    if !spec.xattrs.is_empty() {
        write_xattrs(path, &spec.xattrs)
            .map_err(|source| MetaError { what: "cannot set extended attributes on", source })?;
    }
    if let Some((uid, gid)) = spec.owner {
        // SAFETY: valid C string.
        if unsafe { libc::lchown(p.as_ptr(), uid, gid) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EPERM) {
                return Err(MetaError { what: "cannot set owner of", source: e });
            }
        }
    }
    if let (Some(mode), false) = (spec.mode, is_symlink) {
        // SAFETY: valid C string.
        if unsafe { libc::chmod(p.as_ptr(), (mode & 0o7777) as libc::mode_t) } != 0 {
            return Err(MetaError { what: "cannot set permissions on", source: io::Error::last_os_error() });
        }
    }
    if let Some([a, m]) = spec.times {
        let ts = [
            libc::timespec { tv_sec: a.sec as _, tv_nsec: a.nsec as _ },
            libc::timespec { tv_sec: m.sec as _, tv_nsec: m.nsec as _ },
        ];
        // SAFETY: valid C string and timespec array.
        if unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            return Err(MetaError { what: "cannot set times on", source: io::Error::last_os_error() });
        }
    }
    Ok(())
}

/// The parts of a destination entry's `lstat` that `sync` compares, read relative to an open directory (no path
/// walk per entry: on a no-op sync of a deep tree, path lookups were a third of the CPU).
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ino: u64,
    pub dev: u64,
}

// mode_t is u32 on Linux and u16 on macOS: the casts are needed somewhere.
#[allow(clippy::unnecessary_cast)]
const S_IFMT: u32 = libc::S_IFMT as u32;
#[allow(clippy::unnecessary_cast)]
const S_IFDIR: u32 = libc::S_IFDIR as u32;
#[allow(clippy::unnecessary_cast)]
const S_IFREG: u32 = libc::S_IFREG as u32;
#[allow(clippy::unnecessary_cast)]
const S_IFLNK: u32 = libc::S_IFLNK as u32;

impl Stat {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }

    /// `lstat` of `name` inside the directory open as `dir`.
    pub fn at(dir: std::os::fd::RawFd, name: &std::ffi::OsStr) -> io::Result<Stat> {
        // A name fits in NAME_MAX (255) bytes: made a C string on the stack, as this runs for every entry of a walk.
        let mut buf = [0u8; 256];
        let bytes = name.as_bytes();
        let heap;
        let c: &std::ffi::CStr = match buf.get_mut(..bytes.len()) {
            Some(head) if bytes.len() < 256 && !bytes.contains(&0) => {
                head.copy_from_slice(bytes);
                std::ffi::CStr::from_bytes_until_nul(&buf).expect("a NUL follows the name")
            }
            _ => {
                heap = CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                &heap
            }
        };
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid directory descriptor (owned by the caller), C string and out-pointer.
        if unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Stat {
            mode: st.st_mode as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime: (st.st_mtime as i64, st.st_mtime_nsec as i64),
            ino: st.st_ino as u64,
            dev: st.st_dev as u64,
        })
    }
}

impl From<&Metadata> for Stat {
    fn from(md: &Metadata) -> Stat {
        Stat {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ino: md.ino(),
            dev: md.dev(),
        }
    }
}

/// Whether a file has holes: fewer blocks allocated than its size needs.
pub fn looks_sparse(md: &Metadata) -> bool {
    md.blocks().saturating_mul(512) < md.size().saturating_sub(4096)
}

/// Whether the filesystem that will hold `path` (or its nearest existing ancestor) completes buffered writes without
/// blocking, so io_uring can run them inline instead of handing each to a kernel worker thread. Known for XFS and
/// btrfs; ext4 (checked on Linux 6.18 with the `io_uring_queue_async_work` tracepoint: one punt per WRITE) and
/// anything unknown are treated as blocking.
#[cfg(target_os = "linux")]
pub fn buffered_writes_nonblocking(path: &Path) -> bool {
    const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
    const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
    let mut p = Some(path);
    while let Some(cur) = p {
        if let Ok(c) = c_path(if cur.as_os_str().is_empty() { Path::new(".") } else { cur }) {
            // SAFETY: zeroed statfs is a valid out-parameter; the path is a valid C string.
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
                return matches!(st.f_type as i64, XFS_SUPER_MAGIC | BTRFS_SUPER_MAGIC);
            }
        }
        p = cur.parent();
    }
    false
}

#[cfg(not(target_os = "linux"))]
pub fn buffered_writes_nonblocking(_path: &Path) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::fd::AsRawFd;

    #[test]
    fn stat_at_takes_names_up_to_name_max_and_refuses_a_nul() {
        let t = tempfile::tempdir().unwrap();
        let dir = fs::File::open(t.path()).unwrap();
        for len in [1, 100, 255] {
            let name = "n".repeat(len);
            fs::write(t.path().join(&name), vec![7u8; len]).unwrap();
            let st = Stat::at(dir.as_raw_fd(), std::ffi::OsStr::new(&name)).unwrap();
            assert_eq!(st.size, len as u64, "{len}-byte name");
        }
        let missing = Stat::at(dir.as_raw_fd(), std::ffi::OsStr::new("absent")).unwrap_err();
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let nul = Stat::at(dir.as_raw_fd(), std::ffi::OsStr::new("a\0b")).unwrap_err();
        assert_eq!(nul.kind(), io::ErrorKind::InvalidInput);
        // Longer than any name: the kernel's answer, not a panic.
        let long = Stat::at(dir.as_raw_fd(), std::ffi::OsStr::new(&"n".repeat(300))).unwrap_err();
        assert_eq!(long.raw_os_error(), Some(libc::ENAMETOOLONG));
    }
}
