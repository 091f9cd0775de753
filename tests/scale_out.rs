//! Scale-out on shared storage: no document is written by every shard (each shard keeps its own
//! state), a status poll costs a fixed number of storage requests however many shards, a failed
//! shard waits for its retry in its state instead of coming straight back through the queue, and
//! retention reads only the exports whose time has come.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fhir_export::app::{limits_of, App};
use fhir_export::config::{Settings, SourceSetting, StorageSetting};
use fhir_export::export::jobs::{Job, JobStatus, ShardKind};
use fhir_export::export::state::ShardStatus;
use fhir_export::export::{kickoff as planner, worker, ExportRequest, Exports, Level};
use fhir_export::http::{dispatch, Request};
use fhir_export::queue::{QueueClosed, WorkMessage, WorkQueue};
use fhir_export::source::{
    ResourceSource, ScanError, ScanRequest, Scanned, SinkError, SourceError,
};
use fhir_export::storage::{AzureBlob, StorageError};
use fhir_export::storage::{ByteStream, ETag, LocalFolder, ObjectStore, ObjectWriter, PutMode};
use serde_json::Value;

/// The local folder, counting the requests made of it and the writes to each object.
struct Counting {
    inner: LocalFolder,
    requests: AtomicUsize,
    writes: Mutex<HashMap<String, usize>>,
}

impl Counting {
    fn wrote(&self, path: &str) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        *self.writes.lock().unwrap().entry(path.into()).or_default() += 1;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The most writes any one object received, and which.
    fn most_written(&self) -> (usize, String) {
        let writes = self.writes.lock().unwrap();
        let (path, count) = writes.iter().max_by_key(|(_, count)| **count).unwrap();
        (*count, path.clone())
    }

    fn writes_to(&self, path: &str) -> usize {
        self.writes.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn get(&self, path: &str) -> Result<Option<(Bytes, ETag)>, StorageError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.inner.get(path).await
    }
    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<ETag, StorageError> {
        self.wrote(path);
        self.inner.put(path, data, mode).await
    }
    async fn writer(&self, path: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        self.wrote(path);
        self.inner.writer(path).await
    }
    async fn read_stream(&self, path: &str) -> Result<Option<(u64, ByteStream)>, StorageError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.inner.read_stream(path).await
    }
    async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.inner.delete_prefix(prefix).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.inner.list(prefix).await
    }
}

/// A queue like a Functions output binding: it sends at once, and cannot hold a message back.
#[derive(Default)]
struct Binding(Mutex<Vec<WorkMessage>>);

