//! Temporary names, and cleaning up the ones that interrupted runs left behind.
//!
//! Every file is written under a hidden temporary name in its destination directory, marked `.fstmp-`:
//! - `.NAME.fstmp-PID-N`: a file (or symlink, or hard link) being created by process PID;
//! - `.NAME.fstmp-part` and `.NAME.fstmp-journal`: a large file and its resume journal (see
//!   `fastsync_engine::journal`), kept by an interrupted run so that the next one continues where it stopped.
//!
//! A run also leaves a marker while it works, outside the destination (so a no-op sync changes nothing there, not
//! even a directory's ctime): `$XDG_STATE_HOME/fastsync/runs/KEY.PID` (else `~/.local/state/...`), where KEY is a
//! digest of the destination directory's canonical path. It is removed when the run ends without being interrupted.
//! A later run on the same destination that finds the marker of a dead process knows that temporaries may be left,
//! and cleans every destination directory it visits: stale per-process temporaries are removed, and partial files
//! whose source is gone are removed with their journals. Runs that follow clean runs never pay for the scan. Where
//! no state directory can be written, there is no marker, and stale temporaries are only cleaned by `sync --delete`
//! (which skips them) or by hand.
//!
//! A push to a `fastsync://` server leaves the same marker, keyed by the destination's URL: after a dead push, the
//! next one asks the server to clean each destination directory it visits (`Clean`, `DropParts` in
//! docs/PROTOCOL.md), and the server decides with [`parse_temporary`] and [`process_alive`] what may go.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use fastsync_engine::Show;

/// The part of every temporary name that marks it as ours.
pub const MARK: &[u8] = b".fstmp-";

/// This process's id, read once (it is part of every temporary name; `getpid` per file showed in profiles).
fn pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(std::process::id)
}

/// Temporary name for `dst` in this process, number `seq`.
pub fn unique(dst: &Path, seq: u64) -> PathBuf {
    with_suffix(dst, format!("{}-{seq}", pid()).as_bytes())
}

/// The stable name a resumable large file is written under.
pub fn part(dst: &Path) -> PathBuf {
    with_suffix(dst, b"part")
}

/// The resume journal beside [`part`].
pub fn journal(dst: &Path) -> PathBuf {
    with_suffix(dst, b"journal")
}

/// `.NAME.fstmp-SUFFIX` beside `dst`, keeping the whole name within NAME_MAX (255) bytes.
fn with_suffix(dst: &Path, suffix: &[u8]) -> PathBuf {
    let name = dst.file_name().map(|n| n.as_bytes()).unwrap_or(b"file");
    let keep = &name[..name.len().min(200)];
    let mut tmp = Vec::with_capacity(keep.len() + MARK.len() + suffix.len() + 1);
    tmp.push(b'.');
    tmp.extend_from_slice(keep);
    tmp.extend_from_slice(MARK);
    tmp.extend_from_slice(suffix);
    dst.with_file_name(OsStr::from_bytes(&tmp))
}

/// Whether a directory entry's name is one of our temporaries (skipped by walks and deletion).
pub fn is_temporary(name: &OsStr) -> bool {
    name.as_bytes().windows(MARK.len()).any(|w| w == MARK)
}

/// This run's marker, and the markers of dead runs on the same destination that it found.
#[derive(Debug)]
pub struct RunMarker {
    own: PathBuf,
    dead: Vec<PathBuf>,
}

impl RunMarker {
    /// Drop a marker for a run whose temporaries go into `dir` (which exists). `None` when there is no state
    /// directory to put it in.
    pub fn start(dir: &Path) -> Option<RunMarker> {
        let canonical = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        RunMarker::start_for(canonical.as_os_str().as_bytes())
    }

    /// Drop a marker for a run whose destination is named `destination` (a canonical path, or a `fastsync://` URL
    /// for a push). `None` when there is no state directory to put it in.
    pub fn start_for(destination: &[u8]) -> Option<RunMarker> {
        let runs = runs_dir()?;
        fs::create_dir_all(&runs).ok()?;
        let key = blake3::hash(destination).to_hex();
        let key = &key.as_str()[..16];
        let mut dead = Vec::new();
        for entry in fs::read_dir(&runs).ok()?.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.as_bytes().strip_prefix(key.as_bytes()).and_then(|r| r.strip_prefix(b".")) else {
                continue;
            };
            let pid = std::str::from_utf8(rest).ok().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !alive(p)) {
                dead.push(entry.path());
            }
        }
        let own = runs.join(format!("{key}.{}", pid()));
        let mut text = destination.to_vec();
        text.push(b'\n');
        fs::write(&own, text).ok()?;
        Some(RunMarker { own, dead })
    }

    /// Whether a dead run left temporaries to look for.
    pub fn dead_runs_found(&self) -> bool {
        !self.dead.is_empty()
    }

    /// The run ended without being interrupted: its temporaries are gone, and those of the dead runs were cleaned
    /// wherever this run looked.
    pub fn finish(self) {
        for p in self.dead.iter().chain([&self.own]) {
            let _ = fs::remove_file(p);
        }
    }
}

/// Where run markers live: `$XDG_STATE_HOME/fastsync/runs`, else `$HOME/.local/state/fastsync/runs`.
fn runs_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_STATE_HOME").map(PathBuf::from).filter(|p| p.is_absolute()) {
        Some(p) => p,
        None => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(".local/state"),
    };
    Some(base.join("fastsync/runs"))
}

