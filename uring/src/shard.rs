//! One shard's event loop: a ring, a buffer arena (registered where memlock allows) and the jobs it has admitted.
//!
//! Every admitted job owns exactly one buffer slot for its whole life, so the slot index doubles as the task index
//! and the arena bounds both memory and the number of I/Os in flight. A task is a small state machine; each step
//! queues submission entries, and the loop submits them all with one `io_uring_enter` that also waits for at least
//! one completion.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use fastsync_engine::finish::cstr;
use fastsync_engine::offload::{Offload, offload_range};
use fastsync_engine::{
    AlignedArena, Completion, Created, EngineConfig, EngineError, FileJob, Job, JobError, Op, Outcome, Session,
    ShardCtx, ShardStats, blocking, create_dst, discard, finish_file,
};
use io_uring::{IoUring, opcode, squeue, types};

mod net;

/// The I/O alignment O_DIRECT needs on every device we expect.
const DIRECT_ALIGN_BYTES: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    OpenSrc = 0,
    Read = 1,
    Write = 2,
    ReadBack = 3,
    /// A socket job's send (and, for a zero-copy send, its notification).
    Send = 4,
    /// A socket job's receive.
    Recv = 5,
    /// The LINK_TIMEOUT behind a socket operation.
    Timeout = 6,
}

impl Step {
    fn from_bits(b: u64) -> Step {
        match b {
            0 => Step::OpenSrc,
            1 => Step::Read,
            2 => Step::Write,
            3 => Step::ReadBack,
            4 => Step::Send,
            5 => Step::Recv,
            _ => Step::Timeout,
        }
    }
}

/// The user data of the poll on the shard's wake-up eventfd (no task's: those are `slot << 3 | step`).
const KICK_USER_DATA: u64 = u64::MAX;

fn user_data(slot: usize, step: Step) -> u64 {
    ((slot as u64) << 3) | step as u64
}

/// What a read targets: a whole file's source sits in fixed-file slot = task slot; everything else (the shared
/// descriptors of a chunked file, a destination being read back) is a plain descriptor.
enum Target {
    Fixed(u32),
    Fd(RawFd),
}

/// State of one admitted job.
struct Task {
    job: Job,
    /// Whole-file jobs: the source path as a C string, alive until its OPENAT completes.
    src_c: Option<CString>,
    dst_fd: Option<OwnedFd>,
    /// How a whole file's destination was created (named temporary or unnamed file).
    created: Created,
    /// Next source offset to read.
    offset: u64,
    /// End of the range to copy (`u64::MAX` for whole files: read to end of file).
    end: u64,
    /// Bytes of the current block read, and how many of them are already written.
    block_len: u64,
    block_written: u64,
    /// Whether the last read was short (end of file for a whole file).
    at_eof: bool,
    /// BLAKE3 of the current block's source bytes (verify mode).
    src_hash: Option<blake3::Hash>,
    ops_pending: u32,
    error: Option<JobError>,
    bytes_written: u64,
    /// Hash jobs: the digest so far (boxed: it is large and only hash tasks have one).
    hasher: Option<Box<blake3::Hasher>>,
    /// Socket jobs: their progress.
    net: Option<Box<net::NetState>>,
}

pub(crate) fn start(config: &EngineConfig, registrable_bytes_total: usize) -> Result<Session, EngineError> {
    let per_shard = registrable_bytes_total / config.shards.max(1);
    let registrable_slots =
        if registrable_bytes_total == usize::MAX { usize::MAX } else { per_shard / config.block_bytes };
    let block_bytes = config.block_bytes;
    let slots = config.slots_per_shard;
    let ring_buffered_writes = config.buffered_writes_nonblocking;
    let up_front = config.buffers_up_front;
    Session::start(config, "fs-uring", move |_index| {
        let shard = Shard::new(block_bytes, slots, registrable_slots, ring_buffered_writes, up_front)?;
        Ok(move |ctx: &mut ShardCtx| shard.run(ctx))
    })
}

