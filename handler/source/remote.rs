//! A FHIR server as the source, over REST search: type searches paged by `Bundle.link[next]`,
//! `_lastUpdated` bounds for `_since` and the snapshot's `transactionTime`, `_typeFilter` queries
//! passed on (ORed queries merged without duplicates), Patient and Group levels through the
//! compartment search `Patient/{id}/{type}`.
//!
//! Requests retry with backoff and jitter on 429, 5xx and connection errors, honouring
//! `Retry-After`; a semaphore bounds the requests in flight. Refusals (401, 403, 400, 404) become
//! clear errors naming the URL and the server's diagnostics.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::runtime::Handle;
use tokio::sync::{Mutex, Semaphore};

use super::{PatientScope, ResourceSource, ScanError, ScanRequest, SinkError, SourceError};
use crate::fhir::{is_resource_type, search};

/// Requests to the server in flight at once, per process.
const MAX_IN_FLIGHT: usize = 8;
const MAX_RETRIES: u32 = 8;
const PAGE_SIZE: usize = 1000;

/// How the source authenticates to the FHIR server.
pub enum RemoteAuth {
    None,
    /// A token for `{server}/.default` (managed identity in Azure, the developer's sign-in locally).
    Azure(Arc<dyn TokenCredential>),
    /// OAuth 2.0 client credentials against a token endpoint.
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: String,
        scope: String,
    },
}

struct CachedToken {
    token: String,
    refresh_at: std::time::Instant,
}

pub struct RemoteServer(Arc<Inner>);

struct Inner {
    base: String,
    client: reqwest::Client,
    auth: RemoteAuth,
    token: Mutex<Option<CachedToken>>,
    in_flight: Semaphore,
    runtime: Handle,
    page_size: usize,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// What one GET brought back.
enum Fetched {
    Body(Bytes),
    NotFound,
}

#[derive(Deserialize)]
struct Page<'a> {
    #[serde(default)]
    link: Vec<Link>,
    #[serde(default, borrow)]
    entry: Vec<Entry<'a>>,
    total: Option<u64>,
}

#[derive(Deserialize)]
struct Link {
    relation: String,
    url: String,
}

#[derive(Deserialize)]
struct Entry<'a> {
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
    search: Option<EntrySearch>,
}

#[derive(Deserialize)]
struct EntrySearch {
    mode: Option<String>,
}

#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "resourceType")]
    resource_type: String,
    id: Option<String>,
}

/// A `Retry-After` value: seconds, or an HTTP date (the wait until then, none if it has passed).
fn retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The scan's `meta.lastUpdated` window as search parameters.
fn window(request: &ScanRequest<'_>) -> form_urlencoded::Serializer<'static, String> {
    let mut bounds = form_urlencoded::Serializer::new(String::new());
    if let Some(since) = request.since {
        bounds.append_pair("_lastUpdated", &format!("gt{}", instant(since)));
    }
    bounds.append_pair(
        "_lastUpdated",
        &format!("le{}", instant(request.until.min(request.snapshot))),
    );
    bounds
}

impl RemoteServer {
    /// `base`: the server's base URL. Must be called inside a tokio runtime.
    pub fn new(base: &str, auth: RemoteAuth) -> Result<Self, SourceError> {
        Ok(Self(Arc::new(Inner::new(base, auth)?)))
    }

    /// A smaller page size (tests and benchmarks that want many pages).
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.0) {
            inner.page_size = page_size.clamp(1, PAGE_SIZE);
        }
        self
    }

    /// (requests sent, of which retries) so far.
    pub fn request_counts(&self) -> (u64, u64) {
        (
            self.0.requests.load(Ordering::Relaxed),
            self.0.retries.load(Ordering::Relaxed),
        )
    }
}

