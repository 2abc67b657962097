//! The engine contract, run against both engines: jobs go through a real session, results are checked with `std::fs`.

use std::fs::{self, File, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use fastsync_engine::{
    ChunkedFile, Completion, Engine, EngineConfig, EngineError, EngineKind, FileJob, FinishSpec, HashJob, Job, Op,
    Outcome, RangeJob, ShardStats, Timestamp,
};
use fastsync_fallback::FallbackEngine;
use fastsync_uring::UringEngine;

const BLOCK_BYTES: usize = 64 * 1024;

/// A directory removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("fastsync-engine-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn config() -> EngineConfig {
    // Ring writes even where the kernel punts them to a worker: the CLI suite covers the pwrite path on ext4.
    EngineConfig {
        shards: 2,
        pin: false,
        block_bytes: BLOCK_BYTES,
        slots_per_shard: 4,
        jobs_in_flight_max: 64,
        buffered_writes_nonblocking: true,
        buffers_up_front: false,
    }
}

/// Run `jobs` through a fresh session; completions sorted by tag.
fn run(engine: &dyn Engine, jobs: Vec<Job>) -> (Vec<Completion>, Vec<ShardStats>) {
    let mut session = engine.start(&config()).unwrap();
    let mut done = Vec::new();
    let mut on_done = |c: Completion| done.push(c);
    for job in jobs {
        session.submit(job, &mut on_done).unwrap();
    }
    session.drain(&mut on_done).unwrap();
    let stats = session.finish().unwrap();
    done.sort_by_key(|c| c.tag);
    (done, stats)
}

/// Deterministic bytes that differ from block to block (xorshift).
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn times() -> [Timestamp; 2] {
    [Timestamp { sec: 1_000_000_000, nsec: 123_456_789 }, Timestamp { sec: 1_600_000_000, nsec: 987_654_321 }]
}

fn finish_spec(verify: bool) -> FinishSpec {
    FinishSpec { mode: Some(0o640), times: Some(times()), verify, ..FinishSpec::default() }
}

/// The destination has the mode and mtime of [`finish_spec`] (checked before its content is read).
fn assert_finished(dst: &Path) {
    let meta = fs::metadata(dst).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "{}", dst.display());
    assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_600_000_000, 987_654_321), "{}", dst.display());
}

fn file_job(dir: &TempDir, tag: u64, size_bytes: usize, size_hint: u64, verify: bool) -> (FileJob, Vec<u8>) {
    let data = content(size_bytes, tag);
    let src = dir.join(&format!("src-{tag}"));
    fs::write(&src, &data).unwrap();
    let job = FileJob {
        tag,
        src,
        tmp: dir.join(&format!(".dst-{tag}.tmp")),
        dst: dir.join(&format!("dst-{tag}")),
        dst_vacant: false,
        size_hint,
        follow_symlinks: false,
        finish: finish_spec(verify),
    };
    (job, data)
}

fn rejects_unaligned_block_size(engine: &dyn Engine) {
    let config = EngineConfig { block_bytes: 1000, ..config() };
    assert!(matches!(engine.start(&config), Err(EngineError::Config(_))));
}

fn copies_whole_files(engine: &dyn Engine) {
    let dir = TempDir::new("files");
    let sizes = [0, 1, BLOCK_BYTES, 3 * BLOCK_BYTES + 1234];
    let mut jobs = Vec::new();
    let mut expected = Vec::new();
    let mut tag = 0;
    for verify in [false, true] {
        for &size in &sizes {
            let (job, data) = file_job(&dir, tag, size, size as u64, verify);
            expected.push((job.tmp.clone(), job.dst.clone(), data));
            jobs.push(Job::File(job));
            tag += 1;
        }
    }
    // A size hint is only a hint: the file grew since it was walked, or was seen empty.
    for hint in [10, 0] {
        let (job, data) = file_job(&dir, tag, 2 * BLOCK_BYTES + 7, hint, false);
        expected.push((job.tmp.clone(), job.dst.clone(), data));
        jobs.push(Job::File(job));
        tag += 1;
    }
    let (done, stats) = run(engine, jobs);

    assert_eq!(done.len(), expected.len());
    for (c, (tmp, dst, data)) in done.iter().zip(&expected) {
        assert!(matches!(c.outcome, Outcome::FileDone), "job {}: {:?}", c.tag, c.outcome);
        assert_eq!(c.bytes, data.len() as u64, "job {}", c.tag);
        assert!(c.shard < 2);
        assert!(!tmp.exists(), "{} left behind", tmp.display());
        assert_finished(dst);
        assert!(fs::read(dst).unwrap() == *data, "{} differs", dst.display());
    }
    let total_bytes: u64 = expected.iter().map(|(_, _, d)| d.len() as u64).sum();
    assert_eq!(stats.iter().map(|s| s.jobs).sum::<u64>(), expected.len() as u64);
    assert_eq!(stats.iter().map(|s| s.bytes_written).sum::<u64>(), total_bytes);
    assert!(stats.iter().map(|s| s.syscalls).sum::<u64>() >= expected.len() as u64);
}

