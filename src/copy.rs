//! The transfer executor behind `copy` and `sync`: decide what goes where, walk the source as a stream, compare
//! with the destination (sync), turn entries into engine jobs, and finish each directory (permissions, owner, times)
//! once everything inside it is done.
//!
//! Memory stays bounded for any tree size: the walk is a depth-first stream (one open directory per level), the
//! engine holds at most `jobs_in_flight_max` jobs, and only directories that still have work in flight are kept.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{self, Metadata};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Instant;

use fastsync_engine::blocking::stamp_of;
use fastsync_engine::journal::{Opened, SourceId};
use fastsync_engine::{
    ChunkedFile, Completion, Engine, EngineConfig, FileJob, FinishSpec, HashJob, Job, Journal, Op, Outcome, RangeJob,
    Session, Show, Timestamp, abandon, finish::cstr,
};

use crate::Error;
use crate::filter::Filter;
use crate::interrupt;
use crate::meta::{self, Preserve, Stat};
use crate::plan::{self, FilePlan};
use crate::progress::Progress;
use crate::scan::{self, DirScan, Scanned, Scanner};
use crate::slab::Slab;
use crate::stale;
use crate::stats::Summary;
use crate::sync::{self, Change, DeletePass, Facts, Itemizer, SyncOptions, Verdict};

/// Files at least this large are copied with O_DIRECT on engines that support it (unless `--no-direct-io`): the
/// device moves the bytes straight to and from the registered, huge-page buffers (no page-cache copies, a fiftieth
/// of the CPU) and the user's page cache is left alone. Measured (README, Performance): a 4 GiB copy 3.5x faster
/// than through the page cache, cold or warm. Smaller files stay buffered: their open/close dominates.
const DIRECT_FILE_BYTES_MIN: u64 = 64 << 20;

/// At most this many failures are kept for the summary (all are printed and counted).
const FAILURES_KEPT_MAX: usize = 1000;

/// A source that changes while it is copied is copied again, up to this many attempts in all.
const SOURCE_ATTEMPTS_MAX: u8 = 3;

/// Job tags with this bit set are digest jobs of `--checksum` (bit 0: which side); others are file ids.
const TAG_HASH: u64 = 1 << 63;

/// Everything a transfer needs to know; built from flags by the CLI.
#[derive(Debug, Default)]
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
    /// Include/exclude rules; excluded entries are neither copied nor deleted.
    pub filter: Filter,
    /// `sync`: compare with the destination and transfer only what differs. `None`: `copy` (always copies).
    pub sync: Option<SyncOptions>,
    /// Change nothing; itemize what would be done.
    pub dry_run: bool,
    /// Print one line per change (always on with `dry_run`).
    pub itemize: bool,
    /// Itemized lines as JSON objects.
    pub json: bool,
}

