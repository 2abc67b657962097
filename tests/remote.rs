//! `copy`, `sync` and `list` with a `fastsync://` side, against a real `fastsync serve` process on 127.0.0.1:0 (and,
//! for what a real server never does, a small hostile server speaking the wire format).

#[macro_use]
#[allow(unused_macros)] // both_engines: these cases run no engine
mod common;

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::lan::*;
use common::*;
use fastsync::net::auth::{self, Key};
use fastsync::net::wire::{self, EntryKind, EntryMeta, Msg, code};

/// The small tree, plus an empty file, nested empty directories and a few modes.
fn tree_with_empty_dirs(root: &Path) {
    build_small_tree(root);
    mkdirs(&root.join("sub/empty/nested"));
    write_file(&root.join("sub/empty_file"), b"");
    chmod(&root.join("sub/deep/d.bin"), 0o600);
    chmod(&root.join("b.bin"), 0o755);
    set_times(&root.join("sub/empty_file"), 1_300_000_500, 42);
    // Owners other than the runner's on a directory, a symlink and a file, where the tests may give them away:
    // compare_trees checks owners, so a push or pull that drops one fails.
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        lchown(&root.join("sub/empty"), 4321, 8765);
        lchown(&root.join("link_to_a"), 4322, 8766);
        lchown(&root.join("b.bin"), 4323, 8767);
    }
    stamp_dir_times(root, 1_200_000_000);
}

#[test]
fn push_a_tree() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    tree_with_empty_dirs(&src);
    let out = c.cmd().args(["copy", "--json"]).arg(&src).arg(srv.url("backup/tree")).run();
    out.assert_success();
    compare_trees(&src, &srv.root.join("backup/tree"), CompareOpts::default());
    let s = json_summary(&out);
    let (files, _, symlinks, bytes) = tree_counts(&src);
    assert_eq!(s["engine"], "net");
    assert_eq!((s["files"].as_u64(), s["symlinks"].as_u64()), (Some(files), Some(symlinks)));
    assert_eq!((s["bytes"].as_u64(), s["errors"].as_u64()), (Some(bytes), Some(0)));
}

/// A push copy makes a directory's subdirectories in one burst; one that a file on the server is in the way of fails
/// there, is made again when the walk gets to it, and fails with one line; its siblings are copied.
#[test]
fn a_file_in_the_way_of_a_pushed_directory_fails_alone() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    for d in ["a", "b", "c"] {
        write_file(&src.join(d).join("f"), d.as_bytes());
    }
    write_file(&srv.root.join("t/b"), b"in the way");
    let out = c.cmd().args(["copy"]).arg(&src).arg(srv.url("t")).run();
    out.assert_code(1);
    out.assert_one_failure("t/b", "Not a directory");
    assert_eq!(fs::read(srv.root.join("t/b")).unwrap(), b"in the way");
    for d in ["a", "c"] {
        assert_eq!(fs::read(srv.root.join("t").join(d).join("f")).unwrap(), d.as_bytes());
    }
    assert_no_tmp(&srv.root);
}

#[test]
fn pull_a_tree() {
    let c = Case::new();
    let srv = c.serve();
    let remote = srv.root.join("data/tree");
    tree_with_empty_dirs(&remote);
    let dst = c.path("local/copy");
    let out = c.cmd().args(["copy", "--stats"]).arg(srv.url("data/tree")).arg(&dst).run();
    out.assert_success();
    compare_trees(&remote, &dst, CompareOpts::default());
    out.check(out.stdout_str().contains("engine: net"), "--stats names the net engine");
    // A single file, into an existing directory (the copy rule).
    let one = c.cmd().arg("copy").arg(srv.url("data/tree/a.txt")).arg(with_slash(&c.path("local"))).run();
    one.assert_success();
    assert_same_bytes(&remote.join("a.txt"), &c.path("local/a.txt"));
    assert_eq!(entry_of(&c.path("local/a.txt")).mtime, entry_of(&remote.join("a.txt")).mtime);
}

/// A destination that is a symlink to a directory stands for that directory (cp, rsync, rclone): a pull and a sync
/// with --delete fill what it points to and leave the link alone; the second sync has nothing to do.
#[test]
fn a_pull_into_a_symlink_to_a_directory_fills_the_directory() {
    let c = Case::new();
    let srv = c.serve();
    let remote = srv.root.join("tree");
    build_small_tree(&remote);
    let real = c.path("real");
    mkdirs(&real);
    let link = c.path("link");
    ln_s(&real, &link);
    c.cmd().arg("copy").arg(srv.url("tree")).arg(&link).run().assert_success();
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
    compare_trees(&remote, &real, CompareOpts::default());
    let out = c.cmd().args(["sync", "--delete", "--json"]).arg(srv.url("tree")).arg(&link).run();
    out.assert_success();
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "sync --delete replaced the link");
    assert_eq!(json_summary(&out)["files"], 0, "an unchanged tree was copied again");
    compare_trees(&remote, &real, CompareOpts::default());
}

#[test]
fn a_large_file_goes_both_ways_over_four_streams() {
    let c = Case::new();
    let srv = c.serve();
    let big = c.path("src/big.bin");
    mkdirs(&c.path("src"));
    // Several 4 MiB chunks and a ragged end, cut into ranges over the four connections.
    write_big_file(&big, 0xB16, (40 << 20) + 12_345);
    set_times(&big, 1_500_000_000, 7);
    c.cmd().args(["copy", "--streams", "4"]).arg(&big).arg(srv.url("in/")).run().assert_success();
    let pushed = srv.root.join("in/big.bin");
    assert_eq!(digest(&pushed), digest(&big));
    assert_eq!(entry_of(&pushed).mtime, (1_500_000_000, 7));
    let back = c.path("back/big.bin");
    c.cmd().args(["copy", "--streams", "4"]).arg(srv.url("in/big.bin")).arg(&back).run().assert_success();
    assert_eq!(digest(&back), digest(&big));
    assert_eq!(entry_of(&back).mtime, (1_500_000_000, 7));
    assert_no_tmp(&c.path("back"));
    assert_no_tmp(&srv.root);
}

