//! Shards and the queues between them: a bounded number of jobs in flight, lock-free hand-off, work stealing.
//!
//! The submitting thread pushes jobs into a global [`Injector`]; each shard drains it into its own deque in batches,
//! and an idle shard steals from the others. The number of jobs handed over and not yet completed never exceeds
//! [`crate::EngineConfig::jobs_in_flight_max`]: [`Session::submit`] first drains completions when the limit is
//! reached, so every queue (injector, deques, completion channel) is bounded by that number.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, bounded};
use crossbeam_deque::{Injector, Steal, Stealer, Worker};
use crossbeam_utils::sync::{Parker, Unparker};

use crate::{Completion, EngineConfig, EngineError, Job};

/// Counters one shard keeps while it runs (read once at the end; never shared while running).
#[derive(Clone, Debug, Default)]
pub struct ShardStats {
    pub jobs: u64,
    pub bytes_written: u64,
    /// io_uring_enter calls (uring) or blocking data syscalls (fallback).
    pub syscalls: u64,
    /// Jobs taken from another shard's deque.
    pub steals: u64,
}

struct Shared {
    injector: Injector<Job>,
    stealers: Vec<Stealer<Job>>,
    unparkers: Vec<Unparker>,
    idle: Vec<AtomicBool>,
    shutdown: AtomicBool,
    died: AtomicBool,
    /// Set by [`Session::cancel`]: jobs not yet started complete at once as interrupted.
    cancelled: AtomicBool,
    /// How to wake each shard while it waits in its event loop (not parked), when it registered one
    /// ([`ShardCtx::set_kick`]): a shard blocked on slow sockets must still take a new socket job at once.
    kicks: Vec<std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>>,
    /// Next shard a [`Submitter`] kicks when none is idle.
    next_kick: std::sync::atomic::AtomicUsize,
}

/// A shard's view of the scheduler: where it finds work and where it reports completions.
pub struct ShardCtx {
    pub index: usize,
    local: Worker<Job>,
    parker: Parker,
    shared: Arc<Shared>,
    done: Sender<Completion>,
    steals: u64,
}

impl ShardCtx {
    /// Next job, without blocking: own deque, then a batch from the injector, then steal from another shard. After
    /// [`Session::cancel`], every job found is completed as interrupted here instead of being returned.
    pub fn next_job(&mut self) -> Option<Job> {
        loop {
            let job = self.find_job()?;
            if !self.shared.cancelled.load(Ordering::Relaxed) {
                return Some(job);
            }
            let reply = job.reply().cloned();
            let completion = job.cancel(self.index);
            self.complete_to(reply.as_ref(), completion);
        }
    }

    fn find_job(&mut self) -> Option<Job> {
        if let Some(job) = self.local.pop() {
            return Some(job);
        }
        loop {
            match self.shared.injector.steal_batch_with_limit_and_pop(&self.local, 16) {
                Steal::Success(job) => return Some(job),
                Steal::Retry => continue,
                Steal::Empty => break,
            }
        }
        let n = self.shared.stealers.len();
        for k in 1..n {
            let victim = (self.index + k) % n;
            loop {
                match self.shared.stealers[victim].steal() {
                    Steal::Success(job) => {
                        self.steals += 1;
                        return Some(job);
                    }
                    Steal::Retry => continue,
                    Steal::Empty => break,
                }
            }
        }
        None
    }

    /// Block until new work may be available. Returns false when the session is shutting down and nothing is left.
    pub fn wait_for_work(&mut self) -> bool {
        let idle = &self.shared.idle[self.index];
        idle.store(true, Ordering::SeqCst);
        // Re-check after announcing idleness: a submit that raced with us either sees `idle` or left a job we see.
        if !self.shared.injector.is_empty() || self.shared.stealers.iter().any(|s| !s.is_empty()) {
            idle.store(false, Ordering::SeqCst);
            return true;
        }
        if self.shared.shutdown.load(Ordering::SeqCst) {
            return false;
        }
        self.parker.park_timeout(Duration::from_millis(50));
        idle.store(false, Ordering::SeqCst);
        true
    }

    /// Report a finished job. Never blocks: the channel holds as many completions as jobs may be in flight.
    pub fn complete(&self, completion: Completion) {
        // The receiver outlives the shards unless the session was dropped mid-run, when nobody is listening.
        let _ = self.done.try_send(completion);
    }

    /// Report a finished job to `reply` (a socket job's own channel, see [`crate::net`]) or, when `None`, to the
    /// session. A socket job's submitter waits on a channel of its own, so this never blocks either.
    pub fn complete_to(&self, reply: Option<&Sender<Completion>>, completion: Completion) {
        match reply {
            // The submitter may have gone (its thread ended); nobody is left to tell.
            Some(reply) => {
                let _ = reply.try_send(completion);
            }
            None => self.complete(completion),
        }
    }

