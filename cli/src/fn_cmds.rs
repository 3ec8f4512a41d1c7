//! `shoal fn ...`: functions through control's REST API.
use crate::args::FnOp;
use anyhow::{bail, Context};
use shoal_meta::records::{CodeSource, FunctionSpec, Resources};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// One HTTP/1.1 exchange with control (`Connection: close`): status and body.
fn request(
    control: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    request_as(control, method, path, body, "application/json")
}

fn request_as(
    control: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    ctype: &str,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let host = control
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("control address {host:?} (--control / SHOAL_CONTROL)"))?
        .next()
        .with_context(|| format!("control address {host:?} resolves to nothing"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| {
        format!("cannot reach control at {host} (is `shoal up` running? set --control or SHOAL_CONTROL)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str(&format!("Content-Type: {ctype}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .context("reading control's answer")?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("malformed HTTP answer from control")?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP status from control")?;
    Ok((status, resp[split + 4..].to_vec()))
}

/// Turns a non-2xx answer into one clear error line (`Code: message` from the JSON body).
fn check(status: u16, body: &[u8]) -> anyhow::Result<()> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => bail!(
            "{}: {}",
            v["code"].as_str().unwrap_or("Error"),
            v["message"].as_str().unwrap_or("")
        ),
        Err(_) => bail!("HTTP {status}: {}", String::from_utf8_lossy(body)),
    }
}

fn json(body: &[u8]) -> anyhow::Result<serde_json::Value> {
    serde_json::from_slice(body).context("control answered with malformed JSON")
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

/// Every instance record control knows, as JSON objects.
pub(crate) fn all_instances(control: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let (s, body) = request(control, "GET", "/v1/instances", None)?;
    check(s, &body)?;
    Ok(json(&body)?
        .get("instances")
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default())
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
fn invoke_via_proxy(
    proxy: &std::path::Path,
    store: Option<&std::path::Path>,
    name: &str,
    arg: shoal_sdk::Payload,
    timeout: Duration,
) -> anyhow::Result<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
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
    })
}

pub(crate) fn run(control: &str, op: FnOp) -> anyhow::Result<ExitCode> {
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
            let (status, body) = request(
                control,
                "POST",
                "/v1/functions",
                Some(&serde_json::to_vec(&spec)?),
            )?;
            let (status, body) = if status == 409 {
                // It exists: update it, on top of the version we read.
                let (s, cur) = request(control, "GET", &format!("/v1/functions/{name}"), None)?;
                check(s, &cur)?;
                spec.version = json(&cur)?["version"].as_u64().unwrap_or(0);
                request(
                    control,
                    "PUT",
                    &format!("/v1/functions/{name}"),
                    Some(&serde_json::to_vec(&spec)?),
                )?
            } else {
                (status, body)
            };
            check(status, &body)?;
            let v = json(&body)?;
            println!(
                "deployed {name} (version {})",
                v["version"].as_u64().unwrap_or(0)
            );
        }
        FnOp::Ls { json: as_json } => {
            let (s, fns) = request(control, "GET", "/v1/functions", None)?;
            check(s, &fns)?;
            let (s, insts) = request(control, "GET", "/v1/instances", None)?;
            check(s, &insts)?;
            let (fns, insts) = (json(&fns)?, json(&insts)?);
            if as_json {
                println!(
                    "{}",
                    serde_json::json!({"functions": fns, "instances": insts})
                );
                return Ok(ExitCode::SUCCESS);
            }
            let list = |v: &serde_json::Value, key: &str| -> Vec<serde_json::Value> {
                v.get(key)
                    .and_then(|x| x.as_array())
                    .or_else(|| v.as_array())
                    .cloned()
                    .unwrap_or_default()
            };
            let insts = list(&insts, "instances");
            println!(
                "{:<24} {:>7} {:>9} {:>9}  code",
                "function", "version", "min/max", "instances"
            );
            for f in list(&fns, "functions") {
                let name = f["name"].as_str().unwrap_or("?");
                let n = insts.iter().filter(|i| i["function"] == name).count();
                println!(
                    "{:<24} {:>7} {:>9} {:>9}  {}",
                    name,
                    f["version"].as_u64().unwrap_or(0),
                    format!(
                        "{}/{}",
                        f["min_instances"].as_u64().unwrap_or(0),
                        f["max_instances"].as_u64().unwrap_or(0)
                    ),
                    n,
                    f["code"]
                );
            }
            for i in &insts {
                println!(
                    "  instance {} of {} on {}: {}{}",
                    i["id"].as_str().unwrap_or("?"),
                    i["function"].as_str().unwrap_or("?"),
                    i["node"].as_str().unwrap_or("?"),
                    i["state"].as_str().unwrap_or("?"),
                    i["reason"]
                        .as_str()
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
            let (s, body) = request(
                control,
                "GET",
                &format!("/v1/functions/{name}/logs?tail={tail}"),
                None,
            )?;
            check(s, &body)?;
            let v = json(&body)?;
            if as_json {
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            let insts = v["instances"].as_array().cloned().unwrap_or_default();
            if insts.is_empty() {
                eprintln!("{name} has no instances");
            }
            let mut out = std::io::stdout().lock();
            for i in insts {
                let head = format!(
                    "{} on {} ({})",
                    i["id"].as_str().unwrap_or("?"),
                    i["node"].as_str().unwrap_or("?"),
                    i["state"].as_str().unwrap_or("?")
                );
                if let Some(e) = i["error"].as_str() {
                    writeln!(out, "==> {head}: logs unavailable: {e}")?;
                    continue;
                }
                for stream in ["stdout", "stderr"] {
                    let text = i[stream].as_str().unwrap_or("");
                    writeln!(out, "==> {head} {stream} <==")?;
                    out.write_all(text.as_bytes())?;
                    if !text.is_empty() && !text.ends_with('\n') {
                        writeln!(out)?;
                    }
                }
            }
        }
        FnOp::Rm { name } => {
            let (s, body) = request(control, "DELETE", &format!("/v1/functions/{name}"), None)?;
            check(s, &body)?;
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
                    invoke_via_proxy(&p, socket.as_deref(), &name, arg, timeout)?
                }
                None => {
                    let (s, body) = request_as(
                        control,
                        "POST",
                        &format!("/v1/functions/{name}/invoke"),
                        Some(&arg),
                        "application/octet-stream",
                    )?;
                    check(s, &body)?;
                    body
                }
            };
            std::io::stdout().write_all(&out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
