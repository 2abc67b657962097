//! `fastsync copy`: decide what goes where, walk the source as a stream, turn entries into engine jobs, and finish
//! each directory (permissions, owner, times) once everything inside it is done.
//!
//! Memory stays bounded for any tree size: the walk is a depth-first stream (one open directory per level), the
//! engine holds at most `jobs_in_flight_max` jobs, and only directories that still have work in flight are kept.

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::time::Instant;

use fastsync_engine::{
    ChunkedFile, Completion, Engine, EngineConfig, FileJob, FinishSpec, Job, Outcome, RangeJob, Session, abandon,
    finish::cstr,
};

use crate::Error;
use crate::meta::{self, Preserve};
use crate::plan::{self, FilePlan};
use crate::progress::Progress;
use crate::slab::Slab;
use crate::stats::Summary;

/// With `--direct-io`, files at least this large are copied with O_DIRECT on engines that support it: the device
/// moves the bytes straight to and from the registered buffers (no page-cache copies, about a tenth of the CPU) and
/// the user's page cache is left alone. Off by default: where the page cache is faster than the device (or the
/// "device" is a VM disk cached by its host), buffered copies finish sooner.
const DIRECT_FILE_BYTES_MIN: u64 = 64 << 20;

/// At most this many failures are kept for the summary (all are printed and counted).
const FAILURES_KEPT_MAX: usize = 1000;

/// Everything `copy` needs to know; built from flags by the CLI.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    pub dereference: bool,
    pub hard_links: bool,
    pub preserve: Preserve,
    pub fsync: bool,
    pub verify: bool,
    /// O_DIRECT for large files where the engine and filesystems allow it.
    pub direct_io: bool,
    pub quiet: bool,
    pub progress: bool,
}

/// Copy `src` to `dst` with rclone's rule (see the README): a directory's contents go into `dst`; a file becomes
/// `dst`, or goes inside it when `dst` is an existing directory or ends in `/`.
pub fn copy(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    engine: &dyn Engine,
    config: &EngineConfig,
) -> Result<Summary, Error> {
    let started = Instant::now();
    let (root_md, target) = resolve(src, dst, opts)?;
    let id = meta::Identity::current();
    let mut config = config.clone();
    config.buffered_writes_nonblocking = meta::buffered_writes_nonblocking(&target);
    let session = engine.start(&config)?;
    let direct_ok = engine.capabilities().direct_io && opts.direct_io;
    let mut exec = Exec {
        opts,
        shards: config.shards,
        direct_ok,
        session,
        st: State {
            dirs: Slab::new(),
            files: Slab::new(),
            links: HashMap::new(),
            summary: Summary::new("copy", engine.kind().name(), config.shards),
            progress: Progress::new(opts.progress && !opts.quiet),
            tmp_seq: 0,
        },
        ancestors: Vec::new(),
        id,
    };
    let result = exec.run(src, &target, root_md);
    let drained = exec.session.drain(&mut |c| exec.st.on_completion(c));
    exec.st.progress.finish();
    let mut summary = exec.st.summary;
    summary.seconds = started.elapsed().as_secs_f64();
    for shard in exec.session.finish()? {
        summary.engine_syscalls += shard.syscalls;
        summary.engine_steals += shard.steals;
    }
    drained?;
    result?;
    Ok(summary)
}

