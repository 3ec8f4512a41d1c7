//! Issuing, saving and loading, and what loading refuses.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::ca::check_node_id;
use std::fs;

#[test]
fn node_ids_are_checked() {
    assert!(check_node_id("node-1.a_b").is_ok());
    for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
        assert!(check_node_id(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn save_load_issue_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate().unwrap();
    ca.save(dir.path()).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let loaded = DevCa::load(dir.path()).unwrap();
    let files = loaded
        .issue("node-a")
        .unwrap()
        .save(dir.path(), "node-a")
        .unwrap();
    assert_eq!(files, TlsFiles::in_dir(dir.path(), "node-a"));
    let tls = NodeTls::load(&files).unwrap();
    tls.server_config().unwrap();
    tls.quic_client_config().unwrap();
    let files = loaded
        .issue_control()
        .unwrap()
        .save(dir.path(), CONTROL_SERVER_NAME)
        .unwrap();
    assert_eq!(files, TlsFiles::in_dir(dir.path(), CONTROL_SERVER_NAME));
    ControlTls::load(&files).unwrap();
}

#[test]
fn load_names_the_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate().unwrap();
    let files = ca
        .issue("node-a")
        .unwrap()
        .save(dir.path(), "node-a")
        .unwrap();
    fs::write(&files.key, "not a key").unwrap();
    let err = NodeTls::load(&files).unwrap_err().to_string();
    assert!(err.contains("node-a.key"), "{err}");
}

#[test]
fn cert_from_other_ca_is_rejected_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate().unwrap();
    let other = DevCa::generate().unwrap();
    let mut cert = other.issue("node-a").unwrap();
    cert.ca_pem = ca.cert_pem().to_owned();
    let files = cert.save(dir.path(), "node-a").unwrap();
    assert!(matches!(
        NodeTls::load(&files),
        Err(PkiError::BadNodeCert { .. })
    ));
    let mut control = other.issue_control().unwrap();
    control.ca_pem = ca.cert_pem().to_owned();
    assert!(matches!(
        ControlTls::from_cert(&control),
        Err(PkiError::BadNodeCert { .. })
    ));
}

#[test]
fn mismatched_ca_key_is_rejected_at_load() {
    let dir = tempfile::tempdir().unwrap();
    DevCa::generate().unwrap().save(dir.path()).unwrap();
    let other = tempfile::tempdir().unwrap();
    DevCa::generate().unwrap().save(other.path()).unwrap();
    fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
    assert!(matches!(
        DevCa::load(dir.path()),
        Err(PkiError::CaMismatch { .. })
    ));
}

/// Node and control identities do not stand in for each other: a node certificate cannot
/// serve as control (wrong name), control's cannot be a node (no client usage, wrong name),
/// and no node certificate is issued under control's name.
#[test]
fn node_and_control_certificates_are_not_interchangeable() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate().unwrap();
    let node = ca.issue("node-a").unwrap();
    assert!(matches!(
        ControlTls::from_cert(&node),
        Err(PkiError::BadNodeCert { .. })
    ));
    let files = ca
        .issue_control()
        .unwrap()
        .save(dir.path(), CONTROL_SERVER_NAME)
        .unwrap();
    assert!(matches!(
        NodeTls::load(&files),
        Err(PkiError::BadNodeCert { .. })
    ));
    for reserved in [CONTROL_SERVER_NAME, "Shoal-Control"] {
        assert!(matches!(ca.issue(reserved), Err(PkiError::ReservedName(_))));
    }
}
