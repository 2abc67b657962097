//! Layered configuration: built-in defaults, then the config file, then `FASTSYNC_*` environment variables, then
//! command-line flags. A later layer wins key by key, and every value remembers where it came from, which
//! `fastsync config` prints ([`Settings::render`], [`Settings::to_json`]).
//!
//! The file is TOML with the keys in [`KEYS`]. It is `--config FILE`, else `$FASTSYNC_CONFIG`, else
//! `$XDG_CONFIG_HOME/fastsync/config.toml` (when that variable holds an absolute path), else
//! `$HOME/.config/fastsync/config.toml`. A file named by `--config` or `FASTSYNC_CONFIG` must exist; a missing default
//! file just means "no file".
//!
//! Each key `k` is also read from the environment variable `FASTSYNC_` + `k` in upper case (`FASTSYNC_MEMORY_LIMIT`).
//! An empty variable counts as unset. Other `FASTSYNC_*` variables are ignored, since other tools may set some.
//! Every layer present is validated in full, even where a later layer overrides it.
//!
//! Sizes are binary, as in rclone: `K`, `KB` and `KiB` all mean 1024 bytes (see [`parse_size`]).

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use fastsync_engine::Show;
use serde::Serialize;

use crate::engines::EngineChoice;

/// The keys of the config file, in the order they are shown.
pub const KEYS: [&str; 7] = ["engine", "cores", "memory_profile", "memory_limit", "fsync", "verify", "direct_io"];

/// The most cores (shards) `cores` accepts.
pub const MAX_CORES: u16 = 1024;

/// The environment variable that names the config file when `--config` is not given.
pub const ENV_CONFIG: &str = "FASTSYNC_CONFIG";

const EXPECT_ENGINE: &str = "expected one of auto, uring, fallback";
const EXPECT_CORES: &str = "expected an integer from 1 to 1024";
const EXPECT_PROFILE: &str = "expected one of low-memory, default, high-memory, max-throughput";
const EXPECT_SIZE: &str =
    "expected a size: bytes, or a number with a binary suffix K, M, G or T (like 1048576, 512M, 1.5GiB; 1K = 1024)";
const EXPECT_SIZE_POSITIVE: &str = "expected a size greater than 0";
const EXPECT_BOOL_FILE: &str = "expected true or false";
const EXPECT_BOOL_ENV: &str = "expected 1, 0, true, false, yes or no";

/// How much memory fastsync may use for buffers and bookkeeping, unless `memory_limit` says otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum MemoryProfile {
    /// 256 MiB: small machines and containers
    #[value(name = "low-memory")]
    Low,
    /// 1 GiB
    #[default]
    #[value(name = "default")]
    Default,
    /// 4 GiB
    #[value(name = "high-memory")]
    High,
    /// 8 GiB: the most buffers in flight
    #[value(name = "max-throughput")]
    Max,
}

impl MemoryProfile {
    /// Every profile, smallest first.
    pub const ALL: [MemoryProfile; 4] = [Self::Low, Self::Default, Self::High, Self::Max];

    /// The name used in flags, the config file and the environment.
    pub fn name(self) -> &'static str {
        match self {
            Self::Low => "low-memory",
            Self::Default => "default",
            Self::High => "high-memory",
            Self::Max => "max-throughput",
        }
    }

    /// The memory limit this profile stands for.
    pub fn limit_bytes(self) -> u64 {
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        match self {
            Self::Low => 256 * MIB,
            Self::Default => GIB,
            Self::High => 4 * GIB,
            Self::Max => 8 * GIB,
        }
    }
}

impl fmt::Display for MemoryProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MemoryProfile {
    type Err = String;

    /// Parses a profile name, ignoring case.
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(s)).ok_or_else(|| EXPECT_PROFILE.to_owned())
    }
}

/// Where a setting's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The config file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(&'static str),
    /// This command-line flag (with its dashes: `--cores`).
    Flag(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(path) => write!(f, "file {}", path.shown()),
            Source::Env(var) => write!(f, "env {var}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// One value and where it came from.
#[derive(Clone, Debug)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
}

impl<T> Setting<T> {
    fn default_of(value: T) -> Self {
        Setting { value, source: Source::Default }
    }

    fn set(&mut self, value: T, source: Source) {
        *self = Setting { value, source };
    }
}

/// The effective configuration: every key with its value and source.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The config file read, if any.
    pub file: Option<PathBuf>,
    pub engine: Setting<EngineChoice>,
    /// `None`: all available cores.
    pub cores: Setting<Option<u16>>,
    pub memory_profile: Setting<MemoryProfile>,
    /// `None`: the memory profile's limit (see [`Settings::memory_limit_bytes`]).
    pub memory_limit: Setting<Option<u64>>,
    pub fsync: Setting<bool>,
    pub verify: Setting<bool>,
    pub direct_io: Setting<bool>,
}

/// What the command line gave: the top layer. Boolean flags can only switch a setting on (`true` = flag given).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub engine: Option<EngineChoice>,
    pub cores: Option<u16>,
    pub memory_profile: Option<MemoryProfile>,
    pub memory_limit: Option<u64>,
    pub fsync: bool,
    pub verify: bool,
    /// `--direct-io` (Some(true)) or `--no-direct-io` (Some(false)).
    pub direct_io: Option<bool>,
}

