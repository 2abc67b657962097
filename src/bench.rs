//! `fastsync bench`: fio-style I/O and mdtest-style metadata workloads, run by the engine that copies.
//!
//! The command lays out one file per thread under `PATH/fastsync-bench/` (or uses a block device with `--device`),
//! starts a session sized for the workload (`--threads` shards × `--iodepth` buffers of `--bs`), submits one
//! [`BenchJob`] per shard and prints what the shards measured: MB/s, IOPS, latency percentiles and CPU, per phase.
//! It only ever writes files it created (a marker file names the directory as its own), removes them unless
//! `--keep`, and refuses to start when the free space is smaller than the working set.

use std::io::{IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
#[cfg(target_os = "linux")]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use fastsync_engine::bench::{BenchJob, BenchReport, BenchWork, IoSpec, Live, MetaPhase, MetaSpec, OpStats};
use fastsync_engine::{Engine, EngineConfig, EngineKind, Outcome, Session, Show};

use crate::error::exit;
use crate::{Error, interrupt};

pub const LONG_ABOUT: &str = "Measure what storage can do with the engine that copies: sequential or random reads \
    and writes (like fio) or a metadata workload (like mdtest), with throughput, IOPS, latency percentiles and CPU \
    per phase.\n\nPATH is a directory: the benchmark creates its files in PATH/fastsync-bench/ (one per thread, \
    --size each), and removes them afterwards unless --keep; kept files are reused by the next run. It never \
    touches anything else, and refuses to run when PATH's filesystem has less free space than the files need. \
    With --device, PATH is a block device instead, and write workloads need --destroy-data as well.\n\nLike fio, \
    files are written once before a read workload and the page cache is dropped for them before each run, and \
    each thread works on its own file. Unlike fio's defaults: --rw read --bs 1M --iodepth 32, one thread per core.";

/// The I/O pattern, named as fio names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Rw {
    /// Sequential reads
    Read,
    /// Sequential writes
    Write,
    /// Random reads
    Randread,
    /// Random writes
    Randwrite,
    /// Sequential mix of reads and writes (--rwmixread)
    Rw,
    /// Random mix of reads and writes (--rwmixread)
    Randrw,
}

