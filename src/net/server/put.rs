//! Writing files: the transfer table shared by all connections, `PutBegin`/`PutResume`/`PutData`/`PutCheck`/`PutEnd`.

use super::*;

/// A file being received under a temporary name beside its destination.
#[derive(Debug)]
pub(super) struct Transfer {
    /// Destination, relative to the root (for messages).
    pub(super) rel: Vec<u8>,
    /// The destination's directory, and the final and temporary names in it.
    pub(super) dir: OwnedFd,
    pub(super) name: CString,
    /// The temporary name: the file itself, or, when `unnamed`, only a name reserved for the case where something
    /// appeared at `name` meanwhile (the file is then linked here and renamed over it).
    pub(super) tmp: CString,
    /// The file was created with no name (`O_TMPFILE`) and is linked to `name` when complete.
    pub(super) unnamed: bool,
    pub(super) file: File,
    /// An O_DIRECT descriptor on `file` for a large file ([`DirectFile`]).
    pub(super) direct: Option<DirectFile>,
    pub(super) size: u64,
    pub(super) received: Mutex<Received>,
    /// A resumable transfer (`PutResume`): the journal of the chunks written, and what an earlier run recorded
    /// (offered to `PutCheck`).
    pub(super) journal: Option<Journal>,
    pub(super) recorded: Mutex<Received>,
    /// Open connections that used this (resumable) transfer ([`Holds`]): 0 once its client is gone.
    pub(super) holders: AtomicUsize,
}

impl Transfer {
    /// The transfer is over without a file: its temporary (and journal) go.
    pub(super) fn remove_temporary(&self) {
        if !self.unnamed {
            let _ = unlink_at(self.dir.as_raw_fd(), &self.tmp, 0);
        }
        if let Some(j) = &self.journal {
            j.remove();
        }
    }

    /// The client went away (idle, evicted, or the server stops): a resumable temporary stays for its next run.
    fn abandon(&self) {
        if self.journal.is_none() {
            self.remove_temporary();
        }
    }

    /// A chunk was written and checked: a resumable transfer records it.
    fn written(&self, offset: u64, len: u64) {
        if let Some(j) = &self.journal {
            // Best effort: a chunk missing from the journal is only sent again by the next run.
            let _ = j.record(offset, len);
        }
    }
}

/// The byte ranges of a transfer written so far: disjoint, not adjacent, by start. A chunk sent twice (a retry
/// after a lost acknowledgement) counts once.
#[derive(Debug, Default)]
pub(super) struct Received {
    pub(super) ranges: BTreeMap<u64, u64>,
    pub(super) bytes: u64,
    /// Ranges being spliced into the file right now, not yet checked (zero-copy path): `[start, end)`.
    pending: Vec<(u64, u64)>,
}

impl Received {
    /// Add `[start, end)`. `Err` when the transfer would have more than [`RANGES_MAX`] separate ranges.
    pub(super) fn add(&mut self, start: u64, end: u64) -> Result<(), ()> {
        if start >= end {
            return Ok(());
        }
        let (mut s, mut e) = (start, end);
        // Ranges that overlap or touch [start, end): starts <= end, scanning down while their end >= start.
        let touching: Vec<(u64, u64)> =
            self.ranges.range(..=end).rev().take_while(|&(_, &re)| re >= start).map(|(&a, &b)| (a, b)).collect();
        if touching.is_empty() && self.ranges.len() >= RANGES_MAX {
            return Err(());
        }
        for (a, b) in touching {
            self.ranges.remove(&a);
            self.bytes -= b - a;
            s = s.min(a);
            e = e.max(b);
        }
        self.ranges.insert(s, e);
        self.bytes += e - s;
        Ok(())
    }

    /// Reserve `[start, end)` for a splice straight into the file, which writes before the digest is checked: only
    /// when no byte of it has been received or is being spliced (a damaged chunk must never land on counted bytes).
    pub(super) fn reserve(&mut self, start: u64, end: u64) -> bool {
        let counted = self.ranges.range(..end).next_back().is_some_and(|(_, &e)| e > start);
        let spliced = self.pending.iter().any(|&(s, e)| s < end && start < e);
        if counted || spliced || start >= end {
            return false;
        }
        self.pending.push((start, end));
        true
    }

