//! The priority-levels scenario (issue 23): a paced live client sending
//! single rows at level 1 while bulk clients saturate the engine at level 2.
//!
//! Owns: `cargo bench --bench loadgen -- --priority`: three phases on a
//! fresh engine each, the live client's latency from its intended send time
//! (an open loop: a stalled server cannot hide its stalls) in each:
//! (a) idle: the live client alone; (b) shared: bulk and live on one level
//! (`priority_levels = 1`, the bulk's `X-Request-Priority: 2` is then the
//! default level, one FIFO queue); (c) separate: `priority_levels = 2`, bulk
//! at level 2 with `[batching.levels.2] max_batch_rows` capped. Prints the
//! three p99s, the batches' compute time in (b) and (c), and the issue's
//! claim as an informational CHECK: (c)'s p99 within (a)'s plus one bulk
//! batch's compute time.
//! Must not touch: the engine, the other scenarios.

use std::sync::Arc;
use std::time::Duration;

use tokitai_serve::config::{Config, PriorityLevelConfig};
use tokitai_serve::model::Dims;

use crate::client::{self, LoadRun, Mix, Target, Workload};
use crate::report::{Check, Report, ScenarioResult};
use crate::stats::ServerSplit;
use crate::{Args, ModelFiles, Timing, servers, target};

/// Live client connections: enough that answers as slow as the shared
/// level's (seconds) do not hold the next paced send back (Little's law:
/// rate x latency), so the latency measured is the server's, not a client
/// backlog's.
const LIVE_CONNS: usize = 64;

/// One phase's engine settings and whether bulk traffic runs.
struct Phase {
    name: &'static str,
    levels: u32,
    bulk: bool,
}

const PHASES: [Phase; 3] = [
    Phase {
        name: "idle",
        levels: 1,
        bulk: false,
    },
    Phase {
        name: "shared-level",
        levels: 1,
        bulk: true,
    },
    Phase {
        name: "separate-levels",
        levels: 2,
        bulk: true,
    },
];

/// What one phase measured.
struct PhaseResult {
    live: ScenarioResult,
    /// The server's level-1 queue wait p99, as the upper bound of its
    /// histogram bucket (ms), over the whole live run (warm-up included).
    live_queue_wait_p99_ms: f64,
    /// The server's batches over the live window (compute, batch size).
    split: ServerSplit,
    /// Bulk rows answered per second (0 when no bulk ran).
    bulk_rows_per_s: f64,
}

/// The engine config of `phase`: `--config`/flags, then the levels.
fn phase_config(args: &Args, m: &ModelFiles, phase: &Phase) -> Config {
    let mut c = args.engine_config(m);
    c.batching.priority_levels = phase.levels;
    c.batching.default_priority_level = 1;
    c.batching.levels.clear();
    if phase.levels == 2 {
        let cap = args.bulk_batch_rows.min(c.batching.max_batch_rows);
        c.batching.levels.insert(
            "2".into(),
            PriorityLevelConfig {
                max_batch_rows: Some(cap),
                ..PriorityLevelConfig::default()
            },
        );
    }
    c
}

/// Runs the three phases on `m` and records them, the numbers and the check.
pub fn run(args: &Args, t: &Timing, m: &ModelFiles, report: &mut Report) {
    let dims = Dims::for_size(m.size);
    let live = Arc::new(Workload::new(Mix::Single, dims.input, 64).at_priority(1));
    let bulk = Arc::new(Workload::new(Mix::Rows(vec![args.bulk_rows]), dims.input, 8).at_priority(2));
    println!(
        "== priority {}: live {:.0} req/s single-row at level 1 over {LIVE_CONNS} connections; bulk {} closed-loop \
         clients x {} rows at level 2; level-2 max_batch_rows {} in the separate-levels phase",
        m.name, args.live_rate, args.bulk_clients, args.bulk_rows, args.bulk_batch_rows
    );
    let results: Vec<PhaseResult> = PHASES
        .iter()
        .map(|phase| run_phase(args, t, m, phase, &live, &bulk, report))
        .collect();
    summarise(m, &results, report);
}

