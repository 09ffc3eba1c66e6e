//! Batches, and the writer thread: a batch's jobs run in one transaction, and each caller is
//! answered only after the commit. A batch runs on the thread of the caller that commits it
//! (see [`super::committer`]) or, when that thread cannot have the database, on the writer
//! thread, which also writes the tails' merges.
//!
//! A batch first runs its jobs bare, one after the other in the transaction. That is the
//! common case, and the cheap one: isolating each job in a savepoint makes SQLite copy every
//! page the job touches into a savepoint journal, which cost a quarter of the writer's time.
//! If any job fails, the whole transaction is rolled back and the batch runs again with each
//! job in its own savepoint, so that a failing job undoes only its own statements and the
//! others commit. A job must therefore be able to run twice, which is why its work is `FnMut`.
//! The same happens, rarely, when a record appended as a history entry turns out to have a
//! merged key (its message was recorded long ago): records' keys are looked up all at once at
//! the end of the bare run ([`super::dedup::Assumed`]), and one at a time in the run again.
//!
//! A batch whose jobs only append entries (the echo's records) goes to the entry log instead
//! of a transaction ([`log_batch`], [`super::entry_log`]): its jobs run with no transaction
//! open, and their callers are answered once the entries are written to the log. Should one
//! of them fail, or a record's key turn out to be merged, the batch runs as any other. When a
//! file of the log is full, its entries are frozen and written into SQLite by the writer
//! thread on a connection of its own, without the database in hand ([`apply_frozen`]);
//! batches go on into the log's other file meanwhile, and only a transaction waits for that
//! write (it is the writer thread's until then).

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread;

use rusqlite::Connection;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::MAX_BATCH;
use super::chunks;
use super::dedup::{DEDUP_MERGE_SLICE_ROWS, DedupKeys, TakenRun};
use super::entry_log::EntryLog;
use super::history::{Appends, HISTORY_MERGE_SLICE_ROWS, HistoryHeads, TakenHeads};
use crate::{HistoryEntry, Result, StoreError};

/// What the writer thread owns: the connection, and the state derived from the database that
/// is kept in memory, the tails (see [`super::history`] and [`super::dedup`]), with the
/// entries the entry log holds.
pub(super) struct Database {
    pub(super) conn: Connection,
    pub(super) history: HistoryHeads,
    pub(super) dedup: DedupKeys,
    /// Entries appended and not in `history_chunks` yet: between batches, those the entry
    /// log holds.
    pending: chunks::Pending,
    /// How many of the entries in `pending` the log holds: the rest, if any, are the batch's
    /// being run.
    logged: usize,
    /// The entry log, unless the store writes every batch into SQLite: a shared store, the
    /// log turned off, or failed.
    log: Option<EntryLog>,
    /// How many bytes of entries a file of the log holds at most before they are written into
    /// SQLite.
    log_bytes: usize,
    /// The entries of the log's other file, which filled: shared with the writer thread,
    /// which writes them into SQLite on a connection of its own ([`apply_frozen`]), and read
    /// here until it has. While there are any, every transaction is the writer thread's, which
    /// writes them first.
    frozen: Option<Arc<chunks::Pending>>,
    /// The memory of the entries last frozen, once written, for the next file's: grown anew
    /// from nothing each time, and copied at each doubling, a file's entries cost the
    /// runtime's thread about 250 more instructions per message at saturation
    /// (`bench/instructions`: `Pending::hold` 644 against 392).
    spare: Option<chunks::Pending>,
    /// Whether the tails may name entries that are gone (a batch sent to the log failed after
    /// its jobs ran): read back at the next [`begin`], once the log is written into SQLite,
    /// and no batch goes to the log, nor merge begins, until then.
    tails_stale: bool,
}

impl Database {
    /// The database on `conn`, whose tails are read, every batch written into SQLite.
    pub(super) fn new(conn: Connection, history: HistoryHeads, dedup: DedupKeys) -> Self {
        Self {
            conn,
            history,
            dedup,
            pending: chunks::Pending::default(),
            logged: 0,
            log: None,
            log_bytes: 0,
            tails_stale: false,
            frozen: None,
            spare: None,
        }
    }

    /// Sends batches that only append entries to `log` from now on, written into SQLite
    /// once it holds `bytes` of them.
    pub(super) fn log_to(&mut self, log: EntryLog, bytes: usize) {
        self.log = Some(log);
        self.log_bytes = bytes;
    }

