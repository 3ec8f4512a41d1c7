//! [`RunningCluster`]: what `shoal up` runs. Control first (the nodes need its metadata API),
//! then each node's dataworker, proxy and agent, each its own process of the `shoal` binary
//! and each waited for until it prints its ready line; stopped in the reverse order.
//!
//! The runtime directory must be private (`shoal_pki::ensure_private_dir`: created 0700, a
//! real directory of this user that nobody else may write); [`RunningCluster::start`]
//! refuses any other before it writes anything, and so does each component for its own
//! directory. Node ids follow the protocol's rule (they name directories and files).
//!
//! Layout of the runtime directory: `tls/` (a development CA, control's certificate for the
//! metadata API and one certificate per node, made on first use and kept), `control/` (the
//! embedded metadata file), `admin.token` (an operator token control keeps there, 0600, for
//! the local user's clients), and one directory per node holding its sockets and its agent's
//! files.
use crate::error::Error;
use crate::process::Proc;
use crate::ready::{
    AgentReady, ClientEnv, Cluster, ControlInfo, ControlReady, DataworkerReady, NodeInfo,
    ProxyReady,
};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where the cluster's metadata lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// Control's embedded store (`control/meta.db` in the runtime directory); the node
    /// components reach it through control's metadata API.
    Embedded,
    /// etcd, which control and every node component use directly.
    Etcd {
        /// Client URLs.
        urls: Vec<String>,
        /// Key prefix of this cluster.
        prefix: String,
    },
}

/// One node to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Node id (also its directory's name and its certificate's).
    pub id: String,
    /// Flags for its dataworker beyond those the cluster sets (node id, socket directory,
    /// TLS, lease, metadata store): memory, spill directory, and so on.
    pub dataworker_flags: Vec<String>,
}

/// What [`RunningCluster::start`] starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The `shoal` binary every component runs from.
    pub exe: PathBuf,
    /// The runtime directory (see the module doc).
    pub runtime_dir: PathBuf,
    /// The nodes, in order. The first serves control's REST frontend.
    pub nodes: Vec<NodeSpec>,
    /// Control's HTTP API (port 0 picks one).
    pub control_http: SocketAddr,
    /// Where metadata lives.
    pub store: Store,
    /// Lease TTL of every node component: a node that stops renewing leaves after this.
    pub lease_ttl: Duration,
    /// How long each component may take to print its ready line.
    pub ready_timeout: Duration,
}

impl ClusterSpec {
    /// Nodes `ids` with default dataworkers, control's HTTP API on a free port, the
    /// embedded store, 10 s leases and 60 s to get ready.
    pub fn new(
        exe: impl Into<PathBuf>,
        runtime_dir: impl Into<PathBuf>,
        ids: impl IntoIterator<Item = String>,
    ) -> ClusterSpec {
        ClusterSpec {
            exe: exe.into(),
            runtime_dir: runtime_dir.into(),
            nodes: ids
                .into_iter()
                .map(|id| NodeSpec {
                    id,
                    dataworker_flags: Vec::new(),
                })
                .collect(),
            control_http: SocketAddr::from(([127, 0, 0, 1], 0)),
            store: Store::Embedded,
            lease_ttl: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(60),
        }
    }

    fn tls_dir(&self) -> PathBuf {
        self.runtime_dir.join("tls")
    }

    fn node_dir(&self, id: &str) -> PathBuf {
        self.runtime_dir.join(id)
    }

    /// Where control keeps the operator token: `<runtime dir>/admin.token`, where the CLI
    /// looks when nothing else names a token.
    pub fn token_file(&self) -> PathBuf {
        self.runtime_dir.join("admin.token")
    }

    /// `shoal control`'s flags: an ephemeral metadata API (mutual TLS with control's
    /// certificate from `tls/`), the REST frontend through the first node, the operator token
    /// in the runtime directory.
    fn control_args(&self, first: &str) -> Vec<String> {
        let mut args = vec![
            "control".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--tls-dir".into(),
            path_arg(&self.tls_dir()),
            "--http-addr".into(),
            self.control_http.to_string(),
            "--data-dir".into(),
            path_arg(&self.runtime_dir.join("control")),
            "--proxy-socket".into(),
            path_arg(&self.node_dir(first).join("proxy.sock")),
            "--dataworker-socket".into(),
            path_arg(&self.node_dir(first).join("dataworker.sock")),
            "--admin-token-file".into(),
            path_arg(&self.token_file()),
        ];
        if let Store::Etcd { .. } = self.store {
            args.extend(self.etcd_flags());
        }
        args
    }

    fn etcd_flags(&self) -> Vec<String> {
        match &self.store {
            Store::Embedded => Vec::new(),
            Store::Etcd { urls, prefix } => vec![
                "--etcd".into(),
                urls.join(","),
                "--etcd-prefix".into(),
                prefix.clone(),
            ],
        }
    }

    /// How every node component reaches the metadata store.
    fn store_flags(&self, control: &ControlReady) -> Result<Vec<String>, Error> {
        match self.store {
            Store::Embedded => {
                let meta = control.meta.ok_or(Error::NoMetaApi)?;
                Ok(vec!["--meta".into(), meta.to_string()])
            }
            Store::Etcd { .. } => Ok(self.etcd_flags()),
        }
    }

