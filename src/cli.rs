//! Command-line flags (raw, as clap parses them) and their translation into validated options.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fastsync_engine::{EngineConfig, EngineKind, Show};

use crate::config::{MemoryProfile, Overrides, Settings};
use crate::copy::CopyOptions;
use crate::engines::{self, EngineChoice};
use crate::error::exit;
use crate::filter::Filter;
use crate::meta::Preserve;
use crate::sync::{Compare, SyncOptions};
use crate::{Error, copy, interrupt};

/// Bytes of one I/O block (one buffer slot).
const BLOCK_BYTES: usize = 1 << 20;
/// The fallback engine blocks in syscalls, so it runs more threads than cores to keep the device busy.
const FALLBACK_THREADS_PER_CORE: usize = 2;
/// Share of the memory limit that I/O buffers may take; the rest is for the walk, queues, and the allocator.
const BUFFER_SHARE_DIVISOR: u64 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "fastsync",
    version,
    about = "Copy and sync files and trees as fast as the hardware allows, without ever losing a byte",
    long_about = "fastsync copies and syncs files and directory trees with one io_uring per core (or a portable \
                  thread pool where io_uring is unavailable). Files appear under their final names only when \
                  complete; an interrupted run resumes where it stopped.",
    after_help = "Exit status: 0 all done; 1 some entries failed (each is listed) or the run could not start; \
                  2 usage error or refused request; 130/143 interrupted by SIGINT/SIGTERM (rerun to resume).\n\
                  Settings come from the config file, then FASTSYNC_* variables, then flags (see `fastsync config`)."
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
    /// [config: engine; env: FASTSYNC_ENGINE; default: auto]
    #[arg(long, global = true, value_enum)]
    pub engine: Option<EngineChoice>,
    /// Cores (shards) to use [config: cores; env: FASTSYNC_CORES; default: all available]
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub cores: Option<u16>,
    /// Memory profile: bounds buffers and queues [config: memory_profile; env: FASTSYNC_MEMORY_PROFILE]
    #[arg(long, global = true, value_enum)]
    pub memory_profile: Option<MemoryProfile>,
    /// Memory limit, e.g. 512M or 2G (binary units); overrides the profile's [env: FASTSYNC_MEMORY_LIMIT]
    #[arg(long, global = true, value_parser = crate::config::parse_size)]
    pub memory_limit: Option<u64>,
    /// Read settings from this TOML file instead of $XDG_CONFIG_HOME/fastsync/config.toml [env: FASTSYNC_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Explain choices (engine, fallbacks, limits) on stderr
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress bar and no warnings; errors are still printed
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print a summary when done
    #[arg(long, global = true)]
    pub stats: bool,
    /// Print the summary (and itemized changes) as JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// Shared secret for fastsync:// transfers (client and `serve`): read from FILE, trailing newlines ignored
    /// [env: FASTSYNC_TOKEN holds the token itself]
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// fastsync:// transfers: encrypt and authenticate everything after the handshake (ChaCha20-Poly1305 with keys
    /// derived from the token); for networks you do not trust
    #[arg(long, global = true)]
    pub encrypt: bool,
    /// fastsync:// transfers: compress with zstd at LEVEL (1-19, default 3) what is worth it; for slow links
    #[arg(
        long,
        global = true,
        value_name = "LEVEL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "3",
        value_parser = clap::value_parser!(u8).range(1..=19)
    )]
    pub compress: Option<u8>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Copy a file or a directory tree
    #[command(
        long_about = "Copy SRC to DST, every file, whether or not the destination already has it (like cp -a).\n\n\
                      When SRC is a directory, DST (created if absent) receives its contents. When SRC is a file, \
                      DST is its new path, unless DST is an existing directory or ends in '/', where the file \
                      keeps its name inside it.\n\nPermissions, owner (where permitted), nanosecond times of files \
                      and directories, symlinks (as symlinks), sparse files, empty files and directories are always \
                      preserved. FIFOs, sockets and devices are skipped with a warning."
    )]
    Copy(CopyArgs),
    /// Make DST match SRC, transferring only what differs
    #[command(
        long_about = "Make DST match SRC (same rule for SRC and DST as copy), transferring only files that differ: \
                      by size and modification time (default), by BLAKE3 digest (--checksum) or by size \
                      (--size-only). With --delete, destination entries absent from the source are removed, but \
                      only after every transfer succeeded. Filters (--exclude, --include, --filter-from) follow \
                      rsync's rules: the first matching rule decides; excluded entries are neither copied nor \
                      deleted."
    )]
    Sync(SyncArgs),
    /// Show the effective configuration and where each value came from
    Config,
    /// List a directory's entries (or a file) like ls -l: type and permissions, size, mtime (UTC), path
    #[command(long_about = crate::list::LONG_ABOUT)]
    List(crate::list::ListArgs),
    /// Serve a directory to fastsync:// clients (copy, sync and list from or to it over TCP)
    #[command(long_about = crate::net::server::LONG_ABOUT)]
    Serve(crate::net::server::ServeArgs),
    /// Benchmark storage like fio (sequential/random I/O) or mdtest (metadata), on the engine that copies
    #[command(long_about = crate::bench::LONG_ABOUT)]
    Bench(crate::bench::BenchArgs),
}

