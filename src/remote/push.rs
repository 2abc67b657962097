//! Push: a local source to a `fastsync://` destination — the local walk, the control connection (directories,
//! symlinks, metadata, listings for `sync`), files whole or in ranges on the data streams, small ones in batches.

use super::*;

/// Ask `ahead` for the listings of the subdirectories of `frame` the walk enters next (in its order) that the remote
/// side has as directories, while there is room.
fn read_ahead(ahead: &mut ListAhead, target: &[u8], frame: &mut PushFrame) {
    let Some(listing) = frame.remote.as_ref() else { return };
    frame.ahead_seen = frame.ahead_seen.max(frame.taken);
    while frame.ahead_asked.front().is_some_and(|&i| i < frame.taken) {
        frame.ahead_asked.pop_front();
    }
    // A few per directory, so that the window holds what a depth-first walk needs soonest (the next subdirectories
    // of every directory on its path) rather than all of one large directory's.
    while ahead.has_room() && frame.ahead_asked.len() < LISTINGS_AHEAD_PER_DIR {
        let i = frame.ahead_seen;
        let Some(next) = frame.entries.as_slice().get(i - frame.taken) else { return };
        frame.ahead_seen += 1;
        let Ok(entry) = next else { continue };
        let name = entry.file_name();
        let remote_dir = listing.get(name.as_bytes()).is_some_and(|e| e.kind == EntryKind::Dir);
        if remote_dir && entry.file_type().is_ok_and(|t| t.is_dir()) {
            ahead.ask(join(target, &join(&frame.rel, name.as_bytes())));
            frame.ahead_asked.push_back(i);
        }
    }
}

/// A local file to send.
struct PushFile {
    src: PathBuf,
    /// Wire path of the destination.
    remote: Vec<u8>,
    dir: Option<usize>,
    /// `-H`: the source's (dev, ino), when this is the first name of an inode with several.
    link: Option<(u64, u64)>,
}

/// A large file sent in ranges by several workers; the last range to finish ends the transfer.
struct BigPush {
    file: PushFile,
    fd: File,
    pub(super) id: u64,
    /// The server holds ranges of an earlier run: each range is offered by digest (`PutCheck`) before it is sent.
    check_first: bool,
    /// (size, mtime) when it was opened: the source changed if they differ at the end.
    stamp: (u64, i64, i64),
    md: Metadata,
    ranges_left: AtomicUsize,
    failure: Mutex<Option<String>>,
}

enum PushTask {
    Whole(PushFile),
    Range { big: Arc<BigPush>, offset: u64, len: u64 },
}

impl PoolTask for PushTask {
    /// A push task is a name to read later: enough of them wait for a stream to fill a batch of small files.
    const QUEUED_PER_STREAM: usize = 16;

    fn batchable(&self) -> bool {
        matches!(self, PushTask::Whole(_))
    }
}

/// What push workers need to know.
struct PushCfg {
    follow: bool,
    fsync: bool,
    /// -X: extended attributes are read and sent (`PutXattrs`, `SetXattrs`).
    xattrs: bool,
}

/// A remote directory to finish: its wire path and the source's owner, permissions and mtime.
struct RemoteDir {
    remote: Vec<u8>,
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, u32),
    /// -X: the source directory's extended attributes.
    xattrs: Xattrs,
    apply: bool,
}

/// A remote directory with entries the source does not have (deleted after the transfers).
struct RemoteDelete {
    rel: Vec<u8>,
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, u32),
    names: Vec<(Vec<u8>, EntryKind)>,
}

/// One open level of the local walk.
struct PushFrame {
    /// The source directory's entries not walked yet, read whole when it is entered (their order is the walk's, and
    /// the listings of the subdirectories among them are read ahead in that order).
    entries: std::vec::IntoIter<io::Result<fs::DirEntry>>,
    /// Entries taken from `entries` so far.
    taken: usize,
    /// Entries considered for reading ahead so far (from the first).
    ahead_seen: usize,
    /// The entries (by index) whose listings were asked for and that the walk has not reached yet.
    ahead_asked: VecDeque<usize>,
    src: PathBuf,
    rel: Vec<u8>,
    node: usize,
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, u32),
    /// The remote twin's entries not yet matched by a source entry (`None`: not listed).
    remote: Option<HashMap<Vec<u8>, EntryMeta>>,
    /// The remote directory did not exist: nothing in it needs comparing.
    fresh: bool,
    key: (u64, u64),
}

struct PushCore<'a> {
    run: Run<'a>,
    addr: String,
    /// Wire path of the destination root.
    target: Vec<u8>,
    ctl: Connection,
    dirs: Dirs<RemoteDir>,
    deletes: Vec<RemoteDelete>,
    look_dst: bool,
    /// Streams the pool runs now (ranges of large files are cut for them).
    streams: Arc<Scaler>,
    /// `-H`: inodes with several names seen so far, by the local (dev, ino), with the first name's wire path.
    links: HashMap<(u64, u64), LinkState<Vec<u8>>>,
    /// Dials the control connection again when it breaks ([`PushCore::ctl_do`]).
    dialer: Arc<Dialer>,
    /// A push to this destination was interrupted (its run marker is a dead process's): every destination directory
    /// visited is cleaned of what it may have left ([`PushCore::clean_remote_dir`]).
    clean_parts: bool,
    /// The destination listings of the directories the walk enters next, read ahead (when they are compared).
    ahead: Option<ListAhead>,
    /// Finished directories whose metadata is to be set ([`PushCore::flush_dir_metas`]).
    dir_metas: Vec<RemoteDir>,
    /// Remote directories made ahead of the walk ([`PushCore::make_subdirs`]), until it enters them.
    premade: HashSet<Vec<u8>>,
}

pub(super) struct Push<'a> {
    core: PushCore<'a>,
    pool: Pool<PushTask>,
}

fn md_mtime(md: &Metadata) -> (i64, u32) {
    (md.mtime(), md.mtime_nsec() as u32)
}

fn open_src(path: &Path, follow: bool) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(if follow { libc::O_CLOEXEC } else { libc::O_NOFOLLOW | libc::O_CLOEXEC })
        .open(path)
}

fn stamp(md: &Metadata) -> (u64, i64, i64) {
    (md.size(), md.mtime(), md.mtime_nsec())
}

