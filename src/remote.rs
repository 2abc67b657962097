//! `copy`, `sync` and `list` with a `fastsync://host[:port]/path` on one side: the client of `fastsync serve`.
//!
//! - **push** (local source, remote destination): the local tree is walked depth-first as a stream; directories are
//!   created (`Mkdir`) and symlinks made (`Symlink`) on a control connection, files are sent by `--streams N` worker
//!   threads, one authenticated connection each, fed by a bounded queue: a small file goes whole to one worker
//!   (`PutBegin`, `PutData` chunks of at most 4 MiB with their BLAKE3 digest, `PutEnd` with the metadata); a large
//!   one is cut into ranges spread over the workers, and the last range to finish ends it. A directory's permissions
//!   and mtime are set (`SetMeta`) once everything inside it is done. `sync` lists each remote twin directory
//!   (`List`, not recursive: one directory at a time) to compare sizes and mtimes with `sync::verdict`.
//! - **pull** (remote source, local destination): the remote tree is listed recursively on the control connection
//!   and each entry is handled as it arrives (the listing is never held in memory); files are fetched (`Get`) by the
//!   workers into `.NAME.fstmp-PID-N` temporaries, every chunk checked against its BLAKE3 digest before it is
//!   written, the file's size and mtime after the read (`DataEnd`) checked against the listing (a file that changed
//!   is fetched again, up to 3 attempts), then permissions, owner and mtime are set and the temporary is renamed into
//!   place. Every local write is an `*at` call relative to a directory opened component by component with
//!   `O_NOFOLLOW` beneath the destination (`net::beneath`), and every listed path is checked
//!   (`wire::safe_components`, and it must lie inside a directory listed before it): a hostile server cannot make
//!   the client write outside the destination, through `..`, an absolute path or a symlink it listed.
//! - `sync --delete` deletes only after every transfer succeeded, honours `--max-delete` (counting first) and the
//!   filters, and itemizes like a local sync.
//!
//! A data stream whose connection breaks (reset, closed, or stalled: no progress for the I/O timeout, 60 s or
//! `FASTSYNC_IO_TIMEOUT`) is dialled again and authenticated again (`Stream`), with a warning naming the server and
//! the file, and the request in flight is sent again on the new connection: the chunk being pushed (the server's
//! transfer table outlives connections, so chunks already acknowledged are not sent again), or the rest of the range
//! being pulled (from the first byte not yet received and checked). Each request gets [`STREAM_ATTEMPTS_MAX`] attempts
//! with a short backoff between them; then the run stops with one line naming the file and the cause. A push's
//! control connection (directories, symlinks, metadata, one directory's listing at a time) is dialled again the same
//! way ([`PushCore::ctl_do`]: each of its requests can be sent twice), and a pull's, which streams the recursive
//! listing, lists again on the new connection and skips the entries it handled. A server that cannot be reached
//! again stops the whole run with one line naming the server; temporaries are removed (pull) or abandoned to the
//! server, which removes them (push), so nothing partial appears under a final name, and a rerun finishes the work.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, File, Metadata};
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Select, Sender, TrySendError, bounded, unbounded};

use crate::Error;
use crate::copy::CopyOptions;
use crate::error::exit;
use crate::interrupt;
use crate::list::{self, ListArgs};
use crate::meta::Identity;
use crate::net::auth::{self, Key, Wishes};
use crate::net::beneath::Root;
use crate::net::client::{self, Connection, Dialer, GetError, Listed, ReqError};
use crate::net::direct::DirectFile;
use crate::net::sparse::{self, Piece};
use crate::net::streams::{STREAMS_MAX, STREAMS_MIN, Sample, StreamPolicy, TcpStats, tcp_stats};
use crate::net::url::{self, Remote, join};
use crate::net::wire::Xattrs;
use crate::net::wire::{CHUNK_BYTES_MAX, EntryKind, EntryMeta, Msg, code, safe_components};
use crate::net::zerocopy::{self, PutError};
use crate::progress::Progress;
use crate::slab::Slab;
use crate::stale;
use crate::stats::Summary;
use crate::sync::{self, Change, Facts, Itemizer, SyncOptions, Verdict};
use fastsync_engine::journal::{Journal, Opened, SourceId};
use fastsync_engine::{Show, Timestamp};

/// A file that changes while it is sent or fetched is transferred again, up to this many attempts in all.
const SOURCE_ATTEMPTS_MAX: u8 = 3;
/// Files larger than one chunk are cut into ranges of at most this many bytes, spread over the connections.
const RANGE_BYTES_MAX: u64 = 32 << 20;
const CHUNK: u64 = CHUNK_BYTES_MAX as u64;
/// How often an adaptive pool's monitor samples its streams.
const STREAMS_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// A data request whose connection breaks is tried this many times in all, each retry on a freshly dialled and
/// authenticated connection; a retry that made progress (a pull that received more bytes) starts the count again.
pub const STREAM_ATTEMPTS_MAX: u32 = 3;
/// The pause before the second attempt; it doubles before each further one.
const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(200);

/// The environment variable that sets the I/O timeout (whole seconds): a connection with no progress for that long
/// counts as stalled. The default is [`client::DEFAULT_TIMEOUT`].
pub const IO_TIMEOUT_ENV: &str = "FASTSYNC_IO_TIMEOUT";
/// The largest I/O timeout accepted, in seconds (a day).
const IO_TIMEOUT_SECS_MAX: u64 = 86_400;

/// How to reach the server.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Connections carrying file data (the control connection comes on top).
    pub streams: usize,
    pub token_file: Option<PathBuf>,
    /// Connect, read and write timeout: a connection with no progress for this long is stalled.
    pub timeout: Duration,
    /// `--encrypt`, `--compress[=LEVEL]`.
    pub wishes: Wishes,
    /// `streams` is where to start, and the number follows the measured bandwidth-delay product (no `--streams`).
    pub adaptive: bool,
    /// `-v`: say when and why the number of streams changes.
    pub verbose: bool,
    /// The most streams an adaptive pool may grow to (the memory limit's share).
    pub streams_max: usize,
}

impl NetOptions {
    pub fn new(streams: usize, token_file: Option<&Path>) -> NetOptions {
        NetOptions {
            streams: streams.max(1),
            token_file: token_file.map(Path::to_path_buf),
            timeout: client::DEFAULT_TIMEOUT,
            wishes: Wishes::default(),
            adaptive: false,
            verbose: false,
            streams_max: STREAMS_MAX,
        }
    }

    /// These options with the I/O timeout of [`IO_TIMEOUT_ENV`] when it is set; a bad value is a usage error.
    fn with_env(&self) -> Result<NetOptions, Failure> {
        let mut net = self.clone();
        if let Some(v) = std::env::var_os(IO_TIMEOUT_ENV) {
            net.timeout = Duration::from_secs(io_timeout_secs(&v.to_string_lossy())?);
        }
        Ok(net)
    }
}

/// Parse an I/O timeout: whole seconds from 1 to [`IO_TIMEOUT_SECS_MAX`].
fn io_timeout_secs(text: &str) -> Result<u64, Failure> {
    match text.trim().parse::<u64>() {
        Ok(secs) if (1..=IO_TIMEOUT_SECS_MAX).contains(&secs) => Ok(secs),
        _ => Err(Failure::Usage(format!(
            "{IO_TIMEOUT_ENV} must be a whole number of seconds from 1 to {IO_TIMEOUT_SECS_MAX}, not '{text}'"
        ))),
    }
}

/// Why a remote command stopped before its summary.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage or a refused request (exit 2).
    Usage(String),
    /// The run could not go on: no connection, authentication failed, the connection broke (exit 1).
    Fatal(String),
}

impl Failure {
    /// Print (fatal failures) or hand over (usage errors, printed by the caller) with the exit code.
    pub fn into_exit(self) -> Result<i32, Error> {
        match self {
            Failure::Usage(m) => Err(Error::Refused(m)),
            Failure::Fatal(m) => {
                eprintln!("fastsync: {m}");
                Ok(exit::PARTIAL)
            }
        }
    }
}

/// Whether either side of a transfer is a `fastsync://` URL.
pub fn involved(src: &Path, dst: &Path) -> bool {
    url::is_url(src) || url::is_url(dst)
}

fn parse_url(p: &Path) -> Result<Remote, Failure> {
    url::parse(p.as_os_str().as_bytes()).map_err(Failure::Usage)
}

fn load_key(net: &NetOptions, url: &str) -> Result<Key, Failure> {
    match auth::load_token(net.token_file.as_deref(), std::env::var_os("FASTSYNC_TOKEN")) {
        Ok(Some(t)) => Ok(Key::from_token(&t)),
        Ok(None) => Err(Failure::Usage(format!(
            "'{url}' needs the server's token: give --token-file FILE or set FASTSYNC_TOKEN"
        ))),
        Err(m) => Err(Failure::Usage(m)),
    }
}

fn connect(addr: &str, key: &Key, net: &NetOptions) -> Result<Connection, Failure> {
    client::connect(addr, key, net.wishes, net.timeout).map_err(|e| Failure::Fatal(e.to_string()))
}

fn dial(dialer: &Dialer) -> Result<Connection, Failure> {
    dialer.dial().map_err(|e| Failure::Fatal(e.to_string()))
}

fn url_of(addr: &str, wire: &[u8]) -> String {
    format!("{}{addr}/{}", url::SCHEME, wire.shown())
}

fn mtime_of(e: &EntryMeta) -> (i64, u32) {
    (e.mtime_sec, e.mtime_nsec)
}

fn facts(e: &EntryMeta) -> Facts {
    Facts { size: e.size, mtime: (e.mtime_sec, i64::from(e.mtime_nsec)) }
}

/// A transfer id for `PutBegin`: random per process, then counted.
fn next_id() -> u64 {
    static BASE: OnceLock<u64> = OnceLock::new();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let base = *BASE.get_or_init(|| {
        let n = auth::nonce().unwrap_or([7; 32]);
        u64::from_le_bytes(n[..8].try_into().expect("8 bytes")) ^ u64::from(std::process::id())
    });
    base.wrapping_add(SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Why two copies of a file could not be compared by digest.
enum Compared {
    /// One line naming the file and the cause; the run goes on.
    Failed(String),
    /// The connection broke: the run stops.
    Broken(String),
}

/// BLAKE3 of a local file opened for `sync --checksum`.
fn hash_local(file: io::Result<File>) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    h.update_reader(file?)?;
    Ok(*h.finalize().as_bytes())
}

/// Whether the local file (`here`, its digest or why it could not be read) and the server's (`there`) hold the same
/// bytes.
fn same_content(
    mine: io::Result<[u8; 32]>,
    theirs: Result<([u8; 32], u64), ReqError>,
    here: &str,
    there: &str,
) -> Result<bool, Compared> {
    let mine = mine.map_err(|e| Compared::Failed(format!("cannot compute the checksum of '{here}': {e}")))?;
    match theirs {
        Ok((digest, _)) => Ok(digest == mine),
        Err(ReqError::Broken(m)) => Err(Compared::Broken(m)),
        Err(ReqError::Server { message, .. }) => {
            Err(Compared::Failed(format!("cannot compute the checksum of '{there}': {message}")))
        }
    }
}

/// The ranges of a file of `size` bytes spread over `streams` connections, or `None` when it goes whole.
fn ranges(size: u64, streams: usize) -> Option<Vec<(u64, u64)>> {
    if size <= CHUNK || streams < 2 {
        return None;
    }
    let per = size.div_ceil(streams as u64).div_ceil(CHUNK) * CHUNK;
    let per = per.clamp(CHUNK, RANGE_BYTES_MAX);
    Some((0..size.div_ceil(per)).map(|i| (i * per, per.min(size - i * per))).collect())
}

/// Run `copy` or `sync` with a `fastsync://` URL on one side.
pub fn transfer(src: &Path, dst: &Path, opts: &CopyOptions, net: &NetOptions) -> Result<Summary, Failure> {
    let (src_remote, dst_remote) = (url::is_url(src), url::is_url(dst));
    if src_remote && dst_remote {
        return Err(Failure::Usage(
            "copying from one fastsync:// URL to another is not supported; run fastsync on one of the hosts".into(),
        ));
    }
    if opts.verify && !opts.quiet {
        eprintln!(
            "fastsync: --verify: no read-back for fastsync:// transfers (every chunk is checked against its BLAKE3 \
             digest on arrival)"
        );
    }
    let net = &net.with_env()?;
    let remote = parse_url(if src_remote { src } else { dst })?;
    let shown = remote.display(b"");
    let key = load_key(net, &shown)?;
    // -L on a pull: the server follows symlinks, beneath its root only (docs/PROTOCOL.md, `follow`).
    let follow = src_remote && opts.dereference;
    let dialer = Arc::new(Dialer::new(&remote.addr, key, net.wishes, net.timeout).following(follow));
    let started = Instant::now();
    let mut summary = if dst_remote {
        Push::run(src, remote, opts, net, dialer)?
    } else {
        Pull::run(remote, dst, opts, net, dialer)?
    };
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

// ---------------------------------------------------------------------------------------------------------------
// What push and pull share: counters, failures, the worker pool, directories finished last
// ---------------------------------------------------------------------------------------------------------------

/// Counters, failures, and the reasons to stop.
struct Run<'a> {
    opts: &'a CopyOptions,
    sync: Option<&'a SyncOptions>,
    delete: bool,
    itemizer: Itemizer,
    summary: Summary,
    progress: Progress,
    /// The first broken connection: the run stops, and this is its one line.
    fatal: Option<String>,
    interrupted: Option<i32>,
    /// Tells the workers to drop what is queued.
    stop: Arc<AtomicBool>,
    id: Identity,
    /// `-v`: show the pool's notes.
    verbose: bool,
}

/// At most this many failures are kept for the summary (all are printed and counted).
const FAILURES_KEPT_MAX: usize = 1000;

impl<'a> Run<'a> {
    fn new(opts: &'a CopyOptions, streams: usize) -> Run<'a> {
        let command = if opts.sync.is_some() { "sync" } else { "copy" };
        let mut summary = Summary::new(command, "net", streams);
        summary.dry_run = opts.dry_run;
        Run {
            opts,
            sync: opts.sync.as_ref(),
            delete: opts.sync.as_ref().is_some_and(|s| s.delete),
            itemizer: Itemizer { enabled: opts.itemize || opts.dry_run, json: opts.json },
            summary,
            progress: Progress::new(opts.progress && !opts.quiet),
            fatal: None,
            interrupted: None,
            stop: Arc::new(AtomicBool::new(false)),
            id: Identity::current(),
            verbose: false,
        }
    }

    fn fail(&mut self, msg: String) {
        self.progress.println(&format!("fastsync: {msg}"));
        self.summary.errors += 1;
        if self.summary.failures.len() < FAILURES_KEPT_MAX {
            self.summary.failures.push(msg);
        }
    }

    /// A line shown with `-v` (how the number of streams changes).
    fn note(&mut self, msg: &str) {
        if self.verbose && !self.opts.quiet {
            self.progress.println(&format!("fastsync: {msg}"));
        }
    }

    /// A warning line (a stream that broke and was replaced); `-q` silences it.
    fn warn(&mut self, msg: &str) {
        if !self.opts.quiet {
            self.progress.println(&format!("fastsync: warning: {msg}"));
        }
    }

    fn broken(&mut self, msg: String) {
        if self.fatal.is_none() {
            self.fatal = Some(msg);
        }
        self.stop.store(true, Ordering::Release);
    }

    /// A request failed: the server's refusal is one failure line (`what` says what was being done), a broken
    /// connection stops the run.
    fn req_failed(&mut self, e: ReqError, what: impl FnOnce(&str) -> String) {
        match e {
            ReqError::Server { .. } => self.fail(what(e.cause())),
            ReqError::Broken(m) => self.broken(m),
        }
    }

    /// Whether the run must stop (a broken connection, or Ctrl-C).
    fn halted(&mut self) -> bool {
        if self.interrupted.is_none() {
            self.interrupted = interrupt::received();
        }
        if self.interrupted.is_some() {
            self.stop.store(true, Ordering::Release);
        }
        self.fatal.is_some() || self.interrupted.is_some()
    }

    fn item(&self, change: Change, rel: &[u8], is_dir: bool) {
        self.itemizer.item(change, url::os_path(rel), is_dir);
    }

    fn skip_special(&mut self, shown: &str) {
        self.summary.skipped += 1;
        if !self.opts.quiet {
            self.progress.println(&format!("fastsync: skipping special file '{shown}'"));
        }
    }

    /// After the transfers: run the deletion pass only when everything succeeded.
    fn may_delete(&mut self) -> bool {
        if !self.delete {
            return false;
        }
        if self.fatal.is_some() {
            return false;
        }
        let why = match (self.interrupted, self.summary.errors) {
            (Some(_), _) => "the run was interrupted".to_string(),
            (None, 0) => return true,
            (None, n) => format!("{n} error(s) happened"),
        };
        self.summary.deletions_skipped = Some(format!("{why}; nothing was deleted"));
        false
    }

    /// The summary, or the fatal line.
    fn finish(mut self) -> Result<Summary, Failure> {
        self.progress.finish();
        if let Some(m) = self.fatal {
            return Err(Failure::Fatal(m));
        }
        self.summary.interrupted = self.interrupted.or_else(interrupt::received);
        Ok(self.summary)
    }
}

/// What a worker reports.
enum Done {
    /// Bytes acknowledged (push) or written (pull).
    Bytes(u64),
    /// A file is finished: transferred (and how many times it was retried), or failed (the line to print).
    /// `link`: the file was the first name of a multiply-linked inode (`-H`), whose other names wait for it.
    File { dir: Option<usize>, link: Option<(u64, u64)>, result: Result<u8, String> },
    /// A stream broke and was replaced: the warning line (without `fastsync: warning: `).
    Warn(String),
    /// A stream gave up (or the server cannot be reached again): the run stops.
    Broken(String),
    /// What the pool's monitor decided (shown with `-v`).
    Note(String),
}

/// Why a worker stopped working.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    /// A request failed [`STREAM_ATTEMPTS_MAX`] times on fresh connections: the run stops with this line.
    #[error("{0}")]
    GaveUp(String),
    /// The run is stopping (another stream gave up, the control connection broke, or Ctrl-C).
    #[error("the run was stopped")]
    Stopped,
}

/// A request's connection broke under it (closed, reset, stalled past the I/O timeout, garbled).
#[derive(Debug)]
struct Broken {
    /// Names the server and the cause.
    message: String,
    /// Something was received and kept before it broke (a pull), so the attempts are counted again.
    progressed: bool,
}

impl Broken {
    fn new(message: String) -> Broken {
        Broken { message, progressed: false }
    }
}

/// A request's result with a broken connection split off (the part [`Stream::retry`] handles).
fn split<R>(r: Result<R, ReqError>) -> Result<Result<R, ReqError>, Broken> {
    match r {
        Err(ReqError::Broken(m)) => Err(Broken::new(m)),
        r => Ok(r),
    }
}

/// What a stream was doing, for its warnings and its last error line.
struct Doing {
    /// `sending 'URL' (the chunk at byte N)`.
    what: String,
    /// `cannot write 'URL'`.
    failed: String,
}

impl Doing {
    fn push(url: &str, part: &str) -> Doing {
        Doing { what: format!("sending '{url}' ({part})"), failed: format!("cannot write '{url}'") }
    }

    fn pull(url: &str, part: &str) -> Doing {
        Doing { what: format!("fetching '{url}' ({part})"), failed: format!("cannot read '{url}'") }
    }
}

/// One data stream of a pool: a connection that is dialled again, with a fresh handshake, when it breaks.
struct Stream {
    /// 1-based, for messages.
    number: usize,
    dialer: Arc<Dialer>,
    /// `None` after a break, until the next request dials again.
    conn: Option<Connection>,
    stop: Arc<AtomicBool>,
    /// Where the pool's monitor finds this stream's socket.
    scaler: Arc<Scaler>,
}

impl Stream {
    fn new(
        number: usize,
        conn: Option<Connection>,
        dialer: Arc<Dialer>,
        stop: Arc<AtomicBool>,
        scaler: Arc<Scaler>,
    ) -> Stream {
        let mut s = Stream { number, dialer, conn: None, stop, scaler };
        s.set_conn(conn);
        s
    }

    /// Install (or drop) the connection, and tell the monitor which socket it is.
    fn set_conn(&mut self, conn: Option<Connection>) {
        self.scaler.publish(self.number, conn.as_ref().map_or(-1, Connection::raw_fd));
        self.conn = conn;
    }

    fn addr(&self) -> &str {
        self.dialer.addr()
    }

    /// Run `op` on the connection. When the connection breaks under it, the connection is dropped, and after a
    /// short backoff a new one is dialled and `op` runs again on it (it is told the attempt number, from 1), up to
    /// [`STREAM_ATTEMPTS_MAX`] attempts; a warning names the server and what was being done. A failed dial counts
    /// as an attempt. `Err(GaveUp)` names what was being done and the last cause; `Err(Stopped)` when the run stops
    /// meanwhile.
    fn retry<R>(
        &mut self,
        doing: &Doing,
        done: &Sender<Done>,
        mut op: impl FnMut(&mut Connection, u32) -> Result<R, Broken>,
    ) -> Result<R, StreamError> {
        let mut attempt = 1;
        // Why the last attempt failed: the request's connection broke, then (maybe) dialling again failed.
        let mut broke: Option<String> = None;
        let mut redial: Option<String> = None;
        loop {
            if interrupt::received().is_some() {
                // Ctrl-C: the request in flight finished; stop before the next one, on every stream.
                self.stop.store(true, Ordering::Release);
            }
            if self.stop.load(Ordering::Acquire) {
                return Err(StreamError::Stopped);
            }
            let conn = match self.conn.take() {
                Some(c) => Some(c),
                None => match self.dialer.dial() {
                    Ok(c) => {
                        self.scaler.publish(self.number, c.raw_fd());
                        if let Some(cause) = &broke {
                            let n = self.number;
                            let _ = done.send(Done::Warn(format!(
                                "stream {n}: {cause}, while {}; reconnected, trying again (attempt {attempt} of \
                                 {STREAM_ATTEMPTS_MAX})",
                                doing.what
                            )));
                        }
                        Some(c)
                    }
                    Err(e) => {
                        redial = Some(e.to_string());
                        None
                    }
                },
            };
            if let Some(mut conn) = conn {
                redial = None;
                match op(&mut conn, attempt) {
                    Ok(r) => {
                        self.conn = Some(conn);
                        return Ok(r);
                    }
                    Err(b) => {
                        self.scaler.publish(self.number, -1);
                        if b.progressed {
                            // A new request was in flight when it broke: this was its first attempt.
                            attempt = 1;
                        }
                        broke = Some(b.message);
                    }
                }
            }
            if attempt >= STREAM_ATTEMPTS_MAX {
                let cause = match (&broke, &redial) {
                    (Some(b), Some(r)) => format!("{b}; reconnecting failed: {r}"),
                    (Some(b), None) => b.clone(),
                    (None, Some(r)) => r.clone(),
                    (None, None) => "the connection broke".to_string(),
                };
                return Err(StreamError::GaveUp(format!(
                    "{}: {cause} (gave up after {attempt} attempts on fresh connections)",
                    doing.failed
                )));
            }
            self.pause(RETRY_BACKOFF_FIRST * 2u32.saturating_pow(attempt.saturating_sub(1)));
            attempt += 1;
        }
    }

    /// Sleep for `d`, waking early when the run stops.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stop.load(Ordering::Acquire) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    /// Run `op` once if the connection is up (cleaning up: a `PutAbort`); a break only drops the connection.
    fn best_effort(&mut self, op: impl FnOnce(&mut Connection) -> Result<(), ReqError>) {
        if let Some(conn) = self.conn.as_mut()
            && let Err(ReqError::Broken(_)) = op(conn)
        {
            self.set_conn(None);
        }
    }

    /// Keep an idle connection from being dropped by the server; one that broke meanwhile is dropped quietly (the
    /// next request dials again).
    fn keepalive(&mut self) {
        if let Some(conn) = self.conn.as_mut()
            && conn.keepalive().is_err()
        {
            self.set_conn(None);
        }
    }

    fn bye(mut self) {
        self.scaler.publish(self.number, -1);
        if let Some(conn) = self.conn.take() {
            conn.bye();
        }
    }
}

/// Worker threads, one stream each, fed by a bounded queue; with adaptive streams, a monitor thread adds and retires
/// workers as [`StreamPolicy`] decides.
struct Pool<T> {
    tx: Option<Sender<T>>,
    done: Receiver<Done>,
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
    scaler: Arc<Scaler>,
    monitor: Option<JoinHandle<()>>,
}

/// A worker's job: the tasks it took in one turn (one, or a run of batchable ones and the task after them), in queue
/// order. `Err` stops the worker (and the run).
type Work<T> = dyn Fn(&mut Stream, Vec<T>, &Sender<Done>) -> Result<(), StreamError> + Send + Sync;

/// What a pool's queue carries.
trait PoolTask: Send + 'static {
    /// Tasks queued per stream the pool may run (a task is a file or a range, never its data).
    const QUEUED_PER_STREAM: usize = 2;

    /// A worker that takes this task may take the next ones from the queue in the same turn (small files, sent in
    /// one round trip: [`push_smalls`]).
    fn batchable(&self) -> bool {
        false
    }
}

