//! Conversation history, and its lookup by conversation kept off the per-commit path.
//!
//! History rows are appended in id order, which costs a commit only the table's last page. An
//! ordinary index on (app, conversation) would instead put every new entry at the place of its
//! conversation: one page per conversation in every commit, so under load with thousands of
//! conversations, one 4 KiB page written to the WAL (and later checkpointed) per message. That
//! was most of the store's work.
//!
//! So the index is kept lazily. `history_index` holds the entries of rows up to a watermark
//! (`history_indexed_through` in `store_meta`); the rows after it, the tail, are indexed in
//! memory, and merged into `history_index` in key order once there are enough of them (see
//! [`DEFAULT_HISTORY_MERGE_ROWS`]): a merge writes each active conversation's page once for
//! all its tail entries. The tail is derived state: whenever its agreement with the database
//! is in doubt (a rollback, a purge) it is read back from the rows after the watermark, which
//! is also how a restart, after `kill -9` or not, finds it.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};

use crate::{HistoryEntry, Result};

/// How many rows the in-memory tail holds, by default, before it is merged into
/// `history_index`. A larger tail makes each active conversation's index page be written for
/// more entries at once, and costs memory (8 bytes a row plus a key per conversation), a
/// longer merge (one transaction, run between batches, that holds up the batch after it) and a
/// longer read of the tail at start-up.
pub const DEFAULT_HISTORY_MERGE_ROWS: usize = 32_768;

/// The `store_meta` key of the last history id whose entry is in `history_index`.
const WATERMARK_KEY: &str = "history_indexed_through";

/// Creates the history tables, and moves a database from before the lazy index over to it.
pub(super) fn migrate(conn: &Connection) -> Result<()> {
    create(conn)?;
    // A table from before an entry held its reply, or before a dedup row could point at it,
    // gets the columns; its rows stay as they are (a reply stored as a row of its own reads
    // back in the same order).
    super::add_column(conn, "history", "reply TEXT")?;
    super::add_column(conn, "history", "message_id INTEGER")?;
    if watermark(conn)?.is_none() {
        // New, or from before the lazy index: the rows there are indexed once, here, and the
        // ordinary index on the conversation, which cost a page per message, goes.
        conn.execute_batch(
            "DROP INDEX IF EXISTS history_conversation;
             INSERT INTO history_index (app, conversation, id)
             SELECT app, conversation, id FROM history;",
        )?;
        let through: i64 =
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM history", [], |row| {
                row.get(0)
            })?;
        set_watermark(conn, through)?;
    }
    Ok(())
}

/// The history tables. Ids come from [`HistoryIndex::next_id`], never from SQLite: an id must
/// never be handed out twice, since a row at or below the watermark is assumed to be in
/// `history_index` already (tables made before that keep their `AUTOINCREMENT`, harmlessly).
/// `message_id` is the dedup row (`messages.id`) whose response is this entry's reply, stored
/// here only.
fn create(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS history (
            id INTEGER PRIMARY KEY,
            app TEXT NOT NULL,
            conversation TEXT NOT NULL,
            at_ms INTEGER NOT NULL,
            message TEXT NOT NULL,
            reply TEXT,
            message_id INTEGER
        );
        CREATE INDEX IF NOT EXISTS history_at ON history(at_ms);
        CREATE TABLE IF NOT EXISTS history_index (
            app TEXT NOT NULL,
            conversation TEXT NOT NULL,
            id INTEGER NOT NULL,
            PRIMARY KEY (app, conversation, id)
        ) WITHOUT ROWID;",
    )?;
    Ok(())
}

fn watermark(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT value FROM store_meta WHERE key = ?1")?
        .query_row([WATERMARK_KEY], |row| row.get(0))
        .optional()?)
}

fn set_watermark(conn: &Connection, through: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO store_meta (key, value) VALUES (?1, ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![WATERMARK_KEY, through])?;
    Ok(())
}

