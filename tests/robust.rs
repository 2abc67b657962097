//! LAN transfers over a bad stream: a real `fastsync serve` behind a TCP proxy (tests/common/proxy.rs) that resets
//! or stalls data connections once they have carried some bytes. A broken stream is dialled again and the request in
//! flight retried, so the run still ends exact (BLAKE3 of both files, computed here); one that keeps breaking makes
//! the run stop with one line naming the file, and nothing partial under a final name. The net transfers use no
//! engine, so these cases run once, not on both engines.

#[macro_use]
#[allow(unused_macros)] // both_engines: these cases run no engine
mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::lan::*;
use common::proxy::{Fault, Plan, Proxy};
use common::*;
use fastsync::net::wire::{self, Msg};

const MIB: u64 = 1 << 20;
/// The size of the large file: four ranges of 12, 12, 12 and 4 MiB over four streams, and a ragged end.
const BIG_BYTES: u64 = 40 * MIB + 12_345;
/// The I/O timeout (`FASTSYNC_IO_TIMEOUT`, whole seconds) of the cases that stall a connection: short, but long
/// enough that a busy debug build on two cores does not look stalled.
const STALL_TIMEOUT_SECS: &str = "2";
/// The I/O timeout of the cases that reset connections: only the resets may break anything there.
const RESET_TIMEOUT_SECS: &str = "20";

fn once(fault: Fault, after_bytes: u64) -> Plan {
    Plan::new(fault, after_bytes, 1)
}

fn always(fault: Fault, after_bytes: u64) -> Plan {
    Plan::new(fault, after_bytes, usize::MAX)
}

/// The bytes of `msg` on the wire (a plain connection: a length prefix and the body).
fn frame_bytes(msg: &Msg) -> u64 {
    msg.encode_body().len() as u64 + 4
}

/// What a server sends during a plain handshake.
fn handshake_down_bytes() -> u64 {
    frame_bytes(&Msg::Challenge { version: wire::VERSION, nonce: [0; 32], read_only: false, flags: 0 })
        + frame_bytes(&Msg::AuthOk { mac: [0; 32] })
}

/// Break only the first data connection (the control connection is dialled first), counting what the server sends.
fn before_answer(down_bytes: u64) -> Plan {
    Plan { only_connection: Some(2), down_only: true, ..once(Fault::Reset, down_bytes) }
}

/// The warning lines, and the other lines, of stderr.
fn split_stderr(out: &Output) -> (Vec<String>, Vec<String>) {
    out.stderr_lines().into_iter().partition(|l| l.starts_with("fastsync: warning: "))
}

/// `copy [EXTRA] SRC DST` (four streams unless EXTRA says otherwise) with I/O timeout `timeout_secs`, timed.
fn copy_via(
    c: &Case,
    timeout_secs: &str,
    extra: &[&str],
    src: impl AsRef<std::ffi::OsStr>,
    dst: impl AsRef<std::ffi::OsStr>,
) -> (Output, Duration) {
    let started = Instant::now();
    let out = c
        .cmd()
        .arg("copy")
        .args(extra)
        .arg(src)
        .arg(dst)
        .env("FASTSYNC_IO_TIMEOUT", timeout_secs)
        .timeout(Duration::from_secs(60))
        .run();
    (out, started.elapsed())
}

fn big_source(c: &Case) -> std::path::PathBuf {
    let big = c.path("src/big.bin");
    mkdirs(&c.path("src"));
    write_big_file(&big, 0xBAD5, BIG_BYTES);
    set_times(&big, 1_500_000_000, 7);
    big
}

/// The run succeeded with warnings only, each naming the server (the proxy) and the file, and saying what was done.
fn assert_recovered(out: &Output, proxy: &Proxy, file: &str, cause: &str) {
    out.assert_success();
    let (warnings, others) = split_stderr(out);
    out.check(others.is_empty(), "nothing but warnings on stderr");
    out.check(!warnings.is_empty(), "the broken stream is reported");
    for w in &warnings {
        out.check(w.contains(&proxy.addr()), "a warning names the server");
        out.check(w.contains(&proxy.url(file)), "a warning names the file");
        out.check(w.contains("reconnected, trying again (attempt 2 of 3)"), "a warning says what happens next");
    }
    out.check(warnings.iter().any(|w| w.contains(cause)), &format!("a warning gives the cause ({cause})"));
}

#[test]
fn a_stream_reset_mid_push_is_dialled_again_and_only_the_chunk_in_flight_is_sent_again() {
    let c = Case::new();
    let srv = c.serve();
    // Inside the third 4 MiB chunk of a 12 MiB range: two chunks acknowledged, one in flight.
    let proxy = Proxy::start(&srv.addr(), once(Fault::Reset, 9 * MIB));
    let big = big_source(&c);
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &[], &big, proxy.url("in/"));
    assert_eq!(proxy.faults(), 1, "one connection was reset");
    assert_recovered(&out, &proxy, "in/big.bin", "lost");
    let pushed = srv.root.join("in/big.bin");
    assert_eq!(digest(&pushed), digest(&big));
    assert_eq!(entry_of(&pushed).mtime, (1_500_000_000, 7));
    assert_no_tmp(&srv.root);
    // The cut chunk (at most 4 MiB) went again, not the 8 MiB acknowledged before it on that connection.
    let extra = proxy.up_bytes() - BIG_BYTES;
    assert!(extra < 5 * MIB, "{extra} bytes more than the file were sent: more than the chunk in flight");
}

