//! Test support: the sample data, a real server on 127.0.0.1:0, and a Bulk Data client loop.
#![allow(dead_code)]

pub mod azurite;
pub mod hns;
pub mod medplum;
pub mod outside;
pub mod tokens;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use fhir_export::app::{serve_local, App};
use fhir_export::config::{Settings, SourceSetting, StorageSetting};
use fhir_export::export::Exports;
use fhir_export::source::{import, EmbeddedStore};
use serde_json::Value;
use tempfile::TempDir;

#[allow(unused_imports)]
pub use outside::{corpus_dir, outside_corpus, sample_counts, sample_dir, sample_total};

/// One store holding the sample, imported once per test binary; tests only read it.
pub fn sample_store() -> PathBuf {
    static STORE: OnceLock<PathBuf> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let path = scratch_of_this_process().join("sample.db");
            let store = EmbeddedStore::open(&path).unwrap();
            let report = import::import(&store, &[sample_dir()]).unwrap();
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            path
        })
        .clone()
}

/// A folder of this test binary's own for what it keeps to the end (the sample's store, the
/// stand-in sample). A static is never dropped, so the folder is named after the process, and
/// each run removes those of processes that have ended.
fn scratch_of_this_process() -> PathBuf {
    static SCRATCH: OnceLock<PathBuf> = OnceLock::new();
    SCRATCH
        .get_or_init(|| {
            remove_sample_stores_of_ended_processes();
            let dir =
                std::env::temp_dir().join(format!("{SAMPLE_STORE_PREFIX}{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        })
        .clone()
}

const SAMPLE_STORE_PREFIX: &str = "fhir-export-sample-";

fn remove_sample_stores_of_ended_processes() {
    let processes = Path::new("/proc");
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    if !processes.join("self").exists() {
        return; // no way to tell a running test binary's store from a left one
    }
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(SAMPLE_STORE_PREFIX) {
            if !processes.join(pid).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

pub struct Server {
    pub base: String,
    pub exports: PathBuf,
    pub store: PathBuf,
    _dir: TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Starts the local service on `store` with fresh exports folder; `tune` adjusts the settings.
pub async fn start(store: &Path, tune: impl FnOnce(&mut Settings)) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let exports = dir.path().join("exports");
    start_with_exports(store, &exports, dir, tune).await
}

/// Starts the local service reading the FHIR server at `url` (without authentication) rather than
/// `store`; `tune` adjusts the settings further.
pub async fn start_reading(store: &Path, url: &str, tune: impl FnOnce(&mut Settings)) -> Server {
    let url = url.to_string();
    start(store, move |settings| {
        settings.source = SourceSetting::Remote {
            url,
            auth: fhir_export::config::SourceAuth::None,
        };
        tune(settings);
    })
    .await
}

/// Starts the local service on `store` writing to `exports`; `dir` lives as long as the server.
pub async fn start_with_exports(
    store: &Path,
    exports: &Path,
    dir: TempDir,
    tune: impl FnOnce(&mut Settings),
) -> Server {
    start_at(store, exports, dir, 0, tune).await
}

/// As `start_with_exports`, on a given port (0: any free one).
pub async fn start_at(
    store: &Path,
    exports: &Path,
    dir: TempDir,
    port: u16,
    tune: impl FnOnce(&mut Settings),
) -> Server {
    start_app(store, exports, dir, port, None, tune).await
}

/// Starts the local service on `store` with `storage` in place of the exports folder.
pub async fn start_with_storage(
    store: &Path,
    storage: std::sync::Arc<dyn fhir_export::storage::ObjectStore>,
    tune: impl FnOnce(&mut Settings),
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let unused = dir.path().join("unused");
    start_app(store, &unused, dir, 0, Some(storage), tune).await
}

async fn start_app(
    store: &Path,
    exports: &Path,
    dir: TempDir,
    port: u16,
    storage: Option<std::sync::Arc<dyn fhir_export::storage::ObjectStore>>,
    tune: impl FnOnce(&mut Settings),
) -> Server {
    let exports = exports.to_path_buf();
    let mut settings = Settings {
        source: SourceSetting::Sqlite(store.to_path_buf()),
        storage: StorageSetting::Folder(exports.clone()),
        // Retries wait a tenth of a second, not half a minute.
        retry_delay: std::time::Duration::from_millis(100),
        ..Settings::default()
    };
    tune(&mut settings);
    let (mut app, receiver) = App::open_local(settings).unwrap();
    if let Some(storage) = storage {
        let exports = &app.exports;
        let exports = Exports::new(
            exports.source.clone(),
            storage,
            exports.queue.clone(),
            (*exports.limits).clone(),
        );
        let settings = (*app.settings).clone();
        app = App::assemble(settings, exports).unwrap();
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_local(app, receiver, listener, async move {
        let _ = stopped.await;
    }));
    Server {
        base,
        exports,
        store: store.to_path_buf(),
        _dir: dir,
        shutdown: Some(shutdown),
    }
}

/// A loopback port free right now (for a server process started on it, and restarted on it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where the local folder keeps a job's document.
pub fn job_document(exports: &Path, job_id: &str) -> PathBuf {
    exports
        .join("fhir-export-jobs")
        .join(job_id)
        .join("job.json")
}

/// A document of the local folder as a file: written behind the folder's journal, it appears
/// within milliseconds of the request that wrote it, so it is waited for (up to 5 s).
pub async fn published_file(path: &Path) -> Vec<u8> {
    for _ in 0..500 {
        if let Ok(bytes) = std::fs::read(path) {
            return bytes;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} was not written", path.display());
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// GET `url` and read the answer as JSON.
pub async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

pub async fn kickoff(client: &reqwest::Client, url: &str) -> reqwest::Response {
    kickoff_preferring(client, url, "respond-async").await
}

/// A GET kickoff with this `Prefer` header.
pub async fn kickoff_preferring(
    client: &reqwest::Client,
    url: &str,
    prefer: &str,
) -> reqwest::Response {
    client
        .get(url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", prefer)
        .send()
        .await
        .unwrap()
}

/// Kicks off `url` by POST with a `Parameters` body and waits for the manifest.
pub async fn post_export(client: &reqwest::Client, url: &str, parameters: Value) -> Value {
    let response = client
        .post(url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .header("Content-Type", "application/fhir+json")
        .body(parameters.to_string())
        .send()
        .await
        .unwrap();
    wait_for_manifest(client, &accepted(response).await).await
}

/// Kicks off `url` and returns its status URL (the kickoff must be accepted).
pub async fn started(client: &reqwest::Client, url: &str) -> String {
    accepted(kickoff(client, url).await).await
}

/// The status URL of a kickoff answer, which must be 202.
async fn accepted(response: reqwest::Response) -> String {
    let location = response
        .headers()
        .get("content-location")
        .map(|l| l.to_str().unwrap().to_string());
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    location.unwrap()
}

/// Polls a status URL until the export completes; returns the manifest.
pub async fn wait_for_manifest(client: &reqwest::Client, status_url: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        let response = client.get(status_url).send().await.unwrap();
        match response.status().as_u16() {
            200 => return response.json().await.unwrap(),
            202 => {
                let progress = response
                    .headers()
                    .get("x-progress")
                    .expect("X-Progress while running");
                assert!(progress.to_str().unwrap().contains("shards"));
                assert!(response.headers().contains_key("retry-after"));
            }
            other => panic!("status {other}: {}", response.text().await.unwrap()),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "export did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls a status URL while the export runs (202), at most `within`; returns the first other
/// answer (the manifest, or the failure's OperationOutcome).
pub async fn wait_for_end(
    client: &reqwest::Client,
    status_url: &str,
    within: Duration,
) -> reqwest::Response {
    let deadline = std::time::Instant::now() + within;
    loop {
        let response = client.get(status_url).send().await.unwrap();
        if response.status() != 202 {
            return response;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{status_url} still running after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of a manifest's first `error` file (the request's notes).
pub async fn notes_text(client: &reqwest::Client, manifest: &Value) -> String {
    let url = manifest["error"][0]["url"].as_str().unwrap();
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Kicks off `url` and waits for the manifest.
pub async fn export(client: &reqwest::Client, url: &str) -> Value {
    let response = kickoff(client, url).await;
    wait_for_manifest(client, &accepted(response).await).await
}

/// Downloads every output file: (type, url, lines).
pub async fn download_all(
    client: &reqwest::Client,
    manifest: &Value,
) -> Vec<(String, String, Vec<String>)> {
    let mut files = Vec::new();
    for output in manifest["output"].as_array().unwrap() {
        let url = output["url"].as_str().unwrap().to_string();
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(
            response.headers()["content-type"],
            "application/fhir+ndjson"
        );
        let body = response.text().await.unwrap();
        assert!(body.ends_with('\n'), "{url} does not end with a newline");
        let lines: Vec<String> = body.lines().map(str::to_string).collect();
        assert_eq!(
            lines.len() as u64,
            output["count"].as_u64().unwrap(),
            "count of {url}"
        );
        // Files of resource blocks (`organizeOutputBy`) name no type.
        let resource_type = output["type"].as_str().unwrap_or_default();
        files.push((resource_type.to_string(), url, lines));
    }
    files
}

/// Every stored resource's JSON by (type, id).
pub fn stored_resources(store: &Path) -> HashMap<(String, String), String> {
    let conn = rusqlite::Connection::open(store).unwrap();
    let mut statement = conn
        .prepare("SELECT type, id, json FROM resources")
        .unwrap();
    let rows = statement
        .query_map([], |row| {
            Ok((
                (row.get(0)?, row.get(1)?),
                String::from_utf8(row.get::<_, Vec<u8>>(2)?).unwrap(),
            ))
        })
        .unwrap();
    rows.map(Result::unwrap).collect()
}

/// The `Type/id` targets of every `reference` in a compact JSON line.
pub fn references_in(json: &str) -> impl Iterator<Item = (&str, &str)> {
    json.split(r#""reference":""#)
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap())
        .filter(|reference| !reference.starts_with('#'))
        .map(|reference| {
            reference
                .split_once('/')
                .unwrap_or_else(|| panic!("not Type/id: {reference}"))
        })
}