/// Tasks a worker takes from the queue in one turn at most.
const TASKS_PER_TURN_MAX: usize = SMALL_BATCH_FILES_MAX;

/// What the main thread hears while it waits: a completion, or `None` after [`client::KEEPALIVE`] of silence (time
/// to keep its own connection alive).
type OnEvent<'a> = &'a mut dyn FnMut(Option<Done>);

/// How many streams a pool should run, and what its monitor sees of them. Streams are numbered from 1; stream `n`
/// runs while `n <= target`.
struct Scaler {
    target: AtomicUsize,
    /// The most streams that ran at once.
    peak: AtomicUsize,
    /// Stream `n`'s socket at index `n - 1` (-1: none), read by the monitor for `TCP_INFO`.
    fds: Vec<AtomicI32>,
    /// Stream `n`'s worker is running.
    alive: Vec<AtomicBool>,
    /// No more streams than this (the server refused one more connection).
    cap: AtomicUsize,
    /// Every task is queued: the monitor no longer adds streams (and stops with the last worker).
    finished: AtomicBool,
}

impl Scaler {
    fn new(initial: usize, slots: usize) -> Scaler {
        Scaler {
            target: AtomicUsize::new(initial),
            peak: AtomicUsize::new(initial),
            fds: (0..slots).map(|_| AtomicI32::new(-1)).collect(),
            alive: (0..slots).map(|_| AtomicBool::new(false)).collect(),
            cap: AtomicUsize::new(slots),
            finished: AtomicBool::new(false),
        }
    }

    fn target(&self) -> usize {
        self.target.load(Ordering::Acquire)
    }

    /// How many streams a large file's ranges should feed: all the pool may grow to.
    fn split_for(&self) -> usize {
        self.fds.len()
    }

    fn publish(&self, number: usize, fd: RawFd) {
        if let Some(slot) = self.fds.get(number - 1) {
            slot.store(fd, Ordering::Release);
        }
    }
}

/// Everything needed to start one more worker.
struct Spawner<T> {
    rx: Receiver<T>,
    dtx: Sender<Done>,
    stop: Arc<AtomicBool>,
    work: Arc<Work<T>>,
    dialer: Arc<Dialer>,
    scaler: Arc<Scaler>,
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl<T: PoolTask> Spawner<T> {
    /// Start stream `number`'s worker: on `conn`, or on a connection it dials first (a stream added by the monitor).
    fn spawn(&self, number: usize, conn: Option<Connection>) {
        self.scaler.alive[number - 1].store(true, Ordering::Release);
        let stream = Stream::new(number, conn, self.dialer.clone(), self.stop.clone(), self.scaler.clone());
        let (rx, dtx, stop, work, scaler) =
            (self.rx.clone(), self.dtx.clone(), self.stop.clone(), self.work.clone(), self.scaler.clone());
        let handle = std::thread::spawn(move || {
            worker(stream, &rx, &dtx, &stop, &*work);
            scaler.alive[number - 1].store(false, Ordering::Release);
        });
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
    }
}

impl<T: PoolTask> Pool<T> {
    /// Workers on `conns`; with `adaptive` (the most streams), a monitor that follows the bandwidth-delay product.
    fn start(
        conns: Vec<Connection>,
        dialer: &Arc<Dialer>,
        stop: Arc<AtomicBool>,
        work: Arc<Work<T>>,
        adaptive: Option<usize>,
    ) -> Pool<T> {
        let initial = conns.len();
        // Adaptive: as many slots as the pool may grow to.
        let slots = adaptive.map_or(initial, |max| max.max(initial)).max(1);
        let scaler = Arc::new(Scaler::new(initial, slots));
        // Tasks are files and ranges, never their data: the queue holds a few per stream the pool may run.
        let (tx, rx) = bounded::<T>(slots * T::QUEUED_PER_STREAM);
        let (dtx, drx) = unbounded();
        let handles = Arc::new(Mutex::new(Vec::new()));
        let spawner = Spawner { rx, dtx, stop, work, dialer: dialer.clone(), scaler: scaler.clone(), handles };
        for (i, conn) in conns.into_iter().enumerate() {
            spawner.spawn(i + 1, Some(conn));
        }
        let handles = spawner.handles.clone();
        let monitor =
            (adaptive.is_some() && initial > 0).then(|| std::thread::spawn(move || monitor(&spawner, initial)));
        Pool { tx: Some(tx), done: drx, handles, scaler, monitor }
    }

