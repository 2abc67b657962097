//! Mutual challenge-response authentication with a shared token; the token never crosses the wire.
//!
//! Both sides derive a key from the token (`BLAKE3 derive_key`, context [`KEY_CONTEXT`]). The client opens with its
//! version and a random nonce; the server answers with its version, its own random nonce and whether it is
//! read-only; the client proves knowledge of the key with `BLAKE3-keyed(key, "client" || server nonce || client
//! nonce)`; the server checks it (in constant time) and proves its own knowledge with the mirrored MAC, so a client
//! never sends data to, or takes data from, an impostor. Fresh nonces on both sides make every proof single-use.

use std::io::{Read, Write};
use std::path::Path;

use super::wire::{Msg, VERSION, WireError, code, read_msg, write_msg};

/// Domain separation for the key derivation (changing it invalidates every deployed token's key).
pub const KEY_CONTEXT: &str = "fastsync 2026-11-24 shared-token authentication v1";

/// The key both sides derive from the shared token.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn from_token(token: &[u8]) -> Key {
        Key(blake3::derive_key(KEY_CONTEXT, token))
    }

    fn mac(&self, label: &[u8], first: &[u8; 32], second: &[u8; 32]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(first);
        h.update(second);
        h.finalize()
    }
}

/// Where the token comes from: `--token-file FILE`, else the `FASTSYNC_TOKEN` variable. Trailing newlines of the
/// file are ignored; an empty token is refused. `None`: no token given anywhere.
pub fn load_token(token_file: Option<&Path>, env: Option<std::ffi::OsString>) -> Result<Option<Vec<u8>>, String> {
    use std::os::unix::ffi::OsStringExt;
    let (token, from) = match (token_file, env) {
        (Some(path), _) => {
            let t = std::fs::read(path).map_err(|e| format!("cannot read token file '{}': {e}", path.display()))?;
            (t, format!("token file '{}'", path.display()))
        }
        (None, Some(v)) => (v.into_vec(), "FASTSYNC_TOKEN".to_string()),
        (None, None) => return Ok(None),
    };
    let end = token.iter().rposition(|&b| b != b'\n' && b != b'\r').map_or(0, |i| i + 1);
    let token = token[..end].to_vec();
    if token.is_empty() {
        return Err(format!("{from} is empty"));
    }
    Ok(Some(token))
}

/// A random nonce from the kernel (`getentropy`: Linux and the BSDs/macOS alike).
pub fn nonce() -> std::io::Result<[u8; 32]> {
    let mut n = [0u8; 32];
    // SAFETY: the pointer and length describe `n` (getentropy takes at most 256 bytes).
    if unsafe { libc::getentropy(n.as_mut_ptr().cast(), n.len()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n)
}

/// Why authentication failed, worded for the side that reports it.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error(
        "the peer speaks protocol version {0}, this fastsync speaks {VERSION}; use the same fastsync version on both hosts"
    )]
    Version(u16),
    #[error(
        "authentication failed: the server rejected the token (check --token-file or FASTSYNC_TOKEN on both sides)"
    )]
    Rejected,
    #[error("authentication failed: the client's token does not match this server's")]
    BadClient,
    #[error(
        "authentication failed: the server could not prove it knows the token (wrong server, or a different token)"
    )]
    BadServer,
    #[error("the server refused: {0}")]
    Refused(String),
    #[error("protocol error during authentication: unexpected {0}")]
    Unexpected(&'static str),
}

/// Client side. Returns whether the server is read-only.
pub fn client<S: Read + Write>(stream: &mut S, key: &Key) -> Result<bool, AuthError> {
    let mine = nonce().map_err(WireError::Io)?;
    write_msg(stream, &Msg::Hello { version: VERSION, nonce: mine })?;
    let (theirs, read_only) = match read_msg(stream)? {
        Msg::Challenge { version, nonce, read_only } if version == VERSION => (nonce, read_only),
        Msg::Challenge { version, .. } => return Err(AuthError::Version(version)),
        Msg::Error { code: code::VERSION, message } | Msg::Error { message, .. } => {
            return Err(AuthError::Refused(message));
        }
        _ => return Err(AuthError::Unexpected("message instead of the challenge")),
    };
    let mac = key.mac(b"client", &theirs, &mine);
    write_msg(stream, &Msg::Auth { mac: *mac.as_bytes() })?;
    match read_msg(stream)? {
        // blake3::Hash compares in constant time.
        Msg::AuthOk { mac } if key.mac(b"server", &mine, &theirs) == blake3::Hash::from_bytes(mac) => Ok(read_only),
        Msg::AuthOk { .. } => Err(AuthError::BadServer),
        Msg::Error { code: code::AUTH, .. } => Err(AuthError::Rejected),
        Msg::Error { message, .. } => Err(AuthError::Refused(message)),
        _ => Err(AuthError::Unexpected("message instead of the server's proof")),
    }
}