fn missing_source_fails_to_open(engine: &dyn Engine) {
    let dir = TempDir::new("missing");
    let job = FileJob {
        tag: 7,
        src: dir.join("nope"),
        tmp: dir.join(".dst.tmp"),
        dst: dir.join("dst"),
        dst_vacant: true,
        size_hint: 10,
        follow_symlinks: false,
        finish: FinishSpec::default(),
    };
    let (done, _) = run(engine, vec![Job::File(job)]);
    let Outcome::Failed(err) = &done[0].outcome else { panic!("{:?}", done[0].outcome) };
    assert_eq!(err.op, Op::Open);
    assert_eq!(err.path, dir.join("nope"));
    assert_eq!(err.source.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(done[0].tag, 7);
    assert!(!dir.join(".dst.tmp").exists());
    assert!(!dir.join("dst").exists());
}

fn existing_temporary_is_not_ours_to_remove(engine: &dyn Engine) {
    let dir = TempDir::new("exists");
    let (job, _) = file_job(&dir, 1, 100, 100, false);
    fs::write(&job.tmp, b"someone else's").unwrap();
    let (tmp, dst) = (job.tmp.clone(), job.dst.clone());
    let (done, _) = run(engine, vec![Job::File(job)]);
    let Outcome::Failed(err) = &done[0].outcome else { panic!("{:?}", done[0].outcome) };
    assert_eq!((err.op, &err.path), (Op::Create, &dst));
    assert_eq!(err.source.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(fs::read(&tmp).unwrap(), b"someone else's");
    assert!(!dst.exists());
}

/// A destination known to be vacant is an unnamed file linked into place (Linux): its named temporary is never
/// created — here it could not be, its directory does not exist. Something that appeared at the destination since
/// the walk is replaced, as a rename would.
fn vacant_destinations_are_created_unnamed(engine: &dyn Engine) {
    let dir = TempDir::new("vacant");
    let mut jobs = Vec::new();
    let mut expected = Vec::new();
    for (tag, size) in [(0u64, 0usize), (1, 100), (2, 3 * BLOCK_BYTES + 5)] {
        let (mut job, data) = file_job(&dir, tag, size, size as u64, tag == 2);
        job.dst_vacant = true;
        if cfg!(target_os = "linux") {
            job.tmp = dir.join("no-such-dir").join(format!(".dst-{tag}.tmp"));
        }
        expected.push((job.dst.clone(), data));
        jobs.push(Job::File(job));
    }
    // Appeared after the walk: linked to the temporary name, then renamed over it.
    let (mut late, late_data) = file_job(&dir, 3, 5000, 5000, false);
    late.dst_vacant = true;
    fs::write(&late.dst, b"appeared meanwhile").unwrap();
    let late_tmp = late.tmp.clone();
    expected.push((late.dst.clone(), late_data));
    jobs.push(Job::File(late));
    let (done, _) = run(engine, jobs);
    for (c, (dst, data)) in done.iter().zip(&expected) {
        assert!(matches!(c.outcome, Outcome::FileDone), "job {}: {:?}", c.tag, c.outcome);
        assert_finished(dst);
        assert!(fs::read(dst).unwrap() == *data, "{} differs", dst.display());
    }
    assert!(!late_tmp.exists(), "{} left behind", late_tmp.display());
    let names: Vec<String> =
        fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| n.starts_with("src-") || n.starts_with("dst-")), "stray entries: {names:?}");
}

