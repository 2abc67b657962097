//! Helpers for the `copy` integration tests: running the binary with a timeout, building source trees, and checking
//! destination trees with means independent of fastsync (std::fs, lstat, libc xattr calls, BLAKE3 digests).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A real `fastsync serve` for the LAN tests.
pub mod lan;
/// A TCP proxy that resets or stalls connections on purpose (tests/robust.rs).
pub mod proxy;

/// Expands each case `fn name(engine: Engine)` into `name::uring` and `name::fallback` tests.
#[allow(unused_macros)] // not every test binary runs CLI cases
macro_rules! both_engines {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[test]
                fn uring() {
                    super::$case(crate::common::Engine::Uring)
                }
                #[test]
                fn fallback() {
                    super::$case(crate::common::Engine::Fallback)
                }
            }
        )*
    };
}

/// Where the binary under test keeps its run markers (`XDG_STATE_HOME`): one directory for the whole test run.
pub fn state_home() -> PathBuf {
    std::env::temp_dir().join(format!("fastsync-tests-state-{}", std::process::id()))
}

/// A fresh temporary directory for one case.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("fastsync-test-").tempdir().unwrap()
}

/// The engine a case is forced to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Uring,
    Fallback,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Uring => "uring",
            Engine::Fallback => "fallback",
        }
    }

    pub fn other(self) -> Engine {
        match self {
            Engine::Uring => Engine::Fallback,
            Engine::Fallback => Engine::Uring,
        }
    }
}

/// The binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fastsync"))
}

// ---------------------------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------------------------

/// What a run of fastsync produced.
pub struct Output {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The command line, for messages.
    pub cmdline: String,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Non-empty stderr lines.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr_str().lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
    }

    /// The stderr lines shaped like a failure report, `fastsync: <what> '<path>': <cause>`, as (what, path, cause).
    pub fn failure_lines(&self) -> Vec<(String, String, String)> {
        let mut v = Vec::new();
        for l in self.stderr_lines() {
            let Some(rest) = l.strip_prefix("fastsync: ") else { continue };
            let Some(q1) = rest.find('\'') else { continue };
            let Some(q2) = rest[q1 + 1..].rfind("': ") else { continue };
            let what = rest[..q1].trim().to_owned();
            let path = rest[q1 + 1..q1 + 1 + q2].to_owned();
            let cause = rest[q1 + 1 + q2 + 3..].to_owned();
            v.push((what, path, cause));
        }
        v
    }

    /// Panics unless stderr holds exactly one failure line, for a path ending in `name`, whose cause contains
    /// `cause` (any cause when empty).
    pub fn assert_one_failure(&self, name: &str, cause: &str) -> &Self {
        let f = self.failure_lines();
        self.check(f.len() == 1, "expected exactly one failure line `fastsync: <what> '<path>': <cause>` on stderr");
        let (_, path, c) = &f[0];
        self.check(path.ends_with(name), &format!("the failure line does not name {name:?}"));
        self.check(c.contains(cause), &format!("the failure line's cause does not contain {cause:?}"));
        self
    }

    fn describe(&self) -> String {
        format!(
            "command: {}\nexit code: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.cmdline,
            self.code,
            self.stdout_str(),
            self.stderr_str()
        )
    }

    /// Panics unless the exit code is `code`.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "unexpected exit code (expected {code})\n{}", self.describe());
        self
    }

    pub fn assert_success(&self) -> &Self {
        self.assert_code(0)
    }

    /// Panics unless `pred` holds, printing the whole run.
    pub fn check(&self, pred: bool, what: &str) -> &Self {
        assert!(pred, "{what}\n{}", self.describe());
        self
    }
}

/// A fastsync command line being built.
pub struct Cmd {
    cmd: Command,
    words: Vec<OsString>,
    timeout: Duration,
}

/// `fastsync` with no arguments yet (FASTSYNC_* settings and the user's config file kept out of its environment, so
/// the outer environment cannot change how it runs).
/// Whether strace can trace here (says so when it cannot).
pub fn strace_usable() -> bool {
    let probe = Cmd::new("strace").args(["-f", "-qq", "-o", "/dev/null", "true"]).run();
    if probe.code != Some(0) {
        eprintln!("SKIP: strace is unavailable or cannot trace here ({})", probe.stderr_str().trim());
    }
    probe.code == Some(0)
}

