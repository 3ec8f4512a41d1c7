//! Supervisor: start, logs, stop, forced kill, restarts, spawn failures, shutdown.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use shoal_agent::{
    InstanceSpec, InstanceState, InstanceStatus, Limiter, Limits, RestartPolicy, Supervisor,
    SupervisorConfig,
};
use support::wait_until;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);

fn spec(dir: &Path, id: &str, script: &str) -> InstanceSpec {
    InstanceSpec {
        id: id.to_string(),
        function: "f".to_string(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        workdir: dir.to_path_buf(),
        env: BTreeMap::new(),
        log_dir: dir.join("logs"),
        restart: RestartPolicy::Never,
        cpu_milli: 500,
        mem_mib: 64,
        grace: Duration::from_secs(5),
    }
}

fn supervisor() -> Supervisor {
    // Unit tests of the supervisor do not depend on the node's cgroup setup.
    Supervisor::new(
        SupervisorConfig::default(),
        Limiter::unavailable("disabled in test"),
    )
}

async fn wait_for(
    rx: &mut watch::Receiver<InstanceStatus>,
    what: &str,
    f: impl FnMut(&InstanceStatus) -> bool,
) -> InstanceStatus {
    let r = tokio::time::timeout(WAIT, rx.wait_for(f))
        .await
        .map(|r| r.map(|s| s.clone()));
    match r {
        Ok(Ok(s)) => s,
        _ => panic!("timed out waiting for {what}; last: {:?}", rx.borrow()),
    }
}

async fn wait_log(sup: &Supervisor, id: &str, needle: &str) {
    wait_until(
        &format!("log of {id} contains {needle:?}"),
        WAIT,
        || async { sup.logs(id, 4096).unwrap().contains(needle) },
    )
    .await;
}

/// A process is gone when /proc has no entry for it or it is a zombie awaiting its reaper.
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn wait_gone(pid: u32) {
    wait_until(&format!("pid {pid} gone"), WAIT, || async { gone(pid) }).await;
}

#[tokio::test]
async fn runs_logs_and_stops_with_sigterm() {
    let t = tempfile::tempdir().unwrap();
    let mut sup = supervisor();
    let mut s = spec(
        t.path(),
        "hello",
        "echo hi; echo \"id=$SHOAL_INSTANCE_ID x=$X\" >&2; sleep 30",
    );
    s.env.insert("X".into(), "42".into());
    let mut rx = sup.start(s).unwrap();
    let st = wait_for(&mut rx, "running", |s| s.state == InstanceState::Running).await;
    let pid = st.pid.unwrap();
    assert_eq!(st.limits, Limits::NotEnforced("disabled in test".into()));
    wait_log(&sup, "hello", "hi").await;
    wait_until("stderr log shows the env", WAIT, || async {
        sup.logs_stream("hello", shoal_agent::LogStream::Stderr, 100)
            .unwrap()
            .contains("id=hello x=42")
    })
    .await;
    assert!(t.path().join("logs/hello.out").exists());

    let started = Instant::now();
    let fin = sup.stop("hello").await.unwrap();
    assert_eq!(fin.state, InstanceState::Stopped { forced: false });
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "SIGTERM should end it quickly"
    );
    assert!(gone(pid));
    // Tail is bounded.
    assert_eq!(sup.logs("hello", 2).unwrap(), "i\n");
}

#[tokio::test]
async fn sigterm_ignorer_is_killed_after_grace() {
    let t = tempfile::tempdir().unwrap();
    let mut sup = supervisor();
    let mut s = spec(t.path(), "stubborn", "trap '' TERM; echo ready; sleep 30");
    s.grace = Duration::from_millis(300);
    let mut rx = sup.start(s).unwrap();
    let pid = wait_for(&mut rx, "running", |s| s.state == InstanceState::Running)
        .await
        .pid
        .unwrap();
    wait_log(&sup, "stubborn", "ready").await;
    let started = Instant::now();
    let fin = sup.stop("stubborn").await.unwrap();
    assert_eq!(fin.state, InstanceState::Stopped { forced: true });
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(gone(pid));
}

