//! `shoal bench calls`: warm function calls through a node's proxy, beside request/reply
//! through a real `nats-server` (one requester connection per client, one responder), in the
//! same run.
//!
//! shoal: the proxy runs in this process on its own thread (io_uring engine, or tokio); one
//! function instance (the SDK's `FunctionInstance`, concurrency 16) echoes its argument;
//! callers are SDK `CallClient`s, one per client thread, each on its own current-thread
//! runtime. `shoal` is the SDK's default: a call to an instance on the caller's node takes the
//! instance's call lane (shared memory; the proxy only says where the lane is).
//! `shoal_proxy` is the same with lanes off, every call through the proxy (caller → proxy →
//! instance → proxy → caller), as `proxy_forward_1k` measures it. NATS: `nats-server` started by the
//! suite on a free loopback port; the responder echoes on subject `echo`; each requester
//! publishes with its own inbox as reply subject and waits for the answer. Both carry 1 KiB
//! each way.
//!
//! Cross-node (`call_remote_1k`): two proxies in this process, each on its own threads and
//! with its own node certificate under one cluster CA, sharing an in-memory metadata store;
//! the instance registers with node b's proxy, callers call through node a's, so every call
//! crosses TLS-over-TCP loopback from proxy to proxy and back.
//!
//! Large arguments (`call_arg_1m`): 1 MiB argument, 8-byte result, same node; the handler
//! reads every byte. `shoal_inline`: the bytes travel in the call (the proxy's inline limit
//! raised to 2 MiB for this). `shoal_object`: the argument is an object already in the node's
//! dataworker and the call carries its id; the instance reads it through a zero-copy view.
use crate::baseline::find_on_path;
use crate::{run_threads, Metric, Record, Report, RunSpec, Target};
use anyhow::Context;
use shoal_devcluster::wait::wait_for;
use shoal_devcluster::Proc;
use shoal_meta::records::{
    function_key, instance_key, CodeSource, FunctionSpec, InstancePhase, InstanceRecord, Resources,
};
use shoal_proxy::{EngineKind, Proxy, ProxyConfig};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

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
            for (lanes, system) in [(true, "shoal"), (false, "shoal_proxy")] {
                let (r, _) =
                    shoal_calls(&spec, EngineKind::Auto, clients, "call_1k", system, lanes)?;
                report.push(r);
            }
            if let Some(n) = &nats {
                report.push(nats_calls(&spec, n.addr, clients)?);
            }
        }
    }
    if wants("call_remote") {
        for clients in [1usize, 16] {
            report.push(remote_calls(&spec, clients)?);
            if let Some(n) = &nats {
                // The same baseline, beside the cross-node figure.
                let mut r = nats_calls(&spec, n.addr, clients)?;
                r.bench = "call_remote_1k".into();
                report.push(r);
            }
        }
    }
    if wants("call_arg_1m") {
        for object in [false, true] {
            report.push(large_arg_calls(&spec, object)?);
        }
    }
    if wants("proxy_forward") {
        for (engine, system) in [
            (EngineKind::Uring, "shoal_uring"),
            (EngineKind::Tokio, "shoal_tokio"),
        ] {
            let (r, cpu) = shoal_calls(&spec, engine, 16, "proxy_forward_1k", system, false)?;
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
        Target {
            bench: "call_remote_1k".into(),
            size_bytes: SIZE as u64,
            clients: 1,
            baseline: "nats".into(),
            metric: Metric::P50RatioAtMost,
            want: 1.0,
        },
    ]
}

/// Echo instance handler: the argument back.
async fn echo(arg: Vec<u8>) -> Result<Vec<u8>, String> {
    Ok(arg)
}

/// Calls `echo` with `arg` from `clients` threads, each with its own `CallClient` on
/// `proxy` (through call lanes when `lanes` and the instance is local) and its own
/// current-thread runtime.
fn call_threads(
    spec: &RunSpec,
    clients: usize,
    proxy: &std::path::Path,
    lanes: bool,
    arg: shoal_sdk::Payload,
    want_len: usize,
) -> anyhow::Result<(crate::Latencies, f64)> {
    run_threads(
        spec,
        clients,
        |_| -> anyhow::Result<_> {
            let crt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let opts = shoal_sdk::CallOptions {
                lanes,
                ..Default::default()
            };
            let c = crt.block_on(shoal_sdk::CallClient::connect_with(proxy, opts))?;
            Ok((crt, c))
        },
        |(crt, c)| {
            let out =
                crt.block_on(c.invoke_payload("echo", None, arg.clone(), Duration::from_secs(10)))?;
            anyhow::ensure!(out.len() == want_len, "reply of {} bytes", out.len());
            Ok(())
        },
    )
}

