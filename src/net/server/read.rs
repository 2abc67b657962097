//! Reading requests: `Stat`, `List` (one directory or a recursive stream) and `Get` (ranges, holes, digests).

use super::*;

pub(super) fn stat(shared: &Shared, rel: &[u8], follow: bool) -> Result<EntryMeta, Fail> {
    if follow {
        let fd = shared.root.follow(rel, O_PATH).map_err(|e| Fail::io("cannot stat", rel, e))?;
        return fstat(fd.as_raw_fd())
            .map(|st| entry(Vec::new(), &st, Vec::new()))
            .map_err(|e| Fail::io("cannot stat", rel, e));
    }
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot stat", rel, e))?;
    match &p.name {
        None => fstat(p.raw()).map(|st| entry(Vec::new(), &st, Vec::new())),
        Some(name) => entry_at(p.raw(), name, Vec::new()),
    }
    .map_err(|e| Fail::io("cannot stat", rel, e))
}

/// One directory being listed: its descriptor, its path relative to the listed one (with a trailing `/`, or empty),
/// and its sorted names.
struct Level {
    fd: OwnedFd,
    prefix: Vec<u8>,
    names: Vec<CString>,
    next: usize,
    /// The directory's (dev, ino): with `follow`, a symlink to a directory on the way down is a loop.
    key: (u64, u64),
}

pub(super) fn list(
    shared: &Shared,
    conn: &mut Conn,
    rel: &[u8],
    recursive: bool,
    follow: bool,
) -> Result<(), WireError> {
    match list_entries(shared, conn, rel, recursive, follow)? {
        Ok(()) => {
            conn.queue(&Msg::ListEnd)?;
            conn.flush()?;
            Ok(())
        }
        Err(f) => send_fail(conn, f),
    }
}

