//! A FHIR server nobody here wrote as the source: Medplum's FHIR router and in-memory repository
//! (tests/medplum), loaded with the same data as an embedded store. Every kind of export must give
//! the same resources from both, each exactly once; the paging behaviours of real servers (no
//! `next` link, relative links, an unstable order, writes while paging, an offset limit) must never
//! lose or duplicate a resource while answering 200.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::medplum::Medplum;
use common::{client, download_all, start, start_reading, Server};
use fhir_export::source::{import, EmbeddedStore};
use serde_json::{json, Value};

/// The sample as NDJSON, one file per type, each resource's `meta.lastUpdated` spread over
/// 2020-2023 (so that `_since` and `_lastUpdated` windows mean something), plus a Group of
/// `GROUP_SIZE` patients with a UUID id; and an embedded store loaded from the same files.
struct Dataset {
    ndjson: PathBuf,
    store: PathBuf,
    group_id: String,
    patients: Vec<String>,
    _dir: tempfile::TempDir,
}

const GROUP_ID: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
const GROUP_SIZE: usize = 5;

fn dataset() -> &'static Dataset {
    static DATASET: OnceLock<Dataset> = OnceLock::new();
    DATASET.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let ndjson = dir.path().join("ndjson");
        std::fs::create_dir_all(&ndjson).unwrap();
        let mut per_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut patients = Vec::new();
        for ((resource_type, id), json) in common::stored_resources(&common::sample_store()) {
            let mut resource: Value = serde_json::from_str(&json).unwrap();
            resource["meta"] = json!({"lastUpdated": spread_instant(&resource_type, &id)});
            if resource_type == "Patient" {
                patients.push(id.clone());
            }
            per_type
                .entry(resource_type)
                .or_default()
                .push(resource.to_string());
        }
        patients.sort();
        let members: Vec<Value> = patients[..GROUP_SIZE]
            .iter()
            .map(|id| json!({"entity": {"reference": format!("Patient/{id}")}}))
            .collect();
        let group = json!({
            "resourceType": "Group", "id": GROUP_ID, "type": "person", "actual": true,
            "meta": {"lastUpdated": "2023-06-01T00:00:00.000Z"}, "member": members,
        });
        per_type
            .entry("Group".into())
            .or_default()
            .push(group.to_string());
        for (resource_type, lines) in &per_type {
            let text = lines.join("\n") + "\n";
            std::fs::write(ndjson.join(format!("{resource_type}.ndjson")), text).unwrap();
        }
        let store = dir.path().join("store.db");
        let report = import::import(
            &EmbeddedStore::open(&store).unwrap(),
            std::slice::from_ref(&ndjson),
        )
        .unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        Dataset {
            ndjson,
            store,
            group_id: GROUP_ID.into(),
            patients,
            _dir: dir,
        }
    })
}

/// An instant in 2020-2023 that depends only on the resource's type and id (FNV-1a).
fn spread_instant(resource_type: &str, id: &str) -> String {
    let mut hash: u64 = 0xcbf29ce484222325;
    for byte in resource_type.bytes().chain([b'/']).chain(id.bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x100000001b3);
    }
    let four_years_ms = 4 * 365 * 24 * 3600 * 1000;
    let start: chrono::DateTime<chrono::Utc> = "2020-01-01T00:00:00Z".parse().unwrap();
    let at = start + chrono::Duration::milliseconds((hash % four_years_ms) as i64);
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

async fn start_on(source: &str) -> Server {
    start_time_boxed(source, None).await
}

/// A service on `source` whose shards pause after `time_box` and go on in a continuation.
async fn start_time_boxed(source: &str, time_box: Option<Duration>) -> Server {
    start_reading(&dataset().store, source, |settings| {
        settings.shard_max_time = time_box;
    })
    .await
}

