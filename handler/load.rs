//! `handler load`: uploads NDJSON or Bundle files (or generated demo data) to a FHIR server, as
//! batch Bundles of `PUT Type/id` entries: an upsert by id, so a retried Bundle or a second load
//! changes nothing. Bundles go out a few at a time; a Bundle refused whole with 429 or 5xx, or a
//! connection error, is sent again with backoff (`Retry-After` honoured), and so are the entries
//! a batch answers with 429 or 5xx; other refused entries are counted and named. Until the server
//! first stores something, 401 and 403 are waited out (a role assigned moments ago), for at most
//! 10 minutes. Files are read as
//! `handler import` reads them (`urn:uuid:` references resolved to `Type/id`), streamed, never
//! held whole.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use azure_core::credentials::TokenCredential;
use futures_util::{stream, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::fhir::outcome::texts_in;
use crate::source::import::read_resources;
use crate::source::remote::retry_after;

/// Entries per batch Bundle.
pub const BATCH_ENTRIES: usize = 100;
/// Bundles in flight at once.
pub const PARALLEL_BUNDLES: usize = 4;
/// Sends of one Bundle (or of its entries a batch answered 429 or 5xx) before the load fails.
const ATTEMPTS: u32 = 8;
/// How long refusals (401, 403) are waited out before the server first stores something: a role
/// assigned moments ago (FHIR Data Contributor at `azd up`) takes minutes to take effect.
pub const ACCESS_WAIT: Duration = Duration::from_secs(600);

/// Where the bearer token comes from.
pub enum LoadAuth {
    None,
    Token(String),
    /// A token for `{server}/.default` from the Azure developer credential (azd or Azure CLI
    /// sign-in).
    Azure(Arc<dyn TokenCredential>),
}

pub struct LoadOptions {
    pub base_url: String,
    pub paths: Vec<PathBuf>,
    pub auth: LoadAuth,
}

#[derive(Debug, Default)]
pub struct LoadSummary {
    pub loaded: u64,
    /// Entries the server refused for good (4xx other than 429), with what it said of the first.
    pub refused: u64,
    pub first_refusal: Option<String>,
    /// Files that could not be read (what was read of them before was sent).
    pub unreadable: Vec<String>,
    pub bundles: u64,
    pub retries: u64,
    pub elapsed: Duration,
}

/// One entry to send: `Type/id` and the resource.
struct Entry {
    url: String,
    resource: Vec<u8>,
}

pub async fn run(options: LoadOptions) -> anyhow::Result<LoadSummary> {
    let started = Instant::now();
    let base = options.base_url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .timeout(Duration::from_secs(300))
        .user_agent(concat!("fhir-export/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("HTTP client")?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<Vec<Entry>>(PARALLEL_BUNDLES * 2);
    let paths = options.paths.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let mut batch = Vec::with_capacity(BATCH_ENTRIES);
        let failed = read_resources(&paths, &mut |resource_type, id, json| {
            batch.push(Entry {
                url: format!("{resource_type}/{id}"),
                resource: json.to_vec(),
            });
            if batch.len() < BATCH_ENTRIES {
                return true;
            }
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ENTRIES));
            sender.blocking_send(full).is_ok()
        });
        if !batch.is_empty() {
            let _ = sender.blocking_send(batch);
        }
        failed
    });
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("  load {spinner} {pos} resources, {per_sec} {msg}")
            .expect("template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let uploader = Uploader {
        client,
        base,
        auth: options.auth,
        access: AccessWait::default(),
    };
    let bundles = tokio_stream_of(receiver)
        .map(|entries| {
            let uploader = &uploader;
            let bar = bar.clone();
            async move {
                let sent = uploader.send(entries).await?;
                bar.inc(sent.loaded);
                anyhow::Ok(sent)
            }
        })
        .buffer_unordered(PARALLEL_BUNDLES);
    let mut summary = LoadSummary::default();
    let mut bundles = std::pin::pin!(bundles);
    while let Some(sent) = bundles.next().await {
        let sent = sent?;
        summary.bundles += 1;
        summary.loaded += sent.loaded;
        summary.retries += sent.retries;
        summary.refused += sent.refused.len() as u64;
        if summary.first_refusal.is_none() {
            summary.first_refusal = sent.refused.into_iter().next();
        }
    }
    bar.finish_and_clear();
    summary.unreadable = reader
        .await
        .context("reading the files")?
        .iter()
        .map(ToString::to_string)
        .collect();
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn tokio_stream_of<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    stream::poll_fn(move |context| receiver.poll_recv(context))
}

