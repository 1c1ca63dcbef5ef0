//! One test-suite, two backends: every case runs against SQLite and against
//! a real PostgreSQL server.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use shamal_proto::shamal::registry::v1::{ReportTrafficRequest, VersionTraffic};
use shamal_registry::ModelRegistry;
use shamal_registry::model::*;
use support::*;

/// Instantiates each case once per backend.
macro_rules! both_backends {
    ($($case:ident),+ $(,)?) => {
        $(mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = super::TestDb::sqlite().await;
                super::$case(db.open().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) = super::TestDb::postgres().await else { return };
                super::$case(db.open().await).await;
            }
        })+
    };
}

both_backends!(
    versions_are_numbered_and_keep_their_metadata,
    wrong_digests_and_unknown_artifacts_are_refused,
    pagination_walks_every_item_once,
    concurrent_rollout_writes_exactly_one_wins,
    rollout_lifecycle_and_history,
    rollouts_need_ready_versions,
    placements_drive_the_version_lifecycle,
    archive_is_refused_while_in_use,
    watch_changes_carry_the_routed_state,
    canary_breaking_its_error_guard_rail_is_rolled_back,
    canary_breaking_its_latency_guard_rail_is_rolled_back,
    healthy_canary_is_left_alone,
    workers_join_drain_leave_and_get_lost,
    residency_policies_are_validated_and_recorded,
    change_revisions_are_ordered_across_kinds,
    placement_policy_is_stored_validated_and_recorded,
    weighted_placement_is_planned_stored_and_published,
);

async fn versions_are_numbered_and_keep_their_metadata(registry: Arc<ModelRegistry>) {
    let first = push(&registry, "fraud", b"model one").await;
    let digest = sha256_hex(b"model two");
    registry
        .put_artifact(&digest, body(b"model two".to_vec()))
        .await
        .unwrap();
    let second = registry
        .register_version(
            "fraud",
            NewVersion {
                sha256: digest.clone(),
                format: "onnx".to_owned(),
                metadata: [("team".to_owned(), "risk".to_owned())].into(),
                lineage: Lineage {
                    training_run_id: Some("run-42".to_owned()),
                    dataset_digest: Some("sha256:abc".to_owned()),
                    source_commit: Some("deadbeef".to_owned()),
                },
                create_model: None,
            },
            "alice",
        )
        .await
        .unwrap();
    assert_eq!((first, second.version), (1, 2));
    let stored = registry.get_version("fraud", 2).await.unwrap();
    assert_eq!(stored, second);
    assert_eq!(stored.artifact.sha256, digest);
    assert_eq!(stored.artifact.size_bytes, 9);
    assert_eq!(stored.created_by, "alice");
    assert_eq!(stored.lifecycle, Lifecycle::Registered);
    assert_eq!(stored.lineage.training_run_id.as_deref(), Some("run-42"));
    assert_eq!(
        stored.metadata.get("team").map(String::as_str),
        Some("risk")
    );
    assert_eq!(registry.get_model("fraud").await.unwrap().latest_version, 2);
    // The first version became production; the second takes no traffic.
    let aliases = registry.list_aliases("fraud").await.unwrap();
    assert_eq!(aliases.len(), 1);
    assert_eq!(
        (aliases[0].alias.as_str(), aliases[0].version),
        ("production", 1)
    );
    let missing = registry.get_version("fraud", 3).await.unwrap_err();
    assert_eq!(missing.code(), "not_found");
    let unknown = registry.get_version("nope", 1).await.unwrap_err();
    assert_eq!(unknown.code(), "not_found");
    let duplicate = registry.create_model("fraud", "", "bob").await.unwrap_err();
    assert_eq!(duplicate.code(), "already_exists");
}

async fn wrong_digests_and_unknown_artifacts_are_refused(registry: Arc<ModelRegistry>) {
    let declared = sha256_hex(b"what the client claims");
    let error = registry
        .put_artifact(&declared, body(b"what it actually sent".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "digest_mismatch");
    // Nothing was stored, so registering it is refused too.
    let error = registry
        .register_version(
            "fraud",
            NewVersion {
                sha256: declared,
                format: "onnx".to_owned(),
                ..Default::default()
            },
            "alice",
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), "failed_precondition");
    assert_eq!(
        registry.get_model("fraud").await.unwrap_err().code(),
        "not_found"
    );
    let error = registry
        .register_version(
            "fraud",
            NewVersion {
                sha256: "xyz".to_owned(),
                format: "onnx".to_owned(),
                ..Default::default()
            },
            "alice",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&error, shamal_registry::error::RegistryError::InvalidArgument { field, .. } if field == "sha256")
    );
    let digest = sha256_hex(b"bytes");
    registry
        .put_artifact(&digest, body(b"bytes".to_vec()))
        .await
        .unwrap();
    let error = registry
        .register_version(
            "fraud",
            NewVersion {
                sha256: digest,
                format: "pickle".to_owned(),
                ..Default::default()
            },
            "alice",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&error, shamal_registry::error::RegistryError::InvalidArgument { field, .. } if field == "format")
    );
}

