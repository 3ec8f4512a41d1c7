//! The `shoal` binary as a user drives it: `shoal up --json` in one process, client commands
//! in others.
#![allow(clippy::unwrap_used)] // test setup panics on failure by design
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

struct Up {
    child: Child,
    socket: String,
    info: serde_json::Value,
    _dir: tempfile::TempDir,
}

impl Up {
    fn start() -> Up {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(SHOAL)
            .args(["up", "--json", "--shm-size", "64MiB", "--socket-dir"])
            .arg(dir.path())
            .env("SHOAL_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let info: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let socket = info["env"]["SHOAL_DATAWORKER_SOCKET"]
            .as_str()
            .unwrap()
            .to_owned();
        Up {
            child,
            socket,
            info,
            _dir: dir,
        }
    }

    fn shoal(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut c = Command::new(SHOAL)
            .args(args)
            .env("SHOAL_DATAWORKER_SOCKET", &self.socket)
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

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

#[test]
fn up_put_get_kv_status_and_clean_stop() {
    let mut up = Up::start();
    let node = &up.info["nodes"][0];
    assert_eq!(node["id"], "node-0");
    assert!(node["pid"].as_u64().unwrap() > 0);
    assert!(node["metrics"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));

    // A file round trip, byte-exact, through separate CLI processes.
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

    // KV.
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

    // Status as JSON.
    let st: serde_json::Value =
        serde_json::from_str(&ok(&up.shoal(&["status", "--json"], None))).unwrap();
    assert_eq!(st["objects"], 2);
    assert_eq!(st["arena_bytes"], 64 << 20);

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

    // SIGTERM stops it cleanly and removes the socket.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(up.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = up.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "shoal up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(!std::path::Path::new(&up.socket).exists(), "socket removed");
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
