//! The HTTP side: one GET with retries, backoff and `Retry-After`, the bearer token (cached),
//! refusals waited out while access propagates, and what a refusal says.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::runtime::Handle;
use tokio::sync::{Mutex, Semaphore};

use std::sync::Arc;

use azure_core::credentials::TokenCredential;

use super::capabilities::Capabilities;
use crate::fhir::outcome::texts_in;
use crate::source::SourceError;

/// How long refusals are waited out by default: role assignments take up to about 10 minutes.
pub const DEFAULT_ACCESS_WAIT: Duration = Duration::from_secs(600);
/// Requests to the server in flight at once, per process.
pub(super) const MAX_IN_FLIGHT: usize = 8;
const MAX_RETRIES: u32 = 8;

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

/// A FHIR server as the source (see the module's header).
pub struct RemoteServer(pub(super) Arc<Inner>);

pub(super) struct CachedToken {
    pub(super) token: String,
    pub(super) refresh_at: std::time::Instant,
}

pub(super) struct Inner {
    pub(super) base: String,
    pub(super) client: reqwest::Client,
    pub(super) auth: RemoteAuth,
    pub(super) token: Mutex<Option<CachedToken>>,
    pub(super) in_flight: Semaphore,
    pub(super) runtime: Handle,
    pub(super) requests: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) waiting_micros: AtomicU64,
    pub(super) capabilities: tokio::sync::OnceCell<Capabilities>,
    /// The first of `SORTS` the server has not refused.
    pub(super) sort: std::sync::atomic::AtomicUsize,
    pub(super) access: AccessWait,
}

/// Refusals (401, 403) waited out while the app's access may still be on its way: a role assigned
/// moments before (FHIR Data Reader at `azd up`) takes minutes to reach the FHIR service. Until the
/// server has answered once, a refusal is retried with backoff, for at most `window` after the
/// first one; after that, or once the server has answered, a refusal is final.
pub(super) struct AccessWait {
    pub(super) window: Duration,
    pub(super) granted: std::sync::atomic::AtomicBool,
    pub(super) first_refusal: std::sync::Mutex<Option<std::time::Instant>>,
    /// While waiting: what for.
    pub(super) waiting: std::sync::Mutex<Option<String>>,
}

impl AccessWait {
    pub(super) fn new(window: Duration) -> Self {
        Self {
            window,
            granted: std::sync::atomic::AtomicBool::new(false),
            first_refusal: std::sync::Mutex::new(None),
            waiting: std::sync::Mutex::new(None),
        }
    }

    /// After a refusal: `Ok` with how long to wait before asking again, or `Err` with how long it
    /// has been refused when the refusal is final.
    pub(super) fn after_refusal(&self, status: u16, refusals: u32) -> Result<Duration, Duration> {
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

    pub(super) fn answered(&self) {
        if !self.granted.swap(true, Ordering::Relaxed) {
            *self.waiting.lock().expect("not poisoned") = None;
        }
    }
}

/// What one GET brought back.
pub(super) enum Fetched {
    Body(Bytes),
    NotFound,
}

/// A `Retry-After` value: seconds, or an HTTP date (the wait until then, none if it has passed).
pub fn retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

impl Inner {
    pub(super) fn new(base: &str, auth: RemoteAuth) -> Result<Self, SourceError> {
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

    pub(super) async fn bearer(&self) -> Result<Option<String>, SourceError> {
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
    pub(super) async fn get(&self, url: &str) -> Result<Fetched, SourceError> {
        let mut attempt = 0;
        let mut refusals = 0;
        loop {
            let outcome = self.send_once(url).await?;
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
                            texts_in(&body)
                        )));
                    }
                    tracing::warn!(url, %status, attempt = attempt + 1, "FHIR source answered {status}; retrying");
                    retry_after
                }
                Ok((status, _, body)) if status == 401 || status == 403 => {
                    let wait = self.after_refusal(url, status, &body, refusals)?;
                    refusals += 1;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Ok((status, _, body)) => {
                    return Err(SourceError::Unsupported(format!(
                        "{url}: the FHIR server rejected the request ({status}): {}",
                        texts_in(&body)
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

    /// One GET, bounded by the requests in flight: the status, `Retry-After` and body, or the
    /// error that kept an answer from coming.
    async fn send_once(
        &self,
        url: &str,
    ) -> Result<Result<(reqwest::StatusCode, Option<Duration>, Bytes), reqwest::Error>, SourceError>
    {
        let _permit = self.in_flight.acquire().await.expect("never closed");
        self.requests.fetch_add(1, Ordering::Relaxed);
        // Strict handling: a server that cannot honour a parameter (a `_sort` key, say) answers
        // 400, where under its default lenient handling it would drop it.
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
                response
                    .bytes()
                    .await
                    .map(|body| (status, retry_after, body))
            }
            Err(e) => Err(e),
        };
        let waited = sent.elapsed().as_micros() as u64;
        self.waiting_micros.fetch_add(waited, Ordering::Relaxed);
        Ok(answer)
    }

    /// After a 401 or 403: how long to wait before asking again (the access may still be on its
    /// way), or the error naming the role the app's identity lacks.
    fn after_refusal(
        &self,
        url: &str,
        status: reqwest::StatusCode,
        body: &[u8],
        refusals: u32,
    ) -> Result<Duration, SourceError> {
        match self.access.after_refusal(status.as_u16(), refusals) {
            Ok(wait) => {
                tracing::warn!(url, %status, wait_secs = wait.as_secs(), "FHIR source refused access; waiting for the role assignment to take effect");
                self.retries.fetch_add(1, Ordering::Relaxed);
                Ok(wait)
            }
            Err(waited) => Err(SourceError::Remote(format!(
                "{url}: the FHIR server refused access ({status}): {}; the app's identity needs read access (the role FHIR Data Reader on Azure Health Data Services){}",
                texts_in(body),
                match waited.as_secs() {
                    0 => String::new(),
                    secs => format!(", and was refused for {secs} s"),
                }
            ))),
        }
    }

    pub(super) async fn get_body(&self, url: &str) -> Result<Bytes, SourceError> {
        match self.get(url).await? {
            Fetched::Body(body) => Ok(body),
            Fetched::NotFound => Err(SourceError::Unsupported(format!("{url}: not found (404)"))),
        }
    }
}

impl Inner {
    pub(super) async fn capabilities(&self) -> Result<&Capabilities, SourceError> {
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
}
