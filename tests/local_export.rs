//! The local service end to end over real HTTP: kickoff, polling, downloads, rolling, bad requests.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use fhir_export::source::{import, EmbeddedStore};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_export_holds_every_sample_resource_exactly_once_as_stored() {
    let store = sample_store();
    let server = start(&store, |_| {}).await;
    let client = client();
    let started = std::time::Instant::now();
    let manifest = export(&client, &format!("{}/$export", server.base)).await;
    eprintln!(
        "sample system export: kickoff to manifest {:?}",
        started.elapsed()
    );

    assert_eq!(manifest["requiresAccessToken"], false);
    assert_eq!(manifest["request"], format!("{}/$export", server.base));
    assert!(manifest["transactionTime"].as_str().unwrap().ends_with('Z'));
    assert_eq!(manifest["error"], serde_json::json!([]));
    let files = download_all(&client, &manifest).await;
    let stored = stored_resources(&store);
    let mut seen = HashSet::new();
    let mut per_type: HashMap<String, usize> = HashMap::new();
    for (file_type, url, lines) in &files {
        assert!(url.ends_with(&format!("/{file_type}-1.ndjson")), "{url}");
        for line in lines {
            let resource: Value = serde_json::from_str(line).unwrap();
            let key = (
                resource["resourceType"].as_str().unwrap().to_string(),
                resource["id"].as_str().unwrap().to_string(),
            );
            assert_eq!(&key.0, file_type, "a {} in the {file_type} file", key.0);
            assert_eq!(
                stored.get(&key),
                Some(line),
                "{key:?} differs from the stored JSON"
            );
            assert!(seen.insert(key), "duplicate line in {url}");
            *per_type.entry(file_type.clone()).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), sample_total());
    let expected: HashMap<String, usize> = sample_counts()
        .into_iter()
        .map(|(t, n)| (t.to_string(), n))
        .collect();
    assert_eq!(per_type, expected);
    let manifest_total: u64 = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert_eq!(manifest_total, (sample_total()) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observation_rolls_into_files_under_the_limit() {
    const LIMIT: u64 = 1_000_000;
    let store = sample_store();
    let server = start(&store, |s| s.file_max_bytes = LIMIT).await;
    let client = client();
    let manifest = export(
        &client,
        &format!("{}/$export?_type=Observation,Patient", server.base),
    )
    .await;
    let files = download_all(&client, &manifest).await;
    let observation_files: Vec<_> = files
        .iter()
        .filter(|(t, _, _)| t == "Observation")
        .collect();
    assert!(
        observation_files.len() > 5,
        "only {} Observation files",
        observation_files.len()
    );
    let mut ids = HashSet::new();
    for (n, (_, url, lines)) in observation_files.iter().enumerate() {
        assert!(
            url.ends_with(&format!("/Observation-{}.ndjson", n + 1)),
            "{url}"
        );
        let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
        assert!(bytes as u64 <= LIMIT, "{url} has {bytes} bytes");
        assert!(!lines.is_empty(), "{url} is empty");
        if n + 1 < observation_files.len() {
            assert!(
                bytes as u64 > LIMIT / 2,
                "{url} rolled early at {bytes} bytes"
            );
        }
        for line in lines {
            let resource: Value = serde_json::from_str(line).unwrap();
            assert!(ids.insert(resource["id"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(ids.len(), sample_counts()["Observation"]);
    let types: HashSet<&str> = files.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(types, HashSet::from(["Observation", "Patient"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_type_and_post_parameters_select_resources() {
    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("s.db");
    let data = dir.path().join("data.ndjson");
    std::fs::write(
        &data,
        concat!(
            r#"{"resourceType":"Patient","id":"old","meta":{"lastUpdated":"2010-01-01T00:00:00Z"}}"#, "\n",
            r#"{"resourceType":"Patient","id":"new","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#, "\n",
            r#"{"resourceType":"Organization","id":"o","meta":{"lastUpdated":"2020-01-01T00:00:00Z"}}"#, "\n",
        ),
    )
    .unwrap();
    let store = fhir_export::source::EmbeddedStore::open(&store_path).unwrap();
    fhir_export::source::import::import(&store, &[data]).unwrap();
    let server = start(&store_path, |_| {}).await;
    let client = client();

    let ids = |files: Vec<(String, String, Vec<String>)>| -> HashSet<String> {
        files
            .into_iter()
            .flat_map(|(_, _, lines)| lines)
            .map(|l| {
                serde_json::from_str::<Value>(&l).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let manifest = export(
        &client,
        &format!(
            "{}/$export?_since=2015-01-01T00:00:00Z&_type=Patient",
            server.base
        ),
    )
    .await;
    assert_eq!(
        ids(download_all(&client, &manifest).await),
        HashSet::from(["new".to_string()])
    );
    let manifest = export(
        &client,
        &format!("{}/$export?_until=2015-01-01T00:00:00Z", server.base),
    )
    .await;
    assert_eq!(
        ids(download_all(&client, &manifest).await),
        HashSet::from(["old".to_string()])
    );

    let response = client
        .post(format!("{}/%24export", server.base))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .body(r#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Organization"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let manifest = wait_for_manifest(
        &client,
        response.headers()["content-location"].to_str().unwrap(),
    )
    .await;
    assert_eq!(
        ids(download_all(&client, &manifest).await),
        HashSet::from(["o".to_string()])
    );

    let manifest = export(&client, &format!("{}/$export?_type=Device", server.base)).await;
    assert_eq!(manifest["output"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_an_operation_outcome_naming_the_problem() {
    let store = sample_store();
    let server = start(&store, |_| {}).await;
    let client = client();
    let base = &server.base;
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            client
                .get(format!("{base}/$export"))
                .header("Accept", "application/fhir+json"),
            400,
            "Prefer",
        ),
        (
            client
                .get(format!("{base}/$export"))
                .header("Prefer", "respond-async"),
            400,
            "Accept",
        ),
        (
            client
                .get(format!("{base}/$export"))
                .header("Accept", "text/html")
                .header("Prefer", "respond-async"),
            400,
            "Accept",
        ),
        (
            async_get(&client, &format!("{base}/$export?_type=Patient,Unicorn")),
            400,
            "_type",
        ),
        (
            async_get(&client, &format!("{base}/$export?_since=last-week")),
            400,
            "_since",
        ),
        (
            async_get(&client, &format!("{base}/$export?_outputFormat=text/csv")),
            400,
            "_outputFormat",
        ),
        (
            async_get(&client, &format!("{base}/$export?_container=..%2F..%2Fetc")),
            400,
            "_container",
        ),
        (
            async_get(
                &client,
                &format!("{base}/$export?_container=fhir-export-jobs"),
            ),
            400,
            "_container",
        ),
        (
            async_get(
                &client,
                &format!("{base}/$export?_typeFilter=Patient%3Fbogus%3Dtrue"),
            ),
            400,
            "_typeFilter",
        ),
        (
            async_get(&client, &format!("{base}/$export?patient=Patient/1")),
            400,
            "patient",
        ),
        (
            async_get(&client, &format!("{base}/$export?bogus=1")),
            400,
            "bogus",
        ),
        (
            async_post(&client, &format!("{base}/$export")).body("{not json"),
            400,
            "JSON",
        ),
        (
            async_post(&client, &format!("{base}/$export")).body(r#"{"resourceType":"Patient"}"#),
            400,
            "Parameters",
        ),
        (
            async_post(&client, &format!("{base}/$export")).body(vec![b' '; 2 << 20]),
            413,
            "larger",
        ),
        (client.put(format!("{base}/$export")), 405, "PUT"),
        (
            client.get(format!(
                "{base}/_operations/export/0123456789abcdef0123456789abcdef"
            )),
            404,
            "no export",
        ),
        (
            client.get(format!("{base}/_operations/export/..%2F..%2Fjob")),
            404,
            "no export",
        ),
        (
            client.delete(format!("{base}/_operations/export/nope")),
            404,
            "no export",
        ),
        (
            client.get(format!("{base}/_exports/fhir-export-jobs/x/job.ndjson")),
            404,
            "no export file",
        ),
        (
            client.get(format!("{base}/_exports/..%2F..%2Fetc%2Fpasswd.ndjson")),
            404,
            "no export file",
        ),
        (
            client.get(format!("{base}/Patient/$everything")),
            404,
            "no such endpoint",
        ),
    ];
    for (request, status, mention) in cases {
        let request = request.build().unwrap();
        let what = format!("{} {}", request.method(), request.url());
        let response = client.execute(request).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{what}");
        assert_eq!(
            response.headers()["content-type"],
            "application/fhir+json",
            "{what}"
        );
        let outcome: Value = response.json().await.unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{what}");
        let text = outcome["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(
            text.contains(mention),
            "{what}: {text:?} does not mention {mention}"
        );
    }

    let lenient = client
        .get(format!("{base}/$export?_type=Patient&_bogus=id"))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async, handling=lenient")
        .send()
        .await
        .unwrap();
    assert_eq!(lenient.status(), 202);
    let manifest = wait_for_manifest(
        &client,
        lenient.headers()["content-location"].to_str().unwrap(),
    )
    .await;
    let note = notes_text(&client, &manifest).await;
    assert!(note.contains("_bogus"), "{note}");
}

fn async_get(client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
    client
        .get(url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
}

fn async_post(client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_removes_files_and_later_polls_are_404() {
    let store = sample_store();
    // Heartbeats a minute apart: only the cancel itself can stop this process's shards in time.
    let server = start(&store, |_| {}).await;
    let client = client();
    let response = kickoff(&client, &format!("{}/$export", server.base)).await;
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let job_id = status_url.rsplit('/').next().unwrap().to_string();
    let job_file = job_document(&server.exports, &job_id);
    let folder: Value = serde_json::from_slice(&common::published_file(&job_file).await).unwrap();
    let folder = server
        .exports
        .join(folder["outputFolder"].as_str().unwrap());

    let cancelled = client.delete(&status_url).send().await.unwrap();
    assert_eq!(cancelled.status(), 202);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let poll = client.get(&status_url).send().await.unwrap();
    assert_eq!(poll.status(), 404);
    assert_eq!(
        client.delete(&status_url).send().await.unwrap().status(),
        404
    );
    // The workers of this process stopped and removed what they wrote before the answer.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let leftovers: Vec<_> = std::fs::read_dir(&folder)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "files left after cancel: {leftovers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_parameter_puts_files_in_a_new_folder_of_that_container() {
    let store = sample_store();
    let server = start(&store, |_| {}).await;
    let client = client();
    let first = export(
        &client,
        &format!("{}/$export?_type=Patient&_container=research", server.base),
    )
    .await;
    let second = export(
        &client,
        &format!("{}/$export?_type=Patient&_container=research", server.base),
    )
    .await;
    let folder_of = |m: &Value| {
        let url = m["output"][0]["url"].as_str().unwrap().to_string();
        url.split("/_exports/research/")
            .nth(1)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string()
    };
    assert_ne!(folder_of(&first), folder_of(&second));
    assert!(folder_of(&first).len() > 16);
    assert!(server
        .exports
        .join("research")
        .join(folder_of(&first))
        .join("Patient-1.ndjson")
        .is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_service_finishes_the_jobs_it_left_running() {
    let store = sample_store();
    let exports_dir = tempfile::tempdir().unwrap();
    let exports = exports_dir.path().join("exports");
    let client = client();
    let api_only = start_with_exports(&store, &exports, tempfile::tempdir().unwrap(), |s| {
        s.workers = 0
    })
    .await;
    let response = kickoff(
        &client,
        &format!("{}/$export?_type=Patient,Condition", api_only.base),
    )
    .await;
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let waiting = client.get(&status_url).send().await.unwrap();
    assert_eq!(waiting.status(), 202);
    // No worker: the job waits, unplanned.
    assert_eq!(waiting.headers()["x-progress"], "planning the shards");
    drop(api_only);
    // One unreadable job document beside it stops nobody, and can be deleted.
    let corrupt_id = "0123456789abcdef0123456789abcdef";
    let corrupt = job_document(&exports, corrupt_id);
    std::fs::create_dir_all(corrupt.parent().unwrap()).unwrap();
    std::fs::write(&corrupt, b"{\"id\": trunc").unwrap();

    let restarted =
        start_with_exports(&store, &exports, tempfile::tempdir().unwrap(), |_| {}).await;
    let job_path = status_url.split("/_operations/").nth(1).unwrap();
    let manifest = wait_for_manifest(
        &client,
        &format!("{}/_operations/{job_path}", restarted.base),
    )
    .await;
    // URLs carry the base of the kickoff; this restart came back on another port.
    let old_base = status_url
        .split("/_operations/")
        .next()
        .unwrap()
        .to_string();
    let manifest: Value =
        serde_json::from_str(&manifest.to_string().replace(&old_base, &restarted.base)).unwrap();
    let files = download_all(&client, &manifest).await;
    let counts: HashMap<&str, usize> = files
        .iter()
        .map(|(t, _, lines)| (t.as_str(), lines.len()))
        .collect();
    assert_eq!(
        counts,
        HashMap::from([
            ("Patient", sample_counts()["Patient"]),
            ("Condition", sample_counts()["Condition"])
        ])
    );
    let corrupt_url = format!("{}/_operations/export/{corrupt_id}", restarted.base);
    let deleted = client.delete(&corrupt_url).send().await.unwrap();
    assert_eq!(deleted.status(), 202);
    assert_eq!(client.get(&corrupt_url).send().await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_loaded_type_by_type_exports_what_a_mixed_load_or_one_cut_into_parts_does() {
    use fhir_export::source::{import, EmbeddedStore};
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("generated");
    fhir_export::generate::write_ndjson(20, 7, &generated).unwrap();
    // The same lines once type by type (each type's rows together: read in storage order) and
    // once dealt out across types into one file (read by the type's index, in id order).
    let mut per_type: Vec<Vec<String>> = Vec::new();
    for entry in std::fs::read_dir(&generated).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        per_type.push(text.lines().map(str::to_string).collect());
    }
    let mut mixed = String::new();
    for row in 0..per_type.iter().map(Vec::len).max().unwrap() {
        for lines in &per_type {
            if let Some(line) = lines.get(row) {
                mixed.push_str(line);
                mixed.push('\n');
            }
        }
    }
    std::fs::create_dir_all(dir.path().join("mixed")).unwrap();
    std::fs::write(dir.path().join("mixed/all.ndjson"), mixed).unwrap();
    let client = client();
    let mut exports = Vec::new();
    let mut observation_files = Vec::new();
    // The type-by-type store once more, with its types cut into parts of at most 40 resources.
    for (name, data, max_per_shard) in [
        ("together.db", "generated", None),
        ("mixed.db", "mixed", None),
        ("cut.db", "generated", Some(40)),
    ] {
        let store = dir.path().join(name);
        let report = import::import(
            &EmbeddedStore::open(&store).unwrap(),
            &[dir.path().join(data)],
        )
        .unwrap();
        assert!(report.failed.is_empty());
        let server = start(&store, |settings| {
            if let Some(max) = max_per_shard {
                settings.shard_max_resources = max;
            }
        })
        .await;
        let mut runs = Vec::new();
        for url in [
            format!("{}/$export", server.base),
            format!("{}/Patient/$export", server.base),
            format!("{}/$export?_since=2020-01-01T00:00:00Z", server.base),
        ] {
            let manifest = export(&client, &url).await;
            let mut lines: HashMap<String, Vec<String>> = HashMap::new();
            let mut files = Vec::new();
            for (file_type, url, file_lines) in download_all(&client, &manifest).await {
                if file_type == "Observation" {
                    files.push(url.rsplit('/').next().unwrap().to_string());
                }
                lines.entry(file_type).or_default().extend(file_lines);
            }
            runs.push(lines);
            observation_files.push(files);
        }
        exports.push(runs);
    }
    assert_eq!(observation_files[0], ["Observation-1.ndjson"]);
    let cut_files = &observation_files[6];
    assert!(cut_files.len() > 2, "{cut_files:?}");
    assert_eq!(cut_files[0], "Observation-1-1.ndjson");
    assert_eq!(cut_files[1], "Observation-2-1.ndjson");
    let id_of = |line: &String| {
        serde_json::from_str::<Value>(line).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let observations = |export: &HashMap<String, Vec<String>>| export["Observation"].clone();
    let together = observations(&exports[0][0]);
    let generated_order: Vec<String> =
        std::fs::read_to_string(generated.join("Observation.ndjson"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
    assert_eq!(together, generated_order, "storage order");
    let mixed = observations(&exports[1][0]);
    let ids: Vec<String> = mixed.iter().map(id_of).collect();
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    assert_eq!(ids, sorted_ids, "id order");
    assert_ne!(
        together, mixed,
        "the two loads are read in different orders"
    );
    assert_eq!(
        observations(&exports[2][0]),
        together,
        "parts in order, each in storage order"
    );
    for ((together, mixed), cut) in exports[0].iter().zip(&exports[1]).zip(&exports[2]) {
        let sorted = |export: &HashMap<String, Vec<String>>| {
            let mut sorted: Vec<(String, Vec<String>)> = export
                .iter()
                .map(|(t, lines)| {
                    let mut lines = lines.clone();
                    lines.sort();
                    (t.clone(), lines)
                })
                .collect();
            sorted.sort();
            sorted
        };
        let total: usize = together.values().map(Vec::len).sum();
        assert!(total > 200, "{total} lines");
        assert_eq!(sorted(together), sorted(mixed));
        assert_eq!(sorted(together), sorted(cut));
    }
}

/// `EXPORT_FILE_URLS=sas`: the manifest's URLs are the store's signed read URLs, made at each poll,
/// and need no token. (The store here is the local folder with a stand-in signer: Azure Blob signs
/// with a user delegation key through the SDK's `azure_storage_sas`, which
/// `storage::a_user_delegation_sas_is_accepted_by_azurite_for_its_blob_only` checks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sas_file_urls_the_manifest_leads_straight_to_the_storage() {
    use async_trait::async_trait;
    use bytes::Bytes;
    use fhir_export::storage::{
        ByteStream, ETag, LocalFolder, ObjectStore, ObjectWriter, PutMode, StorageError,
    };

    struct Signing(LocalFolder);

    #[async_trait]
    impl ObjectStore for Signing {
        async fn get(&self, path: &str) -> Result<Option<(Bytes, ETag)>, StorageError> {
            self.0.get(path).await
        }
        async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<ETag, StorageError> {
            self.0.put(path, data, mode).await
        }
        async fn writer(&self, path: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
            self.0.writer(path).await
        }
        async fn read_stream(&self, path: &str) -> Result<Option<(u64, ByteStream)>, StorageError> {
            self.0.read_stream(path).await
        }
        async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
            self.0.delete_prefix(prefix).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
            self.0.list(prefix).await
        }
        fn owned_by_this_process(&self) -> bool {
            true
        }
        async fn signed_read_url(
            &self,
            path: &str,
            expiry: chrono::DateTime<chrono::Utc>,
        ) -> Result<Option<String>, StorageError> {
            Ok(Some(format!(
                "https://account.example/{path}?se={}&sig=x",
                expiry.timestamp()
            )))
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let storage = std::sync::Arc::new(Signing(LocalFolder::open(dir.path()).unwrap()));
    let server = start_with_storage(&sample_store(), storage, |s| {
        s.file_urls = fhir_export::config::FileUrls::Sas
    })
    .await;
    let client = client();
    let manifest = export(
        &client,
        &format!("{}/$export?_type=Patient,Organization", server.base),
    )
    .await;
    assert_eq!(manifest["requiresAccessToken"], false);
    let outputs = manifest["output"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    for output in outputs {
        let url = output["url"].as_str().unwrap();
        assert!(url.starts_with("https://account.example/"), "{url}");
        let path = url["https://account.example/".len()..]
            .split('?')
            .next()
            .unwrap();
        assert!(dir.path().join(path).is_file(), "{path} is the stored file");
        let expiry: i64 = url
            .split("se=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let lifetime = expiry - chrono::Utc::now().timestamp();
        assert!(
            (3500..=3600).contains(&lifetime),
            "valid about an hour: {lifetime} s"
        );
    }

    // The files of `deleted` are signed too.
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let data = small.join("patients.ndjson");
    std::fs::write(&data, "{\"resourceType\":\"Patient\",\"id\":\"a\",\"meta\":{\"lastUpdated\":\"2020-01-01T00:00:00Z\"}}\n").unwrap();
    let store = small.join("store.db");
    import::import(&EmbeddedStore::open(&store).unwrap(), &[data]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let since = chrono::Utc::now();
    let deletion = small.join("deletion.json");
    std::fs::write(&deletion, r#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"DELETE","url":"Patient/a"}}]}"#).unwrap();
    import::import(&EmbeddedStore::open(&store).unwrap(), &[deletion]).unwrap();
    let storage = std::sync::Arc::new(Signing(LocalFolder::open(small.join("exports")).unwrap()));
    let server = start_with_storage(&store, storage, |s| {
        s.file_urls = fhir_export::config::FileUrls::Sas
    })
    .await;
    let since = since
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        .replace('+', "%2B");
    let manifest = export(&client, &format!("{}/$export?_since={since}", server.base)).await;
    let deleted = manifest["deleted"].as_array().unwrap();
    assert_eq!(deleted.len(), 1, "{manifest}");
    let url = deleted[0]["url"].as_str().unwrap();
    assert!(url.starts_with("https://account.example/"), "{url}");
}

/// Bulk Data STU3: a client that sends `Accept-Encoding: gzip` gets each file gzip-compressed, which
/// decompresses to the very bytes a client without it gets; `q=0` and other codings get plain bytes.
/// The same whether files are stored as NDJSON or compressed (`EXPORT_COMPRESSION=gzip`, where
/// the gzip answer is the stored file itself and the plain one is decompressed on the way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_asked_for_gzip_comes_compressed_and_decompresses_to_the_same_bytes() {
    let client = client();
    let mut plain_by_name: Vec<std::collections::BTreeMap<String, bytes::Bytes>> = Vec::new();
    for stored_gzip in [false, true] {
        let server = start(&sample_store(), |s| s.gzip_files = stored_gzip).await;
        let manifest = export(
            &client,
            &format!("{}/$export?_type=Observation,Patient", server.base),
        )
        .await;
        let (mut plain_bytes, mut wire_bytes) = (0, 0);
        let mut plain_files = std::collections::BTreeMap::new();
        for output in manifest["output"].as_array().unwrap() {
            let url = output["url"].as_str().unwrap();
            let plain = client.get(url).send().await.unwrap();
            assert_eq!(plain.headers().get("content-encoding"), None);
            assert_eq!(plain.headers()["vary"], "accept-encoding");
            let plain = plain.bytes().await.unwrap();
            assert_eq!(
                plain.iter().filter(|&&b| b == b'\n').count() as u64,
                output["count"].as_u64().unwrap()
            );

            let compressed = client
                .get(url)
                .header("accept-encoding", "br;q=1, gzip;q=0.8")
                .send()
                .await
                .unwrap();
            assert_eq!(compressed.status(), 200);
            assert_eq!(compressed.headers()["content-encoding"], "gzip");
            assert_eq!(
                compressed.headers()["content-type"],
                "application/fhir+ndjson"
            );
            assert_eq!(compressed.headers()["vary"], "accept-encoding");
            let compressed = compressed.bytes().await.unwrap();
            let mut decompressed = Vec::new();
            std::io::Read::read_to_end(
                &mut flate2::read::GzDecoder::new(&compressed[..]),
                &mut decompressed,
            )
            .unwrap();
            assert!(
                decompressed == plain,
                "{url}: the decompressed bytes differ"
            );
            let stored =
                std::fs::read(server.exports.join(url.split("/_exports/").nth(1).unwrap()))
                    .unwrap();
            assert_eq!(
                stored.starts_with(&[0x1f, 0x8b]),
                stored_gzip,
                "{url}: stored compressed"
            );
            if stored_gzip {
                assert!(
                    stored == compressed,
                    "{url}: the stored file is what goes out"
                );
            }
            plain_bytes += plain.len();
            wire_bytes += compressed.len();

            for refused in ["gzip;q=0", "identity", "br"] {
                let answer = client
                    .get(url)
                    .header("accept-encoding", refused)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answer.headers().get("content-encoding"), None, "{refused}");
                assert!(answer.bytes().await.unwrap() == plain, "{refused}");
            }
            plain_files.insert(url.rsplit('/').next().unwrap().to_string(), plain);
        }
        eprintln!(
            "stored gzip {stored_gzip}: Observation and Patient: {plain_bytes} bytes plain, {wire_bytes} gzip ({:.1}x)",
            plain_bytes as f64 / wire_bytes as f64
        );
        assert!(
            wire_bytes * 4 < plain_bytes,
            "{wire_bytes} of {plain_bytes}"
        );
        plain_by_name.push(plain_files);
    }
    assert!(
        plain_by_name[0] == plain_by_name[1],
        "the same NDJSON either way"
    );
}

/// Bulk Data STU3 `Prefer: separate-export-status`: the kickoff says it applied it, and each poll
/// that reaches the export answers 200 with the export's own status in `X-Export-Status` (202 while
/// it runs, then 200 with the manifest); without it, polls answer as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_export_status_puts_the_exports_status_in_a_header() {
    let store = sample_store();
    let exports = tempfile::tempdir().unwrap();
    let client = client();
    let kickoff_with = |base: String, prefer: &'static str| {
        let client = client.clone();
        async move {
            let url = format!("{base}/$export?_type=Patient");
            let response = kickoff_preferring(&client, &url, prefer).await;
            assert_eq!(response.status(), 202);
            let applied = response.headers()["preference-applied"]
                .to_str()
                .unwrap()
                .to_string();
            let location = response.headers()["content-location"]
                .to_str()
                .unwrap()
                .to_string();
            (location, applied)
        }
    };
    // No workers: the exports wait, running.
    let waiting = start_with_exports(&store, exports.path(), tempfile::tempdir().unwrap(), |s| {
        s.workers = 0
    })
    .await;
    let (separate, applied) = kickoff_with(
        waiting.base.clone(),
        "respond-async, separate-export-status",
    )
    .await;
    assert_eq!(applied, "respond-async, separate-export-status");
    let (plain, applied) = kickoff_with(waiting.base.clone(), "respond-async").await;
    assert_eq!(applied, "respond-async");
    let (_, applied) = kickoff_with(
        waiting.base.clone(),
        "handling=lenient, respond-async, separate-export-status",
    )
    .await;
    assert_eq!(
        applied,
        "respond-async, handling=lenient, separate-export-status"
    );

    let running = client.get(&separate).send().await.unwrap();
    assert_eq!(running.status(), 200);
    assert_eq!(running.headers()["x-export-status"], "202");
    assert!(running.headers().contains_key("x-progress"));
    assert!(running.headers().contains_key("retry-after"));
    assert!(running.bytes().await.unwrap().is_empty());
    let running = client.get(&plain).send().await.unwrap();
    assert_eq!(running.status(), 202);
    assert!(!running.headers().contains_key("x-export-status"));
    let unknown = separate.replace(&separate[separate.len() - 32..], &"0".repeat(32));
    assert_eq!(client.get(&unknown).send().await.unwrap().status(), 404);
    let old_base = waiting.base.clone();
    drop(waiting);

    // A service with workers on the same storage finishes them.
    let working =
        start_with_exports(&store, exports.path(), tempfile::tempdir().unwrap(), |_| {}).await;
    let separate = separate.replace(&old_base, &working.base);
    let manifest = loop {
        let answer = client.get(&separate).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        if answer.headers()["x-export-status"] == "200" {
            break answer.json::<Value>().await.unwrap();
        }
        assert_eq!(answer.headers()["x-export-status"], "202");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(manifest["output"][0]["type"], "Patient");
    let plain = plain.replace(&old_base, &working.base);
    assert_eq!(
        wait_for_manifest(&client, &plain).await["output"][0]["type"],
        "Patient"
    );

    // The CapabilityStatement names what of each IG version the server does.
    let statement = get_json(&client, &format!("{}/metadata", working.base)).await;
    let documentation = statement["rest"][0]["documentation"].as_str().unwrap();
    for feature in [
        "STU3 (3.0.0)",
        "separate-export-status",
        "allowPartialManifests",
        "organizeOutputBy=Patient",
        "Accept-Encoding: gzip",
        "_typeFilter",
    ] {
        assert!(
            documentation.contains(feature),
            "{feature}: {documentation}"
        );
    }
}

/// Bulk Data STU3 `allowPartialManifests=true` over HTTP: polls answer 202 with a (partial)
/// manifest once files are finished, then 200; the manifest comes in pages of at most
/// `EXPORT_MANIFEST_PAGE_SIZE` files linked by `next`, each the same when fetched again, listing
/// every file once; with `separate-export-status` a page answers 200 and its status in a header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_manifests_come_in_linked_pages_that_list_every_file_once() {
    let store = sample_store();
    let client = client();
    let server = start(&store, |s| {
        s.manifest_page_size = 2;
        s.file_max_bytes = 1 << 20;
    })
    .await;
    let url = format!(
        "{}/$export?allowPartialManifests=true&organizeOutputBy=Patient",
        server.base
    );
    let response = kickoff_preferring(&client, &url, "respond-async, separate-export-status").await;
    assert_eq!(response.status(), 202);
    let status = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let first = loop {
        let answer = client.get(&status).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        let export_status = answer.headers()["x-export-status"].clone();
        let body = answer.bytes().await.unwrap();
        if export_status == "200" {
            break serde_json::from_slice::<Value>(&body).unwrap();
        }
        assert_eq!(export_status, "202");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let mut pages = vec![first];
    let mut page_urls = vec![status.clone()];
    while let Some(next) = pages.last().unwrap()["link"][0]["url"].as_str() {
        assert!(next.starts_with(&status), "{next}");
        let answer = client.get(next).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.headers()["x-export-status"], "200");
        page_urls.push(next.to_string());
        pages.push(answer.json().await.unwrap());
    }
    let mut listed = Vec::new();
    for (url, page) in page_urls.iter().zip(&pages) {
        let outputs = page["output"].as_array().unwrap();
        assert!(!outputs.is_empty() && outputs.len() <= 2, "{url}: {page}");
        assert_eq!(page["outputOrganizedBy"], "Patient");
        assert_eq!(page["transactionTime"], pages[0]["transactionTime"]);
        listed.extend(
            outputs
                .iter()
                .map(|o| o["url"].as_str().unwrap().to_string()),
        );
        let again: Value = get_json(&client, url).await;
        assert_eq!(&again, page, "{url} changed");
    }
    let mut unique = listed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), listed.len(), "a file listed twice");
    let folder = server.exports.read_dir().unwrap().flatten().find(|e| {
        e.file_name()
            .to_string_lossy()
            .ends_with(&status[status.len() - 32..])
    });
    let on_disk = std::fs::read_dir(folder.unwrap().path()).unwrap().count();
    let notes = pages[0]["error"].as_array().unwrap().len();
    assert_eq!(
        notes, 1,
        "the note that organized output leaves some types out"
    );
    assert_eq!(listed.len() + notes, on_disk, "every file listed");
    assert!(pages.len() >= 10, "{} pages", pages.len());
}