impl Rw {
    fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Rw => "rw",
            Rw::Randrw => "randrw",
        }
    }
    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }
    fn read_pct(self, mix: u8) -> u8 {
        match self {
            Rw::Read | Rw::Randread => 100,
            Rw::Write | Rw::Randwrite => 0,
            Rw::Rw | Rw::Randrw => mix,
        }
    }
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Directory to create the benchmark's files in (or, with --device, a block device)
    pub path: PathBuf,
    /// Workload: read, write, randread, randwrite, rw or randrw (mixed)
    #[arg(long, value_enum, default_value = "read")]
    pub rw: Rw,
    /// Percentage of reads in a mixed workload
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,
    /// Block size of each I/O, 512 bytes to 64M (multiples of 512)
    #[arg(long, default_value = "1M", value_parser = crate::config::parse_size)]
    pub bs: u64,
    /// I/Os in flight per thread (io_uring engine; the fallback engine does one at a time, like fio's psync)
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub iodepth: u16,
    /// Threads (engine shards), each with its own file [default: --cores, else all cores]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Size of each thread's file (or region of the device), and the bytes each thread transfers without --time
    #[arg(long, default_value = "1G", value_parser = crate::config::parse_size)]
    pub size: u64,
    /// Run for this long (e.g. 30s, 2m, 500ms), wrapping around the file, instead of transferring --size once
    #[arg(long, value_parser = parse_duration)]
    pub time: Option<Duration>,
    /// Direct I/O (O_DIRECT): bypass the page cache; buffers are aligned
    #[arg(long)]
    pub direct: bool,
    /// fsync after every N writes (like fio's fsync=N)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fsync: u32,
    /// fsync each file once at the end, inside the measured time (like fio's end_fsync=1)
    #[arg(long)]
    pub end_fsync: bool,
    /// Metadata workload instead: create, stat, read and delete N files in total (spread over the threads)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub files: Option<u64>,
    /// Metadata workload: bytes written to each file at create and read back by the read phase
    #[arg(long, default_value = "0", value_parser = parse_size_or_zero)]
    pub file_size: u64,
    /// Keep the benchmark's files (a later run reuses them instead of writing them again)
    #[arg(long)]
    pub keep: bool,
    /// PATH is a block device: benchmark it directly (reads only, unless --destroy-data)
    #[arg(long)]
    pub device: bool,
    /// With --device: allow write workloads, which overwrite the device's data
    #[arg(long, requires = "device")]
    pub destroy_data: bool,
    /// Seed of the random offsets and read/write choices
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// `30s`, `2m`, `500ms`, `1h`, or seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: f64 = n.parse().map_err(|_| format!("expected a duration like 30s, 2m or 500ms, not '{s}'"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit '{unit}' in '{s}' (use ms, s, m or h)")),
    };
    if !(secs > 0.0 && secs < 1e9) {
        return Err(format!("expected a positive duration, not '{s}'"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" { Ok(0) } else { crate::config::parse_size(s) }
}

/// Name of the directory the benchmark owns under PATH, and of the marker file that proves it.
const WORK_DIR: &str = "fastsync-bench";
const MARKER: &str = ".fastsync-bench";
const BS_MAX: u64 = 64 << 20;
/// Bytes per write when laying out files for a read workload.
const LAYOUT_BLOCK_BYTES: usize = 1 << 20;

/// One measured phase: a direction of an I/O run, or a metadata phase.
struct Phase {
    name: &'static str,
    stats: OpStats,
    seconds: f64,
    /// Bytes per op, for the "bytes = IOPS × bs × time" identity (0 for metadata phases).
    block_bytes: u64,
    cpu: Cpu,
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    user: f64,
    system: f64,
}

fn cpu_now() -> Cpu {
    // SAFETY: getrusage fills the struct; RUSAGE_SELF counts every thread of the process, io_uring's workers too.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Cpu { user: s(ru.ru_utime), system: s(ru.ru_stime) }
}

impl Cpu {
    fn since(self, start: Cpu) -> Cpu {
        Cpu { user: self.user - start.user, system: self.system - start.system }
    }
}

/// Where the run does its I/O: files it owns, or a device.
enum Target {
    Files { dir: PathBuf },
    Device { path: PathBuf },
}

pub fn run(
    a: &BenchArgs,
    engine: &dyn Engine,
    threads: usize,
    memory_limit_bytes: u64,
    json: bool,
    quiet: bool,
) -> Result<i32, Error> {
    let meta = a.files.is_some();
    check_args(a, meta)?;
    let kind = engine.kind();
    let iodepth = match kind {
        EngineKind::Uring => a.iodepth as usize,
        EngineKind::Fallback => 1,
    };
    let block_bytes = if meta { a.file_size.max(1) } else { a.bs };
    let slot_bytes = block_bytes.next_multiple_of(fastsync_engine::pool::ALIGN_BYTES as u64) as usize;
    let buffers_bytes = (threads * iodepth * slot_bytes) as u64;
    if buffers_bytes > memory_limit_bytes {
        return Err(Error::Refused(format!(
            "{} threads x iodepth {} x {} buffers need {} MiB, more than the memory limit ({} MiB); lower --threads, \
             --iodepth or --bs, or raise --memory-limit",
            threads,
            iodepth,
            if meta { "--file-size" } else { "--bs" },
            buffers_bytes >> 20,
            memory_limit_bytes >> 20
        )));
    }
    let target = prepare_target(a, threads, meta)?;
    let outcome = (|| {
        let config = EngineConfig {
            shards: threads,
            pin: kind == EngineKind::Uring,
            block_bytes: slot_bytes,
            slots_per_shard: iodepth,
            jobs_in_flight_max: threads,
            buffered_writes_nonblocking: true,
            buffers_up_front: true,
        };
        let mut session = engine.start(&config)?;
        interrupt::install();
        let stop = Arc::new(AtomicBool::new(false));
        let phases = if let Some(files) = a.files {
            run_meta(a, &target, &mut session, threads, iodepth, files, &stop, quiet || json)
        } else {
            run_io(a, &target, &mut session, threads, iodepth, &stop, quiet || json)
        };
        let _ = session.finish();
        phases
    })();
    let cleanup = if a.keep { Ok(()) } else { cleanup(&target, threads, a.files.is_some()) };
    let phases = outcome?;
    cleanup?;
    print(a, &phases, kind, threads, iodepth, json);
    if let Some(signal) = interrupt::received() {
        eprintln!("fastsync: bench interrupted; the numbers above cover the time it ran");
        return Ok(interrupt::exit_code(signal));
    }
    Ok(exit::OK)
}

fn check_args(a: &BenchArgs, meta: bool) -> Result<(), Error> {
    let refuse = |m: String| Err(Error::Refused(m));
    if meta {
        if a.device {
            return refuse("--files (the metadata workload) needs a directory, not --device".into());
        }
        if a.file_size > BS_MAX {
            return refuse(format!("--file-size is at most {} MiB", BS_MAX >> 20));
        }
        return Ok(());
    }
    if a.bs < 512 || a.bs > BS_MAX || !a.bs.is_multiple_of(512) {
        return refuse(format!("--bs must be a multiple of 512 between 512 and 64M, not {}", a.bs));
    }
    if a.size < a.bs {
        return refuse(format!("--size ({}) is smaller than one block (--bs {})", a.size, a.bs));
    }
    if a.direct && !a.bs.is_multiple_of(4096) && !a.device {
        eprintln!("fastsync: warning: --direct with a --bs that is not a multiple of 4096 fails on most filesystems");
    }
    Ok(())
}

/// Check PATH, make (or reuse) the work directory, check free space, lay out the files.
fn prepare_target(a: &BenchArgs, threads: usize, meta: bool) -> Result<Target, Error> {
    let md = std::fs::metadata(&a.path).map_err(|e| Error::io("cannot benchmark", &a.path, e))?;
    let writes = a.rw.read_pct(a.rwmixread) < 100;
    if md.file_type().is_block_device() {
        if !a.device {
            return Err(Error::Refused(format!(
                "'{}' is a block device; benchmarking it directly needs --device (and --destroy-data for writes)",
                a.path.shown()
            )));
        }
        if writes && !a.destroy_data {
            return Err(Error::Refused(format!(
                "--rw {} on '{}' would overwrite the device's data; add --destroy-data if that is what you want",
                a.rw.name(),
                a.path.shown()
            )));
        }
        let device_bytes = device_size(&a.path)?;
        let need = a.size.saturating_mul(threads as u64);
        if need > device_bytes {
            return Err(Error::Refused(format!(
                "{} threads x --size {} = {} bytes is more than '{}' holds ({} bytes)",
                threads,
                a.size,
                need,
                a.path.shown(),
                device_bytes
            )));
        }
        return Ok(Target::Device { path: a.path.clone() });
    }
    if a.device {
        return Err(Error::Refused(format!("--device: '{}' is not a block device", a.path.shown())));
    }
    if !md.is_dir() {
        return Err(Error::Refused(format!(
            "'{}' is not a directory; fastsync bench writes only files it creates, inside a directory",
            a.path.shown()
        )));
    }
    let dir = a.path.join(WORK_DIR);
    match std::fs::create_dir(&dir) {
        Ok(()) => {
            std::fs::write(dir.join(MARKER), b"fastsync bench files; safe to delete\n")
                .map_err(|e| Error::io("cannot create", dir.join(MARKER), e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            if !dir.join(MARKER).exists() {
                return Err(Error::Refused(format!(
                    "'{}' exists and was not made by fastsync bench (no {MARKER} in it); move it away or choose \
                     another PATH",
                    dir.shown()
                )));
            }
        }
        Err(e) => return Err(Error::io("cannot create", &dir, e)),
    }
    let target = Target::Files { dir: dir.clone() };
    let prepared = (|| {
        if meta {
            let files = a.files.unwrap_or(0);
            check_space(&a.path, files.saturating_mul(a.file_size.next_multiple_of(4096)), files)?;
            for i in 0..threads {
                let d = dir.join(format!("meta.{i}"));
                match std::fs::create_dir(&d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        // A kept or interrupted earlier run: start from an empty directory.
                        std::fs::remove_dir_all(&d).map_err(|e| Error::io("cannot clean", &d, e))?;
                        std::fs::create_dir(&d).map_err(|e| Error::io("cannot create", &d, e))?;
                    }
                    Err(e) => return Err(Error::io("cannot create", &d, e)),
                }
            }
            return Ok(());
        }
        let mut missing = 0u64;
        for i in 0..threads {
            let f = io_file(&dir, i);
            let have = std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
            if have < a.size {
                missing += a.size - have;
            }
        }
        check_space(&a.path, missing, threads as u64)?;
        lay_out(&dir, threads, a.size, a.rw.read_pct(a.rwmixread) > 0)
    })();
    match prepared {
        Ok(()) => Ok(target),
        Err(e) => {
            if !a.keep {
                let _ = cleanup(&target, threads, meta);
            }
            Err(e)
        }
    }
}

fn io_file(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("io.{i}"))
}

fn device_size(path: &Path) -> Result<u64, Error> {
    let f = std::fs::File::open(path).map_err(|e| Error::io("cannot open", path, e))?;
    let mut bytes: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: the ioctl writes one u64 into `bytes`.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut bytes) } < 0 {
        return Err(Error::io("cannot get the size of", path, std::io::Error::last_os_error()));
    }
    Ok(bytes)
}