/// Files of 64 MiB and more are received with O_DIRECT on both sides (a chunk's aligned part directly, a ragged end
/// through the page cache): exact, and not left in the page cache; `--no-direct-io` receives through it.
#[test]
fn large_files_are_received_around_the_page_cache() {
    let c = Case::new();
    let srv = c.serve();
    let big = c.path("src/big.bin");
    mkdirs(&c.path("src"));
    write_big_file(&big, 0xD1, (70 << 20) + 4097);
    c.cmd().args(["copy", "--streams", "3"]).arg(&big).arg(srv.url("in/")).run().assert_success();
    let pushed = srv.root.join("in/big.bin");
    let direct = fs_takes_o_direct(&srv.root);
    let pushed_cached = cached_fraction(&pushed);
    let back = c.path("back/big.bin");
    c.cmd().args(["copy", "--streams", "3"]).arg(srv.url("in/big.bin")).arg(&back).run().assert_success();
    let pulled_cached = cached_fraction(&back);
    let buffered = c.path("buffered/big.bin");
    c.cmd().args(["copy", "--no-direct-io"]).arg(srv.url("in/big.bin")).arg(&buffered).run().assert_success();
    let buffered_cached = cached_fraction(&buffered);
    if direct {
        assert!(pushed_cached < 0.05, "{:.0}% of the pushed file is cached", pushed_cached * 100.0);
        assert!(pulled_cached < 0.05, "{:.0}% of the pulled file is cached", pulled_cached * 100.0);
    }
    assert!(buffered_cached > 0.95, "--no-direct-io: only {:.0}% cached", buffered_cached * 100.0);
    for f in [&pushed, &back, &buffered] {
        assert_eq!(digest(f), digest(&big), "{}", f.display());
    }
    assert_no_tmp(&c.path("back"));
    assert_no_tmp(&srv.root);
}

/// A sparse file: `data` MiB-blocks at the given MiB offsets in a file of `size_mib` MiB, the rest holes.
fn write_sparse(path: &Path, size_mib: u64, data: &[u64]) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    for (i, &at) in data.iter().enumerate() {
        f.write_all_at(&random_bytes(0x5A + i as u64, 1 << 20), at << 20).unwrap();
    }
    f.set_len(size_mib << 20).unwrap();
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// Holes cross the wire as `Hole`/`PutHole` messages and stay holes, both ways, over several streams, through the
/// ordinary and the zero-copy paths, for a small and a large (O_DIRECT) sparse file.
#[test]
fn sparse_files_keep_their_holes_both_ways() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    mkdirs(&src);
    write_sparse(&src.join("small.img"), 20, &[0, 9]);
    write_sparse(&src.join("large.img"), 96, &[1, 40, 95]);
    if allocated_bytes(&src.join("large.img")) >= 96 << 20 {
        eprintln!("skipped: this filesystem does not keep holes");
        return;
    }
    c.cmd().args(["copy", "--streams", "3"]).arg(&src).arg(srv.url("in")).run().assert_success();
    for (name, data_mib) in [("small.img", 2), ("large.img", 3)] {
        let pushed = srv.root.join("in").join(name);
        assert_same_bytes(&src.join(name), &pushed);
        let alloc = allocated_bytes(&pushed);
        assert!(
            alloc <= (data_mib + 1) << 20,
            "pushed {name}: {} KiB allocated for {data_mib} MiB of data",
            alloc >> 10
        );
    }
    for (dir, zerocopy) in [("back", "sendfile"), ("back-spliced", "both")] {
        let out = c
            .cmd()
            .env("FASTSYNC_ZEROCOPY", zerocopy)
            .args(["copy", "--streams", "3"])
            .arg(srv.url("in"))
            .arg(c.path(dir))
            .run();
        out.assert_success();
        for (name, data_mib) in [("small.img", 2), ("large.img", 3)] {
            let back = c.path(dir).join(name);
            assert_same_bytes(&src.join(name), &back);
            let alloc = allocated_bytes(&back);
            assert!(alloc <= (data_mib + 1) << 20, "{dir}/{name}: {} KiB allocated for {data_mib} MiB", alloc >> 10);
        }
        assert_no_tmp(&c.path(dir));
    }
    assert_no_tmp(&srv.root);
}

