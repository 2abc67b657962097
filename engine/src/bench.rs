//! Benchmark jobs: an I/O or metadata workload that one shard runs on its own ring (or thread), measured per op.
//!
//! `fastsync bench` measures storage with the very engine that copies. It starts a session whose shards are sized
//! for the workload (one buffer slot per I/O in flight: `--bs` × `--iodepth`) and submits one [`BenchJob`] per shard.
//! Every job waits at a shared barrier, so all shards start together, then keeps its queue full until its work or
//! its time is done, and reports a [`BenchReport`]: op counts, bytes and an HDR latency histogram per direction.
//!
//! # Contract (both engines)
//! - A bench job runs alone on its shard: a session that runs bench jobs runs nothing else, and a shard running
//!   one has no other job admitted (a bench job that finds other work admitted fails with [`Op::Bench`]).
//! - An I/O job only reads and writes `[offset, offset + len)` of the file at `path`, which must exist and be at
//!   least that long; it never creates, truncates or removes it. O_DIRECT I/O uses the shard's aligned buffers.
//! - A metadata job only creates, stats, reads and removes the files `dir/<prefix><n>` for `n` in its range.
//! - Latency is measured per op from its submission to its completion, in nanoseconds; a metadata op is the whole
//!   sequence for one file (open, write or read, close for create and read).
//! - Without a time limit an I/O job issues exactly `bytes_total / block_bytes` ops (rounded up), so the bytes of
//!   the report are the bytes asked for; with one, it stops issuing when the time is up or [`BenchJob::stop`] is set.
//! - Errors end the job: the first failure is returned with the operation and the path, after in-flight ops drained.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::{JobError, Op};

/// An I/O workload on one file region.
#[derive(Clone, Debug)]
pub struct IoSpec {
    pub path: PathBuf,
    /// Open with O_DIRECT (offsets, lengths and buffers aligned).
    pub direct: bool,
    /// Percentage of ops that read (100: read only, 0: write only).
    pub read_pct: u8,
    /// Random offsets (block-aligned, uniform over the region) instead of one sequential cursor.
    pub random: bool,
    /// Bytes of one op.
    pub block_bytes: u64,
    /// Ops kept in flight (at most the shard's buffer slots; the fallback engine does one at a time).
    pub iodepth: usize,
    /// The region of the file the job works on.
    pub offset: u64,
    pub len: u64,
    /// Bytes to transfer without a time limit (a sequential job wraps around the region when it is larger).
    pub bytes_total: u64,
    /// Run for this long, wrapping around the region, instead of `bytes_total`.
    pub time_max: Option<Duration>,
    /// `fsync` after every this many writes (0: never), like fio's `fsync=N`.
    pub fsync_every: u32,
    /// `fsync` once at the end, inside the measured time, like fio's `end_fsync=1`.
    pub end_fsync: bool,
    /// Seed of the offset and read/write choices (reproducible runs).
    pub seed: u64,
}

/// The phases of the metadata workload, run one after the other over the same files, like mdtest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaPhase {
    /// Create exclusively, write `file_bytes`, close.
    Create,
    /// `statx` without following symlinks.
    Stat,
    /// Open, read `file_bytes`, close.
    Read,
    /// Unlink.
    Delete,
}

impl MetaPhase {
    pub const ALL: [MetaPhase; 4] = [MetaPhase::Create, MetaPhase::Stat, MetaPhase::Read, MetaPhase::Delete];

    pub fn name(self) -> &'static str {
        match self {
            MetaPhase::Create => "create",
            MetaPhase::Stat => "stat",
            MetaPhase::Read => "read",
            MetaPhase::Delete => "delete",
        }
    }
}

/// A metadata workload on the files `dir/<prefix><first>` .. `dir/<prefix><first + count - 1>`.
#[derive(Clone, Debug)]
pub struct MetaSpec {
    pub dir: PathBuf,
    pub prefix: String,
    pub first: u64,
    pub count: u64,
    pub phase: MetaPhase,
    /// Bytes written by create and read back by read (at most the shard's block size).
    pub file_bytes: u64,
    /// Files in flight at once.
    pub iodepth: usize,
}

impl MetaSpec {
    /// Name of file `n` of this job inside `dir`, as a C string (the prefix has no NUL: checked by the caller).
    pub fn name(&self, n: u64) -> CString {
        CString::new(format!("{}{}", self.prefix, n)).unwrap_or_default()
    }

    /// Path of file `n`, for error messages.
    pub fn path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{}{}", self.prefix, n))
    }
}

/// What a bench job does.
#[derive(Clone, Debug)]
pub enum BenchWork {
    Io(IoSpec),
    Meta(MetaSpec),
}