pub fn fastsync() -> Cmd {
    Cmd::new(bin())
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        let mut cmd = Command::new(program.as_ref());
        for var in [
            "ENGINE",
            "CORES",
            "MEMORY_PROFILE",
            "MEMORY_LIMIT",
            "FSYNC",
            "VERIFY",
            "DIRECT_IO",
            "CONFIG",
            "IO_TIMEOUT",
        ] {
            cmd.env_remove(format!("FASTSYNC_{var}"));
        }
        // No user's config file either: an absolute XDG directory without one means "no file". Run markers go to
        // a state directory of the tests' own.
        cmd.env("XDG_CONFIG_HOME", "/nonexistent/fastsync-tests")
            .env("XDG_STATE_HOME", state_home())
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        Cmd { cmd, words: vec![program.as_ref().to_owned()], timeout: Duration::from_secs(90) }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.cmd.arg(a.as_ref());
        self.words.push(a.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Cmd {
        self.cmd.env(k, v);
        self
    }

    pub fn current_dir(mut self, dir: &Path) -> Cmd {
        self.cmd.current_dir(dir);
        self
    }

    pub fn timeout(mut self, t: Duration) -> Cmd {
        self.timeout = t;
        self
    }

    /// Starts the command in the background (stdin, stdout and stderr on /dev/null), for a test that interrupts it.
    pub fn spawn_quiet(mut self) -> std::process::Child {
        self.cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start fastsync")
    }

    /// Runs to completion (stdin is /dev/null, stdout and stderr are pipes, so not a TTY). Kills the process and
    /// panics if it runs longer than the timeout. Panics if stderr shows a Rust panic or a backtrace hint.
    pub fn run(mut self) -> Output {
        let cmdline = self.words.iter().map(|w| format!("{:?}", w)).collect::<Vec<_>>().join(" ");
        let mut child = self
            .cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmdline}: {e}"));
        let mut out_pipe = child.stdout.take().unwrap();
        let mut err_pipe = child.stderr.take().unwrap();
        let out_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out_pipe.read_to_end(&mut v);
            v
        });
        let err_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err_pipe.read_to_end(&mut v);
            v
        });
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                break st;
            }
            if start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err_t.join().unwrap_or_default();
                panic!(
                    "fastsync hung: still running after {:?}, killed\ncommand: {cmdline}\n--- stderr ---\n{}",
                    self.timeout,
                    String::from_utf8_lossy(&stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let stdout = out_t.join().unwrap();
        let stderr = err_t.join().unwrap();
        let out = Output { code: status.code(), stdout, stderr, cmdline };
        let err = out.stderr_str();
        out.check(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "fastsync panicked or printed a backtrace hint",
        );
        out.check(status.code().is_some(), "fastsync was killed by a signal");
        out
    }
}

/// How a transfer runs: on one of the local engines, or over `fastsync://` against a real `fastsync serve` of the
/// case's directory — a push (the destination is served) or a pull (the source is) — so that a case reads and checks
/// both sides as local paths whichever way it ran.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Way {
    Local(Engine),
    Push,
    Pull,
}

impl From<Engine> for Way {
    fn from(e: Engine) -> Way {
        Way::Local(e)
    }
}

/// Expands each case `fn name(way: Way)` into one test per way given: `cases_for_ways!([uring =>
/// Way::Local(Engine::Uring), remote => Way::Pull]; case_a, case_b)` makes `case_a::uring`, `case_a::remote`, ...
#[allow(unused_macros)] // not every test binary runs conformance cases
macro_rules! cases_for_ways {
    ($ways:tt; $($case:ident),* $(,)?) => {
        $( cases_for_ways!(@case $ways $case); )*
    };
    (@case [$($way:ident => $val:expr),* $(,)?] $case:ident) => {
        mod $case {
            #[allow(unused_imports)]
            use crate::common::{Engine, Way};
            $(
                #[test]
                fn $way() {
                    super::$case($val)
                }
            )*
        }
    };
}

/// Expands each case `fn name(way: Way)` into `name::{uring, fallback, push, pull}` tests: one conformance suite run
/// every way a transfer can go.
#[allow(unused_macros)] // not every test binary runs conformance cases
macro_rules! every_way {
    ($($case:ident),* $(,)?) => {
        cases_for_ways!(
            [
                uring => Way::Local(Engine::Uring),
                fallback => Way::Local(Engine::Fallback),
                push => Way::Push,
                pull => Way::Pull,
            ];
            $($case),*
        );
    };
}

/// The token file every server started by [`run_way`] gets (and every client).
fn way_token_file() -> PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tmp();
        fs::write(dir.path().join("token"), format!("{}\n", lan::TOKEN)).unwrap();
        dir
    });
    dir.path().join("token")
}

