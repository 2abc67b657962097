//! `--encrypt` and `--compress` against a real `fastsync serve` on 127.0.0.1:0: trees and multi-chunk files go both
//! ways in every mode, `serve --require-encrypt` refuses clear clients, and a relay between client and server records
//! the bytes on the wire to check what an observer sees (nothing of the data with `--encrypt`; far fewer bytes for
//! compressible data with `--compress`; with `--encrypt`, a recording of the session and the token, leaked later, still
//! do not open the records).

#[macro_use]
#[allow(unused_macros)] // both_engines: these cases run no engine
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::lan::*;
use common::*;
use fastsync::net::auth;
use fastsync::net::record::{Direction, RecordReader};
use fastsync::net::wire::{self, Msg};

/// Four chunks and a bit: every transfer of it is cut into several `Data`/`PutData` frames (and records).
const BIG: u64 = (4 << 22) + 12_345;

/// The small tree plus a multi-chunk file of random bytes and a multi-chunk text file.
fn tree(root: &Path) {
    build_small_tree(root);
    write_big_file(&root.join("big.bin"), 7, BIG);
    write_file(&root.join("sub/log.txt"), &text(BIG as usize));
    chmod(&root.join("big.bin"), 0o640);
    stamp_dir_times(root, 1_200_000_000);
}

/// Compressible bytes with a marker an observer could look for.
fn text(len: usize) -> Vec<u8> {
    let line = b"2026-11-24 12:00:00 INFO fastsync moved TOP-SECRET-PAYLOAD-7f3a to the backup host\n";
    line.iter().copied().cycle().take(len).collect()
}

#[test]
fn trees_and_multi_chunk_files_go_both_ways_in_every_mode() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    tree(&src);
    for (i, mode) in [&["--encrypt"][..], &["--compress"], &["--encrypt", "--compress=9"]].iter().enumerate() {
        let remote = format!("m{i}");
        c.cmd().args(*mode).args(["copy", "--streams", "3"]).arg(&src).arg(srv.url(&remote)).run().assert_success();
        compare_trees(&src, &srv.root.join(&remote), CompareOpts::default());
        let back = c.path(&format!("back{i}"));
        c.cmd().args(*mode).arg("copy").arg(srv.url(&remote)).arg(&back).run().assert_success();
        compare_trees(&src, &back, CompareOpts::default());
        // A no-op sync and a listing go through the same layer.
        let out = c.cmd().args(*mode).args(["sync", "--json"]).arg(&src).arg(srv.url(&remote)).run();
        out.assert_success();
        let s = json_summary(&out);
        assert_eq!((s["files"].as_u64(), s["bytes"].as_u64()), (Some(0), Some(0)), "{mode:?}: {s}");
        let local = fastsync().args(["list", "-R"]).arg(&src).run();
        let net = c.cmd().args(*mode).args(["list", "-R"]).arg(srv.url(&remote)).run();
        net.assert_success();
        assert_eq!(net.stdout_str(), local.stdout_str(), "list {mode:?}");
    }
}

#[test]
fn a_server_that_requires_encryption_refuses_clear_clients() {
    let c = Case::new();
    let srv = Server::start_with(&c.path("served"), &c.token, &["--require-encrypt", "--no-compress"]);
    let src = c.path("src");
    build_small_tree(&src);
    for cmd in [c.cmd().arg("copy").arg(&src).arg(srv.url("t")), c.cmd().arg("list").arg(srv.url(""))] {
        let out = cmd.run();
        out.assert_code(1);
        let err = out.stderr_str();
        assert!(err.contains("requires encryption") && err.contains("--encrypt"), "{err}");
    }
    assert!(!srv.root.join("t").exists());
    // --compress is declined, not refused: the transfer goes on uncompressed.
    c.cmd().args(["--encrypt", "--compress"]).arg("copy").arg(&src).arg(srv.url("t")).run().assert_success();
    compare_trees(&src, &srv.root.join("t"), CompareOpts::default());
}

#[test]
fn client_options_are_refused_by_serve_and_levels_are_checked() {
    let c = Case::new();
    let out = c.cmd().args(["--encrypt", "serve"]).arg(c.path("served")).run();
    out.assert_code(2);
    assert!(out.stderr_str().contains("--require-encrypt"), "{}", out.stderr_str());
    for bad in ["--compress=0", "--compress=20", "--compress=x"] {
        c.cmd().args([bad, "list", "fastsync://127.0.0.1:1/"]).run().assert_code(2);
    }
}

