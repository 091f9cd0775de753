//! The HTTP API: one warp filter hands every request to `dispatch`, which routes on the decoded path.
//!
//! - `GET /metadata`
//! - `GET /.well-known/smart-configuration`
//! - `GET|POST /$export`, `/Patient/$export`, `/Group/{id}/$export` (kickoff)
//! - `GET|DELETE /_operations/export/{jobId}` (status, cancel)
//! - `GET /_exports/{path}` (export files)
//! - `GET /{type}/{id}`, `GET /{type}?...`, `GET /Patient/{id}/{type}?...` (FHIR read and search)

pub mod error;
mod metadata;
pub mod parameters;
mod search;
pub mod server;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use warp::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::{Buf, Filter, Reply};

pub use error::ApiError;

use crate::app::App;
use crate::auth::{AuthError, Caller};
use crate::config::FileUrls;
use crate::export::request::{check_headers, is_lenient, KickoffHeaders};
use crate::export::{kickoff, ExportRequest, Level};
use crate::fhir::IssueType;
use crate::jobs::{is_job_id, Change, JobStatus, JOBS_CONTAINER};

/// Largest request body accepted (a kickoff `Parameters` resource).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// How much of an oversized body is read and dropped before answering 413.
const DRAIN_BYTES: usize = 16 << 20;
const FHIR_JSON: &str = "application/fhir+json";
const NDJSON: &str = "application/fhir+ndjson";

