//! Baselines measured in the same run as shoal: memcpy, a raw Unix-socket round trip, and a
//! real `redis-server` started (and stopped) by the suite.
use crate::{run_single, run_threads, Record, RunSpec};
use anyhow::{bail, Context};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// memcpy bandwidth between two pre-faulted buffers of `size` bytes (system `memcpy`).
pub fn memcpy_bandwidth(spec: &RunSpec, bench: &str, size: usize) -> Record {
    let src = vec![7u8; size];
    let mut dst = vec![0u8; size];
    dst.fill(1);
    let (lat, secs) = run_single::<()>(spec, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        Ok(())
    })
    .unwrap_or_default();
    Record::from_latencies(bench, "memcpy", size as u64, 1, &lat, secs)
}

fn read_frame(s: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    buf.resize(u32::from_le_bytes(len) as usize, 0);
    s.read_exact(buf)
}

fn write_frame(s: &mut UnixStream, payload: &[u8], scratch: &mut Vec<u8>) -> io::Result<()> {
    scratch.clear();
    scratch.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    scratch.extend_from_slice(payload);
    s.write_all(scratch)
}

/// Request/reply over a raw Unix socket (system `uds`): the floor any socket-based local
/// protocol pays. `req_size` bytes up, `reply_size` bytes back, `clients` connections.
pub fn uds_round_trip(
    spec: &RunSpec,
    bench: &str,
    req_size: usize,
    reply_size: usize,
    clients: usize,
) -> anyhow::Result<Record> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("echo.sock");
    let listener = UnixListener::bind(&path)?;
    let server = std::thread::spawn(move || {
        let mut workers = Vec::new();
        for _ in 0..clients {
            let Ok((mut s, _)) = listener.accept() else {
                break;
            };
            workers.push(std::thread::spawn(move || {
                let (mut buf, mut scratch, reply) = (Vec::new(), Vec::new(), vec![1u8; reply_size]);
                while read_frame(&mut s, &mut buf).is_ok() {
                    if write_frame(&mut s, &reply, &mut scratch).is_err() {
                        break;
                    }
                }
            }));
        }
        for w in workers {
            let _ = w.join();
        }
    });
    let req = vec![2u8; req_size];
    let r = run_threads(
        spec,
        clients,
        |_| UnixStream::connect(&path).map(|s| (s, Vec::new(), Vec::new())),
        |(s, buf, scratch)| {
            write_frame(s, &req, scratch)?;
            read_frame(s, buf)
        },
    );
    let (lat, secs) = r?;
    let _ = server.join();
    Ok(Record::from_latencies(
        bench,
        "uds",
        req_size.max(reply_size) as u64,
        clients as u32,
        &lat,
        secs,
    ))
}

/// Request/reply over one loopback TCP connection between two threads (system `tcp`):
/// `req_size` bytes up, `reply_size` bytes back, no framing beyond fixed sizes.
pub fn tcp_round_trip(
    spec: &RunSpec,
    bench: &str,
    req_size: usize,
    reply_size: usize,
) -> anyhow::Result<Record> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let (mut req, reply) = (vec![0u8; req_size], vec![1u8; reply_size]);
        while s.read_exact(&mut req).is_ok() {
            s.write_all(&reply)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let (req, mut reply) = (vec![2u8; req_size], vec![0u8; reply_size]);
    let (lat, secs) = run_single(spec, || {
        c.write_all(&req)?;
        c.read_exact(&mut reply)
    })?;
    drop(c);
    let _ = server.join();
    Ok(Record::from_latencies(
        bench,
        "tcp",
        reply_size as u64,
        1,
        &lat,
        secs,
    ))
}

/// A `redis-server` child on a free loopback port; stopped and reaped on drop.
#[derive(Debug)]
pub struct RedisServer {
    /// Stopped (SIGTERM, then SIGKILL) before the directory goes.
    proc: shoal_devcluster::Proc,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl RedisServer {
    /// Starts redis-server if it is installed (`Ok(None)` if not).
    pub fn start() -> anyhow::Result<Option<RedisServer>> {
        let Some(bin) = find_on_path("redis-server") else {
            return Ok(None);
        };
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let child = Command::new(bin)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--protected-mode", "no", "--daemonize", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let mut server = RedisServer {
            proc: shoal_devcluster::Proc::adopt("redis-server", child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        };
        let answered = shoal_devcluster::wait::wait_for(
            "redis-server to answer PING",
            Duration::from_secs(5),
            || {
                if let Some(status) = server.proc.try_wait() {
                    return Some(Err(status));
                }
                let mut c = RespClient::connect(server.addr).ok()?;
                c.ping().ok().map(Ok)
            },
        )?;
        if let Err(status) = answered {
            bail!("redis-server exited at start: {status}");
        }
        Ok(Some(server))
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A minimal blocking RESP2 client (no pipelining: one command, one reply).
#[derive(Debug)]
pub struct RespClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
    cmd: Vec<u8>,
    line: Vec<u8>,
}

/// One RESP reply.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple,
    Bulk(Option<usize>),
    Int,
}

impl RespClient {
    /// Connects with TCP_NODELAY.
    pub fn connect(addr: SocketAddr) -> io::Result<RespClient> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(RespClient {
            r: BufReader::with_capacity(1 << 16, s.try_clone()?),
            w: s,
            cmd: Vec::new(),
            line: Vec::new(),
        })
    }

    fn send(&mut self, args: &[&[u8]]) -> io::Result<()> {
        self.cmd.clear();
        write!(self.cmd, "*{}\r\n", args.len())?;
        for a in args {
            write!(self.cmd, "${}\r\n", a.len())?;
            self.cmd.extend_from_slice(a);
            self.cmd.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&self.cmd)
    }

