//! How the writer's connection waits for a lock another connection holds: the checkpointer's
//! RESTART (see [`super::checkpoint`]) several times a second, or the CLI writing to the
//! database a gateway serves from.
//!
//! SQLite's own busy handler sleeps 1, 2, 5, 10 ms and longer between its tries. A RESTART
//! holds the write lock for a fraction of a millisecond, so a commit that met one waited a
//! whole millisecond or more (up to 8 ms was seen) for a lock that was free long before, and
//! every message queued behind that commit waited with it: at 10k messages/s, the largest
//! part of the processing time above 1 ms. This handler tries again every
//! [`RETRY_AFTER`] instead, for up to [`LOCK_TIMEOUT`] in all.
//!
//! Only a thread that serves nobody else may wait: a commit on a caller's thread (see
//! [`super::committer`]) runs under [`NoWait`], fails at once on a lock held elsewhere, and
//! hands its jobs to the writer thread, which waits for them.

use std::cell::Cell;
use std::thread;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::Result;

/// How long a statement of the writer waits for a lock, in all, before it fails with "database
/// is locked".
pub(super) const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the writer sleeps between two tries for a lock.
const RETRY_AFTER: Duration = Duration::from_micros(50);

thread_local! {
    /// When the current wait for a lock began (SQLite passes only the number of tries).
    static WAIT_BEGAN: Cell<Option<Instant>> = const { Cell::new(None) };

    /// Whether statements on this thread wait for a lock at all (see [`NoWait`]).
    static WAITS: Cell<bool> = const { Cell::new(true) };
}

/// While it lives, statements on the current thread do not wait for a lock another
/// connection holds: they fail with "database is locked" at once.
pub(super) struct NoWait(());

impl NoWait {
    pub(super) fn begin() -> Self {
        WAITS.set(false);
        Self(())
    }
}

impl Drop for NoWait {
    fn drop(&mut self) {
        WAITS.set(true);
    }
}

/// Makes `conn` wait for locks as this module describes.
pub(super) fn install(conn: &Connection) -> Result<()> {
    conn.busy_handler(Some(wait))?;
    Ok(())
}

/// SQLite's busy handler: `true` to try again, `false` to give up. `tries` is 0 on the first
/// call of each wait.
fn wait(tries: i32) -> bool {
    if !WAITS.get() {
        return false;
    }
    let now = Instant::now();
    let began = match WAIT_BEGAN.get() {
        Some(began) if tries > 0 => began,
        _ => now,
    };
    WAIT_BEGAN.set(Some(began));
    keep_waiting(now.duration_since(began), LOCK_TIMEOUT)
}

/// Sleeps for the next try and says `true`, unless the wait has lasted `timeout` already.
fn keep_waiting(waited: Duration, timeout: Duration) -> bool {
    if waited >= timeout {
        return false;
    }
    thread::sleep(RETRY_AFTER.min(timeout - waited));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_goes_on_until_its_timeout_and_no_further() {
        let timeout = Duration::from_millis(2);
        assert!(keep_waiting(Duration::ZERO, timeout));
        assert!(keep_waiting(Duration::from_millis(1), timeout));
        assert!(!keep_waiting(timeout, timeout));
        assert!(!keep_waiting(Duration::from_secs(1), timeout));
    }

    #[test]
    fn each_wait_is_timed_from_its_own_first_try() {
        // A wait that gave up long ago must not count against the next one.
        WAIT_BEGAN.set(Some(Instant::now() - 2 * LOCK_TIMEOUT));
        assert!(wait(0), "a first try waits");
        assert!(wait(1), "so does the next one, well within the timeout");
    }

    #[test]
    fn under_no_wait_the_handler_gives_up_at_once_and_waits_again_after() {
        {
            let _no_wait = NoWait::begin();
            assert!(!wait(0), "a first try gives up");
            assert!(!wait(1), "and so does any later one");
        }
        assert!(wait(0), "the guard is gone: a try waits again");
    }

    #[test]
    fn a_statement_waits_for_a_lock_another_connection_releases() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("db");
        let writer = Connection::open(&path).expect("open");
        writer
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER);")
            .expect("create");
        // No waiting at all but this module's: rusqlite opens connections with a timeout.
        writer.busy_timeout(Duration::ZERO).expect("no timeout");
        install(&writer).expect("busy handler");
        let other = Connection::open(&path).expect("open");
        other.execute_batch("BEGIN IMMEDIATE").expect("lock");
        let release = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            other.execute_batch("COMMIT").expect("release");
        });
        writer
            .execute("INSERT INTO t (x) VALUES (1)", [])
            .expect("written once the lock was released");
        release.join().expect("releasing thread");
    }
}