    /// Queue `task`, handling completions while the queue is full. False when the workers are gone.
    fn send(&self, task: T, on: OnEvent<'_>) -> bool {
        let Some(tx) = &self.tx else { return false };
        let mut task = task;
        loop {
            task = match tx.try_send(task) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(t)) => t,
            };
            let mut sel = Select::new();
            let s = sel.send(tx);
            let r = sel.recv(&self.done);
            let Ok(oper) = sel.select_timeout(client::KEEPALIVE) else {
                on(None);
                continue;
            };
            match oper.index() {
                i if i == s => return oper.send(tx, task).is_ok(),
                i if i == r => match oper.recv(&self.done) {
                    Ok(d) => on(Some(d)),
                    Err(_) => return false,
                },
                _ => unreachable!("two operations"),
            }
        }
    }

    /// Completions that arrived.
    fn poll(&self, on: OnEvent<'_>) {
        while let Ok(d) = self.done.try_recv() {
            on(Some(d));
        }
    }

    /// No more tasks: wait for the workers, handling their last completions. Returns the most streams that ran at
    /// once.
    fn finish(&mut self, on: OnEvent<'_>) -> usize {
        self.tx = None;
        self.scaler.finished.store(true, Ordering::Release);
        // The channel disconnects once every worker and the monitor (which stops after the last worker) are gone.
        loop {
            match self.done.recv_timeout(client::KEEPALIVE) {
                Ok(d) => on(Some(d)),
                Err(RecvTimeoutError::Timeout) => on(None),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
        self.scaler.peak.load(Ordering::Acquire)
    }
}

/// The adaptive pool's monitor: every second, sample every stream's `TCP_INFO`, let [`StreamPolicy`] choose the
/// number of streams, start the workers that are missing (retired ones notice the lower target themselves).
fn monitor<T: PoolTask>(sp: &Spawner<T>, initial: usize) {
    let scaler = &sp.scaler;
    let mut policy = StreamPolicy::new(initial.min(STREAMS_MIN), scaler.fds.len(), CHUNK);
    let started = Instant::now();
    let mut last: Vec<(RawFd, TcpStats)> = vec![(-1, TcpStats::default()); scaler.fds.len()];
    let mut total = Sample::default();
    // The RTT as the application sees it, end to end: a proxy, a tunnel or a load balancer on the way hides the
    // path's length from the kernel's RTT of our own sockets. A spare connection sends a tiny request each sample.
    let mut pinger = sp.dialer.dial().ok();
    loop {
        let until = Instant::now() + STREAMS_SAMPLE_EVERY;
        while Instant::now() < until {
            let working = scaler.alive.iter().any(|a| a.load(Ordering::Acquire));
            if !working || sp.stop.load(Ordering::Acquire) {
                // Every worker is gone (the queue closed, or the run stopped): so is the monitor, and with it its
                // sender of completions, so that the pool's channel can close.
                if let Some(conn) = pinger {
                    conn.bye();
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut rtt = Duration::ZERO;
        for (i, slot) in scaler.fds.iter().enumerate() {
            let fd = slot.load(Ordering::Acquire);
            let Some(now) = (fd >= 0).then(|| tcp_stats(fd)).flatten() else { continue };
            // A new connection on this stream counts from zero.
            let before = if last[i].0 == fd { last[i].1 } else { TcpStats::default() };
            total.bytes += now.bytes.saturating_sub(before.bytes);
            total.segments_sent += now.segments_sent.saturating_sub(before.segments_sent);
            total.segments_retransmitted += now.segments_retransmitted.saturating_sub(before.segments_retransmitted);
            rtt = rtt.max(now.rtt);
            last[i] = (fd, now);
        }
        if let Some(conn) = pinger.as_mut() {
            let sent = Instant::now();
            match conn.stat(b"") {
                Ok(_) => rtt = rtt.max(sent.elapsed()),
                Err(_) => pinger = None,
            }
        }
        total.at_secs = started.elapsed().as_secs_f64();
        total.rtt = rtt;
        let before = scaler.target();
        let wanted = policy.observe(total).min(scaler.cap.load(Ordering::Acquire));
        if wanted == before || (wanted > before && scaler.finished.load(Ordering::Acquire) && sp.rx.is_empty()) {
            // No change, or growth when every task is taken: new streams would find nothing to do.
            continue;
        }
        let bdp = policy.bdp_bytes().unwrap_or(0.0);
        let _ = sp.dtx.send(Done::Note(format!(
            "streams: {before} -> {wanted} (RTT {:.1} ms, {:.0} MB/s, bandwidth-delay product {:.1} MB)",
            rtt.as_secs_f64() * 1e3,
            policy_throughput(&policy) / 1e6,
            bdp / 1e6
        )));
        scaler.target.store(wanted, Ordering::Release);
        scaler.peak.fetch_max(wanted, Ordering::AcqRel);
        for number in 1..=wanted {
            if !scaler.alive[number - 1].load(Ordering::Acquire) {
                sp.spawn(number, None);
            }
        }
    }
}

fn policy_throughput(p: &StreamPolicy) -> f64 {
    p.throughput_bytes_per_s().unwrap_or(0.0)
}

/// One worker: tasks until the queue closes or the pool no longer wants this stream; a connection left idle is
/// kept alive. A stream the monitor added dials first, and when the server takes no more connections it retires
/// and caps the pool below itself.
fn worker<T: PoolTask>(mut stream: Stream, rx: &Receiver<T>, done: &Sender<Done>, stop: &AtomicBool, work: &Work<T>) {
    if stream.conn.is_none() {
        match stream.dialer.dial() {
            Ok(c) => stream.set_conn(Some(c)),
            Err(e) => {
                let n = stream.number;
                stream.scaler.cap.fetch_min(n - 1, Ordering::AcqRel);
                stream.scaler.target.fetch_min(n - 1, Ordering::AcqRel);
                let _ = done.send(Done::Note(format!("streams: cannot open stream {n} ({e}); staying at {}", n - 1)));
                return;
            }
        }
    }
    loop {
        if stream.number > stream.scaler.target() {
            // The pool shrank: this stream retires between tasks.
            break;
        }
        let mut tasks = match rx.recv_timeout(STREAMS_SAMPLE_EVERY.min(client::KEEPALIVE)) {
            Ok(t) => vec![t],
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                stream.keepalive();
                continue;
            }
        };
        // Small files waiting behind this one go in the same round trip; the pool's other streams take what is
        // left (the queue holds several tasks per stream).
        while tasks.len() < TASKS_PER_TURN_MAX
            && tasks.last().is_some_and(PoolTask::batchable)
            && let Ok(t) = rx.try_recv()
        {
            tasks.push(t);
        }
        if interrupt::received().is_some() {
            // Ctrl-C: the tasks in flight finish; the queued ones are dropped, here and on every other stream.
            stop.store(true, Ordering::Release);
        }
        if stop.load(Ordering::Acquire) {
            // Dropped: a pulled file's temporary goes with it (a resumable part stays for the rerun).
            continue;
        }
        if let Err(e) = work(&mut stream, tasks, done) {
            stop.store(true, Ordering::Release);
            if let StreamError::GaveUp(m) = e {
                let _ = done.send(Done::Broken(m));
            }
            return;
        }
    }
    stream.bye();
}

/// Directories with work in flight; each is finished (metadata set) once walked and with nothing pending inside.
struct Dirs<F> {
    slab: Slab<DirNode<F>>,
}

struct DirNode<F> {
    meta: F,
    pending: u64,
    walked: bool,
    parent: Option<usize>,
}

impl<F> Dirs<F> {
    fn new() -> Self {
        Dirs { slab: Slab::new() }
    }

    fn open(&mut self, parent: Option<usize>, meta: F) -> usize {
        if let Some(p) = parent {
            self.slab.get_mut(p).pending += 1;
        }
        self.slab.insert(DirNode { meta, pending: 0, walked: false, parent })
    }

    fn add(&mut self, d: Option<usize>) {
        if let Some(d) = d {
            self.slab.get_mut(d).pending += 1;
        }
    }

    /// The directory's entries were all handed out; finished directories are appended to `out`, innermost first.
    fn walked(&mut self, d: usize, out: &mut Vec<F>) {
        self.slab.get_mut(d).walked = true;
        self.settle(d, out);
    }

    fn done(&mut self, d: Option<usize>, out: &mut Vec<F>) {
        if let Some(d) = d {
            self.slab.get_mut(d).pending -= 1;
            self.settle(d, out);
        }
    }

    fn settle(&mut self, mut d: usize, out: &mut Vec<F>) {
        loop {
            let n = self.slab.get_mut(d);
            if n.pending > 0 || !n.walked {
                return;
            }
            let n = self.slab.remove(d);
            out.push(n.meta);
            match n.parent {
                Some(p) => {
                    self.slab.get_mut(p).pending -= 1;
                    d = p;
                }
                None => return,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Push: local source, remote destination
// ---------------------------------------------------------------------------------------------------------------

/// A local file to send.
struct PushFile {
    src: PathBuf,
    /// Wire path of the destination.
    remote: Vec<u8>,
    dir: Option<usize>,
    /// `-H`: the source's (dev, ino), when this is the first name of an inode with several.
    link: Option<(u64, u64)>,
}

/// `-H`: what became of an inode with several names (a push keys it by the local (dev, ino), a pull by the server's).
enum LinkState<T: Clone> {
    /// Its first name is being transferred; these names wait for it: (their destination, their parent node).
    Pending { first: T, waiters: Waiters<T> },
    /// Its first name is in place: later names are linked to it.
    Done(T),
    /// Its first name failed: later names fail too (they would only be its copies).
    Failed(T),
}

/// What to do with a name of a multiply-linked inode under `-H`.
enum LinkPlan<T> {
    /// Transfer it: it is the first name (or nothing is known).
    Transfer,
    /// Link it to the first name, which is in place.
    LinkTo(T),
    /// It waits for the first name (counted in its directory).
    Wait,
    /// The first name failed.
    FirstFailed(T),
}

/// Decide for name `me` of inode `key` (none: not multiply linked, or no `-H`); a first name is recorded as pending
/// (in a dry run as done: nothing will complete).
fn plan_link<T: Clone>(
    links: &mut HashMap<(u64, u64), LinkState<T>>,
    key: Option<(u64, u64)>,
    me: &T,
    dir: Option<usize>,
    dry_run: bool,
) -> LinkPlan<T> {
    let Some(key) = key else { return LinkPlan::Transfer };
    match links.get_mut(&key) {
        None => {
            let state = if dry_run {
                LinkState::Done(me.clone())
            } else {
                LinkState::Pending { first: me.clone(), waiters: Vec::new() }
            };
            links.insert(key, state);
            LinkPlan::Transfer
        }
        Some(LinkState::Pending { waiters, .. }) => {
            waiters.push((me.clone(), dir));
            LinkPlan::Wait
        }
        Some(LinkState::Done(first)) => LinkPlan::LinkTo(first.clone()),
        Some(LinkState::Failed(first)) => LinkPlan::FirstFailed(first.clone()),
    }
}

/// Names waiting for a first name: (their destination, their parent node).
type Waiters<T> = Vec<(T, Option<usize>)>;

/// The first name of inode `key` is done (`ok`) or failed: its waiters, and what they link to.
fn links_ready<T: Clone>(
    links: &mut HashMap<(u64, u64), LinkState<T>>,
    key: (u64, u64),
    ok: bool,
) -> Option<(T, Waiters<T>)> {
    let Some(LinkState::Pending { first, waiters }) = links.remove(&key) else { return None };
    links.insert(key, if ok { LinkState::Done(first.clone()) } else { LinkState::Failed(first.clone()) });
    Some((first, waiters))
}

/// A large file sent in ranges by several workers; the last range to finish ends the transfer.
struct BigPush {
    file: PushFile,
    fd: File,
    id: u64,
    /// The server holds ranges of an earlier run: each range is offered by digest (`PutCheck`) before it is sent.
    check_first: bool,
    /// (size, mtime) when it was opened: the source changed if they differ at the end.
    stamp: (u64, i64, i64),
    md: Metadata,
    ranges_left: AtomicUsize,
    failure: Mutex<Option<String>>,
}

enum PushTask {
    Whole(PushFile),
    Range { big: Arc<BigPush>, offset: u64, len: u64 },
}

impl PoolTask for PushTask {
    /// A push task is a name to read later: enough of them wait for a stream to fill a batch of small files.
    const QUEUED_PER_STREAM: usize = 16;

    fn batchable(&self) -> bool {
        matches!(self, PushTask::Whole(_))
    }
}

/// What push workers need to know.
struct PushCfg {
    follow: bool,
    fsync: bool,
    /// -X: extended attributes are read and sent (`PutXattrs`, `SetXattrs`).
    xattrs: bool,
}

/// A remote directory to finish: its wire path and the source's owner, permissions and mtime.
struct RemoteDir {
    remote: Vec<u8>,
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, u32),
    /// -X: the source directory's extended attributes.
    xattrs: Xattrs,
    apply: bool,
}

/// A remote directory with entries the source does not have (deleted after the transfers).
struct RemoteDelete {
    rel: Vec<u8>,
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, u32),
    names: Vec<(Vec<u8>, EntryKind)>,
}

/// One open level of the local walk.
struct PushFrame {
    iter: fs::ReadDir,
    src: PathBuf,
    rel: Vec<u8>,
    node: usize,
    mode: u32,
    owner: (u32, u32),
    mtime: (i64, u32),
    /// The remote twin's entries not yet matched by a source entry (`None`: not listed).
    remote: Option<HashMap<Vec<u8>, EntryMeta>>,
    /// The remote directory did not exist: nothing in it needs comparing.
    fresh: bool,
    key: (u64, u64),
}

struct PushCore<'a> {
    run: Run<'a>,
    addr: String,
    /// Wire path of the destination root.
    target: Vec<u8>,
    ctl: Connection,
    dirs: Dirs<RemoteDir>,
    deletes: Vec<RemoteDelete>,
    look_dst: bool,
    /// Streams the pool runs now (ranges of large files are cut for them).
    streams: Arc<Scaler>,
    /// `-H`: inodes with several names seen so far, by the local (dev, ino), with the first name's wire path.
    links: HashMap<(u64, u64), LinkState<Vec<u8>>>,
    /// Dials the control connection again when it breaks ([`PushCore::ctl_do`]).
    dialer: Arc<Dialer>,
    /// A push to this destination was interrupted (its run marker is a dead process's): every destination directory
    /// visited is cleaned of what it may have left ([`PushCore::clean_remote_dir`]).
    clean_parts: bool,
}

struct Push<'a> {
    core: PushCore<'a>,
    pool: Pool<PushTask>,
}

fn md_mtime(md: &Metadata) -> (i64, u32) {
    (md.mtime(), md.mtime_nsec() as u32)
}

fn open_src(path: &Path, follow: bool) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(if follow { libc::O_CLOEXEC } else { libc::O_NOFOLLOW | libc::O_CLOEXEC })
        .open(path)
}

fn stamp(md: &Metadata) -> (u64, i64, i64) {
    (md.size(), md.mtime(), md.mtime_nsec())
}

impl<'a> Push<'a> {
    fn run(
        src: &Path,
        remote: Remote,
        opts: &'a CopyOptions,
        net: &NetOptions,
        dialer: Arc<Dialer>,
    ) -> Result<Summary, Failure> {
        let lmd =
            fs::symlink_metadata(src).map_err(|e| Failure::Fatal(format!("cannot stat '{}': {e}", src.shown())))?;
        // The root is followed when it is a symlink to a directory, or with -L (as for a local copy).
        let md = if lmd.file_type().is_symlink() {
            match fs::metadata(src) {
                Ok(m) if m.is_dir() || opts.dereference => m,
                Ok(_) => lmd,
                Err(e) if opts.dereference => {
                    return Err(Failure::Fatal(format!("cannot follow '{}': {e}", src.shown())));
                }
                Err(_) => lmd,
            }
        } else {
            lmd
        };
        let mut ctl = dial(&dialer)?;
        if ctl.read_only && !opts.dry_run {
            return Err(Failure::Fatal(format!(
                "the server at {} is read-only (serve --read-only); nothing was written",
                remote.addr
            )));
        }
        let addr = remote.addr.clone();
        let stat = |ctl: &mut Connection, path: &[u8]| {
            ctl.stat(path).map_err(|e| match e {
                ReqError::Broken(m) => Failure::Fatal(m),
                ReqError::Server { message, .. } => {
                    Failure::Fatal(format!("cannot stat '{}': {message}", url_of(&addr, path)))
                }
            })
        };
        let base = stat(&mut ctl, &remote.path)?;
        let (target, twin) = if md.is_dir() {
            if base.as_ref().is_some_and(|b| b.kind != EntryKind::Dir) {
                return Err(Failure::Usage(format!(
                    "cannot overwrite non-directory '{}' with directory '{}'",
                    remote.display(b""),
                    src.shown()
                )));
            }
            (remote.path.clone(), base)
        } else {
            let into_dir = remote.trailing_slash
                || remote.path.is_empty()
                || base.as_ref().is_some_and(|b| b.kind == EntryKind::Dir);
            if into_dir {
                let name =
                    src.file_name().ok_or_else(|| Failure::Usage(format!("'{}' has no file name", src.shown())))?;
                let target = join(&remote.path, name.as_bytes());
                let twin = stat(&mut ctl, &target)?;
                (target, twin)
            } else {
                (remote.path.clone(), base)
            }
        };
        if !md.is_dir() && twin.as_ref().is_some_and(|t| t.kind == EntryKind::Dir) {
            return Err(Failure::Usage(format!(
                "cannot overwrite directory '{}' with non-directory '{}'",
                url_of(&remote.addr, &target),
                src.shown()
            )));
        }
        if !md.is_dir() && twin.as_ref().is_some_and(|t| t.kind == EntryKind::Other) {
            return Err(Failure::Usage(format!(
                "refusing to replace '{}', a special file (device, FIFO or socket), with '{}': name a regular file \
                 or a directory",
                url_of(&remote.addr, &target),
                src.shown()
            )));
        }
        let streams = net.streams.max(1);
        let conns = if opts.dry_run {
            Vec::new()
        } else {
            dialer.dial_n(streams).map_err(|e| Failure::Fatal(e.to_string()))?
        };
        let mut run = Run::new(opts, streams);
        run.verbose = net.verbose;
        // As a local copy does (see `stale`): a marker per destination, and cleaning after a dead run.
        let marker = if opts.dry_run {
            None
        } else {
            let dir = if md.is_dir() { target.as_slice() } else { url::parent(&target) };
            stale::RunMarker::start_for(url_of(&remote.addr, dir).as_bytes())
        };
        let clean_parts = marker.as_ref().is_some_and(|m| m.dead_runs_found());
        let cfg = Arc::new(PushCfg { follow: opts.dereference, fsync: opts.fsync, xattrs: opts.preserve.xattrs });
        let work: Arc<Work<PushTask>> = Arc::new(move |stream, tasks, done| push_tasks(stream, &cfg, tasks, done));
        let pool = Pool::start(conns, &dialer, run.stop.clone(), work, net.adaptive.then_some(net.streams_max));
        let look_dst = opts.sync.is_some() || run.itemizer.enabled;
        let mut push = Push {
            core: PushCore {
                run,
                addr: remote.addr.clone(),
                target,
                ctl,
                dirs: Dirs::new(),
                deletes: Vec::new(),
                look_dst,
                streams: pool.scaler.clone(),
                links: HashMap::new(),
                dialer: dialer.clone(),
                clean_parts,
            },
            pool,
        };
        if push.core.make_parents() && !push.core.run.halted() {
            if !md.is_dir() && clean_parts {
                let parent = url::parent(&push.core.target).to_vec();
                push.core.clean_remote_dir(&parent, None);
            }
            if md.is_dir() {
                push.walk(src, &md, twin);
            } else {
                let rel = push.core.target.rsplit(|&b| b == b'/').next().unwrap_or_default().to_vec();
                let remote_path = push.core.target.clone();
                push.entry(src, &rel, remote_path, &md, None, twin, false);
            }
        }
        let Push { mut core, mut pool } = push;
        core.run.summary.streams = pool.finish(&mut |d| core.on_event(d));
        if md.is_dir() && core.run.may_delete() {
            core.delete_pass();
        }
        let PushCore { run, ctl, .. } = core;
        ctl.bye();
        // Only an interrupted or broken run leaves partial files on the server (failed files remove theirs).
        if let Some(m) = marker.filter(|_| run.fatal.is_none() && run.interrupted.is_none())
            && interrupt::received().is_none()
        {
            m.finish();
        }
        run.finish()
    }

    /// Walk the local tree depth-first, one open directory per level.
    fn walk(&mut self, src: &Path, md: &Metadata, twin: Option<EntryMeta>) {
        let c = &mut self.core;
        let Some(root) = c.open_dir(src, b"", md, None, twin.as_ref(), false) else { return };
        let mut stack = vec![root];
        while let Some(frame) = stack.last_mut() {
            if self.core.run.halted() {
                return;
            }
            let core = &mut self.core;
            self.pool.poll(&mut |d| core.on_event(d));
            core.keepalive();
            let next = frame.iter.next();
            let entry = match next {
                None | Some(Err(_)) => {
                    if let Some(Err(e)) = next {
                        let msg = format!("cannot read directory '{}': {e}", frame.src.shown());
                        self.core.run.fail(msg);
                    }
                    let frame = stack.pop().expect("non-empty");
                    self.core.close_dir(frame);
                    continue;
                }
                Some(Ok(e)) => e,
            };
            let name = entry.file_name();
            let path = entry.path();
            let rel = join(&frame.rel, name.as_bytes());
            let twin = frame.remote.as_mut().and_then(|m| m.remove(name.as_bytes()));
            let (node, fresh) = (frame.node, frame.fresh);
            let md = if self.core.run.opts.dereference { fs::metadata(&path) } else { fs::symlink_metadata(&path) };
            let md = match md {
                Ok(md) => md,
                Err(e) => {
                    self.core.run.fail(format!("cannot stat '{}': {e}", path.shown()));
                    continue;
                }
            };
            if sync::excluded(&self.core.run.opts.filter, url::os_path(&rel), md.is_dir()) {
                self.core.run.summary.excluded += 1;
                continue;
            }
            if md.is_dir() {
                let key = (md.dev(), md.ino());
                if stack.iter().any(|f| f.key == key) {
                    self.core.run.fail(format!("symlink loop: '{}' is its own ancestor; not followed", path.shown()));
                    continue;
                }
                if let Some(f) = self.core.open_dir(&path, &rel, &md, Some(node), twin.as_ref(), fresh) {
                    stack.push(f);
                }
            } else {
                let remote = join(&self.core.target, &rel);
                self.entry(&path, &rel, remote, &md, Some(node), twin, fresh);
            }
        }
    }

    /// A non-directory entry.
    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        src: &Path,
        rel: &[u8],
        remote: Vec<u8>,
        md: &Metadata,
        dir: Option<usize>,
        twin: Option<EntryMeta>,
        fresh: bool,
    ) {
        let c = &mut self.core;
        let ft = md.file_type();
        if !(ft.is_file() || ft.is_symlink()) {
            c.run.skip_special(&src.shown().to_string());
            return;
        }
        let twin = if fresh { None } else { twin };
        let twin = match twin {
            Some(t) if t.kind == EntryKind::Dir => {
                if !c.replace_remote(&remote, true) {
                    return;
                }
                None
            }
            t => t,
        };
        if ft.is_symlink() {
            return c.symlink(src, rel, &remote, md, twin.as_ref());
        }
        if let (Some(sync), Some(t)) = (c.run.sync, twin.as_ref().filter(|t| t.kind == EntryKind::File)) {
            let local = Facts::of(md);
            match sync::verdict(sync, local, facts(t)) {
                Verdict::Unchanged => return c.unchanged(rel, &remote, md, t),
                Verdict::Skip => {
                    c.run.summary.unchanged += 1;
                    return;
                }
                Verdict::CompareDigests => {
                    // --checksum: the server hashes its copy (the control connection is free between listings).
                    let local = hash_local(open_src(src, c.run.opts.dereference));
                    let theirs = c.ctl_do(|conn| conn.hash(&remote, 0, u64::MAX));
                    match same_content(local, theirs, &src.shown().to_string(), &url_of(&c.addr, &remote)) {
                        Ok(true) => return c.unchanged(rel, &remote, md, t),
                        Ok(false) => {}
                        Err(Compared::Failed(m)) => return c.run.fail(m),
                        Err(Compared::Broken(m)) => return c.run.broken(m),
                    }
                }
                Verdict::Transfer => {}
            }
        }
        c.run.item(if twin.is_some() { Change::Update } else { Change::Copy }, rel, false);
        let key = (c.run.opts.hard_links && md.nlink() > 1).then(|| (md.dev(), md.ino()));
        match plan_link(&mut c.links, key, &remote, dir, c.run.opts.dry_run) {
            LinkPlan::Transfer => {}
            LinkPlan::Wait => return c.dirs.add(dir),
            LinkPlan::LinkTo(first) => return c.link(&remote, &first),
            LinkPlan::FirstFailed(first) => return c.link_failed(&remote, &first),
        }
        if c.run.opts.dry_run {
            c.run.summary.files += 1;
            c.run.summary.bytes += md.size();
            return;
        }
        c.run.progress.add_total(md.size());
        c.dirs.add(dir);
        let file = PushFile { src: src.to_path_buf(), remote, dir, link: key };
        if ranges(md.size(), c.streams.split_for()).is_none() {
            let core = &mut self.core;
            self.pool.send(PushTask::Whole(file), &mut |d| core.on_event(d));
            return;
        }
        // A large file: opened here, begun on the control connection, its ranges spread over the workers.
        let opened = open_src(&file.src, c.run.opts.dereference).and_then(|fd| Ok((fd.metadata()?, fd)));
        let (omd, fd) = match opened {
            Ok((m, _)) if !m.is_file() => {
                c.run.fail(format!("'{}' is no longer a regular file; not copied", src.shown()));
                return c.file_done(dir, None);
            }
            Ok(x) => x,
            Err(e) => {
                c.run.fail(format!("cannot open '{}': {e}", src.shown()));
                return c.file_done(dir, None);
            }
        };
        let parts = ranges(omd.size(), c.streams.split_for()).unwrap_or_else(|| vec![(0, omd.size())]);
        let id = next_id();
        // Resumable: what an interrupted run of this file left on the server is checked range by range.
        let (size, mode, mtime) = (omd.size(), omd.mode() & 0o7777, md_mtime(&omd));
        let mut again = false;
        let resumed = c.ctl_do(|conn| {
            // Sent again on a new connection: what the first one may have begun is dropped first.
            if std::mem::replace(&mut again, true)
                && let Err(ReqError::Broken(m)) = conn.put_abort(id)
            {
                return Err(ReqError::Broken(m));
            }
            conn.put_resume(id, &file.remote, size, mode, mtime)
        });
        let recorded = match resumed {
            Ok(bytes) => bytes,
            Err(e) => {
                let shown = url_of(&c.addr, &file.remote);
                c.run.req_failed(e, |m| format!("cannot write '{shown}': {m}"));
                return c.file_done(dir, None);
            }
        };
        let big = Arc::new(BigPush {
            file,
            fd,
            id,
            check_first: recorded > 0,
            stamp: stamp(&omd),
            md: omd,
            ranges_left: AtomicUsize::new(parts.len()),
            failure: Mutex::new(None),
        });
        for (offset, len) in parts {
            let core = &mut self.core;
            // Ctrl-C stops a large file between ranges: the ranges sent finish, the server keeps the part for a rerun.
            if core.run.halted() {
                return;
            }
            if !self.pool.send(PushTask::Range { big: big.clone(), offset, len }, &mut |d| core.on_event(d)) {
                return;
            }
        }
    }
}

impl PushCore<'_> {
    fn url(&self, wire: &[u8]) -> String {
        url_of(&self.addr, wire)
    }

    /// Run control request `op`; when its connection breaks, dial again (a fresh handshake) and send it again, up to
    /// [`STREAM_ATTEMPTS_MAX`] attempts with a warning each time. Every control request of a push can be sent twice:
    /// creating a directory or a link, setting metadata, deleting (a missing path is done), listing one directory
    /// (read whole before it is used), hashing; `PutResume` is made so by aborting its id first.
    fn ctl_do<R>(&mut self, mut op: impl FnMut(&mut Connection) -> Result<R, ReqError>) -> Result<R, ReqError> {
        let mut attempt = 1;
        loop {
            let r = op(&mut self.ctl);
            let Err(ReqError::Broken(cause)) = &r else { return r };
            if attempt >= STREAM_ATTEMPTS_MAX || self.run.stop.load(Ordering::Acquire) {
                return r;
            }
            std::thread::sleep(RETRY_BACKOFF_FIRST * 2u32.saturating_pow(attempt - 1));
            attempt += 1;
            match self.dialer.dial() {
                Ok(conn) => {
                    self.ctl = conn;
                    self.run.warn(&format!(
                        "control connection: {cause}; reconnected, trying again (attempt {attempt} of \
                         {STREAM_ATTEMPTS_MAX})"
                    ));
                }
                Err(e) => return Err(ReqError::Broken(format!("{cause}; reconnecting failed: {e}"))),
            }
        }
    }

    fn on_event(&mut self, e: Option<Done>) {
        match e {
            Some(d) => self.on_done(d),
            None => self.keepalive(),
        }
    }

    /// Keep the control connection from being dropped as idle while the workers do the work.
    fn keepalive(&mut self) {
        if self.run.fatal.is_none()
            && let Err(e) = self.ctl_do(|conn| conn.keepalive())
        {
            self.run.broken(e.to_string());
        }
    }

    /// Create the destination's parent directories (existing ones are fine). False when one failed (reported).
    fn make_parents(&mut self) -> bool {
        if self.run.opts.dry_run {
            return true;
        }
        let target = self.target.clone();
        let parts: Vec<&[u8]> = target.split(|&b| b == b'/').collect();
        let mut path = Vec::new();
        for p in parts.iter().take(parts.len().saturating_sub(1)) {
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(p);
            if let Err(e) = self.ctl_do(|conn| conn.mkdir(&path, 0o755)) {
                let shown = self.url(&path);
                self.run.req_failed(e, |m| format!("cannot create directory '{shown}': {m}"));
                return false;
            }
        }
        true
    }

    fn on_done(&mut self, d: Done) {
        match d {
            Done::Bytes(n) => {
                self.run.summary.bytes += n;
                self.run.progress.inc(n);
            }
            Done::File { dir, link, result } => {
                let ok = result.is_ok();
                match result {
                    Ok(retried) => {
                        self.run.summary.retried += u64::from(retried);
                        self.file_done(dir, Some(()));
                    }
                    Err(m) => {
                        self.run.fail(m);
                        self.file_done(dir, None);
                    }
                }
                if let Some((first, waiters)) = link.and_then(|k| links_ready(&mut self.links, k, ok)) {
                    for (remote, dir) in waiters {
                        if ok {
                            self.link(&remote, &first);
                        } else {
                            self.link_failed(&remote, &first);
                        }
                        self.file_done(dir, None);
                    }
                }
            }
            Done::Warn(m) => self.run.warn(&m),
            Done::Broken(m) => self.run.broken(m),
            Done::Note(m) => self.run.note(&m),
        }
    }

    /// `-H`: remote `path` becomes another name of `first` (already on the server).
    fn link(&mut self, path: &[u8], first: &[u8]) {
        if self.run.opts.dry_run {
            self.run.summary.hardlinks += 1;
            return;
        }
        match self.ctl_do(|conn| conn.link(path, first)) {
            Ok(()) => self.run.summary.hardlinks += 1,
            Err(e) => {
                let (shown, to) = (self.url(path), self.url(first));
                self.run.req_failed(e, |m| format!("cannot link '{shown}' to '{to}': {m}"));
            }
        }
    }

    fn link_failed(&mut self, path: &[u8], first: &[u8]) {
        let (shown, to) = (self.url(path), self.url(first));
        self.run.fail(format!("cannot link '{shown}': its first name '{to}' was not copied"));
    }

    fn file_done(&mut self, dir: Option<usize>, ok: Option<()>) {
        if ok.is_some() {
            self.run.summary.files += 1;
            self.run.progress.file_done();
        }
        let mut finished = Vec::new();
        self.dirs.done(dir, &mut finished);
        self.finish_dirs(finished);
    }

    fn finish_dirs(&mut self, finished: Vec<RemoteDir>) {
        for d in finished {
            if !d.apply || self.run.fatal.is_some() {
                continue;
            }
            if !d.xattrs.is_empty()
                && let Err(e) = self.ctl_do(|conn| conn.set_xattrs(&d.remote, d.xattrs.clone()))
            {
                let shown = self.url(&d.remote);
                self.run.req_failed(e, |m| format!("cannot set extended attributes on '{shown}': {m}"));
            }
            if let Err(e) = self.ctl_do(|conn| conn.set_meta(&d.remote, d.mode, d.owner, d.mtime)) {
                let shown = self.url(&d.remote);
                self.run.req_failed(e, |m| format!("cannot set permissions and times on '{shown}': {m}"));
            }
        }
    }

    /// The remote entries of directory `remote`, by name (`None` when it cannot be listed; reported).
    fn list_dir(&mut self, remote: &[u8]) -> Option<HashMap<Vec<u8>, EntryMeta>> {
        let mut out = HashMap::new();
        let mut refused = Vec::new();
        // The whole directory is read before any of it is used, so a listing cut short is simply asked for again.
        let listed = self.ctl_do(|conn| {
            let mut stream = conn.list(remote, false)?;
            let (mut entries, mut failed) = (Vec::new(), None);
            while let Some(r) = stream.next_entry() {
                match r {
                    Ok(e) => entries.push(e),
                    Err(ReqError::Broken(m)) => return Err(ReqError::Broken(m)),
                    Err(e) => failed = Some(e),
                }
            }
            Ok((entries, failed))
        });
        let (entries, failed) = match listed {
            Ok(l) => l,
            Err(e) => {
                self.run.broken(e.to_string());
                return None;
            }
        };
        for e in entries {
            if e.path.contains(&b'/') || safe_components(&e.path).map_or(true, |c| c.len() != 1) {
                refused.push(e.path);
            } else if !stale::is_temporary(OsStr::from_bytes(&e.path)) {
                out.insert(e.path.clone(), e);
            }
        }
        for p in refused {
            let m =
                format!("refused entry '{}' listed by {} in '{}': not a name", p.shown(), self.addr, self.url(remote));
            self.run.fail(m);
        }
        match failed {
            None => Some(out),
            Some(ReqError::Server { code: code::NOT_FOUND, .. }) => Some(HashMap::new()),
            Some(e) => {
                let shown = self.url(remote);
                self.run.req_failed(e, |m| format!("cannot list '{shown}': {m}"));
                None
            }
        }
    }

    /// Create the remote twin of a source directory and start walking it. `None` when it failed (reported).
    fn open_dir(
        &mut self,
        src: &Path,
        rel: &[u8],
        md: &Metadata,
        parent: Option<usize>,
        twin: Option<&EntryMeta>,
        parent_fresh: bool,
    ) -> Option<PushFrame> {
        let remote = join(&self.target, rel);
        let twin = if parent_fresh { None } else { twin };
        if twin.is_some_and(|t| t.kind != EntryKind::Dir) && !self.replace_remote(&remote, false) {
            return None;
        }
        let exists = twin.is_some_and(|t| t.kind == EntryKind::Dir);
        // Without a listing (a plain copy) nothing is compared: `Mkdir` accepts an existing directory.
        let fresh = parent_fresh || (self.look_dst && !exists);
        if fresh && !rel.is_empty() {
            self.run.item(Change::Mkdir, rel, true);
        }
        if !self.run.opts.dry_run
            && let Err(e) = self.ctl_do(|conn| conn.mkdir(&remote, 0o700))
        {
            let shown = self.url(&remote);
            self.run.req_failed(e, |m| format!("cannot create directory '{shown}': {m}"));
            return None;
        }
        if self.clean_parts && !fresh && !self.run.opts.dry_run {
            self.clean_remote_dir(&remote, Some(src));
        }
        let listing = if self.look_dst && !fresh { self.list_dir(&remote) } else { None };
        if self.run.fatal.is_some() {
            return None;
        }
        let iter = match fs::read_dir(src) {
            Ok(it) => it,
            Err(e) => {
                self.run.fail(format!("cannot open directory '{}': {e}", src.shown()));
                return None;
            }
        };
        let (mode, owner, mtime) = (md.mode() & 0o7777, (md.uid(), md.gid()), md_mtime(md));
        let xattrs = match self.run.opts.preserve.xattrs.then(|| crate::meta::read_xattrs(src)) {
            Some(Err(e)) => {
                self.run.fail(format!("cannot read extended attributes of '{}': {e}", src.shown()));
                Vec::new()
            }
            Some(Ok(x)) => x,
            None => Vec::new(),
        };
        let apply = !self.run.opts.dry_run;
        let node = self.dirs.open(parent, RemoteDir { remote, mode, owner, mtime, xattrs, apply });
        self.run.summary.directories += 1;
        Some(PushFrame {
            iter,
            src: src.to_path_buf(),
            rel: rel.to_vec(),
            node,
            mode,
            owner,
            mtime,
            remote: listing,
            fresh,
            key: (md.dev(), md.ino()),
        })
    }

    /// After an interrupted push: the server removes what dead processes left in `remote` (`Clean`), and the partial
    /// files there whose source file is gone from `src` (`DropParts`; `None`: a single file is pushed, whose own part
    /// the run resumes or restarts). A live transfer's files are never touched (the server knows which are live).
    fn clean_remote_dir(&mut self, remote: &[u8], src: Option<&Path>) {
        let shown = self.url(remote);
        let names = match self.ctl_do(|conn| conn.clean(remote)) {
            Ok(n) => n,
            Err(e) => return self.run.req_failed(e, |m| format!("cannot clean '{shown}': {m}")),
        };
        let Some(src) = src else { return };
        // As a local copy decides (`stale::clean_dir`): the source is a file (followed) or the part is stale.
        let gone: Vec<Vec<u8>> = names
            .into_iter()
            .filter(|n| !fs::metadata(src.join(OsStr::from_bytes(n))).is_ok_and(|m| m.is_file()))
            .collect();
        if gone.is_empty() {
            return;
        }
        match self.ctl_do(|conn| conn.drop_parts(remote, gone.clone())) {
            Ok(removed) => self.run.summary.stale_removed += removed.len() as u64,
            Err(e) => self.run.req_failed(e, |m| format!("cannot clean '{shown}': {m}")),
        }
    }

    /// Every entry of the directory was handed out: note what the remote has in excess, finish it when done.
    fn close_dir(&mut self, frame: PushFrame) {
        if self.run.delete
            && let Some(left) = frame.remote
        {
            let mut names: Vec<(Vec<u8>, EntryKind)> = left
                .into_iter()
                .filter(|(name, e)| {
                    let rel = join(&frame.rel, name);
                    !sync::excluded(&self.run.opts.filter, url::os_path(&rel), e.kind == EntryKind::Dir)
                })
                .map(|(name, e)| (name, e.kind))
                .collect();
            if !names.is_empty() {
                names.sort_by(|a, b| a.0.cmp(&b.0));
                let (rel, mode, owner, mtime) = (frame.rel.clone(), frame.mode, frame.owner, frame.mtime);
                self.deletes.push(RemoteDelete { rel, mode, owner, mtime, names });
            }
        }
        let mut finished = Vec::new();
        self.dirs.walked(frame.node, &mut finished);
        self.finish_dirs(finished);
    }

    /// Something of another type is where an entry must go: `sync --delete` removes it, otherwise it is reported.
    fn replace_remote(&mut self, remote: &[u8], for_file: bool) -> bool {
        if !self.run.delete {
            let what = if for_file { "a directory" } else { "a non-directory" };
            let m = format!(
                "cannot replace {what} at '{}' (the source has another type there; sync --delete replaces it)",
                self.url(remote)
            );
            self.run.fail(m);
            return false;
        }
        if self.run.opts.dry_run {
            return true;
        }
        match self.ctl_do(|conn| conn.delete(remote)) {
            Ok(()) => {
                self.run.summary.deleted += 1;
                true
            }
            Err(e) => {
                let shown = self.url(remote);
                self.run.req_failed(e, |m| format!("cannot delete '{shown}': {m}"));
                false
            }
        }
    }

    fn symlink(&mut self, src: &Path, rel: &[u8], remote: &[u8], md: &Metadata, twin: Option<&EntryMeta>) {
        let target = match fs::read_link(src) {
            Ok(t) => t,
            Err(e) => return self.run.fail(format!("cannot read symlink '{}': {e}", src.shown())),
        };
        let target = target.as_os_str().as_bytes();
        if self.run.sync.is_some() && twin.is_some_and(|t| t.kind == EntryKind::Symlink && t.target == target) {
            self.run.summary.unchanged += 1;
            return;
        }
        self.run.item(if twin.is_some() { Change::Update } else { Change::Copy }, rel, false);
        if self.run.opts.dry_run {
            self.run.summary.symlinks += 1;
            return;
        }
        match self.ctl_do(|conn| conn.symlink(remote, target, (md.uid(), md.gid()), md_mtime(md))) {
            Ok(()) => self.run.summary.symlinks += 1,
            Err(e) => {
                let shown = self.url(remote);
                self.run.req_failed(e, |m| format!("cannot create symlink '{shown}': {m}"));
            }
        }
    }

    /// A remote file that is already right: fix its permissions and mtime if they differ.
    fn unchanged(&mut self, rel: &[u8], remote: &[u8], md: &Metadata, twin: &EntryMeta) {
        self.run.summary.unchanged += 1;
        // -H: the inode's other names link to this one, which is in place.
        if self.run.opts.hard_links && md.nlink() > 1 {
            self.links.entry((md.dev(), md.ino())).or_insert_with(|| LinkState::Done(remote.to_vec()));
        }
        let mode = md.mode() & 0o7777;
        if mode == twin.mode && md_mtime(md) == mtime_of(twin) {
            return;
        }
        self.run.item(Change::Attrs, rel, false);
        if self.run.opts.dry_run {
            return;
        }
        match self.ctl_do(|conn| conn.set_meta(remote, mode, (md.uid(), md.gid()), md_mtime(md))) {
            Ok(()) => self.run.summary.attrs_updated += 1,
            Err(e) => {
                let shown = self.url(remote);
                self.run.req_failed(e, |m| format!("cannot set permissions and times on '{shown}': {m}"));
            }
        }
    }

    /// Count (and itemize, children first) the entries of remote directory `path` (shown as `rel`).
    fn remote_subtree(&mut self, path: &[u8], rel: &[u8], itemize: bool) -> Result<u64, ReqError> {
        let mut stream = self.ctl.list(path, true)?;
        let mut count = 0;
        // Directories being listed (pre-order): each is itemized once the listing leaves it.
        let mut open: Vec<Vec<u8>> = Vec::new();
        let mut failed = None;
        while let Some(r) = stream.next_entry() {
            let e = match r {
                Ok(e) => e,
                Err(e) => {
                    failed = Some(e);
                    continue;
                }
            };
            if safe_components(&e.path).is_err() || e.path.is_empty() {
                continue;
            }
            count += 1;
            if !itemize {
                continue;
            }
            while let Some(top) = open.last() {
                if e.path.starts_with(top) && e.path.get(top.len()) == Some(&b'/') {
                    break;
                }
                let top = open.pop().expect("non-empty");
                self.run.item(Change::Delete, &join(rel, &top), true);
            }
            if e.kind == EntryKind::Dir {
                open.push(e.path);
            } else {
                self.run.item(Change::Delete, &join(rel, &e.path), false);
            }
        }
        while let Some(top) = open.pop() {
            self.run.item(Change::Delete, &join(rel, &top), true);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// `sync --delete`: remove the remote entries the source does not have, now that every transfer succeeded.
    fn delete_pass(&mut self) {
        let recs = std::mem::take(&mut self.deletes);
        if let Some(max) = self.run.sync.and_then(|s| s.max_delete) {
            let mut count = 0;
            for rec in &recs {
                for (name, kind) in &rec.names {
                    count += 1;
                    if *kind == EntryKind::Dir {
                        let path = join(&self.target, &join(&rec.rel, name));
                        match self.remote_subtree(&path, b"", false) {
                            Ok(n) => count += n,
                            Err(e) => {
                                let shown = self.url(&path);
                                return self.run.req_failed(e, |m| format!("cannot list '{shown}': {m}"));
                            }
                        }
                    }
                }
            }
            if count > max {
                let m = format!(
                    "--max-delete {max}: {count} entries would be deleted from '{}'; nothing was deleted",
                    self.url(&self.target)
                );
                return self.run.fail(m);
            }
        }
        for rec in recs {
            for (name, kind) in &rec.names {
                let rel = join(&rec.rel, name);
                let path = join(&self.target, &rel);
                let mut n = 1;
                if *kind == EntryKind::Dir {
                    match self.remote_subtree(&path, &rel, true) {
                        Ok(k) => n += k,
                        Err(e) => {
                            let shown = self.url(&path);
                            self.run.req_failed(e, |m| format!("cannot list '{shown}': {m}"));
                            if self.run.fatal.is_some() {
                                return;
                            }
                            continue;
                        }
                    }
                }
                self.run.item(Change::Delete, &rel, *kind == EntryKind::Dir);
                if self.run.opts.dry_run {
                    self.run.summary.deleted += n;
                    continue;
                }
                match self.ctl_do(|conn| conn.delete(&path)) {
                    Ok(()) => self.run.summary.deleted += n,
                    Err(ReqError::Server { code: code::NOT_FOUND, .. }) => {}
                    Err(e) => {
                        let shown = self.url(&path);
                        self.run.req_failed(e, |m| format!("cannot delete '{shown}': {m}"));
                        if self.run.fatal.is_some() {
                            return;
                        }
                    }
                }
            }
            if !self.run.opts.dry_run {
                // The deletions changed the directory's mtime: give it back the source's.
                let path = join(&self.target, &rec.rel);
                if let Err(ReqError::Broken(m)) =
                    self.ctl_do(|conn| conn.set_meta(&path, rec.mode, rec.owner, rec.mtime))
                {
                    return self.run.broken(m);
                }
            }
        }
    }
}

/// A worker's turn: runs of whole files go together ([`push_smalls`]), ranges one by one.
fn push_tasks(
    stream: &mut Stream,
    cfg: &PushCfg,
    tasks: Vec<PushTask>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    let mut wholes = Vec::new();
    for task in tasks {
        match task {
            PushTask::Whole(f) => wholes.push(f),
            range => {
                if !wholes.is_empty() {
                    push_wholes(stream, cfg, std::mem::take(&mut wholes), done)?;
                }
                push_task(stream, cfg, range, done)?;
            }
        }
    }
    if wholes.is_empty() { Ok(()) } else { push_wholes(stream, cfg, wholes, done) }
}

/// Whole files: one alone, several in batches.
fn push_wholes(
    stream: &mut Stream,
    cfg: &PushCfg,
    files: Vec<PushFile>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    if files.len() > 1 {
        return push_smalls(stream, cfg, files, done);
    }
    files.into_iter().try_for_each(|f| push_task(stream, cfg, PushTask::Whole(f), done))
}

/// One worker task of a push.
fn push_task(stream: &mut Stream, cfg: &PushCfg, task: PushTask, done: &Sender<Done>) -> Result<(), StreamError> {
    match task {
        PushTask::Whole(f) => {
            let result = push_whole(stream, cfg, &f, done, 1)?;
            let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
        }
        PushTask::Range { big, offset, len } => {
            let failed = big.failure.lock().expect("not poisoned").is_some();
            let held = !failed && big.check_first && server_holds(stream, &big, offset, len, done)?;
            if !failed && !held {
                let url = url_of(stream.addr(), &big.file.remote);
                // Ok(false), shorter than when it was opened: the end-of-file check below says "changed".
                if let Err(m) = push_chunks(stream, &big.fd, big.id, offset, len, &url, done)? {
                    big.failure.lock().expect("not poisoned").get_or_insert(format!("cannot write '{url}': {m}"));
                }
            }
            if big.ranges_left.fetch_sub(1, Ordering::AcqRel) == 1 {
                let result = finish_big_push(stream, cfg, &big, done)?;
                let _ = done.send(Done::File { dir: big.file.dir, link: big.file.link, result });
            }
        }
    }
    Ok(())
}

/// Send `[offset, offset + len)` of `fd` as chunks of transfer `id`, one chunk per [`send_range`] call: a chunk whose
/// connection breaks is sent again on a new connection, and the chunks already acknowledged are not (the server's
/// transfer table outlives connections). `Ok(Ok(false))`: the file ended early; `Ok(Err(cause))`: this file failed.
fn push_chunks(
    stream: &mut Stream,
    fd: &File,
    id: u64,
    offset: u64,
    len: u64,
    url: &str,
    done: &Sender<Done>,
) -> Result<Result<bool, String>, StreamError> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let n = (end - at).min(CHUNK);
        let doing = Doing::push(url, &format!("the chunk at byte {at}"));
        match stream.retry(&doing, done, |conn, _| send_range(conn, fd, id, at, n, done).map_err(Broken::new))? {
            Ok(true) => at += n,
            r => return Ok(r),
        }
    }
    Ok(Ok(true))
}

