//! A real cluster on this machine: `shoal up --nodes 3` (control + three dataworker processes),
//! driven through the CLI and the SDK as a user would, including killing a node.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use shoal_control_client::{ControlClient, Pool};
use shoal_sdk::blocking::Client;
use shoal_sdk::ErrorCode;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");
const TTL: Duration = Duration::from_secs(2);
/// Registration with the directory owners is asynchronous (it lands within milliseconds of
/// a seal): a get right after a put on another node gives it this long.
const SETTLE: Duration = Duration::from_secs(5);

struct Up {
    child: Child,
    info: serde_json::Value,
    dir: tempfile::TempDir,
}

impl Up {
    fn start(nodes: u32, extra: &[&str]) -> Up {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(SHOAL)
            .args(["up", "--json", "--shm-size", "512MiB", "--lease-ttl", "2s"])
            .args(["--nodes", &nodes.to_string()])
            .args(extra)
            .arg("--socket-dir")
            .arg(dir.path())
            .env("SHOAL_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        Up { child, info, dir }
    }

    fn socket(&self, node: usize) -> String {
        self.info["nodes"][node]["dataworker_socket"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn pid(&self, node: usize) -> i32 {
        self.info["nodes"][node]["pid"].as_i64().unwrap() as i32
    }

    fn shoal(&self, node: usize, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_DATAWORKER_SOCKET", self.socket(node))
            .env(
                "SHOAL_CONTROL",
                self.info["control"]["http"].as_str().unwrap(),
            )
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
        kill(i64::from(self.pid(node)));
    }

    /// Waits until node `node` sees `n` members.
    fn wait_members(&self, node: usize, n: usize) {
        let c = Client::connect(self.socket(node)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.status().unwrap().members.len() != n {
            assert!(Instant::now() < deadline, "cluster never had {n} members");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
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
    let reader = std::thread::spawn({
        let sock = up.socket(1);
        move || {
            let c = Client::connect(sock).unwrap();
            c.get("later", Duration::from_secs(10)).map(|v| v.to_vec())
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    ok(&up.shoal(0, &["put", "later", "-"], Some(b"sealed later")));
    assert_eq!(reader.join().unwrap().unwrap(), b"sealed later");
    // Status lists the nodes with their health.
    let s = String::from_utf8(ok(&up.shoal(2, &["status"], None))).unwrap();
    assert!(s.contains("node-1") && s.contains("node-3"), "{s}");

    // Node 2 holds an object alone; node 3 holds a replica of `big`.
    ok(&up.shoal(1, &["put", "only-on-2", "-"], Some(b"doomed")));
    // Let its registration reach the directory owners (asynchronous, milliseconds).
    std::thread::sleep(Duration::from_millis(200));
    let c3 = Client::connect(up.socket(2)).unwrap();
    let before = c3.status().unwrap();
    up.kill_node(1);
    let t = Instant::now();
    let e = loop {
        match c3.get("only-on-2", Duration::ZERO) {
            Err(e) if e.code() == ErrorCode::ObjectLost => break e,
            Err(e) => assert!(
                matches!(e.code(), ErrorCode::Unavailable | ErrorCode::Timeout),
                "{e}"
            ),
            Ok(_) => panic!("read an object whose only copy is gone"),
        }
        assert!(t.elapsed() < TTL + Duration::from_secs(4), "no ObjectLost");
        std::thread::sleep(Duration::from_millis(100));
    };
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
    let deadline = Instant::now() + Duration::from_secs(5);
    while c2.status().unwrap().used_bytes != empty {
        assert!(Instant::now() < deadline, "replica not dropped");
        std::thread::sleep(Duration::from_millis(20));
    }
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
    std::thread::sleep(Duration::from_millis(30));
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
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = c2.status().unwrap();
        let complete = c2.contains("huge").unwrap();
        if complete || s.used_bytes == empty {
            break;
        }
        assert!(Instant::now() < deadline, "partial buffer leaked: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
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
    kill(up.info["control"]["pid"].as_i64().unwrap());
    // Longer than a lease: the nodes keep their last view instead of dropping each other.
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
    child: Child,
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
            child,
            url,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(e)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// A client of the control at `addr` (`host:port`).
fn control_client(addr: &str) -> ControlClient {
    ControlClient::new(addr).unwrap()
}

#[cfg(feature = "etcd")]
struct ControlProc {
    child: Child,
    http: String,
}

#[cfg(feature = "etcd")]
impl ControlProc {
    fn start(etcd: &str, name: &str) -> ControlProc {
        let mut child = Command::new(SHOAL)
            .args(["control", "--listen", "off", "--http-addr", "127.0.0.1:0"])
            .args(["--etcd", etcd, "--election-ttl", "2s", "--name", name])
            .args(["--ready-json", "--exit-with-parent"])
            .env("SHOAL_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        ControlProc {
            child,
            http: ready["http"].as_str().unwrap().to_string(),
        }
    }

    fn role(&self) -> Option<shoal_control_client::ControlRole> {
        block_on(control_client(&self.http).leader())
            .ok()
            .map(|l| l.role)
    }
}

#[cfg(feature = "etcd")]
impl Drop for ControlProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[cfg(feature = "etcd")]
fn control_leader_failover_on_etcd() {
    let etcd = Etcd::start().expect("etcd is not installed: scripts/test.sh installs etcd-server");
    let a = ControlProc::start(&etcd.url, "a");
    let b = ControlProc::start(&etcd.url, "b");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (leader, standby) = loop {
        match (a.role(), b.role()) {
            (
                Some(shoal_control_client::ControlRole::Leader),
                Some(shoal_control_client::ControlRole::Standby),
            ) => break (a, b),
            (
                Some(shoal_control_client::ControlRole::Standby),
                Some(shoal_control_client::ControlRole::Leader),
            ) => break (b, a),
            other => assert!(Instant::now() < deadline, "no single leader: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The standby answers and names the leader.
    let v = block_on(control_client(&standby.http).nodes()).unwrap();
    assert_eq!(v.role, shoal_control_client::ControlRole::Standby);
    assert!(v.leader.is_some(), "{v:?}");
    let mut leader = leader;
    leader.child.kill().unwrap();
    let killed = Instant::now();
    while standby.role() != Some(shoal_control_client::ControlRole::Leader) {
        assert!(
            killed.elapsed() < TTL + Duration::from_secs(2),
            "standby did not take over within the lease TTL + 2 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let o = fn_cmd(&["deploy", "Bad_Name", "--path", "/tmp", "--", "x"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("InvalidArgument"));
    ok(&fn_cmd(&["rm", "echo"]));
    let ls = String::from_utf8(ok(&fn_cmd(&["ls"]))).unwrap();
    assert!(!ls.contains("echo "), "{ls}");
}

#[test]
fn a_call_through_the_nodes_proxy() {
    let up = Up::start(2, &[]);
    let proxy = up.info["nodes"][0]["proxy_socket"]
        .as_str()
        .unwrap()
        .to_string();
    // A function instance on node 1, served with the SDK.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let instance = rt
        .block_on(shoal_sdk::FunctionInstance::register(
            &proxy, "echo", "echo-1", 4,
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

/// Polls `check` every 50 ms until it gives a value; `None` after `timeout`.
fn poll_until<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`poll_until`], panicking with `what` on timeout.
fn wait_until<T>(what: &str, timeout: Duration, check: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, check).unwrap_or_else(|| panic!("timed out waiting: {what}"))
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
fn kill(pid: i64) {
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
        c.arg("fn").args(args).env(
            "SHOAL_CONTROL",
            self.info["env"]["SHOAL_CONTROL"].as_str().unwrap(),
        );
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

    /// Waits for a running instance (not on node `not_on`); its record.
    fn running_instance(&self, deadline: Instant, not_on: Option<&str>) -> serde_json::Value {
        let timeout = deadline.saturating_duration_since(Instant::now());
        wait_until("a running instance", timeout, || {
            let o = self.shoal_fn(&["ls", "--json"], None);
            if !o.status.success() {
                return None;
            }
            let ls: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            ls["instances"]
                .as_array()?
                .iter()
                .find(|i| i["state"] == "running" && i["node"].as_str() != not_on)
                .cloned()
        })
    }

    /// Index of node `id` in `up`'s answer.
    fn node_index(&self, id: &str) -> usize {
        (0..self.info["nodes"].as_array().unwrap().len())
            .find(|i| self.info["nodes"][*i]["id"] == id)
            .unwrap()
    }

    fn proxy(&self, node: usize) -> String {
        self.info["nodes"][node]["proxy_socket"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Calls echo through `proxy` until it answers (the instance may still be connecting).
    fn invoke_echo(&self, proxy: &str, arg: &str) -> Vec<u8> {
        let mut last = String::new();
        poll_until(Duration::from_secs(20), || {
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
    let proxy = up.proxy(up.node_index(inst["node"].as_str().unwrap()));
    assert_eq!(up.invoke_echo(&proxy, "hello"), b"hello");
    // `shoal status` lists the instance under its node.
    let status = String::from_utf8(ok(&up.shoal(0, &["status"], None))).unwrap();
    let line = status
        .lines()
        .find(|l| l.contains(inst["id"].as_str().unwrap()))
        .unwrap_or_else(|| panic!("instance missing from status:\n{status}"));
    assert!(line.starts_with(inst["node"].as_str().unwrap()), "{line}");
    assert!(line.contains("running"), "{line}");
    // `shoal fn logs` reads the instance's logs from its agent.
    let logs = String::from_utf8(ok(&up.shoal_fn(&["logs", "echo"], None))).unwrap();
    assert!(
        logs.contains(&format!("==> {} on ", inst["id"].as_str().unwrap())),
        "{logs}"
    );
    assert!(!logs.contains("unavailable"), "{logs}");
    // The proxy counts the calls it answered.
    let metrics = up.info["nodes"][up.node_index(inst["node"].as_str().unwrap())]["proxy_metrics"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_string();
    let (addr, path) = metrics.split_once('/').unwrap();
    let text = http_get_text(addr, &format!("/{path}"));
    assert!(
        text.contains("shoal_proxy_calls_total{outcome=\"ok\"}"),
        "{text}"
    );
    // Kill the instance's process: the agent restarts it and calls work again.
    kill(inst["pid"].as_i64().unwrap());
    assert_eq!(up.invoke_echo(&proxy, "hello"), b"hello");
    ok(&up.shoal_fn(&["rm", "echo"], None));
}

#[test]
fn warm_calls_survive_control_and_lost_nodes_are_replaced() {
    let up = Up::start(2, &[]);
    up.deploy_echo();
    let inst = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let node = inst["node"].as_str().unwrap().to_string();
    let idx = up.node_index(&node);
    assert_eq!(up.invoke_echo(&up.proxy(idx), "warm"), b"warm");

    // The node's agent dies (with it, the node's ability to run instances): after its lease
    // and the placement grace, the instance is placed and started on the other node.
    kill(up.info["nodes"][idx]["agent_pid"].as_i64().unwrap());
    let killed = Instant::now();
    let other = up.running_instance(killed + TTL + Duration::from_secs(10), Some(&node));
    let other = other["node"].as_str().unwrap();
    assert_ne!(other, node);
    assert!(
        killed.elapsed() <= TTL + Duration::from_secs(5),
        "replaced on {other} only after {:?}",
        killed.elapsed()
    );
    let other_proxy = up.proxy(up.node_index(other));
    assert_eq!(up.invoke_echo(&other_proxy, "warm"), b"warm");

    // Control goes away: warm calls keep flowing (the call path never asks it).
    kill(up.info["control"]["pid"].as_i64().unwrap());
    for _ in 0..5 {
        assert_eq!(up.invoke_echo(&other_proxy, "warm"), b"warm");
    }
}

#[test]
fn calls_cross_nodes_and_a_killed_node_is_replaced() {
    let up = Up::start(2, &[]);
    up.deploy_echo();
    let inst = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let node = inst["node"].as_str().unwrap().to_string();
    let idx = up.node_index(&node);
    let other_idx = 1 - idx;
    // Through the other node's proxy: forwarded over mTLS to the instance's node.
    assert_eq!(up.invoke_echo(&up.proxy(other_idx), "hello"), b"hello");
    assert_eq!(up.invoke_echo(&up.proxy(idx), "local"), b"local");

    // The whole node dies at once (dataworker, proxy, agent and the instance).
    let n = &up.info["nodes"][idx];
    for pid in ["agent_pid", "proxy_pid", "pid"] {
        kill(n[pid].as_i64().unwrap());
    }
    kill(inst["pid"].as_i64().unwrap());
    let killed = Instant::now();
    let replaced = up.running_instance(killed + TTL + Duration::from_secs(10), Some(&node));
    assert!(
        killed.elapsed() <= TTL + Duration::from_secs(5),
        "replaced only after {:?}",
        killed.elapsed()
    );
    assert_eq!(
        replaced["node"].as_str().unwrap(),
        up.info["nodes"][other_idx]["id"]
    );
    assert_eq!(up.invoke_echo(&up.proxy(other_idx), "again"), b"again");
}

#[test]
fn rest_frontend_and_large_payloads_as_objects() {
    let up = Up::start(2, &[]);
    up.deploy_echo();
    let inst = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let idx = up.node_index(inst["node"].as_str().unwrap());
    let control = up.info["control"]["http"].as_str().unwrap().to_string();
    // The REST frontend calls through node 1's proxy (forwarded when the instance is on
    // node 2).
    let client = control_client(&control);
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
    let standby = ControlProc::start(&etcd.url, "standby");
    wait_until(
        "the second control stands by",
        Duration::from_secs(10),
        || (standby.role() == Some(shoal_control_client::ControlRole::Standby)).then_some(()),
    );
    up.deploy_echo();
    let inst = up.running_instance(Instant::now() + Duration::from_secs(20), None);
    let node = up.node_index(inst["node"].as_str().unwrap());
    // Calls through the other node's proxy: forwarded, so the route table is exercised too.
    let proxy = up.proxy(1 - node);
    assert_eq!(up.invoke_echo(&proxy, "warm"), b"warm");

    let calls = CallLoop::start(&proxy, b"in flight");
    calls.wait_more(20);
    // The leader (up's control) dies; the standby takes over while calls keep flowing.
    kill(up.info["control"]["pid"].as_i64().unwrap());
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
        .output()
        .unwrap();
    ok(&o);
    wait_until(
        "echo2 runs under the new leader",
        Duration::from_secs(20),
        || {
            block_on(control_client(&standby.http).instances(Some("echo2")))
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
    let instances = |name: &str| -> Vec<serde_json::Value> {
        let o = up.shoal_fn(&["ls", "--json"], None);
        let v: serde_json::Value = serde_json::from_slice(&ok(&o)).unwrap();
        v["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i["function"] == name)
            .collect()
    };
    let running_on = |name: &str| -> String {
        wait_until(&format!("{name} runs"), Duration::from_secs(20), || {
            let i = instances(name)
                .into_iter()
                .find(|i| i["state"] == "running")?;
            Some(i["node"].as_str()?.to_string())
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
    let control = up.info["control"]["http"].as_str().unwrap();
    let pool: Pool = serde_json::from_str(
        r#"{"name":"p","node_selector":{"node":"node-1"},"cpu_milli":1000,"mem_mib":1024}"#,
    )
    .unwrap();
    block_on(control_client(control).create_pool(&pool)).unwrap();
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
            let v: serde_json::Value =
                serde_json::from_slice(&ok(&up.shoal_fn(&["ls", "--json"], None))).unwrap();
            let insts = v["instances"].as_array()?.clone();
            (insts.len() == 1
                && insts[0]["function_version"] == 2
                && insts[0]["state"] == "running"
                && insts[0]["id"] != first["id"])
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
