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
//! way (`push::PushCore::ctl_do`: each of its requests can be sent twice), and a pull's, which streams the recursive
//! listing, lists again on the new connection and skips the entries it handled. A server that cannot be reached
//! again stops the whole run with one line naming the server; temporaries are removed (pull) or abandoned to the
//! server, which removes them (push), so nothing partial appears under a final name, and a rerun finishes the work.

use std::collections::{HashMap, HashSet, VecDeque};
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

mod ahead;
mod listing;
mod pool;
mod pull;
mod push;
mod tally;

use ahead::*;
pub use listing::list;
use pool::*;
use pull::*;
use push::*;
use tally::*;

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
