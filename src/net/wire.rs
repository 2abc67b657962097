//! The `fastsync://` wire format: length-prefixed frames carrying one message each, with a cap on every field.
//!
//! A frame is `len: u32 LE` (the bytes that follow, at most [`FRAME_BYTES_MAX`]), `kind: u8`, then the message's
//! fields in order. Integers are little-endian; byte strings are `u32 LE` length + bytes, each with its own cap
//! ([`PATH_BYTES_MAX`], [`TEXT_BYTES_MAX`], [`CHUNK_BYTES_MAX`]); booleans are one byte, 0 or 1. Decoding never
//! trusts a length: every cap is checked before anything is allocated, and a frame must be consumed exactly (no
//! trailing bytes). docs/PROTOCOL.md describes the conversation; this module is the single source of the encoding.

use std::io::{self, Read, Write};

use fastsync_engine::Show;

/// Protocol version spoken by this build; a peer with another version is refused with a clear error.
pub const VERSION: u16 = 3;
/// Largest frame body (kind + fields): one data chunk plus headroom for its header.
pub const FRAME_BYTES_MAX: usize = CHUNK_BYTES_MAX + 64 * 1024;
/// Largest data chunk in one frame.
pub const CHUNK_BYTES_MAX: usize = 4 << 20;
/// Largest path (relative to the served root, `/`-separated, no NUL).
pub const PATH_BYTES_MAX: usize = 4096;
/// Largest human-readable text (error messages).
pub const TEXT_BYTES_MAX: usize = 4096;
/// Extended attributes of one entry: at most this many, each name at most [`XATTR_NAME_BYTES_MAX`] (Linux's
/// `XATTR_NAME_MAX`), each value at most [`XATTR_VALUE_BYTES_MAX`] (`XATTR_SIZE_MAX`), all of them together at most
/// [`XATTRS_BYTES_MAX`].
pub const XATTRS_MAX: usize = 1024;
pub const XATTR_NAME_BYTES_MAX: usize = 255;
pub const XATTR_VALUE_BYTES_MAX: usize = 64 * 1024;
pub const XATTRS_BYTES_MAX: usize = 1 << 20;
/// Names in one `Parts` or `DropParts` message, each at most [`NAME_BYTES_MAX`] bytes (`NAME_MAX`).
pub const PART_NAMES_MAX: usize = 1024;
pub const NAME_BYTES_MAX: usize = 255;

/// An entry's extended attributes: (name, value) pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// What an entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File = 0,
    Dir = 1,
    Symlink = 2,
    Other = 3,
}

/// Metadata of one entry, as listed or stat'ed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryMeta {
    /// Relative to the path that was listed (`""` for that path itself with `Stat`).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Symlink target (empty otherwise).
    pub target: Vec<u8>,
    /// The entry's inode, as the serving host names it (`st_dev`, `st_ino`), and its number of names: a client
    /// with `-H` links names that share an inode. Zeros where unknown.
    pub dev: u64,
    pub ino: u64,
    pub nlink: u32,
}

/// Error codes carried by [`Msg::Error`].
pub mod code {
    pub const PROTOCOL: u16 = 1;
    pub const VERSION: u16 = 2;
    pub const AUTH: u16 = 3;
    pub const NOT_FOUND: u16 = 4;
    pub const PERMISSION: u16 = 5;
    pub const READ_ONLY: u16 = 6;
    pub const PATH_ESCAPES: u16 = 7;
    pub const NO_SPACE: u16 = 8;
    pub const DIGEST: u16 = 9;
    pub const BUSY: u16 = 10;
    pub const IO: u16 = 11;
    /// The server requires encryption (`serve --require-encrypt`) and the client did not ask for it.
    pub const NEEDS_ENCRYPTION: u16 = 12;
}

/// `Hello.flags`: what the client asks for. Bits not named here must be 0.
pub mod hello {
    /// Seal every record after `AuthOk` (`--encrypt`).
    pub const ENCRYPT: u8 = 1;
    /// Compress records (`--compress`); the level goes in the bits from [`LEVEL_SHIFT`] up.
    pub const COMPRESS: u8 = 2;
    /// The zstd level (1..=19) sits in bits 3..=7 when [`COMPRESS`] is set (0 otherwise).
    pub const LEVEL_SHIFT: u32 = 3;
    /// Bits that must be 0.
    pub const RESERVED: u8 = 4;
}

/// `Challenge.flags`: what the connection uses from `AuthOk` on, as the server decided. Bits not named here must be 0.
pub mod challenge {
    /// Records are sealed (the client asked for it).
    pub const ENCRYPT: u8 = 1;
    /// Records may be compressed (the client asked for it and the server allows it).
    pub const COMPRESS: u8 = 2;
}

