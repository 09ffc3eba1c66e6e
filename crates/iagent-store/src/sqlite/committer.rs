//! Group commit on the callers' own thread.
//!
//! Every job used to go to the writer thread, and its caller waited to be woken with the
//! answer: two thread switches a batch, and under moderate load a batch is a message or two.
//! At 10 000 messages/s on one core the runtime's thread spent 37 µs and the writer's 20 µs
//! of CPU per message, against 6.5 and 6 at saturation. Committing on the caller's thread took
//! 15% off the CPU per message at that rate (`bench/pairs`, in BENCHMARKS.md).
//!
//! Here a caller queues its job and yields to its runtime once, so that every task that is
//! ready to run can queue its own; then it commits what is queued, itself, in one transaction.
//! The first caller back commits for all of them; the others find their answers waiting. A
//! batch therefore holds what the runtime had to do at that moment: one job when it was idle,
//! hundreds under load, and nobody waits for a batch to fill.
//!
//! A caller's thread serves others, so it never waits for the database: when the writer thread
//! has it (writing a merge, or jobs handed to it), or another connection holds SQLite's write
//! lock (the checkpointer's RESTART, the CLI), the queued jobs are handed to the writer thread,
//! which waits for them. Work that takes long, such as a purge, goes to the writer thread in
//! any case ([`Committer::run_on_writer`]), as do the merges a commit finds due.

use std::sync::{Arc, Mutex, PoisonError, mpsc};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::MAX_BATCH;
use super::lock_wait::NoWait;
use super::writer::{self, Database, Job, Shared, Work};
use crate::{Result, StoreError};

/// Where jobs are queued and who commits them.
pub(super) struct Committer {
    shared: Arc<Shared>,
    /// Jobs queued and not yet taken into a batch.
    queued: Mutex<Vec<Box<dyn Job>>>,
    /// Places for `capacity` jobs at once, queued, running or with the writer thread; a
    /// caller waits for one (back-pressure on the message path) instead of growing memory.
    admission: Arc<Semaphore>,
    capacity: usize,
    writer: mpsc::Sender<Work>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let admitted = self.capacity - self.admission.available_permits();
        f.debug_struct("Committer")
            .field("admitted", &admitted)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Committer {
    /// A committer for the database `shared` that takes `capacity` jobs at once (at least
    /// one), handing what it cannot commit to `writer`.
    pub(super) fn new(shared: Arc<Shared>, writer: mpsc::Sender<Work>, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            shared,
            queued: Mutex::new(Vec::new()),
            admission: Arc::new(Semaphore::new(capacity)),
            capacity,
            writer,
        }
    }

    /// Runs `work` in a batch's transaction, and resolves with its result once that
    /// transaction has committed. `work` may run twice (see [`writer`]).
    pub(super) async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Database) -> Result<T> + Send + 'static,
    {
        let (job, answer) = writer::job(work, self.admit().await?);
        self.queued
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(job);
        // Committed when this guard is dropped: after the yield, or, should the caller give
        // up during it, then, so that a job is never left queued with nobody to commit it.
        let flush = Flush(self);
        tokio::task::yield_now().await;
        drop(flush);
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `work` like [`Committer::run`], always on the writer thread: for work that may
    /// take long, which must not hold up the thread of a caller serving others.
    pub(super) async fn run_on_writer<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Database) -> Result<T> + Send + 'static,
    {
        let (job, answer) = writer::job(work, self.admit().await?);
        self.hand_over(vec![job]);
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn admit(&self) -> Result<OwnedSemaphorePermit> {
        Arc::clone(&self.admission)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Commits up to [`MAX_BATCH`] queued jobs on this thread, or hands every queued job to
    /// the writer thread if the database is busy.
    fn flush(&self) {
        // Most callers find their jobs taken by the first one back: they need not look at
        // the database.
        let mut jobs = self.take(MAX_BATCH);
        if jobs.is_empty() {
            return;
        }
        // A merge slice the writer thread owes comes before the next batch, as it would on
        // the writer thread alone: the jobs queue behind it.
        let Some(mut database) = self
            .shared
            .try_database()
            .filter(|_| !self.shared.merge_owed())
        else {
            jobs.append(&mut self.take(usize::MAX));
            return self.hand_over(jobs);
        };
        let _no_wait = NoWait::begin();
        if writer::begin(&database).is_err() {
            // Locked by another connection, most likely; the writer thread will wait for it,
            // and report anything else.
            drop(database);
            return self.hand_over(jobs);
        }
        writer::commit(&mut database, &mut jobs);
        if database.any_merge_due() {
            self.shared.ask_for_merge(&self.writer);
        }
    }

    /// Takes up to `most` queued jobs, oldest first.
    fn take(&self, most: usize) -> Vec<Box<dyn Job>> {
        let mut queued = self.queued.lock().unwrap_or_else(PoisonError::into_inner);
        let taken = queued.len().min(most);
        queued.drain(..taken).collect()
    }

    /// Gives `jobs` to the writer thread. Should it have stopped, the jobs are dropped and
    /// their callers learn that the store is closed.
    fn hand_over(&self, jobs: Vec<Box<dyn Job>>) {
        if !jobs.is_empty() {
            self.writer.send(Work::Jobs(jobs)).ok();
        }
    }
}

/// Commits what is queued when dropped (see [`Committer::run`]).
struct Flush<'a>(&'a Committer);

impl Drop for Flush<'_> {
    fn drop(&mut self) {
        self.0.flush();
    }
}
