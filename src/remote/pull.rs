//! Pull: a `fastsync://` source to a local destination — the streamed listing, every write an `*at` call beneath
//! the destination, files whole or in ranges into temporaries (resumable with a journal), small ones in batches.

use super::*;

/// `*at` system calls relative to directory descriptors, never following a final symlink.
mod at {
    use std::ffi::{CStr, CString};
    use std::fs::File;
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};

    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// `lstat` of `name` in `dir`; `None` when nothing is there.
    pub fn lstat(dir: RawFd, name: &CStr) -> io::Result<Option<libc::stat>> {
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, C string and pointer.
        match check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
            Ok(()) => Ok(Some(st)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn kind(st: &libc::stat) -> libc::mode_t {
        st.st_mode & libc::S_IFMT
    }

    pub fn mkdir(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: valid descriptor and C string.
        check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) })
    }

    fn own(fd: libc::c_int) -> io::Result<OwnedFd> {
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Open directory `name` in `dir`; a symlink there fails (ELOOP/ENOTDIR).
    pub fn open_dir(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and C string.
        own(unsafe { libc::openat(dir, name.as_ptr(), flags) })
    }

    /// Create `name` in `dir`, which must not exist (no symlink is followed).
    pub fn create_new(dir: RawFd, name: &CStr) -> io::Result<File> {
        // Read-write: the zero-copy path reads spliced chunks back to check their digests.
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and C string.
        let fd = own(unsafe { libc::openat(dir, name.as_ptr(), flags, 0o600 as libc::c_uint) })?;
        Ok(File::from(fd))
    }

    /// Open (`create`: or create) the resumable temporary `name` in `dir` for reading and writing (a symlink there
    /// fails).
    pub fn open_part(dir: RawFd, name: &CStr, create: bool) -> io::Result<File> {
        let flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC | if create { libc::O_CREAT } else { 0 };
        // SAFETY: valid descriptor and C string.
        let fd = own(unsafe { libc::openat(dir, name.as_ptr(), flags, 0o600 as libc::c_uint) })?;
        Ok(File::from(fd))
    }

    /// Open regular file `name` in `dir` to change its metadata (a symlink there fails).
    pub fn open_file(dir: RawFd, name: &CStr) -> io::Result<File> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and C string.
        Ok(File::from(own(unsafe { libc::openat(dir, name.as_ptr(), flags) })?))
    }

    pub fn rename(dir: RawFd, from: &CStr, to: &CStr) -> io::Result<()> {
        // SAFETY: valid descriptor and C strings.
        check(unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) })
    }

    pub fn unlink(dir: RawFd, name: &CStr, is_dir: bool) -> io::Result<()> {
        let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: valid descriptor and C string.
        check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) })
    }

    pub fn symlink(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
        // SAFETY: valid descriptor and C strings.
        check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) })
    }

    pub fn readlink(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn eperm_ok(r: io::Result<()>) -> io::Result<()> {
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
            r => r,
        }
    }

    /// Owner of symlink `name` in `dir` (not followed); refused (not permitted) is not an error, as for a copy.
    pub fn lchown(dir: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: valid descriptor and C string.
        eperm_ok(check(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }))
    }

    fn times(mtime: (i64, u32)) -> [libc::timespec; 2] {
        [
            libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            libc::timespec { tv_sec: mtime.0 as libc::time_t, tv_nsec: mtime.1 as _ },
        ]
    }

    /// mtime of `name` in `dir`, not following a symlink (the access time is left alone).
    pub fn set_mtime_at(dir: RawFd, name: &CStr, mtime: (i64, u32)) -> io::Result<()> {
        let ts = times(mtime);
        // SAFETY: valid descriptor, C string and timespec array.
        check(unsafe { libc::utimensat(dir, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
    }

    /// Owner (where permitted), permission bits and mtime of an open file or directory, in that order (`chown`
    /// clears the set-user-ID bit, so the mode comes after it); each only where it differs, so that what is already
    /// right (a directory of a no-op sync) keeps even its ctime.
    pub fn apply(fd: RawFd, owner: Option<(u32, u32)>, mode: u32, mtime: (i64, u32)) -> io::Result<()> {
        // SAFETY: zeroed stat is a valid out-parameter; valid descriptor and pointer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        check(unsafe { libc::fstat(fd, &mut st) })?;
        let chowned = match owner {
            Some((uid, gid)) if (st.st_uid, st.st_gid) != (uid, gid) => {
                // SAFETY: plain syscall on a valid descriptor.
                eperm_ok(check(unsafe { libc::fchown(fd, uid, gid) }))?;
                true
            }
            _ => false,
        };
        #[allow(clippy::unnecessary_cast)] // mode_t is u16 on macOS
        if chowned || st.st_mode as u32 & 0o7777 != mode & 0o7777 {
            // SAFETY: plain syscall on a valid descriptor.
            check(unsafe { libc::fchmod(fd, (mode & 0o7777) as libc::mode_t) })?;
        }
        if (st.st_mtime, st.st_mtime_nsec) == (mtime.0 as libc::time_t, mtime.1 as _) {
            return Ok(());
        }
        let ts = times(mtime);
        // SAFETY: valid descriptor and timespec array.
        check(unsafe { libc::futimens(fd, ts.as_ptr()) })
    }

    pub fn fsync(fd: RawFd) -> io::Result<()> {
        // SAFETY: plain syscall.
        check(unsafe { libc::fsync(fd) })
    }

    /// The names in open directory `dir` (not `.` and `..`), each with whether it is a directory (not followed).
    pub fn names(dir: RawFd) -> io::Result<Vec<(CString, bool)>> {
        // SAFETY: duplicating a valid descriptor; the duplicate is owned by the DIR stream below.
        let dup = unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is ours; on success the stream owns it, on failure we close it.
        let stream = unsafe { libc::fdopendir(dup) };
        if stream.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: closing our own duplicate.
            unsafe { libc::close(dup) };
            return Err(e);
        }
        let mut out = Vec::new();
        // SAFETY: a valid stream, read until it ends, then closed once.
        unsafe {
            libc::rewinddir(stream);
            loop {
                let ent = libc::readdir(stream);
                if ent.is_null() {
                    break;
                }
                let name = CStr::from_ptr((*ent).d_name.as_ptr());
                if name.to_bytes() == b"." || name.to_bytes() == b".." {
                    continue;
                }
                let is_dir = match (*ent).d_type {
                    libc::DT_DIR => true,
                    libc::DT_UNKNOWN => lstat(dir, name).ok().flatten().is_some_and(|st| kind(&st) == libc::S_IFDIR),
                    _ => false,
                };
                out.push((name.to_owned(), is_dir));
            }
            libc::closedir(stream);
        }
        Ok(out)
    }
}

/// The temporary name `.NAME.fstmp-PID-N` for final name `name`.
fn tmp_name(name: &CStr) -> CString {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed) + 1;
    let tmp = stale::unique(Path::new(OsStr::from_bytes(name.to_bytes())), seq);
    CString::new(tmp.as_os_str().as_bytes()).expect("no NUL in a name")
}

/// A temporary file beside its final name; removed when dropped unless it was renamed into place, or it is a
/// resumable part kept for the next run.
struct TempFile {
    dir: Arc<OwnedFd>,
    /// The temporary name: the file itself, or, when `unnamed`, a name kept for the case where the final name was
    /// taken meanwhile (the file is then linked here and renamed over it).
    name: CString,
    /// Created with no name (`O_TMPFILE`); linked to the final name by `commit`.
    unnamed: bool,
    file: File,
    /// An O_DIRECT descriptor on `file`, for a large file ([`DirectFile`]).
    direct: Option<DirectFile>,
    committed: AtomicBool,
    /// Left in place when dropped uncommitted (a resumable part after an interruption or a lost server).
    keep: AtomicBool,
}

/// A resumable large file of a pull: its stable temporary, its journal, and the ranges an earlier run recorded.
struct Resumable {
    tmp: TempFile,
    journal: Journal,
    recorded: Recorded,
}

/// The ranges an earlier run recorded, by their first byte: the longest recorded from each offset (a range that
/// was interrupted records the part it received, and a later run may record the whole).
type Recorded = HashMap<u64, u64>;