impl Inner {
    fn new(base: &str, auth: RemoteAuth) -> Result<Self, SourceError> {
        let runtime = Handle::try_current()
            .map_err(|_| SourceError::Remote("the remote source needs a tokio runtime".into()))?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(MAX_IN_FLIGHT)
            .build()
            .map_err(|e| SourceError::Remote(format!("HTTP client: {e}")))?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            client,
            auth,
            token: Mutex::new(None),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            runtime,
            page_size: PAGE_SIZE,
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        })
    }

    async fn bearer(&self) -> Result<Option<String>, SourceError> {
        let refused =
            |e: String| SourceError::Remote(format!("cannot get a token for {}: {e}", self.base));
        match &self.auth {
            RemoteAuth::None => Ok(None),
            RemoteAuth::Azure(credential) => {
                // The credential caches and refreshes its tokens itself.
                let scope = format!("{}/.default", self.base);
                let token = credential
                    .get_token(&[&scope], None)
                    .await
                    .map_err(|e| refused(e.to_string()))?;
                Ok(Some(token.token.secret().to_string()))
            }
            RemoteAuth::ClientCredentials {
                token_url,
                client_id,
                client_secret,
                scope,
            } => {
                let mut cached = self.token.lock().await;
                if let Some(token) = cached
                    .as_ref()
                    .filter(|t| t.refresh_at > std::time::Instant::now())
                {
                    return Ok(Some(token.token.clone()));
                }
                #[derive(Deserialize)]
                struct TokenResponse {
                    access_token: String,
                    expires_in: Option<u64>,
                }
                let response = self
                    .client
                    .post(token_url)
                    .form(&[
                        ("grant_type", "client_credentials"),
                        ("client_id", client_id),
                        ("client_secret", client_secret),
                        ("scope", scope),
                    ])
                    .send()
                    .await
                    .map_err(|e| refused(e.to_string()))?;
                if !response.status().is_success() {
                    return Err(refused(format!(
                        "the token endpoint answered {}",
                        response.status()
                    )));
                }
                let token: TokenResponse =
                    response.json().await.map_err(|e| refused(e.to_string()))?;
                // Refreshed a minute before it expires (or after 4 minutes when the lifetime is unknown).
                let lifetime = token.expires_in.unwrap_or(300).saturating_sub(60).max(1);
                *cached = Some(CachedToken {
                    token: token.access_token.clone(),
                    refresh_at: std::time::Instant::now() + Duration::from_secs(lifetime),
                });
                Ok(Some(token.access_token))
            }
        }
    }

    /// One GET with retries; `NotFound` for 404 and 410.
    async fn get(&self, url: &str) -> Result<Fetched, SourceError> {
        let mut attempt = 0;
        loop {
            let outcome = {
                let _permit = self.in_flight.acquire().await.expect("never closed");
                self.requests.fetch_add(1, Ordering::Relaxed);
                let mut request = self
                    .client
                    .get(url)
                    .header("Accept", "application/fhir+json");
                if let Some(token) = self.bearer().await? {
                    request = request.bearer_auth(token);
                }
                match request.send().await {
                    Ok(response) => {
                        let status = response.status();
                        let retry_after = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| retry_after(v, Utc::now()));
                        match response.bytes().await {
                            Ok(body) => Ok((status, retry_after, body)),
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                }
            };
            let retry_after = match outcome {
                Ok((status, _, body)) if status.is_success() => return Ok(Fetched::Body(body)),
                Ok((status, _, _)) if status == 404 || status == 410 => return Ok(Fetched::NotFound),
                Ok((status, retry_after, body)) if status == 429 || status.is_server_error() => {
                    if attempt >= MAX_RETRIES {
                        return Err(SourceError::Remote(format!(
                            "{url}: the server answered {status} {} times: {}",
                            attempt + 1,
                            diagnostics(&body)
                        )));
                    }
                    tracing::warn!(url, %status, attempt = attempt + 1, "FHIR source answered {status}; retrying");
                    retry_after
                }
                Ok((status, _, body)) if status == 401 || status == 403 => {
                    return Err(SourceError::Remote(format!(
                        "{url}: the FHIR server refused access ({status}): {}; the app's identity needs read access (FHIR Data Reader on Azure Health Data Services)",
                        diagnostics(&body)
                    )))
                }
                Ok((status, _, body)) => {
                    return Err(SourceError::Unsupported(format!(
                        "{url}: the FHIR server rejected the request ({status}): {}",
                        diagnostics(&body)
                    )))
                }
                Err(error) if error.is_builder() => {
                    // A request that cannot be made will not be made by trying again.
                    return Err(SourceError::Remote(format!("{url}: {error}")));
                }
                Err(error) => {
                    if attempt >= MAX_RETRIES {
                        return Err(SourceError::Remote(format!("{url}: {error}")));
                    }
                    tracing::warn!(url, %error, attempt = attempt + 1, "FHIR source request failed; retrying");
                    None
                }
            };
            let backoff = Duration::from_millis(100 << attempt.min(6)).min(Duration::from_secs(10));
            let jitter = Duration::from_millis(rand::random_range(0..100));
            let wait = retry_after.unwrap_or(backoff).min(Duration::from_secs(60)) + jitter;
            self.retries.fetch_add(1, Ordering::Relaxed);
            attempt += 1;
            tokio::time::sleep(wait).await;
        }
    }

    async fn get_body(&self, url: &str) -> Result<Bytes, SourceError> {
        match self.get(url).await? {
            Fetched::Body(body) => Ok(body),
            Fetched::NotFound => Err(SourceError::Unsupported(format!("{url}: not found (404)"))),
        }
    }

    /// The `total` of a `_summary=count` search (`None` when the server gives none).
    async fn total(&self, url: &str) -> Result<Option<u64>, SourceError> {
        match self.get(url).await? {
            Fetched::NotFound => Ok(Some(0)),
            Fetched::Body(body) => Ok(serde_json::from_slice::<Page>(&body)
                .ok()
                .and_then(|p| p.total)),
        }
    }

    async fn declared_types(&self) -> Result<Vec<String>, SourceError> {
        let body = self.get_body(&format!("{}/metadata", self.base)).await?;
        let statement: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| SourceError::Remote(format!("{}/metadata is not JSON: {e}", self.base)))?;
        let mut types: Vec<String> = statement
            .pointer("/rest/0/resource")
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("type")?.as_str())
            .filter(|t| is_resource_type(t))
            .map(str::to_string)
            .collect();
        types.sort();
        types.dedup();
        Ok(types)
    }

    /// The ids of every Patient on the server.
    async fn all_patients(&self) -> Result<Vec<String>, SourceError> {
        let mut ids = Vec::new();
        let mut next = Some(format!("{}/Patient?_count={}", self.base, self.page_size));
        while let Some(url) = next.take() {
            let body = self.get_body(&url).await?;
            let page = parse_page(&url, &body)?;
            for resource in page.entry.iter().filter_map(|e| e.resource) {
                if let Ok(Identity { id: Some(id), .. }) = serde_json::from_str(resource.get()) {
                    ids.push(id);
                }
            }
            next = next_link(&url, &page)?;
        }
        Ok(ids)
    }

    /// The first page URL of each search the scan runs. `_typeFilter` queries go to the server
    /// only in the criteria it evaluates exactly as the exporter does (a superset of the match,
    /// which the exporter then filters); a query with none makes the read whole.
    fn searches(&self, request: &ScanRequest<'_>, patients: Option<&[String]>) -> Vec<String> {
        let mut bounds = window(request);
        bounds.append_pair("_count", &self.page_size.to_string());
        let bounds = bounds.finish();
        let mut queries: Vec<String> = request
            .type_filters
            .iter()
            .filter_map(|q| q.split_once('?'))
            .map(|(resource_type, query)| search::server_exact_criteria(resource_type, query))
            .collect();
        if queries.is_empty() || queries.iter().any(String::is_empty) {
            queries = vec![String::new()];
        }
        queries.sort();
        queries.dedup();
        let targets: Vec<String> = match patients {
            None => vec![format!("{}/{}", self.base, request.resource_type)],
            Some(patients) => patients
                .iter()
                .map(|p| {
                    let p = percent_encoding::utf8_percent_encode(p, COMPONENT);
                    format!("{}/Patient/{p}/{}", self.base, request.resource_type)
                })
                .collect(),
        };
        let mut urls = Vec::new();
        for target in &targets {
            for query in &queries {
                let separator = if query.is_empty() { "" } else { "&" };
                urls.push(format!("{target}?{query}{separator}{bounds}"));
            }
        }
        urls
    }
}

