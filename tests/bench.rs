//! Integration tests of `fastsync bench`: every I/O workload and the metadata workload run briefly on both engines,
//! with their numbers checked for consistency (op counts, bytes = IOPS × bs × time, ordered percentiles), their
//! effects checked independently (written blocks hold data, files exist or are gone), and their safety rules:
//! only their own files, a foreign work directory, a full filesystem, block devices, interruption.

#[macro_use]
mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

both_engines!(
    every_io_workload_is_consistent,
    direct_io_is_consistent,
    time_based_run_lasts_its_time,
    sequential_write_fills_the_file_and_keep_reuses_it,
    fsync_policy_counts,
    metadata_phases_count_every_file,
    foreign_work_directory_is_refused,
    bad_paths_and_arguments_are_refused,
    short_free_space_is_refused,
    block_device_needs_explicit_flags,
    interrupt_stops_and_cleans_up,
    buffers_beyond_the_memory_limit_are_refused,
    live_line_on_a_terminal,
    io_error_ends_the_run_with_one_line,
);

fn bench(engine: Engine, path: &Path, extra: &[&str]) -> Output {
    fastsync().arg("--engine").arg(engine.name()).arg("bench").arg(path).args(extra).run()
}

/// Run a bench with `--json` and return its report.
fn bench_json(engine: Engine, path: &Path, extra: &[&str]) -> Value {
    let out = bench(engine, path, &[extra, &["--json"]].concat());
    out.assert_success();
    serde_json::from_str(out.stdout_str().trim()).unwrap_or_else(|e| panic!("bad JSON ({e}): {}", out.stdout_str()))
}

