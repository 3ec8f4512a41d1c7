use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One line of benchmark output (the JSON lines `shoal bench` prints). A figure and its baselines share `bench`,
/// `size_bytes` and `clients` and differ in `system`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// What was measured, e.g. `get_small`.
    pub bench: String,
    /// `shoal`, or the baseline: `memcpy`, `uds`, `redis`.
    pub system: String,
    /// Payload size per operation.
    pub size_bytes: u64,
    /// Concurrent clients.
    pub clients: u32,
    /// Operations measured.
    pub ops: u64,
    /// Measured wall-clock seconds.
    pub secs: f64,
    /// Throughput.
    pub ops_per_sec: f64,
    /// Payload bytes per second.
    pub bytes_per_sec: f64,
    /// Median latency.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// CPU seconds the sending process spent per GB moved (transfer benchmarks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_send_s_per_gb: Option<f64>,
    /// CPU seconds the receiving process spent per GB moved (transfer benchmarks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_recv_s_per_gb: Option<f64>,
}

impl Record {
    /// Builds a record from latencies measured over `secs`.
    pub fn from_latencies(
        bench: &str,
        system: &str,
        size_bytes: u64,
        clients: u32,
        lat: &Latencies,
        secs: f64,
    ) -> Record {
        let ops = lat.count();
        let ops_per_sec = if secs > 0.0 { ops as f64 / secs } else { 0.0 };
        Record {
            bench: bench.into(),
            system: system.into(),
            size_bytes,
            clients,
            ops,
            secs,
            ops_per_sec,
            bytes_per_sec: ops_per_sec * size_bytes as f64,
            p50_us: lat.percentile_us(50.0),
            p99_us: lat.percentile_us(99.0),
            p999_us: lat.percentile_us(99.9),
            cpu_send_s_per_gb: None,
            cpu_recv_s_per_gb: None,
        }
    }

    /// The record as one JSON line (no newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// An HDR histogram of nanosecond latencies (1 ns to 60 s, 3 significant digits).
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

impl Latencies {
    const MAX_NS: u64 = 60_000_000_000;

    /// Empty.
    pub fn new() -> Self {
        // The bounds are constants that hdrhistogram accepts.
        Self(Histogram::new_with_bounds(1, Self::MAX_NS, 3).unwrap_or_else(|_| unreachable!()))
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        self.record_ns(d.as_nanos().min(u128::from(Self::MAX_NS)) as u64);
    }

    /// Records one latency in nanoseconds (clamped to the range).
    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(1, Self::MAX_NS));
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latencies) {
        let _ = self.0.add(&other.0);
    }

    /// Samples.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The `q`th percentile (0..=100) in microseconds.
    pub fn percentile_us(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        (self.0.value_at_percentile(q) as f64 / 1000.0 * 100.0).round() / 100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_are_the_documented_ones() {
        let mut l = Latencies::new();
        for us in 1..=100u64 {
            l.record(Duration::from_micros(us));
        }
        assert!(
            (l.percentile_us(50.0) - 50.0).abs() < 0.1,
            "3 significant digits"
        );
        assert!((l.percentile_us(99.0) - 99.0).abs() < 0.1);
        let r = Record::from_latencies("get_small", "shoal", 64, 1, &l, 2.0);
        assert_eq!(r.ops, 100);
        assert_eq!(r.ops_per_sec, 50.0);
        assert_eq!(r.bytes_per_sec, 3200.0);
        let v: serde_json::Value = serde_json::from_str(&r.to_json_line()).unwrap();
        for f in [
            "bench",
            "system",
            "size_bytes",
            "clients",
            "ops",
            "secs",
            "ops_per_sec",
            "bytes_per_sec",
            "p50_us",
            "p99_us",
            "p999_us",
        ] {
            assert!(v.get(f).is_some(), "missing {f}");
        }
        let back: Record = serde_json::from_str(&r.to_json_line()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn out_of_range_is_clamped() {
        let mut l = Latencies::new();
        l.record(Duration::from_secs(1000));
        l.record_ns(0);
        assert_eq!(l.count(), 2);
    }
}
