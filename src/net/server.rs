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
use super::beneath::Root;
use super::direct::{self, DirectFile};
use super::record::{Reader, Writer};
use super::sparse::{self, Piece};
use super::wire::{self, EntryKind, EntryMeta, Msg, WireError, code};
use super::zerocopy::{self, SpliceError};
use crate::{Error, interrupt, stale};
use fastsync_engine::journal::{Journal, Opened, SourceId};
use fastsync_engine::{Show, Timestamp};

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
        let body = msg.encode_body();
        self.w.write_all(&(body.len() as u32).to_le_bytes())?;
        self.w.write_all(&body)
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

// ---------------------------------------------------------------------------------------------------------------
// Syscall helpers (every name is relative to an open directory and never followed when it is a symlink)
// ---------------------------------------------------------------------------------------------------------------

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn lstat_at(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor, C string and out-pointer.
    cvt(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed stat is a valid out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and out-pointer.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

fn open_at(dir: RawFd, name: &CStr, flags: libc::c_int, mode: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: valid descriptor and C string; the result is owned below.
    let fd = cvt(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, mode) })?;
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_dir_at(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

fn read_link_at(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; wire::PATH_BYTES_MAX + 1];
    // SAFETY: valid descriptor, C string, and a buffer of the given length.
    let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n > wire::PATH_BYTES_MAX {
        return Err(io::Error::other(format!("symlink target longer than {} bytes", wire::PATH_BYTES_MAX)));
    }
    buf.truncate(n);
    Ok(buf)
}

fn unlink_at(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid descriptor and C string.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

fn rename_at(dir: RawFd, from: &CStr, to: &CStr) -> io::Result<()> {
    // SAFETY: valid descriptor and C strings.
    cvt(unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) }).map(drop)
}

/// `[atime untouched, mtime]`.
fn mtime_spec(mtime: (i64, u32)) -> [libc::timespec; 2] {
    [
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT as _ },
        libc::timespec { tv_sec: mtime.0 as _, tv_nsec: mtime.1 as _ },
    ]
}

fn set_mtime_at(dir: RawFd, name: &CStr, mtime: (i64, u32)) -> io::Result<()> {
    let ts = mtime_spec(mtime);
    // SAFETY: valid descriptor, C string and timespec array.
    cvt(unsafe { libc::utimensat(dir, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) }).map(drop)
}

fn set_mtime_fd(fd: RawFd, mtime: (i64, u32)) -> io::Result<()> {
    let ts = mtime_spec(mtime);
    // SAFETY: valid descriptor and timespec array.
    cvt(unsafe { libc::futimens(fd, ts.as_ptr()) }).map(drop)
}

fn fsync_fd(fd: RawFd) -> io::Result<()> {
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fsync(fd) }).map(drop)
}

fn clear_errno() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    // SAFETY: errno is thread-local.
    unsafe {
        *libc::__errno_location() = 0
    };
    #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
    // SAFETY: errno is thread-local.
    unsafe {
        *libc::__error() = 0
    };
}

/// The names in directory `dir` (not `.` and `..`; nor our temporaries with `skip_temporaries`), sorted bytewise. The
/// directory is reopened (`openat(dir, ".")`) so that the read has its own offset, whoever else shares `dir`.
fn read_names(dir: RawFd, skip_temporaries: bool) -> io::Result<Vec<CString>> {
    let fd = open_at(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    // SAFETY: a descriptor we own; fdopendir takes it over on success.
    let d = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(fd); // now owned by `d`, closed by closedir below
    let mut names = Vec::new();
    let result = loop {
        clear_errno();
        // SAFETY: `d` is an open DIR stream used by this thread only.
        let ent = unsafe { libc::readdir(d) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error().is_none_or(|n| n == 0) { Ok(()) } else { Err(e) };
        }
        // SAFETY: d_name is a NUL-terminated string inside the entry, valid until the next readdir.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        let b = name.to_bytes();
        if b == b"." || b == b".." || (skip_temporaries && stale::is_temporary(OsStr::from_bytes(b))) {
            continue;
        }
        names.push(name.to_owned());
    };
    // SAFETY: `d` is open and not used after this.
    unsafe { libc::closedir(d) };
    result?;
    names.sort_unstable();
    Ok(names)
}

fn kind_of(st: &libc::stat) -> EntryKind {
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        _ => EntryKind::Other,
    }
}

// mode_t is u32 on Linux and u16 on macOS.
#[allow(clippy::unnecessary_cast)]
fn entry(path: Vec<u8>, st: &libc::stat, target: Vec<u8>) -> EntryMeta {
    EntryMeta {
        path,
        kind: kind_of(st),
        mode: (st.st_mode as u32) & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        mtime_sec: st.st_mtime as i64,
        mtime_nsec: (st.st_mtime_nsec as u32).min(999_999_999),
        target,
        dev: st.st_dev as u64,
        ino: st.st_ino as u64,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
    }
}

/// The entry for `name` in `dir`, with its target when it is a symlink.
fn entry_at(dir: RawFd, name: &CStr, path: Vec<u8>) -> io::Result<EntryMeta> {
    let st = lstat_at(dir, name)?;
    let target = if kind_of(&st) == EntryKind::Symlink { read_link_at(dir, name)? } else { Vec::new() };
    Ok(entry(path, &st, target))
}

// ---------------------------------------------------------------------------------------------------------------
// Reading: Stat, List, Get
// ---------------------------------------------------------------------------------------------------------------

fn stat(shared: &Shared, rel: &[u8], follow: bool) -> Result<EntryMeta, Fail> {
    if follow {
        let fd = shared.root.follow(rel, libc::O_PATH).map_err(|e| Fail::io("cannot stat", rel, e))?;
        return fstat(fd.as_raw_fd())
            .map(|st| entry(Vec::new(), &st, Vec::new()))
            .map_err(|e| Fail::io("cannot stat", rel, e));
    }
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot stat", rel, e))?;
    match &p.name {
        None => fstat(p.raw()).map(|st| entry(Vec::new(), &st, Vec::new())),
        Some(name) => entry_at(p.raw(), name, Vec::new()),
    }
    .map_err(|e| Fail::io("cannot stat", rel, e))
}

/// One directory being listed: its descriptor, its path relative to the listed one (with a trailing `/`, or empty),
/// and its sorted names.
struct Level {
    fd: OwnedFd,
    prefix: Vec<u8>,
    names: Vec<CString>,
    next: usize,
    /// The directory's (dev, ino): with `follow`, a symlink to a directory on the way down is a loop.
    key: (u64, u64),
}

fn list(shared: &Shared, conn: &mut Conn, rel: &[u8], recursive: bool, follow: bool) -> Result<(), WireError> {
    match list_entries(shared, conn, rel, recursive, follow)? {
        Ok(()) => {
            conn.queue(&Msg::ListEnd)?;
            conn.flush()?;
            Ok(())
        }
        Err(f) => send_fail(conn, f),
    }
}

/// The (dev, ino) of a stat.
#[allow(clippy::unnecessary_cast)]
fn key_of(st: &libc::stat) -> (u64, u64) {
    (st.st_dev as u64, st.st_ino as u64)
}

