//! De-identified export (`_anonymizationConfig`) over real HTTP, on the local folder and on Azure
//! Blob (Azurite): the output equals the engine's on every stored resource (the sample, and the
//! input of every golden case of the anonymizer's corpus with its configuration), kickoff checks
//! answer 400 naming the parameter (lenient handling never ignores them), the configuration is
//! pinned by its ETag, one set of keys serves every shard, processing errors fail the export
//! without values or are skipped, and numbers stay as written.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use common::*;
use fhir_export::deid::{AnonymizationConfig, Engine, Keys};
use fhir_export::source::{import, EmbeddedStore};
use fhir_export::storage::{AzureBlob, ObjectStore, PutMode};
use serde_json::Value;

/// The anonymizer's corpus, beside the project.
fn anonymizer_corpus() -> PathBuf {
    corpus_dir("anonymization-corpus")
}

fn corpus(path: &str) -> Vec<u8> {
    std::fs::read(anonymizer_corpus().join(path)).unwrap()
}

/// A configuration of the HIPAA Safe Harbor kind: the anonymizer's own sample where its corpus is
/// beside the project (as in CI), or else the project's stand-in (`tests/deid/safe-harbor.json`:
/// names, addresses but state and country, contact points and narratives redacted; ids,
/// references and identifiers hashed; dates shifted; every key in the file).
fn hipaa() -> Vec<u8> {
    match anonymizer_corpus().is_dir() {
        true => corpus("configs/r4-configuration-sample.json"),
        false => include_bytes!("deid/safe-harbor.json").to_vec(),
    }
}

/// A configuration whose only rule is `invalid()`, a function FHIRPath does not have.
const INVALID_FHIRPATH: &[u8] =
    br#"{"fhirPathRules": [{"path": "invalid()", "method": "redact"}]}"#;

/// A configuration that generalizes names by a number range (an error on every name, a string),
/// redacts them, and keeps the rest; `processingErrors` is `raise` or `skip`.
fn processing_error_config(handling: &str) -> Vec<u8> {
    format!(
        r#"{{"processingErrors": "{handling}", "fhirPathRules": [
            {{"path": "nodesByType('HumanName').family", "method": "generalize",
              "cases": {{"$this >= 0 and $this < 20": "20"}}}},
            {{"path": "nodesByType('HumanName')", "method": "redact"}},
            {{"path": "Resource", "method": "keep"}}
        ]}}"#
    )
    .into_bytes()
}

