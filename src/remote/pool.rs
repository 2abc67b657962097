//! What push and pull share: the run's counters and failures, the data streams (each a connection dialled again
//! when it breaks, with the request in flight sent again), the worker pool that feeds them and adjusts their number,
//! and directories whose metadata is set once everything inside them is done.

use super::*;

/// Counters, failures, and the reasons to stop.
pub(super) struct Run<'a> {
    pub(super) opts: &'a CopyOptions,
    pub(super) sync: Option<&'a SyncOptions>,
    pub(super) delete: bool,
    pub(super) itemizer: Itemizer,
    pub(super) summary: Summary,
    pub(super) progress: Progress,
    /// The first broken connection: the run stops, and this is its one line.
    pub(super) fatal: Option<String>,
    pub(super) interrupted: Option<i32>,
    /// Tells the workers to drop what is queued.
    pub(super) stop: Arc<AtomicBool>,
    pub(super) id: Identity,
    /// `-v`: show the pool's notes.
    pub(super) verbose: bool,
}

/// At most this many failures are kept for the summary (all are printed and counted).
const FAILURES_KEPT_MAX: usize = 1000;

impl<'a> Run<'a> {
    pub(super) fn new(opts: &'a CopyOptions, streams: usize) -> Run<'a> {
        let command = if opts.sync.is_some() { "sync" } else { "copy" };
        let mut summary = Summary::new(command, "net", streams);
        summary.dry_run = opts.dry_run;
        Run {
            opts,
            sync: opts.sync.as_ref(),
            delete: opts.sync.as_ref().is_some_and(|s| s.delete),
            itemizer: Itemizer { enabled: opts.itemize || opts.dry_run, json: opts.json },
            summary,
            progress: Progress::new(opts.progress && !opts.quiet),
            fatal: None,
            interrupted: None,
            stop: Arc::new(AtomicBool::new(false)),
            id: Identity::current(),
            verbose: false,
        }
    }

    pub(super) fn fail(&mut self, msg: String) {
        self.progress.println(&format!("fastsync: {msg}"));
        self.summary.errors += 1;
        if self.summary.failures.len() < FAILURES_KEPT_MAX {
            self.summary.failures.push(msg);
        }
    }

    /// A line shown with `-v` (how the number of streams changes).
    pub(super) fn note(&mut self, msg: &str) {
        if self.verbose && !self.opts.quiet {
            self.progress.println(&format!("fastsync: {msg}"));
        }
    }

    /// A warning line (a stream that broke and was replaced); `-q` silences it.
    pub(super) fn warn(&mut self, msg: &str) {
        if !self.opts.quiet {
            self.progress.println(&format!("fastsync: warning: {msg}"));
        }
    }

    pub(super) fn broken(&mut self, msg: String) {
        if self.fatal.is_none() {
            self.fatal = Some(msg);
        }
        self.stop.store(true, Ordering::Release);
    }

    /// A request failed: the server's refusal is one failure line (`what` says what was being done), a broken
    /// connection stops the run.
    pub(super) fn req_failed(&mut self, e: ReqError, what: impl FnOnce(&str) -> String) {
        match e {
            ReqError::Server { .. } => self.fail(what(e.cause())),
            ReqError::Broken(m) => self.broken(m),
        }
    }

    /// Whether the run must stop (a broken connection, or Ctrl-C).
    pub(super) fn halted(&mut self) -> bool {
        if self.interrupted.is_none() {
            self.interrupted = interrupt::received();
        }
        if self.interrupted.is_some() {
            self.stop.store(true, Ordering::Release);
        }
        self.fatal.is_some() || self.interrupted.is_some()
    }

    pub(super) fn item(&self, change: Change, rel: &[u8], is_dir: bool) {
        self.itemizer.item(change, url::os_path(rel), is_dir);
    }

    pub(super) fn skip_special(&mut self, shown: &str) {
        self.summary.skipped += 1;
        if !self.opts.quiet {
            self.progress.println(&format!("fastsync: skipping special file '{shown}'"));
        }
    }

    /// After the transfers: run the deletion pass only when everything succeeded.
    pub(super) fn may_delete(&mut self) -> bool {
        if !self.delete {
            return false;
        }
        if self.fatal.is_some() {
            return false;
        }
        let why = match (self.interrupted, self.summary.errors) {
            (Some(_), _) => "the run was interrupted".to_string(),
            (None, 0) => return true,
            (None, n) => format!("{n} error(s) happened"),
        };
        self.summary.deletions_skipped = Some(format!("{why}; nothing was deleted"));
        false
    }

    /// The summary, or the fatal line.
    pub(super) fn finish(mut self) -> Result<Summary, Failure> {
        self.progress.finish();
        if let Some(m) = self.fatal {
            return Err(Failure::Fatal(m));
        }
        self.summary.interrupted = self.interrupted.or_else(interrupt::received);
        Ok(self.summary)
    }
}

/// What a worker reports.
pub(super) enum Done {
    /// Bytes acknowledged (push) or written (pull).
    Bytes(u64),
    /// A file is finished: transferred (and how many times it was retried), or failed (the line to print).
    /// `link`: the file was the first name of a multiply-linked inode (`-H`), whose other names wait for it.
    File { dir: Option<usize>, link: Option<(u64, u64)>, result: Result<u8, String> },
    /// A stream broke and was replaced: the warning line (without `fastsync: warning: `).
    Warn(String),
    /// A stream gave up (or the server cannot be reached again): the run stops.
    Broken(String),
    /// What the pool's monitor decided (shown with `-v`).
    Note(String),
}

/// Why a worker stopped working.
#[derive(Debug, thiserror::Error)]
pub(super) enum StreamError {
    /// A request failed [`STREAM_ATTEMPTS_MAX`] times on fresh connections: the run stops with this line.
    #[error("{0}")]
    GaveUp(String),
    /// The run is stopping (another stream gave up, the control connection broke, or Ctrl-C).
    #[error("the run was stopped")]
    Stopped,
}

/// A request's connection broke under it (closed, reset, stalled past the I/O timeout, garbled).
#[derive(Debug)]
pub(super) struct Broken {
    /// Names the server and the cause.
    pub(super) message: String,
    /// Something was received and kept before it broke (a pull), so the attempts are counted again.
    pub(super) progressed: bool,
}

impl Broken {
    pub(super) fn new(message: String) -> Broken {
        Broken { message, progressed: false }
    }
}

/// A request's result with a broken connection split off (the part [`Stream::retry`] handles).
pub(super) fn split<R>(r: Result<R, ReqError>) -> Result<Result<R, ReqError>, Broken> {
    match r {
        Err(ReqError::Broken(m)) => Err(Broken::new(m)),
        r => Ok(r),
    }
}

/// What a stream was doing, for its warnings and its last error line.
pub(super) struct Doing {
    /// `sending 'URL' (the chunk at byte N)`.
    what: String,
    /// `cannot write 'URL'`.
    pub(super) failed: String,
}

impl Doing {
    pub(super) fn push(url: &str, part: &str) -> Doing {
        Doing { what: format!("sending '{url}' ({part})"), failed: format!("cannot write '{url}'") }
    }