/// A configuration that cannot be used. Each message is one line naming the file or variable, the key and what is
/// accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file named by `--config` or `FASTSYNC_CONFIG` does not exist.
    #[error("config file '{}' (from {by}) does not exist", .path.shown())]
    Missing { path: PathBuf, by: &'static str },
    /// The file exists but cannot be read (a directory, no permission, not UTF-8).
    #[error("config file '{}': cannot read it: {source}", .path.shown())]
    Read { path: PathBuf, source: io::Error },
    /// The file is not valid TOML.
    #[error("config file '{}': invalid TOML at line {line}, column {column}: {message}", .path.shown())]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    /// The file has a key fastsync does not know.
    #[error("config file '{}': unknown key '{key}' (known: {})", .path.shown(), KEYS.join(", "))]
    UnknownKey { path: PathBuf, key: String },
    /// A key in the file has a value of the wrong type or out of range; `got` is the value as TOML.
    #[error("config file '{}': key '{key}': {expected}, got {got}", .path.shown())]
    FileValue { path: PathBuf, key: &'static str, expected: String, got: String },
    /// A known `FASTSYNC_*` variable holds a bad value.
    #[error("environment variable {var}: {expected}, got '{got}'")]
    EnvValue { var: &'static str, expected: String, got: String },
    /// An override holds a value its flag would have refused (a caller's bug, or a flag without range checks).
    #[error("flag {flag}: {expected}, got {got}")]
    FlagValue { flag: &'static str, expected: String, got: String },
}

/// The environment lookup [`Settings::load`] uses: the CLI passes `&|k| std::env::var_os(k)`.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

impl Settings {
    /// Every key at its built-in default, no file.
    pub fn defaults() -> Settings {
        Settings {
            file: None,
            engine: Setting::default_of(EngineChoice::Auto),
            cores: Setting::default_of(None),
            memory_profile: Setting::default_of(MemoryProfile::Default),
            memory_limit: Setting::default_of(None),
            fsync: Setting::default_of(false),
            verify: Setting::default_of(false),
            direct_io: Setting::default_of(true),
        }
    }

    /// Loads the layers: defaults, then the file, then the environment, then `flags`.
    ///
    /// `config_flag` is `--config FILE` (must exist). Without it, `FASTSYNC_CONFIG` names the file (must exist), else
    /// the default path ([`default_file`]) is read if it exists. `env` looks variables up (the CLI passes
    /// `&|k| std::env::var_os(k)`; tests pass a map).
    pub fn load(config_flag: Option<&Path>, env: EnvLookup<'_>, flags: &Overrides) -> Result<Settings, ConfigError> {
        let mut settings = Settings::defaults();
        if let Some((path, text)) = read_file(config_flag, env)? {
            settings.apply_file(&path, &text)?;
            settings.file = Some(path);
        }
        settings.apply_env(env)?;
        settings.apply_flags(flags)?;
        Ok(settings)
    }

    /// The effective memory limit in bytes: `memory_limit` if set, else the memory profile's.
    pub fn memory_limit_bytes(&self) -> u64 {
        self.memory_limit.value.unwrap_or_else(|| self.memory_profile.value.limit_bytes())
    }

    /// A table with one line per key, `key = value  # source`, columns aligned. Values are TOML (sizes as `"1GiB"`
    /// where they divide evenly), so the lines can seed a config file. Absent `cores` is a comment line
    /// (`# cores = (all available)`); absent `memory_limit` shows the profile's limit, sourced to the profile.
    pub fn render(&self) -> String {
        let (limit_value, limit_source) = match self.memory_limit.value {
            Some(bytes) => (size_toml(bytes), self.memory_limit.source.to_string()),
            None => (
                size_toml(self.memory_profile.value.limit_bytes()),
                format!("limit of memory_profile ({})", self.memory_profile.source),
            ),
        };
        let rows = [
            ("engine", quoted(engine_name(self.engine.value)), self.engine.source.to_string()),
            match self.cores.value {
                Some(n) => ("cores", n.to_string(), self.cores.source.to_string()),
                None => ("# cores", "(all available)".to_owned(), self.cores.source.to_string()),
            },
            ("memory_profile", quoted(self.memory_profile.value.name()), self.memory_profile.source.to_string()),
            ("memory_limit", limit_value, limit_source),
            ("fsync", self.fsync.value.to_string(), self.fsync.source.to_string()),
            ("verify", self.verify.value.to_string(), self.verify.source.to_string()),
            ("direct_io", self.direct_io.value.to_string(), self.direct_io.source.to_string()),
        ];
        let key_width = rows.iter().map(|(k, _, _)| k.len()).max().unwrap_or(0);
        let value_width = rows.iter().map(|(_, v, _)| v.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (key, value, source) in rows {
            out.push_str(&format!("{key:<key_width$} = {value:<value_width$}  # {source}\n"));
        }
        out
    }

    /// One JSON object: `{"file": path or null, "settings": {"engine": {"value": "auto", "source": "default"}, ...}}`.
    /// Keys follow [`KEYS`]. Absent `cores` and `memory_limit` are `null`; `memory_limit` also has `"effective"`,
    /// the limit in bytes ([`Settings::memory_limit_bytes`]). Sources read as in [`Source`]'s `Display`.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Entry<T> {
            value: T,
            source: String,
        }
        #[derive(Serialize)]
        struct Limit {
            value: Option<u64>,
            source: String,
            effective: u64,
        }
        #[derive(Serialize)]
        struct All {
            engine: Entry<&'static str>,
            cores: Entry<Option<u16>>,
            memory_profile: Entry<&'static str>,
            memory_limit: Limit,
            fsync: Entry<bool>,
            verify: Entry<bool>,
            direct_io: Entry<bool>,
        }
        #[derive(Serialize)]
        struct Out {
            file: Option<String>,
            settings: All,
        }
        fn entry<T: Copy, U>(s: &Setting<T>, f: impl Fn(T) -> U) -> Entry<U> {
            Entry { value: f(s.value), source: s.source.to_string() }
        }
        let out = Out {
            file: self.file.as_ref().map(|p| p.shown().to_string()),
            settings: All {
                engine: entry(&self.engine, engine_name),
                cores: entry(&self.cores, |v| v),
                memory_profile: entry(&self.memory_profile, MemoryProfile::name),
                memory_limit: Limit {
                    value: self.memory_limit.value,
                    source: self.memory_limit.source.to_string(),
                    effective: self.memory_limit_bytes(),
                },
                fsync: entry(&self.fsync, |v| v),
                verify: entry(&self.verify, |v| v),
                direct_io: entry(&self.direct_io, |v| v),
            },
        };
        serde_json::to_string(&out).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
            let message = e.message().trim().replace('\n', "; ");
            ConfigError::Syntax { path: path.to_owned(), line, column, message }
        })?;
        let source = || Source::File(path.to_owned());
        let bad = |key: &'static str, expected: &str, got: &toml::Value| ConfigError::FileValue {
            path: path.to_owned(),
            key,
            expected: expected.to_owned(),
            got: got.to_string(),
        };
        if let Some(key) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(ConfigError::UnknownKey { path: path.to_owned(), key: key.clone() });
        }
        for (key, value) in &table {
            match key.as_str() {
                "engine" => {
                    let v = value.as_str().and_then(parse_engine).ok_or_else(|| bad("engine", EXPECT_ENGINE, value))?;
                    self.engine.set(v, source());
                }
                "cores" => {
                    let v = value
                        .as_integer()
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|n| (1..=MAX_CORES).contains(n))
                        .ok_or_else(|| bad("cores", EXPECT_CORES, value))?;
                    self.cores.set(Some(v), source());
                }
                "memory_profile" => {
                    let v = value
                        .as_str()
                        .and_then(|s| s.parse::<MemoryProfile>().ok())
                        .ok_or_else(|| bad("memory_profile", EXPECT_PROFILE, value))?;
                    self.memory_profile.set(v, source());
                }
                "memory_limit" => {
                    let v = match value {
                        toml::Value::Integer(n) => u64::try_from(*n)
                            .ok()
                            .filter(|&n| n > 0)
                            .ok_or_else(|| bad("memory_limit", EXPECT_SIZE_POSITIVE, value))?,
                        toml::Value::String(s) => parse_size(s).map_err(|e| bad("memory_limit", &e, value))?,
                        _ => return Err(bad("memory_limit", EXPECT_SIZE, value)),
                    };
                    self.memory_limit.set(Some(v), source());
                }
                "fsync" | "verify" | "direct_io" => {
                    let (key, slot) = self.bool_slot(key);
                    let v = value.as_bool().ok_or_else(|| bad(key, EXPECT_BOOL_FILE, value))?;
                    slot.set(v, source());
                }
                _ => unreachable!("unknown keys were rejected above"),
            }
        }
        Ok(())
    }

    fn bool_slot(&mut self, key: &str) -> (&'static str, &mut Setting<bool>) {
        match key {
            "fsync" => ("fsync", &mut self.fsync),
            "verify" => ("verify", &mut self.verify),
            _ => ("direct_io", &mut self.direct_io),
        }
    }

    fn apply_env(&mut self, env: EnvLookup<'_>) -> Result<(), ConfigError> {
        const ENGINE: &str = "FASTSYNC_ENGINE";
        const CORES: &str = "FASTSYNC_CORES";
        const PROFILE: &str = "FASTSYNC_MEMORY_PROFILE";
        const LIMIT: &str = "FASTSYNC_MEMORY_LIMIT";
        let bad = |var: &'static str, expected: &str, got: &str| ConfigError::EnvValue {
            var,
            expected: expected.to_owned(),
            got: got.to_owned(),
        };
        if let Some(s) = env_text(env, ENGINE, EXPECT_ENGINE)? {
            let v = parse_engine(&s).ok_or_else(|| bad(ENGINE, EXPECT_ENGINE, &s))?;
            self.engine.set(v, Source::Env(ENGINE));
        }
        if let Some(s) = env_text(env, CORES, EXPECT_CORES)? {
            let v = parse_cores(&s).ok_or_else(|| bad(CORES, EXPECT_CORES, &s))?;
            self.cores.set(Some(v), Source::Env(CORES));
        }
        if let Some(s) = env_text(env, PROFILE, EXPECT_PROFILE)? {
            let v = s.parse::<MemoryProfile>().map_err(|_| bad(PROFILE, EXPECT_PROFILE, &s))?;
            self.memory_profile.set(v, Source::Env(PROFILE));
        }
        if let Some(s) = env_text(env, LIMIT, EXPECT_SIZE)? {
            let v = parse_size(&s).map_err(|e| bad(LIMIT, &e, &s))?;
            self.memory_limit.set(Some(v), Source::Env(LIMIT));
        }
        for (key, var) in
            [("fsync", "FASTSYNC_FSYNC"), ("verify", "FASTSYNC_VERIFY"), ("direct_io", "FASTSYNC_DIRECT_IO")]
        {
            if let Some(s) = env_text(env, var, EXPECT_BOOL_ENV)? {
                let v = parse_bool_env(&s).ok_or_else(|| bad(var, EXPECT_BOOL_ENV, &s))?;
                self.bool_slot(key).1.set(v, Source::Env(var));
            }
        }
        Ok(())
    }

    fn apply_flags(&mut self, flags: &Overrides) -> Result<(), ConfigError> {
        if let Some(v) = flags.engine {
            self.engine.set(v, Source::Flag("--engine"));
        }
        if let Some(v) = flags.cores {
            if !(1..=MAX_CORES).contains(&v) {
                return Err(ConfigError::FlagValue {
                    flag: "--cores",
                    expected: EXPECT_CORES.to_owned(),
                    got: v.to_string(),
                });
            }
            self.cores.set(Some(v), Source::Flag("--cores"));
        }
        if let Some(v) = flags.memory_profile {
            self.memory_profile.set(v, Source::Flag("--memory-profile"));
        }
        if let Some(v) = flags.memory_limit {
            if v == 0 {
                return Err(ConfigError::FlagValue {
                    flag: "--memory-limit",
                    expected: EXPECT_SIZE_POSITIVE.to_owned(),
                    got: "0".to_owned(),
                });
            }
            self.memory_limit.set(Some(v), Source::Flag("--memory-limit"));
        }
        for (given, slot, flag) in
            [(flags.fsync, &mut self.fsync, "--fsync"), (flags.verify, &mut self.verify, "--verify")]
        {
            if given {
                slot.set(true, Source::Flag(flag));
            }
        }
        if let Some(on) = flags.direct_io {
            self.direct_io.set(on, Source::Flag(if on { "--direct-io" } else { "--no-direct-io" }));
        }
        Ok(())
    }
}

