//! The SQLite store: one connection, which runs every queued job of a batch inside one
//! transaction and answers the callers only after the commit. A batch is committed on the
//! thread of one of its callers, or by the writer thread when that thread may not wait for the
//! database (see [`committer`]).
//!
//! Batching is what makes durability affordable: under load hundreds of claims and completions
//! share one commit, while a lone request still commits at once (nobody waits to fill a
//! batch). The database runs in WAL mode; see [`Durability`] for what a commit survives.

mod bulk;
mod checkpoint;
mod chunks;
mod committer;
mod dedup;
mod directory_lock;
mod entry_log;
mod history;
mod key_blocks;
mod key_filter;
mod lock_wait;
mod packed;
mod purge;
mod run_order;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread;

use rusqlite::{Connection, OptionalExtension, params};

pub use dedup::DEFAULT_DEDUP_MERGE_ROWS;
pub use directory_lock::LOCK_FILE;
pub use entry_log::{DEFAULT_ENTRY_LOG_KIB, ENTRY_LOG_FILES};
pub use history::{DEFAULT_HISTORY_MERGE_ROWS, HISTORY_MERGE_SLICE_ROWS};
pub use key_filter::DEFAULT_DEDUP_FILTER_MIB;
pub use purge::DEFAULT_PURGE_SLICE_ROWS;

use self::committer::Committer;
use self::dedup::Record;
use self::directory_lock::DirectoryLock;
use self::packed::{Pack, Stored};
use self::writer::{Batch, Database, Shared, write_loop};
use crate::token::{self, Token};
use crate::{
    AgentRecord, App, BoxFuture, Claim, Completion, DeferredMessage, ECHO_AGENT_ID, FileMeta,
    HistoryEntry, MessageText, OutboxEntry, PurgeBefore, Purged, Result, Store, StoreError,
    StoredFile, Unanswered, check_agent_id, check_app_name, is_file_id,
};

/// The file the database lives in, inside the data directory.
pub const DATABASE_FILE: &str = "iagent.sqlite3";

/// The directory of file bytes, inside the data directory.
pub const FILES_DIR: &str = "files";

/// The most jobs one transaction takes. Bounds the latency a job can add to the ones batched
/// with it, while still amortizing a commit over many messages under load.
pub const MAX_BATCH: usize = 512;

/// How many jobs the store takes at once, by default: queued, running, or handed to the writer
/// thread. Further callers wait for a place (back-pressure on the message path) instead of
/// growing memory.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;

/// The bound on the WAL, in pages: should the checkpointer (see [`checkpoint`]) fall behind,
/// the writer checkpoints at the end of the commit that takes the WAL past it, as SQLite does
/// by default at 1000. At 4 KiB pages, about 40 MiB of WAL file.
pub const WAL_AUTOCHECKPOINT: u32 = 10_000;

/// How many prepared statements the writer connection keeps: more than the store has, so that
/// none is parsed twice.
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// The writer connection's page cache, by default, in MiB. With the database file mapped
/// ([`DEFAULT_MMAP_MIB`]) it holds the pages a transaction writes, not the pages it reads:
/// SQLite reads a page through the mapping wherever it only reads, and a page it misses is a
/// copy from the mapping, not a system call. So it is small: while the database is under
/// 1 GiB, SQLite walks the whole cache at each commit in which a B-tree split renumbered pages
/// (its temporary number is the page past the 1 GiB lock byte), and that walk was 3% of the
/// server's CPU at saturation with 64 MiB. It has room for the pages a merge slice dirties (up
/// to two thousand), which SQLite would otherwise spill into the WAL before the commit.
/// Without the mapping, a miss is a read from the operating system, and a larger cache pays
/// (64 MiB did, before the mapping; at SQLite's 2 MiB the reads cost about 7% of the store's
/// throughput).
pub const DEFAULT_CACHE_MIB: usize = 8;

/// How much of the database file, by default, in MiB, the writer connection reads through a
/// memory mapping (`PRAGMA mmap_size`): at most 1 TiB, SQLite's build limit here
/// (`.cargo/config.toml`). It is address space, not memory: the pages are the operating
/// system's page cache of the file, which it shares with every reader and reclaims under
/// pressure. The mapping follows the file's size; past it, pages are read with system calls
/// into the page cache ([`DEFAULT_CACHE_MIB`]). Mapped, with the page cache at 8 MiB, the
/// gateway did 1.08x the round trips at saturation over eight pairs of runs, its writer thread
/// 0.88x the CPU per message; mapped with the 64 MiB cache, it did no better than unmapped
/// (`BENCHMARKS.md`).
pub const DEFAULT_MMAP_MIB: usize = 65_536;

/// What a commit survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=NORMAL` in WAL mode: a commit survives the process being killed (`kill -9`),
    /// and the last commits before a power loss or kernel crash may be lost. The default: the
    /// gateway's promise is about process restarts, and fsync per batch would cost throughput.
    #[default]
    Process,
    /// `synchronous=FULL`: every commit is fsynced and also survives a power loss.
    Power,
}