impl Binding {
    fn take(&self) -> Vec<WorkMessage> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[async_trait]
impl WorkQueue for Binding {
    async fn enqueue(&self, messages: Vec<WorkMessage>) -> Result<(), QueueClosed> {
        self.0.lock().unwrap().extend(messages);
        Ok(())
    }
    async fn enqueue_later(&self, _: WorkMessage, _: Duration) -> Result<(), QueueClosed> {
        Ok(())
    }
}

/// Exports of `store` on `storage`, sending to `queue`, without workers of their own.
fn exports_on(
    store: &Path,
    storage: Arc<dyn ObjectStore>,
    queue: Arc<dyn WorkQueue>,
    source: Option<Arc<dyn ResourceSource>>,
    tune: impl FnOnce(&mut Settings),
) -> App {
    let mut settings = Settings {
        source: SourceSetting::Sqlite(store.to_path_buf()),
        storage: StorageSetting::Folder(std::env::temp_dir().join("unused-scale-out")),
        workers: 0,
        ..Settings::default()
    };
    tune(&mut settings);
    let (app, _local_queue) = App::open_local(settings.clone()).unwrap();
    let source = source.unwrap_or_else(|| app.exports.source.clone());
    let exports = Exports::new(source, storage, queue, limits_of(&settings));
    App::assemble(settings, exports).unwrap()
}

async fn start(exports: &Exports, query: &str) -> Job {
    let request = ExportRequest::from_query(Level::System, query, false, false).unwrap();
    planner::start(
        exports,
        request,
        "http://test/$export".into(),
        "http://test".into(),
        None,
    )
    .await
    .unwrap()
}

/// Runs every message the binding holds, and those they send, until none is left.
async fn drain(exports: &Exports, binding: &Binding) {
    loop {
        let messages = binding.take();
        if messages.is_empty() {
            return;
        }
        for message in messages {
            worker::handle_message(exports, &message).await.unwrap();
        }
    }
}

async fn status(app: &App, id: &str) -> (u16, String) {
    let request = Request {
        method: warp::http::Method::GET,
        path: format!("/_operations/export/{id}"),
        query: String::new(),
        headers: Default::default(),
        body: Bytes::new(),
    };
    let response = match dispatch(&app.api, request).await {
        Ok(response) => response,
        Err(error) => return (error.status.as_u16(), String::new()),
    };
    let progress = response
        .headers()
        .get("x-progress")
        .map(|p| p.to_str().unwrap().to_string())
        .unwrap_or_default();
    (response.status().as_u16(), progress)
}

/// A store of generated data loaded type by type, which the embedded store cuts into parts of
/// any size; and how many resources it holds.
fn dense_store(dir: &Path) -> (PathBuf, usize) {
    use fhir_export::source::{import, EmbeddedStore};
    let generated = dir.join("generated");
    fhir_export::generate::write_ndjson(20, 7, &generated).unwrap();
    let path = dir.join("dense.db");
    let store = EmbeddedStore::open(&path).unwrap();
    let report = import::import(&store, &[generated]).unwrap();
    assert!(report.failed.is_empty());
    let count = store.stored_resources().unwrap() as usize;
    (path, count)
}

/// One export cut into shards of at most `per_shard` resources: the counted storage, the number
/// of shards, and what a status poll cost with half of them done, and once completed.
async fn export_counted(per_shard: u64) -> (Arc<Counting>, usize, usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let (store, total) = dense_store(dir.path());
    let storage = Arc::new(Counting {
        inner: LocalFolder::open(dir.path().join("exports")).unwrap(),
        requests: AtomicUsize::new(0),
        writes: Mutex::default(),
    });
    let binding = Arc::new(Binding::default());
    let app = exports_on(&store, storage.clone(), binding.clone(), None, |s| {
        s.shard_max_resources = per_shard
    });
    let exports = &app.exports;
    let job = start(exports, "").await;
    for message in binding.take() {
        worker::handle_message(exports, &message).await.unwrap();
    }
    let shards = binding.take();
    let half = shards.len() / 2;
    for message in &shards[..half] {
        worker::handle_message(exports, message).await.unwrap();
    }
    let before = storage.requests();
    let (code, progress) = status(&app, &job.id).await;
    let running_poll = storage.requests() - before;
    assert_eq!(code, 202);
    assert!(
        progress.contains(&format!("({half}/{} shards)", shards.len())),
        "{progress}"
    );
    for message in &shards[half..] {
        worker::handle_message(exports, message).await.unwrap();
    }
    drain(exports, &binding).await;
    let before = storage.requests();
    assert_eq!(status(&app, &job.id).await.0, 200);
    let completed_poll = storage.requests() - before;

    // Every resource exactly once.
    let manifest: Value =
        serde_json::from_slice(&exports.jobs.manifest(&job.id).await.unwrap().unwrap()).unwrap();
    let mut ids = std::collections::HashSet::new();
    let mut lines = 0;
    for file in manifest["output"].as_array().unwrap() {
        let path = file["url"]
            .as_str()
            .unwrap()
            .strip_prefix("http://test/_exports/")
            .unwrap();
        let (body, _) = storage.inner.get(path).await.unwrap().unwrap();
        for line in std::str::from_utf8(&body).unwrap().lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            ids.insert(format!("{}/{}", resource["resourceType"], resource["id"]));
            lines += 1;
        }
    }
    assert_eq!((lines, ids.len()), (total, total), "every resource once");
    let job_document = format!("fhir-export-jobs/{}/job.json", job.id);
    assert_eq!(
        storage.writes_to(&job_document),
        3,
        "the job's document: kickoff, plan, end"
    );
    (storage, shards.len(), running_poll, completed_poll)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_object_is_written_by_every_shard_and_a_status_poll_costs_the_same_at_any_size() {
    let (few, few_shards, few_running, few_completed) = export_counted(250_000).await;
    let (many, many_shards, many_running, many_completed) = export_counted(6).await;
    println!(
        "{few_shards} shards: {few:?}; {many_shards} shards: {many:?}",
        few = few.most_written(),
        many = many.most_written()
    );
    assert!(many_shards >= 100, "{many_shards} shards");
    assert_eq!(
        few.most_written().0,
        many.most_written().0,
        "the most writes any object received"
    );
    assert!(many.most_written().0 <= 3);
    // A running job: its document and one listing of the done markers. A completed one: its
    // document and the manifest.
    assert_eq!((few_running, many_running), (2, 2));
    assert_eq!((few_completed, many_completed), (2, 2));
}

/// Retention reads no export before its time: a pass over the kept exports costs one listing of
/// their ended markers however many are kept, after a process's first pass, which lists every job
/// document once to mark the exports ended without a marker (under a version before them); those
/// are removed in their time too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_lists_the_ended_markers_and_reads_only_the_exports_due() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(Counting {
        inner: LocalFolder::open(dir.path().join("exports")).unwrap(),
        requests: AtomicUsize::new(0),
        writes: Mutex::default(),
    });
    let binding = Arc::new(Binding::default());
    let sample = common::sample_store();
    let app = exports_on(&sample, storage.clone(), binding.clone(), None, |_| {});
    let exports = &app.exports;
    let mut folders = Vec::new();
    for _ in 0..4 {
        let job = start(exports, "_type=Patient,Condition").await;
        drain(exports, &binding).await;
        assert_eq!(status(&app, &job.id).await.0, 200);
        assert!(!storage
            .inner
            .list(&job.output_folder)
            .await
            .unwrap()
            .is_empty());
        folders.push(job.output_folder);
    }
    assert_eq!(exports.remove_expired().await.unwrap(), 0, "none is due");
    let before = storage.requests();
    assert_eq!(exports.remove_expired().await.unwrap(), 0);
    assert_eq!(
        storage.requests() - before,
        1,
        "one listing, no export read"
    );

    let markers = exports.jobs.ended_markers().await.unwrap();
    assert_eq!(markers.len(), 4);
    exports.jobs.remove_ended_marker(&markers[0]).await.unwrap();
    let later = exports_on(&sample, storage.clone(), binding.clone(), None, |s| {
        s.retention = Duration::ZERO
    });
    assert_eq!(later.exports.remove_expired().await.unwrap(), 4);
    for folder in &folders {
        assert!(storage.inner.list(folder).await.unwrap().is_empty());
    }
    let left = storage.inner.list("fhir-export-jobs").await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}