/// The default config file: `$XDG_CONFIG_HOME/fastsync/config.toml` when that variable holds an absolute path (the
/// XDG rule: a relative one is ignored), else `$HOME/.config/fastsync/config.toml`, else none. Empty variables count
/// as unset. Whether the file exists is not checked.
pub fn default_file(env: EnvLookup<'_>) -> Option<PathBuf> {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(xdg) = var("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("fastsync").join("config.toml"));
    }
    var("HOME").map(|home| home.join(".config").join("fastsync").join("config.toml"))
}

/// Finds and reads the config file: `(path, text)`, or `None` when there is none.
fn read_file(config_flag: Option<&Path>, env: EnvLookup<'_>) -> Result<Option<(PathBuf, String)>, ConfigError> {
    let (path, by) = match (config_flag, env(ENV_CONFIG).filter(|v| !v.is_empty())) {
        (Some(path), _) => (path.to_owned(), Some("--config")),
        (None, Some(path)) => (PathBuf::from(path), Some(ENV_CONFIG)),
        (None, None) => match default_file(env) {
            Some(path) => (path, None),
            None => return Ok(None),
        },
    };
    // A default path we may not even look at (HOME belongs to another user, as under `sudo -u` or `setpriv`) is
    // as good as absent; a file that exists but cannot be read is an error.
    if by.is_none() && std::fs::metadata(&path).is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied) {
        return Ok(None);
    }
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Some((path, text))),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => match by {
            Some(by) => Err(ConfigError::Missing { path, by }),
            None => Ok(None),
        },
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

