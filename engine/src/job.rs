//! Jobs (what a shard executes) and completions (what it reports back).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32};

use crate::JobError;
use crate::journal::Journal;

/// A point in time with nanoseconds, as `struct timespec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: i64,
}

/// What a source looked like when it was walked. Checked again after its bytes were copied: a source that changed
/// meanwhile (size, modification or change time, or inode differ) fails the job with [`crate::Op::SourceChanged`]
/// instead of being renamed into place torn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceStamp {
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub ino: u64,
    /// The stamp describes what a symlink points to (`-L`), so the check follows symlinks too.
    pub follow: bool,
}

/// What to do to a destination file once its bytes are written, before it is renamed into place.
#[derive(Clone, Debug)]
pub struct FinishSpec {
    /// Permission bits the temporary file is created with (the process umask applies). When they already give the
    /// final mode, `mode` is `None` and no `chmod` is needed.
    pub create_mode: u32,
    /// Permission bits to set (`chmod`), including setuid/setgid/sticky, when creation alone cannot give them.
    pub mode: Option<u32>,
    /// Owner and group to set; `EPERM` is ignored ("where permitted"), like `cp -a` as an ordinary user.
    pub owner: Option<(u32, u32)>,
    /// Access and modification times.
    pub times: Option<[Timestamp; 2]>,
    /// Extended attributes to set (name, value).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Make the file durable: fsync the data, rename, then fsync the directory.
    pub fsync: bool,
    /// Hash each block of the source as it is read, read it back from the destination and compare.
    pub verify: bool,
    /// When set, the source is checked against it before the rename (see [`SourceStamp`]).
    pub source_stamp: Option<SourceStamp>,
}

impl Default for FinishSpec {
    fn default() -> Self {
        FinishSpec {
            create_mode: 0o600,
            mode: None,
            owner: None,
            times: None,
            xattrs: Vec::new(),
            fsync: false,
            verify: false,
            source_stamp: None,
        }
    }
}

/// Copy one whole (small) file: open, create the temporary, copy to end of file, finish, rename.
#[derive(Debug)]
pub struct FileJob {
    /// Caller's tag, returned in the completion (the engine never interprets it).
    pub tag: u64,
    pub src: PathBuf,
    /// Temporary name in the destination directory; created exclusively, removed on failure.
    pub tmp: PathBuf,
    /// Final name; the temporary is renamed onto it when complete.
    pub dst: PathBuf,
    /// Nothing was at `dst` when the tree was walked: the copy may be an unnamed file linked to `dst` when complete
    /// instead of `tmp` (see [`crate::create_dst`]).
    pub dst_vacant: bool,
    /// Size seen when the source was walked (a hint for buffer choice; the copy runs to end of file).
    pub size_hint: u64,
    /// Open the source even if it is now a symlink (`-L`). Otherwise it is opened with O_NOFOLLOW, so a source
    /// swapped for a symlink after the walk fails instead of leaking what the link points to.
    pub follow_symlinks: bool,
    pub finish: FinishSpec,
}

/// A large file opened once by the planner's executor and copied as several [`RangeJob`]s, possibly on many shards.
///
/// The shard that completes the last range performs the finish ([`crate::finish_file`]) or, when any range failed,
/// removes the temporary file.
#[derive(Debug)]
pub struct ChunkedFile {
    pub src_fd: OwnedFd,
    pub dst_fd: OwnedFd,
    pub src: PathBuf,
    pub tmp: PathBuf,
    pub dst: PathBuf,
    /// Size of the source when it was opened; the destination was truncated to it.
    pub size: u64,
    /// The destination was opened with O_DIRECT (and the source too, unless it was already in the page cache):
    /// I/O is done in 4 KiB-aligned lengths (a read past the end of a buffered source just stops short) and the size
    /// is fixed at the end.
    pub direct: bool,
    pub finish: FinishSpec,
    /// Ranges not yet completed.
    pub ranges_left: AtomicU32,
    /// Set by the first range that fails; the finisher then abandons the file.
    pub failed: AtomicBool,
    /// Resumable copy: `tmp` is a stable name and this journal records each range once it is written. When the run
    /// is interrupted both are kept so that the next run continues; on success or failure the journal is removed.
    pub journal: Option<Journal>,
    /// A range was cancelled by an interruption ([`crate::Op::Interrupted`]).
    pub interrupted: AtomicBool,
}

