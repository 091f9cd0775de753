//! Azure Blob Storage (and ADLS Gen2) behind `ObjectStore`, through the official SDK.
//!
//! A path's first segment is the container, the rest the blob name. Files are streamed as staged
//! blocks with deterministic ids (a redelivered shard stages the same ids again) and appear whole
//! when the block list is committed. Containers are created on first use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::http::{NoFormat, RequestContent, StatusCode, Url};
use azure_storage_blob::models::{
    BlobContainerClientListBlobsOptions, BlockBlobClientCommitBlockListOptions,
    BlockBlobClientUploadOptions, BlockLookupList, KeyInfo, ListBlobsIncludeItem,
};
use azure_storage_blob::{BlobClient, BlobContainerClient, BlobServiceClient};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures_util::stream::FuturesUnordered;
use futures_util::{StreamExt, TryStreamExt};

use super::{validate_path, ByteStream, ETag, ObjectStore, ObjectWriter, PutMode, StorageError};
use azure_storage_common::models::UserDelegationKey;
use azure_storage_sas::{SasBuilder, SasProtocol};

/// Blocks being staged at once by one writer.
const BLOCKS_IN_FLIGHT: usize = 4;
/// The longest a small request (read, write or delete of a document, a listing page, a commit) may
/// take, the SDK's own retries included: an unreachable account is a clear error within seconds,
/// not a request hanging for minutes.
const REQUEST_LIMIT: Duration = Duration::from_secs(5);
/// The longest a whole listing (all its pages) may take.
const LISTING_LIMIT: Duration = Duration::from_secs(30);
/// The longest staging one block (up to 4 MiB) may take, retries included.
const BLOCK_LIMIT: Duration = Duration::from_secs(120);

/// `call`, or a service error naming `path` when it has not answered within `limit`.
async fn bounded<T>(
    path: &str,
    limit: Duration,
    call: impl std::future::Future<Output = T>,
) -> Result<T, StorageError> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| StorageError::Service {
            path: path.to_string(),
            detail: format!("no answer within {} s", limit.as_secs()),
        })
}

pub struct AzureBlob {
    account_url: Url,
    credential: Option<Arc<dyn TokenCredential>>,
    containers: Mutex<HashMap<String, ContainerState>>,
    /// The user delegation key that signs download URLs, fetched when first needed and again a
    /// while before it expires.
    delegation: tokio::sync::Mutex<Option<UserDelegationKey>>,
}

