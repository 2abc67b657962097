//! `fastsync list PATH`: one line per entry, like `ls -l` or `rclone lsl`.
//!
//! Each line holds the type and permissions (`drwxr-xr-x`, `-rw-r--r--`, `lrwxrwxrwx`), the size in bytes
//! (right-aligned), the modification time in UTC with nanoseconds (`2011-03-13 07:06:40.123456789`), and the path
//! relative to PATH; a symlink ends in ` -> TARGET`. A directory's entries are sorted by name (byte order); PATH
//! itself is not listed, except when it is not a directory: then its one line names it by its file name. PATH is
//! never followed when it is a symlink (write `PATH/` to list the directory it points to), and neither is any
//! symlink found below it. Names that are not UTF-8 are written as they are (raw bytes).
//!
//! - `-R`: subdirectories too, depth-first: a directory's line is followed by its own entries (`sub`, `sub/file`),
//!   then by its next sibling. Only the names of one directory per level are held (and sorted) at a time.
//! - `-h`: sizes in binary units rounded up, like `ls -lh` (`1023`, `1.5K`, `23M`, `4.0G`).
//! - `--checksum`: an extra column before the path: the BLAKE3 digest (hex) of each regular file, `-` for other
//!   entries, `?` for a file that could not be read. Digests are computed on every core by the engine; lines still
//!   come out in listing order, through a reorder window of at most `jobs_in_flight_max` pending lines.
//! - `--json`: one object per line and entry: `path` (lossy UTF-8), `type` (`file`, `dir`, `symlink` or `other`),
//!   `size`, `mode` (octal string, `"0644"`), `mtime` (RFC 3339, UTC, nanoseconds), `mtime_ns` (nanoseconds since
//!   the epoch), `target` (symlinks only) and `blake3` (with `--checksum`, regular files that could be read).
//!
//! A nonexistent PATH is an error (exit 1). An unreadable directory or a file that cannot be hashed is reported on
//! stderr (`fastsync: <what> '<path>': <cause>`), the listing goes on, and the exit code is 1. A closed stdout
//! (`| head`) ends the listing quietly.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use fastsync_engine::{Completion, Engine, EngineConfig, HashJob, Job, Outcome, Session, Show};

use crate::Error;
use crate::error::exit;

/// The long help of `fastsync list` (shown by `fastsync list --help`).
pub const LONG_ABOUT: &str = "List PATH like `ls -l`: one line per entry with the type and permissions, the size in \
    bytes, the modification time in UTC with nanoseconds (YYYY-MM-DD HH:MM:SS.nnnnnnnnn) and the path relative to \
    PATH (symlinks end in ' -> TARGET'). A directory's entries are sorted by name (byte order); a PATH that is not a \
    directory is listed as one line naming it. Symlinks are never followed (write PATH/ to list the directory a \
    symlink points to).\n\nWith --checksum, the BLAKE3 digest of each regular file (computed on every core) comes \
    before the path ('-' for other entries, '?' for files that cannot be read). With --json, each entry is one JSON \
    object per line: path, type (file, dir, symlink, other), size, mode (octal string), mtime (RFC 3339, UTC), \
    mtime_ns, target (symlinks) and blake3 (with --checksum).\n\nEntries that cannot be read are reported on stderr; \
    the listing goes on and the exit status is 1.";

/// Width of the size column in bytes, and with `-h`.
const SIZE_WIDTH: usize = 12;
const HUMAN_SIZE_WIDTH: usize = 5;
/// Width of the digest column (64 hex digits).
const DIGEST_WIDTH: usize = 64;

