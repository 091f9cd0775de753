//! Deletions and history over real HTTP: `handler import` of DELETE entries, `410 Gone`, the
//! `_history` of serve, and the manifest's `deleted` of `_since` exports at each level, from the
//! embedded store and from another instance's serve as a FHIR server.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::*;
use fhir_export::source::{import, EmbeddedStore, ResourceSource};
use serde_json::Value;

type Keys = BTreeSet<(String, String)>;

/// An output line with the (type, id) of its resource.
type KeyedLine = ((String, String), String);

const FIRST: &[&str] = &[
    r#"{"resourceType":"Patient","id":"a","gender":"female","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    r#"{"resourceType":"Patient","id":"b","gender":"male","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    r#"{"resourceType":"Patient","id":"c","gender":"other","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    r#"{"resourceType":"Observation","id":"oa","status":"final","subject":{"reference":"Patient/a"},"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    r#"{"resourceType":"Observation","id":"ob","status":"final","subject":{"reference":"Patient/b"},"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    r#"{"resourceType":"Observation","id":"oc","status":"final","subject":{"reference":"Patient/c"},"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    r#"{"resourceType":"Observation","id":"both","status":"final","subject":{"reference":"Patient/a"},"performer":[{"reference":"Patient/b"}],"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    r#"{"resourceType":"Organization","id":"org","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
    r#"{"resourceType":"Group","id":"ga","type":"person","actual":true,"member":[{"entity":{"reference":"Patient/a"}}],"meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#,
];

fn store_with_first_load(dir: &Path) -> PathBuf {
    let data = dir.join("first.ndjson");
    std::fs::write(&data, FIRST.join("\n")).unwrap();
    let path = dir.join("store.db");
    let report = import::import(&EmbeddedStore::open(&path).unwrap(), &[data]).unwrap();
    assert_eq!(report.created, FIRST.len() as u64);
    path
}

fn transaction(entries: Vec<Value>) -> String {
    serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        .to_string()
}

fn delete(url: &str) -> Value {
    serde_json::json!({"request": {"method": "DELETE", "url": url}})
}

fn put(resource: Value) -> Value {
    let url = format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap(),
        resource["id"].as_str().unwrap()
    );
    serde_json::json!({"resource": resource, "request": {"method": "PUT", "url": url}})
}

fn import_file(store: &Path, name: &str, body: &str) -> import::ImportReport {
    let file = store.parent().unwrap().join(name);
    std::fs::write(&file, body).unwrap();
    import::import(&EmbeddedStore::open(store).unwrap(), &[file]).unwrap()
}

/// The changes after the first export: deletions (one of a resource that is not there, one
/// conditional and refused), an update, and `both` deleted in one import and stored again in the
/// next.
fn change(store: &Path) {
    let report = import_file(
        store,
        "deletions.json",
        &transaction(vec![
            delete("Observation/oa"),
            delete("Observation/ob"),
            delete("Observation/oc"),
            delete("Patient/c"),
            delete("Organization/org"),
            delete("Observation/both"),
            delete("Observation/never-stored"),
            delete("Observation?status=final"),
            put(
                serde_json::json!({"resourceType": "Patient", "id": "b", "gender": "unknown",
                "meta": {"lastUpdated": "2020-06-01T00:00:00Z"}}),
            ),
        ]),
    );
    assert_eq!(
        (report.deleted, report.deleted_absent, report.updated),
        (6, 1, 1),
        "{report}"
    );
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.refused.len(), 1);
    assert!(
        report.refused[0].message.contains("conditional delete"),
        "{}",
        report.refused[0].message
    );
    let report = import_file(
        store,
        "again.json",
        &transaction(vec![put(serde_json::json!({
            "resourceType": "Observation", "id": "both", "status": "amended",
            "subject": {"reference": "Patient/a"}, "performer": [{"reference": "Patient/b"}]}))]),
    );
    assert_eq!((report.created, report.updated), (0, 1), "{report}");
}

fn keys(list: &[(&str, &str)]) -> Keys {
    list.iter()
        .map(|(t, i)| (t.to_string(), i.to_string()))
        .collect()
}

