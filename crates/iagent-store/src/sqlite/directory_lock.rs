//! One gateway per data directory.
//!
//! The store keeps state derived from the database in memory (the tails: see [`super::dedup`]
//! and [`super::history`]) and hands out the dedup rows' ids itself. Two gateways writing one
//! database would each miss the other's newest records, so a resend reaching the second would
//! be answered again, and both would hand out the same ids. So a store opened to serve takes
//! an exclusive lock on [`LOCK_FILE`] in the data directory for as long as it is open, and a
//! second one is refused at once, with the directory named.
//!
//! The lock is the operating system's (`flock`), not a file's presence: it goes with the
//! process however that ends, `kill -9` included, and there is never a stale lock to clear.
//! The CLI's administration of apps, tokens and agents opens the store shared
//! ([`super::SqliteStore::open_shared`]), without the lock, while a gateway serves.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

use crate::{Result, StoreError};

/// The file, inside the data directory, whose lock says that a gateway serves from it. It holds
/// nothing and is left in place.
pub const LOCK_FILE: &str = "iagent.lock";

/// The data directory's lock, held until dropped.
#[derive(Debug)]
pub(super) struct DirectoryLock {
    _file: File,
}

impl DirectoryLock {
    /// Takes the lock of `data_dir`, or says that another store holds it.
    pub(super) fn take(data_dir: &Path) -> Result<Self> {
        let path = data_dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::DataDir {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => Err(StoreError::InUse(data_dir.to_owned())),
            Err(TryLockError::Error(source)) => Err(StoreError::DataDir { path, source }),
        }
    }
}
