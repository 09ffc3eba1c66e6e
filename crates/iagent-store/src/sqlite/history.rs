//! Conversation history, kept so that a commit writes only the end of the table.
//!
//! History entries are appended in id order, which costs a commit only the table's last page;
//! they are stored a batch at a time, many to a row (see [`super::chunks`]).
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
//! A period's heads are merged at the end of the next period, and only those that did not
//! move in it: a conversation that goes on has its head written once it stops, not once a
//! period (with the benchmark's 10 000 conversations, each moving three times a period, the
//! merges wrote 10 000 heads a period, and now write a few hundred), and the watermark stays a
//! period behind. A merge is written a slice at a time ([`HISTORY_MERGE_SLICE_ROWS`] heads per
//! transaction, between batches), so that no merge holds up the writer for long: written
//! whole, the heads of 10 000 conversations had paused it for 12 ms. A merged head leaves
//! memory at the merge after its own; until then a conversation that goes on is found in
//! memory, where looking its head up in `history_heads` after every merge had cost 5% of the
//! writer's time.
//!
//! Entries are purged oldest row first, up to the first one inside the retention window, so
//! the entries a conversation keeps are always the newest ones: every chain ends where the
//! purge stopped, and no entry is left unreachable behind a purged one.

use std::ops::ControlFlow;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, ToSql, params};

use super::KeyMap;
use super::bulk;
use super::chunks::{self, Entry, Pending};
use super::dedup::Assumed;
use super::key_filter::KeyFilter;
use super::packed::{self, Pack};
use super::run_order;
use crate::{HistoryEntry, Result};

/// How many rows are appended, by default, before the heads that moved in the period before
/// and not since are written into `history_heads`. A larger tail writes a busy conversation's
/// head once for more entries, and costs memory (a key and 8 bytes per conversation that moved
/// in the last three merge periods), more slices per merge and a longer read of the rows after
/// the watermark at start-up (two periods' and the current one's).
pub const DEFAULT_HISTORY_MERGE_ROWS: usize = 32_768;

/// The most heads one slice of a merge writes. A slice runs between two batches, in a
/// transaction of its own (shared with the dedup keys' slice, if one is due); whole, it took 1
/// to 3 ms at 5 000 messages/s over 10 000 conversations. It is written 128 heads at a time and
/// ends after the step it is in once jobs wait for the writer thread, which then run in its
/// transaction, unless the merge is behind its pace ([`HistoryHeads::merge_behind`]). A slice
/// follows every batch while a merge is under way.
pub const HISTORY_MERGE_SLICE_ROWS: usize = 1024;

/// The `store_meta` key of the last history id whose conversation's head `history_heads` has.
const WATERMARK_KEY: &str = "history_heads_through";

/// Creates the history tables, and brings a table of entries from an earlier layout up to the
/// last layout that kept an entry per row; [`move_rows_into_chunks`] then moves it over.
pub(super) fn migrate(conn: &Connection) -> Result<()> {
    chunks::create(conn)?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS history_heads (
            app TEXT NOT NULL,
            conversation TEXT NOT NULL,
            head INTEGER NOT NULL,
            PRIMARY KEY (app, conversation)
        ) WITHOUT ROWID;",
    )?;
    if !super::has_table(conn, "history")? {
        return Ok(());
    }
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

/// Moves the entries of a table that held one per row (`history`) into chunks, ids and all,
/// and drops the table. Runs once, inside the migration's transaction, after every step that
/// reads or changes that table.
pub(super) fn move_rows_into_chunks(conn: &Connection) -> Result<()> {
    if !super::has_table(conn, "history")? {
        return Ok(());
    }
    let mut pending = Pending::default();
    let mut rows = conn.prepare(
        "SELECT id, prev, at_ms, app, msg_id, conversation, message, reply
         FROM history ORDER BY id",
    )?;
    let mut rows = rows.query([])?;
    while let Some(row) = rows.next()? {
        pending.push(conn, &legacy_entry(row)?)?;
    }
    pending.write(conn)?;
    conn.execute_batch("DROP TABLE history;")?;
    Ok(())
}

