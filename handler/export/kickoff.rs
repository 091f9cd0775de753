//! Kickoff: plan the shards of a new export, record the job, enqueue its shards.

use chrono::Utc;

use super::{worker, ExportError, ExportRequest, ShardMessage};
use crate::app::App;
use crate::jobs::{new_job_id, Job, JobStatus, Shard, ShardStatus};

/// Starts an export; returns the recorded job.
pub async fn start(
    app: &App,
    request: ExportRequest,
    request_url: String,
    base_url: String,
) -> Result<Job, ExportError> {
    let transaction_time = Utc::now();
    let id = new_job_id();
    let source = app.source.clone();
    let present = tokio::task::spawn_blocking(move || source.resource_types())
        .await
        .expect("listing resource types does not panic")?;
    let shards = present
        .into_iter()
        .map(|(resource_type, _count)| resource_type)
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
            heartbeat: None,
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
        let messages = (0..job.shards.len())
            .map(|shard| ShardMessage {
                job_id: id.clone(),
                shard,
            })
            .collect();
        app.queue.enqueue(messages).await?;
    }
    Ok(job)
}