impl ChunkedFile {
    /// Returns true when the caller completed the last range and must finish (or abandon) the file.
    pub fn range_done(&self, ok: bool) -> bool {
        use std::sync::atomic::Ordering;
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        self.ranges_left.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Record the end of one range (`range` = offset and length; `None` for the planner's hold) and, when it was the
    /// last, finish the file or give up its temporary if any range failed. Returns the outcome to report.
    pub fn complete_range(&self, range: Option<(u64, u64)>, result: Result<(), crate::JobError>) -> Outcome {
        use std::sync::atomic::Ordering;
        if let (Ok(()), Some((offset, len)), Some(journal)) = (&result, range, &self.journal) {
            // Best effort: a range missing from the journal is only copied again by the next run.
            let _ = journal.record(offset, len);
        }
        if let Err(e) = &result
            && e.op == crate::Op::Interrupted
        {
            self.interrupted.store(true, Ordering::Release);
        }
        let last = self.range_done(result.is_ok());
        match result {
            Err(e) => {
                if last {
                    self.give_up();
                }
                Outcome::Failed(e)
            }
            Ok(()) if !last => Outcome::RangeDone,
            // Acquire pairs with the Release in `range_done`: every earlier range's failure is visible here.
            Ok(()) if self.failed.load(Ordering::Acquire) => {
                self.give_up();
                Outcome::RangeAbandoned
            }
            Ok(()) => {
                use std::os::fd::AsFd;
                let truncate = self.direct.then_some(self.size);
                let tmp = (self.tmp.as_path(), crate::Created::Named);
                match crate::finish_file(self.dst_fd.as_fd(), truncate, &self.src, tmp, &self.dst, &self.finish) {
                    Ok(()) => {
                        if let Some(journal) = &self.journal {
                            journal.remove();
                        }
                        Outcome::RangeDoneFileDone
                    }
                    Err(e) => {
                        self.give_up();
                        Outcome::Failed(e)
                    }
                }
            }
        }
    }

    /// After a failure the temporary is removed (a full disk must not stay full of it), unless the run was
    /// interrupted and the file is resumable: then its temporary and journal stay for the next run.
    fn give_up(&self) {
        use std::sync::atomic::Ordering;
        if self.journal.is_some() && self.interrupted.load(Ordering::Acquire) {
            return;
        }
        crate::abandon(&self.tmp);
        if let Some(journal) = &self.journal {
            journal.remove();
        }
    }
}

/// Copy bytes `[offset, offset + len)` of a [`ChunkedFile`]; the range holds data (never a hole).
#[derive(Debug)]
pub struct RangeJob {
    pub tag: u64,
    pub file: Arc<ChunkedFile>,
    pub offset: u64,
    pub len: u64,
    /// An earlier, interrupted run recorded this range as written: compare the BLAKE3 digests of the source's and
    /// the destination's bytes first, and copy only when they differ.
    pub resume: bool,
}

/// Compute the BLAKE3 digest of a whole file.
#[derive(Debug)]
pub struct HashJob {
    pub tag: u64,
    pub path: PathBuf,
    /// Hash what a symlink points to; otherwise the file is opened with O_NOFOLLOW.
    pub follow_symlinks: bool,
}

/// A unit of work for a shard.
// Whole-file jobs, the common case, are the large variant: boxing them would cost an allocation per small file to
// shrink the rarer ones.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Job {
    File(FileJob),
    Range(RangeJob),
    Hash(HashJob),
    /// A benchmark workload that takes the whole shard (see [`crate::bench`]).
    Bench(crate::bench::BenchJob),
    /// One frame out of a file onto a socket (see [`crate::net`]).
    Send(crate::net::SendJob),
    /// One frame's payload off a socket into a file (see [`crate::net`]).
    Recv(crate::net::RecvJob),
}

impl Job {
    pub fn tag(&self) -> u64 {
        match self {
            Job::File(j) => j.tag,
            Job::Range(j) => j.tag,
            Job::Hash(j) => j.tag,
            Job::Bench(j) => j.tag,
            Job::Send(j) => j.tag,
            Job::Recv(j) => j.tag,
        }
    }

    /// Where the completion goes: a socket job's own channel, or `None` for the session's.
    pub fn reply(&self) -> Option<&crossbeam_channel::Sender<Completion>> {
        match self {
            Job::Send(j) => Some(&j.reply),
            Job::Recv(j) => Some(&j.reply),
            _ => None,
        }
    }

    /// Complete a job that will not run because the session was cancelled.
    pub fn cancel(self, shard: usize) -> Completion {
        let interrupted = |path: &std::path::Path| {
            crate::JobError::new(crate::Op::Interrupted, path, std::io::Error::from(std::io::ErrorKind::Interrupted))
        };
        let outcome = match &self {
            Job::File(f) => Outcome::Failed(interrupted(&f.dst)),
            Job::Range(r) => r.file.complete_range(None, Err(interrupted(&r.file.dst))),
            Job::Hash(h) => Outcome::Failed(interrupted(&h.path)),
            Job::Bench(b) => Outcome::Failed(interrupted(b.path())),
            Job::Send(j) => Outcome::Failed(interrupted(&j.path)),
            Job::Recv(j) => Outcome::Failed(interrupted(&j.path)),
        };
        Completion { tag: self.tag(), bytes: 0, shard, outcome }
    }
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    /// A whole file was copied and renamed into place.
    FileDone,
    /// A range was copied; the file is not finished yet.
    RangeDone,
    /// The last range was copied and the file was finished and renamed into place.
    RangeDoneFileDone,
    /// This range succeeded (or was skipped) but another range of the same file failed; the temporary was removed.
    RangeAbandoned,
    /// A file was hashed: its BLAKE3 digest and its length.
    Hashed { digest: [u8; 32], bytes: u64 },
    /// A socket job moved its frame: the BLAKE3 digest and length of the payload sent or received (a [`crate::net::SendJob`]
    /// sends fewer bytes than asked only when the file ended; 0: nothing was sent).
    Moved { digest: [u8; 32], bytes: u64 },
    /// A benchmark job ran to its end.
    Bench(Box<crate::bench::BenchReport>),
    /// The job failed; any temporary file was removed (a resumable file's is kept with its journal).
    Failed(JobError),
}

/// One per job, in completion order.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    /// Bytes written to the destination by this job.
    pub bytes: u64,
    /// Which shard ran it.
    pub shard: usize,
    pub outcome: Outcome,
}