impl TempFile {
    /// A private temporary for `final_name`: unnamed where the filesystem allows (nothing left behind if this
    /// process dies, one directory operation per file), else a named one.
    fn create(dir: &Arc<OwnedFd>, final_name: &CStr) -> io::Result<TempFile> {
        let name = tmp_name(final_name);
        let (file, unnamed) = match fastsync_engine::finish::create_unnamed_at(dir.as_fd(), 0o600) {
            Some(fd) => (File::from(fd), true),
            None => (at::create_new(dir.as_raw_fd(), &name)?, false),
        };
        let (committed, keep) = (AtomicBool::new(false), AtomicBool::new(false));
        Ok(TempFile { dir: dir.clone(), name, unnamed, file, direct: None, committed, keep })
    }

    /// Received chunks of a file of `size` bytes go through O_DIRECT when `on` and the file is large enough.
    fn direct_for(mut self, size: u64, on: bool) -> TempFile {
        self.direct = if on { DirectFile::open(&self.file, size) } else { None };
        self
    }

    /// The resumable temporary (`.NAME.fstmp-part`) and journal (`.NAME.fstmp-journal`) of a large file, as for a
    /// local copy: what an earlier, interrupted run of the same remote file (same size and mtime) recorded is kept;
    /// otherwise both start empty. `None` when another run holds the journal or it cannot be used here: the caller
    /// falls back to a private temporary.
    fn resumable(dir: &Arc<OwnedFd>, final_name: &CStr, meta: &EntryMeta) -> io::Result<Option<Resumable>> {
        if !cfg!(target_os = "linux") {
            return Ok(None);
        }
        let final_path = Path::new(OsStr::from_bytes(final_name.to_bytes()));
        let base = |p: PathBuf| CString::new(p.as_os_str().as_bytes()).expect("no NUL in a name");
        let (part, journal) = (base(stale::part(final_path)), base(stale::journal(final_path)));
        // The journal is opened by path through the directory's descriptor: it stays beneath the destination.
        let at_dir = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let jpath = at_dir.join(OsStr::from_bytes(journal.to_bytes()));
        let mtime = Timestamp { sec: meta.mtime_sec, nsec: i64::from(meta.mtime_nsec) };
        let source = SourceId { size: meta.size, mtime, ino: 0 };
        let (journal, recorded) = match Journal::open(&jpath, source, CHUNK) {
            Ok(Opened::Resume(j, rec)) => (j, rec.ranges),
            Ok(Opened::Fresh(j)) => (j, Vec::new()),
            Ok(Opened::Busy) | Err(_) => return Ok(None),
        };
        let file = match (recorded.is_empty(), at::open_part(dir.as_raw_fd(), &part, false)) {
            (false, Ok(f)) => f,
            _ => {
                let f = at::open_part(dir.as_raw_fd(), &part, true)?;
                f.set_len(0)?;
                f
            }
        };
        file.set_len(meta.size)?;
        let tmp = TempFile {
            dir: dir.clone(),
            name: part,
            unnamed: false,
            file,
            direct: None,
            committed: AtomicBool::new(false),
            keep: AtomicBool::new(true),
        };
        let mut longest = Recorded::new();
        for (offset, len) in recorded {
            let n = longest.entry(offset).or_insert(0);
            *n = (*n).max(len);
        }
        Ok(Some(Resumable { tmp, journal, recorded: longest }))
    }

    /// Put the complete file under `final_name`: link the unnamed file there, or rename the temporary over
    /// whatever is there (an unnamed file whose name was taken meanwhile is linked to its temporary name first).
    fn commit(&self, final_name: &CStr) -> io::Result<()> {
        if self.unnamed {
            fastsync_engine::finish::place_unnamed_at(self.file.as_fd(), self.dir.as_fd(), final_name, &self.name)?;
        } else {
            at::rename(self.dir.as_raw_fd(), &self.name, final_name)?;
        }
        self.committed.store(true, Ordering::Release);
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.unnamed && !self.committed.load(Ordering::Acquire) && !self.keep.load(Ordering::Acquire) {
            let _ = at::unlink(self.dir.as_raw_fd(), &self.name, false);
        }
    }
}

/// A remote file to fetch into directory `dir_fd`.
struct PullFile {
    dir_fd: Arc<OwnedFd>,
    name: CString,
    remote: Vec<u8>,
    shown: PathBuf,
    meta: EntryMeta,
    dir: Option<usize>,
    /// `-H`: the server's (dev, ino), when this is the first name of an inode with several.
    link: Option<(u64, u64)>,
}

/// A local name of a pulled file: its directory, its name there, and how it is shown.
#[derive(Clone)]
struct LocalName {
    dir: Arc<OwnedFd>,
    name: CString,
    shown: PathBuf,
}

/// A large file fetched in ranges by several workers into one temporary; the last range to finish ends it.
struct BigPull {
    file: PullFile,
    tmp: TempFile,
    /// Resumable: the journal, and the ranges an earlier run recorded (compared by digest before they are reused).
    journal: Option<Journal>,
    recorded: Recorded,
    ranges_left: AtomicUsize,
    failure: Mutex<Option<String>>,
    changed: AtomicBool,
}

impl BigPull {
    /// The file failed for good, or changed: its temporary and journal are of no use to a later run.
    fn discard(&self) {
        self.tmp.keep.store(false, Ordering::Release);
        if let Some(j) = &self.journal {
            j.remove();
        }
    }
}

enum PullTask {
    Whole(PullFile),
    Range { big: Arc<BigPull>, offset: u64, len: u64 },
}

impl PoolTask for PullTask {
    /// A pull task is a name to fetch later (its temporary is made when it is fetched).
    const QUEUED_PER_STREAM: usize = 16;

    fn batchable(&self) -> bool {
        matches!(self, PullTask::Whole(f) if f.meta.size <= PIPELINED_FILE_BYTES_MAX)
    }
}

struct PullCfg {
    fsync: bool,
    /// -X: extended attributes are fetched (`GetXattrs`) and set.
    xattrs: bool,
    /// Large files are written with O_DIRECT.
    direct_io: bool,
    pub(super) id: Identity,
}

impl PullCfg {
    /// The owner to set: the source's, unless the new file has it already.
    fn owner(&self, e: &EntryMeta) -> Option<(u32, u32)> {
        ((e.uid, e.gid) != (self.id.euid, self.id.egid)).then_some((e.uid, e.gid))
    }
}

/// A local directory to finish with the remote one's metadata.
struct LocalDir {
    fd: Option<Arc<OwnedFd>>,
    shown: PathBuf,
    meta: EntryMeta,
}

/// A local directory with entries the remote one does not have (deleted after the transfers).
struct LocalDelete {
    rel: Vec<u8>,
    mtime: (i64, u32),
    names: Vec<(CString, bool)>,
}

/// A directory of the listing being received.
struct PullFrame {
    rel: Vec<u8>,
    fd: Option<Arc<OwnedFd>>,
    /// `None`: the directory could not be made; what the listing has inside it is ignored.
    node: Option<usize>,
    fresh: bool,
    /// Names the listing has here (with `--delete`).
    names: Option<HashSet<Vec<u8>>>,
    mtime: (i64, u32),
}

struct PullCore<'a> {
    run: Run<'a>,
    addr: String,
    /// Wire path listed.
    base: Vec<u8>,
    /// Local destination (the root directory, or the file's path).
    dst: PathBuf,
    dirs: Dirs<LocalDir>,
    deletes: Vec<LocalDelete>,
    cfg: Arc<PullCfg>,
    /// Streams the pool runs now (ranges of large files are cut for them).
    streams: Arc<Scaler>,
    dialer: Arc<Dialer>,
    /// `sync --checksum`: the connection that asks for digests, dialled when first needed.
    hash_conn: Option<Connection>,
    /// `-H`: inodes with several names seen so far, by the server's (dev, ino), with the first name.
    links: HashMap<(u64, u64), LinkState<LocalName>>,
}

pub(super) struct Pull<'a> {
    core: PullCore<'a>,
    pool: Pool<PullTask>,
}

/// Which directory an entry goes into.
struct Parent {
    fd: Option<Arc<OwnedFd>>,
    node: Option<usize>,
    fresh: bool,
}

