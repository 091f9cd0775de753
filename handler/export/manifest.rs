//! The completion manifest and the notes file behind its `error` list.

use chrono::SecondsFormat;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Value};

use super::schema::Job;
use crate::fhir::OperationOutcome;
use crate::storage::{ManifestList, OutputFile};

/// Characters escaped in a path segment of a file URL.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// The URL at which this service serves a stored export file.
pub fn file_url(base_url: &str, path: &str) -> String {
    let encoded: Vec<String> = path
        .split('/')
        .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
        .collect();
    format!(
        "{}/_exports/{}",
        base_url.trim_end_matches('/'),
        encoded.join("/")
    )
}

/// The manifest of a job listing `outputs` (all of them once its shards are done, in shard order;
/// a page's share for a client that allows partial manifests) each in its list, and the job's
/// notes file.
pub fn build(job: &Job, outputs: &[OutputFile]) -> Value {
    let organized_by = job.request.organize_output_by.as_deref();
    let views = job.request.views.as_ref();
    let entry = |file: &OutputFile| {
        let mut entry = json!({"url": file_url(&job.base_url, &file.path), "count": file.count});
        // Organized output names no type for its blocks of many types; a view's rows are named
        // by the view.
        match (views, organized_by) {
            (Some(_), _) if file.list.is_output() => {
                entry["name"] = file.resource_type.clone().into()
            }
            (_, Some(_)) if file.list.is_output() => {}
            _ => entry["type"] = file.resource_type.clone().into(),
        }
        if let Some(next) = &file.continues_in {
            entry["continuesInFile"] = file_url(&job.base_url, next).into();
        }
        entry
    };
    let listed = |list: ManifestList| -> Vec<Value> {
        outputs
            .iter()
            .filter(|file| file.list == list)
            .map(entry)
            .collect()
    };
    let notes = notes_file(job).map(|(file, _)| entry(&file));
    let error: Vec<Value> = notes
        .into_iter()
        .chain(listed(ManifestList::Error))
        .collect();
    let mut manifest = json!({
        "transactionTime": job.transaction_time.to_rfc3339_opts(SecondsFormat::Millis, true),
        "request": job.request_url,
        "requiresAccessToken": job.owner.is_some(),
        "output": listed(ManifestList::Output),
        "deleted": listed(ManifestList::Deleted),
        "error": error,
    });
    if let Some(organized_by) = organized_by {
        manifest["outputOrganizedBy"] = organized_by.into();
    }
    if let Some(views) = views {
        manifest["_format"] = views.format.clone().into();
        if let Some(tracking) = &views.client_tracking_id {
            manifest["clientTrackingId"] = tracking.clone().into();
        }
    }
    manifest
}

/// The job's lenient-handling notes as an NDJSON file of OperationOutcomes, when it has any: the
/// file and its bytes (the same at every call, so that it is written once, at planning, and
/// every manifest page lists the same file).
pub fn notes_file(job: &Job) -> Option<(OutputFile, Vec<u8>)> {
    let notes = &job.request.notes;
    let errors = &job.planning_errors;
    if notes.is_empty() && errors.is_empty() {
        return None;
    }
    let mut body = Vec::new();
    let outcomes = notes
        .iter()
        .map(|note| OperationOutcome::information(note.clone()))
        .chain(errors.iter().map(|error| {
            OperationOutcome::error(crate::fhir::IssueType::NotSupported, error.clone())
        }));
    for outcome in outcomes {
        body.extend_from_slice(&outcome.to_json());
        body.push(b'\n');
    }
    let file = OutputFile {
        resource_type: "OperationOutcome".into(),
        path: format!("{}/{}", job.output_folder, super::NOTES_FILE),
        count: (notes.len() + errors.len()) as u64,
        bytes: body.len() as u64,
        continues_in: None,
        list: Default::default(),
    };
    Some((file, body))
}
