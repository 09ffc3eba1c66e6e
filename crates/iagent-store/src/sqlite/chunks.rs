//! History entries stored a batch at a time: each row of `history_chunks` holds entries with
//! ids in a stretch of their own, encoded one after the other in a BLOB.
//!
//! An entry of its own row cost SQLite a statement per message: its parameters bound and
//! copied, its program run, the table searched from its root for the row's place (an insert
//! loses the cursor's place, so SQLite's append path never applied): 14 400 instructions of the
//! 40 000 the gateway spent on an echo (`bench/instructions`). A chunk is one insert for up to
//! [`CHUNK_ENTRIES`] entries, and an entry is a copy of its bytes into the chunk being
//! gathered: 5 500, most of it packing its texts.
//!
//! A batch gathers its entries into a [`Pending`] chunk and writes it as a row when it is full
//! and before the batch commits. Every read of entries writes the pending chunk first, so a
//! job reads the entries the jobs before it in its batch appended, as it did when each was a
//! row; after a rollback the pending chunk is dropped with the rows.
//!
//! What it costs: reading one entry reads its chunk (at most [`CHUNK_BYTES`] and one entry
//! more), and a purge whose cut falls inside a chunk writes that chunk again without the
//! entries before the cut.
//!
//! A chunk's row is keyed by its last id (the rowid), so that the chunk holding an id is the
//! first whose key is not below it: one search of the table.

use std::ops::ControlFlow;

use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, params};

use super::packed::Stored;
use crate::Result;

/// The most entries a chunk holds. More entries per chunk spread a chunk's insert over more
/// messages, and make each read of an entry, which reads its chunk, read more.
pub(super) const CHUNK_ENTRIES: usize = 32;

/// The size at which a chunk is written whatever its count of entries, so that large messages
/// do not make a chunk, and each read of one of its entries, large. A chunk holds at least
/// one entry, however large.
pub(super) const CHUNK_BYTES: usize = 64 * 1024;

/// The first byte of a chunk's body: the layout of its entries (below).
const FORMAT: u8 = 1;

/// Creates `history_chunks`.
pub(super) fn create(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS history_chunks (
            last INTEGER PRIMARY KEY,
            first INTEGER NOT NULL,
            entries INTEGER NOT NULL,
            newest_ms INTEGER NOT NULL,
            body BLOB NOT NULL
        );",
    )?;
    Ok(())
}

/// A history entry as a chunk holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry<'a> {
    /// From [`super::history::HistoryHeads`]' counter, never from SQLite: an id is never
    /// handed out twice, since a `prev`, a head or a dedup key naming a purged entry must not
    /// come to name another.
    pub(super) id: i64,
    /// The conversation's entry before this one.
    pub(super) prev: Option<i64>,
    pub(super) at_ms: i64,
    pub(super) app: &'a str,
    /// Set when the entry is the dedup record of this message (see [`super::dedup`]).
    pub(super) msg_id: Option<&'a str>,
    pub(super) conversation: &'a str,
    pub(super) message: Stored<'a>,
    pub(super) reply: Option<Stored<'a>>,
}

impl Entry<'_> {
    /// The message, as it was stored.
    pub(super) fn message_text(&self) -> Result<String> {
        self.message.text(self.msg_id).map_err(corrupt)
    }

    /// The reply, if the entry has one.
    pub(super) fn reply_text(&self) -> Result<Option<String>> {
        self.reply
            .map(|reply| reply.text(self.msg_id).map_err(corrupt))
            .transpose()
    }
}

