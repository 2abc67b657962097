//! Opening paths strictly beneath a root directory, whatever the path or the symlinks in the tree say.
//!
//! Used by the server for every path a client names, and by the client for every path a server lists: `..`,
//! absolute paths and empty components are refused up front ([`super::wire::safe_components`]); the directories
//! on the way are opened one component at a time with `O_NOFOLLOW | O_DIRECTORY` relative to the previous one (or in
//! one `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` call where the kernel has it), so a symlink anywhere on the
//! way, even one planted after the check, fails the open instead of leading outside. The final component is then
//! used with the `*at` syscalls and `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`, never through a path.
//!
//! A pull with `-L` asks the server to follow symlinks instead ([`Root::follow`]): the whole path is resolved by the
//! kernel in one `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` call from the root, which follows symlinks but
//! fails (`EXDEV`) as soon as a step, an absolute target or a `..` in one, would leave the root. Where `openat2` is
//! missing (another OS, or a Linux before 5.6), following is refused: there is no safe way to do it by hand.

use std::ffi::CString;
#[cfg(all(test, target_os = "linux"))]
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::wire::safe_components;

/// An open root directory.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
}

/// The parent directory of a path beneath the root, open, and the path's final component.
#[derive(Debug)]
pub struct Parent {
    pub dir: OwnedFd,
    /// Final component (never empty, never `.` or `..`); `None` for the root itself.
    pub name: Option<CString>,
}

impl Parent {
    pub fn raw(&self) -> RawFd {
        self.dir.as_raw_fd()
    }
}

