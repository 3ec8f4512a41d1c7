//! The `shoal` binary as a user drives it: a plain `shoal up` (the whole stack on one node)
//! in one process, client commands in others, with no settings but the runtime directory.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use shoal_devcluster::wait::wait_for;
use shoal_devcluster::{Cluster, RunningUp};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// `shoal up` with its defaults, except that the runtime directory (`$XDG_RUNTIME_DIR/shoal`)
/// is a temporary one and control's HTTP API gets a free port, so tests run side by side.
struct Up {
    up: RunningUp,
    xdg: tempfile::TempDir,
}

impl Up {
    fn start() -> Up {
        let xdg = tempfile::tempdir().unwrap();
        let up = shoal_devcluster::Up::new(SHOAL, xdg.path().join("shoal"))
            .args(["--shm-size", "64MiB"])
            .env("XDG_RUNTIME_DIR", xdg.path())
            .quiet()
            .start()
            .unwrap_or_else(|e| panic!("{e}"));
        Up { up, xdg }
    }

    fn info(&self) -> &Cluster {
        self.up.cluster()
    }

    /// A client command as a user types it after a plain `shoal up`: it finds the socket and
    /// the admin token in the default runtime directory; control's port is the one thing it
    /// is told.
    fn shoal(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.shoal_env(args, stdin, &[])
    }

