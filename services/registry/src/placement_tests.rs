//! The assignment of `weighted` models: shares, minimums, regions,
//! stability and make-before-break.
#![allow(clippy::unwrap_used)]

use super::*;

const GRACE: Millis = 3_000;

/// A model's placement problem that the tests move forward step by step.
struct Case {
    workers: Vec<Worker>,
    demands: Vec<Demand>,
    min_replicas: u32,
    allowed: Vec<String>,
    current: BTreeMap<Slot, Holding>,
    reports: BTreeMap<Slot, Report>,
    now: Millis,
}

fn worker(id: &str, region: &str) -> Worker {
    Worker {
        id: id.to_owned(),
        region: region.to_owned(),
        formats: vec!["onnx".to_owned()],
        serving: true,
    }
}

/// Versions 1, 2, … with these weights in percent.
fn demands(percents: &[u64]) -> Vec<Demand> {
    percents
        .iter()
        .enumerate()
        .map(|(index, percent)| Demand {
            version: index as u64 + 1,
            format: "onnx".to_owned(),
            weight: percent * 100,
        })
        .collect()
}

impl Case {
    /// `count` workers `w01`… in one region, versions with these weights.
    fn new(count: usize, percents: &[u64]) -> Case {
        Case {
            workers: (1..=count)
                .map(|index| worker(&format!("w{index:02}"), "local"))
                .collect(),
            demands: demands(percents),
            min_replicas: 1,
            allowed: Vec::new(),
            current: BTreeMap::new(),
            reports: BTreeMap::new(),
            now: 100_000,
        }
    }

    fn inputs(&self) -> Inputs<'_> {
        Inputs {
            min_replicas: self.min_replicas,
            allowed_regions: &self.allowed,
            demands: &self.demands,
            workers: &self.workers,
            current: &self.current,
            reports: &self.reports,
            now: self.now,
            grace: GRACE,
        }
    }

    fn plan(&self) -> Assignment {
        assign(&self.inputs())
    }

    /// Plans and stores the plan, as the registry does.
    fn step(&mut self) -> Assignment {
        let plan = self.plan();
        self.current = plan.holdings.clone();
        plan
    }

    /// Every worker holding a version reports it ready now.
    fn all_ready(&mut self) {
        for slot in self.current.keys() {
            self.reports
                .entry(slot.clone())
                .or_insert(Report::Ready { since: self.now });
        }
    }

    fn set_weights(&mut self, percents: &[u64]) {
        self.demands = demands(percents);
    }

    fn report(&mut self, version: u64, worker: &str, report: Report) {
        self.reports.insert((version, worker.to_owned()), report);
    }
}

/// The workers a version is assigned to (not those releasing it).
fn assigned(plan: &Assignment, version: u64) -> Vec<String> {
    plan.holdings
        .iter()
        .filter(|((held, _), holding)| *held == version && holding.role == Role::Assigned)
        .map(|((_, worker), _)| worker.clone())
        .collect()
}

fn releasing(plan: &Assignment, version: u64) -> Vec<String> {
    plan.holdings
        .iter()
        .filter(|((held, _), holding)| *held == version && holding.role == Role::Releasing)
        .map(|((_, worker), _)| worker.clone())
        .collect()
}

fn counts(plan: &Assignment, versions: u64) -> Vec<usize> {
    (1..=versions)
        .map(|version| assigned(plan, version).len())
        .collect()
}

/// How many versions each worker is assigned, by worker.
fn per_worker(plan: &Assignment) -> BTreeMap<String, usize> {
    let mut held = BTreeMap::new();
    for ((_, worker), holding) in &plan.holdings {
        if holding.role == Role::Assigned {
            *held.entry(worker.clone()).or_default() += 1;
        }
    }
    held
}

