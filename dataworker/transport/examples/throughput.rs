//! Bulk throughput of the QUIC transport against a TCP + TLS baseline, in one run.
//!
//! Moves `--size` bytes (default 1 GiB) from a server endpoint to a client endpoint on loopback:
//! over QUIC with 1, 4 and 8 parallel range fetches on one connection, and over one TCP + TLS
//! connection (tokio-rustls, same CA and certificates, TLS 1.3). Both receivers copy into a
//! pre-faulted destination buffer, and every transfer is verified byte for byte after timing.
//! Handshakes are excluded: both connections are warm when the clock starts. Client and server run
//! in one process on one Tokio runtime (`--workers` threads), so they compete for the same cores,
//! for QUIC and TCP alike. Runs alternate between the modes; medians are reported.
//!
//! ```text
//! cargo run --release -p shoal-transport --example throughput -- [--size BYTES] [--runs N]
//!     [--streams 1,4,8] [--workers 2] [--cc cubic|newreno|bbr] [--no-fairness]
//!     [--mtu BYTES] [--stream-window BYTES] [--conn-window BYTES] [-v]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_transport::{Congestion, DevCa, Endpoint, NodeTls, Reply, Service, TransportConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Serialize, Deserialize)]
struct Range {
    offset: u64,
    len: u64,
}

struct Source(Bytes);

#[async_trait::async_trait]
impl Service for Source {
    type Req = Range;
    type Resp = u64;
    async fn handle(&self, _peer: SocketAddr, req: Range) -> Reply<u64> {
        let start = req.offset.min(self.0.len() as u64) as usize;
        let end = (req.offset.saturating_add(req.len)).min(self.0.len() as u64) as usize;
        Reply::with_body((end - start) as u64, self.0.slice(start..end))
    }
}

