//! The merged dedup keys, sorted into blocks: the `message_key_blocks` table.
//!
//! With a row per key, a merge inserted each key of the tail's run on its own: its parameters
//! bound and copied, the table searched from its root, and pages split one after another
//! where keys land among others, about 3 900 instructions a key (`bench/instructions`), the
//! writer's largest single cost at saturation. Here a row is a block of keys, sorted by
//! `(msg_id, app)` as a run is, and a merge rewrites a block its keys fall into once with all
//! of them: keys from senders counting up in ranges of their own land together, so that one
//! row written takes tens of keys.
//!
//! A block's row is keyed by its last key, so that the block that holds a key, or would, is the
//! first whose row key is not below it: one search of the table. Inside, each key is the bytes
//! it does not share with the key before it (front coding: the benchmark's keys take 8 bytes
//! or so, not 35), and the keys are read in order: a block is small, [`BLOCK_BYTES`] or so,
//! and its row is read whole.
//!
//! What it costs: a look-up decodes its block up to the key, and a key that lands in a block
//! with none of its run's other keys (keys spread at random over a large table, such as UUIDs)
//! rewrites the whole block, a few hundred bytes, where a row per key wrote one; the page
//! written is the same.

use std::cmp::Ordering;
use std::ops::Range;

use rusqlite::types::Type;
use rusqlite::{Connection, OptionalExtension, Params, params};

use super::run_order;
use crate::Result;

/// The size a block's encoded keys are kept near. The table is `WITHOUT ROWID`, whose rows
/// SQLite keeps in index pages: a row of up to about 1 000 bytes stays on its 4 KiB page,
/// and a larger one spills into overflow pages of its own. A block holds at least one key,
/// however long.
pub(super) const BLOCK_BYTES: usize = 768;

/// How many keys a migration or a purge gathers before it writes them into the blocks.
const GATHERED_KEYS: usize = 4096;

/// The first byte of a block's body: the layout of its keys (below).
const FORMAT: u8 = 1;

/// Creates `message_key_blocks`. `keys` is how many keys the block holds.
pub(super) fn create(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS message_key_blocks (
            msg_id TEXT NOT NULL,
            app TEXT NOT NULL,
            keys INTEGER NOT NULL,
            body BLOB NOT NULL,
            PRIMARY KEY (msg_id, app)
        ) WITHOUT ROWID;",
    )?;
    Ok(())
}

/// A merged key: a message's `msg_id` in an app, and where its record is (a
/// [`super::dedup::Record`]'s key id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Key<'a> {
    pub(super) msg_id: &'a str,
    pub(super) app: &'a str,
    pub(super) id: i64,
}

impl<'a> Key<'a> {
    /// Where the key sorts: by `msg_id`, then by app, each by its bytes.
    fn place(&self) -> (&'a str, &'a str) {
        (self.msg_id, self.app)
    }
}

/// Why a block could not be read: it was not written by [`Encoder`].
#[derive(Debug, thiserror::Error)]
enum Corrupt {
    #[error("dedup key block of unknown format {0}")]
    Format(u8),
    #[error("dedup key block ends inside a key")]
    Truncated,
    #[error("dedup key block holds a key that is not UTF-8")]
    NotUtf8,
}

/// A block that cannot be read is a column that cannot be converted: the body, which every
/// query of blocks selects third.
fn corrupt(err: Corrupt) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(2, Type::Blob, Box::new(err))
}

/// The id of the key of `msg_id` in `app`, if a block holds it.
pub(super) fn find(conn: &Connection, app: &str, msg_id: &str) -> Result<Option<i64>> {
    let found = conn
        .prepare_cached(BLOCK_FROM)?
        .query_row(params![msg_id, app], |row| {
            let mut keys = Decoder::new(row.get_ref(2)?.as_blob()?)?;
            let place = (msg_id.as_bytes(), app.as_bytes());
            while keys.next()? {
                match (keys.msg_id(), keys.app()).cmp(&place) {
                    Ordering::Less => {}
                    Ordering::Equal => return Ok(Some(keys.id)),
                    Ordering::Greater => break,
                }
            }
            Ok(None)
        })
        .optional()?;
    Ok(found.flatten())
}

