//! Completing a job: when every shard is marked done, the manifest is built from the shards'
//! states and written once, the job marked completed, and its partitions removed.

use bytes::Bytes;
use chrono::Utc;

use super::schema::{Job, JobStatus, ShardStatus};
use super::{manifest, state, ExportError, Exports};

/// Completes the job when every shard is marked done: builds the manifest from the shards' states,
/// writes it (once), and marks the job completed. Safe to run more than once, and by several
/// workers at the same time.
pub async fn finalize(exports: &Exports, job: &Job) -> Result<(), ExportError> {
    let job_id = job.id.as_str();
    if job.status != JobStatus::Running || !job.planned {
        return Ok(());
    }
    if !exports.jobs.unfinished_shards(job).await?.is_empty() {
        return Ok(());
    }
    let mut outputs = Vec::new();
    for index in 0..job.shards.len() {
        let state = exports.jobs.shard(job_id, index).await?;
        match state {
            Some(state) if state.status == ShardStatus::Done => {
                if job.shards[index].kind.is_listed() {
                    outputs.extend(state.outputs);
                }
            }
            _ => {
                // A marker is written after its state: this cannot be, unless a hand got in.
                tracing::error!(
                    job_id,
                    index,
                    "shard marked done, but its state is not done"
                );
                return Ok(());
            }
        }
    }
    let manifest = manifest::build(job, &outputs);
    exports
        .jobs
        .put_manifest(
            job_id,
            Bytes::from(serde_json::to_vec_pretty(&manifest).expect("JSON")),
        )
        .await?;
    crate::crashpoint::reached("manifest-written");
    exports
        .jobs
        .update(job_id, |job| {
            state::end(job, JobStatus::Completed, None, Utc::now())
        })
        .await?;
    super::partitions::remove(exports, job).await;
    let resources: u64 = outputs.iter().map(|f| f.count).sum();
    tracing::info!(job_id, files = outputs.len(), resources, "export completed");
    Ok(())
}