/// An in-memory metadata store for an in-process proxy (opened on `rt`).
fn bench_meta(
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<std::sync::Arc<dyn shoal_meta::MetaStore>> {
    let _rt = rt.enter();
    Ok(std::sync::Arc::new(shoal_meta::MemStore::open(None, "")?))
}

/// The credential of instance `instance` of `function` (tenant `default`), as an agent
/// issues it: the proxy registers an instance only with its own.
fn instance_token(
    rt: &tokio::runtime::Runtime,
    meta: &dyn shoal_meta::MetaStore,
    function: &str,
    instance: &str,
) -> anyhow::Result<String> {
    let binding = shoal_meta::records::InstanceBinding {
        function: function.into(),
        instance: instance.into(),
    };
    let issued = rt.block_on(shoal_meta::issue_instance_token(
        meta,
        shoal_meta::records::DEFAULT_TENANT,
        binding,
    ))?;
    Ok(issued.token)
}

/// Cross-node warm calls: callers on node a's proxy, the instance on node b's.
fn remote_calls(spec: &RunSpec, clients: usize) -> anyhow::Result<Record> {
    use shoal_meta::MetaStore;
    let dir = tempfile::tempdir()?;
    let ca = shoal_transport::DevCa::generate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-instance")
        .enable_all()
        .build()?;
    let meta: std::sync::Arc<dyn MetaStore> = bench_meta(&rt)?;
    // Node b runs the instance; the records say so, as an agent and placement would.
    let function = FunctionSpec {
        name: "echo".into(),
        tenant: String::new(),
        version: 1,
        code: CodeSource::Dir { path: "/".into() },
        digest: None,
        command: vec!["echo".into()],
        env: Default::default(),
        resources: Resources {
            cpu_milli: 100,
            mem_mib: 64,
        },
        min_instances: 0,
        max_instances: 1,
        concurrency: 16,
        labels: Default::default(),
        node_selector: Default::default(),
        affinity: Vec::new(),
        anti_affinity: Vec::new(),
        pool: None,
    };
    let inst = InstanceRecord {
        id: "echo-b".into(),
        function: "echo".into(),
        node: "b".into(),
        state: InstancePhase::Running,
        reason: None,
        pid: None,
        function_version: Some(1),
    };
    rt.block_on(async {
        meta.put(&function_key("echo"), serde_json::to_vec(&function)?, None)
            .await?;
        meta.put(
            &instance_key("echo", "echo-b"),
            serde_json::to_vec(&inst)?,
            None,
        )
        .await?;
        anyhow::Ok(())
    })?;
    let start = |node: &str| -> anyhow::Result<Proxy> {
        let mut cfg = ProxyConfig::new(node, dir.path().join(format!("{node}.sock")));
        cfg.meta = Some(meta.clone());
        cfg.peer = Some(shoal_proxy::PeerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            tls: shoal_transport::NodeTls::from_node_cert(&ca.issue(node)?)?,
            lease_ttl: Duration::from_secs(10),
        });
        Ok(Proxy::start(cfg)?)
    };
    let (a, b) = (start("a")?, start("b")?);
    let token = instance_token(&rt, &*meta, "echo", "echo-b")?;
    let instance = rt.block_on(shoal_sdk::FunctionInstance::register(
        b.socket_path(),
        "echo",
        "echo-b",
        16,
        Some(&token),
    ))?;
    rt.spawn(instance.run(echo));
    // Wait until node a routes to node b.
    let caller = rt.block_on(shoal_sdk::CallClient::connect(a.socket_path()))?;
    wait_for(
        "node a to route calls to node b",
        Duration::from_secs(10),
        || {
            rt.block_on(caller.invoke("echo", b"ping", Duration::from_secs(1)))
                .ok()
        },
    )?;
    let (lat, secs) = call_threads(
        spec,
        clients,
        a.socket_path(),
        true,
        shoal_sdk::Payload::Inline(vec![7u8; SIZE]),
        SIZE,
    )?;
    rt.block_on(async {
        a.shutdown().await;
        b.shutdown().await;
    });
    Ok(Record::from_latencies(
        "call_remote_1k",
        "shoal",
        SIZE as u64,
        clients as u32,
        &lat,
        secs,
    ))
}

