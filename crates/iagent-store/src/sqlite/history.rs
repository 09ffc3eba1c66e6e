//! Conversation history, kept so that a commit writes only the end of the table.
//!
//! History rows are appended in id order, which costs a commit only the table's last page.
//! Any index over them that is ordered by conversation puts each new entry at its
//! conversation's place: with thousands of conversations, a page per message, either at commit
//! (an ordinary index) or at each merge of an index kept in memory in between, whose merges
//! then grew with the history and took a fifth of the gateway's throughput.
//!
//! So nothing indexes the entries. Each row names the previous entry of its conversation
//! (`prev`), and a conversation's history is read from its newest entry back. Only the newest
//! entry, the head, is indexed: `history_heads` holds one row per conversation, current up to
//! a watermark (`history_heads_through` in `store_meta`); the heads that moved after it are
//! kept in memory, the tail, and written into `history_heads` once enough rows have been
//! appended (see [`DEFAULT_HISTORY_MERGE_ROWS`]). The table grows with the conversations, not
//! with their messages. The tail is derived state: whenever its agreement with the database
//! is in doubt (a rollback, a purge) it is read back from the rows after the watermark, which
//! is also how a restart, after `kill -9` or not, finds it.
//!
//! A merge is written a slice at a time ([`HISTORY_MERGE_SLICE_ROWS`] heads per transaction,
//! between batches), so that no merge holds up the writer for long: written whole, the heads
//! of 10 000 conversations had paused it for 12 ms. The tail keeps the heads it merged for one
//! more merge period: a conversation that goes on is then found in memory, where looking its
//! head up in `history_heads` after every merge had cost 5% of the writer's time. A head that
//! did not move for a whole period leaves memory at the next merge.
//!
//! Entries are purged oldest row first, up to the first one inside the retention window, so
//! the entries a conversation keeps are always the newest ones: every chain ends where the
//! purge stopped, and no entry is left unreachable behind a purged one.

use std::sync::Arc;

use rusqlite::{CachedStatement, Connection, OptionalExtension, ToSql, params};

use super::KeyMap;
use super::bulk;
use super::packed::{self, Pack};
use crate::{HistoryEntry, Result};

/// How many rows are appended, by default, before the heads that moved are written into
/// `history_heads`. A larger tail writes a busy conversation's head once for more entries, and
/// costs memory (a key and 8 bytes per conversation that moved in the last two merge periods),
/// more slices per merge and a longer read of the rows after the watermark at start-up.
pub const DEFAULT_HISTORY_MERGE_ROWS: usize = 32_768;

/// The most heads one slice of a merge writes. A slice runs between two batches, in a
/// transaction of its own (shared with the dedup keys' slice, if one is due), and the batch
/// after it waits for it: at this size, 1 to 3 ms measured at 5 000 messages/s over 10 000
/// conversations. A slice follows every batch while a merge is under way.
pub const HISTORY_MERGE_SLICE_ROWS: usize = 1024;

/// The `store_meta` key of the last history id whose conversation's head `history_heads` has.
const WATERMARK_KEY: &str = "history_heads_through";

/// Creates the history tables, and moves a database from an earlier layout over to them.
pub(super) fn migrate(conn: &Connection) -> Result<()> {
    create(conn)?;
    // A table from before an entry held its reply, or before it could carry a record, gets
    // the columns; its rows stay as they are (a reply stored as a row of its own reads back
    // in the same order).
    super::add_column(conn, "history", "reply TEXT")?;
    super::add_column(conn, "history", "msg_id TEXT")?;
    if super::add_column(conn, "history", "prev INTEGER")? {
        chain(conn)?;
    }
    // Purges go by id now; the index by time only cost every commit a page.
    conn.execute_batch("DROP INDEX IF EXISTS history_at;")?;
    Ok(())
}