/// Every message of the protocol. See docs/PROTOCOL.md for who sends what when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Client, first frame on every connection: its version, its nonce, and what it asks for ([`hello`] flags).
    Hello {
        version: u16,
        nonce: [u8; 32],
        flags: u8,
    },
    /// Server: its version, its nonce, whether it refuses writes, and what the connection will use from `AuthOk` on
    /// ([`challenge`] flags).
    Challenge {
        version: u16,
        nonce: [u8; 32],
        read_only: bool,
        flags: u8,
    },
    /// Either side, only when the handshake agreed on encryption: its ephemeral X25519 public key for this connection
    /// (the server's right after `Challenge`, the client's right before `Auth`; see `auth`).
    KeyShare {
        public: [u8; 32],
    },
    /// Client: proof that it knows the token (see `auth`).
    Auth {
        mac: [u8; 32],
    },
    /// Server: the client is in, and the server's own proof that it knows the token.
    AuthOk {
        mac: [u8; 32],
    },
    Error {
        code: u16,
        message: String,
    },
    Ok,
    /// List `path` (its entries; with `recursive`, the whole subtree depth-first). Answered by `Entry`* `ListEnd`.
    /// With `follow` (`-L` on a pull), symlinks are followed while they stay beneath the root: each is listed as what
    /// it points to, and one that cannot be followed is an `EntryError` in its place.
    List {
        path: Vec<u8>,
        recursive: bool,
        follow: bool,
    },
    Entry(EntryMeta),
    ListEnd,
    /// In a `follow` listing, in place of the `Entry` of `path`: a symlink that leads outside the root, dangles or
    /// loops. The listing goes on.
    EntryError {
        path: Vec<u8>,
        code: u16,
        message: String,
    },
    /// Metadata of `path` itself (what it points to with `follow`), answered by one `Entry` (path `""`) or `Error`.
    Stat {
        path: Vec<u8>,
        follow: bool,
    },
    /// BLAKE3 of `[offset, offset + len)` of file `path` (to its end when shorter): `sync --checksum`,
    /// `list --checksum`. Answered by `Hashed` or `Error`.
    Hash {
        path: Vec<u8>,
        offset: u64,
        len: u64,
        follow: bool,
    },
    /// The digest of the bytes a `Hash` covered, and how many there were.
    Hashed {
        digest: [u8; 32],
        bytes: u64,
    },
    /// Read `[offset, offset + len)` of file `path`. Answered by `Data`* `DataEnd`, or `Error`.
    Get {
        path: Vec<u8>,
        offset: u64,
        len: u64,
        follow: bool,
    },
    /// A chunk of file data with the BLAKE3 digest of `bytes`, checked by the receiver before it counts.
    Data {
        offset: u64,
        digest: [u8; 32],
        bytes: Vec<u8>,
    },
    /// In the answer to a `Get`, in place of `Data`: `[offset, offset + len)` is a hole of a sparse file (reads as
    /// zeros, holds no blocks). `len` may exceed a chunk.
    Hole {
        offset: u64,
        len: u64,
    },
    /// End of a `Get`: the file's size and mtime after the read, so the reader can tell a torn source.
    DataEnd {
        size: u64,
        mtime_sec: i64,
        mtime_nsec: u32,
    },
    /// Start writing file `path` of `size` bytes under transfer `id` (a random number chosen by the client; chunks
    /// may then arrive on any connection). The server creates a temporary beside `path`.
    PutBegin {
        id: u64,
        path: Vec<u8>,
        size: u64,
        mode: u32,
    },
    /// A chunk of transfer `id`; answered by `Ok` once written, or `Error` (digest mismatch, no space, ...).
    PutData {
        id: u64,
        offset: u64,
        digest: [u8; 32],
        bytes: Vec<u8>,
    },
    /// `[offset, offset + len)` of transfer `id` is a hole of the sparse source: it counts as received and holds
    /// no blocks on the server (punched if an earlier run wrote there). `Ok`/`Error`.
    PutHole {
        id: u64,
        offset: u64,
        len: u64,
    },
    /// All chunks of `id` were acknowledged: set metadata, make durable when asked, rename into place. `Ok`/`Error`.
    PutEnd {
        id: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_sec: i64,
        mtime_nsec: u32,
        fsync: bool,
    },
    /// Like `PutBegin` for a large file that may have been partly sent by an interrupted run: the server writes it to
    /// the stable `.NAME.fstmp-part` beside a journal of the chunks written, kept when the client goes away without
    /// `PutAbort`. The source's `mtime` identifies it (with `size`). Answered by `Resumed` or `Error`.
    PutResume {
        id: u64,
        path: Vec<u8>,
        size: u64,
        mode: u32,
        mtime_sec: i64,
        mtime_nsec: u32,
    },
    /// How many bytes of a `PutResume` an earlier run left recorded (0: nothing to check, send everything).
    Resumed {
        recorded_bytes: u64,
    },
    /// Whether the server already holds `[offset, offset + len)` of transfer `id` (recorded by an earlier run, and
    /// its BLAKE3 is `digest`): `Ok` (the range counts as received), or `Error` (send it).
    PutCheck {
        id: u64,
        offset: u64,
        len: u64,
        digest: [u8; 32],
    },
    /// Give up transfer `id`: its temporary is removed.
    PutAbort {
        id: u64,
    },
    /// The extended attributes of `path` itself (a symlink is followed only with `follow`). `Xattrs` or `Error`.
    GetXattrs {
        path: Vec<u8>,
        follow: bool,
    },
    /// The answer to `GetXattrs`.
    XattrList {
        xattrs: Xattrs,
    },
    /// Set these extended attributes on the temporary of transfer `id` (before its `PutEnd`). `Ok`/`Error`.
    PutXattrs {
        id: u64,
        xattrs: Xattrs,
    },
    /// Set these extended attributes on `path` itself (a directory, or a file in place). `Ok`/`Error`.
    SetXattrs {
        path: Vec<u8>,
        xattrs: Xattrs,
    },
    /// Create directory `path` (existing is fine). `Ok`/`Error`.
    Mkdir {
        path: Vec<u8>,
        mode: u32,
    },
    /// Set a directory's (or file's) owner (where the server may), permission bits and mtime; symlinks: owner and
    /// mtime only. `Ok`/`Error`.
    SetMeta {
        path: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime_sec: i64,
        mtime_nsec: u32,
    },
    /// Create (or replace) symlink `path` pointing to `target`, owned by `uid:gid` where the server may.
    /// `Ok`/`Error`.
    Symlink {
        path: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
        mtime_sec: i64,
        mtime_nsec: u32,
    },
    /// Make `path` another name of the regular file `target` (a hard link; `path` is replaced if it exists).
    /// `Ok`/`Error`.
    Link {
        path: Vec<u8>,
        target: Vec<u8>,
    },
    /// Delete `path`; a directory with everything in it, never following a symlink. `Ok`/`Error`.
    Delete {
        path: Vec<u8>,
    },
    /// A push visits directory `path` after an interrupted one: the server removes the temporaries there of
    /// processes that are gone, and answers `Parts` with the partial files no live transfer holds.
    Clean {
        path: Vec<u8>,
    },
    /// The answer to `Clean` (the names whose `.NAME.fstmp-part` or `.NAME.fstmp-journal` is left, held by no live
    /// transfer) and to `DropParts` (the names whose partial files were removed).
    Parts {
        names: Vec<Vec<u8>>,
    },
    /// Remove the partial files of `names` in directory `path` (their source is gone), unless a live transfer holds
    /// one. Answered by `Parts` with the names removed, or `Error`.
    DropParts {
        path: Vec<u8>,
        names: Vec<Vec<u8>>,
    },
    /// The client is done with this connection.
    Bye,
}