/// Why a chunk's body could not be read: it was not written by [`Pending`].
#[derive(Debug, thiserror::Error)]
enum Corrupt {
    #[error("history chunk of unknown format {0}")]
    Format(u8),
    #[error("history chunk ends inside an entry")]
    Truncated,
    #[error("history chunk holds a text that is not UTF-8")]
    NotUtf8,
    #[error("history chunk holds an unknown kind of text {0}")]
    Kind(u8),
    #[error("history chunk's text cannot be unpacked: {0}")]
    Unpack(#[from] super::packed::Unpack),
}

/// Why an entry could not be added to a chunk.
#[derive(Debug, thiserror::Error)]
#[error("a history entry's text of {0} bytes is too large to store")]
struct TooLarge(usize);

/// A chunk that cannot be read is a column that cannot be converted: the body, which every
/// query that reads chunks selects second.
fn corrupt(err: impl Into<Corrupt>) -> crate::StoreError {
    rusqlite::Error::FromSqlConversionFailure(1, Type::Blob, Box::new(err.into())).into()
}

/// How a text is marked in a chunk.
const TEXT: u8 = 0;
const PACKED: u8 = 1;
const NONE: u8 = 2;

/// An absent `msg_id`'s length.
const NO_MSG_ID: u32 = u32::MAX;

/// Entries gathered and not written yet: those of the batch being run, and those the entry
/// log holds (see [`super::entry_log`]), which are written once enough have gathered. They
/// are written as chunks of at most [`CHUNK_ENTRIES`] entries, each closed once it reaches
/// [`CHUNK_BYTES`].
///
/// Each entry is laid out as its id, `prev` (0 for none) and `at_ms` (8 bytes each, little
/// endian), then `app`, `msg_id` and `conversation` (each a 4-byte length, [`NO_MSG_ID`] for
/// no `msg_id`, and the bytes), then the message and the reply (each a kind, [`TEXT`],
/// [`PACKED`] or [`NONE`] for no reply, then a 4-byte length and the bytes). The entries are
/// kept one after the other in that layout, which is also how the entry log holds them.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// The entries, encoded one after the other.
    body: Vec<u8>,
    /// Where each entry begins in `body`, in id order.
    marks: Vec<Mark>,
    /// A chunk's body as it is written: [`FORMAT`] and its entries.
    chunk: Vec<u8>,
}

/// An entry in [`Pending`]: what writing its chunk needs without decoding it.
#[derive(Debug, Clone, Copy)]
struct Mark {
    start: usize,
    id: i64,
    at_ms: i64,
}

impl Pending {
    /// The entries encoded in `bytes`, one after the other, as [`Pending::since`] gave them.
    pub(super) fn decode(bytes: Vec<u8>) -> Result<Self> {
        let mut marks = Vec::new();
        let mut reader = Reader { bytes: &bytes };
        while !reader.bytes.is_empty() {
            let start = bytes.len() - reader.bytes.len();
            let entry = reader.entry().map_err(corrupt)?;
            marks.push(Mark {
                start,
                id: entry.id,
                at_ms: entry.at_ms,
            });
        }
        Ok(Self {
            body: bytes,
            marks,
            chunk: Vec::new(),
        })
    }

    /// Adds `entry`, whose id is above those of the entries gathered so far; writes the
    /// entries once they fill a chunk.
    pub(super) fn push(&mut self, conn: &Connection, entry: &Entry<'_>) -> Result<()> {
        self.hold(entry)?;
        if self.full() {
            self.write(conn)?;
        }
        Ok(())
    }

    /// Adds `entry`, whose id is above those of the entries gathered so far, and writes
    /// nothing.
    pub(super) fn hold(&mut self, entry: &Entry<'_>) -> Result<()> {
        let start = self.body.len();
        if let Err(err) = encode(&mut self.body, entry) {
            self.body.truncate(start);
            return Err(err);
        }
        self.marks.push(Mark {
            start,
            id: entry.id,
            at_ms: entry.at_ms,
        });
        Ok(())
    }

    /// Whether the entries gathered fill a chunk.
    fn full(&self) -> bool {
        self.marks.len() >= CHUNK_ENTRIES || self.body.len() >= CHUNK_BYTES
    }

    /// How many entries are gathered.
    pub(super) fn len(&self) -> usize {
        self.marks.len()
    }

    /// Whether no entry is gathered.
    pub(super) fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    /// The id of the oldest entry gathered.
    pub(super) fn first_id(&self) -> Option<i64> {
        self.marks.first().map(|mark| mark.id)
    }

    /// The id of the newest entry gathered.
    pub(super) fn last_id(&self) -> Option<i64> {
        self.marks.last().map(|mark| mark.id)
    }

    /// How many bytes the entries gathered take.
    pub(super) fn bytes(&self) -> usize {
        self.body.len()
    }

    /// The entries gathered after the first `kept`, encoded one after the other.
    pub(super) fn since(&self, kept: usize) -> &[u8] {
        let start = self
            .marks
            .get(kept)
            .map_or(self.body.len(), |mark| mark.start);
        &self.body[start..]
    }