    /// The flags every node component takes: `sub`command, node id, directory, lease.
    fn node_flags(&self, sub: &str, id: &str) -> Vec<String> {
        vec![
            sub.to_string(),
            "--node-id".into(),
            id.to_string(),
            "--socket-dir".into(),
            path_arg(&self.node_dir(id)),
            "--lease-ttl".into(),
            format!("{}ms", self.lease_ttl.as_millis()),
        ]
    }

    /// Runs `args` of the `shoal` binary as component `name`, waiting for its ready line.
    fn spawn<R: serde::de::DeserializeOwned>(
        &self,
        name: String,
        args: &[String],
    ) -> Result<Component<R>, Error> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args).args(["--ready-json", "--exit-with-parent"]);
        let (proc, ready) = Proc::spawn_ready(name, &mut cmd, self.ready_timeout)?;
        Ok(Component { proc, ready })
    }

    fn start_control(&self) -> Result<Component<ControlReady>, Error> {
        let first = self.nodes.first().ok_or(Error::NoNodes)?;
        self.spawn("control".into(), &self.control_args(&first.id))
    }

    /// One node's dataworker, proxy and agent, each ready.
    fn start_node(&self, node: &NodeSpec, store: &[String]) -> Result<RunningNode, Error> {
        let tls = ["--tls-dir".to_string(), path_arg(&self.tls_dir())];
        let id = &node.id;
        let mut args = self.node_flags("dataworker", id);
        args.extend(tls.iter().cloned());
        args.extend(node.dataworker_flags.iter().cloned());
        args.extend(store.iter().cloned());
        let dataworker = self.spawn(id.clone(), &args)?;
        let mut args = self.node_flags("proxy", id);
        args.extend(tls.iter().cloned());
        args.extend(store.iter().cloned());
        let proxy = self.spawn(format!("{id} proxy"), &args)?;
        let mut args = self.node_flags("agent", id);
        args.extend(tls.iter().cloned());
        args.extend(["--label".into(), format!("node={id}")]);
        args.extend(store.iter().cloned());
        let agent = self.spawn(format!("{id} agent"), &args)?;
        Ok(RunningNode {
            dir: self.node_dir(id),
            dataworker,
            proxy,
            agent,
        })
    }
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// A started component and what it said when ready.
#[derive(Debug)]
struct Component<R> {
    proc: Proc,
    ready: R,
}

#[derive(Debug)]
struct RunningNode {
    dir: PathBuf,
    dataworker: Component<DataworkerReady>,
    proxy: Component<ProxyReady>,
    agent: Component<AgentReady>,
}

/// Control and the nodes, every component ready. Dropping it stops them (as
/// [`RunningCluster::stop`] with [`crate::DEFAULT_GRACE`]).
#[derive(Debug)]
pub struct RunningCluster {
    runtime_dir: PathBuf,
    tls_dir: PathBuf,
    etcd: Option<String>,
    control: Component<ControlReady>,
    nodes: Vec<RunningNode>,
}

impl RunningCluster {
    /// Starts everything `spec` names and waits until each component is ready. On an error,
    /// what was started is stopped again.
    pub fn start(spec: &ClusterSpec) -> Result<RunningCluster, Error> {
        let ids: Vec<&str> = spec.nodes.iter().map(|n| n.id.as_str()).collect();
        for id in &ids {
            shoal_protocol::IdKind::Node
                .check(id)
                .map_err(|source| Error::NodeId {
                    id: id.to_string(),
                    source,
                })?;
        }
        // Private from the start, and refused before anything is written when it is not: a
        // directory another user made (or may write to, or a symlink) would hand them the
        // CA key, the admin token and the sockets. Every component checks its own too.
        shoal_pki::ensure_private_dir(&spec.runtime_dir).map_err(Error::UnsafeDir)?;
        ensure_tls(&spec.tls_dir(), &ids)?;
        let control = spec.start_control()?;
        let store = spec.store_flags(&control.ready)?;
        let mut cluster = RunningCluster {
            runtime_dir: spec.runtime_dir.clone(),
            tls_dir: spec.tls_dir(),
            etcd: match &spec.store {
                Store::Embedded => None,
                Store::Etcd { urls, .. } => Some(urls.join(",")),
            },
            control,
            nodes: Vec::new(),
        };
        for node in &spec.nodes {
            cluster.nodes.push(spec.start_node(node, &store)?);
        }
        Ok(cluster)
    }