/// BLAKE3 of `[offset, offset + len)` of a local file (all of it must be there).
fn hash_range(file: &File, offset: u64, len: u64) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_BYTES_MAX.min(len as usize)];
    let mut at = offset;
    while at < offset + len {
        let n = buf.len().min((offset + len - at) as usize);
        file.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

/// Whether the server already holds `[offset, offset + len)` of a resumed large file (the same BLAKE3 as the local
/// bytes); it then counts as sent. A local read error means "no": the range is sent.
fn server_holds(
    stream: &mut Stream,
    big: &BigPush,
    offset: u64,
    len: u64,
    done: &Sender<Done>,
) -> Result<bool, StreamError> {
    let Ok(digest) = hash_range(&big.fd, offset, len) else { return Ok(false) };
    let url = url_of(stream.addr(), &big.file.remote);
    let doing = Doing::push(&url, &format!("the digest of bytes {offset}..{}", offset + len));
    let held = stream.retry(&doing, done, |conn, _| split(conn.put_check(big.id, offset, len, digest)))?;
    Ok(matches!(held, Ok(true)))
}

/// The last range of a large file is done: end the transfer, or abort it (and send the file again, whole, when
/// it changed meanwhile).
fn finish_big_push(
    stream: &mut Stream,
    cfg: &PushCfg,
    big: &BigPush,
    done: &Sender<Done>,
) -> Result<Result<u8, String>, StreamError> {
    let url = url_of(stream.addr(), &big.file.remote);
    if let Some(m) = big.failure.lock().expect("not poisoned").take() {
        stream.best_effort(|c| c.put_abort(big.id));
        return Ok(Err(m));
    }
    let now = big.fd.metadata().map(|m| stamp(&m)).ok();
    if now != Some(big.stamp) {
        stream.best_effort(|c| c.put_abort(big.id));
        return Ok(push_whole(stream, cfg, &big.file, done, 2)?.map(|r| r + 1));
    }
    let xattrs = match source_xattrs(cfg, &big.file.src) {
        Ok(x) => x,
        Err(m) => {
            stream.best_effort(|c| c.put_abort(big.id));
            return Ok(Err(m));
        }
    };
    match end_transfer(stream, big.id, &big.md, &xattrs, &big.file.remote, &url, cfg.fsync, done)? {
        Ended::Done => Ok(Ok(0)),
        Ended::Failed(m) => Ok(Err(m)),
        Ended::Lost => Ok(push_whole(stream, cfg, &big.file, done, 2)?.map(|r| r + 1)),
    }
}

/// How a `PutEnd` ended.
enum Ended {
    Done,
    /// The server refused it: the failure line.
    Failed(String),
    /// Its connection broke before the answer, and on a new connection the server no longer knows the transfer while
    /// the file is not in place: it must be sent again.
    Lost,
}

/// `PutEnd` for transfer `id` of a file with metadata `md`, sent again on a new connection when its connection breaks.
/// A retry answered "unknown transfer" means the first one may have been carried out: the file counts as done when
/// the remote `path` has its size and mtime.
#[allow(clippy::too_many_arguments)]
fn end_transfer(
    stream: &mut Stream,
    id: u64,
    md: &Metadata,
    xattrs: &Xattrs,
    path: &[u8],
    url: &str,
    fsync: bool,
    done: &Sender<Done>,
) -> Result<Ended, StreamError> {
    let doing = Doing::push(url, "its last step: metadata and rename");
    stream.retry(&doing, done, |conn, attempt| {
        // -X: on the temporary, before it is renamed into place.
        if !xattrs.is_empty() {
            match split(conn.put_xattrs(id, xattrs.clone()))? {
                Ok(()) => {}
                Err(ReqError::Server { code: code::NOT_FOUND, .. }) if attempt > 1 => {}
                Err(e) => return Ok(Ended::Failed(format!("cannot set extended attributes on '{url}': {e}"))),
            }
        }
        end_once(conn, attempt, id, md, path, fsync, &doing)
    })
}

/// One `PutEnd` of [`end_transfer`].
fn end_once(
    conn: &mut Connection,
    attempt: u32,
    id: u64,
    md: &Metadata,
    path: &[u8],
    fsync: bool,
    doing: &Doing,
) -> Result<Ended, Broken> {
    let (mode, mtime) = (md.mode() & 0o7777, md_mtime(md));
    match split(conn.put_end(id, mode, md.uid(), md.gid(), mtime, fsync))? {
        Ok(()) => Ok(Ended::Done),
        Err(ReqError::Server { code: code::NOT_FOUND, .. }) if attempt > 1 => match split(conn.stat(path))? {
            Ok(Some(e)) if e.kind == EntryKind::File && e.size == md.size() && mtime_of(&e) == mtime => Ok(Ended::Done),
            _ => Ok(Ended::Lost),
        },
        Err(e) => Ok(Ended::Failed(format!("{}: {e}", doing.failed))),
    }
}

/// -X: the extended attributes of local `src` (none without -X).
fn source_xattrs(cfg: &PushCfg, src: &Path) -> Result<Xattrs, String> {
    if !cfg.xattrs {
        return Ok(Vec::new());
    }
    crate::meta::read_xattrs(src).map_err(|e| format!("cannot read extended attributes of '{}': {e}", src.shown()))
}

/// `PutAbort`, where a broken connection is the only failure that matters.
fn abort(conn: &mut Connection, id: u64) -> Result<(), Broken> {
    split(conn.put_abort(id)).map(drop)
}

/// Send `[offset, offset + len)` of `fd` as chunks of transfer `id`, the holes of a sparse file as `PutHole`.
/// `Ok(Ok(false))`: the file ended early.
fn send_range(
    conn: &mut Connection,
    fd: &File,
    id: u64,
    offset: u64,
    len: u64,
    done: &Sender<Done>,
) -> Result<Result<bool, String>, String> {
    let end = offset + len;
    let mut at = offset;
    // A sparse file's holes go as `PutHole`, and a chunk stops where the next hole starts.
    let mut walker = sparse::Walker::for_file(fd);
    while at < end {
        let data_end = match walker.as_mut().map(|w| w.next(at, end)) {
            Some(Piece::Hole(hole_end)) => {
                match conn.put_hole(id, at, hole_end - at) {
                    Ok(()) => {}
                    Err(ReqError::Broken(m)) => return Err(m),
                    Err(ReqError::Server { message, .. }) => return Ok(Err(message)),
                }
                let _ = done.send(Done::Bytes(hole_end - at));
                at = hole_end;
                continue;
            }
            Some(Piece::Data(data_end)) => data_end,
            None => end,
        };
        let n = (data_end - at).min(CHUNK) as usize;
        // Read and sent through a buffer, or hashed from the page cache and sent with sendfile (FASTSYNC_ZEROCOPY).
        let got = match zerocopy::put_chunk(conn, id, at, fd, n) {
            Ok(0) => return Ok(Ok(false)),
            Ok(k) => k,
            Err(PutError::Read(e)) => return Ok(Err(format!("read error: {e}"))),
            Err(PutError::Req(ReqError::Broken(m))) => return Err(m),
            Err(PutError::Req(ReqError::Server { message, .. })) => return Ok(Err(message)),
        };
        let _ = done.send(Done::Bytes(got as u64));
        at += got as u64;
        if got < n {
            return Ok(Ok(false));
        }
    }
    Ok(Ok(true))
}

/// Files up to this size are sent in one round trip (`PutBegin`, `PutData`, `PutEnd` pipelined) instead of three.
const PIPELINED_FILE_BYTES_MAX: u64 = 1 << 20;

/// What [`push_small`] did.
enum Small {
    Done,
    Failed(String),
    /// Too large, changed while read, or a retryable answer: use the step-by-step path.
    StepByStep,
}

/// A small file read whole and its requests ready: `PutBegin`, `PutData` (when not empty), `PutXattrs` (with -X and
/// some), `PutEnd`, all for one transfer id.
struct SmallFile {
    msgs: Vec<Msg>,
    bytes: u64,
}

impl SmallFile {
    /// Read `f` whole and build its requests as transfer `id`; `None` when it is too large, changed while read, or
    /// cannot be read here (the step-by-step path then retries, or says why).
    fn read(cfg: &PushCfg, f: &PushFile, id: u64) -> Option<SmallFile> {
        use std::io::Read;
        let fd = open_src(&f.src, cfg.follow).ok()?;
        let md = fd.metadata().ok().filter(|m| m.is_file() && m.size() <= PIPELINED_FILE_BYTES_MAX)?;
        let mut bytes = Vec::with_capacity(md.size() as usize);
        // One byte more than expected shows a file that grew.
        if (&fd).take(md.size() + 1).read_to_end(&mut bytes).is_err()
            || bytes.len() as u64 != md.size()
            || fd.metadata().map(|m| stamp(&m)).ok() != Some(stamp(&md))
        {
            return None;
        }
        let len = bytes.len() as u64;
        let mut msgs = vec![Msg::PutBegin { id, path: f.remote.clone(), size: len, mode: md.mode() & 0o7777 }];
        if !bytes.is_empty() {
            msgs.push(Msg::PutData { id, offset: 0, digest: *blake3::hash(&bytes).as_bytes(), bytes });
        }
        match source_xattrs(cfg, &f.src) {
            Ok(xattrs) if !xattrs.is_empty() => msgs.push(Msg::PutXattrs { id, xattrs }),
            Ok(_) => {}
            Err(_) => return None,
        }
        let (mtime_sec, mtime_nsec) = md_mtime(&md);
        msgs.push(Msg::PutEnd {
            id,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime_sec,
            mtime_nsec,
            fsync: cfg.fsync,
        });
        Some(SmallFile { msgs, bytes: len })
    }

    /// The transfer id its requests carry.
    fn id(&self) -> u64 {
        match self.msgs[0] {
            Msg::PutBegin { id, .. } => id,
            _ => unreachable!("a small file's requests start with PutBegin"),
        }
    }

    /// Carry transfer `new` instead (a retry on a new connection, after the old transfer was aborted).
    fn renumber(&mut self, new: u64) {
        for m in &mut self.msgs {
            match m {
                Msg::PutBegin { id, .. }
                | Msg::PutData { id, .. }
                | Msg::PutXattrs { id, .. }
                | Msg::PutEnd { id, .. } => *id = new,
                _ => {}
            }
        }
    }

    /// What the server's answers to its requests mean (the group's result from [`Connection::pipeline_groups`]).
    /// A failed later request leaves a transfer to abort (`Err(id)`), then the step-by-step path.
    fn outcome(&self, answer: Result<(), (usize, ReqError)>, url: &str) -> Result<Small, u64> {
        match answer {
            Ok(()) => Ok(Small::Done),
            // The server could not even create the temporary: the step-by-step path would fail the same way.
            Err((0, ReqError::Server { message, .. })) => Ok(Small::Failed(format!("cannot write '{url}': {message}"))),
            Err(_) => Err(self.id()),
        }
    }
}

/// Files of one batch at most: answers to a batch's requests wait in the socket until all are written.
const SMALL_BATCH_FILES_MAX: usize = 64;

/// Bytes of small files read for one batch at most (one more file may pass it): within what a stream may hold
/// ([`crate::net::server::CONNECTION_BYTES_MAX`] is what each stream is given of the memory limit).
const SMALL_BATCH_BYTES_MAX: u64 = 3 << 20;

/// Send small files in as few round trips as possible: up to [`SMALL_BATCH_FILES_MAX`] files (and
/// [`SMALL_BATCH_BYTES_MAX`] bytes) read whole, all their requests sent back to back, then all the answers read.
/// On a stream with a queue of small files this replaces one round trip (and a sleep and a wake-up on each side)
/// per file by one per batch. A connection that breaks is dialled again and the files not yet answered are sent
/// again under new transfer ids (the old ones aborted). A file that cannot go this way — too large, changed while
/// read, refused past its first request — takes [`push_whole`]'s path on its own. One [`Done::File`] per file.
fn push_smalls(
    stream: &mut Stream,
    cfg: &PushCfg,
    files: Vec<PushFile>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    let mut queue = files.into_iter().peekable();
    while queue.peek().is_some() {
        let mut batch: Vec<(PushFile, Option<SmallFile>)> = Vec::new();
        let mut bytes = 0;
        while batch.len() < SMALL_BATCH_FILES_MAX
            && bytes < SMALL_BATCH_BYTES_MAX
            && let Some(f) = queue.next()
        {
            let small = SmallFile::read(cfg, &f, next_id());
            bytes += small.as_ref().map_or(0, |s| s.bytes);
            batch.push((f, small));
        }
        let mut answers: Vec<Option<Result<(), (usize, ReqError)>>> = (0..batch.len()).map(|_| None).collect();
        let first_url = url_of(stream.addr(), &batch[0].0.remote);
        let doing = Doing::push(&first_url, &format!("with {} more small files in one round trip", batch.len() - 1));
        stream.retry(&doing, done, |conn, attempt| {
            let waiting: Vec<usize> =
                (0..batch.len()).filter(|&i| batch[i].1.is_some() && answers[i].is_none()).collect();
            if attempt > 1 {
                // The broken try may have left these transfers on the server.
                for &i in &waiting {
                    let small = batch[i].1.as_mut().expect("waiting files were read");
                    abort(conn, small.id())?;
                    small.renumber(next_id());
                }
            }
            let groups: Vec<&[Msg]> =
                waiting.iter().map(|&i| batch[i].1.as_ref().expect("read").msgs.as_slice()).collect();
            let (got, broke) = conn.pipeline_groups(&groups);
            for (&i, answer) in waiting.iter().zip(got) {
                answers[i] = Some(answer);
            }
            match broke {
                Some((_, ReqError::Broken(m))) => Err(Broken::new(m)),
                // An answer out of step is a broken connection too (`pipeline_groups` reports it as such).
                Some((_, other)) => Err(Broken::new(other.cause().to_string())),
                None => Ok(()),
            }
        })?;
        let mut aborts = Vec::new();
        let mut one_by_one = Vec::new();
        for ((f, small), answer) in batch.into_iter().zip(answers) {
            let url = url_of(stream.addr(), &f.remote);
            let outcome = match (&small, answer) {
                (Some(s), Some(a)) => s.outcome(a, &url),
                _ => Ok(Small::StepByStep),
            };
            match outcome {
                Ok(Small::Done) => {
                    let _ = done.send(Done::Bytes(small.map_or(0, |s| s.bytes)));
                    let _ = done.send(Done::File { dir: f.dir, link: f.link, result: Ok(0) });
                }
                Ok(Small::Failed(line)) => {
                    let _ = done.send(Done::File { dir: f.dir, link: f.link, result: Err(line) });
                }
                Ok(Small::StepByStep) => one_by_one.push(f),
                Err(id) => {
                    aborts.push(id);
                    one_by_one.push(f);
                }
            }
        }
        for id in aborts {
            stream.best_effort(|c| c.put_abort(id));
        }
        for f in one_by_one {
            let result = push_whole(stream, cfg, &f, done, 1)?;
            let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
        }
    }
    Ok(())
}

/// Send a small file in one round trip as transfer `id` ([`SmallFile`]); anything unusual (a damaged chunk, a file
/// that changed) falls back to the step-by-step path, which retries.
fn push_small(
    conn: &mut Connection,
    cfg: &PushCfg,
    f: &PushFile,
    done: &Sender<Done>,
    id: u64,
) -> Result<Small, Broken> {
    let Some(small) = SmallFile::read(cfg, f, id) else { return Ok(Small::StepByStep) };
    let url = url_of(conn.addr(), &f.remote);
    match conn.pipeline_ok(&small.msgs) {
        Err((_, ReqError::Broken(m))) => Err(Broken::new(m)),
        answer => match small.outcome(answer, &url) {
            Ok(Small::Done) => {
                let _ = done.send(Done::Bytes(small.bytes));
                Ok(Small::Done)
            }
            Ok(other) => Ok(other),
            Err(id) => {
                abort(conn, id)?;
                Ok(Small::StepByStep)
            }
        },
    }
}

/// Send one file whole, retrying when it changes while it is read (and each request when its connection breaks).
/// `Ok(Ok(retries))`, `Ok(Err(line))` for a failure of this file, `Err` when the stream gave up or the run stops.
fn push_whole(
    stream: &mut Stream,
    cfg: &PushCfg,
    f: &PushFile,
    done: &Sender<Done>,
    first: u8,
) -> Result<Result<u8, String>, StreamError> {
    let url = url_of(stream.addr(), &f.remote);
    let mut attempt = first;
    let mut id = next_id();
    let small = stream.retry(&Doing::push(&url, "the whole file in one round trip"), done, |conn, n| {
        if n > 1 {
            // The broken try may have left its transfer on the server.
            abort(conn, id)?;
            id = next_id();
        }
        push_small(conn, cfg, f, done, id)
    })?;
    match small {
        Small::Done => return Ok(Ok(0)),
        Small::Failed(line) => return Ok(Err(line)),
        Small::StepByStep => {}
    }
    loop {
        let fd = match open_src(&f.src, cfg.follow) {
            Ok(fd) => fd,
            Err(e) => return Ok(Err(format!("cannot open '{}': {e}", f.src.shown()))),
        };
        let md = match fd.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(Err(format!("'{}' is no longer a regular file; not copied", f.src.shown()))),
            Err(e) => return Ok(Err(format!("cannot stat '{}': {e}", f.src.shown()))),
        };
        let mut id = next_id();
        let begun = stream.retry(&Doing::push(&url, "its first step: the temporary"), done, |conn, n| {
            if n > 1 {
                abort(conn, id)?;
                id = next_id();
            }
            split(conn.put_begin(id, &f.remote, md.size(), md.mode() & 0o7777))
        })?;
        if let Err(e) = begun {
            return Ok(Err(format!("cannot write '{url}': {e}")));
        }
        let complete = match push_chunks(stream, &fd, id, 0, md.size(), &url, done)? {
            Ok(c) => c,
            Err(m) => {
                stream.best_effort(|c| c.put_abort(id));
                return Ok(Err(format!("cannot write '{url}': {m}")));
            }
        };
        let changed = !complete || fd.metadata().map(|m| stamp(&m)).ok() != Some(stamp(&md));
        if changed {
            stream.best_effort(|c| c.put_abort(id));
            if attempt < SOURCE_ATTEMPTS_MAX {
                attempt += 1;
                continue;
            }
            return Ok(Err(format!(
                "source changed while copying '{}': its size or mtime changed while it was read (it kept changing \
                 during {SOURCE_ATTEMPTS_MAX} attempts)",
                f.src.shown()
            )));
        }
        let xattrs = match source_xattrs(cfg, &f.src) {
            Ok(x) => x,
            Err(m) => {
                stream.best_effort(|c| c.put_abort(id));
                return Ok(Err(m));
            }
        };
        match end_transfer(stream, id, &md, &xattrs, &f.remote, &url, cfg.fsync, done)? {
            Ended::Done => return Ok(Ok(attempt - first)),
            Ended::Failed(m) => return Ok(Err(m)),
            Ended::Lost if attempt < SOURCE_ATTEMPTS_MAX => attempt += 1,
            Ended::Lost => {
                return Ok(Err(format!(
                    "cannot write '{url}': the server lost the transfer with its connection {SOURCE_ATTEMPTS_MAX} times"
                )));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Pull: remote source, local destination
// ---------------------------------------------------------------------------------------------------------------

/// `*at` system calls relative to directory descriptors, never following a final symlink.
mod at {
    use std::ffi::{CStr, CString};
    use std::fs::File;
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};

    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// `lstat` of `name` in `dir`; `None` when nothing is there.
    pub fn lstat(dir: RawFd, name: &CStr) -> io::Result<Option<libc::stat>> {
        // SAFETY: zeroed stat is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor, C string and pointer.
        match check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) }) {
            Ok(()) => Ok(Some(st)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn kind(st: &libc::stat) -> libc::mode_t {
        st.st_mode & libc::S_IFMT
    }

    pub fn mkdir(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: valid descriptor and C string.
        check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) })
    }

    fn own(fd: libc::c_int) -> io::Result<OwnedFd> {
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Open directory `name` in `dir`; a symlink there fails (ELOOP/ENOTDIR).
    pub fn open_dir(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and C string.
        own(unsafe { libc::openat(dir, name.as_ptr(), flags) })
    }

    /// Create `name` in `dir`, which must not exist (no symlink is followed).
    pub fn create_new(dir: RawFd, name: &CStr) -> io::Result<File> {
        // Read-write: the zero-copy path reads spliced chunks back to check their digests.
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and C string.
        let fd = own(unsafe { libc::openat(dir, name.as_ptr(), flags, 0o600 as libc::c_uint) })?;
        Ok(File::from(fd))
    }

    /// Open (`create`: or create) the resumable temporary `name` in `dir` for reading and writing (a symlink there
    /// fails).
    pub fn open_part(dir: RawFd, name: &CStr, create: bool) -> io::Result<File> {
        let flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC | if create { libc::O_CREAT } else { 0 };
        // SAFETY: valid descriptor and C string.
        let fd = own(unsafe { libc::openat(dir, name.as_ptr(), flags, 0o600 as libc::c_uint) })?;
        Ok(File::from(fd))
    }

    /// Open regular file `name` in `dir` to change its metadata (a symlink there fails).
    pub fn open_file(dir: RawFd, name: &CStr) -> io::Result<File> {
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC;
        // SAFETY: valid descriptor and C string.
        Ok(File::from(own(unsafe { libc::openat(dir, name.as_ptr(), flags) })?))
    }

    pub fn rename(dir: RawFd, from: &CStr, to: &CStr) -> io::Result<()> {
        // SAFETY: valid descriptor and C strings.
        check(unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) })
    }

    pub fn unlink(dir: RawFd, name: &CStr, is_dir: bool) -> io::Result<()> {
        let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: valid descriptor and C string.
        check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) })
    }

    pub fn symlink(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
        // SAFETY: valid descriptor and C strings.
        check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) })
    }

    pub fn readlink(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::readlinkat(dir, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    fn eperm_ok(r: io::Result<()>) -> io::Result<()> {
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
            r => r,
        }
    }

    /// Owner of symlink `name` in `dir` (not followed); refused (not permitted) is not an error, as for a copy.
    pub fn lchown(dir: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: valid descriptor and C string.
        eperm_ok(check(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) }))
    }

    fn times(mtime: (i64, u32)) -> [libc::timespec; 2] {
        [
            libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            libc::timespec { tv_sec: mtime.0 as libc::time_t, tv_nsec: mtime.1 as _ },
        ]
    }

    /// mtime of `name` in `dir`, not following a symlink (the access time is left alone).
    pub fn set_mtime_at(dir: RawFd, name: &CStr, mtime: (i64, u32)) -> io::Result<()> {
        let ts = times(mtime);
        // SAFETY: valid descriptor, C string and timespec array.
        check(unsafe { libc::utimensat(dir, name.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
    }

    /// Owner (where permitted), permission bits and mtime of an open file or directory, in that order (`chown`
    /// clears the set-user-ID bit, so the mode comes after it).
    pub fn apply(fd: RawFd, owner: Option<(u32, u32)>, mode: u32, mtime: (i64, u32)) -> io::Result<()> {
        if let Some((uid, gid)) = owner {
            // SAFETY: plain syscall on a valid descriptor.
            eperm_ok(check(unsafe { libc::fchown(fd, uid, gid) }))?;
        }
        // SAFETY: plain syscall on a valid descriptor.
        check(unsafe { libc::fchmod(fd, (mode & 0o7777) as libc::mode_t) })?;
        let ts = times(mtime);
        // SAFETY: valid descriptor and timespec array.
        check(unsafe { libc::futimens(fd, ts.as_ptr()) })
    }

    pub fn fsync(fd: RawFd) -> io::Result<()> {
        // SAFETY: plain syscall.
        check(unsafe { libc::fsync(fd) })
    }

    /// The names in open directory `dir` (not `.` and `..`), each with whether it is a directory (not followed).
    pub fn names(dir: RawFd) -> io::Result<Vec<(CString, bool)>> {
        // SAFETY: duplicating a valid descriptor; the duplicate is owned by the DIR stream below.
        let dup = unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is ours; on success the stream owns it, on failure we close it.
        let stream = unsafe { libc::fdopendir(dup) };
        if stream.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: closing our own duplicate.
            unsafe { libc::close(dup) };
            return Err(e);
        }
        let mut out = Vec::new();
        // SAFETY: a valid stream, read until it ends, then closed once.
        unsafe {
            libc::rewinddir(stream);
            loop {
                let ent = libc::readdir(stream);
                if ent.is_null() {
                    break;
                }
                let name = CStr::from_ptr((*ent).d_name.as_ptr());
                if name.to_bytes() == b"." || name.to_bytes() == b".." {
                    continue;
                }
                let is_dir = match (*ent).d_type {
                    libc::DT_DIR => true,
                    libc::DT_UNKNOWN => lstat(dir, name).ok().flatten().is_some_and(|st| kind(&st) == libc::S_IFDIR),
                    _ => false,
                };
                out.push((name.to_owned(), is_dir));
            }
            libc::closedir(stream);
        }
        Ok(out)
    }
}

/// The temporary name `.NAME.fstmp-PID-N` for final name `name`.
fn tmp_name(name: &CStr) -> CString {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed) + 1;
    let tmp = stale::unique(Path::new(OsStr::from_bytes(name.to_bytes())), seq);
    CString::new(tmp.as_os_str().as_bytes()).expect("no NUL in a name")
}

