//! The export itself: kickoff parameters, the plan of shards, the shard worker, the manifest.

pub mod kickoff;
pub mod manifest;
pub mod request;
pub mod worker;

use serde::{Deserialize, Serialize};

pub use request::{ExportRequest, Level, RequestError};

/// The file of a job's lenient-handling notes, in its output folder (the manifest's `error`).
pub const NOTES_FILE: &str = "OperationOutcome-1.ndjson";

/// A queue message: run one shard of one job. Also the body of a Service Bus message in Azure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardMessage {
    pub job_id: String,
    pub shard: usize,
}

/// Queues the given shards of a job.
pub async fn enqueue_shards(
    queue: &dyn crate::queue::WorkQueue,
    job_id: &str,
    shards: impl IntoIterator<Item = usize>,
) -> Result<(), crate::queue::QueueClosed> {
    let messages = shards
        .into_iter()
        .map(|shard| ShardMessage {
            job_id: job_id.to_string(),
            shard,
        })
        .collect();
    queue.enqueue(messages).await
}

impl ExportError {
    /// The export storage refused a write for want of space.
    pub fn is_storage_full(&self) -> bool {
        match self {
            ExportError::Storage(e) | ExportError::Jobs(crate::jobs::JobError::Storage(e)) => {
                e.is_full()
            }
            _ => false,
        }
    }
}

/// Everything that can stop an export operation; mapped to HTTP in `http::error`.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Source(#[from] crate::source::SourceError),
    #[error(transparent)]
    Scan(#[from] crate::source::ScanError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Jobs(#[from] crate::jobs::JobError),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueClosed),
    #[error("{0}")]
    NotFound(String),
    #[error("export {0} was cancelled")]
    Cancelled(String),
    #[error("a shard of export {0} was taken over by another worker")]
    Superseded(String),
    /// A bug met on some data: the shard's work stopped, and the shard is retried like any failure.
    #[error("the shard stopped on an internal error: {0}")]
    Panicked(String),
    #[error("{running} exports are running, the most this service takes at once (EXPORT_MAX_RUNNING_EXPORTS); try again later")]
    TooManyRunning { running: usize },
}
