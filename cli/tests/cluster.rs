//! A real cluster on this machine: `shoal up --nodes 3` (control, and a dataworker, a proxy
//! and an agent process per node, started and described through `shoal_devcluster`), driven
//! through the CLI and the SDK as a user would, including killing a node.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use shoal_control_client::{ControlClient, Pool};
use shoal_devcluster::wait::{poll_until, wait_for};
use shoal_devcluster::{Cluster, NodeInfo, RunningUp};
use shoal_meta::records::{InstancePhase, InstanceRecord};
use shoal_sdk::blocking::Client;
use shoal_sdk::ErrorCode;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
const TTL: Duration = Duration::from_secs(2);
/// Registration with the directory owners is asynchronous (it lands within milliseconds of
/// a seal): a get right after a put on another node gives it this long.
const SETTLE: Duration = Duration::from_secs(5);

/// `shoal up --nodes N` in a temporary runtime directory; stopped when dropped.
struct Up {
    up: RunningUp,
    dir: tempfile::TempDir,
}

impl Up {
    fn start(nodes: u32, extra: &[&str]) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let up = shoal_devcluster::Up::new(SHOAL, dir.path())
            .nodes(nodes)
            .args(["--shm-size", "512MiB", "--lease-ttl", "2s"])
            .args(extra)
            .start()
            .unwrap_or_else(|e| panic!("{e}"));
        Up { up, dir }
    }

    fn info(&self) -> &Cluster {
        self.up.cluster()
    }

    fn node(&self, node: usize) -> &NodeInfo {
        &self.info().nodes[node]
    }

    fn socket(&self, node: usize) -> String {
        self.node(node).dataworker_socket.display().to_string()
    }

    fn control(&self) -> String {
        self.info().control.http.to_string()
    }

    /// The operator token control keeps for the local user (what `SHOAL_TOKEN_FILE` names).
    fn token_file(&self) -> std::path::PathBuf {
        self.info()
            .env
            .token_file
            .clone()
            .expect("shoal up names its admin token file")
    }

    fn shoal(&self, node: usize, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_DATAWORKER_SOCKET", self.socket(node))
            .env("SHOAL_CONTROL", self.control())
            .env("SHOAL_TOKEN_FILE", self.token_file())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = c.stdin.take().unwrap();
        if let Some(data) = stdin {
            input.write_all(data).unwrap();
        }
        drop(input);
        c.wait_with_output().unwrap()
    }

    fn kill_node(&self, node: usize) {
        kill(self.node(node).pid);
    }

    /// Waits until node `node` sees `n` members.
    fn wait_members(&self, node: usize, n: usize) {
        let c = Client::connect(self.socket(node)).unwrap();
        wait_until(
            &format!("node {node} to see {n} members"),
            Duration::from_secs(20),
            || (c.status().unwrap().members.len() == n).then_some(()),
        );
    }

    /// The sum of the dataworker's counter `series` (every label set that starts so).
    fn counter(&self, node: usize, series: &str) -> u64 {
        let http = self.node(node).http.unwrap().to_string();
        http_get_text(&http, "/metrics")
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

fn ok(o: &Output) -> Vec<u8> {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout.clone()
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn cluster_put_get_and_node_loss(up: &Up) {
    up.wait_members(0, 3);
    up.wait_members(2, 3);
    // A file put on node 1 is read byte-exact on node 3 through the CLI.
    let data = payload(3 << 20);
    let file = up.dir.path().join("in.bin");
    std::fs::write(&file, &data).unwrap();
    ok(&up.shoal(0, &["put", "big", file.to_str().unwrap()], None));
    let out = up.dir.path().join("out.bin");
    ok(&up.shoal(2, &["get", "big", "-o", out.to_str().unwrap()], None));
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // A get that waits for an object sealed later on another node completes.
    let gets = up.counter(1, "shoal_requests_total{op=\"get\"");
    let reader = std::thread::spawn({
        let sock = up.socket(1);
        move || {
            let c = Client::connect(sock).unwrap();
            c.get("later", Duration::from_secs(10)).map(|v| v.to_vec())
        }
    });
    // The put comes once node 2 has the get (a counter it bumps as it takes the request).
    wait_until("node 2 to take the get", Duration::from_secs(10), || {
        (up.counter(1, "shoal_requests_total{op=\"get\"") > gets).then_some(())
    });
    ok(&up.shoal(0, &["put", "later", "-"], Some(b"sealed later")));
    assert_eq!(reader.join().unwrap().unwrap(), b"sealed later");
    // Status lists the nodes with their health.
    let s = String::from_utf8(ok(&up.shoal(2, &["status"], None))).unwrap();
    assert!(s.contains("node-1") && s.contains("node-3"), "{s}");

    // Node 2 holds an object alone; node 3 holds a replica of `big`.
    ok(&up.shoal(1, &["put", "only-on-2", "-"], Some(b"doomed")));
    // Let its registration reach the directory owners (asynchronous, milliseconds). This
    // pause must stay: no call shows an owner's directory, and reading the object from
    // another node to find out would put a second copy there, which this test must not have.
    std::thread::sleep(Duration::from_millis(200));
    let c3 = Client::connect(up.socket(2)).unwrap();
    let before = c3.status().unwrap();
    up.kill_node(1);
    let t = Instant::now();
    let e = wait_until("ObjectLost", TTL + Duration::from_secs(4), || {
        match c3.get("only-on-2", Duration::ZERO) {
            Err(e) if e.code() == ErrorCode::ObjectLost => Some(e),
            Err(e) => {
                assert!(
                    matches!(e.code(), ErrorCode::Unavailable | ErrorCode::Timeout),
                    "{e}"
                );
                None
            }
            Ok(_) => panic!("read an object whose only copy is gone"),
        }
    });
    assert!(
        t.elapsed() <= TTL + Duration::from_secs(2),
        "ObjectLost took {:?}: {e}",
        t.elapsed()
    );
    // Everything else keeps working: the replicated object on both survivors, new puts.
    assert_eq!(&c3.get("big", Duration::ZERO).unwrap()[..], &data[..]);
    let c1 = Client::connect(up.socket(0)).unwrap();
    assert_eq!(
        &c1.get("later", Duration::ZERO).unwrap()[..],
        b"sealed later"
    );
    c1.put("after-loss", b"still fine").unwrap();
    assert_eq!(
        &c3.get("after-loss", Duration::from_secs(5)).unwrap()[..],
        b"still fine"
    );
    let after = c3.status().unwrap();
    assert_eq!(after.members.len(), 2);
    assert!(after.used_bytes >= before.used_bytes);
}

#[test]
fn three_nodes_put_get_and_lose_one() {
    let up = Up::start(3, &[]);
    cluster_put_get_and_node_loss(&up);
}

#[test]
fn delete_removes_every_copy_and_the_reader_arena_does_not_leak() {
    let up = Up::start(2, &[]);
    up.wait_members(1, 2);
    let (c1, c2) = (
        Client::connect(up.socket(0)).unwrap(),
        Client::connect(up.socket(1)).unwrap(),
    );
    let empty = c2.status().unwrap().used_bytes;
    c1.put("x", &payload(100_000)).unwrap();
    assert_eq!(c2.get("x", SETTLE).unwrap().len(), 100_000);
    assert!(c2.status().unwrap().used_bytes > empty);
    c1.delete("x").unwrap();
    wait_until("the replica to be dropped", Duration::from_secs(5), || {
        (c2.status().unwrap().used_bytes == empty).then_some(())
    });
    let e = c2.get("x", Duration::ZERO).unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotFound, "{e}");
    // Deleting an id sealed only on the other node works too.
    c1.put("y", b"y").unwrap();
    assert_eq!(&c2.get("y", SETTLE).unwrap()[..], b"y");
    c2.delete("y").unwrap();
    assert_eq!(
        c1.get("y", Duration::ZERO).unwrap_err().code(),
        ErrorCode::NotFound
    );
}

#[test]
fn holder_killed_mid_transfer_leaks_nothing_on_the_reader() {
    let up = Up::start(2, &[]);
    up.wait_members(1, 2);
    let (c1, c2) = (
        Client::connect(up.socket(0)).unwrap(),
        Client::connect(up.socket(1)).unwrap(),
    );
    let empty = c2.status().unwrap().used_bytes;
    let mut b = c1.create("huge", 256 << 20).unwrap();
    b.as_mut_slice().fill(9);
    c1.seal(b).unwrap();
    let sock = up.socket(1);
    let reader = std::thread::spawn(move || {
        let c = Client::connect(sock).unwrap();
        c.get("huge", SETTLE).map(|v| v.len())
    });
    // Kill the holder once the pull has begun: the reader has its buffer, or is done.
    wait_until("the pull to begin", Duration::from_secs(10), || {
        (reader.is_finished() || c2.status().unwrap().used_bytes > empty).then_some(())
    });
    up.kill_node(0);
    match reader.join().unwrap() {
        Ok(n) => assert_eq!(n, 256 << 20, "a pull that finished is whole"),
        Err(e) => assert!(
            matches!(
                e.code(),
                ErrorCode::ObjectLost | ErrorCode::Unavailable | ErrorCode::Timeout
            ),
            "{e}"
        ),
    }
    // No half-written object is visible, and the partial buffer went back to the arena.
    let listed = c2.list("", 10).unwrap();
    assert!(listed.iter().all(|e| e.sealed), "{listed:?}");
    let mut last = None;
    let done = poll_until(Instant::now() + Duration::from_secs(5), || {
        let s = c2.status().unwrap();
        let complete = c2.contains("huge").unwrap();
        let freed = s.used_bytes == empty;
        last = Some(s);
        (complete || freed).then_some(())
    });
    assert!(done.is_some(), "partial buffer leaked: {last:?}");
}

#[test]
fn control_down_keeps_the_data_path() {
    let up = Up::start(2, &[]);
    up.wait_members(1, 2);
    let (c1, c2) = (
        Client::connect(up.socket(0)).unwrap(),
        Client::connect(up.socket(1)).unwrap(),
    );
    c1.put("before", b"replicated").unwrap();
    assert_eq!(&c2.get("before", SETTLE).unwrap()[..], b"replicated");
    kill(up.info().control.pid);
    // Longer than a lease: the nodes keep their last view instead of dropping each other.
    // This pause must stay: what is tested is that nothing happens during it.
    std::thread::sleep(TTL + Duration::from_secs(1));
    c1.put("local", b"put while control is down").unwrap();
    assert_eq!(
        &c1.get("local", Duration::ZERO).unwrap()[..],
        b"put while control is down"
    );
    assert_eq!(
        &c2.get("before", Duration::ZERO).unwrap()[..],
        b"replicated"
    );
    // Node-to-node transfer does not need control either.
    assert_eq!(
        &c2.get("local", SETTLE).unwrap()[..],
        b"put while control is down"
    );
}

#[test]
fn a_corrupt_metadata_file_stops_control_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("meta.db"),
        b"this is not a shoal metadata file",
    )
    .unwrap();
    let o = Command::new(SHOAL)
        .args([
            "control",
            "--listen",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("meta.db"), "{err}");
}

