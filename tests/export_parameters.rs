//! Levels and parameters over real HTTP: Patient and Group exports, `patient`, `_typeFilter`,
//! `_elements`, the `transactionTime` snapshot, Expires, exactly-once across compartments.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use common::*;
use fhir_export::source::{import, EmbeddedStore};
use serde_json::Value;

type Keys = BTreeSet<(String, String)>;

fn keys_of(files: &[(String, String, Vec<String>)]) -> Keys {
    let mut keys = BTreeSet::new();
    for (_, url, lines) in files {
        for line in lines {
            let resource: Value = serde_json::from_str(line).unwrap();
            let key = (
                resource["resourceType"].as_str().unwrap().to_string(),
                resource["id"].as_str().unwrap().to_string(),
            );
            assert!(keys.insert(key.clone()), "{key:?} twice (again in {url})");
        }
    }
    keys
}

fn compartment_members(store: &Path) -> Keys {
    let conn = rusqlite::Connection::open(store).unwrap();
    let mut statement = conn
        .prepare("SELECT DISTINCT r.type, r.id FROM patient_link l JOIN resources r ON r.rowid = l.resource WHERE r.type != 'Group'")
        .unwrap();
    let rows = statement
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

async fn post_kickoff(client: &reqwest::Client, url: &str, body: &str) -> reqwest::Response {
    client
        .post(url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn patients_body(ids: &[&str]) -> String {
    let parameters: Vec<Value> = ids
        .iter()
        .map(|id| serde_json::json!({"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}}))
        .collect();
    serde_json::json!({"resourceType": "Parameters", "parameter": parameters}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patient_and_group_exports_of_the_sample_hold_every_compartment_resource_once() {
    let store = sample_store();
    let server = start(&store, |_| {}).await;
    let client = client();
    let expected = compartment_members(&store);
    assert!(
        expected.len() > sample_total() * 9 / 10,
        "{}",
        expected.len()
    );

    let patient_level = keys_of(
        &download_all(
            &client,
            &export(&client, &format!("{}/Patient/$export", server.base)).await,
        )
        .await,
    );
    assert_eq!(patient_level, expected);
    assert!(!patient_level
        .iter()
        .any(|(t, _)| t == "Organization" || t == "Group" || t == "Practitioner"));

    let groups: Vec<String> = stored_resources(&store)
        .into_keys()
        .filter_map(|(t, id)| (t == "Group").then_some(id))
        .collect();
    let group = &groups[0];
    let group_level = keys_of(
        &download_all(
            &client,
            &export(&client, &format!("{}/Group/{group}/$export", server.base)).await,
        )
        .await,
    );
    assert_eq!(group_level, expected);

    let response = kickoff(
        &client,
        &format!("{}/Group/no-such-group/$export", server.base),
    )
    .await;
    assert_eq!(response.status(), 404);
    let outcome: Value = response.json().await.unwrap();
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("Group/no-such-group"));
    let response = kickoff(
        &client,
        &format!("{}/Patient/$export?_type=Organization", server.base),
    )
    .await;
    assert_eq!(response.status(), 400);
}

/// Two patients, one Observation in both compartments, a Group of `a`, an empty Group.
fn small_store(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("small.ndjson");
    std::fs::write(
        &data,
        [
            r#"{"resourceType":"Patient","id":"a","gender":"female","name":[{"family":"Ames"}],"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            r#"{"resourceType":"Patient","id":"b","gender":"male","name":[{"family":"Boyd"}],"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            r#"{"resourceType":"Observation","id":"oa","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/a"},"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            r#"{"resourceType":"Observation","id":"ob","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"2339-0"}]},"subject":{"reference":"Patient/b"},"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            r#"{"resourceType":"Observation","id":"both","status":"amended","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},"subject":{"reference":"Patient/a"},"performer":[{"reference":"Patient/b"}],"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            r#"{"resourceType":"Organization","id":"org","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            r#"{"resourceType":"Group","id":"ga","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/a"}}],"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            r#"{"resourceType":"Group","id":"empty","type":"person","actual":true,"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let path = dir.join("small.db");
    let report = import::import(&EmbeddedStore::open(&path).unwrap(), &[data]).unwrap();
    assert!(report.failed.is_empty());
    path
}

fn keys(list: &[(&str, &str)]) -> Keys {
    list.iter()
        .map(|(t, i)| (t.to_string(), i.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_and_the_patient_parameter_limit_the_compartments() {
    let dir = tempfile::tempdir().unwrap();
    let store = small_store(dir.path());
    let server = start(&store, |_| {}).await;
    let client = client();
    let base = &server.base;
    let exported = |manifest: Value| {
        let client = client.clone();
        async move { keys_of(&download_all(&client, &manifest).await) }
    };

    let all = exported(export(&client, &format!("{base}/Patient/$export")).await).await;
    assert_eq!(
        all,
        keys(&[
            ("Observation", "both"),
            ("Observation", "oa"),
            ("Observation", "ob"),
            ("Patient", "a"),
            ("Patient", "b")
        ])
    );
    let group_a = exported(export(&client, &format!("{base}/Group/ga/$export")).await).await;
    assert_eq!(
        group_a,
        keys(&[
            ("Observation", "both"),
            ("Observation", "oa"),
            ("Patient", "a")
        ])
    );
    let empty = export(&client, &format!("{base}/Group/empty/$export")).await;
    assert_eq!(
        empty["output"],
        serde_json::json!([]),
        "an empty group exports nothing"
    );

    let response = post_kickoff(
        &client,
        &format!("{base}/Patient/$export"),
        &patients_body(&["b"]),
    )
    .await;
    assert_eq!(response.status(), 202);
    let only_b = exported(
        wait_for_manifest(
            &client,
            response.headers()["content-location"].to_str().unwrap(),
        )
        .await,
    )
    .await;
    assert_eq!(
        only_b,
        keys(&[
            ("Observation", "both"),
            ("Observation", "ob"),
            ("Patient", "b")
        ])
    );

    for (url, body, mention) in [
        (
            format!("{base}/Group/ga/$export"),
            patients_body(&["b"]),
            "not a member of Group/ga",
        ),
        (
            format!("{base}/Patient/$export"),
            patients_body(&["nobody"]),
            "Patient/nobody is not known",
        ),
        (
            format!("{base}/$export"),
            patients_body(&["a"]),
            "only allowed on Patient and Group",
        ),
    ] {
        let response = post_kickoff(&client, &url, &body).await;
        assert_eq!(response.status(), 400, "{url}");
        let outcome: Value = response.json().await.unwrap();
        let text = outcome["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(text.contains(mention), "{url}: {text}");
        assert_eq!(outcome["issue"][0]["expression"][0], "patient");
    }
    let response = kickoff(
        &client,
        &format!("{base}/Patient/$export?patient=Patient/a"),
    )
    .await;
    assert_eq!(response.status(), 400, "patient by GET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_filters_and_elements_shape_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let store = small_store(dir.path());
    let server = start(&store, |_| {}).await;
    let client = client();
    let base = &server.base;

    let filter = "Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C8867-4%26status%3Dfinal,Observation%3Fcode%3D2339-0";
    let manifest = export(
        &client,
        &format!("{base}/$export?_type=Observation,Patient&_typeFilter={filter}"),
    )
    .await;
    let filtered = keys_of(&download_all(&client, &manifest).await);
    assert_eq!(
        filtered,
        keys(&[
            ("Observation", "oa"),
            ("Observation", "ob"),
            ("Patient", "a"),
            ("Patient", "b")
        ])
    );

    let manifest = export(
        &client,
        &format!("{base}/$export?_typeFilter=Patient%3Fgender%3Dfemale&_type=Patient"),
    )
    .await;
    assert_eq!(
        keys_of(&download_all(&client, &manifest).await),
        keys(&[("Patient", "a")])
    );

    let manifest = export(
        &client,
        &format!("{base}/$export?_type=Patient,Observation&_elements=Patient.gender,id"),
    )
    .await;
    for (resource_type, _, lines) in download_all(&client, &manifest).await {
        for line in lines {
            let resource: Value = serde_json::from_str(&line).unwrap();
            let mut fields: Vec<&str> = resource
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            fields.sort();
            let expected: &[&str] = if resource_type == "Patient" {
                &["gender", "id", "meta", "resourceType"]
            } else {
                &["code", "id", "meta", "resourceType", "status"]
            };
            assert_eq!(fields, expected, "{line}");
            assert_eq!(resource["meta"]["tag"][0]["code"], "SUBSETTED");
        }
    }

    let response = kickoff(
        &client,
        &format!("{base}/$export?_typeFilter=Observation%3Fvalue-quantity%3D5"),
    )
    .await;
    assert_eq!(response.status(), 400);
    let outcome: Value = response.json().await.unwrap();
    assert!(outcome["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("value-quantity"));
}

/// Imports `lines` into the store at `store` (a later change to it), from a file in `dir`.
fn import_later(dir: &Path, store: &Path, lines: &[&str]) -> import::ImportReport {
    let later = dir.join("later.ndjson");
    std::fs::write(&later, lines.join("\n") + "\n").unwrap();
    import::import(&EmbeddedStore::open(store).unwrap(), &[later]).unwrap()
}

/// The small store, its exports folder, and a service on them without workers: kickoffs are
/// recorded and wait, so that the store can change before they run.
async fn api_only_on_small_store(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, Server) {
    let store = small_store(dir);
    let exports = dir.join("exports");
    let server = start_with_exports(&store, &exports, tempfile::tempdir().unwrap(), |s| {
        s.workers = 0
    })
    .await;
    (store, exports, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_is_a_snapshot_at_transaction_time() {
    let dir = tempfile::tempdir().unwrap();
    let (store, exports, api_only) = api_only_on_small_store(dir.path()).await;
    let client = client();
    // At each level: a replaced version is read from history, in its resource's compartments.
    let mut status_urls = Vec::new();
    for level in ["", "/Patient", "/Group/ga"] {
        let url = format!("{}{level}/$export?_type=Patient", api_only.base);
        let response = kickoff(&client, &url).await;
        let status_url = response.headers()["content-location"].to_str().unwrap();
        status_urls.push(status_url.to_string());
    }
    let old_base = api_only.base.clone();
    drop(api_only);

    // After kickoff: patient a changes, patient c appears. The organisation changes first, so
    // that a's replaced version has a row number in history other than a's in resources.
    let later = dir.path().join("later.ndjson");
    std::fs::write(
        &later,
        "{\"resourceType\":\"Organization\",\"id\":\"org\",\"name\":\"Renamed\"}\n\
         {\"resourceType\":\"Patient\",\"id\":\"a\",\"gender\":\"unknown\"}\n\
         {\"resourceType\":\"Patient\",\"id\":\"c\"}\n",
    )
    .unwrap();
    let report = import::import(&EmbeddedStore::open(&store).unwrap(), &[later]).unwrap();
    assert_eq!((report.created, report.updated), (1, 2));

    let server = start_with_exports(&store, &exports, tempfile::tempdir().unwrap(), |_| {}).await;
    for (status_url, expected_ids) in status_urls.iter().zip([2, 2, 1]) {
        let status_url = status_url.replace(&old_base, &server.base);
        let response = client.get(&status_url).send().await.unwrap();
        let mut manifest = response.status();
        while manifest == 202 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            manifest = client.get(&status_url).send().await.unwrap().status();
        }
        let response = client.get(&status_url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let expires = response.headers()["expires"].to_str().unwrap().to_string();
        assert!(expires.ends_with(" GMT"), "{expires}");
        let manifest: Value = serde_json::from_str(
            &response
                .text()
                .await
                .unwrap()
                .replace(&old_base, &server.base),
        )
        .unwrap();
        let files = download_all(&client, &manifest).await;
        let lines: Vec<&String> = files.iter().flat_map(|(_, _, lines)| lines).collect();
        assert_eq!(lines.len(), expected_ids, "{status_url}: {lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(r#""id":"a""#) && l.contains(r#""gender":"female""#)),
            "a as it was at kickoff: {lines:?}"
        );
        assert!(
            !lines.iter().any(|l| l.contains(r#""id":"c""#)),
            "c was created after kickoff"
        );
    }

    let now = kickoff(&client, &format!("{}/$export?_type=Patient", server.base)).await;
    let manifest =
        wait_for_manifest(&client, now.headers()["content-location"].to_str().unwrap()).await;
    let files = download_all(&client, &manifest).await;
    let lines: Vec<&String> = files.iter().flat_map(|(_, _, lines)| lines).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .any(|l| l.contains(r#""id":"a""#) && l.contains(r#""gender":"unknown""#)));
}

/// What an export holds is what was stored at its kickoff, each version in the compartments its own
/// content names: an Observation moved from a to b by a later import stays in a's export as it
/// was, and a Patient stored later stays out whatever older `lastUpdated` it claims (it is in the
/// next `_since` export).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_moved_or_backdated_after_kickoff_stays_where_it_was_at_kickoff() {
    let dir = tempfile::tempdir().unwrap();
    let (store, exports, api_only) = api_only_on_small_store(dir.path()).await;
    let client = client();
    let observations_of = |patient: &str| {
        serde_json::json!({"resourceType": "Parameters", "parameter": [
            {"name": "_type", "valueString": "Observation"},
            {"name": "patient", "valueReference": {"reference": format!("Patient/{patient}")}}
        ]})
        .to_string()
    };
    let mut status_urls = Vec::new();
    for patient in ["a", "b"] {
        let url = format!("{}/Patient/$export", api_only.base);
        let response = post_kickoff(&client, &url, &observations_of(patient)).await;
        assert_eq!(response.status(), 202);
        status_urls.push(
            response.headers()["content-location"]
                .to_str()
                .unwrap()
                .to_string(),
        );
    }
    let url = format!("{}/$export?_type=Patient", api_only.base);
    let response = kickoff(&client, &url).await;
    status_urls.push(
        response.headers()["content-location"]
            .to_str()
            .unwrap()
            .to_string(),
    );
    let old_base = api_only.base.clone();
    drop(api_only);

    let report = import_later(
        dir.path(),
        &store,
        &[
            r#"{"resourceType":"Observation","id":"oa","status":"final","subject":{"reference":"Patient/b"}}"#,
            r#"{"resourceType":"Patient","id":"d","meta":{"lastUpdated":"2019-01-01T00:00:00Z"}}"#,
        ],
    );
    assert_eq!((report.created, report.updated), (1, 1));

    let server = start_with_exports(&store, &exports, tempfile::tempdir().unwrap(), |_| {}).await;
    let mut at_kickoff = Vec::new();
    let mut transaction_time = String::new();
    for status_url in &status_urls {
        let status_url = status_url.replace(&old_base, &server.base);
        let manifest = wait_for_manifest(&client, &status_url).await;
        let manifest: Value =
            serde_json::from_str(&manifest.to_string().replace(&old_base, &server.base)).unwrap();
        transaction_time = manifest["transactionTime"].as_str().unwrap().to_string();
        let files = download_all(&client, &manifest).await;
        let oa_names_a = files
            .iter()
            .flat_map(|(_, _, lines)| lines)
            .filter(|l| l.contains(r#""id":"oa""#))
            .all(|l| l.contains("Patient/a"));
        assert!(oa_names_a, "{status_url}: oa as it was at kickoff");
        at_kickoff.push(keys_of(&files));
    }
    assert_eq!(
        at_kickoff,
        [
            keys(&[("Observation", "both"), ("Observation", "oa")]),
            keys(&[("Observation", "both"), ("Observation", "ob")]),
            keys(&[("Patient", "a"), ("Patient", "b")]),
        ]
    );

    let mut now = Vec::new();
    for patient in ["a", "b"] {
        let url = format!("{}/Patient/$export", server.base);
        let response = post_kickoff(&client, &url, &observations_of(patient)).await;
        let status_url = response.headers()["content-location"].to_str().unwrap();
        let manifest = wait_for_manifest(&client, status_url).await;
        now.push(keys_of(&download_all(&client, &manifest).await));
    }
    let since = format!(
        "{}/$export?_type=Patient&_since={}",
        server.base,
        transaction_time.replace('+', "%2B")
    );
    let manifest = export(&client, &since).await;
    now.push(keys_of(&download_all(&client, &manifest).await));
    assert_eq!(
        now,
        [
            keys(&[("Observation", "both")]),
            keys(&[
                ("Observation", "both"),
                ("Observation", "oa"),
                ("Observation", "ob")
            ]),
            keys(&[("Patient", "d")]),
        ],
        "the next exports, and d in the next _since export though it claims an older lastUpdated"
    );
}

/// Organized by patient, an export holds each resource as it was at kickoff, in the block of the
/// patient its version then named: `oa`, moved from a to b after kickoff, stays in a's block as
/// it was; `both`, in a's and b's compartments at kickoff, once, in a's; `d` and `od`, stored
/// later, not at all (nor Group `ga`: a Group is not exported at Patient level).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organized_export_holds_each_version_as_at_kickoff_in_its_patients_block() {
    let dir = tempfile::tempdir().unwrap();
    let (store, exports, api_only) = api_only_on_small_store(dir.path()).await;
    let client = client();
    let url = format!("{}/$export?organizeOutputBy=Patient", api_only.base);
    let status_url = started(&client, &url).await;
    let old_base = api_only.base.clone();
    drop(api_only);

    let report = import_later(
        dir.path(),
        &store,
        &[
            r#"{"resourceType":"Observation","id":"oa","status":"final","subject":{"reference":"Patient/b"}}"#,
            r#"{"resourceType":"Observation","id":"both","status":"final","subject":{"reference":"Patient/b"}}"#,
            r#"{"resourceType":"Patient","id":"d"}"#,
            r#"{"resourceType":"Observation","id":"od","status":"final","subject":{"reference":"Patient/a"}}"#,
        ],
    );
    assert_eq!((report.created, report.updated), (2, 2));

    let server = start_with_exports(&store, &exports, tempfile::tempdir().unwrap(), |_| {}).await;
    let manifest = wait_for_manifest(&client, &status_url.replace(&old_base, &server.base)).await;
    let manifest: Value =
        serde_json::from_str(&manifest.to_string().replace(&old_base, &server.base)).unwrap();
    let mut blocks: Vec<(String, Vec<String>)> = Vec::new();
    for output in manifest["output"].as_array().unwrap() {
        let url = output["url"].as_str().unwrap();
        let body = client.get(url).send().await.unwrap().text().await.unwrap();
        for line in body.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            if resource["resourceType"] == "Parameters" {
                let patient = resource["parameter"][0]["valueReference"]["reference"].as_str();
                blocks.push((patient.unwrap().to_string(), Vec::new()));
                continue;
            }
            let key = format!(
                "{}/{}",
                resource["resourceType"].as_str().unwrap(),
                resource["id"].as_str().unwrap()
            );
            if key == "Observation/oa" {
                assert!(
                    line.contains("Patient/a") && line.contains("8867-4"),
                    "oa as at kickoff: {line}"
                );
            }
            blocks.last_mut().expect("a header first").1.push(key);
        }
    }
    blocks.sort();
    assert_eq!(
        blocks,
        [
            (
                "Patient/a".to_string(),
                vec!["Patient/a", "Observation/oa", "Observation/both"]
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>()
            ),
            (
                "Patient/b".to_string(),
                vec!["Patient/b".to_string(), "Observation/ob".to_string()]
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_smart_configuration_describe_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&small_store(dir.path()), |_| {}).await;
    let client = client();
    let statement: Value = client
        .get(format!("{}/metadata", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let operations: HashSet<&str> = statement["rest"][0]["operation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(operations, HashSet::from(["export", "export-v4"]));
    // "a Data Provider supporting two versions of Group-level export could advertise: name
    // export, definition ...group-export|3.0.0; name export-v4, definition ...group-export|4.0.0"
    let ig = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition";
    let advertised = |operations: &Value| -> Vec<(String, String)> {
        operations
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["name"].as_str().unwrap().to_string(),
                    o["definition"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let both = |definition: &str| {
        vec![
            ("export".to_string(), format!("{ig}/{definition}|3.0.0")),
            ("export-v4".to_string(), format!("{ig}/{definition}|4.0.0")),
        ]
    };
    assert_eq!(
        advertised(&statement["rest"][0]["operation"]),
        both("export")
    );
    for (resource_type, definition) in [("Patient", "patient-export"), ("Group", "group-export")] {
        let resource = statement["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == resource_type)
            .unwrap();
        assert_eq!(
            advertised(&resource["operation"]),
            both(definition),
            "{resource_type}"
        );
    }
    assert!(statement["rest"][0].get("security").is_none());
    let observation = statement["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap();
    assert!(observation["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "code"));
    let smart = client
        .get(format!("{}/.well-known/smart-configuration", server.base))
        .send()
        .await
        .unwrap();
    // Without access control SMART has nothing to discover (and requires token_endpoint).
    assert_eq!(smart.status(), 404);
    let outcome: Value = smart.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ndjson_spelling_and_the_till_alias_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&small_store(dir.path()), |_| {}).await;
    let client = client();
    for format in ["application/fhir%2Bndjson", "application/ndjson", "ndjson"] {
        let manifest = export(
            &client,
            &format!(
                "{}/$export?_type=Patient&_outputFormat={format}&_till=2021-01-01T00:00:00Z",
                server.base
            ),
        )
        .await;
        assert_eq!(
            keys_of(&download_all(&client, &manifest).await),
            keys(&[("Patient", "a"), ("Patient", "b")]),
            "{format}"
        );
    }
    let response = kickoff(
        &client,
        &format!(
            "{}/$export?_till=2021-01-01T00:00:00Z&_until=2021-01-01T00:00:00Z",
            server.base
        ),
    )
    .await;
    assert_eq!(response.status(), 400);
}

/// Outside clients' findings: privacy parameters are never ignored, `_type` at Patient level keeps
/// the compartment's types and notes the rest, an empty 202 has no Content-Type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_parameters_mixed_types_and_empty_accepted_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&small_store(dir.path()), |_| {}).await;
    let client = client();
    let base = &server.base;
    let lenient = |url: String| {
        client
            .get(url)
            .header("Accept", "application/fhir+json")
            .header("Prefer", "respond-async, handling=lenient")
    };
    for parameter in [
        "_anonymizationConfig",
        "_anonymizationConfigEtag",
        "_anonymizationConfigCollectionReference",
    ] {
        for level in ["$export", "Patient/$export", "Group/ga/$export"] {
            let response = lenient(format!(
                "{base}/{level}?_type=Patient&{parameter}=hipaa.json"
            ))
            .send()
            .await
            .unwrap();
            assert_eq!(response.status(), 400, "{level} {parameter}");
            let outcome: Value = response.json().await.unwrap();
            assert!(outcome.to_string().contains(parameter), "{outcome}");
        }
    }

    let mixed = kickoff(
        &client,
        &format!("{base}/Patient/$export?_type=Patient,Organization"),
    )
    .await;
    assert_eq!(mixed.status(), 202);
    assert!(mixed.headers().get("content-type").is_none());
    let status_url = mixed.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let running = client.get(&status_url).send().await.unwrap();
    if running.status() == 202 {
        assert!(running.headers().get("content-type").is_none());
    }
    let manifest = wait_for_manifest(&client, &status_url).await;
    assert_eq!(
        keys_of(&download_all(&client, &manifest).await),
        keys(&[("Patient", "a"), ("Patient", "b")])
    );
    let note = notes_text(&client, &manifest).await;
    assert!(
        note.contains("Organization is not in the Patient compartment"),
        "{note}"
    );

    let none_in_scope = lenient(format!("{base}/Patient/$export?_type=Organization"))
        .send()
        .await
        .unwrap();
    assert_eq!(none_in_scope.status(), 202);
    let manifest = wait_for_manifest(
        &client,
        none_in_scope.headers()["content-location"]
            .to_str()
            .unwrap(),
    )
    .await;
    assert_eq!(manifest["output"], serde_json::json!([]));
    assert_eq!(manifest["error"].as_array().unwrap().len(), 1);
}

/// FHIR decimals are exact: what the input wrote (trailing zeros, exponents, long digits) comes
/// out of import, export and `_elements` as written, from NDJSON rewritten on import and Bundles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_stay_as_written_through_import_export_and_elements() {
    let dir = tempfile::tempdir().unwrap();
    let numbers = r#""valueQuantity":{"value":1.50,"unit":"mg"},"referenceRange":[{"low":{"value":1e2},"high":{"value":12345678901234567890.10}}]"#;
    let ndjson = dir.path().join("numbers.ndjson");
    // No meta.lastUpdated: the importer rewrites the resource to add one.
    std::fs::write(
        &ndjson,
        format!(r#"{{"resourceType":"Observation","id":"n1","status":"final","code":{{"text":"x"}},{numbers}}}"#),
    )
    .unwrap();
    let bundle = dir.path().join("bundle.json");
    std::fs::write(
        &bundle,
        format!(
            r#"{{"resourceType":"Bundle","type":"transaction","entry":[
            {{"fullUrl":"urn:uuid:7d1ba4a2-0000-4000-8000-000000000001","resource":{{"resourceType":"Patient","id":"p9","birthDate":"1970-01-01"}},"request":{{"method":"POST","url":"Patient"}}}},
            {{"fullUrl":"urn:uuid:7d1ba4a2-0000-4000-8000-000000000002","resource":{{"resourceType":"Observation","id":"n2","status":"final","code":{{"text":"x"}},"subject":{{"reference":"urn:uuid:7d1ba4a2-0000-4000-8000-000000000001"}},{numbers}}},"request":{{"method":"POST","url":"Observation"}}}}]}}"#
        ),
    )
    .unwrap();
    let path = dir.path().join("numbers.db");
    let report = import::import(&EmbeddedStore::open(&path).unwrap(), &[ndjson, bundle]).unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let server = start(&path, |_| {}).await;
    let client = client();
    for query in [
        "_type=Observation",
        "_type=Observation&_elements=value,referenceRange",
    ] {
        let manifest = export(&client, &format!("{}/$export?{query}", server.base)).await;
        let files = download_all(&client, &manifest).await;
        let lines: Vec<&String> = files.iter().flat_map(|(_, _, lines)| lines).collect();
        assert_eq!(lines.len(), 2, "{query}");
        for line in lines {
            for literal in [
                r#""value":1.50,"#,
                r#""value":1e2}"#,
                r#""value":12345678901234567890.10}"#,
            ] {
                assert!(line.contains(literal), "{query}: {literal} not in {line}");
            }
        }
    }
}

/// A stored value that once panicked the date search (`birthDate "12€45"`) is just a value that
/// matches nothing; the same text from a client is a 400 naming the parameter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multibyte_text_in_dates_is_an_answer_never_a_wedge() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("odd.ndjson");
    std::fs::write(
        &data,
        [
            r#"{"resourceType":"Patient","id":"odd","birthDate":"12€45","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
            r#"{"resourceType":"Patient","id":"ok","birthDate":"2001-02-03","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let path = dir.path().join("odd.db");
    import::import(&EmbeddedStore::open(&path).unwrap(), &[data]).unwrap();
    let server = start(&path, |s| s.workers = 1).await;
    let client = client();
    for _ in 0..3 {
        let manifest = export(
            &client,
            &format!(
                "{}/$export?_typeFilter=Patient%3Fbirthdate%3Dge2000",
                server.base
            ),
        )
        .await;
        assert_eq!(
            keys_of(&download_all(&client, &manifest).await),
            keys(&[("Patient", "ok")])
        );
    }
    for (query, parameter) in [
        ("Patient?birthdate=12€45", "birthdate"),
        ("Patient?_lastUpdated=ge12€45", "_lastUpdated"),
        ("Patient?birthdate=€", "birthdate"),
    ] {
        let response = client
            .get(format!("{}/{query}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let outcome: Value = response.json().await.unwrap();
        assert!(outcome.to_string().contains(parameter), "{outcome}");
    }
    let kickoff = kickoff(
        &client,
        &format!(
            "{}/$export?_typeFilter=Patient%3Fbirthdate%3D12%E2%82%AC45",
            server.base
        ),
    )
    .await;
    assert_eq!(kickoff.status(), 400);
    let outcome: Value = kickoff.json().await.unwrap();
    assert!(outcome.to_string().contains("_typeFilter"), "{outcome}");
}
