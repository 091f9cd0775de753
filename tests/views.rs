//! SQL on FHIR v2 views: the specification's conformance suite (`../shared/data/sql-on-fhir-tests`,
//! 134 cases) run through the engine, with the count printed and the report written in the
//! format sql-on-fhir.org reads; `handler view run` over real files.

mod common;

use fhir_export::views::suite;

#[test]
fn the_sql_on_fhir_conformance_suite_passes() {
    let Some(dir) = common::outside_corpus(
        "sql-on-fhir-tests",
        "views::the_sql_on_fhir_conformance_suite_passes",
    ) else {
        return;
    };
    let outcomes = suite::run(&dir.join("tests")).unwrap();
    let shareable: Vec<_> = outcomes
        .iter()
        .filter(|o| o.tags.iter().any(|t| t == "shareable"))
        .collect();
    let passed = |list: &[&suite::Outcome]| list.iter().filter(|o| o.failure.is_none()).count();
    let experimental: Vec<_> = outcomes
        .iter()
        .filter(|o| !o.tags.iter().any(|t| t == "shareable"))
        .collect();
    common::outside::summary(&format!(
        "SQL on FHIR suite: {} of {} shareable cases pass, {} of {} others (experimental)",
        passed(&shareable),
        shareable.len(),
        passed(&experimental),
        experimental.len()
    ));
    for outcome in &outcomes {
        if let Some(failure) = &outcome.failure {
            println!("  failed: {} / {}: {failure}", outcome.file, outcome.name);
        }
    }
    assert_eq!(outcomes.len(), 134);
    let report = suite::report(&outcomes);
    assert_eq!(report.as_object().unwrap().len(), 22);
    let failing: Vec<_> = shareable
        .iter()
        .filter(|o| o.failure.is_some())
        .map(|o| format!("{} / {}", o.file, o.name))
        .collect();
    assert!(
        failing.is_empty(),
        "{} shareable cases fail: {failing:#?}",
        failing.len()
    );
}

/// `handler view run` over generated NDJSON: a row per patient in CSV (header first, RFC 4180) and
/// in NDJSON, the same values both ways; a view with a bad path is refused naming the element.
#[test]
fn view_run_writes_csv_and_ndjson_rows_and_refuses_a_bad_view_by_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fhir_export::generate::write_ndjson(25, 3, &data).unwrap();
    let view = dir.path().join("patients.json");
    std::fs::write(
        &view,
        r#"{"resourceType":"ViewDefinition","name":"patients","resource":"Patient","status":"active","select":[
            {"column":[{"name":"id","path":"getResourceKey()"},{"name":"gender","path":"gender"},{"name":"birth_date","path":"birthDate"}]},
            {"forEachOrNull":"name.where(use = 'official').first()","column":[{"name":"family","path":"family"},{"name":"given","path":"given.join(' ')"}]}]}"#,
    )
    .unwrap();
    let run = |format: &str, view: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_handler"))
            .args(["view", "run"])
            .arg(view)
            .arg("--input")
            .arg(data.join("Patient.ndjson"))
            .args(["--format", format])
            .output()
            .unwrap()
    };
    let csv = run("csv", &view);
    assert!(
        csv.status.success(),
        "{}",
        String::from_utf8_lossy(&csv.stderr)
    );
    let csv = String::from_utf8(csv.stdout).unwrap();
    let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines[0], "id,gender,birth_date,family,given");
    assert_eq!(lines.len(), 26, "{csv}");
    let ndjson = run("ndjson", &view);
    let rows: Vec<serde_json::Value> = String::from_utf8(ndjson.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 25);
    for (row, line) in rows.iter().zip(&lines[1..]) {
        let id = row["id"].as_str().unwrap();
        assert!(line.starts_with(&format!("{id},")), "{line}");
        assert!(row["family"].is_string(), "{row}");
    }

    let parquet = dir.path().join("patients.parquet");
    let written = std::process::Command::new(env!("CARGO_BIN_EXE_handler"))
        .args(["view", "run"])
        .arg(&view)
        .arg("--input")
        .arg(data.join("Patient.ndjson"))
        .args(["--format", "parquet", "--out"])
        .arg(&parquet)
        .output()
        .unwrap();
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );
    assert_eq!(duckdb_rows(&parquet).len(), 25);

    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"resource":"Patient","select":[{"column":[{"name":"x","path":"name.family.("}]}]}"#,
    )
    .unwrap();
    let refused = run("csv", &bad);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("select[0].column[0].path"), "{stderr}");
}