#[derive(Args, Debug)]
pub struct TransferArgs {
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
    /// Make every file durable (data, rename, directory) before counting it [config: fsync]
    #[arg(long)]
    pub fsync: bool,
    /// Read every destination block back and compare its BLAKE3 digest with the source's [config: verify]
    #[arg(long)]
    pub verify: bool,
    /// Copy files of 64 MiB and more with O_DIRECT (uring engine; the default): no page-cache copies, far less
    /// CPU [config: direct_io]
    #[arg(long, overrides_with = "no_direct_io")]
    pub direct_io: bool,
    /// Copy every file through the page cache (as cp and rsync do) [config: direct_io = false]
    #[arg(long, overrides_with = "direct_io")]
    pub no_direct_io: bool,
    /// Exclude entries matching GLOB (rsync rules; repeatable; order matters with --include)
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Include entries matching GLOB even if a later rule excludes them (repeatable)
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Read rules from FILE: one per line, '+ GLOB' or '- GLOB' ('#' comments)
    #[arg(long, value_name = "FILE")]
    pub filter_from: Vec<PathBuf>,
    /// Change nothing: print what would be copied, updated and deleted
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Print one line per change: copy, update, mkdir, attrs, delete, and the path
    #[arg(short = 'i', long)]
    pub itemize_changes: bool,
    /// fastsync:// transfers: N TCP connections carrying file data in parallel (plus one for listings and
    /// directories). Default: 4 to start with, then as many as the measured bandwidth-delay product needs (up to
    /// 32; -v shows each change)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub streams: Option<u16>,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    #[command(flatten)]
    pub t: TransferArgs,
}

#[derive(Args, Debug)]
pub struct SyncArgs {
    #[command(flatten)]
    pub t: TransferArgs,
    /// Compare files by BLAKE3 digest (computed on every core) instead of size and modification time
    #[arg(short = 'c', long, conflicts_with = "size_only")]
    pub checksum: bool,
    /// Compare files by size only
    #[arg(long)]
    pub size_only: bool,
    /// Skip files that already exist in the destination
    #[arg(long)]
    pub ignore_existing: bool,
    /// Skip files whose destination is newer than the source
    #[arg(short = 'u', long)]
    pub update: bool,
    /// Delete destination entries absent from the source (only after every transfer succeeded)
    #[arg(long)]
    pub delete: bool,
    /// With --delete: delete nothing, and fail, if more than N entries would be deleted
    #[arg(long, value_name = "N", requires = "delete")]
    pub max_delete: Option<u64>,
}

/// Parse, run, print; returns the exit code.
pub fn main() -> i32 {
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return clap_exit(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return clap_exit(e),
    };
    let sub = matches.subcommand().map(|(_, m)| m);
    match run(&cli, sub) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fastsync: {e}");
            e.exit_code()
        }
    }
}

fn clap_exit(e: clap::Error) -> i32 {
    let code = if e.use_stderr() { exit::USAGE } else { exit::OK };
    let _ = e.print();
    code
}

