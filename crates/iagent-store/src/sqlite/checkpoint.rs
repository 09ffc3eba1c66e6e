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

use std::path::Path;
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
    thread::Builder::new()
        .name("iagent-checkpoint".into())
        .spawn(move || run(&conn, &stop))
        .map_err(|source| StoreError::DataDir {
            path: path.to_owned(),
            source,
        })?;
    Ok(())
}

fn run(conn: &Connection, stop: &Receiver<()>) {
    // A failure is logged when it starts and when it ends, not at every interval.
    let mut failing = false;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        match checkpoint(conn) {
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
/// committed meanwhile.
fn checkpoint(conn: &Connection) -> Result<()> {
    let passive = Outcome::of(conn, "PASSIVE")?;
    if passive.pages > 0 && passive.complete() {
        Outcome::of(conn, "RESTART")?;
    }
    Ok(())
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