/// An entry of the table that held one per row.
fn legacy_entry<'a>(row: &'a rusqlite::Row<'_>) -> rusqlite::Result<Entry<'a>> {
    Ok(Entry {
        id: row.get(0)?,
        prev: row.get(1)?,
        at_ms: row.get(2)?,
        app: row.get_ref(3)?.as_str()?,
        msg_id: row.get_ref(4)?.as_str_or_null()?,
        conversation: row.get_ref(5)?.as_str()?,
        message: packed::stored(row, 6)?.ok_or(rusqlite::Error::InvalidColumnType(
            6,
            "message".into(),
            rusqlite::types::Type::Null,
        ))?,
        reply: packed::stored(row, 7)?,
    })
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

/// What a batch appends entries with: the entries gathered and not written ([`Pending`],
/// the store's, kept across batches while the entry log holds them), the buffers it packs
/// their texts into, and the keys of the records among them, which are assumed not to be in
/// the merged keys and looked up together before the batch commits (see [`Assumed`]), unless
/// the batch runs again after one was there: each key is then looked up as its record is
/// appended. Entries are read through it too ([`Appends::entry`]), so that those gathered are
/// found.
pub(super) struct Appends<'a> {
    conn: &'a Connection,
    pending: &'a mut Pending,
    /// Entries of the log's file that filled, being written into SQLite meanwhile.
    frozen: Option<&'a Pending>,
    assumed: Assumed,
    /// Whether each record's key is looked up as it is appended, instead of assumed.
    look_up_each: bool,
    /// Whether the batch goes to the entry log: no chunk is written, whatever gathers.
    logged: bool,
    /// The stored forms of the entry's message and reply.
    message: String,
    reply: String,
}

impl<'a> Appends<'a> {
    /// Appends on `conn`, gathering into `pending`.
    pub(super) fn new(conn: &'a Connection, pending: &'a mut Pending) -> Self {
        Self {
            conn,
            pending,
            frozen: None,
            assumed: Assumed::default(),
            look_up_each: false,
            logged: false,
            message: String::new(),
            reply: String::new(),
        }
    }

    /// Appends that read the entries of `frozen` too, those of the log's file that filled,
    /// which SQLite may not hold yet.
    pub(super) fn reading(mut self, frozen: Option<&'a Pending>) -> Self {
        self.frozen = frozen;
        self
    }

    /// From now on entries are only gathered, whatever gathers: the batch goes to the entry
    /// log.
    pub(super) fn only_gather(&mut self) {
        self.logged = true;
    }

    /// Writes the entries gathered so far: before the batch commits, and before anything
    /// reads the chunks themselves.
    pub(super) fn write(&mut self) -> Result<()> {
        self.pending.write(self.conn)
    }

    /// Drops the entries gathered so far and the keys assumed, with the statements that were
    /// rolled back.
    pub(super) fn discard(&mut self) {
        self.pending.discard();
        self.assumed.clear();
    }

    /// Whether any of the keys assumed not to be merged is.
    pub(super) fn any_assumed_merged(&self, filter: &KeyFilter) -> Result<bool> {
        self.assumed.any_merged(self.conn, filter)
    }

    /// From now on, each record's key is looked up as it is appended.
    pub(super) fn look_up_each(&mut self) {
        self.look_up_each = true;
    }

    /// Whether a record of the `msg_id` is merged already: looked up among the merged keys, or
    /// assumed not to be.
    fn merged(&mut self, app: &str, msg_id: &str) -> Result<bool> {
        if !self.look_up_each {
            self.assumed.push(app, msg_id);
            return Ok(false);
        }
        Ok(super::dedup::find_merged(self.conn, app, msg_id)?.is_some())
    }

