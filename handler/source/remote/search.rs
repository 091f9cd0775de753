//! One search: its windows of `meta.lastUpdated`, its URLs, and the pages it answers.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, DurationRound, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::capabilities::CompartmentAccess;
use super::client::{Fetched, Inner};
use crate::fhir::compartment::compartment_search_params;
use crate::fhir::outcome::texts_in;
use crate::fhir::search::SearchQuery;
use crate::source::{Cursor, PatientScope, ScanRequest, SourceError};

const PAGE_SIZE: usize = 1000;
/// The longest patient list one search request carries (bytes of its URL's values).
const MAX_IDS_BYTES: usize = 3000;

/// One search of a scan: where, and the criteria besides the `_lastUpdated` window.
pub(super) struct Search {
    /// `{base}/{type}` or `{base}/Patient/{id}/{type}`.
    pub(super) target: String,
    pub(super) criteria: String,
}

/// A `meta.lastUpdated` window: after `after` (exclusive), up to `upto` (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    pub(super) after: Option<DateTime<Utc>>,
    pub(super) upto: DateTime<Utc>,
}

impl Window {
    pub(super) fn params(&self) -> String {
        let mut bounds = form_urlencoded::Serializer::new(String::new());
        if let Some(after) = self.after {
            bounds.append_pair("_lastUpdated", &format!("gt{}", instant(after)));
        }
        bounds.append_pair("_lastUpdated", &format!("le{}", instant(self.upto)));
        bounds.finish()
    }

    /// The window cut in two at its middle (a whole millisecond where it is wider than 2 ms, as
    /// many servers keep no finer instants); `None` when it is one microsecond wide.
    pub(super) fn halves(&self) -> Option<[Window; 2]> {
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
    pub(super) fn windowed(&self, window: &Window) -> String {
        let separator = if self.criteria.is_empty() { "" } else { "&" };
        format!(
            "{}?{}{separator}{}",
            self.target,
            self.criteria,
            window.params()
        )
    }

    /// The first page's URL; `sort`: a `_sort` value, or empty for none.
    pub(super) fn url(&self, window: &Window, sort: &str) -> String {
        let mut url = format!("{}&_count={PAGE_SIZE}", self.windowed(window));
        if !sort.is_empty() {
            url.push_str("&_sort=");
            url.push_str(sort);
        }
        url
    }

    pub(super) fn count_url(&self, window: &Window) -> String {
        format!("{}&_summary=count", self.windowed(window))
    }
}

#[derive(Deserialize)]
pub(super) struct Page<'a> {
    #[serde(default)]
    pub(super) link: Vec<Link>,
    #[serde(default, borrow)]
    pub(super) entry: Vec<Entry<'a>>,
    pub(super) total: Option<u64>,
}

#[derive(Deserialize)]
pub(super) struct Link {
    pub(super) relation: String,
    pub(super) url: String,
}

#[derive(Deserialize)]
pub(super) struct Entry<'a> {
    #[serde(borrow)]
    pub(super) resource: Option<&'a RawValue>,
    pub(super) search: Option<EntrySearch>,
}

#[derive(Deserialize)]
pub(super) struct EntrySearch {
    pub(super) mode: Option<String>,
}

impl Page<'_> {
    /// The text of an OperationOutcome the server put among the entries (`search.mode` outcome)
    /// about sorting: how a lenient server says it dropped the `_sort` asked for (fhir-server
    /// answers 200, sorted as it likes, with a warning). `None` when there is none.
    pub(super) fn sort_warning(&self) -> Option<String> {
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
            .map(|resource| texts_in(resource.get().as_bytes()))
            .find(|text| text.to_ascii_lowercase().contains("sort"))
    }
}

#[derive(Deserialize)]
pub(super) struct Identity {
    #[serde(rename = "resourceType")]
    pub(super) resource_type: String,
    pub(super) id: Option<String>,
    pub(super) meta: Option<Meta>,
}

#[derive(Deserialize)]
pub(super) struct Meta {
    #[serde(rename = "lastUpdated")]
    pub(super) last_updated: Option<String>,
}

impl Identity {
    pub(super) fn last_updated(&self) -> Option<DateTime<Utc>> {
        let text = self.meta.as_ref()?.last_updated.as_deref()?;
        DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }
}

pub(super) fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// The scan's `meta.lastUpdated` window (after where a paused scan stopped).
pub(super) fn window(request: &ScanRequest<'_>) -> Window {
    let resumed = match request.resume {
        Some(Cursor::LastUpdated { instant }) => Some(*instant),
        _ => None,
    };
    Window {
        after: request.since.max(resumed),
        upto: request.until.min(request.snapshot),
    }
}

pub(super) async fn fetch_page(
    source: Arc<Inner>,
    url: String,
) -> Result<(String, Bytes), SourceError> {
    let body = source.get_body(&url).await?;
    Ok((url, body))
}

pub(super) fn parse_page<'a>(url: &str, body: &'a [u8]) -> Result<Page<'a>, SourceError> {
    serde_json::from_slice(body)
        .map_err(|e| SourceError::Remote(format!("{url}: the answer is not a search Bundle: {e}")))
}

/// The page's `next` link, resolved against the page's own URL (a server may give a relative one).
pub(super) fn next_link(page_url: &str, page: &Page<'_>) -> Result<Option<String>, SourceError> {
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
pub(super) const COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

impl Inner {
    /// The `total` of a `_summary=count` search (`None` when the server gives none).
    pub(super) async fn total(&self, url: &str) -> Result<Option<u64>, SourceError> {
        match self.get(url).await? {
            Fetched::NotFound => Ok(Some(0)),
            Fetched::Body(body) => Ok(serde_json::from_slice::<Page>(&body)
                .ok()
                .and_then(|p| p.total)),
        }
    }

    /// The searches of a scan. `_typeFilter` queries go to the server only in the criteria it
    /// evaluates exactly as the exporter does (a superset of the match, which the exporter then
    /// filters); a query with none makes the read whole.
    pub(super) fn searches(
        &self,
        request: &ScanRequest<'_>,
        access: &CompartmentAccess,
    ) -> Vec<Search> {
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
