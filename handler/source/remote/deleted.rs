//! The resources a FHIR server deleted since `_since`, from its `[type]/_history?_since=`: an id
//! whose latest version by the window's end is a deletion (`request.method` DELETE, or a
//! `response.status` of 410 without a resource). Pages are followed to the end and checked against
//! the `total` a server gives; a server that declares no `history-type` for the type, or refuses
//! the request, is `Unsupported`: the export then says deletions could not be determined.
//!
//! At Patient and Group level a deletion counts when the version it deleted was in an exported
//! patient's compartment: that version is taken from the type's history when it lies in the
//! window, else from the resource's own `_history`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use super::client::Inner;
use super::search::{instant, next_link, COMPONENT};
use crate::fhir::compartment::patient_ids;
use crate::source::{PatientScope, ScanRequest, SourceError};

/// A history page, as far as deletions go.
#[derive(Deserialize)]
struct HistoryPage {
    #[serde(default)]
    link: Vec<super::search::Link>,
    #[serde(default)]
    entry: Vec<HistoryEntry>,
    total: Option<u64>,
}

#[derive(Deserialize)]
struct HistoryEntry {
    #[serde(rename = "fullUrl")]
    full_url: Option<String>,
    resource: Option<Value>,
    request: Option<EntryRequest>,
    response: Option<EntryResponse>,
}

#[derive(Deserialize)]
struct EntryRequest {
    method: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct EntryResponse {
    status: Option<String>,
    #[serde(rename = "lastModified")]
    last_modified: Option<String>,
}

/// One version read from a history: what it is, when, and (kept only when the scope needs it)
/// its content.
struct Seen {
    at: Option<DateTime<Utc>>,
    deleted: bool,
    content: Option<Value>,
}

impl Seen {
    /// Later than `other` (a version without a time counts as later: the server listed it in
    /// the window).
    fn is_newer_than(&self, other: &Seen) -> bool {
        match (self.at, other.at) {
            (Some(at), Some(other)) => at > other,
            _ => true,
        }
    }
}

impl HistoryEntry {
    fn is_deletion(&self) -> bool {
        let method = self.request.as_ref().and_then(|r| r.method.as_deref());
        let status = self.response.as_ref().and_then(|r| r.status.as_deref());
        method.is_some_and(|m| m.eq_ignore_ascii_case("DELETE"))
            || (self.resource.is_none() && status.is_some_and(|s| s.starts_with("410")))
    }

    /// The id of the resource the entry is a version of.
    fn id(&self, resource_type: &str) -> Option<String> {
        if let Some(id) = self
            .resource
            .as_ref()
            .and_then(|r| r.get("id"))
            .and_then(Value::as_str)
        {
            return Some(id.to_string());
        }
        let url = self
            .request
            .as_ref()
            .and_then(|r| r.url.as_deref())
            .or(self.full_url.as_deref())?;
        let path = url.split('?').next()?;
        let mut segments = path.rsplit('/').collect::<Vec<_>>();
        segments.reverse();
        let at = segments.iter().rposition(|s| *s == resource_type)?;
        segments.get(at + 1).map(|id| id.to_string())
    }

    fn at(&self) -> Option<DateTime<Utc>> {
        let text = self
            .response
            .as_ref()
            .and_then(|r| r.last_modified.as_deref())
            .or_else(|| {
                self.resource
                    .as_ref()?
                    .pointer("/meta/lastUpdated")?
                    .as_str()
            })?;
        DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|at| at.with_timezone(&Utc))
    }
}

