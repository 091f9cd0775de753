//! Crash recovery: the real `handler serve` process is killed with SIGKILL during exports, at named
//! points (planning, recording, claiming a shard, mid-file, between files, after a shard, after the
//! manifest) and at random moments, then restarted on the same store and exports folder. Every
//! export it answered 202 to completes with every resource exactly once and no leftover file; a
//! `_since` export lists every deletion exactly once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fhir_export::source::{import, EmbeddedStore};
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// Small files, so an export has many files and a kill often lands mid-file.
const FILE_MAX_BYTES: &str = "65536";

#[derive(Debug, Clone)]
enum Kill {
    /// The process kills itself at the Nth time it reaches the point (`EXPORT_CRASH_AT`).
    At(&'static str, u64),
    /// The test kills it this long after the kickoff was sent.
    After(Duration),
}

/// A generated population (about 3,700 resources) in its own store.
fn generated_store(dir: &Path) -> PathBuf {
    let data = dir.join("data");
    fhir_export::generate::write_ndjson(100, 7, &data).unwrap();
    let path = dir.join("store.db");
    let report = import::import(&EmbeddedStore::open(&path).unwrap(), &[data]).unwrap();
    assert!(report.failed.is_empty());
    path
}

fn spawn(
    store: &Path,
    exports: &Path,
    port: u16,
    (crash_at, source): (Option<&str>, Option<&str>),
) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_handler"));
    command
        .args(["serve", "--port", &port.to_string(), "--workers", "2"])
        .arg("--store")
        .arg(source.unwrap_or(store.to_str().unwrap()))
        .arg("--exports")
        .arg(exports)
        .args(["--file-max-bytes", FILE_MAX_BYTES])
        .env("RUST_LOG", "error")
        .env_remove("EXPORT_CRASH_AT")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(point) = crash_at {
        command.env("EXPORT_CRASH_AT", point);
    }
    if source.is_some() {
        // Small shards: an organized export has several shards of blocks, and many partitions.
        command.env("EXPORT_SHARD_MAX_RESOURCES", "500");
    }
    command.spawn().unwrap()
}