/// A directory open for reading its names, from a descriptor of it (an `O_PATH` one included).
fn open_listable(dir: &OwnedFd) -> io::Result<OwnedFd> {
    open_at(dir.as_raw_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// The top of a `follow` listing: what `rel` leads to beneath the root; a directory opened for reading, or the
/// entry of what else it is.
fn follow_top(shared: &Shared, rel: &[u8]) -> io::Result<Result<OwnedFd, EntryMeta>> {
    let fd = shared.root.follow(rel, libc::O_PATH)?;
    let st = fstat(fd.as_raw_fd())?;
    if kind_of(&st) != EntryKind::Dir {
        return Ok(Err(entry(Vec::new(), &st, Vec::new())));
    }
    open_listable(&fd).map(Ok)
}

/// Queue the entries of a listing: outer `Err` for a broken connection, inner for a failed listing (the client gets
/// `Error` instead of `ListEnd`, never a silently partial listing). With `follow`, a symlink is listed as what it
/// leads to beneath the root (resolved from the root by its whole path, as a local `-L` resolves it), a directory it
/// leads to is descended into unless it is one of its own ancestors, and a symlink that cannot be followed is an
/// `EntryError` in its place; the listing goes on.
fn list_entries(
    shared: &Shared,
    conn: &mut Conn,
    rel: &[u8],
    recursive: bool,
    follow: bool,
) -> Result<Result<(), Fail>, WireError> {
    if follow {
        let top = match follow_top(shared, rel) {
            Ok(Ok(fd)) => fd,
            Ok(Err(e)) => return conn.queue(&Msg::Entry(e)).map(Ok).map_err(WireError::Io),
            Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
        };
        return list_from(shared, conn, rel, top, recursive, true);
    }
    let p = match shared.root.parent(rel) {
        Ok(p) => p,
        Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
    };
    let top = match &p.name {
        None => p.dir,
        Some(name) => match lstat_at(p.raw(), name) {
            Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
            Ok(st) if kind_of(&st) != EntryKind::Dir => {
                // A file (or symlink, never followed) lists as itself.
                return Ok(match entry_at(p.raw(), name, Vec::new()) {
                    Ok(e) => conn.queue(&Msg::Entry(e)).map(Ok)?,
                    Err(e) => Err(Fail::io("cannot list", rel, e)),
                });
            }
            Ok(_) => match open_dir_at(p.raw(), name) {
                Ok(fd) => fd,
                Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
            },
        },
    };
    list_from(shared, conn, rel, top, recursive, false)
}

/// List the directory `top` (the listed path `rel`, opened) and, with `recursive`, its subtree.
fn list_from(
    shared: &Shared,
    conn: &mut Conn,
    rel: &[u8],
    top: OwnedFd,
    recursive: bool,
    follow: bool,
) -> Result<Result<(), Fail>, WireError> {
    let listed = fstat(top.as_raw_fd()).and_then(|st| Ok((read_names(top.as_raw_fd(), true)?, key_of(&st))));
    let (names, key) = match listed {
        Ok(n) => n,
        Err(e) => return Ok(Err(Fail::io("cannot list", rel, e))),
    };
    let mut stack = vec![Level { fd: top, prefix: Vec::new(), names, next: 0, key }];
    // Where a failure is, relative to the root, for messages.
    let full = |sub: &[u8]| -> Vec<u8> {
        let mut v = rel.to_vec();
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(sub);
        v
    };
    while let Some(level) = stack.last_mut() {
        let Some(name) = level.names.get(level.next).cloned() else {
            stack.pop();
            continue;
        };
        level.next += 1;
        let mut path = level.prefix.clone();
        path.extend_from_slice(name.to_bytes());
        if path.len() > wire::PATH_BYTES_MAX {
            let why = format!("cannot list '{}': path longer than {} bytes", show(&full(&path)), wire::PATH_BYTES_MAX);
            return Ok(Err(Fail::new(code::IO, why)));
        }
        let mut e = match entry_at(level.fd.as_raw_fd(), &name, path.clone()) {
            Ok(e) => e,
            // Deleted since the directory was read: it is not there any more.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Ok(Err(Fail::io("cannot stat", &full(&path), e))),
        };
        // With `follow`, a symlink is replaced by what it leads to (and a directory there is opened through it).
        let mut followed = None;
        if follow && e.kind == EntryKind::Symlink {
            let target = shared.root.follow(&full(&path), libc::O_PATH).and_then(|fd| Ok((fstat(fd.as_raw_fd())?, fd)));
            match target {
                Ok((st, fd)) => {
                    e = entry(path.clone(), &st, Vec::new());
                    followed = Some(fd);
                }
                Err(err) => {
                    let f = Fail::io("cannot follow", &full(&path), err);
                    conn.queue(&Msg::EntryError { path, code: f.code, message: f.message })?;
                    continue;
                }
            }
        }
        let descend = recursive && e.kind == EntryKind::Dir;
        if descend && follow && stack.iter().any(|l| l.key == (e.dev, e.ino)) {
            let message =
                format!("cannot follow '{}': a symlink loop (it leads to its own ancestor)", show(&full(&path)));
            conn.queue(&Msg::EntryError { path, code: code::PATH_ESCAPES, message })?;
            continue;
        }
        let key = (e.dev, e.ino);
        conn.queue(&Msg::Entry(e))?;
        if descend {
            let level_fd = stack.last().expect("a level").fd.as_raw_fd();
            let sub = match &followed {
                Some(fd) => open_listable(fd),
                None => open_dir_at(level_fd, &name),
            }
            .and_then(|fd| Ok((read_names(fd.as_raw_fd(), true)?, fd)));
            match sub {
                Ok((names, fd)) => {
                    path.push(b'/');
                    stack.push(Level { fd, prefix: path, names, next: 0, key });
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Ok(Err(Fail::io("cannot list", &full(&path), e))),
            }
        }
    }
    Ok(Ok(()))
}

/// Open `rel` for reading if it is a regular file (never a symlink, a directory, a FIFO or a device). With
/// `follow`, what `rel` leads to beneath the root.
fn open_regular(shared: &Shared, rel: &[u8], follow: bool) -> Result<File, Fail> {
    if follow {
        return open_regular_followed(shared, rel);
    }
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot read", rel, e))?;
    let Some(name) = &p.name else {
        return Err(Fail::new(code::IO, "cannot read '.': it is a directory"));
    };
    let st = lstat_at(p.raw(), name).map_err(|e| Fail::io("cannot read", rel, e))?;
    let not_file = |kind: EntryKind| match kind {
        EntryKind::Symlink => {
            Fail::new(code::PATH_ESCAPES, format!("cannot read '{}': it is a symlink (never followed)", show(rel)))
        }
        EntryKind::Dir => Fail::new(code::IO, format!("cannot read '{}': it is a directory", show(rel))),
        _ => Fail::new(code::IO, format!("cannot read '{}': not a regular file", show(rel))),
    };
    if kind_of(&st) != EntryKind::File {
        return Err(not_file(kind_of(&st)));
    }
    // O_NONBLOCK: should a FIFO have been swapped in since the stat, the open does not wait for a writer.
    let fd = open_at(p.raw(), name, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY, 0)
        .map_err(|e| Fail::io("cannot read", rel, e))?;
    let st = fstat(fd.as_raw_fd()).map_err(|e| Fail::io("cannot read", rel, e))?;
    if kind_of(&st) != EntryKind::File {
        return Err(not_file(kind_of(&st)));
    }
    Ok(File::from(fd))
}

/// `open_regular` with `follow`: resolved beneath the root to an `O_PATH` descriptor, checked to be a regular file,
/// and only then opened for reading, through that very inode (`/proc/self/fd/N`), so nothing else is ever opened.
fn open_regular_followed(shared: &Shared, rel: &[u8]) -> Result<File, Fail> {
    let fd = shared.root.follow(rel, libc::O_PATH).map_err(|e| Fail::io("cannot read", rel, e))?;
    let st = fstat(fd.as_raw_fd()).map_err(|e| Fail::io("cannot read", rel, e))?;
    match kind_of(&st) {
        EntryKind::File => {}
        EntryKind::Dir => return Err(Fail::new(code::IO, format!("cannot read '{}': it is a directory", show(rel)))),
        _ => return Err(Fail::new(code::IO, format!("cannot read '{}': not a regular file", show(rel)))),
    }
    let proc = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    // SAFETY: valid C string; the result is owned below. The magic link leads to the inode checked above.
    let r = unsafe { libc::open(proc.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC) };
    let r = cvt(r).map_err(|e| Fail::io("cannot read", rel, e))?;
    // SAFETY: a fresh descriptor.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(r) }))
}

/// Fill `buf` from `offset` (short only at the end of the file).
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// BLAKE3 of `[offset, offset + len)` of a regular file beneath the root (to its end when it is shorter).
fn hash(shared: &Shared, rel: &[u8], offset: u64, len: u64, follow: bool) -> Result<Msg, Fail> {
    let file = open_regular(shared, rel, follow)?;
    let end = offset.saturating_add(len);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; GET_CHUNK_BYTES];
    let mut pos = offset;
    while pos < end {
        let want = (end - pos).min(buf.len() as u64) as usize;
        let n = read_full_at(&file, &mut buf[..want], pos).map_err(|e| Fail::io("cannot read", rel, e))?;
        hasher.update(&buf[..n]);
        pos += n as u64;
        if n < want {
            break;
        }
    }
    Ok(Msg::Hashed { digest: *hasher.finalize().as_bytes(), bytes: pos - offset })
}

fn get(shared: &Shared, conn: &mut Conn, rel: &[u8], offset: u64, len: u64, follow: bool) -> Result<(), WireError> {
    let file = match open_regular(shared, rel, follow) {
        Ok(f) => f,
        Err(f) => return send_fail(conn, f),
    };
    let end = offset.saturating_add(len);
    let mut pos = offset;
    let mut buf = Vec::new();
    let from_file = zerocopy::mode().sends_from_file() && conn.w.get_ref().plain().is_some();
    let on_shards = zerocopy::shards().filter(|_| conn.w.get_ref().plain().is_some());
    // A sparse file's holes go as `Hole` messages, not as zeros, and a chunk stops where the next hole starts.
    let mut walker = sparse::Walker::for_file(&file);
    while pos < end {
        let data_end = match walker.as_mut().map(|w| w.next(pos, end)) {
            Some(Piece::Hole(hole_end)) => {
                wire::write_msg(conn, &Msg::Hole { offset: pos, len: hole_end - pos })?;
                pos = hole_end;
                continue;
            }
            Some(Piece::Data(data_end)) => data_end,
            None => end,
        };
        let want = (data_end - pos).min(GET_CHUNK_BYTES as u64) as usize;
        if let Some(shards) = on_shards.filter(|_| want >= crate::net::shards::PAYLOAD_BYTES_MIN) {
            // Read into a registered buffer, hashed and sent with its head by a shard (net/shards.rs).
            conn.w.flush()?;
            let sock = conn.w.get_ref().plain().expect("plain");
            let head = Box::new(move |digest: &[u8; 32], n| wire::data_head(pos, digest, n).to_vec());
            let n = match zerocopy::send_on_shards(shards, sock, &file, pos, want, head) {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return send_fail(conn, Fail::io("cannot read", rel, e)),
                Err(e) => return Err(WireError::Io(e)),
            };
            pos += n as u64;
            if n < want {
                break;
            }
            continue;
        }
        if from_file {
            // The digest from the page cache, the payload straight from it with sendfile (net/zerocopy.rs).
            let n = match zerocopy::hash_range(&file, pos, want) {
                Ok((_, 0)) => break,
                Ok((digest, n)) => {
                    conn.w.flush()?;
                    let sock = conn.w.get_ref().plain().expect("plain");
                    zerocopy::send_head_and_file(sock, &wire::data_head(pos, &digest, n), &file, pos, n)?;
                    n
                }
                Err(e) => return send_fail(conn, Fail::io("cannot read", rel, e)),
            };
            pos += n as u64;
            if n < want {
                break;
            }
            continue;
        }
        buf.resize(want, 0);
        let n = match read_full_at(&file, &mut buf, pos) {
            Ok(n) => n,
            Err(e) => return send_fail(conn, Fail::io("cannot read", rel, e)),
        };
        if n == 0 {
            break;
        }
        buf.truncate(n);
        let digest = *blake3::hash(&buf).as_bytes();
        let msg = Msg::Data { offset: pos, digest, bytes: std::mem::take(&mut buf) };
        wire::write_msg(conn, &msg)?;
        if let Msg::Data { bytes, .. } = msg {
            buf = bytes;
        }
        pos += n as u64;
        if n < want {
            break;
        }
    }
    match fstat(file.as_raw_fd()) {
        Ok(st) => {
            let e = entry(Vec::new(), &st, Vec::new());
            wire::write_msg(conn, &Msg::DataEnd { size: e.size, mtime_sec: e.mtime_sec, mtime_nsec: e.mtime_nsec })
        }
        Err(e) => send_fail(conn, Fail::io("cannot stat", rel, e)),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Writing files: the shared transfer table, PutBegin/PutData/PutEnd/PutAbort
// ---------------------------------------------------------------------------------------------------------------

/// A file being received under a temporary name beside its destination.
#[derive(Debug)]
struct Transfer {
    /// Destination, relative to the root (for messages).
    rel: Vec<u8>,
    /// The destination's directory, and the final and temporary names in it.
    dir: OwnedFd,
    name: CString,
    /// The temporary name: the file itself, or, when `unnamed`, only a name reserved for the case where something
    /// appeared at `name` meanwhile (the file is then linked here and renamed over it).
    tmp: CString,
    /// The file was created with no name (`O_TMPFILE`) and is linked to `name` when complete.
    unnamed: bool,
    file: File,
    /// An O_DIRECT descriptor on `file` for a large file ([`DirectFile`]).
    direct: Option<DirectFile>,
    size: u64,
    received: Mutex<Received>,
    /// A resumable transfer (`PutResume`): the journal of the chunks written, and what an earlier run recorded
    /// (offered to `PutCheck`).
    journal: Option<Journal>,
    recorded: Mutex<Received>,
    /// Open connections that used this (resumable) transfer ([`Holds`]): 0 once its client is gone.
    holders: AtomicUsize,
}

impl Transfer {
    /// The transfer is over without a file: its temporary (and journal) go.
    fn remove_temporary(&self) {
        if !self.unnamed {
            let _ = unlink_at(self.dir.as_raw_fd(), &self.tmp, 0);
        }
        if let Some(j) = &self.journal {
            j.remove();
        }
    }

    /// The client went away (idle, evicted, or the server stops): a resumable temporary stays for its next run.
    fn abandon(&self) {
        if self.journal.is_none() {
            self.remove_temporary();
        }
    }

    /// A chunk was written and checked: a resumable transfer records it.
    fn written(&self, offset: u64, len: u64) {
        if let Some(j) = &self.journal {
            // Best effort: a chunk missing from the journal is only sent again by the next run.
            let _ = j.record(offset, len);
        }
    }
}

/// The byte ranges of a transfer written so far: disjoint, not adjacent, by start. A chunk sent twice (a retry
/// after a lost acknowledgement) counts once.
#[derive(Debug, Default)]
struct Received {
    ranges: BTreeMap<u64, u64>,
    bytes: u64,
    /// Ranges being spliced into the file right now, not yet checked (zero-copy path): `[start, end)`.
    pending: Vec<(u64, u64)>,
}

impl Received {
    /// Add `[start, end)`. `Err` when the transfer would have more than [`RANGES_MAX`] separate ranges.
    fn add(&mut self, start: u64, end: u64) -> Result<(), ()> {
        if start >= end {
            return Ok(());
        }
        let (mut s, mut e) = (start, end);
        // Ranges that overlap or touch [start, end): starts <= end, scanning down while their end >= start.
        let touching: Vec<(u64, u64)> =
            self.ranges.range(..=end).rev().take_while(|&(_, &re)| re >= start).map(|(&a, &b)| (a, b)).collect();
        if touching.is_empty() && self.ranges.len() >= RANGES_MAX {
            return Err(());
        }
        for (a, b) in touching {
            self.ranges.remove(&a);
            self.bytes -= b - a;
            s = s.min(a);
            e = e.max(b);
        }
        self.ranges.insert(s, e);
        self.bytes += e - s;
        Ok(())
    }

    /// Reserve `[start, end)` for a splice straight into the file, which writes before the digest is checked: only
    /// when no byte of it has been received or is being spliced (a damaged chunk must never land on counted bytes).
    fn reserve(&mut self, start: u64, end: u64) -> bool {
        let counted = self.ranges.range(..end).next_back().is_some_and(|(_, &e)| e > start);
        let spliced = self.pending.iter().any(|&(s, e)| s < end && start < e);
        if counted || spliced || start >= end {
            return false;
        }
        self.pending.push((start, end));
        true
    }

    /// End the reservation of `[start, end)`.
    fn release(&mut self, start: u64, end: u64) {
        self.pending.retain(|&r| r != (start, end));
    }

    /// Forget `[start, end)`: a spliced chunk failed its digest, and a copy of the same bytes counted meanwhile by
    /// the ordinary path may have been overwritten. The client, told `DIGEST`, sends the range again.
    fn remove(&mut self, start: u64, end: u64) {
        let hit: Vec<(u64, u64)> =
            self.ranges.range(..end).rev().take_while(|&(_, &e)| e > start).map(|(&a, &b)| (a, b)).collect();
        for (a, b) in hit {
            self.ranges.remove(&a);
            self.bytes -= b - a;
            if a < start {
                self.ranges.insert(a, start);
                self.bytes += start - a;
            }
            if b > end {
                self.ranges.insert(end, b);
                self.bytes += b - end;
            }
        }
    }
}

struct Slot {
    t: Arc<Transfer>,
    last_used: Instant,
    /// Requests working on it right now (it is never evicted or finished under them).
    inflight: usize,
}

/// Every transfer in progress, by the client's id, shared by all connections.
struct Transfers {
    map: Mutex<HashMap<u64, Slot>>,
    /// At most this many at once ([`TRANSFERS_MAX`]).
    cap: usize,
}

fn unknown_transfer(id: u64) -> Fail {
    Fail::new(code::NOT_FOUND, format!("unknown transfer {id:#x} (never begun, already finished, aborted or expired)"))
}

/// A transfer in use by one request; released on drop.
struct Lease<'a> {
    table: &'a Transfers,
    id: u64,
    t: Arc<Transfer>,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut map = self.table.lock();
        if let Some(slot) = map.get_mut(&self.id).filter(|s| Arc::ptr_eq(&s.t, &self.t)) {
            slot.inflight -= 1;
            slot.last_used = Instant::now();
        }
    }
}

/// A [`Lease`] that owns its hold on the table, for a socket job's gate (which runs on a shard, see
/// [`put_data_on_shards`]).
struct OwnedLease {
    table: Arc<Transfers>,
    id: u64,
    t: Arc<Transfer>,
}

impl Drop for OwnedLease {
    fn drop(&mut self) {
        let mut map = self.table.lock();
        if let Some(slot) = map.get_mut(&self.id).filter(|s| Arc::ptr_eq(&s.t, &self.t)) {
            slot.inflight -= 1;
            slot.last_used = Instant::now();
        }
    }
}

/// Hold transfer `id` of `table` (as [`Transfers::lease`]) when it is still the one `t` points to.
fn lease_owned(table: &Arc<Transfers>, id: u64, t: &std::sync::Weak<Transfer>) -> Option<OwnedLease> {
    let t = t.upgrade()?;
    let mut map = table.lock();
    let slot = map.get_mut(&id).filter(|s| Arc::ptr_eq(&s.t, &t))?;
    slot.inflight += 1;
    slot.last_used = Instant::now();
    Some(OwnedLease { table: Arc::clone(table), id, t })
}

impl Transfers {
    fn new(cap: usize) -> Transfers {
        Transfers { map: Mutex::new(HashMap::new()), cap }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Slot>> {
        // A panic elsewhere never leaves the map half-updated: every update is a single insert/remove/field store.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lease(&self, id: u64) -> Result<Lease<'_>, Fail> {
        let mut map = self.lock();
        let slot = map.get_mut(&id).ok_or_else(|| unknown_transfer(id))?;
        slot.inflight += 1;
        slot.last_used = Instant::now();
        Ok(Lease { table: self, id, t: Arc::clone(&slot.t) })
    }

    /// Remove the temporaries of transfers idle for `idle` or more at `now`; returns how many.
    fn expire(&self, now: Instant, idle: Duration) -> usize {
        let mut map = self.lock();
        let old: Vec<u64> = map
            .iter()
            .filter(|(_, s)| s.inflight == 0 && now.saturating_duration_since(s.last_used) >= idle)
            .map(|(&id, _)| id)
            .collect();
        for id in &old {
            if let Some(slot) = map.remove(id) {
                slot.t.abandon();
            }
        }
        old.len()
    }

    /// Make room for one more transfer: drop expired ones, then, if the table is still full, the least recently used
    /// one idle for at least `evict_idle`. `false` when every slot is in active use.
    fn make_room(&self, now: Instant, evict_idle: Duration) -> bool {
        if self.lock().len() < self.cap {
            return true;
        }
        self.expire(now, TRANSFER_IDLE_EXPIRY);
        let mut map = self.lock();
        if map.len() < self.cap {
            return true;
        }
        let victim = map
            .iter()
            .filter(|(_, s)| s.inflight == 0 && now.saturating_duration_since(s.last_used) >= evict_idle)
            .min_by_key(|(_, s)| s.last_used)
            .map(|(&id, _)| id);
        match victim.and_then(|id| map.remove(&id)) {
            Some(slot) => {
                slot.t.abandon();
                true
            }
            None => false,
        }
    }

    fn abort(&self, id: u64) {
        let slot = self.lock().remove(&id);
        if let Some(slot) = slot {
            slot.t.remove_temporary();
        }
    }

    /// The server stops: ordinary temporaries are removed, resumable ones kept. Returns (removed, kept).
    fn abort_all(&self) -> (usize, usize) {
        let mut map = self.lock();
        let kept = map.values().filter(|s| s.t.journal.is_some()).count();
        let removed = map.len() - kept;
        for (_, slot) in map.drain() {
            slot.t.abandon();
        }
        (removed, kept)
    }
}

/// Create a fresh temporary beside `name` in `dir`: `.NAME.fstmp-PID-N`, made by `create` (which fails with
/// `EEXIST` when the name is taken: the next number is tried).
fn create_temporary<T>(
    shared: &Shared,
    dir: RawFd,
    name: &CStr,
    mut create: impl FnMut(RawFd, &CStr) -> io::Result<T>,
) -> io::Result<(CString, T)> {
    loop {
        let tmp = temporary_name(shared, name);
        match create(dir, &tmp) {
            Ok(v) => return Ok((tmp, v)),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The next temporary name beside `name`: `.NAME.fstmp-PID-N` (this server's pid, its own counter).
fn temporary_name(shared: &Shared, name: &CStr) -> CString {
    let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
    let tmp = stale::unique(Path::new(OsStr::from_bytes(name.to_bytes())), seq);
    CString::new(tmp.file_name().expect("a file name").as_bytes()).expect("no NUL in a name made of one without")
}

fn is_dir_at(dir: RawFd, name: &CStr) -> bool {
    lstat_at(dir, name).is_ok_and(|st| kind_of(&st) == EntryKind::Dir)
}

/// Where a new transfer `id` of `rel` writes: the directory (opened beneath the root) and the final name. Refused
/// over the root itself, over a directory, and for an id already in use.
fn new_transfer_target(shared: &Shared, id: u64, rel: &[u8]) -> Result<(OwnedFd, CString), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot create", rel, e))?;
    let Some(name) = p.name else {
        return Err(Fail::new(code::IO, "cannot write a file over the served root"));
    };
    if is_dir_at(p.dir.as_raw_fd(), &name) {
        return Err(Fail::new(code::IO, format!("cannot write file '{}': a directory is in the way", show(rel))));
    }
    if shared.transfers.lock().contains_key(&id) {
        return Err(Fail::new(code::PROTOCOL, format!("transfer {id:#x} is already in progress")));
    }
    Ok((p.dir, name))
}

fn put_begin(shared: &Shared, id: u64, rel: &[u8], size: u64) -> Result<(), Fail> {
    let (dir, name) = new_transfer_target(shared, id, rel)?;
    if !shared.transfers.make_room(Instant::now(), shared.timeout) {
        let why = format!("too many transfers in progress ({TRANSFERS_MAX}); try again later");
        return Err(Fail::new(code::BUSY, why));
    }
    // Read-write: the zero-copy path reads spliced chunks back to check their digests. Unnamed where the filesystem
    // allows (one directory operation per file instead of create + rename, nothing left if the server dies);
    // otherwise a named temporary.
    let (tmp, fd, unnamed) = match fastsync_engine::finish::create_unnamed_at(dir.as_fd(), 0o600) {
        Some(fd) => (temporary_name(shared, &name), fd, true),
        None => {
            let (tmp, fd) = create_temporary(shared, dir.as_raw_fd(), &name, |dir, tmp| {
                open_at(dir, tmp, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL, 0o600)
            })
            .map_err(|e| Fail::io("cannot create a temporary file for", rel, e))?;
            (tmp, fd, false)
        }
    };
    let file = File::from(fd);
    let t = Arc::new(Transfer {
        rel: rel.to_vec(),
        dir,
        name,
        tmp,
        unnamed,
        direct: if shared.direct_io { DirectFile::open(&file, size) } else { None },
        file,
        size,
        received: Mutex::new(Received::default()),
        journal: None,
        recorded: Mutex::new(Received::default()),
        holders: AtomicUsize::new(0),
    });
    let mut map = shared.transfers.lock();
    if map.contains_key(&id) {
        drop(map);
        t.remove_temporary();
        return Err(Fail::new(code::PROTOCOL, format!("transfer {id:#x} is already in progress")));
    }
    map.insert(id, Slot { t, last_used: Instant::now(), inflight: 0 });
    Ok(())
}

/// Read the next request. On the zero-copy path (`FASTSYNC_ZEROCOPY` splice or both, plain connection) a `PutData`
/// is served here, its payload spliced from the socket into the file, and `None` is returned.
fn next_request(shared: &Shared, conn: &mut Conn, holds: &mut Holds) -> Result<Option<Msg>, WireError> {
    let zero_copy = zerocopy::mode().splices_into_file() || zerocopy::shards().is_some();
    if !zero_copy || conn.r.get_ref().plain().is_none() {
        return wire::read_msg(conn).map(Some);
    }
    let mut head = [0u8; wire::PUT_DATA_HEAD_BYTES];
    conn.r.read_exact(&mut head[..4])?;
    let frame = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    // Checked before anything else is read, as `read_msg` does.
    if frame == 0 || frame > wire::FRAME_BYTES_MAX {
        let why = format!("frame of {frame} bytes (the limit is {})", wire::FRAME_BYTES_MAX);
        return Err(WireError::Malformed(why));
    }
    conn.r.read_exact(&mut head[4..5])?;
    if head[4] != wire::KIND_PUT_DATA || frame < wire::PUT_DATA_HEAD_BYTES - 4 {
        let mut body = vec![0u8; frame];
        body[0] = head[4];
        conn.r.read_exact(&mut body[1..])?;
        return Msg::decode_body(&body).map(Some);
    }
    conn.r.read_exact(&mut head[5..])?;
    let h = wire::parse_data_head(&head)?;
    let served = match zerocopy::shards() {
        Some(shards) if h.len >= crate::net::shards::PAYLOAD_BYTES_MIN => put_data_on_shards(shared, conn, h, shards)?,
        // A small payload on the shard path: read here (the ordinary path answers it).
        Some(_) if !zerocopy::mode().splices_into_file() => {
            let mut bytes = vec![0u8; h.len];
            conn.r.read_exact(&mut bytes)?;
            Some(Msg::PutData { id: h.id.expect("a PutData head"), offset: h.offset, digest: h.digest, bytes })
        }
        _ => put_data_spliced(shared, conn, h)?,
    };
    if served.is_none()
        && let Some(id) = h.id
    {
        holds.note(shared, id);
    }
    Ok(served)
}

/// Serve a `PutData` whose head was read: splice its payload into the temporary when its range is free (see
/// [`Received::reserve`]), check the digest by reading it back, and answer. Anything unusual (read-only server,
/// unknown transfer, range out of bounds or already received) reads the payload into memory and returns the request
/// for the ordinary path, which answers it.
fn put_data_spliced(shared: &Shared, conn: &mut Conn, h: wire::DataHead) -> Result<Option<Msg>, WireError> {
    let id = h.id.expect("a PutData head");
    let (start, len) = (h.offset, h.len);
    let lease = (!shared.read_only).then(|| shared.transfers.lease(id).ok()).flatten();
    let reserved = lease.as_ref().and_then(|l| {
        let end = start.checked_add(len as u64).filter(|&e| e <= l.t.size)?;
        let ok = l.t.received.lock().unwrap_or_else(|e| e.into_inner()).reserve(start, end);
        ok.then_some(end)
    });
    let (Some(lease), Some(end)) = (lease, reserved) else {
        let mut bytes = vec![0u8; len];
        conn.r.read_exact(&mut bytes)?;
        return Ok(Some(Msg::PutData { id, offset: start, digest: h.digest, bytes }));
    };
    let t = &lease.t;
    let checked = match zerocopy::recv_into_file(&mut conn.r, &t.file, start, len) {
        Ok(()) => match zerocopy::range_matches(&t.file, start, len, &h.digest) {
            Ok(true) => Ok(()),
            Ok(false) => {
                let why =
                    format!("chunk at offset {start} of '{}': digest mismatch (damaged in transit)", show(&t.rel));
                Err(Fail::new(code::DIGEST, why))
            }
            Err(e) => Err(Fail::io("cannot read back", &t.rel, e)),
        },
        Err(SpliceError::File { cause, .. }) => Err(Fail::io("cannot write", &t.rel, cause)),
        Err(SpliceError::Socket(e)) => {
            t.received.lock().unwrap_or_else(|e| e.into_inner()).release(start, end);
            return Err(WireError::Io(e));
        }
    };
    let reply = {
        let mut received = t.received.lock().unwrap_or_else(|e| e.into_inner());
        received.release(start, end);
        match checked {
            Ok(()) => {
                t.written(start, end - start);
                received.add(start, end).map_err(|()| {
                    Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel)))
                })
            }
            Err(f) => {
                received.remove(start, end);
                Err(f)
            }
        }
    };
    drop(lease);
    match reply {
        Ok(()) => wire::write_msg(conn, &Msg::Ok)?,
        Err(f) => send_fail(conn, f)?,
    }
    Ok(None)
}

/// Serve a `PutData` whose head was read on the socket shards: a shard receives the payload into a registered
/// buffer and checks its digest, then takes hold of the transfer (a gate, [`OwnedLease`]) only to write it — so a
/// client that stalls mid-payload holds nothing (its stream is replaced and the chunk sent again; `PutEnd` and a
/// resumed push do not wait for this connection's timeout), and a damaged chunk is never written. What the ordinary
/// path answers (read-only server, unknown transfer, chunk out of bounds) is read into memory and returned for it.
fn put_data_on_shards(
    shared: &Shared,
    conn: &mut Conn,
    h: wire::DataHead,
    shards: &crate::net::shards::NetShards,
) -> Result<Option<Msg>, WireError> {
    let id = h.id.expect("a PutData head");
    let (start, len) = (h.offset, h.len);
    let end = start.checked_add(len as u64);
    // While the payload comes in, this connection holds neither the transfer nor (through it) its journal's lock:
    // only its own duplicates of the temporary's descriptors, and a weak reference for the gate.
    let target = (!shared.read_only)
        .then(|| shared.transfers.lease(id).ok())
        .flatten()
        .filter(|l| end.is_some_and(|e| e <= l.t.size))
        .and_then(|l| {
            let file = l.t.file.try_clone().ok()?;
            let direct = match &l.t.direct {
                // SAFETY: the transfer's descriptor is open while the lease holds it.
                Some(d) => Some(unsafe { std::os::fd::BorrowedFd::borrow_raw(d.raw_fd()) }.try_clone_to_owned().ok()?),
                None => None,
            };
            Some((Arc::downgrade(&l.t), l.t.rel.to_vec(), file, direct))
        });
    let (Some((t, rel, file, direct)), Some(end)) = (target, end) else {
        let mut bytes = vec![0u8; len];
        conn.r.read_exact(&mut bytes)?;
        return Ok(Some(Msg::PutData { id, offset: start, digest: h.digest, bytes }));
    };
    let held: Arc<Mutex<Option<OwnedLease>>> = Arc::default();
    let gate = {
        let (table, held) = (Arc::clone(&shared.transfers), Arc::clone(&held));
        Box::new(move || match lease_owned(&table, id, &t) {
            Some(lease) => {
                *held.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
                true
            }
            None => false,
        })
    };
    let (fd, direct_fd) = (file.as_raw_fd(), direct.as_ref().map(|d| d.as_raw_fd()));
    let got = zerocopy::recv_on_shards(shards, &mut conn.r, fd, direct_fd, start, len, h.digest, Some(gate));
    drop((file, direct));
    let lease = held.lock().unwrap_or_else(|e| e.into_inner()).take();
    let reply = match (got.map_err(WireError::Io)?, &lease) {
        (zerocopy::Received::Written, Some(OwnedLease { t, .. })) => {
            t.written(start, end - start);
            let mut received = t.received.lock().unwrap_or_else(|e| e.into_inner());
            received.add(start, end).map_err(|()| {
                Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel)))
            })
        }
        (zerocopy::Received::Written, None) => unreachable!("a written payload passed the gate, which holds it"),
        (zerocopy::Received::Mismatch, _) => {
            let why = format!("chunk at offset {start} of '{}': digest mismatch (damaged in transit)", show(&rel));
            Err(Fail::new(code::DIGEST, why))
        }
        (zerocopy::Received::Refused, _) => Err(unknown_transfer(id)),
        (zerocopy::Received::File(e), _) => Err(Fail::io("cannot write", &rel, e)),
    };
    drop(lease);
    // Answered as `request` answers: together with the answers to requests that arrived with this one.
    match reply {
        Ok(()) => conn.queue(&Msg::Ok)?,
        Err(f) => conn.queue(&Msg::Error { code: f.code, message: f.message })?,
    }
    if conn.r.buffer().is_empty() {
        conn.flush()?;
    }
    Ok(None)
}