/// The ids of an export, per type, asserting each appears once.
async fn ids(client: &reqwest::Client, manifest: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut per_type: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (resource_type, url, lines) in download_all(client, manifest).await {
        for line in lines {
            let resource: Value = serde_json::from_str(&line).unwrap();
            let id = resource["id"].as_str().unwrap().to_string();
            let first = per_type
                .entry(resource_type.clone())
                .or_default()
                .insert(id);
            assert!(first, "{resource_type}/{} twice ({url})", resource["id"]);
        }
    }
    per_type
}

/// Kicks off (GET, or POST with `parameters`) and waits for the manifest.
async fn run(client: &reqwest::Client, url: &str, parameters: Option<&Value>) -> Value {
    match parameters {
        None => common::export(client, url).await,
        Some(parameters) => common::post_export(client, url, parameters.clone()).await,
    }
}

fn total(ids: &BTreeMap<String, BTreeSet<String>>) -> usize {
    ids.values().map(BTreeSet::len).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_from_medplum_equal_exports_from_the_embedded_store() {
    let data = dataset();
    let medplum = Medplum::start(&data.ndjson, &[]);
    let embedded = start(&data.store, |_| {}).await;
    let remote = start_on(&medplum.base).await;
    let client = client();
    let chosen: Vec<Value> = data.patients[10..13]
        .iter()
        .map(|id| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}}))
        .collect();
    let post_patients = json!({"resourceType": "Parameters", "parameter": chosen});
    let cases: Vec<(&str, String, Option<&Value>)> = vec![
        ("system", "/$export".into(), None),
        ("_type", "/$export?_type=Patient,Condition,Device".into(), None),
        ("_since", "/$export?_since=2022-06-01T00:00:00Z".into(), None),
        (
            "_typeFilter token",
            "/$export?_type=Observation&_typeFilter=Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C8867-4".into(),
            None,
        ),
        (
            "_typeFilter :text",
            "/$export?_type=Observation&_typeFilter=Observation%3Fcode%3Atext%3Dbody".into(),
            None,
        ),
        ("Patient", "/Patient/$export".into(), None),
        ("Group (UUID)", format!("/Group/{}/$export", data.group_id), None),
        ("POST patient", "/Patient/$export".into(), Some(&post_patients)),
    ];
    eprintln!("| export | resources | embedded store | Medplum | requests to Medplum |");
    eprintln!("|---|---:|---:|---:|---:|");
    for (name, path, parameters) in cases {
        let started = Instant::now();
        let expected = ids(
            &client,
            &run(&client, &format!("{}{path}", embedded.base), parameters).await,
        )
        .await;
        let local_time = started.elapsed();
        let requests = medplum.requests(&client).await;
        let started = Instant::now();
        let got = ids(
            &client,
            &run(&client, &format!("{}{path}", remote.base), parameters).await,
        )
        .await;
        let remote_time = started.elapsed();
        let requests = medplum.requests(&client).await - requests;
        assert!(total(&expected) > 0, "{name}: the case exports something");
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{name}: the same types"
        );
        for (resource_type, expected_ids) in &expected {
            let got_ids = &got[resource_type];
            assert!(
                got_ids == expected_ids,
                "{name}: {resource_type}: {} from Medplum, {} from the store; missing {:?}, extra {:?}",
                got_ids.len(),
                expected_ids.len(),
                expected_ids.difference(got_ids).take(3).collect::<Vec<_>>(),
                got_ids.difference(expected_ids).take(3).collect::<Vec<_>>(),
            );
        }
        eprintln!(
            "| {name} | {} | {:.2} s | {:.2} s | {requests} |",
            total(&expected),
            local_time.as_secs_f64(),
            remote_time.as_secs_f64()
        );
    }
}

/// Exports `_type=Observation` through Medplum started with `switches`; the ids, or the failure's
/// OperationOutcome text.
async fn observations_through(switches: &[&str]) -> Result<BTreeSet<String>, String> {
    observations_time_boxed(switches, None)
        .await
        .map(|(ids, _)| ids)
}