/// A temporary file beside its final name; removed when dropped unless it was renamed into place, or it is a
/// resumable part kept for the next run.
struct TempFile {
    dir: Arc<OwnedFd>,
    /// The temporary name: the file itself, or, when `unnamed`, a name kept for the case where the final name was
    /// taken meanwhile (the file is then linked here and renamed over it).
    name: CString,
    /// Created with no name (`O_TMPFILE`); linked to the final name by `commit`.
    unnamed: bool,
    file: File,
    /// An O_DIRECT descriptor on `file`, for a large file ([`DirectFile`]).
    direct: Option<DirectFile>,
    committed: AtomicBool,
    /// Left in place when dropped uncommitted (a resumable part after an interruption or a lost server).
    keep: AtomicBool,
}

/// A resumable large file of a pull: its stable temporary, its journal, and the ranges an earlier run recorded.
struct Resumable {
    tmp: TempFile,
    journal: Journal,
    recorded: Recorded,
}

/// The ranges an earlier run recorded, by their first byte: the longest recorded from each offset (a range that
/// was interrupted records the part it received, and a later run may record the whole).
type Recorded = HashMap<u64, u64>;

impl TempFile {
    /// A private temporary for `final_name`: unnamed where the filesystem allows (nothing left behind if this
    /// process dies, one directory operation per file), else a named one.
    fn create(dir: &Arc<OwnedFd>, final_name: &CStr) -> io::Result<TempFile> {
        let name = tmp_name(final_name);
        let (file, unnamed) = match fastsync_engine::finish::create_unnamed_at(dir.as_fd(), 0o600) {
            Some(fd) => (File::from(fd), true),
            None => (at::create_new(dir.as_raw_fd(), &name)?, false),
        };
        let (committed, keep) = (AtomicBool::new(false), AtomicBool::new(false));
        Ok(TempFile { dir: dir.clone(), name, unnamed, file, direct: None, committed, keep })
    }

    /// Received chunks of a file of `size` bytes go through O_DIRECT when `on` and the file is large enough.
    fn direct_for(mut self, size: u64, on: bool) -> TempFile {
        self.direct = if on { DirectFile::open(&self.file, size) } else { None };
        self
    }