/// How the store is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// What a commit survives.
    pub durability: Durability,
    /// How many history rows are indexed in memory before they are merged into the
    /// database's conversation index (see [`DEFAULT_HISTORY_MERGE_ROWS`]).
    pub history_merge_rows: usize,
    /// How many dedup rows have their keys in memory before the keys are merged into the
    /// database's key table (see [`DEFAULT_DEDUP_MERGE_ROWS`]).
    pub dedup_merge_rows: usize,
    /// The most memory, in MiB, the database's page cache takes (see [`DEFAULT_CACHE_MIB`]).
    pub cache_mib: usize,
    /// The most of the database file, in MiB, read through a memory mapping; 0 reads it all
    /// with system calls (see [`DEFAULT_MMAP_MIB`]).
    pub mmap_mib: usize,
    /// The size, in MiB, of the filter that spares new keys their look-up in the dedup key
    /// table; 0 turns it off (see [`DEFAULT_DEDUP_FILTER_MIB`]).
    pub dedup_filter_mib: usize,
    /// How many jobs the store takes at once (see [`DEFAULT_QUEUE_CAPACITY`]); at least one.
    pub queue_capacity: usize,
    /// How many KiB of history entries the entry log holds before they are written into the
    /// database (see [`DEFAULT_ENTRY_LOG_KIB`]); 0 writes every batch into the database.
    pub entry_log_kib: usize,
    /// How many rows of each kind one transaction of a purge removes at most (see
    /// [`DEFAULT_PURGE_SLICE_ROWS`]); at least one.
    pub purge_slice_rows: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            durability: Durability::default(),
            history_merge_rows: DEFAULT_HISTORY_MERGE_ROWS,
            dedup_merge_rows: DEFAULT_DEDUP_MERGE_ROWS,
            cache_mib: DEFAULT_CACHE_MIB,
            mmap_mib: DEFAULT_MMAP_MIB,
            dedup_filter_mib: DEFAULT_DEDUP_FILTER_MIB,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            entry_log_kib: DEFAULT_ENTRY_LOG_KIB,
            purge_slice_rows: DEFAULT_PURGE_SLICE_ROWS,
        }
    }
}

