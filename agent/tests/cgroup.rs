//! Cgroup detection on the machine running the tests, and limits when it can apply them.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use shoal_agent::{
    InstanceSpec, InstanceState, Limiter, LimiterKind, Limits, RestartPolicy, Supervisor,
    SupervisorConfig,
};

#[test]
fn detection_is_self_consistent() {
    let l = Limiter::detect(None);
    match l.kind() {
        LimiterKind::Unavailable => {
            assert!(!l.can_limit());
            assert!(l.reason().is_some_and(|r| !r.is_empty()));
            assert!(l.base_dirs().is_empty());
        }
        LimiterKind::V2 => {
            assert!(l.can_limit() && l.reason().is_none());
            assert_eq!(l.base_dirs().len(), 1);
            assert!(l.base_dirs()[0].join("cgroup.subtree_control").exists());
        }
        LimiterKind::V1 => {
            assert!(l.can_limit() && l.reason().is_none());
            let d = l.base_dirs();
            assert_eq!(d.len(), 2);
            assert!(d[0].join("cpu.cfs_quota_us").exists());
            assert!(d[1].join("memory.limit_in_bytes").exists());
        }
    }
    // A bogus hint is reported in the reason if nothing else works, and never panics.
    let l2 = Limiter::detect(Some("/nonexistent/cgroup".into()));
    assert_eq!(l2.can_limit(), l.can_limit());
}

#[test]
fn create_writes_limits_when_possible() {
    let l = Limiter::detect(None);
    if !l.can_limit() {
        // Nothing to create here; the reason is checked by the consistency test.
        assert!(l.create("x", 100, 10).is_err());
        return;
    }
    let id = format!("test-create-{}", std::process::id());
    let mut h = l.create(&id, 500, 64).unwrap();
    let read = |f: &str| -> String {
        let d = h.dirs().iter().find(|d| d.join(f).exists()).unwrap();
        std::fs::read_to_string(d.join(f))
            .unwrap()
            .trim()
            .to_string()
    };
    match l.kind() {
        LimiterKind::V2 => {
            assert_eq!(read("cpu.max"), "50000 100000");
            assert_eq!(read("memory.max"), (64u64 << 20).to_string());
        }
        LimiterKind::V1 => {
            assert_eq!(read("cpu.cfs_quota_us"), "50000");
            assert_eq!(read("cpu.cfs_period_us"), "100000");
            assert_eq!(read("memory.limit_in_bytes"), (64u64 << 20).to_string());
        }
        LimiterKind::Unavailable => unreachable!(),
    }
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    h.add(child.id()).unwrap();
    assert_eq!(h.pids(), vec![child.id()]);
    assert!(
        h.remove().is_err(),
        "a group with a process cannot be removed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let dirs = h.dirs().to_vec();
    h.remove().unwrap();
    assert!(dirs.iter().all(|d| !d.exists()));
}

#[tokio::test]
async fn supervised_instance_runs_in_its_cgroup() {
    let l = Limiter::detect(None);
    let enforce = l.can_limit();
    let t = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::new(SupervisorConfig::default(), l);
    let id = format!("test-sup-{}", std::process::id());
    let mut rx = sup
        .start(InstanceSpec {
            id: id.clone(),
            function: "f".into(),
            command: vec!["sleep".into(), "30".into()],
            workdir: t.path().to_path_buf(),
            env: BTreeMap::new(),
            log_dir: t.path().to_path_buf(),
            restart: RestartPolicy::Never,
            cpu_milli: 250,
            mem_mib: 32,
            grace: Duration::from_secs(2),
        })
        .unwrap();
    let st = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.state == InstanceState::Running),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    if enforce {
        assert_eq!(st.limits, Limits::Enforced);
        let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", st.pid.unwrap())).unwrap();
        assert!(cg.contains(&format!("shoal/{id}")), "{cg}");
    } else {
        assert!(matches!(st.limits, Limits::NotEnforced(_)));
    }
    let dirs: Vec<_> = sup
        .limiter()
        .base_dirs()
        .iter()
        .map(|d| d.join(&id))
        .collect();
    sup.shutdown().await;
    assert!(dirs.iter().all(|d| !d.exists()), "instance cgroups removed");
}
