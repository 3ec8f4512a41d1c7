//! Command-line and environment settings, parsed once into typed values.
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "shoal",
    version,
    about = "shoal: a shared-memory data plane for short functions"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a local shoal in the foreground until Ctrl-C: control and, on each node (one, or
    /// `--nodes N`), a dataworker, a proxy and an agent, each its own process.
    Up(UpArgs),
    /// Run one node's dataworker.
    Dataworker(DataworkerArgs),
    /// Run the control plane (membership, metadata, leader election, HTTP API).
    Control(ControlArgs),
    /// Run one node's function proxy (routes calls between callers and instances).
    Proxy(ProxyArgs),
    /// Run one node's agent (starts, limits and reports the function instances placed here).
    Agent(AgentArgs),
    /// Development certificate authority for the cluster's mutual TLS.
    Ca {
        #[command(subcommand)]
        op: CaOp,
    },
    /// Store a file (or stdin with `-`) as an object.
    Put {
        #[command(flatten)]
        conn: ConnArgs,
        /// Object id.
        id: String,
        /// File to read, or `-` for stdin.
        source: String,
    },
    /// Write an object to stdout or a file.
    Get {
        #[command(flatten)]
        conn: ConnArgs,
        /// Object id.
        id: String,
        /// Write here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Wait this long for the object to be sealed.
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Delete objects.
    Rm {
        #[command(flatten)]
        conn: ConnArgs,
        /// Object ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// List objects.
    Ls {
        #[command(flatten)]
        conn: ConnArgs,
        /// Only ids starting with this.
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Key-value access.
    Kv {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: KvOp,
    },
    /// Show the node (arena use, objects, pins, clients), the cluster's nodes, the
    /// function instances on each node and the caller's tenant quota and use (from control).
    Status {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        control: ControlConn,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Functions: deploy, list, invoke, remove (through control's REST API).
    Fn {
        #[command(flatten)]
        control: ControlConn,
        #[command(subcommand)]
        op: FnOp,
    },
    /// Tokens of control's API: create, list, revoke.
    Token {
        #[command(flatten)]
        control: ControlConn,
        #[command(subcommand)]
        op: TokenOp,
    },
    /// Tenants: their quotas.
    Tenant {
        #[command(flatten)]
        control: ControlConn,
        #[command(subcommand)]
        op: TenantOp,
    },
    /// Run the benchmark suite.
    Bench(BenchArgs),
    /// Serve bytes over TCP (+ TLS) for `shoal bench cluster`'s baseline (internal).
    #[command(hide = true)]
    BenchPeer {
        /// Directory with the cluster CA and node-1's certificate.
        #[arg(long)]
        tls_dir: PathBuf,
        /// Bytes served per request.
        #[arg(long)]
        bytes: u64,
        /// Plain TCP instead of TLS.
        #[arg(long)]
        plain: bool,
    },
}

/// How a client command reaches control's REST API: its address and the token to send.
#[derive(Debug, Args, Clone)]
pub(crate) struct ControlConn {
    /// Control's HTTP API (host:port) [default: the address `shoal control` uses].
    #[arg(
        long,
        env = "SHOAL_CONTROL",
        default_value = DEFAULT_CONTROL,
        global = true
    )]
    pub(crate) control: String,
    /// Token for control's API [default: SHOAL_TOKEN, else the file SHOAL_TOKEN_FILE names,
    /// else the admin token `shoal up` writes to the runtime directory]. Other local users
    /// can read a command line: prefer SHOAL_TOKEN_FILE.
    #[arg(long, global = true, value_name = "TOKEN")]
    pub(crate) token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenOp {
    /// Issue a token and print it (its only copy: the store keeps a hash).
    Create {
        /// What it may do: admin, deployer, invoker or reader.
        #[arg(long, value_parser = parse_role)]
        role: shoal_meta::records::Role,
        /// The tenant it acts for [default: yours; the operator's default is `default`].
        #[arg(long, value_parser = parse_tenant)]
        tenant: Option<String>,
        /// Lifetime ("24h", "30d") [default: no expiry].
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// What it is for.
        #[arg(long)]
        description: Option<String>,
        /// Print the token and its record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tokens of your tenant (the operator: every tenant's). Never a secret.
    Ls {
        /// Only this tenant's.
        #[arg(long, value_parser = parse_tenant)]
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by id: it stops working within a second everywhere.
    Revoke {
        /// The token's id (`shoal token ls`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TenantOp {
    /// A tenant's quota: what its functions and data may take.
    Quota {
        #[command(subcommand)]
        op: QuotaOp,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum QuotaOp {
    /// Show a tenant's limits and use.
    Get {
        /// The tenant.
        #[arg(value_parser = parse_tenant)]
        tenant: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a tenant's limits (the operator only). Limits not named stay as they are.
    Set {
        /// The tenant.
        #[arg(value_parser = parse_tenant)]
        tenant: String,
        /// Bytes of objects and keys in each node's arena ("1GiB").
        #[arg(long, value_parser = parse_size)]
        arena_bytes: Option<u64>,
        /// Bytes spilled to each node's disk.
        #[arg(long, value_parser = parse_size)]
        spill_bytes: Option<u64>,
        /// Function instances (counted at each function's maximum).
        #[arg(long)]
        instances: Option<u64>,
        /// CPU of those instances, thousandths of a core.
        #[arg(long)]
        cpu_milli: Option<u64>,
        /// Memory of those instances, MiB.
        #[arg(long)]
        mem_mib: Option<u64>,
        /// Calls in flight through each proxy.
        #[arg(long)]
        calls_in_flight: Option<u64>,
        /// Remove these limits (comma-separated: arena_bytes, spill_bytes, instances,
        /// cpu_milli, mem_mib, calls_in_flight).
        #[arg(long, value_delimiter = ',')]
        unset: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CaOp {
    /// Create a CA (ca.pem, ca.key) in a directory, control's certificate (shoal-control.pem,
    /// .key) and certificates for the given nodes.
    Init {
        /// Directory for the files.
        #[arg(long)]
        dir: PathBuf,
        /// Node ids to issue certificates for (comma-separated).
        #[arg(long, value_delimiter = ',', value_parser = parse_node_id)]
        nodes: Vec<String>,
    },
    /// Issue a node certificate (NODE.pem, NODE.key) from the CA in a directory.
    Issue {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Node id (`shoal-control` issues control's certificate).
        #[arg(value_parser = parse_node_id)]
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum FnOp {
    /// Register a function (or update it) with its code and command.
    Deploy {
        /// Function name (1 to 63 of a-z, 0-9 and '-', starting with a letter).
        #[arg(value_parser = parse_function_name)]
        name: String,
        /// Code: a directory, a .tar.gz archive, shoal://OBJECT or s3://BUCKET/KEY.
        #[arg(long)]
        path: String,
        /// Digest of the package ("sha256:HEX").
        #[arg(long)]
        digest: Option<String>,
        /// Instances kept running.
        #[arg(long, default_value_t = 1)]
        min: u32,
        /// Most instances.
        #[arg(long, default_value_t = 1)]
        max: u32,
        /// Calls one instance handles at once.
        #[arg(long, default_value_t = 1)]
        concurrency: u32,
        /// CPU per instance, in thousandths of a core.
        #[arg(long = "cpu-milli", default_value_t = 500)]
        cpu_milli: u32,
        /// Memory per instance, in MiB.
        #[arg(long = "mem-mib", default_value_t = 256)]
        mem_mib: u32,
        /// Environment for the process (KEY=VALUE, repeatable).
        #[arg(long)]
        env: Vec<String>,
        /// Run only on nodes with this label (KEY=VALUE, repeatable; `shoal up` labels each
        /// node `node=NODE_ID`).
        #[arg(long)]
        node_selector: Vec<String>,
        /// Free-form label of the function (KEY=VALUE, repeatable).
        #[arg(long)]
        label: Vec<String>,
        /// Run only on nodes that run this function too (repeatable).
        #[arg(long, value_parser = parse_function_name)]
        affinity: Vec<String>,
        /// Never run on a node that runs this function (repeatable).
        #[arg(long, value_parser = parse_function_name)]
        anti_affinity: Vec<String>,
        /// Run in this resource pool (its nodes, within its capacity).
        #[arg(long, value_parser = parse_pool_name)]
        pool: Option<String>,
        /// The command that starts an instance, after `--` (relative to the package).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List functions and their instances.
    Ls {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Call a function and print the result: through this node's proxy (`--proxy` or
    /// `SHOAL_PROXY_SOCKET`), else through control's REST frontend.
    Invoke {
        /// Function name.
        #[arg(value_parser = parse_function_name)]
        name: String,
        /// Argument: text, `@file`, or `-` for stdin (empty when omitted).
        #[arg(conflicts_with = "object")]
        data: Option<String>,
        /// Pass the object with this id (already in the store) as the argument; needs the
        /// proxy.
        #[arg(long, requires = "proxy")]
        object: Option<String>,
        /// The node's proxy socket (else the call goes through control's REST frontend).
        #[arg(long, env = "SHOAL_PROXY_SOCKET")]
        proxy: Option<PathBuf>,
        /// The node's dataworker socket: arguments and results above the inline limit
        /// travel as objects through it.
        #[arg(long, env = "SHOAL_DATAWORKER_SOCKET")]
        socket: Option<PathBuf>,
        /// Give up after this long.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Show the tail of every instance's stdout and stderr (read from their agents).
    Logs {
        /// Function name.
        #[arg(value_parser = parse_function_name)]
        name: String,
        /// Bytes of each stream, at most.
        #[arg(long, default_value = "64KiB", value_parser = parse_size)]
        tail: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a function.
    Rm {
        /// Function name.
        #[arg(value_parser = parse_function_name)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum KvOp {
    /// Set a key.
    Set {
        /// Key.
        key: String,
        /// Value (use `@file` to read a file, `-` for stdin).
        value: String,
        /// Expire after this long ("30s", "5m").
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Only if the key does not exist.
        #[arg(long)]
        nx: bool,
    },
    /// Print a value.
    Get {
        /// Key.
        key: String,
    },
    /// Delete keys.
    Del {
        /// Keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Remaining TTL in seconds (-1: none, -2: missing).
    Ttl {
        /// Key.
        key: String,
    },
    /// List keys.
    Keys {
        /// Only keys starting with this.
        #[arg(default_value = "")]
        prefix: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ConnArgs {
    /// The dataworker socket [default: the one `shoal up` uses].
    #[arg(long, env = "SHOAL_DATAWORKER_SOCKET", global = true)]
    pub(crate) socket: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct DataworkerArgs {
    /// Node id (1 to 64 of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit).
    #[arg(long, env = "SHOAL_NODE_ID", default_value = "node-0", value_parser = parse_node_id)]
    pub(crate) node_id: String,
    /// Directory for the node's sockets [default: $XDG_RUNTIME_DIR/shoal or /tmp/shoal-UID];
    /// for `shoal up`, the runtime directory of the whole cluster. Created 0700; refused
    /// unless it is a real directory of this user that nobody else may write.
    #[arg(long, alias = "runtime-dir", env = "SHOAL_SOCKET_DIR")]
    pub(crate) socket_dir: Option<PathBuf>,
    /// Shared-memory arena size ("512MiB", "4GiB").
    #[arg(long, env = "SHOAL_SHM_SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub(crate) shm_size: u64,
    /// Fault all arena pages in at start (first writes then run at memory speed).
    #[arg(long, env = "SHOAL_SHM_POPULATE")]
    pub(crate) shm_populate: bool,
    /// Extra uids allowed to connect as the local user (the default tenant's admin, like the
    /// worker's own uid).
    #[arg(long = "allow-uid", env = "SHOAL_ALLOW_UIDS", value_delimiter = ',')]
    pub(crate) allow_uids: Vec<u32>,
    /// Map a uid to a tenant: `UID=TENANT` or `UID=TENANT:ROLE` (role admin by default;
    /// reader only reads). Clients of other uids must present a token.
    #[arg(long = "tenant-uid", env = "SHOAL_TENANT_UIDS", value_delimiter = ',')]
    pub(crate) tenant_uids: Vec<shoal_dataworker::UidTenant>,
    /// Spill evicted objects to this directory instead of dropping them.
    #[arg(long, env = "SHOAL_SPILL_DIR")]
    pub(crate) spill_dir: Option<PathBuf>,
    /// Start evicting past this fraction of the arena.
    #[arg(long, env = "SHOAL_HIGH_WATERMARK", default_value_t = 0.9)]
    pub(crate) high_watermark: f64,
    /// Evict down to this fraction.
    #[arg(long, env = "SHOAL_LOW_WATERMARK", default_value_t = 0.8)]
    pub(crate) low_watermark: f64,
    /// Largest payload sent inline in a request.
    #[arg(long, env = "SHOAL_INLINE_LIMIT", default_value = "64KiB", value_parser = parse_size)]
    pub(crate) inline_limit: u64,
    /// Serve requests through per-client shared-memory mailboxes (a polling thread; no
    /// syscall per request while it is busy). `false` keeps everything on the socket.
    #[arg(long, env = "SHOAL_MAILBOX", default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) mailbox: bool,
    /// How long the mailbox thread keeps polling after its last request before it sleeps.
    #[arg(long, env = "SHOAL_MAILBOX_SPIN", default_value = "50us", value_parser = parse_duration)]
    pub(crate) mailbox_spin: Duration,
    /// Threads serving the socket path (local hits need none).
    #[arg(long, env = "SHOAL_WORKER_THREADS", default_value_t = 1)]
    pub(crate) worker_threads: usize,
    /// Address of /metrics and /health ("127.0.0.1:9464"; port 0 picks one; "off" disables).
    #[arg(long, env = "SHOAL_HTTP_ADDR", default_value = "127.0.0.1:0", value_parser = parse_http_addr)]
    pub(crate) http_addr: HttpAddr,
    #[command(flatten)]
    pub(crate) cluster: ClusterArgs,
    #[command(flatten)]
    pub(crate) child: ChildArgs,
}

/// How a dataworker joins a cluster (it runs standalone without `--meta` or `--etcd`).
#[derive(Debug, Args, Clone)]
pub(crate) struct ClusterArgs {
    #[command(flatten)]
    pub(crate) store: MetaArgs,
    /// UDP address for QUIC from other dataworkers (port 0 picks one).
    #[arg(long, env = "SHOAL_PEER_ADDR", default_value = "127.0.0.1:0")]
    pub(crate) peer_addr: SocketAddr,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    /// Membership lease TTL: a node that stops renewing leaves the ring after this.
    #[arg(long, env = "SHOAL_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub(crate) lease_ttl: Duration,
    /// Parallel QUIC streams per large object transfer.
    #[arg(long, env = "SHOAL_FETCH_STREAMS", default_value_t = 4)]
    pub(crate) fetch_streams: usize,
}

/// Settings for a component started by `shoal up` (hidden from help).
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct ChildArgs {
    /// Print one JSON line describing the component once it is ready.
    #[arg(long, hide = true)]
    pub(crate) ready_json: bool,
    /// Shut down when standard input closes (the parent `shoal up` went away).
    #[arg(long, hide = true)]
    pub(crate) exit_with_parent: bool,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct ProxyArgs {
    /// Node id (1 to 64 of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit).
    #[arg(long, env = "SHOAL_NODE_ID", default_value = "node-0", value_parser = parse_node_id)]
    pub(crate) node_id: String,
    /// Directory for the node's sockets (`proxy.sock`) [default: as the dataworker's].
    #[arg(long, env = "SHOAL_SOCKET_DIR")]
    pub(crate) socket_dir: Option<PathBuf>,
    /// IO engine: auto (io_uring when the kernel allows it), uring or tokio.
    #[arg(long, env = "SHOAL_PROXY_ENGINE", default_value = "auto", value_parser = ["auto", "uring", "tokio"])]
    pub(crate) engine: String,
    /// Largest argument or result carried inline.
    #[arg(long, env = "SHOAL_INLINE_LIMIT", default_value = "64KiB", value_parser = parse_size)]
    pub(crate) inline_limit: u64,
    /// Calls waiting per function before new ones get `Overloaded`.
    #[arg(long, env = "SHOAL_PROXY_MAX_QUEUE", default_value_t = 1024)]
    pub(crate) max_queue: usize,
    /// With a metadata store (`--meta` or `--etcd`), the proxy joins the cluster: it forwards
    /// calls to other nodes' proxies and takes theirs, over TLS with the cluster CA.
    #[command(flatten)]
    pub(crate) store: MetaArgs,
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    /// TCP address for calls from other proxies (port 0 picks one).
    #[arg(long, env = "SHOAL_PROXY_PEER_ADDR", default_value = "127.0.0.1:0")]
    pub(crate) peer_listen: SocketAddr,
    /// TTL of the lease the proxy's record lives under.
    #[arg(long, env = "SHOAL_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub(crate) lease_ttl: Duration,
    /// Address of the proxy's HTTP endpoint (`/metrics`, `/health`; port 0 picks one).
    #[arg(long, env = "SHOAL_PROXY_HTTP_ADDR", default_value = "127.0.0.1:0")]
    pub(crate) http_addr: SocketAddr,
    /// A further uid whose processes may connect to the proxy's socket (repeatable; the
    /// proxy's own uid and those of `--tenant-uid` always may). They must present a token.
    #[arg(
        long = "allow-uid",
        env = "SHOAL_PROXY_ALLOW_UIDS",
        value_delimiter = ','
    )]
    pub(crate) allow_uids: Vec<u32>,
    /// The tenant of a local caller with this uid that presents no token (`UID=TENANT`, the
    /// dataworker's syntax, whose `:ROLE` the proxy ignores; repeatable); the proxy's own uid
    /// is tenant `default` unless given here.
    #[arg(
        long = "tenant-uid",
        env = "SHOAL_PROXY_TENANT_UIDS",
        value_delimiter = ','
    )]
    pub(crate) tenant_uids: Vec<shoal_dataworker::UidTenant>,
    #[command(flatten)]
    pub(crate) child: ChildArgs,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct AgentArgs {
    /// Node id (1 to 64 of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit).
    #[arg(long, env = "SHOAL_NODE_ID", default_value = "node-0", value_parser = parse_node_id)]
    pub(crate) node_id: String,
    /// Directory of the node's sockets (the proxy's and the dataworker's), where the agent
    /// also keeps `agent/work` and `agent/logs` [default: as the dataworker's].
    #[arg(long, env = "SHOAL_SOCKET_DIR")]
    pub(crate) socket_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) store: MetaArgs,
    /// The node's certificate, for control's metadata API (mutual TLS).
    #[command(flatten)]
    pub(crate) tls: TlsArgs,
    /// TTL of the agent's lease.
    #[arg(long, env = "SHOAL_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub(crate) lease_ttl: Duration,
    /// Time between SIGTERM and SIGKILL when an instance is stopped.
    #[arg(long, env = "SHOAL_STOP_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub(crate) grace: Duration,
    /// A label of this node (KEY=VALUE, repeatable), for functions' node selectors and pools.
    #[arg(long = "label", env = "SHOAL_NODE_LABELS", value_delimiter = ',')]
    pub(crate) labels: Vec<String>,
    /// Address of the agent's log endpoint (`shoal fn logs` reads instance logs there).
    #[arg(long, env = "SHOAL_AGENT_LOGS_ADDR", default_value = "127.0.0.1:0")]
    pub(crate) logs_addr: SocketAddr,
    #[command(flatten)]
    pub(crate) child: ChildArgs,
}

#[derive(Debug, Args, Clone)]
pub(crate) struct ControlArgs {
    /// Address of the metadata API the nodes use ("off" with --etcd: nodes use etcd directly).
    /// It is mutual TLS only and needs control's certificate (--tls-dir).
    #[arg(long, env = "SHOAL_CONTROL_LISTEN", default_value = "127.0.0.1:7700", value_parser = parse_http_addr)]
    pub(crate) listen: HttpAddr,
    #[command(flatten)]
    pub(crate) tls: ControlTlsArgs,
    /// Address of the HTTP API (/health, /v1/nodes, /v1/leader, /metrics).
    #[arg(long, env = "SHOAL_CONTROL_HTTP_ADDR", default_value = DEFAULT_CONTROL)]
    pub(crate) http_addr: SocketAddr,
    /// Where the embedded metadata store keeps its file [default: the socket directory's `control/`].
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Keep metadata in etcd instead (comma-separated client URLs); enables leader election
    /// between several control processes.
    #[arg(long, env = "SHOAL_ETCD", value_delimiter = ',')]
    pub(crate) etcd: Vec<String>,
    /// Key prefix in etcd.
    #[arg(long, env = "SHOAL_ETCD_PREFIX", default_value = "/shoal/")]
    pub(crate) etcd_prefix: String,
    /// Leader lease TTL: a dead leader is replaced within it.
    #[arg(long, env = "SHOAL_ELECTION_TTL", default_value = "5s", value_parser = parse_duration)]
    pub(crate) election_ttl: Duration,
    /// This process's name in the leader record [default: control-PID].
    #[arg(long, env = "SHOAL_CONTROL_NAME")]
    pub(crate) name: Option<String>,
    /// A node proxy's socket: `POST /v1/functions/NAME/invoke` calls go through it
    /// (without one, invoke answers 503).
    #[arg(long, env = "SHOAL_CONTROL_PROXY_SOCKET")]
    pub(crate) proxy_socket: Option<PathBuf>,
    /// That node's dataworker socket, for invoke bodies above the proxy's inline limit.
    #[arg(long, env = "SHOAL_CONTROL_DATAWORKER_SOCKET")]
    pub(crate) dataworker_socket: Option<PathBuf>,
    /// Keep an operator token (the system tenant's admin) in this file, 0600: unless it
    /// holds one that works, the leading control issues one and writes it there (`shoal up`
    /// uses `<runtime dir>/admin.token`, where the CLI looks by itself).
    #[arg(long, env = "SHOAL_ADMIN_TOKEN_FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) child: ChildArgs,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpAddr(pub(crate) Option<SocketAddr>);

#[derive(Debug, Args)]
pub(crate) struct UpArgs {
    /// Nodes to start, each a dataworker, a proxy and an agent. One node is called by
    /// `--node-id` (`node-0`, where the client commands look by default); several are
    /// `node-1` to `node-N`.
    #[arg(long, default_value_t = 1)]
    pub(crate) nodes: u32,
    /// Print one JSON object describing what started, once it is ready.
    #[arg(long)]
    pub(crate) json: bool,
    /// Control's HTTP API [default: where `shoal fn` and `shoal status` look; port 0 picks
    /// a free one].
    #[arg(long, env = "SHOAL_CONTROL_HTTP_ADDR", default_value = DEFAULT_CONTROL)]
    pub(crate) control_http_addr: SocketAddr,
    #[command(flatten)]
    pub(crate) worker: DataworkerArgs,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Which suite.
    #[arg(value_parser = ["local", "cluster", "calls"])]
    pub(crate) suite: String,
    /// A short smoke run (seconds, not minutes).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Only the JSON lines, no table.
    #[arg(long)]
    pub(crate) json_only: bool,
    /// Only benchmarks whose name contains this (e.g. `kv_`, `get_small`).
    #[arg(long)]
    pub(crate) only: Option<String>,
}

/// `s` if it passes the protocol's rule for `kind` (the one every component checks), else
/// the rule it breaks: names are refused here, before anything is sent.
fn name_of(kind: shoal_protocol::IdKind, s: &str) -> Result<String, String> {
    kind.check(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// A node id (it names directories, files and metadata keys).
fn parse_node_id(s: &str) -> Result<String, String> {
    name_of(shoal_protocol::IdKind::Node, s)
}

fn parse_function_name(s: &str) -> Result<String, String> {
    name_of(shoal_protocol::IdKind::Function, s)
}

fn parse_pool_name(s: &str) -> Result<String, String> {
    name_of(shoal_protocol::IdKind::Pool, s)
}

fn parse_tenant(s: &str) -> Result<String, String> {
    name_of(shoal_protocol::IdKind::Tenant, s)
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size like 512MiB or 4GiB: {e}"))
}

fn parse_role(s: &str) -> Result<shoal_meta::records::Role, String> {
    s.trim()
        .parse()
        .map_err(|e: shoal_meta::records::InvalidSpec| e.reason)
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 500ms or 30s: {e}"))
}

fn parse_http_addr(s: &str) -> Result<HttpAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(HttpAddr(None));
    }
    s.parse()
        .map(|a| HttpAddr(Some(a)))
        .map_err(|e| format!("{s:?} is not an address like 127.0.0.1:9464: {e}"))
}

/// Control's HTTP API when none is named: where `shoal control` and `shoal up` serve it and
/// where `shoal fn` and `shoal status` look for it.
pub(crate) const DEFAULT_CONTROL: &str = "127.0.0.1:7701";

/// Where sockets (and the admin token) go when no directory is given: the runtime
/// directory the control client's `default_runtime_dir` names, so the CLI and every other
/// client agree on it.
pub(crate) fn default_socket_dir() -> PathBuf {
    shoal_control_client::default_runtime_dir(&|k| std::env::var_os(k))
}

impl ConnArgs {
    pub(crate) fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| default_socket_dir().join("node-0").join("dataworker.sock"))
    }
}

/// Where the cluster's metadata lives.
#[derive(Debug, Args, Clone)]
pub(crate) struct MetaArgs {
    /// Join the cluster whose control serves metadata at this address (host:port).
    #[arg(long, env = "SHOAL_META")]
    pub(crate) meta: Option<String>,
    /// Join the cluster whose metadata lives in etcd (comma-separated client URLs).
    #[arg(long, env = "SHOAL_ETCD", value_delimiter = ',')]
    pub(crate) etcd: Vec<String>,
    /// Key prefix in etcd (clusters sharing an etcd use different prefixes).
    #[arg(long, env = "SHOAL_ETCD_PREFIX", default_value = "/shoal/")]
    pub(crate) etcd_prefix: String,
}

impl MetaArgs {
    /// Whether a metadata store is named.
    pub(crate) fn enabled(&self) -> bool {
        self.meta.is_some() || !self.etcd.is_empty()
    }

    /// Connects to the named store; control's metadata API as node `node`, with the
    /// certificate `tls` names.
    pub(crate) async fn connect(
        &self,
        tls: &TlsArgs,
        node: &str,
    ) -> anyhow::Result<std::sync::Arc<dyn shoal_meta::MetaStore>> {
        crate::cluster_cmds::meta_store(self, tls, node).await
    }
}

/// A node's TLS material (the cluster CA, its certificate and key).
#[derive(Debug, Args, Clone)]
pub(crate) struct TlsArgs {
    /// Directory with ca.pem, NODE_ID.pem and NODE_ID.key (see `shoal ca init`).
    #[arg(long, env = "SHOAL_TLS_DIR")]
    pub(crate) tls_dir: Option<PathBuf>,
    /// Cluster CA certificate (PEM) [default: TLS_DIR/ca.pem].
    #[arg(long, env = "SHOAL_CA_CERT")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// This node's certificate (PEM) [default: TLS_DIR/NODE_ID.pem].
    #[arg(long, env = "SHOAL_NODE_CERT")]
    pub(crate) node_cert: Option<PathBuf>,
    /// This node's private key (PEM) [default: TLS_DIR/NODE_ID.key].
    #[arg(long, env = "SHOAL_NODE_KEY")]
    pub(crate) node_key: Option<PathBuf>,
}

impl ClusterArgs {
    /// Whether the node joins a cluster.
    pub(crate) fn enabled(&self) -> bool {
        self.store.enabled()
    }
}

impl TlsArgs {
    /// The TLS files of `node`, from the explicit paths or the TLS directory.
    pub(crate) fn tls_files(&self, node: &str) -> anyhow::Result<shoal_transport::TlsFiles> {
        let from_dir = |name: String| self.tls_dir.as_ref().map(|d| d.join(name));
        let pick = |explicit: &Option<PathBuf>, name: String, flag: &str| {
            explicit.clone().or_else(|| from_dir(name)).ok_or_else(|| {
                anyhow::anyhow!("a cluster node needs {flag} or --tls-dir (see `shoal ca init`)")
            })
        };
        Ok(shoal_transport::TlsFiles {
            ca_cert: pick(&self.ca_cert, "ca.pem".into(), "--ca-cert")?,
            cert: pick(&self.node_cert, format!("{node}.pem"), "--node-cert")?,
            key: pick(&self.node_key, format!("{node}.key"), "--node-key")?,
        })
    }
}

/// Control's TLS material for the metadata API: the cluster CA, control's certificate and key
/// (`shoal ca init` makes them).
#[derive(Debug, Args, Clone)]
pub(crate) struct ControlTlsArgs {
    /// Directory with ca.pem, shoal-control.pem and shoal-control.key (see `shoal ca init`).
    #[arg(long, env = "SHOAL_TLS_DIR")]
    pub(crate) tls_dir: Option<PathBuf>,
    /// Cluster CA certificate (PEM): nodes must present certificates it signed [default:
    /// TLS_DIR/ca.pem].
    #[arg(long, env = "SHOAL_CA_CERT")]
    pub(crate) ca_cert: Option<PathBuf>,
    /// Control's certificate (PEM) [default: TLS_DIR/shoal-control.pem].
    #[arg(long, env = "SHOAL_CONTROL_CERT")]
    pub(crate) control_cert: Option<PathBuf>,
    /// Control's private key (PEM) [default: TLS_DIR/shoal-control.key].
    #[arg(long, env = "SHOAL_CONTROL_KEY")]
    pub(crate) control_key: Option<PathBuf>,
}

impl ControlTlsArgs {
    /// Control's TLS files, from the explicit paths or the TLS directory.
    pub(crate) fn tls_files(&self) -> anyhow::Result<shoal_pki::TlsFiles> {
        let name = shoal_pki::CONTROL_SERVER_NAME;
        let from_dir = |file: String| self.tls_dir.as_ref().map(|d| d.join(file));
        let pick = |explicit: &Option<PathBuf>, file: String, flag: &str| {
            explicit.clone().or_else(|| from_dir(file)).ok_or_else(|| {
                anyhow::anyhow!(
                    "control's metadata API is mutual TLS only: pass --tls-dir (a directory \
                     `shoal ca init` made) or {flag}, or serve no metadata API (--listen off)"
                )
            })
        };
        Ok(shoal_pki::TlsFiles {
            ca_cert: pick(&self.ca_cert, shoal_pki::CA_CERT_FILE.into(), "--ca-cert")?,
            cert: pick(&self.control_cert, format!("{name}.pem"), "--control-cert")?,
            key: pick(&self.control_key, format!("{name}.key"), "--control-key")?,
        })
    }
}

impl DataworkerArgs {
    /// The flags that give a dataworker started by `shoal up` as node `node` these settings:
    /// all but the node id, the directories, TLS, the lease and the metadata store, which
    /// `up` sets itself. With `several` nodes, each spills to its own subdirectory.
    pub(crate) fn child_flags(&self, node: &str, several: bool) -> Vec<String> {
        let mut f: Vec<String> = [
            ("--shm-size", self.shm_size.to_string()),
            ("--high-watermark", self.high_watermark.to_string()),
            ("--low-watermark", self.low_watermark.to_string()),
            ("--inline-limit", self.inline_limit.to_string()),
            ("--mailbox", self.mailbox.to_string()),
            (
                "--mailbox-spin",
                humantime::format_duration(self.mailbox_spin).to_string(),
            ),
            ("--worker-threads", self.worker_threads.to_string()),
            (
                "--http-addr",
                self.http_addr.0.map_or("off".into(), |a| a.to_string()),
            ),
            ("--peer-addr", self.cluster.peer_addr.to_string()),
            ("--fetch-streams", self.cluster.fetch_streams.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
        if self.shm_populate {
            f.push("--shm-populate".into());
        }
        if !self.allow_uids.is_empty() {
            let uids: Vec<String> = self.allow_uids.iter().map(u32::to_string).collect();
            f.extend(["--allow-uid".into(), uids.join(",")]);
        }
        for m in &self.tenant_uids {
            f.extend([
                "--tenant-uid".into(),
                format!("{}={}:{}", m.uid, m.tenant, m.role),
            ]);
        }
        if let Some(d) = &self.spill_dir {
            let d = if several { d.join(node) } else { d.clone() };
            f.extend(["--spill-dir".into(), d.display().to_string()]);
        }
        f
    }

    /// The validated dataworker config.
    pub(crate) fn to_config(&self) -> anyhow::Result<shoal_dataworker::Config> {
        let dir = self
            .socket_dir
            .clone()
            .unwrap_or_else(|| default_socket_dir().join(&self.node_id));
        let mut c = shoal_dataworker::Config::new(dir);
        c.node_id = self.node_id.clone();
        c.shm_size = self.shm_size;
        c.shm_populate = self.shm_populate;
        c.allowed_uids = self.allow_uids.clone();
        c.tenant_uids = self.tenant_uids.clone();
        c.spill_dir = self.spill_dir.clone();
        c.high_watermark = self.high_watermark;
        c.low_watermark = self.low_watermark;
        c.inline_limit = self.inline_limit;
        c.http_addr = self.http_addr.0;
        c.mailbox = self.mailbox;
        c.mailbox_spin = self.mailbox_spin;
        if self.cluster.enabled() {
            let mut cc = shoal_dataworker::ClusterConfig::new(self.cluster.peer_addr);
            cc.lease_ttl = self.cluster.lease_ttl;
            cc.fetch_streams = self.cluster.fetch_streams;
            c.cluster = Some(cc);
        }
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("64 MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("soon").is_err());
    }

    /// `shoal up` hands its dataworker settings to the dataworkers it starts unchanged.
    #[test]
    fn up_passes_its_dataworker_settings_on() {
        let cli = Cli::try_parse_from([
            "shoal",
            "up",
            "--shm-size",
            "64MiB",
            "--mailbox-spin",
            "10us",
            "--http-addr",
            "off",
            "--allow-uid",
            "7,8",
            "--tenant-uid",
            "1001=team-a:reader",
            "--spill-dir",
            "/spill",
            "--shm-populate",
            "--low-watermark",
            "0.5",
        ])
        .unwrap();
        let Command::Up(a) = cli.command else {
            panic!()
        };
        let mut argv = vec!["shoal".to_string(), "dataworker".into()];
        argv.extend(a.worker.child_flags("node-2", true));
        let cli = Cli::try_parse_from(&argv).unwrap();
        let Command::Dataworker(d) = cli.command else {
            panic!()
        };
        let (want, got) = (a.worker.to_config().unwrap(), d.to_config().unwrap());
        assert_eq!(got.shm_size, 64 << 20);
        assert_eq!(got.shm_populate, want.shm_populate);
        assert_eq!(got.mailbox_spin, Duration::from_micros(10));
        assert_eq!(got.http_addr, None);
        assert_eq!(got.allowed_uids, [7, 8]);
        assert_eq!(got.tenant_uids, want.tenant_uids);
        assert_eq!(
            got.tenant_uids[0].role,
            shoal_meta::records::Role::Reader,
            "the role survives"
        );
        assert_eq!(got.low_watermark, 0.5);
        assert_eq!(got.spill_dir, Some(PathBuf::from("/spill/node-2")));
        assert_eq!(
            (got.inline_limit, got.mailbox, got.high_watermark),
            (want.inline_limit, want.mailbox, want.high_watermark)
        );
    }

    #[test]
    fn bad_setting_names_itself() {
        let cli = Cli::try_parse_from(["shoal", "dataworker", "--low-watermark", "0.95"]).unwrap();
        let Command::Dataworker(a) = cli.command else {
            panic!()
        };
        let e = a.to_config().unwrap_err().to_string();
        assert!(e.contains("watermark"), "{e}");
        let e = Cli::try_parse_from(["shoal", "dataworker", "--shm-size", "lots"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--shm-size"), "{e}");
    }
}