#[test]
fn workers_are_shared_in_proportion_to_traffic() {
    let plan = Case::new(10, &[50, 30, 20]).plan();
    assert_eq!(counts(&plan, 3), [5, 3, 2]);
    assert!(
        per_worker(&plan).values().all(|held| *held == 1),
        "{plan:?}"
    );
    assert_eq!(per_worker(&plan).len(), 10);
    assert_eq!(counts(&Case::new(10, &[90, 10]).plan(), 2), [9, 1]);
    // Largest remainder: 3 × 34/33/33 is 1.02/0.99/0.99.
    let plan = Case::new(3, &[34, 33, 33]).plan();
    assert_eq!(counts(&plan, 3), [1, 1, 1]);
    assert!(
        per_worker(&plan).values().all(|held| *held == 1),
        "{plan:?}"
    );
    assert_eq!(counts(&Case::new(7, &[34, 33, 33]).plan(), 3), [3, 2, 2]);
    assert_eq!(plan.next_check, None);
}

#[test]
fn every_version_gets_its_minimum_and_idle_ones_only_that() {
    let mut case = Case::new(10, &[95, 5, 0]);
    case.min_replicas = 2;
    let plan = case.plan();
    // 9.5/0.5 lifts version 2 to its floor of 2; version 3 takes no
    // traffic and sits, twice, beside versions that do.
    assert_eq!(counts(&plan, 3), [8, 2, 2]);
    let with_traffic: BTreeSet<String> = [1, 2]
        .iter()
        .flat_map(|version| assigned(&plan, *version))
        .collect();
    assert_eq!(with_traffic.len(), 10, "one version with traffic each");
    // More replicas asked than workers: every worker.
    case.min_replicas = 64;
    assert_eq!(counts(&case.plan(), 3), [10, 10, 10]);
    // No traffic at all (nothing ready, no alias): the minimum each.
    let mut case = Case::new(4, &[0, 0]);
    case.min_replicas = 2;
    let plan = case.plan();
    assert_eq!(counts(&plan, 2), [2, 2]);
    assert!(
        per_worker(&plan).values().all(|held| *held == 1),
        "{plan:?}"
    );
}

#[test]
fn fewer_workers_than_versions_share_workers() {
    let plan = Case::new(2, &[34, 33, 33]).plan();
    assert_eq!(counts(&plan, 3), [1, 1, 1]);
    let mut held: Vec<usize> = per_worker(&plan).into_values().collect();
    held.sort_unstable();
    assert_eq!(held, [1, 2]);
    let plan = Case::new(1, &[34, 33, 33]).plan();
    assert_eq!(assigned(&plan, 2), ["w01"]);
    assert_eq!(counts(&plan, 3), [1, 1, 1]);
    assert_eq!(Case::new(0, &[100]).plan(), Assignment::default());
}

#[test]
fn each_region_holds_every_version() {
    let mut case = Case::new(0, &[50, 50]);
    case.workers = vec![
        worker("eu-1", "eu"),
        worker("eu-2", "eu"),
        worker("us-1", "us"),
        worker("us-2", "us"),
        worker("us-3", "us"),
        worker("ap-1", "ap"),
    ];
    let plan = case.plan();
    for version in [1, 2] {
        for region in ["eu", "us", "ap"] {
            assert!(
                assigned(&plan, version)
                    .iter()
                    .any(|worker| worker.starts_with(region)),
                "version {version} missing in {region}: {plan:?}"
            );
        }
    }
    // Three workers at 50/50: the tie goes to the lower version.
    let in_us = |version| {
        assigned(&plan, version)
            .iter()
            .filter(|worker| worker.starts_with("us"))
            .count()
    };
    assert_eq!((in_us(1), in_us(2)), (2, 1));
    assert_eq!(assigned(&plan, 1).len() + assigned(&plan, 2).len(), 7);
    // Residency: only the allowed regions hold the model.
    case.allowed = vec!["eu".to_owned(), "us".to_owned()];
    let plan = case.plan();
    assert!(
        plan.holdings.keys().all(|(_, worker)| worker != "ap-1"),
        "{plan:?}"
    );
    assert_eq!(counts(&plan, 2), [3, 2]);
    // A region whose workers load another format holds nothing.
    case.workers[5].formats = vec!["safetensors".to_owned()];
    case.allowed.clear();
    assert!(
        case.plan()
            .holdings
            .keys()
            .all(|(_, worker)| worker != "ap-1")
    );
}

