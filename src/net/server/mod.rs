//! `fastsync serve ROOT`: serves one directory tree to authenticated `fastsync://` clients.
//!
//! One thread per connection, at most `--max-clients` at once (more are answered `BUSY`). Every connection first
//! authenticates ([`auth::server`]), then sends requests one at a time (docs/PROTOCOL.md). Every path a client names
//! goes through [`Root`]: `..`, absolute paths and symlinks on the way are refused, and the final component is only
//! ever used with the `*at` syscalls and `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW`, so nothing outside ROOT is read,
//! written or even stat'ed (a pull with `-L` reads what symlinks lead to, resolved by the kernel beneath ROOT only:
//! [`Root::follow`]). Files are written under a temporary name beside their destination and renamed into place
//! by `PutEnd`; the chunks of one file may arrive on any number of connections (the transfer table is shared). A
//! broken or malicious connection only ever ends itself: frames are checked before they are trusted, a stalled peer is
//! dropped after `--timeout`, and a panic in one connection's thread is caught and logged.
//!
//! This module admits connections and dispatches their requests; the requests themselves are served by `read`
//! (`Stat`, `List`, `Get`), `put` (the shared transfer table and the `Put*` requests), `tree` (`Mkdir`, `SetMeta`,
//! `Symlink`, `Link`, `Delete`), `xattr` and `clean` (what interrupted pushes left), on the `*at` wrappers of `sys`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use clap::Args;

use super::auth::{self, AuthError, Key, Policy};
use super::beneath::{O_PATH, Root};
use super::direct::{self, DirectFile};
use super::record::{Reader, Writer};
use super::sparse::{self, Piece};
use super::wire::{self, EntryKind, EntryMeta, Msg, WireError, code};
use super::zerocopy::{self, SpliceError};
use crate::{Error, interrupt, stale};
use fastsync_engine::journal::{Journal, Opened, SourceId};
use fastsync_engine::{Show, Timestamp};

mod clean;
mod put;
mod read;
mod sys;
mod tree;
mod xattr;

use clean::*;
use put::*;
use read::*;
use sys::*;
use tree::*;
use xattr::*;

/// Transfers registered at once (all connections together); `PutBegin` beyond it evicts an abandoned one or is
/// answered `BUSY`.
pub const TRANSFERS_MAX: usize = 4096;
/// A transfer that saw no request for this long is abandoned: its temporary is removed.
pub const TRANSFER_IDLE_EXPIRY: Duration = Duration::from_secs(10 * 60);
/// Separate received ranges one transfer may have (chunks arriving out of order); more is a protocol error.
const RANGES_MAX: usize = 1 << 16;
/// Bytes of file data per `Data` frame of a `Get` (a quarter of the frame cap: bounded memory per connection).
const GET_CHUNK_BYTES: usize = 1 << 20;
/// How often abandoned transfers are looked for.
const JANITOR_PERIOD: Duration = Duration::from_secs(30);
/// Connections being turned away (told `BUSY`) at once; beyond it they are closed without a word.
const TURNING_AWAY_MAX: usize = 64;

/// `fastsync serve --help`.
pub const LONG_ABOUT: &str = "Serve ROOT to fastsync:// clients: `fastsync copy`, `sync` and `list` on another host \
    can then read from and write to fastsync://HOST:PORT/PATH, PATH being relative to ROOT.\n\n\
    Every connection must prove it knows the shared token (--token-file FILE or FASTSYNC_TOKEN, the same on both \
    hosts); the token itself never crosses the network. Clients never reach outside ROOT: `..`, absolute paths and \
    symlinks on the way are refused, and symlinks are never followed, except for a client pulling with -L, and then \
    only while they stay beneath ROOT (openat2 RESOLVE_BENEATH; refused where the kernel lacks it). Files appear under their final names only when \
    complete. Traffic is encrypted (ChaCha20-Poly1305, keys derived from the token) only for clients that ask for it \
    with --encrypt: use --require-encrypt to refuse the others on an untrusted network. Clients may ask for zstd \
    compression (--compress); --no-compress declines. Stops on SIGINT/SIGTERM, removing unfinished files.";

