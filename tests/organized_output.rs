//! Bulk Data 3.0.0 `organizeOutputBy=Patient` over real HTTP: files of resource blocks (a
//! `Parameters` header, the patient, its compartment), checked against the input Bundles; blocks
//! kept whole or continued with `continuesInFile`; exactly once across compartments, shards and
//! time-boxed runs; bad values.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;

use common::*;
use fhir_export::source::{import, EmbeddedStore};
use serde_json::Value;

type Key = (String, String);

/// The sample's types in the R4 Patient compartment (Organization, Practitioner and Group are not,
/// nor Device: R4's definition gives it no parameter).
const COMPARTMENT_TYPES: &[&str] = &[
    "AllergyIntolerance",
    "CarePlan",
    "CareTeam",
    "Claim",
    "Condition",
    "DiagnosticReport",
    "Encounter",
    "ExplanationOfBenefit",
    "ImagingStudy",
    "Immunization",
    "MedicationRequest",
    "Observation",
    "Patient",
    "Procedure",
];

/// From the sample's Bundles (one patient's record each): every patient's block, the resources of
/// its Bundle in the Patient compartment.
fn expected_blocks() -> BTreeMap<String, BTreeSet<Key>> {
    let mut blocks = BTreeMap::new();
    for entry in std::fs::read_dir(sample_dir()).unwrap() {
        let file = entry.unwrap().path();
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(file).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let bundle: Value = serde_json::from_str(&text).unwrap();
        let Some(entries) = bundle["entry"].as_array() else {
            continue;
        };
        let resources: Vec<&Value> = entries.iter().map(|e| &e["resource"]).collect();
        let Some(patient) = resources.iter().find(|r| r["resourceType"] == "Patient") else {
            continue;
        };
        let patient_id = patient["id"].as_str().unwrap().to_string();
        // Synthea's records name their patient by its entry's URN; the stand-in's by reference.
        let names = [
            format!("urn:uuid:{patient_id}"),
            format!("Patient/{patient_id}"),
        ];
        let mut block = BTreeSet::new();
        for resource in resources {
            let resource_type = resource["resourceType"].as_str().unwrap();
            if !COMPARTMENT_TYPES.contains(&resource_type) {
                continue;
            }
            if resource_type != "Patient" {
                let text = resource.to_string();
                assert!(
                    names.iter().any(|name| text.contains(name)),
                    "names its patient"
                );
            }
            block.insert((
                resource_type.to_string(),
                resource["id"].as_str().unwrap().to_string(),
            ));
        }
        blocks.insert(patient_id, block);
    }
    blocks
}

/// One block as read from the files: its patient, its lines' keys in order, and their text.
struct Block {
    patient: String,
    keys: Vec<Key>,
    lines: Vec<String>,
}

/// Downloads an organized export's files in manifest order and reads them as blocks: a block cut
/// by a file's end goes on after the same header at the start of the next file, which the
/// manifest names in `continuesInFile`.
async fn read_blocks(client: &reqwest::Client, manifest: &Value) -> Vec<Block> {
    assert_eq!(manifest["outputOrganizedBy"], "Patient");
    let outputs = manifest["output"].as_array().unwrap();
    let mut blocks: Vec<Block> = Vec::new();
    let mut continued_from: Option<String> = None;
    for (at, output) in outputs.iter().enumerate() {
        assert!(output.get("type").is_none(), "no type: {output}");
        let url = output["url"].as_str().unwrap();
        let body = client.get(url).send().await.unwrap().text().await.unwrap();
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len() as u64, output["count"].as_u64().unwrap());
        for (number, line) in lines.iter().enumerate() {
            let resource: Value = serde_json::from_str(line).unwrap();
            if resource["resourceType"] == "Parameters" {
                let reference = resource["parameter"][0]["valueReference"]["reference"]
                    .as_str()
                    .unwrap();
                assert_eq!(resource["parameter"][0]["name"], "header");
                let patient = reference.strip_prefix("Patient/").unwrap().to_string();
                if number == 0 && continued_from.as_deref() == Some(patient.as_str()) {
                    continue; // the same block, going on in this file
                }
                blocks.push(Block {
                    patient,
                    keys: Vec::new(),
                    lines: Vec::new(),
                });
                continue;
            }
            assert!(number > 0, "{url} starts with a header");
            let block = blocks.last_mut().unwrap();
            block.keys.push((
                resource["resourceType"].as_str().unwrap().to_string(),
                resource["id"].as_str().unwrap().to_string(),
            ));
            block.lines.push(line.to_string());
        }
        continued_from = match output.get("continuesInFile") {
            Some(next) => {
                assert_eq!(next, &outputs[at + 1]["url"], "continues in the next file");
                Some(blocks.last().unwrap().patient.clone())
            }
            None => None,
        };
    }
    blocks
}

