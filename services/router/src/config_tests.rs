//! Configuration tests: layering, validation, documented variables.

use super::*;

#[test]
fn layers_apply_in_order_and_values_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("router.toml");
    std::fs::write(
        &file,
        "workers = [\"127.0.0.1:9\"]\nmax_inflight = 7\ndefault_timeout_ms = 50\n\
         idle_poll_us = 250\n",
    )
    .unwrap();
    let args = RouterArgs {
        config: Some(file.clone()),
        default_timeout_ms: Some(99),
        ..Default::default()
    };
    let config = RouterConfig::load(&args).unwrap();
    assert_eq!(config.workers, vec!["127.0.0.1:9"]);
    assert_eq!(config.max_inflight, 7);
    assert_eq!(config.default_timeout_ms, 99, "flag beats file");
    assert_eq!(config.refresh_interval_ms, 1_000, "default kept");
    assert_eq!(config.idle_poll_us, 250, "from the file");
    assert_eq!(RouterConfig::default().idle_poll_us, 0, "off by default");

    let error = RouterConfig::load(&RouterArgs::default())
        .unwrap_err()
        .to_string();
    assert!(error.contains("workers"), "{error}");
    // With a registry, workers may all come from it.
    let followed = RouterConfig::load(&RouterArgs {
        registry: Some("127.0.0.1:8201".into()),
        static_worker_region: Some("me-central-1".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(followed.workers.is_empty());
    assert_eq!(followed.pool_settings().static_region, "me-central-1");

    std::fs::write(&file, "workers = [\"a:1\"]\nmax_inflight = 0\n").unwrap();
    let error = RouterConfig::load(&RouterArgs {
        config: Some(file.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(error.contains("max_inflight"), "{error}");

    // Registry settings: absent by default, layered and checked.
    assert_eq!(config.registry, None);
    assert_eq!(config.traffic_report_interval_ms, 1_000);
    assert_eq!(config.max_shadow_inflight, 256);
    assert!(!config.router_id.is_empty());
    std::fs::write(
        &file,
        "workers = [\"a:1\"]\nregistry = \"registry:7001\"\nrouter_id = \"edge-1\"\n",
    )
    .unwrap();
    let config = RouterConfig::load(&RouterArgs {
        config: Some(file.clone()),
        router_id: Some("edge-2".into()),
        max_shadow_inflight: Some(0),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(config.registry.as_deref(), Some("registry:7001"));
    assert_eq!(config.router_id, "edge-2", "flag beats file");
    assert_eq!(config.max_shadow_inflight, 0, "0 turns shadow copies off");
    for (bad, field) in [
        ("registry = \" \"", "registry"),
        ("registry = \"http://a b\"", "registry"),
        ("router_id = \"\"", "router_id"),
        ("router_id = \"two words\"", "router_id"),
        (
            "traffic_report_interval_ms = 0",
            "traffic_report_interval_ms",
        ),
        ("static_worker_region = \"a b\"", "static_worker_region"),
        ("retry_budget_ratio = 1.5", "retry_budget_ratio"),
        ("low_priority_percent = 0", "low_priority_percent"),
        ("outlier_slow_factor = 1.0", "outlier_slow_factor"),
        ("autoscale_target_inflight = 0", "autoscale_target_inflight"),
    ] {
        std::fs::write(&file, format!("workers = [\"a:1\"]\n{bad}\n")).unwrap();
        let error = RouterConfig::load(&RouterArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains(field), "{bad}: {error}");
    }

    std::fs::write(&file, "worker = [\"a:1\"]\n").unwrap();
    let error = RouterConfig::load(&RouterArgs {
        config: Some(file),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("unknown field `worker`") && error.contains("router.toml"),
        "unknown keys are refused: {error}"
    );
}

#[test]
fn every_documented_variable_is_read() {
    let read = SERVICE.variables_read::<RouterArgs>();
    let documented = shamal_telemetry::process::documented_variables(
        SERVICE.env_prefix,
        &[
            include_str!("../../../docs/operations.md"),
            include_str!("../../../docs/async-inference.md"),
            include_str!("../../../README.md"),
        ],
    );
    assert!(documented.len() >= 25, "{documented:?}");
    for name in &documented {
        assert!(read.contains(name), "{name} is documented but not read");
    }
}

#[test]
fn async_settings_layer_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("router.toml");
    let defaults = RouterConfig::default();
    assert_eq!(
        defaults.async_queue, None,
        "async inference is off by default"
    );
    assert_eq!(defaults.async_result_ttl_ms, 3_600_000);
    assert_eq!(defaults.async_region, AUTO_REGION);
    assert_eq!(defaults.async_key_prefix, "shamal:async");

    std::fs::write(
        &file,
        "workers = [\"a:1\"]\nasync_queue = \"redis://redis:6379/2\"\nmax_async_backlog = 5\nasync_region = \"eu-west-1\"\n",
    )
    .unwrap();
    let config = RouterConfig::load(&RouterArgs {
        config: Some(file.clone()),
        max_async_backlog: Some(7),
        async_result_ttl_ms: Some(60_000),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(config.async_queue.as_deref(), Some("redis://redis:6379/2"));
    assert_eq!(config.max_async_backlog, 7, "flag beats file");
    assert_eq!(config.async_result_ttl_ms, 60_000);
    assert_eq!(config.async_region, "eu-west-1");

    for (bad, field) in [
        ("async_queue = \"http://redis\"", "async_queue"),
        ("async_queue = \"memory\"", "async_queue"),
        ("async_key_prefix = \"a b\"", "async_key_prefix"),
        ("async_result_ttl_ms = 10", "async_result_ttl_ms"),
        ("async_job_timeout_ms = 0", "async_job_timeout_ms"),
        ("async_region = \"\"", "async_region"),
        ("max_async_backlog = 0", "max_async_backlog"),
        ("async_max_wait_ms = 3600000", "async_max_wait_ms"),
    ] {
        std::fs::write(&file, format!("workers = [\"a:1\"]\n{bad}\n")).unwrap();
        let error = RouterConfig::load(&RouterArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains(field), "{bad}: {error}");
    }
    // Embedded (shamal up): the program hands over the memory queue.
    let embedded = RouterConfig {
        async_queue: Some(MEMORY_QUEUE.to_owned()),
        ..RouterConfig::default()
    };
    embedded.validate().unwrap();
}

mod infra_tests {
    use super::*;

    /// The router.toml block of the Kubernetes ConfigMap, dedented.
    fn configmap_block(name: &str) -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../infra/k8s/10-config.yaml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines = text
            .lines()
            .skip_while(|line| line.trim() != format!("{name}: |"))
            .skip(1);
        let mut block = String::new();
        for line in lines.by_ref() {
            if !line.is_empty() && !line.starts_with("    ") {
                break;
            }
            block.push_str(line.strip_prefix("    ").unwrap_or(line));
            block.push('\n');
        }
        block
    }

    #[test]
    fn the_kubernetes_router_config_is_valid() {
        let block = configmap_block("router.toml");
        assert!(block.contains("grpc_listen"), "{block}");
        let config: RouterConfig = toml::from_str(&block).unwrap();
        config.validate().unwrap();
        assert!(
            config.workers.is_empty() && config.registry.is_some(),
            "workers come from the registry"
        );
    }
}