/// Refuse to start when the filesystem under `path` cannot hold `bytes` more (or `inodes` more files).
fn check_space(path: &Path, bytes: u64, inodes: u64) -> Result<(), Error> {
    let c = fastsync_engine::finish::cstr(path).map_err(|e| Error::io("cannot benchmark", path, e))?;
    // SAFETY: statvfs fills the struct from a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(Error::io("cannot get free space of", path, std::io::Error::last_os_error()));
    }
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    if bytes > free {
        return Err(Error::Refused(format!(
            "'{}' has {} MiB free, and the benchmark's files need {} MiB; lower --size or --threads, or free space",
            path.shown(),
            free >> 20,
            bytes.div_ceil(1 << 20)
        )));
    }
    // Filesystems without an inode limit report 0 free inodes (btrfs): only a real count can refuse.
    if st.f_files > 0 && inodes > st.f_favail as u64 {
        return Err(Error::Refused(format!(
            "'{}' has room for {} more files, and the benchmark needs {}",
            path.shown(),
            st.f_favail,
            inodes
        )));
    }
    Ok(())
}

/// Make each thread's file `size` bytes long, reusing what a kept run left. Reads need real data (written, like
/// fio, with incompressible bytes and fsynced); writes only need the space (allocated, like fio's fallocate).
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))] // `with_data`: no fallocate there
fn lay_out(dir: &Path, threads: usize, size: u64, with_data: bool) -> Result<(), Error> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                s.spawn(move || {
                    let path = io_file(dir, i);
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(&path)
                        .map_err(|e| Error::io("cannot create", &path, e))?;
                    let have = f.metadata().map_err(|e| Error::io("cannot stat", &path, e))?.len();
                    if have >= size {
                        return Ok(());
                    }
                    #[cfg(target_os = "linux")]
                    if !with_data {
                        // SAFETY: valid descriptor.
                        let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
                        if rc == 0 {
                            return Ok(());
                        }
                        if rc != libc::EOPNOTSUPP && rc != libc::EINVAL {
                            return Err(Error::io("cannot allocate", &path, std::io::Error::from_raw_os_error(rc)));
                        }
                    }
                    let mut buf = vec![0u8; LAYOUT_BLOCK_BYTES];
                    fastsync_engine::bench::fill_random(&mut buf, i as u64);
                    let mut at = have - have % LAYOUT_BLOCK_BYTES as u64;
                    use std::os::unix::fs::FileExt;
                    while at < size {
                        let n = (size - at).min(LAYOUT_BLOCK_BYTES as u64) as usize;
                        f.write_all_at(&buf[..n], at).map_err(|e| Error::io("cannot write", &path, e))?;
                        at += n as u64;
                    }
                    f.sync_all().map_err(|e| Error::io("cannot fsync", &path, e))
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(Error::Refused("layout failed".into()))))
    })
}