async fn pagination_walks_every_item_once(registry: Arc<ModelRegistry>) {
    for name in ["a", "b", "c", "d", "e"] {
        registry.create_model(name, "", "alice").await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = registry
            .list_models(Some(2), token.as_deref())
            .await
            .unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.into_iter().map(|model| model.name));
        match page.next_page_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, ["a", "b", "c", "d", "e"]);
    for _ in 0..3 {
        push(&registry, "a", uuid::Uuid::new_v4().as_bytes()).await;
    }
    let page = registry.list_versions("a", Some(2), None).await.unwrap();
    assert_eq!(
        page.items.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1, 2]
    );
    let rest = registry
        .list_versions("a", Some(2), page.next_page_token.as_deref())
        .await
        .unwrap();
    assert_eq!(
        rest.items.iter().map(|v| v.version).collect::<Vec<_>>(),
        [3]
    );
    assert!(rest.next_page_token.is_none());
    let error = registry.list_models(Some(0), None).await.unwrap_err();
    assert_eq!(error.code(), "invalid_argument");
    let error = registry
        .list_models(None, Some("!!not a token"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_argument");
}

async fn ready_model(registry: &ModelRegistry, versions: usize) {
    for index in 0..versions {
        let version = push(registry, "fraud", format!("weights {index}").as_bytes()).await;
        mark_ready(registry, "fraud", version).await;
    }
    registry
        .set_alias("fraud", "production", 1, "alice")
        .await
        .unwrap();
}

fn start(candidate: u64, weight: u32) -> StartRollout {
    StartRollout {
        expected_revision: 0,
        candidate,
        weight,
        ..Default::default()
    }
}

async fn concurrent_rollout_writes_exactly_one_wins(registry: Arc<ModelRegistry>) {
    ready_model(&registry, 2).await;
    let rollout = registry
        .start_rollout("fraud", start(2, 5), "alice")
        .await
        .unwrap();
    assert_eq!(rollout.revision, 1);
    let writers = (0..8u32).map(|index| {
        let registry = registry.clone();
        tokio::spawn(async move {
            registry
                .shift("fraud", 1, 10 + index, &format!("writer-{index}"))
                .await
        })
    });
    let results = futures::future::join_all(writers).await;
    let mut winners = 0;
    for result in results {
        match result.unwrap() {
            Ok(rollout) => {
                winners += 1;
                assert_eq!(rollout.revision, 2);
            }
            Err(error) => {
                assert_eq!(error.code(), "conflict", "{error}");
                assert!(error.to_string().contains("revision 2"), "{error}");
            }
        }
    }
    assert_eq!(winners, 1);
    let history = registry.history("fraud", None, None).await.unwrap();
    assert_eq!(history.items.len(), 2, "the losers left no trace");
}

async fn rollout_lifecycle_and_history(registry: Arc<ModelRegistry>) {
    ready_model(&registry, 2).await;
    let mut request = start(2, 5);
    request.sticky_key = Some("user".to_owned());
    request.shadow = None;
    let rollout = registry
        .start_rollout("fraud", request, "alice")
        .await
        .unwrap();
    assert_eq!(rollout.stable_version, 1, "stable defaults to production");
    assert_eq!(
        rollout.splits,
        [
            Split {
                version: 2,
                weight: 5
            },
            Split {
                version: 1,
                weight: 95
            }
        ]
    );
    let again = registry
        .start_rollout("fraud", start(2, 5), "bob")
        .await
        .unwrap_err();
    assert_eq!(again.code(), "conflict", "stale revision 0");
    let mut second = start(2, 5);
    second.expected_revision = 1;
    let in_progress = registry
        .start_rollout("fraud", second, "bob")
        .await
        .unwrap_err();
    assert_eq!(in_progress.code(), "failed_precondition");

    let shifted = registry.shift("fraud", 1, 50, "alice").await.unwrap();
    assert_eq!(
        shifted.splits[0],
        Split {
            version: 2,
            weight: 50
        }
    );
    let paused = registry.pause("fraud", 2, "bob").await.unwrap();
    assert_eq!(
        paused.effective_splits(),
        [Split {
            version: 1,
            weight: 100
        }]
    );
    let resumed = registry.resume("fraud", 3, "bob").await.unwrap();
    assert_eq!(resumed.effective_splits(), shifted.splits);
    let promoted = registry.promote("fraud", 4, "carol").await.unwrap();
    assert_eq!(promoted.state, RolloutState::Promoted);
    assert_eq!(
        promoted.effective_splits(),
        [Split {
            version: 2,
            weight: 100
        }]
    );
    let aliases = registry.list_aliases("fraud").await.unwrap();
    assert_eq!(aliases[0].alias, "production");
    assert_eq!(aliases[0].version, 2);
    assert_eq!(aliases[0].updated_by, "carol");

    // A new rollout back to version 1, then rolled back.
    let mut back = start(1, 20);
    back.expected_revision = 5;
    let rollout = registry.start_rollout("fraud", back, "dave").await.unwrap();
    assert_eq!(rollout.stable_version, 2);
    let rolled_back = registry
        .rollback("fraud", 6, "too slow", "dave")
        .await
        .unwrap();
    assert_eq!(
        rolled_back.effective_splits(),
        [Split {
            version: 2,
            weight: 100
        }]
    );
    assert_eq!(rolled_back.reason, "too slow");
    let history = registry.history("fraud", None, None).await.unwrap();
    let actions: Vec<(&str, &str, u64)> = history
        .items
        .iter()
        .map(|entry| (entry.action.as_str(), entry.actor.as_str(), entry.revision))
        .collect();
    assert_eq!(
        actions,
        [
            ("start", "alice", 1),
            ("shift", "alice", 2),
            ("pause", "bob", 3),
            ("resume", "bob", 4),
            ("promote", "carol", 5),
            ("start", "dave", 6),
            ("rollback", "dave", 7),
        ]
    );
    let status = registry.rollout_status("fraud").await.unwrap();
    assert_eq!(status.rollout.revision, 7);
}

async fn rollouts_need_ready_versions(registry: Arc<ModelRegistry>) {
    ready_model(&registry, 1).await;
    let pending = push(&registry, "fraud", b"not loaded yet").await;
    let error = registry
        .start_rollout("fraud", start(pending, 10), "alice")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "failed_precondition");
    assert!(
        error.to_string().contains("no worker has loaded it"),
        "{error}"
    );
    let error = registry
        .start_rollout("fraud", start(99, 10), "alice")
        .await
        .unwrap_err();
    assert!(
        matches!(&error, shamal_registry::error::RegistryError::InvalidArgument { field, .. } if field == "candidate"),
        "{error}"
    );
    let error = registry
        .start_rollout("fraud", start(1, 101), "alice")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_argument");
    let error = registry
        .set_policy(
            "fraud",
            SetPolicy {
                expected_revision: 0,
                stable: 1,
                splits: vec![Split {
                    version: 1,
                    weight: 60,
                }],
                ..Default::default()
            },
            "alice",
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("sum to 100"), "{error}");
    // Weights whose sum overflows u32 are refused, not a panic.
    let error = registry
        .set_policy(
            "fraud",
            SetPolicy {
                expected_revision: 0,
                stable: 1,
                splits: vec![
                    Split {
                        version: 1,
                        weight: u32::MAX,
                    },
                    Split {
                        version: 2,
                        weight: 101,
                    },
                ],
                ..Default::default()
            },
            "alice",
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_argument");
    assert!(
        error
            .to_string()
            .contains(&format!("not {}", u64::from(u32::MAX) + 101)),
        "{error}"
    );
}

async fn placements_drive_the_version_lifecycle(registry: Arc<ModelRegistry>) {
    let version = push(&registry, "fraud", b"weights").await;
    for id in ["w1", "w2"] {
        registry
            .register_worker(WorkerInfo {
                id: id.to_owned(),
                address: format!("{id}:8001"),
                region: "uae-north".to_owned(),
                formats: vec!["onnx".to_owned()],
                device: "cpu".to_owned(),
                last_seen: 0,
            })
            .await
            .unwrap();
    }
    registry
        .report_placement("w1", "fraud", version, "failed", "bad graph", "")
        .await
        .unwrap();
    let failed = registry.get_version("fraud", version).await.unwrap();
    assert_eq!(failed.lifecycle, Lifecycle::Failed);
    assert_eq!(failed.reason, "bad graph");
    registry
        .report_placement(
            "w2",
            "fraud",
            version,
            "ready",
            "",
            r#"{"inputs":[{"name":"x","datatype":"FP32","dims":[-1,4]}]}"#,
        )
        .await
        .unwrap();
    let ready = registry.get_version("fraud", version).await.unwrap();
    assert_eq!(ready.lifecycle, Lifecycle::Ready);
    assert_eq!(ready.signature.unwrap()["inputs"][0]["name"], "x");
    let placements = registry.list_placements("fraud").await.unwrap();
    assert_eq!(placements.len(), 2);
    // A failed version can be retried: back to registered, failures forgotten.
    let other = push(&registry, "fraud", b"other weights").await;
    registry
        .report_placement("w1", "fraud", other, "failed", "out of memory", "")
        .await
        .unwrap();
    assert_eq!(
        registry
            .get_version("fraud", other)
            .await
            .unwrap()
            .lifecycle,
        Lifecycle::Failed
    );
    let retried = registry
        .retry_version("fraud", other, "alice")
        .await
        .unwrap();
    assert_eq!(retried.lifecycle, Lifecycle::Registered);
    assert_eq!(retried.reason, "");
    assert!(
        registry
            .list_placements("fraud")
            .await
            .unwrap()
            .iter()
            .all(|placement| placement.version != other)
    );
    let error = registry
        .retry_version("fraud", version, "alice")
        .await
        .unwrap_err();
    assert_eq!(
        error.code(),
        "failed_precondition",
        "a ready version is not retried"
    );
    let error = registry
        .report_placement("ghost", "fraud", version, "ready", "", "")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "failed_precondition");
    let error = registry
        .report_placement("w1", "fraud", version, "exploded", "", "")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_argument");
}

