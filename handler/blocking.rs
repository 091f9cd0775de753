//! Short blocking work a request waits for, run on the request's own thread.

/// Runs `work` (a file system or SQLite call that blocks briefly) on the calling worker thread:
/// `block_in_place` hands this worker's other tasks to another thread, and nothing waits for a
/// blocking-pool thread to be woken and scheduled, which took 2-5 ms while an export kept both
/// cores busy. A current-thread runtime (some tests) has no worker to hand over: there the work
/// goes to the blocking pool.
pub async fn run<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        _ => tokio::task::spawn_blocking(work)
            .await
            .expect("blocking work does not panic"),
    }
}
