//! Bulk Data STU4 (`$export-v4`, the 4.0.0 ballot of HL7/bulk-data) over real HTTP, one test for
//! each rule, written from the ballot's text (quoted above each test). STU3 `$export` is held by
//! the other tests, unchanged.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;
use fhir_export::source::{import, EmbeddedStore};
use serde_json::{json, Value};

const MANIFEST_TYPE: &str = "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest";
const ASSOCIATED_DATA: &str = "http://hl7.org/fhir/uv/bulkdata/CodeSystem/include-associated-data";

fn parameters(parameter: Vec<Value>) -> Value {
    json!({"resourceType": "Parameters", "parameter": parameter})
}

fn string(name: &str, value: &str) -> Value {
    json!({"name": name, "valueString": value})
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    prefer: &str,
) -> reqwest::Response {
    client
        .post(url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", prefer)
        .header("Content-Type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// The ids of the resources of every output file, in order.
async fn exported_ids(client: &reqwest::Client, manifest: &Value) -> Vec<String> {
    let files = download_all(client, manifest).await;
    let lines = files.iter().flat_map(|(_, _, lines)| lines);
    lines
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// A refused kickoff: its status, and the diagnostics of its OperationOutcome.
async fn refused(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome", "{outcome}");
    (
        status,
        outcome["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

/// A store of two patients, their observations, an organization, all of 2020.
fn small_store(dir: &Path) -> PathBuf {
    let data = dir.join("small.ndjson");
    let lines = [
        r#"{"resourceType":"Patient","id":"a","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        r#"{"resourceType":"Patient","id":"b","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        r#"{"resourceType":"Observation","id":"oa","status":"final","subject":{"reference":"Patient/a"},"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        r#"{"resourceType":"Observation","id":"ob","status":"final","subject":{"reference":"Patient/b"},"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        r#"{"resourceType":"Organization","id":"org","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    ];
    std::fs::write(&data, lines.join("\n")).unwrap();
    let path = dir.join("small.db");
    let report = import::import(&EmbeddedStore::open(&path).unwrap(), &[data]).unwrap();
    assert!(report.failed.is_empty());
    path
}

/// Patient a updated in 2022, Observation ob deleted (now).
fn change_after_2021(store: &Path) {
    let file = store.parent().unwrap().join("changes.json");
    let patient = json!({"resourceType": "Patient", "id": "a", "gender": "female", "meta": {"lastUpdated": "2022-01-01T00:00:00Z"}});
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient, "request": {"method": "PUT", "url": "Patient/a"}},
        {"request": {"method": "DELETE", "url": "Observation/ob"}}]});
    std::fs::write(&file, bundle.to_string()).unwrap();
    let report = import::import(&EmbeddedStore::open(store).unwrap(), &[file]).unwrap();
    assert_eq!(report.deleted, 1);
}

/// "The Data Provider's FHIR Resource Server SHALL support invocation of this operation using HTTP
/// POST ... Request parameters SHALL be supplied using the FHIR Parameters Resource." (export.md);
/// "Removed support for HTTP `GET` kick-off requests" (changes.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kickoff_is_a_post_of_a_parameters_body_and_a_get_is_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&small_store(dir.path()), |_| {}).await;
    let client = client();
    for path in ["$export-v4", "Patient/$export-v4", "Group/g/$export-v4"] {
        let url = format!("{}/{path}", server.base);
        let (status, message) = refused(kickoff(&client, &url).await).await;
        assert_eq!(status, 405, "{path}");
        assert!(
            message.contains("POST with a FHIR Parameters body"),
            "{message}"
        );
        let (status, message) =
            refused(post(&client, &url, &json!({}), "respond-async").await).await;
        assert_eq!(status, 400, "{path}");
        assert!(message.contains("Parameters"), "{message}");
    }
    let url = format!("{}/$export-v4?_type=Patient", server.base);
    let (status, message) =
        refused(post(&client, &url, &parameters(vec![]), "respond-async").await).await;
    assert_eq!(status, 400);
    assert!(message.contains("not in the query string"), "{message}");

    // The STU3 operation beside it still takes a GET, and knows nothing of STU4's parameters.
    let manifest = export(&client, &format!("{}/$export?_type=Patient", server.base)).await;
    assert_eq!(manifest["output"][0]["count"], 2);
    assert!(manifest["error"].is_array() && manifest.get("outcome").is_none());
    let stu3 = format!("{}/$export?_maximumFileSize=4096", server.base);
    let (status, message) = refused(kickoff(&client, &stu3).await).await;
    assert_eq!(status, 400);
    assert!(message.contains("_maximumFileSize"), "{message}");
}

/// "If a parameter has a cardinality greater than one, a Data Consumer MAY repeat the kick-off
/// parameter by including multiple `Parameters.parameter` entries with the same `name`. A Data
/// Consumer SHALL NOT represent multiple values by comma-delimiting them within a single parameter
/// value." (export.md)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_repeated_parameters_and_a_comma_list_is_refused_or_noted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&small_store(dir.path()), |_| {}).await;
    let client = client();
    let url = format!("{}/$export-v4", server.base);

    let repeated = parameters(vec![
        string("_type", "Patient"),
        string("_type", "Organization"),
    ]);
    let manifest = post_export(&client, &url, repeated).await;
    let types: BTreeSet<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, BTreeSet::from(["Organization", "Patient"]));

    for (name, value) in [
        ("_type", "Patient,Organization"),
        ("_elements", "id,meta"),
        ("_typeFilter", "Patient?_id=a,Observation?status=final"),
    ] {
        let body = parameters(vec![string(name, value)]);
        let (status, message) = refused(post(&client, &url, &body, "respond-async").await).await;
        assert_eq!(status, 400, "{name}");
        assert!(
            message.contains(name) && message.contains("comma"),
            "{message}"
        );
    }
    let comma_patients = parameters(vec![
        json!({"name": "patient", "valueReference": {"reference": "Patient/a,Patient/b"}}),
    ]);
    let patient_url = format!("{}/Patient/$export-v4", server.base);
    let (status, _) =
        refused(post(&client, &patient_url, &comma_patients, "respond-async").await).await;
    assert_eq!(status, 400);
    // A comma inside one _typeFilter query is the search's own OR, not a list of queries.
    let or = parameters(vec![string("_typeFilter", "Observation?_id=oa,ob")]);
    let manifest = post_export(&client, &url, or).await;
    let observations = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == "Observation");
    assert_eq!(observations.unwrap()["count"], 2);

    // Under lenient handling the list is read as STU3 reads it, with a note in `outcome`.
    let lenient = post(
        &client,
        &url,
        &parameters(vec![string("_type", "Patient,Organization")]),
        "respond-async, handling=lenient",
    )
    .await;
    assert_eq!(lenient.status(), 202);
    let status_url = lenient.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let manifest = wait_for_manifest(&client, &status_url).await;
    assert_eq!(manifest["output"].as_array().unwrap().len(), 2);
    let notes = client
        .get(manifest["outcome"][0]["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(notes.contains("comma-separated list"), "{notes}");
}

/// "Changed the `includeAssociatedData` parameter type to a `Coding` from a `code`." (changes.md);
/// `patient` "type = #Reference" (export-params.fsh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_associated_data_is_a_coding_and_patient_a_reference() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&small_store(dir.path()), |_| {}).await;
    let client = client();
    let url = format!("{}/$export-v4", server.base);

    let as_code = parameters(vec![
        json!({"name": "includeAssociatedData", "valueCode": "_history"}),
    ]);
    let (status, message) = refused(post(&client, &url, &as_code, "respond-async").await).await;
    assert_eq!(status, 400);
    assert!(message.contains("valueCoding"), "{message}");
    let provenance = parameters(vec![
        json!({"name": "includeAssociatedData", "valueCoding": {"system": ASSOCIATED_DATA, "code": "LatestProvenanceResources"}}),
    ]);
    let (status, message) = refused(post(&client, &url, &provenance, "respond-async").await).await;
    assert_eq!(status, 400);
    assert!(message.contains("LatestProvenanceResources"), "{message}");
    // Azure's custom values, as Codings: every version of every resource.
    let history = parameters(vec![
        json!({"name": "includeAssociatedData", "valueCoding": {"code": "_history"}}),
        string("_type", "Patient"),
    ]);
    let manifest = post_export(&client, &url, history).await;
    let versions: u64 = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert_eq!(versions, 2);

    let patient_url = format!("{}/Patient/$export-v4", server.base);
    let as_string = parameters(vec![string("patient", "Patient/a")]);
    let (status, message) =
        refused(post(&client, &patient_url, &as_string, "respond-async").await).await;
    assert_eq!(status, 400);
    assert!(message.contains("valueReference"), "{message}");
    let as_reference = parameters(vec![
        json!({"name": "patient", "valueReference": {"reference": "Patient/a"}}),
    ]);
    let manifest = post_export(&client, &patient_url, as_reference).await;
    let ids: BTreeSet<String> = exported_ids(&client, &manifest).await.into_iter().collect();
    assert_eq!(ids, BTreeSet::from(["a".to_string(), "oa".to_string()]));
}

/// "[_maximumFileSize] Specifies the maximum size in bytes for generated NDJSON files. The value
/// SHALL be a positive integer and SHALL be greater than `_minimumFileSize` if both are
/// specified. If a server supports this parameter, it SHALL construct files that do not exceed
/// this size." "Servers MAY deviate ... when a resource is larger than `_maximumFileSize`."
/// (async-params.fsh, async.md)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_never_pass_the_maximum_file_size_and_their_size_is_in_the_manifest() {
    let client = client();
    let server = start(&sample_store(), |_| {}).await;
    let url = format!("{}/$export-v4", server.base);
    let plain = post_export(&client, &url, parameters(vec![])).await;
    // About fifty files' worth of the data (the Synthea sample, or its stand-in).
    let total: u64 = plain["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["fileSize"].as_u64().unwrap())
        .sum();
    let max = (total / 50).max(4096);
    let min = max / 2;
    let body = parameters(vec![
        json!({"name": "_maximumFileSize", "valuePositiveInt": max}),
        json!({"name": "_minimumFileSize", "valuePositiveInt": min}),
    ]);
    let manifest = post_export(&client, &url, body).await;
    let count = |manifest: &Value| -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for output in manifest["output"].as_array().unwrap() {
            *counts
                .entry(output["type"].as_str().unwrap().to_string())
                .or_default() += output["count"].as_u64().unwrap();
        }
        counts
    };
    assert_eq!(
        count(&manifest),
        count(&plain),
        "the same resources, in more files"
    );
    let outputs = manifest["output"].as_array().unwrap();
    assert!(outputs.len() >= 40, "{} files", outputs.len());
    let files = download_all(&client, &manifest).await;
    let mut by_stem: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for ((_, url, lines), output) in files.iter().zip(outputs) {
        let bytes: u64 = lines.iter().map(|l| l.len() as u64 + 1).sum();
        assert_eq!(output["fileSize"], bytes, "{url}");
        assert!(
            bytes <= max || lines.len() == 1,
            "{url}: {bytes} bytes in {} lines",
            lines.len()
        );
        let name = url.rsplit('/').next().unwrap().trim_end_matches(".ndjson");
        let (stem, number) = name.rsplit_once('-').unwrap();
        by_stem
            .entry(stem.to_string())
            .or_default()
            .push((number.parse().unwrap(), bytes));
    }
    // Files are filled to the maximum before they roll: all but the last of a shard meet the
    // minimum.
    for (stem, mut files) in by_stem {
        files.sort();
        files.pop();
        assert!(
            files.iter().all(|(_, bytes)| *bytes >= min),
            "{stem}: {files:?}"
        );
    }

    for (parameter, named) in [
        (
            vec![
                json!({"name": "_maximumFileSize", "valuePositiveInt": 4096}),
                json!({"name": "_minimumFileSize", "valuePositiveInt": 4096}),
            ],
            "_maximumFileSize",
        ),
        (
            vec![json!({"name": "_maximumFileSize", "valuePositiveInt": 1000})],
            "_maximumFileSize",
        ),
        (
            vec![json!({"name": "_minimumFileSize", "valueInteger": -1})],
            "_minimumFileSize",
        ),
    ] {
        let (status, message) =
            refused(post(&client, &url, &parameters(parameter), "respond-async").await).await;
        assert_eq!(status, 400);
        assert!(message.contains(named), "{message}");
    }
}

