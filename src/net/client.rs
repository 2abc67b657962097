//! The client side of a `fastsync://` connection: connect, authenticate, and one helper per request.
//!
//! A [`Connection`] is strictly request/answer (one request in flight), so several connections
//! ([`Dialer::dial_n`]) carry a transfer in parallel. Every read and write has a timeout ([`DEFAULT_TIMEOUT`] unless
//! the caller gives another), so a server that stops answering breaks the connection instead of hanging it. A failed
//! request says whether the connection can still be used: [`ReqError::Server`] (the server refused this one request
//! and said why) or [`ReqError::Broken`] (closed, reset, stalled past the timeout or garbled: the connection is done,
//! and the message names the server). A [`Dialer`] opens connections to one server again and again, so that a client
//! can replace a connection that broke.

use std::io::{self, BufReader, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::auth::{self, AuthError, Key, Wishes};
use super::record::{Reader, Writer};
use super::wire::{CHUNK_BYTES_MAX, EntryMeta, Msg, WireError, Xattrs, code, read_msg, write_msg};

/// Read, write and connect timeout of every connection.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A data chunk answered with a digest error is sent again, up to this many times in all.
pub const DIGEST_ATTEMPTS_MAX: u32 = 3;

/// A connection left without a request for this long is sent a cheap one (`Stat` of the root), so that a server
/// dropping idle clients (`serve --timeout`, 60 s by default) keeps it while other connections do the work.
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// DNS, refused, unreachable, timed out.
    #[error("cannot connect to {addr}: {cause}")]
    Connect { addr: String, cause: String },
    #[error("{0}")]
    Auth(AuthError),
    /// The connection broke during authentication.
    #[error("connection to {addr} failed during authentication: {cause}")]
    Lost { addr: String, cause: String },
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReqError {
    /// The server refused this request (the connection is still usable).
    Server { code: u16, message: String },
    /// The connection is unusable; the message names the server and the cause.
    Broken(String),
}

impl ReqError {
    /// The cause alone: the server words its refusals `what 'path': cause`, and the client names the path itself.
    pub fn cause(&self) -> &str {
        match self {
            ReqError::Server { message, .. } => match message.find("': ") {
                Some(i) if message[..i].contains('\'') => &message[i + 3..],
                _ => message,
            },
            ReqError::Broken(m) => m,
        }
    }
}

impl std::fmt::Display for ReqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReqError::Server { message, .. } => f.write_str(message),
            ReqError::Broken(m) => f.write_str(m),
        }
    }
}

/// Why a `Get` failed: the request, or the local side (the connection was kept in step: usable).
#[derive(Debug)]
pub enum GetError {
    Req(ReqError),
    /// The local sink failed (the rest of the answer was read and dropped).
    Sink(io::Error),
    /// A chunk's BLAKE3 digest did not match its bytes, or the chunks did not follow each other (rest dropped).
    Corrupt(String),
}

impl From<ReqError> for GetError {
    fn from(e: ReqError) -> Self {
        GetError::Req(e)
    }
}

/// Ctrl-C between two chunks of a `Get`'s answer: the rest of it is not read and the connection is given up, so that
/// the stream stops now rather than after its whole range (up to 32 MiB); what was checked and written stays for the
/// rerun. The caller's retry sees the signal and stops instead of dialling again.
pub fn stop_if_interrupted(addr: &str) -> Result<(), GetError> {
    match crate::interrupt::received() {
        Some(_) => Err(GetError::Req(ReqError::Broken(format!("connection to {addr} given up: interrupted")))),
        None => Ok(()),
    }
}

/// The end of a `Get`: the file's size and mtime after it was read, and where the data ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataEnd {
    pub size: u64,
    pub mtime: (i64, u32),
    /// The offset after the last byte received: `min(offset + len, size)` when the file did not change.
    pub received_to: u64,
}

/// A connection's buffered reading and writing halves ([`Connection::plain_parts`]).
pub type PlainParts<'a> = (&'a mut BufReader<Reader<TcpStream>>, &'a mut BufWriter<Writer<TcpStream>>);

