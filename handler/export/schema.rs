//! The stored documents of an export, as they are written (the storage schema): the job, its
//! planned shards, each shard's state, the pages of a partial manifest, a de-identified export's
//! pinned configuration; and [`Change`], what a transition decides about one of them. No logic
//! beyond a document's own accessors: transitions are in `state`, the store in `jobs`.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::request::ExportRequest;
use crate::deid::Keys;
use crate::source::{Cursor, PatientScope, RowRange};
use crate::storage::OutputFile;

/// What an update closure decided.
pub enum Change<T> {
    /// Write the changed job, then return `T`.
    Write(T),
    /// Leave the stored job as it is and return `T`.
    Keep(T),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Running,
    Completed,
    Failed,
    Cancelled,
}

/// One planned part of a job (fixed once planned); its progress is a [`ShardState`] of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shard {
    pub resource_type: String,
    /// File name stem: `Patient` gives `Patient-1.ndjson`, ...
    pub stem: String,
    /// The `meta.lastUpdated` range of a type split into several shards: `(since, until]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// The part of a type cut by storage position (as `ResourceSource::plan` cut it).
    #[serde(default, skip_serializing_if = "RowRange::is_whole")]
    pub rows: RowRange,
    /// The patients whose resource blocks the shard writes (`organizeOutputBy=Patient`); their
    /// ids are the job's document `patients/{shard}.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patients: Option<PatientRange>,
    /// What the shard writes of its type.
    #[serde(default, skip_serializing_if = "ShardKind::is_resources")]
    pub kind: ShardKind,
    /// The view it writes the rows of (`ShardKind::View`): an index into the request's views.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<usize>,
}

/// What a shard writes of its type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ShardKind {
    /// Each resource's version at `transactionTime` (the manifest's `output`).
    #[default]
    Resources,
    /// The deletions since `_since`: files of transaction Bundles (the manifest's `deleted`).
    Deletions,
    /// Azure's `includeAssociatedData`: the earlier versions (`_history`) and the deletions as
    /// soft-deleted versions (`_deleted`), in `output` beside the resources.
    Versions,
    /// The rows of a view (`$viewdefinition-export`) over the type's resources.
    View,
    /// The first phase of output organized by patient from a source that cannot stream
    /// compartments: the type's resources, each in the partition of the shard whose patient's
    /// block holds it (files beside the output, never in the manifest; see `export::partitions`).
    Partition,
}

impl ShardKind {
    pub fn is_resources(&self) -> bool {
        *self == ShardKind::Resources
    }

    /// Whether the manifest (and its pages) lists the shard's files: a partition's are not the
    /// export's, their resources are in their blocks.
    pub fn is_listed(&self) -> bool {
        *self != ShardKind::Partition
    }
}

/// The patients of a shard of resource blocks, in planning order, first and last included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatientRange {
    pub first: String,
    pub last: String,
    pub count: usize,
    /// The types of the blocks, in block order, as planned (shards planned before they were
    /// recorded ask the source again).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    pub request: ExportRequest,
    /// The kickoff URL as the client sent it (the manifest's `request`).
    pub request_url: String,
    /// Base of the manifest's file URLs and the status URL.
    pub base_url: String,
    pub transaction_time: DateTime<Utc>,
    /// Storage path of the folder the files go to: `container/{yyyyMMddTHHmmss}-{id}` or a new container.
    pub output_folder: String,
    /// Whose compartments the export covers.
    pub scope: PatientScope,
    pub status: JobStatus,
    /// Whether the shards are planned: a kickoff records the job unplanned and queues its
    /// planning (documents of earlier versions were planned at kickoff).
    #[serde(default = "planned_at_kickoff")]
    pub planned: bool,
    /// When the shards were planned and queued: the first sign of life of a shard not yet claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_at: Option<DateTime<Utc>>,
    pub shards: Vec<Shard>,
    pub failure: Option<String>,
    /// What kind of failure stopped the job, when it was not one of this service's own (the
    /// status URL answers with its class: a source that refused is 502, not 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_fault: Option<crate::fault::Fault>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The client that started the export (`{issuer}#{client}`), when tokens are checked: only it
    /// sees the status and the files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// A de-identified export's configuration version and keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deidentification: Option<PinnedConfig>,
    /// What planning found the export cannot deliver (deletions a source cannot list): errors in
    /// the notes file, beside the request's notes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub planning_errors: Vec<String>,
}

fn planned_at_kickoff() -> bool {
    true
}

impl Job {
    /// The state of a shard that has no document yet.
    pub fn unclaimed_shard(&self) -> ShardState {
        ShardState::queued_at(self.planned_at.unwrap_or(self.transaction_time))
    }

    /// When a finished job's files and state are removed.
    pub fn expires_at(&self, retention: std::time::Duration) -> Option<DateTime<Utc>> {
        Some(self.completed_at? + chrono::Duration::from_std(retention).ok()?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardStatus {
    /// A message for it is (or should be) in the queue.
    Queued,
    /// A worker claimed it and beats.
    Running,
    /// It failed and waits for `retry_at`; no message is out for it until then.
    Waiting,
    Done,
}

/// One shard's state: its own document, written by the worker running it and the sweeper alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardState {
    pub status: ShardStatus,
    /// Runs begun (claims).
    pub attempts: u32,
    /// The last sign of life: when the shard was queued, or the running worker's last beat.
    pub heartbeat: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The files written: all of them once done; those of the runs paused so far before.
    #[serde(default)]
    pub outputs: Vec<OutputFile>,
    /// Where the last paused run stopped: the next run reads on from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
    /// `attempts` when the shard last paused: the runs since count toward the restart cap, those
    /// before made progress.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub paused_at_attempt: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ShardState {
    /// A shard without a document yet: queued when its job was planned.
    pub fn queued_at(at: DateTime<Utc>) -> ShardState {
        ShardState {
            status: ShardStatus::Queued,
            attempts: 0,
            heartbeat: at,
            retry_at: None,
            last_error: None,
            outputs: Vec::new(),
            cursor: None,
            paused_at_attempt: 0,
        }
    }

    /// Runs begun since the shard last made progress (paused): what the restart cap counts.
    pub fn runs_since_progress(&self) -> u32 {
        self.attempts.saturating_sub(self.paused_at_attempt)
    }
}

/// What the job records of its configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PinnedConfig {
    /// The configuration's ETag at kickoff (quoted).
    pub etag: String,
    /// Keys the configuration left empty, chosen at kickoff; removed when the export ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Keys>,
}

/// One stored page: its files, and what it and the pages before it list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Page {
    pub output: Vec<OutputFile>,
    pub listed: Listed,
}

/// The shards whose files a page and those before it list.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    /// Shards all of whose files are listed.
    pub shards: BTreeSet<usize>,
    /// A shard listed in part (a page filled up within its files): the shard and how many of its
    /// files are listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial: Option<(usize, usize)>,
}