/// The account a URL names: the first label of `{account}.blob.core.windows.net`, or the first
/// path segment of an emulator's path-style URL (`https://127.0.0.1:10000/devstoreaccount1`).
fn account_name(url: &Url) -> &str {
    let host = url.host_str().unwrap_or_default();
    let path_style =
        host == "localhost" || host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[');
    match path_style {
        true => url
            .path_segments()
            .and_then(|mut s| s.next())
            .unwrap_or_default(),
        false => host.split('.').next().unwrap_or_default(),
    }
}

fn offset(at: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(at.timestamp()).expect("a time in range")
}

/// How long a user delegation key is asked for, and how long before its end a new one is fetched
/// (a download URL never outlives the key that signed it).
const DELEGATION_KEY_LIFETIME: chrono::Duration = chrono::Duration::hours(24);
const DELEGATION_KEY_RENEWAL: chrono::Duration = chrono::Duration::hours(2);

#[derive(Clone)]
struct ContainerState {
    client: Arc<BlobContainerClient>,
    exists: bool,
}

/// The `Content-Type` of an export file's blob.
const EXPORT_CONTENT_TYPE: &str = "application/fhir+ndjson";

impl AzureBlob {
    /// A block writer for `path`; `labels`: the `Content-Type` and `Content-Encoding` to commit.
    async fn blob_writer(
        &self,
        path: &str,
        labels: Option<(String, Option<String>)>,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let (container, _) = split(path)?;
        self.ensure_container(container).await?;
        let (_, blob) = self.blob(path)?;
        Ok(Box::new(BlobWriter {
            path: path.to_string(),
            blob: Arc::new(blob),
            block_ids: Vec::new(),
            in_flight: FuturesUnordered::new(),
            labels,
        }))
    }

    /// `account_url`: `https://{account}.blob.core.windows.net` with a credential, or any URL carrying
    /// a SAS in its query (then `credential` is `None`).
    pub fn new(
        account_url: &str,
        credential: Option<Arc<dyn TokenCredential>>,
    ) -> Result<Self, StorageError> {
        let account_url = Url::parse(account_url).map_err(|e| StorageError::Service {
            path: String::new(),
            detail: format!("invalid account URL: {e}"),
        })?;
        Ok(Self {
            account_url,
            credential,
            containers: Mutex::new(HashMap::new()),
            delegation: tokio::sync::Mutex::new(None),
        })
    }

    fn container(&self, name: &str) -> Result<ContainerState, StorageError> {
        let mut containers = self.containers.lock().expect("container cache");
        if let Some(state) = containers.get(name) {
            return Ok(state.clone());
        }
        let mut url = self.account_url.clone();
        url.path_segments_mut()
            .map_err(|_| StorageError::InvalidPath(name.to_string()))?
            .pop_if_empty()
            .push(name);
        let client = BlobContainerClient::new(url, self.credential.clone(), None)
            .map_err(|e| service_error(name, e))?;
        let state = ContainerState {
            client: Arc::new(client),
            exists: false,
        };
        containers.insert(name.to_string(), state.clone());
        Ok(state)
    }

    /// A user delegation key valid past `until`: the one held, or a new one from the account.
    async fn delegation_key(
        &self,
        credential: &Arc<dyn TokenCredential>,
        until: DateTime<Utc>,
    ) -> Result<UserDelegationKey, StorageError> {
        let mut held = self.delegation.lock().await;
        if let Some(key) = held
            .as_ref()
            .filter(|key| key.signed_expiry.is_some_and(|end| end > offset(until)))
        {
            return Ok(key.clone());
        }
        let failed = |detail: String| StorageError::Service {
            path: "user delegation key".into(),
            detail,
        };
        let now = Utc::now();
        let key_info = KeyInfo {
            start: Some(offset(now - chrono::Duration::minutes(5))),
            expiry: Some(offset(now + DELEGATION_KEY_LIFETIME)),
            ..Default::default()
        };
        let client =
            BlobServiceClient::new(self.account_url.clone(), Some(credential.clone()), None)
                .map_err(|e| failed(e.to_string()))?;
        let content = key_info
            .try_into()
            .map_err(|e: azure_core::Error| failed(e.to_string()))?;
        let answer = bounded(
            "user delegation key",
            REQUEST_LIMIT,
            client.get_user_delegation_key(content, None),
        )
        .await?
        .map_err(|e| to_storage_error("user delegation key", e))?;
        let key = answer.into_model().map_err(|e| failed(e.to_string()))?;
        if key.signed_expiry.is_none() || key.value.is_none() {
            return Err(failed("the key came without its validity or value".into()));
        }
        *held = Some(key.clone());
        Ok(key)
    }

    /// Creates the container unless this process has seen it already.
    async fn ensure_container(&self, name: &str) -> Result<Arc<BlobContainerClient>, StorageError> {
        let state = self.container(name)?;
        if state.exists {
            return Ok(state.client);
        }
        match bounded(name, REQUEST_LIMIT, state.client.create(None)).await? {
            Ok(_) => {}
            Err(e) if e.http_status() == Some(StatusCode::Conflict) => {}
            Err(e) => return Err(to_storage_error(name, e)),
        }
        self.mark_container(name, true);
        Ok(state.client)
    }

    /// Records whether the container is known to exist (created, or deleted by us).
    fn mark_container(&self, name: &str, exists: bool) {
        if let Some(state) = self
            .containers
            .lock()
            .expect("container cache")
            .get_mut(name)
        {
            state.exists = exists;
        }
    }

    /// The blob's download (body and properties), or `None` when it does not exist.
    async fn download(
        &self,
        path: &str,
    ) -> Result<Option<azure_storage_blob::models::BlobClientDownloadResult>, StorageError> {
        let (_, blob) = self.blob(path)?;
        match bounded(path, REQUEST_LIMIT, blob.download(None)).await? {
            Ok(downloaded) => Ok(Some(downloaded)),
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(None),
            Err(e) => Err(to_storage_error(path, e)),
        }
    }

    fn blob(&self, path: &str) -> Result<(String, BlobClient), StorageError> {
        let (container, name) = split(path)?;
        let name = name.ok_or_else(|| StorageError::InvalidPath(path.to_string()))?;
        let client = self.container(container)?.client.blob_client(name);
        Ok((container.to_string(), client))
    }

    /// The entries (names without the container) equal to `name` or under `name/`; all with
    /// `None`. On a hierarchical-namespace account (ADLS Gen2) a flat listing also returns each
    /// directory, marked by the metadata `hdi_isfolder=true`: those are told apart.
    async fn entries(
        &self,
        container: &BlobContainerClient,
        path: &str,
        name: Option<&str>,
    ) -> Result<Vec<Entry>, StorageError> {
        let options = BlobContainerClientListBlobsOptions {
            prefix: name.map(str::to_string),
            include: Some(vec![ListBlobsIncludeItem::Metadata]),
            ..Default::default()
        };
        let mut pager = container
            .list_blobs(Some(options))
            .map_err(|e| to_storage_error(path, e))?;
        let mut entries = Vec::new();
        loop {
            match pager.try_next().await {
                Ok(Some(item)) => {
                    let Some(found) = item.name else { continue };
                    let wanted = match name {
                        None => true,
                        Some(name) => {
                            found == name
                                || found
                                    .strip_prefix(name)
                                    .is_some_and(|rest| rest.starts_with('/'))
                        }
                    };
                    let is_directory = item
                        .metadata
                        .and_then(|m| m.values)
                        .and_then(|values| {
                            values
                                .iter()
                                .find(|(key, _)| key.eq_ignore_ascii_case("hdi_isfolder"))
                                .map(|(_, value)| value.eq_ignore_ascii_case("true"))
                        })
                        .unwrap_or(false);
                    if wanted {
                        entries.push(Entry {
                            name: found,
                            is_directory,
                        });
                    }
                }
                Ok(None) => return Ok(entries),
                Err(e) if is_container_missing(&e) => return Ok(Vec::new()),
                Err(e) => return Err(to_storage_error(path, e)),
            }
        }
    }
}

/// A name a listing returned: a blob, or a directory of a hierarchical namespace.
struct Entry {
    name: String,
    is_directory: bool,
}

fn split(path: &str) -> Result<(&str, Option<&str>), StorageError> {
    validate_path(path)?;
    Ok(match path.split_once('/') {
        Some((container, name)) => (container, Some(name)),
        None => (path, None),
    })
}

fn error_code(error: &azure_core::Error) -> Option<&str> {
    match error.kind() {
        ErrorKind::HttpResponse { error_code, .. } => error_code.as_deref(),
        _ => None,
    }
}

fn is_container_missing(error: &azure_core::Error) -> bool {
    error.http_status() == Some(StatusCode::NotFound)
        && error_code(error).is_none_or(|code| code == "ContainerNotFound")
}

fn service_error(path: &str, error: azure_core::Error) -> StorageError {
    StorageError::Service {
        path: path.to_string(),
        detail: describe(&error),
    }
}

/// The status and the service's error code, never the raw XML body.
fn describe(error: &azure_core::Error) -> String {
    match error.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => match error_code {
            Some(code) => format!("HTTP {} {code}", u16::from(*status)),
            None => format!("HTTP {}", u16::from(*status)),
        },
        ErrorKind::Connection => format!("cannot reach the storage account: {error}"),
        ErrorKind::Credential => format!("cannot get a token for the storage account: {error}"),
        _ => error.to_string(),
    }
}

