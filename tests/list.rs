//! Integration tests of `fastsync list`: exact lines for trees with fixed times and modes, depth-first order,
//! human-readable sizes, JSON objects, BLAKE3 digests computed on the engine (checked against `blake3::hash`),
//! symlinks never followed, raw non-UTF-8 names, errors, and a closed stdout. Every case runs on both engines, and what
//! a listing shows is also checked listing the same directory through a real `fastsync serve`.

#[macro_use]
mod common;

use common::*;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

// Each case on both engines, and `remote`: the listed directory served by a real `fastsync serve`, listed by URL (one
// conformance suite for local and remote listings).
cases_for_ways!(
    [uring => Way::Local(Engine::Uring), fallback => Way::Local(Engine::Fallback), remote => Way::Pull];
    plain_listing_exact_lines,
    recursive_is_depth_first_in_byte_order,
    checksum_digests_in_listing_order,
    symlinks_are_never_followed,
    non_utf8_names_are_written_raw,
    nonexistent_path_fails,
    single_file_path,
);

both_engines!(
    human_readable_sizes,
    json_fields,
    names_are_escaped_on_a_terminal,
    unreadable_entries_are_reported_and_listing_goes_on,
    closed_stdout_ends_quietly,
);

fn list_cmd(engine: Engine, extra: &[&str], path: impl AsRef<OsStr>) -> Cmd {
    fastsync().arg("list").arg("--engine").arg(engine.name()).args(extra).arg(path)
}

/// `fastsync list [EXTRA] PATH` on a local engine, or of PATH served by a real server (by URL).
fn list(way: impl Into<Way>, extra: &[&str], path: impl AsRef<OsStr>) -> Output {
    match way.into() {
        Way::Local(e) => list_cmd(e, extra, path).run(),
        Way::Push | Way::Pull => {
            let (_server, url) = served(Path::new(path.as_ref()));
            remote_client().arg("list").args(extra).arg(url).run()
        }
    }
}

/// Runs a listing that must succeed with nothing on stderr; returns its stdout lines (raw bytes).
fn list_ok(way: impl Into<Way>, extra: &[&str], path: impl AsRef<OsStr>) -> Vec<Vec<u8>> {
    let out = list(way, extra, path);
    out.assert_success();
    out.check(out.stderr.is_empty(), "a good listing prints nothing on stderr");
    raw_lines(&out.stdout)
}

fn raw_lines(stdout: &[u8]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = stdout.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    assert_eq!(
        v.pop().as_deref(),
        Some(&b""[..]),
        "output must end with a newline: {:?}",
        String::from_utf8_lossy(stdout)
    );
    v
}

fn text(lines: &[Vec<u8>]) -> Vec<String> {
    lines.iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect()
}

/// The first `n` whitespace-separated fields of a line, and the rest (the path) after the whitespace that follows.
fn split_line(line: &[u8], n: usize) -> (Vec<String>, Vec<u8>) {
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < n {
        while i < line.len() && line[i] == b' ' {
            i += 1;
        }
        let start = i;
        while i < line.len() && line[i] != b' ' {
            i += 1;
        }
        assert!(i > start, "line has fewer than {n} fields: {:?}", String::from_utf8_lossy(line));
        fields.push(String::from_utf8_lossy(&line[start..i]).into_owned());
    }
    while i < line.len() && line[i] == b' ' {
        i += 1;
    }
    (fields, line[i..].to_vec())
}

/// The paths of a text listing (4 fields before the path: mode, size, date, time; 5 with --checksum).
fn paths(lines: &[Vec<u8>], checksum: bool) -> Vec<String> {
    let n = if checksum { 5 } else { 4 };
    lines.iter().map(|l| String::from_utf8_lossy(&split_line(l, n).1).into_owned()).collect()
}

/// One expected text line (the format documented for `fastsync list`).
fn line(mode: &str, size: u64, time: &str, path: &str) -> String {
    format!("{mode} {size:>12} {time} {path}")
}

fn json_lines(lines: &[Vec<u8>]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_slice(l).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(l)))
        })
        .collect()
}

fn lsize(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().len()
}

