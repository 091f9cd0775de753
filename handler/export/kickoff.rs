//! Kickoff: resolve who and what to export, plan the shards, record the job, enqueue its shards.

use chrono::Utc;
use serde_json::Value;

use super::request::is_patient_level_type;
use super::{enqueue_shards, worker, ExportError, ExportRequest, Level, RequestError};
use crate::app::App;
use crate::fhir::compartment::patient_id_of;
use crate::jobs::{new_job_id, Job, JobStatus, Shard, ShardStatus};
use crate::source::import::is_valid_id;
use crate::source::{PatientScope, ResourceSource, RowRange, ScanRequest};

/// Starts an export for `owner` (the caller, when tokens are checked); returns the recorded job.
pub async fn start(
    app: &App,
    request: ExportRequest,
    request_url: String,
    base_url: String,
    owner: Option<String>,
) -> Result<Job, ExportError> {
    let running = app.jobs.running_count().await?;
    if running >= app.settings.max_running_exports {
        return Err(ExportError::TooManyRunning { running });
    }
    let transaction_time = Utc::now();
    let id = new_job_id();
    let max_per_shard = app.settings.shard_max_resources;
    let (scope, planned) = {
        let (source, request) = (app.source.clone(), request.clone());
        crate::blocking::run(move || -> Result<_, ExportError> {
            let scope = resolve_scope(source.as_ref(), &request)?;
            let nobody = matches!(&scope, PatientScope::Only(patients) if patients.is_empty());
            let stored = source.storage_parts(max_per_shard)?;
            let mut planned = Vec::new();
            for resource_type in source.resource_types()? {
                let wanted = !nobody
                    && (!request.level.is_patient_scoped()
                        || is_patient_level_type(&resource_type))
                    && request
                        .types
                        .as_ref()
                        .is_none_or(|wanted| wanted.contains(&resource_type));
                if !wanted {
                    continue;
                }
                let window = Window {
                    resource_type: &resource_type,
                    scope: &scope,
                    snapshot: transaction_time,
                    max_per_shard,
                };
                let until = request
                    .until
                    .map_or(transaction_time, |u| u.min(transaction_time));
                // A source that knows where it stores a type cuts it there; others are
                // counted and cut by `lastUpdated`.
                let ranges = match stored.contains_key(&resource_type) {
                    true => vec![(None, None)],
                    false => window.split(source.as_ref(), request.since, until)?,
                };
                let parts: Vec<(Range, RowRange, Option<ShardSize>)> =
                    match (ranges.as_slice(), stored.get(&resource_type)) {
                        ([whole], Some(stored)) => {
                            let rows = RowRange::between(&stored.cuts);
                            let parts = rows.len() as u64;
                            let size = Some((stored.bytes / parts, stored.resources / parts));
                            rows.into_iter().map(|rows| (*whole, rows, size)).collect()
                        }
                        _ => ranges
                            .into_iter()
                            .map(|range| (range, RowRange::default(), None))
                            .collect(),
                    };
                planned.push((resource_type, parts));
            }
            Ok((scope, planned))
        })
        .await?
    };
    let mut shards = Vec::new();
    let mut sizes = Vec::new();
    for (resource_type, parts) in planned {
        let split = parts.len() > 1;
        for (part, ((since, until), rows, size)) in parts.into_iter().enumerate() {
            sizes.push(size);
            shards.push(Shard {
                stem: match split {
                    true => format!("{resource_type}-{}", part + 1),
                    false => resource_type.clone(),
                },
                resource_type: resource_type.clone(),
                since,
                until,
                rows,
                status: ShardStatus::Queued,
                attempts: 0,
                heartbeat: Some(transaction_time),
                outputs: Vec::new(),
            });
        }
    }
    let stamp = transaction_time.format("%Y%m%dT%H%M%S");
    let output_folder = match &request.container {
        Some(container) => format!("{container}/{stamp}-{id}"),
        None => format!("{stamp}-{id}").to_ascii_lowercase(),
    };
    let job = Job {
        id: id.clone(),
        request,
        request_url,
        base_url,
        transaction_time,
        output_folder,
        scope,
        status: JobStatus::Running,
        shards,
        failure: None,
        completed_at: None,
        owner,
    };
    crate::crashpoint::reached("kickoff-planned");
    {
        // Counted again and recorded under one lock: concurrent kickoffs cannot all pass the count.
        let _admission = app.jobs.admission().await;
        let running = app.jobs.running_count().await?;
        if running >= app.settings.max_running_exports {
            return Err(ExportError::TooManyRunning { running });
        }
        app.jobs.create(&job).await?;
    }
    crate::crashpoint::reached("kickoff-recorded");
    tracing::info!(job_id = %id, shards = job.shards.len(), "export started");
    if job.shards.is_empty() {
        worker::finalize(app, &id).await?;
    } else {
        // Largest first, so that the last shards to run are small ones and both cores finish
        // together (a stable sort: shards of unknown size keep type order).
        let mut order: Vec<usize> = (0..job.shards.len()).collect();
        order.sort_by_key(|&shard| std::cmp::Reverse(sizes[shard]));
        enqueue_shards(app.queue.as_ref(), &id, order).await?;
    }
    Ok(job)
}

