//! Integration tests of `fastsync copy`: what a copy preserves and where it puts things is one conformance suite run
//! every way a copy can go (`case::uring`, `case::fallback`, `case::push` and `case::pull` against a real `fastsync
//! serve`); the engine-specific cases (I/O paths, flags, errors) run on both engines. Results are checked with
//! independent means (std::fs, lstat, libc xattr calls, BLAKE3 digests), never with fastsync itself.

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

every_way!(
    stats_output,
    fsync_and_verify_exact,
    verify_exact,
    fsync_exact,
    file_under_a_file_fails_with_not_a_directory,
    dir_onto_existing_file,
    quiet_run_is_silent,
    nonexistent_src,
    special_files_skipped,
    everything_tree,
    everything_tree_default_flags,
    dir_into_new_nested_dst,
    dir_into_existing_dst,
    empty_source_dir,
    root_dir_metadata,
    file_to_new_path,
    file_into_existing_dir,
    file_into_dir_with_trailing_slash,
    file_onto_existing_file_overwrites,
    overwrite_existing_tree,
    modes_and_owners,
    mtimes_ns,
    mtimes_extreme,
    symlinks_not_followed,
    empty_files_and_dirs,
    non_utf8_names,
    sparse_large,
    sparse_small,
    large_files,
    huge_file,
    chunk_boundaries,
    many_small_files,
    deep_nesting,
    hardlinks_preserved,
    hardlinks_without_flag,
    xattrs_copied,
    xattrs_not_copied_without_flag,
);

// -L: on both engines and pushed (a pull follows only links that stay beneath the served root: tests/remote.rs).
cases_for_ways!(
    [uring => Way::Local(Engine::Uring), fallback => Way::Local(Engine::Fallback), push => Way::Push];
    dereference_file_symlinks,
    dereference_dir_symlink,
    dereference_dangling_fails,
);

both_engines!(
    full_disk_fails_cleanly,
    unnamed_files_link_through_proc_where_by_descriptor_is_refused,
    direct_io_exact,
    direct_io_verify_exact,
    buffered_io_exact,
    json_output,
    json_reports_failures,
    env_selects_engine,
    engine_flag_overrides_env,
    cores_option,
    verbose_run,
    names_in_messages_are_escaped,
    file_onto_itself,
    file_onto_special_file_refused,
    foreign_url_scheme_refused,
    dir_into_itself,
    usage_errors,
    permission_denied_as_nobody,
);

fn mtime_of(p: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.mtime(), m.mtime_nsec())
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn parse_json(out: &Output) -> serde_json::Value {
    let s = out.stdout_str();
    match serde_json::from_str::<serde_json::Value>(s.trim()) {
        Ok(v) => {
            out.check(v.is_object(), "--json stdout is not a JSON object");
            v
        }
        Err(e) => {
            out.check(false, &format!("--json stdout is not exactly one JSON object: {e}"));
            unreachable!()
        }
    }
}

fn json_u64(out: &Output, v: &serde_json::Value, key: &str) -> u64 {
    match v.get(key).and_then(|x| x.as_u64()) {
        Some(n) => n,
        None => {
            out.check(false, &format!("--json: key {key:?} missing or not a non-negative integer"));
            unreachable!()
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Whole trees
// ---------------------------------------------------------------------------------------------------------------

fn everything_tree(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    let info = build_everything(&src);
    if !info.xattrs {
        eprintln!("note: user xattrs not supported on the temp filesystem; xattrs not exercised");
    }
    let dst = t.path().join("dst");
    let out = copy_ok(e, &["-H", "-X"], &src, &dst);
    let err = out.stderr_str();
    for name in &info.special_names {
        let base = Path::new(os(name)).file_name().unwrap().to_string_lossy().into_owned();
        out.check(err.contains(&base), &format!("no warning naming skipped special file {}", show(name)));
    }
    compare_trees(&src, &dst, CompareOpts { xattrs: true, hardlinks: true });
}

fn everything_tree_default_flags(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    build_everything(&src);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts { xattrs: false, hardlinks: false });
}

// ---------------------------------------------------------------------------------------------------------------
// Where things land (rclone's rule)
// ---------------------------------------------------------------------------------------------------------------

fn dir_into_new_nested_dst(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let dst = t.path().join("a/b/c/dst");
    copy_ok(e, &[], &src, &dst);
    assert!(!dst.join("src").exists(), "SRC dir was nested under DST instead of its contents being copied");
    compare_trees(&src, &dst, CompareOpts::default());
}

fn dir_into_existing_dst(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    // Existing DST: contents go directly in it, not in DST/src.
    let dst = t.path().join("dst");
    mkdirs(&dst);
    copy_ok(e, &[], &src, &dst);
    assert!(!dst.join("src").exists(), "existing DST: SRC dir was nested as DST/src");
    compare_trees(&src, &dst, CompareOpts::default());
    // Trailing slash on SRC and DST changes nothing.
    let dst2 = t.path().join("dst2");
    mkdirs(&dst2);
    copy_ok(e, &[], with_slash(&src), with_slash(&dst2));
    assert!(!dst2.join("src").exists(), "trailing slashes: SRC dir was nested as DST/src");
    compare_trees(&src, &dst2, CompareOpts::default());
}

fn empty_source_dir(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    assert!(fs::symlink_metadata(&dst).map(|m| m.is_dir()).unwrap_or(false), "DST not created as a directory");
    assert_eq!(fs::read_dir(&dst).unwrap().count(), 0, "DST of an empty SRC dir is not empty");
}

/// The directory DST created from SRC gets SRC's mode and mtime (directories' metadata is preserved).
fn root_dir_metadata(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    chmod(&src, 0o750);
    set_times(&src, 1_234_567_890, 987_654_321);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
    assert_eq!(mode_of(&dst), 0o750, "mode of the created DST directory");
    assert_eq!(mtime_of(&dst), (1_234_567_890, 987_654_321), "mtime of the created DST directory");
}

fn file_to_new_path(e: Way) {
    let t = tmp();
    let src = t.path().join("in.bin");
    write_file(&src, &random_bytes(1, 10_000));
    lchown(&src, 1234, 5678);
    chmod(&src, 0o640);
    set_times(&src, 1_111_111_111, 222_222_222);
    let dst = t.path().join("out.bin");
    copy_ok(e, &[], &src, &dst);
    let m = fs::symlink_metadata(&dst).unwrap();
    assert!(m.is_file(), "DST is not a regular file");
    assert_same_bytes(&src, &dst);
    assert_eq!(m.mode() & 0o7777, 0o640, "mode");
    assert_eq!((m.uid(), m.gid()), (1234, 5678), "owner");
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_111_111_111, 222_222_222), "mtime");
    assert_no_tmp(t.path());
}

