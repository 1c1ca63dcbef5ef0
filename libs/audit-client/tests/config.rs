//! The `[audit]` table: defaults, TOML, and errors that name the field.

use std::path::PathBuf;

use shamal_audit_client::{AuditClientConfig, Auditor, Error, OnFull};

#[test]
fn defaults_leave_auditing_off_with_the_documented_values() {
    let config = AuditClientConfig::default();
    assert_eq!(config.endpoint, None);
    assert!(!config.enabled());
    assert_eq!(config.max_spool_bytes, 256 * 1024 * 1024);
    assert_eq!(config.on_full, OnFull::FailClosed);
    assert_eq!(config.batch_size, 2000);
    assert_eq!(config.flush_interval_ms, 10);
    assert_eq!(config.ship_interval_ms, 200);
    config.validate().unwrap();
}

#[test]
fn a_toml_table_parses_and_unknown_fields_are_refused() {
    #[derive(serde::Deserialize)]
    struct Settings {
        audit: AuditClientConfig,
    }
    let settings: Settings = toml::from_str(
        r#"
        [audit]
        endpoint = "https://audit:8301"
        spool_dir = "/var/lib/shamal/audit-spool"
        max_spool_bytes = 1048576
        on_full = "fail_open"
        batch_size = 100
        "#,
    )
    .unwrap();
    let audit = settings.audit;
    assert_eq!(audit.endpoint.as_deref(), Some("https://audit:8301"));
    assert_eq!(
        audit.spool_dir,
        PathBuf::from("/var/lib/shamal/audit-spool")
    );
    assert_eq!(audit.on_full, OnFull::FailOpen);
    assert_eq!(
        audit.flush_interval_ms, 10,
        "unset fields keep their default"
    );
    audit.validate().unwrap();

    let error = toml::from_str::<AuditClientConfig>("endpoint = \"a:1\"\nspool_size = 3\n")
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("spool_size"), "{error}");
    let error = toml::from_str::<AuditClientConfig>("on_full = \"sometimes\"\n")
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("sometimes"), "{error}");
}

fn enabled() -> AuditClientConfig {
    AuditClientConfig {
        endpoint: Some("audit:8301".into()),
        spool_dir: "/tmp/spool".into(),
        ..AuditClientConfig::default()
    }
}

#[test]
fn validation_errors_name_the_field() {
    type Change = Box<dyn Fn(&mut AuditClientConfig)>;
    let cases: Vec<(&str, Change)> = vec![
        ("endpoint", Box::new(|c| c.endpoint = Some("  ".into()))),
        (
            "endpoint",
            Box::new(|c| c.endpoint = Some("http://".into())),
        ),
        (
            "endpoint",
            Box::new(|c| c.endpoint = Some("bad host:1".into())),
        ),
        ("spool_dir", Box::new(|c| c.spool_dir = PathBuf::new())),
        ("max_spool_bytes", Box::new(|c| c.max_spool_bytes = 0)),
        ("batch_size", Box::new(|c| c.batch_size = 0)),
        ("batch_size", Box::new(|c| c.batch_size = 100_000)),
        (
            "flush_interval_ms",
            Box::new(|c| c.flush_interval_ms = 5_000),
        ),
        (
            "ship_interval_ms",
            Box::new(|c| c.ship_interval_ms = 3_600_000),
        ),
        ("segment_bytes", Box::new(|c| c.segment_bytes = 100)),
        ("retry_min_ms", Box::new(|c| c.retry_min_ms = 0)),
        (
            "retry_max_ms",
            Box::new(|c| {
                c.retry_min_ms = 500;
                c.retry_max_ms = 100;
            }),
        ),
        ("request_timeout_ms", Box::new(|c| c.request_timeout_ms = 0)),
    ];
    enabled().validate().unwrap();
    for (field, change) in cases {
        let mut config = enabled();
        change(&mut config);
        let error = config.validate().unwrap_err();
        assert_eq!(error.field, field, "{error}");
        assert!(error.to_string().contains(&format!("'{field}'")), "{error}");
    }
}

#[tokio::test]
async fn start_refuses_an_invalid_config_and_is_off_without_an_endpoint() {
    let registry = prometheus::Registry::new();
    let mut config = enabled();
    config.batch_size = 0;
    match Auditor::start(config, None, "cfg", "cfg-0", &registry) {
        Err(Error::Config(error)) => assert_eq!(error.field, "batch_size"),
        other => panic!("expected a config error, got {other:?}"),
    }
    let off = Auditor::start(
        AuditClientConfig::default(),
        None,
        "cfg",
        "cfg-0",
        &registry,
    )
    .unwrap();
    assert!(!off.is_enabled());
    off.record(Default::default()).unwrap();
    off.drain(std::time::Duration::from_millis(1))
        .await
        .unwrap();
    off.shutdown().await;
}

#[test]
fn start_outside_a_runtime_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = enabled();
    config.spool_dir = dir.path().to_owned();
    let result = Auditor::start(config, None, "cfg", "cfg-0", &prometheus::Registry::new());
    assert!(matches!(result, Err(Error::NoRuntime)), "{result:?}");
}
