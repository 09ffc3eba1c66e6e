//! The dedup record's keys, kept so that a commit writes only the end of the `messages` table.
//!
//! A dedup row is found by its `(app, msg_id)`. An index on those, kept by SQLite, takes each
//! new `msg_id` at its place in the key order: with `msg_id`s from hundreds of senders, each
//! counting up in a range of its own, every commit wrote a page at each of hundreds of places,
//! and through iagent-client's 512 senders that cost more than half the gateway's throughput.
//!
//! So `messages` has no such index. Its rows are appended in id order, and their keys are
//! merged into `message_key_blocks`, sorted blocks of keys ([`super::key_blocks`]), complete
//! up to a watermark (`message_keys_through` in `store_meta`). The keys of the rows after it
//! are kept in memory, the tail. Once [`DEFAULT_DEDUP_MERGE_ROWS`] rows have been appended,
//! the tail is taken as a run, sorted by key (by the writer thread without the database in
//! hand: [`TakenRun`]), and merged a slice at a time ([`DEDUP_MERGE_SLICE_ROWS`]), in key
//! order, so that the keys of one sender land together: each block is written once for many
//! keys, and no slice holds up the writer for long. A `msg_id` is looked up in the tail, which
//! keeps a run's keys until the whole run is written, then in the blocks, unless the filter
//! of the merged keys rules it out ([`super::key_filter`]).
//!
//! Tail and run are derived state: whenever their agreement with the database is in doubt (a
//! rollback, a purge reaching past the watermark) they are read back from the rows after the
//! watermark, which is also how a restart, after `kill -9` or not, finds them; a key written
//! by a slice before that is found in both places, harmlessly. Ids are handed out here, never
//! by SQLite, so that a row's id is never below the watermark: a purge that emptied the table
//! must not let SQLite count from 1 again.
//!
//! A message answered by a repeatable agent has no dedup row: its history entry carries its
//! `msg_id` and its reply is the response ([`Record::Entry`]), so that an echo costs one row,
//! not two. Such a key is in the tail while the entry is after a watermark of its own
//! (`message_keys_entries_through`), and in the blocks once merged. A dedup purge drops
//! the keys of entries past the window and keeps the entries, whose history may be kept
//! longer; the entries are expired up to `message_keys_entries_expired`. A history purge that
//! takes an entry whose key is still live first copies its record into a dedup row
//! ([`DedupKeys::keep_records_before`]).

use std::ops::ControlFlow;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};

use super::KeyMap;
use super::bulk;
use super::chunks;
use super::key_blocks::{self, Key};
use super::key_filter::KeyFilter;
use super::run_order;
use crate::Result;

/// How many dedup rows are appended, by default, before their keys are merged. A larger tail
/// writes a block of keys once for more messages, and costs memory (a `msg_id` and 8 bytes
/// per message) and a longer read of the rows after the watermark at start-up.
pub const DEFAULT_DEDUP_MERGE_ROWS: usize = 32_768;

/// The most keys one slice of a merge writes. A slice runs between two batches, in a
/// transaction of its own (shared with the heads' slice, if one is due); whole, it took 0.5 to
/// 1 ms at 5 000 messages/s. It is written 128 keys at a time and ends after the step it is in
/// once jobs wait for the writer thread, which then run in its transaction, unless the run is
/// behind its pace ([`DedupKeys::merge_behind`]): ending at the first step, slices had written
/// fewer keys than came in at saturation, and each run was longer than the one before.
pub const DEDUP_MERGE_SLICE_ROWS: usize = 1024;

/// The keys of the records a batch appended as history entries assuming that they were not
/// merged, looked up together before the batch commits, those the key filter does not rule
/// out (nearly always none): sorted, so that keys in one block are looked for in one read of
/// it. A look-up of each as it was appended cost 3 400 instructions per message
/// (`bench/instructions`), before the filter. A key that is merged means a message whose
/// record was merged is recorded again: the batch is then
/// rolled back and run again with each key looked up as its record is appended (see
/// [`super::writer`]), which costs that batch a savepoint per job.
#[derive(Debug, Default)]
pub(super) struct Assumed {
    /// The keys' apps and `msg_id`s, one after the other.
    text: String,
    /// Each key's app and `msg_id` in `text`: where the app ends and where the `msg_id` does.
    keys: Vec<(usize, usize)>,
}

impl Assumed {
    /// Adds the key of a record appended assuming it is not merged.
    pub(super) fn push(&mut self, app: &str, msg_id: &str) {
        self.text.push_str(app);
        let app_end = self.text.len();
        self.text.push_str(msg_id);
        self.keys.push((app_end, self.text.len()));
    }

    /// Forgets the keys: the records were rolled back.
    pub(super) fn clear(&mut self) {
        self.text.clear();
        self.keys.clear();
    }

    /// The keys as `(app, msg_id)`.
    fn keys(&self) -> impl Iterator<Item = (&str, &str)> {
        let starts = std::iter::once(0).chain(self.keys.iter().map(|&(_, end)| end));
        starts
            .zip(&self.keys)
            .map(|(start, &(app_end, end))| (&self.text[start..app_end], &self.text[app_end..end]))
    }

    /// Whether the merged keys hold any of the keys. Only the keys `filter` does not rule out
    /// are looked up: nearly always none.
    pub(super) fn any_merged(&self, conn: &Connection, filter: &KeyFilter) -> Result<bool> {
        let mut maybe: Vec<(&str, &str)> = self
            .keys()
            .filter(|&(app, msg_id)| filter.may_have(app, msg_id))
            .collect();
        key_blocks::any(conn, &mut maybe)
    }
}

