//! Socket jobs on the ring ([`fastsync_engine::net`]): a frame's payload read with READ_FIXED into the task's
//! registered slot, hashed, and sent with its head as one SEND_ZC (or SEND) from that slot; or received with RECV
//! into the slot, hashed, compared, and written with WRITE_FIXED (O_DIRECT where the job has a direct descriptor).
//!
//! Every socket operation is linked to a LINK_TIMEOUT of the job's timeout and asks for `MSG_WAITALL` (the kernel
//! continues short transfers itself). A timeout that fires cancels the operation: what it moved before still counts
//! (the completion carries it), and the rest is asked for again with a fresh timeout; an operation cancelled with
//! nothing moved is the stall the contract describes. A zero-copy send posts a second completion (the notification)
//! once the kernel no longer references the slot's pages; the job is reported as soon as the frame is in the socket,
//! and its slot stays taken until the notification.

use std::io;
use std::os::fd::RawFd;

use fastsync_engine::net::{self, HEAD_ROOM_BYTES};
use fastsync_engine::{Job, JobError, Op};
use io_uring::{cqueue, opcode, squeue, types};

use super::{Shard, Step, Task, user_data};

/// O_DIRECT's alignment of offsets and lengths.
const DIRECT_ALIGN_BYTES: usize = 4096;

/// What a socket task is doing, beyond the common [`Task`] fields.
pub(super) struct NetState {
    /// The LINK_TIMEOUT's duration (the kernel reads it when the entry is submitted; boxed in the task, so its
    /// address is stable).
    ts: types::Timespec,
    /// Payload bytes in the slot (read from the file, or received).
    got: usize,
    /// Where the frame starts in the slot (head room minus the head's length), its length, and how much of it went.
    frame_start: usize,
    frame_len: usize,
    sent: usize,
    /// Bytes of the payload written to the file, and how many of them (from the start) go through the direct
    /// descriptor.
    written: usize,
    aligned: usize,
    /// Digest of the payload, once it is complete.
    pub(super) digest: Option<[u8; 32]>,
    /// Zero-copy notifications still to come: the slot's pages are referenced by the kernel until then.
    notifs: u32,
    /// The completion went out while notifications were still to come (the task then only holds its slot).
    pub(super) reported: bool,
}

fn job_len(job: &Job) -> (u64, u64) {
    match job {
        Job::Send(j) => (j.offset, j.len),
        Job::Recv(j) => (j.offset, j.len),
        _ => unreachable!("only socket jobs"),
    }
}

impl Shard {
    /// Start a socket task in `slot` (the caller stores it and retires it when it has nothing in flight).
    pub(super) fn admit_net(&mut self, slot: usize, mut task: Task) {
        let block = self.arena.block_bytes();
        let (offset, len) = job_len(&task.job);
        let timeout = match &task.job {
            Job::Send(j) => j.timeout,
            Job::Recv(j) => j.timeout,
            _ => unreachable!("only socket jobs"),
        };
        task.offset = offset;
        task.end = offset + len;
        let mut state = NetState {
            ts: types::Timespec::new().sec(timeout.as_secs()).nsec(timeout.subsec_nanos()),
            got: 0,
            frame_start: HEAD_ROOM_BYTES,
            frame_len: 0,
            sent: 0,
            written: 0,
            aligned: 0,
            digest: None,
            notifs: 0,
            reported: false,
        };
        let op = if matches!(task.job, Job::Send(_)) { Op::Send } else { Op::Recv };
        let path = net_path(&task.job).to_path_buf();
        if len as usize + HEAD_ROOM_BYTES > block {
            task.error = Some(net::too_large(op, &path, len, block));
            self.tasks[slot] = Some(task);
            return;
        }
        if let Job::Recv(r) = &task.job {
            if r.prefix.len() > len as usize {
                task.error = Some(net::too_large(op, &path, len, block));
                self.tasks[slot] = Some(task);
                return;
            }
            // SAFETY: the slot was just taken from the free list; no I/O uses it.
            let buf = unsafe { self.arena.slot_mut(slot) };
            buf[HEAD_ROOM_BYTES..HEAD_ROOM_BYTES + r.prefix.len()].copy_from_slice(&r.prefix);
            state.got = r.prefix.len();
        }
        task.net = Some(Box::new(state));
        self.tasks[slot] = Some(task);
        if matches!(self.tasks[slot].as_ref().expect("stored").job, Job::Send(_)) {
            self.net_read(slot);
        } else {
            self.net_recv(slot);
        }
    }