    pub(super) fn pull(url: &str, part: &str) -> Doing {
        Doing { what: format!("fetching '{url}' ({part})"), failed: format!("cannot read '{url}'") }
    }
}

/// One data stream of a pool: a connection that is dialled again, with a fresh handshake, when it breaks.
pub(super) struct Stream {
    /// 1-based, for messages.
    number: usize,
    dialer: Arc<Dialer>,
    /// `None` after a break, until the next request dials again.
    conn: Option<Connection>,
    pub(super) stop: Arc<AtomicBool>,
    /// Where the pool's monitor finds this stream's socket.
    pub(super) scaler: Arc<Scaler>,
}

impl Stream {
    pub(super) fn new(
        number: usize,
        conn: Option<Connection>,
        dialer: Arc<Dialer>,
        stop: Arc<AtomicBool>,
        scaler: Arc<Scaler>,
    ) -> Stream {
        let mut s = Stream { number, dialer, conn: None, stop, scaler };
        s.set_conn(conn);
        s
    }

    /// Install (or drop) the connection, and tell the monitor which socket it is.
    fn set_conn(&mut self, conn: Option<Connection>) {
        self.scaler.publish(self.number, conn.as_ref().map_or(-1, Connection::raw_fd));
        self.conn = conn;
    }

    pub(super) fn addr(&self) -> &str {
        self.dialer.addr()
    }

