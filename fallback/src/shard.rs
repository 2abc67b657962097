//! What a shard does with each job: whole files and ranges, copied with blocking syscalls through slot 0 of the
//! shard's arena (or offloaded to the kernel on Linux), verified when asked, then finished or abandoned.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::Ordering;

use fastsync_engine::{
    AlignedArena, Completion, FileJob, HashJob, Job, JobError, Op, Outcome, RangeJob, ShardStats, blocking, create_dst,
    discard, finish_file,
};

use crate::sys;
use fastsync_engine::offload::{Offload, offload_file, offload_range};

/// The I/O alignment O_DIRECT needs on every device we expect (buffers are page-aligned slots of the arena).
const DIRECT_ALIGN_BYTES: usize = 4096;

/// The names one copy deals with, for errors: where bytes come from, the file written, the name users asked for.
struct Names<'a> {
    src: &'a Path,
    dst: &'a Path,
}

/// One shard's state: its buffer and its counters. Runs one job at a time, start to end.
pub(crate) struct Shard {
    arena: AlignedArena,
    stats: ShardStats,
}

impl Shard {
    pub(crate) fn new(arena: AlignedArena) -> Self {
        Shard { arena, stats: ShardStats::default() }
    }

    pub(crate) fn into_stats(self) -> ShardStats {
        self.stats
    }

    /// Run one job to its end and describe how it ended.
    pub(crate) fn run(&mut self, job: Job, shard: usize) -> Completion {
        let tag = job.tag();
        let mut written_bytes = 0;
        let job = match job {
            Job::Send(send) => {
                let outcome = crate::net::send(&self.arena, send, &mut self.stats.syscalls);
                return self.socket_done(tag, shard, outcome, false);
            }
            Job::Recv(recv) => {
                let outcome = crate::net::recv(&self.arena, recv, &mut self.stats.syscalls);
                return self.socket_done(tag, shard, outcome, true);
            }
            job => job,
        };
        let outcome = match &job {
            Job::File(file) => self.run_file(file, &mut written_bytes),
            Job::Range(range) => self.run_range(range, &mut written_bytes),
            Job::Hash(hash) => self.run_hash(hash),
            Job::Send(_) | Job::Recv(_) => unreachable!("socket jobs ran above"),
            Job::Bench(bench) => match crate::bench::run(&self.arena, bench) {
                Ok(report) => {
                    written_bytes = report.write.bytes;
                    Outcome::Bench(Box::new(report))
                }
                Err(e) => Outcome::Failed(e),
            },
        };
        self.stats.jobs += 1;
        self.stats.bytes_written += written_bytes;
        Completion { tag, bytes: written_bytes, shard, outcome }
    }

    /// Count a socket job; a received payload counts as written.
    fn socket_done(&mut self, tag: u64, shard: usize, outcome: Outcome, written: bool) -> Completion {
        let bytes = match &outcome {
            Outcome::Moved { bytes, .. } => *bytes,
            _ => 0,
        };
        self.stats.jobs += 1;
        if written {
            self.stats.bytes_written += bytes;
        }
        Completion { tag, bytes, shard, outcome }
    }

    fn run_file(&mut self, job: &FileJob, written_bytes: &mut u64) -> Outcome {
        let src = match sys::open_source(&job.src, job.follow_symlinks) {
            Ok(fd) => fd,
            Err(e) => return Outcome::Failed(JobError::new(Op::Open, &job.src, e)),
        };
        // Read access is needed to read written blocks back. A failed create leaves nothing to clean up; with EEXIST
        // the temporary name is someone else's file, which must not be removed. Users know the destination's name.
        let (dst, created) =
            match create_dst(&job.tmp, &job.dst, job.dst_vacant, job.finish.verify, job.finish.create_mode) {
                Ok(created) => created,
                Err(e) => return Outcome::Failed(JobError::new(Op::Create, &job.dst, e)),
            };
        let names = Names { src: &job.src, dst: &job.dst };
        let result = self
            .copy_file(src.as_fd(), dst.as_fd(), job, &names, written_bytes)
            .and_then(|()| finish_file(dst.as_fd(), None, &job.src, (&job.tmp, created), &job.dst, &job.finish));
        drop(src);
        drop(dst);
        match result {
            Ok(()) => Outcome::FileDone,
            Err(e) => {
                discard(created, &job.tmp);
                Outcome::Failed(e)
            }
        }
    }

