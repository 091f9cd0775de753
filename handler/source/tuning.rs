//! SQLite tuning of the embedded store, in one place, as named profiles.

use rusqlite::Connection;

/// A new store: 16 KiB pages (a Synthea resource is often 2-20 KB) and a write-ahead log, so
/// that exports read while a load writes.
pub const CREATE: &str = "PRAGMA page_size = 16384; PRAGMA journal_mode = WAL;";

/// Every connection: commits without a sync per transaction (the WAL keeps them safe), a 16 MB
/// page cache, temporary tables in memory.
pub const CONNECTION: &str =
    "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -16384; PRAGMA temp_store = MEMORY;";

/// A scan in storage order reads each page once: a small cache, so that a shard's connection
/// does not fault in 16 MB of fresh memory for pages it never reads again.
pub const STORAGE_ORDER_SCAN: &str = "PRAGMA cache_size = -2048";

/// A load (an import run): temp files, not memory, for its bookkeeping (a reload of the whole
/// store remembers every row); into a store that already holds resources, rows read through a map
/// of the file (SQLite caps it at its build's `SQLITE_MAX_MMAP_SIZE`, raised in
/// `.cargo/config.toml`); and a rollback journal, so that new pages go straight into the file
/// rather than through the WAL and a checkpoint copying them again (only while no one else has
/// the store open). Returns the journal mode to restore with [`after_load`].
pub fn for_load(conn: &Connection, holds_resources: bool) -> rusqlite::Result<String> {
    conn.execute_batch("PRAGMA temp_store = FILE")?;
    if holds_resources {
        conn.execute_batch("PRAGMA mmap_size = 1099511627776")?;
    }
    Ok(conn
        .query_row("PRAGMA journal_mode = TRUNCATE", [], |row| row.get(0))
        .unwrap_or_else(|_| "wal".into()))
}

/// Back to the write-ahead log after a load, when the load left it.
pub fn after_load(conn: &Connection, journal: &str) -> rusqlite::Result<()> {
    match journal {
        "wal" => Ok(()),
        _ => conn.execute_batch("PRAGMA journal_mode = WAL"),
    }
}
