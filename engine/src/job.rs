//! Jobs (what a shard executes) and completions (what it reports back).

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32};

use crate::JobError;

/// A point in time with nanoseconds, as `struct timespec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: i64,
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
    /// Both descriptors were opened with O_DIRECT: I/O must be block-aligned and the size fixed at the end.
    pub direct: bool,
    pub finish: FinishSpec,
    /// Ranges not yet completed.
    pub ranges_left: AtomicU32,
    /// Set by the first range that fails; the finisher then abandons the file.
    pub failed: AtomicBool,
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

    /// Record the end of one range (or of the planner's hold, with `Ok`) and, when it was the last, finish the file
    /// or remove its temporary if any range failed. Returns the outcome to report for this range.
    pub fn complete_range(&self, result: Result<(), crate::JobError>) -> Outcome {
        use std::sync::atomic::Ordering;
        let last = self.range_done(result.is_ok());
        match result {
            Err(e) => {
                if last {
                    crate::abandon(&self.tmp);
                }
                Outcome::Failed(e)
            }
            Ok(()) if !last => Outcome::RangeDone,
            // Acquire pairs with the Release in `range_done`: every earlier range's failure is visible here.
            Ok(()) if self.failed.load(Ordering::Acquire) => {
                crate::abandon(&self.tmp);
                Outcome::RangeAbandoned
            }
            Ok(()) => {
                use std::os::fd::AsFd;
                let truncate = self.direct.then_some(self.size);
                match crate::finish_file(self.dst_fd.as_fd(), truncate, &self.tmp, &self.dst, &self.finish) {
                    Ok(()) => Outcome::RangeDoneFileDone,
                    Err(e) => {
                        crate::abandon(&self.tmp);
                        Outcome::Failed(e)
                    }
                }
            }
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
}

/// A unit of work for a shard.
#[derive(Debug)]
pub enum Job {
    File(FileJob),
    Range(RangeJob),
}

impl Job {
    pub fn tag(&self) -> u64 {
        match self {
            Job::File(j) => j.tag,
            Job::Range(j) => j.tag,
        }
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
    /// The job failed; any temporary file was removed.
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
