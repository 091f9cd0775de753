//! `GET [base]/{type}/_history` and `GET [base]/{type}/{id}/_history`: the versions the source
//! keeps, newest first, deletions included, so that an instance exporting from this one learns
//! what was deleted. Parameters: `_since` (an instant: versions last updated after it), `_count`
//! (1-1000, default 100) and `_cursor` (the position this server writes into its `next` links).

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use warp::http::StatusCode;
use warp::reply::Response;

use super::search::{invalid, page_size};
use super::{json_response, ApiError, FHIR_JSON};
use crate::export::ExportError;
use crate::fhir::{IssueType, OperationOutcome};
use crate::source::{HistoryRequest, ResourceSource, SourceError, Version};

const DEFAULT_COUNT: usize = 100;

/// A history request's parameters.
struct Query {
    since: Option<DateTime<Utc>>,
    count: usize,
    cursor: Option<String>,
}

fn parse(query: &str) -> Result<Query, ApiError> {
    let mut parsed = Query {
        since: None,
        count: DEFAULT_COUNT,
        cursor: None,
    };
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "_since" => {
                let instant = DateTime::parse_from_rfc3339(&value).map_err(|_| {
                    invalid(
                        "_since",
                        format!("_since={value:?} is not an instant (YYYY-MM-DDThh:mm:ss+zz:zz)"),
                    )
                })?;
                parsed.since = Some(instant.with_timezone(&Utc));
            }
            "_count" => {
                parsed.count = page_size(&value)?;
            }
            "_cursor" => parsed.cursor = Some(value.into_owned()),
            other => {
                return Err(invalid(
                    other,
                    format!("{other} is not supported in a history (only _since, _count)"),
                ))
            }
        }
    }
    Ok(parsed)
}

/// A page of history as a `history` Bundle.
pub async fn history(
    source: &Arc<dyn ResourceSource>,
    base: &str,
    resource_type: &str,
    id: Option<&str>,
    query: &str,
) -> Result<Response, ApiError> {
    let parsed = parse(query)?;
    let page = {
        let (source, resource_type, id) = (
            source.clone(),
            resource_type.to_string(),
            id.map(str::to_string),
        );
        let (since, count, cursor) = (parsed.since, parsed.count, parsed.cursor.clone());
        crate::blocking::run(move || {
            source.history(&HistoryRequest {
                resource_type: &resource_type,
                id: id.as_deref(),
                since,
                count,
                after: cursor.as_deref(),
            })
        })
        .await
    };
    let page = match page {
        Ok(page) => page,
        Err(SourceError::Unsupported(message)) if parsed.cursor.is_some() => {
            return Err(invalid("_cursor", message))
        }
        Err(error) => return Err(ExportError::from(error).into()),
    };
    let path = match id {
        Some(id) => format!("{base}/{resource_type}/{id}/_history"),
        None => format!("{base}/{resource_type}/_history"),
    };
    let self_url = match query.is_empty() {
        true => path.clone(),
        false => format!("{path}?{query}"),
    };
    let mut links = vec![serde_json::json!({"relation": "self", "url": self_url})];
    if let Some(next) = &page.next {
        let mut query = form_urlencoded::Serializer::new(String::new());
        if let Some(since) = parsed.since {
            query.append_pair(
                "_since",
                &since.to_rfc3339_opts(SecondsFormat::AutoSi, true),
            );
        }
        query.append_pair("_count", &parsed.count.to_string());
        query.append_pair("_cursor", next);
        links.push(
            serde_json::json!({"relation": "next", "url": format!("{path}?{}", query.finish())}),
        );
    }
    Ok(json_response(
        StatusCode::OK,
        FHIR_JSON,
        bundle(base, resource_type, &links, &page.versions),
    ))
}

/// A `history` Bundle: each version's resource as stored, byte for byte (none for a deletion),
/// with the request that made it and its `lastModified` and version.
fn bundle(
    base: &str,
    resource_type: &str,
    links: &[serde_json::Value],
    versions: &[Version],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(versions.iter().map(|v| v.json.len()).sum::<usize>() + 256);
    out.extend_from_slice(br#"{"resourceType":"Bundle","type":"history","link":"#);
    out.extend_from_slice(
        serde_json::Value::from(links.to_vec())
            .to_string()
            .as_bytes(),
    );
    if !versions.is_empty() {
        out.extend_from_slice(br#","entry":["#);
        for (n, version) in versions.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            let url = format!("{resource_type}/{}", version.id);
            let (method, status) = match version.deleted {
                true => ("DELETE", "204 No Content"),
                false => ("PUT", "200 OK"),
            };
            out.extend_from_slice(br#"{"fullUrl":"#);
            out.extend_from_slice(
                serde_json::Value::from(format!("{base}/{url}"))
                    .to_string()
                    .as_bytes(),
            );
            if !version.deleted {
                out.extend_from_slice(br#","resource":"#);
                out.extend_from_slice(&version.json);
            }
            let rest = serde_json::json!({
                "request": {"method": method, "url": url},
                "response": {
                    "status": status,
                    "etag": format!("W/\"{}\"", version.version_id),
                    "lastModified": version.last_updated.to_rfc3339_opts(SecondsFormat::Millis, true),
                },
            });
            let rest = rest.to_string();
            out.push(b',');
            out.extend_from_slice(&rest.as_bytes()[1..]);
        }
        out.push(b']');
    }
    out.push(b'}');
    out
}

/// `410 Gone` for a resource whose current version is a deletion.
pub fn gone(resource_type: &str, id: &str) -> ApiError {
    ApiError {
        status: StatusCode::GONE,
        outcome: OperationOutcome::error(
            IssueType::Deleted,
            format!("{resource_type}/{id} was deleted"),
        ),
        headers: Vec::new(),
    }
}