/// As `observations_through`, with shards time-boxed: the ids and the number of files.
async fn observations_time_boxed(
    switches: &[&str],
    time_box: Option<Duration>,
) -> Result<(BTreeSet<String>, usize), String> {
    let medplum = Medplum::start(&dataset().ndjson, switches);
    let remote = start_time_boxed(&medplum.base, time_box).await;
    let client = client();
    let status_url = common::started(
        &client,
        &format!("{}/$export?_type=Observation", remote.base),
    )
    .await;
    let answer = common::wait_for_end(&client, &status_url, Duration::from_secs(240)).await;
    let body: Value = answer.json().await.unwrap();
    match body.get("output") {
        Some(output) => Ok((
            ids(&client, &body)
                .await
                .remove("Observation")
                .unwrap_or_default(),
            output.as_array().map_or(0, Vec::len),
        )),
        None => Err(body["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or_default()
            .to_string()),
    }
}

fn stored_observations() -> BTreeSet<String> {
    common::stored_resources(&dataset().store)
        .into_keys()
        .filter(|(resource_type, _)| resource_type == "Observation")
        .map(|(_, id)| id)
        .collect()
}

/// A shard time-boxed at 300 ms pauses at a `lastUpdated` the server counts whole up to, and its
/// continuation reads on from there: every Observation once, in more than one file; also when the
/// server shuffles the ties of its order. When resources change while paged, a pause would come
/// after resources an earlier read already passed on: the shard reads on to its end instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_boxed_shards_pause_where_the_server_counts_them_whole_and_lose_nothing() {
    let time_box = Some(Duration::from_millis(300));
    let cases: [(&[&str], bool); 3] = [
        (&[], true),
        (&["--unstable-order"], true),
        (&["--update-while-paging", "50"], false),
    ];
    for (switches, pauses) in cases {
        let (got, files) = observations_time_boxed(switches, time_box).await.unwrap();
        assert!(
            got == stored_observations(),
            "{switches:?}: {} exported",
            got.len()
        );
        eprintln!("{switches:?}: {} Observations in {files} files", got.len());
        assert_eq!(files > 1, pauses, "{switches:?}: {files} files");
    }

    // A Group's compartment takes several searches, which overlap: such a shard reads on to its
    // end, and gives what the embedded store gives.
    let data = dataset();
    let medplum = Medplum::start(&data.ndjson, &[]);
    let remote = start_time_boxed(&medplum.base, time_box).await;
    let embedded = start(&data.store, |_| {}).await;
    let client = client();
    let path = format!("/Group/{}/$export", data.group_id);
    let expected = ids(
        &client,
        &run(&client, &format!("{}{path}", embedded.base), None).await,
    )
    .await;
    let got = ids(
        &client,
        &run(&client, &format!("{}{path}", remote.base), None).await,
    )
    .await;
    assert!(total(&expected) > 1000, "{}", total(&expected));
    assert!(
        got == expected,
        "Group: {} from Medplum, {} from the store",
        total(&got),
        total(&expected)
    );
}

/// Before: pages without a `next` link ended the read at the first page, and the export answered
/// 200 with 1,000 of 16,315 Observations. Now the short read is found by the counts and fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_gives_no_next_link_fails_the_export_visibly() {
    let failure = observations_through(&["--no-next"]).await.unwrap_err();
    assert!(failure.contains("pages were incomplete"), "{failure}");
}

/// Relative `next` links and an order that changes on every request (ties of the requested
/// `_sort` shuffled): every Observation once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_links_and_an_unstable_order_lose_and_duplicate_nothing() {
    let got = observations_through(&["--relative-links", "--unstable-order"])
        .await
        .unwrap();
    assert!(got == stored_observations(), "{} exported", got.len());
}

/// Before: 50 Observations updated while the export paged made 50 unchanged ones vanish (every
/// offset behind them shifted). Now the moved count makes the search read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_while_paging_hide_no_unchanged_resource() {
    let got = observations_through(&["--update-while-paging", "50"])
        .await
        .unwrap();
    assert!(got == stored_observations(), "{} exported", got.len());
}