    /// What runs, as `shoal up --json` prints it.
    pub fn describe(&self) -> Cluster {
        let nodes: Vec<NodeInfo> = self
            .nodes
            .iter()
            .map(|n| {
                NodeInfo::from_ready(
                    n.dir.clone(),
                    &n.dataworker.ready,
                    &n.proxy.ready,
                    &n.agent.ready,
                )
            })
            .collect();
        let control = &self.control.ready;
        // `start` refuses a cluster without nodes.
        let (dataworker_socket, proxy_socket) = nodes
            .first()
            .map(|n| (n.dataworker_socket.clone(), n.proxy_socket.clone()))
            .unwrap_or_default();
        Cluster {
            control: ControlInfo {
                meta: control.meta,
                http: control.http,
                pid: control.pid,
                etcd: self.etcd.clone(),
                token_file: control.token_file.clone(),
            },
            env: ClientEnv {
                dataworker_socket,
                proxy_socket,
                control: control.http,
                token_file: control.token_file.clone(),
            },
            nodes,
            runtime_dir: self.runtime_dir.clone(),
            tls_dir: self.tls_dir.clone(),
        }
    }

    /// Stops everything: the agents first (they stop the instances they run), then the
    /// proxies, the dataworkers, and control last; each stage gets `grace` after SIGTERM.
    pub fn stop(mut self, grace: Duration) {
        self.stop_in_order(grace);
    }

    fn stop_in_order(&mut self, grace: Duration) {
        Proc::stop_all(self.nodes.iter_mut().map(|n| &mut n.agent.proc), grace);
        Proc::stop_all(self.nodes.iter_mut().map(|n| &mut n.proxy.proc), grace);
        Proc::stop_all(self.nodes.iter_mut().map(|n| &mut n.dataworker.proc), grace);
        self.control.proc.stop(grace);
    }
}

impl Drop for RunningCluster {
    fn drop(&mut self) {
        self.stop_in_order(crate::DEFAULT_GRACE);
    }
}

/// The development CA in `dir`, loaded or made there, with control's certificate and one for
/// each node.
fn ensure_tls(dir: &Path, nodes: &[&str]) -> Result<(), Error> {
    let tls = |source| Error::Tls {
        dir: dir.to_path_buf(),
        source: Box::new(source),
    };
    shoal_pki::ensure_private_dir(dir).map_err(Error::UnsafeDir)?;
    let exists = |p: PathBuf| std::fs::symlink_metadata(p).is_ok();
    let ca = if exists(dir.join(shoal_pki::CA_CERT_FILE)) {
        shoal_pki::DevCa::load(dir).map_err(tls)?
    } else {
        let ca = shoal_pki::DevCa::generate().map_err(tls)?;
        ca.save(dir).map_err(tls)?;
        ca
    };
    let control = shoal_pki::CONTROL_SERVER_NAME;
    if !exists(shoal_pki::TlsFiles::in_dir(dir, control).cert) {
        ca.issue_control()
            .and_then(|c| c.save(dir, control))
            .map_err(tls)?;
    }
    for n in nodes {
        if !exists(dir.join(format!("{n}.pem"))) {
            ca.issue(n).and_then(|c| c.save(dir, n)).map_err(tls)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn components_get_the_flags_of_their_node_and_store() {
        let mut spec = ClusterSpec::new("/bin/shoal", "/rt", ["n1".to_string(), "n2".into()]);
        spec.lease_ttl = Duration::from_secs(2);
        let control = spec.control_args("n1");
        assert!(control
            .windows(2)
            .any(|w| w == ["--proxy-socket", "/rt/n1/proxy.sock"]));
        assert!(control.windows(2).any(|w| w == ["--tls-dir", "/rt/tls"]));
        assert!(control
            .windows(2)
            .any(|w| w == ["--admin-token-file", "/rt/admin.token"]));
        assert!(!control.contains(&"--etcd".to_string()));
        let ready = ControlReady {
            meta: Some("127.0.0.1:7000".parse().unwrap()),
            http: "127.0.0.1:7701".parse().unwrap(),
            pid: 1,
            token_file: None,
        };
        assert_eq!(
            spec.store_flags(&ready).unwrap(),
            ["--meta", "127.0.0.1:7000"]
        );
        assert_eq!(
            spec.node_flags("agent", "n2"),
            [
                "agent",
                "--node-id",
                "n2",
                "--socket-dir",
                "/rt/n2",
                "--lease-ttl",
                "2000ms"
            ]
        );
        spec.store = Store::Etcd {
            urls: vec!["http://a:2379".into(), "http://b:2379".into()],
            prefix: "/p/".into(),
        };
        let flags = [
            "--etcd",
            "http://a:2379,http://b:2379",
            "--etcd-prefix",
            "/p/",
        ];
        assert_eq!(spec.store_flags(&ready).unwrap(), flags);
        assert!(spec.control_args("n1").ends_with(&flags.map(String::from)));
        let no_meta = ControlReady {
            meta: None,
            ..ready
        };
        spec.store = Store::Embedded;
        assert!(matches!(spec.store_flags(&no_meta), Err(Error::NoMetaApi)));
    }

    #[test]
    fn the_ca_is_made_once_and_certificates_added() {
        let dir = tempfile::tempdir().unwrap();
        ensure_tls(dir.path(), &["a"]).unwrap();
        let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
        ensure_tls(dir.path(), &["a", "b"]).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
        assert!(dir.path().join("b.pem").exists() && dir.path().join("b.key").exists());
        let control = shoal_pki::TlsFiles::in_dir(dir.path(), shoal_pki::CONTROL_SERVER_NAME);
        shoal_pki::ControlTls::load(&control).unwrap();
    }
}