/// `PutResume`: as `PutBegin`, into the stable `.NAME.fstmp-part` with its journal `.NAME.fstmp-journal` (the
/// local engine's format, opened through the directory's descriptor and never through a symlink). An earlier run's
/// records of the same source (size and mtime) are kept for `PutCheck`; returns how many bytes they cover. When
/// another connection holds the journal, or it cannot be used, the transfer is an ordinary one (0 recorded).
fn put_resume(shared: &Shared, id: u64, rel: &[u8], size: u64, mtime: (i64, u32)) -> Result<u64, Fail> {
    let (dir, name) = new_transfer_target(shared, id, rel)?;
    {
        // An earlier run of this file whose client went away without a word still holds the journal: it is over.
        let mut map = shared.transfers.lock();
        let gone: Vec<u64> = map
            .iter()
            .filter(|(_, s)| s.inflight == 0 && s.t.journal.is_some() && s.t.rel == rel)
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            if let Some(slot) = map.remove(&id) {
                slot.t.abandon();
            }
        }
    }
    let final_path = Path::new(OsStr::from_bytes(name.to_bytes()));
    let cname = |p: PathBuf| CString::new(p.as_os_str().as_bytes()).expect("no NUL in a name");
    let (part, journal_name) = (cname(stale::part(final_path)), cname(stale::journal(final_path)));
    let jpath =
        PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(OsStr::from_bytes(journal_name.to_bytes()));
    let source = SourceId { size, mtime: Timestamp { sec: mtime.0, nsec: i64::from(mtime.1) }, ino: 0 };
    let (journal, ranges) = match Journal::open(&jpath, source, wire::CHUNK_BYTES_MAX as u64) {
        Ok(Opened::Resume(j, rec)) => (j, rec.ranges),
        Ok(Opened::Fresh(j)) => (j, Vec::new()),
        Ok(Opened::Busy) | Err(_) => return put_begin(shared, id, rel, size).map(|()| 0),
    };
    let dir_fd = dir.as_raw_fd();
    let reopened = if ranges.is_empty() { None } else { open_at(dir_fd, &part, libc::O_RDWR, 0o600).ok() };
    let resumed = reopened.is_some();
    let fd = match reopened {
        Some(fd) => fd,
        None => {
            let fd = open_at(dir_fd, &part, libc::O_RDWR | libc::O_CREAT, 0o600)
                .map_err(|e| Fail::io("cannot create a temporary file for", rel, e))?;
            File::from(fd).set_len(0).map_err(|e| Fail::io("cannot write", rel, e))?;
            open_at(dir_fd, &part, libc::O_RDWR, 0o600)
                .map_err(|e| Fail::io("cannot create a temporary file for", rel, e))?
        }
    };
    let mut recorded = Received::default();
    if resumed {
        for (offset, len) in &ranges {
            // Past RANGES_MAX separate ranges, the rest is simply sent again.
            let _ = recorded.add(*offset, offset + len);
        }
    }
    let recorded_bytes = recorded.bytes;
    if !shared.transfers.make_room(Instant::now(), shared.timeout) {
        let why = format!("too many transfers in progress ({TRANSFERS_MAX}); try again later");
        return Err(Fail::new(code::BUSY, why));
    }
    let file = File::from(fd);
    let t = Arc::new(Transfer {
        rel: rel.to_vec(),
        dir,
        name,
        tmp: part,
        unnamed: false,
        direct: if shared.direct_io { DirectFile::open(&file, size) } else { None },
        file,
        size,
        received: Mutex::new(Received::default()),
        journal: Some(journal),
        recorded: Mutex::new(recorded),
        holders: AtomicUsize::new(0),
    });
    let mut map = shared.transfers.lock();
    if map.contains_key(&id) {
        return Err(Fail::new(code::PROTOCOL, format!("transfer {id:#x} is already in progress")));
    }
    map.insert(id, Slot { t, last_used: Instant::now(), inflight: 0 });
    Ok(recorded_bytes)
}

