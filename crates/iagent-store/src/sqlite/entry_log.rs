//! The entry log: where a batch that only appends history entries is made durable, with one
//! `write` of its entries to a file of its own instead of a transaction of SQLite's.
//!
//! At 10 000 messages/s a batch holds a message or two, and SQLite's transaction was most of
//! what the store cost a message: its locks on the WAL index (six `fcntl`s), its WAL frames
//! (whole pages, written with their checksums), the look-ups of a B-tree's root. A batch whose
//! jobs only append entries (the echo's records, see [`super::writer`]) writes them here
//! instead, and its callers are answered once the `write` is made; the entries stay in
//! memory ([`Pending`]), where reads find them, until enough have gathered to fill chunks, and
//! are then written into `history_chunks` in one transaction for many batches, after which
//! the log is emptied. Every transaction begins with that write (see
//! [`super::writer::begin`]): while SQLite's transaction is open, the log is empty, so a
//! rollback never takes an entry already answered, and the tails read back from SQLite after
//! one are whole.
//!
//! The log is two files ([`ENTRY_LOG_FILES`]). When the one frames go to is full, the writer
//! thread writes its entries into SQLite on a connection of its own, without the database
//! (the tails, the entries in memory, the serving connection) in hand, while batches go on
//! into the other file; once that transaction commits, the full file is emptied, and the two
//! change places when the other fills. With one file, every batch that came during that
//! write was handed to the writer thread and waited for it (about 0.3 ms at 64 KiB, over 1 ms
//! at 256 KiB); at 10 000 messages/s two files took the jobs handed over from about 4 000 to
//! 2 800 in a 12 s run (`BENCHMARKS.md`).
//!
//! The log survives what a commit does (see [`super::Durability`]): the process being
//! killed, since the `write` is in the operating system's hands once it returns; and, with
//! [`super::Durability::Power`], a power loss, since each `write` is then followed by
//! `fdatasync`, as SQLite syncs each commit then. At start-up the serving store reads the log
//! back and writes its entries into `history_chunks` before it reads the tails, dropping
//! those a transaction committed before the log was emptied, and a frame that was being
//! written when the process stopped.
//!
//! A frame is a batch's entries: their length (4 bytes) and checksum (8 bytes), little endian,
//! then the entries as [`Pending`] lays them out.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Read, Write};
use std::path::Path;

use rusqlite::Connection;

use super::chunks::Pending;
use crate::{Durability, Result, StoreError};

/// The files the entry log is kept in, inside the data directory. Batches go to one of them
/// while the entries of the other, which filled, are written into SQLite by the writer thread
/// with the database let go; then the two change places.
pub const ENTRY_LOG_FILES: [&str; 2] = ["iagent.entries", "iagent.entries.2"];

/// How many KiB of entries, by default, each file of the log holds before they are written
/// into `history_chunks`: about 260 echoes of short texts (eight chunks). That write is one
/// transaction for all of them instead of one a batch. While it ran with the database in
/// hand, it held up the batches behind it for its length: at 256 KiB, 1.0 to 1.6 ms each
/// time (its commit about 0.7 ms), which at 10 000 messages/s delayed a message or ten every
/// tenth of a second; a quarter of it took about a quarter as long (rarely over 0.4 ms). At
/// 16 KiB the CPU per message was 1.04x, four pairs.
pub const DEFAULT_ENTRY_LOG_KIB: usize = 64;

/// The bytes before a frame's entries: their length and their checksum.
const FRAME_HEADER: usize = 12;

/// The `store_meta` key of the last entry written into SQLite from the log: the entries up to
/// it that the log still holds (it is emptied after the transaction that wrote them commits)
/// are not written again.
const APPLIED_KEY: &str = "entry_log_through";

/// Opens the log in `data_dir` and writes the entries its files hold that SQLite lacks into
/// `history_chunks`, in the transaction open on `conn`; once that commits, the log is to be
/// emptied ([`EntryLog::emptied`]).
pub(super) fn recover(
    conn: &Connection,
    data_dir: &Path,
    durability: Durability,
) -> Result<EntryLog> {
    let sync = durability == Durability::Power;
    let (log, mut pending) = EntryLog::open(data_dir, sync)?;
    pending.drop_through(super::meta(conn, APPLIED_KEY)?.unwrap_or(0));
    if !pending.is_empty() {
        tracing::info!(
            entries = pending.len(),
            "history entries read back from the entry log"
        );
        pending.write_kept(conn)?;
        set_applied(conn, &pending)?;
    }
    Ok(log)
}

/// Notes, in the open transaction, that the entries of `pending` are written into SQLite.
pub(super) fn set_applied(conn: &Connection, pending: &Pending) -> Result<()> {
    match pending.last_id() {
        Some(last) => super::set_meta(conn, APPLIED_KEY, last),
        None => Ok(()),
    }
}