    /// Copy a whole file to its end of file, whatever its size was when it was walked.
    fn copy_file(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        job: &FileJob,
        names: &Names<'_>,
        written_bytes: &mut u64,
    ) -> Result<(), JobError> {
        let verify = job.finish.verify;
        // A file that was empty when walked most likely still is: one read proves it, cheaper than a clone attempt.
        // Verification needs the bytes in memory, so it always takes the read/write path.
        let start = if verify || job.size_hint == 0 {
            0
        } else {
            match offload_file(src, dst, names.dst, &mut self.stats.syscalls, written_bytes)? {
                Offload::Complete => return Ok(()),
                Offload::ResumeAt(offset) => offset,
            }
        };
        self.copy_blocks(src, dst, names, start, None, verify, written_bytes)
    }

    fn run_hash(&mut self, job: &HashJob) -> Outcome {
        // SAFETY: one job at a time: nothing else uses slot 0 now.
        let buf = unsafe { self.arena.slot_mut(0) };
        match blocking::hash_file(&job.path, job.follow_symlinks, buf) {
            Ok((digest, bytes)) => Outcome::Hashed { digest, bytes },
            Err(e) => Outcome::Failed(e),
        }
    }

    fn run_range(&mut self, job: &RangeJob, written_bytes: &mut u64) -> Outcome {
        let file = &*job.file;
        // Once another range failed the file will be abandoned: copying this one would be wasted I/O. A range an
        // earlier run recorded is copied only if the destination's bytes differ.
        let skip = file.failed.load(Ordering::Acquire) || (job.resume && self.range_already_copied(job));
        let result = if skip { Ok(()) } else { self.copy_range(job, written_bytes) };
        file.complete_range(Some((job.offset, job.len)), result)
    }

    /// Whether a range an earlier run recorded is really there (a read error counts as "no": it is copied again).
    fn range_already_copied(&mut self, job: &RangeJob) -> bool {
        let file = &*job.file;
        // SAFETY: one job at a time: nothing else uses slot 0 now.
        let buf = unsafe { self.arena.slot_mut(0) };
        let (src, dst) = (file.src_fd.as_fd(), file.dst_fd.as_fd());
        blocking::range_matches(src, dst, job.offset, job.len, buf, &file.src, &file.dst).unwrap_or(false)
    }

    /// Copy one range at the same offsets in both files. The destination already has its final size.
    fn copy_range(&mut self, job: &RangeJob, written_bytes: &mut u64) -> Result<(), JobError> {
        let file = &*job.file;
        let (src, dst) = (file.src_fd.as_fd(), file.dst_fd.as_fd());
        let names = Names { src: &file.src, dst: &file.dst };
        let verify = file.finish.verify;
        let end = job.offset + job.len;
        if file.direct {
            // O_DIRECT descriptors: aligned blocks through the arena (the kernel's copy would go through the page
            // cache, or refuse them).
            return self.copy_blocks_direct(src, dst, &names, job.offset, end, verify, written_bytes);
        }
        let start = if verify {
            job.offset
        } else {
            match offload_range(src, dst, job.offset, Some(end), &mut self.stats.syscalls, written_bytes) {
                Offload::Complete => return Ok(()),
                Offload::ResumeAt(offset) => offset,
            }
        };
        self.copy_blocks(src, dst, &names, start, Some(end), verify, written_bytes)
    }