fn phase<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no phase {name} in {report}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an integer: {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// The identities every phase must satisfy.
fn check_phase(p: &Value) {
    let (ops, bytes, bs, seconds) = (u(&p["ops"]), u(&p["bytes"]), u(&p["block_bytes"]), f(&p["seconds"]));
    assert!(seconds > 0.0, "{p}");
    if bs > 0 {
        assert_eq!(bytes, ops * bs, "bytes = ops x bs: {p}");
        // bytes = IOPS x bs x time, and MB/s = bytes / time, within floating-point rounding.
        let from_iops = f(&p["iops"]) * bs as f64 * seconds;
        assert!((from_iops - bytes as f64).abs() <= 1e-6 * bytes as f64 + 1.0, "IOPS x bs x time = {from_iops}: {p}");
        let from_mb = f(&p["mb_per_s"]) * 1e6 * seconds;
        assert!((from_mb - bytes as f64).abs() <= 1e-6 * bytes as f64 + 1.0, "MB/s x time = {from_mb}: {p}");
    } else {
        assert!((f(&p["iops"]) * seconds - ops as f64).abs() <= 1e-6 * ops as f64 + 1e-6, "{p}");
    }
    if ops > 0 {
        let lat = &p["latency_us"];
        let order = ["p50", "p90", "p99", "p99.9", "max"].map(|k| f(&lat[k]));
        assert!(order[0] > 0.0, "latencies are positive: {p}");
        assert!(order.windows(2).all(|w| w[0] <= w[1]), "p50 <= p90 <= p99 <= p99.9 <= max: {p}");
        assert!(f(&lat["mean"]) <= order[4], "{p}");
    }
    assert!(f(&p["cpu_user_seconds"]) >= 0.0 && f(&p["cpu_system_seconds"]) >= 0.0, "{p}");
}

/// Nothing of the benchmark is left in `dir` (it was empty before).
fn assert_left_nothing(dir: &Path) {
    let left: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the benchmark left {left:?} in {}", dir.display());
}

fn every_io_workload_is_consistent(engine: Engine) {
    let t = tmp();
    let (size, bs, threads) = (4u64 << 20, 64u64 << 10, 2u64);
    for rw in ["read", "write", "randread", "randwrite", "rw", "randrw"] {
        let r = bench_json(
            engine,
            t.path(),
            &["--rw", rw, "--size", "4M", "--bs", "64k", "--threads", "2", "--iodepth", "8", "--rwmixread", "50"],
        );
        assert_eq!(r["workload"], rw);
        assert_eq!(r["engine"], engine.name());
        let names: Vec<&str> = r["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        let expected: &[&str] = match rw {
            "read" | "randread" => &["read"],
            "write" | "randwrite" => &["write"],
            _ => &["read", "write"],
        };
        assert_eq!(names, expected, "{rw}");
        let mut ops = 0;
        for p in r["phases"].as_array().unwrap() {
            check_phase(p);
            ops += u(&p["ops"]);
        }
        // Without --time each thread does exactly --size / --bs ops.
        assert_eq!(ops, threads * size / bs, "{rw}: {r}");
        if rw.ends_with("rw") {
            let reads = u(&phase(&r, "read")["ops"]);
            assert!((20..=108).contains(&reads), "{rw}: {reads} reads of 128 at 50%");
        }
        assert_left_nothing(t.path());
    }
}

fn direct_io_is_consistent(engine: Engine) {
    let t = tmp();
    for (rw, bs) in [("randread", "4k"), ("write", "1M"), ("randwrite", "4k")] {
        let r = bench_json(engine, t.path(), &["--rw", rw, "--bs", bs, "--size", "2M", "--threads", "1", "--direct"]);
        assert_eq!(r["direct"], true);
        for p in r["phases"].as_array().unwrap() {
            check_phase(p);
        }
        let p = &r["phases"][0];
        assert_eq!(u(&p["bytes"]), 2 << 20, "{rw}: {r}");
    }
    assert_left_nothing(t.path());
}

fn time_based_run_lasts_its_time(engine: Engine) {
    let t = tmp();
    let started = Instant::now();
    let r = bench_json(
        engine,
        t.path(),
        &["--rw", "randread", "--bs", "4k", "--size", "1M", "--threads", "1", "--time", "1s"],
    );
    let p = phase(&r, "read");
    check_phase(p);
    let seconds = f(&p["seconds"]);
    assert!((1.0..5.0).contains(&seconds), "a 1 s run measured {seconds} s");
    assert!(started.elapsed() >= Duration::from_secs(1));
    // Time-based runs wrap around the file: more ops than one pass over 1 MiB (256 blocks), unless very slow.
    assert!(u(&p["ops"]) > 0);
    assert_left_nothing(t.path());
}

fn sequential_write_fills_the_file_and_keep_reuses_it(engine: Engine) {
    let t = tmp();
    let r = bench_json(engine, t.path(), &["--rw", "write", "--bs", "16k", "--size", "1M", "--threads", "1", "--keep"]);
    assert_eq!(u(&phase(&r, "write")["ops"]), 64);
    let file = t.path().join("fastsync-bench/io.0");
    let data = fs::read(&file).unwrap();
    assert_eq!(data.len(), 1 << 20);
    // The file was only allocated before the run (it reads as zeros there): every block must now hold the
    // incompressible data the benchmark writes.
    for (i, block) in data.chunks(16 << 10).enumerate() {
        assert!(block.iter().any(|&b| b != 0), "block {i} was never written");
    }
    assert!(t.path().join("fastsync-bench/.fastsync-bench").exists(), "the marker stays with --keep");
    // A second run reuses the kept file: a read workload does not lay it out again, so its bytes stay the ones
    // written above; without --keep the run then removes it.
    let r = bench_json(engine, t.path(), &["--rw", "read", "--bs", "16k", "--size", "1M", "--threads", "1", "--keep"]);
    assert_eq!(u(&phase(&r, "read")["ops"]), 64);
    assert_eq!(fs::read(&file).unwrap(), data, "the kept file was rewritten instead of reused");
    let r = bench_json(engine, t.path(), &["--rw", "randread", "--bs", "4k", "--size", "1M", "--threads", "1"]);
    assert_eq!(u(&phase(&r, "read")["ops"]), 256);
    assert_left_nothing(t.path());
}

fn fsync_policy_counts(engine: Engine) {
    let t = tmp();
    let base = ["--rw", "write", "--bs", "64k", "--size", "1M", "--threads", "1"];
    let r = bench_json(engine, t.path(), &[&base[..], &["--fsync", "4"]].concat());
    assert_eq!(u(&phase(&r, "write")["ops"]), 16);
    assert_eq!(u(&phase(&r, "fsync")["ops"]), 4, "one fsync after every 4 of 16 writes: {r}");
    check_phase(phase(&r, "fsync"));
    let r = bench_json(engine, t.path(), &[&base[..], &["--fsync", "4", "--end-fsync"]].concat());
    assert_eq!(u(&phase(&r, "fsync")["ops"]), 5, "4 periodic + 1 final: {r}");
    let r = bench_json(engine, t.path(), &base);
    assert!(r["phases"].as_array().unwrap().iter().all(|p| p["name"] != "fsync"), "no fsync unless asked: {r}");
    assert_left_nothing(t.path());
}

fn metadata_phases_count_every_file(engine: Engine) {
    let t = tmp();
    let r = bench_json(engine, t.path(), &["--files", "301", "--file-size", "4k", "--threads", "2", "--iodepth", "8"]);
    assert_eq!(r["workload"], "metadata");
    let names: Vec<&str> = r["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["create", "stat", "read", "delete"]);
    for p in r["phases"].as_array().unwrap() {
        check_phase(p);
        assert_eq!(u(&p["ops"]), 301, "{p}");
    }
    assert_eq!(u(&phase(&r, "create")["bytes"]), 301 * 4096);
    assert_eq!(u(&phase(&r, "read")["bytes"]), 301 * 4096);
    assert_eq!(u(&phase(&r, "stat")["bytes"]), 0);
    assert_left_nothing(t.path());
    // A metadata run leaves alone the I/O files that an earlier run kept.
    bench_json(engine, t.path(), &["--rw", "write", "--size", "64k", "--bs", "4k", "--threads", "1", "--keep"]);
    bench_json(engine, t.path(), &["--files", "20", "--threads", "1"]);
    assert!(t.path().join("fastsync-bench/io.0").exists(), "the kept I/O file was removed by a metadata run");
    bench_json(engine, t.path(), &["--rw", "read", "--size", "64k", "--bs", "4k", "--threads", "1"]);
    assert_left_nothing(t.path());
    // Human output names every phase.
    let out = bench(engine, t.path(), &["--files", "50", "--threads", "1"]);
    out.assert_success();
    for name in ["create", "stat", "read", "delete"] {
        assert!(out.stdout_str().lines().any(|l| l.trim_start().starts_with(name)), "{}", out.stdout_str());
    }
    assert_left_nothing(t.path());
}

fn foreign_work_directory_is_refused(engine: Engine) {
    let t = tmp();
    let mine = t.path().join("fastsync-bench");
    mkdirs(&mine);
    write_file(&mine.join("io.0"), b"precious");
    let out = bench(engine, t.path(), &["--size", "1M", "--rw", "write"]);
    out.assert_code(2);
    assert!(out.stderr_str().contains("was not made by fastsync bench"), "{}", out.stderr_str());
    assert_eq!(fs::read(mine.join("io.0")).unwrap(), b"precious");
    assert_eq!(fs::read_dir(&mine).unwrap().count(), 1);
}

fn bad_paths_and_arguments_are_refused(engine: Engine) {
    let t = tmp();
    let missing = t.path().join("nope");
    let out = bench(engine, &missing, &[]);
    out.assert_code(1);
    assert_eq!(out.stderr_lines().len(), 1, "{}", out.stderr_str());
    assert!(out.stderr_str().contains(&*missing.to_string_lossy()), "{}", out.stderr_str());
    let file = t.path().join("file");
    write_file(&file, b"x");
    let out = bench(engine, &file, &[]);
    out.assert_code(2);
    assert!(out.stderr_str().contains("not a directory"), "{}", out.stderr_str());
    assert_eq!(fs::read(&file).unwrap(), b"x");
    for bad in [&["--bs", "1000"][..], &["--bs", "128M"], &["--size", "4k", "--bs", "8k"], &["--time", "soon"]] {
        let out = bench(engine, t.path(), bad);
        out.assert_code(2);
        assert_eq!(out.stderr_lines().len().min(1), 1);
    }
    let out = bench(engine, t.path(), &["--device"]);
    out.assert_code(2);
    assert!(out.stderr_str().contains("not a block device"), "{}", out.stderr_str());
    let out = bench(engine, t.path(), &["--files", "10", "--device"]);
    out.assert_code(2);
    // Nothing was created by any refused run.
    let left: Vec<_> = fs::read_dir(t.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["file"]);
}

fn short_free_space_is_refused(engine: Engine) {
    let t = tmp();
    let at = t.path().join("small");
    let Some(_mount) = mount_tmpfs(&at, "size=8m") else { return };
    let out = bench(engine, &at, &["--size", "16M", "--threads", "1"]);
    out.assert_code(2);
    assert!(out.stderr_str().contains("MiB free"), "{}", out.stderr_str());
    assert_left_nothing(&at);
    // Two threads of 6 MiB do not fit either, though one would.
    let out = bench(engine, &at, &["--size", "6M", "--threads", "2", "--rw", "write"]);
    out.assert_code(2);
    assert_left_nothing(&at);
    let out = bench(engine, &at, &["--size", "6M", "--threads", "1", "--rw", "write", "--bs", "64k"]);
    out.assert_success();
    assert_left_nothing(&at);
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: String,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn loop_device(backing: &Path) -> Option<Loop> {
    let out = Command::new("losetup").args(["-f", "--show"]).arg(backing).output().ok()?;
    if !out.status.success() {
        eprintln!("SKIP: cannot attach a loop device here ({})", String::from_utf8_lossy(&out.stderr).trim());
        return None;
    }
    Some(Loop { dev: String::from_utf8_lossy(&out.stdout).trim().to_string() })
}

fn block_device_needs_explicit_flags(engine: Engine) {
    let t = tmp();
    let backing = t.path().join("disk.img");
    fs::write(&backing, vec![0u8; 8 << 20]).unwrap();
    let Some(lo) = loop_device(&backing) else { return };
    let dev = Path::new(&lo.dev);
    let out = bench(engine, dev, &["--size", "1M", "--threads", "1"]);
    out.assert_code(2);
    assert!(out.stderr_str().contains("--device"), "{}", out.stderr_str());
    let r = bench_json(engine, dev, &["--device", "--rw", "randread", "--bs", "4k", "--size", "4M", "--threads", "2"]);
    assert_eq!(u(&phase(&r, "read")["ops"]), 2 * 1024);
    let out = bench(engine, dev, &["--device", "--rw", "write", "--size", "1M", "--threads", "1"]);
    out.assert_code(2);
    assert!(out.stderr_str().contains("--destroy-data"), "{}", out.stderr_str());
    assert!(fs::read(&backing).unwrap().iter().all(|&b| b == 0), "a refused write run wrote to the device");
    let out = bench(engine, dev, &["--device", "--rw", "write", "--size", "4M", "--threads", "2"]);
    out.assert_code(2);
    assert!(fs::read(&backing).unwrap().iter().all(|&b| b == 0), "a refused write run wrote to the device");
    let r = bench_json(
        engine,
        dev,
        &["--device", "--destroy-data", "--rw", "write", "--bs", "64k", "--size", "2M", "--threads", "2", "--direct"],
    );
    assert_eq!(u(&phase(&r, "write")["ops"]), 64);
    // Two regions of 2 MiB from the start of the device were written, nothing beyond them.
    let data = fs::read(&backing).unwrap();
    assert!(data[..4 << 20].chunks(64 << 10).all(|b| b.iter().any(|&x| x != 0)), "regions not fully written");
    assert!(data[4 << 20..].iter().all(|&b| b == 0), "wrote beyond the threads' regions");
    let out = bench(engine, dev, &["--device", "--size", "8M", "--threads", "2"]);
    out.assert_code(2);
    assert!(out.stderr_str().contains("more than"), "{}", out.stderr_str());
}

/// A minute of 4 KiB random reads on a 1 MiB file in `dir`, in the background (stdout and stderr piped).
fn spawn_long_randread(engine: Engine, dir: &Path, extra: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args(["--engine", engine.name(), "bench"])
        .arg(dir)
        .args(["--rw", "randread", "--bs", "4k", "--size", "1M", "--threads", "1", "--time", "60s"])
        .args(extra)
        .env("XDG_CONFIG_HOME", "/nonexistent/fastsync-tests")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn interrupt_stops_and_cleans_up(engine: Engine) {
    let t = tmp();
    let child = spawn_long_randread(engine, t.path(), &["--json"]);
    // Wait until the run is under way (its file exists), then interrupt it.
    let file = t.path().join("fastsync-bench/io.0");
    let started = Instant::now();
    while !file.exists() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(30), "the interrupt did not stop the run");
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    check_phase(phase(&r, "read"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert_left_nothing(t.path());
}

fn buffers_beyond_the_memory_limit_are_refused(engine: Engine) {
    let t = tmp();
    let out = bench(engine, t.path(), &["--bs", "64M", "--threads", "8", "--memory-limit", "256M"]);
    out.assert_code(2);
    assert!(out.stderr_str().contains("memory limit"), "{}", out.stderr_str());
    assert_left_nothing(t.path());
}

fn live_line_on_a_terminal(engine: Engine) {
    let t = tmp();
    // `script` gives the run a pseudo-terminal; without one (every other test) no live line is drawn.
    let cmd = format!(
        "{} --engine {} bench {} --rw randread --bs 4k --size 1M --threads 1 --time 2500ms",
        bin().display(),
        engine.name(),
        t.path().display()
    );
    let Ok(out) = Command::new("script").args(["-qec", &cmd, "/dev/null"]).env("TERM", "xterm").output() else {
        eprintln!("SKIP: util-linux `script` is not installed");
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let text = String::from_utf8_lossy(&out.stdout);
    let live: Vec<&str> = text.split('\r').filter(|l| l.contains("randread: ") && l.contains(" IOPS [")).collect();
    assert!(live.len() >= 2, "expected a live line each second: {text:?}");
    assert!(text.contains("latency (us)"), "{text:?}");
    let piped = bench(
        engine,
        t.path(),
        &["--rw", "randread", "--bs", "4k", "--size", "1M", "--threads", "1", "--time", "1200ms"],
    );
    piped.assert_success();
    assert!(!piped.stderr_str().contains("IOPS ["), "no live line without a terminal: {}", piped.stderr_str());
    assert_left_nothing(t.path());
}

fn io_error_ends_the_run_with_one_line(engine: Engine) {
    let t = tmp();
    let child = spawn_long_randread(engine, t.path(), &[]);
    let file = t.path().join("fastsync-bench/io.0");
    let started = Instant::now();
    while fs::metadata(&file).map(|m| m.len()).unwrap_or(0) < 1 << 20 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    // Another process truncates the file under the running benchmark: its reads now come back short.
    fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(0).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(started.elapsed() < Duration::from_secs(30), "the error did not end the run");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("fastsync: error reading '") && lines[0].contains("io.0"), "{stderr}");
    assert_left_nothing(t.path());
}
