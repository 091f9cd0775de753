//! Upkeep of jobs: resuming what a previous process left running, sweeping shards that went
//! silent, and removing finished exports past their retention.

use std::collections::HashSet;

use super::jobs::{EndedMarker, Job, JobError, JobStatus};
use super::state::{self, Sweep};
use super::{ExportError, Exports};
use crate::queue::{enqueue_shards, WorkMessage};

impl Exports {
    /// Picks up the jobs a previous process left running: their planning, or their unfinished
    /// shards, are queued again (waiting ones too: this process owns the queue, and it is empty).
    /// Only for a store this process owns alone (the local folder).
    pub async fn resume_unfinished(&self) -> Result<usize, ExportError> {
        let mut resumed = 0;
        for id in self.jobs.running_ids().await? {
            let Some((job, _)) = readable(&id, self.jobs.load(&id).await)?.flatten() else {
                continue;
            };
            if job.status != JobStatus::Running {
                continue;
            }
            resumed += 1;
            if !job.planned {
                self.queue.enqueue(vec![WorkMessage::plan(&id)]).await?;
                continue;
            }
            let mut unfinished = Vec::new();
            for index in self.jobs.unfinished_shards(&job).await? {
                let now = chrono::Utc::now();
                let resume = self
                    .jobs
                    .update_shard(&id, index, &job.unclaimed_shard(), |shard| {
                        state::resume(shard, now)
                    })
                    .await;
                match readable(&id, resume)? {
                    Some(true) => unfinished.push(index),
                    // Done, its marker missing: the worker stopped between the two writes.
                    Some(false) => self.jobs.mark_done(&id, index).await?,
                    None => {}
                }
            }
            if unfinished.is_empty() {
                super::completion::finalize(self, &job).await?;
            } else {
                enqueue_shards(self.queue.as_ref(), &id, unfinished).await?;
            }
        }
        Ok(resumed)
    }