/// Where the record of a `msg_id` is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Record {
    /// The dedup row (`messages.id`) that holds it.
    Row(i64),
    /// The history entry (`history.id`) that carries the `msg_id`, whose reply is the response.
    Entry(i64),
}

impl Record {
    /// As a merged key's id holds it: a row's id, or an entry's id negated. Ids are positive,
    /// so the sign tells the two apart in the key's own 8 bytes.
    fn key_id(self) -> i64 {
        match self {
            Self::Row(id) => id,
            Self::Entry(id) => -id,
        }
    }

    fn from_key_id(id: i64) -> Self {
        if id < 0 {
            Self::Entry(-id)
        } else {
            Self::Row(id)
        }
    }
}

/// The record of `msg_id` whose key is merged.
pub(super) fn find_merged(conn: &Connection, app: &str, msg_id: &str) -> Result<Option<Record>> {
    Ok(key_blocks::find(conn, app, msg_id)?.map(Record::from_key_id))
}

/// The `store_meta` key of the last dedup row id whose key is merged.
const WATERMARK_KEY: &str = "message_keys_through";

/// The `store_meta` key of the last history id whose entry's key, if it has one, is merged
/// (unless the dedup window has passed it).
const ENTRIES_WATERMARK_KEY: &str = "message_keys_entries_through";

/// The `store_meta` key of the last dedup row id handed out before a purge removed rows: with
/// the rows gone and their keys still in the tail, neither the table nor the watermark would
/// tell where ids go on from after a restart.
const PURGED_THROUGH_KEY: &str = "messages_purged_through";

/// The `store_meta` key of the last history id whose entry's key the dedup window has passed:
/// such keys are out of the merged keys and the tail.
const ENTRIES_EXPIRED_KEY: &str = "message_keys_entries_expired";

/// Creates the merged keys' table ([`key_blocks`]), and moves the keys of a database from
/// before it, a row each in `message_keys` (keyed by app or by `msg_id` first), into blocks
/// (once, at the first start after an upgrade).
pub(super) fn create(conn: &Connection) -> Result<()> {
    key_blocks::create(conn)?;
    if super::has_table(conn, "message_keys")? {
        key_blocks::insert_selected(
            conn,
            "SELECT msg_id, app, id FROM message_keys ORDER BY msg_id, app",
            [],
        )?;
        conn.execute_batch("DROP TABLE message_keys;")?;
    }
    Ok(())
}

/// Merges the keys of the dedup rows of a database that had none (its keys were in an index
/// of `messages`), so that a large record never becomes a large tail.
pub(super) fn migrate(conn: &Connection) -> Result<()> {
    if watermark(conn)?.is_none() {
        key_blocks::insert_selected(
            conn,
            "SELECT msg_id, app, id FROM messages ORDER BY msg_id, app",
            [],
        )?;
        let through: i64 =
            conn.query_row("SELECT COALESCE(MAX(id), 0) FROM messages", [], |row| {
                row.get(0)
            })?;
        set_watermark(conn, through)?;
    }
    Ok(())
}

/// Moves the records of an earlier layout, in which an echo's dedup row in `table` named its
/// history entry (`history_id`), into the entries: the entry takes the `msg_id` and the key
/// names it, merged at once; the rows go. Entries carried no `msg_id` before, so every key
/// of one is merged by then, which is where the entries' watermark starts.
pub(super) fn fold_rows_into_entries(conn: &Connection, table: &str) -> Result<()> {
    conn.execute_batch(&format!(
        "UPDATE history SET msg_id = m.msg_id FROM {table} m
             WHERE m.history_id = history.id AND m.app = history.app;"
    ))?;
    key_blocks::insert_selected(
        conn,
        &format!(
            "SELECT m.msg_id, m.app, -m.history_id FROM {table} m
                 WHERE m.history_id IS NOT NULL
                   AND EXISTS (SELECT 1 FROM history h WHERE h.id = m.history_id)
                 ORDER BY m.msg_id, m.app"
        ),
        [],
    )?;
    conn.execute_batch(&format!(
        "DELETE FROM {table} WHERE history_id IS NOT NULL
             AND EXISTS (SELECT 1 FROM history h WHERE h.id = history_id);"
    ))?;
    Ok(())
}

/// Sets where the entries' keys start, for a database from before entries carried them.
pub(super) fn start_entries(conn: &Connection) -> Result<()> {
    if super::meta(conn, ENTRIES_WATERMARK_KEY)?.is_none() {
        let through = chunks::last_id(conn)?.unwrap_or(0);
        super::set_meta(conn, ENTRIES_WATERMARK_KEY, through)?;
    }
    Ok(())
}

fn watermark(conn: &Connection) -> Result<Option<i64>> {
    super::meta(conn, WATERMARK_KEY)
}

fn set_watermark(conn: &Connection, through: i64) -> Result<()> {
    super::set_meta(conn, WATERMARK_KEY, through)
}

/// The in-memory part of the dedup keys: the tail, and the run being merged out of it.
///
/// Statements rolled back take their rows with them, so the writer then reads the tail back
/// ([`DedupKeys::reload`]): a key whose row is gone must not say its `msg_id` was seen.
#[derive(Debug)]
pub(super) struct DedupKeys {
    /// The keys of the rows and entries after their watermarks, by app, then by `msg_id`;
    /// those of the run too, until it is written.
    tail: KeyMap<AppKeys>,
    /// The keys in the tail that are not in a run, in the order they were appended: the next
    /// run is taken from here as it is. Built from the tail when a merge began, the run cost a
    /// pass over every key's shared strings, each touched once more at a place of its own in
    /// memory: 3 to 7 ms for 32 768 keys, with the database in hand.
    pending: Vec<RunKey>,
    /// Counts the reloads of the tail: a run taken before one is out of date (see
    /// [`TakenRun`]).
    generation: u64,
    /// The number of keys in the tail at which it becomes the run.
    merge_rows: usize,
    /// The last row id whose key is merged.
    through: i64,
    /// The last entry id whose key, if live, is merged.
    entries_through: i64,
    /// The last entry id whose key the dedup window has passed.
    entries_expired: i64,
    /// The newest entry with a key in the tail.
    last_entry: i64,
    /// The id of the next row: above every row's and the watermark.
    next_id: i64,
    /// The keys being merged.
    run: Option<Run>,
    /// What the merged keys cannot have, so that a new key is not looked up there.
    filter: KeyFilter,
}