/// The log's two files, one of which takes the batches' frames.
#[derive(Debug)]
pub(super) struct EntryLog {
    files: [LogFile; 2],
    /// The index in `files` of the one frames are written to; the other is empty, or holds
    /// entries being written into SQLite.
    current: usize,
    /// Whether each frame is synced to the disk before it counts as written.
    sync: bool,
}

/// One of the log's files.
#[derive(Debug)]
struct LogFile {
    file: File,
    /// The file's length: where the next frame goes, and where a failed write is cut back to.
    len: u64,
}

impl EntryLog {
    /// Opens the log's files in `data_dir`, creating them if missing, and reads back the
    /// entries they hold, oldest first: in each, those of every whole frame up to the first
    /// that is not (the one being written when the process stopped: it was answered to
    /// nobody). Frames are written to the first file from now on.
    pub(super) fn open(data_dir: &Path, sync: bool) -> Result<(Self, Pending)> {
        let [first, second] = ENTRY_LOG_FILES.map(|name| open_file(&data_dir.join(name)));
        let ((first, first_entries), (second, second_entries)) = (first?, second?);
        // Both files hold entries only if the process stopped while one was being written
        // into SQLite; its entries are older than the other's.
        let second_is_older = matches!(
            (first_entries.first_id(), second_entries.first_id()),
            (Some(first), Some(second)) if second < first
        );
        let (mut older, newer) = if second_is_older {
            (second_entries, first_entries)
        } else {
            (first_entries, second_entries)
        };
        older.extend(newer);
        let log = Self {
            files: [first, second],
            current: 0,
            sync,
        };
        Ok((log, older))
    }

    /// Writes a frame of `entries` (encoded as [`Pending`] holds them) at the end of the
    /// current file, with one `write` of the header and the entries where they are. A frame
    /// that fails is cut off again, if it can be; the log is of no further use either way (a
    /// disk that failed one write fails the next), and is read back up to it.
    pub(super) fn append(&mut self, entries: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(entries.len())
            .map_err(|_| std::io::Error::other("a batch's entries exceed 4 GiB"))?;
        let mut header = [0; FRAME_HEADER];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4..].copy_from_slice(&checksum(entries).to_le_bytes());
        let log = &mut self.files[self.current];
        let written = write_both(&mut log.file, &header, entries).and_then(|()| {
            if self.sync {
                log.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                log.len += (FRAME_HEADER + entries.len()) as u64;
                Ok(())
            }
            Err(err) => {
                log.file.set_len(log.len).ok();
                Err(err)
            }
        }
    }

    /// Frames go to the other file from now on, which must be empty: the current one holds
    /// the entries to be written into SQLite, and is emptied once they are
    /// ([`EntryLog::clear_previous`]).
    pub(super) fn rotate(&mut self) {
        debug_assert_eq!(
            self.files[1 - self.current].len,
            0,
            "the other file is empty"
        );
        self.current = 1 - self.current;
    }

    /// A log that writes to `file` from its start, as if it were empty (both its files):
    /// for tests of what a failing write does.
    #[cfg(test)]
    pub(super) fn writing_to(file: File) -> std::io::Result<Self> {
        let second = file.try_clone()?;
        Ok(Self {
            files: [file, second].map(|file| LogFile { file, len: 0 }),
            current: 0,
            sync: false,
        })
    }

    /// The log, emptied: what it held is committed.
    pub(super) fn emptied(mut self) -> std::io::Result<Self> {
        self.clear()?;
        Ok(self)
    }

    /// Empties the log: every entry it held is in `history_chunks`, committed.
    pub(super) fn clear(&mut self) -> std::io::Result<()> {
        self.clear_previous()?;
        self.files[self.current].clear()
    }

    /// Empties the file frames went to before the last [`EntryLog::rotate`]: its entries are
    /// in `history_chunks`, committed.
    pub(super) fn clear_previous(&mut self) -> std::io::Result<()> {
        self.files[1 - self.current].clear()
    }
}

impl LogFile {
    fn clear(&mut self) -> std::io::Result<()> {
        if self.len > 0 {
            self.file.set_len(0)?;
            self.len = 0;
        }
        Ok(())
    }
}