/// A malformed frame or a broken connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Malformed(String),
}

fn bad(what: impl Into<String>) -> WireError {
    WireError::Malformed(what.into())
}

// Kinds (one byte on the wire).
const K_HELLO: u8 = 1;
const K_CHALLENGE: u8 = 2;
const K_AUTH: u8 = 3;
const K_AUTH_OK: u8 = 4;
const K_ERROR: u8 = 5;
const K_OK: u8 = 6;
const K_KEY_SHARE: u8 = 7;
const K_LIST: u8 = 10;
const K_ENTRY: u8 = 11;
const K_LIST_END: u8 = 12;
const K_ENTRY_ERROR: u8 = 16;
const K_STAT: u8 = 13;
const K_HASH: u8 = 14;
const K_HASHED: u8 = 15;
const K_GET: u8 = 20;
const K_DATA: u8 = 21;
const K_DATA_END: u8 = 22;
const K_HOLE: u8 = 23;
const K_PUT_BEGIN: u8 = 30;
const K_PUT_DATA: u8 = 31;
const K_PUT_END: u8 = 32;
const K_PUT_ABORT: u8 = 33;
const K_PUT_RESUME: u8 = 34;
const K_RESUMED: u8 = 35;
const K_PUT_CHECK: u8 = 36;
const K_PUT_HOLE: u8 = 37;
const K_PARTS: u8 = 38;
const K_DROP_PARTS: u8 = 39;
const K_MKDIR: u8 = 40;
const K_SET_META: u8 = 41;
const K_SYMLINK: u8 = 42;
const K_DELETE: u8 = 43;
const K_GET_XATTRS: u8 = 44;
const K_XATTR_LIST: u8 = 45;
const K_PUT_XATTRS: u8 = 46;
const K_SET_XATTRS: u8 = 47;
const K_LINK: u8 = 48;
const K_CLEAN: u8 = 49;
const K_BYE: u8 = 60;

/// Field writer for one frame body.
struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.0.push(v as u8);
    }
    fn arr(&mut self, v: &[u8; 32]) {
        self.0.extend_from_slice(v);
    }
    fn xattrs(&mut self, v: &Xattrs) {
        self.u32(v.len() as u32);
        for (name, value) in v {
            self.bytes(name);
            self.bytes(value);
        }
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn names(&mut self, v: &[Vec<u8>]) {
        self.u32(v.len() as u32);
        for name in v {
            self.bytes(name);
        }
    }
}

/// Field reader over one frame body; every read is bounds-checked.
struct In<'a> {
    buf: &'a [u8],
}

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(bad("frame ends inside a field"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn nsec(&mut self) -> Result<u32, WireError> {
        let v = self.u32()?;
        if v >= 1_000_000_000 {
            return Err(bad("nanoseconds out of range"));
        }
        Ok(v)
    }
    fn bool(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad("boolean is neither 0 nor 1")),
        }
    }
    fn arr(&mut self) -> Result<[u8; 32], WireError> {
        Ok(self.take(32)?.try_into().expect("32 bytes"))
    }
    fn bytes(&mut self, cap: usize, what: &str) -> Result<Vec<u8>, WireError> {
        let len = self.u32()? as usize;
        if len > cap {
            return Err(bad(format!("{what} of {len} bytes is over the limit of {cap}")));
        }
        Ok(self.take(len)?.to_vec())
    }
    fn xattrs(&mut self) -> Result<Xattrs, WireError> {
        let n = self.u32()? as usize;
        if n > XATTRS_MAX {
            return Err(bad(format!("{n} extended attributes are over the limit of {XATTRS_MAX}")));
        }
        let mut out = Vec::new();
        let mut total = 0;
        for _ in 0..n {
            let name = self.bytes(XATTR_NAME_BYTES_MAX, "extended attribute name")?;
            if name.is_empty() || name.contains(&0) {
                return Err(bad("extended attribute name is empty or contains a NUL byte"));
            }
            let value = self.bytes(XATTR_VALUE_BYTES_MAX, "extended attribute value")?;
            total += name.len() + value.len();
            if total > XATTRS_BYTES_MAX {
                return Err(bad(format!("extended attributes over the limit of {XATTRS_BYTES_MAX} bytes")));
            }
            out.push((name, value));
        }
        Ok(out)
    }
    fn names(&mut self) -> Result<Vec<Vec<u8>>, WireError> {
        let n = self.u32()? as usize;
        if n > PART_NAMES_MAX {
            return Err(bad(format!("{n} names are over the limit of {PART_NAMES_MAX}")));
        }
        let mut out = Vec::new();
        for _ in 0..n {
            let name = self.bytes(NAME_BYTES_MAX, "name")?;
            if name.is_empty() || name.contains(&0) || name.contains(&b'/') || name == b"." || name == b".." {
                return Err(bad("a name is empty, `.`, `..`, or contains a NUL byte or a slash"));
            }
            out.push(name);
        }
        Ok(out)
    }
    fn path(&mut self) -> Result<Vec<u8>, WireError> {
        let p = self.bytes(PATH_BYTES_MAX, "path")?;
        if p.contains(&0) {
            return Err(bad("path contains a NUL byte"));
        }
        Ok(p)
    }
    fn text(&mut self) -> Result<String, WireError> {
        let t = self.bytes(TEXT_BYTES_MAX, "text")?;
        Ok(fastsync_engine::show::one_line(&String::from_utf8_lossy(&t)))
    }
    fn kind(&mut self) -> Result<EntryKind, WireError> {
        Ok(match self.u8()? {
            0 => EntryKind::File,
            1 => EntryKind::Dir,
            2 => EntryKind::Symlink,
            3 => EntryKind::Other,
            k => return Err(bad(format!("unknown entry kind {k}"))),
        })
    }
}