/// `fastsync CMD [EXTRA] SRC DST` run the way `way` says. Over `fastsync://` a server of the remote side's nearest
/// existing ancestor directory runs for this one command, and the remote side is named by URL (the rest of its
/// path, a trailing `/` kept).
pub fn run_way(
    way: impl Into<Way>,
    cmd: &str,
    extra: &[&str],
    src: impl AsRef<OsStr>,
    dst: impl AsRef<OsStr>,
) -> Output {
    let (src, dst) = (Path::new(src.as_ref()), Path::new(dst.as_ref()));
    let client = || remote_client().arg(cmd).args(extra);
    match way.into() {
        Way::Local(e) => fastsync().args([cmd, "--engine", e.name()]).args(extra).arg(src).arg(dst).run(),
        Way::Push => {
            let (_server, url) = served(dst);
            client().arg(src).arg(url).run()
        }
        Way::Pull => {
            let (_server, url) = served(src);
            client().arg(url).arg(dst).run()
        }
    }
}

/// A server of `side`'s nearest existing ancestor directory, and the URL that names `side` there (its names' bytes
/// as they are: a name need not be UTF-8; a trailing `/` kept).
pub fn served(side: &Path) -> (lan::Server, OsString) {
    let root = side.ancestors().skip(1).find(|a| a.is_dir()).expect("an existing ancestor");
    let server = lan::Server::start(root, &way_token_file());
    let mut url = server.url("").into_bytes();
    url.extend_from_slice(side.strip_prefix(root).unwrap().as_os_str().as_bytes());
    if side.as_os_str().as_bytes().ends_with(b"/") {
        url.push(b'/');
    }
    (server, OsString::from_vec(url))
}

/// `fastsync --token-file T` for a server started by [`served`] (arguments follow).
pub fn remote_client() -> Cmd {
    fastsync().arg("--token-file").arg(way_token_file())
}

/// `fastsync copy --engine E <extra...> SRC DST`.
pub fn copy_cmd(engine: Engine, extra: &[&str], src: impl AsRef<OsStr>, dst: impl AsRef<OsStr>) -> Cmd {
    fastsync().arg("copy").arg("--engine").arg(engine.name()).args(extra).arg(src).arg(dst)
}

/// Runs `fastsync copy <extra...> SRC DST` the way `way` says and returns its output (no exit code check).
pub fn copy(way: impl Into<Way>, extra: &[&str], src: impl AsRef<OsStr>, dst: impl AsRef<OsStr>) -> Output {
    run_way(way, "copy", extra, src, dst)
}

/// Runs the copy, expects exit 0 and no leftover temporary files under `dst_root`.
pub fn copy_ok(way: impl Into<Way>, extra: &[&str], src: impl AsRef<OsStr>, dst: impl AsRef<OsStr>) -> Output {
    let dst_root = PathBuf::from(dst.as_ref());
    let out = copy(way, extra, src, dst);
    out.assert_success();
    if dst_root.exists() {
        assert_no_tmp(&dst_root);
    }
    out
}

/// A tmpfs mounted at a path for one case; unmounted on drop.
pub struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Mount a tmpfs with `opts` (e.g. `size=2m`) at `at`, or say why not and return `None` (needs root).
pub fn mount_tmpfs(at: &Path, opts: &str) -> Option<Mount> {
    mkdirs(at);
    let out = Cmd::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(at).run();
    if out.code != Some(0) {
        eprintln!("SKIP: cannot mount a tmpfs here ({})", out.stderr_str().trim());
        return None;
    }
    Some(Mount(at.to_path_buf()))
}

/// `path` with a trailing `/` appended.
pub fn with_slash(p: &Path) -> OsString {
    let mut v = p.as_os_str().as_bytes().to_vec();
    v.push(b'/');
    OsString::from_vec(v)
}

// ---------------------------------------------------------------------------------------------------------------
// Deterministic content
// ---------------------------------------------------------------------------------------------------------------

/// xorshift64* generator: deterministic, fast enough in debug builds (the engine's, so that there is one).
pub use fastsync_engine::bench::Rng;

/// `len` pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// Writes a large file of `len` bytes with random-looking content cheaply: one random 1 MiB block is generated, and
/// every 4 KiB page written gets its own file offset and the seed stamped into its first 16 bytes, so misplaced,
/// duplicated or dropped chunks change the content.
/// Whether files in `dir` can be opened with O_DIRECT.
pub fn fs_takes_o_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("o_direct_probe");
    fs::write(&probe, b"").unwrap();
    let ok = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&probe).is_ok();
    fs::remove_file(probe).unwrap();
    ok
}