impl<'a> Push<'a> {
    pub(super) fn run(
        src: &Path,
        remote: Remote,
        opts: &'a CopyOptions,
        net: &NetOptions,
        dialer: Arc<Dialer>,
    ) -> Result<Summary, Failure> {
        let lmd =
            fs::symlink_metadata(src).map_err(|e| Failure::Fatal(format!("cannot stat '{}': {e}", src.shown())))?;
        // The root is followed when it is a symlink to a directory, or with -L (as for a local copy).
        let md = if lmd.file_type().is_symlink() {
            match fs::metadata(src) {
                Ok(m) if m.is_dir() || opts.dereference => m,
                Ok(_) => lmd,
                Err(e) if opts.dereference => {
                    return Err(Failure::Fatal(format!("cannot follow '{}': {e}", src.shown())));
                }
                Err(_) => lmd,
            }
        } else {
            lmd
        };
        let mut ctl = dial(&dialer)?;
        if ctl.read_only && !opts.dry_run {
            return Err(Failure::Fatal(format!(
                "the server at {} is read-only (serve --read-only); nothing was written",
                remote.addr
            )));
        }
        let addr = remote.addr.clone();
        let stat = |ctl: &mut Connection, path: &[u8]| {
            ctl.stat(path).map_err(|e| match e {
                ReqError::Broken(m) => Failure::Fatal(m),
                ReqError::Server { message, .. } => {
                    Failure::Fatal(format!("cannot stat '{}': {message}", url_of(&addr, path)))
                }
            })
        };
        let base = stat(&mut ctl, &remote.path)?;
        let (target, twin) = if md.is_dir() {
            if base.as_ref().is_some_and(|b| b.kind != EntryKind::Dir) {
                return Err(Failure::Usage(format!(
                    "cannot overwrite non-directory '{}' with directory '{}'",
                    remote.display(b""),
                    src.shown()
                )));
            }
            (remote.path.clone(), base)
        } else {
            let into_dir = remote.trailing_slash
                || remote.path.is_empty()
                || base.as_ref().is_some_and(|b| b.kind == EntryKind::Dir);
            if into_dir {
                let name =
                    src.file_name().ok_or_else(|| Failure::Usage(format!("'{}' has no file name", src.shown())))?;
                let target = join(&remote.path, name.as_bytes());
                let twin = stat(&mut ctl, &target)?;
                (target, twin)
            } else {
                (remote.path.clone(), base)
            }
        };
        if !md.is_dir() && twin.as_ref().is_some_and(|t| t.kind == EntryKind::Dir) {
            return Err(Failure::Usage(format!(
                "cannot overwrite directory '{}' with non-directory '{}'",
                url_of(&remote.addr, &target),
                src.shown()
            )));
        }
        if !md.is_dir() && twin.as_ref().is_some_and(|t| t.kind == EntryKind::Other) {
            return Err(Failure::Usage(format!(
                "refusing to replace '{}', a special file (device, FIFO or socket), with '{}': name a regular file \
                 or a directory",
                url_of(&remote.addr, &target),
                src.shown()
            )));
        }
        let streams = net.streams.max(1);
        let conns = if opts.dry_run {
            Vec::new()
        } else {
            dialer.dial_n(streams).map_err(|e| Failure::Fatal(e.to_string()))?
        };
        let mut run = Run::new(opts, streams);
        run.verbose = net.verbose;
        // As a local copy does (see `stale`): a marker per destination, and cleaning after a dead run.
        let marker = if opts.dry_run {
            None
        } else {
            let dir = if md.is_dir() { target.as_slice() } else { url::parent(&target) };
            stale::RunMarker::start_for(url_of(&remote.addr, dir).as_bytes())
        };
        let clean_parts = marker.as_ref().is_some_and(|m| m.dead_runs_found());
        let cfg = Arc::new(PushCfg { follow: opts.dereference, fsync: opts.fsync, xattrs: opts.preserve.xattrs });
        let work: Arc<Work<PushTask>> = Arc::new(move |stream, tasks, done| push_tasks(stream, &cfg, tasks, done));
        let pool = Pool::start(conns, &dialer, run.stop.clone(), work, net.adaptive.then_some(net.streams_max));
        let look_dst = opts.sync.is_some() || run.itemizer.enabled;
        let mut push = Push {
            core: PushCore {
                run,
                addr: remote.addr.clone(),
                target,
                ctl,
                dirs: Dirs::new(),
                deletes: Vec::new(),
                look_dst,
                streams: pool.scaler.clone(),
                links: HashMap::new(),
                dialer: dialer.clone(),
                clean_parts,
                ahead: (look_dst && md.is_dir()).then(|| ListAhead::start(dialer.clone())),
                dir_metas: Vec::new(),
                premade: HashSet::new(),
            },
            pool,
        };
        if push.core.make_parents() && !push.core.run.halted() {
            if !md.is_dir() && clean_parts {
                let parent = url::parent(&push.core.target).to_vec();
                push.core.clean_remote_dir(&parent, None);
            }
            if md.is_dir() {
                push.walk(src, &md, twin);
            } else {
                let rel = push.core.target.rsplit(|&b| b == b'/').next().unwrap_or_default().to_vec();
                let remote_path = push.core.target.clone();
                push.entry(src, &rel, remote_path, &md, None, twin, false);
            }
        }
        let Push { mut core, mut pool } = push;
        core.run.summary.streams = pool.finish(&mut |d| core.on_event(d));
        core.flush_dir_metas();
        if md.is_dir() && core.run.may_delete() {
            core.delete_pass();
        }
        let PushCore { run, ctl, .. } = core;
        ctl.bye();
        // Only an interrupted or broken run leaves partial files on the server (failed files remove theirs).
        if let Some(m) = marker.filter(|_| run.fatal.is_none() && run.interrupted.is_none())
            && interrupt::received().is_none()
        {
            m.finish();
        }
        run.finish()
    }

    /// Walk the local tree depth-first, one open directory per level.
    fn walk(&mut self, src: &Path, md: &Metadata, twin: Option<EntryMeta>) {
        let c = &mut self.core;
        let Some(root) = c.open_dir(src, b"", md, None, twin.as_ref(), false) else { return };
        let mut stack = vec![root];
        while let Some(frame) = stack.last_mut() {
            if self.core.run.halted() {
                return;
            }
            let core = &mut self.core;
            self.pool.poll(&mut |d| core.on_event(d));
            core.keepalive();
            if let Some(ahead) = core.ahead.as_mut() {
                read_ahead(ahead, &core.target, frame);
            }
            let next = frame.entries.next();
            frame.taken += 1;
            let entry = match next {
                None | Some(Err(_)) => {
                    if let Some(Err(e)) = next {
                        let msg = format!("cannot read directory '{}': {e}", frame.src.shown());
                        self.core.run.fail(msg);
                    }
                    let frame = stack.pop().expect("non-empty");
                    self.core.close_dir(frame);
                    continue;
                }
                Some(Ok(e)) => e,
            };
            let name = entry.file_name();
            let path = entry.path();
            let rel = join(&frame.rel, name.as_bytes());
            let twin = frame.remote.as_mut().and_then(|m| m.remove(name.as_bytes()));
            let (node, fresh) = (frame.node, frame.fresh);
            // Not following a symlink, the entry is looked up relative to its directory (no walk of the whole path).
            let md = if self.core.run.opts.dereference { fs::metadata(&path) } else { entry.metadata() };
            let md = match md {
                Ok(md) => md,
                Err(e) => {
                    self.core.run.fail(format!("cannot stat '{}': {e}", path.shown()));
                    continue;
                }
            };
            if sync::excluded(&self.core.run.opts.filter, url::os_path(&rel), md.is_dir()) {
                self.core.run.summary.excluded += 1;
                continue;
            }
            if md.is_dir() {
                let key = (md.dev(), md.ino());
                if stack.iter().any(|f| f.key == key) {
                    self.core.run.fail(format!("symlink loop: '{}' is its own ancestor; not followed", path.shown()));
                    continue;
                }
                if let Some(f) = self.core.open_dir(&path, &rel, &md, Some(node), twin.as_ref(), fresh) {
                    stack.push(f);
                }
            } else {
                let remote = join(&self.core.target, &rel);
                self.entry(&path, &rel, remote, &md, Some(node), twin, fresh);
            }
        }
    }

