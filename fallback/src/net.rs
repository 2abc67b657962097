//! Socket jobs on the portable engine: `pread` + `send`, `recv` + `pwrite` through slot 0 of the shard's arena, on
//! the shard's thread. Each wait for the socket is a `poll` bounded by the job's timeout (the socket's own mode and
//! timeouts do not matter: every call is `MSG_DONTWAIT`), so a stalled peer fails the job after the timeout of no
//! progress, as on io_uring.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use fastsync_engine::net::{self, HEAD_ROOM_BYTES, RecvJob, SendJob};
use fastsync_engine::{AlignedArena, JobError, Op, Outcome};

use crate::sys;

/// O_DIRECT's alignment of offsets and lengths.
const DIRECT_ALIGN_BYTES: usize = 4096;

/// Run a [`SendJob`]; `sent_bytes` is the payload that went.
pub(crate) fn send(arena: &AlignedArena, job: SendJob, calls: &mut u64) -> Outcome {
    let len = job.len as usize;
    if len + HEAD_ROOM_BYTES > arena.block_bytes() {
        return Outcome::Failed(net::too_large(Op::Send, &job.path, job.len, arena.block_bytes()));
    }
    // SAFETY: the shard runs one job at a time: nothing else uses slot 0 now.
    let slot = unsafe { arena.slot_mut(0) };
    // SAFETY: the submitter keeps the file open until the completion (contract).
    let file = unsafe { BorrowedFd::borrow_raw(job.file) };
    let got = match sys::pread_full(file, &mut slot[HEAD_ROOM_BYTES..HEAD_ROOM_BYTES + len], job.offset, calls) {
        Ok(n) => n,
        Err(e) => return Outcome::Failed(JobError::new(Op::Read, &job.path, e)),
    };
    let payload = &slot[HEAD_ROOM_BYTES..HEAD_ROOM_BYTES + got];
    let digest = *blake3::hash(payload).as_bytes();
    if got == 0 {
        return Outcome::Moved { digest, bytes: 0 };
    }
    let head = (job.head)(&digest, got);
    if head.len() > HEAD_ROOM_BYTES {
        return Outcome::Failed(net::too_large(Op::Send, &job.path, head.len() as u64, HEAD_ROOM_BYTES));
    }
    let start = HEAD_ROOM_BYTES - head.len();
    slot[start..HEAD_ROOM_BYTES].copy_from_slice(&head);
    match send_all(job.sock, &slot[start..HEAD_ROOM_BYTES + got], job.timeout, calls) {
        Ok(()) => Outcome::Moved { digest, bytes: got as u64 },
        Err(e) => Outcome::Failed(socket_error(Op::Send, &job.path, job.timeout, e)),
    }
}

/// Run a [`RecvJob`]: receive all of the payload, check it, write it.
pub(crate) fn recv(arena: &AlignedArena, job: RecvJob, calls: &mut u64) -> Outcome {
    let len = job.len as usize;
    if len + HEAD_ROOM_BYTES > arena.block_bytes() || job.prefix.len() > len {
        return Outcome::Failed(net::too_large(Op::Recv, &job.path, job.len, arena.block_bytes()));
    }
    // SAFETY: the shard runs one job at a time: nothing else uses slot 0 now.
    let slot = unsafe { arena.slot_mut(0) };
    // The payload starts on a page boundary (after the head room), as O_DIRECT wants.
    let payload = &mut slot[HEAD_ROOM_BYTES..HEAD_ROOM_BYTES + len];
    let k = job.prefix.len();
    payload[..k].copy_from_slice(&job.prefix);
    let mut got = k;
    while got < len {
        match recv_some(job.sock, &mut payload[got..], job.timeout, calls) {
            Ok(0) => return Outcome::Failed(net::closed(&job.path, got as u64, job.len)),
            Ok(n) => got += n,
            Err(e) => return Outcome::Failed(socket_error(Op::Recv, &job.path, job.timeout, e)),
        }
    }
    let digest = *blake3::hash(payload).as_bytes();
    if digest != job.digest {
        return Outcome::Failed(net::mismatch(&job.path, job.offset));
    }
    if let Some(gate) = job.gate
        && !gate()
    {
        return Outcome::Moved { digest, bytes: 0 };
    }
    // SAFETY: the submitter keeps both descriptors open until the completion (contract).
    let file = unsafe { BorrowedFd::borrow_raw(job.file) };
    let mut aligned = match job.direct {
        Some(_) if job.offset.is_multiple_of(DIRECT_ALIGN_BYTES as u64) => {
            len / DIRECT_ALIGN_BYTES * DIRECT_ALIGN_BYTES
        }
        _ => 0,
    };
    if let (Some(direct), true) = (job.direct, aligned > 0) {
        // SAFETY: as above.
        let direct = unsafe { BorrowedFd::borrow_raw(direct) };
        match sys::pwrite_all(direct, &payload[..aligned], job.offset, calls) {
            Ok(()) => {}
            // A device with blocks larger than 4 KiB: all of it goes through the page cache.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => aligned = 0,
            Err(e) => return Outcome::Failed(JobError::new(Op::Write, &job.path, e)),
        }
    }
    if aligned < len
        && let Err(e) = sys::pwrite_all(file, &payload[aligned..], job.offset + aligned as u64, calls)
    {
        return Outcome::Failed(JobError::new(Op::Write, &job.path, e));
    }
    Outcome::Moved { digest, bytes: len as u64 }
}

/// A socket error as the contract names it: `TimedOut` after no progress for `timeout`.
fn socket_error(op: Op, path: &Path, timeout: Duration, e: io::Error) -> JobError {
    if e.kind() == io::ErrorKind::TimedOut {
        return net::stalled(op, path, timeout);
    }
    JobError::new(op, path, e)
}

/// Wait until `sock` is ready for `events`, at most `timeout` (`TimedOut` then).
fn wait(sock: RawFd, events: libc::c_short, timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
    let mut pfd = libc::pollfd { fd: sock, events, revents: 0 };
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            0 => return Err(io::ErrorKind::TimedOut.into()),
            n if n > 0 => return Ok(()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

fn send_all(sock: RawFd, mut bytes: &[u8], timeout: Duration, calls: &mut u64) -> io::Result<()> {
    while !bytes.is_empty() {
        wait(sock, libc::POLLOUT, timeout)?;
        *calls += 1;
        // SAFETY: a live buffer of the given length.
        let n =
            unsafe { libc::send(sock, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

fn recv_some(sock: RawFd, buf: &mut [u8], timeout: Duration, calls: &mut u64) -> io::Result<usize> {
    loop {
        wait(sock, libc::POLLIN, timeout)?;
        *calls += 1;
        // SAFETY: a live buffer of the given length.
        let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if !matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) {
            return Err(e);
        }
    }
}