/// The fraction of `path`'s pages in the page cache (mincore on a read-only mapping, which reads nothing).
pub fn cached_fraction(path: &Path) -> f64 {
    let f = File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as usize;
    if len == 0 {
        return 0.0;
    }
    // SAFETY: a fresh shared read-only mapping of an open file, unmapped below; mincore writes one byte per page
    // into a vector of that many bytes.
    unsafe {
        let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(map, libc::MAP_FAILED, "mmap {}", path.display());
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        let rc = libc::mincore(map, len, vec.as_mut_ptr());
        libc::munmap(map, len);
        assert_eq!(rc, 0, "mincore {}", path.display());
        vec.iter().filter(|&&b| b & 1 == 1).count() as f64 / pages as f64
    }
}

pub fn write_big_file(path: &Path, seed: u64, len: u64) {
    const BLOCK: usize = 1 << 20;
    let base = random_bytes(seed, BLOCK);
    let mut f = File::create(path).unwrap();
    let mut off = 0u64;
    let mut buf = base.clone();
    while off < len {
        let n = ((len - off) as usize).min(BLOCK);
        buf[..n].copy_from_slice(&base[..n]);
        let mut p = 0;
        while p + 16 <= n {
            buf[p..p + 8].copy_from_slice(&(off + p as u64).to_le_bytes());
            buf[p + 8..p + 16].copy_from_slice(&seed.to_le_bytes());
            p += 4096;
        }
        f.write_all(&buf[..n]).unwrap();
        off += n as u64;
    }
    f.sync_all().ok();
}

// ---------------------------------------------------------------------------------------------------------------
// Building trees
// ---------------------------------------------------------------------------------------------------------------

pub fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

pub fn write_file(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

pub fn mkdirs(path: &Path) {
    fs::create_dir_all(path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
}

pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

pub fn lchown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("lchown {}: {e}", path.display()));
}

pub fn ln_s(target: impl AsRef<Path>, link: &Path) {
    symlink(target.as_ref(), link).unwrap_or_else(|e| panic!("symlink {}: {e}", link.display()));
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Sets atime and mtime (seconds, nanoseconds) without following a symlink.
pub fn set_times(path: &Path, sec: i64, nsec: i64) {
    let c = cstr(path);
    let ts = [
        libc::timespec { tv_sec: (sec - 1000) as libc::time_t, tv_nsec: ((nsec + 7) % 1_000_000_000) as _ },
        libc::timespec { tv_sec: sec as libc::time_t, tv_nsec: nsec as _ },
    ];
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(r, 0, "utimensat {}: {}", path.display(), io::Error::last_os_error());
}

pub fn mkfifo(path: &Path) {
    let c = cstr(path);
    let r = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(r, 0, "mkfifo {}: {}", path.display(), io::Error::last_os_error());
}

/// Creates a unix socket file at `path` (the listener is closed; the socket inode stays).
pub fn mksock(path: &Path) {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
    drop(l);
}

/// Creates a character device node like /dev/null; returns false when not permitted here.
pub fn mkchardev(path: &Path) -> bool {
    let c = cstr(path);
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, libc::makedev(1, 3)) };
    if r != 0 {
        eprintln!("note: cannot create a device node ({}); device case not exercised", io::Error::last_os_error());
        return false;
    }
    true
}

/// Sets an extended attribute without following symlinks.
pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cstr(path);
    let n = CString::new(name).unwrap();
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Lists extended attribute names without following symlinks.
pub fn llistxattr(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let c = cstr(path);
    let size = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; size as usize + 256];
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf.split(|&b| b == 0).filter(|s| !s.is_empty()).map(<[u8]>::to_vec).collect())
}

/// Reads an extended attribute without following symlinks.
pub fn lgetxattr(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cstr(path);
    let n = CString::new(name).unwrap();
    let size = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; size as usize + 256];
    let got = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(got as usize);
    Ok(buf)
}

/// The `user.*` extended attributes of `path` (not following symlinks), name -> value.
pub fn user_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let names = match llistxattr(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return BTreeMap::new(),
        Err(e) => panic!("llistxattr {}: {e}", path.display()),
    };
    names
        .into_iter()
        .filter(|n| n.starts_with(b"user."))
        .map(|n| {
            let v = lgetxattr(path, &n).unwrap_or_else(|e| panic!("lgetxattr {}: {e}", path.display()));
            (n, v)
        })
        .collect()
}

/// Whether the filesystem holding `dir` accepts user.* xattrs on regular files.
pub fn xattrs_supported(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    fs::write(&probe, b"x").unwrap();
    let r = lsetxattr(&probe, "user.probe", b"1");
    fs::remove_file(&probe).unwrap();
    match r {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) || e.raw_os_error() == Some(libc::EOPNOTSUPP) => false,
        Err(e) => panic!("lsetxattr probe: {e}"),
    }
}

