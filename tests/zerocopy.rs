//! The zero-copy data path (`FASTSYNC_ZEROCOPY`): a multi-chunk file pushed and pulled with each variant arrives
//! byte for byte, and the client really uses `sendfile` (push) and `splice` (pull) when strace is there to show it.

#[macro_use]
#[allow(unused_macros)] // both_engines: these cases run no engine
mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::lan::*;
use common::*;

/// Runs `fastsync ARGS` under `strace -f -c` (counting system calls) and returns strace's table, or runs it plainly
/// and returns `None` when strace is missing.
fn run_counting(c: &Case, mode: &str, args: &[&str], table: &Path) -> Option<String> {
    let traced = Command::new("strace").arg("-V").output().is_ok_and(|o| o.status.success());
    let mut cmd = if traced {
        Cmd::new("strace").args(["-f", "-c", "-e", "trace=sendfile,splice", "-o"]).arg(table).arg(bin())
    } else {
        eprintln!("strace is missing: the system calls used are not checked");
        fastsync()
    };
    cmd = cmd.env("FASTSYNC_ZEROCOPY", mode).arg("--token-file").arg(&c.token).args(args);
    cmd.run().assert_success();
    traced.then(|| fs::read_to_string(table).unwrap())
}

#[test]
fn a_multi_chunk_file_goes_both_ways_exactly_with_every_zero_copy_variant() {
    for mode in ["both", "sendfile", "splice", "off"] {
        let c = Case::new();
        let srv = Server::start_with_env(&c.path("served"), &c.token, &[], &[("FASTSYNC_ZEROCOPY", mode)]);
        mkdirs(&c.path("src"));
        let big = c.path("src/big.bin");
        // Ten 4 MiB push chunks (forty 1 MiB pull chunks) and a ragged end, over one stream and over four.
        write_big_file(&big, 0x2C0, (40 << 20) + 4_321);
        let want = fs::read(&big).unwrap();
        for streams in ["1", "4"] {
            let dst = format!("in-{streams}/");
            let url = srv.url(&dst);
            let table = c.path("push.strace");
            let push = run_counting(&c, mode, &["copy", "--streams", streams, big.to_str().unwrap(), &url], &table);
            let pushed = srv.root.join(format!("in-{streams}/big.bin"));
            assert!(fs::read(&pushed).unwrap() == want, "{mode}, {streams} stream(s): pushed bytes differ");

            let back = c.path(&format!("back-{streams}/big.bin"));
            let table = c.path("pull.strace");
            let url = srv.url(&format!("in-{streams}/big.bin"));
            let pull = run_counting(&c, mode, &["copy", "--streams", streams, &url, back.to_str().unwrap()], &table);
            assert!(fs::read(&back).unwrap() == want, "{mode}, {streams} stream(s): pulled bytes differ");
            assert_no_tmp(&c.path(&format!("back-{streams}")));

            if let (Some(push), Some(pull)) = (push, pull) {
                let sends = matches!(mode, "both" | "sendfile");
                let splices = matches!(mode, "both" | "splice");
                assert_eq!(push.contains("sendfile"), sends, "{mode}: push system calls:\n{push}");
                assert_eq!(pull.contains("splice"), splices, "{mode}: pull system calls:\n{pull}");
            }
        }
        assert_no_tmp(&srv.root);
    }
}

/// How many calls of `syscall` a `strace -c` table counts.
fn calls(table: &str, syscall: &str) -> u64 {
    table
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.last() == Some(&syscall)).then(|| cols.get(3).and_then(|n| n.parse::<u64>().ok())).flatten()
        })
        .sum()
}

/// `cmp` and `sha256sum` (tools independent of fastsync) agree that `a` and `b` hold the same bytes.
fn same_bytes(a: &Path, b: &Path, what: &str) {
    let cmp = Command::new("cmp").arg(a).arg(b).status().unwrap();
    assert!(cmp.success(), "{what}: cmp says {} and {} differ", a.display(), b.display());
    let sum = |p: &Path| {
        let out = Command::new("sha256sum").arg(p).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or("").to_string()
    };
    let (x, y) = (sum(a), sum(b));
    assert!(x.len() == 64 && x == y, "{what}: sha256sum {x} != {y}");
}