struct Shard {
    ring: IoUring,
    arena: AlignedArena,
    /// Which slots are registered buffers (buffer index = slot); the others use plain READ/WRITE.
    buffers: Registered,
    tasks: Vec<Option<Task>>,
    /// Free slots; admitted tasks are the others.
    free: Vec<usize>,
    /// Completions of one turn (user data, result, flags), reused so the event loop does not allocate.
    cqes: Vec<(u64, i32, u32)>,
    /// An eventfd a [`fastsync_engine::Submitter`] writes to when it hands over a socket job while this shard waits
    /// in the ring (a POLL_ADD on it is kept armed), so the job is admitted at once, not at the next completion.
    kick: OwnedFd,
    kick_armed: bool,
    /// Buffered writes go through the ring (else `pwrite` on this thread).
    ring_buffered_writes: bool,
    stats: ShardStats,
}

/// The shard's registered buffers. Registering pins the memory, which on first touch means faulting in (and zeroing)
/// every page of it: done for the whole arena at start, a one-file copy paid for 64 MiB (10-180 ms on this project's
/// VM). So the table is registered empty (sparse) and each slot is registered the first time a job uses it; on
/// kernels without sparse buffer tables (before 5.19), and for benchmarks (`EngineConfig::buffers_up_front`), the
/// whole arena is registered at start.
struct Registered {
    /// Slots that may be registered (fewer than all when RLIMIT_MEMLOCK says so; 0 once registering failed).
    want: usize,
    filled: Vec<bool>,
}

impl Registered {
    /// Register the table: empty (slots filled by [`Registered::ensure`]) unless `up_front`, or where the kernel has
    /// no sparse tables.
    fn start(ring: &IoUring, arena: &AlignedArena, want: usize, up_front: bool) -> Registered {
        let mut r = Registered { want, filled: vec![false; arena.slots()] };
        if want == 0 || (!up_front && ring.submitter().register_buffers_sparse(want as u32).is_ok()) {
            return r;
        }
        let iovecs: Vec<libc::iovec> = (0..want).map(|i| Registered::iovec(arena, i)).collect();
        // SAFETY: the iovecs point into `arena`, which lives as long as the ring (both owned by the shard, and the
        // ring is dropped first: field order).
        match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => r.filled[..want].fill(true),
            Err(e) => r.give_up(&e),
        }
        r
    }

    fn iovec(arena: &AlignedArena, slot: usize) -> libc::iovec {
        libc::iovec { iov_base: arena.slot_ptr(slot).cast(), iov_len: arena.block_bytes() }
    }

    fn give_up(&mut self, e: &io::Error) {
        self.want = 0;
        warn_once(&format!(
            "fastsync: cannot register I/O buffers ({e}); continuing with unregistered buffers \
             (raise RLIMIT_MEMLOCK: ulimit -l unlimited)"
        ));
    }

    /// Register `slot` if it may be and is not yet (a failure leaves it, and every later slot, unregistered).
    fn ensure(&mut self, ring: &IoUring, arena: &AlignedArena, slot: usize) {
        if slot >= self.want || self.filled[slot] {
            return;
        }
        // SAFETY: as in `start`: the buffer lives in `arena`, which outlives the ring's use of it.
        match unsafe { ring.submitter().register_buffers_update(slot as u32, &[Registered::iovec(arena, slot)], None) }
        {
            Ok(()) => self.filled[slot] = true,
            Err(e) => self.give_up(&e),
        }
    }

    /// The buffer index of `slot` for READ_FIXED/WRITE_FIXED, when it is registered.
    fn index(&self, slot: usize) -> Option<u16> {
        self.filled[slot].then_some(slot as u16)
    }

    /// How many slots from 0 on are registered (what a bench job may use as fixed buffers).
    fn prefix(&self) -> usize {
        self.filled.iter().take_while(|&&f| f).count()
    }
}

