//! `shoal fn ...`: functions through control's REST API.
use crate::args::FnOp;
use anyhow::Context;
use shoal_control_client::{ClientError, ControlClient, ErrorCode};
use shoal_meta::records::{CodeSource, FunctionSpec, InstanceRecord, Resources};
use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

/// A client of control at `control` (`--control` / `SHOAL_CONTROL`).
fn client(control: &str) -> anyhow::Result<ControlClient> {
    ControlClient::new(control)
        .with_context(|| format!("control address {control:?} (--control / SHOAL_CONTROL)"))
}

/// A current-thread runtime for the calls of one command.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
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

/// Every instance record control knows.
pub(crate) async fn all_instances(control: &str) -> anyhow::Result<Vec<InstanceRecord>> {
    Ok(client(control)?.instances(None).await?)
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

pub(crate) fn run(control: &str, op: FnOp) -> anyhow::Result<ExitCode> {
    runtime()?
        .block_on(run_async(control, op))
        .map_err(|e| match e.downcast_ref::<ClientError>() {
            Some(ClientError::Transport { .. } | ClientError::Timeout { .. }) => {
                e.context(format!(
                    "control at {control} (is `shoal up` running? set --control or SHOAL_CONTROL)"
                ))
            }
            _ => e,
        })
}

async fn run_async(control: &str, op: FnOp) -> anyhow::Result<ExitCode> {
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