#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
pub struct ListArgs {
    /// Directory or file to list
    pub path: PathBuf,
    /// List subdirectories too, depth-first (symlinks are listed, never followed)
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Sizes in binary units, rounded up like ls -lh: 1023, 1.5K, 23M, 4.0G
    #[arg(short = 'h', long)]
    pub human_readable: bool,
    /// Print the BLAKE3 digest of every regular file (computed on every core) before its path
    #[arg(short = 'c', long)]
    pub checksum: bool,
    /// Print help
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

/// List `args.path`; returns the exit code (0, or 1 when some entry could not be read or hashed).
pub fn run(args: &ListArgs, engine: &dyn Engine, config: &EngineConfig, json: bool) -> Result<i32, Error> {
    let root = args.path.as_path();
    let md = fs::symlink_metadata(root).map_err(|e| Error::io("cannot stat", root, e))?;
    let session = if args.checksum { Some(engine.start(config)?) } else { None };
    let stdout = io::stdout();
    let mut lister = Lister {
        out: BufWriter::with_capacity(64 << 10, stdout.lock()),
        human: args.human_readable,
        json,
        checksum: args.checksum,
        session,
        window: VecDeque::new(),
        front_seq: 0,
        window_max: config.jobs_in_flight_max.max(1),
        errors: 0,
    };
    let result = lister.list(root, &md, args.recursive).and_then(|()| lister.finish());
    match result {
        Ok(()) => Ok(if lister.errors > 0 { exit::PARTIAL } else { exit::OK }),
        Err(Halt::BrokenPipe) => {
            // Nobody reads what is left: stop the shards' queued work and end quietly.
            if let Some(s) = lister.session.take() {
                s.cancel();
            }
            Ok(exit::PARTIAL)
        }
        Err(Halt::Fatal(e)) => {
            if let Some(s) = lister.session.take() {
                s.cancel();
            }
            let _ = lister.out.flush();
            Err(e)
        }
    }
}

/// Why the listing stops early.
enum Halt {
    /// Stdout was closed by its reader.
    BrokenPipe,
    /// Writing failed otherwise, or the engine died.
    Fatal(Error),
}

impl From<fastsync_engine::EngineError> for Halt {
    fn from(e: fastsync_engine::EngineError) -> Self {
        Halt::Fatal(Error::Engine(e))
    }
}

fn write_error(e: io::Error) -> Halt {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Halt::BrokenPipe
    } else {
        Halt::Fatal(Error::io("error writing", "standard output", e))
    }
}

/// What one line shows, taken from `lstat` (or, for a `fastsync://` path, from the server's listing).
pub(crate) struct Entry {
    pub(crate) rel: PathBuf,
    pub(crate) kind: Kind,
    pub(crate) mode: u32,
    pub(crate) size: u64,
    pub(crate) mtime_sec: i64,
    pub(crate) mtime_nsec: i64,
    pub(crate) target: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
    /// Another type, as a remote listing says (`?` like `ls` for an unknown type).
    Other,
}

impl Kind {
    fn of(md: &Metadata) -> Kind {
        let t = md.file_type();
        if t.is_file() {
            Kind::File
        } else if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Symlink
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_socket() {
            Kind::Socket
        } else if t.is_char_device() {
            Kind::CharDev
        } else {
            Kind::BlockDev
        }
    }

    /// The first letter of `ls -l`'s mode string.
    fn letter(self) -> u8 {
        match self {
            Kind::File => b'-',
            Kind::Dir => b'd',
            Kind::Symlink => b'l',
            Kind::Fifo => b'p',
            Kind::Socket => b's',
            Kind::CharDev => b'c',
            Kind::BlockDev => b'b',
            Kind::Other => b'?',
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            _ => "other",
        }
    }
}

/// A line's digest column.
pub(crate) enum Digest {
    /// Not a regular file, or no `--checksum`.
    NotHashed,
    /// The engine has the job.
    Waiting,
    Done([u8; 32]),
    /// The file could not be read; the message is printed when the line is.
    Failed(String),
}

/// An entry of the reorder window: a line, or an error message to print in its place in the listing.
enum Item {
    Line(Entry, Digest),
    Error(String),
}

struct Lister<W: Write> {
    out: W,
    human: bool,
    json: bool,
    checksum: bool,
    /// Hashes regular files (with `--checksum`).
    session: Option<Session>,
    /// Lines (and errors) not yet printed, in listing order; the front is printed as soon as it is complete.
    window: VecDeque<Item>,
    /// Sequence number of the window's front; a hash job's tag is its line's sequence number.
    front_seq: u64,
    window_max: usize,
    errors: u64,
}