    /// The resumable temporary (`.NAME.fstmp-part`) and journal (`.NAME.fstmp-journal`) of a large file, as for a
    /// local copy: what an earlier, interrupted run of the same remote file (same size and mtime) recorded is kept;
    /// otherwise both start empty. `None` when another run holds the journal or it cannot be used here: the caller
    /// falls back to a private temporary.
    fn resumable(dir: &Arc<OwnedFd>, final_name: &CStr, meta: &EntryMeta) -> io::Result<Option<Resumable>> {
        if !cfg!(target_os = "linux") {
            return Ok(None);
        }
        let final_path = Path::new(OsStr::from_bytes(final_name.to_bytes()));
        let base = |p: PathBuf| CString::new(p.as_os_str().as_bytes()).expect("no NUL in a name");
        let (part, journal) = (base(stale::part(final_path)), base(stale::journal(final_path)));
        // The journal is opened by path through the directory's descriptor: it stays beneath the destination.
        let at_dir = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        let jpath = at_dir.join(OsStr::from_bytes(journal.to_bytes()));
        let mtime = Timestamp { sec: meta.mtime_sec, nsec: i64::from(meta.mtime_nsec) };
        let source = SourceId { size: meta.size, mtime, ino: 0 };
        let (journal, recorded) = match Journal::open(&jpath, source, CHUNK) {
            Ok(Opened::Resume(j, rec)) => (j, rec.ranges),
            Ok(Opened::Fresh(j)) => (j, Vec::new()),
            Ok(Opened::Busy) | Err(_) => return Ok(None),
        };
        let file = match (recorded.is_empty(), at::open_part(dir.as_raw_fd(), &part, false)) {
            (false, Ok(f)) => f,
            _ => {
                let f = at::open_part(dir.as_raw_fd(), &part, true)?;
                f.set_len(0)?;
                f
            }
        };
        file.set_len(meta.size)?;
        let tmp = TempFile {
            dir: dir.clone(),
            name: part,
            unnamed: false,
            file,
            direct: None,
            committed: AtomicBool::new(false),
            keep: AtomicBool::new(true),
        };
        let mut longest = Recorded::new();
        for (offset, len) in recorded {
            let n = longest.entry(offset).or_insert(0);
            *n = (*n).max(len);
        }
        Ok(Some(Resumable { tmp, journal, recorded: longest }))
    }

    /// Put the complete file under `final_name`: link the unnamed file there, or rename the temporary over
    /// whatever is there (an unnamed file whose name was taken meanwhile is linked to its temporary name first).
    fn commit(&self, final_name: &CStr) -> io::Result<()> {
        if self.unnamed {
            fastsync_engine::finish::place_unnamed_at(self.file.as_fd(), self.dir.as_fd(), final_name, &self.name)?;
        } else {
            at::rename(self.dir.as_raw_fd(), &self.name, final_name)?;
        }
        self.committed.store(true, Ordering::Release);
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.unnamed && !self.committed.load(Ordering::Acquire) && !self.keep.load(Ordering::Acquire) {
            let _ = at::unlink(self.dir.as_raw_fd(), &self.name, false);
        }
    }
}

/// A remote file to fetch into directory `dir_fd`.
struct PullFile {
    dir_fd: Arc<OwnedFd>,
    name: CString,
    remote: Vec<u8>,
    shown: PathBuf,
    meta: EntryMeta,
    dir: Option<usize>,
    /// `-H`: the server's (dev, ino), when this is the first name of an inode with several.
    link: Option<(u64, u64)>,
}

/// A local name of a pulled file: its directory, its name there, and how it is shown.
#[derive(Clone)]
struct LocalName {
    dir: Arc<OwnedFd>,
    name: CString,
    shown: PathBuf,
}

/// A large file fetched in ranges by several workers into one temporary; the last range to finish ends it.
struct BigPull {
    file: PullFile,
    tmp: TempFile,
    /// Resumable: the journal, and the ranges an earlier run recorded (compared by digest before they are reused).
    journal: Option<Journal>,
    recorded: Recorded,
    ranges_left: AtomicUsize,
    failure: Mutex<Option<String>>,
    changed: AtomicBool,
}

impl BigPull {
    /// The file failed for good, or changed: its temporary and journal are of no use to a later run.
    fn discard(&self) {
        self.tmp.keep.store(false, Ordering::Release);
        if let Some(j) = &self.journal {
            j.remove();
        }
    }
}

enum PullTask {
    Whole(PullFile),
    Range { big: Arc<BigPull>, offset: u64, len: u64 },
}

impl PoolTask for PullTask {
    /// A pull task is a name to fetch later (its temporary is made when it is fetched).
    const QUEUED_PER_STREAM: usize = 16;

    fn batchable(&self) -> bool {
        matches!(self, PullTask::Whole(f) if f.meta.size <= PIPELINED_FILE_BYTES_MAX)
    }
}

struct PullCfg {
    fsync: bool,
    /// -X: extended attributes are fetched (`GetXattrs`) and set.
    xattrs: bool,
    /// Large files are written with O_DIRECT.
    direct_io: bool,
    id: Identity,
}

impl PullCfg {
    /// The owner to set: the source's, unless the new file has it already.
    fn owner(&self, e: &EntryMeta) -> Option<(u32, u32)> {
        ((e.uid, e.gid) != (self.id.euid, self.id.egid)).then_some((e.uid, e.gid))
    }
}

/// A local directory to finish with the remote one's metadata.
struct LocalDir {
    fd: Option<Arc<OwnedFd>>,
    shown: PathBuf,
    meta: EntryMeta,
}

/// A local directory with entries the remote one does not have (deleted after the transfers).
struct LocalDelete {
    rel: Vec<u8>,
    mtime: (i64, u32),
    names: Vec<(CString, bool)>,
}

/// A directory of the listing being received.
struct PullFrame {
    rel: Vec<u8>,
    fd: Option<Arc<OwnedFd>>,
    /// `None`: the directory could not be made; what the listing has inside it is ignored.
    node: Option<usize>,
    fresh: bool,
    /// Names the listing has here (with `--delete`).
    names: Option<HashSet<Vec<u8>>>,
    mtime: (i64, u32),
}

struct PullCore<'a> {
    run: Run<'a>,
    addr: String,
    /// Wire path listed.
    base: Vec<u8>,
    /// Local destination (the root directory, or the file's path).
    dst: PathBuf,
    dirs: Dirs<LocalDir>,
    deletes: Vec<LocalDelete>,
    cfg: Arc<PullCfg>,
    /// Streams the pool runs now (ranges of large files are cut for them).
    streams: Arc<Scaler>,
    dialer: Arc<Dialer>,
    /// `sync --checksum`: the connection that asks for digests, dialled when first needed.
    hash_conn: Option<Connection>,
    /// `-H`: inodes with several names seen so far, by the server's (dev, ino), with the first name.
    links: HashMap<(u64, u64), LinkState<LocalName>>,
}

struct Pull<'a> {
    core: PullCore<'a>,
    pool: Pool<PullTask>,
}

/// Which directory an entry goes into.
struct Parent {
    fd: Option<Arc<OwnedFd>>,
    node: Option<usize>,
    fresh: bool,
}

impl<'a> Pull<'a> {
    fn run(
        remote: Remote,
        dst: &Path,
        opts: &'a CopyOptions,
        net: &NetOptions,
        dialer: Arc<Dialer>,
    ) -> Result<Summary, Failure> {
        let mut ctl = dial(&dialer)?;
        let shown_root = remote.display(b"");
        let root = match ctl.stat(&remote.path) {
            Ok(Some(e)) => e,
            Ok(None) => return Err(Failure::Fatal(format!("cannot stat '{shown_root}': no such file or directory"))),
            Err(ReqError::Broken(m)) => return Err(Failure::Fatal(m)),
            Err(e) => return Err(Failure::Fatal(format!("cannot stat '{shown_root}': {}", e.cause()))),
        };
        let dst_md = fs::metadata(dst).ok();
        let streams = net.streams.max(1);
        let io_fatal = |what: &str, p: &Path, e: io::Error| Failure::Fatal(format!("{what} '{}': {e}", p.shown()));
        // The destination rule, as for a local copy.
        let (target, parent_dir) = if root.kind == EntryKind::Dir {
            if dst_md.as_ref().is_some_and(|m| !m.is_dir()) {
                return Err(Failure::Usage(format!(
                    "cannot overwrite non-directory '{}' with directory '{shown_root}'",
                    dst.shown()
                )));
            }
            (dst.to_path_buf(), dst.to_path_buf())
        } else {
            let into_dir = dst_md.as_ref().is_some_and(|m| m.is_dir()) || dst.as_os_str().as_bytes().ends_with(b"/");
            let target = if into_dir {
                let name = url::file_name(&remote.path);
                if name.is_empty() {
                    return Err(Failure::Usage(format!("'{shown_root}' has no file name")));
                }
                dst.join(OsStr::from_bytes(name))
            } else {
                dst.to_path_buf()
            };
            if let Ok(there) = fs::symlink_metadata(&target) {
                if there.is_dir() {
                    return Err(Failure::Usage(format!(
                        "cannot overwrite directory '{}' with non-directory '{shown_root}'",
                        target.shown()
                    )));
                }
                if let Some(m) = crate::meta::refuse_special_target(&target, &there, &shown_root) {
                    return Err(Failure::Usage(m));
                }
            }
            let parent = match target.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (target, parent)
        };
        let existed = parent_dir.is_dir();
        if !opts.dry_run {
            crate::meta::make_dirs(&parent_dir).map_err(|e| io_fatal("cannot create directory", &parent_dir, e))?;
        }
        let root_fd = if opts.dry_run && !existed {
            None
        } else {
            let r = Root::open(&parent_dir).map_err(|e| io_fatal("cannot open directory", &parent_dir, e))?;
            Some(Arc::new(r.dir(b"").map_err(|e| io_fatal("cannot open directory", &parent_dir, e))?))
        };
        let conns = if opts.dry_run {
            Vec::new()
        } else {
            dialer.dial_n(streams).map_err(|e| Failure::Fatal(e.to_string()))?
        };
        let mut run = Run::new(opts, streams);
        run.verbose = net.verbose;
        let cfg = Arc::new(PullCfg {
            fsync: opts.fsync,
            xattrs: opts.preserve.xattrs,
            direct_io: opts.direct_io,
            id: run.id,
        });
        let wcfg = cfg.clone();
        let work: Arc<Work<PullTask>> = Arc::new(move |stream, tasks, done| pull_tasks(stream, &wcfg, tasks, done));
        let pool = Pool::start(conns, &dialer, run.stop.clone(), work, net.adaptive.then_some(net.streams_max));
        let mut pull = Pull {
            core: PullCore {
                run,
                addr: remote.addr.clone(),
                base: remote.path.clone(),
                dst: target.clone(),
                dirs: Dirs::new(),
                deletes: Vec::new(),
                cfg,
                streams: pool.scaler.clone(),
                dialer: dialer.clone(),
                hash_conn: None,
                links: HashMap::new(),
            },
            pool,
        };
        if root.kind == EntryKind::Dir {
            pull.walk(&mut ctl, root_fd, root, !existed);
        } else {
            let name = target.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
            let parent = Parent { fd: root_fd, node: None, fresh: !existed };
            let mut e = root;
            e.path = name.clone();
            pull.entry_in(&parent, &name, &name, e, Some(remote.path.clone()));
        }
        let Pull { mut core, mut pool } = pull;
        core.run.summary.streams = pool.finish(&mut |d| core.on_event(d));
        if let Some(conn) = core.hash_conn.take() {
            conn.bye();
        }
        if core.run.may_delete() {
            core.delete_pass(&target);
        }
        drop(pool);
        ctl.bye();
        core.run.finish()
    }

    /// Receive the recursive listing and handle each entry as it arrives.
    fn walk(&mut self, ctl: &mut Connection, root_fd: Option<Arc<OwnedFd>>, root: EntryMeta, fresh: bool) {
        let c = &mut self.core;
        let mtime = mtime_of(&root);
        if let Some(dir) = root_fd.as_ref().filter(|_| c.cfg.xattrs && !c.run.opts.dry_run) {
            let (base, shown) = (c.base.clone(), c.dst.clone());
            c.dir_xattrs(dir, &base, &shown);
        }
        let node = c.dirs.open(None, LocalDir { fd: root_fd.clone(), shown: c.dst.clone(), meta: root });
        c.run.summary.directories += 1;
        let names = c.run.delete.then(HashSet::new);
        let mut stack = vec![PullFrame { rel: Vec::new(), fd: root_fd, node: Some(node), fresh, names, mtime }];
        let base = c.base.clone();
        // A listing whose connection breaks is asked for again on a new one, and the entries already handled are
        // skipped: the listing's order (depth-first, names sorted bytewise) is the order of the paths' components.
        let mut last: Option<Vec<u8>> = None;
        // After a new listing was asked for: skip up to here (a listing is never reordered otherwise).
        let mut resume_after: Option<Vec<u8>> = None;
        let mut attempt = 1;
        loop {
            let broke = match ctl.list(&base, true) {
                Err(ReqError::Broken(m)) => Some(m),
                Err(e) => return self.core.run.broken(e.to_string()),
                Ok(mut stream) => loop {
                    if self.core.run.halted() {
                        return;
                    }
                    let core = &mut self.core;
                    self.pool.poll(&mut |d| core.on_event(d));
                    let Some(item) = stream.next_listed() else { break None };
                    match item {
                        Ok(l) if resume_after.as_ref().is_some_and(|p| !listed_after(l.path(), p)) => {}
                        Ok(l) => {
                            resume_after = None;
                            last = Some(l.path().to_vec());
                            self.listed(&mut stack, l);
                        }
                        Err(ReqError::Broken(m)) => break Some(m),
                        Err(e) => {
                            let shown = url_of(&self.core.addr, &base);
                            self.core.run.req_failed(e, |m| format!("cannot list '{shown}': {m}"));
                        }
                    }
                },
            };
            let Some(cause) = broke else { break };
            if attempt >= STREAM_ATTEMPTS_MAX || self.core.run.halted() {
                return self
                    .core
                    .run
                    .broken(format!("{cause} (gave up after {attempt} attempts on fresh connections)"));
            }
            std::thread::sleep(RETRY_BACKOFF_FIRST * 2u32.saturating_pow(attempt - 1));
            attempt += 1;
            match self.core.dialer.dial() {
                Ok(conn) => *ctl = conn,
                Err(e) => return self.core.run.broken(format!("{cause}; reconnecting failed: {e}")),
            }
            resume_after.clone_from(&last);
            self.core.run.warn(&format!(
                "control connection: {cause}, while listing '{}'; reconnected, listing again (attempt {attempt} of \
                 {STREAM_ATTEMPTS_MAX})",
                url_of(&self.core.addr, &base)
            ));
        }
        while let Some(frame) = stack.pop() {
            self.core.close_dir(frame);
        }
    }

    /// One entry of the listing: checked, then placed in its directory (which must have been listed before it). A
    /// symlink the server could not follow (`-L`) is one failure line in its place.
    fn listed(&mut self, stack: &mut Vec<PullFrame>, item: Listed) {
        let c = &mut self.core;
        let path = item.path().to_vec();
        let refuse = |c: &mut PullCore<'_>, why: &str| {
            let m = format!("refused entry '{}' listed by {}: {why}", path.shown(), c.addr);
            c.run.fail(m);
        };
        let comps = match safe_components(&path) {
            Ok(comps) if !comps.is_empty() => comps,
            Ok(_) => return refuse(c, "an empty path"),
            Err(m) => return refuse(c, &format!("{m}; nothing is written outside the destination")),
        };
        let (name, parents) = comps.split_last().expect("non-empty");
        let name = name.to_vec();
        if stale::is_temporary(OsStr::from_bytes(&name)) {
            return;
        }
        let parent_rel = parents.join(&b'/');
        let Some(pos) = stack.iter().rposition(|f| f.rel == parent_rel) else {
            return refuse(c, "it is not inside a directory listed before it (a symlink is never followed)");
        };
        while stack.len() > pos + 1 {
            let f = stack.pop().expect("longer than pos + 1");
            c.close_dir(f);
        }
        let frame = stack.last_mut().expect("pos exists");
        if frame.node.is_none() {
            // Inside a directory that could not be made (reported once).
            return;
        }
        if let Some(n) = frame.names.as_mut() {
            n.insert(name.clone());
        }
        let rel = path.clone();
        let e = match item {
            Listed::Entry(e) => e,
            Listed::Failed { code, message, .. } => {
                if sync::excluded(&c.run.opts.filter, url::os_path(&rel), false) {
                    c.run.summary.excluded += 1;
                    return;
                }
                let shown = url_of(&c.addr, &join(&c.base, &rel));
                let cause = ReqError::Server { code, message };
                return c.run.fail(format!("cannot follow '{shown}': {}", cause.cause()));
            }
        };
        if sync::excluded(&c.run.opts.filter, url::os_path(&rel), e.kind == EntryKind::Dir) {
            c.run.summary.excluded += 1;
            return;
        }
        let parent = Parent { fd: frame.fd.clone(), node: frame.node, fresh: frame.fresh };
        if e.kind == EntryKind::Dir {
            let f = c.open_dir(&parent, &name, &rel, e);
            stack.push(f);
        } else {
            self.entry_in(&parent, &name, &rel, e, None);
        }
    }

    /// A non-directory entry `name` (shown as `rel`) in `parent`. `remote`: its wire path when not `base/rel`.
    fn entry_in(&mut self, parent: &Parent, name: &[u8], rel: &[u8], e: EntryMeta, remote: Option<Vec<u8>>) {
        let c = &mut self.core;
        // A single file (`remote` given) is shown as the destination path itself.
        let shown = if remote.is_some() { c.dst.clone() } else { c.dst.join(url::os_path(rel)) };
        let remote = remote.unwrap_or_else(|| join(&c.base, rel));
        let cname = CString::new(name).expect("wire paths have no NUL");
        if e.kind == EntryKind::Other {
            return c.run.skip_special(&url_of(&c.addr, &remote));
        }
        let existing = match (&parent.fd, parent.fresh) {
            (Some(fd), false) => match at::lstat(fd.as_raw_fd(), &cname) {
                Ok(st) => st,
                Err(err) => return c.run.fail(format!("cannot stat '{}': {err}", shown.shown())),
            },
            _ => None,
        };
        let existing = match existing {
            Some(st) if at::kind(&st) == libc::S_IFDIR => {
                if !c.replace_local(parent, &cname, &shown, true) {
                    return;
                }
                None
            }
            st => st,
        };
        if e.kind == EntryKind::Symlink {
            return c.symlink(parent, &cname, rel, &shown, &e, existing.as_ref());
        }
        if let (Some(sync), Some(st)) = (c.run.sync, existing.as_ref().filter(|st| at::kind(st) == libc::S_IFREG)) {
            let local = Facts { size: st.st_size as u64, mtime: (st.st_mtime, st.st_mtime_nsec) };
            match sync::verdict(sync, facts(&e), local) {
                Verdict::Unchanged => return c.unchanged(parent, &cname, rel, &shown, &e, st),
                Verdict::Skip => {
                    c.run.summary.unchanged += 1;
                    return;
                }
                Verdict::CompareDigests => {
                    // --checksum: the control connection is streaming the listing; a second one asks for digests.
                    let fd = parent.fd.as_ref().map(|fd| fd.as_raw_fd()).unwrap_or(libc::AT_FDCWD);
                    let local = hash_local(at::open_file(fd, &cname));
                    let theirs = match c.hasher() {
                        Ok(conn) => conn.hash(&remote, 0, u64::MAX),
                        Err(m) => return c.run.broken(m),
                    };
                    match same_content(local, theirs, &shown.shown().to_string(), &url_of(&c.addr, &remote)) {
                        Ok(true) => return c.unchanged(parent, &cname, rel, &shown, &e, st),
                        Ok(false) => {}
                        Err(Compared::Failed(m)) => return c.run.fail(m),
                        Err(Compared::Broken(m)) => return c.run.broken(m),
                    }
                }
                Verdict::Transfer => {}
            }
        }
        c.run.item(if existing.is_some() { Change::Update } else { Change::Copy }, rel, false);
        let key = (c.run.opts.hard_links && e.nlink > 1).then_some((e.dev, e.ino));
        if let (Some(_), Some(dir)) = (key, parent.fd.clone()) {
            let me = LocalName { dir, name: cname.clone(), shown: shown.clone() };
            match plan_link(&mut c.links, key, &me, parent.node, c.run.opts.dry_run) {
                LinkPlan::Transfer => {}
                LinkPlan::Wait => return c.dirs.add(parent.node),
                LinkPlan::LinkTo(first) => return c.link(&me, &first),
                LinkPlan::FirstFailed(first) => return c.link_failed(&me, &first),
            }
        }
        if c.run.opts.dry_run {
            c.run.summary.files += 1;
            c.run.summary.bytes += e.size;
            return;
        }
        let Some(dir_fd) = parent.fd.clone() else { return };
        c.run.progress.add_total(e.size);
        c.dirs.add(parent.node);
        let parts = ranges(e.size, c.streams.split_for());
        let file = PullFile { dir_fd, name: cname, remote, shown, meta: e, dir: parent.node, link: key };
        let Some(parts) = parts else {
            let core = &mut self.core;
            self.pool.send(PullTask::Whole(file), &mut |d| core.on_event(d));
            return;
        };
        let created = match TempFile::resumable(&file.dir_fd, &file.name, &file.meta) {
            Ok(Some(r)) => Ok((r.tmp, Some(r.journal), r.recorded)),
            Ok(None) => TempFile::create(&file.dir_fd, &file.name).map(|t| (t, None, Recorded::new())),
            Err(e) => Err(e),
        };
        let (tmp, journal, recorded) = match created {
            Ok((t, j, r)) => (t.direct_for(file.meta.size, c.run.opts.direct_io), j, r),
            Err(err) => {
                c.run.fail(format!("cannot create '{}': {err}", file.shown.shown()));
                return c.file_done(file.dir, false);
            }
        };
        let big = Arc::new(BigPull {
            file,
            tmp,
            journal,
            recorded,
            ranges_left: AtomicUsize::new(parts.len()),
            failure: Mutex::new(None),
            changed: AtomicBool::new(false),
        });
        for (offset, len) in parts {
            let core = &mut self.core;
            // Ctrl-C stops a large file between ranges: the ranges fetched are journaled, the part kept for a rerun.
            if core.run.halted() {
                return;
            }
            if !self.pool.send(PullTask::Range { big: big.clone(), offset, len }, &mut |d| core.on_event(d)) {
                return;
            }
        }
    }
}