/// What a slice of a purge did to the dedup records ([`DedupKeys::purge`]).
#[derive(Debug)]
pub(super) struct PurgeSlice {
    /// Rows and keys of entries removed.
    pub(super) removed: u64,
    /// Where the next slice starts among the rows.
    pub(super) rows_from: i64,
    /// Whether nothing older is left: no row but unanswered ones, no entry with a key.
    pub(super) done: bool,
}

/// One app's keys in the tail, by `msg_id`. Shared strings, so that a run takes the keys
/// without copying them: copying 32 768 of them paused the writer for 5 to 15 ms.
type MsgIds = std::collections::HashMap<Arc<str>, Record, foldhash::fast::RandomState>;

/// One app's part of the tail, with the app's name shared by its keys in runs.
#[derive(Debug)]
struct AppKeys {
    app: Arc<str>,
    msg_ids: MsgIds,
}

/// The keys of the next run, taken out of the tail and not sorted yet: the writer thread
/// sorts them without the database in hand, so that batches commit meanwhile (sorting 32 768
/// keys took 2 to 3 ms), then gives them back with [`DedupKeys::begin_run`]. The keys stay in
/// the tail, where `msg_id`s are looked up, throughout.
#[derive(Debug)]
pub(super) struct TakenRun {
    keys: Vec<RunKey>,
    through: i64,
    entries_through: i64,
    /// The tail's [`DedupKeys::generation`] when it was taken: if the tail was read back
    /// since, the keys may name rows a rollback or a purge took, and the run is dropped (the
    /// tail read back holds every key after the watermark again, the next run takes them).
    generation: u64,
}

impl TakenRun {
    /// The keys sorted into the order they are written in. A function of its own, never
    /// inlined: `bench/instructions` counts it with the merge.
    #[inline(never)]
    pub(super) fn sorted(mut self) -> Self {
        self.keys = into_run(self.keys);
        self
    }
}

/// The tail as it was when a merge began, sorted by key: the order it is written in.
#[derive(Debug)]
struct Run {
    keys: Vec<RunKey>,
    /// How many of them are merged.
    progress: bulk::Progress,
    /// The rows' watermark once every key is written: the last id handed out when the run
    /// was taken.
    through: i64,
    /// The entries' watermark once every key is written.
    entries_through: i64,
}

impl Run {
    /// The merge of `taken`, whose keys are sorted, with none of them written.
    fn begun(taken: TakenRun) -> Self {
        Self {
            keys: taken.keys,
            progress: bulk::Progress::default(),
            through: taken.through,
            entries_through: taken.entries_through,
        }
    }
}

/// A key of a run.
#[derive(Debug)]
struct RunKey {
    app: Arc<str>,
    msg_id: Arc<str>,
    /// See [`Record::key_id`].
    id: i64,
}

impl RunKey {
    fn new(app: &Arc<str>, msg_id: &Arc<str>, id: i64) -> Self {
        Self {
            app: app.clone(),
            msg_id: msg_id.clone(),
            id,
        }
    }
}

/// `keys`, in the order they were appended, sorted into a run in the merged keys' order (by
/// `msg_id`'s bytes, then by app): each key once, with its latest record, as the tail has it.
/// (A key is appended once while it is in the tail, since every record is looked for there
/// first; the run does not rely on it.)
fn into_run(keys: Vec<RunKey>) -> Vec<RunKey> {
    let mut places = run_order::places(
        &keys,
        |_| 0,
        |key| key.msg_id.as_bytes(),
        // The same key's records latest first, so that the one kept is the latest.
        |a, b| {
            let (key_a, key_b) = (&keys[a], &keys[b]);
            key_a
                .msg_id
                .cmp(&key_b.msg_id)
                .then_with(|| key_a.app.cmp(&key_b.app))
                .then_with(|| b.cmp(&a))
        },
    );
    places.dedup_by(|later, kept| {
        let (later_key, kept_key) = (&keys[later.index as usize], &keys[kept.index as usize]);
        later.order == kept.order
            && later_key.msg_id == kept_key.msg_id
            && later_key.app == kept_key.app
    });
    run_order::take_in_order(keys, &places)
}

impl DedupKeys {
    /// Reads the tail back from the rows and entries after the watermarks.
    /// `filter` is built from the table from now on.
    pub(super) fn load(conn: &Connection, merge_rows: usize, filter: KeyFilter) -> Result<Self> {
        let mut keys = Self {
            tail: KeyMap::default(),
            pending: Vec::new(),
            generation: 0,
            merge_rows,
            through: 0,
            entries_through: 0,
            entries_expired: 0,
            last_entry: 0,
            next_id: 1,
            run: None,
            filter,
        };
        keys.reload(conn)?;
        keys.filter.begin_build(std::iter::empty());
        Ok(keys)
    }

    /// Waits until the filter's build under way is done and taken in.
    #[cfg(test)]
    pub(super) fn wait_for_filter(&mut self) {
        self.filter.wait_built();
    }

