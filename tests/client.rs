//! `handler export` (the real binary) against the real server: a complete export of generated data,
//! an interrupted one resumed, and a refused kickoff.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use fhir_export::source::{import, EmbeddedStore};

fn handler() -> Command {
    Command::new(env!("CARGO_BIN_EXE_handler"))
}

/// Runs `handler` to the end off the runtime's threads, which serve the export meanwhile.
async fn run_handler(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    tokio::task::spawn_blocking(move || handler().args(args).output().unwrap())
        .await
        .unwrap()
}

fn assert_succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Generated demo data in a store; returns (store, resources per type).
fn demo_store(dir: &Path) -> (std::path::PathBuf, BTreeMap<String, u64>) {
    let summary = fhir_export::generate::write_ndjson(30, 3, &dir.join("demo")).unwrap();
    let store = dir.join("demo.db");
    let report =
        import::import(&EmbeddedStore::open(&store).unwrap(), &[dir.join("demo")]).unwrap();
    assert!(report.failed.is_empty());
    (store, summary.counts)
}

/// Lines per type among the `.ndjson` files of `out` (`Type-n.ndjson`).
fn lines_per_type(out: &Path) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for entry in std::fs::read_dir(out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.ends_with(".ndjson"), "unexpected file {name}");
        let resource_type = name.split('-').next().unwrap().to_string();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count() as u64;
        *counts.entry(resource_type).or_default() += lines;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_downloads_every_file_of_an_export() {
    let dir = tempfile::tempdir().unwrap();
    let (store, generated) = demo_store(dir.path());
    let server = start(&store, |_| {}).await;
    let out = dir.path().join("out");
    let output = run_handler(&["export", &server.base, "--out", out.to_str().unwrap()]).await;
    assert_succeeded(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let total: u64 = generated.values().sum();
    assert!(
        stdout.contains(&format!("exported {total} resources")),
        "{stdout}"
    );
    assert_eq!(lines_per_type(&out), generated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_export_is_resumed_from_its_status_url() {
    let dir = tempfile::tempdir().unwrap();
    let (store, generated) = demo_store(dir.path());
    let exports = dir.path().join("exports");
    let api_only = start_with_exports(&store, &exports, tempfile::tempdir().unwrap(), |s| {
        s.workers = 0
    })
    .await;
    let port: u16 = api_only.base.rsplit(':').next().unwrap().parse().unwrap();

    let child = handler()
        .args([
            "export",
            &api_only.base,
            "--type",
            "Patient,Observation",
            "--out",
            dir.path().join("first").to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert_eq!(
        output.status.code(),
        Some(130),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let status_url = stdout
        .split("--resume ")
        .nth(1)
        .expect("a resume hint")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    drop(api_only);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let _server = start_at(&store, &exports, tempfile::tempdir().unwrap(), port, |_| {}).await;
    let out = dir.path().join("resumed");
    let output = run_handler(&[
        "export",
        "--resume",
        &status_url,
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert_succeeded(&output);
    let expected: BTreeMap<String, u64> = generated
        .into_iter()
        .filter(|(t, _)| t == "Patient" || t == "Observation")
        .collect();
    assert_eq!(lines_per_type(&out), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_kickoff_is_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = demo_store(dir.path());
    let server = start(&store, |_| {}).await;
    let output = run_handler(&["export", &server.base, "--type", "Unicorn"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("kickoff refused (400 Bad Request)") && stderr.contains("\"Unicorn\""),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_starts_a_de_identified_export() {
    let dir = tempfile::tempdir().unwrap();
    let (store, generated) = demo_store(dir.path());
    let server = start(&store, |_| {}).await;
    let configs = server.exports.join("anonymization");
    std::fs::create_dir_all(&configs).unwrap();
    std::fs::write(
        configs.join("names.json"),
        r#"{"fhirPathRules": [{"path": "nodesByType('HumanName')", "method": "redact"}]}"#,
    )
    .unwrap();
    let out = dir.path().join("out");
    let output = run_handler(&[
        "export",
        &server.base,
        "--type",
        "Patient",
        "--container",
        "deid",
        "--anonymization-config",
        "names.json",
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert_succeeded(&output);
    let patients = lines_per_type(&out)["Patient"];
    assert_eq!(patients, generated["Patient"]);
    for entry in std::fs::read_dir(&out).unwrap() {
        for line in std::fs::read_to_string(entry.unwrap().path())
            .unwrap()
            .lines()
        {
            let patient: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(patient.get("name").is_none(), "{line}");
            assert_eq!(patient["meta"]["security"][0]["code"], "REDACTED", "{line}");
        }
    }
    assert!(server.exports.join("deid").is_dir());
}
