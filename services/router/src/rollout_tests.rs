#![allow(clippy::unwrap_used)]

use super::*;
use shamal_registry_client::proto::Split;
use tonic::Code;

fn rollout(state: &str, stable: u64, splits: &[(u64, u32)]) -> Rollout {
    Rollout {
        revision: 3,
        state: state.to_owned(),
        stable_version: stable,
        splits: splits
            .iter()
            .map(|(version, weight)| Split {
                version: *version,
                weight: *weight,
            })
            .collect(),
        ..Default::default()
    }
}

fn model(name: &str, aliases: &[(&str, u64)], rollout: Option<Rollout>) -> ModelState {
    ModelState {
        name: name.to_owned(),
        aliases: aliases
            .iter()
            .map(|(alias, version)| ((*alias).to_owned(), *version))
            .collect(),
        rollout,
        ..Default::default()
    }
}

fn route(state: ModelState) -> ModelRoute {
    ModelRoute::from_proto(&state)
}

fn no_sticky(_: &StickyKey) -> Option<u32> {
    None
}

fn draws(bucket: u32) -> Draws {
    Draws {
        bucket,
        shadow: 1.0,
    }
}

/// Versions chosen over `count` random draws.
fn tally(route: &ModelRoute, count: usize) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        let decision = route.decide("m", "", no_sticky, Draws::random()).unwrap();
        *seen.entry(decision.version.unwrap()).or_default() += 1;
    }
    seen
}

#[test]
fn weighted_choice_follows_the_weights() {
    let route = route(model(
        "m",
        &[],
        Some(rollout("active", 1, &[(1, 90), (2, 10)])),
    ));
    let draws = 10_000;
    let seen = tally(&route, draws);
    let canary = *seen.get(&2).unwrap_or(&0) as f64;
    // Binomial(10 000, 0.1): sigma = 30; allow 4 sigma.
    let (mean, sigma) = (1_000.0, (10_000.0f64 * 0.1 * 0.9).sqrt());
    assert!(
        (canary - mean).abs() < 4.0 * sigma,
        "canary got {canary} of {draws}"
    );
    assert_eq!(seen.values().sum::<usize>(), draws);
    assert_eq!(seen.len(), 2);
}

#[test]
fn buckets_put_canaries_low_and_stable_on_top() {
    let route = RolloutRoute::from_proto(&rollout("active", 1, &[(1, 80), (3, 5), (2, 15)]));
    assert_eq!(route.version_for_bucket(0), Some(2));
    assert_eq!(route.version_for_bucket(1_499), Some(2));
    assert_eq!(route.version_for_bucket(1_500), Some(3));
    assert_eq!(route.version_for_bucket(1_999), Some(3));
    assert_eq!(route.version_for_bucket(2_000), Some(1));
    assert_eq!(route.version_for_bucket(BUCKETS - 1), Some(1));
    assert_eq!(
        route.effective_splits(),
        vec![(2, 15.0), (3, 5.0), (1, 80.0)]
    );

    // Zero weights own nothing; no weight at all routes nowhere.
    let route = RolloutRoute::from_proto(&rollout("active", 1, &[(1, 100), (2, 0)]));
    assert_eq!(route.effective_splits(), vec![(1, 100.0)]);
    let route = RolloutRoute::from_proto(&rollout("active", 0, &[]));
    assert_eq!(route.version_for_bucket(0), None);
}

#[test]
fn sticky_callers_keep_their_version() {
    let mut sticky = rollout("active", 1, &[(1, 50), (2, 50)]);
    sticky.sticky_key = "User-Id".to_owned();
    let route = route(model("m", &[], Some(sticky)));
    let key = route.rollout.as_ref().unwrap().sticky_key.clone().unwrap();

    let mut headers = HeaderMap::new();
    headers.insert("user-id", "alice".parse().unwrap());
    let no_parameters = HashMap::new();
    let from_header = key.bucket("m", &no_parameters, &headers).unwrap();
    assert_eq!(from_header, sticky_bucket("m", "alice"));

    // A parameter wins over the header; numbers hash as their text.
    let parameter = |choice| {
        HashMap::from([(
            "User-Id".to_owned(),
            InferParameter {
                parameter_choice: Some(choice),
            },
        )])
    };
    let bob = parameter(ParameterChoice::StringParam("bob".to_owned()));
    assert_eq!(
        key.bucket("m", &bob, &headers),
        Some(sticky_bucket("m", "bob"))
    );
    let numeric = parameter(ParameterChoice::Int64Param(42));
    assert_eq!(
        key.bucket("m", &numeric, &headers),
        Some(sticky_bucket("m", "42"))
    );
    assert_eq!(key.bucket("m", &no_parameters, &HeaderMap::new()), None);

    // Every draw gives the same version to the same caller.
    let first = route
        .decide(
            "m",
            "",
            |key| key.bucket("m", &no_parameters, &headers),
            draws(0),
        )
        .unwrap()
        .version;
    for bucket in (0..BUCKETS).step_by(97) {
        let again = route
            .decide(
                "m",
                "",
                |key| key.bucket("m", &no_parameters, &headers),
                draws(bucket),
            )
            .unwrap()
            .version;
        assert_eq!(again, first);
    }
}

