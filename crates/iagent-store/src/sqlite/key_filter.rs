//! A filter in memory of the merged dedup keys, so that a new `msg_id` is not looked up
//! there: the filter says of nearly every key the table does not have that it cannot have it.
//!
//! Every record a batch appends is assumed new and its key looked up among the merged keys
//! before the batch commits ([`super::dedup::Assumed`]); a key the filter rules out is not.
//! The look-ups are B-tree descents all over the table: skipping them all (a throwaway that
//! assumed every key absent) did 1.11x the round trips at saturation (`BENCHMARKS.md`).
//!
//! It is a Bloom filter, so a key in the table is never ruled out, and one that is not is
//! taken for present (and looked up) about once in a hundred at ten bits a key. Each key
//! sets bits in one block of 512, a cache line, so that a probe misses the caches once.
//!
//! What it must hold is every key the table holds. It is built by reading the whole table on
//! a thread of its own with a connection of its own, a chunk per read transaction, so that
//! neither the writer nor the checkpoints wait for it; meanwhile the hash of every key a merge
//! writes is kept, and put in once the bits read are taken, and until then every key is looked
//! up as before. (A build during which more keys are merged than the filter has words is
//! given up, and begun again after as many keys again.) A key the table had when the build
//! began is read by its chunk; one written after is added (the keys of the run being merged
//! when it began, some of them perhaps written in a transaction not committed yet, are added
//! at once). Keys removed from the table stay in the filter, and merged keys keep coming: once
//! it holds as many keys as it has room for (at [`BITS_PER_KEY`]), the filter is built again,
//! and the keys purged since leave it. A table with more keys than that is read again only
//! after as many keys as it had are merged, a key read per key merged; the filter then rules
//! out fewer keys, never wrongly. The table is read a chunk of blocks at a time, each block
//! decoded ([`super::key_blocks::scan`]).

use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::thread;

use rusqlite::{Connection, OpenFlags};

use super::key_blocks;

/// The filter's size, by default, in MiB: about 6.7 million keys at ten bits each, with one
/// key in a hundred or so of those not in the table taken for present. More keys than that
/// make it rule out fewer (at twice as many, about one in ten is looked up), never wrongly.
pub const DEFAULT_DEDUP_FILTER_MIB: usize = 8;

/// The keys the filter has room for: bits per key, at which about one key in a hundred not in
/// the table is let through.
const BITS_PER_KEY: usize = 10;

/// The least keys added between two builds, so that a build that failed is not tried again at
/// once.
const MIN_REBUILD_KEYS: usize = 65_536;

/// How many blocks of keys (some tens of keys each) one read transaction of a build takes: a
/// transaction that stayed open for the whole table would keep the checkpointer from
/// starting the WAL over meanwhile.
const SCAN_CHUNK_BLOCKS: usize = 512;

/// A block: 512 bits, a cache line.
const BLOCK_WORDS: usize = 8;

/// Bits set for a key in its block. With ten bits a key, six make the fewest false positives.
const PROBES: usize = 6;

/// The bits of the filter.
struct Bits {
    words: Vec<u64>,
}

/// Its size, not its megabytes of bits.
impl std::fmt::Debug for Bits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bits")
            .field("words", &self.words.len())
            .finish()
    }
}

impl Bits {
    /// No key, in `mib` MiB (at least a block).
    fn new(mib: usize) -> Self {
        Self::of_blocks(mib.saturating_mul(1 << 20) / (BLOCK_WORDS * 8))
    }

    fn of_blocks(blocks: usize) -> Self {
        Self {
            words: vec![0; blocks.max(1) * BLOCK_WORDS],
        }
    }

