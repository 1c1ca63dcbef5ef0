//! The Kubernetes manifests (`infra/k8s`) start every service zero trust.
//!
//! Each service's TOML file (ConfigMap `shamal-config`, `10-config.yaml`)
//! is loaded by the service's own configuration loader, as its pod would
//! load it: the container's arguments, with the file found through the
//! pod's ConfigMap mount, and the environment variables the manifest sets
//! (literal values, `$(VAR)` references, the pod name, keys of the
//! ConfigMap `shamal-security`) passed as the flags they stand for. Unknown
//! keys fail there (`deny_unknown_fields`), as do variables with the
//! service's prefix that it does not read. Then, per service:
//!
//! - not insecure: no `insecure` anywhere, and the binary's own start check
//!   (`SecurityConfig::validate`, which `main` runs) passes;
//! - `tls_cert`, `tls_key`, `tls_ca` are `tls.crt`, `tls.key`, `ca.crt` in
//!   a directory where the pod mounts a Secret whole (no `subPath`, so that
//!   renewals reach the files), read-only and readable by the pod's user;
//!   that Secret is a cert-manager `Certificate`'s (`05-certificates.yaml`)
//!   whose SPIFFE URI names this service in the configured trust domain,
//!   with both TLS usages and a short-lived, rotated ECDSA P-256 key;
//! - the router, the registry and the audit service have an OIDC issuer
//!   (https) and audience (the audit service's readers are admins with
//!   tokens), the workers none;
//! - probes use plain HTTP on the metrics port (the others speak TLS).
//!
//! The audit service (`45-audit.yaml`, loaded with its own loader like the
//! others) also gets its signing key as the service accepts it: a 0400 copy
//! owned by the pod's user, made by an init container from the key's
//! Secret (a Secret volume's files get group read from `fsGroup`, which
//! `Signer::load` refuses), in a memory-backed volume mounted read-only;
//! the key format OpenSSL writes (`openssl genpkey -algorithm ed25519`)
//! loads. Each producer's `[audit]` table (router.toml, registry.toml)
//! dials the audit Service over https, fails closed, and
//! spools to a writable volume of the pod large enough for the spool; the
//! network policies let producers reach 8301.
//!
//! Finally the names peers dial (the `registry` address of router.toml and
//! cpu-worker.toml, the address each worker advertises, the router's
//! Service name, the audit endpoint) are checked against the Certificates
//! with real handshakes of `shamal-tls`: certificates with each
//! Certificate's URI and DNS names, from a development CA, must let router
//! → worker, router → registry, worker → registry, a client → router,
//! router → audit and registry → audit connect, with the identities each
//! side expects.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Deserialize;
use serde_yaml::Value;
use shamal_auth::security::{Exposure, SecurityConfig};
use shamal_telemetry::process::Service;
use shamal_tls::{ClientAuth, ClientTls, DevCa, PeerIdentity, ServerTls, TlsFiles};

/// The manifests' directory.
const K8S: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../infra/k8s");

/// What a Secret the manifests read but do not create holds, for the
/// variables taken from it (`secretKeyRef`); operators create these.
const SECRET_STAND_INS: &[(&str, &str, &str)] = &[
    (
        "shamal-registry-db",
        "database-url",
        "postgres://shamal:password@db.example.internal:5432/shamal_registry",
    ),
    (
        "shamal-audit-db",
        "database-url",
        "postgres://shamal_audit:password@db.example.internal:5432/shamal_audit",
    ),
];

/// RFC 8410's example Ed25519 private key (section 10.3), in the form
/// `openssl genpkey -algorithm ed25519` writes (PKCS#8 v1 PEM), and its
/// public key as `openssl pkey -pubout` writes it (section 10.1). A
/// published example, not a key of anyone's.
const RFC8410_PRIVATE_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC
-----END PRIVATE KEY-----
";
const RFC8410_PUBLIC_KEY: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=
-----END PUBLIC KEY-----
";

/// One YAML document of the manifests.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
}

fn manifests() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(K8S)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension() == Some(OsStr::new("yaml")))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "manifests in {K8S}: {files:?}");
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(document)
                .unwrap_or_else(|error| panic!("{file} is not valid YAML: {error}"));
            if !value.is_null() {
                docs.push(Doc {
                    file: file.clone(),
                    value,
                });
            }
        }
    }
    docs
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|doc| doc.kind() == kind && doc.name() == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in {K8S}"))
}

fn text<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {value:?}"))
}

fn list(value: &Value) -> &[Value] {
    value.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

fn strings(value: &Value, what: &str) -> Vec<String> {
    list(value)
        .iter()
        .map(|item| text(item, what).to_owned())
        .collect()
}

/// A Go duration as cert-manager takes it (`24h`, `8h`, `90m`, `1h30m`).
fn go_duration(text: &str) -> Duration {
    let mut total = 0u64;
    let mut number = String::new();
    for character in text.chars() {
        if character.is_ascii_digit() {
            number.push(character);
            continue;
        }
        let unit = match character {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => panic!("duration {text:?}: unit {character:?} not understood here"),
        };
        total += number.parse::<u64>().unwrap() * unit;
        number.clear();
    }
    assert!(number.is_empty(), "duration {text:?} lacks a unit");
    Duration::from_secs(total)
}

/// A volume's file mode as Kubernetes reads it: YAML 1.1, where `0440` is
/// octal (serde_yaml, YAML 1.2, gives that as the string "0440"); 0644
/// when unset.
fn file_mode(value: &Value) -> u64 {
    if value.is_null() {
        return 0o644;
    }
    if let Some(mode) = value.as_u64() {
        return mode;
    }
    let digits = text(value, "file mode");
    let octal = digits
        .strip_prefix("0o")
        .or_else(|| digits.strip_prefix('0'));
    octal
        .and_then(|digits| u64::from_str_radix(digits, 8).ok())
        .unwrap_or_else(|| panic!("file mode {digits:?} not understood"))
}

/// A service under test: where its manifest is and what its certificate
/// must say.
struct Subject {
    workload_kind: &'static str,
    workload: &'static str,
    config_key: &'static str,
    /// The SPIFFE `<service>` its certificate must carry (the RBAC role).
    spiffe_service: &'static str,
    exposure: Exposure,
    /// Whether it takes OIDC tokens.
    oidc: bool,
    /// The pod whose environment is resolved (`metadata.name`).
    pod: &'static str,
}

const REGISTRY: Subject = Subject {
    workload_kind: "Deployment",
    workload: "registry",
    config_key: "registry.toml",
    spiffe_service: "registry",
    exposure: Exposure::Public,
    oidc: true,
    pod: "registry-7c9f8d6b5-x2x7q",
};
const ROUTER: Subject = Subject {
    workload_kind: "Deployment",
    workload: "router",
    config_key: "router.toml",
    spiffe_service: "router",
    exposure: Exposure::Public,
    oidc: true,
    pod: "router-6d5b7c9f8-k4p2m",
};
const CPU_WORKER: Subject = Subject {
    workload_kind: "StatefulSet",
    workload: "cpu-worker",
    config_key: "cpu-worker.toml",
    spiffe_service: "worker",
    exposure: Exposure::Internal,
    oidc: false,
    pod: "cpu-worker-0",
};
const AUDIT: Subject = Subject {
    workload_kind: "Deployment",
    workload: "audit",
    config_key: "audit.toml",
    spiffe_service: "audit",
    // Internal (mTLS producers), but its readers are admins with tokens.
    exposure: shamal_audit_service::config::EXPOSURE,
    oidc: true,
    pod: "audit-5f7d9c8b6-q8w2n",
};

/// A workload's pod spec and its one container.
struct Pod<'a> {
    doc: &'a Doc,
    spec: &'a Value,
    container: &'a Value,
}

