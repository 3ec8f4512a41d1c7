//! Control's REST server under a slow-body attack: a client that sends its headers and then
//! trickles the body is cut off at the body deadline (408), and others are served meanwhile.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;
use support::{get, parse, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_trickled_body_is_cut_off() {
    let (c, _store, admin) = start().await;
    let addr = c.http_addr();
    let mut s = TcpStream::connect(addr).await.unwrap();
    // 600 bytes at one per 100 ms would take a minute; the body deadline is 30 s.
    let body = vec![b' '; 600];
    let head = format!(
        "POST /v1/functions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {admin}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut sent = 0;
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep(Duration::from_millis(100)), if sent < body.len() => {
                    if s.write_all(&body[sent..sent + 1]).await.is_err() {
                        let _ = s.read_to_end(&mut got).await;
                        return;
                    }
                    sent += 1;
                    if sent == 1 {
                        // Served meanwhile.
                        assert_eq!(get(addr, None, "/health").await.status, 200);
                    }
                }
            }
        }
    })
    .await
    .expect("the trickling client was never cut off");
    assert!(sent < body.len(), "cut off before the body was whole");
    parse(&got).error(408, "Timeout");
    c.shutdown().await;
}