    /// Adds the entries of `newer`, whose ids are all above those gathered here.
    pub(super) fn extend(&mut self, newer: Pending) {
        debug_assert!(self.last_id() < newer.first_id() || newer.is_empty());
        let offset = self.body.len();
        self.body.extend_from_slice(&newer.body);
        self.marks.extend(newer.marks.into_iter().map(|mark| Mark {
            start: mark.start + offset,
            ..mark
        }));
    }

    /// Drops the entries gathered after the first `kept`.
    pub(super) fn truncate(&mut self, kept: usize) {
        if let Some(mark) = self.marks.get(kept) {
            self.body.truncate(mark.start);
            self.marks.truncate(kept);
        }
    }

    /// Drops the entries whose id is not above `id`: written before.
    pub(super) fn drop_through(&mut self, id: i64) {
        let written = self.marks.partition_point(|mark| mark.id <= id);
        let Some(start) = self.marks.get(written).map(|mark| mark.start) else {
            return self.discard();
        };
        self.body.drain(..start);
        self.marks.drain(..written);
        for mark in &mut self.marks {
            mark.start -= start;
        }
    }

    /// Entry `id`, if it is gathered here.
    pub(super) fn entry(&self, id: i64) -> Result<Option<Entry<'_>>> {
        let Ok(at) = self.marks.binary_search_by_key(&id, |mark| mark.id) else {
            return Ok(None);
        };
        let mut reader = Reader {
            bytes: &self.body[self.marks[at].start..],
        };
        reader.entry().map(Some).map_err(corrupt)
    }

    /// Writes the entries gathered, if there are any, and lets go of them.
    pub(super) fn write(&mut self, conn: &Connection) -> Result<()> {
        self.write_kept(conn)?;
        self.discard();
        Ok(())
    }

    /// Writes the entries gathered, as chunks, and keeps them: for a transaction that may
    /// yet fail to commit.
    pub(super) fn write_kept(&mut self, conn: &Connection) -> Result<()> {
        let mut chunk = std::mem::take(&mut self.chunk);
        let written = self.write_chunks(conn, &mut chunk);
        self.chunk = chunk;
        written
    }

    /// Writes the entries gathered, as chunks, each laid out in `chunk` first: entries frozen
    /// for the writer thread are shared with the readers meanwhile, and are not changed.
    pub(super) fn write_chunks(&self, conn: &Connection, chunk: &mut Vec<u8>) -> Result<()> {
        let mut insert = conn.prepare_cached(
            "INSERT INTO history_chunks (last, first, entries, newest_ms, body)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut first = 0;
        while first < self.marks.len() {
            let start = self.marks[first].start;
            let mut end = first;
            let mut newest_ms = i64::MIN;
            // At least one entry, however large; at most a chunk's count, closed once the
            // chunk is large.
            while end < self.marks.len()
                && end - first < CHUNK_ENTRIES
                && (end == first || self.marks[end].start - start < CHUNK_BYTES)
            {
                newest_ms = newest_ms.max(self.marks[end].at_ms);
                end += 1;
            }
            let stop = self
                .marks
                .get(end)
                .map_or(self.body.len(), |mark| mark.start);
            chunk.clear();
            chunk.push(FORMAT);
            chunk.extend_from_slice(&self.body[start..stop]);
            insert.execute(params![
                self.marks[end - 1].id,
                self.marks[first].id,
                (end - first) as i64,
                newest_ms,
                chunk.as_slice()
            ])?;
            first = end;
        }
        Ok(())
    }

    /// Drops the entries gathered: written, or the batch they were appended in was rolled
    /// back.
    pub(super) fn discard(&mut self) {
        self.body.clear();
        self.marks.clear();
    }
}

/// Appends `entry` to a chunk's body, laid out as [`Pending`] says.
fn encode(body: &mut Vec<u8>, entry: &Entry<'_>) -> Result<()> {
    for number in [entry.id, entry.prev.unwrap_or(0), entry.at_ms] {
        body.extend_from_slice(&number.to_le_bytes());
    }
    put_bytes(body, entry.app.as_bytes())?;
    match entry.msg_id {
        Some(msg_id) => put_bytes(body, msg_id.as_bytes())?,
        None => body.extend_from_slice(&NO_MSG_ID.to_le_bytes()),
    }
    put_bytes(body, entry.conversation.as_bytes())?;
    put_text(body, Some(entry.message))?;
    put_text(body, entry.reply)
}