/// Run a transfer of `src` to `dst` with rclone's rule (see the README): a directory's contents go into `dst`; a
/// file becomes `dst`, or goes inside it when `dst` is an existing directory or ends in `/`.
pub fn run(
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
    let direct_ok = engine.capabilities().direct_io && opts.direct_io;
    let command = if opts.sync.is_some() { "sync" } else { "copy" };
    let mut summary = Summary::new(command, engine.kind().name(), config.shards);
    summary.dry_run = opts.dry_run;
    let mut exec = Exec {
        opts,
        shards: config.shards,
        direct_ok,
        engine,
        // The walk thread looks entries up too while it waits for the scanner threads (scan.rs).
        scan_threads: config.shards.min(std::thread::available_parallelism().map_or(1, |n| n.get())).saturating_sub(1),
        config,
        session: None,
        scanner: None,
        look_dst: opts.sync.is_some() || opts.itemize || opts.dry_run,
        delete_dirs: Vec::new(),
        st: State {
            dirs: Slab::new(),
            files: Slab::new(),
            compares: Slab::new(),
            links: HashMap::new(),
            deferred: VecDeque::new(),
            summary,
            progress: Progress::new(opts.progress && !opts.quiet),
            tmp_seq: 0,
        },
        ancestors: Vec::new(),
        id,
        itemizer: Itemizer { enabled: opts.itemize || opts.dry_run, json: opts.json },
        scan_stale: false,
        interrupted: None,
    };
    let root_existed = fs::symlink_metadata(&target).is_ok();
    let marker = exec.start_marker(&target, root_md.is_dir());
    let mut result = exec.walk(src, &target, root_md.clone(), root_existed);
    if result.is_ok() {
        result = exec.settle();
    }
    if let (Some(session), Some(_)) = (&exec.session, exec.interrupted) {
        session.cancel();
    }
    let drained = match exec.session.as_mut() {
        Some(session) => session.drain(&mut |c| exec.st.on_completion(c)),
        None => Ok(()),
    };
    // Completions that arrived while draining may still ask for work (retries, next ranges): after an
    // interruption or a failure they are dropped, and their directories are not finished.
    exec.st.progress.finish();
    exec.interrupted = exec.interrupted.or_else(interrupt::received);
    let clean = result.is_ok() && drained.is_ok() && exec.st.summary.errors == 0 && exec.interrupted.is_none();
    if let Some(sync) = opts.sync.as_ref().filter(|s| s.delete) {
        if !root_md.is_dir() {
            // Nothing to compare a single file's siblings with.
        } else if clean {
            exec.delete_pass(src, &target, sync);
        } else {
            let why = match exec.interrupted {
                Some(_) => "the run was interrupted".to_string(),
                None => format!("{} error(s) happened", exec.st.summary.errors.max(1)),
            };
            exec.st.summary.deletions_skipped = Some(format!("{why}; nothing was deleted"));
        }
    }
    // Failed files remove their temporaries; only an interruption leaves some (partial files kept for resume).
    if let Some(marker) = marker
        && exec.interrupted.is_none()
    {
        marker.finish();
    }
    let mut summary = exec.st.summary;
    summary.interrupted = exec.interrupted;
    summary.seconds = started.elapsed().as_secs_f64();
    for shard in exec.session.take().map(Session::finish).transpose()?.unwrap_or_default() {
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
                dst.shown(),
                src.shown()
            )));
        }
        let canon_src = fs::canonicalize(src).map_err(|e| Error::io("cannot resolve", src, e))?;
        let canon_dst = canonicalize_lenient(dst).map_err(|e| Error::io("cannot resolve", dst, e))?;
        if canon_dst == canon_src {
            return Err(Error::Refused(format!(
                "cannot copy directory '{}' onto itself ('{}')",
                src.shown(),
                dst.shown()
            )));
        }
        if canon_dst.starts_with(&canon_src) {
            return Err(Error::Refused(format!(
                "cannot copy directory '{}' into itself ('{}')",
                src.shown(),
                dst.shown()
            )));
        }
        // A destination that is a symlink to a directory stands for that directory, as for cp, rsync and rclone: the
        // tree goes into what it points to and the link stays (the walk itself never follows a symlink).
        let target = match fs::symlink_metadata(dst) {
            Ok(l) if l.file_type().is_symlink() && dst_md.is_some() => canon_dst,
            _ => dst.to_path_buf(),
        };
        return Ok((md, target));
    }
    let into_dir = dst_md.as_ref().is_some_and(|d| d.is_dir()) || trailing_slash;
    let target = if into_dir {
        let name = src.file_name().ok_or_else(|| Error::Refused(format!("'{}' has no file name", src.shown())))?;
        dst.join(name)
    } else {
        dst.to_path_buf()
    };
    if let Ok(t) = fs::symlink_metadata(&target) {
        if t.dev() == md.dev() && t.ino() == md.ino() {
            return Err(Error::Refused(format!("'{}' and '{}' are the same file", src.shown(), target.shown())));
        }
        if t.is_dir() {
            return Err(Error::Refused(format!(
                "cannot overwrite directory '{}' with non-directory '{}'",
                target.shown(),
                src.shown()
            )));
        }
        if let Some(m) = crate::meta::refuse_special_target(&target, &t, &src.shown().to_string()) {
            return Err(Error::Refused(m));
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
    /// It existed with the source's permissions, owner and mtime already: unless something is created in it, its
    /// metadata is left alone (a no-op sync touches no directory).
    in_place: bool,
    /// Something was (or will be) created, replaced or removed in it.
    touched: bool,
}

/// A large file copied in ranges, and the ranges not yet handed to the engine.
struct Chunks {
    file: Arc<ChunkedFile>,
    /// All ranges are handed out at once; otherwise each when the previous one completed.
    parallel: bool,
    /// (offset, length, recorded by an earlier run)
    queue: VecDeque<(u64, u64, bool)>,
}

/// A file with jobs in flight.
struct FileCtx {
    dir: Option<usize>,
    src: PathBuf,
    dst: PathBuf,
    /// Completions still expected (plus one hold while ranges are being submitted).
    jobs_left: u32,
    done_ok: bool,
    failed: bool,
    /// The source changed while it was copied: copy it again (when attempts are left).
    source_changed: bool,
    attempt: u8,
    link_key: Option<(u64, u64)>,
    chunks: Option<Chunks>,
}

/// A file whose two sides are being hashed (`--checksum`).
struct CompareCtx {
    src: PathBuf,
    dst: PathBuf,
    rel: PathBuf,
    dir: Option<usize>,
    src_md: Metadata,
    dst_md: Stat,
    link_key: Option<(u64, u64)>,
    digests: [Option<[u8; 32]>; 2],
    /// Jobs still expected.
    left: u8,
    error: bool,
}

/// Work that completions ask for; the executor does it between submissions (completions cannot submit).
enum Deferred {
    /// Copy a file (again): its source changed while it was copied, or its digests differ (then `itemize` holds
    /// the path to itemize as updated).
    Transfer {
        src: PathBuf,
        dst: PathBuf,
        dir: Option<usize>,
        link_key: Option<(u64, u64)>,
        attempt: u8,
        itemize: Option<PathBuf>,
    },
    /// Digests agree: the destination file is already right.
    Unchanged(Box<CompareCtx>),
    /// Submit the next range of a sequentially copied file.
    NextRange(usize),
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
    compares: Slab<CompareCtx>,
    links: HashMap<(u64, u64), LinkState>,
    deferred: VecDeque<Deferred>,
    summary: Summary,
    progress: Progress,
    /// Temporary names made so far (numbers them).
    tmp_seq: u64,
}

struct Exec<'a> {
    opts: &'a CopyOptions,
    shards: usize,
    direct_ok: bool,
    engine: &'a dyn Engine,
    config: EngineConfig,
    /// Started with the first job: a sync with nothing to transfer never allocates or registers buffers.
    session: Option<Session>,
    /// Reads directories and metadata ahead of the walk; started with the first directory.
    scanner: Option<Scanner>,
    scan_threads: usize,
    /// The walk needs to know what the destination holds (`sync`, itemizing).
    look_dst: bool,
    /// Directories (relative) whose destination has more entries than the source: the deletion pass visits these.
    delete_dirs: Vec<PathBuf>,
    st: State,
    /// (dev, ino) of the directories being walked, to stop `-L` from looping through symlinks.
    ancestors: Vec<(u64, u64)>,
    id: meta::Identity,
    itemizer: Itemizer,
    /// An earlier run died here: clean stale temporaries in every existing destination directory.
    scan_stale: bool,
    /// The signal that stopped the walk.
    interrupted: Option<i32>,
}

/// `base` joined with `name` (`name` alone when `base` is empty), in `buf`, whose allocation is reused.
fn join_into<'b>(buf: &'b mut PathBuf, base: &Path, name: &std::ffi::OsStr) -> &'b Path {
    buf.as_mut_os_string().clear();
    buf.push(base);
    buf.push(name);
    buf
}

/// One open level of the depth-first walk.
struct Frame {
    iter: DirScan,
    src: PathBuf,
    dst: PathBuf,
    rel: PathBuf,
    dir: usize,
    /// The destination directory did not exist before this run: nothing in it needs comparing.
    fresh: bool,
    /// Source entries whose name the destination directory also has.
    present: u64,
}

/// A non-directory entry being handed out.
struct Entry<'p> {
    src: &'p Path,
    dst: &'p Path,
    rel: &'p Path,
    md: &'p Metadata,
    dir: Option<usize>,
    /// Nothing exists at `dst` (its directory is new).
    dst_absent: bool,
    /// What the destination has under this name, when the scanner already looked (`Some(None)`: nothing).
    dst_known: Option<Option<Stat>>,
}