/// The (type, id) each output line holds, and each line by key.
fn output_of(files: &[(String, String, Vec<String>)]) -> (Keys, Vec<KeyedLine>) {
    let mut keys = Keys::new();
    let mut lines = Vec::new();
    for (_, url, file) in files {
        for line in file {
            let resource: Value = serde_json::from_str(line).unwrap();
            let key = (
                resource["resourceType"].as_str().unwrap().to_string(),
                resource["id"].as_str().unwrap().to_string(),
            );
            assert!(keys.insert(key.clone()), "{key:?} twice (again in {url})");
            lines.push((key, line.clone()));
        }
    }
    (keys, lines)
}

/// The resources the `deleted` files of a manifest delete, each checked to be a transaction
/// Bundle of DELETE entries and counted as the manifest says.
async fn deleted_of(client: &reqwest::Client, manifest: &Value) -> Keys {
    let mut deleted = Keys::new();
    for file in manifest["deleted"].as_array().unwrap() {
        assert_eq!(file["type"], "Bundle");
        let url = file["url"].as_str().unwrap();
        let body = client.get(url).send().await.unwrap().text().await.unwrap();
        let lines: Vec<&str> = body.lines().collect();
        assert_eq!(lines.len() as u64, file["count"].as_u64().unwrap(), "{url}");
        for line in lines {
            let bundle: Value = serde_json::from_str(line).unwrap();
            assert_eq!(
                (&bundle["resourceType"], &bundle["type"]),
                (&"Bundle".into(), &"transaction".into())
            );
            for entry in bundle["entry"].as_array().unwrap() {
                assert_eq!(entry["request"]["method"], "DELETE");
                let (t, id) = entry["request"]["url"]
                    .as_str()
                    .unwrap()
                    .split_once('/')
                    .unwrap();
                assert!(
                    deleted.insert((t.to_string(), id.to_string())),
                    "{t}/{id} twice"
                );
            }
        }
    }
    deleted
}

fn since_url(base: &str, path: &str, manifest: &Value, more: &str) -> String {
    let since = manifest["transactionTime"]
        .as_str()
        .unwrap()
        .replace('+', "%2B");
    format!("{base}/{path}?_since={since}{more}")
}