/// Sets the mtime of every directory under (and including) `root`, deepest first, so that filling a directory does
/// not change the value afterwards. The value depends on the depth so dirs differ.
pub fn stamp_dir_times(root: &Path, base_sec: i64) {
    fn rec(p: &Path, depth: i64, base: i64) {
        for e in fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                rec(&e.path(), depth + 1, base);
            }
        }
        set_times(p, base + depth * 3600, 100_000_001 + depth * 11_111_111);
    }
    rec(root, 0, base_sec);
}

/// Digest of a file (BLAKE3).
pub fn digest(path: &Path) -> [u8; 32] {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    *h.finalize().as_bytes()
}

/// Panics unless the two files have identical bytes (compared chunk by chunk, reporting the first differing offset).
pub fn assert_same_bytes(a: &Path, b: &Path) {
    let la = fs::metadata(a).unwrap_or_else(|e| panic!("stat {}: {e}", a.display())).len();
    let lb = fs::metadata(b).unwrap_or_else(|e| panic!("stat {}: {e}", b.display())).len();
    assert_eq!(lb, la, "size of {} differs from source {}", b.display(), a.display());
    let mut fa = File::open(a).unwrap();
    let mut fb = File::open(b).unwrap();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        assert_eq!(na, nb, "short read comparing {} at offset {off}", b.display());
        if na == 0 {
            break;
        }
        if ba[..na] != bb[..nb] {
            let i = ba[..na].iter().zip(&bb[..nb]).position(|(x, y)| x != y).unwrap();
            panic!("content of {} differs from {} at offset {}", b.display(), a.display(), off + i as u64);
        }
        off += na as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..]).unwrap();
        if r == 0 {
            break;
        }
        n += r;
    }
    n
}

/// All names under `root` containing `.fstmp-` (recursive, not following symlinks).
pub fn tmp_leftovers(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    fn rec(p: &Path, found: &mut Vec<PathBuf>) {
        let Ok(rd) = fs::read_dir(p) else { return };
        for e in rd {
            let e = e.unwrap();
            let name = e.file_name();
            if name.as_bytes().windows(7).any(|w| w == b".fstmp-") {
                found.push(e.path());
            }
            if e.file_type().unwrap().is_dir() {
                rec(&e.path(), found);
            }
        }
    }
    rec(root, &mut found);
    found
}

pub fn assert_no_tmp(root: &Path) {
    let left = tmp_leftovers(root);
    assert!(left.is_empty(), "temporary files left in the destination: {left:?}");
}

/// Allocated bytes (st_blocks * 512).
pub fn allocated(path: &Path) -> u64 {
    fs::symlink_metadata(path).unwrap().blocks() * 512
}

// ---------------------------------------------------------------------------------------------------------------
// Tree snapshots and comparison
// ---------------------------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, i64),
    pub size: u64,
    pub ino: u64,
    pub nlink: u64,
    pub digest: Option<[u8; 32]>,
    pub target: Option<Vec<u8>>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Relative path (raw bytes) -> entry, for everything under `root` (root itself excluded).
pub type Snapshot = BTreeMap<Vec<u8>, Entry>;

pub fn entry_of(path: &Path) -> Entry {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        Kind::CharDev
    } else {
        Kind::BlockDev
    };
    let digest = (kind == Kind::File).then(|| digest(path));
    let target = (kind == Kind::Symlink).then(|| fs::read_link(path).unwrap().into_os_string().into_vec());
    let xattrs = if matches!(kind, Kind::File | Kind::Dir) { user_xattrs(path) } else { BTreeMap::new() };
    Entry {
        kind,
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: (m.mtime(), m.mtime_nsec()),
        size: m.len(),
        ino: m.ino(),
        nlink: m.nlink(),
        digest,
        target,
        xattrs,
    }
}

pub fn snapshot(root: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    fn rec(root: &Path, rel: &[u8], out: &mut Snapshot) {
        let dir = if rel.is_empty() { root.to_path_buf() } else { root.join(os(rel)) };
        for e in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
            let e = e.unwrap();
            let mut r = rel.to_vec();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(e.file_name().as_bytes());
            let ent = entry_of(&e.path());
            let is_dir = ent.kind == Kind::Dir;
            out.insert(r.clone(), ent);
            if is_dir {
                rec(root, &r, out);
            }
        }
    }
    rec(root, b"", &mut out);
    out
}

