//! The checkpointer: copies committed pages from the WAL back into the database file on a
//! thread and connection of its own, so that the writer does not stop for it.
//!
//! Run by the writer at the end of a commit (SQLite's automatic checkpoint), a checkpoint held
//! up every job queued behind that commit for the whole copy and its `fsync`: 30 to 65 ms,
//! several times a second at 10k messages/s, which was the open-loop p99. Here a PASSIVE
//! checkpoint copies, without taking the write lock, what the WAL holds; the writer commits
//! on meanwhile. Passive checkpoints alone never let the WAL start over under steady load
//! (its end moves on during every copy), so each is followed by a RESTART checkpoint, which
//! takes the write lock only to copy the few pages committed during the passive one: the
//! next commit then writes the WAL from its beginning again.
//!
//! The writer's own automatic checkpoint stays, at [`super::WAL_AUTOCHECKPOINT`] pages, as the bound
//! on the WAL's size should this thread fall behind or be refused the lock.
//!
//! The RESTART holds the write lock through an `fsync` of the WAL and one of the database
//! file, and flushes of the disk are what that hold is made of: at 10 000 messages/s a commit
//! that met a RESTART waited about 0.75 ms, ten times a second, and those waits were the open
//! loop's p99 (BENCHMARKS.md). The WAL's sync flushed every frame committed during the PASSIVE
//! checkpoint, and the database file's every page that checkpoint copied (it syncs the file
//! only when it has copied the whole WAL, which commits coming in meanwhile prevent). So both
//! files are synced once more, without any lock, between the two checkpoints ([`Presync`]):
//! the RESTART's own syncs then find only what was committed since. Under the lock, the WAL's
//! sync took 0.14 ms at the median instead of 0.40, the database file's 0.26 instead of 0.56.
//!
//! The first commit into a WAL that starts over writes its new header and syncs it, whatever
//! `synchronous` says. While every batch committed, that was one batch in a thousand; with the
//! entry log, SQLite's commits at 10 000 messages/s are the log's writes into it, about 40 a
//! second, and a quarter of them met a fresh WAL and took 0.4 to 0.9 ms on the runtime's
//! thread. So after each RESTART the checkpointer makes that commit itself ([`begin_wal`]):
//! slow writes of the log went from about 120 a run to 13, the open loop's p99 0.83x
//! (BENCHMARKS.md).

use std::fs::File;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use rusqlite::Connection;

use super::{Durability, synchronous};
use crate::{Result, StoreError};

/// How often the checkpointer copies the WAL into the database. Shorter keeps the WAL (and
/// the copy each RESTART does under the write lock) smaller, at the cost of more `fsync`s.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// How long a RESTART checkpoint waits for the write lock before it gives up until the next
/// interval. A checkpoint that waits holds up nobody: the writer commits in the meantime.
const LOCK_WAIT: Duration = Duration::from_millis(50);

/// Starts the checkpointer on the database at `path`. It stops when `stop`'s sender is
/// dropped, which the writer thread does as it ends.
pub(super) fn start(path: &Path, durability: Durability, stop: Receiver<()>) -> Result<()> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "synchronous", synchronous(durability))?;
    conn.busy_timeout(LOCK_WAIT)?;
    let presync = Presync::of(path);
    thread::Builder::new()
        .name("iagent-checkpoint".into())
        .spawn(move || run(&conn, &presync, &stop))
        .map_err(|source| StoreError::DataDir {
            path: path.to_owned(),
            source,
        })?;
    Ok(())
}

fn run(conn: &Connection, presync: &Presync, stop: &Receiver<()>) {
    // A failure is logged when it starts and when it ends, not at every interval.
    let mut failing = false;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        match checkpoint(conn, presync) {
            Err(err) if !failing => {
                tracing::warn!(error = %err, "WAL checkpoints failing; the writer's own bound the WAL");
                failing = true;
            }
            Ok(()) if failing => {
                tracing::info!("WAL checkpoints succeed again");
                failing = false;
            }
            _ => {}
        }
    }
}

/// A PASSIVE checkpoint, then, if it copied everything it found, a RESTART one for what was
/// committed meanwhile, with the files synced in between (see the module's documentation).
fn checkpoint(conn: &Connection, presync: &Presync) -> Result<()> {
    let passive = Outcome::of(conn, "PASSIVE")?;
    if passive.pages > 0 && passive.complete() {
        presync.sync();
        if Outcome::of(conn, "RESTART")?.complete() {
            begin_wal(conn)?;
        }
    }
    Ok(())
}