    /// The database as a batch's jobs see it.
    fn batch(&mut self) -> Batch<'_> {
        Batch {
            conn: &self.conn,
            history: &mut self.history,
            dedup: &mut self.dedup,
            appends: Appends::new(&self.conn, &mut self.pending).reading(self.frozen.as_deref()),
        }
    }

    /// The database as the jobs of a batch sent to the entry log see it.
    fn logged_batch(&mut self) -> Batch<'_> {
        let mut batch = self.batch();
        batch.appends.only_gather();
        batch
    }

    /// Reads the tails back after a rollback, so that they say again what the database holds.
    fn reload_tails(&mut self) -> Result<()> {
        self.batch().reload_tails()
    }

    /// Whether `jobs` go to the entry log: there is one with room, the tails are sound, and
    /// every job only appends entries.
    fn logs(&self, jobs: &[Box<dyn Job>]) -> bool {
        self.log.is_some()
            && !self.tails_stale
            && !self.log_full()
            && jobs.iter().all(|job| job.appends_only())
    }

    /// Whether the entry log's current file holds all it may. The batch that fills it freezes
    /// it at once if the other file is free ([`Database::ask_for_apply`]), so it stays full
    /// only while the other's entries are still being written into SQLite: no batch goes to
    /// the log until then.
    pub(super) fn log_full(&self) -> bool {
        self.log.is_some() && self.pending.bytes() >= self.log_bytes
    }

    /// Whether a transaction must wait for the writer thread: it writes the entries of the
    /// log's full file into SQLite, and a transaction begins once they are there.
    pub(super) fn applying(&self) -> bool {
        self.frozen.is_some()
    }

    /// If the log's current file is full and the other is empty, freezes the entries it holds
    /// for the writer thread to write into SQLite ([`apply_frozen`]), and sends the batches
    /// to the other file from then on; says whether it did.
    fn freeze_if_full(&mut self) -> bool {
        if !self.log_full() || self.frozen.is_some() {
            return false;
        }
        let Some(log) = &mut self.log else {
            return false;
        };
        log.rotate();
        let next = self.spare.take().unwrap_or_default();
        self.frozen = Some(Arc::new(std::mem::replace(&mut self.pending, next)));
        self.logged = 0;
        true
    }

    /// Asks the writer thread to write the log's current file into SQLite if it is full.
    /// Called by a batch on a caller's thread, which does not write it itself: there the
    /// write (about 0.3 ms at 64 KiB) held up every connection that thread serves, and a
    /// quarter of the messages slower than 0.5 ms at 10 000 messages/s had waited during one
    /// (`BENCHMARKS.md`).
    pub(super) fn ask_for_apply(&mut self, writer: &mpsc::Sender<Work>) {
        if self.freeze_if_full() {
            writer.send(Work::ApplyLog).ok();
        }
    }

    /// The writer thread wrote `frozen` into SQLite: they are let go of (their memory kept
    /// for the next), and the log's file that held them emptied. Says whether the current
    /// file filled meanwhile, and its entries are frozen in turn.
    fn applied(&mut self, frozen: Arc<chunks::Pending>) -> bool {
        if self
            .frozen
            .take_if(|current| Arc::ptr_eq(current, &frozen))
            .is_none()
        {
            return false;
        }
        if let Ok(mut spare) = Arc::try_unwrap(frozen) {
            spare.discard();
            self.spare = Some(spare);
        }
        self.clear_log(EntryLog::clear_previous);
        self.freeze_if_full()
    }

    /// Empties what `clear` empties of the log; a log that cannot be emptied is given up.
    fn clear_log(&mut self, clear: fn(&mut EntryLog) -> std::io::Result<()>) {
        if let Some(log) = &mut self.log
            && let Err(err) = clear(log)
        {
            tracing::error!(error = %err, "the entry log could not be emptied; every batch is written into SQLite from now on");
            self.log = None;
        }
    }

    /// Writes the entries after the first `kept` to the log; says whether they are there.
    /// A log that failed is given up: from then on every batch is written into SQLite.
    fn append_to_log(&mut self, kept: usize) -> bool {
        let Some(log) = &mut self.log else {
            return false;
        };
        match log.append(self.pending.since(kept)) {
            Ok(()) => true,
            Err(err) => {
                tracing::error!(error = %err, "the entry log could not be written; every batch is written into SQLite from now on");
                self.log = None;
                false
            }
        }
    }

    /// Writes the entries the log holds, in both its files, into `history_chunks`, in a
    /// transaction of their own, and empties the log. Called between batches, with no
    /// transaction open, on the writer thread if entries are frozen.
    fn apply_log(&mut self) -> Result<()> {
        debug_assert_eq!(
            self.pending.len(),
            self.logged,
            "a batch's entries are gathered"
        );
        if self.pending.is_empty() && self.frozen.is_none() {
            return Ok(());
        }
        let mut chunk = Vec::new();
        let parts = self.frozen.as_deref().into_iter().chain([&self.pending]);
        write_logged(&self.conn, parts, &mut chunk)?;
        self.pending.discard();
        self.logged = 0;
        self.frozen = None;
        self.clear_log(EntryLog::clear);
        Ok(())
    }

    /// Whether a tail has a merge, or the next slice of one, to write.
    pub(super) fn any_merge_due(&self) -> bool {
        self.merge_due(Tail::HistoryHeads) || self.merge_due(Tail::DedupKeys)
    }

    fn merge_due(&self, tail: Tail) -> bool {
        match tail {
            Tail::HistoryHeads => self.history.merge_due(),
            Tail::DedupKeys => self.dedup.merge_due(),
        }
    }

    /// Whether a tail has a slice to write now: once its run is sorted ([`sort_runs`]).
    fn slice_ready(&self, tail: Tail) -> bool {
        match tail {
            Tail::HistoryHeads => self.history.run_begun(),
            Tail::DedupKeys => self.dedup.run_begun(),
        }
    }

    /// Whether a merge under way is behind its pace: its slice must go on while jobs wait.
    fn merge_behind(&self) -> bool {
        self.history.merge_behind() || self.dedup.merge_behind()
    }

    /// Writes the next `rows` of the merge [`sort_runs`] began into the tail's table, in the
    /// open transaction; says whether the merge's last rows are written.
    fn merge(&mut self, tail: Tail, rows: usize) -> Result<bool> {
        match tail {
            Tail::HistoryHeads => self.history.merge(&self.conn, rows),
            Tail::DedupKeys => self.dedup.merge(&self.conn, rows),
        }
    }

    /// The merge committed: the tail lets go of what its table has now.
    fn merged(&mut self, tail: Tail) {
        match tail {
            Tail::HistoryHeads => self.history.merged(),
            Tail::DedupKeys => self.dedup.merged(),
        }
    }
}

