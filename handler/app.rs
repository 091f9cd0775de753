//! Wiring: the settings made into a source, a storage, the exports and the HTTP API; the local
//! server with its worker pool and upkeep timer. Only `main.rs` and the tests use this module.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions,
    UserAssignedId,
};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::config::{Settings, SourceAuth, SourceSetting, StorageSetting};
use crate::export::recovery::SweepReport;
use crate::export::{worker, Exports, Limits};
use crate::http::Api;
use crate::queue::{InProcessQueue, QueueReceiver, WorkQueue};
use crate::source::remote::RemoteAuth;
use crate::source::{EmbeddedStore, RemoteServer, ResourceSource};
use crate::storage::{AzureBlob, LocalFolder, ObjectStore};

/// The service put together from its settings.
#[derive(Clone)]
pub struct App {
    pub settings: Arc<Settings>,
    pub exports: Exports,
    pub api: Api,
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
                Arc::new(RemoteServer::new(url, auth)?.with_access_wait(settings.access_wait))
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
        let exports = Exports::new(source, storage, queue, limits_of(&settings));
        App::assemble(settings, exports)
    }

    /// The app on already opened exports (the tests give it storage of their own).
    pub fn assemble(settings: Settings, exports: Exports) -> anyhow::Result<App> {
        let auth = match &settings.auth {
            Some(setting) => Some(Arc::new(Authenticator::new(setting.clone())?)),
            None => None,
        };
        let api = Api {
            exports: exports.clone(),
            auth,
            base_url: settings.base_url.clone(),
            file_urls: settings.file_urls,
        };
        Ok(App {
            settings: Arc::new(settings),
            exports,
            api,
        })
    }
}

/// The export limits among the settings.
pub fn limits_of(settings: &Settings) -> Limits {
    Limits {
        file_max_bytes: settings.file_max_bytes,
        shard_max_resources: settings.shard_max_resources,
        max_running_exports: settings.max_running_exports,
        stale_after: settings.stale_after,
        max_attempts: settings.max_attempts,
        retry_delay: settings.retry_delay,
        retention: settings.retention,
        shard_max_time: settings.shard_max_time,
        manifest_page_size: settings.manifest_page_size,
        gzip_files: settings.gzip_files,
        deid: settings.deid.clone(),
    }
}

/// The managed identity in Azure (user-assigned with `AZURE_CLIENT_ID`), the developer's sign-in
/// (Azure CLI, azd) elsewhere, `func start` on a laptop included: only the endpoints App Service
/// sets for a managed identity mean one is there.
pub fn azure_credential() -> anyhow::Result<Arc<dyn TokenCredential>> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|value| !value.is_empty());
    let in_azure = set("IDENTITY_ENDPOINT") || set("MSI_ENDPOINT");
    if !in_azure {
        return Ok(DeveloperToolsCredential::new(None)?);
    }
    if let Some(problem) = managed_identity_problem(set) {
        anyhow::bail!("managed identity: {problem}");
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

/// What keeps the Azure SDK from reaching the managed identity through App Service's protocol
/// (`IDENTITY_ENDPOINT` and `IDENTITY_HEADER`, which Functions hosts set), given which variables
/// are set. Without both it would take an older host's `MSI_ENDPOINT` for Cloud Shell, which it
/// refuses, or try the virtual machines' endpoint, which App Service does not answer.
pub fn managed_identity_problem(set: impl Fn(&str) -> bool) -> Option<String> {
    match (set("IDENTITY_ENDPOINT"), set("IDENTITY_HEADER")) {
        (true, true) => None,
        (true, false) => Some(
            "IDENTITY_ENDPOINT is set without IDENTITY_HEADER; the App Service identity protocol needs both".into(),
        ),
        (false, _) => Some(
            "this host sets MSI_ENDPOINT but not IDENTITY_ENDPOINT and IDENTITY_HEADER, which the Azure SDK reads (an older App Service identity protocol); run on a current Functions host (Flex Consumption sets both)".into(),
        ),
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
    let receiver = Arc::new(Mutex::new(receiver));
    let workers = spawn_workers(&app.exports, receiver.clone(), app.settings.workers);
    // Shared storage (Azure Blob) may hold other processes' running work: the sweeper takes over
    // what went silent there, rather than resuming everything at once.
    if matches!(app.settings.storage, StorageSetting::Folder(_)) {
        match app.exports.resume_unfinished().await {
            Ok(0) => {}
            Ok(resumed) => tracing::info!(resumed, "resumed unfinished exports"),
            Err(error) => tracing::error!(%error, "could not resume unfinished exports"),
        }
    }
    let cleaner = {
        let app = app.clone();
        tokio::spawn(async move {
            let every = (app.settings.stale_after / 4)
                .clamp(Duration::from_secs(1), Duration::from_secs(60));
            let mut ticks = tokio::time::interval(every);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                match app.exports.sweep_stale().await {
                    Ok(report) if report == SweepReport::default() => {}
                    Ok(report) => tracing::warn!(%report, "stale work swept"),
                    Err(error) => tracing::warn!(%error, "could not sweep stale work"),
                }
                match app.exports.remove_expired().await {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, "removed expired exports"),
                    Err(error) => tracing::warn!(%error, "could not remove expired exports"),
                }
            }
        })
    };
    crate::http::server::serve(
        crate::http::routes(app.api),
        listener,
        Default::default(),
        shutdown,
    )
    .await;
    workers.iter().for_each(|w| w.abort());
    cleaner.abort();
}

/// The pause before a message whose outcome could not be recorded is run again.
const RETRY_UNRECORDED: Duration = Duration::from_secs(5);

/// Starts `count` workers taking shards from `receiver` until the queue closes (0: an API-only node).
fn spawn_workers(
    exports: &Exports,
    receiver: Arc<Mutex<QueueReceiver>>,
    count: usize,
) -> Vec<JoinHandle<()>> {
    (0..count)
        .map(|_| {
            let (exports, receiver) = (exports.clone(), receiver.clone());
            tokio::spawn(async move {
                loop {
                    let Some(message) = receiver.lock().await.recv().await else {
                        return;
                    };
                    if worker::handle_message(&exports, &message).await.is_err() {
                        // The job store could not be reached; try again in a while.
                        let _ = exports.queue.enqueue_later(message, RETRY_UNRECORDED).await;
                    }
                }
            })
        })
        .collect()
}
