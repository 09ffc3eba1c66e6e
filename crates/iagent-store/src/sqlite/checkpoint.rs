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
//! The RESTART holds the write lock through an `fsync` of the WAL, and a flush of the disk is
//! what that hold is made of: at 10 000 messages/s a commit that met a RESTART waited about
//! 0.75 ms, ten times a second, and those waits were the open loop's p99 (BENCHMARKS.md).
//! So the WAL is synced once more, without any lock, between the two checkpoints
//! ([`WalFile`]): the RESTART's own sync then finds only the frames committed since, and its
//! hold is shorter (the WAL's sync under the lock 0.40 to 0.14 ms at the median, p99 0.79x).

use std::fs::File;
use std::io;
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
    let mut wal = WalFile::of(path);
    thread::Builder::new()
        .name("iagent-checkpoint".into())
        .spawn(move || run(&conn, &mut wal, &stop))
        .map_err(|source| StoreError::DataDir {
            path: path.to_owned(),
            source,
        })?;
    Ok(())
}

fn run(conn: &Connection, wal: &mut WalFile, stop: &Receiver<()>) {
    // A failure is logged when it starts and when it ends, not at every interval.
    let mut failing = false;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        match checkpoint(conn, wal) {
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
/// committed meanwhile, with the WAL synced in between (see the module's documentation).
fn checkpoint(conn: &Connection, wal: &mut WalFile) -> Result<()> {
    let passive = Outcome::of(conn, "PASSIVE")?;
    if passive.pages > 0 && passive.complete() {
        wal.sync();
        Outcome::of(conn, "RESTART")?;
    }
    Ok(())
}

/// The WAL, as a file of the checkpointer's own to sync.
///
/// SQLite takes no lock on the WAL file (its locks are on the `-shm` file), so a descriptor of
/// our own may be opened and closed at will: closing one to the main database file would drop
/// the locks SQLite's connections hold on it.
#[derive(Debug)]
struct WalFile {
    path: PathBuf,
    /// Opened at the first sync, and again after one fails.
    file: Option<File>,
}

impl WalFile {
    /// The WAL of the database at `database`.
    fn of(database: &Path) -> Self {
        let mut path = database.as_os_str().to_owned();
        path.push("-wal");
        Self {
            path: path.into(),
            file: None,
        }
    }

    /// Writes the WAL's frames to the disk. A failure is not reported: the RESTART that
    /// follows syncs the WAL itself, and fails with the reason if the disk does.
    fn sync(&mut self) {
        if self.try_sync().is_err() {
            self.file = None;
        }
    }

    fn try_sync(&mut self) -> io::Result<()> {
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(File::open(&self.path)?),
        };
        file.sync_data()
    }
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

    /// A wrong path would never be opened, and the sync would be skipped without a word.
    #[test]
    fn the_wal_is_the_database_files_own_and_is_opened_once_it_exists() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let database = dir.path().join("iagent.sqlite3");
        let mut wal = WalFile::of(&database);
        assert_eq!(wal.path, dir.path().join("iagent.sqlite3-wal"));
        wal.sync();
        assert!(wal.file.is_none(), "there is no WAL to open yet");
        std::fs::write(&wal.path, b"frames").expect("a WAL");
        wal.sync();
        assert!(wal.file.is_some(), "the WAL is kept open once it exists");
    }
}