/// A known variable's value, trimmed; `None` when unset or empty. Not UTF-8 is an error naming the variable.
fn env_text(env: EnvLookup<'_>, var: &'static str, expected: &str) -> Result<Option<String>, ConfigError> {
    match env(var) {
        None => Ok(None),
        Some(raw) => match raw.into_string() {
            Ok(s) if s.trim().is_empty() => Ok(None),
            Ok(s) => Ok(Some(s.trim().to_owned())),
            Err(raw) => Err(ConfigError::EnvValue { var, expected: expected.to_owned(), got: raw.shown().to_string() }),
        },
    }
}

fn parse_engine(s: &str) -> Option<EngineChoice> {
    <EngineChoice as clap::ValueEnum>::from_str(s, true).ok()
}

fn parse_cores(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|n| (1..=MAX_CORES).contains(n))
}

fn parse_bool_env(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Some(true),
        "0" | "false" | "no" => Some(false),
        _ => None,
    }
}

fn engine_name(engine: EngineChoice) -> &'static str {
    match engine {
        EngineChoice::Auto => "auto",
        EngineChoice::Uring => "uring",
        EngineChoice::Fallback => "fallback",
    }
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A size as a TOML value: `"1GiB"` when a binary unit divides it, else the integer.
fn size_toml(bytes: u64) -> String {
    let text = format_size(bytes);
    if text.bytes().all(|b| b.is_ascii_digit()) { text } else { quoted(&text) }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(offset.min(text.len()))];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (before.matches('\n').count() + 1, before[line_start..].chars().count() + 1)
}

/// Parses a size in bytes: plain bytes (`1048576`) or a number with a suffix `K`, `M`, `G` or `T`, optionally followed
/// by `i` and/or `B` (`512M`, `512MB`, `512MiB`, `1.5G`). Units are binary, as in rclone: `K` = `KB` = `KiB` = 1024.
/// Case-insensitive; a lone `B` means bytes; space between number and suffix is allowed. A fraction is allowed and the
/// result rounds down to whole bytes. It must be greater than 0 and fit in 64 bits. Errors start with "expected", fit
/// for clap's `value_parser`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(end);
    let shift = match suffix.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return Err(EXPECT_SIZE.to_owned()),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let well_formed = !whole.is_empty()
        && whole.bytes().all(|b| b.is_ascii_digit())
        && fraction.bytes().all(|b| b.is_ascii_digit())
        && !(number.contains('.') && fraction.is_empty());
    if !well_formed {
        return Err(EXPECT_SIZE.to_owned());
    }
    let too_large = || "expected a size below 16 EiB".to_owned();
    let mantissa: u128 = format!("{whole}{fraction}").parse().map_err(|_| too_large())?;
    let scale = 10u128.checked_pow(u32::try_from(fraction.len()).map_err(|_| too_large())?).ok_or_else(too_large)?;
    let bytes = mantissa.checked_mul(1 << shift).ok_or_else(too_large)? / scale;
    match u64::try_from(bytes) {
        Ok(0) => Err(EXPECT_SIZE_POSITIVE.to_owned()),
        Ok(bytes) => Ok(bytes),
        Err(_) => Err(too_large()),
    }
}

