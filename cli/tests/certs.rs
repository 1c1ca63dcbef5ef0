//! `shamal certs init`: the files it writes parse, carry the services'
//! SPIFFE identities, keys are private, and an existing CA is kept.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use shamal_tls::{PeerIdentity, TlsFiles};

fn shamal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shamal"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn leaf_identity(files: &TlsFiles) -> Option<PeerIdentity> {
    let pem = std::fs::read(&files.cert).unwrap();
    let der = CertificateDer::from_pem_slice(&pem).unwrap();
    shamal_tls::certificate_identity(&der)
}

#[test]
fn certs_init_writes_a_ca_and_service_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("pki");
    let target_arg = target.to_str().unwrap();
    let output = shamal(&[
        "certs",
        "init",
        "--dir",
        target_arg,
        "--trust-domain",
        "example.test",
        "--host",
        "worker-0.shamal.svc",
        "--service",
        "router",
        "--service",
        "worker=w-7",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains("spiffe://example.test/worker/w-7"),
        "{stdout}"
    );
    assert!(stdout.contains("hint:"), "{stdout}");

    for name in [
        "ca.pem",
        "ca-key.pem",
        "router.pem",
        "router-key.pem",
        "worker.pem",
        "worker-key.pem",
    ] {
        assert!(target.join(name).is_file(), "{name} missing");
    }
    assert!(!target.join("registry.pem").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca-key.pem", "router-key.pem", "worker-key.pem"] {
            let mode = std::fs::metadata(target.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    // Every pair loads (key matches certificate, CA parses) and names its
    // identity.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for (service, id) in [("router", "router"), ("worker", "w-7")] {
            let files = shamal_tls::dev::service_files(&target, service);
            shamal_tls::ClientTls::new(&files).unwrap();
            shamal_tls::ServerTls::new(&files, shamal_tls::ClientAuth::Required).unwrap();
            assert_eq!(
                leaf_identity(&files),
                Some(PeerIdentity::new("example.test", service, id))
            );
        }
    });
    shamal_tls::DevCa::load(&target).unwrap();

    // An existing CA is not replaced without --force.
    let ca_before = std::fs::read(target.join("ca.pem")).unwrap();
    let again = shamal(&["certs", "init", "--dir", target_arg]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("ca.pem") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(target.join("ca.pem")).unwrap(), ca_before);

    let forced = shamal(&["certs", "init", "--dir", target_arg, "--force"]);
    assert!(forced.status.success(), "{forced:?}");
    assert_ne!(std::fs::read(target.join("ca.pem")).unwrap(), ca_before);
    assert!(target.join("audit.pem").is_file(), "default services");

    // Bad input is a usage error, not a panic.
    let bad = shamal(&[
        "certs",
        "init",
        "--dir",
        target_arg,
        "--force",
        "--service",
        "a b",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
}