/// The metadata API is mutual TLS only: without control's certificate, control refuses to
/// serve it (and says how to give one); with `--listen off` it needs none.
#[test]
fn control_refuses_the_metadata_api_without_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(SHOAL)
        .args([
            "control",
            "--listen",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("SHOAL_TLS_DIR")
        .env_remove("SHOAL_CONTROL_CERT")
        .env_remove("SHOAL_CONTROL_KEY")
        .env_remove("SHOAL_CA_CERT")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("mutual TLS") && err.contains("--tls-dir"),
        "{err}"
    );

    // A node certificate is not control's: refused at start, naming the file.
    let tls = dir.path().join("tls");
    let o = Command::new(SHOAL)
        .args(["ca", "init", "--nodes", "node-1", "--dir"])
        .arg(&tls)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(SHOAL)
        .args([
            "control",
            "--listen",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--tls-dir")
        .arg(&tls)
        .arg("--control-cert")
        .arg(tls.join("node-1.pem"))
        .arg("--control-key")
        .arg(tls.join("node-1.key"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("node-1.pem"), "{err}");
}

#[test]
fn etcd_cluster_put_get_and_lose_one() {
    let Some(etcd) = Etcd::start() else {
        panic!("etcd is not installed: scripts/test.sh installs etcd-server");
    };
    if !cfg!(feature = "etcd") {
        // The binary was built without etcd support; the test script builds with it.
        let o = Command::new(SHOAL)
            .args(["up", "--nodes", "2", "--etcd", &etcd.url])
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("etcd"));
        return;
    }
    let up = Up::start(3, &["--etcd", &etcd.url]);
    cluster_put_get_and_node_loss(&up);
}

/// A real etcd on free loopback ports with its data in a temporary directory.
struct Etcd {
    _proc: shoal_devcluster::Proc,
    url: String,
    _dir: tempfile::TempDir,
}

impl Etcd {
    fn start() -> Option<Etcd> {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (client, peer) = (free(), free());
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--name", "default", "--listen-client-urls", &url])
            .args([
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer_url,
            ])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let e = Etcd {
            _proc: shoal_devcluster::Proc::adopt("etcd", child),
            url,
            _dir: dir,
        };
        wait_until("etcd to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", client)).ok()
        });
        Some(e)
    }
}

