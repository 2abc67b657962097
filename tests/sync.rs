//! Integration tests of `fastsync sync` (comparison, deletion, filters, dry run) and of what every transfer
//! guarantees when interrupted (SIGKILL, SIGINT), when a source changes under it, and when stale temporaries of
//! dead runs are found. The comparison, deletion, filter and dry-run cases are one conformance suite run every way a
//! sync can go: on both local engines, and over `fastsync://` both ways against a real `fastsync serve`; the rest
//! run on both engines. Results are checked with independent means.

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

every_way!(
    first_sync_copies_and_second_transfers_nothing,
    quick_check_uses_size_and_mtime,
    checksum_finds_same_size_same_time_changes,
    size_only_ignores_times_but_fixes_them,
    ignore_existing_and_update,
    delete_removes_extraneous_only_after_success,
    delete_never_follows_symlinks_out,
    delete_keeps_excluded_entries,
    max_delete_aborts_before_deleting,
    errors_prevent_deletion,
    filters_in_order_and_from_file,
    dry_run_itemizes_and_changes_nothing,
    dry_run_json_items,
    itemized_names_are_one_line_each,
    type_changes_need_delete,
    attributes_fixed_on_unchanged_files,
    large_directories_are_compared_entry_by_entry,
    full_disk_sync_continues_and_fails_cleanly,
    read_only_destination_fails_cleanly,
    torn_source_is_never_copied_silently,
);

both_engines!(
    a_symlink_to_a_directory_as_destination_stands_for_it,
    kill_at_any_moment_then_rerun_is_exact,
    sigint_stops_cleanly_and_resume_continues,
    stale_temporaries_of_dead_runs_are_cleaned,
    io_errors_fail_each_file_cleanly,
    memory_limit_bounds_buffers_and_rss,
);

fn sync(way: impl Into<Way>, extra: &[&str], src: &Path, dst: &Path) -> Output {
    run_way(way, "sync", extra, src, dst)
}

/// Runs a sync that must succeed with `--json`, and returns the summary (the last stdout line).
fn sync_json(way: impl Into<Way>, extra: &[&str], src: &Path, dst: &Path) -> serde_json::Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let out = sync(way, &args, src, dst);
    out.assert_success();
    assert_no_tmp(dst);
    let stdout = out.stdout_str();
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("summary is not JSON ({e}): {stdout}"))
}

fn write_with_time(path: &Path, data: &[u8], sec: i64) {
    write_file(path, data);
    set_times(path, sec, 0);
}

/// The set of relative paths under `root` (not following symlinks).
fn names(root: &Path) -> Vec<String> {
    snapshot(root).keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect()
}