#[test]
fn small_weight_shifts_keep_the_holders() {
    let mut case = Case::new(10, &[50, 50]);
    let before = case.step();
    case.all_ready();
    case.now += 10_000;
    // 5.1/4.9 rounds to 5/5: nothing moves.
    case.set_weights(&[51, 49]);
    assert_eq!(case.step().holdings, before.holdings);
    // 6/4: one worker moves from version 2 to version 1, nothing else.
    case.set_weights(&[60, 40]);
    let after = case.step();
    let moved_from: BTreeSet<String> = assigned(&before, 2)
        .into_iter()
        .filter(|worker| !assigned(&after, 2).contains(worker))
        .collect();
    let moved_to: BTreeSet<String> = assigned(&after, 1)
        .into_iter()
        .filter(|worker| !assigned(&before, 1).contains(worker))
        .collect();
    assert_eq!(moved_from.len(), 1, "{after:?}");
    assert_eq!(moved_from, moved_to);
    assert_eq!(counts(&after, 2), [6, 4]);
    // The mover lets version 2 go at once: the workers that keep it have
    // long had it ready.
    assert!(releasing(&after, 2).is_empty(), "{after:?}");
}

#[test]
fn plans_do_not_depend_on_the_order_of_the_inputs() {
    let mut case = Case::new(5, &[60, 40, 0]);
    case.min_replicas = 2;
    case.workers[1].region = "eu".to_owned();
    case.workers[3].region = "eu".to_owned();
    let plan = case.plan();
    assert_eq!(case.plan(), plan);
    case.workers.reverse();
    case.demands.reverse();
    assert_eq!(case.plan(), plan);
}

#[test]
fn a_lost_worker_s_versions_move_to_the_others() {
    let mut case = Case::new(3, &[34, 33, 33]);
    let first = case.step();
    case.all_ready();
    let lost = assigned(&first, 2)[0].clone();
    case.workers
        .iter_mut()
        .find(|worker| worker.id == lost)
        .unwrap()
        .serving = false;
    let plan = case.step();
    assert_eq!(counts(&plan, 3), [1, 1, 1]);
    assert!(
        plan.holdings.keys().all(|(_, worker)| *worker != lost),
        "a lost worker holds nothing, not even while others load: {plan:?}"
    );
    // Versions 1 and 3 stay where they were; version 2 joins one of them.
    assert_eq!(assigned(&plan, 1), assigned(&first, 1));
    assert_eq!(assigned(&plan, 3), assigned(&first, 3));
    assert_eq!(per_worker(&plan).values().sum::<usize>(), 3);
}

/// w01 holds versions 1, 2 and 3 and w02, w03 version 1, all ready (what
/// workers joining one by one under 100/0/0 end up with).
fn crowded() -> Case {
    let mut case = Case::new(3, &[100, 0, 0]);
    for slot in [(1, "w01"), (1, "w02"), (1, "w03"), (2, "w01"), (3, "w01")] {
        case.current.insert(
            (slot.0, slot.1.to_owned()),
            Holding {
                role: Role::Assigned,
                since: 0,
            },
        );
        case.report(slot.0, slot.1, Report::Ready { since: 0 });
    }
    assert_eq!(case.plan().holdings, case.current, "a fixed point");
    case
}