    /// Copy `[start, end)` between descriptors opened with O_DIRECT, one block at a time through slot 0: offsets
    /// and lengths are multiples of 4 KiB (the ranges start on block boundaries; the file's last block is read and
    /// written whole, zero-padded, and the size is fixed by the truncate when the file is finished). With `verify`,
    /// each block is read back and compared by BLAKE3 like [`Self::copy_blocks`].
    #[allow(clippy::too_many_arguments)]
    fn copy_blocks_direct(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        names: &Names<'_>,
        start: u64,
        end: u64,
        verify: bool,
        written_bytes: &mut u64,
    ) -> Result<(), JobError> {
        let block_bytes = self.arena.block_bytes();
        // SAFETY: the shard runs one job at a time with blocking syscalls: nothing else touches slot 0 meanwhile.
        let slot = unsafe { self.arena.slot_mut(0) };
        let calls = &mut self.stats.syscalls;
        let mut offset = start;
        while offset < end {
            let want_bytes = (end - offset).min(block_bytes as u64) as usize;
            let io_bytes = want_bytes.next_multiple_of(DIRECT_ALIGN_BYTES).min(block_bytes);
            let block = &mut slot[..io_bytes];
            let read_bytes =
                sys::pread_full(src, block, offset, calls).map_err(|e| JobError::new(Op::Read, names.src, e))?;
            if read_bytes < want_bytes {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while copying");
                return Err(JobError::new(Op::SourceChanged, names.src, e));
            }
            // Past the source's end (the padding of the last block): zeros, cut off by the final truncate.
            block[want_bytes..].fill(0);
            let source_hash = verify.then(|| blake3::hash(&block[..want_bytes]));
            sys::pwrite_all(dst, block, offset, calls).map_err(|e| JobError::new(Op::Write, names.dst, e))?;
            *written_bytes += want_bytes as u64;
            if let Some(source_hash) = source_hash {
                verify_back(dst, block, want_bytes, offset, source_hash, names, calls)?;
            }
            offset += want_bytes as u64;
        }
        Ok(())
    }

    /// Copy `[start, end)`, or from `start` to end of file when `end` is `None`, one block at a time through slot 0.
    ///
    /// With `verify`, each block is hashed as read from the source, written, read back from the destination into the
    /// same slot, hashed again and compared. With an `end`, a source that ends before it has shrunk.
    #[allow(clippy::too_many_arguments)]
    fn copy_blocks(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        names: &Names<'_>,
        start: u64,
        end: Option<u64>,
        verify: bool,
        written_bytes: &mut u64,
    ) -> Result<(), JobError> {
        let block_bytes = self.arena.block_bytes();
        // SAFETY: the shard runs one job at a time with blocking syscalls: nothing else touches slot 0 meanwhile.
        let slot = unsafe { self.arena.slot_mut(0) };
        let calls = &mut self.stats.syscalls;
        let mut offset = start;
        loop {
            let want_bytes = match end {
                None => block_bytes,
                Some(end) if offset >= end => return Ok(()),
                Some(end) => (end - offset).min(block_bytes as u64) as usize,
            };
            let block = &mut slot[..want_bytes];
            let read_bytes =
                sys::pread_full(src, block, offset, calls).map_err(|e| JobError::new(Op::Read, names.src, e))?;
            // `pread_full` stops short only at end of file.
            let at_eof = read_bytes < want_bytes;
            if at_eof && end.is_some() {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while copying");
                return Err(JobError::new(Op::SourceChanged, names.src, e));
            }
            if read_bytes > 0 {
                let data = &mut block[..read_bytes];
                let source_hash = verify.then(|| blake3::hash(data));
                sys::pwrite_all(dst, data, offset, calls).map_err(|e| JobError::new(Op::Write, names.dst, e))?;
                *written_bytes += read_bytes as u64;
                if let Some(source_hash) = source_hash {
                    verify_back(dst, data, read_bytes, offset, source_hash, names, calls)?;
                }
                offset += read_bytes as u64;
            }
            if at_eof {
                return Ok(());
            }
        }
    }
}

/// `--verify`: read `block` back from `dst` at `offset` (into the same memory) and check that its first `len` bytes
/// hash to `source_hash`. A short read-back leaves source bytes in the tail of the block: lengths count too.
fn verify_back(
    dst: BorrowedFd<'_>,
    block: &mut [u8],
    len: usize,
    offset: u64,
    source_hash: blake3::Hash,
    names: &Names<'_>,
    calls: &mut u64,
) -> Result<(), JobError> {
    let back_bytes = sys::pread_full(dst, block, offset, calls).map_err(|e| JobError::new(Op::Verify, names.dst, e))?;
    if back_bytes < len || blake3::hash(&block[..len]) != source_hash {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            format!("destination differs from source (BLAKE3 mismatch at offset {offset})"),
        );
        return Err(JobError::new(Op::Verify, names.dst, e));
    }
    Ok(())
}