impl<'a> Pod<'a> {
    fn of(docs: &'a [Doc], subject: &Subject) -> Pod<'a> {
        let doc = find(docs, subject.workload_kind, subject.workload);
        let spec = &doc.value["spec"]["template"]["spec"];
        let containers = list(&spec["containers"]);
        assert_eq!(
            containers.len(),
            1,
            "{}: one container expected",
            subject.workload
        );
        Pod {
            doc,
            spec,
            container: &containers[0],
        }
    }

    fn what(&self) -> String {
        format!(
            "{} {} ({})",
            self.doc.kind(),
            self.doc.name(),
            self.doc.file
        )
    }

    /// The volume mounted at exactly `dir`, with its mount.
    fn mount_at(&self, dir: &Path) -> (&'a Value, &'a Value) {
        let mount = list(&self.container["volumeMounts"])
            .iter()
            .find(|mount| Path::new(text(&mount["mountPath"], "mountPath")) == dir)
            .unwrap_or_else(|| panic!("{}: nothing is mounted at {}", self.what(), dir.display()));
        let name = text(&mount["name"], "volumeMount name");
        let volume = list(&self.spec["volumes"])
            .iter()
            .find(|volume| volume["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{}: no volume {name}", self.what()));
        (mount, volume)
    }

    /// The mount whose directory holds `path`, with its volume.
    fn mount_holding(&self, path: &Path) -> (&'a Value, &'a Value) {
        self.mount_at(path.parent().unwrap())
    }

    /// The innermost mount at or above `path`, with its volume.
    fn mount_containing(&self, path: &Path) -> (&'a Value, &'a Value) {
        let mut dir = Some(path);
        while let Some(candidate) = dir {
            let mounted = list(&self.container["volumeMounts"])
                .iter()
                .any(|mount| Path::new(text(&mount["mountPath"], "mountPath")) == candidate);
            if mounted {
                return self.mount_at(candidate);
            }
            dir = candidate.parent();
        }
        panic!(
            "{}: no volume is mounted at or above {}: it would be on the read-only root file system",
            self.what(),
            path.display()
        )
    }

    /// The volume named `name`.
    fn volume(&self, name: &str) -> &'a Value {
        list(&self.spec["volumes"])
            .iter()
            .find(|volume| volume["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{}: no volume {name}", self.what()))
    }

    /// The value of the pods' `app.kubernetes.io/name` label.
    fn app_label(&self) -> &'a str {
        text(
            &self.doc.value["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
            "pod label app.kubernetes.io/name",
        )
    }

    /// The container port named `name`, or the number itself.
    fn port(&self, port: &Value) -> u16 {
        if let Some(number) = port.as_u64() {
            return u16::try_from(number).unwrap();
        }
        let name = text(port, "port");
        let port = list(&self.container["ports"])
            .iter()
            .find(|port| port["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("{}: no container port named {name}", self.what()));
        u16::try_from(port["containerPort"].as_u64().unwrap()).unwrap()
    }
}

/// The container's environment as the pod gets it, in order.
fn environment(docs: &[Doc], pod: &Pod, pod_name: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for entry in list(&pod.container["env"]) {
        let name = text(&entry["name"], "env name").to_owned();
        let from = &entry["valueFrom"];
        let value = if let Some(value) = entry["value"].as_str() {
            // $(VAR) names a variable defined above it.
            let mut value = value.to_owned();
            for (defined, its) in &env {
                value = value.replace(&format!("$({defined})"), its);
            }
            assert!(
                !value.contains("$("),
                "{}: {name} refers to an undefined variable: {value}",
                pod.what()
            );
            Some(value)
        } else if !from["fieldRef"].is_null() {
            match text(&from["fieldRef"]["fieldPath"], "fieldPath") {
                "metadata.name" => Some(pod_name.to_owned()),
                "metadata.namespace" => Some("shamal".to_owned()),
                other => panic!("{}: {name} reads {other}, unknown here", pod.what()),
            }
        } else if !from["configMapKeyRef"].is_null() {
            let reference = &from["configMapKeyRef"];
            let map = find(docs, "ConfigMap", text(&reference["name"], "ConfigMap"));
            let key = text(&reference["key"], "key");
            match map.value["data"][key].as_str() {
                Some(value) => Some(value.to_owned()),
                None if reference["optional"].as_bool() == Some(true) => None,
                None => panic!(
                    "{}: {name} needs key {key} of ConfigMap {}, which has none",
                    pod.what(),
                    map.name()
                ),
            }
        } else if !from["secretKeyRef"].is_null() {
            let reference = &from["secretKeyRef"];
            let secret = text(&reference["name"], "Secret");
            let key = text(&reference["key"], "key");
            if reference["optional"].as_bool() == Some(true) {
                None
            } else {
                let stand_in = SECRET_STAND_INS
                    .iter()
                    .find(|(name, its_key, _)| *name == secret && *its_key == key)
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: {name} needs Secret {secret} key {key}: add a stand-in value to SECRET_STAND_INS",
                            pod.what()
                        )
                    });
                Some(stand_in.2.to_owned())
            }
        } else {
            panic!("{}: {name} has no value this test understands", pod.what());
        };
        if let Some(value) = value {
            env.push((name, value));
        }
    }
    env
}

