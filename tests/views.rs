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
    println!(
        "SQL on FHIR suite: {} of {} shareable cases pass, {} of {} others (experimental)",
        passed(&shareable),
        shareable.len(),
        passed(&experimental),
        experimental.len()
    );
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