fn to_storage_error(path: &str, error: azure_core::Error) -> StorageError {
    match error.http_status() {
        Some(StatusCode::NotFound) => StorageError::NotFound(path.to_string()),
        Some(StatusCode::PreconditionFailed) => StorageError::PreconditionFailed(path.to_string()),
        Some(StatusCode::Conflict) if error_code(&error) == Some("BlobAlreadyExists") => {
            StorageError::PreconditionFailed(path.to_string())
        }
        Some(StatusCode::Forbidden | StatusCode::Unauthorized) => StorageError::Denied {
            path: path.to_string(),
            detail: describe(&error),
        },
        _ if matches!(error.kind(), ErrorKind::Credential) => StorageError::Denied {
            path: path.to_string(),
            detail: describe(&error),
        },
        _ => service_error(path, error),
    }
}

#[async_trait]
impl ObjectStore for AzureBlob {
    async fn get(&self, path: &str) -> Result<Option<(Bytes, ETag)>, StorageError> {
        let Some(downloaded) = self.download(path).await? else {
            return Ok(None);
        };
        let etag = downloaded.properties.etag.clone();
        let body = bounded(path, REQUEST_LIMIT, downloaded.body.collect())
            .await?
            .map_err(|e| to_storage_error(path, e))?;
        let etag = etag.map(|t| ETag(t.to_string())).unwrap_or_else(|| {
            // The service always sends one; an absent tag can never match.
            ETag(String::new())
        });
        Ok(Some((body, etag)))
    }

