//! Cluster PKI: a development CA, node certificates, and the rustls configurations built from them.
//!
//! Invariants:
//! - Every node certificate carries the DNS name [`SERVER_NAME`] and both the `serverAuth` and
//!   `clientAuth` extended key usages, so one certificate serves a node as QUIC server and client.
//! - [`NodeTls::load`] refuses a certificate that does not chain to the cluster CA or whose key does
//!   not match it, so a misconfigured node fails at start, not at its first handshake.
//! - Configurations use the `ring` provider only, TLS 1.3 only, and require a client certificate
//!   signed by the cluster CA on the server side.
//! - Private keys are written with mode 0600, atomically (temporary file, then rename).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

/// The DNS name every node certificate carries and every peer verifies.
pub const SERVER_NAME: &str = "shoal-node";

/// The ALPN protocol id negotiated on node-to-node QUIC connections.
pub const ALPN: &[u8] = b"shoal/1";

/// File name of the CA certificate inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Longest accepted node id (it becomes a file name and a certificate common name).
const MAX_NODE_ID: usize = 64;

/// Subject of the development CA. `load` rebuilds the issuer from it, so it must never change.
const CA_COMMON_NAME: &str = "shoal development cluster CA";
const CA_ORGANIZATION: &str = "shoal";

/// Errors of certificate generation, storage and loading, each named after the failed step.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Generating a key pair or signing a certificate failed.
    #[error("generating {what}: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The underlying rcgen error.
        #[source]
        source: rcgen::Error,
    },
    /// A node id is empty, too long, or not made of `[A-Za-z0-9._-]` (it becomes a file name).
    #[error("invalid node id {0:?}: use 1-64 characters of [A-Za-z0-9._-], not starting with '.'")]
    InvalidNodeId(String),
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// Writing a file (or creating its directory) failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: io::Error,
    },
    /// A file exists with different content and is not overwritten.
    #[error("{path} exists with different content; refusing to overwrite it")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A PEM file could not be parsed.
    #[error("parsing {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The CA key in a PKI directory does not belong to its CA certificate.
    #[error("{key} does not match {cert} (or the CA was not made by DevCa::generate)")]
    CaMismatch {
        /// The CA certificate file.
        cert: PathBuf,
        /// The CA key file.
        key: PathBuf,
    },
    /// A node certificate is unusable: key mismatch, not signed by the CA, wrong name or usage.
    #[error("certificate {cert} (key {key}) rejected: {source}")]
    BadNodeCert {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why rustls rejected it.
        #[source]
        source: rustls::Error,
    },
    /// The CA file holds a certificate that cannot be a trust anchor.
    #[error("CA certificate {path} rejected: {source}")]
    BadCa {
        /// The CA certificate file.
        path: PathBuf,
        /// Why rustls rejected it.
        #[source]
        source: rustls::Error,
    },
    /// Building a rustls configuration failed.
    #[error("building the TLS {side} configuration: {reason}")]
    Config {
        /// `"server"` or `"client"`.
        side: &'static str,
        /// What went wrong.
        reason: String,
    },
}

