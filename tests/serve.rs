//! `fastsync serve`: a real server process on 127.0.0.1:0, driven by a small client built on the library's wire
//! format and authentication (independent of the fastsync:// client code).

#[macro_use]
#[allow(unused_macros)] // both_engines: these cases run no engine
mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use common::*;
use fastsync::net::auth::{self, AuthError, Key};
use fastsync::net::wire::{self, EntryKind, EntryMeta, Msg, code};

const TOKEN: &str = "serve-test-token-7d41c9";

// ---------------------------------------------------------------------------------------------------------------
// A server process and a test client
// ---------------------------------------------------------------------------------------------------------------

/// A running `fastsync serve`, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
    _token_dir: tempfile::TempDir,
}

/// How the server gets its token.
#[derive(Clone, Copy, PartialEq)]
enum TokenVia {
    File,
    Env,
}

fn serve_command(args: &[&std::ffi::OsStr]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.arg("serve").args(args);
    for var in ["TOKEN", "ENGINE", "CORES", "MEMORY_PROFILE", "MEMORY_LIMIT", "CONFIG"] {
        cmd.env_remove(format!("FASTSYNC_{var}"));
    }
    cmd.env("XDG_CONFIG_HOME", "/nonexistent/fastsync-tests").env_remove("RUST_BACKTRACE");
    cmd
}

impl Server {
    fn start(root: &Path, extra: &[&str]) -> Server {
        Server::start_with(root, extra, TokenVia::File)
    }

    fn start_with(root: &Path, extra: &[&str], via: TokenVia) -> Server {
        Server::start_env(root, extra, via, &[])
    }

    fn start_env(root: &Path, extra: &[&str], via: TokenVia, env: &[(&str, &str)]) -> Server {
        let token_dir = tmp();
        let token_file = token_dir.path().join("token");
        fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let mut args: Vec<&std::ffi::OsStr> = vec![root.as_os_str(), "--listen".as_ref(), "127.0.0.1:0".as_ref()];
        if via == TokenVia::File {
            args.extend(["--token-file".as_ref(), token_file.as_os_str()]);
        }
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        let mut cmd = serve_command(&args);
        if via == TokenVia::Env {
            cmd.env("FASTSYNC_TOKEN", TOKEN);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fastsync serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                sink.lock().unwrap().push(line);
            }
        });
        let first = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("fastsync serve printed no line; log: {:?}", log.lock().unwrap());
            }
        };
        let rest =
            first.strip_prefix("fastsync: serving ").unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        let (_, addr) = rest.rsplit_once(" on ").unwrap();
        let addr = addr.trim_end_matches(" (read-only)").to_string();
        assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"), "{first}");
        Server { child, addr, log, _token_dir: token_dir }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to 10 s for a log line containing all of `parts`.
    fn wait_log(&self, parts: &[&str]) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self.log().into_iter().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no log line with {parts:?}; log: {:?}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn raw(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    fn connect(&self) -> Client {
        let mut s = self.raw();
        let read_only = auth::client(&mut s, &Key::from_token(TOKEN.as_bytes())).expect("authentication");
        Client { s, read_only }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    s: TcpStream,
    read_only: bool,
}

type Refusal = (u16, String);

/// What a `Get` brought: the bytes, the size and mtime of `DataEnd`, and the number of `Data` chunks.
type Got = (Vec<u8>, u64, (i64, u32), usize);

/// An entry outside the root as the security test snapshots it: path, mode, mtime, content.
type Snap = (PathBuf, u32, (i64, u32), Vec<u8>);

impl Client {
    fn send(&mut self, m: &Msg) {
        wire::write_msg(&mut self.s, m).unwrap();
    }

    fn recv(&mut self) -> Msg {
        wire::read_msg(&mut self.s).unwrap()
    }

    fn req(&mut self, m: &Msg) -> Msg {
        self.send(m);
        self.recv()
    }

    /// A request that must be answered `Ok`.
    fn ok(&mut self, m: &Msg) {
        match self.req(m) {
            Msg::Ok => {}
            other => panic!("{m:?} answered {other:?}"),
        }
    }

    /// A request that must be refused; returns the code and message.
    fn refused(&mut self, m: &Msg) -> Refusal {
        match self.req(m) {
            Msg::Error { code, message } => (code, message),
            other => panic!("{m:?} was not refused: {other:?}"),
        }
    }

    fn stat(&mut self, path: &str) -> Result<EntryMeta, Refusal> {
        match self.req(&Msg::Stat { path: path.into(), follow: false }) {
            Msg::Entry(e) => Ok(e),
            Msg::Error { code, message } => Err((code, message)),
            other => panic!("stat answered {other:?}"),
        }
    }

    fn list(&mut self, path: &str, recursive: bool) -> Result<Vec<EntryMeta>, Refusal> {
        self.send(&Msg::List { path: path.into(), recursive, follow: false });
        let mut v = Vec::new();
        loop {
            match self.recv() {
                Msg::Entry(e) => v.push(e),
                Msg::ListEnd => return Ok(v),
                Msg::Error { code, message } => return Err((code, message)),
                other => panic!("list answered {other:?}"),
            }
        }
    }

    /// The bytes of a `Get`, each chunk's digest and offset checked, and the `DataEnd` (size, mtime); also the
    /// number of chunks.
    fn get(&mut self, path: &str, offset: u64, len: u64) -> Result<Got, Refusal> {
        self.send(&Msg::Get { path: path.into(), offset, len, follow: false });
        let mut data = Vec::new();
        let mut chunks = 0;
        loop {
            match self.recv() {
                Msg::Data { offset: at, digest, bytes } => {
                    assert_eq!(at, offset + data.len() as u64, "chunks arrive in order, without gaps");
                    assert!(bytes.len() <= wire::CHUNK_BYTES_MAX);
                    assert_eq!(*blake3::hash(&bytes).as_bytes(), digest, "chunk digest");
                    data.extend_from_slice(&bytes);
                    chunks += 1;
                }
                Msg::DataEnd { size, mtime_sec, mtime_nsec } => {
                    return Ok((data, size, (mtime_sec, mtime_nsec), chunks));
                }
                Msg::Error { code, message } => return Err((code, message)),
                other => panic!("get answered {other:?}"),
            }
        }
    }

    fn bye(mut self) {
        self.send(&Msg::Bye);
    }
}

fn put_data(id: u64, offset: u64, bytes: &[u8]) -> Msg {
    Msg::PutData { id, offset, digest: *blake3::hash(bytes).as_bytes(), bytes: bytes.to_vec() }
}

fn me() -> (u32, u32) {
    // SAFETY: no preconditions.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

fn put_end(id: u64, mode: u32, mtime: (i64, u32)) -> Msg {
    let (uid, gid) = me();
    Msg::PutEnd { id, mode, uid, gid, mtime_sec: mtime.0, mtime_nsec: mtime.1, fsync: true }
}

/// `SetMeta` keeping the server's own owner.
fn set_meta(path: &str, mode: u32, mtime: (i64, u32)) -> Msg {
    let (uid, gid) = me();
    Msg::SetMeta { path: path.into(), mode, uid, gid, mtime_sec: mtime.0, mtime_nsec: mtime.1 }
}

/// `Symlink` owned by the server's own user.
fn symlink(path: &str, target: &str, mtime: (i64, u32)) -> Msg {
    let (uid, gid) = me();
    Msg::Symlink { path: path.into(), target: target.into(), uid, gid, mtime_sec: mtime.0, mtime_nsec: mtime.1 }
}

/// Put a whole file through one connection.
fn put_file(c: &mut Client, id: u64, path: &str, data: &[u8], mode: u32, mtime: (i64, u32)) -> Result<(), Refusal> {
    match c.req(&Msg::PutBegin { id, path: path.into(), size: data.len() as u64, mode }) {
        Msg::Ok => {}
        Msg::Error { code, message } => return Err((code, message)),
        other => panic!("PutBegin answered {other:?}"),
    }
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        c.ok(&put_data(id, (i << 20) as u64, chunk));
    }
    match c.req(&put_end(id, mode, mtime)) {
        Msg::Ok => Ok(()),
        Msg::Error { code, message } => Err((code, message)),
        other => panic!("PutEnd answered {other:?}"),
    }
}

/// Read until the server closes the connection (an `Error` frame may come first); panics if it stays open.
fn assert_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            Err(e) => panic!("the server did not close the connection: {e}"),
        }
    }
}

