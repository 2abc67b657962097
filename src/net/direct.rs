//! Received chunks of large files written with O_DIRECT, on both sides of a `fastsync://` transfer (the server's
//! pushes, the client's pulls), as a local copy writes them (see `copy.rs`): no page-cache copy of every byte and no
//! new page for the kernel to hand out per 4 KiB, which on the measured machines is what limits a buffered receiver.
//!
//! A [`DirectFile`] is a second descriptor on the receiving temporary, opened with O_DIRECT where the filesystem
//! allows. A chunk whose offset is 4 KiB-aligned goes through it from a per-thread, huge-page, aligned buffer (the
//! payload is copied there: it arrives after a frame header); what cannot be aligned — a chunk off a block boundary,
//! the last partial block of the file — goes through the ordinary descriptor. The kernel keeps the two coherent.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use fastsync_engine::AlignedArena;

use crate::net::wire::CHUNK_BYTES_MAX;

/// Files at least this large are received with O_DIRECT (the threshold of a local copy).
pub const DIRECT_FILE_BYTES_MIN: u64 = 64 << 20;

/// O_DIRECT's alignment of offsets, lengths and buffers on every device we expect.
const ALIGN_BYTES: usize = 4096;

/// The aligned buffer a receiving thread copies a chunk into: one per thread that ever writes directly (a server
/// connection's, or a pull stream's), at most [`CHUNK_BYTES_MAX`].
pub const BUFFER_BYTES: u64 = CHUNK_BYTES_MAX as u64;

thread_local! {
    static BUFFER: RefCell<Option<AlignedArena>> = const { RefCell::new(None) };
}

/// An O_DIRECT descriptor on a file being received.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
}

impl DirectFile {
    /// A direct descriptor on the same file as `file` (reopened through /proc/self/fd, so no name is looked up
    /// again), when `size` reaches the threshold and the filesystem takes O_DIRECT; `None` otherwise.
    #[cfg(target_os = "linux")]
    pub fn open(file: &File, size: u64) -> Option<DirectFile> {
        use std::os::unix::fs::OpenOptionsExt;
        if size < DIRECT_FILE_BYTES_MIN {
            return None;
        }
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        File::options().write(true).custom_flags(libc::O_DIRECT).open(path).ok().map(|file| DirectFile { file })
    }

    #[cfg(not(target_os = "linux"))]
    pub fn open(_file: &File, _size: u64) -> Option<DirectFile> {
        None
    }

    /// The O_DIRECT descriptor (for a socket job that writes through it).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Write `bytes` at `offset` of the file, whose ordinary descriptor is `plain`: the 4 KiB-aligned part directly,
    /// the rest (a partial last block, or a chunk off a block boundary) through `plain`.
    pub fn write_at(&self, plain: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
        let aligned_len = if offset.is_multiple_of(ALIGN_BYTES as u64) && bytes.len() <= CHUNK_BYTES_MAX {
            bytes.len() / ALIGN_BYTES * ALIGN_BYTES
        } else {
            0
        };
        if aligned_len > 0 {
            let direct = BUFFER.with(|b| {
                let mut b = b.borrow_mut();
                let arena = b.get_or_insert_with(|| AlignedArena::new(CHUNK_BYTES_MAX, 1));
                // SAFETY: the thread's own buffer; no I/O is in flight on it outside this call.
                let buf = unsafe { &mut arena.slot_mut(0)[..aligned_len] };
                buf.copy_from_slice(&bytes[..aligned_len]);
                self.file.write_all_at(buf, offset)
            });
            match direct {
                Ok(()) => {}
                // A device with larger blocks than 4 KiB: this chunk goes the ordinary way.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return plain.write_all_at(bytes, offset),
                Err(e) => return Err(e),
            }
        }
        if aligned_len < bytes.len() {
            plain.write_all_at(&bytes[aligned_len..], offset + aligned_len as u64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_chunks_go_direct_and_the_rest_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let plain = File::options().read(true).write(true).create_new(true).open(&path).unwrap();
        assert!(DirectFile::open(&plain, DIRECT_FILE_BYTES_MIN - 1).is_none(), "small files stay buffered");
        let Some(direct) = DirectFile::open(&plain, DIRECT_FILE_BYTES_MIN) else {
            return; // a filesystem without O_DIRECT (tmpfs before Linux 6.6): nothing to test here
        };
        let data: Vec<u8> = (0..3 * ALIGN_BYTES + 100).map(|i| (i % 251) as u8).collect();
        // An aligned chunk with a partial last block, then one off a block boundary.
        direct.write_at(&plain, &data, 0).unwrap();
        direct.write_at(&plain, &data[..1000], 3 * ALIGN_BYTES as u64 + 100).unwrap();
        let mut want = data.clone();
        want.extend_from_slice(&data[..1000]);
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }
}