fn first_sync_copies_and_second_transfers_nothing(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    let total = build_small_tree(&src);
    let first = sync_json(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
    assert_eq!(first["files"], 6);
    assert_eq!(first["bytes"], total);
    let before = snapshot(&dst);
    let out = sync(e, &["--json"], &src, &dst);
    out.assert_success();
    let v: serde_json::Value = serde_json::from_str(out.stdout_str().lines().last().unwrap()).unwrap();
    assert_eq!((v["files"].as_u64(), v["bytes"].as_u64()), (Some(0), Some(0)), "a no-op sync transferred data");
    assert_eq!(v["unchanged"], 7, "6 files and 1 symlink are up to date");
    // Nothing was rewritten: same inodes, same times.
    let after = snapshot(&dst);
    for (k, b) in &before {
        assert_eq!(b.ino, after[k].ino, "{} was replaced by a no-op sync", show(k));
    }
    // Nothing was touched at all: a no-op sync does not even re-apply directory metadata (that would change the
    // directories' ctimes).
    let ctimes = |root: &Path| -> Vec<(i64, i64)> {
        let mut v = vec![];
        for d in [root.to_path_buf(), root.join("sub"), root.join("sub/deep"), root.join("emptydir")] {
            let m = fs::symlink_metadata(&d).unwrap();
            v.push((m.ctime(), m.ctime_nsec()));
        }
        v
    };
    let before_ctimes = ctimes(&dst);
    std::thread::sleep(Duration::from_millis(20));
    sync_json(e, &[], &src, &dst);
    assert_eq!(ctimes(&dst), before_ctimes, "a no-op sync changed directory metadata");
    // Without --json it says so in words.
    let out = sync(e, &[], &src, &dst);
    out.assert_success();
    out.check(out.stderr_str().contains("already up to date, 0 bytes transferred"), "a no-op sync must say so");
}

fn quick_check_uses_size_and_mtime(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_with_time(&src.join("same"), b"aaaa", 1_000_000_000);
    write_with_time(&src.join("newtime"), b"bbbb", 1_000_000_000);
    write_with_time(&src.join("newsize"), b"cccc", 1_000_000_000);
    sync_json(e, &[], &src, &dst);
    write_with_time(&src.join("newtime"), b"BBBB", 1_000_000_001);
    write_with_time(&src.join("newsize"), b"cccccc", 1_000_000_000);
    let v = sync_json(e, &["-i"], &src, &dst);
    assert_eq!(v["files"], 2);
    assert_eq!(v["unchanged"], 1);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn checksum_finds_same_size_same_time_changes(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_with_time(&src.join("f"), &random_bytes(1, 3000), 1_000_000_000);
    // Large enough to be chunked (hashes of large files too).
    write_with_time(&src.join("big"), &random_bytes(2, 3 << 20), 1_000_000_000);
    write_with_time(&src.join("g"), b"same", 1_000_000_000);
    sync_json(e, &[], &src, &dst);
    // Same size, same mtime, different bytes: invisible to the quick check.
    let mut changed = random_bytes(1, 3000);
    changed[1234] ^= 0xff;
    write_with_time(&src.join("f"), &changed, 1_000_000_000);
    let mut big = random_bytes(2, 3 << 20);
    big[3 << 19] ^= 1;
    write_with_time(&src.join("big"), &big, 1_000_000_000);
    let v = sync_json(e, &[], &src, &dst);
    assert_eq!(v["files"], 0, "the quick check must not see same-size same-time changes");
    let v = sync_json(e, &["--checksum"], &src, &dst);
    assert_eq!(v["files"], 2);
    assert_eq!(v["unchanged"], 1);
    compare_trees(&src, &dst, CompareOpts::default());
    let v = sync_json(e, &["-c"], &src, &dst);
    assert_eq!((v["files"].as_u64(), v["unchanged"].as_u64()), (Some(0), Some(3)));
}

fn size_only_ignores_times_but_fixes_them(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_with_time(&src.join("f"), b"12345", 1_000_000_000);
    sync_json(e, &[], &src, &dst);
    let ino = fs::metadata(dst.join("f")).unwrap().ino();
    write_with_time(&src.join("f"), b"abcde", 1_100_000_000);
    let v = sync_json(e, &["--size-only"], &src, &dst);
    assert_eq!(v["files"], 0);
    assert_eq!(fs::read(dst.join("f")).unwrap(), b"12345", "--size-only copied a same-size file");
    assert_eq!(fs::metadata(dst.join("f")).unwrap().ino(), ino);
    assert_eq!(fs::metadata(dst.join("f")).unwrap().mtime(), 1_100_000_000, "times of skipped files are set");
}

fn ignore_existing_and_update(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    mkdirs(&dst);
    write_with_time(&src.join("exists"), b"new content", 1_100_000_000);
    write_with_time(&dst.join("exists"), b"old", 1_000_000_000);
    write_with_time(&src.join("newer_dst"), b"source", 1_000_000_000);
    write_with_time(&dst.join("newer_dst"), b"dest is newer", 1_200_000_000);
    write_with_time(&src.join("fresh"), b"fresh", 1_000_000_000);
    let v = sync_json(e, &["--ignore-existing"], &src, &dst);
    assert_eq!(v["files"], 1);
    assert_eq!(fs::read(dst.join("exists")).unwrap(), b"old");
    assert_eq!(fs::read(dst.join("fresh")).unwrap(), b"fresh");
    let v = sync_json(e, &["--update"], &src, &dst);
    assert_eq!(v["files"], 1, "only the file whose destination is older is copied");
    assert_eq!(fs::read(dst.join("exists")).unwrap(), b"new content");
    assert_eq!(fs::read(dst.join("newer_dst")).unwrap(), b"dest is newer");
}

fn delete_removes_extraneous_only_after_success(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    build_small_tree(&src);
    sync_json(e, &[], &src, &dst);
    write_file(&dst.join("extra.txt"), b"x");
    write_file(&dst.join("sub/deep/extra"), b"x");
    write_file(&dst.join("gone/a/b/c"), b"x");
    ln_s("/", &dst.join("sub/extra_link"));
    // Without --delete extraneous entries stay.
    sync_json(e, &[], &src, &dst);
    assert!(dst.join("extra.txt").exists());
    let v = sync_json(e, &["--delete"], &src, &dst);
    // extra.txt, sub/deep/extra, sub/extra_link, gone, gone/a, gone/a/b, gone/a/b/c
    assert_eq!(v["deleted"], 7);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn delete_never_follows_symlinks_out(e: Way) {
    let t = tmp();
    let (src, dst, outside) = (t.path().join("src"), t.path().join("dst"), t.path().join("outside"));
    mkdirs(&src);
    write_file(&src.join("keep"), b"k");
    write_file(&outside.join("precious"), b"p");
    write_file(&outside.join("sub/precious2"), b"p");
    mkdirs(&dst);
    // A destination symlink to a directory outside: deleting it must remove the link only.
    ln_s(&outside, &dst.join("escape"));
    // A source directory whose destination twin is a symlink to the outside directory.
    mkdirs(&src.join("sub"));
    ln_s(outside.join("sub"), &dst.join("sub"));
    let out = sync(e, &["--delete"], &src, &dst);
    out.assert_success();
    assert!(fs::symlink_metadata(dst.join("escape")).is_err(), "the extraneous symlink was not deleted");
    assert!(fs::symlink_metadata(dst.join("sub")).unwrap().is_dir(), "sub must become a real directory");
    assert_eq!(fs::read(outside.join("precious")).unwrap(), b"p");
    assert_eq!(fs::read(outside.join("sub/precious2")).unwrap(), b"p", "deletion followed a symlink out");
}

fn delete_keeps_excluded_entries(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_file(&src.join("a.txt"), b"a");
    mkdirs(&dst);
    write_file(&dst.join("local.log"), b"keep me");
    write_file(&dst.join("stale.txt"), b"delete me");
    let v = sync_json(e, &["--delete", "--exclude", "*.log"], &src, &dst);
    assert_eq!(v["deleted"], 1);
    assert!(dst.join("local.log").exists(), "an excluded destination file was deleted");
    assert!(!dst.join("stale.txt").exists());
}

fn max_delete_aborts_before_deleting(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_file(&src.join("a"), b"a");
    for i in 0..5 {
        write_file(&dst.join(format!("extra{i}")), b"x");
    }
    let out = sync(e, &["--delete", "--max-delete", "4"], &src, &dst);
    out.assert_code(1);
    out.check(out.stderr_str().contains("5 entries would be deleted"), "the error must give the count");
    assert_eq!(names(&dst).len(), 6, "--max-delete must delete nothing when over the limit");
    let v = sync_json(e, &["--delete", "--max-delete", "5"], &src, &dst);
    assert_eq!(v["deleted"], 5);
}

fn errors_prevent_deletion(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src.join("locked"));
    write_file(&src.join("locked/new"), b"n");
    write_file(&src.join("ok"), b"o");
    mkdirs(&dst.join("locked"));
    write_file(&dst.join("extra"), b"x");
    // An immutable directory refuses new entries even to root.
    let chattr = Cmd::new("chattr").arg("+i").arg(dst.join("locked")).run();
    if chattr.code != Some(0) {
        eprintln!("SKIP: chattr +i is not supported here ({})", chattr.stderr_str().trim());
        return;
    }
    let out = sync(e, &["--delete", "--json"], &src, &dst);
    let _ = Cmd::new("chattr").arg("-i").arg(dst.join("locked")).run();
    out.assert_code(1);
    out.check(out.stderr_str().contains("nothing was deleted"), "the summary must say deletions were skipped");
    assert!(dst.join("extra").exists(), "deleted after a failed transfer");
    assert_eq!(fs::read(dst.join("ok")).unwrap(), b"o", "the rest of the run must go on");
    let v: serde_json::Value = serde_json::from_str(out.stdout_str().lines().last().unwrap()).unwrap();
    assert!(v["deletions_skipped"].as_str().unwrap().contains("nothing was deleted"));
}

fn filters_in_order_and_from_file(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    for f in ["a.rs", "b.txt", "keep.log", "x.log", "target/out.rs", "sub/c.rs", "sub/d.txt", "sub/target/e.rs"] {
        write_file(&src.join(f), f.as_bytes());
    }
    // rsync order: --include keep.log before --exclude *.log keeps it; /target is anchored at the root.
    let out = sync(e, &["--include", "keep.log", "--exclude", "*.log", "--exclude", "/target"], &src, &dst);
    out.assert_success();
    let got = names(&dst);
    for want in ["a.rs", "b.txt", "keep.log", "sub/c.rs", "sub/d.txt", "sub/target/e.rs"] {
        assert!(got.contains(&want.to_string()), "{want} missing: {got:?}");
    }
    assert!(!got.contains(&"x.log".to_string()) && !got.contains(&"target".to_string()), "{got:?}");
    // A rules file: only *.rs files, in any directory.
    let rules = t.path().join("rules");
    fs::write(&rules, "# only Rust sources\n+ */\n+ *.rs\n- *\n").unwrap();
    let dst2 = t.path().join("dst2");
    let out = sync(e, &["--filter-from", rules.to_str().unwrap()], &src, &dst2);
    out.assert_success();
    let mut got = names(&dst2);
    got.retain(|n| !fs::symlink_metadata(dst2.join(n)).unwrap().is_dir());
    assert_eq!(got, ["a.rs", "sub/c.rs", "sub/target/e.rs", "target/out.rs"]);
    // A bad rule is a usage error naming the file and line.
    fs::write(&rules, "+ *.rs\nbogus\n").unwrap();
    let out = sync(e, &["--filter-from", rules.to_str().unwrap()], &src, &dst2);
    out.assert_code(2);
    out.check(out.stderr_str().contains("line 2"), "the error must name the line");
}

fn dry_run_itemizes_and_changes_nothing(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_with_time(&src.join("same"), b"s", 1_000_000_000);
    write_with_time(&src.join("changed"), b"c1", 1_000_000_000);
    sync_json(e, &[], &src, &dst);
    write_with_time(&src.join("changed"), b"c22", 1_000_000_000);
    write_file(&src.join("newdir/new"), b"n");
    write_file(&dst.join("old"), b"o");
    let before = snapshot(&dst);
    let out = sync(e, &["--dry-run", "--delete"], &src, &dst);
    out.assert_success();
    let lines: Vec<String> = out.stdout_str().lines().map(str::to_owned).collect();
    assert_eq!(lines, ["update changed", "mkdir  newdir/", "copy   newdir/new", "delete old"].map(String::from));
    let after = snapshot(&dst);
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "a dry run changed the tree");
    for (k, b) in &before {
        assert_eq!((b.ino, b.mtime, b.digest), (after[k].ino, after[k].mtime, after[k].digest), "{} changed", show(k));
    }
    assert_no_tmp(&dst);
}

fn dry_run_json_items(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_file(&src.join("a"), b"a");
    let out = sync(e, &["-n", "--json"], &src, &dst);
    out.assert_success();
    let lines: Vec<serde_json::Value> = out.stdout_str().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "one item and the summary");
    assert_eq!(lines[0]["item"], "copy");
    assert_eq!(lines[0]["path"], "a");
    assert_eq!(lines[1]["dry_run"], true);
    assert_eq!(lines[1]["files"], 1);
    assert!(!dst.exists(), "a dry run created the destination");
}