fn mtime_of(p: &Path) -> (i64, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec() as u32)
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Runs `fastsync serve ARGS` expecting it to exit at once; returns (exit code, stderr).
fn serve_fails(args: &[&std::ffi::OsStr], env_token: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = serve_command(args);
    if let Some(t) = env_token {
        cmd.env("FASTSYNC_TOKEN", t);
    }
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("fastsync serve {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (status.code(), err)
}

// ---------------------------------------------------------------------------------------------------------------
// Starting, authentication
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn auth_succeeds_and_a_wrong_token_is_refused_and_logged_without_the_token() {
    let dir = tmp();
    let srv = Server::start(dir.path(), &[]);
    let mut c = srv.connect();
    assert!(!c.read_only);
    assert_eq!(c.stat("").unwrap().kind, EntryKind::Dir);

    let wrong = "wrong-token-3b9e";
    let mut s = srv.raw();
    let r = auth::client(&mut s, &Key::from_token(wrong.as_bytes()));
    assert!(matches!(r, Err(AuthError::Rejected)), "{r:?}");
    let line = srv.wait_log(&["fastsync: client 127.0.0.1:", "authentication failed"]);
    assert!(!line.contains(TOKEN) && !line.contains(wrong), "{line}");
    assert!(srv.log().iter().all(|l| !l.contains(TOKEN) && !l.contains(wrong)), "{:?}", srv.log());

    // The others are still served, the old connection and new ones alike.
    assert_eq!(c.stat("").unwrap().kind, EntryKind::Dir);
    srv.connect().bye();
}

#[test]
fn a_client_of_protocol_version_2_is_told_to_run_the_same_version() {
    let dir = tmp();
    let srv = Server::start(dir.path(), &[]);
    assert_eq!(wire::VERSION, 3);
    // What a version-2 fastsync sends first, with --encrypt: the hello's layout has not changed since.
    let mut s = srv.raw();
    wire::write_msg(&mut s, &Msg::Hello { version: 2, nonce: [1; 32], flags: 1 }).unwrap();
    match wire::read_msg(&mut s).unwrap() {
        Msg::Error { code, message } => {
            assert_eq!(code, code::VERSION, "{message}");
            assert!(message.contains("version 2 is not supported") && message.contains("speaks 3"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    srv.wait_log(&["protocol version 2", "use the same fastsync version on both hosts"]);
}

#[test]
fn a_low_order_key_share_is_refused_by_the_server() {
    let dir = tmp();
    let srv = Server::start(dir.path(), &[]);
    let mut s = srv.raw();
    wire::write_msg(&mut s, &Msg::Hello { version: wire::VERSION, nonce: [1; 32], flags: wire::hello::ENCRYPT })
        .unwrap();
    assert!(matches!(wire::read_msg(&mut s).unwrap(), Msg::Challenge { flags: wire::challenge::ENCRYPT, .. }));
    let Msg::KeyShare { public } = wire::read_msg(&mut s).unwrap() else { panic!("no key share from the server") };
    assert_ne!(public, [0; 32]);
    // The all-zero u-coordinate: a point of order 2, whose shared secret is zero whatever the server's key.
    wire::write_msg(&mut s, &Msg::KeyShare { public: [0; 32] }).unwrap();
    wire::write_msg(&mut s, &Msg::Auth { mac: [0; 32] }).unwrap();
    match wire::read_msg(&mut s).unwrap() {
        Msg::Error { code, message } => assert!(code == code::PROTOCOL && message.contains("low-order"), "{message}"),
        other => panic!("{other:?}"),
    }
    srv.wait_log(&["fastsync: client 127.0.0.1:", "low-order X25519 point"]);
    // The next client is served as usual.
    srv.connect().bye();
}

#[test]
fn the_token_can_come_from_the_environment() {
    let dir = tmp();
    let srv = Server::start_with(dir.path(), &[], TokenVia::Env);
    srv.connect().bye();
}

#[test]
fn serve_refuses_to_start_without_a_token_or_a_root_directory() {
    let dir = tmp();
    let root = dir.path().as_os_str();
    let (code, err) = serve_fails(&[root, "--listen".as_ref(), "127.0.0.1:0".as_ref()], None);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err, "fastsync: serve needs a shared token: --token-file FILE or FASTSYNC_TOKEN\n");

    let empty = dir.path().join("empty-token");
    fs::write(&empty, "\n").unwrap();
    let (code, err) = serve_fails(&[root, "--token-file".as_ref(), empty.as_os_str()], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is empty") && err.lines().count() == 1, "{err}");

    let missing = dir.path().join("missing");
    let (code, err) = serve_fails(&[missing.as_os_str(), "--listen".as_ref(), "127.0.0.1:0".as_ref()], Some(TOKEN));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.starts_with("fastsync: cannot serve '") && err.lines().count() == 1, "{err}");

    let file = dir.path().join("file");
    write_file(&file, b"x");
    let (code, err) = serve_fails(&[file.as_os_str(), "--listen".as_ref(), "127.0.0.1:0".as_ref()], Some(TOKEN));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("Not a directory") && err.lines().count() == 1, "{err}");

    let (code, err) = serve_fails(&[root, "--listen".as_ref(), "no-port".as_ref()], Some(TOKEN));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.starts_with("fastsync: --listen no-port:"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn list_stat_and_get() {
    let dir = tmp();
    let root = dir.path();
    write_file(&root.join("a.txt"), b"hello");
    set_times(&root.join("a.txt"), 1_500_000_000, 123_456_789);
    chmod(&root.join("a.txt"), 0o640);
    let big = random_bytes(7, (5 << 19) + 17); // 2.5 MiB + 17: three chunks
    write_file(&root.join("big.bin"), &big);
    mkdirs(&root.join("sub/deeper"));
    write_file(&root.join("sub/x"), b"x");
    write_file(&root.join("sub/deeper/y"), b"yy");
    mkdirs(&root.join("e"));
    ln_s("a.txt", &root.join("link"));
    write_file(&root.join(".a.txt.fstmp-1-1"), b"a temporary: never listed");
    let fifo = root.join("sub/fifo");
    mkfifo(&fifo);

    let srv = Server::start(root, &[]);
    let mut c = srv.connect();

    let top = c.list("", false).unwrap();
    let names: Vec<&[u8]> = top.iter().map(|e| &e.path[..]).collect();
    assert_eq!(names, [&b"a.txt"[..], b"big.bin", b"e", b"link", b"sub"]);
    let a = &top[0];
    assert_eq!(
        (a.kind, a.mode, a.size, a.mtime_sec, a.mtime_nsec),
        (EntryKind::File, 0o640, 5, 1_500_000_000, 123_456_789)
    );
    assert_eq!((top[3].kind, &top[3].target[..]), (EntryKind::Symlink, &b"a.txt"[..]));
    assert_eq!(top[4].kind, EntryKind::Dir);

    let all: Vec<String> =
        c.list("", true).unwrap().iter().map(|e| String::from_utf8(e.path.clone()).unwrap()).collect();
    assert_eq!(all, ["a.txt", "big.bin", "e", "link", "sub", "sub/deeper", "sub/deeper/y", "sub/fifo", "sub/x"]);
    let sub = c.list("sub", true).unwrap();
    let kinds: Vec<(String, EntryKind)> =
        sub.iter().map(|e| (String::from_utf8(e.path.clone()).unwrap(), e.kind)).collect();
    assert_eq!(
        kinds,
        [
            ("deeper".into(), EntryKind::Dir),
            ("deeper/y".into(), EntryKind::File),
            ("fifo".into(), EntryKind::Other),
            ("x".into(), EntryKind::File)
        ]
    );
    let one = c.list("sub/x", true).unwrap();
    assert_eq!((one.len(), &one[0].path[..], one[0].size), (1, &b""[..], 1));
    assert_eq!(c.list("missing", false).unwrap_err().0, code::NOT_FOUND);

    let st = c.stat("sub/deeper/y").unwrap();
    assert_eq!((&st.path[..], st.kind, st.size), (&b""[..], EntryKind::File, 2));
    assert_eq!(c.stat("link").unwrap().kind, EntryKind::Symlink, "stat never follows");
    assert_eq!(c.stat("missing").unwrap_err().0, code::NOT_FOUND);

    let (data, size, mtime, chunks) = c.get("big.bin", 0, u64::MAX).unwrap();
    assert!(data == big, "content differs");
    assert_eq!((size, mtime), (big.len() as u64, mtime_of(&root.join("big.bin"))));
    assert!(chunks >= 3, "{chunks} chunks");
    let (part, ..) = c.get("big.bin", 1_000_000, 1_200_000).unwrap();
    assert!(part == big[1_000_000..2_200_000], "a range");
    let (past, size, ..) = c.get("big.bin", big.len() as u64 + 10, 5).unwrap();
    assert_eq!((past.len() as u64, size), (0, big.len() as u64));
    let (a_data, _, a_mtime, _) = c.get("a.txt", 0, u64::MAX).unwrap();
    assert_eq!((&a_data[..], a_mtime), (&b"hello"[..], (1_500_000_000, 123_456_789)));

    assert_eq!(c.get("missing", 0, 1).unwrap_err().0, code::NOT_FOUND);
    assert!(c.get("sub", 0, 1).is_err(), "a directory");
    assert!(c.get("link", 0, 1).is_err(), "a symlink is never followed");
    assert!(c.get("sub/fifo", 0, 1).is_err(), "a FIFO, refused without waiting for a writer");

    // Several clients at once.
    let addr = srv.addr.clone();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                auth::client(&mut s, &Key::from_token(TOKEN.as_bytes())).unwrap();
                let mut c = Client { s, read_only: false };
                *blake3::hash(&c.get("big.bin", 0, u64::MAX).unwrap().0).as_bytes()
            })
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), *blake3::hash(&big).as_bytes());
    }
    c.bye();
}

