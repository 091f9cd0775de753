//! How a job ends, in one place: its document's transition (once; a de-identified export's keys
//! go with it, see [`super::state`]), this process's shards of it stopped, and one policy for its
//! files: a failed or cancelled export's files are removed at once, whoever ends it (its worker,
//! the sweeper at the restart cap, a client's `DELETE`); a completed export's are kept until
//! retention.

use chrono::Utc;

use super::jobs::{Change, Job, JobError, JobStatus, JobStore};
use super::{state, ExportError, Exports};
use crate::fault::Fault;

/// What a cancel came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// Cancelled now (or before), its files removed.
    Done,
    /// No such job, or one the caller may not see.
    Unknown,
    /// Its document could not be read: it was removed, its files could not be located.
    UnreadableRemoved,
}

impl Exports {
    /// Fails a running job with `message` (and the kind of failure, when it is not this service's
    /// own): its shards here stop and its files go. `false` when it had ended already.
    pub async fn fail_job(
        &self,
        id: &str,
        message: &str,
        fault: Option<Fault>,
    ) -> Result<bool, ExportError> {
        self.running.stop(id).await;
        let Some(folder) = self.jobs.fail(id, message, fault).await? else {
            return Ok(false);
        };
        self.remove_files(&folder).await;
        Ok(true)
    }

    /// Cancels a job the caller may see (`visible`), running or ended: cancelled from now on, its
    /// keys gone, its shards here stopped, its files and manifest removed. A store too full to
    /// record the cancel gets the files removed first (which makes room); a document that cannot be
    /// read is removed.
    pub async fn cancel_job(
        &self,
        id: &str,
        visible: impl Fn(&Job) -> bool,
    ) -> Result<Cancelled, ExportError> {
        let mark_cancelled = || {
            self.jobs.update(id, |job| match visible(job) {
                false => Change::Keep(None),
                true => state::cancel(job, Utc::now()),
            })
        };
        let folder = match mark_cancelled().await {
            Err(JobError::Storage(full)) if full.is_full() => {
                let job = match self.jobs.load(id).await? {
                    Some((job, _)) if visible(&job) && job.status != JobStatus::Cancelled => job,
                    _ => return Ok(Cancelled::Unknown),
                };
                self.storage.delete_prefix(&job.output_folder).await?;
                match mark_cancelled().await {
                    Err(JobError::Storage(still)) if still.is_full() => {
                        tracing::warn!(
                            job_id = id,
                            "storage full: the cancelled export's state removed"
                        );
                        self.jobs.delete(id).await?;
                    }
                    other => {
                        other?;
                    }
                }
                job.output_folder
            }
            Err(JobError::Corrupt { .. }) => {
                // Its folder and owner cannot be read: its state goes, so it stops troubling anyone.
                self.jobs.delete(id).await?;
                tracing::warn!(job_id = id, "unreadable job document deleted on cancel");
                return Ok(Cancelled::UnreadableRemoved);
            }
            other => match other?.flatten() {
                Some(folder) => folder,
                None => return Ok(Cancelled::Unknown),
            },
        };
        self.running.stop(id).await;
        self.storage.delete_prefix(&folder).await?;
        self.storage
            .delete_prefix(&JobStore::manifest_path(id))
            .await?;
        tracing::info!(job_id = id, "export cancelled");
        Ok(Cancelled::Done)
    }

    /// Removes an ended export's files; a failure is logged (retention tries again).
    async fn remove_files(&self, folder: &str) {
        if let Err(error) = self.storage.delete_prefix(folder).await {
            tracing::warn!(%error, %folder, "could not remove the files of an ended export");
        }
    }
}