/// A source whose `Condition` scans fail.
struct ConditionDown(Arc<dyn ResourceSource>);

impl ResourceSource for ConditionDown {
    fn resource_types(&self, wanted: &dyn Fn(&str) -> bool) -> Result<Vec<String>, SourceError> {
        self.0.resource_types(wanted)
    }
    fn read(&self, resource_type: &str, id: &str) -> Result<Option<Vec<u8>>, SourceError> {
        self.0.read(resource_type, id)
    }
    fn scan(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        match request.resource_type {
            "Condition" => Err(SourceError::Remote("503 from the server".into()).into()),
            _ => self.0.scan(request, sink),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shard_waits_for_its_retry_and_the_sweeper_sends_it_once_when_due() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(LocalFolder::open(dir.path()).unwrap());
    let binding = Arc::new(Binding::default());
    let sample = common::sample_store();
    let plain = exports_on(&sample, storage.clone(), binding.clone(), None, |_| {});
    let app = exports_on(
        &sample,
        storage,
        binding.clone(),
        Some(Arc::new(ConditionDown(plain.exports.source.clone()))),
        |s| {
            s.retry_delay = Duration::from_secs(2);
            s.max_attempts = 2;
        },
    );
    let exports = &app.exports;
    let job = start(exports, "_type=Patient,Condition").await;
    for message in binding.take() {
        worker::handle_message(exports, &message).await.unwrap();
    }
    let (job, _) = exports.jobs.load(&job.id).await.unwrap().unwrap();
    let condition = job
        .shards
        .iter()
        .position(|shard| shard.resource_type == "Condition")
        .unwrap();
    assert_eq!(binding.take().len(), 2, "the two shards sent");

    // It fails: no message goes out, its state waits for the retry, 1 to 2 s from now.
    let failed_at = chrono::Utc::now();
    let message = WorkMessage::shard(&job.id, condition);
    worker::handle_message(exports, &message).await.unwrap();
    assert!(binding.take().is_empty(), "a retry is not sent at once");
    let state = exports
        .jobs
        .shard(&job.id, condition)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((state.status, state.attempts), (ShardStatus::Waiting, 1));
    let retry_at = state.retry_at.unwrap();
    let wait = (retry_at - failed_at).num_milliseconds();
    assert!((900..=2_100).contains(&wait), "waits {wait} ms");
    assert!(state.last_error.unwrap().contains("503 from the server"));

    // A message that arrives early (a redelivery) is skipped; the sweeper leaves it until due.
    worker::handle_message(exports, &message).await.unwrap();
    assert_eq!(exports.sweep_stale().await.unwrap().requeued_shards, 0);
    assert!(binding.take().is_empty());
    let state = exports
        .jobs
        .shard(&job.id, condition)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((state.status, state.attempts), (ShardStatus::Waiting, 1));

    // Due: the sweeper sends it once, and not again while it waits in the queue.
    let due = (retry_at - chrono::Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(due + Duration::from_millis(20)).await;
    assert_eq!(exports.sweep_stale().await.unwrap().requeued_shards, 1);
    assert_eq!(binding.take(), std::slice::from_ref(&message));
    assert_eq!(exports.sweep_stale().await.unwrap().requeued_shards, 0);
    assert!(binding.take().is_empty());

    // The second attempt fails too: at the cap, the job fails naming the shard.
    worker::handle_message(exports, &message).await.unwrap();
    let (code, _) = status(&app, &job.id).await;
    assert_eq!(code, 500);
    let (job, _) = exports.jobs.load(&job.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    let failure = job.failure.unwrap();
    assert!(
        failure.contains(&format!("shard {condition} (Condition) failed 2 times")),
        "{failure}"
    );
}

/// A GET through the API: status, `Content-Type`, and the body (the OperationOutcome's text for
/// an error).
async fn get(app: &App, path_and_query: &str) -> (u16, String, String) {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let request = Request {
        method: warp::http::Method::GET,
        path: path.to_string(),
        query: query.to_string(),
        headers: Default::default(),
        body: Bytes::new(),
    };
    match dispatch(&app.api, request).await {
        Ok(response) => {
            let code = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            (
                code,
                content_type,
                String::from_utf8(body.to_vec()).unwrap(),
            )
        }
        Err(error) => (
            error.status.as_u16(),
            String::new(),
            String::from_utf8(error.outcome.to_json()).unwrap(),
        ),
    }
}

/// Follows a manifest's `next` links from page 1: each page served, by its URL.
async fn pages_from(app: &App, id: &str) -> Vec<(String, u16, Value)> {
    let mut pages = Vec::new();
    let mut url = format!("http://test/_operations/export/{id}");
    loop {
        let (code, content_type, body) = get(app, url.strip_prefix("http://test").unwrap()).await;
        if body.is_empty() {
            assert_eq!(code, 202, "no body: only while nothing is finished");
            return pages;
        }
        assert_eq!(content_type, "application/json", "{body}");
        let page: Value = serde_json::from_str(&body).unwrap();
        let next = page["link"][0]["url"].as_str().map(str::to_string);
        pages.push((url, code, page));
        match next {
            Some(next) => url = next,
            None => return pages,
        }
    }
}

/// `allowPartialManifests=true`: while the export runs, a poll answers 202 with the files of the
/// shards finished so far; every page holds at most `EXPORT_MANIFEST_PAGE_SIZE` files and never
/// changes once served (only a `next` link is added); the complete manifest's pages list every
/// file once, as the unpaged manifest does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_manifests_list_finished_files_in_pages_that_never_change() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = dense_store(dir.path());
    let storage = Arc::new(LocalFolder::open(dir.path().join("exports")).unwrap());
    let binding = Arc::new(Binding::default());
    let app = exports_on(&store, storage, binding.clone(), None, |s| {
        s.shard_max_resources = 40;
        s.manifest_page_size = 3;
        s.file_max_bytes = 8_192;
    });
    let exports = &app.exports;
    let job = start(
        exports,
        "allowPartialManifests=true&_type=Patient,Observation",
    )
    .await;
    let status_path = format!("/_operations/export/{}", job.id);
    assert_eq!(get(&app, &status_path).await.0, 202);
    for message in binding.take() {
        worker::handle_message(exports, &message).await.unwrap();
    }
    let shards = binding.take();
    assert!(shards.len() >= 4, "{} shards", shards.len());
    let (code, _, body) = get(&app, &status_path).await;
    assert_eq!((code, body.as_str()), (202, ""), "nothing finished yet");

    let mut served: HashMap<String, Value> = HashMap::new();
    let mut listed_while_running = 0;
    for message in &shards {
        worker::handle_message(exports, message).await.unwrap();
        let pages = pages_from(&app, &job.id).await;
        for (url, code, page) in &pages {
            let outputs = page["output"].as_array().unwrap();
            assert!(outputs.len() <= 3, "{url}: {} files", outputs.len());
            if let Some(before) = served.get(url) {
                assert_eq!(before["output"], page["output"], "{url} changed");
                if before.get("link").is_some() {
                    assert_eq!(before["link"], page["link"], "{url}'s link changed");
                }
            }
            served.insert(url.clone(), page.clone());
            if *code == 202 {
                listed_while_running += outputs.len();
            }
        }
    }
    assert!(listed_while_running > 0, "files listed while running");
    drain(exports, &binding).await;

    let pages = pages_from(&app, &job.id).await;
    assert!(pages.len() > 1, "{} pages", pages.len());
    let mut urls = Vec::new();
    for (url, code, page) in &pages {
        assert_eq!(*code, 200, "{url}");
        assert_eq!(page["transactionTime"], pages[0].2["transactionTime"]);
        assert_eq!(page["request"], pages[0].2["request"]);
        assert_eq!(page["error"], pages[0].2["error"]);
        if let Some(before) = served.get(url) {
            assert_eq!(before["output"], page["output"], "{url} changed at the end");
        }
        for output in page["output"].as_array().unwrap() {
            urls.push(output["url"].as_str().unwrap().to_string());
        }
    }
    let manifest: Value =
        serde_json::from_slice(&exports.jobs.manifest(&job.id).await.unwrap().unwrap()).unwrap();
    let mut whole: Vec<String> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["url"].as_str().unwrap().to_string())
        .collect();
    let listed = urls.len();
    urls.sort();
    urls.dedup();
    whole.sort();
    assert_eq!(urls.len(), listed, "no file listed twice");
    assert_eq!(urls, whole, "the pages list every file");
    assert!(whole.len() > 6, "{} files", whole.len());

    // Pages are numbered from 1; one not (yet) linked is not found.
    for query in [
        "page=0",
        "page=+1",
        "page=1.0",
        "page=",
        "page=2&page=3",
        "page=1&page=1",
    ] {
        let (code, _, body) = get(&app, &format!("{status_path}?{query}")).await;
        assert_eq!(code, 400, "{query}: {body}");
        assert!(body.contains("page"), "{query}: {body}");
    }
    let beyond = pages.len() + 1;
    let (code, _, _) = get(&app, &format!("{status_path}?page={beyond}")).await;
    assert_eq!(code, 404);
}

/// A source that reads compartments in batches (as a FHIR server does), over another.
struct Batched(Arc<dyn ResourceSource>);

impl ResourceSource for Batched {
    fn resource_types(&self, wanted: &dyn Fn(&str) -> bool) -> Result<Vec<String>, SourceError> {
        self.0.resource_types(wanted)
    }
    fn read(&self, resource_type: &str, id: &str) -> Result<Option<Vec<u8>>, SourceError> {
        self.0.read(resource_type, id)
    }
    fn count(&self, request: &ScanRequest<'_>) -> Result<Option<u64>, SourceError> {
        self.0.count(request)
    }
    fn scan(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        self.0.scan(request, sink)
    }
}

/// An organized export's resources by the patient whose block holds them, each once.
async fn organized_blocks(
    storage: &dyn ObjectStore,
    exports: &Exports,
    job_id: &str,
) -> (
    std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    usize,
) {
    let manifest: Value =
        serde_json::from_slice(&exports.jobs.manifest(job_id).await.unwrap().unwrap()).unwrap();
    let outputs = manifest["output"].as_array().unwrap();
    let mut blocks: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for output in outputs {
        let path = output["url"]
            .as_str()
            .unwrap()
            .strip_prefix("http://test/_exports/")
            .unwrap();
        let (body, _) = storage.get(path).await.unwrap().unwrap();
        let mut patient = String::new();
        for line in std::str::from_utf8(&body).unwrap().lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            if resource["resourceType"] == "Parameters" {
                let reference = &resource["parameter"][0]["valueReference"]["reference"];
                patient = reference.as_str().unwrap().to_string();
                continue;
            }
            let key = format!("{}/{}", resource["resourceType"], resource["id"]);
            assert!(
                blocks
                    .entry(patient.clone())
                    .or_default()
                    .insert(key.clone()),
                "{key} twice"
            );
        }
    }
    (blocks, outputs.len())
}

/// Handles the queued messages, and those they queue, until none is left; returns how many shard
/// runs there were.
async fn work_off(binding: &Binding, exports: &Exports) -> usize {
    let mut runs = 0;
    loop {
        let messages = binding.take();
        if messages.is_empty() {
            return runs;
        }
        for message in messages {
            runs += usize::from(message.shard.is_some());
            worker::handle_message(exports, &message).await.unwrap();
        }
    }
}

/// Organized by patient from a source that cannot stream compartments (as a FHIR server), a
/// first phase reads each type once, as a plain export does, and sorts each resource into the
/// section of its patient's shard; the shards of blocks wait for it, then write their blocks
/// from their sections. The blocks are those of the embedded store's export, whether the first
/// phase's shards pause at their time box or not, on a local folder or on Azure Blob (Azurite:
/// the sections read by ranged downloads), with partition files written while their shard reads
/// on, and no partition is left once it completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organized_shards_from_a_source_of_types_write_their_blocks_from_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("generated");
    fhir_export::generate::write_ndjson(250, 11, &generated).unwrap();
    let store = dir.path().join("many.db");
    let report = fhir_export::source::import::import(
        &fhir_export::source::EmbeddedStore::open(&store).unwrap(),
        &[generated],
    )
    .unwrap();
    assert!(report.failed.is_empty());
    let mut results = Vec::new();
    // Small files: each partition shard writes several partition files, one while it reads on.
    let mut partition_files = 0;
    for (batched, time_box, on_azurite, small_files) in [
        (false, None, false, false),
        (true, None, false, false),
        (true, Some(Duration::from_millis(1)), false, false),
        (true, None, true, false),
        (true, None, false, true),
    ] {
        let storage: Arc<dyn ObjectStore> = match on_azurite {
            true => Arc::new(AzureBlob::new(&common::azurite::sas_url(), None).unwrap()),
            false => {
                Arc::new(LocalFolder::open(dir.path().join(results.len().to_string())).unwrap())
            }
        };
        let binding = Arc::new(Binding::default());
        let plain = exports_on(&store, storage.clone(), binding.clone(), None, |_| {});
        let source: Arc<dyn ResourceSource> = match batched {
            true => Arc::new(Batched(plain.exports.source.clone())),
            false => plain.exports.source.clone(),
        };
        let app = exports_on(
            &store,
            storage.clone(),
            binding.clone(),
            Some(source),
            |s| {
                s.shard_max_time = time_box;
                s.shard_max_resources = 2_000;
                if small_files {
                    s.file_max_bytes = 65_536;
                }
            },
        );
        let job = start(&app.exports, "organizeOutputBy=Patient").await;
        let runs = work_off(&binding, &app.exports).await;
        let (blocks, _) = organized_blocks(storage.as_ref(), &app.exports, &job.id).await;
        let (job, _) = app.exports.jobs.load(&job.id).await.unwrap().unwrap();
        let kinds: Vec<ShardKind> = job.shards.iter().map(|shard| shard.kind).collect();
        if small_files {
            for index in fhir_export::export::partitions::partition_shards(&job) {
                let state = app.exports.jobs.shard(&job.id, index).await.unwrap();
                partition_files = partition_files.max(state.unwrap().outputs.len());
            }
        }
        let left = storage.list(&job.output_folder).await.unwrap();
        assert!(
            left.iter().all(|path| !path.contains("_partitions")),
            "{left:?}"
        );
        results.push((blocks, kinds, runs));
    }
    let (streamed, streamed_kinds, _) = &results[0];
    assert_eq!(streamed.len(), 250);
    assert!(!streamed_kinds.contains(&ShardKind::Partition));
    assert!(streamed_kinds.len() >= 3, "{streamed_kinds:?}");
    for (blocks, kinds, runs) in &results[1..] {
        let partitions = kinds.iter().filter(|k| **k == ShardKind::Partition).count();
        assert!(kinds.len() - partitions >= 3, "{kinds:?}: shards of blocks");
        assert!(partitions >= 10, "{partitions} partition shards");
        assert!(blocks == streamed, "the same blocks");
        assert!(*runs >= kinds.len(), "{runs} runs");
    }
    assert_eq!(results[1].2, results[1].1.len(), "a run a shard, unpaused");
    assert_eq!(
        results[3].2,
        results[3].1.len(),
        "a run a shard, on Azurite"
    );
    assert!(
        results[2].2 > results[2].1.len(),
        "paused: {} runs",
        results[2].2
    );
    assert!(
        partition_files >= 3,
        "{partition_files} files of one partition shard"
    );
}