/// Before: the first `_offset` above Medplum's limit failed the whole export. Now the window is
/// halved by `_lastUpdated` until each part pages within the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_limit_narrows_the_window_and_loses_nothing() {
    let got = observations_through(&["--max-offset", "3000"])
        .await
        .unwrap();
    assert!(got == stored_observations(), "{} exported", got.len());
}

/// An organized export's resources by the patient whose block holds them (`organizeOutputBy`).
async fn blocks(
    client: &reqwest::Client,
    manifest: &Value,
) -> BTreeMap<String, BTreeSet<(String, String)>> {
    assert_eq!(manifest["outputOrganizedBy"], "Patient");
    let mut blocks: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
    for output in manifest["output"].as_array().unwrap() {
        let body = client
            .get(output["url"].as_str().unwrap())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut patient = String::new();
        for line in body.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            let resource_type = resource["resourceType"].as_str().unwrap().to_string();
            if resource_type == "Parameters" {
                let reference = &resource["parameter"][0]["valueReference"]["reference"];
                patient = reference.as_str().unwrap().replace("Patient/", "");
                continue;
            }
            let key = (resource_type, resource["id"].as_str().unwrap().to_string());
            let first = blocks
                .entry(patient.clone())
                .or_default()
                .insert(key.clone());
            assert!(first, "{key:?} twice");
        }
    }
    blocks
}

/// `organizeOutputBy=Patient` from a FHIR server: the same blocks as from the embedded store, at
/// system and Group level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organized_exports_from_medplum_equal_those_from_the_embedded_store() {
    let data = dataset();
    let medplum = Medplum::start(&data.ndjson, &[]);
    let embedded = start(&data.store, |_| {}).await;
    let remote = start_on(&medplum.base).await;
    let client = client();
    for path in [
        "/$export?organizeOutputBy=Patient".to_string(),
        format!(
            "/Group/{}/$export?organizeOutputBy=Patient&_type=Patient,Encounter",
            data.group_id
        ),
    ] {
        let expected = blocks(
            &client,
            &run(&client, &format!("{}{path}", embedded.base), None).await,
        )
        .await;
        let got = blocks(
            &client,
            &run(&client, &format!("{}{path}", remote.base), None).await,
        )
        .await;
        assert!(
            expected.len() >= GROUP_SIZE,
            "{path}: {} blocks",
            expected.len()
        );
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{path}: the same patients"
        );
        for (patient, keys) in &expected {
            assert!(
                got[patient] == *keys,
                "{path}: {patient}: {} from Medplum, {} from the store",
                got[patient].len(),
                keys.len()
            );
        }
    }
}

/// An export organized by patient reads each type once, as a plain export does, however many
/// shards of blocks it makes (a first phase puts each resource in its shard's partition), rather
/// than searching each type by patient: 60 patients here, in shards of 200 resources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organized_export_of_many_shards_reads_each_type_once_from_medplum() {
    let dir = tempfile::tempdir().unwrap();
    fhir_export::generate::write_ndjson(60, 7, dir.path()).unwrap();
    let medplum = Medplum::start(dir.path(), &[]);
    let remote = start_reading(&dataset().store, &medplum.base, |settings| {
        settings.shard_max_resources = 200;
    })
    .await;
    let client = client();
    let mut counted = Vec::new();
    for path in ["/$export?organizeOutputBy=Patient", "/$export"] {
        let before = (
            medplum.requests(&client).await,
            medplum.searches_by_patient(&client).await,
        );
        let manifest = run(&client, &format!("{}{path}", remote.base), None).await;
        counted.push((
            medplum.requests(&client).await - before.0,
            medplum.searches_by_patient(&client).await - before.1,
            manifest["output"].as_array().unwrap().len(),
        ));
    }
    let ((organized, organized_by_patient, files), (plain, _, _)) = (counted[0], counted[1]);
    assert!(files >= 5, "{files} files: a shard of blocks each at least");
    assert_eq!(organized_by_patient, 0, "no search by patient");
    assert!(
        organized <= plain + plain / 5,
        "organized: {organized} requests, plain: {plain}"
    );
}

