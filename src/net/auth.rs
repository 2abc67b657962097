//! Mutual challenge-response authentication with a shared token; the token never crosses the wire.
//!
//! Both sides derive a key from the token (`BLAKE3 derive_key`, context [`KEY_CONTEXT`]). The client opens with its
//! version and a random nonce; the server answers with its version, its own random nonce and whether it is
//! read-only; the client proves knowledge of the key with `BLAKE3-keyed(key, "client" || server nonce || client
//! nonce)`; the server checks it (in constant time) and proves its own knowledge with the mirrored MAC, so a client
//! never sends data to, or takes data from, an impostor. Fresh nonces on both sides make every proof single-use.
//!
//! The hello also carries what the client asks for (`--encrypt`, `--compress`) and the challenge what the server
//! settled; both MACs cover both flag bytes, so a man in the middle who changes them (to strip encryption, say) fails
//! the handshake. When the connection is to be sealed, each side derives one key per direction from the token's key
//! and both nonces ([`Key::session_keys`]) and both switch to the record layer (`record`) right after `AuthOk`.

use std::io::{Read, Write};
use std::path::Path;

use super::record::{DEFAULT_LEVEL, Direction, MAX_LEVEL};
use super::wire::{Msg, VERSION, WireError, challenge, code, hello, read_msg, write_msg};

/// Domain separation for the key derivation (changing it invalidates every deployed token's key).
pub const KEY_CONTEXT: &str = "fastsync 2026-11-24 shared-token authentication v1";
/// Domain separation for the client-to-server session key.
pub const C2S_CONTEXT: &str = "fastsync session c2s v1";
/// Domain separation for the server-to-client session key.
pub const S2C_CONTEXT: &str = "fastsync session s2c v1";

/// What a client asks for in its hello.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wishes {
    /// `--encrypt`: seal every record after `AuthOk`.
    pub encrypt: bool,
    /// `--compress[=LEVEL]`: the zstd level (1..=19).
    pub compress: Option<u8>,
}

impl Wishes {
    /// `Hello.flags`.
    pub fn flags(&self) -> u8 {
        let mut f = 0;
        if self.encrypt {
            f |= hello::ENCRYPT;
        }
        if let Some(level) = self.compress {
            f |= hello::COMPRESS | (level.clamp(1, MAX_LEVEL) << hello::LEVEL_SHIFT);
        }
        f
    }

    /// Parse `Hello.flags`; reserved bits, a level without compression or a level out of range are refused.
    pub fn from_flags(f: u8) -> Result<Wishes, String> {
        let level = f >> hello::LEVEL_SHIFT;
        if f & hello::RESERVED != 0 {
            return Err(format!("reserved hello flags set ({f:#04x})"));
        }
        let compress = match (f & hello::COMPRESS != 0, level) {
            (false, 0) => None,
            (true, 1..=MAX_LEVEL) => Some(level),
            (true, _) => return Err(format!("compression level {level} is not between 1 and {MAX_LEVEL}")),
            (false, _) => return Err(format!("a compression level ({level}) without compression")),
        };
        Ok(Wishes { encrypt: f & hello::ENCRYPT != 0, compress })
    }
}

/// What a server allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `--read-only`: told to the client in the challenge.
    pub read_only: bool,
    /// `--require-encrypt`: a client that does not ask for encryption is refused ([`code::NEEDS_ENCRYPTION`]).
    pub require_encrypt: bool,
    /// `--no-compress`: a client's wish to compress is ignored (the connection goes uncompressed).
    pub no_compress: bool,
}

/// What a successful handshake settled, seen from one side.
#[derive(Debug)]
pub struct Session {
    /// The server refuses writes.
    pub read_only: bool,
    /// Records are sealed.
    pub encrypt: bool,
    /// Records may be compressed, at this level by this side's writer.
    pub compress: Option<u8>,
    /// This side's sending direction (key and level) for the record layer.
    pub send: Direction,
    /// This side's receiving direction.
    pub recv: Direction,
}

