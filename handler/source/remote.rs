//! A FHIR server as the source, over REST search: type searches paged by `Bundle.link[next]`,
//! `_lastUpdated` bounds for `_since` and the snapshot's `transactionTime`, `_typeFilter` queries
//! passed on where the server evaluates them exactly (ORed queries merged without duplicates).
//! Patient and Group levels search by the compartment's search parameters, many patients per
//! request, where the CapabilityStatement declares them; else `Patient/{id}/{type}` where it
//! declares the patient compartment; else the whole type. Whatever comes back is checked against
//! the compartment locally.
//!
//! Every search is verified: counted (`_summary=count`) before and after it is read, and read
//! again until the count held still and every counted resource came back, so that pages shifted by
//! concurrent changes or an unstable order never lose a resource unnoticed. A server that refuses
//! to page further (an offset limit) has the window halved by `_lastUpdated` and read in parts.
//!
//! Requests ask for strict handling (`Prefer: handling=strict`), so that a server refuses what it
//! cannot honour rather than dropping it; a `_sort` dropped with a warning entry is taken as refused
//! too. Requests retry with backoff and jitter on 429, 5xx and connection errors, honouring
//! `Retry-After`; a semaphore bounds the requests in flight. 401 and 403 are waited out until the
//! server first answers (a role assignment still propagating), for a bounded time. Refusals (401,
//! 403, 400, 404) become clear errors naming the URL and the server's diagnostics.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use bytes::Bytes;
use chrono::{DateTime, DurationRound, SecondsFormat, Utc};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::runtime::Handle;
use tokio::sync::{Mutex, Semaphore};

use super::{
    Cursor, Part, PatientScope, PlanRequest, ResourceSource, ScanError, ScanRequest, Scanned,
    SinkError, SourceError,
};
use crate::fhir::compartment::{compartment_search_params, patient_ids};
use crate::fhir::is_resource_type;
use crate::fhir::search::SearchQuery;

/// How long refusals are waited out by default: role assignments take up to about 10 minutes.
pub const DEFAULT_ACCESS_WAIT: Duration = Duration::from_secs(600);

/// Requests to the server in flight at once, per process.
const MAX_IN_FLIGHT: usize = 8;
const MAX_RETRIES: u32 = 8;
const PAGE_SIZE: usize = 1000;
/// Reads of one search before its count is trusted to have held still.
const MAX_PASSES: u32 = 5;
/// The longest patient list one search request carries (bytes of its URL's values).
const MAX_IDS_BYTES: usize = 3000;
const PATIENT_COMPARTMENT: &str = "http://hl7.org/fhir/CompartmentDefinition/patient";
/// The orders asked for, best first: a stable order keeps a search's pages from overlapping or
/// skipping. A server that refuses one is asked the next from then on.
const SORTS: [&str; 3] = ["_lastUpdated,_id", "_lastUpdated", ""];

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
    requests: AtomicU64,
    retries: AtomicU64,
    waiting_micros: AtomicU64,
    capabilities: tokio::sync::OnceCell<Capabilities>,
    /// The first of `SORTS` the server has not refused.
    sort: std::sync::atomic::AtomicUsize,
    access: AccessWait,
}

/// Refusals (401, 403) waited out while the app's access may still be on its way: a role assigned
/// moments before (FHIR Data Reader at `azd up`) takes minutes to reach the FHIR service. Until the
/// server has answered once, a refusal is retried with backoff, for at most `window` after the
/// first one; after that, or once the server has answered, a refusal is final.
struct AccessWait {
    window: Duration,
    granted: std::sync::atomic::AtomicBool,
    first_refusal: std::sync::Mutex<Option<std::time::Instant>>,
    /// While waiting: what for.
    waiting: std::sync::Mutex<Option<String>>,
}

impl AccessWait {
    fn new(window: Duration) -> Self {
        Self {
            window,
            granted: std::sync::atomic::AtomicBool::new(false),
            first_refusal: std::sync::Mutex::new(None),
            waiting: std::sync::Mutex::new(None),
        }
    }

