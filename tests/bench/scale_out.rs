//! `cargo bench --bench scale_out`: one export run by K handler processes (K = 1, 2, 4, 8) in
//! custom-handler mode, fed through the host's invocation protocol from one shared queue
//! (Azurite's Queue service), writing to Azurite's Blob service through a counting proxy.
//!
//! Prints per K: export seconds, resources/s, storage requests per shard, compare-and-swap
//! conflicts, the most writes any one blob received, and whether every resource was exported
//! exactly once. `BENCH_COPIES` (default 10) sizes the data (copies of the Synthea sample, or of
//! generated data without `../shared`); `BENCH_SHARD_MAX` (default 3000) the shards;
//! `BENCH_INSTANCES` (default `1,2,4,8`) the K; `BENCH_CALLS` (default 2, host.json's `maxConcurrentCalls`) the
//! invocations each instance runs at once. Also printed: the CPU seconds Azurite's blob service and the handlers
//! spent, which tell where a 2-core machine's time goes. Needs `npm ci --prefix tests/azurite` (as `tests/run.sh` does).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};
use warp::http::{HeaderMap, Method, Response};
use warp::Filter;

/// Azurite's well-known account, and its SAS signing.
#[allow(dead_code)]
#[path = "../common/azurite.rs"]
mod azurite;

use azurite::account_sas;
#[path = "support.rs"]
mod support;

use support::{free_port, handler, Serve};