    /// Run `op` on the connection. When the connection breaks under it, the connection is dropped, and after a
    /// short backoff a new one is dialled and `op` runs again on it (it is told the attempt number, from 1), up to
    /// [`STREAM_ATTEMPTS_MAX`] attempts; a warning names the server and what was being done. A failed dial counts
    /// as an attempt. `Err(GaveUp)` names what was being done and the last cause; `Err(Stopped)` when the run stops
    /// meanwhile.
    pub(super) fn retry<R>(
        &mut self,
        doing: &Doing,
        done: &Sender<Done>,
        mut op: impl FnMut(&mut Connection, u32) -> Result<R, Broken>,
    ) -> Result<R, StreamError> {
        let mut attempt = 1;
        // Why the last attempt failed: the request's connection broke, then (maybe) dialling again failed.
        let mut broke: Option<String> = None;
        let mut redial: Option<String> = None;
        loop {
            if interrupt::received().is_some() {
                // Ctrl-C: the request in flight finished; stop before the next one, on every stream.
                self.stop.store(true, Ordering::Release);
            }
            if self.stop.load(Ordering::Acquire) {
                return Err(StreamError::Stopped);
            }
            let conn = match self.conn.take() {
                Some(c) => Some(c),
                None => match self.dialer.dial() {
                    Ok(c) => {
                        self.scaler.publish(self.number, c.raw_fd());
                        if let Some(cause) = &broke {
                            let n = self.number;
                            let _ = done.send(Done::Warn(format!(
                                "stream {n}: {cause}, while {}; reconnected, trying again (attempt {attempt} of \
                                 {STREAM_ATTEMPTS_MAX})",
                                doing.what
                            )));
                        }
                        Some(c)
                    }
                    Err(e) => {
                        redial = Some(e.to_string());
                        None
                    }
                },
            };
            if let Some(mut conn) = conn {
                redial = None;
                match op(&mut conn, attempt) {
                    Ok(r) => {
                        self.conn = Some(conn);
                        return Ok(r);
                    }
                    Err(b) => {
                        self.scaler.publish(self.number, -1);
                        if b.progressed {
                            // A new request was in flight when it broke: this was its first attempt.
                            attempt = 1;
                        }
                        broke = Some(b.message);
                    }
                }
            }
            if attempt >= STREAM_ATTEMPTS_MAX {
                let cause = match (&broke, &redial) {
                    (Some(b), Some(r)) => format!("{b}; reconnecting failed: {r}"),
                    (Some(b), None) => b.clone(),
                    (None, Some(r)) => r.clone(),
                    (None, None) => "the connection broke".to_string(),
                };
                return Err(StreamError::GaveUp(format!(
                    "{}: {cause} (gave up after {attempt} attempts on fresh connections)",
                    doing.failed
                )));
            }
            self.pause(RETRY_BACKOFF_FIRST * 2u32.saturating_pow(attempt.saturating_sub(1)));
            attempt += 1;
        }
    }

    /// Sleep for `d`, waking early when the run stops.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stop.load(Ordering::Acquire) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    /// Run `op` once if the connection is up (cleaning up: a `PutAbort`); a break only drops the connection.
    pub(super) fn best_effort(&mut self, op: impl FnOnce(&mut Connection) -> Result<(), ReqError>) {
        if let Some(conn) = self.conn.as_mut()
            && let Err(ReqError::Broken(_)) = op(conn)
        {
            self.set_conn(None);
        }
    }

    /// Keep an idle connection from being dropped by the server; one that broke meanwhile is dropped quietly (the
    /// next request dials again).
    fn keepalive(&mut self) {
        if let Some(conn) = self.conn.as_mut()
            && conn.keepalive().is_err()
        {
            self.set_conn(None);
        }
    }