async fn archive_is_refused_while_in_use(registry: Arc<ModelRegistry>) {
    ready_model(&registry, 2).await;
    let error = registry
        .archive_version("fraud", 1, "alice")
        .await
        .unwrap_err();
    assert!(error.to_string().contains("production"), "{error}");
    registry
        .start_rollout("fraud", start(2, 10), "alice")
        .await
        .unwrap();
    let error = registry
        .archive_version("fraud", 2, "alice")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "failed_precondition");
    registry.rollback("fraud", 1, "", "alice").await.unwrap();
    let archived = registry.archive_version("fraud", 2, "alice").await.unwrap();
    assert_eq!(archived.lifecycle, Lifecycle::Archived);
    let error = registry
        .set_alias("fraud", "candidate", 2, "alice")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "failed_precondition");
}

async fn watch_changes_carry_the_routed_state(registry: Arc<ModelRegistry>) {
    let before = registry.current_revision().await.unwrap();
    let notified = registry.subscribe();
    ready_model(&registry, 2).await;
    assert!(notified.has_changed().unwrap());
    let (changed, latest) = registry.changes_since(before).await.unwrap();
    assert_eq!(changed, ["fraud"]);
    assert!(latest > before);
    registry
        .start_rollout("fraud", start(2, 25), "alice")
        .await
        .unwrap();
    let (changed, newest) = registry.changes_since(latest).await.unwrap();
    assert_eq!(changed, ["fraud"]);
    assert_eq!(newest, latest + 1);
    let state = registry.model_state("fraud").await.unwrap().unwrap();
    assert_eq!(state.aliases.get("production"), Some(&1));
    let rollout = state.rollout.unwrap();
    assert_eq!(rollout.state, "active");
    assert_eq!(rollout.splits.len(), 2);
    assert_eq!(rollout.splits[0].version, 2);
    assert_eq!(rollout.splits[0].weight, 25);
    assert_eq!(state.versions.len(), 2);
    assert!(
        state
            .versions
            .iter()
            .all(|version| version.lifecycle == "ready")
    );
    assert_eq!(state.placements.len(), 2);
    assert_eq!(state.placements[0].address, "127.0.0.1:1");
    assert!(registry.model_state("nope").await.unwrap().is_none());
}

