//! Benchmark jobs on a shard's ring: `iodepth` reads/writes (or metadata op chains) kept in flight, timed per op.
//!
//! Data ops use the shard's registered buffers (READ_FIXED/WRITE_FIXED) on the file registered as fixed file 0,
//! like fio's io_uring engine with `fixedbufs` and `registerfiles`. A metadata op on one file is one linked chain
//! submitted at once: OPENAT into a fixed-file slot → WRITE or READ → CLOSE for create and read, STATX for stat,
//! UNLINKAT for delete. The contract is in [`fastsync_engine::bench`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

use fastsync_engine::bench::{
    BenchJob, BenchReport, BenchWork, IoOp, IoPlan, IoSpec, MetaPhase, MetaSpec, fill_random,
};
use fastsync_engine::finish::cstr;
use fastsync_engine::{AlignedArena, JobError, Op, ShardStats};
use io_uring::{IoUring, opcode, squeue, types};

/// user_data of the fsync entries of an I/O job (slots use their index).
const FSYNC_UD: u64 = u64::MAX;

/// What a shard lends a bench job: its ring, its buffers and how many of them are registered.
pub(crate) struct Lent<'a> {
    pub ring: &'a mut IoUring,
    pub arena: &'a AlignedArena,
    pub registered: usize,
    pub stats: &'a mut ShardStats,
}

pub(crate) fn run(lent: Lent<'_>, job: &BenchJob) -> Result<BenchReport, JobError> {
    match &job.work {
        BenchWork::Io(spec) => job.run_guarded(|| run_io(lent, spec, job)),
        BenchWork::Meta(spec) => job.run_guarded(|| run_meta(lent, spec, job)),
    }
}

fn open(path: &std::path::Path, flags: libc::c_int, op: Op) -> Result<OwnedFd, JobError> {
    let c = cstr(path).map_err(|e| JobError::new(op, path, e))?;
    // SAFETY: valid C string; the descriptor is owned by the OwnedFd.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(JobError::last_os(op, path));
    }
    // SAFETY: fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Submit what is queued and wait for one completion; signals and a full completion queue only mean "reap first".