#[test]
fn a_stream_reset_mid_pull_resumes_at_the_first_byte_not_received() {
    let c = Case::new();
    let srv = c.serve();
    let big = srv.root.join("big.bin");
    write_big_file(&big, 0xBAD6, BIG_BYTES);
    set_times(&big, 1_500_000_000, 7);
    let proxy = Proxy::start(&srv.addr(), once(Fault::Reset, 3 * MIB / 2));
    let dst = c.path("dst");
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &[], proxy.url("big.bin"), &dst);
    assert_eq!(proxy.faults(), 1, "one connection was reset");
    assert_recovered(&out, &proxy, "big.bin", "lost");
    assert_eq!(digest(&dst), digest(&big));
    assert_eq!(entry_of(&dst).mtime, (1_500_000_000, 7));
    assert_no_tmp(&c.path(""));
    // Only the 1 MiB chunk being received when it broke was fetched again, not the range from its start.
    let extra = proxy.down_bytes() - BIG_BYTES;
    assert!(extra < 2 * MIB, "{extra} bytes more than the file were received: more than the chunk in flight");
}

#[test]
fn a_push_whose_last_answer_is_lost_is_found_in_place_and_not_sent_again() {
    let c = Case::new();
    let srv = c.serve();
    // One stream, two chunks (over 1 MiB: step by step); the reset comes after the server has renamed the file into
    // place, before the client has its answer: the handshake, PutBegin's and both chunks' Ok got through.
    let ok = frame_bytes(&Msg::Ok);
    let proxy = Proxy::start(&srv.addr(), before_answer(handshake_down_bytes() + 3 * ok));
    let size = 6 * MIB + 5;
    let src = c.path("src/f.bin");
    mkdirs(&c.path("src"));
    write_big_file(&src, 0xBAD9, size);
    set_times(&src, 1_500_000_000, 9);
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["--streams", "1"], &src, proxy.url("in/"));
    assert_eq!(proxy.faults(), 1, "the data connection was reset");
    assert_recovered(&out, &proxy, "in/f.bin", "(its last step: metadata and rename)");
    let pushed = srv.root.join("in/f.bin");
    assert_eq!(digest(&pushed), digest(&src));
    assert_eq!(entry_of(&pushed).mtime, (1_500_000_000, 9));
    assert!(proxy.up_bytes() < size + MIB, "the file was sent again: {} bytes", proxy.up_bytes());
    assert_no_tmp(&srv.root);
}

#[test]
fn a_pull_that_lost_only_its_data_end_asks_only_for_the_end() {
    let c = Case::new();
    let srv = c.serve();
    // One stream, one Get answered by three Data frames (1 MiB, 1 MiB, 7 bytes): all of them get through, then the
    // reset, before DataEnd.
    let data = |n: u64| frame_bytes(&Msg::Data { offset: 0, digest: [0; 32], bytes: vec![0; n as usize] });
    let proxy = Proxy::start(&srv.addr(), before_answer(handshake_down_bytes() + 2 * data(MIB) + data(7)));
    let size = 2 * MIB + 7;
    let remote = srv.root.join("f.bin");
    write_big_file(&remote, 0xBADA, size);
    let dst = c.path("dst/f.bin");
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["--streams", "1"], proxy.url("f.bin"), &dst);
    assert_eq!(proxy.faults(), 1, "the data connection was reset");
    assert_recovered(&out, &proxy, "f.bin", "lost");
    assert_eq!(digest(&dst), digest(&remote));
    let again = proxy.down_bytes() - size;
    assert!(again < 64 << 10, "{again} bytes more than the file were received: data was fetched again");
    assert_no_tmp(&c.path("dst"));
}

#[test]
fn quiet_runs_do_not_warn_about_a_replaced_stream() {
    let c = Case::new();
    let srv = c.serve();
    let proxy = Proxy::start(&srv.addr(), once(Fault::Reset, 3 * MIB));
    let big = big_source(&c);
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["-q"], &big, proxy.url("in/"));
    assert_eq!(proxy.faults(), 1, "one connection was reset");
    out.assert_success();
    out.check(out.stderr_lines().is_empty(), "-q: no warning");
    assert_eq!(digest(&srv.root.join("in/big.bin")), digest(&big));
}

#[test]
fn an_encrypted_stream_is_replaced_by_a_new_encrypted_one() {
    let c = Case::new();
    let srv = Server::start_with(&c.path("served"), &c.token, &["--require-encrypt"]);
    // Smaller than the others (sealing is slow in a debug build): two ranges of 4 MiB, one reset inside one.
    let proxy = Proxy::start(&srv.addr(), once(Fault::Reset, 3 * MIB / 2));
    let big = c.path("src/big.bin");
    mkdirs(&c.path("src"));
    write_big_file(&big, 0xBAD8, 8 * MIB + 99);
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["--encrypt"], &big, proxy.url("in/"));
    assert_eq!(proxy.faults(), 1, "one connection was reset");
    assert_recovered(&out, &proxy, "in/big.bin", "lost");
    assert_eq!(digest(&srv.root.join("in/big.bin")), digest(&big));
}