fn run(cli: &Cli, sub: Option<&ArgMatches>) -> Result<i32, Error> {
    let g = &cli.global;
    // `serve` needs of the settings the memory limit, and the engine for its socket shards.
    if let Command::Serve(a) = &cli.command {
        if g.encrypt || g.compress.is_some() {
            return Err(Error::Refused(
                "--encrypt and --compress are client options; serve takes --require-encrypt and --no-compress".into(),
            ));
        }
        let overrides =
            Overrides { memory_profile: g.memory_profile, memory_limit: g.memory_limit, ..Overrides::default() };
        let settings = Settings::load(g.config.as_deref(), &|k| std::env::var_os(k), &overrides)
            .map_err(|e| Error::Refused(e.to_string()))?;
        let limit = settings.memory_limit_bytes();
        let shard_buffer_bytes = serve_shards(&settings, g.verbose);
        return crate::net::server::run(
            a,
            g.token_file.as_deref(),
            limit,
            shard_buffer_bytes,
            settings.direct_io.value,
        );
    }
    let wishes = crate::net::auth::Wishes { encrypt: g.encrypt, compress: g.compress };
    let transfer = match &cli.command {
        Command::Copy(a) => Some(&a.t),
        Command::Sync(a) => Some(&a.t),
        Command::Config | Command::List(_) | Command::Bench(_) => None,
        Command::Serve(_) => None,
    };
    let overrides = Overrides {
        engine: g.engine,
        cores: g.cores,
        memory_profile: g.memory_profile,
        memory_limit: g.memory_limit,
        fsync: transfer.is_some_and(|t| t.fsync),
        verify: transfer.is_some_and(|t| t.verify),
        direct_io: transfer.and_then(|t| match (t.direct_io, t.no_direct_io) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }),
    };
    let settings = Settings::load(g.config.as_deref(), &|k| std::env::var_os(k), &overrides)
        .map_err(|e| Error::Refused(e.to_string()))?;
    if let Command::Config = cli.command {
        let mut out = std::io::stdout().lock();
        let _ = if g.json {
            writeln!(out, "{}", settings.to_json())
        } else {
            let file = match (&settings.file, crate::config::default_file(&|k| std::env::var_os(k))) {
                (Some(f), _) => format!("# config file: {}", f.shown()),
                (None, Some(d)) => format!("# no config file ({} does not exist)", d.shown()),
                (None, None) => "# no config file".to_string(),
            };
            let table = settings.render();
            writeln!(out, "{file}").and_then(|()| writeln!(out, "{}", table.trim_end()))
        };
        return Ok(exit::OK);
    }
    if let Command::List(a) = &cli.command {
        refuse_foreign_scheme(&a.path)?;
        if crate::net::url::is_url(&a.path) {
            // A fastsync:// listing (src/remote/listing.rs).
            let net =
                crate::remote::NetOptions { wishes, ..crate::remote::NetOptions::new(1, g.token_file.as_deref()) };
            return crate::remote::list(a, g.json, &net).or_else(crate::remote::Failure::into_exit);
        }
        let (selected, _, config) = select_engine(&settings, g.verbose)?;
        return crate::list::run(a, selected.engine.as_ref(), &config, g.json);
    }
    if let Command::Bench(a) = &cli.command {
        let (selected, cores, _) = select_engine(&settings, g.verbose)?;
        let threads = a.threads.map_or(cores, usize::from);
        return crate::bench::run(a, selected.engine.as_ref(), threads, settings.memory_limit_bytes(), g.json, g.quiet);
    }
    let t = transfer.expect("a transfer command");
    refuse_foreign_scheme(&t.src)?;
    refuse_foreign_scheme(&t.dst)?;
    let filter = filter_rules(sub.expect("subcommand matches"))?;
    let (selected, cores, config) = select_engine(&settings, g.verbose)?;
    let sync = match &cli.command {
        Command::Sync(s) => Some(SyncOptions {
            compare: if s.checksum {
                Compare::Checksum
            } else if s.size_only {
                Compare::SizeOnly
            } else {
                Compare::SizeAndTime
            },
            ignore_existing: s.ignore_existing,
            update: s.update,
            delete: s.delete,
            max_delete: s.max_delete,
        }),
        _ => None,
    };
    let is_sync = sync.is_some();
    let opts = CopyOptions {
        dereference: t.dereference,
        hard_links: t.hard_links,
        preserve: Preserve { xattrs: t.xattrs },
        fsync: settings.fsync.value,
        verify: settings.verify.value,
        direct_io: settings.direct_io.value,
        quiet: g.quiet,
        progress: !g.json && !t.dry_run && !t.itemize_changes,
        filter,
        sync,
        dry_run: t.dry_run,
        itemize: t.itemize_changes,
        json: g.json,
    };
    interrupt::install();
    let mut summary = if crate::remote::involved(&t.src, &t.dst) {
        // A fastsync:// side: a LAN transfer (src/remote/).
        let streams = t.streams.map_or(crate::net::streams::STREAMS_MIN, usize::from);
        let net = crate::remote::NetOptions {
            wishes,
            adaptive: t.streams.is_none(),
            verbose: g.verbose > 0,
            // Each connection holds up to ~12 MiB of buffers: the memory limit bounds how far the pool may grow.
            streams_max: (settings.memory_limit_bytes() / crate::net::server::CONNECTION_BYTES_MAX)
                .clamp(streams as u64, crate::net::streams::STREAMS_MAX as u64) as usize,
            ..crate::remote::NetOptions::new(streams, g.token_file.as_deref())
        };
        let mode = crate::net::zerocopy::mode();
        if mode.on_shards() && wishes == crate::net::auth::Wishes::default() {
            // Plain connections move large files' chunks on the engine's shards (src/net/shards.rs).
            let config = crate::net::shards::config(
                selected.engine.kind(),
                cores,
                net.streams_max,
                settings.memory_limit_bytes(),
            );
            let zerocopy = mode == crate::net::zerocopy::Mode::ShardsZc;
            match crate::net::shards::start(selected.engine.as_ref(), &config, zerocopy) {
                Ok(()) if g.verbose > 0 => eprintln!(
                    "fastsync: socket shards: {} on {} shards x {} slots of {} KiB",
                    selected.engine.kind().name(),
                    config.shards,
                    config.slots_per_shard,
                    config.block_bytes >> 10
                ),
                Ok(()) => {}
                Err(e) => {
                    eprintln!("fastsync: warning: cannot start the socket shards ({e}); using the thread data path")
                }
            }
        }
        match crate::remote::transfer(&t.src, &t.dst, &opts, &net) {
            Ok(s) => s,
            Err(f) => return f.into_exit(),
        }
    } else {
        copy::run(&t.src, &t.dst, &opts, selected.engine.as_ref(), &config)?
    };
    summary.cores = cores;
    let mut out = std::io::stdout().lock();
    // A closed stdout (e.g. `| head`) must not turn a good copy into a failure.
    if g.json {
        let _ = writeln!(out, "{}", summary.to_json());
    } else if g.stats {
        let _ = summary.write_human(&mut out);
    }
    if is_sync && !g.quiet && !g.json {
        eprintln!("fastsync: {}", summary.sync_line());
    }
    if let Some(why) = &summary.deletions_skipped {
        eprintln!("fastsync: --delete: {why}");
    }
    if let Some(signal) = summary.interrupted {
        eprintln!("fastsync: interrupted; rerun the same command to finish (finished work is kept)");
        return Ok(interrupt::exit_code(signal));
    }
    if summary.errors > 0 {
        eprintln!("fastsync: {} error(s); some entries were not transferred (listed above)", summary.errors);
        return Ok(exit::PARTIAL);
    }
    Ok(exit::OK)
}