    fn bye(mut self) {
        self.scaler.publish(self.number, -1);
        if let Some(conn) = self.conn.take() {
            conn.bye();
        }
    }
}

/// Worker threads, one stream each, fed by a bounded queue; with adaptive streams, a monitor thread adds and retires
/// workers as [`StreamPolicy`] decides.
pub(super) struct Pool<T> {
    tx: Option<Sender<T>>,
    done: Receiver<Done>,
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
    pub(super) scaler: Arc<Scaler>,
    monitor: Option<JoinHandle<()>>,
}

/// A worker's job: the tasks it took in one turn (one, or a run of batchable ones and the task after them), in queue
/// order. `Err` stops the worker (and the run).
pub(super) type Work<T> = dyn Fn(&mut Stream, Vec<T>, &Sender<Done>) -> Result<(), StreamError> + Send + Sync;

/// What a pool's queue carries.
pub(super) trait PoolTask: Send + 'static {
    /// Tasks queued per stream the pool may run (a task is a file or a range, never its data).
    const QUEUED_PER_STREAM: usize = 2;

    /// A worker that takes this task may take the next ones from the queue in the same turn (small files, sent in
    /// one round trip: `push::push_smalls`).
    fn batchable(&self) -> bool {
        false
    }
}

/// Tasks a worker takes from the queue in one turn at most.
const TASKS_PER_TURN_MAX: usize = SMALL_BATCH_FILES_MAX;

/// What the main thread hears while it waits: a completion, or `None` after [`client::KEEPALIVE`] of silence (time
/// to keep its own connection alive).
type OnEvent<'a> = &'a mut dyn FnMut(Option<Done>);

/// How many streams a pool should run, and what its monitor sees of them. Streams are numbered from 1; stream `n`
/// runs while `n <= target`.
pub(super) struct Scaler {
    target: AtomicUsize,
    /// The most streams that ran at once.
    peak: AtomicUsize,
    /// Stream `n`'s socket at index `n - 1` (-1: none), read by the monitor for `TCP_INFO`.
    fds: Vec<AtomicI32>,
    /// Stream `n`'s worker is running.
    alive: Vec<AtomicBool>,
    /// No more streams than this (the server refused one more connection).
    cap: AtomicUsize,
    /// Every task is queued: the monitor no longer adds streams (and stops with the last worker).
    finished: AtomicBool,
    /// A worker ended: wakes the monitor, which stops as soon as the last one has (not at its next tick, which every
    /// run's end would wait for).
    ended: (Sender<()>, Receiver<()>),
}

impl Scaler {
    pub(super) fn new(initial: usize, slots: usize) -> Scaler {
        Scaler {
            target: AtomicUsize::new(initial),
            peak: AtomicUsize::new(initial),
            fds: (0..slots).map(|_| AtomicI32::new(-1)).collect(),
            alive: (0..slots).map(|_| AtomicBool::new(false)).collect(),
            cap: AtomicUsize::new(slots),
            finished: AtomicBool::new(false),
            ended: bounded(1),
        }
    }

    fn target(&self) -> usize {
        self.target.load(Ordering::Acquire)
    }

    /// How many streams a large file's ranges should feed: all the pool may grow to.
    pub(super) fn split_for(&self) -> usize {
        self.fds.len()
    }

    fn publish(&self, number: usize, fd: RawFd) {
        if let Some(slot) = self.fds.get(number - 1) {
            slot.store(fd, Ordering::Release);
        }
    }
}

