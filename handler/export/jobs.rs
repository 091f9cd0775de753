//! Job state on the export storage, changed only by compare-and-swap: per job, `job.json` (the
//! request and plan; written at kickoff, planning and end), `shards/{n}.json` (each shard's own
//! state, written by its worker and the sweeper), `done/{n}` (a marker per finished shard, its time:
//! so that one listing tells a job's progress) and `manifest.json` (written once, create-only).
//! Beside the jobs, `running/{id}` marks a running job and `ended/{time}-{id}` an ended one, so
//! that the sweeper and retention find theirs in one listing without reading every job.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;

use serde::de::DeserializeOwned;

pub use super::layout::{is_job_id, new_job_id, JOBS_CONTAINER};
pub use super::schema::{Change, Job, JobStatus, PatientRange, Shard, ShardKind};
use super::schema::{Page, ShardState};
use crate::storage::{ETag, ObjectStore, PutMode, StorageError};

/// The folder of running-job markers inside it.
const RUNNING: &str = "running";
/// The folder of ended-job markers inside it.
const ENDED: &str = "ended";
/// How an ended-job marker writes the time the job ended.
const ENDED_AT: &str = "%Y%m%dT%H%M%S%.3fZ";

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("job document {path} is unreadable: {source}")]
    Corrupt {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    /// Every compare-and-swap met another writer's change, up to the bound.
    #[error("job document {path}: changed by another writer at each of {attempts} attempts in a row; try again later")]
    Contended { path: String, attempts: u32 },
}

impl JobError {
    pub fn fault(&self) -> crate::fault::Fault {
        match self {
            JobError::Storage(e) => e.fault(),
            JobError::Corrupt { .. } => crate::fault::Fault::Internal,
            JobError::Contended { .. } => crate::fault::Fault::Unavailable,
        }
    }
}

/// Compare-and-swap attempts on one job document before an update gives up.
pub const CAS_ATTEMPTS: u32 = 12;

/// The pause before compare-and-swap attempt `attempt` (from 1): "full jitter", a uniform share
/// (`jitter` in 0..1) of a ceiling that doubles from 4 ms up to 1 s, so that writers that met
/// once do not meet again in step. Twelve attempts wait about 2 s in all on average, 4 s at most.
pub fn cas_backoff(attempt: u32, jitter: f64) -> std::time::Duration {
    let ceiling = (4u64 << attempt.saturating_sub(1).min(8)).min(1_000);
    std::time::Duration::from_micros((ceiling as f64 * 1_000.0 * jitter.clamp(0.0, 1.0)) as u64)
}

/// A document with the version it is stored as (`None`: not stored yet).
#[derive(Debug, Clone)]
pub struct Versioned<D> {
    pub document: D,
    version: Option<ETag>,
}

impl<D> Versioned<D> {
    /// A document believed not stored yet: its first write creates it.
    pub fn absent(document: D) -> Versioned<D> {
        Versioned {
            document,
            version: None,
        }
    }

    fn stored(document: D, version: ETag) -> Versioned<D> {
        Versioned {
            document,
            version: Some(version),
        }
    }
}

#[derive(Clone)]
pub struct JobStore {
    store: Arc<dyn ObjectStore>,
    /// The ids of running jobs, on a store only this process writes: listed once, then kept as
    /// markers are written and removed, so that a kickoff counts them without reading a directory
    /// (half its time, and a wait on the directory's lock while job files are renamed in it).
    running: Option<Arc<tokio::sync::Mutex<Option<BTreeSet<String>>>>>,
    /// Held by a kickoff from counting the running jobs to recording its own.
    admission: Arc<tokio::sync::Mutex<()>>,
    /// When this process last listed every job document to mark the ended jobs that have no
    /// marker (see `mark_unmarked_ended`).
    listed_all: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// An ended job's marker, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedMarker {
    pub id: String,
    /// When the job ended, to the millisecond.
    pub ended_at: DateTime<Utc>,
    path: String,
}