    /// Adds a key to the filter, as a merge does for each key it writes.
    #[cfg(test)]
    pub(super) fn tell_filter(&mut self, app: &str, msg_id: &str) {
        self.filter.add(app, msg_id);
    }

    /// What the merged keys cannot have, with the build that was under way taken in if it is
    /// done.
    pub(super) fn filter(&mut self) -> &KeyFilter {
        self.filter.poll();
        &self.filter
    }

    /// Replaces the tail with what the database holds after the watermarks; a merge under way
    /// starts over.
    pub(super) fn reload(&mut self, conn: &Connection) -> Result<()> {
        self.tail.clear();
        self.pending.clear();
        self.generation += 1;
        self.run = None;
        self.through = watermark(conn)?.unwrap_or(0);
        self.entries_through = super::meta(conn, ENTRIES_WATERMARK_KEY)?.unwrap_or(0);
        self.entries_expired = super::meta(conn, ENTRIES_EXPIRED_KEY)?.unwrap_or(0);
        self.last_entry = self.entries_through;
        let mut rows = conn.prepare_cached("SELECT app, msg_id, id FROM messages WHERE id > ?1")?;
        let mut rows = rows.query([self.through])?;
        while let Some(row) = rows.next()? {
            let (app, msg_id): (String, String) = (row.get(0)?, row.get(1)?);
            self.appended(&app, Arc::from(msg_id), Record::Row(row.get(2)?));
        }
        let after = self.entries_through.max(self.entries_expired);
        chunks::for_each_after(conn, after, |entry| {
            if let Some(msg_id) = entry.msg_id {
                self.appended(entry.app, Arc::from(msg_id), Record::Entry(entry.id));
            }
            Ok(ControlFlow::Continue(()))
        })?;
        let last: Option<i64> = conn
            .prepare_cached("SELECT MAX(id) FROM messages")?
            .query_row([], |row| row.get(0))?;
        let purged_through = super::meta(conn, PURGED_THROUGH_KEY)?.unwrap_or(0);
        let handed_out = last.unwrap_or(0).max(self.through).max(purged_through);
        // Never back: an id handed out once is not handed out again while the process runs.
        self.next_id = self.next_id.max(handed_out + 1);
        Ok(())
    }

    /// The id the next appended row must take.
    pub(super) fn next_id(&self) -> i64 {
        self.next_id
    }

    /// The record of `msg_id`, if there is one.
    pub(super) fn find(
        &self,
        conn: &Connection,
        app: &str,
        msg_id: &str,
    ) -> Result<Option<Record>> {
        match self.find_recent(app, msg_id) {
            Some(record) => Ok(Some(record)),
            None => find_merged(conn, app, msg_id),
        }
    }

    /// The record of `msg_id` if it is one of those after the watermarks. A new record is
    /// then looked for among the merged keys unless the filter rules its key out.
    pub(super) fn find_recent(&self, app: &str, msg_id: &str) -> Option<Record> {
        self.tail.get(app)?.msg_ids.get(msg_id).copied()
    }

    /// Records that the row [`DedupKeys::next_id`] was inserted with this key.
    pub(super) fn inserted(&mut self, app: &str, msg_id: &str) {
        self.appended(app, Arc::from(msg_id), Record::Row(self.next_id));
        self.next_id += 1;
    }

    /// Records that the history entry `id` was inserted with this key: shared with the
    /// completion that carried it, not copied.
    pub(super) fn inserted_entry(&mut self, app: &str, msg_id: Arc<str>, id: i64) {
        self.appended(app, msg_id, Record::Entry(id));
    }

    fn appended(&mut self, app: &str, msg_id: Arc<str>, record: Record) {
        if let Record::Entry(id) = record {
            self.last_entry = self.last_entry.max(id);
        }
        let keys = match self.tail.get_mut(app) {
            Some(keys) => keys,
            None => self.tail.entry(app.to_owned()).or_insert_with(|| AppKeys {
                app: Arc::from(app),
                msg_ids: MsgIds::default(),
            }),
        };
        self.pending
            .push(RunKey::new(&keys.app, &msg_id, record.key_id()));
        keys.msg_ids.insert(msg_id, record);
    }

    /// How many keys are in the tail and not in a run.
    pub(super) fn rows(&self) -> usize {
        self.pending.len()
    }

    /// Whether a slice of a merge is due: one is under way, or the tail is big enough to be
    /// the next run.
    pub(super) fn merge_due(&self) -> bool {
        self.run.is_some() || self.pending.len() >= self.merge_rows.max(1)
    }

    /// Whether a run is under way, its keys sorted and ready to be written.
    pub(super) fn run_begun(&self) -> bool {
        self.run.is_some()
    }

    /// Whether the run under way is behind its pace ([`bulk::Progress::behind`]): its slices
    /// then go on while jobs wait.
    pub(super) fn merge_behind(&self) -> bool {
        self.run.as_ref().is_some_and(|run| {
            run.progress
                .behind(run.keys.len(), self.pending.len(), self.merge_rows)
        })
    }

    /// Takes the keys of the next run, every key not in one, if a run is due and none is
    /// under way.
    pub(super) fn take_run(&mut self) -> Option<TakenRun> {
        if self.run.is_some() || !self.merge_due() {
            return None;
        }
        // Room for a run as long as this one and a quarter: grown a key at a time, the list
        // was copied whole at every doubling (0.65% of the CPU at saturation, `perf`), and a
        // run a batch longer than the one before doubled it once.
        let next = Vec::with_capacity(self.pending.len() + self.pending.len() / 4);
        Some(TakenRun {
            keys: std::mem::replace(&mut self.pending, next),
            through: self.next_id - 1,
            entries_through: self.last_entry,
            generation: self.generation,
        })
    }