/// Blocks in patient order, each patient's first (when exported), then its compartment type by
/// type; every line byte for byte as stored. Returns the blocks' resources by patient.
fn check_blocks(blocks: &[Block], store: &Path) -> BTreeMap<String, BTreeSet<Key>> {
    let stored = stored_resources(store);
    let mut by_patient = BTreeMap::new();
    for pair in blocks.windows(2) {
        assert!(pair[0].patient < pair[1].patient, "blocks in patient order");
    }
    for block in blocks {
        assert!(
            !block.keys.is_empty(),
            "an empty block for {}",
            block.patient
        );
        let mut types: Vec<&str> = block.keys.iter().map(|(t, _)| t.as_str()).collect();
        if types[0] == "Patient" {
            assert_eq!(
                block.keys[0].1, block.patient,
                "the block's own patient first"
            );
            types.remove(0);
        }
        assert!(types.windows(2).all(|t| t[0] <= t[1]), "types in order");
        for (key, line) in block.keys.iter().zip(&block.lines) {
            assert_eq!(&stored[key], line, "{key:?} as stored");
        }
        let keys: BTreeSet<Key> = block.keys.iter().cloned().collect();
        assert_eq!(keys.len(), block.keys.len(), "a resource twice in a block");
        by_patient.insert(block.patient.clone(), keys);
    }
    by_patient
}