impl Msg {
    /// The frame body (kind and fields), without the length prefix.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut o = Out(Vec::with_capacity(64));
        match self {
            Msg::Hello { version, nonce, flags } => {
                o.u8(K_HELLO);
                o.u16(*version);
                o.arr(nonce);
                o.u8(*flags);
            }
            Msg::Challenge { version, nonce, read_only, flags } => {
                o.u8(K_CHALLENGE);
                o.u16(*version);
                o.arr(nonce);
                o.bool(*read_only);
                o.u8(*flags);
            }
            Msg::KeyShare { public } => {
                o.u8(K_KEY_SHARE);
                o.arr(public);
            }
            Msg::Auth { mac } => {
                o.u8(K_AUTH);
                o.arr(mac);
            }
            Msg::AuthOk { mac } => {
                o.u8(K_AUTH_OK);
                o.arr(mac);
            }
            Msg::Error { code, message } => {
                o.u8(K_ERROR);
                o.u16(*code);
                // Cut at the cap, on a character boundary: what the peer decodes is a prefix of the message.
                o.bytes(&message.as_bytes()[..message.floor_char_boundary(TEXT_BYTES_MAX)]);
            }
            Msg::Ok => o.u8(K_OK),
            Msg::List { path, recursive, follow } => {
                o.u8(K_LIST);
                o.bytes(path);
                o.bool(*recursive);
                o.bool(*follow);
            }
            Msg::EntryError { path, code, message } => {
                o.u8(K_ENTRY_ERROR);
                o.bytes(path);
                o.u16(*code);
                o.bytes(&message.as_bytes()[..message.floor_char_boundary(TEXT_BYTES_MAX)]);
            }
            Msg::Entry(e) => {
                o.u8(K_ENTRY);
                o.bytes(&e.path);
                o.u8(e.kind as u8);
                o.u32(e.mode);
                o.u32(e.uid);
                o.u32(e.gid);
                o.u64(e.size);
                o.i64(e.mtime_sec);
                o.u32(e.mtime_nsec);
                o.bytes(&e.target);
                o.u64(e.dev);
                o.u64(e.ino);
                o.u32(e.nlink);
            }
            Msg::ListEnd => o.u8(K_LIST_END),
            Msg::Stat { path, follow } => {
                o.u8(K_STAT);
                o.bytes(path);
                o.bool(*follow);
            }
            Msg::Hash { path, offset, len, follow } => {
                o.u8(K_HASH);
                o.bytes(path);
                o.u64(*offset);
                o.u64(*len);
                o.bool(*follow);
            }
            Msg::Hashed { digest, bytes } => {
                o.u8(K_HASHED);
                o.arr(digest);
                o.u64(*bytes);
            }
            Msg::Get { path, offset, len, follow } => {
                o.u8(K_GET);
                o.bytes(path);
                o.u64(*offset);
                o.u64(*len);
                o.bool(*follow);
            }
            Msg::Data { offset, digest, bytes } => {
                o.u8(K_DATA);
                o.u64(*offset);
                o.arr(digest);
                o.bytes(bytes);
            }
            Msg::DataEnd { size, mtime_sec, mtime_nsec } => {
                o.u8(K_DATA_END);
                o.u64(*size);
                o.i64(*mtime_sec);
                o.u32(*mtime_nsec);
            }
            Msg::Hole { offset, len } => {
                o.u8(K_HOLE);
                o.u64(*offset);
                o.u64(*len);
            }
            Msg::PutHole { id, offset, len } => {
                o.u8(K_PUT_HOLE);
                o.u64(*id);
                o.u64(*offset);
                o.u64(*len);
            }
            Msg::PutBegin { id, path, size, mode } => {
                o.u8(K_PUT_BEGIN);
                o.u64(*id);
                o.bytes(path);
                o.u64(*size);
                o.u32(*mode);
            }
            Msg::PutData { id, offset, digest, bytes } => {
                o.u8(K_PUT_DATA);
                o.u64(*id);
                o.u64(*offset);
                o.arr(digest);
                o.bytes(bytes);
            }
            Msg::PutEnd { id, mode, uid, gid, mtime_sec, mtime_nsec, fsync } => {
                o.u8(K_PUT_END);
                o.u64(*id);
                o.u32(*mode);
                o.u32(*uid);
                o.u32(*gid);
                o.i64(*mtime_sec);
                o.u32(*mtime_nsec);
                o.bool(*fsync);
            }
            Msg::PutAbort { id } => {
                o.u8(K_PUT_ABORT);
                o.u64(*id);
            }
            Msg::PutResume { id, path, size, mode, mtime_sec, mtime_nsec } => {
                o.u8(K_PUT_RESUME);
                o.u64(*id);
                o.bytes(path);
                o.u64(*size);
                o.u32(*mode);
                o.i64(*mtime_sec);
                o.u32(*mtime_nsec);
            }
            Msg::Resumed { recorded_bytes } => {
                o.u8(K_RESUMED);
                o.u64(*recorded_bytes);
            }
            Msg::PutCheck { id, offset, len, digest } => {
                o.u8(K_PUT_CHECK);
                o.u64(*id);
                o.u64(*offset);
                o.u64(*len);
                o.arr(digest);
            }
            Msg::Mkdir { path, mode } => {
                o.u8(K_MKDIR);
                o.bytes(path);
                o.u32(*mode);
            }
            Msg::SetMeta { path, mode, uid, gid, mtime_sec, mtime_nsec } => {
                o.u8(K_SET_META);
                o.bytes(path);
                o.u32(*mode);
                o.u32(*uid);
                o.u32(*gid);
                o.i64(*mtime_sec);
                o.u32(*mtime_nsec);
            }
            Msg::Symlink { path, target, uid, gid, mtime_sec, mtime_nsec } => {
                o.u8(K_SYMLINK);
                o.bytes(path);
                o.bytes(target);
                o.u32(*uid);
                o.u32(*gid);
                o.i64(*mtime_sec);
                o.u32(*mtime_nsec);
            }
            Msg::Delete { path } => {
                o.u8(K_DELETE);
                o.bytes(path);
            }
            Msg::GetXattrs { path, follow } => {
                o.u8(K_GET_XATTRS);
                o.bytes(path);
                o.bool(*follow);
            }
            Msg::Clean { path } => {
                o.u8(K_CLEAN);
                o.bytes(path);
            }
            Msg::Parts { names } => {
                o.u8(K_PARTS);
                o.names(names);
            }
            Msg::DropParts { path, names } => {
                o.u8(K_DROP_PARTS);
                o.bytes(path);
                o.names(names);
            }
            Msg::Link { path, target } => {
                o.u8(K_LINK);
                o.bytes(path);
                o.bytes(target);
            }
            Msg::XattrList { xattrs } => {
                o.u8(K_XATTR_LIST);
                o.xattrs(xattrs);
            }
            Msg::PutXattrs { id, xattrs } => {
                o.u8(K_PUT_XATTRS);
                o.u64(*id);
                o.xattrs(xattrs);
            }
            Msg::SetXattrs { path, xattrs } => {
                o.u8(K_SET_XATTRS);
                o.bytes(path);
                o.xattrs(xattrs);
            }
            Msg::Bye => o.u8(K_BYE),
        }
        o.0
    }

    /// Decode one frame body. Fails on an unknown kind, a field over its cap, a short field or trailing bytes.
    pub fn decode_body(body: &[u8]) -> Result<Msg, WireError> {
        let mut i = In { buf: body };
        let msg = match i.u8()? {
            K_HELLO => Msg::Hello { version: i.u16()?, nonce: i.arr()?, flags: i.u8()? },
            K_CHALLENGE => Msg::Challenge { version: i.u16()?, nonce: i.arr()?, read_only: i.bool()?, flags: i.u8()? },
            K_KEY_SHARE => Msg::KeyShare { public: i.arr()? },
            K_AUTH => Msg::Auth { mac: i.arr()? },
            K_AUTH_OK => Msg::AuthOk { mac: i.arr()? },
            K_ERROR => Msg::Error { code: i.u16()?, message: i.text()? },
            K_OK => Msg::Ok,
            K_LIST => Msg::List { path: i.path()?, recursive: i.bool()?, follow: i.bool()? },
            K_ENTRY_ERROR => Msg::EntryError { path: i.path()?, code: i.u16()?, message: i.text()? },
            K_ENTRY => Msg::Entry(EntryMeta {
                path: i.path()?,
                kind: i.kind()?,
                mode: i.u32()? & 0o7777,
                uid: i.u32()?,
                gid: i.u32()?,
                size: i.u64()?,
                mtime_sec: i.i64()?,
                mtime_nsec: i.nsec()?,
                target: i.bytes(PATH_BYTES_MAX, "symlink target")?,
                dev: i.u64()?,
                ino: i.u64()?,
                nlink: i.u32()?,
            }),
            K_LIST_END => Msg::ListEnd,
            K_STAT => Msg::Stat { path: i.path()?, follow: i.bool()? },
            K_HASH => Msg::Hash { path: i.path()?, offset: i.u64()?, len: i.u64()?, follow: i.bool()? },
            K_HASHED => Msg::Hashed { digest: i.arr()?, bytes: i.u64()? },
            K_GET => Msg::Get { path: i.path()?, offset: i.u64()?, len: i.u64()?, follow: i.bool()? },
            K_DATA => Msg::Data { offset: i.u64()?, digest: i.arr()?, bytes: i.bytes(CHUNK_BYTES_MAX, "chunk")? },
            K_DATA_END => Msg::DataEnd { size: i.u64()?, mtime_sec: i.i64()?, mtime_nsec: i.nsec()? },
            K_HOLE => Msg::Hole { offset: i.u64()?, len: i.u64()? },
            K_PUT_HOLE => Msg::PutHole { id: i.u64()?, offset: i.u64()?, len: i.u64()? },
            K_PUT_BEGIN => Msg::PutBegin { id: i.u64()?, path: i.path()?, size: i.u64()?, mode: i.u32()? & 0o7777 },
            K_PUT_DATA => Msg::PutData {
                id: i.u64()?,
                offset: i.u64()?,
                digest: i.arr()?,
                bytes: i.bytes(CHUNK_BYTES_MAX, "chunk")?,
            },
            K_PUT_END => Msg::PutEnd {
                id: i.u64()?,
                mode: i.u32()? & 0o7777,
                uid: i.u32()?,
                gid: i.u32()?,
                mtime_sec: i.i64()?,
                mtime_nsec: i.nsec()?,
                fsync: i.bool()?,
            },
            K_PUT_ABORT => Msg::PutAbort { id: i.u64()? },
            K_PUT_RESUME => Msg::PutResume {
                id: i.u64()?,
                path: i.path()?,
                size: i.u64()?,
                mode: i.u32()? & 0o7777,
                mtime_sec: i.i64()?,
                mtime_nsec: i.nsec()?,
            },
            K_RESUMED => Msg::Resumed { recorded_bytes: i.u64()? },
            K_PUT_CHECK => Msg::PutCheck { id: i.u64()?, offset: i.u64()?, len: i.u64()?, digest: i.arr()? },
            K_MKDIR => Msg::Mkdir { path: i.path()?, mode: i.u32()? & 0o7777 },
            K_SET_META => Msg::SetMeta {
                path: i.path()?,
                mode: i.u32()? & 0o7777,
                uid: i.u32()?,
                gid: i.u32()?,
                mtime_sec: i.i64()?,
                mtime_nsec: i.nsec()?,
            },
            K_SYMLINK => Msg::Symlink {
                path: i.path()?,
                target: i.bytes(PATH_BYTES_MAX, "symlink target")?,
                uid: i.u32()?,
                gid: i.u32()?,
                mtime_sec: i.i64()?,
                mtime_nsec: i.nsec()?,
            },
            K_DELETE => Msg::Delete { path: i.path()? },
            K_GET_XATTRS => Msg::GetXattrs { path: i.path()?, follow: i.bool()? },
            K_CLEAN => Msg::Clean { path: i.path()? },
            K_PARTS => Msg::Parts { names: i.names()? },
            K_DROP_PARTS => Msg::DropParts { path: i.path()?, names: i.names()? },
            K_LINK => Msg::Link { path: i.path()?, target: i.path()? },
            K_XATTR_LIST => Msg::XattrList { xattrs: i.xattrs()? },
            K_PUT_XATTRS => Msg::PutXattrs { id: i.u64()?, xattrs: i.xattrs()? },
            K_SET_XATTRS => Msg::SetXattrs { path: i.path()?, xattrs: i.xattrs()? },
            K_BYE => Msg::Bye,
            k => return Err(bad(format!("unknown message kind {k}"))),
        };
        if !i.buf.is_empty() {
            return Err(bad(format!("{} unexpected bytes after the message", i.buf.len())));
        }
        Ok(msg)
    }
}