/// Drop the page cache of a file before a run (fio's `invalidate=1`), so reads come from the device.
#[cfg_attr(not(target_os = "linux"), allow(unused_variables))]
fn invalidate(path: &Path, direct: bool) {
    if direct {
        return;
    }
    // Elsewhere (no posix_fadvise on macOS) the cache stays as it is.
    #[cfg(target_os = "linux")]
    if let Ok(f) = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
        // SAFETY: valid descriptor; advice only.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// Remove what this run's workload used (the metadata directories, or the I/O files; a kept file of the other
/// workload stays), then the work directory once nothing but its marker is left.
fn cleanup(target: &Target, threads: usize, meta: bool) -> Result<(), Error> {
    let Target::Files { dir, .. } = target else { return Ok(()) };
    for i in 0..threads {
        if meta {
            let d = dir.join(format!("meta.{i}"));
            if d.exists() {
                std::fs::remove_dir_all(&d).map_err(|e| Error::io("cannot remove", &d, e))?;
            }
            continue;
        }
        let f = io_file(dir, i);
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("cannot remove", &f, e)),
        }
    }
    let only_marker = std::fs::read_dir(dir).map(|d| d.flatten().all(|e| e.file_name() == MARKER)).unwrap_or(false);
    if only_marker {
        let _ = std::fs::remove_file(dir.join(MARKER));
        std::fs::remove_dir(dir).map_err(|e| Error::io("cannot remove", dir, e))?;
    }
    Ok(())
}