struct Uploader {
    client: reqwest::Client,
    base: String,
    auth: LoadAuth,
    access: AccessWait,
}

/// Refusals waited out until the server first stores something, for at most [`ACCESS_WAIT`].
#[derive(Default)]
struct AccessWait {
    granted: std::sync::atomic::AtomicBool,
    first_refusal: std::sync::Mutex<Option<Instant>>,
}

impl AccessWait {
    /// Whether a refusal now is still waited out.
    fn waits(&self) -> bool {
        if self.granted.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let mut first = self.first_refusal.lock().expect("not poisoned");
        first.get_or_insert_with(Instant::now).elapsed() < ACCESS_WAIT
    }
}

/// What one Bundle's entries came to.
#[derive(Default)]
struct Sent {
    loaded: u64,
    retries: u64,
    /// `Type/id: what the server said`, per entry refused for good.
    refused: Vec<String>,
}

#[derive(Deserialize)]
struct BatchResponse<'a> {
    #[serde(default, borrow)]
    entry: Vec<ResponseEntry<'a>>,
}

#[derive(Deserialize)]
struct ResponseEntry<'a> {
    #[serde(borrow)]
    response: Option<EntryResponse<'a>>,
}

#[derive(Deserialize)]
struct EntryResponse<'a> {
    status: String,
    #[serde(borrow)]
    outcome: Option<&'a RawValue>,
}

impl Uploader {
    async fn bearer(&self) -> anyhow::Result<Option<String>> {
        Ok(match &self.auth {
            LoadAuth::None => None,
            LoadAuth::Token(token) => Some(token.clone()),
            LoadAuth::Azure(credential) => {
                let scope = format!("{}/.default", self.base);
                let token = credential.get_token(&[&scope], None).await.map_err(|e| {
                    anyhow::anyhow!(
                        "a token for {scope} from the Azure sign-in (azd auth login): {e}"
                    )
                })?;
                Some(token.token.secret().to_string())
            }
        })
    }

