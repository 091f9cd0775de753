//! The export endpoints: kickoff, status (with the manifest), cancel, and the export files.

use warp::http::{header, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Reply;

use super::{
    base_url, empty_accepted, header_value, json_response, may_read, parameters, Api, ApiError,
    Request, FHIR_JSON, NDJSON,
};
use crate::auth::{AuthError, Caller};
use crate::config::FileUrls;
use crate::export::jobs::{is_job_id, JobStatus, JOBS_CONTAINER};
use crate::export::request::{check_headers, is_lenient, wants_separate_status, KickoffHeaders};
use crate::export::version::BulkVersion;
use crate::export::{kickoff, pages, ExportRequest, Level};
use crate::fault::Fault;
use crate::fhir::IssueType;

/// `[base]/$export` (STU3: GET, or POST of a Parameters body) and `[base]/$export-v4` (STU4:
/// POST of a Parameters body) at each level.
pub async fn kickoff(
    api: &Api,
    request: &Request,
    level: Level,
    version: BulkVersion,
    caller: Option<&Caller>,
) -> Result<Response, ApiError> {
    let prefer = checked_kickoff_headers(request)?;
    let lenient = is_lenient(prefer.as_deref());
    let via_post = request.method == Method::POST;
    if via_post && !request.query.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::Invalid,
            "a POST kickoff takes its parameters in a Parameters body, not in the query string",
        ));
    }
    let export = match version {
        BulkVersion::Stu4 => ExportRequest::from_stu4_parameters(level, &request.body, lenient)?,
        BulkVersion::Stu3 if via_post => {
            let query = parameters::to_query(&request.body)?;
            ExportRequest::from_query(level, &query, lenient, true)?
        }
        BulkVersion::Stu3 => ExportRequest::from_query(level, &request.query, lenient, false)?,
    };
    start_job(api, request, caller, export, prefer.as_deref(), lenient).await
}

/// The kickoff's `Prefer` header, once `Accept` and `Prefer` are checked.
fn checked_kickoff_headers(request: &Request) -> Result<Option<String>, ApiError> {
    let header = |name: header::HeaderName| request.headers.get(name).and_then(|v| v.to_str().ok());
    let prefer = header(header::HeaderName::from_static("prefer"));
    check_headers(&KickoffHeaders {
        accept: header(header::ACCEPT),
        prefer,
    })?;
    Ok(prefer.map(str::to_string))
}

/// Starts the job of a checked request for the caller: `202` with the status URL.
async fn start_job(
    api: &Api,
    request: &Request,
    caller: Option<&Caller>,
    mut export: ExportRequest,
    prefer: Option<&str>,
    lenient: bool,
) -> Result<Response, ApiError> {
    export.separate_export_status = wants_separate_status(prefer);
    limit_to_readable(caller, &mut export)?;
    let base = base_url(api, request);
    let request_url = match request.query.is_empty() {
        true => format!("{base}{}", request.path),
        false => format!("{base}{}?{}", request.path, request.query),
    };
    let owner = caller.map(|c| c.owner.clone());
    let applied = preferences_applied(&export, lenient);
    let job = kickoff::start(&api.exports, export, request_url, base.clone(), owner).await?;
    let mut response = empty_accepted();
    let location = format!("{base}/_operations/export/{}", job.id);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LOCATION, header_value(&location));
    headers.insert("preference-applied", header_value(&applied));
    Ok(response)
}

/// `POST [base]/$viewdefinition-export`: the views of its `Parameters` body, each checked whole,
/// exported as `$export` runs (202 and a status URL, the same polling, cancel and manifest).
pub async fn kickoff_views(
    api: &Api,
    request: &Request,
    caller: Option<&Caller>,
) -> Result<Response, ApiError> {
    let prefer = checked_kickoff_headers(request)?;
    let storage = api.exports.storage.as_ref();
    let body = crate::export::views::with_referenced_views(storage, &request.body).await?;
    let export = crate::export::views::from_parameters(&body)?;
    // Views are checked strictly: handling=lenient is not applied to them.
    start_job(api, request, caller, export, prefer.as_deref(), false).await
}

