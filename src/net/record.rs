//! The record layer: after `AuthOk`, when the handshake agreed on `--encrypt` and/or `--compress`, both directions of
//! a connection carry **records** instead of bare frames.
//!
//! A record is `len: u32 LE` followed by `len` bytes of body. The record's plaintext is `flag: u8` ([`RAW`] or
//! [`ZSTD`]) followed by the payload: the next bytes of the frame stream (whole frames, length prefixes included), or
//! a zstd frame that decompresses to them. With encryption the body is the ChaCha20-Poly1305 ciphertext of the
//! plaintext followed by its 16-byte tag (key: this direction's session key; nonce: this direction's record counter,
//! 96-bit little-endian, starting at 0; no associated data); without it the body is the plaintext itself. A writer
//! buffers until it is flushed and [`wire::write_msg`](super::wire::write_msg) flushes after each message, so one
//! message is one record; a payload is never larger than [`PAYLOAD_BYTES_MAX`] (one largest frame with its prefix).
//!
//! [`RecordWriter`] and [`RecordReader`] are the two halves (the client and the server read and write through
//! separate clones of the socket); [`Reader`] and [`Writer`] are what a connection holds: plain before the switch,
//! records after it. A record that fails to open, decompress or parse poisons the reader: every later read fails
//! with the same error, so a connection never goes on after a forged, replayed, reordered or dropped record.

use std::io::{self, Read, Write};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};
use zeroize::Zeroize;

use super::wire::FRAME_BYTES_MAX;

/// Largest payload (uncompressed bytes of the frame stream) in one record: one largest frame and its length prefix.
pub const PAYLOAD_BYTES_MAX: usize = FRAME_BYTES_MAX + 4;
/// The AEAD tag after every sealed record.
pub const TAG_BYTES: usize = 16;
/// Largest record body: flag, payload (a compressed payload is kept only when smaller) and tag.
pub const RECORD_BYTES_MAX: usize = 1 + PAYLOAD_BYTES_MAX + TAG_BYTES;
/// Payloads this small are sent raw without trying to compress them.
pub const COMPRESS_MIN_BYTES: usize = 4096;
/// Default zstd level of `--compress`.
pub const DEFAULT_LEVEL: u8 = 3;
/// Highest zstd level `--compress=N` takes.
pub const MAX_LEVEL: u8 = 19;

/// Record flag: the payload is the bytes themselves.
pub const RAW: u8 = 0;
/// Record flag: the payload is one zstd frame of the bytes.
pub const ZSTD: u8 = 1;

/// What an opened record's failure says (the connection is closed after it).
pub const DECRYPTION_FAILED: &str =
    "decryption failed: the data was altered in transit or the peers' keys differ; connection closed";

/// One direction's settings: its session key (when sealed; wiped when dropped) and the zstd level its writer uses
/// (when compressing).
#[derive(Clone)]
pub struct Direction {
    pub key: Option<[u8; 32]>,
    pub level: Option<u8>,
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl std::fmt::Debug for Direction {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direction").field("sealed", &self.key.is_some()).field("level", &self.level).finish()
    }
}

/// The 96-bit nonce of record number `n`: `n` little-endian, zero-extended.
fn nonce_of(n: u64) -> Nonce {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&n.to_le_bytes());
    Nonce::from(b)
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// The sending half: buffers the frame stream and sends it as records.
pub struct RecordWriter<W: Write> {
    inner: W,
    cipher: Option<ChaCha20Poly1305>,
    /// The number of the next record (its nonce); `u64::MAX` is never used.
    counter: u64,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Plaintext waiting for the next flush.
    pending: Vec<u8>,
    /// Compression output.
    squeezed: Vec<u8>,
    /// The record being sent.
    out: Vec<u8>,
    /// A failed send leaves the stream between records: nothing more may be sent.
    broken: bool,
}