/// Like rsync's itemized output, one line per change even for names with control characters (escaped) or bytes that
/// are not UTF-8; `--json` carries the name itself.
fn itemized_names_are_one_line_each(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_file(&src.join(os(b"two\nlines")), b"a");
    write_file(&src.join(os(b"esc\x1b[31mred")), b"b");
    write_file(&src.join(os(b"caf\xe9")), b"c");
    let out = sync(e, &["--dry-run"], &src, &dst);
    out.assert_success();
    let mut lines: Vec<String> = out.stdout_str().lines().map(str::to_owned).collect();
    lines.sort();
    assert_eq!(lines, ["copy   caf\\xe9", "copy   esc\\x1b[31mred", "copy   two\\nlines"].map(String::from));
    let out = sync(e, &["--dry-run", "--json"], &src, &dst);
    let paths: Vec<String> = out
        .stdout_str()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["path"].as_str().map(str::to_owned))
        .collect();
    assert!(paths.contains(&"two\nlines".to_owned()), "the JSON item holds the name itself: {paths:?}");
}

/// `/scratch -> /lustre/scratch/me`: a destination that is a symlink to a directory stands for that directory (cp,
/// rsync and rclone follow it too). Before, a directory sync refused it, and with --delete replaced the link.
fn a_symlink_to_a_directory_as_destination_stands_for_it(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    write_file(&src.join("a"), b"a");
    write_file(&src.join("sub/b"), b"b");
    let real = t.path().join("real");
    write_file(&real.join("extra"), b"x");
    let link = t.path().join("link");
    ln_s(&real, &link);
    let first = sync_json(e, &["--delete"], &src, &link);
    assert_eq!((first["files"].as_u64(), first["deleted"].as_u64()), (Some(2), Some(1)));
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link was replaced");
    compare_trees(&src, &real, CompareOpts::default());
    let second = sync_json(e, &["--delete"], &src, &link);
    assert_eq!(second["files"], 0, "an unchanged tree was copied again");
    // A copy too; a link to a file is still refused as the destination of a directory.
    let out = fastsync().args(["copy", "--engine", e.name()]).arg(&src).arg(&link).run();
    out.assert_success();
    ln_s(src.join("a"), &t.path().join("filelink"));
    let out = fastsync().args(["copy", "--engine", e.name()]).arg(&src).arg(t.path().join("filelink")).run();
    out.assert_code(2);
}

