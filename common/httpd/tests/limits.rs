//! The server loop's bounds against clients on raw TCP sockets: a trickled head or body, an
//! idle kept-alive connection, an oversized body (declared or chunked), more connections than
//! the cap held by silent clients, a client that stops reading its response, and shutdown
//! with requests in progress.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, StatusCode};
use shoal_devcluster::wait::wait_for_async;
use shoal_httpd::{reply, serve_with, Body, Limits, Resp};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Generous: how long a test waits for what must happen.
const DEADLINE: Duration = Duration::from_secs(30);
/// The attacks' pace: one byte per tick.
const TICK: Duration = Duration::from_millis(20);

/// What the test server's handler saw.
struct Seen {
    /// Requests that reached the handler.
    entered: AtomicUsize,
    /// Handlers running now, and the most at once.
    active: AtomicUsize,
    most: AtomicUsize,
    /// `/hold` waits for a permit.
    release: Semaphore,
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Seen>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// `/echo` reads the body and answers its length; `/big` answers 64 MiB; `/hold` waits for a
/// permit; anything else answers "ok".
async fn handle(req: Request<Body>, seen: Arc<Seen>) -> Resp {
    seen.entered.fetch_add(1, Ordering::SeqCst);
    let now = seen.active.fetch_add(1, Ordering::SeqCst) + 1;
    seen.most.fetch_max(now, Ordering::SeqCst);
    let resp = match req.uri().path() {
        "/echo" => match req.into_body().collect().await {
            Ok(b) => reply(StatusCode::OK, "text/plain", b.to_bytes().len().to_string()),
            Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", e.to_string()),
        },
        "/big" => reply(
            StatusCode::OK,
            "text/plain",
            Bytes::from(vec![b'x'; 64 << 20]),
        ),
        "/hold" => {
            seen.release.acquire().await.unwrap().forget();
            reply(StatusCode::OK, "text/plain", "held")
        }
        _ => reply(StatusCode::OK, "text/plain", "ok"),
    };
    seen.active.fetch_sub(1, Ordering::SeqCst);
    resp
}

async fn start(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen {
        entered: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
        release: Semaphore::new(0),
    });
    let stop = CancellationToken::new();
    let s = seen.clone();
    let task = tokio::spawn(serve_with(
        listener,
        limits,
        move |req| handle(req, s.clone()),
        stop.clone(),
    ));
    Server {
        addr,
        seen,
        stop,
        task,
    }
}

fn quick() -> Limits {
    Limits {
        header_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        write_timeout: Duration::from_millis(300),
        max_body: 1000,
        ..Limits::default()
    }
}

/// A response as read off the socket: status, head, body (to its length, or to EOF).
async fn response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    tokio::time::timeout(DEADLINE, read_response(s))
        .await
        .expect("no response")
}

async fn read_response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head[9..12].parse().unwrap();
    let len: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap());
    let mut body = buf[head_end..].to_vec();
    match len {
        Some(len) => {
            while body.len() < len {
                let mut chunk = vec![0u8; len - body.len()];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed in the middle of the body");
                body.extend_from_slice(&chunk[..n]);
            }
        }
        None => {
            s.read_to_end(&mut body).await.unwrap();
        }
    }
    (status, head, body)
}

/// Whether the server has closed `s` (EOF or reset), reading and dropping anything first.
async fn closed(s: &mut TcpStream) -> bool {
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let (status, _, body) = response(&mut s).await;
    (status, body)
}

/// Writes `first`, then one byte of `rest` per tick until the server answers or closes;
/// returns what came back and how many bytes of `rest` went out.
async fn trickle(s: &mut TcpStream, first: &[u8], rest: &[u8]) -> (Vec<u8>, usize) {
    s.write_all(first).await.unwrap();
    let mut got = Vec::new();
    let mut sent = 0;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(TICK), if sent < rest.len() => {
                    if s.write_all(&rest[sent..sent + 1]).await.is_err() {
                        // The server is gone; read what it said.
                        let _ = s.read_to_end(&mut got).await;
                        return;
                    }
                    sent += 1;
                }
            }
        }
    })
    .await
    .expect("the trickling client was never cut off");
    (got, sent)
}