/// The `Prefer` tokens this kickoff honours (RFC 7240 `Preference-Applied`).
fn preferences_applied(export: &ExportRequest, lenient: bool) -> String {
    let mut applied = vec!["respond-async"];
    if lenient {
        applied.push("handling=lenient");
    }
    if export.separate_export_status {
        applied.push("separate-export-status");
    }
    applied.join(", ")
}

fn unknown_job(id: &str) -> ApiError {
    ApiError::not_found(format!("no export {id:?} (unknown, expired or cancelled)"))
}

/// A status poll (`?page=n`: page n of the manifest, for a client that allows partial manifests).
/// With `Prefer: separate-export-status` at kickoff, a poll that reaches the export answers 200,
/// and the export's own status (202 running, 200 complete, 4xx/5xx failed) goes in
/// `X-Export-Status`; an unknown export is still a 404, the poll's own failure.
pub async fn status(
    api: &Api,
    id: &str,
    query: &str,
    caller: Option<&Caller>,
) -> Result<Response, ApiError> {
    let unknown = || unknown_job(id);
    if !is_job_id(id) {
        return Err(unknown());
    }
    let page = manifest_page(query)?;
    let (job, _) = api
        .exports
        .jobs
        .load(id)
        .await?
        .filter(|(job, _)| visible(job, caller))
        .ok_or_else(unknown)?;
    if page > 1 && !job.request.allow_partial_manifests {
        return Err(ApiError::not_found(format!(
            "export {id} has a manifest of one page (it did not ask for allowPartialManifests)"
        )));
    }
    if !job.request.separate_export_status || job.status == JobStatus::Cancelled {
        return export_status(api, job, page).await;
    }
    let mut response = match export_status(api, job, page).await {
        Ok(response) => response,
        Err(error) if error.status == StatusCode::NOT_FOUND => return Err(error),
        Err(error) => super::outcome_response(&error),
    };
    let export_status = response.status();
    *response.status_mut() = StatusCode::OK;
    response
        .headers_mut()
        .insert("x-export-status", HeaderValue::from(export_status.as_u16()));
    Ok(response)
}

/// The `page` a status poll asks for: 1 unless given.
fn manifest_page(query: &str) -> Result<usize, ApiError> {
    let mut pages = form_urlencoded::parse(query.as_bytes()).filter(|(name, _)| name == "page");
    let Some((_, value)) = pages.next() else {
        return Ok(1);
    };
    if pages.next().is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            IssueType::Invalid,
            "page is given more than once; ask for one page",
        ));
    }
    let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    digits
        .then(|| value.parse().ok())
        .flatten()
        .filter(|&page| page >= 1)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                IssueType::Invalid,
                format!("page {value:?} is not a manifest page number (1, 2, ...)"),
            )
        })
}

/// The export's own status, as a Bulk Data status answer: for a client that allows partial
/// manifests, page `page` of the manifest (also while the export runs).
async fn export_status(
    api: &Api,
    job: crate::export::jobs::Job,
    page: usize,
) -> Result<Response, ApiError> {
    let id = job.id.clone();
    let id = id.as_str();
    let unknown = || unknown_job(id);
    let paged = job.request.allow_partial_manifests
        && matches!(job.status, JobStatus::Running | JobStatus::Completed);
    if paged {
        return paged_status(api, &job, page).await;
    }
    match job.status {
        JobStatus::Cancelled => Err(unknown()),
        JobStatus::Failed => Err(ApiError::of_fault(
            job.failure_fault.unwrap_or(Fault::Internal),
            job.failure.unwrap_or_else(|| "the export failed".into()),
        )),
        JobStatus::Completed => {
            let manifest = api.exports.jobs.manifest(id).await?.ok_or_else(unknown)?;
            completed(api, &job, manifest.to_vec()).await
        }
        JobStatus::Running => running(api, &job).await,
    }
}

/// A manifest (or page of it) with the file URLs `EXPORT_FILE_URLS` gives clients.
async fn with_client_urls(
    api: &Api,
    job: &crate::export::jobs::Job,
    manifest: Vec<u8>,
) -> Result<Vec<u8>, ApiError> {
    match api.file_urls {
        FileUrls::Proxy => Ok(manifest),
        FileUrls::Sas => with_signed_urls(api, &job.base_url, &manifest).await,
    }
}