#[test]
fn a_stalled_stream_is_detected_and_its_request_retried_both_ways() {
    let c = Case::new();
    let srv = c.serve();
    let big = big_source(&c);
    for push in [true, false] {
        let proxy = Proxy::start(&srv.addr(), once(Fault::Stall, 5 * MIB));
        let (out, took) = if push {
            copy_via(&c, STALL_TIMEOUT_SECS, &[], &big, proxy.url("in/"))
        } else {
            copy_via(&c, STALL_TIMEOUT_SECS, &[], proxy.url("in/big.bin"), c.path("back/"))
        };
        let what = if push { "push" } else { "pull" };
        assert_eq!(proxy.faults(), 1, "{what}: one connection was stalled");
        assert_recovered(&out, &proxy, "in/big.bin", "stalled: no progress for 2 s (timed out)");
        assert!(took < Duration::from_secs(20), "{what}: the stall was noticed within the I/O timeout ({took:?})");
        let copy = if push { srv.root.join("in/big.bin") } else { c.path("back/big.bin") };
        assert_eq!(digest(&copy), digest(&big), "{what}");
    }
    assert_no_tmp(&c.path("back"));
}

#[test]
fn a_tree_of_small_files_survives_a_reset_both_ways() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    // Small files go whole, in one round trip each (push) or one Get each (pull).
    for i in 0..240u64 {
        let p = src.join(format!("d{}/f{i:03}.bin", i % 6));
        mkdirs(p.parent().unwrap());
        write_file(&p, &random_bytes(i, 40_000 + (i as usize * 97) % 9_000));
        set_times(&p, 1_400_000_000 + i as i64, 11);
    }
    stamp_dir_times(&src, 1_200_000_000);
    let proxy = Proxy::start(&srv.addr(), once(Fault::Reset, 2 * MIB));
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &[], &src, proxy.url("tree"));
    assert_eq!(proxy.faults(), 1, "push: one connection was reset");
    out.assert_success();
    let (warnings, others) = split_stderr(&out);
    assert!(others.is_empty() && warnings.len() == 1, "{:?}", out.stderr_lines());
    compare_trees(&src, &srv.root.join("tree"), CompareOpts::default());
    assert_no_tmp(&srv.root);

    let proxy = Proxy::start(&srv.addr(), once(Fault::Reset, 2 * MIB));
    let back = c.path("back");
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &[], proxy.url("tree"), &back);
    assert_eq!(proxy.faults(), 1, "pull: one connection was reset");
    out.assert_success();
    let (warnings, others) = split_stderr(&out);
    assert!(others.is_empty() && warnings.len() == 1, "{:?}", out.stderr_lines());
    compare_trees(&src, &back, CompareOpts::default());
    assert_no_tmp(&back);
}

/// Small files queued for a stream go in batches, all their requests before any answer is read: over one stream, 300
/// files take far fewer bursts of answers (push) or of requests (pull) than files (one round trip each took at least
/// 300), and arrive exact both ways.
#[test]
fn small_files_share_round_trips() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    for i in 0..300u64 {
        write_file(&src.join(format!("f{i:03}")), &random_bytes(i, 100 + i as usize));
    }
    stamp_dir_times(&src, 1_200_000_000);
    let proxy = Proxy::start(&srv.addr(), Plan::new(Fault::Reset, u64::MAX, 0));
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["--streams", "1"], &src, proxy.url("tree"));
    out.assert_success();
    compare_trees(&src, &srv.root.join("tree"), CompareOpts::default());
    assert_no_tmp(&srv.root);
    let bursts = proxy.down_reads();
    assert!(bursts < 100, "{bursts} bursts of answers for 300 small files: not batched");

    let proxy = Proxy::start(&srv.addr(), Plan::new(Fault::Reset, u64::MAX, 0));
    let back = c.path("back");
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["--streams", "1"], proxy.url("tree"), &back);
    out.assert_success();
    compare_trees(&src, &back, CompareOpts::default());
    assert_no_tmp(&back);
    let bursts = proxy.up_reads();
    assert!(bursts < 100, "{bursts} bursts of requests for 300 small files: not batched");

    // -X: every file's attributes are asked for in the same batch, right after its Get, and arrive with it.
    if !xattrs_supported(&src) {
        eprintln!("skipped the -X part: user xattrs not supported on the temp filesystem");
        return;
    }
    for i in (0..300u64).step_by(3) {
        lsetxattr(&src.join(format!("f{i:03}")), "user.n", i.to_string().as_bytes()).unwrap();
    }
    stamp_dir_times(&src, 1_200_000_000);
    let with = CompareOpts { xattrs: true, hardlinks: false };
    c.cmd().args(["copy", "-X", "--streams", "1"]).arg(&src).arg(srv.url("tree-x")).run().assert_success();
    compare_trees(&src, &srv.root.join("tree-x"), with);
    let proxy = Proxy::start(&srv.addr(), Plan::new(Fault::Reset, u64::MAX, 0));
    let back = c.path("back-x");
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["-X", "--streams", "1"], proxy.url("tree-x"), &back);
    out.assert_success();
    compare_trees(&src, &back, with);
    assert_no_tmp(&back);
    let bursts = proxy.up_reads();
    assert!(bursts < 100, "{bursts} bursts of requests for 300 small files with -X: not batched");
}

