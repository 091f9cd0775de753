//! The HTTP API: one warp filter hands every request to `dispatch`, which routes on the decoded path.
//!
//! - `GET /metadata`
//! - `GET /.well-known/smart-configuration`
//! - `GET|POST /$export`, `/Patient/$export`, `/Group/{id}/$export` (kickoff, Bulk Data STU3);
//!   `POST` of the same with `$export-v4` (STU4)
//! - `GET|DELETE /_operations/export/{jobId}` (status, cancel)
//! - `GET /_exports/{path}` (export files)
//! - `GET /{type}/{id}`, `GET /{type}?...`, `GET /Patient/{id}/{type}?...` (FHIR read and search)

pub mod error;
mod export;
mod history;
mod metadata;
pub mod parameters;
mod search;
pub mod server;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::{Buf, Filter, Reply};

pub use error::ApiError;

use crate::auth::{AuthError, Authenticator, Caller};
use crate::config::FileUrls;
use crate::export::version::BulkVersion;
use crate::export::{Exports, Level};
use crate::fhir::IssueType;

/// Largest request body accepted (a kickoff `Parameters` resource).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How much of an oversized body is read and dropped before answering 413.
const DRAIN_BYTES: usize = 16 << 20;
const FHIR_JSON: &str = "application/fhir+json";
const NDJSON: &str = "application/fhir+ndjson";

/// What the HTTP layer serves from: the exports, the token checks, and how URLs are made.
#[derive(Clone)]
pub struct Api {
    pub exports: Exports,
    /// Bearer-token checks, when `EXPORT_AUTH_ISSUER` is set.
    pub auth: Option<Arc<Authenticator>>,
    /// The public base URL, when set; else each request's scheme and host.
    pub base_url: Option<String>,
    /// How the manifest points at the files.
    pub file_urls: FileUrls,
}

/// A request as the router sees it.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub fn routes(api: Api) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method, path: warp::path::FullPath, query: String, headers, body| {
                let api = api.clone();
                async move {
                    if let Err(error) = head_within_limit(path.as_str(), &query, &headers) {
                        return outcome_response(&error);
                    }
                    // The token first: an unauthenticated client gets its 401 without a byte
                    // of its body read.
                    let segments = segments_of(path.as_str());
                    let endpoint = Route::parse(&segments);
                    let caller = match authorize(&api, endpoint.as_ref(), &headers).await {
                        Ok(caller) => caller,
                        Err(error) => return outcome_response(&error),
                    };
                    // A body is read in one of a few slots, held until the answer: what bodies
                    // hold at once stays bounded however many clients send them. The deadline
                    // counts the wait for a slot.
                    if let Err(error) = declared_length_within_limit(&headers) {
                        return outcome_response(&error);
                    }
                    let (_slot, body) = match has_body(&headers) {
                        false => (None, Ok(Bytes::new())),
                        true => tokio::time::timeout(BODY_TIMEOUT, async {
                            let slot = BODY_SLOTS.acquire().await.expect("never closed");
                            (Some(slot), read_body(body).await)
                        })
                        .await
                        .unwrap_or_else(|_| (None, Err(body_too_slow()))),
                    };
                    let body = match body {
                        Ok(body) => body,
                        Err(error) => return outcome_response(&error),
                    };
                    let request = Request {
                        method,
                        path: path.as_str().to_string(),
                        query,
                        headers,
                        body,
                    };
                    route(&api, &request, endpoint, caller)
                        .await
                        .unwrap_or_else(|error| outcome_response(&error))
                }
            },
        )
}

/// A request body must arrive within this (its wait for a slot included).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bodies read (and answered) at once: with `MAX_BODY_BYTES` each, they hold at most 64 MiB.
const BODIES_AT_ONCE: usize = 64;
static BODY_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BODIES_AT_ONCE);

/// The largest request head (request line and headers) served; the server's read buffer is
/// bounded by the same figure, so a larger head is a 431 however its bytes arrive.
pub const MAX_HEAD_BYTES: usize = 64 << 10;

/// A 431 for a head over [`MAX_HEAD_BYTES`]. hyper refuses a head that is still incomplete when its
/// buffer is full, but one read can take the buffer past that bound with a complete head: this
/// check makes the answer the same every time.
fn head_within_limit(path: &str, query: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let size = path.len()
        + query.len()
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if size <= MAX_HEAD_BYTES {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        IssueType::Invalid,
        format!("the request's headers take more than {MAX_HEAD_BYTES} bytes"),
    )
    .with_header(header::CONNECTION, "close"))
}

