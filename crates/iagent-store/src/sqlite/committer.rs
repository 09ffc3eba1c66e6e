//! Group commit on the callers' own thread.
//!
//! Every job used to go to the writer thread, and its caller waited to be woken with the
//! answer: two thread switches a batch, and under moderate load a batch is a message or two.
//! At 10 000 messages/s on one core the runtime's thread spent 37 µs and the writer's 20 µs
//! of CPU per message, against 6.5 and 6 at saturation. Committing on the caller's thread took
//! 15% off the CPU per message at that rate (`bench/pairs`, in BENCHMARKS.md).
//!
//! Here the caller that queues a job while nobody is committing becomes the committer: it
//! yields to its runtime, so that every task that is ready to run can queue its own job, and
//! again while a turn of the runtime queued more (at most [`GATHER_TURNS`] times); then it
//! commits everything queued, in transactions of at most [`MAX_BATCH`] jobs. The other callers
//! only wait for their answers. A batch therefore holds what the runtime had to do at that
//! moment: one job when it was idle, hundreds under load, and nobody waits for a batch to fill.
//!
//! One committer rather than every caller yielding and the first one back committing: tokio
//! wakes a task that yielded at its next maintenance (every 61 task polls) as well as when its
//! run queue empties, so at saturation the first caller back often found only its own job
//! queued (40% of the commits held one job, 30 jobs a commit on average), and each caller's
//! yield cost a poll. With one committer that waits while turns bring more jobs, commits at
//! saturation hold 147 jobs on average and 5% of them one; the gateway did 1.04x the round
//! trips at 0.95x the CPU per message (BENCHMARKS.md).
//!
//! A caller's thread serves others, so it never waits for the database: when the writer thread
//! has it (writing a merge, or jobs handed to it), or another connection holds SQLite's write
//! lock (the checkpointer's RESTART, the CLI), the queued jobs are handed to the writer thread,
//! which waits for them. Work that takes long, such as a purge, goes to the writer thread in
//! any case ([`Committer::run_on_writer`]), as do the merges a commit finds due and the write
//! of a full entry log into SQLite.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::MAX_BATCH;
use super::lock_wait::NoWait;
use super::writer::{self, Batch, Job, Shared, Work};
use crate::{Result, StoreError};