/// One authenticated connection.
pub struct Connection {
    addr: String,
    r: BufReader<Reader<TcpStream>>,
    w: BufWriter<Writer<TcpStream>>,
    /// The server refuses writes.
    pub read_only: bool,
    /// Every record after the handshake is sealed (`--encrypt`).
    pub encrypted: bool,
    /// Records may be compressed (`--compress`, and the server allows it).
    pub compressed: bool,
    /// When the last request was sent.
    last_used: Instant,
    /// Reading requests ask the server to follow symlinks beneath its root (`-L` on a pull).
    follow: bool,
}

/// Connect to `addr` (`host:port`), authenticate with `key`, and switch to the record layer when `wishes` asks for
/// encryption or compression (and the server agrees; a server that does not agree to encrypt is refused).
pub fn connect(addr: &str, key: &Key, wishes: Wishes, timeout: Duration) -> Result<Connection, ConnectError> {
    let fail = |cause: String| ConnectError::Connect { addr: addr.to_string(), cause };
    let addrs: Vec<_> = addr.to_socket_addrs().map_err(|e| fail(e.to_string()))?.collect();
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(fail(describe_io(&e, timeout))),
        (None, None) => return Err(fail("the name resolves to no address".to_string())),
    };
    let setup = |s: &TcpStream| -> io::Result<()> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))
    };
    setup(&stream).map_err(|e| fail(e.to_string()))?;
    let session = auth::client_with(&mut stream, key, wishes).map_err(|e| match e {
        AuthError::Wire(w) => ConnectError::Lost { addr: addr.to_string(), cause: describe_wire(&w, timeout) },
        other => ConnectError::Auth(other),
    })?;
    let reader = Reader::Plain(stream.try_clone().map_err(|e| fail(e.to_string()))?);
    let reader = reader.upgrade(&session.recv).map_err(|e| fail(e.to_string()))?;
    let writer = Writer::Plain(stream).upgrade(&session.send).map_err(|e| fail(e.to_string()))?;
    Ok(Connection {
        addr: addr.to_string(),
        r: BufReader::with_capacity(256 << 10, reader),
        w: BufWriter::with_capacity(256 << 10, writer),
        read_only: session.read_only,
        encrypted: session.encrypt,
        compressed: session.compress.is_some(),
        last_used: Instant::now(),
        follow: false,
    })
}

/// How to open connections to one server, as often as needed: its address, the token's key, what to ask for in the
/// handshake, and the timeout. A broken connection is replaced by dialling again (a fresh TCP connection and a fresh
/// handshake: nothing of the old one is reused).
pub struct Dialer {
    addr: String,
    key: Key,
    wishes: Wishes,
    timeout: Duration,
    follow: bool,
}

impl Dialer {
    pub fn new(addr: &str, key: Key, wishes: Wishes, timeout: Duration) -> Dialer {
        Dialer { addr: addr.to_string(), key, wishes, timeout, follow: false }
    }

    /// Connections that ask the server to follow symlinks beneath its root in every reading request (`-L` on a
    /// pull; see [`Connection::set_follow`]).
    pub fn following(mut self, follow: bool) -> Dialer {
        self.follow = follow;
        self
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The connect, read and write timeout of every connection.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A new authenticated connection.
    pub fn dial(&self) -> Result<Connection, ConnectError> {
        let mut conn = connect(&self.addr, &self.key, self.wishes, self.timeout)?;
        conn.set_follow(self.follow);
        Ok(conn)
    }

    /// `n` new authenticated connections.
    pub fn dial_n(&self, n: usize) -> Result<Vec<Connection>, ConnectError> {
        (0..n).map(|_| self.dial()).collect()
    }
}

fn describe_io(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no answer within {} s (timed out)", timeout.as_secs())
        }
        io::ErrorKind::UnexpectedEof => "the server closed the connection".to_string(),
        _ => e.to_string(),
    }
}

fn describe_wire(e: &WireError, timeout: Duration) -> String {
    match e {
        // Mid-conversation, a timeout means the peer stopped moving bytes: a stall.
        WireError::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            format!("stalled: no progress for {} s (timed out)", timeout.as_secs())
        }
        WireError::Io(io) => describe_io(io, timeout),
        WireError::Malformed(m) => format!("protocol error: {m}"),
    }
}

/// The BLAKE3 digest of a chunk, as the wire carries it.
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

