//! Time-boxed shards: a run stops at its time box, commits its files and queues a continuation
//! that reads on from the source's cursor, numbering files on; every resource is exported once.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use fhir_export::source::{
    import, Cursor, EmbeddedStore, PatientScope, ResourceSource, ScanRequest,
};
use serde_json::Value;

/// Exports at `url` with a time box of `box_ms` and checks the files: each stored resource once,
/// byte for byte, and each shard's files numbered 1..n without a gap. Returns the files per stem.
async fn export_time_boxed(
    store: &Path,
    level: &str,
    box_ms: u64,
) -> (BTreeMap<String, Vec<u64>>, usize) {
    let server = start(store, |settings| {
        settings.shard_max_time = Some(Duration::from_millis(box_ms));
    })
    .await;
    let client = client();
    let manifest = export(&client, &format!("{}{level}/$export", server.base)).await;
    let stored = stored_resources(store);
    let mut seen = HashSet::new();
    let mut numbers: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (file_type, url, lines) in download_all(&client, &manifest).await {
        let name = url.rsplit('/').next().unwrap().trim_end_matches(".ndjson");
        let (stem, number) = name.rsplit_once('-').unwrap();
        numbers
            .entry(stem.to_string())
            .or_default()
            .push(number.parse().unwrap());
        for line in lines {
            let resource: Value = serde_json::from_str(&line).unwrap();
            let key = (
                resource["resourceType"].as_str().unwrap().to_string(),
                resource["id"].as_str().unwrap().to_string(),
            );
            assert_eq!(key.0, file_type);
            assert_eq!(
                stored.get(&key),
                Some(&line),
                "{key:?} differs from the store"
            );
            assert!(seen.insert(key.clone()), "{key:?} exported twice");
        }
    }
    for (stem, numbers) in &mut numbers {
        numbers.sort();
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        assert_eq!(numbers, &expected, "the files of {stem}");
    }
    (numbers, seen.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_paused_at_their_time_box_export_every_resource_once() {
    // The sample is stored patient by patient: its types interleave, and are read in id order.
    let store = sample_store();
    // Boxes of 5 ms: the stand-in sample of a fresh clone is read in a few dozen milliseconds.
    let (files, exported) = export_time_boxed(&store, "", 5).await;
    assert_eq!(exported, sample_total());
    let most = files.values().map(Vec::len).max().unwrap();
    assert!(most > 2, "no shard paused more than once: {files:?}");

    // Stored type by type, each type is read in storage order (by rowid).
    let dir = tempfile::tempdir().unwrap();
    let by_type = dir.path().join("by-type");
    std::fs::create_dir_all(&by_type).unwrap();
    let mut lines: HashMap<String, String> = HashMap::new();
    for ((resource_type, _), json) in stored_resources(&store) {
        let file = lines.entry(resource_type).or_default();
        file.push_str(&json);
        file.push('\n');
    }
    for (resource_type, body) in &lines {
        std::fs::write(by_type.join(format!("{resource_type}.ndjson")), body).unwrap();
    }
    let dense = dir.path().join("dense.db");
    let report = import::import(&EmbeddedStore::open(&dense).unwrap(), &[by_type]).unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // A faster machine reads more in a box: the box narrows until some shard pauses twice (each
    // export is checked whole, every resource once, whatever its box).
    let mut boxes = [15, 5, 2, 1].into_iter();
    let files = loop {
        let box_ms = boxes.next().expect("a box that pauses a shard twice");
        let (files, exported) = export_time_boxed(&dense, "/Patient", box_ms).await;
        assert!(exported > 30_000, "{exported}");
        if files.values().map(Vec::len).max().unwrap() > 2 || box_ms == 1 {
            break files;
        }
    };
    let most = files.values().map(Vec::len).max().unwrap();
    assert!(most > 2, "no shard paused more than once: {files:?}");
}

/// Scans the whole type, pausing after each `step` and resuming from the cursor, calling
/// `between` at each pause; returns `id:gender` of each resource read, and the cursors.
fn scan_in_steps(
    store: &EmbeddedStore,
    resource_type: &str,
    snapshot: chrono::DateTime<Utc>,
    mut between: impl FnMut(usize),
) -> (Vec<String>, Vec<Cursor>) {
    let scope = PatientScope::All;
    let mut ids = Vec::new();
    let mut cursors: Vec<Cursor> = Vec::new();
    loop {
        let request = ScanRequest {
            resource_type,
            since: None,
            stored_since: None,
            until: snapshot,
            snapshot,
            scope: &scope,
            after_id: None,
            type_filters: &[],
            rows: Default::default(),
            resume: cursors.last(),
            // Already past: each run reads one resource, then pauses.
            pause_after: Some(Instant::now()),
        };
        let scanned = store
            .scan(&request, &mut |resource| {
                let value: Value = serde_json::from_slice(resource).unwrap();
                ids.push(format!(
                    "{}:{}",
                    value["id"].as_str().unwrap(),
                    value["gender"].as_str().unwrap_or("")
                ));
                Ok(())
            })
            .unwrap();
        match scanned.paused {
            Some(cursor) => {
                assert_eq!(scanned.count, 1);
                cursors.push(cursor);
                between(cursors.len());
            }
            None => return (ids, cursors),
        }
    }
}

#[test]
fn a_scan_resumed_after_the_store_changed_reads_each_resource_once_as_at_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path().join("store.db")).unwrap();
    let load = |name: &str, body: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let report = import::import(&store, &[path]).unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
    };
    let patient = |id: &str, gender: &str| {
        format!("{{\"resourceType\":\"Patient\",\"id\":\"{id}\",\"gender\":\"{gender}\"}}\n")
    };
    // Stored together (one file of one type): read in storage order.
    load(
        "first.ndjson",
        ["p1", "p2", "p3", "p4"]
            .map(|id| patient(id, "male"))
            .concat(),
    );
    std::thread::sleep(Duration::from_millis(5));
    let snapshot = Utc::now();
    std::thread::sleep(Duration::from_millis(5));

    // While the scan is paused: p1 (read already) and p3 (not yet) change, p5 appears.
    let mut changed = false;
    let (ids, cursors) = scan_in_steps(&store, "Patient", snapshot, |pauses| {
        if pauses == 2 && !changed {
            changed = true;
            load(
                "later.ndjson",
                [
                    patient("p1", "female"),
                    patient("p3", "female"),
                    patient("p5", "male"),
                ]
                .concat(),
            );
        }
    });
    assert!(changed);
    assert!(matches!(cursors[0], Cursor::Rowid { .. }), "{cursors:?}");
    let expected = ["p1:male", "p2:male", "p3:male", "p4:male"];
    assert_eq!(ids, expected, "each as of the snapshot, once");
}
