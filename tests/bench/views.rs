//! `cargo bench --bench views`: the four views of the HTTP tests (patients, observations with
//! their components, conditions, encounters) in one `$viewdefinition-export` job, CSV and
//! Parquet, over the sample at 1x and 10x (`BENCH_COPIES`): resources read and rows written per
//! second, and the serving process's peak memory.
//!
//! The data: the Synthea sample (`../shared`), or generated data when it is absent.

#[path = "support.rs"]
mod support;

use std::path::Path;
use std::time::Instant;

use serde_json::{json, Value};
use support::{handler, manifest_after, peak_rss_mb, run, start_serve};

const VIEWS: &str = include_str!("../views/four-views.json");

/// Kickoff to manifest: (seconds, rows written).
async fn export(client: &reqwest::Client, base: &str, format: &str) -> (f64, u64) {
    let views: Value = serde_json::from_str(VIEWS).unwrap();
    let mut parameter: Vec<Value> = views
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, view)| json!({"name": "view", "part": [{"name": "name", "valueString": name}, {"name": "viewResource", "resource": view}]}))
        .collect();
    parameter.push(json!({"name": "_format", "valueCode": format}));
    let started = Instant::now();
    let response = client
        .post(format!("{base}/$viewdefinition-export"))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .json(&json!({"resourceType": "Parameters", "parameter": parameter}))
        .send()
        .await
        .unwrap();
    let manifest = manifest_after(client, response).await;
    let rows = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["count"].as_u64().unwrap())
        .sum();
    (started.elapsed().as_secs_f64(), rows)
}

fn main() {
    let copies: Vec<u32> = std::env::var("BENCH_COPIES")
        .unwrap_or_else(|_| "1,10".into())
        .split(',')
        .map(|c| c.trim().parse().expect("BENCH_COPIES: numbers"))
        .collect();
    let scratch = tempfile::tempdir().unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/synthea-r4-100-bulk-data-server/bundles");
    let source = if sample.is_dir() {
        sample
    } else {
        let generated = scratch.path().join("generated");
        run({
            let mut c = handler();
            c.args(["generate", "--patients", "1000", "--out"])
                .arg(&generated);
            c
        });
        generated
    };
    println!("source: {}", source.display());
    println!(
        "{:>6} {:>8} | {:>10} {:>9} {:>8} {:>12} {:>10} {:>9}",
        "copies", "format", "resources", "rows", "s", "resources/s", "rows/s", "serve RSS"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    for n in copies {
        let dir = scratch.path().join(format!("x{n}"));
        let data = dir.join("data");
        run({
            let mut c = handler();
            c.args(["synth", "--from"])
                .arg(&source)
                .args(["--copies", &n.to_string(), "--out"])
                .arg(&data);
            c
        });
        let store = dir.join("store.db");
        run({
            let mut c = handler();
            c.arg("import").arg(&data).arg("--store").arg(&store);
            c
        });
        std::fs::remove_dir_all(&data).unwrap();
        let resources: u64 = {
            let conn = rusqlite::Connection::open(&store).unwrap();
            conn.query_row(
                "SELECT count(*) FROM resources WHERE type IN ('Patient', 'Observation', 'Condition', 'Encounter')",
                [],
                |row| row.get(0),
            )
            .unwrap()
        };
        for format in ["csv", "parquet"] {
            let exports = dir.join(format!("exports-{format}"));
            let (serve, base) = start_serve(&store, &exports, &[]);
            let (seconds, rows) = runtime.block_on(export(&client, &base, format));
            let rss = peak_rss_mb(serve.0.id());
            println!(
                "{n:>6} {format:>8} | {resources:>10} {rows:>9} {seconds:>8.2} {:>12.0} {:>10.0} {rss:>6.0} MB",
                resources as f64 / seconds,
                rows as f64 / seconds
            );
        }
    }
}
