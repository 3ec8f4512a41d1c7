//! `shoal bench cluster`: moving objects between two dataworkers on this machine, beside the
//! same bytes over TCP + TLS (tokio + rustls, one connection, the cluster's certificates) and
//! plain TCP, in the same run.
//!
//! The cluster is real: `shoal up --nodes 2` ([`shoal_devcluster::Up`]) starts control and two
//! nodes' processes; a writer client on node 1 seals the object, a reader client on node 2
//! gets it (a pull over QUIC into node 2's arena). The baselines run between two processes as
//! well: a `shoal bench-peer` child serves the bytes, this process receives them. CPU time is read
//! from `/proc/<pid>/stat` of each side before and after, and reported per GB moved.
use crate::report::human;
use crate::{run_single, Latencies, Metric, Record, Report, RunSpec, Target};
use shoal_devcluster::{Proc, RunningUp, Up};
use shoal_sdk::blocking::Client;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Options of the cluster suite.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Short smoke run.
    pub quick: bool,
    /// Print the ratio table at the end.
    pub table: bool,
    /// Only benchmarks whose name contains this.
    pub only: Option<String>,
    /// The `shoal` binary that starts the cluster and the baseline peer.
    pub shoal: PathBuf,
}

impl ClusterOptions {
    fn wants(&self, bench: &str) -> bool {
        self.only.as_deref().is_none_or(|f| bench.contains(f))
    }
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// CPU seconds (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

struct Cluster {
    up: RunningUp,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(shoal: &Path, shm: u64) -> anyhow::Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let up = Up::new(shoal, dir.path())
            .nodes(2)
            .args(["--shm-populate", "--shm-size", &shm.to_string()])
            .args(["--lease-ttl", "3s"])
            .start()?;
        Ok(Cluster { up, _dir: dir })
    }

    fn socket(&self, node: usize) -> anyhow::Result<&Path> {
        let n = self.up.cluster().nodes.get(node);
        Ok(&n
            .ok_or_else(|| anyhow::anyhow!("no node {node}"))?
            .dataworker_socket)
    }

    fn tls_dir(&self) -> &Path {
        &self.up.cluster().tls_dir
    }

    /// CPU seconds of the two dataworkers.
    fn cpu(&self) -> (f64, f64) {
        let nodes = &self.up.cluster().nodes;
        let of = |i: usize| nodes.get(i).and_then(|n| cpu_secs(n.pid)).unwrap_or(0.0);
        (of(0), of(1))
    }
}

/// Runs the suite, printing JSON lines and (with `table`) the ratios.
pub fn run_cluster(opts: &ClusterOptions) -> anyhow::Result<()> {
    let mut report = Report::new(true);
    let spec = if opts.quick {
        RunSpec::quick()
    } else {
        RunSpec::full()
    };
    let large = if opts.quick { 64 * MIB } else { GIB };
    let reps = if opts.quick { 2 } else { 4 };
    let shm = large + large / 2 + 64 * MIB;
    let cluster = Cluster::start(&opts.shoal, shm)?;
    let writer = Client::connect(cluster.socket(0)?)?;
    let reader = Client::connect(cluster.socket(1)?)?;
    if opts.wants("remote_get_large") {
        report.push(remote_large(&cluster, &writer, &reader, large, reps)?);
        for tls in [true, false] {
            report.push(stream_baseline(opts, cluster.tls_dir(), large, reps, tls)?);
        }
    }
    if opts.wants("remote_get_small") {
        for r in remote_small(&spec, &writer, &reader, opts.quick)? {
            report.push(r);
        }
        report.push(crate::baseline::tcp_round_trip(
            &spec,
            "remote_get_small",
            16,
            4 * KIB as usize,
        )?);
    }
    if opts.table {
        report.print_summary(&mut std::io::stderr(), &targets(large))?;
        print_cpu(&report);
    }
    Ok(())
}

fn targets(large: u64) -> Vec<Target> {
    vec![Target {
        bench: "remote_get_large".into(),
        size_bytes: large,
        clients: 1,
        baseline: "tcp_tls".into(),
        metric: Metric::ThroughputRatioAtLeast,
        want: 0.8,
    }]
}

