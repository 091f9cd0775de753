//! The running service: settings, source, storage, job store and queue wired together; the local
//! server with its worker pool; recovery of unfinished jobs at start.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::{Settings, SourceSetting, StorageSetting};
use crate::export::{enqueue_shards, worker, ExportError};
use crate::jobs::{Change, JobStatus, JobStore, ShardStatus};
use crate::queue::{spawn_workers, InProcessQueue, QueueReceiver, WorkQueue};
use crate::source::{EmbeddedStore, ResourceSource};
use crate::storage::{LocalFolder, ObjectStore};

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct App {
    pub settings: Arc<Settings>,
    pub source: Arc<dyn ResourceSource>,
    pub storage: Arc<dyn ObjectStore>,
    pub jobs: JobStore,
    pub queue: Arc<dyn WorkQueue>,
}

impl App {
    /// Opens the source and storage named by the settings, with an in-process queue.
    pub fn open_local(settings: Settings) -> anyhow::Result<(App, QueueReceiver)> {
        let source: Arc<dyn ResourceSource> = match &settings.source {
            SourceSetting::Sqlite(path) => Arc::new(EmbeddedStore::open(path)?),
        };
        let storage: Arc<dyn ObjectStore> = match &settings.storage {
            StorageSetting::Folder(path) => Arc::new(LocalFolder::open(path)?),
        };
        let (queue, receiver) = InProcessQueue::new();
        let app = App {
            settings: Arc::new(settings),
            source,
            jobs: JobStore::new(storage.clone()),
            storage,
            queue: Arc::new(queue),
        };
        Ok((app, receiver))
    }

    /// Picks up the jobs a previous process left running: their unfinished shards are queued again.
    /// Only for a store this process owns alone (the local folder).
    pub async fn resume_unfinished(&self) -> Result<usize, ExportError> {
        let mut resumed = 0;
        for id in self.jobs.ids().await? {
            let unfinished = self
                .jobs
                .update(&id, |job| {
                    if job.status != JobStatus::Running {
                        return Change::Keep(None);
                    }
                    let mut unfinished = Vec::new();
                    for (index, shard) in job.shards.iter_mut().enumerate() {
                        if shard.status != ShardStatus::Done {
                            shard.status = ShardStatus::Queued;
                            unfinished.push(index);
                        }
                    }
                    Change::Write(Some(unfinished))
                })
                .await?
                .flatten();
            let Some(unfinished) = unfinished else {
                continue;
            };
            resumed += 1;
            if unfinished.is_empty() {
                worker::finalize(self, &id).await?;
            } else {
                enqueue_shards(self.queue.as_ref(), &id, unfinished).await?;
            }
        }
        Ok(resumed)
    }

    /// Removes finished jobs past their retention: files first, then the job's state.
    pub async fn remove_expired(&self) -> Result<usize, ExportError> {
        let now = chrono::Utc::now();
        let mut removed = 0;
        for id in self.jobs.ids().await? {
            let Some((job, _)) = self.jobs.load(&id).await? else {
                continue;
            };
            if job.status == JobStatus::Running
                || job
                    .expires_at(self.settings.retention)
                    .is_none_or(|at| at > now)
            {
                continue;
            }
            self.storage.delete_prefix(&job.output_folder).await?;
            self.jobs.delete(&id).await?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// Serves the HTTP API on `listener` with `workers` shard workers until `shutdown` resolves.
pub async fn serve_local(
    app: App,
    receiver: QueueReceiver,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    // Held here too, so that an API-only node (no workers) still accepts work into its queue.
    let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
    let workers = spawn_workers(app.clone(), receiver.clone(), app.settings.workers);
    match app.resume_unfinished().await {
        Ok(0) => {}
        Ok(resumed) => tracing::info!(resumed, "resumed unfinished exports"),
        Err(error) => tracing::error!(%error, "could not resume unfinished exports"),
    }
    let cleaner = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                ticks.tick().await;
                match app.remove_expired().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "removed expired exports"),
                    Err(error) => tracing::warn!(%error, "could not remove expired exports"),
                }
            }
        })
    };
    warp::serve(crate::http::routes(app))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
    workers.iter().for_each(|w| w.abort());
    cleaner.abort();
}