/// `serve` with `FASTSYNC_ZEROCOPY=shards` (the default, or `shards-zc`): start the socket shards (src/net/shards.rs) on the
/// io_uring engine when the settings choose it, their buffers a share of the memory limit; returns the bytes of those
/// buffers (0 without shards). Where they cannot start, the server says so and serves on its threads.
fn serve_shards(settings: &Settings, verbose: u8) -> u64 {
    let limit = settings.memory_limit_bytes();
    let mode = crate::net::zerocopy::mode();
    if !mode.on_shards() {
        return 0;
    }
    let selected = match engines::select(settings.engine.value) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("fastsync: warning: no engine for the socket shards ({e}); serving on threads");
            return 0;
        }
    };
    if selected.engine.kind() == EngineKind::Fallback {
        // A fallback shard blocks on one socket for a whole frame: a few slow clients would hold every shard thread
        // and stall everybody else's transfers. The server's own thread per connection does the same work unshared.
        if verbose > 0 {
            eprintln!("fastsync: socket shards: not on the fallback engine (serving on one thread per connection)");
        }
        return 0;
    }
    let cores = settings
        .cores
        .value
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let connections = (limit / crate::net::server::CONNECTION_BYTES_MAX).max(1) as usize;
    let config = crate::net::shards::config(selected.engine.kind(), cores, connections, limit);
    let zerocopy = mode == crate::net::zerocopy::Mode::ShardsZc;
    match crate::net::shards::start(selected.engine.as_ref(), &config, zerocopy) {
        Ok(()) => {
            if verbose > 0 {
                eprintln!(
                    "fastsync: socket shards: {} on {} shards x {} slots of {} KiB",
                    selected.engine.kind().name(),
                    config.shards,
                    config.slots_per_shard,
                    config.block_bytes >> 10
                );
            }
            config.buffer_bytes() as u64
        }
        Err(e) => {
            eprintln!("fastsync: warning: cannot start the socket shards ({e}); serving on threads");
            0
        }
    }
}