#[tokio::test]
async fn a_trickled_body_is_cut_off() {
    let srv = start(quick()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let body = vec![b'a'; 900];
    let head = b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 900\r\n\r\n";
    let (got, sent) = trickle(&mut s, head, &body).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(got.contains("\"code\":\"Timeout\""), "{got}");
    assert!(sent < body.len(), "cut off before the body was whole");
    // A chunked body trickled the same way.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let head = b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunks = b"1\r\na\r\n".repeat(200);
    let (got, sent) = trickle(&mut s, head, &chunks).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408"));
    assert!(sent < chunks.len());
    // Others are served meanwhile and after.
    assert_eq!(get(srv.addr, "/").await, (200, b"ok".to_vec()));
}

#[tokio::test]
async fn a_trickled_head_is_cut_off() {
    let srv = start(quick()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let pad = vec![b'a'; 100_000];
    let (_, sent) = trickle(&mut s, b"GET / HTTP/1.1\r\nx-pad: ", &pad).await;
    assert!(sent < pad.len());
    assert_eq!(srv.seen.entered.load(Ordering::SeqCst), 0);
    assert_eq!(get(srv.addr, "/").await, (200, b"ok".to_vec()));
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed() {
    let srv = start(quick()).await;
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let (status, head, _) = response(&mut s).await;
        assert_eq!(status, 200);
        assert!(!head.contains("connection: close"), "kept alive: {head}");
    }
    // Then silence: the server closes the connection.
    tokio::time::timeout(DEADLINE, closed(&mut s))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_oversized_body_is_refused() {
    let srv = start(quick()).await;
    // Declared: refused before the handler runs.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000\r\n\r\n")
        .await
        .unwrap();
    let (status, head, body) = response(&mut s).await;
    assert_eq!(status, 413);
    assert!(head.contains("connection: close"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("TooLarge"));
    assert_eq!(srv.seen.entered.load(Ordering::SeqCst), 0);
    assert!(closed(&mut s).await);
    // Chunked: cut off while reading, whatever the handler answers.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(b"POST /echo HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    // 8 chunks of 256 bytes, no end: over the 1000-byte limit after the fourth.
    let chunk = format!("100\r\n{}\r\n", "b".repeat(256));
    s.write_all(chunk.repeat(8).as_bytes()).await.unwrap();
    let (status, head, _) = response(&mut s).await;
    assert_eq!(status, 413);
    assert!(head.contains("connection: close"), "{head}");
    // Within the limit: served.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    let mut req = b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 1000\r\n\r\n".to_vec();
    req.extend_from_slice(&[b'c'; 1000]);
    s.write_all(&req).await.unwrap();
    let (status, _, body) = response(&mut s).await;
    assert_eq!((status, body), (200, b"1000".to_vec()));
}

#[tokio::test]
async fn silent_clients_over_the_cap_do_not_lock_others_out() {
    let limits = Limits {
        max_connections: 2,
        ..quick()
    };
    let srv = start(limits).await;
    // Two silent clients take both slots, a third waits in the backlog behind them.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(srv.addr).await.unwrap());
    }
    // A real client still gets its answer: the silent ones are cut off at the header timeout.
    let answered = tokio::time::timeout(DEADLINE, get(srv.addr, "/")).await;
    assert_eq!(answered.unwrap(), (200, b"ok".to_vec()));
    for s in &mut silent {
        tokio::time::timeout(DEADLINE, closed(s)).await.unwrap();
    }
}

#[tokio::test]
async fn no_more_than_the_cap_are_served_at_once() {
    let limits = Limits {
        max_connections: 2,
        header_timeout: Duration::from_secs(60),
        ..quick()
    };
    let srv = start(limits).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let addr = srv.addr;
        clients.push(tokio::spawn(async move { get(addr, "/hold").await }));
    }
    let seen = srv.seen.clone();
    wait_for_async("two requests held", DEADLINE, || async {
        (seen.active.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await
    .unwrap();
    srv.seen.release.add_permits(5);
    for c in clients {
        assert_eq!(c.await.unwrap(), (200, b"held".to_vec()));
    }
    assert_eq!(srv.seen.entered.load(Ordering::SeqCst), 5);
    assert_eq!(srv.seen.most.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off() {
    let limits = Limits {
        max_connections: 1,
        header_timeout: Duration::from_secs(60),
        ..quick()
    };
    let srv = start(limits).await;
    // Asks for 64 MiB and reads none of it, holding the only slot.
    let mut stalled = TcpStream::connect(srv.addr).await.unwrap();
    stalled
        .write_all(b"GET /big HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let seen = srv.seen.clone();
    wait_for_async("the big response started", DEADLINE, || async {
        (seen.entered.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .unwrap();
    // The next client is served once the stalled one is cut off.
    let answered = tokio::time::timeout(DEADLINE, get(srv.addr, "/")).await;
    assert_eq!(answered.unwrap(), (200, b"ok".to_vec()));
    drop(stalled);
}

#[tokio::test]
async fn shutdown_lets_a_request_in_progress_finish() {
    let srv = start(quick()).await;
    let addr = srv.addr;
    let client = tokio::spawn(async move { get(addr, "/hold").await });
    let seen = srv.seen.clone();
    wait_for_async("the request is held", DEADLINE, || async {
        (seen.active.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .unwrap();
    srv.stop.cancel();
    srv.seen.release.add_permits(1);
    assert_eq!(client.await.unwrap(), (200, b"held".to_vec()));
    tokio::time::timeout(DEADLINE, srv.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_does_not_wait_past_its_grace() {
    let limits = Limits {
        shutdown_grace: Duration::from_millis(200),
        ..quick()
    };
    let srv = start(limits).await;
    let addr = srv.addr;
    let client = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /hold HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        closed(&mut s).await
    });
    let seen = srv.seen.clone();
    wait_for_async("the request is held", DEADLINE, || async {
        (seen.active.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await
    .unwrap();
    srv.stop.cancel();
    // Never released: the server still stops, dropping the connection.
    tokio::time::timeout(DEADLINE, srv.task)
        .await
        .unwrap()
        .unwrap();
    assert!(client.await.unwrap());
}
