//! A push's look-ahead of destination listings: `sync` (or `-i`) to a `fastsync://` destination compares each source
//! directory with its remote twin, and asking for the twin's listing when the walk enters the directory costs one
//! round trip per directory while both sides wait. A helper thread with a connection of its own asks for the
//! listings of the next directories the walk will enter (remote twins known to be directories, in the walk's order),
//! so that they are there when the walk needs them. At most [`LISTINGS_AHEAD_MAX`] are asked for or waiting; a
//! listing that fails here is asked for again on the control connection, which reports what goes wrong.

use super::*;

/// Listings asked for or received and not yet used, at most (each is one directory's entries).
pub(super) const LISTINGS_AHEAD_MAX: usize = 32;
/// Of those, at most this many for the subdirectories of one directory.
pub(super) const LISTINGS_AHEAD_PER_DIR: usize = 4;
/// Helper threads (and connections): a listing is a round trip and the server's directory read, so two overlap
/// them.
const LIST_THREADS: usize = 2;

/// A directory's entries, and the error that ended its listing early, if any (as the control connection reads them).
pub(super) type Listing = (Vec<EntryMeta>, Option<ReqError>);

/// Read the whole listing of directory `path` on `conn`: the entries, and a server error that ended it (a broken
/// connection is the `Err`).
pub(super) fn read_listing(conn: &mut Connection, path: &[u8]) -> Result<Listing, ReqError> {
    let mut stream = conn.list(path, false)?;
    let (mut entries, mut failed) = (Vec::new(), None);
    while let Some(r) = stream.next_entry() {
        match r {
            Ok(e) => entries.push(e),
            Err(ReqError::Broken(m)) => return Err(ReqError::Broken(m)),
            Err(e) => failed = Some(e),
        }
    }
    Ok((entries, failed))
}

pub(super) struct ListAhead {
    tx: Sender<Vec<u8>>,
    rx: Receiver<(Vec<u8>, Option<Listing>)>,
    /// Asked for, not yet received.
    asked: HashSet<Vec<u8>>,
    /// Received, not yet taken.
    ready: HashMap<Vec<u8>, Option<Listing>>,
    /// Whether any helper thread could be started. They are never joined: dropping the channels ends each after the
    /// listing it is reading (it finds its queue closed, or nobody to answer), and a run that stops (Ctrl-C, a broken
    /// server) must not wait on a dial or a listing it no longer needs.
    started: bool,
}

impl ListAhead {
    /// The helper threads, each of which dials its connection when first asked.
    pub(super) fn start(dialer: Arc<Dialer>) -> ListAhead {
        let (tx, paths) = bounded::<Vec<u8>>(LISTINGS_AHEAD_MAX);
        let (results, rx) = bounded(LISTINGS_AHEAD_MAX);
        let mut started = false;
        for i in 0..LIST_THREADS {
            let (paths, results, dialer) = (paths.clone(), results.clone(), dialer.clone());
            let thread = std::thread::Builder::new().name(format!("fs-list-ahead-{i}")).spawn(move || {
                let mut conn: Option<Connection> = None;
                for path in paths {
                    if conn.is_none() {
                        conn = dialer.dial().ok();
                    }
                    // Anything but a whole listing is left to the control connection (`None`).
                    let listing = conn.as_mut().and_then(|c| read_listing(c, &path).ok());
                    if listing.is_none() {
                        conn = None;
                    }
                    if results.send((path, listing)).is_err() {
                        break;
                    }
                }
                if let Some(c) = conn {
                    c.bye();
                }
            });
            started |= thread.is_ok();
        }
        ListAhead { tx, rx, asked: HashSet::new(), ready: HashMap::new(), started }
    }

    /// Whether another listing may be asked for now.
    pub(super) fn has_room(&self) -> bool {
        self.started && self.asked.len() + self.ready.len() < LISTINGS_AHEAD_MAX
    }

    /// Ask for the listing of directory `path` (a wire path), if there is room.
    pub(super) fn ask(&mut self, path: Vec<u8>) {
        if !self.has_room() || self.asked.contains(&path) || self.ready.contains_key(&path) {
            return;
        }
        if self.tx.try_send(path.clone()).is_ok() {
            self.asked.insert(path);
        }
    }

    /// The listing of `path` when it was asked for (waiting for it if need be); `None` when it was not, or when the
    /// helper could not read it whole (the caller then asks on the control connection).
    pub(super) fn take(&mut self, path: &[u8]) -> Option<Listing> {
        if let Some(l) = self.ready.remove(path) {
            return l;
        }
        if !self.asked.contains(path) {
            return None;
        }
        while let Ok((p, l)) = self.rx.recv() {
            self.asked.remove(&p);
            if p == path {
                return l;
            }
            self.ready.insert(p, l);
        }
        None
    }
}