/// The state kept in memory that is merged into its table between batches.
#[derive(Debug, Clone, Copy)]
enum Tail {
    /// The conversations' newest entries, into `history_heads`.
    HistoryHeads,
    /// The keys of the newest dedup rows, into the merged keys.
    DedupKeys,
}

/// The transaction statements and merges use the database as the connection it is.
impl Deref for Database {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

/// What a batch's jobs run on: the database, with the statements that each job of a batch runs
/// prepared once for the batch.
pub(super) struct Batch<'a> {
    pub(super) conn: &'a Connection,
    pub(super) history: &'a mut HistoryHeads,
    pub(super) dedup: &'a mut DedupKeys,
    pub(super) appends: Appends<'a>,
}

impl Batch<'_> {
    /// Appends entries to the history of the app's conversations, through the batch's
    /// statements.
    pub(super) fn append_history(&mut self, app: &str, entries: &[HistoryEntry]) -> Result<()> {
        self.history.append(&mut self.appends, app, entries)
    }

    /// Rows appended to each tail since it was last read back or merged: a job that changed
    /// them and was rolled back took rows the tails still name.
    fn appended(&self) -> [usize; 2] {
        [self.history.rows(), self.dedup.rows()]
    }

    /// Reads the tails back after a rollback, so that they say again what the database holds;
    /// the entries gathered and not written went with the rolled-back statements.
    fn reload_tails(&mut self) -> Result<()> {
        self.appends.discard();
        self.history.reload(self.conn)?;
        self.dedup.reload(self.conn)
    }
}

/// Jobs that only run statements use the batch as the connection it is.
impl Deref for Batch<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
    }
}