    /// Sends `entries` until each is stored or refused for good.
    async fn send(&self, mut entries: Vec<Entry>) -> anyhow::Result<Sent> {
        let mut sent = Sent::default();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let body = batch_bundle(&entries);
            let mut request = self
                .client
                .post(&self.base)
                .header("Content-Type", "application/fhir+json")
                .header("Accept", "application/fhir+json")
                .body(body);
            if let Some(token) = self.bearer().await? {
                request = request.bearer_auth(token);
            }
            let (retry, wait) = match request.send().await {
                Err(error) => (entries.len(), format!("{error}")),
                Ok(answer) => {
                    let status = answer.status();
                    let retry_after = answer
                        .headers()
                        .get("retry-after")
                        .and_then(|v| retry_after(v.to_str().ok()?, chrono::Utc::now()));
                    let body = answer.bytes().await.unwrap_or_default();
                    let refused =
                        status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
                    if refused && self.access.waits() {
                        tracing::warn!(%status, "the FHIR server refuses the upload; waiting for the role to take effect");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        attempt = 0;
                        continue;
                    }
                    if refused {
                        bail!(
                            "{}: the FHIR server refused the upload ({status}): {}; the identity needs write access (FHIR Data Contributor on Azure Health Data Services)",
                            self.base,
                            texts_in(&body)
                        );
                    }
                    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                        if let Some(wait) = retry_after {
                            tokio::time::sleep(wait.min(Duration::from_secs(60))).await;
                        }
                        (entries.len(), format!("{status}"))
                    } else if !status.is_success() {
                        bail!(
                            "{}: the FHIR server refused a batch Bundle ({status}): {}",
                            self.base,
                            texts_in(&body)
                        );
                    } else {
                        self.access
                            .granted
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                        let again = self.settle(&body, entries, &mut sent)?;
                        entries = again;
                        (entries.len(), "entries answered 429 or 5xx".into())
                    }
                }
            };
            if retry == 0 {
                return Ok(sent);
            }
            if attempt >= ATTEMPTS {
                bail!(
                    "{}: {retry} resources not stored after {ATTEMPTS} attempts (last: {wait})",
                    self.base
                );
            }
            sent.retries += 1;
            let backoff = Duration::from_millis(250 << attempt.min(7));
            tokio::time::sleep(backoff + Duration::from_millis(rand::random_range(0..250))).await;
        }
    }

    /// Counts a batch-response's entries; returns the entries to send again (429, 5xx).
    fn settle(
        &self,
        body: &[u8],
        entries: Vec<Entry>,
        sent: &mut Sent,
    ) -> anyhow::Result<Vec<Entry>> {
        let response: BatchResponse = serde_json::from_slice(body)
            .with_context(|| format!("{}: the answer to a batch is not a Bundle", self.base))?;
        if response.entry.len() != entries.len() {
            bail!(
                "{}: a batch of {} entries was answered with {}: what was stored cannot be told",
                self.base,
                entries.len(),
                response.entry.len()
            );
        }
        let mut again = Vec::new();
        for (entry, answer) in entries.into_iter().zip(response.entry) {
            let Some(answer) = answer.response else {
                bail!("{}: a batch-response entry without response", self.base);
            };
            let code: u16 = answer
                .status
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            match code {
                200..=299 => sent.loaded += 1,
                429 | 500..=599 => again.push(entry),
                _ => sent.refused.push(format!(
                    "{}: {} {}",
                    entry.url,
                    answer.status,
                    answer
                        .outcome
                        .map(|o| texts_in(o.get().as_bytes()))
                        .unwrap_or_default()
                )),
            }
        }
        Ok(again)
    }
}

/// A batch Bundle of `PUT Type/id` entries, written around the resources' bytes.
fn batch_bundle(entries: &[Entry]) -> Vec<u8> {
    let mut body = Vec::with_capacity(entries.iter().map(|e| e.resource.len() + 80).sum());
    body.extend_from_slice(br#"{"resourceType":"Bundle","type":"batch","entry":["#);
    for (index, entry) in entries.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(br#"{"resource":"#);
        body.extend_from_slice(&entry.resource);
        body.extend_from_slice(br#","request":{"method":"PUT","url":"#);
        body.extend_from_slice(
            serde_json::to_string(&entry.url)
                .expect("a string")
                .as_bytes(),
        );
        body.extend_from_slice(b"}}");
    }
    body.extend_from_slice(b"]}");
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_bundle_carries_the_resources_as_they_are() {
        let entries = vec![
            Entry {
                url: "Patient/a".into(),
                resource: br#"{"resourceType":"Patient","id":"a","x":1.50}"#.to_vec(),
            },
            Entry {
                url: "Observation/b".into(),
                resource: br#"{"resourceType":"Observation","id":"b"}"#.to_vec(),
            },
        ];
        let bundle: serde_json::Value = serde_json::from_slice(&batch_bundle(&entries)).unwrap();
        assert_eq!(bundle["type"], "batch");
        assert_eq!(bundle["entry"][1]["request"]["url"], "Observation/b");
        assert_eq!(bundle["entry"][0]["request"]["method"], "PUT");
        assert!(String::from_utf8(batch_bundle(&entries))
            .unwrap()
            .contains("1.50"));
    }
}