/// Where `openat2` is refused (an old kernel: ENOSYS; some container seccomp profiles: EPERM), the server resolves
/// every path beneath its root one component at a time instead: strace, attached to a running server, fails its
/// `openat2` calls, and a push and a pull of a tree still arrive exact (the walk's answers and refusals are tested
/// against openat2's in `net::beneath`).
#[test]
fn a_server_without_openat2_walks_each_path_instead() {
    if !strace_usable() {
        return;
    }
    for errno in ["ENOSYS", "EPERM"] {
        let c = Case::new();
        let srv = c.serve();
        let trace = c.path("trace");
        let mut strace = Command::new("strace")
            .args(["-f", "-qq", "-o"])
            .arg(&trace)
            .args(["-e", "trace=openat2", "-e", &format!("inject=openat2:error={errno}"), "-p"])
            .arg(srv.child.id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Traced once the kernel says so (every thread of the server is, with -f).
        let status = format!("/proc/{}/status", srv.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fs::read_to_string(&status)
            .unwrap()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
        {
            assert!(Instant::now() < deadline, "strace did not attach");
            std::thread::sleep(Duration::from_millis(10));
        }
        let src = c.path("src");
        tree_with_empty_dirs(&src);
        mkdirs(&src.join("deep/er/still"));
        write_file(&src.join("deep/er/still/f"), b"far down");
        c.cmd().args(["copy", "--streams", "2"]).arg(&src).arg(srv.url("up/t")).run().assert_success();
        compare_trees(&src, &srv.root.join("up/t"), CompareOpts::default());
        let back = c.path("back");
        c.cmd().args(["copy", "--streams", "2"]).arg(srv.url("up/t")).arg(&back).run().assert_success();
        compare_trees(&src, &back, CompareOpts::default());
        // SAFETY: a plain syscall on our child's pid; strace detaches on SIGINT and the server goes on.
        unsafe { libc::kill(strace.id() as i32, libc::SIGINT) };
        strace.wait().unwrap();
        let trace = fs::read_to_string(&trace).unwrap();
        assert!(trace.contains("INJECTED"), "the server never tried openat2 ({errno}):\n{trace}");
        assert_no_tmp(&srv.root);
    }
}

/// -X over fastsync://: the user.* extended attributes of files (small, pipelined; large, in ranges), of the root
/// and of subdirectories arrive both ways; without -X none do.
#[test]
fn xattrs_go_both_ways_with_x() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    tree_with_empty_dirs(&src);
    if !xattrs_supported(&src) {
        eprintln!("skipped: user xattrs not supported on the temp filesystem");
        return;
    }
    write_big_file(&src.join("sub/big.bin"), 0xEA, (12 << 20) + 5);
    lsetxattr(&src.join("a.txt"), "user.color", b"blue").unwrap();
    lsetxattr(&src.join("a.txt"), "user.bin", b"\x00\x01\xff\x00").unwrap();
    lsetxattr(&src.join("sub/big.bin"), "user.big", &[7u8; 3000]).unwrap();
    lsetxattr(&src, "user.root", b"top").unwrap();
    lsetxattr(&src.join("sub"), "user.dir", b"d").unwrap();
    lsetxattr(&src.join("sub/empty"), "user.empty", b"").unwrap();
    stamp_dir_times(&src, 1_200_000_000);
    let with = CompareOpts { xattrs: true, hardlinks: false };
    c.cmd().args(["copy", "-X", "--streams", "3"]).arg(&src).arg(srv.url("x")).run().assert_success();
    compare_trees(&src, &srv.root.join("x"), with);
    c.cmd().args(["copy", "-X", "--streams", "3"]).arg(srv.url("x")).arg(c.path("back")).run().assert_success();
    compare_trees(&src, &c.path("back"), with);
    // Without -X: nothing (compare_trees then wants no user.* attribute at all).
    c.cmd().args(["copy"]).arg(&src).arg(srv.url("plain")).run().assert_success();
    compare_trees(&src, &srv.root.join("plain"), CompareOpts::default());
    c.cmd().args(["copy"]).arg(srv.url("x")).arg(c.path("plain-back")).run().assert_success();
    compare_trees(&src, &c.path("plain-back"), CompareOpts::default());
    assert_no_tmp(&srv.root);
}

/// -H over fastsync://: names of one inode arrive as hard links both ways (a small file, pipelined, and a large
/// one, sent in ranges: the other names wait for the first); without -H each name is its own file.
#[test]
fn hard_links_go_both_ways_with_h() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    tree_with_empty_dirs(&src);
    write_big_file(&src.join("sub/big.bin"), 0xB1, (12 << 20) + 3);
    fs::hard_link(src.join("a.txt"), src.join("a2.txt")).unwrap();
    fs::hard_link(src.join("a.txt"), src.join("sub/a3.txt")).unwrap();
    fs::hard_link(src.join("sub/big.bin"), src.join("big-too.bin")).unwrap();
    stamp_dir_times(&src, 1_200_000_000);
    let linked = CompareOpts { xattrs: false, hardlinks: true };
    let out = c.cmd().args(["copy", "-H", "--json", "--streams", "3"]).arg(&src).arg(srv.url("h")).run();
    out.assert_success();
    compare_trees(&src, &srv.root.join("h"), linked);
    assert_eq!(json_summary(&out)["hardlinks"].as_u64(), Some(3), "three names linked, not sent");
    let out = c.cmd().args(["copy", "-H", "--json", "--streams", "3"]).arg(srv.url("h")).arg(c.path("back")).run();
    out.assert_success();
    compare_trees(&src, &c.path("back"), linked);
    assert_eq!(json_summary(&out)["hardlinks"].as_u64(), Some(3));
    // A new name of an inode whose first name is unchanged: `sync -H` links it (and sends nothing), both ways.
    fs::hard_link(src.join("a.txt"), src.join("sub/empty/a4.txt")).unwrap();
    stamp_dir_times(&src, 1_200_000_000);
    let out = c.cmd().args(["sync", "-H", "--json"]).arg(&src).arg(srv.url("h")).run();
    out.assert_success();
    compare_trees(&src, &srv.root.join("h"), linked);
    let s = json_summary(&out);
    assert_eq!((s["hardlinks"].as_u64(), s["files"].as_u64()), (Some(1), Some(0)), "{s}");
    let out = c.cmd().args(["sync", "-H", "--json"]).arg(srv.url("h")).arg(c.path("back")).run();
    out.assert_success();
    compare_trees(&src, &c.path("back"), linked);
    let s = json_summary(&out);
    assert_eq!((s["hardlinks"].as_u64(), s["files"].as_u64()), (Some(1), Some(0)), "{s}");
    // Without -H: separate files (compare_trees then wants every file to be its own inode).
    c.cmd().args(["copy"]).arg(&src).arg(srv.url("plain")).run().assert_success();
    compare_trees(&src, &srv.root.join("plain"), CompareOpts::default());
    c.cmd().args(["copy"]).arg(srv.url("h")).arg(c.path("plain-back")).run().assert_success();
    compare_trees(&src, &c.path("plain-back"), CompareOpts::default());
    assert_no_tmp(&srv.root);
    assert_no_tmp(&c.path("back"));
}

