//! The running service: settings, source, storage, job store and queue wired together; the local
//! server with its worker pool; recovery of unfinished jobs at start.

use std::future::Future;
use std::sync::Arc;

use azure_core::credentials::TokenCredential;
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};
use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::config::{Settings, SourceAuth, SourceSetting, StorageSetting};
use crate::export::{enqueue_shards, worker, ExportError};
use crate::jobs::{Change, JobError, JobStatus, JobStore, ShardStatus};
use crate::queue::{spawn_workers, InProcessQueue, QueueReceiver, WorkQueue};
use crate::source::remote::RemoteAuth;
use crate::source::{EmbeddedStore, RemoteServer, ResourceSource};
use crate::storage::{AzureBlob, LocalFolder, ObjectStore};

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct App {
    pub settings: Arc<Settings>,
    pub source: Arc<dyn ResourceSource>,
    pub storage: Arc<dyn ObjectStore>,
    pub jobs: JobStore,
    pub queue: Arc<dyn WorkQueue>,
    /// Bearer-token checks, when `EXPORT_AUTH_ISSUER` is set.
    pub auth: Option<Arc<Authenticator>>,
}

impl App {
    /// Opens the source and storage named by the settings, with an in-process queue.
    pub fn open_local(settings: Settings) -> anyhow::Result<(App, QueueReceiver)> {
        let (queue, receiver) = InProcessQueue::new();
        Ok((App::open(settings, Arc::new(queue))?, receiver))
    }

    /// Opens the source and storage named by the settings, sending shards to `queue`.
    pub fn open(settings: Settings, queue: Arc<dyn WorkQueue>) -> anyhow::Result<App> {
        let source: Arc<dyn ResourceSource> = match &settings.source {
            SourceSetting::Sqlite(path) => Arc::new(EmbeddedStore::open(path)?),
            SourceSetting::Remote { url, auth } => {
                let auth = match auth {
                    SourceAuth::None => RemoteAuth::None,
                    SourceAuth::Azure => RemoteAuth::Azure(azure_credential()?),
                    SourceAuth::ClientCredentials {
                        token_url,
                        client_id,
                        client_secret,
                        scope,
                    } => RemoteAuth::ClientCredentials {
                        token_url: token_url.clone(),
                        client_id: client_id.clone(),
                        client_secret: client_secret.clone(),
                        scope: scope.clone(),
                    },
                };
                Arc::new(RemoteServer::new(url, auth)?)
            }
        };
        let storage: Arc<dyn ObjectStore> = match &settings.storage {
            StorageSetting::Folder(path) => Arc::new(LocalFolder::open(path)?),
            StorageSetting::AzureBlob { url, sas } => {
                let credential = if *sas {
                    None
                } else {
                    Some(azure_credential()?)
                };
                Arc::new(AzureBlob::new(url, credential)?)
            }
        };
        let auth = match &settings.auth {
            Some(setting) => Some(Arc::new(Authenticator::new(setting.clone())?)),
            None => None,
        };
        Ok(App {
            auth,
            settings: Arc::new(settings),
            source,
            jobs: JobStore::new(storage.clone()),
            storage,
            queue,
        })
    }