// ---------------------------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------------------------

#[test]
/// With named temporaries (`FASTSYNC_TMPFILE=0`, as on a filesystem without `O_TMPFILE`): the temporary is visible
/// beside the final name while the file is incomplete. (Unnamed, nothing is: see the test after this one.)
fn a_put_across_two_connections_appears_only_after_put_end() {
    let dir = tmp();
    let root = dir.path();
    let srv = Server::start_env(root, &[], TokenVia::File, &[("FASTSYNC_TMPFILE", "0")]);
    let mut a = srv.connect();
    let mut b = srv.connect();
    a.ok(&Msg::Mkdir { path: "dir".into(), mode: 0o755 });

    let data = random_bytes(11, (5 << 20) + 123);
    let id = 0x5eed_0001;
    a.ok(&Msg::PutBegin { id, path: "dir/new.bin".into(), size: data.len() as u64, mode: 0o640 });
    assert_eq!(a.refused(&Msg::PutBegin { id, path: "dir/other".into(), size: 1, mode: 0o600 }).0, code::PROTOCOL);
    let chunks: Vec<&[u8]> = data.chunks(1 << 20).collect();
    for (i, chunk) in chunks.iter().enumerate().take(chunks.len() - 1) {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        if i == 1 {
            // Damaged in transit: refused, then sent again.
            let mut bad = put_data(id, (i << 20) as u64, chunk);
            if let Msg::PutData { bytes, .. } = &mut bad {
                bytes[100] ^= 1;
            }
            assert_eq!(c.refused(&bad).0, code::DIGEST);
        }
        c.ok(&put_data(id, (i << 20) as u64, chunk));
    }
    b.ok(&put_data(id, 0, chunks[0])); // a retry counts once
    // A damaged copy of a chunk that already counts is refused and never lands on it (on the zero-copy path, which
    // splices before it checks, the server takes the ordinary path for ranges already received).
    let mut bad = put_data(id, 0, chunks[0]);
    if let Msg::PutData { bytes, .. } = &mut bad {
        bytes[200_000] ^= 1;
    }
    assert_eq!(b.refused(&bad).0, code::DIGEST);
    assert_eq!(b.refused(&put_data(id, data.len() as u64 - 3, b"four")).0, code::PROTOCOL, "past the end");
    assert_eq!(b.refused(&put_data(id + 1, 0, b"x")).0, code::NOT_FOUND, "unknown transfer");

    // Not complete yet: refused, and nothing under the final name, only a temporary beside it.
    assert_eq!(b.refused(&put_end(id, 0o640, (1_600_000_000, 5))).0, code::PROTOCOL);
    assert!(!root.join("dir/new.bin").exists());
    let tmps = tmp_leftovers(root);
    assert_eq!(tmps.len(), 1, "{tmps:?}");
    let tmp_name = tmps[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(tmp_name.starts_with(".new.bin.fstmp-"), "{tmp_name}");
    assert_eq!(tmps[0].parent().unwrap(), root.join("dir"));
    assert_eq!(mode_of(&tmps[0]), 0o600);

    let last = chunks.len() - 1;
    b.ok(&put_data(id, (last << 20) as u64, chunks[last]));
    b.ok(&put_end(id, 0o640, (1_600_000_000, 123_456_789)));
    let f = root.join("dir/new.bin");
    assert!(fs::read(&f).unwrap() == data, "content");
    assert_eq!(mode_of(&f), 0o640);
    assert_eq!(mtime_of(&f), (1_600_000_000, 123_456_789));
    assert_no_tmp(root);
    assert_eq!(a.refused(&put_end(id, 0o640, (0, 0))).0, code::NOT_FOUND, "the transfer is over");

    // Replacing a file and a symlink; an empty file; a directory in the way.
    write_file(&root.join("old"), b"old content");
    ln_s("old", &root.join("link"));
    put_file(&mut a, 2, "old", b"new", 0o600, (1, 0)).unwrap();
    assert_eq!(fs::read(root.join("old")).unwrap(), b"new");
    put_file(&mut a, 3, "link", b"was a link", 0o644, (2, 0)).unwrap();
    assert!(fs::symlink_metadata(root.join("link")).unwrap().is_file());
    put_file(&mut a, 4, "empty", b"", 0o644, (3, 0)).unwrap();
    assert_eq!(fs::read(root.join("empty")).unwrap(), b"");
    let (code, msg) = put_file(&mut a, 5, "dir", b"x", 0o644, (3, 0)).unwrap_err();
    assert!(code == code::IO && msg.contains("directory is in the way"), "{code} {msg}");
    assert_eq!(put_file(&mut a, 6, "nodir/f", b"x", 0o644, (3, 0)).unwrap_err().0, code::NOT_FOUND);

    // Aborting removes the temporary.
    a.ok(&Msg::PutBegin { id: 7, path: "aborted".into(), size: 10, mode: 0o644 });
    a.ok(&put_data(7, 0, b"12345"));
    assert_eq!(tmp_leftovers(root).len(), 1);
    b.ok(&Msg::PutAbort { id: 7 });
    assert_no_tmp(root);
    assert!(!root.join("aborted").exists());
    a.bye();
    b.bye();
}

#[test]
fn mkdir_set_meta_symlink_and_delete() {
    let dir = tmp();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    mkdirs(&root);
    mkdirs(&outside);
    write_file(&outside.join("keep"), b"keep");
    let srv = Server::start(&root, &[]);
    let mut c = srv.connect();

    c.ok(&Msg::Mkdir { path: "d".into(), mode: 0o755 });
    c.ok(&Msg::Mkdir { path: "d".into(), mode: 0o755 });
    c.ok(&Msg::Mkdir { path: "".into(), mode: 0o755 });
    write_file(&root.join("f"), b"f");
    assert_eq!(c.refused(&Msg::Mkdir { path: "f".into(), mode: 0o755 }).0, code::IO);
    assert_eq!(c.refused(&Msg::Mkdir { path: "no/d".into(), mode: 0o755 }).0, code::NOT_FOUND);

    c.ok(&set_meta("d", 0o750, (1_234_567_890, 42)));
    assert_eq!((mode_of(&root.join("d")), mtime_of(&root.join("d"))), (0o750, (1_234_567_890, 42)));
    c.ok(&set_meta("f", 0o604, (7, 8)));
    assert_eq!((mode_of(&root.join("f")), mtime_of(&root.join("f"))), (0o604, (7, 8)));

    c.ok(&symlink("d/l", "../anywhere", (99, 1)));
    assert_eq!(fs::read_link(root.join("d/l")).unwrap(), Path::new("../anywhere"));
    assert_eq!(mtime_of(&root.join("d/l")), (99, 1));
    c.ok(&symlink("d/l", "f", (100, 0)));
    assert_eq!(fs::read_link(root.join("d/l")).unwrap(), Path::new("f"));
    // Owners: given away where the server may (root), kept otherwise (EPERM is not an error), never followed.
    let (uid, gid) = me();
    let other = (4321, 8765);
    let want = if uid == 0 { other } else { (uid, gid) };
    let (uid_o, gid_o) = other;
    c.ok(&Msg::Symlink { path: "d/o".into(), target: "f".into(), uid: uid_o, gid: gid_o, mtime_sec: 3, mtime_nsec: 4 });
    c.ok(&Msg::SetMeta { path: "d".into(), mode: 0o750, uid: uid_o, gid: gid_o, mtime_sec: 1, mtime_nsec: 2 });
    let owner = |p: &Path| fs::symlink_metadata(p).map(|m| (m.uid(), m.gid())).unwrap();
    assert_eq!((owner(&root.join("d")), owner(&root.join("d/o"))), (want, want));
    assert_eq!(owner(&root.join("f")), (uid, gid), "the link's target keeps its owner");
    assert_eq!(
        (mode_of(&root.join("d")), mtime_of(&root.join("d")), mtime_of(&root.join("d/o"))),
        (0o750, (1, 2), (3, 4))
    );
    c.ok(&Msg::Delete { path: "d/o".into() });
    assert_eq!(c.refused(&symlink("d", "x", (0, 0))).0, code::IO);
    assert_no_tmp(&root);

    // A tree with a symlink to the outside in it: the link goes, what it points to stays.
    mkdirs(&root.join("t/a/b/c"));
    write_file(&root.join("t/a/b/c/file"), b"x");
    write_file(&root.join("t/top"), b"x");
    ln_s(&outside, &root.join("t/a/out"));
    write_file(&root.join("t/.x.fstmp-1-1"), b"a temporary goes with its directory");
    c.ok(&Msg::Delete { path: "t".into() });
    assert!(!root.join("t").exists());
    assert_eq!(fs::read(outside.join("keep")).unwrap(), b"keep");
    c.ok(&Msg::Delete { path: "d/l".into() });
    c.ok(&Msg::Delete { path: "f".into() });
    assert_eq!(c.refused(&Msg::Delete { path: "f".into() }).0, code::NOT_FOUND);
    assert_eq!(c.refused(&Msg::Delete { path: "".into() }).0, code::PERMISSION);
    let left: BTreeSet<_> = fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, BTreeSet::from(["d".into()]));
    c.bye();
}

