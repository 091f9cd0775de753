//! The shards this process is running, by job, each with the signal its heartbeat sets: a job
//! that ends here stops its shards here at once (shards on other instances notice at their next
//! heartbeat). One registry per [`super::Exports`].

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

/// Each running shard's job id and stop signal.
type Registry = Arc<Mutex<Vec<(String, Arc<StopSignal>)>>>;

/// The shards running in this process.
#[derive(Default)]
pub struct RunningShards(Registry);

/// A running shard's entry, removed when dropped.
pub struct RunningShard {
    registry: Registry,
    stop: Arc<StopSignal>,
}

impl RunningShards {
    pub fn register(&self, job_id: &str, stop: Arc<StopSignal>) -> RunningShard {
        let mut running = self.0.lock().unwrap_or_else(|e| e.into_inner());
        running.push((job_id.to_string(), stop.clone()));
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
        loop {
            let stopping = {
                let running = self.0.lock().unwrap_or_else(|e| e.into_inner());
                let mut stopping = 0;
                for (_, stop) in running.iter().filter(|(job, _)| job == job_id) {
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

impl Drop for RunningShard {
    fn drop(&mut self) {
        let mut running = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|(_, stop)| !Arc::ptr_eq(stop, &self.stop));
    }
}
