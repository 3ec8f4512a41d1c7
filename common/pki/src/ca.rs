//! [`DevCa`]: a development cluster CA that issues node certificates ([`DevCa::issue`]) and
//! control's certificate ([`DevCa::issue_control`]); [`NodeCert`] and [`TlsFiles`], how they are
//! stored.
use crate::files::read_private_pem;
use crate::identity::{parse_roots, verify_server_chain};
use crate::private::{check_private_dir, ensure_private_dir, write_private_file, Secrecy};
use crate::PrivateError;
use crate::{PkiError, CA_CERT_FILE, CA_KEY_FILE, CONTROL_SERVER_NAME, SERVER_NAME};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Subject of the development CA. `load` rebuilds the issuer from it, so it must never change.
const CA_COMMON_NAME: &str = "shoal development cluster CA";
const CA_ORGANIZATION: &str = "shoal";

/// A development cluster CA: a self-signed certificate and its key.
///
/// Production deployments can bring their own CA; only the files described by [`TlsFiles`] matter
/// to a node or to control.
pub struct DevCa {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, CA_ORGANIZATION);
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn dns_san(name: &str, what: &'static str) -> Result<SanType, PkiError> {
    let name = name
        .try_into()
        .map_err(|source| PkiError::Generate { what, source })?;
    Ok(SanType::DnsName(name))
}

impl DevCa {
    /// Generates a fresh CA (ECDSA P-256).
    pub fn generate() -> Result<DevCa, PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "the CA key",
            source,
        })?;
        let params = ca_params();
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: "the CA certificate",
                source,
            })?;
        Ok(DevCa {
            params,
            key,
            cert_pem: cert.pem(),
        })
    }

    /// Loads a CA saved by [`DevCa::save`] from `dir/ca.pem` and `dir/ca.key`, and checks that the
    /// key signs certificates the CA certificate verifies. `dir` must be private
    /// ([`check_private_dir`]), and the files regular files of this user, read without
    /// following a symlink; the key must be unreadable by group and others.
    pub fn load(dir: &Path) -> Result<DevCa, PkiError> {
        check_private_dir(dir)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_private_pem(&cert_path, Secrecy::Public)?;
        let key_pem = read_private_pem(&key_path, Secrecy::Secret)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::Parse {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let ca = DevCa {
            params: ca_params(),
            key,
            cert_pem,
        };
        // The issuer is rebuilt from fixed parameters; prove that it matches the stored certificate.
        let roots = parse_roots(&cert_path, ca.cert_pem.as_bytes())?;
        let probe = ca.issue("ca-load-probe")?;
        let probe_der = CertificateDer::from_pem_slice(probe.cert_pem.as_bytes()).map_err(|e| {
            PkiError::Parse {
                path: cert_path.clone(),
                reason: e.to_string(),
            }
        })?;
        verify_server_chain(roots, &probe_der, &[], SERVER_NAME).map_err(|_| {
            PkiError::CaMismatch {
                cert: cert_path,
                key: key_path,
            }
        })?;
        Ok(ca)
    }

    /// Writes `dir/ca.pem` and `dir/ca.key` (mode 0600), creating `dir` (0700) if needed; a
    /// `dir` that is not private ([`ensure_private_dir`]) is refused before anything is
    /// written.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        ensure_private_dir(dir)?;
        write_private_file(dir, CA_CERT_FILE, self.cert_pem.as_bytes(), Secrecy::Public)?;
        write_private_file(
            dir,
            CA_KEY_FILE,
            self.key.serialize_pem().as_bytes(),
            Secrecy::Secret,
        )?;
        Ok(())
    }

    /// The CA certificate, PEM-encoded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a node certificate signed by this CA: SAN [`SERVER_NAME`] (plus `node_id` when it is a
    /// valid DNS name), usable as both TLS server and client certificate. Refuses the id
    /// [`CONTROL_SERVER_NAME`], which only control's certificate carries.
    pub fn issue(&self, node_id: &str) -> Result<NodeCert, PkiError> {
        check_node_id(node_id)?;
        if node_id.eq_ignore_ascii_case(CONTROL_SERVER_NAME) {
            return Err(PkiError::ReservedName(node_id.to_owned()));
        }
        let mut sans = vec![dns_san(SERVER_NAME, "the node certificate name")?];
        if node_id != SERVER_NAME && DnsName::try_from(node_id).is_ok() {
            if let Ok(name) = dns_san(node_id, "the node certificate name") {
                sans.push(name);
            }
        }
        self.sign(
            node_id,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            ("a node key", "a node certificate"),
        )
    }

    /// Issues control's certificate: SAN [`CONTROL_SERVER_NAME`] only, usable as a TLS server
    /// certificate only. Nodes verify control's metadata API by that name, so no node
    /// certificate can pose as control, and control's key cannot act as a node's client.
    pub fn issue_control(&self) -> Result<NodeCert, PkiError> {
        let sans = vec![dns_san(
            CONTROL_SERVER_NAME,
            "the control certificate name",
        )?];
        self.sign(
            CONTROL_SERVER_NAME,
            sans,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            ("control's key", "control's certificate"),
        )
    }

    fn sign(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        (key_what, cert_what): (&'static str, &'static str),
    ) -> Result<NodeCert, PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: key_what,
            source,
        })?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, CA_ORGANIZATION);
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| PkiError::Generate {
                what: cert_what,
                source,
            })?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// A certificate (a node's, or control's) and its key, PEM-encoded, plus the certificate of the