/// Everything needed to start one more worker.
struct Spawner<T> {
    rx: Receiver<T>,
    dtx: Sender<Done>,
    pub(super) stop: Arc<AtomicBool>,
    work: Arc<Work<T>>,
    dialer: Arc<Dialer>,
    pub(super) scaler: Arc<Scaler>,
    handles: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl<T: PoolTask> Spawner<T> {
    /// Start stream `number`'s worker: on `conn`, or on a connection it dials first (a stream added by the monitor).
    fn spawn(&self, number: usize, conn: Option<Connection>) {
        self.scaler.alive[number - 1].store(true, Ordering::Release);
        let stream = Stream::new(number, conn, self.dialer.clone(), self.stop.clone(), self.scaler.clone());
        let (rx, dtx, stop, work, scaler) =
            (self.rx.clone(), self.dtx.clone(), self.stop.clone(), self.work.clone(), self.scaler.clone());
        let handle = std::thread::spawn(move || {
            worker(stream, &rx, &dtx, &stop, &*work);
            scaler.alive[number - 1].store(false, Ordering::Release);
            let _ = scaler.ended.0.try_send(());
        });
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
    }
}

impl<T: PoolTask> Pool<T> {
    /// Workers on `conns`; with `adaptive` (the most streams), a monitor that follows the bandwidth-delay product.
    pub(super) fn start(
        conns: Vec<Connection>,
        dialer: &Arc<Dialer>,
        stop: Arc<AtomicBool>,
        work: Arc<Work<T>>,
        adaptive: Option<usize>,
    ) -> Pool<T> {
        let initial = conns.len();
        // Adaptive: as many slots as the pool may grow to.
        let slots = adaptive.map_or(initial, |max| max.max(initial)).max(1);
        let scaler = Arc::new(Scaler::new(initial, slots));
        // Tasks are files and ranges, never their data: the queue holds a few per stream the pool may run.
        let (tx, rx) = bounded::<T>(slots * T::QUEUED_PER_STREAM);
        let (dtx, drx) = unbounded();
        let handles = Arc::new(Mutex::new(Vec::new()));
        let spawner = Spawner { rx, dtx, stop, work, dialer: dialer.clone(), scaler: scaler.clone(), handles };
        for (i, conn) in conns.into_iter().enumerate() {
            spawner.spawn(i + 1, Some(conn));
        }
        let handles = spawner.handles.clone();
        let monitor =
            (adaptive.is_some() && initial > 0).then(|| std::thread::spawn(move || monitor(&spawner, initial)));
        Pool { tx: Some(tx), done: drx, handles, scaler, monitor }
    }