fn file_into_existing_dir(e: Way) {
    let t = tmp();
    let src = t.path().join("in.bin");
    write_file(&src, &random_bytes(2, 5000));
    let dir = t.path().join("dir");
    mkdirs(&dir);
    copy_ok(e, &[], &src, &dir);
    assert!(
        fs::symlink_metadata(dir.join("in.bin")).unwrap().is_file(),
        "file did not keep its name in the existing dir"
    );
    assert_same_bytes(&src, &dir.join("in.bin"));
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
    // A non-UTF-8 name keeps its raw bytes.
    let odd = t.path().join(os(b"caf\xe9.bin"));
    write_file(&odd, b"odd name");
    copy_ok(e, &[], &odd, &dir);
    assert_same_bytes(&odd, &dir.join(os(b"caf\xe9.bin")));
}

fn file_into_dir_with_trailing_slash(e: Way) {
    let t = tmp();
    let src = t.path().join("in.bin");
    write_file(&src, &random_bytes(3, 7000));
    // Existing dir given with a slash.
    let dir = t.path().join("dir");
    mkdirs(&dir);
    copy_ok(e, &[], &src, with_slash(&dir));
    assert_same_bytes(&src, &dir.join("in.bin"));
    // Non-existing dir given with a slash: the file keeps its name inside it.
    let newdir = t.path().join("newdir");
    copy_ok(e, &[], &src, with_slash(&newdir));
    assert!(newdir.is_dir(), "DST ending in / was not created as a directory");
    assert_same_bytes(&src, &newdir.join("in.bin"));
}

fn file_onto_existing_file_overwrites(e: Way) {
    let t = tmp();
    let src = t.path().join("in.bin");
    write_file(&src, &random_bytes(4, 3000));
    chmod(&src, 0o600);
    set_times(&src, 1_000_000_000, 1);
    let dst = t.path().join("out.bin");
    write_file(&dst, &random_bytes(5, 100_000)); // longer: must be truncated
    chmod(&dst, 0o444);
    copy_ok(e, &[], &src, &dst);
    assert_same_bytes(&src, &dst);
    assert_eq!(mode_of(&dst), 0o600);
    assert_eq!(mtime_of(&dst), (1_000_000_000, 1));
}

fn overwrite_existing_tree(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let dst = t.path().join("dst");
    // Stale versions: longer, shorter, read-only, plus a file only in DST.
    write_file(&dst.join("a.txt"), &random_bytes(900, 200_000));
    write_file(&dst.join("sub/c.txt"), b"x");
    write_file(&dst.join("sub/deep/d.bin"), &random_bytes(901, 3000));
    chmod(&dst.join("sub/deep/d.bin"), 0o444);
    write_file(&dst.join("keep.me"), b"only in dst");
    copy_ok(e, &[], &src, &dst);
    assert_eq!(fs::read(dst.join("keep.me")).unwrap(), b"only in dst", "file only in DST was changed or removed");
    fs::remove_file(dst.join("keep.me")).unwrap();
    compare_trees(&src, &dst, CompareOpts::default());
}

// ---------------------------------------------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------------------------------------------

