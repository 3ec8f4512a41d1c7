//! `shoal bench local`: one node's object and KV paths against memcpy, a raw Unix-socket
//! round trip and redis-server, all in one run.
//!
//! The dataworker runs in this process on its own runtime (two threads, like a real node on
//! this 2-core machine); clients are blocking SDK clients on OS threads, as a function would
//! use them. Redis is a separate process reached over loopback TCP with one connection per
//! client and no pipelining.
use crate::baseline::{redis_bench, RedisOp};
use crate::{
    memcpy_bandwidth, run_single, run_threads, uds_round_trip, Metric, Record, RedisServer, Report,
    RunSpec, Target,
};
use shoal_dataworker::{Config, Dataworker};
use shoal_sdk::blocking::Client;
use shoal_sdk::{ConnectOptions, SetOptions};
use std::path::PathBuf;
use std::time::Duration;

/// Options of the local suite.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Short smoke run.
    pub quick: bool,
    /// Print the ratio table (to stderr) at the end.
    pub table: bool,
    /// Only benchmarks whose name contains this.
    pub only: Option<String>,
}

impl LocalOptions {
    fn wants(&self, bench: &str) -> bool {
        self.only.as_deref().is_none_or(|f| bench.contains(f))
    }
}

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

struct Node {
    rt: tokio::runtime::Runtime,
    worker: Option<Dataworker>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(shm: u64) -> anyhow::Result<Node> {
        let dir = tempfile::tempdir()?;
        // Same runtime shape as `shoal dataworker` by default (see its --worker-threads).
        let rt = shoal_dataworker::runtime(1)?;
        let mut cfg = Config::new(dir.path());
        cfg.shm_size = shm;
        cfg.shm_populate = true;
        cfg.node_id = "bench".into();
        let worker = rt.block_on(Dataworker::start(cfg, None))?;
        let socket = worker.socket_path().to_owned();
        Ok(Node {
            rt,
            worker: Some(worker),
            socket,
            _dir: dir,
        })
    }

    fn client(&self) -> Result<Client, shoal_sdk::Error> {
        Client::connect(&self.socket)
    }

