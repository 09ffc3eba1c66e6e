//! The purge of expired records, a slice at a time.
//!
//! A purge removes what expired since the one before: at 10 000 messages/s and the default
//! interval of a minute, some 600 000 history entries and as many dedup keys. Removed in one
//! transaction, half that many held the writer, and every message behind it, for 400 ms.
//!
//! So a purge is cut into slices ([`slice`]), each a transaction of its own on the writer
//! thread, which removes at most [`Options::purge_slice_rows`](super::Options) dedup rows,
//! keys of history entries, and history entries. Batches commit between two slices. Every
//! slice removes the oldest of what is due, so that what it leaves is what a whole purge at an
//! earlier cut would have left: a purge stopped between two slices (an error, a kill) leaves
//! a store the next purge completes, and every invariant of the dedup keys and the history
//! holds at each slice's commit.

use rusqlite::Connection;

use super::writer::Batch;
use crate::{PurgeBefore, Result};

/// How many rows of each kind a slice of a purge removes at most, by default (see
/// [`Options::purge_slice_rows`](super::Options)). A key removed rewrites its block of keys,
/// and keys spread over many blocks cost one each: slices of 1 024 took up to 22 ms where a
/// purge began, 2 to 3 ms later on. At 10 000 messages/s, purging 30 s of them a minute, the
/// slowest message took 396 ms with the purge in one transaction, 41 to 55 ms with slices of
/// 1 024, and 19 to 51 ms with 256 (10.5 ms with no purge).
pub const DEFAULT_PURGE_SLICE_ROWS: usize = 256;

/// How far a purge has got: what the next slice starts from.
#[derive(Debug, Clone)]
pub(super) struct Cursor {
    before: PurgeBefore,
    /// The dedup rows before this id have been looked at: those left are unanswered.
    rows_from: i64,
    /// Whether no dedup record older than the cut is left.
    dedup_done: bool,
    /// Where the history is at.
    history: History,
}

/// A purge's progress through the history.
#[derive(Debug, Clone)]
enum History {
    /// Entries older than the cut are left.
    Entries { removed: bool },
    /// None is, and the heads that named the entries removed (below `keep_from`) are
    /// forgotten, conversation by conversation: those after `after` are left.
    Heads {
        keep_from: i64,
        after: Option<(String, String)>,
    },
    /// The heads too are done, or none named an entry removed.
    Done,
}

impl Cursor {
    /// A purge of what is older than `before`, not begun.
    pub(super) fn new(before: PurgeBefore) -> Self {
        Self {
            before,
            rows_from: i64::MIN,
            dedup_done: false,
            history: History::Entries { removed: false },
        }
    }
}

/// What one slice removed, and where the next one starts if anything is left.
#[derive(Debug)]
pub(super) struct Slice {
    pub(super) dedup: u64,
    pub(super) history: u64,
    pub(super) next: Option<Cursor>,
}

/// Removes up to `rows` of each kind of expired record after `cursor`, oldest first. May run
/// twice, its first run rolled back (see [`super::writer`]): it changes only what it returns,
/// never `cursor`.
pub(super) fn slice(database: &mut Batch<'_>, cursor: &Cursor, rows: usize) -> Result<Slice> {
    // The purge reads entries, and reads the tails back from the database.
    database.appends.write()?;
    let Batch {
        conn,
        history,
        dedup,
        ..
    } = database;
    let mut next = cursor.clone();
    let mut purged = (0, 0);
    if !cursor.dedup_done {
        let slice = dedup.purge(conn, cursor.before.dedup, cursor.rows_from, rows)?;
        (next.rows_from, next.dedup_done) = (slice.rows_from, slice.done);
        purged.0 = slice.removed;
    }
    next.history = match &cursor.history {
        History::Entries { removed } => {
            let (keep_from, done) = history.purge_from(conn, cursor.before.history, rows)?;
            let reload_keys = dedup.keep_records_before(conn, keep_from)?;
            purged.1 = history.purge(conn, keep_from)?;
            if reload_keys {
                dedup.reload(conn)?;
            }
            let removed = *removed || purged.1 > 0;
            match (done, removed) {
                (false, _) => History::Entries { removed },
                (true, true) => History::Heads {
                    keep_from,
                    after: None,
                },
                (true, false) => History::Done,
            }
        }
        History::Heads { keep_from, after } => {
            match history.forget_heads(conn, *keep_from, after.as_ref(), rows)? {
                Some(after) => History::Heads {
                    keep_from: *keep_from,
                    after: Some(after),
                },
                None => History::Done,
            }
        }
        History::Done => History::Done,
    };
    let done = next.dedup_done && matches!(next.history, History::Done);
    Ok(Slice {
        dedup: purged.0,
        history: purged.1,
        next: (!done).then_some(next),
    })
}

/// What expired besides the records: the outbox entries each app lost, and the files, whose
/// bytes the caller removes once their rows are gone.
#[derive(Debug)]
pub(super) struct Expired {
    pub(super) outbox: Vec<(String, u64)>,
    pub(super) files: Vec<String>,
}

/// Removes the outbox entries and the files that expired.
pub(super) fn outbox_and_files(conn: &Connection, before: PurgeBefore) -> Result<Expired> {
    let outbox = conn
        .prepare_cached(
            "SELECT app, COUNT(*) FROM outbox WHERE expires_ms < ?1 GROUP BY app ORDER BY app",
        )?
        .query_map([before.outbox], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    conn.prepare_cached("DELETE FROM outbox WHERE expires_ms < ?1")?
        .execute([before.outbox])?;
    let files = conn
        .prepare_cached("DELETE FROM files WHERE created_ms < ?1 RETURNING id")?
        .query_map([before.files], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Expired { outbox, files })
}

/// `rows` as a count of ids.
pub(super) fn id_count(rows: usize) -> i64 {
    i64::try_from(rows).unwrap_or(i64::MAX)
}