/// Makes the first commit into the WAL that a RESTART let start over, so that its sync of the
/// WAL's new header (which SQLite makes whatever `synchronous` says) is this thread's wait and
/// not a batch's.
fn begin_wal(conn: &Connection) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO store_meta (key, value) VALUES ('wal_restarts', 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1",
    )?
    .execute([])?;
    Ok(())
}

/// The files the checkpointer syncs itself before a RESTART, opened once as it starts (SQLite
/// created both before, and removes the WAL only once every connection has closed). A failure
/// is not reported: the RESTART that follows syncs both files, and fails with the reason if
/// the disk does.
#[derive(Debug)]
struct Presync {
    /// The main database file, never closed: closing a descriptor of a file drops every lock
    /// the process holds on it, and SQLite's connections, this store's or one opened on the
    /// same file later, hold theirs on it through descriptors of their own (SQLite keeps its
    /// own open for that reason). One descriptor for each store a process opens, for the
    /// process's life. `None` if the file could not be opened.
    database: Option<ManuallyDrop<File>>,
    /// The WAL. SQLite takes no lock on it (its locks are on the `-shm` file), so this
    /// descriptor is closed with the checkpointer.
    wal: Option<File>,
}

impl Presync {
    /// The files of the database at `database`.
    fn of(database: &Path) -> Self {
        Self {
            database: File::open(database).ok().map(ManuallyDrop::new),
            wal: File::open(wal_path(database)).ok(),
        }
    }

    /// Writes what the passive checkpoint copied into the database file, then the WAL's
    /// frames, to the disk.
    fn sync(&self) {
        let database = self.database.as_deref();
        for file in database.into_iter().chain(&self.wal) {
            file.sync_data().ok();
        }
    }
}

/// The WAL of the database at `database`.
fn wal_path(database: &Path) -> PathBuf {
    let mut path = database.as_os_str().to_owned();
    path.push("-wal");
    path.into()
}

/// What `PRAGMA wal_checkpoint` reports.
struct Outcome {
    /// Whether it could not finish: another connection held a lock it needed.
    busy: bool,
    /// Pages in the WAL.
    pages: u64,
    /// Pages of them now in the database file.
    copied: u64,
}

impl Outcome {
    fn of(conn: &Connection, mode: &str) -> Result<Self> {
        Ok(
            conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
                Ok(Self {
                    busy: row.get::<_, i64>(0)? != 0,
                    pages: row.get::<_, i64>(1)?.try_into().unwrap_or(0),
                    copied: row.get::<_, i64>(2)?.try_into().unwrap_or(0),
                })
            })?,
        )
    }

    fn complete(&self) -> bool {
        !self.busy && self.copied == self.pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After each RESTART the checkpointer writes the first commit into the WAL itself, and
    /// the writer's next commit appends to a WAL already begun.
    #[test]
    fn the_checkpointer_begins_the_wal_each_restart_lets_start_over() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let database = dir.path().join("iagent.sqlite3");
        let writer = Connection::open(&database).expect("writer");
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .expect("WAL");
        super::super::migrate(&writer).expect("tables");
        let checkpointer = Connection::open(&database).expect("checkpointer");
        let presync = Presync::of(&database);
        let restarts =
            || -> Option<i64> { super::super::meta(&writer, "wal_restarts").expect("read") };
        for round in 1..=3 {
            writer
                .execute(
                    "INSERT INTO apps (name, created_ms, default_agent) VALUES (?1, 0, 'echo')",
                    [format!("app{round}")],
                )
                .expect("a commit");
            checkpoint(&checkpointer, &presync).expect("checkpoint");
            assert_eq!(restarts(), Some(round), "round {round}");
            // What the checkpointer wrote is all the WAL holds: the WAL started over.
            let pages = Outcome::of(&checkpointer, "PASSIVE").expect("pages").pages;
            assert!((1..=2).contains(&pages), "{pages} pages in the WAL");
        }
    }

    /// A wrong path would never be opened, and the sync would be skipped without a word.
    #[test]
    fn the_files_synced_are_the_databases_own_and_the_wal_is_opened_once_it_exists() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let database = dir.path().join("iagent.sqlite3");
        std::fs::write(&database, b"pages").expect("a database file");
        let presync = Presync::of(&database);
        assert!(presync.database.is_some(), "the database file is open");
        assert_eq!(wal_path(&database), dir.path().join("iagent.sqlite3-wal"));
        presync.sync();
        assert!(presync.wal.is_none(), "there is no WAL to open yet");
        std::fs::write(wal_path(&database), b"frames").expect("a WAL");
        let presync = Presync::of(&database);
        presync.sync();
        assert!(presync.wal.is_some(), "the WAL is open once it exists");
    }
}