/// Four views of the analyst's everyday (patients, observations with their components,
/// conditions, encounters) in one `$viewdefinition-export` job over HTTP, from the sample: in CSV
/// and in NDJSON, each file's rows are the engine's rows of the stored resources, each once; the
/// manifest names each output's view. A Group-level and a `_since` job select as `$export` does;
/// a view the engine cannot run is a 400 naming its element.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_exports_over_http_equal_the_engines_rows_in_each_format() {
    use fhir_export::views::{rows_of, write, View};
    use serde_json::{json, Value};
    let store = common::sample_store();
    let server = common::start(&store, |s| s.shard_max_resources = 5_000).await;
    let client = common::client();
    let views = four_views();
    let stored = common::stored_resources(&store);
    let expected = |format: write::Format, only: &dyn Fn(&Value) -> bool| {
        let mut lines: std::collections::BTreeMap<String, Vec<Vec<u8>>> = Default::default();
        for (name, definition) in &views {
            let view = View::parse(definition).unwrap();
            let entry = lines.entry(name.to_string()).or_default();
            for ((resource_type, _), json) in &stored {
                if *resource_type != view.resource || !only(&serde_json::from_str(json).unwrap()) {
                    continue;
                }
                for row in rows_of(&view, json.as_bytes()).unwrap() {
                    entry.push(write::line(format, &row));
                }
            }
            entry.sort();
        }
        lines
    };
    let body = |format: &str, more: Vec<Value>| {
        let mut parameter: Vec<Value> = views
            .iter()
            .map(|(name, view)| json!({"name": "view", "part": [{"name": "name", "valueString": name}, {"name": "viewResource", "resource": view}]}))
            .collect();
        parameter.push(json!({"name": "_format", "valueCode": format}));
        parameter.push(json!({"name": "clientTrackingId", "valueString": "t-1"}));
        parameter.extend(more);
        json!({"resourceType": "Parameters", "parameter": parameter})
    };
    let url = format!("{}/$viewdefinition-export", server.base);
    for (format, parsed) in [
        ("csv", write::Format::Csv { header: true }),
        ("ndjson", write::Format::Ndjson),
    ] {
        let manifest = common::post_export(&client, &url, body(format, vec![])).await;
        assert_eq!(manifest["clientTrackingId"], "t-1");
        let got = lines_by_view(&client, &manifest, parsed).await;
        let want = expected(parsed, &|_| true);
        for (name, lines) in &want {
            assert!(!lines.is_empty(), "{name}: rows expected");
            assert_eq!(got.get(name), Some(lines), "{format}: the rows of {name}");
        }
    }

    // Group level: only the group's patients' rows.
    let (group_id, members) = stored
        .iter()
        .find(|((t, _), _)| t == "Group")
        .map(|((_, id), json)| {
            let group: Value = serde_json::from_str(json).unwrap();
            let members: Vec<String> = group["member"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    m["entity"]["reference"]
                        .as_str()
                        .unwrap()
                        .trim_start_matches("Patient/")
                        .to_string()
                })
                .collect();
            (id.clone(), members)
        })
        .unwrap();
    let in_group = |resource: &Value| {
        let patient = match resource["resourceType"].as_str() {
            Some("Patient") => resource["id"].as_str().unwrap_or_default().to_string(),
            _ => resource["subject"]["reference"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches("Patient/")
                .to_string(),
        };
        members.contains(&patient)
    };
    let group =
        json!({"name": "group", "valueReference": {"reference": format!("Group/{group_id}")}});
    let manifest = common::post_export(&client, &url, body("ndjson", vec![group])).await;
    let got = lines_by_view(&client, &manifest, write::Format::Ndjson).await;
    assert_eq!(got, expected(write::Format::Ndjson, &in_group));

    // _since after everything: no rows.
    let since = json!({"name": "_since", "valueInstant": chrono::Utc::now().to_rfc3339()});
    let manifest = common::post_export(&client, &url, body("csv", vec![since])).await;
    assert_eq!(manifest["output"], json!([]));

    // A view stored in the views container, named by viewReference.
    let stored_views = server.exports.join("views");
    std::fs::create_dir_all(&stored_views).unwrap();
    std::fs::write(stored_views.join("kept.json"), views[0].1.to_string()).unwrap();
    let by_reference = |reference: &str| {
        json!({"resourceType": "Parameters", "parameter": [
        {"name": "view", "part": [{"name": "name", "valueString": "patients"}, {"name": "viewReference", "valueReference": {"reference": reference}}]},
        {"name": "_format", "valueCode": "ndjson"}]})
    };
    let manifest = common::post_export(&client, &url, by_reference("ViewDefinition/kept")).await;
    let got = lines_by_view(&client, &manifest, write::Format::Ndjson).await;
    assert_eq!(
        got.get("patients"),
        expected(write::Format::Ndjson, &|_| true).get("patients")
    );
    for reference in ["ViewDefinition/missing", "ViewDefinition/../x"] {
        let answer = client
            .post(&url)
            .header("Accept", "application/fhir+json")
            .header("Prefer", "respond-async")
            .json(&by_reference(reference))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "{reference}");
        assert!(answer.text().await.unwrap().contains("viewReference"));
    }

    // A view the engine cannot run is refused at kickoff, naming the element.
    let bad = json!({"resourceType": "Parameters", "parameter": [{"name": "view", "part": [{"name": "viewResource", "resource": {"resource": "Patient", "select": [{"column": [{"name": "x", "path": "name.nope("}]}]}}]}]});
    let answer = client
        .post(&url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 400);
    let text = answer.text().await.unwrap();
    assert!(
        text.contains("view[0].viewResource: select[0].column[0].path"),
        "{text}"
    );
}