/// A chunked file as the planner makes it: source opened, temporary created at its final size.
fn chunked(dir: &TempDir, name: &str, data: &[u8], size: u64, dst_fd: Option<OwnedFd>, verify: bool) -> ChunkedFile {
    let src = dir.join(&format!("{name}.src"));
    fs::write(&src, data).unwrap();
    let tmp = dir.join(&format!(".{name}.tmp"));
    let dst_fd = dst_fd.unwrap_or_else(|| {
        let f = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&tmp).unwrap();
        f.set_len(size).unwrap();
        f.into()
    });
    ChunkedFile {
        src_fd: File::open(&src).unwrap().into(),
        dst_fd,
        src,
        tmp,
        dst: dir.join(name),
        size,
        direct: false,
        finish: finish_spec(verify),
        ranges_left: AtomicU32::new(0),
        failed: AtomicBool::new(false),
        journal: None,
        interrupted: AtomicBool::new(false),
    }
}

/// Range jobs covering `[0, file.size)` in pieces of `piece_bytes`, tagged from `first_tag`.
fn ranges(file: ChunkedFile, piece_bytes: u64, first_tag: u64) -> Vec<Job> {
    let count = file.size.div_ceil(piece_bytes);
    file.ranges_left.store(count as u32, Ordering::Relaxed);
    let file = Arc::new(file);
    (0..count)
        .map(|i| {
            let offset = i * piece_bytes;
            let len = piece_bytes.min(file.size - offset);
            Job::Range(RangeJob { tag: first_tag + i, file: file.clone(), offset, len, resume: false })
        })
        .collect()
}

fn copies_a_chunked_file_in_ranges(engine: &dyn Engine) {
    for verify in [false, true] {
        let dir = TempDir::new("ranges");
        let data = content(5 * BLOCK_BYTES + 777, 42);
        let file = chunked(&dir, "big", &data, data.len() as u64, None, verify);
        let (tmp, dst) = (file.tmp.clone(), file.dst.clone());
        // Pieces that straddle blocks, so ranges start and end at unaligned offsets.
        let jobs = ranges(file, 70_000, 100);
        let count = jobs.len();
        let (done, _) = run(engine, jobs);

        assert_eq!(done.len(), count);
        let finished = done.iter().filter(|c| matches!(c.outcome, Outcome::RangeDoneFileDone)).count();
        let copied = done.iter().filter(|c| matches!(c.outcome, Outcome::RangeDone)).count();
        assert_eq!((finished, copied), (1, count - 1), "{:?}", done);
        assert_eq!(done.iter().map(|c| c.bytes).sum::<u64>(), data.len() as u64);
        assert!(!tmp.exists());
        assert_finished(&dst);
        assert!(fs::read(&dst).unwrap() == data, "verify={verify}: destination differs");
    }
}

fn shrunken_source_abandons_the_chunked_file(engine: &dyn Engine) {
    let dir = TempDir::new("shrunk");
    // The planner saw 4 blocks; only 1.5 are left.
    let data = content(BLOCK_BYTES + BLOCK_BYTES / 2, 3);
    let file = chunked(&dir, "shrunk", &data, 4 * BLOCK_BYTES as u64, None, false);
    let (src, tmp, dst) = (file.src.clone(), file.tmp.clone(), file.dst.clone());
    let (done, _) = run(engine, ranges(file, BLOCK_BYTES as u64, 0));

    let changed: Vec<_> = done
        .iter()
        .filter_map(|c| match &c.outcome {
            Outcome::Failed(e) => Some(e),
            _ => None,
        })
        .collect();
    assert!(!changed.is_empty(), "{:?}", done);
    for e in changed {
        assert_eq!((e.op, &e.path), (Op::SourceChanged, &src));
        assert_eq!(e.source.kind(), std::io::ErrorKind::UnexpectedEof);
    }
    assert!(done.iter().all(|c| !matches!(c.outcome, Outcome::RangeDoneFileDone)));
    assert!(!tmp.exists());
    assert!(!dst.exists());
}

