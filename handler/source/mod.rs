//! Where resources are read from: the `ResourceSource` trait, the embedded SQLite store (with its
//! importer), and a FHIR server over REST.

pub mod embedded;
pub mod import;
pub mod plan;
mod read_once;
pub mod remote;
mod tuning;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::fhir::search::SearchQuery;
use crate::storage::StorageError;

pub use embedded::EmbeddedStore;
pub use plan::{Part, PartSize, PlanRequest};
pub use remote::RemoteServer;

/// Which patients' compartments a scan is limited to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PatientScope {
    /// No limit (system level).
    All,
    /// Resources in any patient's compartment (Patient level).
    AnyPatient,
    /// Resources in these patients' compartments (Group level, `patient`).
    Only(Vec<String>),
}

/// One slice of resources to read: a type, within a `meta.lastUpdated` window.
#[derive(Debug, Clone)]
pub struct ScanRequest<'a> {
    pub resource_type: &'a str,
    /// Exclusive lower bound (`_since`).
    pub since: Option<DateTime<Utc>>,
    /// An export's `_since`: a source that knows when it stored each resource (the embedded store)
    /// also reads those stored after this, whatever `lastUpdated` they claim, so that exports
    /// chained on each other's `transactionTime` miss nothing loaded in between. `None` in a
    /// search or a window of a split type, where `since` alone must decide.
    pub stored_since: Option<DateTime<Utc>>,
    /// Inclusive upper bound: the export's `transactionTime`, `_until` or the shard's range end,
    /// whichever is earliest.
    pub until: DateTime<Utc>,
    /// The instant the export reads the data as of (its `transactionTime`): versions replaced
    /// later are read as they were then.
    pub snapshot: DateTime<Utc>,
    pub scope: &'a PatientScope,
    /// Only ids after this one (paging); the scan goes in id order.
    pub after_id: Option<&'a str>,
    /// `_typeFilter` queries of this type (`Type?...`, ORed): a source may pass them on to a server;
    /// the exporter applies them to what comes back either way.
    pub type_filters: &'a [SearchQuery],
    /// The part of the type to read, as planned by `ResourceSource::plan` (whole by default).
    pub rows: RowRange,
    /// Where an earlier run of this scan paused: read only what comes after it.
    pub resume: Option<&'a Cursor>,
    /// Past this instant, pause at the first point a scan can resume from (a time-boxed shard);
    /// `None`: read to the end.
    pub pause_after: Option<std::time::Instant>,
}

impl<'a> ScanRequest<'a> {
    /// Every resource of a type in `scope` as at `snapshot`, read to the end; set the other fields
    /// to narrow it.
    pub fn whole(
        resource_type: &'a str,
        scope: &'a PatientScope,
        snapshot: DateTime<Utc>,
    ) -> ScanRequest<'a> {
        ScanRequest {
            resource_type,
            since: None,
            stored_since: None,
            until: snapshot,
            snapshot,
            scope,
            after_id: None,
            type_filters: &[],
            rows: RowRange::default(),
            resume: None,
            pause_after: None,
        }
    }
}

/// The compartments of a shard of output organized by patient: each resource of `types` whose
/// version at `snapshot` lies in the window and whose compartment holds one of `patients`.
#[derive(Debug, Clone)]
pub struct CompartmentScan<'a> {
    /// In the order planning gave them (the store's order of the Patients).
    pub patients: &'a [String],
    /// In block order.
    pub types: &'a [String],
    /// The window, as in [`ScanRequest`].
    pub since: Option<DateTime<Utc>>,
    pub stored_since: Option<DateTime<Utc>>,
    pub until: DateTime<Utc>,
    pub snapshot: DateTime<Utc>,
    /// Past this instant, pause before the next group of patients: the cursor is the last patient
    /// given (`Cursor::Id`), every resource of whose compartment was given.
    pub pause_after: Option<std::time::Instant>,
}

/// One resource of a compartment scan. The scan's patients are given in groups of neighbours
/// (in `CompartmentScan::patients`' order): each group's resources, each once, before the next
/// group's, in storage order.
#[derive(Debug, Clone)]
pub struct CompartmentRow<'a> {
    /// The group: places in `CompartmentScan::patients`; the resource is in the compartment of
    /// one of them at least.
    pub patients: std::ops::Range<usize>,
    /// Its type's place in `CompartmentScan::types`.
    pub rank: usize,
    pub resource: &'a [u8],
}

/// Where a paused scan stopped, kept in the shard's state for its continuation. Everything before
/// it was passed to the sink, nothing after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "after")]
pub enum Cursor {
    /// The embedded store read in storage order: rows after this rowid.
    Rowid { rowid: i64 },
    /// The embedded store read in id order: rows after this id.
    Id { id: String },
    /// A FHIR server read in `_lastUpdated` order: resources last updated after this instant. Every
    /// resource up to it was read, checked by a `_summary=count` of that part of the window.
    LastUpdated { instant: DateTime<Utc> },
}

