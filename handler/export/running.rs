//! The shards this process is running, by job, each with the signal its heartbeat sets: a job
//! that ends here stops its shards here at once (shards on other instances notice at their next
//! heartbeat). One registry per [`super::Exports`]. A shard registers before it claims: one that
//! registers after its job was stopped here starts stopped, so nothing of a stopped job is
//! written here once [`RunningShards::stop`] returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Whether a running shard goes on, set by its heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stop {
    KeepGoing,
    /// The export was cancelled or failed: the shard's files go.
    JobStopped,
    /// The sweeper gave the shard to another worker, which writes the same files: they stay.
    TakenOver,
}

/// A `Stop` shared between the heartbeat and the writing thread.
#[derive(Default)]
pub struct StopSignal(AtomicU8);

impl StopSignal {
    pub fn get(&self) -> Stop {
        match self.0.load(Ordering::Relaxed) {
            0 => Stop::KeepGoing,
            1 => Stop::JobStopped,
            _ => Stop::TakenOver,
        }
    }

    pub fn set(&self, stop: Stop) {
        self.0.store(stop as u8, Ordering::Relaxed);
    }
}

/// Each running shard's job id and stop signal, and the jobs stopped here lately.
#[derive(Default)]
struct Entries {
    running: Vec<(String, Arc<StopSignal>)>,
    stopped: VecDeque<String>,
}

/// How many stopped jobs are remembered: a shard message comes at most a few seconds after its
/// job stopped (once its claim sees the job ended, it runs nothing anyway).
const STOPPED_REMEMBERED: usize = 256;

type Registry = Arc<Mutex<Entries>>;

/// The shards running in this process.
#[derive(Default)]
pub struct RunningShards(Registry);

/// A running shard's entry, removed when dropped.
pub struct RunningShard {
    registry: Registry,
    stop: Arc<StopSignal>,
}

impl RunningShards {
    /// Registers a shard of `job_id` about to be claimed; its signal is set already when the job
    /// was stopped here.
    pub fn register(&self, job_id: &str) -> RunningShard {
        let stop = Arc::new(StopSignal::default());
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if entries.stopped.iter().any(|job| job == job_id) {
            stop.set(Stop::JobStopped);
        }
        entries.running.push((job_id.to_string(), stop.clone()));
        RunningShard {
            registry: self.0.clone(),
            stop,
        }
    }

    /// Stops this process's running shards of a job and waits (at most 10 s) until each has
    /// removed its files: a job cancelled or failed has nothing of it left behind here. Shards on
    /// other instances notice at their next heartbeat; their unfinished blobs never become visible.
    pub async fn stop(&self, job_id: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        {
            let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if !entries.stopped.iter().any(|job| job == job_id) {
                if entries.stopped.len() == STOPPED_REMEMBERED {
                    entries.stopped.pop_front();
                }
                entries.stopped.push_back(job_id.to_string());
            }
        }
        loop {
            let stopping = {
                let entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
                let mut stopping = 0;
                for (_, stop) in entries.running.iter().filter(|(job, _)| job == job_id) {
                    stop.set(Stop::JobStopped);
                    stopping += 1;
                }
                stopping
            };
            if stopping == 0 || std::time::Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl RunningShard {
    /// The signal the shard's heartbeat and its writing thread share.
    pub fn signal(&self) -> Arc<StopSignal> {
        self.stop.clone()
    }
}

impl Drop for RunningShard {
    fn drop(&mut self) {
        let mut entries = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .running
            .retain(|(_, stop)| !Arc::ptr_eq(stop, &self.stop));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_shard_registered_after_its_job_stopped_starts_stopped() {
        let shards = RunningShards::default();
        let before = shards.register("a");
        let other = shards.register("b");
        let waited = tokio::spawn({
            let signal = before.signal();
            async move {
                while signal.get() == Stop::KeepGoing {
                    tokio::task::yield_now().await;
                }
                drop(before);
            }
        });
        shards.stop("a").await;
        waited.await.unwrap();
        assert_eq!(shards.register("a").signal().get(), Stop::JobStopped);
        assert_eq!(other.signal().get(), Stop::KeepGoing);
        assert_eq!(shards.register("b").signal().get(), Stop::KeepGoing);
    }
}