    /// End the reservation of `[start, end)`.
    pub(super) fn release(&mut self, start: u64, end: u64) {
        self.pending.retain(|&r| r != (start, end));
    }

    /// Forget `[start, end)`: a spliced chunk failed its digest, and a copy of the same bytes counted meanwhile by
    /// the ordinary path may have been overwritten. The client, told `DIGEST`, sends the range again.
    pub(super) fn remove(&mut self, start: u64, end: u64) {
        let hit: Vec<(u64, u64)> =
            self.ranges.range(..end).rev().take_while(|&(_, &e)| e > start).map(|(&a, &b)| (a, b)).collect();
        for (a, b) in hit {
            self.ranges.remove(&a);
            self.bytes -= b - a;
            if a < start {
                self.ranges.insert(a, start);
                self.bytes += start - a;
            }
            if b > end {
                self.ranges.insert(end, b);
                self.bytes += b - end;
            }
        }
    }
}

pub(super) struct Slot {
    pub(super) t: Arc<Transfer>,
    pub(super) last_used: Instant,
    /// Requests working on it right now (it is never evicted or finished under them).
    pub(super) inflight: usize,
}

/// Every transfer in progress, by the client's id, shared by all connections.
pub(super) struct Transfers {
    map: Mutex<HashMap<u64, Slot>>,
    /// At most this many at once ([`TRANSFERS_MAX`]).
    cap: usize,
}

pub(super) fn unknown_transfer(id: u64) -> Fail {
    Fail::new(code::NOT_FOUND, format!("unknown transfer {id:#x} (never begun, already finished, aborted or expired)"))
}

/// A transfer in use by one request; released on drop.
pub(super) struct Lease<'a> {
    table: &'a Transfers,
    id: u64,
    pub(super) t: Arc<Transfer>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut map = self.table.lock();
        if let Some(slot) = map.get_mut(&self.id).filter(|s| Arc::ptr_eq(&s.t, &self.t)) {
            slot.inflight -= 1;
            slot.last_used = Instant::now();
        }
    }
}

/// A [`Lease`] that owns its hold on the table, for a socket job's gate (which runs on a shard, see
/// [`put_data_on_shards`]).
struct OwnedLease {
    table: Arc<Transfers>,
    id: u64,
    pub(super) t: Arc<Transfer>,
}

impl Drop for OwnedLease {
    fn drop(&mut self) {
        let mut map = self.table.lock();
        if let Some(slot) = map.get_mut(&self.id).filter(|s| Arc::ptr_eq(&s.t, &self.t)) {
            slot.inflight -= 1;
            slot.last_used = Instant::now();
        }
    }
}

/// Hold transfer `id` of `table` (as [`Transfers::lease`]) when it is still the one `t` points to.
fn lease_owned(table: &Arc<Transfers>, id: u64, t: &std::sync::Weak<Transfer>) -> Option<OwnedLease> {
    let t = t.upgrade()?;
    let mut map = table.lock();
    let slot = map.get_mut(&id).filter(|s| Arc::ptr_eq(&s.t, &t))?;
    slot.inflight += 1;
    slot.last_used = Instant::now();
    Some(OwnedLease { table: Arc::clone(table), id, t })
}

impl Transfers {
    pub(super) fn new(cap: usize) -> Transfers {
        Transfers { map: Mutex::new(HashMap::new()), cap }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        // A panic elsewhere never leaves the map half-updated: every update is a single insert/remove/field store.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn lease(&self, id: u64) -> Result<Lease<'_>, Fail> {
        let mut map = self.lock();
        let slot = map.get_mut(&id).ok_or_else(|| unknown_transfer(id))?;
        slot.inflight += 1;
        slot.last_used = Instant::now();
        Ok(Lease { table: self, id, t: Arc::clone(&slot.t) })
    }

    /// Remove the temporaries of transfers idle for `idle` or more at `now`; returns how many.
    pub(super) fn expire(&self, now: Instant, idle: Duration) -> usize {
        let mut map = self.lock();
        let old: Vec<u64> = map
            .iter()
            .filter(|(_, s)| s.inflight == 0 && now.saturating_duration_since(s.last_used) >= idle)
            .map(|(&id, _)| id)
            .collect();
        for id in &old {
            if let Some(slot) = map.remove(id) {
                slot.t.abandon();
            }
        }
        old.len()
    }