/// A loaded service, and what the checks need of its configuration.
struct Loaded {
    security: SecurityConfig,
    metrics_port: u16,
    /// The registry's address (`host:port`), when it follows one.
    registry: Option<String>,
}

/// Loads the service's configuration as its pod would: its arguments (the
/// `--config` file read from the ConfigMap it mounts) and its variables as
/// flags, then `load`. `extra` flags stand for what the image provides.
fn load<A, C>(
    docs: &[Doc],
    subject: &Subject,
    service: &Service,
    scratch: &Path,
    extra: &[String],
    load: impl FnOnce(&A) -> Result<C, shamal_telemetry::config::ConfigError>,
) -> C
where
    A: clap::Args + clap::FromArgMatches,
{
    let pod = Pod::of(docs, subject);
    let mut arguments = vec![service.name.to_owned()];
    let args = strings(&pod.container["args"], "args");
    assert!(
        !args.iter().any(|arg| arg.starts_with("--insecure")),
        "{}: started --insecure",
        pod.what()
    );
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--config" {
            let path = PathBuf::from(args.next().unwrap());
            let copy = config_file(docs, &pod, subject, &path, scratch);
            arguments.push(arg);
            arguments.push(copy.display().to_string());
        } else {
            arguments.push(arg);
        }
    }
    let command = service.command::<A>();
    for (name, value) in environment(docs, &pod, subject.pod) {
        assert!(
            !name.ends_with("_INSECURE"),
            "{}: {name} is set",
            pod.what()
        );
        let flag = command
            .get_arguments()
            .find(|arg| arg.get_env() == Some(OsStr::new(&name)));
        match flag {
            Some(flag) => arguments.push(format!("--{}={value}", flag.get_long().unwrap())),
            None => assert!(
                !name.starts_with(service.env_prefix),
                "{}: sets {name}, which {} does not read (a typo?)",
                pod.what(),
                service.name
            ),
        }
    }
    arguments.extend(extra.iter().cloned());
    let cli = service
        .try_parse_from::<A, _, _>(&arguments)
        .unwrap_or_else(|error| panic!("{}: {arguments:?}: {error}", pod.what()));
    load(&cli.args).unwrap_or_else(|error| {
        panic!(
            "{}: {} does not load: {error}",
            pod.what(),
            subject.config_key
        )
    })
}

/// Writes the ConfigMap entry the pod sees at `path` into `scratch`, after
/// checking it is the one expected and that it is not insecure.
fn config_file(docs: &[Doc], pod: &Pod, subject: &Subject, path: &Path, scratch: &Path) -> PathBuf {
    let (_, volume) = pod.mount_holding(path);
    let map = text(&volume["configMap"]["name"], "configMap volume");
    let file = path.file_name().unwrap().to_str().unwrap();
    let items = list(&volume["configMap"]["items"]);
    let key = if items.is_empty() {
        file
    } else {
        let item = items
            .iter()
            .find(|item| item["path"].as_str() == Some(file))
            .unwrap_or_else(|| {
                panic!(
                    "{}: {} is not in the config volume",
                    pod.what(),
                    path.display()
                )
            });
        text(&item["key"], "key")
    };
    assert_eq!(
        key,
        subject.config_key,
        "{}: reads another file",
        pod.what()
    );
    let toml_text = text(
        &find(docs, "ConfigMap", map).value["data"][key],
        "ConfigMap entry",
    );
    let parsed: toml::Table =
        toml::from_str(toml_text).unwrap_or_else(|error| panic!("{key} is not TOML: {error}"));
    let insecure = parsed
        .get("security")
        .and_then(|security| security.get("insecure"));
    assert!(
        insecure.is_none(),
        "{key}: [security] insecure must not be set (found {insecure:?})"
    );
    assert!(
        parsed.get("insecure").is_none(),
        "{key}: insecure outside [security]"
    );
    let copy = scratch.join(key);
    std::fs::write(&copy, toml_text).unwrap();
    copy
}

/// What the checks found for one service.
struct Checked {
    security: SecurityConfig,
    /// The Certificate the pod mounts.
    certificate: Value,
}