impl JobStore {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        let running = store.owned_by_this_process().then(Arc::default);
        Self {
            store,
            running,
            admission: Arc::default(),
            listed_all: Arc::default(),
        }
    }

    /// Admission to the running-exports limit: hold it from the count to `create`.
    pub async fn admission(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.admission.lock().await
    }

    fn job_path(id: &str) -> String {
        format!("{JOBS_CONTAINER}/{id}/job.json")
    }

    pub fn manifest_path(id: &str) -> String {
        format!("{JOBS_CONTAINER}/{id}/manifest.json")
    }

    /// The marker of a running job: counting them is cheap, unlike loading every job.
    fn running_path(id: &str) -> String {
        format!("{JOBS_CONTAINER}/{RUNNING}/{id}")
    }

    fn ended_path(id: &str, ended_at: DateTime<Utc>) -> String {
        format!(
            "{JOBS_CONTAINER}/{ENDED}/{}-{id}",
            ended_at.format(ENDED_AT)
        )
    }

    /// Writes the marker of a job that has ended; its name follows from the job, so writing it
    /// again is harmless.
    pub async fn mark_ended(&self, job: &Job) -> Result<(), StorageError> {
        let Some(ended_at) = job
            .completed_at
            .filter(|_| job.status != JobStatus::Running)
        else {
            return Ok(());
        };
        self.store
            .put(
                &Self::ended_path(&job.id, ended_at),
                Bytes::from(ended_at.to_rfc3339()),
                PutMode::Overwrite,
            )
            .await?;
        Ok(())
    }

    /// The markers of ended jobs, in one listing.
    pub async fn ended_markers(&self) -> Result<Vec<EndedMarker>, StorageError> {
        let prefix = format!("{JOBS_CONTAINER}/{ENDED}/");
        let paths = self.store.list(prefix.trim_end_matches('/')).await?;
        Ok(paths
            .into_iter()
            .filter_map(|path| {
                let (time, id) = path.strip_prefix(&prefix)?.split_once('-')?;
                let ended_at = chrono::NaiveDateTime::parse_from_str(time, ENDED_AT)
                    .ok()?
                    .and_utc();
                let id = id.to_string();
                is_job_id(&id).then_some(EndedMarker { id, ended_at, path })
            })
            .collect())
    }

    pub async fn remove_ended_marker(&self, marker: &EndedMarker) -> Result<(), StorageError> {
        self.store.delete_prefix(&marker.path).await
    }

    /// Whether this process is due to list every job document (first, then every `every`);
    /// taking the turn starts the wait for the next.
    pub fn take_listing_turn(&self, every: std::time::Duration) -> bool {
        let mut last = self.listed_all.lock().expect("not poisoned");
        let due = last.is_none_or(|at| at.elapsed() >= every);
        if due {
            *last = Some(std::time::Instant::now());
        }
        due
    }

    /// Gives back the turn taken by `take_listing_turn` (the listing failed).
    pub fn return_listing_turn(&self) {
        *self.listed_all.lock().expect("not poisoned") = None;
    }

    /// Records a new job, with its running marker first (so a crash between the two over-counts,
    /// which the sweep repairs, rather than under-counts).
    pub async fn create(&self, job: &Job) -> Result<(), JobError> {
        self.store
            .put(
                &Self::running_path(&job.id),
                Bytes::from(job.transaction_time.to_rfc3339()),
                PutMode::Overwrite,
            )
            .await?;
        self.note_running(&job.id, true).await;
        let body = Bytes::from(serde_json::to_vec_pretty(job).expect("a job serialises"));
        // Not `Create`: a fresh random id has no document to collide with, and asking the local
        // folder whether one exists searches a directory the export's writeback may hold locked.
        let recorded = self
            .store
            .put(&Self::job_path(&job.id), body, PutMode::Overwrite)
            .await;
        if let Err(error) = recorded {
            // Not counted against the limit while the kickoff is refused (storage full, say).
            let _ = self.store.delete_prefix(&Self::running_path(&job.id)).await;
            self.note_running(&job.id, false).await;
            return Err(error.into());
        }
        Ok(())
    }

    /// How many exports are running (by their markers).
    pub async fn running_count(&self) -> Result<usize, JobError> {
        let Some(running) = &self.running else {
            return Ok(self.running_ids().await?.len());
        };
        // Listed under the lock: a marker written or removed meanwhile is noted after the listing.
        let mut known = running.lock().await;
        if known.is_none() {
            *known = Some(self.running_ids().await?.into_iter().collect());
        }
        Ok(known.as_ref().map_or(0, BTreeSet::len))
    }

    /// The ids of the jobs with a running marker in storage: every running job has one (written
    /// before its document, removed once it ends), so one short listing finds them.
    pub async fn running_ids(&self) -> Result<Vec<String>, StorageError> {
        let prefix = Self::running_path("");
        let paths = self.store.list(prefix.trim_end_matches('/')).await?;
        Ok(paths
            .iter()
            .filter_map(|path| path.strip_prefix(&prefix))
            .filter(|id| is_job_id(id))
            .map(str::to_string)
            .collect())
    }

    /// Keeps the known running ids in step with a marker just written or removed.
    async fn note_running(&self, id: &str, running: bool) {
        let Some(known) = &self.running else {
            return;
        };
        if let Some(ids) = known.lock().await.as_mut() {
            match running {
                true => ids.insert(id.to_string()),
                false => ids.remove(id),
            };
        }
    }

    /// Removes markers left by jobs that are no longer running (writing their ended markers), or
    /// whose kickoff died before the job was recorded (`grace` after the marker was written).
    /// Returns how many were removed.
    pub async fn repair_running_markers(&self, grace: chrono::Duration) -> Result<usize, JobError> {
        let mut removed = 0;
        for id in self.running_ids().await? {
            let path = Self::running_path(&id);
            let stale = match self.load(&id).await? {
                Some((job, _)) if job.status != JobStatus::Running => {
                    self.mark_ended(&job).await?;
                    true
                }
                Some(_) => false,
                None => self.store.get(&path).await?.is_some_and(|(written, _)| {
                    std::str::from_utf8(&written)
                        .ok()
                        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                        .is_none_or(|t| Utc::now() - t.with_timezone(&Utc) > grace)
                }),
            };
            if stale {
                self.store.delete_prefix(&path).await?;
                self.note_running(&id, false).await;
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub async fn load(&self, id: &str) -> Result<Option<(Job, ETag)>, JobError> {
        self.read(&Self::job_path(id)).await
    }

    async fn read<D: DeserializeOwned>(&self, path: &str) -> Result<Option<(D, ETag)>, JobError> {
        let Some((bytes, etag)) = self.store.get(path).await? else {
            return Ok(None);
        };
        let document = serde_json::from_slice(&bytes).map_err(|source| JobError::Corrupt {
            path: path.to_string(),
            source,
        })?;
        Ok(Some((document, etag)))
    }

    /// Applies `change` to the stored job with compare-and-swap, again on a conflict after a
    /// jittered pause that grows with each one, at most `CAS_ATTEMPTS` times in all.
    /// `None` when the job does not exist.
    pub async fn update<T>(
        &self,
        id: &str,
        mut change: impl FnMut(&mut Job) -> Change<T>,
    ) -> Result<Option<T>, JobError> {
        let mut wrote = false;
        let out = self
            .swap(&Self::job_path(id), None, None, |job| {
                let changed = change(job);
                wrote = matches!(changed, Change::Write(_));
                changed
            })
            .await?;
        if let Some((_, stored)) = &out {
            if wrote && stored.document.status != JobStatus::Running {
                // The ended marker before the running one goes: a crash between the two leaves
                // the running marker, whose repair writes the ended one.
                self.mark_ended(&stored.document).await?;
                self.store.delete_prefix(&Self::running_path(id)).await?;
                self.note_running(id, false).await;
            }
        }
        Ok(out.map(|(out, _)| out))
    }

    /// Fails a running job with `message` (and the kind of failure, when it is not this service's
    /// own): the folder of its files, or `None` when the job had ended already.
    pub async fn fail(
        &self,
        id: &str,
        message: &str,
        fault: Option<crate::fault::Fault>,
    ) -> Result<Option<String>, JobError> {
        let failure = Some((message.to_string(), fault));
        let failed = self
            .update(id, |job| {
                let folder = job.output_folder.clone();
                match super::state::end(job, JobStatus::Failed, failure.clone(), Utc::now()) {
                    Change::Write(true) => Change::Write(Some(folder)),
                    _ => Change::Keep(None),
                }
            })
            .await?;
        Ok(failed.flatten())
    }

    fn shard_path(id: &str, index: usize) -> String {
        format!("{JOBS_CONTAINER}/{id}/shards/{index}.json")
    }

    fn done_folder(id: &str) -> String {
        format!("{JOBS_CONTAINER}/{id}/done")
    }

    /// A shard's state; `None` while no worker or sweeper has written it.
    pub async fn shard(&self, id: &str, index: usize) -> Result<Option<ShardState>, JobError> {
        Ok(self
            .read(&Self::shard_path(id, index))
            .await?
            .map(|(state, _)| state))
    }

    /// Applies `change` to a shard's state as `update` does to a job; a shard without a document
    /// starts from `unclaimed` (and is created only if no one created it meanwhile).
    pub async fn update_shard<T>(
        &self,
        id: &str,
        index: usize,
        unclaimed: &ShardState,
        change: impl FnMut(&mut ShardState) -> Change<T>,
    ) -> Result<T, JobError> {
        Ok(self
            .update_shard_from(id, index, None, unclaimed, change)
            .await?
            .0)
    }

    /// As `update_shard`, trying `known` first (the state its worker last wrote, or an unclaimed
    /// one believed absent) without reading it: a worker's claim, beats and finish cost one
    /// request each while no one else writes its state. Returns the state as now stored.
    pub async fn update_shard_from<T>(
        &self,
        id: &str,
        index: usize,
        known: Option<Versioned<ShardState>>,
        unclaimed: &ShardState,
        change: impl FnMut(&mut ShardState) -> Change<T>,
    ) -> Result<(T, Versioned<ShardState>), JobError> {
        let path = Self::shard_path(id, index);
        let out = self.swap(&path, known, Some(unclaimed), change).await?;
        Ok(out.expect("a shard state always exists"))
    }

    /// Marks a shard done for the listing (after its state says so), with the time; marking twice
    /// is harmless.
    pub async fn mark_done(&self, id: &str, index: usize) -> Result<(), JobError> {
        let path = format!("{}/{index}", Self::done_folder(id));
        let now = Bytes::from(Utc::now().to_rfc3339());
        match self.store.put(&path, now, PutMode::Create).await {
            Ok(_) | Err(StorageError::PreconditionFailed(_)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// The shards of `job` not marked done, in order, by one listing.
    pub async fn unfinished_shards(&self, job: &Job) -> Result<Vec<usize>, JobError> {
        let done = self.done_shards(&job.id).await?;
        Ok((0..job.shards.len())
            .filter(|index| !done.contains(index))
            .collect())
    }

    /// The shards marked done, by one listing.
    pub async fn done_shards(&self, id: &str) -> Result<BTreeSet<usize>, JobError> {
        let folder = Self::done_folder(id);
        let paths = self.store.list(&folder).await?;
        Ok(paths
            .iter()
            .filter_map(|path| path.strip_prefix(&folder)?.strip_prefix('/')?.parse().ok())
            .collect())
    }

    /// The compare-and-swap loop over one document, from `guess` (a version believed current,
    /// tried without reading) or else from what is stored: `None` when it does not exist and there
    /// is no `initial` state to create it from; else what `change` returned, the document, and
    /// the version stored.
    async fn swap<D, T>(
        &self,
        path: &str,
        mut guess: Option<Versioned<D>>,
        initial: Option<&D>,
        mut change: impl FnMut(&mut D) -> Change<T>,
    ) -> Result<Option<(T, Versioned<D>)>, JobError>
    where
        D: Serialize + DeserializeOwned + Clone,
    {
        let mut conflicts = 0;
        loop {
            if conflicts > 0 {
                tokio::time::sleep(cas_backoff(conflicts, rand::random())).await;
            }
            if conflicts == CAS_ATTEMPTS {
                return Err(JobError::Contended {
                    path: path.to_string(),
                    attempts: CAS_ATTEMPTS,
                });
            }
            let guessed = guess.is_some();
            let Versioned {
                mut document,
                version,
            } = match guess.take() {
                Some(guessed) => guessed,
                None => match (self.read::<D>(path).await?, initial) {
                    (Some((document, etag)), _) => Versioned::stored(document, etag),
                    (None, Some(initial)) => Versioned::absent(initial.clone()),
                    (None, None) => return Ok(None),
                },
            };
            let out = match change(&mut document) {
                // A guess decides nothing unless it is written: read what is stored.
                Change::Keep(_) if guessed => continue,
                Change::Keep(out) => return Ok(Some((out, Versioned { document, version }))),
                Change::Write(out) => out,
            };
            let body = Bytes::from(serde_json::to_vec_pretty(&document).expect("state serialises"));
            let mode = match version {
                Some(etag) => PutMode::Update(etag),
                None => PutMode::Create,
            };
            match self.store.put(path, body, mode).await {
                Ok(etag) => return Ok(Some((out, Versioned::stored(document, etag)))),
                // A wrong guess is no conflict: read, and try at once.
                Err(StorageError::PreconditionFailed(_)) if guessed => {}
                Err(StorageError::PreconditionFailed(_)) => conflicts += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Ids of every job on the storage.
    pub async fn ids(&self) -> Result<Vec<String>, JobError> {
        let paths = self.store.list(JOBS_CONTAINER).await?;
        Ok(paths
            .iter()
            .filter_map(|p| {
                p.strip_prefix(&format!("{JOBS_CONTAINER}/"))?
                    .strip_suffix("/job.json")
            })
            .filter(|id| is_job_id(id))
            .map(str::to_string)
            .collect())
    }

    /// Writes the manifest unless one is written already (two workers that both found the last
    /// shard done build the same one).
    pub async fn put_manifest(&self, id: &str, manifest: Bytes) -> Result<(), JobError> {
        match self
            .store
            .put(&Self::manifest_path(id), manifest, PutMode::Create)
            .await
        {
            Ok(_) | Err(StorageError::PreconditionFailed(_)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    fn patients_path(id: &str, shard: usize) -> String {
        format!("{JOBS_CONTAINER}/{id}/patients/{shard}.json")
    }

    /// Records the ids of a shard's patients (`organizeOutputBy=Patient`), at planning.
    pub async fn put_patients(
        &self,
        id: &str,
        shard: usize,
        patients: &[String],
    ) -> Result<(), JobError> {
        let body = Bytes::from(serde_json::to_vec(patients).expect("ids serialise"));
        self.store
            .put(&Self::patients_path(id, shard), body, PutMode::Overwrite)
            .await?;
        Ok(())
    }

    /// The ids of a shard's patients, in order (`None`: not recorded).
    pub async fn patients(&self, id: &str, shard: usize) -> Result<Option<Vec<String>>, JobError> {
        Ok(self
            .read(&Self::patients_path(id, shard))
            .await?
            .map(|(ids, _)| ids))
    }

    fn page_path(id: &str, number: usize) -> String {
        format!("{JOBS_CONTAINER}/{id}/pages/{number}.json")
    }

    /// A stored manifest page (`allowPartialManifests`).
    pub async fn page(&self, id: &str, number: usize) -> Result<Option<Page>, JobError> {
        Ok(self
            .read(&Self::page_path(id, number))
            .await?
            .map(|(page, _)| page))
    }

    /// Stores a page unless one is stored already; returns the page that stands.
    pub async fn create_page(&self, id: &str, number: usize, page: Page) -> Result<Page, JobError> {
        let path = Self::page_path(id, number);
        let body = Bytes::from(serde_json::to_vec(&page).expect("a page serialises"));
        match self.store.put(&path, body, PutMode::Create).await {
            Ok(_) => Ok(page),
            Err(StorageError::PreconditionFailed(_)) => Ok(self
                .read(&path)
                .await?
                .map(|(page, _)| page)
                .unwrap_or(page)),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn manifest(&self, id: &str) -> Result<Option<Bytes>, JobError> {
        Ok(self
            .store
            .get(&Self::manifest_path(id))
            .await?
            .map(|(bytes, _)| bytes))
    }

    /// Removes the job's documents and running marker (its export files are removed separately).
    pub async fn delete(&self, id: &str) -> Result<(), JobError> {
        self.store
            .delete_prefix(&format!("{JOBS_CONTAINER}/{id}"))
            .await?;
        self.store.delete_prefix(&Self::running_path(id)).await?;
        self.note_running(id, false).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportRequest;
    use crate::source::PatientScope;

    #[test]
    fn backoff_grows_to_its_ceiling_and_jitter_spreads_it() {
        let ms = |attempt, jitter| cas_backoff(attempt, jitter).as_secs_f64() * 1000.0;
        for (attempt, ceiling) in [
            (1, 4.0),
            (2, 8.0),
            (3, 16.0),
            (8, 512.0),
            (9, 1000.0),
            (30, 1000.0),
        ] {
            assert_eq!(ms(attempt, 1.0), ceiling, "attempt {attempt}");
            assert_eq!(ms(attempt, 0.0), 0.0);
            assert_eq!(ms(attempt, 0.5), ceiling / 2.0);
        }
        let total: f64 = (1..CAS_ATTEMPTS).map(|a| ms(a, 1.0)).sum();
        assert!(total <= 4_100.0, "{total} ms at most in all");
    }

    /// A store whose job document changes under every write.
    struct AlwaysChanged(crate::storage::LocalFolder);

    #[async_trait::async_trait]
    impl ObjectStore for AlwaysChanged {
        async fn get(&self, path: &str) -> Result<Option<(Bytes, ETag)>, StorageError> {
            self.0.get(path).await
        }
        async fn put(&self, path: &str, data: Bytes, mode: PutMode) -> Result<ETag, StorageError> {
            match mode {
                PutMode::Update(_) => Err(StorageError::PreconditionFailed(path.into())),
                mode => self.0.put(path, data, mode).await,
            }
        }
        async fn writer(
            &self,
            path: &str,
        ) -> Result<Box<dyn crate::storage::ObjectWriter>, StorageError> {
            self.0.writer(path).await
        }
        async fn read_stream(
            &self,
            path: &str,
        ) -> Result<Option<(u64, crate::storage::ByteStream)>, StorageError> {
            self.0.read_stream(path).await
        }
        async fn delete_prefix(&self, prefix: &str) -> Result<(), StorageError> {
            self.0.delete_prefix(prefix).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
            self.0.list(prefix).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_update_that_always_meets_a_change_gives_up_at_its_bound_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let folder = crate::storage::LocalFolder::open(dir.path()).unwrap();
        let jobs = JobStore::new(Arc::new(AlwaysChanged(folder)));
        let request =
            ExportRequest::from_query(crate::export::Level::System, "", false, false).unwrap();
        let job = Job {
            id: new_job_id(),
            request,
            request_url: "http://test/$export".into(),
            base_url: "http://test".into(),
            transaction_time: Utc::now(),
            output_folder: "f".into(),
            scope: PatientScope::All,
            status: JobStatus::Running,
            planned: true,
            planned_at: None,
            shards: Vec::new(),
            failure: None,
            failure_fault: None,
            completed_at: None,
            owner: None,
            deidentification: None,
            planning_errors: Vec::new(),
        };
        jobs.create(&job).await.unwrap();
        let mut tries = 0;
        let result = jobs
            .update(&job.id, |_| {
                tries += 1;
                Change::Write(())
            })
            .await;
        assert_eq!(tries, CAS_ATTEMPTS);
        let error = result.unwrap_err();
        assert!(matches!(
            error,
            JobError::Contended {
                attempts: CAS_ATTEMPTS,
                ..
            }
        ));
        assert_eq!(error.fault(), crate::fault::Fault::Unavailable);
        assert!(error.to_string().contains("12 attempts"), "{error}");
    }
}