/// Submit one job per shard, show a live line while they run, and collect their reports.
fn run_jobs(
    session: &mut Session,
    works: Vec<BenchWork>,
    stop: &Arc<AtomicBool>,
    label: &str,
    time_max: Option<Duration>,
    silent: bool,
) -> Result<(BenchReport, Cpu), Error> {
    let barrier = Arc::new(Barrier::new(works.len()));
    let lives: Vec<Arc<Live>> = works.iter().map(|_| Arc::new(Live::default())).collect();
    let done = Arc::new(AtomicBool::new(false));
    let ticker = spawn_ticker(lives.clone(), stop.clone(), done.clone(), label.to_string(), time_max, silent);
    let cpu_start = cpu_now();
    let mut report = BenchReport::default();
    let mut failure: Option<String> = None;
    let mut on_done = |c: fastsync_engine::Completion| match c.outcome {
        Outcome::Bench(r) => report.merge(&r),
        Outcome::Failed(e) => {
            // The first failure ends the run: the other jobs stop issuing and drain.
            stop.store(true, Ordering::Relaxed);
            failure.get_or_insert(e.to_string());
        }
        other => {
            failure.get_or_insert(format!("unexpected completion of a bench job: {other:?}"));
        }
    };
    let mut submitted = Ok(());
    for (tag, (work, live)) in works.into_iter().zip(lives).enumerate() {
        let job = BenchJob {
            tag: tag as u64,
            work,
            start: barrier.clone(),
            stop: stop.clone(),
            live,
            passed_start: AtomicBool::new(false),
        };
        submitted = session.submit(fastsync_engine::Job::Bench(job), &mut on_done);
        if submitted.is_err() {
            break;
        }
    }
    let waited = submitted.and_then(|()| session.drain(&mut on_done));
    let cpu = cpu_now().since(cpu_start);
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    waited?;
    if let Some(f) = failure {
        return Err(Error::Bench(f));
    }
    Ok((report, cpu))
}

