//! `cargo bench --bench remote`: a system export read over FHIR REST from another instance (the
//! remote source) next to the same export read from the embedded store, with the requests it took.
//!
//! The data: the Synthea sample (`../shared`), or generated data when it is absent.
//! Then the same export read from Medplum's FHIR router (tests/medplum, when installed), with the
//! same split of its time; and from Medplum, the export organized by patient against the plain
//! export of the same types, at Patient and at system level.
//!
//! `BENCH_SHARD_MAX` sets `EXPORT_SHARD_MAX_RESOURCES` for the remote export (default 5000, so the
//! big types are split and read in parallel); `BENCH_ROUNDS` how many times the organized and
//! plain exports run in turn (default 3; the medians are reported).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fhir_export::app::{limits_of, serve_local, App};
use fhir_export::config::{Settings, SourceSetting, StorageSetting};
use fhir_export::export::Exports;
use fhir_export::queue::InProcessQueue;
use fhir_export::source::remote::{RemoteAuth, RequestStats};
use fhir_export::source::{import, EmbeddedStore, RemoteServer, ResourceSource};
use fhir_export::storage::{LocalFolder, ObjectStore};
use serde_json::Value;

async fn serve(app: App, receiver: fhir_export::queue::QueueReceiver) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(serve_local(app, receiver, listener, std::future::pending()));
    base
}

fn app(
    settings: Settings,
    source: Arc<dyn ResourceSource>,
    exports: &Path,
) -> (App, fhir_export::queue::QueueReceiver) {
    let storage: Arc<dyn ObjectStore> = Arc::new(LocalFolder::open(exports).unwrap());
    let (queue, receiver) = InProcessQueue::new();
    let exports = Exports::new(source, storage, Arc::new(queue), limits_of(&settings));
    (App::assemble(settings, exports).unwrap(), receiver)
}

/// Kickoff to manifest: (seconds, resources, seconds the kickoff took to answer).
async fn time_export(client: &reqwest::Client, base: &str) -> (f64, u64, f64) {
    time_kickoff(client, &format!("{base}/$export")).await
}