// ---------------------------------------------------------------------------------------------------------------
// Security
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn paths_that_leave_the_root_are_refused_and_nothing_outside_is_touched() {
    let dir = tmp();
    let root = dir.path().join("root");
    let outside = dir.path().join("outside");
    mkdirs(&root);
    mkdirs(&outside.join("sub"));
    write_file(&outside.join("secret"), b"secret");
    chmod(&outside.join("secret"), 0o600);
    set_times(&outside.join("secret"), 1_000, 0);
    ln_s(&outside, &root.join("out"));
    ln_s(outside.join("secret"), &root.join("sec"));
    ln_s("../outside", &root.join("rel"));
    let snapshot = |p: &Path| -> Vec<Snap> {
        let mut v: Vec<_> = fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let content = if p.is_file() { fs::read(&p).unwrap() } else { Vec::new() };
                (p.clone(), mode_of(&p), mtime_of(&p), content)
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&outside);

    let srv = Server::start(&root, &[]);
    let mut c = srv.connect();
    let escapes = ["../outside/secret", "/etc/passwd", "out/secret", "rel/secret", "out/sub", "./sec", "a//b"];
    for p in escapes {
        assert_eq!(c.get(p, 0, u64::MAX).unwrap_err().0, code::PATH_ESCAPES, "get {p}");
        assert_eq!(c.list(p, true).unwrap_err().0, code::PATH_ESCAPES, "list {p}");
        assert_eq!(c.stat(p).unwrap_err().0, code::PATH_ESCAPES, "stat {p}");
    }
    assert_eq!(c.get("sec", 0, u64::MAX).unwrap_err().0, code::PATH_ESCAPES, "a final symlink is not followed");
    for p in ["../outside/new", "/tmp/new", "out/new", "rel/sub/new", "out/secret"] {
        let put = Msg::PutBegin { id: 9, path: p.into(), size: 1, mode: 0o644 };
        assert_eq!(c.refused(&put).0, code::PATH_ESCAPES, "put {p}");
        assert_eq!(c.refused(&Msg::Mkdir { path: p.into(), mode: 0o777 }).0, code::PATH_ESCAPES, "mkdir {p}");
        assert_eq!(c.refused(&Msg::Delete { path: p.into() }).0, code::PATH_ESCAPES, "delete {p}");
        let sym = symlink(p, "x", (0, 0));
        assert_eq!(c.refused(&sym).0, code::PATH_ESCAPES, "symlink {p}");
        let meta = set_meta(p, 0o777, (5, 0));
        assert_eq!(c.refused(&meta).0, code::PATH_ESCAPES, "set meta {p}");
        let xattrs = vec![(b"user.x".to_vec(), b"1".to_vec())];
        assert_eq!(c.refused(&Msg::SetXattrs { path: p.into(), xattrs }).0, code::PATH_ESCAPES, "set xattrs {p}");
        assert_eq!(
            c.refused(&Msg::GetXattrs { path: p.into(), follow: false }).0,
            code::PATH_ESCAPES,
            "get xattrs {p}"
        );
    }
    for p in ["../outside", "out/sub"] {
        assert_eq!(c.refused(&Msg::Delete { path: p.into() }).0, code::PATH_ESCAPES, "delete {p}");
    }
    // Listing shows the links as links, nothing behind them.
    let all = c.list("", true).unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|e| e.kind == EntryKind::Symlink), "{all:?}");
    let one = c.list("out", true).unwrap();
    assert_eq!((one.len(), one[0].kind), (1, EntryKind::Symlink));
    // Metadata on a symlink: its own times only, never its target's mode.
    c.ok(&set_meta("sec", 0o777, (5, 0)));
    assert_eq!(mtime_of(&root.join("sec")), (5, 0));
    // Replacing or deleting a link replaces or deletes the link.
    put_file(&mut c, 10, "sec", b"mine", 0o644, (1, 0)).unwrap();
    c.ok(&Msg::Delete { path: "out".into() });
    assert!(!root.join("out").exists());
    c.ok(&symlink("rel", "elsewhere", (0, 0)));

    assert_eq!(snapshot(&outside), before, "something outside the root changed");
    assert_eq!(snapshot(&outside.join("sub")), Vec::new());
    c.bye();
}