fn open_dir_at(dir: RawFd, name: &CString) -> io::Result<OwnedFd> {
    // SAFETY: valid descriptor and C string; the result is owned below.
    let fd = unsafe {
        libc::openat(dir, name.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // O_NOFOLLOW on a symlink: ELOOP, or ENOTDIR with O_DIRECTORY (Linux); say what it means here.
        let symlink = match e.raw_os_error() {
            Some(libc::ELOOP) => true,
            Some(libc::ENOTDIR) => is_symlink_at(dir, name),
            _ => false,
        };
        if symlink {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, SYMLINK_ON_THE_WAY));
        }
        return Err(e);
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn is_symlink_at(dir: RawFd, name: &CString) -> bool {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out-pointer.
    let r = unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

fn cname(c: &[u8]) -> io::Result<CString> {
    CString::new(c).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

impl Root {
    pub fn open(path: &Path) -> io::Result<Root> {
        let c = cname(path.as_os_str().as_bytes())?;
        // SAFETY: valid C string; the result is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        Ok(Root { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Open the directory `rel` (a wire path; `""` is the root) beneath the root, following no symlink: in one
    /// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` where the kernel has it, else one component at a time.
    pub fn dir(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        let parts = safe_components(rel).map_err(|m| io::Error::new(io::ErrorKind::PermissionDenied, m))?;
        if !parts.is_empty()
            && let Some(r) = openat2_dir(self.raw(), rel)
        {
            return r;
        }
        self.dir_walk(&parts)
    }

    /// [`Root::dir`] one component at a time, each opened with `O_NOFOLLOW | O_DIRECTORY` relative to the last.
    fn dir_walk(&self, parts: &[&[u8]]) -> io::Result<OwnedFd> {
        // SAFETY: duplicating our own descriptor.
        let dup = unsafe { libc::fcntl(self.raw(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor, owned by nobody else.
        let mut cur = unsafe { OwnedFd::from_raw_fd(dup) };
        for &part in parts {
            cur = open_dir_at(cur.as_raw_fd(), &cname(part)?)?;
        }
        Ok(cur)
    }

    /// Open `rel` beneath the root, following symlinks wherever they lead inside it (`-L` on a pull): `flags` are
    /// the `open` flags (`O_PATH` to look only). A symlink that leads outside the root, or through an absolute
    /// target, fails with [`ESCAPES`] (`PermissionDenied`); a dangling one with `NotFound`; a loop with `ELOOP`.
    /// Without `openat2`, every call fails with `Unsupported`.
    pub fn follow(&self, rel: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
        safe_components(rel).map_err(|m| io::Error::new(io::ErrorKind::PermissionDenied, m))?;
        let path = cname(if rel.is_empty() { b"." } else { rel })?;
        openat2_beneath(self.raw(), &path, flags)
    }

    /// The open parent directory of `rel` and its final component (for `*at` calls), following no symlink on the
    /// way. `rel == ""` gives the root itself with no name.
    pub fn parent(&self, rel: &[u8]) -> io::Result<Parent> {
        let parts = safe_components(rel).map_err(|m| io::Error::new(io::ErrorKind::PermissionDenied, m))?;
        let Some((last, dirs)) = parts.split_last() else {
            return Ok(Parent { dir: self.dir(b"")?, name: None });
        };
        let mut dir_path = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            if i > 0 {
                dir_path.push(b'/');
            }
            dir_path.extend_from_slice(d);
        }
        Ok(Parent { dir: self.dir(&dir_path)?, name: Some(cname(last)?) })
    }
}

/// The `open` flag for a descriptor that only names an inode (`O_PATH`); where there is none, plain `O_RDONLY` (and
/// [`Root::follow`], the only user, is refused there anyway).
#[cfg(target_os = "linux")]
pub const O_PATH: libc::c_int = libc::O_PATH;
#[cfg(not(target_os = "linux"))]
pub const O_PATH: libc::c_int = libc::O_RDONLY;

/// What a symlink on the way of a path that must not follow any is reported as.
const SYMLINK_ON_THE_WAY: &str = "a symlink on the way is not followed";

/// Set once `openat2` turned out to be missing (an old kernel, or a seccomp profile that refuses it): the walk is
/// used from then on.
#[cfg(target_os = "linux")]
static NO_OPENAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The directory `rel` (checked by `safe_components`, not empty) opened by the kernel in one call, refusing any
/// symlink on the way; `None` where `openat2` is unavailable (the caller walks instead).
#[cfg(target_os = "linux")]
fn openat2_dir(root: RawFd, rel: &[u8]) -> Option<io::Result<OwnedFd>> {
    use std::sync::atomic::Ordering;
    if NO_OPENAT2.load(Ordering::Relaxed) {
        return None;
    }
    let path = match cname(rel) {
        Ok(p) => p,
        Err(e) => return Some(Err(e)),
    };
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    let e = match openat2(root, &path, flags, resolve) {
        Ok(fd) => return Some(Ok(fd)),
        Err(e) => e,
    };
    Some(Err(match e.raw_os_error() {
        // RESOLVE_NO_SYMLINKS: a symlink anywhere on the way, the last component included.
        Some(libc::ELOOP) => io::Error::new(io::ErrorKind::PermissionDenied, SYMLINK_ON_THE_WAY),
        Some(libc::EXDEV) => io::Error::new(io::ErrorKind::PermissionDenied, ESCAPES),
        // Something on the way is not a directory: the walk says which (a symlink, with O_DIRECTORY, is one).
        Some(libc::ENOTDIR) => return None,
        // No openat2 here (ENOSYS; EPERM from some seccomp profiles), or not these flags (E2BIG, EINVAL).
        Some(libc::ENOSYS | libc::EPERM | libc::E2BIG | libc::EINVAL) => {
            NO_OPENAT2.store(true, Ordering::Relaxed);
            return None;
        }
        _ => e,
    }))
}

#[cfg(not(target_os = "linux"))]
fn openat2_dir(_root: RawFd, _rel: &[u8]) -> Option<io::Result<OwnedFd>> {
    None
}

/// What a followed symlink that would leave the root is reported as.
pub const ESCAPES: &str = "the symlink leads outside the served root (not followed)";

#[cfg(target_os = "linux")]
fn openat2_beneath(dir: RawFd, path: &CString, flags: libc::c_int) -> io::Result<OwnedFd> {
    // openat2 refuses O_PATH with flags other than O_CLOEXEC, O_DIRECTORY and O_NOFOLLOW.
    let noctty = if flags & libc::O_PATH == 0 { libc::O_NOCTTY } else { 0 };
    openat2(dir, path, flags | libc::O_CLOEXEC | noctty, libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS).map_err(
        |e| match e.raw_os_error() {
            Some(libc::EXDEV) => io::Error::new(io::ErrorKind::PermissionDenied, ESCAPES),
            Some(libc::ENOSYS) => unsupported(),
            _ => e,
        },
    )
}

#[cfg(not(target_os = "linux"))]
fn openat2_beneath(_dir: RawFd, _path: &CString, _flags: libc::c_int) -> io::Result<OwnedFd> {
    Err(unsupported())
}

/// `openat2(dir, path, {flags, resolve})`, the kernel's errors as they are. A rename elsewhere in the tree during the
/// resolution makes it answer EAGAIN: that is tried again a few times.
#[cfg(target_os = "linux")]
fn openat2(dir: RawFd, path: &std::ffi::CStr, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    // SAFETY: an all-zero open_how is valid; the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    for _ in 0..16 {
        // SAFETY: valid descriptor, C string and open_how of the size passed; the result is owned below.
        let fd = unsafe {
            libc::syscall(libc::SYS_openat2, dir, path.as_ptr(), &how as *const libc::open_how, size_of_val(&how))
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
    Err(io::Error::new(io::ErrorKind::Interrupted, "the tree kept changing while the path was resolved"))
}

fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "this server cannot follow symlinks safely (it needs openat2, Linux 5.6 or later); copy without -L",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_and_dot_dot_never_lead_out() {
        let base = std::env::temp_dir().join(format!("fs-beneath-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::os::unix::fs::symlink(base.join("outside"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink("a", root.join("inner_link")).unwrap();
        std::fs::write(root.join("a/file"), b"").unwrap();
        let r = Root::open(&root).unwrap();
        assert!(r.dir(b"a/b").is_ok());
        let p = r.parent(b"a/b/new").unwrap();
        assert_eq!(p.name.unwrap().as_bytes(), b"new");
        for bad in [&b"escape"[..], b"escape/x", b"inner_link/b", b"../outside", b"/etc", b"a/../../outside"] {
            assert!(r.dir(bad).is_err(), "{} opened", String::from_utf8_lossy(bad));
        }
        // The kernel's resolution (openat2) and the walk agree on every answer, and on the words of each refusal.
        let walk = |rel: &[u8]| r.dir_walk(&safe_components(rel).unwrap());
        for rel in [&b"a"[..], b"a/b", b"escape", b"escape/x", b"inner_link", b"inner_link/b", b"a/file", b"a/nope/c"] {
            let (one, other) = (r.dir(rel), walk(rel));
            let shown = String::from_utf8_lossy(rel);
            match (one, other) {
                (Ok(_), Ok(_)) => {}
                (Err(a), Err(b)) => {
                    assert_eq!((a.kind(), a.to_string()), (b.kind(), b.to_string()), "{shown}");
                    if ["escape", "escape/x", "inner_link", "inner_link/b"].contains(&&*shown) {
                        assert_eq!(a.to_string(), SYMLINK_ON_THE_WAY, "{shown}");
                    }
                }
                (a, b) => panic!("{shown}: dir {:?}, walk {:?}", a.map(|_| ()), b.map(|_| ())),
            }
        }
        assert!(r.parent(b"escape/file").is_err());
        // The final component itself is not resolved by `parent`: callers use *at calls with NOFOLLOW on it.
        assert_eq!(r.parent(b"escape").unwrap().name.unwrap().as_bytes(), b"escape");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn following_stays_beneath_the_root() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), b"inside").unwrap();
        std::fs::write(base.path().join("secret"), b"outside").unwrap();
        let ln = |target: &str, link: &str| std::os::unix::fs::symlink(target, root.join(link)).unwrap();
        ln("a/b/f", "to_f");
        ln("../f", "a/b/up_is_outside_b"); // a/f: missing, but beneath the root
        ln("b/f", "a/down");
        ln("../../secret", "a/up2");
        ln(base.path().join("secret").to_str().unwrap(), "abs");
        ln("/", "slash");
        ln("a", "dir_link");
        ln("loop2", "loop1");
        ln("loop1", "loop2");
        let r = Root::open(&root).unwrap();
        let read = |rel: &[u8]| -> io::Result<Vec<u8>> {
            let fd = r.follow(rel, libc::O_RDONLY)?;
            let mut s = Vec::new();
            std::io::Read::read_to_end(&mut File::from(fd), &mut s)?;
            Ok(s)
        };
        for ok in [&b"to_f"[..], b"a/down", b"dir_link/b/f", b"dir_link/down"] {
            assert_eq!(read(ok).unwrap(), b"inside", "{}", String::from_utf8_lossy(ok));
        }
        for escape in [&b"a/up2"[..], b"abs", b"slash"] {
            let e = read(escape).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{}: {e}", String::from_utf8_lossy(escape));
            assert_eq!(e.to_string(), ESCAPES);
        }
        assert_eq!(read(b"a/b/up_is_outside_b").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(read(b"loop1").unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert!(r.follow(b"../x", libc::O_PATH).is_err());
        assert!(r.follow(b"", libc::O_PATH | libc::O_DIRECTORY).is_ok());
    }
}