/// Waits until the service answers; false when it died first (a crash point reached while it
/// resumed its unfinished work at start).
async fn wait_ready(client: &reqwest::Client, base: &str, child: &mut Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(format!("{base}/metadata")).send().await {
            if response.status() == 200 {
                return true;
            }
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        assert!(Instant::now() < deadline, "the service did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_killed(child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(
                status.signal(),
                Some(9),
                "the process ended without SIGKILL: {status}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the crash point was never reached"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every file a reader can see right now: whole lines of JSON, ending with a newline.
fn assert_visible_files_complete(exports: &Path) {
    for path in files_under(exports) {
        let relative = path.strip_prefix(exports).unwrap();
        if relative.starts_with(".staging") || !path.to_string_lossy().ends_with(".ndjson") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with('\n'),
            "{} is visible half-written",
            path.display()
        );
        for line in text.lines() {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("{}: a broken line ({e})", path.display()));
        }
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

fn job_ids(exports: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(exports.join("fhir-export-jobs")) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.len() == 32)
        .collect()
}

type Keys = BTreeSet<(String, String)>;

/// What an export must hold: the resources of its `output`, and those its `deleted` deletes.
struct Expected {
    query: &'static str,
    output: Keys,
    deleted: Keys,
    /// The FHIR server the service reads (`--store URL`), rather than the store.
    source: Option<String>,
}

/// Waits for the job's manifest and checks it: every expected resource and deletion exactly once,
/// and the output folder holding exactly the listed files.
async fn assert_complete(
    client: &reqwest::Client,
    base: &str,
    exports: &Path,
    id: &str,
    expected: &Expected,
    label: &str,
) {
    let manifest =
        common::wait_for_manifest(client, &format!("{base}/_operations/export/{id}")).await;
    let mut seen = BTreeMap::<(String, String), u32>::new();
    let mut listed = BTreeSet::new();
    let mut deleted = BTreeMap::<(String, String), u32>::new();
    for file in manifest["error"].as_array().unwrap() {
        let url = file["url"].as_str().unwrap();
        listed.insert(url.split("/_exports/").nth(1).unwrap().to_string());
    }
    for file in manifest["deleted"].as_array().unwrap() {
        let url = file["url"].as_str().unwrap();
        listed.insert(url.split("/_exports/").nth(1).unwrap().to_string());
        let body = client.get(url).send().await.unwrap().text().await.unwrap();
        assert_eq!(body.lines().count() as u64, file["count"].as_u64().unwrap());
        for line in body.lines() {
            let bundle: Value = serde_json::from_str(line).unwrap();
            let target = bundle["entry"][0]["request"]["url"].as_str().unwrap();
            let (t, id) = target.split_once('/').unwrap();
            *deleted.entry((t.to_string(), id.to_string())).or_default() += 1;
        }
    }
    let twice: Vec<_> = deleted.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{label}: deleted twice: {twice:?}");
    let deleted: Keys = deleted.into_keys().collect();
    assert!(
        deleted == expected.deleted,
        "{label}: other deletions listed ({} of {})",
        deleted.len(),
        expected.deleted.len()
    );
    for (resource_type, url, lines) in common::download_all(client, &manifest).await {
        listed.insert(url.split("/_exports/").nth(1).unwrap().to_string());
        for line in lines {
            let resource: Value = serde_json::from_str(&line).unwrap();
            let organized = manifest["outputOrganizedBy"] == "Patient";
            if organized && resource["resourceType"] == "Parameters" {
                continue;
            }
            if !organized {
                assert_eq!(resource["resourceType"], resource_type.as_str());
            }
            let key = (
                resource["resourceType"].as_str().unwrap().to_string(),
                resource["id"].as_str().unwrap().to_string(),
            );
            *seen.entry(key).or_default() += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "{label}: written twice: {twice:?}");
    let exported: BTreeSet<_> = seen.into_keys().collect();
    assert_eq!(
        exported.len(),
        expected.output.len(),
        "{label}: {} resources exported, {} stored",
        exported.len(),
        expected.output.len()
    );
    assert!(
        exported == expected.output,
        "{label}: other resources exported"
    );

    let job_file = common::job_document(exports, id);
    let job: Value = serde_json::from_slice(&common::published_file(&job_file).await).unwrap();
    let folder = exports.join(job["outputFolder"].as_str().unwrap());
    let on_disk: BTreeSet<String> = files_under(&folder)
        .iter()
        .map(|p| {
            p.strip_prefix(exports)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(on_disk, listed, "{label}: files beside the manifest's");
    let staged = files_under(&exports.join(".staging"));
    assert!(staged.is_empty(), "{label}: staged leftovers {staged:?}");
}

/// One export through `kills`, then a clean restart that must finish it (with no kills, the
/// export runs undisturbed). Returns the time from that restart to the checked manifest.
async fn run_scenario(store: &Path, expected: &Expected, kills: &[Kill]) -> Duration {
    let client = common::client();
    let dir = tempfile::tempdir().unwrap();
    let exports = dir.path().join("exports");
    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let label = format!("{kills:?}");
    let mut answered = None;
    for (round, kill) in kills.iter().enumerate() {
        let crash_at = match kill {
            Kill::At(point, nth) => Some(format!("{point}@{nth}")),
            Kill::After(_) => None,
        };
        let source = expected.source.as_deref();
        let mut child = spawn(store, &exports, port, (crash_at.as_deref(), source));
        let ready = wait_ready(&client, &base, &mut child).await;
        assert!(ready || round > 0, "{label}: the service did not start");
        if round == 0 {
            let kickoff = {
                let client = client.clone();
                let url = format!("{base}/$export{}", expected.query);
                tokio::spawn(async move {
                    let response = client
                        .get(url)
                        .header("Accept", "application/fhir+json")
                        .header("Prefer", "respond-async")
                        .send()
                        .await
                        .ok()?;
                    (response.status() == 202).then(|| {
                        response.headers()["content-location"]
                            .to_str()
                            .unwrap()
                            .to_string()
                    })
                })
            };
            if let Kill::After(delay) = kill {
                tokio::time::sleep(*delay).await;
                child.kill().unwrap();
            }
            wait_killed(&mut child).await;
            answered = kickoff.await.unwrap();
        } else {
            if let Kill::After(delay) = kill {
                tokio::time::sleep(*delay).await;
                child.kill().unwrap();
            }
            wait_killed(&mut child).await;
        }
        assert_visible_files_complete(&exports);
    }

    let mut child = spawn(store, &exports, port, (None, expected.source.as_deref()));
    assert!(
        wait_ready(&client, &base, &mut child).await,
        "{label}: the service did not start"
    );
    let started = Instant::now();
    if kills.is_empty() {
        let response = common::kickoff(&client, &format!("{base}/$export{}", expected.query)).await;
        assert_eq!(response.status(), 202);
        let location = response.headers()["content-location"].to_str().unwrap();
        let id = location.rsplit('/').next().unwrap();
        common::published_file(&common::job_document(&exports, id)).await;
    }
    let ids = job_ids(&exports);
    if let Some(location) = &answered {
        let id = location.rsplit('/').next().unwrap();
        assert!(
            ids.iter().any(|j| j == id),
            "{label}: an answered export was lost"
        );
    }
    assert!(ids.len() <= 1, "{label}: {ids:?}");
    for id in &ids {
        assert_complete(&client, &base, &exports, id, expected, &label).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_any_point_an_export_finishes_with_every_resource_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = generated_store(dir.path());
    let expected = Expected {
        query: "",
        output: common::stored_resources(&store).into_keys().collect(),
        deleted: Keys::new(),
        source: None,
    };
    assert!(expected.output.len() > 3000);

    // How long one undisturbed export takes, kickoff to manifest, to aim the random kills.
    let baseline = run_scenario(&store, &expected, &[]).await;

    let mut kills: Vec<Vec<Kill>> = [
        ("kickoff-planned", 1),
        ("kickoff-recorded", 1),
        ("shard-claimed", 1),
        ("shard-claimed", 4),
        ("file-block-written", 1),
        ("file-block-written", 3),
        ("file-block-written", 12),
        ("file-committed", 1),
        ("file-committed", 5),
        ("file-committed", 15),
        ("shard-done", 1),
        ("shard-done", 6),
        ("manifest-written", 1),
    ]
    .into_iter()
    .map(|(point, nth)| vec![Kill::At(point, nth)])
    .collect();
    // Killed again while recovering.
    kills.push(vec![
        Kill::At("file-block-written", 2),
        Kill::At("shard-claimed", 3),
    ]);
    kills.push(vec![
        Kill::At("file-committed", 4),
        Kill::At("file-block-written", 1),
    ]);
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("random kill times from CRASH_SEED={seed}; baseline export {baseline:?}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let limit = baseline.as_millis().max(50) as u64;
    for _ in 0..8 {
        kills.push(vec![Kill::After(Duration::from_millis(
            rng.random_range(0..limit),
        ))]);
    }
    kills.push(vec![
        Kill::After(Duration::from_millis(rng.random_range(0..limit))),
        Kill::After(Duration::from_millis(rng.random_range(0..limit))),
    ]);

    let total: usize = kills.iter().map(Vec::len).sum();
    assert!(total >= 20);
    let started = Instant::now();
    for scenario in &kills {
        run_scenario(&store, &expected, scenario).await;
    }
    println!(
        "{total} kills in {} scenarios in {:.1} s, every export whole",
        kills.len(),
        started.elapsed().as_secs_f64()
    );
}

/// A `_since` export of a store where a third of the resources were deleted after `_since`: killed
/// while it lists deletions (between their files, after their shards, at the manifest), it lists
/// every deletion exactly once, and nothing in `output`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_listing_deletions_a_since_export_lists_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = generated_store(dir.path());
    std::thread::sleep(Duration::from_millis(5));
    let since = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(5));
    let mut deleted = Keys::new();
    let entries: Vec<Value> = common::stored_resources(&store)
        .into_keys()
        .enumerate()
        .filter(|(n, _)| n % 3 == 0)
        .map(|(_, (t, id))| {
            let entry =
                serde_json::json!({"request": {"method": "DELETE", "url": format!("{t}/{id}")}});
            deleted.insert((t, id));
            entry
        })
        .collect();
    let bundle = dir.path().join("deletions.json");
    let body =
        serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    std::fs::write(&bundle, body.to_string()).unwrap();
    let report = import::import(&EmbeddedStore::open(&store).unwrap(), &[bundle]).unwrap();
    assert_eq!(report.deleted as usize, deleted.len());
    assert!(deleted.len() > 1000);
    let query: &'static str = Box::leak(
        format!(
            "?_since={}",
            since
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .replace('+', "%2B")
        )
        .into_boxed_str(),
    );
    let expected = Expected {
        query,
        output: Keys::new(),
        deleted,
        source: None,
    };
    run_scenario(&store, &expected, &[]).await;
    for (point, nth) in [
        ("shard-claimed", 3),
        ("file-block-written", 1),
        ("file-committed", 1),
        ("file-committed", 3),
        ("shard-done", 2),
        ("shard-done", 9),
        ("manifest-written", 1),
    ] {
        run_scenario(&store, &expected, &[Kill::At(point, nth)]).await;
    }
}

/// Organized by patient from a FHIR server (Medplum), in two phases: killed while the first phase
/// writes its partitions, once they are all written but before the shards of blocks are queued,
/// and while those run, the export still completes with each resource in one block, once, and
/// no partition left beside its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_its_phases_an_organized_export_from_a_fhir_server_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fhir_export::generate::write_ndjson(100, 7, &data).unwrap();
    let medplum = common::medplum::Medplum::start(&data, &[]);
    let store = generated_store(&dir.path().join("store"));
    let output: Keys = common::stored_resources(&store)
        .into_keys()
        .filter(|(resource_type, _)| {
            fhir_export::export::request::is_patient_level_type(resource_type)
        })
        .collect();
    let expected = Expected {
        query: "?organizeOutputBy=Patient",
        output,
        deleted: Keys::new(),
        source: Some(medplum.base.clone()),
    };
    for kills in [
        vec![],
        vec![Kill::At("partition-written", 3)],
        vec![Kill::At("partitioned", 1)],
        vec![
            Kill::At("partition-written", 5),
            Kill::At("partition-written", 1),
        ],
        vec![Kill::At("file-committed", 1)],
    ] {
        eprintln!("killed at {kills:?}");
        run_scenario(&store, &expected, &kills).await;
    }
}