fn enter(ring: &mut IoUring, stats: &mut ShardStats) -> io::Result<()> {
    stats.syscalls += 1;
    match ring.submit_and_wait(1) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn push(ring: &mut IoUring, stats: &mut ShardStats, sqe: &squeue::Entry) {
    loop {
        // SAFETY: every pointer in bench entries (buffers in the arena, names and statx buffers owned by the
        // slot) outlives its completion: the job drains all in-flight ops before returning.
        if unsafe { ring.submission().push(sqe) }.is_ok() {
            return;
        }
        stats.syscalls += 1;
        let _ = ring.submit();
    }
}

/// An op in flight in one slot: when it was submitted and what it was.
#[derive(Clone, Copy)]
struct InFlight {
    at: Instant,
    read: bool,
}

fn run_io(lent: Lent<'_>, spec: &IoSpec, job: &BenchJob) -> Result<BenchReport, JobError> {
    let Lent { ring, arena, registered, stats } = lent;
    let access = if spec.read_pct == 100 { libc::O_RDONLY } else { libc::O_RDWR };
    let file = open(&spec.path, access | if spec.direct { libc::O_DIRECT } else { 0 }, Op::Open)?;
    let io_err = |op: Op, e: io::Error| JobError::new(op, &spec.path, e);
    ring.submitter().register_files_update(0, &[file.as_raw_fd()]).map_err(|e| io_err(Op::Bench, e))?;
    let depth = spec.iodepth.clamp(1, arena.slots());
    let len = u32::try_from(spec.block_bytes).ok().filter(|&l| l as usize <= arena.block_bytes());
    let Some(len) = len else {
        let e = io::Error::new(io::ErrorKind::InvalidInput, "block size larger than the shard's buffers");
        return Err(io_err(Op::Bench, e));
    };
    if spec.read_pct < 100 {
        for slot in 0..depth {
            // SAFETY: no I/O is in flight yet.
            fill_random(unsafe { arena.slot_mut(slot) }, spec.seed ^ slot as u64);
        }
    }

    let started = job.wait_start();
    let mut plan = IoPlan::new(spec, started)?;
    let mut report = BenchReport::default();
    let mut slots: Vec<Option<InFlight>> = vec![None; depth];
    let mut free: Vec<usize> = (0..depth).rev().collect();
    // Submission times of the fsyncs in flight; IO_DRAIN makes them complete in order.
    let mut fsyncs: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    let mut issuing = true;
    let mut error: Option<JobError> = None;
    loop {
        let now = Instant::now();
        while issuing && !free.is_empty() {
            match plan.next(&job.stop, now) {
                None => issuing = false,
                Some(IoOp::Fsync) => {
                    // IO_DRAIN: starts after every earlier write completed, and holds back later ops until done.
                    let sqe = opcode::Fsync::new(types::Fixed(0)).build().flags(squeue::Flags::IO_DRAIN);
                    push(ring, stats, &sqe.user_data(FSYNC_UD));
                    fsyncs.push_back(now);
                }
                Some(op @ (IoOp::Read { offset } | IoOp::Write { offset })) => {
                    let slot = free.pop().expect("checked non-empty");
                    let read = matches!(op, IoOp::Read { .. });
                    let buf = arena.slot_ptr(slot);
                    let fixed = (slot < registered).then_some(slot as u16);
                    let f = types::Fixed(0);
                    let sqe = match (read, fixed) {
                        (true, Some(i)) => opcode::ReadFixed::new(f, buf, len, i).offset(offset).build(),
                        (true, None) => opcode::Read::new(f, buf, len).offset(offset).build(),
                        (false, Some(i)) => opcode::WriteFixed::new(f, buf, len, i).offset(offset).build(),
                        (false, None) => opcode::Write::new(f, buf, len).offset(offset).build(),
                    };
                    push(ring, stats, &sqe.user_data(slot as u64));
                    slots[slot] = Some(InFlight { at: now, read });
                }
            }
        }
        if free.len() == depth && fsyncs.is_empty() {
            break;
        }
        enter(ring, stats).map_err(|e| io_err(Op::Bench, e))?;
        for cqe in ring.completion() {
            let (ud, res) = (cqe.user_data(), cqe.result());
            let done = Instant::now();
            if ud == FSYNC_UD {
                let at = fsyncs.pop_front().expect("an fsync in flight");
                if res < 0 {
                    error.get_or_insert(io_err(Op::Fsync, io::Error::from_raw_os_error(-res)));
                    issuing = false;
                } else {
                    report.fsync.record(0, done - at);
                }
                continue;
            }
            let slot = ud as usize;
            let op = slots[slot].take().expect("completion of an op in flight");
            free.push(slot);
            let op_kind = if op.read { Op::Read } else { Op::Write };
            if res < 0 {
                error.get_or_insert(io_err(op_kind, io::Error::from_raw_os_error(-res)));
                issuing = false;
            } else if res as u32 != len {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, format!("short I/O: {res} of {len} bytes"));
                error.get_or_insert(io_err(op_kind, e));
                issuing = false;
            } else {
                let stat = if op.read { &mut report.read } else { &mut report.write };
                stat.record(len as u64, done - op.at);
                job.live.ops.fetch_add(1, Ordering::Relaxed);
                job.live.bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
        }
    }
    if error.is_none() && spec.end_fsync {
        let at = Instant::now();
        push(ring, stats, &opcode::Fsync::new(types::Fixed(0)).build().user_data(FSYNC_UD));
        let res = loop {
            enter(ring, stats).map_err(|e| io_err(Op::Fsync, e))?;
            if let Some(cqe) = ring.completion().next() {
                break cqe.result();
            }
        };
        if res < 0 {
            error = Some(io_err(Op::Fsync, io::Error::from_raw_os_error(-res)));
        } else {
            report.fsync.record(0, at.elapsed());
        }
    }
    report.elapsed = started.elapsed();
    // Release the file from the table (the descriptor itself closes when `file` drops).
    let _ = ring.submitter().register_files_update(0, &[-1]);
    match error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// One file's op chain in flight in one slot.
struct MetaOp {
    name: std::ffi::CString,
    n: u64,
    at: Instant,
    /// Completions still expected for the chain.
    cqes_left: u8,
    /// First real failure in the chain (a linked op cancelled after it is not one).
    error: Option<(Op, io::Error)>,
}

fn run_meta(lent: Lent<'_>, spec: &MetaSpec, job: &BenchJob) -> Result<BenchReport, JobError> {
    let Lent { ring, arena, registered, stats } = lent;
    let dir = open(&spec.dir, libc::O_RDONLY | libc::O_DIRECTORY, Op::Open)?;
    let dirfd = types::Fd(dir.as_raw_fd());
    let depth = spec.iodepth.clamp(1, arena.slots());
    let data_len = spec.file_bytes.min(arena.block_bytes() as u64) as u32;
    if spec.phase == MetaPhase::Create && data_len > 0 {
        for slot in 0..depth {
            // SAFETY: no I/O is in flight yet.
            fill_random(unsafe { arena.slot_mut(slot) }, slot as u64);
        }
    }
    let mut statx_bufs: Vec<libc::statx> = (0..depth).map(|_| unsafe { std::mem::zeroed() }).collect();

    let started = job.wait_start();
    let mut report = BenchReport::default();
    let mut slots: Vec<Option<MetaOp>> = (0..depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut next = spec.first;
    let end = spec.first + spec.count;
    let mut error: Option<JobError> = None;
    loop {
        let now = Instant::now();
        while error.is_none() && next < end && !job.stop.load(Ordering::Relaxed) {
            let Some(slot) = free.pop() else { break };
            let name = spec.name(next);
            let ud = |step: u64| ((slot as u64) << 2) | step;
            let buf = arena.slot_ptr(slot);
            let fixed_file = types::Fixed(slot as u32);
            let chain: Vec<squeue::Entry> = match spec.phase {
                MetaPhase::Create | MetaPhase::Read => {
                    let create = spec.phase == MetaPhase::Create;
                    let target = types::DestinationSlot::try_from_slot_target(slot as u32).expect("slot in table");
                    let flags = if create { libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY } else { libc::O_RDONLY };
                    let open =
                        opcode::OpenAt::new(dirfd, name.as_ptr()).flags(flags).mode(0o644).file_index(Some(target));
                    let mut chain = vec![open.build().flags(squeue::Flags::IO_LINK).user_data(ud(0))];
                    if data_len > 0 {
                        let reg = (slot < registered).then_some(slot as u16);
                        let data = match (create, reg) {
                            (true, Some(i)) => opcode::WriteFixed::new(fixed_file, buf, data_len, i).offset(0).build(),
                            (true, None) => opcode::Write::new(fixed_file, buf, data_len).offset(0).build(),
                            (false, Some(i)) => opcode::ReadFixed::new(fixed_file, buf, data_len, i).offset(0).build(),
                            (false, None) => opcode::Read::new(fixed_file, buf, data_len).offset(0).build(),
                        };
                        chain.push(data.flags(squeue::Flags::IO_LINK).user_data(ud(1)));
                    }
                    chain.push(opcode::Close::new(fixed_file).build().user_data(ud(2)));
                    chain
                }
                MetaPhase::Stat => {
                    let sx = (&mut statx_bufs[slot] as *mut libc::statx).cast::<types::statx>();
                    let op = opcode::Statx::new(dirfd, name.as_ptr(), sx)
                        .flags(libc::AT_SYMLINK_NOFOLLOW)
                        .mask(libc::STATX_BASIC_STATS);
                    vec![op.build().user_data(ud(3))]
                }
                MetaPhase::Delete => vec![opcode::UnlinkAt::new(dirfd, name.as_ptr()).build().user_data(ud(3))],
            };
            // Linked entries must reach the queue back to back: make room for the whole chain first.
            let room = {
                let sq = ring.submission();
                sq.capacity() - sq.len()
            };
            if room < chain.len() {
                stats.syscalls += 1;
                let _ = ring.submit();
            }
            let cqes_left = chain.len() as u8;
            for sqe in &chain {
                push(ring, stats, sqe);
            }
            slots[slot] = Some(MetaOp { name, n: next, at: now, cqes_left, error: None });
            next += 1;
        }
        if free.len() == depth {
            break;
        }
        enter(ring, stats).map_err(|e| JobError::new(Op::Bench, &spec.dir, e))?;
        for cqe in ring.completion() {
            let (ud, res) = (cqe.user_data(), cqe.result());
            let slot = (ud >> 2) as usize;
            let step = ud & 3;
            let m = slots[slot].as_mut().expect("completion of a chain in flight");
            m.cqes_left -= 1;
            if res < 0 && res != -libc::ECANCELED {
                let op = match (spec.phase, step) {
                    (MetaPhase::Create, 0) => Op::Create,
                    (MetaPhase::Read, 0) => Op::Open,
                    (MetaPhase::Create, 1) => Op::Write,
                    (MetaPhase::Read, 1) => Op::Read,
                    (MetaPhase::Stat, _) => Op::Stat,
                    (MetaPhase::Delete, _) => Op::Remove,
                    _ => Op::Bench,
                };
                m.error.get_or_insert((op, io::Error::from_raw_os_error(-res)));
            } else if step == 1 && res >= 0 && res as u32 != data_len {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, format!("{res} of {data_len} bytes"));
                let op = if spec.phase == MetaPhase::Create { Op::Write } else { Op::Read };
                m.error.get_or_insert((op, e));
            }
            if m.cqes_left > 0 {
                continue;
            }
            let m = slots[slot].take().expect("checked above");
            free.push(slot);
            match m.error {
                Some((op, e)) => {
                    error.get_or_insert(JobError::new(op, spec.path(m.n), e));
                }
                None => {
                    let bytes =
                        if matches!(spec.phase, MetaPhase::Create | MetaPhase::Read) { data_len as u64 } else { 0 };
                    report.meta.record(bytes, m.at.elapsed());
                    job.live.ops.fetch_add(1, Ordering::Relaxed);
                    job.live.bytes.fetch_add(bytes, Ordering::Relaxed);
                }
            }
            drop(m.name);
        }
    }
    report.elapsed = started.elapsed();
    match error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}
