//! Micro-benchmarks of the engine: one session copying many small files, and one large file in chunks, on each engine.
//!
//! End-to-end comparisons with other tools live in `perf-scripts/`; these isolate the engine from the walk and the CLI.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fastsync_engine::{ChunkedFile, Engine, EngineConfig, FileJob, FinishSpec, Job, RangeJob};

const SMALL_FILES: usize = 500;
const SMALL_FILE_BYTES: usize = 16 << 10;
const LARGE_FILE_BYTES: usize = 64 << 20;
const CHUNK_BYTES: u64 = 4 << 20;

fn engines() -> Vec<(&'static str, Box<dyn Engine>)> {
    #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
    let mut v: Vec<(&'static str, Box<dyn Engine>)> =
        vec![("fallback", Box::new(fastsync_fallback::FallbackEngine::new()))];
    #[cfg(target_os = "linux")]
    if let Ok(e) = fastsync_uring::UringEngine::probe() {
        v.push(("uring", Box::new(e)));
    }
    v
}

fn config(kind: fastsync_engine::EngineKind) -> EngineConfig {
    let (shards, slots) = match kind {
        fastsync_engine::EngineKind::Uring => (2, 32),
        fastsync_engine::EngineKind::Fallback => (4, 1),
    };
    EngineConfig {
        shards,
        pin: false,
        block_bytes: 1 << 20,
        slots_per_shard: slots,
        jobs_in_flight_max: 128,
        buffered_writes_nonblocking: false,
        buffers_up_front: false,
    }
}

fn fresh_dir(root: &Path, name: &str) -> PathBuf {
    let d = root.join(name);
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn run(engine: &dyn Engine, jobs: impl Iterator<Item = Job>) {
    let mut session = engine.start(&config(engine.kind())).unwrap();
    let mut on_done = |c: fastsync_engine::Completion| {
        assert!(!matches!(c.outcome, fastsync_engine::Outcome::Failed(_)), "{:?}", c.outcome);
    };
    for job in jobs {
        session.submit(job, &mut on_done).unwrap();
    }
    session.drain(&mut on_done).unwrap();
    session.finish().unwrap();
}

fn bench(c: &mut Criterion) {
    let root = std::env::temp_dir().join(format!("fastsync-bench-{}", std::process::id()));
    let src = fresh_dir(&root, "src");
    for i in 0..SMALL_FILES {
        fs::write(src.join(format!("f{i}")), vec![i as u8; SMALL_FILE_BYTES]).unwrap();
    }
    let big: Vec<u8> = (0..LARGE_FILE_BYTES).map(|i| (i * 31 % 251) as u8).collect();
    fs::write(src.join("big"), &big).unwrap();

    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    for (name, engine) in engines() {
        group.throughput(Throughput::Elements(SMALL_FILES as u64));
        let mut round = 0;
        group.bench_function(format!("{name}/small-files"), |b| {
            b.iter(|| {
                round += 1;
                let dst = fresh_dir(&root, &format!("small-{name}-{round}"));
                run(
                    engine.as_ref(),
                    (0..SMALL_FILES).map(|i| {
                        Job::File(FileJob {
                            tag: i as u64,
                            src: src.join(format!("f{i}")),
                            tmp: dst.join(format!(".f{i}.tmp")),
                            dst: dst.join(format!("f{i}")),
                            // A fresh directory, as a copy into a new tree: created unnamed where possible.
                            dst_vacant: true,
                            size_hint: SMALL_FILE_BYTES as u64,
                            follow_symlinks: false,
                            finish: FinishSpec::default(),
                        })
                    }),
                );
                fs::remove_dir_all(&dst).unwrap();
            })
        });
        group.throughput(Throughput::Bytes(LARGE_FILE_BYTES as u64));
        group.bench_function(format!("{name}/large-file-chunks"), |b| {
            b.iter(|| {
                round += 1;
                let dst = fresh_dir(&root, &format!("big-{name}-{round}"));
                let tmp = dst.join(".big.tmp");
                let dst_fd = fs::OpenOptions::new().read(true).write(true).create_new(true).open(&tmp).unwrap();
                dst_fd.set_len(LARGE_FILE_BYTES as u64).unwrap();
                let file = Arc::new(ChunkedFile {
                    src_fd: fs::File::open(src.join("big")).unwrap().into(),
                    dst_fd: dst_fd.into(),
                    src: src.join("big"),
                    tmp,
                    dst: dst.join("big"),
                    size: LARGE_FILE_BYTES as u64,
                    direct: false,
                    finish: FinishSpec::default(),
                    ranges_left: AtomicU32::new((LARGE_FILE_BYTES as u64 / CHUNK_BYTES) as u32),
                    failed: AtomicBool::new(false),
                    journal: None,
                    interrupted: AtomicBool::new(false),
                });
                let chunks = LARGE_FILE_BYTES as u64 / CHUNK_BYTES;
                run(
                    engine.as_ref(),
                    (0..chunks).map(|i| {
                        Job::Range(RangeJob {
                            tag: i,
                            file: file.clone(),
                            offset: i * CHUNK_BYTES,
                            len: CHUNK_BYTES,
                            resume: false,
                        })
                    }),
                );
                assert_eq!(fs::metadata(dst.join("big")).unwrap().len(), LARGE_FILE_BYTES as u64);
                fs::remove_dir_all(&dst).unwrap();
            })
        });
    }
    group.finish();
    let _ = fs::remove_dir_all(&root);
}

criterion_group!(benches, bench);
criterion_main!(benches);
