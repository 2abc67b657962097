//! Socket jobs: one frame's payload moved between a file and a connected stream socket by a shard (the data path of
//! `fastsync://` transfers), so that network bytes go through the same per-core rings and registered buffers as file
//! bytes. The engine knows nothing of the protocol: the caller hands it the frame head to send (built from the digest
//! and length the shard computes) or the digest a received payload must have.
//!
//! # Contract (both engines; in addition to the crate's)
//! - **Ownership.** The submitter keeps the socket and file descriptors open until the job's completion arrives, and
//!   does not read, write or close the socket meanwhile: for the duration of the job the shard owns the connection.
//!   The completion goes to the job's own `reply` channel (not to [`crate::Session`]'s), so any thread may submit
//!   socket jobs through a [`crate::Submitter`] and wait for its own completion.
//! - **Buffers.** A payload passes through one buffer slot of the shard: it must fit in the slot after
//!   [`HEAD_ROOM_BYTES`] (`len + HEAD_ROOM_BYTES <= block_bytes`), else the job fails ([`Op::Send`] / [`Op::Recv`],
//!   `InvalidInput`) before touching the socket.
//! - **Short reads and writes** are continued until the whole frame is sent or the whole payload received; `EINTR`
//!   and `EAGAIN` are waited out by the shard (io_uring polls the socket itself; the fallback `poll`s it). The socket
//!   must be in blocking mode (std's `TcpStream` is, unless told otherwise): io_uring hands `EAGAIN` back for a
//!   non-blocking one instead of waiting, which fails the job. Only no progress at all for
//!   [`SendJob::timeout`] / [`RecvJob::timeout`] fails the job, with `TimedOut` (a stalled peer); a peer that closes
//!   mid-payload fails it with `UnexpectedEof`, a reset with the OS error (`ECONNRESET`, `EPIPE`).
//! - **After a socket error the connection is out of step** (part of a frame may have gone or been consumed): the
//!   submitter must drop it. Every other failure leaves it in step: a [`SendJob`] that cannot read its file sends
//!   nothing; a [`RecvJob`] always consumes its whole payload first, so a digest mismatch ([`Op::Verify`]) or a write
//!   error ([`Op::Write`]) leaves the connection at the next frame.
//! - **Check before write.** A [`RecvJob`] writes nothing into the file unless the payload's BLAKE3 equals
//!   [`RecvJob::digest`]: a damaged chunk never lands in the file. Its [`RecvJob::gate`], when given, runs on the shard
//!   between the check and the write and may still refuse the write.
//! - **A file that shrinks** under a [`SendJob`]: the shard reads the payload before it builds the head, so the frame
//!   it sends is always complete and its digest is that of the bytes sent; fewer bytes than asked means the file ended
//!   ([`Outcome::Moved::bytes`](crate::Outcome::Moved) `< len`; 0: nothing was sent at all). The caller decides
//!   whether that is a change of the file (the receiving side of a push then sees a short transfer; a puller sees the
//!   new size in `DataEnd`).
//! - **Cancellation.** After [`crate::Session::cancel`] a socket job not yet started completes with
//!   [`Op::Interrupted`] without touching the socket (which stays in step); a started one runs to its end or its
//!   timeout.
//! - **Zero-copy sends** ([`SendJob::zerocopy`], io_uring `SEND_ZC` from the registered slot): the completion arrives
//!   once the whole frame is in the socket, as for a copying send; the slot is reused only after the kernel's
//!   notification that it no longer references the pages (when the peer acknowledged them), which the submitter
//!   does not wait for.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::{Completion, Op};

/// Bytes at the start of a buffer slot reserved for a frame head, so that head and payload leave as one contiguous
/// send. A head longer than this fails the job.
pub const HEAD_ROOM_BYTES: usize = 4096;

/// Decides, on the shard, whether a received and checked payload is written (see [`RecvJob::gate`]).
pub type GateFn = Box<dyn FnOnce() -> bool + Send>;