/// Apply the destination rule and refuse what must not be done. Returns the root's metadata and the target path.
fn resolve(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<(Metadata, PathBuf), Error> {
    let lmd = fs::symlink_metadata(src).map_err(|e| Error::io("cannot stat", src, e))?;
    // The root itself is followed when it is a symlink to a directory (like `src/` for rsync) or with -L.
    let md = if lmd.file_type().is_symlink() {
        match fs::metadata(src) {
            Ok(m) if m.is_dir() || opts.dereference => m,
            Ok(_) => lmd,
            Err(e) if opts.dereference => return Err(Error::io("cannot follow", src, e)),
            Err(_) => lmd,
        }
    } else {
        lmd
    };
    let dst_md = fs::metadata(dst).ok();
    let trailing_slash = dst.as_os_str().as_bytes().ends_with(b"/");
    if md.is_dir() {
        if dst_md.as_ref().is_some_and(|d| !d.is_dir()) {
            return Err(Error::Refused(format!(
                "cannot overwrite non-directory '{}' with directory '{}'",
                dst.display(),
                src.display()
            )));
        }
        let canon_src = fs::canonicalize(src).map_err(|e| Error::io("cannot resolve", src, e))?;
        let canon_dst = canonicalize_lenient(dst).map_err(|e| Error::io("cannot resolve", dst, e))?;
        if canon_dst == canon_src {
            return Err(Error::Refused(format!(
                "cannot copy directory '{}' onto itself ('{}')",
                src.display(),
                dst.display()
            )));
        }
        if canon_dst.starts_with(&canon_src) {
            return Err(Error::Refused(format!(
                "cannot copy directory '{}' into itself ('{}')",
                src.display(),
                dst.display()
            )));
        }
        return Ok((md, dst.to_path_buf()));
    }
    let into_dir = dst_md.as_ref().is_some_and(|d| d.is_dir()) || trailing_slash;
    let target = if into_dir {
        let name = src.file_name().ok_or_else(|| Error::Refused(format!("'{}' has no file name", src.display())))?;
        dst.join(name)
    } else {
        dst.to_path_buf()
    };
    if let Ok(t) = fs::symlink_metadata(&target) {
        if t.dev() == md.dev() && t.ino() == md.ino() {
            return Err(Error::Refused(format!("'{}' and '{}' are the same file", src.display(), target.display())));
        }
        if t.is_dir() {
            return Err(Error::Refused(format!(
                "cannot overwrite directory '{}' with non-directory '{}'",
                target.display(),
                src.display()
            )));
        }
    }
    Ok((md, target))
}

/// Canonical form of a path that may not exist yet: its deepest existing ancestor, canonicalized, plus the rest.
fn canonicalize_lenient(path: &Path) -> io::Result<PathBuf> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    loop {
        match fs::canonicalize(existing) {
            Ok(c) => {
                let mut out = c;
                for part in rest.iter().rev() {
                    out.push(part);
                }
                return Ok(out);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                rest.push(existing.file_name().map(|n| n.to_owned()).unwrap_or_default());
                existing = match existing.parent() {
                    Some(p) => p,
                    None => return Err(e),
                };
            }
            Err(e) => return Err(e),
        }
    }
}

/// A destination directory that still has work in flight.
struct DirNode {
    dst: PathBuf,
    spec: FinishSpec,
    /// Children (files, links, subdirectories) not yet complete.
    pending: u64,
    /// Every entry of the source directory has been handed out.
    walked: bool,
    parent: Option<usize>,
    /// The directory passes its group to new files (set-group-ID bit), so `chown` is never a no-op in it.
    setgid: bool,
}

/// A file with jobs in flight.
struct FileCtx {
    dir: Option<usize>,
    dst: PathBuf,
    /// Completions still expected (plus one hold while ranges are being submitted).
    jobs_left: u32,
    done_ok: bool,
    failed: bool,
    link_key: Option<(u64, u64)>,
}

/// Hard-link bookkeeping for `-H`: names waiting for an inode's first copy, then that copy's path.
enum LinkState {
    Pending { waiters: Vec<(PathBuf, Option<usize>)> },
    Done(PathBuf),
    Failed,
}

/// Everything completions update; separate from the session so both can be borrowed at once.
struct State {
    dirs: Slab<DirNode>,
    files: Slab<FileCtx>,
    links: HashMap<(u64, u64), LinkState>,
    summary: Summary,
    progress: Progress,
    /// Temporary names made so far (numbers them).
    tmp_seq: u64,
}

struct Exec<'a> {
    opts: &'a CopyOptions,
    shards: usize,
    direct_ok: bool,
    session: Session,
    st: State,
    /// (dev, ino) of the directories being walked, to stop `-L` from looping through symlinks.
    ancestors: Vec<(u64, u64)>,
    id: meta::Identity,
}

/// One open level of the depth-first walk.
struct Frame {
    iter: fs::ReadDir,
    dst: PathBuf,
    dir: usize,
}

