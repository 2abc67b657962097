//! The resume journal of a large file: which ranges of its temporary are written, so an interrupted run continues.
//!
//! A resumable copy writes to a stable temporary name (`.NAME.fstmp-part`) beside a journal
//! (`.NAME.fstmp-journal`). The journal is a small text file: a header that identifies the source (size,
//! modification time, inode) and the chunk size, then one `OFFSET LEN` line per range, appended (`O_APPEND`, one
//! `write` per line) by the shard that finished the range. A run holds an exclusive `flock` on it, so two runs never
//! share a temporary; the kernel drops the lock when a run dies, even by SIGKILL.
//!
//! Nothing in it is trusted blindly: a range it lists is copied again unless the BLAKE3 digests of the source's and
//! the temporary's bytes agree (the data may not have reached the disk before a crash, or the source may have been
//! rewritten in place with the same size and time).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::Timestamp;

/// Header line prefix; bump the number when the format changes (old journals are then ignored and replaced).
const MAGIC: &str = "fastsync-journal 1";

/// Ranges recorded by an earlier run beyond this many make the journal suspicious (it is ignored and rewritten):
/// a file is cut into at most a few thousand chunks.
const RECORDS_MAX: usize = 1 << 20;

/// What the journal's source was: a resumed copy must come from the same, unchanged source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceId {
    pub size: u64,
    pub mtime: Timestamp,
    pub ino: u64,
}

/// An open, locked journal.
#[derive(Debug)]
pub struct Journal {
    file: File,
    path: PathBuf,
}

/// What an earlier run left: the chunk size it used and the ranges it finished (offset, length).
#[derive(Debug, Default)]
pub struct Recorded {
    pub chunk_bytes: u64,
    pub ranges: Vec<(u64, u64)>,
}

/// How opening a journal went.
#[derive(Debug)]
pub enum Opened {
    /// A journal of the same source was found: resume from `Recorded`.
    Resume(Journal, Recorded),
    /// No usable journal: a fresh, empty one was written (the temporary must be started over).
    Fresh(Journal),
    /// Another live run holds this journal: use a private temporary name instead.
    Busy,
}

impl Journal {
    /// Open (or create) the journal at `path` for a copy of `source` in chunks of `chunk_bytes`, taking its lock.
    pub fn open(path: &Path, source: SourceId, chunk_bytes: u64) -> io::Result<Opened> {
        // O_NOFOLLOW: a symlink planted under the journal's name is refused, never written through.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        // Not truncated: an earlier run's records are read first (and the file is emptied only if they are unusable).
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(Opened::Busy) } else { Err(e) };
        }
        if let Some(recorded) = parse(&file, source) {
            // Appends go to the end whatever the position; reopen in append mode so each record is one write.
            let file = append_mode(file)?;
            return Ok(Opened::Resume(Journal { file, path: path.to_path_buf() }, recorded));
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", header(source, chunk_bytes))?;
        let file = append_mode(file)?;
        Ok(Opened::Fresh(Journal { file, path: path.to_path_buf() }))
    }

    /// Record that `[offset, offset + len)` of the temporary is written.
    pub fn record(&self, offset: u64, len: u64) -> io::Result<()> {
        // One write of one short line: O_APPEND makes concurrent records from several shards land whole.
        (&self.file).write_all(format!("{offset} {len}\n").as_bytes())
    }

    /// Remove the journal (its file is complete); errors are ignored, a stale journal is cleaned by a later run.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Switch the locked descriptor to O_APPEND (reopening would lose the lock's guarantee between the two opens).
fn append_mode(file: File) -> io::Result<File> {
    // SAFETY: plain fcntl calls on a descriptor we own.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_APPEND) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

fn header(source: SourceId, chunk_bytes: u64) -> String {
    format!(
        "{MAGIC} size={} mtime={}.{:09} ino={} chunk={chunk_bytes}",
        source.size, source.mtime.sec, source.mtime.nsec, source.ino
    )
}

/// The ranges an earlier run recorded, if the journal is well formed and describes `source`.
fn parse(file: &File, source: SourceId) -> Option<Recorded> {
    let mut lines = BufReader::new(file).lines();
    let head = lines.next()?.ok()?;
    let chunk = head.rsplit_once(" chunk=")?;
    if chunk.0 != header(source, 0).rsplit_once(" chunk=")?.0 {
        return None;
    }
    let mut recorded = Recorded { chunk_bytes: chunk.1.parse().ok()?, ranges: Vec::new() };
    for line in lines {
        let line = line.ok()?;
        // A line cut short by a crash is simply not a record.
        let Some((offset, len)) = line.split_once(' ') else { continue };
        let (Ok(offset), Ok(len)) = (offset.parse::<u64>(), len.parse::<u64>()) else { continue };
        if offset.checked_add(len).is_none_or(|end| end > source.size) || recorded.ranges.len() >= RECORDS_MAX {
            return None;
        }
        recorded.ranges.push((offset, len));
    }
    Some(recorded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(size: u64) -> SourceId {
        SourceId { size, mtime: Timestamp { sec: 1_700_000_000, nsec: 5 }, ino: 42 }
    }

    #[test]
    fn records_survive_reopen_and_mismatch_starts_fresh() {
        let dir = std::env::temp_dir().join(format!("fs-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j");
        let Opened::Fresh(j) = Journal::open(&path, id(100), 10).unwrap() else { panic!("expected fresh") };
        j.record(0, 10).unwrap();
        j.record(20, 10).unwrap();
        drop(j);
        let Opened::Resume(j, rec) = Journal::open(&path, id(100), 99).unwrap() else { panic!("expected resume") };
        assert_eq!(rec.chunk_bytes, 10);
        assert_eq!(rec.ranges, vec![(0, 10), (20, 10)]);
        // While held, a second opener is told to go elsewhere.
        assert!(matches!(Journal::open(&path, id(100), 10).unwrap(), Opened::Busy));
        drop(j);
        // Another source (size differs): fresh, and the old records are gone.
        let Opened::Fresh(j) = Journal::open(&path, id(101), 10).unwrap() else { panic!("expected fresh") };
        drop(j);
        let Opened::Resume(_, rec) = Journal::open(&path, id(101), 10).unwrap() else { panic!("expected resume") };
        assert!(rec.ranges.is_empty());
        // A record past the source's end makes the journal untrustworthy.
        std::fs::write(&path, format!("{}\n0 10\n95 10\n", header(id(100), 10))).unwrap();
        assert!(matches!(Journal::open(&path, id(100), 10).unwrap(), Opened::Fresh(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