fn verify_detects_a_destination_that_differs(engine: &dyn Engine) {
    let dir = TempDir::new("verify");
    let data = content(BLOCK_BYTES + 10, 9);
    // Writes to /dev/null vanish and read back as end of file: the check must fail before any rename.
    let null = OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
    let file = chunked(&dir, "null", &data, data.len() as u64, Some(null.into()), true);
    fs::write(&file.tmp, b"").unwrap();
    let (tmp, dst) = (file.tmp.clone(), file.dst.clone());
    let (done, _) = run(engine, ranges(file, 2 * BLOCK_BYTES as u64, 0));

    let Outcome::Failed(err) = &done[0].outcome else { panic!("{:?}", done[0].outcome) };
    assert_eq!((err.op, &err.path), (Op::Verify, &dst));
    assert_eq!(err.source.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.source.to_string().contains("BLAKE3 mismatch at offset 0"), "{err}");
    assert!(!tmp.exists());
    assert!(!dst.exists());
}

/// Every case above, once per engine.
/// Hash jobs: digests of files of many sizes (more files than buffer slots, so hashing overlaps), a missing file
/// and a symlink (never followed unless asked) fail with the path named.
fn hashes_files_and_never_follows_symlinks(engine: &dyn Engine) {
    let dir = TempDir::new("hash");
    let sizes = [0usize, 1, 4095, BLOCK_BYTES - 1, BLOCK_BYTES, BLOCK_BYTES + 1, 3 * BLOCK_BYTES + 17];
    let mut jobs = Vec::new();
    let mut expected = Vec::new();
    for (i, &len) in sizes.iter().cycle().take(20).enumerate() {
        let path = dir.join(&format!("f{i}"));
        let data = content(len, i as u64);
        fs::write(&path, &data).unwrap();
        expected.push((*blake3::hash(&data).as_bytes(), len as u64));
        jobs.push(Job::Hash(HashJob { tag: i as u64, path, follow_symlinks: false }));
    }
    std::os::unix::fs::symlink(dir.join("f1"), dir.join("link")).unwrap();
    jobs.push(Job::Hash(HashJob { tag: 100, path: dir.join("link"), follow_symlinks: false }));
    jobs.push(Job::Hash(HashJob { tag: 101, path: dir.join("link"), follow_symlinks: true }));
    jobs.push(Job::Hash(HashJob { tag: 102, path: dir.join("missing"), follow_symlinks: false }));
    let (done, _) = run(engine, jobs);
    assert_eq!(done.len(), 23);
    for (c, (digest, bytes)) in done.iter().zip(&expected) {
        match &c.outcome {
            Outcome::Hashed { digest: d, bytes: b } => assert_eq!((d, b), (digest, bytes), "file f{}", c.tag),
            other => panic!("f{}: {other:?}", c.tag),
        }
    }
    assert!(matches!(&done[20].outcome, Outcome::Failed(e) if e.path.ends_with("link")), "{:?}", done[20].outcome);
    assert!(matches!(&done[21].outcome, Outcome::Hashed { digest, .. } if *digest == expected[1].0));
    match &done[22].outcome {
        Outcome::Failed(e) => {
            assert!(e.path.ends_with("missing"));
            assert_eq!(e.source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("missing file: {other:?}"),
    }
}

macro_rules! on_both_engines {
    ($($case:ident),* $(,)?) => {
        mod uring {
            fn engine() -> super::UringEngine {
                super::UringEngine::probe().expect("io_uring must work on the test machine; run the fallback suite elsewhere")
            }
            $(#[test] fn $case() { super::$case(&engine()) })*
            #[test]
            fn reports_kind_and_capabilities() {
                use super::Engine;
                assert_eq!(engine().kind(), super::EngineKind::Uring);
                assert!(engine().capabilities().direct_io);
            }
        }
        mod fallback {
            $(#[test] fn $case() { super::$case(&super::FallbackEngine::new()) })*
            #[test]
            fn reports_kind_and_capabilities() {
                use super::Engine;
                assert_eq!(super::FallbackEngine::new().kind(), super::EngineKind::Fallback);
                // O_DIRECT through pread/pwrite on Linux; declined elsewhere.
                assert_eq!(super::FallbackEngine::new().capabilities().direct_io, cfg!(target_os = "linux"));
            }
        }
    };
}

on_both_engines!(
    rejects_unaligned_block_size,
    copies_whole_files,
    missing_source_fails_to_open,
    existing_temporary_is_not_ours_to_remove,
    vacant_destinations_are_created_unnamed,
    copies_a_chunked_file_in_ranges,
    shrunken_source_abandons_the_chunked_file,
    verify_detects_a_destination_that_differs,
    hashes_files_and_never_follows_symlinks
);
