//! Load-generator statistics: latency histograms (hdrhistogram does the
//! recording and the quantiles), the `/metrics` scrape and its deltas, and the
//! serialisable result records.
//!
//! Written by hand here, because no library gives them: the Prometheus text
//! parse (only `name{labels} value` lines, summed over label sets: all the
//! harness needs from the exposition format) and the derived server-side
//! split (average queue wait vs compute, average batch size) from two scrapes.

use std::collections::HashMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded without saturating: 10 minutes, in microseconds.
const MAX_US: u64 = 600_000_000;

/// A latency histogram in microseconds, 3 significant digits.
#[derive(Clone)]
pub struct LatencyHist(Histogram<u64>);

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist(Histogram::new_with_bounds(1, MAX_US, 3).expect("static histogram bounds are valid"))
    }
}

impl LatencyHist {
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(MAX_US).max(1);
        self.0.saturating_record(us);
    }

    pub fn merge(&mut self, other: &LatencyHist) {
        self.0.add(&other.0).expect("same bounds");
    }

    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// Quantiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// One scrape of `/metrics`: every sample's value summed over its label sets,
/// keyed by the sample name (`tokitai_compute_seconds_sum`, ...).
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot(pub HashMap<String, f64>);

impl MetricsSnapshot {
    /// Parses the Prometheus text exposition (comments skipped; timestamps,
    /// if any, ignored).
    pub fn parse(text: &str) -> MetricsSnapshot {
        let mut map = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The name ends at `{` or a space; the value follows the labels.
            let (name, rest) = match line.find(['{', ' ']) {
                Some(i) if line.as_bytes()[i] == b'{' => match labels_end(&line[i..]) {
                    Some(j) => (&line[..i], &line[i + j + 1..]),
                    None => continue,
                },
                Some(i) => (&line[..i], &line[i..]),
                None => continue,
            };
            let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            *map.entry(name.to_string()).or_insert(0.0) += value;
        }
        MetricsSnapshot(map)
    }

    pub fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }

    /// The server-side split over the window between `before` and `self`.
    pub fn delta_since(&self, before: &MetricsSnapshot, window: Duration, workers: usize) -> ServerSplit {
        let d = |name: &str| self.get(name) - before.get(name);
        let ratio = |num: f64, den: f64| if den > 0.0 { num / den } else { 0.0 };
        let batches = d("tokitai_batch_size_rows_count");
        let queue_wait_avg_ms = 1000.0
            * ratio(
                d("tokitai_queue_wait_seconds_sum"),
                d("tokitai_queue_wait_seconds_count"),
            );
        let compute_avg_ms = 1000.0 * ratio(d("tokitai_compute_seconds_sum"), d("tokitai_compute_seconds_count"));
        let busy = d("tokitai_worker_busy_seconds_total");
        ServerSplit {
            batches: batches.round() as u64,
            avg_batch_rows: ratio(d("tokitai_batch_size_rows_sum"), batches),
            avg_batch_requests: ratio(
                d("tokitai_batch_size_requests_sum"),
                d("tokitai_batch_size_requests_count"),
            ),
            queue_wait_avg_ms,
            compute_avg_ms,
            queue_share: ratio(queue_wait_avg_ms, queue_wait_avg_ms + compute_avg_ms),
            rows_computed: d("tokitai_rows_computed_total").round() as u64,
            worker_utilisation: ratio(busy, window.as_secs_f64() * workers.max(1) as f64),
            rows_dropped: d("tokitai_rows_dropped_total").round() as u64,
        }
    }
}

/// The index of the `}` closing a label set that starts at `s[0] == '{'`;
/// label values are quoted and may contain `}`, `"` (escaped) and `\\`.
fn labels_end(s: &str) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// What the engine's own metrics say about a measurement window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServerSplit {
    pub batches: u64,
    pub avg_batch_rows: f64,
    pub avg_batch_requests: f64,
    /// Mean time a request's rows waited before their batch started.
    pub queue_wait_avg_ms: f64,
    /// Mean forward time of one batch.
    pub compute_avg_ms: f64,
    /// queue / (queue + compute), per request on average.
    pub queue_share: f64,
    pub rows_computed: u64,
    /// Worker busy seconds over (window x workers).
    pub worker_utilisation: f64,
    pub rows_dropped: u64,
}

/// Request accounting and latencies of one load run (client side).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunStats {
    /// Requests sent in the measurement window (for the open loop: tickets
    /// whose intended time fell in it).
    pub sent: u64,
    /// 200 answers.
    pub answered: u64,
    /// 429 answers.
    pub rejected: u64,
    /// Any other HTTP status (503, 504, 500...).
    pub other_status: u64,
    /// No HTTP answer: connection error or client timeout.
    pub lost: u64,
    pub rows_answered: u64,
    /// From the window's start to the last answer.
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    pub rows_per_s: f64,
    pub rejected_share: f64,
    /// Answered (200) latency: closed loop from send, open loop from the
    /// intended send time.
    pub latency: LatencySummary,
    /// 429 latency, same origin as `latency`.
    pub rejected_latency: LatencySummary,
    /// 429 latency from the actual send (the server's own rejection time).
    pub rejected_service_latency: LatencySummary,
    /// Open loop only: how late requests were sent after their intended time
    /// (client saturation if large).
    pub send_lateness: Option<LatencySummary>,
}

impl RunStats {
    pub fn accounted(&self) -> bool {
        self.answered + self.rejected + self.other_status + self.lost == self.sent
    }
}