#[test]
fn a_read_only_server_refuses_every_write() {
    let dir = tmp();
    let root = dir.path();
    write_file(&root.join("f"), b"data");
    mkdirs(&root.join("d"));
    let srv = Server::start(root, &["--read-only"]);
    srv.wait_log(&["(read-only)"]);
    let mut c = srv.connect();
    assert!(c.read_only, "the challenge says so");
    assert_eq!(c.get("f", 0, u64::MAX).unwrap().0, b"data");
    assert_eq!(c.list("", true).unwrap().len(), 2);
    let writes = [
        Msg::PutBegin { id: 1, path: "new".into(), size: 1, mode: 0o644 },
        put_data(1, 0, b"x"),
        put_end(1, 0o644, (0, 0)),
        Msg::PutHole { id: 1, offset: 0, len: 1 },
        Msg::PutXattrs { id: 1, xattrs: Vec::new() },
        Msg::SetXattrs { path: "f".into(), xattrs: Vec::new() },
        Msg::PutAbort { id: 1 },
        Msg::Mkdir { path: "d2".into(), mode: 0o755 },
        set_meta("f", 0o777, (0, 0)),
        symlink("l", "f", (0, 0)),
        Msg::Delete { path: "f".into() },
        Msg::Delete { path: "d".into() },
    ];
    for w in &writes {
        assert_eq!(c.refused(w), (code::READ_ONLY, "server is read-only".to_string()), "{w:?}");
    }
    let names: BTreeSet<_> = fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, BTreeSet::from(["d".into(), "f".into()]));
    assert_ne!(mode_of(&root.join("f")), 0o777);
    c.bye();
}

