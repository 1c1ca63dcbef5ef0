//! Worker membership: registration, heartbeats, leases and graceful drain.
//!
//! A worker registers (state `serving`), then heartbeats every
//! `heartbeat_interval`. Heartbeats are kept in memory only (the last one
//! is persisted at most every [`PERSIST_EVERY`]); a sweeper marks a serving
//! or draining worker whose lease passed without a heartbeat `lost`. A
//! worker leaving on purpose deregisters twice: `draining` (routers stop
//! sending it new requests), then `gone` once it has finished, which also
//! removes its placements. Every state change is a change-log record of kind
//! `worker`, so Watch subscribers hear of it.
//!
//! Liveness lives in this registry process: run one registry replica per
//! database (as for the canary analysis).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shamal_proto::shamal::registry::v1 as proto;
use sqlx::Row;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{RegistryError, Result};
use crate::model::*;
use crate::registry::{Change, ModelRegistry, audit_json, audit_json_opt};
use crate::store::*;

/// The last heartbeat is written to the database at most this often.
pub const PERSIST_EVERY: Duration = Duration::from_secs(5);

/// What the registry keeps in memory of a serving or draining worker.
#[derive(Clone, Debug)]
pub(crate) struct Member {
    pub last_heartbeat: Instant,
    pub last_heartbeat_ms: Millis,
    pub inflight: u32,
    pub queue_depth: u32,
    /// When `last_seen` was last written to the database.
    pub persisted_ms: Millis,
}

impl Member {
    fn fresh() -> Member {
        let now = now_millis();
        Member {
            last_heartbeat: Instant::now(),
            last_heartbeat_ms: now,
            inflight: 0,
            queue_depth: 0,
            persisted_ms: now,
        }
    }
}

