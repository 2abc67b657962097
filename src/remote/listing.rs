//! `fastsync list fastsync://HOST/PATH`: a remote directory listed like a local one, one directory at a time.

use super::*;

/// `fastsync list fastsync://host/path`: the same lines as a local listing, one directory's entries at a time
/// (each directory is listed on its own and sorted by name, so the order is the local one whatever the server's).
pub fn list(args: &ListArgs, json: bool, net: &NetOptions) -> Result<i32, Failure> {
    let net = &net.with_env()?;
    let remote = parse_url(&args.path)?;
    let shown = remote.display(b"");
    let key = load_key(net, &shown)?;
    let mut conn = connect(&remote.addr, &key, net)?;
    let stat = |conn: &mut Connection, path: &[u8]| match conn.stat(path) {
        Ok(Some(e)) => Ok(e),
        Ok(None) => Err(Failure::Fatal(format!("cannot stat '{shown}': No such file or directory"))),
        Err(ReqError::Broken(m)) => Err(Failure::Fatal(m)),
        Err(ReqError::Server { message, .. }) => Err(Failure::Fatal(format!("cannot stat '{shown}': {message}"))),
    };
    let mut path = remote.path.clone();
    let mut root = stat(&mut conn, &path)?;
    // `PATH/` names what a symlink there points to, as for ls: followed here one link at a time, each new path
    // resolved by the server beneath its root like any other (it never follows a symlink itself).
    let mut hops = 0;
    while remote.trailing_slash && root.kind == EntryKind::Symlink {
        hops += 1;
        path = match link_target(&path, &root.target) {
            Some(p) if hops <= SYMLINK_HOPS_MAX => p,
            Some(_) => return Err(Failure::Fatal(format!("cannot stat '{shown}': Too many levels of symbolic links"))),
            None => {
                let why = "the symlink leads outside the served root (not followed)";
                return Err(Failure::Fatal(format!("cannot stat '{shown}': {why}")));
            }
        };
        root = stat(&mut conn, &path)?;
    }
    let mut l = RemoteLister {
        conn: &mut conn,
        addr: remote.addr.clone(),
        out: BufWriter::with_capacity(64 << 10, io::stdout().lock()),
        human: args.human_readable,
        json,
        checksum: args.checksum,
        base: path.clone(),
        single: root.kind != EntryKind::Dir,
        errors: 0,
    };
    let r = l.run(&path, root, args.recursive);
    let errors = l.errors;
    let flushed = l.out.flush();
    drop(l);
    conn.bye();
    match r.and(flushed.map_err(Halt::Write)) {
        Ok(()) => Ok(if errors > 0 { exit::PARTIAL } else { exit::OK }),
        Err(Halt::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(exit::PARTIAL),
        Err(Halt::Write(e)) => Err(Failure::Fatal(format!("error writing 'standard output': {e}"))),
        Err(Halt::Broken(m)) => Err(Failure::Fatal(m)),
    }
}

/// Symlinks followed at most in a row (as Linux's `ELOOP` limit).
const SYMLINK_HOPS_MAX: usize = 40;

/// The wire path a symlink at wire path `link` with `target` points to; `None` when it leads outside the served root
/// (an absolute target, or more `..` than there are directories above it).
fn link_target(link: &[u8], target: &[u8]) -> Option<Vec<u8>> {
    if target.starts_with(b"/") {
        return None;
    }
    let mut parts: Vec<&[u8]> = link.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
    parts.pop();
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join(&b'/'))
}

enum Halt {
    Write(io::Error),
    Broken(String),
}

struct RemoteLister<'c, W: Write> {
    conn: &'c mut Connection,
    addr: String,
    out: W,
    human: bool,
    json: bool,
    /// `--checksum`: the server hashes each regular file (between listings the connection is free).
    checksum: bool,
    /// Wire path listed (a file's path on the server is this joined with its relative path).
    base: Vec<u8>,
    /// The listed path is a file, not a directory.
    single: bool,
    errors: u64,
}