/// The same blocks, or a short account of the first differences.
fn assert_same_blocks(
    found: &BTreeMap<String, BTreeSet<Key>>,
    expected: &BTreeMap<String, BTreeSet<Key>>,
) {
    let mut differences = Vec::new();
    for patient in found.keys().chain(expected.keys()).collect::<BTreeSet<_>>() {
        let (found, expected) = (found.get(patient), expected.get(patient));
        let empty = BTreeSet::new();
        let (found, expected) = (found.unwrap_or(&empty), expected.unwrap_or(&empty));
        let missing: Vec<_> = expected.difference(found).take(3).collect();
        let extra: Vec<_> = found.difference(expected).take(3).collect();
        if !missing.is_empty() || !extra.is_empty() {
            differences.push(format!(
                "{patient}: {} found, {} expected; missing {missing:?}; extra {extra:?}",
                found.len(),
                expected.len()
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "{} blocks differ: {:#?}",
        differences.len(),
        &differences[..differences.len().min(5)]
    );
}

fn organized_url(base: &str) -> String {
    format!("{base}/$export?organizeOutputBy=Patient")
}

/// The sample organized by patient: each patient's block holds exactly its Bundle's compartment
/// resources, as stored; resources outside every compartment are left out with a note; with
/// files smaller than a block, blocks continue across files with `continuesInFile`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_organized_by_patient_holds_each_bundle_in_its_patients_block() {
    let store = sample_store();
    let expected = expected_blocks();
    assert_eq!(expected.len(), 100);
    let client = client();
    let server = start(&store, |_| {}).await;
    let manifest = export(&client, &organized_url(&server.base)).await;
    let blocks = read_blocks(&client, &manifest).await;
    assert_same_blocks(&check_blocks(&blocks, &store), &expected);
    // One file per shard (the sample is one shard of 38,473 resources; the stand-in sample of a
    // fresh clone may be two, of 50,000 or more each).
    let outputs = manifest["output"].as_array().unwrap();
    assert!(outputs.len() <= 2, "{} files", outputs.len());
    for output in outputs {
        let url = output["url"].as_str().unwrap();
        assert!(url.ends_with("-1.ndjson"), "one file per shard: {url}");
    }
    let notes = notes_text(&client, &manifest).await;
    assert!(notes.contains("in no patient's compartment"), "{notes}");

    // Files of 256 KiB: blocks that fit are never cut; larger ones go on in the next file.
    let small = start(&store, |s| s.file_max_bytes = 262_144).await;
    let manifest = export(&client, &organized_url(&small.base)).await;
    let outputs = manifest["output"].as_array().unwrap();
    let continued = outputs
        .iter()
        .filter(|o| o.get("continuesInFile").is_some())
        .count();
    assert!(
        continued > 0 && outputs.len() > 100,
        "{} files, {continued} continued",
        outputs.len()
    );
    let blocks = read_blocks(&client, &manifest).await;
    assert_same_blocks(&check_blocks(&blocks, &store), &expected);
    for (output, next) in outputs.iter().zip(outputs.iter().skip(1)) {
        if output.get("continuesInFile").is_none() {
            continue;
        }
        // A cut block filled its file: it did not fit in the room another block left.
        assert!(output["count"].as_u64().unwrap() > 1, "{output}");
        assert!(next.is_object());
    }
}

/// Three patients; `shared` is in the compartments of `a` and `b`, `team` of `b` and `c`.
fn shared_store(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("shared.ndjson");
    let at = r#""meta":{"lastUpdated":"2020-01-01T00:00:00Z"}"#;
    let later = r#""meta":{"lastUpdated":"2023-01-01T00:00:00Z"}"#;
    std::fs::write(
        &data,
        [
            format!(r#"{{"resourceType":"Patient","id":"a","gender":"female",{at}}}"#),
            format!(r#"{{"resourceType":"Patient","id":"b","gender":"male",{at}}}"#),
            format!(r#"{{"resourceType":"Patient","id":"c","gender":"male",{at}}}"#),
            format!(r#"{{"resourceType":"Observation","id":"oa","status":"final","valueQuantity":{{"value":1.50}},"subject":{{"reference":"Patient/a"}},{at}}}"#),
            format!(r#"{{"resourceType":"Observation","id":"ob","status":"final","subject":{{"reference":"Patient/b"}},{later}}}"#),
            format!(r#"{{"resourceType":"Observation","id":"shared","status":"final","subject":{{"reference":"Patient/b"}},"performer":[{{"reference":"Patient/a"}}],{at}}}"#),
            format!(r#"{{"resourceType":"CareTeam","id":"team","subject":{{"reference":"Patient/c"}},"participant":[{{"member":{{"reference":"Patient/b"}}}}],{at}}}"#),
            format!(r#"{{"resourceType":"Condition","id":"cc","subject":{{"reference":"Patient/c"}},{at}}}"#),
            format!(r#"{{"resourceType":"Organization","id":"org",{at}}}"#),
            format!(r#"{{"resourceType":"Group","id":"bc","type":"person","actual":true,"member":[{{"entity":{{"reference":"Patient/b"}}}},{{"entity":{{"reference":"Patient/c"}}}}],{at}}}"#),
        ]
        .join("\n"),
    )
    .unwrap();
    let path = dir.join("shared.db");
    let report = import::import(&EmbeddedStore::open(&path).unwrap(), &[data]).unwrap();
    assert!(report.failed.is_empty());
    path
}

fn keys(list: &[(&str, &str)]) -> BTreeSet<Key> {
    list.iter()
        .map(|(t, i)| (t.to_string(), i.to_string()))
        .collect()
}

/// A resource in several exported patients' compartments is written once, in the block of the
/// first of them by id; at Group level only the members count. The other parameters apply as
/// usual: `_type`, `_since`, `_typeFilter`, `_elements`, and POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_of_several_compartments_goes_to_the_first_patients_block_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = shared_store(dir.path());
    let client = client();
    let server = start(&store, |_| {}).await;
    let blocks_of = |manifest: Value| {
        let (client, store) = (client.clone(), store.clone());
        async move { check_blocks(&read_blocks(&client, &manifest).await, &store) }
    };

    let all = blocks_of(export(&client, &organized_url(&server.base)).await).await;
    let expected = BTreeMap::from([
        (
            "a".to_string(),
            keys(&[
                ("Patient", "a"),
                ("Observation", "oa"),
                ("Observation", "shared"),
            ]),
        ),
        (
            "b".to_string(),
            keys(&[
                ("Patient", "b"),
                ("CareTeam", "team"),
                ("Observation", "ob"),
            ]),
        ),
        (
            "c".to_string(),
            keys(&[("Patient", "c"), ("Condition", "cc")]),
        ),
    ]);
    assert_eq!(all, expected);

    // Group bc: `a` is not exported, so `shared` is b's; `team` stays b's.
    let group = blocks_of(
        export(
            &client,
            &format!("{}/Group/bc/$export?organizeOutputBy=Patient", server.base),
        )
        .await,
    )
    .await;
    assert_eq!(
        group,
        BTreeMap::from([
            (
                "b".to_string(),
                keys(&[
                    ("Patient", "b"),
                    ("CareTeam", "team"),
                    ("Observation", "ob"),
                    ("Observation", "shared")
                ])
            ),
            (
                "c".to_string(),
                keys(&[("Patient", "c"), ("Condition", "cc")])
            ),
        ])
    );

    // _since: only ob is newer; its block names b without b's Patient line.
    let since = blocks_of(
        export(
            &client,
            &format!(
                "{}&_since=2022-01-01T00:00:00Z",
                organized_url(&server.base)
            ),
        )
        .await,
    )
    .await;
    assert_eq!(
        since,
        BTreeMap::from([("b".to_string(), keys(&[("Observation", "ob")]))])
    );

    // POST at Patient level, with _type, _typeFilter and _elements.
    let response = client
        .post(format!("{}/Patient/$export", server.base))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .header("Content-Type", "application/fhir+json")
        .body(
            serde_json::json!({"resourceType": "Parameters", "parameter": [
                {"name": "organizeOutputBy", "valueString": "Patient"},
                {"name": "_type", "valueString": "Patient,Observation"},
                {"name": "_typeFilter", "valueString": "Patient?gender=male"},
                {"name": "_elements", "valueString": "Observation.status"},
            ]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let status = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let manifest = wait_for_manifest(&client, &status).await;
    let blocks = read_blocks(&client, &manifest).await;
    let found: BTreeMap<String, Vec<Key>> = blocks
        .iter()
        .map(|b| (b.patient.clone(), b.keys.clone()))
        .collect();
    assert_eq!(
        found,
        BTreeMap::from([
            (
                "a".to_string(),
                vec![
                    ("Observation".into(), "oa".into()),
                    ("Observation".into(), "shared".into())
                ]
            ),
            (
                "b".to_string(),
                vec![
                    ("Patient".into(), "b".into()),
                    ("Observation".into(), "ob".into())
                ]
            ),
            ("c".to_string(), vec![("Patient".into(), "c".into())]),
        ])
    );
    let trimmed: Value = serde_json::from_str(&blocks[0].lines[0]).unwrap();
    assert!(trimmed.get("valueQuantity").is_none() && trimmed["status"] == "final");
}

/// Shards of a few patients each: still every compartment resource once, in its patient's block.
/// (Two phases from a FHIR server: `scale_out::organized_shards_from_a_source_of_types_write_their_blocks_from_partitions`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_organized_exports_write_each_resource_once() {
    let store = sample_store();
    let expected = expected_blocks();
    let client = client();
    let sharded = start(&store, |s| s.shard_max_resources = 2_000).await;
    let manifest = export(&client, &organized_url(&sharded.base)).await;
    let files: BTreeSet<&str> = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["url"].as_str().unwrap().rsplit('/').next().unwrap())
        .collect();
    assert!(files.len() >= 10, "{files:?}");
    assert!(
        files.iter().all(|f| f.starts_with("patients-")),
        "{files:?}"
    );
    let blocks = read_blocks(&client, &manifest).await;
    let mut by_patient: HashMap<String, BTreeSet<Key>> = HashMap::new();
    for block in &blocks {
        let keys = by_patient.entry(block.patient.clone()).or_default();
        for key in &block.keys {
            assert!(keys.insert(key.clone()), "{key:?} twice");
        }
    }
    let found: BTreeMap<String, BTreeSet<Key>> = by_patient.into_iter().collect();
    assert_same_blocks(&found, &expected);
}

/// `organizeOutputBy` takes `Patient`; another type or a wrong name is a 400 naming it, ignored
/// with a note under `handling=lenient`; given twice, a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_organize_values_are_refused_or_noted_under_lenient_handling() {
    let dir = tempfile::tempdir().unwrap();
    let store = shared_store(dir.path());
    let client = client();
    let server = start(&store, |_| {}).await;
    for query in [
        "organizeOutputBy=Observation",
        "organizeOutputBy=Nope",
        "organizeOutputBy=Patient&organizeOutputBy=Patient",
        "allowPartialManifests=maybe",
    ] {
        let response = kickoff(&client, &format!("{}/$export?{query}", server.base)).await;
        assert_eq!(response.status(), 400, "{query}");
        let outcome: Value = response.json().await.unwrap();
        let name = query.split('=').next().unwrap();
        assert!(outcome.to_string().contains(name), "{query}: {outcome}");
    }
    let response = kickoff_preferring(
        &client,
        &format!(
            "{}/$export?organizeOutputBy=Group&_type=Patient",
            server.base
        ),
        "respond-async, handling=lenient",
    )
    .await;
    assert_eq!(response.status(), 202);
    let status = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let manifest = wait_for_manifest(&client, &status).await;
    assert!(manifest.get("outputOrganizedBy").is_none());
    assert_eq!(manifest["output"][0]["type"], "Patient");
    let notes = notes_text(&client, &manifest).await;
    assert!(
        notes.contains("organizeOutputBy") && notes.contains("Group"),
        "{notes}"
    );
}