impl Exec<'_> {
    /// Leave this run's marker for the destination, noting whether a dead run left one (see `stale`).
    fn start_marker(&mut self, target: &Path, is_dir: bool) -> Option<stale::RunMarker> {
        if self.opts.dry_run {
            return None;
        }
        let dir = if is_dir { target.to_path_buf() } else { parent_or_dot(target) };
        // The directory must exist to be named canonically; the walk creates it anyway.
        fs::create_dir_all(&dir).ok()?;
        let marker = stale::RunMarker::start(&dir)?;
        self.scan_stale = marker.dead_runs_found();
        if !is_dir && self.scan_stale {
            let (removed, failures) = stale::clean_dir(&dir, None);
            self.note_cleaned(removed, failures);
        }
        Some(marker)
    }

    fn note_cleaned(&mut self, removed: u64, failures: Vec<String>) {
        self.st.summary.stale_removed += removed;
        for f in failures {
            self.st.fail(f);
        }
    }

    fn walk(&mut self, src: &Path, target: &Path, root_md: Metadata, root_existed: bool) -> Result<(), Error> {
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty())
            && !self.opts.dry_run
        {
            meta::make_dirs(parent).map_err(|e| Error::io("cannot create directory", parent, e))?;
        }
        if !root_md.is_dir() {
            let rel = PathBuf::from(target.file_name().unwrap_or_default());
            let absent = fs::symlink_metadata(target).is_err();
            let e = Entry { src, dst: target, rel: &rel, md: &root_md, dir: None, dst_absent: absent, dst_known: None };
            return self.entry(&e);
        }
        let Some(root) = self.open_dir(src, target, Path::new(""), &root_md, None, (!root_existed).then_some(None))
        else {
            return Ok(());
        };
        let mut stack = vec![root];
        let mut resumed = false;
        // Each entry's paths, built in buffers that keep their allocation from one entry to the next.
        let (mut src_buf, mut dst_buf, mut rel_buf) = (PathBuf::new(), PathBuf::new(), PathBuf::new());
        while let Some(frame) = stack.last_mut() {
            if let Some(signal) = interrupt::received() {
                self.interrupted = Some(signal);
                return Ok(());
            }
            let scanner = self.scanner.as_mut().expect("started by open_dir");
            let next = frame.iter.next(scanner);
            if frame.iter.take_new_chunk() || std::mem::take(&mut resumed) {
                // The walk enters these next (depth first): have the scanner read them meanwhile.
                let look = !frame.fresh && self.look_dst;
                let subdirs: Vec<std::ffi::OsString> = frame
                    .iter
                    .subdirs()
                    .take(scan::AHEAD_SUBDIRS)
                    .filter(|sub| !sync::excluded(&self.opts.filter, &sync::child_rel(&frame.rel, &sub.name), true))
                    .map(|sub| sub.name.clone())
                    .collect();
                for name in subdirs {
                    let (src, dst) = (frame.src.join(&name), frame.dst.join(&name));
                    frame.iter.read_ahead(scanner, src, &dst, look, self.opts.dereference);
                }
            }
            match next {
                None => {
                    let frame = stack.pop().expect("non-empty");
                    resumed = true;
                    // More names in the destination than source names found there: something to delete.
                    if self.opts.sync.as_ref().is_some_and(|s| s.delete)
                        && frame.iter.dst_entries().is_some_and(|n| n > frame.present)
                    {
                        self.delete_dirs.push(frame.rel.clone());
                    }
                    self.ancestors.pop();
                    self.st.dirs.get_mut(frame.dir).walked = true;
                    self.st.maybe_finish_dir(frame.dir);
                    scanner.close(frame.iter);
                }
                Some(Err(e)) => {
                    let src = frame.src.clone();
                    self.st.fail(format!("cannot read directory '{}': {e}", src.shown()));
                }
                Some(Ok(scanned)) => {
                    let Scanned { name, md, dst: dst_known } = scanned;
                    if matches!(dst_known, Some(Some(_))) {
                        frame.present += 1;
                    }
                    let src = join_into(&mut src_buf, &frame.src, &name);
                    let dst = join_into(&mut dst_buf, &frame.dst, &name);
                    let rel = join_into(&mut rel_buf, &frame.rel, &name);
                    let (dir, fresh) = (frame.dir, frame.fresh);
                    let md = match md {
                        Ok(md) => md,
                        Err(e) => {
                            self.st.fail(format!("cannot stat '{}': {e}", src.shown()));
                            continue;
                        }
                    };
                    if sync::excluded(&self.opts.filter, rel, md.is_dir()) {
                        self.st.summary.excluded += 1;
                        continue;
                    }
                    if md.is_dir() {
                        // Nothing is in a directory this run created.
                        let known = if fresh { Some(None) } else { dst_known };
                        if let Some(f) = self.open_dir(src, dst, rel, &md, Some(dir), known) {
                            stack.push(f);
                        }
                    } else {
                        let e = Entry { src, dst, rel, md: &md, dir: Some(dir), dst_absent: fresh, dst_known };
                        self.entry(&e)?;
                    }
                }
            }
            self.pump()?;
        }
        Ok(())
    }

    /// Do deferred work, then wait for the engine until nothing is left in flight or deferred.
    fn settle(&mut self) -> Result<(), Error> {
        loop {
            if let Some(signal) = interrupt::received() {
                self.interrupted = Some(signal);
                return Ok(());
            }
            self.pump()?;
            let Some(session) = self.session.as_mut().filter(|s| s.in_flight() > 0) else {
                if self.st.deferred.is_empty() {
                    return Ok(());
                }
                continue;
            };
            let st = &mut self.st;
            session.wait(&mut |c| st.on_completion(c))?;
        }
    }

    /// Hand a job to the engine, starting it first if this is the first job.
    fn submit(&mut self, job: Job) -> Result<(), Error> {
        let session = match &mut self.session {
            Some(s) => s,
            None => self.session.insert(self.engine.start(&self.config)?),
        };
        let st = &mut self.st;
        session.submit(job, &mut |c| st.on_completion(c))?;
        Ok(())
    }

    /// Do the work completions deferred.
    fn pump(&mut self) -> Result<(), Error> {
        while let Some(work) = self.st.deferred.pop_front() {
            match work {
                Deferred::Transfer { src, dst, dir, link_key, attempt, itemize } => {
                    if let Some(rel) = &itemize {
                        self.itemizer.item(Change::Update, rel, false);
                    }
                    let md = if self.opts.dereference { fs::metadata(&src) } else { fs::symlink_metadata(&src) };
                    match md {
                        Ok(md) if self.opts.dry_run => {
                            self.st.summary.files += 1;
                            self.st.summary.bytes += md.size();
                            self.st.link_settled(link_key, &dst);
                        }
                        Ok(md) if md.is_file() => self.submit_file(&src, &dst, &md, dir, link_key, attempt, false)?,
                        Ok(_) => {
                            self.st.fail(format!("'{}' is no longer a regular file; not copied", src.shown()));
                            self.st.link_failed(link_key);
                        }
                        Err(e) => {
                            self.st.fail(format!("cannot stat '{}': {e}", src.shown()));
                            self.st.link_failed(link_key);
                        }
                    }
                    // The deferral held the directory open; the new jobs (if any) hold it now.
                    if let Some(d) = dir {
                        self.st.child_done(d);
                    }
                }
                Deferred::Unchanged(c) => {
                    self.unchanged(&c.dst, &c.rel, &c.src_md, &c.dst_md, c.link_key);
                    if let Some(d) = c.dir {
                        self.st.child_done(d);
                    }
                }
                Deferred::NextRange(fid) => {
                    self.submit_next_range(fid)?;
                }
            }
        }
        Ok(())
    }

    /// Create the destination directory and start walking the source one. `dst_known`: what is at `dst` when already
    /// known (`Some(None)`: nothing). `None` when it failed (reported).
    fn open_dir(
        &mut self,
        src: &Path,
        dst: &Path,
        rel: &Path,
        md: &Metadata,
        parent: Option<usize>,
        dst_known: Option<Option<Stat>>,
    ) -> Option<Frame> {
        let key = (md.dev(), md.ino());
        if self.ancestors.contains(&key) {
            self.st.fail(format!("symlink loop: '{}' is its own ancestor; not followed", src.shown()));
            return None;
        }
        // What is at `dst`: known (nothing, in a directory this run created; or what the scanner found with the
        // parent's entries), or looked at now.
        let existing = match dst_known {
            Some(known) => known,
            None => fs::symlink_metadata(dst).ok().map(|m| Stat::from(&m)),
        };
        if existing.as_ref().is_some_and(|m| !m.is_dir()) && !self.replace_in_the_way(dst, false) {
            return None;
        }
        let fresh = !existing.as_ref().is_some_and(|m| m.is_dir());
        if fresh && !rel.as_os_str().is_empty() {
            self.itemizer.item(Change::Mkdir, rel, true);
        }
        let mut cleaned = false;
        if !self.opts.dry_run {
            // An existing directory (just lstat'ed) is used as it is: no mkdir that fails with EEXIST on every
            // directory of a no-op sync.
            if fresh && let Err(e) = make_dir(dst) {
                self.st.fail(format!("cannot create directory '{}': {e}", dst.shown()));
                return None;
            }
            if !fresh && self.scan_stale {
                let (removed, failures) = stale::clean_dir(dst, Some(src));
                cleaned = removed > 0;
                self.note_cleaned(removed, failures);
            }
        }
        let setgid = !self.opts.dry_run
            && match &existing {
                Some(m) if !fresh => m.mode & 0o2000 != 0,
                _ => fs::metadata(dst).map(|m| m.mode() & 0o2000 != 0).unwrap_or(false),
            };
        let spec = meta::finish_spec(src, md, self.opts.preserve, &self.id, true, false, false).map(|mut s| {
            // Directories are created owner-only (so we can fill read-only ones); their mode is always set at the end.
            s.mode = Some(md.mode() & 0o7777);
            s
        });
        let spec = match spec {
            Ok(s) => s,
            Err(e) => {
                self.st.fail(format!("cannot read extended attributes of '{}': {e}", src.shown()));
                return None;
            }
        };
        let scanner = match &mut self.scanner {
            Some(s) => s,
            None => match Scanner::new(
                self.scan_threads,
                self.opts.sync.as_ref().is_some_and(|s| s.delete),
                self.opts.filter.is_empty(),
            ) {
                Ok(s) => self.scanner.insert(s),
                Err(e) => {
                    self.st.fail(format!("cannot start directory scanner threads: {e}"));
                    return None;
                }
            },
        };
        let look = !fresh && self.look_dst;
        let iter = match scanner.open(src, dst, look, self.opts.dereference) {
            Ok(it) => it,
            Err(e) => {
                self.st.fail(format!("cannot open directory '{}': {e}", src.shown()));
                return None;
            }
        };
        let in_place = !self.opts.preserve.xattrs
            && existing.as_ref().is_some_and(|m| {
                m.is_dir()
                    && (m.mode ^ md.mode()) & 0o7777 == 0
                    && m.mtime == (md.mtime(), md.mtime_nsec())
                    // An ordinary user cannot give a directory away: the owner only matters to root.
                    && ((m.uid, m.gid) == (md.uid(), md.gid()) || self.id.euid != 0)
            });
        if fresh && let Some(p) = parent {
            self.st.dirs.get_mut(p).touched = true;
        }
        let dir = self.st.dirs.insert(DirNode {
            dst: dst.to_path_buf(),
            spec,
            pending: 0,
            walked: false,
            parent,
            setgid,
            in_place,
            touched: cleaned,
        });
        // A dry run changes nothing, not even directory metadata.
        if self.opts.dry_run {
            self.st.dirs.get_mut(dir).spec = FinishSpec::default();
        }
        if let Some(p) = parent {
            self.st.dirs.get_mut(p).pending += 1;
        }
        self.st.summary.directories += 1;
        self.ancestors.push(key);
        Some(Frame {
            iter,
            src: src.to_path_buf(),
            dst: dst.to_path_buf(),
            rel: rel.to_path_buf(),
            dir,
            fresh,
            present: 0,
        })
    }

    /// Something of another type is where an entry must go. `sync --delete` removes it (it is not in the source
    /// under that type); otherwise it is reported and kept. Returns whether the way is now clear.
    fn replace_in_the_way(&mut self, dst: &Path, for_file: bool) -> bool {
        let delete = self.opts.sync.as_ref().is_some_and(|s| s.delete);
        if !delete {
            let what = if for_file { "a directory" } else { "a non-directory" };
            self.st.fail(format!(
                "cannot replace {what} at '{}' (the source has another type there; sync --delete replaces it)",
                dst.shown()
            ));
            return false;
        }
        if self.opts.dry_run {
            return true;
        }
        // remove_dir_all never follows symlinks (it unlinks them), so nothing outside the destination is touched.
        let r = if for_file { fs::remove_dir_all(dst) } else { fs::remove_file(dst) };
        match r {
            Ok(()) => {
                self.st.summary.deleted += 1;
                true
            }
            Err(e) => {
                self.st.fail(format!("cannot delete '{}': {e}", dst.shown()));
                false
            }
        }
    }

    /// Hand out one non-directory entry.
    fn entry(&mut self, e: &Entry<'_>) -> Result<(), Error> {
        let ft = e.md.file_type();
        if !(ft.is_file() || ft.is_symlink()) {
            let kind = crate::meta::special_kind(e.md).unwrap_or("a special file");
            self.st.summary.skipped += 1;
            if !self.opts.quiet {
                self.st.progress.println(&format!("fastsync: skipping {kind} '{}'", e.src.shown()));
            }
            return Ok(());
        }
        // `copy` only needs to know what is there to itemize it; the rename replaces whatever it is (a directory in
        // the way fails the rename, and is reported).
        let look = !e.dst_absent && (self.opts.sync.is_some() || self.itemizer.enabled);
        let dst_md = match (look, e.dst_known) {
            (false, _) => None,
            (true, Some(known)) => known,
            (true, None) => fs::symlink_metadata(e.dst).ok().map(|m| Stat::from(&m)),
        };
        let replaced_dir = dst_md.as_ref().is_some_and(|m| m.is_dir());
        if replaced_dir && !self.replace_in_the_way(e.dst, true) {
            return Ok(());
        }
        let dst_md = dst_md.filter(|m| !m.is_dir());
        if ft.is_symlink() {
            return self.symlink_entry(e, dst_md.as_ref());
        }
        let mut link_key = None;
        if self.opts.hard_links && e.md.nlink() > 1 {
            match self.hard_link(e) {
                Some(key) => link_key = Some(key),
                None => return Ok(()),
            }
        }
        if let (Some(sync), Some(dmd)) = (&self.opts.sync, &dst_md)
            && dmd.is_file()
        {
            match sync::verdict(sync, Facts::of(e.md), Facts::of_stat(dmd)) {
                Verdict::Unchanged => {
                    self.unchanged(e.dst, e.rel, e.md, dmd, link_key);
                    return Ok(());
                }
                Verdict::Skip => {
                    self.st.summary.unchanged += 1;
                    self.st.link_settled(link_key, e.dst);
                    return Ok(());
                }
                Verdict::CompareDigests => return self.compare_digests(e, *dmd, link_key),
                Verdict::Transfer => {}
            }
        }
        self.itemizer.item(if dst_md.is_some() { Change::Update } else { Change::Copy }, e.rel, false);
        if self.opts.dry_run {
            self.st.summary.files += 1;
            self.st.summary.bytes += e.md.size();
            self.st.link_settled(link_key, e.dst);
            return Ok(());
        }
        // Nothing there: the directory is new, or the scanner (or the lstat above) found no entry of that name.
        let vacant = e.dst_absent || (look && dst_md.is_none() && !replaced_dir);
        self.submit_file(e.src, e.dst, e.md, e.dir, link_key, 1, vacant)
    }

    /// `-H` for a file with several names: link to its first copy if there is one. Returns the inode's key when
    /// this name is the first (and must be copied), `None` when it was dealt with.
    fn hard_link(&mut self, e: &Entry<'_>) -> Option<(u64, u64)> {
        let key = (e.md.dev(), e.md.ino());
        match self.st.links.get_mut(&key) {
            Some(LinkState::Done(first)) => {
                let first = first.clone();
                if !self.opts.dry_run {
                    // Already the same inode as the first copy (an unchanged sync): nothing to do.
                    let same = match (fs::symlink_metadata(&first), fs::symlink_metadata(e.dst)) {
                        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                        _ => false,
                    };
                    if !same {
                        self.itemizer.item(Change::Copy, e.rel, false);
                        self.st.touch(e.dir);
                        self.st.make_link(&first, e.dst);
                    }
                }
                None
            }
            Some(LinkState::Pending { waiters }) => {
                waiters.push((e.dst.to_path_buf(), e.dir));
                if let Some(d) = e.dir {
                    self.st.dirs.get_mut(d).pending += 1;
                }
                None
            }
            Some(LinkState::Failed) => {
                self.st.fail(format!("cannot link '{}': its first copy failed", e.dst.shown()));
                None
            }
            None => {
                self.st.links.insert(key, LinkState::Pending { waiters: Vec::new() });
                Some(key)
            }
        }
    }

    /// A destination file that is already right: fix its permissions, owner and times if they differ.
    fn unchanged(&mut self, dst: &Path, rel: &Path, src_md: &Metadata, dst_md: &Stat, link_key: Option<(u64, u64)>) {
        self.st.summary.unchanged += 1;
        self.st.link_settled(link_key, dst);
        let mode_differs = (src_md.mode() ^ dst_md.mode) & 0o7777 != 0;
        let mtime_differs = (src_md.mtime(), src_md.mtime_nsec()) != dst_md.mtime;
        // Only an owner we may set counts as a difference (an ordinary user cannot give files away).
        let owner_differs = (src_md.uid(), src_md.gid()) != (dst_md.uid, dst_md.gid)
            && (self.id.euid == 0 || src_md.uid() == self.id.euid);
        if !(mode_differs || mtime_differs || owner_differs) {
            return;
        }
        self.itemizer.item(Change::Attrs, rel, false);
        if self.opts.dry_run {
            return;
        }
        let spec = FinishSpec {
            mode: Some(src_md.mode() & 0o7777),
            owner: owner_differs.then_some((src_md.uid(), src_md.gid())),
            times: Some(meta::times(src_md)),
            ..Default::default()
        };
        match meta::apply_by_path(dst, &spec, false) {
            Ok(()) => self.st.summary.attrs_updated += 1,
            Err(e) => self.st.fail(format!("{} '{}': {}", e.what, dst.shown(), e.source)),
        }
    }

    /// `--checksum` with equal sizes: hash both sides on the engine's shards, decide when both digests are in.
    fn compare_digests(&mut self, e: &Entry<'_>, dst_md: Stat, link_key: Option<(u64, u64)>) -> Result<(), Error> {
        let cid = self.st.compares.insert(CompareCtx {
            src: e.src.to_path_buf(),
            dst: e.dst.to_path_buf(),
            rel: e.rel.to_path_buf(),
            dir: e.dir,
            src_md: e.md.clone(),
            dst_md,
            link_key,
            digests: [None, None],
            left: 2,
            error: false,
        });
        if let Some(d) = e.dir {
            self.st.dirs.get_mut(d).pending += 1;
        }
        for (side, path) in [(0u64, e.src), (1, e.dst)] {
            let job = HashJob {
                tag: TAG_HASH | ((cid as u64) << 1) | side,
                path: path.to_path_buf(),
                follow_symlinks: side == 0 && self.opts.dereference,
            };
            self.submit(Job::Hash(job))?;
        }
        Ok(())
    }

    fn tmp_path(&mut self, dst: &Path) -> PathBuf {
        self.st.tmp_path(dst)
    }

    fn symlink_entry(&mut self, e: &Entry<'_>, dst_md: Option<&Stat>) -> Result<(), Error> {
        let target = match fs::read_link(e.src) {
            Ok(t) => t,
            Err(err) => {
                self.st.fail(format!("cannot read symlink '{}': {err}", e.src.shown()));
                return Ok(());
            }
        };
        if self.opts.sync.is_some()
            && dst_md.is_some_and(|m| m.is_symlink())
            && fs::read_link(e.dst).is_ok_and(|t| t == target)
        {
            self.st.summary.unchanged += 1;
            return Ok(());
        }
        self.itemizer.item(if dst_md.is_some() { Change::Update } else { Change::Copy }, e.rel, false);
        if self.opts.dry_run {
            self.st.summary.symlinks += 1;
            return Ok(());
        }
        self.st.touch(e.dir);
        match self.symlink(&target, e.dst, e.md) {
            Ok(()) => self.st.summary.symlinks += 1,
            Err(msg) => self.st.fail(msg),
        }
        Ok(())
    }

    fn symlink(&mut self, target: &Path, dst: &Path, md: &Metadata) -> Result<(), String> {
        let tmp = self.tmp_path(dst);
        std::os::unix::fs::symlink(target, &tmp)
            .map_err(|e| format!("cannot create symlink '{}': {e}", dst.shown()))?;
        let spec = FinishSpec { owner: Some((md.uid(), md.gid())), times: Some(meta::times(md)), ..Default::default() };
        let done = meta::apply_by_path(&tmp, &spec, true)
            .map_err(|e| format!("{} '{}': {}", e.what, dst.shown(), e.source))
            .and_then(|()| fs::rename(&tmp, dst).map_err(|e| format!("cannot create symlink '{}': {e}", dst.shown())));
        if done.is_err() {
            abandon(&tmp);
        }
        done
    }

    /// Copy one regular file: as one job, or opened here and cut into ranges. `dst_vacant`: nothing is at `dst`
    /// (a whole-file job may then create it unnamed, see `fastsync_engine::create_dst`).
    #[allow(clippy::too_many_arguments)]
    fn submit_file(
        &mut self,
        src: &Path,
        dst: &Path,
        md: &Metadata,
        dir: Option<usize>,
        link_key: Option<(u64, u64)>,
        attempt: u8,
        dst_vacant: bool,
    ) -> Result<(), Error> {
        let setgid_dir = dir.is_some_and(|d| self.st.dirs.get_mut(d).setgid);
        let (preserve, fsync, verify) = (self.opts.preserve, self.opts.fsync, self.opts.verify);
        let mut spec = match meta::finish_spec(src, md, preserve, &self.id, setgid_dir, fsync, verify) {
            Ok(s) => s,
            Err(e) => {
                self.st.fail(format!("cannot read extended attributes of '{}': {e}", src.shown()));
                self.st.link_failed(link_key);
                return Ok(());
            }
        };
        spec.source_stamp = Some(stamp_of(md, self.opts.dereference));
        self.st.touch(dir);
        let size = md.size();
        let sparse = meta::looks_sparse(md);
        if attempt == 1 {
            self.st.progress.add_total(size);
        }
        let ctx = FileCtx {
            dir,
            src: src.to_path_buf(),
            dst: dst.to_path_buf(),
            jobs_left: 1,
            done_ok: false,
            failed: false,
            source_changed: false,
            attempt,
            link_key,
            chunks: None,
        };
        let want_direct = self.direct_ok && !sparse && size >= DIRECT_FILE_BYTES_MIN;
        match plan::plan_file(size, sparse, self.shards, want_direct) {
            FilePlan::Whole => {
                let tmp = self.tmp_path(dst);
                let fid = self.st.files.insert(ctx);
                if let Some(d) = dir {
                    self.st.dirs.get_mut(d).pending += 1;
                }
                let job = FileJob {
                    tag: fid as u64,
                    src: src.to_path_buf(),
                    tmp,
                    dst: dst.to_path_buf(),
                    dst_vacant,
                    size_hint: size,
                    follow_symlinks: self.opts.dereference,
                    finish: spec,
                };
                self.submit(Job::File(job))?;
            }
            FilePlan::Chunked { chunk_bytes, parallel } => {
                self.submit_chunked(ctx, md, spec, want_direct, chunk_bytes, parallel)?
            }
        }
        Ok(())
    }

    /// A large (or sparse) file: open both sides here, resume from an earlier run's journal when there is one, and
    /// hand out its ranges (all at once when `parallel`, else one after the other).
    fn submit_chunked(
        &mut self,
        ctx: FileCtx,
        md: &Metadata,
        mut spec: FinishSpec,
        want_direct: bool,
        chunk_bytes: u64,
        parallel: bool,
    ) -> Result<(), Error> {
        let (src, dst, dir, link_key) = (ctx.src.clone(), ctx.dst.clone(), ctx.dir, ctx.link_key);
        let opened = open_pair(
            &src,
            &dst,
            want_direct,
            self.opts.dereference,
            spec.create_mode,
            md,
            chunk_bytes,
            &mut self.st.tmp_seq,
        );
        let Opened2 { src_fd, dst_fd, tmp, direct, journal, recorded, size } = match opened {
            Ok(o) => o,
            Err(msg) => {
                self.st.fail(msg);
                self.st.link_failed(link_key);
                return Ok(());
            }
        };
        if journal.is_some() {
            // The temporary may come from an earlier run that set other permission bits: always set them.
            spec.mode = Some(md.mode() & 0o7777);
        }
        let chunk_bytes = recorded.as_ref().map_or(chunk_bytes, |r| r.0);
        let done: HashSet<(u64, u64)> = recorded.map(|r| r.1.into_iter().collect()).unwrap_or_default();
        let fid = self.st.files.insert(ctx);
        if let Some(d) = dir {
            self.st.dirs.get_mut(d).pending += 1;
        }
        let sparse = meta::looks_sparse(md);
        let file = Arc::new(ChunkedFile {
            src_fd,
            dst_fd,
            src,
            tmp,
            dst,
            size,
            direct,
            finish: spec,
            // One hold while ranges are handed out, released when the last one is.
            ranges_left: AtomicU32::new(1),
            failed: AtomicBool::new(false),
            journal,
            interrupted: AtomicBool::new(false),
        });
        let extents = if sparse { data_extents(&file.src_fd, size) } else { vec![(0, size)] };
        let mut queue: VecDeque<(u64, u64, bool)> = VecDeque::new();
        for (start, end) in extents {
            for (offset, len) in plan::split_extent(start, end, chunk_bytes) {
                queue.push_back((offset, len, done.contains(&(offset, len))));
            }
        }
        self.st.files.get_mut(fid).chunks = Some(Chunks { file, parallel, queue });
        // A sequential file gets its next range when the previous one completes (see `State::on_completion`).
        while self.submit_next_range(fid)? && parallel {}
        Ok(())
    }

    /// Hand out the next range of file `fid` (returns true), or, when none is left, release the planner's hold
    /// (returns false; the file may be finished and forgotten by then).
    fn submit_next_range(&mut self, fid: usize) -> Result<bool, Error> {
        let f = self.st.files.get_mut(fid);
        let Some(chunks) = f.chunks.as_mut() else { return Ok(false) };
        let file = chunks.file.clone();
        let next = if file.failed.load(Ordering::Acquire) || self.interrupted.is_some() {
            chunks.queue.clear();
            None
        } else {
            chunks.queue.pop_front()
        };
        match next {
            Some((offset, len, resume)) => {
                file.ranges_left.fetch_add(1, Ordering::AcqRel);
                f.jobs_left += 1;
                let job = RangeJob { tag: fid as u64, file, offset, len, resume };
                self.submit(Job::Range(job))?;
                Ok(true)
            }
            None => {
                f.chunks = None;
                // Release the hold; if every range already completed, the file is finished here.
                let outcome = file.complete_range(None, Ok(()));
                self.st.on_completion(Completion { tag: fid as u64, bytes: 0, shard: usize::MAX, outcome });
                Ok(false)
            }
        }
    }

    /// `sync --delete`: remove what the source no longer has, now that every transfer succeeded.
    fn delete_pass(&mut self, src: &Path, target: &Path, sync: &SyncOptions) {
        let dirs = std::mem::take(&mut self.delete_dirs);
        let pass = DeletePass {
            src_root: src,
            dst_root: target,
            dirs: &dirs,
            follow_symlinks: self.opts.dereference,
            filter: &self.opts.filter,
            dry_run: self.opts.dry_run,
            max_delete: sync.max_delete,
            itemizer: &self.itemizer,
        };
        match pass.run() {
            Ok(deleted) => {
                self.st.summary.deleted += deleted.entries;
                for f in deleted.failures {
                    self.st.fail(f);
                }
            }
            Err(msg) => self.st.fail(msg),
        }
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
        if c.tag & TAG_HASH != 0 {
            return self.on_digest(c);
        }
        let fid = c.tag as usize;
        self.summary.bytes += c.bytes;
        self.progress.inc(c.bytes);
        let f = self.files.get_mut(fid);
        match c.outcome {
            Outcome::FileDone | Outcome::RangeDoneFileDone => f.done_ok = true,
            Outcome::RangeDone | Outcome::RangeAbandoned | Outcome::Hashed { .. } | Outcome::Bench(_) => {}
            Outcome::Moved { .. } => unreachable!("the executor submits no socket jobs"),
            Outcome::Failed(e) if e.op == Op::SourceChanged && f.attempt < SOURCE_ATTEMPTS_MAX => {
                f.source_changed = true;
                f.failed = true;
            }
            Outcome::Failed(e) if e.op == Op::Interrupted => {
                // Ctrl-C: not a failure of this file; the summary says the run was interrupted.
                f.failed = true;
            }
            Outcome::Failed(e) => {
                // Every range of a chunked file shares this context: report the file's first failure only.
                let first = !f.failed || f.source_changed;
                f.failed = true;
                f.source_changed = false;
                if first {
                    let msg = if e.op == Op::SourceChanged {
                        format!("{e} (it kept changing during {SOURCE_ATTEMPTS_MAX} attempts)")
                    } else {
                        e.to_string()
                    };
                    self.fail(msg);
                }
            }
        }
        let f = self.files.get_mut(fid);
        f.jobs_left -= 1;
        if f.jobs_left > 0 {
            // A sequential file's range finished (one is in flight at a time, so this is the only request): hand
            // out the next one, or release the hold.
            if f.chunks.as_ref().is_some_and(|ch| !ch.parallel) {
                self.deferred.push_back(Deferred::NextRange(fid));
            }
            return;
        }
        let f = self.files.remove(fid);
        if f.source_changed {
            self.summary.retried += 1;
            self.deferred.push_back(Deferred::Transfer {
                src: f.src,
                dst: f.dst,
                dir: f.dir,
                link_key: f.link_key,
                attempt: f.attempt + 1,
                itemize: None,
            });
            return;
        }
        let ok = f.done_ok && !f.failed;
        if ok {
            self.summary.files += 1;
            self.progress.file_done();
        }
        if ok {
            self.link_settled(f.link_key, &f.dst);
        } else {
            self.link_failed(f.link_key);
        }
        if let Some(d) = f.dir {
            self.child_done(d);
        }
    }

    /// One digest of a `--checksum` comparison.
    fn on_digest(&mut self, c: Completion) {
        let cid = ((c.tag & !TAG_HASH) >> 1) as usize;
        let side = (c.tag & 1) as usize;
        let cmp = self.compares.get_mut(cid);
        cmp.left -= 1;
        match c.outcome {
            Outcome::Hashed { digest, .. } => cmp.digests[side] = Some(digest),
            Outcome::Failed(e) => {
                cmp.error = true;
                self.fail(e.to_string());
            }
            _ => unreachable!("hash jobs end hashed or failed"),
        }
        let cmp = self.compares.get_mut(cid);
        if cmp.left > 0 {
            return;
        }
        let cmp = self.compares.remove(cid);
        if cmp.error {
            self.link_failed(cmp.link_key);
            if let Some(d) = cmp.dir {
                self.child_done(d);
            }
        } else if cmp.digests[0] == cmp.digests[1] {
            self.deferred.push_back(Deferred::Unchanged(Box::new(cmp)));
        } else {
            self.deferred.push_back(Deferred::Transfer {
                src: cmp.src,
                dst: cmp.dst,
                dir: cmp.dir,
                link_key: cmp.link_key,
                attempt: 1,
                itemize: Some(cmp.rel),
            });
        }
    }

    fn tmp_path(&mut self, dst: &Path) -> PathBuf {
        self.tmp_seq += 1;
        stale::unique(dst, self.tmp_seq)
    }

    /// Create `name` as a hard link to the already-copied `first` (atomically replacing what is there).
    fn make_link(&mut self, first: &Path, name: &Path) {
        let tmp = self.tmp_path(name);
        let r = fs::hard_link(first, &tmp).and_then(|()| fs::rename(&tmp, name));
        match r {
            Ok(()) => self.summary.hardlinks += 1,
            Err(e) => {
                abandon(&tmp);
                self.fail(format!("cannot create hard link '{}': {e}", name.shown()));
            }
        }
    }

    /// The first name of a hard-linked inode is in place at `dst`: link the names that waited for it.
    fn link_settled(&mut self, key: Option<(u64, u64)>, dst: &Path) {
        let Some(key) = key else { return };
        let waiters = match self.links.insert(key, LinkState::Done(dst.to_path_buf())) {
            Some(LinkState::Pending { waiters }) => waiters,
            _ => Vec::new(),
        };
        for (name, dir) in waiters {
            self.touch(dir);
            self.make_link(dst, &name);
            if let Some(d) = dir {
                self.child_done(d);
            }
        }
    }

    fn link_failed(&mut self, key: Option<(u64, u64)>) {
        let Some(key) = key else { return };
        if let Some(LinkState::Pending { waiters, .. }) = self.links.insert(key, LinkState::Failed) {
            for (name, dir) in waiters {
                self.fail(format!("cannot link '{}': its first copy failed", name.shown()));
                if let Some(d) = dir {
                    self.child_done(d);
                }
            }
        }
    }

    /// Something is being created, replaced or removed in directory `dir`: its metadata must be set again.
    fn touch(&mut self, dir: Option<usize>) {
        if let Some(d) = dir {
            self.dirs.get_mut(d).touched = true;
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
            if (!node.in_place || node.touched)
                && let Err(e) = meta::apply_by_path(&node.dst, &node.spec, false)
            {
                self.fail(format!("{} '{}': {}", e.what, node.dst.shown(), e.source));
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

fn parent_or_dot(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
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

/// Both sides of a chunked file, opened.
struct Opened2 {
    src_fd: OwnedFd,
    dst_fd: OwnedFd,
    tmp: PathBuf,
    direct: bool,
    journal: Option<Journal>,
    /// Chunk size and ranges an earlier run recorded (resume).
    recorded: Option<(u64, Vec<(u64, u64)>)>,
    /// The source's size as opened (the walk's may be stale); the temporary has it already.
    size: u64,
}

/// Open the source and the temporary destination of a chunked file. The temporary is the stable `.NAME.fstmp-part`
/// with its journal (resuming an earlier run's work when the journal describes this very source), or, when another
/// live run holds that journal, a private name. O_DIRECT is tried when asked and dropped where the filesystem
/// refuses it (EINVAL, e.g. tmpfs); a source that is already in the page cache is read through it even then (only
/// the destination is written directly): memory is faster than the device, which then only has to write.
#[allow(clippy::too_many_arguments)]
fn open_pair(
    src: &Path,
    dst: &Path,
    direct: bool,
    follow: bool,
    create_mode: u32,
    md: &Metadata,
    chunk_bytes: u64,
    tmp_seq: &mut u64,
) -> Result<Opened2, String> {
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    let open_src = |d: bool| open_raw(src, libc::O_RDONLY | nofollow | if d { O_DIRECT } else { 0 }, 0);
    let (src_fd, direct) = match open_src(direct) {
        Ok(fd) => (fd, direct),
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => match open_src(false) {
            Ok(fd) => (fd, false),
            Err(e) => return Err(format!("cannot open '{}': {e}", src.shown())),
        },
        Err(e) => return Err(format!("cannot open '{}': {e}", src.shown())),
    };
    let opened_md = fstat(&src_fd).map_err(|e| format!("cannot stat '{}': {e}", src.shown()))?;
    let size = opened_md.st_size as u64;
    if direct && mostly_cached(&src_fd, size) {
        clear_o_direct(&src_fd).map_err(|e| format!("cannot open '{}': {e}", src.shown()))?;
    }
    // The walk's mtime, not the open file's: a file that changed since the walk is caught by the stamp check.
    let id = SourceId { size, mtime: Timestamp { sec: md.mtime(), nsec: md.mtime_nsec() }, ino: opened_md.st_ino };
    let journal_path = stale::journal(dst);
    let (tmp, journal, recorded, flags) = match Journal::open(&journal_path, id, chunk_bytes) {
        Ok(Opened::Resume(j, rec)) => (stale::part(dst), Some(j), Some((rec.chunk_bytes, rec.ranges)), 0),
        Ok(Opened::Fresh(j)) => (stale::part(dst), Some(j), None, libc::O_TRUNC),
        // Another run is writing this file, or no journal can be kept here: a private temporary, no resume.
        Ok(Opened::Busy) | Err(_) => {
            *tmp_seq += 1;
            (stale::unique(dst, *tmp_seq), None, None, libc::O_EXCL)
        }
    };
    let create = |d: bool, flags: libc::c_int| {
        let flags = libc::O_RDWR | libc::O_CREAT | flags | if d { O_DIRECT } else { 0 };
        open_raw(&tmp, flags, create_mode as libc::mode_t)
    };
    let fail = |e: io::Error| {
        if let Some(j) = &journal {
            j.remove();
        }
        format!("cannot create '{}': {e}", dst.shown())
    };
    let dst_fd = match create(direct, flags) {
        Ok(fd) => fd,
        Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
            if flags == libc::O_EXCL {
                abandon(&tmp);
            }
            create(false, flags).map_err(fail)?
        }
        Err(e) => return Err(fail(e)),
    };
    // A resumed temporary already has this size; a new one gets it now (holes stay holes).
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::ftruncate(dst_fd.as_raw_fd(), size as libc::off_t) } != 0 {
        let e = io::Error::last_os_error();
        if journal.is_none() {
            abandon(&tmp);
        }
        return Err(format!("cannot create '{}': {e}", dst.shown()));
    }
    Ok(Opened2 { src_fd, dst_fd, tmp, direct, journal, recorded, size })
}

/// Whether nearly all of the first `size` bytes of `fd` are in the page cache, judged from 64 pages spread evenly
/// over them (`mincore` on a read-only mapping, which reads nothing and costs microseconds for any size).
fn mostly_cached(fd: &OwnedFd, size: u64) -> bool {
    const SAMPLES: usize = 64;
    const PAGE_BYTES: usize = 4096;
    let Ok(len) = usize::try_from(size) else { return false };
    if !cfg!(target_os = "linux") || len < PAGE_BYTES {
        return false;
    }
    // SAFETY: a fresh shared read-only mapping of a descriptor we hold, unmapped below; nothing is read through it.
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
    if map == libc::MAP_FAILED {
        return false;
    }
    let mut cached = 0;
    for i in 0..SAMPLES {
        let offset = (len / SAMPLES * i) / PAGE_BYTES * PAGE_BYTES;
        let mut resident = 0u8;
        // SAFETY: one page inside the mapping; one byte of output for it.
        let page = unsafe { map.cast::<u8>().add(offset) };
        if unsafe { libc::mincore(page.cast(), 1, (&mut resident as *mut u8).cast()) } == 0 && resident & 1 == 1 {
            cached += 1;
        }
    }
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(map, len) };
    cached * 10 >= SAMPLES * 9
}

/// Read `fd` through the page cache from now on (Linux lets `F_SETFL` change O_DIRECT).
fn clear_o_direct(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain fcntl calls on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !O_DIRECT) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0 { Ok(st) } else { Err(io::Error::last_os_error()) }
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