impl<W: Write> RemoteLister<'_, W> {
    pub(super) fn run(&mut self, path: &[u8], root: EntryMeta, recursive: bool) -> Result<(), Halt> {
        if root.kind != EntryKind::Dir {
            let name = if path.is_empty() { path } else { url::file_name(path) };
            return self.line(name, &root);
        }
        let Some(entries) = self.read_dir(path)? else { return Ok(()) };
        let mut stack: Vec<(Vec<u8>, std::vec::IntoIter<EntryMeta>)> = vec![(Vec::new(), entries.into_iter())];
        while let Some((dir_rel, entries)) = stack.last_mut() {
            let Some(e) = entries.next() else {
                stack.pop();
                continue;
            };
            let rel = join(dir_rel, &e.path);
            self.line(&rel, &e)?;
            if recursive
                && e.kind == EntryKind::Dir
                && let Some(sub) = self.read_dir(&join(path, &rel))?
            {
                stack.push((rel, sub.into_iter()));
            }
        }
        Ok(())
    }

    /// The entries of remote directory `path`, sorted by name; `None` (reported) when it cannot be listed.
    fn read_dir(&mut self, path: &[u8]) -> Result<Option<Vec<EntryMeta>>, Halt> {
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        let mut stream = self.conn.list(path, false).map_err(|e| Halt::Broken(e.to_string()))?;
        let mut listed = true;
        while let Some(r) = stream.next_entry() {
            match r {
                Ok(e) if safe_components(&e.path).is_ok_and(|c| c.len() == 1) => entries.push(e),
                Ok(e) => errors.push(format!("refused entry '{}' listed by {}: not a name", e.path.shown(), self.addr)),
                Err(ReqError::Broken(m)) => return Err(Halt::Broken(m)),
                Err(ReqError::Server { message, .. }) => {
                    errors.push(format!("cannot read directory '{}': {message}", url_of(&self.addr, path)));
                    listed = false;
                }
            }
        }
        for e in errors {
            self.error(&e)?;
        }
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        Ok(listed.then_some(entries))
    }

    fn error(&mut self, msg: &str) -> Result<(), Halt> {
        self.errors += 1;
        self.out.flush().map_err(Halt::Write)?;
        eprintln!("fastsync: {msg}");
        Ok(())
    }

    fn line(&mut self, rel: &[u8], e: &EntryMeta) -> Result<(), Halt> {
        let kind = match e.kind {
            EntryKind::File => list::Kind::File,
            EntryKind::Dir => list::Kind::Dir,
            EntryKind::Symlink => list::Kind::Symlink,
            EntryKind::Other => list::Kind::Other,
        };
        let entry = list::Entry {
            rel: url::os_path(rel).to_path_buf(),
            kind,
            mode: e.mode,
            size: e.size,
            mtime_sec: e.mtime_sec,
            mtime_nsec: i64::from(e.mtime_nsec),
            target: (e.kind == EntryKind::Symlink).then(|| url::os_path(&e.target).to_path_buf()),
        };
        let mut failed = None;
        let digest = self.checksum.then(|| match e.kind {
            EntryKind::File => {
                // A listed file is the listed path itself; a directory's entries lie beneath it.
                let path = if self.single { self.base.clone() } else { join(&self.base, rel) };
                match self.conn.hash(&path, 0, u64::MAX) {
                    Ok((d, _)) => Ok(list::Digest::Done(d)),
                    Err(ReqError::Broken(m)) => Err(Halt::Broken(m)),
                    Err(ReqError::Server { message, .. }) => {
                        failed =
                            Some(format!("cannot compute the checksum of '{}': {message}", url_of(&self.addr, &path)));
                        Ok(list::Digest::Failed(message))
                    }
                }
            }
            _ => Ok(list::Digest::NotHashed),
        });
        let digest = digest.transpose()?;
        self.out.write_all(&list::entry_line(&entry, self.human, self.json, digest.as_ref())).map_err(Halt::Write)?;
        if let Some(m) = failed {
            self.error(&m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlink_targets_resolve_beneath_the_root_or_not_at_all() {
        assert_eq!(link_target(b"a/ld", b"d"), Some(b"a/d".to_vec()));
        assert_eq!(link_target(b"ld", b"d/inner/"), Some(b"d/inner".to_vec()));
        assert_eq!(link_target(b"a/b/l", b"../c/./d"), Some(b"a/c/d".to_vec()));
        assert_eq!(link_target(b"a/l", b".."), Some(Vec::new()), "the root itself");
        assert_eq!(link_target(b"a/l", b"../.."), None, "above the root");
        assert_eq!(link_target(b"l", b"/etc"), None, "absolute");
    }
}
