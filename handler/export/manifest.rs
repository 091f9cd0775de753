//! The completion manifest and the notes file behind its `error` list.

use chrono::SecondsFormat;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Value};

use super::schema::Job;
use super::version::{BulkVersion, MANIFEST_TYPE};
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
/// notes file; shaped as the job's Bulk Data version has it.
pub fn build(job: &Job, outputs: &[OutputFile]) -> Value {
    let notes = notes_file(job).map(|(file, _)| file);
    let outcomes: Vec<&OutputFile> = notes
        .iter()
        .chain(outputs.iter().filter(|f| f.list == ManifestList::Error))
        .collect();
    let listed = |list: ManifestList| outputs.iter().filter(move |file| file.list == list);
    let output: Vec<Value> = listed(ManifestList::Output)
        .map(|f| output_entry(job, f))
        .collect();
    let mut manifest = match job.request.version {
        BulkVersion::Stu3 => json!({
            "transactionTime": transaction_time(job),
            "request": job.request_url,
            "requiresAccessToken": job.owner.is_some(),
            "output": output,
            "deleted": listed(ManifestList::Deleted).map(|f| stu3_entry(job, f)).collect::<Vec<_>>(),
            "error": outcomes.iter().map(|f| stu3_entry(job, f)).collect::<Vec<_>>(),
        }),
        // The BulkDataManifest logical model: no `request`, `outcome` for `error`, `fileSize` on
        // every file; the lists other than `output` only when they list a file.
        BulkVersion::Stu4 => {
            let mut manifest = json!({
                "manifestType": MANIFEST_TYPE,
                "transactionTime": transaction_time(job),
                "requiresAccessToken": job.owner.is_some(),
                "outputFormat": "application/fhir+ndjson",
                "output": output,
            });
            let deleted: Vec<Value> = listed(ManifestList::Deleted)
                .map(|f| file_entry(job, f))
                .collect();
            if !deleted.is_empty() {
                manifest["deleted"] = deleted.into();
            }
            if !outcomes.is_empty() {
                let outcome = outcomes
                    .iter()
                    .map(|f| outcome_entry(job, f, notes.as_ref()))
                    .collect::<Vec<_>>();
                manifest["outcome"] = outcome.into();
            }
            manifest
        }
    };
    if let Some(organized_by) = &job.request.organize_output_by {
        manifest["outputOrganizedBy"] = organized_by.clone().into();
    }
    if let Some(views) = &job.request.views {
        manifest["_format"] = views.format.clone().into();
        if let Some(tracking) = &views.client_tracking_id {
            manifest["clientTrackingId"] = tracking.clone().into();
        }
    }
    manifest
}

fn transaction_time(job: &Job) -> String {
    job.transaction_time
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A file of `output`: its type (organized output names none for its blocks of many types; a
/// view's rows are named by the view), and where a resource block cut at its end goes on.
fn output_entry(job: &Job, file: &OutputFile) -> Value {
    let mut entry = match job.request.version {
        BulkVersion::Stu3 => {
            json!({"url": file_url(&job.base_url, &file.path), "count": file.count})
        }
        BulkVersion::Stu4 => file_entry(job, file),
    };
    if job.request.views.is_some() {
        entry["name"] = file.resource_type.clone().into();
    } else if job.request.organize_output_by.is_none() {
        entry["type"] = file.resource_type.clone().into();
    }
    if let Some(next) = &file.continues_in {
        entry["continuesInFile"] = file_url(&job.base_url, next).into();
    }
    entry
}

/// A file of STU3's `deleted` or `error`: its URL, its count and what type its lines are.
fn stu3_entry(job: &Job, file: &OutputFile) -> Value {
    json!({"url": file_url(&job.base_url, &file.path), "count": file.count, "type": file.resource_type})
}

/// A file of STU4's manifest: URL, count and size. The size is the NDJSON's, whether the file is
/// stored compressed or not (what a client reads, and what `_maximumFileSize` bounds).
fn file_entry(job: &Job, file: &OutputFile) -> Value {
    json!({"url": file_url(&job.base_url, &file.path), "count": file.count, "fileSize": file.bytes})
}

/// A file of STU4's `outcome`, with its OperationOutcomes counted by severity: the notes file
/// holds the lenient-handling notes (information) and planning errors (error); every other
/// outcome file a shard's errors.
fn outcome_entry(job: &Job, file: &OutputFile, notes: Option<&OutputFile>) -> Value {
    let mut entry = file_entry(job, file);
    let counts: Vec<(&str, usize)> = match notes {
        Some(notes) if notes.path == file.path => vec![
            ("information", job.request.notes.len()),
            ("error", job.planning_errors.len()),
        ],
        _ => vec![("error", file.count as usize)],
    };
    entry["countSeverity"] = counts
        .into_iter()
        .filter(|(_, count)| *count > 0)
        .map(|(code, count)| json!({"code": code, "count": count}))
        .collect::<Vec<_>>()
        .into();
    entry
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
        sections: Vec::new(),
    };
    Some((file, body))
}
