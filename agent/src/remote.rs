//! Fetching code packages that live elsewhere: objects in shoal's own store (`shoal://ID`)
//! and objects in S3-compatible stores (`s3://bucket/key`).
//!
//! A remote package is always a gzip-compressed tar archive. [`Downloader::fetch`] downloads
//! it into an unnamed private staging file (in a staging directory), hashing the bytes as they
//! arrive, and unpacks exactly that file as a local archive is unpacked, so the digest (over
//! the archive's bytes), the corrupt-archive check and every [`FetchLimits`] bound apply
//! exactly as for a local archive, and nothing can change the bytes between the check and
//! the unpack.
//!
//! Invariants:
//! - a download never grows past its byte limit (by default
//!   `FetchLimits::default().max_total_bytes`): the size the source announces is checked
//!   first, and the bytes written are counted while they arrive;
//! - S3 bodies are streamed to the staging file, never held in memory whole; a `shoal://`
//!   object is already in shared memory and is copied from there;
//! - the staging file has no name (`O_TMPFILE`, or unlinked at once): no other process can
//!   open it, and it is gone when the fetch ends, however it ends (a crash included);
//! - TLS to S3 is rustls with the ring provider, configured for each client: nothing is
//!   installed process-wide, and aws-lc is not linked.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector};
use object_store::path::Path as ObjectPath;
use object_store::{ClientConfigKey, ClientOptions, ObjectStoreExt, RetryConfig};
use tokio::io::AsyncWriteExt;

use crate::package::{
    digest_of, private_file_in, unpack_staged, FetchError, FetchLimits, StagedArchive,
};
use sha2::{Digest, Sha256};

/// How long a `shoal://` read waits for the object to be created: not at all. A package must
/// exist when its function is deployed; a sealed copy on another node is still pulled (bounded
/// by the dataworker's pull timeout).
const OBJECT_WAIT: Duration = Duration::ZERO;
/// Bound on connecting to the dataworker and reading one object from it.
const OBJECT_TIMEOUT: Duration = Duration::from_secs(120);
/// TCP (and TLS) connect timeout for S3.
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest pause between two reads of an S3 response.
const S3_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Retries of a failed S3 request (connection errors, 5xx), and how long they may take.
const S3_MAX_RETRIES: usize = 3;
const S3_RETRY_TIMEOUT: Duration = Duration::from_secs(30);

/// A package that has to be downloaded before it can be unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteSource {
    /// An object in the node's dataworker (`shoal://ID`), read with the SDK.
    Object {
        /// Object id.
        id: String,
    },
    /// An object in an S3-compatible store (`s3://bucket/key`).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Object key inside the bucket.
        key: String,
    },
}

impl RemoteSource {
    /// A `shoal://ID` source; the id must be a valid object id.
    pub fn object(id: &str) -> Result<Self, RemoteError> {
        shoal_sdk::ObjectId::new(id).map_err(|e| RemoteError::InvalidSource {
            what: format!("shoal://{id}"),
            reason: e.to_string(),
        })?;
        Ok(Self::Object { id: id.to_string() })
    }

    /// Parses `s3://bucket/key`. The bucket and the key must not be empty, and the key must
    /// be a plain object path (no empty, `.` or `..` segments, no trailing `/`).
    pub fn parse_s3(url: &str) -> Result<Self, RemoteError> {
        let invalid = |reason: &str| RemoteError::InvalidSource {
            what: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| invalid("must start with s3://"))?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| invalid("no key: expected s3://bucket/key"))?;
        if bucket.is_empty() {
            return Err(invalid("no bucket: expected s3://bucket/key"));
        }
        if key.is_empty() {
            return Err(invalid("no key: expected s3://bucket/key"));
        }
        let path = ObjectPath::parse(key).map_err(|e| invalid(&e.to_string()))?;
        if path.as_ref() != key {
            // object_store would read another key than the one named (say, `dir/` as `dir`).
            return Err(invalid("the key is not a plain object path"));
        }
        Ok(Self::S3 {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }
}

impl fmt::Display for RemoteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Object { id } => write!(f, "shoal://{id}"),
            Self::S3 { bucket, key } => write!(f, "s3://{bucket}/{key}"),
        }
    }
}

