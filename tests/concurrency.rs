//! Many exports at once, the running-export limit, and shards run twice: redelivered, run by two
//! workers at the same time, or taken over from a worker thought dead. Nothing is written twice.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::{client, download_all, kickoff, sample_counts, sample_store, start};
use fhir_export::app::App;
use fhir_export::config::{Settings, SourceSetting, StorageSetting};
use fhir_export::export::jobs::{Change, JobStatus};
use fhir_export::export::state::ShardStatus;
use fhir_export::export::{kickoff as planner, worker, ExportRequest, Level};
use fhir_export::queue::WorkMessage;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_four_exports_at_once_all_complete_whole() {
    let store = sample_store();
    let server = start(&store, |_| {}).await;
    let client = client();
    let types = ["Patient", "Condition", "Encounter", "Immunization"];
    let kickoffs = (0..24).map(|n| {
        let (client, url) = (
            client.clone(),
            // Each export asks for its own set of types.
            format!(
                "{}/$export?_type={}",
                server.base,
                types[..1 + n % types.len()].join(",")
            ),
        );
        tokio::spawn(async move { (n, common::export(&client, &url).await) })
    });
    let counts = sample_counts();
    let mut finished = 0;
    for handle in kickoffs {
        let (n, manifest) = handle.await.unwrap();
        let mut per_type: HashMap<String, usize> = HashMap::new();
        let mut seen = BTreeSet::new();
        for (resource_type, _, lines) in download_all(&client, &manifest).await {
            for line in &lines {
                let resource: Value = serde_json::from_str(line).unwrap();
                assert!(seen.insert((
                    resource_type.clone(),
                    resource["id"].as_str().unwrap().to_string()
                )));
            }
            *per_type.entry(resource_type).or_default() += lines.len();
        }
        let expected: HashMap<String, usize> = types[..1 + n % types.len()]
            .iter()
            .map(|t| (t.to_string(), counts[*t]))
            .collect();
        assert_eq!(per_type, expected, "export {n}");
        finished += 1;
    }
    assert_eq!(finished, 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_running_limit_a_kickoff_gets_429_with_retry_after() {
    let store = sample_store();
    // No workers: kicked-off exports stay running.
    let server = start(&store, |s| {
        s.max_running_exports = 3;
        s.workers = 0;
    })
    .await;
    let client = client();
    let url = format!("{}/$export?_type=Patient", server.base);
    let mut locations = Vec::new();
    for _ in 0..3 {
        let response = kickoff(&client, &url).await;
        assert_eq!(response.status(), 202);
        locations.push(response.headers()["content-location"].clone());
    }
    let refused = kickoff(&client, &url).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "10");
    let outcome: Value = refused.json().await.unwrap();
    assert_eq!(outcome["issue"][0]["code"], "throttled");
    assert!(outcome.to_string().contains(
        "3 exports are running, the most this service takes at once (EXPORT_MAX_RUNNING_EXPORTS)"
    ));
    // A cancelled export frees its place.
    let cancelled = client
        .delete(locations[0].to_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 202);
    assert_eq!(kickoff(&client, &url).await.status(), 202);
    assert_eq!(kickoff(&client, &url).await.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_kickoffs_never_pass_the_running_limit() {
    let store = sample_store();
    for limit in [1, 4] {
        let server = start(&store, |s| {
            s.max_running_exports = limit;
            s.workers = 0;
        })
        .await;
        let client = client();
        let url = format!("{}/$export?_type=Patient", server.base);
        let kickoffs = (0..24).map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { kickoff(&client, &url).await.status().as_u16() })
        });
        let mut admitted = 0;
        for answer in kickoffs.collect::<Vec<_>>() {
            match answer.await.unwrap() {
                202 => admitted += 1,
                429 => {}
                other => panic!("status {other}"),
            }
        }
        assert_eq!(admitted, limit, "limit {limit}");
    }
}

