//! Kickoff and planning. A kickoff admits, resolves whose data to export, records the job and
//! queues its planning; planning (queue-triggered) lets the source cut each type into parts,
//! records them as shards and queues those.

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::jobs::{new_job_id, Change, Job, JobStatus, Shard, ShardKind};
use super::request::is_patient_level_type;
use super::state;
use super::{ExportError, ExportRequest, Exports, Level, RequestError};
use crate::fault::Fault;
use crate::fhir::compartment::patient_id_of;
use crate::fhir::is_valid_id;
use crate::queue::{enqueue_shards, WorkMessage};
use crate::source::{Part, PatientScope, PlanRequest, ResourceSource, RowRange, SourceError};

/// Starts an export for `owner` (the caller, when tokens are checked); returns the recorded job.
/// Admit, resolve the scope, record the job, queue its planning: the source is asked for no more
/// than the patients named, so a kickoff answers in milliseconds whatever the source.
pub async fn start(
    exports: &Exports,
    request: ExportRequest,
    request_url: String,
    base_url: String,
    owner: Option<String>,
) -> Result<Job, ExportError> {
    admit(exports).await?;
    super::deid::check_output_container(exports, &request)?;
    if request.versions.any() && !exports.source.keeps_versions() {
        return Err(RequestError {
            parameter: "includeAssociatedData".into(),
            message: "includeAssociatedData _history and _deleted need the embedded store as the source: this service reads a FHIR server, whose versions it does not export".into(),
            not_supported: true,
        }
        .into());
    }
    let deidentification = super::deid::pin(exports, &request).await?;
    let transaction_time = Utc::now();
    let id = new_job_id();
    let scope = {
        let (source, request) = (exports.source.clone(), request.clone());
        crate::blocking::run(move || resolve_scope(source.as_ref(), &request)).await?
    };
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
        planned: false,
        planned_at: None,
        shards: Vec::new(),
        failure: None,
        failure_fault: None,
        completed_at: None,
        owner,
        deidentification,
        planning_errors: Vec::new(),
    };
    {
        // Counted again and recorded under one lock: concurrent kickoffs cannot all pass the count.
        let _admission = exports.jobs.admission().await;
        admit(exports).await?;
        exports.jobs.create(&job).await?;
    }
    crate::crashpoint::reached("kickoff-recorded");
    tracing::info!(job_id = %id, "export started");
    exports.queue.enqueue(vec![WorkMessage::plan(&id)]).await?;
    Ok(job)
}

/// Plans a recorded job: each type it reads, cut into parts by the source, becomes a shard; the
/// shards are recorded and queued, largest first. Runs again harmlessly (a redelivery, the sweeper):
/// the first plan recorded stands. A source that refuses fails the job, with its reason.
pub async fn plan_job(exports: &Exports, job_id: &str) -> Result<(), ExportError> {
    let Some((job, _)) = exports.jobs.load(job_id).await? else {
        return Ok(());
    };
    if job.status != JobStatus::Running {
        return Ok(());
    }
    if job.planned {
        return send_unclaimed(exports, &job).await;
    }
    let planned = match job.request.organized_by_patient() {
        true => super::blocks::plan(exports, &job).await,
        // Every version is read by the shards of changes.
        false if job.request.versions.any() => Ok((Vec::new(), Vec::new())),
        false if job.request.views.is_some() => {
            plan(exports, &job.request, &job.scope, job.transaction_time)
                .await
                .map(|planned| view_shards(planned, job.request.views.as_ref().expect("checked")))
        }
        false => plan(exports, &job.request, &job.scope, job.transaction_time)
            .await
            .map(shards_of),
    };
    let mut job = job;
    let planned = match planned {
        Ok(planned) => with_changes(exports, &job, planned)
            .await
            .map(|(planned, errors)| {
                job.planning_errors = errors;
                planned
            }),
        failed => failed,
    };
    let (shards, largest_first) = match planned {
        Ok(planned) => planned,
        Err(error)
            if matches!(
                error.fault(),
                Fault::Invalid | Fault::NotFound | Fault::Upstream
            ) =>
        {
            tracing::warn!(job_id, %error, "export failed: it could not be planned");
            return fail_planning(exports, job_id, &error).await;
        }
        Err(error) => return Err(error),
    };
    write_notes(exports, &job).await?;
    // Queued now, not at kickoff: a slow planning must not make its shards look stale already.
    let planned_at = Utc::now();
    let planning_errors = job.planning_errors.clone();
    let recorded = exports
        .jobs
        .update(job_id, |job| {
            if job.status != JobStatus::Running || job.planned {
                return Change::Keep(None);
            }
            job.shards = shards.clone();
            job.planning_errors = planning_errors.clone();
            job.planned = true;
            job.planned_at = Some(planned_at);
            Change::Write(Some(job.clone()))
        })
        .await?
        .flatten();
    crate::crashpoint::reached("kickoff-planned");
    match recorded {
        None => Ok(()),
        Some(job) if job.shards.is_empty() => super::completion::finalize(exports, &job).await,
        Some(job) => {
            tracing::info!(job_id, shards = job.shards.len(), "export planned");
            Ok(enqueue_shards(exports.queue.as_ref(), job_id, largest_first).await?)
        }
    }
}