/// One type's export window, to be cut into shards of at most `max_per_shard` resources.
struct Window<'a> {
    resource_type: &'a str,
    scope: &'a PatientScope,
    snapshot: chrono::DateTime<Utc>,
    max_per_shard: u64,
}

type Range = (Option<chrono::DateTime<Utc>>, Option<chrono::DateTime<Utc>>);

/// A planned shard's size as the source estimates it: (bytes, resources), compared in that order.
type ShardSize = (u64, u64);

impl Window<'_> {
    fn count(
        &self,
        source: &dyn ResourceSource,
        since: Option<chrono::DateTime<Utc>>,
        until: chrono::DateTime<Utc>,
    ) -> Result<Option<u64>, ExportError> {
        Ok(source.count(&ScanRequest {
            resource_type: self.resource_type,
            since,
            stored_since: None,
            until,
            snapshot: self.snapshot,
            scope: self.scope,
            after_id: None,
            type_filters: &[],
            rows: RowRange::default(),
        })?)
    }

    /// `meta.lastUpdated` ranges `(since, until]` in order, found by halving the window while a
    /// half holds more than `max_per_shard` (one second is the finest cut); one unbounded range when
    /// the source cannot count or the type is small enough.
    fn split(
        &self,
        source: &dyn ResourceSource,
        since: Option<chrono::DateTime<Utc>>,
        until: chrono::DateTime<Utc>,
    ) -> Result<Vec<Range>, ExportError> {
        let whole = vec![(None, None)];
        let Some(total) = self.count(source, since, until)? else {
            return Ok(whole);
        };
        if total <= self.max_per_shard {
            return Ok(whole);
        }
        let floor =
            since.unwrap_or(chrono::DateTime::UNIX_EPOCH - chrono::Duration::days(365 * 100));
        let mut pieces = Vec::new();
        self.bisect(source, floor, until, total, &mut pieces)?;
        // Neighbours are merged while they fit together (halving leaves many small or empty pieces).
        let mut ranges: Vec<(Range, u64)> = Vec::new();
        for (low, high, count) in pieces {
            match ranges.last_mut() {
                Some(((_, end), sum)) if *sum + count <= self.max_per_shard => {
                    *end = Some(high);
                    *sum += count;
                }
                _ => ranges.push(((Some(low), Some(high)), count)),
            }
        }
        let mut ranges: Vec<Range> = ranges.into_iter().map(|(range, _)| range).collect();
        // The outer ends stay open: the request's own bounds still apply in the worker.
        if let Some(first) = ranges.first_mut() {
            first.0 = since;
        }
        Ok(ranges)
    }

    fn bisect(
        &self,
        source: &dyn ResourceSource,
        low: chrono::DateTime<Utc>,
        high: chrono::DateTime<Utc>,
        count: u64,
        pieces: &mut Vec<(chrono::DateTime<Utc>, chrono::DateTime<Utc>, u64)>,
    ) -> Result<(), ExportError> {
        if count <= self.max_per_shard || high - low <= chrono::Duration::seconds(1) {
            pieces.push((low, high, count));
            return Ok(());
        }
        let middle = low + (high - low) / 2;
        let first = self
            .count(source, Some(low), middle)?
            .unwrap_or(0)
            .min(count);
        self.bisect(source, low, middle, first, pieces)?;
        self.bisect(source, middle, high, count - first, pieces)
    }
}

fn patient_error(message: String) -> ExportError {
    RequestError {
        parameter: "patient".into(),
        message,
        not_supported: false,
    }
    .into()
}

/// The patients whose compartments the export covers.
fn resolve_scope(
    source: &dyn crate::source::ResourceSource,
    request: &ExportRequest,
) -> Result<PatientScope, ExportError> {
    match &request.level {
        Level::System => Ok(PatientScope::All),
        Level::Patient => match &request.patients {
            None => Ok(PatientScope::AnyPatient),
            Some(patients) => {
                for patient in patients {
                    if source.read("Patient", patient)?.is_none() {
                        return Err(patient_error(format!(
                            "patient Patient/{patient} is not known to this server"
                        )));
                    }
                }
                Ok(PatientScope::Only(patients.clone()))
            }
        },
        Level::Group(group_id) => {
            let unknown =
                || ExportError::NotFound(format!("Group/{group_id} is not known to this server"));
            if !is_valid_id(group_id) {
                return Err(unknown());
            }
            let group = source.read("Group", group_id)?.ok_or_else(unknown)?;
            let members = group_members(&group);
            match &request.patients {
                None => Ok(PatientScope::Only(members)),
                Some(patients) => {
                    if let Some(outsider) = patients.iter().find(|p| !members.contains(p)) {
                        return Err(patient_error(format!(
                            "patient Patient/{outsider} is not a member of Group/{group_id}"
                        )));
                    }
                    Ok(PatientScope::Only(patients.clone()))
                }
            }
        }
    }
}

/// The active Patient members of a Group resource.
fn group_members(group: &[u8]) -> Vec<String> {
    let Ok(group) = serde_json::from_slice::<Value>(group) else {
        return Vec::new();
    };
    let mut members = Vec::new();
    for member in group
        .get("member")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if member.get("inactive").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let reference = member
            .pointer("/entity/reference")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(patient) = patient_id_of(reference) {
            if !members.iter().any(|m| m == patient) {
                members.push(patient.to_string());
            }
        }
    }
    members
}
