//! The writer thread: it owns the connection and runs the queued jobs in batches, one
//! transaction per batch, answering each caller only after the commit.
//!
//! A batch first runs its jobs bare, one after the other in the transaction. That is the
//! common case, and the cheap one: isolating each job in a savepoint makes SQLite copy every
//! page the job touches into a savepoint journal, which cost a quarter of the writer's time.
//! If any job fails, the whole transaction is rolled back and the batch runs again with each
//! job in its own savepoint, so that a failing job undoes only its own statements and the
//! others commit. A job must therefore be able to run twice, which is why its work is `FnMut`.

use std::ops::Deref;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::MAX_BATCH;
use super::history::HistoryHeads;
use crate::{HistoryEntry, Result, StoreError};

/// What the writer thread owns: the connection, and the state derived from the database that
/// is kept in memory (see [`super::history`]).
pub(super) struct Database {
    pub(super) conn: Connection,
    pub(super) history: HistoryHeads,
}

impl Database {
    pub(super) fn append_history(&mut self, app: &str, entries: &[HistoryEntry]) -> Result<()> {
        self.history.append(&self.conn, app, entries)
    }

    /// Appends the entry whose reply is the response of the dedup row `message_id`.
    pub(super) fn append_reply_of(
        &mut self,
        app: &str,
        entry: &HistoryEntry,
        message_id: i64,
    ) -> Result<()> {
        self.history
            .append_reply_of(&self.conn, app, entry, message_id)
    }

    /// Reads the history heads' tail back after a rollback, so that it says again what the
    /// database holds.
    fn reload_history(&mut self) -> Result<()> {
        self.history.reload(&self.conn)
    }
}

/// Jobs that only run statements use the database as the connection it is.
impl Deref for Database {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// A unit of work queued for the writer.
pub(super) trait Job: Send {
    /// Runs the work in the open transaction, bare or in a savepoint of its own; says whether
    /// it succeeded. A later attempt replaces the outcome of an earlier one.
    fn attempt(&mut self, database: &mut Database, isolated: bool) -> bool;

    /// Hands the outcome, or the batch's failure, to the caller.
    fn settle(self: Box<Self>, batch: Result<(), &StoreError>);
}

/// A job and the caller waiting for its result.
struct Pending<T, F> {
    work: F,
    outcome: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
}

/// A job for `work`, and where its result will arrive.
pub(super) fn job<T, F>(work: F) -> (Box<dyn Job>, oneshot::Receiver<Result<T>>)
where
    T: Send + 'static,
    F: FnMut(&mut Database) -> Result<T> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let pending = Pending {
        work,
        outcome: None,
        reply,
    };
    (Box::new(pending), answer)
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnMut(&mut Database) -> Result<T> + Send,
{
    fn attempt(&mut self, database: &mut Database, isolated: bool) -> bool {
        // Bare, a failure rolls the whole batch back, and the history heads' tail is read back.
        let outcome = if isolated {
            in_savepoint(database, &mut self.work)
        } else {
            (self.work)(database)
        };
        let succeeded = outcome.is_ok();
        self.outcome = Some(outcome);
        succeeded
    }

    fn settle(self: Box<Self>, batch: Result<(), &StoreError>) {
        let result = match (batch, self.outcome) {
            (Ok(()), Some(outcome)) => outcome,
            (Err(err), _) => Err(StoreError::Batch(err.to_string())),
            (Ok(()), None) => Err(StoreError::Batch("the job did not run".into())),
        };
        // The caller may have given up (its task was cancelled); the work is committed either
        // way, and there is nobody left to tell.
        self.reply.send(result).ok();
    }
}

/// Runs `work` so that a failure undoes only its own statements, not the batch's.
fn in_savepoint<T>(
    database: &mut Database,
    work: impl FnOnce(&mut Database) -> Result<T>,
) -> Result<T> {
    // Cached statements: `execute_batch` would parse the SQL again for every job.
    database.prepare_cached("SAVEPOINT job")?.execute([])?;
    let rows = database.history.rows();
    let outcome = work(database);
    if outcome.is_err() {
        database.prepare_cached("ROLLBACK TO job")?.execute([])?;
        // The job's history rows are gone, and so must their entries be.
        if database.history.rows() != rows {
            database.reload_history()?;
        }
    }
    database.prepare_cached("RELEASE job")?.execute([])?;
    outcome
}

/// The writer thread's loop: takes up to [`MAX_BATCH`] queued jobs at a time until every
/// sender is gone.
pub(super) fn write_loop(mut database: Database, mut queue: mpsc::Receiver<Box<dyn Job>>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.blocking_recv_many(&mut batch, MAX_BATCH) > 0 {
        let result = run_batch(&mut database, &mut batch);
        if let Err(err) = &result {
            tracing::error!(error = %err, jobs = batch.len(), "store transaction failed");
            rollback(&mut database);
        }
        for job in batch.drain(..) {
            job.settle(result.as_ref().map(|_| ()));
        }
        // After the callers have their answers, so that a merge never delays them.
        if database.history.merge_due() {
            merge_history_heads(&mut database);
        }
    }
}

/// Runs a batch in one transaction: bare first, and again with a savepoint per job if a job
/// failed (see the module's documentation).
fn run_batch(database: &mut Database, jobs: &mut [Box<dyn Job>]) -> Result<()> {
    database.execute_batch("BEGIN IMMEDIATE")?;
    let clean = jobs.iter_mut().all(|job| job.attempt(database, false));
    if !clean {
        database.execute_batch("ROLLBACK")?;
        database.reload_history()?;
        database.execute_batch("BEGIN IMMEDIATE")?;
        for job in jobs.iter_mut() {
            job.attempt(database, true);
        }
    }
    database.execute_batch("COMMIT")?;
    Ok(())
}

/// Undoes the open transaction, if any: none of a failed batch may stand, and the history
/// index's tail must again say what the database holds.
fn rollback(database: &mut Database) {
    // A failed COMMIT can leave the transaction open.
    if !database.is_autocommit()
        && let Err(err) = database.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %err, "store rollback failed");
    }
    if let Err(err) = database.reload_history() {
        tracing::error!(error = %err, "history heads tail could not be read back");
    }
}

/// Merges the history heads' tail into the database in a transaction of its own, so that a
/// failure costs no caller its write; the merge is then tried again after the next batch.
fn merge_history_heads(database: &mut Database) {
    let merge = |database: &Database| -> Result<()> {
        database.execute_batch("BEGIN IMMEDIATE")?;
        database.history.merge(database)?;
        database.execute_batch("COMMIT")?;
        Ok(())
    };
    let started = std::time::Instant::now();
    match merge(database) {
        Ok(()) => {
            tracing::debug!(
                rows = database.history.rows(),
                ms = started.elapsed().as_millis(),
                "history heads merged"
            );
            database.history.merged();
        }
        Err(err) => {
            tracing::error!(error = %err, "history heads merge failed; tried again later");
            rollback(database);
        }
    }
}