#[test]
fn stable_hash_is_fixed_and_spreads_callers() {
    // Pinned values: a change of hash would move every sticky caller.
    assert_eq!(sticky_bucket("m", "alice"), 914);
    assert_eq!(sticky_bucket("m", "bob"), 7_338);
    assert_eq!(sticky_bucket("m", "42"), 2_143);
    assert_ne!(sticky_bucket("m", "alice"), sticky_bucket("n", "alice"));
    let mut hasher = StableHasher::new();
    hasher.write(b"");
    assert_eq!(hasher.0, 0xcbf2_9ce4_8422_2325, "FNV-1a offset basis");
    hasher.write(b"a");
    assert_eq!(hasher.0, 0xaf63_dc4c_8601_ec8c, "FNV-1a 64 of \"a\"");

    // Two tables built apart choose the same version for the same caller.
    let mut sticky = rollout("active", 1, &[(1, 70), (2, 30)]);
    sticky.sticky_key = "user".to_owned();
    let one = route(model("m", &[], Some(sticky.clone())));
    let other = route(model("m", &[], Some(sticky)));
    for user in 0..1_000 {
        let bucket = sticky_bucket("m", &format!("user-{user}"));
        let pick = |route: &ModelRoute| {
            route
                .decide("m", "", |_| Some(bucket), draws(0))
                .unwrap()
                .version
        };
        assert_eq!(pick(&one), pick(&other));
    }

    // 10 000 callers over a 30% canary: 3000 ± 4 sigma.
    let canary = (0..10_000)
        .filter(|user| {
            one.decide(
                "m",
                "",
                |_| Some(sticky_bucket("m", &format!("user-{user}"))),
                draws(0),
            )
            .unwrap()
            .version
                == Some(2)
        })
        .count() as f64;
    let sigma = (10_000.0f64 * 0.3 * 0.7).sqrt();
    assert!(
        (canary - 3_000.0).abs() < 4.0 * sigma,
        "canary callers {canary}"
    );
}

#[test]
fn raising_a_canary_only_moves_callers_into_it() {
    let before = RolloutRoute::from_proto(&rollout("active", 1, &[(1, 90), (2, 10)]));
    let after = RolloutRoute::from_proto(&rollout("active", 1, &[(1, 80), (2, 20)]));
    let mut moved_in = 0;
    for user in 0..10_000 {
        let bucket = sticky_bucket("m", &format!("user-{user}"));
        let (old, new) = (
            before.version_for_bucket(bucket),
            after.version_for_bucket(bucket),
        );
        if old == Some(2) {
            assert_eq!(new, Some(2), "user-{user} left the canary");
        } else if new == Some(2) {
            moved_in += 1;
        }
    }
    assert!(moved_in > 500, "only {moved_in} callers joined the canary");
}

