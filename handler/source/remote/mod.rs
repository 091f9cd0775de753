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
//!
//! Parts, used one way (`read` -> `capabilities`, `search`, `client`): `client` (requests,
//! tokens, refusals), `capabilities` (what the server declares, the searches of a scan), `search`
//! (windows, URLs, pages), `read` (verified reads, halving, pauses, spans).

mod capabilities;
mod client;
mod deleted;
mod read;
mod search;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::value::RawValue;

use super::{
    Cursor, Part, PatientScope, PlanRequest, ResourceSource, ScanError, ScanRequest, Scanned,
    SinkError, SourceError, Span,
};
use crate::fhir::compartment::patient_ids;

use capabilities::CompartmentAccess;
pub use client::{retry_after, RemoteAuth, RemoteServer, DEFAULT_ACCESS_WAIT};
use client::{AccessWait, Fetched, Inner, MAX_IN_FLIGHT};
use read::Reading;
use search::{window, Search, COMPONENT};

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestStats {
    pub requests: u64,
    pub retries: u64,
    pub waiting: Duration,
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

    /// The search of a scan that reads its whole type (`None`: it reads a compartment).
    fn whole_type_search(&self, request: &ScanRequest<'_>) -> Option<Search> {
        let whole_type = matches!(request.scope, PatientScope::All)
            || (matches!(request.scope, PatientScope::AnyPatient)
                && request.resource_type == "Patient");
        whole_type.then(|| Search {
            target: format!("{}/{}", self.0.base, request.resource_type),
            criteria: String::new(),
        })
    }
}

impl ResourceSource for RemoteServer {
    fn waiting_for(&self) -> Option<String> {
        self.0.access.waiting.lock().expect("not poisoned").clone()
    }

    /// The types wanted that the server declares and that hold resources (a `_summary=count` probe
    /// each).
    fn resource_types(&self, wanted: &dyn Fn(&str) -> bool) -> Result<Vec<String>, SourceError> {
        let this = &self.0;
        this.runtime.block_on(async {
            let declared = this.capabilities().await?.declared(wanted);
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

    /// By `_summary=count` probes over `lastUpdated` windows.
    fn plan(&self, request: &PlanRequest<'_>) -> Result<Vec<Part>, SourceError> {
        super::plan::by_last_updated(self, request)
    }

    /// A `_summary=count` probe of the window, for whole-type scans only.
    fn count(&self, request: &ScanRequest<'_>) -> Result<Option<u64>, SourceError> {
        let Some(search) = self.whole_type_search(request) else {
            return Ok(None);
        };
        let url = search.count_url(&window(request));
        self.0.runtime.block_on(self.0.total(&url))
    }

    /// Two searches of one match each, sorted by `_lastUpdated` each way, for whole-type scans only.
    fn last_updated_span(&self, request: &ScanRequest<'_>) -> Result<Option<Span>, SourceError> {
        let Some(search) = self.whole_type_search(request) else {
            return Ok(None);
        };
        let window = window(request);
        self.0.runtime.block_on(
            self.0
                .last_updated_span(&search, &window, request.resource_type),
        )
    }

    /// Every type the server declares (those without `history-type` then say in the manifest's
    /// `error` that their deletions are unknown): a type whose resources were all deleted holds
    /// none now.
    fn types_with_deletions(
        &self,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<String>, SourceError> {
        let this = &self.0;
        this.runtime
            .block_on(async { Ok(this.capabilities().await?.declared(wanted)) })
    }

    fn why_deletions_are_unknown(
        &self,
        resource_type: &str,
    ) -> Result<Option<String>, SourceError> {
        let this = &self.0;
        this.runtime.block_on(async {
            let declared = this
                .capabilities()
                .await?
                .history_types
                .contains(resource_type);
            Ok((!declared).then(|| {
                format!(
                    "{}/metadata declares no history-type interaction for them",
                    this.base
                )
            }))
        })
    }

    /// From the type's `_history` (see `deleted`): read whole, then handed on after any resume
    /// point.
    fn scan_deleted(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&str) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        let ids = self.0.runtime.block_on(self.0.deleted_ids(request))?;
        let after = match request.resume {
            Some(Cursor::Id { id }) => Some(id.as_str()),
            _ => None,
        };
        let mut count = 0;
        for id in ids
            .iter()
            .filter(|id| after.is_none_or(|after| id.as_str() > after))
        {
            sink(id)?;
            count += 1;
        }
        Ok(Scanned::whole(count))
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

#[cfg(test)]
mod tests {
    use super::*;
    use capabilities::Capabilities;
    use chrono::{DateTime, Utc};
    use client::retry_after;
    use search::Window;

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
