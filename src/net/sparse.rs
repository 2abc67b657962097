//! Sparse files over `fastsync://`: a sender looks for holes before each chunk (`SEEK_DATA`) and sends a hole as
//! one small message (`Hole` in a `Get` answer, `PutHole` in a push) instead of its zeros; a receiver leaves the
//! range without blocks. Holes stay holes, as in a local copy, and cost nothing on the wire.

use std::fs::File;
use std::io;
#[cfg(any(target_os = "linux", target_os = "freebsd"))]
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Whether a file of `size` bytes occupying `blocks` 512-byte blocks has holes (what `cp --sparse=auto` asks).
pub fn looks_sparse(blocks: u64, size: u64) -> bool {
    blocks.saturating_mul(512) < size
}

/// The next piece of a sparse file from a given offset, and where it ends (at most the limit asked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    Hole(u64),
    Data(u64),
}

/// A sender's walk through a sparse file's data and holes, in order: one `SEEK_DATA`/`SEEK_HOLE` pair per data
/// extent, not per chunk sent.
pub struct Walker<'a> {
    file: &'a File,
    size: u64,
    /// Where the data extent last found ends.
    data_end: u64,
}

impl<'a> Walker<'a> {
    /// A walker for `file` when it has holes (`None`: send it all as data).
    pub fn for_file(file: &'a File) -> Option<Walker<'a>> {
        use std::os::unix::fs::MetadataExt;
        let md = file.metadata().ok()?;
        looks_sparse(md.blocks(), md.size()).then_some(Walker { file, size: md.size(), data_end: 0 })
    }

    /// The piece that starts at `pos` (no further than `end`): a hole to skip, or data to send.
    pub fn next(&mut self, pos: u64, end: u64) -> Piece {
        if pos < self.data_end {
            return Piece::Data(self.data_end.min(end));
        }
        if let Some(hole_end) = hole_at(self.file, pos, end, self.size) {
            return Piece::Hole(hole_end);
        }
        // The whole extent, whatever `end` is, so that the next chunks of it need no lookup.
        self.data_end = data_end(self.file, pos, u64::MAX, self.size).max(pos + 1);
        Piece::Data(self.data_end.min(end))
    }
}

/// When `pos` lies in a hole of `file` (of `size` bytes): where the hole ends, at most `end` and `size`. `None`
/// when data starts at `pos`, or the system cannot tell (then everything counts as data).
fn hole_at(file: &File, pos: u64, end: u64, size: u64) -> Option<u64> {
    let limit = end.min(size);
    if pos >= limit {
        return None;
    }
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    {
        let off = libc::off_t::try_from(pos).ok()?;
        // SAFETY: plain lseek on a descriptor we hold; it moves a file offset nothing else relies on (reads use
        // pread).
        let data = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data from `pos` to the end of the file.
            return (io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)).then_some(limit);
        }
        let data = data as u64;
        (data > pos).then_some(data.min(limit))
    }
    #[cfg(not(any(target_os = "linux", target_os = "freebsd")))]
    {
        let _ = file;
        None
    }
}

/// Where the data that starts at `pos` ends: the next hole, at most `end` and `size` (`end.min(size)` when the
/// system cannot tell).
#[cfg_attr(not(any(target_os = "linux", target_os = "freebsd")), allow(unused_variables))]
fn data_end(file: &File, pos: u64, end: u64, size: u64) -> u64 {
    let limit = end.min(size);
    #[cfg(any(target_os = "linux", target_os = "freebsd"))]
    if let Ok(off) = libc::off_t::try_from(pos) {
        // SAFETY: as in `hole_at`.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_HOLE) };
        if hole > 0 {
            return (hole as u64).min(limit).max(pos);
        }
    }
    let _ = file;
    limit
}

/// Make `[offset, offset + len)` of `file` a hole (read as zeros, no blocks): punched, or written with zeros where
/// the filesystem cannot punch; the file grows to `offset + len` if it is shorter.
pub fn make_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let end = offset.checked_add(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    if len == 0 {
        return Ok(());
    }
    #[cfg(target_os = "linux")]
    {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let (o, l) = (offset as libc::off_t, len as libc::off_t);
        // SAFETY: plain fallocate on a descriptor we hold.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
            write_zeros(file, offset, len)?;
        }
    }
    #[cfg(not(target_os = "linux"))]
    write_zeros(file, offset, len)?;
    if file.metadata()?.len() < end {
        file.set_len(end)?;
    }
    Ok(())
}

fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (1 << 20).min(len) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn holes_are_found_and_made() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
        let mib = 1u64 << 20;
        // data [0, 1 MiB), hole [1, 5 MiB), data [5, 6 MiB), hole to 8 MiB.
        f.write_all_at(&vec![7u8; mib as usize], 0).unwrap();
        f.write_all_at(&vec![8u8; mib as usize], 5 * mib).unwrap();
        f.set_len(8 * mib).unwrap();
        let size = 8 * mib;
        let md = f.metadata().unwrap();
        if !looks_sparse(md.blocks(), size) {
            return; // a filesystem without holes: nothing to find
        }
        assert_eq!(hole_at(&f, 0, size, size), None);
        assert_eq!(hole_at(&f, mib, size, size), Some(5 * mib));
        assert_eq!(hole_at(&f, 2 * mib, 3 * mib, size), Some(3 * mib), "capped by the range");
        assert_eq!(hole_at(&f, 6 * mib, size, size), Some(size), "a hole up to the end");
        assert_eq!(hole_at(&f, size, size + mib, size), None, "nothing past the end");
        assert_eq!(data_end(&f, 0, size, size), mib);
        assert_eq!(data_end(&f, 5 * mib + 10, size, size), 6 * mib);
        assert_eq!(data_end(&f, 5 * mib, 5 * mib + 100, size), 5 * mib + 100, "capped by the range");
        let mut w = Walker::for_file(&f).expect("sparse");
        assert_eq!(w.next(0, 3 * mib), Piece::Data(mib));
        assert_eq!(w.next(mib, 3 * mib), Piece::Hole(3 * mib));
        assert_eq!(w.next(5 * mib, size), Piece::Data(6 * mib));
        assert_eq!(w.next(5 * mib + 10, 5 * mib + 20), Piece::Data(5 * mib + 20), "within the extent found");
        assert_eq!(w.next(6 * mib, size), Piece::Hole(size));
        // Punch the first data block; extend the file by a hole.
        make_hole(&f, 0, mib).unwrap();
        make_hole(&f, size, mib).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 9 * mib);
        let mut buf = vec![1u8; mib as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(f.metadata().unwrap().blocks() * 512 <= mib + 64 * 1024, "only the second data block is left");
    }
}