/// The checks every service passes; see the module's comment.
fn check(docs: &[Doc], subject: &Subject, loaded: &Loaded) -> Checked {
    let pod = Pod::of(docs, subject);
    let what = pod.what();
    let security = &loaded.security;

    // The binary's own start check: TLS (and OIDC when public), no insecure.
    assert!(!security.insecure, "{what}: insecure");
    security
        .validate(subject.exposure)
        .unwrap_or_else(|error| panic!("{what}: would not start: {error}"));

    // The TLS files: one Secret, mounted whole and read-only.
    let files = security.tls_files().unwrap();
    let dir = files.cert.parent().unwrap().to_owned();
    for (path, name) in [
        (&files.cert, "tls.crt"),
        (&files.key, "tls.key"),
        (&files.ca, "ca.crt"),
    ] {
        assert_eq!(
            path,
            &dir.join(name),
            "{what}: the TLS files must be {name} and its siblings in one Secret volume"
        );
    }
    let (mount, volume) = pod.mount_at(&dir);
    assert_eq!(
        mount["readOnly"].as_bool(),
        Some(true),
        "{what}: mount the TLS Secret read-only"
    );
    assert!(
        mount["subPath"].is_null() && mount["subPathExpr"].is_null(),
        "{what}: a subPath mount is never updated: renewed certificates would not reach the service"
    );
    let volume_name = text(&volume["name"], "volume name");
    for other in list(&pod.container["volumeMounts"]) {
        if other["name"].as_str() == Some(volume_name) {
            assert!(
                other["subPath"].is_null(),
                "{what}: {volume_name} mounted with subPath"
            );
        }
    }
    let secret = &volume["secret"];
    let secret_name = text(&secret["secretName"], "secret volume").to_owned();
    for item in list(&secret["items"]) {
        assert_eq!(
            item["key"], item["path"],
            "{what}: the Secret's keys must keep their names"
        );
    }
    // Readable by the pod's user: world-readable, or group-readable with
    // the pod's fsGroup as its group (kubelet gives the files that group).
    let mode = file_mode(&secret["defaultMode"]);
    if mode & 0o004 == 0 {
        assert!(
            mode & 0o040 != 0,
            "{what}: defaultMode {mode:o} leaves the key unreadable by user 10001"
        );
        let context = &pod.spec["securityContext"];
        assert!(
            !context["fsGroup"].is_null() && context["fsGroup"] == context["runAsGroup"],
            "{what}: defaultMode {mode:o} needs fsGroup = runAsGroup to be readable"
        );
    }

    // Its Certificate.
    let certificate = docs
        .iter()
        .find(|doc| {
            doc.kind() == "Certificate"
                && doc.value["spec"]["secretName"].as_str() == Some(&secret_name)
        })
        .unwrap_or_else(|| panic!("{what}: no Certificate writes the Secret {secret_name}"));
    let spec = &certificate.value["spec"];
    let cert_what = format!("Certificate {} ({})", certificate.name(), certificate.file);
    let issuer = &spec["issuerRef"];
    if issuer["kind"].as_str().unwrap_or("Issuer") == "Issuer" {
        find(docs, "Issuer", text(&issuer["name"], "issuerRef name"));
    }
    let uris = strings(&spec["uris"], "uris");
    assert_eq!(uris.len(), 1, "{cert_what}: exactly one SPIFFE URI");
    let identity = PeerIdentity::from_uri(&uris[0]).unwrap_or_else(|| {
        panic!(
            "{cert_what}: {} is not spiffe://<td>/<service>/<id>",
            uris[0]
        )
    });
    assert_eq!(
        identity.service, subject.spiffe_service,
        "{cert_what}: names the wrong service"
    );
    assert_eq!(
        identity.trust_domain, security.trust_domain,
        "{cert_what}: its trust domain is not the one {what} accepts (trust_domain in shamal-security)"
    );
    let usages = strings(&spec["usages"], "usages");
    for usage in ["server auth", "client auth"] {
        assert!(
            usages.iter().any(|have| have == usage),
            "{cert_what}: usages lack {usage}"
        );
    }
    let key = &spec["privateKey"];
    assert_eq!(key["algorithm"].as_str(), Some("ECDSA"), "{cert_what}");
    assert_eq!(key["size"].as_u64(), Some(256), "{cert_what}");
    assert_eq!(
        key["rotationPolicy"].as_str(),
        Some("Always"),
        "{cert_what}"
    );
    let duration = go_duration(text(&spec["duration"], "duration"));
    let renew_before = go_duration(text(&spec["renewBefore"], "renewBefore"));
    assert!(
        duration <= Duration::from_secs(7 * 24 * 3600),
        "{cert_what}: keep certificates short-lived ({duration:?})"
    );
    assert!(
        renew_before < duration && renew_before >= duration / 4,
        "{cert_what}: renewBefore {renew_before:?} should leave room before expiry"
    );

    // OIDC where people call.
    if subject.oidc {
        let issuer = security.oidc_issuer.as_deref().unwrap_or_default();
        assert!(
            issuer.starts_with("https://"),
            "{what}: oidc_issuer must be an https URL, is {issuer:?}"
        );
        assert!(
            security
                .oidc_audience
                .as_deref()
                .is_some_and(|audience| !audience.is_empty()),
            "{what}: oidc_audience"
        );
    } else {
        assert!(!security.oidc_on(), "{what}: takes no tokens");
    }

    // Probes: plain HTTP on the metrics port.
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let probe_value = &pod.container[probe];
        if probe_value.is_null() {
            assert!(probe == "startupProbe", "{what}: no {probe}");
            continue;
        }
        let get = &probe_value["httpGet"];
        assert!(
            !get.is_null(),
            "{what}: {probe} must be an HTTP GET on the metrics port (a gRPC or TCP probe cannot speak TLS)"
        );
        assert!(
            get["scheme"].is_null() || get["scheme"].as_str() == Some("HTTP"),
            "{what}: {probe}: the metrics port is plain HTTP"
        );
        assert_eq!(
            pod.port(&get["port"]),
            loaded.metrics_port,
            "{what}: {probe} must use the metrics port"
        );
    }
    Checked {
        security: security.clone(),
        certificate: certificate.value.clone(),
    }
}

/// A Kubernetes quantity of bytes (`512Mi`, `1Gi`, `1000000`).
fn quantity(text: &str) -> u64 {
    for (suffix, unit) in [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ] {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.parse::<u64>().unwrap() * unit;
        }
    }
    text.parse()
        .unwrap_or_else(|_| panic!("quantity {text:?} not understood here"))
}