/// How to reach S3: the standard `AWS_*` settings, read once at the edge
/// ([`S3Settings::from_env`]) and passed in. `Debug` never shows the secrets.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// Endpoint URL (for example `http://127.0.0.1:9000`); AWS itself when `None`.
    pub endpoint: Option<String>,
    /// Region; `us-east-1` when `None`.
    pub region: Option<String>,
    /// Access key id; with `None` the instance's credentials (IMDS and the like) are used.
    pub access_key: Option<String>,
    /// Secret access key.
    pub secret_key: Option<String>,
    /// Session token of temporary credentials.
    pub session_token: Option<String>,
    /// Whether plain `http://` is allowed. Always allowed when `endpoint` starts with
    /// `http://`.
    pub allow_http: bool,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "(hidden)");
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("secret_key", &hidden(&self.secret_key))
            .field("session_token", &hidden(&self.session_token))
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

impl S3Settings {
    /// Reads the process environment; see [`S3Settings::from_lookup`]. Call it where the
    /// binary parses its configuration, not deep in a library.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `get` (a variable name to its value): `AWS_ENDPOINT_URL`
    /// or `AWS_ENDPOINT`, `AWS_REGION` or `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN` and `AWS_ALLOW_HTTP` (`true` or `1`).
    /// Empty values count as unset.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let allow_http =
            var("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
        Self {
            endpoint: var("AWS_ENDPOINT_URL").or_else(|| var("AWS_ENDPOINT")),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            access_key: var("AWS_ACCESS_KEY_ID"),
            secret_key: var("AWS_SECRET_ACCESS_KEY"),
            session_token: var("AWS_SESSION_TOKEN"),
            allow_http,
        }
    }

    fn allows_http(&self) -> bool {
        self.allow_http
            || self
                .endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"))
    }

    /// A client for `bucket`, addressed path-style (`endpoint/bucket/key`) when an endpoint
    /// is set.
    fn store(&self, bucket: &str) -> Result<AmazonS3, object_store::Error> {
        let options = ClientOptions::new()
            .with_allow_http(self.allows_http())
            .with_connect_timeout(S3_CONNECT_TIMEOUT);
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(self.region.as_deref().unwrap_or("us-east-1"))
            .with_client_options(options)
            .with_http_connector(RingConnector)
            .with_retry(RetryConfig {
                max_retries: S3_MAX_RETRIES,
                retry_timeout: S3_RETRY_TIMEOUT,
                ..RetryConfig::default()
            });
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(k) = &self.access_key {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &self.secret_key {
            b = b.with_secret_access_key(s);
        }
        if let Some(t) = &self.session_token {
            b = b.with_token(t);
        }
        b.build()
    }
}

/// Builds object_store's HTTP clients: reqwest over rustls with the ring provider and the
/// platform's certificate verifier. Of the [`ClientOptions`] object_store passes in (they
/// differ for the instance-metadata client), it honours whether plain http is allowed and the
/// connect timeout; instead of a timeout for a whole request, which would cut a large download
/// short, it bounds the pause between two reads.
#[derive(Debug)]
struct RingConnector;

/// A connect timeout as object_store formats it (`5s`, `500ms`).
fn parse_timeout(v: &str) -> Option<Duration> {
    match v.strip_suffix("ms") {
        Some(ms) => ms.parse().ok().map(Duration::from_millis),
        None => v.strip_suffix('s')?.parse().ok().map(Duration::from_secs),
    }
}

impl HttpConnector for RingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let allow_http = options
            .get_config_value(&ClientConfigKey::AllowHttp)
            .is_some_and(|v| v == "true");
        let connect_timeout = options
            .get_config_value(&ClientConfigKey::ConnectTimeout)
            .as_deref()
            .and_then(parse_timeout)
            .unwrap_or(S3_CONNECT_TIMEOUT);
        let generic =
            |source: Box<dyn std::error::Error + Send + Sync>| object_store::Error::Generic {
                store: "S3",
                source,
            };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(|e| generic(Box::new(e)))?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| generic(Box::new(e)))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .https_only(!allow_http)
            .connect_timeout(connect_timeout)
            .read_timeout(S3_READ_TIMEOUT)
            .build()
            .map_err(|e| generic(Box::new(e)))?;
        Ok(HttpClient::new(client))
    }
}