/// `PutCheck`: `[offset, offset + len)` of a resumable transfer counts as received when an earlier run recorded all
/// of it and the temporary's bytes there hash to `digest`.
fn put_check(shared: &Shared, id: u64, offset: u64, len: u64, digest: &[u8; 32]) -> Result<(), Fail> {
    let lease = shared.transfers.lease(id)?;
    let t = &lease.t;
    let end = offset.checked_add(len).filter(|&e| e <= t.size && len > 0);
    let Some(end) = end else { return Err(Fail::new(code::PROTOCOL, "PutCheck outside the file")) };
    let covered = {
        let rec = t.recorded.lock().unwrap_or_else(|e| e.into_inner());
        rec.ranges.range(..=offset).next_back().is_some_and(|(_, &e)| e >= end)
    };
    if !covered {
        return Err(Fail::new(code::NOT_FOUND, "not recorded by an earlier run"));
    }
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; GET_CHUNK_BYTES];
    let mut at = offset;
    while at < end {
        let n = buf.len().min((end - at) as usize);
        t.file.read_exact_at(&mut buf[..n], at).map_err(|e| Fail::io("cannot read", &t.rel, e))?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    if h.finalize() != blake3::Hash::from_bytes(*digest) {
        return Err(Fail::new(code::DIGEST, "the bytes recorded differ"));
    }
    t.received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .add(offset, end)
        .map_err(|()| Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel))))
}

