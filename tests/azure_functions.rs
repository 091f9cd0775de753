//! The Azure Functions contract: the real `handler` binary in custom-handler mode, sent exactly the
//! payloads the Functions host sends (HTTP in payload mode, Service Bus trigger with Metadata, timer,
//! forwarded HTTP), writing to Azure Blob storage on Azurite through the Azure SDK.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::azurite;
use fhir_export::export::jobs::{Change, JobStore};
use fhir_export::export::state::{ShardState, ShardStatus};
use fhir_export::storage::{AzureBlob, ObjectStore, PutMode};
use futures_util::StreamExt;
use serde_json::{json, Value};

/// The public address clients use; the host would route it to the handler.
const PUBLIC: &str = "https://fhir-export.example.net";

struct Handler {
    child: Child,
    base: String,
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `handler` as the Functions host starts it: no arguments, a clean environment with
/// `FUNCTIONS_CUSTOMHANDLER_PORT` set.
fn as_the_host_starts_it(port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_handler"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string());
    command
}

/// Starts `handler` as the Functions host does: no arguments, `FUNCTIONS_CUSTOMHANDLER_PORT` set.
async fn start_handler(storage: &str, extra: &[(&str, &str)]) -> Handler {
    let port = common::free_port();
    let mut command = as_the_host_starts_it(port);
    command
        .env(
            "FHIR_SOURCE",
            format!("sqlite:{}", common::sample_store().display()),
        )
        .env("EXPORT_STORAGE", storage)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (name, value) in extra {
        command.env(name, value);
    }
    let handler = Handler {
        child: command.spawn().unwrap(),
        base: format!("http://127.0.0.1:{port}"),
    };
    // The host's readiness probe: any answer on the port.
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if let Ok(response) = client.get(format!("{}/", handler.base)).send().await {
            assert_eq!(response.status(), 200);
            return handler;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the handler did not start listening");
}

fn sys(function: &str) -> Value {
    json!({
        "MethodName": function,
        "UtcNow": chrono::Utc::now().to_rfc3339(),
        "RandGuid": uuid::Uuid::new_v4().to_string(),
    })
}

/// The payload the host sends for an HTTP trigger that has other output bindings.
fn http_payload(
    function: &str,
    method: &str,
    path_and_query: &str,
    headers: Value,
    body: &str,
) -> Value {
    let url = format!("{PUBLIC}{path_and_query}");
    let query: HashMap<String, String> = url
        .split_once('?')
        .map(|(_, q)| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    json!({
        "Data": {
            "req": {
                "Url": url,
                "Method": method,
                "Query": query,
                "Headers": headers,
                "Params": {},
                "Body": body,
            }
        },
        "Metadata": { "sys": sys(function) }
    })
}

fn kickoff_headers() -> Value {
    json!({
        "Accept": ["application/fhir+json"],
        "Prefer": ["respond-async"],
        "Host": ["fhir-export.example.net"],
    })
}

/// A Service Bus trigger payload; the body arrives as the host gives it: a JSON string.
fn service_bus_payload(message: &Value, delivery_count: Value) -> Value {
    json!({
        "Data": { "message": message },
        "Metadata": {
            "DeliveryCount": delivery_count,
            "MessageId": uuid::Uuid::new_v4().simple().to_string(),
            "EnqueuedTimeUtc": chrono::Utc::now().to_rfc3339(),
            "sys": sys("ShardWorker"),
        }
    })
}

fn timer_payload() -> Value {
    json!({
        "Data": { "timer": { "Schedule": { "AdjustForDST": true }, "ScheduleStatus": null, "IsPastDue": false } },
        "Metadata": { "sys": sys("StaleSweeper") }
    })
}

async fn invoke(handler: &Handler, function: &str, payload: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/{function}", handler.base))
        .json(payload)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert!(body["Outputs"].is_object(), "{body}");
    assert!(body["Logs"].is_array(), "{body}");
    assert!(
        body.as_object().unwrap().contains_key("ReturnValue"),
        "{body}"
    );
    (status, body)
}

/// Kicks off through the payload protocol, then runs the planning message the kickoff sent;
/// returns the job id and the shard messages the planning sent.
async fn kickoff(handler: &Handler, function: &str, path_and_query: &str) -> (String, Vec<Value>) {
    let (id, sent) = kickoff_unplanned(handler, function, path_and_query).await;
    let shards = plan(handler, &sent).await;
    (id, shards)
}

/// Runs a kickoff's planning message; returns the shard messages it sent.
async fn plan(handler: &Handler, sent: &[Value]) -> Vec<Value> {
    let (status, planned) = invoke(
        handler,
        "ShardWorker",
        &service_bus_payload(&Value::String(sent[0].to_string()), json!(1)),
    )
    .await;
    assert_eq!(status, 200, "{planned}");
    planned["Outputs"]["shards"].as_array().unwrap().clone()
}

/// Kicks off through the payload protocol: the job id, and the one planning message it sent.
async fn kickoff_unplanned(
    handler: &Handler,
    function: &str,
    path_and_query: &str,
) -> (String, Vec<Value>) {
    kickoff_request(handler, function, "GET", path_and_query, "").await
}

/// A kickoff by `method` with `body`, through the payload protocol: the job id, and the one
/// planning message it sent.
async fn kickoff_request(
    handler: &Handler,
    function: &str,
    method: &str,
    path_and_query: &str,
    body: &str,
) -> (String, Vec<Value>) {
    let payload = http_payload(function, method, path_and_query, kickoff_headers(), body);
    let (status, body) = invoke(handler, function, &payload).await;
    assert_eq!(status, 200, "{body}");
    let res = &body["Outputs"]["res"];
    assert_eq!(res["statusCode"], 202, "{body}");
    let location = res["headers"]["content-location"].as_str().unwrap();
    let id = location
        .strip_prefix(&format!("{PUBLIC}/_operations/export/"))
        .unwrap_or_else(|| panic!("Content-Location {location}"))
        .to_string();
    let sent = body["Outputs"]["shards"].as_array().unwrap().clone();
    assert_eq!(
        sent,
        [json!({ "jobId": id })],
        "one planning message: {body}"
    );
    (id, sent)
}

/// Forwarded HTTP: the host passes the request through as it came.
async fn forwarded_status(handler: &Handler, id: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{}/_operations/export/{id}", handler.base))
        .header("Host", "fhir-export.example.net")
        .header("X-Forwarded-Proto", "https")
        .send()
        .await
        .unwrap()
}

/// Runs the messages, and those a planning message sends, until none is left.
async fn run_shards(handler: &Handler, shards: &[Value]) {
    let mut queue: std::collections::VecDeque<Value> = shards.iter().cloned().collect();
    let mut sent = 0;
    while let Some(message) = queue.pop_front() {
        let n = sent;
        sent += 1;
        // The body as the host hands it over: a string, sometimes JSON-encoded twice.
        let text = message.to_string();
        let data = match n % 3 {
            0 => Value::String(text),
            1 => Value::String(Value::String(text).to_string()),
            _ => message.clone(),
        };
        let count = if n % 2 == 0 { json!(1) } else { json!("1") };
        let (status, body) =
            invoke(handler, "ShardWorker", &service_bus_payload(&data, count)).await;
        assert_eq!(status, 200, "{body}");
        if message.get("shard").is_none() {
            queue.extend(
                body["Outputs"]["shards"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .cloned(),
            );
            continue;
        }
        assert_eq!(
            body["Outputs"]["shards"],
            json!([]),
            "no retry expected: {body}"
        );
    }
}

/// The blob path of a manifest entry's URL, as this service serves it.
fn blob_path(url: &Value) -> &str {
    url.as_str()
        .unwrap()
        .strip_prefix(&format!("{PUBLIC}/_exports/"))
        .unwrap_or_else(|| panic!("{url} is not a file URL of {PUBLIC}"))
}

fn store(account_url: &str) -> Arc<AzureBlob> {
    Arc::new(AzureBlob::new(account_url, None).unwrap())
}

async fn blob_text(store: &AzureBlob, path: &str) -> String {
    let (_, mut stream) = store.read_stream(path).await.unwrap().unwrap();
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        data.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8(data).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_export_through_the_host_protocol_lands_in_blob_storage() {
    whole_export_through_the_host_protocol(azurite::sas_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_export_lands_in_a_hierarchical_namespace_too() {
    whole_export_through_the_host_protocol(common::hns::start(&azurite::sas_url()).await).await;
}

async fn whole_export_through_the_host_protocol(sas: String) {
    let max_bytes = 2_000_000u64;
    let handler = start_handler(&sas, &[("EXPORT_FILE_MAX_BYTES", "2000000")]).await;
    let container = azurite::unique_container("contract");

    let (id, shards) = kickoff(
        &handler,
        "SystemExport",
        &format!("/$export?_container={container}"),
    )
    .await;
    assert_eq!(
        shards.len(),
        common::sample_counts().len(),
        "one shard per type"
    );
    for message in &shards {
        assert_eq!(message["jobId"], id.as_str());
    }

    // Running: 202 with progress.
    let running = forwarded_status(&handler, &id).await;
    assert_eq!(running.status(), 202);
    let progress = running.headers()["x-progress"].to_str().unwrap();
    let none_of_all = format!("0/{}", common::sample_counts().len());
    assert!(progress.contains(&none_of_all), "{progress}");

    run_shards(&handler, &shards).await;
    let done = forwarded_status(&handler, &id).await;
    assert_eq!(done.status(), 200);
    let manifest: Value = done.json().await.unwrap();

    // Every manifest URL names a blob of the export's own folder in the container.
    let store = store(&sas);
    let blobs = store.list(&container).await.unwrap();
    let folder_prefix = format!("{container}/");
    let mut seen = HashSet::new();
    let mut per_type: HashMap<String, usize> = HashMap::new();
    let outputs = manifest["output"].as_array().unwrap();
    assert_eq!(outputs.len(), blobs.len(), "one blob per manifest entry");
    for output in outputs {
        let path = blob_path(&output["url"]);
        assert!(
            path.starts_with(&folder_prefix) && path.contains(&id),
            "{path}"
        );
        assert!(blobs.contains(&path.to_string()), "{path} is not a blob");
        let text = blob_text(&store, path).await;
        assert!(
            text.len() as u64 <= max_bytes,
            "{path} is {} bytes",
            text.len()
        );
        assert_eq!(
            text.lines().count() as u64,
            output["count"].as_u64().unwrap()
        );
        for line in text.lines() {
            let resource: Value = serde_json::from_str(line).unwrap();
            let key = (
                resource["resourceType"].as_str().unwrap().to_string(),
                resource["id"].as_str().unwrap().to_string(),
            );
            assert_eq!(key.0, output["type"].as_str().unwrap());
            assert!(seen.insert(key.clone()), "{key:?} twice");
            *per_type.entry(key.0).or_default() += 1;
        }
    }
    for (resource_type, count) in common::sample_counts() {
        assert_eq!(
            per_type.get(&resource_type).copied().unwrap_or(0),
            count,
            "{resource_type}"
        );
    }
    let observation_files = outputs
        .iter()
        .filter(|o| o["type"] == "Observation")
        .count();
    assert!(
        observation_files > 5,
        "Observation rolled into {observation_files} files"
    );

    // The forwarded download streams the same blob.
    let first = outputs[0]["url"]
        .as_str()
        .unwrap()
        .replace(PUBLIC, &handler.base);
    let downloaded = reqwest::get(&first).await.unwrap();
    assert_eq!(downloaded.status(), 200);
    let path = blob_path(&outputs[0]["url"]);
    assert_eq!(
        downloaded.text().await.unwrap(),
        blob_text(&store, path).await
    );

    // A redelivered message (DeliveryCount 2) changes nothing: no new blob, no second manifest.
    let before: Vec<(String, String)> = {
        let mut texts = Vec::new();
        for blob in &blobs {
            texts.push((blob.clone(), blob_text(&store, blob).await));
        }
        texts
    };
    let (status, body) = invoke(
        &handler,
        "ShardWorker",
        &service_bus_payload(&Value::String(shards[0].to_string()), json!(2)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(store.list(&container).await.unwrap(), blobs);
    for (blob, text) in &before {
        assert_eq!(&blob_text(&store, blob).await, text, "{blob} changed");
    }
    // The job's state: its document, the manifest, and per shard its state and done marker.
    let mut expected = vec![
        format!("fhir-export-jobs/{id}/job.json"),
        format!("fhir-export-jobs/{id}/manifest.json"),
    ];
    for n in 0..shards.len() {
        expected.push(format!("fhir-export-jobs/{id}/done/{n}"));
        expected.push(format!("fhir-export-jobs/{id}/shards/{n}.json"));
    }
    expected.sort();
    assert_eq!(
        store.list(&format!("fhir-export-jobs/{id}")).await.unwrap(),
        expected
    );
    let again: Value = forwarded_status(&handler, &id).await.json().await.unwrap();
    assert_eq!(again, manifest);

    // The timer finds nothing stale.
    let (status, body) = invoke(&handler, "StaleSweeper", &timer_payload()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["Outputs"]["shards"], json!([]));

    // Cancel through forwarded HTTP removes the blobs; later polls are 404.
    let cancelled = reqwest::Client::new()
        .delete(format!("{}/_operations/export/{id}", handler.base))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 202);
    assert!(store.list(&container).await.unwrap().is_empty());
    assert_eq!(forwarded_status(&handler, &id).await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_shards_are_swept_redelivered_once_and_capped() {
    stale_shards_swept_redelivered_once_and_capped(azurite::sas_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_shards_are_swept_on_a_hierarchical_namespace_too() {
    stale_shards_swept_redelivered_once_and_capped(common::hns::start(&azurite::sas_url()).await)
        .await;
}

/// The two sweeper tests sweep every job of the one Azurite account with a 1 s stale limit: run
/// together, one's sweeper took the other's stale shard first (seen as a flaky failure).
static SWEEPING: std::sync::LazyLock<tokio::sync::Mutex<()>> =
    std::sync::LazyLock::new(|| tokio::sync::Mutex::new(()));

async fn stale_shards_swept_redelivered_once_and_capped(sas: String) {
    let _alone = SWEEPING.lock().await;
    let handler = start_handler(
        &sas,
        &[
            ("EXPORT_STALE_AFTER_SECS", "1"),
            ("EXPORT_MAX_ATTEMPTS", "2"),
        ],
    )
    .await;
    let jobs = JobStore::new(store(&sas));
    let container = azurite::unique_container("stale");

    // Shard 1's worker "dies": its message was taken, the shard marked running, then silence.
    let (id, shards) = kickoff(
        &handler,
        "SystemExport",
        &format!("/$export?_type=Patient,Condition&_container={container}"),
    )
    .await;
    assert_eq!(shards.len(), 2);
    run_shards(&handler, &shards[..1]).await;
    let silent = chrono::Utc::now() - chrono::Duration::seconds(30);
    jobs.update_shard(&id, 1, &ShardState::queued_at(silent), |shard| {
        shard.status = ShardStatus::Running;
        shard.attempts = 1;
        shard.heartbeat = silent;
        Change::Write(())
    })
    .await
    .unwrap();
    assert_eq!(forwarded_status(&handler, &id).await.status(), 202);

    // The sweeper sends it out again through its output binding.
    let (status, body) = invoke(&handler, "StaleSweeper", &timer_payload()).await;
    assert_eq!(status, 200, "{body}");
    let requeued: Vec<&Value> = body["Outputs"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["jobId"] == id.as_str())
        .collect();
    assert_eq!(requeued, [&shards[1]]);

    // Both the requeued message and the original's redelivery arrive: one runs, one is skipped.
    let redelivered = service_bus_payload(&Value::String(shards[1].to_string()), json!(2));
    let requeued_message = service_bus_payload(requeued[0], json!(1));
    let (a, b) = tokio::join!(
        invoke(&handler, "ShardWorker", &redelivered),
        invoke(&handler, "ShardWorker", &requeued_message),
    );
    assert_eq!((a.0, b.0), (200, 200));
    let manifest: Value = forwarded_status(&handler, &id).await.json().await.unwrap();
    let store = store(&sas);
    let mut ids = HashSet::new();
    let mut lines = 0;
    for output in manifest["output"].as_array().unwrap() {
        let path = blob_path(&output["url"]);
        for line in blob_text(&store, path).await.lines() {
            lines += 1;
            let resource: Value = serde_json::from_str(line).unwrap();
            ids.insert(format!("{}/{}", resource["resourceType"], resource["id"]));
        }
    }
    let expected = common::sample_counts()["Patient"] + common::sample_counts()["Condition"];
    assert_eq!(
        (lines, ids.len()),
        (expected, expected),
        "every resource exactly once"
    );

    // Past the restart cap the job fails with an OperationOutcome naming the shard.
    let (id, shards) = kickoff(
        &handler,
        "SystemExport",
        &format!("/$export?_type=Device&_container={container}"),
    )
    .await;
    assert_eq!(shards.len(), 1);
    let silent = chrono::Utc::now() - chrono::Duration::seconds(30);
    jobs.update_shard(&id, 0, &ShardState::queued_at(silent), |shard| {
        shard.status = ShardStatus::Running;
        shard.attempts = 2;
        shard.heartbeat = silent;
        Change::Write(())
    })
    .await
    .unwrap();
    let (status, body) = invoke(&handler, "StaleSweeper", &timer_payload()).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body["Outputs"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["jobId"] == id.as_str()));
    let failed = forwarded_status(&handler, &id).await;
    assert_eq!(failed.status(), 500);
    let outcome: Value = failed.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        diagnostics.contains("shard 0 (Device)") && diagnostics.contains("restart cap"),
        "{diagnostics}"
    );

    // A planning message that never arrived: the job waits unplanned, and once it is stale the
    // sweeper sends its planning again, which plans it once however often it comes.
    let (lost, _) = kickoff_unplanned(
        &handler,
        "SystemExport",
        &format!("/$export?_type=Patient&_container={container}"),
    )
    .await;
    let waiting = forwarded_status(&handler, &lost).await;
    assert_eq!(waiting.headers()["x-progress"], "planning the shards");
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let (status, body) = invoke(&handler, "StaleSweeper", &timer_payload()).await;
    assert_eq!(status, 200, "{body}");
    let planning = json!({ "jobId": lost });
    assert!(
        body["Outputs"]["shards"]
            .as_array()
            .unwrap()
            .contains(&planning),
        "{body}"
    );
    let twice = [planning.clone(), planning];
    run_shards(&handler, &twice).await;
    let done = forwarded_status(&handler, &lost).await;
    assert_eq!(done.status(), 200);
    let manifest: Value = done.json().await.unwrap();
    assert_eq!(manifest["output"].as_array().unwrap().len(), 1);
    assert_eq!(manifest["output"][0]["count"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_invocations_get_clear_answers_and_no_retries() {
    let handler = start_handler(&azurite::sas_url(), &[]).await;

    // A message that is not a shard message is dropped (a retry would never help), with a log.
    for junk in [json!("not json"), json!({"jobId": 5}), json!(null)] {
        let (status, body) = invoke(
            &handler,
            "ShardWorker",
            &service_bus_payload(&junk, json!(1)),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["Logs"].to_string().contains("not a shard message"),
            "{body}"
        );
    }
    // A message for a job that does not exist is done with.
    let ghost = json!({"jobId": "0123456789abcdef0123456789abcdef", "shard": 0});
    let (status, _) = invoke(
        &handler,
        "ShardWorker",
        &service_bus_payload(&ghost, json!(1)),
    )
    .await;
    assert_eq!(status, 200);

    // Kickoff errors come back as the HTTP output: an OperationOutcome with a 4xx.
    let missing_prefer = http_payload(
        "SystemExport",
        "GET",
        "/$export",
        json!({"Accept": ["application/fhir+json"]}),
        "",
    );
    let (status, body) = invoke(&handler, "SystemExport", &missing_prefer).await;
    assert_eq!(status, 200);
    let res = &body["Outputs"]["res"];
    assert_eq!(res["statusCode"], 400);
    let outcome: Value = serde_json::from_str(res["body"].as_str().unwrap()).unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(body["Outputs"]["shards"], json!([]));

    let (_, body) = invoke(
        &handler,
        "SystemExport",
        &http_payload(
            "SystemExport",
            "GET",
            "/$export?_type=Nonsense",
            kickoff_headers(),
            "",
        ),
    )
    .await;
    assert_eq!(body["Outputs"]["res"]["statusCode"], 400);
    assert!(body["Outputs"]["res"]["body"]
        .as_str()
        .unwrap()
        .contains("_type"));

    // A Group kickoff described only by route parameters (no Url), for an unknown group.
    let payload = json!({
        "Data": { "req": { "Method": "GET", "Query": "{}", "Headers": kickoff_headers(), "Params": {"id": "no-such-group"}, "Body": null } },
        "Metadata": { "sys": sys("GroupExport") }
    });
    let (_, body) = invoke(&handler, "GroupExport", &payload).await;
    assert_eq!(body["Outputs"]["res"]["statusCode"], 404, "{body}");

    // A POST kickoff with a Parameters body.
    let parameters = json!({"resourceType": "Parameters", "parameter": [{"name": "_type", "valueString": "Condition"}]});
    let (_, body) = invoke(
        &handler,
        "PatientExport",
        &http_payload(
            "PatientExport",
            "POST",
            "/Patient/$export",
            kickoff_headers(),
            &parameters.to_string(),
        ),
    )
    .await;
    assert_eq!(body["Outputs"]["res"]["statusCode"], 202, "{body}");
    assert_eq!(body["Outputs"]["shards"].as_array().unwrap().len(), 1);

    // A payload that is not JSON at all.
    let response = reqwest::Client::new()
        .post(format!("{}/ShardWorker", handler.base))
        .body("{{{")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A message naming no possible job is logged and dropped, not redelivered.
    let bad_id = json!({"jobId": "../../etc", "shard": 0});
    let (status, body) = invoke(
        &handler,
        "ShardWorker",
        &service_bus_payload(&bad_id, json!(1)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["Logs"].to_string().contains("not a job id"), "{body}");

    // On the handler's port, requests that are no invocation get a FHIR answer, never a 500: a
    // POST to a one-segment path, and a raw kickoff (kickoffs come as invocations), which records
    // nothing.
    let client = reqwest::Client::new();
    for (method, path) in [
        (reqwest::Method::POST, "/Patient"),
        (reqwest::Method::POST, "/metadata"),
        (reqwest::Method::GET, "/$export"),
        (reqwest::Method::POST, "/Patient/$export"),
    ] {
        let response = client
            .request(method.clone(), format!("{}{path}", handler.base))
            .header("Accept", "application/fhir+json")
            .header("Prefer", "respond-async")
            .body("{}")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let outcome: Value = response.json().await.unwrap();
        assert!(
            (400..500).contains(&status),
            "{method} {path}: {status} {outcome}"
        );
        assert_eq!(
            outcome["resourceType"], "OperationOutcome",
            "{method} {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_that_refuses_access_gives_an_operation_outcome() {
    azurite::require_azurite();
    let unsigned = format!("{}?sv=2021-08-06&sig=wrong", azurite::account_url());
    let handler = start_handler(&unsigned, &[]).await;
    let (status, body) = invoke(
        &handler,
        "SystemExport",
        &http_payload("SystemExport", "GET", "/$export", kickoff_headers(), ""),
    )
    .await;
    assert_eq!(status, 200);
    let res = &body["Outputs"]["res"];
    assert_eq!(res["statusCode"], 503, "{body}");
    let text = res["body"].as_str().unwrap();
    let outcome: Value = serde_json::from_str(text).unwrap();
    let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        diagnostics.contains("refused access") && diagnostics.contains("403"),
        "{diagnostics}"
    );
    assert!(!diagnostics.contains('<'), "raw XML: {diagnostics}");
    // The client is told to come back: a role assigned at deployment takes minutes to apply.
    assert_eq!(res["headers"]["retry-after"], "30", "{body}");
    assert!(
        diagnostics.contains("may not be in force yet"),
        "{diagnostics}"
    );

    let status = forwarded_status(&handler, "0123456789abcdef0123456789abcdef").await;
    assert_eq!(status.status(), 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_export_through_the_host_protocol_reads_a_stored_view_and_writes_csv_blobs() {
    let sas = azurite::sas_url();
    let handler = start_handler(&sas, &[]).await;
    let store = store(&sas);
    // A view stored in the views container, as a user uploads it, named by viewReference.
    let name = azurite::unique_container("patients");
    let view = json!({"resourceType": "ViewDefinition", "resource": "Patient", "status": "active",
        "select": [{"column": [{"name": "id", "path": "getResourceKey()"}, {"name": "gender", "path": "gender"}]}]});
    store
        .put(
            &format!("views/{name}.json"),
            view.to_string().into(),
            PutMode::Overwrite,
        )
        .await
        .unwrap();
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "view", "part": [{"name": "name", "valueString": "patients"},
            {"name": "viewReference", "valueReference": {"reference": format!("ViewDefinition/{name}")}}]},
        {"name": "_format", "valueCode": "csv"}]});
    let (id, sent) = kickoff_request(
        &handler,
        "ViewExport",
        "POST",
        "/$viewdefinition-export",
        &body.to_string(),
    )
    .await;
    let shards = plan(&handler, &sent).await;
    assert_eq!(shards.len(), 1, "one shard: one view over one type");
    run_shards(&handler, &shards).await;
    let done = forwarded_status(&handler, &id).await;
    assert_eq!(done.status(), 200);
    let manifest: Value = done.json().await.unwrap();
    assert_eq!(
        manifest["output"].as_array().unwrap().len(),
        1,
        "{manifest}"
    );
    let output = &manifest["output"][0];
    assert_eq!(output["name"], "patients");
    let path = blob_path(&output["url"]);
    assert!(path.ends_with(".csv"), "{path}");
    let text = blob_text(&store, path).await;
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    assert_eq!(lines.next(), Some("id,gender"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 100, "one row a patient of the sample");
    assert_eq!(output["count"], 100);
    assert!(rows
        .iter()
        .all(|row| row.ends_with(",male") || row.ends_with(",female")));

    // A reference to a view that is not stored is refused at kickoff, in the function's answer.
    let missing = json!({"resourceType": "Parameters", "parameter": [{"name": "view", "part": [
        {"name": "viewReference", "valueReference": {"reference": "ViewDefinition/not-stored"}}]}]});
    let payload = http_payload(
        "ViewExport",
        "POST",
        "/$viewdefinition-export",
        kickoff_headers(),
        &missing.to_string(),
    );
    let (status, answer) = invoke(&handler, "ViewExport", &payload).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["Outputs"]["res"]["statusCode"], 400, "{answer}");
    assert_eq!(answer["Outputs"]["shards"], json!([]), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_stu4_export_through_the_host_protocol_is_a_post_and_answers_the_stu4_manifest() {
    let sas = azurite::sas_url();
    let handler = start_handler(&sas, &[]).await;
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient"},
        {"name": "_maximumFileSize", "valuePositiveInt": 8192}]});
    let (id, sent) = kickoff_request(
        &handler,
        "PatientExportV4",
        "POST",
        "/Patient/$export-v4",
        &body.to_string(),
    )
    .await;
    run_shards(&handler, &plan(&handler, &sent).await).await;
    let done = forwarded_status(&handler, &id).await;
    assert_eq!(done.status(), 200);
    let manifest: Value = done.json().await.unwrap();
    assert_eq!(
        manifest["manifestType"],
        "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/BulkDataManifest"
    );
    assert!(manifest.get("request").is_none() && manifest.get("error").is_none());
    let store = store(&sas);
    let mut patients = 0;
    for output in manifest["output"].as_array().unwrap() {
        let path = blob_path(&output["url"]);
        let text = blob_text(&store, path).await;
        assert_eq!(output["fileSize"], text.len() as u64);
        assert!(text.len() <= 8192, "{path}: {} bytes", text.len());
        patients += text.lines().count();
    }
    assert_eq!(patients, 100);
    assert!(
        manifest["output"].as_array().unwrap().len() > 1,
        "rolled at 64 KiB"
    );

    // A GET is refused in the function's answer, and sends no work.
    let get = http_payload(
        "SystemExportV4",
        "GET",
        "/$export-v4",
        kickoff_headers(),
        "",
    );
    let (status, answer) = invoke(&handler, "SystemExportV4", &get).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["Outputs"]["res"]["statusCode"], 405, "{answer}");
    assert_eq!(answer["Outputs"]["shards"], json!([]), "{answer}");
}

#[test]
fn the_package_zip_has_the_layout_the_host_expects() {
    let dir = tempfile::tempdir().unwrap();
    let zip_path = dir.path().join("app.zip");
    let output = Command::new(env!("CARGO_BIN_EXE_handler"))
        .args(["package", "--out"])
        .arg(&zip_path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&zip_path).unwrap()).unwrap();

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut folders: Vec<String> = std::fs::read_dir(root.join("functions"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().join("function.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    let mut expected: Vec<String> = folders
        .iter()
        .map(|f| format!("{f}/function.json"))
        .collect();
    expected.extend(["handler".to_string(), "host.json".to_string()]);
    expected.sort();
    let mut names: Vec<String> = archive.file_names().map(str::to_string).collect();
    names.sort();
    assert_eq!(names, expected);

    let handler = archive.by_name("handler").unwrap();
    assert_eq!(
        handler.unix_mode().unwrap() & 0o777,
        0o755,
        "the binary must be executable"
    );
    assert_eq!(
        handler.size(),
        std::fs::metadata(env!("CARGO_BIN_EXE_handler"))
            .unwrap()
            .len()
    );
    drop(handler);
    let mut read = |name: &str| {
        let mut text = String::new();
        archive
            .by_name(name)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    };
    assert_eq!(
        read("host.json"),
        std::fs::read_to_string(root.join("host.json")).unwrap()
    );
    for folder in &folders {
        let entry = format!("{folder}/function.json");
        assert_eq!(
            read(&entry),
            std::fs::read_to_string(root.join("functions").join(&entry)).unwrap()
        );
    }

    // host.json: the custom handler, forwarding, no route prefix.
    let host: Value = serde_json::from_str(&read("host.json")).unwrap();
    assert_eq!(
        host["customHandler"]["description"]["defaultExecutablePath"],
        "handler"
    );
    assert_eq!(host["customHandler"]["enableForwardingHttpRequest"], true);
    assert_eq!(host["extensions"]["http"]["routePrefix"], "");

    // The names the handler answers to are the functions and bindings the host will call.
    let bindings = |folder: &str| -> Vec<Value> {
        let text =
            std::fs::read_to_string(root.join("functions").join(folder).join("function.json"))
                .unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["bindings"]
            .as_array()
            .unwrap()
            .clone()
    };
    let has = |bindings: &[Value], kind: &str, name: &str| {
        bindings
            .iter()
            .any(|b| b["type"] == kind && b["name"] == name)
    };
    for (function, route) in fhir_export::invoke::KICKOFF_FUNCTIONS {
        let b = bindings(function);
        assert!(
            b.iter()
                .any(|b| b["type"] == "httpTrigger" && b["route"] == route),
            "{function}"
        );
        assert!(has(&b, "http", "res"), "{function}");
        assert!(
            has(&b, "serviceBus", fhir_export::invoke::SHARDS_OUTPUT),
            "{function}"
        );
    }
    let worker = bindings(fhir_export::invoke::SHARD_WORKER);
    assert!(has(&worker, "serviceBusTrigger", "message"));
    assert!(has(
        &worker,
        "serviceBus",
        fhir_export::invoke::SHARDS_OUTPUT
    ));
    let sweeper = bindings(fhir_export::invoke::STALE_SWEEPER);
    assert!(has(&sweeper, "timerTrigger", "timer"));
    assert!(has(
        &sweeper,
        "serviceBus",
        fhir_export::invoke::SHARDS_OUTPUT
    ));
    // Service Bus only through the identity-based connection.
    for folder in &folders {
        for binding in bindings(folder) {
            if binding["type"].as_str().unwrap().starts_with("serviceBus") {
                assert_eq!(binding["connection"], "ServiceBusConnection", "{folder}");
                assert_eq!(binding["queueName"], "export-shards", "{folder}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_in_payload_and_forwarded_requests() {
    use common::tokens::{issuer, token, AUDIENCE};
    let (issuer, _) = issuer().await;
    let handler = start_handler(
        &azurite::sas_url(),
        &[
            ("EXPORT_AUTH_ISSUER", issuer.as_str()),
            ("EXPORT_AUTH_AUDIENCE", AUDIENCE),
        ],
    )
    .await;
    let container = azurite::unique_container("tokens");
    let path = format!("/$export?_type=Patient&_container={container}");

    // Payload mode: no token, a 401 and no work queued.
    let (_, refused) = invoke(
        &handler,
        "SystemExport",
        &http_payload("SystemExport", "GET", &path, kickoff_headers(), ""),
    )
    .await;
    assert_eq!(refused["Outputs"]["res"]["statusCode"], 401, "{refused}");
    assert_eq!(refused["Outputs"]["shards"], json!([]));

    let bearer = format!("Bearer {}", token(&issuer, json!({})));
    let mut headers = kickoff_headers();
    headers["Authorization"] = json!([bearer]);
    let (_, started) = invoke(
        &handler,
        "SystemExport",
        &http_payload("SystemExport", "GET", &path, headers, ""),
    )
    .await;
    assert_eq!(started["Outputs"]["res"]["statusCode"], 202, "{started}");
    let location = started["Outputs"]["res"]["headers"]["content-location"]
        .as_str()
        .unwrap();
    let id = location.rsplit('/').next().unwrap().to_string();
    let shards = started["Outputs"]["shards"].as_array().unwrap().clone();
    run_shards(&handler, &shards).await;

    // Forwarded mode: status and files need the token too.
    assert_eq!(forwarded_status(&handler, &id).await.status(), 401);
    let client = reqwest::Client::new();
    let with_token = |url: String| {
        client
            .get(url)
            .header("Authorization", &bearer)
            .header("Host", "fhir-export.example.net")
            .header("X-Forwarded-Proto", "https")
    };
    let done = with_token(format!("{}/_operations/export/{id}", handler.base))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let manifest: Value = done.json().await.unwrap();
    assert_eq!(manifest["requiresAccessToken"], true);
    let file = manifest["output"][0]["url"]
        .as_str()
        .unwrap()
        .replace(PUBLIC, &handler.base);
    let download = with_token(file.clone()).send().await.unwrap();
    assert_eq!(download.status(), 200);
    assert_eq!(download.text().await.unwrap().lines().count(), 100);
    let anonymous = client.get(&file).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let outcome: Value = anonymous.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
}

/// On a hierarchical-namespace account (ADLS Gen2, the deployment's default), whose flat listings
/// hold directories and which refuses to delete a directory before its contents: kickoffs in a
/// row, a whole export, cancel with `_container`, and retention all work, and leave no directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_hierarchical_namespace_kickoffs_exports_cancel_and_retention_work() {
    let url = common::hns::start(&azurite::sas_url()).await;
    let handler = start_handler(&url, &[("EXPORT_RETENTION_HOURS", "1")]).await;
    let store = Arc::new(AzureBlob::new(&url, None).unwrap());
    let (kept, cancelled) = (
        azurite::unique_container("hns-kept"),
        azurite::unique_container("hns-cancelled"),
    );

    let (first, first_shards) = kickoff(
        &handler,
        "SystemExport",
        &format!("/$export?_type=Patient&_container={kept}"),
    )
    .await;
    let (second, second_shards) =
        kickoff(&handler, "SystemExport", "/$export?_type=Organization").await;
    let (third, _) = kickoff(
        &handler,
        "PatientExport",
        &format!("/Patient/$export?_type=Patient&_container={cancelled}"),
    )
    .await;

    run_shards(&handler, &first_shards).await;
    let done = forwarded_status(&handler, &first).await;
    assert_eq!(done.status(), 200);
    let manifest: Value = done.json().await.unwrap();
    assert_eq!(manifest["output"][0]["count"], 100);
    assert_eq!(store.list(&kept).await.unwrap().len(), 1);

    let cancel = reqwest::Client::new()
        .delete(format!("{}/_operations/export/{third}", handler.base))
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), 202);
    assert_eq!(forwarded_status(&handler, &third).await.status(), 404);

    run_shards(&handler, &second_shards).await;
    assert_eq!(forwarded_status(&handler, &second).await.status(), 200);

    // Retention: both finished exports, made two hours old (the job and its ended marker), go,
    // their directories with them.
    let markers = store.list("fhir-export-jobs/ended").await.unwrap();
    for id in [&first, &second] {
        let path = format!("fhir-export-jobs/{id}/job.json");
        let (bytes, _) = store.get(&path).await.unwrap().unwrap();
        let mut job: Value = serde_json::from_slice(&bytes).unwrap();
        let two_hours_ago = chrono::Utc::now() - chrono::Duration::hours(2);
        job["completedAt"] = json!(two_hours_ago.to_rfc3339());
        let body = bytes::Bytes::from(job.to_string());
        store.put(&path, body, PutMode::Overwrite).await.unwrap();
        let marker = markers.iter().find(|m| m.ends_with(id.as_str())).unwrap();
        store.delete_prefix(marker).await.unwrap();
        let backdated = format!(
            "fhir-export-jobs/ended/{}-{id}",
            two_hours_ago.format("%Y%m%dT%H%M%S%.3fZ")
        );
        store
            .put(
                &backdated,
                bytes::Bytes::from_static(b"x"),
                PutMode::Overwrite,
            )
            .await
            .unwrap();
    }
    let (status, body) = invoke(&handler, "StaleSweeper", &timer_payload()).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["Logs"].to_string().contains("removed 2 expired"),
        "{body}"
    );
    assert_eq!(forwarded_status(&handler, &first).await.status(), 404);
    let (account, sas) = url.split_once('?').unwrap();
    for container in [&kept, &cancelled] {
        let listing = reqwest::get(format!(
            "{account}/{container}?restype=container&comp=list&include=metadata&{sas}"
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        assert!(!listing.contains("<Name>"), "{container}: {listing}");
    }
    for id in [&first, &second] {
        let documents = store.list(&format!("fhir-export-jobs/{id}")).await.unwrap();
        assert!(documents.is_empty(), "{documents:?}");
    }
}

/// Under the host the source is named, never defaulted, and in Azure never an embedded store (the
/// app's folder is the read-only package); logs go to stdout, which the host does not take for
/// errors.
#[test]
fn under_the_host_the_source_must_be_named_and_logs_go_to_stdout() {
    let run = |extra: &[(&str, &str)]| {
        let mut command = as_the_host_starts_it(common::free_port());
        command
            .env(
                "EXPORT_STORAGE",
                "http://127.0.0.1:9/devstoreaccount1?sv=x&sig=y",
            )
            .env("RUST_LOG", "info");
        for (name, value) in extra {
            command.env(name, value);
        }
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(700));
        let _ = child.kill();
        let output = child.wait_with_output().unwrap();
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (_, unnamed) = run(&[]);
    assert!(
        unnamed.contains("FHIR_SOURCE") && unnamed.contains("required"),
        "{unnamed}"
    );
    let store = format!("sqlite:{}", common::sample_store().display());
    let (_, in_azure) = run(&[("FHIR_SOURCE", &store), ("WEBSITE_INSTANCE_ID", "abc")]);
    assert!(in_azure.contains("cannot serve in Azure"), "{in_azure}");
    // In Azure, never open by default: access control, or EXPORT_AUTH=off said outright.
    let remote = [
        (
            "FHIR_SOURCE",
            "https://example.fhir.azurehealthcareapis.com",
        ),
        ("WEBSITE_INSTANCE_ID", "abc"),
    ];
    let (_, open) = run(&remote);
    assert!(
        open.contains("EXPORT_AUTH_ISSUER") && open.contains("EXPORT_AUTH=off"),
        "{open}"
    );
    let (stdout, _) = run(&[remote[0], remote[1], ("EXPORT_AUTH", "off")]);
    assert!(stdout.contains("custom handler listening"), "{stdout}");
    let (stdout, _) = run(&[
        remote[0],
        remote[1],
        (
            "EXPORT_AUTH_ISSUER",
            "https://login.microsoftonline.com/t/v2.0",
        ),
        (
            "EXPORT_AUTH_AUDIENCE",
            "3f0c2b7e-6a1d-4c59-9d1e-0b9f5f1a2c33,api://x",
        ),
    ]);
    assert!(stdout.contains("custom handler listening"), "{stdout}");
    let (_, contradiction) = run(&[
        remote[0],
        remote[1],
        ("EXPORT_AUTH", "off"),
        (
            "EXPORT_AUTH_ISSUER",
            "https://login.microsoftonline.com/t/v2.0",
        ),
        ("EXPORT_AUTH_AUDIENCE", "api://x"),
    ]);
    assert!(contradiction.contains("EXPORT_AUTH"), "{contradiction}");
    let (stdout, stderr) = run(&[("FHIR_SOURCE", &store)]);
    assert!(
        stdout.contains("custom handler listening"),
        "stdout: {stdout}"
    );
    assert!(stderr.is_empty(), "stderr: {stderr}");
}

/// One invocation that may find the handler dead (killed at a crash point): `None` then.
async fn try_invoke(handler: &Handler, function: &str, payload: &Value) -> Option<(u16, Value)> {
    let response = reqwest::Client::new()
        .post(format!("{}/{function}", handler.base))
        .json(payload)
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

/// The crash points an invocation passes, each killing the handler the Nth time it is reached.
const CRASH_POINTS: [&str; 6] = [
    "kickoff-planned@1",
    "shard-claimed@2",
    "file-committed@3",
    "shard-paused@2",
    "shard-done@2",
    "manifest-written@1",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_each_crash_point_an_export_on_blob_storage_ends_with_every_resource_once() {
    // It sweeps with a 1 s stale limit, as the sweeper tests do: one at a time.
    let _alone = SWEEPING.lock().await;
    let sas = azurite::sas_url();
    let blobs = store(&sas);
    let settings = [
        ("EXPORT_STALE_AFTER_SECS", "1"),
        ("EXPORT_RETRY_DELAY_SECS", "0.2"),
        ("EXPORT_FILE_MAX_BYTES", "65536"),
        // Shards pause and go on in continuations: a crash meets them mid-way too.
        ("EXPORT_SHARD_MAX_SECS", "0.05"),
    ];
    for point in CRASH_POINTS {
        let container = azurite::unique_container("crash");
        let mut crashing = settings.to_vec();
        crashing.push(("EXPORT_CRASH_AT", point));
        let mut handler = start_handler(&sas, &crashing).await;
        let (id, planning) = kickoff_unplanned(
            &handler,
            "SystemExport",
            &format!("/$export?_type=Patient,Condition,Encounter&_container={container}"),
        )
        .await;
        // The queue as Service Bus keeps it: a message whose invocation failed or died is
        // delivered again; what an invocation sent goes out only when it ended well.
        let mut queue: std::collections::VecDeque<Value> = planning.into();
        let mut killed = false;
        let mut rounds = 0;
        let manifest: Value = loop {
            while let Some(message) = queue.pop_front() {
                let payload = service_bus_payload(&Value::String(message.to_string()), json!(1));
                match try_invoke(&handler, "ShardWorker", &payload).await {
                    Some((200, body)) => queue.extend(
                        body["Outputs"]["shards"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .cloned(),
                    ),
                    Some(_) => queue.push_back(message),
                    None => {
                        killed = true;
                        handler = start_handler(&sas, &settings).await;
                        queue.push_back(message);
                    }
                }
            }
            let status = forwarded_status(&handler, &id).await;
            match status.status().as_u16() {
                200 => break status.json().await.unwrap(),
                202 => {}
                other => panic!("{point}: status {other}: {}", status.text().await.unwrap()),
            }
            rounds += 1;
            assert!(rounds < 20, "{point}: the export never ended");
            // What went silent, or has its retry due, or never completed: the sweeper's.
            tokio::time::sleep(Duration::from_millis(1_100)).await;
            let (status, body) = invoke(&handler, "StaleSweeper", &timer_payload()).await;
            assert_eq!(status, 200, "{body}");
            queue.extend(
                body["Outputs"]["shards"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|m| m["jobId"] == id.as_str())
                    .cloned(),
            );
        };
        assert!(killed, "{point} was never reached");

        // Every resource once, and no blob beside the manifest's.
        let mut listed = blobs.list(&container).await.unwrap();
        listed.sort();
        let mut named = Vec::new();
        let mut seen = HashSet::new();
        let mut lines = 0;
        for output in manifest["output"].as_array().unwrap() {
            let path = blob_path(&output["url"]).to_string();
            for line in blob_text(&blobs, &path).await.lines() {
                lines += 1;
                let resource: Value = serde_json::from_str(line).unwrap();
                seen.insert(format!("{}/{}", resource["resourceType"], resource["id"]));
            }
            named.push(path);
        }
        named.sort();
        assert_eq!(listed, named, "{point}: files beside the manifest's");
        let counts = common::sample_counts();
        let expected = counts["Patient"] + counts["Condition"] + counts["Encounter"];
        assert_eq!(
            (lines, seen.len()),
            (expected, expected),
            "{point}: every resource once"
        );
    }
}

/// A test certificate authority and a certificate for 127.0.0.1 it signed (openssl): (CA file,
/// certificate, key).
fn loopback_certificate(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (Debian's openssl package)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    std::fs::write(
        dir.join("leaf.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fhir-export test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.cnf",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

/// App Service's managed identity endpoint (`IDENTITY_ENDPOINT`, protocol 2019-08-01): a token for
/// the resource asked for, to a caller that sends `X-IDENTITY-HEADER`; tokens shaped as Entra ID
/// issues them to a managed identity (Azurite's OAuth reads `iss`, `aud`, `oid`, `tid`, the
/// times). Counts the tokens given.
async fn identity_endpoint(
    secret: &'static str,
    oid: &'static str,
) -> (String, Arc<std::sync::atomic::AtomicU64>) {
    use warp::Filter;
    let given = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/msi/token", listener.local_addr().unwrap());
    let counted = given.clone();
    let route = warp::path!("msi" / "token")
        .and(warp::header::optional::<String>("x-identity-header"))
        .and(warp::query::<HashMap<String, String>>())
        .map(move |header: Option<String>, query: HashMap<String, String>| {
            if header.as_deref() != Some(secret) || query.get("api-version").map(String::as_str) != Some("2019-08-01") {
                return warp::reply::with_status(
                    warp::reply::json(&json!({"error": "bad request"})),
                    warp::http::StatusCode::BAD_REQUEST,
                );
            }
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let resource = query["resource"].clone();
            let now = chrono::Utc::now().timestamp();
            let tid = "72f988bf-86f1-41af-91ab-2d7cd011db47";
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::default(),
                &json!({
                    "aud": resource, "iss": format!("https://sts.windows.net/{tid}/"),
                    "oid": oid, "tid": tid, "sub": oid, "iat": now, "nbf": now - 60, "exp": now + 3600,
                }),
                &jsonwebtoken::EncodingKey::from_secret(b"the stand-in's own key"),
            )
            .unwrap();
            warp::reply::with_status(
                warp::reply::json(&json!({
                    "access_token": token, "expires_on": (now + 3600).to_string(),
                    "resource": resource, "token_type": "Bearer",
                })),
                warp::http::StatusCode::OK,
            )
        });
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (url, given)
}

/// The identity chain as Azure runs it, on loopback: the handler gets its tokens through App
/// Service's managed identity protocol (a stand-in), writes an export to Azurite over HTTPS with
/// OAuth (a test certificate), fetches a user delegation key with that identity, and the manifest's
/// SAS URL downloads. An older host that sets only `MSI_ENDPOINT` is refused at start, naming what
/// is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_reaches_azurite_over_https_and_signs_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, certificate, key) = loopback_certificate(dir.path());
    let port = common::free_port();
    let azurite_bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/azurite/node_modules/.bin/azurite-blob");
    let mut azurite = Command::new(&azurite_bin)
        .args([
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
        ])
        .arg(dir.path().join("azurite"))
        .args([
            "--skipApiVersionCheck",
            "--silent",
            "--oauth",
            "basic",
            "--cert",
        ])
        .arg(&certificate)
        .arg("--key")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Azurite (npm ci --prefix tests/azurite)");
    struct Stop<'a>(&'a mut Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _azurite = Stop(&mut azurite);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (identity, tokens) =
        identity_endpoint("the-header-secret", "5e1c9a33-7d0e-4c8e-9a55-2f6a1b3c4d5e").await;
    let account_url = format!("https://127.0.0.1:{port}/devstoreaccount1");
    let ca_text = ca.to_str().unwrap().to_string();
    let handler = start_handler(
        &account_url,
        &[
            ("IDENTITY_ENDPOINT", &identity),
            ("IDENTITY_HEADER", "the-header-secret"),
            ("SSL_CERT_FILE", &ca_text),
            ("EXPORT_FILE_URLS", "sas"),
        ],
    )
    .await;
    let (id, shards) = kickoff(
        &handler,
        "SystemExport",
        "/$export?_type=Patient&_container=identity",
    )
    .await;
    run_shards(&handler, &shards).await;
    let done = forwarded_status(&handler, &id).await;
    let status = done.status();
    let manifest: Value = done.json().await.unwrap();
    assert_eq!(status, 200, "{manifest}");
    assert_eq!(manifest["requiresAccessToken"], false);
    let url = manifest["output"][0]["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{account_url}/identity/")),
        "{url}"
    );
    assert!(
        url.contains("skoid=5e1c9a33-7d0e-4c8e-9a55-2f6a1b3c4d5e"),
        "signed with the identity's key: {url}"
    );
    assert!(tokens.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let download = trusting.get(url).send().await.unwrap();
    assert_eq!(download.status(), 200);
    let body = download.bytes().await.unwrap();
    let text = match body.starts_with(&[0x1f, 0x8b]) {
        true => {
            let mut text = String::new();
            flate2::read::MultiGzDecoder::new(&body[..])
                .read_to_string(&mut text)
                .unwrap();
            text
        }
        false => String::from_utf8(body.to_vec()).unwrap(),
    };
    assert_eq!(text.lines().count(), common::sample_counts()["Patient"]);
    // A token without the identity is refused by the same account: the chain above is what wrote.
    let anonymous = trusting
        .get(format!(
            "{account_url}/identity?restype=container&comp=list"
        ))
        .send()
        .await
        .unwrap();
    assert!(
        anonymous.status().is_client_error(),
        "{}",
        anonymous.status()
    );

    // An older host: MSI_ENDPOINT alone.
    let mut older = as_the_host_starts_it(common::free_port());
    older
        .env(
            "FHIR_SOURCE",
            format!("sqlite:{}", common::sample_store().display()),
        )
        .env("EXPORT_STORAGE", &account_url)
        .env("MSI_ENDPOINT", "http://127.0.0.1:9/msi/token");
    let output = older.output().unwrap();
    let said = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(
        said.contains("MSI_ENDPOINT")
            && said.contains("IDENTITY_ENDPOINT")
            && said.contains("IDENTITY_HEADER"),
        "{said}"
    );
}
