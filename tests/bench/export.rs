//! `cargo bench`: import and export figures at 1x, 10x and 100x the Synthea sample (made with
//! `handler synth`), next to the time `cat` takes to copy the exported bytes on the same disk; then
//! every file downloaded over HTTP, plain and gzip-compressed; then the export organized by patient
//! (`organizeOutputBy=Patient`, resource blocks); then the export de-identified with the HIPAA Safe
//! Harbor sample of Microsoft's anonymizer (`_anonymizationConfig`), in a service of its own so that
//! its peak memory is its own.
//!
//! `BENCH_COPIES=1,10` picks the sizes (default `1,10,100`); `BENCH_DIR` the scratch folder
//! (default a temp folder; 100x needs about 15 GB). Without `../shared` the source is generated data.

#[path = "support.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{handler, peak_rss_mb, start_serve};

/// The small exports started while measuring must not meet the limit of running exports.
const UNLIMITED: &[&str] = &["--max-running-exports", "10000"];

/// Runs a command to completion; returns (seconds, peak RSS in MB, stdout). The child is reaped
/// with `wait4`, which gives its exact end and its own peak RSS, rather than polling it.
#[allow(clippy::zombie_processes)] // reaped by wait4, which `Child` does not know of
fn run_measured(mut command: Command) -> (f64, f64, String) {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
        text
    });
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 fills it and the status for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        reaped > 0 && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{command:?} failed"
    );
    (
        seconds,
        usage.ru_maxrss as f64 / 1024.0,
        reader.join().unwrap(),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Figures {
    resources: u64,
    bytes: u64,
    seconds: f64,
    kickoff_ms: f64,
    status_p99_ms: f64,
    status_samples: usize,
    /// Kickoffs of small exports (`_type=Patient&_since=` the export's start) made while it runs.
    busy_kickoff_p99_ms: f64,
    busy_kickoffs: usize,
    files: Vec<PathBuf>,
    urls: Vec<String>,
}

async fn export(base: &str, exports: &Path, query: &str) -> Figures {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let response = client
        .get(format!("{base}/$export{query}"))
        .header("Accept", "application/fhir+json")
        .header("Prefer", "respond-async")
        .send()
        .await
        .unwrap();
    let kickoff_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(response.status(), 202);
    let status_url = response.headers()["content-location"]
        .to_str()
        .unwrap()
        .to_string();
    let small_export = format!(
        "{base}/$export?_type=Patient&_since={}",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let mut latencies = Vec::new();
    let mut kickoffs = Vec::new();
    let manifest: serde_json::Value = loop {
        let asked = Instant::now();
        let response = client.get(&status_url).send().await.unwrap();
        latencies.push(asked.elapsed().as_secs_f64() * 1000.0);
        if response.status() == 200 {
            break response.json().await.unwrap();
        }
        if latencies.len() % 2 == 1 {
            let asked = Instant::now();
            let response = client
                .get(&small_export)
                .header("Accept", "application/fhir+json")
                .header("Prefer", "respond-async")
                .send()
                .await
                .unwrap();
            kickoffs.push(asked.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(response.status(), 202);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    kickoffs.sort_by(f64::total_cmp);
    let mut files = Vec::new();
    let mut urls = Vec::new();
    let (mut resources, mut bytes) = (0, 0);
    for output in manifest["output"].as_array().unwrap() {
        resources += output["count"].as_u64().unwrap();
        let url = output["url"].as_str().unwrap();
        urls.push(url.to_string());
        let path = exports.join(url.split("/_exports/").nth(1).unwrap());
        bytes += std::fs::metadata(&path).unwrap().len();
        files.push(path);
    }
    Figures {
        resources,
        bytes,
        seconds,
        kickoff_ms,
        status_p99_ms: percentile(&latencies, 0.99),
        status_samples: latencies.len(),
        busy_kickoff_p99_ms: percentile(&kickoffs, 0.99),
        busy_kickoffs: kickoffs.len(),
        files,
        urls,
    }
}

/// Downloads every file of the export over HTTP, one after another, plain or asking for gzip:
/// the bytes on the wire and the seconds.
async fn download_all(urls: &[String], gzip: bool) -> (u64, f64) {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut bytes = 0;
    for url in urls {
        let mut request = client.get(url);
        if gzip {
            request = request.header("accept-encoding", "gzip");
        }
        let mut response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers().contains_key("content-encoding"), gzip);
        while let Some(chunk) = response.chunk().await.unwrap() {
            bytes += chunk.len() as u64;
        }
    }
    (bytes, started.elapsed().as_secs_f64())
}

/// Writes every dirty page to disk, so that a measured step does not pay for the writeback of the
/// step before it.
fn settle() {
    assert!(Command::new("sync").status().unwrap().success());
}

/// Seconds `cat` takes to copy the files into one file in `dir`.
fn cat_seconds(files: &[PathBuf], dir: &Path) -> f64 {
    let target = dir.join("cat-copy.ndjson");
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cat \"$@\" > {} && sync {}",
            target.display(),
            target.display()
        ))
        .arg("cat")
        .args(files)
        .status()
        .unwrap();
    assert!(status.success());
    let seconds = started.elapsed().as_secs_f64();
    std::fs::remove_file(target).unwrap();
    seconds
}

/// The HIPAA Safe Harbor sample configuration of Microsoft's anonymizer (from `../shared`), or,
/// without it, a configuration with the same kinds of rules.
fn hipaa_config() -> Vec<u8> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/anonymization-corpus/configs/r4-configuration-sample.json");
    std::fs::read(corpus).unwrap_or_else(|_| {
        br#"{"fhirPathRules":[
            {"path":"nodesByType('Extension')","method":"redact"},
            {"path":"Resource.id","method":"cryptoHash"},
            {"path":"nodesByType('Reference').reference","method":"cryptoHash"},
            {"path":"nodesByType('date')","method":"dateShift"},
            {"path":"nodesByType('dateTime')","method":"dateShift"},
            {"path":"nodesByType('instant')","method":"dateShift"},
            {"path":"nodesByType('HumanName')","method":"redact"},
            {"path":"nodesByType('Address')","method":"redact"},
            {"path":"nodesByType('Identifier')","method":"redact"},
            {"path":"nodesByType('ContactPoint')","method":"redact"},
            {"path":"nodesByType('Narrative')","method":"redact"},
            {"path":"nodesByType('Annotation')","method":"redact"}
        ],"parameters":{"dateShiftKey":"123","cryptoHashKey":"123",
            "enablePartialDatesForRedact":true,"enablePartialZipCodesForRedact":true}}"#
            .to_vec()
    })
}