/// A unit of work queued for the writer.
pub(super) trait Job: Send {
    /// Runs the work in the open transaction, bare or in a savepoint of its own; says whether
    /// it succeeded. A later attempt replaces the outcome of an earlier one.
    fn attempt(&mut self, batch: &mut Batch<'_>, isolated: bool) -> bool;

    /// Hands the outcome, or the batch's failure, to the caller.
    fn settle(self: Box<Self>, batch: Result<(), &StoreError>);

    /// Whether the job only appends entries (and reads), so that it may go to the entry log.
    fn appends_only(&self) -> bool;
}

/// A job and the caller waiting for its result.
struct Pending<T, F> {
    work: F,
    outcome: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
    /// Whether `work` only appends entries.
    appends_only: bool,
    /// The job's place among those the store admits at once, given back when it is dropped.
    _admitted: OwnedSemaphorePermit,
}

/// A job for `work`, holding its place `admitted` until it is settled, and where its result
/// will arrive. `appends_only` says that `work` writes nothing but entries appended through
/// the batch's [`Appends`] (it may read anything), so that its batch may go to the entry log.
pub(super) fn job<T, F>(
    work: F,
    admitted: OwnedSemaphorePermit,
    appends_only: bool,
) -> (Box<dyn Job>, oneshot::Receiver<Result<T>>)
where
    T: Send + 'static,
    F: FnMut(&mut Batch<'_>) -> Result<T> + Send + 'static,
{
    let (reply, answer) = oneshot::channel();
    let pending = Pending {
        work,
        outcome: None,
        reply,
        appends_only,
        _admitted: admitted,
    };
    (Box::new(pending), answer)
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnMut(&mut Batch<'_>) -> Result<T> + Send,
{
    fn attempt(&mut self, batch: &mut Batch<'_>, isolated: bool) -> bool {
        // Bare, a failure rolls the whole batch back, and the history heads' tail is read back.
        let outcome = if isolated {
            in_savepoint(batch, &mut self.work)
        } else {
            (self.work)(batch)
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

    fn appends_only(&self) -> bool {
        self.appends_only
    }
}

/// Runs `work` so that a failure undoes only its own statements, not the batch's.
fn in_savepoint<T>(
    batch: &mut Batch<'_>,
    work: impl FnOnce(&mut Batch<'_>) -> Result<T>,
) -> Result<T> {
    // Cached statements: `execute_batch` would parse the SQL again for every job.
    batch.prepare_cached("SAVEPOINT job")?.execute([])?;
    let appended = batch.appended();
    // The job's entries are written inside its savepoint: they go with it if it fails, and
    // are in the database when a later job's failure reads the tails back from it.
    let outcome = work(batch).and_then(|outcome| batch.appends.write().map(|()| outcome));
    if outcome.is_err() {
        batch.appends.discard();
        batch.prepare_cached("ROLLBACK TO job")?.execute([])?;
        // The job's rows are gone, and so must the tails' entries for them be.
        if batch.appended() != appended {
            batch.reload_tails()?;
        }
    }
    batch.prepare_cached("RELEASE job")?.execute([])?;
    outcome
}

/// The database, shared by the threads that commit to it.
pub(super) struct Shared {
    database: Mutex<Database>,
    /// Whether the writer thread has been asked to write merge slices and has not begun yet:
    /// it is asked once, however many batches find a merge due meanwhile. Set and cleared
    /// only with the database in hand, so that whoever holds it knows whether a slice is
    /// owed before the next batch.
    merge_asked: AtomicBool,
    /// Whether jobs were handed to the writer thread since it last took them: a merge's slice
    /// then ends early, unless the merge is behind its pace, so that they wait for one step of
    /// it and not the whole slice.
    jobs_waiting: AtomicBool,
}

impl Shared {
    pub(super) fn new(database: Database) -> Self {
        Self {
            database: Mutex::new(database),
            merge_asked: AtomicBool::new(false),
            jobs_waiting: AtomicBool::new(false),
        }
    }

    /// Says that jobs were handed to the writer thread.
    pub(super) fn jobs_handed_over(&self) {
        self.jobs_waiting.store(true, Ordering::Release);
    }

    /// The database, unless another thread has it.
    pub(super) fn try_database(&self) -> Option<MutexGuard<'_, Database>> {
        match self.database.try_lock() {
            Ok(database) => Some(database),
            Err(std::sync::TryLockError::WouldBlock) => None,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                Some(self.recover(poisoned.into_inner()))
            }
        }
    }

    /// The database, once no other thread has it.
    fn database(&self) -> MutexGuard<'_, Database> {
        self.database
            .lock()
            .unwrap_or_else(|poisoned| self.recover(poisoned.into_inner()))
    }

    /// A thread panicked with the database: whatever it left undone is rolled back.
    fn recover<'a>(&self, mut database: MutexGuard<'a, Database>) -> MutexGuard<'a, Database> {
        rollback(&mut database);
        self.database.clear_poison();
        database
    }

    /// Asks the writer thread for merge slices, unless it was asked and has not begun. Called
    /// with the database in hand.
    pub(super) fn ask_for_merge(&self, writer: &mpsc::Sender<Work>) {
        if !self.merge_asked.swap(true, Ordering::AcqRel) {
            writer.send(Work::Merge).ok();
        }
    }

    /// Whether the writer thread owes a merge slice: a batch committed now would come before
    /// it. Asked with the database in hand.
    pub(super) fn merge_owed(&self) -> bool {
        self.merge_asked.load(Ordering::Acquire)
    }
}

/// What the writer thread is handed.
pub(super) enum Work {
    /// Jobs their callers' threads could not commit: the database was busy. The writer thread
    /// waits for it.
    Jobs(Vec<Box<dyn Job>>),
    /// A tail's merge is due.
    Merge,
    /// A file of the entry log filled: its entries, frozen, are to be written into SQLite.
    ApplyLog,
}

/// The writer thread's loop, until every sender is gone: takes everything handed to it so far,
/// writes the merge slice it was asked for first (the jobs were handed over behind it), then
/// runs the jobs in batches of at most [`MAX_BATCH`], each followed by the next slice of a
/// merge if one is due. Jobs are handed over a few at a time, by each caller that found the
/// database busy; run in a transaction each, they had cost a commit apiece just when the
/// writer was behind.
///
/// Before it waits for more, it writes the entries of the log's file that filled into SQLite
/// on `log_conn`, its connection for them, with the database let go ([`apply_frozen`]).
pub(super) fn write_loop(
    shared: &Shared,
    work: &mpsc::Receiver<Work>,
    log_conn: Option<&Connection>,
) {
    let mut jobs = Vec::new();
    let mut chunk = Vec::new();
    loop {
        if let Some(conn) = log_conn {
            apply_frozen(shared, conn, &mut chunk);
        }
        let Ok(first) = work.recv() else {
            break;
        };
        let mut database = shared.database();
        let merge = take_handed(shared, Some(first), work, &mut jobs);
        if merge {
            database = write_merge(database, shared, work, &mut jobs);
        }
        while !jobs.is_empty() {
            let mut batch: Vec<_> = jobs.drain(..jobs.len().min(MAX_BATCH)).collect();
            if log_batch(&mut database, &mut batch) {
                database.freeze_if_full();
            } else {
                match begin(&mut database) {
                    Ok(()) => {
                        commit(&mut database, &mut batch);
                    }
                    Err(err) => settle(&mut batch, Err(&err)),
                }
            }
            // After the callers have their answers, so that a merge never delays them.
            database = write_merge(database, shared, work, &mut jobs);
        }
    }
    // The store is closing: what the log holds goes into SQLite, so that a clean stop leaves
    // the log empty.
    if let Err(err) = shared.database().apply_log() {
        tracing::error!(error = %err, "the entry log could not be written into SQLite; it is read back at the next start");
    }
}

/// Takes what was handed to the writer thread, `first` and whatever else the channel holds,
/// into `jobs`; says whether a merge slice was asked for.
fn take_handed(
    shared: &Shared,
    first: Option<Work>,
    work: &mpsc::Receiver<Work>,
    jobs: &mut Vec<Box<dyn Job>>,
) -> bool {
    // Cleared before the channel is drained: jobs handed over after this set it again.
    shared.jobs_waiting.store(false, Ordering::Release);
    let mut merge = false;
    for next in first.into_iter().chain(work.try_iter()) {
        match next {
            Work::Jobs(handed) => jobs.extend(handed),
            Work::Merge => merge = true,
            // The frozen entries are written before the writer thread waits again.
            Work::ApplyLog => {}
        }
    }
    if merge {
        shared.merge_asked.store(false, Ordering::Release);
    }
    merge
}

/// Writes the next slice of every merge that is due. A slice during which jobs were handed
/// over ends early, unless a merge is behind its pace, and commits with them (as many as a
/// batch holds), so that they wait for a step of it and their own work, not for the slice's
/// commit and then theirs. A merge that
/// begins while no job waits here has its run sorted with the database let go (see
/// [`sort_runs`]).
fn write_merge<'a>(
    database: MutexGuard<'a, Database>,
    shared: &'a Shared,
    work: &mpsc::Receiver<Work>,
    jobs: &mut Vec<Box<dyn Job>>,
) -> MutexGuard<'a, Database> {
    // A run taken from tails that may name entries that are gone would write their keys.
    if database.tails_stale {
        return database;
    }
    let let_go = jobs.is_empty();
    let mut database = sort_runs(database, shared, let_go);
    let Some(tails) = merge_slices(&mut database, &shared.jobs_waiting) else {
        return database;
    };
    take_handed(shared, None, work, jobs);
    let mut batch: Vec<_> = jobs.drain(..jobs.len().min(MAX_BATCH)).collect();
    if commit(&mut database, &mut batch) {
        for tail in tails {
            database.merged(tail);
        }
    }
    database
}