/// The history ids of each conversation after the watermark, oldest first, by app, then by
/// conversation: the order a merge inserts them in.
type Tail = BTreeMap<String, BTreeMap<String, Vec<i64>>>;

/// The in-memory part of the conversation index: the tail's entries.
///
/// Entries join the tail as their rows are inserted. Statements rolled back take their rows
/// with them, so the writer then reads the tail back ([`HistoryIndex::reload`]): the ids those
/// rows took are handed out again, and an entry must never point at another conversation's
/// row.
#[derive(Debug)]
pub(super) struct HistoryIndex {
    tail: Tail,
    rows: usize,
    /// The number of tail rows at which the tail is merged.
    merge_rows: usize,
    /// The id of the next entry: above every row's and the watermark.
    next_id: i64,
}

impl HistoryIndex {
    /// Reads the tail back from the rows after the watermark.
    pub(super) fn load(conn: &Connection, merge_rows: usize) -> Result<Self> {
        let mut index = Self {
            tail: Tail::new(),
            rows: 0,
            merge_rows,
            next_id: 1,
        };
        index.reload(conn)?;
        Ok(index)
    }

    /// Replaces the tail with what the database holds after the watermark.
    pub(super) fn reload(&mut self, conn: &Connection) -> Result<()> {
        self.tail.clear();
        self.rows = 0;
        let through = watermark(conn)?.unwrap_or(0);
        let mut rows = conn.prepare_cached(
            "SELECT app, conversation, id FROM history WHERE id > ?1 ORDER BY id",
        )?;
        let mut rows = rows.query([through])?;
        while let Some(row) = rows.next()? {
            let (app, conversation): (String, String) = (row.get(0)?, row.get(1)?);
            self.push(&app, &conversation, row.get(2)?);
        }
        let last: Option<i64> = conn
            .prepare_cached("SELECT MAX(id) FROM history")?
            .query_row([], |row| row.get(0))?;
        self.next_id = last.unwrap_or(0).max(through) + 1;
        Ok(())
    }

    /// The id the next appended entry gets. The writer thread alone appends, so a job may
    /// name the id before it appends (a dedup row pointing at its reply).
    pub(super) fn next_id(&self) -> i64 {
        self.next_id
    }

    /// Adds an entry to the tail; allocates only for a conversation new to it.
    fn push(&mut self, app: &str, conversation: &str, id: i64) {
        let new = || BTreeMap::from([(conversation.to_owned(), vec![id])]);
        match self.tail.get_mut(app) {
            None => {
                self.tail.insert(app.to_owned(), new());
            }
            Some(conversations) => match conversations.get_mut(conversation) {
                Some(ids) => ids.push(id),
                None => conversations.extend(new()),
            },
        }
        self.rows += 1;
    }

    /// Appends entries to the history of the app's conversations.
    pub(super) fn append(
        &mut self,
        conn: &Connection,
        app: &str,
        entries: &[HistoryEntry],
    ) -> Result<()> {
        entries
            .iter()
            .try_for_each(|entry| self.insert(conn, app, entry, None))
    }

    /// Appends an entry whose reply is also the response of the dedup row `message_id`,
    /// which points back at it (as [`HistoryIndex::next_id`]) instead of holding a copy.
    pub(super) fn append_reply_of(
        &mut self,
        conn: &Connection,
        app: &str,
        entry: &HistoryEntry,
        message_id: i64,
    ) -> Result<()> {
        self.insert(conn, app, entry, Some(message_id))
    }

