//! Command-line flags (raw, as clap parses them) and their translation into validated options.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use fastsync_engine::{EngineConfig, EngineKind};

use crate::copy::CopyOptions;
use crate::engines::{self, EngineChoice};
use crate::error::exit;
use crate::meta::Preserve;
use crate::{Error, copy};

/// Bytes of one I/O block (one buffer slot).
const BLOCK_BYTES: usize = 1 << 20;
/// Buffer slots per io_uring shard: jobs (and I/Os) in flight per core.
const URING_SLOTS_PER_SHARD: usize = 32;
/// The fallback engine blocks in syscalls, so it runs more threads than cores to keep the device busy.
const FALLBACK_THREADS_PER_CORE: usize = 2;

#[derive(Parser, Debug)]
#[command(
    name = "fastsync",
    version,
    about = "Copy files and trees as fast as the hardware allows, without ever losing a byte",
    long_about = "fastsync copies files and directory trees with one io_uring per core (or a portable thread pool \
                  where io_uring is unavailable). Files appear under their final names only when complete.",
    after_help = "Exit status: 0 all copied; 1 some entries failed (each is listed) or the run could not start; \
                  2 usage error or refused request."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub global: GlobalArgs,
}

#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// Engine: io_uring when available (auto), io_uring or fail (uring), or the portable thread pool (fallback)
    #[arg(long, global = true, value_enum, default_value = "auto", env = "FASTSYNC_ENGINE")]
    pub engine: EngineChoice,
    /// Cores (shards) to use [default: all available]
    #[arg(long, global = true, env = "FASTSYNC_CORES", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub cores: Option<u16>,
    /// Explain choices (engine, fallbacks, limits) on stderr
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress bar and no warnings; errors are still printed
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print a summary when done
    #[arg(long, global = true)]
    pub stats: bool,
    /// Print the summary as one JSON object on stdout
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Copy a file or a directory tree
    #[command(
        long_about = "Copy SRC to DST.\n\nWhen SRC is a directory, DST (created if absent) receives its contents. \
                      When SRC is a file, DST is its new path, unless DST is an existing directory or ends in '/', \
                      where the file keeps its name inside it.\n\nPermissions, owner (where permitted), nanosecond \
                      times of files and directories, symlinks (as symlinks), sparse files, empty files and \
                      directories are always preserved. FIFOs, sockets and devices are skipped with a warning."
    )]
    Copy(CopyArgs),
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// Source file or directory
    pub src: PathBuf,
    /// Destination (see the rule above)
    pub dst: PathBuf,
    /// Follow symlinks in SRC (copy what they point to)
    #[arg(short = 'L', long)]
    pub dereference: bool,
    /// Preserve hard links between files in SRC
    #[arg(short = 'H', long)]
    pub hard_links: bool,
    /// Copy extended attributes
    #[arg(short = 'X', long)]
    pub xattrs: bool,
    /// Make every file durable (data, rename, directory) before counting it
    #[arg(long)]
    pub fsync: bool,
    /// Read every destination block back and compare its BLAKE3 digest with the source's
    #[arg(long)]
    pub verify: bool,
    /// Copy files of 64 MiB and more with O_DIRECT (uring engine): no page-cache copies, far less CPU
    #[arg(long)]
    pub direct_io: bool,
}

/// Parse, run, print; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
            let _ = e.print();
            return code;
        }
    };
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fastsync: {e}");
            e.exit_code()
        }
    }
}

fn run(cli: &Cli) -> Result<i32, Error> {
    let g = &cli.global;
    let Command::Copy(args) = &cli.command;
    let selected = engines::select(g.engine)?;
    if g.verbose > 0 {
        for note in &selected.notes {
            eprintln!("fastsync: {note}");
        }
    }
    let cores = g.cores.map(usize::from).unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = engine_config(selected.engine.kind(), cores);
    if g.verbose > 0 {
        eprintln!(
            "fastsync: {} cores, {} shards x {} slots of {} KiB ({} MiB of buffers)",
            cores,
            config.shards,
            config.slots_per_shard,
            config.block_bytes >> 10,
            config.buffer_bytes() >> 20
        );
    }
    let opts = CopyOptions {
        dereference: args.dereference,
        hard_links: args.hard_links,
        preserve: Preserve { xattrs: args.xattrs },
        fsync: args.fsync,
        verify: args.verify,
        direct_io: args.direct_io,
        quiet: g.quiet,
        progress: !g.json,
    };
    let mut summary = copy::copy(&args.src, &args.dst, &opts, selected.engine.as_ref(), &config)?;
    summary.cores = cores;
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) must not turn a good copy into a failure.
    if g.json {
        let _ = writeln!(out, "{}", summary.to_json());
    } else if g.stats {
        let _ = summary.write_human(&mut out);
    }
    if summary.errors > 0 {
        eprintln!("fastsync: {} error(s); some entries were not copied (listed above)", summary.errors);
        return Ok(exit::PARTIAL);
    }
    Ok(exit::OK)
}

/// Sizing for `cores` cores on the given engine.
fn engine_config(kind: EngineKind, cores: usize) -> EngineConfig {
    let (shards, slots) = match kind {
        EngineKind::Uring => (cores, URING_SLOTS_PER_SHARD),
        EngineKind::Fallback => (cores * FALLBACK_THREADS_PER_CORE, 1),
    };
    EngineConfig {
        shards,
        pin: kind == EngineKind::Uring,
        block_bytes: BLOCK_BYTES,
        slots_per_shard: slots,
        jobs_in_flight_max: shards * slots.max(8) * 2,
        buffered_writes_nonblocking: false,
    }
}