/// CA that signed it.
#[derive(Clone)]
pub struct NodeCert {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
    /// The issuing CA's certificate.
    pub ca_pem: String,
}

impl fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCert").finish_non_exhaustive()
    }
}

impl NodeCert {
    /// Writes `dir/<name>.pem`, `dir/<name>.key` (mode 0600) and, unless it is already there
    /// with the same content, `dir/ca.pem`; returns the paths for [`crate::NodeTls::load`] (or,
    /// with `name` [`CONTROL_SERVER_NAME`], [`crate::ControlTls::load`]). `dir` is created
    /// (0700) if needed and must be private ([`ensure_private_dir`]).
    pub fn save(&self, dir: &Path, name: &str) -> Result<TlsFiles, PkiError> {
        check_node_id(name)?;
        ensure_private_dir(dir)?;
        let files = TlsFiles::in_dir(dir, name);
        match read_private_pem(&files.ca_cert, Secrecy::Public) {
            Ok(existing) if existing == self.ca_pem => {}
            Ok(_) => {
                return Err(PkiError::Exists {
                    path: files.ca_cert,
                })
            }
            Err(PkiError::Private(PrivateError::Io { source, .. }))
                if source.kind() == io::ErrorKind::NotFound =>
            {
                write_private_file(dir, CA_CERT_FILE, self.ca_pem.as_bytes(), Secrecy::Public)?;
            }
            Err(e) => return Err(e),
        }
        let (cert, key) = (format!("{name}.pem"), format!("{name}.key"));
        write_private_file(dir, &cert, self.cert_pem.as_bytes(), Secrecy::Public)?;
        write_private_file(dir, &key, self.key_pem.as_bytes(), Secrecy::Secret)?;
        Ok(files)
    }
}

/// Where a node (or control) finds its TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file with the cluster CA certificate(s): the only trust anchors.
    pub ca_cert: PathBuf,
    /// PEM file with the certificate (then any intermediates).
    pub cert: PathBuf,
    /// PEM file with the private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The layout of a PKI directory: `dir/ca.pem`, `dir/<name>.pem`, `dir/<name>.key` (control's
    /// `name` is [`CONTROL_SERVER_NAME`]).
    pub fn in_dir(dir: &Path, name: &str) -> TlsFiles {
        TlsFiles {
            ca_cert: dir.join(CA_CERT_FILE),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

/// The protocol's rule of node ids (`shoal_protocol::IdKind::Node`): the id becomes the
/// name of the certificate's files.
pub(crate) fn check_node_id(node_id: &str) -> Result<(), PkiError> {
    shoal_protocol::IdKind::Node
        .check(node_id)
        .map_err(|source| PkiError::InvalidNodeId {
            id: node_id.to_owned(),
            source,
        })
}