    /// [`Up::shoal`] with more environment variables.
    fn shoal_env(&self, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(SHOAL)
            .args(args)
            .env("XDG_RUNTIME_DIR", self.xdg.path())
            .env("SHOAL_CONTROL", self.info().control.http.to_string())
            .env_remove("SHOAL_DATAWORKER_SOCKET")
            .env_remove("SHOAL_PROXY_SOCKET")
            .env_remove("SHOAL_TOKEN")
            .env_remove("SHOAL_TOKEN_FILE")
            .envs(env.iter().copied())
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
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// An example of the cli crate (cli/examples), built with the tests.
fn example(name: &str) -> PathBuf {
    let p = Path::new(SHOAL)
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(p.exists(), "{} is not built", p.display());
    p
}

#[test]
fn plain_up_runs_the_whole_stack_for_every_client_command() {
    let up = Up::start();
    let info = up.info().clone();
    let node = &info.nodes[0];
    assert_eq!(info.nodes.len(), 1);
    assert_eq!(node.id, "node-0");
    assert_eq!(
        node.dataworker_socket,
        up.xdg.path().join("shoal/node-0/dataworker.sock"),
        "the socket the client commands look for"
    );
    assert_eq!(info.env.dataworker_socket, node.dataworker_socket);
    assert!(node.pid > 0 && node.proxy_pid > 0 && node.agent_pid > 0);
    assert!(node
        .metrics
        .as_deref()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    assert_eq!(node.arena_bytes, 64 << 20);

    objects_and_kv(&up);
    functions(&up);
    tokens_and_quotas(&up);

    // SIGTERM stops everything cleanly and removes the sockets.
    let pids = [info.control.pid, node.pid, node.proxy_pid, node.agent_pid];
    let Up { up, xdg: _xdg } = up;
    let status = up.stop(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    for pid in pids {
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None);
        assert!(gone.is_err(), "process {pid} outlived shoal up");
    }
    assert!(
        !node.dataworker_socket.exists(),
        "dataworker socket removed"
    );
    assert!(!node.proxy_socket.exists(), "proxy socket removed");
}

/// Objects, KV and status through separate CLI processes.
fn objects_and_kv(up: &Up) {
    // A file round trip, byte-exact.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    ok(&up.shoal(&["put", "file1", input.to_str().unwrap()], None));
    let output = dir.path().join("out.bin");
    ok(&up.shoal(&["get", "file1", "-o", output.to_str().unwrap()], None));
    assert!(std::fs::read(&output).unwrap() == data);
    ok(&up.shoal(&["put", "small", "-"], Some(b"from stdin")));
    assert_eq!(ok(&up.shoal(&["get", "small"], None)), "from stdin");
    let ls = ok(&up.shoal(&["ls"], None));
    assert!(ls.contains("file1") && ls.contains("small"), "{ls}");

    ok(&up.shoal(&["kv", "set", "k", "v1", "--ttl", "60s"], None));
    assert_eq!(ok(&up.shoal(&["kv", "get", "k"], None)), "v1");
    let ttl: i64 = ok(&up.shoal(&["kv", "ttl", "k"], None))
        .trim()
        .parse()
        .unwrap();
    assert!((58..=60).contains(&ttl), "{ttl}");
    let nx = up.shoal(&["kv", "set", "k", "v2", "--nx"], None);
    assert!(!nx.status.success());
    assert_eq!(ok(&up.shoal(&["kv", "del", "k"], None)).trim(), "1");

    // Status as JSON: the node, and the instances from control (none yet).
    let st: serde_json::Value =
        serde_json::from_str(&ok(&up.shoal(&["status", "--json"], None))).unwrap();
    assert_eq!(st["objects"], 2);
    assert_eq!(st["arena_bytes"], 64 << 20);
    assert_eq!(st["instances"], serde_json::json!([]), "{st}");
    assert_eq!(st["quota"]["tenant"], "default", "{st}");

    // Errors: one line, non-zero exit.
    let missing = up.shoal(&["get", "nope"], None);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.starts_with("error: NotFound") && err.trim().lines().count() == 1,
        "{err}"
    );
    let bad = up.shoal(&["put", "", input.to_str().unwrap()], None);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid id"));
    ok(&up.shoal(&["rm", "file1", "small"], None));
    assert!(ok(&up.shoal(&["ls"], None)).trim().is_empty());
}

/// A function deployed, placed on the one node, invoked through control, listed, removed.
fn functions(up: &Up) {
    let pkg = up.xdg.path().join("echo-pkg");
    std::fs::create_dir_all(&pkg).unwrap();
    std::fs::copy(example("echo"), pkg.join("echo")).unwrap();
    let path = pkg.to_str().unwrap();
    let deploy = [
        "fn", "deploy", "echo", "--path", path, "--min", "1", "--", "./echo",
    ];
    let deployed = ok(&up.shoal(&deploy, None));
    assert!(deployed.contains("version 1"), "{deployed}");
    // The first call waits for the agent to start the instance and its proxy to know it.
    let mut last = String::new();
    let answer = wait_for("echo to answer", Duration::from_secs(30), || {
        let o = up.shoal(&["fn", "invoke", "echo", "hello"], None);
        last = String::from_utf8_lossy(&o.stderr).into_owned();
        o.status.success().then_some(o.stdout)
    })
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    assert_eq!(answer, b"hello");
    let ls = ok(&up.shoal(&["fn", "ls"], None));
    assert!(ls.contains("echo"), "{ls}");
    let status = ok(&up.shoal(&["status"], None));
    let line = status
        .lines()
        .find(|l| l.contains("echo") && l.contains("running"))
        .unwrap_or_else(|| panic!("no running echo in status:\n{status}"));
    assert!(line.starts_with("node-0"), "{line}");
    assert!(status.contains("tenant     default"), "{status}");
    ok(&up.shoal(&["fn", "rm", "echo"], None));
}

/// The admin token `shoal up` left in the runtime directory, and `shoal token` and
/// `shoal tenant quota` with it.
fn tokens_and_quotas(up: &Up) {
    let file = up.info().control.token_file.clone().unwrap();
    assert_eq!(file, up.xdg.path().join("shoal").join("admin.token"));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(up.info().env.token_file.as_ref(), Some(&file));

    // A token for another tenant, printed once.
    let out = ok(&up.shoal(
        &[
            "token", "create", "--role", "deployer", "--tenant", "team-a", "--ttl", "1h",
        ],
        None,
    ));
    let token = out.trim().to_string();
    assert!(token.starts_with("shoal_"), "{out}");
    let as_team = |args: &[&str]| up.shoal_env(args, None, &[("SHOAL_TOKEN", token.as_str())]);
    // It sees its own tenant only.
    ok(&as_team(&["fn", "ls"]));
    let ls = ok(&up.shoal(&["token", "ls", "--tenant", "team-a", "--json"], None));
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    let id = ls["tokens"][0]["id"].as_str().unwrap().to_string();
    assert!(!ls.to_string().contains(&token));
    // A deployer manages no tokens.
    let o = as_team(&["token", "ls"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("PermissionDenied"));
    ok(&up.shoal(&["token", "revoke", &id], None));
    let mut last = String::new();
    wait_for(
        "the revoked token to be refused",
        Duration::from_secs(10),
        || {
            let o = as_team(&["fn", "ls"]);
            last = String::from_utf8_lossy(&o.stderr).into_owned();
            (!o.status.success()).then_some(())
        },
    )
    .unwrap();
    assert!(
        last.starts_with("error: Unauthenticated") && last.contains("SHOAL_TOKEN"),
        "{last}"
    );
    // A bad token says where it came from.
    let o = up.shoal(&["fn", "ls", "--token", "garbage"], None);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--token"));

    // Quotas: the operator sets one; status shows it against use.
    ok(&up.shoal(
        &[
            "tenant",
            "quota",
            "set",
            "default",
            "--instances",
            "5",
            "--arena-bytes",
            "1GiB",
        ],
        None,
    ));
    let q = ok(&up.shoal(&["tenant", "quota", "get", "default", "--json"], None));
    let q: serde_json::Value = serde_json::from_str(&q).unwrap();
    assert_eq!(
        q["quota"],
        serde_json::json!({"instances": 5, "arena_bytes": 1u64 << 30})
    );
    ok(&up.shoal(
        &[
            "tenant",
            "quota",
            "set",
            "default",
            "--unset",
            "instances,arena_bytes",
        ],
        None,
    ));
    let status = ok(&up.shoal(&["status"], None));
    assert!(status.contains("instances 0 of unlimited"), "{status}");
}

#[test]
fn up_refuses_a_taken_control_port_with_a_clear_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(SHOAL)
        .args(["up", "--control-http-addr", &addr, "--socket-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&addr) && err.contains("--control-http-addr"),
        "{err}"
    );
}

#[test]
fn clear_errors_without_a_worker_and_for_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let o = Command::new(SHOAL)
        .args(["status", "--socket"])
        .arg(&sock)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot reach the dataworker") && err.contains("shoal up"),
        "{err}"
    );
    let o = Command::new(SHOAL)
        .args(["dataworker", "--shm-size", "lots"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--shm-size"));
    let o = Command::new(SHOAL)
        .args(["dataworker", "--shm-size", "250GiB", "--socket-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("shared memory") && err.contains("available"),
        "{err}"
    );
}

/// Runs `shoal args...` (which should refuse to start) and returns its error output; fails
/// the test if it is still running after a minute (it started instead of refusing).
fn refused(args: &[std::ffi::OsString]) -> String {
    let mut child = Command::new(SHOAL)
        .args(args)
        .env("SHOAL_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = shoal_devcluster::wait::poll_until(deadline, || child.try_wait().unwrap());
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("`shoal {args:?}` started instead of refusing");
    };
    assert!(!status.success(), "{args:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

/// `shoal up` and each component refuse a runtime directory that is not private (one others
/// may write, a symlink, one another user made), say how to fix it, and write nothing into
/// it: no CA key, no token, no socket.
#[test]
fn a_runtime_directory_that_is_not_private_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let open = t.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let real = t.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut cases = vec![
        (open.clone(), open.clone(), "chmod go-w"),
        (link.clone(), real.clone(), "symbolic link"),
    ];
    if nix::unistd::geteuid().is_root() {
        let theirs = t.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        cases.push((theirs.clone(), theirs, "belongs to uid 65534"));
    }
    for (dir, inside, says) in &cases {
        for sub in ["up", "dataworker", "proxy"] {
            let mut args: Vec<std::ffi::OsString> =
                vec![sub.into(), "--socket-dir".into(), dir.into()];
            if sub == "up" {
                args.extend(["--control-http-addr".into(), "127.0.0.1:0".into()]);
            }
            if sub != "proxy" {
                args.extend(["--shm-size".into(), "64MiB".into()]);
            }
            let err = refused(&args);
            assert!(err.contains(says), "{sub} {}: {err}", dir.display());
            let left: Vec<_> = std::fs::read_dir(inside).unwrap().collect();
            assert!(
                left.is_empty(),
                "{sub} wrote into {}: {left:?}",
                inside.display()
            );
        }
    }
}
