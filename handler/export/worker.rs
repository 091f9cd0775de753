//! The shard worker: claim a shard in its own state, stream its resources into rolled files,
//! record the outputs and mark it done; a worker that then finds every shard done writes the
//! manifest (create-only, so two that both find it write one).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use super::blocks::BlockShard;
use super::completion::finalize;
use super::jobs::{Change, Job, JobError, JobStatus, ShardKind, Versioned};
use super::partitions::Partitioner;
use super::running::{RunningShard, Stop, StopSignal};
use super::shaping::Shaping;
use super::state::{self, Beat, Claim, Failure, ShardState};
use super::{ExportError, Exports};
use crate::queue::WorkMessage;
use crate::source::{Cursor, ScanError, ScanRequest, Scanned, SinkError, SourceError};
use crate::storage::{ManifestList, OutputFile, RollingNdjsonWriter};

/// Runs one queue message: plans a job, or runs a shard. A shard's failures are retried up to the
/// restart cap, then fail the job. An error means not even the failure could be recorded (or the
/// plan stored): the message must be delivered again.
pub async fn handle_message(exports: &Exports, message: &WorkMessage) -> Result<(), ExportError> {
    match message.shard {
        None => {
            let span = tracing::info_span!("planning", job_id = %message.job_id);
            super::kickoff::plan_job(exports, &message.job_id)
                .instrument(span)
                .await
        }
        Some(shard) => {
            let task = ShardTask {
                job_id: message.job_id.clone(),
                shard,
            };
            let span = tracing::info_span!("shard", job_id = %message.job_id, shard);
            handle_shard(exports, &task).instrument(span).await
        }
    }
}

/// One shard of one job.
#[derive(Debug, Clone)]
struct ShardTask {
    job_id: String,
    shard: usize,
}

/// Claims the shard, runs it, and records how it ended. An error means the message must come
/// again: the claim, or the record of a failure, could not be written.
async fn handle_shard(exports: &Exports, task: &ShardTask) -> Result<(), ExportError> {
    // Registered before the claim, so that a job stopped here meanwhile is seen stopped.
    let running = exports.running.register(&task.job_id);
    let Some((job, attempt, claimed)) = claim_shard(exports, task).await? else {
        return Ok(());
    };
    if running.signal().get() == Stop::JobStopped {
        tracing::info!("shard not run: its export ended");
        return Ok(());
    }
    match run_claimed(exports, &job, task, attempt, claimed, running).await {
        Ok(()) => Ok(()),
        Err(ExportError::Cancelled(_)) => {
            tracing::info!("shard stopped: export cancelled");
            Ok(())
        }
        Err(ExportError::Superseded(_)) => {
            tracing::info!("shard stopped: another worker took it over");
            Ok(())
        }
        Err(error) => {
            tracing::warn!(%error, attempt, "shard failed");
            if let Some((message, fault)) = super::deid::is_permanent(&error) {
                return fail_job_now(exports, &job, &message, fault).await;
            }
            match record_failure(exports, &job, task, attempt, &error).await {
                Err(full) if full.is_storage_full() => {
                    fail_for_want_of_space(exports, task, &full).await
                }
                other => other,
            }
            .inspect_err(
                |record_error| tracing::error!(%record_error, "could not record the shard failure"),
            )
        }
    }
}

/// Loads the job and claims the shard in its own state: the job, the attempt to run and the state
/// as claimed, or `None` when there is nothing to run (the job ended, the shard is done or runs
/// elsewhere). A shard never claimed is claimed by one create-only write, without a read.
async fn claim_shard(
    exports: &Exports,
    task: &ShardTask,
) -> Result<Option<(Job, u32, Versioned<ShardState>)>, ExportError> {
    let Some((job, _)) = exports.jobs.load(&task.job_id).await? else {
        return Ok(None);
    };
    if job.status != JobStatus::Running || task.shard >= job.shards.len() {
        tracing::debug!("shard message skipped: the job is not running, or has no such shard");
        return Ok(None);
    }
    if super::partitions::waits(exports, &job, task.shard).await? {
        tracing::debug!("shard message skipped: its export's partitions are not all written");
        return Ok(None);
    }
    let timing = exports.limits.timing();
    let unclaimed = job.unclaimed_shard();
    let guess = Some(Versioned::absent(unclaimed.clone()));
    let (claim, claimed) = exports
        .jobs
        .update_shard_from(&job.id, task.shard, guess, &unclaimed, |shard| {
            state::claim(shard, Utc::now(), &timing)
        })
        .await?;
    match claim {
        Claim::Skip(reason) => {
            tracing::debug!(reason, "shard message skipped");
            Ok(None)
        }
        Claim::Run(attempt) => {
            crate::crashpoint::reached("shard-claimed");
            Ok(Some((job, attempt, claimed)))
        }
    }
}