/// A producer's `[audit]` table: it dials the audit Service by a name the
/// audit Certificate carries (https), fails closed, and spools to a
/// writable volume of its pod with room for the whole spool. Gives the host
/// it dials.
fn check_audit_producer(
    docs: &[Doc],
    subject: &Subject,
    audit: &shamal_audit_client::AuditClientConfig,
    audit_pod: &Pod,
    audit_grpc_port: u16,
) -> String {
    let pod = Pod::of(docs, subject);
    let what = format!("{} [audit] of {}", subject.config_key, pod.what());
    audit
        .validate()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    let endpoint = audit
        .endpoint
        .as_deref()
        .unwrap_or_else(|| panic!("{what}: no endpoint: auditing is off"));
    assert!(
        endpoint.starts_with("https://"),
        "{what}: {endpoint} must be https (mTLS to the audit service)"
    );
    let host = host_of(endpoint).to_owned();
    let port: u16 = endpoint.rsplit_once(':').unwrap().1.parse().unwrap();
    let service = find(docs, "Service", host.split('.').next().unwrap());
    assert!(
        host == service.name() || host.starts_with(&format!("{}.shamal.", service.name())),
        "{what}: {host} is not the Service {} in the namespace shamal",
        service.name()
    );
    assert_eq!(
        service.value["spec"]["selector"]["app.kubernetes.io/name"].as_str(),
        Some(audit_pod.app_label()),
        "{what}: Service {} does not select the audit pods",
        service.name()
    );
    let service_port = list(&service.value["spec"]["ports"])
        .iter()
        .find(|candidate| candidate["port"].as_u64() == Some(u64::from(port)))
        .unwrap_or_else(|| panic!("{what}: Service {} has no port {port}", service.name()));
    assert_eq!(
        audit_pod.port(&service_port["targetPort"]),
        audit_grpc_port,
        "{what}: Service {} port {port} does not lead to the audit gRPC port",
        service.name()
    );
    assert_eq!(
        audit.on_full,
        shamal_audit_client::OnFull::FailClosed,
        "{what}: a call must not be served unrecorded"
    );

    // The spool: a writable volume of this pod, with room for it.
    let (mount, volume) = pod.mount_containing(&audit.spool_dir);
    assert_ne!(
        mount["readOnly"].as_bool(),
        Some(true),
        "{what}: the spool's volume is mounted read-only"
    );
    let room = audit.max_spool_bytes + audit.segment_bytes;
    let size = if !volume["emptyDir"].is_null() {
        let dir = &volume["emptyDir"];
        assert_ne!(
            dir["medium"].as_str(),
            Some("Memory"),
            "{what}: a memory-backed spool is lost with the container"
        );
        quantity(text(&dir["sizeLimit"], "the spool's emptyDir sizeLimit"))
    } else if !volume["persistentVolumeClaim"].is_null() {
        let claim = find(
            docs,
            "PersistentVolumeClaim",
            text(&volume["persistentVolumeClaim"]["claimName"], "claimName"),
        );
        quantity(text(
            &claim.value["spec"]["resources"]["requests"]["storage"],
            "storage request",
        ))
    } else {
        panic!("{what}: the spool must be on an emptyDir or a PersistentVolumeClaim: {volume:?}")
    };
    assert!(
        size > room,
        "{what}: the spool's volume ({size} bytes) has no room for max_spool_bytes and a segment ({room})"
    );
    host
}

/// The signing key reaches the service as `Signer::load` accepts it: a
/// 0400 copy, owned by the pod's user, made by an init container from the
/// key's Secret into a memory-backed volume the service mounts read-only.
fn check_signing_key(pod: &Pod, key_file: &Path, scratch: &Path) {
    let what = pod.what();
    let (mount, volume) = pod.mount_holding(key_file);
    assert_eq!(
        mount["readOnly"].as_bool(),
        Some(true),
        "{what}: mount the signing key read-only (a missing key must not be replaced by a new one)"
    );
    assert_eq!(
        volume["emptyDir"]["medium"].as_str(),
        Some("Memory"),
        "{what}: the key's copy belongs in memory, not on the node's disk"
    );
    let copy_volume = text(&volume["name"], "volume name");
    let init = list(&pod.spec["initContainers"])
        .iter()
        .find(|init| {
            list(&init["volumeMounts"])
                .iter()
                .any(|mount| mount["name"].as_str() == Some(copy_volume))
        })
        .unwrap_or_else(|| panic!("{what}: no init container writes the volume {copy_volume}"));
    let context = &init["securityContext"];
    assert!(
        context["runAsUser"].is_null()
            || context["runAsUser"] == pod.spec["securityContext"]["runAsUser"],
        "{what}: the key's copy must belong to the service's user"
    );
    let mut secret_file = None;
    for init_mount in list(&init["volumeMounts"]) {
        let source = pod.volume(text(&init_mount["name"], "volumeMount name"));
        if source["secret"].is_null() {
            continue;
        }
        let items = list(&source["secret"]["items"]);
        assert_eq!(items.len(), 1, "{what}: the key's Secret volume: one item");
        secret_file = Some((
            Path::new(text(&init_mount["mountPath"], "mountPath"))
                .join(text(&items[0]["path"], "item path")),
            file_mode(&source["secret"]["defaultMode"]),
        ));
    }
    let (secret_file, secret_mode) =
        secret_file.unwrap_or_else(|| panic!("{what}: the init container mounts no Secret"));
    let command = strings(&init["command"], "command").join(" ");
    let install = format!(
        "install -m 0400 {} {}",
        secret_file.display(),
        key_file.display()
    );
    assert!(
        command.contains(&install),
        "{what}: the init container must run `{install}`: {command}"
    );

    // Why: the Secret's file as kubelet writes it with fsGroup (at least
    // group-readable) is refused, the 0400 copy accepted, and the key
    // OpenSSL writes parses.
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch.join("audit-key");
    std::fs::create_dir_all(&dir).unwrap();
    let from_secret = dir.join("from-secret.pem");
    std::fs::write(&from_secret, RFC8410_PRIVATE_KEY).unwrap();
    std::fs::set_permissions(
        &from_secret,
        std::fs::Permissions::from_mode(u32::try_from(secret_mode | 0o440).unwrap()),
    )
    .unwrap();
    let refused = shamal_audit::Signer::load(&from_secret).unwrap_err();
    assert!(refused.to_string().contains("group or others"), "{refused}");
    let copied = dir.join("signing-key.pem");
    std::fs::copy(&from_secret, &copied).unwrap();
    std::fs::set_permissions(&copied, std::fs::Permissions::from_mode(0o400)).unwrap();
    let signer = shamal_audit::Signer::load(&copied)
        .unwrap_or_else(|error| panic!("the 0400 copy is refused: {error}"));
    assert_eq!(signer.public_key().to_pem(), RFC8410_PUBLIC_KEY);

    // A fresh key from OpenSSL itself, when it is installed.
    let generated = dir.join("openssl.pem");
    match std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&generated)
        .status()
    {
        Ok(status) => {
            assert!(status.success(), "openssl genpkey: {status}");
            let public = std::process::Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(&generated)
                .output()
                .unwrap();
            assert!(public.status.success(), "openssl pkey -pubout");
            let signer =
                shamal_audit::Signer::from_pem(&std::fs::read_to_string(&generated).unwrap())
                    .unwrap_or_else(|error| panic!("openssl's Ed25519 key: {error}"));
            assert_eq!(
                signer.public_key().to_pem(),
                String::from_utf8(public.stdout).unwrap(),
                "the published public key (openssl pkey -pubout) is not the one that signs"
            );
        }
        Err(error) => eprintln!("openssl not run ({error}): checked with RFC 8410's key only"),
    }
}