#[test]
fn garbage_and_oversized_frames_close_only_their_connection() {
    let dir = tmp();
    write_file(&dir.path().join("f"), b"data");
    let srv = Server::start(dir.path(), &[]);
    let mut good = srv.connect();

    // Before authenticating: random bytes.
    let mut s = srv.raw();
    s.write_all(&random_bytes(3, 1000)).unwrap();
    assert_closed(&mut s);
    // A length prefix far over the cap, before and after authenticating.
    let mut s = srv.raw();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    assert_closed(&mut s);
    let mut c = srv.connect();
    c.s.write_all(&((wire::FRAME_BYTES_MAX + 1) as u32).to_le_bytes()).unwrap();
    match c.recv() {
        Msg::Error { code, .. } => assert_eq!(code, code::PROTOCOL),
        other => panic!("{other:?}"),
    }
    assert_closed(&mut c.s);
    // A well-formed frame of an unknown kind, and a message only a server sends.
    let mut c = srv.connect();
    c.s.write_all(&[1, 0, 0, 0, 250]).unwrap();
    assert!(matches!(c.recv(), Msg::Error { code: code::PROTOCOL, .. }));
    assert_closed(&mut c.s);
    let mut c = srv.connect();
    assert!(matches!(c.req(&Msg::ListEnd), Msg::Error { code: code::PROTOCOL, .. }));
    assert_closed(&mut c.s);
    // Random frames after authenticating.
    let mut rng = Rng::new(5);
    for _ in 0..20 {
        let mut c = srv.connect();
        let mut body = vec![0u8; 1 + rng.below(200) as usize];
        rng.fill(&mut body);
        body[0] = [10, 13, 20, 30, 31, 32, 40, 41, 42, 43][rng.below(10) as usize];
        c.s.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
        c.s.write_all(&body).unwrap();
        // Either an answer to what happened to decode, or an error and the end of the connection: never a crash.
        let _ = assert_closed_or_answered(&mut c.s);
    }
    srv.wait_log(&["protocol error"]);

    // Everyone else is still served.
    assert_eq!(good.get("f", 0, 4).unwrap().0, b"data");
    assert_eq!(srv.connect().get("f", 0, 4).unwrap().0, b"data");
}

/// After a random frame: the server answered (the connection is still usable) or closed the connection.
fn assert_closed_or_answered(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match wire::read_msg(s) {
        Ok(_) => true,
        Err(wire::WireError::Io(e)) if e.kind() != std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("no answer and no close: {e}"),
    }
}