/// A request as the router sees it.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub fn routes(app: App) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method, path: warp::path::FullPath, query, headers, body| {
                let app = app.clone();
                async move {
                    // The token first: an unauthenticated client gets its 401 without a byte
                    // of its body read.
                    let segments = segments_of(path.as_str());
                    let caller = match authorize(&app, &segments, &headers).await {
                        Ok(caller) => caller,
                        Err(error) => return outcome_response(&error),
                    };
                    // A body is read in one of a few slots, held until the answer: what bodies
                    // hold at once stays bounded however many clients send them. The deadline
                    // counts the wait for a slot.
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
                    route(&app, request, &segments, caller)
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
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                IssueType::Invalid,
                format!("request body larger than {MAX_BODY_BYTES} bytes"),
            ));
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
pub async fn dispatch(app: &App, request: Request) -> Result<Response, ApiError> {
    let segments = segments_of(&request.path);
    let caller = authorize(app, &segments, &request.headers).await?;
    route(app, request, &segments, caller).await
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

/// The caller named by the bearer token, when access control is on (discovery stays open: a
/// client reads it to learn how to get a token). Checked before a body is read.
async fn authorize(
    app: &App,
    segments: &[String],
    headers: &HeaderMap,
) -> Result<Option<Caller>, ApiError> {
    let Some(auth) = &app.auth else {
        return Ok(None);
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    if matches!(
        segments.as_slice(),
        ["metadata"] | [".well-known", "smart-configuration"]
    ) {
        return Ok(None);
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    Ok(Some(auth.verify(authorization).await?))
}

/// Routes a request whose caller is known.
async fn route(
    app: &App,
    request: Request,
    segments: &[String],
    caller: Option<Caller>,
) -> Result<Response, ApiError> {
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = &request.method;
    let caller = caller.as_ref();
    match segments.as_slice() {
        ["metadata"] => {
            only(method, &[Method::GET])?;
            let token_endpoint = token_endpoint(app).await?;
            Ok(json_response(
                StatusCode::OK,
                FHIR_JSON,
                metadata::capability_statement(&base_url(app, &request), token_endpoint.as_deref()),
            ))
        }
        ["$export"] => {
            only(method, &[Method::GET, Method::POST])?;
            kickoff_export(app, &request, Level::System, caller).await
        }
        ["Patient", "$export"] => {
            only(method, &[Method::GET, Method::POST])?;
            kickoff_export(app, &request, Level::Patient, caller).await
        }
        ["Group", id, "$export"] => {
            only(method, &[Method::GET, Method::POST])?;
            kickoff_export(app, &request, Level::Group(id.to_string()), caller).await
        }
        [".well-known", "smart-configuration"] => {
            only(method, &[Method::GET])?;
            let token_endpoint = token_endpoint(app).await?;
            Ok(json_response(
                StatusCode::OK,
                "application/json",
                metadata::smart_configuration(token_endpoint.as_deref()),
            ))
        }
        ["_operations", "export", id] => {
            only(method, &[Method::GET, Method::DELETE])?;
            if *method == Method::DELETE {
                cancel(app, id, caller).await
            } else {
                status(app, id, caller).await
            }
        }
        ["_exports", rest @ ..] if !rest.is_empty() => {
            only(method, &[Method::GET])?;
            download(app, &rest.join("/"), caller).await
        }
        [resource_type] if crate::fhir::is_resource_type(resource_type) => {
            only(method, &[Method::GET])?;
            may_read(caller, resource_type)?;
            search::search(
                app,
                &base_url(app, &request),
                resource_type,
                None,
                &request.query,
            )
            .await
        }
        [resource_type, id]
            if crate::fhir::is_resource_type(resource_type) && !id.starts_with('$') =>
        {
            only(method, &[Method::GET])?;
            may_read(caller, resource_type)?;
            search::read(app, resource_type, id).await
        }
        ["Patient", patient, resource_type] if crate::fhir::is_resource_type(resource_type) => {
            only(method, &[Method::GET])?;
            may_read(caller, resource_type)?;
            let base = base_url(app, &request);
            search::search(app, &base, resource_type, Some(patient), &request.query).await
        }
        _ => Err(ApiError::not_found(format!(
            "no such endpoint: {} {}",
            request.method, request.path
        ))),
    }
}

/// With access control on, the token endpoint that discovery advertises.
async fn token_endpoint(app: &App) -> Result<Option<String>, ApiError> {
    match &app.auth {
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

/// Narrows an export to the types the caller may read: `_type` naming another type is refused,
/// no `_type` means every readable type.
fn limit_to_readable(caller: Option<&Caller>, export: &mut ExportRequest) -> Result<(), ApiError> {
    let Some(readable) = caller.and_then(Caller::readable_types) else {
        return Ok(());
    };
    let filtered_types = export
        .type_filters
        .iter()
        .filter_map(|query| query.split('?').next());
    let requested = export.types.iter().flatten().map(String::as_str);
    let refused: Vec<&str> = requested
        .chain(filtered_types)
        .filter(|t| !readable.iter().any(|r| r == t))
        .collect();
    if !refused.is_empty() {
        return Err(AuthError::Forbidden(format!(
            "read access to {} (asked for in _type or _typeFilter)",
            refused.join(", ")
        ))
        .into());
    }
    if export.types.is_none() {
        export.types = Some(readable.to_vec());
    }
    Ok(())
}

/// A job the caller may see: with tokens checked, only its owner's.
fn visible(job: &crate::jobs::Job, caller: Option<&Caller>) -> bool {
    caller.is_none_or(|caller| job.owner.as_deref() == Some(caller.owner.as_str()))
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
fn base_url(app: &App, request: &Request) -> String {
    if let Some(base) = &app.settings.base_url {
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

async fn kickoff_export(
    app: &App,
    request: &Request,
    level: Level,
    caller: Option<&Caller>,
) -> Result<Response, ApiError> {
    let header = |name: header::HeaderName| request.headers.get(name).and_then(|v| v.to_str().ok());
    let prefer = header(header::HeaderName::from_static("prefer"));
    check_headers(&KickoffHeaders {
        accept: header(header::ACCEPT),
        prefer,
    })?;
    let query = if request.method == Method::POST {
        if !request.query.is_empty() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                IssueType::Invalid,
                "a POST kickoff takes its parameters in a Parameters body, not in the query string",
            ));
        }
        parameters::to_query(&request.body)?
    } else {
        request.query.clone()
    };
    let mut export = ExportRequest::from_query(
        level,
        &query,
        is_lenient(prefer),
        request.method == Method::POST,
    )?;
    limit_to_readable(caller, &mut export)?;
    let base = base_url(app, request);
    let request_url = match request.query.is_empty() {
        true => format!("{base}{}", request.path),
        false => format!("{base}{}?{}", request.path, request.query),
    };
    let owner = caller.map(|c| c.owner.clone());
    let job = kickoff::start(app, export, request_url, base.clone(), owner).await?;
    let mut response = empty_accepted();
    let location = format!("{base}/_operations/export/{}", job.id);
    response
        .headers_mut()
        .insert(header::CONTENT_LOCATION, header_value(&location));
    Ok(response)
}

fn unknown_job(id: &str) -> ApiError {
    ApiError::not_found(format!("no export {id:?} (unknown, expired or cancelled)"))
}

async fn status(app: &App, id: &str, caller: Option<&Caller>) -> Result<Response, ApiError> {
    let unknown = || unknown_job(id);
    if !is_job_id(id) {
        return Err(unknown());
    }
    let (job, _) = app
        .jobs
        .load(id)
        .await?
        .filter(|(job, _)| visible(job, caller))
        .ok_or_else(unknown)?;
    match job.status {
        JobStatus::Cancelled => Err(unknown()),
        JobStatus::Failed => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueType::Exception,
            job.failure.unwrap_or_else(|| "the export failed".into()),
        )),
        JobStatus::Completed => {
            let manifest = app.jobs.manifest(id).await?.ok_or_else(unknown)?;
            let manifest = match app.settings.file_urls {
                FileUrls::Proxy => manifest.to_vec(),
                FileUrls::Sas => with_signed_urls(app, &job.base_url, &manifest).await?,
            };
            let mut response = json_response(StatusCode::OK, "application/json", manifest);
            if let Some(expires) = job.expires_at(app.settings.retention) {
                let date = expires.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                response
                    .headers_mut()
                    .insert(header::EXPIRES, header_value(&date));
            }
            Ok(response)
        }
        JobStatus::Running => {
            let (done, total) = (job.shards_done(), job.shards.len());
            let percent = (done * 100).checked_div(total).unwrap_or(100);
            let mut response = empty_accepted();
            let headers = response.headers_mut();
            headers.insert(
                "x-progress",
                header_value(&format!("{percent}% ({done}/{total} shards)")),
            );
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            Ok(response)
        }
    }
}

/// The manifest with each file's URL replaced by a short-lived read-only URL straight to the
/// storage (signed at each poll, so a client that polls again gets fresh ones); no token needed.
async fn with_signed_urls(app: &App, base_url: &str, manifest: &[u8]) -> Result<Vec<u8>, ApiError> {
    let mut manifest: serde_json::Value = serde_json::from_slice(manifest).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueType::Exception,
            format!("the stored manifest is unreadable: {e}"),
        )
    })?;
    let served_at = format!("{}/_exports/", base_url.trim_end_matches('/'));
    let expiry = chrono::Utc::now() + crate::config::SAS_URL_LIFETIME;
    let mut all_signed = true;
    for list in ["output", "error"] {
        let Some(files) = manifest.get_mut(list).and_then(|l| l.as_array_mut()) else {
            continue;
        };
        for file in files {
            let Some(path) = file["url"]
                .as_str()
                .and_then(|url| url.strip_prefix(&served_at))
                .map(|path| {
                    percent_encoding::percent_decode_str(path)
                        .decode_utf8_lossy()
                        .into_owned()
                })
            else {
                all_signed = false;
                continue;
            };
            match app.storage.signed_read_url(&path, expiry).await? {
                Some(url) => file["url"] = url.into(),
                None => all_signed = false,
            }
        }
    }
    if all_signed {
        manifest["requiresAccessToken"] = false.into();
    }
    Ok(serde_json::to_vec_pretty(&manifest).expect("JSON"))
}