/// Whether a NetworkPolicy peer list lets pods labelled `label` in.
fn peers_include(peers: &Value, label: &str) -> bool {
    list(peers).iter().any(|peer| {
        peer["namespaceSelector"].is_null()
            && peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str() == Some(label)
    })
}

/// Whether a rule's ports include TCP `port`.
fn rule_allows_port(rule: &Value, port: u16) -> bool {
    list(&rule["ports"])
        .iter()
        .any(|allowed| allowed["port"].as_u64() == Some(u64::from(port)))
}

/// The network policies let `producers` reach the audit gRPC port (in at
/// the audit pods, and out of producers whose egress is restricted), and
/// nobody else.
fn check_audit_network(docs: &[Doc], audit_label: &str, producers: &[&str], port: u16) {
    let selects = |doc: &Doc, label: &str| {
        doc.value["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str()
            == Some(label)
    };
    let policies: Vec<&Doc> = docs
        .iter()
        .filter(|doc| doc.kind() == "NetworkPolicy")
        .collect();
    let types = |doc: &Doc| strings(&doc.value["spec"]["policyTypes"], "policyTypes");
    let ingress = policies
        .iter()
        .find(|doc| selects(doc, audit_label) && types(doc).iter().any(|t| t == "Ingress"))
        .unwrap_or_else(|| panic!("no NetworkPolicy limits who reaches the audit service"));
    let rules: Vec<&Value> = list(&ingress.value["spec"]["ingress"])
        .iter()
        .filter(|rule| rule_allows_port(rule, port))
        .collect();
    assert!(
        rules.iter().all(|rule| !rule["from"].is_null()),
        "NetworkPolicy {}: {port} open to everyone",
        ingress.name()
    );
    for producer in producers {
        assert!(
            rules
                .iter()
                .any(|rule| peers_include(&rule["from"], producer)),
            "NetworkPolicy {}: {producer} cannot reach {port}",
            ingress.name()
        );
        for egress in policies
            .iter()
            .filter(|doc| selects(doc, producer) && types(doc).iter().any(|t| t == "Egress"))
        {
            assert!(
                list(&egress.value["spec"]["egress"]).iter().any(|rule| {
                    rule_allows_port(rule, port)
                        && (rule["to"].is_null() || peers_include(&rule["to"], audit_label))
                }),
                "NetworkPolicy {}: {producer} may not connect to the audit service",
                egress.name()
            );
        }
    }
}

/// Writes a certificate shaped like `certificate` (its URI, DNS names and
/// IP addresses), issued by `ca`, as its Secret's three files.
fn issue_like(ca: &DevCa, certificate: &Value, dir: &Path) -> TlsFiles {
    let spec = &certificate["spec"];
    let uri = strings(&spec["uris"], "uris").remove(0);
    let identity = PeerIdentity::from_uri(&uri).unwrap();
    let mut hosts = strings(&spec["dnsNames"], "dnsNames");
    hosts.extend(strings(&spec["ipAddresses"], "ipAddresses"));
    issue_for(
        ca,
        &identity,
        &hosts,
        &dir.join(text(&spec["secretName"], "secretName")),
    )
}

fn issue_for(ca: &DevCa, identity: &PeerIdentity, hosts: &[String], dir: &Path) -> TlsFiles {
    let now = SystemTime::now();
    let (cert, key) = shamal_tls::issue(
        ca,
        identity,
        hosts,
        now - Duration::from_secs(3600),
        now + Duration::from_secs(24 * 3600),
    )
    .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let files = TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: dir.join("ca.crt"),
    };
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(&files.ca, ca.cert_pem()).unwrap();
    files
}

/// A TLS handshake in memory between `client` and `server`, the client
/// dialling `host`. Gives the client's identity as the server saw it.
fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
    host: &str,
) -> Result<Option<PeerIdentity>, String> {
    let name = ServerName::try_from(host.to_owned()).map_err(|error| error.to_string())?;
    let mut client = rustls::Connection::Client(
        rustls::ClientConnection::new(client, name).map_err(|error| error.to_string())?,
    );
    let mut server = rustls::Connection::Server(
        rustls::ServerConnection::new(server).map_err(|error| error.to_string())?,
    );
    for _ in 0..32 {
        let sent = pump(&mut client, &mut server).map_err(|error| format!("server: {error}"))?;
        let answered =
            pump(&mut server, &mut client).map_err(|error| format!("client: {error}"))?;
        if !sent && !answered {
            break;
        }
    }
    if client.is_handshaking() || server.is_handshaking() {
        return Err("the handshake did not finish".to_owned());
    }
    let rustls::Connection::Server(server) = server else {
        unreachable!()
    };
    Ok(server
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| shamal_tls::certificate_identity(cert)))
}

/// Moves what `from` has to send into `to`; whether anything moved.
fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) -> Result<bool, rustls::Error> {
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).unwrap();
    }
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).unwrap();
        to.process_new_packets()?;
    }
    Ok(!bytes.is_empty())
}