/// Export A is kicked off before the changes and runs after them: a snapshot, it holds every
/// resource as it was. Then `_since` A's `transactionTime`, at each level: `deleted` holds
/// exactly the deletions in the export's scope, `output` exactly the changed resources byte for
/// byte as stored, and none is in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_exports_list_exactly_the_deletions_in_their_scope() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_first_load(dir.path());
    let exports = dir.path().join("exports");
    let client = client();
    let api_only = start_with_exports(&store, &exports, tempfile::tempdir().unwrap(), |s| {
        s.workers = 0
    })
    .await;
    let status_url = started(&client, &format!("{}/$export", api_only.base)).await;
    let old_base = api_only.base.clone();
    drop(api_only);

    change(&store);

    let server = start_with_exports(&store, &exports, tempfile::tempdir().unwrap(), |_| {}).await;
    let base = &server.base;
    let first = wait_for_manifest(&client, &status_url.replace(&old_base, base)).await;
    let first: Value = serde_json::from_str(&first.to_string().replace(&old_base, base)).unwrap();
    let (held, _) = output_of(&download_all(&client, &first).await);
    let all: Keys = FIRST
        .iter()
        .map(|line| {
            let r: Value = serde_json::from_str(line).unwrap();
            (
                r["resourceType"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        held, all,
        "a snapshot exports what was deleted after its transactionTime"
    );
    assert_eq!(first["deleted"], serde_json::json!([]));

    let stored = stored_resources(&store);
    let cases = [
        (
            "$export",
            "",
            keys(&[
                ("Observation", "oa"),
                ("Observation", "ob"),
                ("Observation", "oc"),
                ("Patient", "c"),
                ("Organization", "org"),
            ]),
            keys(&[("Patient", "b"), ("Observation", "both")]),
        ),
        (
            "Patient/$export",
            "",
            keys(&[
                ("Observation", "oa"),
                ("Observation", "ob"),
                ("Observation", "oc"),
                ("Patient", "c"),
            ]),
            keys(&[("Patient", "b"), ("Observation", "both")]),
        ),
        (
            "Group/ga/$export",
            "",
            keys(&[("Observation", "oa")]),
            keys(&[("Observation", "both")]),
        ),
        (
            "$export",
            "&_type=Patient",
            keys(&[("Patient", "c")]),
            keys(&[("Patient", "b")]),
        ),
    ];
    for (path, more, expected_deleted, expected_output) in cases {
        let url = since_url(base, path, &first, more);
        let manifest = export(&client, &url).await;
        let deleted = deleted_of(&client, &manifest).await;
        let (output, lines) = output_of(&download_all(&client, &manifest).await);
        assert_eq!(deleted, expected_deleted, "deleted of {url}");
        assert_eq!(output, expected_output, "output of {url}");
        assert!(deleted.is_disjoint(&output), "{url}: in both");
        for (key, line) in lines {
            assert_eq!(&line, &stored[&key], "{key:?} as stored");
        }
    }

    // Organized by patient: deletions are in their own files, never in a patient's block.
    let url = since_url(base, "Patient/$export", &first, "&organizeOutputBy=Patient");
    let organized = export(&client, &url).await;
    assert_eq!(
        deleted_of(&client, &organized).await,
        keys(&[
            ("Observation", "oa"),
            ("Observation", "ob"),
            ("Observation", "oc"),
            ("Patient", "c")
        ]),
        "{url}"
    );
    for file in organized["output"].as_array().unwrap() {
        let url = file["url"].as_str().unwrap();
        let body = client.get(url).send().await.unwrap().text().await.unwrap();
        for line in body.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            assert_ne!(
                resource["id"], "oa",
                "a deleted resource in a block of {url}"
            );
        }
    }

    // The same from serve, read as a FHIR server: 410 for a deleted resource, no deleted one in
    // a search, its history.
    let gone = client
        .get(format!("{base}/Observation/oa"))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 410);
    let searched = get_json(&client, &format!("{base}/Observation")).await;
    let ids: Vec<&str> = searched["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["both"]);
    let counted = get_json(&client, &format!("{base}/Observation?_summary=count")).await;
    assert_eq!(counted["total"], 1);
}

/// `[type]/{id}/_history` lists every version newest first, deletions as DELETE entries without a
/// resource; `[type]/_history` pages by `_count` without losing or repeating a version, and
/// `_since` keeps the versions after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_every_version_newest_first_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_first_load(dir.path());
    let before_changes = chrono::Utc::now();
    change(&store);
    let server = start(&store, |_| {}).await;
    let client = client();
    let base = &server.base;

    let both = get_json(&client, &format!("{base}/Observation/both/_history")).await;
    assert_eq!(both["type"], "history");
    let entries = both["entry"].as_array().unwrap();
    let methods: Vec<&str> = entries
        .iter()
        .map(|e| e["request"]["method"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["PUT", "DELETE", "PUT"]);
    let versions: Vec<&str> = entries
        .iter()
        .map(|e| e["response"]["etag"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["W/\"3\"", "W/\"2\"", "W/\"1\""]);
    assert_eq!(entries[0]["resource"]["status"], "amended");
    assert!(entries[1].get("resource").is_none());
    assert_eq!(entries[2]["resource"]["status"], "final");

    let mut url = Some(format!("{base}/Observation/_history?_count=2"));
    let mut paged = Vec::new();
    while let Some(next) = url.take() {
        let page = get_json(&client, &next).await;
        for entry in page["entry"].as_array().into_iter().flatten() {
            paged.push((
                entry["fullUrl"].as_str().unwrap().to_string(),
                entry["response"]["etag"].as_str().unwrap().to_string(),
            ));
        }
        url = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
    }
    // 4 observations stored, 4 deleted, one stored again.
    assert_eq!(paged.len(), 9, "{paged:?}");
    assert_eq!(
        paged.iter().collect::<BTreeSet<_>>().len(),
        9,
        "a version twice: {paged:?}"
    );

    let since = before_changes
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .replace('+', "%2B");
    let recent = get_json(
        &client,
        &format!("{base}/Observation/_history?_since={since}"),
    )
    .await;
    let deletions = recent["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["request"]["method"] == "DELETE")
        .count();
    assert_eq!(
        recent["entry"].as_array().unwrap().len(),
        5,
        "4 deletions and both stored again"
    );
    assert_eq!(deletions, 4);

    let refused = client
        .get(format!("{base}/Observation/_history?_cursor=nonsense"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("_cursor"));
    let refused = client
        .get(format!("{base}/Observation/_history?code=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
}

/// One instance exports from another's serve: the deletions come from its `_history`, at system
/// and at Group level (where the version a deletion deleted decides, read from the resource's own
/// history when the type's does not hold it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_come_from_a_fhir_servers_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_first_load(dir.path());
    let fhir = start(&store, |_| {}).await;
    let client = client();
    let first = export(&client, &format!("{}/$export", fhir.base)).await;
    change(&store);

    let empty = dir.path().join("unused.db");
    let exporter = start_reading(&empty, &fhir.base, |_| {}).await;
    for (path, expected) in [
        (
            "$export",
            keys(&[
                ("Observation", "oa"),
                ("Observation", "ob"),
                ("Observation", "oc"),
                ("Patient", "c"),
                ("Organization", "org"),
            ]),
        ),
        ("Group/ga/$export", keys(&[("Observation", "oa")])),
    ] {
        let url = since_url(&exporter.base, path, &first, "");
        let manifest = export(&client, &url).await;
        assert_eq!(deleted_of(&client, &manifest).await, expected, "{url}");
        assert_eq!(manifest["error"], serde_json::json!([]), "{url}");
    }
    let versions = format!("{}/$export?includeAssociatedData=_history", exporter.base);
    let refused = kickoff(&client, &versions).await;
    assert_eq!(refused.status(), 400);
    assert!(refused
        .text()
        .await
        .unwrap()
        .contains("includeAssociatedData"));
}

/// The store keeps what a deletion needs: a read finds nothing, `is_deleted` says why, and a
/// store of the earlier layout (no deletion columns) opens with them added.
#[test]
fn a_deleted_resource_reads_as_gone_and_older_stores_gain_the_columns() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = store_with_first_load(dir.path());
    change(&store_path);
    let store = EmbeddedStore::open(&store_path).unwrap();
    assert_eq!(store.read("Observation", "oa").unwrap(), None);
    assert!(store.is_deleted("Observation", "oa").unwrap());
    assert!(!store.is_deleted("Observation", "both").unwrap());
    assert!(!store.is_deleted("Observation", "never-stored").unwrap());

    let old = dir.path().join("old.db");
    let conn = rusqlite::Connection::open(&old).unwrap();
    conn.execute_batch(
        "CREATE TABLE resources (type TEXT NOT NULL, id TEXT NOT NULL, last_updated INTEGER NOT NULL,
             content_hash INTEGER NOT NULL, import_run INTEGER NOT NULL, json BLOB NOT NULL, PRIMARY KEY (type, id));
         CREATE TABLE replaced (type TEXT NOT NULL, id TEXT NOT NULL, last_updated INTEGER NOT NULL,
             stored_run INTEGER NOT NULL, superseded_run INTEGER NOT NULL, patients TEXT NOT NULL,
             json BLOB NOT NULL, PRIMARY KEY (type, id, superseded_run));
         INSERT INTO resources VALUES ('Patient', 'p', 0, 1, 1, CAST('{\"resourceType\":\"Patient\",\"id\":\"p\"}' AS BLOB));",
    )
    .unwrap();
    drop(conn);
    let opened = EmbeddedStore::open(&old).unwrap();
    assert!(opened.read("Patient", "p").unwrap().is_some());
    assert!(!opened.is_deleted("Patient", "p").unwrap());
}

/// Many deletions, listed by time-boxed shards (paused and continued from their cursor) into small
/// files, served in partial manifest pages of two files: each deletion once, each file listed
/// once, the files of each shard numbered without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_boxed_deletions_in_partial_manifests_are_listed_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("many.ndjson");
    let lines: Vec<String> = (0..600)
        .map(|n| {
            let t = if n % 2 == 0 { "Observation" } else { "Condition" };
            format!(r#"{{"resourceType":"{t}","id":"r{n:04}","subject":{{"reference":"Patient/p"}},"meta":{{"lastUpdated":"2020-01-01T00:00:00Z"}}}}"#)
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let store = dir.path().join("store.db");
    import::import(&EmbeddedStore::open(&store).unwrap(), &[data]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let since = chrono::Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let mut expected = Keys::new();
    let mut entries = Vec::new();
    for n in (0..600).filter(|n| n % 5 != 0) {
        let t = if n % 2 == 0 {
            "Observation"
        } else {
            "Condition"
        };
        entries.push(delete(&format!("{t}/r{n:04}")));
        expected.insert((t.to_string(), format!("r{n:04}")));
    }
    let report = import_file(&store, "deletions.json", &transaction(entries));
    assert_eq!(report.deleted, 480);

    let server = start(&store, |s| {
        s.shard_max_time = Some(std::time::Duration::from_millis(1));
        s.file_max_bytes = 2048;
        s.manifest_page_size = 2;
    })
    .await;
    let client = client();
    let since = since
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .replace('+', "%2B");
    let url = format!(
        "{}/$export?_since={since}&allowPartialManifests=true",
        server.base
    );
    let status = started(&client, &url).await;
    let mut page = loop {
        let answer = client.get(&status).send().await.unwrap();
        if answer.status() == 200 {
            break answer.json::<Value>().await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut urls = Vec::new();
    let mut deleted = Keys::new();
    loop {
        assert!(page["output"].as_array().unwrap().is_empty(), "{page}");
        for key in deleted_of(&client, &page).await {
            assert!(deleted.insert(key.clone()), "{key:?} on two pages");
        }
        urls.extend(
            page["deleted"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["url"].as_str().unwrap().to_string()),
        );
        match page["link"][0]["url"].as_str() {
            Some(next) => page = get_json(&client, next).await,
            None => break,
        }
    }
    assert_eq!(deleted, expected);
    let mut numbers: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for url in &urls {
        let name = url.rsplit('/').next().unwrap().trim_end_matches(".ndjson");
        let (stem, number) = name.rsplit_once('-').unwrap();
        numbers
            .entry(stem.to_string())
            .or_default()
            .push(number.parse().unwrap());
    }
    assert_eq!(numbers.len(), 2, "{numbers:?}");
    for (stem, mut numbers) in numbers {
        numbers.sort();
        assert_eq!(
            numbers,
            (1..=numbers.len() as u64).collect::<Vec<_>>(),
            "{stem}"
        );
        assert!(numbers.len() > 2, "{stem}: rolled");
    }
}

/// In a de-identified `_since` export a deletion names the resource by the id the configuration's
/// rules give it (the one its earlier de-identified exports held), never by the stored one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn de_identified_deletions_name_resources_by_their_de_identified_ids() {
    use fhir_export::deid::{AnonymizationConfig, Engine};
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_first_load(dir.path());
    let server = start(&store, |_| {}).await;
    let config = include_bytes!("deid/safe-harbor.json");
    let folder = server.exports.join("anonymization");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("ok.json"), config).unwrap();
    let client = client();
    let deid = "&_container=deid&_anonymizationConfig=ok.json";
    let first = export(
        &client,
        &format!("{}/$export?_type=Observation{deid}", server.base),
    )
    .await;
    let before: BTreeSet<String> = download_all(&client, &first)
        .await
        .into_iter()
        .flat_map(|(_, _, lines)| lines)
        .map(|line| {
            serde_json::from_str::<Value>(&line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    change(&store);

    let url = since_url(
        &server.base,
        "$export",
        &first,
        &format!("&_type=Observation{deid}"),
    );
    let manifest = export(&client, &url).await;
    let deleted = deleted_of(&client, &manifest).await;
    let config = AnonymizationConfig::parse(config).unwrap();
    let today = manifest["transactionTime"].as_str().unwrap()[..10]
        .parse()
        .unwrap();
    let engine = Engine::new(&config, fhir_export::deid::Keys::for_export(&config), today).unwrap();
    let expected: Keys = ["oa", "ob", "oc"]
        .iter()
        .map(|id| {
            let stub = format!(r#"{{"resourceType":"Observation","id":"{id}"}}"#);
            let out: Value =
                serde_json::from_slice(&engine.deidentify(stub.as_bytes()).unwrap()).unwrap();
            (
                "Observation".to_string(),
                out["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(deleted, expected);
    for (_, id) in &deleted {
        assert!(
            !["oa", "ob", "oc"].contains(&id.as_str()),
            "an identified id: {id}"
        );
        assert!(
            before.contains(id),
            "{id} is not an id the earlier de-identified export held"
        );
    }
}

/// Azure's `includeAssociatedData=_history,_deleted`: the export holds every stored version once,
/// each with its `meta.versionId`, deletions marked soft-deleted as microsoft/fhir-server marks
/// them, everything else as stored. `_deleted` alone adds the deletions only; with `_typeFilter`,
/// or at Patient level, the kickoff is refused as Azure refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_export_holds_every_stored_version_in_azures_shape() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_first_load(dir.path());
    change(&store);
    let server = start(&store, |_| {}).await;
    let client = client();

    let conn = rusqlite::Connection::open(&store).unwrap();
    let mut statement = conn
        .prepare(
            "SELECT type, id, version_id, deleted, json FROM resources
             UNION ALL SELECT type, id, version_id, deleted, json FROM replaced",
        )
        .unwrap();
    let stored: Vec<(String, String, String, bool, Vec<u8>)> = statement
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let soft_deleted = serde_json::json!([{
        "url": "http://azurehealthcareapis.com/data-extensions/deleted-state",
        "valueString": "soft-deleted"
    }]);
    let expected_of =
        |deleted_only: bool| -> std::collections::BTreeMap<(String, String, String), Value> {
            stored
                .iter()
                .filter(|(_, _, _, deleted, _)| !deleted_only || *deleted)
                .map(|(t, id, version, deleted, json)| {
                    let mut resource: Value = serde_json::from_slice(json).unwrap();
                    if resource.get("meta").is_none() {
                        resource["meta"] = serde_json::json!({});
                    }
                    if resource["meta"].get("versionId").is_none() {
                        resource["meta"]["versionId"] = version.clone().into();
                    }
                    if *deleted {
                        resource["meta"]["extension"] = soft_deleted.clone();
                    }
                    ((t.clone(), id.clone(), version.clone()), resource)
                })
                .collect()
        };
    let exported_of = |manifest: Value| {
        let client = client.clone();
        async move {
            let mut exported = std::collections::BTreeMap::new();
            for (_, url, lines) in download_all(&client, &manifest).await {
                for line in lines {
                    let resource: Value = serde_json::from_str(&line).unwrap();
                    let key = (
                        resource["resourceType"].as_str().unwrap().to_string(),
                        resource["id"].as_str().unwrap().to_string(),
                        resource["meta"]["versionId"]
                            .as_str()
                            .unwrap_or("1")
                            .to_string(),
                    );
                    assert!(
                        exported.insert(key.clone(), resource).is_none(),
                        "{key:?} twice ({url})"
                    );
                }
            }
            exported
        }
    };

    let all = export(
        &client,
        &format!(
            "{}/$export?includeAssociatedData=_history,_deleted",
            server.base
        ),
    )
    .await;
    let exported = exported_of(all).await;
    let expected = expected_of(false);
    assert_eq!(exported.len(), stored.len());
    for (key, resource) in &expected {
        let got = exported
            .get(key)
            .unwrap_or_else(|| panic!("{key:?} missing"));
        assert_eq!(got, resource, "{key:?}");
    }
    assert!(expected
        .keys()
        .any(|(t, id, v)| t == "Observation" && id == "both" && v == "2"));

    // `_deleted` alone: the resources as at transactionTime, and the deletions that are current.
    let deleted_only = export(
        &client,
        &format!(
            "{}/$export?includeAssociatedData=_deleted&_type=Observation",
            server.base
        ),
    )
    .await;
    let exported = exported_of(deleted_only).await;
    let soft: Vec<&(String, String, String)> = exported
        .iter()
        .filter(|(_, r)| r["meta"].get("extension").is_some())
        .map(|(k, _)| k)
        .collect();
    let ids: Vec<&str> = soft.iter().map(|(_, id, _)| id.as_str()).collect();
    assert_eq!(ids, ["oa", "ob", "oc"]);
    assert_eq!(exported.len(), 4, "oa, ob, oc deleted and both as it is");

    for (path, query, parameter) in [
        (
            "$export",
            "includeAssociatedData=_history&_typeFilter=Patient%3Fgender%3Dmale",
            "_typeFilter",
        ),
        (
            "Patient/$export",
            "includeAssociatedData=_deleted",
            "includeAssociatedData",
        ),
    ] {
        let answer = kickoff(&client, &format!("{}/{path}?{query}", server.base)).await;
        assert_eq!(answer.status(), 400, "{query}");
        assert!(answer.text().await.unwrap().contains(parameter));
    }
}