/// The sorted row lines of each view's files (CSV: each file's header checked and left out).
async fn lines_by_view(
    client: &reqwest::Client,
    manifest: &serde_json::Value,
    format: fhir_export::views::write::Format,
) -> std::collections::BTreeMap<String, Vec<Vec<u8>>> {
    let mut lines: std::collections::BTreeMap<String, Vec<Vec<u8>>> = Default::default();
    for file in manifest["output"].as_array().unwrap() {
        let url = file["url"].as_str().unwrap();
        let body = client.get(url).send().await.unwrap().bytes().await.unwrap();
        let end: &[u8] = match format {
            fhir_export::views::write::Format::Csv { .. } => b"\r\n",
            _ => b"\n",
        };
        let mut rows: Vec<Vec<u8>> = body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
            .collect();
        if end == b"\r\n" {
            let header = rows.remove(0);
            let header = String::from_utf8(header).unwrap();
            let names: Vec<&str> = header.split(',').collect();
            assert!(
                names.len() > 3 && names.contains(&"id"),
                "{url}: a header line, not {header:?}"
            );
        }
        assert_eq!(rows.len() as u64, file["count"].as_u64().unwrap(), "{url}");
        lines
            .entry(file["name"].as_str().unwrap().to_string())
            .or_default()
            .extend(rows);
    }
    for rows in lines.values_mut() {
        rows.sort();
    }
    lines
}

/// The four views of the HTTP tests and the bench (`tests/views/four-views.json`), in order.
fn four_views() -> Vec<(&'static str, serde_json::Value)> {
    let views: serde_json::Value =
        serde_json::from_str(include_str!("views/four-views.json")).unwrap();
    ["patients", "observations", "conditions", "encounters"]
        .into_iter()
        .map(|name| (name, views[name].clone()))
        .collect()
}

/// `_format=parquet`: the files are Parquet that DuckDB (a reader other than the writer's code)
/// reads back to the engine's rows, typed columns (`decimal` as DOUBLE) included; `handler view
/// run --format parquet` writes the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_view_exports_read_back_by_duckdb_equal_the_engines_rows() {
    use fhir_export::views::{rows_of, View};
    use serde_json::{json, Value};
    let store = common::sample_store();
    let server = common::start(&store, |s| s.shard_max_resources = 5_000).await;
    let client = common::client();
    let views: Vec<(&str, Value)> = four_views()
        .into_iter()
        .map(|(name, mut view)| {
            for column in view["select"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .flat_map(|s| s["column"].as_array_mut().unwrap())
            {
                if column["name"] == "value" || column["name"] == "component_value" {
                    column["type"] = "decimal".into();
                }
            }
            (name, view)
        })
        .collect();
    let parameter: Vec<Value> = views
        .iter()
        .map(|(name, view)| json!({"name": "view", "part": [{"name": "name", "valueString": name}, {"name": "viewResource", "resource": view}]}))
        .chain([json!({"name": "_format", "valueCode": "parquet"})])
        .collect();
    let url = format!("{}/$viewdefinition-export", server.base);
    let manifest = common::post_export(
        &client,
        &url,
        json!({"resourceType": "Parameters", "parameter": parameter}),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut files = 0;
    for file in manifest["output"].as_array().unwrap() {
        let url = file["url"].as_str().unwrap();
        let name = url.rsplit('/').next().unwrap();
        assert!(name.ends_with(".parquet"), "{name}");
        let bytes = client.get(url).send().await.unwrap().bytes().await.unwrap();
        std::fs::write(dir.path().join(name), &bytes).unwrap();
        files += 1;
    }
    assert!(files >= 4, "a file a view at least");
    let stored = common::stored_resources(&store);
    for (name, definition) in &views {
        let view = View::parse(definition).unwrap();
        let mut want: Vec<String> = Vec::new();
        for ((resource_type, _), json) in &stored {
            if *resource_type != view.resource {
                continue;
            }
            for row in rows_of(&view, json.as_bytes()).unwrap() {
                let cells: Vec<Value> = row
                    .into_iter()
                    .zip(view.columns())
                    .map(
                        |((_, value), column)| match (&value, column.ty.as_deref()) {
                            (Value::Null, _) => Value::Null,
                            (_, Some("decimal")) => value,
                            (Value::String(_), _) => value,
                            (other, _) => other.to_string().into(),
                        },
                    )
                    .collect();
                want.push(as_doubles(Value::Array(cells)).to_string());
            }
        }
        want.sort();
        let got = duckdb_rows(&dir.path().join(format!("{name}*.parquet")));
        assert_eq!(got.len(), want.len(), "{name}: rows");
        let differ = got.iter().zip(&want).find(|(g, w)| g != w);
        assert!(
            differ.is_none(),
            "{name}: DuckDB reads {differ:?} (left) where the engine gives the right"
        );
    }
}

/// The rows DuckDB reads from the Parquet files matching `pattern`, each a JSON array, sorted.
fn duckdb_rows(pattern: &std::path::Path) -> Vec<String> {
    let script = r#"
import duckdb, json, sys
rows = duckdb.sql(f"SELECT * FROM read_parquet('{sys.argv[1]}')").fetchall()
for row in rows:
    print(json.dumps(list(row), separators=(",", ":"), ensure_ascii=False))
"#;
    let output = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(pattern)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "DuckDB (pip install -r tests/views/requirements.txt): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut rows: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap()
                .to_string()
        })
        .collect();
    rows.sort();
    rows
}

