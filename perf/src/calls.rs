//! `shoal bench calls`: warm function calls through a node's proxy, beside request/reply
//! through a real `nats-server` (one requester connection per client, one responder), in the
//! same run.
//!
//! shoal: the proxy runs in this process on its own thread (io_uring engine, or tokio); one
//! function instance (the SDK's `FunctionInstance`, concurrency 16) echoes its argument;
//! callers are SDK `CallClient`s, one per client thread. NATS: `nats-server` started by the
//! suite on a free loopback port; the responder echoes on subject `echo`; each requester
//! publishes with its own inbox as reply subject and waits for the answer. Both carry 1 KiB
//! each way.
use crate::baseline::find_on_path;
use crate::{run_threads, Metric, Record, Report, RunSpec, Target};
use anyhow::Context;
use shoal_proxy::{EngineKind, Proxy, ProxyConfig};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options of the calls suite.
#[derive(Debug, Clone)]
pub struct CallsOptions {
    /// Short smoke run.
    pub quick: bool,
    /// Print the ratio table at the end.
    pub table: bool,
    /// Only benchmarks whose name contains this.
    pub only: Option<String>,
}

const SIZE: usize = 1 << 10;

/// Runs the suite, printing JSON lines and (with `table`) the ratios.
pub fn run_calls(opts: &CallsOptions) -> anyhow::Result<()> {
    let mut report = Report::new(true);
    let spec = if opts.quick {
        RunSpec::quick()
    } else {
        RunSpec::full()
    };
    let wants = |b: &str| opts.only.as_deref().is_none_or(|f| b.contains(f));
    let nats = NatsServer::start()?;
    if nats.is_none() {
        tracing::warn!("nats-server is not installed: the NATS baselines are skipped");
    }
    if wants("call_1k") {
        for clients in [1usize, 16] {
            let (r, _) = shoal_calls(&spec, EngineKind::Auto, clients, "call_1k", "shoal")?;
            report.push(r);
            if let Some(n) = &nats {
                report.push(nats_calls(&spec, n.addr, clients)?);
            }
        }
    }
    if wants("proxy_forward") {
        for (engine, system) in [
            (EngineKind::Uring, "shoal_uring"),
            (EngineKind::Tokio, "shoal_tokio"),
        ] {
            let (r, cpu) = shoal_calls(&spec, engine, 16, "proxy_forward_1k", system)?;
            let per_cpu_s = if cpu > 0.0 { r.ops as f64 / cpu } else { 0.0 };
            eprintln!(
                "proxy engine {system}: {:.0} calls/s, {:.0} calls per proxy CPU-second ({cpu:.2} CPU s)",
                r.ops_per_sec, per_cpu_s
            );
            report.push(r);
        }
    }
    if opts.table {
        report.print_summary(&mut std::io::stderr(), &targets())?;
    }
    Ok(())
}

fn targets() -> Vec<Target> {
    let t = |clients, metric, want| Target {
        bench: "call_1k".into(),
        size_bytes: SIZE as u64,
        clients,
        baseline: "nats".into(),
        metric,
        want,
    };
    vec![
        t(1, Metric::P50RatioAtMost, 0.5),
        t(16, Metric::ThroughputRatioAtLeast, 3.0),
    ]
}

/// CPU seconds of this process's threads whose name starts with `prefix`.
fn thread_cpu(prefix: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim_end().starts_with(prefix))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|stat| {
            let f: Vec<String> = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .map(str::to_string)
                .collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / 100.0
}

/// Calls through an in-process proxy to one echo instance; returns the record and the CPU
/// seconds the proxy's threads spent.
fn shoal_calls(
    spec: &RunSpec,
    engine: EngineKind,
    clients: usize,
    bench: &str,
    system: &str,
) -> anyhow::Result<(Record, f64)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("proxy.sock");
    let mut cfg = ProxyConfig::new("bench", &path);
    cfg.engine = engine;
    let proxy = Proxy::start(cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-instance")
        .enable_all()
        .build()?;
    let instance = rt.block_on(shoal_sdk::FunctionInstance::register(
        &path, "echo", "echo-1", 16,
    ))?;
    rt.spawn(instance.run(|arg: Vec<u8>| async move { Ok(arg) }));
    let arg = vec![7u8; SIZE];
    let cpu0 = thread_cpu("shoal-proxy");
    let r = run_threads(
        spec,
        clients,
        |_| -> anyhow::Result<_> {
            let crt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let c = crt.block_on(shoal_sdk::CallClient::connect(&path))?;
            Ok((crt, c))
        },
        |(crt, c)| {
            let out = crt.block_on(c.invoke("echo", &arg, Duration::from_secs(10)))?;
            anyhow::ensure!(out.len() == SIZE, "short reply");
            Ok(())
        },
    );
    let cpu = thread_cpu("shoal-proxy") - cpu0;
    let (lat, secs) = r?;
    rt.block_on(proxy.shutdown());
    Ok((
        Record::from_latencies(bench, system, SIZE as u64, clients as u32, &lat, secs),
        cpu,
    ))
}

