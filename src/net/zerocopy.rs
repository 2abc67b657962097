//! The zero-copy data path of plain `fastsync://` connections: file → socket with `sendfile(2)`, socket → file with
//! `splice(2)` through a pipe (Linux), chosen by `FASTSYNC_ZEROCOPY` (see [`Mode`]).
//!
//! Every chunk still carries the BLAKE3 digest of its bytes, and the receiver still checks it before the chunk
//! counts; what changes is who touches the bytes:
//!
//! - **sendfile** (sender): the digest is computed by reading the range from the page cache through a small buffer
//!   (256 KiB, so the copy stays in the CPU's cache), then the frame's head is sent and its payload goes from the page
//!   cache to the socket with `sendfile` — no copy into a chunk buffer, no frame encoding, no copy from user memory
//!   into the socket. The file may change between the hash and the send: the receiver then finds a wrong digest, as
//!   for a chunk damaged in transit (a push resends it; a pull sees the change in `DataEnd`). A file that shrinks
//!   under `sendfile` has the missing bytes sent as zeros, so the frame is always complete and the stream stays in
//!   step. (`mmap` would save the hashing copy too, but a file truncated under the mapping kills the process with
//!   SIGBUS.)
//! - **splice** (receiver): the frame's head is read, then the payload moves socket → pipe (page references, no
//!   copy) → file (one copy, into the page cache); the digest is then computed by reading the range back from the
//!   page cache, and only a match counts the chunk. So a damaged chunk *is* written into the temporary, but never
//!   counted: it is sent again (push) or the file fails (pull), and a range already counted is never overwritten by
//!   a splice (the server reserves the range first, see `server.rs`).
//!
//! With `--encrypt` or `--compress` the bytes must pass through user memory, so those connections always take the
//! ordinary path ([`Reader::plain`] is `None`).

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// More of the frame follows (Linux: the head waits for its payload in one segment); elsewhere no such flag.
#[cfg(target_os = "linux")]
const MSG_MORE: libc::c_int = libc::MSG_MORE;
#[cfg(not(target_os = "linux"))]
const MSG_MORE: libc::c_int = 0;

use fastsync_engine::{Job, Op, Outcome, RecvJob, SendJob};

use super::client::{self, Connection, DataEnd, GetError, ReqError};
use super::direct::DirectFile;
use super::record::Reader;
use super::shards;
use super::sparse;
use super::wire::{self, FRAME_BYTES_MAX, Msg, code};

/// The environment variable that picks the data path.
pub const ENV: &str = "FASTSYNC_ZEROCOPY";

/// Bytes hashed per read when the digest of a range is computed from the page cache.
const HASH_PIECE_BYTES: usize = 256 << 10;

/// Which parts of the data path avoid user-space copies (`FASTSYNC_ZEROCOPY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `off`: read into a buffer, hash, encode, write (and the reverse on receipt).
    Off,
    /// `sendfile`: senders hash from the page cache and send the payload with `sendfile`.
    Sendfile,
    /// `splice`: receivers splice the payload into the file and hash it back from the page cache.
    Splice,
    /// `both`: `sendfile` and `splice`.
    Both,
    /// `shards` (the default): large files' chunks move on the engine's shards ([`super::shards`]): read into
    /// registered buffers, hashed and sent from them; received into them, checked, and only then written (O_DIRECT
    /// where the file is). Where the shards could not start, as `sendfile`.
    Shards,
    /// `shards-zc`: as `shards`, sending with io_uring's zero-copy send (SEND_ZC) from the registered buffers.
    ShardsZc,
}

impl Mode {
    /// The default when `FASTSYNC_ZEROCOPY` is unset: `shards`, which took the least CPU both ways in the A/B on
    /// loopback (README, "LAN transfers", has the measurements: against `sendfile`, the default before it, 22% less
    /// CPU on a push and 28% less on a pull, and 13% / 29% less time), and checks each chunk before it is written. `shards-zc` cost more there (on loopback the kernel copies zero-copy sends at the receiver anyway).
    /// The receiving splice (`splice`, `both`) is opt-in: a splice stalled mid-chunk holds its transfer until the
    /// server's `--timeout`, so a stream replaced after a stall cannot end its file meanwhile (tests/robust.rs).
    pub const DEFAULT: Mode = Mode::Shards;

