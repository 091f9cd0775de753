//! The export itself: kickoff parameters, the plan of shards, the job documents, the shard worker,
//! the manifest, and the upkeep of unfinished and expired jobs. [`Exports`] is what all of it runs on.

pub mod blocks;
pub mod completion;
pub mod deid;
pub mod ending;
pub mod jobs;
pub mod kickoff;
pub mod layout;
pub mod manifest;
pub mod pages;
pub mod partitions;
pub mod recovery;
pub mod request;
pub mod running;
pub mod schema;
pub mod shaping;
mod spare;
pub mod state;
pub mod version;
pub mod views;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use crate::fault::Fault;
use crate::queue::WorkQueue;
use crate::source::ResourceSource;
use crate::storage::ObjectStore;
use jobs::JobStore;

pub use request::{ExportRequest, Level, RequestError};

/// What exports run on: the source read, the storage written, the job documents, the queue of
/// shards, and the limits. Cheap to clone.
#[derive(Clone)]
pub struct Exports {
    pub source: Arc<dyn ResourceSource>,
    pub storage: Arc<dyn ObjectStore>,
    pub jobs: JobStore,
    pub queue: Arc<dyn WorkQueue>,
    pub limits: Arc<Limits>,
    /// The shards this process runs, which a job that ends here stops.
    pub running: Arc<running::RunningShards>,
}

impl Exports {
    /// Jobs on `storage`, reading `source`, sending shards to `queue`.
    pub fn new(
        source: Arc<dyn ResourceSource>,
        storage: Arc<dyn ObjectStore>,
        queue: Arc<dyn WorkQueue>,
        limits: Limits,
    ) -> Exports {
        Exports {
            source,
            jobs: JobStore::new(storage.clone()),
            storage,
            queue,
            limits: Arc::new(limits),
            running: Arc::new(running::RunningShards::default()),
        }
    }

    /// The same exports sending their shards to another queue (one invocation's output binding).
    pub fn with_queue(&self, queue: Arc<dyn WorkQueue>) -> Exports {
        Exports {
            queue,
            ..self.clone()
        }
    }
}

/// The limits an export runs under (from the settings).
#[derive(Debug, Clone)]
pub struct Limits {
    /// An NDJSON file is rolled over past this size.
    pub file_max_bytes: u64,
    /// The most resources one shard reads.
    pub shard_max_resources: u64,
    /// The most exports running at once; a kickoff past it answers 429.
    pub max_running_exports: usize,
    /// A shard silent for this long is taken to have stopped.
    pub stale_after: Duration,
    /// The runs a shard gets before its export fails.
    pub max_attempts: u32,
    /// The most a failed shard waits before its first retry.
    pub retry_delay: Duration,
    /// How long a finished export's files are kept.
    pub retention: Duration,
    /// How long one run of a shard reads before it pauses and queues its continuation (the time
    /// box, under the host's function timeout); `None`: to the end.
    pub shard_max_time: Option<Duration>,
    /// Outputs per manifest page (`allowPartialManifests`).
    pub manifest_page_size: usize,
    /// Files are stored gzip-compressed (`EXPORT_COMPRESSION=gzip`).
    pub gzip_files: bool,
    /// De-identified export (`_anonymizationConfig`).
    pub deid: crate::config::DeidSettings,
}

impl Limits {
    /// What the state machine's transitions go by.
    pub fn timing(&self) -> state::Timing {
        let duration = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        state::Timing {
            stale_after: duration(self.stale_after),
            max_attempts: self.max_attempts,
            retry_delay: duration(self.retry_delay),
        }
    }

    /// How often a running shard refreshes its heartbeat: a tenth of the stale limit, 0.1 s to 60 s.
    pub fn heartbeat_every(&self) -> Duration {
        (self.stale_after / 10).clamp(Duration::from_millis(100), Duration::from_secs(60))
    }
}

/// The file of a job's lenient-handling notes, in its output folder (the manifest's `error`).
pub const NOTES_FILE: &str = "OperationOutcome-1.ndjson";

impl ExportError {
    pub fn fault(&self) -> Fault {
        match self {
            ExportError::Request(_) => Fault::Invalid,
            ExportError::NotFound(_) | ExportError::Cancelled(_) => Fault::NotFound,
            ExportError::TooManyRunning { .. } => Fault::Busy,
            ExportError::Source(e) => e.fault(),
            ExportError::Scan(e) => e.fault(),
            ExportError::Storage(e) => e.fault(),
            ExportError::Jobs(e) => e.fault(),
            ExportError::Queue(_) | ExportError::Superseded(_) | ExportError::Panicked(_) => {
                Fault::Internal
            }
        }
    }

    /// The export storage refused a write for want of space.
    pub fn is_storage_full(&self) -> bool {
        self.fault() == Fault::Full
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
    Jobs(#[from] crate::export::jobs::JobError),
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
