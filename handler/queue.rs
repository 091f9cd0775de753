//! The shard queue: the `WorkQueue` trait and the in-process queue with its worker pool.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinHandle;

use crate::app::App;
use crate::export::{worker, ShardMessage};

#[derive(Debug, thiserror::Error)]
#[error("the work queue is closed")]
pub struct QueueClosed;

#[async_trait]
pub trait WorkQueue: Send + Sync {
    async fn enqueue(&self, messages: Vec<ShardMessage>) -> Result<(), QueueClosed>;

    /// Sends the message again after `delay` (a retry).
    async fn enqueue_later(
        &self,
        message: ShardMessage,
        delay: Duration,
    ) -> Result<(), QueueClosed>;
}

/// An unbounded in-memory queue; job state on storage lets a restart rebuild it.
#[derive(Clone)]
pub struct InProcessQueue {
    sender: mpsc::UnboundedSender<ShardMessage>,
}

pub type QueueReceiver = mpsc::UnboundedReceiver<ShardMessage>;

impl InProcessQueue {
    pub fn new() -> (Self, QueueReceiver) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (Self { sender }, receiver)
    }
}

#[async_trait]
impl WorkQueue for InProcessQueue {
    async fn enqueue(&self, messages: Vec<ShardMessage>) -> Result<(), QueueClosed> {
        messages
            .into_iter()
            .try_for_each(|m| self.sender.send(m).map_err(|_| QueueClosed))
    }

    async fn enqueue_later(
        &self,
        message: ShardMessage,
        delay: Duration,
    ) -> Result<(), QueueClosed> {
        let sender = self.sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = sender.send(message);
        });
        Ok(())
    }
}

/// The pause before a message whose outcome could not be recorded is run again.
const RETRY_UNRECORDED: Duration = Duration::from_secs(5);

/// Starts `count` workers taking shards from `receiver` until the queue closes (0: an API-only node).
pub fn spawn_workers(
    app: App,
    receiver: Arc<Mutex<QueueReceiver>>,
    count: usize,
) -> Vec<JoinHandle<()>> {
    (0..count)
        .map(|_| {
            let (app, receiver) = (app.clone(), receiver.clone());
            tokio::spawn(async move {
                loop {
                    let Some(message) = receiver.lock().await.recv().await else {
                        return;
                    };
                    if worker::handle_message(&app, &message).await.is_err() {
                        // The job store could not be reached; try again in a while.
                        let _ = app.queue.enqueue_later(message, RETRY_UNRECORDED).await;
                    }
                }
            })
        })
        .collect()
}
