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
//! The log survives what a commit does (see [`super::Durability`]): the process being
//! killed, since the `write` is in the operating system's hands once it returns; and, with
//! [`super::Durability::Power`], a power loss, since each `write` is then followed by
//! `fdatasync`, as SQLite syncs each commit then. At start-up the serving store reads the log
//! back and writes its entries into `history_chunks` before it reads the tails, dropping
//! those a transaction committed before the log was emptied, and a frame that was being
//! written when the process stopped.
//!
//! A frame is a batch's entries: their length and CRC-32 (4 bytes each, little endian), then
//! the entries as [`Pending`] lays them out.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use rusqlite::Connection;

use super::chunks::Pending;
use crate::{Durability, Result, StoreError};

/// The file the entry log is kept in, inside the data directory.
pub const ENTRY_LOG_FILE: &str = "iagent.entries";

/// How many KiB of entries, by default, the log holds before they are written into
/// `history_chunks`: about 260 echoes of short texts (eight chunks). That write is one
/// transaction for all of them instead of one a batch, and it holds up the batches behind it
/// for its length: at 256 KiB, 1.0 to 1.6 ms each time (its commit about 0.7 ms), which at
/// 10 000 messages/s delayed a message or ten every tenth of a second; a quarter of it takes a
/// quarter as long, and the transaction it still saves per message is nearly all of one.
pub const DEFAULT_ENTRY_LOG_KIB: usize = 64;

/// The bytes before a frame's entries: their length and their CRC-32.
const FRAME_HEADER: usize = 8;

/// The `store_meta` key of the last entry written into SQLite from the log: the entries up to
/// it that the log still holds (it is emptied after the transaction that wrote them commits)
/// are not written again.
const APPLIED_KEY: &str = "entry_log_through";

/// Opens the log in `data_dir` and writes the entries it holds that SQLite lacks into
/// `history_chunks`, in the transaction open on `conn`; once that commits, the log is to be
/// emptied ([`EntryLog::emptied`]).
pub(super) fn recover(
    conn: &Connection,
    data_dir: &Path,
    durability: Durability,
) -> Result<EntryLog> {
    let sync = durability == Durability::Power;
    let (log, mut pending) = EntryLog::open(&data_dir.join(ENTRY_LOG_FILE), sync)?;
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

/// The open log file.
#[derive(Debug)]
pub(super) struct EntryLog {
    file: File,
    /// The file's length: where the next frame goes, and where a failed write is cut back to.
    len: u64,
    /// Whether each frame is synced to the disk before it counts as written.
    sync: bool,
    /// A frame as it is written: header and entries, in one `write`.
    frame: Vec<u8>,
}

impl EntryLog {
    /// Opens the log at `path`, creating it if missing, and reads back the entries it holds,
    /// those of every whole frame up to the first that is not (the one being written when
    /// the process stopped: it was answered to nobody).
    pub(super) fn open(path: &Path, sync: bool) -> Result<(Self, Pending)> {
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
                dropped_bytes = bytes.len() - whole,
                "the entry log ends in a frame that was not written whole; it is dropped"
            );
        }
        let pending = Pending::decode(entries)?;
        let log = Self {
            file,
            len: bytes.len() as u64,
            sync,
            frame: Vec::new(),
        };
        Ok((log, pending))
    }

    /// Writes a frame of `entries` (encoded as [`Pending`] holds them) at the log's end. A
    /// frame that fails is cut off again, if it can be; the log is of no further use either
    /// way (a disk that failed one write fails the next), and is read back up to it.
    pub(super) fn append(&mut self, entries: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(entries.len())
            .map_err(|_| std::io::Error::other("a batch's entries exceed 4 GiB"))?;
        self.frame.clear();
        self.frame.extend_from_slice(&len.to_le_bytes());
        self.frame.extend_from_slice(&crc32(entries).to_le_bytes());
        self.frame.extend_from_slice(entries);
        let written = self.file.write_all(&self.frame).and_then(|()| {
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                self.len += self.frame.len() as u64;
                Ok(())
            }
            Err(err) => {
                self.file.set_len(self.len).ok();
                Err(err)
            }
        }
    }

    /// The log, emptied: what it held is committed.
    pub(super) fn emptied(mut self) -> std::io::Result<Self> {
        self.clear()?;
        Ok(self)
    }

    /// Empties the log: every entry it held is in `history_chunks`, committed.
    pub(super) fn clear(&mut self) -> std::io::Result<()> {
        if self.len > 0 {
            self.file.set_len(0)?;
            self.len = 0;
        }
        Ok(())
    }
}

/// The entries of the whole frames at the start of `bytes`, one after the other, and how many
/// bytes those frames take.
fn read_frames(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut entries = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + FRAME_HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let body_at = at + FRAME_HEADER;
        let Some(body) = bytes.get(body_at..body_at + len) else {
            break;
        };
        if crc32(body) != crc {
            break;
        }
        entries.extend_from_slice(body);
        at = body_at + len;
    }
    (entries, at)
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it), a byte at a time from a table: it
/// tells a frame cut short or overwritten from one written whole.
fn crc32(bytes: &[u8]) -> u32 {
    let crc = bytes.iter().fold(!0u32, |crc, &byte| {
        CRC_TABLE[usize::from((crc as u8) ^ byte)] ^ (crc >> 8)
    });
    !crc
}

/// The CRC-32 of each byte value.
static CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = byte as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_is_the_standard_one() {
        // The check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn frames_are_read_up_to_the_first_that_is_not_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(ENTRY_LOG_FILE);
        let (mut log, pending) = EntryLog::open(&path, false).expect("log");
        assert!(pending.is_empty());
        log.append(b"").expect("empty frame");
        drop(log);
        let whole = std::fs::read(&path).expect("read");
        assert_eq!(whole.len(), FRAME_HEADER);

        let frame = |entries: &[u8]| {
            let mut frame = (entries.len() as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&crc32(entries).to_le_bytes());
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
