//! Benchmark jobs on a blocking shard thread: one op at a time (fio's `psync`), timed per op.
//!
//! Data ops are `pread`/`pwrite` through the shard's aligned buffer (O_DIRECT where the platform has it); metadata
//! ops are `openat` + `write`/`read` + `close`, `fstatat` and `unlinkat` relative to the job's directory. More
//! parallelism comes from more shards (`--threads`), not from `--iodepth`. The contract is in
//! [`fastsync_engine::bench`].

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::Ordering;
use std::time::Instant;

use fastsync_engine::bench::{
    BenchJob, BenchReport, BenchWork, IoOp, IoPlan, IoSpec, MetaPhase, MetaSpec, fill_random,
};
use fastsync_engine::{AlignedArena, JobError, Op};

pub(crate) fn run(arena: &AlignedArena, job: &BenchJob) -> Result<BenchReport, JobError> {
    match &job.work {
        BenchWork::Io(spec) => job.run_guarded(|| run_io(arena, spec, job)),
        BenchWork::Meta(spec) => job.run_guarded(|| run_meta(arena, spec, job)),
    }
}

#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
const O_DIRECT: libc::c_int = libc::O_DIRECT;
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
const O_DIRECT: libc::c_int = 0;

fn run_io(arena: &AlignedArena, spec: &IoSpec, job: &BenchJob) -> Result<BenchReport, JobError> {
    let err = |op: Op, e: io::Error| JobError::new(op, &spec.path, e);
    if spec.direct && O_DIRECT == 0 {
        return Err(err(Op::Bench, io::Error::new(io::ErrorKind::Unsupported, "O_DIRECT is not available here")));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(spec.read_pct < 100)
        .custom_flags(if spec.direct { O_DIRECT } else { 0 })
        .open(&spec.path)
        .map_err(|e| err(Op::Open, e))?;
    let len = spec.block_bytes as usize;
    if len > arena.block_bytes() {
        let e = io::Error::new(io::ErrorKind::InvalidInput, "block size larger than the shard's buffers");
        return Err(err(Op::Bench, e));
    }
    // SAFETY: the shard runs one job at a time and no I/O is in flight outside this function.
    let buf = unsafe { &mut arena.slot_mut(0)[..len] };
    if spec.read_pct < 100 {
        fill_random(buf, spec.seed);
    }

    let started = job.wait_start();
    let mut plan = IoPlan::new(spec, started)?;
    let mut report = BenchReport::default();
    let mut now = started;
    while let Some(op) = plan.next(&job.stop, now) {
        let result = match op {
            IoOp::Read { offset } => file.read_exact_at(buf, offset).map_err(|e| err(Op::Read, e)),
            IoOp::Write { offset } => file.write_all_at(buf, offset).map_err(|e| err(Op::Write, e)),
            IoOp::Fsync => file.sync_all().map_err(|e| err(Op::Fsync, e)),
        };
        result?;
        let done = Instant::now();
        let (stat, bytes) = match op {
            IoOp::Read { .. } => (&mut report.read, len as u64),
            IoOp::Write { .. } => (&mut report.write, len as u64),
            IoOp::Fsync => (&mut report.fsync, 0),
        };
        stat.record(bytes, done - now);
        if bytes > 0 {
            job.live.ops.fetch_add(1, Ordering::Relaxed);
            job.live.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        now = done;
    }
    if spec.end_fsync {
        let at = Instant::now();
        file.sync_all().map_err(|e| err(Op::Fsync, e))?;
        report.fsync.record(0, at.elapsed());
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// `-1` → the OS error, for the calls below that return -1 on failure (EINTR is not expected from these).
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn open_at(dir: &File, name: &CStr, flags: libc::c_int) -> io::Result<File> {
    // SAFETY: valid descriptor and C string.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, 0o644) })?;
    // SAFETY: fresh descriptor owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// One file's metadata op: the operation that failed and why, or the bytes moved.
fn meta_op(dir: &File, name: &CStr, phase: MetaPhase, buf: &mut [u8]) -> Result<u64, (Op, io::Error)> {
    match phase {
        MetaPhase::Create => {
            let f = open_at(dir, name, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY).map_err(|e| (Op::Create, e))?;
            if !buf.is_empty() {
                f.write_all_at(buf, 0).map_err(|e| (Op::Write, e))?;
            }
            Ok(buf.len() as u64)
        }
        MetaPhase::Read => {
            let f = open_at(dir, name, libc::O_RDONLY).map_err(|e| (Op::Open, e))?;
            if !buf.is_empty() {
                f.read_exact_at(buf, 0).map_err(|e| (Op::Read, e))?;
            }
            Ok(buf.len() as u64)
        }
        MetaPhase::Stat => {
            // SAFETY: an all-zero `stat` is a valid value; the kernel fills it.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid descriptor, C string and out-pointer.
            check(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })
                .map_err(|e| (Op::Stat, e))?;
            Ok(0)
        }
        MetaPhase::Delete => {
            // SAFETY: valid descriptor and C string.
            check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }).map_err(|e| (Op::Remove, e))?;
            Ok(0)
        }
    }
}

fn run_meta(arena: &AlignedArena, spec: &MetaSpec, job: &BenchJob) -> Result<BenchReport, JobError> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(&spec.dir)
        .map_err(|e| JobError::new(Op::Open, &spec.dir, e))?;
    let data_len = (spec.file_bytes as usize).min(arena.block_bytes());
    // SAFETY: the shard runs one job at a time and no I/O is in flight outside this function.
    let buf = unsafe { &mut arena.slot_mut(0)[..data_len] };
    if spec.phase == MetaPhase::Create {
        fill_random(buf, spec.first);
    }

    let started = job.wait_start();
    let mut report = BenchReport::default();
    for n in spec.first..spec.first + spec.count {
        if job.stop.load(Ordering::Relaxed) {
            break;
        }
        let at = Instant::now();
        let bytes =
            meta_op(&dir, &spec.name(n), spec.phase, buf).map_err(|(op, e)| JobError::new(op, spec.path(n), e))?;
        report.meta.record(bytes, at.elapsed());
        job.live.ops.fetch_add(1, Ordering::Relaxed);
        job.live.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    report.elapsed = started.elapsed();
    Ok(report)
}
