//! Kickoff: resolve who and what to export, plan the shards, record the job, enqueue its shards.

use chrono::Utc;
use serde_json::Value;

use super::request::is_patient_level_type;
use super::{enqueue_shards, worker, ExportError, ExportRequest, Level, RequestError};
use crate::app::App;
use crate::fhir::compartment::patient_id_of;
use crate::jobs::{new_job_id, Job, JobStatus, Shard, ShardStatus};
use crate::source::import::is_valid_id;
use crate::source::PatientScope;

/// Starts an export; returns the recorded job.
pub async fn start(
    app: &App,
    request: ExportRequest,
    request_url: String,
    base_url: String,
) -> Result<Job, ExportError> {
    let transaction_time = Utc::now();
    let id = new_job_id();
    let (scope, present) = {
        let (source, request) = (app.source.clone(), request.clone());
        tokio::task::spawn_blocking(move || -> Result<_, ExportError> {
            Ok((
                resolve_scope(source.as_ref(), &request)?,
                source.resource_types()?,
            ))
        })
        .await
        .expect("planning does not panic")?
    };
    let nobody = matches!(&scope, PatientScope::Only(patients) if patients.is_empty());
    let shards = present
        .into_iter()
        .filter(|t| !nobody && (!request.level.is_patient_scoped() || is_patient_level_type(t)))
        .filter(|t| {
            request
                .types
                .as_ref()
                .is_none_or(|wanted| wanted.contains(t))
        })
        .map(|resource_type| Shard {
            stem: resource_type.clone(),
            resource_type,
            status: ShardStatus::Queued,
            attempts: 0,
            heartbeat: Some(transaction_time),
            outputs: Vec::new(),
        })
        .collect::<Vec<_>>();
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
    };
    app.jobs.create(&job).await?;
    tracing::info!(job_id = %id, shards = job.shards.len(), "export started");
    if job.shards.is_empty() {
        worker::finalize(app, &id).await?;
    } else {
        enqueue_shards(app.queue.as_ref(), &id, 0..job.shards.len()).await?;
    }
    Ok(job)
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
