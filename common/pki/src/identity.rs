//! Parsed TLS identities and the rustls configurations built from them: [`NodeTls`] (a node:
//! QUIC and TCP, server and client) and [`ControlTls`] (control's metadata API: server only).
use crate::ca::NodeCert;
use crate::files::read_bytes;
use crate::{PkiError, TlsFiles, ALPN, CONTROL_SERVER_NAME, SERVER_NAME};
use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::tls13::OkmBlock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The `ring` provider with TLS 1.3 suites only, AES-128-GCM first (fastest with AES-NI, also the
/// QUIC Initial suite). Every configuration this crate builds uses it.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, default_provider};
    let mut provider = default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// CA roots, certificate chain and key, parsed and checked to belong together.
struct Material {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: Arc<CryptoProvider>,
    /// The certificate's and the key's source, for errors.
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl Material {
    fn from_files(files: &TlsFiles) -> Result<Material, PkiError> {
        Material::parse(
            (&files.ca_cert, &read_bytes(&files.ca_cert)?),
            (&files.cert, &read_bytes(&files.cert)?),
            (&files.key, &read_bytes(&files.key)?),
        )
    }

    fn from_cert(cert: &NodeCert) -> Result<Material, PkiError> {
        let mem = Path::new("<memory>");
        Material::parse(
            (mem, cert.ca_pem.as_bytes()),
            (mem, cert.cert_pem.as_bytes()),
            (mem, cert.key_pem.as_bytes()),
        )
    }

    /// Parses the three PEM inputs (each with the path errors name) and checks that the key
    /// matches the certificate.
    fn parse(
        (ca_path, ca_pem): (&Path, &[u8]),
        (cert_path, cert_pem): (&Path, &[u8]),
        (key_path, key_pem): (&Path, &[u8]),
    ) -> Result<Material, PkiError> {
        let roots = parse_roots(ca_path, ca_pem)?;
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PkiError::Parse {
                path: cert_path.to_owned(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(PkiError::NoCertificate {
                path: cert_path.to_owned(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| PkiError::Parse {
            path: key_path.to_owned(),
            reason: e.to_string(),
        })?;
        let provider = crypto_provider();
        let material = Material {
            roots,
            chain,
            key,
            provider,
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
        };
        CertifiedKey::from_der(
            material.chain.clone(),
            material.key.clone_key(),
            &material.provider,
        )
        .map_err(|e| material.bad(e))?;
        Ok(material)
    }

    fn bad(&self, source: rustls::Error) -> PkiError {
        PkiError::BadNodeCert {
            cert: self.cert_path.clone(),
            key: self.key_path.clone(),
            source,
        }
    }

    fn leaf(&self) -> &CertificateDer<'static> {
        // `parse` refuses an empty chain.
        &self.chain[0]
    }

    /// Checks that the certificate chains to the CA as a server certificate for `name`.
    fn check_server(&self, name: &str) -> Result<(), PkiError> {
        verify_server_chain(self.roots.clone(), self.leaf(), &self.chain[1..], name)
            .map_err(|e| self.bad(e))
    }

    /// Checks that the certificate chains to the CA as a client certificate.
    fn check_client(&self, ca_path: &Path) -> Result<(), PkiError> {
        let verifier =
            client_verifier(&self.roots, &self.provider).map_err(|e| PkiError::BadCa {
                path: ca_path.to_owned(),
                source: rustls::Error::General(e),
            })?;
        verifier
            .verify_client_cert(self.leaf(), &self.chain[1..], UnixTime::now())
            .map(|_| ())
            .map_err(|e| self.bad(e))
    }

    /// A TLS 1.3 server configuration that requires a client certificate signed by the CA.
    fn server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let err = |reason: String| PkiError::Config {
            side: "server",
            reason,
        };
        let verifier = client_verifier(&self.roots, &self.provider).map_err(err)?;
        rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| err(e.to_string()))
    }
}

fn client_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| e.to_string())
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

impl NodeTls {
    /// Loads and checks the files: the CA must parse as a trust anchor, the key must match the
    /// certificate, and the certificate must chain to the CA with name [`SERVER_NAME`] and both
    /// server and client usage. Errors name the offending file.
    pub fn load(files: &TlsFiles) -> Result<NodeTls, PkiError> {
        let m = Material::from_files(files)?;
        m.check_server(SERVER_NAME)?;
        m.check_client(&files.ca_cert)?;
        Ok(NodeTls::from_material(m))
    }

    /// Builds a node's TLS material from PEM strings already in memory (no files involved). Only
    /// checks that the key matches the certificate: tests use it to present certificates the
    /// cluster CA did not sign.
    pub fn from_node_cert(cert: &NodeCert) -> Result<NodeTls, PkiError> {
        Ok(NodeTls::from_material(Material::from_cert(cert)?))
    }

    fn from_material(m: Material) -> NodeTls {
        NodeTls {
            roots: m.roots,
            chain: m.chain,
            key: Arc::new(m.key),
            provider: m.provider,
        }
    }

    fn material(&self) -> Material {
        Material {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            provider: self.provider.clone(),
            cert_path: PathBuf::new(),
            key_path: PathBuf::new(),
        }
    }

    /// TLS 1.3 server configuration for plain TLS over TCP: requires a client certificate signed by
    /// the cluster CA; no ALPN.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        Ok(Arc::new(self.material().server_config()?))
    }

    /// TLS 1.3 client configuration for plain TLS over TCP: verifies the server against the cluster
    /// CA and presents this node's certificate; no ALPN. The caller names the server it expects
    /// when it connects: [`SERVER_NAME`] for another node, [`CONTROL_SERVER_NAME`] for control.
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, PkiError> {
        Ok(Arc::new(self.build_client_config()?))
    }

    /// Like [`NodeTls::server_config`], with ALPN [`ALPN`] and no early data, as QUIC requires.
    pub fn quic_server_config(&self) -> Result<Arc<rustls::ServerConfig>, PkiError> {
        let mut config = self.material().server_config()?;
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

    /// A secret derived from this node's private key (HKDF-SHA256: extract with `salt`, expand
    /// with `info`): stable for as long as the key is, and telling nothing about it. The QUIC
    /// transport keys its stateless resets with it.
    pub fn derive_secret(&self, salt: &[u8], info: &[u8]) -> Option<OkmBlock> {
        let rustls::SupportedCipherSuite::Tls13(suite) =
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        else {
            return None;
        };
        Some(
            suite
                .hkdf_provider
                .extract_from_secret(Some(salt), self.key.secret_der())
                .expand_block(&[info]),
        )
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

/// Control's parsed TLS material, ready to serve the metadata API: a TLS 1.3 server
/// configuration with control's certificate (name [`CONTROL_SERVER_NAME`]) that requires every
/// client to present a certificate signed by the cluster CA. Built and checked once, at load.
#[derive(Clone)]
pub struct ControlTls {
    server: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for ControlTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlTls").finish_non_exhaustive()
    }
}

impl ControlTls {
    /// Loads and checks the files: the CA must parse as a trust anchor, the key must match the
    /// certificate, and the certificate must chain to the CA with name [`CONTROL_SERVER_NAME`]
    /// and server usage (as [`crate::DevCa::issue_control`] makes it). Errors name the
    /// offending file.
    pub fn load(files: &TlsFiles) -> Result<ControlTls, PkiError> {
        ControlTls::from_material(Material::from_files(files)?)
    }

    /// Like [`ControlTls::load`], from PEM strings already in memory.
    pub fn from_cert(cert: &NodeCert) -> Result<ControlTls, PkiError> {
        ControlTls::from_material(Material::from_cert(cert)?)
    }

    fn from_material(m: Material) -> Result<ControlTls, PkiError> {
        m.check_server(CONTROL_SERVER_NAME)?;
        Ok(ControlTls {
            server: Arc::new(m.server_config()?),
        })
    }

    /// The server configuration (no ALPN).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }
}

pub(crate) fn parse_roots(path: &Path, pem: &[u8]) -> Result<Arc<RootCertStore>, PkiError> {
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

/// Verifies `leaf` (with `intermediates`) against `roots` as a server certificate for `name`.
pub(crate) fn verify_server_chain(
    roots: Arc<RootCertStore>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    name: &str,
) -> Result<(), rustls::Error> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, crypto_provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let name =
        ServerName::try_from(name.to_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
    verifier
        .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
        .map(|_| ())
}
