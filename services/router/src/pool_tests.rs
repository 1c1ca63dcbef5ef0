//! Worker choice: membership from the registry, load balancing, outlier
//! passing-over, and the data-residency property.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::residency;

const REGIONS: [&str; 4] = ["me-central-1", "me-south-1", "eu-west-1", "us-east-1"];

fn worker_state(id: &str, region: &str, state: &str, capacity: u32) -> WorkerState {
    WorkerState {
        worker_id: id.to_owned(),
        address: format!("127.0.0.1:{}", 40_000 + id.len()),
        region: region.to_owned(),
        device: "cpu".to_owned(),
        capacity,
        formats: vec!["onnx".to_owned()],
        state: state.to_owned(),
        last_heartbeat_ms: 0,
    }
}

/// Marks every member healthy and serving `model` version 1, as a refresh
/// would.
fn serve(pool: &WorkerPool, model: &str) {
    for upstream in pool.upstreams().iter() {
        upstream.healthy.store(true, Ordering::Relaxed);
        upstream
            .models
            .write()
            .unwrap()
            .insert(model.to_owned(), BTreeSet::from(["1".to_owned()]));
    }
}

fn empty_pool() -> WorkerPool {
    WorkerPool::new(&[], Vec::new(), PoolSettings::default()).unwrap()
}

#[tokio::test]
async fn workers_join_and_leave_with_the_registry() {
    let pool = empty_pool();
    let changes = pool.apply_workers(
        &[
            worker_state("a", "me-central-1", "serving", 4),
            worker_state("bb", "me-south-1", "serving", 4),
        ],
        true,
    );
    assert_eq!(
        changes,
        vec![
            Membership::Joined("a".into()),
            Membership::Joined("bb".into())
        ]
    );
    assert_eq!(pool.upstreams().len(), 2);

    // Draining and lost workers leave at once; requests already holding
    // them keep their `Arc`.
    let held = pool.upstreams()[0].clone();
    let changes = pool.apply_workers(&[worker_state("a", "me-central-1", "draining", 4)], false);
    assert_eq!(
        changes,
        vec![Membership::Left {
            id: "a".into(),
            state: "draining".into()
        }]
    );
    assert_eq!(pool.upstreams().len(), 1);
    assert_eq!(held.meta.id, "a");

    // A new capacity updates the worker in place (same connections).
    pool.apply_workers(&[worker_state("bb", "me-south-1", "serving", 16)], false);
    assert_eq!(pool.upstreams()[0].meta.capacity, 16);

    // A snapshot without it removes it.
    let changes = pool.apply_workers(&[], true);
    assert_eq!(
        changes,
        vec![Membership::Left {
            id: "bb".into(),
            state: "gone".into()
        }]
    );
    assert!(pool.upstreams().is_empty());
}

#[tokio::test]
async fn configured_workers_take_the_registrys_region_and_can_be_withdrawn() {
    let pool = WorkerPool::new(
        &["127.0.0.1:40001".to_owned()],
        Vec::new(),
        PoolSettings::default(),
    )
    .unwrap();
    serve(&pool, "m");
    assert_eq!(pool.upstreams()[0].meta.region, "local");
    let mut state = worker_state("w1", "me-central-1", "serving", 8);
    state.address = "127.0.0.1:40001".to_owned();
    pool.apply_workers(std::slice::from_ref(&state), true);
    let members = pool.upstreams();
    assert_eq!(members.len(), 1, "matched by address, not added twice");
    assert_eq!(members[0].meta.region, "me-central-1");
    assert!(members[0].healthy(), "health carried over");

    state.state = "draining".to_owned();
    pool.apply_workers(&[state], false);
    assert_eq!(pool.upstreams().len(), 1, "configured workers stay listed");
    assert_eq!(
        pool.pick("m", "", &[], None).err().unwrap(),
        PickError::NoneHealthy,
        "but take no new requests while draining"
    );
}

#[tokio::test]
async fn least_loaded_by_capacity_and_ejected_workers_are_passed_over() {
    let pool = empty_pool();
    pool.apply_workers(
        &[
            worker_state("a", "r", "serving", 1),
            worker_state("bb", "r", "serving", 10),
        ],
        true,
    );
    serve(&pool, "m");
    let members = pool.upstreams();
    // Both hold 3 requests: relative to capacity, `bb` is far less loaded.
    members[0].inflight.store(3, Ordering::Relaxed);
    members[1].inflight.store(3, Ordering::Relaxed);
    for _ in 0..50 {
        assert_eq!(pool.pick("m", "", &[], None).unwrap().meta.id, "bb");
    }
    // An ejected worker is passed over while another candidate remains...
    let settings = OutlierSettings::default();
    for _ in 0..settings.consecutive_failures {
        members[1].outlier.record_failure(&settings, now_ms());
    }
    for _ in 0..50 {
        assert_eq!(pool.pick("m", "", &[], None).unwrap().meta.id, "a");
    }
    // ...but used when it is the only one left.
    let only = pool.pick("m", "", std::slice::from_ref(&members[0]), None);
    assert_eq!(only.unwrap().meta.id, "bb");
}