impl Inner {
    /// The ids of the type's resources deleted in the request's window and scope, sorted.
    pub(super) async fn deleted_ids(
        &self,
        request: &ScanRequest<'_>,
    ) -> Result<Vec<String>, SourceError> {
        let resource_type = request.resource_type;
        if !self
            .capabilities()
            .await?
            .history_types
            .contains(resource_type)
        {
            return Err(SourceError::Unsupported(format!(
                "{}/metadata declares no history-type interaction for {resource_type}",
                self.base
            )));
        }
        let keep_content = !matches!(request.scope, PatientScope::All);
        let until = request.until.min(request.snapshot);
        let mut url = format!("{}/{resource_type}/_history?_count=1000", self.base);
        if let Some(since) = request.since {
            url.push_str(&format!("&_since={}", percent_encode(&instant(since))));
        }
        let mut latest: BTreeMap<String, Seen> = BTreeMap::new();
        let mut before_deletion: BTreeMap<String, Seen> = BTreeMap::new();
        self.read_history(&url, resource_type, &mut |id, seen| {
            if seen.at.is_some_and(|at| at > until) {
                return;
            }
            let earlier = match latest.get_mut(&id) {
                None => {
                    latest.insert(id, seen);
                    return;
                }
                Some(known) if seen.is_newer_than(known) => std::mem::replace(known, seen),
                Some(_) => seen,
            };
            // The latest version but one that is not a deletion: what a deletion deleted.
            if keep_content && !earlier.deleted {
                match before_deletion.get(&id) {
                    Some(kept) if !earlier.is_newer_than(kept) => {}
                    _ => {
                        before_deletion.insert(id, earlier);
                    }
                }
            }
        })
        .await?;
        let mut deleted = Vec::new();
        for (id, seen) in latest {
            if !seen.deleted {
                continue;
            }
            let in_scope = match request.scope {
                PatientScope::All => true,
                scope => {
                    let content = match before_deletion.remove(&id).and_then(|s| s.content) {
                        Some(content) => content,
                        None => self.version_before(resource_type, &id, seen.at).await?,
                    };
                    let patients = patient_ids(resource_type, &id, &content);
                    match scope {
                        PatientScope::Only(only) => patients.iter().any(|p| only.contains(p)),
                        _ => !patients.is_empty(),
                    }
                }
            };
            if in_scope {
                deleted.push(id);
            }
        }
        Ok(deleted)
    }

    /// Reads every page of a history from `url`, handing each version to `visit`; fails when the
    /// pages hold fewer or more entries than the server's `total`.
    async fn read_history(
        &self,
        url: &str,
        resource_type: &str,
        visit: &mut dyn FnMut(String, Seen),
    ) -> Result<(), SourceError> {
        let mut next = Some(url.to_string());
        let mut total = None;
        let mut read = 0u64;
        while let Some(page_url) = next.take() {
            let body = self.get_body(&page_url).await?;
            let page: HistoryPage = serde_json::from_slice(&body).map_err(|e| {
                SourceError::Remote(format!(
                    "{page_url}: the answer is not a history Bundle: {e}"
                ))
            })?;
            total = total.or(page.total);
            let links = super::search::Page {
                link: page.link,
                entry: Vec::new(),
                total: None,
            };
            next = next_link(&page_url, &links)?;
            for entry in page.entry {
                read += 1;
                let Some(id) = entry.id(resource_type) else {
                    return Err(SourceError::Remote(format!(
                        "{page_url}: a history entry names no {resource_type} id"
                    )));
                };
                let deleted = entry.is_deletion();
                let seen = Seen {
                    at: entry.at(),
                    deleted,
                    content: entry.resource.filter(|_| !deleted),
                };
                visit(id, seen);
            }
        }
        match total {
            Some(total) if total != read => Err(SourceError::Remote(format!(
                "{url}: the history's pages held {read} entries where the server counted {total}; read again later"
            ))),
            _ => Ok(()),
        }
    }

    /// The content of the resource's last version before its deletion at `deleted_at`, from its
    /// own history: what decides whether the deletion was in an exported compartment.
    async fn version_before(
        &self,
        resource_type: &str,
        id: &str,
        deleted_at: Option<DateTime<Utc>>,
    ) -> Result<Value, SourceError> {
        let encoded = percent_encoding::utf8_percent_encode(id, COMPONENT);
        let url = format!("{}/{resource_type}/{encoded}/_history", self.base);
        let mut before: Option<Seen> = None;
        self.read_history(&url, resource_type, &mut |_, seen| {
            let earlier = match (seen.at, deleted_at) {
                (Some(at), Some(deleted_at)) => at < deleted_at,
                _ => true,
            };
            let later_than_kept = before
                .as_ref()
                .is_none_or(|kept| matches!((seen.at, kept.at), (Some(a), Some(b)) if a > b));
            if !seen.deleted && earlier && later_than_kept {
                before = Some(seen);
            }
        })
        .await?;
        before.and_then(|seen| seen.content).ok_or_else(|| {
            SourceError::Unsupported(format!(
                "{url} holds no version of {resource_type}/{id} before its deletion, so whether it was in an exported patient's compartment is unknown"
            ))
        })
    }
}

fn percent_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, COMPONENT).to_string()
}