/// Puts a configuration in the local anonymization folder of an exports folder.
fn put_config(exports: &Path, name: &str, bytes: &[u8]) {
    let path = exports.join("anonymization").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// The engine an export ran with `config`, whose keys are all in the file (keys drawn per export
/// would differ): "today" is the date of the export's `transactionTime`.
fn engine_of(config: &[u8], manifest: &Value) -> Engine {
    let config = AnonymizationConfig::parse(config).unwrap();
    let today: NaiveDate = manifest["transactionTime"].as_str().unwrap()[..10]
        .parse()
        .unwrap();
    Engine::new(&config, Keys::for_export(&config), today).unwrap()
}

/// The lines of every output file, by type.
async fn lines_by_type(
    client: &reqwest::Client,
    manifest: &Value,
) -> BTreeMap<String, Vec<String>> {
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (resource_type, _, lines) in download_all(client, manifest).await {
        by_type.entry(resource_type).or_default().extend(lines);
    }
    by_type
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_de_identified_equals_the_engine_on_every_stored_resource() {
    let server = start(&sample_store(), |_| {}).await;
    put_config(&server.exports, "hipaa/sample.json", &hipaa());
    let client = client();
    let manifest = export(
        &client,
        &format!(
            "{}/$export?_container=deid&_anonymizationConfig=hipaa/sample.json",
            server.base
        ),
    )
    .await;
    // Every key the HIPAA sample uses is in the file (its encryptKey is not used by a rule).
    let engine = engine_of(&hipaa(), &manifest);
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ((resource_type, _), json) in stored_resources(&server.store) {
        let line = String::from_utf8(engine.deidentify(json.as_bytes()).unwrap()).unwrap();
        expected.entry(resource_type).or_default().push(line);
    }
    let mut got = lines_by_type(&client, &manifest).await;
    for lines in expected.values_mut().chain(got.values_mut()) {
        lines.sort();
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (resource_type, lines) in &expected {
        assert_eq!(got[resource_type].len(), lines.len(), "{resource_type}");
        assert!(
            got[resource_type] == *lines,
            "{resource_type}: the export differs from the engine"
        );
    }
    let patients = &got["Patient"];
    let patient: Value = serde_json::from_str(&patients[0]).unwrap();
    let labels: Vec<&str> = patient["meta"]["security"]
        .as_array()
        .unwrap()
        .iter()
        .map(|coding| coding["code"].as_str().unwrap())
        .collect();
    assert!(
        labels.contains(&"REDACTED") && labels.contains(&"CRYTOHASH"),
        "{labels:?}"
    );
    assert!(patients
        .iter()
        .all(|line| !line.contains("\"family\"") && !line.contains("\"given\"")));
    assert!(patient
        .get("address")
        .is_some_and(|a| a[0].get("line").is_none()));
    assert!(manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .contains("/deid/"));
}

/// Every golden case of the corpus goes through the export path: its input stored (as one NDJSON
/// line, so a Bundle stays one resource with its entries; an input without an id gets one, as a
/// stored resource has one), exported with the case's configuration, equals the engine's output
/// for the resource as stored (the store adds `meta.lastUpdated`; `deid_corpus.rs` compares the
/// engine with the expected files).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_golden_case_exported_over_http_equals_the_engine() {
    let test = "deid_export::every_golden_case_exported_over_http_equals_the_engine";
    if outside_corpus("anonymization-corpus", test).is_none() {
        return;
    }
    let cases: Value = serde_json::from_slice(&corpus("manifest.json")).unwrap();
    let mut configs_by_input: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for case in cases["cases"].as_array().unwrap() {
        if case["kind"] == "golden" {
            configs_by_input
                .entry(case["input"].as_str().unwrap())
                .or_default()
                .push(case["config"].as_str().unwrap());
        }
    }
    let client = client();
    let mut exported = 0;
    for (input, configs) in configs_by_input {
        let dir = tempfile::tempdir().unwrap();
        let bytes = corpus(input);
        let mut resource: Value =
            serde_json::from_slice(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes)).unwrap();
        resource
            .as_object_mut()
            .unwrap()
            .entry("id")
            .or_insert_with(|| "stored".into());
        let data = dir.path().join("input.ndjson");
        std::fs::write(&data, serde_json::to_vec(&resource).unwrap()).unwrap();
        let store = dir.path().join("input.db");
        let report = import::import(&EmbeddedStore::open(&store).unwrap(), &[data]).unwrap();
        assert!(report.failed.is_empty(), "{input}: {:?}", report.failed);
        let stored = stored_resources(&store).into_values().next().unwrap();
        let server = start(&store, |_| {}).await;
        for config in configs {
            put_config(&server.exports, config, &corpus(config));
            let manifest = export(
                &client,
                &format!(
                    "{}/$export?_container=deid&_anonymizationConfig={config}",
                    server.base
                ),
            )
            .await;
            let engine = engine_of(&corpus(config), &manifest);
            let expected =
                String::from_utf8(engine.deidentify(stored.as_bytes()).unwrap()).unwrap();
            let lines: Vec<String> = lines_by_type(&client, &manifest)
                .await
                .into_values()
                .flatten()
                .collect();
            assert_ne!(expected, stored, "{input} with {config}: nothing changed");
            assert_eq!(lines, [expected], "{input} with {config}");
            exported += 1;
        }
    }
    assert_eq!(exported, 28);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_level_and_post_export_de_identified() {
    let server = start(&sample_store(), |_| {}).await;
    put_config(&server.exports, "hipaa.json", &hipaa());
    let client = client();
    let group = stored_resources(&server.store)
        .into_keys()
        .find(|(resource_type, _)| resource_type == "Group")
        .map(|(_, id)| id);
    let mut urls = vec![format!("{}/Patient/$export", server.base)];
    if let Some(group) = group {
        urls.push(format!("{}/Group/{group}/$export", server.base));
    }
    for url in urls {
        let manifest = export(
            &client,
            &format!("{url}?_type=Patient&_container=deid&_anonymizationConfig=hipaa.json"),
        )
        .await;
        for line in &lines_by_type(&client, &manifest).await["Patient"] {
            assert!(!line.contains("\"family\""), "{url}: a name left: {line}");
            assert!(line.contains("REDACTED"), "{url}");
        }
    }
    let parameters = serde_json::json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"},
        {"name": "_container", "valueString": "deid"},
        {"name": "_anonymizationConfig", "valueString": "hipaa.json"},
    ]});
    let manifest = post_export(
        &client,
        &format!("{}/Patient/$export", server.base),
        parameters,
    )
    .await;
    assert!(lines_by_type(&client, &manifest).await["Patient"]
        .iter()
        .all(|l| !l.contains("\"family\"")));
}