fn hex(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

fn plain_listing_exact_lines(e: Way) {
    let t = tmp();
    let root = t.path().join("root");
    mkdirs(&root);
    // Byte order puts digits and capitals before small letters (a locale-aware sort would not).
    let upper = root.join("B_upper");
    write_file(&upper, b"");
    chmod(&upper, 0o600);
    set_times(&upper, -1, 0);
    let a = root.join("a.txt");
    write_file(&a, b"hello");
    chmod(&a, 0o644);
    set_times(&a, 1_300_000_000, 123_456_789);
    let d = root.join("d");
    write_file(&d.join("inner"), b"not listed without -R");
    chmod(&d, 0o750);
    set_times(&d, 1_000_000_000, 0);
    let link = root.join("link");
    ln_s("a.txt", &link);
    set_times(&link, 951_782_400, 5);
    let suid = root.join("suid");
    write_file(&suid, &[7u8; 1000]);
    chmod(&suid, 0o4755);
    set_times(&suid, 1_300_000_000, 0);
    let sgid = root.join("sgid");
    write_file(&sgid, &[1u8; 123_456]);
    chmod(&sgid, 0o2640);
    set_times(&sgid, 1_300_000_001, 1);
    let sticky = root.join("sticky");
    mkdirs(&sticky);
    chmod(&sticky, 0o1777);
    set_times(&sticky, 1_300_000_002, 999_999_999);
    let future = root.join("z_future");
    write_file(&future, b"0123456789");
    chmod(&future, 0o400);
    set_times(&future, 4_102_444_800, 999_999_999);

    let expected = vec![
        line("-rw-------", 0, "1969-12-31 23:59:59.000000000", "B_upper"),
        line("-rw-r--r--", 5, "2011-03-13 07:06:40.123456789", "a.txt"),
        line("drwxr-x---", lsize(&d), "2001-09-09 01:46:40.000000000", "d"),
        line("lrwxrwxrwx", 5, "2000-02-29 00:00:00.000000005", "link -> a.txt"),
        line("-rw-r-S---", 123_456, "2011-03-13 07:06:41.000000001", "sgid"),
        line("drwxrwxrwt", lsize(&sticky), "2011-03-13 07:06:42.999999999", "sticky"),
        line("-rwsr-xr-x", 1000, "2011-03-13 07:06:40.000000000", "suid"),
        line("-r--------", 10, "2100-01-01 00:00:00.999999999", "z_future"),
    ];
    assert_eq!(text(&list_ok(e, &[], &root)), expected);
    // A trailing slash changes nothing for a directory.
    assert_eq!(text(&list_ok(e, &[], with_slash(&root))), expected);
    // An empty directory lists nothing.
    let empty = t.path().join("empty");
    mkdirs(&empty);
    assert!(list_ok(e, &[], &empty).is_empty());
}

fn recursive_is_depth_first_in_byte_order(e: Way) {
    let t = tmp();
    let root = t.path().join("root");
    for f in ["Z", "a/x", "a/y/deep", "a-b", "a.b/k", "b"] {
        write_file(&root.join(f), f.as_bytes());
    }
    let top = ["Z", "a", "a-b", "a.b", "b"];
    assert_eq!(paths(&list_ok(e, &[], &root), false), top);
    let all = ["Z", "a", "a/x", "a/y", "a/y/deep", "a-b", "a.b", "a.b/k", "b"];
    assert_eq!(paths(&list_ok(e, &["-R"], &root), false), all);
    assert_eq!(paths(&list_ok(e, &["--recursive"], &root), false), all);
    // A subdirectory as PATH: paths are relative to it.
    assert_eq!(paths(&list_ok(e, &["-R"], root.join("a")), false), ["x", "y", "y/deep"]);

    // A deep chain (no recursion limit): level i holds "d" (level i + 1) and "f<i>". "d" sorts first, so depth-first
    // lists the whole chain of directories, then the files from the deepest up.
    let deep = t.path().join("deep");
    let levels = 150;
    let chain = |n: usize| vec!["d"; n].join("/");
    for i in 0..levels {
        write_file(&deep.join(chain(i + 1)).join(format!("f{i}")), b"x");
    }
    let mut expected: Vec<String> = (1..=levels).map(chain).collect();
    expected.extend((0..levels).rev().map(|i| format!("{}/f{i}", chain(i + 1))));
    assert_eq!(paths(&list_ok(e, &["-R"], &deep), false), expected);
}

fn human_readable_sizes(e: Engine) {
    let t = tmp();
    let root = t.path().join("root");
    mkdirs(&root);
    let cases: [(u64, &str); 16] = [
        (0, "0"),
        (1, "1"),
        (1023, "1023"),
        (1024, "1.0K"),
        (1025, "1.1K"),
        (1536, "1.5K"),
        (10_239, "10K"),
        (10_240, "10K"),
        (10_241, "11K"),
        (1_048_575, "1.0M"),
        (1_048_576, "1.0M"),
        (1_572_864, "1.5M"),
        (23 << 20, "23M"),
        ((23 << 20) + 1, "24M"),
        (4 << 30, "4.0G"),
        (3 << 39, "1.5T"),
    ];
    for (i, (size, _)) in cases.iter().enumerate() {
        // Sparse: only the size matters.
        File::create(root.join(format!("s{i:02}"))).unwrap().set_len(*size).unwrap();
    }
    for flag in ["-h", "--human-readable"] {
        let lines = list_ok(e, &[flag], &root);
        assert_eq!(lines.len(), cases.len());
        for (i, l) in lines.iter().enumerate() {
            let (fields, path) = split_line(l, 4);
            assert_eq!(path, format!("s{i:02}").as_bytes());
            assert_eq!(fields[1], cases[i].1, "size {} with {flag}: {:?}", cases[i].0, String::from_utf8_lossy(l));
        }
    }
    // Without -h: bytes.
    let lines = list_ok(e, &[], &root);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(split_line(l, 4).0[1], cases[i].0.to_string());
    }
    // -h is not help for `list`; --help is.
    let out = fastsync().args(["list", "--engine", e.name(), "-h"]).run();
    out.assert_code(2).check(out.stderr_str().contains("<PATH>"), "`list -h` without PATH is a usage error");
    let out = fastsync().args(["list", "--help"]).run();
    out.assert_success().check(out.stdout_str().contains("--human-readable"), "--help describes -h");
}