    /// After a refusal: how long to wait before asking again, or `None` (with how long was waited)
    /// when the refusal is final.
    fn after_refusal(&self, status: u16, refusals: u32) -> Result<Duration, Duration> {
        let mut first = self.first_refusal.lock().expect("not poisoned");
        let since = first.get_or_insert_with(std::time::Instant::now).elapsed();
        if self.granted.load(Ordering::Relaxed) || since >= self.window {
            *self.waiting.lock().expect("not poisoned") = None;
            return Err(since);
        }
        *self.waiting.lock().expect("not poisoned") = Some(format!(
            "waiting for access to the FHIR source (it answers {status}; a role assigned moments ago takes minutes to take effect; {} s of {} s)",
            since.as_secs(),
            self.window.as_secs()
        ));
        let backoff = Duration::from_secs(2u64 << refusals.min(4)).min(Duration::from_secs(30));
        Ok(backoff.min(self.window - since + Duration::from_millis(100)))
    }

    fn answered(&self) {
        if !self.granted.swap(true, Ordering::Relaxed) {
            *self.waiting.lock().expect("not poisoned") = None;
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestStats {
    pub requests: u64,
    pub retries: u64,
    pub waiting: Duration,
}

/// What the server's CapabilityStatement declares.
#[derive(Default)]
struct Capabilities {
    /// Resource types, with the search parameters declared for each.
    types: std::collections::BTreeMap<String, HashSet<String>>,
    /// `rest.compartment` names the patient compartment (`Patient/{id}/{type}` works).
    patient_compartment: bool,
}

/// How a scan reaches the members of some patients' compartments.
#[derive(Debug, PartialEq, Eq)]
enum CompartmentAccess {
    /// `{type}?{param}=Patient/a,Patient/b`, for each compartment search parameter.
    TypeSearch,
    /// `Patient/{id}/{type}`, one search per patient.
    CompartmentRoute,
    /// The whole type, filtered here.
    WholeType,
}

impl Capabilities {
    fn parse(statement: &serde_json::Value) -> Self {
        let mut capabilities = Capabilities::default();
        let rest = statement.pointer("/rest/0");
        for resource in rest
            .and_then(|r| r.get("resource"))
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
        {
            let Some(resource_type) = resource.get("type").and_then(|t| t.as_str()) else {
                continue;
            };
            if !is_resource_type(resource_type) {
                continue;
            }
            let params = resource
                .get("searchParam")
                .and_then(|p| p.as_array())
                .into_iter()
                .flatten()
                .filter_map(|p| p.get("name")?.as_str())
                .map(str::to_string);
            capabilities
                .types
                .entry(resource_type.to_string())
                .or_default()
                .extend(params);
        }
        capabilities.patient_compartment = rest
            .and_then(|r| r.get("compartment"))
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
            .any(|c| c.as_str() == Some(PATIENT_COMPARTMENT));
        capabilities
    }

    fn compartment_access(&self, resource_type: &str) -> CompartmentAccess {
        let params = compartment_search_params(resource_type);
        let declared = self.types.get(resource_type);
        let supports = |p: &&str| *p == "_id" || declared.is_some_and(|d| d.contains(*p));
        if !params.is_empty() && params.iter().all(supports) {
            CompartmentAccess::TypeSearch
        } else if self.patient_compartment {
            CompartmentAccess::CompartmentRoute
        } else {
            CompartmentAccess::WholeType
        }
    }
}

/// One search of a scan: where, and the criteria besides the `_lastUpdated` window.
struct Search {
    /// `{base}/{type}` or `{base}/Patient/{id}/{type}`.
    target: String,
    criteria: String,
}

/// A `meta.lastUpdated` window: after `after` (exclusive), up to `upto` (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    after: Option<DateTime<Utc>>,
    upto: DateTime<Utc>,
}

impl Window {
    fn params(&self) -> String {
        let mut bounds = form_urlencoded::Serializer::new(String::new());
        if let Some(after) = self.after {
            bounds.append_pair("_lastUpdated", &format!("gt{}", instant(after)));
        }
        bounds.append_pair("_lastUpdated", &format!("le{}", instant(self.upto)));
        bounds.finish()
    }

    /// The window cut in two at its middle (a whole millisecond where it is wider than 2 ms, as
    /// many servers keep no finer instants); `None` when it is one microsecond wide.
    fn halves(&self) -> Option<[Window; 2]> {
        // Without a lower bound, from the Unix epoch: nothing a server stores is older.
        let from = self.after.unwrap_or(DateTime::UNIX_EPOCH);
        let width = (self.upto - from).num_microseconds()?;
        if width < 2 {
            return None;
        }
        let mut middle = from + chrono::Duration::microseconds(width / 2);
        if width > 2000 {
            middle = middle
                .duration_trunc(chrono::Duration::milliseconds(1))
                .unwrap_or(middle);
        }
        Some([
            Window {
                after: self.after,
                upto: middle,
            },
            Window {
                after: Some(middle),
                upto: self.upto,
            },
        ])
    }
}

impl Search {
    /// The search with its window, before the paging or counting parameters.
    fn windowed(&self, window: &Window) -> String {
        let separator = if self.criteria.is_empty() { "" } else { "&" };
        format!(
            "{}?{}{separator}{}",
            self.target,
            self.criteria,
            window.params()
        )
    }

    /// The first page's URL; `sort`: a `_sort` value, or empty for none.
    fn url(&self, window: &Window, sort: &str) -> String {
        let mut url = format!("{}&_count={PAGE_SIZE}", self.windowed(window));
        if !sort.is_empty() {
            url.push_str("&_sort=");
            url.push_str(sort);
        }
        url
    }

    fn count_url(&self, window: &Window) -> String {
        format!("{}&_summary=count", self.windowed(window))
    }
}

/// How a read of one search ended.
enum Read {
    /// Every page; the ids seen.
    Whole(HashSet<String>),
    /// Paused (a time-boxed shard): every resource last updated up to this instant was passed on,
    /// none after it.
    Paused(DateTime<Utc>),
    /// The server refused a later page (an offset or page limit) after this many resources.
    Refused { after: u64, reason: SourceError },
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

impl Page<'_> {
    /// The text of an OperationOutcome the server put among the entries (`search.mode` outcome)
    /// about sorting: how a lenient server says it dropped the `_sort` asked for (fhir-server
    /// answers 200, sorted as it likes, with a warning). `None` when there is none.
    fn sort_warning(&self) -> Option<String> {
        self.entry
            .iter()
            .filter(|entry| {
                entry
                    .search
                    .as_ref()
                    .and_then(|s| s.mode.as_deref())
                    .is_some_and(|mode| mode == "outcome")
            })
            .filter_map(|entry| entry.resource)
            .map(|resource| diagnostics(resource.get().as_bytes()))
            .find(|text| text.to_ascii_lowercase().contains("sort"))
    }
}

#[derive(Deserialize)]
struct Identity {
    #[serde(rename = "resourceType")]
    resource_type: String,
    id: Option<String>,
    meta: Option<Meta>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "lastUpdated")]
    last_updated: Option<String>,
}