/// Takes the next run of each tail whose merge is due, sorts them, with the database let go
/// if `let_go`, and begins their merges. Sorted with the database in hand, the runs (32 768
/// keys, the heads of 10 000 conversations) held every batch up for 5 to 12 ms at the start
/// of each merge (the open loop's p99.9 at 10 000 messages/s, and a part of its p99); let go,
/// batches commit on their callers' threads meanwhile, into the tails' next runs. Jobs that
/// already wait for the writer thread wait for the sort either way, and the merge's first
/// slice then comes before them, as it would have.
fn sort_runs<'a>(
    mut database: MutexGuard<'a, Database>,
    shared: &'a Shared,
    let_go: bool,
) -> MutexGuard<'a, Database> {
    let (heads, keys) = (database.history.take_run(), database.dedup.take_run());
    if heads.is_none() && keys.is_none() {
        return database;
    }
    let sort = || (heads.map(TakenHeads::sorted), keys.map(TakenRun::sorted));
    let (mut database, (heads, keys)) = if let_go {
        drop(database);
        let sorted = sort();
        (shared.database(), sorted)
    } else {
        (database, sort())
    };
    if let Some(heads) = heads {
        database.history.begin_run(heads);
    }
    if let Some(keys) = keys {
        database.dedup.begin_run(keys);
    }
    database
}