/// Appends a length and the bytes. No text the gateway stores comes near 4 GiB (frames are
/// limited far below it); one that did is refused rather than stored cut.
fn put_bytes(body: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&len| len != NO_MSG_ID)
        .ok_or_else(|| rusqlite::Error::ToSqlConversionFailure(Box::new(TooLarge(bytes.len()))))?;
    body.extend_from_slice(&len.to_le_bytes());
    body.extend_from_slice(bytes);
    Ok(())
}

fn put_text(body: &mut Vec<u8>, text: Option<Stored<'_>>) -> Result<()> {
    match text {
        Some(Stored::Text(text)) => {
            body.push(TEXT);
            put_bytes(body, text.as_bytes())
        }
        Some(Stored::Packed(packed)) => {
            body.push(PACKED);
            put_bytes(body, packed)
        }
        None => {
            body.push(NONE);
            Ok(())
        }
    }
}

/// The entries of a chunk's body, in id order.
fn entries(body: &[u8]) -> impl Iterator<Item = Result<Entry<'_>>> {
    let mut reader = Reader { bytes: body };
    let format = reader.u8().and_then(|format| match format {
        FORMAT => Ok(()),
        other => Err(Corrupt::Format(other)),
    });
    let mut failed = format.err();
    std::iter::from_fn(move || {
        if let Some(err) = failed.take() {
            reader.bytes = &[];
            return Some(Err(corrupt(err)));
        }
        if reader.bytes.is_empty() {
            return None;
        }
        let entry = reader.entry();
        if entry.is_err() {
            reader.bytes = &[];
        }
        Some(entry.map_err(corrupt))
    })
}

/// Reads a chunk's body from its start.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], Corrupt> {
        if self.bytes.len() < len {
            return Err(Corrupt::Truncated);
        }
        let (taken, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, Corrupt> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn i64(&mut self) -> Result<i64, Corrupt> {
        let mut number = [0; 8];
        number.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(number))
    }

    fn bytes_of(&mut self, len: u32) -> Result<&'a [u8], Corrupt> {
        self.take(usize::try_from(len).map_err(|_| Corrupt::Truncated)?)
    }

    fn str_of(&mut self, len: u32) -> Result<&'a str, Corrupt> {
        std::str::from_utf8(self.bytes_of(len)?).map_err(|_| Corrupt::NotUtf8)
    }

    fn str(&mut self) -> Result<&'a str, Corrupt> {
        let len = self.u32()?;
        self.str_of(len)
    }

    fn text(&mut self) -> Result<Option<Stored<'a>>, Corrupt> {
        match self.u8()? {
            TEXT => Ok(Some(Stored::Text(self.str()?))),
            PACKED => {
                let len = self.u32()?;
                Ok(Some(Stored::Packed(self.bytes_of(len)?)))
            }
            NONE => Ok(None),
            other => Err(Corrupt::Kind(other)),
        }
    }

    fn entry(&mut self) -> Result<Entry<'a>, Corrupt> {
        let id = self.i64()?;
        let prev = Some(self.i64()?).filter(|&prev| prev != 0);
        let at_ms = self.i64()?;
        let app = self.str()?;
        let msg_id = match self.u32()? {
            NO_MSG_ID => None,
            len => Some(self.str_of(len)?),
        };
        let conversation = self.str()?;
        let message = self.text()?.ok_or(Corrupt::Kind(NONE))?;
        let reply = self.text()?;
        Ok(Entry {
            id,
            prev,
            at_ms,
            app,
            msg_id,
            conversation,
            message,
            reply,
        })
    }
}

/// The id of the newest entry written, if any.
pub(super) fn last_id(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT MAX(last) FROM history_chunks")?
        .query_row([], |row| row.get(0))?)
}