impl<'a> Pull<'a> {
    pub(super) fn run(
        remote: Remote,
        dst: &Path,
        opts: &'a CopyOptions,
        net: &NetOptions,
        dialer: Arc<Dialer>,
    ) -> Result<Summary, Failure> {
        let mut ctl = dial(&dialer)?;
        let shown_root = remote.display(b"");
        let root = match ctl.stat(&remote.path) {
            Ok(Some(e)) => e,
            Ok(None) => return Err(Failure::Fatal(format!("cannot stat '{shown_root}': No such file or directory"))),
            Err(ReqError::Broken(m)) => return Err(Failure::Fatal(m)),
            Err(e) => return Err(Failure::Fatal(format!("cannot stat '{shown_root}': {}", e.cause()))),
        };
        let dst_md = fs::metadata(dst).ok();
        let streams = net.streams.max(1);
        let io_fatal = |what: &str, p: &Path, e: io::Error| Failure::Fatal(format!("{what} '{}': {e}", p.shown()));
        // The destination rule, as for a local copy.
        let (target, parent_dir) = if root.kind == EntryKind::Dir {
            if dst_md.as_ref().is_some_and(|m| !m.is_dir()) {
                return Err(Failure::Usage(format!(
                    "cannot overwrite non-directory '{}' with directory '{shown_root}'",
                    dst.shown()
                )));
            }
            (dst.to_path_buf(), dst.to_path_buf())
        } else {
            let into_dir = dst_md.as_ref().is_some_and(|m| m.is_dir()) || dst.as_os_str().as_bytes().ends_with(b"/");
            let target = if into_dir {
                let name = url::file_name(&remote.path);
                if name.is_empty() {
                    return Err(Failure::Usage(format!("'{shown_root}' has no file name")));
                }
                dst.join(OsStr::from_bytes(name))
            } else {
                dst.to_path_buf()
            };
            if let Ok(there) = fs::symlink_metadata(&target) {
                if there.is_dir() {
                    return Err(Failure::Usage(format!(
                        "cannot overwrite directory '{}' with non-directory '{shown_root}'",
                        target.shown()
                    )));
                }
                if let Some(m) = crate::meta::refuse_special_target(&target, &there, &shown_root) {
                    return Err(Failure::Usage(m));
                }
            }
            let parent = match target.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (target, parent)
        };
        let existed = parent_dir.is_dir();
        if !opts.dry_run {
            crate::meta::make_dirs(&parent_dir).map_err(|e| io_fatal("cannot create directory", &parent_dir, e))?;
        }
        let root_fd = if opts.dry_run && !existed {
            None
        } else {
            let r = Root::open(&parent_dir).map_err(|e| io_fatal("cannot open directory", &parent_dir, e))?;
            Some(Arc::new(r.dir(b"").map_err(|e| io_fatal("cannot open directory", &parent_dir, e))?))
        };
        let conns = if opts.dry_run {
            Vec::new()
        } else {
            dialer.dial_n(streams).map_err(|e| Failure::Fatal(e.to_string()))?
        };
        let mut run = Run::new(opts, streams);
        run.verbose = net.verbose;
        let cfg = Arc::new(PullCfg {
            fsync: opts.fsync,
            xattrs: opts.preserve.xattrs,
            direct_io: opts.direct_io,
            id: run.id,
        });
        let wcfg = cfg.clone();
        let work: Arc<Work<PullTask>> = Arc::new(move |stream, tasks, done| pull_tasks(stream, &wcfg, tasks, done));
        let pool = Pool::start(conns, &dialer, run.stop.clone(), work, net.adaptive.then_some(net.streams_max));
        let mut pull = Pull {
            core: PullCore {
                run,
                addr: remote.addr.clone(),
                base: remote.path.clone(),
                dst: target.clone(),
                dirs: Dirs::new(),
                deletes: Vec::new(),
                cfg,
                streams: pool.scaler.clone(),
                dialer: dialer.clone(),
                hash_conn: None,
                links: HashMap::new(),
            },
            pool,
        };
        if root.kind == EntryKind::Dir {
            pull.walk(&mut ctl, root_fd, root, !existed);
        } else {
            let name = target.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
            let parent = Parent { fd: root_fd, node: None, fresh: !existed };
            let mut e = root;
            e.path = name.clone();
            pull.entry_in(&parent, &name, &name, e, Some(remote.path.clone()));
        }
        let Pull { mut core, mut pool } = pull;
        core.run.summary.streams = pool.finish(&mut |d| core.on_event(d));
        if let Some(conn) = core.hash_conn.take() {
            conn.bye();
        }
        if core.run.may_delete() {
            core.delete_pass(&target);
        }
        drop(pool);
        ctl.bye();
        core.run.finish()
    }

    /// Receive the recursive listing and handle each entry as it arrives.
    fn walk(&mut self, ctl: &mut Connection, root_fd: Option<Arc<OwnedFd>>, root: EntryMeta, fresh: bool) {
        let c = &mut self.core;
        let mtime = mtime_of(&root);
        if let Some(dir) = root_fd.as_ref().filter(|_| c.cfg.xattrs && !c.run.opts.dry_run) {
            let (base, shown) = (c.base.clone(), c.dst.clone());
            c.dir_xattrs(dir, &base, &shown);
        }
        let node = c.dirs.open(None, LocalDir { fd: root_fd.clone(), shown: c.dst.clone(), meta: root });
        c.run.summary.directories += 1;
        let names = c.run.delete.then(HashSet::new);
        let mut stack = vec![PullFrame { rel: Vec::new(), fd: root_fd, node: Some(node), fresh, names, mtime }];
        let base = c.base.clone();
        // A listing whose connection breaks is asked for again on a new one, and the entries already handled are
        // skipped: the listing's order (depth-first, names sorted bytewise) is the order of the paths' components.
        let mut last: Option<Vec<u8>> = None;
        // After a new listing was asked for: skip up to here (a listing is never reordered otherwise).
        let mut resume_after: Option<Vec<u8>> = None;
        let mut attempt = 1;
        loop {
            let broke = match ctl.list(&base, true) {
                Err(ReqError::Broken(m)) => Some(m),
                Err(e) => return self.core.run.broken(e.to_string()),
                Ok(mut stream) => loop {
                    if self.core.run.halted() {
                        return;
                    }
                    let core = &mut self.core;
                    self.pool.poll(&mut |d| core.on_event(d));
                    let Some(item) = stream.next_listed() else { break None };
                    match item {
                        Ok(l) if resume_after.as_ref().is_some_and(|p| !listed_after(l.path(), p)) => {}
                        Ok(l) => {
                            resume_after = None;
                            last = Some(l.path().to_vec());
                            self.listed(&mut stack, l);
                        }
                        Err(ReqError::Broken(m)) => break Some(m),
                        Err(e) => {
                            let shown = url_of(&self.core.addr, &base);
                            self.core.run.req_failed(e, |m| format!("cannot list '{shown}': {m}"));
                        }
                    }
                },
            };
            let Some(cause) = broke else { break };
            if attempt >= STREAM_ATTEMPTS_MAX || self.core.run.halted() {
                return self
                    .core
                    .run
                    .broken(format!("{cause} (gave up after {attempt} attempts on fresh connections)"));
            }
            std::thread::sleep(RETRY_BACKOFF_FIRST * 2u32.saturating_pow(attempt - 1));
            attempt += 1;
            match self.core.dialer.dial() {
                Ok(conn) => *ctl = conn,
                Err(e) => return self.core.run.broken(format!("{cause}; reconnecting failed: {e}")),
            }
            resume_after.clone_from(&last);
            self.core.run.warn(&format!(
                "control connection: {cause}, while listing '{}'; reconnected, listing again (attempt {attempt} of \
                 {STREAM_ATTEMPTS_MAX})",
                url_of(&self.core.addr, &base)
            ));
        }
        while let Some(frame) = stack.pop() {
            self.core.close_dir(frame);
        }
    }