#[tokio::test]
async fn crashing_instance_restarts_then_fails() {
    let t = tempfile::tempdir().unwrap();
    let mut sup = supervisor();
    let mut s = spec(t.path(), "crash", "echo run; exit 3");
    s.restart = RestartPolicy::OnFailure {
        max_restarts: 2,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(40),
    };
    let mut rx = sup.start(s).unwrap();
    let st = wait_for(&mut rx, "failed", |s| s.state.is_terminal()).await;
    assert_eq!(st.restarts, 2);
    match &st.state {
        InstanceState::Failed { reason } => assert!(reason.contains("code 3"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(sup.logs("crash", 100).unwrap(), "run\nrun\nrun\n");
}

#[tokio::test]
async fn clean_exit_without_restart_is_exited() {
    let t = tempfile::tempdir().unwrap();
    let mut sup = supervisor();
    let mut s = spec(t.path(), "ok", "exit 0");
    s.restart = RestartPolicy::OnFailure {
        max_restarts: 5,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(10),
    };
    let mut rx = sup.start(s).unwrap();
    let st = wait_for(&mut rx, "exited", |s| s.state.is_terminal()).await;
    assert_eq!(st.state, InstanceState::Exited { code: 0 });
    assert_eq!(st.restarts, 0);
    // A finished id can be started again; a running one cannot.
    let mut again = spec(t.path(), "ok", "sleep 30");
    again.grace = Duration::from_millis(100);
    sup.start(again.clone()).unwrap();
    assert!(matches!(
        sup.start(again),
        Err(shoal_agent::StartError::AlreadyRunning(_))
    ));
    sup.shutdown().await;
}

#[tokio::test]
async fn missing_command_fails_without_restart_loop() {
    let t = tempfile::tempdir().unwrap();
    let mut sup = supervisor();
    let mut s = spec(t.path(), "missing", "");
    s.command = vec!["shoal-no-such-command-xyz".into()];
    s.restart = RestartPolicy::Always {
        max_restarts: u32::MAX,
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
    };
    let mut rx = sup.start(s).unwrap();
    let st = wait_for(&mut rx, "failed", |s| s.state.is_terminal()).await;
    match &st.state {
        InstanceState::Failed { reason } => {
            assert!(reason.contains("shoal-no-such-command-xyz"), "{reason}")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(st.restarts, 0);
    assert_eq!(st.pid, None);
}

#[tokio::test]
async fn shutdown_leaves_no_process_behind() {
    let t = tempfile::tempdir().unwrap();
    let mut sup = supervisor();
    let mut pids = Vec::new();
    for i in 0..3 {
        let id = format!("bg{i}");
        let mut s = spec(
            t.path(),
            &id,
            &format!("sleep 30 & echo $! > {id}.pid; echo ready; wait"),
        );
        s.grace = Duration::from_millis(500);
        let mut rx = sup.start(s).unwrap();
        pids.push(
            wait_for(&mut rx, "running", |s| s.state == InstanceState::Running)
                .await
                .pid
                .unwrap(),
        );
        wait_log(&sup, &id, "ready").await;
        let bg = std::fs::read_to_string(t.path().join(format!("{id}.pid"))).unwrap();
        pids.push(bg.trim().parse().unwrap());
    }
    // One that ignores SIGTERM, to exercise the kill path during shutdown.
    let mut s = spec(t.path(), "stubborn", "trap '' TERM; echo ready; sleep 30");
    s.grace = Duration::from_millis(200);
    let mut rx = sup.start(s).unwrap();
    pids.push(
        wait_for(&mut rx, "running", |s| s.state == InstanceState::Running)
            .await
            .pid
            .unwrap(),
    );
    wait_log(&sup, "stubborn", "ready").await;
    for &p in &pids {
        assert!(!gone(p), "pid {p} should be alive before shutdown");
    }
    let fin = sup.shutdown().await;
    assert_eq!(fin.len(), 4);
    assert!(fin
        .iter()
        .all(|s| matches!(s.state, InstanceState::Stopped { .. })));
    for p in pids {
        wait_gone(p).await;
    }
}

#[tokio::test]
async fn invalid_specs_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let mut sup = supervisor();
    assert!(matches!(
        sup.start(spec(t.path(), "../x", "true")),
        Err(shoal_agent::StartError::InvalidId(_))
    ));
    let mut s = spec(t.path(), "empty", "");
    s.command.clear();
    assert!(matches!(
        sup.start(s),
        Err(shoal_agent::StartError::EmptyCommand(_))
    ));
    assert!(sup.stop("nope").await.is_err());
}