/// The history tables. Ids come from [`HistoryHeads::next_id`], never from SQLite: an id must
/// never be handed out twice, since a `prev`, a head or a dedup key naming a purged row must
/// not come to name another (tables made before that keep their `AUTOINCREMENT`, harmlessly).
/// `msg_id` is set on an entry whose reply is that message's response: the entry is also the
/// message's dedup record (see [`super::dedup`]).
fn create(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS history (
            id INTEGER PRIMARY KEY,
            app TEXT NOT NULL,
            conversation TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            message TEXT NOT NULL,
            reply TEXT,
            msg_id TEXT,
            prev INTEGER
        );
        CREATE TABLE IF NOT EXISTS history_heads (
            app TEXT NOT NULL,
            conversation TEXT NOT NULL,
            head INTEGER NOT NULL,
            PRIMARY KEY (app, conversation)
        ) WITHOUT ROWID;",
    )?;
    Ok(())
}

/// Links the rows of a table from an earlier layout (indexed by conversation, in a table of
/// its own or an ordinary index) into chains, records each conversation's head, and drops the
/// earlier index. Runs once, inside the migration's transaction.
fn chain(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE INDEX history_chaining ON history(app, conversation, id);
         UPDATE history SET prev = (
             SELECT MAX(earlier.id) FROM history earlier
             WHERE earlier.app = history.app AND earlier.conversation = history.conversation
               AND earlier.id < history.id);
         INSERT INTO history_heads (app, conversation, head)
             SELECT app, conversation, MAX(id) FROM history GROUP BY app, conversation;
         DROP INDEX history_chaining;
         DROP INDEX IF EXISTS history_conversation;
         DROP TABLE IF EXISTS history_index;
         DELETE FROM store_meta WHERE key = 'history_indexed_through';",
    )?;
    let through: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM history", [], |row| {
        row.get(0)
    })?;
    set_watermark(conn, through)
}

fn watermark(conn: &Connection) -> Result<Option<i64>> {
    super::meta(conn, WATERMARK_KEY)
}

fn set_watermark(conn: &Connection, through: i64) -> Result<()> {
    super::set_meta(conn, WATERMARK_KEY, through)
}

/// The conversation's head as of the watermark.
fn merged_head(conn: &Connection, app: &str, conversation: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT head FROM history_heads WHERE app = ?1 AND conversation = ?2")?
        .query_row(params![app, conversation], |row| row.get(0))
        .optional()?)
}

/// The statements that append entries, each prepared once for a batch, which appends an entry
/// per message. Taken from rusqlite's statement cache for each entry instead, a statement's SQL
/// text was trimmed, hashed and copied on its way out, and its bindings cleared and the text
/// hashed again on its way back: an entry's insert took 15 400 instructions, 12 800 now
/// (`bench/instructions`). The texts are packed into buffers held for the batch too.
pub(super) struct Appends<'conn> {
    conn: &'conn Connection,
    /// The insert of an entry that is no dedup record.
    plain: Option<CachedStatement<'conn>>,
    /// The insert of an entry that is its message's dedup record, unless its key is merged.
    keyed: Option<CachedStatement<'conn>>,
    /// The stored forms of the entry's message and reply.
    message: Vec<u8>,
    reply: Vec<u8>,
}

impl<'conn> Appends<'conn> {
    /// Statements on `conn`, prepared when first used.
    pub(super) fn new(conn: &'conn Connection) -> Self {
        Self {
            conn,
            plain: None,
            keyed: None,
            message: Vec::new(),
            reply: Vec::new(),
        }
    }