async fn refused(
    client: &reqwest::Client,
    url: &str,
    prefer: &str,
    parameter: &str,
    mention: &str,
) {
    let response = kickoff_preferring(client, url, prefer).await;
    assert_eq!(response.status(), 400, "{url} ({prefer})");
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let text = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        text.contains(parameter) && text.contains(mention),
        "{url}: {text}"
    );
    assert_eq!(outcome["issue"][0]["expression"][0], parameter, "{url}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kickoff_checks_the_configuration_and_lenient_handling_never_ignores_it() {
    let server = start(&sample_store(), |s| s.deid.max_config_bytes = 200_000).await;
    let hipaa = hipaa();
    let mut with_bom = b"\xEF\xBB\xBF".to_vec();
    with_bom.extend_from_slice(hipaa.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&hipaa));
    put_config(&server.exports, "ok.json", &with_bom);
    put_config(&server.exports, "bad-path.json", INVALID_FHIRPATH);
    put_config(
        &server.exports,
        "duplicate.json",
        br#"{"fhirPathRules":[],"fhirPathRules":[]}"#,
    );
    put_config(&server.exports, "large.json", &vec![b' '; 200_001]);
    let etag = fhir_export::storage::local::etag_of(&with_bom).0;
    let client = client();
    let base = &server.base;
    for level in ["$export", "Patient/$export", "Group/g/$export"] {
        let url = |query: &str| format!("{base}/{level}?{query}");
        for prefer in ["respond-async", "respond-async, handling=lenient"] {
            for (query, parameter, mention) in [
                ("_container=deid&_anonymizationConfig=missing.json", "_anonymizationConfig", "no such configuration"),
                ("_container=deid&_anonymizationConfig=bad-path.json", "_anonymizationConfig", "invalid()"),
                ("_container=deid&_anonymizationConfig=duplicate.json", "_anonymizationConfig", "fhirPathRules"),
                ("_container=deid&_anonymizationConfig=large.json", "_anonymizationConfig", "200001 bytes"),
                ("_container=deid&_anonymizationConfig=ok.json&_anonymizationConfigEtag=0x1", "_anonymizationConfigEtag", "does not match"),
                ("_anonymizationConfig=ok.json", "_container", "container of their own"),
                ("_container=deid&_anonymizationConfig=../ok.json", "_anonymizationConfig", "'..'"),
                ("_container=deid&_anonymizationConfig=ok.json&_anonymizationConfigCollectionReference=r.azurecr.io/x:1", "_anonymizationConfigCollectionReference", "not supported"),
                ("_container=deid&_anonymizationConfigEtag=x", "_anonymizationConfig", "give the configuration"),
                ("_container=deid&_AnonymizationConfig=ok.json", "_AnonymizationConfig", "never ignored"),
                ("_container=deid&_anonymizationConfig=ok.json&organizeOutputBy=Patient", "organizeOutputBy", "header"),
                ("_container=anonymization&_anonymizationConfig=ok.json", "_container", "holds anonymization configurations"),
            ] {
                if level.starts_with("Group") && parameter != "_anonymizationConfigCollectionReference" && !query.contains("Etag=x") && !query.contains("_Anon") && !query.contains("..") {
                    // A Group kickoff checks its group before the configuration: g does not exist.
                    continue;
                }
                refused(&client, &url(query), prefer, parameter, mention).await;
            }
        }
    }
    // The ETag as the client got it, quoted or not, is accepted.
    let unquoted = etag.trim_matches('"');
    for given in [etag.clone(), unquoted.to_string()] {
        let manifest = export(&client, &format!("{base}/$export?_type=Patient&_container=deid&_anonymizationConfig=ok.json&_anonymizationConfigEtag={}", urlencode(&given))).await;
        assert_eq!(manifest["output"].as_array().unwrap().len(), 1);
    }
    // The configurations are never served as export files, whatever their names.
    put_config(
        &server.exports,
        "keys.ndjson",
        br#"{"encryptKey":"secret"}"#,
    );
    let response = client
        .get(format!("{base}/_exports/anonymization/keys.ndjson"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let off = start(&sample_store(), |s| s.deid.enabled = false).await;
    put_config(&off.exports, "ok.json", &hipaa);
    refused(
        &client,
        &format!(
            "{}/$export?_container=deid&_anonymizationConfig=ok.json",
            off.base
        ),
        "respond-async, handling=lenient",
        "_anonymizationConfig",
        "turned off",
    )
    .await;
    let relaxed = start(&sample_store(), |s| s.deid.require_container = false).await;
    put_config(&relaxed.exports, "ok.json", &hipaa);
    export(
        &client,
        &format!(
            "{}/$export?_type=Patient&_anonymizationConfig=ok.json",
            relaxed.base
        ),
    )
    .await;
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_edited_during_the_export_fails_it() {
    // Shards pause after a millisecond, so the export's runs go on after the edit below.
    let server = start(&sample_store(), |s| {
        s.shard_max_time = Some(Duration::from_millis(1));
    })
    .await;
    put_config(&server.exports, "c.json", &hipaa());
    let client = client();
    let status = started(
        &client,
        &format!(
            "{}/$export?_container=deid&_anonymizationConfig=c.json",
            server.base
        ),
    )
    .await;
    let mut edited = hipaa();
    edited.extend_from_slice(b"\n");
    put_config(&server.exports, "c.json", &edited);
    let response = wait_for_end(&client, &status, Duration::from_secs(120)).await;
    assert_eq!(response.status(), 400);
    let outcome: Value = response.json().await.unwrap();
    let text = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(text.contains("changed during the export"), "{text}");
    let folder = std::fs::read_dir(server.exports.join("deid"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(folder, 0, "a failed export's files are removed");
}

/// Resources of several types sharing ids: the date shift's prefix is the resource id, so each id
/// must shift by one offset in every shard of the export when the key is one per export.
fn same_ids_store(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("same-ids.ndjson");
    let mut lines = Vec::new();
    for n in 0..30 {
        lines.push(format!(
            r#"{{"resourceType":"Patient","id":"x{n}","birthDate":"1980-05-17"}}"#
        ));
        lines.push(format!(r#"{{"resourceType":"Encounter","id":"x{n}","status":"finished","class":{{"code":"AMB"}},"period":{{"start":"2020-03-01T10:00:00Z"}}}}"#));
        lines.push(format!(r#"{{"resourceType":"Condition","id":"x{n}","subject":{{"reference":"Patient/x{n}"}},"onsetDateTime":"2019-07-04T08:30:00+02:00","recordedDate":"2019-07-05"}}"#));
        lines.push(format!(r#"{{"resourceType":"Observation","id":"x{n}","status":"final","code":{{"text":"w"}},"effectiveDateTime":"2021-01-15","valueQuantity":{{"value":1.50,"unit":"kg"}}}}"#));
    }
    std::fs::write(&data, lines.join("\n")).unwrap();
    let path = dir.join("same-ids.db");
    let report = import::import(&EmbeddedStore::open(&path).unwrap(), &[data]).unwrap();
    assert!(report.failed.is_empty());
    path
}

fn days_between(from: &str, to: &str) -> i64 {
    let date = |text: &str| NaiveDate::parse_from_str(&text[..10], "%Y-%m-%d").unwrap();
    (date(to) - date(from)).num_days()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_date_offset_per_id_across_all_shards_and_numbers_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let store = same_ids_store(dir.path());
    let server = start(&store, |s| s.shard_max_resources = 7).await;
    let config = br#"{"fhirPathRules":[
        {"path":"nodesByType('date')","method":"dateShift"},
        {"path":"nodesByType('dateTime')","method":"dateShift"}
    ],"parameters":{"dateShiftKey":""}}"#;
    put_config(&server.exports, "shift.json", config);
    let client = client();
    let manifest = export(
        &client,
        &format!(
            "{}/$export?_container=deid&_anonymizationConfig=shift.json",
            server.base
        ),
    )
    .await;
    assert!(manifest["output"].as_array().unwrap().len() >= 4);
    let mut offsets: HashMap<String, Vec<i64>> = HashMap::new();
    for (resource_type, lines) in lines_by_type(&client, &manifest).await {
        for line in lines {
            let resource: Value = serde_json::from_str(&line).unwrap();
            let id = resource["id"].as_str().unwrap().to_string();
            let offset = match resource_type.as_str() {
                "Patient" => days_between("1980-05-17", resource["birthDate"].as_str().unwrap()),
                "Encounter" => {
                    days_between("2020-03-01", resource["period"]["start"].as_str().unwrap())
                }
                "Condition" => {
                    let onset = resource["onsetDateTime"].as_str().unwrap();
                    assert!(onset.ends_with("T00:00:00+02:00"), "{onset}");
                    let recorded =
                        days_between("2019-07-05", resource["recordedDate"].as_str().unwrap());
                    assert_eq!(days_between("2019-07-04", onset), recorded);
                    recorded
                }
                _ => {
                    assert!(
                        line.contains(r#""valueQuantity":{"value":1.50,"unit":"kg"}"#),
                        "{line}"
                    );
                    days_between(
                        "2021-01-15",
                        resource["effectiveDateTime"].as_str().unwrap(),
                    )
                }
            };
            assert!((-50..=50).contains(&offset), "{offset}");
            offsets.entry(id).or_default().push(offset);
        }
    }
    assert_eq!(offsets.len(), 30);
    for (id, list) in &offsets {
        assert_eq!(list.len(), 4, "{id}");
        assert!(
            list.iter().all(|o| *o == list[0]),
            "{id}: offsets {list:?} differ between files"
        );
    }
    let distinct: std::collections::BTreeSet<i64> = offsets.values().map(|l| l[0]).collect();
    assert!(distinct.len() > 5, "offsets depend on the id: {distinct:?}");
    // The key is the export's own, and goes with it.
    let job_id = manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .split('/')
        .rev()
        .nth(1)
        .unwrap()
        .rsplit('-')
        .next()
        .unwrap()
        .to_string();
    let job: Value =
        serde_json::from_slice(&std::fs::read(job_document(&server.exports, &job_id)).unwrap())
            .unwrap();
    assert!(job["deidentification"]["etag"].is_string());
    assert!(
        job["deidentification"].get("keys").is_none(),
        "keys removed at the end: {}",
        job["deidentification"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_errors_fail_the_export_without_values_or_are_skipped() {
    let server = start(&sample_store(), |_| {}).await;
    put_config(
        &server.exports,
        "raise.json",
        &processing_error_config("raise"),
    );
    put_config(
        &server.exports,
        "skip.json",
        &processing_error_config("skip"),
    );
    let client = client();
    let status = started(
        &client,
        &format!(
            "{}/$export?_type=Patient&_container=deid&_anonymizationConfig=raise.json",
            server.base
        ),
    )
    .await;
    let response = wait_for_end(&client, &status, Duration::from_secs(60)).await;
    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(text.contains("generalize"), "{text}");
    for ((resource_type, id), json) in stored_resources(&server.store) {
        if resource_type != "Patient" {
            continue;
        }
        let patient: Value = serde_json::from_str(&json).unwrap();
        let family = patient["name"][0]["family"].as_str().unwrap();
        assert!(
            !text.contains(family) && !text.contains(&id),
            "the failure names a value: {text}"
        );
    }
    let manifest = export(
        &client,
        &format!(
            "{}/$export?_type=Patient,Organization&_container=deid&_anonymizationConfig=skip.json",
            server.base
        ),
    )
    .await;
    let lines = lines_by_type(&client, &manifest).await;
    let stub = r#"{"resourceType":"Patient","meta":{"security":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"REDACTED","display":"redacted"}]}}"#;
    assert!(
        lines["Patient"].iter().all(|line| line == stub),
        "{}",
        lines["Patient"][0]
    );
    assert!(lines["Organization"]
        .iter()
        .all(|line| line != stub && line.contains("\"id\"")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_filters_select_on_stored_data_and_elements_trim_the_de_identified() {
    let dir = tempfile::tempdir().unwrap();
    let store = same_ids_store(dir.path());
    let server = start(&store, |_| {}).await;
    let config = br#"{"fhirPathRules":[{"path":"Observation.status","method":"redact"},{"path":"Observation.value","method":"redact"},{"path":"Observation.effective","method":"keep"}]}"#;
    put_config(&server.exports, "c.json", config);
    let client = client();
    let url = format!(
        "{}/$export?_type=Observation&_typeFilter=Observation%3Fstatus%3Dfinal&_elements=status,value,effective&_container=deid&_anonymizationConfig=c.json",
        server.base
    );
    let manifest = export(&client, &url).await;
    let lines = &lines_by_type(&client, &manifest).await["Observation"];
    assert_eq!(lines.len(), 30, "the filter selects on the stored value");
    for line in lines {
        let resource: Value = serde_json::from_str(line).unwrap();
        assert!(
            resource.get("valueQuantity").is_none() && resource.get("status").is_none(),
            "{line}"
        );
        assert!(
            resource.get("code").is_some(),
            "a mandatory element stays: {line}"
        );
        assert!(
            resource.get("id").is_some() && resource.as_object().unwrap().len() == 5,
            "{line}"
        );
        assert_eq!(resource["effectiveDateTime"], "2021-01-15");
        let codes: Vec<&str> = resource["meta"]["security"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["code"].as_str().unwrap())
            .collect();
        assert_eq!(codes, ["REDACTED"]);
        assert_eq!(resource["meta"]["tag"][0]["code"], "SUBSETTED", "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_azure_blob_the_configuration_is_a_blob_of_the_anonymization_container() {
    let url = common::azurite::sas_url();
    let storage: Arc<dyn ObjectStore> = Arc::new(AzureBlob::new(&url, None).unwrap());
    let container = common::azurite::unique_container("anon");
    let hipaa = hipaa();
    let etag = storage
        .put(
            &format!("{container}/team/hipaa.json"),
            hipaa.clone().into(),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    let server = start_with_storage(&sample_store(), storage.clone(), |s| {
        s.deid.container = container.clone()
    })
    .await;
    let client = client();
    let output = common::azurite::unique_container("deid-out");
    let manifest = export(
        &client,
        &format!(
            "{}/$export?_type=Patient&_container={output}&_anonymizationConfig=team/hipaa.json&_anonymizationConfigEtag={}",
            server.base,
            urlencode(&etag.0)
        ),
    )
    .await;
    let engine = engine_of(&hipaa, &manifest);
    let mut expected: Vec<String> = stored_resources(&server.store)
        .into_iter()
        .filter(|((t, _), _)| t == "Patient")
        .map(|(_, json)| String::from_utf8(engine.deidentify(json.as_bytes()).unwrap()).unwrap())
        .collect();
    let mut got = lines_by_type(&client, &manifest)
        .await
        .remove("Patient")
        .unwrap();
    expected.sort();
    got.sort();
    assert!(
        got == expected,
        "the export on Azure Blob differs from the engine"
    );
    refused(
        &client,
        &format!("{}/$export?_container={output}&_anonymizationConfig=team/hipaa.json&_anonymizationConfigEtag=%220x0%22", server.base),
        "respond-async, handling=lenient",
        "_anonymizationConfigEtag",
        "does not match",
    )
    .await;
}

/// A configuration of one rule with `path` and `method` (plus `extra` settings).
fn one_rule(path: &str, method: &str, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"fhirVersion":"R4","fhirPathRules":[{{"path":{},"method":"{method}"{extra}}}]}}"#,
        serde_json::to_string(path).unwrap()
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_configurations_are_refused_at_kickoff_and_the_server_lives_on() {
    let server = start(&sample_store(), |s| s.deid.max_config_bytes = 1 << 20).await;
    let client = client();
    let nested = |open: &str, close: &str, depth: usize| {
        format!("{}Patient.name{}", open.repeat(depth), close.repeat(depth))
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        // What aborted the process: nesting and chains past any stack.
        (
            "parentheses",
            one_rule(&nested("(", ")", 3_000), "redact", ""),
            "deeper than 100",
        ),
        (
            "or",
            one_rule(&nested("Patient.id or ", "", 50_000), "redact", ""),
            "more than the 10000",
        ),
        (
            "or-short",
            one_rule(&nested("a or ", "", 1_900), "redact", ""),
            "deeper than 100",
        ),
        (
            "members",
            one_rule(&nested("", ".a", 50_000), "redact", ""),
            "more than the 10000",
        ),
        (
            "members-short",
            one_rule(&nested("", ".a", 4_000), "redact", ""),
            "deeper than 100",
        ),
        (
            "first",
            one_rule(&nested("", ".first()", 1_200), "redact", ""),
            "deeper than 100",
        ),
        (
            "minus",
            one_rule(&nested("-", "", 20_000), "redact", ""),
            "more than the 10000",
        ),
        (
            "minus-short",
            one_rule(&nested("-", "", 5_000), "redact", ""),
            "deeper than 100",
        ),
        (
            "case",
            one_rule(
                "Patient.birthDate",
                "generalize",
                &format!(r#","cases":{{"{}":"$this"}}"#, nested("(", ")", 3_000)),
            ),
            "deeper than 100",
        ),
        // Read by the kickoff one way and by the engine another.
        (
            "blank",
            one_rule("Patient .name", "redact", ""),
            "not usable FHIRPath",
        ),
        // Failed at the first resource.
        (
            "regex",
            one_rule("Patient.name.where(family.matches('('))", "redact", ""),
            "does not compile",
        ),
        (
            "regex-size",
            one_rule(
                "Patient.name.where(family.matches('(a{1000}){1000}'))",
                "redact",
                "",
            ),
            "compiles to more than",
        ),
        (
            "span",
            one_rule("Patient.birthDate", "perturb", r#","span":1e308"#),
            "largest decimal",
        ),
    ];
    for (name, config, mention) in &cases {
        put_config(&server.exports, &format!("{name}.json"), config);
        for prefer in ["respond-async", "respond-async, handling=lenient"] {
            refused(
                &client,
                &format!(
                    "{}/$export?_container=deid&_anonymizationConfig={name}.json",
                    server.base
                ),
                prefer,
                "_anonymizationConfig",
                mention,
            )
            .await;
        }
    }
    // The refusals quote no configuration at length.
    let response = kickoff_preferring(
        &client,
        &format!(
            "{}/$export?_container=deid&_anonymizationConfig=members.json",
            server.base
        ),
        "respond-async",
    )
    .await;
    assert!(response.text().await.unwrap().len() < 2_000);
    // The server still exports.
    put_config(
        &server.exports,
        "fine.json",
        &one_rule("Patient.name", "redact", ""),
    );
    let manifest = export(
        &client,
        &format!(
            "{}/$export?_type=Patient&_container=deid&_anonymizationConfig=fine.json",
            server.base
        ),
    )
    .await;
    assert_eq!(manifest["output"][0]["count"], 100);
}

/// A de-identified export cancelled while it runs loses its per-export keys with it, as one that
/// completes or fails does: nothing left can re-link or decrypt what it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_de_identified_export_keeps_no_keys() {
    // Shards pause after a millisecond, so the export is still running when it is cancelled.
    let server = start(&sample_store(), |s| {
        s.shard_max_time = Some(Duration::from_millis(1));
    })
    .await;
    put_config(
        &server.exports,
        "k.json",
        &one_rule("Patient.name", "cryptoHash", ""),
    );
    let client = client();
    let status = started(
        &client,
        &format!(
            "{}/$export?_container=deid&_anonymizationConfig=k.json",
            server.base
        ),
    )
    .await;
    let id = status.rsplit('/').next().unwrap().to_string();
    let document = job_document(&server.exports, &id);
    let running: Value = serde_json::from_slice(&published_file(&document).await).unwrap();
    assert!(
        running["deidentification"]["keys"]["crypto_hash"].is_string(),
        "keys while it runs: {running}"
    );
    let cancelled = client.delete(&status).send().await.unwrap();
    assert_eq!(cancelled.status(), 202);
    // The local folder publishes a document within milliseconds of its write.
    let mut ended = Value::Null;
    for _ in 0..100 {
        ended = serde_json::from_slice(&std::fs::read(&document).unwrap()).unwrap();
        if ended["status"] == "cancelled" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert!(
        ended["deidentification"].get("keys").is_none(),
        "keys kept after the cancel: {ended}"
    );
}