    fn net(&mut self, slot: usize) -> &mut NetState {
        self.task(slot).net.as_mut().expect("a socket task")
    }

    /// SendJob: read the rest of the payload from the file into the slot, after the head room.
    fn net_read(&mut self, slot: usize) {
        let (file, end) = match &self.tasks[slot].as_ref().expect("live task").job {
            Job::Send(j) => (j.file, j.offset + j.len),
            _ => unreachable!("a send task"),
        };
        let t = self.task(slot);
        let got = t.net.as_ref().expect("a socket task").got;
        let at = t.offset + got as u64;
        let len = (end - at) as u32;
        t.ops_pending += 1;
        // SAFETY: head room + payload fit in the slot (checked at admission).
        let buf = unsafe { self.arena.slot_ptr(slot).add(HEAD_ROOM_BYTES + got) };
        let sqe = match self.buffers.index(slot) {
            Some(i) => opcode::ReadFixed::new(types::Fd(file), buf, len, i).offset(at).build(),
            None => opcode::Read::new(types::Fd(file), buf, len).offset(at).build(),
        };
        self.push(sqe.user_data(user_data(slot, Step::Read)));
    }

    /// Queue a socket operation and its LINK_TIMEOUT back to back.
    fn push_linked(&mut self, slot: usize, sqe: squeue::Entry, step: Step) {
        let ts: *const types::Timespec = &self.net(slot).ts;
        self.task(slot).ops_pending += 2;
        let op = sqe.flags(squeue::Flags::IO_LINK).user_data(user_data(slot, step));
        let timeout = opcode::LinkTimeout::new(ts).build().user_data(user_data(slot, Step::Timeout));
        self.push_linked_pair(op, timeout);
    }

    /// SendJob: send what is left of the frame.
    fn net_send(&mut self, slot: usize) {
        let (sock, zerocopy) = match &self.tasks[slot].as_ref().expect("live task").job {
            Job::Send(j) => (j.sock, j.zerocopy),
            _ => unreachable!("a send task"),
        };
        let st = self.net(slot);
        let (from, len) = (st.frame_start + st.sent, (st.frame_len - st.sent) as u32);
        // SAFETY: the frame lies inside the slot.
        let buf = unsafe { self.arena.slot_ptr(slot).add(from) };
        let flags = libc::MSG_NOSIGNAL | libc::MSG_WAITALL;
        let sqe = if zerocopy {
            opcode::SendZc::new(types::Fd(sock), buf, len).buf_index(self.buffers.index(slot)).flags(flags).build()
        } else {
            opcode::Send::new(types::Fd(sock), buf, len).flags(flags).build()
        };
        self.push_linked(slot, sqe, Step::Send);
    }

    /// RecvJob: receive what is left of the payload, or check it once it is all there.
    fn net_recv(&mut self, slot: usize) {
        let (sock, len) = match &self.tasks[slot].as_ref().expect("live task").job {
            Job::Recv(j) => (j.sock, j.len as usize),
            _ => unreachable!("a receive task"),
        };
        let got = self.net(slot).got;
        if got >= len {
            return self.net_received(slot);
        }
        // SAFETY: the payload fits in the slot after the head room (checked at admission).
        let buf = unsafe { self.arena.slot_ptr(slot).add(HEAD_ROOM_BYTES + got) };
        let sqe = opcode::Recv::new(types::Fd(sock), buf, (len - got) as u32).flags(libc::MSG_WAITALL).build();
        self.push_linked(slot, sqe, Step::Recv);
    }

    /// A completion of a socket task.
    pub(super) fn on_net_cqe(&mut self, slot: usize, step: Step, res: i32, flags: u32) {
        let t = self.task(slot);
        if step == Step::Send && cqueue::notif(flags) {
            // The kernel no longer references the slot's pages.
            t.ops_pending -= 1;
            t.net.as_mut().expect("a socket task").notifs -= 1;
            return;
        }
        t.ops_pending -= 1;
        if step == Step::Send && cqueue::more(flags) {
            // A notification follows.
            t.ops_pending += 1;
            t.net.as_mut().expect("a socket task").notifs += 1;
        }
        match step {
            // A LINK_TIMEOUT: its operation's completion says what happened.
            Step::Timeout => {}
            Step::Read => self.on_net_read(slot, res),
            Step::Send => self.on_net_sent(slot, res),
            Step::Recv => self.on_net_recv(slot, res),
            Step::Write => self.on_net_write(slot, res),
            Step::OpenSrc | Step::ReadBack => unreachable!("socket tasks neither open nor read back"),
        }
    }

