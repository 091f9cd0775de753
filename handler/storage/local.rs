//! `ObjectStore` on a local folder: a container is a directory, writes are a temp file renamed on commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Mutex;
use tokio_util::io::ReaderStream;

use super::{validate_path, ByteStream, ETag, ObjectStore, ObjectWriter, PutMode, StorageError};

/// Where unfinished files live, inside the root so a rename never crosses file systems.
const STAGING: &str = ".staging";

#[derive(Debug, Clone)]
pub struct LocalFolder {
    root: PathBuf,
    /// Serialises conditional writes: one process owns a local folder.
    cas: Arc<Mutex<()>>,
}

impl LocalFolder {
    /// Opens the folder, creating it, and clears leftovers of writers that never committed.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        let staging = root.join(STAGING);
        let display = staging.display().to_string();
        match std::fs::remove_dir_all(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(&display, e)),
        }
        std::fs::create_dir_all(&staging).map_err(|e| StorageError::io(&display, e))?;
        Ok(Self {
            root,
            cas: Arc::new(Mutex::new(())),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file(&self, path: &str) -> Result<PathBuf, StorageError> {
        validate_path(path)?;
        if path.split('/').next() == Some(STAGING) {
            return Err(StorageError::InvalidPath(path.to_string()));
        }
        Ok(self.root.join(path))
    }

    fn staging_file(&self) -> PathBuf {
        self.root
            .join(STAGING)
            .join(uuid::Uuid::new_v4().simple().to_string())
    }

    async fn write_whole(
        &self,
        path: &str,
        target: &Path,
        data: Bytes,
    ) -> Result<(), StorageError> {
        let staged = self.staging_file();
        let (path, target) = (path.to_string(), target.to_path_buf());
        // One trip to the blocking pool for the write and the rename, not one per call: each trip
        // waits for a pool thread, which is what a request waits for while both cores are busy.
        // (Not on the calling thread, as reads are: creating a file can wait on the journal for
        // tens of milliseconds while an export syncs, and the request thread must not.)
        tokio::task::spawn_blocking(move || {
            std::fs::write(&staged, &data).map_err(|e| StorageError::io(&path, e))?;
            publish_now(&path, &staged, &target)
        })
        .await
        .expect("a small write does not panic")
    }
}

fn etag_of(data: &[u8]) -> ETag {
    ETag(format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(data)))
}

/// Moves a finished staged file into place.
fn publish_now(path: &str, staged: &Path, target: &Path) -> Result<(), StorageError> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| StorageError::io(path, e))?;
    }
    std::fs::rename(staged, target).map_err(|e| StorageError::io(path, e))
}

/// Read on the calling thread, not the blocking pool: what is read whole is a small document (a
/// job, a manifest) this process wrote moments ago, in the page cache. The read takes microseconds;
/// the hop to a pool thread and back took 2-9 ms at the 99th percentile while a 100x export kept
/// both cores busy.
fn read_optional(path: &str, file: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    match std::fs::read(file) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StorageError::io(path, e)),
    }
}

#[async_trait]
impl ObjectStore for LocalFolder {
    async fn get(&self, path: &str) -> Result<Option<(Bytes, ETag)>, StorageError> {
        let file = self.file(path)?;
        Ok(read_optional(path, &file)?.map(|data| {
            let etag = etag_of(&data);
            (Bytes::from(data), etag)
        }))
    }

    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<ETag, StorageError> {
        let target = self.file(path)?;
        let etag = etag_of(&data);
        if let PutMode::Overwrite = mode {
            self.write_whole(path, &target, data).await?;
            return Ok(etag);
        }
        let _exclusive = self.cas.lock().await;
        let current = read_optional(path, &target)?.map(|d| etag_of(&d));
        let allowed = match (&mode, &current) {
            (PutMode::Create, None) => true,
            (PutMode::Update(expected), Some(actual)) => expected == actual,
            _ => false,
        };
        if !allowed {
            return Err(StorageError::PreconditionFailed(path.to_string()));
        }
        self.write_whole(path, &target, data).await?;
        Ok(etag)
    }

    async fn writer(&self, path: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let target = self.file(path)?;
        let staged = self.staging_file();
        let file = std::fs::File::create(&staged).map_err(|e| StorageError::io(path, e))?;
        Ok(Box::new(LocalWriter {
            path: path.to_string(),
            target,
            staged,
            file,
        }))
    }

    async fn read_stream(&self, path: &str) -> Result<Option<(u64, ByteStream)>, StorageError> {
        let file = self.file(path)?;
        let opened = match tokio::fs::File::open(&file).await {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io(path, e)),
        };
        let meta = opened
            .metadata()
            .await
            .map_err(|e| StorageError::io(path, e))?;
        if !meta.is_file() {
            return Ok(None);
        }
        Ok(Some((
            meta.len(),
            Box::pin(ReaderStream::with_capacity(opened, 256 << 10)),
        )))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        let target = self.file(prefix)?;
        let result = match tokio::fs::metadata(&target).await {
            Ok(meta) if meta.is_dir() => tokio::fs::remove_dir_all(&target).await,
            Ok(_) => tokio::fs::remove_file(&target).await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StorageError::io(prefix, e)),
            _ => Ok(()),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let dir = self.file(prefix)?;
        let prefix = prefix.to_string();
        let found = tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            let mut pending = vec![(dir, prefix)];
            while let Some((dir, name)) = pending.pop() {
                let entries = match std::fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StorageError::io(&name, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| StorageError::io(&name, e))?;
                    let child = format!("{name}/{}", entry.file_name().to_string_lossy());
                    if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        pending.push((entry.path(), child));
                    } else {
                        found.push(child);
                    }
                }
            }
            found.sort();
            Ok(found)
        })
        .await
        .expect("listing does not panic")?;
        Ok(found)
    }
}

/// Bytes per `write` call. A kernel without preemption (`preempt=none`, common on VMs) lets no
/// other thread have the core while one copies into the page cache: a 4 MB write holds it for
/// milliseconds (a status request waited up to 9 ms at 100x), 256 KB for a fraction of one.
const WRITE_SYSCALL_BYTES: usize = 256 << 10;

/// Created, written and synced on the calling thread, not the runtime's blocking pool: the rolling writer
/// calls from a shard thread of its own at a lower priority, and the copy into the page cache
/// (the bulk of an export's work) is charged there, behind the requests the runtime serves.
struct LocalWriter {
    path: String,
    target: PathBuf,
    staged: PathBuf,
    file: std::fs::File,
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        for piece in data.chunks(WRITE_SYSCALL_BYTES) {
            std::io::Write::write_all(&mut self.file, piece)
                .map_err(|e| StorageError::io(&self.path, e))?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        self.file
            .sync_data()
            .map_err(|e| StorageError::io(&self.path, e))?;
        // The rename on a pool thread at normal priority: a file system lock must not wait on
        // this idle-priority thread getting the core back.
        let (path, staged, target) = (self.path.clone(), self.staged.clone(), self.target.clone());
        tokio::task::spawn_blocking(move || publish_now(&path, &staged, &target))
            .await
            .expect("a rename does not panic")
    }

    async fn abort(self: Box<Self>) -> Result<(), StorageError> {
        drop(self.file);
        match tokio::fs::remove_file(&self.staged).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(StorageError::io(&self.path, e))
            }
            _ => Ok(()),
        }
    }
}