/// A push of many small directories: the first copy makes each directory's subdirectories in one burst; a no-op
/// `sync` sends no `Mkdir` for a directory the listing shows and reads the listings ahead on connections of their
/// own; the directories' `SetMeta`s go out together — about one answer burst per directory in all for the no-op
/// (three before: listing, `Mkdir`, `SetMeta`, each waited for in turn).
#[test]
fn a_no_op_sync_push_does_not_wait_on_each_directory() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    for d in 0..12 {
        for s in 0..5 {
            for f in 0..3u64 {
                write_file(&src.join(format!("d{d:02}/s{s}/f{f}")), &random_bytes(f, 10 + f as usize));
            }
        }
    }
    stamp_dir_times(&src, 1_200_000_000);
    let dirs = 1 + 12 + 12 * 5;
    // The first copy: the directories are made a directory's subdirectories at a time, not one round trip each.
    let proxy = Proxy::start(&srv.addr(), Plan::new(Fault::Reset, u64::MAX, 0));
    c.cmd().args(["sync", "--streams", "1"]).arg(&src).arg(proxy.url("tree")).run().assert_success();
    compare_trees(&src, &srv.root.join("tree"), CompareOpts::default());
    let bursts = proxy.down_reads();
    assert!(bursts < dirs, "{bursts} bursts of answers for a first copy of {dirs} directories");
    let proxy = Proxy::start(&srv.addr(), Plan::new(Fault::Reset, u64::MAX, 0));
    let out = c.cmd().args(["sync", "--json"]).arg(&src).arg(proxy.url("tree")).run();
    out.assert_success();
    let s = json_summary(&out);
    assert_eq!((s["files"].as_u64(), s["unchanged"].as_u64()), (Some(0), Some(180)), "{s}");
    compare_trees(&src, &srv.root.join("tree"), CompareOpts::default());
    let bursts = proxy.down_reads();
    assert!(bursts < dirs * 3 / 2, "{bursts} bursts of answers for a no-op sync of {dirs} directories");
    assert!(proxy.connections() >= 2, "the listings were not read ahead on a connection of their own");
    // Connections reset in the middle of listings (the look-ahead's, or the control connection): what was not read
    // whole is asked for again, and the sync still finds everything unchanged.
    write_file(&src.join("d03/s2/new"), b"new");
    let proxy = Proxy::start(&srv.addr(), Plan::new(Fault::Reset, 3000, 2));
    let out = c.cmd().args(["sync", "--json"]).arg(&src).arg(proxy.url("tree"));
    let out = out.env("FASTSYNC_IO_TIMEOUT", RESET_TIMEOUT_SECS).timeout(Duration::from_secs(60)).run();
    out.assert_success();
    assert!(proxy.faults() >= 1, "no connection was reset");
    let s = json_summary(&out);
    assert_eq!((s["files"].as_u64(), s["unchanged"].as_u64()), (Some(1), Some(180)), "{s}");
    compare_trees(&src, &srv.root.join("tree"), CompareOpts::default());
}