/// Writes a claimed shard's files under its heartbeat (from where its last run paused), then
/// records it done (and completes the job when it was the last), or, stopped at its time box,
/// queues its continuation.
async fn run_claimed(
    exports: &Exports,
    job: &Job,
    task: &ShardTask,
    attempt: u32,
    claimed: Versioned<ShardState>,
    running: RunningShard,
) -> Result<(), ExportError> {
    let stop = running.signal();
    let resume = ResumeAt {
        cursor: claimed.document.cursor.clone(),
        files_before: claimed.document.outputs.len(),
    };
    // The state as this worker last wrote it, kept by the heartbeat.
    let latest = Arc::new(std::sync::Mutex::new(claimed));
    let owner = Owner {
        exports: exports.clone(),
        unclaimed: job.unclaimed_shard(),
        task: task.clone(),
        attempt,
        latest: latest.clone(),
    };
    // The heartbeat lives exactly as long as the shard's work: a shard that ends in any way (an
    // error, a panic, a dropped future) stops beating, so the sweeper can take it back.
    let heartbeat = AbortOnDrop(tokio::spawn(keep_alive(owner.clone(), stop.clone())));
    let written = write_files(exports, job, task.shard, &resume, owner, stop).await;
    drop(running);
    drop(heartbeat);
    let written = written?;

    let job = match exports.jobs.load(&job.id).await? {
        Some((job, _)) if job.status == JobStatus::Running => job,
        _ => {
            remove_files(exports, &written.files).await;
            return Err(ExportError::Cancelled(job.id.clone()));
        }
    };
    let latest = latest.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(cursor) = &written.paused {
        let (paused, _) = record_run_end(exports, &job, task.shard, latest, |shard| {
            state::pause(shard, attempt, cursor, &written.files, Utc::now())
        })
        .await?;
        if !paused {
            return Err(ExportError::Superseded(job.id.clone()));
        }
        crate::crashpoint::reached("shard-paused");
        // Should this fail or the process stop first, the message that started this run comes
        // again (it is not completed), and is the continuation.
        exports
            .queue
            .enqueue(vec![WorkMessage::shard(&job.id, task.shard)])
            .await?;
        tracing::info!(
            files = written.files.len(),
            "shard paused at its time box; its continuation is queued"
        );
        return Ok(());
    }
    let (_, done) = record_run_end(exports, &job, task.shard, latest, |shard| {
        state::finish(shard, &written.files)
    })
    .await?;
    if attempt > 1 {
        remove_stale_files(exports, &job, task.shard, &done.document.outputs).await?;
    }
    crate::crashpoint::reached("shard-done");
    exports.jobs.mark_done(&job.id, task.shard).await?;
    super::partitions::queue_blocks_when_partitioned(exports, &job, task.shard).await?;
    finalize(exports, &job).await
}

/// Writes how a run ended (paused or finished) into the shard's state, from the version this
/// worker last wrote.
async fn record_run_end(
    exports: &Exports,
    job: &Job,
    shard: usize,
    latest: Versioned<ShardState>,
    end: impl FnMut(&mut ShardState) -> Change<bool>,
) -> Result<(bool, Versioned<ShardState>), JobError> {
    let unclaimed = job.unclaimed_shard();
    exports
        .jobs
        .update_shard_from(&job.id, shard, Some(latest), &unclaimed, end)
        .await
}