    /// Make room for one more transfer: drop expired ones, then, if the table is still full, the least recently used
    /// one idle for at least `evict_idle`. `false` when every slot is in active use.
    pub(super) fn make_room(&self, now: Instant, evict_idle: Duration) -> bool {
        if self.lock().len() < self.cap {
            return true;
        }
        self.expire(now, TRANSFER_IDLE_EXPIRY);
        let mut map = self.lock();
        if map.len() < self.cap {
            return true;
        }
        let victim = map
            .iter()
            .filter(|(_, s)| s.inflight == 0 && now.saturating_duration_since(s.last_used) >= evict_idle)
            .min_by_key(|(_, s)| s.last_used)
            .map(|(&id, _)| id);
        match victim.and_then(|id| map.remove(&id)) {
            Some(slot) => {
                slot.t.abandon();
                true
            }
            None => false,
        }
    }

    pub(super) fn abort(&self, id: u64) {
        let slot = self.lock().remove(&id);
        if let Some(slot) = slot {
            slot.t.remove_temporary();
        }
    }

    /// The server stops: ordinary temporaries are removed, resumable ones kept. Returns (removed, kept).
    pub(super) fn abort_all(&self) -> (usize, usize) {
        let mut map = self.lock();
        let kept = map.values().filter(|s| s.t.journal.is_some()).count();
        let removed = map.len() - kept;
        for (_, slot) in map.drain() {
            slot.t.abandon();
        }
        (removed, kept)
    }
}