    /// Begins the merge of `taken`, sorted, unless the tail was read back since it was taken.
    pub(super) fn begin_run(&mut self, taken: TakenRun) {
        if taken.generation == self.generation && self.run.is_none() {
            self.run = Some(Run::begun(taken));
        }
    }

    /// Writes the next `rows` keys of the run [`DedupKeys::begin_run`] began into
    /// `message_key_blocks`, in the caller's transaction, after those written in it before, and
    /// moves the watermarks once the last is written; says whether it was (with no run under
    /// way there is nothing to write). The run counts the keys as written only in
    /// [`DedupKeys::merged`], once that transaction has committed.
    pub(super) fn merge(&mut self, conn: &Connection, rows: usize) -> Result<bool> {
        let Some(run) = &mut self.run else {
            return Ok(true);
        };
        let next = run.progress.next(run.keys.len(), rows);
        let last = next.end == run.keys.len();
        let written = &run.keys[next];
        let keys: Vec<Key<'_>> = written
            .iter()
            .map(|key| Key {
                msg_id: &key.msg_id,
                app: &key.app,
                id: key.id,
            })
            .collect();
        key_blocks::insert(conn, &keys)?;
        for key in written {
            self.filter.add(&key.app, &key.msg_id);
        }
        if self.filter.build_due() {
            // The run's keys written in this transaction are not committed yet.
            self.filter
                .begin_build(run.keys.iter().map(|key| (&*key.app, &*key.msg_id)));
        }
        if last {
            set_watermark(conn, run.through)?;
            super::set_meta(conn, ENTRIES_WATERMARK_KEY, run.entries_through)?;
        }
        Ok(last)
    }

    /// The keys [`DedupKeys::merge`] wrote committed; the run ends with its last.
    pub(super) fn merged(&mut self) {
        if let Some(run) = &mut self.run
            && run.progress.committed(run.keys.len())
        {
            let (through, entries_through) = (run.through, run.entries_through);
            // The tail keeps the keys appended since the run was taken, which are the pending
            // ones: cleared and filled again from them rather than rid of the run's keys one
            // by one, which leaves tombstones, and a table that fills with them is rehashed
            // whole, every key's string read again (1% of the CPU at saturation, `perf`).
            for keys in self.tail.values_mut() {
                keys.msg_ids.clear();
            }
            for key in &self.pending {
                if let Some(keys) = self.tail.get_mut(&*key.app) {
                    keys.msg_ids
                        .insert(Arc::clone(&key.msg_id), Record::from_key_id(key.id));
                }
            }
            self.tail.retain(|_, keys| !keys.msg_ids.is_empty());
            debug_assert!(
                self.tail
                    .values()
                    .all(|keys| keys.msg_ids.values().all(|record| match *record {
                        Record::Row(id) => id > through,
                        Record::Entry(id) => id > entries_through,
                    }))
            );
            self.through = through;
            self.entries_through = entries_through;
            self.run = None;
        }
    }

    /// Forgets up to `limit` dedup rows older than `before_ms` from the row `rows_from` on,
    /// and the keys of up to `limit` entries older than it: a slice of a purge
    /// ([`super::purge`]).
    ///
    /// Answered dedup rows go with their keys, oldest row first, up to the first one from
    /// `before_ms` on (which only the rows before it are read to find). A row's age is the
    /// gateway's clock when it was stored, so rows are old in the order they were written,
    /// give or take the moments their writes waited. A message not yet answered keeps its
    /// row whatever its age. Entries that carry a record lose only the key, the same way by
    /// their own time: the history keeps them for its own retention.
    pub(super) fn purge(
        &mut self,
        conn: &Connection,
        before_ms: i64,
        rows_from: i64,
        limit: usize,
    ) -> Result<PurgeSlice> {
        let (removed, rows_from, rows_done) = self.purge_rows(conn, before_ms, rows_from, limit)?;
        let (expired, entries_done) = self.expire_entries(conn, before_ms, limit)?;
        // Keys of the tail went too.
        let rows_in_tail = removed > 0 && rows_from > self.through + 1;
        let entries_in_tail = expired > 0 && self.entries_expired > self.entries_through;
        if rows_in_tail || entries_in_tail {
            self.reload(conn)?;
        }
        Ok(PurgeSlice {
            removed: removed + expired,
            rows_from,
            done: rows_done && entries_done,
        })
    }

    /// Removes the answered rows older than `before_ms` among `limit` ids from the oldest row
    /// at or after `rows_from`, with their keys; returns how many, where the next slice
    /// starts, and whether none older is left.
    fn purge_rows(
        &mut self,
        conn: &Connection,
        before_ms: i64,
        rows_from: i64,
        limit: usize,
    ) -> Result<(u64, i64, bool)> {
        let first: Option<i64> = conn
            .prepare_cached("SELECT id FROM messages WHERE id >= ?1 ORDER BY id LIMIT 1")?
            .query_row([rows_from], |row| row.get(0))
            .optional()?;
        let Some(first) = first else {
            return Ok((0, rows_from, true));
        };
        // Ids are handed out one after the other, so gaps only make it fewer rows.
        let end = first.saturating_add(super::purge::id_count(limit));
        let young: Option<i64> = conn
            .prepare_cached(
                "SELECT id FROM messages WHERE id >= ?1 AND id < ?2 AND received_ms >= ?3
                 ORDER BY id LIMIT 1",
            )?
            .query_row([first, end, before_ms], |row| row.get(0))
            .optional()?;
        let keep_from = young.unwrap_or(end);
        key_blocks::remove_selected(
            conn,
            "SELECT msg_id, app, id FROM messages
             WHERE id >= ?1 AND id < ?2 AND response IS NOT NULL ORDER BY msg_id, app",
            [first, keep_from],
        )?;
        let removed = conn
            .prepare_cached(
                "DELETE FROM messages WHERE id >= ?1 AND id < ?2 AND response IS NOT NULL",
            )?
            .execute([first, keep_from])?;
        if removed > 0 {
            super::set_meta(conn, PURGED_THROUGH_KEY, self.next_id - 1)?;
        }
        Ok((removed as u64, keep_from, young.is_some()))
    }