/// Where a shard's run starts: after the cursor its last paused run left, numbering its files
/// after those runs' files.
struct ResumeAt {
    cursor: Option<Cursor>,
    files_before: usize,
}

/// What one run of a shard wrote: its files, and where it paused (`None`: it read to the end).
struct Written {
    files: Vec<OutputFile>,
    paused: Option<Cursor>,
}

/// The files named like a shard's (`{stem}-{n}.ndjson`) beyond its last one: written by an
/// earlier run that stopped (a crash, a failure, a worker taken over) at another point than the
/// run that then went on, they hold resources the shard's recorded files hold too.
async fn remove_stale_files(
    exports: &Exports,
    job: &Job,
    shard: usize,
    outputs: &[OutputFile],
) -> Result<(), ExportError> {
    let stem = &job.shards[shard].stem;
    let kept = outputs.len() as u64;
    let folder = format!("{}/", job.output_folder);
    for path in exports.storage.list(&job.output_folder).await? {
        let number = path
            .strip_prefix(&folder)
            .and_then(|name| RollingNdjsonWriter::file_number(stem, name));
        if number.is_some_and(|n| n > kept) {
            tracing::info!(%path, "removing a file an earlier run of the shard left");
            exports.storage.delete_prefix(&path).await?;
        }
    }
    Ok(())
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The `meta.lastUpdated` window a shard reads: `(since, stored_since, until)`. A window of a
/// split type is cut on lastUpdated alone: only a whole type reads what was stored after `_since`.
fn window_of(
    job: &Job,
    shard: usize,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>, DateTime<Utc>) {
    let spec = &job.shards[shard];
    let until = [job.request.until, spec.until]
        .into_iter()
        .flatten()
        .fold(job.transaction_time, DateTime::min);
    let since = job.request.since.max(spec.since);
    let stored_since = job
        .request
        .since
        .filter(|_| spec.since.is_none() && spec.until.is_none());
    (since, stored_since, until)
}

/// Streams the shard's resources from the source into rolled files on a blocking thread: all of
/// them, or, past the time box, those up to where the source can resume.
async fn write_files(
    exports: &Exports,
    job: &Job,
    shard: usize,
    resume: &ResumeAt,
    owner: Owner,
    stop: Arc<StopSignal>,
) -> Result<Written, ExportError> {
    let spec = job.shards[shard].clone();
    let (since, stored_since, until) = window_of(job, shard);
    let snapshot = job.transaction_time;
    let source = exports.source.clone();
    let runtime = tokio::runtime::Handle::current();
    let table = view_of(job, &spec)?;
    let mut writer = writer_of(exports, &runtime, job, &spec, resume, table.as_ref());
    let job_id = job.id.clone();
    let scope = job.scope.clone();
    let engine = super::deid::engine_for(exports, job).await?;
    let shaping = Shaping::of(&job.request, &spec.resource_type).deidentified_by(engine);
    let blocks = spec.patients.is_some();
    let context = (exports.clone(), job.clone());
    let files_before = resume.files_before;
    let started = std::time::Instant::now();
    let pause_after = exports.limits.shard_max_time.map(|box_| started + box_);
    let cursor = resume.cursor.clone();
    let job_versions = job.request.versions;
    let result = on_background_thread(move || {
        let request = ScanRequest {
            resource_type: &spec.resource_type,
            since,
            stored_since,
            until,
            snapshot,
            scope: &scope,
            after_id: None,
            type_filters: &shaping.filters,
            rows: spec.rows,
            resume: cursor.as_ref(),
            pause_after,
        };
        let (exports, job) = &context;
        let mut partition_files = Vec::new();
        let scanned = caught(|| match blocks {
            true => {
                let window = (since, stored_since, until);
                let shard = BlockShard::load(
                    exports,
                    runtime.clone(),
                    job,
                    shard,
                    cursor.as_ref(),
                    window,
                )?;
                let go_on = || stop.get() == Stop::KeepGoing;
                shard.write(source.as_ref(), &mut writer, &go_on, pause_after)
            }
            false => {
                let mut partitioner = match spec.kind {
                    ShardKind::Partition => Some(Partitioner::new(
                        exports,
                        runtime.clone(),
                        job,
                        shard,
                        files_before,
                    )?),
                    _ => None,
                };
                let scanned = scan_kind(
                    source.as_ref(),
                    &request,
                    (spec.kind, job_versions, table.as_ref()),
                    &shaping,
                    (&mut writer, partitioner.as_mut()),
                    &stop,
                )?;
                if let Some(partitioner) = partitioner {
                    partition_files = partitioner.finish()?;
                }
                Ok(scanned)
            }
        });
        // A paused run's last file is cut at a point another run would not choose: it is
        // committed only while the shard is still this run's, so that it never replaces the
        // file of a worker that took the shard over.
        let still_ours = || runtime.block_on(owner.beat());
        ended(writer, scanned, still_ours, &stop, job_id).map(|(count, mut written)| {
            written.files.splice(0..0, partition_files);
            (count, written)
        })
    })
    .await
    .unwrap_or_else(|panic| Err((ExportError::Panicked(panic), Vec::new())));
    let (count, written) = match result {
        Ok(written) => written,
        Err((error, committed)) => {
            remove_files(exports, &committed).await;
            return Err(error);
        }
    };
    tracing::info!(resource_type = %job.shards[shard].resource_type, count, files = written.files.len(), paused = written.paused.is_some(), elapsed_ms = started.elapsed().as_millis() as u64, "shard written");
    Ok(written)
}

/// The writer of a shard's files: numbered after those of its earlier runs, listed as its kind
/// is (a view's rows as a table of its format).
fn writer_of(
    exports: &Exports,
    runtime: &tokio::runtime::Handle,
    job: &Job,
    spec: &super::jobs::Shard,
    resume: &ResumeAt,
    table: Option<&TableOf>,
) -> RollingNdjsonWriter {
    let mut writer = RollingNdjsonWriter::new(
        exports.storage.clone(),
        runtime.clone(),
        &job.output_folder,
        &spec.stem,
        &spec.resource_type,
        job.request.file_max_bytes(exports.limits.file_max_bytes),
    )
    .numbered_after(resume.files_before)
    .gzip(exports.limits.gzip_files);
    if spec.kind == ShardKind::Deletions {
        writer = writer.listed_in(ManifestList::Deleted, "Bundle");
    }
    if let Some((view, format)) = table {
        let names: Vec<&str> = view.columns().iter().map(|c| c.name.as_str()).collect();
        let (extension, line_end) = crate::views::write::file_kind(*format);
        let header = crate::views::write::header_line(*format, &names);
        let name = &job.request.views.as_ref().expect("a view's job").views
            [spec.view.expect("a view shard")]
        .name;
        writer = writer
            .as_table(extension, line_end, header)
            .listed_in(ManifestList::Output, name)
            .gzip(exports.limits.gzip_files && *format != crate::views::write::Format::Parquet);
    }
    writer
}

/// The view a view shard writes, with its format; `None` for other shards.
fn view_of(job: &Job, spec: &super::jobs::Shard) -> Result<Option<TableOf>, ExportError> {
    let (Some(index), Some(views)) = (spec.view, job.request.views.as_ref()) else {
        return Ok(None);
    };
    let view = views.view(index).map_err(|error| {
        ExportError::Scan(ScanError::Sink(SinkError::Permanent(format!(
            "view {}: {error}",
            views.views[index].name
        ))))
    })?;
    Ok(Some((view, views.row_format())))
}

/// Streams what a shard of `kind` writes from the source into `writer`: resources, deletions or
/// versions, each shaped for the export (a partition shard's resources into its `partitioner`);
/// stopped when `stop` is set.
fn scan_kind(
    source: &dyn crate::source::ResourceSource,
    request: &ScanRequest<'_>,
    (kind, versions, view): (ShardKind, crate::source::VersionKinds, Option<&TableOf>),
    shaping: &Shaping,
    (writer, mut partitioner): (&mut RollingNdjsonWriter, Option<&mut Partitioner>),
    stop: &StopSignal,
) -> Result<Scanned, ScanError> {
    let going_on = || match stop.get() {
        Stop::KeepGoing => Ok(()),
        _ => Err(SinkError::Stopped),
    };
    let (listed, what) = match kind {
        ShardKind::View => {
            let (view, format) = view.expect("a view shard has its view");
            return view_rows(source, request, (view, *format), writer, &going_on);
        }
        ShardKind::Resources | ShardKind::Partition => {
            return source.scan(request, &mut |resource| {
                going_on()?;
                match (shaping.shape(resource)?, partitioner.as_deref_mut()) {
                    (Some(bytes), Some(partitioner)) => partitioner.push(resource, &bytes),
                    (Some(bytes), None) => Ok(writer.push(&bytes)?),
                    (None, _) => Ok(()),
                }
            })
        }
        ShardKind::Deletions => (
            source.scan_deleted(request, &mut |id| {
                going_on()?;
                match shaping.deletion(id)? {
                    Some(bundle) => Ok(writer.push(&bundle)?),
                    None => Ok(()),
                }
            }),
            "resources deleted since _since",
        ),
        ShardKind::Versions => (
            source.scan_versions(request, versions, &mut |version| {
                going_on()?;
                match shaping.version(version)? {
                    Some(bytes) => Ok(writer.push(&bytes)?),
                    None => Ok(()),
                }
            }),
            "earlier versions and deletions",
        ),
    };
    match listed {
        Err(ScanError::Source(SourceError::Unsupported(reason))) => {
            undetermined(writer, request.resource_type, &reason, what)
        }
        listed => listed,
    }
}

/// A view shard's scan: each resource's rows written as lines, or into Parquet files (ended at
/// the scan's end or pause, so that a continuation starts a new file).
fn view_rows(
    source: &dyn crate::source::ResourceSource,
    request: &ScanRequest<'_>,
    (view, format): (&crate::views::View, crate::views::write::Format),
    writer: &mut RollingNdjsonWriter,
    going_on: &dyn Fn() -> Result<(), SinkError>,
) -> Result<Scanned, ScanError> {
    let mut parquet = (format == crate::views::write::Format::Parquet)
        .then(|| crate::views::parquet::ParquetRows::new(view));
    let scanned = source.scan(request, &mut |resource| {
        going_on()?;
        let rows = crate::views::rows_of(view, resource).map_err(|error| {
            let name = view.name.as_deref().unwrap_or(&view.resource);
            SinkError::Permanent(format!("view {name}: {error}"))
        })?;
        for row in rows {
            match parquet.as_mut() {
                Some(parquet) => parquet.push(row, writer)?,
                None => writer.push(&crate::views::write::line(format, &row))?,
            }
        }
        Ok(())
    })?;
    if let Some(parquet) = parquet.as_mut() {
        parquet
            .finish(writer)
            .map_err(|e| ScanError::Sink(SinkError::Storage(e)))?;
    }
    Ok(scanned)
}

/// A view shard's view and the format of its rows.
type TableOf = (crate::views::View, crate::views::write::Format);

/// A source that cannot list a type's deletions (or versions): the shard's next file, listed in
/// the manifest's `error`, says so, so that a client never takes an empty `deleted` for none.
fn undetermined(
    writer: &mut RollingNdjsonWriter,
    resource_type: &str,
    reason: &str,
    what: &str,
) -> Result<Scanned, ScanError> {
    tracing::warn!(
        resource_type,
        reason,
        what,
        "changes could not be determined"
    );
    let outcome = crate::fhir::OperationOutcome::error(
        crate::fhir::IssueType::NotSupported,
        format!(
            "the {resource_type} {what} could not be determined, so the export does not list \
             them: {reason}"
        ),
    );
    let storage = |e| ScanError::Sink(SinkError::Storage(e));
    writer
        .switch_to(ManifestList::Error, "OperationOutcome")
        .map_err(storage)?;
    writer.push(&outcome.to_json()).map_err(storage)?;
    Ok(Scanned::whole(1))
}

/// How a shard's scan ended, for its files: committed (at the end, or at a pause while the shard
/// is still this run's), or their writer aborted. A cancelled export's files committed so far
/// come back to be removed; a shard taken over leaves them to the worker that now writes the
/// same names.
fn ended(
    writer: RollingNdjsonWriter,
    scanned: Result<Result<Scanned, ScanError>, String>,
    still_ours: impl FnOnce() -> Result<Stop, JobError>,
    stop: &StopSignal,
    job_id: String,
) -> Result<(u64, Written), (ExportError, Vec<OutputFile>)> {
    let scanned = match scanned {
        Ok(scanned) => scanned,
        Err(panic) => {
            writer.abort();
            return Err((ExportError::Panicked(panic), Vec::new()));
        }
    };
    let stopped = |writer: RollingNdjsonWriter, stop: Stop| {
        let committed = writer.abort();
        match stop {
            Stop::TakenOver => Err((ExportError::Superseded(job_id.clone()), Vec::new())),
            _ => Err((ExportError::Cancelled(job_id.clone()), committed)),
        }
    };
    match scanned {
        Ok(Scanned { count, paused }) => {
            if paused.is_some() {
                match still_ours() {
                    Ok(Stop::KeepGoing) => {}
                    Ok(stop) => return stopped(writer, stop),
                    Err(error) => {
                        writer.abort();
                        return Err((error.into(), Vec::new()));
                    }
                }
            }
            writer
                .finish()
                .map(|files| (count, Written { files, paused }))
                .map_err(|e| (ExportError::from(e), Vec::new()))
        }
        Err(ScanError::Sink(SinkError::Stopped)) => stopped(writer, stop.get()),
        Err(error) => {
            writer.abort();
            Err((error.into(), Vec::new()))
        }
    }
}

/// Runs a shard's scan-and-write loop on a thread of its own at a lower CPU priority, so that
/// kickoff and status requests are answered first when every core is busy writing. (A thread of
/// its own: the priority must not stay with a pooled thread that later serves requests.)
/// A panic in `work` comes back as its message.
async fn on_background_thread<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("shard-writer".into())
        .spawn(move || {
            crate::os::lower_this_threads_priority();
            let outcome = caught(work);
            let _ = done.send(outcome);
            // After answering: the shard's end (and the next claim) does not wait on it.
            crate::os::release_freed_memory();
        })
        .map_err(|e| format!("no thread for the shard: {e}"))?;
    result
        .await
        .unwrap_or_else(|_| Err("the shard's thread ended without an answer".into()))
}