/// Kickoff of `url` to manifest: (seconds, resources and block headers, seconds the kickoff took
/// to answer).
async fn time_kickoff(client: &reqwest::Client, url: &str) -> (f64, u64, f64) {
    let started = Instant::now();
    let response = client
        .get(url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let kickoff = started.elapsed().as_secs_f64();
    let status = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    loop {
        let response = client.get(&status).send().await.unwrap();
        if response.status() == 200 {
            let manifest: Value = response.json().await.unwrap();
            let resources = manifest["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["count"].as_u64().unwrap())
                .sum();
            return (started.elapsed().as_secs_f64(), resources, kickoff);
        }
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The Medplum adapter of the tests, loaded with every NDJSON file under `exports`.
struct Medplum {
    base: String,
    child: std::process::Child,
}

impl Medplum {
    fn start(exports: &Path, data: &Path) -> Option<Medplum> {
        use std::io::BufRead;
        let adapter = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/medplum");
        if !adapter.join("node_modules/@medplum/fhir-router").is_dir() {
            return None;
        }
        std::fs::create_dir_all(data).unwrap();
        let mut folders = vec![exports.to_path_buf()];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    folders.push(path);
                } else if path.extension().is_some_and(|e| e == "ndjson") {
                    std::fs::copy(&path, data.join(entry.file_name())).unwrap();
                }
            }
        }
        let mut child = std::process::Command::new("node")
            .arg(adapter.join("server.mjs"))
            .arg("--load")
            .arg(data)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().strip_prefix("listening on ")?.to_string();
        Some(Medplum {
            base: format!("http://127.0.0.1:{port}"),
            child,
        })
    }
}

impl Drop for Medplum {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One source's row: resources, seconds, rate, requests; then where its time went.
fn report(
    name: &str,
    (resources, seconds, kickoff): (u64, f64, f64),
    before: RequestStats,
    after: RequestStats,
) {
    let requests = after.requests - before.requests;
    let waiting = (after.waiting - before.waiting).as_secs_f64();
    println!(
        "{name:<12} {resources:>10}  {seconds:>7.2}  {:>11.0}  {requests:>8} ({} retries)",
        resources as f64 / seconds,
        after.retries - before.retries,
    );
    println!(
        "  its time: kickoff answered in {:.1} ms (planning is queued); {waiting:.2} s waiting on the source (summed over requests, {:.1} ms each)",
        kickoff * 1000.0,
        waiting * 1000.0 / requests.max(1) as f64,
    );
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        // The service's own log (each shard's time) on stderr.
        let filter = tracing_subscriber::EnvFilter::from_default_env();
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let scratch = tempfile::tempdir().unwrap();
        let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea-r4-100-bulk-data-server/bundles");
        let data = if sample.is_dir() {
            sample
        } else {
            let generated = scratch.path().join("generated");
            fhir_export::generate::write_ndjson(1000, 1, &generated).unwrap();
            generated
        };
        let store_path = scratch.path().join("store.db");
        let store = EmbeddedStore::open(&store_path).unwrap();
        import::import(&store, &[data]).unwrap();
        let shard_max: u64 = std::env::var("BENCH_SHARD_MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);

        let settings = Settings {
            source: SourceSetting::Sqlite(store_path.clone()),
            storage: StorageSetting::Folder(scratch.path().join("a")),
            ..Settings::default()
        };
        let (a, receiver) = app(settings.clone(), Arc::new(store), &scratch.path().join("a"));
        let a_base = serve(a, receiver).await;

        let remote = Arc::new(RemoteServer::new(&a_base, RemoteAuth::None).unwrap());
        let remote_settings = Settings {
            source: SourceSetting::Remote { url: a_base.clone(), auth: fhir_export::config::SourceAuth::None },
            shard_max_resources: shard_max,
            ..settings
        };
        let (b, receiver) = app(remote_settings, remote.clone(), &scratch.path().join("b"));
        let b_base = serve(b, receiver).await;

        let client = reqwest::Client::new();
        let (local_s, local_n, _) = time_export(&client, &a_base).await;
        let before = remote.request_stats();
        let (remote_s, remote_n, remote_kickoff) = time_export(&client, &b_base).await;
        let after = remote.request_stats();
        assert_eq!(local_n, remote_n, "the remote export must hold the same resources");
        println!("source        resources  seconds  resources/s  requests (shards of at most {shard_max})");
        println!("embedded     {local_n:>10}  {local_s:>7.2}  {:>11.0}         -", local_n as f64 / local_s);
        report("remote REST", (remote_n, remote_s, remote_kickoff), before, after);

        // The same export read from Medplum's FHIR router (tests/medplum), loaded with A's export.
        let Some(medplum) = Medplum::start(&scratch.path().join("a"), &scratch.path().join("medplum-data")) else {
            println!("Medplum: not installed (npm ci --prefix tests/medplum); skipped");
            return;
        };
        let from_medplum = Arc::new(RemoteServer::new(&medplum.base, RemoteAuth::None).unwrap());
        let medplum_settings = Settings {
            source: SourceSetting::Remote { url: medplum.base.clone(), auth: fhir_export::config::SourceAuth::None },
            shard_max_resources: shard_max,
            storage: StorageSetting::Folder(scratch.path().join("c")),
            ..Settings::default()
        };
        let (c, receiver) = app(medplum_settings, from_medplum.clone(), &scratch.path().join("c"));
        let c_base = serve(c, receiver).await;
        let before = from_medplum.request_stats();
        let (medplum_s, medplum_n, medplum_kickoff) = time_export(&client, &c_base).await;
        let after = from_medplum.request_stats();
        assert_eq!(local_n, medplum_n, "the export from Medplum must hold the same resources");
        report("Medplum", (medplum_n, medplum_s, medplum_kickoff), before, after);

        // Organized by patient against the plain export of the same types (the Patient
        // compartment's), both from Medplum, in one run: at Patient level (the server counts no
        // compartment, so each type is one shard) and at system level (types cut by count).
        let types: Vec<String> = EmbeddedStore::open(&store_path)
            .unwrap()
            .resource_types(&fhir_export::export::request::is_patient_level_type)
            .unwrap();
        let rows = [
            ("Patient/$export", "/Patient/$export".to_string()),
            ("Patient/$export organized by patient", "/Patient/$export?organizeOutputBy=Patient".to_string()),
            ("$export of the same types", format!("/$export?_type={}", types.join(","))),
            ("$export organized by patient", "/$export?organizeOutputBy=Patient".to_string()),
        ];
        // Rounds in turn (`BENCH_ROUNDS`, 3 unless set); the medians.
        let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
        let mut seconds = vec![Vec::new(); rows.len()];
        for round in 0..rounds.max(1) {
            for (row, (label, path)) in rows.iter().enumerate() {
                let before = from_medplum.request_stats();
                let (s, n, kickoff) = time_kickoff(&client, &format!("{c_base}{path}")).await;
                let after = from_medplum.request_stats();
                if round == 0 {
                    report(&format!("Medplum, {label}"), (n, s, kickoff), before, after);
                }
                seconds[row].push(s);
            }
        }
        let median = |row: usize| {
            let mut all = seconds[row].clone();
            all.sort_by(f64::total_cmp);
            all[all.len() / 2]
        };
        for (row, (label, _)) in rows.iter().enumerate() {
            println!("Medplum, {label}: median {:.2} s of {:.2?}", median(row), seconds[row]);
        }
        println!(
            "Medplum, the Patient compartment's types: organized by patient takes {:.2}x the plain export's time at Patient level, {:.2}x at system level (medians)",
            median(1) / median(0),
            median(3) / median(2)
        );
    });
}