fn json_fields(e: Engine) {
    let t = tmp();
    let root = t.path().join("root");
    let f = root.join("f");
    write_file(&f, b"abc");
    chmod(&f, 0o640);
    set_times(&f, 1_300_000_000, 42);
    let d = root.join("d");
    write_file(&d.join("inner"), b"inner!");
    chmod(&d.join("inner"), 0o4711);
    set_times(&d.join("inner"), 0, 0);
    chmod(&d, 0o755);
    set_times(&d, 1_000_000_000, 0);
    let l = root.join("l");
    ln_s("f", &l);
    set_times(&l, 951_782_400, 7);
    let p = root.join("p");
    mkfifo(&p);
    chmod(&p, 0o600);
    set_times(&p, -86_400, 500);

    let f_obj = json!({"path": "f", "type": "file", "size": 3, "mode": "0640",
        "mtime": "2011-03-13T07:06:40.000000042Z", "mtime_ns": 1_300_000_000_000_000_042i64});
    let d_obj = json!({"path": "d", "type": "dir", "size": lsize(&d), "mode": "0755",
        "mtime": "2001-09-09T01:46:40.000000000Z", "mtime_ns": 1_000_000_000_000_000_000i64});
    let inner_obj = json!({"path": "d/inner", "type": "file", "size": 6, "mode": "4711",
        "mtime": "1970-01-01T00:00:00.000000000Z", "mtime_ns": 0});
    let l_obj = json!({"path": "l", "type": "symlink", "size": 1, "mode": "0777",
        "mtime": "2000-02-29T00:00:00.000000007Z", "mtime_ns": 951_782_400_000_000_007i64, "target": "f"});
    let p_obj = json!({"path": "p", "type": "other", "size": 0, "mode": "0600",
        "mtime": "1969-12-31T00:00:00.000000500Z", "mtime_ns": -86_399_999_999_500i64});

    let got = json_lines(&list_ok(e, &["--json"], &root));
    assert_eq!(got, [d_obj.clone(), f_obj.clone(), l_obj.clone(), p_obj.clone()]);
    // The flag is global: it may come before the subcommand.
    let out = fastsync().args(["--json", "list", "--engine", e.name(), "-R"]).arg(&root).run();
    out.assert_success();
    let got = json_lines(&raw_lines(&out.stdout));
    assert_eq!(got, [d_obj.clone(), inner_obj.clone(), f_obj.clone(), l_obj.clone(), p_obj.clone()]);

    // --checksum adds "blake3" to regular files only.
    let with = |mut v: Value, data: &[u8]| {
        v["blake3"] = json!(hex(data));
        v
    };
    let got = json_lines(&list_ok(e, &["--json", "-R", "--checksum"], &root));
    assert_eq!(got, [d_obj, with(inner_obj, b"inner!"), with(f_obj, b"abc"), l_obj, p_obj]);
}

