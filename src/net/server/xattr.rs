//! Extended attributes (`-X`): read and written by path through the parent's descriptor, never following a final symlink.

use super::*;

/// `/proc/self/fd/DIR/NAME` for `name` in the directory open as `dir` (`DIR/.`, the directory itself, when `name`
/// is `None`: the l*xattr calls would act on the `/proc` link itself).
fn at_path(dir: RawFd, name: Option<&CStr>) -> PathBuf {
    let d = PathBuf::from(format!("/proc/self/fd/{dir}"));
    d.join(name.map_or(OsStr::new("."), |n| OsStr::from_bytes(n.to_bytes())))
}

pub(super) fn get_xattrs(shared: &Shared, rel: &[u8], follow: bool) -> Result<wire::Xattrs, Fail> {
    let what = "cannot read extended attributes of";
    let xattrs = if follow {
        // The O_PATH descriptor's magic link leads to the very inode resolved beneath the root.
        let fd = shared.root.follow(rel, O_PATH).map_err(|e| Fail::io(what, rel, e))?;
        crate::meta::read_xattrs_following(&PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())))
    } else {
        let p = shared.root.parent(rel).map_err(|e| Fail::io(what, rel, e))?;
        crate::meta::read_xattrs(&at_path(p.raw(), p.name.as_deref()))
    }
    .map_err(|e| Fail::io(what, rel, e))?;
    let total: usize = xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
    if xattrs.len() > wire::XATTRS_MAX || total > wire::XATTRS_BYTES_MAX {
        let why = format!("'{}' has more extended attributes than the protocol carries", show(rel));
        return Err(Fail::new(code::IO, why));
    }
    Ok(xattrs)
}

pub(super) fn put_xattrs(shared: &Shared, id: u64, xattrs: &wire::Xattrs) -> Result<(), Fail> {
    let lease = shared.transfers.lease(id)?;
    let t = &lease.t;
    fastsync_engine::finish::set_xattrs(t.file.as_fd(), xattrs)
        .map_err(|e| Fail::io("cannot set extended attributes on", &t.rel, e))
}

pub(super) fn set_xattrs(shared: &Shared, rel: &[u8], xattrs: &wire::Xattrs) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot set extended attributes on", rel, e))?;
    crate::meta::write_xattrs(&at_path(p.raw(), p.name.as_deref()), xattrs)
        .map_err(|e| Fail::io("cannot set extended attributes on", rel, e))
}

/// Metadata of a finished file.
pub(super) struct Finish {
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mtime: (i64, u32),
    pub(super) fsync: bool,
}

pub(super) fn put_end(shared: &Shared, id: u64, f: Finish) -> Result<(), Fail> {
    let t = {
        let mut map = shared.transfers.lock();
        let slot = map.get(&id).ok_or_else(|| unknown_transfer(id))?;
        if slot.inflight > 0 {
            let why =
                format!("'{}': chunks are still being written; end the transfer after they are", show(&slot.t.rel));
            return Err(Fail::new(code::PROTOCOL, why));
        }
        let got = slot.t.received.lock().unwrap_or_else(|e| e.into_inner()).bytes;
        if got != slot.t.size {
            let why = format!("'{}': {got} of {} bytes received; send the rest first", show(&slot.t.rel), slot.t.size);
            return Err(Fail::new(code::PROTOCOL, why));
        }
        map.remove(&id).expect("present").t
    };
    let result = finish(&t, &f);
    match (&result, &t.journal) {
        (Err(_), _) => t.remove_temporary(),
        (Ok(()), Some(j)) => j.remove(),
        (Ok(()), None) => {}
    }
    result
}

fn finish(t: &Transfer, f: &Finish) -> Result<(), Fail> {
    let fd = t.file.as_raw_fd();
    let rel = &t.rel;
    t.file.set_len(t.size).map_err(|e| Fail::io("cannot write", rel, e))?;
    // Owner first: chown clears set-id bits, which the chmod then sets.
    chown_fd(fd, (f.uid, f.gid), rel)?;
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fchmod(fd, (f.mode & 0o7777) as libc::mode_t) })
        .map_err(|e| Fail::io("cannot set permissions on", rel, e))?;
    set_mtime_fd(fd, f.mtime).map_err(|e| Fail::io("cannot set times on", rel, e))?;
    if f.fsync {
        fsync_fd(fd).map_err(|e| Fail::io("cannot sync", rel, e))?;
    }
    put_in_place(t, rel)?;
    if f.fsync {
        fsync_fd(t.dir.as_raw_fd()).map_err(|e| Fail::io("cannot sync the directory of", rel, e))?;
    }
    Ok(())
}

/// Put a complete file under its final name: link the unnamed file there, or rename the temporary over whatever is
/// there (a file or symlink is replaced, a directory is an error).
fn put_in_place(t: &Transfer, rel: &[u8]) -> Result<(), Fail> {
    if t.unnamed {
        return fastsync_engine::finish::place_unnamed_at(t.file.as_fd(), t.dir.as_fd(), &t.name, &t.tmp)
            .map_err(|e| placing_failed(e, rel));
    }
    rename_into_place(t.dir.as_raw_fd(), &t.tmp, &t.name, rel)
}

/// Rename a temporary onto its final name: a file or symlink there is replaced, a directory is an error.
pub(super) fn rename_into_place(dir: RawFd, tmp: &CStr, name: &CStr, rel: &[u8]) -> Result<(), Fail> {
    rename_at(dir, tmp, name).map_err(|e| placing_failed(e, rel))
}

fn placing_failed(e: io::Error, rel: &[u8]) -> Fail {
    match e.raw_os_error() {
        Some(libc::EISDIR | libc::ENOTEMPTY | libc::EEXIST) => {
            Fail::new(code::IO, format!("cannot replace '{}': a directory is in the way", show(rel)))
        }
        _ => Fail::io("cannot rename into place", rel, e),
    }
}
