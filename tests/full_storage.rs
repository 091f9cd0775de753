//! A full export storage: the export fails saying so and frees its files, kickoffs answer 503 with
//! `Retry-After` while writes are refused, cancel works and frees space, and the service recovers
//! when space returns. The storage is the real local folder behind a gate that refuses writes with
//! the operating system's "no space left" error until something is deleted (which frees space).

mod common;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use fhir_export::storage::{
    ByteStream, ETag, LocalFolder, ObjectStore, ObjectWriter, PutMode, StorageError,
};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refuse {
    Nothing,
    /// Export files (streamed writes): the disk filling up under a large export.
    ExportFiles,
    /// Every write, until something is deleted.
    Everything,
}

struct FullDisk {
    inner: LocalFolder,
    refuse: Arc<Mutex<Refuse>>,
}

fn no_space(path: &str) -> StorageError {
    StorageError::Full {
        path: path.to_string(),
        source: std::io::Error::from(std::io::ErrorKind::StorageFull),
    }
}

impl FullDisk {
    fn refuses(&self, streamed: bool) -> bool {
        match *self.refuse.lock().unwrap() {
            Refuse::Nothing => false,
            Refuse::ExportFiles => streamed,
            Refuse::Everything => true,
        }
    }
}

#[async_trait]
impl ObjectStore for FullDisk {
    async fn get(&self, path: &str) -> Result<Option<(Bytes, ETag)>, StorageError> {
        self.inner.get(path).await
    }

    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<ETag, StorageError> {
        if self.refuses(false) {
            return Err(no_space(path));
        }
        self.inner.put(path, data, mode).await
    }

    async fn writer(&self, path: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let inner = self.inner.writer(path).await?;
        Ok(Box::new(GatedWriter {
            inner,
            path: path.to_string(),
            refuse: self.refuse.clone(),
        }))
    }

    async fn read_stream(&self, path: &str) -> Result<Option<(u64, ByteStream)>, StorageError> {
        self.inner.read_stream(path).await
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        self.inner.delete_prefix(prefix).await?;
        let mut refuse = self.refuse.lock().unwrap();
        if *refuse == Refuse::Everything {
            *refuse = Refuse::Nothing;
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list(prefix).await
    }

    fn owned_by_this_process(&self) -> bool {
        true
    }
}

struct GatedWriter {
    inner: Box<dyn ObjectWriter>,
    path: String,
    refuse: Arc<Mutex<Refuse>>,
}

#[async_trait]
impl ObjectWriter for GatedWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        if *self.refuse.lock().unwrap() != Refuse::Nothing {
            return Err(no_space(&self.path));
        }
        self.inner.write(data).await
    }

    async fn commit(self: Box<Self>) -> Result<(), StorageError> {
        if *self.refuse.lock().unwrap() != Refuse::Nothing {
            let _ = self.inner.abort().await;
            return Err(no_space(&self.path));
        }
        self.inner.commit().await
    }

    async fn abort(self: Box<Self>) -> Result<(), StorageError> {
        self.inner.abort().await
    }
}

fn files_under(dir: &std::path::Path) -> Vec<String> {
    walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .collect()
}

/// The files under `dir` once no document is being published: the local folder writes job state
/// behind (a staged copy renamed into place a moment after the write returns), so a staged file
/// may show for a moment. One that stays past 5 s is a leak.
fn settled_files_under(dir: &std::path::Path) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let files = files_under(dir);
        let staging = files.iter().any(|f| f.starts_with(".staging/"));
        if !staging || std::time::Instant::now() >= deadline {
            return files;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.map(Result::unwrap) {
        if entry.file_type().unwrap().is_dir() {
            found.extend(walk(&entry.path()));
        } else {
            found.push(entry.path());
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_storage_fails_the_export_frees_its_files_and_the_service_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("exports");
    let refuse = Arc::new(Mutex::new(Refuse::ExportFiles));
    let storage = Arc::new(FullDisk {
        inner: LocalFolder::open(&folder).unwrap(),
        refuse: refuse.clone(),
    });
    let server = start_with_storage(&sample_store(), storage, |s| s.max_attempts = 2).await;
    let client = client();

    // Export files refused: each shard is retried, then the job fails saying the storage is full,
    // and nothing of it stays on disk but its state.
    let response = kickoff(&client, &format!("{}/$export", server.base)).await;
    assert_eq!(response.status(), 202);
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let failed = wait_for_end(&client, &status_url, std::time::Duration::from_secs(60)).await;
    assert_eq!(failed.status(), 500);
    let outcome: Value = failed.json().await.unwrap();
    let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(diagnostics.contains("storage is full"), "{diagnostics}");
    let left = settled_files_under(&folder);
    assert!(
        left.iter()
            .all(|f| f.starts_with("fhir-export-jobs/") || f.starts_with(".journal/")),
        "only job state stays: {left:?}"
    );

    // Nothing can be written: a kickoff is a 503 with Retry-After, and leaves no running marker.
    *refuse.lock().unwrap() = Refuse::Everything;
    let refused = kickoff(&client, &format!("{}/$export", server.base)).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "60");
    let outcome: Value = refused.json().await.unwrap();
    assert_eq!(outcome["issue"][0]["code"], "transient");
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("storage is full"));

    // Cancel works while full: the export's files go first, which frees space, then the record.
    // (The failed export stands in for any export: cancelling it removes its state.)
    let cancelled = client.delete(&status_url).send().await.unwrap();
    assert_eq!(cancelled.status(), 202);
    assert_eq!(client.get(&status_url).send().await.unwrap().status(), 404);

    // Space is back: the service exports again without a restart.
    *refuse.lock().unwrap() = Refuse::Nothing;
    let manifest = export(&client, &format!("{}/$export?_type=Patient", server.base)).await;
    let files = download_all(&client, &manifest).await;
    assert_eq!(files.iter().map(|(_, _, l)| l.len()).sum::<usize>(), 100);
    assert!(
        !settled_files_under(&folder)
            .iter()
            .any(|f| f.starts_with(".staging/")),
        "no staged file leaks"
    );
}