/// Entry `id`, given to `read`, if it is stored.
pub(super) fn find<T>(
    conn: &Connection,
    id: i64,
    read: impl FnOnce(&Entry<'_>) -> Result<T>,
) -> Result<Option<T>> {
    let mut statement = conn.prepare_cached(
        "SELECT first, body FROM history_chunks WHERE last >= ?1 ORDER BY last LIMIT 1",
    )?;
    let mut rows = statement.query([id])?;
    let Some(row) = rows.next()? else {
        return Ok(None);
    };
    if row.get::<_, i64>(0)? > id {
        return Ok(None);
    }
    let body = row.get_ref(1)?.as_blob().map_err(rusqlite::Error::from)?;
    for entry in entries(body) {
        let entry = entry?;
        if entry.id == id {
            return read(&entry).map(Some);
        }
    }
    Ok(None)
}

/// Gives `visit` every entry after `after`, in id order, until it breaks. A chunk at a time is
/// read into memory, and no statement is left open while `visit` runs, so it may write.
pub(super) fn for_each_after(
    conn: &Connection,
    after: i64,
    mut visit: impl FnMut(&Entry<'_>) -> Result<ControlFlow<()>>,
) -> Result<()> {
    let mut next = conn.prepare_cached(
        "SELECT last, body FROM history_chunks WHERE last > ?1 ORDER BY last LIMIT 1",
    )?;
    let mut from = after;
    while let Some((last, body)) = next
        .query_row([from], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
        })
        .optional()?
    {
        for entry in entries(&body) {
            let entry = entry?;
            if entry.id > after && visit(&entry)?.is_break() {
                return Ok(());
            }
        }
        from = last;
    }
    Ok(())
}

/// Where a purge of the entries older than `before_ms` that looks at about `limit` of the
/// oldest entries stops ([`first_from`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    /// The oldest entry from `before_ms` on: every entry before it is older.
    Young(i64),
    /// The first entry not looked at: `limit` were, all older.
    Limit(i64),
    /// No entry is from `before_ms` on.
    End,
}

/// The oldest entry from `before_ms` on among about `limit` of the oldest ones (whole chunks,
/// at least one), found in the first chunk whose newest entry is: the chunks before it are
/// read without their bodies.
pub(super) fn first_from(conn: &Connection, before_ms: i64, limit: usize) -> Result<Cut> {
    let mut next = conn.prepare_cached(
        "SELECT last, first, entries, newest_ms FROM history_chunks WHERE last > ?1
         ORDER BY last LIMIT 1",
    )?;
    let (mut after, mut looked_at) = (i64::MIN, 0);
    while let Some((last, first, held, newest_ms)) = next
        .query_row([after], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, usize>(2)?,
                row.get::<_, i64>(3)?,
            ))
        })
        .optional()?
    {
        if looked_at > 0 && looked_at + held > limit {
            return Ok(Cut::Limit(first));
        }
        if newest_ms >= before_ms {
            let body: Vec<u8> = conn
                .prepare_cached("SELECT body FROM history_chunks WHERE last = ?1")?
                .query_row([last], |row| row.get(0))?;
            for entry in entries(&body) {
                let entry = entry?;
                if entry.at_ms >= before_ms {
                    return Ok(Cut::Young(entry.id));
                }
            }
        }
        looked_at += held;
        after = last;
    }
    Ok(Cut::End)
}

/// The first chunk that is not wholly below an id: the only one that may hold entries on both
/// sides of it, since each chunk holds a stretch of ids of its own. Found by its key: with a
/// condition on `first` in the query as well, SQLite read every chunk's row to find none, the
/// whole table at every purge (a purge at saturation read 1.6 GiB of a 3.4 GiB database
/// through the mapping and held the writer for about 200 ms).
const NEXT_CHUNK: &str =
    "SELECT last, first FROM history_chunks WHERE last >= ?1 ORDER BY last LIMIT 1";