fn checksum_digests_in_listing_order(e: Way) {
    let t = tmp();
    let root = t.path().join("root");
    let mut rng = Rng::new(0x11_57);
    let mut contents = std::collections::BTreeMap::new();
    // Big files first in listing order, so that later small files' digests arrive before theirs.
    for (i, size) in [(0u64, 6 << 20), (1, 3 << 20), (2, (1 << 20) + 1)] {
        let rel = format!("000_big{i}");
        let data = random_bytes(1000 + i, size);
        write_file(&root.join(&rel), &data);
        contents.insert(rel, data);
    }
    for i in 0..240u64 {
        let rel = format!("d{}/f{i:03}", i % 3);
        let size = rng.below(150_000) as usize;
        let data = random_bytes(i, size);
        write_file(&root.join(&rel), &data);
        contents.insert(rel, data);
    }
    write_file(&root.join("empty"), b"");
    contents.insert("empty".to_string(), Vec::new());
    ln_s("empty", &root.join("link"));

    let plain = paths(&list_ok(e, &["-R"], &root), false);
    assert_eq!(plain.len(), contents.len() + 3 + 1, "files, 3 directories and a symlink");
    for extra in [&["-R", "--checksum"][..], &["-R", "--checksum", "--cores", "1"][..], &["-R", "-c", "-h"][..]] {
        let lines = list_ok(e, extra, &root);
        assert_eq!(paths(&lines, true), plain, "order with {extra:?}");
        let mut hashed = 0;
        for l in &lines {
            let (fields, path) = split_line(l, 5);
            let path = String::from_utf8(path).unwrap();
            let path = path.split(" -> ").next().unwrap();
            match contents.get(path) {
                Some(data) => {
                    assert_eq!(fields[4], hex(data), "digest of {path} with {extra:?}");
                    hashed += 1;
                }
                None => assert_eq!(fields[4], "-", "{path} is not a regular file"),
            }
        }
        assert_eq!(hashed, contents.len());
    }
    // JSON, one core: the smallest reorder window.
    let got = json_lines(&list_ok(e, &["--json", "-R", "--checksum", "--cores", "1"], &root));
    let got_paths: Vec<&str> = got.iter().map(|v| v["path"].as_str().unwrap()).collect();
    assert_eq!(got_paths, plain.iter().map(|p| p.split(" -> ").next().unwrap()).collect::<Vec<_>>());
    for v in &got {
        let path = v["path"].as_str().unwrap();
        match contents.get(path) {
            Some(data) => assert_eq!(v["blake3"], json!(hex(data)), "{path}"),
            None => assert!(v.get("blake3").is_none(), "{path} is not a regular file: {v}"),
        }
    }
}

fn symlinks_are_never_followed(e: Way) {
    let t = tmp();
    let root = t.path().join("root");
    write_file(&root.join("d/inner"), b"inner");
    ln_s("d", &root.join("ld"));
    ln_s("d/inner", &root.join("lf"));
    ln_s("nowhere/at/all", &root.join("dangling"));
    ln_s("loop", &root.join("loop"));
    let lines = list_ok(e, &["-R", "--checksum"], &root);
    assert_eq!(
        paths(&lines, true),
        ["d", "d/inner", "dangling -> nowhere/at/all", "ld -> d", "lf -> d/inner", "loop -> loop"]
    );
    for l in &lines {
        let (fields, path) = split_line(l, 5);
        if path.windows(4).any(|w| w == b" -> ") {
            assert_eq!(&fields[0][..1], "l", "{:?}", String::from_utf8_lossy(l));
            assert_eq!(fields[4], "-", "a symlink is not hashed: {:?}", String::from_utf8_lossy(l));
        }
    }
    // A symlink as PATH is listed itself; with a trailing slash, the directory it points to is listed.
    let lines = list_ok(e, &[], root.join("ld"));
    assert_eq!(paths(&lines, false), ["ld -> d"]);
    assert!(lines[0].starts_with(b"lrwxrwxrwx "));
    assert_eq!(paths(&list_ok(e, &[], with_slash(&root.join("ld"))), false), ["inner"]);
}