/// The shard data path (`FASTSYNC_ZEROCOPY=shards` / `shards-zc`): large files pushed and pulled on each engine's
/// socket jobs arrive byte for byte — a multi-chunk file with a ragged end over four streams, and one large enough
/// for the pulling client to write with O_DIRECT — and the client really moves them on its shards (strace: io_uring
/// and no sendfile/splice on uring; the fallback shards' `poll` before each send and receive, no io_uring). The
/// server runs on its shards too, or on its thread path (always with the fallback engine): a peer on either path
/// talks to one on the other (the wire is the same).
#[test]
fn large_files_go_both_ways_exactly_on_the_shards_of_both_engines() {
    let traced = Command::new("strace").arg("-V").output().is_ok_and(|o| o.status.success());
    let cases = [
        ("uring", "shards", "shards"),
        ("uring", "shards-zc", "shards-zc"),
        ("fallback", "shards", "shards"),
        ("uring", "shards", "sendfile"),
        ("uring", "sendfile", "shards"),
    ];
    for (engine, mode, server_mode) in cases {
        let c = Case::new();
        let env = [("FASTSYNC_ZEROCOPY", server_mode), ("FASTSYNC_ENGINE", engine)];
        let srv = Server::start_with_env(&c.path("served"), &c.token, &[], &env);
        mkdirs(&c.path("src"));
        let files = [("multi.bin", (40u64 << 20) + 4_321), ("direct.bin", (70 << 20) + 123)];
        for (i, (name, len)) in files.iter().enumerate() {
            write_big_file(&c.path(&format!("src/{name}")), 0x5A0 + i as u64, *len);
        }
        let run = |args: &[&str], table: &Path| -> Option<String> {
            let mut cmd = if traced {
                let calls = "trace=io_uring_enter,sendfile,splice,poll";
                Cmd::new("strace").args(["-f", "-c", "-e", calls, "-o"]).arg(table).arg(bin())
            } else {
                eprintln!("strace is missing: the system calls used are not checked");
                fastsync()
            };
            cmd = cmd.env("FASTSYNC_ZEROCOPY", mode).arg("--token-file").arg(&c.token);
            cmd.args(["--engine", engine, args[0], "--streams", "4"]).args(&args[1..]).run().assert_success();
            traced.then(|| fs::read_to_string(table).unwrap())
        };
        let what = format!("{engine}, client {mode}, server {server_mode}");
        let src = c.path("src");
        let push = run(&["copy", &format!("{}/", src.display()), &srv.url("in/")], &c.path("push.strace"));
        let back = c.path("back");
        let pull = run(&["copy", &srv.url("in/"), &format!("{}/", back.display())], &c.path("pull.strace"));
        for (name, _) in files {
            same_bytes(&c.path(&format!("src/{name}")), &srv.root.join("in").join(name), &format!("{what}: push"));
            same_bytes(&c.path(&format!("src/{name}")), &back.join(name), &format!("{what}: pull"));
        }
        assert_no_tmp(&srv.root);
        assert_no_tmp(&back);
        // Chunks: 4 MiB on a push, 1 MiB on a pull; each is at least one ring entry or one poll.
        let chunks = |size: u64| files.iter().map(|(_, len)| len.div_ceil(size)).sum::<u64>();
        for (dir, table, chunks) in [("push", push, chunks(4 << 20)), ("pull", pull, chunks(1 << 20))] {
            let Some(table) = table.filter(|_| mode.starts_with("shards")) else { continue };
            // Payloads under 64 KiB (here the files' ragged ends) stay on the stream's thread: one sendfile each.
            let small_tails = files.iter().filter(|(_, len)| len % (1 << 20) < (64 << 10)).count() as u64;
            let sendfiles = calls(&table, "sendfile");
            assert!(sendfiles <= small_tails && !table.contains("splice"), "{what}: {dir}:\n{table}");
            let (uring, polls) = (calls(&table, "io_uring_enter"), calls(&table, "poll"));
            if engine == "uring" {
                assert!(uring >= chunks, "{what}: {dir}: {uring} io_uring_enter for {chunks} chunks:\n{table}");
            } else {
                assert!(uring == 0 && polls >= chunks, "{what}: {dir}: {polls} polls for {chunks} chunks:\n{table}");
            }
        }
    }
}