/// The value with every number as a double (a Parquet DOUBLE reads back as `3.0` where the
/// engine's decimal is `3`).
fn as_doubles(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Number(number) => serde_json::Value::from(number.as_f64().unwrap()),
        serde_json::Value::Array(items) => items.into_iter().map(as_doubles).collect(),
        other => other,
    }
}

/// The four views exported from Medplum's FHIR router as the source equal those from the
/// embedded store holding the same resources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_exports_from_medplum_equal_those_from_the_embedded_store() {
    use serde_json::{json, Value};
    let store = common::sample_store();
    let dir = tempfile::tempdir().unwrap();
    let mut per_type: std::collections::BTreeMap<String, String> = Default::default();
    for ((resource_type, _), json) in common::stored_resources(&store) {
        if ["Patient", "Observation", "Condition", "Encounter"].contains(&resource_type.as_str()) {
            let file = per_type.entry(resource_type).or_default();
            file.push_str(&json);
            file.push('\n');
        }
    }
    for (resource_type, text) in &per_type {
        std::fs::write(dir.path().join(format!("{resource_type}.ndjson")), text).unwrap();
    }
    let medplum = common::medplum::Medplum::start(dir.path(), &[]);
    let embedded = common::start(&store, |_| {}).await;
    let remote = common::start_reading(&store, &medplum.base, |_| {}).await;
    let client = common::client();
    let parameter: Vec<Value> = four_views()
        .iter()
        .map(|(name, view)| json!({"name": "view", "part": [{"name": "name", "valueString": name}, {"name": "viewResource", "resource": view}]}))
        .chain([json!({"name": "_format", "valueCode": "csv"})])
        .collect();
    let body = json!({"resourceType": "Parameters", "parameter": parameter});
    let csv = fhir_export::views::write::Format::Csv { header: true };
    let mut exported = Vec::new();
    for server in [&embedded, &remote] {
        let url = format!("{}/$viewdefinition-export", server.base);
        let manifest = common::post_export(&client, &url, body.clone()).await;
        exported.push(lines_by_view(&client, &manifest, csv).await);
    }
    assert_eq!(exported[0].len(), 4);
    for (name, rows) in &exported[0] {
        assert!(!rows.is_empty(), "{name}");
        let from_medplum = exported[1].get(name).map(|rows| numbers_by_value(rows));
        assert_eq!(
            from_medplum,
            Some(numbers_by_value(rows)),
            "{name}: Medplum's rows"
        );
    }
}

/// CSV rows, sorted, with each number field by its value: Medplum (JavaScript) stores `163.0` as
/// `163`, where the embedded store keeps the bytes it was given.
fn numbers_by_value(rows: &[Vec<u8>]) -> Vec<String> {
    let mut rows: Vec<String> = rows
        .iter()
        .map(|row| {
            String::from_utf8_lossy(row)
                .split(',')
                .map(|field| match field.parse::<f64>() {
                    Ok(number) if field.contains('.') => number.to_string(),
                    _ => field.to_string(),
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    rows.sort();
    rows
}