    /// A non-directory entry.
    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        src: &Path,
        rel: &[u8],
        remote: Vec<u8>,
        md: &Metadata,
        dir: Option<usize>,
        twin: Option<EntryMeta>,
        fresh: bool,
    ) {
        let c = &mut self.core;
        let ft = md.file_type();
        if !(ft.is_file() || ft.is_symlink()) {
            c.run.skip_special(&src.shown().to_string());
            return;
        }
        let twin = if fresh { None } else { twin };
        let twin = match twin {
            Some(t) if t.kind == EntryKind::Dir => {
                if !c.replace_remote(&remote, true) {
                    return;
                }
                None
            }
            t => t,
        };
        if ft.is_symlink() {
            return c.symlink(src, rel, &remote, md, twin.as_ref());
        }
        if let (Some(sync), Some(t)) = (c.run.sync, twin.as_ref().filter(|t| t.kind == EntryKind::File)) {
            let local = Facts::of(md);
            match sync::verdict(sync, local, facts(t)) {
                Verdict::Unchanged => return c.unchanged(rel, &remote, md, t),
                Verdict::Skip => {
                    c.run.summary.unchanged += 1;
                    return;
                }
                Verdict::CompareDigests => {
                    // --checksum: the server hashes its copy (the control connection is free between listings).
                    let local = hash_local(open_src(src, c.run.opts.dereference));
                    let theirs = c.ctl_do(|conn| conn.hash(&remote, 0, u64::MAX));
                    match same_content(local, theirs, &src.shown().to_string(), &url_of(&c.addr, &remote)) {
                        Ok(true) => return c.unchanged(rel, &remote, md, t),
                        Ok(false) => {}
                        Err(Compared::Failed(m)) => return c.run.fail(m),
                        Err(Compared::Broken(m)) => return c.run.broken(m),
                    }
                }
                Verdict::Transfer => {}
            }
        }
        c.run.item(if twin.is_some() { Change::Update } else { Change::Copy }, rel, false);
        let key = (c.run.opts.hard_links && md.nlink() > 1).then(|| (md.dev(), md.ino()));
        if !c.transfer_first(key, &remote, dir) {
            return;
        }
        if c.run.opts.dry_run {
            c.run.summary.files += 1;
            c.run.summary.bytes += md.size();
            return;
        }
        c.run.progress.add_total(md.size());
        c.dirs.add(dir);
        let file = PushFile { src: src.to_path_buf(), remote, dir, link: key };
        if ranges(md.size(), c.streams.split_for()).is_none() {
            let core = &mut self.core;
            self.pool.send(PushTask::Whole(file), &mut |d| core.on_event(d));
            return;
        }
        // A large file: opened here, begun on the control connection, its ranges spread over the workers.
        let opened = open_src(&file.src, c.run.opts.dereference).and_then(|fd| Ok((fd.metadata()?, fd)));
        let (omd, fd) = match opened {
            Ok((m, _)) if !m.is_file() => {
                c.run.fail(format!("'{}' is no longer a regular file; not copied", src.shown()));
                return c.file_done(dir, false);
            }
            Ok(x) => x,
            Err(e) => {
                c.run.fail(format!("cannot open '{}': {e}", src.shown()));
                return c.file_done(dir, false);
            }
        };
        let parts = ranges(omd.size(), c.streams.split_for()).unwrap_or_else(|| vec![(0, omd.size())]);
        let id = next_id();
        // Resumable: what an interrupted run of this file left on the server is checked range by range.
        let (size, mode, mtime) = (omd.size(), omd.mode() & 0o7777, md_mtime(&omd));
        let mut again = false;
        let resumed = c.ctl_do(|conn| {
            // Sent again on a new connection: what the first one may have begun is dropped first.
            if std::mem::replace(&mut again, true)
                && let Err(ReqError::Broken(m)) = conn.put_abort(id)
            {
                return Err(ReqError::Broken(m));
            }
            conn.put_resume(id, &file.remote, size, mode, mtime)
        });
        let recorded = match resumed {
            Ok(bytes) => bytes,
            Err(e) => {
                let shown = url_of(&c.addr, &file.remote);
                c.run.req_failed(e, |m| format!("cannot write '{shown}': {m}"));
                return c.file_done(dir, false);
            }
        };
        let big = Arc::new(BigPush {
            file,
            fd,
            id,
            check_first: recorded > 0,
            stamp: stamp(&omd),
            md: omd,
            ranges_left: AtomicUsize::new(parts.len()),
            failure: Mutex::new(None),
        });
        for (offset, len) in parts {
            let core = &mut self.core;
            // Ctrl-C stops a large file between ranges: the ranges sent finish, the server keeps the part for a rerun.
            if core.run.halted() {
                return;
            }
            if !self.pool.send(PushTask::Range { big: big.clone(), offset, len }, &mut |d| core.on_event(d)) {
                return;
            }
        }
    }
}

impl<'a> Tally<'a> for PushCore<'a> {
    type Name = Vec<u8>;
    type Dir = RemoteDir;

    fn run(&mut self) -> &mut Run<'a> {
        &mut self.run
    }

    fn links(&mut self) -> &mut HashMap<(u64, u64), LinkState<Vec<u8>>> {
        &mut self.links
    }

    fn dirs(&mut self) -> &mut Dirs<RemoteDir> {
        &mut self.dirs
    }

    fn shown(&self, name: &Vec<u8>) -> String {
        self.url(name)
    }

    /// `-H`: remote `path` becomes another name of `first` (already on the server).
    fn link(&mut self, path: &Vec<u8>, first: &Vec<u8>) {
        if self.run.opts.dry_run {
            self.run.summary.hardlinks += 1;
            return;
        }
        match self.ctl_do(|conn| conn.link(path, first)) {
            Ok(()) => self.run.summary.hardlinks += 1,
            Err(e) => {
                let (shown, to) = (self.url(path), self.url(first));
                self.run.req_failed(e, |m| format!("cannot link '{shown}' to '{to}': {m}"));
            }
        }
    }

    /// Finished directories get their metadata: queued, and sent [`DIR_METAS_BATCH`] at a time in one pipelined
    /// burst ([`PushCore::flush_dir_metas`]) rather than a round trip each; nothing changes in a finished directory
    /// any more, so a later `SetMeta` sets the same thing.
    fn finish_dirs(&mut self, finished: Vec<RemoteDir>) {
        for d in finished {
            if !d.apply || self.run.fatal.is_some() {
                continue;
            }
            if !d.xattrs.is_empty()
                && let Err(e) = self.ctl_do(|conn| conn.set_xattrs(&d.remote, d.xattrs.clone()))
            {
                let shown = self.url(&d.remote);
                self.run.req_failed(e, |m| format!("cannot set extended attributes on '{shown}': {m}"));
            }
            self.dir_metas.push(d);
        }
        if self.dir_metas.len() >= DIR_METAS_BATCH {
            self.flush_dir_metas();
        }
    }
}

/// Directories whose `SetMeta` requests go out together, at most.
const DIR_METAS_BATCH: usize = 64;

