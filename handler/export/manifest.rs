//! The completion manifest and the notes file behind its `error` list.

use chrono::SecondsFormat;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Value};

use crate::export::jobs::Job;
use crate::storage::OutputFile;

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

/// The manifest of a job whose shards are all done, with their `outputs` in shard order; `notes`
/// is the written notes file, if any.
pub fn build(job: &Job, outputs: &[OutputFile], notes: Option<&OutputFile>) -> Value {
    let output: Vec<Value> = outputs
        .iter()
        .map(|file| json!({"type": file.resource_type, "url": file_url(&job.base_url, &file.path), "count": file.count}))
        .collect();
    let error: Vec<Value> = notes
        .map(|file| json!({"type": "OperationOutcome", "url": file_url(&job.base_url, &file.path), "count": file.count}))
        .into_iter()
        .collect();
    json!({
        "transactionTime": job.transaction_time.to_rfc3339_opts(SecondsFormat::Millis, true),
        "request": job.request_url,
        "requiresAccessToken": job.owner.is_some(),
        "output": output,
        "deleted": [],
        "error": error,
    })
}
