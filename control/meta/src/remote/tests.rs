//! The client against the server over real sockets: garbage, reconnects, many calls on one
//! connection, watch cancellation.
#![allow(clippy::unwrap_used)]
use super::*;
use crate::types::{MetaError, MetaStore};
use crate::MemStore;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

async fn server(
    store: Arc<dyn MetaStore>,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(store, listener, stop.clone()));
    (addr, stop, task)
}

/// Reads until the server closes the connection; panics if it stays open.
async fn expect_closed(raw: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match raw.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server kept a garbage-sending connection open"
    );
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let mem = MemStore::open(None, "").unwrap();
    let (addr, stop, task) = server(Arc::new(mem)).await;
    let good = RemoteStore::connect(addr);
    good.put("k", b"v".to_vec(), None).await.unwrap();
    let mut watch = good.watch("", 0).await.unwrap();

    // Oversized length.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0xff; 64]).await.unwrap();
    expect_closed(&mut raw).await;
    // Right length and version, garbage body.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    let mut frame = 8u32.to_le_bytes().to_vec();
    frame.push(shoal_protocol::PROTOCOL_VERSION);
    frame.extend_from_slice(&[0xfe; 8]);
    raw.write_all(&frame).await.unwrap();
    expect_closed(&mut raw).await;
    // A truncated frame, then the client goes away.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&frame[..7]).await.unwrap();
    drop(raw);

    // The well-behaved client and its watch are unaffected; a new client works too.
    assert_eq!(good.get("k").await.unwrap().unwrap().value, b"v");
    let other = RemoteStore::connect(addr);
    let rev = other.put("k2", b"w".to_vec(), None).await.unwrap();
    assert_eq!(watch.recv().await.unwrap().key(), "k");
    let e = watch.recv().await.unwrap();
    assert_eq!((e.key(), e.revision()), ("k2", rev));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn reconnects_after_the_server_comes_back() {
    let mem = MemStore::open(None, "").unwrap();
    let (addr, stop, task) = server(Arc::new(mem.clone())).await;
    let client = RemoteStore::connect(addr);
    client.put("k", b"1".to_vec(), None).await.unwrap();
    let mut watch = client.watch("", 0).await.unwrap();
    assert!(watch.recv().await.is_some());

    stop.cancel();
    task.await.unwrap();
    // The watch ends with the connection; calls fail as unavailable.
    let ended = tokio::time::timeout(Duration::from_secs(10), watch.recv())
        .await
        .unwrap();
    assert!(ended.is_none());
    assert!(matches!(
        client.get("k").await,
        Err(MetaError::Unavailable(_))
    ));

    let listener = TcpListener::bind(addr).await.unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(Arc::new(mem), listener, stop.clone()));
    assert_eq!(client.get("k").await.unwrap().unwrap().value, b"1");
    client.close().await;
    // Usable again after close: it reconnects.
    assert!(client.get("k").await.unwrap().is_some());
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn unreachable_server_is_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = RemoteStore::connect(addr);
    assert!(matches!(
        client.get("k").await,
        Err(MetaError::Unavailable(_))
    ));
    assert!(matches!(
        client.watch("", 0).await,
        Err(MetaError::Unavailable(_))
    ));
}

#[tokio::test]
async fn many_calls_in_flight_on_one_connection() {
    let mem = MemStore::open(None, "").unwrap();
    let (addr, stop, task) = server(Arc::new(mem)).await;
    let client = Arc::new(RemoteStore::connect(addr));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let c = client.clone();
        calls.spawn(async move {
            c.put(&format!("k{i}"), i.to_le_bytes().to_vec(), None)
                .await
        });
    }
    while let Some(r) = calls.join_next().await {
        r.unwrap().unwrap();
    }
    let (kvs, rev) = client.range("k").await.unwrap();
    assert_eq!((kvs.len(), rev), (200, 200));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn dropped_watch_is_cancelled_on_the_server() {
    let mem = MemStore::open(None, "").unwrap();
    let (addr, stop, task) = server(Arc::new(mem)).await;
    let client = RemoteStore::connect(addr);
    let w = client.watch("", 0).await.unwrap();
    drop(w);
    // The next event finds the receiver gone; the client cancels the server's watch.
    client.put("k", vec![], None).await.unwrap();
    client.put("k", vec![], None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let slots = client.open_slots().await;
            if slots == Some(0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    stop.cancel();
    task.await.unwrap();
}