    fn reply(&mut self, out: &mut Vec<u8>) -> io::Result<Reply> {
        self.line.clear();
        self.r.read_until(b'\n', &mut self.line)?;
        let line = self
            .line
            .strip_suffix(b"\r\n")
            .ok_or_else(|| io::Error::other("truncated RESP line"))?;
        let (kind, rest) = line
            .split_first()
            .ok_or_else(|| io::Error::other("empty RESP line"))?;
        let num = || -> io::Result<i64> {
            std::str::from_utf8(rest)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::other("bad RESP number"))
        };
        match kind {
            b'+' => Ok(Reply::Simple),
            b':' => Ok(Reply::Int),
            b'-' => Err(io::Error::other(String::from_utf8_lossy(rest).into_owned())),
            b'$' => {
                let n = num()?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                out.resize(n as usize + 2, 0);
                self.r.read_exact(out)?;
                out.truncate(n as usize);
                Ok(Reply::Bulk(Some(n as usize)))
            }
            _ => Err(io::Error::other("unexpected RESP type")),
        }
    }

    /// SET key value.
    pub fn set(&mut self, key: &[u8], val: &[u8]) -> io::Result<()> {
        self.send(&[b"SET", key, val])?;
        self.reply(&mut Vec::new()).map(drop)
    }

    /// GET key into `out`; false when missing.
    pub fn get(&mut self, key: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
        self.send(&[b"GET", key])?;
        Ok(matches!(self.reply(out)?, Reply::Bulk(Some(_))))
    }

    /// PING.
    pub fn ping(&mut self) -> io::Result<()> {
        self.send(&[b"PING"])?;
        self.reply(&mut Vec::new()).map(drop)
    }

    /// FLUSHALL.
    pub fn flushall(&mut self) -> io::Result<()> {
        self.send(&[b"FLUSHALL"])?;
        self.reply(&mut Vec::new()).map(drop)
    }
}

/// What a redis baseline does per operation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RedisOp {
    Get,
    Set,
    /// `get_percent` GETs, the rest SETs, over 100 keys per client.
    Mixed {
        get_percent: u32,
    },
}

pub(crate) fn redis_bench(
    spec: &RunSpec,
    server: &RedisServer,
    bench: &str,
    op: RedisOp,
    size: usize,
    clients: usize,
) -> anyhow::Result<Record> {
    let value = vec![b'v'; size];
    RespClient::connect(server.addr())?.flushall()?;
    let (lat, secs) = run_threads(
        spec,
        clients,
        |i| -> io::Result<_> {
            let mut c = RespClient::connect(server.addr())?;
            let keys: Vec<Vec<u8>> = (0..100)
                .map(|k| format!("c{i}-k{k}").into_bytes())
                .collect();
            for k in &keys {
                c.set(k, &value)?;
            }
            Ok((c, keys, Vec::with_capacity(size + 2), 0u64))
        },
        |(c, keys, buf, n)| {
            *n += 1;
            let key = &keys[(*n % 100) as usize];
            match op {
                RedisOp::Get => c.get(key, buf).map(drop),
                RedisOp::Set => c.set(key, &value),
                RedisOp::Mixed { get_percent } if (*n % 100) < u64::from(get_percent) => {
                    c.get(key, buf).map(drop)
                }
                RedisOp::Mixed { .. } => c.set(key, &value),
            }
        },
    )?;
    Ok(Record::from_latencies(
        bench,
        "redis",
        size as u64,
        clients as u32,
        &lat,
        secs,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> RunSpec {
        RunSpec {
            duration: Duration::from_millis(20),
            warmup: Duration::from_millis(2),
            max_ops: 10_000,
        }
    }

    #[test]
    fn memcpy_and_uds_produce_records() {
        let m = memcpy_bandwidth(&tiny(), "put_large", 1 << 16);
        assert!(m.ops > 0 && m.bytes_per_sec > 0.0 && m.system == "memcpy");
        let u = uds_round_trip(&tiny(), "get_small", 64, 64, 2).unwrap();
        assert!(u.ops > 0 && u.clients == 2 && u.system == "uds");
    }

    #[test]
    fn resp_client_against_a_fake_server() {
        // A scripted server: replies split across writes must still parse.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 256];
            for reply in [
                &b"+PONG\r\n"[..],
                b"$5\r\nhel",
                b"lo\r\n",
                b"$-1\r\n",
                b"-ERR nope\r\n",
            ] {
                if !reply.starts_with(b"lo") {
                    let _ = s.read(&mut buf).unwrap();
                }
                s.write_all(reply).unwrap();
                s.flush().unwrap();
                // Makes each write likely to arrive as its own read, which is what this test
                // is about; the assertions hold whichever way the bytes arrive.
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let mut c = RespClient::connect(addr).unwrap();
        c.ping().unwrap();
        let mut out = Vec::new();
        assert!(c.get(b"k", &mut out).unwrap());
        assert_eq!(out, b"hello");
        assert!(!c.get(b"k", &mut out).unwrap());
        assert!(c.set(b"k", b"v").is_err());
        t.join().unwrap();
    }

    #[test]
    fn real_redis_when_installed() {
        match RedisServer::start().unwrap() {
            None => assert!(find_on_path("redis-server").is_none()),
            Some(server) => {
                let mut c = RespClient::connect(server.addr()).unwrap();
                c.set(b"a", b"1").unwrap();
                let mut out = Vec::new();
                assert!(c.get(b"a", &mut out).unwrap());
                assert_eq!(out, b"1");
                let r = redis_bench(&tiny(), &server, "kv_get", RedisOp::Get, 64, 2).unwrap();
                assert!(r.ops > 0 && r.system == "redis");
            }
        }
    }
}
