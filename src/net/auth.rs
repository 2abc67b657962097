//! Mutual challenge-response authentication with a shared token (the token never crosses the wire), and, when the
//! connection is to be encrypted, an ephemeral X25519 key agreement that the same proofs authenticate.
//!
//! Both sides derive a key from the token (`BLAKE3 derive_key`, context [`KEY_CONTEXT`]). The client opens with its
//! version, a random nonce and what it asks for (`--encrypt`, `--compress`); the server answers with its version, its
//! own random nonce, whether it is read-only and what it settled. When encryption was settled, each side also sends a
//! fresh ephemeral X25519 public key (`KeyShare`: the server's right after its challenge, the client's right before
//! its proof). Every frame of that exchange goes into a transcript hash ([`TRANSCRIPT_CONTEXT`]); the client proves
//! knowledge of the key with `BLAKE3-keyed(key, "client" || transcript)`, the server checks it (in constant time) and
//! proves its own knowledge with `BLAKE3-keyed(key, "server" || transcript)`, so a client never sends data to, or
//! takes data from, an impostor, and a man in the middle who changes any byte of the exchange (a flag, to strip
//! encryption; a public key, to put his own in its place) fails it. Fresh nonces make every proof single-use.
//!
//! The record keys (`Key::session_keys`) come from the token's key, the Diffie-Hellman shared secret and the
//! transcript together: one key per direction, new on every connection, and out of reach of someone who learns the
//! token later, even with a recording of the whole connection (the ephemeral secrets are gone by then: forward
//! secrecy). A connection without `--encrypt` does no key agreement at all. Both switch to the record layer
//! (`record`) right after `AuthOk` when encryption or compression was settled.

use std::io::{Read, Write};
use std::path::Path;

use fastsync_engine::Show;
use x25519_dalek::{EphemeralSecret, PublicKey, SharedSecret};
use zeroize::{Zeroize, Zeroizing};

use super::record::{DEFAULT_LEVEL, Direction, MAX_LEVEL};
use super::wire::{Msg, VERSION, WireError, challenge, code, hello, read_msg, write_msg};

/// Domain separation for the key derivation (changing it invalidates every deployed token's key).
pub const KEY_CONTEXT: &str = "fastsync 2026-11-24 shared-token authentication v1";
/// Domain separation for the handshake transcript hash that both proofs and the session keys cover.
pub const TRANSCRIPT_CONTEXT: &str = "fastsync 2026-11-24 handshake transcript v3";
/// Domain separation for the client-to-server session key.
pub const C2S_CONTEXT: &str = "fastsync session c2s v2";
/// Domain separation for the server-to-client session key.
pub const S2C_CONTEXT: &str = "fastsync session s2c v2";

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

/// The key both sides derive from the shared token (wiped when dropped).
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Key {
    pub fn from_token(token: &[u8]) -> Key {
        Key(blake3::derive_key(KEY_CONTEXT, token))
    }

    /// `BLAKE3-keyed(key, label || transcript hash)`: `label` is `"client"` or `"server"`.
    fn mac(&self, label: &[u8], transcript: &[u8; 32]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(label);
        h.update(transcript);
        h.finalize()
    }

    /// The session keys `(client to server, server to client)`:
    /// `BLAKE3-derive_key(C2S_CONTEXT or S2C_CONTEXT, key || X25519 shared secret || transcript hash)`. Without the
    /// shared secret, which only the two ephemeral secrets give, the token's key and the transcript (all that a
    /// recording and a stolen token give) do not make them.
    fn session_keys(&self, shared: &[u8; 32], transcript: &[u8; 32]) -> (Zeroizing<[u8; 32]>, Zeroizing<[u8; 32]>) {
        let mut material = Zeroizing::new([0u8; 96]);
        material[..32].copy_from_slice(&self.0);
        material[32..64].copy_from_slice(shared);
        material[64..].copy_from_slice(transcript);
        (
            Zeroizing::new(blake3::derive_key(C2S_CONTEXT, &material[..])),
            Zeroizing::new(blake3::derive_key(S2C_CONTEXT, &material[..])),
        )
    }
}