fn modes_and_owners(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    type Spec = (&'static str, u32, Option<(u32, u32)>);
    let files: &[Spec] = &[
        ("suid", 0o4755, Some((1234, 5678))),
        ("sgid", 0o2750, Some((1234, 5678))),
        ("both", 0o6755, None),
        ("sticky_file", 0o1644, None),
        ("none", 0o000, None),
        ("all", 0o777, None),
        ("ro", 0o444, Some((4321, 8765))),
        ("x_only", 0o711, None),
    ];
    for (name, mode, owner) in files {
        let p = src.join(name);
        write_file(&p, name.as_bytes());
        if let Some((u, g)) = owner {
            lchown(&p, *u, *g);
        }
        chmod(&p, *mode);
    }
    // A setgid directory owned by group 5678: files created in it inherit 5678, but the copies must keep 0:0.
    let sg = src.join("setgid_dir");
    mkdirs(&sg);
    write_file(&sg.join("rootfile"), b"root owned");
    mkdirs(&sg.join("rootdir"));
    lchown(&sg, 1234, 5678);
    chmod(&sg, 0o2775);
    let sticky = src.join("sticky_dir");
    mkdirs(&sticky);
    write_file(&sticky.join("f"), b"f");
    chmod(&sticky, 0o1777);
    let private = src.join("private_dir");
    mkdirs(&private);
    write_file(&private.join("f"), b"f");
    chmod(&private, 0o700);
    let ro = src.join("ro_dir");
    mkdirs(&ro.join("inner"));
    write_file(&ro.join("inner/f"), b"f");
    chmod(&ro.join("inner"), 0o500);
    chmod(&ro, 0o555);
    ln_s("suid", &src.join("owned_link"));
    lchown(&src.join("owned_link"), 1234, 5678);
    stamp_dir_times(&src, 1_500_000_000);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn mtimes_ns(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src.join("d1/d2"));
    mkdirs(&src.join("emptydir"));
    for (i, rel) in ["f1", "d1/f2", "d1/d2/f3", "d1/d2/empty"].iter().enumerate() {
        let p = src.join(rel);
        write_file(&p, &random_bytes(i as u64, i * 1000));
        set_times(&p, 1_500_000_000 + i as i64 * 1000, 111_111_111 * (i as i64 + 1) + 3);
    }
    ln_s("f1", &src.join("l1"));
    set_times(&src.join("l1"), 1_400_000_000, 999_999_999);
    ln_s("../nowhere", &src.join("d1/l2"));
    set_times(&src.join("d1/l2"), 1_400_000_001, 1);
    set_times(&src.join("emptydir"), 1_234_000_000, 500_000_001);
    set_times(&src.join("d1/d2"), 1_234_000_001, 500_000_002);
    set_times(&src.join("d1"), 1_234_000_002, 500_000_003);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn mtimes_extreme(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    let cases: &[(&str, i64, i64)] = &[
        ("epoch", 0, 0),
        ("pre_epoch", -86_400, 5),
        ("after_2038", 4_102_444_800, 123_456_789),
        ("ns_max", 1, 999_999_999),
    ];
    for (name, s, ns) in cases {
        let p = src.join(name);
        write_file(&p, name.as_bytes());
        set_times(&p, *s, *ns);
    }
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    for (name, s, ns) in cases {
        assert_eq!(mtime_of(&dst.join(name)), (*s, *ns), "mtime of {name}");
    }
}

fn symlinks_not_followed(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src.join("dir/inner"));
    write_file(&src.join("file.txt"), b"target content");
    write_file(&src.join("dir/inner/x"), b"x");
    ln_s("file.txt", &src.join("rel"));
    ln_s("../file.txt", &src.join("dir/up"));
    ln_s("/etc/passwd", &src.join("abs"));
    ln_s(t.path().join("outside"), &src.join("abs_dangling"));
    ln_s("no/such/target", &src.join("dangling"));
    ln_s("self", &src.join("self"));
    ln_s("loop_b", &src.join("loop_a"));
    ln_s("loop_a", &src.join("loop_b"));
    ln_s("dir", &src.join("to_dir"));
    ln_s("dir/", &src.join("to_dir_slash"));
    ln_s("rel", &src.join("chain"));
    ln_s(os(b"caf\xe9/\xff"), &src.join("nonutf8_target"));
    ln_s("x".repeat(1000), &src.join("long_target"));
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
    // Explicit: the directory link was not followed (no contents duplicated under it).
    assert!(fs::symlink_metadata(dst.join("to_dir")).unwrap().file_type().is_symlink());
}

fn empty_files_and_dirs(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src.join("e1"));
    mkdirs(&src.join("e2/e3/e4"));
    mkdirs(&src.join("has_empty_file"));
    write_file(&src.join("empty"), b"");
    write_file(&src.join("has_empty_file/zero"), b"");
    chmod(&src.join("empty"), 0o604);
    stamp_dir_times(&src, 1_450_000_000);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn non_utf8_names(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    write_file(&src.join(os(b"caf\xe9")), b"latin1");
    mkdirs(&src.join(os(b"\xff\xfe")));
    write_file(&src.join(os(b"\xff\xfe/\x80\x81.bin")), &random_bytes(9, 70_000));
    mkdirs(&src.join(os(b"empty\xc0")));
    ln_s(os(b"caf\xe9"), &src.join(os(b"l\xe9")));
    write_file(&src.join(os(b"\xe2\x28\xa1")), b"invalid utf-8 sequence");
    stamp_dir_times(&src, 1_450_000_000);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

// ---------------------------------------------------------------------------------------------------------------
// Sparse and large files
// ---------------------------------------------------------------------------------------------------------------

fn sparse_large(e: Way) {
    use std::os::unix::fs::FileExt;
    const MIB: u64 = 1 << 20;
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    let p = src.join("sparse");
    let f = fs::File::create(&p).unwrap();
    f.write_all_at(&random_bytes(11, MIB as usize), 0).unwrap();
    f.write_all_at(&random_bytes(12, MIB as usize), 65 * MIB).unwrap();
    drop(f);
    let size = 66 * MIB;
    assert_eq!(fs::metadata(&p).unwrap().len(), size);
    if allocated(&p) > 8 * MIB {
        eprintln!("note: temp filesystem does not keep holes (source allocates {} bytes); skipped", allocated(&p));
        return;
    }
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    let q = dst.join("sparse");
    assert_same_bytes(&p, &q);
    let a = allocated(&q);
    assert!(
        a <= 8 * MIB,
        "holes not preserved: destination allocates {a} bytes for a {size}-byte file with 2 MiB of data (source: {})",
        allocated(&p)
    );
}

fn sparse_small(e: Way) {
    use std::os::unix::fs::FileExt;
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    let p = src.join("small_sparse");
    let f = fs::File::create(&p).unwrap();
    f.set_len(600 * 1024).unwrap(); // trailing hole
    f.write_all_at(&random_bytes(21, 4096), 0).unwrap();
    f.write_all_at(&random_bytes(22, 4096), 300 * 1024).unwrap();
    drop(f);
    set_times(&p, 1_333_333_333, 333);
    if allocated(&p) > 64 * 1024 {
        eprintln!("note: temp filesystem does not keep holes; skipped");
        return;
    }
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    let q = dst.join("small_sparse");
    assert_same_bytes(&p, &q);
    assert_eq!(mtime_of(&q), (1_333_333_333, 333));
    let a = allocated(&q);
    assert!(
        a <= 150 * 1024,
        "holes not preserved: destination allocates {a} bytes for a 600 KiB file with 8 KiB of data (source: {})",
        allocated(&p)
    );
}

fn large_files(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    write_big_file(&src.join("five"), 51, 5 << 20);
    write_big_file(&src.join("twenty_odd"), 52, (20 << 20) + 12_345);
    set_times(&src.join("five"), 1_600_000_000, 5);
    set_times(&src.join("twenty_odd"), 1_600_000_001, 20);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    assert_same_bytes(&src.join("five"), &dst.join("five"));
    assert_same_bytes(&src.join("twenty_odd"), &dst.join("twenty_odd"));
    compare_trees(&src, &dst, CompareOpts::default());
}

fn huge_file(e: Way) {
    let t = tmp();
    let src = t.path().join("huge.bin");
    let len = (130u64 << 20) + 4097;
    write_big_file(&src, 130, len);
    set_times(&src, 1_650_000_000, 130_130_130);
    let dst = t.path().join("copy.bin");
    copy_ok(e, &[], &src, &dst);
    assert_same_bytes(&src, &dst);
    assert_eq!(mtime_of(&dst), (1_650_000_000, 130_130_130));
    assert_no_tmp(t.path());
}

/// Direct I/O (the default, or `--direct-io`): large files go through O_DIRECT on both engines (aligned blocks, the
/// unaligned tail written whole and cut by truncate; io_uring READ_FIXED/WRITE_FIXED, or pread/pwrite), so the
/// destination's pages are not left in the page cache; with `--no-direct-io` they go through it. Both copy exactly.
/// Sizes straddle the 64 MiB threshold and end off a 4 KiB boundary.
fn direct_io_copies(e: Engine, extra: &[&str]) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    let sizes = [(64u64 << 20) - 1, 64 << 20, (70 << 20) + 4097];
    for (i, len) in sizes.iter().enumerate() {
        write_big_file(&src.join(format!("f{i}")), 700 + i as u64, *len);
    }
    let dst = t.path().join("dst");
    copy_ok(e, extra, &src, &dst);
    // Before anything reads the copies back: the largest one went around the page cache or through it. (The
    // filesystem may not take O_DIRECT, as tmpfs before Linux 6.6: the copy then falls back to buffered I/O.)
    let direct = !extra.contains(&"--no-direct-io");
    let cached = cached_fraction(&dst.join("f2"));
    let fs_direct = fs_takes_o_direct(t.path());
    if direct && fs_direct {
        assert!(cached < 0.05, "{e:?} {extra:?}: {:.0}% of the O_DIRECT copy is in the page cache", cached * 100.0);
    } else if !direct {
        assert!(cached > 0.95, "{e:?} {extra:?}: only {:.0}% of a buffered copy is in the page cache", cached * 100.0);
    }
    for (i, len) in sizes.iter().enumerate() {
        let d = dst.join(format!("f{i}"));
        assert_eq!(fs::metadata(&d).unwrap().len(), *len, "size of f{i}");
        assert_same_bytes(&src.join(format!("f{i}")), &d);
    }
    compare_trees(&src, &dst, CompareOpts::default());
    assert_no_tmp(t.path());
}

fn direct_io_exact(e: Engine) {
    direct_io_copies(e, &[]);
}

fn direct_io_verify_exact(e: Engine) {
    direct_io_copies(e, &["--direct-io", "--verify"]);
}

fn buffered_io_exact(e: Engine) {
    direct_io_copies(e, &["--no-direct-io"]);
}

fn chunk_boundaries(e: Way) {
    const K: usize = 1024;
    const M: usize = 1 << 20;
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    let sizes = [
        1,
        511,
        512,
        4095,
        4096,
        4097,
        64 * K - 1,
        64 * K,
        64 * K + 1,
        128 * K + 1,
        M - 1,
        M,
        M + 1,
        2 * M + 1,
        4 * M - 1,
        4 * M,
        4 * M + 1,
    ];
    for (i, s) in sizes.iter().enumerate() {
        write_file(&src.join(format!("size_{s}")), &random_bytes(300 + i as u64, *s));
    }
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn many_small_files(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    let mut rng = Rng::new(1500);
    for i in 0..1500u64 {
        let p = src.join(format!("dir{:02}/file{i:04}", i % 15));
        let n = rng.below(3000) as usize;
        write_file(&p, &random_bytes(i, n));
    }
    stamp_dir_times(&src, 1_420_000_000);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn deep_nesting(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    let mut p = src.clone();
    for i in 0..60 {
        p = p.join(format!("level{i:02}"));
        if i % 10 == 0 {
            mkdirs(&p);
            write_file(&p.join("f"), format!("at {i}").as_bytes());
        }
    }
    mkdirs(&p);
    write_file(&p.join("bottom"), b"bottom");
    stamp_dir_times(&src, 1_480_000_000);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

// ---------------------------------------------------------------------------------------------------------------
// -L, -H, -X
// ---------------------------------------------------------------------------------------------------------------

fn dereference_file_symlinks(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src.join("sub"));
    let real = src.join("real.txt");
    write_file(&real, &random_bytes(61, 12_345));
    chmod(&real, 0o640);
    set_times(&real, 1_510_000_000, 42);
    let outside = t.path().join("outside.bin");
    write_file(&outside, &random_bytes(62, 70_000));
    ln_s("real.txt", &src.join("link_file"));
    ln_s("../real.txt", &src.join("sub/link_up"));
    ln_s(&outside, &src.join("link_abs"));
    let dst = t.path().join("dst");
    copy_ok(e, &["-L"], &src, &dst);
    for (link, target) in [("link_file", &real), ("sub/link_up", &real), ("link_abs", &outside)] {
        let q = dst.join(link);
        let m = fs::symlink_metadata(&q).unwrap_or_else(|er| panic!("{link} missing in DST: {er}"));
        assert!(m.file_type().is_file(), "-L: {link} is not a regular file in DST ({:?})", m.file_type());
        assert_same_bytes(target, &q);
        assert_eq!(m.mode() & 0o7777, mode_of(target), "-L: {link} mode is not the target's");
        assert_eq!((m.mtime(), m.mtime_nsec()), mtime_of(target), "-L: {link} mtime is not the target's");
    }
    assert_same_bytes(&real, &dst.join("real.txt"));
}

fn dereference_dir_symlink(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    let realdir = t.path().join("realdir");
    write_file(&realdir.join("x.txt"), b"inside the linked dir");
    write_file(&realdir.join("y/z.bin"), &random_bytes(63, 9000));
    mkdirs(&src);
    ln_s(&realdir, &src.join("link_dir"));
    let dst = t.path().join("dst");
    copy_ok(e, &["-L"], &src, &dst);
    let q = dst.join("link_dir");
    assert!(fs::symlink_metadata(&q).unwrap().is_dir(), "-L: symlink to a directory is not a directory in DST");
    assert_same_bytes(&realdir.join("x.txt"), &q.join("x.txt"));
    assert_same_bytes(&realdir.join("y/z.bin"), &q.join("y/z.bin"));
}

fn dereference_dangling_fails(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    write_file(&src.join("ok.txt"), b"fine");
    write_file(&src.join("ok2.bin"), &random_bytes(64, 100_000));
    ln_s("no/such/file", &src.join("broken"));
    let dst = t.path().join("dst");
    let out = copy(e, &["-L"], &src, &dst);
    out.assert_code(1);
    out.assert_one_failure("broken", "");
    assert_same_bytes(&src.join("ok.txt"), &dst.join("ok.txt"));
    assert_same_bytes(&src.join("ok2.bin"), &dst.join("ok2.bin"));
    assert!(fs::symlink_metadata(dst.join("broken")).is_err(), "-L: dangling link produced an entry in DST");
    assert_no_tmp(&dst);
}

/// Source with hard-link groups {a, b, sub/c} and {d, other/e}, and a single file f.
fn hardlink_tree(src: &Path) {
    write_file(&src.join("a"), &random_bytes(71, 5000));
    write_file(&src.join("d"), &random_bytes(72, 6000));
    write_file(&src.join("f"), &random_bytes(73, 7000));
    mkdirs(&src.join("sub"));
    mkdirs(&src.join("other"));
    fs::hard_link(src.join("a"), src.join("b")).unwrap();
    fs::hard_link(src.join("a"), src.join("sub/c")).unwrap();
    fs::hard_link(src.join("d"), src.join("other/e")).unwrap();
    set_times(&src.join("a"), 1_520_000_000, 1);
    set_times(&src.join("d"), 1_520_000_000, 2);
    stamp_dir_times(src, 1_440_000_000);
}

fn hardlinks_preserved(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    hardlink_tree(&src);
    let dst = t.path().join("dst");
    copy_ok(e, &["-H"], &src, &dst);
    let m = |r: &str| fs::symlink_metadata(dst.join(r)).unwrap();
    let (a, b, c, d, ee, f) = (m("a"), m("b"), m("sub/c"), m("d"), m("other/e"), m("f"));
    assert!(a.ino() == b.ino() && a.ino() == c.ino(), "-H: a, b, sub/c are not one inode");
    assert_eq!(a.nlink(), 3, "-H: nlink of a");
    assert_eq!(d.ino(), ee.ino(), "-H: d and other/e are not one inode");
    assert_eq!(d.nlink(), 2, "-H: nlink of d");
    assert_ne!(a.ino(), d.ino(), "-H: separate groups merged");
    assert_eq!(f.nlink(), 1);
    compare_trees(&src, &dst, CompareOpts { xattrs: false, hardlinks: true });
}

fn hardlinks_without_flag(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    hardlink_tree(&src);
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts { xattrs: false, hardlinks: false });
}

fn xattr_tree(src: &Path) -> bool {
    mkdirs(src);
    if !xattrs_supported(src) {
        eprintln!("note: user xattrs not supported (ENOTSUP) on the temp filesystem; xattr case skipped");
        return false;
    }
    write_file(&src.join("f.txt"), b"with xattrs");
    lsetxattr(&src.join("f.txt"), "user.a", b"hello").unwrap();
    lsetxattr(&src.join("f.txt"), "user.bin", b"\x00\x01\x02\xff").unwrap();
    lsetxattr(&src.join("f.txt"), "user.empty", b"").unwrap();
    lsetxattr(&src.join("f.txt"), "user.big", &random_bytes(81, 2000)).unwrap();
    write_file(&src.join("big.bin"), &random_bytes(82, 3 << 20));
    lsetxattr(&src.join("big.bin"), "user.on_big", b"chunked file").unwrap();
    write_file(&src.join("plain"), b"no xattrs");
    mkdirs(&src.join("d"));
    lsetxattr(&src.join("d"), "user.dir", b"directory attr").unwrap();
    ln_s("f.txt", &src.join("link"));
    stamp_dir_times(src, 1_460_000_000);
    true
}

fn xattrs_copied(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    if !xattr_tree(&src) {
        return;
    }
    let dst = t.path().join("dst");
    copy_ok(e, &["-X"], &src, &dst);
    let got = user_xattrs(&dst.join("f.txt"));
    assert_eq!(got.get(b"user.a".as_slice()).map(Vec::as_slice), Some(b"hello".as_slice()), "-X: user.a");
    assert_eq!(got.len(), 4, "-X: f.txt xattrs {got:?}");
    compare_trees(&src, &dst, CompareOpts { xattrs: true, hardlinks: false });
}

fn xattrs_not_copied_without_flag(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    if !xattr_tree(&src) {
        return;
    }
    let dst = t.path().join("dst");
    copy_ok(e, &[], &src, &dst);
    compare_trees(&src, &dst, CompareOpts { xattrs: false, hardlinks: false });
}

// ---------------------------------------------------------------------------------------------------------------
// Special files
// ---------------------------------------------------------------------------------------------------------------

fn special_files_skipped(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src.join("sub"));
    write_file(&src.join("a.txt"), b"regular");
    write_file(&src.join("sub/b.txt"), b"regular too");
    mkfifo(&src.join("the_fifo"));
    mkfifo(&src.join("sub/nested_fifo"));
    mksock(&src.join("the_socket"));
    let mut names = vec!["the_fifo", "nested_fifo", "the_socket"];
    if mkchardev(&src.join("the_chardev")) {
        names.push("the_chardev");
    }
    stamp_dir_times(&src, 1_470_000_000);
    let dst = t.path().join("dst");
    let out = copy(e, &[], &src, &dst);
    out.assert_success();
    let err = out.stderr_str();
    for n in &names {
        out.check(err.contains(n), &format!("no warning on stderr naming skipped {n}"));
    }
    compare_trees(&src, &dst, CompareOpts::default());
}

// ---------------------------------------------------------------------------------------------------------------
// --fsync, --verify
// ---------------------------------------------------------------------------------------------------------------

fn durable_tree(src: &Path) {
    build_small_tree(src);
    write_big_file(&src.join("big"), 91, (5 << 20) + 3);
    write_file(&src.join("empty"), b"");
    set_times(&src.join("big"), 1_530_000_000, 9);
    stamp_dir_times(src, 1_200_000_000);
}

fn fsync_exact(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    durable_tree(&src);
    let dst = t.path().join("dst");
    copy_ok(e, &["--fsync"], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn verify_exact(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    durable_tree(&src);
    let dst = t.path().join("dst");
    copy_ok(e, &["--verify"], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn fsync_and_verify_exact(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    durable_tree(&src);
    let dst = t.path().join("dst");
    copy_ok(e, &["--fsync", "--verify"], &src, &dst);
    compare_trees(&src, &dst, CompareOpts::default());
}

// ---------------------------------------------------------------------------------------------------------------
// Output: --stats, --json, -q, -v
// ---------------------------------------------------------------------------------------------------------------

fn stats_output(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    for i in 0..13 {
        write_file(&src.join(format!("f{i}")), &random_bytes(i, 100 * i as usize));
    }
    let dst = t.path().join("dst");
    let out = copy_ok(e, &["--stats"], &src, &dst);
    let so = out.stdout_str();
    out.check(!so.trim().is_empty(), "--stats printed nothing on stdout");
    out.check(so.contains("13"), "--stats summary does not mention the 13 files copied");
    compare_trees(&src, &dst, CompareOpts::default());
}

fn check_json_counts(out: &Output, v: &serde_json::Value, src: &Path, e: Engine) {
    let (files, dirs, links, bytes) = tree_counts(src);
    out.check(v.get("engine").and_then(|x| x.as_str()) == Some(e.name()), "--json: engine is not the forced engine");
    out.check(json_u64(out, v, "files") == files, &format!("--json: files != {files}"));
    let d = json_u64(out, v, "directories");
    out.check(
        d == dirs || d == dirs + 1,
        &format!("--json: directories != {dirs} (or {} counting the root)", dirs + 1),
    );
    out.check(json_u64(out, v, "symlinks") == links, &format!("--json: symlinks != {links}"));
    out.check(json_u64(out, v, "bytes") == bytes, &format!("--json: bytes != {bytes}"));
    out.check(v.get("seconds").map(|x| x.is_number()).unwrap_or(false), "--json: seconds missing or not a number");
    out.check(json_u64(out, v, "cores") >= 1, "--json: cores < 1");
}

fn json_output(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    write_file(&src.join("sub/empty"), b"");
    write_big_file(&src.join("big"), 93, (3 << 20) + 1);
    let dst = t.path().join("dst");
    let out = copy_ok(e, &["--json"], &src, &dst);
    let v = parse_json(&out);
    check_json_counts(&out, &v, &src, e);
    out.check(json_u64(&out, &v, "errors") == 0, "--json: errors != 0");
    out.check(
        v.get("failures").and_then(|x| x.as_array()).map(|a| a.is_empty()).unwrap_or(false),
        "--json: failures is not an empty array",
    );
    compare_trees(&src, &dst, CompareOpts::default());
}

fn json_reports_failures(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    mkdirs(&src);
    write_file(&src.join("ok.txt"), b"fine");
    ln_s("nowhere", &src.join("dangling_one"));
    let dst = t.path().join("dst");
    let out = copy(e, &["-L", "--json"], &src, &dst);
    out.assert_code(1);
    let v = parse_json(&out);
    out.check(json_u64(&out, &v, "errors") == 1, "--json: errors != 1 for one dangling link under -L");
    let fails = v.get("failures").and_then(|x| x.as_array()).cloned().unwrap_or_default();
    out.check(fails.len() == 1, "--json: failures does not hold exactly one entry");
    out.check(
        fails[0].as_str().map(|s| s.contains("dangling_one")).unwrap_or(false),
        "--json: the failure string does not name the entry",
    );
    out.check(v.get("engine").and_then(|x| x.as_str()) == Some(e.name()), "--json: engine is not the forced engine");
    assert_same_bytes(&src.join("ok.txt"), &dst.join("ok.txt"));
    assert_no_tmp(&dst);
}

fn env_selects_engine(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let dst = t.path().join("dst");
    let out = fastsync().env("FASTSYNC_ENGINE", e.name()).arg("copy").arg("--json").arg(&src).arg(&dst).run();
    out.assert_success();
    let v = parse_json(&out);
    check_json_counts(&out, &v, &src, e);
    compare_trees(&src, &dst, CompareOpts::default());
}

fn engine_flag_overrides_env(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let dst = t.path().join("dst");
    let out = copy_cmd(e, &["--json"], &src, &dst).env("FASTSYNC_ENGINE", e.other().name()).run();
    out.assert_success();
    let v = parse_json(&out);
    out.check(
        v.get("engine").and_then(|x| x.as_str()) == Some(e.name()),
        "--engine on the command line did not override FASTSYNC_ENGINE",
    );
    compare_trees(&src, &dst, CompareOpts::default());
}

fn cores_option(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    for i in 0..200u64 {
        write_file(&src.join(format!("d{}/f{i}", i % 7)), &random_bytes(i, (i * 97 % 20_000) as usize));
    }
    write_big_file(&src.join("big"), 94, (6 << 20) + 5);
    stamp_dir_times(&src, 1_410_000_000);
    let dst1 = t.path().join("dst1");
    let out = copy_ok(e, &["--cores", "1", "--json"], &src, &dst1);
    let v = parse_json(&out);
    out.check(json_u64(&out, &v, "cores") == 1, "--cores 1: json cores != 1");
    out.check(v.get("engine").and_then(|x| x.as_str()) == Some(e.name()), "--json: engine is not the forced engine");
    compare_trees(&src, &dst1, CompareOpts::default());
    let dst4 = t.path().join("dst4");
    copy_ok(e, &["--cores", "4"], &src, &dst4);
    compare_trees(&src, &dst4, CompareOpts::default());
}

fn quiet_run_is_silent(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    write_big_file(&src.join("big"), 95, 4 << 20);
    let dst = t.path().join("dst");
    let out = copy_ok(e, &["-q"], &src, &dst);
    out.check(out.stderr.is_empty(), "-q: stderr of a successful run is not empty");
    out.check(out.stdout.is_empty(), "-q: stdout of a successful run is not empty");
    compare_trees(&src, &dst, CompareOpts::default());
    // Without -q and without a TTY, no progress bar (no carriage returns or escape sequences).
    let dst2 = t.path().join("dst2");
    let out = copy_ok(e, &[], &src, &dst2);
    out.check(
        !out.stderr.contains(&b'\r') && !out.stderr.contains(&0x1b),
        "progress bar drawn on stderr although it is not a TTY",
    );
    out.check(
        !out.stdout.contains(&b'\r') && !out.stdout.contains(&0x1b),
        "progress bar drawn on stdout although it is not a TTY",
    );
}

fn verbose_run(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let dst = t.path().join("dst");
    let out = copy_ok(e, &["-v"], &src, &dst);
    out.check(!out.stdout.is_empty() || !out.stderr.is_empty(), "-v: printed nothing at all");
    compare_trees(&src, &dst, CompareOpts::default());
}

// ---------------------------------------------------------------------------------------------------------------
// Errors and refusals
// ---------------------------------------------------------------------------------------------------------------

fn nonexistent_src(e: Way) {
    let t = tmp();
    let src = t.path().join("does_not_exist");
    let dst = t.path().join("dst");
    let out = copy(e, &[], &src, &dst);
    out.assert_code(1);
    out.assert_one_failure("does_not_exist", "No such file or directory");
    assert_no_tmp(t.path());
}

/// A name with a newline, an escape sequence and a byte that is not UTF-8 is named in one line per message, escaped
/// (`\n`, `\x1b`, `\xff`): it cannot split a failure in two nor send the terminal a command.
fn names_in_messages_are_escaped(e: Engine) {
    let t = tmp();
    let missing = t.path().join(os(b"no\nsuch\x1b[2J\xff"));
    let out = copy(e, &[], &missing, t.path().join("dst"));
    out.assert_code(1);
    out.assert_one_failure("no\\nsuch\\x1b[2J\\xff", "No such file or directory");
    out.check(!out.stderr.contains(&0x1b), "a raw escape character reached stderr");

    let src = t.path().join("src");
    mkdirs(&src);
    write_file(&src.join("ok"), b"fine");
    mkfifo(&src.join(os(b"fifo\r\n\x1b]0;pwned\x07")));
    let out = copy_cmd(e, &[], &src, t.path().join("dst2")).timeout(Duration::from_secs(20)).run();
    out.assert_success();
    let warnings: Vec<String> = out.stderr_lines().into_iter().filter(|l| l.contains("fifo")).collect();
    out.check(warnings.len() == 1, "expected one warning line about the FIFO");
    out.check(warnings[0].contains("fifo\\r\\n\\x1b]0;pwned\\x07"), "the FIFO's name is not escaped");
    out.check(!out.stderr.iter().any(|&b| b == 0x1b || b == 0x07 || b == b'\r'), "a raw control character on stderr");
}

fn file_onto_itself(e: Engine) {
    let t = tmp();
    let dir = t.path().join("dir");
    let f = dir.join("f.bin");
    let data = random_bytes(101, 50_000);
    write_file(&f, &data);
    for dst in [f.clone().into_os_string(), dir.clone().into_os_string(), with_slash(&dir)] {
        let out = copy(e, &[], &f, &dst);
        out.assert_code(2);
        out.check(!out.stderr.is_empty(), "refusal printed nothing on stderr");
        assert_eq!(fs::read(&f).unwrap(), data, "file copied onto itself was damaged (DST {dst:?})");
        assert_no_tmp(&dir);
    }
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "extra entries appeared next to the file");
}

/// `copy FILE /dev/null` or onto a FIFO must not rename a regular file over the special file.
fn file_onto_special_file_refused(e: Engine) {
    let t = tmp();
    let f = t.path().join("f.bin");
    write_file(&f, b"data");
    let fifo = t.path().join("pipe");
    mkfifo(&fifo);
    let out = copy_cmd(e, &[], &f, &fifo).timeout(Duration::from_secs(20)).run();
    out.assert_code(2);
    out.check(out.stderr_str().contains("a FIFO"), "the refusal does not say what is in the way");
    out.check(out.stderr_str().contains("pipe"), "the refusal does not name the destination");
    assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    assert_no_tmp(t.path());
    // A file inside a directory that holds a FIFO of the same name: the same refusal (the rule picks DIR/NAME).
    let dir = t.path().join("d");
    mkdirs(&dir);
    mkfifo(&dir.join("f.bin"));
    let out = copy_cmd(e, &[], &f, &dir).timeout(Duration::from_secs(20)).run();
    out.assert_code(2);
    assert!(fs::symlink_metadata(dir.join("f.bin")).unwrap().file_type().is_fifo(), "the FIFO was replaced");
}

/// `s3://...` and other schemes fastsync does not speak are usage errors, unless such a local path exists.
fn foreign_url_scheme_refused(e: Engine) {
    let t = tmp();
    let dst = t.path().join("dst");
    for src in ["s3://bucket/key", "sftp://host/path", "gs://b"] {
        let out = copy_cmd(e, &[], src, &dst).current_dir(t.path()).run();
        out.assert_code(2);
        let scheme = src.split("://").next().unwrap();
        out.check(out.stderr_str().contains(&format!("{scheme}:// URLs are not supported")), "no clear refusal");
        out.check(out.stderr_str().lines().count() == 1, "more than one line on stderr");
    }
    assert!(!dst.exists(), "a refused copy created its destination");
    let out = copy_cmd(e, &[], t.path().join("f"), "s3://bucket/key").current_dir(t.path()).run();
    out.assert_code(2);
    // A local directory called `s3:` makes `s3://bucket/key` a local path (`s3:/bucket/key`), as for any tool.
    write_file(&t.path().join("s3:/bucket/key"), b"local");
    let out = copy_cmd(e, &[], "s3://bucket/key", &dst).current_dir(t.path()).run();
    out.assert_success();
    assert_eq!(fs::read(&dst).unwrap(), b"local");
}

fn dir_into_itself(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let before: Vec<Vec<u8>> = snapshot(&src).into_keys().collect();
    let targets: Vec<PathBuf> = vec![src.clone(), src.join("sub"), src.join("sub/deep"), src.join("new/deeper")];
    for dst in targets {
        let out = copy_cmd(e, &[], &src, &dst).timeout(Duration::from_secs(30)).run();
        out.assert_code(2);
        out.check(!out.stderr.is_empty(), "refusal printed nothing on stderr");
        let after: Vec<Vec<u8>> = snapshot(&src).into_keys().filter(|k| !k.starts_with(b"new")).collect();
        assert_eq!(after, before, "SRC tree changed after refused copy into {}", dst.display());
        assert_no_tmp(&src);
    }
}

fn dir_onto_existing_file(e: Way) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let f = t.path().join("a_file");
    write_file(&f, b"must stay");
    let out = copy(e, &[], &src, &f);
    out.assert_code(2);
    out.check(!out.stderr.is_empty(), "refusal printed nothing on stderr");
    assert!(fs::symlink_metadata(&f).unwrap().is_file(), "the existing file was replaced");
    assert_eq!(fs::read(&f).unwrap(), b"must stay");
    assert_no_tmp(t.path());
}

/// `copy a x/b` where `x` is a file: like cp, "Not a directory" naming `x`, not mkdir's misleading "File exists".
fn file_under_a_file_fails_with_not_a_directory(e: Way) {
    let t = tmp();
    write_file(&t.path().join("a"), b"a");
    write_file(&t.path().join("x"), b"in the way");
    let out = copy(e, &[], t.path().join("a"), t.path().join("x/sub/b"));
    out.assert_code(1);
    // The directory that cannot be made: `x/sub` here, as cp says it; `x` on a server, as `mkdir -p` does.
    out.assert_one_failure(if e == Way::Push { "x" } else { "x/sub" }, "Not a directory");
    assert_eq!(fs::read(t.path().join("x")).unwrap(), b"in the way");
}

fn usage_errors(e: Engine) {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let dst = t.path().join("dst");
    let out = copy(e, &["--no-such-flag"], &src, &dst);
    out.assert_code(2);
    out.check(!dst.exists(), "bad flag: DST was created");
    let out = fastsync().arg("copy").arg("--engine").arg(e.name()).arg(&src).run();
    out.assert_code(2);
    let out = fastsync().arg("copy").arg("--engine").arg("warp-drive").arg(&src).arg(&dst).run();
    out.assert_code(2);
    let out = copy(e, &["--cores", "many"], &src, &dst);
    out.assert_code(2);
    out.check(!dst.exists(), "usage error: DST was created");
}

// ---------------------------------------------------------------------------------------------------------------
// Permission denied (as an unprivileged user)
// ---------------------------------------------------------------------------------------------------------------

fn find_in_path(prog: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .as_bytes()
        .split(|&b| b == b':')
        .map(|d| Path::new(os(d)).join(prog))
        .find(|p| p.is_file())
}

fn permission_denied_as_nobody(e: Engine) {
    let Some(setpriv) = find_in_path("setpriv") else {
        eprintln!("note: setpriv not found; permission-denied case skipped");
        return;
    };
    let t = tmp();
    chmod(t.path(), 0o755);
    // A copy of the binary that nobody can surely execute.
    let exe = t.path().join("fastsync");
    fs::copy(bin(), &exe).unwrap();
    chmod(&exe, 0o755);
    let src = t.path().join("src");
    write_file(&src.join("a.txt"), b"readable a");
    write_file(&src.join("sub/b.bin"), &random_bytes(111, 300_000));
    write_file(&src.join("secret"), &random_bytes(112, 200_000));
    write_file(&src.join("sub/c.txt"), b"readable c");
    for p in ["a.txt", "sub/b.bin", "sub/c.txt"] {
        chmod(&src.join(p), 0o644);
    }
    chmod(&src.join("secret"), 0o000);
    chmod(&src.join("sub"), 0o755);
    chmod(&src, 0o755);
    let dst_parent = t.path().join("dst");
    mkdirs(&dst_parent);
    lchown(&dst_parent, 65534, 65534);
    let dst = dst_parent.join("out");
    let out = Cmd::new(&setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args(["copy", "--engine", e.name()])
        .arg(&src)
        .arg(&dst)
        .run();
    out.assert_code(1);
    out.assert_one_failure("secret", "Permission denied");
    for p in ["a.txt", "sub/b.bin", "sub/c.txt"] {
        assert_same_bytes(&src.join(p), &dst.join(p));
    }
    assert!(fs::symlink_metadata(dst.join("secret")).is_err(), "a file exists under the unreadable file's final name");
    assert_no_tmp(&dst_parent);
    let _ = fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o644));
}

// ---------------------------------------------------------------------------------------------------------------
// Engine-independent CLI checks
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn engine_auto_reports_a_real_engine() {
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let dst = t.path().join("dst");
    let out = fastsync().args(["copy", "--engine", "auto", "--json"]).arg(&src).arg(&dst).run();
    out.assert_success();
    let v = parse_json(&out);
    let eng = v.get("engine").and_then(|x| x.as_str()).unwrap_or("");
    out.check(eng == "uring" || eng == "fallback", "--engine auto: engine is neither uring nor fallback");
    compare_trees(&src, &dst, CompareOpts::default());
}

/// `strace` making `io_uring_setup` fail the way a container's seccomp profile or `kernel.io_uring_disabled` does.
/// Returns `None` (and says so) where strace is missing or cannot trace here.
fn under_failing_io_uring(errno: &str) -> Option<Cmd> {
    if !strace_usable() {
        return None;
    }
    let inject = format!("inject=io_uring_setup:error={errno}");
    Some(
        Cmd::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=io_uring_setup", "-e", &inject])
            .arg(bin()),
    )
}

/// Where linking an unnamed temporary by its descriptor (`linkat` with `AT_EMPTY_PATH`) is refused, as kernels before
/// 6.10 refuse it without CAP_DAC_READ_SEARCH, the file is linked through `/proc/self/fd` instead. strace fails the
/// first `linkat` that names one file (`-P`), the way such a kernel does: the tree still arrives exact.
fn unnamed_files_link_through_proc_where_by_descriptor_is_refused(e: Engine) {
    if !strace_usable() {
        return;
    }
    let t = tmp();
    let src = t.path().join("src");
    for i in 0..20u64 {
        write_file(&src.join(format!("f{i:02}")), &random_bytes(300 + i, 3000));
    }
    let dst = t.path().join("dst");
    let trace = t.path().join("trace");
    let out = Cmd::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg("-P")
        .arg(dst.join("f07"))
        .args(["-e", "trace=linkat", "-e", "inject=linkat:error=ENOENT:when=1"])
        .arg(bin())
        .args(["copy", "--engine", e.name()])
        .arg(&src)
        .arg(&dst)
        .run();
    out.assert_success();
    compare_trees(&src, &dst, CompareOpts::default());
    let trace = fs::read_to_string(&trace).unwrap();
    if !trace.contains("AT_EMPTY_PATH") {
        // O_TMPFILE is unavailable here (named temporaries are renamed instead): nothing to check.
        eprintln!("SKIP: no unnamed temporaries on this filesystem:\n{trace}");
        return;
    }
    let lines: Vec<&str> = trace.lines().collect();
    out.check(
        lines.len() == 2
            && lines[0].contains("INJECTED")
            && lines[1].contains("/proc/self/fd/")
            && lines[1].ends_with("= 0"),
        &format!("f07 was not linked through /proc after the refusal:\n{trace}"),
    );
}

#[test]
fn auto_falls_back_when_io_uring_is_blocked() {
    for errno in ["ENOSYS", "EPERM"] {
        let Some(cmd) = under_failing_io_uring(errno) else { return };
        let t = tmp();
        let src = t.path().join("src");
        build_small_tree(&src);
        let dst = t.path().join("dst");
        let out = cmd.args(["copy", "--engine", "auto", "--json", "-v"]).arg(&src).arg(&dst).run();
        out.assert_success();
        let v = parse_json(&out);
        out.check(v.get("engine").and_then(|x| x.as_str()) == Some("fallback"), "auto did not fall back");
        out.check(
            out.stderr_str().contains("io_uring is unavailable") && out.stderr_str().contains("fallback engine"),
            "-v did not say why the fallback engine was chosen",
        );
        compare_trees(&src, &dst, CompareOpts::default());
    }
}

#[test]
fn auto_fallback_is_silent_without_verbose() {
    let Some(cmd) = under_failing_io_uring("ENOSYS") else { return };
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let out = cmd.args(["copy", "--engine", "auto"]).arg(&src).arg(t.path().join("dst")).run();
    out.assert_success();
    out.check(out.stderr_str().is_empty(), "the fallback choice was announced without -v");
}

#[test]
fn forced_uring_where_blocked_is_an_error() {
    let Some(cmd) = under_failing_io_uring("EPERM") else { return };
    let t = tmp();
    let src = t.path().join("src");
    build_small_tree(&src);
    let dst = t.path().join("dst");
    let out = cmd.env("FASTSYNC_ENGINE", "uring").args(["copy"]).arg(&src).arg(&dst).run();
    out.assert_code(1);
    let lines = out.stderr_lines();
    out.check(lines.len() == 1, "expected exactly one error line");
    out.check(
        lines[0].starts_with("fastsync: --engine uring: io_uring is unavailable"),
        "error does not name the cause",
    );
    out.check(!dst.exists(), "nothing may be written when the forced engine cannot start");
}

/// A destination filesystem that fills up: the file that does not fit fails with one line naming it and the cause,
/// exit 1; the file that fits is copied; nothing partial or temporary is left. Needs root to mount a small tmpfs.
fn full_disk_fails_cleanly(e: Engine) {
    let t = tmp();
    let mnt = t.path().join("tiny");
    let Some(_mounted) = mount_tmpfs(&mnt, "size=2m") else { return };
    let src = t.path().join("src");
    mkdirs(&src);
    write_file(&src.join("big"), &random_bytes(41, 5_000_000));
    write_file(&src.join("small"), &random_bytes(42, 3000));
    let dst = mnt.join("dst");
    let out = copy(e, &[], &src, &dst);
    out.assert_code(1);
    // `big` cannot fit. `small` fits once `big`'s temporary is gone, but the engine's threads copy both at once, so
    // it may also meet the full disk (then it is reported the same way): either way, nothing partial.
    let failures = out.failure_lines();
    assert!(failures.iter().any(|(_, path, _)| path.ends_with("/big")), "big must fail: {}", out.stderr_str());
    for (_, path, cause) in &failures {
        assert!(path.ends_with("/big") || path.ends_with("/small"), "{path}");
        assert!(cause.contains("No space left on device"), "{cause}");
    }
    assert!(!dst.join("big").exists(), "a partial file was left under its final name");
    if !failures.iter().any(|(_, path, _)| path.ends_with("/small")) {
        assert_same_bytes(&src.join("small"), &dst.join("small"));
    } else {
        assert!(!dst.join("small").exists(), "a partial file was left under its final name");
    }
    assert_no_tmp(&mnt);
}