impl<W: Write> Lister<W> {
    fn list(&mut self, root: &Path, md: &Metadata, recursive: bool) -> Result<(), Halt> {
        if !md.is_dir() {
            // A file (or a symlink, never followed) is listed as one line naming it.
            let rel = root.file_name().map_or_else(|| root.to_path_buf(), PathBuf::from);
            return self.entry(root, rel, md);
        }
        let Some(names) = self.read_dir(root)? else { return Ok(()) };
        // Depth-first: one iterator of sorted names per directory level being listed.
        let mut stack: Vec<(PathBuf, std::vec::IntoIter<OsString>)> = vec![(PathBuf::new(), names.into_iter())];
        while let Some((dir_rel, names)) = stack.last_mut() {
            let Some(name) = names.next() else {
                stack.pop();
                continue;
            };
            let rel = dir_rel.join(name);
            let full = root.join(&rel);
            let md = match fs::symlink_metadata(&full) {
                Ok(md) => md,
                Err(e) => {
                    self.error(format!("cannot stat '{}': {e}", full.shown()))?;
                    continue;
                }
            };
            let is_dir = md.is_dir();
            self.entry(&full, rel.clone(), &md)?;
            if recursive
                && is_dir
                && let Some(names) = self.read_dir(&full)?
            {
                stack.push((rel, names.into_iter()));
            }
        }
        Ok(())
    }

    /// The names in `dir`, sorted by bytes; `None` (reported) when it cannot be read at all. Names read before an
    /// error are kept (and the error is reported).
    fn read_dir(&mut self, dir: &Path) -> Result<Option<Vec<OsString>>, Halt> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) => {
                self.error(format!("cannot read directory '{}': {e}", dir.shown()))?;
                return Ok(None);
            }
        };
        let mut names = Vec::new();
        for entry in rd {
            match entry {
                Ok(entry) => names.push(entry.file_name()),
                Err(e) => {
                    self.error(format!("cannot read directory '{}': {e}", dir.shown()))?;
                    break;
                }
            }
        }
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        Ok(Some(names))
    }

    /// Queue the line of the entry at `full` (shown as `rel`), and its hash job when it is a regular file.
    fn entry(&mut self, full: &Path, rel: PathBuf, md: &Metadata) -> Result<(), Halt> {
        let kind = Kind::of(md);
        let target = if kind == Kind::Symlink {
            match fs::read_link(full) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.error(format!("cannot read symlink '{}': {e}", full.shown()))?;
                    None
                }
            }
        } else {
            None
        };
        let entry = Entry {
            rel,
            kind,
            mode: md.mode() & 0o7777,
            size: md.len(),
            mtime_sec: md.mtime(),
            mtime_nsec: md.mtime_nsec(),
            target,
        };
        let hash = self.checksum && kind == Kind::File;
        let seq = self.front_seq + self.window.len() as u64;
        self.window.push_back(Item::Line(entry, if hash { Digest::Waiting } else { Digest::NotHashed }));
        if hash && let Some(session) = self.session.as_mut() {
            // The line is queued first: its digest may arrive while the job is being submitted.
            let job = Job::Hash(HashJob { tag: seq, path: full.to_path_buf(), follow_symlinks: false });
            let (window, front_seq) = (&mut self.window, self.front_seq);
            session.submit(job, &mut |c| record(window, front_seq, c))?;
        }
        self.advance()
    }

    /// Report a failure in its place in the listing; it makes the exit code 1.
    fn error(&mut self, msg: String) -> Result<(), Halt> {
        self.errors += 1;
        self.window.push_back(Item::Error(msg));
        self.advance()
    }

    /// Print what is complete at the front of the window; while the window is over its bound, wait for digests.
    fn advance(&mut self) -> Result<(), Halt> {
        self.print_ready()?;
        while self.window.len() > self.window_max {
            let Some(session) = self.session.as_mut() else { break };
            let (window, front_seq) = (&mut self.window, self.front_seq);
            session.wait(&mut |c| record(window, front_seq, c))?;
            self.print_ready()?;
        }
        Ok(())
    }

    fn print_ready(&mut self) -> Result<(), Halt> {
        while let Some(front) = self.window.front() {
            if matches!(front, Item::Line(_, Digest::Waiting)) {
                break;
            }
            let item = self.window.pop_front().expect("front exists");
            self.front_seq += 1;
            match item {
                Item::Line(entry, digest) => {
                    self.print_line(&entry, &digest)?;
                    if let Digest::Failed(msg) = digest {
                        self.errors += 1;
                        self.print_error(&msg)?;
                    }
                }
                Item::Error(msg) => self.print_error(&msg)?,
            }
        }
        Ok(())
    }

    fn print_error(&mut self, msg: &str) -> Result<(), Halt> {
        // Lines before the error appear before it when both streams go to one terminal or file.
        self.out.flush().map_err(write_error)?;
        let _ = writeln!(io::stderr().lock(), "fastsync: {msg}");
        Ok(())
    }

    fn print_line(&mut self, e: &Entry, digest: &Digest) -> Result<(), Halt> {
        let mut line = Vec::with_capacity(128);
        if self.json {
            json_line(&mut line, e, digest);
        } else {
            text_line(&mut line, e, self.human, self.checksum.then_some(digest));
        }
        line.push(b'\n');
        self.out.write_all(&line).map_err(write_error)
    }

    /// Wait for every digest, print the rest, stop the engine and flush.
    fn finish(&mut self) -> Result<(), Halt> {
        if let Some(session) = self.session.as_mut() {
            let (window, front_seq) = (&mut self.window, self.front_seq);
            session.drain(&mut |c| record(window, front_seq, c))?;
        }
        self.print_ready()?;
        if let Some(session) = self.session.take() {
            session.finish()?;
        }
        self.out.flush().map_err(write_error)
    }
}

