use crate::Latencies;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// How long to run one measurement.
#[derive(Debug, Clone, Copy)]
pub struct RunSpec {
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before.
    pub warmup: Duration,
    /// Stop after this many measured operations even if time is left.
    pub max_ops: u64,
}

impl RunSpec {
    /// A smoke run: proves the benchmark works.
    pub fn quick() -> Self {
        Self {
            duration: Duration::from_millis(150),
            warmup: Duration::from_millis(20),
            max_ops: 2_000_000,
        }
    }

    /// A measurement.
    pub fn full() -> Self {
        Self {
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(300),
            max_ops: 50_000_000,
        }
    }

    /// The same with at most `n` measured operations (for expensive ops).
    pub fn capped(self, n: u64) -> Self {
        Self { max_ops: n, ..self }
    }
}

/// Runs `op` in a closed loop on this thread. Returns the latencies and measured seconds.
pub fn run_single<E>(
    spec: &RunSpec,
    mut op: impl FnMut() -> Result<(), E>,
) -> Result<(Latencies, f64), E> {
    let warm_end = Instant::now() + spec.warmup;
    while Instant::now() < warm_end {
        op()?;
    }
    let mut lat = Latencies::new();
    let start = Instant::now();
    let end = start + spec.duration;
    let mut n = 0;
    loop {
        let t = Instant::now();
        if t >= end || n >= spec.max_ops {
            break;
        }
        op()?;
        lat.record(t.elapsed());
        n += 1;
    }
    Ok((lat, start.elapsed().as_secs_f64()))
}

/// Runs `op` in a closed loop on `clients` threads, each with its own state from `make`
/// (built before the clock starts). All threads start together and stop at the deadline.
pub fn run_threads<S, E: Send>(
    spec: &RunSpec,
    clients: usize,
    make: impl Fn(usize) -> Result<S, E> + Sync,
    op: impl Fn(&mut S) -> Result<(), E> + Sync,
) -> Result<(Latencies, f64), E> {
    let barrier = Barrier::new(clients);
    let per_thread_cap = (spec.max_ops / clients as u64).max(1);
    let results: Vec<Result<(Latencies, Instant, Instant), E>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let (barrier, make, op) = (&barrier, &make, &op);
                s.spawn(move || {
                    let state = make(i);
                    barrier.wait();
                    let mut state = state?;
                    let warm_end = Instant::now() + spec.warmup;
                    while Instant::now() < warm_end {
                        op(&mut state)?;
                    }
                    let mut lat = Latencies::new();
                    let start = Instant::now();
                    let end = start + spec.duration;
                    let mut n = 0;
                    loop {
                        let t = Instant::now();
                        if t >= end || n >= per_thread_cap {
                            break;
                        }
                        op(&mut state)?;
                        lat.record(t.elapsed());
                        n += 1;
                    }
                    Ok((lat, start, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut all = Latencies::new();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for r in results {
        let (lat, s, e) = r?;
        all.merge(&lat);
        first = Some(first.map_or(s, |f| f.min(s)));
        last = Some(last.map_or(e, |l| l.max(e)));
    }
    let secs = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    Ok((all, secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runners_count_ops() {
        let spec = RunSpec {
            duration: Duration::from_millis(20),
            warmup: Duration::from_millis(1),
            max_ops: 1000,
        };
        let (l, secs) = run_single::<()>(&spec, || Ok(())).unwrap();
        assert!(l.count() > 0 && l.count() <= 1000 && secs > 0.0);
        let (l, _) = run_threads::<u64, ()>(
            &spec,
            3,
            |i| Ok(i as u64),
            |s| {
                *s += 1;
                Ok(())
            },
        )
        .unwrap();
        assert!(l.count() > 0 && l.count() <= 1000);
        let e = run_threads::<(), &str>(&spec, 2, |_| Err("no state"), |_| Ok(()));
        assert_eq!(e.unwrap_err(), "no state");
    }
}