/// Write one message as a frame (length prefix + body) and flush it.
pub fn write_msg(w: &mut impl Write, msg: &Msg) -> Result<(), WireError> {
    write_frame(w, msg)?;
    w.flush()?;
    Ok(())
}

/// Write one message as a frame (length prefix + body), without flushing. A data frame (`Data`, `PutData`) is its
/// head and then its payload from where it is: the bulk of the traffic is not copied into a frame buffer first.
pub fn write_frame(w: &mut impl Write, msg: &Msg) -> io::Result<()> {
    match msg {
        Msg::Data { offset, digest, bytes } => {
            w.write_all(&data_head(*offset, digest, bytes.len()))?;
            w.write_all(bytes)
        }
        Msg::PutData { id, offset, digest, bytes } => {
            w.write_all(&put_data_head(*id, *offset, digest, bytes.len()))?;
            w.write_all(bytes)
        }
        _ => {
            let body = msg.encode_body();
            debug_assert!(body.len() <= FRAME_BYTES_MAX);
            w.write_all(&(body.len() as u32).to_le_bytes())?;
            w.write_all(&body)
        }
    }
}

/// Bytes of a `Data` frame before its payload: length prefix, kind, offset, digest, payload length.
pub const DATA_HEAD_BYTES: usize = 4 + 1 + 8 + 32 + 4;
/// Bytes of a `PutData` frame before its payload: as [`DATA_HEAD_BYTES`], plus the transfer id.
pub const PUT_DATA_HEAD_BYTES: usize = DATA_HEAD_BYTES + 8;
/// The kind byte of a `Data` frame.
pub const KIND_DATA: u8 = K_DATA;
/// The kind byte of a `PutData` frame.
pub const KIND_PUT_DATA: u8 = K_PUT_DATA;