fn main() {
    let copies: Vec<u32> = std::env::var("BENCH_COPIES")
        .unwrap_or_else(|_| "1,10,100".into())
        .split(',')
        .map(|c| c.trim().parse().expect("BENCH_COPIES: numbers"))
        .collect();
    let scratch_parent =
        std::env::var("BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    std::fs::create_dir_all(&scratch_parent).expect("BENCH_DIR: a folder that can be made");
    let scratch = tempfile::tempdir_in(scratch_parent).unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/synthea-r4-100-bulk-data-server/bundles");
    let source = if sample.is_dir() {
        sample
    } else {
        let generated = scratch.path().join("generated");
        run_measured({
            let mut c = handler();
            c.args([
                "generate",
                "--patients",
                "1000",
                "--out",
                generated.to_str().unwrap(),
            ]);
            c
        });
        generated
    };
    println!("source: {}", source.display());
    println!(
        "{:>6} {:>10} {:>8} | {:>8} {:>9} {:>8} {:>9} | {:>8} {:>9} {:>7} {:>7} {:>6} {:>8} {:>9} {:>10} {:>10}",
        "copies",
        "resources",
        "MB",
        "import s",
        "import/s",
        "imp RSS",
        "reload/s",
        "export s",
        "export/s",
        "MB/s",
        "cat s",
        "ratio",
        "serve RSS",
        "kickoff ms",
        "status p99",
        "kick p99"
    );
    // One thread for the client: its requests are sequential, and a multi-threaded client would
    // add a wake-up between its own threads to every latency it measures on the busy cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut downloads = Vec::new();
    let mut organized = Vec::new();
    let mut compressed = Vec::new();
    let mut deidentified = Vec::new();
    let hipaa = hipaa_config();
    for n in copies {
        let dir = scratch.path().join(format!("x{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("data");
        run_measured({
            let mut c = handler();
            c.args([
                "synth",
                "--from",
                source.to_str().unwrap(),
                "--copies",
                &n.to_string(),
                "--out",
                data.to_str().unwrap(),
            ]);
            c
        });
        let store = dir.join("store.db");
        settle();
        let import = || {
            let mut c = handler();
            c.args([
                "import",
                data.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
            ]);
            c
        };
        let (import_s, import_rss, _) = run_measured(import());
        settle();
        // The same files again: every resource is found stored and unchanged.
        let (reload_s, _, _) = run_measured(import());
        std::fs::remove_dir_all(&data).unwrap();
        settle();

        let exports = dir.join("exports");
        let (serve, base) = start_serve(&store, &exports, UNLIMITED);
        let figures = runtime.block_on(export(&base, &exports, ""));
        let serve_rss = peak_rss_mb(serve.0.id());
        let plain = runtime.block_on(download_all(&figures.urls, false));
        let gzip = runtime.block_on(download_all(&figures.urls, true));
        downloads.push((n, plain, gzip));
        // The first organized export makes the store's indexes by patient (once per store); then
        // plain and organized in turn, three times each, every one after the disk settled: the
        // medians are what each later export takes.
        settle();
        let first = runtime.block_on(export(&base, &exports, "?organizeOutputBy=Patient"));
        let (mut plain_runs, mut organized_runs) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            settle();
            plain_runs.push(runtime.block_on(export(&base, &exports, "")).seconds);
            settle();
            organized_runs.push(runtime.block_on(export(
                &base,
                &exports,
                "?organizeOutputBy=Patient",
            )));
        }
        plain_runs.sort_by(f64::total_cmp);
        organized_runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        let blocks = organized_runs.swap_remove(1);
        let rss = peak_rss_mb(serve.0.id());
        organized.push((n, first.seconds, plain_runs[1], blocks, rss));
        drop(serve);
        settle();
        // The same export with files stored gzip-compressed.
        let gzip_exports = dir.join("exports-gzip");
        let (serve, gzip_base) = start_serve(
            &store,
            &gzip_exports,
            &[UNLIMITED, &["--compression", "gzip"]].concat(),
        );
        let stored = runtime.block_on(export(&gzip_base, &gzip_exports, ""));
        let stored_plain = runtime.block_on(download_all(&stored.urls, false));
        let stored_gzip = runtime.block_on(download_all(&stored.urls, true));
        compressed.push((
            n,
            figures.seconds,
            stored.seconds,
            stored.bytes,
            stored_plain,
            stored_gzip,
        ));
        drop(serve);
        settle();
        let deid_exports = dir.join("exports-deid");
        let config_dir = deid_exports.join("anonymization");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::write(config_dir.join("hipaa.json"), &hipaa).unwrap();
        let (serve, deid_base) = start_serve(&store, &deid_exports, UNLIMITED);
        let deid = runtime.block_on(export(
            &deid_base,
            &deid_exports,
            "?_container=deid&_anonymizationConfig=hipaa.json",
        ));
        deidentified.push((
            n,
            figures.seconds,
            deid.resources,
            deid.seconds,
            peak_rss_mb(serve.0.id()),
        ));
        drop(serve);
        settle();
        let cat_s = cat_seconds(&figures.files, &dir);
        let mb = figures.bytes as f64 / 1e6;
        println!(
            "{:>6} {:>10} {:>8.0} | {:>8.2} {:>9.0} {:>8.0} {:>9.0} | {:>8.2} {:>9.0} {:>7.0} {:>7.2} {:>6.2} {:>8.0} {:>9.1} {:>7.1} ({}) {:>5.1} ({})",
            n,
            figures.resources,
            mb,
            import_s,
            figures.resources as f64 / import_s,
            import_rss,
            figures.resources as f64 / reload_s,
            figures.seconds,
            figures.resources as f64 / figures.seconds,
            mb / figures.seconds,
            cat_s,
            figures.seconds / cat_s,
            serve_rss,
            figures.kickoff_ms,
            figures.status_p99_ms,
            figures.status_samples,
            figures.busy_kickoff_p99_ms,
            figures.busy_kickoffs,
        );
        std::io::stdout().flush().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
    println!("reload/s: the same files imported again into the store they filled (all unchanged);");
    println!("RSS in MB (peak); ratio = export time / cat time of the same bytes; status p99 in ms over (n) polls during the export;");
    println!("kick p99 in ms over (n) kickoffs of a small export (Patient, _since the start) made during it, one after every other poll");
    println!();
    println!("every file downloaded over loopback HTTP, one after another, plain and with Accept-Encoding: gzip:");
    println!(
        "{:>6} | {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8} | {:>6}",
        "copies", "plain MB", "plain s", "MB/s", "gzip MB", "gzip s", "MB/s", "ratio"
    );
    for (n, (plain_bytes, plain_s), (gzip_bytes, gzip_s)) in downloads {
        let (plain_mb, gzip_mb) = (plain_bytes as f64 / 1e6, gzip_bytes as f64 / 1e6);
        println!(
            "{:>6} | {:>9.1} {:>8.2} {:>8.0} | {:>9.1} {:>8.2} {:>8.0} | {:>6.1}",
            n,
            plain_mb,
            plain_s,
            plain_mb / plain_s,
            gzip_mb,
            gzip_s,
            gzip_mb / gzip_s,
            plain_mb / gzip_mb
        );
    }
    println!("MB/s: bytes on the wire per second (gzip: compressed bytes; the files' own bytes per second are plain MB / gzip s)");
    println!();
    println!("the same store exported organized by patient (organizeOutputBy=Patient): first (after the plain export), then plain and organized in turn (medians of 3):");
    println!(
        "{:>6} | {:>7} | {:>9} {:>8} {:>7} {:>11} {:>8} {:>6} {:>6} {:>9}",
        "copies",
        "first s",
        "lines",
        "MB",
        "plain s",
        "organized s",
        "lines/s",
        "files",
        "ratio",
        "serve RSS"
    );
    for (n, first_s, plain_s, blocks, rss) in organized {
        println!(
            "{:>6} | {:>7.2} | {:>9} {:>8.0} {:>7.2} {:>11.2} {:>8.0} {:>6} {:>6.2} {:>9.0}",
            n,
            first_s,
            blocks.resources,
            blocks.bytes as f64 / 1e6,
            plain_s,
            blocks.seconds,
            blocks.resources as f64 / blocks.seconds,
            blocks.files.len(),
            blocks.seconds / plain_s,
            rss
        );
    }
    println!("first s: includes making the store's indexes by patient and by lastUpdated, once per store; ratio: organized s / plain s; serve RSS: peak, in MB, over all these exports");
    println!("lines: resources and block headers; the organized export leaves out the types in no patient's compartment");
    println!();
    println!("the same export with files stored gzip-compressed (EXPORT_COMPRESSION=gzip), then every file downloaded plain (decompressed on the way) and gzip (as stored):");
    println!(
        "{:>6} | {:>8} {:>8} {:>9} | {:>9} {:>8} | {:>9} {:>8}",
        "copies", "plain s", "gzip s", "stored MB", "plain MB", "plain s", "gzip MB", "gzip s"
    );
    for (
        n,
        plain_export_s,
        gzip_export_s,
        stored_bytes,
        (plain_bytes, plain_s),
        (gzip_bytes, gzip_s),
    ) in compressed
    {
        println!(
            "{:>6} | {:>8.2} {:>8.2} {:>9.1} | {:>9.1} {:>8.2} | {:>9.1} {:>8.2}",
            n,
            plain_export_s,
            gzip_export_s,
            stored_bytes as f64 / 1e6,
            plain_bytes as f64 / 1e6,
            plain_s,
            gzip_bytes as f64 / 1e6,
            gzip_s
        );
    }
    println!("plain s / gzip s (export): the export writing NDJSON / writing gzip; stored MB: the compressed files' size");
    println!();
    println!("the export de-identified with the HIPAA Safe Harbor sample configuration (_anonymizationConfig), in a service of its own:");
    println!(
        "{:>6} | {:>8} | {:>9} {:>8} {:>11} {:>9}",
        "copies", "plain s", "resources", "deid s", "resources/s", "serve RSS"
    );
    for (n, plain_s, resources, deid_s, rss) in deidentified {
        println!(
            "{:>6} | {:>8.2} | {:>9} {:>8.2} {:>11.0} {:>9.0}",
            n,
            plain_s,
            resources,
            deid_s,
            resources as f64 / deid_s,
            rss
        );
    }
    println!("RSS: the service's peak resident memory in MB, after this export alone");
}