const ACCOUNT: &str = "devstoreaccount1";
const PUBLIC: &str = "https://fhir-export.example.net";

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, inside parentheses).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |n: usize| {
        fields
            .get(n)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn run(mut command: Command) {
    let status = command.stdout(Stdio::null()).status().unwrap();
    assert!(status.success(), "{command:?} failed");
}

/// Starts one of Azurite's services; returns it and its port.
fn azurite(service: &str, location: &Path) -> (Serve, u16) {
    let port = free_port();
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/azurite/node_modules/.bin")
        .join(format!("azurite-{service}"));
    assert!(
        bin.exists(),
        "{} is missing: npm ci --prefix tests/azurite",
        bin.display()
    );
    let child = Serve(
        Command::new(bin)
            .args([
                &format!("--{service}Host"),
                "127.0.0.1",
                &format!("--{service}Port"),
                &port.to_string(),
                "--location",
                location.to_str().unwrap(),
                "--skipApiVersionCheck",
                "--silent",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (child, port);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("azurite-{service} did not start");
}

/// What the blob proxy counted.
#[derive(Default)]
struct Counts {
    requests: AtomicUsize,
    /// Answers 412 or 409 to a conditional write: a compare-and-swap that met another writer
    /// (or a create-only write that found the object).
    conflicts: AtomicUsize,
    /// Committed writes (Put Blob, Put Block List) per blob.
    writes: Mutex<HashMap<String, usize>>,
}

impl Counts {
    fn reset(&self) {
        self.requests.store(0, Ordering::SeqCst);
        self.conflicts.store(0, Ordering::SeqCst);
        self.writes.lock().unwrap().clear();
    }
}

/// A loopback proxy in front of Azurite's blob service that counts what passes.
async fn counting_proxy(upstream_port: u16, counts: Arc<Counts>) -> u16 {
    let client = reqwest::Client::new();
    let routes = warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .then(
            move |method: Method,
                  path: warp::path::FullPath,
                  query: String,
                  headers: HeaderMap,
                  body: Bytes| {
                let (client, counts) = (client.clone(), counts.clone());
                async move {
                    let path = path.as_str().to_string();
                    let url = match query.is_empty() {
                        true => format!("http://127.0.0.1:{upstream_port}{path}"),
                        false => format!("http://127.0.0.1:{upstream_port}{path}?{query}"),
                    };
                    let commit = method == Method::PUT
                        && !query.contains("restype=container")
                        && (!query.contains("comp=") || query.contains("comp=blocklist"));
                    let empty = body.is_empty();
                    let mut request = client.request(method.clone(), url).body(body);
                    for (name, value) in &headers {
                        if name != "host" && name != "content-length" {
                            request = request.header(name, value);
                        }
                    }
                    if empty && method == Method::PUT {
                        request = request.header("content-length", "0");
                    }
                    let answer = request.send().await.expect("Azurite answers");
                    counts.requests.fetch_add(1, Ordering::SeqCst);
                    let status = answer.status();
                    if status == 412 || status == 409 {
                        counts.conflicts.fetch_add(1, Ordering::SeqCst);
                    }
                    if commit && status.is_success() {
                        *counts.writes.lock().unwrap().entry(path).or_default() += 1;
                    }
                    let mut response = Response::builder().status(status);
                    for (name, value) in answer.headers() {
                        if name != "content-length" && name != "transfer-encoding" {
                            response = response.header(name, value);
                        }
                    }
                    let body = answer.bytes().await.unwrap_or_default();
                    response.body(body).unwrap()
                }
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(warp::serve(routes).incoming(listener).run());
    port
}

/// Azurite's Queue service over REST: the shared queue the instances take messages from.
#[derive(Clone)]
struct Queue {
    client: reqwest::Client,
    url: String,
    sas: String,
}

/// The text of an XML element (Azurite's answers are flat and unescaped where read here).
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = xml[start..].find(&format!("</{name}>"))? + start;
    Some(&xml[start..end])
}

impl Queue {
    async fn create(&self) {
        let answer = self
            .client
            .put(format!("{}?{}", self.url, self.sas))
            .header("content-length", "0")
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
    }

    async fn send(&self, message: &Value) {
        let text = base64::engine::general_purpose::STANDARD.encode(message.to_string());
        let body = format!("<QueueMessage><MessageText>{text}</MessageText></QueueMessage>");
        let answer = self
            .client
            .post(format!("{}/messages?{}", self.url, self.sas))
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{}", answer.status());
    }

    /// One message, hidden from others for 5 minutes: (message, id, pop receipt, delivery count).
    async fn receive(&self) -> Option<(Value, String, String, u64)> {
        let answer = self
            .client
            .get(format!(
                "{}/messages?numofmessages=1&visibilitytimeout=300&{}",
                self.url, self.sas
            ))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let text = element(&answer, "MessageText")?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(text)
            .unwrap();
        Some((
            serde_json::from_slice(&decoded).unwrap(),
            element(&answer, "MessageId")?.to_string(),
            element(&answer, "PopReceipt")?.to_string(),
            element(&answer, "DequeueCount")?.parse().unwrap_or(1),
        ))
    }

    async fn delete(&self, id: &str, receipt: &str) {
        let receipt: String = form_urlencoded::byte_serialize(receipt.as_bytes()).collect();
        self.client
            .delete(format!(
                "{}/messages/{id}?popreceipt={receipt}&{}",
                self.url, self.sas
            ))
            .send()
            .await
            .unwrap();
    }
}

fn sys(function: &str) -> Value {
    json!({
        "MethodName": function,
        "UtcNow": chrono::Utc::now().to_rfc3339(),
        "RandGuid": uuid::Uuid::new_v4().to_string(),
    })
}

async fn invoke(client: &reqwest::Client, base: &str, function: &str, payload: &Value) -> Value {
    let response = client
        .post(format!("{base}/{function}"))
        .json(payload)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{function}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

/// Starts K handlers in custom-handler mode on the store and the proxied blob account.
async fn handlers(k: usize, store: &Path, storage: &str, shard_max: u64) -> Vec<(Serve, String)> {
    let mut started = Vec::new();
    for _ in 0..k {
        let port = free_port();
        let child = handler()
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FHIR_SOURCE", format!("sqlite:{}", store.display()))
            .env("EXPORT_STORAGE", storage)
            .env("EXPORT_SHARD_MAX_RESOURCES", shard_max.to_string())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        started.push((Serve(child), format!("http://127.0.0.1:{port}")));
    }
    let client = reqwest::Client::new();
    for (_, base) in &started {
        let mut up = false;
        for _ in 0..200 {
            if client.get(format!("{base}/")).send().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up, "a handler did not start");
    }
    started
}

/// One instance's share of the work: `calls` invocations at once, each taking a message from the
/// queue, running it, sending its outputs, and deleting it; until `finished`.
async fn instance(base: String, queue: Queue, calls: usize, finished: Arc<AtomicBool>) {
    let client = reqwest::Client::new();
    let mut runs = Vec::new();
    for _ in 0..calls {
        let (client, base, queue, finished) = (
            client.clone(),
            base.clone(),
            queue.clone(),
            finished.clone(),
        );
        runs.push(tokio::spawn(async move {
            while !finished.load(Ordering::SeqCst) {
                let Some((message, id, receipt, deliveries)) = queue.receive().await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let payload = json!({
                    "Data": { "message": Value::String(message.to_string()) },
                    "Metadata": {
                        "DeliveryCount": deliveries,
                        "MessageId": id,
                        "EnqueuedTimeUtc": chrono::Utc::now().to_rfc3339(),
                        "sys": sys("ShardWorker"),
                    }
                });
                let body = invoke(&client, &base, "ShardWorker", &payload).await;
                for sent in body["Outputs"]["shards"].as_array().into_iter().flatten() {
                    queue.send(sent).await;
                }
                queue.delete(&id, &receipt).await;
            }
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
}

struct Run {
    seconds: f64,
    /// CPU seconds the handlers used.
    handler_cpu: f64,
    kickoff_ms: f64,
    shards: usize,
    resources: usize,
    exactly_once: bool,
}

/// One export by K instances: kickoff on the first, then every instance takes from the queue.
async fn export(
    k: usize,
    calls: usize,
    store: &Path,
    storage: &str,
    blob: &str,
    queue: &Queue,
    shard_max: u64,
) -> Run {
    let instances = handlers(k, store, storage, shard_max).await;
    let client = reqwest::Client::new();
    let container = format!("bench{}", uuid::Uuid::new_v4().simple());
    let url = format!("{PUBLIC}/$export?_container={container}");
    let query: HashMap<String, String> = HashMap::from([("_container".into(), container.clone())]);
    let payload = json!({
        "Data": { "req": {
            "Url": url, "Method": "GET", "Query": query, "Params": {}, "Body": "",
            "Headers": {
                "Accept": ["application/fhir+json"],
                "Prefer": ["respond-async"],
                "Host": ["fhir-export.example.net"],
            },
        } },
        "Metadata": { "sys": sys("SystemExport") }
    });
    let started = Instant::now();
    let body = invoke(&client, &instances[0].1, "SystemExport", &payload).await;
    let kickoff_ms = started.elapsed().as_secs_f64() * 1000.0;
    let location = body["Outputs"]["res"]["headers"]["content-location"]
        .as_str()
        .unwrap()
        .to_string();
    let id = location.rsplit('/').next().unwrap().to_string();
    for message in body["Outputs"]["shards"].as_array().unwrap() {
        queue.send(message).await;
    }
    let finished = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = instances
        .iter()
        .map(|(_, base)| {
            tokio::spawn(instance(
                base.clone(),
                queue.clone(),
                calls,
                finished.clone(),
            ))
        })
        .collect();
    let manifest: Value = loop {
        let status = client
            .get(format!("{}/_operations/export/{id}", instances[0].1))
            .header("Host", "fhir-export.example.net")
            .header("X-Forwarded-Proto", "https")
            .send()
            .await
            .unwrap();
        match status.status().as_u16() {
            202 => tokio::time::sleep(Duration::from_millis(100)).await,
            200 => break status.json().await.unwrap(),
            other => panic!("status {other}: {}", status.text().await.unwrap()),
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let handler_cpu = instances
        .iter()
        .map(|(child, _)| cpu_seconds(child.0.id()))
        .sum();
    finished.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    let job: Value = {
        let path = format!("{blob}/fhir-export-jobs/{id}/job.json?{}", account_sas("b"));
        client.get(path).send().await.unwrap().json().await.unwrap()
    };
    // Every resource once: read back straight from Azurite.
    let mut seen = HashSet::new();
    let mut lines = 0;
    for file in manifest["output"].as_array().unwrap() {
        let path = file["url"]
            .as_str()
            .unwrap()
            .strip_prefix(&format!("{PUBLIC}/_exports/"))
            .unwrap();
        let text = client
            .get(format!("{blob}/{path}?{}", account_sas("b")))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for line in text.lines() {
            lines += 1;
            let resource: Value = serde_json::from_str(line).unwrap();
            seen.insert(format!("{}/{}", resource["resourceType"], resource["id"]));
        }
    }
    Run {
        seconds,
        handler_cpu,
        kickoff_ms,
        shards: job["shards"].as_array().unwrap().len(),
        resources: lines,
        exactly_once: lines == seen.len(),
    }
}

fn data(scratch: &Path, copies: u32) -> (PathBuf, usize) {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/synthea-r4-100-bulk-data-server/bundles");
    let source = if sample.is_dir() {
        sample
    } else {
        let generated = scratch.join("generated");
        run({
            let mut c = handler();
            c.args([
                "generate",
                "--patients",
                "100",
                "--out",
                generated.to_str().unwrap(),
            ]);
            c
        });
        generated
    };
    let synthesized = scratch.join("data");
    run({
        let mut c = handler();
        c.args([
            "synth",
            "--from",
            source.to_str().unwrap(),
            "--copies",
            &copies.to_string(),
            "--out",
            synthesized.to_str().unwrap(),
        ]);
        c
    });
    let store = scratch.join("store.db");
    run({
        let mut c = handler();
        c.args([
            "import",
            synthesized.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
        ]);
        c
    });
    std::fs::remove_dir_all(&synthesized).unwrap();
    let count = fhir_export::source::EmbeddedStore::open(&store)
        .unwrap()
        .stored_resources()
        .unwrap() as usize;
    (store, count)
}

fn main() {
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let copies: u32 = env("BENCH_COPIES", "10").parse().expect("BENCH_COPIES");
    let shard_max: u64 = env("BENCH_SHARD_MAX", "3000")
        .parse()
        .expect("BENCH_SHARD_MAX");
    let calls: usize = env("BENCH_CALLS", "2").parse().expect("BENCH_CALLS");
    let ks: Vec<usize> = env("BENCH_INSTANCES", "1,2,4,8")
        .split(',')
        .map(|k| k.trim().parse().expect("BENCH_INSTANCES: numbers"))
        .collect();
    let scratch = tempfile::tempdir().unwrap();
    let (store, total) = data(scratch.path(), copies);
    println!("{copies}x: {total} resources; shards of at most {shard_max}; {calls} invocations at once per instance");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (blob_service, blob_port) = azurite("blob", &scratch.path().join("blob"));
        let (_queue, queue_port) = azurite("queue", &scratch.path().join("queue"));
        let counts = Arc::new(Counts::default());
        let proxy = counting_proxy(blob_port, counts.clone()).await;
        let storage = format!("http://127.0.0.1:{proxy}/{ACCOUNT}?{}", account_sas("b"));
        let blob = format!("http://127.0.0.1:{blob_port}/{ACCOUNT}");
        println!(
            "{:>2} {:>8} {:>10} {:>11} {:>6} {:>12} {:>10} {:>15} {:>13} {:>11} {:>12} {:>12}",
            "K",
            "export s",
            "resources",
            "resources/s",
            "shards",
            "requests/sh",
            "conflicts",
            "most writes",
            "exactly once",
            "kickoff ms",
            "azurite cpu",
            "handler cpu"
        );
        for k in ks {
            let queue = Queue {
                client: reqwest::Client::new(),
                url: format!("http://127.0.0.1:{queue_port}/{ACCOUNT}/shards{k}"),
                sas: account_sas("q"),
            };
            queue.create().await;
            counts.reset();
            let azurite_before = cpu_seconds(blob_service.0.id());
            let run = export(k, calls, &store, &storage, &blob, &queue, shard_max).await;
            let most = counts
                .writes
                .lock()
                .unwrap()
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(path, n)| {
                    let path = path.replace("%2F", "/");
                    let tail: Vec<&str> = path.rsplit('/').take(2).collect();
                    (*n, format!("{}/{}", tail[1], tail[0]))
                })
                .unwrap_or_default();
            println!(
                "{k:>2} {:>8.2} {:>10} {:>11.0} {:>6} {:>12.1} {:>10} {:>15} {:>13} {:>11.1} {:>12.1} {:>12.1}",
                run.seconds,
                run.resources,
                run.resources as f64 / run.seconds,
                run.shards,
                counts.requests.load(Ordering::SeqCst) as f64 / run.shards as f64,
                counts.conflicts.load(Ordering::SeqCst),
                format!("{} ({})", most.0, most.1),
                match (run.exactly_once, run.resources == total) {
                    (true, true) => "yes".to_string(),
                    _ => format!("NO: {} of {total}", run.resources),
                },
                run.kickoff_ms,
                cpu_seconds(blob_service.0.id()) - azurite_before,
                run.handler_cpu,
            );
        }
    });
}