fn traffic(version: u64, revision: u64, requests: u64, errors: u64, micros: u64) -> VersionTraffic {
    let mut buckets = vec![0; shamal_registry_client::latency_bucket_count()];
    buckets[shamal_registry_client::latency_bucket(micros)] = requests;
    VersionTraffic {
        model: "fraud".to_owned(),
        version,
        rollout_revision: revision,
        role: "primary".to_owned(),
        requests,
        errors,
        latency_buckets: buckets,
    }
}

fn guarded(candidate: u64) -> StartRollout {
    StartRollout {
        expected_revision: 0,
        candidate,
        weight: 10,
        guard_rails: GuardRails {
            max_error_rate: Some(0.05),
            max_p99_ratio: Some(2.0),
            min_requests: Some(50),
        },
        ..Default::default()
    }
}

async fn canary_breaking_its_error_guard_rail_is_rolled_back(registry: Arc<ModelRegistry>) {
    ready_model(&registry, 2).await;
    registry
        .start_rollout("fraud", guarded(2), "alice")
        .await
        .unwrap();
    // Too few requests to judge yet.
    let early = ReportTrafficRequest {
        router_id: "r1".to_owned(),
        traffic: vec![traffic(2, 1, 20, 20, 1_000), traffic(1, 1, 180, 0, 1_000)],
    };
    assert!(registry.report_traffic(&early).await.unwrap().is_empty());
    let late = ReportTrafficRequest {
        router_id: "r2".to_owned(),
        traffic: vec![traffic(2, 1, 40, 4, 1_000), traffic(1, 1, 360, 0, 1_000)],
    };
    assert_eq!(registry.report_traffic(&late).await.unwrap(), ["fraud"]);
    let status = registry.rollout_status("fraud").await.unwrap();
    assert_eq!(status.rollout.state, RolloutState::RolledBack);
    assert_eq!(status.rollout.updated_by, "canary-analysis");
    assert!(
        status.rollout.reason.contains("error rate"),
        "{}",
        status.rollout.reason
    );
    let history = registry.history("fraud", None, None).await.unwrap();
    assert_eq!(history.items.last().unwrap().action, "auto_rollback");
}

async fn canary_breaking_its_latency_guard_rail_is_rolled_back(registry: Arc<ModelRegistry>) {
    ready_model(&registry, 2).await;
    registry
        .start_rollout("fraud", guarded(2), "alice")
        .await
        .unwrap();
    let report = ReportTrafficRequest {
        router_id: "r1".to_owned(),
        traffic: vec![traffic(2, 1, 100, 0, 10_000), traffic(1, 1, 900, 0, 1_000)],
    };
    assert_eq!(registry.report_traffic(&report).await.unwrap(), ["fraud"]);
    let rollout = registry.get_rollout("fraud").await.unwrap().unwrap();
    assert_eq!(rollout.state, RolloutState::RolledBack);
    assert!(rollout.reason.contains("p99"), "{}", rollout.reason);
}

async fn healthy_canary_is_left_alone(registry: Arc<ModelRegistry>) {
    ready_model(&registry, 2).await;
    registry
        .start_rollout("fraud", guarded(2), "alice")
        .await
        .unwrap();
    let report = ReportTrafficRequest {
        router_id: "r1".to_owned(),
        traffic: vec![traffic(2, 1, 100, 1, 1_200), traffic(1, 1, 900, 9, 1_000)],
    };
    assert!(registry.report_traffic(&report).await.unwrap().is_empty());
    // Traffic of an older revision is not judged against the new one.
    let stale = ReportTrafficRequest {
        router_id: "r1".to_owned(),
        traffic: vec![traffic(2, 0, 500, 500, 1_000)],
    };
    assert!(registry.report_traffic(&stale).await.unwrap().is_empty());
    let status = registry.rollout_status("fraud").await.unwrap();
    assert_eq!(status.rollout.state, RolloutState::Active);
    let canary = status
        .analysis
        .iter()
        .find(|entry| entry.version == 2)
        .unwrap();
    assert_eq!(canary.requests, 100);
    assert_eq!(canary.errors, 1);
}

fn worker(id: &str, region: &str) -> WorkerInfo {
    WorkerInfo {
        id: id.to_owned(),
        address: format!("{id}:8101"),
        region: region.to_owned(),
        formats: vec!["onnx".to_owned()],
        device: "cpu".to_owned(),
        last_seen: 0,
    }
}

async fn state_of(registry: &ModelRegistry, id: &str) -> Option<MemberState> {
    registry
        .get_worker(id)
        .await
        .unwrap()
        .map(|worker| worker.state)
}