#[test]
fn sync_push_twice_transfers_nothing_the_second_time() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    tree_with_empty_dirs(&src);
    c.cmd().arg("sync").arg(&src).arg(srv.url("mirror")).run().assert_success();
    let again = c.cmd().arg("sync").arg(&src).arg(srv.url("mirror")).run();
    again.assert_success();
    again.check(again.stderr_str().contains("0 bytes transferred"), "a no-op sync says so");
    let json = c.cmd().args(["sync", "--json"]).arg(&src).arg(srv.url("mirror")).run();
    let s = json_summary(&json);
    assert_eq!((s["files"].as_u64(), s["bytes"].as_u64(), s["deleted"].as_u64()), (Some(0), Some(0), Some(0)));
    compare_trees(&src, &srv.root.join("mirror"), CompareOpts::default());
    // A changed file and a new one are sent; --delete removes what the source no longer has.
    write_file(&src.join("a.txt"), b"changed");
    write_file(&src.join("new.txt"), b"new");
    fs::remove_dir_all(src.join("other")).unwrap();
    stamp_dir_times(&src, 1_200_000_000);
    let dry = c.cmd().args(["sync", "-n", "--delete"]).arg(&src).arg(srv.url("mirror")).run();
    dry.assert_success();
    let mut lines: Vec<String> = dry.stdout_str().lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines, ["copy   new.txt", "delete other/", "delete other/f", "update a.txt"]);
    assert!(srv.root.join("mirror/other/f").exists(), "a dry run deletes nothing");
    c.cmd().args(["sync", "--delete"]).arg(&src).arg(srv.url("mirror")).run().assert_success();
    compare_trees(&src, &srv.root.join("mirror"), CompareOpts::default());
}

#[test]
fn sync_pull_with_delete_and_dry_run() {
    let c = Case::new();
    let srv = c.serve();
    let remote = srv.root.join("tree");
    tree_with_empty_dirs(&remote);
    let dst = c.path("dst");
    c.cmd().arg("sync").arg(srv.url("tree")).arg(&dst).run().assert_success();
    compare_trees(&remote, &dst, CompareOpts::default());
    // Extraneous local entries, and a changed remote file.
    write_file(&dst.join("extra.txt"), b"extra");
    mkdirs(&dst.join("sub/gone/inner"));
    write_file(&dst.join("sub/gone/inner/x"), b"x");
    write_file(&remote.join("sub/c.txt"), b"new content");
    stamp_dir_times(&remote, 1_200_000_000);
    let dry = c.cmd().args(["sync", "-n", "--delete"]).arg(srv.url("tree")).arg(&dst).run();
    dry.assert_success();
    assert_eq!(
        dry.stdout_str(),
        "update sub/c.txt\ndelete sub/gone/inner/x\ndelete sub/gone/inner/\ndelete sub/gone/\ndelete extra.txt\n"
    );
    assert!(dst.join("extra.txt").exists() && dst.join("sub/gone/inner/x").exists(), "a dry run changes nothing");
    let max = c.cmd().args(["sync", "--delete", "--max-delete", "2"]).arg(srv.url("tree")).arg(&dst).run();
    max.assert_code(1);
    assert!(max.stderr_str().contains("--max-delete 2: 4 entries would be deleted"), "{}", max.stderr_str());
    assert!(dst.join("extra.txt").exists());
    let real = c.cmd().args(["sync", "--delete", "-i"]).arg(srv.url("tree")).arg(&dst).run();
    real.assert_success();
    compare_trees(&remote, &dst, CompareOpts::default());
}

