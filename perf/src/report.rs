use crate::Record;
use std::io::Write;

/// How a target compares shoal with its baseline (ratio = shoal / baseline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// ops/s ratio must be at least `want`.
    ThroughputRatioAtLeast,
    /// p50 ratio must be at most `want`.
    P50RatioAtMost,
    /// p50 of shoal at `size_bytes` over p50 of shoal at `other_size` must be at most `want`.
    P50SizeRatioAtMost {
        /// The smaller size compared against.
        other_size: u64,
    },
}

/// A performance target from the issue, checked against a run.
#[derive(Debug, Clone)]
pub struct Target {
    /// Benchmark name.
    pub bench: String,
    /// Payload size.
    pub size_bytes: u64,
    /// Client count.
    pub clients: u32,
    /// Baseline system (unused for size ratios).
    pub baseline: String,
    /// What is compared.
    pub metric: Metric,
    /// The bound.
    pub want: f64,
}

/// A target and what the run showed.
#[derive(Debug, Clone)]
pub struct TargetResult {
    /// The target.
    pub target: Target,
    /// The measured ratio, if both records exist.
    pub ratio: Option<f64>,
    /// Whether the bound holds.
    pub met: Option<bool>,
}

/// The records of a run.
#[derive(Debug, Default)]
pub struct Report {
    records: Vec<Record>,
    print_json: bool,
}

impl Report {
    /// A report that prints each record as a JSON line on stdout as it arrives when `print_json`.
    pub fn new(print_json: bool) -> Self {
        Self {
            records: Vec::new(),
            print_json,
        }
    }

    /// Adds a record.
    pub fn push(&mut self, r: Record) {
        if self.print_json {
            println!("{}", r.to_json_line());
            let _ = std::io::stdout().flush();
        }
        self.records.push(r);
    }

    /// All records.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    fn find(&self, bench: &str, system: &str, size: u64, clients: u32) -> Option<&Record> {
        self.records.iter().find(|r| {
            r.bench == bench && r.system == system && r.size_bytes == size && r.clients == clients
        })
    }

    /// Checks targets against the records.
    pub fn evaluate(&self, targets: &[Target]) -> Vec<TargetResult> {
        targets
            .iter()
            .map(|t| {
                let ours = self.find(&t.bench, "shoal", t.size_bytes, t.clients);
                let ratio = match t.metric {
                    Metric::ThroughputRatioAtLeast => self
                        .find(&t.bench, &t.baseline, t.size_bytes, t.clients)
                        .zip(ours)
                        .filter(|(b, _)| b.ops_per_sec > 0.0)
                        .map(|(b, o)| o.ops_per_sec / b.ops_per_sec),
                    Metric::P50RatioAtMost => self
                        .find(&t.bench, &t.baseline, t.size_bytes, t.clients)
                        .zip(ours)
                        .filter(|(b, _)| b.p50_us > 0.0)
                        .map(|(b, o)| o.p50_us / b.p50_us),
                    Metric::P50SizeRatioAtMost { other_size } => self
                        .find(&t.bench, "shoal", other_size, t.clients)
                        .zip(ours)
                        .filter(|(small, _)| small.p50_us > 0.0)
                        .map(|(small, big)| big.p50_us / small.p50_us),
                };
                let met = ratio.map(|r| match t.metric {
                    Metric::ThroughputRatioAtLeast => r >= t.want,
                    _ => r <= t.want,
                });
                TargetResult {
                    target: t.clone(),
                    ratio,
                    met,
                }
            })
            .collect()
    }

    /// Writes the ratio of every shoal record to each baseline in its group, then the targets.
    pub fn print_summary(&self, out: &mut impl Write, targets: &[Target]) -> std::io::Result<()> {
        writeln!(
            out,
            "\n{:<16} {:>10} {:>7} {:>8} {:>12} {:>12} {:>9} {:>9}",
            "bench", "size", "clients", "vs", "shoal op/s", "base op/s", "op/s x", "p50 x"
        )?;
        for o in self.records.iter().filter(|r| r.system == "shoal") {
            for b in self.records.iter().filter(|b| {
                b.system != "shoal"
                    && b.bench == o.bench
                    && b.size_bytes == o.size_bytes
                    && b.clients == o.clients
            }) {
                writeln!(
                    out,
                    "{:<16} {:>10} {:>7} {:>8} {:>12.0} {:>12.0} {:>9.2} {:>9.2}",
                    o.bench,
                    human(o.size_bytes),
                    o.clients,
                    b.system,
                    o.ops_per_sec,
                    b.ops_per_sec,
                    o.ops_per_sec / b.ops_per_sec.max(f64::MIN_POSITIVE),
                    o.p50_us / b.p50_us.max(f64::MIN_POSITIVE),
                )?;
            }
        }
        writeln!(out, "\ntargets (ratio = shoal / baseline):")?;
        for r in self.evaluate(targets) {
            let t = &r.target;
            let (what, cmp) = match t.metric {
                Metric::ThroughputRatioAtLeast => (format!("op/s vs {}", t.baseline), ">="),
                Metric::P50RatioAtMost => (format!("p50 vs {}", t.baseline), "<="),
                Metric::P50SizeRatioAtMost { other_size } => {
                    (format!("p50 vs {} shoal", human(other_size)), "<=")
                }
            };
            let verdict = match r.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "n/a (baseline not run)",
            };
            let ratio = r.ratio.map_or("-".into(), |x| format!("{x:.2}"));
            writeln!(
                out,
                "  {:<16} {:>8} x{:<3} {:<22} {ratio:>7} {cmp} {:<5} {verdict}",
                t.bench,
                human(t.size_bytes),
                t.clients,
                what,
                t.want
            )?;
        }
        Ok(())
    }
}