fn type_changes_need_delete(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    write_file(&src.join("was_dir"), b"now a file");
    write_file(&src.join("was_file/inner"), b"now a dir");
    write_file(&dst.join("was_dir/old"), b"x");
    write_file(&dst.join("was_file"), b"x");
    let out = sync(e, &[], &src, &dst);
    out.assert_code(1);
    out.check(out.stderr_str().contains("--delete replaces it"), "the error must say how to proceed");
    assert!(dst.join("was_dir/old").exists(), "replaced without --delete");
    sync_json(e, &["--delete"], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn attributes_fixed_on_unchanged_files(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_with_time(&src.join("f"), b"data", 1_000_000_000);
    chmod(&src.join("f"), 0o640);
    sync_json(e, &[], &src, &dst);
    chmod(&src.join("f"), 0o604);
    let v = sync_json(e, &["-i"], &src, &dst);
    assert_eq!((v["files"].as_u64(), v["attrs_updated"].as_u64()), (Some(0), Some(1)));
    assert_eq!(fs::metadata(dst.join("f")).unwrap().mode() & 0o7777, 0o604);
}

/// Directories larger than the scanner's chunk (256 entries), nested, with changes spread over them: exactly the
/// changed files are copied, and every unchanged one is seen as such.
fn large_directories_are_compared_entry_by_entry(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    for d in ["", "a", "a/b"] {
        for i in 0..700 {
            write_with_time(&src.join(d).join(format!("f{i:04}")), format!("{d}{i}").as_bytes(), 1_000_000_000);
        }
    }
    sync_json(e, &[], &src, &dst);
    let mut changed = 0;
    for d in ["", "a", "a/b"] {
        for i in (0..700).step_by(7) {
            write_with_time(&src.join(d).join(format!("f{i:04}")), b"changed!", 1_000_000_000);
            changed += 1;
        }
    }
    let v = sync_json(e, &[], &src, &dst);
    assert_eq!(v["files"], changed);
    assert_eq!(v["unchanged"], 2100 - changed);
    compare_trees(&src, &dst, CompareOpts::default());
}

// ---------------------------------------------------------------------------------------------------------------
// Interruption and resume
// ---------------------------------------------------------------------------------------------------------------

fn spawn(engine: Engine, cmd: &str, extra: &[&str], src: &Path, dst: &Path) -> Child {
    Command::new(bin())
        .args([cmd, "--engine", engine.name(), "--json"])
        .args(extra)
        .arg(src)
        .arg(dst)
        .env_remove("FASTSYNC_ENGINE")
        .env("XDG_CONFIG_HOME", "/nonexistent/fastsync-tests")
        .env("XDG_STATE_HOME", state_home())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A source with one large file (several sequential ranges), a medium one and many small ones.
fn build_interruptible(src: &Path) {
    mkdirs(src);
    write_big_file(&src.join("big.bin"), 7, 300 << 20);
    write_big_file(&src.join("medium.bin"), 8, 9 << 20);
    for i in 0..400 {
        write_file(&src.join(format!("small/{:03}/{i}", i % 17)), &random_bytes(i, 100 + (i as usize * 37) % 5000));
    }
}

/// Every file under `dst` with a final (non-temporary) name equals its source, byte for byte.
fn assert_final_names_complete(src: &Path, dst: &Path) {
    if !dst.exists() {
        return;
    }
    for (rel, entry) in snapshot(dst) {
        let name = String::from_utf8_lossy(&rel).into_owned();
        if name.contains(".fstmp-") || entry.digest.is_none() {
            continue;
        }
        let s = src.join(os(&rel));
        assert_eq!(Some(digest(&s)), entry.digest, "{name} is under its final name but incomplete or wrong");
    }
}

fn kill_at_any_moment_then_rerun_is_exact(e: Engine) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    build_interruptible(&src);
    let journal = dst.join(".big.bin.fstmp-journal");
    // Fixed delays land anywhere (walk, small files, large file); `None` waits until the large file's journal holds
    // a finished range, so that the rerun must resume it.
    for delay_ms in [Some(5u64), Some(40), Some(150), None] {
        let _ = fs::remove_dir_all(&dst);
        let mut child = spawn(e, "copy", &[], &src, &dst);
        match delay_ms {
            Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
            None => {
                let start = Instant::now();
                while fs::read_to_string(&journal).map_or(0, |j| j.lines().count()) < 2 {
                    assert!(start.elapsed() < Duration::from_secs(30), "the journal never recorded a range");
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert_final_names_complete(&src, &dst);
        // After the header, one "OFFSET LEN" line per range written (64 MiB through the page cache, smaller when
        // direct I/O spreads a file over the cores).
        let text = fs::read_to_string(&journal).unwrap_or_default();
        let ranges: Vec<u64> = text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).collect();
        let (recorded, recorded_bytes) = (ranges.len(), ranges.iter().sum::<u64>());
        let out = fastsync().args(["copy", "--engine", e.name(), "--json"]).arg(&src).arg(&dst).run();
        out.assert_success();
        compare_trees(&src, &dst, CompareOpts::default());
        assert_no_tmp(&dst);
        if recorded > 0 {
            let v: serde_json::Value = serde_json::from_str(out.stdout_str().lines().last().unwrap()).unwrap();
            let written = v["bytes"].as_u64().unwrap();
            // Each recorded range is one the rerun verified instead of copying.
            let total = (300 << 20) + (9 << 20) + 2_000_000;
            assert!(written <= total - recorded_bytes, "the rerun did not resume: {written} ({recorded} ranges)");
        }
    }
}

fn sigint_stops_cleanly_and_resume_continues(e: Engine) {
    for (signal, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        interrupt_then_resume(e, signal, code);
    }
}

fn interrupt_then_resume(e: Engine, signal: i32, code: i32) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    build_interruptible(&src);
    let child = spawn(e, "sync", &[], &src, &dst);
    // Wait until the large file is being written, then interrupt.
    let part = dst.join(".big.bin.fstmp-part");
    let start = Instant::now();
    while !part.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: plain syscall on our child's pid.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(0) {
        eprintln!("the run finished before the signal arrived; nothing to check");
        return;
    }
    assert_eq!(out.status.code(), Some(code), "signal {signal} must exit {code}: {stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.lines().count() <= 3, "an interruption must not print one line per file: {stderr}");
    assert_final_names_complete(&src, &dst);
    let v = sync_json(e, &[], &src, &dst);
    assert!(v["bytes"].as_u64().unwrap() <= (300 << 20) + (9 << 20) + 2_000_000);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn torn_source_is_never_copied_silently(e: Way) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_big_file(&src.join("growing"), 3, 32 << 20);
    write_file(&src.join("stable"), b"stable");
    // A writer that keeps rewriting the first bytes (new data, new mtime) for the whole run, without pausing: every
    // attempt's copy overlaps writes.
    let path = src.join("growing");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                f.write_all_at(&n.to_le_bytes(), 0).unwrap();
                std::thread::yield_now();
            }
            n
        })
    };
    let out = sync(e, &[], &src, &dst);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    if out.code == Some(0) {
        // On a loaded machine the writer can miss a whole attempt (not scheduled while it ran): that attempt's copy
        // is then a true snapshot, which is correct. It must be one: the untouched bytes, and a counter the writer
        // really wrote.
        let (copy, now) = (fs::read(dst.join("growing")).unwrap(), fs::read(src.join("growing")).unwrap());
        assert!(copy[8..] == now[8..], "exit 0 with a torn copy");
        let n = u64::from_le_bytes(copy[..8].try_into().unwrap());
        assert!(n <= writes, "exit 0 with a counter ({n}) the writer never wrote (last {writes})");
    } else {
        out.assert_code(1);
        out.assert_one_failure("growing", "kept changing");
        assert!(!dst.join("growing").exists(), "a torn copy was put under the final name");
    }
    assert_eq!(fs::read(dst.join("stable")).unwrap(), b"stable");
    assert_no_tmp(&dst);
    // Once the source is quiet, a rerun copies it exactly.
    sync_json(e, &[], &src, &dst);
    assert_same_bytes(&src.join("growing"), &dst.join("growing"));
}