async fn workers_join_drain_leave_and_get_lost(registry: Arc<ModelRegistry>) {
    let lease = registry.membership().lease;
    let start = registry.current_revision().await.unwrap();
    let joined = registry
        .register_member(worker("w1", "eu-west"), 8)
        .await
        .unwrap();
    assert_eq!((joined.state, joined.capacity), (MemberState::Serving, 8));
    let changes = registry.change_set_since(start).await.unwrap();
    assert_eq!(changes.workers, ["w1"]);
    assert!(changes.models.is_empty() && !changes.tenant_policies);
    assert_eq!(changes.latest, start + 1);
    // Registering again with the same details is no change; new details are.
    registry
        .register_member(worker("w1", "eu-west"), 8)
        .await
        .unwrap();
    assert_eq!(registry.current_revision().await.unwrap(), start + 1);
    registry
        .register_member(worker("w1", "eu-west"), 0)
        .await
        .unwrap();
    assert_eq!(registry.current_revision().await.unwrap(), start + 2);
    let listed = registry.list_workers().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].capacity, 1, "0 means 1");
    assert_eq!(listed[0].region, "eu-west");
    // A region that no residency policy or request could name is refused,
    // naming the field; nothing is recorded.
    for bad in ["", "uae north", "-east"] {
        let refused = registry
            .register_member(worker("w2", bad), 1)
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("region"), "'{bad}': {refused}");
    }
    assert_eq!(registry.current_revision().await.unwrap(), start + 2);
    assert_eq!(registry.list_workers().await.unwrap().len(), 1);

    // Heartbeats: known workers only; the load is kept.
    assert!(registry.heartbeat("w1", 3, 5).await.unwrap());
    assert!(!registry.heartbeat("ghost", 0, 0).await.unwrap());
    let status = registry.get_worker("w1").await.unwrap().unwrap();
    assert_eq!((status.inflight, status.queue_depth), (3, 5));
    assert!(status.last_heartbeat > 0);

    // Within its lease nothing happens; past it, lost (a change).
    assert!(
        registry
            .sweep_at(std::time::Instant::now() + lease / 2)
            .await
            .unwrap()
            .is_empty()
    );
    let before_loss = registry.current_revision().await.unwrap();
    let lost = registry
        .sweep_at(std::time::Instant::now() + lease * 2)
        .await
        .unwrap();
    assert_eq!(lost, ["w1"]);
    let status = registry.get_worker("w1").await.unwrap().unwrap();
    assert_eq!(status.state, MemberState::Lost);
    assert!(status.state_reason.contains("no heartbeat"), "{status:?}");
    let changes = registry.change_set_since(before_loss).await.unwrap();
    assert_eq!(changes.workers, ["w1"]);
    assert!(
        registry
            .sweep_at(std::time::Instant::now() + lease * 3)
            .await
            .unwrap()
            .is_empty(),
        "lost once"
    );
    // A lost worker is told to register again, and comes back.
    assert!(!registry.heartbeat("w1", 0, 0).await.unwrap());
    registry
        .register_member(worker("w1", "eu-west"), 8)
        .await
        .unwrap();
    assert_eq!(state_of(&registry, "w1").await, Some(MemberState::Serving));
    assert!(registry.heartbeat("w1", 0, 0).await.unwrap());

    // It holds a version; then drains (still known, still heartbeating).
    let version = push(&registry, "fraud", b"weights").await;
    registry
        .report_placement("w1", "fraud", version, "ready", "", "")
        .await
        .unwrap();
    let draining = registry
        .deregister_worker("w1", false, "SIGTERM")
        .await
        .unwrap();
    assert_eq!(draining.state, MemberState::Draining);
    assert_eq!(draining.state_reason, "SIGTERM");
    assert!(registry.heartbeat("w1", 1, 0).await.unwrap());
    let state = registry.model_state("fraud").await.unwrap().unwrap();
    assert_eq!(
        state.placements.len(),
        1,
        "a draining worker's placements stay"
    );
    // Draining twice changes nothing.
    let revision = registry.current_revision().await.unwrap();
    registry.deregister_worker("w1", false, "").await.unwrap();
    assert_eq!(registry.current_revision().await.unwrap(), revision);

    // Gone: placements removed (the model changes too), forgotten by the
    // list, refused as a reporter, told to register again.
    let gone = registry
        .deregister_worker("w1", true, "drained")
        .await
        .unwrap();
    assert_eq!(gone.state, MemberState::Gone);
    let changes = registry.change_set_since(revision).await.unwrap();
    assert_eq!(changes.workers, ["w1"]);
    assert_eq!(changes.models, ["fraud"]);
    let state = registry.model_state("fraud").await.unwrap().unwrap();
    assert!(state.placements.is_empty());
    assert!(registry.list_workers().await.unwrap().is_empty());
    assert_eq!(registry.list_workers_in(true).await.unwrap().len(), 1);
    assert!(registry.worker_states(None).await.unwrap().is_empty());
    let named = registry
        .worker_states(Some(&["w1".to_owned()]))
        .await
        .unwrap();
    assert_eq!(named[0].state, "gone");
    assert!(!registry.heartbeat("w1", 0, 0).await.unwrap());
    let error = registry
        .report_placement("w1", "fraud", version, "ready", "", "")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "failed_precondition");
    let error = registry
        .deregister_worker("w1", false, "")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "failed_precondition");
    let error = registry
        .deregister_worker("ghost", true, "")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "not_found");
    let error = registry
        .register_member(worker("has space", "eu-west"), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, shamal_registry::error::RegistryError::InvalidArgument { field, .. } if field == "worker_id")
    );
    // A gone worker may come back under the same id.
    registry
        .register_member(worker("w1", "eu-west"), 8)
        .await
        .unwrap();
    assert_eq!(state_of(&registry, "w1").await, Some(MemberState::Serving));
    let snapshot = registry.worker_states(None).await.unwrap();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(
        (
            snapshot[0].region.as_str(),
            snapshot[0].capacity,
            snapshot[0].state.as_str()
        ),
        ("eu-west", 8, "serving")
    );
}