    async fn get_range(
        &self,
        path: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Bytes>, StorageError> {
        if range.is_empty() {
            return Ok(self.get(path).await?.map(|_| Bytes::new()));
        }
        let (_, blob) = self.blob(path)?;
        let options = azure_storage_blob::models::BlobClientDownloadOptions {
            range: Some(range.into()),
            ..Default::default()
        };
        let downloaded = match bounded(path, REQUEST_LIMIT, blob.download(Some(options))).await? {
            Ok(downloaded) => downloaded,
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => return Ok(None),
            Err(e) => return Err(to_storage_error(path, e)),
        };
        let body = bounded(path, REQUEST_LIMIT, downloaded.body.collect())
            .await?
            .map_err(|e| to_storage_error(path, e))?;
        Ok(Some(body))
    }

    async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<ETag, StorageError> {
        let (container, blob) = self.blob(path)?;
        let options = || BlockBlobClientUploadOptions {
            if_none_match: matches!(mode, PutMode::Create).then(|| "*".into()),
            if_match: match &mode {
                PutMode::Update(etag) => Some(etag.0.clone().into()),
                _ => None,
            },
            ..Default::default()
        };
        let mut created_container = false;
        loop {
            let upload = blob.upload(
                <RequestContent<Bytes, NoFormat> as From<Bytes>>::from(data.clone()),
                Some(options()),
            );
            match bounded(path, REQUEST_LIMIT, upload).await? {
                Ok(uploaded) => {
                    return Ok(ETag(
                        uploaded.etag.map(|t| t.to_string()).unwrap_or_default(),
                    ))
                }
                Err(e) if is_container_missing(&e) && !created_container => {
                    self.mark_container(&container, false);
                    self.ensure_container(&container).await?;
                    created_container = true;
                }
                Err(e) => return Err(to_storage_error(path, e)),
            }
        }
    }

    async fn writer(&self, path: &str) -> Result<Box<dyn ObjectWriter>, StorageError> {
        self.blob_writer(path, None).await
    }

    async fn export_writer(
        &self,
        path: &str,
        gzip: bool,
    ) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let encoding = gzip.then(|| "gzip".to_string());
        let labels = (EXPORT_CONTENT_TYPE.to_string(), encoding);
        self.blob_writer(path, Some(labels)).await
    }

