//! What push and pull do as their workers report: count finished files, settle the directories whose contents are
//! all done, and (`-H`) give an inode's other names once its first name is in place — one bookkeeping, over each
//! direction's own kind of name (a wire path for a push, a local directory and name for a pull) and directory.

use super::*;

/// `-H`: what became of an inode with several names (a push keys it by the local (dev, ino), a pull by the server's).
pub(super) enum LinkState<T> {
    /// Its first name is being transferred; these names wait for it: (their destination, their parent node).
    Pending { first: T, waiters: Vec<(T, Option<usize>)> },
    /// Its first name is in place: later names are linked to it.
    Done(T),
    /// Its first name failed: later names fail too (they would only be its copies).
    Failed(T),
}

/// The bookkeeping side of a transfer. Contract: `dirs` counts, for each directory node, the entries still in
/// flight in it ([`Dirs::add`] for every name that waits, [`Tally::file_done`] once for every name that ends);
/// [`Tally::finish_dirs`] gets each directory once, after everything in it; `link` and `shown` never fail the run
/// themselves (a failed link is reported as that name's failure).
pub(super) trait Tally<'a> {
    /// A destination name.
    type Name: Clone;
    /// A directory node's payload: what to do when it is finished.
    type Dir;

    fn run(&mut self) -> &mut Run<'a>;
    fn links(&mut self) -> &mut HashMap<(u64, u64), LinkState<Self::Name>>;
    fn dirs(&mut self) -> &mut Dirs<Self::Dir>;
    /// Apply what the directories whose contents are all done need (their metadata).
    fn finish_dirs(&mut self, finished: Vec<Self::Dir>);
    /// `-H`: make `me` another name of `first`, which is in place (or count it, in a dry run).
    fn link(&mut self, me: &Self::Name, first: &Self::Name);
    /// How a name is shown in a message.
    fn shown(&self, name: &Self::Name) -> String;

    /// `-H`: what to do with name `me` in directory node `dir` of inode `key` (`None`: not multiply linked, or no
    /// `-H`). True when it is to be transferred: it is the first name (recorded as pending; in a dry run as done,
    /// since nothing will complete). Otherwise it was dealt with: linked to its first name, failed with it, or
    /// waiting for it (counted in `dir`).
    fn transfer_first(&mut self, key: Option<(u64, u64)>, me: &Self::Name, dir: Option<usize>) -> bool {
        let Some(key) = key else { return true };
        let dry_run = self.run().opts.dry_run;
        let first = match self.links().get_mut(&key) {
            None => {
                let first = me.clone();
                let state =
                    if dry_run { LinkState::Done(first) } else { LinkState::Pending { first, waiters: vec![] } };
                self.links().insert(key, state);
                return true;
            }
            Some(LinkState::Pending { waiters, .. }) => {
                waiters.push((me.clone(), dir));
                self.dirs().add(dir);
                return false;
            }
            Some(LinkState::Done(first)) => Ok(first.clone()),
            Some(LinkState::Failed(first)) => Err(first.clone()),
        };
        match first {
            Ok(first) => self.link(me, &first),
            Err(first) => self.link_failed(me, &first),
        }
        false
    }

    /// `-H`: the first name of inode `key` failed, so `me` cannot be linked to it.
    fn link_failed(&mut self, me: &Self::Name, first: &Self::Name) {
        let (me, first) = (self.shown(me), self.shown(first));
        self.run().fail(format!("cannot link '{me}': its first name '{first}' was not copied"));
    }

    /// A name of an inode that is already in place (an unchanged file): its other names link to it.
    fn in_place(&mut self, key: (u64, u64), me: Self::Name) {
        self.links().entry(key).or_insert_with(|| LinkState::Done(me));
    }

    /// What a worker reported.
    fn on_done(&mut self, d: Done) {
        match d {
            Done::Bytes(n) => {
                let run = self.run();
                run.summary.bytes += n;
                run.progress.inc(n);
            }
            Done::File { dir, link, result } => {
                let ok = result.is_ok();
                match result {
                    Ok(retried) => self.run().summary.retried += u64::from(retried),
                    Err(m) => self.run().fail(m),
                }
                self.file_done(dir, ok);
                let Some(state) = link.and_then(|key| self.links().get_mut(&key)) else { return };
                let LinkState::Pending { first, waiters } = state else { return };
                let (first, waiters) = (first.clone(), std::mem::take(waiters));
                *state = if ok { LinkState::Done(first.clone()) } else { LinkState::Failed(first.clone()) };
                for (me, dir) in waiters {
                    if ok {
                        self.link(&me, &first);
                    } else {
                        self.link_failed(&me, &first);
                    }
                    self.file_done(dir, false);
                }
            }
            Done::Warn(m) => self.run().warn(&m),
            Done::Broken(m) => self.run().broken(m),
            Done::Note(m) => self.run().note(&m),
        }
    }

    /// A name in directory node `dir` has ended (`ok`: a file was transferred, and counts as one): the directories
    /// it completes are finished.
    fn file_done(&mut self, dir: Option<usize>, ok: bool) {
        if ok {
            let run = self.run();
            run.summary.files += 1;
            run.progress.file_done();
        }
        let mut finished = Vec::new();
        self.dirs().done(dir, &mut finished);
        self.finish_dirs(finished);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transfer whose names are strings, recording the links it makes and the directories it finishes.
    struct Book<'a> {
        run: Run<'a>,
        links: HashMap<(u64, u64), LinkState<String>>,
        dirs: Dirs<&'static str>,
        linked: Vec<(String, String)>,
        finished: Vec<&'static str>,
    }

    impl<'a> Tally<'a> for Book<'a> {
        type Name = String;
        type Dir = &'static str;

        fn run(&mut self) -> &mut Run<'a> {
            &mut self.run
        }

        fn links(&mut self) -> &mut HashMap<(u64, u64), LinkState<String>> {
            &mut self.links
        }

        fn dirs(&mut self) -> &mut Dirs<&'static str> {
            &mut self.dirs
        }

        fn finish_dirs(&mut self, finished: Vec<&'static str>) {
            self.finished.extend(finished);
        }

        fn link(&mut self, me: &String, first: &String) {
            self.run.summary.hardlinks += 1;
            self.linked.push((me.clone(), first.clone()));
        }

        fn shown(&self, name: &String) -> String {
            format!("dst/{name}")
        }
    }

    fn book(opts: &CopyOptions) -> Book<'_> {
        Book { run: Run::new(opts, 1), links: HashMap::new(), dirs: Dirs::new(), linked: vec![], finished: vec![] }
    }

    /// A file the caller hands to a worker: counted in its directory until it is done.
    fn send(b: &mut Book<'_>, key: (u64, u64), name: &str, dir: usize) -> bool {
        let first = b.transfer_first(Some(key), &name.to_string(), Some(dir));
        if first {
            b.dirs.add(Some(dir));
        }
        first
    }

    fn file(dir: usize, key: (u64, u64), result: Result<u8, String>) -> Done {
        Done::File { dir: Some(dir), link: Some(key), result }
    }

    #[test]
    fn other_names_wait_for_the_first_then_are_linked_or_fail_with_it() {
        let opts = CopyOptions { quiet: true, ..Default::default() };
        let mut b = book(&opts);
        let d = b.dirs.open(None, "d");
        let (one, two) = ((1, 1), (2, 2));
        assert!(send(&mut b, one, "a", d), "the first name is transferred");
        assert!(!send(&mut b, one, "a2", d), "a later name waits");
        assert!(send(&mut b, two, "b", d));
        assert!(!send(&mut b, two, "b2", d));
        assert!(b.transfer_first(None, &"plain".to_string(), Some(d)), "not multiply linked: transferred");
        let mut out = vec![];
        b.dirs.walked(d, &mut out);
        assert!(out.is_empty(), "four names still pending in d");

        b.on_done(file(d, one, Ok(1)));
        assert_eq!(b.linked, [("a2".to_string(), "a".to_string())]);
        assert!(b.finished.is_empty(), "b and b2 are still pending in d");
        assert!(!send(&mut b, one, "a3", d), "a name after the first is done: linked at once");
        assert_eq!(b.linked.len(), 2);
        b.on_done(file(d, two, Err("cannot send 'b': boom".into())));
        assert_eq!(b.finished, ["d"], "every name in d has ended");
        assert!(!send(&mut b, two, "b3", d), "a name after the first failed: fails at once");
        let s = &b.run.summary;
        assert_eq!((s.files, s.retried, s.hardlinks, s.errors), (1, 1, 2, 3));
        assert_eq!(
            s.failures,
            [
                "cannot send 'b': boom",
                "cannot link 'dst/b2': its first name 'dst/b' was not copied",
                "cannot link 'dst/b3': its first name 'dst/b' was not copied",
            ]
        );
    }
}