fn put_data(shared: &Shared, id: u64, offset: u64, digest: &[u8; 32], bytes: &[u8]) -> Result<(), Fail> {
    let lease = shared.transfers.lease(id)?;
    let t = &lease.t;
    let end = offset.checked_add(bytes.len() as u64).filter(|&e| e <= t.size).ok_or_else(|| {
        let why = format!(
            "chunk at offset {offset} of {} bytes is beyond the end of '{}' ({} bytes)",
            bytes.len(),
            show(&t.rel),
            t.size
        );
        Fail::new(code::PROTOCOL, why)
    })?;
    if blake3::hash(bytes) != blake3::Hash::from_bytes(*digest) {
        let why = format!("chunk at offset {offset} of '{}': digest mismatch (damaged in transit)", show(&t.rel));
        return Err(Fail::new(code::DIGEST, why));
    }
    match &t.direct {
        Some(direct) => direct.write_at(&t.file, bytes, offset),
        None => t.file.write_all_at(bytes, offset),
    }
    .map_err(|e| Fail::io("cannot write", &t.rel, e))?;
    t.written(offset, end - offset);
    let mut received = t.received.lock().unwrap_or_else(|e| e.into_inner());
    received
        .add(offset, end)
        .map_err(|()| Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel))))
}

/// `PutHole`: `[offset, offset + len)` of transfer `id` is a hole of the source; it holds no blocks here either.
fn put_hole(shared: &Shared, id: u64, offset: u64, len: u64) -> Result<(), Fail> {
    let lease = shared.transfers.lease(id)?;
    let t = &lease.t;
    let end = offset.checked_add(len).filter(|&e| e <= t.size && len > 0).ok_or_else(|| {
        let why = format!("hole at offset {offset} of {len} bytes does not fit '{}' ({} bytes)", show(&t.rel), t.size);
        Fail::new(code::PROTOCOL, why)
    })?;
    sparse::make_hole(&t.file, offset, len).map_err(|e| Fail::io("cannot write", &t.rel, e))?;
    t.written(offset, len);
    let mut received = t.received.lock().unwrap_or_else(|e| e.into_inner());
    received
        .add(offset, end)
        .map_err(|()| Fail::new(code::PROTOCOL, format!("'{}': too many separate chunks in flight", show(&t.rel))))
}