/// A `nats-server` child on a free loopback port; stopped and reaped on drop.
struct NatsServer {
    child: Child,
    addr: SocketAddr,
}

impl NatsServer {
    fn start() -> anyhow::Result<Option<NatsServer>> {
        let Some(bin) = find_on_path("nats-server") else {
            return Ok(None);
        };
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nats-server")?;
        let server = NatsServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(server.addr).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(server))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal NATS client (text protocol): enough for request/reply.
struct Nats {
    r: BufReader<TcpStream>,
    w: TcpStream,
    line: String,
}

impl Nats {
    fn connect(addr: SocketAddr) -> std::io::Result<Nats> {
        let w = TcpStream::connect(addr)?;
        w.set_nodelay(true)?;
        let mut n = Nats {
            r: BufReader::new(w.try_clone()?),
            w,
            line: String::new(),
        };
        n.read_line()?; // INFO
        n.w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")?;
        Ok(n)
    }

    fn read_line(&mut self) -> std::io::Result<()> {
        self.line.clear();
        if self.r.read_line(&mut self.line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn sub(&mut self, subject: &str) -> std::io::Result<()> {
        write!(self.w, "SUB {subject} 1\r\nPING\r\n")?;
        // The server has the subscription once it answers the PING.
        loop {
            self.read_line()?;
            if self.line.starts_with("PONG") {
                return Ok(());
            }
        }
    }

    fn publish(&mut self, subject: &str, reply: Option<&str>, data: &[u8]) -> std::io::Result<()> {
        let mut frame = match reply {
            Some(r) => format!("PUB {subject} {r} {}\r\n", data.len()).into_bytes(),
            None => format!("PUB {subject} {}\r\n", data.len()).into_bytes(),
        };
        frame.extend_from_slice(data);
        frame.extend_from_slice(b"\r\n");
        self.w.write_all(&frame)
    }

    /// The next message: its reply subject and payload (answers PINGs on the way).
    fn next_msg(&mut self, payload: &mut Vec<u8>) -> std::io::Result<Option<String>> {
        loop {
            self.read_line()?;
            if self.line.starts_with("PING") {
                self.w.write_all(b"PONG\r\n")?;
                continue;
            }
            if !self.line.starts_with("MSG ") {
                continue;
            }
            let parts: Vec<&str> = self.line.split_whitespace().collect();
            let (reply, len) = match parts.len() {
                5 => (Some(parts[3].to_string()), parts[4]),
                4 => (None, parts[3]),
                _ => return Err(std::io::Error::other("malformed MSG")),
            };
            let len: usize = len.parse().map_err(std::io::Error::other)?;
            payload.resize(len + 2, 0);
            self.r.read_exact(payload)?;
            payload.truncate(len);
            return Ok(reply);
        }
    }
}

fn nats_calls(spec: &RunSpec, addr: SocketAddr, clients: usize) -> anyhow::Result<Record> {
    let mut responder = Nats::connect(addr)?;
    responder.sub("echo")?;
    let resp_sock = responder.w.try_clone()?;
    let resp_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        while let Ok(reply) = responder.next_msg(&mut buf) {
            if let Some(r) = reply {
                if responder.publish(&r, None, &buf).is_err() {
                    break;
                }
            }
        }
    });
    let arg = vec![7u8; SIZE];
    let r = run_threads(
        spec,
        clients,
        |i| -> anyhow::Result<_> {
            let mut n = Nats::connect(addr)?;
            let inbox = format!("_INBOX.bench.{i}");
            n.sub(&inbox)?;
            Ok((n, inbox, Vec::new()))
        },
        |(n, inbox, buf)| {
            n.publish("echo", Some(inbox), &arg)?;
            n.next_msg(buf)?;
            anyhow::ensure!(buf.len() == SIZE, "short reply");
            Ok(())
        },
    );
    // Closing the responder's socket ends its loop.
    let _ = resp_sock.shutdown(std::net::Shutdown::Both);
    let _ = resp_thread.join();
    let (lat, secs) = r?;
    Ok(Record::from_latencies(
        "call_1k",
        "nats",
        SIZE as u64,
        clients as u32,
        &lat,
        secs,
    ))
}