impl Connection {
    /// `host:port` of the server.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Whether `Stat`, `List`, `Get`, `Hash` and `GetXattrs` ask the server to follow symlinks beneath its root: what
    /// a symlink leads to is read in its place, and one that leads outside the root, dangles or loops is an error.
    pub fn set_follow(&mut self, follow: bool) {
        self.follow = follow;
    }

    /// See [`Connection::set_follow`].
    pub fn follows(&self) -> bool {
        self.follow
    }

    fn broken(&self, e: &WireError) -> ReqError {
        let timeout = self.r.get_ref().get_ref().read_timeout().ok().flatten().unwrap_or(DEFAULT_TIMEOUT);
        ReqError::Broken(format!("connection to {} lost: {}", self.addr, describe_wire(e, timeout)))
    }

    fn unexpected(&self, what: &str, got: &Msg) -> ReqError {
        let kind = format!("{got:?}");
        let kind = kind.split([' ', '(', '{']).next().unwrap_or("?").to_string();
        ReqError::Broken(format!("protocol error from {}: {kind} instead of {what}", self.addr))
    }

    /// Send one message (flushed).
    pub fn send(&mut self, msg: &Msg) -> Result<(), ReqError> {
        self.last_used = Instant::now();
        write_msg(&mut self.w, msg).map_err(|e| self.broken(&e))
    }