/// A development cluster CA: a self-signed certificate and its key.
///
/// Production deployments can bring their own CA; only the files described by [`TlsFiles`] matter
/// to a node.
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
    /// key signs certificates the CA certificate verifies.
    pub fn load(dir: &Path) -> Result<DevCa, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = read_string(&cert_path)?;
        let key_pem = read_string(&key_path)?;
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
        verify_chain(roots, &probe_der, &[]).map_err(|_| PkiError::CaMismatch {
            cert: cert_path,
            key: key_path,
        })?;
        Ok(ca)
    }

    /// Writes `dir/ca.pem` and `dir/ca.key` (mode 0600), creating `dir` if needed.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        create_dir(dir)?;
        write_atomic(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), false)?;
        write_atomic(
            &dir.join(CA_KEY_FILE),
            self.key.serialize_pem().as_bytes(),
            true,
        )
    }

    /// The CA certificate, PEM-encoded.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a node certificate signed by this CA: SAN [`SERVER_NAME`] (plus `node_id` when it is a
    /// valid DNS name), usable as both TLS server and client certificate.
    pub fn issue(&self, node_id: &str) -> Result<NodeCert, PkiError> {
        check_node_id(node_id)?;
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "a node key",
            source,
        })?;
        let mut sans = vec![SanType::DnsName(SERVER_NAME.try_into().map_err(
            |source| PkiError::Generate {
                what: "the node certificate name",
                source,
            },
        )?)];
        if node_id != SERVER_NAME && DnsName::try_from(node_id).is_ok() {
            if let Ok(name) = node_id.try_into() {
                sans.push(SanType::DnsName(name));
            }
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, CA_ORGANIZATION);
        dn.push(DnType::CommonName, node_id);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| PkiError::Generate {
                what: "a node certificate",
                source,
            })?;
        Ok(NodeCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// A node certificate and its key, PEM-encoded, plus the certificate of the CA that signed it.
#[derive(Clone)]
pub struct NodeCert {
    /// The node certificate.
    pub cert_pem: String,
    /// The node's private key (PKCS#8).
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
    /// Writes `dir/<node_id>.pem`, `dir/<node_id>.key` (mode 0600) and, unless it is already there
    /// with the same content, `dir/ca.pem`; returns the paths for [`NodeTls::load`].
    pub fn save(&self, dir: &Path, node_id: &str) -> Result<TlsFiles, PkiError> {
        check_node_id(node_id)?;
        create_dir(dir)?;
        let files = TlsFiles {
            ca_cert: dir.join(CA_CERT_FILE),
            cert: dir.join(format!("{node_id}.pem")),
            key: dir.join(format!("{node_id}.key")),
        };
        match fs::read(&files.ca_cert) {
            Ok(existing) if existing == self.ca_pem.as_bytes() => {}
            Ok(_) => {
                return Err(PkiError::Exists {
                    path: files.ca_cert,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                write_atomic(&files.ca_cert, self.ca_pem.as_bytes(), false)?;
            }
            Err(source) => {
                return Err(PkiError::Read {
                    path: files.ca_cert,
                    source,
                })
            }
        }
        write_atomic(&files.cert, self.cert_pem.as_bytes(), false)?;
        write_atomic(&files.key, self.key_pem.as_bytes(), true)?;
        Ok(files)
    }
}

/// Where a node finds its TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file with the cluster CA certificate(s): the only trust anchors.
    pub ca_cert: PathBuf,
    /// PEM file with the node certificate (then any intermediates).
    pub cert: PathBuf,
    /// PEM file with the node's private key.
    pub key: PathBuf,
}

/// A node's parsed TLS material: cluster CA roots, certificate chain and private key.
#[derive(Clone)]
pub struct NodeTls {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// The `ring` provider with TLS 1.3 suites only, AES-128-GCM first (fastest with AES-NI, also the
/// QUIC Initial suite).
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

impl NodeTls {
    /// Loads and checks the files: the CA must parse as a trust anchor, the key must match the
    /// certificate, and the certificate must chain to the CA with name [`SERVER_NAME`] and both
    /// server and client usage. Errors name the offending file.
    pub fn load(files: &TlsFiles) -> Result<NodeTls, PkiError> {
        let ca_pem = read_bytes(&files.ca_cert)?;
        let roots = parse_roots(&files.ca_cert, &ca_pem)?;

        let cert_pem = read_bytes(&files.cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Parse {
                path: files.cert.clone(),
                reason: e.to_string(),
            })?;
        let Some(leaf) = chain.first() else {
            return Err(PkiError::NoCertificate {
                path: files.cert.clone(),
            });
        };

        let key_pem = read_bytes(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| PkiError::Parse {
            path: files.key.clone(),
            reason: e.to_string(),
        })?;

        let provider = crypto_provider();
        let bad = |source| PkiError::BadNodeCert {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        };
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(bad)?;
        verify_chain(roots.clone(), leaf, &chain[1..]).map_err(bad)?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| PkiError::BadCa {
                    path: files.ca_cert.clone(),
                    source: rustls::Error::General(e.to_string()),
                })?;
        client_verifier
            .verify_client_cert(leaf, &chain[1..], UnixTime::now())
            .map_err(bad)?;

        Ok(NodeTls {
            roots,
            chain,
            key: Arc::new(key),
            provider,
        })
    }

    /// Builds a node's TLS material from PEM strings already in memory (no files involved).
    pub fn from_node_cert(cert: &NodeCert) -> Result<NodeTls, PkiError> {
        let mem = PathBuf::from("<memory>");
        let roots = parse_roots(&mem, cert.ca_pem.as_bytes())?;
        let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Parse {
                path: mem.clone(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(PkiError::NoCertificate { path: mem });
        }
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).map_err(|e| {
            PkiError::Parse {
                path: mem.clone(),
                reason: e.to_string(),
            }
        })?;
        let provider = crypto_provider();
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|source| {
            PkiError::BadNodeCert {
                cert: mem.clone(),
                key: mem.clone(),
                source,
            }
        })?;
        Ok(NodeTls {
            roots,
            chain,
            key: Arc::new(key),
            provider,
        })
    }

    /// TLS 1.3 server configuration for plain TLS over TCP: requires a client certificate signed by
    /// the cluster CA; no ALPN.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        Ok(Arc::new(self.build_server_config()?))
    }

    /// TLS 1.3 client configuration for plain TLS over TCP: verifies the server against the cluster
    /// CA (name [`SERVER_NAME`]) and presents this node's certificate; no ALPN.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        Ok(Arc::new(self.build_client_config()?))
    }

    /// Like [`NodeTls::server_config`], with ALPN [`ALPN`] and no early data, as QUIC requires.
    pub fn quic_server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let mut config = self.build_server_config()?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.max_early_data_size = 0;
        Ok(Arc::new(config))
    }

    /// Like [`NodeTls::client_config`], with ALPN [`ALPN`] and no early data, as QUIC requires.
    pub fn quic_client_config(&self) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        let mut config = self.build_client_config()?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.enable_early_data = false;
        Ok(Arc::new(config))
    }

    /// The DER bytes of this node's private key, for deriving per-node secrets.
    pub(crate) fn key_der(&self) -> &[u8] {
        self.key.secret_der()
    }

    fn build_server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let err = |reason: String| PkiError::Config {
            side: "server",
            reason,
        };
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| err(e.to_string()))?;
        rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| err(e.to_string()))
    }

    fn build_client_config(&self) -> Result<rustls::ClientConfig, PkiError> {
        let err = |reason: String| PkiError::Config {
            side: "client",
            reason,
        };
        rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| err(e.to_string()))
    }
}

fn check_node_id(node_id: &str) -> Result<(), PkiError> {
    let ok = !node_id.is_empty()
        && node_id.len() <= MAX_NODE_ID
        && !node_id.starts_with('.')
        && node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidNodeId(node_id.to_owned()))
    }
}

fn parse_roots(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            path: path.to_owned(),
        });
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|source| PkiError::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// Verifies `leaf` (with `intermediates`) against `roots` as a server certificate for
/// [`SERVER_NAME`].
fn verify_chain(
    roots: Arc<RootCertStore>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), rustls::Error> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, crypto_provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let name =
        ServerName::try_from(SERVER_NAME).map_err(|e| rustls::Error::General(e.to_string()))?;
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map(|_| ())
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `data` to a temporary file next to `path` (mode 0600 when `secret`), syncs it and renames
/// it over `path`.
fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(&tmp).map_err(err)?;
    file.write_all(data).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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
        let tls = NodeTls::load(&files).unwrap();
        tls.server_config().unwrap();
        tls.quic_client_config().unwrap();
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
}
