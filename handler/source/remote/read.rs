//! Reading searches whole: every search verified by its counts, halved where the server limits
//! paging, paused where a time-boxed shard can resume; and the span of `meta.lastUpdated` a
//! search's matches occupy, for planning.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;

use super::client::{Fetched, Inner, RemoteServer};
use super::search::{fetch_page, next_link, parse_page, Identity, Page, Search, Window};
use crate::source::{ScanError, ScanRequest, SourceError, Span};

/// Reads of one search before its count is trusted to have held still.
pub(super) const MAX_PASSES: u32 = 5;
/// The orders asked for, best first: a stable order keeps a search's pages from overlapping or
/// skipping. A server that refuses one is asked the next from then on.
pub(super) const SORTS: [&str; 3] = ["_lastUpdated,_id", "_lastUpdated", ""];

/// How a read of one search ended.
pub(super) enum Read {
    /// Every page; the ids seen.
    Whole(HashSet<String>),
    /// Paused (a time-boxed shard): every resource last updated up to this instant was passed on,
    /// none after it.
    Paused(DateTime<Utc>),
    /// The server refused a later page (an offset or page limit) after this many resources.
    Refused { after: u64, reason: SourceError },
}

pub(super) type Accept<'a> = dyn FnMut(&str, &RawValue) -> Result<(), ScanError> + 'a;

