//! FHIR read and search over the source, so one instance can be the FHIR server another exports from:
//! `GET [base]/{type}/{id}`, `GET [base]/{type}?...` and the compartment search
//! `GET [base]/Patient/{id}/{type}?...`, paged in id order with `_count` and `Bundle.link[next]`.
//!
//! Parameters: those `_typeFilter` supports (`_id`, `_lastUpdated` and the per-type list), `_count`
//! (1-1000, default 100), `_summary=count`, and `_cursor` (the paging position this server writes
//! into its `next` links). `_lastUpdated` with `gt ge lt le` bounds the scan itself.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use warp::http::StatusCode;
use warp::reply::Response;

use super::{json_response, ApiError, FHIR_JSON};
use crate::export::ExportError;
use crate::fhir::search::SearchQuery;
use crate::fhir::IssueType;
use crate::source::{PatientScope, ResourceSource, ScanError, ScanRequest, SinkError};

const DEFAULT_COUNT: usize = 100;
const MAX_COUNT: usize = 1000;

pub(super) fn invalid(parameter: &str, message: String) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        outcome: crate::fhir::OperationOutcome::parameter_error(
            IssueType::Invalid,
            parameter,
            message,
        ),
        headers: Vec::new(),
    }
}

/// A `_count` of a search or history page: 1 to `MAX_COUNT`.
pub(super) fn page_size(value: &str) -> Result<usize, ApiError> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_COUNT).contains(n))
        .ok_or_else(|| invalid("_count", format!("_count={value:?}: give 1 to {MAX_COUNT}")))
}

pub async fn read(
    source: &Arc<dyn ResourceSource>,
    resource_type: &str,
    id: &str,
) -> Result<Response, ApiError> {
    let missing =
        || ApiError::not_found(format!("{resource_type}/{id} is not known to this server"));
    if !crate::fhir::types::is_valid_id(id) {
        return Err(missing());
    }
    let (source, t, i) = (source.clone(), resource_type.to_string(), id.to_string());
    let found = crate::blocking::run(move || match source.read(&t, &i)? {
        Some(body) => Ok(Ok(body)),
        None => source.is_deleted(&t, &i).map(Err),
    })
    .await
    .map_err(ExportError::from)?;
    match found {
        Ok(body) => Ok(json_response(StatusCode::OK, FHIR_JSON, body)),
        Err(true) => Err(super::history::gone(resource_type, id)),
        Err(false) => Err(missing()),
    }
}

/// A search's bounds and filters, parsed from its query string.
#[derive(Clone)]
struct Search {
    count: usize,
    summary_count: bool,
    cursor: Option<String>,
    since: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
    query: Option<SearchQuery>,
    /// The criteria other than paging, to repeat in `next` links.
    criteria: Vec<(String, String)>,
}

fn parse(resource_type: &str, query: &str) -> Result<Search, ApiError> {
    let mut search = Search {
        count: DEFAULT_COUNT,
        summary_count: false,
        cursor: None,
        since: None,
        until: DateTime::from_timestamp(253_402_300_799, 0).expect("9999-12-31"),
        query: None,
        criteria: Vec::new(),
    };
    let mut rest = form_urlencoded::Serializer::new(String::new());
    let mut has_rest = false;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "_count" => {
                search.count = page_size(&value)?;
                continue;
            }
            "_summary" => {
                if value != "count" {
                    return Err(invalid(
                        "_summary",
                        format!("_summary={value:?} is not supported (only count)"),
                    ));
                }
                search.summary_count = true;
                continue;
            }
            "_cursor" => {
                if !crate::fhir::types::is_valid_id(&value) {
                    return Err(invalid(
                        "_cursor",
                        format!("_cursor={value:?} is not a position this server wrote"),
                    ));
                }
                search.cursor = Some(value.into_owned());
                continue;
            }
            "_lastUpdated" if bound(&mut search, &value) => {}
            _ => {
                rest.append_pair(&name, &value);
                has_rest = true;
            }
        }
        search
            .criteria
            .push((name.into_owned(), value.into_owned()));
    }
    if has_rest {
        let text = format!("{resource_type}?{}", rest.finish());
        let parsed = SearchQuery::parse(&text).map_err(|message| {
            let parameter = message.split('"').nth(1).unwrap_or("search").to_string();
            invalid(&parameter, message)
        })?;
        search.query = Some(parsed);
    }
    Ok(search)
}

/// Narrows the scan by a `_lastUpdated` bound with a `gt ge lt le` prefix and a full instant.
fn bound(search: &mut Search, value: &str) -> bool {
    let (Some(prefix), Some(instant)) = (value.get(..2), value.get(2..)) else {
        return false;
    };
    let Ok(instant) = DateTime::parse_from_rfc3339(instant).map(|i| i.with_timezone(&Utc)) else {
        return false;
    };
    let micro = chrono::Duration::microseconds(1);
    match prefix {
        "gt" => search.since = search.since.max(Some(instant)),
        "ge" => search.since = search.since.max(Some(instant - micro)),
        "le" => search.until = search.until.min(instant),
        "lt" => search.until = search.until.min(instant - micro),
        _ => return false,
    }
    true
}