/// One entry's line (newline included), with a digest column when `digest` is given (`--checksum`): shared with
/// remote listings (`src/remote/listing.rs`).
pub(crate) fn entry_line(e: &Entry, human: bool, json: bool, digest: Option<&Digest>) -> Vec<u8> {
    let mut line = Vec::with_capacity(128);
    if json {
        json_line(&mut line, e, digest.unwrap_or(&Digest::NotHashed));
    } else {
        text_line(&mut line, e, human, digest);
    }
    line.push(b'\n');
    line
}

/// The `ls -l`-style line of an entry; `digest` is the digest column's content with `--checksum`.
fn text_line(line: &mut Vec<u8>, e: &Entry, human: bool, digest: Option<&Digest>) {
    line.extend_from_slice(&mode_string(e.kind, e.mode));
    let size = if human {
        format!(" {:>HUMAN_SIZE_WIDTH$} ", human_size(e.size))
    } else {
        format!(" {:>SIZE_WIDTH$} ", e.size)
    };
    line.extend_from_slice(size.as_bytes());
    line.extend_from_slice(format_mtime(e.mtime_sec, e.mtime_nsec, ' ').as_bytes());
    line.push(b' ');
    if let Some(digest) = digest {
        let column = match digest {
            Digest::Done(d) => blake3::Hash::from_bytes(*d).to_hex().to_string(),
            Digest::NotHashed => "-".to_string(),
            Digest::Waiting | Digest::Failed(_) => "?".to_string(),
        };
        line.extend_from_slice(format!("{column:<DIGEST_WIDTH$} ").as_bytes());
    }
    name(line, e.rel.as_os_str().as_bytes());
    if let Some(t) = &e.target {
        line.extend_from_slice(b" -> ");
        name(line, t.as_os_str().as_bytes());
    }
}

/// A name as `ls` prints it: on a terminal with control characters and bytes that are not UTF-8 escaped (a name
/// must not move the cursor or split its line, see [`fastsync_engine::show`]); into a pipe or a file exactly as it
/// is, for scripts (`--json` is the unambiguous form).
fn name(line: &mut Vec<u8>, bytes: &[u8]) {
    static ESCAPE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ESCAPE.get_or_init(|| io::IsTerminal::is_terminal(&io::stdout())) {
        line.extend_from_slice(bytes.shown().to_string().as_bytes());
    } else {
        line.extend_from_slice(bytes);
    }
}