/// Organized by patient from the embedded store, which reads a shard's patients in groups of
/// neighbours (12,000 links each): a time-boxed shard pauses between groups and its continuation
/// reads the next, so that every resource is written once, in the same blocks as an export that
/// never paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organized_shards_of_the_embedded_store_pause_between_groups_of_patients() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::sample_store();
    let mut results = Vec::new();
    for time_box in [None, Some(Duration::from_millis(1))] {
        let storage = Arc::new(
            LocalFolder::open(dir.path().join(format!("exports-{}", time_box.is_some()))).unwrap(),
        );
        let binding = Arc::new(Binding::default());
        let app = exports_on(&store, storage.clone(), binding.clone(), None, |s| {
            s.shard_max_time = time_box
        });
        let job = start(&app.exports, "organizeOutputBy=Patient").await;
        let runs = work_off(&binding, &app.exports).await;
        let (blocks, _) = organized_blocks(storage.as_ref(), &app.exports, &job.id).await;
        results.push((blocks, runs));
    }
    let (whole, whole_runs) = &results[0];
    let (paused, paused_runs) = &results[1];
    assert_eq!(whole.len(), common::sample_counts()["Patient"]);
    // A run per shard (one for the sample, two for a fresh clone's larger stand-in), against a
    // run per group.
    let links: usize = whole.values().map(|keys| keys.len()).sum();
    assert!(*whole_runs <= 2, "{whole_runs} runs");
    assert!(
        *paused_runs > *whole_runs && *paused_runs >= links / 12_000,
        "{paused_runs} runs for {links} resources in blocks"
    );
    assert!(paused == whole, "the same blocks");
    let mut seen = std::collections::HashSet::new();
    for keys in whole.values() {
        for key in keys {
            assert!(seen.insert(key), "{key} in two blocks");
        }
    }
}

