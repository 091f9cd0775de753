//! `handler export`: a Bulk Data client for this server or any other. Kickoff, polling that honours
//! `Retry-After` with a progress bar fed by `X-Progress`, parallel downloads with retries, a count
//! check per file, and a summary. Interrupted, it prints the status URL to resume with.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{stream, StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{header, StatusCode};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// Downloads in flight at once.
const PARALLEL_DOWNLOADS: usize = 4;
const DOWNLOAD_ATTEMPTS: u32 = 4;

#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    pub base_url: String,
    /// `system`, `patient` or `group:ID`.
    pub level: String,
    pub types: Vec<String>,
    pub since: Option<String>,
    pub type_filters: Vec<String>,
    /// `_container`: the folder or container the server writes to.
    pub container: Option<String>,
    /// `_anonymizationConfig` and `_anonymizationConfigEtag`: a de-identified export.
    pub anonymization_config: Option<String>,
    pub anonymization_config_etag: Option<String>,
    pub out: PathBuf,
    pub resume: Option<String>,
    pub bearer_token: Option<String>,
    /// Bulk Data STU4: `$export-v4` kicked off by POST of a `Parameters` body.
    pub stu4: bool,
}

#[derive(Debug, Default)]
pub struct Summary {
    pub files: usize,
    pub resources: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// What ended a run without a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("interrupted; resume with: handler export --resume {0} --out <DIR>")]
    Interrupted(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

pub async fn run(options: ExportOptions) -> Result<Summary, ClientError> {
    let started = Instant::now();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .user_agent(concat!("fhir-export/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("HTTP client")?;
    let status_url = match &options.resume {
        Some(url) => url.clone(),
        None => kickoff(&client, &options).await?,
    };
    eprintln!("status: {status_url}");
    let manifest = tokio::select! {
        manifest = poll(&client, &options, &status_url) => manifest?,
        _ = tokio::signal::ctrl_c() => return Err(ClientError::Interrupted(status_url)),
    };
    let mut summary = tokio::select! {
        summary = download_all(&client, &options, &manifest) => summary?,
        _ = tokio::signal::ctrl_c() => return Err(ClientError::Interrupted(status_url)),
    };
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn authorized(
    request: reqwest::RequestBuilder,
    options: &ExportOptions,
) -> reqwest::RequestBuilder {
    match &options.bearer_token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// The kickoff's parameters, in order, each value on its own (`_type` once per type).
fn kickoff_parameters(options: &ExportOptions) -> anyhow::Result<Vec<(&'static str, &str)>> {
    if options.anonymization_config_etag.is_some() && options.anonymization_config.is_none() {
        bail!("--anonymization-config-etag needs --anonymization-config");
    }
    let mut parameters = Vec::new();
    parameters.extend(options.types.iter().map(|t| ("_type", t.as_str())));
    parameters.extend(options.since.as_deref().map(|s| ("_since", s)));
    parameters.extend(
        options
            .type_filters
            .iter()
            .map(|f| ("_typeFilter", f.as_str())),
    );
    parameters.extend(options.container.as_deref().map(|c| ("_container", c)));
    let config = options.anonymization_config.as_deref();
    parameters.extend(config.map(|c| ("_anonymizationConfig", c)));
    let etag = options.anonymization_config_etag.as_deref();
    parameters.extend(etag.map(|e| ("_anonymizationConfigEtag", e)));
    Ok(parameters)
}

/// The kickoff URL for the options' level and version, without a query.
fn operation_url(options: &ExportOptions) -> anyhow::Result<String> {
    let base = options.base_url.trim_end_matches('/');
    let operation = if options.stu4 {
        "$export-v4"
    } else {
        "$export"
    };
    let path = match options.level.as_str() {
        "system" | "" => operation.to_string(),
        "patient" => format!("Patient/{operation}"),
        level => match level.strip_prefix("group:") {
            Some(id) if !id.is_empty() => format!("Group/{id}/{operation}"),
            _ => bail!("--level must be system, patient or group:ID (got {level:?})"),
        },
    };
    Ok(format!("{base}/{path}"))
}

/// The STU3 kickoff URL and query for the options (`_type` as one comma list).
pub fn kickoff_url(options: &ExportOptions) -> anyhow::Result<String> {
    let url = operation_url(options)?;
    let mut query = form_urlencoded::Serializer::new(String::new());
    if !options.types.is_empty() {
        query.append_pair("_type", &options.types.join(","));
    }
    for (name, value) in kickoff_parameters(options)? {
        if name != "_type" {
            query.append_pair(name, value);
        }
    }
    let query = query.finish();
    Ok(if query.is_empty() {
        url
    } else {
        format!("{url}?{query}")
    })
}

/// The STU4 kickoff: the URL, and the `Parameters` body with each value a parameter of its own,
/// `_since` as an instant.
pub fn stu4_kickoff(options: &ExportOptions) -> anyhow::Result<(String, Value)> {
    let parameter: Vec<Value> = kickoff_parameters(options)?
        .into_iter()
        .map(|(name, value)| match name {
            "_since" => serde_json::json!({"name": name, "valueInstant": value}),
            _ => serde_json::json!({"name": name, "valueString": value}),
        })
        .collect();
    let body = serde_json::json!({"resourceType": "Parameters", "parameter": parameter});
    Ok((operation_url(options)?, body))
}

async fn kickoff(client: &reqwest::Client, options: &ExportOptions) -> anyhow::Result<String> {
    let (url, request) = if options.stu4 {
        let (url, body) = stu4_kickoff(options)?;
        (url.clone(), client.post(url).json(&body))
    } else {
        let url = kickoff_url(options)?;
        (url.clone(), client.get(url))
    };
    let request = request
        .header(header::ACCEPT, "application/fhir+json")
        .header("Prefer", "respond-async");
    let response = authorized(request, options)
        .send()
        .await
        .with_context(|| format!("kickoff {url}"))?;
    if response.status() != StatusCode::ACCEPTED {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        bail!("kickoff refused ({status}): {}", outcome_text(&body));
    }
    let location = response
        .headers()
        .get(header::CONTENT_LOCATION)
        .and_then(|v| v.to_str().ok())
        .context("kickoff answered 202 without Content-Location")?;
    Ok(location.to_string())
}

/// The diagnostics of an OperationOutcome body, or the body itself.
fn outcome_text(body: &str) -> String {
    let diagnostics: Vec<String> = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("issue").and_then(Value::as_array).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|issue| {
            issue
                .get("diagnostics")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    if diagnostics.is_empty() {
        body.chars().take(500).collect()
    } else {
        diagnostics.join("; ")
    }
}

/// `Retry-After` as seconds or an HTTP date, within 0.2 s to 5 minutes.
fn retry_after(headers: &header::HeaderMap) -> Duration {
    let value = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("1");
    let wait = match value.trim().parse::<f64>() {
        Ok(seconds) => Duration::from_secs_f64(seconds.max(0.0)),
        Err(_) => chrono::DateTime::parse_from_rfc2822(value)
            .ok()
            .and_then(|at| {
                (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                    .to_std()
                    .ok()
            })
            .unwrap_or(Duration::from_secs(1)),
    };
    wait.clamp(Duration::from_millis(200), Duration::from_secs(300))
}

async fn poll(
    client: &reqwest::Client,
    options: &ExportOptions,
    status_url: &str,
) -> anyhow::Result<Value> {
    let bar = ProgressBar::new(100);
    bar.set_style(
        ProgressStyle::with_template("{spinner} exporting [{bar:30}] {pos:>3}% {msg} ({elapsed})")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut transient_failures = 0;
    loop {
        let response = match authorized(client.get(status_url), options).send().await {
            Ok(response) => response,
            Err(error) if transient_failures < 5 => {
                transient_failures += 1;
                bar.set_message(format!("retrying: {error}"));
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(error) => return Err(error).context(format!("polling {status_url}")),
        };
        match response.status() {
            StatusCode::OK => {
                bar.set_position(100);
                bar.finish_with_message("done");
                return response.json().await.context("the manifest is not JSON");
            }
            StatusCode::ACCEPTED => {
                let progress = response
                    .headers()
                    .get("x-progress")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                if let Some(percent) = progress
                    .split('%')
                    .next()
                    .and_then(|p| p.trim().parse::<u64>().ok())
                {
                    bar.set_position(percent.min(100));
                }
                bar.set_message(progress);
                tokio::time::sleep(retry_after(response.headers())).await;
            }
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                tokio::time::sleep(retry_after(response.headers())).await;
            }
            status => {
                bar.abandon();
                let body = response.text().await.unwrap_or_default();
                bail!("the export failed ({status}): {}", outcome_text(&body));
            }
        }
    }
}

async fn download_all(
    client: &reqwest::Client,
    options: &ExportOptions,
    manifest: &Value,
) -> anyhow::Result<Summary> {
    tokio::fs::create_dir_all(&options.out)
        .await
        .with_context(|| format!("creating {}", options.out.display()))?;
    let mut files: Vec<(String, u64)> = Vec::new();
    // STU4 names STU3's `error` list `outcome`; `deleted` lists the deletions since `_since`.
    for section in ["output", "deleted", "error", "outcome"] {
        for item in manifest
            .get(section)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let url = item
                .get("url")
                .and_then(Value::as_str)
                .context("a manifest entry without url")?;
            files.push((
                url.to_string(),
                item.get("count").and_then(Value::as_u64).unwrap_or(0),
            ));
        }
    }
    let names = file_names(files.iter().map(|(url, _)| url.as_str()))?;
    let needs_token = manifest
        .get("requiresAccessToken")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let expected_total: u64 = files.iter().map(|(_, count)| count).sum();
    let bar = ProgressBar::new(expected_total.max(1));
    bar.set_style(
        ProgressStyle::with_template("  download [{bar:30}] {pos}/{len} resources, {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    let results: Vec<(u64, u64)> = stream::iter(files.iter().zip(&names))
        .map(|((url, count), name)| {
            let bar = bar.clone();
            let target = options.out.join(name);
            async move {
                let (lines, bytes) =
                    download_with_retries(client, options, needs_token, url, &target).await?;
                if *count != 0 && lines != *count {
                    bail!("{url}: {lines} lines, but the manifest says {count}");
                }
                bar.inc(lines);
                Ok((lines, bytes))
            }
        })
        .buffer_unordered(PARALLEL_DOWNLOADS)
        .try_collect()
        .await?;
    bar.finish_with_message("done");
    Ok(Summary {
        files: results.len(),
        resources: results.iter().map(|(lines, _)| lines).sum(),
        bytes: results.iter().map(|(_, bytes)| bytes).sum(),
        elapsed: Duration::ZERO,
    })
}

/// A file name for each URL, in order: the URL's last segment, as NDJSON (`.ndjson`, without a
/// `.gz` the file is decoded from), and `~2`, `~3`, ... before the extension for a name taken
/// already, so that every manifest entry lands in a file of its own.
fn file_names<'u>(urls: impl Iterator<Item = &'u str>) -> anyhow::Result<Vec<String>> {
    let mut taken = std::collections::HashSet::new();
    let mut names = Vec::new();
    for url in urls {
        let path = url.split(['?', '#']).next().unwrap_or(url);
        let segment = path.rsplit('/').next().unwrap_or_default();
        let segment = percent_encoding::percent_decode_str(segment).decode_utf8_lossy();
        let safe = !segment.is_empty()
            && segment != "."
            && segment != ".."
            && !segment.contains(['/', '\\', '\0']);
        if !safe {
            bail!("{url}: a file URL without a usable name");
        }
        let segment = segment.strip_suffix(".gz").unwrap_or(&segment);
        let stem = segment.strip_suffix(".ndjson").unwrap_or(segment);
        let mut name = format!("{stem}.ndjson");
        let mut copy = 1;
        while !taken.insert(name.to_ascii_lowercase()) {
            copy += 1;
            name = format!("{stem}~{copy}.ndjson");
        }
        names.push(name);
    }
    Ok(names)
}

/// Downloads one file to `target`; returns (lines, bytes) of the NDJSON written.
async fn download_with_retries(
    client: &reqwest::Client,
    options: &ExportOptions,
    needs_token: bool,
    url: &str,
    target: &Path,
) -> anyhow::Result<(u64, u64)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match download(client, options, needs_token, url, target).await {
            Ok(result) => return Ok(result),
            Err(error) if attempt < DOWNLOAD_ATTEMPTS => {
                tracing::warn!(%url, %error, attempt, "download failed; retrying");
                tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(attempt))).await;
            }
            Err(error) => return Err(error.context(format!("downloading {url}"))),
        }
    }
}

/// Downloads `url` into `target` as NDJSON: a body sent gzip-encoded (`Content-Encoding: gzip`,
/// as Azure storage serves a compressed export, or starting with gzip's magic bytes) is decoded,
/// and its lines counted after decoding.
async fn download(
    client: &reqwest::Client,
    options: &ExportOptions,
    needs_token: bool,
    url: &str,
    target: &Path,
) -> anyhow::Result<(u64, u64)> {
    use async_compression::tokio::bufread::GzipDecoder;
    use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt};

    let mut request = client
        .get(url)
        .header(header::ACCEPT, "application/fhir+ndjson")
        .header(header::ACCEPT_ENCODING, "gzip");
    if needs_token {
        request = authorized(request, options);
    }
    let response = request.send().await?;
    if !response.status().is_success() {
        bail!("HTTP {}", response.status());
    }
    let encoding = response
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|value| value.to_str().unwrap_or("?").trim().to_ascii_lowercase());
    let body = response.bytes_stream().map_err(std::io::Error::other);
    let mut body = tokio_util::io::StreamReader::new(body);
    let magic = body.fill_buf().await?.starts_with(&[0x1f, 0x8b]);
    let mut reader: std::pin::Pin<Box<dyn AsyncRead + Send>> = match encoding.as_deref() {
        Some("gzip" | "x-gzip") => Box::pin(gzip_members(GzipDecoder::new(body))),
        None | Some("identity") if magic => Box::pin(gzip_members(GzipDecoder::new(body))),
        None | Some("identity") => Box::pin(body),
        Some(other) => bail!("the file came with Content-Encoding {other:?}, which is not gzip"),
    };
    let mut partial = target.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut file = tokio::fs::File::create(&partial).await?;
    let mut buffer = vec![0u8; 256 << 10];
    let (mut lines, mut bytes) = (0u64, 0u64);
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        let chunk = &buffer[..read];
        lines += memchr::memchr_iter(b'\n', chunk).count() as u64;
        bytes += read as u64;
        file.write_all(chunk).await?;
    }
    file.flush().await?;
    drop(file);
    tokio::fs::rename(&partial, target).await?;
    Ok((lines, bytes))
}

/// A decoder that reads every member of a gzip stream (storage appends one member per block).
fn gzip_members<R: tokio::io::AsyncBufRead>(
    mut decoder: async_compression::tokio::bufread::GzipDecoder<R>,
) -> async_compression::tokio::bufread::GzipDecoder<R> {
    decoder.multiple_members(true);
    decoder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kickoff_urls_by_level() {
        let mut options = ExportOptions {
            base_url: "http://h/fhir/".into(),
            ..Default::default()
        };
        assert_eq!(kickoff_url(&options).unwrap(), "http://h/fhir/$export");
        options.level = "group:g1".into();
        options.types = vec!["Patient".into(), "Observation".into()];
        assert_eq!(
            kickoff_url(&options).unwrap(),
            "http://h/fhir/Group/g1/$export?_type=Patient%2CObservation"
        );
        options.level = "patient".into();
        options.types.clear();
        options.container = Some("deid".into());
        options.anonymization_config = Some("hipaa/safe harbor.json".into());
        options.anonymization_config_etag = Some("\"0x8D\"".into());
        assert_eq!(
            kickoff_url(&options).unwrap(),
            "http://h/fhir/Patient/$export?_container=deid\
             &_anonymizationConfig=hipaa%2Fsafe+harbor.json&_anonymizationConfigEtag=%220x8D%22"
        );
        options.stu4 = true;
        options.types = vec!["Patient".into(), "Observation".into()];
        options.since = Some("2020-01-01T00:00:00Z".into());
        let (url, body) = stu4_kickoff(&options).unwrap();
        assert_eq!(url, "http://h/fhir/Patient/$export-v4");
        let names: Vec<&str> = body["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "_type",
                "_type",
                "_since",
                "_container",
                "_anonymizationConfig",
                "_anonymizationConfigEtag"
            ]
        );
        assert_eq!(body["parameter"][2]["valueInstant"], "2020-01-01T00:00:00Z");
        options.anonymization_config = None;
        assert!(kickoff_url(&options).is_err());
        options.anonymization_config_etag = None;
        options.level = "ward".into();
        assert!(kickoff_url(&options).is_err());
    }

    #[test]
    fn retry_after_is_bounded() {
        let mut headers = header::HeaderMap::new();
        headers.insert(header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Duration::from_secs(3));
        headers.insert(header::RETRY_AFTER, "0".parse().unwrap());
        assert_eq!(retry_after(&headers), Duration::from_millis(200));
    }
}