/// Live counters of one job, read by the caller while it runs (a progress line); one per job, so never contended.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Live {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
}

/// Run one workload on one shard.
#[derive(Debug)]
pub struct BenchJob {
    pub tag: u64,
    pub work: BenchWork,
    /// Every job of the run waits here before its clock starts.
    pub start: Arc<Barrier>,
    /// Set by the caller to stop issuing new ops (interrupt); in-flight ops drain.
    pub stop: Arc<AtomicBool>,
    pub live: Arc<Live>,
    /// Whether this job has passed `start` (each job must reach the barrier exactly once, even when it fails
    /// before its clock would start, or the others would wait forever).
    pub passed_start: AtomicBool,
}

impl BenchJob {
    /// Wait at the start barrier (once) and return when the clock starts.
    pub fn wait_start(&self) -> Instant {
        if !self.passed_start.swap(true, Ordering::AcqRel) {
            self.start.wait();
        }
        Instant::now()
    }

    /// Run `body` (which calls [`BenchJob::wait_start`] when set up), then make sure the barrier was passed even
    /// if `body` failed before it.
    pub fn run_guarded(&self, body: impl FnOnce() -> Result<BenchReport, JobError>) -> Result<BenchReport, JobError> {
        let result = body();
        self.wait_start();
        result
    }

    /// The path errors of this job are reported against.
    pub fn path(&self) -> &Path {
        match &self.work {
            BenchWork::Io(io) => &io.path,
            BenchWork::Meta(m) => &m.dir,
        }
    }
}

/// Counts and latencies of one kind of op.
#[derive(Clone, Debug)]
pub struct OpStats {
    pub ops: u64,
    pub bytes: u64,
    /// Nanoseconds from submission to completion, per op.
    pub latency_ns: Histogram<u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats { ops: 0, bytes: 0, latency_ns: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("bounds") }
    }
}

impl OpStats {
    /// Count one op of `bytes` that took `latency`.
    pub fn record(&mut self, bytes: u64, latency: Duration) {
        self.ops += 1;
        self.bytes += bytes;
        self.latency_ns.saturating_record(latency.as_nanos().clamp(1, u64::MAX as u128) as u64);
    }

    /// Add another job's numbers to these.
    pub fn merge(&mut self, other: &OpStats) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency_ns.add(&other.latency_ns);
    }
}

/// What one bench job measured.
#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    pub read: OpStats,
    pub write: OpStats,
    pub fsync: OpStats,
    /// Metadata ops (one per file).
    pub meta: OpStats,
    /// From the barrier to the last completion.
    pub elapsed: Duration,
}

impl BenchReport {
    pub fn merge(&mut self, other: &BenchReport) {
        self.read.merge(&other.read);
        self.write.merge(&other.write);
        self.fsync.merge(&other.fsync);
        self.meta.merge(&other.meta);
        self.elapsed = self.elapsed.max(other.elapsed);
    }
}

/// A small, fast generator of offsets and read/write choices (xorshift64*): statistically plenty for spreading
/// I/O, reproducible from a seed, and one multiply per draw.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // A zero state would stay zero; mix the seed so neighbouring seeds diverge at once.
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fill `buf` with the next bytes of the sequence.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The next op of an I/O job: where, and whether it reads. Shared by both engines so that they run the very same
/// sequence of ops for the same seed.
#[derive(Debug)]
pub struct IoPlan {
    rng: Rng,
    blocks: u64,
    cursor: u64,
    offset: u64,
    block_bytes: u64,
    read_pct: u8,
    random: bool,
    /// Ops left to issue without a time limit (`u64::MAX` with one).
    ops_left: u64,
    deadline: Option<Instant>,
    writes_since_fsync: u32,
    fsync_every: u32,
}

/// One op an I/O job issues next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read {
        offset: u64,
    },
    Write {
        offset: u64,
    },
    /// Sync the file before any further op (after `fsync_every` writes).
    Fsync,
}