/// Begins a batch's transaction, once the entries the log holds are written into SQLite (so
/// that while a transaction is open the log is empty), and the tails read back if a batch
/// sent to the log failed. On failure no transaction is left open.
pub(super) fn begin(database: &mut Database) -> Result<()> {
    database.apply_log()?;
    transaction(database, "BEGIN IMMEDIATE")?;
    if database.tails_stale {
        if let Err(err) = database.reload_tails() {
            database.execute_batch("ROLLBACK").ok();
            return Err(err);
        }
        database.tails_stale = false;
    }
    Ok(())
}

/// Runs `jobs` and answers them once the entries they append are in the entry log, with no
/// transaction of SQLite's, if they only append entries and the log has room; says whether
/// it did. Should a job fail, a record's key turn out to be merged, or the log fail, nothing
/// the jobs did stays: their entries are dropped, the tails are read back at the next
/// [`begin`], and the jobs are left to run in a transaction, as any batch.
pub(super) fn log_batch(database: &mut Database, jobs: &mut Vec<Box<dyn Job>>) -> bool {
    if !database.logs(jobs) {
        return false;
    }
    let kept = database.logged;
    let mut batch = database.logged_batch();
    let clean = jobs.iter_mut().all(|job| job.attempt(&mut batch, false))
        && matches!(
            batch.appends.any_assumed_merged(batch.dedup.filter()),
            Ok(false)
        );
    if !(clean && database.append_to_log(kept)) {
        database.pending.truncate(kept);
        database.tails_stale = true;
        return false;
    }
    database.logged = database.pending.len();
    settle(jobs, Ok(()));
    true
}

/// Writes the entries frozen when a file of the log filled into SQLite on `conn`, the writer
/// thread's connection for them, with the database let go: batches go on into the log's
/// other file meanwhile, and find the frozen entries in memory until the transaction has
/// committed. Again if the other file filled meanwhile. A write that fails leaves them
/// frozen, for the next transaction to write first ([`begin`], on this thread).
fn apply_frozen(shared: &Shared, conn: &Connection, chunk: &mut Vec<u8>) {
    let mut frozen = shared.database().frozen.clone();
    while let Some(entries) = frozen {
        if let Err(err) = write_logged(conn, [&*entries], chunk) {
            tracing::warn!(error = %err, "entry log not written into SQLite yet; the next transaction writes it");
            return;
        }
        let mut database = shared.database();
        frozen = if database.applied(entries) {
            database.frozen.clone()
        } else {
            None
        };
    }
}

/// Writes the entries of `parts`, oldest first, into `history_chunks`, and notes the newest
/// as written, in a transaction of its own on `conn`; a failure leaves no transaction open.
fn write_logged<'a>(
    conn: &Connection,
    parts: impl IntoIterator<Item = &'a chunks::Pending>,
    chunk: &mut Vec<u8>,
) -> Result<()> {
    transaction(conn, "BEGIN IMMEDIATE")?;
    let write = || {
        let mut newest = None;
        for part in parts {
            part.write_chunks(conn, chunk)?;
            if !part.is_empty() {
                newest = Some(part);
            }
        }
        if let Some(newest) = newest {
            super::entry_log::set_applied(conn, newest)?;
        }
        transaction(conn, "COMMIT")
    };
    let written = write();
    if written.is_err() && !conn.is_autocommit() {
        conn.execute_batch("ROLLBACK").ok();
    }
    written
}

/// Runs the jobs in the transaction [`begin`] opened, commits, and answers their callers.
pub(super) fn commit(database: &mut Database, jobs: &mut Vec<Box<dyn Job>>) -> bool {
    let result = run_batch(database, jobs);
    if let Err(err) = &result {
        tracing::error!(error = %err, jobs = jobs.len(), "store transaction failed");
        rollback(database);
    }
    settle(jobs, result.as_ref().map(|_| ()));
    result.is_ok()
}

/// Answers every job's caller.
fn settle(jobs: &mut Vec<Box<dyn Job>>, batch: Result<(), &StoreError>) {
    for job in jobs.drain(..) {
        job.settle(batch);
    }
}

/// Runs a batch in the open transaction: bare first, and again with a savepoint per job if a
/// job failed or a record was appended whose key was merged (see the module's documentation
/// and [`super::dedup::Assumed`]); then commits.
fn run_batch(database: &mut Database, jobs: &mut [Box<dyn Job>]) -> Result<()> {
    let mut batch = database.batch();
    let clean = jobs.iter_mut().all(|job| job.attempt(&mut batch, false))
        && !batch.appends.any_assumed_merged(batch.dedup.filter())?;
    if !clean {
        transaction(batch.conn, "ROLLBACK")?;
        batch.reload_tails()?;
        batch.appends.look_up_each();
        transaction(batch.conn, "BEGIN IMMEDIATE")?;
        for job in jobs.iter_mut() {
            job.attempt(&mut batch, true);
        }
    }
    batch.appends.write()?;
    transaction(batch.conn, "COMMIT")
}