/// Writes the lenient-handling notes file (the manifest's `error`) before any shard runs, so that
/// a partial manifest lists it as the complete one does.
async fn write_notes(exports: &Exports, job: &Job) -> Result<(), ExportError> {
    if let Some((file, body)) = super::manifest::notes_file(job) {
        exports
            .storage
            .put(&file.path, body.into(), crate::storage::PutMode::Overwrite)
            .await?;
    }
    Ok(())
}

/// A planning message delivered again after the plan was recorded: the planning that recorded it
/// may have stopped before its shards went out (the host sends an invocation's messages only when
/// it ends well). The shards no worker has claimed go out (again: a second message for one is
/// skipped by the claim).
async fn send_unclaimed(exports: &Exports, job: &Job) -> Result<(), ExportError> {
    let mut unclaimed = Vec::new();
    for index in exports.jobs.unfinished_shards(job).await? {
        if exports.jobs.shard(&job.id, index).await?.is_none() {
            unclaimed.push(index);
        }
    }
    if !unclaimed.is_empty() {
        tracing::warn!(job_id = %job.id, shards = unclaimed.len(), "planning delivered again: unclaimed shards sent again");
        enqueue_shards(exports.queue.as_ref(), &job.id, unclaimed).await?;
    }
    Ok(())
}

async fn fail_planning(
    exports: &Exports,
    job_id: &str,
    error: &ExportError,
) -> Result<(), ExportError> {
    let failure = format!("the export could not be planned: {error}");
    let fault = error.fault();
    exports
        .jobs
        .update(job_id, |job| {
            state::fail_planning(job, (failure.clone(), Some(fault)), Utc::now())
        })
        .await?;
    Ok(())
}

/// Refuses a kickoff while the most exports the service takes at once are running.
async fn admit(exports: &Exports) -> Result<(), ExportError> {
    let running = exports.jobs.running_count().await?;
    match running >= exports.limits.max_running_exports {
        true => Err(ExportError::TooManyRunning { running }),
        false => Ok(()),
    }
}

/// Which of the types wanted a source lists (those it holds, or those it may hold deletions of).
type TypesAmong =
    fn(&dyn ResourceSource, &dyn Fn(&str) -> bool) -> Result<Vec<String>, SourceError>;

/// The types an export reads (`types`: those the source holds, or those it may hold deletions
/// of, among those wanted), narrowed by `_type` and the level before the source looks.
fn exported_types(
    source: &dyn ResourceSource,
    request: &ExportRequest,
    scope: &PatientScope,
    types: TypesAmong,
) -> Result<Vec<String>, ExportError> {
    if matches!(scope, PatientScope::Only(patients) if patients.is_empty()) {
        return Ok(Vec::new());
    }
    let wanted = |resource_type: &str| {
        (!request.level.is_patient_scoped() || is_patient_level_type(resource_type))
            && request.names_type(resource_type)
    };
    Ok(types(source, &wanted)?)
}

/// The shards of changes: with `_since`, each type's deletions (the manifest's `deleted`); with
/// `includeAssociatedData`, each type's versions (in `output`, in place of its resources). A
/// shard a type, after the others (they are small). Output organized by patient lists deletions
/// apart from the patients' blocks, in the same files as any other export's. The types whose
/// changes the source cannot list come back as one error for the manifest: never a silently
/// empty `deleted`.
async fn with_changes(
    exports: &Exports,
    job: &Job,
    (mut shards, mut order): (Vec<Shard>, Vec<usize>),
) -> Result<((Vec<Shard>, Vec<usize>), Vec<String>), ExportError> {
    let mut kinds = Vec::new();
    if job.request.since.is_some() && job.request.views.is_none() {
        kinds.push(ShardKind::Deletions);
    }
    if job.request.versions.any() {
        kinds.push(ShardKind::Versions);
    }
    if kinds.is_empty() {
        return Ok(((shards, order), Vec::new()));
    }
    let (source, planned) = (exports.source.clone(), job.clone());
    let (types, unknown) = crate::blocking::run(move || -> Result<_, ExportError> {
        let types = exported_types(
            source.as_ref(),
            &planned.request,
            &planned.scope,
            |source, wanted| source.types_with_deletions(wanted),
        )?;
        let mut listed = Vec::new();
        let mut unknown: Vec<(String, String)> = Vec::new();
        for resource_type in types {
            match source.why_deletions_are_unknown(&resource_type)? {
                None => listed.push(resource_type),
                Some(reason) => unknown.push((resource_type, reason)),
            }
        }
        Ok((listed, unknown))
    })
    .await?;
    let errors = match unknown.first() {
        None => Vec::new(),
        Some((_, reason)) => {
            let names: Vec<&str> = unknown.iter().map(|(t, _)| t.as_str()).collect();
            let what = match job.request.versions.any() {
                true => "the earlier versions and deletions",
                false => "the resources deleted since _since",
            };
            vec![format!(
                "{what} could not be determined for {}, so the export does not list them: {reason}",
                names.join(", ")
            )]
        }
    };
    for kind in kinds {
        for resource_type in &types {
            order.push(shards.len());
            shards.push(Shard {
                stem: match kind {
                    ShardKind::Deletions => format!("deleted-{resource_type}"),
                    _ => format!("{resource_type}-versions"),
                },
                resource_type: resource_type.clone(),
                since: None,
                until: None,
                rows: RowRange::default(),
                patients: None,
                kind,
                view: None,
            });
        }
    }
    Ok(((shards, order), errors))
}

