//! `shoal fn ...`: functions through control's REST API; and how every command that talks
//! to control builds its client (address and token) and explains a refusal.
use crate::args::{ControlConn, FnOp};
use anyhow::Context;
use shoal_control_client::{find_token, ClientError, ControlClient, ErrorCode, FoundToken};
use shoal_meta::records::{CodeSource, FunctionSpec, InstanceRecord, Resources};
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

/// The token the user gave or has: `--token`, `SHOAL_TOKEN`, `SHOAL_TOKEN_FILE`, or the
/// runtime directory's `admin.token`.
fn token(conn: &ControlConn) -> anyhow::Result<Option<FoundToken>> {
    Ok(find_token(conn.token.as_deref(), &|k| std::env::var_os(k))?)
}

/// A client of control at `--control` / `SHOAL_CONTROL`, sending the user's token.
pub(crate) fn client(conn: &ControlConn) -> anyhow::Result<ControlClient> {
    let control = &conn.control;
    let c = ControlClient::new(control)
        .with_context(|| format!("control address {control:?} (--control / SHOAL_CONTROL)"))?;
    Ok(match token(conn)? {
        Some(found) => c
            .with_token(&found.token)
            .with_context(|| format!("the token from {}", found.source))?,
        None => c,
    })
}

/// A current-thread runtime for the calls of one command.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Runs one command's calls to control, adding to a failure what the user can do about it:
/// start control, point at it, or give a (better) token.
pub(crate) fn with_control<F>(conn: &ControlConn, work: F) -> anyhow::Result<ExitCode>
where
    F: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    runtime()?.block_on(work).map_err(|e| explain(conn, e))
}

fn explain(conn: &ControlConn, e: anyhow::Error) -> anyhow::Error {
    let control = &conn.control;
    match e.downcast_ref::<ClientError>() {
        Some(ClientError::Transport { .. } | ClientError::Timeout { .. }) => e.context(format!(
            "control at {control} (is `shoal up` running? set --control or SHOAL_CONTROL)"
        )),
        Some(ClientError::Api {
            code: ErrorCode::Unauthenticated,
            ..
        }) => {
            let hint = match token(conn) {
                Ok(Some(found)) => format!(
                    "control refused the token from {} (revoked, expired, or of another cluster?)",
                    found.source
                ),
                _ => format!(
                    "no token found: set SHOAL_TOKEN or SHOAL_TOKEN_FILE, pass --token, or run                      `shoal up`, which writes one to {}",
                    crate::args::default_socket_dir()
                        .join(shoal_control_client::ADMIN_TOKEN_FILE)
                        .display()
                ),
            };
            // The code first, as every other error reads; then what to do.
            anyhow::anyhow!("{e:#}: {hint}")
        }
        _ => e,
    }
}

/// `KEY=VALUE` arguments of `flag` as a map.
pub(crate) fn key_values(
    flag: &str,
    list: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    list.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{flag} {kv}: expected KEY=VALUE"))
        })
        .collect()
}

/// Every instance record control shows the caller.
pub(crate) async fn all_instances(conn: &ControlConn) -> anyhow::Result<Vec<InstanceRecord>> {
    Ok(client(conn)?.instances(None).await?)
}

/// Where code comes from, from what the user typed.
fn code_source(path: &str) -> anyhow::Result<CodeSource> {
    if let Some(id) = path.strip_prefix("shoal://") {
        return Ok(CodeSource::Object { id: id.into() });
    }
    if path.starts_with("s3://") {
        return Ok(CodeSource::S3 { url: path.into() });
    }
    let abs = std::path::absolute(path).with_context(|| format!("--path {path}"))?;
    let shown = abs.display().to_string();
    if shown.ends_with(".tar.gz") || shown.ends_with(".tgz") {
        Ok(CodeSource::TarGz { path: shown })
    } else {
        Ok(CodeSource::Dir { path: shown })
    }
}

/// One call through the node's proxy (with the node's dataworker for large payloads, when
/// its socket is given).
async fn invoke_via_proxy(
    proxy: &std::path::Path,
    store: Option<&std::path::Path>,
    name: &str,
    arg: shoal_sdk::Payload,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    {
        let store = match store {
            Some(s) => Some(
                shoal_sdk::Client::connect(s)
                    .await
                    .with_context(|| format!("cannot reach the dataworker at {}", s.display()))?,
            ),
            None => None,
        };
        // One call: through the proxy; setting up a call lane would cost more than it saves.
        let opts = shoal_sdk::CallOptions {
            lanes: false,
            store,
            ..Default::default()
        };
        let c = shoal_sdk::CallClient::connect_with(proxy, opts)
            .await
            .with_context(|| format!("cannot reach the proxy at {}", proxy.display()))?;
        Ok(match arg {
            shoal_sdk::Payload::Inline(a) => c.invoke(name, &a, timeout).await?,
            object => c
                .invoke_payload(name, None, object, timeout)
                .await?
                .into_vec(),
        })
    }
}