/// What to compare besides paths, types, contents, modes, owners, mtimes and symlink targets.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompareOpts {
    /// Compare user.* xattrs (copy made with -X); otherwise the destination must have none.
    pub xattrs: bool,
    /// Hard-link groups must be reproduced (copy made with -H); otherwise every file must be its own inode.
    pub hardlinks: bool,
}

pub fn show(p: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(p))
}

/// Compares the destination tree against the source tree. Special files (FIFOs, sockets, devices) in the source must
/// be absent from the destination. Panics with a list of all differences.
pub fn compare_trees(src: &Path, dst: &Path, opts: CompareOpts) {
    let s = snapshot(src);
    let d = snapshot(dst);
    let mut diffs = Vec::new();
    let special = |k: &Kind| matches!(k, Kind::Fifo | Kind::Socket | Kind::CharDev | Kind::BlockDev);

    let mut paths_of_dst_ino: BTreeMap<u64, usize> = BTreeMap::new();
    let mut dst_ino_of_src_ino: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut src_ino_of_dst_ino: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();

    for (p, se) in &s {
        let Some(de) = d.get(p) else {
            if !special(&se.kind) {
                diffs.push(format!("missing in destination: {}", show(p)));
            }
            continue;
        };
        if special(&se.kind) {
            diffs.push(format!(
                "special file {} ({:?}) should have been skipped, found {:?}",
                show(p),
                se.kind,
                de.kind
            ));
            continue;
        }
        if se.kind != de.kind {
            diffs.push(format!("{}: type {:?} in source, {:?} in destination", show(p), se.kind, de.kind));
            continue;
        }
        if se.kind != Kind::Symlink && se.mode != de.mode {
            diffs.push(format!("{}: mode {:o} in source, {:o} in destination", show(p), se.mode, de.mode));
        }
        if (se.uid, se.gid) != (de.uid, de.gid) {
            diffs.push(format!(
                "{}: owner {}:{} in source, {}:{} in destination",
                show(p),
                se.uid,
                se.gid,
                de.uid,
                de.gid
            ));
        }
        if se.mtime != de.mtime {
            diffs.push(format!(
                "{} ({:?}): mtime {}.{:09} in source, {}.{:09} in destination",
                show(p),
                se.kind,
                se.mtime.0,
                se.mtime.1,
                de.mtime.0,
                de.mtime.1
            ));
        }
        if se.kind == Kind::File {
            if se.size != de.size {
                diffs.push(format!("{}: size {} in source, {} in destination", show(p), se.size, de.size));
            } else if se.digest != de.digest {
                diffs.push(format!("{}: content differs (BLAKE3)", show(p)));
            }
            *paths_of_dst_ino.entry(de.ino).or_default() += 1;
            dst_ino_of_src_ino.entry(se.ino).or_default().insert(de.ino);
            src_ino_of_dst_ino.entry(de.ino).or_default().insert(se.ino);
            if opts.hardlinks && se.nlink != de.nlink {
                diffs.push(format!("{}: nlink {} in source, {} in destination (-H)", show(p), se.nlink, de.nlink));
            }
            if !opts.hardlinks && de.nlink != 1 {
                diffs.push(format!("{}: nlink {} in destination without -H (expected 1)", show(p), de.nlink));
            }
        }
        if se.kind == Kind::Symlink && se.target != de.target {
            diffs.push(format!(
                "{}: symlink target {} in source, {} in destination",
                show(p),
                show(se.target.as_deref().unwrap_or_default()),
                show(de.target.as_deref().unwrap_or_default())
            ));
        }
        if opts.xattrs {
            if se.xattrs != de.xattrs {
                diffs.push(format!(
                    "{}: xattrs {:?} in source, {:?} in destination (-X)",
                    show(p),
                    se.xattrs,
                    de.xattrs
                ));
            }
        } else if !de.xattrs.is_empty() {
            diffs.push(format!("{}: destination has user xattrs {:?} without -X", show(p), de.xattrs));
        }
    }
    for p in d.keys() {
        if !s.contains_key(p) {
            diffs.push(format!("unexpected in destination: {}", show(p)));
        }
    }
    if opts.hardlinks {
        for (si, dis) in &dst_ino_of_src_ino {
            if dis.len() != 1 {
                diffs.push(format!("source inode {si} (hard-linked) became {} destination inodes (-H)", dis.len()));
            }
        }
        for (di, sis) in &src_ino_of_dst_ino {
            if sis.len() != 1 {
                diffs.push(format!("destination inode {di} joins {} distinct source files", sis.len()));
            }
        }
    } else {
        for (di, n) in &paths_of_dst_ino {
            if *n > 1 {
                diffs.push(format!("destination inode {di} shared by {n} files without -H"));
            }
        }
    }
    let tmp = tmp_leftovers(dst);
    if !tmp.is_empty() {
        diffs.push(format!("temporary files left: {tmp:?}"));
    }
    if !diffs.is_empty() {
        let n = diffs.len();
        diffs.truncate(60);
        panic!(
            "destination {} differs from source {} ({n} differences):\n  {}",
            dst.display(),
            src.display(),
            diffs.join("\n  ")
        );
    }
}