impl<W: Write> RecordWriter<W> {
    pub fn new(inner: W, dir: &Direction) -> io::Result<RecordWriter<W>> {
        let compressor = match dir.level {
            Some(level) => Some(zstd::bulk::Compressor::new(i32::from(level.clamp(1, MAX_LEVEL)))?),
            None => None,
        };
        Ok(RecordWriter {
            inner,
            cipher: dir.key.map(|k| ChaCha20Poly1305::new(&k.into())),
            counter: 0,
            compressor,
            pending: Vec::new(),
            squeezed: Vec::new(),
            out: Vec::new(),
            broken: false,
        })
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Records sent so far.
    pub fn records(&self) -> u64 {
        self.counter
    }

    /// Send the pending bytes as one record.
    fn seal_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.broken {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "an earlier record could not be sent"));
        }
        self.out.clear();
        self.out.extend_from_slice(&[0; 4]);
        let mut flag = RAW;
        if let Some(c) = self.compressor.as_mut().filter(|_| self.pending.len() > COMPRESS_MIN_BYTES) {
            // Worth it only when more than ~3% smaller: the output buffer is that large, and zstd fails beyond it.
            let limit = self.pending.len() - self.pending.len() / 32;
            self.squeezed.clear();
            self.squeezed.reserve(limit);
            if let Ok(n) = c.compress_to_buffer(&self.pending, &mut self.squeezed)
                && n < limit
            {
                flag = ZSTD;
            }
        }
        self.out.push(flag);
        self.out.extend_from_slice(if flag == ZSTD { &self.squeezed } else { &self.pending });
        if let Some(cipher) = &self.cipher {
            if self.counter == u64::MAX {
                self.broken = true;
                return Err(io::Error::other("record counter exhausted: connection closed (reconnect to go on)"));
            }
            let tag = cipher
                .encrypt_in_place_detached(&nonce_of(self.counter), b"", &mut self.out[4..])
                .map_err(|_| io::Error::other("cannot seal a record"))?;
            self.out.extend_from_slice(&tag);
        }
        self.counter += 1;
        let len = (self.out.len() - 4) as u32;
        debug_assert!(len as usize <= RECORD_BYTES_MAX);
        self.out[..4].copy_from_slice(&len.to_le_bytes());
        self.pending.clear();
        if let Err(e) = self.inner.write_all(&self.out) {
            self.broken = true;
            return Err(e);
        }
        Ok(())
    }
}

impl<W: Write> Write for RecordWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pending.len() >= PAYLOAD_BYTES_MAX {
            self.seal_pending()?;
        }
        let n = buf.len().min(PAYLOAD_BYTES_MAX - self.pending.len());
        self.pending.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.seal_pending()?;
        self.inner.flush()
    }
}

/// The receiving half: reads records, checks and opens them, and hands out the frame stream.
pub struct RecordReader<R: Read> {
    inner: R,
    cipher: Option<ChaCha20Poly1305>,
    /// The number of the next record expected (its nonce).
    counter: u64,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    /// The body of the record being read.
    body: Vec<u8>,
    /// The current record's bytes, handed out from `pos`.
    plain: Vec<u8>,
    pos: usize,
    /// Set by the first failure: every later read fails the same way.
    poisoned: Option<(io::ErrorKind, String)>,
}

