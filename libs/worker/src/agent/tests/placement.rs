//! Placement: the desired set, the plan and the catalog (pure logic).

use super::*;

// ------------------------------------------------------------- pure logic

fn onnx(sha: char) -> Artifact {
    Artifact {
        sha256: sha.to_string().repeat(64),
        size_bytes: 1,
        format: "onnx".to_owned(),
    }
}

#[test]
fn desired_set_is_registered_and_ready_versions_in_served_formats() {
    let safetensors = Artifact {
        format: "safetensors".to_owned(),
        ..onnx('e')
    };
    let mut catalog = Catalog::default();
    catalog.apply(&WatchEvent {
        revision: 1,
        snapshot: true,
        models: vec![
            model(
                "a",
                vec![
                    version(1, "registered", Some(onnx('a'))),
                    version(2, "ready", Some(onnx('b'))),
                    version(3, "failed", Some(onnx('c'))),
                    version(4, "archived", Some(onnx('d'))),
                    version(5, "ready", Some(safetensors)),
                    version(6, "ready", None),
                ],
            ),
            model("b", vec![version(1, "ready", Some(onnx('f')))]),
        ],
        removed: vec![],
        ..WatchEvent::default()
    });
    let desired = desired_versions(&catalog.models, &["onnx"], "worker-a");
    let keys: Vec<Key> = desired.keys().cloned().collect();
    assert_eq!(
        keys,
        vec![("a".into(), 1), ("a".into(), 2), ("b".into(), 1)]
    );
    assert_eq!(desired[&("a".to_owned(), 2)].sha256, "b".repeat(64));
    assert_eq!(
        desired_versions(&catalog.models, &["safetensors"], "worker-a").len(),
        1
    );
}

#[test]
fn desired_set_keeps_only_versions_assigned_to_this_worker() {
    let assigned = |number: u64, sha: char, workers: &[&str]| RegistryVersion {
        assigned_workers: workers.iter().map(|worker| (*worker).to_owned()).collect(),
        ..version(number, "ready", Some(onnx(sha)))
    };
    let mut catalog = Catalog::default();
    catalog.apply(&WatchEvent {
        revision: 1,
        snapshot: true,
        models: vec![model(
            "a",
            vec![
                // Placement mode `all`: every capable worker.
                assigned(1, 'a', &[]),
                assigned(2, 'b', &["worker-a", "worker-b"]),
                // Assigned elsewhere only: left to the other workers.
                assigned(3, 'c', &["worker-b"]),
                // Assigned here but archived: never held.
                RegistryVersion {
                    assigned_workers: vec!["worker-a".to_owned()],
                    ..version(4, "archived", Some(onnx('d')))
                },
            ],
        )],
        ..WatchEvent::default()
    });
    let keys = |worker: &str| -> Vec<u64> {
        desired_versions(&catalog.models, &["onnx"], worker)
            .into_keys()
            .map(|(_, version)| version)
            .collect()
    };
    assert_eq!(keys("worker-a"), [1, 2]);
    assert_eq!(keys("worker-b"), [1, 2, 3]);
    assert_eq!(keys("worker-c"), [1]);
    // What the worker held of a version moved away is unloaded.
    let held: BTreeMap<Key, ()> = [(("a".to_owned(), 2), ()), (("a".to_owned(), 3), ())]
        .into_iter()
        .collect();
    let desired = desired_versions(&catalog.models, &["onnx"], "worker-a");
    assert_eq!(
        plan(&desired, &held),
        Plan {
            load: vec![("a".into(), 1)],
            unload: vec![("a".into(), 3)],
        }
    );
}

#[test]
fn plan_loads_what_is_new_and_unloads_what_is_gone() {
    let desired: BTreeMap<Key, Artifact> = [
        (("a".to_owned(), 1), onnx('a')),
        (("a".to_owned(), 2), onnx('b')),
        (("b".to_owned(), 1), onnx('c')),
    ]
    .into_iter()
    .collect();
    let held: BTreeMap<Key, ()> = [(("a".to_owned(), 1), ()), (("c".to_owned(), 7), ())]
        .into_iter()
        .collect();
    assert_eq!(
        plan(&desired, &held),
        Plan {
            load: vec![("a".into(), 2), ("b".into(), 1)],
            unload: vec![("c".into(), 7)],
        }
    );
    let none: BTreeMap<Key, ()> = BTreeMap::new();
    assert_eq!(plan(&desired, &none).load.len(), 3);
    assert_eq!(plan(&BTreeMap::new(), &held).unload.len(), 2);
}

#[test]
fn catalog_follows_snapshots_changes_and_removals() {
    let mut catalog = Catalog::default();
    let event = |revision, snapshot, models, removed: Vec<&str>| WatchEvent {
        revision,
        snapshot,
        models,
        removed: removed.into_iter().map(str::to_owned).collect(),
        ..WatchEvent::default()
    };
    catalog.apply(&event(
        1,
        true,
        vec![model("a", vec![]), model("b", vec![])],
        vec![],
    ));
    catalog.apply(&event(
        2,
        false,
        vec![model("c", vec![version(1, "ready", Some(onnx('a')))])],
        vec!["a"],
    ));
    let names: Vec<&String> = catalog.models.keys().collect();
    assert_eq!(names, ["b", "c"]);
    catalog.apply(&event(3, true, vec![model("d", vec![])], vec![]));
    let names: Vec<&String> = catalog.models.keys().collect();
    assert_eq!(names, ["d"], "a snapshot replaces everything");
}

#[test]
fn signature_json_lists_inputs_and_outputs() {
    let signature = ModelSignature {
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Int32,
            dims: vec![-1, 16],
        }],
        outputs: vec![],
    };
    let value: serde_json::Value = serde_json::from_str(&signature_json(&signature)).unwrap();
    assert_eq!(
        value,
        serde_json::json!({
            "inputs": [{"name": "x", "datatype": "INT32", "dims": [-1, 16]}],
            "outputs": [],
        })
    );
}