/// Runs `work`, turning a panic into its message: a bug met on one resource fails that shard (to
/// be retried, then to fail its job) instead of killing a worker.
fn caught<T>(work: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        tracing::error!(panic = %message, "shard work panicked");
        message
    })
}

/// A run of a shard, as its worker holds it: what its heartbeats write.
#[derive(Clone)]
struct Owner {
    exports: Exports,
    unclaimed: ShardState,
    task: ShardTask,
    attempt: u32,
    /// The state as this worker last wrote it.
    latest: Arc<std::sync::Mutex<Versioned<ShardState>>>,
}

impl Owner {
    /// One heartbeat: whether the run goes on (its job runs, and the shard is still its own).
    async fn beat(&self) -> Result<Stop, JobError> {
        let (jobs, task) = (&self.exports.jobs, &self.task);
        let running = jobs
            .load(&task.job_id)
            .await?
            .is_some_and(|(job, _)| job.status == JobStatus::Running);
        if !running {
            return Ok(Stop::JobStopped);
        }
        let known = self
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (beat, stored) = jobs
            .update_shard_from(
                &task.job_id,
                task.shard,
                Some(known),
                &self.unclaimed,
                |shard| state::beat(shard, self.attempt, Utc::now()),
            )
            .await?;
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = stored;
        Ok(match beat {
            Beat::Alive => Stop::KeepGoing,
            Beat::TakenOver => Stop::TakenOver,
        })
    }
}