#[tokio::test]
async fn a_slow_worker_is_ejected_by_latency() {
    let pool = empty_pool();
    pool.apply_workers(
        &[
            worker_state("fast", "r", "serving", 1),
            worker_state("slow", "r", "serving", 1),
            worker_state("x", "r", "serving", 1),
        ],
        true,
    );
    let members = pool.upstreams();
    for _ in 0..20 {
        members[0]
            .outlier
            .record_success("m", Duration::from_millis(2));
        members[1]
            .outlier
            .record_success("m", Duration::from_millis(20));
        members[2]
            .outlier
            .record_success("m", Duration::from_millis(3));
    }
    let now = now_ms();
    crate::outlier::detect(&members, &pool.settings().outlier, now);
    assert!(!members[0].outlier.ejected(now + 1));
    assert!(members[1].outlier.ejected(now + 1), "10x slower is ejected");
    assert!(
        !members[2].outlier.ejected(now + 1),
        "1.5x slower is within bounds"
    );
}

#[tokio::test]
async fn unknown_models_and_regions_without_workers_are_told_apart() {
    let pool = empty_pool();
    pool.apply_workers(&[worker_state("a", "me-central-1", "serving", 1)], true);
    serve(&pool, "m");
    assert_eq!(
        pool.pick("other", "", &[], None).err().unwrap(),
        PickError::UnknownModel
    );
    let policy = residency::combine(Some(BTreeSet::from(["eu-west-1".to_owned()])), None, None)
        .unwrap()
        .unwrap();
    assert_eq!(
        pool.pick("m", "", &[], Some(&policy)).err().unwrap(),
        PickError::NoneInRegion
    );
}

/// One worker of a generated topology.
#[derive(Clone, Debug)]
struct Generated {
    region: usize,
    healthy: bool,
    serves: bool,
    ejected: bool,
    inflight: usize,
}

fn worker() -> impl Strategy<Value = Generated> {
    (
        0..REGIONS.len(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0..20usize,
    )
        .prop_map(|(region, healthy, serves, ejected, inflight)| Generated {
            region,
            healthy,
            serves,
            ejected,
            inflight,
        })
}

fn region_set() -> impl Strategy<Value = Option<BTreeSet<String>>> {
    proptest::option::of(proptest::collection::btree_set(
        (0..REGIONS.len()).prop_map(|index| REGIONS[index].to_owned()),
        0..=REGIONS.len(),
    ))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Over random topologies and policies, every worker a request, its
    /// retries or its shadow copy can be sent to is in an allowed region;
    /// and a request is refused for residency only when no healthy worker
    /// serves the model in an allowed region.
    #[test]
    fn no_request_is_sent_outside_its_allowed_regions(
        workers in proptest::collection::vec(worker(), 0..8),
        requested in region_set(),
        tenant in region_set(),
        model in region_set(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _guard = runtime.enter();
        let pool = empty_pool();
        let states: Vec<WorkerState> = workers
            .iter()
            .enumerate()
            .map(|(index, worker)| {
                let mut state = worker_state(&format!("w{index}"), REGIONS[worker.region], "serving", 1 + index as u32);
                state.address = format!("127.0.0.1:{}", 41_000 + index);
                state
            })
            .collect();
        pool.apply_workers(&states, true);
        let members = pool.upstreams();
        let settings = OutlierSettings::default();
        for (upstream, generated) in members.iter().zip(&workers) {
            upstream.healthy.store(generated.healthy, Ordering::Relaxed);
            upstream.inflight.store(generated.inflight, Ordering::Relaxed);
            if generated.serves {
                upstream.models.write().unwrap().insert("m".to_owned(), BTreeSet::from(["1".to_owned()]));
            }
            if generated.ejected {
                for _ in 0..settings.consecutive_failures {
                    upstream.outlier.record_failure(&settings, now_ms());
                }
            }
        }
        let tenant_regions: Option<Vec<String>> = tenant.map(|set| set.into_iter().collect());
        let model_regions: Option<Vec<String>> = model.map(|set| set.into_iter().collect());
        let combined = residency::combine(
            requested.clone(),
            tenant_regions.as_deref().map(|regions| ("t", regions)),
            model_regions.as_deref().map(|regions| ("m", regions)),
        );
        // The allowed set is exactly the intersection of the non-empty policies.
        let mut expected: Option<BTreeSet<String>> = None;
        for set in [
            requested.clone(),
            tenant_regions.clone().filter(|r| !r.is_empty()).map(|r| r.into_iter().collect()),
            model_regions.clone().filter(|r| !r.is_empty()).map(|r| r.into_iter().collect()),
        ].into_iter().flatten() {
            expected = Some(match expected {
                None => set,
                Some(current) => current.intersection(&set).cloned().collect(),
            });
        }
        let policy = match combined {
            Err(status) => {
                prop_assert_eq!(status.code(), tonic::Code::FailedPrecondition);
                prop_assert!(expected.as_ref().is_some_and(BTreeSet::is_empty));
                return Ok(());
            }
            Ok(policy) => policy,
        };
        let allowed_by = |region: &str| match &expected {
            None => true,
            Some(set) => set.contains(region),
        };
        // First attempt, then retries excluding what was tried.
        let mut tried: Vec<Arc<Upstream>> = Vec::new();
        for _ in 0..4 {
            match pool.pick("m", "", &tried, policy.as_ref()) {
                Ok(upstream) => {
                    prop_assert!(allowed_by(&upstream.meta.region), "sent to {}", upstream.meta.region);
                    prop_assert!(upstream.healthy());
                    tried.push(upstream);
                }
                Err(PickError::NoneInRegion) => {
                    prop_assert!(!members.iter().any(|upstream| upstream.serves("m", "") && allowed_by(&upstream.meta.region)));
                    break;
                }
                Err(_) => break,
            }
        }
        if tried.is_empty() {
            prop_assert!(!members.iter().zip(&workers).any(|(upstream, generated)| {
                generated.serves && generated.healthy && allowed_by(&upstream.meta.region)
            }), "a request was refused although an allowed worker was available");
        }
    }
}
