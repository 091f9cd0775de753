//! `ObjectStore` on a local folder: a container is a directory; streamed files are a temp file
//! renamed on commit; whole small objects (job documents, manifests) are written behind a journal.
//!
//! A `put` appends the object to an open journal file and keeps it in memory until a publisher
//! thread has written its file: a request never waits on creating, renaming or deleting a file,
//! which on a busy disk takes milliseconds (a directory block under writeback, a synchronous
//! discard of the replaced file's blocks). Reads see the pending object; after a crash, opening
//! the folder publishes what the journal holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Mutex;
use tokio_util::io::ReaderStream;

use super::direct::DirectFile;
use super::journal::{Journal, Record};
use super::{validate_path, ByteStream, ETag, ObjectStore, ObjectWriter, PutMode, StorageError};

/// Where unfinished files live, inside the root so a rename never crosses file systems.
const STAGING: &str = ".staging";
/// Where the journal of whole-object writes lives.
const JOURNAL: &str = ".journal";

#[derive(Clone)]
pub struct LocalFolder {
    root: PathBuf,
    /// Serialises conditional writes: one process owns a local folder.
    cas: Arc<Mutex<()>>,
    behind: Arc<WriteBehind>,
    _publisher: Arc<Publisher>,
}

impl LocalFolder {
    /// Opens the folder, creating it, clears leftovers of writers that never committed, and
    /// publishes what the journal holds.
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
        let journal = publish_journal(&root)?;
        let behind = Arc::new(WriteBehind {
            root: root.clone(),
            state: std::sync::Mutex::new(Pending {
                objects: BTreeMap::new(),
                next_seq: 0,
                journal,
                stop: false,
            }),
            wake: Condvar::new(),
            publishing: std::sync::Mutex::new(()),
        });
        let thread = {
            let behind = behind.clone();
            std::thread::Builder::new()
                .name("local-publisher".into())
                .spawn(move || behind.publish_until_stopped())
                .map_err(|e| StorageError::io(&display, e))?
        };
        Ok(Self {
            root,
            cas: Arc::new(Mutex::new(())),
            _publisher: Arc::new(Publisher {
                behind: behind.clone(),
                thread: std::sync::Mutex::new(Some(thread)),
            }),
            behind,
        })
    }

    fn file(&self, path: &str) -> Result<PathBuf, StorageError> {
        validate_path(path)?;
        if matches!(path.split('/').next(), Some(STAGING | JOURNAL)) {
            return Err(StorageError::InvalidPath(path.to_string()));
        }
        Ok(self.root.join(path))
    }

    /// The object, from memory while its file is not yet written, else from disk.
    fn read_whole(&self, path: &str) -> Result<Option<Bytes>, StorageError> {
        let file = self.file(path)?;
        if let Some(data) = self.behind.pending(path) {
            return Ok(Some(data));
        }
        Ok(read_optional(path, &file)?.map(Bytes::from))
    }
}

/// Opens the journal and writes the objects a process that ended left in it, the latest version of
/// each, leaving out those deleted after; then empties it.
fn publish_journal(root: &Path) -> Result<Journal, StorageError> {
    let display = root.join(JOURNAL).display().to_string();
    let journal_error = |e| StorageError::io(&display, e);
    let (mut journal, records) = Journal::open(&root.join(JOURNAL)).map_err(journal_error)?;
    let mut left = BTreeMap::new();
    for (_, record) in records {
        match record {
            Record::Put { path, data } => {
                left.insert(path, data);
            }
            Record::Cancel { path } => remove_under(&mut left, &path),
        }
    }
    for (path, data) in &left {
        validate_path(path)?;
        write_file(root, path, data)?;
    }
    if !left.is_empty() {
        tracing::info!(objects = left.len(), "published the journal's objects");
    }
    journal.clear_all().map_err(journal_error)?;
    Ok(journal)
}

/// The ETag a file of these bytes has in the local folder.
pub fn etag_of(data: &[u8]) -> ETag {
    ETag(format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(data)))
}

fn staging_file(root: &Path) -> PathBuf {
    root.join(STAGING)
        .join(uuid::Uuid::new_v4().simple().to_string())
}

/// Writes a whole file: a staged copy renamed into place.
fn write_file(root: &Path, path: &str, data: &[u8]) -> Result<(), StorageError> {
    let staged = staging_file(root);
    let written = std::fs::write(&staged, data)
        .map_err(|e| StorageError::io(path, e))
        .and_then(|()| publish_now(path, &staged, &root.join(path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    written
}

/// Moves a finished staged file into place.
fn publish_now(path: &str, staged: &Path, target: &Path) -> Result<(), StorageError> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| StorageError::io(path, e))?;
    }
    std::fs::rename(staged, target).map_err(|e| StorageError::io(path, e))
}

