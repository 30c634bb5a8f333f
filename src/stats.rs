//! Cumulative inference statistics of one served model version: what
//! Triton's statistics extension reports (`GET /v2/models/{m}/stats`, gRPC
//! `ModelStatistics`), from one set of counters both read.
//!
//! Owns: [`InferStats`] (lock-free counters, one set per version: requests
//! recorded once per answered request by `Engine::infer`, executions once
//! per computed batch by the version's workers) and [`StatsSnapshot`] (what
//! they say now).
//! Must not touch: metrics (Prometheus has its own series in `metrics.rs`),
//! wire formats (each protocol renders a snapshot its way).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A count and a cumulative duration.
#[derive(Default)]
struct Tally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Tally {
    fn add(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn read(&self) -> (u64, u64) {
        (self.count.load(Ordering::Relaxed), self.ns.load(Ordering::Relaxed))
    }
}

/// One served version's counters since it was loaded.
#[derive(Default)]
pub struct InferStats {
    success: Tally,
    fail: Tally,
    queue: Tally,
    compute_infer: Tally,
    /// Rows answered (Triton counts each row of a batched request).
    inference_count: AtomicU64,
    /// Batches computed by this version's workers (one per forward, however
    /// many requests it held).
    execution_count: AtomicU64,
    last_inference_ms: AtomicU64,
}

/// The counters at one moment: `(count, total nanoseconds)` pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub success: (u64, u64),
    pub fail: (u64, u64),
    pub queue: (u64, u64),
    pub compute_infer: (u64, u64),
    pub inference_count: u64,
    /// Batches computed (all of this version's workers).
    pub execution_count: u64,
    /// Milliseconds since the epoch of the last answered request (0: none yet).
    pub last_inference_ms: u64,
}

impl StatsSnapshot {
    /// Preparing inputs and extracting outputs happen inside the forward
    /// here (no device copies apart from it), so they are counted with each
    /// computed request at no time of their own: clients such as
    /// perf_analyzer require the three compute counts to agree.
    pub fn compute_input(&self) -> (u64, u64) {
        (self.compute_infer.0, 0)
    }

    /// See [`StatsSnapshot::compute_input`].
    pub fn compute_output(&self) -> (u64, u64) {
        (self.compute_infer.0, 0)
    }
}

impl InferStats {
    /// A request of `rows` rows answered after `total`, having waited
    /// `queue` and been computed in `compute`.
    pub fn record_success(&self, rows: usize, total: Duration, queue: Duration, compute: Duration) {
        self.success.add(total);
        self.queue.add(queue);
        self.compute_infer.add(compute);
        self.inference_count.fetch_add(rows as u64, Ordering::Relaxed);
        self.touch();
    }

    /// A request that failed after `total`.
    pub fn record_failure(&self, total: Duration) {
        self.fail.add(total);
        self.touch();
    }

    /// One batch computed by one of this version's workers.
    pub fn record_execution(&self) {
        self.execution_count.fetch_add(1, Ordering::Relaxed);
    }

    fn touch(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_inference_ms.store(now, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            success: self.success.read(),
            fail: self.fail.read(),
            queue: self.queue.read(),
            compute_infer: self.compute_infer.read(),
            inference_count: self.inference_count.load(Ordering::Relaxed),
            execution_count: self.execution_count.load(Ordering::Relaxed),
            last_inference_ms: self.last_inference_ms.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_rows_and_durations() {
        let s = InferStats::default();
        assert_eq!(s.snapshot(), StatsSnapshot::default());
        let us = Duration::from_micros;
        s.record_success(3, us(10), us(2), us(5));
        s.record_success(1, us(20), us(4), us(6));
        s.record_failure(us(7));
        // Both requests' rows in one batch, then one more batch.
        s.record_execution();
        s.record_execution();
        let snap = s.snapshot();
        assert_eq!(snap.success, (2, 30_000));
        assert_eq!(snap.queue, (2, 6_000));
        assert_eq!(snap.compute_infer, (2, 11_000));
        assert_eq!(snap.fail, (1, 7_000));
        assert_eq!((snap.inference_count, snap.execution_count), (4, 2));
        assert!(snap.last_inference_ms > 0);
        assert_eq!((snap.compute_input(), snap.compute_output()), ((2, 0), (2, 0)));
    }
}