impl Session {
    /// Whether the connection switches to records after `AuthOk`.
    pub fn records(&self) -> bool {
        self.encrypt || self.compress.is_some()
    }
}

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

    /// `BLAKE3-keyed(key, label || first || second || hello flags || challenge flags)`.
    fn mac(&self, label: &[u8], first: &[u8; 32], second: &[u8; 32], flags: [u8; 2]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(first);
        h.update(second);
        h.update(&flags);
        h.finalize()
    }

    /// The session keys `(client to server, server to client)`:
    /// `BLAKE3-derive_key(C2S_CONTEXT or S2C_CONTEXT, key || client nonce || server nonce)`.
    pub fn session_keys(&self, client_nonce: &[u8; 32], server_nonce: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
        let mut material = [0u8; 96];
        material[..32].copy_from_slice(&self.0);
        material[32..64].copy_from_slice(client_nonce);
        material[64..].copy_from_slice(server_nonce);
        let keys = (blake3::derive_key(C2S_CONTEXT, &material), blake3::derive_key(S2C_CONTEXT, &material));
        material.fill(0);
        keys
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
    #[error("protocol error during authentication: {0}")]
    Flags(String),
    #[error(
        "the server did not agree to encrypt the connection (--encrypt); refusing to go on in clear (is it an older \
         fastsync, or is something on the way tampering with the handshake?)"
    )]
    NotEncrypted,
    #[error(
        "refused: the client did not ask for encryption (--encrypt) and this server requires it (--require-encrypt)"
    )]
    NeedsEncryption,
}

/// The message a client that does not ask for encryption gets from `serve --require-encrypt`.
pub const NEEDS_ENCRYPTION_MESSAGE: &str =
    "this server requires encryption (serve --require-encrypt): run the client with --encrypt";

/// The session both sides settle on, seen from the client (`is_client`) or the server.
fn session(
    key: &Key,
    is_client: bool,
    read_only: bool,
    agreed: u8,
    level: Option<u8>,
    nonces: (&[u8; 32], &[u8; 32]),
) -> Session {
    let encrypt = agreed & challenge::ENCRYPT != 0;
    let compress = if agreed & challenge::COMPRESS != 0 { Some(level.unwrap_or(DEFAULT_LEVEL)) } else { None };
    let (c2s, s2c) = if encrypt { key.session_keys(nonces.0, nonces.1) } else { ([0; 32], [0; 32]) };
    let (send, recv) = if is_client { (c2s, s2c) } else { (s2c, c2s) };
    let key_if = |k: [u8; 32]| encrypt.then_some(k);
    Session {
        read_only,
        encrypt,
        compress,
        send: Direction { key: key_if(send), level: compress },
        recv: Direction { key: key_if(recv), level: compress },
    }
}

/// Client side, asking for nothing (no encryption, no compression). Returns whether the server is read-only.
pub fn client<S: Read + Write>(stream: &mut S, key: &Key) -> Result<bool, AuthError> {
    client_with(stream, key, Wishes::default()).map(|s| s.read_only)
}

/// Client side. On success the caller switches to the record layer when [`Session::records`] says so.
pub fn client_with<S: Read + Write>(stream: &mut S, key: &Key, wishes: Wishes) -> Result<Session, AuthError> {
    let mine = nonce().map_err(WireError::Io)?;
    let asked = wishes.flags();
    write_msg(stream, &Msg::Hello { version: VERSION, nonce: mine, flags: asked })?;
    let (theirs, read_only, agreed) = match read_msg(stream)? {
        Msg::Challenge { version, nonce, read_only, flags } if version == VERSION => (nonce, read_only, flags),
        Msg::Challenge { version, .. } => return Err(AuthError::Version(version)),
        Msg::Error { code: code::VERSION, message } | Msg::Error { message, .. } => {
            return Err(AuthError::Refused(message));
        }
        _ => return Err(AuthError::Unexpected("message instead of the challenge")),
    };
    if agreed & !(challenge::ENCRYPT | challenge::COMPRESS) != 0 {
        return Err(AuthError::Flags(format!("unknown challenge flags ({agreed:#04x})")));
    }
    match (wishes.encrypt, agreed & challenge::ENCRYPT != 0) {
        (true, false) => return Err(AuthError::NotEncrypted),
        (false, true) => return Err(AuthError::Flags("the server seals records the client did not ask for".into())),
        _ => {}
    }
    if wishes.compress.is_none() && agreed & challenge::COMPRESS != 0 {
        return Err(AuthError::Flags("the server compresses records the client did not ask for".into()));
    }
    let flags = [asked, agreed];
    let mac = key.mac(b"client", &theirs, &mine, flags);
    write_msg(stream, &Msg::Auth { mac: *mac.as_bytes() })?;
    match read_msg(stream)? {
        // blake3::Hash compares in constant time.
        Msg::AuthOk { mac } if key.mac(b"server", &mine, &theirs, flags) == blake3::Hash::from_bytes(mac) => {
            Ok(session(key, true, read_only, agreed, wishes.compress, (&mine, &theirs)))
        }
        Msg::AuthOk { .. } => Err(AuthError::BadServer),
        Msg::Error { code: code::AUTH, .. } => Err(AuthError::Rejected),
        Msg::Error { message, .. } => Err(AuthError::Refused(message)),
        _ => Err(AuthError::Unexpected("message instead of the server's proof")),
    }
}

