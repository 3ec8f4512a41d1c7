//! Issuing, saving and loading, and what loading refuses.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::ca::check_node_id;
use std::fs;

#[test]
fn node_ids_are_checked() {
    assert!(check_node_id("node-1.a_b").is_ok());
    for bad in [
        "",
        ".hidden",
        "-rf",
        "a/b",
        "..",
        "a b",
        "a\r\nb",
        &"x".repeat(65),
    ] {
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

/// The development CA lives in a private directory: one that another user made, that others
/// may write, or that is a symlink is refused before anything is written, and a key file
/// that is a symlink (planted, say, to a key the attacker knows) is not loaded.
#[test]
fn the_dev_ca_lives_in_a_private_directory() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let ca = DevCa::generate().unwrap();
    let open = t.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    let e = ca.save(&open).unwrap_err();
    assert!(
        matches!(e, PkiError::Private(PrivateError::Writable { .. })),
        "{e}"
    );
    assert!(!open.join(CA_KEY_FILE).exists());
    let real = t.path().join("real");
    ca.save(&real).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = ca.save(&link).unwrap_err();
    assert!(
        matches!(e, PkiError::Private(PrivateError::Symlink { .. })),
        "{e}"
    );
    let e = DevCa::load(&link).unwrap_err();
    assert!(
        matches!(e, PkiError::Private(PrivateError::Symlink { .. })),
        "{e}"
    );
    if nix::unistd::geteuid().is_root() {
        let theirs = t.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = ca.save(&theirs).unwrap_err();
        assert!(
            matches!(e, PkiError::Private(PrivateError::Owner { .. })),
            "{e}"
        );
        assert!(fs::read_dir(&theirs).unwrap().next().is_none());
    }

    // A planted symlink at the key: the same key, even, is not loaded through a link.
    let copy = t.path().join("copy.key");
    fs::copy(real.join(CA_KEY_FILE), &copy).unwrap();
    fs::remove_file(real.join(CA_KEY_FILE)).unwrap();
    std::os::unix::fs::symlink(&copy, real.join(CA_KEY_FILE)).unwrap();
    let e = DevCa::load(&real).unwrap_err();
    assert!(
        matches!(e, PkiError::Private(PrivateError::Symlink { .. })),
        "{e}"
    );
    // Saving again replaces the link with a real file; the link's target is untouched.
    let before = fs::read(&copy).unwrap();
    ca.save(&real).unwrap();
    assert_eq!(fs::read(&copy).unwrap(), before);
    DevCa::load(&real).unwrap();
    // A key others may read is not loaded either.
    fs::set_permissions(real.join(CA_KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
    let e = DevCa::load(&real).unwrap_err();
    assert!(
        matches!(e, PkiError::Private(PrivateError::Readable { .. })),
        "{e}"
    );
}