/// Start `fastsync copy --streams 4 SRC DST`, wait until `part` shows `started`, then 300 ms more, and send SIGINT:
/// the run must end with exit 130.
fn ctrl_c_once(
    c: &Case,
    src: impl AsRef<std::ffi::OsStr>,
    dst: impl AsRef<std::ffi::OsStr>,
    part: &Path,
    started: impl Fn(&fs::Metadata) -> bool,
) {
    let child = std::process::Command::new(bin())
        .arg("--token-file")
        .arg(&c.token)
        .args(["copy", "--streams", "4"])
        .arg(src)
        .arg(dst)
        .env("XDG_CONFIG_HOME", "/nonexistent/fastsync-tests")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !part.metadata().is_ok_and(|m| started(&m)) {
        assert!(Instant::now() < deadline, "the transfer never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: a plain syscall on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
}

/// Ctrl-C during a large push stops it after the chunk each stream is sending: the rest of its ranges and the queued
/// ones are dropped (before, every range already queued was still sent, so the whole file was finished first), the
/// server keeps the part and its journal, and the rerun moves only what is missing. A slow path (the proxy holds every
/// read 10 ms) keeps the file in flight.
#[test]
fn ctrl_c_stops_a_large_push_after_the_chunks_in_flight() {
    let c = Case::new();
    let srv = c.serve();
    let size: u64 = 96 * MIB;
    let src = c.path("src/big.bin");
    mkdirs(&c.path("src"));
    write_big_file(&src, 0xC7C, size);
    let proxy = Proxy::start(&srv.addr(), Plan::long_path(Duration::from_millis(10)));
    // Interrupted once the part holds data, and a little later (some chunks acknowledged).
    let part = srv.root.join("up/.big.bin.fstmp-part");
    ctrl_c_once(&c, &src, proxy.url("up/big.bin"), &part, |m| m.len() > 0);
    let final_name = srv.root.join("up/big.bin");
    assert!(!final_name.exists(), "the file was finished after Ctrl-C");
    assert!(part.exists(), "the part was not kept for the rerun");
    let out = c.cmd().args(["copy", "--json"]).arg(&src).arg(srv.url("up/big.bin")).run();
    out.assert_success();
    let moved = json_summary(&out)["bytes"].as_u64().unwrap();
    assert!(moved < size, "the rerun moved {moved} of {size} bytes: nothing was resumed");
    assert_eq!(digest(&final_name), digest(&src));
    assert!(!part.exists(), "the part stayed after the rerun");
}

/// Ctrl-C during a large pull stops every stream after the chunk it is receiving, in the middle of its range (before,
/// each stream finished its range first, up to 32 MiB: here the whole file); the part and the journal stay, the
/// journal records what each range had received, and the rerun fetches only the rest. A slow path (the proxy holds
/// every read 10 ms) keeps the ranges in flight.
#[test]
fn ctrl_c_stops_a_large_pull_in_the_middle_of_its_ranges() {
    let c = Case::new();
    let srv = c.serve();
    let size: u64 = 96 * MIB;
    let remote = srv.root.join("pub/big.bin");
    mkdirs(&srv.root.join("pub"));
    write_big_file(&remote, 0xC7D, size);
    let proxy = Proxy::start(&srv.addr(), Plan::long_path(Duration::from_millis(10)));
    let dst = c.path("dst");
    mkdirs(&dst);
    // Interrupted once the part holds data (it is created at its full size, sparse), and a little later.
    let part = dst.join(".big.bin.fstmp-part");
    ctrl_c_once(&c, proxy.url("pub/big.bin"), dst.join("big.bin"), &part, |m| m.blocks() > 0);
    assert!(!dst.join("big.bin").exists(), "the file was finished after Ctrl-C");
    assert!(part.exists(), "the part was not kept for the rerun");
    let journal = fs::read_to_string(dst.join(".big.bin.fstmp-journal")).expect("the journal was kept");
    assert!(journal.lines().count() > 1, "no range recorded what it had received:\n{journal}");
    let out = c.cmd().args(["copy", "--json"]).arg(srv.url("pub/big.bin")).arg(dst.join("big.bin")).run();
    out.assert_success();
    let moved = json_summary(&out)["bytes"].as_u64().unwrap();
    assert!(moved < size, "the rerun moved {moved} of {size} bytes: nothing was resumed");
    assert_eq!(digest(&dst.join("big.bin")), digest(&remote));
    assert!(!part.exists(), "the part stayed after the rerun");
}

/// A file of a batch that the server refuses (a directory is where it must go) fails alone, with one line; the rest
/// of the batch arrives exact.
#[test]
fn a_refused_file_in_a_batch_fails_alone() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    for i in 0..50u64 {
        write_file(&src.join(format!("f{i:02}")), &random_bytes(i, 1000));
    }
    write_file(&srv.root.join("tree/f10/inside"), b"keep");
    let out = c.cmd().args(["copy", "--streams", "1"]).arg(&src).arg(srv.url("tree")).run();
    out.assert_code(1);
    out.assert_one_failure("tree/f10", "");
    assert_eq!(fs::read(srv.root.join("tree/f10/inside")).unwrap(), b"keep");
    for i in (0..50u64).filter(|&i| i != 10) {
        let name = format!("f{i:02}");
        assert_eq!(fs::read(srv.root.join("tree").join(&name)).unwrap(), random_bytes(i, 1000), "{name}");
    }
    assert_no_tmp(&srv.root);
}

/// 120 directories, each with a small file and a symlink: a control connection with a lot to say.
fn many_dirs(root: &std::path::Path) {
    for i in 0..60u64 {
        let d = root.join(format!("d{i:02}/e"));
        mkdirs(&d);
        write_file(&d.join("f"), &random_bytes(i, 3000));
        set_times(&d.join("f"), 1_400_000_000 + i as i64, 0);
        ln_s("f", &d.join("l"));
    }
    stamp_dir_times(root, 1_200_000_000);
}

/// A push whose control connection (directories, symlinks, metadata, listings) is reset mid-run dials it again and
/// sends the request in flight again: one warning, an exact tree; the same for a `sync` that lists every directory.
#[test]
fn a_reset_control_connection_is_dialled_again_on_a_push() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    many_dirs(&src);
    let control = |after_bytes| Plan { only_connection: Some(1), ..once(Fault::Reset, after_bytes) };
    let proxy = Proxy::start(&srv.addr(), control(3000));
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &[], &src, proxy.url("tree"));
    assert_eq!(proxy.faults(), 1, "the control connection was reset");
    out.assert_success();
    let (warnings, others) = split_stderr(&out);
    assert!(others.is_empty() && warnings.len() == 1, "{:?}", out.stderr_lines());
    assert!(warnings[0].contains("control connection") && warnings[0].contains("attempt 2 of 3"), "{warnings:?}");
    compare_trees(&src, &srv.root.join("tree"), CompareOpts::default());

    for i in (0..60u64).step_by(6) {
        let f = src.join(format!("d{i:02}/e/f"));
        write_file(&f, &random_bytes(100 + i, 2000));
        set_times(&f, 1_500_000_000 + i as i64, 0);
    }
    stamp_dir_times(&src, 1_200_000_000);
    let proxy = Proxy::start(&srv.addr(), control(3000));
    let started = Instant::now();
    let out = c
        .cmd()
        .args(["sync", "--delete"])
        .arg(&src)
        .arg(proxy.url("tree"))
        .env("FASTSYNC_IO_TIMEOUT", RESET_TIMEOUT_SECS)
        .timeout(Duration::from_secs(60))
        .run();
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(proxy.faults(), 1, "sync: the control connection was reset");
    out.assert_success();
    let (warnings, _) = split_stderr(&out);
    assert!(warnings.len() == 1 && warnings[0].contains("control connection"), "{:?}", out.stderr_lines());
    compare_trees(&src, &srv.root.join("tree"), CompareOpts::default());
    assert_no_tmp(&srv.root);
}