/// Where a relay records the bytes that cross it.
type Tape = Arc<Mutex<Vec<u8>>>;

/// A TCP relay in front of `to`: every byte in both directions is recorded. Returns its port.
fn relay(to: String, seen: Tape) -> u16 {
    relay_with(to, move || (Arc::clone(&seen), Arc::clone(&seen)))
}

/// A TCP relay in front of `to`; `tapes` says, for each new connection, where to record what the client sends and
/// what the server sends. Returns its port.
fn relay_with(to: String, tapes: impl Fn() -> (Tape, Tape) + Send + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&to) else { return };
            let (up, down) = tapes();
            for (mut from, mut into, seen) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap(), up),
                (server.try_clone().unwrap(), client.try_clone().unwrap(), down),
            ] {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                seen.lock().unwrap().extend_from_slice(&buf[..n]);
                                if into.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = into.shutdown(Shutdown::Write);
                });
            }
        }
    });
    port
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Push `src` through a recording relay with `mode`, then pull it back the same way; the bytes seen on the wire.
fn through_relay(c: &Case, srv: &Server, src: &Path, mode: &[&str], name: &str) -> Vec<u8> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let port = relay(srv.addr(), Arc::clone(&seen));
    let url = format!("fastsync://127.0.0.1:{port}/{name}");
    c.cmd().args(mode).arg("copy").arg(src).arg(&url).run().assert_success();
    compare_trees(src, &srv.root.join(name), CompareOpts::default());
    let back = c.path(&format!("{name}-back"));
    c.cmd().args(mode).arg("copy").arg(&url).arg(&back).run().assert_success();
    compare_trees(src, &back, CompareOpts::default());
    std::mem::take(&mut *seen.lock().unwrap())
}

#[test]
fn an_observer_sees_nothing_of_the_data_with_encrypt() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    mkdirs(&src);
    let random = random_bytes(3, 100_000);
    write_file(&src.join("secret-name-of-a-file.txt"), &text(200_000));
    write_file(&src.join("random.bin"), &random);
    let probes: [&[u8]; 4] =
        [b"TOP-SECRET-PAYLOAD-7f3a", b"secret-name-of-a-file", &random[5000..5032], &random[90_000..90_032]];

    // Sanity: in clear, an observer sees it all (so the check below is not vacuous).
    let clear = through_relay(&c, &srv, &src, &[], "clear");
    for p in probes {
        assert!(contains(&clear, p), "{:?} not seen in clear", String::from_utf8_lossy(p));
    }
    for mode in [&["--encrypt"][..], &["--encrypt", "--compress"]] {
        let sealed = through_relay(&c, &srv, &src, mode, &format!("sealed{}", mode.len()));
        assert!(sealed.len() > 100_000, "{mode:?}: the data did cross ({} bytes)", sealed.len());
        for p in probes {
            assert!(!contains(&sealed, p), "{mode:?}: {:?} seen on the wire", String::from_utf8_lossy(p));
        }
    }
}

#[test]
fn compress_moves_far_fewer_bytes_for_compressible_data() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    mkdirs(&src);
    write_file(&src.join("log.txt"), &text(BIG as usize));
    let clear = through_relay(&c, &srv, &src, &[], "clear").len();
    let squeezed = through_relay(&c, &srv, &src, &["--compress"], "squeezed").len();
    let both = through_relay(&c, &srv, &src, &["--compress=19", "--encrypt"], "both").len();
    assert!(clear > 2 * BIG as usize, "both ways: {clear}");
    assert!(squeezed * 20 < clear, "--compress: {squeezed} bytes on the wire, {clear} without");
    assert!(both * 20 < clear, "--compress --encrypt: {both} bytes on the wire, {clear} without");
    // Incompressible data costs (almost) nothing extra.
    let noise = c.path("noise");
    mkdirs(&noise);
    write_file(&noise.join("n.bin"), &random_bytes(9, BIG as usize)); // not write_big_file: its blocks repeat
    let clear = through_relay(&c, &srv, &noise, &[], "n-clear").len();
    let squeezed = through_relay(&c, &srv, &noise, &["--compress"], "n-squeezed").len();
    assert!(squeezed < clear + clear / 100, "{squeezed} vs {clear}");
}