impl PushCore<'_> {
    /// Send the queued directories' `SetMeta`s back to back and read the answers; what a broken connection left
    /// unanswered goes again one by one ([`PushCore::ctl_do`] dials again).
    fn flush_dir_metas(&mut self) {
        let dirs = std::mem::take(&mut self.dir_metas);
        if dirs.is_empty() || self.run.fatal.is_some() {
            return;
        }
        let msgs: Vec<Msg> = dirs
            .iter()
            .map(|d| {
                let (uid, gid) = d.owner;
                let path = d.remote.clone();
                Msg::SetMeta { path, mode: d.mode, uid, gid, mtime_sec: d.mtime.0, mtime_nsec: d.mtime.1 }
            })
            .collect();
        // One request per group.
        let (answers, broke) = self.ctl.pipeline_groups(&msgs.chunks(1).collect::<Vec<_>>());
        let failed = |c: &mut Self, d: &RemoteDir, e: ReqError| {
            let shown = c.url(&d.remote);
            c.run.req_failed(e, |m| format!("cannot set permissions and times on '{shown}': {m}"));
        };
        for (d, answer) in dirs.iter().zip(&answers) {
            if let Err((_, e)) = answer {
                failed(self, d, e.clone());
            }
        }
        if broke.is_some() {
            for d in &dirs[answers.len()..] {
                if let Err(e) = self.ctl_do(|conn| conn.set_meta(&d.remote, d.mode, d.owner, d.mtime)) {
                    failed(self, d, e);
                }
            }
        }
    }

    fn url(&self, wire: &[u8]) -> String {
        url_of(&self.addr, wire)
    }

    /// Run control request `op`; when its connection breaks, dial again (a fresh handshake) and send it again, up to
    /// [`STREAM_ATTEMPTS_MAX`] attempts with a warning each time. Every control request of a push can be sent twice:
    /// creating a directory or a link, setting metadata, deleting (a missing path is done), listing one directory
    /// (read whole before it is used), hashing; `PutResume` is made so by aborting its id first.
    fn ctl_do<R>(&mut self, mut op: impl FnMut(&mut Connection) -> Result<R, ReqError>) -> Result<R, ReqError> {
        let mut attempt = 1;
        loop {
            let r = op(&mut self.ctl);
            let Err(ReqError::Broken(cause)) = &r else { return r };
            if attempt >= STREAM_ATTEMPTS_MAX || self.run.stop.load(Ordering::Acquire) {
                return r;
            }
            std::thread::sleep(RETRY_BACKOFF_FIRST * 2u32.saturating_pow(attempt - 1));
            attempt += 1;
            match self.dialer.dial() {
                Ok(conn) => {
                    self.ctl = conn;
                    self.run.warn(&format!(
                        "control connection: {cause}; reconnected, trying again (attempt {attempt} of \
                         {STREAM_ATTEMPTS_MAX})"
                    ));
                }
                Err(e) => return Err(ReqError::Broken(format!("{cause}; reconnecting failed: {e}"))),
            }
        }
    }

    fn on_event(&mut self, e: Option<Done>) {
        match e {
            Some(d) => self.on_done(d),
            None => self.keepalive(),
        }
    }

    /// Keep the control connection from being dropped as idle while the workers do the work.
    fn keepalive(&mut self) {
        if self.run.fatal.is_none()
            && let Err(e) = self.ctl_do(|conn| conn.keepalive())
        {
            self.run.broken(e.to_string());
        }
    }

    /// Create the destination's parent directories (existing ones are fine). False when one failed (reported).
    fn make_parents(&mut self) -> bool {
        if self.run.opts.dry_run {
            return true;
        }
        let target = self.target.clone();
        let parts: Vec<&[u8]> = target.split(|&b| b == b'/').collect();
        let mut path = Vec::new();
        for p in parts.iter().take(parts.len().saturating_sub(1)) {
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(p);
            if let Err(e) = self.ctl_do(|conn| conn.mkdir(&path, 0o755)) {
                let shown = self.url(&path);
                self.run.req_failed(e, |m| format!("cannot create directory '{shown}': {m}"));
                return false;
            }
        }
        true
    }

    /// The remote entries of directory `remote`, by name (`None` when it cannot be listed; reported).
    fn list_dir(&mut self, remote: &[u8]) -> Option<HashMap<Vec<u8>, EntryMeta>> {
        let mut out = HashMap::new();
        let mut refused = Vec::new();
        // The whole directory is read before any of it is used, so a listing cut short is simply asked for again.
        let listed = match self.ahead.as_mut().and_then(|a| a.take(remote)) {
            Some(listing) => Ok(listing),
            None => self.ctl_do(|conn| read_listing(conn, remote)),
        };
        let (entries, failed) = match listed {
            Ok(l) => l,
            Err(e) => {
                self.run.broken(e.to_string());
                return None;
            }
        };
        for e in entries {
            if e.path.contains(&b'/') || safe_components(&e.path).map_or(true, |c| c.len() != 1) {
                refused.push(e.path);
            } else if !stale::is_temporary(OsStr::from_bytes(&e.path)) {
                out.insert(e.path.clone(), e);
            }
        }
        for p in refused {
            let m =
                format!("refused entry '{}' listed by {} in '{}': not a name", p.shown(), self.addr, self.url(remote));
            self.run.fail(m);
        }
        match failed {
            None => Some(out),
            Some(ReqError::Server { code: code::NOT_FOUND, .. }) => Some(HashMap::new()),
            Some(e) => {
                let shown = self.url(remote);
                self.run.req_failed(e, |m| format!("cannot list '{shown}': {m}"));
                None
            }
        }
    }

    /// Create the remote twin of a source directory and start walking it. `None` when it failed (reported).
    fn open_dir(
        &mut self,
        src: &Path,
        rel: &[u8],
        md: &Metadata,
        parent: Option<usize>,
        twin: Option<&EntryMeta>,
        parent_fresh: bool,
    ) -> Option<PushFrame> {
        let remote = join(&self.target, rel);
        let twin = if parent_fresh { None } else { twin };
        if twin.is_some_and(|t| t.kind != EntryKind::Dir) && !self.replace_remote(&remote, false) {
            return None;
        }
        let exists = twin.is_some_and(|t| t.kind == EntryKind::Dir);
        // Without a listing (a plain copy) nothing is compared: `Mkdir` accepts an existing directory.
        let fresh = parent_fresh || (self.look_dst && !exists);
        if fresh && !rel.is_empty() {
            self.run.item(Change::Mkdir, rel, true);
        }
        // A directory the parent's listing showed is there already, or that was made with its siblings
        // ([`PushCore::make_subdirs`]): no `Mkdir` round trip for it.
        let made = self.premade.remove(&remote);
        if !self.run.opts.dry_run
            && !exists
            && !made
            && let Err(e) = self.ctl_do(|conn| conn.mkdir(&remote, 0o700))
        {
            let shown = self.url(&remote);
            self.run.req_failed(e, |m| format!("cannot create directory '{shown}': {m}"));
            return None;
        }
        if self.clean_parts && !fresh && !self.run.opts.dry_run {
            self.clean_remote_dir(&remote, Some(src));
        }
        let listing = if self.look_dst && !fresh { self.list_dir(&remote) } else { None };
        if self.run.fatal.is_some() {
            return None;
        }
        let entries: Vec<_> = match fs::read_dir(src) {
            Ok(it) => it.collect(),
            Err(e) => {
                self.run.fail(format!("cannot open directory '{}': {e}", src.shown()));
                return None;
            }
        };
        if !self.run.opts.dry_run && (listing.is_some() || fresh || !self.look_dst) {
            self.make_subdirs(rel, &entries, listing.as_ref());
        }
        let (mode, owner, mtime) = (md.mode() & 0o7777, (md.uid(), md.gid()), md_mtime(md));
        let xattrs = match self.run.opts.preserve.xattrs.then(|| crate::meta::read_xattrs(src)) {
            Some(Err(e)) => {
                self.run.fail(format!("cannot read extended attributes of '{}': {e}", src.shown()));
                Vec::new()
            }
            Some(Ok(x)) => x,
            None => Vec::new(),
        };
        let apply = !self.run.opts.dry_run;
        let node = self.dirs.open(parent, RemoteDir { remote, mode, owner, mtime, xattrs, apply });
        self.run.summary.directories += 1;
        Some(PushFrame {
            entries: entries.into_iter(),
            taken: 0,
            ahead_seen: 0,
            ahead_asked: VecDeque::new(),
            src: src.to_path_buf(),
            rel: rel.to_vec(),
            node,
            mode,
            owner,
            mtime,
            remote: listing,
            fresh,
            key: (md.dev(), md.ino()),
        })
    }

    /// Create the remote twins of the source subdirectories in `entries` (of directory `rel`) that the remote side
    /// lacks — all the listing does not show, or all when nothing was listed (a new directory, or a plain copy, where
    /// `Mkdir` accepts what is there) — in one burst of requests rather than a round trip each as the walk enters
    /// them. What fails here is made again, and reported, when the walk gets there; symlinks (`-L`) and excluded
    /// directories are left to the walk.
    fn make_subdirs(
        &mut self,
        rel: &[u8],
        entries: &[io::Result<fs::DirEntry>],
        listing: Option<&HashMap<Vec<u8>, EntryMeta>>,
    ) {
        let paths: Vec<Vec<u8>> = entries
            .iter()
            .filter_map(|e| e.as_ref().ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name())
            .filter(|name| listing.is_none_or(|l| !l.contains_key(name.as_bytes())))
            .map(|name| join(rel, name.as_bytes()))
            .filter(|child| !sync::excluded(&self.run.opts.filter, url::os_path(child), true))
            .map(|child| join(&self.target, &child))
            .collect();
        if paths.len() < 2 {
            return;
        }
        let msgs: Vec<Msg> = paths.iter().map(|p| Msg::Mkdir { path: p.clone(), mode: 0o700 }).collect();
        // One request per group.
        let (answers, _) = self.ctl.pipeline_groups(&msgs.chunks(1).collect::<Vec<_>>());
        for (path, answer) in paths.into_iter().zip(answers) {
            if answer.is_ok() {
                self.premade.insert(path);
            }
        }
    }

    /// After an interrupted push: the server removes what dead processes left in `remote` (`Clean`), and the partial
    /// files there whose source file is gone from `src` (`DropParts`; `None`: a single file is pushed, whose own part
    /// the run resumes or restarts). A live transfer's files are never touched (the server knows which are live).
    fn clean_remote_dir(&mut self, remote: &[u8], src: Option<&Path>) {
        let shown = self.url(remote);
        let names = match self.ctl_do(|conn| conn.clean(remote)) {
            Ok(n) => n,
            Err(e) => return self.run.req_failed(e, |m| format!("cannot clean '{shown}': {m}")),
        };
        let Some(src) = src else { return };
        // As a local copy decides (`stale::clean_dir`): the source is a file (followed) or the part is stale.
        let gone: Vec<Vec<u8>> = names
            .into_iter()
            .filter(|n| !fs::metadata(src.join(OsStr::from_bytes(n))).is_ok_and(|m| m.is_file()))
            .collect();
        if gone.is_empty() {
            return;
        }
        match self.ctl_do(|conn| conn.drop_parts(remote, gone.clone())) {
            Ok(removed) => self.run.summary.stale_removed += removed.len() as u64,
            Err(e) => self.run.req_failed(e, |m| format!("cannot clean '{shown}': {m}")),
        }
    }

    /// Every entry of the directory was handed out: note what the remote has in excess, finish it when done.
    fn close_dir(&mut self, frame: PushFrame) {
        if self.run.delete
            && let Some(left) = frame.remote
        {
            let mut names: Vec<(Vec<u8>, EntryKind)> = left
                .into_iter()
                .filter(|(name, e)| {
                    let rel = join(&frame.rel, name);
                    !sync::excluded(&self.run.opts.filter, url::os_path(&rel), e.kind == EntryKind::Dir)
                })
                .map(|(name, e)| (name, e.kind))
                .collect();
            if !names.is_empty() {
                names.sort_by(|a, b| a.0.cmp(&b.0));
                let (rel, mode, owner, mtime) = (frame.rel.clone(), frame.mode, frame.owner, frame.mtime);
                self.deletes.push(RemoteDelete { rel, mode, owner, mtime, names });
            }
        }
        let mut finished = Vec::new();
        self.dirs.walked(frame.node, &mut finished);
        self.finish_dirs(finished);
    }

    /// Something of another type is where an entry must go: `sync --delete` removes it, otherwise it is reported.
    fn replace_remote(&mut self, remote: &[u8], for_file: bool) -> bool {
        if !self.run.delete {
            let what = if for_file { "a directory" } else { "a non-directory" };
            let m = format!(
                "cannot replace {what} at '{}' (the source has another type there; sync --delete replaces it)",
                self.url(remote)
            );
            self.run.fail(m);
            return false;
        }
        if self.run.opts.dry_run {
            return true;
        }
        match self.ctl_do(|conn| conn.delete(remote)) {
            Ok(()) => {
                self.run.summary.deleted += 1;
                true
            }
            Err(e) => {
                let shown = self.url(remote);
                self.run.req_failed(e, |m| format!("cannot delete '{shown}': {m}"));
                false
            }
        }
    }

    fn symlink(&mut self, src: &Path, rel: &[u8], remote: &[u8], md: &Metadata, twin: Option<&EntryMeta>) {
        let target = match fs::read_link(src) {
            Ok(t) => t,
            Err(e) => return self.run.fail(format!("cannot read symlink '{}': {e}", src.shown())),
        };
        let target = target.as_os_str().as_bytes();
        if self.run.sync.is_some() && twin.is_some_and(|t| t.kind == EntryKind::Symlink && t.target == target) {
            self.run.summary.unchanged += 1;
            return;
        }
        self.run.item(if twin.is_some() { Change::Update } else { Change::Copy }, rel, false);
        if self.run.opts.dry_run {
            self.run.summary.symlinks += 1;
            return;
        }
        match self.ctl_do(|conn| conn.symlink(remote, target, (md.uid(), md.gid()), md_mtime(md))) {
            Ok(()) => self.run.summary.symlinks += 1,
            Err(e) => {
                let shown = self.url(remote);
                self.run.req_failed(e, |m| format!("cannot create symlink '{shown}': {m}"));
            }
        }
    }

    /// A remote file that is already right: fix its permissions and mtime if they differ.
    fn unchanged(&mut self, rel: &[u8], remote: &[u8], md: &Metadata, twin: &EntryMeta) {
        self.run.summary.unchanged += 1;
        // -H: the inode's other names link to this one, which is in place.
        if self.run.opts.hard_links && md.nlink() > 1 {
            self.in_place((md.dev(), md.ino()), remote.to_vec());
        }
        let mode = md.mode() & 0o7777;
        if mode == twin.mode && md_mtime(md) == mtime_of(twin) {
            return;
        }
        self.run.item(Change::Attrs, rel, false);
        if self.run.opts.dry_run {
            return;
        }
        match self.ctl_do(|conn| conn.set_meta(remote, mode, (md.uid(), md.gid()), md_mtime(md))) {
            Ok(()) => self.run.summary.attrs_updated += 1,
            Err(e) => {
                let shown = self.url(remote);
                self.run.req_failed(e, |m| format!("cannot set permissions and times on '{shown}': {m}"));
            }
        }
    }

    /// Count (and itemize, children first) the entries of remote directory `path` (shown as `rel`).
    fn remote_subtree(&mut self, path: &[u8], rel: &[u8], itemize: bool) -> Result<u64, ReqError> {
        let mut stream = self.ctl.list(path, true)?;
        let mut count = 0;
        // Directories being listed (pre-order): each is itemized once the listing leaves it.
        let mut open: Vec<Vec<u8>> = Vec::new();
        let mut failed = None;
        while let Some(r) = stream.next_entry() {
            let e = match r {
                Ok(e) => e,
                Err(e) => {
                    failed = Some(e);
                    continue;
                }
            };
            if safe_components(&e.path).is_err() || e.path.is_empty() {
                continue;
            }
            count += 1;
            if !itemize {
                continue;
            }
            while let Some(top) = open.last() {
                if e.path.starts_with(top) && e.path.get(top.len()) == Some(&b'/') {
                    break;
                }
                let top = open.pop().expect("non-empty");
                self.run.item(Change::Delete, &join(rel, &top), true);
            }
            if e.kind == EntryKind::Dir {
                open.push(e.path);
            } else {
                self.run.item(Change::Delete, &join(rel, &e.path), false);
            }
        }
        while let Some(top) = open.pop() {
            self.run.item(Change::Delete, &join(rel, &top), true);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// `sync --delete`: remove the remote entries the source does not have, now that every transfer succeeded.
    fn delete_pass(&mut self) {
        let recs = std::mem::take(&mut self.deletes);
        if let Some(max) = self.run.sync.and_then(|s| s.max_delete) {
            let mut count = 0;
            for rec in &recs {
                for (name, kind) in &rec.names {
                    count += 1;
                    if *kind == EntryKind::Dir {
                        let path = join(&self.target, &join(&rec.rel, name));
                        match self.remote_subtree(&path, b"", false) {
                            Ok(n) => count += n,
                            Err(e) => {
                                let shown = self.url(&path);
                                return self.run.req_failed(e, |m| format!("cannot list '{shown}': {m}"));
                            }
                        }
                    }
                }
            }
            if count > max {
                let m = format!(
                    "--max-delete {max}: {count} entries would be deleted from '{}'; nothing was deleted",
                    self.url(&self.target)
                );
                return self.run.fail(m);
            }
        }
        for rec in recs {
            for (name, kind) in &rec.names {
                let rel = join(&rec.rel, name);
                let path = join(&self.target, &rel);
                let mut n = 1;
                if *kind == EntryKind::Dir {
                    match self.remote_subtree(&path, &rel, true) {
                        Ok(k) => n += k,
                        Err(e) => {
                            let shown = self.url(&path);
                            self.run.req_failed(e, |m| format!("cannot list '{shown}': {m}"));
                            if self.run.fatal.is_some() {
                                return;
                            }
                            continue;
                        }
                    }
                }
                self.run.item(Change::Delete, &rel, *kind == EntryKind::Dir);
                if self.run.opts.dry_run {
                    self.run.summary.deleted += n;
                    continue;
                }
                match self.ctl_do(|conn| conn.delete(&path)) {
                    Ok(()) => self.run.summary.deleted += n,
                    Err(ReqError::Server { code: code::NOT_FOUND, .. }) => {}
                    Err(e) => {
                        let shown = self.url(&path);
                        self.run.req_failed(e, |m| format!("cannot delete '{shown}': {m}"));
                        if self.run.fatal.is_some() {
                            return;
                        }
                    }
                }
            }
            if !self.run.opts.dry_run {
                // The deletions changed the directory's mtime: give it back the source's.
                let path = join(&self.target, &rec.rel);
                if let Err(ReqError::Broken(m)) =
                    self.ctl_do(|conn| conn.set_meta(&path, rec.mode, rec.owner, rec.mtime))
                {
                    return self.run.broken(m);
                }
            }
        }
    }
}

/// A worker's turn: runs of whole files go together ([`push_smalls`]), ranges one by one.
fn push_tasks(
    stream: &mut Stream,
    cfg: &PushCfg,
    tasks: Vec<PushTask>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    let whole = |task| match task {
        PushTask::Whole(f) => Ok(f),
        range => Err(range),
    };
    in_runs(stream, tasks, whole, |s, files| push_wholes(s, cfg, files, done), |s, t| push_task(s, cfg, t, done))
}

/// Whole files: one alone, several in batches.
fn push_wholes(
    stream: &mut Stream,
    cfg: &PushCfg,
    files: Vec<PushFile>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    if files.len() > 1 {
        return push_smalls(stream, cfg, files, done);
    }
    files.into_iter().try_for_each(|f| push_task(stream, cfg, PushTask::Whole(f), done))
}

/// One worker task of a push.
fn push_task(stream: &mut Stream, cfg: &PushCfg, task: PushTask, done: &Sender<Done>) -> Result<(), StreamError> {
    match task {
        PushTask::Whole(f) => {
            let result = push_whole(stream, cfg, &f, done, 1)?;
            let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
        }
        PushTask::Range { big, offset, len } => {
            let failed = big.failure.lock().expect("not poisoned").is_some();
            let held = !failed && big.check_first && server_holds(stream, &big, offset, len, done)?;
            if !failed && !held {
                let url = url_of(stream.addr(), &big.file.remote);
                // Ok(false), shorter than when it was opened: the end-of-file check below says "changed".
                if let Err(m) = push_chunks(stream, &big.fd, big.id, offset, len, &url, done)? {
                    big.failure.lock().expect("not poisoned").get_or_insert(format!("cannot write '{url}': {m}"));
                }
            }
            if big.ranges_left.fetch_sub(1, Ordering::AcqRel) == 1 {
                let result = finish_big_push(stream, cfg, &big, done)?;
                let _ = done.send(Done::File { dir: big.file.dir, link: big.file.link, result });
            }
        }
    }
    Ok(())
}

/// Send `[offset, offset + len)` of `fd` as chunks of transfer `id`, one chunk per [`send_range`] call: a chunk whose
/// connection breaks is sent again on a new connection, and the chunks already acknowledged are not (the server's
/// transfer table outlives connections). `Ok(Ok(false))`: the file ended early; `Ok(Err(cause))`: this file failed.
fn push_chunks(
    stream: &mut Stream,
    fd: &File,
    id: u64,
    offset: u64,
    len: u64,
    url: &str,
    done: &Sender<Done>,
) -> Result<Result<bool, String>, StreamError> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let n = (end - at).min(CHUNK);
        let doing = Doing::push(url, &format!("the chunk at byte {at}"));
        match stream.retry(&doing, done, |conn, _| send_range(conn, fd, id, at, n, done).map_err(Broken::new))? {
            Ok(true) => at += n,
            r => return Ok(r),
        }
    }
    Ok(Ok(true))
}