/// The engine, the number of cores and the engine's sizing that `settings` ask for (explained on stderr with -v).
fn select_engine(settings: &Settings, verbose: u8) -> Result<(engines::Selected, usize, EngineConfig), Error> {
    let selected = engines::select(settings.engine.value)?;
    if verbose > 0 {
        for note in &selected.notes {
            eprintln!("fastsync: {note}");
        }
    }
    let cores = settings
        .cores
        .value
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let config = engine_config(selected.engine.kind(), cores, settings.memory_limit_bytes());
    if verbose > 0 {
        eprintln!(
            "fastsync: {} cores, {} shards x {} slots of {} KiB ({} MiB of buffers; memory limit {} MiB)",
            cores,
            config.shards,
            config.slots_per_shard,
            config.block_bytes >> 10,
            config.buffer_bytes() >> 20,
            settings.memory_limit_bytes() >> 20
        );
    }
    Ok((selected, cores, config))
}

/// The filter rules in the order they were given on the command line, whatever the flag.
fn filter_rules(m: &ArgMatches) -> Result<Filter, Error> {
    enum Rule<'a> {
        Exclude(&'a String),
        Include(&'a String),
        File(&'a PathBuf),
    }
    let mut rules: Vec<(usize, Rule<'_>)> = Vec::new();
    if let (Some(v), Some(i)) = (m.get_many::<String>("exclude"), m.indices_of("exclude")) {
        rules.extend(i.zip(v.map(Rule::Exclude)));
    }
    if let (Some(v), Some(i)) = (m.get_many::<String>("include"), m.indices_of("include")) {
        rules.extend(i.zip(v.map(Rule::Include)));
    }
    if let (Some(v), Some(i)) = (m.get_many::<PathBuf>("filter_from"), m.indices_of("filter_from")) {
        rules.extend(i.zip(v.map(Rule::File)));
    }
    rules.sort_by_key(|(i, _)| *i);
    let mut filter = Filter::new();
    for (_, rule) in rules {
        let r = match rule {
            Rule::Exclude(p) => filter.add_exclude(p),
            Rule::Include(p) => filter.add_include(p),
            Rule::File(f) => filter.add_rules_from_file(f),
        };
        r.map_err(|e| Error::Refused(e.to_string()))?;
    }
    Ok(filter)
}

/// A URL of a scheme fastsync does not speak is a usage error, not a local path that does not exist.
fn refuse_foreign_scheme(arg: &Path) -> Result<(), Error> {
    match crate::net::url::foreign_scheme(arg) {
        Some(scheme) => Err(Error::Refused(format!(
            "'{}': {scheme}:// URLs are not supported; fastsync copies between local paths and \
             fastsync://HOST[:PORT]/PATH (a server started with `fastsync serve`)",
            arg.shown()
        ))),
        None => Ok(()),
    }
}

/// Sizing for `cores` cores on the given engine within `memory_limit_bytes`: buffers take at most a quarter of the
/// limit (32 slots of 1 MiB per io_uring shard at most, 2 at least); jobs in flight follow the slots.
pub fn engine_config(kind: EngineKind, cores: usize, memory_limit_bytes: u64) -> EngineConfig {
    let shards = match kind {
        EngineKind::Uring => cores,
        EngineKind::Fallback => cores * FALLBACK_THREADS_PER_CORE,
    };
    let budget_slots = (memory_limit_bytes / BUFFER_SHARE_DIVISOR / BLOCK_BYTES as u64 / shards as u64) as usize;
    let slots = match kind {
        EngineKind::Uring => budget_slots.clamp(2, URING_SLOTS_PER_SHARD_MAX),
        EngineKind::Fallback => 1,
    };
    EngineConfig {
        shards,
        pin: kind == EngineKind::Uring,
        block_bytes: BLOCK_BYTES,
        slots_per_shard: slots,
        jobs_in_flight_max: shards * slots.max(8) * 2,
        buffered_writes_nonblocking: false,
        buffers_up_front: false,
    }
}

/// Buffer slots per io_uring shard at most: jobs (and I/Os) in flight per core. More bought nothing measurable.
const URING_SLOTS_PER_SHARD_MAX: usize = 32;