    /// Register how a [`Submitter`] wakes this shard when it is busy in its event loop rather than parked (an
    /// engine whose shard blocks only in [`ShardCtx::wait_for_work`] needs none).
    pub fn set_kick(&self, kick: Box<dyn Fn() + Send + Sync>) {
        let _ = self.shared.kicks[self.index].set(kick);
    }

    pub fn steals(&self) -> u64 {
        self.steals
    }
}

/// A handle that submits socket jobs ([`crate::net`]) from any thread: their completions go to each job's own
/// channel, so they are not counted in the session's jobs in flight (the submitters bound them: each waits for its
/// job). Jobs submitted after the session stopped are refused.
#[derive(Clone)]
pub struct Submitter {
    shared: Arc<Shared>,
}

impl Submitter {
    /// Hand a socket job to the shards. Fails (and returns the job's error) when the session is stopping or a shard
    /// died: then no completion would ever come.
    pub fn submit(&self, job: Job) -> Result<(), EngineError> {
        debug_assert!(job.reply().is_some(), "only jobs with their own reply channel go through a Submitter");
        if self.shared.shutdown.load(Ordering::SeqCst) || self.shared.died.load(Ordering::SeqCst) {
            return Err(EngineError::ShardDied { shard: 0, message: "the engine session has stopped".into() });
        }
        self.shared.injector.push(job);
        for (i, idle) in self.shared.idle.iter().enumerate() {
            if idle.swap(false, Ordering::SeqCst) {
                self.shared.unparkers[i].unpark();
                return Ok(());
            }
        }
        // Every shard is busy: one that waits in its event loop (on sockets, say) is told to look for work.
        let n = self.shared.kicks.len();
        let i = self.shared.next_kick.fetch_add(1, Ordering::Relaxed) % n;
        if let Some(kick) = self.shared.kicks[i].get() {
            kick();
        }
        Ok(())
    }

    /// Whether a shard died (a submitter waiting for a completion then stops waiting).
    pub fn died(&self) -> bool {
        self.shared.died.load(Ordering::SeqCst)
    }

    /// Cancel the session (as [`Session::cancel`]).
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::SeqCst);
        for u in &self.shared.unparkers {
            u.unpark();
        }
    }
}

/// A running set of shards. Used from one thread (the executor that plans and submits).
pub struct Session {
    shared: Arc<Shared>,
    done: Receiver<Completion>,
    threads: Vec<JoinHandle<Result<ShardStats, String>>>,
    in_flight: usize,
    in_flight_max: usize,
    next_wake: usize,
}