/// Create a fresh temporary beside `name` in `dir`: `.NAME.fstmp-PID-N`, made by `create` (which fails with
/// `EEXIST` when the name is taken: the next number is tried).
pub(super) fn create_temporary<T>(
    shared: &Shared,
    dir: RawFd,
    name: &CStr,
    mut create: impl FnMut(RawFd, &CStr) -> io::Result<T>,
) -> io::Result<(CString, T)> {
    loop {
        let tmp = temporary_name(shared, name);
        match create(dir, &tmp) {
            Ok(v) => return Ok((tmp, v)),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The next temporary name beside `name`: `.NAME.fstmp-PID-N` (this server's pid, its own counter).
fn temporary_name(shared: &Shared, name: &CStr) -> CString {
    let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
    let tmp = stale::unique(Path::new(OsStr::from_bytes(name.to_bytes())), seq);
    CString::new(tmp.file_name().expect("a file name").as_bytes()).expect("no NUL in a name made of one without")
}

pub(super) fn is_dir_at(dir: RawFd, name: &CStr) -> bool {
    lstat_at(dir, name).is_ok_and(|st| kind_of(&st) == EntryKind::Dir)
}

/// Where a new transfer `id` of `rel` writes: the directory (opened beneath the root) and the final name. Refused
/// over the root itself, over a directory, and for an id already in use.
fn new_transfer_target(shared: &Shared, id: u64, rel: &[u8]) -> Result<(OwnedFd, CString), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot create", rel, e))?;
    let Some(name) = p.name else {
        return Err(Fail::new(code::IO, "cannot write a file over the served root"));
    };
    if is_dir_at(p.dir.as_raw_fd(), &name) {
        return Err(Fail::new(code::IO, format!("cannot write file '{}': a directory is in the way", show(rel))));
    }
    if shared.transfers.lock().contains_key(&id) {
        return Err(Fail::new(code::PROTOCOL, format!("transfer {id:#x} is already in progress")));
    }
    Ok((p.dir, name))
}

pub(super) fn put_begin(shared: &Shared, id: u64, rel: &[u8], size: u64) -> Result<(), Fail> {
    let (dir, name) = new_transfer_target(shared, id, rel)?;
    if !shared.transfers.make_room(Instant::now(), shared.timeout) {
        let why = format!("too many transfers in progress ({TRANSFERS_MAX}); try again later");
        return Err(Fail::new(code::BUSY, why));
    }
    // Read-write: the zero-copy path reads spliced chunks back to check their digests. Unnamed where the filesystem
    // allows (one directory operation per file instead of create + rename, nothing left if the server dies);
    // otherwise a named temporary.
    let (tmp, fd, unnamed) = match fastsync_engine::finish::create_unnamed_at(dir.as_fd(), 0o600) {
        Some(fd) => (temporary_name(shared, &name), fd, true),
        None => {
            let (tmp, fd) = create_temporary(shared, dir.as_raw_fd(), &name, |dir, tmp| {
                open_at(dir, tmp, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
            })
            .map_err(|e| Fail::io("cannot create a temporary file for", rel, e))?;
            (tmp, fd, false)
        }
    };
    let file = File::from(fd);
    let t = Arc::new(Transfer {
        rel: rel.to_vec(),
        dir,
        name,
        tmp,
        unnamed,
        direct: if shared.direct_io { DirectFile::open(&file, size) } else { None },
        file,
        size,
        received: Mutex::new(Received::default()),
        journal: None,
        recorded: Mutex::new(Received::default()),
        holders: AtomicUsize::new(0),
    });
    let mut map = shared.transfers.lock();
    if map.contains_key(&id) {
        drop(map);
        t.remove_temporary();
        return Err(Fail::new(code::PROTOCOL, format!("transfer {id:#x} is already in progress")));
    }
    map.insert(id, Slot { t, last_used: Instant::now(), inflight: 0 });
    Ok(())
}

/// Read the next request. On the zero-copy path (`FASTSYNC_ZEROCOPY` splice or both, plain connection) a `PutData`
/// is served here, its payload spliced from the socket into the file, and `None` is returned.
pub(super) fn next_request(shared: &Shared, conn: &mut Conn, holds: &mut Holds) -> Result<Option<Msg>, WireError> {
    let zero_copy = zerocopy::mode().splices_into_file() || zerocopy::shards().is_some();
    if !zero_copy || conn.r.get_ref().plain().is_none() {
        return wire::read_msg(conn).map(Some);
    }
    let mut head = [0u8; wire::PUT_DATA_HEAD_BYTES];
    conn.r.read_exact(&mut head[..4])?;
    let frame = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    // Checked before anything else is read, as `read_msg` does.
    if frame == 0 || frame > wire::FRAME_BYTES_MAX {
        let why = format!("frame of {frame} bytes (the limit is {})", wire::FRAME_BYTES_MAX);
        return Err(WireError::Malformed(why));
    }
    conn.r.read_exact(&mut head[4..5])?;
    if head[4] != wire::KIND_PUT_DATA || frame < wire::PUT_DATA_HEAD_BYTES - 4 {
        let mut body = vec![0u8; frame];
        body[0] = head[4];
        conn.r.read_exact(&mut body[1..])?;
        return Msg::decode_body(&body).map(Some);
    }
    conn.r.read_exact(&mut head[5..])?;
    let h = wire::parse_data_head(&head)?;
    let served = match zerocopy::shards() {
        Some(shards) if h.len >= crate::net::shards::PAYLOAD_BYTES_MIN => put_data_on_shards(shared, conn, h, shards)?,
        // A small payload on the shard path: read here (the ordinary path answers it).
        Some(_) if !zerocopy::mode().splices_into_file() => {
            let mut bytes = vec![0u8; h.len];
            conn.r.read_exact(&mut bytes)?;
            Some(Msg::PutData { id: h.id.expect("a PutData head"), offset: h.offset, digest: h.digest, bytes })
        }
        _ => put_data_spliced(shared, conn, h)?,
    };
    if served.is_none()
        && let Some(id) = h.id
    {
        holds.note(shared, id);
    }
    Ok(served)
}

/// Serve a `PutData` whose head was read: splice its payload into the temporary when its range is free (see
/// [`Received::reserve`]), check the digest by reading it back, and answer. Anything unusual (read-only server,
/// unknown transfer, range out of bounds or already received) reads the payload into memory and returns the request
/// for the ordinary path, which answers it.
fn put_data_spliced(shared: &Shared, conn: &mut Conn, h: wire::DataHead) -> Result<Option<Msg>, WireError> {
    let id = h.id.expect("a PutData head");
    let (start, len) = (h.offset, h.len);
    let lease = (!shared.read_only).then(|| shared.transfers.lease(id).ok()).flatten();
    let reserved = lease.as_ref().and_then(|l| {
        let end = start.checked_add(len as u64).filter(|&e| e <= l.t.size)?;
        let ok = l.t.received.lock().unwrap_or_else(|e| e.into_inner()).reserve(start, end);
        ok.then_some(end)
    });
    let (Some(lease), Some(end)) = (lease, reserved) else {
        let mut bytes = vec![0u8; len];
        conn.r.read_exact(&mut bytes)?;
        return Ok(Some(Msg::PutData { id, offset: start, digest: h.digest, bytes }));
    };
    let t = &lease.t;
    let checked = match zerocopy::recv_into_file(&mut conn.r, &t.file, start, len) {
        Ok(()) => match zerocopy::range_matches(&t.file, start, len, &h.digest) {
            Ok(true) => Ok(()),
            Ok(false) => {
                let why =
                    format!("chunk at offset {start} of '{}': digest mismatch (damaged in transit)", show(&t.rel));
                Err(Fail::new(code::DIGEST, why))
            }
            Err(e) => Err(Fail::io("cannot read back", &t.rel, e)),
        },
        Err(SpliceError::File { cause, .. }) => Err(Fail::io("cannot write", &t.rel, cause)),
        Err(SpliceError::Socket(e)) => {
            t.received.lock().unwrap_or_else(|e| e.into_inner()).release(start, end);
            return Err(WireError::Io(e));
        }
    };
    let reply = {
        let mut received = t.received.lock().unwrap_or_else(|e| e.into_inner());
        received.release(start, end);
        match checked {
            Ok(()) => {
                t.written(start, end - start);
                received.add(start, end).map_err(|()| {
                    Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel)))
                })
            }
            Err(f) => {
                received.remove(start, end);
                Err(f)
            }
        }
    };
    drop(lease);
    match reply {
        Ok(()) => wire::write_msg(conn, &Msg::Ok)?,
        Err(f) => send_fail(conn, f)?,
    }
    Ok(None)
}

/// Serve a `PutData` whose head was read on the socket shards: a shard receives the payload into a registered
/// buffer and checks its digest, then takes hold of the transfer (a gate, [`OwnedLease`]) only to write it — so a
/// client that stalls mid-payload holds nothing (its stream is replaced and the chunk sent again; `PutEnd` and a
/// resumed push do not wait for this connection's timeout), and a damaged chunk is never written. What the ordinary
/// path answers (read-only server, unknown transfer, chunk out of bounds) is read into memory and returned for it.
fn put_data_on_shards(
    shared: &Shared,
    conn: &mut Conn,
    h: wire::DataHead,
    shards: &crate::net::shards::NetShards,
) -> Result<Option<Msg>, WireError> {
    let id = h.id.expect("a PutData head");
    let (start, len) = (h.offset, h.len);
    let end = start.checked_add(len as u64);
    // While the payload comes in, this connection holds neither the transfer nor (through it) its journal's lock:
    // only its own duplicates of the temporary's descriptors, and a weak reference for the gate.
    let target = (!shared.read_only)
        .then(|| shared.transfers.lease(id).ok())
        .flatten()
        .filter(|l| end.is_some_and(|e| e <= l.t.size))
        .and_then(|l| {
            let file = l.t.file.try_clone().ok()?;
            let direct = match &l.t.direct {
                // SAFETY: the transfer's descriptor is open while the lease holds it.
                Some(d) => Some(unsafe { std::os::fd::BorrowedFd::borrow_raw(d.raw_fd()) }.try_clone_to_owned().ok()?),
                None => None,
            };
            Some((Arc::downgrade(&l.t), l.t.rel.to_vec(), file, direct))
        });
    let (Some((t, rel, file, direct)), Some(end)) = (target, end) else {
        let mut bytes = vec![0u8; len];
        conn.r.read_exact(&mut bytes)?;
        return Ok(Some(Msg::PutData { id, offset: start, digest: h.digest, bytes }));
    };
    let held: Arc<Mutex<Option<OwnedLease>>> = Arc::default();
    let gate = {
        let (table, held) = (Arc::clone(&shared.transfers), Arc::clone(&held));
        Box::new(move || match lease_owned(&table, id, &t) {
            Some(lease) => {
                *held.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
                true
            }
            None => false,
        })
    };
    let (fd, direct_fd) = (file.as_raw_fd(), direct.as_ref().map(|d| d.as_raw_fd()));
    let got = zerocopy::recv_on_shards(shards, &mut conn.r, fd, direct_fd, start, len, h.digest, Some(gate));
    drop((file, direct));
    let lease = held.lock().unwrap_or_else(|e| e.into_inner()).take();
    let reply = match (got.map_err(WireError::Io)?, &lease) {
        (zerocopy::Received::Written, Some(OwnedLease { t, .. })) => {
            t.written(start, end - start);
            let mut received = t.received.lock().unwrap_or_else(|e| e.into_inner());
            received.add(start, end).map_err(|()| {
                Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel)))
            })
        }
        (zerocopy::Received::Written, None) => unreachable!("a written payload passed the gate, which holds it"),
        (zerocopy::Received::Mismatch, _) => {
            let why = format!("chunk at offset {start} of '{}': digest mismatch (damaged in transit)", show(&rel));
            Err(Fail::new(code::DIGEST, why))
        }
        (zerocopy::Received::Refused, _) => Err(unknown_transfer(id)),
        (zerocopy::Received::File(e), _) => Err(Fail::io("cannot write", &rel, e)),
    };
    drop(lease);
    // Answered as `request` answers: together with the answers to requests that arrived with this one.
    match reply {
        Ok(()) => conn.queue(&Msg::Ok)?,
        Err(f) => conn.queue(&Msg::Error { code: f.code, message: f.message })?,
    }
    if conn.r.buffer().is_empty() {
        conn.flush()?;
    }
    Ok(None)
}