    /// The same app sending its shards to another queue (one invocation's output binding).
    pub fn with_queue(&self, queue: Arc<dyn WorkQueue>) -> App {
        App {
            queue,
            ..self.clone()
        }
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
                            shard.heartbeat = Some(chrono::Utc::now());
                            unfinished.push(index);
                        }
                    }
                    Change::Write(Some(unfinished))
                })
                .await;
            let unfinished = readable(&id, unfinished)?.flatten().flatten();
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

    /// Queues again the shards silent for longer than the stale limit: a worker that died while
    /// running one, or a message that never arrived. A running shard past the restart cap fails
    /// its job with a message naming the shard.
    pub async fn sweep_stale(&self) -> Result<SweepReport, ExportError> {
        let stale_after =
            chrono::Duration::from_std(self.settings.stale_after).unwrap_or(chrono::Duration::MAX);
        let max_attempts = self.settings.max_attempts;
        let mut report = SweepReport::default();
        for id in self.jobs.ids().await? {
            let now = chrono::Utc::now();
            let swept = self
                .jobs
                .update(&id, |job| {
                    if job.status != JobStatus::Running {
                        return Change::Keep((Vec::new(), false));
                    }
                    let mut requeue = Vec::new();
                    let mut failure = None;
                    for (index, shard) in job.shards.iter_mut().enumerate() {
                        let silent = shard.heartbeat.is_none_or(|beat| now - beat >= stale_after);
                        if shard.status == ShardStatus::Done || !silent {
                            continue;
                        }
                        if shard.status == ShardStatus::Running && shard.attempts >= max_attempts {
                            failure = Some(format!(
                                "shard {index} ({}) stopped without a heartbeat {} times (the restart cap); the export is abandoned",
                                shard.resource_type, shard.attempts
                            ));
                            break;
                        }
                        shard.status = ShardStatus::Queued;
                        shard.heartbeat = Some(now);
                        requeue.push(index);
                    }
                    if let Some(failure) = failure {
                        job.status = JobStatus::Failed;
                        job.failure = Some(failure);
                        job.completed_at = Some(now);
                        return Change::Write((Vec::new(), true));
                    }
                    if requeue.is_empty() {
                        return Change::Keep((requeue, false));
                    }
                    Change::Write((requeue, false))
                })
                .await;
            let Some((requeue, failed)) = readable(&id, swept)?.flatten() else {
                continue;
            };
            if failed {
                tracing::warn!(job_id = %id, "export failed: a shard passed the restart cap");
                report.failed_jobs += 1;
            }
            if !requeue.is_empty() {
                tracing::warn!(job_id = %id, shards = ?requeue, "stale shards queued again");
                report.requeued_shards += requeue.len();
                enqueue_shards(self.queue.as_ref(), &id, requeue).await?;
            }
        }
        let removed = self
            .jobs
            .repair_running_markers(chrono::Duration::minutes(1))
            .await?;
        if removed > 0 {
            tracing::info!(removed, "running markers of finished exports removed");
        }
        Ok(report)
    }

    /// Removes finished jobs past their retention: files first, then the job's state.
    pub async fn remove_expired(&self) -> Result<usize, ExportError> {
        let now = chrono::Utc::now();
        let mut removed = 0;
        for id in self.jobs.ids().await? {
            let Some((job, _)) = readable(&id, self.jobs.load(&id).await)?.flatten() else {
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

/// A job document that cannot be read is reported and passed over, so that one bad document never
/// stops the resumption, sweep or retention of every other export.
fn readable<T>(id: &str, result: Result<T, JobError>) -> Result<Option<T>, JobError> {
    match result {
        Ok(found) => Ok(Some(found)),
        Err(error @ JobError::Corrupt { .. }) => {
            tracing::error!(job_id = id, %error, "unreadable job document passed over");
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub requeued_shards: usize,
    pub failed_jobs: usize,
}

impl std::fmt::Display for SweepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} stale shard(s) queued again, {} export(s) failed at the restart cap",
            self.requeued_shards, self.failed_jobs
        )
    }
}

/// The managed identity in Azure (user-assigned with `AZURE_CLIENT_ID`), the developer's sign-in
/// (Azure CLI, azd) elsewhere, `func start` on a laptop included: only the endpoints App Service
/// sets for a managed identity mean one is there.
pub fn azure_credential() -> anyhow::Result<Arc<dyn TokenCredential>> {
    let in_azure = ["IDENTITY_ENDPOINT", "MSI_ENDPOINT"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    if !in_azure {
        return Ok(DeveloperToolsCredential::new(None)?);
    }
    let options = std::env::var("AZURE_CLIENT_ID")
        .ok()
        .filter(|id| !id.trim().is_empty())
        .map(|id| ManagedIdentityCredentialOptions {
            user_assigned_id: Some(UserAssignedId::ClientId(id)),
            ..Default::default()
        });
    Ok(ManagedIdentityCredential::new(options)?)
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
    // Shared storage (Azure Blob) may hold other processes' running work: the sweeper takes over
    // what went silent there, rather than resuming everything at once.
    if matches!(app.settings.storage, StorageSetting::Folder(_)) {
        match app.resume_unfinished().await {
            Ok(0) => {}
            Ok(resumed) => tracing::info!(resumed, "resumed unfinished exports"),
            Err(error) => tracing::error!(%error, "could not resume unfinished exports"),
        }
    }
    let cleaner = {
        let app = app.clone();
        tokio::spawn(async move {
            let every = (app.settings.stale_after / 4).clamp(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(60),
            );
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                match app.sweep_stale().await {
                    Ok(report) if report == SweepReport::default() => {}
                    Ok(report) => tracing::warn!(%report, "stale work swept"),
                    Err(error) => tracing::warn!(%error, "could not sweep stale work"),
                }
                match app.remove_expired().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "removed expired exports"),
                    Err(error) => tracing::warn!(%error, "could not remove expired exports"),
                }
            }
        })
    };
    crate::http::server::serve(
        crate::http::routes(app),
        listener,
        Default::default(),
        shutdown,
    )
    .await;
    workers.iter().for_each(|w| w.abort());
    cleaner.abort();
}
