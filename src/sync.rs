//! What `sync` adds to `copy`: deciding which files differ, itemizing changes, and deleting extraneous entries.
//!
//! Deletion runs only after every transfer of the run succeeded (rsync's `--delete-after`), walks the destination
//! without ever following a symlink, never leaves it, keeps entries that the filters exclude (like rsync without
//! `--delete-excluded`), and honours `--max-delete` by counting first and deleting nothing when the count is over.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, Metadata};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use fastsync_engine::Show;

use crate::filter::{Decision, Filter};
use crate::stale;

/// How files present on both sides are compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compare {
    /// Same size and same modification time (to the nanosecond) means unchanged (rsync's default quick check).
    SizeAndTime,
    /// Same size and same BLAKE3 digest (rsync's `--checksum`).
    Checksum,
    /// Same size means unchanged.
    SizeOnly,
}

/// The options of `sync` (absent for `copy`, which always copies).
#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub compare: Compare,
    /// Never touch a file that exists in the destination.
    pub ignore_existing: bool,
    /// Skip files whose destination is newer than the source.
    pub update: bool,
    /// Remove destination entries absent from the source, after every transfer succeeded.
    pub delete: bool,
    /// Delete nothing (and fail) when more than this many entries would be deleted.
    pub max_delete: Option<u64>,
}

/// Size and modification time of one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    pub size: u64,
    pub mtime: (i64, i64),
}

impl Facts {
    pub fn of(md: &Metadata) -> Facts {
        Facts { size: md.size(), mtime: (md.mtime(), md.mtime_nsec()) }
    }

    pub fn of_stat(st: &crate::meta::Stat) -> Facts {
        Facts { size: st.size, mtime: st.mtime }
    }
}

/// What to do with a regular file present on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Transfer,
    /// Same content: leave the data, fix permissions, owner and times if they differ.
    Unchanged,
    /// Left alone entirely (`--ignore-existing`, or `--update` with a newer destination), as rsync does.
    Skip,
    /// Sizes agree: hash both sides to decide.
    CompareDigests,
}

/// Decide for a file that exists on both sides.
pub fn verdict(opts: &SyncOptions, src: Facts, dst: Facts) -> Verdict {
    if opts.ignore_existing || (opts.update && dst.mtime > src.mtime) {
        return Verdict::Skip;
    }
    match opts.compare {
        _ if src.size != dst.size => Verdict::Transfer,
        Compare::SizeOnly => Verdict::Unchanged,
        Compare::Checksum => Verdict::CompareDigests,
        Compare::SizeAndTime if src.mtime == dst.mtime => Verdict::Unchanged,
        Compare::SizeAndTime => Verdict::Transfer,
    }
}

/// Kinds of change, as itemized (`-i`, and always with `--dry-run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A new entry.
    Copy,
    /// An existing file replaced by a new version.
    Update,
    /// A new directory.
    Mkdir,
    /// Only permissions, owner or times were fixed.
    Attrs,
    Delete,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::Copy => "copy",
            Change::Update => "update",
            Change::Mkdir => "mkdir",
            Change::Attrs => "attrs",
            Change::Delete => "delete",
        }
    }
}

/// Prints one line per change on stdout: `ACTION PATH` (the path relative to the destination), or one JSON object
/// per line with `--json`.
pub struct Itemizer {
    pub enabled: bool,
    pub json: bool,
}

impl Itemizer {
    pub fn item(&self, change: Change, rel: &Path, is_dir: bool) {
        if !self.enabled {
            return;
        }
        let mut out = io::stdout().lock();
        // A closed stdout (`| head`) must not fail the run.
        let _ = if self.json {
            let path = String::from_utf8_lossy(rel.as_os_str().as_bytes());
            writeln!(out, "{}", serde_json::json!({ "item": change.name(), "path": path, "dir": is_dir }))
        } else {
            let slash = if is_dir { "/" } else { "" };
            out.write_all(format!("{:<7}", change.name()).as_bytes())
                .and_then(|()| writeln!(out, "{}{slash}", rel.shown()))
        };
    }
}

/// The relative path of `name` inside `rel` ('' at the top).
pub fn child_rel(rel: &Path, name: &OsStr) -> PathBuf {
    if rel.as_os_str().is_empty() { PathBuf::from(name) } else { rel.join(name) }
}