/// A completed export's manifest (or page of it): 200, with `Expires`.
async fn completed(
    api: &Api,
    job: &crate::export::jobs::Job,
    manifest: Vec<u8>,
) -> Result<Response, ApiError> {
    let manifest = with_client_urls(api, job, manifest).await?;
    let mut response = json_response(StatusCode::OK, "application/json", manifest);
    if let Some(expires) = job.expires_at(api.exports.limits.retention) {
        let date = expires.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
        response
            .headers_mut()
            .insert(header::EXPIRES, header_value(&date));
    }
    Ok(response)
}

/// A page of the manifest of an export that allows partial manifests: while it runs, 202 with the
/// files finished so far (none yet: no body); once complete, 200.
async fn paged_status(
    api: &Api,
    job: &crate::export::jobs::Job,
    page: usize,
) -> Result<Response, ApiError> {
    let status_url = format!("{}/_operations/export/{}", job.base_url, job.id);
    let done = api.exports.jobs.done_shards(&job.id).await?;
    let served = pages::serve(&api.exports, job, page, &done, |n| {
        format!("{status_url}?page={n}")
    })
    .await?;
    let manifest = match served {
        pages::Served::Page(manifest) => serde_json::to_vec_pretty(&manifest).expect("JSON"),
        pages::Served::NothingYet => return Ok(in_progress(api, job, done.len())),
        pages::Served::Missing => {
            return Err(ApiError::not_found(format!(
            "export {} has no manifest page {page} (yet): follow the link of the page before it",
            job.id
        )))
        }
    };
    if job.status == JobStatus::Completed {
        return completed(api, job, manifest).await;
    }
    let manifest = with_client_urls(api, job, manifest).await?;
    let mut response = in_progress(api, job, done.len());
    *response.body_mut() = manifest.into();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// A running export's answer: 202 with its progress, from one listing of the done markers
/// however many shards.
async fn running(api: &Api, job: &crate::export::jobs::Job) -> Result<Response, ApiError> {
    let done = match job.planned {
        true => api.exports.jobs.done_shards(&job.id).await?.len(),
        false => 0,
    };
    Ok(in_progress(api, job, done))
}

/// 202 with `X-Progress` (`done` shards finished) and `Retry-After`.
fn in_progress(api: &Api, job: &crate::export::jobs::Job, done: usize) -> Response {
    let progress = match job.planned {
        false => match api.exports.source.waiting_for() {
            Some(waiting) => format!("planning the shards: {waiting}"),
            None => "planning the shards".to_string(),
        },
        true => {
            let total = job.shards.len();
            let done = done.min(total);
            let percent = (done * 100).checked_div(total).unwrap_or(100);
            format!("{percent}% ({done}/{total} shards)")
        }
    };
    let mut response = empty_accepted();
    let headers = response.headers_mut();
    headers.insert("x-progress", header_value(&progress));
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// The manifest with each file's URL replaced by a short-lived read-only URL straight to the
/// storage (signed at each poll, so a client that polls again gets fresh ones); no token needed.
async fn with_signed_urls(api: &Api, base_url: &str, manifest: &[u8]) -> Result<Vec<u8>, ApiError> {
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
    // A file named twice (a `continuesInFile` and the next file's `url`) gets one URL.
    let mut signed = std::collections::HashMap::<String, Option<String>>::new();
    for list in ["output", "deleted", "error", "outcome"] {
        let Some(files) = manifest.get_mut(list).and_then(|l| l.as_array_mut()) else {
            continue;
        };
        for file in files {
            for field in ["url", "continuesInFile"] {
                let Some(url) = file.get(field).and_then(|u| u.as_str()) else {
                    continue;
                };
                let Some(path) = url.strip_prefix(&served_at).map(|path| {
                    percent_encoding::percent_decode_str(path)
                        .decode_utf8_lossy()
                        .into_owned()
                }) else {
                    all_signed = false;
                    continue;
                };
                let url = match signed.get(&path) {
                    Some(url) => url.clone(),
                    None => {
                        let url = api.exports.storage.signed_read_url(&path, expiry).await?;
                        signed.insert(path, url.clone());
                        url
                    }
                };
                match url {
                    Some(url) => file[field] = url.into(),
                    None => all_signed = false,
                }
            }
        }
    }
    if all_signed {
        manifest["requiresAccessToken"] = false.into();
    }
    Ok(serde_json::to_vec_pretty(&manifest).expect("JSON"))
}

pub async fn cancel(api: &Api, id: &str, caller: Option<&Caller>) -> Result<Response, ApiError> {
    use crate::export::ending::Cancelled;
    let unknown = || unknown_job(id);
    if !is_job_id(id) {
        return Err(unknown());
    }
    match api.exports.cancel_job(id, |job| visible(job, caller)).await? {
        Cancelled::Unknown => return Err(unknown()),
        Cancelled::UnreadableRemoved => {
            return Ok(json_response(
                StatusCode::ACCEPTED,
                FHIR_JSON,
                crate::fhir::OperationOutcome::information(format!(
                    "export {id} had an unreadable state document, now removed; its files could not be located"
                ))
                .to_json(),
            ))
        }
        Cancelled::Done => {}
    }
    Ok(json_response(
        StatusCode::ACCEPTED,
        FHIR_JSON,
        crate::fhir::OperationOutcome::information(format!(
            "export {id} cancelled; its files are removed"
        ))
        .to_json(),
    ))
}

/// One export file: streamed as stored, or gzip-compressed when the client asks for it.
pub async fn download(
    api: &Api,
    path: &str,
    request_headers: &warp::http::HeaderMap,
    caller: Option<&Caller>,
) -> Result<Response, ApiError> {
    let missing = || ApiError::not_found(format!("no export file {path:?}"));
    let deid_container = &api.exports.limits.deid.container;
    let servable = [".ndjson", ".csv", ".parquet"]
        .iter()
        .any(|extension| path.ends_with(extension))
        && !path.starts_with(&format!("{JOBS_CONTAINER}/"))
        && !path.starts_with(&format!("{deid_container}/"))
        && !path.starts_with(&format!("{}/", crate::export::views::VIEWS_CONTAINER))
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
        let job = api
            .exports
            .jobs
            .load(job_id)
            .await?
            .map(|(job, _)| job)
            .filter(|job| visible(job, caller))
            .ok_or_else(missing)?;
        match file_type(&job, path).ok_or_else(missing)? {
            FileType::Notes => {}
            FileType::Resources(resource_type) => may_read(caller, resource_type)?,
            FileType::Blocks => {
                for resource_type in job.request.types.iter().flatten() {
                    may_read(caller, resource_type)?;
                }
            }
        }
    }
    let (size, stream) = match api.exports.storage.read_stream(path).await {
        Ok(found) => found.ok_or_else(missing)?,
        Err(crate::storage::StorageError::InvalidPath(_)) => return Err(missing()),
        Err(error) => return Err(error.into()),
    };
    let (stored_gzip, stream) = sniff_gzip(stream).await;
    let gzip = accepts_gzip(request_headers);
    let mut response = match (stored_gzip, gzip) {
        (false, true) => warp::reply::stream(gzipped(stream)).into_response(),
        (true, false) => warp::reply::stream(gunzipped(stream)).into_response(),
        _ => warp::reply::stream(stream).into_response(),
    };
    let headers = response.headers_mut();
    let content_type = match path.rsplit('.').next() {
        Some("csv") => "text/csv",
        Some("parquet") => "application/vnd.apache.parquet",
        _ => NDJSON,
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    if gzip {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if stored_gzip == gzip {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(response)
}

/// Whether a stored file is gzip-compressed (`EXPORT_COMPRESSION=gzip`): NDJSON starts with `{`,
/// gzip with its magic bytes. Returns the stream whole, first chunk included.
async fn sniff_gzip(mut stream: crate::storage::ByteStream) -> (bool, crate::storage::ByteStream) {
    use futures_util::StreamExt;
    let mut head: Vec<std::io::Result<bytes::Bytes>> = Vec::new();
    let mut start: Vec<u8> = Vec::new();
    while start.len() < 2 {
        match stream.next().await {
            Some(Ok(chunk)) => {
                start.extend(chunk.iter().copied().take(2 - start.len()));
                head.push(Ok(chunk));
            }
            Some(Err(error)) => {
                head.push(Err(error));
                break;
            }
            None => break,
        }
    }
    let gzip = start == [0x1f_u8, 0x8b];
    (
        gzip,
        Box::pin(futures_util::stream::iter(head).chain(stream)),
    )
}

/// A stored gzip file's NDJSON, for a client that does not take gzip.
fn gunzipped(
    stream: crate::storage::ByteStream,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Sync + 'static {
    let compressed = tokio_util::io::StreamReader::new(stream);
    let decoder = async_compression::tokio::bufread::GzipDecoder::new(compressed);
    tokio_util::io::ReaderStream::with_capacity(decoder, 256 << 10)
}

/// Whether the client takes gzip (Bulk Data STU3 downloads): `gzip` (or `x-gzip`), else `*`, listed
/// in `Accept-Encoding` with a weight above 0 (RFC 9110 12.5.3). Without it, plain bytes.
fn accepts_gzip(headers: &warp::http::HeaderMap) -> bool {
    let (mut gzip, mut any) = (None, None);
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        for item in value.to_str().unwrap_or_default().split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let weight = parts
                .filter_map(|p| p.trim().split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, q)| q.trim().parse::<f32>().unwrap_or(0.0));
            match coding.as_str() {
                "gzip" | "x-gzip" => gzip = Some(weight),
                "*" => any = Some(weight),
                _ => {}
            }
        }
    }
    gzip.or(any).is_some_and(|weight| weight > 0.0)
}

/// The file's bytes gzip-compressed as they stream, at the fastest level: on a 2-core instance a
/// download then costs about as much CPU as reading the file, and Synthea NDJSON still shrinks
/// several times (figures in BENCHMARKS.md).
fn gzipped(
    stream: crate::storage::ByteStream,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + Sync + 'static {
    let plain = tokio_util::io::StreamReader::new(stream);
    let encoder = async_compression::tokio::bufread::GzipEncoder::with_quality(
        plain,
        async_compression::Level::Fastest,
    );
    tokio_util::io::ReaderStream::with_capacity(encoder, 256 << 10)
}

enum FileType<'a> {
    /// The request's notes (`OperationOutcome-1.ndjson`): the owner's whatever its scopes.
    Notes,
    Resources(&'a str),
    /// Resource blocks (`organizeOutputBy`): every type the export holds.
    Blocks,
}

/// What one of a job's files holds: `{stem}-{n}.ndjson` of one of its shards, or the notes.
fn file_type<'a>(job: &'a crate::export::jobs::Job, path: &str) -> Option<FileType<'a>> {
    let name = path.strip_prefix(&format!("{}/", job.output_folder))?;
    if name == crate::export::NOTES_FILE {
        let has_notes = !job.request.notes.is_empty() || !job.planning_errors.is_empty();
        return has_notes.then_some(FileType::Notes);
    }
    job.shards.iter().find_map(|shard| {
        crate::storage::RollingNdjsonWriter::file_number(&shard.stem, name)?;
        Some(match shard.patients {
            Some(_) => FileType::Blocks,
            None => FileType::Resources(shard.resource_type.as_str()),
        })
    })
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
        .map(|query| query.resource_type.as_str());
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
fn visible(job: &crate::export::jobs::Job, caller: Option<&Caller>) -> bool {
    caller.is_none_or(|caller| job.owner.as_deref() == Some(caller.owner.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_is_taken_when_the_client_lists_it_or_any_coding_with_a_weight() {
        let accepts = |values: &[&str]| {
            let mut headers = warp::http::HeaderMap::new();
            for value in values {
                headers.append(header::ACCEPT_ENCODING, value.parse().unwrap());
            }
            accepts_gzip(&headers)
        };
        assert!(accepts(&["gzip"]));
        assert!(accepts(&["br, GZIP;q=0.5"]));
        assert!(accepts(&["deflate", "gzip"]));
        assert!(accepts(&["*"]));
        assert!(accepts(&["x-gzip"]));
        assert!(!accepts(&[]));
        assert!(!accepts(&["identity"]));
        assert!(!accepts(&["gzip;q=0"]));
        assert!(
            !accepts(&["gzip;q=0.0, *"]),
            "gzip refused by name, whatever * says"
        );
        assert!(!accepts(&["*;q=0"]));
        assert!(!accepts(&["gzip;q=nonsense"]));
    }
}