    /// A client whose mapping of the arena is faulted in at connect, so large writes run at
    /// memory speed from the first byte (what a long-lived producer gets after warm-up).
    fn populated_client(&self) -> Result<Client, shoal_sdk::Error> {
        Client::connect_with(ConnectOptions {
            populate: true,
            ..ConnectOptions::new(&self.socket)
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            self.rt.block_on(w.shutdown());
        }
    }
}

fn targets() -> Vec<Target> {
    let t = |bench: &str, size: usize, clients: u32, baseline: &str, metric, want| Target {
        bench: bench.into(),
        size_bytes: size as u64,
        clients,
        baseline: baseline.into(),
        metric,
        want,
    };
    use Metric::*;
    vec![
        t("get_small", 64, 1, "redis", P50RatioAtMost, 0.5),
        t("get_small", 64, 1, "redis", ThroughputRatioAtLeast, 2.0),
        t("get_small", 4 * KIB, 1, "redis", P50RatioAtMost, 0.5),
        t(
            "get_small",
            4 * KIB,
            1,
            "redis",
            ThroughputRatioAtLeast,
            2.0,
        ),
        t("put_small", 64, 1, "redis", P50RatioAtMost, 1.0),
        t("put_small", 4 * KIB, 1, "redis", P50RatioAtMost, 1.0),
        t(
            "put_large",
            64 * MIB,
            1,
            "memcpy",
            ThroughputRatioAtLeast,
            0.5,
        ),
        t(
            "get_zero_copy",
            256 * MIB,
            1,
            "",
            P50SizeRatioAtMost {
                other_size: KIB as u64,
            },
            2.0,
        ),
        t("kv_get", 64, 1, "redis", ThroughputRatioAtLeast, 2.0),
        t("kv_get", 64, 16, "redis", ThroughputRatioAtLeast, 2.0),
        t("kv_set", 64, 1, "redis", ThroughputRatioAtLeast, 2.0),
        t("kv_set", 64, 16, "redis", ThroughputRatioAtLeast, 2.0),
    ]
}

type R<T> = Result<T, shoal_sdk::Error>;

/// Runs the suite: JSON lines on stdout, then (with `table`) the ratios on stderr.
pub fn run_local(opts: &LocalOptions) -> anyhow::Result<Report> {
    let spec = if opts.quick {
        RunSpec::quick()
    } else {
        RunSpec::full()
    };
    let mut report = Report::new(true);
    let node = Node::start(if opts.quick { 768 } else { 1024 } as u64 * MIB as u64)?;
    let redis = match RedisServer::start() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "redis-server did not start; redis baselines skipped");
            None
        }
    };
    if redis.is_none() {
        eprintln!("note: redis-server not found on PATH; redis baselines are skipped (apt-get install redis-server)");
    }

    // Small gets: one client, hit.
    for size in [64, 4 * KIB]
        .into_iter()
        .filter(|_| opts.wants("get_small"))
    {
        let c = node.client()?;
        c.put("get-small", &vec![1u8; size])?;
        let (lat, secs) = run_single(&spec, || -> R<()> {
            let v = c.get("get-small", Duration::ZERO)?;
            std::hint::black_box(v[v.len() - 1]);
            Ok(())
        })?;
        report.push(Record::from_latencies(
            "get_small",
            "shoal",
            size as u64,
            1,
            &lat,
            secs,
        ));
        c.delete("get-small")?;
        report.push(uds_round_trip(&spec, "get_small", 32, size, 1)?);
        if let Some(r) = &redis {
            report.push(redis_bench(&spec, r, "get_small", RedisOp::Get, size, 1)?);
        }
    }

    // Small puts: create + write + seal of a fresh id per op (inline: one round trip).
    for size in [64, 4 * KIB]
        .into_iter()
        .filter(|_| opts.wants("put_small"))
    {
        let c = node.client()?;
        let data = vec![2u8; size];
        let mut i = 0u64;
        let (lat, secs) = run_single(&spec, || -> R<()> {
            i += 1;
            c.put(&format!("put-small-{i}"), &data)
        })?;
        report.push(Record::from_latencies(
            "put_small",
            "shoal",
            size as u64,
            1,
            &lat,
            secs,
        ));
        // Fast puts can fill the arena; the oldest were evicted, which is fine.
        for j in 1..=i {
            match c.delete(&format!("put-small-{j}")) {
                Err(e) if e.code() != shoal_sdk::ErrorCode::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        report.push(uds_round_trip(&spec, "put_small", size, 32, 1)?);
        if let Some(r) = &redis {
            report.push(redis_bench(&spec, r, "put_small", RedisOp::Set, size, 1)?);
        }
    }

    // Large put: create, copy 64 MiB into shared memory, seal (delete outside the timing).
    if opts.wants("put_large") {
        let size = 64 * MIB;
        let c = node.populated_client()?;
        let data = vec![3u8; size];
        let spec_large = spec.capped(if opts.quick { 3 } else { 200 });
        let mut lat = crate::Latencies::new();
        let mut secs = 0.0;
        let warm = if opts.quick { 1 } else { 3 };
        for i in 0..(warm + spec_large.max_ops) {
            let t = std::time::Instant::now();
            let mut b = c.create("put-large", size as u64)?;
            b.as_mut_slice().copy_from_slice(&data);
            c.seal(b)?;
            let d = t.elapsed();
            if i >= warm {
                lat.record(d);
                secs += d.as_secs_f64();
            }
            c.delete("put-large")?;
            if i >= warm && secs > spec_large.duration.as_secs_f64() {
                break;
            }
        }
        report.push(Record::from_latencies(
            "put_large",
            "shoal",
            size as u64,
            1,
            &lat,
            secs,
        ));
        report.push(memcpy_bandwidth(
            &spec.capped(if opts.quick { 3 } else { 200 }),
            "put_large",
            size,
        ));
    }

    // Zero copy: a get of 256 MiB costs what a get of 1 KiB costs.
    for size in [KIB, 256 * MIB]
        .into_iter()
        .filter(|_| opts.wants("get_zero_copy"))
    {
        let c = node.client()?;
        let mut b = c.create("zc", size as u64)?;
        b.as_mut_slice().fill(4);
        c.seal(b)?;
        let (lat, secs) = run_single(&spec, || -> R<()> {
            let v = c.get("zc", Duration::ZERO)?;
            std::hint::black_box(v[v.len() / 2]);
            Ok(())
        })?;
        report.push(Record::from_latencies(
            "get_zero_copy",
            "shoal",
            size as u64,
            1,
            &lat,
            secs,
        ));
        c.delete("zc")?;
    }

    // KV get/set, 1 and 16 clients, 64-byte values.
    for clients in [1usize, 16] {
        let size = 64;
        let value = vec![5u8; size];
        if opts.wants("kv_get") {
            let (lat, secs) = run_threads(
                &spec,
                clients,
                |i| -> R<_> {
                    let c = node.client()?;
                    c.kv_set(&format!("kv-{i}"), &value, SetOptions::default())?;
                    Ok((c, format!("kv-{i}")))
                },
                |(c, key)| -> R<()> {
                    let v = c.kv_get(key)?;
                    std::hint::black_box(v.map(|v| v[0]));
                    Ok(())
                },
            )?;
            report.push(Record::from_latencies(
                "kv_get",
                "shoal",
                size as u64,
                clients as u32,
                &lat,
                secs,
            ));
            if let Some(r) = &redis {
                report.push(redis_bench(
                    &spec,
                    r,
                    "kv_get",
                    RedisOp::Get,
                    size,
                    clients,
                )?);
            }
        }
        if opts.wants("kv_set") {
            let (lat, secs) = run_threads(
                &spec,
                clients,
                |i| -> R<_> { Ok((node.client()?, format!("kv-{i}"))) },
                |(c, key)| -> R<()> { c.kv_set(key, &value, SetOptions::default()).map(drop) },
            )?;
            report.push(Record::from_latencies(
                "kv_set",
                "shoal",
                size as u64,
                clients as u32,
                &lat,
                secs,
            ));
            if let Some(r) = &redis {
                report.push(redis_bench(
                    &spec,
                    r,
                    "kv_set",
                    RedisOp::Set,
                    size,
                    clients,
                )?);
            }
        }
    }

    // Mixed: 16 clients, 90% get / 10% put of 4 KiB objects (puts replace a rotating id).
    if opts.wants("mixed") {
        let (size, clients) = (4 * KIB, 16usize);
        let data = vec![6u8; size];
        let (lat, secs) = run_threads(
            &spec,
            clients,
            |i| -> R<_> {
                let c = node.client()?;
                for k in 0..10 {
                    c.put(&format!("mix-{i}-{k}"), &data)?;
                }
                Ok((c, i, 0u64))
            },
            |(c, i, n)| -> R<()> {
                *n += 1;
                let k = *n % 10;
                let id = format!("mix-{i}-{k}");
                if *n % 10 == 0 {
                    c.delete(&id)?;
                    c.put(&id, &data)
                } else {
                    let v = c.get(&id, Duration::ZERO)?;
                    std::hint::black_box(v[0]);
                    Ok(())
                }
            },
        )?;
        report.push(Record::from_latencies(
            "mixed_90_10",
            "shoal",
            size as u64,
            clients as u32,
            &lat,
            secs,
        ));
        if let Some(r) = &redis {
            report.push(redis_bench(
                &spec,
                r,
                "mixed_90_10",
                RedisOp::Mixed { get_percent: 90 },
                size,
                clients,
            )?);
        }
    }

    drop(node);
    drop(redis);
    if opts.table {
        report.print_summary(&mut std::io::stderr(), &targets())?;
    }
    Ok(report)
}