fn non_utf8_names_are_written_raw(e: Way) {
    let t = tmp();
    let root = t.path().join("root");
    write_file(&root.join(os(b"caf\xe9")), b"latin-1");
    write_file(&root.join(os(b"d\xff/\x80.txt")), b"inner");
    ln_s(os(b"caf\xe9"), &root.join("lnk"));
    let lines = list_ok(e, &["-R", "--checksum"], &root);
    let got: Vec<Vec<u8>> = lines.iter().map(|l| split_line(l, 5).1).collect();
    assert_eq!(got, [b"caf\xe9".to_vec(), b"d\xff".to_vec(), b"d\xff/\x80.txt".to_vec(), b"lnk -> caf\xe9".to_vec()]);
    assert_eq!(split_line(&lines[0], 5).0[4], hex(b"latin-1"));
    assert_eq!(split_line(&lines[2], 5).0[4], hex(b"inner"));
    let got = json_lines(&list_ok(e, &["--json", "-R"], &root));
    let names: Vec<(&str, Option<&str>)> =
        got.iter().map(|v| (v["path"].as_str().unwrap(), v.get("target").and_then(Value::as_str))).collect();
    assert_eq!(
        names,
        [("caf\u{fffd}", None), ("d\u{fffd}", None), ("d\u{fffd}/\u{fffd}.txt", None), ("lnk", Some("caf\u{fffd}"))]
    );
}

/// On a terminal (a pseudo-terminal from util-linux's `script`), as `ls` does, a name cannot move the cursor, split
/// its line or hide bytes: control characters and bytes that are not UTF-8 are escaped.
fn names_are_escaped_on_a_terminal(e: Engine) {
    let t = tmp();
    let root = t.path().join("root");
    write_file(&root.join(os(b"two\nlines")), b"a");
    write_file(&root.join(os(b"esc\x1b[2Jclear")), b"b");
    write_file(&root.join(os(b"caf\xe9")), b"c");
    let command = format!("{} list --engine {} {}", bin().display(), e.name(), root.display());
    let out = Cmd::new("script").args(["-qec", command.as_str(), "/dev/null"]).run();
    out.assert_success();
    let mut names: Vec<String> = out
        .stdout_str()
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split(' ').next_back().map(str::to_owned))
        .collect();
    names.sort();
    assert_eq!(names, ["caf\\xe9", "esc\\x1b[2Jclear", "two\\nlines"].map(String::from), "{}", out.stdout_str());
    out.check(!out.stdout.contains(&0x1b), "a raw escape character reached the terminal");
}

fn nonexistent_path_fails(e: Way) {
    let t = tmp();
    let missing = t.path().join("no/such/thing");
    for extra in [&[][..], &["-R", "--checksum"][..], &["--json"][..]] {
        let out = list(e, extra, &missing);
        out.assert_code(1);
        out.check(out.stdout.is_empty(), "nothing on stdout");
        let lines = out.stderr_lines();
        let ok = match e {
            Way::Local(_) => {
                lines
                    == [format!(
                        "fastsync: cannot stat '{}': No such file or directory (os error 2)",
                        missing.display()
                    )]
            }
            // The server's path, by URL: fastsync://127.0.0.1:PORT/no/such/thing.
            _ => {
                lines.len() == 1
                    && lines[0].starts_with("fastsync: cannot stat 'fastsync://127.0.0.1:")
                    && lines[0].ends_with("/no/such/thing': No such file or directory")
            }
        };
        out.check(ok, "exactly the cannot-stat line on stderr");
    }
}

