//! The run summary: counted while copying, printed for humans with `--stats` or as one JSON object with `--json`.

use std::io::Write;

use serde::Serialize;

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub command: &'static str,
    pub engine: &'static str,
    pub cores: usize,
    /// fastsync:// transfers: the most data streams (TCP connections) that ran at once.
    pub streams: usize,
    /// Nothing was changed: the counts say what would have been done.
    pub dry_run: bool,
    /// Files copied (or, in a dry run, that would be).
    pub files: u64,
    /// Files (and symlinks) already up to date in the destination (`sync`).
    pub unchanged: u64,
    /// Up-to-date files whose permissions, owner or times were fixed (`sync`).
    pub attrs_updated: u64,
    /// Destination entries deleted (`sync --delete`), or that would be.
    pub deleted: u64,
    /// Why `--delete` deleted nothing, when it did not run.
    pub deletions_skipped: Option<String>,
    /// Entries excluded by the filters.
    pub excluded: u64,
    /// Files copied again because they changed while being copied.
    pub retried: u64,
    /// Temporaries of interrupted runs removed.
    pub stale_removed: u64,
    /// The signal (2: SIGINT, 15: SIGTERM) that interrupted the run.
    pub interrupted: Option<i32>,
    /// Directories walked: created, or already there (their metadata set or checked).
    pub directories: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Special files (FIFOs, sockets, devices) skipped.
    pub skipped: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub errors: u64,
    /// Data syscalls the engine made: `io_uring_enter` calls (uring) or blocking reads/writes/copies (fallback).
    pub engine_syscalls: u64,
    /// Jobs an idle shard took from a busy one.
    pub engine_steals: u64,
    /// The first failures, one line each (all of them were printed on stderr).
    pub failures: Vec<String>,
}

impl Summary {
    pub fn new(command: &'static str, engine: &'static str, cores: usize) -> Self {
        Summary { command, engine, cores, ..Default::default() }
    }

    /// Throughput in decimal GB/s (what storage vendors and `fio` report).
    pub fn gb_per_s(&self) -> f64 {
        if self.seconds > 0.0 { self.bytes as f64 / self.seconds / 1e9 } else { 0.0 }
    }

    /// One JSON object on one line, with the rates and the process's resources so far.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct WithRate<'a> {
            #[serde(flatten)]
            s: &'a Summary,
            gb_per_s: f64,
            files_per_s: f64,
            cpu_user_seconds: f64,
            cpu_system_seconds: f64,
            peak_rss_bytes: u64,
        }
        let files_per_s = if self.seconds > 0.0 { self.files as f64 / self.seconds } else { 0.0 };
        let r = Resources::now();
        let (cpu_user_seconds, cpu_system_seconds, peak_rss_bytes) =
            (r.user_seconds, r.system_seconds, r.peak_rss_bytes);
        let with = WithRate {
            s: self,
            gb_per_s: self.gb_per_s(),
            files_per_s,
            cpu_user_seconds,
            cpu_system_seconds,
            peak_rss_bytes,
        };
        serde_json::to_string(&with).expect("summary serializes")
    }

    /// One line saying what a `sync` did (printed on stderr unless `-q`): a no-op sync says that nothing was
    /// transferred.
    pub fn sync_line(&self) -> String {
        let verb = if self.dry_run { "would copy" } else { "copied" };
        let mut line = format!(
            "{verb} {} file(s) ({}), {} unchanged, {} {}",
            self.files,
            human_bytes(self.bytes),
            self.unchanged,
            self.deleted,
            if self.dry_run { "to delete" } else { "deleted" }
        );
        if self.files == 0 && self.deleted == 0 && self.attrs_updated == 0 && self.errors == 0 && self.symlinks == 0 {
            line.push_str(": destination already up to date, 0 bytes transferred");
        }
        line
    }

    /// The human summary, like rsync's `--stats`.
    pub fn write_human(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.dry_run {
            writeln!(out, "dry run: nothing was changed")?;
        }
        writeln!(
            out,
            "files: {}  directories: {}  symlinks: {}  hardlinks: {}  skipped: {}  errors: {}",
            self.files, self.directories, self.symlinks, self.hardlinks, self.skipped, self.errors
        )?;
        if self.command == "sync" {
            writeln!(
                out,
                "unchanged: {}  attributes fixed: {}  deleted: {}  excluded: {}  retried: {}",
                self.unchanged, self.attrs_updated, self.deleted, self.excluded, self.retried
            )?;
        }
        if let Some(why) = &self.deletions_skipped {
            writeln!(out, "deletions skipped: {why}")?;
        }
        writeln!(
            out,
            "bytes: {} ({})  in {:.3} s  = {:.3} GB/s",
            self.bytes,
            human_bytes(self.bytes),
            self.seconds,
            self.gb_per_s()
        )?;
        if self.streams > 0 {
            writeln!(out, "engine: {}  streams: {} (the most at once)", self.engine, self.streams)?;
        } else {
            writeln!(
                out,
                "engine: {}  cores: {}  engine syscalls: {}  steals: {}",
                self.engine, self.cores, self.engine_syscalls, self.engine_steals
            )?;
        }
        let r = Resources::now();
        writeln!(
            out,
            "cpu: {:.2} s user, {:.2} s system  peak memory: {}",
            r.user_seconds,
            r.system_seconds,
            human_bytes(r.peak_rss_bytes)
        )
    }
}

/// What the process has used so far: CPU time of every thread (user, system) and its peak resident memory.
pub struct Resources {
    pub user_seconds: f64,
    pub system_seconds: f64,
    pub peak_rss_bytes: u64,
}

impl Resources {
    pub fn now() -> Resources {
        // SAFETY: a zeroed rusage is a valid out-parameter.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer; RUSAGE_SELF cannot fail.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Resources {
            user_seconds: secs(ru.ru_utime),
            system_seconds: secs(ru.ru_stime),
            peak_rss_bytes: peak_rss_bytes().unwrap_or(ru.ru_maxrss.max(0) as u64 * 1024),
        }
    }
}

/// `VmHWM` of /proc/self/status: the peak of this program's own memory. (`ru_maxrss` can be higher: a process
/// started with vfork, as `posix_spawn` does, inherits its parent's peak at `exec`.)
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some(kib * 1024)
}

/// Binary-prefixed size, as `ls -h` prints it.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(4 << 30), "4.0 GiB");
    }

    #[test]
    fn json_has_rates_and_counts() {
        let mut s = Summary::new("copy", "uring", 2);
        s.bytes = 2_000_000_000;
        s.seconds = 2.0;
        s.files = 4;
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["engine"], "uring");
        assert_eq!(v["files"], 4);
        assert_eq!(v["gb_per_s"], 1.0);
        assert_eq!(v["files_per_s"], 2.0);
        let rss = v["peak_rss_bytes"].as_u64().unwrap();
        assert!(rss > 100 << 10 && rss < 1 << 40, "{rss}");
        assert!(v["cpu_user_seconds"].as_f64().unwrap() + v["cpu_system_seconds"].as_f64().unwrap() > 0.0);
    }
}