/// The first record on a tape after the handshake, if the tape holds all of it.
fn first_record(rest: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().unwrap()) as usize;
    rest.get(..4 + len)
}

#[test]
fn a_recording_of_an_encrypted_session_and_the_token_do_not_decrypt_it() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    mkdirs(&src);
    write_file(&src.join("private.txt"), &text(50_000));
    let conns: Arc<Mutex<Vec<(Tape, Tape)>>> = Arc::default();
    let port = relay_with(srv.addr(), {
        let conns = Arc::clone(&conns);
        move || {
            let tapes = (Tape::default(), Tape::default());
            conns.lock().unwrap().push(tapes.clone());
            tapes
        }
    });
    let url = format!("fastsync://127.0.0.1:{port}/pushed");
    c.cmd().args(["--encrypt", "copy"]).arg(&src).arg(&url).run().assert_success();
    compare_trees(&src, &srv.root.join("pushed"), CompareOpts::default());

    // Later the token leaks. Its holder has the recording of every connection, so every frame of each handshake.
    let token = std::fs::read(&c.token).unwrap();
    let key = blake3::derive_key(auth::KEY_CONTEXT, token.trim_ascii_end());
    let mac = |label: &[u8], th: &[u8; 32]| {
        let mut h = blake3::Hasher::new_keyed(&key);
        h.update(label);
        h.update(th);
        *h.finalize().as_bytes()
    };
    let (mut publics, mut records_tried) = (Vec::new(), 0);
    for (up, down) in conns.lock().unwrap().iter() {
        let (up, down) = (up.lock().unwrap().clone(), down.lock().unwrap().clone());
        let (mut u, mut d) = (&up[..], &down[..]);
        let hello = wire::read_msg(&mut u).unwrap();
        let client_share = wire::read_msg(&mut u).unwrap();
        let auth = wire::read_msg(&mut u).unwrap();
        let challenge = wire::read_msg(&mut d).unwrap();
        let server_share = wire::read_msg(&mut d).unwrap();
        let auth_ok = wire::read_msg(&mut d).unwrap();
        let (
            Msg::Hello { nonce: nc, .. },
            Msg::Challenge { nonce: ns, .. },
            Msg::KeyShare { public: cp },
            Msg::KeyShare { public: sp },
            Msg::Auth { mac: client_mac },
            Msg::AuthOk { mac: server_mac },
        ) = (&hello, &challenge, &client_share, &server_share, &auth, &auth_ok)
        else {
            panic!("not a sealed handshake: {hello:?} {challenge:?} {client_share:?} {server_share:?}")
        };
        publics.extend([*cp, *sp]);
        let mut t = blake3::Hasher::new_derive_key(auth::TRANSCRIPT_CONTEXT);
        for m in [&hello, &challenge, &server_share, &client_share] {
            let mut frame = Vec::new();
            wire::write_msg(&mut frame, m).unwrap();
            t.update(&frame);
        }
        let th = *t.finalize().as_bytes();
        // The reconstruction is exact: it gives both recorded proofs.
        assert_eq!((mac(b"client", &th), mac(b"server", &th)), (*client_mac, *server_mac));
        // Keys from all of that without the X25519 shared secret: the old schedule (token key and both nonces),
        // and the new one with a public value, or zeros, in the secret's place.
        let with = |ctx: &str, parts: &[&[u8]]| blake3::derive_key(ctx, &parts.concat());
        let mut guesses =
            vec![with("fastsync session c2s v1", &[&key, nc, ns]), with("fastsync session s2c v1", &[&key, nc, ns])];
        for stand_in in [&[0u8; 32], cp, sp, nc, ns] {
            guesses.push(with(auth::C2S_CONTEXT, &[&key, stand_in, &th]));
            guesses.push(with(auth::S2C_CONTEXT, &[&key, stand_in, &th]));
        }
        for record in [first_record(u), first_record(d)].into_iter().flatten() {
            records_tried += 1;
            for guess in &guesses {
                let dir = Direction { key: Some(*guess), level: None };
                let err = wire::read_msg(&mut RecordReader::new(record, &dir).unwrap()).unwrap_err().to_string();
                assert!(err.contains("decryption failed"), "{err}");
            }
        }
    }
    assert!(records_tried >= 2, "at least one request and one answer were tried ({records_tried})");
    let n = publics.len();
    publics.sort();
    publics.dedup();
    assert_eq!(publics.len(), n, "a fresh ephemeral key on every connection, on both sides");
}
