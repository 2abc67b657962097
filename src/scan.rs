//! Directory entries and their metadata, read ahead on helper threads so that the walk does not wait for `stat`.
//!
//! On a tree that is already in sync, a transfer is nothing but `getdents` and two `lstat`s per entry (source and
//! destination): kernel time, one syscall at a time. The scanner spreads that over threads: a directory is read in
//! chunks of at most [`CHUNK_ENTRIES`] entries, each chunk's source and destination metadata is looked up by a
//! scanner thread, and the next chunk (and the subdirectories the walk will enter next) are requested before the
//! walk consumes the current one. The executor still walks depth-first and decides everything; the scanner only
//! reads. Memory is bounded: at most [`AHEAD_DIRS_MAX`] directories are read ahead, one chunk each, and the walk asks
//! only for the next [`AHEAD_SUBDIRS`] subdirectories of each directory on its path, so what is read ahead is what
//! it needs soonest.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, Metadata, ReadDir};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::meta::Stat;

/// Entries per chunk: enough to amortize a hand-off between threads, small enough to bound memory.
pub const CHUNK_ENTRIES: usize = 256;
/// Directories read ahead of the walk at most (each holds at most one chunk).
pub const AHEAD_DIRS_MAX: usize = 256;
/// Subdirectories of the current directory the walk keeps read ahead: the next ones a depth-first walk enters.
pub const AHEAD_SUBDIRS: usize = 4;

/// One source entry, with what the destination has under the same name.
pub struct Scanned {
    pub name: OsString,
    pub path: PathBuf,
    /// `lstat` (or `stat` with `-L`) of the source entry.
    pub md: io::Result<Metadata>,
    /// `lstat` of the destination's entry of the same name: `None` when it was not looked up (the destination
    /// directory did not exist or was not asked for), `Some(None)` when nothing is there.
    pub dst: Option<Option<Stat>>,
}

/// What to read: a source directory, and the destination directory to look the same names up in.
#[derive(Clone)]
struct Target {
    src: PathBuf,
    dst: PathBuf,
    look_dst: bool,
    dereference: bool,
}

/// A directory being read: the rest of its stream, and the destination directory open for lookups.
struct Rest {
    iter: ReadDir,
    dst_dir: Option<Arc<OwnedFd>>,
}

struct Request {
    target: Target,
    rest: Option<Rest>,
    reply: Sender<Chunk>,
}

/// Up to [`CHUNK_ENTRIES`] entries, and how to go on (`None`: the directory is finished).
struct Chunk {
    entries: io::Result<Vec<io::Result<Scanned>>>,
    rest: Option<Rest>,
    /// First chunk only: entries in the destination directory (our temporaries not counted), when it was looked at.
    dst_entries: Option<u64>,
}

/// The scanner threads and the directories read ahead.
pub struct Scanner {
    tx: Option<Sender<Request>>,
    /// Set when the walk is over: queued requests are dropped instead of read.
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    ahead: HashMap<PathBuf, Receiver<Chunk>>,
}