/// The manifest as the `BulkDataManifest` logical model: "Renamed the `error` element to
/// `outcome`", "Added optional `manifestType` and `outputFormat` elements", "Removed the
/// deprecated `request` element" (changes.md); `fileSize` on `output`, `deleted` and `outcome`
/// entries, `countSeverity` on `outcome` (BulkDataManifest.fsh); "All fields in the linked
/// manifest SHALL be populated with the same values as the manifest with the link, apart from
/// the `output`, `deleted`, `outcome`, and `link` arrays." (export.md)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_is_the_bulk_data_manifest_model_on_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let store = small_store(dir.path());
    change_after_2021(&store);
    let server = start(&store, |s| s.manifest_page_size = 1).await;
    let client = client();
    let body = parameters(vec![
        json!({"name": "_since", "valueInstant": "2021-01-01T00:00:00Z"}),
        json!({"name": "allowPartialManifests", "valueBoolean": true}),
        json!({"name": "unknownParameter", "valueString": "x"}),
    ]);
    let url = format!("{}/$export-v4", server.base);
    let response = post(&client, &url, &body, "respond-async, handling=lenient").await;
    assert_eq!(response.status(), 202);
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let first = wait_for_manifest(&client, &status_url).await;
    let mut pages = vec![first];
    while let Some(next) = pages.last().unwrap()["link"][0]["url"].as_str() {
        pages.push(get_json(&client, next).await);
    }
    let mut lists: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for page in &pages {
        assert_eq!(page["manifestType"], MANIFEST_TYPE, "{page}");
        assert_eq!(page["outputFormat"], "application/fhir+ndjson");
        assert_eq!(page["transactionTime"], pages[0]["transactionTime"]);
        assert_eq!(page["requiresAccessToken"], false);
        for absent in ["request", "error", "extension"] {
            assert!(page.get(absent).is_none(), "{absent} in {page}");
        }
        for list in ["output", "deleted", "outcome"] {
            for file in page
                .get(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                assert!(file["fileSize"].as_u64().unwrap() > 0, "{list}: {file}");
                lists.entry(list).or_default().push(file.clone());
            }
        }
    }
    assert_eq!(pages.len(), 2, "one file a page: {pages:?}");
    let output = &lists["output"];
    assert_eq!(output.len(), 1);
    assert_eq!(
        (output[0]["type"].as_str(), output[0]["count"].as_u64()),
        (Some("Patient"), Some(1))
    );
    let deleted = &lists["deleted"];
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0]["count"], 1);
    let bundle = client
        .get(deleted[0]["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        bundle.len() as u64,
        deleted[0]["fileSize"].as_u64().unwrap()
    );
    let bundle: Value = serde_json::from_str(bundle.trim_end()).unwrap();
    assert_eq!(
        bundle["entry"][0]["request"],
        json!({"method": "DELETE", "url": "Observation/ob"})
    );
    // The notes file, listed on every page.
    let outcome = &lists["outcome"];
    assert_eq!(outcome.len(), pages.len());
    assert_eq!(outcome[0], outcome[1]);
    assert_eq!(
        outcome[0]["countSeverity"],
        json!([{"code": "information", "count": 1}])
    );
    let notes = client
        .get(outcome[0]["url"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(notes.contains("unknownParameter"), "{notes}");
}

/// `handler export --version 4` kicks off `$export-v4` by POST and reads the STU4 manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_client_speaks_stu4() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&small_store(dir.path()), |_| {}).await;
    let out = dir.path().join("out");
    let base = server.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_handler"))
            .args([
                "export",
                &base,
                "--version",
                "4",
                "--type",
                "Patient",
                "--type",
                "Observation",
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("exported 4 resources in 2 files"),
        "{stdout}"
    );
    let mut names: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["Observation-1.ndjson", "Patient-1.ndjson"]);
}

/// "If an includeAssociatedData value relevant to provenance is not specified ... the Data
/// Provider SHALL include all available Provenance resources whose `Provenance.target` is a
/// resource in the Patient compartment in a patient level export request" (export.md). This
/// server says in its CapabilityStatement what it does instead, and does that: the Provenance of
/// the Patient compartment (its target names the patient), not one that targets only another
/// resource of the patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capability_statement_says_which_provenance_a_patient_export_holds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("provenance.ndjson");
    let lines = [
        r#"{"resourceType":"Patient","id":"a","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        r#"{"resourceType":"Observation","id":"oa","status":"final","subject":{"reference":"Patient/a"},"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        r#"{"resourceType":"Provenance","id":"of-patient","target":[{"reference":"Patient/a"},{"reference":"Observation/oa"}],"recorded":"2020-01-01T00:00:00Z","agent":[{"who":{"display":"x"}}],"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        r#"{"resourceType":"Provenance","id":"of-observation","target":[{"reference":"Observation/oa"}],"recorded":"2020-01-01T00:00:00Z","agent":[{"who":{"display":"x"}}],"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    ];
    std::fs::write(&data, lines.join("\n")).unwrap();
    let store = dir.path().join("store.db");
    import::import(&EmbeddedStore::open(&store).unwrap(), &[data]).unwrap();
    let server = start(&store, |_| {}).await;
    let client = client();
    let statement = get_json(&client, &format!("{}/metadata", server.base)).await;
    let documentation = statement["rest"][0]["documentation"].as_str().unwrap();
    assert!(
        documentation.contains("Provenance: a Patient-level export includes the Provenance resources in the Patient compartment"),
        "{documentation}"
    );
    let url = format!("{}/Patient/$export-v4", server.base);
    let manifest = post_export(
        &client,
        &url,
        parameters(vec![string("_type", "Provenance")]),
    )
    .await;
    let ids = exported_ids(&client, &manifest).await;
    assert_eq!(ids, ["of-patient"]);
}