#[test]
fn make_before_break_keeps_the_old_holder_until_the_new_one_is_ready() {
    let mut case = crowded();
    case.set_weights(&[34, 33, 33]);
    let plan = case.step();
    // Version 2 stays on w01; version 1 keeps w02 (least loaded) and
    // leaves the others at once (w02 has long had it ready); version 3
    // moves to w03, and w01 keeps it until w03 has it ready.
    assert_eq!(assigned(&plan, 1), ["w02"]);
    assert_eq!(releasing(&plan, 1), Vec::<String>::new());
    assert_eq!(assigned(&plan, 2), ["w01"]);
    assert_eq!(assigned(&plan, 3), ["w03"]);
    assert_eq!(releasing(&plan, 3), ["w01"]);
    assert_eq!(plan.holders(3), ["w01", "w03"]);
    assert_eq!(plan.next_check, None, "w03's report calls the next plan");
    // Planning again changes nothing while w03 loads.
    case.now += 1_000;
    case.report(3, "w03", Report::Other);
    assert_eq!(case.step().holdings, plan.holdings);

    // Ready: w01 keeps version 3 for the grace period.
    case.report(3, "w03", Report::Ready { since: case.now });
    let loaded_at = case.now;
    let plan = case.step();
    assert_eq!(releasing(&plan, 3), ["w01"]);
    assert_eq!(plan.next_check, Some(loaded_at + GRACE));
    case.now = loaded_at + GRACE - 1;
    assert_eq!(releasing(&case.step(), 3), ["w01"]);
    case.now = loaded_at + GRACE;
    let plan = case.step();
    assert_eq!(plan.holders(3), ["w03"]);
    assert_eq!(plan.next_check, None);
    assert!(
        per_worker(&plan).values().all(|held| *held == 1),
        "{plan:?}"
    );
    // Settled: a fixed point.
    assert_eq!(case.plan(), plan);
}

#[test]
fn a_new_holder_that_fails_hands_the_version_back() {
    let mut case = crowded();
    case.set_weights(&[34, 33, 33]);
    case.step();
    case.now += 1_000;
    case.report(3, "w03", Report::Failed);
    let plan = case.step();
    // w03 cannot hold version 3: the worker that has it ready keeps it.
    assert_eq!(assigned(&plan, 3), ["w01"]);
    assert!(releasing(&plan, 3).is_empty());
    assert!(!plan.holders(3).contains(&"w03".to_owned()));
    assert_eq!(counts(&plan, 3), [1, 1, 1]);
    // Every worker failing a version: nobody is assigned it.
    for worker in ["w01", "w02", "w03"] {
        case.report(3, worker, Report::Failed);
    }
    assert!(case.step().holders(3).is_empty());
}

#[test]
fn a_move_from_mode_all_unloads_only_what_others_have_ready() {
    // Mode `all`: no stored assignment; w01 and w02 have both versions
    // ready, w03 only version 1 (it is still loading version 2).
    let mut case = Case::new(3, &[50, 50]);
    for (version, worker) in [(1, "w01"), (1, "w02"), (1, "w03"), (2, "w01"), (2, "w02")] {
        case.report(version, worker, Report::Ready { since: 0 });
    }
    case.report(2, "w03", Report::Other);
    let plan = case.step();
    assert_eq!(counts(&plan, 2), [2, 1]);
    // Nobody loads anything new: the holders come from those ready.
    for (version, worker) in plan.holdings.keys() {
        assert!(
            matches!(
                case.reports.get(&(*version, worker.clone())),
                Some(Report::Ready { .. })
            ),
            "{version} on {worker}: {plan:?}"
        );
    }
    assert!(
        plan.holdings
            .values()
            .all(|held| held.role == Role::Assigned)
    );
}