/// `GET [base]/{type}?...`, or with `compartment` the compartment search of one patient.
pub async fn search(
    source: &Arc<dyn ResourceSource>,
    base: &str,
    resource_type: &str,
    compartment: Option<&str>,
    query: &str,
) -> Result<Response, ApiError> {
    let search = parse(resource_type, query)?;
    let scope = match compartment {
        None => PatientScope::All,
        Some(patient) if crate::fhir::types::is_valid_id(patient) => {
            PatientScope::Only(vec![patient.to_string()])
        }
        Some(patient) => {
            return Err(ApiError::not_found(format!(
                "Patient/{patient} is not known to this server"
            )))
        }
    };
    let (matches, total) = {
        let (source, search, resource_type) =
            (source.clone(), search.clone(), resource_type.to_string());
        crate::blocking::run(move || read_matches(source.as_ref(), &search, &resource_type, &scope))
            .await?
    };
    let path = match compartment {
        Some(patient) => format!("{base}/Patient/{patient}/{resource_type}"),
        None => format!("{base}/{resource_type}"),
    };
    let self_url = if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{query}")
    };
    let mut links = vec![("self", self_url)];
    let mut entries = matches;
    if !search.summary_count && entries.len() > search.count {
        entries.truncate(search.count);
        let last = entries.last().and_then(|r| id_of(r)).unwrap_or_default();
        let mut next = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &search.criteria {
            next.append_pair(name, value);
        }
        next.append_pair("_count", &search.count.to_string());
        next.append_pair("_cursor", &last);
        links.push(("next", format!("{path}?{}", next.finish())));
    }
    Ok(json_response(
        StatusCode::OK,
        FHIR_JSON,
        bundle(
            base,
            &links,
            &entries,
            search.summary_count.then_some(total),
        ),
    ))
}

/// The matches of one page (one more than the page holds, to tell whether a next page follows),
/// or with `_summary=count` none, and how many matched in all.
fn read_matches(
    source: &dyn ResourceSource,
    search: &Search,
    resource_type: &str,
    scope: &PatientScope,
) -> Result<(Vec<Vec<u8>>, u64), ApiError> {
    let limit = match search.summary_count {
        true => usize::MAX,
        false => search.count + 1,
    };
    let mut matches = Vec::new();
    let mut total = 0u64;
    let request = ScanRequest {
        resource_type,
        since: search.since,
        stored_since: None,
        until: search.until,
        snapshot: Utc::now(),
        scope,
        // Pages follow id order from the first: an empty cursor comes before every id. (Without
        // one, a scan of a type stored together reads in storage order, which a cursor cannot
        // continue.)
        after_id: Some(search.cursor.as_deref().unwrap_or("")),
        rows: Default::default(),
        type_filters: &[],
        resume: None,
        pause_after: None,
    };
    if limit == usize::MAX && search.query.is_none() {
        // A count the source keeps in its indexes reads no resource.
        let counted = source.count(&request).map_err(ExportError::from)?;
        if let Some(total) = counted {
            return Ok((Vec::new(), total));
        }
    }
    let scanned = source.scan(&request, &mut |resource| {
        if let Some(query) = &search.query {
            let matched = serde_json::from_slice(resource).is_ok_and(|value| query.matches(&value));
            if !matched {
                return Ok(());
            }
        }
        total += 1;
        if limit == usize::MAX {
            return Ok(());
        }
        matches.push(resource.to_vec());
        if matches.len() >= limit {
            return Err(SinkError::Stopped);
        }
        Ok(())
    });
    match scanned {
        Ok(_) | Err(ScanError::Sink(SinkError::Stopped)) => Ok((matches, total)),
        Err(error) => Err(ExportError::from(error).into()),
    }
}

fn id_of(resource: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Id>(resource).ok().map(|r| r.id)
}

fn type_of(resource: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Type {
        #[serde(rename = "resourceType")]
        resource_type: String,
    }
    serde_json::from_slice::<Type>(resource)
        .ok()
        .map(|r| r.resource_type)
}

/// A searchset Bundle with the resources as stored, byte for byte.
fn bundle(
    base: &str,
    links: &[(&str, String)],
    entries: &[Vec<u8>],
    total: Option<u64>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(Vec::len).sum::<usize>() + 256);
    out.extend_from_slice(br#"{"resourceType":"Bundle","type":"searchset""#);
    if let Some(total) = total {
        out.extend_from_slice(format!(r#","total":{total}"#).as_bytes());
    }
    out.extend_from_slice(br#","link":["#);
    for (n, (relation, url)) in links.iter().enumerate() {
        if n > 0 {
            out.push(b',');
        }
        let link = serde_json::json!({ "relation": relation, "url": url });
        out.extend_from_slice(link.to_string().as_bytes());
    }
    out.extend_from_slice(b"]");
    if !entries.is_empty() {
        out.extend_from_slice(br#","entry":["#);
        for (n, resource) in entries.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            let full_url = format!(
                "{base}/{}/{}",
                type_of(resource).unwrap_or_default(),
                id_of(resource).unwrap_or_default()
            );
            out.extend_from_slice(br#"{"fullUrl":"#);
            out.extend_from_slice(serde_json::Value::from(full_url).to_string().as_bytes());
            out.extend_from_slice(br#","resource":"#);
            out.extend_from_slice(resource);
            out.extend_from_slice(br#","search":{"mode":"match"}}"#);
        }
        out.push(b']');
    }
    out.push(b'}');
    out
}