    /// Inserts `entry` as row `id`, the dedup record of `msg_id` if one is given; returns
    /// whether it was written (a record's is not when its key is merged already).
    fn insert(
        &mut self,
        id: i64,
        app: &str,
        msg_id: Option<&str>,
        entry: &HistoryEntry,
        prev: Option<i64>,
    ) -> Result<bool> {
        let (slot, sql) = if msg_id.is_some() {
            (
                &mut self.keyed,
                concat!(
                    "INSERT OR IGNORE INTO history
                         (id, app, msg_id, conversation, at_ms, message, reply, prev)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8 WHERE ",
                    super::dedup::not_merged!()
                ),
            )
        } else {
            (
                &mut self.plain,
                "INSERT INTO history (id, app, msg_id, conversation, at_ms, message, reply, prev)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
        };
        let statement = match slot {
            Some(statement) => statement,
            None => slot.insert(self.conn.prepare_cached(sql)?),
        };
        let message = Pack {
            text: &entry.message,
            msg_id,
        }
        .stored(&mut self.message);
        let reply =
            (entry.reply.as_deref()).map(|text| Pack { text, msg_id }.stored(&mut self.reply));
        let inserted = statement.execute(params![
            id,
            app,
            msg_id,
            entry.conversation,
            entry.at_ms,
            message,
            reply,
            prev
        ])?;
        Ok(inserted > 0)
    }
}

/// The heads in memory, by app, then by conversation. Hashed, not ordered: each message looks
/// its conversation up twice, and in an ordered map of thousands of keys that share their
/// first bytes, the string comparisons were about 5% of the writer's time; a merge sorts the
/// heads it writes instead, once.
type Tail = KeyMap<Conversations>;

/// One app's heads in the tail, by conversation. Shared strings, so that a merge's run takes
/// the keys without copying them: two strings copied per head were most of a merge's start.
type Conversations = std::collections::HashMap<Arc<str>, Head, foldhash::fast::RandomState>;

/// A conversation's newest entry, as the tail holds it.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// The entry's id.
    id: i64,
    /// The merge period in which the head last moved (see [`HistoryHeads::period`]).
    period: u64,
}

/// The in-memory part of the conversation heads: the tail.
///
/// A conversation's head moves as its rows are inserted. Statements rolled back take their
/// rows with them, so the writer then reads the tail back ([`HistoryHeads::reload`]): the ids
/// those rows took are handed out again, and a head must never point at another
/// conversation's row.
///
/// The tail holds every head that moved after the watermark (those of the current period,
/// and, while a merge is under way, those of the period being merged) and the heads of the
/// period merged last, which `history_heads` has too. A conversation not in the tail has its
/// head in `history_heads`, or none.
#[derive(Debug)]
pub(super) struct HistoryHeads {
    tail: Tail,
    /// Heads moved in the current period (counted per row).
    rows: usize,
    /// The number of rows in a period at which its heads are merged.
    merge_rows: usize,
    /// The current merge period: it ends, and a new one begins, when a merge begins.
    period: u64,
    /// The id of the next entry: above every row's and the watermark.
    next_id: i64,
    /// The heads being written into `history_heads`.
    run: Option<Run>,
}

/// The heads of a period, sorted by key (the order they are written in), as they were when
/// their merge began.
#[derive(Debug)]
struct Run {
    /// `(app, conversation, head)`.
    heads: Vec<(Arc<str>, Arc<str>, i64)>,
    /// Heads before this are in `history_heads`, committed.
    written: usize,
    /// The watermark once every head is written: the last id handed out when the merge began.
    through: i64,
}

impl HistoryHeads {
    /// Reads the tail back from the rows after the watermark.
    pub(super) fn load(conn: &Connection, merge_rows: usize) -> Result<Self> {
        let mut heads = Self {
            tail: Tail::default(),
            rows: 0,
            merge_rows,
            period: 0,
            next_id: 1,
            run: None,
        };
        heads.reload(conn)?;
        Ok(heads)
    }

    /// Replaces the tail with what the database holds after the watermark; a merge under way
    /// starts over.
    pub(super) fn reload(&mut self, conn: &Connection) -> Result<()> {
        self.tail.clear();
        self.rows = 0;
        self.run = None;
        let through = watermark(conn)?.unwrap_or(0);
        let mut rows = conn.prepare_cached(
            "SELECT app, conversation, id FROM history WHERE id > ?1 ORDER BY id",
        )?;
        let mut rows = rows.query([through])?;
        while let Some(row) = rows.next()? {
            let (app, conversation): (String, String) = (row.get(0)?, row.get(1)?);
            self.moved(&app, &conversation, row.get(2)?);
        }
        let last: Option<i64> = conn
            .prepare_cached("SELECT MAX(id) FROM history")?
            .query_row([], |row| row.get(0))?;
        self.next_id = last.unwrap_or(0).max(through) + 1;
        Ok(())
    }

    /// Records that `id` is the newest entry of the conversation; allocates only for a
    /// conversation new to the tail.
    fn moved(&mut self, app: &str, conversation: &str, id: i64) {
        self.rows += 1;
        let head = Head {
            id,
            period: self.period,
        };
        match self.tail.get_mut(app) {
            None => {
                let conversations = Conversations::from_iter([(Arc::from(conversation), head)]);
                self.tail.insert(app.to_owned(), conversations);
            }
            Some(conversations) => match conversations.get_mut(conversation) {
                Some(known) => *known = head,
                None => {
                    conversations.insert(Arc::from(conversation), head);
                }
            },
        }
    }