#[test]
fn traffic_weights_follow_the_router() {
    use crate::model::{Artifact, Format, GuardRails, Shadow, Split};
    let version = |number: u64, lifecycle: Lifecycle| Version {
        model: "m".to_owned(),
        version: number,
        artifact: Artifact {
            sha256: "a".repeat(64),
            size_bytes: 1,
            format: Format::Onnx,
        },
        signature: None,
        metadata: BTreeMap::new(),
        lineage: Default::default(),
        lifecycle,
        reason: String::new(),
        created_by: String::new(),
        created_at: 0,
    };
    let versions = vec![
        version(1, Lifecycle::Ready),
        version(2, Lifecycle::Ready),
        version(3, Lifecycle::Registered),
        version(4, Lifecycle::Archived),
    ];
    let weights = |rollout: Option<&Rollout>, production: Option<u64>| {
        traffic_weights(&versions, rollout, production)
            .into_iter()
            .collect::<Vec<_>>()
    };
    // No rollout: the production alias, else the latest ready version.
    assert_eq!(weights(None, Some(1)), [(1, 10_000), (2, 0), (3, 0)]);
    assert_eq!(weights(None, None), [(1, 0), (2, 10_000), (3, 0)]);
    assert_eq!(weights(None, Some(4)), [(1, 0), (2, 10_000), (3, 0)]);
    let mut rollout = Rollout {
        model: "m".to_owned(),
        revision: 1,
        state: RolloutState::Active,
        stable_version: 1,
        splits: vec![
            Split {
                version: 1,
                weight: 90,
            },
            Split {
                version: 2,
                weight: 10,
            },
        ],
        sticky_key: None,
        shadow: Some(Shadow {
            version: 3,
            percent: 12.5,
        }),
        guard_rails: GuardRails::default(),
        updated_by: String::new(),
        updated_at: 0,
        reason: String::new(),
    };
    assert_eq!(
        weights(Some(&rollout), Some(1)),
        [(1, 9_000), (2, 1_000), (3, 1_250)]
    );
    // Paused: everything on the stable version, no shadow.
    rollout.state = RolloutState::Paused;
    assert_eq!(
        weights(Some(&rollout), Some(2)),
        [(1, 10_000), (2, 0), (3, 0)]
    );
}

/// A small deterministic generator for the property test.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound
    }
}

#[test]
fn a_settled_plan_is_a_fixed_point() {
    let mut random = Lcg(7);
    for round in 0..500 {
        let workers = 1 + random.below(7) as usize;
        let versions = 1 + random.below(4) as usize;
        let percents: Vec<u64> = (0..versions).map(|_| random.below(4) * 25).collect();
        let mut case = Case::new(workers, &percents);
        case.min_replicas = 1 + random.below(3) as u32;
        for worker in &mut case.workers {
            if random.below(3) == 0 {
                worker.region = "eu".to_owned();
            }
            if random.below(8) == 0 {
                worker.serving = false;
            }
        }
        for version in 1..=versions as u64 {
            for worker in &case.workers {
                if random.below(10) == 0 {
                    case.reports
                        .insert((version, worker.id.clone()), Report::Failed);
                }
            }
        }
        let first = case.step();
        // Every new holder has it ready, long enough.
        for slot in first.holdings.keys() {
            case.reports
                .entry(slot.clone())
                .or_insert(Report::Ready { since: case.now });
        }
        case.now += GRACE;
        let settled = case.step();
        assert!(
            settled
                .holdings
                .values()
                .all(|held| held.role == Role::Assigned),
            "round {round}: {settled:?}"
        );
        assert_eq!(case.plan(), settled, "round {round}");
        for demand in &case.demands {
            let capable = case
                .workers
                .iter()
                .filter(|worker| {
                    worker.serving
                        && case.reports.get(&(demand.version, worker.id.clone()))
                            != Some(&Report::Failed)
                })
                .count();
            let floor = capable.min(case.min_replicas as usize);
            let regions: BTreeSet<&str> = case
                .workers
                .iter()
                .filter(|worker| worker.serving)
                .map(|worker| worker.region.as_str())
                .collect();
            assert!(
                assigned(&settled, demand.version).len() >= floor.min(1),
                "round {round}: version {} has no holder in {regions:?}: {settled:?}",
                demand.version
            );
        }
    }
}