    /// The first word of the key's block, and its bits there, as positions in the block.
    fn place(&self, hash: u64) -> (usize, [usize; PROBES]) {
        let blocks = self.words.len() / BLOCK_WORDS;
        // The block by the hash's high bits, spread over the blocks without a division.
        let block = ((u128::from(hash) * blocks as u128) >> 64) as usize;
        // The bits by its others, mixed, nine bits a position.
        let mixed = (hash ^ (hash >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let positions = std::array::from_fn(|probe| ((mixed >> (9 * probe)) & 511) as usize);
        (block * BLOCK_WORDS, positions)
    }

    fn insert(&mut self, hash: u64) {
        let (block, positions) = self.place(hash);
        for position in positions {
            self.words[block + position / 64] |= 1 << (position % 64);
        }
    }

    fn may_have(&self, hash: u64) -> bool {
        let (block, positions) = self.place(hash);
        positions
            .iter()
            .all(|&position| self.words[block + position / 64] & (1 << (position % 64)) != 0)
    }
}

/// A build under way.
#[derive(Debug)]
struct Build {
    /// The hashes of the keys merged since it began.
    added: Vec<u64>,
    /// The bits of the keys read, and how many, once the reading thread is done (`None` if it
    /// stopped because the build was given up).
    read: mpsc::Receiver<rusqlite::Result<Option<(Bits, usize)>>>,
    /// Tells the reading thread to stop: the build was given up.
    cancel: Arc<AtomicBool>,
}

/// The filter of the merged keys (see the module's documentation).
#[derive(Debug)]
pub(super) struct KeyFilter {
    /// The database the builds read.
    path: PathBuf,
    /// The filter's size; 0 turns it off.
    mib: usize,
    /// The keys it has room for.
    capacity: usize,
    /// Seeded per process: the filter is built afresh by each.
    hasher: foldhash::fast::RandomState,
    /// Every key the table has, once the first build is done.
    built: Option<Bits>,
    build: Option<Build>,
    /// Keys added since the last build began.
    added: usize,
    /// Keys the last build read.
    read: usize,
}

impl KeyFilter {
    /// A filter of `mib` MiB of the keys in the database at `path`, not built yet: until it is,
    /// every key may be there. Its first build begins with [`KeyFilter::begin_build`].
    pub(super) fn new(path: &Path, mib: usize) -> Self {
        Self {
            path: path.to_owned(),
            mib,
            capacity: mib.saturating_mul(8 << 20) / BITS_PER_KEY,
            hasher: foldhash::fast::RandomState::default(),
            built: None,
            build: None,
            added: 0,
            read: 0,
        }
    }

    fn hash(&self, app: &str, msg_id: &str) -> u64 {
        self.hasher.hash_one((app, msg_id))
    }

    /// Whether the key may be merged: `false` only if it is not.
    pub(super) fn may_have(&self, app: &str, msg_id: &str) -> bool {
        self.built
            .as_ref()
            .is_none_or(|bits| bits.may_have(self.hash(app, msg_id)))
    }

    /// Adds a key merged (in a transaction that may yet roll back: the
    /// filter then holds a key the table has not, which costs a look-up).
    pub(super) fn add(&mut self, app: &str, msg_id: &str) {
        if self.mib == 0 {
            return;
        }
        let hash = self.hash(app, msg_id);
        if let Some(bits) = &mut self.built {
            bits.insert(hash);
        }
        self.added += 1;
        let words = self.mib.saturating_mul(1 << 20) / 8;
        if let Some(build) = &mut self.build {
            build.added.push(hash);
            if build.added.len() > words {
                tracing::warn!("dedup key filter build given up: keys came faster than it read");
                self.build = None;
                self.added = 0;
            }
        }
    }

    /// Whether the filter should be built again (none is under way): it is full, and at least
    /// as many keys were added since the last build began as it read; or the last build
    /// failed, and [`MIN_REBUILD_KEYS`] were added since.
    pub(super) fn build_due(&self) -> bool {
        if self.mib == 0 || self.build.is_some() {
            return false;
        }
        if self.built.is_none() {
            return self.added >= MIN_REBUILD_KEYS;
        }
        self.read + self.added >= self.capacity && self.added >= self.read.max(MIN_REBUILD_KEYS)
    }

    /// Begins a build. `pending` are keys that may be written into the table but not
    /// committed yet (the run being merged): a build reads only what is committed.
    pub(super) fn begin_build<'a>(&mut self, pending: impl Iterator<Item = (&'a str, &'a str)>) {
        if self.mib == 0 || self.build.is_some() {
            return;
        }
        let added = pending
            .map(|(app, msg_id)| self.hash(app, msg_id))
            .collect();
        let (done, read) = mpsc::sync_channel(1);
        let cancel = Arc::new(AtomicBool::new(false));
        let reading = (
            self.path.clone(),
            self.mib,
            self.hasher,
            Arc::clone(&cancel),
        );
        let spawned = thread::Builder::new()
            .name("iagent-key-filter".into())
            .spawn(move || {
                let (path, mib, hasher, cancel) = reading;
                // The store may be gone, and nobody left to take the bits.
                done.send(read_keys(&path, mib, &hasher, &cancel)).ok();
            });
        match spawned {
            Ok(_) => {
                self.build = Some(Build {
                    added,
                    read,
                    cancel,
                });
                self.added = 0;
            }
            Err(err) => {
                tracing::warn!(error = %err, "dedup key filter not built; keys are looked up");
                self.added = 0;
            }
        }
    }

    /// Takes the build's bits if it is done: the filter then rules keys out. A build that
    /// failed leaves the filter as it was, and the next begins once as many keys again are
    /// added.
    pub(super) fn poll(&mut self) {
        let Some(build) = &self.build else {
            return;
        };
        let outcome = match build.read.try_recv() {
            Err(TryRecvError::Empty) => return,
            Ok(outcome) => outcome,
            Err(TryRecvError::Disconnected) => Ok(None),
        };
        let Some(build) = self.build.take() else {
            return;
        };
        match outcome {
            Ok(Some((mut bits, read))) => {
                for &hash in &build.added {
                    bits.insert(hash);
                }
                self.built = Some(bits);
                self.read = read;
            }
            Ok(None) => tracing::warn!("dedup key filter not built: its reading thread stopped"),
            Err(err) => {
                tracing::warn!(error = %err, "dedup key filter not built; keys are looked up");
            }
        }
    }
}

#[cfg(test)]
impl KeyFilter {
    /// Polls until the build under way is done.
    pub(super) fn wait_built(&mut self) {
        let started = std::time::Instant::now();
        while self.build.is_some() {
            assert!(started.elapsed().as_secs() < 20, "not built");
            thread::sleep(std::time::Duration::from_millis(5));
            self.poll();
        }
    }
}

/// A build given up, or whose filter is gone, stops reading.
impl Drop for Build {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

/// The bits of every key in `message_key_blocks` of the database at `path`, and how many,
/// unless `cancel` stops it: read in key order, a chunk of blocks per statement, each after
/// the last block of the one before.
fn read_keys(
    path: &Path,
    mib: usize,
    hasher: &foldhash::fast::RandomState,
    cancel: &AtomicBool,
) -> rusqlite::Result<Option<(Bits, usize)>> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut bits = Bits::new(mib);
    let mut read = 0;
    // The key of the last block read, which the next chunk begins after.
    let mut after: Option<(String, String)> = None;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let last_read = key_blocks::scan(
            &conn,
            after
                .as_ref()
                .map(|(msg_id, app)| (msg_id.as_str(), app.as_str())),
            SCAN_CHUNK_BLOCKS,
            |app, msg_id| {
                bits.insert(hasher.hash_one((app, msg_id)));
                read += 1;
            },
        )?;
        match last_read {
            Some(last) => after = Some(last),
            None => return Ok(Some((bits, read))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database at `path` whose merged keys are `keys`.
    fn table_of(path: &Path, keys: &[(String, String)]) -> Connection {
        let conn = Connection::open(path).expect("database");
        conn.execute_batch("PRAGMA journal_mode = WAL;")
            .expect("WAL");
        key_blocks::create(&conn).expect("table");
        conn.execute_batch("BEGIN").expect("transaction");
        let mut keys: Vec<key_blocks::Key<'_>> = keys
            .iter()
            .map(|(app, msg_id)| key_blocks::Key { msg_id, app, id: 1 })
            .collect();
        keys.sort_by(|a, b| (a.msg_id, a.app).cmp(&(b.msg_id, b.app)));
        key_blocks::insert(&conn, &keys).expect("keys");
        conn.execute_batch("COMMIT").expect("committed");
        conn
    }

    /// Writes a key into the table, as a merge does.
    fn merge(conn: &Connection, app: &str, msg_id: &str) {
        key_blocks::insert(conn, &[key_blocks::Key { msg_id, app, id: 1 }]).expect("key");
    }

    /// The build reads every key of the table, in chunks of blocks; the keys the run had
    /// pending and those added while it read are in it too; keys neither there nor added are
    /// nearly all ruled out.
    #[test]
    fn a_build_holds_every_key_of_the_table_and_every_key_added_meanwhile() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.sqlite3");
        let mut keys = vec![("shop".to_owned(), "a".to_owned())];
        // Enough keys for several chunks of blocks.
        for n in 0..60_000 {
            for app in ["blog", "shop"] {
                keys.push((app.to_owned(), format!("m-{n:05}")));
            }
        }
        let _conn = table_of(&path, &keys);
        let mut filter = KeyFilter::new(&path, 1);
        assert!(
            filter.may_have("shop", "anything"),
            "not built: every key may be there"
        );
        filter.begin_build([("shop", "pending")].into_iter());
        filter.add("blog", "added");
        filter.wait_built();
        filter.add("shop", "added after");
        for (app, msg_id) in &keys {
            assert!(filter.may_have(app, msg_id), "{app} {msg_id}");
        }
        for (app, msg_id) in [
            ("shop", "pending"),
            ("blog", "added"),
            ("shop", "added after"),
        ] {
            assert!(filter.may_have(app, msg_id), "{app} {msg_id}");
        }
        assert_eq!(filter.read, keys.len());
        let let_through = (0..10_000)
            .filter(|n| filter.may_have("shop", &format!("new-{n}")))
            .count();
        assert!(let_through < 100, "{let_through} of 10 000 let through");
    }

    /// Once the filter holds as many keys as it has room for, another build is due, and with
    /// it the keys removed from the table leave the filter.
    #[test]
    fn the_filter_is_built_again_once_full() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("keys.sqlite3");
        let conn = table_of(&path, &[("shop".to_owned(), "gone".to_owned())]);
        let mut filter = KeyFilter::new(&path, 1);
        // Room for the key read and as many as a build that failed waits for.
        filter.capacity = 1 + MIN_REBUILD_KEYS;
        filter.begin_build(std::iter::empty());
        filter.wait_built();
        assert!(filter.may_have("shop", "gone"));
        conn.execute_batch("DELETE FROM message_key_blocks; BEGIN")
            .expect("purged");
        for n in 0..MIN_REBUILD_KEYS {
            assert!(!filter.build_due(), "at {n}");
            let msg_id = format!("merged-{n}");
            merge(&conn, "shop", &msg_id);
            filter.add("shop", &msg_id);
        }
        conn.execute_batch("COMMIT").expect("committed");
        assert!(filter.build_due());
        filter.begin_build(std::iter::empty());
        filter.wait_built();
        assert!(!filter.may_have("shop", "gone"));
        assert!(filter.may_have("shop", "merged-0"));
    }

    #[test]
    fn a_key_added_is_never_ruled_out_and_few_others_are_let_through() {
        let hasher = foldhash::fast::RandomState::default();
        // 100 000 keys in a million bits: ten bits a key.
        let mut bits = Bits::of_blocks(1_000_000 / 512);
        let key = |n: usize| hasher.hash_one(("shop", format!("m-{n}").as_str()));
        for n in 0..100_000 {
            bits.insert(key(n));
        }
        assert!((0..100_000).all(|n| bits.may_have(key(n))));
        let let_through = (100_000..200_000)
            .filter(|&n| bits.may_have(key(n)))
            .count();
        assert!(let_through < 3_000, "{let_through} of 100 000 let through");
    }
}