/// A pull whose control connection is reset while it streams the recursive listing lists again on a new one and
/// skips what it already handled: one warning, an exact tree.
#[test]
fn a_reset_control_connection_is_dialled_again_on_a_pull() {
    let c = Case::new();
    let srv = c.serve();
    let remote = srv.root.join("tree");
    many_dirs(&remote);
    // The listing is what the server sends on the control connection: cut it a few KiB in.
    let proxy =
        Proxy::start(&srv.addr(), Plan { only_connection: Some(1), down_only: true, ..once(Fault::Reset, 4000) });
    let back = c.path("back");
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &[], proxy.url("tree"), &back);
    assert_eq!(proxy.faults(), 1, "the control connection was reset");
    out.assert_success();
    let (warnings, others) = split_stderr(&out);
    assert!(others.is_empty() && warnings.len() == 1, "{:?}", out.stderr_lines());
    assert!(warnings[0].contains("control connection") && warnings[0].contains("listing again"), "{warnings:?}");
    compare_trees(&remote, &back, CompareOpts::default());
    assert_no_tmp(&back);
}

/// Every data connection is broken before it has carried one whole chunk: no progress, so the run gives up with
/// one line.
fn assert_gives_up(out: &Output, proxy: &Proxy, file: &str, verb: &str) {
    out.assert_code(1);
    let (_, errors) = split_stderr(out);
    assert_eq!(errors.len(), 1, "one error line: {:?}", out.stderr_lines());
    let line = &errors[0];
    let start = format!("fastsync: cannot {verb} '{}': connection to {} lost: ", proxy.url(file), proxy.addr());
    assert!(line.starts_with(&start), "the line names the file and the cause: {line}");
    assert!(line.ends_with("(gave up after 3 attempts on fresh connections)"), "{line}");
}

#[test]
fn a_stream_that_keeps_breaking_ends_the_push_with_one_line_and_nothing_in_place() {
    let c = Case::new();
    let srv = c.serve();
    let proxy = Proxy::start(&srv.addr(), always(Fault::Reset, MIB / 2));
    let big = big_source(&c);
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &[], &big, proxy.url("in/"));
    assert_gives_up(&out, &proxy, "in/big.bin", "write");
    assert!(proxy.faults() >= 3, "the same request was tried three times");
    assert!(!srv.root.join("in/big.bin").exists(), "nothing partial under the final name");
}

#[test]
fn a_stream_that_keeps_breaking_ends_the_pull_with_one_line_and_nothing_in_place() {
    let c = Case::new();
    let srv = c.serve();
    let big = srv.root.join("big.bin");
    write_big_file(&big, 0xBAD7, BIG_BYTES);
    let proxy = Proxy::start(&srv.addr(), always(Fault::Stall, MIB / 2));
    let dst = c.path("dst");
    mkdirs(&dst);
    // Every stream stalls anyway: a busy moment mistaken for a stall changes nothing, so the timeout can be 1 s.
    let (out, took) = copy_via(&c, "1", &[], proxy.url("big.bin"), &dst);
    assert_gives_up(&out, &proxy, "big.bin", "read");
    assert!(out.stderr_str().contains("stalled"), "{}", out.stderr_str());
    assert!(took < Duration::from_secs(20), "three stalls of 1 s and the backoff: {took:?}");
    assert!(!dst.join("big.bin").exists(), "nothing partial under the final name");
    // The resumable part and its journal stay for a rerun; nothing else.
    let mut left: Vec<String> =
        tmp_leftovers(&dst).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, [".big.bin.fstmp-journal", ".big.bin.fstmp-part"]);
}

#[test]
fn a_bad_io_timeout_is_a_usage_error() {
    let c = Case::new();
    mkdirs(&c.path("src"));
    for bad in ["0", "-1", "1.5", "soon", "86401"] {
        let out = c
            .cmd()
            .arg("copy")
            .arg(c.path("src"))
            .arg("fastsync://127.0.0.1:9/x")
            .env("FASTSYNC_IO_TIMEOUT", bad)
            .run();
        out.assert_code(2);
        let lines = out.stderr_lines();
        assert!(lines.len() == 1 && lines[0].contains("FASTSYNC_IO_TIMEOUT"), "{bad}: {lines:?}");
    }
}