    pub fn parse(s: &str) -> Option<Mode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "0" | "no" => Some(Mode::Off),
            "sendfile" => Some(Mode::Sendfile),
            "splice" => Some(Mode::Splice),
            "both" | "on" | "1" | "yes" => Some(Mode::Both),
            "shards" => Some(Mode::Shards),
            "shards-zc" => Some(Mode::ShardsZc),
            _ => None,
        }
    }

    /// Senders use `sendfile` (a shard mode where no shards run, too).
    pub fn sends_from_file(self) -> bool {
        cfg!(target_os = "linux") && matches!(self, Mode::Sendfile | Mode::Both | Mode::Shards | Mode::ShardsZc)
    }

    /// Large files' chunks go through the engine's shards (when the process started them).
    pub fn on_shards(self) -> bool {
        matches!(self, Mode::Shards | Mode::ShardsZc)
    }

    /// Receivers splice into the file.
    pub fn splices_into_file(self) -> bool {
        cfg!(target_os = "linux") && matches!(self, Mode::Splice | Mode::Both)
    }
}

/// The data path of this process: `FASTSYNC_ZEROCOPY`, read once (an unknown value is reported once and ignored).
pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    *MODE.get_or_init(|| match std::env::var(ENV) {
        Err(_) => Mode::DEFAULT,
        Ok(v) => Mode::parse(&v).unwrap_or_else(|| {
            eprintln!(
                "fastsync: warning: {ENV}={v:?} is not off, sendfile, splice, both, shards or shards-zc; using the \
                 default"
            );
            Mode::DEFAULT
        }),
    })
}

/// Why moving a payload from a connection into a file failed: which side, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// The connection failed (closed, reset, timed out): it is out of step and must be dropped.
    #[error("connection: {0}")]
    Socket(io::Error),
    /// The file could not be written; the rest of the payload was read and dropped, so the connection is in step.
    #[error("cannot write at offset {offset}: {cause}")]
    File { offset: u64, cause: io::Error },
}