/// Whether the filters exclude `rel`.
pub fn excluded(filter: &Filter, rel: &Path, is_dir: bool) -> bool {
    !filter.is_empty() && filter.decide(rel.as_os_str().as_bytes(), is_dir) == Decision::Exclude
}

/// The outcome of the deletion pass.
#[derive(Debug, Default)]
pub struct Deleted {
    pub entries: u64,
    pub failures: Vec<String>,
}

/// Settings of the deletion pass.
pub struct DeletePass<'a> {
    pub src_root: &'a Path,
    pub dst_root: &'a Path,
    /// The directories (relative paths) where the walk found more destination entries than source twins: only
    /// they can hold extraneous entries, so a sync with nothing to delete reads no directory twice.
    pub dirs: &'a [PathBuf],
    pub follow_symlinks: bool,
    pub filter: &'a Filter,
    pub dry_run: bool,
    pub max_delete: Option<u64>,
    pub itemizer: &'a Itemizer,
}

impl DeletePass<'_> {
    /// Delete (or with `dry_run` list) every destination entry absent from the source. With `max_delete`, count
    /// first: when more would go, nothing is deleted and the error says how many.
    pub fn run(&self) -> Result<Deleted, String> {
        if let Some(max) = self.max_delete {
            let mut count = 0;
            self.walk(&mut |_, _, _| {
                count += 1;
                Ok(())
            })?;
            if count > max {
                return Err(format!(
                    "--max-delete {max}: {count} entries would be deleted from '{}'; nothing was deleted",
                    self.dst_root.shown()
                ));
            }
        }
        let mut deleted = Deleted::default();
        self.walk(&mut |path, rel, is_dir| {
            self.itemizer.item(Change::Delete, rel, is_dir);
            if self.dry_run {
                deleted.entries += 1;
                return Ok(());
            }
            let r = if is_dir { fs::remove_dir(path) } else { fs::remove_file(path) };
            match r {
                Ok(()) => {
                    deleted.entries += 1;
                    self.restore_parent_times(rel);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => deleted.failures.push(format!("cannot delete '{}': {e}", path.shown())),
            }
            Ok(())
        })?;
        Ok(deleted)
    }

    /// A deletion changed its directory's times: give them back the source directory's (when it has a twin there).
    fn restore_parent_times(&self, rel: &Path) {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let Ok(md) = fs::metadata(self.src_root.join(parent)) else { return };
        if !md.is_dir() {
            return;
        }
        let spec = fastsync_engine::FinishSpec { times: Some(crate::meta::times(&md)), ..Default::default() };
        let _ = crate::meta::apply_by_path(&self.dst_root.join(parent), &spec, false);
    }

    /// Visit every extraneous entry, children before their directory (so directories are empty when visited).
    fn walk(&self, visit: &mut dyn FnMut(&Path, &Path, bool) -> Result<(), String>) -> Result<(), String> {
        // (destination dir, source dir, relative path); source is None inside an extraneous directory.
        let mut stack: Vec<(PathBuf, Option<PathBuf>, PathBuf)> =
            self.dirs.iter().map(|rel| (self.dst_root.join(rel), Some(self.src_root.join(rel)), rel.clone())).collect();
        // Extraneous directories whose contents are being visited; each is visited itself after them.
        let mut pending_dirs: Vec<(PathBuf, PathBuf, usize)> = Vec::new();
        while let Some((dst_dir, src_dir, rel)) = stack.pop() {
            // The source directory's names and whether each is a directory: one getdents pass instead of a stat
            // per destination entry (`None` inside an extraneous directory: everything there goes).
            let src_names = match &src_dir {
                // A source directory that vanished since the walk: delete nothing there (the next run decides).
                Some(src_dir) if !src_dir.is_dir() => continue,
                Some(src_dir) => Some(self.names(src_dir)?),
                None => None,
            };
            let entries =
                fs::read_dir(&dst_dir).map_err(|e| format!("cannot read directory '{}': {e}", dst_dir.shown()))?;
            for entry in entries {
                let entry = entry.map_err(|e| format!("cannot read directory '{}': {e}", dst_dir.shown()))?;
                let name = entry.file_name();
                if stale::is_temporary(&name) {
                    continue;
                }
                // DirEntry::file_type never follows a symlink: a link to a directory is deleted as a link.
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                let child_rel = child_rel(&rel, &name);
                let dst_path = entry.path();
                match &src_names {
                    Some(names) => {
                        // Present on both sides: a subdirectory with extraneous entries is in `dirs` itself, and a
                        // type change was handled by the transfer.
                        if excluded(self.filter, &child_rel, is_dir) || names.contains_key(&name) {
                            continue;
                        }
                        self.extraneous(dst_path, child_rel, is_dir, &mut stack, &mut pending_dirs, visit)?
                    }
                    None => self.extraneous(dst_path, child_rel, is_dir, &mut stack, &mut pending_dirs, visit)?,
                }
            }
            // Directories whose whole subtree has been visited (nothing of theirs left on the stack) come next.
            while let Some((_, _, depth)) = pending_dirs.last() {
                if stack.len() > *depth {
                    break;
                }
                let (path, rel, _) = pending_dirs.pop().expect("checked");
                visit(&path, &rel, true)?;
            }
        }
        Ok(())
    }

    /// The names in source directory `dir`, each with whether it is a directory (followed through symlinks with
    /// `-L`). Memory: one directory's names at a time.
    fn names(&self, dir: &Path) -> Result<HashMap<OsString, bool>, String> {
        let read_err = |e: io::Error| format!("cannot read directory '{}': {e}", dir.shown());
        let mut names = HashMap::new();
        for entry in fs::read_dir(dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let ft = entry.file_type().map_err(read_err)?;
            let is_dir = if ft.is_symlink() && self.follow_symlinks {
                fs::metadata(entry.path()).is_ok_and(|m| m.is_dir())
            } else {
                ft.is_dir()
            };
            names.insert(entry.file_name(), is_dir);
        }
        Ok(names)
    }

    fn extraneous(
        &self,
        path: PathBuf,
        rel: PathBuf,
        is_dir: bool,
        stack: &mut Vec<(PathBuf, Option<PathBuf>, PathBuf)>,
        pending_dirs: &mut Vec<(PathBuf, PathBuf, usize)>,
        visit: &mut dyn FnMut(&Path, &Path, bool) -> Result<(), String>,
    ) -> Result<(), String> {
        if !is_dir {
            return visit(&path, &rel, false);
        }
        pending_dirs.push((path.clone(), rel.clone(), stack.len()));
        stack.push((path, None, rel));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(compare: Compare) -> SyncOptions {
        SyncOptions { compare, ignore_existing: false, update: false, delete: false, max_delete: None }
    }

    const A: Facts = Facts { size: 10, mtime: (100, 5) };

    #[test]
    fn quick_check_compares_size_and_nanosecond_mtime() {
        let o = opts(Compare::SizeAndTime);
        assert_eq!(verdict(&o, A, A), Verdict::Unchanged);
        assert_eq!(verdict(&o, A, Facts { mtime: (100, 6), ..A }), Verdict::Transfer);
        assert_eq!(verdict(&o, A, Facts { size: 11, ..A }), Verdict::Transfer);
    }

    #[test]
    fn size_only_checksum_update_ignore_existing() {
        let newer = Facts { mtime: (200, 0), ..A };
        assert_eq!(verdict(&opts(Compare::SizeOnly), A, newer), Verdict::Unchanged);
        assert_eq!(verdict(&opts(Compare::SizeOnly), A, Facts { size: 1, ..A }), Verdict::Transfer);
        assert_eq!(verdict(&opts(Compare::Checksum), A, newer), Verdict::CompareDigests);
        assert_eq!(verdict(&opts(Compare::Checksum), A, Facts { size: 1, ..A }), Verdict::Transfer);
        let update = SyncOptions { update: true, ..opts(Compare::SizeAndTime) };
        assert_eq!(verdict(&update, A, newer), Verdict::Skip);
        assert_eq!(verdict(&update, newer, Facts { size: 3, ..A }), Verdict::Transfer);
        let ignore = SyncOptions { ignore_existing: true, ..opts(Compare::SizeAndTime) };
        assert_eq!(verdict(&ignore, A, Facts { size: 3, ..A }), Verdict::Skip);
    }
}