    /// Queue `task`, handling completions while the queue is full. False when the workers are gone.
    pub(super) fn send(&self, task: T, on: OnEvent<'_>) -> bool {
        let Some(tx) = &self.tx else { return false };
        let mut task = task;
        loop {
            task = match tx.try_send(task) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(t)) => t,
            };
            let mut sel = Select::new();
            let s = sel.send(tx);
            let r = sel.recv(&self.done);
            let Ok(oper) = sel.select_timeout(client::KEEPALIVE) else {
                on(None);
                continue;
            };
            match oper.index() {
                i if i == s => return oper.send(tx, task).is_ok(),
                i if i == r => match oper.recv(&self.done) {
                    Ok(d) => on(Some(d)),
                    Err(_) => return false,
                },
                _ => unreachable!("two operations"),
            }
        }
    }

    /// Completions that arrived.
    pub(super) fn poll(&self, on: OnEvent<'_>) {
        while let Ok(d) = self.done.try_recv() {
            on(Some(d));
        }
    }

    /// No more tasks: wait for the workers, handling their last completions. Returns the most streams that ran at
    /// once.
    pub(super) fn finish(&mut self, on: OnEvent<'_>) -> usize {
        self.tx = None;
        self.scaler.finished.store(true, Ordering::Release);
        // The channel disconnects once every worker and the monitor (which stops after the last worker) are gone.
        loop {
            match self.done.recv_timeout(client::KEEPALIVE) {
                Ok(d) => on(Some(d)),
                Err(RecvTimeoutError::Timeout) => on(None),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        let handles = std::mem::take(&mut *self.handles.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
        self.scaler.peak.load(Ordering::Acquire)
    }
}

/// The adaptive pool's monitor: every second, sample every stream's `TCP_INFO`, let [`StreamPolicy`] choose the
/// number of streams, start the workers that are missing (retired ones notice the lower target themselves).
fn monitor<T: PoolTask>(sp: &Spawner<T>, initial: usize) {
    let scaler = &sp.scaler;
    let mut policy = StreamPolicy::new(initial.min(STREAMS_MIN), scaler.fds.len(), CHUNK);
    let started = Instant::now();
    let mut last: Vec<(RawFd, TcpStats)> = vec![(-1, TcpStats::default()); scaler.fds.len()];
    let mut total = Sample::default();
    // The RTT as the application sees it, end to end: a proxy, a tunnel or a load balancer on the way hides the
    // path's length from the kernel's RTT of our own sockets. A spare connection sends a tiny request each sample.
    let mut pinger = sp.dialer.dial().ok();
    loop {
        let until = Instant::now() + STREAMS_SAMPLE_EVERY;
        while Instant::now() < until {
            let working = scaler.alive.iter().any(|a| a.load(Ordering::Acquire));
            if !working || sp.stop.load(Ordering::Acquire) {
                // Every worker is gone (the queue closed, or the run stopped): so is the monitor, and with it its
                // sender of completions, so that the pool's channel can close.
                if let Some(conn) = pinger {
                    conn.bye();
                }
                return;
            }
            let _ = scaler.ended.1.recv_timeout(Duration::from_millis(50));
        }
        let mut rtt = Duration::ZERO;
        for (i, slot) in scaler.fds.iter().enumerate() {
            let fd = slot.load(Ordering::Acquire);
            let Some(now) = (fd >= 0).then(|| tcp_stats(fd)).flatten() else { continue };
            // A new connection on this stream counts from zero.
            let before = if last[i].0 == fd { last[i].1 } else { TcpStats::default() };
            total.bytes += now.bytes.saturating_sub(before.bytes);
            total.segments_sent += now.segments_sent.saturating_sub(before.segments_sent);
            total.segments_retransmitted += now.segments_retransmitted.saturating_sub(before.segments_retransmitted);
            rtt = rtt.max(now.rtt);
            last[i] = (fd, now);
        }
        if let Some(conn) = pinger.as_mut() {
            let sent = Instant::now();
            match conn.stat(b"") {
                Ok(_) => rtt = rtt.max(sent.elapsed()),
                Err(_) => pinger = None,
            }
        }
        total.at_secs = started.elapsed().as_secs_f64();
        total.rtt = rtt;
        let before = scaler.target();
        let wanted = policy.observe(total).min(scaler.cap.load(Ordering::Acquire));
        if wanted == before || (wanted > before && scaler.finished.load(Ordering::Acquire) && sp.rx.is_empty()) {
            // No change, or growth when every task is taken: new streams would find nothing to do.
            continue;
        }
        let bdp = policy.bdp_bytes().unwrap_or(0.0);
        let _ = sp.dtx.send(Done::Note(format!(
            "streams: {before} -> {wanted} (RTT {:.1} ms, {:.0} MB/s, bandwidth-delay product {:.1} MB)",
            rtt.as_secs_f64() * 1e3,
            policy_throughput(&policy) / 1e6,
            bdp / 1e6
        )));
        scaler.target.store(wanted, Ordering::Release);
        scaler.peak.fetch_max(wanted, Ordering::AcqRel);
        for number in 1..=wanted {
            if !scaler.alive[number - 1].load(Ordering::Acquire) {
                sp.spawn(number, None);
            }
        }
    }
}

fn policy_throughput(p: &StreamPolicy) -> f64 {
    p.throughput_bytes_per_s().unwrap_or(0.0)
}

/// A worker's turn, in order: consecutive tasks that `batch` takes (`Ok`) go together to `run`, the others (`Err`)
/// one by one to `one`.
pub(super) fn in_runs<T, U>(
    stream: &mut Stream,
    tasks: Vec<T>,
    batch: impl Fn(T) -> Result<U, T>,
    mut run: impl FnMut(&mut Stream, Vec<U>) -> Result<(), StreamError>,
    mut one: impl FnMut(&mut Stream, T) -> Result<(), StreamError>,
) -> Result<(), StreamError> {
    let mut batched = Vec::new();
    for task in tasks {
        match batch(task) {
            Ok(u) => batched.push(u),
            Err(task) => {
                if !batched.is_empty() {
                    run(stream, std::mem::take(&mut batched))?;
                }
                one(stream, task)?;
            }
        }
    }
    if batched.is_empty() { Ok(()) } else { run(stream, batched) }
}

/// One worker: tasks until the queue closes or the pool no longer wants this stream; a connection left idle is
/// kept alive. A stream the monitor added dials first, and when the server takes no more connections it retires
/// and caps the pool below itself.
fn worker<T: PoolTask>(mut stream: Stream, rx: &Receiver<T>, done: &Sender<Done>, stop: &AtomicBool, work: &Work<T>) {
    if stream.conn.is_none() {
        match stream.dialer.dial() {
            Ok(c) => stream.set_conn(Some(c)),
            Err(e) => {
                let n = stream.number;
                stream.scaler.cap.fetch_min(n - 1, Ordering::AcqRel);
                stream.scaler.target.fetch_min(n - 1, Ordering::AcqRel);
                let _ = done.send(Done::Note(format!("streams: cannot open stream {n} ({e}); staying at {}", n - 1)));
                return;
            }
        }
    }
    loop {
        if stream.number > stream.scaler.target() {
            // The pool shrank: this stream retires between tasks.
            break;
        }
        let mut tasks = match rx.recv_timeout(STREAMS_SAMPLE_EVERY.min(client::KEEPALIVE)) {
            Ok(t) => vec![t],
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                stream.keepalive();
                continue;
            }
        };
        // Small files waiting behind this one go in the same round trip; the pool's other streams take what is
        // left (the queue holds several tasks per stream).
        while tasks.len() < TASKS_PER_TURN_MAX
            && tasks.last().is_some_and(PoolTask::batchable)
            && let Ok(t) = rx.try_recv()
        {
            tasks.push(t);
        }
        if interrupt::received().is_some() {
            // Ctrl-C: the tasks in flight finish; the queued ones are dropped, here and on every other stream.
            stop.store(true, Ordering::Release);
        }
        if stop.load(Ordering::Acquire) {
            // Dropped: a pulled file's temporary goes with it (a resumable part stays for the rerun).
            continue;
        }
        if let Err(e) = work(&mut stream, tasks, done) {
            stop.store(true, Ordering::Release);
            if let StreamError::GaveUp(m) = e {
                let _ = done.send(Done::Broken(m));
            }
            return;
        }
    }
    stream.bye();
}

/// Directories with work in flight; each is finished (metadata set) once walked and with nothing pending inside.
pub(super) struct Dirs<F> {
    slab: Slab<DirNode<F>>,
}

struct DirNode<F> {
    meta: F,
    pending: u64,
    walked: bool,
    parent: Option<usize>,
}

impl<F> Dirs<F> {
    pub(super) fn new() -> Self {
        Dirs { slab: Slab::new() }
    }

    pub(super) fn open(&mut self, parent: Option<usize>, meta: F) -> usize {
        if let Some(p) = parent {
            self.slab.get_mut(p).pending += 1;
        }
        self.slab.insert(DirNode { meta, pending: 0, walked: false, parent })
    }

    pub(super) fn add(&mut self, d: Option<usize>) {
        if let Some(d) = d {
            self.slab.get_mut(d).pending += 1;
        }
    }

    /// The directory's entries were all handed out; finished directories are appended to `out`, innermost first.
    pub(super) fn walked(&mut self, d: usize, out: &mut Vec<F>) {
        self.slab.get_mut(d).walked = true;
        self.settle(d, out);
    }

    pub(super) fn done(&mut self, d: Option<usize>, out: &mut Vec<F>) {
        if let Some(d) = d {
            self.slab.get_mut(d).pending -= 1;
            self.settle(d, out);
        }
    }

    fn settle(&mut self, mut d: usize, out: &mut Vec<F>) {
        loop {
            let n = self.slab.get_mut(d);
            if n.pending > 0 || !n.walked {
                return;
            }
            let n = self.slab.remove(d);
            out.push(n.meta);
            match n.parent {
                Some(p) => {
                    self.slab.get_mut(p).pending -= 1;
                    d = p;
                }
                None => return,
            }
        }
    }
}
