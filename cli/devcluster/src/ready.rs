//! The ready lines: one JSON object a component prints on stdout once it serves (with
//! `--ready-json`), and the description `shoal up --json` prints once the whole cluster does.
//!
//! The field names are a user-facing contract (`shoal up --json` is scripted against), so
//! they only grow. Readers ignore fields they do not know, so an older reader still parses a
//! newer line.
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `shoal dataworker --ready-json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataworkerReady {
    /// Node id.
    pub node: String,
    /// The Unix socket local clients connect to.
    pub socket: PathBuf,
    /// `/metrics` and `/health` (absent with `--http-addr off`).
    pub http: Option<SocketAddr>,
    /// QUIC address other dataworkers pull from (absent outside a cluster).
    pub peer_addr: Option<SocketAddr>,
    /// Process id.
    pub pid: u32,
    /// Size of the shared-memory arena.
    #[serde(default)]
    pub arena_bytes: u64,
}

/// `shoal control --ready-json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReady {
    /// The metadata API the nodes use (absent when they use etcd directly).
    pub meta: Option<SocketAddr>,
    /// The HTTP API (`/health`, `/v1/...`).
    pub http: SocketAddr,
    /// Process id.
    pub pid: u32,
    /// The file holding an operator token (`--admin-token-file`), when one was asked for.
    /// When the ready line is printed it holds a token, unless this control is a standby
    /// (the leader writes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// `shoal proxy --ready-json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyReady {
    /// Node id.
    pub node: String,
    /// The Unix socket callers and instances connect to.
    pub socket: PathBuf,
    /// The IO engine it runs on (`Uring` or `Tokio`).
    pub engine: String,
    /// TCP address other nodes' proxies forward calls to (absent outside a cluster).
    pub peer_addr: Option<SocketAddr>,
    /// `/metrics` and `/health`.
    pub http: SocketAddr,
    /// Process id.
    pub pid: u32,
}

/// `shoal agent --ready-json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReady {
    /// Node id.
    pub node: String,
    /// Where it keeps the instances' code (`work/`) and logs (`logs/`).
    pub work_dir: PathBuf,
    /// Process id.
    pub pid: u32,
}

/// What `shoal up --json` prints once every component is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// The control process.
    pub control: ControlInfo,
    /// The nodes, in order; the first serves control's REST frontend.
    pub nodes: Vec<NodeInfo>,
    /// The environment a client needs to reach the first node and control.
    pub env: ClientEnv,
    /// The runtime directory: one directory per node, `control/`, `tls/`.
    #[serde(default)]
    pub runtime_dir: PathBuf,
    /// The development CA and the node certificates.
    #[serde(default)]
    pub tls_dir: PathBuf,
}

/// Control, as `shoal up --json` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlInfo {
    /// The metadata API the nodes use (absent with etcd).
    pub meta: Option<SocketAddr>,
    /// The HTTP API (what `SHOAL_CONTROL` names).
    pub http: SocketAddr,
    /// Process id.
    pub pid: u32,
    /// etcd client URLs (comma-separated), when metadata lives there.
    pub etcd: Option<String>,
    /// The file holding an operator token (the system tenant's admin), 0600: what clients
    /// send to the REST API (`SHOAL_TOKEN_FILE` names it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

/// One node, as `shoal up --json` describes it: its three processes and their endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// The node's directory (its sockets, the agent's files).
    pub socket_dir: PathBuf,
    /// The dataworker's socket.
    pub dataworker_socket: PathBuf,
    /// The proxy's socket.
    pub proxy_socket: PathBuf,
    /// The proxy's address for other proxies.
    pub proxy_peer_addr: Option<SocketAddr>,
    /// The proxy's `/metrics` URL.
    pub proxy_metrics: String,
    /// The proxy's process id.
    pub proxy_pid: u32,
    /// The agent's process id.
    pub agent_pid: u32,
    /// The dataworker's QUIC address.
    pub peer_addr: Option<SocketAddr>,
    /// The dataworker's HTTP address.
    pub http: Option<SocketAddr>,
    /// The dataworker's `/metrics` URL.
    pub metrics: Option<String>,
    /// The dataworker's `/health` URL.
    pub health: Option<String>,
    /// The dataworker's process id.
    pub pid: u32,
    /// Size of the dataworker's arena.
    #[serde(default)]
    pub arena_bytes: u64,
}

/// The variables a client command reads, as `shoal up` prints them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientEnv {
    /// `SHOAL_DATAWORKER_SOCKET`: the first node's dataworker.
    #[serde(rename = "SHOAL_DATAWORKER_SOCKET")]
    pub dataworker_socket: PathBuf,
    /// `SHOAL_PROXY_SOCKET`: the first node's proxy.
    #[serde(rename = "SHOAL_PROXY_SOCKET")]
    pub proxy_socket: PathBuf,
    /// `SHOAL_CONTROL`: control's HTTP API.
    #[serde(rename = "SHOAL_CONTROL")]
    pub control: SocketAddr,
    /// `SHOAL_TOKEN_FILE`: the file holding the operator token control's API takes.
    #[serde(
        rename = "SHOAL_TOKEN_FILE",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub token_file: Option<PathBuf>,
}

