//! Helpers shared by the agent's integration tests: waiting on a condition with a deadline,
//! a real S3 server (moto) on loopback, and packages built in memory.
#![allow(dead_code)] // each test binary uses a different part
#![allow(clippy::unwrap_used)]

use sha2::{Digest, Sha256};
use shoal_agent::S3Settings;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str =
    "run `python3 -m pip install 'moto[server]'` (scripts/test.sh installs it)";
/// How long moto may take to import and start listening.
const MOTO_START: Duration = Duration::from_secs(60);

/// Whether `dir` is missing or empty: a fetch leaves no staging file behind (they have no
/// name while they exist, either).
pub(crate) fn nothing_in(dir: &std::path::Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// Polls `cond` until it returns `Some`, failing the test (naming `what`) after `within`.
pub(crate) async fn wait_for<T, F, Fut>(what: &str, within: Duration, cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    shoal_devcluster::wait::wait_for_async(what, within, cond)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `cond` until it holds, failing the test (naming `what`) after `within`.
pub(crate) async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, within, || {
        let c = cond();
        async move { c.await.then_some(()) }
    })
    .await
}

/// A moto S3 server on 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub(crate) struct Moto {
    child: Child,
    addr: SocketAddr,
    tls: bool,
}

impl Moto {
    /// Starts `python3 -m moto.server` on a free loopback port and waits until it answers
    /// HTTP. Panics (failing the test) with an install hint when moto is not there.
    pub(crate) fn start() -> Moto {
        Self::launch(false)
    }

    /// Like [`Moto::start`], serving HTTPS with a self-signed certificate (`-s`); ready once
    /// it accepts connections.
    pub(crate) fn start_tls() -> Moto {
        Self::launch(true)
    }

    fn launch(tls: bool) -> Moto {
        let probe = Command::new("python3")
            .args(["-c", "import moto.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match probe {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "moto is not installed ({}): {INSTALL_HINT}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => panic!("cannot run python3 ({e}): install python3, then {INSTALL_HINT}"),
        }
        let port = {
            let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap().port()
        };
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ]);
        if tls {
            cmd.arg("-s");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting moto failed ({e}): {INSTALL_HINT}"));
        let mut moto = Moto {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            tls,
        };
        let deadline = Instant::now() + MOTO_START;
        loop {
            if let Some(status) = moto.child.try_wait().unwrap() {
                panic!("moto exited at start ({status}): {INSTALL_HINT}");
            }
            let ready = if tls {
                TcpStream::connect_timeout(&moto.addr, Duration::from_secs(1)).is_ok()
            } else {
                moto.try_request("GET", "/", b"").is_ok()
            };
            if ready {
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "moto did not answer on {} within {MOTO_START:?}",
                moto.addr
            );
            // The poll interval: moto says nothing when it is ready but by answering.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` for [`Moto::start_tls`]).
    pub(crate) fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Settings that reach this server (moto takes any credentials).
    pub(crate) fn settings(&self) -> S3Settings {
        S3Settings {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key: Some("testing".into()),
            secret_key: Some("testing".into()),
            session_token: None,
            allow_http: false, // implied by the http:// endpoint
        }
    }

    /// One plain HTTP/1.1 request (not for [`Moto::start_tls`]); returns the status code.
    fn try_request(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<u16> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw);
        text.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))
    }

    /// Creates `bucket` (path-style `PUT /bucket`).
    pub(crate) fn create_bucket(&self, bucket: &str) {
        let status = self.try_request("PUT", &format!("/{bucket}"), b"").unwrap();
        assert_eq!(status, 200, "create bucket {bucket}");
    }

    /// Uploads `data` as `bucket/key` (path-style `PUT /bucket/key`).
    pub(crate) fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        let status = self
            .try_request("PUT", &format!("/{bucket}/{key}"), data)
            .unwrap();
        assert_eq!(status, 200, "put {bucket}/{key}");
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `.tar.gz` holding `files` (relative path, mode, contents).
pub(crate) fn tar_gz(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    for (path, mode, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// A package with an executable `run.sh` that prints `hello` and sleeps, and a data file.
pub(crate) fn hello_package() -> Vec<u8> {
    tar_gz(&[
        ("run.sh", 0o755, b"#!/bin/sh\necho hello\nexec sleep 30\n"),
        ("lib/data.txt", 0o644, b"some data\n"),
    ])
}

/// Bytes that are no gzip stream.
pub(crate) fn garbage() -> Vec<u8> {
    (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// The `sha256:` digest of `data`.
pub(crate) fn digest(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}
