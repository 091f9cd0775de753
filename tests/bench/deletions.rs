//! `cargo bench --bench deletions`: what finding deletions costs a `_since` export. The sample at
//! `BENCH_COPIES` (default 10) copies is imported; after `_since`, 1% of the resources are
//! updated, and in a second store the same updates plus 1% deleted. The same `_since` export runs
//! on both (best of `BENCH_RUNS`, default 3): the difference is the cost of the deletions listed.
//! Then a `_since` export of the 1x sample from Medplum's FHIR router (tests/medplum, when
//! installed), which keeps deletions but answers no type `_history`.
//!
//! The data: the Synthea sample (`../shared`), or generated data when it is absent.

#[path = "support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{free_port, handler, manifest_after, run, start_serve, Serve};

/// Kickoff to manifest: (seconds, resources in `output`, deletions in `deleted`, `error` files).
async fn time_export(client: &reqwest::Client, url: &str) -> (f64, u64, u64, usize) {
    let started = Instant::now();
    let response = client
        .get(url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    let manifest = manifest_after(client, response).await;
    let seconds = started.elapsed().as_secs_f64();
    let count = |list: &str| -> u64 {
        manifest[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["count"].as_u64().unwrap())
            .sum()
    };
    let errors = manifest["error"].as_array().unwrap().len();
    (seconds, count("output"), count("deleted"), errors)
}

/// Every 100th stored resource from `offset` on, as (type, id, json).
fn every_hundredth(store: &Path, offset: i64) -> Vec<(String, String, String)> {
    let conn = rusqlite::Connection::open(store).unwrap();
    let mut statement = conn
        .prepare("SELECT type, id, CAST(json AS TEXT) FROM resources WHERE rowid % 100 = ?1")
        .unwrap();
    let rows = statement
        .query_map([offset], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

fn copy_store(from: &Path, to: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let source = PathBuf::from(format!("{}{suffix}", from.display()));
        if source.exists() {
            std::fs::copy(&source, format!("{}{suffix}", to.display())).unwrap();
        }
    }
}

fn import(store: &Path, data: &Path) {
    run({
        let mut c = handler();
        c.arg("import").arg(data).arg("--store").arg(store);
        c
    });
}

fn main() {
    let copies: u32 = std::env::var("BENCH_COPIES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(10);
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(3);
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/synthea-r4-100-bulk-data-server/bundles");
    let source = if sample.is_dir() {
        sample
    } else {
        let generated = dir.join("generated");
        run({
            let mut c = handler();
            c.args(["generate", "--patients", "1000", "--out"])
                .arg(&generated);
            c
        });
        generated
    };
    println!("source: {}, {copies} copies", source.display());
    let data = dir.join("data");
    run({
        let mut c = handler();
        c.args(["synth", "--from"])
            .arg(&source)
            .args(["--copies", &copies.to_string(), "--out"])
            .arg(&data);
        c
    });
    let with_updates = dir.join("updates.db");
    import(&with_updates, &data);
    std::fs::remove_dir_all(&data).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let since = chrono::Utc::now();
    std::thread::sleep(Duration::from_millis(20));

    let updated = every_hundredth(&with_updates, 0);
    let updates = dir.join("updates.ndjson");
    let lines: Vec<String> = updated
        .iter()
        .map(|(_, _, json)| {
            let mut resource: Value = serde_json::from_str(json).unwrap();
            resource["language"] = "en-US".into();
            if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
                meta.remove("lastUpdated");
            }
            resource.to_string()
        })
        .collect();
    std::fs::write(&updates, lines.join("\n")).unwrap();
    let deleted = every_hundredth(&with_updates, 50);
    let entries: Vec<Value> = deleted
        .iter()
        .map(|(t, id, _)| serde_json::json!({"request": {"method": "DELETE", "url": format!("{t}/{id}")}}))
        .collect();
    let deletions = dir.join("deletions.json");
    let bundle =
        serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    std::fs::write(&deletions, bundle.to_string()).unwrap();

    let with_deletions = dir.join("deletions.db");
    copy_store(&with_updates, &with_deletions);
    import(&with_updates, &updates);
    import(&with_deletions, &updates);
    import(&with_deletions, &deletions);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    let query = format!(
        "/$export?_since={}",
        since
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            .replace('+', "%2B")
    );
    println!(
        "{:>10} {:>9} {:>9} | {:>12} {:>12} {:>9}",
        "store", "updated", "deleted", "best s", "median s", "overhead"
    );
    let mut best_without = 0.0;
    for (label, store) in [("updates", &with_updates), ("+deleted", &with_deletions)] {
        let exports = dir.join(format!("exports-{label}"));
        let (serve, base) = start_serve(store, &exports, &[]);
        let mut times = Vec::new();
        let mut counted = (0, 0);
        for _ in 0..runs {
            let (seconds, output, deleted, errors) =
                runtime.block_on(time_export(&client, &format!("{base}{query}")));
            assert_eq!(errors, 0);
            times.push(seconds);
            counted = (output, deleted);
        }
        drop(serve);
        times.sort_by(f64::total_cmp);
        let best = times[0];
        let overhead = match label {
            "updates" => {
                best_without = best;
                String::from("-")
            }
            _ => format!("{:+.0}%", (best / best_without - 1.0) * 100.0),
        };
        println!(
            "{label:>10} {:>9} {:>9} | {best:>12.3} {:>12.3} {overhead:>9}",
            counted.0,
            counted.1,
            times[times.len() / 2]
        );
    }
    medplum(&runtime, &client, &source, dir);
}

/// The 1x sample in Medplum's router (NDJSON per type, lastUpdated kept), then a `_since` export
/// from it: its time, and what the manifest says of deletions.
fn medplum(runtime: &tokio::runtime::Runtime, client: &reqwest::Client, source: &Path, dir: &Path) {
    let adapter = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/medplum");
    if !adapter.join("node_modules/@medplum/fhir-router").is_dir() {
        println!("Medplum: not installed (npm ci --prefix tests/medplum); skipped");
        return;
    }
    let store = dir.join("one.db");
    import(&store, source);
    let ndjson = dir.join("medplum");
    std::fs::create_dir_all(&ndjson).unwrap();
    let conn = rusqlite::Connection::open(&store).unwrap();
    let mut statement = conn
        .prepare("SELECT type, CAST(json AS TEXT) FROM resources ORDER BY type")
        .unwrap();
    let mut files: std::collections::BTreeMap<String, String> = Default::default();
    for row in statement
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
    {
        let (resource_type, json) = row.unwrap();
        let file = files.entry(resource_type).or_default();
        file.push_str(&json);
        file.push('\n');
    }
    for (resource_type, text) in files {
        std::fs::write(ndjson.join(format!("{resource_type}.ndjson")), text).unwrap();
    }
    let mut child = Command::new("node")
        .arg(adapter.join("server.mjs"))
        .arg("--load")
        .arg(&ndjson)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let _medplum = Serve(child);
    let medplum_base = format!(
        "http://127.0.0.1:{}",
        line.trim().trim_start_matches("listening on ")
    );
    let port = free_port();
    let exports = dir.join("exports-medplum");
    let exporter = handler()
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--source",
            &medplum_base,
        ])
        .arg("--exports")
        .arg(&exports)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _exporter = Serve(exporter);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://127.0.0.1:{port}/$export?_since=2000-01-01T00:00:00Z");
    let (seconds, output, deleted, errors) = runtime.block_on(time_export(client, &url));
    println!(
        "Medplum (1x): _since export {seconds:.2} s, {output} resources, {deleted} deletions listed, {errors} error file(s): its router answers no type _history"
    );
}