/// BLAKE3 of `[offset, offset + len)` of a local file (all of it must be there).
pub(super) fn hash_range(file: &File, offset: u64, len: u64) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_BYTES_MAX.min(len as usize)];
    let mut at = offset;
    while at < offset + len {
        let n = buf.len().min((offset + len - at) as usize);
        file.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

/// Whether the server already holds `[offset, offset + len)` of a resumed large file (the same BLAKE3 as the local
/// bytes); it then counts as sent. A local read error means "no": the range is sent.
fn server_holds(
    stream: &mut Stream,
    big: &BigPush,
    offset: u64,
    len: u64,
    done: &Sender<Done>,
) -> Result<bool, StreamError> {
    let Ok(digest) = hash_range(&big.fd, offset, len) else { return Ok(false) };
    let url = url_of(stream.addr(), &big.file.remote);
    let doing = Doing::push(&url, &format!("the digest of bytes {offset}..{}", offset + len));
    let held = stream.retry(&doing, done, |conn, _| split(conn.put_check(big.id, offset, len, digest)))?;
    Ok(matches!(held, Ok(true)))
}

/// The last range of a large file is done: end the transfer, or abort it (and send the file again, whole, when
/// it changed meanwhile).
fn finish_big_push(
    stream: &mut Stream,
    cfg: &PushCfg,
    big: &BigPush,
    done: &Sender<Done>,
) -> Result<Result<u8, String>, StreamError> {
    let url = url_of(stream.addr(), &big.file.remote);
    if let Some(m) = big.failure.lock().expect("not poisoned").take() {
        stream.best_effort(|c| c.put_abort(big.id));
        return Ok(Err(m));
    }
    let now = big.fd.metadata().map(|m| stamp(&m)).ok();
    if now != Some(big.stamp) {
        stream.best_effort(|c| c.put_abort(big.id));
        return Ok(push_whole(stream, cfg, &big.file, done, 2)?.map(|r| r + 1));
    }
    let xattrs = match source_xattrs(cfg, &big.file.src) {
        Ok(x) => x,
        Err(m) => {
            stream.best_effort(|c| c.put_abort(big.id));
            return Ok(Err(m));
        }
    };
    match end_transfer(stream, big.id, &big.md, &xattrs, &big.file.remote, &url, cfg.fsync, done)? {
        Ended::Done => Ok(Ok(0)),
        Ended::Failed(m) => Ok(Err(m)),
        Ended::Lost => Ok(push_whole(stream, cfg, &big.file, done, 2)?.map(|r| r + 1)),
    }
}

/// How a `PutEnd` ended.
enum Ended {
    Done,
    /// The server refused it: the failure line.
    Failed(String),
    /// Its connection broke before the answer, and on a new connection the server no longer knows the transfer while
    /// the file is not in place: it must be sent again.
    Lost,
}

/// `PutEnd` for transfer `id` of a file with metadata `md`, sent again on a new connection when its connection breaks.
/// A retry answered "unknown transfer" means the first one may have been carried out: the file counts as done when
/// the remote `path` has its size and mtime.
#[allow(clippy::too_many_arguments)]
fn end_transfer(
    stream: &mut Stream,
    id: u64,
    md: &Metadata,
    xattrs: &Xattrs,
    path: &[u8],
    url: &str,
    fsync: bool,
    done: &Sender<Done>,
) -> Result<Ended, StreamError> {
    let doing = Doing::push(url, "its last step: metadata and rename");
    stream.retry(&doing, done, |conn, attempt| {
        // -X: on the temporary, before it is renamed into place.
        if !xattrs.is_empty() {
            match split(conn.put_xattrs(id, xattrs.clone()))? {
                Ok(()) => {}
                Err(ReqError::Server { code: code::NOT_FOUND, .. }) if attempt > 1 => {}
                Err(e) => return Ok(Ended::Failed(format!("cannot set extended attributes on '{url}': {e}"))),
            }
        }
        end_once(conn, attempt, id, md, path, fsync, &doing)
    })
}

/// One `PutEnd` of [`end_transfer`].
fn end_once(
    conn: &mut Connection,
    attempt: u32,
    id: u64,
    md: &Metadata,
    path: &[u8],
    fsync: bool,
    doing: &Doing,
) -> Result<Ended, Broken> {
    let (mode, mtime) = (md.mode() & 0o7777, md_mtime(md));
    match split(conn.put_end(id, mode, md.uid(), md.gid(), mtime, fsync))? {
        Ok(()) => Ok(Ended::Done),
        Err(ReqError::Server { code: code::NOT_FOUND, .. }) if attempt > 1 => match split(conn.stat(path))? {
            Ok(Some(e)) if e.kind == EntryKind::File && e.size == md.size() && mtime_of(&e) == mtime => Ok(Ended::Done),
            _ => Ok(Ended::Lost),
        },
        Err(e) => Ok(Ended::Failed(format!("{}: {e}", doing.failed))),
    }
}

/// -X: the extended attributes of local `src` (none without -X).
fn source_xattrs(cfg: &PushCfg, src: &Path) -> Result<Xattrs, String> {
    if !cfg.xattrs {
        return Ok(Vec::new());
    }
    crate::meta::read_xattrs(src).map_err(|e| format!("cannot read extended attributes of '{}': {e}", src.shown()))
}

/// `PutAbort`, where a broken connection is the only failure that matters.
fn abort(conn: &mut Connection, id: u64) -> Result<(), Broken> {
    split(conn.put_abort(id)).map(drop)
}

/// Send `[offset, offset + len)` of `fd` as chunks of transfer `id`, the holes of a sparse file as `PutHole`.
/// `Ok(Ok(false))`: the file ended early.
fn send_range(
    conn: &mut Connection,
    fd: &File,
    id: u64,
    offset: u64,
    len: u64,
    done: &Sender<Done>,
) -> Result<Result<bool, String>, String> {
    let end = offset + len;
    let mut at = offset;
    // A sparse file's holes go as `PutHole`, and a chunk stops where the next hole starts.
    let mut walker = sparse::Walker::for_file(fd);
    while at < end {
        let data_end = match walker.as_mut().map(|w| w.next(at, end)) {
            Some(Piece::Hole(hole_end)) => {
                match conn.put_hole(id, at, hole_end - at) {
                    Ok(()) => {}
                    Err(ReqError::Broken(m)) => return Err(m),
                    Err(ReqError::Server { message, .. }) => return Ok(Err(message)),
                }
                let _ = done.send(Done::Bytes(hole_end - at));
                at = hole_end;
                continue;
            }
            Some(Piece::Data(data_end)) => data_end,
            None => end,
        };
        let n = (data_end - at).min(CHUNK) as usize;
        // Read and sent through a buffer, or hashed from the page cache and sent with sendfile (FASTSYNC_ZEROCOPY).
        let got = match zerocopy::put_chunk(conn, id, at, fd, n) {
            Ok(0) => return Ok(Ok(false)),
            Ok(k) => k,
            Err(PutError::Read(e)) => return Ok(Err(format!("read error: {e}"))),
            Err(PutError::Req(ReqError::Broken(m))) => return Err(m),
            Err(PutError::Req(ReqError::Server { message, .. })) => return Ok(Err(message)),
        };
        let _ = done.send(Done::Bytes(got as u64));
        at += got as u64;
        if got < n {
            return Ok(Ok(false));
        }
    }
    Ok(Ok(true))
}

/// Files up to this size are sent in one round trip (`PutBegin`, `PutData`, `PutEnd` pipelined) instead of three.
pub(super) const PIPELINED_FILE_BYTES_MAX: u64 = 1 << 20;

/// What [`push_small`] did.
enum Small {
    Done,
    Failed(String),
    /// Too large, changed while read, or a retryable answer: use the step-by-step path.
    StepByStep,
}

/// A small file read whole and its requests ready: `PutBegin`, `PutData` (when not empty), `PutXattrs` (with -X and
/// some), `PutEnd`, all for one transfer id.
struct SmallFile {
    msgs: Vec<Msg>,
    bytes: u64,
}

impl SmallFile {
    /// Read `f` whole and build its requests as transfer `id`; `None` when it is too large, may have holes (fewer
    /// blocks than bytes: the step-by-step path sends them as holes), changed while read, or cannot be read here (the
    /// step-by-step path then retries, or says why).
    fn read(cfg: &PushCfg, f: &PushFile, id: u64) -> Option<SmallFile> {
        use std::io::Read;
        let fd = open_src(&f.src, cfg.follow).ok()?;
        let dense = |m: &Metadata| m.blocks().saturating_mul(512) >= m.size();
        let md = fd.metadata().ok().filter(|m| m.is_file() && m.size() <= PIPELINED_FILE_BYTES_MAX && dense(m))?;
        let mut bytes = Vec::with_capacity(md.size() as usize);
        // One byte more than expected shows a file that grew.
        if (&fd).take(md.size() + 1).read_to_end(&mut bytes).is_err()
            || bytes.len() as u64 != md.size()
            || fd.metadata().map(|m| stamp(&m)).ok() != Some(stamp(&md))
        {
            return None;
        }
        let len = bytes.len() as u64;
        let mut msgs = vec![Msg::PutBegin { id, path: f.remote.clone(), size: len, mode: md.mode() & 0o7777 }];
        if !bytes.is_empty() {
            msgs.push(Msg::PutData { id, offset: 0, digest: *blake3::hash(&bytes).as_bytes(), bytes });
        }
        match source_xattrs(cfg, &f.src) {
            Ok(xattrs) if !xattrs.is_empty() => msgs.push(Msg::PutXattrs { id, xattrs }),
            Ok(_) => {}
            Err(_) => return None,
        }
        let (mtime_sec, mtime_nsec) = md_mtime(&md);
        msgs.push(Msg::PutEnd {
            id,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime_sec,
            mtime_nsec,
            fsync: cfg.fsync,
        });
        Some(SmallFile { msgs, bytes: len })
    }

    /// The transfer id its requests carry.
    fn id(&self) -> u64 {
        match self.msgs[0] {
            Msg::PutBegin { id, .. } => id,
            _ => unreachable!("a small file's requests start with PutBegin"),
        }
    }

    /// Carry transfer `new` instead (a retry on a new connection, after the old transfer was aborted).
    fn renumber(&mut self, new: u64) {
        for m in &mut self.msgs {
            match m {
                Msg::PutBegin { id, .. }
                | Msg::PutData { id, .. }
                | Msg::PutXattrs { id, .. }
                | Msg::PutEnd { id, .. } => *id = new,
                _ => {}
            }
        }
    }

    /// What the server's answers to its requests mean (the group's result from [`Connection::pipeline_groups`]).
    /// A failed later request leaves a transfer to abort (`Err(id)`), then the step-by-step path.
    fn outcome(&self, answer: Result<(), (usize, ReqError)>, url: &str) -> Result<Small, u64> {
        match answer {
            Ok(()) => Ok(Small::Done),
            // The server could not even create the temporary: the step-by-step path would fail the same way.
            Err((0, ReqError::Server { message, .. })) => Ok(Small::Failed(format!("cannot write '{url}': {message}"))),
            Err(_) => Err(self.id()),
        }
    }
}

/// Files of one batch at most: answers to a batch's requests wait in the socket until all are written.
pub(super) const SMALL_BATCH_FILES_MAX: usize = 64;

/// Bytes of small files read for one batch at most (one more file may pass it): within what a stream may hold
/// ([`crate::net::server::CONNECTION_BYTES_MAX`] is what each stream is given of the memory limit).
const SMALL_BATCH_BYTES_MAX: u64 = 3 << 20;

/// Send small files in as few round trips as possible: up to [`SMALL_BATCH_FILES_MAX`] files (and
/// [`SMALL_BATCH_BYTES_MAX`] bytes) read whole, all their requests sent back to back, then all the answers read.
/// On a stream with a queue of small files this replaces one round trip (and a sleep and a wake-up on each side)
/// per file by one per batch. A connection that breaks is dialled again and the files not yet answered are sent
/// again under new transfer ids (the old ones aborted). A file that cannot go this way — too large, changed while
/// read, refused past its first request — takes [`push_whole`]'s path on its own. One [`Done::File`] per file.
fn push_smalls(
    stream: &mut Stream,
    cfg: &PushCfg,
    files: Vec<PushFile>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    let mut queue = files.into_iter().peekable();
    while queue.peek().is_some() {
        let mut batch: Vec<(PushFile, Option<SmallFile>)> = Vec::new();
        let mut bytes = 0;
        while batch.len() < SMALL_BATCH_FILES_MAX
            && bytes < SMALL_BATCH_BYTES_MAX
            && let Some(f) = queue.next()
        {
            let small = SmallFile::read(cfg, &f, next_id());
            bytes += small.as_ref().map_or(0, |s| s.bytes);
            batch.push((f, small));
        }
        let mut answers: Vec<Option<Result<(), (usize, ReqError)>>> = (0..batch.len()).map(|_| None).collect();
        let first_url = url_of(stream.addr(), &batch[0].0.remote);
        let doing = Doing::push(&first_url, &format!("with {} more small files in one round trip", batch.len() - 1));
        stream.retry(&doing, done, |conn, attempt| {
            let waiting: Vec<usize> =
                (0..batch.len()).filter(|&i| batch[i].1.is_some() && answers[i].is_none()).collect();
            if attempt > 1 {
                // The broken try may have left these transfers on the server.
                for &i in &waiting {
                    let small = batch[i].1.as_mut().expect("waiting files were read");
                    abort(conn, small.id())?;
                    small.renumber(next_id());
                }
            }
            let groups: Vec<&[Msg]> =
                waiting.iter().map(|&i| batch[i].1.as_ref().expect("read").msgs.as_slice()).collect();
            let (got, broke) = conn.pipeline_groups(&groups);
            for (&i, answer) in waiting.iter().zip(got) {
                answers[i] = Some(answer);
            }
            match broke {
                Some((_, ReqError::Broken(m))) => Err(Broken::new(m)),
                // An answer out of step is a broken connection too (`pipeline_groups` reports it as such).
                Some((_, other)) => Err(Broken::new(other.cause().to_string())),
                None => Ok(()),
            }
        })?;
        let mut aborts = Vec::new();
        let mut one_by_one = Vec::new();
        for ((f, small), answer) in batch.into_iter().zip(answers) {
            let url = url_of(stream.addr(), &f.remote);
            let outcome = match (&small, answer) {
                (Some(s), Some(a)) => s.outcome(a, &url),
                _ => Ok(Small::StepByStep),
            };
            match outcome {
                Ok(Small::Done) => {
                    let _ = done.send(Done::Bytes(small.map_or(0, |s| s.bytes)));
                    let _ = done.send(Done::File { dir: f.dir, link: f.link, result: Ok(0) });
                }
                Ok(Small::Failed(line)) => {
                    let _ = done.send(Done::File { dir: f.dir, link: f.link, result: Err(line) });
                }
                Ok(Small::StepByStep) => one_by_one.push(f),
                Err(id) => {
                    aborts.push(id);
                    one_by_one.push(f);
                }
            }
        }
        for id in aborts {
            stream.best_effort(|c| c.put_abort(id));
        }
        for f in one_by_one {
            let result = push_whole(stream, cfg, &f, done, 1)?;
            let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
        }
    }
    Ok(())
}

/// Send a small file in one round trip as transfer `id` ([`SmallFile`]); anything unusual (a damaged chunk, a file
/// that changed) falls back to the step-by-step path, which retries.
fn push_small(
    conn: &mut Connection,
    cfg: &PushCfg,
    f: &PushFile,
    done: &Sender<Done>,
    id: u64,
) -> Result<Small, Broken> {
    let Some(small) = SmallFile::read(cfg, f, id) else { return Ok(Small::StepByStep) };
    let url = url_of(conn.addr(), &f.remote);
    match conn.pipeline_ok(&small.msgs) {
        Err((_, ReqError::Broken(m))) => Err(Broken::new(m)),
        answer => match small.outcome(answer, &url) {
            Ok(Small::Done) => {
                let _ = done.send(Done::Bytes(small.bytes));
                Ok(Small::Done)
            }
            Ok(other) => Ok(other),
            Err(id) => {
                abort(conn, id)?;
                Ok(Small::StepByStep)
            }
        },
    }
}

/// Send one file whole, retrying when it changes while it is read (and each request when its connection breaks).
/// `Ok(Ok(retries))`, `Ok(Err(line))` for a failure of this file, `Err` when the stream gave up or the run stops.
fn push_whole(
    stream: &mut Stream,
    cfg: &PushCfg,
    f: &PushFile,
    done: &Sender<Done>,
    first: u8,
) -> Result<Result<u8, String>, StreamError> {
    let url = url_of(stream.addr(), &f.remote);
    let mut attempt = first;
    let mut id = next_id();
    let small = stream.retry(&Doing::push(&url, "the whole file in one round trip"), done, |conn, n| {
        if n > 1 {
            // The broken try may have left its transfer on the server.
            abort(conn, id)?;
            id = next_id();
        }
        push_small(conn, cfg, f, done, id)
    })?;
    match small {
        Small::Done => return Ok(Ok(0)),
        Small::Failed(line) => return Ok(Err(line)),
        Small::StepByStep => {}
    }
    loop {
        let fd = match open_src(&f.src, cfg.follow) {
            Ok(fd) => fd,
            Err(e) => return Ok(Err(format!("cannot open '{}': {e}", f.src.shown()))),
        };
        let md = match fd.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(Err(format!("'{}' is no longer a regular file; not copied", f.src.shown()))),
            Err(e) => return Ok(Err(format!("cannot stat '{}': {e}", f.src.shown()))),
        };
        let mut id = next_id();
        let begun = stream.retry(&Doing::push(&url, "its first step: the temporary"), done, |conn, n| {
            if n > 1 {
                abort(conn, id)?;
                id = next_id();
            }
            split(conn.put_begin(id, &f.remote, md.size(), md.mode() & 0o7777))
        })?;
        if let Err(e) = begun {
            return Ok(Err(format!("cannot write '{url}': {e}")));
        }
        let complete = match push_chunks(stream, &fd, id, 0, md.size(), &url, done)? {
            Ok(c) => c,
            Err(m) => {
                stream.best_effort(|c| c.put_abort(id));
                return Ok(Err(format!("cannot write '{url}': {m}")));
            }
        };
        let changed = !complete || fd.metadata().map(|m| stamp(&m)).ok() != Some(stamp(&md));
        if changed {
            stream.best_effort(|c| c.put_abort(id));
            if attempt < SOURCE_ATTEMPTS_MAX {
                attempt += 1;
                continue;
            }
            return Ok(Err(format!(
                "source changed while copying '{}': its size or mtime changed while it was read (it kept changing \
                 during {SOURCE_ATTEMPTS_MAX} attempts)",
                f.src.shown()
            )));
        }
        let xattrs = match source_xattrs(cfg, &f.src) {
            Ok(x) => x,
            Err(m) => {
                stream.best_effort(|c| c.put_abort(id));
                return Ok(Err(m));
            }
        };
        match end_transfer(stream, id, &md, &xattrs, &f.remote, &url, cfg.fsync, done)? {
            Ended::Done => return Ok(Ok(attempt - first)),
            Ended::Failed(m) => return Ok(Err(m)),
            Ended::Lost if attempt < SOURCE_ATTEMPTS_MAX => attempt += 1,
            Ended::Lost => {
                return Ok(Err(format!(
                    "cannot write '{url}': the server lost the transfer with its connection {SOURCE_ATTEMPTS_MAX} times"
                )));
            }
        }
    }
}
