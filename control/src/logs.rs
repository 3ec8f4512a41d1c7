//! `GET /v1/functions/{name}/logs`: the tail of every instance's stdout and stderr, read from
//! the agents that run them. Each agent serves its node's log files over HTTP at the
//! `logs_addr` of its record (`agents/<node>`); control asks each in turn, with a timeout,
//! and reports an agent it cannot reach in that instance's `error` instead of failing the
//! whole answer.
//!
//! Only records whose instance id and node pass the protocol's rules are asked about (the
//! others get an `error`), so nothing a record holds can reach the request line or a header.
//!
//! Control asks on the caller's behalf: it forwards the caller's own bearer token, so an
//! agent grants exactly what that token may read (control adds no authority of its own).
use serde_json::{json, Value};
use shoal_meta::records::InstanceRecord;
use shoal_meta::records::{agent_key, AgentRecord};
use shoal_meta::MetaStore;
use shoal_protocol::IdKind;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of each stream returned when the request does not say.
pub(crate) const DEFAULT_TAIL: u64 = 64 << 10;
/// Most bytes of each stream one request may ask for.
pub(crate) const MAX_TAIL: u64 = 4 << 20;
/// Longest wait for one agent.
const AGENT_TIMEOUT: Duration = Duration::from_secs(3);

/// The log tails of `instances`, `tail` bytes of each stream at most, asked with the
/// caller's `token`.
pub(crate) async fn tails(
    meta: &dyn MetaStore,
    instances: Vec<InstanceRecord>,
    tail: u64,
    token: &str,
) -> Value {
    let mut out = Vec::with_capacity(instances.len());
    for inst in instances {
        let logs = match checked(&inst) {
            Err(e) => Err(e),
            Ok(()) => agent_logs_addr(meta, &inst.node).await,
        };
        let logs = match logs {
            Ok(addr) => {
                let path = format!("/v1/logs/{}?tail={tail}", inst.id);
                match tokio::time::timeout(AGENT_TIMEOUT, http_get(&addr, &path, token)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(format!("agent of node {} at {addr}: {e}", inst.node)),
                    Err(_) => Err(format!("agent of node {} at {addr}: timed out", inst.node)),
                }
            }
            Err(e) => Err(e),
        };
        let mut entry = json!({
            "id": inst.id,
            "node": inst.node,
            "state": inst.state,
        });
        match logs {
            Ok(v) => {
                entry["stdout"] = v["stdout"].clone();
                entry["stderr"] = v["stderr"].clone();
            }
            Err(e) => entry["error"] = json!(e),
        }
        out.push(entry);
    }
    json!({ "instances": out })
}

/// Whether the record's instance id and node pass the protocol's rules: only then does the
/// id go into a request line (a record holding `x\r\nHeader: v` must not add a header to the
/// request control sends to the agent).
fn checked(inst: &InstanceRecord) -> Result<(), String> {
    IdKind::Instance
        .check(&inst.id)
        .and_then(|()| IdKind::Node.check(&inst.node))
        .map_err(|e| format!("not asked: the record holds an invalid name ({e})"))
}

async fn agent_logs_addr(meta: &dyn MetaStore, node: &str) -> Result<String, String> {
    let kv = meta
        .get(&agent_key(node))
        .await
        .map_err(|e| format!("reading the agent record of node {node}: {e}"))?
        .ok_or_else(|| format!("node {node} has no agent now"))?;
    let rec: AgentRecord = serde_json::from_slice(&kv.value)
        .map_err(|e| format!("the agent record of node {node} is unreadable: {e}"))?;
    rec.logs_addr
        .ok_or_else(|| format!("the agent of node {node} does not serve logs"))
}

/// GET `path` from `addr` (HTTP/1.0) with `token` as bearer; the JSON body of a 200 answer.
async fn http_get(addr: &str, path: &str, token: &str) -> Result<Value, String> {
    // The token passed authentication, so it is `shoal_` and hex digits; checked again
    // because it goes into a header line.
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err("the caller's token cannot be forwarded".into());
    }
    // The path is built from checked names; checked again because it goes into the request
    // line: printable ASCII only, so nothing in it can end the line.
    if !path.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("the request path cannot be sent".into());
    }
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let head =
        format!("GET {path} HTTP/1.0\r\nHost: shoal\r\nAuthorization: Bearer {token}\r\n\r\n");
    s.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    s.take(2 * MAX_TAIL + (64 << 10))
        .read_to_end(&mut resp)
        .await
        .map_err(|e| e.to_string())?;
    let split = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed HTTP answer")?;
    let head = String::from_utf8_lossy(&resp[..split]);
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    let body = &resp[split + 4..];
    if status != "200" {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(body)));
    }
    serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))
}