impl Shard {
    fn new(
        block_bytes: usize,
        slots: usize,
        registrable_slots: usize,
        ring_buffered_writes: bool,
        up_front: bool,
    ) -> io::Result<Shard> {
        let entries = (slots * 2 + 16).next_power_of_two().clamp(64, 4096) as u32;
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(entries * 2)
            .build(entries)
            .or_else(|_| IoUring::new(entries))?;
        // One fixed-file slot per task: a whole file's source is opened into its task's slot.
        ring.submitter().register_files_sparse(slots as u32)?;
        let arena = AlignedArena::new(block_bytes, slots);
        let want = slots.min(registrable_slots).min(u16::MAX as usize);
        let buffers = Registered::start(&ring, &arena, want, up_front);
        // SAFETY: plain eventfd creation; the descriptor is owned from here on.
        let kick = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if kick < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor.
        let kick = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(kick) };
        Ok(Shard {
            kick,
            kick_armed: false,
            ring,
            arena,
            buffers,
            tasks: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            cqes: Vec::with_capacity(entries as usize * 2),
            ring_buffered_writes,
            stats: ShardStats::default(),
        })
    }

    fn run(mut self, ctx: &mut ShardCtx) -> ShardStats {
        if let Ok(kick) = self.kick.try_clone() {
            ctx.set_kick(Box::new(move || {
                let one = 1u64;
                // SAFETY: an 8-byte write to an eventfd we own; a full counter (EAGAIN) already means "wake up".
                unsafe { libc::write(kick.as_raw_fd(), (&one as *const u64).cast(), 8) };
            }));
        }
        loop {
            // Admit jobs while we have buffer slots.
            while !self.free.is_empty() {
                let Some(job) = ctx.next_job() else { break };
                let job = match job {
                    Job::Bench(bench) => {
                        let completion = self.run_bench(&bench, ctx.index);
                        ctx.complete(completion);
                        continue;
                    }
                    job => job,
                };
                let slot = self.free.pop().expect("checked non-empty");
                self.admit(slot, job);
                if self.tasks[slot].as_ref().is_some_and(|t| t.ops_pending == 0) {
                    self.retire(slot, ctx);
                }
            }
            if self.free.len() == self.tasks.len() {
                if !ctx.wait_for_work() {
                    break;
                }
                continue;
            }
            if !self.kick_armed {
                let poll = opcode::PollAdd::new(types::Fd(self.kick.as_raw_fd()), libc::POLLIN as u32).build();
                self.push(poll.user_data(KICK_USER_DATA));
                self.kick_armed = true;
            }
            self.stats.syscalls += 1;
            if let Err(e) = self.ring.submit_and_wait(1) {
                // EINTR/EBUSY: completions are pending or a signal arrived; reap and go round again.
                if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)) {
                    panic!("io_uring_enter failed: {e}");
                }
            }
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            for &(ud, res, flags) in &cqes {
                if ud == KICK_USER_DATA {
                    // Reset the counter; the loop admits what was handed over, and re-arms the poll before it waits.
                    let mut n = 0u64;
                    // SAFETY: an 8-byte read from our non-blocking eventfd.
                    unsafe { libc::read(self.kick.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
                    self.kick_armed = false;
                    continue;
                }
                let slot = (ud >> 3) as usize;
                let step = Step::from_bits(ud & 7);
                if self.tasks[slot].as_ref().is_some_and(|t| t.net.is_some()) {
                    self.on_net_cqe(slot, step, res, flags);
                    self.report_net(slot, ctx);
                } else {
                    self.on_cqe(slot, step, res);
                }
                if self.tasks[slot].as_ref().is_some_and(|t| t.ops_pending == 0) {
                    self.retire(slot, ctx);
                }
            }
            cqes.clear();
            self.cqes = cqes;
        }
        self.stats
    }

    /// Queue a submission entry, flushing the queue to the kernel when it is full.
    fn push(&mut self, sqe: squeue::Entry) {
        loop {
            // SAFETY: every pointer in our entries (paths, buffers) stays alive until the completion arrives: paths
            // are owned by the task, buffers by the arena.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return;
            }
            self.stats.syscalls += 1;
            let _ = self.ring.submit();
        }
    }

    fn admit(&mut self, slot: usize, job: Job) {
        self.buffers.ensure(&self.ring, &self.arena, slot);
        let mut task = Task {
            job,
            src_c: None,
            dst_fd: None,
            created: Created::Named,
            offset: 0,
            end: u64::MAX,
            block_len: 0,
            block_written: 0,
            at_eof: false,
            src_hash: None,
            ops_pending: 0,
            error: None,
            bytes_written: 0,
            hasher: None,
            net: None,
        };
        match &task.job {
            Job::Send(_) | Job::Recv(_) => self.admit_net(slot, task),
            Job::Hash(h) => {
                // Like a whole file's source: OPENAT into the task's fixed slot, linked to its first read; each block
                // is hashed as it arrives, so a shard keeps a read in flight per slot (a deep queue on cold data).
                let src_c = match cstr(&h.path) {
                    Ok(c) => c,
                    Err(e) => {
                        task.error = Some(JobError::new(Op::Hash, &h.path, e));
                        self.tasks[slot] = Some(task);
                        return;
                    }
                };
                let follow = h.follow_symlinks;
                task.hasher = Some(Box::new(blake3::Hasher::new()));
                self.open_and_read(slot, task, src_c, follow);
            }
            Job::File(f) => {
                let src_c = match cstr(&f.src) {
                    Ok(s) => s,
                    Err(e) => {
                        task.error = Some(JobError::new(Op::Open, &f.src, e));
                        self.tasks[slot] = Some(task);
                        return;
                    }
                };
                // The destination is created right here with plain syscalls: io_uring never attempts an O_CREAT
                // (or O_TMPFILE) open inline (it always punts it to an io-wq worker thread), so through the ring it
                // would cost a thread hand-off per file for nothing.
                let created = create_dst(&f.tmp, &f.dst, f.dst_vacant, f.finish.verify, f.finish.create_mode);
                match created {
                    Ok((fd, how)) => {
                        task.dst_fd = Some(fd);
                        task.created = how;
                    }
                    Err(e) => {
                        task.error = Some(JobError::new(Op::Create, &f.dst, e));
                        self.tasks[slot] = Some(task);
                        return;
                    }
                }
                let follow = f.follow_symlinks;
                self.open_and_read(slot, task, src_c, follow);
            }
            Job::Range(r) => {
                task.offset = r.offset;
                task.end = r.offset + r.len;
                if r.resume && !r.file.failed.load(std::sync::atomic::Ordering::Acquire) {
                    // An earlier run recorded this range: compare before copying (a read error means "copy it").
                    // SAFETY: the slot was just taken from the free list; no I/O uses it.
                    let buf = unsafe { self.arena.slot_mut(slot) };
                    let (src_fd, dst_fd) = (r.file.src_fd.as_fd(), r.file.dst_fd.as_fd());
                    let same = blocking::range_matches(src_fd, dst_fd, r.offset, r.len, buf, &r.file.src, &r.file.dst);
                    if same.unwrap_or(false) {
                        task.offset = task.end;
                    }
                }
                if task.offset < task.end && !r.file.direct && !r.file.finish.verify {
                    // Page cache to page cache: the kernel's own copy moves each byte once, where READ + WRITE
                    // through our buffers would move it twice (and io_uring has no copy_file_range opcode). Whatever
                    // it leaves (an error to diagnose, a shrunken source) goes on through the ring below.
                    let mut calls = 0;
                    let mut copied = 0;
                    let (src_fd, dst_fd) = (r.file.src_fd.as_fd(), r.file.dst_fd.as_fd());
                    let left = offload_range(src_fd, dst_fd, task.offset, Some(task.end), &mut calls, &mut copied);
                    self.stats.syscalls += calls;
                    self.stats.bytes_written += copied;
                    task.bytes_written += copied;
                    task.offset = match left {
                        Offload::Complete => task.end,
                        Offload::ResumeAt(offset) => offset,
                    };
                }
                self.tasks[slot] = Some(task);
                self.read_next(slot);
            }
            Job::Bench(_) => unreachable!("bench jobs run in `run_bench`, never as tasks"),
        }
    }

    /// Queue the source's OPENAT into fixed-file slot `slot` (the task's own) and its first read, linked: the kernel
    /// starts reading as soon as the open succeeds, with no round trip through this loop; if the open fails the read
    /// completes with ECANCELED. Whatever file a previous task left in the slot is replaced (and released).
    fn open_and_read(&mut self, slot: usize, mut task: Task, src_c: CString, follow: bool) {
        let fixed = types::DestinationSlot::try_from_slot_target(slot as u32).expect("slot fits the table");
        let open_src = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), src_c.as_ptr())
            // Direct descriptors live only in the ring's table, so O_CLOEXEC is meaningless and the kernel rejects
            // it with EINVAL.
            .flags(libc::O_RDONLY | if follow { 0 } else { libc::O_NOFOLLOW })
            .file_index(Some(fixed))
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(user_data(slot, Step::OpenSrc));
        task.src_c = Some(src_c);
        task.ops_pending = 2;
        self.tasks[slot] = Some(task);
        let first_read =
            self.read_sqe(slot, 0, self.arena.block_bytes() as u32, false).user_data(user_data(slot, Step::Read));
        self.push_linked_pair(open_src, first_read);
    }

    /// Queue two entries back to back (the first linked to the second), making room for both first: linked entries
    /// must not be split by a submission.
    fn push_linked_pair(&mut self, first: squeue::Entry, second: squeue::Entry) {
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < 2 {
            self.stats.syscalls += 1;
            let _ = self.ring.submit();
        }
        self.push(first);
        self.push(second);
    }

    fn task(&mut self, slot: usize) -> &mut Task {
        self.tasks[slot].as_mut().expect("completion for a live task")
    }

    fn on_cqe(&mut self, slot: usize, step: Step, res: i32) {
        let t = self.task(slot);
        t.ops_pending -= 1;
        let err = (res < 0).then(|| io::Error::from_raw_os_error(-res));
        match step {
            Step::OpenSrc => {
                // The path must outlive the OPENAT; its linked read follows with its own completion.
                t.src_c = None;
                if let Some(e) = err {
                    let path = job_src(&t.job).to_path_buf();
                    t.error.get_or_insert(JobError::new(Op::Open, path, e));
                }
            }
            Step::Read => self.on_read(slot, res, err),
            Step::Write => self.on_write(slot, res, err),
            Step::ReadBack => self.on_read_back(slot, res, err),
            Step::Send | Step::Recv | Step::Timeout => unreachable!("socket steps go to on_net_cqe"),
        }
    }

    /// Queue the read of the next block, or do nothing when the task's range is complete.
    fn read_next(&mut self, slot: usize) {
        let block = self.arena.block_bytes() as u64;
        let direct = self.direct(slot);
        let t = self.task(slot);
        if t.at_eof || t.offset >= t.end {
            return;
        }
        let mut len = block.min(t.end - t.offset);
        if direct {
            len = len.next_multiple_of(DIRECT_ALIGN_BYTES).min(block);
        }
        let offset = t.offset;
        t.block_len = 0;
        t.block_written = 0;
        t.ops_pending += 1;
        let sqe = self.read_sqe(slot, offset, len as u32, false).user_data(user_data(slot, Step::Read));
        self.push(sqe);
    }

    fn direct(&self, slot: usize) -> bool {
        match &self.tasks[slot].as_ref().expect("live task").job {
            Job::Range(r) => r.file.direct,
            Job::File(_) | Job::Hash(_) | Job::Send(_) | Job::Recv(_) => false,
            Job::Bench(_) => unreachable!("bench jobs never become tasks"),
        }
    }

    /// A read of `len` bytes at `offset` into the task's slot, from the source or (read-back) the destination.
    fn read_sqe(&self, slot: usize, offset: u64, len: u32, from_dst: bool) -> squeue::Entry {
        let t = self.tasks[slot].as_ref().expect("live task");
        let buf = self.arena.slot_ptr(slot);
        let target = match &t.job {
            _ if from_dst => Target::Fd(dst_raw(t)),
            Job::File(_) | Job::Hash(_) => Target::Fixed(slot as u32),
            Job::Range(r) => Target::Fd(r.file.src_fd.as_raw_fd()),
            Job::Bench(_) | Job::Send(_) | Job::Recv(_) => unreachable!("bench and socket jobs read on their own"),
        };
        match (target, self.buffers.index(slot)) {
            (Target::Fixed(f), Some(i)) => opcode::ReadFixed::new(types::Fixed(f), buf, len, i).offset(offset).build(),
            (Target::Fixed(f), None) => opcode::Read::new(types::Fixed(f), buf, len).offset(offset).build(),
            (Target::Fd(fd), Some(i)) => opcode::ReadFixed::new(types::Fd(fd), buf, len, i).offset(offset).build(),
            (Target::Fd(fd), None) => opcode::Read::new(types::Fd(fd), buf, len).offset(offset).build(),
        }
    }

    fn write_sqe(&self, slot: usize, offset: u64, from: usize, len: u32) -> squeue::Entry {
        let t = self.tasks[slot].as_ref().expect("live task");
        // SAFETY: `from` < block size, so the pointer stays inside the slot.
        let buf = unsafe { self.arena.slot_ptr(slot).add(from) };
        let fd = types::Fd(dst_raw(t));
        match self.buffers.index(slot) {
            Some(i) => opcode::WriteFixed::new(fd, buf, len, i).offset(offset).build(),
            None => opcode::Write::new(fd, buf, len).offset(offset).build(),
        }
    }

    fn on_read(&mut self, slot: usize, res: i32, err: Option<io::Error>) {
        let block = self.arena.block_bytes() as u64;
        let direct = self.direct(slot);
        let t = self.task(slot);
        if let Some(e) = err {
            let path = job_src(&t.job).to_path_buf();
            t.error.get_or_insert(JobError::new(Op::Read, path, e));
            return;
        }
        let n = res as u64;
        let requested = if direct {
            block.min(t.end - t.offset).next_multiple_of(DIRECT_ALIGN_BYTES).min(block)
        } else {
            block.min(t.end - t.offset)
        };
        let is_range = matches!(t.job, Job::Range(_));
        // A whole file ends at the first short read; a range that ends early means the source shrank.
        let n = if is_range { n.min(t.end - t.offset) } else { n };
        if n == 0 || (n < requested && !is_range) {
            t.at_eof = true;
        }
        if is_range && n < (t.end - t.offset).min(block) {
            let path = job_src(&t.job).to_path_buf();
            t.error.get_or_insert(JobError::new(
                Op::SourceChanged,
                path,
                io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while copying"),
            ));
            return;
        }
        if n == 0 {
            return;
        }
        if matches!(t.job, Job::Hash(_)) {
            let (arena, tasks) = (&self.arena, &mut self.tasks);
            let t = tasks[slot].as_mut().expect("live task");
            // SAFETY: the read into this slot has completed and no other I/O uses it.
            let data = unsafe { &arena.slot_mut(slot)[..n as usize] };
            t.hasher.as_mut().expect("hash task").update(data);
            t.offset += n;
            self.read_next(slot);
            return;
        }
        t.block_len = n;
        if job_verify(&t.job) {
            // SAFETY: the read into this slot has completed and no other I/O uses it.
            let data = unsafe { &self.arena.slot_mut(slot)[..n as usize] };
            let h = blake3::hash(data);
            self.task(slot).src_hash = Some(h);
        }
        self.write_rest(slot);
    }

    /// Queue the write of the unwritten part of the current block.
    fn write_rest(&mut self, slot: usize) {
        let direct = self.direct(slot);
        let t = self.task(slot);
        let from = t.block_written;
        let mut len = t.block_len - from;
        if direct {
            // O_DIRECT needs whole blocks; bytes past the end of the file are cut by the final truncate.
            len = len.next_multiple_of(DIRECT_ALIGN_BYTES);
        }
        let offset = t.offset + from;
        t.ops_pending += 1;
        if !direct && !self.ring_buffered_writes {
            // See EngineConfig::buffered_writes_nonblocking: through the ring this write would be punted to an
            // io-wq thread (a hand-off per write); here it is one syscall on the shard.
            let fd = dst_raw(self.tasks[slot].as_ref().expect("live task"));
            // SAFETY: the slot holds `len` valid bytes from `from` on, and no I/O is in flight on it.
            let n = unsafe {
                libc::pwrite(
                    fd,
                    self.arena.slot_ptr(slot).add(from as usize).cast(),
                    len as usize,
                    offset as libc::off_t,
                )
            };
            self.stats.syscalls += 1;
            let res = if n < 0 { -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) } else { n as i32 };
            self.on_cqe(slot, Step::Write, res);
            return;
        }
        let sqe = self.write_sqe(slot, offset, from as usize, len as u32).user_data(user_data(slot, Step::Write));
        self.push(sqe);
    }

    fn on_write(&mut self, slot: usize, res: i32, err: Option<io::Error>) {
        let t = self.task(slot);
        if let Some(e) = err {
            let path = job_dst(&t.job).to_path_buf();
            t.error.get_or_insert(JobError::new(Op::Write, path, e));
            return;
        }
        if res == 0 {
            let path = job_dst(&t.job).to_path_buf();
            t.error.get_or_insert(JobError::new(Op::Write, path, io::Error::from(io::ErrorKind::WriteZero)));
            return;
        }
        t.block_written = (t.block_written + res as u64).min(t.block_len);
        if t.block_written < t.block_len {
            self.write_rest(slot);
            return;
        }
        if job_verify(&t.job) {
            let (offset, len) = (t.offset, t.block_len);
            let len = if self.direct(slot) { len.next_multiple_of(DIRECT_ALIGN_BYTES) } else { len };
            self.task(slot).ops_pending += 1;
            let sqe = self.read_sqe(slot, offset, len as u32, true).user_data(user_data(slot, Step::ReadBack));
            self.push(sqe);
            return;
        }
        self.block_done(slot);
    }

    fn on_read_back(&mut self, slot: usize, res: i32, err: Option<io::Error>) {
        let t = self.task(slot);
        let n = t.block_len as usize;
        let mismatch = match err {
            Some(e) => Some(e),
            None => {
                let expected = t.src_hash.take();
                // A short read-back hashes fewer bytes, so it is reported as the mismatch it is.
                let got = (res as usize).min(n);
                // SAFETY: the read-back into this slot has completed and no other I/O uses it.
                let data = unsafe { &self.arena.slot_mut(slot)[..got] };
                (Some(blake3::hash(data)) != expected).then(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "destination differs from source (BLAKE3 mismatch at offset {})",
                            self.task(slot).offset
                        ),
                    )
                })
            }
        };
        if let Some(e) = mismatch {
            let t = self.task(slot);
            let path = job_dst(&t.job).to_path_buf();
            t.error.get_or_insert(JobError::new(Op::Verify, path, e));
            return;
        }
        self.block_done(slot);
    }

    fn block_done(&mut self, slot: usize) {
        let t = self.task(slot);
        t.offset += t.block_len;
        t.bytes_written += t.block_len;
        self.stats.bytes_written += t.block_len;
        self.read_next(slot);
    }

    /// Run a benchmark job on this shard's ring and buffers; it needs them all, so nothing else may be admitted.
    fn run_bench(&mut self, job: &fastsync_engine::bench::BenchJob, shard: usize) -> Completion {
        self.stats.jobs += 1;
        let result = if self.free.len() != self.tasks.len() {
            let e = io::Error::other("a benchmark needs a shard of its own, and this one has copy jobs admitted");
            Err(JobError::new(Op::Bench, job.path(), e))
        } else {
            for slot in 0..self.tasks.len() {
                self.buffers.ensure(&self.ring, &self.arena, slot);
            }
            let lent = crate::bench::Lent {
                ring: &mut self.ring,
                arena: &self.arena,
                registered: self.buffers.prefix(),
                stats: &mut self.stats,
            };
            crate::bench::run(lent, job)
        };
        let (bytes, outcome) = match result {
            Ok(report) => (report.write.bytes, Outcome::Bench(Box::new(report))),
            Err(e) => (0, Outcome::Failed(e)),
        };
        Completion { tag: job.tag, bytes, shard, outcome }
    }

    /// The task has no operation in flight: finish it (or clean up after its error), report it, free its slot.
    fn retire(&mut self, slot: usize, ctx: &ShardCtx) {
        let mut t = self.tasks[slot].take().expect("live task");
        // A whole file's source stays in fixed slot `slot` until the next task's open replaces it (or the ring is
        // dropped): no CLOSE round trip per file.
        self.stats.jobs += 1;
        let outcome = match &t.job {
            Job::File(f) => file_outcome(f, t.dst_fd.take(), t.created, t.error.take()),
            Job::Range(r) => r.file.complete_range(Some((r.offset, r.len)), t.error.take().map_or(Ok(()), Err)),
            Job::Hash(_) => match (t.error.take(), t.hasher.take()) {
                (Some(e), _) => Outcome::Failed(e),
                (None, Some(h)) => Outcome::Hashed { digest: *h.finalize().as_bytes(), bytes: t.offset },
                (None, None) => unreachable!("a hash task has a hasher"),
            },
            Job::Send(_) | Job::Recv(_) => {
                if t.net.as_ref().is_some_and(|n| n.reported) {
                    // Reported before its zero-copy notifications arrived (see `report_net`): only the slot is left.
                    self.free.push(slot);
                    return;
                }
                net_outcome(&mut t)
            }
            Job::Bench(_) => unreachable!("bench jobs never become tasks"),
        };
        let completion = Completion { tag: t.job.tag(), bytes: t.bytes_written, shard: ctx.index, outcome };
        ctx.complete_to(t.job.reply(), completion);
        self.free.push(slot);
    }
}