/// Bytes `range` of a file (as many as it holds), or `None` when it is absent.
fn read_range(
    path: &str,
    file: &Path,
    range: std::ops::Range<u64>,
) -> Result<Option<Bytes>, StorageError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut opened = match std::fs::File::open(file) {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io(path, e)),
    };
    let mut bytes = Vec::new();
    opened
        .metadata()
        .and_then(|metadata| {
            let length = range.end.min(metadata.len()).saturating_sub(range.start);
            bytes.reserve_exact(length as usize);
            opened.seek(SeekFrom::Start(range.start))?;
            opened.take(length).read_to_end(&mut bytes)
        })
        .map_err(|e| StorageError::io(path, e))?;
    Ok(Some(Bytes::from(bytes)))
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

/// The keys under `prefix/`, in order.
fn keys_under<T>(objects: &BTreeMap<String, T>, prefix: &str) -> Vec<String> {
    let folder = format!("{prefix}/");
    objects
        .range(folder.clone()..)
        .take_while(|(key, _)| key.starts_with(&folder))
        .map(|(key, _)| key.clone())
        .collect()
}

/// Removes `path` and everything under `path/` from `objects`.
fn remove_under<T>(objects: &mut BTreeMap<String, T>, path: &str) {
    objects.remove(path);
    for key in keys_under(objects, path) {
        objects.remove(&key);
    }
}

/// Whole objects journaled but not yet written as files.
struct WriteBehind {
    root: PathBuf,
    state: std::sync::Mutex<Pending>,
    /// Wakes the publisher: something was journaled, or it is to stop.
    wake: Condvar,
    /// Held while an object's file is written, a folder deleted or a streamed file committed, so
    /// that a publication checks that its object is still the latest and writes it in one step.
    publishing: std::sync::Mutex<()>,
}

struct Pending {
    /// Path to (journal sequence number, bytes).
    objects: BTreeMap<String, (u64, Bytes)>,
    next_seq: u64,
    journal: Journal,
    stop: bool,
}

impl WriteBehind {
    /// Journals `record` and applies it to the pending objects.
    fn record(&self, path: &str, record: Record) -> Result<(), StorageError> {
        let mut state = self.state.lock().expect("journal lock");
        let seq = state.next_seq;
        state
            .journal
            .append(seq, &record)
            .map_err(|e| StorageError::io(path, e))?;
        state.next_seq += 1;
        match record {
            Record::Put { path, data } => {
                state.objects.insert(path, (seq, data));
            }
            Record::Cancel { path } => remove_under(&mut state.objects, &path),
        }
        self.wake.notify_one();
        Ok(())
    }

    fn pending(&self, path: &str) -> Option<Bytes> {
        let state = self.state.lock().expect("journal lock");
        state.objects.get(path).map(|(_, data)| data.clone())
    }

    fn pending_under(&self, prefix: &str) -> Vec<String> {
        keys_under(&self.state.lock().expect("journal lock").objects, prefix)
    }

    fn latest_seq(&self, path: &str) -> Option<u64> {
        let state = self.state.lock().expect("journal lock");
        state.objects.get(path).map(|(seq, _)| *seq)
    }