/// The (dev, ino) of a stat.
#[allow(clippy::unnecessary_cast)]
pub(super) fn key_of(st: &libc::stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

/// A directory open for reading its names, from a descriptor of it (an `O_PATH` one included).
fn open_listable(dir: &OwnedFd) -> io::Result<OwnedFd> {
    open_at(dir.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// The top of a `follow` listing: what `rel` leads to beneath the root; a directory opened for reading, or the
/// entry of what else it is.
fn follow_top(shared: &Shared, rel: &[u8]) -> io::Result<Result<OwnedFd, EntryMeta>> {
    let fd = shared.root.follow(rel, O_PATH)?;
    let st = fstat(fd.as_raw_fd())?;
    if kind_of(&st) != EntryKind::Dir {
        return Ok(Err(entry(Vec::new(), &st, Vec::new())));
    }
    open_listable(&fd).map(Ok)
}

/// Queue the entries of a listing: outer `Err` for a broken connection, inner for a failed listing (the client gets
/// `Error` instead of `ListEnd`, never a silently partial listing). With `follow`, a symlink is listed as what it
/// leads to beneath the root (resolved from the root by its whole path, as a local `-L` resolves it), a directory it
/// leads to is descended into unless it is one of its own ancestors, and a symlink that cannot be followed is an
/// `EntryError` in its place; the listing goes on.
fn list_entries(
    shared: &Shared,
    conn: &mut Conn,
    rel: &[u8],
    recursive: bool,
    follow: bool,
) -> Result<Result<(), Fail>, WireError> {
    if follow {
        let top = match follow_top(shared, rel) {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) => return conn.queue(&Msg::Entry(e)).map(Ok).map_err(WireError::Io),
            Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
        };
        return list_from(shared, conn, rel, top, recursive, true);
    }
    let p = match shared.root.parent(rel) {
        Ok(p) => p,
        Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
    };
    let top = match &p.name {
        None => p.dir,
        Some(name) => match lstat_at(p.raw(), name) {
            Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
            Ok(st) if kind_of(&st) != EntryKind::Dir => {
                // A file (or symlink, never followed) lists as itself.
                return Ok(match entry_at(p.raw(), name, Vec::new()) {
                    Ok(e) => conn.queue(&Msg::Entry(e)).map(Ok)?,
                    Err(e) => Err(Fail::io("cannot list", rel, e)),
                });
            }
            Ok(_) => match open_dir_at(p.raw(), name) {
                Ok(fd) => fd,
                Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
            },
        },
    };
    list_from(shared, conn, rel, top, recursive, false)
}

/// List the directory `top` (the listed path `rel`, opened) and, with `recursive`, its subtree.
fn list_from(
    shared: &Shared,
    conn: &mut Conn,
    rel: &[u8],
    top: OwnedFd,
    recursive: bool,
    follow: bool,
) -> Result<Result<(), Fail>, WireError> {
    let listed = fstat(top.as_raw_fd()).and_then(|st| Ok((read_names(top.as_raw_fd(), true)?, key_of(&st))));
    let (names, key) = match listed {
        Ok(n) => n,
        Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
    };
    let mut stack = vec![Level { fd: top, prefix: Vec::new(), names, next: 0, key }];
    // Where a failure is, relative to the root, for messages.
    let full = |sub: &[u8]| -> Vec<u8> {
        let mut v = rel.to_vec();
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(sub);
        v
    };
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.get(level.next).cloned() else {
            stack.pop();
            continue;
        };
        level.next += 1;
        let mut path = level.prefix.clone();
        path.extend_from_slice(name.to_bytes());
        if path.len() > wire::PATH_BYTES_MAX {
            let why = format!("cannot list '{}': path longer than {} bytes", show(&full(&path)), wire::PATH_BYTES_MAX);
            return Ok(Err(Fail::new(code::IO, why)));
        }
        let mut e = match entry_at(level.fd.as_raw_fd(), &name, path.clone()) {
            Ok(e) => e,
            // Deleted since the directory was read: it is not there any more.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Ok(Err(Fail::io("cannot stat", &full(&path), e))),
        };
        // With `follow`, a symlink is replaced by what it leads to (and a directory there is opened through it).
        let mut followed = None;
        if follow && e.kind == EntryKind::Symlink {
            let target = shared.root.follow(&full(&path), O_PATH).and_then(|fd| Ok((fstat(fd.as_raw_fd())?, fd)));
            match target {
                Ok((st, fd)) => {
                    e = entry(path.clone(), &st, Vec::new());
                    followed = Some(fd);
                }
                Err(err) => {
                    let f = Fail::io("cannot follow", &full(&path), err);
                    conn.queue(&Msg::EntryError { path, code: f.code, message: f.message })?;
                    continue;
                }
            }
        }
        let descend = recursive && e.kind == EntryKind::Dir;
        if descend && follow && stack.iter().any(|l| l.key == (e.dev, e.ino)) {
            let message =
                format!("cannot follow '{}': a symlink loop (it leads to its own ancestor)", show(&full(&path)));
            conn.queue(&Msg::EntryError { path, code: code::PATH_ESCAPES, message })?;
            continue;
        }
        let key = (e.dev, e.ino);
        conn.queue(&Msg::Entry(e))?;
        if descend {
            let level_fd = stack.last().expect("a level").fd.as_raw_fd();
            let sub = match &followed {
                Some(fd) => open_listable(fd),
                None => open_dir_at(level_fd, &name),
            }
            .and_then(|fd| Ok((read_names(fd.as_raw_fd(), true)?, fd)));
            match sub {
                Ok((names, fd)) => {
                    path.push(b'/');
                    stack.push(Level { fd, prefix: path, names, next: 0, key });
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Ok(Err(Fail::io("cannot list", &full(&path), e))),
            }
        }
    }
    Ok(Ok(()))
}

/// Open `rel` for reading if it is a regular file (never a symlink, a directory, a FIFO or a device). With
/// `follow`, what `rel` leads to beneath the root.
fn open_regular(shared: &Shared, rel: &[u8], follow: bool) -> Result<File, Fail> {
    if follow {
        return open_regular_followed(shared, rel);
    }
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot read", rel, e))?;
    let Some(name) = &p.name else {
        return Err(Fail::new(code::IO, "cannot read '.': it is a directory"));
    };
    let st = lstat_at(p.raw(), name).map_err(|e| Fail::io("cannot read", rel, e))?;
    let not_file = |kind: EntryKind| match kind {
        EntryKind::Symlink => {
            Fail::new(code::PATH_ESCAPES, format!("cannot read '{}': it is a symlink (never followed)", show(rel)))
        }
        EntryKind::Dir => Fail::new(code::IO, format!("cannot read '{}': it is a directory", show(rel))),
        _ => Fail::new(code::IO, format!("cannot read '{}': not a regular file", show(rel))),
    };
    if kind_of(&st) != EntryKind::File {
        return Err(not_file(kind_of(&st)));
    }
    // O_NONBLOCK: should a FIFO have been swapped in since the stat, the open does not wait for a writer.
    let fd = open_at(p.raw(), name, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
        .map_err(|e| Fail::io("cannot read", rel, e))?;
    let st = fstat(fd.as_raw_fd()).map_err(|e| Fail::io("cannot read", rel, e))?;
    if kind_of(&st) != EntryKind::File {
        return Err(not_file(kind_of(&st)));
    }
    Ok(File::from(fd))
}

/// `open_regular` with `follow`: resolved beneath the root to an `O_PATH` descriptor, checked to be a regular file,
/// and only then opened for reading, through that very inode (`/proc/self/fd/N`), so nothing else is ever opened.
fn open_regular_followed(shared: &Shared, rel: &[u8]) -> Result<File, Fail> {
    let fd = shared.root.follow(rel, O_PATH).map_err(|e| Fail::io("cannot read", rel, e))?;
    let st = fstat(fd.as_raw_fd()).map_err(|e| Fail::io("cannot read", rel, e))?;
    match kind_of(&st) {
        EntryKind::File => {}
        EntryKind::Dir => return Err(Fail::new(code::IO, format!("cannot read '{}': it is a directory", show(rel)))),
        _ => return Err(Fail::new(code::IO, format!("cannot read '{}': not a regular file", show(rel)))),
    }
    let proc = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    // SAFETY: valid C string; the result is owned below. The magic link leads to the inode checked above.
    let r = unsafe { libc::open(proc.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) };
    let r = cvt(r).map_err(|e| Fail::io("cannot read", rel, e))?;
    // SAFETY: a fresh descriptor.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(r) }))
}

/// Fill `buf` from `offset` (short only at the end of the file).
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// BLAKE3 of `[offset, offset + len)` of a regular file beneath the root (to its end when it is shorter).
pub(super) fn hash(shared: &Shared, rel: &[u8], offset: u64, len: u64, follow: bool) -> Result<Msg, Fail> {
    let file = open_regular(shared, rel, follow)?;
    let end = offset.saturating_add(len);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; GET_CHUNK_BYTES];
    let mut pos = offset;
    while pos < end {
        let want = (end - pos).min(buf.len() as u64) as usize;
        let n = read_full_at(&file, &mut buf[..want], pos).map_err(|e| Fail::io("cannot read", rel, e))?;
        hasher.update(&buf[..n]);
        pos += n as u64;
        if n < want {
            break;
        }
    }
    Ok(Msg::Hashed { digest: *hasher.finalize().as_bytes(), bytes: pos - offset })
}

pub(super) fn get(
    shared: &Shared,
    conn: &mut Conn,
    rel: &[u8],
    offset: u64,
    len: u64,
    follow: bool,
) -> Result<(), WireError> {
    let file = match open_regular(shared, rel, follow) {
        Ok(f) => f,
        Err(f) => return send_fail(conn, f),
    };
    let end = offset.saturating_add(len);
    let mut pos = offset;
    let mut buf = Vec::new();
    let from_file = zerocopy::mode().sends_from_file() && conn.w.get_ref().plain().is_some();
    let on_shards = zerocopy::shards().filter(|_| conn.w.get_ref().plain().is_some());
    // A sparse file's holes go as `Hole` messages, not as zeros, and a chunk stops where the next hole starts.
    let mut walker = sparse::Walker::for_file(&file);
    while pos < end {
        let data_end = match walker.as_mut().map(|w| w.next(pos, end)) {
            Some(Piece::Hole(hole_end)) => {
                wire::write_msg(conn, &Msg::Hole { offset: pos, len: hole_end - pos })?;
                pos = hole_end;
                continue;
            }
            Some(Piece::Data(data_end)) => data_end,
            None => end,
        };
        let want = (data_end - pos).min(GET_CHUNK_BYTES as u64) as usize;
        if let Some(shards) = on_shards.filter(|_| want >= crate::net::shards::PAYLOAD_BYTES_MIN) {
            // Read into a registered buffer, hashed and sent with its head by a shard (net/shards.rs).
            conn.w.flush()?;
            let sock = conn.w.get_ref().plain().expect("plain");
            let head = Box::new(move |digest: &[u8; 32], n| wire::data_head(pos, digest, n).to_vec());
            let n = match zerocopy::send_on_shards(shards, sock, &file, pos, want, head) {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return send_fail(conn, Fail::io("cannot read", rel, e)),
                Err(e) => return Err(WireError::Io(e)),
            };
            pos += n as u64;
            if n < want {
                break;
            }
            continue;
        }
        if from_file {
            // The digest from the page cache, the payload straight from it with sendfile (net/zerocopy.rs).
            let n = match zerocopy::hash_range(&file, pos, want) {
                Ok((_, 0)) => break,
                Ok((digest, n)) => {
                    conn.w.flush()?;
                    let sock = conn.w.get_ref().plain().expect("plain");
                    zerocopy::send_head_and_file(sock, &wire::data_head(pos, &digest, n), &file, pos, n)?;
                    n
                }
                Err(e) => return send_fail(conn, Fail::io("cannot read", rel, e)),
            };
            pos += n as u64;
            if n < want {
                break;
            }
            continue;
        }
        buf.resize(want, 0);
        let n = match read_full_at(&file, &mut buf, pos) {
            Ok(n) => n,
            Err(e) => return send_fail(conn, Fail::io("cannot read", rel, e)),
        };
        if n == 0 {
            break;
        }
        buf.truncate(n);
        let digest = *blake3::hash(&buf).as_bytes();
        let msg = Msg::Data { offset: pos, digest, bytes: std::mem::take(&mut buf) };
        wire::write_msg(conn, &msg)?;
        if let Msg::Data { bytes, .. } = msg {
            buf = bytes;
        }
        pos += n as u64;
        if n < want {
            break;
        }
    }
    match fstat(file.as_raw_fd()) {
        Ok(st) => {
            let e = entry(Vec::new(), &st, Vec::new());
            wire::write_msg(conn, &Msg::DataEnd { size: e.size, mtime_sec: e.mtime_sec, mtime_nsec: e.mtime_nsec })
        }
        Err(e) => send_fail(conn, Fail::io("cannot stat", rel, e)),
    }
}