/// `PutResume`: as `PutBegin`, into the stable `.NAME.fstmp-part` with its journal `.NAME.fstmp-journal` (the
/// local engine's format, opened through the directory's descriptor and never through a symlink). An earlier run's
/// records of the same source (size and mtime) are kept for `PutCheck`; returns how many bytes they cover. When
/// another connection holds the journal, or it cannot be used, the transfer is an ordinary one (0 recorded).
pub(super) fn put_resume(shared: &Shared, id: u64, rel: &[u8], size: u64, mtime: (i64, u32)) -> Result<u64, Fail> {
    let (dir, name) = new_transfer_target(shared, id, rel)?;
    {
        // An earlier run of this file whose client went away without a word still holds the journal: it is over.
        let mut map = shared.transfers.lock();
        let gone: Vec<u64> = map
            .iter()
            .filter(|(_, s)| s.inflight == 0 && s.t.journal.is_some() && s.t.rel == rel)
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            if let Some(slot) = map.remove(&id) {
                slot.t.abandon();
            }
        }
    }
    let final_path = Path::new(OsStr::from_bytes(name.to_bytes()));
    let cname = |p: PathBuf| CString::new(p.as_os_str().as_bytes()).expect("no NUL in a name");
    let (part, journal_name) = (cname(stale::part(final_path)), cname(stale::journal(final_path)));
    let jpath =
        PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(OsStr::from_bytes(journal_name.to_bytes()));
    let source = SourceId { size, mtime: Timestamp { sec: mtime.0, nsec: i64::from(mtime.1) }, ino: 0 };
    let (journal, ranges) = match Journal::open(&jpath, source, wire::CHUNK_BYTES_MAX as u64) {
        Ok(Opened::Resume(j, rec)) => (j, rec.ranges),
        Ok(Opened::Fresh(j)) => (j, Vec::new()),
        Ok(Opened::Busy) | Err(_) => return put_begin(shared, id, rel, size).map(|()| 0),
    };
    let dir_fd = dir.as_raw_fd();
    let reopened = if ranges.is_empty() { None } else { open_at(dir_fd, &part, libc::O_RDWR, 0o600).ok() };
    let resumed = reopened.is_some();
    let fd = match reopened {
        Some(fd) => fd,
        None => {
            let fd = open_at(dir_fd, &part, libc::O_RDWR | libc::O_CREAT, 0o600)
                .map_err(|e| Fail::io("cannot create a temporary file for", rel, e))?;
            File::from(fd).set_len(0).map_err(|e| Fail::io("cannot write", rel, e))?;
            open_at(dir_fd, &part, libc::O_RDWR, 0o600)
                .map_err(|e| Fail::io("cannot create a temporary file for", rel, e))?
        }
    };
    let mut recorded = Received::default();
    if resumed {
        for (offset, len) in &ranges {
            // Past RANGES_MAX separate ranges, the rest is simply sent again.
            let _ = recorded.add(*offset, offset + len);
        }
    }
    let recorded_bytes = recorded.bytes;
    if !shared.transfers.make_room(Instant::now(), shared.timeout) {
        let why = format!("too many transfers in progress ({TRANSFERS_MAX}); try again later");
        return Err(Fail::new(code::BUSY, why));
    }
    let file = File::from(fd);
    let t = Arc::new(Transfer {
        rel: rel.to_vec(),
        dir,
        name,
        tmp: part,
        unnamed: false,
        direct: if shared.direct_io { DirectFile::open(&file, size) } else { None },
        file,
        size,
        received: Mutex::new(Received::default()),
        journal: Some(journal),
        recorded: Mutex::new(recorded),
        holders: AtomicUsize::new(0),
    });
    let mut map = shared.transfers.lock();
    if map.contains_key(&id) {
        return Err(Fail::new(code::PROTOCOL, format!("transfer {id:#x} is already in progress")));
    }
    map.insert(id, Slot { t, last_used: Instant::now(), inflight: 0 });
    Ok(recorded_bytes)
}