    /// The conversation's newest entry, if the tail has it.
    fn tail_head(&self, app: &str, conversation: &str) -> Option<i64> {
        self.tail.get(app)?.get(conversation).map(|head| head.id)
    }

    /// The id of the conversation's newest entry: in the tail if it has it, else in
    /// `history_heads`.
    fn head(&self, conn: &Connection, app: &str, conversation: &str) -> Result<Option<i64>> {
        match self.tail_head(app, conversation) {
            Some(head) => Ok(Some(head)),
            None => merged_head(conn, app, conversation),
        }
    }

    /// Appends entries to the history of the app's conversations.
    pub(super) fn append(
        &mut self,
        appends: &mut Appends<'_>,
        app: &str,
        entries: &[HistoryEntry],
    ) -> Result<()> {
        for entry in entries {
            self.insert(appends, app, entry, None)?;
        }
        Ok(())
    }

    /// Appends an entry whose reply is the response to `msg_id`, as that message's dedup
    /// record, unless `message_keys` has the key already; returns the entry's id, or `None`
    /// when it had (and nothing was written).
    pub(super) fn append_record(
        &mut self,
        appends: &mut Appends<'_>,
        app: &str,
        msg_id: &str,
        entry: &HistoryEntry,
    ) -> Result<Option<i64>> {
        let id = self.next_id;
        Ok(self
            .insert(appends, app, entry, Some(msg_id))?
            .then_some(id))
    }

    /// Inserts an entry; says whether it was written (a record's is not when its key is
    /// merged already). The tail moves only once the row is in.
    fn insert(
        &mut self,
        appends: &mut Appends<'_>,
        app: &str,
        entry: &HistoryEntry,
        msg_id: Option<&str>,
    ) -> Result<bool> {
        let prev = match self.tail_head(app, &entry.conversation) {
            Some(prev) => Some(prev),
            None => merged_head(appends.conn, app, &entry.conversation)?,
        };
        if !appends.insert(self.next_id, app, msg_id, entry, prev)? {
            return Ok(false);
        }
        self.moved(app, &entry.conversation, self.next_id);
        self.next_id += 1;
        Ok(true)
    }

    /// The last `limit` messages of a conversation, as JSON text, oldest first, read from
    /// its newest entry back. The walk ends at the first entry that is gone (purged: all
    /// older ones are too).
    pub(super) fn read(
        &self,
        conn: &Connection,
        app: &str,
        conversation: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        // The row's own app and conversation are checked too: a `prev` or a head is only ever
        // a pointer, and a pointer must not be able to show one conversation another's
        // messages.
        let mut entry = conn.prepare_cached(
            "SELECT message, reply, prev, msg_id FROM history
             WHERE id = ?1 AND app = ?2 AND conversation = ?3",
        )?;
        let mut newest_first = Vec::with_capacity(limit.min(64));
        let mut next = self.head(conn, app, conversation)?;
        while let Some(id) = next
            && newest_first.len() < limit
        {
            let found = entry
                .query_row(params![id, app, conversation], |row| {
                    let msg_id = row.get_ref(3)?.as_str_or_null()?;
                    Ok((
                        packed::text(row, 0, msg_id)?,
                        packed::optional_text(row, 1, msg_id)?,
                        row.get::<_, Option<i64>>(2)?,
                    ))
                })
                .optional()?;
            let Some((message, reply, prev)) = found else {
                break;
            };
            newest_first.extend(reply);
            newest_first.push(message);
            // Each entry names an earlier one: no chain, however damaged, can loop.
            next = prev.filter(|&prev| prev < id);
        }
        newest_first.truncate(limit);
        newest_first.reverse();
        Ok(newest_first)
    }