/// Each type the export reads, with the parts its source cut it into.
pub(super) async fn plan(
    exports: &Exports,
    request: &ExportRequest,
    scope: &PatientScope,
    transaction_time: DateTime<Utc>,
) -> Result<Vec<(String, Vec<Part>)>, ExportError> {
    plan_types(exports, request, scope, transaction_time, None).await
}

/// Each of `types` (by default, each type the export reads), with the parts its source cut it
/// into.
pub(super) async fn plan_types(
    exports: &Exports,
    request: &ExportRequest,
    scope: &PatientScope,
    transaction_time: DateTime<Utc>,
    types: Option<Vec<String>>,
) -> Result<Vec<(String, Vec<Part>)>, ExportError> {
    let (source, request, scope) = (exports.source.clone(), request.clone(), scope.clone());
    let max_per_part = exports.limits.shard_max_resources;
    crate::blocking::run(move || -> Result<_, ExportError> {
        let mut planned = Vec::new();
        let types = match types {
            Some(types) => types,
            None => exported_types(source.as_ref(), &request, &scope, |source, wanted| {
                source.resource_types(wanted)
            })?,
        };
        for resource_type in types {
            let parts = source.plan(&PlanRequest {
                resource_type: &resource_type,
                scope: &scope,
                since: request.since,
                until: request
                    .until
                    .map_or(transaction_time, |u| u.min(transaction_time)),
                snapshot: transaction_time,
                max_per_part,
            })?;
            planned.push((resource_type, parts));
        }
        Ok(planned)
    })
    .await
}

/// The job's shards, one per part (files named `{type}-{part}` when a type has several), and the
/// order to queue them in: largest first, so that the last to run are small ones and both cores
/// finish together (a stable sort: shards of unknown size keep type order).
pub(super) fn shards_of(planned: Vec<(String, Vec<Part>)>) -> (Vec<Shard>, Vec<usize>) {
    let mut shards = Vec::new();
    let mut sizes = Vec::new();
    for (resource_type, parts) in planned {
        let split = parts.len() > 1;
        for (number, part) in parts.into_iter().enumerate() {
            sizes.push(part.size);
            shards.push(Shard {
                stem: match split {
                    true => format!("{resource_type}-{}", number + 1),
                    false => resource_type.clone(),
                },
                resource_type: resource_type.clone(),
                since: part.since,
                until: part.until,
                rows: part.rows,
                patients: None,
                kind: ShardKind::Resources,
                view: None,
            });
        }
    }
    let mut order: Vec<usize> = (0..shards.len()).collect();
    order.sort_by_key(|&shard| std::cmp::Reverse(sizes[shard]));
    (shards, order)
}

/// The shards of a view export: for each view, one per part of its resource type (files named
/// `{view}` or `{view}-{part}`), largest first.
fn view_shards(
    planned: Vec<(String, Vec<Part>)>,
    views: &super::views::ViewExport,
) -> (Vec<Shard>, Vec<usize>) {
    let mut shards = Vec::new();
    let mut sizes = Vec::new();
    for (index, named) in views.views.iter().enumerate() {
        let Ok(view) = views.view(index) else {
            continue;
        };
        let Some((_, parts)) = planned.iter().find(|(t, _)| *t == view.resource) else {
            continue;
        };
        let split = parts.len() > 1;
        for (number, part) in parts.iter().enumerate() {
            sizes.push(part.size);
            shards.push(Shard {
                stem: match split {
                    true => format!("{}-{}", named.name, number + 1),
                    false => named.name.clone(),
                },
                resource_type: view.resource.clone(),
                since: part.since,
                until: part.until,
                rows: part.rows,
                patients: None,
                kind: ShardKind::View,
                view: Some(index),
            });
        }
    }
    let mut order: Vec<usize> = (0..shards.len()).collect();
    order.sort_by_key(|&shard| std::cmp::Reverse(sizes[shard]));
    (shards, order)
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
    source: &dyn ResourceSource,
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