/// Refreshes the shard's heartbeat until aborted; sets `stop` when the job stops running or the
/// shard was given to another worker. A failed refresh is tried again at the next beat.
async fn keep_alive(owner: Owner, stop: Arc<StopSignal>) {
    let every = owner.exports.limits.heartbeat_every();
    // The first beat at a random point of the first period: shards started together (a job's
    // first wave) do not write their beats in step from then on.
    let first = every.mul_f64(1.0 + rand::random::<f64>());
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    loop {
        ticks.tick().await;
        match owner.beat().await {
            Ok(Stop::KeepGoing) => {}
            Ok(reason) => {
                stop.set(reason);
                return;
            }
            Err(error) => tracing::warn!(%error, "could not refresh the shard's heartbeat"),
        }
    }
}

/// After a failed attempt: the shard waits for its retry, or at the restart cap its job fails
/// and the job's files go.
async fn record_failure(
    exports: &Exports,
    job: &Job,
    task: &ShardTask,
    attempt: u32,
    error: &ExportError,
) -> Result<(), ExportError> {
    let timing = exports.limits.timing();
    let label = state::label(task.shard, &job.shards[task.shard].resource_type);
    let message = error.to_string();
    let failure = exports
        .jobs
        .update_shard(&job.id, task.shard, &job.unclaimed_shard(), |shard| {
            let (now, jitter) = (Utc::now(), rand::random());
            state::fail(shard, &label, attempt, &message, now, &timing, jitter)
        })
        .await?;
    match failure {
        Failure::RetryAt(at) => {
            let wait = (at - Utc::now()).to_std().unwrap_or_default();
            tracing::info!(retry_in_ms = wait.as_millis() as u64, "shard retried later");
            // A queue that cannot hold a message back (Service Bus through the bindings) drops
            // it: the sweeper sends the shard once its retry is due.
            exports
                .queue
                .enqueue_later(
                    WorkMessage::shard(&task.job_id, task.shard),
                    wait + CLOCK_MARGIN,
                )
                .await?;
        }
        Failure::FailsJob(failure) => {
            exports.fail_job(&job.id, &failure, None).await?;
        }
        Failure::Ignored => {}
    }
    Ok(())
}