const BIG: usize = 1 << 20;

/// One caller, a 1 MiB argument inline or as an object id, an 8-byte result.
fn large_arg_calls(spec: &RunSpec, object: bool) -> anyhow::Result<Record> {
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-instance")
        .enable_all()
        .build()?;
    let mut wcfg = shoal_dataworker::Config::new(dir.path().join("dw"));
    wcfg.shm_size = 256 << 20;
    wcfg.node_id = "bench".into();
    let worker = rt.block_on(shoal_dataworker::Dataworker::start(wcfg, None))?;
    let socket = worker.socket_path().to_owned();
    let meta = bench_meta(&rt)?;
    let mut cfg = ProxyConfig::new("bench", dir.path().join("proxy.sock"));
    cfg.inline_limit = 2 * BIG as u64;
    cfg.max_frame = 4 * BIG;
    cfg.meta = Some(meta.clone());
    let proxy = Proxy::start(cfg)?;
    let store = rt.block_on(shoal_sdk::Client::connect(&socket))?;
    let token = instance_token(&rt, &*meta, "echo", "sum-1")?;
    let instance = rt
        .block_on(shoal_sdk::FunctionInstance::register(
            proxy.socket_path(),
            "echo",
            "sum-1",
            16,
            Some(&token),
        ))?
        .with_store(store.clone());
    rt.spawn(instance.run_data(|d: shoal_sdk::Data| async move {
        let sum = d
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .fold(0u64, u64::wrapping_add);
        Ok(sum.to_le_bytes().to_vec())
    }));
    let bytes: Vec<u8> = (0..BIG).map(|i| i as u8).collect();
    let arg = if object {
        let id = shoal_sdk::ObjectId::new("bench-arg-1m")?;
        rt.block_on(store.put(id.as_str(), &bytes))?;
        shoal_sdk::Payload::Object(id)
    } else {
        shoal_sdk::Payload::Inline(bytes)
    };
    let (lat, secs) = call_threads(spec, 1, proxy.socket_path(), true, arg, 8)?;
    rt.block_on(proxy.shutdown());
    drop(store);
    rt.block_on(worker.shutdown());
    Ok(Record::from_latencies(
        "call_arg_1m",
        if object {
            "shoal_object"
        } else {
            "shoal_inline"
        },
        BIG as u64,
        1,
        &lat,
        secs,
    ))
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

/// Calls through an in-process proxy to one echo instance (through its call lane when
/// `lanes`); returns the record and the CPU seconds the proxy's threads spent.
fn shoal_calls(
    spec: &RunSpec,
    engine: EngineKind,
    clients: usize,
    bench: &str,
    system: &str,
    lanes: bool,
) -> anyhow::Result<(Record, f64)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("proxy.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-instance")
        .enable_all()
        .build()?;
    let meta = bench_meta(&rt)?;
    let mut cfg = ProxyConfig::new("bench", &path);
    cfg.engine = engine;
    cfg.meta = Some(meta.clone());
    let proxy = Proxy::start(cfg)?;
    let token = instance_token(&rt, &*meta, "echo", "echo-1")?;
    let instance = rt.block_on(shoal_sdk::FunctionInstance::register(
        &path,
        "echo",
        "echo-1",
        16,
        Some(&token),
    ))?;
    rt.spawn(instance.run(echo));
    let cpu0 = thread_cpu("shoal-proxy");
    let arg = shoal_sdk::Payload::Inline(vec![7u8; SIZE]);
    let r = call_threads(spec, clients, &path, lanes, arg, SIZE);
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
    _proc: Proc,
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
            _proc: Proc::adopt("nats-server", child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        wait_for("nats-server to listen", Duration::from_secs(10), || {
            TcpStream::connect(server.addr).ok()
        })?;
        Ok(Some(server))
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
