//! Many rows per statement, for the merges of the tails: run once per row, a statement's own
//! work (its reset, its program started again) was about as much as the insert itself.

use std::ops::Range;

use rusqlite::{Connection, ToSql, params_from_iter};

use crate::Result;

/// How far a merge has written its run of rows: those committed, and those written after them
/// in the transaction still open, which count only once it commits (a rollback would take
/// them back).
#[derive(Debug, Default)]
pub(super) struct Progress {
    written: usize,
    in_transaction: usize,
}

impl Progress {
    /// The next `rows` of a run of `len` to write in the open transaction, after those it
    /// holds already.
    pub(super) fn next(&mut self, len: usize, rows: usize) -> Range<usize> {
        let from = self.written + self.in_transaction;
        let end = len.min(from + rows);
        self.in_transaction = end - self.written;
        from..end
    }

    /// Whether a merge of a run of `len` rows is behind its pace, with `appended` rows of the
    /// next run's `period` in the tail since it was taken: every row of the run is due by the
    /// time half a period has been appended. A merge that writes only as fast as rows come in
    /// never catches up with them: each run is then longer than the one before (at saturation
    /// 32 790 keys, then 93 701, 277 547, 807 624 within ten seconds), and the tail with it.
    pub(super) fn behind(&self, len: usize, appended: usize, period: usize) -> bool {
        let due = len.saturating_mul(appended.saturating_mul(2)) / period.max(1);
        self.written + self.in_transaction < due.min(len)
    }

    /// The open transaction committed; says whether all `len` rows of the run are written.
    pub(super) fn committed(&mut self, len: usize) -> bool {
        self.written += std::mem::take(&mut self.in_transaction);
        self.written == len
    }
}

/// How many rows one statement inserts.
pub(super) const ROWS_PER_STATEMENT: usize = 64;

/// Inserts `rows` with `insert` (an `INSERT ... INTO table (columns)`, without `VALUES`), each
/// row's `N` parameters given by `params`, [`ROWS_PER_STATEMENT`] rows per statement.
pub(super) fn insert_all<R, const N: usize>(
    conn: &Connection,
    insert: &str,
    rows: &[R],
    params: impl Fn(&R) -> [&dyn ToSql; N],
) -> Result<()> {
    let mut chunks = rows.chunks_exact(ROWS_PER_STATEMENT);
    if chunks.len() > 0 {
        let mut statement = conn.prepare_cached(&values(insert, ROWS_PER_STATEMENT, N))?;
        for chunk in chunks.by_ref() {
            statement.execute(params_from_iter(chunk.iter().flat_map(&params)))?;
        }
    }
    // The rest, of any length and once per merge or slice, is not cached: its statements
    // would push the message path's own out of the connection's small statement cache.
    let rest = chunks.remainder();
    if !rest.is_empty() {
        conn.prepare(&values(insert, rest.len(), N))?
            .execute(params_from_iter(rest.iter().flat_map(&params)))?;
    }
    Ok(())
}

/// `insert` with `VALUES` for `rows` rows of `columns` parameters each.
fn values(insert: &str, rows: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(","));
    format!("{insert} VALUES {}", vec![row; rows].join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_counts_rows_written_only_once_their_transaction_commits() {
        let mut progress = Progress::default();
        // Two steps in one transaction, then its commit.
        assert_eq!(progress.next(10, 4), 0..4);
        assert_eq!(progress.next(10, 4), 4..8);
        assert!(!progress.committed(10));
        // A step, then another past the end of the run, committed together: all written.
        assert_eq!(progress.next(10, 1), 8..9);
        assert_eq!(progress.next(10, 4), 9..10);
        assert!(progress.committed(10));
        // Nothing more to write.
        assert_eq!(progress.next(10, 4), 10..10);
        assert!(progress.committed(10));
    }

    #[test]
    fn a_run_is_due_by_half_the_next_period() {
        let mut progress = Progress::default();
        // Nothing appended since the run was taken: nothing due yet.
        assert!(!progress.behind(100, 0, 1000));
        // A quarter of the period appended: half the run is due.
        assert!(progress.behind(100, 250, 1000));
        progress.next(100, 49);
        assert!(progress.behind(100, 250, 1000));
        // Rows written in the open transaction count.
        progress.next(100, 1);
        assert!(!progress.behind(100, 250, 1000));
        assert!(progress.behind(100, 260, 1000));
        // Half a period and more: the whole run is due, and no more than it.
        progress.next(100, 49);
        assert!(progress.behind(100, 500, 1000));
        assert!(progress.behind(100, 5000, 1000));
        progress.next(100, 1);
        assert!(progress.committed(100));
        assert!(!progress.behind(100, 5000, 1000));
        // A run far longer than a period is due at the same point.
        assert!(Progress::default().behind(1_000_000, 500, 1000));
        assert!(!Progress::default().behind(1_000_000, 0, 1000));
    }

    fn table(conn: &Connection) -> Vec<(i64, String)> {
        conn.prepare("SELECT id, name FROM t ORDER BY id")
            .and_then(|mut select| {
                select
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect()
            })
            .expect("rows read")
    }

    #[test]
    fn every_row_is_inserted_whatever_the_count() {
        for count in [
            0,
            1,
            ROWS_PER_STATEMENT - 1,
            ROWS_PER_STATEMENT,
            3 * ROWS_PER_STATEMENT + 5,
        ] {
            let conn = Connection::open_in_memory().expect("database");
            conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
                .expect("table");
            let rows: Vec<(i64, String)> = (0..count)
                .map(|id| (id as i64, format!("row {id}")))
                .collect();
            insert_all(&conn, "INSERT INTO t (id, name)", &rows, |(id, name)| {
                [id as &dyn ToSql, name]
            })
            .expect("inserted");
            assert_eq!(table(&conn), rows, "{count} rows");
        }
    }

    #[test]
    fn values_lists_a_parameter_per_column_of_each_row() {
        assert_eq!(
            values("INSERT INTO t (a, b)", 3, 2),
            "INSERT INTO t (a, b) VALUES (?,?),(?,?),(?,?)"
        );
    }
}