/// One policy for a failed export's files, whoever fails it: an export the sweeper fails at the
/// restart cap loses its finished shards' files at once, as one its worker fails does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_the_sweeper_fails_at_the_cap_keeps_no_files() {
    use fhir_export::export::jobs::Change;
    use fhir_export::export::state::ShardState;
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(LocalFolder::open(dir.path()).unwrap());
    let binding = Arc::new(Binding::default());
    let app = exports_on(
        &common::sample_store(),
        storage.clone(),
        binding.clone(),
        None,
        |s| s.max_attempts = 1,
    );
    let exports = &app.exports;
    let job = start(exports, "_type=Patient,Condition").await;
    for message in binding.take() {
        worker::handle_message(exports, &message).await.unwrap();
    }
    let (job, _) = exports.jobs.load(&job.id).await.unwrap().unwrap();
    let index_of = |resource_type: &str| {
        job.shards
            .iter()
            .position(|shard| shard.resource_type == resource_type)
            .unwrap()
    };
    assert_eq!(binding.take().len(), 2, "the two shards sent");
    // Patient's shard runs to its end: its file is written.
    worker::handle_message(exports, &WorkMessage::shard(&job.id, index_of("Patient")))
        .await
        .unwrap();
    assert!(!storage.list(&job.output_folder).await.unwrap().is_empty());
    // Condition's shard: claimed by a worker that went silent, at its last attempt.
    let silent = chrono::Utc::now() - chrono::Duration::hours(1);
    exports
        .jobs
        .update_shard(
            &job.id,
            index_of("Condition"),
            &ShardState::queued_at(silent),
            |shard| {
                shard.status = ShardStatus::Running;
                shard.attempts = 1;
                shard.heartbeat = silent;
                Change::Write(())
            },
        )
        .await
        .unwrap();
    exports.sweep_stale().await.unwrap();
    let (ended, _) = exports.jobs.load(&job.id).await.unwrap().unwrap();
    assert_eq!(ended.status, JobStatus::Failed, "{:?}", ended.failure);
    let left = storage.list(&job.output_folder).await.unwrap();
    assert!(left.is_empty(), "files of a failed export kept: {left:?}");
}