    /// Report a socket task whose only operations left are zero-copy notifications: the frame is in the socket,
    /// so its submitter may go on (read the answer, send the next frame) while the kernel still holds the slot's
    /// pages — until the peer acknowledged the bytes, which costs a round trip per frame if waited for, and forever
    /// if the peer stops reading. The slot stays taken until the last notification ([`Shard::retire`]).
    pub(super) fn report_net(&mut self, slot: usize, ctx: &fastsync_engine::ShardCtx) {
        let Some(t) = self.tasks[slot].as_mut() else { return };
        let Some(st) = t.net.as_ref() else { return };
        if st.reported || st.notifs == 0 || t.ops_pending != st.notifs {
            return;
        }
        let outcome = super::net_outcome(t);
        t.net.as_mut().expect("a socket task").reported = true;
        let completion =
            fastsync_engine::Completion { tag: t.job.tag(), bytes: t.bytes_written, shard: ctx.index, outcome };
        ctx.complete_to(t.job.reply(), completion);
    }

    fn fail(&mut self, slot: usize, e: JobError) {
        self.task(slot).error.get_or_insert(e);
    }

    fn socket_error(&mut self, slot: usize, op: Op, res: i32) {
        let t = self.task(slot);
        let path = net_path(&t.job).to_path_buf();
        let timeout = match &t.job {
            Job::Send(j) => j.timeout,
            Job::Recv(j) => j.timeout,
            _ => unreachable!("only socket jobs"),
        };
        // ECANCELED: the linked timeout fired before anything moved.
        let e = if res == -libc::ECANCELED {
            net::stalled(op, &path, timeout)
        } else {
            JobError::new(op, path, io::Error::from_raw_os_error(-res))
        };
        self.fail(slot, e);
    }

    fn on_net_read(&mut self, slot: usize, res: i32) {
        if res < 0 {
            let path = net_path(&self.task(slot).job).to_path_buf();
            return self.fail(slot, JobError::new(Op::Read, path, io::Error::from_raw_os_error(-res)));
        }
        let (_, len) = job_len(&self.task(slot).job);
        let st = self.net(slot);
        st.got += res as usize;
        if res > 0 && (st.got as u64) < len {
            return self.net_read(slot);
        }
        // The payload is in (all of it, or up to the end of a file that is shorter now): hash it, put the head in
        // front of it and send both at once.
        let got = st.got;
        // SAFETY: the read into this slot has completed and no other I/O uses it.
        let payload = unsafe { &self.arena.slot_mut(slot)[HEAD_ROOM_BYTES..HEAD_ROOM_BYTES + got] };
        let digest = *blake3::hash(payload).as_bytes();
        self.net(slot).digest = Some(digest);
        if got == 0 {
            return;
        }
        let head = match &mut self.task(slot).job {
            Job::Send(j) => std::mem::replace(&mut j.head, Box::new(|_, _| Vec::new()))(&digest, got),
            _ => unreachable!("a send task"),
        };
        if head.len() > HEAD_ROOM_BYTES {
            let path = net_path(&self.task(slot).job).to_path_buf();
            return self.fail(slot, net::too_large(Op::Send, &path, head.len() as u64, HEAD_ROOM_BYTES));
        }
        let start = HEAD_ROOM_BYTES - head.len();
        // SAFETY: as above.
        unsafe { self.arena.slot_mut(slot)[start..HEAD_ROOM_BYTES].copy_from_slice(&head) };
        let st = self.net(slot);
        st.frame_start = start;
        st.frame_len = head.len() + got;
        self.net_send(slot);
    }

    fn on_net_sent(&mut self, slot: usize, res: i32) {
        if res < 0 {
            return self.socket_error(slot, Op::Send, res);
        }
        if res == 0 {
            let path = net_path(&self.task(slot).job).to_path_buf();
            return self.fail(slot, JobError::new(Op::Send, path, io::ErrorKind::WriteZero.into()));
        }
        let st = self.net(slot);
        st.sent += res as usize;
        if st.sent < st.frame_len {
            // Cut short by the timeout after some progress (or a signal): the rest, with a fresh timeout.
            return self.net_send(slot);
        }
        let got = st.got as u64;
        self.task(slot).bytes_written = got;
    }

    fn on_net_recv(&mut self, slot: usize, res: i32) {
        if res < 0 {
            return self.socket_error(slot, Op::Recv, res);
        }
        let (_, len) = job_len(&self.task(slot).job);
        if res == 0 {
            let got = self.net(slot).got as u64;
            let path = net_path(&self.task(slot).job).to_path_buf();
            return self.fail(slot, net::closed(&path, got, len));
        }
        self.net(slot).got += res as usize;
        self.net_recv(slot);
    }