/// Print the live line (on a terminal), and turn SIGINT/SIGTERM into a stop request.
fn spawn_ticker(
    lives: Vec<Arc<Live>>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    label: String,
    time_max: Option<Duration>,
    silent: bool,
) -> std::thread::JoinHandle<()> {
    let tty = !silent && std::io::stderr().is_terminal();
    std::thread::spawn(move || {
        let started = Instant::now();
        let (mut last_ops, mut last_bytes, mut last_at) = (0u64, 0u64, started);
        let mut shown = false;
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            if interrupt::received().is_some() {
                stop.store(true, Ordering::Relaxed);
            }
            if !tty || last_at.elapsed() < Duration::from_secs(1) {
                continue;
            }
            let now = Instant::now();
            let ops: u64 = lives.iter().map(|l| l.ops.load(Ordering::Relaxed)).sum();
            let bytes: u64 = lives.iter().map(|l| l.bytes.load(Ordering::Relaxed)).sum();
            let dt = (now - last_at).as_secs_f64();
            let t = Duration::from_secs(started.elapsed().as_secs());
            let of = time_max.map(|m| format!("/{:.1?}", m)).unwrap_or_default();
            eprint!(
                "\r\x1b[K{label}: {:.1} MB/s, {:.0} IOPS [{t:.1?}{of}]",
                (bytes - last_bytes) as f64 / dt / 1e6,
                (ops - last_ops) as f64 / dt
            );
            shown = true;
            (last_ops, last_bytes, last_at) = (ops, bytes, now);
        }
        if shown {
            eprint!("\r\x1b[K");
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn run_io(
    a: &BenchArgs,
    target: &Target,
    session: &mut Session,
    threads: usize,
    iodepth: usize,
    stop: &Arc<AtomicBool>,
    silent: bool,
) -> Result<Vec<Phase>, Error> {
    let len = a.size - a.size % a.bs;
    let works: Vec<BenchWork> = (0..threads)
        .map(|i| {
            let (path, offset) = match target {
                Target::Files { dir, .. } => (io_file(dir, i), 0),
                Target::Device { path } => (path.clone(), i as u64 * a.size),
            };
            invalidate(&path, a.direct || matches!(target, Target::Device { .. }));
            BenchWork::Io(IoSpec {
                path,
                direct: a.direct,
                read_pct: a.rw.read_pct(a.rwmixread),
                random: a.rw.random(),
                block_bytes: a.bs,
                iodepth,
                offset,
                len,
                bytes_total: len,
                time_max: a.time,
                fsync_every: a.fsync,
                end_fsync: a.end_fsync,
                seed: a.seed.wrapping_add(i as u64),
            })
        })
        .collect();
    let (report, cpu) = run_jobs(session, works, stop, a.rw.name(), a.time, silent)?;
    let seconds = report.elapsed.as_secs_f64();
    let mut phases = Vec::new();
    let read_pct = a.rw.read_pct(a.rwmixread);
    if read_pct > 0 {
        phases.push(Phase { name: "read", stats: report.read, seconds, block_bytes: a.bs, cpu });
    }
    if read_pct < 100 {
        phases.push(Phase { name: "write", stats: report.write, seconds, block_bytes: a.bs, cpu });
    }
    if report.fsync.ops > 0 {
        phases.push(Phase { name: "fsync", stats: report.fsync, seconds, block_bytes: 0, cpu });
    }
    Ok(phases)
}

#[allow(clippy::too_many_arguments)]
fn run_meta(
    a: &BenchArgs,
    target: &Target,
    session: &mut Session,
    threads: usize,
    iodepth: usize,
    files: u64,
    stop: &Arc<AtomicBool>,
    silent: bool,
) -> Result<Vec<Phase>, Error> {
    let Target::Files { dir, .. } = target else { unreachable!("checked: --files needs a directory") };
    let mut phases = Vec::new();
    for phase in MetaPhase::ALL {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let works = (0..threads as u64)
            .map(|i| {
                let (first, count) = (files * i / threads as u64, files * (i + 1) / threads as u64);
                BenchWork::Meta(MetaSpec {
                    dir: dir.join(format!("meta.{i}")),
                    prefix: "f".into(),
                    first,
                    count: count - first,
                    phase,
                    file_bytes: a.file_size,
                    iodepth,
                })
            })
            .collect();
        let (report, cpu) = run_jobs(session, works, stop, phase.name(), None, silent)?;
        let seconds = report.elapsed.as_secs_f64();
        phases.push(Phase { name: phase.name(), stats: report.meta, seconds, block_bytes: 0, cpu });
    }
    Ok(phases)
}

fn percentiles_us(s: &OpStats) -> [(&'static str, f64); 6] {
    let h = &s.latency_ns;
    let q = |p: f64| if s.ops == 0 { 0.0 } else { h.value_at_quantile(p) as f64 / 1000.0 };
    [
        ("p50", q(0.50)),
        ("p90", q(0.90)),
        ("p99", q(0.99)),
        ("p99.9", q(0.999)),
        ("max", if s.ops == 0 { 0.0 } else { h.max() as f64 / 1000.0 }),
        ("mean", if s.ops == 0 { 0.0 } else { h.mean() / 1000.0 }),
    ]
}

fn print(a: &BenchArgs, phases: &[Phase], kind: EngineKind, threads: usize, iodepth: usize, json: bool) {
    let mut out = std::io::stdout().lock();
    let workload = if a.files.is_some() { "metadata".to_string() } else { a.rw.name().to_string() };
    if json {
        let phases: Vec<serde_json::Value> = phases
            .iter()
            .map(|p| {
                let lat: serde_json::Map<String, serde_json::Value> =
                    percentiles_us(&p.stats).iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
                serde_json::json!({
                    "name": p.name,
                    "ops": p.stats.ops,
                    "bytes": p.stats.bytes,
                    "block_bytes": p.block_bytes,
                    "seconds": p.seconds,
                    "iops": rate(p.stats.ops as f64, p.seconds),
                    "mb_per_s": rate(p.stats.bytes as f64 / 1e6, p.seconds),
                    "latency_us": lat,
                    "cpu_user_seconds": p.cpu.user,
                    "cpu_system_seconds": p.cpu.system,
                })
            })
            .collect();
        let v = serde_json::json!({
            "workload": workload,
            "engine": kind.name(),
            "threads": threads,
            "iodepth": iodepth,
            "bs": a.bs,
            "size": a.size,
            "direct": a.direct,
            "files": a.files,
            "file_size": a.file_size,
            "phases": phases,
        });
        let _ = writeln!(out, "{v}");
        return;
    }
    let what = if let Some(n) = a.files {
        format!("metadata, {n} files of {} bytes", a.file_size)
    } else {
        format!(
            "{}, bs {}, {}{}",
            a.rw.name(),
            human(a.bs),
            if a.direct { "direct" } else { "buffered" },
            a.time.map(|t| format!(", {:.0?}", t)).unwrap_or_else(|| format!(", {} per thread", human(a.size)))
        )
    };
    let plural = if threads == 1 { "" } else { "s" };
    let _ =
        writeln!(out, "fastsync bench: {what}; engine {}, {threads} thread{plural} x iodepth {iodepth}", kind.name());
    let shared_cpu = a.files.is_none();
    for (i, p) in phases.iter().enumerate() {
        let lat = percentiles_us(&p.stats);
        let lat: Vec<String> = lat.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
        let cpu_pct = rate(100.0 * (p.cpu.user + p.cpu.system), p.seconds);
        let per_s = rate(p.stats.ops as f64, p.seconds);
        let (unit, what) = if shared_cpu { ("IOPS", "ops") } else { ("files/s", "files") };
        let mb = if p.stats.bytes > 0 {
            format!(" {:>10.1} MB/s", rate(p.stats.bytes as f64 / 1e6, p.seconds))
        } else {
            String::new()
        };
        let _ = writeln!(out, "  {:<7} {per_s:>12.0} {unit}{mb}  {} {what} in {:.2} s", p.name, p.stats.ops, p.seconds);
        let _ = writeln!(out, "          latency (us): {}", lat.join(", "));
        if shared_cpu && i + 1 < phases.len() {
            // The directions of one I/O run share its CPU time: said once, after the last.
            continue;
        }
        let _ = writeln!(
            out,
            "  {:<7} {:.2} s user, {:.2} s system ({cpu_pct:.0}% of one core)",
            "cpu", p.cpu.user, p.cpu.system
        );
    }
}

fn rate(n: f64, seconds: f64) -> f64 {
    if seconds > 0.0 { n / seconds } else { 0.0 }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b.is_multiple_of(1 << 30) => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b.is_multiple_of(1 << 20) => format!("{}M", b >> 20),
        b if b >= 1 << 10 && b.is_multiple_of(1 << 10) => format!("{}k", b >> 10),
        b => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes_print_short() {
        assert_eq!(human(4096), "4k");
        assert_eq!(human(1 << 20), "1M");
        assert_eq!(human(3 << 30), "3G");
        assert_eq!(human(1000), "1000");
    }
}