/// One search of a scan being read.
pub(super) struct Reading<'a> {
    pub(super) request: &'a ScanRequest<'a>,
    pub(super) search: &'a Search,
    /// Past this instant, pause where the read can resume (see `scan`).
    pub(super) pause_after: Option<std::time::Instant>,
    /// The latest `lastUpdated` passed on by any read of the search so far: a pause comes no
    /// earlier (an earlier read that went further passed on resources a continuation would read
    /// again).
    pub(super) furthest: std::cell::Cell<Option<DateTime<Utc>>>,
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
    pub(super) fn read_verified(
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
    pub(super) fn read_halves(
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
    pub(super) fn read_pages(
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
                    sort = step_down(inner, sort);
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
                    sort = step_down(inner, sort);
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
            for (id, last_updated, resource) in matches(&page, request.resource_type, &url)? {
                let may_pause = read
                    .pause_after
                    .is_some_and(|at| std::time::Instant::now() >= at);
                // Not on a read's first page: a run reads at least a page, however short its box.
                if may_pause && SORTS[sort].starts_with("_lastUpdated") && pages > 1 {
                    let paused_at = self.pause_point(
                        read,
                        window,
                        counted,
                        &mut pause,
                        last_updated,
                        seen.len() as u64,
                    )?;
                    if let Some(instant) = paused_at {
                        return Ok(Read::Paused(instant));
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

    /// Where a time-boxed read pauses before a resource last updated at `next`, if it can: the
    /// server must count, in the window, as many as before the read (a window's matches only leave
    /// it: an update moves a resource past the snapshot), and up to the pause as many as were read.
    fn pause_point(
        &self,
        read: &Reading<'_>,
        window: &Window,
        counted: Option<u64>,
        pause: &mut PausePoint,
        next: Option<DateTime<Utc>>,
        read_so_far: u64,
    ) -> Result<Option<DateTime<Utc>>, SourceError> {
        let inner = &self.0;
        if counted.is_none() || pause.last < read.furthest.get() {
            return Ok(None);
        }
        let count_up_to = |upto| {
            let whole = inner
                .runtime
                .block_on(inner.total(&read.search.count_url(window)))?;
            if whole != counted {
                return Ok(None);
            }
            let part = Window {
                after: window.after,
                upto,
            };
            inner
                .runtime
                .block_on(inner.total(&read.search.count_url(&part)))
        };
        pause.before(next, count_up_to, read_so_far)
    }
}

/// The next, simpler order, asked for from now on by every read of the source.
fn step_down(inner: &Inner, sort: usize) -> usize {
    inner.sort.fetch_max(sort + 1, Ordering::Relaxed);
    sort + 1
}

/// A match: its id, `meta.lastUpdated`, and the resource as sent.
type Match<'p> = (String, Option<DateTime<Utc>>, &'p RawValue);

/// A page's matches of `resource_type`: id, `meta.lastUpdated` and the resource as sent. Entries
/// included for another reason (`search.mode` other than `match`), or of another type, are left
/// out; a match without an id is an error.
fn matches<'p>(
    page: &'p Page<'p>,
    resource_type: &str,
    url: &str,
) -> Result<Vec<Match<'p>>, SourceError> {
    let mut found = Vec::new();
    for entry in &page.entry {
        let mode = entry.search.as_ref().and_then(|s| s.mode.as_deref());
        if mode.is_some_and(|m| m != "match") {
            continue;
        }
        let Some(resource) = entry.resource else {
            continue;
        };
        let identity: Identity = serde_json::from_str(resource.get())
            .map_err(|e| SourceError::Remote(format!("{url}: an entry is not a resource: {e}")))?;
        if identity.resource_type != resource_type {
            continue;
        }
        let last_updated = identity.last_updated();
        let Some(id) = identity.id else {
            return Err(SourceError::Remote(format!(
                "{url}: a {resource_type} without an id"
            )));
        };
        found.push((id, last_updated, resource));
    }
    Ok(found)
}

/// Where in [`SORTS`] a server that cannot sort by `_lastUpdated` stands.
const UNSORTED: usize = SORTS.len() - 1;

/// What a search sorted by `_lastUpdated` told of its first match.
#[derive(Debug, PartialEq, Eq)]
enum Sorted {
    First(DateTime<Utc>),
    /// Nothing matched, or the match had no `meta.lastUpdated`.
    Unknown,
    /// The server refused the sort, or dropped it with a warning.
    Refused,
}

impl Inner {
    /// The earliest and the latest `meta.lastUpdated` of `resource_type` the search gives in
    /// `window`: its first match sorted each way (`None` when the server refuses
    /// `_sort=_lastUpdated` or drops it with a warning, which no read of the source asks again, or
    /// nothing matches).
    pub(super) async fn last_updated_span(
        &self,
        search: &Search,
        window: &Window,
        resource_type: &str,
    ) -> Result<Option<Span>, SourceError> {
        if self.sort.load(Ordering::Relaxed) >= UNSORTED {
            return Ok(None);
        }
        let first = |sort: &str| format!("{}&_count=1&_sort={sort}", search.windowed(window));
        let (earliest, latest) = futures_util::future::join(
            self.first_last_updated(first("_lastUpdated"), resource_type),
            self.first_last_updated(first("-_lastUpdated"), resource_type),
        )
        .await;
        let (earliest, latest) = (earliest?, latest?);
        if earliest == Sorted::Refused {
            self.sort.fetch_max(UNSORTED, Ordering::Relaxed);
        }
        match (earliest, latest) {
            (Sorted::First(earliest), Sorted::First(latest)) => Ok(Some((earliest, latest))),
            _ => Ok(None),
        }
    }

    /// The `meta.lastUpdated` of a sorted search's first match.
    async fn first_last_updated(
        &self,
        url: String,
        resource_type: &str,
    ) -> Result<Sorted, SourceError> {
        let body = match self.get(&url).await {
            Ok(Fetched::Body(body)) => body,
            Ok(Fetched::NotFound) => return Ok(Sorted::Unknown),
            Err(SourceError::Unsupported(reason)) => {
                tracing::info!(%reason, "FHIR source: no _sort by _lastUpdated; planning counts the whole window");
                return Ok(Sorted::Refused);
            }
            Err(error) => return Err(error),
        };
        let page = parse_page(&url, &body)?;
        if page.sort_warning().is_some() {
            return Ok(Sorted::Refused);
        }
        // A page a read would refuse tells nothing here: planning halves the whole window.
        let found = matches(&page, resource_type, &url).unwrap_or_default();
        let first = found.first().and_then(|&(_, last_updated, _)| last_updated);
        Ok(first.map_or(Sorted::Unknown, Sorted::First))
    }
}

/// Where a read sorted by `_lastUpdated` may pause.
#[derive(Default)]
pub(super) struct PausePoint {
    /// The instant of the last resource read; `None` before the first.
    pub(super) last: Option<DateTime<Utc>>,
    /// The order broke (or a resource had no `lastUpdated`): this read cannot pause.
    pub(super) unordered: bool,
    /// The server's count of the read part was asked on this page (once a page at most).
    pub(super) checked_on_page: bool,
}

impl PausePoint {
    pub(super) fn read(&mut self, last_updated: Option<DateTime<Utc>>) {
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
    pub(super) fn before(
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