#[test]
fn list_a_remote_directory_like_a_local_one() {
    let c = Case::new();
    let srv = c.serve();
    let remote = srv.root.join("tree");
    tree_with_empty_dirs(&remote);
    for flags in [&["-R"][..], &["-R", "--json"], &["-h"], &["-R", "-h"]] {
        let local = fastsync().arg("list").args(flags).arg(&remote).run();
        local.assert_success();
        let net = c.cmd().arg("list").args(flags).arg(srv.url("tree")).run();
        net.assert_success();
        assert_eq!(net.stdout_str(), local.stdout_str(), "list {flags:?}");
    }
    let file = c.cmd().args(["list", "--json"]).arg(srv.url("tree/a.txt")).run();
    file.assert_success();
    assert_eq!(file.stdout_str(), fastsync().args(["list", "--json"]).arg(remote.join("a.txt")).run().stdout_str());
    let missing = c.cmd().arg("list").arg(srv.url("nope")).run();
    missing.assert_code(1);
    // `PATH/` follows a symlink there as ls does, but never out of the served root (nor in a circle).
    ln_s("/etc", &srv.root.join("out"));
    ln_s("../..", &srv.root.join("tree/up"));
    ln_s("round", &srv.root.join("round"));
    for (link, why) in [("out/", "leads outside the served root"), ("tree/up/", "leads outside the served root")] {
        let out = c.cmd().arg("list").arg(srv.url(link)).run();
        out.assert_code(1);
        out.check(out.stdout.is_empty() && out.stderr_str().contains(why), &format!("list {link}"));
    }
    let out = c.cmd().arg("list").arg(srv.url("round/")).run();
    out.assert_code(1);
    out.check(out.stderr_str().contains("Too many levels of symbolic links"), "list round/");
    // --checksum: the server hashes; the lines are those of a local listing, and a digest is BLAKE3 of the bytes.
    for flags in [&["--checksum"][..], &["--checksum", "-R"], &["--checksum", "-R", "--json"]] {
        let local = fastsync().arg("list").args(flags).arg(&remote).run();
        local.assert_success();
        let net = c.cmd().arg("list").args(flags).arg(srv.url("tree")).run();
        net.assert_success();
        assert_eq!(net.stdout_str(), local.stdout_str(), "list {flags:?}");
    }
    let one = c.cmd().args(["list", "--checksum"]).arg(srv.url("tree/a.txt")).run();
    one.assert_success();
    let want = blake3::hash(&fs::read(remote.join("a.txt")).unwrap()).to_hex().to_string();
    assert!(one.stdout_str().contains(&format!(" {want} a.txt")), "{}", one.stdout_str());
    // An unreadable file: a '?' in its column, one error line naming it, exit 1, the rest listed.
    chmod(&remote.join("b.bin"), 0o000);
    if fs::read(remote.join("b.bin")).is_err() {
        let out = c.cmd().args(["list", "--checksum"]).arg(srv.url("tree")).run();
        out.assert_code(1);
        assert!(out.stdout_str().lines().any(|l| l.contains(" ? ") && l.ends_with("b.bin")), "{}", out.stdout_str());
        let lines = out.stderr_lines();
        assert!(lines.len() == 1 && lines[0].contains("cannot compute the checksum of") && lines[0].contains("b.bin"));
    }
    chmod(&remote.join("b.bin"), 0o755);
}

/// Rewrite `path` with other bytes of the same length, keeping its mtime: only a checksum can tell.
fn same_size_other_bytes(path: &Path) {
    let md = fs::metadata(path).unwrap();
    let mut data = fs::read(path).unwrap();
    for b in data.iter_mut() {
        *b = !*b;
    }
    fs::write(path, &data).unwrap();
    use std::os::unix::fs::MetadataExt;
    set_times(path, md.mtime(), md.mtime_nsec());
}

