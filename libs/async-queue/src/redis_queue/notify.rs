//! Result notifications: one pub/sub subscription per queue that wakes the
//! local waiters of finished jobs.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::{Client, RedisError};
use shamal_backoff::Backoff;

use crate::JobId;
use crate::wait::Waiters;

/// Forwards result notifications to local waiters, reconnecting forever;
/// after every (re)subscription all waiters re-check, so notifications
/// published while disconnected are not missed.
pub(super) async fn subscriber(
    client: Client,
    channel: String,
    waiters: Arc<Waiters>,
    timeout: Duration,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        let connected = tokio::time::timeout(timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(mut pubsub)) => {
                backoff.reset();
                waiters.notify_all();
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    if let Ok(id) = std::str::from_utf8(msg.get_payload_bytes())
                        .map_err(|_| ())
                        .and_then(|s| JobId::parse(s).map_err(|_| ()))
                    {
                        waiters.notify(&id);
                    }
                }
                tracing::debug!("async queue: result notifications disconnected");
                waiters.notify_all();
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "async queue: cannot subscribe"),
            Err(_) => tracing::debug!("async queue: subscribing timed out"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
