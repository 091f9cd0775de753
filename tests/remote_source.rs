//! The remote FHIR source: instance A serves the sample (and answers FHIR read and search), instance
//! B exports from A over REST. Every export from B must hold exactly the resources of the same
//! export from A, also when a proxy between them answers some requests with 429 and 503.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{client, download_all, export, start, start_reading, Server};
use fhir_export::config::{SourceAuth, SourceSetting};
use serde_json::{json, Value};

async fn start_remote(source_base: &str) -> Server {
    start_remote_with(source_base, u64::MAX).await
}

async fn start_remote_with(source_base: &str, shard_max_resources: u64) -> Server {
    start_reading(&common::sample_store(), source_base, |settings| {
        settings.shard_max_resources = shard_max_resources;
    })
    .await
}

/// Every exported line, per type, sorted: the export's content regardless of file boundaries.
async fn contents(client: &reqwest::Client, manifest: &Value) -> BTreeMap<String, Vec<String>> {
    let mut per_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (resource_type, _, lines) in download_all(client, manifest).await {
        per_type.entry(resource_type).or_default().extend(lines);
    }
    for lines in per_type.values_mut() {
        lines.sort();
    }
    per_type
}

/// Exports `url` and returns its contents.
async fn exported(client: &reqwest::Client, url: &str) -> BTreeMap<String, Vec<String>> {
    contents(client, &export(client, url).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_through_the_remote_source_equal_exports_from_the_store() {
    let a = start(&common::sample_store(), |_| {}).await;
    let b = start_remote(&a.base).await;
    let client = client();
    let group_id = {
        let bundle: Value = common::get_json(&client, &format!("{}/Group", a.base)).await;
        bundle["entry"][0]["resource"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let kickoffs = [
        "/$export".to_string(),
        "/$export?_type=Patient,Condition,Device".to_string(),
        "/$export?_since=2019-06-01T00:00:00Z&_type=Observation,Encounter".to_string(),
        "/$export?_type=Observation&_typeFilter=Observation%3Fcategory%3Dlaboratory,Observation%3Fcode%3D8302-2".to_string(),
        "/$export?_type=Condition,Patient&_elements=id,code,gender".to_string(),
        "/Patient/$export?_type=Patient,Immunization,Claim".to_string(),
        format!("/Group/{group_id}/$export?_type=Patient,Encounter,Procedure"),
        format!("/Group/{group_id}/$export?_typeFilter=Condition%3Fclinical-status%3Dactive&_type=Condition"),
    ];
    for kickoff in &kickoffs {
        let from_store = exported(&client, &format!("{}{kickoff}", a.base)).await;
        let from_remote = exported(&client, &format!("{}{kickoff}", b.base)).await;
        assert!(!from_store.is_empty(), "{kickoff}: nothing exported");
        assert_eq!(
            from_store
                .iter()
                .map(|(t, l)| (t.clone(), l.len()))
                .collect::<Vec<_>>(),
            from_remote
                .iter()
                .map(|(t, l)| (t.clone(), l.len()))
                .collect::<Vec<_>>(),
            "{kickoff}: counts per type"
        );
        assert!(from_store == from_remote, "{kickoff}: contents differ");
    }

    // The `patient` parameter (POST) at Patient level.
    let patients: Value = common::get_json(&client, &format!("{}/Patient?_count=2", a.base)).await;
    let chosen: Vec<Value> = patients["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| json!({"name": "patient", "valueReference": {"reference": format!("Patient/{}", e["resource"]["id"].as_str().unwrap())}}))
        .collect();
    let mut parameter = chosen.clone();
    parameter.push(json!({"name": "_type", "valueString": "Patient,Observation,Condition"}));
    let body = json!({"resourceType": "Parameters", "parameter": parameter});
    let from_store = contents(
        &client,
        &common::post_export(
            &client,
            &format!("{}/Patient/$export", a.base),
            body.clone(),
        )
        .await,
    )
    .await;
    let from_remote = contents(
        &client,
        &common::post_export(&client, &format!("{}/Patient/$export", b.base), body).await,
    )
    .await;
    assert_eq!(from_store["Patient"].len(), 2);
    assert!(
        from_store == from_remote,
        "patient parameter: contents differ"
    );
}

/// A searchset page's `next` link.
fn next_link(page: &Value) -> Option<String> {
    page["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .map(|l| l["url"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhir_read_and_search_answer_like_a_fhir_server() {
    let a = start(&common::sample_store(), |_| {}).await;
    let client = client();

    // Paging: _count per page, next links until the end, every Condition once.
    let mut url = Some(format!("{}/Condition?_count=250", a.base));
    let mut ids = std::collections::HashSet::new();
    let mut pages = 0;
    while let Some(next) = url.take() {
        let page: Value = common::get_json(&client, &next).await;
        assert_eq!(page["resourceType"], "Bundle");
        assert_eq!(page["type"], "searchset");
        for entry in page["entry"].as_array().into_iter().flatten() {
            assert_eq!(entry["resource"]["resourceType"], "Condition");
            assert!(ids.insert(entry["resource"]["id"].as_str().unwrap().to_string()));
            assert!(entry["fullUrl"]
                .as_str()
                .unwrap()
                .ends_with(entry["resource"]["id"].as_str().unwrap()));
        }
        url = next_link(&page);
        pages += 1;
    }
    assert_eq!(ids.len(), common::sample_counts()["Condition"]);
    assert_eq!(pages, common::sample_counts()["Condition"].div_ceil(250));

    // _summary=count, with search parameters and _lastUpdated bounds.
    let count = |query: String| {
        let client = client.clone();
        async move {
            let page: Value = common::get_json(&client, &query).await;
            page["total"].as_u64().unwrap()
        }
    };
    let observations = common::sample_counts()["Observation"] as u64;
    assert_eq!(
        count(format!("{}/Observation?_summary=count", a.base)).await,
        observations
    );
    let lab = count(format!(
        "{}/Observation?_summary=count&category=laboratory",
        a.base
    ))
    .await;
    assert!(lab > 0 && lab < observations);
    let before = count(format!(
        "{}/Observation?_summary=count&_lastUpdated=le2019-01-01T00:00:00Z",
        a.base
    ))
    .await;
    let after = count(format!(
        "{}/Observation?_summary=count&_lastUpdated=gt2019-01-01T00:00:00Z",
        a.base
    ))
    .await;
    assert_eq!(before + after, observations);

    // Read, compartment search, and clear refusals.
    let some_id = ids.iter().next().unwrap();
    let read: Value = common::get_json(&client, &format!("{}/Condition/{some_id}", a.base)).await;
    assert_eq!(read["id"], some_id.as_str());
    let patient = read["subject"]["reference"]
        .as_str()
        .unwrap()
        .trim_start_matches("Patient/")
        .to_string();
    let compartment: Value = common::get_json(
        &client,
        &format!("{}/Patient/{patient}/Condition?_count=1000", a.base),
    )
    .await;
    let entries = compartment["entry"].as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["resource"]["id"] == some_id.as_str()));
    assert!(entries
        .iter()
        .all(|e| e["resource"]["subject"]["reference"] == format!("Patient/{patient}").as_str()));
    for (url, status, parameter) in [
        (format!("{}/Condition/no-such-id", a.base), 404, None),
        (
            format!("{}/Condition?_count=0", a.base),
            400,
            Some("_count"),
        ),
        (format!("{}/Condition?bogus=1", a.base), 400, Some("bogus")),
        (
            format!("{}/Condition?_summary=data", a.base),
            400,
            Some("_summary"),
        ),
        (
            format!("{}/Condition?_cursor=..%2Fx", a.base),
            400,
            Some("_cursor"),
        ),
    ] {
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), status, "{url}");
        let outcome: Value = response.json().await.unwrap();
        assert_eq!(outcome["resourceType"], "OperationOutcome", "{url}");
        if let Some(parameter) = parameter {
            assert!(outcome.to_string().contains(parameter), "{url}: {outcome}");
        }
    }
    let metadata: Value = common::get_json(&client, &format!("{}/metadata", a.base)).await;
    let declared = metadata["rest"][0]["resource"].as_array().unwrap();
    assert!(declared.iter().any(|r| r["type"] == "Group"));
    assert!(
        declared.len() > 140,
        "every R4 type is readable and searchable"
    );
}

/// A proxy in front of A that answers a request with the status `fault` gives it (with
/// `Retry-After: 0`), or else forwards it; counts the faults.
async fn proxy(
    target: String,
    fault: impl Fn(u64, &str, &str) -> Option<u16> + Clone + Send + Sync + 'static,
) -> (String, Arc<AtomicU64>) {
    rewriting_proxy(target, fault, |_, _, body| body).await
}

/// As `proxy`, and each answer's body passes through `rewrite` (path, query, body).
async fn rewriting_proxy(
    target: String,
    fault: impl Fn(u64, &str, &str) -> Option<u16> + Clone + Send + Sync + 'static,
    rewrite: impl Fn(&str, &str, Vec<u8>) -> Vec<u8> + Clone + Send + Sync + 'static,
) -> (String, Arc<AtomicU64>) {
    use warp::Filter;
    let faults = Arc::new(AtomicU64::new(0));
    let counter = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let upstream = reqwest::Client::new();
    let route = {
        let (faults, address) = (faults.clone(), address.clone());
        warp::path::full()
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .then(move |path: warp::path::FullPath, query: String| {
                let (faults, counter, upstream, target, address, fault, rewrite) = (
                    faults.clone(),
                    counter.clone(),
                    upstream.clone(),
                    target.clone(),
                    address.clone(),
                    fault.clone(),
                    rewrite.clone(),
                );
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let mut response = warp::http::Response::builder();
                    if let Some(status) = fault(n, path.as_str(), &query) {
                        faults.fetch_add(1, Ordering::SeqCst);
                        return response
                            .status(status)
                            .header("Retry-After", "0")
                            .body(b"{}".to_vec())
                            .unwrap();
                    }
                    let url = match query.is_empty() {
                        true => format!("{target}{}", path.as_str()),
                        false => format!("{target}{}?{query}", path.as_str()),
                    };
                    let answer = upstream
                        .get(url)
                        .header("X-Forwarded-Host", &address)
                        .send()
                        .await
                        .unwrap();
                    response = response.status(answer.status().as_u16());
                    let body = answer.bytes().await.unwrap().to_vec();
                    response.body(rewrite(path.as_str(), &query, body)).unwrap()
                }
            })
    };
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (format!("http://{address}"), faults)
}

/// Every fourth request answered 429, the one two later 503.
async fn faulty_proxy(target: String) -> (String, Arc<AtomicU64>) {
    proxy(target, |n, _, _| match n % 4 {
        1 => Some(429),
        3 => Some(503),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_server_errors_lose_nothing_and_duplicate_nothing() {
    let a = start(&common::sample_store(), |_| {}).await;
    let (proxy, faults) = faulty_proxy(a.base.clone()).await;
    let b = start_remote(&proxy).await;
    let client = client();
    let manifest = export(&client, &format!("{}/$export", b.base)).await;
    let everything = contents(&client, &manifest).await;
    let mut seen = std::collections::HashSet::new();
    for lines in everything.values() {
        for line in lines {
            let resource: Value = serde_json::from_str(line).unwrap();
            assert!(
                seen.insert(format!("{}/{}", resource["resourceType"], resource["id"])),
                "twice: {line:.80}"
            );
        }
    }
    let stored = common::stored_resources(&common::sample_store());
    assert_eq!(seen.len(), stored.len(), "every resource exactly once");
    let patient_level = exported(
        &client,
        &format!("{}/Patient/$export?_type=Patient,Procedure", b.base),
    )
    .await;
    let direct = exported(
        &client,
        &format!("{}/Patient/$export?_type=Patient,Procedure", a.base),
    )
    .await;
    assert!(patient_level == direct);
    assert!(
        faults.load(Ordering::SeqCst) > 50,
        "the proxy injected {} faults",
        faults.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_shard_fails_its_export_at_the_restart_cap_and_the_queue_drains() {
    let a = start(&common::sample_store(), |_| {}).await;
    // Condition pages always fail; its count probe (planning) passes.
    let (proxy, faults) = proxy(a.base.clone(), |_, path, query| {
        (path == "/Condition" && !query.contains("_summary=count")).then_some(500)
    })
    .await;
    let b = start_reading(&common::sample_store(), &proxy, |settings| {
        settings.max_attempts = 3;
    })
    .await;
    let client = client();
    let status_url = common::started(
        &client,
        &format!("{}/$export?_type=Patient,Condition", b.base),
    )
    .await;
    let failed =
        common::wait_for_end(&client, &status_url, std::time::Duration::from_secs(120)).await;
    assert_eq!(failed.status(), 500, "the export fails");
    let outcome: Value = failed.json().await.unwrap();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    let text = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(text.contains("(Condition) failed 3 times"), "{text}");
    // Each attempt retried its page 8 times after the first try: 3 attempts, 27 requests.
    let at_failure = faults.load(Ordering::SeqCst);
    assert_eq!(at_failure, 27);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        faults.load(Ordering::SeqCst),
        at_failure,
        "work went on after the failure"
    );
    assert_eq!(client.get(&status_url).send().await.unwrap().status(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_refuses_gives_a_failed_export_naming_it() {
    let client = client();
    // A server that answers everything with 401.
    use warp::Filter;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let refuse = warp::any().map(|| {
        warp::http::Response::builder()
            .status(401)
            .body(r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"login","diagnostics":"token missing"}]}"#.to_string())
            .unwrap()
    });
    tokio::spawn(warp::serve(refuse).incoming(listener).run());
    // Refusals are waited out for 2 s here (10 minutes by default), then final.
    let url = format!("http://{address}");
    let b = start_reading(&common::sample_store(), &url, |settings| {
        settings.access_wait = std::time::Duration::from_secs(2);
    })
    .await;
    // The kickoff answers at once; planning meets the refusal, and the status URL tells it.
    let status_url = common::started(&client, &format!("{}/$export", b.base)).await;
    let response =
        common::wait_for_end(&client, &status_url, std::time::Duration::from_secs(30)).await;
    let status = response.status().as_u16();
    let outcome: Value = response.json().await.unwrap();
    assert_eq!(status, 502, "{outcome}");
    let text = outcome.to_string();
    assert!(
        text.contains("refused access (401") && text.contains("token missing"),
        "{text}"
    );
    assert!(
        text.contains("FHIR Data Reader") && text.contains("was refused for 2 s"),
        "{text}"
    );

    // With `Prefer: separate-export-status` the poll itself succeeds: 200, and the export's 502
    // in `X-Export-Status`, with the same OperationOutcome.
    let url = format!("{}/$export", b.base);
    let response =
        common::kickoff_preferring(&client, &url, "respond-async, separate-export-status").await;
    assert_eq!(response.status(), 202);
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let answer = loop {
        let answer = client.get(&status_url).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        if answer.headers()["x-export-status"] != "202" {
            break answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(answer.headers()["x-export-status"], "502");
    let outcome: Value = answer.json().await.unwrap();
    assert!(outcome.to_string().contains("token missing"), "{outcome}");
}

/// A store loaded from NDJSON holds each type together, which an export reads in storage order;
/// a search's pages still follow id order from the first page, so that `next` links continue
/// where the page ended (a first page in storage order and the rest in id order repeated 57
/// Conditions of the stand-in sample and lost 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_pages_of_a_type_stored_together_hold_each_resource_once_in_id_order() {
    let dir = tempfile::tempdir().unwrap();
    let summary = fhir_export::generate::write_ndjson(60, 3, &dir.path().join("data")).unwrap();
    let store_path = dir.path().join("together.db");
    let store = fhir_export::source::EmbeddedStore::open(&store_path).unwrap();
    fhir_export::source::import::import(&store, &[dir.path().join("data")]).unwrap();
    let server = start(&store_path, |_| {}).await;
    let client = client();
    let mut url = Some(format!("{}/Observation?_count=50", server.base));
    let mut ids = Vec::new();
    while let Some(next) = url.take() {
        let page: Value = common::get_json(&client, &next).await;
        for entry in page["entry"].as_array().into_iter().flatten() {
            ids.push(entry["resource"]["id"].as_str().unwrap().to_string());
        }
        url = next_link(&page);
    }
    let mut in_id_order = ids.clone();
    in_id_order.sort();
    in_id_order.dedup();
    assert_eq!(ids, in_id_order, "each once, in id order");
    assert_eq!(ids.len() as u64, summary.counts["Observation"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_type_is_split_into_lastupdated_ranges_read_in_parallel() {
    // Generated data: its lastUpdated instants spread over ten years (the sample's share one).
    let dir = tempfile::tempdir().unwrap();
    fhir_export::generate::write_ndjson(400, 7, &dir.path().join("data")).unwrap();
    let store_path = dir.path().join("generated.db");
    let store = fhir_export::source::EmbeddedStore::open(&store_path).unwrap();
    fhir_export::source::import::import(&store, &[dir.path().join("data")]).unwrap();
    let a = start(&store_path, |_| {}).await;
    let b = start_reading(&store_path, &a.base, |settings| {
        settings.shard_max_resources = 1_000;
    })
    .await;
    let client = client();
    let kickoff = "/$export?_type=Observation,Patient&_since=2010-01-01T00:00:00Z";
    let manifest = export(&client, &format!("{}{kickoff}", b.base)).await;
    let mut parts = std::collections::BTreeSet::new();
    for output in manifest["output"].as_array().unwrap() {
        let url = output["url"].as_str().unwrap();
        let name = url.rsplit('/').next().unwrap();
        if output["type"] == "Observation" {
            // Observation-{part}-{n}.ndjson
            let pieces: Vec<&str> = name.trim_end_matches(".ndjson").split('-').collect();
            assert_eq!(pieces.len(), 3, "{name}");
            parts.insert(pieces[1].parse::<u32>().unwrap());
            assert!(
                output["count"].as_u64().unwrap() <= 1_000,
                "{name}: {}",
                output["count"]
            );
        } else {
            assert_eq!(name, "Patient-1.ndjson");
        }
    }
    assert!(parts.len() >= 3, "Observation split into {parts:?}");
    assert_eq!(
        parts.iter().copied().collect::<Vec<_>>(),
        (1..=parts.len() as u32).collect::<Vec<_>>()
    );
    let from_remote = contents(&client, &manifest).await;
    let from_store = exported(&client, &format!("{}{kickoff}", a.base)).await;
    assert!(from_store == from_remote, "the split export differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_tokens_are_fetched_once_and_sent_with_every_request() {
    use warp::Filter;
    let a = start(&common::sample_store(), |_| {}).await;
    let token_calls = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let token = {
        let calls = token_calls.clone();
        warp::post()
            .and(warp::path("token"))
            .and(warp::body::form())
            .map(move |form: std::collections::HashMap<String, String>| {
                calls.fetch_add(1, Ordering::SeqCst);
                let good = form.get("grant_type").map(String::as_str) == Some("client_credentials")
                    && form.get("client_id").map(String::as_str) == Some("exporter")
                    && form.get("client_secret").map(String::as_str) == Some("s3cret");
                let status = if good { 200 } else { 401 };
                warp::http::Response::builder()
                    .status(status)
                    .body(
                        br#"{"access_token":"token-1","token_type":"Bearer","expires_in":3600}"#
                            .to_vec(),
                    )
                    .unwrap()
            })
    };
    // The FHIR server: A behind a check of the bearer token.
    let (upstream, target, forwarded_host) =
        (reqwest::Client::new(), a.base.clone(), address.clone());
    let fhir = warp::get()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("authorization"))
        .then(
            move |path: warp::path::FullPath, query: String, authorization: Option<String>| {
                let (upstream, target, host) =
                    (upstream.clone(), target.clone(), forwarded_host.clone());
                async move {
                    if authorization.as_deref() != Some("Bearer token-1") {
                        return warp::http::Response::builder()
                            .status(401)
                            .body(Vec::new())
                            .unwrap();
                    }
                    let url = format!("{target}{}?{query}", path.as_str());
                    let answer = upstream
                        .get(url)
                        .header("X-Forwarded-Host", host)
                        .send()
                        .await
                        .unwrap();
                    warp::http::Response::builder()
                        .status(answer.status().as_u16())
                        .body(answer.bytes().await.unwrap().to_vec())
                        .unwrap()
                }
            },
        );
    tokio::spawn(warp::serve(token.or(fhir).unify()).incoming(listener).run());

    let url = format!("http://{address}");
    let token_url = format!("http://{address}/token");
    let b = start(&common::sample_store(), move |settings| {
        settings.source = SourceSetting::Remote {
            url,
            auth: SourceAuth::ClientCredentials {
                token_url,
                client_id: "exporter".into(),
                client_secret: "s3cret".into(),
                scope: "system/*.read".into(),
            },
        };
    })
    .await;
    let client = client();
    let through_b = exported(
        &client,
        &format!("{}/$export?_type=Patient,Condition", b.base),
    )
    .await;
    let direct = exported(
        &client,
        &format!("{}/$export?_type=Patient,Condition", a.base),
    )
    .await;
    assert!(through_b == direct);
    assert_eq!(
        token_calls.load(Ordering::SeqCst),
        1,
        "the token is cached until it nears expiry"
    );
}

/// Rewrites a search Bundle's JSON; other bodies pass as they are.
fn bundle_rewrite(body: Vec<u8>, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    match serde_json::from_slice::<Value>(&body) {
        Ok(mut bundle) if bundle["resourceType"] == "Bundle" => {
            edit(&mut bundle);
            serde_json::to_vec(&bundle).unwrap()
        }
        _ => body,
    }
}

/// Servers page in ways of their own. A last page without `next` although more remain fails the
/// export visibly (before: 200 with pages missing); relative `next` links are followed; a resource
/// shown on two pages is exported once; ids go out with `-` as it is (not `%2D`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_quirks_of_other_servers_never_lose_or_duplicate_silently() {
    let a = start(&common::sample_store(), |_| {}).await;
    let client = client();
    let direct = exported(
        &client,
        &format!("{}/$export?_type=Observation,Patient", a.base),
    )
    .await;

    // Relative next links, the first entry of every page after the first repeated on the next
    // page, and every path recorded.
    let paths = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let recorded = paths.clone();
    let (quirky, _) = rewriting_proxy(
        a.base.clone(),
        move |_, path, query| {
            recorded.lock().unwrap().push(format!("{path}?{query}"));
            None
        },
        |_, _, body| {
            bundle_rewrite(body, |bundle| {
                if let Some(links) = bundle["link"].as_array_mut() {
                    for link in links {
                        if let Some(url) = link["url"].as_str() {
                            let relative = url.splitn(4, '/').nth(3).map(|rest| format!("/{rest}"));
                            if let Some(relative) = relative {
                                link["url"] = relative.into();
                            }
                        }
                    }
                }
                if let Some(entries) = bundle["entry"].as_array_mut() {
                    if let Some(first) = entries.first().cloned() {
                        entries.push(first);
                    }
                }
            })
        },
    )
    .await;
    let b = start_remote(&quirky).await;
    let through = exported(
        &client,
        &format!("{}/$export?_type=Observation,Patient", b.base),
    )
    .await;
    // Compared as JSON values: the proxy's own rewrite re-spells numbers (`1.50` as `1.5`).
    let values = |export: &BTreeMap<String, Vec<String>>| {
        let mut all: Vec<Value> = export
            .values()
            .flatten()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        all.sort_by_key(|v| format!("{}/{}", v["resourceType"], v["id"]));
        all
    };
    let (through, direct) = (values(&through), values(&direct));
    assert_eq!(through.len(), direct.len(), "each resource once");
    assert!(through == direct, "the same resources");
    let group = format!("{}/Patient/$export?_type=Patient", b.base);
    let _ = exported(&client, &group).await;
    let sent = paths.lock().unwrap().clone();
    assert!(
        sent.iter().any(|p| p.contains('-')),
        "ids with - were requested"
    );
    assert!(
        !sent.iter().any(|p| p.contains("%2D")),
        "- is never escaped"
    );

    // The second page of Observations comes without its next link: a short read, refused.
    let (cut, _) = rewriting_proxy(
        a.base.clone(),
        |_, _, _| None,
        |path, query, body| {
            let second_page = path.ends_with("/Observation") && query.contains("_cursor");
            bundle_rewrite(body, |bundle| {
                if second_page {
                    bundle["link"] = json!([]);
                }
            })
        },
    )
    .await;
    let c = start_remote(&cut).await;
    let status_url =
        common::started(&client, &format!("{}/$export?_type=Observation", c.base)).await;
    let answer =
        common::wait_for_end(&client, &status_url, std::time::Duration::from_secs(120)).await;
    assert_eq!(
        answer.status(),
        500,
        "a short read is never a complete export"
    );
    let outcome: Value = answer.json().await.unwrap();
    let diagnostics = outcome["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(
        diagnostics.contains("pages were incomplete"),
        "{diagnostics}"
    );
}

/// `_typeFilter` criteria that servers evaluate differently (string parameters, modifiers such as
/// `:text`) are not sent to the server but checked here alone: a server that finds nothing for
/// `code:text` still gives the export every match (before: 0 of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_filters_a_server_may_read_differently_are_checked_here_alone() {
    let a = start(&common::sample_store(), |_| {}).await;
    let (differs, _) = rewriting_proxy(
        a.base.clone(),
        |_, _, _| None,
        |_, query, body| match query.contains("%3Atext") || query.contains(":text") {
            true => {
                br#"{"resourceType":"Bundle","type":"searchset","total":0,"entry":[]}"#.to_vec()
            }
            false => body,
        },
    )
    .await;
    let b = start_remote(&differs).await;
    let client = client();
    let filter = "_type=Observation,Patient&_typeFilter=Observation%3Fcode%3Atext%3Dglucose,Observation%3Fstatus%3Dcancelled,Patient%3Fgender%3Dfemale";
    let direct = exported(&client, &format!("{}/$export?{filter}", a.base)).await;
    let through = exported(&client, &format!("{}/$export?{filter}", b.base)).await;
    let observations = direct.get("Observation").map_or(0, Vec::len);
    assert!(observations > 0, "the filter matches something");
    assert_eq!(through.get("Observation").map_or(0, Vec::len), observations);
    assert!(through == direct);
}

/// The first export after a deployment: the FHIR source refuses (403) while the app's new role
/// assignment propagates, then answers. The refusals are waited out, the status poll says so, and
/// the export completes with every resource once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_while_a_role_propagates_are_waited_out() {
    let a = start(&common::sample_store(), |_| {}).await;
    let opened = std::time::Instant::now();
    let (address, refused) = proxy(a.base.clone(), move |_, _, _| {
        (opened.elapsed() < std::time::Duration::from_secs(4)).then_some(403)
    })
    .await;
    let b = start_remote(&address).await;
    let client = client();
    let status_url = common::started(&client, &format!("{}/$export", b.base)).await;
    let mut waiting = None;
    let manifest = loop {
        let answer = client.get(&status_url).send().await.unwrap();
        match answer.status().as_u16() {
            202 => {
                let progress = answer.headers()["x-progress"].to_str().unwrap().to_string();
                if progress.contains("waiting for access") {
                    waiting = Some(progress);
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            200 => break answer.json::<Value>().await.unwrap(),
            other => panic!("status {other}: {}", answer.text().await.unwrap()),
        }
    };
    let waiting = waiting.expect("X-Progress said what the export waits for");
    assert!(waiting.contains("403"), "{waiting}");
    assert!(refused.load(Ordering::SeqCst) >= 1);
    let got = contents(&client, &manifest).await;
    let expected = exported(&client, &format!("{}/$export", a.base)).await;
    assert_eq!(got, expected, "every resource once");
    assert_eq!(
        got.values().map(Vec::len).sum::<usize>(),
        common::sample_counts().values().sum::<usize>()
    );
}

/// A stand-in for Azure Health Data Services' sorting (microsoft/fhir-server): one `_sort` key at
/// most; with `Prefer: handling=strict` more is a 400, under its default lenient handling the whole
/// `_sort` is dropped with a warning entry and the answer is a 200. `honours_strict: false` plays a
/// server that ignores the header. Counts (strict requests seen, warnings given, 400s given).
async fn fhir_server_sorting(
    target: String,
    honours_strict: bool,
) -> (String, Arc<[AtomicU64; 3]>) {
    use warp::Filter;
    let seen = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let upstream = reqwest::Client::new();
    let route = {
        let (seen, address) = (seen.clone(), address.clone());
        warp::path::full()
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .and(warp::header::optional::<String>("prefer"))
            .then(move |path: warp::path::FullPath, query: String, prefer: Option<String>| {
                let (seen, upstream, target, address) =
                    (seen.clone(), upstream.clone(), target.clone(), address.clone());
                async move {
                    let strict = prefer.is_some_and(|p| p.contains("handling=strict"));
                    if strict {
                        seen[0].fetch_add(1, Ordering::SeqCst);
                    }
                    let multi_key = form_urlencoded::parse(query.as_bytes())
                        .any(|(name, value)| name == "_sort" && value.contains(','));
                    let mut warn = false;
                    let mut query = query;
                    if multi_key && strict && honours_strict {
                        seen[2].fetch_add(1, Ordering::SeqCst);
                        return warp::http::Response::builder()
                            .status(400)
                            .body(br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"Sorting by more than one parameter is not supported."}]}"#.to_vec())
                            .unwrap();
                    }
                    if multi_key {
                        warn = true;
                        seen[1].fetch_add(1, Ordering::SeqCst);
                        query = form_urlencoded::Serializer::new(String::new())
                            .extend_pairs(
                                form_urlencoded::parse(query.as_bytes()).filter(|(n, _)| n != "_sort"),
                            )
                            .finish();
                    }
                    let url = format!("{target}{}?{query}", path.as_str());
                    let answer = upstream
                        .get(url)
                        .header("X-Forwarded-Host", &address)
                        .send()
                        .await
                        .unwrap();
                    let status = answer.status().as_u16();
                    let mut body = answer.bytes().await.unwrap().to_vec();
                    if warn {
                        let mut bundle: Value = serde_json::from_slice(&body).unwrap();
                        bundle["entry"].as_array_mut().unwrap().push(json!({
                            "resource": {"resourceType": "OperationOutcome", "issue": [{
                                "severity": "warning", "code": "not-supported",
                                "diagnostics": "Sorting by more than one parameter is not supported; the _sort parameter was ignored.",
                            }]},
                            "search": {"mode": "outcome"},
                        }));
                        body = serde_json::to_vec(&bundle).unwrap();
                    }
                    warp::http::Response::builder().status(status).body(body).unwrap()
                }
            })
    };
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (format!("http://{address}"), seen)
}

/// Searches ask for strict handling; a sort refused by a 400 or dropped with a warning steps down
/// to one key, and the export equals the store's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sort_the_server_drops_with_a_warning_is_a_refusal_too() {
    let a = start(&common::sample_store(), |_| {}).await;
    let client = client();
    let expected = exported(
        &client,
        &format!("{}/$export?_type=Patient,Condition", a.base),
    )
    .await;
    for honours_strict in [true, false] {
        let (address, seen) = fhir_server_sorting(a.base.clone(), honours_strict).await;
        let b = start_remote(&address).await;
        let got = exported(
            &client,
            &format!("{}/$export?_type=Patient,Condition", b.base),
        )
        .await;
        assert_eq!(got, expected, "honours strict: {honours_strict}");
        assert!(
            seen[0].load(Ordering::SeqCst) > 0,
            "Prefer: handling=strict sent"
        );
        match honours_strict {
            true => {
                assert!(seen[2].load(Ordering::SeqCst) >= 1 && seen[1].load(Ordering::SeqCst) == 0)
            }
            false => assert!(seen[1].load(Ordering::SeqCst) >= 1),
        }
    }
}