impl IoPlan {
    /// Plan the job. `started` is when the clock started (after the barrier).
    pub fn new(spec: &IoSpec, started: Instant) -> Result<IoPlan, JobError> {
        let blocks = spec.len / spec.block_bytes.max(1);
        if spec.block_bytes == 0 || blocks == 0 {
            return Err(JobError::new(
                Op::Bench,
                &spec.path,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "the region is smaller than one block"),
            ));
        }
        let ops_left = match spec.time_max {
            Some(_) => u64::MAX,
            None => spec.bytes_total.div_ceil(spec.block_bytes),
        };
        Ok(IoPlan {
            rng: Rng::new(spec.seed),
            blocks,
            cursor: 0,
            offset: spec.offset,
            block_bytes: spec.block_bytes,
            read_pct: spec.read_pct,
            random: spec.random,
            ops_left,
            deadline: spec.time_max.map(|t| started + t),
            writes_since_fsync: 0,
            fsync_every: spec.fsync_every,
        })
    }

    /// The next op, or `None` when the job has issued all it should (its count, its time, or a stop request).
    pub fn next(&mut self, stop: &AtomicBool, now: Instant) -> Option<IoOp> {
        if self.fsync_every > 0 && self.writes_since_fsync >= self.fsync_every {
            self.writes_since_fsync = 0;
            return Some(IoOp::Fsync);
        }
        if self.ops_left == 0 || stop.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| now >= d) {
            return None;
        }
        self.ops_left -= 1;
        let block = if self.random {
            self.rng.below(self.blocks)
        } else {
            let b = self.cursor;
            self.cursor = (self.cursor + 1) % self.blocks;
            b
        };
        let offset = self.offset + block * self.block_bytes;
        let read = match self.read_pct {
            100 => true,
            0 => false,
            pct => self.rng.below(100) < pct as u64,
        };
        if read {
            Some(IoOp::Read { offset })
        } else {
            self.writes_since_fsync += 1;
            Some(IoOp::Write { offset })
        }
    }
}

/// Fill a write buffer with incompressible bytes (as fio does), so that compressing or deduplicating storage is
/// measured on data that does not flatter it.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    Rng::new(seed).fill(buf);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(read_pct: u8, random: bool) -> IoSpec {
        IoSpec {
            path: "/x".into(),
            direct: false,
            read_pct,
            random,
            block_bytes: 4096,
            iodepth: 4,
            offset: 8192,
            len: 10 * 4096,
            bytes_total: 25 * 4096,
            time_max: None,
            fsync_every: 0,
            end_fsync: false,
            seed: 7,
        }
    }

    #[test]
    fn sequential_plan_wraps_and_counts() {
        let stop = AtomicBool::new(false);
        let now = Instant::now();
        let mut p = IoPlan::new(&spec(100, false), now).unwrap();
        let ops: Vec<_> = std::iter::from_fn(|| p.next(&stop, now)).collect();
        assert_eq!(ops.len(), 25);
        assert_eq!(ops[0], IoOp::Read { offset: 8192 });
        assert_eq!(ops[9], IoOp::Read { offset: 8192 + 9 * 4096 });
        assert_eq!(ops[10], IoOp::Read { offset: 8192 });
    }

    #[test]
    fn random_plan_stays_in_region_and_mixes() {
        let stop = AtomicBool::new(false);
        let now = Instant::now();
        let mut s = spec(70, true);
        s.bytes_total = 10_000 * 4096;
        s.fsync_every = 100;
        let mut p = IoPlan::new(&s, now).unwrap();
        let (mut reads, mut writes, mut syncs) = (0, 0, 0);
        while let Some(op) = p.next(&stop, now) {
            match op {
                IoOp::Read { offset } | IoOp::Write { offset } => {
                    assert!((8192..8192 + 10 * 4096).contains(&offset));
                    assert_eq!(offset % 4096, 0);
                    if matches!(op, IoOp::Read { .. }) { reads += 1 } else { writes += 1 }
                }
                IoOp::Fsync => syncs += 1,
            }
        }
        assert_eq!(reads + writes, 10_000);
        assert!((6500..7500).contains(&reads), "{reads} reads of 10000 at 70%");
        assert_eq!(syncs, writes / 100);
    }

    #[test]
    fn stop_and_deadline_end_the_plan() {
        let stop = AtomicBool::new(true);
        let now = Instant::now();
        let mut p = IoPlan::new(&spec(0, false), now).unwrap();
        assert_eq!(p.next(&stop, now), None);
        let mut s = spec(0, false);
        s.time_max = Some(Duration::from_millis(5));
        let mut p = IoPlan::new(&s, now).unwrap();
        let go = AtomicBool::new(false);
        assert!(p.next(&go, now).is_some());
        assert_eq!(p.next(&go, now + Duration::from_millis(5)), None);
    }

    #[test]
    fn histograms_merge() {
        let mut a = OpStats::default();
        a.record(4096, Duration::from_micros(10));
        let mut b = OpStats::default();
        b.record(4096, Duration::from_micros(1000));
        a.merge(&b);
        assert_eq!((a.ops, a.bytes), (2, 8192));
        assert!(a.latency_ns.value_at_quantile(0.99) >= 999_000);
    }
}