impl Exec<'_> {
    fn run(&mut self, src: &Path, target: &Path, root_md: Metadata) -> Result<(), Error> {
        if !root_md.is_dir() {
            if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent).map_err(|e| Error::io("cannot create directory", parent, e))?;
            }
            self.entry(src, target, &root_md, None)?;
            return Ok(());
        }
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(|e| Error::io("cannot create directory", parent, e))?;
        }
        let Some(root) = self.open_dir(src, target, &root_md, None) else {
            return Ok(());
        };
        let mut stack = vec![root];
        while let Some(frame) = stack.last_mut() {
            match frame.iter.next() {
                None => {
                    let frame = stack.pop().expect("non-empty");
                    self.ancestors.pop();
                    self.st.dirs.get_mut(frame.dir).walked = true;
                    self.st.maybe_finish_dir(frame.dir);
                }
                Some(Err(e)) => {
                    let dst = frame.dst.clone();
                    self.st.fail(format!("cannot read directory for '{}': {e}", dst.display()));
                }
                Some(Ok(entry)) => {
                    let src = entry.path();
                    let dst = frame.dst.join(entry.file_name());
                    let dir = frame.dir;
                    let md = if self.opts.dereference { fs::metadata(&src) } else { entry.metadata() };
                    let md = match md {
                        Ok(md) => md,
                        Err(e) => {
                            self.st.fail(format!("cannot stat '{}': {e}", src.display()));
                            continue;
                        }
                    };
                    if md.is_dir() {
                        if let Some(f) = self.open_dir(&src, &dst, &md, Some(dir)) {
                            stack.push(f);
                        }
                    } else {
                        self.entry(&src, &dst, &md, Some(dir))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Create the destination directory and start walking the source one. `None` when it failed (reported).
    fn open_dir(&mut self, src: &Path, dst: &Path, md: &Metadata, parent: Option<usize>) -> Option<Frame> {
        let key = (md.dev(), md.ino());
        if self.ancestors.contains(&key) {
            self.st.fail(format!("symlink loop: '{}' is its own ancestor; not followed", src.display()));
            return None;
        }
        if let Err(e) = make_dir(dst) {
            self.st.fail(format!("cannot create directory '{}': {e}", dst.display()));
            return None;
        }
        let setgid = fs::metadata(dst).map(|m| m.mode() & 0o2000 != 0).unwrap_or(false);
        let spec = meta::finish_spec(src, md, self.opts.preserve, &self.id, true, false, false).map(|mut s| {
            // Directories are created owner-only (so we can fill read-only ones); their mode is always set at the end.
            s.mode = Some(md.mode() & 0o7777);
            s
        });
        let spec = match spec {
            Ok(s) => s,
            Err(e) => {
                self.st.fail(format!("cannot read extended attributes of '{}': {e}", src.display()));
                return None;
            }
        };
        let iter = match fs::read_dir(src) {
            Ok(it) => it,
            Err(e) => {
                self.st.fail(format!("cannot open directory '{}': {e}", src.display()));
                return None;
            }
        };
        let dir =
            self.st.dirs.insert(DirNode { dst: dst.to_path_buf(), spec, pending: 0, walked: false, parent, setgid });
        if let Some(p) = parent {
            self.st.dirs.get_mut(p).pending += 1;
        }
        self.st.summary.directories += 1;
        self.ancestors.push(key);
        Some(Frame { iter, dst: dst.to_path_buf(), dir })
    }

    /// Copy one non-directory entry.
    fn entry(&mut self, src: &Path, dst: &Path, md: &Metadata, dir: Option<usize>) -> Result<(), Error> {
        let ft = md.file_type();
        if ft.is_file() {
            return self.file(src, dst, md, dir);
        }
        if ft.is_symlink() {
            match self.symlink(src, dst, md) {
                Ok(()) => self.st.summary.symlinks += 1,
                Err(msg) => self.st.fail(msg),
            }
            return Ok(());
        }
        let kind = if ft.is_fifo() {
            "fifo"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_char_device() {
            "character device"
        } else {
            "special file"
        };
        self.st.summary.skipped += 1;
        if !self.opts.quiet {
            self.st.progress.println(&format!("fastsync: skipping {kind} '{}'", src.display()));
        }
        Ok(())
    }

    fn tmp_path(&mut self, dst: &Path) -> PathBuf {
        self.st.tmp_path(dst)
    }

    fn symlink(&mut self, src: &Path, dst: &Path, md: &Metadata) -> Result<(), String> {
        let target = fs::read_link(src).map_err(|e| format!("cannot read symlink '{}': {e}", src.display()))?;
        let tmp = self.tmp_path(dst);
        std::os::unix::fs::symlink(&target, &tmp)
            .map_err(|e| format!("cannot create symlink '{}': {e}", dst.display()))?;
        let spec = FinishSpec { owner: Some((md.uid(), md.gid())), times: Some(meta::times(md)), ..Default::default() };
        let done = meta::apply_by_path(&tmp, &spec, true)
            .map_err(|e| format!("{} '{}': {}", e.what, dst.display(), e.source))
            .and_then(|()| {
                fs::rename(&tmp, dst).map_err(|e| format!("cannot create symlink '{}': {e}", dst.display()))
            });
        if done.is_err() {
            abandon(&tmp);
        }
        done
    }

    fn file(&mut self, src: &Path, dst: &Path, md: &Metadata, dir: Option<usize>) -> Result<(), Error> {
        let mut link_key = None;
        if self.opts.hard_links && md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            match self.st.links.get_mut(&key) {
                Some(LinkState::Done(first)) => {
                    let first = first.clone();
                    self.st.make_link(&first, dst);
                    return Ok(());
                }
                Some(LinkState::Pending { waiters, .. }) => {
                    waiters.push((dst.to_path_buf(), dir));
                    if let Some(d) = dir {
                        self.st.dirs.get_mut(d).pending += 1;
                    }
                    return Ok(());
                }
                Some(LinkState::Failed) => {
                    self.st.fail(format!("cannot link '{}': its first copy failed", dst.display()));
                    return Ok(());
                }
                None => {
                    self.st.links.insert(key, LinkState::Pending { waiters: Vec::new() });
                    link_key = Some(key);
                }
            }
        }
        let setgid_dir = dir.is_some_and(|d| self.st.dirs.get_mut(d).setgid);
        let (preserve, fsync, verify) = (self.opts.preserve, self.opts.fsync, self.opts.verify);
        let spec = match meta::finish_spec(src, md, preserve, &self.id, setgid_dir, fsync, verify) {
            Ok(s) => s,
            Err(e) => {
                self.st.fail(format!("cannot read extended attributes of '{}': {e}", src.display()));
                self.st.link_failed(link_key);
                return Ok(());
            }
        };
        let tmp = self.tmp_path(dst);
        let size = md.size();
        let sparse = meta::looks_sparse(md);
        self.st.progress.add_total(size);
        let ctx = FileCtx { dir, dst: dst.to_path_buf(), jobs_left: 1, done_ok: false, failed: false, link_key };
        let want_direct = self.direct_ok && !sparse && size >= DIRECT_FILE_BYTES_MIN;
        match plan::plan_file(size, sparse, self.shards, want_direct) {
            FilePlan::Whole => {
                let fid = self.st.files.insert(ctx);
                if let Some(d) = dir {
                    self.st.dirs.get_mut(d).pending += 1;
                }
                let job = FileJob {
                    tag: fid as u64,
                    src: src.to_path_buf(),
                    tmp,
                    dst: dst.to_path_buf(),
                    size_hint: size,
                    follow_symlinks: self.opts.dereference,
                    finish: spec,
                };
                let st = &mut self.st;
                self.session.submit(Job::File(job), &mut |c| st.on_completion(c))?;
            }
            FilePlan::Chunked { chunk_bytes } => {
                let (src_fd, dst_fd, direct) =
                    match open_pair(src, &tmp, dst, want_direct, self.opts.dereference, spec.create_mode) {
                        Ok(t) => t,
                        Err(msg) => {
                            self.st.fail(msg);
                            self.st.link_failed(link_key);
                            return Ok(());
                        }
                    };
                // The size of the file as opened is what we copy; the walk's size may be stale.
                let size = fstat_size(&src_fd).unwrap_or(size);
                // SAFETY: plain syscall on a descriptor we own.
                if unsafe { libc::ftruncate(dst_fd.as_raw_fd(), size as libc::off_t) } != 0 {
                    let e = io::Error::last_os_error();
                    abandon(&tmp);
                    self.st.fail(format!("cannot create '{}': {e}", dst.display()));
                    self.st.link_failed(link_key);
                    return Ok(());
                }
                let fid = self.st.files.insert(ctx);
                if let Some(d) = dir {
                    self.st.dirs.get_mut(d).pending += 1;
                }
                let file = Arc::new(ChunkedFile {
                    src_fd,
                    dst_fd,
                    src: src.to_path_buf(),
                    tmp,
                    dst: dst.to_path_buf(),
                    size,
                    direct,
                    finish: spec,
                    // One hold while ranges are submitted, released below.
                    ranges_left: AtomicU32::new(1),
                    failed: AtomicBool::new(false),
                });
                // O_DIRECT may have been refused by the filesystem: then the file is not spread after all.
                let chunk_bytes = if direct { chunk_bytes } else { plan::UNSPLIT_CHUNK_BYTES };
                let extents = if sparse { data_extents(&file.src_fd, size) } else { vec![(0, size)] };
                for (start, end) in extents {
                    for (offset, len) in plan::split_extent(start, end, chunk_bytes) {
                        if file.failed.load(std::sync::atomic::Ordering::Acquire) {
                            break;
                        }
                        file.ranges_left.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        self.st.files.get_mut(fid).jobs_left += 1;
                        let job = RangeJob { tag: fid as u64, file: file.clone(), offset, len };
                        let st = &mut self.st;
                        self.session.submit(Job::Range(job), &mut |c| st.on_completion(c))?;
                    }
                }
                // Release the hold; if every range already completed, the file is finished here.
                let outcome = file.complete_range(Ok(()));
                self.st.on_completion(Completion { tag: fid as u64, bytes: 0, shard: usize::MAX, outcome });
            }
        }
        Ok(())
    }
}

impl State {
    /// Report a failure: one line on stderr, counted, kept (up to a bound) for the summary.
    fn fail(&mut self, msg: String) {
        self.progress.println(&format!("fastsync: {msg}"));
        self.summary.errors += 1;
        if self.summary.failures.len() < FAILURES_KEPT_MAX {
            self.summary.failures.push(msg);
        }
    }

    fn on_completion(&mut self, c: Completion) {
        let fid = c.tag as usize;
        self.summary.bytes += c.bytes;
        self.progress.inc(c.bytes);
        let f = self.files.get_mut(fid);
        match c.outcome {
            Outcome::FileDone | Outcome::RangeDoneFileDone => f.done_ok = true,
            Outcome::RangeDone | Outcome::RangeAbandoned => {}
            Outcome::Failed(e) => {
                // Every range of a chunked file shares this context: report the file's first failure only.
                let first = !f.failed;
                f.failed = true;
                if first {
                    self.fail(e.to_string());
                }
            }
        }
        let f = self.files.get_mut(fid);
        f.jobs_left -= 1;
        if f.jobs_left > 0 {
            return;
        }
        let f = self.files.remove(fid);
        let ok = f.done_ok && !f.failed;
        if ok {
            self.summary.files += 1;
            self.progress.file_done();
        }
        if let Some(key) = f.link_key {
            let waiters = match self.links.remove(&key) {
                Some(LinkState::Pending { waiters, .. }) => waiters,
                _ => Vec::new(),
            };
            self.links.insert(key, if ok { LinkState::Done(f.dst.clone()) } else { LinkState::Failed });
            for (name, dir) in waiters {
                if ok {
                    self.make_link(&f.dst, &name);
                } else {
                    self.fail(format!("cannot link '{}': its first copy failed", name.display()));
                }
                if let Some(d) = dir {
                    self.child_done(d);
                }
            }
        }
        if let Some(d) = f.dir {
            self.child_done(d);
        }
    }

    fn tmp_path(&mut self, dst: &Path) -> PathBuf {
        self.tmp_seq += 1;
        tmp_name(dst, self.tmp_seq)
    }

    /// Create `name` as a hard link to the already-copied `first` (atomically replacing what is there).
    fn make_link(&mut self, first: &Path, name: &Path) {
        let tmp = self.tmp_path(name);
        let r = fs::hard_link(first, &tmp).and_then(|()| fs::rename(&tmp, name));
        match r {
            Ok(()) => self.summary.hardlinks += 1,
            Err(e) => {
                abandon(&tmp);
                self.fail(format!("cannot create hard link '{}': {e}", name.display()));
            }
        }
    }

    fn link_failed(&mut self, key: Option<(u64, u64)>) {
        let Some(key) = key else { return };
        if let Some(LinkState::Pending { waiters, .. }) = self.links.insert(key, LinkState::Failed) {
            for (name, dir) in waiters {
                self.fail(format!("cannot link '{}': its first copy failed", name.display()));
                if let Some(d) = dir {
                    self.child_done(d);
                }
            }
        }
    }

    fn child_done(&mut self, dir: usize) {
        self.dirs.get_mut(dir).pending -= 1;
        self.maybe_finish_dir(dir);
    }

    /// Apply a directory's metadata once it is walked and nothing inside it is in flight, then tell its parent.
    fn maybe_finish_dir(&mut self, dir: usize) {
        let mut dir = dir;
        loop {
            let node = self.dirs.get_mut(dir);
            if node.pending > 0 || !node.walked {
                return;
            }
            let node = self.dirs.remove(dir);
            if let Err(e) = meta::apply_by_path(&node.dst, &node.spec, false) {
                self.fail(format!("{} '{}': {}", e.what, node.dst.display(), e.source));
            }
            match node.parent {
                Some(p) => {
                    self.dirs.get_mut(p).pending -= 1;
                    dir = p;
                }
                None => return,
            }
        }
    }
}

/// Create a destination directory writable by us (its real mode is applied when it is finished). An existing
/// directory is reused; an existing non-directory is an error.
fn make_dir(dst: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match fs::DirBuilder::new().mode(0o700).create(dst) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            if fs::metadata(dst)?.is_dir() {
                Ok(())
            } else {
                Err(io::Error::new(io::ErrorKind::AlreadyExists, "a non-directory is in the way"))
            }
        }
        Err(e) => Err(e),
    }
}

/// The temporary name for `dst`: hidden, in the same directory, marked `.fstmp-` so stale ones can be found.
pub fn tmp_name(dst: &Path, seq: u64) -> PathBuf {
    let name = dst.file_name().map(|n| n.as_bytes()).unwrap_or(b"file");
    // Keep the whole name within NAME_MAX (255) bytes.
    let keep = &name[..name.len().min(200)];
    let mut tmp = Vec::with_capacity(keep.len() + 40);
    tmp.push(b'.');
    tmp.extend_from_slice(keep);
    tmp.extend_from_slice(format!(".fstmp-{}-{seq}", pid()).as_bytes());
    dst.with_file_name(std::ffi::OsStr::from_bytes(&tmp))
}

/// This process's id, read once (it is part of every temporary name).
fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

fn open_raw(path: &Path, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: valid C string; the returned descriptor is owned by the OwnedFd.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(target_os = "linux")]
const O_DIRECT: libc::c_int = libc::O_DIRECT;
#[cfg(not(target_os = "linux"))]
const O_DIRECT: libc::c_int = 0;

/// Open the source and create the temporary destination of a chunked file. O_DIRECT is tried when asked and
/// silently dropped where the filesystem refuses it (EINVAL, e.g. tmpfs).
fn open_pair(
    src: &Path,
    tmp: &Path,
    dst: &Path,
    direct: bool,
    follow: bool,
    create_mode: u32,
) -> Result<(OwnedFd, OwnedFd, bool), String> {
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    let open_src = |d: bool| open_raw(src, libc::O_RDONLY | nofollow | if d { O_DIRECT } else { 0 }, 0);
    let (src_fd, direct) = match open_src(direct) {
        Ok(fd) => (fd, direct),
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => match open_src(false) {
            Ok(fd) => (fd, false),
            Err(e) => return Err(format!("cannot open '{}': {e}", src.display())),
        },
        Err(e) => return Err(format!("cannot open '{}': {e}", src.display())),
    };
    let create = |d: bool| {
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | if d { O_DIRECT } else { 0 };
        open_raw(tmp, flags, create_mode as libc::mode_t)
    };
    let dst_fd = match create(direct) {
        Ok(fd) => fd,
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            abandon(tmp);
            create(false).map_err(|e| format!("cannot create '{}': {e}", dst.display()))?
        }
        Err(e) => return Err(format!("cannot create '{}': {e}", dst.display())),
    };
    Ok((src_fd, dst_fd, direct))
}

fn fstat_size(fd: &OwnedFd) -> Option<u64> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer.
    (unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0).then_some(st.st_size as u64)
}

/// The data extents of a sparse file, found with SEEK_DATA/SEEK_HOLE. Where those are unsupported the whole file is
/// one extent. The list is short for real sparse files (images, databases); each entry is two integers.
#[cfg(target_os = "linux")]
fn data_extents(fd: &OwnedFd, size: u64) -> Vec<(u64, u64)> {
    let raw = fd.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: plain syscall.
        let data = unsafe { libc::lseek(raw, pos, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `pos`. Anything else (EINVAL: unsupported): copy everything from `pos`.
            if io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                out.push((pos as u64, size));
            }
            break;
        }
        // SAFETY: plain syscall.
        let hole = unsafe { libc::lseek(raw, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { (hole as u64).min(size) };
        out.push((data as u64, end));
        pos = end as i64;
    }
    out
}

#[cfg(not(target_os = "linux"))]
fn data_extents(_fd: &OwnedFd, size: u64) -> Vec<(u64, u64)> {
    vec![(0, size)]
}