async fn fetch_page(source: Arc<Inner>, url: String) -> Result<(String, Bytes), SourceError> {
    let body = source.get_body(&url).await?;
    Ok((url, body))
}

fn parse_page<'a>(url: &str, body: &'a [u8]) -> Result<Page<'a>, SourceError> {
    serde_json::from_slice(body)
        .map_err(|e| SourceError::Remote(format!("{url}: the answer is not a search Bundle: {e}")))
}

/// The page's `next` link, resolved against the page's own URL (a server may give a relative one).
fn next_link(page_url: &str, page: &Page<'_>) -> Result<Option<String>, SourceError> {
    let Some(link) = page.link.iter().find(|l| l.relation == "next") else {
        return Ok(None);
    };
    let base = reqwest::Url::parse(page_url)
        .map_err(|e| SourceError::Remote(format!("{page_url}: not a URL: {e}")))?;
    base.join(&link.url)
        .map(|url| Some(url.to_string()))
        .map_err(|e| {
            SourceError::Remote(format!(
                "{page_url}: the next link {:?} is not a URL: {e}",
                link.url
            ))
        })
}

/// What a path segment or query value must escape (RFC 3986): everything but the unreserved
/// characters. (`NON_ALPHANUMERIC` also escaped `-`, which some servers do not decode in an id.)
const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The diagnostics of an OperationOutcome body, or the start of whatever came back.
fn diagnostics(body: &[u8]) -> String {
    let outcome: Option<String> = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let issues = v.get("issue")?.as_array()?;
            let texts: Vec<String> = issues
                .iter()
                .filter_map(|i| {
                    i.get("diagnostics")
                        .and_then(|d| d.as_str())
                        .map(str::to_string)
                })
                .collect();
            (!texts.is_empty()).then(|| texts.join("; "))
        });
    outcome.unwrap_or_else(|| {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        if text.trim().is_empty() {
            "no details".into()
        } else {
            text
        }
    })
}