/// Fails the export at once, for a failure no retry mends; its files go.
async fn fail_job_now(
    exports: &Exports,
    job: &Job,
    message: &str,
    fault: crate::fault::Fault,
) -> Result<(), ExportError> {
    exports.fail_job(&job.id, message, Some(fault)).await?;
    Ok(())
}

/// Added to a retry's wait on the in-process queue, so that it comes after `retry_at` by the
/// wall clock too.
const CLOCK_MARGIN: Duration = Duration::from_millis(5);

/// The storage is too full even to record a shard's failure, most likely with the export's own
/// files: they go, which makes room, and the job fails saying why. (Its other shards, finding it
/// failed, stop.) An error: not even that could be written; the message is run again later.
async fn fail_for_want_of_space(
    exports: &Exports,
    task: &ShardTask,
    full: &ExportError,
) -> Result<(), ExportError> {
    let Some((job, _)) = exports.jobs.load(&task.job_id).await? else {
        return Ok(());
    };
    if job.status != JobStatus::Running {
        return Ok(());
    }
    exports.running.stop(&task.job_id).await;
    exports.storage.delete_prefix(&job.output_folder).await?;
    let failure = format!("{full}; the export's files were removed to make room");
    exports.jobs.fail(&task.job_id, &failure, None).await?;
    tracing::error!(%full, "export failed: storage full");
    Ok(())
}

async fn remove_files(exports: &Exports, files: &[OutputFile]) {
    for file in files {
        if let Err(error) = exports.storage.delete_prefix(&file.path).await {
            tracing::warn!(%error, path = %file.path, "could not remove a file of a cancelled export");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_on_the_shard_thread_comes_back_as_its_message() {
        let answer = on_background_thread(|| -> u32 { panic!("bad data at row 7") }).await;
        assert_eq!(answer, Err("bad data at row 7".to_string()));
        assert_eq!(on_background_thread(|| 5).await, Ok(5));
    }
}