pub(crate) fn run(control: &ControlConn, op: FnOp) -> anyhow::Result<ExitCode> {
    with_control(control, run_async(control, op))
}

async fn run_async(control: &ControlConn, op: FnOp) -> anyhow::Result<ExitCode> {
    match op {
        FnOp::Deploy {
            name,
            path,
            digest,
            min,
            max,
            concurrency,
            cpu_milli,
            mem_mib,
            env,
            node_selector,
            label,
            affinity,
            anti_affinity,
            pool,
            command,
        } => {
            let mut spec = FunctionSpec {
                name: name.clone(),
                tenant: String::new(),
                version: 0,
                code: code_source(&path)?,
                digest,
                command,
                env: key_values("--env", &env)?,
                resources: Resources { cpu_milli, mem_mib },
                min_instances: min,
                max_instances: max.max(min).max(1),
                concurrency,
                labels: key_values("--label", &label)?,
                node_selector: key_values("--node-selector", &node_selector)?,
                affinity,
                anti_affinity,
                pool,
            };
            let c = client(control)?;
            let created = match c.create_function(&spec).await {
                Err(e) if e.code() == Some(ErrorCode::AlreadyExists) => {
                    // It exists: update it, on top of the version we read.
                    spec.version = c.function(&name).await?.version;
                    c.update_function(&name, &spec).await?
                }
                r => r?,
            };
            println!("deployed {name} (version {})", created.version);
        }
        FnOp::Ls { json: as_json } => {
            let c = client(control)?;
            let fns = c.functions().await?;
            let insts = c.instances(None).await?;
            if as_json {
                println!(
                    "{}",
                    serde_json::json!({"functions": fns, "instances": insts})
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:>7} {:>9} {:>9}  code",
                "function", "version", "min/max", "instances"
            );
            for f in &fns {
                let n = insts.iter().filter(|i| i.function == f.name).count();
                println!(
                    "{:<24} {:>7} {:>9} {:>9}  {}",
                    f.name,
                    f.version,
                    format!("{}/{}", f.min_instances, f.max_instances),
                    n,
                    serde_json::to_string(&f.code)?
                );
            }
            for i in &insts {
                println!(
                    "  instance {} of {} on {}: {}{}",
                    i.id,
                    i.function,
                    i.node,
                    i.state,
                    i.reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                );
            }
        }
        FnOp::Logs {
            name,
            tail,
            json: as_json,
        } => {
            let insts = client(control)?.logs(&name, Some(tail)).await?;
            if as_json {
                println!("{}", serde_json::json!({ "instances": insts }));
                return Ok(ExitCode::SUCCESS);
            }
            if insts.is_empty() {
                eprintln!("{name} has no instances");
            }
            let mut out = std::io::stdout().lock();
            for i in insts {
                let head = format!("{} on {} ({})", i.id, i.node, i.state);
                if let Some(e) = &i.error {
                    writeln!(out, "==> {head}: logs unavailable: {e}")?;
                    continue;
                }
                for (stream, text) in [("stdout", &i.stdout), ("stderr", &i.stderr)] {
                    let text = text.as_deref().unwrap_or("");
                    writeln!(out, "==> {head} {stream} <==")?;
                    out.write_all(text.as_bytes())?;
                    if !text.is_empty() && !text.ends_with('\n') {
                        writeln!(out)?;
                    }
                }
            }
        }
        FnOp::Rm { name } => {
            client(control)?.delete_function(&name).await?;
            println!("removed {name}");
        }
        FnOp::Invoke {
            name,
            data,
            object,
            proxy,
            socket,
            timeout,
        } => {
            let arg = match data.as_deref() {
                None => Vec::new(),
                Some("-") => {
                    let mut b = Vec::new();
                    std::io::stdin().read_to_end(&mut b)?;
                    b
                }
                Some(d) => match d.strip_prefix('@') {
                    Some(file) => std::fs::read(file).with_context(|| format!("reading {file}"))?,
                    None => d.as_bytes().to_vec(),
                },
            };
            let out = match proxy {
                Some(p) => {
                    let arg = match object {
                        Some(id) => shoal_sdk::Payload::Object(
                            shoal_sdk::ObjectId::new(id).context("--object")?,
                        ),
                        None => shoal_sdk::Payload::Inline(arg),
                    };
                    invoke_via_proxy(&p, socket.as_deref(), &name, arg, timeout).await?
                }
                None => client(control)?
                    .invoke(&name, arg, Some(timeout))
                    .await?
                    .to_vec(),
            };
            std::io::stdout().write_all(&out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