/// The `streams: A -> B` notes of a `-v` run, in order.
fn stream_changes(out: &Output) -> Vec<(usize, usize)> {
    out.stderr_lines()
        .iter()
        .filter_map(|l| l.strip_prefix("fastsync: streams: "))
        .filter_map(|rest| {
            let (a, rest) = rest.split_once(" -> ")?;
            let b = rest.split(' ').next()?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

#[test]
fn adaptive_streams_grow_on_a_long_path_and_stay_fixed_when_asked() {
    let c = Case::new();
    let srv = c.serve();
    // 40 ms each way per 64 KiB: every connection carries at most ~1.6 MB/s, and the RTT seen end to end is 80 ms or
    // more: a long path where more streams move more bytes.
    let proxy = Proxy::start(&srv.addr(), Plan::long_path(Duration::from_millis(40)));
    let big = big_source(&c);
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["-v", "--json"], &big, proxy.url("adaptive/"));
    out.assert_success();
    let changes = stream_changes(&out);
    out.check(changes.first() == Some(&(4, 8)), &format!("the pool first doubles from 4 to 8: {changes:?}"));
    let peak = json_summary(&out)["streams"].as_u64().unwrap();
    out.check(peak >= 8, &format!("the summary says at most {peak} streams"));
    assert!(proxy.connections() > 8, "the control connection and 8 streams: {} connections", proxy.connections());
    assert_eq!(digest(&srv.root.join("adaptive/big.bin")), digest(&big));
    assert_no_tmp(&srv.root);

    // With --streams the number is fixed: no changes, whatever the path (20 MiB: a few seconds of samples).
    let fixed = c.path("fixed.bin");
    write_big_file(&fixed, 0xF1, 20 * MIB);
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["-v", "--json", "--streams", "4"], &fixed, proxy.url("fixed/"));
    out.assert_success();
    out.check(stream_changes(&out).is_empty(), "no changes with --streams");
    assert_eq!(json_summary(&out)["streams"].as_u64(), Some(4));
    assert_eq!(digest(&srv.root.join("fixed/fixed.bin")), digest(&fixed));
}

/// SIGKILL `child` once the resume journal at `journal` holds `n` records (or after a minute); returns how many
/// it held then.
fn kill_once_recorded(mut child: std::process::Child, journal: &std::path::Path, n: usize) -> usize {
    let records = || fs::read_to_string(journal).map(|t| t.lines().count().saturating_sub(1)).unwrap_or(0);
    let started = Instant::now();
    while records() < n && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    records()
}

#[test]
fn a_pull_killed_mid_file_resumes_from_the_ranges_it_finished() {
    let c = Case::new();
    let srv = c.serve();
    let size = 64 * MIB;
    let big = srv.root.join("big.bin");
    write_big_file(&big, 0x7E5, size);
    set_times(&big, 1_500_000_000, 9);
    let out_dir = c.path("out");
    mkdirs(&out_dir);
    let (part, journal) = (out_dir.join(".big.bin.fstmp-part"), out_dir.join(".big.bin.fstmp-journal"));
    // A slow path, so that the run can be killed with some 4 MiB ranges done and others not.
    let slow = Proxy::start(&srv.addr(), Plan::long_path(Duration::from_millis(10)));
    let child = c
        .cmd()
        .arg("copy")
        .arg(slow.url("big.bin"))
        .arg(&out_dir)
        .env("FASTSYNC_IO_TIMEOUT", RESET_TIMEOUT_SECS)
        .spawn_quiet();
    let done_before = kill_once_recorded(child, &journal, 4);
    assert!(done_before >= 4, "the journal recorded {done_before} ranges before the kill");
    assert!(part.exists() && !out_dir.join("big.bin").exists(), "a killed pull leaves its part, not the file");
    // The rerun reuses the recorded ranges (their digests match the server's) and fetches only the rest.
    let counting = Proxy::start(&srv.addr(), Plan::new(Fault::Reset, u64::MAX, 0));
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &[], counting.url("big.bin"), &out_dir);
    out.assert_success();
    assert_eq!(digest(&out_dir.join("big.bin")), digest(&big));
    assert_eq!(entry_of(&out_dir.join("big.bin")).mtime, (1_500_000_000, 9));
    assert!(!part.exists() && !journal.exists(), "the part and its journal are gone once the file is complete");
    let fetched = counting.down_bytes();
    let saved = done_before as u64 * 4 * MIB;
    assert!(fetched < size - saved + MIB, "fetched {fetched} bytes again although {saved} were resumed");
}