/// Whether the blocks hold any of `keys`, given as `(app, msg_id)`. Keys that share a block
/// are looked for in one read of it.
pub(super) fn any(conn: &Connection, keys: &mut [(&str, &str)]) -> Result<bool> {
    keys.sort_unstable_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)));
    let mut rest = &keys[..];
    while let Some(&(app, msg_id)) = rest.first() {
        let Some(block) = Block::from(conn, msg_id, app)? else {
            return Ok(false);
        };
        let within = rest.partition_point(|&(app, msg_id)| (msg_id, app) <= block.place());
        let held = Texts::of(&block.body)?;
        let mut held = held.keys().peekable();
        for &(app, msg_id) in &rest[..within] {
            while held.next_if(|key| key.place() < (msg_id, app)).is_some() {}
            if held.peek().is_some_and(|key| key.place() == (msg_id, app)) {
                return Ok(true);
            }
        }
        rest = &rest[within..];
    }
    Ok(false)
}

/// Writes `keys`, sorted by `(msg_id, app)`, into the blocks: a key the blocks hold already
/// takes its new id, as does one given twice (the later one).
pub(super) fn insert(conn: &Connection, keys: &[Key<'_>]) -> Result<()> {
    let mut rest = keys;
    while let Some(first) = rest.first() {
        let Some(block) = Block::from(conn, first.msg_id, first.app)? else {
            // After every block: new blocks at the end of the table.
            return write(conn, None, &merged(std::iter::empty(), rest));
        };
        let within = rest.partition_point(|key| key.place() <= block.place());
        let held = Texts::of(&block.body)?;
        write(conn, Some(&block), &merged(held.keys(), &rest[..within]))?;
        rest = &rest[within..];
    }
    Ok(())
}

/// Removes `keys`, sorted by `(msg_id, app)`, from the blocks: each only where the blocks hold
/// it with the same id (a key merged again since names a newer record). Returns how many were
/// removed.
pub(super) fn remove(conn: &Connection, keys: &[Key<'_>]) -> Result<usize> {
    let mut removed = 0;
    let mut rest = keys;
    while let Some(first) = rest.first() {
        let Some(block) = Block::from(conn, first.msg_id, first.app)? else {
            break;
        };
        let within = rest.partition_point(|key| key.place() <= block.place());
        let gone = &rest[..within];
        let held = Texts::of(&block.body)?;
        let kept: Vec<Key<'_>> = held
            .keys()
            .filter(|key| {
                gone.binary_search_by(|gone| gone.place().cmp(&key.place()))
                    .map_or(true, |at| gone[at].id != key.id)
            })
            .collect();
        if kept.len() < held.len() {
            removed += held.len() - kept.len();
            write(conn, Some(&block), &kept)?;
        }
        rest = &rest[within..];
    }
    Ok(removed)
}

/// Writes into the blocks the keys `select` (a query with `params`) gives as `(msg_id, app,
/// id)` rows, in `(msg_id, app)` order, a few thousand at a time: for migrations, whose
/// tables may be large.
pub(super) fn insert_selected(conn: &Connection, select: &str, params: impl Params) -> Result<()> {
    for_selected(conn, select, params, |keys| insert(conn, keys).map(drop))
}

/// Removes from the blocks the keys `select` gives, as [`insert_selected`] does; returns
/// how many were removed.
pub(super) fn remove_selected(
    conn: &Connection,
    select: &str,
    params: impl Params,
) -> Result<usize> {
    let mut removed = 0;
    for_selected(conn, select, params, |keys| {
        removed += remove(conn, keys)?;
        Ok(())
    })?;
    Ok(removed)
}

/// Gives `write` the keys `select` gives, [`GATHERED_KEYS`] at a time.
fn for_selected(
    conn: &Connection,
    select: &str,
    params: impl Params,
    write: impl FnMut(&[Key<'_>]) -> Result<()>,
) -> Result<()> {
    let mut statement = conn.prepare(select)?;
    let mut rows = statement.query(params)?;
    let mut gathered = Gathered::new(write);
    while let Some(row) = rows.next()? {
        let text = |index| row.get_ref(index).and_then(|value| Ok(value.as_str()?));
        gathered.push(text(1)?, text(0)?, row.get(2)?)?;
    }
    gathered.finish()
}

/// Keys given one at a time, in any order, and given to `write` [`GATHERED_KEYS`] at a time,
/// each batch sorted: for migrations and purges, whose keys come from scans of tables that
/// may be large.
pub(super) struct Gathered<W> {
    texts: Texts,
    write: W,
}

impl<W: FnMut(&[Key<'_>]) -> Result<()>> Gathered<W> {
    pub(super) fn new(write: W) -> Self {
        Self {
            texts: Texts::default(),
            write,
        }
    }

    /// Adds a key; the keys gathered are written once there are [`GATHERED_KEYS`].
    pub(super) fn push(&mut self, app: &str, msg_id: &str, id: i64) -> Result<()> {
        self.texts.push(app, msg_id, id);
        if self.texts.len() >= GATHERED_KEYS {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the keys gathered since the last batch.
    pub(super) fn finish(mut self) -> Result<()> {
        self.flush()
    }

    /// Gives `write` the keys, sorted, and forgets them.
    fn flush(&mut self) -> Result<()> {
        if self.texts.len() == 0 {
            return Ok(());
        }
        let mut keys: Vec<Key<'_>> = self.texts.keys().collect();
        // Stable: of a key given twice, the later stays later.
        keys.sort_by(|a, b| a.place().cmp(&b.place()));
        (self.write)(&keys)?;
        self.texts.clear();
        Ok(())
    }
}

/// The keys of the blocks after the block keyed `after` (from the first, if `None`), up to
/// `blocks` blocks, each given to `each` as `(app, msg_id)`; returns the key of the last block
/// read, `None` once there are no more.
pub(super) fn scan(
    conn: &Connection,
    after: Option<(&str, &str)>,
    blocks: usize,
    mut each: impl FnMut(&str, &str),
) -> rusqlite::Result<Option<(String, String)>> {
    let limit = i64::try_from(blocks).unwrap_or(i64::MAX);
    let mut statement;
    let mut rows = match after {
        None => {
            statement = conn.prepare_cached(
                "SELECT msg_id, app, body FROM message_key_blocks ORDER BY msg_id, app LIMIT ?1",
            )?;
            statement.query(params![limit])?
        }
        Some((msg_id, app)) => {
            statement = conn.prepare_cached(
                "SELECT msg_id, app, body FROM message_key_blocks WHERE (msg_id, app) > (?2, ?3)
                 ORDER BY msg_id, app LIMIT ?1",
            )?;
            statement.query(params![limit, msg_id, app])?
        }
    };
    let mut last = None;
    let mut read = 0;
    while let Some(row) = rows.next()? {
        let mut keys = Decoder::new(row.get_ref(2)?.as_blob()?)?;
        while keys.next()? {
            each(utf8(keys.app())?, utf8(keys.msg_id())?);
        }
        read += 1;
        if read == blocks {
            last = Some((row.get(0)?, row.get(1)?));
        }
    }
    Ok(last)
}

/// The statement that reads the block a key is in, or would be: the first whose last key is
/// not below it (`?1` its `msg_id`, `?2` its app).
const BLOCK_FROM: &str = "SELECT msg_id, app, body FROM message_key_blocks
     WHERE (msg_id, app) >= (?1, ?2) ORDER BY msg_id, app LIMIT 1";

/// A block's row, read out.
#[derive(Debug)]
struct Block {
    /// Its last key's `msg_id` and app: the row's key.
    msg_id: String,
    app: String,
    body: Vec<u8>,
}

impl Block {
    /// The block the key of `msg_id` in `app` is in, or would be; `None` if the key is after
    /// every block.
    fn from(conn: &Connection, msg_id: &str, app: &str) -> Result<Option<Self>> {
        Ok(conn
            .prepare_cached(BLOCK_FROM)?
            .query_row(params![msg_id, app], |row| {
                Ok(Self {
                    msg_id: row.get(0)?,
                    app: row.get(1)?,
                    body: row.get(2)?,
                })
            })
            .optional()?)
    }

    fn place(&self) -> (&str, &str) {
        (&self.msg_id, &self.app)
    }
}

/// `held` (a block's keys) with `new` merged in, both sorted; where both have a key, or `new`
/// has it twice, the last given is kept.
fn merged<'a>(held: impl Iterator<Item = Key<'a>>, new: &[Key<'a>]) -> Vec<Key<'a>> {
    let mut keys: Vec<Key<'a>> = Vec::with_capacity(new.len());
    let mut held = held.peekable();
    for &key in new {
        while let Some(before) = held.next_if(|held| held.place() < key.place()) {
            keys.push(before);
        }
        held.next_if(|held| held.place() == key.place());
        match keys.last_mut() {
            Some(last) if last.place() == key.place() => *last = key,
            _ => keys.push(key),
        }
    }
    keys.extend(held);
    keys
}

/// Writes `keys` as the blocks that replace `block` (`None`: new blocks after every other).
/// They are split into blocks of about even size, none much over [`BLOCK_BYTES`]; every
/// one but the last is a new row, keyed below `block`'s key and above the block's before it.
fn write(conn: &Connection, block: Option<&Block>, keys: &[Key<'_>]) -> Result<()> {
    let Some(last) = keys.last() else {
        if let Some(block) = block {
            conn.prepare_cached("DELETE FROM message_key_blocks WHERE msg_id = ?1 AND app = ?2")?
                .execute(params![block.msg_id, block.app])?;
        }
        return Ok(());
    };
    // The keys encoded once, as one block, each from `starts[i]`: a stretch of them is a block
    // of its own with its first key encoded again, whole rather than against the key before.
    let mut stream = Encoder::default();
    let mut starts = Vec::with_capacity(keys.len() + 1);
    for &key in keys {
        starts.push(stream.body.len());
        stream.push(key);
    }
    starts.push(stream.body.len());
    let bytes = stream.body.len() - 1;
    let pieces = bytes.div_ceil(BLOCK_BYTES).max(1);
    let target = bytes.div_ceil(pieces);
    let piece = |keys_of: Range<usize>| {
        let mut piece = Encoder::default();
        piece.push(keys[keys_of.start]);
        piece
            .body
            .extend_from_slice(&stream.body[starts[keys_of.start + 1]..starts[keys_of.end]]);
        piece.body
    };
    let mut insert = conn.prepare_cached(
        "INSERT INTO message_key_blocks (msg_id, app, keys, body) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut first = 0;
    for _ in 1..pieces {
        // The stretch ends with the key that takes it to the target; the last keeps a key.
        let end = first
            + 1
            + starts[first + 1..keys.len()]
                .partition_point(|&start| start - starts[first] < target);
        if end >= keys.len() {
            break;
        }
        let key = keys[end - 1];
        insert.execute(params![key.msg_id, key.app, end - first, piece(first..end)])?;
        first = end;
    }
    // Unsplit, the stream is the block.
    let count = keys.len() - first;
    let body = if first == 0 {
        stream.body
    } else {
        piece(first..keys.len())
    };
    match block {
        Some(block) if block.place() == last.place() => {
            conn.prepare_cached(
                "UPDATE message_key_blocks SET keys = ?3, body = ?4 WHERE msg_id = ?1 AND app = ?2",
            )?
            .execute(params![last.msg_id, last.app, count, body])?;
        }
        _ => {
            if let Some(block) = block {
                conn.prepare_cached(
                    "DELETE FROM message_key_blocks WHERE msg_id = ?1 AND app = ?2",
                )?
                .execute(params![block.msg_id, block.app])?;
            }
            insert.execute(params![last.msg_id, last.app, count, body])?;
        }
    }
    Ok(())
}

/// Encodes keys, in order, into a block's body: after [`FORMAT`], each key as
///
/// - the length of the `msg_id` it shares with the key before (0 for the first), the length
///   of the rest, and the rest;
/// - the same for its app;
/// - its id, zigzagged (ids of entries are negative);
///
/// every number a LEB128 varint.
#[derive(Debug)]
struct Encoder<'a> {
    body: Vec<u8>,
    last: Option<Key<'a>>,
}

impl Default for Encoder<'_> {
    fn default() -> Self {
        Self {
            body: vec![FORMAT],
            last: None,
        }
    }
}

impl<'a> Encoder<'a> {
    fn push(&mut self, key: Key<'a>) {
        let (msg_id_before, app_before) = self.last.map_or((&[][..], &[][..]), |last| {
            (last.msg_id.as_bytes(), last.app.as_bytes())
        });
        put_front_coded(&mut self.body, msg_id_before, key.msg_id.as_bytes());
        put_front_coded(&mut self.body, app_before, key.app.as_bytes());
        put_varint(&mut self.body, zigzag(key.id));
        self.last = Some(key);
    }
}

fn put_front_coded(body: &mut Vec<u8>, before: &[u8], bytes: &[u8]) {
    let shared = run_order::shared_len(before, bytes);
    put_varint(body, shared as u64);
    put_varint(body, (bytes.len() - shared) as u64);
    body.extend_from_slice(&bytes[shared..]);
}

fn put_varint(body: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        body.push(value as u8 | 0x80);
        value >>= 7;
    }
    body.push(value as u8);
}

fn zigzag(id: i64) -> u64 {
    ((id << 1) ^ (id >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    (value >> 1) as i64 ^ -((value & 1) as i64)
}

/// Reads a block's keys in order, each into buffers of its own, without copying the body.
#[derive(Debug)]
struct Decoder<'b> {
    rest: &'b [u8],
    msg_id: Vec<u8>,
    app: Vec<u8>,
    id: i64,
}

impl<'b> Decoder<'b> {
    fn new(body: &'b [u8]) -> rusqlite::Result<Self> {
        let rest = match body.split_first() {
            Some((&FORMAT, rest)) => rest,
            Some((&format, _)) => return Err(corrupt(Corrupt::Format(format))),
            None => return Err(corrupt(Corrupt::Truncated)),
        };
        Ok(Self {
            rest,
            msg_id: Vec::new(),
            app: Vec::new(),
            id: 0,
        })
    }

    /// Moves to the next key; `false` at the end of the block.
    fn next(&mut self) -> rusqlite::Result<bool> {
        if self.rest.is_empty() {
            return Ok(false);
        }
        front_decoded(&mut self.rest, &mut self.msg_id)?;
        front_decoded(&mut self.rest, &mut self.app)?;
        self.id = unzigzag(varint(&mut self.rest)?);
        Ok(true)
    }

    fn msg_id(&self) -> &[u8] {
        &self.msg_id
    }

    fn app(&self) -> &[u8] {
        &self.app
    }
}

/// Replaces `bytes` (the key before's) with the front-coded bytes at the start of `rest`.
fn front_decoded(rest: &mut &[u8], bytes: &mut Vec<u8>) -> rusqlite::Result<()> {
    let shared = usize::try_from(varint(rest)?).map_err(|_| corrupt(Corrupt::Truncated))?;
    let len = usize::try_from(varint(rest)?).map_err(|_| corrupt(Corrupt::Truncated))?;
    if shared > bytes.len() || len > rest.len() {
        return Err(corrupt(Corrupt::Truncated));
    }
    let (own, after) = rest.split_at(len);
    bytes.truncate(shared);
    bytes.extend_from_slice(own);
    *rest = after;
    Ok(())
}

fn varint(rest: &mut &[u8]) -> rusqlite::Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, after) = rest
            .split_first()
            .ok_or_else(|| corrupt(Corrupt::Truncated))?;
        *rest = after;
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok(value);
        }
    }
    Err(corrupt(Corrupt::Truncated))
}

/// A key's text as a block holds it.
fn utf8(bytes: &[u8]) -> rusqlite::Result<&str> {
    std::str::from_utf8(bytes).map_err(|_| corrupt(Corrupt::NotUtf8))
}

/// Keys held apart from where they came from: their texts one after the other in one string.
#[derive(Debug, Default)]
struct Texts {
    text: String,
    /// Each key's `msg_id` and app in `text`, and its id.
    keys: Vec<(Range<usize>, Range<usize>, i64)>,
}

impl Texts {
    /// A block's keys, decoded whole.
    fn of(body: &[u8]) -> rusqlite::Result<Self> {
        let mut keys = Decoder::new(body)?;
        let mut texts = Self::default();
        while keys.next()? {
            texts.push(utf8(keys.app())?, utf8(keys.msg_id())?, keys.id);
        }
        Ok(texts)
    }

    fn push(&mut self, app: &str, msg_id: &str, id: i64) {
        let start = self.text.len();
        self.text.push_str(msg_id);
        let msg_id_end = self.text.len();
        self.text.push_str(app);
        self.keys
            .push((start..msg_id_end, msg_id_end..self.text.len(), id));
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn clear(&mut self) {
        self.text.clear();
        self.keys.clear();
    }

    fn keys(&self) -> impl Iterator<Item = Key<'_>> {
        self.keys.iter().map(|(msg_id, app, id)| Key {
            msg_id: &self.text[msg_id.clone()],
            app: &self.text[app.clone()],
            id: *id,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The model the blocks must agree with: id by `(msg_id, app)`.
    type Model = BTreeMap<(String, String), i64>;

    fn database() -> Connection {
        let conn = Connection::open_in_memory().expect("database");
        create(&conn).expect("table");
        conn
    }

    /// Every key the blocks hold, in order, as `(msg_id, app)` and id.
    fn scanned(conn: &Connection) -> Vec<((String, String), i64)> {
        let mut all = Vec::new();
        let mut after: Option<(String, String)> = None;
        loop {
            let mut chunk = Vec::new();
            let last = scan(
                conn,
                after
                    .as_ref()
                    .map(|(msg_id, app)| (msg_id.as_str(), app.as_str())),
                3,
                |app, msg_id| chunk.push((msg_id.to_owned(), app.to_owned())),
            )
            .expect("scanned");
            for key in chunk {
                let id = find(conn, &key.1, &key.0).expect("found").expect("held");
                all.push((key, id));
            }
            match last {
                Some(last) => after = Some(last),
                None => return all,
            }
        }
    }

    /// Each block's keys count and body size.
    fn blocks(conn: &Connection) -> Vec<(i64, usize)> {
        conn.prepare("SELECT keys, length(body) FROM message_key_blocks ORDER BY msg_id, app")
            .and_then(|mut select| {
                select
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect()
            })
            .expect("blocks")
    }

    /// The keys `(msg_id, app, id)`, sorted as the blocks take them.
    fn sorted(keys: &[(String, String, i64)]) -> Vec<Key<'_>> {
        let mut keys: Vec<Key<'_>> = keys
            .iter()
            .map(|(msg_id, app, id)| Key {
                msg_id,
                app,
                id: *id,
            })
            .collect();
        keys.sort_by(|a, b| a.place().cmp(&b.place()));
        keys
    }

    /// A small deterministic generator, so that a failure can be run again.
    struct Random(u64);

    impl Random {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A `msg_id` of one of the shapes backends send: senders counting up in ranges of their
    /// own (not padded), random hex, or text with characters of several bytes.
    fn msg_id(random: &mut Random) -> String {
        match random.below(3) {
            0 => format!("b18eed9082de-{}-{}", random.below(8), random.below(5_000)),
            1 => format!(
                "{:016x}{:08x}",
                random.below(u64::MAX),
                random.below(1 << 32)
            ),
            _ => format!(
                "é-{}-ü{}",
                random.below(300),
                "ß".repeat(random.below(4) as usize)
            ),
        }
    }

    /// Inserts and removals in slices, keys landing before, among and after those held,
    /// agree with a map at every step: every key found with its latest id, none other, in
    /// order, and blocks near their size.
    #[test]
    fn the_blocks_hold_what_a_map_would() {
        let conn = database();
        let mut model = Model::new();
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        for round in 0..60 {
            let batch: Vec<(String, String, i64)> = (0..random.below(400) + 1)
                .map(|_| {
                    let app = ["shop", "blog", "b"][random.below(3) as usize];
                    (
                        msg_id(&mut random),
                        app.to_owned(),
                        random.below(1_000_000) as i64 - 500_000,
                    )
                })
                .collect();
            if round % 3 == 2 {
                // Removals: of a quarter of the keys held, half name the id held, half
                // another; and keys never held.
                let mut gone = batch;
                for ((msg_id, app), &id) in &model {
                    if random.below(4) == 0 {
                        let id = if random.below(2) == 0 { id } else { id + 1 };
                        gone.push((msg_id.clone(), app.clone(), id));
                    }
                }
                let expected = gone
                    .iter()
                    .filter(|(msg_id, app, id)| {
                        model.get(&(msg_id.clone(), app.clone())) == Some(id)
                    })
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
                let removed = remove(&conn, &sorted(&gone)).expect("removed");
                assert_eq!(removed, expected, "round {round}");
                for (msg_id, app, id) in &gone {
                    let key = (msg_id.clone(), app.clone());
                    if model.get(&key) == Some(id) {
                        model.remove(&key);
                    }
                }
            } else {
                insert(&conn, &sorted(&batch)).expect("inserted");
                for (msg_id, app, id) in batch {
                    model.insert((msg_id, app), id);
                }
            }
            let held = scanned(&conn);
            let expected: Vec<((String, String), i64)> = model.clone().into_iter().collect();
            assert_eq!(held, expected, "round {round}");
            for (keys, bytes) in blocks(&conn) {
                assert!(
                    keys > 0 && bytes <= 2 * BLOCK_BYTES,
                    "{keys} keys, {bytes} bytes"
                );
            }
        }
        assert!(blocks(&conn).len() > 10, "many blocks: {:?}", blocks(&conn));
        for n in 0..200 {
            let msg_id = format!("never-{n}");
            assert_eq!(find(&conn, "shop", &msg_id).expect("looked up"), None);
        }
    }

    /// Keys that count up, merged a run at a time as a gateway's senders send them, fill
    /// their blocks: the blocks' size is near what they are kept at.
    #[test]
    fn keys_counting_up_fill_their_blocks() {
        let conn = database();
        for run in 0..8 {
            let keys: Vec<(String, String, i64)> = (0..4_000)
                .map(|n| {
                    let sender = n % 8;
                    let seq = run * 500 + n / 8;
                    (
                        format!("b18eed9082de0cbfa-{sender}-{seq}"),
                        "default".into(),
                        seq,
                    )
                })
                .collect();
            insert(&conn, &sorted(&keys)).expect("inserted");
        }
        let blocks = blocks(&conn);
        let keys: i64 = blocks.iter().map(|&(keys, _)| keys).sum();
        let bytes: usize = blocks.iter().map(|&(_, bytes)| bytes).sum();
        assert_eq!(keys, 32_000);
        assert!(
            bytes / blocks.len() > BLOCK_BYTES / 2,
            "{} blocks, {bytes} bytes",
            blocks.len()
        );
        assert!(
            keys / blocks.len() as i64 > 40,
            "{} keys a block",
            keys / blocks.len() as i64
        );
    }

    /// A key longer than a block is a block of its own, and keys around it are found.
    #[test]
    fn a_key_longer_than_a_block_is_held_too() {
        let conn = database();
        let long = "x".repeat(3 * BLOCK_BYTES);
        let keys = [
            ("w".to_owned(), "shop".to_owned(), 1),
            (long.clone(), "shop".to_owned(), -2),
            ("y".to_owned(), "shop".to_owned(), 3),
            (String::new(), "shop".to_owned(), 4),
        ];
        insert(&conn, &sorted(&keys)).expect("inserted");
        for (msg_id, app, id) in &keys {
            assert_eq!(find(&conn, app, msg_id).expect("looked up"), Some(*id));
        }
        assert_eq!(find(&conn, "blog", &long).expect("looked up"), None);
    }

    /// Keys are looked for in a block at a time, whatever their order, and only an exact
    /// match is found: not another app's key, nor one that begins like it.
    #[test]
    fn any_finds_only_a_key_held() {
        let conn = database();
        let keys: Vec<(String, String, i64)> = (0..2_000)
            .map(|n| (format!("m-{n}"), "shop".into(), n))
            .collect();
        insert(&conn, &sorted(&keys)).expect("inserted");
        let mut absent = vec![
            ("blog", "m-7"),
            ("shop", "m-"),
            ("shop", "m-20000"),
            ("shop", "z"),
        ];
        assert!(!any(&conn, &mut absent).expect("looked up"));
        for held in ["m-0", "m-1999", "m-999"] {
            let mut some = absent.clone();
            some.insert(1, ("shop", held));
            assert!(any(&conn, &mut some).expect("looked up"), "{held}");
        }
        assert!(!any(&conn, &mut []).expect("looked up"));
    }

    /// A block that was not written here is an error, not a panic nor a key.
    #[test]
    fn a_block_that_cannot_be_read_is_an_error() {
        let conn = database();
        let key = Key {
            msg_id: "a",
            app: "shop",
            id: 1,
        };
        let not_utf8 = [FORMAT, 0, 1, 0xff, 0, 0, 0];
        for body in [&b""[..], &[9, 0, 1, b'a'], &[FORMAT, 0, 5, b'a'], &not_utf8] {
            conn.execute("DELETE FROM message_key_blocks", [])
                .expect("emptied");
            conn.execute(
                "INSERT INTO message_key_blocks (msg_id, app, keys, body)
                 VALUES ('z', 'shop', 1, ?1)",
                [body],
            )
            .expect("block");
            // A look-up compares bytes, and a key that is not UTF-8 is none it looks for.
            if body != not_utf8 {
                assert!(find(&conn, "shop", "a").is_err(), "{body:?}");
            }
            assert!(insert(&conn, &[key]).is_err(), "{body:?}");
            assert!(remove(&conn, &[key]).is_err(), "{body:?}");
            assert!(scan(&conn, None, 1, |_, _| {}).is_err(), "{body:?}");
        }
    }

    /// Keys selected from a table in no order, more than a batch gathers, are written batch
    /// by batch, each sorted; removed the same way, they are all gone.
    #[test]
    fn selected_keys_are_written_and_removed_a_batch_at_a_time() {
        let conn = database();
        conn.execute_batch("CREATE TABLE selected (msg_id TEXT, app TEXT, id INTEGER)")
            .expect("table");
        let count = 2 * GATHERED_KEYS + 17;
        for n in 0..count {
            // Ids in an order unrelated to the keys'.
            let id = (n * 7919 % count) as i64;
            conn.execute(
                "INSERT INTO selected VALUES (?1, 'shop', ?2)",
                params![format!("m-{n}"), id],
            )
            .expect("row");
        }
        let select = "SELECT msg_id, app, id FROM selected ORDER BY id";
        insert_selected(&conn, select, []).expect("inserted");
        for n in 0..count {
            let id = (n * 7919 % count) as i64;
            let found = find(&conn, "shop", &format!("m-{n}")).expect("looked up");
            assert_eq!(found, Some(id), "m-{n}");
        }
        assert_eq!(remove_selected(&conn, select, []).expect("removed"), count);
        assert!(blocks(&conn).is_empty());
    }

    #[test]
    fn ids_are_zigzagged_both_ways() {
        for id in [0, 1, -1, 63, -64, i64::MAX, i64::MIN, 1 << 40, -(1 << 40)] {
            let mut body = Vec::new();
            put_varint(&mut body, zigzag(id));
            let mut rest = &body[..];
            assert_eq!(unzigzag(varint(&mut rest).expect("read")), id);
            assert!(rest.is_empty());
        }
    }
}