/// Server side: on failure the client has been told why (as far as it is safe to say).
pub fn server<S: Read + Write>(stream: &mut S, key: &Key, read_only: bool) -> Result<(), AuthError> {
    let theirs = match read_msg(stream)? {
        Msg::Hello { version, nonce } if version == VERSION => nonce,
        Msg::Hello { version, .. } => {
            let message = format!("protocol version {version} is not supported (this server speaks {VERSION})");
            let _ = write_msg(stream, &Msg::Error { code: code::VERSION, message });
            return Err(AuthError::Version(version));
        }
        _ => return Err(AuthError::Unexpected("message instead of hello")),
    };
    let mine = nonce().map_err(WireError::Io)?;
    write_msg(stream, &Msg::Challenge { version: VERSION, nonce: mine, read_only })?;
    match read_msg(stream)? {
        Msg::Auth { mac } if key.mac(b"client", &mine, &theirs) == blake3::Hash::from_bytes(mac) => {
            write_msg(stream, &Msg::AuthOk { mac: *key.mac(b"server", &theirs, &mine).as_bytes() })?;
            Ok(())
        }
        Msg::Auth { .. } => {
            let _ = write_msg(stream, &Msg::Error { code: code::AUTH, message: "authentication failed".into() });
            Err(AuthError::BadClient)
        }
        _ => Err(AuthError::Unexpected("message instead of the client's proof")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair(
        client_token: &'static [u8],
        server_token: &'static [u8],
    ) -> (Result<bool, AuthError>, Result<(), AuthError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || server(&mut b, &Key::from_token(server_token), true));
        let c = client(&mut a, &Key::from_token(client_token));
        (c, srv.join().unwrap())
    }

    #[test]
    fn same_token_authenticates_both_ways() {
        let (c, s) = pair(b"secret", b"secret");
        assert!(c.unwrap(), "read-only flag carried");
        s.unwrap();
    }

    #[test]
    fn wrong_token_is_refused_on_both_sides() {
        let (c, s) = pair(b"secret", b"other");
        assert!(matches!(c, Err(AuthError::Rejected)), "{c:?}");
        assert!(matches!(s, Err(AuthError::BadClient)), "{s:?}");
    }

    #[test]
    fn token_file_and_env() {
        let dir = std::env::temp_dir().join(format!("fs-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        std::fs::write(&f, b"abc\n").unwrap();
        assert_eq!(load_token(Some(&f), Some("zzz".into())).unwrap().unwrap(), b"abc");
        assert_eq!(load_token(None, Some("zzz".into())).unwrap().unwrap(), b"zzz");
        assert_eq!(load_token(None, None).unwrap(), None);
        std::fs::write(&f, b"\n").unwrap();
        assert!(load_token(Some(&f), None).unwrap_err().contains("empty"));
        assert!(load_token(Some(&dir.join("missing")), None).unwrap_err().contains("cannot read token file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_token_never_crosses_the_wire() {
        let token = b"very-secret-token-value";
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || {
            let mut rec = Recorder { inner: &mut b, seen: Vec::new() };
            server(&mut rec, &Key::from_token(token), false).unwrap();
            rec.seen
        });
        client(&mut a, &Key::from_token(token)).unwrap();
        let seen = srv.join().unwrap();
        assert!(!seen.windows(token.len()).any(|w| w == token));
    }

    struct Recorder<'a> {
        inner: &'a mut UnixStream,
        seen: Vec<u8>,
    }
    impl Read for Recorder<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.seen.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }
    impl Write for Recorder<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.seen.extend_from_slice(buf);
            self.inner.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
}
