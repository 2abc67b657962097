//! `--encrypt` and `--compress` against a real `fastsync serve` on 127.0.0.1:0: trees and multi-chunk files go both
//! ways in every mode, `serve --require-encrypt` refuses clear clients, and a relay between client and server records
//! the bytes on the wire to check what an observer sees (nothing of the data with `--encrypt`; far fewer bytes for
//! compressible data with `--compress`).

#[macro_use]
#[allow(unused_macros)] // both_engines: these cases run no engine
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::lan::*;
use common::*;

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

/// A TCP relay in front of `to`: every byte in both directions is recorded. Returns its port.
fn relay(to: String, seen: Arc<Mutex<Vec<u8>>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(&to) else { return };
            for (mut from, mut into) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server.try_clone().unwrap(), client.try_clone().unwrap()),
            ] {
                let seen = Arc::clone(&seen);
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