/// One phase on a fresh engine: bulk (if any) on its own threads from the
/// start, the live open loop after the warm-up, both stopped after.
fn run_phase(
    args: &Args,
    t: &Timing,
    m: &ModelFiles,
    phase: &Phase,
    live: &Arc<Workload>,
    bulk: &Arc<Workload>,
    report: &mut Report,
) -> PhaseResult {
    let config = phase_config(args, m, phase);
    let settings = serde_json::to_value(&config).expect("config serialises");
    let engine = servers::start_engine(config);
    let live_target = target(&engine.base_url, true, t, args);
    let bulk_run = phase.bulk.then(|| {
        // Runs past the live window: the live client's drive starts after
        // its own connections are up, and its warm-up lets bulk saturate.
        let mut tgt: Target = target(&engine.base_url, false, t, args);
        tgt.warmup = Duration::ZERO;
        tgt.duration = t.warmup * 2 + t.duration + Duration::from_secs(3);
        let (bulk, clients) = (Arc::clone(bulk), args.bulk_clients);
        std::thread::spawn(move || client::closed_loop(&tgt, bulk, clients))
    });
    let before = level_one_wait_buckets(&engine.base_url);
    let run = client::open_loop(&live_target, Arc::clone(live), args.live_rate, LIVE_CONNS);
    let after = level_one_wait_buckets(&engine.base_url);
    let bulk_run: Option<LoadRun> = bulk_run.map(|h| h.join().expect("bulk clients"));
    engine.stop();
    let label = format!("{}/live{:.0}", phase.name, args.live_rate);
    let mut r =
        ScenarioResult::from_run(m.name, "engine", "priority", "single", &label, &run, 1).with_settings(settings);
    r.rate_per_s = Some(args.live_rate);
    r.conns = Some(LIVE_CONNS);
    let split = r.server_split.unwrap_or_default();
    let live = report.push(r).clone();
    let bulk_rows_per_s = bulk_run.map_or(0.0, |b| {
        let mut br = ScenarioResult::from_run(m.name, "engine", "priority-bulk", &bulk.mix.name(), phase.name, &b, 1);
        br.clients = Some(args.bulk_clients);
        report.push(br).stats().rows_per_s
    });
    PhaseResult {
        live,
        live_queue_wait_p99_ms: bucket_quantile(&before, &after, 0.99) * 1000.0,
        split,
        bulk_rows_per_s,
    }
}

/// Prints the three p99s and the compute times, and records the check.
fn summarise(m: &ModelFiles, results: &[PhaseResult], report: &mut Report) {
    println!("priority {}: live client latency from intended send (ms)", m.name);
    for ((phase, r), letter) in PHASES.iter().zip(results).zip(['a', 'b', 'c']) {
        let s = r.live.stats();
        println!(
            "  ({letter}) {:<16} p50 {:>8.2}  p99 {:>8.2}  max {:>8.2}  answered {} / sent {} | server: level-1 queue \
             wait p99 <= {} ms, {:.1} rows/batch, compute {:.2} ms/batch, bulk {:.0} rows/s",
            phase.name,
            s.latency.p50_ms,
            s.latency.p99_ms,
            s.latency.max_ms,
            s.answered,
            s.sent,
            r.live_queue_wait_p99_ms,
            r.split.avg_batch_rows,
            r.split.compute_avg_ms,
            r.bulk_rows_per_s,
        );
        report.notes.push(format!(
            "priority {} ({letter}) {}: live p99 {:.2} ms from intended send; level-1 queue wait p99 <= {} ms \
             (server histogram bucket); {:.1} rows/batch, {:.2} ms compute/batch",
            m.name,
            phase.name,
            s.latency.p99_ms,
            r.live_queue_wait_p99_ms,
            r.split.avg_batch_rows,
            r.split.compute_avg_ms
        ));
    }
    let [idle, shared, separate] = [&results[0], &results[1], &results[2]];
    let (p_idle, p_shared, p_sep) = (
        idle.live.stats().latency.p99_ms,
        shared.live.stats().latency.p99_ms,
        separate.live.stats().latency.p99_ms,
    );
    let bound = p_idle + separate.split.compute_avg_ms;
    report.check(Check {
        target: "(info)".into(),
        pass: None,
        ..Check::at_most(
            &format!("{}: live p99 with bulk on its own level (ms)", m.name),
            p_sep,
            bound,
            format!(
                "idle p99 {p_idle:.2} + one bulk batch {:.2} ms ({:.1} rows) = {bound:.2}; shared level p99 {p_shared:.2}",
                separate.split.compute_avg_ms, separate.split.avg_batch_rows
            ),
        )
    });
}

/// `tokitai_queue_wait_seconds_bucket{priority="1"}` from the engine's
/// `/metrics`, as (upper bound in seconds, cumulative count), summed over
/// versions (one here).
fn level_one_wait_buckets(base_url: &str) -> Vec<(f64, f64)> {
    let text = ureq::get(&format!("{base_url}/metrics"))
        .timeout(Duration::from_secs(10))
        .call()
        .ok()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("tokitai_queue_wait_seconds_bucket{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        if !labels.contains("priority=\"1\"") {
            continue;
        }
        let le = labels
            .split(',')
            .find_map(|l| l.strip_prefix("le=\""))
            .map(|v| v.trim_end_matches('"'))
            .map(|v| {
                if v == "+Inf" {
                    f64::INFINITY
                } else {
                    v.parse().unwrap_or(f64::NAN)
                }
            });
        if let (Some(le), Ok(count)) = (le, value.trim().parse::<f64>()) {
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some(bucket) => bucket.1 += count,
                None => buckets.push((le, count)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The upper bound of the bucket holding quantile `q` of the observations
/// made between `before` and `after` (NaN when there were none).
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let count_before = |le: f64| before.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
    let delta: Vec<(f64, f64)> = after.iter().map(|&(le, c)| (le, c - count_before(le))).collect();
    let total = delta.last().map_or(0.0, |(_, c)| *c);
    if total <= 0.0 {
        return f64::NAN;
    }
    delta
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map_or(f64::NAN, |(le, _)| *le)
}