/// `fastsync serve` flags.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Directory to serve: clients read and write only beneath it
    pub root: PathBuf,
    /// Address and port to listen on (loopback by default; e.g. 0.0.0.0:7878 for every IPv4 interface)
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:7878")]
    pub listen: String,
    /// Refuse every request that would change something
    #[arg(long)]
    pub read_only: bool,
    /// Clients served at once; more are told the server is busy
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_clients: u32,
    /// Drop a connection that makes no progress for SECS seconds (an idle client included)
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub timeout: u64,
    /// Refuse clients that do not ask for encryption (--encrypt); use it on any network you do not trust
    #[arg(long)]
    pub require_encrypt: bool,
    /// Decline clients' --compress (their connections go uncompressed): saves this host's CPU
    #[arg(long)]
    pub no_compress: bool,
}

/// Run the server until SIGINT/SIGTERM; returns the exit code. The token comes from `token_file` (the global
/// `--token-file`), else `FASTSYNC_TOKEN`.
/// `direct_io`: large pushed files are written with O_DIRECT (the `direct_io` setting). `shard_buffer_bytes`: what the
/// socket shards' buffers take of the memory limit (0 without them); the connections share the rest.
pub fn run(
    args: &ServeArgs,
    token_file: Option<&Path>,
    memory_limit_bytes: u64,
    shard_buffer_bytes: u64,
    direct_io: bool,
) -> Result<i32, Error> {
    let token = auth::load_token(token_file, std::env::var_os("FASTSYNC_TOKEN"))
        .map_err(Error::Refused)?
        .ok_or_else(|| Error::Refused("serve needs a shared token: --token-file FILE or FASTSYNC_TOKEN".into()))?;
    let key = Key::from_token(&token);
    drop(token);
    let root = Root::open(&args.root).map_err(|e| Error::io("cannot serve", &args.root, e))?;
    let addrs: Vec<SocketAddr> = args
        .listen
        .to_socket_addrs()
        .map_err(|e| Error::Refused(format!("--listen {}: {e} (expected ADDR:PORT)", args.listen)))?
        .collect();
    let listener = TcpListener::bind(&addrs[..]).map_err(|e| Error::io("cannot listen on", &args.listen, e))?;
    let local = listener.local_addr().map_err(|e| Error::io("cannot listen on", &args.listen, e))?;
    listener.set_nonblocking(true).map_err(|e| Error::io("cannot listen on", &args.listen, e))?;
    raise_fd_limit();
    interrupt::install();

    let shared = Arc::new(Shared {
        root,
        key,
        read_only: args.read_only,
        policy: Policy {
            read_only: args.read_only,
            require_encrypt: args.require_encrypt,
            no_compress: args.no_compress,
        },
        timeout: Duration::from_secs(args.timeout),
        max_clients: clients_max(args.max_clients as usize, memory_limit_bytes.saturating_sub(shard_buffer_bytes)),
        active: AtomicUsize::new(0),
        turning_away: AtomicUsize::new(0),
        transfers: Arc::new(Transfers::new(TRANSFERS_MAX)),
        seq: AtomicU64::new(0),
        direct_io,
    });
    let janitor = Arc::clone(&shared);
    std::thread::Builder::new()
        .name("janitor".into())
        .spawn(move || {
            loop {
                std::thread::sleep(JANITOR_PERIOD);
                janitor.transfers.expire(Instant::now(), TRANSFER_IDLE_EXPIRY);
            }
        })
        .map_err(|e| Error::io("cannot start a thread for", &args.root, e))?;

    let ro = if args.read_only { " (read-only)" } else { "" };
    let enc = if args.require_encrypt { " (encryption required)" } else { "" };
    eprintln!("fastsync: serving {} on {local}{ro}{enc}", args.root.shown());
    if shared.max_clients < args.max_clients as usize {
        eprintln!(
            "fastsync: at most {} connections at once: the memory limit ({} MiB{}) allows {} MiB per connection; \
             raise --memory-limit (or --memory-profile) for more",
            shared.max_clients,
            memory_limit_bytes >> 20,
            if shard_buffer_bytes > 0 {
                format!(", {} MiB of it the socket shards' buffers", shard_buffer_bytes.div_ceil(1 << 20))
            } else {
                String::new()
            },
            CONNECTION_BYTES_MAX >> 20
        );
    }
    if !local.ip().is_loopback() && !args.require_encrypt {
        eprintln!(
            "fastsync: warning: clients that do not ask for --encrypt are served in clear: use --require-encrypt on \
             a network you do not trust"
        );
    }
    loop {
        if let Some(signal) = interrupt::received() {
            let (removed, kept) = shared.transfers.abort_all();
            eprintln!(
                "fastsync: interrupted; stopped serving ({removed} unfinished transfer(s) removed, {kept} kept for \
                 their clients to resume)"
            );
            return Ok(interrupt::exit_code(signal));
        }
        match listener.accept() {
            Ok((stream, peer)) => admit(&shared, stream, peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(listener.as_raw_fd(), 500),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE and friends: say so, and do not spin.
                eprintln!("fastsync: cannot accept a connection: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// The most memory one connection holds: a frame being read, the record layer's buffer (decrypted or
/// decompressed), and the answer being written, each at most [`wire::FRAME_BYTES_MAX`], and the aligned buffer of
/// its direct writes ([`direct::BUFFER_BYTES`]). TCP's flow control is the
/// backpressure: a connection reads its next frame only when the last one is written to disk.
pub const CONNECTION_BYTES_MAX: u64 = 3 * wire::FRAME_BYTES_MAX as u64 + direct::BUFFER_BYTES;

/// Connections served at once: `--max-clients`, or fewer when the memory limit cannot hold that many.
fn clients_max(max_clients: usize, memory_limit_bytes: u64) -> usize {
    max_clients.min((memory_limit_bytes / CONNECTION_BYTES_MAX).max(1) as usize)
}

/// State shared by every connection.
struct Shared {
    root: Root,
    key: Key,
    read_only: bool,
    policy: Policy,
    timeout: Duration,
    max_clients: usize,
    active: AtomicUsize,
    turning_away: AtomicUsize,
    transfers: Arc<Transfers>,
    /// Numbers the temporaries of this process (`.NAME.fstmp-PID-N`).
    seq: AtomicU64,
    /// Large pushed files are written with O_DIRECT ([`DirectFile`]).
    direct_io: bool,
}

fn wait_readable(fd: RawFd, timeout_ms: i32) {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout_ms) };
}

/// Deep `List -R` and `Delete` hold one descriptor per directory level: allow as many as the hard limit does.
fn raise_fd_limit() {
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max.min(1 << 20);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Decrements the active-connection count when a connection's thread ends, however it ends.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let timeout = Some(shared.timeout);
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(timeout))
        .and_then(|()| stream.set_write_timeout(timeout))
        .and_then(|()| stream.set_nodelay(true));
    if let Err(e) = setup {
        eprintln!("fastsync: client {peer}: {e}");
        return;
    }
    if shared.active.fetch_add(1, Ordering::SeqCst) >= shared.max_clients {
        shared.active.fetch_sub(1, Ordering::SeqCst);
        turn_away(shared, stream, peer);
        return;
    }
    let guard = ActiveGuard(Arc::clone(shared));
    let spawned = std::thread::Builder::new().name(format!("client {peer}")).spawn(move || {
        let shared = Arc::clone(&guard.0);
        connection(&shared, stream, peer);
        drop(guard);
    });
    // On failure the closure (and the guard in it) is dropped: the count is right again.
    if let Err(e) = spawned {
        eprintln!("fastsync: client {peer}: cannot start a thread: {e}");
    }
}

/// Tell a connection over `--max-clients` that the server is busy. The client's hello is drained before closing,
/// so that the kernel sends a FIN rather than a reset that could discard the error before the client reads it.
fn turn_away(shared: &Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) {
    if shared.turning_away.fetch_add(1, Ordering::SeqCst) >= TURNING_AWAY_MAX {
        shared.turning_away.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    let max = shared.max_clients;
    let me = Arc::clone(shared);
    let spawned = std::thread::Builder::new().name(format!("busy {peer}")).spawn(move || {
        let message =
            format!("server busy: {max} connections at once (--max-clients, or the memory limit); try again later");
        let _ = wire::write_msg(&mut stream, &Msg::Error { code: code::BUSY, message });
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < 1 << 20 {
            match stream.read(&mut sink) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
        me.turning_away.fetch_sub(1, Ordering::SeqCst);
    });
    if spawned.is_err() {
        // The closure (and the connection in it) was dropped unanswered.
        shared.turning_away.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One connection's thread: converse, log why it ended (when that is worth a line), survive panics.
fn connection(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| converse(shared, stream)));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(why)) => eprintln!("fastsync: client {peer}: {why}"),
        Err(_) => eprintln!("fastsync: client {peer}: internal error while serving it; connection closed"),
    }
}

/// Both directions of a connection, buffered; bare frames, or records after the handshake when it agreed on them.
struct Conn {
    r: BufReader<Reader<TcpStream>>,
    w: BufWriter<Writer<TcpStream>>,
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl Conn {
    /// Queue a frame without flushing (listings: one flush per buffer, not per entry).
    fn queue(&mut self, msg: &Msg) -> io::Result<()> {
        wire::write_frame(&mut self.w, msg)
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

/// A connection-level failure, worded for the log.
fn describe_wire(e: &WireError, timeout: Duration) -> String {
    match e {
        WireError::Io(e) if timed_out(e) => {
            format!("no progress for {} s; connection dropped", timeout.as_secs())
        }
        WireError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => "connection closed by the client".into(),
        WireError::Io(e) => format!("connection: {e}"),
        WireError::Malformed(m) => format!("protocol error: {m}; connection closed"),
    }
}

fn converse(shared: &Shared, stream: TcpStream) -> Result<(), String> {
    let writer = stream.try_clone().map_err(|e| format!("connection: {e}"))?;
    let mut conn = Conn {
        r: BufReader::with_capacity(64 << 10, Reader::Plain(stream)),
        w: BufWriter::with_capacity(64 << 10, Writer::Plain(writer)),
    };
    let session = match auth::server_with(&mut conn, &shared.key, shared.policy) {
        Ok(s) => s,
        Err(e) => {
            return Err(match e {
                AuthError::Wire(w) => format!("authentication: {}", describe_wire(&w, shared.timeout)),
                e => e.to_string(),
            });
        }
    };
    if session.records() {
        // The client sends nothing after its proof until it has read AuthOk: nothing may be buffered in clear.
        if !conn.r.buffer().is_empty() {
            return Err("protocol error: bytes after the client's proof, before AuthOk; connection closed".into());
        }
        let Conn { r, w } = conn;
        let r = r.into_inner().upgrade(&session.recv).map_err(|e| format!("connection: {e}"))?;
        let w = w.into_inner().map_err(|e| format!("connection: {}", e.error()))?;
        let w = w.upgrade(&session.send).map_err(|e| format!("connection: {e}"))?;
        conn = Conn { r: BufReader::with_capacity(64 << 10, r), w: BufWriter::with_capacity(64 << 10, w) };
    }
    let mut holds = Holds::default();
    loop {
        let msg = match next_request(shared, &mut conn, &mut holds) {
            Ok(Some(m)) => m,
            // A PutData served on the zero-copy path.
            Ok(None) => continue,
            // A client that hangs up between requests is done, not broken.
            Err(WireError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(WireError::Malformed(m)) => {
                let _ = wire::write_msg(&mut conn, &Msg::Error { code: code::PROTOCOL, message: m.clone() });
                return Err(describe_wire(&WireError::Malformed(m), shared.timeout));
            }
            Err(e) => return Err(describe_wire(&e, shared.timeout)),
        };
        if msg == Msg::Bye {
            return Ok(());
        }
        let id = match &msg {
            Msg::PutResume { id, .. }
            | Msg::PutData { id, .. }
            | Msg::PutCheck { id, .. }
            | Msg::PutHole { id, .. }
            | Msg::PutXattrs { id, .. } => Some(*id),
            _ => None,
        };
        request(shared, &mut conn, msg).map_err(|e| describe_wire(&e, shared.timeout))?;
        if let Some(id) = id {
            holds.note(shared, id);
        }
    }
}

/// The resumable transfers a connection has used. While a connection that used one is open, its client is alive and
/// may still write it, so `Clean` and `DropParts` leave its partial file alone; when the client dies (all its
/// connections close), the transfer is an orphan, removable at once. Released when the connection ends, however.
#[derive(Default)]
struct Holds {
    held: HashMap<u64, Weak<Transfer>>,
}

impl Holds {
    fn note(&mut self, shared: &Shared, id: u64) {
        if self.held.get(&id).is_some_and(|w| w.strong_count() > 0) {
            return;
        }
        let map = shared.transfers.lock();
        let Some(slot) = map.get(&id).filter(|s| s.t.journal.is_some()) else { return };
        slot.t.holders.fetch_add(1, Ordering::SeqCst);
        let old = self.held.insert(id, Arc::downgrade(&slot.t));
        drop(map);
        if let Some(t) = old.and_then(|w| w.upgrade()) {
            t.holders.fetch_sub(1, Ordering::SeqCst);
        }
        // Transfers that are over need no release.
        if self.held.len() > 64 {
            self.held.retain(|_, w| w.strong_count() > 0);
        }
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        for t in self.held.values().filter_map(Weak::upgrade) {
            t.holders.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Why a request failed: the code and message of the `Error` reply.
#[derive(Debug)]
struct Fail {
    code: u16,
    message: String,
}

impl Fail {
    fn new(code: u16, message: impl Into<String>) -> Fail {
        Fail { code, message: message.into() }
    }

    /// `{what} '{rel}': {cause}`, with the code the errno maps to.
    fn io(what: &str, rel: &[u8], e: io::Error) -> Fail {
        Fail { code: code_of(&e), message: format!("{what} '{}': {}", show(rel), cause(&e)) }
    }
}

/// A wire path for a message (`.` for the root).
fn show(rel: &[u8]) -> String {
    if rel.is_empty() { ".".into() } else { rel.shown().to_string() }
}

/// An error's text without the ` (os error N)` suffix.
fn cause(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(at) => s[..at].to_string(),
        None => s,
    }
}

/// The wire error code for an I/O error. Errors without an errno that say "permission denied" come from
/// [`Root`]: a path that would leave the root, or a symlink on the way.
fn code_of(e: &io::Error) -> u16 {
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) => code::NOT_FOUND,
        Some(libc::EACCES | libc::EPERM) => code::PERMISSION,
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => code::NO_SPACE,
        Some(libc::EROFS) => code::READ_ONLY,
        Some(libc::ELOOP) => code::PATH_ESCAPES,
        None if e.kind() == io::ErrorKind::PermissionDenied => code::PATH_ESCAPES,
        _ => code::IO,
    }
}

fn is_write(msg: &Msg) -> bool {
    matches!(
        msg,
        Msg::PutBegin { .. }
            | Msg::PutResume { .. }
            | Msg::PutCheck { .. }
            | Msg::PutData { .. }
            | Msg::PutHole { .. }
            | Msg::PutXattrs { .. }
            | Msg::SetXattrs { .. }
            | Msg::Link { .. }
            | Msg::PutEnd { .. }
            | Msg::PutAbort { .. }
            | Msg::Mkdir { .. }
            | Msg::SetMeta { .. }
            | Msg::Symlink { .. }
            | Msg::Delete { .. }
            | Msg::Clean { .. }
            | Msg::DropParts { .. }
    )
}

fn name_of(msg: &Msg) -> &'static str {
    match msg {
        Msg::Hello { .. } => "Hello",
        Msg::Challenge { .. } => "Challenge",
        Msg::KeyShare { .. } => "KeyShare",
        Msg::Auth { .. } => "Auth",
        Msg::AuthOk { .. } => "AuthOk",
        Msg::Error { .. } => "Error",
        Msg::Ok => "Ok",
        Msg::Entry(_) => "Entry",
        Msg::ListEnd => "ListEnd",
        Msg::Data { .. } => "Data",
        Msg::DataEnd { .. } => "DataEnd",
        _ => "request",
    }
}

/// Serve one request. `Err`: the connection is broken (or the client broke the protocol) and ends.
fn request(shared: &Shared, conn: &mut Conn, msg: Msg) -> Result<(), WireError> {
    if shared.read_only && is_write(&msg) {
        return send_fail(conn, Fail::new(code::READ_ONLY, "server is read-only"));
    }
    let reply = match msg {
        Msg::List { path, recursive, follow } => return list(shared, conn, &path, recursive, follow),
        Msg::Get { path, offset, len, follow } => return get(shared, conn, &path, offset, len, follow),
        Msg::Stat { path, follow } => stat(shared, &path, follow).map(Msg::Entry),
        Msg::Hash { path, offset, len, follow } => hash(shared, &path, offset, len, follow),
        Msg::PutBegin { id, path, size, mode: _ } => put_begin(shared, id, &path, size).map(|()| Msg::Ok),
        Msg::PutResume { id, path, size, mode: _, mtime_sec, mtime_nsec } => {
            put_resume(shared, id, &path, size, (mtime_sec, mtime_nsec))
                .map(|recorded_bytes| Msg::Resumed { recorded_bytes })
        }
        Msg::PutCheck { id, offset, len, digest } => put_check(shared, id, offset, len, &digest).map(|()| Msg::Ok),
        Msg::PutData { id, offset, digest, bytes } => put_data(shared, id, offset, &digest, &bytes).map(|()| Msg::Ok),
        Msg::PutHole { id, offset, len } => put_hole(shared, id, offset, len).map(|()| Msg::Ok),
        Msg::GetXattrs { path, follow } => get_xattrs(shared, &path, follow).map(|xattrs| Msg::XattrList { xattrs }),
        Msg::PutXattrs { id, xattrs } => put_xattrs(shared, id, &xattrs).map(|()| Msg::Ok),
        Msg::SetXattrs { path, xattrs } => set_xattrs(shared, &path, &xattrs).map(|()| Msg::Ok),
        Msg::PutEnd { id, mode, uid, gid, mtime_sec, mtime_nsec, fsync } => {
            put_end(shared, id, Finish { mode, uid, gid, mtime: (mtime_sec, mtime_nsec), fsync }).map(|()| Msg::Ok)
        }
        Msg::PutAbort { id } => {
            shared.transfers.abort(id);
            Ok(Msg::Ok)
        }
        Msg::Mkdir { path, mode } => mkdir(shared, &path, mode).map(|()| Msg::Ok),
        Msg::SetMeta { path, mode, uid, gid, mtime_sec, mtime_nsec } => {
            set_meta(shared, &path, mode, (uid, gid), (mtime_sec, mtime_nsec)).map(|()| Msg::Ok)
        }
        Msg::Symlink { path, target, uid, gid, mtime_sec, mtime_nsec } => {
            symlink(shared, &path, &target, (uid, gid), (mtime_sec, mtime_nsec)).map(|()| Msg::Ok)
        }
        Msg::Delete { path } => delete(shared, &path).map(|()| Msg::Ok),
        Msg::Clean { path } => clean(shared, &path).map(|names| Msg::Parts { names }),
        Msg::DropParts { path, names } => drop_parts(shared, &path, &names).map(|names| Msg::Parts { names }),
        Msg::Link { path, target } => link(shared, &path, &target).map(|()| Msg::Ok),
        other => {
            let message = format!("unexpected {} from a client", name_of(&other));
            let _ = wire::write_msg(conn, &Msg::Error { code: code::PROTOCOL, message: message.clone() });
            return Err(WireError::Malformed(message));
        }
    };
    let queued = match reply {
        Ok(m) => conn.queue(&m),
        Err(f) => conn.queue(&Msg::Error { code: f.code, message: f.message }),
    };
    queued?;
    // Requests that arrived together are answered together: a client pipelines a small file's PutBegin, PutData
    // and PutEnd in one write, and three replies in one segment cost one send here and one receive there. The
    // replies go out as soon as no further request is waiting (a partly received one is on its way: the client
    // never waits for a reply in the middle of writing a frame).
    if conn.r.buffer().is_empty() {
        conn.flush()?;
    }
    Ok(())
}

fn send_fail(conn: &mut Conn, f: Fail) -> Result<(), WireError> {
    wire::write_msg(conn, &Msg::Error { code: f.code, message: f.message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_ranges_merge_and_count_once() {
        let mut r = Received::default();
        r.add(10, 20).unwrap();
        r.add(0, 5).unwrap();
        assert_eq!(r.bytes, 15);
        r.add(10, 20).unwrap(); // a retry
        assert_eq!(r.bytes, 15);
        r.add(5, 10).unwrap(); // fills the gap: one range
        assert_eq!((r.bytes, r.ranges.len()), (20, 1));
        r.add(15, 30).unwrap();
        r.add(40, 50).unwrap();
        r.add(25, 45).unwrap();
        assert_eq!((r.bytes, r.ranges.len()), (50, 1));
        r.add(7, 7).unwrap();
        assert_eq!(r.bytes, 50);
    }

    #[test]
    fn spliced_ranges_are_reserved_and_a_failed_one_is_forgotten() {
        let mut r = Received::default();
        r.add(0, 10).unwrap();
        assert!(!r.reserve(5, 15), "overlaps received bytes");
        assert!(r.reserve(10, 20), "touching is fine");
        assert!(!r.reserve(15, 25), "overlaps a splice in progress");
        r.release(10, 20);
        assert!(r.reserve(15, 25));
        r.release(15, 25);
        r.add(10, 30).unwrap();
        r.remove(12, 18);
        assert_eq!(r.bytes, 24);
        assert_eq!(r.ranges.iter().map(|(&a, &b)| (a, b)).collect::<Vec<_>>(), vec![(0, 12), (18, 30)]);
        r.remove(0, 40);
        assert_eq!((r.bytes, r.ranges.len()), (0, 0));
    }

    #[test]
    fn received_ranges_are_capped() {
        let mut r = Received::default();
        for i in 0..RANGES_MAX as u64 {
            r.add(i * 2, i * 2 + 1).unwrap();
        }
        assert!(r.add(u64::MAX - 2, u64::MAX - 1).is_err());
        // Joining existing ranges is always allowed.
        r.add(1, 2).unwrap();
        assert_eq!(r.ranges.len(), RANGES_MAX - 1);
    }

    fn transfer(dir: &Path, n: usize) -> Arc<Transfer> {
        let d = File::open(dir).unwrap();
        let name = CString::new(format!("f{n}")).unwrap();
        let tmp = CString::new(format!(".f{n}.fstmp-1-{n}")).unwrap();
        let fd = open_at(d.as_raw_fd(), &tmp, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600).unwrap();
        Arc::new(Transfer {
            rel: name.as_bytes().to_vec(),
            dir: OwnedFd::from(d),
            name,
            tmp,
            unnamed: false,
            file: File::from(fd),
            direct: None,
            size: 1,
            received: Mutex::default(),
            journal: None,
            recorded: Mutex::default(),
            holders: AtomicUsize::new(0),
        })
    }

    #[test]
    fn idle_transfers_expire_and_a_full_table_evicts_the_oldest_idle_one() {
        let dir = tempfile::tempdir().unwrap();
        const CAP: usize = 8;
        let table = Transfers::new(CAP);
        let t0 = Instant::now();
        for i in 0..CAP {
            let slot =
                Slot { t: transfer(dir.path(), i), last_used: t0 + Duration::from_millis(i as u64), inflight: 0 };
            table.lock().insert(i as u64, slot);
        }
        table.lock().get_mut(&0).unwrap().inflight = 1; // in use: never evicted
        let now = t0 + Duration::from_secs(120);
        assert!(!table.make_room(now, Duration::from_secs(300)), "nothing idle long enough");
        assert!(table.make_room(now, Duration::from_secs(60)));
        assert!(!table.lock().contains_key(&1), "the least recently used idle transfer went");
        assert!(table.lock().contains_key(&0));
        assert!(!dir.path().join(".f1.fstmp-1-1").exists(), "its temporary was removed");
        assert!(dir.path().join(".f2.fstmp-1-2").exists());
        let later = t0 + TRANSFER_IDLE_EXPIRY + Duration::from_secs(60);
        assert_eq!(table.expire(later, TRANSFER_IDLE_EXPIRY), CAP - 2);
        assert_eq!(table.lock().len(), 1);
        assert_eq!(table.abort_all(), (1, 0));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn errno_codes() {
        assert_eq!(code_of(&io::Error::from_raw_os_error(libc::ENOENT)), code::NOT_FOUND);
        assert_eq!(code_of(&io::Error::from_raw_os_error(libc::EACCES)), code::PERMISSION);
        assert_eq!(code_of(&io::Error::from_raw_os_error(libc::ENOSPC)), code::NO_SPACE);
        assert_eq!(code_of(&io::Error::from_raw_os_error(libc::EROFS)), code::READ_ONLY);
        assert_eq!(code_of(&io::Error::from_raw_os_error(libc::ELOOP)), code::PATH_ESCAPES);
        assert_eq!(code_of(&io::Error::new(io::ErrorKind::PermissionDenied, "escapes")), code::PATH_ESCAPES);
        assert_eq!(code_of(&io::Error::from_raw_os_error(libc::EIO)), code::IO);
        assert_eq!(cause(&io::Error::from_raw_os_error(libc::ENOENT)), "No such file or directory");
    }
}