// ---------------------------------------------------------------------------------------------------------------
// Extended attributes (-X): read and written by path through the parent's descriptor (`/proc/self/fd/DIR/NAME`,
// resolved beneath the root like every path; the l*xattr calls never follow a final symlink)
// ---------------------------------------------------------------------------------------------------------------

/// `/proc/self/fd/DIR/NAME` for `name` in the directory open as `dir` (`DIR/.`, the directory itself, when `name`
/// is `None`: the l*xattr calls would act on the `/proc` link itself).
fn at_path(dir: RawFd, name: Option<&CStr>) -> PathBuf {
    let d = PathBuf::from(format!("/proc/self/fd/{dir}"));
    d.join(name.map_or(OsStr::new("."), |n| OsStr::from_bytes(n.to_bytes())))
}

fn get_xattrs(shared: &Shared, rel: &[u8], follow: bool) -> Result<wire::Xattrs, Fail> {
    let what = "cannot read extended attributes of";
    let xattrs = if follow {
        // The O_PATH descriptor's magic link leads to the very inode resolved beneath the root.
        let fd = shared.root.follow(rel, libc::O_PATH).map_err(|e| Fail::io(what, rel, e))?;
        crate::meta::read_xattrs_following(&PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())))
    } else {
        let p = shared.root.parent(rel).map_err(|e| Fail::io(what, rel, e))?;
        crate::meta::read_xattrs(&at_path(p.raw(), p.name.as_deref()))
    }
    .map_err(|e| Fail::io(what, rel, e))?;
    let total: usize = xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
    if xattrs.len() > wire::XATTRS_MAX || total > wire::XATTRS_BYTES_MAX {
        let why = format!("'{}' has more extended attributes than the protocol carries", show(rel));
        return Err(Fail::new(code::IO, why));
    }
    Ok(xattrs)
}