/// Planning asks only what it needs: whether the types of `_type` hold resources, and, for a big
/// type, counts only where its resources lie. Data loaded in bulk (here every
/// `meta.lastUpdated` within ten minutes of 2024) is cut into parts after a few counts: halving
/// the export's hundred-year window down to those ten minutes alone would take some thirty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_type_loaded_in_bulk_is_planned_by_counting_where_it_lies() {
    let dir = tempfile::tempdir().unwrap();
    fhir_export::generate::write_ndjson(60, 7, dir.path()).unwrap();
    let loaded: chrono::DateTime<chrono::Utc> = "2024-03-01T09:00:00Z".parse().unwrap();
    let mut observations = BTreeSet::new();
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let path = file.unwrap().path();
        let mut lines = Vec::new();
        for (at, line) in std::fs::read_to_string(&path).unwrap().lines().enumerate() {
            let mut resource: Value = serde_json::from_str(line).unwrap();
            let instant = loaded + chrono::Duration::milliseconds(at as i64 * 7_919 % 600_000);
            let instant = instant.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            resource["meta"] = json!({ "lastUpdated": instant });
            if resource["resourceType"] == "Observation" {
                observations.insert(resource["id"].as_str().unwrap().to_string());
            }
            lines.push(resource.to_string());
        }
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    }
    let medplum = Medplum::start(dir.path(), &[]);
    let per_part = observations.len() as u64 / 4;
    let remote = start_reading(&dataset().store, &medplum.base, |settings| {
        settings.shard_max_resources = per_part;
    })
    .await;
    let client = client();
    let before = medplum.counts(&client).await;
    let url = format!("{}/$export?_type=Observation", remote.base);
    let manifest = run(&client, &url, None).await;
    let counts = medplum.counts(&client).await - before;
    let files = manifest["output"].as_array().unwrap().len();
    assert_eq!(ids(&client, &manifest).await["Observation"], observations);
    assert!(files >= 4, "{files} files of at most {per_part} resources");
    // Per part, a count before its read and one after; the rest plan, the probe of which types
    // hold resources included (Observation alone, not the 146 types Medplum declares).
    let planning = counts - 2 * files as u64;
    assert!(planning <= 12, "{planning} counts to plan {files} parts");
}

/// Resources per type on a FHIR server, counted by `_summary=count`.
async fn counts_on(
    client: &reqwest::Client,
    base: &str,
    types: impl Iterator<Item = String>,
) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for resource_type in types {
        let bundle =
            common::get_json(client, &format!("{base}/{resource_type}?_summary=count")).await;
        counts.insert(resource_type, bundle["total"].as_u64().unwrap());
    }
    counts
}

/// A proxy in front of `target` that answers 403 for its first 1.5 seconds (a role still
/// propagating), then every third request 429 and every fifth 503, and forwards the others with
/// their bodies.
async fn throttling_proxy(
    target: String,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use warp::Filter;
    let refused = std::sync::Arc::new(AtomicU64::new(0));
    let counter = std::sync::Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let upstream = reqwest::Client::new();
    let opened = Instant::now();
    let route = {
        let refused = refused.clone();
        warp::method()
            .and(warp::path::full())
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::body::bytes())
            .then(
                move |method: warp::http::Method,
                      path: warp::path::FullPath,
                      query: String,
                      body: bytes::Bytes| {
                    let (refused, counter, upstream, target) = (
                        refused.clone(),
                        counter.clone(),
                        upstream.clone(),
                        target.clone(),
                    );
                    async move {
                        if opened.elapsed() < Duration::from_millis(1500) {
                            refused.fetch_add(1, Ordering::SeqCst);
                            return warp::http::Response::builder()
                                .status(403)
                                .body(b"{}".to_vec())
                                .unwrap();
                        }
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        if n % 3 == 1 || n % 5 == 3 {
                            refused.fetch_add(1, Ordering::SeqCst);
                            let status = if n % 3 == 1 { 429 } else { 503 };
                            return warp::http::Response::builder()
                                .status(status)
                                .header("Retry-After", "0")
                                .body(b"{}".to_vec())
                                .unwrap();
                        }
                        let url = match query.is_empty() {
                            true => format!("{target}{}", path.as_str()),
                            false => format!("{target}{}?{query}", path.as_str()),
                        };
                        let answer = upstream
                            .request(method, url)
                            .header("Content-Type", "application/fhir+json")
                            .body(body)
                            .send()
                            .await
                            .unwrap();
                        warp::http::Response::builder()
                            .status(answer.status().as_u16())
                            .body(answer.bytes().await.unwrap().to_vec())
                            .unwrap()
                    }
                },
            )
    };
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (format!("http://{address}"), refused)
}