    /// Send a cheap request when the connection has been idle for [`KEEPALIVE`].
    /// The socket's descriptor (for `TCP_INFO`; never read from or written to outside this connection).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.r.get_ref().get_ref().as_raw_fd()
    }

    pub fn keepalive(&mut self) -> Result<(), ReqError> {
        if self.last_used.elapsed() < KEEPALIVE {
            return Ok(());
        }
        self.stat(b"").map(drop)
    }

    /// Read one message.
    pub fn recv(&mut self) -> Result<Msg, ReqError> {
        read_msg(&mut self.r).map_err(|e| self.broken(&e))
    }

    /// Send a request answered by `Ok` or `Error`.
    pub fn expect_ok(&mut self, msg: &Msg) -> Result<(), ReqError> {
        self.send(msg)?;
        match self.recv()? {
            Msg::Ok => Ok(()),
            Msg::Error { code, message } => Err(ReqError::Server { code, message }),
            other => Err(self.unexpected("Ok", &other)),
        }
    }

    /// Several requests answered by `Ok` or `Error`, sent back to back (one flush, so one record and one round trip)
    /// and then their answers read in order. The first failure is returned with the index of its request; every
    /// answer is read either way, so the connection stays in step.
    pub fn pipeline_ok(&mut self, msgs: &[Msg]) -> Result<(), (usize, ReqError)> {
        match self.pipeline_groups(&[msgs]) {
            (mut answers, None) => answers.pop().expect("one group, answered"),
            (_, Some((i, e))) => Err((i, e)),
        }
    }

    /// Groups of requests (a small file's `PutBegin`, `PutData`, `PutEnd`, ...), each request answered by `Ok` or
    /// `Error`: all sent back to back with one flush, then every answer read in order. Returns, for each group
    /// answered in full, `Ok` or the index of its first failed request with the failure; and, when the connection
    /// broke, the break with the index (within its group) of the request it broke at. The groups after the first
    /// one not answered in full have no result: they may or may not have been carried out.
    ///
    /// The answers wait in the socket while the requests are written, so the caller keeps a pipeline to what the
    /// socket buffers hold without reading (a few thousand answers of a few bytes each).
    #[allow(clippy::type_complexity)]
    pub fn pipeline_groups(
        &mut self,
        groups: &[&[Msg]],
    ) -> (Vec<Result<(), (usize, ReqError)>>, Option<(usize, ReqError)>) {
        if let Err(e) = self.send_all(groups.iter().flat_map(|g| g.iter())) {
            return (Vec::new(), Some((0, e)));
        }
        let mut answers = Vec::with_capacity(groups.len());
        for group in groups {
            let mut first = None;
            for i in 0..group.len() {
                let failure = match self.recv() {
                    Ok(Msg::Ok) => continue,
                    Ok(Msg::Error { code, message }) => ReqError::Server { code, message },
                    Ok(other) => return (answers, Some((i, self.unexpected("Ok", &other)))),
                    Err(e) => return (answers, Some((i, e))),
                };
                first.get_or_insert((i, failure));
            }
            answers.push(first.map_or(Ok(()), Err));
        }
        (answers, None)
    }

    /// Metadata of `path` itself (not followed when it is a symlink, unless the connection follows); `None` when it
    /// does not exist.
    pub fn stat(&mut self, path: &[u8]) -> Result<Option<EntryMeta>, ReqError> {
        self.send(&Msg::Stat { path: path.to_vec(), follow: self.follow })?;
        match self.recv()? {
            Msg::Entry(e) => Ok(Some(e)),
            Msg::Error { code: code::NOT_FOUND, .. } => Ok(None),
            Msg::Error { code, message } => Err(ReqError::Server { code, message }),
            other => Err(self.unexpected("Entry", &other)),
        }
    }

    /// BLAKE3 of `[offset, offset + len)` of file `path` on the server (to its end when shorter), and the bytes it
    /// covered.
    pub fn hash(&mut self, path: &[u8], offset: u64, len: u64) -> Result<([u8; 32], u64), ReqError> {
        self.send(&Msg::Hash { path: path.to_vec(), offset, len, follow: self.follow })?;
        match self.recv()? {
            Msg::Hashed { digest, bytes } => Ok((digest, bytes)),
            Msg::Error { code, message } => Err(ReqError::Server { code, message }),
            other => Err(self.unexpected("Hashed", &other)),
        }
    }

    /// `GetXattrs`: the extended attributes of `path` itself.
    pub fn get_xattrs(&mut self, path: &[u8]) -> Result<Xattrs, ReqError> {
        self.send(&Msg::GetXattrs { path: path.to_vec(), follow: self.follow })?;
        self.xattrs_answer()
    }

    /// The answer to a `GetXattrs` sent earlier (see [`Connection::send_gets`]).
    pub fn xattrs_answer(&mut self) -> Result<Xattrs, ReqError> {
        match self.recv()? {
            Msg::XattrList { xattrs } => Ok(xattrs),
            Msg::Error { code, message } => Err(ReqError::Server { code, message }),
            other => Err(self.unexpected("XattrList", &other)),
        }
    }

    /// `PutXattrs`: set extended attributes on the temporary of transfer `id`.
    pub fn put_xattrs(&mut self, id: u64, xattrs: Xattrs) -> Result<(), ReqError> {
        self.expect_ok(&Msg::PutXattrs { id, xattrs })
    }

    /// `SetXattrs`: set extended attributes on `path` itself.
    pub fn set_xattrs(&mut self, path: &[u8], xattrs: Xattrs) -> Result<(), ReqError> {
        self.expect_ok(&Msg::SetXattrs { path: path.to_vec(), xattrs })
    }

    /// Start listing `path`; the entries are read from the returned stream (the connection is busy until it ends).
    pub fn list(&mut self, path: &[u8], recursive: bool) -> Result<ListStream<'_>, ReqError> {
        self.send(&Msg::List { path: path.to_vec(), recursive, follow: self.follow })?;
        Ok(ListStream { conn: self, done: false })
    }

    /// Read `[offset, offset + len)` of `path`, handing each chunk (digest checked, offsets in order) to `sink` and
    /// each hole of a sparse file (`Hole`: offset, length) to `hole`.
    /// On a local failure or a corrupt chunk the rest of the answer is read and dropped, so the connection stays
    /// usable; chunks out of order or outside the range break it (at most `len` bytes are ever read).
    pub fn get(
        &mut self,
        path: &[u8],
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
        hole: &mut dyn FnMut(u64, u64) -> io::Result<()>,
    ) -> Result<DataEnd, GetError> {
        self.send(&Msg::Get { path: path.to_vec(), offset, len, follow: self.follow })?;
        self.get_answer(offset, len, sink, hole)
    }

    /// `Get`s of whole files (`path`, `len`), each followed by a `GetXattrs` of the same file when `xattrs`, sent
    /// back to back with one flush: the answers are then read in the same order, one [`Connection::get_answer`] (and
    /// [`Connection::xattrs_answer`]) each (a few requests of a few hundred bytes: nothing waits for them to be
    /// read).
    pub fn send_gets(&mut self, gets: &[(&[u8], u64)], xattrs: bool) -> Result<(), ReqError> {
        let follow = self.follow;
        self.send_all(gets.iter().flat_map(|&(path, len)| {
            let get = Msg::Get { path: path.to_vec(), offset: 0, len, follow };
            let x = xattrs.then(|| Msg::GetXattrs { path: path.to_vec(), follow });
            std::iter::once(get).chain(x)
        }))
    }

    /// Requests written back to back, then flushed once (one record, one round trip).
    fn send_all<M: std::borrow::Borrow<Msg>>(&mut self, msgs: impl IntoIterator<Item = M>) -> Result<(), ReqError> {
        use std::io::Write;
        self.last_used = Instant::now();
        for msg in msgs {
            if let Err(e) = crate::net::wire::write_frame(&mut self.w, msg.borrow()) {
                return Err(self.broken(&crate::net::wire::WireError::Io(e)));
            }
        }
        self.w.flush().map_err(|e| self.broken(&crate::net::wire::WireError::Io(e)))
    }

    /// The answer to a `Get` of `[offset, offset + len)` sent earlier (see [`Connection::get`]).
    pub fn get_answer(
        &mut self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
        hole: &mut dyn FnMut(u64, u64) -> io::Result<()>,
    ) -> Result<DataEnd, GetError> {
        let end = offset.saturating_add(len);
        let mut next = offset;
        let mut failure: Option<GetError> = None;
        loop {
            stop_if_interrupted(&self.addr)?;
            match self.recv()? {
                Msg::Data { offset: at, digest: d, bytes } => {
                    if at != next || bytes.is_empty() || at.saturating_add(bytes.len() as u64) > end {
                        // Not the next bytes of the range: the conversation cannot be trusted any more.
                        return Err(GetError::Req(ReqError::Broken(format!(
                            "protocol error from {}: it sent bytes {at}..{} where {next}..{end} were expected",
                            self.addr,
                            at.saturating_add(bytes.len() as u64)
                        ))));
                    }
                    next += bytes.len() as u64;
                    if failure.is_some() {
                        continue;
                    }
                    if digest(&bytes) != d {
                        failure = Some(GetError::Corrupt(format!(
                            "the BLAKE3 digest of the chunk at offset {at} does not match its bytes"
                        )));
                    } else if let Err(e) = sink(at, &bytes) {
                        failure = Some(GetError::Sink(e));
                    }
                }
                Msg::Hole { offset: at, len: n } => {
                    if at != next || n == 0 || at.saturating_add(n) > end {
                        return Err(GetError::Req(ReqError::Broken(format!(
                            "protocol error from {}: it sent a hole at {at}..{} where {next}..{end} were expected",
                            self.addr,
                            at.saturating_add(n)
                        ))));
                    }
                    next += n;
                    if failure.is_none()
                        && let Err(e) = hole(at, n)
                    {
                        failure = Some(GetError::Sink(e));
                    }
                }
                Msg::DataEnd { size, mtime_sec, mtime_nsec } => {
                    return match failure {
                        Some(f) => Err(f),
                        None => Ok(DataEnd { size, mtime: (mtime_sec, mtime_nsec), received_to: next }),
                    };
                }
                // An error ends the answer.
                Msg::Error { code, message } => return Err(GetError::Req(ReqError::Server { code, message })),
                other => return Err(GetError::Req(self.unexpected("Data", &other))),
            }
        }
    }

    /// `PutResume`: the server opens (or creates) the resumable temporary of `path`; returns how many bytes an
    /// earlier run left recorded.
    pub fn put_resume(
        &mut self,
        id: u64,
        path: &[u8],
        size: u64,
        mode: u32,
        mtime: (i64, u32),
    ) -> Result<u64, ReqError> {
        let (mtime_sec, mtime_nsec) = mtime;
        self.send(&Msg::PutResume { id, path: path.to_vec(), size, mode, mtime_sec, mtime_nsec })?;
        match self.recv()? {
            Msg::Resumed { recorded_bytes } => Ok(recorded_bytes),
            Msg::Error { code, message } => Err(ReqError::Server { code, message }),
            other => Err(self.unexpected("Resumed", &other)),
        }
    }

    /// `PutCheck`: whether the server already holds `[offset, offset + len)` of transfer `id` with this digest (it
    /// then counts as received).
    pub fn put_check(&mut self, id: u64, offset: u64, len: u64, digest: [u8; 32]) -> Result<bool, ReqError> {
        self.send(&Msg::PutCheck { id, offset, len, digest })?;
        match self.recv()? {
            Msg::Ok => Ok(true),
            Msg::Error { .. } => Ok(false),
            other => Err(self.unexpected("Ok", &other)),
        }
    }

    /// `PutBegin`: the server creates a temporary for `path`.
    pub fn put_begin(&mut self, id: u64, path: &[u8], size: u64, mode: u32) -> Result<(), ReqError> {
        self.expect_ok(&Msg::PutBegin { id, path: path.to_vec(), size, mode })
    }

    /// One chunk of transfer `id` (at most [`CHUNK_BYTES_MAX`] bytes), with its digest; a chunk the server finds
    /// corrupt (`DIGEST`) is sent again, up to [`DIGEST_ATTEMPTS_MAX`] times in all.
    pub fn put_data(&mut self, id: u64, offset: u64, bytes: Vec<u8>) -> Result<(), ReqError> {
        debug_assert!(bytes.len() <= CHUNK_BYTES_MAX);
        let d = digest(&bytes);
        let msg = Msg::PutData { id, offset, digest: d, bytes };
        let mut attempt = 1;
        loop {
            match self.expect_ok(&msg) {
                Err(ReqError::Server { code: code::DIGEST, .. }) if attempt < DIGEST_ATTEMPTS_MAX => attempt += 1,
                Err(ReqError::Server { code: code::DIGEST, message }) => {
                    return Err(ReqError::Server {
                        code: code::DIGEST,
                        message: format!("{message} (the chunk at offset {offset} was sent {attempt} times)"),
                    });
                }
                r => return r,
            }
        }
    }

    /// `PutEnd`: set metadata, make durable when asked, rename into place.
    #[allow(clippy::too_many_arguments)]
    pub fn put_end(
        &mut self,
        id: u64,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: (i64, u32),
        fsync: bool,
    ) -> Result<(), ReqError> {
        self.expect_ok(&Msg::PutEnd { id, mode, uid, gid, mtime_sec: mtime.0, mtime_nsec: mtime.1, fsync })
    }

    /// `PutHole`: `[offset, offset + len)` of transfer `id` is a hole.
    pub fn put_hole(&mut self, id: u64, offset: u64, len: u64) -> Result<(), ReqError> {
        self.expect_ok(&Msg::PutHole { id, offset, len })
    }

    /// `PutAbort`: the server removes the temporary of `id`.
    pub fn put_abort(&mut self, id: u64) -> Result<(), ReqError> {
        self.expect_ok(&Msg::PutAbort { id })
    }

    pub fn mkdir(&mut self, path: &[u8], mode: u32) -> Result<(), ReqError> {
        self.expect_ok(&Msg::Mkdir { path: path.to_vec(), mode })
    }

    /// `SetMeta`: owner `(uid, gid)` where the server may, permission bits and mtime of `path`.
    pub fn set_meta(&mut self, path: &[u8], mode: u32, owner: (u32, u32), mtime: (i64, u32)) -> Result<(), ReqError> {
        let (uid, gid) = owner;
        self.expect_ok(&Msg::SetMeta { path: path.to_vec(), mode, uid, gid, mtime_sec: mtime.0, mtime_nsec: mtime.1 })
    }

    /// `Symlink`: create or replace `path`, owned by `owner` where the server may.
    pub fn symlink(
        &mut self,
        path: &[u8],
        target: &[u8],
        owner: (u32, u32),
        mtime: (i64, u32),
    ) -> Result<(), ReqError> {
        self.expect_ok(&Msg::Symlink {
            path: path.to_vec(),
            target: target.to_vec(),
            uid: owner.0,
            gid: owner.1,
            mtime_sec: mtime.0,
            mtime_nsec: mtime.1,
        })
    }

    /// `Link`: `path` becomes another name of the file `target`.
    pub fn link(&mut self, path: &[u8], target: &[u8]) -> Result<(), ReqError> {
        self.expect_ok(&Msg::Link { path: path.to_vec(), target: target.to_vec() })
    }

    /// `Clean`: the server removes the temporaries of dead processes in directory `path` and answers with the names
    /// whose partial file (and journal) no live transfer holds.
    pub fn clean(&mut self, path: &[u8]) -> Result<Vec<Vec<u8>>, ReqError> {
        self.send(&Msg::Clean { path: path.to_vec() })?;
        match self.recv()? {
            Msg::Parts { names } => Ok(names),
            Msg::Error { code, message } => Err(ReqError::Server { code, message }),
            other => Err(self.unexpected("Parts", &other)),
        }
    }

    /// `DropParts`: remove the partial files of `names` in directory `path` (their source is gone); returns the
    /// names removed (a live transfer's are kept).
    pub fn drop_parts(&mut self, path: &[u8], names: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, ReqError> {
        self.send(&Msg::DropParts { path: path.to_vec(), names })?;
        match self.recv()? {
            Msg::Parts { names } => Ok(names),
            Msg::Error { code, message } => Err(ReqError::Server { code, message }),
            other => Err(self.unexpected("Parts", &other)),
        }
    }

    pub fn delete(&mut self, path: &[u8]) -> Result<(), ReqError> {
        self.expect_ok(&Msg::Delete { path: path.to_vec() })
    }

    /// The buffered halves of a connection whose frames travel bare (`None` with records), for the zero-copy data
    /// path ([`super::zerocopy`]), which moves payloads between their socket and files. Counts as using it.
    pub fn plain_parts(&mut self) -> Option<PlainParts<'_>> {
        if self.r.get_ref().plain().is_none() || self.w.get_ref().plain().is_none() {
            return None;
        }
        self.last_used = Instant::now();
        Some((&mut self.r, &mut self.w))
    }

    /// Say goodbye (best effort: the server may already be gone).
    pub fn bye(mut self) {
        let _ = write_msg(&mut self.w, &Msg::Bye);
    }
}