    async fn read_stream(&self, path: &str) -> Result<Option<(u64, ByteStream)>, StorageError> {
        let Some(downloaded) = self.download(path).await? else {
            return Ok(None);
        };
        // A large blob comes in ranges: its whole size is in the first range's Content-Range.
        let size = downloaded
            .headers
            .get_optional_str(&azure_core::http::headers::HeaderName::from_static(
                "content-range",
            ))
            .and_then(|range| range.rsplit('/').next()?.parse().ok())
            .or(downloaded.properties.content_length)
            .unwrap_or(0);
        // The SDK's body is Send but not Sync: hand it over through a bounded channel.
        let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
        let mut body = downloaded.body;
        tokio::spawn(async move {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(std::io::Error::other);
                let failed = chunk.is_err();
                if sender.send(chunk).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Some((
            size,
            Box::pin(tokio_stream_from(receiver)) as ByteStream,
        )))
    }

    /// A read-only user-delegation SAS URL for the blob, signed with a key the account gives the
    /// managed identity; `None` for an account reached by SAS (no identity to ask for a key).
    async fn signed_read_url(
        &self,
        path: &str,
        expiry: DateTime<Utc>,
    ) -> Result<Option<String>, StorageError> {
        let Some(credential) = &self.credential else {
            return Ok(None);
        };
        let (container, name) = split(path)?;
        let name = name.ok_or_else(|| StorageError::InvalidPath(path.to_string()))?;
        let key = self
            .delegation_key(credential, expiry + DELEGATION_KEY_RENEWAL)
            .await?;
        let account = account_name(&self.account_url);
        // An account on the internet is read over HTTPS only; an emulator on loopback over HTTP.
        let protocol = match self.account_url.scheme() {
            "https" => SasProtocol::Https,
            _ => SasProtocol::HttpsAndHttp,
        };
        let query = SasBuilder::new(account, &key, offset(expiry))
            .map_err(|e| StorageError::Service {
                path: path.to_string(),
                detail: format!("signing a download URL: {e}"),
            })?
            .blob(container, name)
            .read()
            .start(offset(Utc::now() - chrono::Duration::minutes(5)))
            .protocol(protocol)
            .build();
        let mut url = self.account_url.clone();
        url.path_segments_mut()
            .map_err(|_| StorageError::InvalidPath(path.to_string()))?
            .pop_if_empty()
            .push(container)
            .extend(name.split('/'));
        url.set_query(Some(&query));
        Ok(Some(url.to_string()))
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
        let (container_name, name) = split(prefix)?;
        let container = self.container(container_name)?.client;
        if name.is_none() {
            return match bounded(prefix, REQUEST_LIMIT, container.delete(None)).await? {
                Ok(_) => {
                    self.mark_container(container_name, false);
                    Ok(())
                }
                Err(e) if e.http_status() == Some(StatusCode::NotFound) => Ok(()),
                Err(e) => Err(to_storage_error(prefix, e)),
            };
        }
        let entries = bounded(
            prefix,
            LISTING_LIMIT,
            self.entries(&container, prefix, name),
        );
        let (mut directories, blobs): (Vec<Entry>, Vec<Entry>) =
            entries.await??.into_iter().partition(|e| e.is_directory);
        for blob in blobs {
            let blob = container.blob_client(&blob.name);
            match bounded(prefix, REQUEST_LIMIT, blob.delete(None)).await? {
                Ok(_) => {}
                Err(e) if e.http_status() == Some(StatusCode::NotFound) => {}
                Err(e) => return Err(to_storage_error(prefix, e)),
            }
        }
        // A directory after everything in it, the deepest first. One still holding something
        // (written meanwhile) answers 409 DirectoryIsNotEmpty: left, like a blob written after
        // the listing.
        directories.sort_by_key(|d| std::cmp::Reverse(d.name.matches('/').count()));
        for directory in directories {
            let directory = container.blob_client(&directory.name);
            match bounded(prefix, REQUEST_LIMIT, directory.delete(None)).await? {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.http_status(),
                        Some(StatusCode::NotFound) | Some(StatusCode::Conflict)
                    ) => {}
                Err(e) => return Err(to_storage_error(prefix, e)),
            }
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let (container_name, name) = split(prefix)?;
        let container = self.container(container_name)?.client;
        let entries = bounded(
            prefix,
            LISTING_LIMIT,
            self.entries(&container, prefix, name),
        );
        let mut paths: Vec<String> = entries
            .await??
            .into_iter()
            .filter(|entry| !entry.is_directory)
            .map(|blob| format!("{container_name}/{}", blob.name))
            .collect();
        paths.sort();
        Ok(paths)
    }
}

fn tokio_stream_from(
    mut receiver: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + Sync {
    futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

type StageFuture = futures_util::future::BoxFuture<'static, Result<(), StorageError>>;

struct BlobWriter {
    path: String,
    blob: Arc<BlobClient>,
    block_ids: Vec<Vec<u8>>,
    in_flight: FuturesUnordered<StageFuture>,
    /// The blob's `Content-Type` and `Content-Encoding`, set when committed.
    labels: Option<(String, Option<String>)>,
}

impl BlobWriter {
    async fn drain(&mut self) -> Result<(), StorageError> {
        while let Some(staged) = self.in_flight.next().await {
            staged?;
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectWriter for BlobWriter {
    async fn write(&mut self, data: Bytes) -> Result<(), StorageError> {
        if data.is_empty() {
            return Ok(());
        }
        // Same length for every id, as the service requires; the same ids on a rerun.
        let block_id = format!("block-{:08}", self.block_ids.len()).into_bytes();
        self.block_ids.push(block_id.clone());
        let (blob, path) = (self.blob.clone(), self.path.clone());
        self.in_flight.push(Box::pin(async move {
            let length = data.len() as u64;
            let block_client = blob.block_blob_client();
            let stage = block_client.stage_block(
                &block_id,
                length,
                <RequestContent<Bytes, NoFormat> as From<Bytes>>::from(data),
                None,
            );
            bounded(&path, BLOCK_LIMIT, stage)
                .await?
                .map(|_| ())
                .map_err(|e| to_storage_error(&path, e))
        }));
        if self.in_flight.len() >= BLOCKS_IN_FLIGHT {
            if let Some(staged) = self.in_flight.next().await {
                staged?;
            }
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        self.drain().await?;
        let blocks = BlockLookupList {
            latest: Some(std::mem::take(&mut self.block_ids)),
            ..Default::default()
        };
        let content = RequestContent::try_from(blocks).map_err(|e| service_error(&self.path, e))?;
        let block_client = self.blob.block_blob_client();
        let options = self.labels.take().map(|(content_type, encoding)| {
            BlockBlobClientCommitBlockListOptions {
                blob_content_type: Some(content_type),
                blob_content_encoding: encoding,
                ..Default::default()
            }
        });
        let commit = block_client.commit_block_list(content, options);
        bounded(&self.path, REQUEST_LIMIT, commit)
            .await?
            .map_err(|e| to_storage_error(&self.path, e))?;
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        // Uncommitted blocks are discarded by the service; nothing became visible.
        let _ = self.drain().await;
        Ok(())
    }
}