/// How a socket task ended.
fn net_outcome(t: &mut Task) -> Outcome {
    match (t.error.take(), t.net.as_ref().and_then(|n| n.digest)) {
        (Some(e), _) => Outcome::Failed(e),
        (None, Some(digest)) => Outcome::Moved { digest, bytes: t.bytes_written },
        (None, None) => unreachable!("a socket task without error has its digest"),
    }
}

fn file_outcome(f: &FileJob, dst_fd: Option<OwnedFd>, created: Created, error: Option<JobError>) -> Outcome {
    let result = match (error, dst_fd) {
        (Some(e), fd) => {
            if fd.is_some() {
                discard(created, &f.tmp);
            }
            Err(e)
        }
        (None, Some(fd)) => finish_file(fd.as_fd(), None, &f.src, (&f.tmp, created), &f.dst, &f.finish)
            .inspect_err(|_| discard(created, &f.tmp)),
        (None, None) => unreachable!("a file task without error has its destination open"),
    };
    match result {
        Ok(()) => Outcome::FileDone,
        Err(e) => Outcome::Failed(e),
    }
}

fn job_src(job: &Job) -> &Path {
    match job {
        Job::File(f) => &f.src,
        Job::Range(r) => &r.file.src,
        Job::Hash(h) => &h.path,
        Job::Bench(b) => b.path(),
        Job::Send(_) | Job::Recv(_) => net::net_path(job),
    }
}

fn job_dst(job: &Job) -> &Path {
    match job {
        Job::File(f) => &f.dst,
        Job::Range(r) => &r.file.dst,
        Job::Hash(h) => &h.path,
        Job::Bench(b) => b.path(),
        Job::Send(_) | Job::Recv(_) => net::net_path(job),
    }
}

fn job_verify(job: &Job) -> bool {
    match job {
        Job::File(f) => f.finish.verify,
        Job::Range(r) => r.file.finish.verify,
        Job::Hash(_) | Job::Bench(_) | Job::Send(_) | Job::Recv(_) => false,
    }
}

fn dst_raw(t: &Task) -> RawFd {
    match &t.job {
        Job::Range(r) => r.file.dst_fd.as_raw_fd(),
        Job::File(_) => t.dst_fd.as_ref().expect("destination open").as_raw_fd(),
        Job::Hash(_) | Job::Bench(_) | Job::Send(_) | Job::Recv(_) => {
            unreachable!("hash, bench and socket jobs write nothing through a task")
        }
    }
}

fn warn_once(msg: &str) {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| eprintln!("{msg}"));
}
