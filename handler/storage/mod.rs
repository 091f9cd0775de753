//! Where export files and job state go: the `ObjectStore` trait, the local folder and Azure Blob
//! (the official SDK), the rolling NDJSON writer.
//!
//! Paths are `container/name/...`: plain segments, no `.`/`..`, no empty segment, no backslash.
//! Objects written through an `ObjectWriter` become visible only when committed.

pub mod azure;
pub mod blocks;
mod direct;
mod journal;
pub mod local;
pub mod rolling;

use async_trait::async_trait;
use bytes::Bytes;

pub use azure::AzureBlob;
pub use local::LocalFolder;
pub use rolling::{ManifestList, OutputFile, RollingNdjsonWriter, Section};

/// An opaque version tag of a stored object, for compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ETag(pub String);

/// The condition a `put` must meet.
#[derive(Debug, Clone)]
pub enum PutMode {
    Overwrite,
    /// Create only (`If-None-Match: *`).
    Create,
    /// Replace only this version (`If-Match`).
    Update(ETag),
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0}: precondition failed (the object changed or already exists)")]
    PreconditionFailed(String),
    #[error("{0}: not found")]
    NotFound(String),
    #[error("invalid storage path {0:?}")]
    InvalidPath(String),
    #[error("{path}: the storage account refused access ({detail}); the app's identity needs the Storage Blob Data Contributor role on the account (a role assigned minutes ago may not be in force yet), and the account's firewall must let the app in")]
    Denied { path: String, detail: String },
    #[error("{path}: the storage request failed ({detail})")]
    Service { path: String, detail: String },
    /// No space left (or the quota reached): writes fail until space returns.
    #[error("{path}: the export storage is full ({source}); free space or raise its quota, then try again")]
    Full {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StorageError {
    pub(crate) fn io(path: &str, source: std::io::Error) -> Self {
        use std::io::ErrorKind;
        let path = path.to_string();
        match source.kind() {
            ErrorKind::NotFound => StorageError::NotFound(path),
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => {
                StorageError::Full { path, source }
            }
            _ => StorageError::Io { path, source },
        }
    }

    pub fn fault(&self) -> crate::fault::Fault {
        use crate::fault::Fault;
        match self {
            StorageError::Denied { .. } | StorageError::Service { .. } => Fault::Unavailable,
            StorageError::Full { .. } => Fault::Full,
            _ => Fault::Internal,
        }
    }

    /// Writes are refused for want of space: they may succeed once space returns.
    pub fn is_full(&self) -> bool {
        matches!(self, StorageError::Full { .. })
    }
}

pub type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Bytes>> + Send + Sync>>;

#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// The object's bytes and version, or `None` when absent.
    async fn get(&self, path: &str) -> Result<Option<(Bytes, ETag)>, StorageError>;

    /// Bytes `range` of an object, or `None` when absent (by default read whole, then cut).
    async fn get_range(
        &self,
        path: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Bytes>, StorageError> {
        let Some((whole, _)) = self.get(path).await? else {
            return Ok(None);
        };
        let cut = |at: u64| (at as usize).min(whole.len());
        Ok(Some(whole.slice(cut(range.start)..cut(range.end))))
    }

    /// Writes a whole object under `mode`; `PreconditionFailed` when the condition does not hold.
    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<ETag, StorageError>;

    /// A streaming writer whose object appears, whole, on `commit` (replacing any earlier one).
    async fn writer(&self, path: &str) -> Result<Box<dyn ObjectWriter>, StorageError>;

    /// A writer for an export file (NDJSON; `gzip`: its bytes are gzip-compressed), which a store
    /// serving files straight to clients labels as such (Azure Blob: the blob's `Content-Type` and
    /// `Content-Encoding`, which a SAS download carries).
    async fn export_writer(
        &self,
        path: &str,
        _gzip: bool,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        self.writer(path).await
    }

    /// The object's size and a stream of its bytes, or `None` when absent.
    async fn read_stream(&self, path: &str) -> Result<Option<(u64, ByteStream)>, StorageError>;

    /// Removes every object whose path starts with `prefix/` (and `prefix` itself).
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError>;

    /// The paths of the objects under `prefix/`, sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError>;

    /// A URL by which anyone holding it reads the object until `expiry`, signed without a stored
    /// secret; `None` where the store cannot sign one (a local folder, an account reached by SAS).
    async fn signed_read_url(
        &self,
        _path: &str,
        _expiry: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<String>, StorageError> {
        Ok(None)
    }

    /// No other process writes here while this one runs (a local folder): what this process
    /// listed once and changed since is all there is.
    fn owned_by_this_process(&self) -> bool {
        false
    }
}

/// One object being written. Driven from a shard's own thread: the rolling writer blocks on each
/// call through a runtime handle, so an implementation may block inside its futures (the local
/// folder writes and syncs the file inline) and its futures are never polled on a runtime worker.
/// `write` takes the caller's pooled block as `Bytes` and lets go of it when done with it.
#[async_trait]
pub trait ObjectWriter: Send {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError>;
    async fn commit(self: Box<Self>) -> Result<(), StorageError>;
    async fn abort(self: Box<Self>) -> Result<(), StorageError>;
}

/// Checks a storage path: `/`-separated segments of printable characters, none empty, `.` or `..`.
pub fn validate_path(path: &str) -> Result<(), StorageError> {
    let ok = !path.is_empty()
        && path.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && !segment.chars().any(|c| c == '\\' || c.is_control())
        });
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidPath(path.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_cannot_escape() {
        assert!(validate_path("c/f/Patient-1.ndjson").is_ok());
        for bad in ["", "/c", "c//f", "c/../x", "c/./x", "c\\x", "c/\n"] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }
}