/// The bytes [`write_msg`] sends before the payload of `Data{offset, digest, bytes}` with `len` bytes: the
/// zero-copy path (`net::zerocopy`) sends these, then the payload straight from the file.
pub fn data_head(offset: u64, digest: &[u8; 32], len: usize) -> [u8; DATA_HEAD_BYTES] {
    debug_assert!(len <= CHUNK_BYTES_MAX);
    let mut h = [0u8; DATA_HEAD_BYTES];
    h[..4].copy_from_slice(&((DATA_HEAD_BYTES - 4 + len) as u32).to_le_bytes());
    h[4] = K_DATA;
    h[5..13].copy_from_slice(&offset.to_le_bytes());
    h[13..45].copy_from_slice(digest);
    h[45..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// As [`data_head`], for `PutData{id, offset, digest, bytes}`.
pub fn put_data_head(id: u64, offset: u64, digest: &[u8; 32], len: usize) -> [u8; PUT_DATA_HEAD_BYTES] {
    debug_assert!(len <= CHUNK_BYTES_MAX);
    let mut h = [0u8; PUT_DATA_HEAD_BYTES];
    h[..4].copy_from_slice(&((PUT_DATA_HEAD_BYTES - 4 + len) as u32).to_le_bytes());
    h[4] = K_PUT_DATA;
    h[5..13].copy_from_slice(&id.to_le_bytes());
    h[13..21].copy_from_slice(&offset.to_le_bytes());
    h[21..53].copy_from_slice(digest);
    h[53..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// The fields of a `Data` (`id` is `None`) or `PutData` frame, read without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHead {
    pub id: Option<u64>,
    pub offset: u64,
    pub digest: [u8; 32],
    /// Payload bytes that follow.
    pub len: usize,
}

/// Parse `head` (the first [`DATA_HEAD_BYTES`] or [`PUT_DATA_HEAD_BYTES`] bytes of a frame, as its kind says),
/// checking what [`read_msg`] would: the frame length, the payload cap, and that the payload fills the frame.
pub fn parse_data_head(head: &[u8]) -> Result<DataHead, WireError> {
    let frame = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if frame == 0 || frame > FRAME_BYTES_MAX {
        return Err(bad(format!("frame of {frame} bytes (the limit is {FRAME_BYTES_MAX})")));
    }
    let (id, rest) = match head[4] {
        K_DATA if head.len() == DATA_HEAD_BYTES => (None, &head[5..]),
        K_PUT_DATA if head.len() == PUT_DATA_HEAD_BYTES => {
            (Some(u64::from_le_bytes(head[5..13].try_into().expect("8 bytes"))), &head[13..])
        }
        k => return Err(bad(format!("kind {k} with a head of {} bytes is not a data frame", head.len()))),
    };
    let offset = u64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
    let digest: [u8; 32] = rest[8..40].try_into().expect("32 bytes");
    let len = u32::from_le_bytes(rest[40..44].try_into().expect("4 bytes")) as usize;
    if len > CHUNK_BYTES_MAX {
        return Err(bad(format!("chunk of {len} bytes (the limit is {CHUNK_BYTES_MAX})")));
    }
    if frame != head.len() - 4 + len {
        return Err(bad(format!("a frame of {frame} bytes holds a chunk of {len} bytes")));
    }
    Ok(DataHead { id, offset, digest, len })
}

/// Read one frame and decode it. The length is checked against [`FRAME_BYTES_MAX`] before anything is allocated.
///
/// A data frame (`Data`, `PutData`) has its head read and checked first ([`parse_data_head`]), then its payload read
/// straight into the buffer the message keeps: the bulk of the traffic is copied once, not into a frame buffer and
/// again out of it.
pub fn read_msg(r: &mut impl Read) -> Result<Msg, WireError> {
    let mut head = [0u8; PUT_DATA_HEAD_BYTES];
    r.read_exact(&mut head[..4])?;
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    // Checked before anything else is read: a peer that sent only a bad length is answered at once.
    if len == 0 || len > FRAME_BYTES_MAX {
        return Err(bad(format!("frame of {len} bytes (the limit is {FRAME_BYTES_MAX})")));
    }
    r.read_exact(&mut head[4..5])?;
    let head_bytes = match head[4] {
        K_DATA => DATA_HEAD_BYTES,
        K_PUT_DATA => PUT_DATA_HEAD_BYTES,
        _ => usize::MAX,
    };
    if len + 4 >= head_bytes {
        r.read_exact(&mut head[5..head_bytes])?;
        let h = parse_data_head(&head[..head_bytes])?;
        let mut bytes = vec![0u8; h.len];
        r.read_exact(&mut bytes)?;
        let (offset, digest) = (h.offset, h.digest);
        return Ok(match h.id {
            None => Msg::Data { offset, digest, bytes },
            Some(id) => Msg::PutData { id, offset, digest, bytes },
        });
    }
    let mut body = vec![0u8; len];
    body[0] = head[4];
    r.read_exact(&mut body[1..])?;
    Msg::decode_body(&body)
}

/// Split a relative wire path into components, refusing anything that could leave the directory it is relative
/// to: an absolute path, `..`, `.`, empty components (`a//b`), and NUL. `""` is the directory itself. Used by
/// both sides: the server for every request, the client for every entry a server lists.
pub fn safe_components(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if path[0] == b'/' {
        return Err(format!("absolute path '{}' refused", path.shown()));
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." | b".." => {
                return Err(format!("path '{}' leaves its directory or is not canonical", path.shown()));
            }
            c if c.contains(&0) => return Err("path contains a NUL byte".to_string()),
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_heads_are_the_start_of_the_encoded_frames() {
        let bytes = vec![7u8; 1000];
        for msg in [
            Msg::Data { offset: 1 << 40, digest: [3; 32], bytes: bytes.clone() },
            Msg::PutData { id: 42, offset: 9, digest: [4; 32], bytes: bytes.clone() },
        ] {
            let mut frame = Vec::new();
            write_msg(&mut frame, &msg).unwrap();
            let head: Vec<u8> = match &msg {
                Msg::Data { offset, digest, .. } => data_head(*offset, digest, bytes.len()).to_vec(),
                Msg::PutData { id, offset, digest, .. } => put_data_head(*id, *offset, digest, bytes.len()).to_vec(),
                _ => unreachable!(),
            };
            assert_eq!(&frame[..head.len()], &head[..]);
            assert_eq!(&frame[head.len()..], &bytes[..]);
            let h = parse_data_head(&head).unwrap();
            assert_eq!(h.len, bytes.len());
        }
        let mut bad_len = data_head(0, &[0; 32], 10);
        bad_len[..4].copy_from_slice(&100u32.to_le_bytes());
        assert!(parse_data_head(&bad_len).is_err());
        let mut too_big = data_head(0, &[0; 32], 10);
        too_big[45..].copy_from_slice(&((CHUNK_BYTES_MAX + 1) as u32).to_le_bytes());
        assert!(parse_data_head(&too_big).is_err());
    }

    fn all() -> Vec<Msg> {
        vec![
            Msg::Hello { version: VERSION, nonce: [7; 32], flags: hello::ENCRYPT | hello::COMPRESS | (19 << 3) },
            Msg::Challenge { version: VERSION, nonce: [8; 32], read_only: true, flags: challenge::ENCRYPT },
            Msg::KeyShare { public: [9; 32] },
            Msg::Auth { mac: [1; 32] },
            Msg::AuthOk { mac: [2; 32] },
            Msg::Error { code: code::NOT_FOUND, message: "no such file".into() },
            Msg::Ok,
            Msg::List { path: b"a/b".to_vec(), recursive: true, follow: true },
            Msg::EntryError { path: b"a/l".to_vec(), code: code::PATH_ESCAPES, message: "leads outside".into() },
            Msg::Entry(EntryMeta {
                path: b"x\xffy".to_vec(),
                kind: EntryKind::Symlink,
                mode: 0o4755,
                uid: 1,
                gid: 2,
                size: u64::MAX,
                mtime_sec: -5,
                mtime_nsec: 999_999_999,
                target: b"../t".to_vec(),
                dev: u64::MAX,
                ino: 3,
                nlink: 4,
            }),
            Msg::ListEnd,
            Msg::Stat { path: vec![], follow: false },
            Msg::Hash { path: b"f".to_vec(), offset: 0, len: u64::MAX, follow: true },
            Msg::Hashed { digest: [5; 32], bytes: 12 },
            Msg::Get { path: b"f".to_vec(), offset: 3, len: 9, follow: true },
            Msg::Data { offset: 1 << 40, digest: [3; 32], bytes: vec![9; 1000] },
            Msg::DataEnd { size: 10, mtime_sec: 1, mtime_nsec: 2 },
            Msg::PutBegin { id: 42, path: b"d/f".to_vec(), size: 100, mode: 0o644 },
            Msg::PutData { id: 42, offset: 0, digest: [4; 32], bytes: vec![1, 2, 3] },
            Msg::PutEnd { id: 42, mode: 0o600, uid: 0, gid: 0, mtime_sec: 7, mtime_nsec: 8, fsync: true },
            Msg::Hole { offset: 4096, len: 1 << 40 },
            Msg::GetXattrs { path: b"d/f".to_vec(), follow: true },
            Msg::Clean { path: b"d".to_vec() },
            Msg::Parts { names: vec![b"big.bin".to_vec(), vec![b'x'; NAME_BYTES_MAX]] },
            Msg::DropParts { path: b"d".to_vec(), names: vec![b"big.bin".to_vec()] },
            Msg::Link { path: b"d/g".to_vec(), target: b"d/f".to_vec() },
            Msg::XattrList { xattrs: vec![(b"user.a".to_vec(), b"1".to_vec()), (b"user.b".to_vec(), Vec::new())] },
            Msg::PutXattrs { id: 42, xattrs: vec![(b"user.c".to_vec(), vec![0; 300])] },
            Msg::SetXattrs { path: b"d".to_vec(), xattrs: Vec::new() },
            Msg::PutHole { id: 42, offset: 8192, len: 12 },
            Msg::PutAbort { id: 42 },
            Msg::PutResume {
                id: 43,
                path: b"d/big".to_vec(),
                size: 1 << 33,
                mode: 0o640,
                mtime_sec: 9,
                mtime_nsec: 10,
            },
            Msg::Resumed { recorded_bytes: 1 << 30 },
            Msg::PutCheck { id: 43, offset: 4 << 20, len: 4 << 20, digest: [6; 32] },
            Msg::Mkdir { path: b"d".to_vec(), mode: 0o755 },
            Msg::SetMeta { path: b"d".to_vec(), mode: 0o700, uid: 5, gid: 6, mtime_sec: 1, mtime_nsec: 0 },
            Msg::Symlink { path: b"l".to_vec(), target: b"d/f".to_vec(), uid: 7, gid: 8, mtime_sec: 1, mtime_nsec: 1 },
            Msg::Delete { path: b"old".to_vec() },
            Msg::Bye,
        ]
    }

    #[test]
    fn every_message_round_trips_through_a_frame() {
        for m in all() {
            let mut buf = Vec::new();
            write_msg(&mut buf, &m).unwrap();
            assert_eq!(read_msg(&mut buf.as_slice()).unwrap(), m);
        }
    }

    #[test]
    fn frames_are_the_length_and_the_encoded_body() {
        // write_frame writes data frames from their parts: the same bytes as the length and the encoded body.
        for m in all() {
            let mut frame = Vec::new();
            write_frame(&mut frame, &m).unwrap();
            let body = m.encode_body();
            assert_eq!(frame[..4], (body.len() as u32).to_le_bytes(), "{m:?}");
            assert_eq!(frame[4..], body[..], "{m:?}");
        }
    }

    #[test]
    fn read_msg_refuses_cut_and_padded_frames_of_every_kind() {
        // Data frames take their own path through read_msg (head first, then the payload into its buffer).
        for m in all() {
            let mut frame = Vec::new();
            write_msg(&mut frame, &m).unwrap();
            for cut in 0..frame.len() {
                assert!(read_msg(&mut &frame[..cut]).is_err(), "{m:?} cut at {cut} was read");
            }
            let mut padded = frame.clone();
            let len = u32::from_le_bytes(padded[..4].try_into().unwrap()) + 1;
            padded[..4].copy_from_slice(&len.to_le_bytes());
            padded.push(0);
            assert!(read_msg(&mut padded.as_slice()).is_err(), "{m:?} with a byte more in its frame was read");
        }
    }

    #[test]
    fn truncated_oversized_and_trailing_frames_are_refused() {
        for m in all() {
            let body = m.encode_body();
            for cut in 0..body.len() {
                assert!(Msg::decode_body(&body[..cut]).is_err(), "{m:?} cut at {cut} decoded");
            }
            let mut long = body.clone();
            long.push(0);
            assert!(Msg::decode_body(&long).is_err(), "{m:?} with a trailing byte decoded");
        }
        // A length prefix over the cap is refused before allocating.
        let mut frame = ((FRAME_BYTES_MAX + 1) as u32).to_le_bytes().to_vec();
        frame.push(K_OK);
        assert!(read_msg(&mut frame.as_slice()).is_err());
        // A field length over its cap.
        let mut body = vec![K_STAT];
        body.extend_from_slice(&((PATH_BYTES_MAX + 1) as u32).to_le_bytes());
        body.extend(std::iter::repeat_n(b'a', PATH_BYTES_MAX + 1));
        assert!(Msg::decode_body(&body).is_err());
        assert!(Msg::decode_body(&[200]).is_err());
        // Too many names, and names that are not one component, are refused.
        let mut many = vec![K_PARTS];
        many.extend_from_slice(&((PART_NAMES_MAX + 1) as u32).to_le_bytes());
        assert!(Msg::decode_body(&many).is_err());
        for bad_name in [&b""[..], b"..", b"a/b", b"a\0b"] {
            let body = Msg::Parts { names: vec![bad_name.to_vec()] }.encode_body();
            assert!(Msg::decode_body(&body).is_err(), "{bad_name:?} accepted as a name");
        }
        assert!(Msg::decode_body(&[K_CHALLENGE, 1, 0]).is_err());
        // A version-1 hello of before the flags (no flags byte) is refused, not misread.
        let mut old = vec![K_HELLO, 1, 0];
        old.extend_from_slice(&[7; 32]);
        assert!(Msg::decode_body(&old).is_err());
    }

    #[test]
    fn long_error_texts_are_cut_on_a_character_boundary() {
        let message = "é".repeat(TEXT_BYTES_MAX); // 2 bytes each: the cap falls between characters or inside one
        for m in [message.clone(), format!("x{message}")] {
            let got = Msg::decode_body(&Msg::Error { code: code::IO, message: m.clone() }.encode_body()).unwrap();
            let Msg::Error { message: got, .. } = got else { panic!("not an error") };
            assert!(got.len() <= TEXT_BYTES_MAX && got.len() >= TEXT_BYTES_MAX - 1 && m.starts_with(&got));
        }
    }

    #[test]
    fn paths_that_leave_are_refused() {
        assert_eq!(safe_components(b"").unwrap(), Vec::<&[u8]>::new());
        assert_eq!(safe_components(b"a/b\xff").unwrap(), vec![&b"a"[..], &b"b\xff"[..]]);
        for p in [&b"/etc/passwd"[..], b"..", b"a/../b", b"a/./b", b"a//b", b"a/", b"./a", b"a/.."] {
            assert!(safe_components(p).is_err(), "{:?} accepted", String::from_utf8_lossy(p));
        }
        // Encoded dot-dot is just a name here (the wire carries raw bytes, nothing is URL-decoded).
        assert!(safe_components(b"%2e%2e").is_ok());
    }
}