fn print_cpu(report: &Report) {
    let mut err = std::io::stderr();
    let _ = writeln!(err, "\nCPU seconds per GB moved (sender / receiver):");
    for r in report.records() {
        if let (Some(s), Some(rx)) = (r.cpu_send_s_per_gb, r.cpu_recv_s_per_gb) {
            let _ = writeln!(
                err,
                "  {:<18} {:>8} {:<8} {:.2} / {:.2}",
                r.bench,
                human(r.size_bytes),
                r.system,
                s,
                rx
            );
        }
    }
}

fn fill(b: &mut [u8]) {
    for (i, chunk) in b.chunks_mut(4096).enumerate() {
        chunk.fill(i as u8);
    }
}

/// A 1 GiB (quick: 64 MiB) object sealed on node 1 and read on node 2.
fn remote_large(
    cluster: &Cluster,
    writer: &Client,
    reader: &Client,
    size: u64,
    reps: u32,
) -> anyhow::Result<Record> {
    let mut lat = Latencies::new();
    let (mut cpu_send, mut cpu_recv, mut secs) = (0.0, 0.0, 0.0);
    for i in 0..reps {
        let id = format!("bench-large-{i}");
        let mut b = writer.create(&id, size)?;
        fill(b.as_mut_slice());
        writer.seal(b)?;
        let (s0, r0) = cluster.cpu();
        let t = Instant::now();
        let v = reader.get(&id, Duration::from_secs(120))?;
        let d = t.elapsed();
        let (s1, r1) = cluster.cpu();
        anyhow::ensure!(v.len() as u64 == size, "short object");
        anyhow::ensure!(
            v[v.len() - 1] == ((size as usize - 1) / 4096) as u8,
            "bytes differ"
        );
        drop(v);
        lat.record(d);
        secs += d.as_secs_f64();
        cpu_send += s1 - s0;
        cpu_recv += r1 - r0;
        writer.delete(&id)?;
    }
    let mut r = Record::from_latencies("remote_get_large", "shoal", size, 1, &lat, secs);
    let gb = (size * u64::from(reps)) as f64 / 1e9;
    r.cpu_send_s_per_gb = Some(cpu_send / gb);
    r.cpu_recv_s_per_gb = Some(cpu_recv / gb);
    Ok(r)
}

/// The same bytes over one TCP (+ TLS) connection from a `shoal bench-peer` process.
fn stream_baseline(
    opts: &ClusterOptions,
    tls_dir: &Path,
    size: u64,
    reps: u32,
    tls: bool,
) -> anyhow::Result<Record> {
    let mut cmd = Command::new(&opts.shoal);
    cmd.args(["bench-peer", "--bytes", &size.to_string(), "--tls-dir"])
        .arg(tls_dir);
    if !tls {
        cmd.arg("--plain");
    }
    let (peer, PeerReady { addr }) =
        Proc::spawn_ready("shoal bench-peer", &mut cmd, Duration::from_secs(30))?;
    let peer_pid = peer.pid();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let node = shoal_transport::NodeTls::load(&shoal_transport::TlsFiles {
        ca_cert: tls_dir.join("ca.pem"),
        cert: tls_dir.join("node-2.pem"),
        key: tls_dir.join("node-2.key"),
    })?;
    let mut buf = vec![0u8; size as usize];
    buf.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let me = std::process::id();
    let (mut lat, mut cpu_send, mut cpu_recv, mut secs) = (Latencies::new(), 0.0, 0.0, 0.0);
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut stream: Box<dyn AsyncStream> = if tls {
            let connector = tokio_rustls::TlsConnector::from(node.client_config()?);
            let name = rustls::pki_types::ServerName::try_from("shoal-node")?;
            Box::new(connector.connect(name, tcp).await?)
        } else {
            Box::new(tcp)
        };
        for _ in 0..reps {
            let (s0, r0) = (
                cpu_secs(peer_pid).unwrap_or(0.0),
                cpu_secs(me).unwrap_or(0.0),
            );
            let t = Instant::now();
            stream.write_all(&size.to_le_bytes()).await?;
            stream.flush().await?;
            stream.read_exact(&mut buf).await?;
            let d = t.elapsed();
            lat.record(d);
            secs += d.as_secs_f64();
            cpu_send += cpu_secs(peer_pid).unwrap_or(0.0) - s0;
            cpu_recv += cpu_secs(me).unwrap_or(0.0) - r0;
        }
        anyhow::Ok(())
    })?;
    let system = if tls { "tcp_tls" } else { "tcp" };
    let mut r = Record::from_latencies("remote_get_large", system, size, 1, &lat, secs);
    let gb = (size * u64::from(reps)) as f64 / 1e9;
    r.cpu_send_s_per_gb = Some(cpu_send / gb);
    r.cpu_recv_s_per_gb = Some(cpu_recv / gb);
    Ok(r)
}

trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> AsyncStream for T {}

/// First reads of 4 KiB objects on the other node (each a directory lookup and a pull), and
/// the same objects read again once local.
fn remote_small(
    spec: &RunSpec,
    writer: &Client,
    reader: &Client,
    quick: bool,
) -> anyhow::Result<Vec<Record>> {
    let n = if quick { 200 } else { 2000 };
    let data = vec![7u8; 4 * KIB as usize];
    for i in 0..n {
        writer.put(&format!("bench-small-{i}"), &data)?;
    }
    // Part of the measurement's setup, not a wait for readiness: registrations reach the
    // directory owners within milliseconds of each seal, and no call shows that they have
    // (a read would make a local replica and spoil the figure). The reads below would wait
    // for a late one anyway; the pause keeps that wait out of the first-read latencies.
    std::thread::sleep(Duration::from_millis(200));
    let mut lat = Latencies::new();
    let t = Instant::now();
    for i in 0..n {
        let id = format!("bench-small-{i}");
        let s = Instant::now();
        let v = reader.get(&id, Duration::from_secs(10))?;
        lat.record(s.elapsed());
        anyhow::ensure!(v.len() == data.len());
    }
    let remote = Record::from_latencies(
        "remote_get_small",
        "shoal",
        4 * KIB,
        1,
        &lat,
        t.elapsed().as_secs_f64(),
    );
    let mut i = 0u32;
    let (lat, secs) = run_single(spec, || {
        i = (i + 1) % n;
        reader
            .get(&format!("bench-small-{i}"), Duration::ZERO)
            .map(drop)
    })?;
    let local = Record::from_latencies("remote_get_small", "shoal_local", 4 * KIB, 1, &lat, secs);
    for i in 0..n {
        let _ = writer.delete(&format!("bench-small-{i}"));
    }
    Ok(vec![remote, local])
}

/// The ready line of `shoal bench-peer`.
#[derive(serde::Serialize, serde::Deserialize)]
struct PeerReady {
    /// Where it serves.
    addr: SocketAddr,
}

/// `shoal bench-peer`: serves `bytes` bytes per 8-byte request on one TCP (+ TLS) connection
/// at a time; prints its address (a JSON ready line) on stdout and exits when stdin closes.
pub fn serve_bytes(tls_dir: &Path, bytes: u64, tls: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let ready = PeerReady {
        addr: listener.local_addr()?,
    };
    println!("{}", serde_json::to_string(&ready)?);
    std::io::stdout().flush()?;
    // Exit when the parent goes away.
    std::thread::spawn(|| {
        let mut sink = [0u8; 16];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
    let node = shoal_transport::NodeTls::load(&shoal_transport::TlsFiles {
        ca_cert: tls_dir.join("ca.pem"),
        cert: tls_dir.join("node-1.pem"),
        key: tls_dir.join("node-1.key"),
    })?;
    let mut data = vec![0u8; bytes as usize];
    fill(&mut data);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(node.server_config()?);
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let mut stream: Box<dyn AsyncStream> = if tls {
                Box::new(acceptor.accept(tcp).await?)
            } else {
                Box::new(tcp)
            };
            let mut req = [0u8; 8];
            while stream.read_exact(&mut req).await.is_ok() {
                let n = (u64::from_le_bytes(req) as usize).min(data.len());
                stream.write_all(&data[..n]).await?;
                stream.flush().await?;
            }
        }
    })
}
