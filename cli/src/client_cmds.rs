//! Commands that talk to a running dataworker.
use crate::args::{Command, ConnArgs, KvOp};
use anyhow::Context;
use shoal_meta::records::InstanceRecord;
use shoal_sdk::{Client, ErrorCode, SetOptions};
use std::io::{Read, Write};
use std::process::ExitCode;

async fn connect(conn: &ConnArgs) -> anyhow::Result<Client> {
    let path = conn.socket_path();
    Client::connect(&path).await.with_context(|| {
        format!(
            "cannot reach the dataworker at {} (is `shoal up` running? set --socket or SHOAL_DATAWORKER_SOCKET)",
            path.display()
        )
    })
}

fn read_input(source: &str) -> anyhow::Result<Vec<u8>> {
    let mut data = Vec::new();
    if source == "-" {
        std::io::stdin()
            .read_to_end(&mut data)
            .context("reading stdin")?;
    } else {
        data = std::fs::read(source).with_context(|| format!("reading {source}"))?;
    }
    Ok(data)
}

pub(crate) fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(cmd))
}

async fn run_async(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Put { conn, id, source } => {
            let c = connect(&conn).await?;
            if source == "-" {
                c.put(&id, &read_input("-")?).await?;
            } else {
                // Read the file straight into shared memory: no intermediate buffer.
                let mut f =
                    std::fs::File::open(&source).with_context(|| format!("opening {source}"))?;
                let len = f.metadata()?.len();
                let mut b = c.create(&id, len).await?;
                f.read_exact(b.as_mut_slice())
                    .with_context(|| format!("reading {source}"))?;
                b.seal().await?;
            }
        }
        Command::Get {
            conn,
            id,
            output,
            timeout,
        } => {
            let c = connect(&conn).await?;
            let v = c.get(&id, timeout).await?;
            match output {
                Some(p) => std::fs::write(&p, &v[..])
                    .with_context(|| format!("writing {}", p.display()))?,
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&v)?;
                    out.flush()?;
                }
            }
        }
        Command::Rm { conn, ids } => {
            let c = connect(&conn).await?;
            for id in ids {
                c.delete(&id).await?;
            }
        }
        Command::Ls {
            conn,
            prefix,
            limit,
            json,
        } => {
            let c = connect(&conn).await?;
            for e in c.list(&prefix, limit).await? {
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                } else {
                    let flags = [
                        (!e.sealed).then_some("unsealed"),
                        e.spilled.then_some("spilled"),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(",");
                    println!("{:>12}  {:>4}  {}  {}", e.size, e.pins, e.id, flags);
                }
            }
        }
        Command::Kv { conn, op } => return kv(&conn, op).await,
        Command::Status {
            conn,
            control,
            json,
        } => {
            let c = connect(&conn).await?;
            let s = c.status().await?;
            let instances = crate::fn_cmds::all_instances(&control).await;
            let quota = crate::token_cmds::own_quota(&control).await;
            if json {
                let mut v = serde_json::to_value(&s)?;
                if let (Some(obj), Ok(insts)) = (v.as_object_mut(), &instances) {
                    obj.insert("instances".into(), serde_json::json!(insts));
                }
                if let (Some(obj), Ok(q)) = (v.as_object_mut(), &quota) {
                    obj.insert("quota".into(), serde_json::json!(q));
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let pct = 100.0 * s.used_bytes as f64 / s.arena_bytes.max(1) as f64;
                println!("node       {}", s.node_id);
                println!(
                    "arena      {} used of {} ({pct:.1}%)",
                    bytesize::ByteSize(s.used_bytes),
                    bytesize::ByteSize(s.arena_bytes)
                );
                println!(
                    "objects    {} sealed, {} being written, {} spilled to disk",
                    s.objects, s.unsealed, s.spilled_now
                );
                println!("kv         {} keys", s.kv_keys);
                println!(
                    "pins       {} live views ({} deleted objects still viewed)",
                    s.pins, s.zombies
                );
                println!("clients    {}", s.clients);
                println!("evictions  {} ({} spilled)", s.evictions, s.spills);
                if !s.members.is_empty() {
                    println!();
                    println!(
                        "{:<12} {:<8} {:<22} {:>24}",
                        "cluster", "health", "quic", "arena used"
                    );
                    for m in &s.members {
                        let h = m.http_addr.as_deref().and_then(health);
                        let (state, used) = match &h {
                            Some(v) => (
                                "ok",
                                format!(
                                    "{} of {}",
                                    bytesize::ByteSize(v["used_bytes"].as_u64().unwrap_or(0)),
                                    bytesize::ByteSize(v["arena_bytes"].as_u64().unwrap_or(0))
                                ),
                            ),
                            None => ("down", "-".to_string()),
                        };
                        println!(
                            "{:<12} {:<8} {:<22} {:>24}",
                            m.node_id, state, m.peer_addr, used
                        );
                    }
                }
                println!();
                let at = &control.control;
                match &instances {
                    Ok(insts) => print_instances(insts),
                    Err(e) => println!("instances  unknown (control at {at}: {e:#})"),
                }
                println!();
                match &quota {
                    Ok(q) => crate::token_cmds::print_quota(q),
                    Err(e) => println!("quota      unknown (control at {at}: {e:#})"),
                }
            }
        }
        Command::Up(_)
        | Command::Dataworker(_)
        | Command::Control(_)
        | Command::Proxy(_)
        | Command::Agent(_)
        | Command::Ca { .. }
        | Command::Fn { .. }
        | Command::Token { .. }
        | Command::Tenant { .. }
        | Command::Bench(_)
        | Command::BenchPeer { .. } => {
            unreachable!("handled by the caller")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Function instances grouped by node.
fn print_instances(insts: &[InstanceRecord]) {
    let mut by_node: std::collections::BTreeMap<&str, Vec<&InstanceRecord>> =
        std::collections::BTreeMap::new();
    for i in insts {
        by_node.entry(&i.node).or_default().push(i);
    }
    if by_node.is_empty() {
        println!("instances  none");
        return;
    }
    println!(
        "{:<12} {:<20} {:<28} {:<9} {:>8}  reason",
        "node", "function", "instance", "state", "pid"
    );
    for (node, list) in by_node {
        for i in list {
            println!(
                "{:<12} {:<20} {:<28} {:<9} {:>8}  {}",
                node,
                i.function,
                i.id,
                i.state.as_str(),
                i.pid.map_or("-".into(), |p| p.to_string()),
                i.reason.as_deref().unwrap_or("")
            );
        }
    }
}

/// A node's `/health` JSON, or `None` when it does not answer within a second.
fn health(addr: &str) -> Option<serde_json::Value> {
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let t = std::time::Duration::from_secs(1);
    let mut s = std::net::TcpStream::connect_timeout(&addr, t).ok()?;
    s.set_read_timeout(Some(t)).ok()?;
    s.write_all(b"GET /health HTTP/1.0\r\nHost: shoal\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let (_, json) = body.split_once("\r\n\r\n")?;
    serde_json::from_str(json).ok()
}

async fn kv(conn: &ConnArgs, op: KvOp) -> anyhow::Result<ExitCode> {
    let c = connect(conn).await?;
    match op {
        KvOp::Set {
            key,
            value,
            ttl,
            nx,
        } => {
            let bytes = match value.strip_prefix('@') {
                Some(path) => read_input(path)?,
                None if value == "-" => read_input("-")?,
                None => value.into_bytes(),
            };
            if !c
                .kv_set(&key, &bytes, SetOptions { ttl, if_absent: nx })
                .await?
            {
                eprintln!("not set: {key} exists");
                return Ok(ExitCode::FAILURE);
            }
        }
        KvOp::Get { key } => match c.kv_get(&key).await? {
            Some(v) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&v)?;
                out.flush()?;
            }
            None => {
                return Err(shoal_sdk::Error::from(shoal_protocol::WireError::new(
                    ErrorCode::NotFound,
                    format!("{key} not found"),
                ))
                .into())
            }
        },
        KvOp::Del { keys } => {
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            println!("{}", c.kv_del(&refs).await?);
        }
        KvOp::Ttl { key } => {
            let t = match c.kv_ttl(&key).await? {
                None => -2,
                Some(None) => -1,
                Some(Some(d)) => d.as_secs() as i64,
            };
            println!("{t}");
        }
        KvOp::Keys { prefix } => {
            for e in c.kv_keys(&prefix, 10_000).await? {
                println!("{}", e.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