/// Server side with no encryption required and compression allowed.
pub fn server<S: Read + Write>(stream: &mut S, key: &Key, read_only: bool) -> Result<(), AuthError> {
    server_with(stream, key, Policy { read_only, ..Policy::default() }).map(drop)
}

/// Server side: on failure the client has been told why (as far as it is safe to say). On success the caller
/// switches to the record layer when [`Session::records`] says so.
pub fn server_with<S: Read + Write>(stream: &mut S, key: &Key, policy: Policy) -> Result<Session, AuthError> {
    let (theirs, asked) = match read_msg(stream)? {
        Msg::Hello { version, nonce, flags } if version == VERSION => (nonce, flags),
        Msg::Hello { version, .. } => {
            let message = format!("protocol version {version} is not supported (this server speaks {VERSION})");
            let _ = write_msg(stream, &Msg::Error { code: code::VERSION, message });
            return Err(AuthError::Version(version));
        }
        _ => return Err(AuthError::Unexpected("message instead of hello")),
    };
    let wishes = match Wishes::from_flags(asked) {
        Ok(w) => w,
        Err(message) => {
            let _ = write_msg(stream, &Msg::Error { code: code::PROTOCOL, message: message.clone() });
            return Err(AuthError::Flags(message));
        }
    };
    if policy.require_encrypt && !wishes.encrypt {
        let message = NEEDS_ENCRYPTION_MESSAGE.to_string();
        let _ = write_msg(stream, &Msg::Error { code: code::NEEDS_ENCRYPTION, message });
        return Err(AuthError::NeedsEncryption);
    }
    let mut agreed = 0;
    if wishes.encrypt {
        agreed |= challenge::ENCRYPT;
    }
    if wishes.compress.is_some() && !policy.no_compress {
        agreed |= challenge::COMPRESS;
    }
    let mine = nonce().map_err(WireError::Io)?;
    write_msg(stream, &Msg::Challenge { version: VERSION, nonce: mine, read_only: policy.read_only, flags: agreed })?;
    let flags = [asked, agreed];
    match read_msg(stream)? {
        Msg::Auth { mac } if key.mac(b"client", &mine, &theirs, flags) == blake3::Hash::from_bytes(mac) => {
            write_msg(stream, &Msg::AuthOk { mac: *key.mac(b"server", &theirs, &mine, flags).as_bytes() })?;
            Ok(session(key, false, policy.read_only, agreed, wishes.compress, (&theirs, &mine)))
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

    fn negotiate(wishes: Wishes, policy: Policy) -> (Result<Session, AuthError>, Result<Session, AuthError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || server_with(&mut b, &Key::from_token(b"t"), policy));
        let c = client_with(&mut a, &Key::from_token(b"t"), wishes);
        (c, srv.join().unwrap())
    }

    #[test]
    fn flags_round_trip_and_bad_ones_are_refused() {
        for w in [
            Wishes::default(),
            Wishes { encrypt: true, compress: None },
            Wishes { encrypt: false, compress: Some(1) },
            Wishes { encrypt: true, compress: Some(19) },
        ] {
            assert_eq!(Wishes::from_flags(w.flags()).unwrap(), w);
        }
        assert!(Wishes::from_flags(hello::RESERVED).is_err());
        assert!(Wishes::from_flags(hello::COMPRESS).is_err(), "level 0");
        assert!(Wishes::from_flags(hello::COMPRESS | (20 << hello::LEVEL_SHIFT)).is_err());
        assert!(Wishes::from_flags(5 << hello::LEVEL_SHIFT).is_err(), "a level without compression");
    }

    #[test]
    fn encryption_and_compression_are_agreed_with_mirrored_keys() {
        let (c, s) = negotiate(Wishes { encrypt: true, compress: Some(7) }, Policy::default());
        let (c, s) = (c.unwrap(), s.unwrap());
        assert!(c.encrypt && s.encrypt && c.records() && s.records());
        assert_eq!((c.compress, s.compress), (Some(7), Some(7)));
        let (cs, cr, ss, sr) = (c.send.key.unwrap(), c.recv.key.unwrap(), s.send.key.unwrap(), s.recv.key.unwrap());
        assert_eq!((cs, cr), (sr, ss), "the client's sending key is the server's receiving key, and back");
        assert_ne!(cs, cr, "one key per direction");
        // Fresh nonces: fresh keys on every connection.
        let (c2, _) = negotiate(Wishes { encrypt: true, compress: None }, Policy::default());
        assert_ne!(c2.unwrap().send.key.unwrap(), cs);
        // Nothing asked: nothing changes.
        let (c, s) = negotiate(Wishes::default(), Policy::default());
        assert!(!c.unwrap().records() && !s.unwrap().records());
    }

    #[test]
    fn session_keys_are_derived_as_documented() {
        let key = Key::from_token(b"t");
        let (c2s, s2c) = key.session_keys(&[1; 32], &[2; 32]);
        let mut material = key.0.to_vec();
        material.extend_from_slice(&[1; 32]);
        material.extend_from_slice(&[2; 32]);
        assert_eq!(c2s, blake3::derive_key("fastsync session c2s v1", &material));
        assert_eq!(s2c, blake3::derive_key("fastsync session s2c v1", &material));
    }

    #[test]
    fn a_server_that_requires_encryption_refuses_a_plain_client_and_no_compress_is_honoured() {
        let policy = Policy { require_encrypt: true, no_compress: true, ..Policy::default() };
        let (c, s) = negotiate(Wishes { encrypt: false, compress: Some(3) }, policy);
        assert!(matches!(&c, Err(AuthError::Refused(m)) if m.contains("--encrypt")), "{c:?}");
        assert!(matches!(s, Err(AuthError::NeedsEncryption)), "{s:?}");
        let (c, s) = negotiate(Wishes { encrypt: true, compress: Some(3) }, policy);
        let (c, s) = (c.unwrap(), s.unwrap());
        assert!(c.encrypt && c.compress.is_none() && s.compress.is_none());
    }

    #[test]
    fn tampered_flags_fail_the_handshake() {
        // Strip the client's encryption wish on the way: the server would agree to a clear connection, but the
        // MACs cover the flags each side saw, so neither side accepts the other's proof.
        let (mut a, mut relay_c) = UnixStream::pair().unwrap();
        let (mut relay_s, mut b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || server_with(&mut b, &Key::from_token(b"t"), Policy::default()));
        let relay = std::thread::spawn(move || {
            let Msg::Hello { version, nonce, .. } = read_msg(&mut relay_c).unwrap() else { panic!() };
            write_msg(&mut relay_s, &Msg::Hello { version, nonce, flags: 0 }).unwrap();
            let Msg::Challenge { version, nonce, read_only, .. } = read_msg(&mut relay_s).unwrap() else { panic!() };
            // Claim encryption was agreed, so the client goes on.
            let flags = challenge::ENCRYPT;
            write_msg(&mut relay_c, &Msg::Challenge { version, nonce, read_only, flags }).unwrap();
            let auth = read_msg(&mut relay_c).unwrap();
            write_msg(&mut relay_s, &auth).unwrap();
            if let Ok(answer) = read_msg(&mut relay_s) {
                let _ = write_msg(&mut relay_c, &answer);
            }
        });
        let c = client_with(&mut a, &Key::from_token(b"t"), Wishes { encrypt: true, compress: None });
        assert!(c.is_err(), "{c:?}");
        assert!(matches!(srv.join().unwrap(), Err(AuthError::BadClient)));
        relay.join().unwrap();
        // A challenge that does not grant the encryption asked for is refused by the client itself.
        let (mut a, mut b) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let _ = read_msg(&mut b);
            let _ = write_msg(&mut b, &Msg::Challenge { version: VERSION, nonce: [0; 32], read_only: false, flags: 0 });
        });
        let c = client_with(&mut a, &Key::from_token(b"t"), Wishes { encrypt: true, compress: None });
        assert!(matches!(c, Err(AuthError::NotEncrypted)), "{c:?}");
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