/// Removes the entries below `keep_from`; returns how many. The chunks wholly below it go,
/// and a chunk that holds entries on both sides of it is written again with the newer ones
/// only.
pub(super) fn delete_before(conn: &Connection, keep_from: i64) -> Result<u64> {
    let whole: i64 = conn
        .prepare_cached("SELECT COALESCE(SUM(entries), 0) FROM history_chunks WHERE last < ?1")?
        .query_row([keep_from], |row| row.get(0))?;
    conn.prepare_cached("DELETE FROM history_chunks WHERE last < ?1")?
        .execute([keep_from])?;
    let mut removed = u64::try_from(whole).unwrap_or(0);
    let next: Option<(i64, i64)> = conn
        .prepare_cached(NEXT_CHUNK)?
        .query_row([keep_from], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    if let Some((last, _)) = next.filter(|&(_, first)| first < keep_from) {
        let body: Vec<u8> = conn
            .prepare_cached("SELECT body FROM history_chunks WHERE last = ?1")?
            .query_row([last], |row| row.get(0))?;
        conn.prepare_cached("DELETE FROM history_chunks WHERE last = ?1")?
            .execute([last])?;
        let mut kept = Pending::default();
        for entry in entries(&body) {
            let entry = entry?;
            if entry.id >= keep_from {
                kept.push(conn, &entry)?;
            } else {
                removed += 1;
            }
        }
        kept.write(conn)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database() -> Connection {
        let conn = Connection::open_in_memory().expect("database");
        create(&conn).expect("table");
        conn
    }

    /// An entry of every shape: with and without `prev`, `msg_id` and reply, packed or not.
    fn entry(id: i64) -> Entry<'static> {
        const PACKED_BYTES: &[u8] = &[1, b'1', 2, 12];
        Entry {
            id,
            prev: (id % 3 != 0 && id > 1).then_some(id - 1),
            at_ms: 1_000 + id,
            app: if id % 2 == 0 { "shop" } else { "bank" },
            msg_id: (id % 4 != 0).then_some("m-ü"),
            conversation: "p:user:echo",
            message: if id % 5 == 0 {
                Stored::Packed(PACKED_BYTES)
            } else {
                Stored::Text("{\"content\":\"hello\"}")
            },
            reply: match id % 3 {
                0 => None,
                1 => Some(Stored::Text("")),
                _ => Some(Stored::Packed(PACKED_BYTES)),
            },
        }
    }

    fn all_after(conn: &Connection, after: i64) -> Vec<Entry<'static>> {
        let mut ids = Vec::new();
        for_each_after(conn, after, |entry| {
            assert_eq!(*entry, self::entry(entry.id));
            ids.push(entry.id);
            Ok(ControlFlow::Continue(()))
        })
        .expect("entries read");
        ids.into_iter().map(entry).collect()
    }

    #[test]
    fn entries_read_back_as_they_were_pushed_across_chunks() {
        let conn = database();
        let mut pending = Pending::default();
        let count = 3 * CHUNK_ENTRIES as i64 + 5;
        for id in 1..=count {
            pending.push(&conn, &entry(id)).expect("pushed");
        }
        // Three full chunks are written; the rest waits for `write`.
        assert_eq!(
            last_id(&conn).expect("last"),
            Some(3 * CHUNK_ENTRIES as i64)
        );
        pending.write(&conn).expect("written");
        assert_eq!(last_id(&conn).expect("last"), Some(count));
        let all: Vec<i64> = all_after(&conn, 0).iter().map(|entry| entry.id).collect();
        assert_eq!(all, (1..=count).collect::<Vec<_>>());
        let later: Vec<i64> = all_after(&conn, 40).iter().map(|entry| entry.id).collect();
        assert_eq!(later, (41..=count).collect::<Vec<_>>());
        for id in [1, 31, 32, 33, 64, count] {
            let found = find(&conn, id, |entry| Ok(*entry == self::entry(id))).expect("read");
            assert_eq!(found, Some(true), "entry {id}");
        }
        assert_eq!(find(&conn, count + 1, |_| Ok(())).expect("read"), None);
        assert_eq!(find(&conn, 0, |_| Ok(())).expect("read"), None);
    }

    #[test]
    fn a_chunk_is_written_once_it_is_large_whatever_its_count() {
        let conn = database();
        let mut pending = Pending::default();
        let large = "x".repeat(CHUNK_BYTES / 2);
        let mut entry = entry(1);
        entry.message = Stored::Text(&large);
        pending.push(&conn, &entry).expect("pushed");
        assert_eq!(last_id(&conn).expect("last"), None);
        entry.id = 2;
        pending.push(&conn, &entry).expect("pushed");
        assert_eq!(last_id(&conn).expect("last"), Some(2));
        let read = find(&conn, 2, |entry| entry.message_text()).expect("read");
        assert_eq!(read.as_deref(), Some(large.as_str()));
    }

    #[test]
    fn ids_between_chunks_and_purged_chunks_are_not_found() {
        let conn = database();
        let mut pending = Pending::default();
        for id in [1, 2, 3] {
            pending.push(&conn, &entry(id)).expect("pushed");
        }
        pending.write(&conn).expect("written");
        for id in [10, 11] {
            pending.push(&conn, &entry(id)).expect("pushed");
        }
        pending.write(&conn).expect("written");
        assert_eq!(find(&conn, 5, |_| Ok(())).expect("read"), None);
        // Entry n is from 1 000 + n on.
        let first_from = |before_ms, limit| first_from(&conn, before_ms, limit).expect("first");
        assert_eq!(first_from(1_002, 100), Cut::Young(2));
        assert_eq!(first_from(1_004, 100), Cut::Young(10));
        assert_eq!(first_from(1_012, 100), Cut::End);
        // Whole chunks, at least one, up to the limit.
        assert_eq!(first_from(1_012, 1), Cut::Limit(10));
        assert_eq!(first_from(1_012, 4), Cut::Limit(10));
        assert_eq!(first_from(1_012, 5), Cut::End);
        assert_eq!(first_from(1_002, 1), Cut::Young(2));
        let ids = |conn: &Connection| -> Vec<i64> {
            all_after(conn, 0).iter().map(|entry| entry.id).collect()
        };
        // Inside a chunk: the entries before go, the chunk's others stay.
        assert_eq!(delete_before(&conn, 2).expect("deleted"), 1);
        assert_eq!(ids(&conn), [2, 3, 10, 11]);
        assert_eq!(find(&conn, 1, |_| Ok(())).expect("read"), None);
        assert_eq!(delete_before(&conn, 11).expect("deleted"), 3);
        assert_eq!(ids(&conn), [11]);
        assert_eq!(delete_before(&conn, 11).expect("deleted"), 0);
        assert_eq!(delete_before(&conn, 12).expect("deleted"), 1);
        assert!(ids(&conn).is_empty());
    }

    /// A purge's cost follows what it removes, not the table: the chunk that may straddle the
    /// cut is found by its key, in a few steps of SQLite's program however many chunks follow
    /// (the query it replaced stepped through every one of them).
    #[test]
    fn the_chunk_a_cut_may_fall_in_is_found_in_a_few_steps() {
        let conn = database();
        let mut pending = Pending::default();
        for id in 1..=200 * CHUNK_ENTRIES as i64 {
            pending.push(&conn, &entry(id)).expect("pushed");
        }
        pending.write(&conn).expect("written");
        let cuts = [1, 2, CHUNK_ENTRIES as i64 + 1, 5 * CHUNK_ENTRIES as i64 + 3];
        for keep_from in cuts {
            let statement = conn
                .prepare_cached(NEXT_CHUNK)
                .expect("the cached statement");
            statement.reset_status(rusqlite::StatementStatus::VmStep);
            drop(statement);
            delete_before(&conn, keep_from).expect("deleted");
            let first = all_after(&conn, 0).first().map(|entry| entry.id);
            assert_eq!(first, Some(keep_from), "cut at {keep_from}");
            let statement = conn
                .prepare_cached(NEXT_CHUNK)
                .expect("the cached statement");
            let steps = statement.get_status(rusqlite::StatementStatus::VmStep);
            assert!(
                (1..100).contains(&steps),
                "{steps} steps, cut at {keep_from}"
            );
        }
    }

    #[test]
    fn discarded_entries_are_never_written() {
        let conn = database();
        let mut pending = Pending::default();
        pending.push(&conn, &entry(1)).expect("pushed");
        pending.discard();
        pending.push(&conn, &entry(2)).expect("pushed");
        pending.write(&conn).expect("written");
        let left: Vec<i64> = all_after(&conn, 0).iter().map(|entry| entry.id).collect();
        assert_eq!(left, [2]);
    }

    #[test]
    fn a_damaged_chunk_is_an_error_not_a_panic() {
        let conn = database();
        let mut pending = Pending::default();
        pending.push(&conn, &entry(1)).expect("pushed");
        pending.write(&conn).expect("written");
        let body: Vec<u8> = conn
            .query_row("SELECT body FROM history_chunks", [], |row| row.get(0))
            .expect("body");
        // Every prefix is cut inside an entry; a wrong format or kind of text is named.
        let mut damaged: Vec<Vec<u8>> = (2..body.len()).map(|len| body[..len].to_vec()).collect();
        damaged.push([&[FORMAT + 1], &body[1..]].concat());
        let mut kind = body.clone();
        let message_kind = 1 + 24 + 4 + 4 + 4 + "m-ü".len() + 4 + "p:user:echo".len();
        kind[message_kind] = 7;
        damaged.push(kind);
        for body in damaged {
            conn.execute("UPDATE history_chunks SET body = ?1", [&body])
                .expect("damaged");
            assert!(find(&conn, 1, |_| Ok(())).is_err(), "{body:?}");
            assert!(
                for_each_after(&conn, 0, |_| Ok(ControlFlow::Continue(()))).is_err(),
                "{body:?}"
            );
        }
    }
}