    /// Drops the keys of up to `limit` entries older than `before_ms`, oldest first, up to
    /// the first one from `before_ms` on; returns how many had a key, and whether none older
    /// is left.
    fn expire_entries(
        &mut self,
        conn: &Connection,
        before_ms: i64,
        limit: usize,
    ) -> Result<(u64, bool)> {
        let mut keep_from = None;
        let (mut walked, mut expired) = (0, 0);
        let mut done = true;
        let mut forget = key_blocks::Gathered::new(|keys| key_blocks::remove(conn, keys).map(drop));
        chunks::for_each_after(conn, self.entries_expired, |entry| {
            if entry.at_ms >= before_ms || walked == limit {
                keep_from = Some(entry.id);
                done = entry.at_ms >= before_ms;
                return Ok(ControlFlow::Break(()));
            }
            walked += 1;
            if let Some(msg_id) = entry.msg_id {
                forget.push(entry.app, msg_id, Record::Entry(entry.id).key_id())?;
                expired += 1;
            }
            Ok(ControlFlow::Continue(()))
        })?;
        forget.finish()?;
        let keep_from = match keep_from {
            Some(id) => id,
            None => chunks::last_id(conn)?.unwrap_or(0) + 1,
        };
        if keep_from > self.entries_expired + 1 {
            self.entries_expired = keep_from - 1;
            super::set_meta(conn, ENTRIES_EXPIRED_KEY, self.entries_expired)?;
        }
        Ok((expired, done))
    }