impl PullCore<'_> {
    /// The control connection streams the listing meanwhile (or is no longer needed): nothing to keep alive.
    fn on_event(&mut self, e: Option<Done>) {
        if let Some(d) = e {
            self.on_done(d);
        }
    }

    fn on_done(&mut self, d: Done) {
        match d {
            Done::Bytes(n) => {
                self.run.summary.bytes += n;
                self.run.progress.inc(n);
            }
            Done::File { dir, link, result } => {
                let ok = result.is_ok();
                match result {
                    Ok(retried) => {
                        self.run.summary.retried += u64::from(retried);
                        self.file_done(dir, true);
                    }
                    Err(m) => {
                        self.run.fail(m);
                        self.file_done(dir, false);
                    }
                }
                if let Some((first, waiters)) = link.and_then(|k| links_ready(&mut self.links, k, ok)) {
                    for (me, dir) in waiters {
                        if ok {
                            self.link(&me, &first);
                        } else {
                            self.link_failed(&me, &first);
                        }
                        self.file_done(dir, false);
                    }
                }
            }
            Done::Warn(m) => self.run.warn(&m),
            Done::Broken(m) => self.run.broken(m),
            Done::Note(m) => self.run.note(&m),
        }
    }

    /// `-H`: local name `me` becomes another name of `first` (already in place): linked under a temporary name, then
    /// renamed over whatever `me` was.
    fn link(&mut self, me: &LocalName, first: &LocalName) {
        if self.run.opts.dry_run {
            self.run.summary.hardlinks += 1;
            return;
        }
        let tmp = tmp_name(&me.name);
        let (from_dir, to_dir) = (first.dir.as_raw_fd(), me.dir.as_raw_fd());
        // SAFETY: valid descriptors and C strings; flags 0: a symlink is never followed.
        let linked = if unsafe { libc::linkat(from_dir, first.name.as_ptr(), to_dir, tmp.as_ptr(), 0) } == 0 {
            at::rename(to_dir, &tmp, &me.name).inspect_err(|_| {
                let _ = at::unlink(to_dir, &tmp, false);
            })
        } else {
            Err(io::Error::last_os_error())
        };
        match linked {
            Ok(()) => self.run.summary.hardlinks += 1,
            Err(e) => self.run.fail(format!("cannot link '{}' to '{}': {e}", me.shown.shown(), first.shown.shown())),
        }
    }

    fn link_failed(&mut self, me: &LocalName, first: &LocalName) {
        self.run.fail(format!(
            "cannot link '{}': its first name '{}' was not copied",
            me.shown.shown(),
            first.shown.shown()
        ));
    }

    fn file_done(&mut self, dir: Option<usize>, ok: bool) {
        if ok {
            self.run.summary.files += 1;
            self.run.progress.file_done();
        }
        let mut finished = Vec::new();
        self.dirs.done(dir, &mut finished);
        self.finish_dirs(finished);
    }

    fn finish_dirs(&mut self, finished: Vec<LocalDir>) {
        for d in finished {
            let Some(fd) = d.fd.filter(|_| !self.run.opts.dry_run) else { continue };
            let owner = self.cfg.owner(&d.meta);
            if let Err(e) = at::apply(fd.as_raw_fd(), owner, d.meta.mode, mtime_of(&d.meta)) {
                self.run.fail(format!("cannot set permissions and times on '{}': {e}", d.shown.shown()));
            }
        }
    }

    /// Create (or reuse) local directory `name` in `parent` and make it the current one of the listing.
    fn open_dir(&mut self, parent: &Parent, name: &[u8], rel: &[u8], e: EntryMeta) -> PullFrame {
        let shown = self.dst.join(url::os_path(rel));
        let cname = CString::new(name).expect("wire paths have no NUL");
        let mtime = mtime_of(&e);
        let mut frame = PullFrame { rel: rel.to_vec(), fd: None, node: None, fresh: true, names: None, mtime };
        let existing = match (&parent.fd, parent.fresh) {
            (Some(fd), false) => match at::lstat(fd.as_raw_fd(), &cname) {
                Ok(st) => st,
                Err(err) => {
                    self.run.fail(format!("cannot stat '{}': {err}", shown.shown()));
                    return frame;
                }
            },
            _ => None,
        };
        if existing.is_some_and(|st| at::kind(&st) != libc::S_IFDIR) {
            if !self.replace_local(parent, &cname, &shown, false) {
                return frame;
            }
            frame.fresh = true;
        } else {
            frame.fresh = existing.is_none();
        }
        if frame.fresh {
            self.run.item(Change::Mkdir, rel, true);
        }
        let fd = match &parent.fd {
            Some(pfd) if !self.run.opts.dry_run => {
                let made = match at::mkdir(pfd.as_raw_fd(), &cname, 0o700) {
                    Err(err) if err.raw_os_error() == Some(libc::EEXIST) && !frame.fresh => Ok(()),
                    r => r,
                };
                match made.and_then(|()| at::open_dir(pfd.as_raw_fd(), &cname)) {
                    Ok(fd) => Some(Arc::new(fd)),
                    Err(err) => {
                        self.run.fail(format!("cannot create directory '{}': {err}", shown.shown()));
                        return frame;
                    }
                }
            }
            // A dry run reads existing directories (to compare), and creates none.
            Some(pfd) if !frame.fresh => at::open_dir(pfd.as_raw_fd(), &cname).ok().map(Arc::new),
            _ => None,
        };
        if let Some(dir) = fd.as_ref().filter(|_| self.cfg.xattrs && !self.run.opts.dry_run) {
            self.dir_xattrs(dir, &join(&self.base, rel), &shown);
        }
        frame.fd = fd.clone();
        frame.names = self.run.delete.then(HashSet::new);
        frame.node = Some(self.dirs.open(parent.node, LocalDir { fd, shown, meta: e }));
        self.run.summary.directories += 1;
        frame
    }

    /// The listing left directory `frame`: note the local names it lacks (`--delete`), finish it when done.
    fn close_dir(&mut self, frame: PullFrame) {
        let Some(node) = frame.node else { return };
        if let (Some(names), Some(fd), false) = (&frame.names, &frame.fd, frame.fresh) {
            match at::names(fd.as_raw_fd()) {
                Ok(local) => {
                    let mut extra: Vec<(CString, bool)> = local
                        .into_iter()
                        .filter(|(n, is_dir)| {
                            let b = n.to_bytes();
                            !names.contains(b)
                                && !stale::is_temporary(OsStr::from_bytes(b))
                                && !sync::excluded(&self.run.opts.filter, url::os_path(&join(&frame.rel, b)), *is_dir)
                        })
                        .collect();
                    if !extra.is_empty() {
                        extra.sort();
                        self.deletes.push(LocalDelete { rel: frame.rel.clone(), mtime: frame.mtime, names: extra });
                    }
                }
                Err(e) => {
                    let shown = self.dst.join(url::os_path(&frame.rel));
                    self.run.fail(format!("cannot read directory '{}': {e}", shown.shown()));
                }
            }
        }
        let mut finished = Vec::new();
        self.dirs.walked(node, &mut finished);
        self.finish_dirs(finished);
    }

    /// Something of another type is where an entry must go: `sync --delete` removes it, otherwise it is reported.
    fn replace_local(&mut self, parent: &Parent, name: &CStr, shown: &Path, is_dir: bool) -> bool {
        if !self.run.delete {
            let what = if is_dir { "a directory" } else { "a non-directory" };
            self.run.fail(format!(
                "cannot replace {what} at '{}' (the source has another type there; sync --delete replaces it)",
                shown.shown()
            ));
            return false;
        }
        if self.run.opts.dry_run {
            return true;
        }
        let Some(fd) = &parent.fd else { return true };
        let mut failures = Vec::new();
        let n = if is_dir {
            remove_tree(fd.as_raw_fd(), name, b"", shown, DeleteMode::Quiet, &self.run.itemizer, &mut failures)
        } else {
            match at::unlink(fd.as_raw_fd(), name, false) {
                Ok(()) => 1,
                Err(e) => {
                    failures.push(format!("cannot delete '{}': {e}", shown.shown()));
                    0
                }
            }
        };
        self.run.summary.deleted += n;
        let ok = failures.is_empty();
        for f in failures {
            self.run.fail(f);
        }
        ok
    }

    fn symlink(
        &mut self,
        parent: &Parent,
        name: &CStr,
        rel: &[u8],
        shown: &Path,
        e: &EntryMeta,
        existing: Option<&libc::stat>,
    ) {
        let fd = parent.fd.as_ref().map(|f| f.as_raw_fd());
        if self.run.sync.is_some()
            && let (Some(st), Some(fd)) = (existing, fd)
            && at::kind(st) == libc::S_IFLNK
            && at::readlink(fd, name).is_ok_and(|t| t == e.target)
        {
            self.run.summary.unchanged += 1;
            return;
        }
        self.run.item(if existing.is_some() { Change::Update } else { Change::Copy }, rel, false);
        if self.run.opts.dry_run {
            self.run.summary.symlinks += 1;
            return;
        }
        let Some(fd) = fd else { return };
        let target = match CString::new(e.target.clone()) {
            Ok(t) if !t.as_bytes().is_empty() => t,
            _ => return self.run.fail(format!("cannot create symlink '{}': empty or invalid target", shown.shown())),
        };
        let tmp = tmp_name(name);
        let made = at::symlink(&target, fd, &tmp)
            .and_then(|()| match self.cfg.owner(e) {
                Some((uid, gid)) => at::lchown(fd, &tmp, uid, gid),
                None => Ok(()),
            })
            .and_then(|()| at::set_mtime_at(fd, &tmp, mtime_of(e)))
            .and_then(|()| at::rename(fd, &tmp, name));
        match made {
            Ok(()) => self.run.summary.symlinks += 1,
            Err(err) => {
                let _ = at::unlink(fd, &tmp, false);
                self.run.fail(format!("cannot create symlink '{}': {err}", shown.shown()));
            }
        }
    }

    /// A local file that is already right: fix its permissions, owner and mtime if they differ.
    /// The connection for digests (`sync --checksum`), dialled on first use.
    /// -X: the extended attributes of remote directory `remote`, set on local directory `dir` now (before its
    /// permissions are: setting them may need write access). The control connection is streaming the listing: the
    /// second connection asks.
    fn dir_xattrs(&mut self, dir: &OwnedFd, remote: &[u8], shown: &Path) {
        let url = url_of(&self.addr, remote);
        let got = match self.hasher() {
            Ok(conn) => conn.get_xattrs(remote),
            Err(m) => return self.run.broken(m),
        };
        let xattrs = match got {
            Ok(x) => x,
            Err(e) => return self.run.req_failed(e, |m| format!("cannot read extended attributes of '{url}': {m}")),
        };
        let path = PathBuf::from(format!("/proc/self/fd/{}/.", dir.as_raw_fd()));
        if let Err(e) = crate::meta::write_xattrs(&path, &xattrs) {
            self.run.fail(format!("cannot set extended attributes on '{}': {e}", shown.shown()));
        }
    }

    fn hasher(&mut self) -> Result<&mut Connection, String> {
        if self.hash_conn.is_none() {
            self.hash_conn = Some(self.dialer.dial().map_err(|e| e.to_string())?);
        }
        Ok(self.hash_conn.as_mut().expect("just dialled"))
    }

    fn unchanged(&mut self, parent: &Parent, name: &CStr, rel: &[u8], shown: &Path, e: &EntryMeta, st: &libc::stat) {
        self.run.summary.unchanged += 1;
        // -H: the inode's other names link to this one, which is in place.
        if let Some(dir) = parent.fd.clone().filter(|_| self.run.opts.hard_links && e.nlink > 1) {
            let me = LocalName { dir, name: name.to_owned(), shown: shown.to_path_buf() };
            self.links.entry((e.dev, e.ino)).or_insert_with(|| LinkState::Done(me));
        }
        let id = self.cfg.id;
        let mode_differs = (st.st_mode & 0o7777) != e.mode;
        let mtime_differs = (st.st_mtime, st.st_mtime_nsec) != (e.mtime_sec, i64::from(e.mtime_nsec));
        let owner_differs = (e.uid, e.gid) != (st.st_uid, st.st_gid) && (id.euid == 0 || e.uid == id.euid);
        if !(mode_differs || mtime_differs || owner_differs) {
            return;
        }
        self.run.item(Change::Attrs, rel, false);
        let Some(fd) = parent.fd.as_ref().filter(|_| !self.run.opts.dry_run) else { return };
        let r = at::open_file(fd.as_raw_fd(), name)
            .and_then(|f| at::apply(f.as_raw_fd(), owner_differs.then_some((e.uid, e.gid)), e.mode, mtime_of(e)));
        match r {
            Ok(()) => self.run.summary.attrs_updated += 1,
            Err(err) => self.run.fail(format!("cannot set permissions and times on '{}': {err}", shown.shown())),
        }
    }

    /// `sync --delete`: remove the local entries the remote tree does not have, now that every transfer succeeded.
    fn delete_pass(&mut self, dst: &Path) {
        let recs = std::mem::take(&mut self.deletes);
        if recs.is_empty() {
            return;
        }
        let root = match Root::open(dst) {
            Ok(r) => r,
            Err(e) => return self.run.fail(format!("cannot open directory '{}': {e}", dst.shown())),
        };
        let mut failures = Vec::new();
        if let Some(max) = self.run.sync.and_then(|s| s.max_delete) {
            let mut count = 0;
            for rec in &recs {
                let Ok(dir) = root.dir(&rec.rel) else { continue };
                for (name, is_dir) in &rec.names {
                    count += if *is_dir {
                        remove_tree(
                            dir.as_raw_fd(),
                            name,
                            b"",
                            dst,
                            DeleteMode::Count,
                            &self.run.itemizer,
                            &mut failures,
                        )
                    } else {
                        1
                    };
                }
            }
            if count > max {
                return self.run.fail(format!(
                    "--max-delete {max}: {count} entries would be deleted from '{}'; nothing was deleted",
                    dst.shown()
                ));
            }
        }
        let mode = if self.run.opts.dry_run { DeleteMode::DryRun } else { DeleteMode::Delete };
        for rec in recs {
            // Opened again beneath the destination, following no symlink.
            let dir = match root.dir(&rec.rel) {
                Ok(d) => d,
                Err(e) => {
                    let shown = dst.join(url::os_path(&rec.rel));
                    self.run.fail(format!("cannot open directory '{}': {e}", shown.shown()));
                    continue;
                }
            };
            for (name, is_dir) in &rec.names {
                let rel = join(&rec.rel, name.to_bytes());
                let shown = dst.join(url::os_path(&rel));
                let n = if *is_dir {
                    remove_tree(dir.as_raw_fd(), name, &rel, &shown, mode, &self.run.itemizer, &mut failures)
                } else {
                    self.run.item(Change::Delete, &rel, false);
                    match mode {
                        DeleteMode::Delete => match at::unlink(dir.as_raw_fd(), name, false) {
                            Ok(()) => 1,
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => 0,
                            Err(e) => {
                                failures.push(format!("cannot delete '{}': {e}", shown.shown()));
                                0
                            }
                        },
                        _ => 1,
                    }
                };
                self.run.summary.deleted += n;
            }
            if mode == DeleteMode::Delete {
                // The deletions changed the directory's mtime: give it back the remote one's.
                let _ = at::set_mtime_at(dir.as_raw_fd(), c".", rec.mtime);
            }
        }
        for f in failures {
            self.run.fail(f);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DeleteMode {
    /// Count only.
    Count,
    /// Itemize and count.
    DryRun,
    /// Itemize, delete and count.
    Delete,
    /// Delete and count, without itemizing (a directory in the way of a file).
    Quiet,
}

/// Visit directory `name` in `dir` and everything in it, children first: itemized as `rel`, deleted unless
/// counting or dry. Returns the number of entries (deleted, or that would be).
fn remove_tree(
    dir: RawFd,
    name: &CStr,
    rel: &[u8],
    shown: &Path,
    mode: DeleteMode,
    itemizer: &Itemizer,
    failures: &mut Vec<String>,
) -> u64 {
    let itemize = matches!(mode, DeleteMode::DryRun | DeleteMode::Delete);
    let unlink = matches!(mode, DeleteMode::Delete | DeleteMode::Quiet);
    let fd = match at::open_dir(dir, name) {
        Ok(fd) => fd,
        Err(e) => {
            failures.push(format!("cannot open directory '{}': {e}", shown.shown()));
            return 0;
        }
    };
    let names = match at::names(fd.as_raw_fd()) {
        Ok(n) => n,
        Err(e) => {
            failures.push(format!("cannot read directory '{}': {e}", shown.shown()));
            return 0;
        }
    };
    let mut n = 0;
    for (child, is_dir) in names {
        let crel = join(rel, child.to_bytes());
        let cshown = shown.join(OsStr::from_bytes(child.to_bytes()));
        if is_dir {
            n += remove_tree(fd.as_raw_fd(), &child, &crel, &cshown, mode, itemizer, failures);
            continue;
        }
        if itemize {
            itemizer.item(Change::Delete, url::os_path(&crel), false);
        }
        if unlink && let Err(e) = at::unlink(fd.as_raw_fd(), &child, false) {
            failures.push(format!("cannot delete '{}': {e}", cshown.shown()));
            continue;
        }
        n += 1;
    }
    if itemize {
        itemizer.item(Change::Delete, url::os_path(rel), true);
    }
    if unlink && let Err(e) = at::unlink(dir, name, true) {
        failures.push(format!("cannot delete '{}': {e}", shown.shown()));
        return n;
    }
    n + 1
}

/// One worker task of a pull.
/// A worker's turn: runs of small whole files go together ([`pull_smalls`]; not with -X, whose `GetXattrs` would
/// come between the answers), everything else one by one.
fn pull_tasks(
    stream: &mut Stream,
    cfg: &PullCfg,
    tasks: Vec<PullTask>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    let mut smalls = Vec::new();
    for task in tasks {
        match task {
            PullTask::Whole(f) if !cfg.xattrs && f.meta.size <= PIPELINED_FILE_BYTES_MAX => smalls.push(f),
            other => {
                if !smalls.is_empty() {
                    pull_smalls(stream, cfg, std::mem::take(&mut smalls), done)?;
                }
                pull_task(stream, cfg, other, done)?;
            }
        }
    }
    if smalls.is_empty() { Ok(()) } else { pull_smalls(stream, cfg, smalls, done) }
}

/// Pull small files in one round trip: the `Get`s of the files a worker took together go back to back, then each
/// answer is read into its own temporary, which is finished and renamed into place at once (one temporary open at a
/// time). A connection that breaks is dialled again and the files not yet in place are asked for again; a file
/// whose answer is anything but complete and unchanged (changed, damaged, short, refused) takes [`pull_whole`]'s path
/// alone, which retries and says why. One [`Done::File`] per file.
fn pull_smalls(
    stream: &mut Stream,
    cfg: &PullCfg,
    files: Vec<PullFile>,
    done: &Sender<Done>,
) -> Result<(), StreamError> {
    if files.len() == 1 {
        return files.into_iter().try_for_each(|f| pull_task(stream, cfg, PullTask::Whole(f), done));
    }
    /// What became of one file of the batch.
    enum Got {
        /// In place, or failed for a reason the step-by-step path would meet too.
        Finished(Result<(), String>),
        /// To be fetched on its own.
        Alone,
    }
    let mut got: Vec<Option<Got>> = (0..files.len()).map(|_| None).collect();
    let first_url = url_of(stream.addr(), &files[0].remote);
    let doing = Doing::pull(&first_url, &format!("with {} more small files in one round trip", files.len() - 1));
    stream.retry(&doing, done, |conn, _| {
        let waiting: Vec<usize> = (0..files.len()).filter(|&i| got[i].is_none()).collect();
        let gets: Vec<(&[u8], u64)> =
            waiting.iter().map(|&i| (files[i].remote.as_slice(), files[i].meta.size)).collect();
        conn.send_gets(&gets).map_err(|e| Broken::new(e.cause().to_string()))?;
        let mut progressed = false;
        for &i in &waiting {
            let f = &files[i];
            let tmp = TempFile::create(&f.dir_fd, &f.name);
            let no_tmp = || io::Error::other("no temporary");
            let mut sink = |at: u64, bytes: &[u8]| tmp.as_ref().map_err(|_| no_tmp())?.file.write_all_at(bytes, at);
            let mut hole = |at: u64, n: u64| sparse::make_hole(&tmp.as_ref().map_err(|_| no_tmp())?.file, at, n);
            let answer = conn.get_answer(0, f.meta.size, &mut sink, &mut hole);
            let complete = |end: &client::DataEnd| {
                (end.size, end.mtime, end.received_to) == (f.meta.size, mtime_of(&f.meta), f.meta.size)
            };
            got[i] = Some(match (answer, &tmp) {
                (Err(GetError::Req(ReqError::Broken(message))), _) => return Err(Broken { message, progressed }),
                (_, Err(e)) => Got::Finished(Err(format!("cannot create '{}': {e}", f.shown.shown()))),
                (Ok(end), Ok(tmp)) if complete(&end) => Got::Finished(finish_pull(cfg, tmp, f, &f.meta)),
                _ => Got::Alone,
            });
            progressed = true;
        }
        Ok(())
    })?;
    for (f, got) in files.into_iter().zip(got) {
        let result = match got.expect("every file of the batch was answered") {
            Got::Finished(Ok(())) => {
                let _ = done.send(Done::Bytes(f.meta.size));
                Ok(0)
            }
            Got::Finished(Err(line)) => Err(line),
            Got::Alone => pull_whole(stream, cfg, &f, done, 1)?,
        };
        let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
    }
    Ok(())
}

fn pull_task(stream: &mut Stream, cfg: &PullCfg, task: PullTask, done: &Sender<Done>) -> Result<(), StreamError> {
    match task {
        PullTask::Whole(f) => {
            let result = pull_whole(stream, cfg, &f, done, 1)?;
            let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
        }
        PullTask::Range { big, offset, len } => {
            let f = &big.file;
            let failed = || big.failure.lock().expect("not poisoned").is_some();
            // What an interrupted run recorded of this range (all of it, or the part it had received) is reused
            // when the server's bytes still hash the same.
            let recorded = big.recorded.get(&offset).map_or(0, |&n| n.min(len));
            let reused = if recorded > 0 && !failed() && same_range(stream, f, &big.tmp.file, offset, recorded, done)? {
                recorded
            } else {
                0
            };
            if reused < len && !failed() {
                let got = std::cell::Cell::new(offset + reused);
                let fetched = fetch(stream, f, &f.meta, &big.tmp, offset + reused, len - reused, &got, done);
                if let (Err(StreamError::Stopped), Some(j)) = (&fetched, &big.journal)
                    && got.get() > offset
                {
                    // Stopped in the middle of the range (Ctrl-C): the next run reuses what arrived.
                    let _ = j.record(offset, got.get() - offset);
                }
                let failure = match fetched? {
                    Ok(end) if (end.size, end.mtime) != (f.meta.size, mtime_of(&f.meta)) => {
                        big.changed.store(true, Ordering::Release);
                        None
                    }
                    Ok(end) if end.received_to != (offset + len).min(end.size) => {
                        Some(short(stream.addr(), f, end.received_to))
                    }
                    Ok(_) => {
                        if let Some(j) = &big.journal {
                            // Best effort: a range missing from the journal is only fetched again by the next run.
                            let _ = j.record(offset, len);
                        }
                        None
                    }
                    Err(e) => Some(get_failure(stream.addr(), f, e)),
                };
                if let Some(m) = failure {
                    big.failure.lock().expect("not poisoned").get_or_insert(m);
                }
            }
            if big.ranges_left.fetch_sub(1, Ordering::AcqRel) == 1 {
                let failure = big.failure.lock().expect("not poisoned").take();
                let result = match failure {
                    Some(m) => {
                        big.discard();
                        Err(m)
                    }
                    None if big.changed.load(Ordering::Acquire) => {
                        // Changed while the ranges were read: fetched again, whole, by this worker.
                        big.discard();
                        refetch(stream, cfg, f, done)?
                    }
                    None => {
                        let r = pull_xattrs(stream, cfg, f, &big.tmp, done)?
                            .and_then(|()| finish_pull(cfg, &big.tmp, f, &f.meta))
                            .map(|()| 0);
                        if r.is_ok() {
                            if let Some(j) = &big.journal {
                                j.remove();
                            }
                        } else {
                            big.discard();
                        }
                        r
                    }
                };
                let _ = done.send(Done::File { dir: f.dir, link: f.link, result });
            }
        }
    }
    Ok(())
}

/// `Get` `[offset, offset + len)` of `f` into `tmp`, each chunk written in place once its digest is checked. When
/// the connection breaks, the rest of the range (from the first byte not yet received) is asked for again on a new
/// connection: what was received and checked is not fetched again. `next` starts at `offset` and follows the first
/// byte not yet received (also when the run stops meanwhile).
#[allow(clippy::too_many_arguments)]
fn fetch(
    stream: &mut Stream,
    f: &PullFile,
    meta: &EntryMeta,
    tmp: &TempFile,
    offset: u64,
    len: u64,
    next: &std::cell::Cell<u64>,
    done: &Sender<Done>,
) -> Result<Result<client::DataEnd, GetError>, StreamError> {
    let url = url_of(stream.addr(), &f.remote);
    let end = offset.saturating_add(len);
    let doing = Doing::pull(&url, &format!("bytes {offset}..{end}, resuming at the first byte not yet received"));
    next.set(offset);
    stream.retry(&doing, done, |conn, _| {
        let from = next.get();
        // Each chunk is handed over once its digest is checked and it is written (in order, from `from`).
        let mut on_bytes = |n: u64| {
            next.set(next.get() + n);
            let _ = done.send(Done::Bytes(n));
        };
        let r =
            zerocopy::get_into_file(conn, &f.remote, from, end - from, &tmp.file, tmp.direct.as_ref(), &mut on_bytes);
        match corrupt_or_changed(conn, &f.remote, meta, r) {
            Err(GetError::Req(ReqError::Broken(message))) => Err(Broken { message, progressed: next.get() > from }),
            r => Ok(r),
        }
    })
}

/// Whether `[offset, offset + len)` of the local temporary holds what the server's file holds there (BLAKE3 of
/// both; a local read error means "no": the range is fetched again).
fn same_range(
    stream: &mut Stream,
    f: &PullFile,
    file: &File,
    offset: u64,
    len: u64,
    done: &Sender<Done>,
) -> Result<bool, StreamError> {
    let Ok(mine) = hash_range(file, offset, len) else { return Ok(false) };
    let url = url_of(stream.addr(), &f.remote);
    let doing = Doing::pull(&url, &format!("the digest of bytes {offset}..{}", offset + len));
    let theirs = stream.retry(&doing, done, |conn, _| split(conn.hash(&f.remote, offset, len)))?;
    Ok(matches!(theirs, Ok((d, n)) if n == len && d == mine))
}

/// The remote file's metadata again (a `Stat`, retried on a new connection when its connection breaks).
fn stat_again(
    stream: &mut Stream,
    f: &PullFile,
    done: &Sender<Done>,
) -> Result<Result<Option<EntryMeta>, ReqError>, StreamError> {
    let url = url_of(stream.addr(), &f.remote);
    stream.retry(&Doing::pull(&url, "its metadata"), done, |conn, _| split(conn.stat(&f.remote)))
}

/// Stat the file again and fetch it whole (attempt 2 on).
fn refetch(
    stream: &mut Stream,
    cfg: &PullCfg,
    f: &PullFile,
    done: &Sender<Done>,
) -> Result<Result<u8, String>, StreamError> {
    let shown = url_of(stream.addr(), &f.remote);
    match stat_again(stream, f, done)? {
        Ok(Some(m)) if m.kind == EntryKind::File => {
            let g = PullFile {
                dir_fd: f.dir_fd.clone(),
                name: f.name.clone(),
                remote: f.remote.clone(),
                shown: f.shown.clone(),
                meta: EntryMeta { path: f.meta.path.clone(), ..m },
                dir: f.dir,
                link: f.link,
            };
            Ok(pull_whole(stream, cfg, &g, done, 2)?.map(|r| r + 1))
        }
        Ok(Some(_)) => Ok(Err(format!("'{shown}' is no longer a regular file; not copied"))),
        Ok(None) => Ok(Err(format!("cannot read '{shown}': it was removed while it was copied"))),
        Err(e) => Ok(Err(format!("cannot stat '{shown}': {e}"))),
    }
}

/// A chunk with a wrong digest from a file that changed since it was listed is a change (as `DataEnd` would show),
/// not corruption: a server sending with sendfile hashes the bytes before it sends them, so a write in between
/// arrives as a wrong digest. Returns the file's size and mtime now, for the caller's change check.
fn corrupt_or_changed(
    conn: &mut Connection,
    remote: &[u8],
    meta: &EntryMeta,
    r: Result<client::DataEnd, GetError>,
) -> Result<client::DataEnd, GetError> {
    let Err(GetError::Corrupt(why)) = r else { return r };
    match conn.stat(remote) {
        Ok(Some(now)) if now.kind == EntryKind::File && (now.size, mtime_of(&now)) != (meta.size, mtime_of(meta)) => {
            Ok(client::DataEnd { size: now.size, mtime: mtime_of(&now), received_to: 0 })
        }
        Err(e @ ReqError::Broken(_)) => Err(GetError::Req(e)),
        _ => Err(GetError::Corrupt(why)),
    }
}

fn short(addr: &str, f: &PullFile, got: u64) -> String {
    format!("cannot read '{}': the server's data ended early (at byte {got})", url_of(addr, &f.remote))
}

/// The failure line of a `Get`.
fn get_failure(addr: &str, f: &PullFile, e: GetError) -> String {
    let shown = url_of(addr, &f.remote);
    match e {
        GetError::Req(e) => format!("cannot read '{shown}': {e}"),
        GetError::Sink(e) => format!("cannot write '{}': {e}", f.shown.shown()),
        GetError::Corrupt(m) => format!("corrupt data from '{shown}': {m}; nothing was written"),
    }
}

/// Set the metadata of a complete temporary and rename it into place.
/// -X: the remote file's extended attributes (`GetXattrs`), set on the temporary before it is renamed into place.
fn pull_xattrs(
    stream: &mut Stream,
    cfg: &PullCfg,
    f: &PullFile,
    tmp: &TempFile,
    done: &Sender<Done>,
) -> Result<Result<(), String>, StreamError> {
    if !cfg.xattrs {
        return Ok(Ok(()));
    }
    let url = url_of(stream.addr(), &f.remote);
    let doing = Doing::pull(&url, "its extended attributes");
    let xattrs = match stream.retry(&doing, done, |conn, _| split(conn.get_xattrs(&f.remote)))? {
        Ok(x) => x,
        Err(e) => return Ok(Err(format!("cannot read extended attributes of '{url}': {e}"))),
    };
    Ok(fastsync_engine::finish::set_xattrs(tmp.file.as_fd(), &xattrs)
        .map_err(|e| format!("cannot set extended attributes on '{}': {e}", f.shown.shown())))
}

fn finish_pull(cfg: &PullCfg, tmp: &TempFile, f: &PullFile, meta: &EntryMeta) -> Result<(), String> {
    let fd = tmp.file.as_raw_fd();
    at::apply(fd, cfg.owner(meta), meta.mode, mtime_of(meta))
        .map_err(|e| format!("cannot set permissions and times on '{}': {e}", f.shown.shown()))?;
    if cfg.fsync {
        at::fsync(fd).map_err(|e| format!("cannot write '{}': {e}", f.shown.shown()))?;
    }
    tmp.commit(&f.name).map_err(|e| format!("cannot rename into place '{}': {e}", f.shown.shown()))?;
    if cfg.fsync {
        at::fsync(f.dir_fd.as_raw_fd()).map_err(|e| format!("cannot write '{}': {e}", f.shown.shown()))?;
    }
    Ok(())
}

/// Whether listed `path` comes after `last` in a recursive listing (depth-first, names sorted bytewise within a
/// directory): the order of their components.
fn listed_after(path: &[u8], last: &[u8]) -> bool {
    path.split(|&b| b == b'/').cmp(last.split(|&b| b == b'/')) == std::cmp::Ordering::Greater
}

/// Fetch one file whole into a temporary, retrying when it changes while it is read (and resuming where it stopped
/// when its connection breaks).
fn pull_whole(
    stream: &mut Stream,
    cfg: &PullCfg,
    f: &PullFile,
    done: &Sender<Done>,
    first: u8,
) -> Result<Result<u8, String>, StreamError> {
    let shown = url_of(stream.addr(), &f.remote);
    let mut meta = f.meta.clone();
    let mut attempt = first;
    loop {
        let tmp = match TempFile::create(&f.dir_fd, &f.name) {
            Ok(t) => t.direct_for(meta.size, cfg.direct_io),
            Err(e) => return Ok(Err(format!("cannot create '{}': {e}", f.shown.shown()))),
        };
        let end = match fetch(stream, f, &meta, &tmp, 0, meta.size, &std::cell::Cell::new(0), done)? {
            Ok(end) => end,
            Err(e) => return Ok(Err(get_failure(stream.addr(), f, e))),
        };
        if (end.size, end.mtime) == (meta.size, mtime_of(&meta)) {
            if end.received_to != meta.size {
                return Ok(Err(short(stream.addr(), f, end.received_to)));
            }
            let xattrs = pull_xattrs(stream, cfg, f, &tmp, done)?;
            return Ok(xattrs.and_then(|()| finish_pull(cfg, &tmp, f, &meta)).map(|()| attempt - first));
        }
        drop(tmp);
        if attempt >= SOURCE_ATTEMPTS_MAX {
            return Ok(Err(format!(
                "source changed while copying '{shown}': its size or mtime changed while it was read (it kept \
                 changing during {SOURCE_ATTEMPTS_MAX} attempts)"
            )));
        }
        attempt += 1;
        match stat_again(stream, f, done)? {
            Ok(Some(m)) if m.kind == EntryKind::File => meta = EntryMeta { path: meta.path, ..m },
            Ok(Some(_)) => return Ok(Err(format!("'{shown}' is no longer a regular file; not copied"))),
            Ok(None) => return Ok(Err(format!("cannot read '{shown}': it was removed while it was copied"))),
            Err(e) => return Ok(Err(format!("cannot stat '{shown}': {e}"))),
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// list
// ---------------------------------------------------------------------------------------------------------------

/// `fastsync list fastsync://host/path`: the same lines as a local listing, one directory's entries at a time
/// (each directory is listed on its own and sorted by name, so the order is the local one whatever the server's).
pub fn list(args: &ListArgs, json: bool, net: &NetOptions) -> Result<i32, Failure> {
    let net = &net.with_env()?;
    let remote = parse_url(&args.path)?;
    let shown = remote.display(b"");
    let key = load_key(net, &shown)?;
    let mut conn = connect(&remote.addr, &key, net)?;
    let root = match conn.stat(&remote.path) {
        Ok(Some(e)) => e,
        Ok(None) => return Err(Failure::Fatal(format!("cannot stat '{shown}': no such file or directory"))),
        Err(ReqError::Broken(m)) => return Err(Failure::Fatal(m)),
        Err(ReqError::Server { message, .. }) => {
            return Err(Failure::Fatal(format!("cannot stat '{shown}': {message}")));
        }
    };
    let mut l = RemoteLister {
        conn: &mut conn,
        addr: remote.addr.clone(),
        out: BufWriter::with_capacity(64 << 10, io::stdout().lock()),
        human: args.human_readable,
        json,
        checksum: args.checksum,
        base: remote.path.clone(),
        single: root.kind != EntryKind::Dir,
        errors: 0,
    };
    let r = l.run(&remote.path, root, args.recursive);
    let errors = l.errors;
    let flushed = l.out.flush();
    drop(l);
    conn.bye();
    match r.and(flushed.map_err(Halt::Write)) {
        Ok(()) => Ok(if errors > 0 { exit::PARTIAL } else { exit::OK }),
        Err(Halt::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(exit::PARTIAL),
        Err(Halt::Write(e)) => Err(Failure::Fatal(format!("error writing 'standard output': {e}"))),
        Err(Halt::Broken(m)) => Err(Failure::Fatal(m)),
    }
}

enum Halt {
    Write(io::Error),
    Broken(String),
}

struct RemoteLister<'c, W: Write> {
    conn: &'c mut Connection,
    addr: String,
    out: W,
    human: bool,
    json: bool,
    /// `--checksum`: the server hashes each regular file (between listings the connection is free).
    checksum: bool,
    /// Wire path listed (a file's path on the server is this joined with its relative path).
    base: Vec<u8>,
    /// The listed path is a file, not a directory.
    single: bool,
    errors: u64,
}

impl<W: Write> RemoteLister<'_, W> {
    fn run(&mut self, path: &[u8], root: EntryMeta, recursive: bool) -> Result<(), Halt> {
        if root.kind != EntryKind::Dir {
            let name = if path.is_empty() { path } else { url::file_name(path) };
            return self.line(name, &root);
        }
        let Some(entries) = self.read_dir(path)? else { return Ok(()) };
        let mut stack: Vec<(Vec<u8>, std::vec::IntoIter<EntryMeta>)> = vec![(Vec::new(), entries.into_iter())];
        while let Some((dir_rel, entries)) = stack.last_mut() {
            let Some(e) = entries.next() else {
                stack.pop();
                continue;
            };
            let rel = join(dir_rel, &e.path);
            self.line(&rel, &e)?;
            if recursive
                && e.kind == EntryKind::Dir
                && let Some(sub) = self.read_dir(&join(path, &rel))?
            {
                stack.push((rel, sub.into_iter()));
            }
        }
        Ok(())
    }

    /// The entries of remote directory `path`, sorted by name; `None` (reported) when it cannot be listed.
    fn read_dir(&mut self, path: &[u8]) -> Result<Option<Vec<EntryMeta>>, Halt> {
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        let mut stream = self.conn.list(path, false).map_err(|e| Halt::Broken(e.to_string()))?;
        let mut listed = true;
        while let Some(r) = stream.next_entry() {
            match r {
                Ok(e) if safe_components(&e.path).is_ok_and(|c| c.len() == 1) => entries.push(e),
                Ok(e) => errors.push(format!("refused entry '{}' listed by {}: not a name", e.path.shown(), self.addr)),
                Err(ReqError::Broken(m)) => return Err(Halt::Broken(m)),
                Err(ReqError::Server { message, .. }) => {
                    errors.push(format!("cannot read directory '{}': {message}", url_of(&self.addr, path)));
                    listed = false;
                }
            }
        }
        for e in errors {
            self.error(&e)?;
        }
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Ok(listed.then_some(entries))
    }

    fn error(&mut self, msg: &str) -> Result<(), Halt> {
        self.errors += 1;
        self.out.flush().map_err(Halt::Write)?;
        eprintln!("fastsync: {msg}");
        Ok(())
    }

    fn line(&mut self, rel: &[u8], e: &EntryMeta) -> Result<(), Halt> {
        let kind = match e.kind {
            EntryKind::File => list::Kind::File,
            EntryKind::Dir => list::Kind::Dir,
            EntryKind::Symlink => list::Kind::Symlink,
            EntryKind::Other => list::Kind::Other,
        };
        let entry = list::Entry {
            rel: url::os_path(rel).to_path_buf(),
            kind,
            mode: e.mode,
            size: e.size,
            mtime_sec: e.mtime_sec,
            mtime_nsec: i64::from(e.mtime_nsec),
            target: (e.kind == EntryKind::Symlink).then(|| url::os_path(&e.target).to_path_buf()),
        };
        let mut failed = None;
        let digest = self.checksum.then(|| match e.kind {
            EntryKind::File => {
                // A listed file is the listed path itself; a directory's entries lie beneath it.
                let path = if self.single { self.base.clone() } else { join(&self.base, rel) };
                match self.conn.hash(&path, 0, u64::MAX) {
                    Ok((d, _)) => Ok(list::Digest::Done(d)),
                    Err(ReqError::Broken(m)) => Err(Halt::Broken(m)),
                    Err(ReqError::Server { message, .. }) => {
                        failed =
                            Some(format!("cannot compute the checksum of '{}': {message}", url_of(&self.addr, &path)));
                        Ok(list::Digest::Failed(message))
                    }
                }
            }
            _ => Ok(list::Digest::NotHashed),
        });
        let digest = digest.transpose()?;
        self.out.write_all(&list::entry_line(&entry, self.human, self.json, digest.as_ref())).map_err(Halt::Write)?;
        if let Some(m) = failed {
            self.error(&m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_order_is_the_order_of_path_components() {
        // Depth-first, names sorted bytewise: "a", "a/b", "a/c", "a-b" ("a" < "a-b", and "a"'s subtree comes first).
        let order: [&[u8]; 5] = [b"a", b"a/b", b"a/b/z", b"a/c", b"a-b"];
        for w in order.windows(2) {
            assert!(listed_after(w[1], w[0]), "{:?} after {:?}", w[1], w[0]);
            assert!(!listed_after(w[0], w[1]));
        }
        assert!(!listed_after(b"a/b", b"a/b"), "an entry is not after itself");
    }

    #[test]
    fn large_files_are_cut_into_chunk_aligned_ranges() {
        assert_eq!(ranges(CHUNK, 4), None);
        assert_eq!(ranges(100 << 20, 1), None);
        let r = ranges((40 << 20) + 5, 4).unwrap();
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|(o, l)| o % CHUNK == 0 && *l > 0));
        assert_eq!(r.iter().map(|(_, l)| l).sum::<u64>(), (40 << 20) + 5);
        let r = ranges(1 << 30, 4).unwrap();
        assert!(r.iter().all(|(_, l)| *l <= RANGE_BYTES_MAX));
        assert_eq!(r.windows(2).filter(|w| w[0].0 + w[0].1 != w[1].0).count(), 0);
    }

    #[test]
    fn io_timeouts_are_whole_seconds_within_bounds() {
        assert_eq!(io_timeout_secs("5").ok(), Some(5));
        assert_eq!(io_timeout_secs(" 60\n").ok(), Some(60));
        assert_eq!(io_timeout_secs("86400").ok(), Some(IO_TIMEOUT_SECS_MAX));
        for bad in ["", "0", "-1", "1.5", "86401", "1e3", "soon"] {
            assert!(matches!(io_timeout_secs(bad), Err(Failure::Usage(m)) if m.contains(IO_TIMEOUT_ENV)), "{bad:?}");
        }
    }

    #[test]
    fn directories_finish_after_their_contents() {
        let mut d: Dirs<&str> = Dirs::new();
        let mut out = Vec::new();
        let root = d.open(None, "root");
        let sub = d.open(Some(root), "sub");
        d.add(Some(sub));
        d.walked(sub, &mut out);
        d.walked(root, &mut out);
        assert!(out.is_empty());
        d.done(Some(sub), &mut out);
        assert_eq!(out, ["sub", "root"]);
    }
}