/// A client with only the CA (no certificate): people and applications.
fn anonymous_client(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

fn host_of(address: &str) -> &str {
    let address = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

#[tokio::test]
async fn the_manifests_start_every_service_zero_trust() {
    let docs = manifests();
    let scratch = tempfile::tempdir().unwrap();

    // The registry.
    let registry_config: shamal_registry::RegistryConfig = load(
        &docs,
        &REGISTRY,
        &shamal_registry::config::SERVICE,
        scratch.path(),
        &[],
        shamal_registry::RegistryConfig::load,
    );
    let registry = check(
        &docs,
        &REGISTRY,
        &Loaded {
            security: registry_config.security.clone(),
            metrics_port: registry_config.metrics_listen.unwrap().port(),
            registry: None,
        },
    );

    // The router.
    let router_config: shamal_router::RouterConfig = load(
        &docs,
        &ROUTER,
        &shamal_router::config::SERVICE,
        scratch.path(),
        &[],
        shamal_router::RouterConfig::load,
    );
    let router_loaded = Loaded {
        security: router_config.security.clone(),
        metrics_port: router_config.metrics_listen.unwrap().port(),
        registry: router_config.registry.clone(),
    };
    let router = check(&docs, &ROUTER, &router_loaded);

    // The cpu-worker. Its image provides ONNX Runtime (ORT_DYLIB_PATH) and
    // the pod the model repository: both stand in here, after checking that
    // the pod mounts the repository the file names.
    let worker_pod = Pod::of(&docs, &CPU_WORKER);
    let worker_toml: toml::Table = toml::from_str(text(
        &find(&docs, "ConfigMap", "shamal-config").value["data"]["cpu-worker.toml"],
        "cpu-worker.toml",
    ))
    .unwrap();
    if let Some(repository) = worker_toml.get("model_repository") {
        worker_pod.mount_at(Path::new(repository.as_str().unwrap()));
    }
    let library = scratch.path().join("libonnxruntime.so");
    std::fs::write(&library, b"").unwrap();
    let repository = scratch.path().join("models");
    std::fs::create_dir(&repository).unwrap();
    let worker_config: shamal_cpu_worker::CpuWorkerConfig = load(
        &docs,
        &CPU_WORKER,
        &shamal_cpu_worker::config::SERVICE,
        scratch.path(),
        &[
            format!("--onnxruntime-library={}", library.display()),
            format!("--model-repository={}", repository.display()),
        ],
        shamal_cpu_worker::CpuWorkerConfig::load,
    );
    let worker_loaded = Loaded {
        security: worker_config.node.security.clone(),
        metrics_port: worker_config.node.metrics_listen.unwrap().port(),
        registry: worker_config.node.registry.clone(),
    };
    let worker = check(&docs, &CPU_WORKER, &worker_loaded);

    // The audit service, and its signing key.
    let audit_config: shamal_audit_service::AuditConfig = load(
        &docs,
        &AUDIT,
        &shamal_audit_service::config::SERVICE,
        scratch.path(),
        &[],
        shamal_audit_service::AuditConfig::load,
    );
    let audit = check(
        &docs,
        &AUDIT,
        &Loaded {
            security: audit_config.security.clone(),
            metrics_port: audit_config.metrics_listen.unwrap().port(),
            registry: None,
        },
    );
    let audit_pod = Pod::of(&docs, &AUDIT);
    assert!(
        audit_config.database_url.starts_with("postgres://"),
        "audit.toml: the audit log belongs in PostgreSQL, not in the pod"
    );
    check_signing_key(&audit_pod, &audit_config.signing_key_file, scratch.path());

    // The producers' [audit] tables, as their loaders took them.
    let audit_grpc_port = audit_config.grpc_listen.port();
    let producers = [
        (
            "router",
            check_audit_producer(
                &docs,
                &ROUTER,
                &router_config.audit,
                &audit_pod,
                audit_grpc_port,
            ),
        ),
        (
            "registry",
            check_audit_producer(
                &docs,
                &REGISTRY,
                &registry_config.audit,
                &audit_pod,
                audit_grpc_port,
            ),
        ),
        (
            "cpu-worker",
            check_audit_producer(
                &docs,
                &CPU_WORKER,
                &worker_config.node.audit,
                &audit_pod,
                audit_grpc_port,
            ),
        ),
    ];
    check_audit_network(
        &docs,
        audit_pod.app_label(),
        &[
            Pod::of(&docs, &ROUTER).app_label(),
            Pod::of(&docs, &REGISTRY).app_label(),
            Pod::of(&docs, &CPU_WORKER).app_label(),
        ],
        audit_grpc_port,
    );

    // One trust domain and one OpenID provider for all.
    let mut trust_domains = BTreeMap::new();
    for (name, checked) in [
        ("registry", &registry),
        ("router", &router),
        ("cpu-worker", &worker),
        ("audit", &audit),
    ] {
        trust_domains.insert(checked.security.trust_domain.clone(), name);
    }
    assert_eq!(
        trust_domains.len(),
        1,
        "trust domains differ: {trust_domains:?}"
    );
    assert_eq!(
        registry.security.oidc_issuer, router.security.oidc_issuer,
        "the router and the registry trust different issuers"
    );
    assert_eq!(
        registry.security.oidc_audience,
        router.security.oidc_audience
    );
    assert_eq!(
        (&audit.security.oidc_issuer, &audit.security.oidc_audience),
        (&router.security.oidc_issuer, &router.security.oidc_audience),
        "the audit service trusts another provider than the router"
    );

    // Where peers dial: the registry's Service, each worker's stable name
    // under its headless Service.
    let registry_host = host_of(router_loaded.registry.as_deref().unwrap()).to_owned();
    assert_eq!(
        host_of(worker_loaded.registry.as_deref().unwrap()),
        registry_host,
        "router and workers dial the registry by different names"
    );
    let service = find(&docs, "Service", registry_host.split('.').next().unwrap());
    assert!(
        list(&service.value["spec"]["ports"])
            .iter()
            .any(|port| port["port"].as_u64() == Some(8201)),
        "Service {} lacks the registry's gRPC port",
        service.name()
    );
    let advertised = worker_config
        .node
        .advertise_address
        .clone()
        .expect("workers advertise their stable name");
    let worker_host = host_of(&advertised).to_owned();
    let statefulset = &worker_pod.doc.value;
    assert_eq!(
        worker_host,
        format!(
            "{}.{}.{}.svc",
            CPU_WORKER.pod,
            text(&statefulset["spec"]["serviceName"], "serviceName"),
            text(&statefulset["metadata"]["namespace"], "namespace")
        ),
        "the advertised address is not the pod's DNS name under its headless Service"
    );

    // Handshakes with certificates shaped like the Certificates.
    let ca = DevCa::generate().unwrap();
    let pki = scratch.path().join("pki");
    let registry_files = issue_like(&ca, &registry.certificate, &pki);
    let router_files = issue_like(&ca, &router.certificate, &pki);
    let worker_files = issue_like(&ca, &worker.certificate, &pki);
    let worker_server = ServerTls::new(&worker_files, ClientAuth::Required)
        .unwrap()
        .rustls_config();
    let registry_server = ServerTls::new(&registry_files, ClientAuth::Optional)
        .unwrap()
        .rustls_config();
    let router_server = ServerTls::new(&router_files, ClientAuth::Optional)
        .unwrap()
        .rustls_config();
    let router_client = ClientTls::new(&router_files).unwrap();
    let worker_client = ClientTls::new(&worker_files).unwrap();

    let seen = handshake(
        router_client
            .expect_service("worker")
            .rustls_client_config(),
        worker_server.clone(),
        &worker_host,
    )
    .unwrap_or_else(|error| {
        panic!("router → worker at {worker_host} (the advertised address) fails: {error}")
    });
    assert_eq!(
        seen.map(|identity| identity.service).as_deref(),
        Some("router")
    );

    for (caller, client, service) in [
        ("router", &router_client, "router"),
        ("worker", &worker_client, "worker"),
    ] {
        let seen = handshake(
            client.expect_service("registry").rustls_client_config(),
            registry_server.clone(),
            &registry_host,
        )
        .unwrap_or_else(|error| panic!("{caller} → registry at {registry_host} fails: {error}"));
        assert_eq!(
            seen.map(|identity| identity.service).as_deref(),
            Some(service)
        );
    }

    // People and applications: the router's Service names (and loopback,
    // for port-forwards), trusting the CA alone, with no certificate.
    let anonymous = anonymous_client(&router_files.ca);
    for host in [
        "router.shamal.svc",
        "router.shamal.svc.cluster.local",
        "localhost",
        "127.0.0.1",
    ] {
        let seen = handshake(anonymous.clone(), router_server.clone(), host)
            .unwrap_or_else(|error| panic!("client → router at {host} fails: {error}"));
        assert_eq!(seen, None);
    }
    // Release managers, through a port-forward (the CLI, the web UI's
    // default origin https://127.0.0.1:8200).
    for host in ["localhost", "127.0.0.1"] {
        handshake(anonymous.clone(), registry_server.clone(), host).unwrap_or_else(|error| {
            panic!("port-forward to the registry at {host} fails: {error}")
        });
    }

    // Producers → the audit service at the host they dial, with the
    // identities its access policy keys on; admins (tokens, no
    // certificate) at the Service and through a port-forward.
    let audit_files = issue_like(&ca, &audit.certificate, &pki);
    let audit_server = ServerTls::new(&audit_files, ClientAuth::Optional)
        .unwrap()
        .rustls_config();
    let registry_client = ClientTls::new(&registry_files).unwrap();
    let audit_host = producers[0].1.clone();
    for (producer, host) in &producers {
        assert_eq!(
            host, &audit_host,
            "{producer} dials the audit service by another name"
        );
    }
    for (caller, client, service) in [
        ("router", &router_client, "router"),
        ("registry", &registry_client, "registry"),
    ] {
        let seen = handshake(
            client.expect_service("audit").rustls_client_config(),
            audit_server.clone(),
            &audit_host,
        )
        .unwrap_or_else(|error| panic!("{caller} → audit at {audit_host} fails: {error}"));
        assert_eq!(
            seen.map(|identity| identity.service).as_deref(),
            Some(service)
        );
    }
    for host in [audit_host.as_str(), "localhost", "127.0.0.1"] {
        let seen = handshake(anonymous.clone(), audit_server.clone(), host)
            .unwrap_or_else(|error| panic!("admin → audit at {host} fails: {error}"));
        assert_eq!(seen, None);
    }
    // A producer expecting the audit service refuses another service's
    // certificate.
    assert!(
        handshake(
            router_client.expect_service("audit").rustls_client_config(),
            registry_server.clone(),
            &registry_host,
        )
        .is_err()
    );

    // The workers refuse callers without a certificate, and the router's
    // certificate is not the registry's.
    assert!(handshake(anonymous, worker_server, &worker_host).is_err());
    assert!(
        handshake(
            worker_client
                .expect_service("registry")
                .rustls_client_config(),
            router_server,
            "router.shamal.svc",
        )
        .is_err()
    );

    // Why the workers advertise <pod>.cpu-worker.shamal.svc rather than the
    // shorter <pod>.cpu-worker: no wildcard certificate matches the latter.
    let short = issue_for(
        &ca,
        &PeerIdentity::new(&worker.security.trust_domain, "worker", "short"),
        &["*.cpu-worker".to_owned()],
        &pki.join("short"),
    );
    let short_server = ServerTls::new(&short, ClientAuth::Required)
        .unwrap()
        .rustls_config();
    assert!(
        handshake(
            router_client
                .expect_service("worker")
                .rustls_client_config(),
            short_server,
            "cpu-worker-0.cpu-worker",
        )
        .is_err()
    );
}

#[test]
fn the_helpers_read_manifests_as_kubernetes_does() {
    assert_eq!(go_duration("24h"), Duration::from_secs(24 * 3600));
    assert_eq!(go_duration("1h30m"), Duration::from_secs(5400));
    let yaml: Value = serde_yaml::from_str("a: 0440\nb: 288\nc: 0o400\n").unwrap();
    assert_eq!(
        file_mode(&yaml["a"]),
        0o440,
        "YAML 1.1 octal, as kubectl reads it"
    );
    assert_eq!(file_mode(&yaml["b"]), 0o440);
    assert_eq!(file_mode(&yaml["c"]), 0o400);
    assert_eq!(file_mode(&yaml["missing"]), 0o644);
    assert_eq!(host_of("registry:8201"), "registry");
    assert_eq!(quantity("512Mi"), 512 << 20);
    assert_eq!(quantity("1Gi"), 1 << 30);
    assert_eq!(quantity("1000"), 1000);
    assert_eq!(
        host_of("https://cpu-worker-0.cpu-worker.shamal.svc:8101"),
        "cpu-worker-0.cpu-worker.shamal.svc"
    );
}