/// A 413 for a `Content-Length` over [`MAX_BODY_BYTES`] from a client that waits for
/// `100 Continue` before it sends: it gets the answer without sending the body. A client that
/// sends at once has its body drained (up to a bound) by [`read_body`], so that it reads the 413
/// rather than a reset connection.
fn declared_length_within_limit(headers: &HeaderMap) -> Result<(), ApiError> {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|expect| expect.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(length) if expects_continue && length > MAX_BODY_BYTES as u64 => Err(too_large()),
        _ => Ok(()),
    }
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        IssueType::Invalid,
        format!("request body larger than {MAX_BODY_BYTES} bytes"),
    )
    .with_header(header::CONNECTION, "close")
}

/// The request says a body follows (a length above 0, or chunks).
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0")
}

fn body_too_slow() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        IssueType::Timeout,
        format!(
            "the request body did not arrive within {} s",
            BODY_TIMEOUT.as_secs()
        ),
    )
    .with_header(header::CONNECTION, "close")
}

async fn read_body<S, B>(body: S) -> Result<Bytes, ApiError>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    let mut collected = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                IssueType::Invalid,
                format!("unreadable request body: {e}"),
            )
        })?;
        if collected.len() + chunk.remaining() > MAX_BODY_BYTES {
            // Read on (up to a bound) so the client gets the 413 rather than a reset connection.
            let mut seen = collected.len() + chunk.remaining();
            while let Some(Ok(chunk)) = body.next().await {
                seen += chunk.remaining();
                if seen > DRAIN_BYTES {
                    break;
                }
            }
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            collected.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(collected.freeze())
}

/// Routes one request.
pub async fn dispatch(api: &Api, request: Request) -> Result<Response, ApiError> {
    let segments = segments_of(&request.path);
    let endpoint = Route::parse(&segments);
    let caller = authorize(api, endpoint.as_ref(), &request.headers).await?;
    route(api, &request, endpoint, caller).await
}

/// The path's segments, percent-decoded, empty ones dropped.
fn segments_of(path: &str) -> Vec<String> {
    path.trim_start_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|s| !s.is_empty())
        .collect()
}

/// The endpoints, told apart once from the decoded path.
enum Route<'a> {
    Metadata,
    SmartConfiguration,
    Kickoff(Level, BulkVersion),
    /// `POST [base]/$viewdefinition-export` (SQL on FHIR v2).
    ViewExport,
    /// `GET` polls the status, `DELETE` cancels.
    Job(&'a str),
    Download(String),
    Read {
        resource_type: &'a str,
        id: &'a str,
    },
    Search {
        resource_type: &'a str,
        patient: Option<&'a str>,
    },
    History {
        resource_type: &'a str,
        id: Option<&'a str>,
    },
}

impl<'a> Route<'a> {
    fn parse(segments: &'a [String]) -> Option<Route<'a>> {
        let segments: Vec<&'a str> = segments.iter().map(String::as_str).collect();
        let is_type = |name: &str| crate::fhir::is_resource_type(name);
        Some(match segments.as_slice() {
            ["metadata"] => Route::Metadata,
            [".well-known", "smart-configuration"] => Route::SmartConfiguration,
            [operation] if let Some(version) = BulkVersion::of(operation) => {
                Route::Kickoff(Level::System, version)
            }
            ["Patient", operation] if let Some(version) = BulkVersion::of(operation) => {
                Route::Kickoff(Level::Patient, version)
            }
            ["Group", id, operation] if let Some(version) = BulkVersion::of(operation) => {
                Route::Kickoff(Level::Group(id.to_string()), version)
            }
            ["$viewdefinition-export"] | ["ViewDefinition", "$viewdefinition-export"] => {
                Route::ViewExport
            }
            ["_operations", "export", id] => Route::Job(id),
            ["_exports", rest @ ..] if !rest.is_empty() => Route::Download(rest.join("/")),
            [resource_type] if is_type(resource_type) => Route::Search {
                resource_type,
                patient: None,
            },
            [resource_type, "_history"] if is_type(resource_type) => Route::History {
                resource_type,
                id: None,
            },
            [resource_type, id, "_history"] if is_type(resource_type) => Route::History {
                resource_type,
                id: Some(id),
            },
            [resource_type, id] if is_type(resource_type) && !id.starts_with('$') => {
                Route::Read { resource_type, id }
            }
            ["Patient", patient, resource_type] if is_type(resource_type) => Route::Search {
                resource_type,
                patient: Some(patient),
            },
            _ => return None,
        })
    }

    fn allows(&self, method: &Method) -> Result<(), ApiError> {
        match self {
            Route::Kickoff(_, BulkVersion::Stu3) => only(method, &[Method::GET, Method::POST]),
            Route::Kickoff(_, BulkVersion::Stu4) if *method == Method::POST => Ok(()),
            Route::Kickoff(_, BulkVersion::Stu4) => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                IssueType::NotSupported,
                format!("Bulk Data STU4 ($export-v4) kicks off by POST with a FHIR Parameters body only; {method} is not allowed (a GET kickoff is STU3's, at $export)"),
            )),
            Route::ViewExport => only(method, &[Method::POST]),
            Route::Job(_) => only(method, &[Method::GET, Method::DELETE]),
            _ => only(method, &[Method::GET]),
        }
    }

    /// Discovery stays open with access control on: a client reads it to learn how to get a token.
    fn is_open(&self) -> bool {
        matches!(self, Route::Metadata | Route::SmartConfiguration)
    }
}