impl ResourceSource for RemoteServer {
    /// The types the server declares that hold resources (a `_summary=count` probe each).
    fn resource_types(&self) -> Result<Vec<String>, SourceError> {
        let this = &self.0;
        this.runtime.block_on(async {
            let declared = this.declared_types().await?;
            let counted: Vec<(String, Result<Option<u64>, SourceError>)> =
                futures_util::stream::iter(declared)
                    .map(|t| async move {
                        let count = this
                            .total(&format!("{}/{t}?_summary=count", this.base))
                            .await;
                        (t, count)
                    })
                    .buffered(MAX_IN_FLIGHT)
                    .collect()
                    .await;
            let mut present = Vec::new();
            for (resource_type, count) in counted {
                match count? {
                    Some(0) => {}
                    _ => present.push(resource_type),
                }
            }
            Ok(present)
        })
    }

    /// A `_summary=count` probe of the window, for whole-type scans only.
    fn count(&self, request: &ScanRequest<'_>) -> Result<Option<u64>, SourceError> {
        let whole_type = matches!(request.scope, PatientScope::All)
            || (matches!(request.scope, PatientScope::AnyPatient)
                && request.resource_type == "Patient");
        if !whole_type {
            return Ok(None);
        }
        let mut url = format!("{}/{}?_summary=count", self.0.base, request.resource_type);
        url.push('&');
        url.push_str(&window(request).finish());
        self.0.runtime.block_on(self.0.total(&url))
    }