struct Args {
    size: usize,
    runs: usize,
    streams: Vec<usize>,
    workers: usize,
    congestion: Congestion,
    fairness: bool,
    mtu: Option<u16>,
    stream_window: Option<u64>,
    conn_window: Option<u64>,
    verbose: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        size: 1 << 30,
        runs: 3,
        streams: vec![1, 4, 8],
        workers: 2,
        congestion: Congestion::Cubic,
        fairness: true,
        mtu: None,
        stream_window: None,
        conn_window: None,
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--size" => args.size = value()?.parse()?,
            "--runs" => args.runs = value()?.parse()?,
            "--workers" => args.workers = value()?.parse()?,
            "--streams" => {
                args.streams = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<std::result::Result<_, _>>()?
            }
            "--cc" => {
                args.congestion = match value()?.as_str() {
                    "cubic" => Congestion::Cubic,
                    "newreno" => Congestion::NewReno,
                    "bbr" => Congestion::Bbr,
                    other => return Err(format!("unknown congestion controller {other}").into()),
                }
            }
            "--no-fairness" => args.fairness = false,
            "-v" | "--verbose" => args.verbose = true,
            "--mtu" => args.mtu = Some(value()?.parse()?),
            "--stream-window" => args.stream_window = Some(value()?.parse()?),
            "--conn-window" => args.conn_window = Some(value()?.parse()?),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

fn pattern(size: usize) -> Bytes {
    let mut v = vec![0u8; size];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    Bytes::from(v)
}

/// A destination buffer whose pages are already faulted in.
fn prefaulted(len: usize) -> Vec<u8> {
    vec![1u8; len]
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let ca = DevCa::generate()?;
    let server_tls = NodeTls::from_node_cert(&ca.issue("server")?)?;
    let client_tls = NodeTls::from_node_cert(&ca.issue("client")?)?;
    let data = pattern(args.size);
    let verbose = args.verbose;
    println!(
        "moving {} MiB per transfer, {} run(s) each, {} worker thread(s)",
        args.size >> 20,
        args.runs,
        args.workers
    );

    // QUIC.
    let config = |tls: NodeTls| {
        let mut c = TransportConfig::new("127.0.0.1:0".parse().unwrap(), tls);
        c.congestion = args.congestion;
        c.send_fairness = args.fairness;
        if let Some(mtu) = args.mtu {
            c.loopback_mtu = mtu;
            c.mtu_upper_bound = mtu;
        }
        if let Some(w) = args.stream_window {
            c.stream_receive_window = w;
        }
        if let Some(w) = args.conn_window {
            c.receive_window = w;
            c.send_window = w;
        }
        c
    };
    let server = Endpoint::bind(config(server_tls.clone()))?;
    let client = Endpoint::bind(config(client_tls.clone()))?;
    let shutdown = CancellationToken::new();
    let serving = server.serve(Arc::new(Source(data.clone())), shutdown.clone());
    let peer = server.local_addr();
    // Warm up: handshake and path MTU discovery.
    let _: u64 = client
        .call(peer, &Range { offset: 0, len: 0 })
        .await
        .map_err(|e| format!("warm-up call: {e}"))?;
    fetch_ranges(&client, peer, parts(1 << 20, 1)).await?;

    // Runs alternate between the modes (A/B), so drift affects all of them alike.
    let mut quic: Vec<Vec<f64>> = vec![Vec::new(); args.streams.len()];
    let mut tcp = Vec::new();
    for _ in 0..args.runs {
        for (rates, &n) in quic.iter_mut().zip(&args.streams) {
            let dest = parts(args.size, n);
            let start = Instant::now();
            let dest = fetch_ranges(&client, peer, dest).await?;
            let elapsed = start.elapsed();
            if !same(&dest, &data) {
                return Err(format!("QUIC x{n}: received bytes differ").into());
            }
            rates.push(gbps(args.size, elapsed));
        }
        tcp.push(tcp_tls_run(&server_tls, &client_tls, &data).await?);
    }
    if verbose {
        if let Some(st) = client.connection_stats(peer) {
            println!(
                "QUIC client path: mtu {} rtt {:?} cwnd {} lost {} of {} packets, {} congestion events",
                st.path.current_mtu,
                st.path.rtt,
                st.path.cwnd,
                st.path.lost_packets,
                st.path.sent_packets,
                st.path.congestion_events
            );
        }
    }
    shutdown.cancel();
    serving.await?;
    client.close().await;
    server.close().await;

    let show = |rates: &[f64]| {
        rates
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let tcp_median = median(tcp.clone());
    println!(
        "TCP+TLS, 1 connection:   median {tcp_median:.2} GB/s  (runs: {})",
        show(&tcp)
    );
    for (rates, n) in quic.iter().zip(&args.streams) {
        let m = median(rates.clone());
        println!(
            "QUIC, {n} parallel fetch(es): median {m:.2} GB/s  (runs: {})  ratio to TCP+TLS {:.2}",
            show(rates),
            m / tcp_median
        );
    }
    Ok(())
}

/// Pre-faulted destination parts for `n` parallel range fetches of `size` bytes.
fn parts(size: usize, n: usize) -> Vec<Vec<u8>> {
    let per = size.div_ceil(n);
    (0..size)
        .step_by(per)
        .map(|off| prefaulted(per.min(size - off)))
        .collect()
}

/// Fetches consecutive ranges from offset 0 into `parts` (one parallel fetch per part); returns
/// the parts in order.
async fn fetch_ranges(
    client: &Endpoint,
    peer: SocketAddr,
    parts: Vec<Vec<u8>>,
) -> Result<Vec<Vec<u8>>> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut offset = 0u64;
    for (i, mut buf) in parts.into_iter().enumerate() {
        let client = client.clone();
        let range = Range {
            offset,
            len: buf.len() as u64,
        };
        offset += buf.len() as u64;
        tasks.spawn(async move {
            let mut sink = |off: u64, bytes: &[u8]| {
                let off = off as usize;
                buf.get_mut(off..off + bytes.len())
                    .ok_or_else(|| std::io::Error::other("chunk beyond the range"))?
                    .copy_from_slice(bytes);
                Ok(())
            };
            let got: u64 = client.fetch(peer, &range, &mut sink).await?;
            assert_eq!(got, range.len);
            Ok::<_, shoal_transport::TransportError>((i, buf))
        });
    }
    let mut done = Vec::new();
    while let Some(r) = tasks.join_next().await {
        done.push(r??);
    }
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, b)| b).collect())
}

fn same(parts: &[Vec<u8>], data: &[u8]) -> bool {
    let mut off = 0;
    parts.iter().all(|p| {
        let ok = data.get(off..off + p.len()) == Some(&p[..]);
        off += p.len();
        ok
    }) && off == data.len()
}

async fn tcp_tls_run(server_tls: &NodeTls, client_tls: &NodeTls, data: &Bytes) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls.server_config()?);
    let connector = tokio_rustls::TlsConnector::from(client_tls.client_config()?);
    let data_srv = data.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut go = [0u8; 1];
        tls.read_exact(&mut go).await?;
        for chunk in data_srv.chunks(1 << 20) {
            tls.write_all(chunk).await?;
        }
        tls.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(shoal_transport::SERVER_NAME)?;
    let mut tls = connector.connect(name, tcp).await?;
    let mut dest = prefaulted(data.len());
    let start = Instant::now();
    tls.write_all(&[1]).await?;
    tls.flush().await?;
    let mut off = 0;
    while off < dest.len() {
        let end = (off + (1 << 20)).min(dest.len());
        let n = tls.read(&mut dest[off..end]).await?;
        if n == 0 {
            return Err("TCP+TLS: early EOF".into());
        }
        off += n;
    }
    let elapsed = start.elapsed();
    server.await??;
    if dest[..] != data[..] {
        return Err("TCP+TLS: received bytes differ".into());
    }
    Ok(gbps(data.len(), elapsed))
}