/// A size for people and for config files: `"1GiB"`, `"1536MiB"` when a binary unit divides it, else plain bytes
/// (`"1000"`). [`parse_size`] reads it back.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes != 0 && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::fs;

    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// An environment made of `pairs` only.
    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let map: HashMap<String, OsString> = pairs.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        move |k| map.get(k).cloned()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    fn load_with(file: Option<&Path>, env: &[(&str, &str)], flags: &Overrides) -> Result<Settings, ConfigError> {
        Settings::load(file, &env_of(env), flags)
    }

    fn load_err(file: Option<&Path>, env: &[(&str, &str)]) -> String {
        match load_with(file, env, &Overrides::default()) {
            Ok(s) => panic!("expected an error, got {s:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_without_file_env_or_flags() {
        let s = load_with(None, &[], &Overrides::default()).unwrap();
        assert_eq!(s.file, None);
        assert_eq!(s.engine.value, EngineChoice::Auto);
        assert_eq!(s.cores.value, None);
        assert_eq!(s.memory_profile.value, MemoryProfile::Default);
        assert_eq!(s.memory_limit.value, None);
        assert!(!s.fsync.value && !s.verify.value && s.direct_io.value);
        for source in [
            &s.engine.source,
            &s.cores.source,
            &s.memory_profile.source,
            &s.memory_limit.source,
            &s.fsync.source,
            &s.verify.source,
            &s.direct_io.source,
        ] {
            assert_eq!(source, &Source::Default);
        }
        assert_eq!(s.memory_limit_bytes(), GIB);
    }

    #[test]
    fn precedence_default_file_env_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.toml",
            "engine = \"fallback\"\ncores = 2\nmemory_profile = \"low-memory\"\nmemory_limit = \"64M\"\n\
             fsync = true\nverify = true\n",
        );
        let env = [
            ("FASTSYNC_CORES", "3"),
            ("FASTSYNC_MEMORY_PROFILE", "HIGH-memory"),
            ("FASTSYNC_MEMORY_LIMIT", "128MiB"),
            ("FASTSYNC_VERIFY", "no"),
        ];
        let flags =
            Overrides { memory_profile: Some(MemoryProfile::Max), memory_limit: Some(GIB), ..Default::default() };
        let s = load_with(Some(&file), &env, &flags).unwrap();
        let from_file = Source::File(file.clone());
        assert_eq!(s.file.as_deref(), Some(file.as_path()));
        // File only.
        assert_eq!((s.engine.value, &s.engine.source), (EngineChoice::Fallback, &from_file));
        assert_eq!((s.fsync.value, &s.fsync.source), (true, &from_file));
        // File, then env.
        assert_eq!((s.cores.value, &s.cores.source), (Some(3), &Source::Env("FASTSYNC_CORES")));
        assert_eq!((s.verify.value, &s.verify.source), (false, &Source::Env("FASTSYNC_VERIFY")));
        // File, env, then flag.
        assert_eq!(
            (s.memory_profile.value, &s.memory_profile.source),
            (MemoryProfile::Max, &Source::Flag("--memory-profile"))
        );
        assert_eq!((s.memory_limit.value, &s.memory_limit.source), (Some(GIB), &Source::Flag("--memory-limit")));
        // Nowhere.
        assert_eq!((s.direct_io.value, &s.direct_io.source), (true, &Source::Default));

        // Each layer alone over the default, for every key.
        let env_all = [
            ("FASTSYNC_ENGINE", "Uring"),
            ("FASTSYNC_CORES", "7"),
            ("FASTSYNC_MEMORY_PROFILE", "low-memory"),
            ("FASTSYNC_MEMORY_LIMIT", "5G"),
            ("FASTSYNC_FSYNC", "1"),
            ("FASTSYNC_VERIFY", "TRUE"),
            ("FASTSYNC_DIRECT_IO", "no"),
        ];
        let s = load_with(Some(&file), &env_all, &Overrides::default()).unwrap();
        assert_eq!((s.engine.value, &s.engine.source), (EngineChoice::Uring, &Source::Env("FASTSYNC_ENGINE")));
        assert_eq!(s.memory_profile.source, Source::Env("FASTSYNC_MEMORY_PROFILE"));
        assert_eq!(
            (s.memory_limit.value, &s.memory_limit.source),
            (Some(5 * GIB), &Source::Env("FASTSYNC_MEMORY_LIMIT"))
        );
        assert_eq!(s.fsync.source, Source::Env("FASTSYNC_FSYNC"));
        assert_eq!((s.direct_io.value, &s.direct_io.source), (false, &Source::Env("FASTSYNC_DIRECT_IO")));

        let flags = Overrides {
            engine: Some(EngineChoice::Auto),
            cores: Some(9),
            fsync: true,
            verify: true,
            direct_io: Some(true),
            ..Default::default()
        };
        let s = load_with(Some(&file), &env_all, &flags).unwrap();
        assert_eq!((s.engine.value, &s.engine.source), (EngineChoice::Auto, &Source::Flag("--engine")));
        assert_eq!((s.cores.value, &s.cores.source), (Some(9), &Source::Flag("--cores")));
        assert_eq!(s.fsync.source, Source::Flag("--fsync"));
        assert_eq!(s.verify.source, Source::Flag("--verify"));
        assert_eq!((s.direct_io.value, &s.direct_io.source), (true, &Source::Flag("--direct-io")));
        let off = Overrides { direct_io: Some(false), ..Default::default() };
        let s = load_with(Some(&file), &env_all, &off).unwrap();
        assert_eq!((s.direct_io.value, &s.direct_io.source), (false, &Source::Flag("--no-direct-io")));
    }

    #[test]
    fn bool_flag_not_given_keeps_lower_layer() {
        let s = load_with(None, &[("FASTSYNC_FSYNC", "yes")], &Overrides::default()).unwrap();
        assert_eq!((s.fsync.value, &s.fsync.source), (true, &Source::Env("FASTSYNC_FSYNC")));
    }

    #[test]
    fn empty_env_values_count_as_unset() {
        let s = load_with(None, &[("FASTSYNC_CORES", ""), ("FASTSYNC_FSYNC", "  ")], &Overrides::default()).unwrap();
        assert_eq!((s.cores.value, &s.cores.source), (None, &Source::Default));
        assert_eq!(s.fsync.source, Source::Default);
    }

    #[test]
    fn unknown_fastsync_env_vars_are_ignored() {
        let s = load_with(None, &[("FASTSYNC_COLOR", "weird"), ("FASTSYNC_CORS", "x")], &Overrides::default());
        assert!(s.is_ok(), "{s:?}");
    }

    #[test]
    fn default_file_prefers_xdg_over_home() {
        let dir = tempfile::tempdir().unwrap();
        let xdg = dir.path().join("xdg");
        let home = dir.path().join("home");
        let xdg_file = write(&xdg, "fastsync/config.toml", "cores = 4\n");
        let home_file = write(&home, ".config/fastsync/config.toml", "cores = 5\n");
        let (x, h) = (xdg.to_str().unwrap(), home.to_str().unwrap());

        let s = load_with(None, &[("XDG_CONFIG_HOME", x), ("HOME", h)], &Overrides::default()).unwrap();
        assert_eq!(s.file.as_deref(), Some(xdg_file.as_path()));
        assert_eq!((s.cores.value, &s.cores.source), (Some(4), &Source::File(xdg_file.clone())));

        let s = load_with(None, &[("HOME", h)], &Overrides::default()).unwrap();
        assert_eq!(s.file.as_deref(), Some(home_file.as_path()));
        assert_eq!(s.cores.value, Some(5));

        // Empty or relative XDG_CONFIG_HOME is ignored (XDG rule); HOME is used.
        for bad_xdg in ["", "relative/dir"] {
            let s = load_with(None, &[("XDG_CONFIG_HOME", bad_xdg), ("HOME", h)], &Overrides::default()).unwrap();
            assert_eq!(s.file.as_deref(), Some(home_file.as_path()), "XDG_CONFIG_HOME={bad_xdg:?}");
        }

        // XDG_CONFIG_HOME set but holding no file: no file, HOME is not consulted.
        let empty = dir.path().join("empty");
        let s = load_with(None, &[("XDG_CONFIG_HOME", empty.to_str().unwrap()), ("HOME", h)], &Overrides::default())
            .unwrap();
        assert_eq!(s.file, None);
        assert_eq!(s.cores.source, Source::Default);
    }

    #[test]
    fn missing_default_file_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let s = load_with(None, &[("HOME", dir.path().to_str().unwrap())], &Overrides::default()).unwrap();
        assert_eq!(s.file, None);
        // HOME is a file, so .config below it is "not a directory": still no file.
        let not_dir = write(dir.path(), "plain", "");
        let s = load_with(None, &[("HOME", not_dir.to_str().unwrap())], &Overrides::default()).unwrap();
        assert_eq!(s.file, None);
    }

    #[test]
    fn fastsync_config_env_names_the_file_and_the_flag_wins() {
        let dir = tempfile::tempdir().unwrap();
        let by_env = write(dir.path(), "env.toml", "cores = 6\n");
        let by_flag = write(dir.path(), "flag.toml", "cores = 8\n");
        let xdg = dir.path().join("xdg");
        write(&xdg, "fastsync/config.toml", "cores = 4\n");
        let env = [(ENV_CONFIG, by_env.to_str().unwrap()), ("XDG_CONFIG_HOME", xdg.to_str().unwrap())];

        let s = load_with(None, &env, &Overrides::default()).unwrap();
        assert_eq!(s.file.as_deref(), Some(by_env.as_path()));
        assert_eq!(s.cores.value, Some(6));

        let s = load_with(Some(&by_flag), &env, &Overrides::default()).unwrap();
        assert_eq!(s.file.as_deref(), Some(by_flag.as_path()));
        assert_eq!((s.cores.value, &s.cores.source), (Some(8), &Source::File(by_flag.clone())));
    }

    #[test]
    fn explicit_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = load_with(Some(&missing), &[], &Overrides::default()).unwrap_err();
        assert!(matches!(err, ConfigError::Missing { by: "--config", .. }), "{err:?}");
        assert_eq!(err.to_string(), format!("config file '{}' (from --config) does not exist", missing.shown()));

        let msg = load_err(None, &[(ENV_CONFIG, missing.to_str().unwrap())]);
        assert_eq!(msg, format!("config file '{}' (from FASTSYNC_CONFIG) does not exist", missing.shown()));
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_with(Some(dir.path()), &[], &Overrides::default()).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().starts_with(&format!("config file '{}': cannot read it: ", dir.path().shown())));

        // A default file that exists but cannot be read is an error too, not silently skipped.
        let xdg = dir.path().join("xdg");
        fs::create_dir_all(xdg.join("fastsync/config.toml")).unwrap();
        let err = load_with(None, &[("XDG_CONFIG_HOME", xdg.to_str().unwrap())], &Overrides::default()).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "config.toml", "engine = \"auto\"\ncors = 4\n");
        assert_eq!(
            load_err(Some(&file), &[]),
            format!(
                "config file '{}': unknown key 'cors' (known: engine, cores, memory_profile, memory_limit, fsync, \
                 verify, direct_io)",
                file.shown()
            )
        );
        // A table is an unknown key too.
        let file = write(dir.path(), "table.toml", "[engine]\nname = \"auto\"\n[extra]\n");
        assert!(load_err(Some(&file), &[]).contains("unknown key 'extra'"));
    }

    #[test]
    fn syntax_error_gives_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "config.toml", "engine = \"auto\"\n\ncores = = 4\n");
        let err = load_with(Some(&file), &[], &Overrides::default()).unwrap_err();
        let ConfigError::Syntax { line, .. } = &err else { panic!("{err:?}") };
        assert_eq!(*line, 3);
        let msg = err.to_string();
        assert!(msg.starts_with(&format!("config file '{}': invalid TOML at line 3, column ", file.shown())), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");

        let file = write(dir.path(), "dup.toml", "cores = 1\ncores = 2\n");
        let err = load_with(Some(&file), &[], &Overrides::default()).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { line: 2, .. }), "{err:?}");
    }

    #[test]
    fn bad_file_values_name_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("engine = \"turbo\"", "engine", EXPECT_ENGINE, "\"turbo\""),
            ("engine = 1", "engine", EXPECT_ENGINE, "1"),
            ("cores = 0", "cores", EXPECT_CORES, "0"),
            ("cores = 1025", "cores", EXPECT_CORES, "1025"),
            ("cores = -1", "cores", EXPECT_CORES, "-1"),
            ("cores = \"4\"", "cores", EXPECT_CORES, "\"4\""),
            ("memory_profile = \"huge\"", "memory_profile", EXPECT_PROFILE, "\"huge\""),
            ("memory_limit = 0", "memory_limit", EXPECT_SIZE_POSITIVE, "0"),
            ("memory_limit = -5", "memory_limit", EXPECT_SIZE_POSITIVE, "-5"),
            ("memory_limit = \"0K\"", "memory_limit", EXPECT_SIZE_POSITIVE, "\"0K\""),
            ("memory_limit = \"1X\"", "memory_limit", EXPECT_SIZE, "\"1X\""),
            ("memory_limit = 1.5", "memory_limit", EXPECT_SIZE, "1.5"),
            ("fsync = \"yes\"", "fsync", EXPECT_BOOL_FILE, "\"yes\""),
            ("verify = 1", "verify", EXPECT_BOOL_FILE, "1"),
            ("direct_io = \"true\"", "direct_io", EXPECT_BOOL_FILE, "\"true\""),
        ];
        for (text, key, expected, got) in cases {
            let file = write(dir.path(), "config.toml", &format!("{text}\n"));
            assert_eq!(
                load_err(Some(&file), &[]),
                format!("config file '{}': key '{key}': {expected}, got {got}", file.shown()),
                "{text}"
            );
        }
        let file = write(dir.path(), "config.toml", "cores = 0\n");
        assert_eq!(
            load_err(Some(&file), &[]),
            format!("config file '{}': key 'cores': expected an integer from 1 to 1024, got 0", file.shown())
        );
    }

    #[test]
    fn good_file_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", "memory_limit = 1048576\nengine = \"URING\"\ncores = 1024\n");
        let s = load_with(Some(&file), &[], &Overrides::default()).unwrap();
        assert_eq!(s.memory_limit.value, Some(MIB));
        assert_eq!(s.engine.value, EngineChoice::Uring);
        assert_eq!(s.cores.value, Some(1024));
        let file = write(dir.path(), "b.toml", "memory_limit = \"1.5G\"\nmemory_profile = \"max-throughput\"\n");
        let s = load_with(Some(&file), &[], &Overrides::default()).unwrap();
        assert_eq!(s.memory_limit.value, Some(GIB + GIB / 2));
        assert_eq!(s.memory_profile.value, MemoryProfile::Max);
        let file = write(dir.path(), "empty.toml", "# nothing\n");
        let s = load_with(Some(&file), &[], &Overrides::default()).unwrap();
        assert_eq!(s.file.as_deref(), Some(file.as_path()));
        assert_eq!(s.engine.source, Source::Default);
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let cases = [
            ("FASTSYNC_ENGINE", "turbo", EXPECT_ENGINE.to_owned()),
            ("FASTSYNC_CORES", "abc", EXPECT_CORES.to_owned()),
            ("FASTSYNC_CORES", "0", EXPECT_CORES.to_owned()),
            ("FASTSYNC_CORES", "1025", EXPECT_CORES.to_owned()),
            ("FASTSYNC_MEMORY_PROFILE", "huge", EXPECT_PROFILE.to_owned()),
            ("FASTSYNC_MEMORY_LIMIT", "lots", EXPECT_SIZE.to_owned()),
            ("FASTSYNC_MEMORY_LIMIT", "0", EXPECT_SIZE_POSITIVE.to_owned()),
            ("FASTSYNC_FSYNC", "maybe", EXPECT_BOOL_ENV.to_owned()),
            ("FASTSYNC_VERIFY", "on", EXPECT_BOOL_ENV.to_owned()),
            ("FASTSYNC_DIRECT_IO", "2", EXPECT_BOOL_ENV.to_owned()),
        ];
        for (var, value, expected) in cases {
            assert_eq!(
                load_err(None, &[(var, value)]),
                format!("environment variable {var}: {expected}, got '{value}'"),
                "{var}={value}"
            );
        }
        assert_eq!(
            load_err(None, &[("FASTSYNC_CORES", "abc")]),
            "environment variable FASTSYNC_CORES: expected an integer from 1 to 1024, got 'abc'"
        );
    }

    #[test]
    fn env_not_utf8_is_an_error() {
        use std::os::unix::ffi::OsStringExt;
        let env = |k: &str| (k == "FASTSYNC_ENGINE").then(|| OsString::from_vec(vec![b'a', 0xff]));
        let err = Settings::load(None, &env, &Overrides::default()).unwrap_err();
        assert!(matches!(err, ConfigError::EnvValue { var: "FASTSYNC_ENGINE", .. }), "{err:?}");
    }

    #[test]
    fn out_of_range_flags_are_refused() {
        let flags = Overrides { cores: Some(0), ..Default::default() };
        assert_eq!(
            load_with(None, &[], &flags).unwrap_err().to_string(),
            "flag --cores: expected an integer from 1 to 1024, got 0"
        );
        let flags = Overrides { memory_limit: Some(0), ..Default::default() };
        assert!(matches!(load_with(None, &[], &flags), Err(ConfigError::FlagValue { flag: "--memory-limit", .. })));
    }

    #[test]
    fn bool_env_spellings() {
        for (text, want) in
            [("1", true), ("0", false), ("true", true), ("False", false), ("YES", true), ("no", false), (" yes ", true)]
        {
            let s = load_with(None, &[("FASTSYNC_DIRECT_IO", text)], &Overrides::default()).unwrap();
            assert_eq!(s.direct_io.value, want, "{text:?}");
        }
    }

    #[test]
    fn parse_size_table() {
        let good: [(&str, u64); 22] = [
            ("1048576", 1_048_576),
            ("1", 1),
            ("512B", 512),
            ("512 b", 512),
            ("1K", 1024),
            ("1k", 1024),
            ("1KB", 1024),
            ("1kib", 1024),
            ("1Ki", 1024),
            ("4M", 4 * MIB),
            ("4MiB", 4 * MIB),
            ("4 mb", 4 * MIB),
            ("1G", GIB),
            ("1.5G", GIB + GIB / 2),
            ("1.5GiB", GIB + GIB / 2),
            ("0.5K", 512),
            ("1.0009K", 1024),
            ("2T", 2 << 40),
            ("2TB", 2 << 40),
            (" 8g ", 8 * GIB),
            ("16777215T", 16_777_215 << 40),
            ("18446744073709551615", u64::MAX),
        ];
        for (text, want) in good {
            assert_eq!(parse_size(text), Ok(want), "{text:?}");
        }
        let bad: [(&str, &str); 18] = [
            ("", EXPECT_SIZE),
            ("K", EXPECT_SIZE),
            ("abc", EXPECT_SIZE),
            ("1X", EXPECT_SIZE),
            ("1KX", EXPECT_SIZE),
            ("1iB", EXPECT_SIZE),
            ("1P", EXPECT_SIZE),
            ("-1", EXPECT_SIZE),
            ("+1", EXPECT_SIZE),
            ("1.", EXPECT_SIZE),
            (".5K", EXPECT_SIZE),
            ("1.2.3K", EXPECT_SIZE),
            ("1e3", EXPECT_SIZE),
            ("0", EXPECT_SIZE_POSITIVE),
            ("0.0001K", EXPECT_SIZE_POSITIVE),
            ("0G", EXPECT_SIZE_POSITIVE),
            ("16777216T", "expected a size below 16 EiB"),
            ("18446744073709551616", "expected a size below 16 EiB"),
        ];
        for (text, want) in bad {
            assert_eq!(parse_size(text), Err(want.to_owned()), "{text:?}");
        }
    }

    #[test]
    fn format_size_round_trips() {
        for (bytes, text) in
            [(1000, "1000"), (1024, "1KiB"), (1536 * MIB, "1536MiB"), (GIB, "1GiB"), (3 << 40, "3TiB"), (0, "0")]
        {
            assert_eq!(format_size(bytes), text);
            if bytes > 0 {
                assert_eq!(parse_size(text), Ok(bytes));
            }
        }
    }

    #[test]
    fn memory_profiles() {
        let want = [
            (MemoryProfile::Low, "low-memory", 256 * MIB),
            (MemoryProfile::Default, "default", GIB),
            (MemoryProfile::High, "high-memory", 4 * GIB),
            (MemoryProfile::Max, "max-throughput", 8 * GIB),
        ];
        assert_eq!(MemoryProfile::ALL.len(), want.len());
        for (profile, name, limit) in want {
            assert_eq!(profile.name(), name);
            assert_eq!(profile.to_string(), name);
            assert_eq!(profile.limit_bytes(), limit);
            assert_eq!(name.parse::<MemoryProfile>(), Ok(profile));
            assert_eq!(name.to_uppercase().parse::<MemoryProfile>(), Ok(profile));
            // clap uses the same names.
            let clap_name = clap::ValueEnum::to_possible_value(&profile).unwrap();
            assert_eq!(clap_name.get_name(), name);
            assert!(EXPECT_PROFILE.contains(name));
        }
        assert_eq!(MemoryProfile::default(), MemoryProfile::Default);
        assert_eq!("low".parse::<MemoryProfile>(), Err(EXPECT_PROFILE.to_owned()));
    }

    #[test]
    fn engine_names_match_clap() {
        for &engine in <EngineChoice as clap::ValueEnum>::value_variants() {
            let name = engine_name(engine);
            assert_eq!(clap::ValueEnum::to_possible_value(&engine).unwrap().get_name(), name);
            assert_eq!(parse_engine(name), Some(engine));
            assert!(EXPECT_ENGINE.contains(name));
        }
    }

    #[test]
    fn memory_limit_bytes_falls_back_to_profile() {
        let s = load_with(None, &[("FASTSYNC_MEMORY_PROFILE", "low-memory")], &Overrides::default()).unwrap();
        assert_eq!(s.memory_limit_bytes(), 256 * MIB);
        let s = load_with(
            None,
            &[("FASTSYNC_MEMORY_PROFILE", "low-memory"), ("FASTSYNC_MEMORY_LIMIT", "3G")],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(s.memory_limit_bytes(), 3 * GIB);
    }

    #[test]
    fn source_display() {
        assert_eq!(Source::Default.to_string(), "default");
        assert_eq!(Source::File(PathBuf::from("/x/config.toml")).to_string(), "file /x/config.toml");
        assert_eq!(Source::Env("FASTSYNC_CORES").to_string(), "env FASTSYNC_CORES");
        assert_eq!(Source::Flag("--cores").to_string(), "flag --cores");
    }

    #[test]
    fn render_defaults() {
        let s = Settings::defaults();
        assert_eq!(
            s.render(),
            "engine         = \"auto\"           # default\n\
             # cores        = (all available)  # default\n\
             memory_profile = \"default\"        # default\n\
             memory_limit   = \"1GiB\"           # limit of memory_profile (default)\n\
             fsync          = false            # default\n\
             verify         = false            # default\n\
             direct_io      = true             # default\n"
        );
    }

    #[test]
    fn render_layered() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "config.toml", "cores = 16\nfsync = true\n");
        let flags = Overrides { memory_profile: Some(MemoryProfile::High), verify: true, ..Default::default() };
        let s = load_with(Some(&file), &[("FASTSYNC_ENGINE", "fallback")], &flags).unwrap();
        let text = s.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), KEYS.len());
        assert_eq!(lines[0], "engine         = \"fallback\"     # env FASTSYNC_ENGINE");
        assert_eq!(lines[1], format!("cores          = 16             # file {}", file.shown()));
        assert_eq!(lines[2], "memory_profile = \"high-memory\"  # flag --memory-profile");
        assert_eq!(lines[3], "memory_limit   = \"4GiB\"         # limit of memory_profile (flag --memory-profile)");
        assert_eq!(lines[4], format!("fsync          = true           # file {}", file.shown()));
        assert_eq!(lines[5], "verify         = true           # flag --verify");
        // Odd sizes stay integers.
        let s = load_with(None, &[("FASTSYNC_MEMORY_LIMIT", "1000")], &Overrides::default()).unwrap();
        assert!(s.render().contains("memory_limit   = 1000  "), "{}", s.render());
        // The lines that set values are valid TOML that loads back to the same values.
        let back = write(dir.path(), "back.toml", &text);
        let again = load_with(Some(&back), &[], &Overrides::default()).unwrap();
        assert_eq!(again.engine.value, EngineChoice::Fallback);
        assert_eq!(again.cores.value, Some(16));
        assert_eq!(again.memory_profile.value, MemoryProfile::High);
        assert_eq!(again.memory_limit.value, Some(4 * GIB));
        assert!(again.fsync.value && again.verify.value && again.direct_io.value);
    }

    #[test]
    fn json_contents() {
        let s = Settings::defaults();
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["file"], serde_json::Value::Null);
        assert_eq!(v["settings"]["engine"], serde_json::json!({"value": "auto", "source": "default"}));
        assert_eq!(v["settings"]["cores"], serde_json::json!({"value": null, "source": "default"}));
        assert_eq!(
            v["settings"]["memory_limit"],
            serde_json::json!({"value": null, "source": "default", "effective": GIB})
        );
        let keys: Vec<&String> = v["settings"].as_object().unwrap().keys().collect();
        let mut want: Vec<&str> = KEYS.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want);

        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "config.toml", "cores = 3\n");
        let flags = Overrides { memory_limit: Some(2 * GIB), direct_io: Some(true), ..Default::default() };
        let env = [("FASTSYNC_MEMORY_PROFILE", "max-throughput")];
        let s = load_with(Some(&file), &env, &flags).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        let file_label = format!("file {}", file.shown());
        assert_eq!(v["file"], serde_json::json!(file.shown().to_string()));
        assert_eq!(v["settings"]["cores"], serde_json::json!({"value": 3, "source": file_label}));
        assert_eq!(
            v["settings"]["memory_profile"],
            serde_json::json!({"value": "max-throughput", "source": "env FASTSYNC_MEMORY_PROFILE"})
        );
        assert_eq!(
            v["settings"]["memory_limit"],
            serde_json::json!({"value": 2 * GIB, "source": "flag --memory-limit", "effective": 2 * GIB})
        );
        assert_eq!(v["settings"]["direct_io"], serde_json::json!({"value": true, "source": "flag --direct-io"}));
        assert_eq!(v["settings"]["fsync"], serde_json::json!({"value": false, "source": "default"}));
        assert!(!s.to_json().contains('\n'));
    }
}