#[test]
fn connections_over_max_clients_are_told_busy() {
    let dir = tmp();
    let srv = Server::start(dir.path(), &["--max-clients", "1"]);
    let mut first = srv.connect();
    let mut s = srv.raw();
    wire::write_msg(&mut s, &Msg::Hello { version: wire::VERSION, nonce: [1; 32], flags: 0 }).unwrap();
    match wire::read_msg(&mut s).unwrap() {
        Msg::Error { code, message } => assert!(code == code::BUSY && message.contains("busy"), "{message}"),
        other => panic!("{other:?}"),
    }
    let mut s = srv.raw();
    let r = auth::client(&mut s, &Key::from_token(TOKEN.as_bytes()));
    assert!(matches!(&r, Err(AuthError::Refused(m)) if m.contains("busy")), "{r:?}");
    assert_eq!(first.stat("").unwrap().kind, EntryKind::Dir);
    first.bye();
    // Once the first one is gone, there is room again.
    let start = Instant::now();
    loop {
        let mut s = srv.raw();
        match auth::client(&mut s, &Key::from_token(TOKEN.as_bytes())) {
            Ok(_) => break,
            Err(AuthError::Refused(_)) if start.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_stalled_client_is_dropped_after_the_timeout() {
    let dir = tmp();
    let srv = Server::start(dir.path(), &["--timeout", "1"]);
    let mut idle = srv.connect();
    let mut silent = srv.raw(); // never says hello
    std::thread::sleep(Duration::from_millis(2500));
    assert_closed(&mut idle.s);
    assert_closed(&mut silent);
    srv.wait_log(&["no progress for 1 s"]);
    assert_eq!(srv.connect().stat("").unwrap().kind, EntryKind::Dir);
}

/// By default a small file is received unnamed (`O_TMPFILE`, Linux) and linked into place by `PutEnd`: nothing at
/// all is in the directory before that; a name taken meanwhile, a file or a symlink, is replaced as a rename would.
#[test]
#[cfg(target_os = "linux")]
fn an_unnamed_put_shows_nothing_until_put_end_and_replaces_what_appeared() {
    let dir = tmp();
    let root = dir.path();
    let srv = Server::start(root, &[]);
    let mut c = srv.connect();
    c.ok(&Msg::Mkdir { path: "u".into(), mode: 0o755 });
    let data = random_bytes(12, 300_000);
    c.ok(&Msg::PutBegin { id: 1, path: "u/new.bin".into(), size: data.len() as u64, mode: 0o644 });
    c.ok(&put_data(1, 0, &data[..100_000]));
    assert_eq!(fs::read_dir(root.join("u")).unwrap().count(), 0, "an incomplete file has a name");
    c.ok(&put_data(1, 100_000, &data[100_000..]));
    c.ok(&put_end(1, 0o640, (1_600_000_000, 7)));
    let f = root.join("u/new.bin");
    assert!(fs::read(&f).unwrap() == data, "content");
    assert_eq!((mode_of(&f), mtime_of(&f)), (0o640, (1_600_000_000, 7)));
    // Taken while the file was on its way: a file, then a symlink.
    for (id, what) in [(2u64, "file"), (3, "symlink")] {
        c.ok(&Msg::PutBegin { id, path: "u/late".into(), size: 3, mode: 0o644 });
        let _ = fs::remove_file(root.join("u/late"));
        match what {
            "file" => write_file(&root.join("u/late"), b"appeared"),
            _ => ln_s("new.bin", &root.join("u/late")),
        }
        c.ok(&put_data(id, 0, b"new"));
        c.ok(&put_end(id, 0o600, (2, 0)));
        let late = root.join("u/late");
        assert!(fs::symlink_metadata(&late).unwrap().is_file(), "{what} not replaced");
        assert_eq!(fs::read(&late).unwrap(), b"new");
    }
    assert_no_tmp(root);
    assert_eq!(fs::read_dir(root.join("u")).unwrap().count(), 2);
}

#[test]
fn sigterm_removes_unfinished_temporaries() {
    let dir = tmp();
    // Named temporaries (unnamed ones vanish by themselves).
    let mut srv = Server::start_env(dir.path(), &[], TokenVia::File, &[("FASTSYNC_TMPFILE", "0")]);
    let mut c = srv.connect();
    c.ok(&Msg::PutBegin { id: 1, path: "half".into(), size: 10, mode: 0o644 });
    c.ok(&put_data(1, 0, b"12345"));
    assert_eq!(tmp_leftovers(dir.path()).len(), 1);
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(srv.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143));
    assert_no_tmp(dir.path());
    assert!(!dir.path().join("half").exists());
    srv.wait_log(&["interrupted", "1 unfinished transfer"]);
}

// ---------------------------------------------------------------------------------------------------------------
// The decoder never panics (the fuzz target in fuzz/ does the same with coverage guidance, on nightly)
// ---------------------------------------------------------------------------------------------------------------

fn check_frame(data: &[u8]) {
    let mut r = data;
    if let Ok(m) = wire::read_msg(&mut r) {
        round_trip(&m);
    }
    if let Ok(m) = Msg::decode_body(data) {
        round_trip(&m);
    }
}

fn round_trip(m: &Msg) {
    let again = Msg::decode_body(&m.encode_body()).expect("a decoded message re-encodes to a decodable one");
    match (m, &again) {
        // Error texts are decoded lossily (possibly growing past the cap) and cut at the cap, on a character
        // boundary, when encoded: the same code and a prefix of the text.
        (Msg::Error { code: a, message: ma }, Msg::Error { code: b, message: mb }) => {
            assert_eq!(a, b);
            assert!(mb.len() <= wire::TEXT_BYTES_MAX && ma.starts_with(mb.as_str()), "{ma:?} / {mb:?}");
        }
        (Msg::EntryError { path: pa, code: a, message: ma }, Msg::EntryError { path: pb, code: b, message: mb }) => {
            assert_eq!((pa, a), (pb, b));
            assert!(mb.len() <= wire::TEXT_BYTES_MAX && ma.starts_with(mb.as_str()), "{ma:?} / {mb:?}");
        }
        _ => assert_eq!(m, &again),
    }
}

#[test]
fn random_and_mutated_frames_never_panic_the_decoder() {
    let seeds: Vec<Msg> = vec![
        Msg::Hello { version: wire::VERSION, nonce: [7; 32], flags: 3 | (3 << 3) },
        Msg::Challenge { version: wire::VERSION, nonce: [8; 32], read_only: true, flags: 1 },
        Msg::KeyShare { public: [9; 32] },
        Msg::Error { code: code::NOT_FOUND, message: "no such file".into() },
        Msg::List { path: b"a/b".to_vec(), recursive: true, follow: true },
        Msg::Entry(EntryMeta {
            path: b"x".to_vec(),
            kind: EntryKind::Symlink,
            mode: 0o755,
            uid: 1,
            gid: 2,
            size: 3,
            mtime_sec: -5,
            mtime_nsec: 6,
            target: b"t".to_vec(),
            dev: 7,
            ino: 8,
            nlink: 2,
        }),
        Msg::Get { path: b"f".to_vec(), offset: 3, len: 9, follow: true },
        Msg::Data { offset: 1, digest: [3; 32], bytes: vec![9; 40] },
        Msg::DataEnd { size: 10, mtime_sec: 1, mtime_nsec: 2 },
        Msg::PutBegin { id: 42, path: b"d/f".to_vec(), size: 100, mode: 0o644 },
        Msg::PutData { id: 42, offset: 0, digest: [4; 32], bytes: vec![1, 2, 3] },
        Msg::PutEnd { id: 42, mode: 0o600, uid: 0, gid: 0, mtime_sec: 7, mtime_nsec: 8, fsync: true },
        Msg::Symlink { path: b"l".to_vec(), target: b"d/f".to_vec(), uid: 1, gid: 2, mtime_sec: 1, mtime_nsec: 1 },
        Msg::SetMeta { path: b"d".to_vec(), mode: 0o700, uid: 3, gid: 4, mtime_sec: 1, mtime_nsec: 0 },
        Msg::Hole { offset: 4096, len: 1 << 20 },
        Msg::PutHole { id: 42, offset: 0, len: 8192 },
        Msg::GetXattrs { path: b"d/f".to_vec(), follow: true },
        Msg::XattrList { xattrs: vec![(b"user.a".to_vec(), b"1".to_vec()), (b"user.b".to_vec(), vec![0; 40])] },
        Msg::PutXattrs { id: 42, xattrs: vec![(b"user.c".to_vec(), b"x".to_vec())] },
        Msg::SetXattrs { path: b"d".to_vec(), xattrs: vec![(b"user.d".to_vec(), Vec::new())] },
        Msg::Link { path: b"d/g".to_vec(), target: b"d/f".to_vec() },
        Msg::EntryError { path: b"a/l".to_vec(), code: code::PATH_ESCAPES, message: "outside".into() },
        Msg::Clean { path: b"d".to_vec() },
        Msg::Parts { names: vec![b"big.bin".to_vec(), b"other".to_vec()] },
        Msg::DropParts { path: b"d".to_vec(), names: vec![b"big.bin".to_vec()] },
        Msg::Bye,
    ];
    let frames: Vec<Vec<u8>> = seeds
        .iter()
        .map(|m| {
            let mut f = Vec::new();
            wire::write_msg(&mut f, m).unwrap();
            f
        })
        .collect();
    let mut rng = Rng::new(1);
    let mut decoded = 0;
    for i in 0..100_000 {
        let data = if i % 4 == 0 {
            let mut d = vec![0u8; rng.below(80) as usize];
            rng.fill(&mut d);
            d
        } else {
            let mut d = frames[rng.below(frames.len() as u64) as usize].clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(d.len() as u64 + 1) as usize;
                match rng.below(4) {
                    0 if at < d.len() => d[at] ^= 1 << rng.below(8),
                    1 if at < d.len() => d[at] = rng.next_u64() as u8,
                    2 => d.insert(at, rng.next_u64() as u8),
                    _ if at < d.len() => {
                        d.remove(at);
                    }
                    _ => {}
                }
            }
            d
        };
        check_frame(&data);
        if data.len() > 4 {
            check_frame(&data[4..]);
            decoded += Msg::decode_body(&data[4..]).is_ok() as usize;
        }
    }
    assert!(decoded > 1000, "the mutations should leave many frames valid ({decoded})");
    // Invalid UTF-8 at the text cap decodes to a longer text (U+FFFD is 3 bytes), which must re-encode within it.
    let mut body = vec![5, 11, 0];
    body.extend_from_slice(&(wire::TEXT_BYTES_MAX as u32).to_le_bytes());
    body.extend(std::iter::repeat_n(0xff, wire::TEXT_BYTES_MAX));
    check_frame(&body);
}

/// The server's peak resident memory (`VmHWM`), in bytes.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn the_memory_limit_caps_connections_and_bounds_the_servers_memory() {
    let dir = tmp();
    // 52 MiB at ~16 MiB per connection, although --max-clients allows 64: 3 connections on the thread data path;
    // 2 on the socket shards (the default), whose buffers take 6 MiB per shard (one 4 MiB slot in huge pages; two
    // shards fit the quarter of the limit they may use).
    let srv = Server::start(dir.path(), &["--memory-limit", "52M"]);
    let line = srv.wait_log(&["connections at once", "memory limit (52 MiB"]);
    let n: usize = line.split("at most ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    let shards = line.contains("socket shards' buffers");
    // (52 - 12) / 16 with two shards, (52 - 6) / 16 on one core: 2 either way.
    let want = if shards { 2 } else { 3 };
    assert_eq!(n, want, "{line}");
    let held: Vec<Client> = (0..n).map(|_| srv.connect()).collect();
    let mut s = srv.raw();
    let r = auth::client(&mut s, &Key::from_token(TOKEN.as_bytes()));
    assert!(matches!(&r, Err(AuthError::Refused(m)) if m.contains("busy")), "{r:?}");
    for c in held {
        c.bye();
    }
    // A push over every connection the server takes (the control connection and the rest as data streams): the
    // server's memory (socket shards' buffers included) stays under its limit while it receives 96 MiB (TCP's flow
    // control holds the client back; nothing queues up in the server), written with O_DIRECT (each data
    // connection's aligned buffer, or the shards' slots, counted in the limit).
    let src = tmp();
    let big = src.path().join("big.bin");
    write_big_file(&big, 0x5E7, 96 << 20);
    let token = src.path().join("token");
    fs::write(&token, TOKEN).unwrap();
    let started = Instant::now();
    let out = loop {
        let out = fastsync()
            .args(["--token-file"])
            .arg(&token)
            .args(["copy", "--streams", &(n - 1).to_string()])
            .arg(&big)
            .arg(format!("fastsync://{}/in/", srv.addr))
            .run();
        // The connections closed above may take a moment to leave the server's count.
        if out.code == Some(0) || started.elapsed() > Duration::from_secs(10) {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    out.assert_success();
    // Around the page cache: the file's pages were not left cached by the server's writes (looked at before
    // anything reads them back).
    let cached = cached_fraction(&dir.path().join("in/big.bin"));
    assert!(
        cached < 0.05 || !fs_takes_o_direct(dir.path()),
        "{:.0}% of the pushed file is in the page cache",
        cached * 100.0
    );
    assert_eq!(digest(&dir.path().join("in/big.bin")), digest(&big));
    let peak = peak_rss_bytes(srv.child.id());
    assert!(peak < 52 << 20, "the server peaked at {} MiB with a 52 MiB limit", peak >> 20);
}