    /// One entry of the listing: checked, then placed in its directory (which must have been listed before it). A
    /// symlink the server could not follow (`-L`) is one failure line in its place.
    fn listed(&mut self, stack: &mut Vec<PullFrame>, item: Listed) {
        let c = &mut self.core;
        let path = item.path().to_vec();
        let refuse = |c: &mut PullCore<'_>, why: &str| {
            let m = format!("refused entry '{}' listed by {}: {why}", path.shown(), c.addr);
            c.run.fail(m);
        };
        let comps = match safe_components(&path) {
            Ok(comps) if !comps.is_empty() => comps,
            Ok(_) => return refuse(c, "an empty path"),
            Err(m) => return refuse(c, &format!("{m}; nothing is written outside the destination")),
        };
        let (name, parents) = comps.split_last().expect("non-empty");
        let name = name.to_vec();
        if stale::is_temporary(OsStr::from_bytes(&name)) {
            return;
        }
        let parent_rel = parents.join(&b'/');
        let Some(pos) = stack.iter().rposition(|f| f.rel == parent_rel) else {
            return refuse(c, "it is not inside a directory listed before it (a symlink is never followed)");
        };
        while stack.len() > pos + 1 {
            let f = stack.pop().expect("longer than pos + 1");
            c.close_dir(f);
        }
        let frame = stack.last_mut().expect("pos exists");
        if frame.node.is_none() {
            // Inside a directory that could not be made (reported once), or that is excluded.
            return;
        }
        if let Some(n) = frame.names.as_mut() {
            n.insert(name.clone());
        }
        let rel = path.clone();
        let e = match item {
            Listed::Entry(e) => e,
            Listed::Failed { code, message, .. } => {
                if sync::excluded(&c.run.opts.filter, url::os_path(&rel), false) {
                    c.run.summary.excluded += 1;
                    return;
                }
                let shown = url_of(&c.addr, &join(&c.base, &rel));
                let cause = ReqError::Server { code, message };
                return c.run.fail(format!("cannot follow '{shown}': {}", cause.cause()));
            }
        };
        if sync::excluded(&c.run.opts.filter, url::os_path(&rel), e.kind == EntryKind::Dir) {
            c.run.summary.excluded += 1;
            if e.kind == EntryKind::Dir {
                // The listing goes on inside it: what it lists there is left out with it.
                let mtime = mtime_of(&e);
                stack.push(PullFrame { rel, fd: None, node: None, fresh: true, names: None, mtime });
            }
            return;
        }
        let parent = Parent { fd: frame.fd.clone(), node: frame.node, fresh: frame.fresh };
        if e.kind == EntryKind::Dir {
            let f = c.open_dir(&parent, &name, &rel, e);
            stack.push(f);
        } else {
            self.entry_in(&parent, &name, &rel, e, None);
        }
    }

    /// A non-directory entry `name` (shown as `rel`) in `parent`. `remote`: its wire path when not `base/rel`.
    fn entry_in(&mut self, parent: &Parent, name: &[u8], rel: &[u8], e: EntryMeta, remote: Option<Vec<u8>>) {
        let c = &mut self.core;
        // A single file (`remote` given) is shown as the destination path itself.
        let shown = if remote.is_some() { c.dst.clone() } else { c.dst.join(url::os_path(rel)) };
        let remote = remote.unwrap_or_else(|| join(&c.base, rel));
        let cname = CString::new(name).expect("wire paths have no NUL");
        if e.kind == EntryKind::Other {
            return c.run.skip_special(&url_of(&c.addr, &remote));
        }
        let existing = match (&parent.fd, parent.fresh) {
            (Some(fd), false) => match at::lstat(fd.as_raw_fd(), &cname) {
                Ok(st) => st,
                Err(err) => return c.run.fail(format!("cannot stat '{}': {err}", shown.shown())),
            },
            _ => None,
        };
        let existing = match existing {
            Some(st) if at::kind(&st) == libc::S_IFDIR => {
                if !c.replace_local(parent, &cname, &shown, true) {
                    return;
                }
                None
            }
            st => st,
        };
        if e.kind == EntryKind::Symlink {
            return c.symlink(parent, &cname, rel, &shown, &e, existing.as_ref());
        }
        if let (Some(sync), Some(st)) = (c.run.sync, existing.as_ref().filter(|st| at::kind(st) == libc::S_IFREG)) {
            let local = Facts { size: st.st_size as u64, mtime: (st.st_mtime, st.st_mtime_nsec) };
            match sync::verdict(sync, facts(&e), local) {
                Verdict::Unchanged => return c.unchanged(parent, &cname, rel, &shown, &e, st),
                Verdict::Skip => {
                    c.run.summary.unchanged += 1;
                    return;
                }
                Verdict::CompareDigests => {
                    // --checksum: the control connection is streaming the listing; a second one asks for digests.
                    let fd = parent.fd.as_ref().map(|fd| fd.as_raw_fd()).unwrap_or(libc::AT_FDCWD);
                    let local = hash_local(at::open_file(fd, &cname));
                    let theirs = match c.hasher() {
                        Ok(conn) => conn.hash(&remote, 0, u64::MAX),
                        Err(m) => return c.run.broken(m),
                    };
                    match same_content(local, theirs, &shown.shown().to_string(), &url_of(&c.addr, &remote)) {
                        Ok(true) => return c.unchanged(parent, &cname, rel, &shown, &e, st),
                        Ok(false) => {}
                        Err(Compared::Failed(m)) => return c.run.fail(m),
                        Err(Compared::Broken(m)) => return c.run.broken(m),
                    }
                }
                Verdict::Transfer => {}
            }
        }
        c.run.item(if existing.is_some() { Change::Update } else { Change::Copy }, rel, false);
        let key = (c.run.opts.hard_links && e.nlink > 1).then_some((e.dev, e.ino));
        if let (Some(_), Some(dir)) = (key, parent.fd.clone()) {
            let me = LocalName { dir, name: cname.clone(), shown: shown.clone() };
            if !c.transfer_first(key, &me, parent.node) {
                return;
            }
        }
        if c.run.opts.dry_run {
            c.run.summary.files += 1;
            c.run.summary.bytes += e.size;
            return;
        }
        let Some(dir_fd) = parent.fd.clone() else { return };
        c.run.progress.add_total(e.size);
        c.dirs.add(parent.node);
        let parts = ranges(e.size, c.streams.split_for());
        let file = PullFile { dir_fd, name: cname, remote, shown, meta: e, dir: parent.node, link: key };
        let Some(parts) = parts else {
            let core = &mut self.core;
            self.pool.send(PullTask::Whole(file), &mut |d| core.on_event(d));
            return;
        };
        let created = match TempFile::resumable(&file.dir_fd, &file.name, &file.meta) {
            Ok(Some(r)) => Ok((r.tmp, Some(r.journal), r.recorded)),
            Ok(None) => TempFile::create(&file.dir_fd, &file.name).map(|t| (t, None, Recorded::new())),
            Err(e) => Err(e),
        };
        let (tmp, journal, recorded) = match created {
            Ok((t, j, r)) => (t.direct_for(file.meta.size, c.run.opts.direct_io), j, r),
            Err(err) => {
                c.run.fail(format!("cannot create '{}': {err}", file.shown.shown()));
                return c.file_done(file.dir, false);
            }
        };
        let big = Arc::new(BigPull {
            file,
            tmp,
            journal,
            recorded,
            ranges_left: AtomicUsize::new(parts.len()),
            failure: Mutex::new(None),
            changed: AtomicBool::new(false),
        });
        for (offset, len) in parts {
            let core = &mut self.core;
            // Ctrl-C stops a large file between ranges: the ranges fetched are journaled, the part kept for a rerun.
            if core.run.halted() {
                return;
            }
            if !self.pool.send(PullTask::Range { big: big.clone(), offset, len }, &mut |d| core.on_event(d)) {
                return;
            }
        }
    }
}

impl<'a> Tally<'a> for PullCore<'a> {
    type Name = LocalName;
    type Dir = LocalDir;

    fn run(&mut self) -> &mut Run<'a> {
        &mut self.run
    }

    fn links(&mut self) -> &mut HashMap<(u64, u64), LinkState<LocalName>> {
        &mut self.links
    }

    fn dirs(&mut self) -> &mut Dirs<LocalDir> {
        &mut self.dirs
    }

    fn shown(&self, name: &LocalName) -> String {
        name.shown.shown().to_string()
    }

    /// `-H`: local name `me` becomes another name of `first` (already in place): linked under a temporary name, then
    /// renamed over whatever `me` was.
    fn link(&mut self, me: &LocalName, first: &LocalName) {
        if self.run.opts.dry_run {
            self.run.summary.hardlinks += 1;
            return;
        }
        let tmp = tmp_name(&me.name);
        let (from_dir, to_dir) = (first.dir.as_raw_fd(), me.dir.as_raw_fd());
        // SAFETY: valid descriptors and C strings; flags 0: a symlink is never followed.
        let linked = if unsafe { libc::linkat(from_dir, first.name.as_ptr(), to_dir, tmp.as_ptr(), 0) } == 0 {
            at::rename(to_dir, &tmp, &me.name).inspect_err(|_| {
                let _ = at::unlink(to_dir, &tmp, false);
            })
        } else {
            Err(io::Error::last_os_error())
        };
        match linked {
            Ok(()) => self.run.summary.hardlinks += 1,
            Err(e) => self.run.fail(format!("cannot link '{}' to '{}': {e}", me.shown.shown(), first.shown.shown())),
        }
    }

    fn finish_dirs(&mut self, finished: Vec<LocalDir>) {
        for d in finished {
            let Some(fd) = d.fd.filter(|_| !self.run.opts.dry_run) else { continue };
            let owner = self.cfg.owner(&d.meta);
            if let Err(e) = at::apply(fd.as_raw_fd(), owner, d.meta.mode, mtime_of(&d.meta)) {
                self.run.fail(format!("cannot set permissions and times on '{}': {e}", d.shown.shown()));
            }
        }
    }
}