/// The handshake as one side saw it: the frames (length prefix and body) of `Hello`, `Challenge` and, when
/// encryption was settled, the server's then the client's `KeyShare`, hashed with `BLAKE3-derive_key`
/// ([`TRANSCRIPT_CONTEXT`]). A received message is added as re-encoded, which gives back its bytes exactly: these
/// messages have only fixed-size fields and their decoding is strict.
struct Transcript(blake3::Hasher);

impl Transcript {
    fn new() -> Transcript {
        Transcript(blake3::Hasher::new_derive_key(TRANSCRIPT_CONTEXT))
    }

    fn add(&mut self, msg: &Msg) {
        let body = msg.encode_body();
        self.0.update(&(body.len() as u32).to_le_bytes());
        self.0.update(&body);
    }

    fn hash(&self) -> [u8; 32] {
        *self.0.finalize().as_bytes()
    }
}

/// Write `msgs` as frames in one write, so that the second never waits behind the first (Nagle) and the peer reads
/// them together.
fn write_frames<S: Write>(stream: &mut S, msgs: &[&Msg]) -> Result<(), WireError> {
    let mut frames = Vec::with_capacity(160);
    for m in msgs {
        write_msg(&mut frames, m)?;
    }
    stream.write_all(&frames)?;
    stream.flush()?;
    Ok(())
}

/// A fresh ephemeral X25519 secret from the OS RNG, used for this connection only, and the `KeyShare` carrying its
/// public key.
fn ephemeral() -> (EphemeralSecret, Msg) {
    let secret = EphemeralSecret::random();
    let public = PublicKey::from(&secret);
    (secret, Msg::KeyShare { public: public.to_bytes() })
}

/// The X25519 shared secret with the peer's public key (the secret is consumed and wiped). A low-order public key
/// makes it all zeros, the same whatever our secret: refused.
fn agree(secret: EphemeralSecret, theirs: [u8; 32]) -> Result<SharedSecret, AuthError> {
    let shared = secret.diffie_hellman(&PublicKey::from(theirs));
    if !shared.was_contributory() {
        return Err(AuthError::LowOrderKey);
    }
    Ok(shared)
}

/// Where the token comes from: `--token-file FILE`, else the `FASTSYNC_TOKEN` variable. Trailing newlines of the
/// file are ignored; an empty token is refused. `None`: no token given anywhere.
pub fn load_token(token_file: Option<&Path>, env: Option<std::ffi::OsString>) -> Result<Option<Vec<u8>>, String> {
    use std::os::unix::ffi::OsStringExt;
    let (token, from) = match (token_file, env) {
        (Some(path), _) => {
            let t = std::fs::read(path).map_err(|e| format!("cannot read token file '{}': {e}", path.shown()))?;
            (t, format!("token file '{}'", path.shown()))
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
    #[error(
        "protocol error during authentication: the peer's ephemeral key is a low-order X25519 point (the shared \
         secret would be all zeros, whatever our own key); refusing the connection"
    )]
    LowOrderKey,
}

/// The message a client that does not ask for encryption gets from `serve --require-encrypt`.
pub const NEEDS_ENCRYPTION_MESSAGE: &str =
    "this server requires encryption (serve --require-encrypt): run the client with --encrypt";

/// The session both sides settle on, seen from the client (`is_client`) or the server. `shared` is there exactly
/// when encryption was settled.
fn session(
    key: &Key,
    is_client: bool,
    read_only: bool,
    agreed: u8,
    level: Option<u8>,
    shared: Option<SharedSecret>,
    transcript: &[u8; 32],
) -> Session {
    let compress = if agreed & challenge::COMPRESS != 0 { Some(level.unwrap_or(DEFAULT_LEVEL)) } else { None };
    let (send, recv) = match &shared {
        Some(shared) => {
            let (c2s, s2c) = key.session_keys(shared.as_bytes(), transcript);
            if is_client { (Some(*c2s), Some(*s2c)) } else { (Some(*s2c), Some(*c2s)) }
        }
        None => (None, None),
    };
    Session {
        read_only,
        encrypt: shared.is_some(),
        compress,
        send: Direction { key: send, level: compress },
        recv: Direction { key: recv, level: compress },
    }
}