impl<R: Read> RecordReader<R> {
    /// `dir.level` only says whether compressed records are accepted (the level is the writer's business).
    pub fn new(inner: R, dir: &Direction) -> io::Result<RecordReader<R>> {
        let decompressor = match dir.level {
            Some(_) => Some(zstd::bulk::Decompressor::new()?),
            None => None,
        };
        Ok(RecordReader {
            inner,
            cipher: dir.key.map(|k| ChaCha20Poly1305::new(&k.into())),
            counter: 0,
            decompressor,
            body: Vec::new(),
            plain: Vec::new(),
            pos: 0,
            poisoned: None,
        })
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// Read the next record into `plain`. `Ok(false)`: the peer closed the connection between records.
    fn next_record(&mut self) -> io::Result<bool> {
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.inner.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a record")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let len = u32::from_le_bytes(len) as usize;
        let min = 2 + if self.cipher.is_some() { TAG_BYTES } else { 0 };
        if !(min..=RECORD_BYTES_MAX).contains(&len) {
            return Err(invalid(format!(
                "protocol error: record of {len} bytes (between {min} and {RECORD_BYTES_MAX} expected)"
            )));
        }
        self.body.resize(len, 0);
        self.inner.read_exact(&mut self.body)?;
        if let Some(cipher) = &self.cipher {
            if self.counter == u64::MAX {
                return Err(io::Error::other("record counter exhausted: connection closed (reconnect to go on)"));
            }
            let (text, tag) = self.body.split_at_mut(len - TAG_BYTES);
            let tag = Tag::clone_from_slice(tag);
            cipher
                .decrypt_in_place_detached(&nonce_of(self.counter), b"", text, &tag)
                .map_err(|_| invalid(DECRYPTION_FAILED))?;
            self.body.truncate(len - TAG_BYTES);
        }
        self.counter += 1;
        match self.body[0] {
            RAW => {
                std::mem::swap(&mut self.body, &mut self.plain);
                self.pos = 1;
            }
            ZSTD => {
                let Some(d) = self.decompressor.as_mut() else {
                    return Err(invalid("protocol error: a compressed record, but compression was not agreed"));
                };
                self.plain.clear();
                self.plain.reserve(PAYLOAD_BYTES_MAX);
                let n = d
                    .decompress_to_buffer(&self.body[1..], &mut self.plain)
                    .map_err(|e| invalid(format!("protocol error: a compressed record does not decompress: {e}")))?;
                if n == 0 || n > PAYLOAD_BYTES_MAX {
                    return Err(invalid(format!(
                        "protocol error: a compressed record decompresses to {n} bytes (at most {PAYLOAD_BYTES_MAX})"
                    )));
                }
                self.pos = 0;
            }
            f => return Err(invalid(format!("protocol error: unknown record flag {f}"))),
        }
        Ok(true)
    }
}

impl<R: Read> Read for RecordReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, message)) = &self.poisoned {
            return Err(io::Error::new(*kind, message.clone()));
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.plain.len() {
            match self.next_record() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    self.poisoned = Some((e.kind(), e.to_string()));
                    return Err(e);
                }
            }
        }
        let n = buf.len().min(self.plain.len() - self.pos);
        buf[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A connection's receiving half: bare frames, or records once the handshake agreed on them.
pub enum Reader<R: Read> {
    Plain(R),
    Records(Box<RecordReader<R>>),
}

/// A connection's sending half: bare frames, or records once the handshake agreed on them.
pub enum Writer<W: Write> {
    Plain(W),
    Records(Box<RecordWriter<W>>),
}

impl<R: Read> Reader<R> {
    /// Switch to records (a no-op when `dir` asks for neither sealing nor compression).
    pub fn upgrade(self, dir: &Direction) -> io::Result<Reader<R>> {
        match self {
            Reader::Plain(r) if dir.key.is_some() || dir.level.is_some() => {
                Ok(Reader::Records(Box::new(RecordReader::new(r, dir)?)))
            }
            other => Ok(other),
        }
    }

    pub fn get_ref(&self) -> &R {
        match self {
            Reader::Plain(r) => r,
            Reader::Records(r) => r.get_ref(),
        }
    }

    /// The stream itself when frames travel bare (no `--encrypt`, no `--compress`): the zero-copy data path may then
    /// move payloads between it and files without passing them through this reader.
    pub fn plain(&self) -> Option<&R> {
        match self {
            Reader::Plain(r) => Some(r),
            Reader::Records(_) => None,
        }
    }
}

impl<W: Write> Writer<W> {
    /// Switch to records (a no-op when `dir` asks for neither sealing nor compression).
    pub fn upgrade(self, dir: &Direction) -> io::Result<Writer<W>> {
        match self {
            Writer::Plain(w) if dir.key.is_some() || dir.level.is_some() => {
                Ok(Writer::Records(Box::new(RecordWriter::new(w, dir)?)))
            }
            other => Ok(other),
        }
    }

    /// The stream itself when frames travel bare (see [`Reader::plain`]).
    pub fn plain(&self) -> Option<&W> {
        match self {
            Writer::Plain(w) => Some(w),
            Writer::Records(_) => None,
        }
    }
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Reader::Plain(r) => r.read(buf),
            Reader::Records(r) => r.read(buf),
        }
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Writer::Plain(w) => w.write(buf),
            Writer::Records(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Writer::Plain(w) => w.flush(),
            Writer::Records(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::wire::{CHUNK_BYTES_MAX, Msg, read_msg, write_msg};

    fn dir(key: Option<[u8; 32]>, level: Option<u8>) -> Direction {
        Direction { key, level }
    }

    /// Every message written through a writer, then the bytes on the wire.
    fn send(d: &Direction, msgs: &[Msg]) -> Vec<u8> {
        let mut w = RecordWriter::new(Vec::new(), d).unwrap();
        for m in msgs {
            write_msg(&mut w, m).unwrap();
        }
        assert_eq!(w.records(), msgs.len() as u64, "one message, one record");
        w.inner
    }

    fn receive(d: &Direction, wire: &[u8]) -> Result<Vec<Msg>, String> {
        let mut r = RecordReader::new(wire, d).unwrap();
        let mut got = Vec::new();
        loop {
            match read_msg(&mut r) {
                Ok(m) => got.push(m),
                // A clean end between records (a cut inside one poisons the reader).
                Err(crate::net::wire::WireError::Io(e))
                    if e.kind() == io::ErrorKind::UnexpectedEof && r.poisoned.is_none() =>
                {
                    return Ok(got);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Offsets and lengths of the records in `wire`.
    fn records(wire: &[u8]) -> Vec<(usize, usize)> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < wire.len() {
            let len = u32::from_le_bytes(wire[at..at + 4].try_into().unwrap()) as usize;
            out.push((at, 4 + len));
            at += 4 + len;
        }
        out
    }

    fn pseudo_random(n: usize, mut seed: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    fn sample() -> Vec<Msg> {
        vec![
            Msg::Stat { path: b"a/b".to_vec(), follow: false },
            Msg::Data { offset: 0, digest: [1; 32], bytes: b"hello ".repeat(2000) },
            Msg::Data { offset: 9, digest: [2; 32], bytes: pseudo_random(100_000, 7) },
            Msg::Ok,
        ]
    }

    const K: [u8; 32] = [9; 32];

    #[test]
    fn round_trip_in_every_mode() {
        for d in [dir(None, Some(3)), dir(Some(K), None), dir(Some(K), Some(1)), dir(Some(K), Some(19))] {
            let wire = send(&d, &sample());
            assert_eq!(receive(&d, &wire).unwrap(), sample(), "{d:?}");
        }
    }

    #[test]
    fn the_largest_frame_fits_one_record_and_a_payload_over_the_cap_is_split() {
        let big = Msg::PutData { id: 1, offset: 0, digest: [0; 32], bytes: pseudo_random(CHUNK_BYTES_MAX, 3) };
        for d in [dir(Some(K), Some(3)), dir(None, Some(3))] {
            let wire = send(&d, std::slice::from_ref(&big));
            assert_eq!(records(&wire).len(), 1);
            assert_eq!(receive(&d, &wire).unwrap(), vec![big.clone()]);
        }
        // Writes without flushes (the server's listings): cut at the payload cap, read back whole.
        let d = dir(Some(K), None);
        let mut w = RecordWriter::new(Vec::new(), &d).unwrap();
        let bytes = pseudo_random(3 * PAYLOAD_BYTES_MAX + 5, 11);
        w.write_all(&bytes).unwrap();
        w.flush().unwrap();
        let lens: Vec<usize> = records(&w.inner).iter().map(|r| r.1).collect();
        assert_eq!(lens, vec![4 + RECORD_BYTES_MAX, 4 + RECORD_BYTES_MAX, 4 + RECORD_BYTES_MAX, 4 + 1 + 5 + TAG_BYTES]);
        let mut back = Vec::new();
        RecordReader::new(w.inner.as_slice(), &d).unwrap().read_to_end(&mut back).unwrap();
        assert!(back == bytes);
    }

    #[test]
    fn the_cipher_text_hides_the_plain_text() {
        let secret = b"attack at dawn, bring the cheese".repeat(10);
        let m = Msg::Data { offset: 0, digest: [0; 32], bytes: secret.clone() };
        let wire = send(&dir(Some(K), None), std::slice::from_ref(&m));
        assert!(!wire.windows(16).any(|w| secret.windows(16).any(|s| s == w)));
        let clear = send(&dir(None, None), std::slice::from_ref(&m));
        assert!(clear.windows(secret.len()).any(|w| w == secret.as_slice()), "sanity: unsealed records do not hide");
    }

    #[test]
    fn a_tampered_byte_anywhere_is_refused_and_poisons_the_reader() {
        let d = dir(Some(K), Some(3));
        let wire = send(&d, &sample());
        let recs = records(&wire);
        // Every byte of the second record, body and tag (the length prefix too: a wrong length breaks the framing).
        let (at, n) = recs[1];
        for i in (at + 4..at + n).step_by(97).chain([at + n - 1, at + 4]) {
            let mut bad = wire.clone();
            bad[i] ^= 0x20;
            let err = receive(&d, &bad).unwrap_err();
            assert!(err.contains("decryption failed") && err.contains("altered in transit"), "{err}");
        }
        // Poisoned: the next read fails the same way even if the bytes after it are fine.
        let mut bad = wire.clone();
        bad[recs[0].0 + 6] ^= 1;
        let mut r = RecordReader::new(bad.as_slice(), &d).unwrap();
        assert!(read_msg(&mut r).is_err());
        assert!(read_msg(&mut r).unwrap_err().to_string().contains("decryption failed"));
    }

    #[test]
    fn reordered_replayed_or_dropped_records_are_refused() {
        let d = dir(Some(K), None);
        let wire = send(&d, &sample());
        let recs = records(&wire);
        let rec = |i: usize| &wire[recs[i].0..recs[i].0 + recs[i].1];
        let check = |parts: &[&[u8]]| {
            let err = receive(&d, &parts.concat()).unwrap_err();
            assert!(err.contains("decryption failed"), "{err}");
        };
        check(&[rec(1), rec(0)]); // reordered
        check(&[rec(0), rec(0)]); // replayed
        check(&[rec(0), rec(2)]); // dropped
        // A record of one connection does not open on another with another key.
        let other = send(&dir(Some([8; 32]), None), &sample());
        assert!(receive(&d, &other).unwrap_err().contains("decryption failed"));
    }

    #[test]
    fn each_direction_counts_its_own_records() {
        // A record sealed for one direction (its key, its counter) does not open in the other.
        let c2s = dir(Some([1; 32]), None);
        let s2c = dir(Some([2; 32]), None);
        let from_client = send(&c2s, &[Msg::Ok, Msg::ListEnd]);
        let from_server = send(&s2c, &[Msg::Bye]);
        assert_eq!(receive(&c2s, &from_client).unwrap(), vec![Msg::Ok, Msg::ListEnd]);
        assert_eq!(receive(&s2c, &from_server).unwrap(), vec![Msg::Bye]);
        assert!(receive(&s2c, &from_client).unwrap_err().contains("decryption failed"));
        // Both halves start at 0: the server's first record is number 0 although the client already sent two.
        let mut w = RecordWriter::new(Vec::new(), &s2c).unwrap();
        write_msg(&mut w, &Msg::Bye).unwrap();
        assert_eq!(w.inner, from_server, "deterministic: same key, same counter, same bytes");
    }

    #[test]
    fn the_counter_never_wraps() {
        let d = dir(Some(K), None);
        let mut w = RecordWriter::new(Vec::new(), &d).unwrap();
        w.counter = u64::MAX - 1;
        write_msg(&mut w, &Msg::Ok).unwrap();
        let e = write_msg(&mut w, &Msg::Ok).unwrap_err().to_string();
        assert!(e.contains("counter exhausted"), "{e}");
        assert!(write_msg(&mut w, &Msg::Ok).is_err(), "and stays closed");
        let mut r = RecordReader::new(&w.inner[..], &d).unwrap();
        r.counter = u64::MAX - 1;
        assert_eq!(read_msg(&mut r).unwrap(), Msg::Ok);
    }

    #[test]
    fn compressible_payloads_shrink_and_incompressible_ones_go_raw() {
        let d = dir(None, Some(3));
        let text = Msg::Data { offset: 0, digest: [0; 32], bytes: b"fastsync ".repeat(100_000) };
        let wire = send(&d, std::slice::from_ref(&text));
        assert_eq!(wire[4], ZSTD);
        assert!(wire.len() < 900_000 / 20, "{} bytes for 900 kB of text", wire.len());
        let noise = Msg::Data { offset: 0, digest: [0; 32], bytes: pseudo_random(100_000, 5) };
        let wire = send(&d, std::slice::from_ref(&noise));
        assert_eq!(wire[4], RAW);
        assert_eq!(wire.len(), 4 + 1 + 4 + noise.encode_body().len());
        // Small frames are not worth trying.
        let wire = send(&d, &[Msg::Stat { path: b"a".repeat(1000), follow: false }]);
        assert_eq!(wire[4], RAW);
        // Compressed then sealed: what is sealed is the small thing.
        let sealed = send(&dir(Some(K), Some(3)), std::slice::from_ref(&text));
        assert!(sealed.len() < 900_000 / 20);
    }

    #[test]
    fn lengths_and_flags_are_checked_before_trusting_them() {
        for d in [dir(None, Some(3)), dir(Some(K), Some(3))] {
            // Over the cap: refused before allocating (no body follows at all).
            let wire = ((RECORD_BYTES_MAX + 1) as u32).to_le_bytes();
            assert!(receive(&d, &wire).unwrap_err().contains("record of"));
            // Too short to hold a flag and a byte (and a tag).
            let wire = [1, 0, 0, 0, RAW];
            assert!(receive(&d, &wire).unwrap_err().contains("record of"));
            // Cut inside a record.
            let wire = send(&d, &sample());
            assert!(receive(&d, &wire[..wire.len() - 3]).is_err());
        }
        let d = dir(None, Some(3));
        assert!(receive(&d, &[2, 0, 0, 0, 7, 0]).unwrap_err().contains("unknown record flag 7"));
        assert!(receive(&d, &[3, 0, 0, 0, ZSTD, 1, 2]).unwrap_err().contains("does not decompress"));
        // A compressed record where compression was not agreed.
        let wire = send(&d, &[Msg::Data { offset: 0, digest: [0; 32], bytes: vec![0; 10_000] }]);
        assert!(receive(&dir(None, None), &wire).is_err());
        // A zstd bomb: a small record that would decompress beyond one payload.
        let bomb = zstd::bulk::compress(&vec![0u8; PAYLOAD_BYTES_MAX + 1], 3).unwrap();
        let mut wire = ((bomb.len() + 1) as u32).to_le_bytes().to_vec();
        wire.push(ZSTD);
        wire.extend_from_slice(&bomb);
        assert!(receive(&d, &wire).unwrap_err().contains("does not decompress"));
    }
}
