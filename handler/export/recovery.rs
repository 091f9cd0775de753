//! Upkeep of jobs: resuming what a previous process left running, sweeping shards that went
//! silent, and removing finished exports past their retention.

use super::jobs::{Change, JobError, JobStatus, ShardStatus};
use super::{worker, ExportError, Exports};
use crate::queue::{enqueue_shards, WorkMessage};

impl Exports {
    /// Picks up the jobs a previous process left running: their planning, or their unfinished
    /// shards, are queued again.
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
                    if !job.planned {
                        return Change::Keep(Some(None));
                    }
                    let mut unfinished = Vec::new();
                    for (index, shard) in job.shards.iter_mut().enumerate() {
                        if shard.status != ShardStatus::Done {
                            shard.status = ShardStatus::Queued;
                            shard.heartbeat = Some(chrono::Utc::now());
                            unfinished.push(index);
                        }
                    }
                    Change::Write(Some(Some(unfinished)))
                })
                .await;
            let unfinished = readable(&id, unfinished)?.flatten().flatten();
            let Some(unfinished) = unfinished else {
                continue;
            };
            resumed += 1;
            let Some(unfinished) = unfinished else {
                self.queue.enqueue(vec![WorkMessage::plan(&id)]).await?;
                continue;
            };
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
    /// its job with a message naming the shard. A job still unplanned that long is queued for
    /// planning again (planning twice is harmless: the first plan recorded stands).
    pub async fn sweep_stale(&self) -> Result<SweepReport, ExportError> {
        let stale_after =
            chrono::Duration::from_std(self.limits.stale_after).unwrap_or(chrono::Duration::MAX);
        let max_attempts = self.limits.max_attempts;
        let mut report = SweepReport::default();
        for id in self.jobs.ids().await? {
            let now = chrono::Utc::now();
            let swept = self
                .jobs
                .update(&id, |job| {
                    if job.status != JobStatus::Running {
                        return Change::Keep((Vec::new(), false, false));
                    }
                    if !job.planned {
                        let stale = now - job.transaction_time >= stale_after;
                        return Change::Keep((Vec::new(), false, stale));
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
                        return Change::Write((Vec::new(), true, false));
                    }
                    if requeue.is_empty() {
                        return Change::Keep((requeue, false, false));
                    }
                    Change::Write((requeue, false, false))
                })
                .await;
            let Some((requeue, failed, replan)) = readable(&id, swept)?.flatten() else {
                continue;
            };
            if replan {
                tracing::warn!(job_id = %id, "an export still unplanned queued for planning again");
                report.replanned_jobs += 1;
                self.queue.enqueue(vec![WorkMessage::plan(&id)]).await?;
            }
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
                    .expires_at(self.limits.retention)
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