/// Undoes the open transaction, if any: none of a failed batch may stand, and the tails must
/// again say what the database holds. The entries the log holds stay: they were answered.
fn rollback(database: &mut Database) {
    // A failed COMMIT can leave the transaction open.
    if !database.is_autocommit()
        && let Err(err) = database.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %err, "store rollback failed");
    }
    let logged = database.logged;
    database.pending.truncate(logged);
    if logged > 0 {
        // Only a batch sent to the log fails with entries in it (a transaction begins with
        // the log written): SQLite lacks them until the next transaction writes them.
        database.tails_stale = true;
    } else if let Err(err) = database.reload_tails() {
        tracing::error!(error = %err, "tails could not be read back");
    }
}

/// How many rows of each tail a slice of a merge writes before it looks whether jobs were
/// handed to the writer thread meanwhile, and ends early if some were and no merge is behind
/// its pace: a batch then waits for a step of the merge, not a whole slice. A whole slice of 1 024 keys and heads had held up
/// the batches behind it for 1 to 3 ms at 10 000 messages/s, and the merges' slices were most
/// of the open loop's p99 (BENCHMARKS.md).
const MERGE_STEP_ROWS: usize = 128;

/// Writes the next slice of every tail whose merge is due, in a transaction of its own, so
/// that a failing slice costs no caller its write; the slices are then tried again after the
/// next batch. One transaction for both tails: each commit that split index pages out of order
/// walks SQLite's whole page cache once, whatever it wrote. A slice is written a step of
/// [`MERGE_STEP_ROWS`] per tail at a time, and ends early, after at least one step, once
/// `jobs_waiting` says jobs were handed over, unless a merge is behind its pace
/// ([`Database::merge_behind`]): its transaction is then left open for them, and the tails it
/// wrote are returned, to be told [`Database::merged`] once it commits.
fn merge_slices(database: &mut Database, jobs_waiting: &AtomicBool) -> Option<Vec<Tail>> {
    let due = [Tail::HistoryHeads, Tail::DedupKeys].map(|tail| database.slice_ready(tail));
    if !due.contains(&true) {
        return None;
    }
    let tails: Vec<Tail> = [Tail::HistoryHeads, Tail::DedupKeys]
        .into_iter()
        .zip(due)
        .filter_map(|(tail, due)| due.then_some(tail))
        .collect();
    // Whether the slice ended early for jobs, its transaction left open for them.
    let attempt = |database: &mut Database| -> Result<bool> {
        let slices = [HISTORY_MERGE_SLICE_ROWS, DEDUP_MERGE_SLICE_ROWS];
        let mut writing = due;
        let mut written = 0;
        while writing.contains(&true) {
            let tails = [Tail::HistoryHeads, Tail::DedupKeys]
                .into_iter()
                .zip(slices);
            for ((tail, slice), writing) in tails.zip(&mut writing) {
                if *writing {
                    *writing = !database.merge(tail, MERGE_STEP_ROWS.min(slice - written))?
                        && written + MERGE_STEP_ROWS < slice;
                }
            }
            written += MERGE_STEP_ROWS;
            if writing.contains(&true) && !database.merge_behind() {
                // On a busy core the runtime's thread may not run again before the slice
                // ends, and only it hands jobs over: it gets to look for them, unless it has
                // already (at saturation it has, and a yield would hold the handed jobs up
                // for the runtime's whole turn on the core).
                if !jobs_waiting.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                if jobs_waiting.load(Ordering::Acquire) {
                    return Ok(true);
                }
            }
        }
        transaction(database, "COMMIT")?;
        Ok(false)
    };
    let started = std::time::Instant::now();
    // A begin that fails leaves nothing to undo: no transaction open, the log as it was.
    if let Err(err) = begin(database) {
        tracing::error!(error = %err, "tail merge not begun; tried again later");
        return None;
    }
    match attempt(database) {
        Ok(true) => return Some(tails),
        Ok(false) => {
            for &tail in &tails {
                database.merged(tail);
            }
            tracing::trace!(us = started.elapsed().as_micros(), "merge slices written");
        }
        Err(err) => {
            tracing::error!(error = %err, "tail merge failed; tried again later");
            rollback(database);
        }
    }
    None
}

