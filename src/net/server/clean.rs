//! `Clean` and `DropParts`: what interrupted pushes left behind.

use super::*;

/// Whether a registered transfer is still someone's: a connection that used it is open, or a request works on it.
fn live(slot: &Slot) -> bool {
    slot.inflight > 0 || slot.t.holders.load(Ordering::SeqCst) > 0
}

/// `Clean`: in directory `rel`, remove the temporaries of processes that are gone (`.NAME.fstmp-PID-N`; this
/// server's own are its transfers', removed when they end or expire), and return the names whose partial file or
/// journal is there and held by no live transfer (at most [`wire::PART_NAMES_MAX`]).
pub(super) fn clean(shared: &Shared, rel: &[u8]) -> Result<Vec<Vec<u8>>, Fail> {
    let dir = shared.root.dir(rel).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let key = fstat(dir.as_raw_fd()).map(|st| key_of(&st)).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let names = read_names(dir.as_raw_fd(), false).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let mut bases = BTreeSet::new();
    for name in names {
        match stale::parse_temporary(OsStr::from_bytes(name.to_bytes())) {
            Some(stale::Kind::Unique { pid }) if !stale::process_alive(pid) => {
                let _ = unlink_at(dir.as_raw_fd(), &name, 0);
            }
            Some(stale::Kind::Part { base } | stale::Kind::Journal { base }) => {
                let b = base.into_vec();
                // Only what the wire carries as a name (a truncated or odd temporary is left alone).
                if !b.is_empty() && b != b"." && b != b".." && b.len() <= wire::NAME_BYTES_MAX {
                    bases.insert(b);
                }
            }
            _ => {}
        }
    }
    let held: Vec<Vec<u8>> = {
        let map = shared.transfers.lock();
        map.values()
            .filter(|s| s.t.journal.is_some() && live(s) && dir_key(&s.t) == Some(key))
            .map(|s| s.t.name.to_bytes().to_vec())
            .collect()
    };
    Ok(bases.into_iter().filter(|b| !held.contains(b)).take(wire::PART_NAMES_MAX).collect())
}

fn dir_key(t: &Transfer) -> Option<(u64, u64)> {
    fstat(t.dir.as_raw_fd()).ok().map(|st| key_of(&st))
}

/// `DropParts`: remove `.NAME.fstmp-part` and `.NAME.fstmp-journal` of each name in directory `rel`, unless a live
/// transfer holds them (a registered transfer whose client is gone is ended first) or another process holds the
/// journal's lock (a local fastsync writing there). Returns the names whose files were removed.
pub(super) fn drop_parts(shared: &Shared, rel: &[u8], names: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, Fail> {
    let dir = shared.root.dir(rel).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let key = fstat(dir.as_raw_fd()).map(|st| key_of(&st)).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let cname = |p: PathBuf| CString::new(p.as_os_str().as_bytes()).expect("no NUL in a name");
    let mut removed = Vec::new();
    for name in names {
        let orphans = {
            let mut map = shared.transfers.lock();
            let ids: Vec<u64> = map
                .iter()
                .filter(|(_, s)| s.t.journal.is_some() && s.t.name.to_bytes() == name && dir_key(&s.t) == Some(key))
                .map(|(&id, _)| id)
                .collect();
            if ids.iter().any(|id| live(&map[id])) {
                continue;
            }
            ids.iter().filter_map(|id| map.remove(id)).map(|s| s.t).collect::<Vec<_>>()
        };
        let mut gone = !orphans.is_empty();
        for t in orphans {
            t.remove_temporary();
        }
        let base = Path::new(OsStr::from_bytes(name));
        let (part, journal) = (cname(stale::part(base)), cname(stale::journal(base)));
        // Removed under the journal's lock: a transfer (here or in another process) that holds it is left alone,
        // and one that starts meanwhile finds the journal busy or gone.
        let lock = match open_at(dir.as_raw_fd(), &journal, libc::O_RDONLY, 0) {
            Ok(fd) => {
                // SAFETY: plain syscall on a descriptor we own; the lock goes with it.
                if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                    continue;
                }
                Some(fd)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(Fail::io("cannot clean", &join_rel(rel, name), e)),
        };
        for n in [&part, &journal] {
            match unlink_at(dir.as_raw_fd(), n, 0) {
                Ok(()) => gone = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(Fail::io("cannot remove the partial file of", &join_rel(rel, name), e)),
            }
        }
        drop(lock);
        if gone {
            removed.push(name.clone());
        }
    }
    Ok(removed)
}

/// `rel/name` as a wire path.
fn join_rel(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = rel.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// Remove directory `name` in `parent` and everything in it, depth-first with one open descriptor per level, never
/// following a symlink (symlinks are unlinked, and a directory swapped for a symlink fails the `O_NOFOLLOW` open).
pub(super) fn remove_tree(parent: RawFd, name: &CStr) -> io::Result<()> {
    struct Level {
        fd: OwnedFd,
        name: CString,
        names: Vec<CString>,
        next: usize,
    }
    let gone_ok = |r: io::Result<()>| match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    };
    let fd = open_dir_at(parent, name)?;
    let names = read_names(fd.as_raw_fd(), false)?;
    let mut stack = vec![Level { fd, name: name.to_owned(), names, next: 0 }];
    while let Some(level) = stack.last_mut() {
        if let Some(n) = level.names.get(level.next).cloned() {
            level.next += 1;
            let dir = level.fd.as_raw_fd();
            match lstat_at(dir, &n) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
                Ok(st) if kind_of(&st) == EntryKind::Dir => {
                    let fd = open_dir_at(dir, &n)?;
                    let names = read_names(fd.as_raw_fd(), false)?;
                    stack.push(Level { fd, name: n, names, next: 0 });
                }
                Ok(_) => gone_ok(unlink_at(dir, &n, 0))?,
            }
        } else {
            let done = stack.pop().expect("a level");
            drop(done.fd);
            let up = stack.last().map_or(parent, |l| l.fd.as_raw_fd());
            gone_ok(unlink_at(up, &done.name, libc::AT_REMOVEDIR))?;
        }
    }
    Ok(())
}