/// Runs one future of the control client (the tests here are synchronous).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A client of the control at `addr` (`host:port`) with the token in `token_file`.
fn control_client(addr: &str, token_file: &std::path::Path) -> ControlClient {
    let token = shoal_control_client::read_token_file(token_file).unwrap();
    ControlClient::new(addr)
        .unwrap()
        .with_token(&token)
        .unwrap()
}

/// A `shoal control` of its own on etcd (beside the one `up` starts), keeping the operator
/// token in `token_file` (the leader writes it; a standby finds it there).
#[cfg(feature = "etcd")]
struct ControlProc {
    proc: shoal_devcluster::Proc,
    http: String,
    token_file: std::path::PathBuf,
}

#[cfg(feature = "etcd")]
impl ControlProc {
    fn start(etcd: &str, name: &str, token_file: &std::path::Path) -> ControlProc {
        let mut cmd = Command::new(SHOAL);
        cmd.args(["control", "--listen", "off", "--http-addr", "127.0.0.1:0"])
            .args(["--etcd", etcd, "--election-ttl", "2s", "--name", name])
            .arg("--admin-token-file")
            .arg(token_file)
            .args(["--ready-json", "--exit-with-parent"])
            .env("SHOAL_LOG", "warn");
        let (proc, ready) = shoal_devcluster::Proc::spawn_ready::<shoal_devcluster::ControlReady>(
            format!("control {name}"),
            &mut cmd,
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        ControlProc {
            proc,
            http: ready.http.to_string(),
            token_file: token_file.to_path_buf(),
        }
    }

    fn client(&self) -> ControlClient {
        control_client(&self.http, &self.token_file)
    }

    fn role(&self) -> Option<shoal_control_client::ControlRole> {
        block_on(self.client().leader()).ok().map(|l| l.role)
    }
}

#[test]
#[cfg(feature = "etcd")]
fn control_leader_failover_on_etcd() {
    let etcd = Etcd::start().expect("etcd is not installed: scripts/test.sh installs etcd-server");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    let a = ControlProc::start(&etcd.url, "a", &token_file);
    let b = ControlProc::start(&etcd.url, "b", &token_file);
    use shoal_control_client::ControlRole::{Leader, Standby};
    let a_leads = wait_until("a single leader", Duration::from_secs(10), || {
        match (a.role(), b.role()) {
            (Some(Leader), Some(Standby)) => Some(true),
            (Some(Standby), Some(Leader)) => Some(false),
            _ => None,
        }
    });
    let (leader, standby) = if a_leads { (a, b) } else { (b, a) };
    // The standby answers and names the leader.
    let v = block_on(standby.client().nodes()).unwrap();
    assert_eq!(v.role, shoal_control_client::ControlRole::Standby);
    assert!(v.leader.is_some(), "{v:?}");
    let mut leader = leader;
    leader.proc.kill();
    wait_until(
        "the standby to take over within the lease TTL + 2 s",
        TTL + Duration::from_secs(2),
        || (standby.role() == Some(Leader)).then_some(()),
    );
}

#[test]
fn functions_through_the_rest_api() {
    let up = Up::start(2, &[]);
    let code = up.dir.path().join("echo-pkg");
    std::fs::create_dir_all(&code).unwrap();
    let fn_cmd = |args: &[&str]| up.shoal_fn(args, None);
    let deployed = String::from_utf8(ok(&fn_cmd(&[
        "deploy",
        "echo",
        "--path",
        code.to_str().unwrap(),
        "--min",
        "1",
        "--",
        "./echo",
    ])))
    .unwrap();
    assert!(deployed.contains("version 1"), "{deployed}");
    // Deploying again updates it.
    let again = String::from_utf8(ok(&fn_cmd(&[
        "deploy",
        "echo",
        "--path",
        code.to_str().unwrap(),
        "--",
        "./echo",
        "--loud",
    ])))
    .unwrap();
    assert!(again.contains("version 2"), "{again}");
    let ls = String::from_utf8(ok(&fn_cmd(&["ls"]))).unwrap();
    assert!(ls.contains("echo"), "{ls}");
    // Errors are one clear line with the stable code.
    let o = fn_cmd(&["invoke", "nope", "hello"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: NotFound"), "{err}");
    // A bad name is refused before anything is sent, with the rule it breaks.
    let o = fn_cmd(&["deploy", "Bad_Name", "--path", "/tmp", "--", "x"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("function name may hold only a-z"), "{err}");
    ok(&fn_cmd(&["rm", "echo"]));
    let ls = String::from_utf8(ok(&fn_cmd(&["ls"]))).unwrap();
    assert!(!ls.contains("echo "), "{ls}");
}

#[test]
fn a_call_through_the_nodes_proxy() {
    let up = Up::start(2, &[]);
    let proxy = up.proxy(0);
    // A function instance on node 1, served with the SDK.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Its credential, issued on the cluster's store as an agent would.
    let meta = up.info().control.meta.unwrap();
    let token = rt
        .block_on(async {
            let tls = shoal_pki::NodeTls::load(&shoal_pki::TlsFiles::in_dir(
                &up.dir.path().join("tls"),
                "node-1",
            ))
            .unwrap();
            let store = shoal_meta::RemoteStore::connect(meta, &tls).unwrap();
            let binding = shoal_meta::records::InstanceBinding {
                function: "echo".into(),
                instance: "echo-1".into(),
            };
            shoal_meta::issue_instance_token(&store, shoal_meta::records::DEFAULT_TENANT, binding)
                .await
        })
        .unwrap()
        .token;
    // Without it (or with it under another name) the proxy refuses the registration.
    let forged = rt.block_on(shoal_sdk::FunctionInstance::register(
        &proxy,
        "echo",
        "echo-2",
        4,
        Some(&token),
    ));
    assert_eq!(
        forged.unwrap_err().code(),
        shoal_sdk::ErrorCode::PermissionDenied
    );
    let instance = rt
        .block_on(shoal_sdk::FunctionInstance::register(
            &proxy,
            "echo",
            "echo-1",
            4,
            Some(&token),
        ))
        .unwrap();
    rt.spawn(instance.run(|arg: Vec<u8>| async move { Ok(arg) }));
    let o = Command::new(SHOAL)
        .args(["fn", "invoke", "echo", "hello", "--proxy", &proxy])
        .output()
        .unwrap();
    assert_eq!(ok(&o), b"hello");
    let o = Command::new(SHOAL)
        .args(["fn", "invoke", "nope", "x", "--proxy", &proxy])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: NotFound"));
}

/// [`wait_for`], panicking with what it waited for on timeout.
fn wait_until<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    wait_for(what, timeout, check).unwrap_or_else(|e| panic!("{e}"))
}

/// Calls `echo` through a proxy in a loop on its own thread, one call at a time, counting
/// the answers and keeping every failure.
struct CallLoop {
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl CallLoop {
    fn start(proxy: &str, arg: &'static [u8]) -> CallLoop {
        use std::sync::atomic::Ordering;
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st, proxy) = (served.clone(), stop.clone(), proxy.to_string());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let c = rt.block_on(shoal_sdk::CallClient::connect(&proxy)).unwrap();
            let mut failed = Vec::new();
            while !st.load(Ordering::Relaxed) {
                match rt.block_on(c.invoke("echo", arg, Duration::from_secs(5))) {
                    Ok(v) if v == arg => {
                        s.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed.push(format!("{other:?}")),
                }
            }
            failed
        });
        CallLoop {
            served,
            stop,
            thread,
        }
    }

    fn served(&self) -> u64 {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `n` more calls have been answered.
    fn wait_more(&self, n: u64) {
        let target = self.served() + n;
        wait_until(
            &format!("{n} more calls answered"),
            Duration::from_secs(20),
            || (self.served() >= target).then_some(()),
        );
    }

    /// Stops; the calls answered and the failures.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let served = self.served.clone();
        let failed = self.thread.join().unwrap();
        (served.load(std::sync::atomic::Ordering::Relaxed), failed)
    }
}

/// An example of the cli crate (cli/examples), built with the tests.
fn example(name: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(SHOAL)
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(p.exists(), "{} is not built", p.display());
    p
}

/// GET `path` on `addr` (HTTP/1.0): the body as text.
fn http_get_text(addr: &str, path: &str) -> String {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: shoal\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// SIGKILL.
fn kill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// `shoal fn` commands against a cluster started by `up`.
impl Up {
    fn shoal_fn(&self, args: &[&str], proxy: Option<&str>) -> Output {
        let mut c = Command::new(SHOAL);
        c.arg("fn")
            .args(args)
            .env("SHOAL_CONTROL", self.info().env.control.to_string())
            .env("SHOAL_TOKEN_FILE", self.token_file());
        if let Some(p) = proxy {
            c.env("SHOAL_PROXY_SOCKET", p);
        }
        c.output().unwrap()
    }

    /// Deploys the echo example with one instance.
    fn deploy_echo(&self) {
        self.deploy_example("echo");
    }

    /// Deploys example `name` as function `name` with one instance.
    fn deploy_example(&self, name: &str) {
        let pkg = self.dir.path().join(format!("{name}-pkg"));
        std::fs::create_dir_all(&pkg).unwrap();
        std::fs::copy(example(name), pkg.join(name)).unwrap();
        let path = pkg.to_str().unwrap();
        let cmd = format!("./{name}");
        let args = ["deploy", name, "--path", path, "--min", "1", "--", &cmd];
        ok(&self.shoal_fn(&args, None));
    }

    /// The instances `shoal fn ls --json` lists (`None` when it fails).
    fn instances(&self) -> Option<Vec<InstanceRecord>> {
        #[derive(serde::Deserialize)]
        struct FnLs {
            instances: Vec<InstanceRecord>,
        }
        let o = self.shoal_fn(&["ls", "--json"], None);
        if !o.status.success() {
            return None;
        }
        let ls: FnLs = serde_json::from_slice(&o.stdout).unwrap();
        Some(ls.instances)
    }

    /// Waits for a running instance (not on node `not_on`); its record.
    fn running_instance(&self, deadline: Instant, not_on: Option<&str>) -> InstanceRecord {
        let timeout = deadline.saturating_duration_since(Instant::now());
        wait_until("a running instance", timeout, || {
            self.instances()?
                .into_iter()
                .find(|i| i.state == InstancePhase::Running && Some(i.node.as_str()) != not_on)
        })
    }

    /// Index of node `id` in `up`'s answer.
    fn node_index(&self, id: &str) -> usize {
        self.info().node_index(id).unwrap()
    }

    fn proxy(&self, node: usize) -> String {
        self.node(node).proxy_socket.display().to_string()
    }

    /// Calls echo through `proxy` until it answers (the instance may still be connecting).
    fn invoke_echo(&self, proxy: &str, arg: &str) -> Vec<u8> {
        let mut last = String::new();
        poll_until(Instant::now() + Duration::from_secs(20), || {
            let o = self.shoal_fn(&["invoke", "echo", arg], Some(proxy));
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            o.status.success().then_some(o.stdout)
        })
        .unwrap_or_else(|| panic!("echo never answered: {last}"))
    }
}

#[test]
fn deploy_place_start_invoke_and_recover() {
    let up = Up::start(2, &[]);
    up.deploy_echo();
    // Placed on a node, started by that node's agent, registered with that node's proxy.
    let inst = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let proxy = up.proxy(up.node_index(&inst.node));
    assert_eq!(up.invoke_echo(&proxy, "hello"), b"hello");
    // `shoal status` lists the instance under its node.
    let status = String::from_utf8(ok(&up.shoal(0, &["status"], None))).unwrap();
    let line = status
        .lines()
        .find(|l| l.contains(&inst.id))
        .unwrap_or_else(|| panic!("instance missing from status:\n{status}"));
    assert!(line.starts_with(&inst.node), "{line}");
    assert!(line.contains("running"), "{line}");
    // `shoal fn logs` reads the instance's logs from its agent.
    let logs = String::from_utf8(ok(&up.shoal_fn(&["logs", "echo"], None))).unwrap();
    assert!(logs.contains(&format!("==> {} on ", &inst.id)), "{logs}");
    assert!(!logs.contains("unavailable"), "{logs}");
    // The proxy counts the calls it answered.
    let metrics = up
        .node(up.node_index(&inst.node))
        .proxy_metrics
        .trim_start_matches("http://")
        .to_string();
    let (addr, path) = metrics.split_once('/').unwrap();
    let text = http_get_text(addr, &format!("/{path}"));
    assert!(
        text.contains("shoal_proxy_calls_total{outcome=\"ok\"}"),
        "{text}"
    );
    // Kill the instance's process: the agent restarts it and calls work again.
    kill(inst.pid.unwrap());
    assert_eq!(up.invoke_echo(&proxy, "hello"), b"hello");
    ok(&up.shoal_fn(&["rm", "echo"], None));
}

#[test]
fn warm_calls_survive_control_and_lost_nodes_are_replaced() {
    let up = Up::start(2, &[]);
    up.deploy_echo();
    let inst = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let node = inst.node.clone();
    let idx = up.node_index(&node);
    assert_eq!(up.invoke_echo(&up.proxy(idx), "warm"), b"warm");

    // The node's agent dies (with it, the node's ability to run instances): after its lease
    // and the placement grace, the instance is placed and started on the other node.
    kill(up.node(idx).agent_pid);
    let killed = Instant::now();
    let other = up.running_instance(killed + TTL + Duration::from_secs(10), Some(&node));
    let other = other.node.as_str();
    assert_ne!(other, node);
    assert!(
        killed.elapsed() <= TTL + Duration::from_secs(5),
        "replaced on {other} only after {:?}",
        killed.elapsed()
    );
    let other_proxy = up.proxy(up.node_index(other));
    assert_eq!(up.invoke_echo(&other_proxy, "warm"), b"warm");

    // Control goes away: warm calls keep flowing (the call path never asks it).
    kill(up.info().control.pid);
    for _ in 0..5 {
        assert_eq!(up.invoke_echo(&other_proxy, "warm"), b"warm");
    }
}

#[test]
fn calls_cross_nodes_and_a_killed_node_is_replaced() {
    let up = Up::start(2, &[]);
    up.deploy_echo();
    let inst = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let node = inst.node.clone();
    let idx = up.node_index(&node);
    let other_idx = 1 - idx;
    // Through the other node's proxy: forwarded over mTLS to the instance's node.
    assert_eq!(up.invoke_echo(&up.proxy(other_idx), "hello"), b"hello");
    assert_eq!(up.invoke_echo(&up.proxy(idx), "local"), b"local");

    // The whole node dies at once (dataworker, proxy, agent and the instance).
    let n = up.node(idx);
    for pid in [n.agent_pid, n.proxy_pid, n.pid] {
        kill(pid);
    }
    kill(inst.pid.unwrap());
    let killed = Instant::now();
    let replaced = up.running_instance(killed + TTL + Duration::from_secs(10), Some(&node));
    assert!(
        killed.elapsed() <= TTL + Duration::from_secs(5),
        "replaced only after {:?}",
        killed.elapsed()
    );
    assert_eq!(replaced.node, up.node(other_idx).id);
    assert_eq!(up.invoke_echo(&up.proxy(other_idx), "again"), b"again");
}

#[test]
fn rest_frontend_and_large_payloads_as_objects() {
    let up = Up::start(2, &[]);
    up.deploy_echo();
    let inst = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let idx = up.node_index(&inst.node);
    let control = up.control();
    // The REST frontend calls through node 1's proxy (forwarded when the instance is on
    // node 2).
    let client = control_client(&control, &up.token_file());
    let invoke = |name: &str, arg: &[u8], timeout: Option<Duration>| {
        block_on(client.invoke(name, arg.to_vec(), timeout))
    };
    let body = wait_until("REST invoke answers", Duration::from_secs(20), || {
        invoke("echo", b"hello", None).ok()
    });
    assert_eq!(&body[..], b"hello");
    let err = invoke("nope", b"x", None).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    let err = invoke("echo", b"x", Some(Duration::ZERO)).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");

    // 1 MiB: over the 64 KiB inline limit, so argument and result travel as objects.
    let big: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let body = invoke("echo", &big, None).unwrap();
    assert!(body == big, "REST: 1 MiB echoed back changed");
    let file = up.dir.path().join("big.bin");
    std::fs::write(&file, &big).unwrap();
    let arg = format!("@{}", file.display());
    let o = Command::new(SHOAL)
        .args(["fn", "invoke", "echo", &arg])
        .env("SHOAL_PROXY_SOCKET", up.proxy(idx))
        .env("SHOAL_DATAWORKER_SOCKET", up.socket(idx))
        .output()
        .unwrap();
    assert!(ok(&o) == big, "proxy: 1 MiB echoed back changed");
    // Without a dataworker, a large argument is refused with a clear code.
    let o = Command::new(SHOAL)
        .args(["fn", "invoke", "echo", &arg])
        .env("SHOAL_PROXY_SOCKET", up.proxy(idx))
        .env_remove("SHOAL_DATAWORKER_SOCKET")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("error: TooLarge"));

    // Word count over an object put on the other node: the instance reads it in place.
    up.deploy_example("wordcount");
    let words = "the quick brown fox jumps over the lazy dog\n".repeat(100_000);
    let other = 1 - idx;
    ok(&up.shoal(other, &["put", "corpus", "-"], Some(words.as_bytes())));
    let counted = wait_until("wordcount answers", Duration::from_secs(20), || {
        let o = Command::new(SHOAL)
            .args(["fn", "invoke", "wordcount", "--object", "corpus"])
            .env("SHOAL_PROXY_SOCKET", up.proxy(other))
            .output()
            .unwrap();
        o.status.success().then_some(o.stdout)
    });
    assert_eq!(counted, b"900000");
}

#[test]
#[cfg(feature = "etcd")]
fn warm_calls_flow_through_a_leader_failover_on_etcd() {
    let etcd = Etcd::start().expect("etcd is not installed: scripts/test.sh installs etcd-server");
    let up = Up::start(2, &["--etcd", &etcd.url]);
    let standby = ControlProc::start(&etcd.url, "standby", &up.token_file());
    wait_until(
        "the second control stands by",
        Duration::from_secs(10),
        || (standby.role() == Some(shoal_control_client::ControlRole::Standby)).then_some(()),
    );
    up.deploy_echo();
    let inst = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let node = up.node_index(&inst.node);
    // Calls through the other node's proxy: forwarded, so the route table is exercised too.
    let proxy = up.proxy(1 - node);
    assert_eq!(up.invoke_echo(&proxy, "warm"), b"warm");

    let calls = CallLoop::start(&proxy, b"in flight");
    calls.wait_more(20);
    // The leader (up's control) dies; the standby takes over while calls keep flowing.
    kill(up.info().control.pid);
    wait_until("the standby takes over", Duration::from_secs(10), || {
        (standby.role() == Some(shoal_control_client::ControlRole::Leader)).then_some(())
    });
    calls.wait_more(20);
    let (served, failed) = calls.finish();
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(served > 50, "only {served} calls in the failover window");

    // The new leader places: a second function deployed through it runs.
    let pkg = up.dir.path().join("echo-pkg");
    let o = Command::new(SHOAL)
        .args([
            "fn",
            "deploy",
            "echo2",
            "--path",
            pkg.to_str().unwrap(),
            "--min",
            "1",
            "--",
            "./echo",
        ])
        .env("SHOAL_CONTROL", &standby.http)
        .env("SHOAL_TOKEN_FILE", up.token_file())
        .output()
        .unwrap();
    ok(&o);
    wait_until(
        "echo2 runs under the new leader",
        Duration::from_secs(20),
        || {
            block_on(standby.client().instances(Some("echo2")))
                .ok()?
                .iter()
                .any(|i| i.state == shoal_meta::records::InstancePhase::Running)
                .then_some(())
        },
    );
}

#[test]
fn placement_follows_selectors_affinity_and_pools() {
    let up = Up::start(2, &[]);
    let pkg = up.dir.path().join("pinned-pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::copy(example("echo"), pkg.join("echo")).unwrap();
    let deploy = |name: &str, extra: &[&str]| {
        let mut args = vec!["deploy", name, "--path", pkg.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "./echo"]);
        ok(&up.shoal_fn(&args, None));
    };
    let instances = |name: &str| -> Vec<InstanceRecord> {
        let all = up.instances().expect("shoal fn ls --json");
        all.into_iter().filter(|i| i.function == name).collect()
    };
    let running_on = |name: &str| -> String {
        wait_until(&format!("{name} runs"), Duration::from_secs(20), || {
            let i = instances(name)
                .into_iter()
                .find(|i| i.state == InstancePhase::Running)?;
            Some(i.node)
        })
    };
    // A node selector pins echo to node-2 (`up` labels every node `node=ID`).
    deploy("echo", &["--min", "1", "--node-selector", "node=node-2"]);
    assert_eq!(running_on("echo"), "node-2");
    // Anti-affinity keeps echo-b off echo's node.
    deploy("echo-b", &["--min", "1", "--anti-affinity", "echo"]);
    assert_eq!(running_on("echo-b"), "node-1");
    ok(&up.shoal_fn(&["rm", "echo-b"], None));

    // A pool over node-1 with room for one 600-millicore instance: of two wanted, one runs,
    // on node-1.
    let control = &up.control();
    let pool: Pool = serde_json::from_str(
        r#"{"name":"p","node_selector":{"node":"node-1"},"cpu_milli":1000,"mem_mib":1024}"#,
    )
    .unwrap();
    block_on(control_client(control, &up.token_file()).create_pool(&pool)).unwrap();
    deploy(
        "echo-p",
        &[
            "--min",
            "2",
            "--max",
            "2",
            "--pool",
            "p",
            "--cpu-milli",
            "600",
            "--mem-mib",
            "64",
        ],
    );
    assert_eq!(running_on("echo-p"), "node-1");
    // A second instance is never placed: nothing marks "it did not happen", so give the
    // leader two placement passes (it also runs one on every change) to get it wrong.
    std::thread::sleep(2 * shoal_control::PLACEMENT_INTERVAL);
    let placed = instances("echo-p");
    assert_eq!(
        placed.len(),
        1,
        "the pool's capacity was exceeded: {placed:?}"
    );
}

#[test]
fn an_update_rolls_the_instances_without_dropping_calls() {
    let up = Up::start(2, &[]);
    up.deploy_echo();
    let first = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let proxy = up.proxy(0);
    assert_eq!(up.invoke_echo(&proxy, "v1"), b"v1");
    let calls = CallLoop::start(&proxy, b"rolling");
    // Version 2 (a new environment): a new instance starts, then the old one goes.
    let pkg = up.dir.path().join("echo-pkg");
    let args = [
        "deploy",
        "echo",
        "--path",
        pkg.to_str().unwrap(),
        "--min",
        "1",
        "--env",
        "V=2",
        "--",
        "./echo",
    ];
    ok(&up.shoal_fn(&args, None));
    wait_until(
        "the instance rolled to version 2",
        Duration::from_secs(30),
        || {
            let insts = up.instances().expect("shoal fn ls --json");
            (insts.len() == 1
                && insts[0].function_version == Some(2)
                && insts[0].state == InstancePhase::Running
                && insts[0].id != first.id)
                .then_some(())
        },
    );
    // Calls keep being answered by the new instance.
    calls.wait_more(10);
    let (served, failed) = calls.finish();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed during the roll: {:?}",
        failed.len(),
        served + failed.len() as u64,
        &failed[..failed.len().min(3)]
    );
    assert!(served > 10, "only {served} calls");
}

/// A tenant's own function, deployed and invoked through control's REST API with the tenant's
/// token: control's frontend calls it in that tenant (its proxy connection and payload
/// objects live there), and another tenant's token cannot reach it.
#[test]
fn a_tenant_deploys_and_invokes_its_own_function_over_rest() {
    let up = Up::start(1, &[]);
    let token_for = |tenant: &str| {
        let o = up.shoal(
            0,
            &["token", "create", "--role", "admin", "--tenant", tenant],
            None,
        );
        let out = String::from_utf8(ok(&o)).unwrap();
        out.split_whitespace()
            .find(|w| w.starts_with("shoal_"))
            .unwrap_or_else(|| panic!("no token in {out:?}"))
            .to_string()
    };
    let team_b = token_for("team-b");
    let team_c = token_for("team-c");
    let as_tenant = |token: &str, args: &[&str]| {
        Command::new(SHOAL)
            .arg("fn")
            .args(args)
            .env("SHOAL_CONTROL", up.info().env.control.to_string())
            .env("SHOAL_TOKEN", token)
            .output()
            .unwrap()
    };
    let pkg = up.dir.path().join("echo-b-pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::copy(example("echo"), pkg.join("echo")).unwrap();
    let path = pkg.to_str().unwrap();
    ok(&as_tenant(
        &team_b,
        &[
            "deploy", "echo-b", "--path", path, "--min", "1", "--", "./echo",
        ],
    ));
    let answer = poll_until(Instant::now() + Duration::from_secs(30), || {
        let o = as_tenant(&team_b, &["invoke", "echo-b", "hello"]);
        o.status.success().then_some(o.stdout)
    });
    assert_eq!(
        answer.as_deref(),
        Some(&b"hello"[..]),
        "echo-b never answered its tenant"
    );
    let other = as_tenant(&team_c, &["invoke", "echo-b", "hello"]);
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("NotFound"), "{err}");
}
