//! Directory tree requests: `Mkdir`, `SetMeta`, `Symlink`, `Link` and `Delete`.

use super::*;

pub(super) fn mkdir(shared: &Shared, rel: &[u8], mode: u32) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot create directory", rel, e))?;
    let Some(name) = &p.name else { return Ok(()) };
    // SAFETY: valid descriptor and C string.
    match cvt(unsafe { libc::mkdirat(p.raw(), name.as_ptr(), (mode & 0o7777) as libc::mode_t) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            if is_dir_at(p.raw(), name) {
                Ok(())
            } else {
                // As `mkdir -p` says it (the code stays IO: a non-directory is in the way).
                Err(Fail::new(code::IO, format!("cannot create directory '{}': Not a directory", show(rel))))
            }
        }
        Err(e) => Err(Fail::io("cannot create directory", rel, e)),
    }
}

/// Give `name` in `dir` to `owner`, never following a symlink. Not being allowed to give entries away (a server that
/// is not root) is expected: the owner stays the server's, as with `rsync` run by an ordinary user.
pub(super) fn chown_at(dir: RawFd, name: &CStr, owner: (u32, u32), rel: &[u8]) -> Result<(), Fail> {
    // SAFETY: valid descriptor and C string.
    owner_set(cvt(unsafe { libc::fchownat(dir, name.as_ptr(), owner.0, owner.1, libc::AT_SYMLINK_NOFOLLOW) }), rel)
}

/// As [`chown_at`], for the open file or directory `fd` itself.
pub(super) fn chown_fd(fd: RawFd, owner: (u32, u32), rel: &[u8]) -> Result<(), Fail> {
    // SAFETY: valid descriptor.
    owner_set(cvt(unsafe { libc::fchown(fd, owner.0, owner.1) }), rel)
}

/// A chown's result: refused for want of privilege (EPERM) is not an error.
fn owner_set(r: io::Result<libc::c_int>, rel: &[u8]) -> Result<(), Fail> {
    match r {
        Err(e) if e.raw_os_error() != Some(libc::EPERM) => Err(Fail::io("cannot set owner of", rel, e)),
        _ => Ok(()),
    }
}

pub(super) fn set_meta(
    shared: &Shared,
    rel: &[u8],
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, u32),
) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot set metadata of", rel, e))?;
    let mode = (mode & 0o7777) as libc::mode_t;
    let Some(name) = &p.name else {
        // The root itself.
        let st = fstat(p.raw()).map_err(|e| Fail::io("cannot set metadata of", rel, e))?;
        let (chown, chmod, touch) = differs(&st, mode, owner, mtime);
        if chown {
            chown_fd(p.raw(), owner, rel)?;
        }
        if chmod {
            // SAFETY: valid descriptor.
            cvt(unsafe { libc::fchmod(p.raw(), mode) }).map_err(|e| Fail::io("cannot set permissions on", rel, e))?;
        }
        if touch {
            set_mtime_fd(p.raw(), mtime).map_err(|e| Fail::io("cannot set times on", rel, e))?;
        }
        return Ok(());
    };
    let st = lstat_at(p.raw(), name).map_err(|e| Fail::io("cannot set metadata of", rel, e))?;
    let (chown, chmod, touch) = differs(&st, mode, owner, mtime);
    if chown {
        chown_at(p.raw(), name, owner, rel)?;
    }
    if chmod && kind_of(&st) != EntryKind::Symlink {
        // SAFETY: valid descriptor and C string. AT_SYMLINK_NOFOLLOW: should a symlink have been swapped in since the
        // stat, the call fails instead of changing what it points to.
        cvt(unsafe { libc::fchmodat(p.raw(), name.as_ptr(), mode, libc::AT_SYMLINK_NOFOLLOW) })
            .map_err(|e| Fail::io("cannot set permissions on", rel, e))?;
    }
    if touch {
        set_mtime_at(p.raw(), name, mtime).map_err(|e| Fail::io("cannot set times on", rel, e))?;
    }
    Ok(())
}