/// `handler load` uploads generated data to Medplum, the demo population too, through a proxy
/// that throttles and fails requests: every resource stored once, counted per type by the server;
/// a second load changes nothing (PUT by id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_load_stores_every_resource_once_through_throttling() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    let medplum = Medplum::start(&dir.path().join("empty"), &[]);
    let client = client();
    let generated = fhir_export::generate::write_ndjson(12, 7, &dir.path().join("data")).unwrap();
    let (proxy, refused) = throttling_proxy(medplum.base.clone()).await;
    let load = |args: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_handler"))
                .arg("load")
                .args(args)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let data = dir.path().join("data").to_str().unwrap().to_string();
    for _ in 0..2 {
        let output = load(vec![proxy.clone(), "--data".into(), data.clone()]).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("loaded {} resources", generated.total())),
            "{stdout}"
        );
    }
    assert!(
        refused.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the proxy refused some"
    );
    let types = generated.counts.keys().cloned();
    assert_eq!(
        counts_on(&client, &medplum.base, types).await,
        generated.counts
    );

    // The demo population, into a second server.
    std::fs::create_dir(dir.path().join("empty-too")).unwrap();
    let demo = Medplum::start(&dir.path().join("empty-too"), &[]);
    let output = load(vec![
        demo.base.clone(),
        "--demo".into(),
        "--patients".into(),
        "10".into(),
    ])
    .await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = fhir_export::generate::write_ndjson(10, 1, &dir.path().join("demo")).unwrap();
    let types = expected.counts.keys().cloned();
    assert_eq!(counts_on(&client, &demo.base, types).await, expected.counts);
}

/// Medplum's router keeps versions and deletions, but answers no type-level `_history` (only a
/// resource's own) and its CapabilityStatement declares none: a `_since` export from it says in
/// its `error` that deletions could not be determined, and lists none. Declared but refused
/// (`--declare-history`: the router answers 404), each type's shard says so itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_exports_from_medplum_say_deletions_are_unknown() {
    let data = dataset();
    let client = client();
    for (switches, expected) in [
        (&[][..], "declares no history-type interaction"),
        (&["--declare-history"][..], "not found (404)"),
    ] {
        let medplum = Medplum::start(&data.ndjson, switches);
        let remote = start_on(&medplum.base).await;
        let url = format!(
            "{}/$export?_type=Patient,Observation&_since=2023-01-01T00:00:00Z",
            remote.base
        );
        let manifest = common::export(&client, &url).await;
        assert_eq!(manifest["deleted"], json!([]), "{switches:?}");
        let errors = manifest["error"].as_array().unwrap();
        assert!(!errors.is_empty(), "{switches:?}: {manifest}");
        let mut text = String::new();
        for error in errors {
            let url = error["url"].as_str().unwrap();
            text += &client.get(url).send().await.unwrap().text().await.unwrap();
        }
        assert!(
            text.contains("could not be determined"),
            "{switches:?}: {text}"
        );
        assert!(text.contains(expected), "{switches:?}: {text}");
        for resource_type in ["Patient", "Observation"] {
            assert!(text.contains(resource_type), "{switches:?}: {text}");
        }
        assert!(
            total(&ids(&client, &manifest).await) > 0,
            "{switches:?}: the output stands"
        );
    }
}