impl Scanner {
    /// Start `threads` scanner threads (at least one).
    pub fn new(threads: usize) -> io::Result<Scanner> {
        // The queue holds every request that can be outstanding: one per directory read ahead, plus the walk's own.
        let (tx, rx) = bounded::<Request>(AHEAD_DIRS_MAX * 2 + 2);
        let mut handles = Vec::new();
        let stopping = Arc::new(AtomicBool::new(false));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let stopping = stopping.clone();
            let handle = std::thread::Builder::new().name(format!("fs-scan-{i}")).spawn(move || {
                for req in rx {
                    if stopping.load(Ordering::Relaxed) {
                        continue;
                    }
                    let chunk = read_chunk(&req.target, req.rest);
                    // The walk may have stopped (interrupted): nobody listens any more.
                    let _ = req.reply.send(chunk);
                }
            })?;
            handles.push(handle);
        }
        Ok(Scanner { tx: Some(tx), stopping, threads: handles, ahead: HashMap::new() })
    }

    fn request(&self, target: Target, rest: Option<Rest>) -> Receiver<Chunk> {
        let (reply, rx) = bounded(1);
        // The queue is sized for every outstanding request, so this never blocks for long; a closed queue only
        // happens at shutdown.
        let _ = self.tx.as_ref().expect("scanner running").send(Request { target, rest, reply });
        rx
    }

    /// Read the directory `src` ahead of the walk (its first chunk), if the read-ahead window has room.
    pub fn read_ahead(&mut self, src: &Path, dst: &Path, look_dst: bool, dereference: bool) {
        if self.ahead.len() >= AHEAD_DIRS_MAX || self.ahead.contains_key(src) {
            return;
        }
        let target = Target { src: src.to_path_buf(), dst: dst.to_path_buf(), look_dst, dereference };
        let rx = self.request(target, None);
        self.ahead.insert(src.to_path_buf(), rx);
    }

    /// Start walking `src`: its first chunk (read ahead, or read now). Fails when the directory cannot be opened.
    pub fn open(&mut self, src: &Path, dst: &Path, look_dst: bool, dereference: bool) -> io::Result<DirScan> {
        let rx = match self.ahead.remove(src) {
            Some(rx) => rx,
            None => {
                let target = Target { src: src.to_path_buf(), dst: dst.to_path_buf(), look_dst, dereference };
                self.request(target, None)
            }
        };
        let target = Target { src: src.to_path_buf(), dst: dst.to_path_buf(), look_dst, dereference };
        let mut scan = DirScan {
            target,
            ready: VecDeque::new(),
            next: Some(rx),
            first: true,
            new_chunk: false,
            dst_entries: None,
        };
        scan.fill(self)?;
        Ok(scan)
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.ahead.clear();
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One directory being walked: the entries of the current chunk, and the next chunk on its way.
pub struct DirScan {
    target: Target,
    ready: VecDeque<io::Result<Scanned>>,
    next: Option<Receiver<Chunk>>,
    first: bool,
    /// A chunk arrived since [`DirScan::take_new_chunk`] was last asked.
    new_chunk: bool,
    dst_entries: Option<u64>,
}

impl DirScan {
    /// The next entry, in directory order; `None` at the end.
    pub fn next(&mut self, scanner: &mut Scanner) -> Option<io::Result<Scanned>> {
        if self.ready.is_empty()
            && let Err(e) = self.fill(scanner)
        {
            return Some(Err(e));
        }
        self.ready.pop_front()
    }

    /// How many entries the destination directory had when it was first read (`None`: not looked at).
    pub fn dst_entries(&self) -> Option<u64> {
        self.dst_entries
    }

    /// Whether a chunk arrived since the last call (its subdirectories are then worth reading ahead).
    pub fn take_new_chunk(&mut self) -> bool {
        std::mem::replace(&mut self.new_chunk, false)
    }

    /// The subdirectories of the current chunk, for the walk to read ahead.
    pub fn subdirs(&self) -> impl Iterator<Item = &Scanned> {
        self.ready.iter().filter_map(|e| e.as_ref().ok()).filter(|e| e.md.as_ref().is_ok_and(|m| m.is_dir()))
    }

    /// Wait for the next chunk and ask for the one after it at once.
    fn fill(&mut self, scanner: &Scanner) -> io::Result<()> {
        let Some(rx) = self.next.take() else { return Ok(()) };
        let chunk = rx.recv().map_err(|_| io::Error::other("directory scanner stopped"))?;
        if let Some(rest) = chunk.rest {
            self.next = Some(scanner.request(self.target.clone(), Some(rest)));
        }
        let first = std::mem::replace(&mut self.first, false);
        self.new_chunk = true;
        if first {
            self.dst_entries = chunk.dst_entries;
        }
        match chunk.entries {
            Ok(entries) => {
                self.ready.extend(entries);
                Ok(())
            }
            // Failing to open is the caller's error to report; failing later is a read error of this directory.
            Err(e) if first => Err(e),
            Err(e) => {
                self.ready.push_back(Err(e));
                Ok(())
            }
        }
    }
}

/// Read the next chunk of a directory (opening it first when `rest` is `None`), with the metadata of each entry.
fn read_chunk(target: &Target, rest: Option<Rest>) -> Chunk {
    let rest_was_none = rest.is_none();
    let Rest { mut iter, dst_dir } = match rest {
        Some(rest) => rest,
        None => match fs::read_dir(&target.src) {
            Ok(iter) => Rest { iter, dst_dir: target.look_dst.then(|| open_dir_path(&target.dst)).flatten() },
            Err(e) => return Chunk { entries: Err(e), rest: None, dst_entries: None },
        },
    };
    // Counted on the first chunk: with the number of source names found there, it tells whether the destination
    // has extraneous entries (`sync --delete`) without keeping any list of names.
    let dst_entries = (target.look_dst && rest_was_none).then(|| count_entries(&target.dst)).flatten();
    let mut entries = Vec::with_capacity(CHUNK_ENTRIES);
    let mut more = false;
    for entry in iter.by_ref() {
        let scanned = entry.map(|entry| {
            let name = entry.file_name();
            let path = entry.path();
            let md = if target.dereference { fs::metadata(&path) } else { entry.metadata() };
            let dst = dst_dir.as_ref().map(|d| Stat::at(d.as_raw_fd(), &name).ok());
            Scanned { name, path, md, dst }
        });
        entries.push(scanned);
        if entries.len() == CHUNK_ENTRIES {
            more = true;
            break;
        }
    }
    Chunk { entries: Ok(entries), rest: more.then_some(Rest { iter, dst_dir }), dst_entries }
}

/// Entries of directory `path` that are not our temporaries; `None` when it cannot be read (or does not exist).
fn count_entries(path: &Path) -> Option<u64> {
    let iter = fs::read_dir(path).ok()?;
    Some(iter.flatten().filter(|e| !crate::stale::is_temporary(&e.file_name())).count() as u64)
}

/// The destination directory open for lookups, or `None` when it does not exist (nothing to look up).
fn open_dir_path(path: &Path) -> Option<Arc<OwnedFd>> {
    let c = crate::meta::c_path(path).ok()?;
    #[cfg(target_os = "linux")]
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    #[cfg(not(target_os = "linux"))]
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid C string; the descriptor is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags) };
    // SAFETY: a fresh descriptor, owned by nobody else.
    (fd >= 0).then(|| Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}