    /// Before the history entries below `keep_from` are removed: the records among them that
    /// are still inside the dedup window become dedup rows of their own, so that a resend
    /// within the window gets its response whatever the history's retention, and their keys
    /// leave `message_key_blocks`. Returns whether the tail must be read back once the entries are
    /// gone ([`DedupKeys::reload`]): the entries reach past the watermark, into the tail (or
    /// a run under way), which still names them.
    ///
    /// Below the watermark, the keys of the new rows join the tail as any new row's do: the
    /// tail and a run name none of those entries. A purge is cut into many slices
    /// ([`super::purge`]), and with the dedup window longer than the history's, a read-back
    /// at each one would read the whole tail and start the merge under way over each time.
    pub(super) fn keep_records_before(
        &mut self,
        conn: &Connection,
        keep_from: i64,
    ) -> Result<bool> {
        if keep_from <= self.entries_expired + 1 {
            // Every entry below `keep_from` is past the dedup window already (the window is
            // shorter than the history's, as by default): nothing to copy, and no chunk to
            // read at each slice of a purge.
            return Ok(false);
        }
        let in_tail = keep_from > self.entries_through.max(self.entries_expired) + 1;
        let mut insert = conn.prepare_cached(
            "INSERT INTO messages (id, app, msg_id, received_ms, response)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut forget = key_blocks::Gathered::new(|keys| key_blocks::remove(conn, keys).map(drop));
        chunks::for_each_after(conn, self.entries_expired, |entry| {
            if entry.id >= keep_from {
                return Ok(ControlFlow::Break(()));
            }
            if let Some(msg_id) = entry.msg_id {
                let id = self.next_id;
                insert.execute(params![id, entry.app, msg_id, entry.at_ms, entry.reply])?;
                forget.push(entry.app, msg_id, Record::Entry(entry.id).key_id())?;
                self.next_id += 1;
                if !in_tail {
                    self.appended(entry.app, Arc::from(msg_id), Record::Row(id));
                }
            }
            Ok(ControlFlow::Continue(()))
        })?;
        forget.finish()?;
        Ok(in_tail)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Merges the key of `msg_id` in the app `shop`, naming entry 7.
    fn merge_key(conn: &Connection, msg_id: &str) {
        let key = Key {
            msg_id,
            app: "shop",
            id: Record::Entry(7).key_id(),
        };
        key_blocks::insert(conn, &[key]).expect("key");
    }

    #[test]
    fn assumed_keys_are_looked_up_by_app() {
        let conn = Connection::open_in_memory().expect("database");
        create(&conn).expect("table");
        merge_key(&conn, "merged");
        // Not built: every key is looked up.
        let filter = KeyFilter::new(Path::new("unused"), 0);
        // The merged key at places among many keys of two apps; the same `msg_id` of another
        // app, or a key that begins like it, is no match.
        let per = 64;
        for place in [0, per - 1, per, 2 * per + 1] {
            let mut assumed = Assumed::default();
            for n in 0..=2 * per + 1 {
                assumed.push("blog", "merged");
                assumed.push("shop", if n == place { "merged" } else { "merge" });
            }
            assert!(
                assumed.any_merged(&conn, &filter).expect("looked up"),
                "at {place}"
            );
            let found: Vec<(&str, &str)> = assumed.keys().skip(2 * place + 1).take(1).collect();
            assert_eq!(found, [("shop", "merged")]);
        }
        // Batches of every size, the merged key last.
        for count in [1, 2, 7, 8, 9, 63, 64, 65, 129] {
            let mut assumed = Assumed::default();
            for n in 1..count {
                assumed.push("shop", &format!("new-{n}"));
            }
            assert!(
                !assumed.any_merged(&conn, &filter).expect("looked up"),
                "{count}"
            );
            assumed.push("shop", "merged");
            assert!(
                assumed.any_merged(&conn, &filter).expect("looked up"),
                "{count}"
            );
        }
        let mut assumed = Assumed::default();
        assert!(!assumed.any_merged(&conn, &filter).expect("looked up"));
        for n in 0..3 * per {
            assumed.push("blog", "merged");
            assumed.push("shop", &format!("merged-{n}"));
        }
        assert!(!assumed.any_merged(&conn, &filter).expect("looked up"));
        assumed.clear();
        assumed.push("shop", "merged");
        assert!(assumed.any_merged(&conn, &filter).expect("looked up"));
    }

    /// A key the filter rules out is not looked up. Here the table has it and the filter,
    /// built before it was written and never told, rules it out (a merge tells the filter
    /// of every key it writes, so that this never happens).
    #[test]
    fn assumed_keys_the_filter_rules_out_are_not_looked_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.sqlite3");
        let conn = Connection::open(&path).expect("database");
        create(&conn).expect("table");
        let mut filter = KeyFilter::new(&path, 1);
        filter.begin_build(std::iter::empty());
        filter.wait_built();
        merge_key(&conn, "merged");
        let mut assumed = Assumed::default();
        assumed.push("shop", "new");
        assumed.push("shop", "merged");
        assert!(!assumed.any_merged(&conn, &filter).expect("looked up"));
        filter.add("shop", "merged");
        assert!(assumed.any_merged(&conn, &filter).expect("looked up"));
    }

    /// `msg_ids` of the app `shop` as a run sorts them.
    fn run_of(msg_ids: &[String]) -> Vec<RunKey> {
        let app: Arc<str> = Arc::from("shop");
        let keys = msg_ids
            .iter()
            .zip(0..)
            .map(|(msg_id, id)| RunKey::new(&app, &Arc::from(&**msg_id), id));
        into_run(keys.collect())
    }

    fn assert_sorted_as_bytes(mut msg_ids: Vec<String>) {
        let keys = run_of(&msg_ids);
        msg_ids.sort_unstable();
        let sorted: Vec<&str> = keys.iter().map(|key| &*key.msg_id).collect();
        assert_eq!(sorted, msg_ids);
    }

    /// A run is written in the order of its keys' bytes, whatever they share: long common
    /// prefixes (ties of the number), shorter keys, NUL bytes, and bytes above 0x7f.
    /// Appends a dedup row with `msg_id` as the store does: the row, then its key.
    fn insert(conn: &Connection, keys: &mut DedupKeys, msg_id: &str) {
        conn.execute(
            "INSERT INTO messages (id, app, msg_id, received_ms) VALUES (?1, 'shop', ?2, 0)",
            params![keys.next_id(), msg_id],
        )
        .expect("row");
        keys.inserted("shop", msg_id);
    }

    /// Writes the run under way whole and commits it.
    fn merge_whole_run(conn: &Connection, keys: &mut DedupKeys) {
        conn.execute_batch("BEGIN").expect("begin");
        while !keys.merge(conn, 2).expect("slice") {}
        conn.execute_batch("COMMIT").expect("commit");
        keys.merged();
    }

    /// Takes the tail's keys as a run and writes it whole.
    fn merge_tail(conn: &Connection, keys: &mut DedupKeys) {
        let taken = keys.take_run().expect("a run is due");
        keys.begin_run(taken.sorted());
        merge_whole_run(conn, keys);
    }

    /// The filter holds every merged key: those merged before it was built (read by its
    /// build) and those merged while it was built or after (told by the merge), so that none
    /// is ruled out; a key never merged is.
    #[test]
    fn the_filter_holds_every_merged_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.sqlite3");
        let conn = Connection::open(&path).expect("database");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("WAL");
        super::super::migrate(&conn).expect("tables");
        let mut keys =
            DedupKeys::load(&conn, 1, KeyFilter::new(Path::new("unused"), 0)).expect("tail");
        insert(&conn, &mut keys, "before");
        merge_tail(&conn, &mut keys);

        // As a store opens: the filter's build begins with the tail.
        let mut keys = DedupKeys::load(&conn, 1, KeyFilter::new(&path, 1)).expect("tail");
        insert(&conn, &mut keys, "during");
        merge_tail(&conn, &mut keys);
        keys.filter.wait_built();
        insert(&conn, &mut keys, "after");
        merge_tail(&conn, &mut keys);
        let filter = keys.filter();
        for msg_id in ["before", "during", "after"] {
            assert!(filter.may_have("shop", msg_id), "{msg_id}");
            let mut assumed = Assumed::default();
            assumed.push("shop", msg_id);
            assert!(
                assumed.any_merged(&conn, filter).expect("looked up"),
                "{msg_id}"
            );
        }
        assert!(!filter.may_have("shop", "never"));
    }