#[test]
fn a_push_killed_mid_file_resumes_from_the_chunks_the_server_recorded() {
    let c = Case::new();
    let srv = c.serve();
    let size = 64 * MIB;
    let src = c.path("src");
    mkdirs(&src);
    let big = src.join("big.bin");
    write_big_file(&big, 0x9E5, size);
    set_times(&big, 1_500_000_000, 11);
    let journal = srv.root.join("in/.big.bin.fstmp-journal");
    let part = srv.root.join("in/.big.bin.fstmp-part");
    let slow = Proxy::start(&srv.addr(), Plan::long_path(Duration::from_millis(10)));
    let child =
        c.cmd().arg("copy").arg(&big).arg(slow.url("in/")).env("FASTSYNC_IO_TIMEOUT", RESET_TIMEOUT_SECS).spawn_quiet();
    let done_before = kill_once_recorded(child, &journal, 4);
    assert!(done_before >= 4, "the server recorded {done_before} chunks before the kill");
    // The rerun offers each range by digest; the server keeps the chunks it recorded, and only the rest is sent.
    let counting = Proxy::start(&srv.addr(), Plan::new(Fault::Reset, u64::MAX, 0));
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &[], &big, counting.url("in/"));
    out.assert_success();
    let pushed = srv.root.join("in/big.bin");
    assert_eq!(digest(&pushed), digest(&big));
    assert_eq!(entry_of(&pushed).mtime, (1_500_000_000, 11));
    assert!(!part.exists() && !journal.exists(), "the server's part and journal are gone once the file is complete");
    let sent = counting.up_bytes();
    let saved = done_before as u64 * 4 * MIB;
    assert!(sent < size - saved + 2 * MIB, "sent {sent} bytes again although {saved} were recorded");
}

#[test]
fn a_part_whose_source_was_deleted_after_a_killed_push_goes_with_the_next_push_and_a_live_one_stays() {
    use fastsync::net::auth::{Key, Wishes};
    use fastsync::net::client;
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    mkdirs(&src);
    write_big_file(&src.join("big.bin"), 0xDE1, 64 * MIB);
    write_file(&src.join("small.txt"), b"stays");
    let dest = srv.root.join("in");
    let (part, journal) = (dest.join(".big.bin.fstmp-part"), dest.join(".big.bin.fstmp-journal"));
    // The same URL both times (the run marker is per destination URL): both pushes go through one slow proxy.
    let slow = Proxy::start(&srv.addr(), Plan::long_path(Duration::from_millis(10)));
    let child =
        c.cmd().arg("copy").arg(&src).arg(slow.url("in")).env("FASTSYNC_IO_TIMEOUT", RESET_TIMEOUT_SECS).spawn_quiet();
    let done_before = kill_once_recorded(child, &journal, 2);
    assert!(done_before >= 2, "the server recorded {done_before} chunks before the kill");
    assert!(part.exists() && journal.exists(), "a killed push leaves its part and journal on the server");
    // The proxy still passes on what the dead client had sent; the server sees the client gone once it is through.
    let started = Instant::now();
    while slow.open() > 0 && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(slow.open(), 0, "the killed client's connections are still open through the proxy");
    // A concurrent push that is alive: a client of its own, holding a resumable transfer with one chunk written.
    let key = Key::from_token(TOKEN.as_bytes());
    let mut live = client::connect(&srv.addr(), &key, Wishes::default(), Duration::from_secs(30)).unwrap();
    let live_bytes = random_bytes(0x11FE, (2 * MIB) as usize);
    let id = 0x5EED_0001;
    assert_eq!(live.put_resume(id, b"in/live.bin", live_bytes.len() as u64, 0o644, (1_600_000_000, 0)).unwrap(), 0);
    live.put_data(id, 0, live_bytes[..MIB as usize].to_vec()).unwrap();
    let (live_part, live_journal) = (dest.join(".live.bin.fstmp-part"), dest.join(".live.bin.fstmp-journal"));
    assert!(live_part.exists() && live_journal.exists());
    // A temporary of a process that is gone (PID 2^22 + 1 is above the kernel's limit).
    let dead = dest.join(".old.fstmp-4194305-1");
    write_file(&dead, b"left by a dead server");
    // The source file goes; the next push of the same tree cleans up after the killed one.
    fs::remove_file(src.join("big.bin")).unwrap();
    let (out, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["--json"], &src, slow.url("in"));
    out.assert_success();
    assert!(!part.exists() && !journal.exists(), "the part of a deleted source is still on the server");
    assert!(!dead.exists(), "a dead process's temporary is still on the server");
    assert_eq!(json_summary(&out)["stale_removed"].as_u64(), Some(1));
    assert!(live_part.exists() && live_journal.exists(), "the live transfer's part was removed");
    // And the live push can still finish its file.
    live.put_data(id, MIB, live_bytes[MIB as usize..].to_vec()).unwrap();
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    live.put_end(id, 0o644, uid, gid, (1_600_000_000, 0), false).unwrap();
    assert_eq!(fs::read(dest.join("live.bin")).unwrap(), live_bytes);
    assert!(!live_part.exists() && !live_journal.exists());
    assert_eq!(fs::read(dest.join("small.txt")).unwrap(), b"stays");
    // A clean run leaves no marker behind: the push after it asks for no cleaning (nothing to remove).
    let (again, _) = copy_via(&c, RESET_TIMEOUT_SECS, &["--json"], &src, slow.url("in"));
    again.assert_success();
    assert_eq!(json_summary(&again)["stale_removed"].as_u64(), Some(0));
}