    /// Sends again what has no message out: shards silent for longer than the stale limit (a
    /// worker that died while running one), failed shards whose retry is due, and queued shards
    /// whose message expired. A running shard past the restart cap fails its job with a message
    /// naming the shard. A job still unplanned that long is queued for planning again (planning
    /// twice is harmless: the first plan recorded stands). Costs one listing of the running
    /// markers, then per running job its document, one listing of its done markers, and the state
    /// of each shard not yet done: finished jobs, however many are kept, cost nothing.
    pub async fn sweep_stale(&self) -> Result<SweepReport, ExportError> {
        let timing = self.limits.timing();
        let mut report = SweepReport::default();
        for id in self.jobs.running_ids().await? {
            let Some((job, _)) = readable(&id, self.jobs.load(&id).await)?.flatten() else {
                continue;
            };
            if job.status != JobStatus::Running {
                continue;
            }
            if !job.planned {
                if chrono::Utc::now() - job.transaction_time >= timing.stale_after {
                    tracing::warn!(job_id = %id, "an export still unplanned queued for planning again");
                    report.replanned_jobs += 1;
                    self.queue.enqueue(vec![WorkMessage::plan(&id)]).await?;
                }
                continue;
            }
            let swept = self.sweep_job(&job, &timing).await?;
            if swept.failed {
                report.failed_jobs += 1;
            }
            if !swept.send.is_empty() {
                tracing::warn!(job_id = %id, shards = ?swept.send, "shards without a message out sent again");
                report.requeued_shards += swept.send.len();
                enqueue_shards(self.queue.as_ref(), &id, swept.send).await?;
            }
            if swept.all_done {
                super::completion::finalize(self, &job).await?;
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

    /// Sweeps the unfinished shards of one planned, running job.
    async fn sweep_job(&self, job: &Job, timing: &state::Timing) -> Result<SweptJob, ExportError> {
        let id = &job.id;
        let mut swept = SweptJob {
            send: Vec::new(),
            failed: false,
            all_done: true,
        };
        for index in self.jobs.unfinished_shards(job).await? {
            let label = state::label(index, &job.shards[index].resource_type);
            let now = chrono::Utc::now();
            let sweep = self
                .jobs
                .update_shard(id, index, &job.unclaimed_shard(), |shard| {
                    state::sweep(shard, &label, now, timing)
                })
                .await;
            match readable(id, sweep)? {
                Some(Sweep::Done) => {
                    self.jobs.mark_done(id, index).await?;
                    continue;
                }
                Some(Sweep::Send) => swept.send.push(index),
                Some(Sweep::FailsJob(failure)) => {
                    if self.fail_job(id, &failure, None).await? {
                        tracing::warn!(job_id = %id, %failure, "export failed: a shard passed the restart cap");
                        swept.failed = true;
                    }
                    return Ok(SweptJob {
                        send: Vec::new(),
                        failed: swept.failed,
                        all_done: false,
                    });
                }
                Some(Sweep::Leave) | None => {}
            }
            swept.all_done = false;
        }
        Ok(swept)
    }

    /// Removes ended jobs past their retention: files first, then the job's state, then its
    /// ended marker. Costs one listing of the ended markers, and reads only the jobs whose time
    /// has come; a process's first pass, and one a day after, also lists every job document to
    /// mark jobs ended without a marker (by a version before the markers).
    pub async fn remove_expired(&self) -> Result<usize, ExportError> {
        let mut markers = self.jobs.ended_markers().await?;
        if self.jobs.take_listing_turn(LIST_EVERY_JOB_EVERY) {
            match self.mark_unmarked_ended(&markers).await {
                Ok(0) => {}
                Ok(marked) => {
                    tracing::info!(marked, "ended exports without a marker marked");
                    markers = self.jobs.ended_markers().await?;
                }
                Err(error) => {
                    self.jobs.return_listing_turn();
                    return Err(error);
                }
            }
        }
        let now = chrono::Utc::now();
        let retention =
            chrono::Duration::from_std(self.limits.retention).unwrap_or(chrono::Duration::MAX);
        let mut removed = 0;
        for marker in markers {
            if marker
                .ended_at
                .checked_add_signed(retention)
                .is_none_or(|at| at > now)
            {
                continue;
            }
            let Some(found) = readable(&marker.id, self.jobs.load(&marker.id).await)? else {
                continue;
            };
            let Some((job, _)) = found else {
                // Its job was removed (a crash before the marker went, or a cancel that could
                // not record itself).
                self.jobs.remove_ended_marker(&marker).await?;
                continue;
            };
            let ended_at = job.completed_at.map(|at| at.timestamp_millis());
            if job.status == JobStatus::Running
                || ended_at != Some(marker.ended_at.timestamp_millis())
            {
                // The job ended again since (a completed export cancelled later): its marker for
                // that end is written, this one goes.
                self.jobs.mark_ended(&job).await?;
                self.jobs.remove_ended_marker(&marker).await?;
                continue;
            }
            if job
                .expires_at(self.limits.retention)
                .is_none_or(|at| at > now)
            {
                continue;
            }
            self.storage.delete_prefix(&job.output_folder).await?;
            self.jobs.delete(&job.id).await?;
            self.jobs.remove_ended_marker(&marker).await?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Marks the ended jobs that have neither an ended marker nor a running one; returns how many.
    async fn mark_unmarked_ended(&self, markers: &[EndedMarker]) -> Result<usize, ExportError> {
        let marked: HashSet<&str> = markers.iter().map(|m| m.id.as_str()).collect();
        let running: HashSet<String> = self.jobs.running_ids().await?.into_iter().collect();
        let mut count = 0;
        for id in self.jobs.ids().await? {
            if marked.contains(id.as_str()) || running.contains(&id) {
                continue;
            }
            let Some((job, _)) = readable(&id, self.jobs.load(&id).await)?.flatten() else {
                continue;
            };
            if job.status != JobStatus::Running {
                self.jobs.mark_ended(&job).await?;
                count += 1;
            }
        }
        Ok(count)
    }
}

/// How often a process lists every job document to find ended jobs without a marker.
const LIST_EVERY_JOB_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

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

/// What sweeping one job found.
struct SweptJob {
    /// Shards to send.
    send: Vec<usize>,
    /// The job failed at the restart cap.
    failed: bool,
    /// Every shard is done (the job is to be completed).
    all_done: bool,
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub requeued_shards: usize,
    pub failed_jobs: usize,
    pub replanned_jobs: usize,
}

impl std::fmt::Display for SweepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} stale shard(s) queued again, {} export(s) failed at the restart cap, {} unplanned export(s) queued for planning again",
            self.requeued_shards, self.failed_jobs, self.replanned_jobs
        )
    }
}
