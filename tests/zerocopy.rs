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