/// The caller named by the bearer token, when access control is on. Checked before a body is read.
async fn authorize(
    api: &Api,
    endpoint: Option<&Route<'_>>,
    headers: &HeaderMap,
) -> Result<Option<Caller>, ApiError> {
    let Some(auth) = &api.auth else {
        return Ok(None);
    };
    if endpoint.is_some_and(Route::is_open) {
        return Ok(None);
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    Ok(Some(auth.verify(authorization).await?))
}

/// Answers a request whose caller is known.
async fn route(
    api: &Api,
    request: &Request,
    endpoint: Option<Route<'_>>,
    caller: Option<Caller>,
) -> Result<Response, ApiError> {
    let Some(endpoint) = endpoint else {
        return Err(ApiError::not_found(format!(
            "no such endpoint: {} {}",
            request.method, request.path
        )));
    };
    let method = &request.method;
    endpoint.allows(method)?;
    let caller = caller.as_ref();
    match endpoint {
        Route::Metadata => {
            let token_endpoint = token_endpoint(api).await?;
            Ok(json_response(
                StatusCode::OK,
                FHIR_JSON,
                metadata::capability_statement(&base_url(api, request), token_endpoint.as_deref()),
            ))
        }
        Route::SmartConfiguration => match token_endpoint(api).await? {
            Some(token_endpoint) => Ok(json_response(
                StatusCode::OK,
                "application/json",
                metadata::smart_configuration(&token_endpoint),
            )),
            None => Err(ApiError::not_found(
                "this server runs without access control (no EXPORT_AUTH_ISSUER): there is no SMART configuration to discover",
            )),
        },
        Route::Kickoff(level, version) => {
            export::kickoff(api, request, level, version, caller).await
        }
        Route::ViewExport => export::kickoff_views(api, request, caller).await,
        Route::Job(id) if *method == Method::DELETE => export::cancel(api, id, caller).await,
        Route::Job(id) => export::status(api, id, &request.query, caller).await,
        Route::Download(path) => export::download(api, &path, &request.headers, caller).await,
        Route::Read { resource_type, id } => {
            may_read(caller, resource_type)?;
            search::read(&api.exports.source, resource_type, id).await
        }
        Route::History { resource_type, id } => {
            may_read(caller, resource_type)?;
            let base = base_url(api, request);
            history::history(
                &api.exports.source,
                &base,
                resource_type,
                id,
                &request.query,
            )
            .await
        }
        Route::Search {
            resource_type,
            patient,
        } => {
            may_read(caller, resource_type)?;
            let base = base_url(api, request);
            search::search(
                &api.exports.source,
                &base,
                resource_type,
                patient,
                &request.query,
            )
            .await
        }
    }
}

/// With access control on, the token endpoint that discovery advertises.
async fn token_endpoint(api: &Api) -> Result<Option<String>, ApiError> {
    match &api.auth {
        Some(auth) => Ok(Some(auth.token_endpoint().await?)),
        None => Ok(None),
    }
}

fn may_read(caller: Option<&Caller>, resource_type: &str) -> Result<(), ApiError> {
    match caller {
        Some(caller) if !caller.may_read(resource_type) => {
            Err(AuthError::Forbidden(format!("read access to {resource_type}")).into())
        }
        _ => Ok(()),
    }
}

fn only(method: &Method, allowed: &[Method]) -> Result<(), ApiError> {
    if allowed.contains(method) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        IssueType::NotSupported,
        format!(
            "method {method} is not allowed here; use {}",
            names.join(" or ")
        ),
    ))
}

/// The public base URL: the setting, else scheme and host of the request.
fn base_url(api: &Api, request: &Request) -> String {
    if let Some(base) = &api.base_url {
        return base.clone();
    }
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let scheme = header("x-forwarded-proto")
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    let host = header("x-forwarded-host")
        .or_else(|| header("host"))
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@')
        })
        .unwrap_or("127.0.0.1");
    format!("{scheme}://{host}")
}

/// `202 Accepted` with no body, and so no `Content-Type`.
fn empty_accepted() -> Response {
    StatusCode::ACCEPTED.into_response()
}

fn header_value(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn json_response(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response {
    let mut response = body.into_response();
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

pub fn outcome_response(error: &ApiError) -> Response {
    let mut response = json_response(error.status, FHIR_JSON, error.outcome.to_json());
    for (name, value) in &error.headers {
        response.headers_mut().insert(name, value.clone());
    }
    response
}
