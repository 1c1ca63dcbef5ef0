//! Local registry of waiters, woken when a job's result is written.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::{JobId, JobStatus, Result};

#[derive(Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<JobId, watch::Sender<u64>>>,
}

pub(crate) struct WaitGuard<'a> {
    waiters: &'a Waiters,
    id: JobId,
    rx: watch::Receiver<u64>,
}

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, HashMap<JobId, watch::Sender<u64>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers interest in `id`: every notification sent after this call
    /// wakes the guard's next [`WaitGuard::changed`].
    pub(crate) fn register(&self, id: &JobId) -> WaitGuard<'_> {
        let mut map = self.lock();
        let rx = map
            .entry(id.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        WaitGuard {
            waiters: self,
            id: id.clone(),
            rx,
        }
    }

    pub(crate) fn notify(&self, id: &JobId) {
        if let Some(tx) = self.lock().get(id) {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Wakes every waiter (e.g. after a reconnection, when notifications may
    /// have been missed): each re-checks its job.
    pub(crate) fn notify_all(&self) {
        for tx in self.lock().values() {
            tx.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl WaitGuard<'_> {
    async fn changed(&mut self) {
        // An error means the sender is gone, which cannot happen while the
        // guard is registered; either way the caller re-checks.
        let _ = self.rx.changed().await;
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        // Our own receiver is still alive here.
        if map.get(&self.id).is_some_and(|tx| tx.receiver_count() <= 1) {
            map.remove(&self.id);
        }
    }
}

/// Waits for `id` to be done: registers first, then checks, then sleeps until
/// notified (or `recheck` passes), so a result written between the check and
/// the sleep is never missed.
pub(crate) async fn wait_for<F, Fut>(
    waiters: &Waiters,
    id: &JobId,
    timeout: Duration,
    recheck: Duration,
    status: F,
) -> Result<JobStatus>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<JobStatus>>,
{
    let deadline = Instant::now() + timeout;
    let mut guard = waiters.register(id);
    loop {
        let current = status().await?;
        if matches!(current, JobStatus::Done(_) | JobStatus::Unknown) {
            return Ok(current);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(current);
        }
        let nap = (deadline - now).min(recheck);
        let _ = tokio::time::timeout(nap, guard.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guards_clean_up_and_notifications_wake() {
        let w = Waiters::default();
        let id = JobId::generate();
        let mut a = w.register(&id);
        let b = w.register(&id);
        assert_eq!(w.len(), 1);
        w.notify(&id);
        tokio::time::timeout(Duration::from_secs(1), a.changed())
            .await
            .expect("woken");
        drop(b);
        assert_eq!(w.len(), 1);
        drop(a);
        assert_eq!(w.len(), 0);
        // Notifying nobody is fine.
        w.notify(&id);
        w.notify_all();
    }
}
