//! Planning: how a source cuts one type's export into parts (shards) of a bounded size. A source
//! that knows where it stores each type cuts by storage position; one that can count cuts by
//! `meta.lastUpdated` windows; any other gives the whole type as one part.

use chrono::{DateTime, DurationRound, Utc};

use super::{PatientScope, ResourceSource, RowRange, ScanRequest, SourceError, Span};

/// What to plan: one type of an export.
#[derive(Debug, Clone, Copy)]
pub struct PlanRequest<'a> {
    pub resource_type: &'a str,
    pub scope: &'a PatientScope,
    /// The export's `_since` (exclusive).
    pub since: Option<DateTime<Utc>>,
    /// The export's upper bound: `_until` or its `transactionTime`, whichever is earlier.
    pub until: DateTime<Utc>,
    /// The export's `transactionTime`.
    pub snapshot: DateTime<Utc>,
    /// The most resources one part should hold.
    pub max_per_part: u64,
}

/// One part of a type: a `meta.lastUpdated` window `(since, until]` (an open end leaves the
/// export's own bound) and a storage range, with the size the source expects, when it knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Part {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub rows: RowRange,
    pub size: Option<PartSize>,
}

/// A part's expected size; compared by bytes, then resources (to run the largest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PartSize {
    pub bytes: u64,
    pub resources: u64,
}

impl Part {
    /// The whole type.
    pub fn whole() -> Vec<Part> {
        vec![Part::default()]
    }

    /// The parts between rowid `cuts` (ascending), sharing the type's size evenly.
    pub fn between_rows(cuts: &[i64], bytes: u64, resources: u64) -> Vec<Part> {
        let rows = RowRange::between(cuts);
        let count = rows.len() as u64;
        let size = PartSize {
            bytes: bytes / count,
            resources: resources / count,
        };
        rows.into_iter()
            .map(|rows| Part {
                rows,
                size: Some(size),
                ..Part::default()
            })
            .collect()
    }
}

/// `meta.lastUpdated` windows in order, found by counting and halving the export's window while a
/// half holds more than `max_per_part` (one second is the finest cut); the whole type when the
/// source cannot count or the type is small enough. Neighbouring pieces are merged while they fit.
/// A part counted says how many resources it holds (its bytes unknown).
pub fn by_last_updated(
    source: &dyn ResourceSource,
    request: &PlanRequest<'_>,
) -> Result<Vec<Part>, SourceError> {
    let Some(total) = count(source, request, request.since, request.until)? else {
        return Ok(Part::whole());
    };
    let counted = |resources| {
        Some(PartSize {
            bytes: 0,
            resources,
        })
    };
    if total <= request.max_per_part {
        return Ok(vec![Part {
            size: counted(total),
            ..Part::default()
        }]);
    }
    let floor = request
        .since
        .unwrap_or(DateTime::UNIX_EPOCH - chrono::Duration::days(365 * 100));
    let (low, high) = occupied(source, request, floor, total)?.unwrap_or((floor, request.until));
    let mut pieces = Vec::new();
    bisect(source, request, low, high, total, &mut pieces)?;
    let mut parts: Vec<(Part, u64)> = Vec::new();
    for (low, high, count) in pieces {
        match parts.last_mut() {
            Some((part, sum)) if *sum + count <= request.max_per_part => {
                part.until = Some(high);
                *sum += count;
            }
            _ => parts.push((
                Part {
                    since: Some(low),
                    until: Some(high),
                    ..Part::default()
                },
                count,
            )),
        }
    }
    let mut parts: Vec<Part> = parts
        .into_iter()
        .map(|(part, sum)| Part {
            size: counted(sum),
            ..part
        })
        .collect();
    // The outer ends stay open: the request's own bounds still apply in the worker.
    if let Some(first) = parts.first_mut() {
        first.since = request.since;
    }
    if let Some(last) = parts.last_mut() {
        last.until = Some(request.until);
    }
    Ok(parts)
}

/// The narrowest window `(low, high]` that holds all `total` resources of the type: from the
/// earliest and latest `meta.lastUpdated` the source tells, when a count of that window finds all
/// `total` (a source that sorted as asked for). Data loaded in bulk shares a few minutes of a long
/// export window: halving from its `floor` would count once for each of some thirty halvings
/// before the first cut that splits it.
fn occupied(
    source: &dyn ResourceSource,
    request: &PlanRequest<'_>,
    floor: DateTime<Utc>,
    total: u64,
) -> Result<Option<Span>, SourceError> {
    let Some((earliest, latest)) =
        source.last_updated_span(&scan(request, request.since, request.until))?
    else {
        return Ok(None);
    };
    // Whole milliseconds below the earliest, as many servers keep no finer instants.
    let millisecond = chrono::Duration::milliseconds(1);
    let below = (earliest - millisecond)
        .duration_trunc(millisecond)
        .unwrap_or(earliest - millisecond);
    let low = below.max(floor);
    if latest > request.until || low >= latest {
        return Ok(None);
    }
    let within = count(source, request, Some(low), latest)?;
    Ok((within == Some(total)).then_some((low, latest)))
}

fn count(
    source: &dyn ResourceSource,
    request: &PlanRequest<'_>,
    since: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
) -> Result<Option<u64>, SourceError> {
    source.count(&scan(request, since, until))
}

/// A whole-type scan of the window `(since, until]`.
fn scan<'a>(
    request: &PlanRequest<'a>,
    since: Option<DateTime<Utc>>,
    until: DateTime<Utc>,
) -> ScanRequest<'a> {
    ScanRequest {
        resource_type: request.resource_type,
        since,
        stored_since: None,
        until,
        snapshot: request.snapshot,
        scope: request.scope,
        after_id: None,
        type_filters: &[],
        rows: RowRange::default(),
        resume: None,
        pause_after: None,
    }
}

fn bisect(
    source: &dyn ResourceSource,
    request: &PlanRequest<'_>,
    low: DateTime<Utc>,
    high: DateTime<Utc>,
    count_within: u64,
    pieces: &mut Vec<(DateTime<Utc>, DateTime<Utc>, u64)>,
) -> Result<(), SourceError> {
    if count_within <= request.max_per_part || high - low <= chrono::Duration::seconds(1) {
        pieces.push((low, high, count_within));
        return Ok(());
    }
    let middle = low + (high - low) / 2;
    let first = count(source, request, Some(low), middle)?
        .unwrap_or(0)
        .min(count_within);
    bisect(source, request, low, middle, first, pieces)?;
    bisect(source, request, middle, high, count_within - first, pieces)
}