/// Client side, asking for nothing (no encryption, no compression). Returns whether the server is read-only.
pub fn client<S: Read + Write>(stream: &mut S, key: &Key) -> Result<bool, AuthError> {
    client_with(stream, key, Wishes::default()).map(|s| s.read_only)
}

/// Client side. On success the caller switches to the record layer when [`Session::records`] says so.
pub fn client_with<S: Read + Write>(stream: &mut S, key: &Key, wishes: Wishes) -> Result<Session, AuthError> {
    let mut transcript = Transcript::new();
    let asked = wishes.flags();
    let hello = Msg::Hello { version: VERSION, nonce: nonce().map_err(WireError::Io)?, flags: asked };
    write_frames(stream, &[&hello])?;
    transcript.add(&hello);
    let challenge = read_msg(stream)?;
    let (read_only, agreed) = match challenge {
        Msg::Challenge { version, read_only, flags, .. } if version == VERSION => (read_only, flags),
        Msg::Challenge { version, .. } => return Err(AuthError::Version(version)),
        Msg::Error { code: code::VERSION, message } | Msg::Error { message, .. } => {
            return Err(AuthError::Refused(message));
        }
        _ => return Err(AuthError::Unexpected("message instead of the challenge")),
    };
    transcript.add(&challenge);
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
    // With encryption: the server's key share came with the challenge; ours goes with the proof.
    let (shared, share) = if wishes.encrypt {
        let theirs = read_msg(stream)?;
        let Msg::KeyShare { public } = theirs else {
            return Err(AuthError::Unexpected("message instead of the server's key share"));
        };
        transcript.add(&theirs);
        let (secret, share) = ephemeral();
        transcript.add(&share);
        (Some(agree(secret, public)?), Some(share))
    } else {
        (None, None)
    };
    let th = transcript.hash();
    let auth = Msg::Auth { mac: *key.mac(b"client", &th).as_bytes() };
    match &share {
        Some(share) => write_frames(stream, &[share, &auth])?,
        None => write_frames(stream, &[&auth])?,
    }
    match read_msg(stream)? {
        // blake3::Hash compares in constant time.
        Msg::AuthOk { mac } if key.mac(b"server", &th) == blake3::Hash::from_bytes(mac) => {
            Ok(session(key, true, read_only, agreed, wishes.compress, shared, &th))
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
    let hello = read_msg(stream)?;
    let asked = match hello {
        Msg::Hello { version, flags, .. } if version == VERSION => flags,
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
    let mut transcript = Transcript::new();
    transcript.add(&hello);
    let mine = nonce().map_err(WireError::Io)?;
    let challenge = Msg::Challenge { version: VERSION, nonce: mine, read_only: policy.read_only, flags: agreed };
    transcript.add(&challenge);
    // With encryption, our key share goes with the challenge and the client's comes with its proof.
    let shared = if wishes.encrypt {
        let (secret, share) = ephemeral();
        transcript.add(&share);
        write_frames(stream, &[&challenge, &share])?;
        let theirs = read_msg(stream)?;
        let Msg::KeyShare { public } = theirs else {
            return Err(AuthError::Unexpected("message instead of the client's key share"));
        };
        transcript.add(&theirs);
        match agree(secret, public) {
            Ok(shared) => Some(shared),
            Err(e) => {
                let message = "the client's key share is a low-order X25519 point; connection refused".to_string();
                let _ = write_msg(stream, &Msg::Error { code: code::PROTOCOL, message });
                return Err(e);
            }
        }
    } else {
        write_frames(stream, &[&challenge])?;
        None
    };
    let th = transcript.hash();
    match read_msg(stream)? {
        Msg::Auth { mac } if key.mac(b"client", &th) == blake3::Hash::from_bytes(mac) => {
            write_msg(stream, &Msg::AuthOk { mac: *key.mac(b"server", &th).as_bytes() })?;
            Ok(session(key, false, policy.read_only, agreed, wishes.compress, shared, &th))
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
    use crate::net::record::{RecordReader, RecordWriter};
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
        assert_eq!(*c2s, blake3::derive_key("fastsync session c2s v2", &material));
        assert_eq!(*s2c, blake3::derive_key("fastsync session s2c v2", &material));
        // Every input counts: another shared secret or another transcript, other keys.
        assert_ne!(*key.session_keys(&[3; 32], &[2; 32]).0, *c2s);
        assert_ne!(*key.session_keys(&[1; 32], &[3; 32]).0, *c2s);
        assert_ne!(*Key::from_token(b"u").session_keys(&[1; 32], &[2; 32]).0, *c2s);
    }

    #[test]
    fn keys_differ_between_connections_with_the_same_token() {
        let sealed = Wishes { encrypt: true, compress: None };
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (c, s) = negotiate(sealed, Policy::default());
            let (c, s) = (c.unwrap(), s.unwrap());
            assert_eq!((c.send.key, c.recv.key), (s.recv.key, s.send.key));
            seen.extend([c.send.key.unwrap(), c.recv.key.unwrap()]);
        }
        let mut distinct = seen.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), seen.len(), "every connection and direction has its own key");
    }

    /// The frames of a recording, decoded (a handshake is all frames).
    fn frames(mut wire: &[u8], n: usize) -> (Vec<Msg>, &[u8]) {
        let msgs = (0..n).map(|_| read_msg(&mut wire).unwrap()).collect();
        (msgs, wire)
    }

    #[test]
    fn a_recording_and_the_token_do_not_open_the_records() {
        // A sealed connection between two endpoints, every byte the client sent and received recorded.
        let token = b"the token that leaks later";
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || {
            let s = server_with(&mut b, &Key::from_token(token), Policy::default()).unwrap();
            // The server's first record: what it would send after AuthOk.
            let mut w = RecordWriter::new(Vec::new(), &s.send).unwrap();
            write_msg(&mut w, &Msg::Error { code: code::IO, message: "server secret".into() }).unwrap();
            (s, w.get_ref().clone())
        });
        let mut rec = Recorder::new(&mut a);
        let c = client_with(&mut rec, &Key::from_token(token), Wishes { encrypt: true, compress: None }).unwrap();
        let (s, s2c_record) = srv.join().unwrap();
        let mut w = RecordWriter::new(Vec::new(), &c.send).unwrap();
        let secret = Msg::Data { offset: 0, digest: [0; 32], bytes: b"the contents of a private file".to_vec() };
        write_msg(&mut w, &secret).unwrap();
        let c2s_record = w.get_ref().clone();
        // Sanity: the peers themselves open each other's records.
        assert_eq!(read_msg(&mut RecordReader::new(&c2s_record[..], &s.recv).unwrap()).unwrap(), secret);
        assert!(read_msg(&mut RecordReader::new(&s2c_record[..], &c.recv).unwrap()).is_ok());

        // Later the token leaks. The attacker has it and the recording, so the whole transcript and both MACs.
        let (sent, rest) = frames(&rec.written, 3);
        assert!(rest.is_empty());
        let (got, rest) = frames(&rec.read, 3);
        assert!(rest.is_empty());
        let (Msg::Hello { nonce: nc, .. }, Msg::KeyShare { public: client_public }, Msg::Auth { mac }) =
            (&sent[0], &sent[1], &sent[2])
        else {
            panic!("client sent {sent:?}")
        };
        let (Msg::Challenge { nonce: ns, .. }, Msg::KeyShare { public: server_public }) = (&got[0], &got[1]) else {
            panic!("server sent {got:?}")
        };
        assert_ne!(client_public, server_public);
        let leaked = Key::from_token(token);
        let mut t = Transcript::new();
        for m in [&sent[0], &got[0], &got[1], &sent[1]] {
            t.add(m);
        }
        let th = t.hash();
        // The attacker's transcript is the real one: it gives the client's recorded proof.
        assert_eq!(leaked.mac(b"client", &th), blake3::Hash::from_bytes(*mac));
        // What the attacker can derive without the shared secret: the keys of the old schedule (token key and
        // nonces), and the new schedule with anything public (or nothing) in the shared secret's place.
        let mut material = leaked.0.to_vec();
        material.extend_from_slice(nc);
        material.extend_from_slice(ns);
        let mut guesses = vec![(
            blake3::derive_key("fastsync session c2s v1", &material),
            blake3::derive_key("fastsync session s2c v1", &material),
        )];
        for stand_in in [[0u8; 32], *client_public, *server_public, *nc, *ns, th] {
            let (c2s, s2c) = leaked.session_keys(&stand_in, &th);
            guesses.push((*c2s, *s2c));
        }
        for (c2s, s2c) in guesses {
            for (key, record) in [(c2s, &c2s_record), (s2c, &s2c_record)] {
                let dir = Direction { key: Some(key), level: None };
                let err = read_msg(&mut RecordReader::new(&record[..], &dir).unwrap()).unwrap_err();
                assert!(err.to_string().contains("decryption failed"), "{err}");
            }
        }
    }

    /// A man in the middle who does not know the token relays a sealed handshake and puts his own ephemeral public
    /// key in place of the server's (`server_side`), of the client's (`client_side`), or both.
    fn substitute_key_shares(
        server_side: bool,
        client_side: bool,
    ) -> (Result<Session, AuthError>, Result<Session, AuthError>) {
        let (mut a, mut relay_c) = UnixStream::pair().unwrap();
        let (mut relay_s, mut b) = UnixStream::pair().unwrap();
        let srv = std::thread::spawn(move || server_with(&mut b, &Key::from_token(b"t"), Policy::default()));
        let relay = std::thread::spawn(move || {
            let mallory = |m: Msg, swap: bool| if swap { ephemeral().1 } else { m };
            let hello = read_msg(&mut relay_c).unwrap();
            write_msg(&mut relay_s, &hello).unwrap();
            let challenge = read_msg(&mut relay_s).unwrap();
            let share = read_msg(&mut relay_s).unwrap();
            assert!(matches!(share, Msg::KeyShare { .. }));
            write_frames(&mut relay_c, &[&challenge, &mallory(share, server_side)]).unwrap();
            let Ok(share) = read_msg(&mut relay_c) else { return };
            let auth = read_msg(&mut relay_c).unwrap();
            write_frames(&mut relay_s, &[&mallory(share, client_side), &auth]).unwrap();
            if let Ok(answer) = read_msg(&mut relay_s) {
                let _ = write_msg(&mut relay_c, &answer);
            }
        });
        let c = client_with(&mut a, &Key::from_token(b"t"), Wishes { encrypt: true, compress: None });
        drop(a);
        relay.join().unwrap();
        (c, srv.join().unwrap())
    }

    #[test]
    fn a_man_in_the_middle_who_substitutes_a_key_share_fails_the_handshake() {
        // Sanity: the relay itself is transparent.
        let (c, s) = substitute_key_shares(false, false);
        assert_eq!(c.unwrap().send.key, s.unwrap().recv.key);
        for (server_side, client_side) in [(true, false), (false, true), (true, true)] {
            let (c, s) = substitute_key_shares(server_side, client_side);
            assert!(matches!(c, Err(AuthError::Rejected)), "{server_side} {client_side}: {c:?}");
            assert!(matches!(s, Err(AuthError::BadClient)), "{server_side} {client_side}: {s:?}");
        }
    }

    /// The low-order points of Curve25519 (and non-canonical encodings of them), as u-coordinates.
    fn low_order_points() -> Vec<[u8; 32]> {
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..64).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
            v.try_into().unwrap()
        };
        let mut one = [0u8; 32];
        one[0] = 1;
        vec![
            [0; 32],
            one,
            hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            hex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
            hex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ]
    }

    #[test]
    fn a_low_order_key_share_is_refused_on_both_sides() {
        for point in low_order_points() {
            // A server that sends one: the client refuses before proving anything.
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let fake_server = std::thread::spawn(move || {
                let _ = read_msg(&mut b);
                let challenge =
                    Msg::Challenge { version: VERSION, nonce: [5; 32], read_only: false, flags: challenge::ENCRYPT };
                write_frames(&mut b, &[&challenge, &Msg::KeyShare { public: point }]).unwrap();
                read_msg(&mut b).is_err()
            });
            let c = client_with(&mut a, &Key::from_token(b"t"), Wishes { encrypt: true, compress: None });
            assert!(matches!(c, Err(AuthError::LowOrderKey)), "{point:02x?}: {c:?}");
            drop(a);
            assert!(fake_server.join().unwrap(), "the client sent nothing after the bad key share");
            // A client that sends one: the server refuses and says why.
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let srv = std::thread::spawn(move || server_with(&mut b, &Key::from_token(b"t"), Policy::default()));
            let flags = Wishes { encrypt: true, compress: None }.flags();
            write_msg(&mut a, &Msg::Hello { version: VERSION, nonce: [6; 32], flags }).unwrap();
            assert!(matches!(read_msg(&mut a).unwrap(), Msg::Challenge { .. }));
            assert!(matches!(read_msg(&mut a).unwrap(), Msg::KeyShare { .. }));
            write_frames(&mut a, &[&Msg::KeyShare { public: point }, &Msg::Auth { mac: [0; 32] }]).unwrap();
            let answer = read_msg(&mut a).unwrap();
            assert!(
                matches!(&answer, Msg::Error { code: code::PROTOCOL, message } if message.contains("low-order")),
                "{answer:?}"
            );
            assert!(matches!(srv.join().unwrap(), Err(AuthError::LowOrderKey)));
        }
        // And a genuine public key goes through `agree`.
        let (_, Msg::KeyShare { public }) = ephemeral() else { unreachable!() };
        assert!(agree(ephemeral().0, public).is_ok());
    }

    #[test]
    fn a_plain_connection_does_no_key_agreement() {
        for wishes in [Wishes::default(), Wishes { encrypt: false, compress: Some(3) }] {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let srv = std::thread::spawn(move || server_with(&mut b, &Key::from_token(b"t"), Policy::default()));
            let mut rec = Recorder::new(&mut a);
            let c = client_with(&mut rec, &Key::from_token(b"t"), wishes).unwrap();
            assert!(!c.encrypt && c.send.key.is_none() && c.recv.key.is_none());
            srv.join().unwrap().unwrap();
            let (sent, rest) = frames(&rec.written, 2);
            assert!(rest.is_empty() && matches!(sent[..], [Msg::Hello { .. }, Msg::Auth { .. }]), "{sent:?}");
            let (got, rest) = frames(&rec.read, 2);
            assert!(rest.is_empty() && matches!(got[..], [Msg::Challenge { .. }, Msg::AuthOk { .. }]), "{got:?}");
        }
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
            // Claim encryption was agreed, with a key share of the relay's own, so the client goes on.
            let flags = challenge::ENCRYPT;
            let forged = Msg::Challenge { version, nonce, read_only, flags };
            write_frames(&mut relay_c, &[&forged, &ephemeral().1]).unwrap();
            assert!(matches!(read_msg(&mut relay_c).unwrap(), Msg::KeyShare { .. }));
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
        for wishes in [Wishes::default(), Wishes { encrypt: true, compress: Some(3) }] {
            let (mut a, mut b) = UnixStream::pair().unwrap();
            let srv = std::thread::spawn(move || server_with(&mut b, &Key::from_token(token), Policy::default()));
            let mut rec = Recorder::new(&mut a);
            client_with(&mut rec, &Key::from_token(token), wishes).unwrap();
            srv.join().unwrap().unwrap();
            assert!(rec.written.len() > 40 && rec.read.len() > 40);
            for seen in [&rec.written, &rec.read] {
                assert!(!seen.windows(token.len()).any(|w| w == token));
            }
        }
    }

    /// A stream that keeps what went each way.
    struct Recorder<'a> {
        inner: &'a mut UnixStream,
        read: Vec<u8>,
        written: Vec<u8>,
    }
    impl<'a> Recorder<'a> {
        fn new(inner: &'a mut UnixStream) -> Recorder<'a> {
            Recorder { inner, read: Vec::new(), written: Vec::new() }
        }
    }
    impl Read for Recorder<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }
    impl Write for Recorder<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
}
