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

/// A stand-in for a server and its storage: a status URL that answers a manifest whose entries
/// end in the same file name, one file served gzip-encoded as Azure storage serves a compressed
/// export (`Content-Encoding: gzip`, two gzip members), one served plain.
async fn manifest_server(entries: Vec<(&'static str, String)>) -> (String, impl Drop) {
    use std::io::Write;
    use warp::{Filter, Reply};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let manifest = serde_json::json!({
        "transactionTime": "2026-12-07T00:00:00Z",
        "request": format!("{base}/$export"),
        "requiresAccessToken": false,
        "output": entries.iter().map(|(path, body)| serde_json::json!({
            "type": "Patient",
            "url": format!("{base}/{path}"),
            "count": body.lines().count(),
        })).collect::<Vec<_>>(),
        "error": [],
    });
    let files: std::collections::HashMap<String, String> = entries
        .into_iter()
        .map(|(path, body)| (path.split('?').next().unwrap().to_string(), body))
        .collect();
    let gzip = |text: &str| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap()
    };
    let routes = warp::path!("status")
        .map(move || warp::reply::json(&manifest).into_response())
        .or(warp::path::tail().map(move |tail: warp::path::Tail| {
            let body = files[tail.as_str()].clone();
            let mut response = match tail.as_str().starts_with("gz/") {
                true => {
                    let (first, second) = body.split_at(body.len() / 2);
                    let mut members = gzip(first);
                    members.extend(gzip(second));
                    let mut response = warp::reply::Response::new(members.into());
                    response.headers_mut().insert(
                        "content-encoding",
                        warp::http::HeaderValue::from_static("gzip"),
                    );
                    response
                }
                false => warp::reply::Response::new(body.into()),
            };
            response.headers_mut().insert(
                "content-type",
                warp::http::HeaderValue::from_static("application/fhir+ndjson"),
            );
            response
        }))
        .unify();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(fhir_export::http::server::serve(
        warp::get().and(routes),
        listener,
        Default::default(),
        async {
            stopped.await.ok();
        },
    ));
    struct Stop(Option<tokio::sync::oneshot::Sender<()>>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.take().map(|stop| stop.send(()));
        }
    }
    (base, Stop(Some(stop)))
}

fn patients(from: usize, count: usize) -> String {
    (from..from + count)
        .map(|n| format!("{{\"resourceType\":\"Patient\",\"id\":\"p{n}\"}}\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_entry_lands_in_its_own_file_and_gzip_is_decoded() {
    let entries = vec![
        ("a/Patient-1.ndjson", patients(0, 3)),
        ("b/Patient-1.ndjson", patients(3, 5)),
        ("gz/Patient-1.ndjson", patients(8, 40)),
        ("c/Patient-1.ndjson?sv=2025&sig=x", patients(48, 2)),
    ];
    let expected: Vec<String> = entries.iter().map(|(_, body)| body.clone()).collect();
    let (base, _server) = manifest_server(entries).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let output = run_handler(&[
        "export",
        "--resume",
        &format!("{base}/status"),
        "--out",
        out.to_str().unwrap(),
    ])
    .await;
    assert_succeeded(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("50 resources in 4 files"), "{stdout}");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "Patient-1.ndjson",
            "Patient-1~2.ndjson",
            "Patient-1~3.ndjson",
            "Patient-1~4.ndjson"
        ]
    );
    let mut got: Vec<String> = names
        .iter()
        .map(|name| std::fs::read_to_string(out.join(name)).unwrap())
        .collect();
    let mut expected = expected;
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "every file whole, decoded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deid_check_refuses_a_deep_configuration_and_prints_its_verdict_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let config = |path: &str| {
        format!(
            r#"{{"fhirVersion":"R4","fhirPathRules":[{{"path":{},"method":"redact"}}]}}"#,
            serde_json::to_string(path).unwrap()
        )
    };
    let deep = dir.path().join("deep.json");
    let nested = format!("{}Patient.name{}", "(".repeat(3_000), ")".repeat(3_000));
    std::fs::write(&deep, config(&nested)).unwrap();
    let output = run_handler(&["deid", "check", deep.to_str().unwrap()]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("refused") && stdout.contains("deeper than 100 levels"),
        "{stdout}"
    );
    let fine = dir.path().join("fine.json");
    std::fs::write(&fine, config("Patient.name")).unwrap();
    let output = run_handler(&["deid", "check", fine.to_str().unwrap()]).await;
    assert_succeeded(&output);
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid, 1 rules"));
}
