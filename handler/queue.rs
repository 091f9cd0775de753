//! The shard queue: its message, the `WorkQueue` trait and the in-process queue.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// A queue message: plan one job (`{"jobId": ...}`), or run one of its shards
/// (`{"jobId": ..., "shard": n}`). Also the body of a Service Bus message in Azure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkMessage {
    pub job_id: String,
    /// `None`: plan the job (cut its types into shards, then queue them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<usize>,
}

impl WorkMessage {
    pub fn plan(job_id: &str) -> WorkMessage {
        WorkMessage {
            job_id: job_id.to_string(),
            shard: None,
        }
    }

    pub fn shard(job_id: &str, shard: usize) -> WorkMessage {
        WorkMessage {
            job_id: job_id.to_string(),
            shard: Some(shard),
        }
    }
}

/// Queues the given shards of a job.
pub async fn enqueue_shards(
    queue: &dyn WorkQueue,
    job_id: &str,
    shards: impl IntoIterator<Item = usize>,
) -> Result<(), QueueClosed> {
    let messages = shards
        .into_iter()
        .map(|shard| WorkMessage::shard(job_id, shard))
        .collect();
    queue.enqueue(messages).await
}

#[derive(Debug, thiserror::Error)]
#[error("the work queue is closed")]
pub struct QueueClosed;

#[async_trait]
pub trait WorkQueue: Send + Sync {
    async fn enqueue(&self, messages: Vec<WorkMessage>) -> Result<(), QueueClosed>;

    /// Sends the message after `delay` (a retry), if this queue can hold a message back; one that
    /// cannot drops it, and the sweeper sends the shard when its retry is due.
    async fn enqueue_later(&self, message: WorkMessage, delay: Duration)
        -> Result<(), QueueClosed>;
}

/// An unbounded in-memory queue; job state on storage lets a restart rebuild it.
#[derive(Clone)]
pub struct InProcessQueue {
    sender: mpsc::UnboundedSender<WorkMessage>,
}

impl InProcessQueue {
    pub fn new() -> (Self, QueueReceiver) {
        let (sender, channel) = mpsc::unbounded_channel();
        let receiver = QueueReceiver {
            channel,
            waiting: VecDeque::new(),
        };
        (Self { sender }, receiver)
    }
}

/// The worker side of the in-process queue: jobs take turns, one shard each, so an export of 500
/// shards queued first does not hold back one of 3 queued after it.
pub struct QueueReceiver {
    channel: mpsc::UnboundedReceiver<WorkMessage>,
    /// Jobs with shards waiting, in turn order, each with its shards in the order queued.
    waiting: VecDeque<(String, VecDeque<WorkMessage>)>,
}

impl QueueReceiver {
    /// The next shard: of the job whose turn it is. `None` once the queue is closed and drained.
    pub async fn recv(&mut self) -> Option<WorkMessage> {
        if self.waiting.is_empty() {
            let message = self.channel.recv().await?;
            self.add(message);
        }
        while let Ok(message) = self.channel.try_recv() {
            self.add(message);
        }
        let (job, mut shards) = self.waiting.pop_front()?;
        let next = shards.pop_front();
        if !shards.is_empty() {
            self.waiting.push_back((job, shards));
        }
        next
    }

    fn add(&mut self, message: WorkMessage) {
        match self
            .waiting
            .iter_mut()
            .find(|(job, _)| *job == message.job_id)
        {
            Some((_, shards)) => shards.push_back(message),
            None => self
                .waiting
                .push_back((message.job_id.clone(), VecDeque::from([message]))),
        }
    }
}

#[async_trait]
impl WorkQueue for InProcessQueue {
    async fn enqueue(&self, messages: Vec<WorkMessage>) -> Result<(), QueueClosed> {
        messages
            .into_iter()
            .try_for_each(|m| self.sender.send(m).map_err(|_| QueueClosed))
    }

    async fn enqueue_later(
        &self,
        message: WorkMessage,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(job: &str, shard: usize) -> WorkMessage {
        WorkMessage::shard(job, shard)
    }

    #[tokio::test]
    async fn jobs_take_turns_whatever_order_their_shards_were_queued_in() {
        let (queue, mut receiver) = InProcessQueue::new();
        queue
            .enqueue((0..4).map(|n| shard("big", n)).collect())
            .await
            .unwrap();
        queue
            .enqueue(vec![shard("small", 0), shard("small", 1)])
            .await
            .unwrap();
        let first = receiver.recv().await.unwrap();
        queue.enqueue(vec![shard("late", 0)]).await.unwrap();
        let mut order = vec![first];
        for _ in 0..6 {
            order.push(receiver.recv().await.unwrap());
        }
        let order: Vec<(&str, usize)> = order
            .iter()
            .map(|m| (m.job_id.as_str(), m.shard.unwrap()))
            .collect();
        assert_eq!(
            order,
            [
                ("big", 0),
                ("small", 0),
                ("big", 1),
                ("late", 0),
                ("small", 1),
                ("big", 2),
                ("big", 3)
            ]
        );
        drop(queue);
        assert_eq!(receiver.recv().await, None);
    }
}
