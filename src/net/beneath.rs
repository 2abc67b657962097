//! Opening paths strictly beneath a root directory, whatever the path or the symlinks in the tree say.
//!
//! Used by the server for every path a client names, and by the client for every path a server lists: `..`,
//! absolute paths and empty components are refused up front ([`super::wire::safe_components`]); the directories
//! on the way are opened one component at a time with `O_NOFOLLOW | O_DIRECTORY` relative to the previous one (or in
//! one `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` call where the kernel has it), so a symlink anywhere on the
//! way, even one planted after the check, fails the open instead of leading outside. The final component is then
//! used with the `*at` syscalls and `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`, never through a path.

use std::ffi::CString;
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
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "a symlink on the way is not followed"));
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

    /// Open the directory `rel` (a wire path; `""` is the root) beneath the root, following no symlink.
    pub fn dir(&self, rel: &[u8]) -> io::Result<OwnedFd> {
        let parts = safe_components(rel).map_err(|m| io::Error::new(io::ErrorKind::PermissionDenied, m))?;
        // SAFETY: duplicating our own descriptor.
        let dup = unsafe { libc::fcntl(self.raw(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor, owned by nobody else.
        let mut cur = unsafe { OwnedFd::from_raw_fd(dup) };
        for part in parts {
            cur = open_dir_at(cur.as_raw_fd(), &cname(part)?)?;
        }
        Ok(cur)
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
        let r = Root::open(&root).unwrap();
        assert!(r.dir(b"a/b").is_ok());
        let p = r.parent(b"a/b/new").unwrap();
        assert_eq!(p.name.unwrap().as_bytes(), b"new");
        for bad in [&b"escape"[..], b"escape/x", b"inner_link/b", b"../outside", b"/etc", b"a/../../outside"] {
            assert!(r.dir(bad).is_err(), "{} opened", String::from_utf8_lossy(bad));
        }
        assert!(r.parent(b"escape/file").is_err());
        // The final component itself is not resolved by `parent`: callers use *at calls with NOFOLLOW on it.
        assert_eq!(r.parent(b"escape").unwrap().name.unwrap().as_bytes(), b"escape");
        std::fs::remove_dir_all(&base).unwrap();
    }
}