    fn insert(
        &mut self,
        conn: &Connection,
        app: &str,
        entry: &HistoryEntry,
        message_id: Option<i64>,
    ) -> Result<()> {
        conn.prepare_cached(
            "INSERT INTO history (id, app, conversation, at_ms, message, reply, message_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            self.next_id,
            app,
            entry.conversation,
            entry.at_ms,
            entry.message,
            entry.reply,
            message_id
        ])?;
        self.push(app, &entry.conversation, self.next_id);
        self.next_id += 1;
        Ok(())
    }

    /// The last `limit` messages of a conversation, as JSON text, oldest first. Every entry
    /// holds at least one message, so the last `limit` entries hold them all.
    pub(super) fn read(
        &self,
        conn: &Connection,
        app: &str,
        conversation: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let recent = self
            .tail
            .get(app)
            .and_then(|conversations| conversations.get(conversation))
            .map_or(&[][..], Vec::as_slice);
        let mut ids = Vec::with_capacity(limit.min(recent.len() + 16));
        let older = limit.saturating_sub(recent.len());
        if older > 0 {
            let mut indexed = conn.prepare_cached(
                "SELECT id FROM history_index WHERE app = ?1 AND conversation = ?2
                 ORDER BY id DESC LIMIT ?3",
            )?;
            let newest_first = indexed
                .query_map(params![app, conversation, older as i64], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<i64>>>()?;
            ids.extend(newest_first.into_iter().rev());
        }
        ids.extend_from_slice(&recent[recent.len().saturating_sub(limit)..]);
        // The row's own app and conversation are checked too: an index entry is only ever a
        // pointer, and a pointer must not be able to show one conversation another's messages.
        let mut entry = conn.prepare_cached(
            "SELECT message, reply FROM history WHERE id = ?1 AND app = ?2 AND conversation = ?3",
        )?;
        let mut messages = Vec::with_capacity(ids.len() * 2);
        for id in ids {
            let found = entry
                .query_row(params![id, app, conversation], |row| {
                    Ok((row.get(0)?, row.get::<_, Option<String>>(1)?))
                })
                .optional()?;
            if let Some((message, reply)) = found {
                messages.push(message);
                messages.extend(reply);
            }
        }
        messages.drain(..messages.len().saturating_sub(limit));
        Ok(messages)
    }

    /// Removes history entries from before `before_ms`, with their index entries; returns
    /// how many. The tail is read back afterwards. Both deletes run inside SQLite, so a purge
    /// of millions of rows (after a long stop) holds none of them in memory.
    pub(super) fn purge(&mut self, conn: &Connection, before_ms: i64) -> Result<u64> {
        // A dedup row still inside its window keeps its response: the reply goes back into it.
        conn.prepare_cached(
            "UPDATE messages SET response = h.reply, history_id = NULL
             FROM history h
             WHERE h.at_ms < ?1 AND h.message_id IS NOT NULL
               AND messages.id = h.message_id AND messages.history_id = h.id",
        )?
        .execute([before_ms])?;
        conn.prepare_cached(
            "DELETE FROM history_index WHERE (app, conversation, id) IN
                (SELECT app, conversation, id FROM history WHERE at_ms < ?1)",
        )?
        .execute([before_ms])?;
        let removed = conn
            .prepare_cached("DELETE FROM history WHERE at_ms < ?1")?
            .execute([before_ms])?;
        self.reload(conn)?;
        Ok(removed as u64)
    }

    /// How many rows the tail holds.
    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    /// Whether the tail is due to be merged into `history_index`.
    pub(super) fn merge_due(&self) -> bool {
        self.rows >= self.merge_rows
    }

    /// Writes the tail's entries into `history_index` in key order and moves the watermark past
    /// them, in the caller's transaction. The tail is emptied only by
    /// [`HistoryIndex::merged`], once that transaction has committed.
    pub(super) fn merge(&self, conn: &Connection) -> Result<()> {
        let mut insert = conn.prepare_cached(
            "INSERT OR IGNORE INTO history_index (app, conversation, id) VALUES (?1, ?2, ?3)",
        )?;
        let mut through = None;
        for (app, conversations) in &self.tail {
            for (conversation, ids) in conversations {
                for &id in ids {
                    insert.execute(params![app, conversation, id])?;
                    through = through.max(Some(id));
                }
            }
        }
        if let Some(through) = through {
            set_watermark(conn, through)?;
        }
        Ok(())
    }

    /// The merge committed: the tail is in `history_index` now.
    pub(super) fn merged(&mut self) {
        self.tail.clear();
        self.rows = 0;
    }
}