/// Store a digest (or the failure) in its line, found by the job's tag (the line's sequence number).
fn record(window: &mut VecDeque<Item>, front_seq: u64, c: Completion) {
    let slot = c.tag.checked_sub(front_seq).and_then(|i| window.get_mut(i as usize));
    let Some(Item::Line(_, digest)) = slot else { return };
    *digest = match c.outcome {
        Outcome::Hashed { digest, .. } => Digest::Done(digest),
        Outcome::Failed(e) => Digest::Failed(e.to_string()),
        other => Digest::Failed(format!("unexpected completion of a hash job: {other:?}")),
    };
}

#[derive(serde::Serialize)]
struct JsonEntry<'a> {
    path: Cow<'a, str>,
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
    mode: String,
    mtime: String,
    mtime_ns: i128,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    blake3: Option<String>,
}

fn json_line(line: &mut Vec<u8>, e: &Entry, digest: &Digest) {
    let j = JsonEntry {
        path: e.rel.to_string_lossy(),
        kind: e.kind.json_name(),
        size: e.size,
        mode: format!("{:04o}", e.mode),
        mtime: format!("{}Z", format_mtime(e.mtime_sec, e.mtime_nsec, 'T')),
        mtime_ns: i128::from(e.mtime_sec) * 1_000_000_000 + i128::from(e.mtime_nsec),
        target: e.target.as_deref().map(Path::to_string_lossy),
        blake3: match digest {
            Digest::Done(d) => Some(blake3::Hash::from_bytes(*d).to_hex().to_string()),
            _ => None,
        },
    };
    // Serializing strings and integers into a Vec cannot fail.
    let _ = serde_json::to_writer(line, &j);
}

/// `ls -l`'s mode string: type letter, then rwx for user, group, other with s/S, s/S and t/T for the special bits.
fn mode_string(kind: Kind, mode: u32) -> [u8; 10] {
    let mut s = *b"----------";
    s[0] = kind.letter();
    for (i, c) in b"rwxrwxrwx".iter().enumerate() {
        if mode & (0o400 >> i) != 0 {
            s[1 + i] = *c;
        }
    }
    for (bit, at, set) in [(0o4000, 3, b's'), (0o2000, 6, b's'), (0o1000, 9, b't')] {
        if mode & bit != 0 {
            s[at] = if s[at] == b'x' { set } else { set.to_ascii_uppercase() };
        }
    }
    s
}

/// `YYYY-MM-DD<sep>HH:MM:SS.nnnnnnnnn` in UTC.
fn format_mtime(sec: i64, nsec: i64, sep: char) -> String {
    let (days, secs_of_day) = (sec.div_euclid(86_400), sec.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs_of_day / 3600, secs_of_day % 3600 / 60, secs_of_day % 60);
    format!("{y:04}-{m:02}-{d:02}{sep}{hh:02}:{mm:02}:{ss:02}.{nsec:09}")
}

/// The proleptic Gregorian date of a day number (days since 1970-01-01), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of the 400-year era, [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year starting March 1st, [0, 365]
    let mp = (5 * doy + 2) / 153; // month starting from March, [0, 11]
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `ls -lh`'s size: bytes below 1024, else the smallest binary unit under 1024, rounded up, with one decimal below
/// 10 (`1.5K`, `23M`, `4.0G`).
fn human_size(size: u64) -> String {
    if size < 1024 {
        return size.to_string();
    }
    let size = u128::from(size);
    let mut unit = 1u128;
    for suffix in ["K", "M", "G", "T", "P"] {
        unit *= 1024;
        let tenths = (size * 10).div_ceil(unit);
        if tenths < 100 {
            return format!("{}.{}{suffix}", tenths / 10, tenths % 10);
        }
        let whole = size.div_ceil(unit);
        if whole < 1024 {
            return format!("{whole}{suffix}");
        }
    }
    // A u64 is below 16E.
    let (unit, tenths) = (unit * 1024, (size * 10).div_ceil(unit * 1024));
    if tenths < 100 { format!("{}.{}E", tenths / 10, tenths % 10) } else { format!("{}E", size.div_ceil(unit)) }
}