/// `PutCheck`: `[offset, offset + len)` of a resumable transfer counts as received when an earlier run recorded all
/// of it and the temporary's bytes there hash to `digest`.
pub(super) fn put_check(shared: &Shared, id: u64, offset: u64, len: u64, digest: &[u8; 32]) -> Result<(), Fail> {
    let lease = shared.transfers.lease(id)?;
    let t = &lease.t;
    let end = offset.checked_add(len).filter(|&e| e <= t.size && len > 0);
    let Some(end) = end else { return Err(Fail::new(code::PROTOCOL, "PutCheck outside the file")) };
    let covered = {
        let rec = t.recorded.lock().unwrap_or_else(|e| e.into_inner());
        rec.ranges.range(..=offset).next_back().is_some_and(|(_, &e)| e >= end)
    };
    if !covered {
        return Err(Fail::new(code::NOT_FOUND, "not recorded by an earlier run"));
    }
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; GET_CHUNK_BYTES];
    let mut at = offset;
    while at < end {
        let n = buf.len().min((end - at) as usize);
        t.file.read_exact_at(&mut buf[..n], at).map_err(|e| Fail::io("cannot read", &t.rel, e))?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    if h.finalize() != blake3::Hash::from_bytes(*digest) {
        return Err(Fail::new(code::DIGEST, "the bytes recorded differ"));
    }
    t.received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add(offset, end)
        .map_err(|()| Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel))))
}

