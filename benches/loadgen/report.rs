//! The load generator's results.
//!
//! Owns: the result record of each scenario and its one-line summary, the
//! target checks and their CHECK lines, and the JSON result file.

use std::path::Path;

use serde::Serialize;

use crate::client::LoadRun;
use crate::servers::Ceiling;
use crate::stats::{RunStats, ServerSplit};

/// One measured scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// e.g. `tiny/engine/closed/single/c32`
    pub name: String,
    pub model: String,
    /// `engine`, `old-design`, `floor` or `ceiling`.
    pub server: String,
    /// `closed`, `open` or `offline`.
    pub mode: String,
    pub mix: String,
    pub clients: Option<usize>,
    pub rate_per_s: Option<f64>,
    pub conns: Option<usize>,
    /// Engine config, or the baseline's settings.
    pub settings: serde_json::Value,
    pub client: Option<RunStats>,
    /// From the engine's `/metrics` deltas over the window.
    pub server_split: Option<ServerSplit>,
    pub ceiling: Option<Ceiling>,
}

impl ScenarioResult {
    /// A load scenario's record; the server split is computed when both
    /// scrapes are there.
    pub fn from_run(
        model: &str,
        server: &str,
        mode: &str,
        mix: &str,
        label: &str,
        run: &LoadRun,
        workers: usize,
    ) -> ScenarioResult {
        let server_split = match (&run.metrics_before, &run.metrics_after) {
            (Some(b), Some(a)) => Some(a.delta_since(b, run.window, workers)),
            _ => None,
        };
        ScenarioResult {
            name: format!("{model}/{server}/{mode}/{mix}/{label}"),
            model: model.to_string(),
            server: server.to_string(),
            mode: mode.to_string(),
            mix: mix.to_string(),
            clients: None,
            rate_per_s: None,
            conns: None,
            settings: serde_json::Value::Null,
            client: Some(run.stats.clone()),
            server_split,
            ceiling: None,
        }
    }

    pub fn with_settings(mut self, settings: serde_json::Value) -> ScenarioResult {
        self.settings = settings;
        self
    }

    pub fn stats(&self) -> &RunStats {
        self.client.as_ref().expect("a load scenario")
    }

    /// The one-line summary printed per scenario.
    pub fn line(&self) -> String {
        let mut s = format!("{:<44}", self.name);
        if let Some(c) = &self.ceiling {
            s += &format!(
                " {:>10.0} rows/s  ({} sessions x {} threads, batch {} rows, {:.2} ms/batch)",
                c.rows_per_s, c.sessions, c.threads_per_session, c.batch_rows, c.batch_ms
            );
            return s;
        }
        let r = self.stats();
        s += &format!(
            " {:>9.1} req/s {:>10.1} rows/s | p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} ms | sent {} 429 {:.1}% other {} lost {}",
            r.requests_per_s,
            r.rows_per_s,
            r.latency.p50_ms,
            r.latency.p90_ms,
            r.latency.p99_ms,
            r.latency.p999_ms,
            r.sent,
            100.0 * r.rejected_share,
            r.other_status,
            r.lost
        );
        if let Some(rate) = self.rate_per_s {
            s += &format!(" | offered {rate:.0}/s");
        }
        if r.rejected > 0 {
            s += &format!(
                " | 429 p99 {:.3} ms (from send {:.3})",
                r.rejected_latency.p99_ms, r.rejected_service_latency.p99_ms
            );
        }
        if let Some(l) = &r.send_lateness {
            s += &format!(" | late p99 {:.3} max {:.1} ms", l.p99_ms, l.max_ms);
        }
        if let Some(m) = &self.server_split {
            s += &format!(
                " | srv: {} batches, {:.1} rows/{:.1} req per batch, queue {:.3} ms, compute {:.3} ms ({:.0}% queue), util {:.0}%",
                m.batches,
                m.avg_batch_rows,
                m.avg_batch_requests,
                m.queue_wait_avg_ms,
                m.compute_avg_ms,
                100.0 * m.queue_share,
                100.0 * m.worker_utilisation
            );
        }
        s
    }
}

/// A performance target, evaluated on this run's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    /// e.g. `>= 10`
    pub target: String,
    /// `None` when the check could not be evaluated (reason in `detail`).
    pub pass: Option<bool>,
    pub detail: String,
}

impl Check {
    pub fn at_least(name: &str, value: f64, min: f64, detail: String) -> Check {
        Check {
            name: name.into(),
            value,
            target: format!(">= {min}"),
            pass: Some(value >= min),
            detail,
        }
    }

    pub fn at_most(name: &str, value: f64, max: f64, detail: String) -> Check {
        Check {
            name: name.into(),
            value,
            target: format!("<= {max}"),
            pass: Some(value <= max),
            detail,
        }
    }

    pub fn na(name: &str, target: &str, detail: String) -> Check {
        Check {
            name: name.into(),
            value: f64::NAN,
            target: target.into(),
            pass: None,
            detail,
        }
    }

    pub fn line(&self) -> String {
        let verdict = match self.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        format!(
            "CHECK {verdict} {:<48} {:>10.3} (target {}) {}",
            self.name, self.value, self.target, self.detail
        )
    }
}

/// The whole result file.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub suite: String,
    pub unix_time: u64,
    pub cores: usize,
    /// How the engine ran (in process, bench profile...).
    pub notes: Vec<String>,
    pub scenarios: Vec<ScenarioResult>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(suite: &str) -> Report {
        Report {
            suite: suite.to_string(),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            notes: Vec::new(),
            scenarios: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// Adds a scenario and prints its line.
    pub fn push(&mut self, r: ScenarioResult) -> &ScenarioResult {
        println!("{}", r.line());
        self.scenarios.push(r);
        self.scenarios.last().expect("just pushed")
    }

    pub fn check(&mut self, c: Check) {
        println!("{}", c.line());
        self.checks.push(c);
    }

    pub fn to_json(&self) -> String {
        // NaN (a check that could not be evaluated) is not JSON: serde_json
        // writes it as null.
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, self.to_json())
    }
}