/// Validates a worker id as registered: 1-128 printable ASCII characters.
fn validate_worker_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(RegistryError::invalid(
            "worker_id",
            "must be 1-128 printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

pub fn worker_state_to_proto(worker: &WorkerStatus) -> proto::WorkerState {
    proto::WorkerState {
        worker_id: worker.id.clone(),
        address: worker.address.clone(),
        region: worker.region.clone(),
        device: worker.device.clone(),
        capacity: worker.capacity,
        formats: worker.formats.clone(),
        state: worker.state.as_str().to_owned(),
        last_heartbeat_ms: u64::try_from(worker.last_heartbeat).unwrap_or(0),
    }
}

impl ModelRegistry {
    fn members(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Member>> {
        self.members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// At start-up: every serving or draining worker gets a fresh lease, so
    /// that workers have time to heartbeat a registry that restarted.
    pub(crate) async fn load_members(&self) -> Result<()> {
        let rows =
            sqlx::query("SELECT id FROM workers WHERE state = 'serving' OR state = 'draining'")
                .fetch_all(&self.store.pool)
                .await?;
        let mut members = self.members();
        for row in rows {
            members.insert(row.try_get("id")?, Member::fresh());
        }
        Ok(())
    }

    /// Registers a worker of capacity 1 (tests and tools; workers call
    /// [`ModelRegistry::register_member`] over gRPC with their capacity).
    pub async fn register_worker(&self, worker: WorkerInfo) -> Result<()> {
        self.register_member(worker, 1).await.map(|_| ())
    }

    /// A worker announces itself: it becomes `serving` (whatever it was
    /// before: a lost, draining or gone worker comes back) with a fresh
    /// lease. A change is recorded when its state or details changed.
    pub async fn register_member(&self, worker: WorkerInfo, capacity: u32) -> Result<WorkerStatus> {
        self.register_member_as(worker, capacity, "").await
    }

    /// [`ModelRegistry::register_member`] on behalf of `actor` (the
    /// caller's identity, for the audit trail's `worker.register`).
    pub async fn register_member_as(
        &self,
        worker: WorkerInfo,
        capacity: u32,
        actor: &str,
    ) -> Result<WorkerStatus> {
        validate_worker_id(&worker.id)?;
        if worker.address.is_empty() {
            return Err(RegistryError::invalid("address", "must not be empty"));
        }
        // A region no policy or request could name would make the worker
        // unreachable for every residency-bound request: refuse it here.
        crate::residency::validate_region("region", &worker.region)?;
        let capacity = capacity.max(1);
        self.admit()?;
        let _writes = self.member_writes.lock().await;
        let now = now_millis();
        let mut tx = self.store.begin_write().await?;
        let existing = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE id = $1"
        ))
        .bind(&worker.id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(worker_status_from_row)
        .transpose()?;
        let status = WorkerStatus {
            id: worker.id.clone(),
            address: worker.address.clone(),
            region: worker.region.clone(),
            formats: worker.formats.clone(),
            device: worker.device.clone(),
            capacity,
            state: MemberState::Serving,
            state_reason: String::new(),
            state_changed_at: match &existing {
                Some(existing) if existing.state == MemberState::Serving => {
                    existing.state_changed_at
                }
                _ => now,
            },
            last_heartbeat: now,
            inflight: 0,
            queue_depth: 0,
            registered_at: now,
        };
        let changed = existing.as_ref().is_none_or(|existing| {
            existing.state != MemberState::Serving
                || existing.address != status.address
                || existing.region != status.region
                || existing.formats != status.formats
                || existing.device != status.device
                || existing.capacity != status.capacity
        });
        sqlx::query("INSERT INTO workers (id, address, region, formats, device, last_seen, capacity, state, state_reason, state_changed_at, registered_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'serving', '', $8, $9) ON CONFLICT (id) DO UPDATE SET address = excluded.address, region = excluded.region, formats = excluded.formats, device = excluded.device, last_seen = excluded.last_seen, capacity = excluded.capacity, state = excluded.state, state_reason = excluded.state_reason, state_changed_at = excluded.state_changed_at, registered_at = excluded.registered_at")
            .bind(&status.id)
            .bind(&status.address)
            .bind(&status.region)
            .bind(json_text(&status.formats)?)
            .bind(&status.device)
            .bind(now)
            .bind(i64::from(capacity))
            .bind(status.state_changed_at)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let revision = if changed {
            Some(record_change_of(&mut tx, change_kind::WORKER, &status.id).await?)
        } else {
            None
        };
        tx.commit().await?;
        self.members().insert(status.id.clone(), Member::fresh());
        if let Some(revision) = revision {
            self.notify(revision);
        }
        tracing::info!(
            worker = %status.id,
            address = %status.address,
            region = %status.region,
            capacity,
            previous = existing.as_ref().map_or("new", |existing| existing.state.as_str()),
            "worker registered"
        );
        if changed {
            self.audit(Change {
                action: "worker.register",
                actor,
                worker: &status.id,
                region: &status.region,
                before: audit_json_opt(existing.as_ref()),
                after: audit_json(&status),
                ..Change::default()
            });
        }
        Ok(status)
    }

    /// A heartbeat: renews the worker's lease and records its load. False
    /// when the registry does not know the worker as serving or draining
    /// (unknown, lost or gone): it must register again.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        inflight: u32,
        queue_depth: u32,
    ) -> Result<bool> {
        let now_ms = now_millis();
        let persist = {
            let mut members = self.members();
            members.get_mut(worker_id).map(|member| {
                member.last_heartbeat = Instant::now();
                member.last_heartbeat_ms = now_ms;
                member.inflight = inflight;
                member.queue_depth = queue_depth;
                let due = now_ms - member.persisted_ms >= PERSIST_EVERY.as_millis() as i64;
                if due {
                    member.persisted_ms = now_ms;
                }
                due
            })
        };
        let persist = match persist {
            Some(persist) => persist,
            None => {
                // Not in memory: another registry process registered it, or
                // it was marked lost meanwhile. The database decides.
                let _writes = self.member_writes.lock().await;
                if self.members().contains_key(worker_id) {
                    return Ok(true);
                }
                let row = sqlx::query("SELECT state FROM workers WHERE id = $1")
                    .bind(worker_id)
                    .fetch_optional(&self.store.pool)
                    .await?;
                let state = row
                    .map(|row| row.try_get::<String, _>("state"))
                    .transpose()?
                    .and_then(|state| MemberState::parse(&state));
                match state {
                    Some(state) if state.leased() => {
                        let mut member = Member::fresh();
                        member.inflight = inflight;
                        member.queue_depth = queue_depth;
                        self.members().insert(worker_id.to_owned(), member);
                        true
                    }
                    _ => return Ok(false),
                }
            }
        };
        if persist {
            let written = sqlx::query("UPDATE workers SET last_seen = $1 WHERE id = $2")
                .bind(now_ms)
                .bind(worker_id)
                .execute(&self.store.pool)
                .await;
            if let Err(error) = written {
                tracing::warn!(worker = %worker_id, %error, "cannot persist the last heartbeat");
            }
        }
        Ok(true)
    }

    /// A worker leaving on purpose: `done` false marks it `draining` (it
    /// keeps heartbeating while it finishes what it holds), `done` true
    /// marks it `gone` and removes its placements.
    pub async fn deregister_worker(
        &self,
        worker_id: &str,
        done: bool,
        reason: &str,
    ) -> Result<WorkerStatus> {
        self.deregister_worker_as(worker_id, done, reason, "").await
    }

    /// [`ModelRegistry::deregister_worker`] on behalf of `actor` (for the
    /// audit trail's `worker.deregister`).
    pub async fn deregister_worker_as(
        &self,
        worker_id: &str,
        done: bool,
        reason: &str,
        actor: &str,
    ) -> Result<WorkerStatus> {
        validate_worker_id(worker_id)?;
        self.admit()?;
        let _writes = self.member_writes.lock().await;
        let now = now_millis();
        let mut tx = self.store.begin_write().await?;
        let current = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE id = $1"
        ))
        .bind(worker_id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(worker_status_from_row)
        .transpose()?
        .ok_or_else(|| {
            RegistryError::NotFound(format!("worker '{worker_id}' is not registered"))
        })?;
        let target = if done {
            MemberState::Gone
        } else {
            MemberState::Draining
        };
        if current.state == target {
            tx.rollback().await?;
            return Ok(self.overlay(current));
        }
        if current.state == MemberState::Gone {
            return Err(RegistryError::FailedPrecondition(format!(
                "worker '{worker_id}' is gone; it must register again"
            )));
        }
        let reason = if reason.trim().is_empty() {
            if done { "deregistered" } else { "draining" }.to_owned()
        } else {
            reason.trim().chars().take(512).collect()
        };
        sqlx::query("UPDATE workers SET state = $1, state_reason = $2, state_changed_at = $3, last_seen = $3 WHERE id = $4")
            .bind(target.as_str())
            .bind(&reason)
            .bind(now)
            .bind(worker_id)
            .execute(&mut *tx)
            .await?;
        let mut revision = record_change_of(&mut tx, change_kind::WORKER, worker_id).await?;
        if done {
            // A gone worker holds nothing: its placements go, and the
            // models they belonged to change.
            let models: BTreeSet<String> =
                sqlx::query("SELECT DISTINCT model FROM placements WHERE worker_id = $1")
                    .bind(worker_id)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|row| row.try_get::<String, _>("model"))
                    .collect::<std::result::Result<_, _>>()?;
            sqlx::query("DELETE FROM placements WHERE worker_id = $1")
                .bind(worker_id)
                .execute(&mut *tx)
                .await?;
            for model in &models {
                revision = record_change(&mut tx, model).await?;
            }
        }
        tx.commit().await?;
        {
            let mut members = self.members();
            if done {
                members.remove(worker_id);
            } else {
                members.insert(worker_id.to_owned(), Member::fresh());
            }
        }
        self.notify(revision);
        tracing::info!(worker = %worker_id, state = target.as_str(), %reason, "worker deregistering");
        let before = audit_json(&current);
        let mut status = current;
        status.state = target;
        status.state_reason = reason;
        status.state_changed_at = now;
        status.last_heartbeat = now;
        self.audit(Change {
            action: "worker.deregister",
            actor,
            worker: worker_id,
            region: &status.region,
            before,
            after: audit_json(&status),
            reason: &status.state_reason,
            ..Change::default()
        });
        Ok(self.overlay(status))
    }

    /// Marks `lost` every serving or draining worker whose lease has passed
    /// without a heartbeat; returns their ids.
    pub async fn sweep(&self) -> Result<Vec<String>> {
        self.sweep_at(Instant::now()).await
    }

    /// [`ModelRegistry::sweep`] as of `now` (tests pass a later instant).
    pub async fn sweep_at(&self, now: Instant) -> Result<Vec<String>> {
        let lease = self.membership.lease;
        {
            let members = self.members();
            if !members
                .values()
                .any(|member| now.saturating_duration_since(member.last_heartbeat) > lease)
            {
                return Ok(Vec::new());
            }
        }
        let _writes = self.member_writes.lock().await;
        // Taken out of memory first: a heartbeat arriving meanwhile finds
        // the worker unknown, waits for this sweep, and is told to register
        // again.
        let expired: Vec<(String, Member)> = {
            let mut members = self.members();
            let ids: Vec<String> = members
                .iter()
                .filter(|(_, member)| now.saturating_duration_since(member.last_heartbeat) > lease)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| members.remove(&id).map(|member| (id, member)))
                .collect()
        };
        let mut lost = Vec::new();
        let mut failed = None;
        for (id, member) in expired {
            if failed.is_some() {
                self.members().insert(id, member);
                continue;
            }
            let silent = now.saturating_duration_since(member.last_heartbeat);
            match self.mark_lost(&id, &member, silent).await {
                Ok(true) => {
                    tracing::warn!(worker = %id, silent_ms = silent.as_millis() as u64, lease_ms = lease.as_millis() as u64, "worker lost: lease expired without a heartbeat");
                    lost.push(id);
                }
                Ok(false) => {}
                Err(error) => {
                    // Try again at the next sweep.
                    self.members().insert(id, member);
                    failed = Some(error);
                }
            }
        }
        match failed {
            Some(error) => Err(error),
            None => Ok(lost),
        }
    }

    async fn mark_lost(&self, id: &str, member: &Member, silent: Duration) -> Result<bool> {
        let mut tx = self.store.begin_write().await?;
        // Read for the audit trail (a lease expiring is rare: not a hot path).
        let before = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(worker_status_from_row)
        .transpose()?;
        let reason = format!(
            "no heartbeat for {} ms (lease {} ms)",
            silent.as_millis(),
            self.membership.lease.as_millis()
        );
        let now = now_millis();
        let updated = sqlx::query("UPDATE workers SET state = 'lost', state_reason = $1, state_changed_at = $2, last_seen = $3 WHERE id = $4 AND (state = 'serving' OR state = 'draining')")
            .bind(&reason)
            .bind(now)
            .bind(member.last_heartbeat_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if updated.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        let revision = record_change_of(&mut tx, change_kind::WORKER, id).await?;
        tx.commit().await?;
        self.notify(revision);
        // The registry's own observation: recorded, never refused.
        let after = before.clone().map(|mut status| {
            status.state = MemberState::Lost;
            status.state_reason = reason.clone();
            status.state_changed_at = now;
            status.last_heartbeat = member.last_heartbeat_ms;
            status
        });
        self.audit(Change {
            action: "worker.state",
            actor: crate::registry::SYSTEM_ACTOR,
            worker: id,
            region: before.as_ref().map_or("", |status| status.region.as_str()),
            before: audit_json_opt(before.as_ref()),
            after: audit_json_opt(after.as_ref()),
            reason: &reason,
            ..Change::default()
        });
        Ok(true)
    }

    /// Sweeps every `lease / 10` (at most every 100 ms) until `stop` flips.
    pub fn spawn_sweeper(self: &Arc<Self>, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        let registry = self.clone();
        let every = (self.membership.lease / 10)
            .clamp(Duration::from_millis(10), Duration::from_millis(100));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failures = 0u64;
            loop {
                tokio::select! {
                    _ = stop.wait_for(|stopped| *stopped) => break,
                    _ = ticks.tick() => {}
                }
                match registry.sweep().await {
                    Ok(_) => failures = 0,
                    Err(error) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(100) {
                            tracing::warn!(%error, failures, "cannot sweep expired worker leases");
                        }
                    }
                }
            }
        })
    }

    /// Adds what only memory knows (last heartbeat, load) to a stored row.
    fn overlay(&self, mut status: WorkerStatus) -> WorkerStatus {
        if let Some(member) = self.members().get(&status.id)
            && status.state.leased()
        {
            status.last_heartbeat = status.last_heartbeat.max(member.last_heartbeat_ms);
            status.inflight = member.inflight;
            status.queue_depth = member.queue_depth;
        }
        status
    }

    /// Workers by id; `gone` ones only when asked for.
    pub async fn list_workers_in(&self, include_gone: bool) -> Result<Vec<WorkerStatus>> {
        let rows = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE state <> 'gone' OR $1 = 1 ORDER BY id"
        ))
        .bind(i64::from(include_gone))
        .fetch_all(&self.store.pool)
        .await?;
        rows.iter()
            .map(|row| worker_status_from_row(row).map(|status| self.overlay(status)))
            .collect()
    }

    /// Every worker that is not gone, by id.
    pub async fn list_workers(&self) -> Result<Vec<WorkerStatus>> {
        self.list_workers_in(false).await
    }

    pub async fn get_worker(&self, id: &str) -> Result<Option<WorkerStatus>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.store.pool)
        .await?;
        row.as_ref()
            .map(|row| worker_status_from_row(row).map(|status| self.overlay(status)))
            .transpose()
    }

    /// Watch's worker states: every worker that is not gone (`None`), or
    /// the named ones whatever their state.
    pub async fn worker_states(&self, ids: Option<&[String]>) -> Result<Vec<proto::WorkerState>> {
        let workers = match ids {
            None => self.list_workers_in(false).await?,
            Some(ids) => {
                let mut workers = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(worker) = self.get_worker(id).await? {
                        workers.push(worker);
                    }
                }
                workers
            }
        };
        Ok(workers.iter().map(worker_state_to_proto).collect())
    }
}