/// Why a remote package could not be fetched. Every message names the source.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The source is malformed (no bucket, no key, a bad object id).
    #[error("invalid package source {what:?}: {reason}")]
    InvalidSource {
        /// The source as given.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The dataworker has no object with this id.
    #[error("object {id} not found in the store")]
    ObjectNotFound {
        /// Object id.
        id: String,
    },
    /// Reaching the dataworker or reading from it failed.
    #[error("read shoal://{id} from the dataworker")]
    Dataworker {
        /// Object id.
        id: String,
        /// Cause.
        #[source]
        source: shoal_sdk::Error,
    },
    /// The dataworker did not answer in time.
    #[error("read shoal://{id} from the dataworker: no answer within {timeout:?}")]
    DataworkerTimeout {
        /// Object id.
        id: String,
        /// How long the agent waited.
        timeout: Duration,
    },
    /// The bucket has no object with this key.
    #[error("{url} not found (404)")]
    S3NotFound {
        /// The `s3://` URL.
        url: String,
    },
    /// Any other S3 failure (credentials, network, bucket missing, ...).
    #[error("read {url}")]
    S3 {
        /// The `s3://` URL.
        url: String,
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// The package is larger than the download limit.
    #[error("{what} is larger than the download limit of {limit} bytes")]
    TooLarge {
        /// The source.
        what: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// The staging file could not be created or written.
    #[error("write a staging file in {path}")]
    Stage {
        /// The staging directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The downloaded archive could not be unpacked (digest mismatch, corrupt archive, a
    /// limit, an unsafe entry, ...).
    #[error("unpack {what}")]
    Unpack {
        /// The source.
        what: String,
        /// Cause.
        #[source]
        source: FetchError,
    },
    /// The blocking unpack task did not finish (it panicked or was cancelled).
    #[error("unpack {what}: the unpack task failed")]
    Task {
        /// The source.
        what: String,
        /// Cause.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl RemoteError {
    /// Whether the package does not exist at its source.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::ObjectNotFound { .. } | Self::S3NotFound { .. })
    }
}

/// Downloads and unpacks remote packages for one node.
#[derive(Debug, Clone)]
pub struct Downloader {
    dataworker_socket: PathBuf,
    s3: S3Settings,
    max_bytes: u64,
}

impl Downloader {
    /// A downloader reading `shoal://` objects from the dataworker at `dataworker_socket` and
    /// `s3://` objects with `s3`, limited to `FetchLimits::default().max_total_bytes`.
    pub fn new(dataworker_socket: impl Into<PathBuf>, s3: S3Settings) -> Self {
        Self {
            dataworker_socket: dataworker_socket.into(),
            s3,
            max_bytes: FetchLimits::default().max_total_bytes,
        }
    }

    /// The same downloader with another download limit in bytes.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Downloads `source` into an unnamed private file in `staging` (a directory, created if
    /// missing), hashing it on the way, checks `digest` against those bytes and unpacks them
    /// into `dest` (created if missing; it must be empty if present). Returns the canonical
    /// path of `dest`.
    pub async fn fetch(
        &self,
        source: &RemoteSource,
        staging: &Path,
        dest: &Path,
        digest: Option<&str>,
    ) -> Result<PathBuf, RemoteError> {
        tokio::fs::create_dir_all(staging)
            .await
            .map_err(|e| stage_err(staging, e))?;
        let file = {
            let dir = staging.to_path_buf();
            tokio::task::spawn_blocking(move || private_file_in(&dir))
                .await
                .map_err(|e| stage_err(staging, io::Error::other(e)))?
                .map_err(|e| stage_err(staging, e))?
        };
        let mut out = tokio::fs::File::from_std(file);
        let mut hash = Sha256::new();
        let bytes = match source {
            RemoteSource::Object { id } => {
                self.download_object(id, staging, &mut out, &mut hash)
                    .await?
            }
            RemoteSource::S3 { bucket, key } => {
                let url = source.to_string();
                self.download_s3(bucket, key, &url, staging, &mut out, &mut hash)
                    .await?
            }
        };
        out.flush().await.map_err(|e| stage_err(staging, e))?;
        tracing::debug!(%source, bytes, "package downloaded");
        let staged = StagedArchive::new(out.into_std().await, digest_of(hash));
        let what = source.to_string();
        let (dest, digest) = (dest.to_path_buf(), digest.map(str::to_string));
        match tokio::task::spawn_blocking(move || {
            unpack_staged(staged, &dest, digest.as_deref(), &FetchLimits::default())
        })
        .await
        {
            Ok(Ok(root)) => Ok(root),
            Ok(Err(source)) => Err(RemoteError::Unpack { what, source }),
            Err(source) => Err(RemoteError::Task { what, source }),
        }
    }

    fn too_large(&self, what: impl fmt::Display) -> RemoteError {
        RemoteError::TooLarge {
            what: what.to_string(),
            limit: self.max_bytes,
        }
    }

    async fn download_object(
        &self,
        id: &str,
        staging: &Path,
        out: &mut tokio::fs::File,
        hash: &mut Sha256,
    ) -> Result<u64, RemoteError> {
        let dw = |source| RemoteError::Dataworker {
            id: id.to_string(),
            source,
        };
        let read = async {
            let client = shoal_sdk::Client::connect(&self.dataworker_socket)
                .await
                .map_err(dw)?;
            match client.get(id, OBJECT_WAIT).await {
                Ok(view) => Ok(view),
                Err(e)
                    if matches!(
                        e.code(),
                        shoal_sdk::ErrorCode::NotFound | shoal_sdk::ErrorCode::Timeout
                    ) =>
                {
                    Err(RemoteError::ObjectNotFound { id: id.to_string() })
                }
                Err(e) => Err(dw(e)),
            }
        };
        let view = tokio::time::timeout(OBJECT_TIMEOUT, read)
            .await
            .map_err(|_| RemoteError::DataworkerTimeout {
                id: id.to_string(),
                timeout: OBJECT_TIMEOUT,
            })??;
        let len = view.len() as u64;
        if len > self.max_bytes {
            return Err(self.too_large(format_args!("shoal://{id}")));
        }
        hash.update(&view[..]);
        out.write_all(&view)
            .await
            .map_err(|e| stage_err(staging, e))?;
        Ok(len)
    }

    async fn download_s3(
        &self,
        bucket: &str,
        key: &str,
        url: &str,
        staging: &Path,
        out: &mut tokio::fs::File,
        hash: &mut Sha256,
    ) -> Result<u64, RemoteError> {
        let s3 = |source| RemoteError::S3 {
            url: url.to_string(),
            source,
        };
        let path = ObjectPath::parse(key).map_err(|e| RemoteError::InvalidSource {
            what: url.to_string(),
            reason: e.to_string(),
        })?;
        let store = self.s3.store(bucket).map_err(s3)?;
        let got = match store.get(&path).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::S3NotFound {
                    url: url.to_string(),
                })
            }
            Err(e) => return Err(s3(e)),
        };
        if got.meta.size > self.max_bytes {
            return Err(self.too_large(url));
        }
        let mut body = got.into_stream();
        let mut written: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(s3)?;
            written = written.saturating_add(chunk.len() as u64);
            if written > self.max_bytes {
                return Err(self.too_large(url));
            }
            hash.update(&chunk[..]);
            out.write_all(&chunk)
                .await
                .map_err(|e| stage_err(staging, e))?;
        }
        Ok(written)
    }
}