/// Which of owner, permission bits and mtime to set on what `st` describes: each only where it differs, so that what
/// is already right (a directory of a no-op sync) keeps even its ctime; the mode also after a chown, which clears
/// set-id bits.
fn differs(st: &libc::stat, mode: libc::mode_t, owner: (u32, u32), mtime: (i64, u32)) -> (bool, bool, bool) {
    let chown = (st.st_uid, st.st_gid) != owner;
    (chown, chown || st.st_mode & 0o7777 != mode, mtime_of_stat(st) != mtime)
}

/// A stat's mtime as the wire carries it.
#[allow(clippy::unnecessary_cast)] // time_t is not i64 on every target
fn mtime_of_stat(st: &libc::stat) -> (i64, u32) {
    (st.st_mtime as i64, st.st_mtime_nsec as u32)
}

pub(super) fn symlink(
    shared: &Shared,
    rel: &[u8],
    target: &[u8],
    owner: (u32, u32),
    mtime: (i64, u32),
) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot create symlink", rel, e))?;
    let Some(name) = &p.name else {
        return Err(Fail::new(code::IO, "cannot replace the served root with a symlink"));
    };
    let target = CString::new(target)
        .map_err(|_| Fail::new(code::PROTOCOL, format!("symlink '{}': target contains a NUL byte", show(rel))))?;
    let (tmp, ()) = create_temporary(shared, p.raw(), name, |dir, tmp| {
        // SAFETY: valid descriptor and C strings.
        cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, tmp.as_ptr()) }).map(drop)
    })
    .map_err(|e| Fail::io("cannot create symlink", rel, e))?;
    let placed = chown_at(p.raw(), &tmp, owner, rel)
        .and_then(|()| set_mtime_at(p.raw(), &tmp, mtime).map_err(|e| Fail::io("cannot set times on", rel, e)))
        .and_then(|()| rename_into_place(p.raw(), &tmp, name, rel));
    if placed.is_err() {
        let _ = unlink_at(p.raw(), &tmp, 0);
    }
    placed
}

/// `Link`: `rel` becomes another name of the regular file `target` (both beneath the root), through a temporary
/// name renamed over whatever `rel` was.
pub(super) fn link(shared: &Shared, rel: &[u8], target: &[u8]) -> Result<(), Fail> {
    let t = shared.root.parent(target).map_err(|e| Fail::io("cannot link to", target, e))?;
    let Some(t_name) = &t.name else {
        return Err(Fail::new(code::IO, "cannot link to the served root"));
    };
    let st = lstat_at(t.raw(), t_name).map_err(|e| Fail::io("cannot link to", target, e))?;
    if kind_of(&st) != EntryKind::File {
        return Err(Fail::new(code::IO, format!("cannot link to '{}': not a regular file", show(target))));
    }
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot create link", rel, e))?;
    let Some(name) = &p.name else {
        return Err(Fail::new(code::IO, "cannot replace the served root with a link"));
    };
    if is_dir_at(p.raw(), name) {
        return Err(Fail::new(code::IO, format!("cannot create link '{}': a directory is in the way", show(rel))));
    }
    let (tmp, ()) = create_temporary(shared, p.raw(), name, |dir, tmp| {
        // SAFETY: valid descriptors and C strings; flags 0: a symlink is never followed.
        cvt(unsafe { libc::linkat(t.raw(), t_name.as_ptr(), dir, tmp.as_ptr(), 0) }).map(drop)
    })
    .map_err(|e| Fail::io("cannot create link", rel, e))?;
    let placed = rename_into_place(p.raw(), &tmp, name, rel);
    if placed.is_err() {
        let _ = unlink_at(p.raw(), &tmp, 0);
    }
    placed
}

pub(super) fn delete(shared: &Shared, rel: &[u8]) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot delete", rel, e))?;
    let Some(name) = &p.name else {
        return Err(Fail::new(code::PERMISSION, "refusing to delete the served root"));
    };
    let st = lstat_at(p.raw(), name).map_err(|e| Fail::io("cannot delete", rel, e))?;
    if kind_of(&st) == EntryKind::Dir {
        remove_tree(p.raw(), name).map_err(|e| Fail::io("cannot delete", rel, e))
    } else {
        unlink_at(p.raw(), name, 0).map_err(|e| Fail::io("cannot delete", rel, e))
    }
}