impl PullCore<'_> {
    /// The control connection streams the listing meanwhile (or is no longer needed): nothing to keep alive.
    fn on_event(&mut self, e: Option<Done>) {
        if let Some(d) = e {
            self.on_done(d);
        }
    }

    /// Create (or reuse) local directory `name` in `parent` and make it the current one of the listing.
    fn open_dir(&mut self, parent: &Parent, name: &[u8], rel: &[u8], e: EntryMeta) -> PullFrame {
        let shown = self.dst.join(url::os_path(rel));
        let cname = CString::new(name).expect("wire paths have no NUL");
        let mtime = mtime_of(&e);
        let mut frame = PullFrame { rel: rel.to_vec(), fd: None, node: None, fresh: true, names: None, mtime };
        let existing = match (&parent.fd, parent.fresh) {
            (Some(fd), false) => match at::lstat(fd.as_raw_fd(), &cname) {
                Ok(st) => st,
                Err(err) => {
                    self.run.fail(format!("cannot stat '{}': {err}", shown.shown()));
                    return frame;
                }
            },
            _ => None,
        };
        if existing.is_some_and(|st| at::kind(&st) != libc::S_IFDIR) {
            if !self.replace_local(parent, &cname, &shown, false) {
                return frame;
            }
            frame.fresh = true;
        } else {
            frame.fresh = existing.is_none();
        }
        if frame.fresh {
            self.run.item(Change::Mkdir, rel, true);
        }
        let fd = match &parent.fd {
            Some(pfd) if !self.run.opts.dry_run => {
                let made = match at::mkdir(pfd.as_raw_fd(), &cname, 0o700) {
                    Err(err) if err.raw_os_error() == Some(libc::EEXIST) && !frame.fresh => Ok(()),
                    r => r,
                };
                match made.and_then(|()| at::open_dir(pfd.as_raw_fd(), &cname)) {
                    Ok(fd) => Some(Arc::new(fd)),
                    Err(err) => {
                        self.run.fail(format!("cannot create directory '{}': {err}", shown.shown()));
                        return frame;
                    }
                }
            }
            // A dry run reads existing directories (to compare), and creates none.
            Some(pfd) if !frame.fresh => at::open_dir(pfd.as_raw_fd(), &cname).ok().map(Arc::new),
            _ => None,
        };
        if let Some(dir) = fd.as_ref().filter(|_| self.cfg.xattrs && !self.run.opts.dry_run) {
            self.dir_xattrs(dir, &join(&self.base, rel), &shown);
        }
        frame.fd = fd.clone();
        frame.names = self.run.delete.then(HashSet::new);
        frame.node = Some(self.dirs.open(parent.node, LocalDir { fd, shown, meta: e }));
        self.run.summary.directories += 1;
        frame
    }

    /// The listing left directory `frame`: note the local names it lacks (`--delete`), finish it when done.
    fn close_dir(&mut self, frame: PullFrame) {
        let Some(node) = frame.node else { return };
        if let (Some(names), Some(fd), false) = (&frame.names, &frame.fd, frame.fresh) {
            match at::names(fd.as_raw_fd()) {
                Ok(local) => {
                    let mut extra: Vec<(CString, bool)> = local
                        .into_iter()
                        .filter(|(n, is_dir)| {
                            let b = n.to_bytes();
                            !names.contains(b)
                                && !stale::is_temporary(OsStr::from_bytes(b))
                                && !sync::excluded(&self.run.opts.filter, url::os_path(&join(&frame.rel, b)), *is_dir)
                        })
                        .collect();
                    if !extra.is_empty() {
                        extra.sort();
                        self.deletes.push(LocalDelete { rel: frame.rel.clone(), mtime: frame.mtime, names: extra });
                    }
                }
                Err(e) => {
                    let shown = self.dst.join(url::os_path(&frame.rel));
                    self.run.fail(format!("cannot read directory '{}': {e}", shown.shown()));
                }
            }
        }
        let mut finished = Vec::new();
        self.dirs.walked(node, &mut finished);
        self.finish_dirs(finished);
    }

    /// Something of another type is where an entry must go: `sync --delete` removes it, otherwise it is reported.
    fn replace_local(&mut self, parent: &Parent, name: &CStr, shown: &Path, is_dir: bool) -> bool {
        if !self.run.delete {
            let what = if is_dir { "a directory" } else { "a non-directory" };
            self.run.fail(format!(
                "cannot replace {what} at '{}' (the source has another type there; sync --delete replaces it)",
                shown.shown()
            ));
            return false;
        }
        if self.run.opts.dry_run {
            return true;
        }
        let Some(fd) = &parent.fd else { return true };
        let mut failures = Vec::new();
        let n = if is_dir {
            remove_tree(fd.as_raw_fd(), name, b"", shown, DeleteMode::Quiet, &self.run.itemizer, &mut failures)
        } else {
            match at::unlink(fd.as_raw_fd(), name, false) {
                Ok(()) => 1,
                Err(e) => {
                    failures.push(format!("cannot delete '{}': {e}", shown.shown()));
                    0
                }
            }
        };
        self.run.summary.deleted += n;
        let ok = failures.is_empty();
        for f in failures {
            self.run.fail(f);
        }
        ok
    }

    fn symlink(
        &mut self,
        parent: &Parent,
        name: &CStr,
        rel: &[u8],
        shown: &Path,
        e: &EntryMeta,
        existing: Option<&libc::stat>,
    ) {
        let fd = parent.fd.as_ref().map(|f| f.as_raw_fd());
        if self.run.sync.is_some()
            && let (Some(st), Some(fd)) = (existing, fd)
            && at::kind(st) == libc::S_IFLNK
            && at::readlink(fd, name).is_ok_and(|t| t == e.target)
        {
            self.run.summary.unchanged += 1;
            return;
        }
        self.run.item(if existing.is_some() { Change::Update } else { Change::Copy }, rel, false);
        if self.run.opts.dry_run {
            self.run.summary.symlinks += 1;
            return;
        }
        let Some(fd) = fd else { return };
        let target = match CString::new(e.target.clone()) {
            Ok(t) if !t.as_bytes().is_empty() => t,
            _ => return self.run.fail(format!("cannot create symlink '{}': empty or invalid target", shown.shown())),
        };
        let tmp = tmp_name(name);
        let made = at::symlink(&target, fd, &tmp)
            .and_then(|()| match self.cfg.owner(e) {
                Some((uid, gid)) => at::lchown(fd, &tmp, uid, gid),
                None => Ok(()),
            })
            .and_then(|()| at::set_mtime_at(fd, &tmp, mtime_of(e)))
            .and_then(|()| at::rename(fd, &tmp, name));
        match made {
            Ok(()) => self.run.summary.symlinks += 1,
            Err(err) => {
                let _ = at::unlink(fd, &tmp, false);
                self.run.fail(format!("cannot create symlink '{}': {err}", shown.shown()));
            }
        }
    }

    /// A local file that is already right: fix its permissions, owner and mtime if they differ.
    /// The connection for digests (`sync --checksum`), dialled on first use.
    /// -X: the extended attributes of remote directory `remote`, set on local directory `dir` now (before its
    /// permissions are: setting them may need write access). The control connection is streaming the listing: the
    /// second connection asks.
    fn dir_xattrs(&mut self, dir: &OwnedFd, remote: &[u8], shown: &Path) {
        let url = url_of(&self.addr, remote);
        let got = match self.hasher() {
            Ok(conn) => conn.get_xattrs(remote),
            Err(m) => return self.run.broken(m),
        };
        let xattrs = match got {
            Ok(x) => x,
            Err(e) => return self.run.req_failed(e, |m| format!("cannot read extended attributes of '{url}': {m}")),
        };
        let path = PathBuf::from(format!("/proc/self/fd/{}/.", dir.as_raw_fd()));
        if let Err(e) = crate::meta::write_xattrs(&path, &xattrs) {
            self.run.fail(format!("cannot set extended attributes on '{}': {e}", shown.shown()));
        }
    }

    fn hasher(&mut self) -> Result<&mut Connection, String> {
        if self.hash_conn.is_none() {
            self.hash_conn = Some(self.dialer.dial().map_err(|e| e.to_string())?);
        }
        Ok(self.hash_conn.as_mut().expect("just dialled"))
    }

    fn unchanged(&mut self, parent: &Parent, name: &CStr, rel: &[u8], shown: &Path, e: &EntryMeta, st: &libc::stat) {
        self.run.summary.unchanged += 1;
        // -H: the inode's other names link to this one, which is in place.
        if let Some(dir) = parent.fd.clone().filter(|_| self.run.opts.hard_links && e.nlink > 1) {
            let me = LocalName { dir, name: name.to_owned(), shown: shown.to_path_buf() };
            self.in_place((e.dev, e.ino), me);
        }
        let id = self.cfg.id;
        #[allow(clippy::unnecessary_cast)] // mode_t is u16 on macOS
        let mode_differs = (st.st_mode as u32 & 0o7777) != e.mode;
        let mtime_differs = (st.st_mtime, st.st_mtime_nsec) != (e.mtime_sec, i64::from(e.mtime_nsec));
        let owner_differs = (e.uid, e.gid) != (st.st_uid, st.st_gid) && (id.euid == 0 || e.uid == id.euid);
        if !(mode_differs || mtime_differs || owner_differs) {
            return;
        }
        self.run.item(Change::Attrs, rel, false);
        let Some(fd) = parent.fd.as_ref().filter(|_| !self.run.opts.dry_run) else { return };
        let r = at::open_file(fd.as_raw_fd(), name)
            .and_then(|f| at::apply(f.as_raw_fd(), owner_differs.then_some((e.uid, e.gid)), e.mode, mtime_of(e)));
        match r {
            Ok(()) => self.run.summary.attrs_updated += 1,
            Err(err) => self.run.fail(format!("cannot set permissions and times on '{}': {err}", shown.shown())),
        }
    }

    /// `sync --delete`: remove the local entries the remote tree does not have, now that every transfer succeeded.
    fn delete_pass(&mut self, dst: &Path) {
        let recs = std::mem::take(&mut self.deletes);
        if recs.is_empty() {
            return;
        }
        let root = match Root::open(dst) {
            Ok(r) => r,
            Err(e) => return self.run.fail(format!("cannot open directory '{}': {e}", dst.shown())),
        };
        let mut failures = Vec::new();
        if let Some(max) = self.run.sync.and_then(|s| s.max_delete) {
            let mut count = 0;
            for rec in &recs {
                let Ok(dir) = root.dir(&rec.rel) else { continue };
                for (name, is_dir) in &rec.names {
                    count += if *is_dir {
                        remove_tree(
                            dir.as_raw_fd(),
                            name,
                            b"",
                            dst,
                            DeleteMode::Count,
                            &self.run.itemizer,
                            &mut failures,
                        )
                    } else {
                        1
                    };
                }
            }
            if count > max {
                return self.run.fail(format!(
                    "--max-delete {max}: {count} entries would be deleted from '{}'; nothing was deleted",
                    dst.shown()
                ));
            }
        }
        let mode = if self.run.opts.dry_run { DeleteMode::DryRun } else { DeleteMode::Delete };
        for rec in recs {
            // Opened again beneath the destination, following no symlink.
            let dir = match root.dir(&rec.rel) {
                Ok(d) => d,
                Err(e) => {
                    let shown = dst.join(url::os_path(&rec.rel));
                    self.run.fail(format!("cannot open directory '{}': {e}", shown.shown()));
                    continue;
                }
            };
            for (name, is_dir) in &rec.names {
                let rel = join(&rec.rel, name.to_bytes());
                let shown = dst.join(url::os_path(&rel));
                let n = if *is_dir {
                    remove_tree(dir.as_raw_fd(), name, &rel, &shown, mode, &self.run.itemizer, &mut failures)
                } else {
                    self.run.item(Change::Delete, &rel, false);
                    match mode {
                        DeleteMode::Delete => match at::unlink(dir.as_raw_fd(), name, false) {
                            Ok(()) => 1,
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => 0,
                            Err(e) => {
                                failures.push(format!("cannot delete '{}': {e}", shown.shown()));
                                0
                            }
                        },
                        _ => 1,
                    }
                };
                self.run.summary.deleted += n;
            }
            if mode == DeleteMode::Delete {
                // The deletions changed the directory's mtime: give it back the remote one's.
                let _ = at::set_mtime_at(dir.as_raw_fd(), c".", rec.mtime);
            }
        }
        for f in failures {
            self.run.fail(f);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DeleteMode {
    /// Count only.
    Count,
    /// Itemize and count.
    DryRun,
    /// Itemize, delete and count.
    Delete,
    /// Delete and count, without itemizing (a directory in the way of a file).
    Quiet,
}

/// Visit directory `name` in `dir` and everything in it, children first: itemized as `rel`, deleted unless
/// counting or dry. Returns the number of entries (deleted, or that would be).
fn remove_tree(
    dir: RawFd,
    name: &CStr,
    rel: &[u8],
    shown: &Path,
    mode: DeleteMode,
    itemizer: &Itemizer,
    failures: &mut Vec<String>,
) -> u64 {
    let itemize = matches!(mode, DeleteMode::DryRun | DeleteMode::Delete);
    let unlink = matches!(mode, DeleteMode::Delete | DeleteMode::Quiet);
    let fd = match at::open_dir(dir, name) {
        Ok(fd) => fd,
        Err(e) => {
            failures.push(format!("cannot open directory '{}': {e}", shown.shown()));
            return 0;
        }
    };
    let names = match at::names(fd.as_raw_fd()) {
        Ok(n) => n,
        Err(e) => {
            failures.push(format!("cannot read directory '{}': {e}", shown.shown()));
            return 0;
        }
    };
    let mut n = 0;
    for (child, is_dir) in names {
        let crel = join(rel, child.to_bytes());
        let cshown = shown.join(OsStr::from_bytes(child.to_bytes()));
        if is_dir {
            n += remove_tree(fd.as_raw_fd(), &child, &crel, &cshown, mode, itemizer, failures);
            continue;
        }
        if itemize {
            itemizer.item(Change::Delete, url::os_path(&crel), false);
        }
        if unlink && let Err(e) = at::unlink(fd.as_raw_fd(), &child, false) {
            failures.push(format!("cannot delete '{}': {e}", cshown.shown()));
            continue;
        }
        n += 1;
    }
    if itemize {
        itemizer.item(Change::Delete, url::os_path(rel), true);
    }
    if unlink && let Err(e) = at::unlink(dir, name, true) {
        failures.push(format!("cannot delete '{}': {e}", shown.shown()));
        return n;
    }
    n + 1
}

/// One worker task of a pull.
/// A worker's turn: runs of small whole files go together ([`pull_smalls`]), everything else one by one.
fn pull_tasks(
    stream: &mut Stream,
    cfg: &PullCfg,
    tasks: Vec<PullTask>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    #[allow(clippy::result_large_err)] // a task handed back whole, once per task
    let small = |task| match task {
        PullTask::Whole(f) if f.meta.size <= PIPELINED_FILE_BYTES_MAX => Ok(f),
        other => Err(other),
    };
    in_runs(stream, tasks, small, |s, files| pull_smalls(s, cfg, files, done), |s, t| pull_task(s, cfg, t, done))
}

/// Pull small files in one round trip: the `Get`s of the files a worker took together go back to back (with `-X`,
/// each followed by its `GetXattrs`), then each answer is read into its own temporary, which is finished and renamed
/// into place at once (one temporary open at a time). A connection that breaks is dialled again and the files not
/// yet in place are asked for again; a file whose answer is anything but complete and unchanged (changed, damaged,
/// short, refused) takes [`pull_whole`]'s path alone, which retries and says why. One [`Done::File`] per file.
fn pull_smalls(
    stream: &mut Stream,
    cfg: &PullCfg,
    files: Vec<PullFile>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    if files.len() == 1 {
        return files.into_iter().try_for_each(|f| pull_task(stream, cfg, PullTask::Whole(f), done));
    }
    /// What became of one file of the batch.
    enum Got {
        /// In place, or failed for a reason the step-by-step path would meet too.
        Finished(Result<(), String>),
        /// To be fetched on its own.
        Alone,
    }
    let mut got: Vec<Option<Got>> = (0..files.len()).map(|_| None).collect();
    let first_url = url_of(stream.addr(), &files[0].remote);
    let doing = Doing::pull(&first_url, &format!("with {} more small files in one round trip", files.len() - 1));
    stream.retry(&doing, done, |conn, _| {
        let waiting: Vec<usize> = (0..files.len()).filter(|&i| got[i].is_none()).collect();
        let gets: Vec<(&[u8], u64)> =
            waiting.iter().map(|&i| (files[i].remote.as_slice(), files[i].meta.size)).collect();
        conn.send_gets(&gets, cfg.xattrs).map_err(|e| Broken::new(e.cause().to_string()))?;
        let mut progressed = false;
        for &i in &waiting {
            let f = &files[i];
            let tmp = TempFile::create(&f.dir_fd, &f.name);
            let no_tmp = || io::Error::other("no temporary");
            let mut sink = |at: u64, bytes: &[u8]| tmp.as_ref().map_err(|_| no_tmp())?.file.write_all_at(bytes, at);
            let mut hole = |at: u64, n: u64| sparse::make_hole(&tmp.as_ref().map_err(|_| no_tmp())?.file, at, n);
            let answer = conn.get_answer(0, f.meta.size, &mut sink, &mut hole);
            if let Err(GetError::Req(ReqError::Broken(message))) = answer {
                return Err(Broken { message, progressed });
            }
            // -X: the answer to the GetXattrs that followed the Get (read whatever became of the Get).
            let xattrs = match cfg.xattrs.then(|| conn.xattrs_answer()) {
                Some(Err(ReqError::Broken(message))) => return Err(Broken { message, progressed }),
                Some(Err(ReqError::Server { .. })) => None,
                Some(Ok(x)) => Some(x),
                None => Some(Vec::new()),
            };
            let complete = |end: &client::DataEnd| {
                (end.size, end.mtime, end.received_to) == (f.meta.size, mtime_of(&f.meta), f.meta.size)
            };
            got[i] = Some(match (answer, &tmp, xattrs) {
                (_, Err(e), _) => Got::Finished(Err(format!("cannot create '{}': {e}", f.shown.shown()))),
                (Ok(end), Ok(tmp), Some(x)) if complete(&end) => Got::Finished(
                    fastsync_engine::finish::set_xattrs(tmp.file.as_fd(), &x)
                        .map_err(|e| format!("cannot set extended attributes on '{}': {e}", f.shown.shown()))
                        .and_then(|()| finish_pull(cfg, tmp, f, &f.meta)),
                ),
                // Refused, changed, short, damaged, or its attributes unreadable: alone, it retries and says why.
                _ => Got::Alone,
            });
            progressed = true;
        }
        Ok(())
    })?;
    for (f, got) in files.into_iter().zip(got) {
        let result = match got.expect("every file of the batch was answered") {
            Got::Finished(Ok(())) => {
                let _ = done.send(Done::Bytes(f.meta.size));
                Ok(0)
            }
            Got::Finished(Err(line)) => Err(line),
            Got::Alone => pull_whole(stream, cfg, &f, done, 1)?,
        };
        let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
    }
    Ok(())
}

fn pull_task(stream: &mut Stream, cfg: &PullCfg, task: PullTask, done: &Sender<Done>) -> Result<(), StreamError> {
    match task {
        PullTask::Whole(f) => {
            let result = pull_whole(stream, cfg, &f, done, 1)?;
            let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
        }
        PullTask::Range { big, offset, len } => {
            let f = &big.file;
            let failed = || big.failure.lock().expect("not poisoned").is_some();
            // What an interrupted run recorded of this range (all of it, or the part it had received) is reused
            // when the server's bytes still hash the same.
            let recorded = big.recorded.get(&offset).map_or(0, |&n| n.min(len));
            let reused = if recorded > 0 && !failed() && same_range(stream, f, &big.tmp.file, offset, recorded, done)? {
                recorded
            } else {
                0
            };
            if reused < len && !failed() {
                let got = std::cell::Cell::new(offset + reused);
                let fetched = fetch(stream, f, &f.meta, &big.tmp, offset + reused, len - reused, &got, done);
                if let (Err(StreamError::Stopped), Some(j)) = (&fetched, &big.journal)
                    && got.get() > offset
                {
                    // Stopped in the middle of the range (Ctrl-C): the next run reuses what arrived.
                    let _ = j.record(offset, got.get() - offset);
                }
                let failure = match fetched? {
                    Ok(end) if (end.size, end.mtime) != (f.meta.size, mtime_of(&f.meta)) => {
                        big.changed.store(true, Ordering::Release);
                        None
                    }
                    Ok(end) if end.received_to != (offset + len).min(end.size) => {
                        Some(short(stream.addr(), f, end.received_to))
                    }
                    Ok(_) => {
                        if let Some(j) = &big.journal {
                            // Best effort: a range missing from the journal is only fetched again by the next run.
                            let _ = j.record(offset, len);
                        }
                        None
                    }
                    Err(e) => Some(get_failure(stream.addr(), f, e)),
                };
                if let Some(m) = failure {
                    big.failure.lock().expect("not poisoned").get_or_insert(m);
                }
            }
            if big.ranges_left.fetch_sub(1, Ordering::AcqRel) == 1 {
                let failure = big.failure.lock().expect("not poisoned").take();
                let result = match failure {
                    Some(m) => {
                        big.discard();
                        Err(m)
                    }
                    None if big.changed.load(Ordering::Acquire) => {
                        // Changed while the ranges were read: fetched again, whole, by this worker.
                        big.discard();
                        refetch(stream, cfg, f, done)?
                    }
                    None => {
                        let r = pull_xattrs(stream, cfg, f, &big.tmp, done)?
                            .and_then(|()| finish_pull(cfg, &big.tmp, f, &f.meta))
                            .map(|()| 0);
                        if r.is_ok() {
                            if let Some(j) = &big.journal {
                                j.remove();
                            }
                        } else {
                            big.discard();
                        }
                        r
                    }
                };
                let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
            }
        }
    }
    Ok(())
}

/// `Get` `[offset, offset + len)` of `f` into `tmp`, each chunk written in place once its digest is checked. When
/// the connection breaks, the rest of the range (from the first byte not yet received) is asked for again on a new
/// connection: what was received and checked is not fetched again. `next` starts at `offset` and follows the first
/// byte not yet received (also when the run stops meanwhile).
#[allow(clippy::too_many_arguments)]
fn fetch(
    stream: &mut Stream,
    f: &PullFile,
    meta: &EntryMeta,
    tmp: &TempFile,
    offset: u64,
    len: u64,
    next: &std::cell::Cell<u64>,
    done: &Sender<Done>,
) -> Result<Result<client::DataEnd, GetError>, StreamError> {
    let url = url_of(stream.addr(), &f.remote);
    let end = offset.saturating_add(len);
    let doing = Doing::pull(&url, &format!("bytes {offset}..{end}, resuming at the first byte not yet received"));
    next.set(offset);
    stream.retry(&doing, done, |conn, _| {
        let from = next.get();
        // Each chunk is handed over once its digest is checked and it is written (in order, from `from`).
        let mut on_bytes = |n: u64| {
            next.set(next.get() + n);
            let _ = done.send(Done::Bytes(n));
        };
        let r =
            zerocopy::get_into_file(conn, &f.remote, from, end - from, &tmp.file, tmp.direct.as_ref(), &mut on_bytes);
        match corrupt_or_changed(conn, &f.remote, meta, r) {
            Err(GetError::Req(ReqError::Broken(message))) => Err(Broken { message, progressed: next.get() > from }),
            r => Ok(r),
        }
    })
}

/// Whether `[offset, offset + len)` of the local temporary holds what the server's file holds there (BLAKE3 of
/// both; a local read error means "no": the range is fetched again).
fn same_range(
    stream: &mut Stream,
    f: &PullFile,
    file: &File,
    offset: u64,
    len: u64,
    done: &Sender<Done>,
) -> Result<bool, StreamError> {
    let Ok(mine) = hash_range(file, offset, len) else { return Ok(false) };
    let url = url_of(stream.addr(), &f.remote);
    let doing = Doing::pull(&url, &format!("the digest of bytes {offset}..{}", offset + len));
    let theirs = stream.retry(&doing, done, |conn, _| split(conn.hash(&f.remote, offset, len)))?;
    Ok(matches!(theirs, Ok((d, n)) if n == len && d == mine))
}

/// The remote file's metadata again (a `Stat`, retried on a new connection when its connection breaks).
fn stat_again(
    stream: &mut Stream,
    f: &PullFile,
    done: &Sender<Done>,
) -> Result<Result<Option<EntryMeta>, ReqError>, StreamError> {
    let url = url_of(stream.addr(), &f.remote);
    stream.retry(&Doing::pull(&url, "its metadata"), done, |conn, _| split(conn.stat(&f.remote)))
}

/// Stat the file again and fetch it whole (attempt 2 on).
fn refetch(
    stream: &mut Stream,
    cfg: &PullCfg,
    f: &PullFile,
    done: &Sender<Done>,
) -> Result<Result<u8, String>, StreamError> {
    let shown = url_of(stream.addr(), &f.remote);
    match stat_again(stream, f, done)? {
        Ok(Some(m)) if m.kind == EntryKind::File => {
            let g = PullFile {
                dir_fd: f.dir_fd.clone(),
                name: f.name.clone(),
                remote: f.remote.clone(),
                shown: f.shown.clone(),
                meta: EntryMeta { path: f.meta.path.clone(), ..m },
                dir: f.dir,
                link: f.link,
            };
            Ok(pull_whole(stream, cfg, &g, done, 2)?.map(|r| r + 1))
        }
        Ok(Some(_)) => Ok(Err(format!("'{shown}' is no longer a regular file; not copied"))),
        Ok(None) => Ok(Err(format!("cannot read '{shown}': it was removed while it was copied"))),
        Err(e) => Ok(Err(format!("cannot stat '{shown}': {e}"))),
    }
}

/// A chunk with a wrong digest from a file that changed since it was listed is a change (as `DataEnd` would show),
/// not corruption: a server sending with sendfile hashes the bytes before it sends them, so a write in between
/// arrives as a wrong digest. Returns the file's size and mtime now, for the caller's change check.
fn corrupt_or_changed(
    conn: &mut Connection,
    remote: &[u8],
    meta: &EntryMeta,
    r: Result<client::DataEnd, GetError>,
) -> Result<client::DataEnd, GetError> {
    let Err(GetError::Corrupt(why)) = r else { return r };
    match conn.stat(remote) {
        Ok(Some(now)) if now.kind == EntryKind::File && (now.size, mtime_of(&now)) != (meta.size, mtime_of(meta)) => {
            Ok(client::DataEnd { size: now.size, mtime: mtime_of(&now), received_to: 0 })
        }
        Err(e @ ReqError::Broken(_)) => Err(GetError::Req(e)),
        _ => Err(GetError::Corrupt(why)),
    }
}

fn short(addr: &str, f: &PullFile, got: u64) -> String {
    format!("cannot read '{}': the server's data ended early (at byte {got})", url_of(addr, &f.remote))
}

/// The failure line of a `Get`.
fn get_failure(addr: &str, f: &PullFile, e: GetError) -> String {
    let shown = url_of(addr, &f.remote);
    match e {
        GetError::Req(e) => format!("cannot read '{shown}': {e}"),
        GetError::Sink(e) => format!("cannot write '{}': {e}", f.shown.shown()),
        GetError::Corrupt(m) => format!("corrupt data from '{shown}': {m}; nothing was written"),
    }
}

/// Set the metadata of a complete temporary and rename it into place.
/// -X: the remote file's extended attributes (`GetXattrs`), set on the temporary before it is renamed into place.
fn pull_xattrs(
    stream: &mut Stream,
    cfg: &PullCfg,
    f: &PullFile,
    tmp: &TempFile,
    done: &Sender<Done>,
) -> Result<Result<(), String>, StreamError> {
    if !cfg.xattrs {
        return Ok(Ok(()));
    }
    let url = url_of(stream.addr(), &f.remote);
    let doing = Doing::pull(&url, "its extended attributes");
    let xattrs = match stream.retry(&doing, done, |conn, _| split(conn.get_xattrs(&f.remote)))? {
        Ok(x) => x,
        Err(e) => return Ok(Err(format!("cannot read extended attributes of '{url}': {e}"))),
    };
    Ok(fastsync_engine::finish::set_xattrs(tmp.file.as_fd(), &xattrs)
        .map_err(|e| format!("cannot set extended attributes on '{}': {e}", f.shown.shown())))
}

fn finish_pull(cfg: &PullCfg, tmp: &TempFile, f: &PullFile, meta: &EntryMeta) -> Result<(), String> {
    let fd = tmp.file.as_raw_fd();
    at::apply(fd, cfg.owner(meta), meta.mode, mtime_of(meta))
        .map_err(|e| format!("cannot set permissions and times on '{}': {e}", f.shown.shown()))?;
    if cfg.fsync {
        at::fsync(fd).map_err(|e| format!("cannot write '{}': {e}", f.shown.shown()))?;
    }
    tmp.commit(&f.name).map_err(|e| format!("cannot rename into place '{}': {e}", f.shown.shown()))?;
    if cfg.fsync {
        at::fsync(f.dir_fd.as_raw_fd()).map_err(|e| format!("cannot write '{}': {e}", f.shown.shown()))?;
    }
    Ok(())
}

/// Whether listed `path` comes after `last` in a recursive listing (depth-first, names sorted bytewise within a
/// directory): the order of their components.
pub(super) fn listed_after(path: &[u8], last: &[u8]) -> bool {
    path.split(|&b| b == b'/').cmp(last.split(|&b| b == b'/')) == std::cmp::Ordering::Greater
}

/// Fetch one file whole into a temporary, retrying when it changes while it is read (and resuming where it stopped
/// when its connection breaks).
fn pull_whole(
    stream: &mut Stream,
    cfg: &PullCfg,
    f: &PullFile,
    done: &Sender<Done>,
    first: u8,
) -> Result<Result<u8, String>, StreamError> {
    let shown = url_of(stream.addr(), &f.remote);
    let mut meta = f.meta.clone();
    let mut attempt = first;
    loop {
        let tmp = match TempFile::create(&f.dir_fd, &f.name) {
            Ok(t) => t.direct_for(meta.size, cfg.direct_io),
            Err(e) => return Ok(Err(format!("cannot create '{}': {e}", f.shown.shown()))),
        };
        let end = match fetch(stream, f, &meta, &tmp, 0, meta.size, &std::cell::Cell::new(0), done)? {
            Ok(end) => end,
            Err(e) => return Ok(Err(get_failure(stream.addr(), f, e))),
        };
        if (end.size, end.mtime) == (meta.size, mtime_of(&meta)) {
            if end.received_to != meta.size {
                return Ok(Err(short(stream.addr(), f, end.received_to)));
            }
            let xattrs = pull_xattrs(stream, cfg, f, &tmp, done)?;
            return Ok(xattrs.and_then(|()| finish_pull(cfg, &tmp, f, &meta)).map(|()| attempt - first));
        }
        drop(tmp);
        if attempt >= SOURCE_ATTEMPTS_MAX {
            return Ok(Err(format!(
                "source changed while copying '{shown}': its size or mtime changed while it was read (it kept \
                 changing during {SOURCE_ATTEMPTS_MAX} attempts)"
            )));
        }
        attempt += 1;
        match stat_again(stream, f, done)? {
            Ok(Some(m)) if m.kind == EntryKind::File => meta = EntryMeta { path: meta.path, ..m },
            Ok(Some(_)) => return Ok(Err(format!("'{shown}' is no longer a regular file; not copied"))),
            Ok(None) => return Ok(Err(format!("cannot read '{shown}': it was removed while it was copied"))),
            Err(e) => return Ok(Err(format!("cannot stat '{shown}': {e}"))),
        }
    }
}