fn stage_err(path: &Path, source: io::Error) -> RemoteError {
    RemoteError::Stage {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        assert_eq!(
            RemoteSource::parse_s3("s3://b/dir/pkg.tar.gz").ok(),
            Some(RemoteSource::S3 {
                bucket: "b".into(),
                key: "dir/pkg.tar.gz".into()
            })
        );
        for bad in [
            "s3://",
            "s3://bucket",
            "s3://bucket/",
            "s3:///key",
            "http://b/k",
            "s3://b/a//c",
            "s3://b/a/../c",
            "s3://b/dir/",
        ] {
            let e = RemoteSource::parse_s3(bad);
            assert!(
                matches!(e, Err(RemoteError::InvalidSource { .. })),
                "{bad}: {e:?}"
            );
        }
        let s = RemoteSource::parse_s3("s3://b/k/x.tgz").ok();
        assert_eq!(s.map(|s| s.to_string()).as_deref(), Some("s3://b/k/x.tgz"));
    }

    #[test]
    fn timeouts_as_object_store_formats_them() {
        assert_eq!(parse_timeout("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("1s 500ms"), None);
        assert_eq!(parse_timeout(""), None);
    }

    #[test]
    fn object_ids() {
        assert!(RemoteSource::object("pkg-1").is_ok());
        assert!(matches!(
            RemoteSource::object(""),
            Err(RemoteError::InvalidSource { .. })
        ));
    }

    #[test]
    fn settings_from_lookup() {
        let vars = [
            ("AWS_ENDPOINT", "http://127.0.0.1:9000"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKID"),
            ("AWS_SECRET_ACCESS_KEY", "very-secret"),
            ("AWS_SESSION_TOKEN", ""),
        ];
        let s = S3Settings::from_lookup(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s.access_key.as_deref(), Some("AKID"));
        assert_eq!(s.session_token, None);
        assert!(!s.allow_http);
        assert!(s.allows_http(), "an http:// endpoint allows http");
        let shown = format!("{s:?}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("AKID"), "{shown}");

        let s = S3Settings::from_lookup(|k| {
            matches!(k, "AWS_ENDPOINT_URL" | "AWS_ENDPOINT")
                .then(|| format!("https://{k}"))
                .or_else(|| (k == "AWS_ALLOW_HTTP").then(|| "TRUE".into()))
        });
        assert_eq!(s.endpoint.as_deref(), Some("https://AWS_ENDPOINT_URL"));
        assert!(s.allow_http);
    }
}