/// The entries of a `List`, read as they arrive.
pub struct ListStream<'c> {
    conn: &'c mut Connection,
    done: bool,
}

/// One item of a listing that follows symlinks.
#[derive(Debug)]
pub enum Listed {
    Entry(EntryMeta),
    /// `path` (relative to the listed path) is a symlink that could not be followed; the message says why.
    Failed {
        path: Vec<u8>,
        code: u16,
        message: String,
    },
}

impl Listed {
    /// The path of the entry, relative to the listed path.
    pub fn path(&self) -> &[u8] {
        match self {
            Listed::Entry(e) => &e.path,
            Listed::Failed { path, .. } => path,
        }
    }
}

impl ListStream<'_> {
    /// The next entry; `None` after `ListEnd`. A server error ends the listing (`Err(Server)`, then `None`). An
    /// `EntryError` (only in answer to a listing that follows symlinks) breaks the connection here: use
    /// [`ListStream::next_listed`] for those.
    pub fn next_entry(&mut self) -> Option<Result<EntryMeta, ReqError>> {
        match self.next_listed()? {
            Ok(Listed::Entry(e)) => Some(Ok(e)),
            Ok(Listed::Failed { .. }) => {
                self.done = true;
                Some(Err(ReqError::Broken(format!(
                    "protocol error from {}: EntryError in a listing that does not follow symlinks",
                    self.conn.addr
                ))))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// The next entry, or a symlink the server could not follow (the listing goes on); `None` after `ListEnd`.
    pub fn next_listed(&mut self) -> Option<Result<Listed, ReqError>> {
        if self.done {
            return None;
        }
        let r = match self.conn.recv() {
            Ok(Msg::Entry(e)) => return Some(Ok(Listed::Entry(e))),
            Ok(Msg::EntryError { path, code, message }) if self.conn.follow => {
                return Some(Ok(Listed::Failed { path, code, message }));
            }
            Ok(Msg::ListEnd) => {
                self.done = true;
                return None;
            }
            Ok(Msg::Error { code, message }) => Err(ReqError::Server { code, message }),
            Ok(other) => Err(self.conn.unexpected("Entry", &other)),
            Err(e) => Err(e),
        };
        self.done = true;
        Some(r)
    }

    /// Read and drop the rest of the listing (keeps the connection in step).
    pub fn drain(&mut self) -> Result<(), ReqError> {
        while let Some(r) = self.next_entry() {
            if let Err(e @ ReqError::Broken(_)) = r {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Read exactly `buf.len()` bytes at `offset` of `f` (or fewer at the end of the file).
pub fn read_at_full(f: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