/// Builds the frame head once the payload's BLAKE3 digest and length are known.
pub type HeadFn = Box<dyn FnOnce(&[u8; 32], usize) -> Vec<u8> + Send>;

/// Read `[offset, offset + len)` of a file into a buffer slot, BLAKE3 it, and send `head(digest, bytes)` followed by
/// the bytes on a connected stream socket, as one contiguous write (so nothing can interleave).
pub struct SendJob {
    pub tag: u64,
    /// Connected stream socket, owned by the shard until the completion (module docs).
    pub sock: RawFd,
    /// The file to read (buffered or O_DIRECT-free descriptor; the offset need not be aligned).
    pub file: RawFd,
    /// The file's name, for errors.
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    pub head: HeadFn,
    /// No progress on the socket for this long fails the job (`TimedOut`).
    pub timeout: Duration,
    /// Send from the registered buffer with io_uring's zero-copy send (uring; ignored by the fallback).
    pub zerocopy: bool,
    pub reply: Sender<Completion>,
}

impl std::fmt::Debug for SendJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendJob")
            .field("tag", &self.tag)
            .field("sock", &self.sock)
            .field("path", &self.path)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Receive a `len`-byte payload from a connected stream socket (its first bytes may already have been read by the
/// caller: `prefix`), check its BLAKE3 against `digest`, and only then write it at `offset` of the file.
pub struct RecvJob {
    pub tag: u64,
    /// Connected stream socket, owned by the shard until the completion (module docs).
    pub sock: RawFd,
    /// Ordinary (buffered) descriptor of the file written.
    pub file: RawFd,
    /// An O_DIRECT descriptor on the same file: the payload's 4 KiB-aligned part is written through it when `offset`
    /// is aligned (from the slot, which is page-aligned), the rest through `file`.
    pub direct: Option<RawFd>,
    /// The file's name, for errors.
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    /// The payload's first bytes, already read from the connection by the caller (at most `len`).
    pub prefix: Vec<u8>,
    pub digest: [u8; 32],
    /// No progress on the socket for this long fails the job (`TimedOut`).
    pub timeout: Duration,
    /// Called on the shard once the whole payload is in and matched its digest, just before it is written: `false`
    /// drops it unwritten (the job then completes [`Moved`](crate::Outcome::Moved) with `bytes` 0). Lets a
    /// receiver claim what the write needs (a server's transfer) only for the write, not while a slow peer sends.
    pub gate: Option<GateFn>,
    pub reply: Sender<Completion>,
}

impl std::fmt::Debug for RecvJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvJob")
            .field("tag", &self.tag)
            .field("sock", &self.sock)
            .field("path", &self.path)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// The error of a job whose payload does not fit in a slot.
pub fn too_large(op: Op, path: &std::path::Path, len: u64, block_bytes: usize) -> crate::JobError {
    let e = std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("a payload of {len} bytes does not fit in a buffer slot of {block_bytes} bytes"),
    );
    crate::JobError::new(op, path, e)
}

/// The error of a socket that made no progress for `timeout`.
pub fn stalled(op: Op, path: &std::path::Path, timeout: Duration) -> crate::JobError {
    let e = std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("stalled: no progress for {} s (timed out)", timeout.as_secs_f64()),
    );
    crate::JobError::new(op, path, e)
}

/// The error of a peer that closed the connection in the middle of a payload.
pub fn closed(path: &std::path::Path, got: u64, len: u64) -> crate::JobError {
    let e = std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        format!("the peer closed the connection after {got} of {len} payload bytes"),
    );
    crate::JobError::new(Op::Recv, path, e)
}

/// The error of a payload whose digest does not match.
pub fn mismatch(path: &std::path::Path, offset: u64) -> crate::JobError {
    let e = std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the BLAKE3 digest of the chunk at offset {offset} does not match its bytes"),
    );
    crate::JobError::new(Op::Verify, path, e)
}