/// Opens the log file at `path`, creating it if missing, and reads back the entries of its
/// whole frames.
fn open_file(path: &Path) -> Result<(LogFile, Pending)> {
    let failed = |source| StoreError::DataDir {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(failed)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(failed)?;
    let (entries, whole) = read_frames(&bytes);
    if whole < bytes.len() {
        tracing::warn!(
            file = %path.display(),
            dropped_bytes = bytes.len() - whole,
            "an entry log file ends in a frame that was not written whole; it is dropped"
        );
    }
    let len = bytes.len() as u64;
    Ok((LogFile { file, len }, Pending::decode(entries)?))
}

/// Writes `first` and then `second` to `file`, in one `write` unless it takes only part.
fn write_both(file: &mut File, first: &[u8], second: &[u8]) -> std::io::Result<()> {
    let written = file.write_vectored(&[IoSlice::new(first), IoSlice::new(second)])?;
    match written.checked_sub(first.len()) {
        Some(of_second) => file.write_all(&second[of_second..]),
        None => {
            file.write_all(&first[written..])?;
            file.write_all(second)
        }
    }
}

/// The entries of the whole frames at the start of `bytes`, one after the other, and how many
/// bytes those frames take.
fn read_frames(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut entries = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + FRAME_HEADER) {
        let (len, sum) = header.split_at(4);
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let mut expected = [0; 8];
        expected.copy_from_slice(sum);
        let body_at = at + FRAME_HEADER;
        let Some(body) = bytes.get(body_at..body_at + len) else {
            break;
        };
        if checksum(body) != u64::from_le_bytes(expected) {
            break;
        }
        entries.extend_from_slice(body);
        at = body_at + len;
    }
    (entries, at)
}

/// A checksum of a frame's entries, which tells a frame cut short, zeroed (what a power loss
/// leaves of blocks allocated and not written) or overwritten from one written whole: four
/// lanes of 8 bytes each, multiplied and rotated, seeded with the length. A CRC-32 from a
/// table, a byte a step, had been 5% of the server's CPU at saturation (`perf`): every entry
/// stored goes through it.
fn checksum(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mix = |lane: u64, word: &[u8]| {
        let mut padded = [0; 8];
        padded[..word.len()].copy_from_slice(word);
        (lane ^ u64::from_le_bytes(padded))
            .wrapping_mul(K)
            .rotate_left(31)
    };
    let mut lanes = [1, 2, 3, 4].map(|lane: u64| (bytes.len() as u64 ^ lane).wrapping_mul(K));
    let mut blocks = bytes.chunks_exact(32);
    for block in &mut blocks {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            *lane = mix(*lane, word);
        }
    }
    for (lane, word) in lanes.iter_mut().zip(blocks.remainder().chunks(8)) {
        *lane = mix(*lane, word);
    }
    lanes.into_iter().fold(0, mix_lane)
}

/// Folds a lane into a checksum.
fn mix_lane(sum: u64, lane: u64) -> u64 {
    (sum ^ lane)
        .wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        .rotate_left(29)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_changes_with_any_bit_and_with_zeros_in_place_of_bytes() {
        let bytes: Vec<u8> = (0..100u8).map(|n| n.wrapping_mul(37)).collect();
        let whole = checksum(&bytes);
        for at in 0..bytes.len() {
            for bit in 0..8 {
                let mut flipped = bytes.clone();
                flipped[at] ^= 1 << bit;
                assert_ne!(checksum(&flipped), whole, "byte {at}, bit {bit}");
            }
            let mut zeroed = bytes.clone();
            zeroed[at..].fill(0);
            assert_ne!(checksum(&zeroed), whole, "zeros from {at}");
            assert_ne!(checksum(&bytes[..at]), whole, "cut at {at}");
        }
        assert_ne!(checksum(&[0; 8]), checksum(&[0; 16]));
    }

    #[test]
    fn frames_are_read_up_to_the_first_that_is_not_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(ENTRY_LOG_FILES[0]);
        let (mut log, pending) = EntryLog::open(dir.path(), false).expect("log");
        assert!(pending.is_empty());
        log.append(b"").expect("empty frame");
        drop(log);
        let whole = std::fs::read(&path).expect("read");
        assert_eq!(whole.len(), FRAME_HEADER);

        let frame = |entries: &[u8]| {
            let mut frame = (entries.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&checksum(entries).to_le_bytes());
            frame.extend_from_slice(entries);
            frame
        };
        let (first, second) = (b"first".as_slice(), b"second".as_slice());
        let both = [frame(first), frame(second)].concat();
        assert_eq!(read_frames(&both), (b"firstsecond".to_vec(), both.len()));
        // Cut anywhere inside the second frame, or with a byte of it changed, the first is
        // read and the second dropped.
        for cut in frame(first).len()..both.len() {
            assert_eq!(
                read_frames(&both[..cut]),
                (first.to_vec(), frame(first).len())
            );
        }
        for at in frame(first).len()..both.len() {
            let mut damaged = both.clone();
            damaged[at] ^= 0x40;
            let (entries, whole) = read_frames(&damaged);
            assert_eq!(
                (entries.as_slice(), whole),
                (first, frame(first).len()),
                "{at}"
            );
        }
    }
}