fn put_xattrs(shared: &Shared, id: u64, xattrs: &wire::Xattrs) -> Result<(), Fail> {
    let lease = shared.transfers.lease(id)?;
    let t = &lease.t;
    fastsync_engine::finish::set_xattrs(t.file.as_fd(), xattrs)
        .map_err(|e| Fail::io("cannot set extended attributes on", &t.rel, e))
}

fn set_xattrs(shared: &Shared, rel: &[u8], xattrs: &wire::Xattrs) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot set extended attributes on", rel, e))?;
    crate::meta::write_xattrs(&at_path(p.raw(), p.name.as_deref()), xattrs)
        .map_err(|e| Fail::io("cannot set extended attributes on", rel, e))
}

/// Metadata of a finished file.
struct Finish {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, u32),
    fsync: bool,
}

fn put_end(shared: &Shared, id: u64, f: Finish) -> Result<(), Fail> {
    let t = {
        let mut map = shared.transfers.lock();
        let slot = map.get(&id).ok_or_else(|| unknown_transfer(id))?;
        if slot.inflight > 0 {
            let why =
                format!("'{}': chunks are still being written; end the transfer after they are", show(&slot.t.rel));
            return Err(Fail::new(code::PROTOCOL, why));
        }
        let got = slot.t.received.lock().unwrap_or_else(|e| e.into_inner()).bytes;
        if got != slot.t.size {
            let why = format!("'{}': {got} of {} bytes received; send the rest first", show(&slot.t.rel), slot.t.size);
            return Err(Fail::new(code::PROTOCOL, why));
        }
        map.remove(&id).expect("present").t
    };
    let result = finish(&t, &f);
    match (&result, &t.journal) {
        (Err(_), _) => t.remove_temporary(),
        (Ok(()), Some(j)) => j.remove(),
        (Ok(()), None) => {}
    }
    result
}

fn finish(t: &Transfer, f: &Finish) -> Result<(), Fail> {
    let fd = t.file.as_raw_fd();
    let rel = &t.rel;
    t.file.set_len(t.size).map_err(|e| Fail::io("cannot write", rel, e))?;
    // Owner first: chown clears set-id bits, which the chmod then sets. AT_EMPTY_PATH: the descriptor itself.
    chown_at(fd, c"", (f.uid, f.gid), libc::AT_EMPTY_PATH, rel)?;
    // SAFETY: valid descriptor.
    cvt(unsafe { libc::fchmod(fd, (f.mode & 0o7777) as libc::mode_t) })
        .map_err(|e| Fail::io("cannot set permissions on", rel, e))?;
    set_mtime_fd(fd, f.mtime).map_err(|e| Fail::io("cannot set times on", rel, e))?;
    if f.fsync {
        fsync_fd(fd).map_err(|e| Fail::io("cannot sync", rel, e))?;
    }
    put_in_place(t, rel)?;
    if f.fsync {
        fsync_fd(t.dir.as_raw_fd()).map_err(|e| Fail::io("cannot sync the directory of", rel, e))?;
    }
    Ok(())
}

/// Put a complete file under its final name: link the unnamed file there, or rename the temporary over whatever is
/// there (a file or symlink is replaced, a directory is an error).
fn put_in_place(t: &Transfer, rel: &[u8]) -> Result<(), Fail> {
    if t.unnamed {
        return fastsync_engine::finish::place_unnamed_at(t.file.as_fd(), t.dir.as_fd(), &t.name, &t.tmp)
            .map_err(|e| placing_failed(e, rel));
    }
    rename_into_place(t.dir.as_raw_fd(), &t.tmp, &t.name, rel)
}

/// Rename a temporary onto its final name: a file or symlink there is replaced, a directory is an error.
fn rename_into_place(dir: RawFd, tmp: &CStr, name: &CStr, rel: &[u8]) -> Result<(), Fail> {
    rename_at(dir, tmp, name).map_err(|e| placing_failed(e, rel))
}

fn placing_failed(e: io::Error, rel: &[u8]) -> Fail {
    match e.raw_os_error() {
        Some(libc::EISDIR | libc::ENOTEMPTY | libc::EEXIST) => {
            Fail::new(code::IO, format!("cannot replace '{}': a directory is in the way", show(rel)))
        }
        _ => Fail::io("cannot rename into place", rel, e),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Mkdir, SetMeta, Symlink, Delete
// ---------------------------------------------------------------------------------------------------------------

fn mkdir(shared: &Shared, rel: &[u8], mode: u32) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot create directory", rel, e))?;
    let Some(name) = &p.name else { return Ok(()) };
    // SAFETY: valid descriptor and C string.
    match cvt(unsafe { libc::mkdirat(p.raw(), name.as_ptr(), (mode & 0o7777) as libc::mode_t) }) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            if is_dir_at(p.raw(), name) {
                Ok(())
            } else {
                Err(Fail::new(code::IO, format!("cannot create directory '{}': a non-directory is there", show(rel))))
            }
        }
        Err(e) => Err(Fail::io("cannot create directory", rel, e)),
    }
}

/// Give `name` in `dir` (or `dir` itself, with `AT_EMPTY_PATH` and an empty name) to `owner`, never following a
/// symlink. Not being allowed to give entries away (a server that is not root) is expected: the owner stays the
/// server's, as with `rsync` run by an ordinary user.
fn chown_at(dir: RawFd, name: &CStr, owner: (u32, u32), flags: libc::c_int, rel: &[u8]) -> Result<(), Fail> {
    // SAFETY: valid descriptor and C string.
    match cvt(unsafe { libc::fchownat(dir, name.as_ptr(), owner.0, owner.1, flags | libc::AT_SYMLINK_NOFOLLOW) }) {
        Err(e) if e.raw_os_error() != Some(libc::EPERM) => Err(Fail::io("cannot set owner of", rel, e)),
        _ => Ok(()),
    }
}

fn set_meta(shared: &Shared, rel: &[u8], mode: u32, owner: (u32, u32), mtime: (i64, u32)) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot set metadata of", rel, e))?;
    let mode = (mode & 0o7777) as libc::mode_t;
    let Some(name) = &p.name else {
        // The root itself. Owner first: chown clears set-id bits, which the chmod then sets.
        chown_at(p.raw(), c"", owner, libc::AT_EMPTY_PATH, rel)?;
        // SAFETY: valid descriptor.
        cvt(unsafe { libc::fchmod(p.raw(), mode) }).map_err(|e| Fail::io("cannot set permissions on", rel, e))?;
        return set_mtime_fd(p.raw(), mtime).map_err(|e| Fail::io("cannot set times on", rel, e));
    };
    let st = lstat_at(p.raw(), name).map_err(|e| Fail::io("cannot set metadata of", rel, e))?;
    if (st.st_uid, st.st_gid) != owner {
        chown_at(p.raw(), name, owner, 0, rel)?;
    }
    if kind_of(&st) != EntryKind::Symlink {
        // SAFETY: valid descriptor and C string. AT_SYMLINK_NOFOLLOW: should a symlink have been swapped in since the
        // stat, the call fails instead of changing what it points to.
        cvt(unsafe { libc::fchmodat(p.raw(), name.as_ptr(), mode, libc::AT_SYMLINK_NOFOLLOW) })
            .map_err(|e| Fail::io("cannot set permissions on", rel, e))?;
    }
    set_mtime_at(p.raw(), name, mtime).map_err(|e| Fail::io("cannot set times on", rel, e))
}

fn symlink(shared: &Shared, rel: &[u8], target: &[u8], owner: (u32, u32), mtime: (i64, u32)) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot create symlink", rel, e))?;
    let Some(name) = &p.name else {
        return Err(Fail::new(code::IO, "cannot replace the served root with a symlink"));
    };
    let target = CString::new(target)
        .map_err(|_| Fail::new(code::PROTOCOL, format!("symlink '{}': target contains a NUL byte", show(rel))))?;
    let (tmp, ()) = create_temporary(shared, p.raw(), name, |dir, tmp| {
        // SAFETY: valid descriptor and C strings.
        cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, tmp.as_ptr()) }).map(drop)
    })
    .map_err(|e| Fail::io("cannot create symlink", rel, e))?;
    let placed = chown_at(p.raw(), &tmp, owner, 0, rel)
        .and_then(|()| set_mtime_at(p.raw(), &tmp, mtime).map_err(|e| Fail::io("cannot set times on", rel, e)))
        .and_then(|()| rename_into_place(p.raw(), &tmp, name, rel));
    if placed.is_err() {
        let _ = unlink_at(p.raw(), &tmp, 0);
    }
    placed
}