/// What a temporary name is.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// `.NAME.fstmp-PID-N`, of process `pid`.
    Unique { pid: u32 },
    /// `.NAME.fstmp-part`, the partial file of NAME (`base`).
    Part { base: OsString },
    /// `.NAME.fstmp-journal`, its journal.
    Journal { base: OsString },
}

/// What the temporary `name` is; `None` for any other name.
pub fn parse_temporary(name: &OsStr) -> Option<Kind> {
    parse(name)
}

fn parse(name: &OsStr) -> Option<Kind> {
    let b = name.as_bytes();
    let at = b.windows(MARK.len()).rposition(|w| w == MARK)?;
    let (head, suffix) = (&b[..at], &b[at + MARK.len()..]);
    let base = || OsString::from(OsStr::from_bytes(head.strip_prefix(b".").unwrap_or(head)));
    match suffix {
        b"part" => Some(Kind::Part { base: base() }),
        b"journal" => Some(Kind::Journal { base: base() }),
        _ => {
            let s = std::str::from_utf8(suffix).ok()?;
            let (pid, seq) = s.split_once('-')?;
            seq.parse::<u64>().ok()?;
            Some(Kind::Unique { pid: pid.parse().ok()? })
        }
    }
}

/// Whether process `pid` is alive and is a fastsync (a reused PID of another program does not count).
pub fn process_alive(pid: u32) -> bool {
    alive(pid)
}

fn alive(pid: u32) -> bool {
    if pid == self::pid() {
        return true;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
        || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    if !exists {
        return false;
    }
    match fs::read(format!("/proc/{pid}/stat")) {
        // "PID (COMM) STATE ...": a zombie (killed, not yet reaped) is as dead as it gets.
        Ok(stat) => {
            let Some(close) = stat.iter().rposition(|&b| b == b')') else { return true };
            let comm = stat.iter().position(|&b| b == b'(').map_or(&stat[..0], |open| &stat[open + 1..close]);
            let state = stat.get(close + 2).copied();
            comm.starts_with(b"fastsync") && state != Some(b'Z')
        }
        // No procfs (or no access): trust the PID.
        Err(_) => true,
    }
}

/// Whether someone holds the lock of the journal at `path`.
fn journal_locked(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = fs::File::open(path) else { return false };
    // SAFETY: plain syscall on a descriptor we own; the lock (if taken) is released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Remove stale temporaries from the destination directory `dst_dir`, whose source is `src_dir` (`None` when there
/// is no source directory: a single-file transfer). Returns the number removed and the failures, one line each.
pub fn clean_dir(dst_dir: &Path, src_dir: Option<&Path>) -> (u64, Vec<String>) {
    let mut removed = 0;
    let mut failures = Vec::new();
    let Ok(entries) = fs::read_dir(dst_dir) else { return (0, failures) };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !is_temporary(&name) {
            continue;
        }
        let stale = match parse(&name) {
            Some(Kind::Unique { pid }) => !alive(pid),
            Some(Kind::Part { base }) => {
                let journal = journal(&dst_dir.join(&base));
                !journal_locked(&journal) && (!journal.exists() || !source_is_file(src_dir, &base))
            }
            Some(Kind::Journal { base }) => {
                let path = entry.path();
                !journal_locked(&path) && (!part(&dst_dir.join(&base)).exists() || !source_is_file(src_dir, &base))
            }
            None => false,
        };
        if !stale {
            continue;
        }
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => failures.push(format!("cannot remove stale temporary '{}': {e}", path.shown())),
        }
    }
    (removed, failures)
}

fn source_is_file(src_dir: Option<&Path>, base: &OsStr) -> bool {
    match src_dir {
        Some(dir) => fs::metadata(dir.join(base)).is_ok_and(|m| m.is_file()),
        // A single-file transfer: its partial file is resumed (or restarted) by the run itself.
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let dst = Path::new("/d/data.bin");
        assert_eq!(part(dst), Path::new("/d/.data.bin.fstmp-part"));
        assert_eq!(journal(dst), Path::new("/d/.data.bin.fstmp-journal"));
        assert_eq!(parse(OsStr::new(".data.bin.fstmp-part")), Some(Kind::Part { base: "data.bin".into() }));
        assert_eq!(parse(OsStr::new(".a.fstmp-journal")), Some(Kind::Journal { base: "a".into() }));
        assert_eq!(parse(OsStr::new(".a.fstmp-123-7")), Some(Kind::Unique { pid: 123 }));
        assert_eq!(parse(OsStr::new(".a.fstmp-x")), None);
        assert!(is_temporary(unique(dst, 3).file_name().unwrap()));
        assert!(!is_temporary(OsStr::new("fstmp")));
        let long = "x".repeat(255);
        assert!(unique(&Path::new("/d").join(&long), u64::MAX).file_name().unwrap().len() <= 255);
    }

    #[test]
    fn dead_processes_temporaries_are_removed_live_ones_kept() {
        let dir = std::env::temp_dir().join(format!("fs-stale-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // PID 2^22+1 is above the kernel's pid_max limit: never alive.
        let dead = dir.join(".f.fstmp-4194305-1");
        let mine = unique(&dir.join("g"), 1);
        let orphan_part = dir.join(".h.fstmp-part");
        fs::write(&dead, b"x").unwrap();
        fs::write(&mine, b"x").unwrap();
        fs::write(&orphan_part, b"x").unwrap();
        fs::write(dir.join("keep"), b"x").unwrap();
        let (removed, failures) = clean_dir(&dir, None);
        assert_eq!((removed, failures.len()), (2, 0));
        assert!(!dead.exists() && !orphan_part.exists());
        assert!(mine.exists() && dir.join("keep").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