fn stale_temporaries_of_dead_runs_are_cleaned(e: Engine) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    build_interruptible(&src);
    build_small_tree(&src.join("tree"));
    sync_json(e, &[], &src, &dst);
    // A clean run leaves no marker, so the next run does not scan: planted temporaries stay (they are not ours to
    // judge without a dead run's marker).
    let planted = [
        dst.join("tree/.a.txt.fstmp-4194305-12"),
        dst.join("tree/sub/deep/.d.bin.fstmp-4194305-3"),
        dst.join("tree/sub/.vanished.fstmp-part"),
        dst.join("tree/sub/.vanished.fstmp-journal"),
    ];
    for p in &planted {
        write_file(p, b"stale");
    }
    let v = sync_json_allow_tmp(e, &src, &dst);
    assert_eq!(v["stale_removed"], 0, "scanned without a dead run's marker");
    // A run killed with SIGKILL leaves its marker; the next run finds it and cleans what dead runs left (PID
    // 4194305 is above pid_max: never alive).
    // New contents (same size), so that the next run copies the large file again and can be killed in the middle.
    write_big_file(&src.join("big.bin"), 77, 300 << 20);
    let mut child = spawn(e, "sync", &[], &src, &dst);
    let part = dst.join(".big.bin.fstmp-part");
    let start = Instant::now();
    while !part.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "the large file was never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "the run ended before it could be killed");
    let v = sync_json(e, &[], &src, &dst);
    assert!(v["stale_removed"].as_u64().unwrap() >= 4, "stale temporaries not cleaned: {v}");
    assert_no_tmp(&dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

/// A successful sync whose destination may hold temporaries that are not its own.
fn sync_json_allow_tmp(engine: Engine, src: &Path, dst: &Path) -> serde_json::Value {
    let out = sync(engine, &["--json"], src, dst);
    out.assert_success();
    serde_json::from_str(out.stdout_str().lines().last().unwrap()).unwrap()
}

fn full_disk_sync_continues_and_fails_cleanly(e: Way) {
    let t = tmp();
    let mnt = t.path().join("tiny");
    let Some(_mounted) = mount_tmpfs(&mnt, "size=3m") else { return };
    let src = t.path().join("src");
    mkdirs(&src);
    write_file(&src.join("a_small"), &random_bytes(1, 3000));
    write_file(&src.join("big"), &random_bytes(2, 5_000_000));
    write_file(&src.join("z_small"), &random_bytes(3, 3000));
    let dst = mnt.join("dst");
    write_file(&dst.join("extra"), b"x");
    let out = sync(e, &["--delete"], &src, &dst);
    out.assert_code(1);
    out.check(out.stderr_str().contains("No space left on device"), "the cause must be named");
    out.check(out.stderr_str().contains("nothing was deleted"), "no deletion after a failure");
    assert!(!dst.join("big").exists(), "a partial file was left under its final name");
    // The small files fit once `big`'s temporary is gone, but the engine's threads copy them at the same time, so
    // one may meet the full disk too (and is then reported): never partial.
    let failures = out.failure_lines();
    for name in ["a_small", "z_small"] {
        if failures.iter().any(|(_, path, _)| path.ends_with(&format!("/{name}"))) {
            assert!(!dst.join(name).exists(), "a partial file was left under its final name");
        } else {
            assert_same_bytes(&src.join(name), &dst.join(name));
        }
    }
    assert!(dst.join("extra").exists());
    assert_no_tmp(&mnt);
}

fn read_only_destination_fails_cleanly(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let mnt = t.path().join("ro");
    let Some(_m) = mount_tmpfs(&mnt, "size=8m") else { return };
    let dst = mnt.join("dst");
    write_file(&dst.join("extra"), b"x");
    write_file(&dst.join("a.txt"), b"old");
    Cmd::new("mount").args(["-o", "remount,ro"]).arg(&mnt).run().assert_success();
    let out = sync(e, &["--delete"], &src, &dst);
    out.assert_code(1);
    let err = out.stderr_str();
    assert!(err.contains("Read-only file system"), "the cause must be named: {err}");
    assert!(err.contains("nothing was deleted"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(fs::read(dst.join("a.txt")).unwrap(), b"old", "the old file must be intact");
    assert!(dst.join("extra").exists());
}

/// Every write failing with EIO (injected by strace into `pwrite64` and `copy_file_range`): each file fails with
/// one line naming it and the cause, nothing appears under a final name, no temporary is left.
fn io_errors_fail_each_file_cleanly(e: Engine) {
    let probe = Cmd::new("strace").args(["-f", "-qq", "-o", "/dev/null", "true"]).run();
    if probe.code != Some(0) {
        eprintln!("SKIP: strace is unavailable or cannot trace here ({})", probe.stderr_str().trim());
        return;
    }
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    for i in 0..5 {
        write_file(&src.join(format!("f{i}")), &random_bytes(i, 5000 + i as usize));
    }
    write_big_file(&src.join("big"), 9, 3 << 20);
    let out = Cmd::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=pwrite64,copy_file_range,write", "-e"])
        .arg("inject=pwrite64,copy_file_range:error=EIO")
        .arg(bin())
        .args(["sync", "--engine", e.name()])
        .arg(&src)
        .arg(&dst)
        .run();
    out.assert_code(1);
    let failures = out.failure_lines();
    assert_eq!(failures.len(), 6, "one line per file: {}", out.stderr_str());
    for (_, path, cause) in &failures {
        assert!(path.starts_with(dst.to_str().unwrap()), "errors name the destination: {path}");
        assert!(cause.contains("Input/output error"), "{cause}");
    }
    let left: Vec<String> = names(&dst);
    assert!(left.is_empty(), "nothing may appear under a final name: {left:?}");
}

/// `--memory-limit` sizes the buffers (a quarter of the limit, `-v` says how) and the process stays inside it.
fn memory_limit_bounds_buffers_and_rss(e: Engine) {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    mkdirs(&src);
    write_big_file(&src.join("big"), 5, 40 << 20);
    for i in 0..2000 {
        write_file(&src.join(format!("d{}/f{i}", i % 20)), &random_bytes(i, 200));
    }
    let out = fastsync()
        .args(["copy", "-v", "--json", "--memory-limit", "64M", "--cores", "2", "--engine", e.name()])
        .arg(&src)
        .arg(&dst)
        .run();
    out.assert_success();
    let err = out.stderr_str();
    compare_trees(&src, &dst, CompareOpts::default());
    assert!(err.contains("memory limit 64 MiB"), "-v must say the limit: {err}");
    // A quarter of 64 MiB over 2 uring shards is 8 slots of 1 MiB each (the fallback: one block per thread). The
    // default sizing (32 slots each: 64 MiB of buffers alone) would not fit.
    if e == Engine::Uring {
        assert!(err.contains("2 shards x 8 slots"), "buffers not sized from the limit: {err}");
    }
    // The peak fastsync reports is its own VmHWM: wait4's ru_maxrss would be this test process's peak when that is
    // higher (a child started with vfork inherits its parent's peak at exec).
    let v: serde_json::Value = serde_json::from_str(out.stdout_str().lines().last().unwrap()).unwrap();
    let rss_bytes = v["peak_rss_bytes"].as_u64().unwrap();
    assert!(rss_bytes > 1 << 20 && rss_bytes < 64 << 20, "peak RSS {} MiB is over the 64 MiB limit", rss_bytes >> 20);
}