async fn cancel(app: &App, id: &str, caller: Option<&Caller>) -> Result<Response, ApiError> {
    let unknown = || unknown_job(id);
    if !is_job_id(id) {
        return Err(unknown());
    }
    let mark_cancelled = || {
        app.jobs.update(id, |job| match job.status {
            _ if !visible(job, caller) => Change::Keep(None),
            JobStatus::Cancelled => Change::Keep(None),
            _ => {
                job.status = JobStatus::Cancelled;
                job.completed_at = Some(chrono::Utc::now());
                Change::Write(Some(job.output_folder.clone()))
            }
        })
    };
    let folder = match mark_cancelled().await {
        Err(crate::jobs::JobError::Storage(full)) if full.is_full() => {
            // No room to record the cancel: the export's files go first, which makes room, then
            // the record; should even that fail, the job's state goes too (a cancelled export is
            // gone either way).
            let job = match app.jobs.load(id).await? {
                Some((job, _)) if visible(&job, caller) && job.status != JobStatus::Cancelled => {
                    job
                }
                _ => return Err(unknown()),
            };
            app.storage.delete_prefix(&job.output_folder).await?;
            match mark_cancelled().await {
                Err(crate::jobs::JobError::Storage(still)) if still.is_full() => {
                    tracing::warn!(
                        job_id = id,
                        "storage full: the cancelled export's state removed"
                    );
                    app.jobs.delete(id).await?;
                }
                other => {
                    other?;
                }
            }
            job.output_folder
        }
        Err(crate::jobs::JobError::Corrupt { .. }) => {
            // Its folder and owner cannot be read: its state goes, so it stops troubling anyone.
            app.jobs.delete(id).await?;
            tracing::warn!(job_id = id, "unreadable job document deleted on cancel");
            return Ok(json_response(
                StatusCode::ACCEPTED,
                FHIR_JSON,
                crate::fhir::OperationOutcome::information(format!(
                    "export {id} had an unreadable state document, now removed; its files could not be located"
                ))
                .to_json(),
            ));
        }
        other => other?.flatten().ok_or_else(unknown)?,
    };
    app.storage.delete_prefix(&folder).await?;
    app.storage
        .delete_prefix(&crate::jobs::JobStore::manifest_path(id))
        .await?;
    tracing::info!(job_id = id, "export cancelled");
    Ok(json_response(
        StatusCode::ACCEPTED,
        FHIR_JSON,
        crate::fhir::OperationOutcome::information(format!(
            "export {id} cancelled; its files are removed"
        ))
        .to_json(),
    ))
}