pub(crate) fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(bench: &str, system: &str, size: u64, ops: f64, p50: f64) -> Record {
        Record {
            bench: bench.into(),
            system: system.into(),
            size_bytes: size,
            clients: 1,
            ops: 10,
            secs: 1.0,
            ops_per_sec: ops,
            bytes_per_sec: ops * size as f64,
            p50_us: p50,
            p99_us: p50,
            p999_us: p50,
            cpu_send_s_per_gb: None,
            cpu_recv_s_per_gb: None,
        }
    }

    #[test]
    fn targets_met_missed_and_missing() {
        let mut r = Report::new(false);
        r.push(rec("get", "shoal", 64, 300.0, 1.0));
        r.push(rec("get", "redis", 64, 100.0, 4.0));
        r.push(rec("get", "shoal", 1 << 20, 100.0, 3.0));
        let t = |metric, want, size, baseline: &str| Target {
            bench: "get".into(),
            size_bytes: size,
            clients: 1,
            baseline: baseline.into(),
            metric,
            want,
        };
        let res = r.evaluate(&[
            t(Metric::ThroughputRatioAtLeast, 2.0, 64, "redis"),
            t(Metric::P50RatioAtMost, 0.2, 64, "redis"),
            t(Metric::P50RatioAtMost, 1.0, 64, "nats"),
            t(
                Metric::P50SizeRatioAtMost { other_size: 64 },
                2.0,
                1 << 20,
                "",
            ),
        ]);
        assert_eq!(res[0].ratio, Some(3.0));
        assert_eq!(res[0].met, Some(true));
        assert_eq!(res[1].ratio, Some(0.25));
        assert_eq!(res[1].met, Some(false));
        assert_eq!(res[2].met, None);
        assert_eq!(res[3].ratio, Some(3.0));
        assert_eq!(res[3].met, Some(false));
        let mut out = Vec::new();
        r.print_summary(&mut out, &[t(Metric::P50RatioAtMost, 0.2, 64, "redis")])
            .unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("MISSED") && s.contains("3.00"), "{s}");
    }
}