    fn read(&self, resource_type: &str, id: &str) -> Result<Option<Vec<u8>>, SourceError> {
        let id = percent_encoding::utf8_percent_encode(id, COMPONENT);
        let url = format!("{}/{resource_type}/{id}", self.0.base);
        self.0.runtime.block_on(async {
            Ok(match self.0.get(&url).await? {
                Fetched::Body(body) => Some(body.to_vec()),
                Fetched::NotFound => None,
            })
        })
    }

    /// Pages are fetched on the runtime (the next one while this one is written); the sink runs
    /// here, on the calling blocking thread.
    fn scan(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<u64, ScanError> {
        let inner = &self.0;
        let patients = match request.scope {
            PatientScope::All => None,
            PatientScope::AnyPatient if request.resource_type == "Patient" => None,
            PatientScope::AnyPatient => Some(inner.runtime.block_on(inner.all_patients())?),
            PatientScope::Only(ids) => Some(ids.clone()),
        };
        let searches = inner.searches(request, patients.as_deref());
        // Ids seen in this shard: several searches may overlap (compartments, ORed filters), and a
        // server without a stable order can show one resource on two pages. (Bounded by the
        // shard's size, `EXPORT_SHARD_MAX_RESOURCES`.)
        let mut seen = HashSet::new();
        let mut count = 0;
        for first in searches {
            let mut pending = Some(inner.runtime.spawn(fetch_page(inner.clone(), first)));
            while let Some(fetching) = pending.take() {
                let (url, body) = inner
                    .runtime
                    .block_on(fetching)
                    .map_err(|e| SourceError::Remote(format!("page fetch stopped: {e}")))??;
                let page = parse_page(&url, &body)?;
                if let Some(next) = next_link(&url, &page)? {
                    pending = Some(inner.runtime.spawn(fetch_page(inner.clone(), next)));
                }
                for entry in &page.entry {
                    if entry
                        .search
                        .as_ref()
                        .and_then(|s| s.mode.as_deref())
                        .is_some_and(|m| m != "match")
                    {
                        continue;
                    }
                    let Some(resource) = entry.resource else {
                        continue;
                    };
                    let identity: Identity = serde_json::from_str(resource.get()).map_err(|e| {
                        SourceError::Remote(format!("{url}: an entry is not a resource: {e}"))
                    })?;
                    if identity.resource_type != request.resource_type {
                        continue;
                    }
                    if let Some(id) = identity.id {
                        if !seen.insert(id) {
                            continue;
                        }
                    }
                    let raw = resource.get().as_bytes();
                    if raw.contains(&b'\n') {
                        let value: serde_json::Value =
                            serde_json::from_slice(raw).expect("valid JSON");
                        sink(&serde_json::to_vec(&value).expect("JSON serialises"))?;
                    } else {
                        sink(raw)?;
                    }
                    count += 1;
                }
            }
        }
        self.check_complete(request, count)?;
        Ok(count)
    }
}

impl RemoteServer {
    /// A whole-type read without filters is checked against a count of the same window taken after
    /// it: fewer distinct resources than the server still holds there means pages were lost (a
    /// last page without `next`, rows shifted between pages), and the shard fails to be read
    /// again, never reported whole. (Resources changed since the kickoff leave the window, so the
    /// count after the read is the floor.)
    fn check_complete(&self, request: &ScanRequest<'_>, read: u64) -> Result<(), SourceError> {
        if !request.type_filters.is_empty() {
            // What the filters let through is known only after the local check.
            return Ok(());
        }
        match ResourceSource::count(self, request)? {
            Some(expected) if read < expected => Err(SourceError::Remote(format!(
                "{}: read {read} resources where the server counts {expected} in the same window; the pages were incomplete (a last page without a next link, or an unstable order)",
                request.resource_type
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now: DateTime<Utc> = "2026-12-01T10:00:00Z".parse().unwrap();
        assert_eq!(retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Tue, 01 Dec 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after("Tue, 01 Dec 2026 09:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
    }
}
