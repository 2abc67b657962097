//! `fastsync://host[:port]/path` URLs, and telling them apart from local paths.
//!
//! - `host` is a name, an IPv4 address or a bracketed IPv6 address (`[::1]`); `port` defaults to [`DEFAULT_PORT`].
//! - `path` is relative to the root the server serves: the leading `/` is dropped, so `fastsync://h/` and
//!   `fastsync://h` name the served root itself and `fastsync://h/a/b` names `ROOT/a/b`. A trailing `/` is kept as a
//!   hint ("a directory": the copy rule puts a file inside it) and dropped from the wire path.
//! - Nothing is percent-decoded: the bytes after the host are the path, as they are (`%20` is three characters of a
//!   name). Paths that would leave the served root (`..`, `.`, empty components like `a//b`) are refused here already,
//!   as the server would refuse them.
//!
//! Anything that does not start with `fastsync://` is a local path.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use fastsync_engine::Show;

use super::wire::{PATH_BYTES_MAX, safe_components};

/// The scheme prefix of remote paths.
pub const SCHEME: &str = "fastsync://";
/// The port a URL without one names (and `fastsync serve` listens on by default).
pub const DEFAULT_PORT: u16 = 7878;

/// A remote location: where the server listens and the path beneath its root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    /// `host:port` as given to `connect` (`[v6]:port` for IPv6).
    pub addr: String,
    /// Relative to the served root; `""` is the root. Never starts or ends with `/`.
    pub path: Vec<u8>,
    /// The URL ended in `/` (and did not name the root).
    pub trailing_slash: bool,
}

impl Remote {
    /// The URL of `rel` beneath this location, for messages: `fastsync://host:port/path/rel`.
    pub fn display(&self, rel: &[u8]) -> String {
        let joined = join(&self.path, rel);
        format!("{SCHEME}{}/{}", self.addr, joined.shown())
    }

    /// The wire path of `rel` beneath this location.
    pub fn join(&self, rel: &[u8]) -> Vec<u8> {
        join(&self.path, rel)
    }
}

/// `a/b` from `a` and `b`, either of which may be empty.
pub fn join(base: &[u8], rel: &[u8]) -> Vec<u8> {
    match (base.is_empty(), rel.is_empty()) {
        (true, _) => rel.to_vec(),
        (_, true) => base.to_vec(),
        _ => {
            let mut v = Vec::with_capacity(base.len() + 1 + rel.len());
            v.extend_from_slice(base);
            v.push(b'/');
            v.extend_from_slice(rel);
            v
        }
    }
}

/// Either side of a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Local(PathBuf),
    Remote { addr: String, path: Vec<u8> },
}

/// Whether `arg` is meant as a URL (starts with `fastsync://`).
pub fn is_url(arg: &Path) -> bool {
    arg.as_os_str().as_bytes().starts_with(SCHEME.as_bytes())
}

/// The scheme of `arg` when it is a URL fastsync does not speak (`s3://bucket/key`, `sftp://host/path`, ...) and no
/// local path of that name exists: `SCHEME://` where SCHEME is a letter followed by letters, digits, `+`, `-` or `.`.
pub fn foreign_scheme(arg: &Path) -> Option<&str> {
    let bytes = arg.as_os_str().as_bytes();
    let end = bytes.windows(3).position(|w| w == b"://")?;
    let scheme = &bytes[..end];
    let well_formed = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !well_formed || is_url(arg) || arg.symlink_metadata().is_ok() {
        return None;
    }
    std::str::from_utf8(scheme).ok()
}

/// A local path, or a parsed `fastsync://` URL. The error is one line naming the URL and what is wrong with it.
pub fn endpoint(arg: &Path) -> Result<Endpoint, String> {
    if !is_url(arg) {
        return Ok(Endpoint::Local(arg.to_path_buf()));
    }
    let r = parse(arg.as_os_str().as_bytes())?;
    Ok(Endpoint::Remote { addr: r.addr, path: r.path })
}

