//! The async API's background work: connecting to Redis (so that an outage
//! at start-up does not keep the router from serving) and exporting every
//! stream's backlog as a metric.

use std::sync::Arc;
use std::time::Duration;

use shamal_async_queue::{RedisOptions, RedisQueue};
use shamal_backoff::Backoff;
use tokio::task::JoinHandle;

use super::AsyncApi;

/// Background tasks of the async service; abort them on shutdown.
pub struct AsyncTasks(Vec<JoinHandle<()>>);

impl AsyncTasks {
    /// Starts the tasks of `api`: the connection to `redis` when the queue
    /// is there (not shared in-process), and the backlog export.
    pub(super) fn spawn(api: &Arc<AsyncApi>, redis: Option<RedisOptions>) -> AsyncTasks {
        let mut tasks = Vec::new();
        if let Some(options) = redis {
            tasks.push(tokio::spawn(connect(api.clone(), options)));
        }
        tasks.push(tokio::spawn(export_backlog(api.clone())));
        AsyncTasks(tasks)
    }

    pub fn abort(self) {
        for task in self.0 {
            task.abort();
        }
    }
}

/// Connects to Redis, retrying until it answers (or the router stops).
async fn connect(api: Arc<AsyncApi>, options: RedisOptions) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        match RedisQueue::connect(options.clone(), api.settings.queue_config()).await {
            Ok(queue) => {
                tracing::info!(queue = %api.queue.description, "async queue connected");
                let _ = api.queue.queue.set(Arc::new(queue));
                return;
            }
            Err(error) => {
                tracing::warn!(queue = %api.queue.description, %error, "cannot connect to the async queue; retrying");
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Exports every stream's backlog (lag + pending) each second.
async fn export_backlog(api: Arc<AsyncApi>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(queue) = api.queue.queue.get() else {
            continue;
        };
        let streams = match queue.streams().await {
            Ok(streams) => streams,
            Err(error) => {
                tracing::debug!(%error, "async backlog: cannot list streams");
                continue;
            }
        };
        for stream in streams {
            match queue.backlog(&stream).await {
                Ok(backlog) => api
                    .metrics
                    .backlog
                    .with_label_values(&[stream.model(), stream.region()])
                    .set(i64::try_from(backlog.lag + backlog.pending).unwrap_or(i64::MAX)),
                Err(error) => {
                    tracing::debug!(%error, %stream, "async backlog: cannot read");
                }
            }
        }
    }
}