fn single_file_path(e: Way) {
    let t = tmp();
    let f = t.path().join("one.bin");
    let data = random_bytes(9, 70_000);
    write_file(&f, &data);
    chmod(&f, 0o600);
    set_times(&f, 1_300_000_000, 1);
    let time = "2011-03-13 07:06:40.000000001";
    assert_eq!(text(&list_ok(e, &["-R"], &f)), [line("-rw-------", 70_000, time, "one.bin")]);
    let lines = list_ok(e, &["--checksum"], &f);
    assert_eq!(text(&lines), [format!("-rw------- {:>12} {time} {} one.bin", 70_000, hex(&data))]);
    let got = json_lines(&list_ok(e, &["--json", "--checksum"], &f));
    assert_eq!(
        got,
        [json!({"path": "one.bin", "type": "file", "size": 70_000, "mode": "0600",
            "mtime": "2011-03-13T07:06:40.000000001Z", "mtime_ns": 1_300_000_000_000_000_001i64,
            "blake3": hex(&data)})]
    );
}

/// Runs fastsync with `args`, as the unprivileged user `nobody` when the tests run as root (so that permissions
/// apply), with a time limit.
fn run_unprivileged(args: &[&OsStr]) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin());
    cmd.args(args).env_remove("FASTSYNC_ENGINE").env_remove("FASTSYNC_CORES").env_remove("RUST_BACKTRACE");
    if unsafe { libc::geteuid() } == 0 {
        cmd.uid(65_534).gid(65_534);
    }
    let cmdline = format!("{:?}", args);
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(90)).is_err() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let out = child.wait_with_output().unwrap();
    let _ = tx.send(());
    watchdog.join().unwrap();
    let out = Output { code: out.status.code(), stdout: out.stdout, stderr: out.stderr, cmdline };
    out.check(!out.stderr_str().contains("panicked"), "fastsync panicked");
    out
}

fn unreadable_entries_are_reported_and_listing_goes_on(e: Engine) {
    let t = tmp();
    chmod(t.path(), 0o755);
    let root = t.path().join("root");
    write_file(&root.join("a_ok"), b"ok");
    write_file(&root.join("locked/hidden"), b"hidden");
    write_file(&root.join("secret"), b"secret");
    write_file(&root.join("z"), b"zzz");
    chmod(&root.join("locked"), 0o000);
    chmod(&root.join("secret"), 0o000);
    let args: Vec<&OsStr> = vec![
        "list".as_ref(),
        "--engine".as_ref(),
        e.name().as_ref(),
        "-R".as_ref(),
        "--checksum".as_ref(),
        root.as_ref(),
    ];
    let out = run_unprivileged(&args);
    chmod(&root.join("locked"), 0o755);
    out.assert_code(1);
    let lines = raw_lines(&out.stdout);
    out.check(paths(&lines, true) == ["a_ok", "locked", "secret", "z"], "every readable entry is still listed");
    let digests: Vec<String> = lines.iter().map(|l| split_line(l, 5).0[4].clone()).collect();
    out.check(digests == [hex(b"ok"), "-".into(), "?".into(), hex(b"zzz")], "digest column: '?' for the unreadable");
    let failures = out.failure_lines();
    out.check(failures.len() == 2, "one stderr line per failure");
    let (what, path, cause) = &failures[0];
    out.check(what == "cannot read directory" && path.ends_with("/root/locked"), "names the unreadable directory");
    out.check(cause.contains("Permission denied"), "gives the cause");
    let (_, path, cause) = &failures[1];
    out.check(path.ends_with("/root/secret") && cause.contains("Permission denied"), "names the unreadable file");
}

fn closed_stdout_ends_quietly(e: Engine) {
    let t = tmp();
    let root = t.path().join("root");
    for i in 0..3000 {
        write_file(&root.join(format!("d{}/file-with-a-longish-name-{i:05}", i % 4)), b"x");
    }
    for extra in [&["-R"][..], &["-R", "--checksum"][..], &["-R", "--json"][..]] {
        let mut child = Command::new(bin())
            .arg("list")
            .args(["--engine", e.name()])
            .args(extra)
            .arg(&root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let err_t = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = stderr.read_to_end(&mut v);
            v
        });
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert!(first.contains("d0"), "first line: {first:?}");
        // The reader is gone: fastsync's next writes fail with EPIPE.
        let start = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("fastsync list {extra:?} still running 60 s after its stdout was closed");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
        assert!(matches!(status.code(), Some(0 | 1)), "{extra:?}: exit status {status:?}, stderr: {stderr}");
        assert!(stderr.is_empty(), "{extra:?}: a closed stdout ends quietly, stderr: {stderr}");
    }
}