pub(super) fn put_data(shared: &Shared, id: u64, offset: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<(), Fail> {
    let lease = shared.transfers.lease(id)?;
    let t = &lease.t;
    let end = offset.checked_add(bytes.len() as u64).filter(|&e| e <= t.size).ok_or_else(|| {
        let why = format!(
            "chunk at offset {offset} of {} bytes is beyond the end of '{}' ({} bytes)",
            bytes.len(),
            show(&t.rel),
            t.size
        );
        Fail::new(code::PROTOCOL, why)
    })?;
    if blake3::hash(bytes) != blake3::Hash::from_bytes(*digest) {
        let why = format!("chunk at offset {offset} of '{}': digest mismatch (damaged in transit)", show(&t.rel));
        return Err(Fail::new(code::DIGEST, why));
    }
    match &t.direct {
        Some(direct) => direct.write_at(&t.file, bytes, offset),
        None => t.file.write_all_at(bytes, offset),
    }
    .map_err(|e| Fail::io("cannot write", &t.rel, e))?;
    t.written(offset, end - offset);
    let mut received = t.received.lock().unwrap_or_else(|e| e.into_inner());
    received
        .add(offset, end)
        .map_err(|()| Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel))))
}

/// `PutHole`: `[offset, offset + len)` of transfer `id` is a hole of the source; it holds no blocks here either.
pub(super) fn put_hole(shared: &Shared, id: u64, offset: u64, len: u64) -> Result<(), Fail> {
    let lease = shared.transfers.lease(id)?;
    let t = &lease.t;
    let end = offset.checked_add(len).filter(|&e| e <= t.size && len > 0).ok_or_else(|| {
        let why = format!("hole at offset {offset} of {len} bytes does not fit '{}' ({} bytes)", show(&t.rel), t.size);
        Fail::new(code::PROTOCOL, why)
    })?;
    sparse::make_hole(&t.file, offset, len).map_err(|e| Fail::io("cannot write", &t.rel, e))?;
    t.written(offset, len);
    let mut received = t.received.lock().unwrap_or_else(|e| e.into_inner());
    received
        .add(offset, end)
        .map_err(|()| Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel))))
}