impl Session {
    /// Start `config.shards` threads running `shard_main`. `setup` runs first on each shard thread (pinned); its
    /// error aborts the start. `shard_main` must loop on [`ShardCtx::next_job`] / [`ShardCtx::wait_for_work`] until
    /// the latter returns false, completing every job it takes.
    pub fn start<S, F>(config: &EngineConfig, name: &str, setup: S) -> Result<Session, EngineError>
    where
        S: Fn(usize) -> std::io::Result<F> + Send + Sync + 'static,
        F: FnOnce(&mut ShardCtx) -> ShardStats + 'static,
    {
        if config.shards == 0 || config.jobs_in_flight_max == 0 || config.slots_per_shard == 0 {
            return Err(EngineError::Config("shards, buffer slots and jobs in flight must be at least 1".into()));
        }
        if config.block_bytes == 0 || !config.block_bytes.is_multiple_of(crate::pool::ALIGN_BYTES) {
            return Err(EngineError::Config(format!(
                "block size {} is not a positive multiple of {} bytes",
                config.block_bytes,
                crate::pool::ALIGN_BYTES
            )));
        }
        let workers: Vec<Worker<Job>> = (0..config.shards).map(|_| Worker::new_fifo()).collect();
        let parkers: Vec<Parker> = (0..config.shards).map(|_| Parker::new()).collect();
        let shared = Arc::new(Shared {
            injector: Injector::new(),
            stealers: workers.iter().map(Worker::stealer).collect(),
            unparkers: parkers.iter().map(|p| p.unparker().clone()).collect(),
            idle: (0..config.shards).map(|_| AtomicBool::new(false)).collect(),
            shutdown: AtomicBool::new(false),
            died: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            kicks: (0..config.shards).map(|_| std::sync::OnceLock::new()).collect(),
            next_kick: std::sync::atomic::AtomicUsize::new(0),
        });
        let (done_tx, done_rx) = bounded(config.jobs_in_flight_max + config.shards);
        let (ready_tx, ready_rx) = bounded::<(usize, std::io::Result<()>)>(config.shards);
        let cores = if config.pin { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
        let setup = Arc::new(setup);
        let mut threads = Vec::with_capacity(config.shards);
        for (index, (local, parker)) in workers.into_iter().zip(parkers).enumerate() {
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            let shared = shared.clone();
            let done = done_tx.clone();
            let ready = ready_tx.clone();
            let setup = setup.clone();
            let handle = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    let setup_result = catch_unwind(AssertUnwindSafe(|| setup(index))).unwrap_or_else(|_| {
                        shared.died.store(true, Ordering::SeqCst);
                        Err(std::io::Error::other("shard setup panicked"))
                    });
                    let main = match setup_result {
                        Ok(main) => {
                            let _ = ready.send((index, Ok(())));
                            main
                        }
                        Err(e) => {
                            let _ = ready.send((index, Err(e)));
                            return Err("setup failed".to_string());
                        }
                    };
                    let mut ctx = ShardCtx { index, local, parker, shared: shared.clone(), done, steals: 0 };
                    match catch_unwind(AssertUnwindSafe(|| main(&mut ctx))) {
                        Ok(mut stats) => {
                            stats.steals = ctx.steals;
                            Ok(stats)
                        }
                        Err(panic) => {
                            shared.died.store(true, Ordering::SeqCst);
                            let msg = panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "panic".into());
                            Err(msg)
                        }
                    }
                })
                .map_err(|e| EngineError::ShardSetup { shard: index, source: e })?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut session = Session {
            shared,
            done: done_rx,
            threads,
            in_flight: 0,
            in_flight_max: config.jobs_in_flight_max,
            next_wake: 0,
        };
        for _ in 0..config.shards {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((shard, Err(source))) => {
                    session.stop();
                    return Err(EngineError::ShardSetup { shard, source });
                }
                Err(_) => {
                    session.stop();
                    return Err(EngineError::ShardDied { shard: 0, message: "exited during setup".into() });
                }
            }
        }
        Ok(session)
    }

    /// Hand a job to the shards. When the in-flight limit is reached, completions are drained into `on_done` first.
    pub fn submit(&mut self, job: Job, on_done: &mut dyn FnMut(Completion)) -> Result<(), EngineError> {
        while self.in_flight >= self.in_flight_max {
            self.wait_one(on_done)?;
        }
        self.shared.injector.push(job);
        self.in_flight += 1;
        self.wake_one();
        // Deliver whatever is already finished, so callers see progress without waiting.
        while let Ok(c) = self.done.try_recv() {
            self.in_flight -= 1;
            on_done(c);
        }
        Ok(())
    }

    /// Stop starting jobs: those still queued complete at once as interrupted ([`crate::Op::Interrupted`]); those
    /// already running finish. Used on SIGINT/SIGTERM; [`Session::drain`] then returns quickly.
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::SeqCst);
        for u in &self.shared.unparkers {
            u.unpark();
        }
    }

    /// A handle for submitting socket jobs from other threads ([`Submitter`]).
    pub fn submitter(&self) -> Submitter {
        Submitter { shared: self.shared.clone() }
    }

    /// Jobs submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Wait for one completion (there must be a job in flight) and hand it to `on_done`.
    pub fn wait(&mut self, on_done: &mut dyn FnMut(Completion)) -> Result<(), EngineError> {
        if self.in_flight == 0 {
            return Ok(());
        }
        self.wait_one(on_done)
    }

    /// Wait until every submitted job has completed.
    pub fn drain(&mut self, on_done: &mut dyn FnMut(Completion)) -> Result<(), EngineError> {
        while self.in_flight > 0 {
            self.wait_one(on_done)?;
        }
        Ok(())
    }

    fn wait_one(&mut self, on_done: &mut dyn FnMut(Completion)) -> Result<(), EngineError> {
        loop {
            match self.done.recv_timeout(Duration::from_millis(200)) {
                Ok(c) => {
                    self.in_flight -= 1;
                    on_done(c);
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.shared.died.load(Ordering::SeqCst) {
                        return Err(self.death());
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(self.death()),
            }
        }
    }

    fn death(&mut self) -> EngineError {
        self.stop();
        for (shard, t) in self.threads.drain(..).enumerate() {
            if let Ok(Err(message)) = t.join() {
                return EngineError::ShardDied { shard, message };
            }
        }
        EngineError::ShardDied { shard: 0, message: "unknown".into() }
    }

    fn wake_one(&mut self) {
        let n = self.shared.unparkers.len();
        for k in 0..n {
            let i = (self.next_wake + k) % n;
            if self.shared.idle[i].swap(false, Ordering::SeqCst) {
                self.shared.unparkers[i].unpark();
                self.next_wake = i + 1;
                return;
            }
        }
    }

    fn stop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for u in &self.shared.unparkers {
            u.unpark();
        }
    }

    /// Stop the shards (after [`Session::drain`]) and collect their counters.
    pub fn finish(mut self) -> Result<Vec<ShardStats>, EngineError> {
        self.stop();
        let mut stats = Vec::with_capacity(self.threads.len());
        for (shard, t) in std::mem::take(&mut self.threads).into_iter().enumerate() {
            match t.join() {
                Ok(Ok(s)) => stats.push(s),
                Ok(Err(message)) => return Err(EngineError::ShardDied { shard, message }),
                Err(_) => {
                    return Err(EngineError::ShardDied { shard, message: "panic".into() });
                }
            }
        }
        Ok(stats)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