async fn residency_policies_are_validated_and_recorded(registry: Arc<ModelRegistry>) {
    push(&registry, "fraud", b"weights").await;
    let before = registry.current_revision().await.unwrap();
    let unset = registry.get_model_residency("fraud").await.unwrap();
    assert!(unset.allowed_regions.is_empty() && unset.updated_by.is_empty());
    let set = registry
        .set_model_residency(
            "fraud",
            vec!["eu-west".to_owned(), "eu-central".to_owned()],
            "alice",
        )
        .await
        .unwrap();
    assert_eq!(set.updated_by, "alice");
    assert_eq!(registry.get_model_residency("fraud").await.unwrap(), set);
    let state = registry.model_state("fraud").await.unwrap().unwrap();
    assert_eq!(state.allowed_regions, ["eu-west", "eu-central"]);
    let changes = registry.change_set_since(before).await.unwrap();
    assert_eq!(changes.models, ["fraud"]);
    assert!(!changes.tenant_policies);

    for (regions, field) in [
        (vec!["eu-west", "eu west"], "allowed_regions[1]"),
        (vec!["eu-west", "eu-west"], "allowed_regions[1]"),
        (vec![""], "allowed_regions[0]"),
        (vec!["-eu"], "allowed_regions[0]"),
    ] {
        let regions = regions.into_iter().map(str::to_owned).collect();
        let error = registry
            .set_model_residency("fraud", regions, "alice")
            .await
            .unwrap_err();
        assert!(
            matches!(&error, shamal_registry::error::RegistryError::InvalidArgument { field: named, .. } if named == field),
            "{field}: {error}"
        );
    }
    let too_many = (0..65).map(|index| format!("r{index}")).collect();
    let error = registry
        .set_model_residency("fraud", too_many, "alice")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_argument");
    let long = vec!["r".repeat(65)];
    assert_eq!(
        registry
            .set_model_residency("fraud", long, "alice")
            .await
            .unwrap_err()
            .code(),
        "invalid_argument"
    );
    let error = registry
        .set_model_residency("nope", vec!["eu-west".to_owned()], "alice")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "not_found");
    // An empty list lifts the restriction.
    registry
        .set_model_residency("fraud", Vec::new(), "bob")
        .await
        .unwrap();
    assert!(
        registry
            .model_state("fraud")
            .await
            .unwrap()
            .unwrap()
            .allowed_regions
            .is_empty()
    );

    // Tenants.
    let revision = registry.current_revision().await.unwrap();
    registry
        .set_tenant_policy("acme", vec!["uae-north".to_owned()], "carol")
        .await
        .unwrap();
    registry
        .set_tenant_policy(
            "globex",
            vec!["eu-west".to_owned(), "us-east".to_owned()],
            "carol",
        )
        .await
        .unwrap();
    let replaced = registry
        .set_tenant_policy(
            "acme",
            vec!["uae-north".to_owned(), "uae-central".to_owned()],
            "dave",
        )
        .await
        .unwrap();
    assert_eq!(replaced.updated_by, "dave");
    let policies = registry.list_tenant_policies().await.unwrap();
    assert_eq!(
        policies
            .iter()
            .map(|policy| (policy.tenant.as_str(), policy.allowed_regions.len()))
            .collect::<Vec<_>>(),
        [("acme", 2), ("globex", 2)]
    );
    let changes = registry.change_set_since(revision).await.unwrap();
    assert!(changes.tenant_policies && changes.models.is_empty());
    assert_eq!(changes.latest, revision + 3);
    let proto = registry.tenant_policies_proto().await.unwrap();
    assert_eq!(proto.policies.len(), 2);
    assert_eq!(
        proto.policies[0].allowed_regions,
        ["uae-north", "uae-central"]
    );
    let error = registry
        .set_tenant_policy("acme", Vec::new(), "dave")
        .await
        .unwrap_err();
    assert!(
        matches!(&error, shamal_registry::error::RegistryError::InvalidArgument { field, .. } if field == "allowed_regions")
    );
    for bad in ["", "a b", ".hidden", &"t".repeat(129)] {
        let error = registry
            .set_tenant_policy(bad, vec!["eu-west".to_owned()], "dave")
            .await
            .unwrap_err();
        assert!(
            matches!(&error, shamal_registry::error::RegistryError::InvalidArgument { field, .. } if field == "tenant"),
            "{bad:?}: {error}"
        );
    }
    registry
        .delete_tenant_policy("globex", "erin")
        .await
        .unwrap();
    assert_eq!(
        registry
            .get_tenant_policy("globex")
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    assert_eq!(
        registry
            .delete_tenant_policy("globex", "erin")
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    assert_eq!(registry.list_tenant_policies().await.unwrap().len(), 1);

    // Every write is in the history, with its actor.
    let history = registry.residency_history(None, None).await.unwrap().items;
    let entries: Vec<(&str, &str, &str, Option<usize>)> = history
        .iter()
        .map(|change| {
            (
                change.scope.as_str(),
                change.subject.as_str(),
                change.actor.as_str(),
                change.allowed_regions.as_ref().map(Vec::len),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("model", "fraud", "alice", Some(2)),
            ("model", "fraud", "bob", Some(0)),
            ("tenant", "acme", "carol", Some(1)),
            ("tenant", "globex", "carol", Some(2)),
            ("tenant", "acme", "dave", Some(2)),
            ("tenant", "globex", "erin", None),
        ]
    );
    let page = registry.residency_history(Some(4), None).await.unwrap();
    assert_eq!(page.items.len(), 4);
    let rest = registry
        .residency_history(Some(4), page.next_page_token.as_deref())
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 2);
    assert!(rest.next_page_token.is_none());
}

async fn change_revisions_are_ordered_across_kinds(registry: Arc<ModelRegistry>) {
    push(&registry, "fraud", b"weights").await;
    let start = registry.current_revision().await.unwrap();
    // Writers of every kind at once: the revisions they produce are
    // contiguous, and each one is seen once by a reader resuming anywhere.
    let mut tasks = Vec::new();
    for index in 0..6 {
        let registry = registry.clone();
        tasks.push(tokio::spawn(async move {
            match index % 3 {
                0 => {
                    registry
                        .register_member(worker(&format!("w{index}"), "eu-west"), 2)
                        .await
                        .unwrap();
                }
                1 => {
                    registry
                        .set_tenant_policy(&format!("t{index}"), vec!["eu-west".to_owned()], "x")
                        .await
                        .unwrap();
                }
                _ => {
                    registry
                        .set_model_residency("fraud", vec![format!("r{index}")], "x")
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let end = registry.current_revision().await.unwrap();
    assert_eq!(end, start + 6);
    let all = registry.change_set_since(start).await.unwrap();
    assert_eq!(all.workers, ["w0", "w3"]);
    assert_eq!(all.models, ["fraud"]);
    assert!(all.tenant_policies);
    assert_eq!(all.latest, end);
    let rows = sqlx::query(
        "SELECT revision, kind, model FROM changes WHERE revision > $1 ORDER BY revision",
    )
    .bind(start as i64)
    .fetch_all(&registry.store().pool)
    .await
    .unwrap();
    use sqlx::Row;
    let revisions: Vec<u64> = rows
        .iter()
        .map(|row| row.try_get::<i64, _>("revision").unwrap() as u64)
        .collect();
    assert_eq!(revisions, (start + 1..=end).collect::<Vec<_>>(), "no gaps");
    let mut kinds: Vec<String> = rows
        .iter()
        .map(|row| row.try_get::<String, _>("kind").unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["model", "model", "tenants", "tenants", "worker", "worker"]
    );
    // A reader resuming just before any revision gets that change.
    for row in &rows {
        let revision = row.try_get::<i64, _>("revision").unwrap() as u64;
        let subject: String = row.try_get("model").unwrap();
        let resumed = registry.change_set_since(revision - 1).await.unwrap();
        assert_eq!(resumed.latest, end);
        match row.try_get::<String, _>("kind").unwrap().as_str() {
            "worker" => assert!(resumed.workers.contains(&subject)),
            "tenants" => assert!(resumed.tenant_policies),
            _ => assert!(resumed.models.contains(&subject)),
        }
    }
    let nothing = registry.change_set_since(end).await.unwrap();
    assert_eq!(nothing.latest, end);
    assert!(nothing.models.is_empty() && nothing.workers.is_empty() && !nothing.tenant_policies);
}

fn placement(mode: PlacementMode, min_replicas: Option<u32>) -> SetPlacement {
    SetPlacement { mode, min_replicas }
}

async fn placement_policy_is_stored_validated_and_recorded(registry: Arc<ModelRegistry>) {
    push(&registry, "fraud", b"weights").await;
    let policy = registry.get_placement_policy("fraud").await.unwrap();
    assert_eq!(
        (policy.mode, policy.min_replicas, policy.updated_by.as_str()),
        (PlacementMode::All, 1, "")
    );
    let state = registry.model_state("fraud").await.unwrap().unwrap();
    let published = state.placement_policy.unwrap();
    assert_eq!(
        (published.mode.as_str(), published.min_replicas),
        ("all", 1)
    );

    let before = registry.current_revision().await.unwrap();
    let set = registry
        .set_placement_policy(
            "fraud",
            placement(PlacementMode::Weighted, Some(2)),
            "alice",
        )
        .await
        .unwrap();
    assert_eq!(
        (set.policy.mode, set.policy.min_replicas),
        (PlacementMode::Weighted, 2)
    );
    assert_eq!(set.policy.updated_by, "alice");
    assert!(set.policy.updated_at > 0);
    assert_eq!(
        registry.get_placement_policy("fraud").await.unwrap(),
        set.policy
    );
    // One change of kind `placement`, which Watch sends as the model's.
    let changes = registry.change_set_since(before).await.unwrap();
    assert_eq!(changes.models, ["fraud"]);
    assert_eq!(changes.latest, before + 1);
    use sqlx::Row;
    let row = sqlx::query("SELECT kind, model FROM changes WHERE revision = $1")
        .bind(changes.latest as i64)
        .fetch_one(&registry.store().pool)
        .await
        .unwrap();
    assert_eq!(row.try_get::<String, _>("kind").unwrap(), "placement");
    assert_eq!(row.try_get::<String, _>("model").unwrap(), "fraud");
    let state = registry.model_state("fraud").await.unwrap().unwrap();
    let published = state.placement_policy.unwrap();
    assert_eq!(
        (published.mode.as_str(), published.min_replicas),
        ("weighted", 2)
    );
    // min_replicas defaults to 1.
    let set = registry
        .set_placement_policy("fraud", placement(PlacementMode::Weighted, None), "bob")
        .await
        .unwrap();
    assert_eq!(set.policy.min_replicas, 1);

    // Refused: nothing changes.
    let revision = registry.current_revision().await.unwrap();
    for bad in [0, 65] {
        let error = registry
            .set_placement_policy("fraud", placement(PlacementMode::Weighted, Some(bad)), "x")
            .await
            .unwrap_err();
        assert!(
            matches!(&error, shamal_registry::error::RegistryError::InvalidArgument { field, .. } if field == "min_replicas"),
            "{error:?}"
        );
    }
    let error = registry
        .set_placement_policy("nope", placement(PlacementMode::All, None), "x")
        .await
        .unwrap_err();
    assert_eq!(error.code(), "not_found");
    assert_eq!(
        registry
            .get_placement_policy("nope")
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    assert_eq!(
        registry.placement("nope").await.unwrap_err().code(),
        "not_found"
    );
    assert_eq!(registry.current_revision().await.unwrap(), revision);
    assert_eq!(
        registry
            .get_placement_policy("fraud")
            .await
            .unwrap()
            .updated_by,
        "bob"
    );
}

/// The workers `version` is published with.
async fn assigned_workers(registry: &ModelRegistry, version: u64) -> Vec<String> {
    registry
        .model_state("fraud")
        .await
        .unwrap()
        .unwrap()
        .versions
        .into_iter()
        .find(|state| state.version == version)
        .unwrap()
        .assigned_workers
}

/// Every worker assigned a version reports it ready (what workers do once
/// they have loaded what Watch told them).
async fn load_assigned(registry: &ModelRegistry) {
    for version in registry.placement("fraud").await.unwrap().versions {
        for worker in version.workers {
            if !version.ready.contains(&worker) {
                registry
                    .report_placement(&worker, "fraud", version.version, "ready", "", "")
                    .await
                    .unwrap();
            }
        }
    }
}

async fn weighted_placement_is_planned_stored_and_published(registry: Arc<ModelRegistry>) {
    for id in ["w1", "w2", "w3"] {
        registry
            .register_member(worker(id, "local"), 8)
            .await
            .unwrap();
    }
    for index in 1..=3 {
        push(&registry, "fraud", format!("weights {index}").as_bytes()).await;
    }
    // Mode `all`: nothing assigned, every worker holds every version.
    assert!(assigned_workers(&registry, 1).await.is_empty());
    let view = registry.placement("fraud").await.unwrap();
    assert_eq!(view.versions.len(), 3);
    assert_eq!(view.versions[0].workers, ["w1", "w2", "w3"]);

    // Weighted, planned at once: version 1 (production) takes all traffic
    // and every worker; versions 2 and 3 take none and get one each.
    let view = registry
        .set_placement_policy("fraud", placement(PlacementMode::Weighted, None), "alice")
        .await
        .unwrap();
    let weights: Vec<f64> = view.versions.iter().map(|version| version.weight).collect();
    assert_eq!(weights, [100.0, 0.0, 0.0]);
    assert_eq!(view.versions[0].workers, ["w1", "w2", "w3"]);
    assert_eq!(view.versions[1].workers.len(), 1);
    assert_eq!(view.versions[2].workers.len(), 1);
    assert_eq!(assigned_workers(&registry, 1).await, ["w1", "w2", "w3"]);
    assert_eq!(
        assigned_workers(&registry, 2).await,
        view.versions[1].workers
    );
    // A version registered now is planned in the same change.
    let fourth = push(&registry, "fraud", b"weights 4").await;
    assert_eq!(assigned_workers(&registry, fourth).await.len(), 1);
    registry
        .archive_version("fraud", fourth, "alice")
        .await
        .unwrap();
    load_assigned(&registry).await;
    assert_eq!(registry.plan_placements().await.unwrap(), None);
    assert!(assigned_workers(&registry, fourth).await.is_empty());

    // A three-way rollout: one worker each, once the moves are done.
    registry
        .set_policy(
            "fraud",
            SetPolicy {
                expected_revision: 0,
                stable: 1,
                splits: vec![
                    Split {
                        version: 1,
                        weight: 34,
                    },
                    Split {
                        version: 2,
                        weight: 33,
                    },
                    Split {
                        version: 3,
                        weight: 33,
                    },
                ],
                ..Default::default()
            },
            "alice",
        )
        .await
        .unwrap();
    let before = registry.current_revision().await.unwrap();
    registry.plan_placements().await.unwrap();
    assert_eq!(
        registry.change_set_since(before).await.unwrap().models,
        ["fraud"],
        "the new assignment is a change of the model"
    );
    let view = registry.placement("fraud").await.unwrap();
    let weights: Vec<f64> = view.versions.iter().map(|version| version.weight).collect();
    assert_eq!(weights, [34.0, 33.0, 33.0]);
    assert!(
        view.versions
            .iter()
            .all(|version| version.workers.len() == 1)
    );
    // New holders load, and the old ones keep their versions until the
    // new holders have had them ready for the grace period.
    load_assigned(&registry).await;
    let pending = registry.plan_placements().await.unwrap();
    let view = registry.placement("fraud").await.unwrap();
    if view
        .versions
        .iter()
        .any(|version| !version.releasing.is_empty())
    {
        let at = pending.expect("a pending release has a time to complete");
        assert!(at <= now_millis() + PLACEMENT_GRACE_MS as i64, "{at}");
    }
    tokio::time::sleep(std::time::Duration::from_millis(PLACEMENT_GRACE_MS + 50)).await;
    assert_eq!(registry.plan_placements().await.unwrap(), None);
    let view = registry.placement("fraud").await.unwrap();
    let mut holders = Vec::new();
    for version in &view.versions {
        assert!(version.releasing.is_empty(), "{view:?}");
        assert_eq!(version.workers, version.ready, "{view:?}");
        assert_eq!(
            assigned_workers(&registry, version.version).await,
            version.workers
        );
        holders.extend(version.workers.clone());
    }
    holders.sort();
    assert_eq!(holders, ["w1", "w2", "w3"], "one version per worker");

    // A draining worker's version moves to another worker at once.
    let leaving = view.versions[1].workers[0].clone();
    registry
        .deregister_worker(&leaving, false, "SIGTERM")
        .await
        .unwrap();
    registry.plan_placements().await.unwrap();
    let moved = assigned_workers(&registry, 2).await;
    assert_eq!(moved.len(), 1);
    assert_ne!(moved[0], leaving);

    // Back to `all`: nothing assigned, every serving worker holds all.
    registry
        .set_placement_policy("fraud", placement(PlacementMode::All, None), "alice")
        .await
        .unwrap();
    for version in 1..=3 {
        assert!(assigned_workers(&registry, version).await.is_empty());
    }
    let view = registry.placement("fraud").await.unwrap();
    assert_eq!(view.versions[0].workers.len(), 2);
    assert!(!view.versions[0].workers.contains(&leaving));
}