#[test]
fn sync_checksum_compares_digests_both_ways() {
    let c = Case::new();
    let srv = c.serve();
    let src = c.path("src");
    tree_with_empty_dirs(&src);
    let remote = srv.root.join("tree");
    c.cmd().arg("copy").arg(&src).arg(srv.url("tree")).run().assert_success();
    // Push: a remote file with other bytes but the same size and mtime, and one with the same bytes but another mtime.
    same_size_other_bytes(&remote.join("sub/c.txt"));
    set_times(&remote.join("a.txt"), 1_000_000_000, 0);
    let plain = c.cmd().args(["sync", "-i"]).arg(&src).arg(srv.url("tree")).run();
    plain.assert_success();
    assert!(!plain.stdout_str().contains("sub/c.txt"), "size+mtime cannot see it: {}", plain.stdout_str());
    assert_ne!(digest(&remote.join("sub/c.txt")), digest(&src.join("sub/c.txt")));
    set_times(&remote.join("a.txt"), 1_000_000_000, 0);
    let out = c.cmd().args(["sync", "-i", "--checksum", "--json"]).arg(&src).arg(srv.url("tree")).run();
    out.assert_success();
    let items = out.stdout_str();
    assert!(items.contains(r#""item":"update","path":"sub/c.txt""#), "{items}");
    assert!(items.contains(r#""item":"attrs","path":"a.txt""#), "same bytes: only the mtime is fixed: {items}");
    assert_eq!(json_summary(&out)["files"].as_u64(), Some(1));
    compare_trees(&src, &remote, CompareOpts::default());
    // Pull: the same, the other way.
    let dst = c.path("dst");
    c.cmd().arg("copy").arg(srv.url("tree")).arg(&dst).run().assert_success();
    same_size_other_bytes(&dst.join("sub/deep/d.bin"));
    set_times(&dst.join("b.bin"), 1_000_000_000, 0);
    let out = c.cmd().args(["sync", "-i", "--checksum", "--json"]).arg(srv.url("tree")).arg(&dst).run();
    out.assert_success();
    let items = out.stdout_str();
    assert!(items.contains(r#""item":"update","path":"sub/deep/d.bin""#), "{items}");
    assert!(items.contains(r#""item":"attrs","path":"b.bin""#), "{items}");
    assert_eq!(json_summary(&out)["files"].as_u64(), Some(1));
    compare_trees(&remote, &dst, CompareOpts::default());
    // Nothing differs now: a --checksum sync changes nothing either way.
    let url: std::ffi::OsString = srv.url("tree").into();
    for (from, to) in [(src.into_os_string(), url.clone()), (url, dst.into_os_string())] {
        let out = c.cmd().args(["sync", "--checksum", "--json"]).arg(&from).arg(&to).run();
        out.assert_success();
        assert_eq!(json_summary(&out)["files"].as_u64(), Some(0));
    }
}

#[test]
fn a_read_only_server_is_refused_up_front_and_still_read() {
    let c = Case::new();
    let root = c.path("served");
    tree_with_empty_dirs(&root.join("tree"));
    let srv = Server::start_with(&root, &c.token, &["--read-only"]);
    let src = c.path("src");
    tree_with_empty_dirs(&src);
    let out = c.cmd().arg("copy").arg(&src).arg(srv.url("new")).run();
    out.assert_code(1);
    let lines = out.stderr_lines();
    assert!(lines.len() == 1 && lines[0].contains("read-only"), "{lines:?}");
    assert!(!root.join("new").exists());
    c.cmd().arg("copy").arg(srv.url("tree")).arg(c.path("back")).run().assert_success();
    compare_trees(&root.join("tree"), &c.path("back"), CompareOpts::default());
}

#[test]
fn a_wrong_token_is_refused() {
    let c = Case::new();
    let srv = c.serve();
    let wrong = c.path("wrong");
    fs::write(&wrong, "not-the-token").unwrap();
    mkdirs(&c.path("src"));
    let out = fastsync().arg("--token-file").arg(&wrong).arg("copy").arg(c.path("src")).arg(srv.url("x")).run();
    out.assert_code(1);
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("fastsync: authentication failed: the server rejected the token"), "{lines:?}");
    assert!(!srv.root.join("x").exists());
}

#[test]
fn a_missing_token_is_a_usage_error() {
    let c = Case::new();
    let srv = c.serve();
    mkdirs(&c.path("src"));
    let out = fastsync().arg("copy").arg(c.path("src")).arg(srv.url("x")).run();
    out.assert_code(2);
    assert!(out.stderr_str().contains("token"), "{}", out.stderr_str());
}

#[test]
fn connection_refused_is_one_line_naming_the_address() {
    let c = Case::new();
    // A port nobody listens on: bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    mkdirs(&c.path("src"));
    let out = c.cmd().arg("copy").arg(c.path("src")).arg(format!("fastsync://127.0.0.1:{port}/x")).run();
    out.assert_code(1);
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with(&format!("fastsync: cannot connect to 127.0.0.1:{port}: ")), "{lines:?}");
    assert!(lines[0].contains("refused"), "{lines:?}");
}

#[test]
fn bad_urls_are_usage_errors() {
    let c = Case::new();
    mkdirs(&c.path("src"));
    for url in ["fastsync://", "fastsync://h:0/x", "fastsync://h/../x", "fastsync://::1/x"] {
        let out = c.cmd().arg("copy").arg(c.path("src")).arg(url).run();
        out.assert_code(2);
        let lines = out.stderr_lines();
        assert!(lines.len() == 1 && lines[0].contains(url) && lines[0].contains("invalid URL"), "{url}: {lines:?}");
    }
    let out = c.cmd().arg("list").arg("fastsync://h:x/").run();
    out.assert_code(2);
}

#[test]
fn a_file_is_never_renamed_over_a_fifo_either_way() {
    use std::os::unix::fs::FileTypeExt;
    let c = Case::new();
    let srv = c.serve();
    write_file(&srv.root.join("f.bin"), b"remote");
    mkfifo(&srv.root.join("pipe"));
    let local = c.path("f.bin");
    write_file(&local, b"local");
    let fifo = c.path("pipe");
    mkfifo(&fifo);
    // Pull onto a local FIFO, push onto the server's.
    let pull = c.cmd().arg("copy").arg(srv.url("f.bin")).arg(&fifo).run();
    pull.assert_code(2);
    pull.check(pull.stderr_str().contains("refusing to replace"), "no clear refusal of the pull");
    let push = c.cmd().arg("copy").arg(&local).arg(srv.url("pipe")).run();
    push.assert_code(2);
    push.check(push.stderr_str().contains("refusing to replace"), "no clear refusal of the push");
    for p in [&fifo, &srv.root.join("pipe")] {
        assert!(fs::symlink_metadata(p).unwrap().file_type().is_fifo(), "{} was replaced", p.display());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A hostile server
// ---------------------------------------------------------------------------------------------------------------

fn meta(path: &[u8], kind: EntryKind, size: u64, target: &[u8]) -> EntryMeta {
    EntryMeta {
        path: path.to_vec(),
        kind,
        mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        size,
        mtime_sec: 1_600_000_000,
        mtime_nsec: 0,
        target: target.to_vec(),
        dev: 0,
        ino: 0,
        nlink: 1,
    }
}

/// Speaks the protocol with the right token, and lists entries that leave the destination; a file whose data is
/// corrupt in transit.
fn hostile_server(outside: PathBuf) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let outside = outside.clone();
            std::thread::spawn(move || hostile_connection(stream, &outside));
        }
    });
    port
}

fn hostile_connection(mut s: TcpStream, outside: &Path) {
    if auth::server(&mut s, &Key::from_token(TOKEN.as_bytes()), false).is_err() {
        return;
    }
    let outside = outside.as_os_str().as_encoded_bytes().to_vec();
    let mut evil_abs = outside.clone();
    evil_abs.extend_from_slice(b"/abs");
    while let Ok(msg) = wire::read_msg(&mut s) {
        let replies = match msg {
            Msg::Stat { .. } => vec![Msg::Entry(meta(b"", EntryKind::Dir, 0, b""))],
            Msg::List { .. } => vec![
                Msg::Entry(meta(b"../evil", EntryKind::File, 4, b"")),
                Msg::Entry(meta(b"../esc\x1b[2J\x07\nnext", EntryKind::File, 4, b"")),
                Msg::Entry(meta(&evil_abs, EntryKind::File, 4, b"")),
                Msg::Entry(meta(b"a", EntryKind::Symlink, 0, &outside)),
                Msg::Entry(meta(b"a/x", EntryKind::File, 4, b"")),
                Msg::Entry(meta(b"corrupt", EntryKind::File, 4, b"")),
                Msg::ListEnd,
            ],
            Msg::Get { .. } => vec![
                Msg::Data { offset: 0, digest: [0; 32], bytes: b"evil".to_vec() },
                Msg::DataEnd { size: 4, mtime_sec: 1_600_000_000, mtime_nsec: 0 },
            ],
            Msg::Bye => return,
            _ => vec![Msg::Error { code: code::PROTOCOL, message: "no".into() }],
        };
        for r in replies {
            if wire::write_msg(&mut s, &r).is_err() {
                return;
            }
        }
    }
}

#[test]
fn a_hostile_server_cannot_write_outside_the_destination() {
    let c = Case::new();
    let outside = c.path("outside");
    mkdirs(&outside);
    let port = hostile_server(outside.clone());
    let dst = c.path("in/dst");
    let out = c.cmd().arg("copy").arg(format!("fastsync://127.0.0.1:{port}/")).arg(&dst).run();
    out.assert_code(1);
    let refused: Vec<String> = out.stderr_lines().into_iter().filter(|l| l.contains("refused entry")).collect();
    assert_eq!(refused.len(), 4, "one line per entry that leaves: {:?}", out.stderr_lines());
    for name in ["../evil", "/abs", "a/x", "../esc\\x1b[2J\\x07\\nnext"] {
        assert!(refused.iter().any(|l| l.contains(name)), "{name} not refused: {refused:?}");
    }
    // The server's names cannot send the user's terminal a command.
    assert!(!out.stderr.iter().any(|&b| b == 0x1b || b == 0x07), "a raw control character on stderr");
    assert!(out.stderr_str().contains("corrupt data"), "{}", out.stderr_str());
    // Nothing outside, nothing through the symlink, no corrupt file, no temporaries.
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert!(!c.path("in/evil").exists() && !c.path("evil").exists());
    let names: Vec<_> = fs::read_dir(&dst).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["a"], "only the symlink itself was made");
    assert_eq!(fs::read_link(dst.join("a")).unwrap(), outside);
}

// ---------------------------------------------------------------------------------------------------------------
// A server killed mid-transfer
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn a_server_killed_mid_pull_leaves_nothing_partial_and_a_rerun_finishes() {
    let c = Case::new();
    let mut srv = c.serve();
    let big = srv.root.join("big.bin");
    write_big_file(&big, 0x5EED, 256 << 20);
    write_file(&srv.root.join("small.txt"), b"small");
    let dst = c.path("dst");
    let mut child = Command::new(bin())
        .arg("--token-file")
        .arg(&c.token)
        .args(["copy", "--streams", "2"])
        .arg(srv.url(""))
        .arg(&dst)
        .env("XDG_CONFIG_HOME", "/nonexistent/fastsync-tests")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the server once part of the big file has arrived.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let partial =
            fs::read_dir(&dst).ok().into_iter().flatten().flatten().any(|e| {
                e.file_name().to_string_lossy().contains(".fstmp-") && e.metadata().is_ok_and(|m| m.len() > 0)
            });
        if partial {
            break;
        }
        assert!(Instant::now() < deadline, "the pull never started");
        assert!(child.try_wait().unwrap().is_none(), "the pull finished before the server could be killed");
        std::thread::sleep(Duration::from_millis(2));
    }
    srv.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {lines:?}");
    assert!(lines[0].contains(&srv.addr()), "the line names the server: {lines:?}");
    assert!(!dst.join("big.bin").exists(), "nothing partial under a final name");
    // Only the resumable part of the large file and its journal stay, for the rerun.
    let mut left: Vec<String> =
        tmp_leftovers(&dst).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, [".big.bin.fstmp-journal", ".big.bin.fstmp-part"]);
    // Restarted (on another port), the same command finishes the work.
    let srv = Server::start(&srv.root.clone(), &c.token);
    c.cmd().arg("copy").arg(srv.url("")).arg(&dst).run().assert_success();
    assert_eq!(digest(&dst.join("big.bin")), digest(&big));
    assert_no_tmp(&dst);
    compare_trees(&srv.root, &dst, CompareOpts::default());
}

// ---------------------------------------------------------------------------------------------------------------
// -L on a pull: the server follows symlinks, beneath its root only
// ---------------------------------------------------------------------------------------------------------------

/// A served tree whose symlinks all stay beneath the served root: to a file, up a directory, to a directory, and
/// out of the listed directory (but not out of the root).
fn tree_with_inner_links(served: &Path) -> PathBuf {
    let tree = served.join("tree");
    write_file(&tree.join("real.txt"), &random_bytes(71, 12_345));
    chmod(&tree.join("real.txt"), 0o640);
    set_times(&tree.join("real.txt"), 1_510_000_000, 42);
    write_file(&tree.join("realdir/x.txt"), b"inside the linked dir");
    write_file(&tree.join("realdir/y/z.bin"), &random_bytes(72, 9000));
    write_file(&served.join("beside.bin"), &random_bytes(73, 70_000));
    set_times(&served.join("beside.bin"), 1_520_000_000, 7);
    mkdirs(&tree.join("sub"));
    ln_s("real.txt", &tree.join("link_file"));
    ln_s("../real.txt", &tree.join("sub/link_up"));
    ln_s("realdir", &tree.join("link_dir"));
    ln_s("../beside.bin", &tree.join("link_beside"));
    ln_s("../link_dir/y", &tree.join("sub/chain"));
    stamp_dir_times(&tree, 1_200_000_000);
    tree
}

#[test]
fn pull_with_l_copies_what_links_inside_the_root_lead_to_as_cp_l_does() {
    let c = Case::new();
    let srv = c.serve();
    let tree = tree_with_inner_links(&srv.root);
    // The independent reference: GNU cp following every link, preserving modes and times.
    let expected = c.path("expected");
    let cp = Command::new("cp").arg("-a").arg("-L").arg(&tree).arg(&expected).status().unwrap();
    assert!(cp.success(), "cp -a -L failed");
    let dst = c.path("dst");
    let out = c.cmd().args(["copy", "-L", "--json"]).arg(srv.url("tree")).arg(&dst).run();
    out.assert_success();
    compare_trees(&expected, &dst, CompareOpts::default());
    let kinds = snapshot(&dst);
    assert!(kinds.values().all(|e| e.kind != Kind::Symlink), "-L left a symlink in the destination");
    assert_eq!(entry_of(&dst.join("link_dir")).kind, Kind::Dir);
    assert_eq!(digest(&dst.join("link_beside")), digest(&srv.root.join("beside.bin")));
    assert_eq!(json_summary(&out)["symlinks"].as_u64(), Some(0));
    // Without -L the links come as links.
    let plain = c.path("plain");
    c.cmd().arg("copy").arg(srv.url("tree")).arg(&plain).run().assert_success();
    compare_trees(&tree, &plain, CompareOpts::default());
    // sync -L: a second run finds everything in place; a single linked file is followed as the root too.
    let again = c.cmd().args(["sync", "-L", "--json"]).arg(srv.url("tree")).arg(&dst).run();
    again.assert_success();
    assert_eq!(json_summary(&again)["files"].as_u64(), Some(0), "sync -L copied again what was in place");
    let one = c.path("one.txt");
    c.cmd().args(["copy", "-L"]).arg(srv.url("tree/link_file")).arg(&one).run().assert_success();
    assert_eq!(entry_of(&one).kind, Kind::File);
    assert_eq!(digest(&one), digest(&tree.join("real.txt")));
    assert_eq!(entry_of(&one).mtime, entry_of(&tree.join("real.txt")).mtime);
}

#[test]
fn pull_with_l_refuses_links_out_of_the_root_dangling_links_and_loops_one_line_each() {
    let c = Case::new();
    let srv = c.serve();
    let tree = srv.root.join("tree");
    write_file(&tree.join("ok.txt"), b"fine");
    write_file(&tree.join("deep/ok2.bin"), &random_bytes(74, 100_000));
    // Outside the served root: a secret file and a directory with a file in it.
    let secret = c.path("secret.txt");
    write_file(&secret, b"SECRET OUTSIDE THE ROOT");
    write_file(&c.path("outside_dir/inner.txt"), b"SECRET OUTSIDE THE ROOT, TOO");
    let cases: [(&str, PathBuf, &str); 9] = [
        ("abs", secret.clone(), "outside the served root"),
        ("abs_dir", c.path("outside_dir"), "outside the served root"),
        ("up", PathBuf::from("../../secret.txt"), "outside the served root"),
        ("deep/up_dir", PathBuf::from("../../../outside_dir"), "outside the served root"),
        ("abs_inside", tree.join("ok.txt"), "outside the served root"),
        ("dangling", PathBuf::from("no/such/file"), "No such file or directory"),
        ("loop_a", PathBuf::from("loop_b"), "Too many levels of symbolic links"),
        ("deep/self", PathBuf::from("."), "symlink loop"),
        ("deep/back", PathBuf::from(".."), "symlink loop"),
    ];
    ln_s("loop_a", &tree.join("loop_b"));
    for (link, target, _) in &cases {
        ln_s(target, &tree.join(link));
    }
    let dst = c.path("dst");
    let out = c.cmd().args(["copy", "-L"]).arg(srv.url("tree")).arg(&dst).timeout(Duration::from_secs(60)).run();
    out.assert_code(1);
    let failures = out.failure_lines();
    // loop_b loops too: one line per link that cannot be followed, and nothing else.
    out.check(failures.len() == cases.len() + 1, "one failure line per link that cannot be followed");
    for (link, _, cause) in cases.iter().chain([&("loop_b", PathBuf::new(), "Too many levels of symbolic links")]) {
        let url = srv.url(&format!("tree/{link}"));
        let hit =
            failures.iter().filter(|(what, path, c)| what == "cannot follow" && path == &url && c.contains(cause));
        out.check(hit.count() == 1, &format!("one line names {url} with the cause {cause:?}"));
    }
    // What could be followed is there; nothing of the links that could not, and nothing from outside the root.
    assert_same_bytes(&tree.join("ok.txt"), &dst.join("ok.txt"));
    assert_same_bytes(&tree.join("deep/ok2.bin"), &dst.join("deep/ok2.bin"));
    let got: Vec<String> = snapshot(&dst).keys().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    assert_eq!(got, ["deep", "deep/ok2.bin", "ok.txt"]);
    assert_no_tmp(&dst);
    // Without -L, every one of those links is copied as a link.
    let plain = c.path("plain");
    c.cmd().arg("copy").arg(srv.url("tree")).arg(&plain).run().assert_success();
    compare_trees(&tree, &plain, CompareOpts::default());
    // A root that leads outside is one line too, and nothing is written.
    let out = c.cmd().args(["copy", "-L"]).arg(srv.url("tree/abs")).arg(c.path("single")).run();
    out.assert_code(1);
    out.assert_one_failure("tree/abs", "outside the served root");
    assert!(!c.path("single").exists());
}