async fn download(app: &App, path: &str, caller: Option<&Caller>) -> Result<Response, ApiError> {
    let missing = || ApiError::not_found(format!("no export file {path:?}"));
    let servable = path.ends_with(".ndjson")
        && !path.starts_with(&format!("{JOBS_CONTAINER}/"))
        && crate::storage::validate_path(path).is_ok();
    if !servable {
        return Err(missing());
    }
    if caller.is_some() {
        // The folder names the job (`{yyyyMMddTHHmmss}-{jobId}`); only its owner reads the files.
        let job_id = path
            .rsplit('/')
            .skip(1)
            .find_map(|folder| folder.get(folder.len().checked_sub(32)?..))
            .filter(|id| is_job_id(id))
            .ok_or_else(missing)?;
        let job = app
            .jobs
            .load(job_id)
            .await?
            .map(|(job, _)| job)
            .filter(|job| visible(job, caller))
            .ok_or_else(missing)?;
        match file_type(&job, path).ok_or_else(missing)? {
            FileType::Notes => {}
            FileType::Resources(resource_type) => may_read(caller, resource_type)?,
        }
    }
    let (size, stream) = match app.storage.read_stream(path).await {
        Ok(found) => found.ok_or_else(missing)?,
        Err(crate::storage::StorageError::InvalidPath(_)) => return Err(missing()),
        Err(error) => return Err(error.into()),
    };
    let mut response = warp::reply::stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    Ok(response)
}

enum FileType<'a> {
    /// The request's notes (`OperationOutcome-1.ndjson`): the owner's whatever its scopes.
    Notes,
    Resources(&'a str),
}

/// What one of a job's files holds: `{stem}-{n}.ndjson` of one of its shards, or the notes.
fn file_type<'a>(job: &'a crate::jobs::Job, path: &str) -> Option<FileType<'a>> {
    let name = path.strip_prefix(&format!("{}/", job.output_folder))?;
    if name == crate::export::NOTES_FILE {
        return (!job.request.notes.is_empty()).then_some(FileType::Notes);
    }
    job.shards.iter().find_map(|shard| {
        let number = name
            .strip_prefix(shard.stem.as_str())?
            .strip_prefix('-')?
            .strip_suffix(".ndjson")?;
        let numbered = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
        numbered.then_some(FileType::Resources(shard.resource_type.as_str()))
    })
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