/// Where jobs are queued and who commits them.
pub(super) struct Committer {
    shared: Arc<Shared>,
    /// Jobs queued and not yet taken into a batch, and whether a caller has taken on
    /// committing them.
    queued: Mutex<Queue>,
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
            queued: Mutex::new(Queue::default()),
            admission: Arc::new(Semaphore::new(capacity)),
            capacity,
            writer,
        }
    }

    /// Runs `work` in a batch's transaction, and resolves with its result once that
    /// transaction has committed. `work` may run twice (see [`writer`]).
    ///
    /// The caller may be the committer of other callers' jobs too, so the future must be
    /// polled to the end or dropped (dropping it commits what is queued), not kept aside
    /// unpolled, as every future of the store's callers is.
    pub(super) async fn run<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Batch<'_>) -> Result<T> + Send + 'static,
    {
        self.run_as(work, false).await
    }

    /// Runs `work` like [`Committer::run`]; if `appends_only`, in a batch that may go to the
    /// entry log (see [`writer::log_batch`]), for which `work` must write nothing but the
    /// entries it appends through the batch's appends.
    pub(super) async fn run_as<T, F>(&self, work: F, appends_only: bool) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Batch<'_>) -> Result<T> + Send + 'static,
    {
        let (job, answer) = writer::job(work, self.admit().await?, appends_only);
        let commits = {
            let mut queue = self.queue();
            queue.jobs.push(job);
            !std::mem::replace(&mut queue.committer, true)
        };
        if commits {
            // Committed when this guard is dropped: once gathered, or, should the caller give
            // up meanwhile, then, so that a job is never left queued with nobody to commit it.
            let flush = Flush(self);
            self.gather().await;
            drop(flush);
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Runs `work` like [`Committer::run`], always on the writer thread: for work that may
    /// take long, which must not hold up the thread of a caller serving others.
    pub(super) async fn run_on_writer<T, F>(&self, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnMut(&mut Batch<'_>) -> Result<T> + Send + 'static,
    {
        let (job, answer) = writer::job(work, self.admit().await?, false);
        self.hand_over(vec![job]);
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Yields to the runtime until one of its turns queues no further job, a batch is full,
    /// or [`GATHER_TURNS`] turns have passed: the messages the runtime is processing queue
    /// their jobs meanwhile, and join this batch.
    async fn gather(&self) {
        let mut queued = self.queue().jobs.len();
        for _ in 0..GATHER_TURNS {
            tokio::task::yield_now().await;
            let now = self.queue().jobs.len();
            if now <= queued || now >= MAX_BATCH {
                break;
            }
            queued = now;
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn admit(&self) -> Result<OwnedSemaphorePermit> {
        Arc::clone(&self.admission)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Commits every queued job on this thread, in batches of at most [`MAX_BATCH`], until
    /// none is left, or hands them to the writer thread if the database is busy. Jobs another
    /// thread queues meanwhile join the next batch: this caller is their committer.
    fn flush(&self) {
        loop {
            let jobs = self.take(MAX_BATCH);
            if jobs.is_empty() {
                return;
            }
            self.commit(jobs);
        }
    }

    /// Commits `jobs` in one transaction on this thread, or hands them, with every queued job,
    /// to the writer thread if the database is busy.
    fn commit(&self, mut jobs: Vec<Box<dyn Job>>) {
        // A merge slice the writer thread owes comes before the next batch, as it would on
        // the writer thread alone, and so does the write of a full entry log, which is the
        // writer thread's: the jobs queue behind them.
        let Some(mut database) = self
            .shared
            .try_database()
            .filter(|database| !self.shared.merge_owed() && !database.log_full())
        else {
            jobs.append(&mut self.take(usize::MAX));
            return self.hand_over(jobs);
        };
        let _no_wait = NoWait::begin();
        if writer::log_batch(&mut database, &mut jobs) {
            database.ask_for_apply(&self.writer);
            if database.any_merge_due() {
                self.shared.ask_for_merge(&self.writer);
            }
            return;
        }
        // The writer thread is writing the entries of the log's file that filled, and writes
        // them first in a transaction of its own; the jobs wait for that with it.
        if database.applying() {
            drop(database);
            return self.hand_over(jobs);
        }
        if writer::begin(&mut database).is_err() {
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

    /// Takes up to `most` queued jobs, oldest first. Taking the last one ends the committer's
    /// charge: the next caller to queue a job commits it.
    fn take(&self, most: usize) -> Vec<Box<dyn Job>> {
        let mut queue = self.queue();
        let taken = queue.jobs.len().min(most);
        let jobs: Vec<_> = queue.jobs.drain(..taken).collect();
        if queue.jobs.is_empty() {
            queue.committer = false;
        }
        jobs
    }

    /// Gives `jobs` to the writer thread. Should it have stopped, the jobs are dropped and
    /// their callers learn that the store is closed.
    fn hand_over(&self, jobs: Vec<Box<dyn Job>>) {
        if !jobs.is_empty() {
            self.writer.send(Work::Jobs(jobs)).ok();
            self.shared.jobs_handed_over();
        }
    }
}

/// The jobs queued, and whether a caller has taken on committing them.
#[derive(Default)]
struct Queue {
    jobs: Vec<Box<dyn Job>>,
    /// Set by the caller that queues a job while it is clear, cleared when the queue is
    /// emptied: while it is set, the jobs queued have a committer.
    committer: bool,
}

/// How many turns of the runtime a committer waits at most for more jobs. Each turn it waits
/// is a turn its own message waits too: at saturation, two turns gathered nearly all that four
/// did (1.01x the round trips with four, in pairs) at a lower median latency (0.78x).
const GATHER_TURNS: usize = 2;

/// Commits what is queued when dropped (see [`Committer::run`]).
struct Flush<'a>(&'a Committer);

impl Drop for Flush<'_> {
    fn drop(&mut self) {
        self.0.flush();
    }
}