    /// Entry `id`, given to `read`, if it is stored or gathered.
    pub(super) fn entry<T>(
        &mut self,
        id: i64,
        read: impl FnOnce(&Entry<'_>) -> Result<T>,
    ) -> Result<Option<T>> {
        let gathered = match self.pending.entry(id)? {
            Some(entry) => Some(entry),
            None => match self.frozen {
                Some(frozen) => frozen.entry(id)?,
                None => None,
            },
        };
        match gathered {
            Some(entry) => read(&entry).map(Some),
            None => chunks::find(self.conn, id, read),
        }
    }

    /// Adds `entry` as entry `id`, the dedup record of `msg_id` if one is given.
    fn push(
        &mut self,
        id: i64,
        app: &str,
        msg_id: Option<&str>,
        entry: &HistoryEntry,
        prev: Option<i64>,
    ) -> Result<()> {
        let message = Pack {
            text: &entry.message,
            msg_id,
        }
        .stored(&mut self.message);
        let reply =
            (entry.reply.as_ref()).map(|text| Pack { text, msg_id }.stored(&mut self.reply));
        let entry = Entry {
            id,
            prev,
            at_ms: entry.at_ms,
            app,
            msg_id,
            conversation: &entry.conversation,
            message,
            reply,
        };
        if self.logged {
            self.pending.hold(&entry)
        } else {
            self.pending.push(self.conn, &entry)
        }
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
/// The tail holds every head that moved after the watermark (those of the current period and
/// of the period before, and, until their merge is written, those of the period before that
/// which the merge writes) and the heads the last merge wrote, which `history_heads` has too.
/// A conversation not in the tail has its head in `history_heads`, or none.
#[derive(Debug)]
pub(super) struct HistoryHeads {
    tail: Tail,
    /// Heads moved in the current period (counted per row).
    rows: usize,
    /// The number of rows in a period at which its heads are merged.
    merge_rows: usize,
    /// The current merge period: it ends, and a new one begins, when a merge's heads are
    /// taken.
    period: u64,
    /// The last id handed out in the period before the current one: the watermark once the
    /// heads taken at the end of the current period are written.
    before_period: i64,
    /// Counts the reloads of the tail: heads taken before one are out of date (see
    /// [`TakenHeads`]).
    generation: u64,
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
    /// How many of them are in `history_heads`.
    progress: bulk::Progress,
    /// The watermark once every head is written: the last id of the period its heads moved in.
    through: i64,
}

/// The heads of a period taken out of the tail for their merge and not sorted yet: the
/// writer thread sorts them without the database in hand, so that batches commit meanwhile
/// (building and sorting the run of 10 000 conversations held every batch up for 1.5 to 2 ms),
/// then gives them back with [`HistoryHeads::begin_run`].
#[derive(Debug)]
pub(super) struct TakenHeads {
    heads: Vec<(Arc<str>, Arc<str>, i64)>,
    through: i64,
    /// The tail's [`HistoryHeads::generation`] when they were taken: if the tail was read
    /// back since, they may name rows a rollback took, and are dropped (the tail read back
    /// holds every head after the watermark again, and the next merge takes them).
    generation: u64,
}

impl TakenHeads {
    /// The heads sorted into the order they are written in: `history_heads`' own. A function
    /// of its own, never inlined: `bench/instructions` counts it with the merge.
    #[inline(never)]
    pub(super) fn sorted(mut self) -> Self {
        // The apps by name, each once: the heads of one app are next to each other, as the
        // tail holds them, and their name is one shared string.
        let mut apps: Vec<&Arc<str>> = Vec::new();
        for (app, _, _) in &self.heads {
            if !apps.last().is_some_and(|last| Arc::ptr_eq(last, app)) {
                apps.push(app);
            }
        }
        apps.sort_unstable();
        apps.dedup();
        let rank = |app: &Arc<str>| match apps.binary_search(&app) {
            Ok(rank) | Err(rank) => rank as u32,
        };
        let places = run_order::places(
            &self.heads,
            |(app, _, _)| rank(app),
            |(_, conversation, _)| conversation.as_bytes(),
            |a, b| self.heads[a].1.cmp(&self.heads[b].1),
        );
        self.heads = run_order::take_in_order(self.heads, &places);
        self
    }
}

impl HistoryHeads {
    /// Reads the tail back from the rows after the watermark.
    pub(super) fn load(conn: &Connection, merge_rows: usize) -> Result<Self> {
        let mut heads = Self {
            tail: Tail::default(),
            rows: 0,
            merge_rows,
            period: 0,
            before_period: 0,
            generation: 0,
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
        self.generation += 1;
        self.run = None;
        let through = watermark(conn)?.unwrap_or(0);
        chunks::for_each_after(conn, through, |entry| {
            self.moved(entry.app, entry.conversation, entry.id);
            Ok(ControlFlow::Continue(()))
        })?;
        self.next_id = chunks::last_id(conn)?.unwrap_or(0).max(through) + 1;
        // Every head read back is of the current period: the next merge writes none, and
        // moves the watermark nowhere.
        self.before_period = through;
        Ok(())
    }

    /// Records that `id` is the newest entry of the conversation; takes its key (allocates,
    /// for a `&str`) only for a conversation new to the tail. A history entry's key is shared
    /// with its caller already, and the tail shares it too instead of copying it.
    fn moved<K: AsRef<str> + Into<Arc<str>>>(&mut self, app: &str, conversation: K, id: i64) {
        self.rows += 1;
        let head = Head {
            id,
            period: self.period,
        };
        match self.tail.get_mut(app) {
            None => {
                let conversations = Conversations::from_iter([(conversation.into(), head)]);
                self.tail.insert(app.to_owned(), conversations);
            }
            Some(conversations) => match conversations.get_mut(conversation.as_ref()) {
                Some(known) => *known = head,
                None => {
                    conversations.insert(conversation.into(), head);
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
    /// record, unless its key is merged already; returns the entry's id, or `None`
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
        if let Some(msg_id) = msg_id
            && appends.merged(app, msg_id)?
        {
            return Ok(false);
        }
        let id = self.next_id;
        let head = Head {
            id,
            period: self.period,
        };
        // The conversation's head in the tail is looked up once, and moved where it was
        // found: a look-up for the previous head and another to move it had each missed the
        // caches for the bucket and for the conversation's name (2.5% of the CPU at
        // saturation, `perf`).
        let known = self
            .tail
            .get_mut(app)
            .and_then(|conversations| conversations.get_mut(&*entry.conversation));
        match known {
            Some(known) => {
                appends.push(id, app, msg_id, entry, Some(known.id))?;
                *known = head;
                self.rows += 1;
            }
            None => {
                let prev = merged_head(appends.conn, app, &entry.conversation)?;
                appends.push(id, app, msg_id, entry, prev)?;
                self.moved(app, Arc::clone(&entry.conversation), id);
            }
        }
        self.next_id += 1;
        Ok(true)
    }

    /// The last `limit` messages of a conversation, as JSON text, oldest first, read from
    /// its newest entry back. The walk ends at the first entry that is gone (purged: all older
    /// ones are too).
    pub(super) fn read(
        &self,
        appends: &mut Appends<'_>,
        app: &str,
        conversation: &str,
        limit: usize,
    ) -> Result<Vec<String>> {
        let mut newest_first = Vec::with_capacity(limit.min(64));
        let mut next = self.head(appends.conn, app, conversation)?;
        while let Some(id) = next
            && newest_first.len() < limit
        {
            // The entry's own app and conversation are checked too: a `prev` or a head is
            // only ever a pointer, and a pointer must not be able to show one conversation
            // another's messages.
            let found = appends.entry(id, |entry| {
                if entry.app != app || entry.conversation != conversation {
                    return Ok(None);
                }
                Ok(Some((
                    entry.message_text()?,
                    entry.reply_text()?,
                    entry.prev,
                )))
            })?;
            let Some((message, reply, prev)) = found.flatten() else {
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

    /// The first entry a purge of the entries older than `before_ms` keeps, if it looks at
    /// about `limit` of the oldest entries, and whether that leaves none older: they go
    /// oldest entry first, up to the first one from `before_ms` on, found by reading the
    /// chunks before it in id order.
    ///
    /// An entry's age is the gateway's clock when it was stored, so entries are old in the
    /// order they were written, give or take the moments their writes waited; one written
    /// out of that order is purged with its neighbours.
    pub(super) fn purge_from(
        &self,
        conn: &Connection,
        before_ms: i64,
        limit: usize,
    ) -> Result<(i64, bool)> {
        Ok(match chunks::first_from(conn, before_ms, limit)? {
            chunks::Cut::Young(id) => (id, true),
            chunks::Cut::Limit(id) => (id, false),
            chunks::Cut::End => (self.next_id, true),
        })
    }

    /// Removes the entries before `keep_from` (see [`HistoryHeads::purge_from`]); returns how
    /// many. Every statement runs inside SQLite, so a purge of millions of entries (after a
    /// long stop) holds none of them in memory.
    ///
    /// The heads that name the entries removed stay, for [`HistoryHeads::forget_heads`]: a
    /// head names its conversation's newest entry, so a conversation whose head is gone has
    /// no entry left, and reads as empty either way.
    ///
    /// The tail is read back only if the purge reached into it, past the watermark. Below
    /// it, the tail and a merge under way name only entries from `keep_from` on, or heads of
    /// conversations with none left, and stand: a purge is cut into many slices
    /// ([`super::purge`]), and a read-back at each one would start the merge under way over
    /// each time.
    pub(super) fn purge(&mut self, conn: &Connection, keep_from: i64) -> Result<u64> {
        let removed = chunks::delete_before(conn, keep_from)?;
        // No entry is left before `keep_from`, so the watermark may move up to it: the ids of
        // the entries gone are then never handed out again, even to a table the purge
        // emptied, and no key or head that named one comes to name another.
        let through = watermark(conn)?.unwrap_or(0);
        if removed > 0 && keep_from - 1 > through {
            set_watermark(conn, keep_from - 1)?;
            self.reload(conn)?;
        }
        Ok(removed)
    }

    /// Deletes the rows of `history_heads` whose head is below `keep_from` among up to
    /// `limit` rows after the conversation `after` (from the first, if `None`); returns the
    /// last conversation looked at, `None` once all are. The table has a row per conversation
    /// and no index by head, so a purge walks it a slice at a time.
    pub(super) fn forget_heads(
        &self,
        conn: &Connection,
        keep_from: i64,
        after: Option<&(String, String)>,
        limit: usize,
    ) -> Result<Option<(String, String)>> {
        let (app, conversation) = after.map_or(("", ""), |(app, conversation)| {
            (app.as_str(), conversation.as_str())
        });
        let mut looked_at = 0;
        let mut stale = Vec::new();
        let mut last = None;
        {
            let mut heads = conn.prepare_cached(
                "SELECT app, conversation, head FROM history_heads
                 WHERE (app, conversation) > (?1, ?2) ORDER BY app, conversation LIMIT ?3",
            )?;
            let mut rows =
                heads.query(params![app, conversation, super::purge::id_count(limit)])?;
            while let Some(row) = rows.next()? {
                let key: (String, String) = (row.get(0)?, row.get(1)?);
                looked_at += 1;
                if row.get::<_, i64>(2)? < keep_from {
                    stale.push(key.clone());
                }
                last = Some(key);
            }
        }
        // Deleted once the walk is done: rows deleted under a query still stepping through
        // them leave what it reads next undefined.
        let mut delete =
            conn.prepare_cached("DELETE FROM history_heads WHERE app = ?1 AND conversation = ?2")?;
        for (app, conversation) in &stale {
            delete.execute(params![app, conversation])?;
        }
        Ok(last.filter(|_| looked_at == limit))
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

    /// Whether a merge is under way, its heads sorted and ready to be written.
    pub(super) fn run_begun(&self) -> bool {
        self.run.is_some()
    }

    /// Whether the merge under way is behind its pace ([`bulk::Progress::behind`]): its
    /// slices then go on while jobs wait.
    pub(super) fn merge_behind(&self) -> bool {
        self.run.as_ref().is_some_and(|run| {
            run.progress
                .behind(run.heads.len(), self.rows, self.merge_rows)
        })
    }

    /// Ends the current period, if a merge is due and none is under way. The heads of the
    /// period before that did not move in this one are taken for the merge (and stay in
    /// memory until they are written); those that moved again wait for the end of the next
    /// period, and are written then only if they stop. The heads the merge before wrote leave
    /// memory (the table has them).
    pub(super) fn take_run(&mut self) -> Option<TakenHeads> {
        if self.run.is_some() || !self.merge_due() {
            return None;
        }
        let period = self.period;
        let mut heads = Vec::with_capacity(self.rows.min(self.merge_rows));
        for (name, conversations) in &mut self.tail {
            let app: Arc<str> = Arc::from(name.as_str());
            conversations.retain(|conversation, head| {
                if head.period + 1 == period {
                    heads.push((app.clone(), conversation.clone(), head.id));
                }
                head.period + 1 >= period
            });
        }
        self.tail
            .retain(|_, conversations| !conversations.is_empty());
        self.period += 1;
        self.rows = 0;
        let through = std::mem::replace(&mut self.before_period, self.next_id - 1);
        Some(TakenHeads {
            heads,
            through,
            generation: self.generation,
        })
    }

    /// Begins the merge of `taken`, sorted, unless the tail was read back since they were
    /// taken.
    pub(super) fn begin_run(&mut self, taken: TakenHeads) {
        if taken.generation == self.generation && self.run.is_none() {
            self.run = Some(Run {
                heads: taken.heads,
                progress: bulk::Progress::default(),
                through: taken.through,
            });
        }
    }

    /// Writes the next `rows` heads of the merge [`HistoryHeads::begin_run`] began into
    /// `history_heads`, in the caller's transaction, after those written in it before, and
    /// moves the watermark past every row appended before its heads were taken once the last
    /// is written; says whether it was (with no merge under way there is nothing to write).
    /// The merge counts the heads as written only in [`HistoryHeads::merged`], once that
    /// transaction has committed.
    pub(super) fn merge(&mut self, conn: &Connection, rows: usize) -> Result<bool> {
        let Some(run) = &mut self.run else {
            return Ok(true);
        };
        let next = run.progress.next(run.heads.len(), rows);
        let last = next.end == run.heads.len();
        // A head replaces the conversation's row, which holds nothing else.
        bulk::insert_all(
            conn,
            "INSERT OR REPLACE INTO history_heads (app, conversation, head)",
            &run.heads[next],
            |(app, conversation, head)| [app as &dyn ToSql, conversation, head],
        )?;
        if last {
            set_watermark(conn, run.through)?;
        }
        Ok(last)
    }

    /// The heads [`HistoryHeads::merge`] wrote committed; the merge ends with its last.
    pub(super) fn merged(&mut self) {
        if let Some(run) = &mut self.run
            && run.progress.committed(run.heads.len())
        {
            self.run = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database of the store's layout, with an entry in each of `conversations` (`c0`
    /// on), a merge due after as many.
    fn database(conversations: usize) -> (Connection, HistoryHeads) {
        let conn = Connection::open_in_memory().expect("database");
        super::super::migrate(&conn).expect("tables");
        let mut heads = HistoryHeads::load(&conn, conversations).expect("tail");
        append(&conn, &mut heads, "c", 0..conversations);
        (conn, heads)
    }

    /// Appends an entry to each of the conversations `{prefix}{n}`.
    fn append(
        conn: &Connection,
        heads: &mut HistoryHeads,
        prefix: &str,
        conversations: std::ops::Range<usize>,
    ) {
        let mut pending = Pending::default();
        let mut appends = Appends::new(conn, &mut pending);
        // Each message names the id its entry gets.
        let entries: Vec<HistoryEntry> = conversations
            .zip(heads.next_id..)
            .map(|(n, id)| HistoryEntry {
                conversation: format!("{prefix}{n}").into(),
                at_ms: 1,
                message: format!("{prefix}{n} m{id}").into(),
                reply: None,
            })
            .collect();
        heads
            .append(&mut appends, "shop", &entries)
            .expect("appended");
        appends.write().expect("written");
    }

    /// Takes the merge that is due and writes it whole; returns the heads it wrote.
    fn merge_whole(conn: &Connection, heads: &mut HistoryHeads) -> usize {
        let taken = heads.take_run().expect("a merge is due").sorted();
        let count = taken.heads.len();
        heads.begin_run(taken);
        conn.execute_batch("BEGIN").expect("begin");
        while !heads.merge(conn, 7).expect("step") {}
        conn.execute_batch("COMMIT").expect("commit");
        heads.merged();
        count
    }

    /// Ends the period the heads of [`database`] moved in, whose merge writes none of them
    /// (they may move again), then appends an entry to as many other conversations (`d0` on),
    /// so that the next merge, due, writes the first ones.
    fn next_period(conn: &Connection, heads: &mut HistoryHeads, conversations: usize) {
        assert_eq!(merge_whole(conn, heads), 0);
        append(conn, heads, "d", 0..conversations);
    }

    fn head_of(conn: &Connection, conversation: &str) -> Option<i64> {
        merged_head(conn, "shop", conversation).expect("looked up")
    }

    fn merged_heads(conn: &Connection) -> i64 {
        conn.query_row("SELECT COUNT(*) FROM history_heads", [], |row| row.get(0))
            .expect("heads")
    }

    #[test]
    fn entries_gathered_in_a_batch_are_read_back_in_it() {
        let conn = Connection::open_in_memory().expect("database");
        super::super::migrate(&conn).expect("tables");
        let mut heads = HistoryHeads::load(&conn, 100).expect("tail");
        let mut pending = Pending::default();
        let mut appends = Appends::new(&conn, &mut pending);
        let entry = |message: &str| HistoryEntry {
            conversation: "c".into(),
            at_ms: 1,
            message: message.into(),
            reply: None,
        };
        heads
            .append(&mut appends, "shop", &[entry("first"), entry("second")])
            .expect("appended");
        // Nothing is written yet: reading writes what the batch gathered, then finds it.
        assert_eq!(chunks::last_id(&conn).expect("last"), None);
        assert_eq!(
            heads.read(&mut appends, "shop", "c", 10).expect("read"),
            ["first", "second"]
        );
        heads
            .append(&mut appends, "shop", &[entry("third")])
            .expect("appended");
        let third = appends
            .entry(3, |entry| entry.message_text())
            .expect("read");
        assert_eq!(third.as_deref(), Some("third"));
    }

    /// Takes the heads of a merge that is due, sorts them and begins it, as the writer does.
    fn begin_run(heads: &mut HistoryHeads) {
        let taken = heads.take_run().expect("a merge is due");
        heads.begin_run(taken.sorted());
        assert!(heads.run_begun());
    }

    /// Heads are taken out of the tail to be sorted while batches go on (`TakenHeads`): heads
    /// taken before the tail was read back are dropped, and a merge after a period takes
    /// them all again, in `history_heads`' order.
    #[test]
    fn heads_taken_before_the_tail_is_read_back_are_dropped() {
        let (conn, mut heads) = database(30);
        next_period(&conn, &mut heads, 30);
        let stale = heads.take_run().expect("a merge is due");
        assert_eq!(stale.heads.len(), 30);
        assert!(!heads.merge_due(), "the period's heads are taken");
        heads.reload(&conn).expect("reloaded");
        heads.begin_run(stale.sorted());
        assert!(!heads.run_begun());
        // Read back, every head is of the current period: its merge writes none.
        assert_eq!(merge_whole(&conn, &mut heads), 0);
        append(&conn, &mut heads, "e", 0..60);
        let taken = heads.take_run().expect("a merge is due again").sorted();
        let order: Vec<(&str, &str)> = taken
            .heads
            .iter()
            .map(|(app, conversation, _)| (&**app, &**conversation))
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order.len(), 60);
        assert_eq!(order, sorted);
        heads.begin_run(taken);
        conn.execute_batch("BEGIN").expect("begin");
        assert!(heads.merge(&conn, 60).expect("step"));
        conn.execute_batch("COMMIT").expect("commit");
        heads.merged();
        assert_eq!(merged_heads(&conn), 60);
    }

    /// A run of several apps' heads is in `history_heads`' order, by app, then by
    /// conversation, however the tail held them: the apps' heads apart or mixed, and
    /// conversations alike in their first 8 bytes.
    #[test]
    fn heads_of_several_apps_sort_by_app_then_conversation() {
        let names = ["shop", "blog", "app"].map(Arc::<str>::from);
        let conversation = |n: usize| format!("{}-0123456789abcdef-{n}", n % 2);
        let mut heads = Vec::new();
        for n in 0..40 {
            // One app's heads together, as the tail gives them; the others mixed.
            heads.push((names[0].clone(), Arc::from(conversation(n)), n as i64));
        }
        for n in 0..40 {
            let app = &names[1 + n % 2];
            // Another string of the same name: apps are told apart by their bytes.
            let app = if n % 3 == 0 {
                Arc::from(&**app)
            } else {
                app.clone()
            };
            heads.push((app, Arc::from(conversation(40 - n)), n as i64));
        }
        let taken = TakenHeads {
            heads,
            through: 0,
            generation: 0,
        }
        .sorted();
        let order: Vec<(String, String)> = taken
            .heads
            .iter()
            .map(|(app, conversation, _)| (app.to_string(), conversation.to_string()))
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order.len(), 80);
        assert_eq!(order, sorted);
    }

    #[test]
    fn a_merge_written_in_steps_counts_them_once_committed() {
        let (conn, mut heads) = database(300);
        next_period(&conn, &mut heads, 300);
        assert!(heads.merge_due());
        begin_run(&mut heads);
        // Two steps in one transaction, committed: 200 heads written, the merge goes on.
        conn.execute_batch("BEGIN").expect("begin");
        assert!(!heads.merge(&conn, 100).expect("step"));
        assert!(!heads.merge(&conn, 100).expect("step"));
        conn.execute_batch("COMMIT").expect("commit");
        heads.merged();
        assert_eq!(merged_heads(&conn), 200);
        assert_eq!(watermark(&conn).expect("watermark"), Some(0));
        // A step rolled back leaves the count where it was; the tail is read back, and a
        // merge a period later writes every head again from the first.
        conn.execute_batch("BEGIN").expect("begin");
        assert!(heads.merge(&conn, 100).expect("step"));
        conn.execute_batch("ROLLBACK").expect("rollback");
        heads.reload(&conn).expect("reloaded");
        assert_eq!(merged_heads(&conn), 200);
        assert!(!heads.run_begun());
        assert_eq!(merge_whole(&conn, &mut heads), 0);
        append(&conn, &mut heads, "e", 0..600);
        begin_run(&mut heads);
        // Written to the end: the watermark moves past every entry of the period the heads
        // were read back in, and the merge is over.
        conn.execute_batch("BEGIN").expect("begin");
        assert!(!heads.merge(&conn, 250).expect("step"));
        assert!(!heads.merge(&conn, 250).expect("step"));
        assert!(heads.merge(&conn, 250).expect("step"));
        conn.execute_batch("COMMIT").expect("commit");
        heads.merged();
        assert_eq!(merged_heads(&conn), 600);
        assert_eq!(watermark(&conn).expect("watermark"), Some(600));
        assert!(!heads.merge_due());
    }

    /// A period's heads are written at the end of the next period, and only those that did
    /// not move in it: a conversation that goes on is written once it stops. Meanwhile its
    /// newest entry is in memory, and after the watermark, so that a restart reads it back.
    #[test]
    fn a_head_that_moves_again_is_written_once_it_stops() {
        let (conn, mut heads) = database(10);
        // The period after: half of the conversations go on, as many new ones begin.
        assert_eq!(merge_whole(&conn, &mut heads), 0);
        append(&conn, &mut heads, "c", 0..5);
        append(&conn, &mut heads, "d", 0..5);
        let read = |heads: &HistoryHeads, conversation: &str| {
            let mut pending = Pending::default();
            let mut appends = Appends::new(&conn, &mut pending);
            heads
                .read(&mut appends, "shop", conversation, 10)
                .expect("read")
        };
        // The heads that stopped are taken; until they are written, memory has them.
        begin_run(&mut heads);
        assert_eq!(read(&heads, "c5"), ["c5 m6"]);
        conn.execute_batch("BEGIN").expect("begin");
        assert!(heads.merge(&conn, 10).expect("step"));
        conn.execute_batch("COMMIT").expect("commit");
        heads.merged();
        assert_eq!(merged_heads(&conn), 5);
        assert_eq!(head_of(&conn, "c0"), None);
        assert_eq!(head_of(&conn, "c5"), Some(6));
        assert_eq!(watermark(&conn).expect("watermark"), Some(10));
        assert_eq!(read(&heads, "c0"), ["c0 m1", "c0 m11"]);
        assert_eq!(read(&heads, "c5"), ["c5 m6"]);
        // Read back from the database, as after a restart: the same.
        let restarted = HistoryHeads::load(&conn, 10).expect("tail");
        assert_eq!(read(&restarted, "c0"), ["c0 m1", "c0 m11"]);
        assert_eq!(read(&restarted, "c5"), ["c5 m6"]);
        // A period more, in other conversations: the heads that went on have stopped.
        append(&conn, &mut heads, "e", 0..10);
        assert_eq!(merge_whole(&conn, &mut heads), 10);
        assert_eq!(head_of(&conn, "c0"), Some(11));
        assert_eq!(head_of(&conn, "d4"), Some(20));
        assert_eq!(merged_heads(&conn), 15);
        assert_eq!(watermark(&conn).expect("watermark"), Some(20));
        assert_eq!(read(&heads, "c0"), ["c0 m1", "c0 m11"]);
    }
}