/// How a scan ended: how many resources it passed on, and where it paused (`None`: at the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    pub count: u64,
    pub paused: Option<Cursor>,
}

impl Scanned {
    pub fn whole(count: u64) -> Scanned {
        Scanned {
            count,
            paused: None,
        }
    }
}

/// A part of a type cut by storage position (the embedded store's rowids): `from` inclusive, `to`
/// exclusive, either end open, so that the parts of a type hold every row once whatever was
/// stored after the cut.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<i64>,
}

impl RowRange {
    pub fn is_whole(&self) -> bool {
        self.from.is_none() && self.to.is_none()
    }

    /// The parts between `cuts` (ascending): below the first, between neighbours, from the last on.
    pub fn between(cuts: &[i64]) -> Vec<RowRange> {
        let bounds: Vec<Option<i64>> = std::iter::once(None)
            .chain(cuts.iter().copied().map(Some))
            .chain(std::iter::once(None))
            .collect();
        bounds
            .windows(2)
            .map(|pair| RowRange {
                from: pair[0],
                to: pair[1],
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("embedded store {path}: {source}")]
    Sqlite {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The FHIR server refused or failed a request (after retries); the message says which and why.
    #[error("FHIR source: {0}")]
    Remote(String),
    /// The FHIR server does not support something the export asks for (a type, a parameter).
    #[error("FHIR source: {0}")]
    Unsupported(String),
}

impl SourceError {
    pub fn fault(&self) -> crate::fault::Fault {
        match self {
            SourceError::Remote(_) | SourceError::Unsupported(_) => crate::fault::Fault::Upstream,
            SourceError::Sqlite { .. } | SourceError::Io { .. } => crate::fault::Fault::Internal,
        }
    }
}

/// Why the receiver of a scan stopped it.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("stopped: the export was cancelled")]
    Stopped,
    /// The data cannot be written as asked (a resource the anonymization configuration cannot
    /// process, or which changed; a view's column of several values): no retry mends it. The
    /// message names no resource values, ids or keys.
    #[error("{0}")]
    Permanent(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl ScanError {
    pub fn fault(&self) -> crate::fault::Fault {
        match self {
            ScanError::Source(e) => e.fault(),
            ScanError::Sink(SinkError::Storage(e)) => e.fault(),
            ScanError::Sink(SinkError::Stopped) => crate::fault::Fault::Internal,
            ScanError::Sink(SinkError::Permanent(_)) => crate::fault::Fault::Invalid,
        }
    }
}

/// The earliest and the latest `meta.lastUpdated` of some resources.
pub type Span = (DateTime<Utc>, DateTime<Utc>);

/// A FHIR resource source. Every call blocks, and must not be made on a runtime worker (the remote
/// source drives its own runtime, which panics there): a request calls through
/// [`crate::blocking::run`], a shard from its own thread.
pub trait ResourceSource: Send + Sync {
    /// The resource types among those `wanted` that hold at least one resource, sorted by name (a
    /// FHIR server counts the types wanted only).
    fn resource_types(&self, wanted: &dyn Fn(&str) -> bool) -> Result<Vec<String>, SourceError>;

    /// One resource's stored JSON.
    fn read(&self, resource_type: &str, id: &str) -> Result<Option<Vec<u8>>, SourceError>;

    /// How many resources a scan would give, when the source can tell cheaply (`None`: it cannot).
    /// `type_filters` and `after_id` are not applied.
    fn count(&self, _request: &ScanRequest<'_>) -> Result<Option<u64>, SourceError> {
        Ok(None)
    }

    /// The earliest and the latest `meta.lastUpdated` among the resources a scan would give, when
    /// the source can tell cheaply (`None`: it cannot, or the scan gives none). A hint: planning
    /// checks it with a count before it relies on it.
    fn last_updated_span(&self, _request: &ScanRequest<'_>) -> Result<Option<Span>, SourceError> {
        Ok(None)
    }

    /// The parts one type's export is cut into, each of about `max_per_part` resources at most, in
    /// an order that reads each resource once (by default one part: the whole type).
    fn plan(&self, _request: &PlanRequest<'_>) -> Result<Vec<Part>, SourceError> {
        Ok(Part::whole())
    }

    /// Whether `scan_compartments` streams compartments (the embedded store). A source that
    /// cannot (a FHIR server) has an organized export read each type once, as a plain export
    /// does, and put each resource in its patient's shard (see `export::partitions`).
    fn streams_compartments(&self) -> bool {
        false
    }

    /// Streams the compartments of a list of patients (a shard of output organized by patient) in
    /// groups of neighbours, each group's resources once, read together: what lets the exporter
    /// write a group's blocks as soon as it is read, and pause between groups. `None` when the
    /// source cannot (a FHIR server).
    fn scan_compartments(
        &self,
        _request: &CompartmentScan<'_>,
        _sink: &mut dyn FnMut(&CompartmentRow<'_>) -> Result<(), SinkError>,
    ) -> Result<Option<Scanned>, ScanError> {
        Ok(None)
    }

    /// What the source is waiting for, when it waits out a refusal (a role assignment that is
    /// still propagating): a short text for a status poll's `X-Progress`.
    fn waiting_for(&self) -> Option<String> {
        None
    }

    /// Streams each matching resource, as its stored JSON bytes, to `sink`: every one, or (past
    /// `pause_after`) those up to a point a later scan resumes from.
    fn scan(
        &self,
        request: &ScanRequest<'_>,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError>;

    /// The types among those `wanted` whose deletions an export with `_since` asks for: every type
    /// that may have held a resource, holding any now or not (by default those that hold some).
    fn types_with_deletions(
        &self,
        wanted: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<String>, SourceError> {
        self.resource_types(wanted)
    }

    /// Why `scan_deleted` cannot list the type's deletions (`None`: it can).
    fn why_deletions_are_unknown(
        &self,
        _resource_type: &str,
    ) -> Result<Option<String>, SourceError> {
        Ok(Some("this source cannot list the resources deleted".into()))
    }

    /// Whether the resource's current version is a deletion (a read finds nothing; a server
    /// answers `410 Gone`).
    fn is_deleted(&self, _resource_type: &str, _id: &str) -> Result<bool, SourceError> {
        Ok(false)
    }

    /// Streams to `sink`, in id order, the id of each resource of the type whose version at the
    /// snapshot is a deletion made after `since` and by `until`, and whose version before the
    /// deletion was in `scope`; `type_filters` are not applied. A source that cannot tell refuses
    /// (`Unsupported`): never an empty answer on doubt.
    fn scan_deleted(
        &self,
        _request: &ScanRequest<'_>,
        _sink: &mut dyn FnMut(&str) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        Err(SourceError::Unsupported("this source cannot list the resources deleted".into()).into())
    }

    /// Streams to `sink`, in id order, the versions of the type an export with Azure's
    /// `includeAssociatedData` writes: each resource's version at the snapshot (a deletion only
    /// with `kinds.deleted`) and, with `kinds.history`, its earlier versions, in the scan's
    /// `lastUpdated` window. Pauses (past `pause_after`) only between resources.
    /// Whether `scan_versions` works (else an export asking for versions is refused).
    fn keeps_versions(&self) -> bool {
        false
    }

    fn scan_versions(
        &self,
        _request: &ScanRequest<'_>,
        _kinds: VersionKinds,
        _sink: &mut dyn FnMut(&Version) -> Result<(), SinkError>,
    ) -> Result<Scanned, ScanError> {
        Err(SourceError::Unsupported("this source keeps no history".into()).into())
    }

    /// A page of a type's (or one resource's) versions, newest first: a server's `_history`.
    fn history(&self, _request: &HistoryRequest<'_>) -> Result<HistoryPage, SourceError> {
        Err(SourceError::Unsupported(
            "this source keeps no history".into(),
        ))
    }
}

/// The versions an export writes besides each resource's version at `transactionTime`
/// (`includeAssociatedData`, Azure's values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionKinds {
    /// `_history`: every earlier version, as stored.
    #[serde(default)]
    pub history: bool,
    /// `_deleted`: each deletion, as the soft-deleted version Azure writes.
    #[serde(default)]
    pub deleted: bool,
}

impl VersionKinds {
    pub fn any(&self) -> bool {
        self.history || self.deleted
    }

    pub fn is_none(&self) -> bool {
        !self.any()
    }
}

/// What `ResourceSource::history` lists: the versions of a type, or of one resource, stored by
/// the time the first page was asked for, last updated after `since`.
#[derive(Debug, Clone)]
pub struct HistoryRequest<'a> {
    pub resource_type: &'a str,
    pub id: Option<&'a str>,
    /// Exclusive lower bound on `meta.lastUpdated`.
    pub since: Option<DateTime<Utc>>,
    pub count: usize,
    /// Where the previous page ended, as its `HistoryPage::next` gave it.
    pub after: Option<&'a str>,
}

/// One page of history.
#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    pub versions: Vec<Version>,
    /// The position to ask the next page from, when there is more.
    pub next: Option<String>,
}

/// One stored version of a resource: its content, or (a deletion) only its `resourceType`, `id`
/// and `meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub id: String,
    pub version_id: String,
    pub last_updated: DateTime<Utc>,
    pub deleted: bool,
    pub json: Vec<u8>,
}
