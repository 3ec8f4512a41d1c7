//! Validated edges (#14): names that come out of the metadata store are checked before they
//! reach a request line or a header.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::json;
use shoal_meta::records::{agent_key, instance_key, Role};
use shoal_meta::MetaStore;
use std::sync::{Arc, Mutex};
use support::{client, issue, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn spec(name: &str) -> shoal_meta::records::FunctionSpec {
    serde_json::from_value(json!({
        "name": name,
        "code": {"kind": "dir", "path": "/srv/fn"},
        "command": ["./run"],
        "resources": {"cpu_milli": 500, "mem_mib": 256},
        "max_instances": 4,
    }))
    .unwrap()
}

/// An instance record whose id holds CR/LF (written by anything that can write the store)
/// does not inject a header into the log request control sends to the agent: control does
/// not ask about it at all, and says why, while a well-named instance on the same agent is
/// asked as usual.
#[tokio::test]
async fn a_crlf_in_an_instance_id_never_reaches_the_agents_request() {
    let (c, store, _op) = start().await;
    let a = c.http_addr();
    let reader = issue(store.as_ref(), "team-a", Role::Reader).await;
    let deployer = client(a, &issue(store.as_ref(), "team-a", Role::Deployer).await);
    deployer.create_function(&spec("f")).await.unwrap();
    // A stand-in agent that records every request head it gets.
    let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_addr = agent.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = agent.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let body = r#"{"stdout":"hi\n","stderr":""}"#;
            let answer = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    let agent_rec = json!({"node_id": "n1", "cpu_milli": 1000, "mem_total_mib": 1024, "logs_addr": agent_addr.to_string()});
    store
        .put(&agent_key("n1"), agent_rec.to_string().into_bytes(), None)
        .await
        .unwrap();
    let evil = "f-1 HTTP/1.0\r\nX-Injected: yes\r\nX-Rest: ";
    for (key, id) in [("f-evil", evil), ("f-2", "f-2")] {
        let inst = json!({"id": id, "function": "f", "node": "n1", "state": "running"});
        store
            .put(&instance_key("f", key), inst.to_string().into_bytes(), None)
            .await
            .unwrap();
    }
    let logs = client(a, &reader).logs("f", Some(100)).await.unwrap();
    assert_eq!(logs.len(), 2, "{logs:?}");
    let good = logs.iter().find(|l| l.id == "f-2").unwrap();
    assert_eq!(good.stdout.as_deref(), Some("hi\n"), "{logs:?}");
    let bad = logs.iter().find(|l| l.id == evil).unwrap();
    assert!(bad.stdout.is_none(), "{logs:?}");
    assert!(
        bad.error.as_deref().unwrap().contains("invalid name"),
        "{logs:?}"
    );
    // Control answered only after every agent it asked had answered: the list is complete.
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with("GET /v1/logs/f-2?tail=100 HTTP/1.0\r\n"),
        "{heads:?}"
    );
    assert!(!heads.iter().any(|h| h.contains("X-Injected")), "{heads:?}");
    c.shutdown().await;
}