/// Every line of every file of the job's manifest, checked to be in `folder` and nothing more.
fn exported_keys(exports: &std::path::Path, manifest: &Value) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    let mut listed = BTreeSet::new();
    let mut folder = None;
    for output in manifest["output"].as_array().unwrap() {
        let path = output["url"]
            .as_str()
            .unwrap()
            .split("/_exports/")
            .nth(1)
            .unwrap()
            .to_string();
        folder = Some(path.rsplit_once('/').unwrap().0.to_string());
        let text = std::fs::read_to_string(exports.join(&path)).unwrap();
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            keys.push((
                output["type"].as_str().unwrap().to_string(),
                resource["id"].as_str().unwrap().to_string(),
            ));
        }
        listed.insert(path);
    }
    let folder = folder.unwrap();
    let on_disk: BTreeSet<String> = std::fs::read_dir(exports.join(&folder))
        .unwrap()
        .map(|e| format!("{folder}/{}", e.unwrap().file_name().to_string_lossy()))
        .collect();
    assert_eq!(on_disk, listed, "files beside the manifest's");
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_run_twice_at_once_redelivered_or_taken_over_writes_each_line_once() {
    let store = sample_store();
    let dir = tempfile::tempdir().unwrap();
    let exports = dir.path().join("exports");
    let settings = Settings {
        source: SourceSetting::Sqlite(store.clone()),
        storage: StorageSetting::Folder(exports.clone()),
        // Many small files make the Observation shard outlast a few heartbeats (0.1 s), so that
        // worker A notices it was taken over while it writes.
        file_max_bytes: 65_536,
        stale_after: std::time::Duration::from_secs(1),
        workers: 0,
        ..Settings::default()
    };
    let (app, _queue) = App::open_local(settings).unwrap();
    let app = app.exports;
    let request = ExportRequest::from_query(
        Level::System,
        "_type=Patient,Condition,Observation",
        false,
        false,
    )
    .unwrap();
    let job = planner::start(
        &app,
        request,
        "http://test/$export".into(),
        "http://test".into(),
        None,
    )
    .await
    .unwrap();
    planner::plan_job(&app, &job.id).await.unwrap();
    let (job, _) = app.jobs.load(&job.id).await.unwrap().unwrap();
    assert_eq!(job.shards[1].resource_type, "Observation");
    let message = |shard| WorkMessage::shard(&job.id, shard);
    // Shard 0: delivered to two workers at the same moment.
    let shard_zero = message(0);
    let (first, second) = tokio::join!(
        worker::handle_message(&app, &shard_zero),
        worker::handle_message(&app, &shard_zero)
    );
    first.unwrap();
    second.unwrap();
    // Shard 1: worker A runs it; the sweeper decides A is dead and worker B runs it too.
    let taken_over = {
        let app = app.clone();
        let message = message(1);
        tokio::spawn(async move { worker::handle_message(&app, &message).await })
    };
    while app
        .jobs
        .shard(&job.id, 1)
        .await
        .unwrap()
        .is_none_or(|shard| shard.status != ShardStatus::Running)
    {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    app.jobs
        .update_shard(&job.id, 1, &job.unclaimed_shard(), |shard| {
            shard.status = ShardStatus::Queued;
            shard.heartbeat = chrono::Utc::now() - chrono::Duration::hours(1);
            Change::Write(())
        })
        .await
        .unwrap();
    let started = std::time::Instant::now();
    worker::handle_message(&app, &message(1)).await.unwrap();
    taken_over.await.unwrap().unwrap();
    println!("the taken-over shard ran {:?}", started.elapsed());
    // Shard 2 runs once; then every message is delivered again, and the manifest written again.
    worker::handle_message(&app, &message(2)).await.unwrap();
    for shard in 0..3 {
        worker::handle_message(&app, &message(shard)).await.unwrap();
    }
    fhir_export::export::completion::finalize(&app, &job)
        .await
        .unwrap();

    let (done, _) = app.jobs.load(&job.id).await.unwrap().unwrap();
    assert_eq!(done.status, fhir_export::export::jobs::JobStatus::Completed);
    let manifest: Value =
        serde_json::from_slice(&app.jobs.manifest(&job.id).await.unwrap().unwrap()).unwrap();
    let keys = exported_keys(&exports, &manifest);
    let unique: BTreeSet<_> = keys.iter().collect();
    assert_eq!(unique.len(), keys.len(), "a resource was written twice");
    let counts = sample_counts();
    assert_eq!(
        keys.len(),
        counts["Patient"] + counts["Condition"] + counts["Observation"]
    );
    let job_folder = exports.join("fhir-export-jobs").join(&job.id);
    common::published_file(&job_folder.join("manifest.json")).await;
    let documents: Vec<String> = std::fs::read_dir(&job_folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // The job's document, the manifest, one state per shard, and one done marker per shard.
    assert_eq!(documents, ["done", "job.json", "manifest.json", "shards"]);
    for (folder, names) in [
        ("shards", ["0.json", "1.json", "2.json"]),
        ("done", ["0", "1", "2"]),
    ] {
        let mut found: Vec<String> = std::fs::read_dir(job_folder.join(folder))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        assert_eq!(found, names);
    }
    assert_eq!(app.jobs.running_count().await.unwrap(), 0);
}

/// On a local folder the running count is kept in memory once listed: it must follow every
/// marker written and removed, and count what a dead process left until the sweep clears it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_count_follows_kickoffs_endings_and_markers_left_behind() {
    let store = sample_store();
    let dir = tempfile::tempdir().unwrap();
    let exports = dir.path().join("exports");
    // A kickoff that died before recording its job, two hours ago.
    let running = exports.join("fhir-export-jobs/running");
    std::fs::create_dir_all(&running).unwrap();
    let left_behind = "0123456789abcdef0123456789abcdef";
    let two_hours_ago = chrono::Utc::now() - chrono::Duration::hours(2);
    std::fs::write(running.join(left_behind), two_hours_ago.to_rfc3339()).unwrap();
    let open = || {
        let settings = Settings {
            source: SourceSetting::Sqlite(store.clone()),
            storage: StorageSetting::Folder(exports.clone()),
            workers: 0,
            ..Settings::default()
        };
        App::open_local(settings).unwrap()
    };
    let (app, _queue) = open();
    let app = app.exports;
    let start = |types: &str| {
        let request = ExportRequest::from_query(Level::System, types, false, false).unwrap();
        planner::start(
            &app,
            request,
            "http://test/$export".into(),
            "http://test".into(),
            None,
        )
    };
    assert_eq!(app.jobs.running_count().await.unwrap(), 1);
    let first = start("_type=Patient").await.unwrap();
    let second = start("_type=Condition").await.unwrap();
    assert_eq!(app.jobs.running_count().await.unwrap(), 3);

    let end = |id: String, status| {
        let jobs = app.jobs.clone();
        async move {
            jobs.update(&id, |job| {
                job.status = status;
                Change::Write(())
            })
            .await
            .unwrap()
        }
    };
    end(first.id.clone(), JobStatus::Cancelled).await;
    assert_eq!(app.jobs.running_count().await.unwrap(), 2);
    app.sweep_stale().await.unwrap();
    assert_eq!(
        app.jobs.running_count().await.unwrap(),
        1,
        "the dead kickoff's"
    );
    end(second.id.clone(), JobStatus::Completed).await;
    assert_eq!(app.jobs.running_count().await.unwrap(), 0);

    // What the next process finds on disk agrees.
    let third = start("_type=Patient").await.unwrap();
    drop(app);
    let (app, _queue) = open();
    let app = app.exports;
    assert_eq!(app.jobs.running_count().await.unwrap(), 1);
    assert!(running.join(&third.id).exists());
}