    /// The first entry a purge of the entries older than `before_ms` keeps: they go oldest
    /// row first, up to the first one from `before_ms` on, found by reading the rows before
    /// it in id order.
    ///
    /// An entry's age is the gateway's clock when it was stored, so entries are old in the
    /// order they were written, give or take the moments their writes waited; one written
    /// out of that order is purged with its neighbours.
    pub(super) fn purge_from(&self, conn: &Connection, before_ms: i64) -> Result<i64> {
        Ok(conn
            .prepare_cached("SELECT id FROM history WHERE at_ms >= ?1 ORDER BY id LIMIT 1")?
            .query_row([before_ms], |row| row.get(0))
            .optional()?
            .unwrap_or(self.next_id))
    }

    /// Removes the entries before `keep_from` (see [`HistoryHeads::purge_from`]); returns how
    /// many. The tail is read back afterwards. Every statement runs inside SQLite, so a purge
    /// of millions of rows (after a long stop) holds none of them in memory.
    pub(super) fn purge(&mut self, conn: &Connection, keep_from: i64) -> Result<u64> {
        let removed = conn
            .prepare_cached("DELETE FROM history WHERE id < ?1")?
            .execute([keep_from])?;
        conn.prepare_cached("DELETE FROM history_heads WHERE head < ?1")?
            .execute([keep_from])?;
        // No row is left before `keep_from`, so the watermark may move up to it: the ids of
        // the rows gone are then never handed out again, even to a table the purge emptied,
        // and no key or head that named one comes to name another.
        let through = watermark(conn)?.unwrap_or(0).max(keep_from - 1);
        set_watermark(conn, through)?;
        self.reload(conn)?;
        Ok(removed as u64)
    }

    /// How many rows were appended after the watermark.
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Whether a slice of a merge is due: one is under way, or the period has appended enough
    /// rows for its heads to be merged.
    pub(super) fn merge_due(&self) -> bool {
        self.run.is_some() || self.rows >= self.merge_rows.max(1)
    }

    /// Writes the next slice of the merge (beginning it, if none is under way) into
    /// `history_heads`, in the caller's transaction, and moves the watermark past every row
    /// appended before the merge began once the slice is the merge's last. The merge counts
    /// the slice as written only in [`HistoryHeads::merged`], once that transaction has
    /// committed.
    pub(super) fn merge(&mut self, conn: &Connection) -> Result<()> {
        let run = match self.run.take() {
            Some(run) => run,
            None => self.begin_merge(),
        };
        let run = self.run.insert(run);
        let end = run.heads.len().min(run.written + HISTORY_MERGE_SLICE_ROWS);
        // A head replaces the conversation's row, which holds nothing else.
        bulk::insert_all(
            conn,
            "INSERT OR REPLACE INTO history_heads (app, conversation, head)",
            &run.heads[run.written..end],
            |(app, conversation, head)| [app as &dyn ToSql, conversation, head],
        )?;
        if end == run.heads.len() {
            set_watermark(conn, run.through)?;
        }
        Ok(())
    }

    /// Ends the current period: its heads become the merge's run, sorted, and the heads of the
    /// period before, which did not move since they were merged, leave memory (the table has
    /// them).
    fn begin_merge(&mut self) -> Run {
        let period = self.period;
        let mut heads = Vec::with_capacity(self.rows.min(self.merge_rows));
        let mut apps: Vec<_> = self.tail.iter_mut().collect();
        apps.sort_unstable_by_key(|(name, _)| *name);
        for (name, conversations) in apps {
            let app: Arc<str> = Arc::from(name.as_str());
            let start = heads.len();
            conversations.retain(|conversation, head| {
                let moved = head.period == period;
                if moved {
                    heads.push((app.clone(), conversation.clone(), head.id));
                }
                moved
            });
            heads[start..].sort_unstable_by(|a, b| a.1.cmp(&b.1));
        }
        self.tail
            .retain(|_, conversations| !conversations.is_empty());
        self.period += 1;
        self.rows = 0;
        Run {
            heads,
            written: 0,
            through: self.next_id - 1,
        }
    }

    /// The slice [`HistoryHeads::merge`] wrote committed; the merge ends with its last.
    pub(super) fn merged(&mut self) {
        if let Some(run) = &mut self.run {
            run.written = run.heads.len().min(run.written + HISTORY_MERGE_SLICE_ROWS);
            if run.written == run.heads.len() {
                self.run = None;
            }
        }
    }
}
