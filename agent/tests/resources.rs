//! Node resource sampling on the machine running the tests.
#![allow(clippy::unwrap_used)]

use shoal_agent::{CpuSampler, NodeResources, ProcessUsage};

#[test]
fn node_sample_is_sane() {
    let mut cpu = CpuSampler::new().unwrap();
    let r = NodeResources::sample(std::path::Path::new("/"), &mut cpu).unwrap();
    assert!(r.cpu_cores >= 1);
    assert!(r.cpu_used_milli <= r.cpu_cores * 1000);
    assert!(r.mem_total_mib > 0 && r.mem_total_mib >= r.mem_available_mib);
    assert!(r.disk_total_mib > 0 && r.disk_total_mib >= r.disk_free_mib);
    // A second sample works from the first.
    let r2 = NodeResources::sample(std::path::Path::new("/"), &mut cpu).unwrap();
    assert_eq!(r2.cpu_cores, r.cpu_cores);
    assert!(NodeResources::sample(std::path::Path::new("/nonexistent/x"), &mut cpu).is_err());
}

#[test]
fn process_usage_of_self() {
    let u = ProcessUsage::sample(std::process::id()).unwrap();
    assert!(u.rss_kib > 0);
    assert!(ProcessUsage::sample(u32::MAX).is_err());
}