/// Runs a transaction statement (`BEGIN IMMEDIATE`, `COMMIT`, `ROLLBACK`) from the statement
/// cache: every batch runs two, and parsing them each time was a few percent of the writer's
/// time when batches are small.
fn transaction(conn: &Connection, statement: &str) -> Result<()> {
    conn.prepare_cached(statement)?.execute([])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::sqlite::key_filter::KeyFilter;

    /// Keys come in faster than a step of a merge writes them, and jobs always wait for the
    /// writer thread, as at saturation: each slice still writes the run at its pace, so that
    /// no run is much longer than a merge's worth of keys.
    #[test]
    fn merges_keep_up_with_keys_while_jobs_wait() {
        let merge_rows = 512;
        let per_batch = 2 * MERGE_STEP_ROWS;
        let conn = Connection::open_in_memory().expect("database");
        super::super::migrate(&conn).expect("tables");
        let history = HistoryHeads::load(&conn, merge_rows).expect("heads");
        let dedup = DedupKeys::load(&conn, merge_rows, KeyFilter::new(Path::new("unused"), 0))
            .expect("keys");
        let mut database = Database::new(conn, history, dedup);
        let jobs_waiting = AtomicBool::new(true);
        let (mut longest_run, mut runs) = (0, 0);
        for batch in 0..100 {
            begin(&mut database).expect("begin");
            for n in 0..per_batch {
                let id = (batch * per_batch + n + 1) as i64;
                database
                    .dedup
                    .inserted_entry("shop", format!("m-{id}").into(), id);
            }
            transaction(&database, "COMMIT").expect("commit");
            let pending = database.dedup.rows();
            if let Some(taken) = database.dedup.take_run() {
                longest_run = longest_run.max(pending);
                runs += 1;
                database.dedup.begin_run(taken.sorted());
            }
            if let Some(tails) = merge_slices(&mut database, &jobs_waiting) {
                transaction(&database, "COMMIT").expect("commit");
                for tail in tails {
                    database.merged(tail);
                }
            }
        }
        assert!(runs > 20, "{runs} runs");
        assert!(
            longest_run <= merge_rows + per_batch,
            "a run of {longest_run} keys"
        );
    }

    /// A database of the store's layout in `dir`, its tails read.
    fn database_in(dir: &Path) -> Database {
        let conn = Connection::open(dir.join("test.sqlite3")).expect("database");
        super::super::migrate(&conn).expect("tables");
        let history = HistoryHeads::load(&conn, 1_000).expect("heads");
        let dedup =
            DedupKeys::load(&conn, 1_000, KeyFilter::new(Path::new("unused"), 0)).expect("keys");
        Database::new(conn, history, dedup)
    }

    /// A job that appends one entry to conversation `c`, and where its answer arrives.
    fn appending(text: &str) -> (Box<dyn Job>, oneshot::Receiver<Result<()>>) {
        let entry = HistoryEntry {
            conversation: "c".into(),
            at_ms: 1,
            message: text.into(),
            reply: None,
        };
        let place = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .expect("a place");
        job(
            move |batch: &mut Batch<'_>| batch.append_history("shop", std::slice::from_ref(&entry)),
            place,
            true,
        )
    }

    /// The texts of conversation `c`, oldest first.
    fn texts(database: &mut Database) -> Vec<String> {
        let mut batch = database.batch();
        let Batch {
            history, appends, ..
        } = &mut batch;
        history.read(appends, "shop", "c", 10).expect("read")
    }

    /// A log that cannot be written is given up, and the batch, and every one after it, is
    /// written into SQLite instead: nothing answered is lost, nothing is answered twice.
    #[test]
    fn a_log_that_fails_is_given_up_for_sqlite() {
        let dir = tempfile::tempdir().expect("dir");
        let mut database = database_in(dir.path());
        let log = EntryLog::open(dir.path(), false).expect("log").0;
        database.log_to(log, 1 << 20);
        let (first, mut first_answer) = appending("logged");
        let mut jobs = vec![first];
        assert!(log_batch(&mut database, &mut jobs), "went to the log");
        assert!(matches!(first_answer.try_recv(), Ok(Ok(()))), "answered");

        let read_only = std::fs::File::open(dir.path().join(super::super::ENTRY_LOG_FILES[0]))
            .expect("read-only");
        let failing = EntryLog::writing_to(read_only).expect("log");
        database.log_to(failing, 1 << 20);
        let (second, mut second_answer) = appending("failed to log");
        let mut jobs = vec![second];
        assert!(!log_batch(&mut database, &mut jobs), "the log failed");
        assert!(database.log.is_none(), "given up");
        assert!(second_answer.try_recv().is_err(), "not answered yet");
        begin(&mut database).expect("begin");
        assert!(commit(&mut database, &mut jobs));
        assert!(matches!(second_answer.try_recv(), Ok(Ok(()))), "answered");
        assert_eq!(texts(&mut database), ["logged", "failed to log"]);

        let (third, mut third_answer) = appending("after");
        let mut jobs = vec![third];
        assert!(!log_batch(&mut database, &mut jobs), "no log any more");
        begin(&mut database).expect("begin");
        assert!(commit(&mut database, &mut jobs));
        assert!(matches!(third_answer.try_recv(), Ok(Ok(()))), "answered");
        assert_eq!(texts(&mut database), ["logged", "failed to log", "after"]);
    }
}