/// Counts of a tree as fastsync should report them: (regular files, directories below the root, symlinks, bytes).
pub fn tree_counts(root: &Path) -> (u64, u64, u64, u64) {
    let s = snapshot(root);
    let mut c = (0, 0, 0, 0);
    for e in s.values() {
        match e.kind {
            Kind::File => {
                c.0 += 1;
                c.3 += e.size;
            }
            Kind::Dir => c.1 += 1,
            Kind::Symlink => c.2 += 1,
            _ => {}
        }
    }
    c
}

// ---------------------------------------------------------------------------------------------------------------
// The "everything" tree
// ---------------------------------------------------------------------------------------------------------------

/// What `build_everything` put in the tree, for checks beyond the comparison.
pub struct Everything {
    pub xattrs: bool,
    pub special_names: Vec<Vec<u8>>,
}

/// Builds a realistic tree under `root` (which must exist): directories nested 4 levels deep, ~300 small files of
/// random sizes 0–64 KiB, and one of each special case: empty file, empty dirs, non-UTF-8 names, odd names, long name,
/// relative/absolute/dangling/self-looping/directory symlinks, setuid/setgid/sticky modes, read-only file and dir,
/// files owned by 1234:5678, a small sparse file, hard links, user xattrs (when supported), a FIFO and a socket.
/// Every entry gets a distinct nanosecond mtime; directory mtimes are set last.
pub fn build_everything(root: &Path) -> Everything {
    let mut rng = Rng::new(0xE7E2_7701);
    // Directory skeleton: 4 levels.
    let mut dirs = vec![root.to_path_buf()];
    for a in 0..3 {
        let l1 = root.join(format!("d{a}"));
        dirs.push(l1.clone());
        for b in 0..2 {
            let l2 = l1.join(format!("sub{b}"));
            dirs.push(l2.clone());
            let l3 = l2.join("deeper");
            dirs.push(l3.clone());
            let l4 = l3.join("deepest");
            dirs.push(l4.clone());
        }
    }
    for d in &dirs {
        mkdirs(d);
    }
    // ~300 small files of random sizes 0–64 KiB, spread over the dirs.
    for i in 0..300u64 {
        let d = &dirs[rng.below(dirs.len() as u64) as usize];
        let size = rng.below(64 * 1024 + 1) as usize;
        let p = d.join(format!("f{i:03}.bin"));
        write_file(&p, &random_bytes(i + 1, size));
        let mode = [0o644, 0o600, 0o755, 0o640, 0o444][rng.below(5) as usize];
        chmod(&p, mode);
        set_times(&p, 1_400_000_000 + i as i64 * 977, (i as i64 * 7_777_777 + 1) % 1_000_000_000);
    }
    // Empty file, empty dirs (one nested).
    write_file(&root.join("empty.txt"), b"");
    mkdirs(&root.join("empty_dir"));
    mkdirs(&root.join("d1/empty/nested_empty"));
    // Names that are not UTF-8, odd names, a long name.
    write_file(&root.join(os(b"caf\xe9")), b"latin-1 name\n");
    mkdirs(&root.join(os(b"dir\xff\xfe")));
    write_file(&root.join(os(b"dir\xff\xfe/inner\x80.txt")), b"inner of non-utf8 dir\n");
    write_file(&root.join("with space.txt"), b"space\n");
    write_file(&root.join("new\nline"), b"newline in name\n");
    write_file(&root.join("-leading-dash"), b"dash\n");
    write_file(&root.join("üñíçødé ✓.txt"), "unicode\n".as_bytes());
    write_file(&root.join("x".repeat(255)), b"long name\n");
    // Symlinks of every kind.
    write_file(&root.join("target.txt"), b"symlink target\n");
    ln_s("target.txt", &root.join("link_rel"));
    ln_s("../../target.txt", &root.join("d0/sub0/link_up"));
    ln_s("/etc/hostname", &root.join("link_abs"));
    ln_s("does/not/exist", &root.join("link_dangling"));
    ln_s("link_loop", &root.join("link_loop"));
    ln_s("d2", &root.join("link_dir"));
    ln_s(os(b"caf\xe9"), &root.join("link_nonutf8"));
    // Special permission bits and owners.
    let suid = root.join("setuid_bin");
    write_file(&suid, b"#!/bin/sh\n");
    lchown(&suid, 1234, 5678);
    chmod(&suid, 0o4755);
    let sgid = root.join("setgid_bin");
    write_file(&sgid, b"#!/bin/sh\n");
    lchown(&sgid, 1234, 5678);
    chmod(&sgid, 0o2755);
    let both = root.join("setugid_bin");
    write_file(&both, b"both\n");
    chmod(&both, 0o6711);
    let sticky = root.join("sticky_dir");
    mkdirs(&sticky);
    write_file(&sticky.join("inside"), b"in sticky\n");
    chmod(&sticky, 0o1777);
    let owned = root.join("d1/owned.txt");
    write_file(&owned, b"owned by 1234:5678\n");
    lchown(&owned, 1234, 5678);
    let owned_dir = root.join("owned_dir");
    mkdirs(&owned_dir);
    write_file(&owned_dir.join("f"), b"f\n");
    lchown(&owned_dir, 4321, 8765);
    lchown(&root.join("link_rel"), 1234, 5678);
    let ro_dir = root.join("readonly_dir");
    mkdirs(&ro_dir);
    write_file(&ro_dir.join("inside.txt"), b"in read-only dir\n");
    chmod(&ro_dir.join("inside.txt"), 0o400);
    chmod(&ro_dir, 0o555);
    chmod(&root.join("d2/sub1"), 0o700);
    // Small sparse file: 600 KiB, data at 0 and at 300 KiB, hole to the end.
    let sparse = root.join("sparse_small");
    {
        let f = File::create(&sparse).unwrap();
        f.set_len(600 * 1024).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&random_bytes(77, 4096), 0).unwrap();
        f.write_all_at(&random_bytes(78, 4096), 300 * 1024).unwrap();
    }
    // Hard links (same inode in several places).
    write_file(&root.join("hl_a"), b"hard linked content\n");
    fs::hard_link(root.join("hl_a"), root.join("d0/hl_b")).unwrap();
    fs::hard_link(root.join("hl_a"), root.join("d2/sub1/deeper/hl_c")).unwrap();
    // Extended attributes.
    let xattrs = xattrs_supported(root);
    if xattrs {
        lsetxattr(&root.join("target.txt"), "user.color", b"blue").unwrap();
        lsetxattr(&root.join("target.txt"), "user.bin", b"\x00\x01\xff\x00").unwrap();
        lsetxattr(&root.join("empty.txt"), "user.empty", b"").unwrap();
        lsetxattr(&root.join("d1"), "user.dirattr", b"on a directory").unwrap();
        lsetxattr(&root.join(os(b"caf\xe9")), "user.big", &random_bytes(5, 2000)).unwrap();
    }
    // Special files: skipped by the copy.
    mkfifo(&root.join("d0/a_fifo"));
    mksock(&root.join("a_socket"));
    let special_names = vec![b"d0/a_fifo".to_vec(), b"a_socket".to_vec()];
    // Nanosecond mtimes for the non-random entries and the symlinks.
    let mut k = 0i64;
    for e in snapshot(root).keys() {
        let p = root.join(os(e));
        let m = fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            continue;
        }
        k += 1;
        set_times(&p, 1_600_000_000 + k * 61, (k * 123_456_789 + 17) % 1_000_000_000);
    }
    stamp_dir_times(root, 1_500_000_000);
    Everything { xattrs, special_names }
}

/// A small ordinary tree: a few files, nested dirs, a symlink, distinct ns mtimes. Returns the number of bytes.
pub fn build_small_tree(root: &Path) -> u64 {
    let mut total = 0;
    mkdirs(root);
    for (i, rel) in ["a.txt", "b.bin", "sub/c.txt", "sub/deep/d.bin", "sub/deep/e.txt", "other/f"].iter().enumerate() {
        let data = random_bytes(100 + i as u64, 1000 * i + 17);
        total += data.len() as u64;
        let p = root.join(rel);
        write_file(&p, &data);
        set_times(&p, 1_300_000_000 + i as i64, 123_456_789 + i as i64);
    }
    mkdirs(&root.join("emptydir"));
    ln_s("a.txt", &root.join("link_to_a"));
    set_times(&root.join("link_to_a"), 1_300_000_100, 5);
    stamp_dir_times(root, 1_200_000_000);
    total
}