impl Identity {
    fn last_updated(&self) -> Option<DateTime<Utc>> {
        let text = self.meta.as_ref()?.last_updated.as_deref()?;
        DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }
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

/// The scan's `meta.lastUpdated` window (after where a paused scan stopped).
fn window(request: &ScanRequest<'_>) -> Window {
    let resumed = match request.resume {
        Some(Cursor::LastUpdated { instant }) => Some(*instant),
        _ => None,
    };
    Window {
        after: request.since.max(resumed),
        upto: request.until.min(request.snapshot),
    }
}

impl RemoteServer {
    /// `base`: the server's base URL. Must be called inside a tokio runtime.
    pub fn new(base: &str, auth: RemoteAuth) -> Result<Self, SourceError> {
        Ok(Self(Arc::new(Inner::new(base, auth)?)))
    }

    /// How long refusals are waited out before the server first answers (default 10 minutes).
    pub fn with_access_wait(mut self, window: Duration) -> Self {
        Arc::get_mut(&mut self.0)
            .expect("set before the source is shared")
            .access = AccessWait::new(window);
        self
    }

    /// The requests sent so far: how many, of which retries, and the time spent waiting for their
    /// answers (summed over requests, so above the wall time when they overlap).
    pub fn request_stats(&self) -> RequestStats {
        RequestStats {
            requests: self.0.requests.load(Ordering::Relaxed),
            retries: self.0.retries.load(Ordering::Relaxed),
            waiting: Duration::from_micros(self.0.waiting_micros.load(Ordering::Relaxed)),
        }
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
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            waiting_micros: AtomicU64::new(0),
            capabilities: tokio::sync::OnceCell::new(),
            sort: std::sync::atomic::AtomicUsize::new(0),
            access: AccessWait::new(DEFAULT_ACCESS_WAIT),
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
        let mut refusals = 0;
        loop {
            let outcome = {
                let _permit = self.in_flight.acquire().await.expect("never closed");
                self.requests.fetch_add(1, Ordering::Relaxed);
                // Strict handling: a server that cannot honour a parameter (a `_sort` key, say)
                // answers 400, where under its default lenient handling it would drop it.
                let mut request = self
                    .client
                    .get(url)
                    .header("Accept", "application/fhir+json")
                    .header("Prefer", "handling=strict");
                if let Some(token) = self.bearer().await? {
                    request = request.bearer_auth(token);
                }
                let sent = std::time::Instant::now();
                let answer = match request.send().await {
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
                };
                let waited = sent.elapsed().as_micros() as u64;
                self.waiting_micros.fetch_add(waited, Ordering::Relaxed);
                answer
            };
            let retry_after = match outcome {
                Ok((status, _, body)) if status.is_success() => {
                    self.access.answered();
                    return Ok(Fetched::Body(body));
                }
                Ok((status, _, _)) if status == 404 || status == 410 => {
                    self.access.answered();
                    return Ok(Fetched::NotFound);
                }
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
                    match self.access.after_refusal(status.as_u16(), refusals) {
                        Ok(wait) => {
                            tracing::warn!(url, %status, wait_secs = wait.as_secs(), "FHIR source refused access; waiting for the role assignment to take effect");
                            refusals += 1;
                            self.retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                        Err(waited) => {
                            return Err(SourceError::Remote(format!(
                                "{url}: the FHIR server refused access ({status}): {}; the app's identity needs read access (the role FHIR Data Reader on Azure Health Data Services){}",
                                diagnostics(&body),
                                match waited.as_secs() {
                                    0 => String::new(),
                                    secs => format!(", and was refused for {secs} s"),
                                }
                            )))
                        }
                    }
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

    async fn capabilities(&self) -> Result<&Capabilities, SourceError> {
        self.capabilities
            .get_or_try_init(|| async {
                let body = self.get_body(&format!("{}/metadata", self.base)).await?;
                let statement: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                    SourceError::Remote(format!("{}/metadata is not JSON: {e}", self.base))
                })?;
                Ok(Capabilities::parse(&statement))
            })
            .await
    }

    /// The searches of a scan. `_typeFilter` queries go to the server only in the criteria it
    /// evaluates exactly as the exporter does (a superset of the match, which the exporter then
    /// filters); a query with none makes the read whole.
    fn searches(&self, request: &ScanRequest<'_>, access: &CompartmentAccess) -> Vec<Search> {
        let mut queries: Vec<String> = request
            .type_filters
            .iter()
            .map(SearchQuery::server_exact_criteria)
            .collect();
        if queries.is_empty() || queries.iter().any(String::is_empty) {
            queries = vec![String::new()];
        }
        queries.sort();
        queries.dedup();
        let resource_type = request.resource_type;
        let whole = format!("{}/{resource_type}", self.base);
        let encode = |id: &str| percent_encoding::utf8_percent_encode(id, COMPONENT).to_string();
        // (target, compartment criterion) pairs.
        let targets: Vec<(String, String)> = match (request.scope, access) {
            (PatientScope::Only(patients), CompartmentAccess::TypeSearch) => {
                let mut targets = Vec::new();
                for param in compartment_search_params(resource_type) {
                    let value = |id: &str| match *param {
                        "_id" => encode(id),
                        _ => format!("Patient/{}", encode(id)),
                    };
                    let mut batch: Vec<String> = Vec::new();
                    let mut bytes = 0;
                    for id in patients {
                        let value = value(id);
                        if bytes + value.len() > MAX_IDS_BYTES && !batch.is_empty() {
                            targets.push((whole.clone(), format!("{param}={}", batch.join(","))));
                            batch.clear();
                            bytes = 0;
                        }
                        bytes += value.len() + 1;
                        batch.push(value);
                    }
                    if !batch.is_empty() {
                        targets.push((whole.clone(), format!("{param}={}", batch.join(","))));
                    }
                }
                targets
            }
            (PatientScope::Only(patients), CompartmentAccess::CompartmentRoute) => patients
                .iter()
                .map(|p| {
                    let target = format!("{}/Patient/{}/{resource_type}", self.base, encode(p));
                    (target, String::new())
                })
                .collect(),
            _ => vec![(whole, String::new())],
        };
        let mut searches = Vec::new();
        for (target, compartment) in &targets {
            for query in &queries {
                let criteria = [compartment.as_str(), query.as_str()]
                    .into_iter()
                    .filter(|c| !c.is_empty())
                    .collect::<Vec<_>>()
                    .join("&");
                searches.push(Search {
                    target: target.clone(),
                    criteria,
                });
            }
        }
        searches
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

/// The texts of an OperationOutcome body (each issue's `diagnostics`, else `details.text`), or
/// the start of whatever came back.
fn diagnostics(body: &[u8]) -> String {
    let outcome: Option<String> = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let issues = v.get("issue")?.as_array()?;
            let texts: Vec<String> = issues
                .iter()
                .filter_map(|i| {
                    i.get("diagnostics")
                        .or_else(|| i.pointer("/details/text"))
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
    fn waiting_for(&self) -> Option<String> {
        self.0.access.waiting.lock().expect("not poisoned").clone()
    }

    /// The types the server declares that hold resources (a `_summary=count` probe each).
    fn resource_types(&self) -> Result<Vec<String>, SourceError> {
        let this = &self.0;
        this.runtime.block_on(async {
            let declared: Vec<String> = this.capabilities().await?.types.keys().cloned().collect();
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
    /// By `_summary=count` probes over `lastUpdated` windows.
    fn plan(&self, request: &PlanRequest<'_>) -> Result<Vec<Part>, SourceError> {
        super::plan::by_last_updated(self, request)
    }

    fn count(&self, request: &ScanRequest<'_>) -> Result<Option<u64>, SourceError> {
        let whole_type = matches!(request.scope, PatientScope::All)
            || (matches!(request.scope, PatientScope::AnyPatient)
                && request.resource_type == "Patient");
        if !whole_type {
            return Ok(None);
        }
        let search = Search {
            target: format!("{}/{}", self.0.base, request.resource_type),
            criteria: String::new(),
        };
        let url = search.count_url(&window(request));
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
    /// A time-boxed scan pauses where the resources read so far are known whole: at a change of
    /// `lastUpdated` in a read sorted by it, when the server counts as many up to there as were
    /// read. Only a scan of one search pauses (several overlap, and what one passed on would come
    /// again from another after the pause); else, or where no such point is found, it reads on.
    fn scan(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        if matches!(
            request.resume,
            Some(Cursor::Rowid { .. } | Cursor::Id { .. })
        ) {
            return Err(SourceError::Unsupported(
                "a FHIR server cannot resume a scan paused by the embedded store".into(),
            )
            .into());
        }
        let inner = &self.0;
        let access = match request.scope {
            PatientScope::Only(_) => inner
                .runtime
                .block_on(inner.capabilities())?
                .compartment_access(request.resource_type),
            _ => CompartmentAccess::WholeType,
        };
        // Ids seen in this shard: searches may overlap (compartment parameters, ORed filters,
        // reads again), and a server without a stable order can show one resource on two pages.
        // (Bounded by the shard's size, `EXPORT_SHARD_MAX_RESOURCES`.)
        let mut seen = HashSet::new();
        let mut count = 0;
        let mut accept = |id: &str, raw: &RawValue| -> Result<(), ScanError> {
            if !seen.insert(id.to_string()) {
                return Ok(());
            }
            let raw = raw.get().as_bytes();
            let parsed = || serde_json::from_slice::<serde_json::Value>(raw).expect("valid JSON");
            let in_scope = match request.scope {
                PatientScope::All => true,
                PatientScope::AnyPatient => {
                    !patient_ids(request.resource_type, id, &parsed()).is_empty()
                }
                PatientScope::Only(patients) => patient_ids(request.resource_type, id, &parsed())
                    .iter()
                    .any(|p| patients.contains(p)),
            };
            if !in_scope {
                return Ok(());
            }
            if raw.contains(&b'\n') {
                sink(&serde_json::to_vec(&parsed()).expect("JSON serialises"))?;
            } else {
                sink(raw)?;
            }
            count += 1;
            Ok(())
        };
        let searches = inner.searches(request, &access);
        let pause_after = request.pause_after.filter(|_| searches.len() == 1);
        for search in searches {
            let read = Reading {
                request,
                search: &search,
                pause_after,
                furthest: Default::default(),
            };
            if let Some(instant) = self.read_verified(&read, window(request), None, &mut accept)? {
                return Ok(Scanned {
                    count,
                    paused: Some(Cursor::LastUpdated { instant }),
                });
            }
        }
        Ok(Scanned::whole(count))
    }
}

type Accept<'a> = dyn FnMut(&str, &RawValue) -> Result<(), ScanError> + 'a;

/// One search of a scan being read.
struct Reading<'a> {
    request: &'a ScanRequest<'a>,
    search: &'a Search,
    /// Past this instant, pause where the read can resume (see `scan`).
    pause_after: Option<std::time::Instant>,
    /// The latest `lastUpdated` passed on by any read of the search so far: a pause comes no
    /// earlier (an earlier read that went further passed on resources a continuation would read
    /// again).
    furthest: std::cell::Cell<Option<DateTime<Utc>>>,
}

impl RemoteServer {
    /// Reads one search in `window` until a read is known whole: counted the same before and
    /// after, with every counted resource seen. Fewer seen means lost pages (a last page without
    /// `next`, rows shifted by an unstable order); a count that moved means resources left the
    /// window while it was paged (an update moves a resource past the snapshot, which shifts
    /// every offset behind it). Either way the search is read again (what was already passed on
    /// is not passed twice), and after `MAX_PASSES` the shard fails. `limit`: what the server
    /// pages at most in one search (known after it refused more); a wider window is halved first.
    /// `Some(instant)`: the read paused there.
    fn read_verified(
        &self,
        read: &Reading<'_>,
        window: Window,
        limit: Option<u64>,
        accept: &mut Accept<'_>,
    ) -> Result<Option<DateTime<Utc>>, ScanError> {
        let inner = &self.0;
        let search = read.search;
        let count = |window: &Window| {
            inner
                .runtime
                .block_on(inner.total(&search.count_url(window)))
        };
        // Passes whose counts all held still saw one unchanging set: what they saw together
        // counts (an unstable order shows a different part on each pass).
        let mut streak: Option<(u64, HashSet<String>)> = None;
        let mut last = (0, 0, 0);
        for pass in 1..=MAX_PASSES {
            let before = count(&window)?;
            if before == Some(0) {
                // A window's matches only shrink while it is read: nothing to read.
                return Ok(None);
            }
            if let (Some(limit), Some(before)) = (limit, before) {
                if before > limit {
                    return self.read_halves(read, window, limit, None, accept);
                }
            }
            let seen = match self.read_pages(read, &window, before, accept)? {
                Read::Whole(seen) => seen,
                Read::Paused(instant) => return Ok(Some(instant)),
                Read::Refused { after, reason } => {
                    let limit = after.max(1);
                    return self.read_halves(read, window, limit, Some(reason), accept);
                }
            };
            let after = count(&window)?;
            let (Some(before), Some(after)) = (before, after) else {
                // A server that counts nothing cannot be checked.
                return Ok(None);
            };
            let seen_in_pass = seen.len() as u64;
            if before == after {
                let union = match streak.take() {
                    Some((count, mut union)) if count == after => {
                        union.extend(seen);
                        union
                    }
                    _ => seen,
                };
                if union.len() as u64 >= after {
                    return Ok(None);
                }
                streak = Some((after, union));
            } else {
                streak = None;
            }
            tracing::warn!(
                search = %search.url(&window, ""),
                before, after, seen = seen_in_pass, pass,
                "FHIR source: the search changed or skipped resources while paged; reading it again"
            );
            last = (before, after, seen_in_pass);
        }
        let (before, after, seen) = last;
        Err(SourceError::Remote(format!(
            "{}: the pages were incomplete in each of {MAX_PASSES} reads (last: {before} counted before, {after} after, {seen} seen); the server's results keep changing, or its pages skip resources (a last page without a next link, an unstable order)",
            search.url(&window, "")
        ))
        .into())
    }

    /// The window read as two halves, each at most `limit` resources per search.
    fn read_halves(
        &self,
        read: &Reading<'_>,
        window: Window,
        limit: u64,
        refusal: Option<SourceError>,
        accept: &mut Accept<'_>,
    ) -> Result<Option<DateTime<Utc>>, ScanError> {
        let search = read.search;
        let Some(halves) = window.halves() else {
            let why = refusal.map(|e| format!(": {e}")).unwrap_or_default();
            return Err(SourceError::Remote(format!(
                "{}: more resources share one lastUpdated instant than the server pages in one search ({limit}){why}",
                search.url(&window, "")
            ))
            .into());
        };
        if let Some(refusal) = refusal {
            tracing::warn!(%refusal, limit, "FHIR source refused to page further; reading the window in parts");
        }
        for half in halves {
            if let Some(paused) = self.read_verified(read, half, Some(limit), accept)? {
                return Ok(Some(paused));
            }
        }
        Ok(None)
    }

    /// One read of a search, every page, each resource of the type to `accept`.
    /// `counted`: the window's count before this read (`None`: unknown, and the read cannot
    /// pause).
    fn read_pages(
        &self,
        read: &Reading<'_>,
        window: &Window,
        counted: Option<u64>,
        accept: &mut Accept<'_>,
    ) -> Result<Read, ScanError> {
        let inner = &self.0;
        let (request, search) = (read.request, read.search);
        let mut seen: HashSet<String> = HashSet::new();
        let mut pause = PausePoint::default();
        let mut pages = 0;
        let first = |sort: usize| search.url(window, SORTS[sort]);
        let mut sort = inner.sort.load(Ordering::Relaxed);
        let mut pending = Some(inner.runtime.spawn(fetch_page(inner.clone(), first(sort))));
        let mut first_page = true;
        while let Some(fetching) = pending.take() {
            let fetched = inner
                .runtime
                .block_on(fetching)
                .map_err(|e| SourceError::Remote(format!("page fetch stopped: {e}")))?;
            let (url, body) = match fetched {
                Err(SourceError::Unsupported(reason)) if first_page && sort + 1 < SORTS.len() => {
                    // The server refuses this order: ask for a simpler one from now on.
                    tracing::info!(%reason, "FHIR source: no _sort={}; asking {:?}", SORTS[sort], SORTS[sort + 1]);
                    sort += 1;
                    inner.sort.fetch_max(sort, Ordering::Relaxed);
                    pending = Some(inner.runtime.spawn(fetch_page(inner.clone(), first(sort))));
                    continue;
                }
                Err(reason @ SourceError::Unsupported(_)) if !first_page => {
                    return Ok(Read::Refused {
                        after: seen.len() as u64,
                        reason,
                    })
                }
                other => other?,
            };
            let page = parse_page(&url, &body)?;
            if first_page && !SORTS[sort].is_empty() {
                if let Some(warning) = page.sort_warning() {
                    // A sort dropped with a warning is a refusal: the order this read relies on
                    // is not the one asked for.
                    tracing::info!(%warning, "FHIR source: _sort={} dropped with a warning; asking {:?}", SORTS[sort], SORTS[sort + 1]);
                    sort += 1;
                    inner.sort.fetch_max(sort, Ordering::Relaxed);
                    pending = Some(inner.runtime.spawn(fetch_page(inner.clone(), first(sort))));
                    continue;
                }
            }
            first_page = false;
            pages += 1;
            pause.checked_on_page = false;
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
                let last_updated = identity.last_updated();
                let Some(id) = identity.id else {
                    return Err(SourceError::Remote(format!(
                        "{url}: a {} without an id",
                        request.resource_type
                    ))
                    .into());
                };
                // Not on a read's first page: a run reads at least a page, however short its box.
                if read
                    .pause_after
                    .is_some_and(|at| std::time::Instant::now() >= at)
                    && SORTS[sort].starts_with("_lastUpdated")
                    && pages > 1
                    && counted.is_some()
                {
                    // A window's matches only leave it (an update moves a resource past the
                    // snapshot): the same count as before the read means none left, so the
                    // resources up to the pause are those read when the server counts as many.
                    let count_up_to = |upto| {
                        let whole = inner
                            .runtime
                            .block_on(inner.total(&search.count_url(window)))?;
                        if whole != counted {
                            return Ok(None);
                        }
                        let part = Window {
                            after: window.after,
                            upto,
                        };
                        inner
                            .runtime
                            .block_on(inner.total(&search.count_url(&part)))
                    };
                    if pause.last >= read.furthest.get() {
                        if let Some(instant) =
                            pause.before(last_updated, count_up_to, seen.len() as u64)?
                        {
                            return Ok(Read::Paused(instant));
                        }
                    }
                }
                pause.read(last_updated);
                read.furthest.set(read.furthest.get().max(last_updated));
                accept(&id, resource)?;
                seen.insert(id);
            }
        }
        Ok(Read::Whole(seen))
    }
}

/// Where a read sorted by `_lastUpdated` may pause.
#[derive(Default)]
struct PausePoint {
    /// The instant of the last resource read; `None` before the first.
    last: Option<DateTime<Utc>>,
    /// The order broke (or a resource had no `lastUpdated`): this read cannot pause.
    unordered: bool,
    /// The server's count of the read part was asked on this page (once a page at most).
    checked_on_page: bool,
}

impl PausePoint {
    fn read(&mut self, last_updated: Option<DateTime<Utc>>) {
        match (self.last, last_updated) {
            (_, None) => self.unordered = true,
            (Some(last), Some(next)) if next < last => {
                if !self.unordered {
                    tracing::info!("FHIR source: the pages are not in lastUpdated order; this shard cannot pause");
                }
                self.unordered = true;
            }
            _ => {}
        }
        self.last = last_updated.or(self.last);
    }

    /// Before a resource last updated at `next`: the instant to pause at, when everything read so
    /// far (`read` resources) was last updated before `next` and the server counts exactly `read`
    /// up to then (`count_read_part` of the window up to an instant).
    fn before(
        &mut self,
        next: Option<DateTime<Utc>>,
        count_read_part: impl FnOnce(DateTime<Utc>) -> Result<Option<u64>, SourceError>,
        read: u64,
    ) -> Result<Option<DateTime<Utc>>, SourceError> {
        let (Some(last), Some(next)) = (self.last, next) else {
            return Ok(None);
        };
        if self.unordered || self.checked_on_page || next <= last {
            return Ok(None);
        }
        self.checked_on_page = true;
        match count_read_part(last)? {
            Some(counted) if counted == read => Ok(Some(last)),
            counted => {
                tracing::info!(
                    ?counted,
                    read,
                    "FHIR source: the part read is not yet known whole; reading on before pausing"
                );
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operation_outcome_is_read_as_its_texts_not_raw_json() {
        let medplum = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","details":{"text":"Unknown search parameter"}}]}"#;
        assert_eq!(diagnostics(medplum), "Unknown search parameter");
        let two = br#"{"resourceType":"OperationOutcome","issue":[{"diagnostics":"a"},{"diagnostics":"b"}]}"#;
        assert_eq!(diagnostics(two), "a; b");
        assert_eq!(diagnostics(b"  "), "no details");
    }

    #[test]
    fn a_window_halves_at_whole_milliseconds_down_to_microseconds() {
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let wide = Window {
            after: Some(at("2026-01-01T00:00:00Z")),
            upto: at("2026-01-01T00:00:01.000001Z"),
        };
        let [low, high] = wide.halves().unwrap();
        assert_eq!(low.upto, at("2026-01-01T00:00:00.500Z"));
        assert_eq!(
            (low.after, high.after, high.upto),
            (wide.after, Some(low.upto), wide.upto)
        );
        let narrow = Window {
            after: Some(at("2026-01-01T00:00:00Z")),
            upto: at("2026-01-01T00:00:00.000001Z"),
        };
        assert!(narrow.halves().is_none());
    }

    #[test]
    fn compartment_access_follows_the_capability_statement() {
        let statement = serde_json::json!({"rest": [{
            "compartment": ["http://hl7.org/fhir/CompartmentDefinition/patient"],
            "resource": [
                {"type": "Observation", "searchParam": [{"name": "subject"}, {"name": "performer"}]},
                {"type": "Encounter", "searchParam": [{"name": "date"}]},
            ]
        }]});
        let declared = Capabilities::parse(&statement);
        assert_eq!(
            declared.compartment_access("Observation"),
            CompartmentAccess::TypeSearch
        );
        assert_eq!(
            declared.compartment_access("Encounter"),
            CompartmentAccess::CompartmentRoute
        );
        let mut bare = statement.clone();
        bare["rest"][0]
            .as_object_mut()
            .unwrap()
            .remove("compartment");
        let bare = Capabilities::parse(&bare);
        assert_eq!(
            bare.compartment_access("Encounter"),
            CompartmentAccess::WholeType
        );
        assert_eq!(
            bare.types.keys().collect::<Vec<_>>(),
            ["Encounter", "Observation"]
        );
    }

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