    /// A run is taken out of the tail to be sorted while batches go on (`TakenRun`): the keys
    /// appended meanwhile wait for the next run, found in the tail all along, and a run taken
    /// before the tail was read back (a rollback, a purge) is dropped, the next taking every
    /// key again.
    #[test]
    fn a_run_taken_out_is_begun_unless_the_tail_was_read_back() {
        let conn = Connection::open_in_memory().expect("database");
        super::super::migrate(&conn).expect("tables");
        let mut keys =
            DedupKeys::load(&conn, 1, KeyFilter::new(Path::new("unused"), 0)).expect("tail");
        for msg_id in ["m3", "m1", "m2"] {
            insert(&conn, &mut keys, msg_id);
        }
        let taken = keys.take_run().expect("a run is due");
        assert_eq!(keys.rows(), 0);
        assert!(keys.take_run().is_none(), "its keys are taken");
        insert(&conn, &mut keys, "m4");
        keys.begin_run(taken.sorted());
        assert!(keys.run_begun());
        merge_whole_run(&conn, &mut keys);
        for (n, msg_id) in [(1, "m3"), (2, "m1"), (3, "m2")] {
            let merged = find_merged(&conn, "shop", msg_id).expect("looked up");
            assert_eq!(merged, Some(Record::Row(n)), "{msg_id}");
            assert_eq!(
                keys.find_recent("shop", msg_id),
                None,
                "{msg_id} left the tail"
            );
        }
        assert_eq!(find_merged(&conn, "shop", "m4").expect("looked up"), None);
        assert_eq!(keys.find_recent("shop", "m4"), Some(Record::Row(4)));
        assert_eq!(keys.rows(), 1, "m4 waits for the next run");

        insert(&conn, &mut keys, "m5");
        let stale = keys.take_run().expect("a run is due");
        keys.reload(&conn).expect("tail read back");
        keys.begin_run(stale.sorted());
        assert!(
            !keys.run_begun(),
            "a run taken before the tail was read back"
        );
        assert_eq!(keys.rows(), 2);
        let fresh = keys.take_run().expect("a run is due");
        keys.begin_run(fresh.sorted());
        merge_whole_run(&conn, &mut keys);
        for (n, msg_id) in [(4, "m4"), (5, "m5")] {
            let merged = find_merged(&conn, "shop", msg_id).expect("looked up");
            assert_eq!(merged, Some(Record::Row(n)), "{msg_id}");
        }
        assert_eq!(keys.rows(), 0);
    }

    #[test]
    fn a_run_sorts_as_the_keys_bytes_do() {
        let mut msg_ids: Vec<String> = vec![
            String::new(),
            "a".into(),
            "a\0".into(),
            "a\0\0".into(),
            "ab".into(),
            "b".into(),
            "é".into(),
            "zzzzzzzzzzzzzzzz".into(),
            "zzzzzzzzzzzzzzzz\0".into(),
            "zzzzzzzzzzzzzzzza".into(),
            "zzzzzzzzzzzzzzz\u{7f}".into(),
        ];
        // The shape of the benchmark's and the client's ids: a shared prefix, then numbers
        // that are not padded.
        msg_ids.extend((0..2_000u64).map(|n| format!("run-4f2a9c-3-{}", n * 7919 % 2_000)));
        msg_ids.extend((0..300u64).map(|n| format!("{:x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15))));
        assert_sorted_as_bytes(msg_ids);
    }

    /// When every key shares a prefix, the sort goes by the bytes after it: a key that is the
    /// prefix alone, keys that differ only after 16 more bytes, and a prefix that ends inside a
    /// character.
    #[test]
    fn a_run_of_keys_with_one_prefix_sorts_as_their_bytes_do() {
        let prefix = "b18c4d2e9f0a1b2c3-";
        let mut msg_ids: Vec<String> = (0..2_000u64)
            .map(|n| format!("{prefix}{}-{}", n % 8, n * 7919 % 2_000))
            .collect();
        msg_ids.push(prefix.into());
        msg_ids.push(format!("{prefix}0123456789abcdef"));
        msg_ids.push(format!("{prefix}0123456789abcdef\0"));
        msg_ids.push(format!("{prefix}0123456789abcdefg"));
        assert_sorted_as_bytes(msg_ids);
        assert_sorted_as_bytes(vec!["pré".into(), "prè".into(), "pr\u{e9}\u{e8}".into()]);
    }

    /// A run of several apps' keys is in the merged keys' order: by `msg_id`, then by app.
    #[test]
    fn a_run_of_several_apps_sorts_by_msg_id_then_app() {
        let (shop, blog) = (Arc::from("shop"), Arc::from("blog"));
        let keys = [
            (&shop, "m2"),
            (&blog, "m1"),
            (&shop, "m1"),
            (&blog, "m3"),
            (&blog, "m2"),
        ]
        .into_iter()
        .zip(0..)
        .map(|((app, msg_id), id)| RunKey::new(app, &Arc::from(msg_id), id));
        let run = into_run(keys.collect());
        let run: Vec<(&str, &str)> = run.iter().map(|key| (&*key.msg_id, &*key.app)).collect();
        assert_eq!(
            run,
            [
                ("m1", "blog"),
                ("m1", "shop"),
                ("m2", "blog"),
                ("m2", "shop"),
                ("m3", "blog")
            ]
        );
    }

    /// A key appended twice is written once, with its later record, whatever the sort does
    /// with ties.
    #[test]
    fn a_run_keeps_the_latest_record_of_a_key() {
        let (shop, blog) = (Arc::from("shop"), Arc::from("blog"));
        for repeats in [2, 3, 17, 64] {
            let mut keys = Vec::new();
            for n in 0..repeats {
                keys.push(RunKey::new(&shop, &Arc::from("m1"), n));
                keys.push(RunKey::new(&blog, &Arc::from("m1"), 100 + n));
                keys.push(RunKey::new(
                    &shop,
                    &Arc::from(format!("m{}", n + 2)),
                    200 + n,
                ));
            }
            let run = into_run(keys);
            let m1: Vec<(&str, i64)> = run
                .iter()
                .filter(|key| &*key.msg_id == "m1")
                .map(|key| (&*key.app, key.id))
                .collect();
            assert_eq!(m1, [("blog", 99 + repeats), ("shop", repeats - 1)]);
            assert_eq!(run.len(), 2 + repeats as usize);
        }
    }
}