    /// Writes the pending objects' files, round after round; empties a journal file once every
    /// object it holds is on disk. Returns when stopped, after a last round.
    fn publish_until_stopped(&self) {
        loop {
            let (batch, retired, stopping) = {
                let mut state = self.state.lock().expect("journal lock");
                while state.objects.is_empty() && !state.journal.has_records() && !state.stop {
                    state = self.wake.wait(state).expect("journal lock");
                }
                if state.objects.is_empty() && !state.journal.has_records() {
                    return;
                }
                let batch: Vec<(String, u64, Bytes)> = state
                    .objects
                    .iter()
                    .map(|(path, (seq, data))| (path.clone(), *seq, data.clone()))
                    .collect();
                (batch, state.journal.retire_current(), state.stop)
            };
            let mut all_written = true;
            for (path, seq, data) in batch {
                let _publishing = self.publishing.lock().expect("publishing lock");
                if self.latest_seq(&path) != Some(seq) {
                    continue; // replaced or deleted since: what replaced it is journaled later
                }
                match write_file(&self.root, &path, &data) {
                    Ok(()) => {
                        let mut state = self.state.lock().expect("journal lock");
                        if state.objects.get(&path).is_some_and(|(s, _)| *s == seq) {
                            state.objects.remove(&path);
                        }
                    }
                    Err(error) => {
                        all_written = false;
                        tracing::warn!(%error, "an object could not be written; its journal record is kept");
                    }
                }
            }
            if all_written {
                if let Err(error) = retired.clear() {
                    tracing::warn!(%error, "a journal file could not be emptied");
                }
            } else if stopping {
                return; // the journal keeps the rest for the next open
            } else {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Stops the publisher, after a last round, when the last clone of the folder goes.
struct Publisher {
    behind: Arc<WriteBehind>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.behind.state.lock().expect("journal lock").stop = true;
        self.behind.wake.notify_all();
        if let Some(thread) = self.thread.lock().expect("thread slot").take() {
            let _ = thread.join();
        }
    }
}

#[async_trait]
impl ObjectStore for LocalFolder {
    fn owned_by_this_process(&self) -> bool {
        true
    }

    async fn get(&self, path: &str) -> Result<Option<(Bytes, ETag)>, StorageError> {
        Ok(self.read_whole(path)?.map(|data| {
            let etag = etag_of(&data);
            (data, etag)
        }))
    }

    async fn get_range(
        &self,
        path: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Bytes>, StorageError> {
        let file = self.file(path)?;
        if let Some(data) = self.behind.pending(path) {
            let cut = |at: u64| (at as usize).min(data.len());
            return Ok(Some(data.slice(cut(range.start)..cut(range.end))));
        }
        // On a pool thread: the reads of a shard's sections run side by side on the runtime.
        let path = path.to_string();
        tokio::task::spawn_blocking(move || read_range(&path, &file, range))
            .await
            .expect("a file read does not panic")
    }

    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<ETag, StorageError> {
        self.file(path)?;
        let etag = etag_of(&data);
        let record = Record::Put {
            path: path.to_string(),
            data,
        };
        if let PutMode::Overwrite = mode {
            self.behind.record(path, record)?;
            return Ok(etag);
        }
        let _exclusive = self.cas.lock().await;
        let current = self.read_whole(path)?.map(|d| etag_of(&d));
        let allowed = match (&mode, &current) {
            (PutMode::Create, None) => true,
            (PutMode::Update(expected), Some(actual)) => expected == actual,
            _ => false,
        };
        if !allowed {
            return Err(StorageError::PreconditionFailed(path.to_string()));
        }
        self.behind.record(path, record)?;
        Ok(etag)
    }

    async fn writer(&self, path: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let target = self.file(path)?;
        let staged = staging_file(&self.root);
        let file = DirectFile::create(&staged).map_err(|e| StorageError::io(path, e))?;
        Ok(Box::new(LocalWriter {
            path: path.to_string(),
            target,
            staged,
            file,
            behind: self.behind.clone(),
        }))
    }

    async fn read_stream(&self, path: &str) -> Result<Option<(u64, ByteStream)>, StorageError> {
        let file = self.file(path)?;
        if let Some(data) = self.behind.pending(path) {
            let size = data.len() as u64;
            let stream = futures_util::stream::once(async move { Ok(data) });
            return Ok(Some((size, Box::pin(stream))));
        }
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
        let (prefix, behind) = (prefix.to_string(), self.behind.clone());
        tokio::task::spawn_blocking(move || {
            let _publishing = behind.publishing.lock().expect("publishing lock");
            let cancel = || {
                behind.record(
                    &prefix,
                    Record::Cancel {
                        path: prefix.clone(),
                    },
                )
            };
            let remove = || {
                let result = match std::fs::metadata(&target) {
                    Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&target),
                    Ok(_) => std::fs::remove_file(&target),
                    Err(e) => Err(e),
                };
                match result {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(StorageError::io(&prefix, e))
                    }
                    _ => Ok(()),
                }
            };
            match cancel() {
                Ok(()) => remove(),
                // On a full disk the files go first, which makes room for the journal record.
                Err(full) if full.is_full() => {
                    remove()?;
                    cancel()
                }
                Err(other) => Err(other),
            }
        })
        .await
        .expect("a deletion does not panic")
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let dir = self.file(prefix)?;
        // Pending objects first: one published meanwhile is then on disk when the folder is read.
        let mut found = self.behind.pending_under(prefix);
        let prefix = prefix.to_string();
        let on_disk = crate::blocking::run(move || {
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
            Ok(found)
        })
        .await?;
        found.extend(on_disk);
        found.sort();
        found.dedup();
        Ok(found)
    }
}

/// Created, written and synced on the calling thread, not the runtime's blocking pool: the rolling
/// writer calls from a shard thread of its own at a lower priority, and what writing costs (the
/// wait for a direct write, or the copy into the page cache where direct I/O is refused) is
/// charged there, behind the requests the runtime serves.
struct LocalWriter {
    path: String,
    target: PathBuf,
    staged: PathBuf,
    file: DirectFile,
    behind: Arc<WriteBehind>,
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        self.file
            .write(&data)
            .map_err(|e| StorageError::io(&self.path, e))
    }

    async fn commit(self: Box<Self>) -> Result<(), StorageError> {
        let Self {
            path,
            target,
            staged,
            file,
            behind,
        } = *self;
        if let Err(error) = file.finish() {
            let _ = std::fs::remove_file(&staged);
            return Err(StorageError::io(&path, error));
        }
        // The rename on a pool thread at normal priority: a file system lock must not wait on
        // this idle-priority thread getting the core back.
        // A whole object journaled earlier at this path must not be published over the file.
        tokio::task::spawn_blocking(move || {
            let _publishing = behind.publishing.lock().expect("publishing lock");
            let published = behind
                .record(&path, Record::Cancel { path: path.clone() })
                .and_then(|()| publish_now(&path, &staged, &target));
            if published.is_err() {
                let _ = std::fs::remove_file(&staged);
            }
            published
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_a_dead_process_left_in_its_journal_is_published_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut journal, _) = Journal::open(&dir.path().join(JOURNAL)).unwrap();
            let records = [
                Record::put("c/job/job.json", b"1"),
                Record::put("c/job/job.json", b"2"),
                Record::put("c/gone/job.json", b"x"),
                Record::Cancel {
                    path: "c/gone".into(),
                },
                Record::put("c/streamed.ndjson", b"old"),
                Record::Cancel {
                    path: "c/streamed.ndjson".into(),
                },
            ];
            for (seq, record) in records.iter().enumerate() {
                journal.append(seq as u64, record).unwrap();
            }
        }
        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        std::fs::write(dir.path().join("c/streamed.ndjson"), b"new").unwrap();

        let folder = LocalFolder::open(dir.path()).unwrap();
        let on_disk = |path: &str| std::fs::read(dir.path().join(path)).ok();
        assert_eq!(on_disk("c/job/job.json").unwrap(), b"2", "the latest put");
        assert!(!dir.path().join("c/gone").exists(), "a deleted folder");
        assert_eq!(
            on_disk("c/streamed.ndjson").unwrap(),
            b"new",
            "a streamed file"
        );
        let (_, left) = Journal::open(&dir.path().join(JOURNAL)).unwrap();
        assert!(left.is_empty(), "the journal is emptied: {left:?}");
        assert!(matches!(
            folder.get(".journal/a").await,
            Err(StorageError::InvalidPath(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_objects_are_read_listed_and_deleted_like_files_and_never_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let folder = LocalFolder::open(dir.path()).unwrap();
        const ROUNDS: usize = 500;
        for round in 0..ROUNDS {
            let kept = format!("c/kept/{round}.json");
            let deleted = format!("c/deleted-{round}/job.json");
            let streamed = format!("c/streamed/{round}.ndjson");
            let data = Bytes::from(format!("{round}"));
            folder
                .put(&kept, data.clone(), PutMode::Overwrite)
                .await
                .unwrap();
            assert_eq!(folder.get(&kept).await.unwrap().unwrap().0, data);
            let (size, _) = folder.read_stream(&kept).await.unwrap().unwrap();
            assert_eq!(size, data.len() as u64);
            assert!(folder.list("c/kept").await.unwrap().contains(&kept));
            // Racing the publisher: the deletion and the streamed file win, whenever it runs.
            folder
                .put(&deleted, data.clone(), PutMode::Overwrite)
                .await
                .unwrap();
            folder
                .delete_prefix(&format!("c/deleted-{round}"))
                .await
                .unwrap();
            assert!(folder.get(&deleted).await.unwrap().is_none());
            let mut writer = folder.writer(&streamed).await.unwrap();
            writer.write(Bytes::from_static(b"streamed")).await.unwrap();
            folder
                .put(&streamed, data.clone(), PutMode::Overwrite)
                .await
                .unwrap();
            writer.commit().await.unwrap();
        }
        drop(folder);
        for round in 0..ROUNDS {
            let path = |p: String| dir.path().join(p);
            assert_eq!(
                std::fs::read(path(format!("c/kept/{round}.json"))).unwrap(),
                round.to_string().as_bytes()
            );
            assert!(!path(format!("c/deleted-{round}")).exists(), "{round}");
            assert_eq!(
                std::fs::read(path(format!("c/streamed/{round}.ndjson"))).unwrap(),
                b"streamed",
                "{round}"
            );
        }
        let (_, left) = Journal::open(&dir.path().join(JOURNAL)).unwrap();
        assert!(left.is_empty(), "the journal is emptied: {left:?}");
    }
}