#[test]
fn aliases_resolve_and_unknown_ones_are_not_found() {
    let route = route(model("m", &[("production", 1), ("staging", 2)], None));
    let decide = |requested: &str| route.decide("m", requested, no_sticky, draws(0));
    let staging = decide("staging").unwrap();
    assert_eq!((staging.version, staging.rewrite), (Some(2), true));
    let numeric = decide("7").unwrap();
    assert_eq!((numeric.version, numeric.rewrite), (Some(7), false));
    // No rollout: the production alias, else the worker's latest.
    let default = decide("").unwrap();
    assert_eq!((default.version, default.rewrite), (Some(1), true));
    let bare = self::route(model("m", &[], None));
    let latest = bare.decide("m", "", no_sticky, draws(0)).unwrap();
    assert_eq!((latest.version, latest.rewrite), (None, false));

    let error = decide("canary").unwrap_err();
    assert_eq!(error.code(), Code::NotFound);
    assert!(error.message().contains("'canary'"), "{}", error.message());

    // An explicit version wins over the rollout, and carries its revision.
    let with_rollout = self::route(model(
        "m",
        &[("production", 1)],
        Some(rollout("active", 1, &[(1, 0), (2, 100)])),
    ));
    let explicit = with_rollout
        .decide("m", "production", no_sticky, draws(0))
        .unwrap();
    assert_eq!((explicit.version, explicit.rollout_revision), (Some(1), 3));
    let chosen = with_rollout.decide("m", "", no_sticky, draws(0)).unwrap();
    assert_eq!(chosen.version, Some(2));
}

#[test]
fn paused_and_finished_rollouts_send_everything_to_stable() {
    for state in ["paused", "rolled_back", "promoted"] {
        let route = route(model(
            "m",
            &[],
            Some(rollout(state, 1, &[(1, 50), (2, 50)])),
        ));
        assert_eq!(
            tally(&route, 1_000).into_iter().collect::<Vec<_>>(),
            vec![(1, 1_000)],
            "{state}"
        );
    }
}

#[test]
fn shadow_copies_follow_the_percentage() {
    let mut shadowed = rollout("active", 1, &[(1, 100)]);
    shadowed.shadow_version = 2;
    shadowed.shadow_percent = 25.0;
    let route = route(model("m", &[], Some(shadowed)));
    let copies = (0..10_000)
        .filter(|_| {
            route
                .decide("m", "", no_sticky, Draws::random())
                .unwrap()
                .shadow
                == Some(2)
        })
        .count() as f64;
    let sigma = (10_000.0f64 * 0.25 * 0.75).sqrt();
    assert!((copies - 2_500.0).abs() < 4.0 * sigma, "copies {copies}");

    assert!(shadow_drawn(100.0, 0.999_999));
    assert!(!shadow_drawn(0.0, 0.0));
    // A request aimed at the shadow version is not copied to itself.
    let to_shadow = route
        .decide(
            "m",
            "2",
            no_sticky,
            Draws {
                bucket: 0,
                shadow: 0.0,
            },
        )
        .unwrap();
    assert_eq!(to_shadow.shadow, None);
}

fn event(revision: u64, snapshot: bool, models: Vec<ModelState>, removed: &[&str]) -> WatchEvent {
    WatchEvent {
        revision,
        snapshot,
        models,
        removed: removed.iter().map(|name| (*name).to_owned()).collect(),
        ..Default::default()
    }
}

#[test]
fn snapshots_replace_and_increments_patch_the_table() {
    let routes = Routes::default();
    let changes = routes.apply(&event(
        1,
        true,
        vec![
            model("a", &[("production", 1)], None),
            model("b", &[("production", 2)], None),
        ],
        &[],
    ));
    assert_eq!(changes.len(), 2);
    let first = routes.current();
    assert_eq!((first.revision, first.len()), (1, 2));

    // An increment replaces the models it lists and deletes removed ones.
    let changes = routes.apply(&event(
        2,
        false,
        vec![
            model("a", &[("production", 3)], None),
            model("c", &[], None),
        ],
        &["b"],
    ));
    assert_eq!(changes.len(), 3);
    let second = routes.current();
    assert_eq!(second.revision, 2);
    assert_eq!(
        second.model("a").unwrap().aliases.get("production"),
        Some(&3)
    );
    assert!(second.model("b").is_none());
    assert!(second.model("c").is_some());
    // Readers holding the old table still see it whole.
    assert_eq!(
        first.model("a").unwrap().aliases.get("production"),
        Some(&1)
    );
    assert!(first.model("b").is_some());

    // Unchanged models are no change; a snapshot drops what it omits.
    let changes = routes.apply(&event(
        3,
        true,
        vec![model("a", &[("production", 3)], None)],
        &[],
    ));
    assert!(
        changes
            .iter()
            .all(|change| matches!(change, Change::Removed { model } if model == "c")),
        "{changes:?}"
    );
    assert_eq!(changes.len(), 1);
    let third = routes.current();
    assert_eq!((third.revision, third.len()), (3, 1));
    assert!(Arc::ptr_eq(
        third.model("a").unwrap(),
        second.model("a").unwrap()
    ));
}