/// `Link`: `rel` becomes another name of the regular file `target` (both beneath the root), through a temporary
/// name renamed over whatever `rel` was.
fn link(shared: &Shared, rel: &[u8], target: &[u8]) -> Result<(), Fail> {
    let t = shared.root.parent(target).map_err(|e| Fail::io("cannot link to", target, e))?;
    let Some(t_name) = &t.name else {
        return Err(Fail::new(code::IO, "cannot link to the served root"));
    };
    let st = lstat_at(t.raw(), t_name).map_err(|e| Fail::io("cannot link to", target, e))?;
    if kind_of(&st) != EntryKind::File {
        return Err(Fail::new(code::IO, format!("cannot link to '{}': not a regular file", show(target))));
    }
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot create link", rel, e))?;
    let Some(name) = &p.name else {
        return Err(Fail::new(code::IO, "cannot replace the served root with a link"));
    };
    if is_dir_at(p.raw(), name) {
        return Err(Fail::new(code::IO, format!("cannot create link '{}': a directory is in the way", show(rel))));
    }
    let (tmp, ()) = create_temporary(shared, p.raw(), name, |dir, tmp| {
        // SAFETY: valid descriptors and C strings; flags 0: a symlink is never followed.
        cvt(unsafe { libc::linkat(t.raw(), t_name.as_ptr(), dir, tmp.as_ptr(), 0) }).map(drop)
    })
    .map_err(|e| Fail::io("cannot create link", rel, e))?;
    let placed = rename_into_place(p.raw(), &tmp, name, rel);
    if placed.is_err() {
        let _ = unlink_at(p.raw(), &tmp, 0);
    }
    placed
}

fn delete(shared: &Shared, rel: &[u8]) -> Result<(), Fail> {
    let p = shared.root.parent(rel).map_err(|e| Fail::io("cannot delete", rel, e))?;
    let Some(name) = &p.name else {
        return Err(Fail::new(code::PERMISSION, "refusing to delete the served root"));
    };
    let st = lstat_at(p.raw(), name).map_err(|e| Fail::io("cannot delete", rel, e))?;
    if kind_of(&st) == EntryKind::Dir {
        remove_tree(p.raw(), name).map_err(|e| Fail::io("cannot delete", rel, e))
    } else {
        unlink_at(p.raw(), name, 0).map_err(|e| Fail::io("cannot delete", rel, e))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Clean, DropParts: what interrupted pushes left
// ---------------------------------------------------------------------------------------------------------------

/// Whether a registered transfer is still someone's: a connection that used it is open, or a request works on it.
fn live(slot: &Slot) -> bool {
    slot.inflight > 0 || slot.t.holders.load(Ordering::SeqCst) > 0
}

/// `Clean`: in directory `rel`, remove the temporaries of processes that are gone (`.NAME.fstmp-PID-N`; this
/// server's own are its transfers', removed when they end or expire), and return the names whose partial file or
/// journal is there and held by no live transfer (at most [`wire::PART_NAMES_MAX`]).
fn clean(shared: &Shared, rel: &[u8]) -> Result<Vec<Vec<u8>>, Fail> {
    let dir = shared.root.dir(rel).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let key = fstat(dir.as_raw_fd()).map(|st| key_of(&st)).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let names = read_names(dir.as_raw_fd(), false).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let mut bases = BTreeSet::new();
    for name in names {
        match stale::parse_temporary(OsStr::from_bytes(name.to_bytes())) {
            Some(stale::Kind::Unique { pid }) if !stale::process_alive(pid) => {
                let _ = unlink_at(dir.as_raw_fd(), &name, 0);
            }
            Some(stale::Kind::Part { base } | stale::Kind::Journal { base }) => {
                let b = base.into_vec();
                // Only what the wire carries as a name (a truncated or odd temporary is left alone).
                if !b.is_empty() && b != b"." && b != b".." && b.len() <= wire::NAME_BYTES_MAX {
                    bases.insert(b);
                }
            }
            _ => {}
        }
    }
    let held: Vec<Vec<u8>> = {
        let map = shared.transfers.lock();
        map.values()
            .filter(|s| s.t.journal.is_some() && live(s) && dir_key(&s.t) == Some(key))
            .map(|s| s.t.name.to_bytes().to_vec())
            .collect()
    };
    Ok(bases.into_iter().filter(|b| !held.contains(b)).take(wire::PART_NAMES_MAX).collect())
}

fn dir_key(t: &Transfer) -> Option<(u64, u64)> {
    fstat(t.dir.as_raw_fd()).ok().map(|st| key_of(&st))
}

/// `DropParts`: remove `.NAME.fstmp-part` and `.NAME.fstmp-journal` of each name in directory `rel`, unless a live
/// transfer holds them (a registered transfer whose client is gone is ended first) or another process holds the
/// journal's lock (a local fastsync writing there). Returns the names whose files were removed.
fn drop_parts(shared: &Shared, rel: &[u8], names: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, Fail> {
    let dir = shared.root.dir(rel).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let key = fstat(dir.as_raw_fd()).map(|st| key_of(&st)).map_err(|e| Fail::io("cannot clean", rel, e))?;
    let cname = |p: PathBuf| CString::new(p.as_os_str().as_bytes()).expect("no NUL in a name");
    let mut removed = Vec::new();
    for name in names {
        let orphans = {
            let mut map = shared.transfers.lock();
            let ids: Vec<u64> = map
                .iter()
                .filter(|(_, s)| s.t.journal.is_some() && s.t.name.to_bytes() == name && dir_key(&s.t) == Some(key))
                .map(|(&id, _)| id)
                .collect();
            if ids.iter().any(|id| live(&map[id])) {
                continue;
            }
            ids.iter().filter_map(|id| map.remove(id)).map(|s| s.t).collect::<Vec<_>>()
        };
        let mut gone = !orphans.is_empty();
        for t in orphans {
            t.remove_temporary();
        }
        let base = Path::new(OsStr::from_bytes(name));
        let (part, journal) = (cname(stale::part(base)), cname(stale::journal(base)));
        // Removed under the journal's lock: a transfer (here or in another process) that holds it is left alone,
        // and one that starts meanwhile finds the journal busy or gone.
        let lock = match open_at(dir.as_raw_fd(), &journal, libc::O_RDONLY, 0) {
            Ok(fd) => {
                // SAFETY: plain syscall on a descriptor we own; the lock goes with it.
                if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                    continue;
                }
                Some(fd)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(Fail::io("cannot clean", &join_rel(rel, name), e)),
        };
        for n in [&part, &journal] {
            match unlink_at(dir.as_raw_fd(), n, 0) {
                Ok(()) => gone = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(Fail::io("cannot remove the partial file of", &join_rel(rel, name), e)),
            }
        }
        drop(lock);
        if gone {
            removed.push(name.clone());
        }
    }
    Ok(removed)
}

/// `rel/name` as a wire path.
fn join_rel(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = rel.to_vec();
    if !v.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// Remove directory `name` in `parent` and everything in it, depth-first with one open descriptor per level, never
/// following a symlink (symlinks are unlinked, and a directory swapped for a symlink fails the `O_NOFOLLOW` open).
fn remove_tree(parent: RawFd, name: &CStr) -> io::Result<()> {
    struct Level {
        fd: OwnedFd,
        name: CString,
        names: Vec<CString>,
        next: usize,
    }
    let gone_ok = |r: io::Result<()>| match r {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    };
    let fd = open_dir_at(parent, name)?;
    let names = read_names(fd.as_raw_fd(), false)?;
    let mut stack = vec![Level { fd, name: name.to_owned(), names, next: 0 }];
    while let Some(level) = stack.last_mut() {
        if let Some(n) = level.names.get(level.next).cloned() {
            level.next += 1;
            let dir = level.fd.as_raw_fd();
            match lstat_at(dir, &n) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e),
                Ok(st) if kind_of(&st) == EntryKind::Dir => {
                    let fd = open_dir_at(dir, &n)?;
                    let names = read_names(fd.as_raw_fd(), false)?;
                    stack.push(Level { fd, name: n, names, next: 0 });
                }
                Ok(_) => gone_ok(unlink_at(dir, &n, 0))?,
            }
        } else {
            let done = stack.pop().expect("a level");
            drop(done.fd);
            let up = stack.last().map_or(parent, |l| l.fd.as_raw_fd());
            gone_ok(unlink_at(up, &done.name, libc::AT_REMOVEDIR))?;
        }
    }
    Ok(())
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