    /// RecvJob: all of the payload is in the slot: check it, then write it.
    fn net_received(&mut self, slot: usize) {
        let (offset, len, want, direct) = match &self.tasks[slot].as_ref().expect("live task").job {
            Job::Recv(j) => (j.offset, j.len as usize, j.digest, j.direct),
            _ => unreachable!("a receive task"),
        };
        // SAFETY: the receive into this slot has completed and no other I/O uses it.
        let payload = unsafe { &self.arena.slot_mut(slot)[HEAD_ROOM_BYTES..HEAD_ROOM_BYTES + len] };
        let digest = *blake3::hash(payload).as_bytes();
        if digest != want {
            let path = net_path(&self.task(slot).job).to_path_buf();
            return self.fail(slot, net::mismatch(&path, offset));
        }
        let gate = match &mut self.task(slot).job {
            Job::Recv(j) => j.gate.take(),
            _ => unreachable!("a receive task"),
        };
        let st = self.net(slot);
        st.digest = Some(digest);
        if let Some(gate) = gate
            && !gate()
        {
            // Dropped unwritten: the job completes with 0 bytes.
            return;
        }
        let st = self.net(slot);
        if direct.is_some() && offset.is_multiple_of(DIRECT_ALIGN_BYTES as u64) {
            st.aligned = len / DIRECT_ALIGN_BYTES * DIRECT_ALIGN_BYTES;
        }
        self.net_write(slot);
    }

    /// RecvJob: write the next part of the checked payload: its aligned part through the direct descriptor, the
    /// rest through the ordinary one.
    fn net_write(&mut self, slot: usize) {
        let (file, direct, offset, len) = match &self.tasks[slot].as_ref().expect("live task").job {
            Job::Recv(j) => (j.file, j.direct, j.offset, j.len as usize),
            _ => unreachable!("a receive task"),
        };
        let st = self.net(slot);
        let (written, aligned) = (st.written, st.aligned);
        if written >= len {
            self.task(slot).bytes_written = len as u64;
            self.stats.bytes_written += len as u64;
            return;
        }
        let (fd, end): (RawFd, usize) =
            if written < aligned { (direct.expect("aligned only with a direct fd"), aligned) } else { (file, len) };
        let at = offset + written as u64;
        let n = end - written;
        self.task(slot).ops_pending += 1;
        // SAFETY: the payload lies inside the slot.
        let buf = unsafe { self.arena.slot_ptr(slot).add(HEAD_ROOM_BYTES + written) };
        if written >= aligned && !self.ring_buffered_writes {
            // As for copies (EngineConfig::buffered_writes_nonblocking): a buffered write through the ring would be
            // punted to a kernel worker thread on ext4; one pwrite here is cheaper.
            // SAFETY: the slot holds `n` valid bytes at `buf`, and no I/O is in flight on it.
            let r = unsafe { libc::pwrite(fd, buf.cast(), n, at as libc::off_t) };
            self.stats.syscalls += 1;
            let res = if r < 0 { -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) } else { r as i32 };
            self.task(slot).ops_pending -= 1;
            return self.on_net_write(slot, res);
        }
        let sqe = match self.buffers.index(slot) {
            Some(i) => opcode::WriteFixed::new(types::Fd(fd), buf, n as u32, i).offset(at).build(),
            None => opcode::Write::new(types::Fd(fd), buf, n as u32).offset(at).build(),
        };
        self.push(sqe.user_data(user_data(slot, Step::Write)));
    }

    fn on_net_write(&mut self, slot: usize, res: i32) {
        let st = self.net(slot);
        let direct_part = st.written < st.aligned;
        if res == -libc::EINVAL && direct_part {
            // A device with blocks larger than 4 KiB: the rest goes through the page cache.
            st.aligned = st.written;
            return self.net_write(slot);
        }
        if res <= 0 {
            let e = if res == 0 { io::ErrorKind::WriteZero.into() } else { io::Error::from_raw_os_error(-res) };
            let path = net_path(&self.task(slot).job).to_path_buf();
            return self.fail(slot, JobError::new(Op::Write, path, e));
        }
        st.written += res as usize;
        self.net_write(slot);
    }
}

/// The file a socket job reads or writes (named in its errors).
pub(super) fn net_path(job: &Job) -> &std::path::Path {
    match job {
        Job::Send(j) => &j.path,
        Job::Recv(j) => &j.path,
        _ => unreachable!("only socket jobs"),
    }
}