/// Parse a `fastsync://host[:port]/path` URL.
pub fn parse(url: &[u8]) -> Result<Remote, String> {
    let shown = url.shown();
    let bad = |what: &str| format!("invalid URL '{shown}': {what}");
    let rest = url.strip_prefix(SCHEME.as_bytes()).ok_or_else(|| bad("it does not start with fastsync://"))?;
    let (authority, path) = match rest.iter().position(|&b| b == b'/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &b""[..]),
    };
    let authority = std::str::from_utf8(authority).map_err(|_| bad("the host is not UTF-8"))?;
    if authority.is_empty() {
        return Err(bad("no host (expected fastsync://HOST[:PORT]/PATH)"));
    }
    if authority.contains('@') {
        return Err(bad("user names are not supported (authentication uses a token: --token-file or FASTSYNC_TOKEN)"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6.find(']').ok_or_else(|| bad("an IPv6 address must end with ']'"))?;
        let addr = &v6[..end];
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad(&format!("'{addr}' is not an IPv6 address")));
        }
        let after = &v6[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(bad("unexpected characters after the IPv6 address")),
        };
        (format!("[{addr}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, _)) if h.contains(':') => {
                return Err(bad("an IPv6 address must be written in brackets, e.g. fastsync://[::1]:7878/path"));
            }
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host (expected fastsync://HOST[:PORT]/PATH)"));
    }
    if !host.starts_with('[') && !host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
        return Err(bad(&format!("'{host}' is not a host name or address")));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad(&format!("'{p}' is not a port number (1 to 65535)"))),
            Ok(p) => p,
        },
    };
    let trailing_slash = path.ends_with(b"/");
    let path = path.strip_suffix(b"/").unwrap_or(path);
    if path.len() > PATH_BYTES_MAX {
        return Err(bad(&format!("the path is longer than {PATH_BYTES_MAX} bytes")));
    }
    safe_components(path).map_err(|e| bad(&format!("{e} (paths are relative to the served root)")))?;
    Ok(Remote {
        addr: format!("{host}:{port}"),
        path: path.to_vec(),
        trailing_slash: trailing_slash && !path.is_empty(),
    })
}

/// The last component of a wire path (the whole path when it has one component).
pub fn file_name(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

/// The wire path of the directory holding `path` (`""`, the root, when it has one component).
pub fn parent(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

/// A wire path as an OS path.
pub fn os_path(p: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(p))
}

#[cfg(test)]
mod tests {
    #[test]
    fn foreign_schemes_are_recognised() {
        assert_eq!(foreign_scheme(Path::new("s3://bucket/key")), Some("s3"));
        assert_eq!(foreign_scheme(Path::new("sftp://host/p")), Some("sftp"));
        assert_eq!(foreign_scheme(Path::new("git+ssh://h/r")), Some("git+ssh"));
        assert_eq!(foreign_scheme(Path::new("fastsync://h/p")), None);
        assert_eq!(foreign_scheme(Path::new("./s3://x")), None);
        assert_eq!(foreign_scheme(Path::new("plain/path")), None);
        assert_eq!(foreign_scheme(Path::new("1x://y")), None);
    }

    use super::*;

    fn ok(url: &str) -> Remote {
        parse(url.as_bytes()).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn hosts_ports_and_paths() {
        let r = ok("fastsync://host/a/b");
        assert_eq!((r.addr.as_str(), r.path.as_slice(), r.trailing_slash), ("host:7878", &b"a/b"[..], false));
        assert_eq!(ok("fastsync://10.0.0.1:9000/x/").addr, "10.0.0.1:9000");
        assert!(ok("fastsync://10.0.0.1:9000/x/").trailing_slash);
        assert_eq!(ok("fastsync://[::1]:7000/p").addr, "[::1]:7000");
        assert_eq!(ok("fastsync://[fe80::1]/p").addr, "[fe80::1]:7878");
        for root in ["fastsync://h", "fastsync://h/", "fastsync://h:1/"] {
            let r = ok(root);
            assert!(r.path.is_empty() && !r.trailing_slash, "{root}");
        }
        // Not decoded: `%2e%2e` is a name.
        assert_eq!(ok("fastsync://h/%2e%2e/a%20b").path, b"%2e%2e/a%20b");
        assert_eq!(ok("fastsync://h/a").display(b"b/c"), "fastsync://h:7878/a/b/c");
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, what) in [
            ("fastsync://", "no host"),
            ("fastsync:///path", "no host"),
            ("fastsync://h:0/p", "port"),
            ("fastsync://h:99999/p", "port"),
            ("fastsync://h:x/p", "port"),
            ("fastsync://::1/p", "brackets"),
            ("fastsync://[::1/p", "']'"),
            ("fastsync://[zz]/p", "IPv6"),
            ("fastsync://u@h/p", "user"),
            ("fastsync://h/../etc", "leaves"),
            ("fastsync://h/a//b", "leaves"),
            ("fastsync://h//abs", "absolute"),
            ("fastsync://h o/p", "host"),
        ] {
            let e = parse(url.as_bytes()).unwrap_err();
            assert!(e.contains(url) && e.contains(what), "{url}: {e}");
        }
    }

    #[test]
    fn local_paths_are_local() {
        assert_eq!(endpoint(Path::new("/tmp/x")).unwrap(), Endpoint::Local("/tmp/x".into()));
        assert_eq!(endpoint(Path::new("fastsync:/x")).unwrap(), Endpoint::Local("fastsync:/x".into()));
        assert_eq!(
            endpoint(Path::new("fastsync://h:1/a")).unwrap(),
            Endpoint::Remote { addr: "h:1".into(), path: b"a".to_vec() }
        );
    }
}