impl ClientEnv {
    /// The variables as name and value, for `Command::envs` or an `export` line.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            (
                "SHOAL_DATAWORKER_SOCKET",
                self.dataworker_socket.display().to_string(),
            ),
            (
                "SHOAL_PROXY_SOCKET",
                self.proxy_socket.display().to_string(),
            ),
            ("SHOAL_CONTROL", self.control.to_string()),
        ];
        if let Some(f) = &self.token_file {
            v.push(("SHOAL_TOKEN_FILE", f.display().to_string()));
        }
        v
    }
}

impl NodeInfo {
    /// A node from its components' ready lines.
    pub fn from_ready(
        socket_dir: PathBuf,
        dw: &DataworkerReady,
        proxy: &ProxyReady,
        agent: &AgentReady,
    ) -> NodeInfo {
        NodeInfo {
            id: dw.node.clone(),
            socket_dir,
            dataworker_socket: dw.socket.clone(),
            proxy_socket: proxy.socket.clone(),
            proxy_peer_addr: proxy.peer_addr,
            proxy_metrics: format!("http://{}/metrics", proxy.http),
            proxy_pid: proxy.pid,
            agent_pid: agent.pid,
            peer_addr: dw.peer_addr,
            http: dw.http,
            metrics: dw.http.map(|h| format!("http://{h}/metrics")),
            health: dw.http.map(|h| format!("http://{h}/health")),
            pid: dw.pid,
            arena_bytes: dw.arena_bytes,
        }
    }
}

impl Cluster {
    /// The node with id `id`.
    pub fn node(&self, id: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The position of node `id` in [`Cluster::nodes`].
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The fields `shoal up --json` printed before these types existed are all still there.
    #[test]
    fn up_json_keeps_its_field_names() {
        let dw = DataworkerReady {
            node: "node-1".into(),
            socket: "/run/shoal/node-1/dataworker.sock".into(),
            http: Some("127.0.0.1:9464".parse().unwrap()),
            peer_addr: Some("127.0.0.1:4433".parse().unwrap()),
            pid: 10,
            arena_bytes: 1 << 30,
        };
        let px = ProxyReady {
            node: "node-1".into(),
            socket: "/run/shoal/node-1/proxy.sock".into(),
            engine: "Uring".into(),
            peer_addr: None,
            http: "127.0.0.1:9465".parse().unwrap(),
            pid: 11,
        };
        let ag = AgentReady {
            node: "node-1".into(),
            work_dir: "/run/shoal/node-1/agent".into(),
            pid: 12,
        };
        let node = NodeInfo::from_ready("/run/shoal/node-1".into(), &dw, &px, &ag);
        let c = Cluster {
            control: ControlInfo {
                meta: None,
                http: "127.0.0.1:7701".parse().unwrap(),
                pid: 9,
                etcd: None,
                token_file: Some("/run/shoal/admin.token".into()),
            },
            env: ClientEnv {
                dataworker_socket: node.dataworker_socket.clone(),
                proxy_socket: node.proxy_socket.clone(),
                control: "127.0.0.1:7701".parse().unwrap(),
                token_file: Some("/run/shoal/admin.token".into()),
            },
            nodes: vec![node],
            runtime_dir: "/run/shoal".into(),
            tls_dir: "/run/shoal/tls".into(),
        };
        // Every field today's scripts read, with the names and shapes they had.
        let want = r#"{
            "control": {"meta": null, "http": "127.0.0.1:7701", "pid": 9, "etcd": null,
                        "token_file": "/run/shoal/admin.token"},
            "nodes": [{
                "id": "node-1",
                "socket_dir": "/run/shoal/node-1",
                "dataworker_socket": "/run/shoal/node-1/dataworker.sock",
                "proxy_socket": "/run/shoal/node-1/proxy.sock",
                "proxy_peer_addr": null,
                "proxy_metrics": "http://127.0.0.1:9465/metrics",
                "proxy_pid": 11,
                "agent_pid": 12,
                "peer_addr": "127.0.0.1:4433",
                "http": "127.0.0.1:9464",
                "metrics": "http://127.0.0.1:9464/metrics",
                "health": "http://127.0.0.1:9464/health",
                "pid": 10,
                "arena_bytes": 1073741824
            }],
            "env": {
                "SHOAL_DATAWORKER_SOCKET": "/run/shoal/node-1/dataworker.sock",
                "SHOAL_PROXY_SOCKET": "/run/shoal/node-1/proxy.sock",
                "SHOAL_CONTROL": "127.0.0.1:7701",
                "SHOAL_TOKEN_FILE": "/run/shoal/admin.token"
            },
            "runtime_dir": "/run/shoal",
            "tls_dir": "/run/shoal/tls"
        }"#;
        let want: serde_json::Value = serde_json::from_str(want).unwrap();
        assert_eq!(serde_json::to_value(&c).unwrap(), want);
        let back: Cluster = serde_json::from_value(want).unwrap();
        assert_eq!(back, c);
    }

    /// A line from an older component (no `arena_bytes`, no `token_file`) still parses.
    #[test]
    fn older_ready_lines_parse() {
        let line = r#"{"node":"node-0","socket":"/s","http":null,"peer_addr":null,"pid":3}"#;
        let r: DataworkerReady = serde_json::from_str(line).unwrap();
        assert_eq!((r.pid, r.arena_bytes), (3, 0));
        let line = r#"{"meta":null,"http":"127.0.0.1:1","pid":4}"#;
        let r: ControlReady = serde_json::from_str(line).unwrap();
        assert_eq!((r.pid, r.token_file), (4, None));
    }
}
