//! `cargo bench --bench load`: status polling under load. `wrk` (Debian package `wrk`) hammers
//! the status URL of a finished export, first on an idle service, then while exports run back to
//! back; prints requests/s, latency percentiles and any non-200 answer.
//!
//! `LOAD_SECONDS` sets each phase's length (default 10), `LOAD_PATIENTS` the demo population
//! (default 2000).

#[path = "../common/mod.rs"]
mod common;
#[path = "support.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::Serve;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kicks off a system export and waits for it; returns the status URL.
async fn export(client: &reqwest::Client, base: &str) -> String {
    let response = common::kickoff(client, &format!("{base}/$export")).await;
    assert_eq!(response.status(), 202);
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    common::wait_for_manifest(client, &status_url).await;
    status_url
}

async fn text_of(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

struct WrkFigures {
    requests_per_second: f64,
    p50: String,
    p99: String,
    max: String,
    requests: u64,
    not_ok: u64,
}

fn wrk(url: &str, seconds: u64) -> WrkFigures {
    let output = Command::new("wrk")
        .args(["-t2", "-c8", "--latency", "-d"])
        .arg(format!("{seconds}s"))
        .arg(url)
        .output()
        .expect("wrk runs");
    assert!(output.status.success(), "wrk failed");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let field = |prefix: &str, index: usize| {
        text.lines()
            .map(str::trim)
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.split_whitespace().nth(index))
            .unwrap_or("?")
            .to_string()
    };
    WrkFigures {
        requests_per_second: field("Requests/sec:", 1).parse().unwrap_or(0.0),
        p50: field("50%", 1),
        p99: field("99%", 1),
        max: field("Latency", 3),
        requests: text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        not_ok: field("Non-2xx or 3xx responses:", 4).parse().unwrap_or(0),
    }
}

/// Runs wrk on a blocking thread while this runtime goes on.
async fn wrk_beside(url: &str, seconds: u64) -> WrkFigures {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || wrk(&url, seconds))
        .await
        .unwrap()
}

fn print(phase: &str, figures: &WrkFigures) {
    println!(
        "{phase:<34} {:>8.0} req/s  p50 {:>8}  p99 {:>8}  max {:>8}  {} requests, {} not 200",
        figures.requests_per_second,
        figures.p50,
        figures.p99,
        figures.max,
        figures.requests,
        figures.not_ok
    );
}

#[tokio::main]
async fn main() {
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("the load bench needs wrk: apt-get install wrk");
        std::process::exit(2);
    }
    let seconds = setting("LOAD_SECONDS", 10);
    let patients = setting("LOAD_PATIENTS", 2000);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = dir.path().join("store.db");
    let handler = env!("CARGO_BIN_EXE_handler");
    let run = |args: &[&str]| {
        let status = Command::new(handler)
            .args(args)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "{args:?}");
    };
    let path = |p: &Path| p.to_str().unwrap().to_string();
    run(&[
        "generate",
        "--patients",
        &patients.to_string(),
        "--out",
        &path(&data),
    ]);
    run(&["import", &path(&data), "--store", &path(&store)]);

    let port = common::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _serve = Serve(
        Command::new(handler)
            .args([
                "serve",
                "--port",
                &port.to_string(),
                "--store",
                &path(&store),
            ])
            .arg("--exports")
            .arg(dir.path().join("exports"))
            .env("RUST_LOG", "warn,warp::server=off")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(format!("{base}/metadata")).send().await.is_err() {
        assert!(Instant::now() < deadline, "the service did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let status_url = export(&client, &base).await;
    println!(
        "load: {patients} patients, one system export {:.2} s; wrk -t2 -c8 for {seconds} s per phase on {status_url}",
        started.elapsed().as_secs_f64()
    );
    let manifest = text_of(&client, &status_url).await;

    let idle = wrk_beside(&status_url, seconds).await;
    print("status of a finished export, idle", &idle);

    let running = Arc::new(AtomicBool::new(true));
    let exports_done = Arc::new(AtomicU64::new(0));
    let background = {
        let (running, done, base) = (running.clone(), exports_done.clone(), base.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while running.load(Ordering::SeqCst) {
                export(&client, &base).await;
                done.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let busy = wrk_beside(&status_url, seconds).await;
    running.store(false, Ordering::SeqCst);
    background.await.unwrap();
    print("status while exports run", &busy);
    println!(
        "{} exports completed during the busy phase",
        exports_done.load(Ordering::SeqCst)
    );
    let after = text_of(&client, &status_url).await;
    assert_eq!(after, manifest, "the manifest changed under load");
}