/// The SQLite store. Cheap to share behind an `Arc`. Dropping it waits for the writer thread
/// to commit what it was handed and stop, and lets go of the data directory.
#[derive(Debug)]
pub struct SqliteStore {
    /// Dropped first: the writer thread stops once its channel is closed.
    committer: Committer,
    path: PathBuf,
    /// Where file bytes live, one file per id; only their metadata goes through the writer,
    /// so a large upload never holds up the message path.
    files: PathBuf,
    /// Whether this store serves from the data directory, holding its lock, rather than being
    /// opened shared for administration ([`SqliteStore::open_shared`]).
    serves: bool,
    /// See [`Options::purge_slice_rows`].
    purge_slice_rows: usize,
    /// Dropped last, after the committer: joins the writer thread.
    _writer: WriterThread,
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_dir`, creating the directory too, to
    /// serve from it: the store takes the directory for as long as it is open, and a second
    /// one is refused with [`StoreError::InUse`] (see [`LOCK_FILE`]).
    pub fn open(data_dir: &Path, options: Options) -> Result<Self> {
        create_dir(data_dir)?;
        let lock = DirectoryLock::take(data_dir)?;
        Self::open_with(data_dir, options, Some(lock))
    }

    /// Opens the store in `data_dir` without taking the directory, so that a gateway may be
    /// serving from it: for administering apps, tokens and agents, whose tables the gateway
    /// reads afresh. Recording messages and reading history are refused
    /// ([`StoreError::Shared`]): they rely on the serving store's state in memory.
    pub fn open_shared(data_dir: &Path, options: Options) -> Result<Self> {
        create_dir(data_dir)?;
        Self::open_with(data_dir, options, None)
    }

    /// Opens the store; `lock` is the directory's, if this store serves from it.
    fn open_with(data_dir: &Path, options: Options, lock: Option<DirectoryLock>) -> Result<Self> {
        let files = data_dir.join(FILES_DIR);
        create_dir(&files)?;
        let path = data_dir.join(DATABASE_FILE);
        let conn = Connection::open(&path)?;
        configure(&conn, &options)?;
        // One transaction: a process stopped halfway through moving a table over leaves the
        // database as it was. The serving store writes what the entry log holds in it too.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        migrate(&conn)?;
        let log = match lock {
            Some(_) => Some(entry_log::recover(&conn, data_dir, options.durability)?),
            None => None,
        };
        conn.execute_batch("COMMIT")?;
        let history = history::HistoryHeads::load(&conn, options.history_merge_rows)?;
        // A shared store records nothing, and looks no key up.
        let filter_mib = if lock.is_some() {
            options.dedup_filter_mib
        } else {
            0
        };
        let filter = key_filter::KeyFilter::new(&path, filter_mib);
        let dedup = dedup::DedupKeys::load(&conn, options.dedup_merge_rows, filter)?;
        let mut database = Database::new(conn, history, dedup);
        // The writer thread writes the entries of the log's file that fills on a connection
        // of its own, while batches go on into the other on the serving one.
        let mut log_conn = None;
        if let Some(log) = log {
            let log = log.emptied().map_err(|source| StoreError::DataDir {
                path: data_dir.to_owned(),
                source,
            })?;
            if options.entry_log_kib > 0 {
                let conn = Connection::open(&path)?;
                configure(&conn, &options)?;
                log_conn = Some(conn);
                database.log_to(log, options.entry_log_kib.saturating_mul(1024));
            }
        }
        let (stop_checkpoints, checkpoints_stopped) = std::sync::mpsc::channel();
        checkpoint::start(&path, options.durability, checkpoints_stopped)?;
        let shared = Arc::new(Shared::new(database));
        let (writer, work) = mpsc::channel();
        let committer = Committer::new(Arc::clone(&shared), writer, options.queue_capacity);
        let serves = lock.is_some();
        let writer = thread::Builder::new()
            .name("iagent-store".into())
            .spawn(move || {
                write_loop(&shared, &work, log_conn.as_ref());
                drop(shared);
                drop(stop_checkpoints);
                // Only now: the last commit is made.
                drop(lock);
            })
            .map_err(|source| StoreError::DataDir {
                path: data_dir.to_owned(),
                source,
            })?;
        Ok(Self {
            committer,
            path,
            files,
            serves,
            purge_slice_rows: options.purge_slice_rows.max(1),
            _writer: WriterThread(Some(writer)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every history entry the database file at `path` holds, oldest first, as its `msg_id`
    /// (set on an entry that is its message's dedup record), message and reply. For tests of
    /// how entries are stored, which the store's API does not show; reads the file on a
    /// connection of its own.
    #[doc(hidden)]
    pub fn stored_entries(path: &Path) -> Result<Vec<StoredEntry>> {
        let conn = Connection::open(path)?;
        let mut entries = Vec::new();
        chunks::for_each_after(&conn, 0, |entry| {
            let stored = [Some(entry.message), entry.reply];
            entries.push(StoredEntry {
                msg_id: entry.msg_id.map(str::to_owned),
                message: entry.message_text()?,
                reply: entry.reply_text()?,
                packed: stored
                    .iter()
                    .flatten()
                    .all(|text| matches!(text, Stored::Packed(_))),
                stored_bytes: stored.iter().flatten().map(Stored::len).sum(),
            });
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        Ok(entries)
    }

    /// Runs `work` inside a batch's transaction, and resolves with its result once that
    /// transaction has committed. `work` may run twice (see [`writer`]): its first run's
    /// statements are then rolled back.
    fn run<T, F>(&self, work: F) -> BoxFuture<'_, Result<T>>
    where
        T: Send + 'static,
        F: FnMut(&mut Batch<'_>) -> Result<T> + Send + 'static,
    {
        Box::pin(self.committer.run(work))
    }

    /// Runs `work` like [`SqliteStore::run`] if this store serves from its directory: work
    /// that keeps the tails, which only that store has up to date.
    fn run_serving<T, F>(&self, work: F) -> BoxFuture<'_, Result<T>>
    where
        T: Send + 'static,
        F: FnMut(&mut Batch<'_>) -> Result<T> + Send + 'static,
    {
        self.serving(work, false)
    }

    /// Runs `work` like [`SqliteStore::run_serving`], in a batch that may go to the entry log:
    /// `work` must write nothing but the entries it appends through the batch.
    fn run_appending<T, F>(&self, work: F) -> BoxFuture<'_, Result<T>>
    where
        T: Send + 'static,
        F: FnMut(&mut Batch<'_>) -> Result<T> + Send + 'static,
    {
        self.serving(work, true)
    }

    /// Runs `work` if this store serves from its directory; `appends_only` as
    /// [`Committer::run_as`] takes it.
    fn serving<T, F>(&self, work: F, appends_only: bool) -> BoxFuture<'_, Result<T>>
    where
        T: Send + 'static,
        F: FnMut(&mut Batch<'_>) -> Result<T> + Send + 'static,
    {
        if !self.serves {
            return Box::pin(std::future::ready(Err(StoreError::Shared)));
        }
        Box::pin(self.committer.run_as(work, appends_only))
    }
}

/// The writer thread, joined when dropped: a store dropped has committed everything, and has
/// let go of its directory, so that a store opened after it (a restart in one process) finds
/// what it wrote and the directory free.
#[derive(Debug)]
struct WriterThread(Option<thread::JoinHandle<()>>);

impl Drop for WriterThread {
    fn drop(&mut self) {
        if let Some(writer) = self.0.take()
            && writer.join().is_err()
        {
            tracing::error!("the store's writer thread panicked");
        }
    }
}

/// Creates `dir` if it is missing.
fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
        path: dir.to_owned(),
        source,
    })
}

/// A history entry as [`SqliteStore::stored_entries`] reads it.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// Set when the entry is its message's dedup record.
    pub msg_id: Option<String>,
    /// The message, read back.
    pub message: String,
    /// The reply, read back.
    pub reply: Option<String>,
    /// Whether the message and the reply are stored packed.
    pub packed: bool,
    /// The bytes the message and the reply take stored.
    pub stored_bytes: usize,
}

/// The tails' maps, keyed by app, conversation or `msg_id`: every message looks its keys up
/// in them, and foldhash (seeded at random per process) costs a fraction of SipHash on keys
/// this short.
type KeyMap<V> = std::collections::HashMap<String, V, foldhash::fast::RandomState>;

/// The `synchronous` setting of every connection for `durability`.
fn synchronous(durability: Durability) -> &'static str {
    match durability {
        Durability::Process => "NORMAL",
        Durability::Power => "FULL",
    }
}

/// Sets up the writer's connection, the one that serves every read and write of the store.
fn configure(conn: &Connection, options: &Options) -> Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous(options.durability))?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // In KiB when negative.
    let cache_kib = i64::try_from(options.cache_mib.saturating_mul(1024)).unwrap_or(i64::MAX);
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    let mmap_bytes = i64::try_from(options.mmap_mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
    conn.pragma_update(None, "mmap_size", mmap_bytes)?;
    // A batch with a failing job runs again with a savepoint per job, and a merge's inserts of
    // many rows each keep a statement journal: both journals (the pages changed, as they were)
    // would otherwise be temporary files written with a syscall per page.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // The checkpointer copies the WAL back; the writer only bounds it.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT)?;
    // Every statement the store runs more than once is cached; rusqlite's default of 16 is
    // fewer than it has, and a purge's statements would push the message path's out.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    // The checkpointer takes the write lock for a moment several times a second, and the CLI
    // may write (create an app) while a gateway serves from the same file.
    lock_wait::install(conn)?;
    Ok(())
}

fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS apps (
            name TEXT PRIMARY KEY,
            created_ms INTEGER NOT NULL,
            default_agent TEXT NOT NULL,
            agents_version INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE IF NOT EXISTS tokens (
            hash BLOB PRIMARY KEY,
            app TEXT NOT NULL REFERENCES apps(name),
            created_ms INTEGER NOT NULL,
            revoked_ms INTEGER
        );
        CREATE INDEX IF NOT EXISTS tokens_app ON tokens(app);
        CREATE TABLE IF NOT EXISTS agents (
            app TEXT NOT NULL REFERENCES apps(name),
            id TEXT NOT NULL,
            kind TEXT NOT NULL,
            config TEXT NOT NULL,
            PRIMARY KEY (app, id)
        );
        CREATE TABLE IF NOT EXISTS outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            app TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            expires_ms INTEGER NOT NULL,
            message TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS outbox_app ON outbox(app, id);
        CREATE INDEX IF NOT EXISTS outbox_expires ON outbox(expires_ms);
        CREATE TABLE IF NOT EXISTS files (
            id TEXT PRIMARY KEY,
            app TEXT NOT NULL,
            content_type TEXT NOT NULL,
            size INTEGER NOT NULL,
            created_ms INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX IF NOT EXISTS files_created ON files(created_ms);
        CREATE TABLE IF NOT EXISTS store_meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
        ) WITHOUT ROWID;",
    )?;
    history::migrate(conn)?;
    dedup::create(conn)?;
    migrate_messages(conn)?;
    dedup::migrate(conn)?;
    history::move_rows_into_chunks(conn)?;
    dedup::start_entries(conn)
}

/// A value kept in `store_meta`, such as a watermark.
fn meta(conn: &Connection, key: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT value FROM store_meta WHERE key = ?1")?
        .query_row([key], |row| row.get(0))
        .optional()?)
}

fn set_meta(conn: &Connection, key: &str, value: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO store_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])?;
    Ok(())
}

/// Whether the database has the table `name`.
fn has_table(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        [name],
        |row| row.get(0),
    )?)
}

/// Whether `table` has the column `name`.
fn has_column(conn: &Connection, table: &str, name: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2)",
        params![table, name],
        |row| row.get(0),
    )?)
}

/// Adds a column to a table made before the column existed; `column` is its name and type.
/// Returns whether it was missing.
fn add_column(conn: &Connection, table: &str, column: &str) -> Result<bool> {
    let name = column.split_whitespace().next().unwrap_or(column);
    let present = has_column(conn, table, name)?;
    if !present {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column}"))?;
    }
    Ok(!present)
}

/// The dedup record. Rows are appended in id order, and nothing indexes them by `msg_id`:
/// their keys are merged into `message_key_blocks`, in bulk (see [`dedup`]). Keyed by
/// `(app, msg_id)` itself (`WITHOUT ROWID`), the table held every row, response included, at
/// that place; with a `UNIQUE (app, msg_id)` index, each commit still wrote a page at each of
/// hundreds of places. A database with either earlier table is moved over, ids kept where it
/// had them (history entries point at them).
///
/// A message answered by a repeatable agent has no row: its history entry is its record (see
/// [`dedup`]). In the layout before, its row named the entry (`history_id`); such rows are
/// folded into their entries.
fn migrate_messages(conn: &Connection) -> Result<()> {
    let earlier: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    let keyed = earlier
        .as_deref()
        .is_some_and(|sql| sql.contains("WITHOUT ROWID"));
    let unique = earlier.as_deref().is_some_and(|sql| sql.contains("UNIQUE"));
    if keyed || unique {
        conn.execute_batch("ALTER TABLE messages RENAME TO messages_earlier")?;
    }
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY,
            app TEXT NOT NULL,
            msg_id TEXT NOT NULL,
            received_ms INTEGER NOT NULL,
            inbound TEXT,
            response TEXT,
            deferred_until INTEGER,
            deferred_agent TEXT
        );",
    )?;
    if keyed {
        conn.execute_batch(
            "INSERT INTO messages
                (app, msg_id, received_ms, inbound, response, deferred_until, deferred_agent)
             SELECT app, msg_id, received_ms, inbound, response, deferred_until, deferred_agent
             FROM messages_earlier ORDER BY received_ms;",
        )?;
    } else if unique {
        if has_column(conn, "messages_earlier", "history_id")? {
            dedup::fold_rows_into_entries(conn, "messages_earlier")?;
        }
        conn.execute_batch(
            "INSERT INTO messages
                (id, app, msg_id, received_ms, inbound, response, deferred_until,
                 deferred_agent)
             SELECT id, app, msg_id, received_ms, inbound, response, deferred_until,
                    deferred_agent
             FROM messages_earlier ORDER BY id;",
        )?;
    }
    if keyed || unique {
        conn.execute_batch("DROP TABLE messages_earlier;")?;
    }
    if has_column(conn, "messages", "history_id")? {
        dedup::fold_rows_into_entries(conn, "messages")?;
        conn.execute_batch("ALTER TABLE messages DROP COLUMN history_id;")?;
    }
    if has_column(conn, "history", "message_id")? {
        conn.execute_batch("ALTER TABLE history DROP COLUMN message_id;")?;
    }
    // Purges go by id now; the index by time only cost every commit a page.
    conn.execute_batch("DROP INDEX IF EXISTS messages_received;")?;
    Ok(())
}

/// A new random file id: `f` and 128 bits in hex.
fn new_file_id() -> Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|err| StoreError::Randomness(err.to_string()))?;
    Ok(format!("f{}", token::hex(&bytes)))
}

fn issue_token(conn: &Connection, app: &str, now_ms: i64) -> Result<Token> {
    let token = Token::generate().map_err(|err| StoreError::Randomness(err.to_string()))?;
    conn.prepare_cached("INSERT INTO tokens (hash, app, created_ms) VALUES (?1, ?2, ?3)")?
        .execute(params![&token::hash(token.expose())[..], app, now_ms])?;
    Ok(token)
}

/// Appends the dedup row of `msg_id`, holding the inbound message (a claim) or the response (a
/// record), unless its key is merged; the caller has looked in the tail. Returns
/// [`Claim::New`] when written, else what became of the message.
fn insert_row(
    database: &mut Batch<'_>,
    app: &str,
    msg_id: &str,
    received_ms: i64,
    inbound: Option<&MessageText>,
    response: Option<&MessageText>,
) -> Result<Claim> {
    // A key the filter rules out is not merged, and is not looked up: with many keys merged,
    // each look was a descent through pages spread all over the table.
    if database.dedup.filter().may_have(app, msg_id)
        && let Some(record) = dedup::find_merged(database, app, msg_id)?
    {
        return earlier_claim(database, record);
    }
    database
        .prepare_cached(
            "INSERT INTO messages (id, app, msg_id, received_ms, inbound, response)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            database.dedup.next_id(),
            app,
            msg_id,
            received_ms,
            inbound.map(|text| Pack {
                text,
                msg_id: Some(msg_id)
            }),
            response.map(|text| Pack {
                text,
                msg_id: Some(msg_id)
            })
        ])?;
    database.dedup.inserted(app, msg_id);
    Ok(Claim::New)
}

/// What became of a message whose key was found merged.
fn earlier_merged_claim(batch: &mut Batch<'_>, app: &str, msg_id: &str) -> Result<Claim> {
    let record =
        dedup::find_merged(batch, app, msg_id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
    earlier_claim(batch, record)
}

/// What became of the message whose record this is.
fn earlier_claim(batch: &mut Batch<'_>, record: Record) -> Result<Claim> {
    let response = match record {
        Record::Row(id) => batch
            .prepare_cached("SELECT response, msg_id FROM messages WHERE id = ?1")?
            .query_row([id], |row| {
                packed::optional_text(row, 0, row.get_ref(1)?.as_str_or_null()?)
            })?,
        Record::Entry(id) => batch
            .appends
            .entry(id, |entry| entry.reply_text())?
            .ok_or(rusqlite::Error::QueryReturnedNoRows)?,
    };
    Ok(response.map_or(Claim::Pending, Claim::Answered))
}

fn bump_agents_version(conn: &Connection, app: &str) -> Result<()> {
    conn.prepare_cached("UPDATE apps SET agents_version = agents_version + 1 WHERE name = ?1")?
        .execute([app])?;
    Ok(())
}

fn require_app(conn: &Connection, app: &str) -> Result<()> {
    let exists: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM apps WHERE name = ?1)")?
        .query_row([app], |row| row.get(0))?;
    if exists {
        Ok(())
    } else {
        Err(StoreError::UnknownApp(app.to_owned()))
    }
}

fn revoke_all(conn: &Connection, app: &str, now_ms: i64) -> Result<u64> {
    require_app(conn, app)?;
    let revoked = conn
        .prepare_cached("UPDATE tokens SET revoked_ms = ?2 WHERE app = ?1 AND revoked_ms IS NULL")?
        .execute(params![app, now_ms])?;
    Ok(revoked as u64)
}

const APP_COLUMNS: &str = "a.name, a.created_ms, a.default_agent,
    (SELECT COUNT(*) FROM tokens t WHERE t.app = a.name AND t.revoked_ms IS NULL), a.agents_version";

fn app_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<App> {
    Ok(App {
        name: row.get(0)?,
        created_ms: row.get(1)?,
        default_agent: row.get(2)?,
        live_tokens: row.get(3)?,
        agents_version: row.get(4)?,
    })
}

impl Store for SqliteStore {
    fn create_app(&self, name: &str, now_ms: i64) -> BoxFuture<'_, Result<(App, Token)>> {
        let name = name.to_owned();
        self.run(move |conn| {
            check_app_name(&name)?;
            let inserted = conn
                .prepare_cached(
                    "INSERT INTO apps (name, created_ms, default_agent) VALUES (?1, ?2, ?3)
                     ON CONFLICT DO NOTHING",
                )?
                .execute(params![name, now_ms, ECHO_AGENT_ID])?;
            if inserted == 0 {
                return Err(StoreError::AppExists(name.clone()));
            }
            conn.prepare_cached(
                "INSERT INTO agents (app, id, kind, config) VALUES (?1, ?2, 'echo', '{}')",
            )?
            .execute(params![name, ECHO_AGENT_ID])?;
            let token = issue_token(conn, &name, now_ms)?;
            let app = App {
                name: name.clone(),
                created_ms: now_ms,
                default_agent: ECHO_AGENT_ID.into(),
                live_tokens: 1,
                agents_version: 0,
            };
            Ok((app, token))
        })
    }

    fn list_apps(&self) -> BoxFuture<'_, Result<Vec<App>>> {
        self.run(|conn| {
            let mut statement =
                conn.prepare_cached(&format!("SELECT {APP_COLUMNS} FROM apps a ORDER BY a.name"))?;
            let apps = statement
                .query_map([], app_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            Ok(apps)
        })
    }

    fn rotate_token(&self, app: &str, now_ms: i64) -> BoxFuture<'_, Result<Token>> {
        let app = app.to_owned();
        self.run(move |conn| {
            revoke_all(conn, &app, now_ms)?;
            issue_token(conn, &app, now_ms)
        })
    }

    fn revoke_tokens(&self, app: &str, now_ms: i64) -> BoxFuture<'_, Result<u64>> {
        let app = app.to_owned();
        self.run(move |conn| revoke_all(conn, &app, now_ms))
    }

    fn app_for_token(&self, token: &str) -> BoxFuture<'_, Result<Option<App>>> {
        let hash = token::hash(token);
        self.run(move |conn| {
            let app = conn
                .prepare_cached(&format!(
                    "SELECT {APP_COLUMNS} FROM tokens k JOIN apps a ON a.name = k.app
                     WHERE k.hash = ?1 AND k.revoked_ms IS NULL"
                ))?
                .query_row([&hash[..]], app_from_row)
                .optional()?;
            Ok(app)
        })
    }

    fn agents(&self, app: &str) -> BoxFuture<'_, Result<Vec<AgentRecord>>> {
        let app = app.to_owned();
        self.run(move |conn| {
            let mut statement = conn
                .prepare_cached("SELECT id, kind, config FROM agents WHERE app = ?1 ORDER BY id")?;
            let agents = statement
                .query_map([&app], |row| {
                    Ok(AgentRecord {
                        id: row.get(0)?,
                        kind: row.get(1)?,
                        config: row.get(2)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(agents)
        })
    }

    fn put_agent(&self, app: &str, agent: AgentRecord) -> BoxFuture<'_, Result<()>> {
        let app = app.to_owned();
        self.run(move |conn| {
            require_app(conn, &app)?;
            check_agent_id(&agent.id)?;
            bump_agents_version(conn, &app)?;
            conn.prepare_cached(
                "INSERT INTO agents (app, id, kind, config) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (app, id) DO UPDATE SET kind = excluded.kind, config = excluded.config",
            )?
            .execute(params![app, agent.id, agent.kind, agent.config])?;
            Ok(())
        })
    }

    fn set_default_agent(&self, app: &str, agent_id: &str) -> BoxFuture<'_, Result<()>> {
        let (app, agent_id) = (app.to_owned(), agent_id.to_owned());
        self.run(move |conn| {
            require_app(conn, &app)?;
            let exists: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM agents WHERE app = ?1 AND id = ?2)")?
                .query_row(params![app, agent_id], |row| row.get(0))?;
            if !exists {
                return Err(StoreError::UnknownAgent {
                    app: app.clone(),
                    agent: agent_id.clone(),
                });
            }
            conn.prepare_cached("UPDATE apps SET default_agent = ?2 WHERE name = ?1")?
                .execute(params![app, agent_id])?;
            bump_agents_version(conn, &app)?;
            Ok(())
        })
    }

    fn remove_agent(&self, app: &str, agent_id: &str) -> BoxFuture<'_, Result<()>> {
        let (app, agent_id) = (app.to_owned(), agent_id.to_owned());
        self.run(move |conn| {
            require_app(conn, &app)?;
            let default: String = conn
                .prepare_cached("SELECT default_agent FROM apps WHERE name = ?1")?
                .query_row([&app], |row| row.get(0))?;
            if default == agent_id {
                return Err(StoreError::DefaultAgent {
                    app: app.clone(),
                    agent: agent_id.clone(),
                });
            }
            let removed = conn
                .prepare_cached("DELETE FROM agents WHERE app = ?1 AND id = ?2")?
                .execute(params![app, agent_id])?;
            if removed == 0 {
                return Err(StoreError::UnknownAgent {
                    app: app.clone(),
                    agent: agent_id.clone(),
                });
            }
            bump_agents_version(conn, &app)
        })
    }

    fn claim(
        &self,
        app: &str,
        msg_id: &str,
        inbound: MessageText,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<Claim>> {
        let (app, msg_id) = (app.to_owned(), msg_id.to_owned());
        self.run_serving(move |database| {
            if let Some(id) = database.dedup.find_recent(&app, &msg_id) {
                return earlier_claim(database, id);
            }
            insert_row(database, &app, &msg_id, now_ms, Some(&inbound), None)
        })
    }

    fn record(&self, completion: Completion, received_ms: i64) -> BoxFuture<'_, Result<Claim>> {
        // A response that is its history entry's reply is stored once, in the entry, which is
        // then the message's record: the job then only appends an entry, and its batch may go
        // to the entry log.
        let in_entry = completion.reply_entry().is_some();
        let work = move |database: &mut Batch<'_>| {
            let (app, msg_id) = (completion.app(), completion.msg_id());
            if let Some(id) = database.dedup.find_recent(app, msg_id) {
                return earlier_claim(database, id);
            }
            if let Some(entry) = completion.reply_entry() {
                let Batch {
                    history,
                    dedup,
                    appends,
                    ..
                } = database;
                return match history.append_record(appends, app, msg_id, entry)? {
                    Some(id) => {
                        dedup.inserted_entry(app, Arc::clone(completion.shared_msg_id()), id);
                        Ok(Claim::New)
                    }
                    None => earlier_merged_claim(database, app, msg_id),
                };
            }
            let claim = insert_row(
                database,
                app,
                msg_id,
                received_ms,
                None,
                Some(completion.response()),
            )?;
            if claim == Claim::New {
                database.append_history(app, completion.history())?;
            }
            Ok(claim)
        };
        self.serving(work, in_entry)
    }

    fn complete(&self, completion: Completion) -> BoxFuture<'_, Result<()>> {
        self.run_serving(move |database| {
            // The inbound frame was kept for recovery only; an answered message needs it no more.
            // A record in an entry was answered as it was written: only a row is completed.
            if let Some(Record::Row(id)) =
                database
                    .dedup
                    .find(database.conn, completion.app(), completion.msg_id())?
            {
                database
                    .prepare_cached(
                        "UPDATE messages SET response = ?2, inbound = NULL WHERE id = ?1",
                    )?
                    .execute(params![
                        id,
                        Pack {
                            text: completion.response(),
                            msg_id: Some(completion.msg_id())
                        }
                    ])?;
            }
            database.append_history(completion.app(), completion.history())
        })
    }

    fn history(
        &self,
        app: &str,
        conversation: &str,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<String>>> {
        let (app, conversation) = (app.to_owned(), conversation.to_owned());
        self.run_serving(move |database| {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            database
                .history
                .read(&mut database.appends, &app, &conversation, limit)
        })
    }

    fn defer(
        &self,
        app: &str,
        msg_id: &str,
        agent: &str,
        until_ms: i64,
    ) -> BoxFuture<'_, Result<()>> {
        let (app, msg_id, agent) = (app.to_owned(), msg_id.to_owned(), agent.to_owned());
        self.run_serving(move |database| {
            if let Some(Record::Row(id)) = database.dedup.find(database.conn, &app, &msg_id)? {
                database
                    .prepare_cached(
                        "UPDATE messages SET deferred_until = ?2, deferred_agent = ?3 WHERE id = ?1",
                    )?
                    .execute(params![id, until_ms, agent])?;
            }
            Ok(())
        })
    }

    fn deferred(&self) -> BoxFuture<'_, Result<Vec<DeferredMessage>>> {
        self.run(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT app, inbound, deferred_agent, deferred_until, msg_id FROM messages
                 WHERE response IS NULL AND deferred_until IS NOT NULL
                 ORDER BY deferred_until",
            )?;
            let rows = statement
                .query_map([], |row| {
                    Ok(DeferredMessage {
                        app: row.get(0)?,
                        inbound: packed::text(row, 1, row.get_ref(4)?.as_str_or_null()?)?,
                        agent: row.get(2)?,
                        until_ms: row.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn append_history(&self, app: &str, entries: Vec<HistoryEntry>) -> BoxFuture<'_, Result<()>> {
        let app = app.to_owned();
        self.run_appending(move |database| database.append_history(&app, &entries))
    }

    fn unanswered(&self) -> BoxFuture<'_, Result<Vec<Unanswered>>> {
        self.run(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT app, inbound, msg_id FROM messages
                 WHERE response IS NULL AND deferred_until IS NULL
                 ORDER BY id",
            )?;
            let rows = statement
                .query_map([], |row| {
                    Ok(Unanswered {
                        app: row.get(0)?,
                        inbound: packed::text(row, 1, row.get_ref(2)?.as_str_or_null()?)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
    }

    fn outbox_push(
        &self,
        app: &str,
        message: String,
        now_ms: i64,
        expires_ms: i64,
    ) -> BoxFuture<'_, Result<i64>> {
        let app = app.to_owned();
        self.run(move |conn| {
            conn.prepare_cached(
                "INSERT INTO outbox (app, created_ms, expires_ms, message) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![app, now_ms, expires_ms, message])?;
            Ok(conn.last_insert_rowid())
        })
    }

    fn outbox_peek(
        &self,
        app: &str,
        after: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<OutboxEntry>>> {
        let app = app.to_owned();
        self.run(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id, message FROM outbox WHERE app = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
            )?;
            let entries = statement
                .query_map(params![app, after, limit], |row| {
                    Ok(OutboxEntry {
                        id: row.get(0)?,
                        message: row.get(1)?,
                    })
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(entries)
        })
    }

    fn outbox_remove(&self, app: &str, ids: Vec<i64>) -> BoxFuture<'_, Result<()>> {
        let app = app.to_owned();
        self.run(move |conn| {
            let mut remove =
                conn.prepare_cached("DELETE FROM outbox WHERE app = ?1 AND id = ?2")?;
            for id in &ids {
                remove.execute(params![app, id])?;
            }
            Ok(())
        })
    }

    fn outbox_depths(&self) -> BoxFuture<'_, Result<Vec<(String, u64)>>> {
        self.run(|conn| {
            let mut statement =
                conn.prepare_cached("SELECT app, COUNT(*) FROM outbox GROUP BY app")?;
            let depths = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(depths)
        })
    }

    fn purge(&self, before: PurgeBefore) -> BoxFuture<'_, Result<Purged>> {
        Box::pin(async move {
            if !self.serves {
                return Err(StoreError::Shared);
            }
            // On the writer thread, a slice at a time: a purge may take long, and a caller's
            // thread serves others.
            let rows = self.purge_slice_rows;
            let mut cursor = purge::Cursor::new(before);
            let mut purged = Purged::default();
            loop {
                let slice = self
                    .committer
                    .run_on_writer(move |database| purge::slice(database, &cursor, rows))
                    .await?;
                purged.dedup += slice.dedup;
                purged.history += slice.history;
                match slice.next {
                    Some(next) => cursor = next,
                    None => break,
                }
            }
            let expired = self
                .committer
                .run_on_writer(move |database| purge::outbox_and_files(database.conn, before))
                .await?;
            purged.outbox_expired = expired.outbox;
            purged.files = expired.files.len() as u64;
            // The rows are gone (committed) before the bytes: a crash in between leaves an
            // orphaned file on disk, never a row pointing at nothing.
            for id in expired.files {
                if let Err(err) = tokio::fs::remove_file(self.files.join(&id)).await
                    && err.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(file = %id, error = %err, "expired file not removed from disk");
                    purged.files -= 1;
                }
            }
            Ok(purged)
        })
    }

    fn put_file(
        &self,
        app: &str,
        content_type: &str,
        bytes: Vec<u8>,
        now_ms: i64,
    ) -> BoxFuture<'_, Result<FileMeta>> {
        let (app, content_type) = (app.to_owned(), content_type.to_owned());
        Box::pin(async move {
            let id = new_file_id()?;
            let (path, partial) = (
                self.files.join(&id),
                self.files.join(format!(".partial-{id}")),
            );
            let size = bytes.len() as u64;
            // Written whole under a temporary name, then renamed: a crash never leaves a
            // truncated file under a real id.
            tokio::fs::write(&partial, bytes).await?;
            tokio::fs::rename(&partial, &path).await?;
            let meta = FileMeta {
                id,
                content_type,
                size,
                created_ms: now_ms,
            };
            let row = meta.clone();
            let stored = self
                .run(move |conn| {
                    require_app(conn, &app)?;
                    conn.prepare_cached(
                        "INSERT INTO files (id, app, content_type, size, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?
                    .execute(params![row.id, app, row.content_type, row.size, row.created_ms])?;
                    Ok(())
                })
                .await;
            if let Err(err) = stored {
                tokio::fs::remove_file(&path).await.ok();
                return Err(err);
            }
            Ok(meta)
        })
    }

    fn get_file(&self, app: &str, id: &str) -> BoxFuture<'_, Result<Option<StoredFile>>> {
        let (app, id) = (app.to_owned(), id.to_owned());
        Box::pin(async move {
            if !is_file_id(&id) {
                return Ok(None);
            }
            let meta = self
                .run(move |conn| {
                    let meta = conn
                        .prepare_cached(
                            "SELECT id, content_type, size, created_ms FROM files WHERE app = ?1 AND id = ?2",
                        )?
                        .query_row(params![app, id], |row| {
                            Ok(FileMeta {
                                id: row.get(0)?,
                                content_type: row.get(1)?,
                                size: row.get(2)?,
                                created_ms: row.get(3)?,
                            })
                        })
                        .optional()?;
                    Ok(meta)
                })
                .await?;
            let Some(meta) = meta else { return Ok(None) };
            let bytes = tokio::fs::read(self.files.join(&meta.id)).await?;
            Ok(Some((meta, bytes)))
        })
    }

    fn first_missing_file(
        &self,
        app: &str,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<Option<String>>> {
        let app = app.to_owned();
        self.run(move |conn| {
            let mut exists = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM files WHERE app = ?1 AND id = ?2)")?;
            for id in &ids {
                if !is_file_id(id)
                    || !exists.query_row(params![app, id], |row| row.get::<_, bool>(0))?
                {
                    return Ok(Some(id.clone()));
                }
            }
            Ok(None)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the connection runs with, as SQLite reports it: `(cache_size, mmap_size)`.
    fn cache_and_mapping(options: &Options) -> (i64, i64) {
        let dir = tempfile::tempdir().expect("temp dir");
        let conn = Connection::open(dir.path().join(DATABASE_FILE)).expect("opens");
        configure(&conn, options).expect("configures");
        let pragma = |name: &str| {
            conn.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
                .expect("reads the pragma")
        };
        (pragma("cache_size"), pragma("mmap_size"))
    }

    /// Merges the key of `msg_id` behind the store's back, naming a row that is not there,
    /// once the filter is built; tells the filter of it if `told`.
    async fn write_bare_key(store: &SqliteStore, msg_id: &'static str, told: bool) {
        store
            .run_serving(move |database| {
                database.dedup.wait_for_filter();
                if told {
                    database.dedup.tell_filter("shop", msg_id);
                }
                let key = key_blocks::Key {
                    msg_id,
                    app: "shop",
                    id: 999,
                };
                key_blocks::insert(database, &[key])
            })
            .await
            .expect("key written");
    }

    /// A claim looks its key up among the merged keys only where the filter of those keys may
    /// have it. Here the table gets keys behind the filter's back (a merge tells the
    /// filter of every key it writes, so that this never happens): the filter rules the first
    /// out, and its claim is new; it has the second, whose claim finds the key, and fails to
    /// find its record.
    #[tokio::test]
    async fn a_claim_looks_up_only_keys_the_filter_may_have() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path(), Options::default()).expect("opens");
        write_bare_key(&store, "unseen", false).await;
        let claim = store.claim("shop", "unseen", "{}".into(), 0).await;
        assert_eq!(claim.expect("claimed"), Claim::New);
        write_bare_key(&store, "ghost", true).await;
        let claim = store.claim("shop", "ghost", "{}".into(), 0).await;
        assert!(claim.is_err(), "{claim:?}");
    }

    /// The mapping is as large as configured, past SQLite's default build limit of just under
    /// 2 GiB, which would otherwise cap it silently (`.cargo/config.toml`); 0 turns it off.
    #[test]
    fn the_page_cache_and_the_mapping_are_as_configured() {
        let options = Options {
            cache_mib: 3,
            mmap_mib: 4096,
            ..Options::default()
        };
        assert_eq!(cache_and_mapping(&options), (-3 * 1024, 4096 << 20));
        let unmapped = Options {
            mmap_mib: 0,
            ..options
        };
        assert_eq!(cache_and_mapping(&unmapped), (-3 * 1024, 0));
        assert_eq!(
            cache_and_mapping(&Options::default()).1,
            i64::try_from(DEFAULT_MMAP_MIB << 20).expect("fits")
        );
    }
}