thread_local! {
    /// The hashing buffer of this thread.
    static HASH_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// The pipe of this thread's splices, kept empty between payloads (`None` until first used, or after a failure
    /// left bytes in it).
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// BLAKE3 of `[offset, offset + len)` of `file`, read from the page cache through a small buffer, and how many bytes
/// there were (fewer at the end of the file).
pub fn hash_range(file: &File, offset: u64, len: usize) -> io::Result<([u8; 32], usize)> {
    HASH_BUF.with(|b| {
        let mut buf = b.borrow_mut();
        buf.resize(HASH_PIECE_BYTES, 0);
        let mut hasher = blake3::Hasher::new();
        let mut done = 0;
        while done < len {
            let want = (len - done).min(HASH_PIECE_BYTES);
            let n = client::read_at_full(file, &mut buf[..want], offset + done as u64)?;
            hasher.update(&buf[..n]);
            done += n;
            if n < want {
                break;
            }
        }
        Ok((*hasher.finalize().as_bytes(), done))
    })
}

/// Send `head` (flagged `MSG_MORE`, so it shares a packet with the payload), then `len` bytes of `file` from
/// `offset` with `sendfile`. Bytes missing because the file shrank meanwhile go as zeros: the frame is complete and
/// its digest fails at the receiver.
pub fn send_head_and_file(sock: &TcpStream, head: &[u8], file: &File, offset: u64, len: usize) -> io::Result<()> {
    let mut sent = 0;
    while sent < head.len() {
        let rest = &head[sent..];
        // SAFETY: a valid socket descriptor and a live buffer of the given length.
        let n =
            unsafe { libc::send(sock.as_raw_fd(), rest.as_ptr().cast(), rest.len(), MSG_MORE | libc::MSG_NOSIGNAL) };
        match n {
            n if n > 0 => sent += n as usize,
            0 => return Err(io::ErrorKind::WriteZero.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    let left = send_file(sock.as_raw_fd(), file.as_raw_fd(), offset, len)?;
    let zeros = [0u8; 64 << 10];
    let mut w = sock;
    let mut left = left;
    while left > 0 {
        let n = left.min(zeros.len());
        w.write_all(&zeros[..n])?;
        left -= n;
    }
    Ok(())
}

/// `sendfile` `len` bytes from `offset`; returns how many were left unsent because the file ended.
#[cfg(target_os = "linux")]
fn send_file(sock: RawFd, file: RawFd, offset: u64, len: usize) -> io::Result<usize> {
    let mut off = offset as libc::off_t;
    let mut left = len;
    while left > 0 {
        // SAFETY: valid descriptors and a live offset; the kernel advances `off`.
        let n = unsafe { libc::sendfile(sock, file, &mut off, left) };
        match n {
            n if n > 0 => left -= n as usize,
            0 => break,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(left)
}

#[cfg(not(target_os = "linux"))]
fn send_file(_sock: RawFd, _file: RawFd, _offset: u64, _len: usize) -> io::Result<usize> {
    Err(io::ErrorKind::Unsupported.into())
}

/// A pipe for splicing, both ends closed on drop.
struct Pipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
}

impl Pipe {
    /// Bytes one pipe holds (asked for with `F_SETPIPE_SZ`; the kernel may give less, which only means more calls).
    const BYTES: usize = 1 << 20;

    fn new() -> io::Result<Pipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: a two-element array for the two descriptors.
        #[cfg(target_os = "linux")]
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        // No pipe2 elsewhere; nothing splices there either (the pipe is only made where `mode` says so).
        // SAFETY: as above.
        #[cfg(not(target_os = "linux"))]
        let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: two fresh descriptors, owned from here on.
        let (r, w) = unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) };
        #[cfg(target_os = "linux")]
        // SAFETY: a valid pipe descriptor; a refusal (pipe-max-size, per-user limits) leaves the default size.
        unsafe {
            libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, Pipe::BYTES as libc::c_int);
        }
        Ok(Pipe { r, w })
    }
}

#[cfg(target_os = "linux")]
fn splice(
    from: RawFd,
    from_off: Option<&mut i64>,
    to: RawFd,
    to_off: Option<&mut i64>,
    len: usize,
) -> io::Result<usize> {
    let from_off = from_off.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    let to_off = to_off.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    loop {
        // SAFETY: valid descriptors; the offsets are null or point to live integers.
        let n = unsafe { libc::splice(from, from_off, to, to_off, len, libc::SPLICE_F_MOVE) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn splice(_: RawFd, _: Option<&mut i64>, _: RawFd, _: Option<&mut i64>, _: usize) -> io::Result<usize> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Read and drop `len` bytes of the connection (a payload nobody wants), keeping it in step.
pub fn discard(r: &mut impl Read, len: usize) -> io::Result<()> {
    let mut sink = [0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let n = left.min(sink.len());
        r.read_exact(&mut sink[..n])?;
        left -= n;
    }
    Ok(())
}

/// Fill `buf` from the connection without making the reader buffer more: what `r` holds first, then straight from
/// the socket (so the payload that follows a frame's head stays in the socket, for [`recv_into_file`]).
pub fn read_exact_direct(r: &mut BufReader<Reader<TcpStream>>, buf: &mut [u8]) -> io::Result<()> {
    let k = r.buffer().len().min(buf.len());
    buf[..k].copy_from_slice(&r.buffer()[..k]);
    r.consume(k);
    match r.get_ref().plain() {
        Some(mut sock) => sock.read_exact(&mut buf[k..]),
        None => r.read_exact(&mut buf[k..]),
    }
}

/// Move a `len`-byte payload from the connection into `file` at `offset`: the part `r` already buffered is written
/// from there, the rest is spliced socket → pipe → file. On a file error the rest of the payload is read and dropped.
pub fn recv_into_file(
    r: &mut BufReader<Reader<TcpStream>>,
    file: &File,
    offset: u64,
    len: usize,
) -> Result<(), SpliceError> {
    let k = r.buffer().len().min(len);
    let buffered = file.write_all_at(&r.buffer()[..k], offset);
    r.consume(k);
    let file_err = |r: &mut BufReader<Reader<TcpStream>>, left: usize, at: u64, cause: io::Error| {
        discard(r, left).map_err(SpliceError::Socket)?;
        Err(SpliceError::File { offset: at, cause })
    };
    if let Err(cause) = buffered {
        return file_err(r, len - k, offset, cause);
    }
    let Some(sock) = r.get_ref().plain().map(|s| s.as_raw_fd()) else {
        // Records: the bytes come through the reader (never reached: callers check for a plain connection).
        let mut buf = vec![0u8; len - k];
        r.read_exact(&mut buf).map_err(SpliceError::Socket)?;
        return file.write_all_at(&buf, offset + k as u64).map_err(|cause| SpliceError::File { offset, cause });
    };
    let pipe = PIPE.with(|p| p.borrow_mut().take()).map_or_else(Pipe::new, Ok);
    let pipe = match pipe {
        Ok(p) => p,
        Err(cause) => return file_err(r, len - k, offset, cause),
    };
    let (mut moved, mut written, rest) = (0usize, 0usize, len - k);
    while written < rest {
        if moved == written {
            // The pipe is empty: refill it from the socket (blocks up to the socket's read timeout).
            match splice(sock, None, pipe.w.as_raw_fd(), None, (rest - moved).min(Pipe::BYTES)) {
                Ok(0) => return Err(SpliceError::Socket(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => moved += n,
                Err(e) => {
                    PIPE.with(|p| *p.borrow_mut() = Some(pipe));
                    return Err(SpliceError::Socket(e));
                }
            }
        }
        let at = offset + (k + written) as u64;
        let mut off = at as i64;
        match splice(pipe.r.as_raw_fd(), None, file.as_raw_fd(), Some(&mut off), moved - written) {
            Ok(0) => return file_err(r, rest - moved, at, io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            // The pipe still holds bytes: it is dropped (closed) here, a fresh one is made next time.
            Err(cause) => return file_err(r, rest - moved, at, cause),
        }
    }
    PIPE.with(|p| *p.borrow_mut() = Some(pipe));
    Ok(())
}

/// Whether `[offset, offset + len)` of `file` (read back from the page cache) has `digest`.
pub fn range_matches(file: &File, offset: u64, len: usize, digest: &[u8; 32]) -> io::Result<bool> {
    let (d, n) = hash_range(file, offset, len)?;
    Ok(n == len && d == *digest)
}

/// "connection to ADDR lost: CAUSE", worded as the client words it.
fn lost(addr: &str, sock: Option<&TcpStream>, e: &io::Error) -> ReqError {
    let cause = match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            let t = sock.and_then(|s| s.read_timeout().ok().flatten()).unwrap_or(client::DEFAULT_TIMEOUT);
            format!("no answer within {} s (timed out)", t.as_secs())
        }
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
        _ => e.to_string(),
    };
    ReqError::Broken(format!("connection to {addr} lost: {cause}"))
}

/// "connection to ADDR lost: CAUSE" for a socket job that failed on its connection: a stall is worded as the
/// client words one mid-conversation (the job's error says "stalled: no progress for N s").
fn lost_on_shard(addr: &str, e: &io::Error) -> ReqError {
    let cause = match e.kind() {
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
        _ => e.to_string(),
    };
    ReqError::Broken(format!("connection to {addr} lost: {cause}"))
}

fn msg_kind(m: &Msg) -> String {
    let kind = format!("{m:?}");
    kind.split([' ', '(', '{']).next().unwrap_or("?").to_string()
}

/// Why [`put_chunk`] failed.
#[derive(Debug)]
pub enum PutError {
    /// The local file could not be read.
    Read(io::Error),
    Req(ReqError),
}

/// Send up to `len` bytes of `file` from `offset` as one `PutData` of transfer `id`, resending a chunk the server
/// finds damaged (up to [`client::DIGEST_ATTEMPTS_MAX`] times). Returns how many bytes went (fewer at the end of the
/// file; 0: none, nothing was sent). Uses `sendfile` on a plain connection when [`mode`] says so.
pub fn put_chunk(conn: &mut Connection, id: u64, offset: u64, file: &File, len: usize) -> Result<usize, PutError> {
    if let Some(shards) = shards_for(conn).filter(|_| len >= shards::PAYLOAD_BYTES_MIN) {
        return put_chunk_on_shards(shards, conn, id, offset, file, len);
    }
    if !mode().sends_from_file() || conn.plain_parts().is_none() {
        let mut buf = vec![0u8; len];
        let got = client::read_at_full(file, &mut buf, offset).map_err(PutError::Read)?;
        if got > 0 {
            buf.truncate(got);
            conn.put_data(id, offset, buf).map_err(PutError::Req)?;
        }
        return Ok(got);
    }
    let addr = conn.addr().to_string();
    let mut attempt = 1;
    loop {
        let (digest, got) = hash_range(file, offset, len).map_err(PutError::Read)?;
        if got == 0 {
            return Ok(0);
        }
        let (_, w) = conn.plain_parts().expect("checked above");
        let head = wire::put_data_head(id, offset, &digest, got);
        let sent = w.flush().and_then(|()| {
            let sock = w.get_ref().plain().expect("plain");
            send_head_and_file(sock, &head, file, offset, got)
        });
        if let Err(e) = sent {
            return Err(PutError::Req(lost(&addr, None, &e)));
        }
        match put_answer(conn, &addr, offset, attempt)? {
            true => return Ok(got),
            false => attempt += 1,
        }
    }
}

/// The server's answer to a chunk sent as attempt `attempt`: `true` when it counts, `false` when it arrived damaged
/// and may be sent again ([`client::DIGEST_ATTEMPTS_MAX`] times in all); any other answer is the error.
fn put_answer(conn: &mut Connection, addr: &str, offset: u64, attempt: u32) -> Result<bool, PutError> {
    match conn.recv().map_err(PutError::Req)? {
        Msg::Ok => Ok(true),
        Msg::Error { code: code::DIGEST, .. } if attempt < client::DIGEST_ATTEMPTS_MAX => Ok(false),
        Msg::Error { code: code::DIGEST, message } => {
            let message = format!("{message} (the chunk at offset {offset} was sent {attempt} times)");
            Err(PutError::Req(ReqError::Server { code: code::DIGEST, message }))
        }
        Msg::Error { code, message } => Err(PutError::Req(ReqError::Server { code, message })),
        other => {
            let why = format!("protocol error from {addr}: {} instead of Ok", msg_kind(&other));
            Err(PutError::Req(ReqError::Broken(why)))
        }
    }
}

/// The socket shards, when this process started them and [`mode`] says to use them.
pub fn shards() -> Option<&'static shards::NetShards> {
    if mode().on_shards() { shards::get() } else { None }
}

/// The socket shards, when this process started them, [`mode`] says to use them and `conn` is plain.
fn shards_for(conn: &mut Connection) -> Option<&'static shards::NetShards> {
    if !mode().on_shards() {
        return None;
    }
    let shards = shards::get()?;
    conn.plain_parts().map(|_| shards)
}

/// The I/O timeout of a connection's socket (its read timeout; both are set alike).
fn sock_timeout(sock: &TcpStream) -> std::time::Duration {
    sock.read_timeout().ok().flatten().unwrap_or(client::DEFAULT_TIMEOUT)
}

/// How a payload received on the shards ended, when the connection stayed in step.
pub enum Received {
    /// Checked and written.
    Written,
    /// Its digest did not match; nothing was written.
    Mismatch,
    /// Checked, but the gate refused it: nothing was written.
    Refused,
    /// The file could not be written.
    File(io::Error),
}

/// Receive a `len`-byte payload whose head was read from `r` into `file` at `offset` on the socket shards: the
/// bytes `r` already buffered go with the job, the shard reads the rest from the socket, checks the digest and only
/// then writes (through `direct` where given; the caller keeps both descriptors open until this returns). `Err`: the connection failed (or the job was interrupted) and is out
/// of step.
#[allow(clippy::too_many_arguments)]
pub fn recv_on_shards(
    shards: &shards::NetShards,
    r: &mut BufReader<Reader<TcpStream>>,
    file: RawFd,
    direct: Option<RawFd>,
    offset: u64,
    len: usize,
    digest: [u8; 32],
    gate: Option<fastsync_engine::net::GateFn>,
) -> io::Result<Received> {
    let k = r.buffer().len().min(len);
    let prefix = r.buffer()[..k].to_vec();
    r.consume(k);
    let sock = r.get_ref().plain().expect("a plain connection");
    let (fd, timeout) = (sock.as_raw_fd(), sock_timeout(sock));
    let ran = shards.run(|reply| {
        Job::Recv(RecvJob {
            tag: 0,
            sock: fd,
            file,
            direct,
            path: PathBuf::new(),
            offset,
            len: len as u64,
            prefix,
            digest,
            timeout,
            gate,
            reply,
        })
    })?;
    match ran.outcome {
        Outcome::Moved { bytes: 0, .. } if len > 0 => Ok(Received::Refused),
        Outcome::Moved { .. } => Ok(Received::Written),
        // The payload was consumed: the connection is in step.
        Outcome::Failed(e) if e.op == Op::Verify => Ok(Received::Mismatch),
        Outcome::Failed(e) if e.op == Op::Write => Ok(Received::File(e.source)),
        Outcome::Failed(e) => Err(e.source),
        other => unreachable!("a receive job ends moved or failed, not {other:?}"),
    }
}

/// Send up to `len` bytes of `file` from `offset` on `sock` as one frame on the socket shards: read into a
/// registered buffer, hashed, then `head(digest, bytes)` and the bytes as one write. Returns how many payload bytes
/// went (fewer at the end of the file; 0: nothing was sent). `Ok(Err)`: the file could not be read, nothing was
/// sent (the connection is in step); `Err`: the connection failed.
pub fn send_on_shards(
    shards: &shards::NetShards,
    sock: &TcpStream,
    file: &File,
    offset: u64,
    len: usize,
    head: fastsync_engine::net::HeadFn,
) -> io::Result<io::Result<usize>> {
    let (fd, timeout) = (sock.as_raw_fd(), sock_timeout(sock));
    let ran = shards.run(|reply| {
        Job::Send(SendJob {
            tag: 0,
            sock: fd,
            file: file.as_raw_fd(),
            path: PathBuf::new(),
            offset,
            len: len as u64,
            head,
            timeout,
            zerocopy: shards.zerocopy(),
            reply,
        })
    })?;
    match ran.outcome {
        Outcome::Moved { bytes, .. } => Ok(Ok(bytes as usize)),
        Outcome::Failed(e) if e.op == Op::Read => Ok(Err(e.source)),
        Outcome::Failed(e) => Err(e.source),
        other => unreachable!("a send job ends moved or failed, not {other:?}"),
    }
}

/// [`put_chunk`] on the socket shards: each attempt is one [`SendJob`] (read into a registered buffer, hashed,
/// head and payload sent as one write), then the answer is read here.
fn put_chunk_on_shards(
    shards: &shards::NetShards,
    conn: &mut Connection,
    id: u64,
    offset: u64,
    file: &File,
    len: usize,
) -> Result<usize, PutError> {
    let addr = conn.addr().to_string();
    let mut attempt = 1;
    loop {
        let (_, w) = conn.plain_parts().expect("checked by shards_for");
        // Whatever the writer buffered goes first; then the shard owns the socket until the completion.
        w.flush().map_err(|e| PutError::Req(lost(&addr, None, &e)))?;
        let sock = w.get_ref().plain().expect("plain");
        let head = Box::new(move |digest: &[u8; 32], n| wire::put_data_head(id, offset, digest, n).to_vec());
        let got = match send_on_shards(shards, sock, file, offset, len, head) {
            Ok(Ok(0)) => return Ok(0),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(PutError::Read(e)),
            Err(e) => return Err(PutError::Req(lost_on_shard(&addr, &e))),
        };
        match put_answer(conn, &addr, offset, attempt)? {
            true => return Ok(got),
            false => attempt += 1,
        }
    }
}

/// Read `[offset, offset + len)` of remote `path` into `file` at the same offsets, calling `on_bytes` for every
/// chunk that arrived with a matching digest. Splices on a plain connection when [`mode`] says so; otherwise the
/// ordinary [`Connection::get`], writing through `direct` when given. The errors are [`Connection::get`]'s, and so
/// is keeping the connection in step.
pub fn get_into_file(
    conn: &mut Connection,
    path: &[u8],
    offset: u64,
    len: u64,
    file: &File,
    direct: Option<&DirectFile>,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<DataEnd, GetError> {
    let shards = shards_for(conn);
    if shards.is_none() && (!mode().splices_into_file() || conn.plain_parts().is_none()) {
        let on_bytes = std::cell::RefCell::new(on_bytes);
        let mut hole = |at: u64, n: u64| {
            sparse::make_hole(file, at, n)?;
            (on_bytes.borrow_mut())(n);
            Ok(())
        };
        let mut sink = |at: u64, bytes: &[u8]| {
            match direct {
                Some(d) => d.write_at(file, bytes, at)?,
                None => file.write_all_at(bytes, at)?,
            }
            (on_bytes.borrow_mut())(bytes.len() as u64);
            Ok(())
        };
        return conn.get(path, offset, len, &mut sink, &mut hole);
    }
    conn.send(&Msg::Get { path: path.to_vec(), offset, len, follow: conn.follows() })?;
    let addr = conn.addr().to_string();
    let (r, _) = conn.plain_parts().expect("checked above");
    let broken = |r: &BufReader<Reader<TcpStream>>, e: &io::Error| GetError::Req(lost(&addr, r.get_ref().plain(), e));
    let end = offset.saturating_add(len);
    let mut next = offset;
    let mut failure: Option<GetError> = None;
    loop {
        client::stop_if_interrupted(&addr)?;
        let mut head = [0u8; wire::DATA_HEAD_BYTES];
        read_exact_direct(r, &mut head[..5]).map_err(|e| broken(r, &e))?;
        if head[4] != wire::KIND_DATA {
            let frame = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
            if frame == 0 || frame > FRAME_BYTES_MAX {
                let why = format!("protocol error from {addr}: frame of {frame} bytes");
                return Err(GetError::Req(ReqError::Broken(why)));
            }
            let mut body = vec![0u8; frame];
            body[0] = head[4];
            read_exact_direct(r, &mut body[1..]).map_err(|e| broken(r, &e))?;
            let msg = Msg::decode_body(&body).map_err(|e| {
                GetError::Req(ReqError::Broken(format!("connection to {addr} lost: protocol error: {e}")))
            })?;
            if let Msg::Hole { offset: at, len: n } = msg {
                check_next(&addr, at, n, next, end)?;
                next += n;
                if failure.is_none() {
                    match sparse::make_hole(file, at, n) {
                        Ok(()) => on_bytes(n),
                        Err(e) => failure = Some(GetError::Sink(e)),
                    }
                }
                continue;
            }
            return match msg {
                Msg::DataEnd { size, mtime_sec, mtime_nsec } => match failure {
                    Some(f) => Err(f),
                    None => Ok(DataEnd { size, mtime: (mtime_sec, mtime_nsec), received_to: next }),
                },
                Msg::Error { code, message } => Err(GetError::Req(ReqError::Server { code, message })),
                other => {
                    let why = format!("protocol error from {addr}: {} instead of Data", msg_kind(&other));
                    Err(GetError::Req(ReqError::Broken(why)))
                }
            };
        }
        read_exact_direct(r, &mut head[5..]).map_err(|e| broken(r, &e))?;
        let h = wire::parse_data_head(&head)
            .map_err(|e| GetError::Req(ReqError::Broken(format!("connection to {addr} lost: protocol error: {e}"))))?;
        let (at, n) = (h.offset, h.len as u64);
        check_next(&addr, at, n, next, end)?;
        next += n;
        if failure.is_some() {
            discard(r, h.len).map_err(|e| broken(r, &e))?;
            continue;
        }
        if shards.is_some() && h.len < shards::PAYLOAD_BYTES_MIN {
            // A small payload stays on this thread (the hand-off would cost more): read, checked, then written.
            let mut bytes = vec![0u8; h.len];
            read_exact_direct(r, &mut bytes).map_err(|e| broken(r, &e))?;
            if client::digest(&bytes) != h.digest {
                failure = Some(corrupt_chunk(at));
                continue;
            }
            let written = match direct {
                Some(d) => d.write_at(file, &bytes, at),
                None => file.write_all_at(&bytes, at),
            };
            match written {
                Ok(()) => on_bytes(n),
                Err(e) => failure = Some(GetError::Sink(e)),
            }
            continue;
        }
        if let Some(shards) = shards {
            // The payload's first bytes may sit in the reader: they go with the job, and the shard takes the rest
            // from the socket, checks the digest, and only then writes.
            let (fd, direct_fd) = (file.as_raw_fd(), direct.map(DirectFile::raw_fd));
            match recv_on_shards(shards, r, fd, direct_fd, at, h.len, h.digest, None) {
                Ok(Received::Written) => on_bytes(n),
                Ok(Received::Refused) => unreachable!("a pull's receive has no gate"),
                // The payload was consumed: the connection is in step, the file failed.
                Ok(Received::Mismatch) => {
                    failure = Some(corrupt_chunk(at));
                }
                Ok(Received::File(e)) => failure = Some(GetError::Sink(e)),
                Err(e) => return Err(GetError::Req(lost_on_shard(&addr, &e))),
            }
            continue;
        }
        match recv_into_file(r, file, at, h.len) {
            Ok(()) => match range_matches(file, at, h.len, &h.digest) {
                Ok(true) => on_bytes(n),
                Ok(false) => {
                    failure = Some(corrupt_chunk(at));
                }
                Err(e) => failure = Some(GetError::Sink(e)),
            },
            Err(SpliceError::File { cause, .. }) => failure = Some(GetError::Sink(cause)),
            Err(SpliceError::Socket(e)) => return Err(broken(r, &e)),
        }
    }
}

/// The failure of a chunk whose bytes do not match its digest (the rest of the answer is still read).
fn corrupt_chunk(at: u64) -> GetError {
    GetError::Corrupt(format!("the BLAKE3 digest of the chunk at offset {at} does not match its bytes"))
}

/// A chunk or hole of a `Get` answer must be the next bytes of the range: otherwise the conversation cannot be
/// trusted any more.
fn check_next(addr: &str, at: u64, n: u64, next: u64, end: u64) -> Result<(), GetError> {
    if at != next || n == 0 || at.saturating_add(n) > end {
        return Err(GetError::Req(ReqError::Broken(format!(
            "protocol error from {addr}: it sent bytes {at}..{} where {next}..{end} were expected",
            at.saturating_add(n)
        ))));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(Mode::parse("off"), Some(Mode::Off));
        assert_eq!(Mode::parse(" Sendfile "), Some(Mode::Sendfile));
        assert_eq!(Mode::parse("splice"), Some(Mode::Splice));
        assert_eq!(Mode::parse("both"), Some(Mode::Both));
        assert_eq!(Mode::parse("shards"), Some(Mode::Shards));
        assert_eq!(Mode::parse("shards-zc"), Some(Mode::ShardsZc));
        assert_eq!(Mode::parse("fast"), None);
        assert!(!Mode::Off.sends_from_file() && !Mode::Off.splices_into_file());
        assert!(Mode::DEFAULT.on_shards() && Mode::ShardsZc.on_shards() && !Mode::Sendfile.on_shards());
    }

    #[test]
    fn hash_range_matches_blake3_of_the_bytes_and_stops_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let bytes: Vec<u8> = (0..(HASH_PIECE_BYTES * 3 + 123)).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        let f = File::open(&p).unwrap();
        let (d, n) = hash_range(&f, 5, bytes.len()).unwrap();
        assert_eq!(n, bytes.len() - 5);
        assert_eq!(d, *blake3::hash(&bytes[5..]).as_bytes());
        assert!(range_matches(&f, 100, 1000, blake3::hash(&bytes[100..1100]).as_bytes()).unwrap());
        assert!(!range_matches(&f, 101, 1000, blake3::hash(&bytes[100..1100]).as_bytes()).unwrap());
    }
}
