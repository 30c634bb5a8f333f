//! The load-generating clients: pre-serialised request bodies, a closed loop
//! and an open loop, over keep-alive HTTP/1.1 (blocking `ureq` agents on
//! plain threads: cheap, since the client shares the cores with the server).
//!
//! Written by hand here, because no library gives them: the scheduling (N
//! closed-loop clients; the open loop's shared ticket counter with intended
//! send times, so latency is measured from when a request *should* have been
//! sent and a stalled server cannot hide its stalls: no coordinated
//! omission) and the request accounting. HTTP is `ureq`; histograms are
//! `hdrhistogram` (see `stats.rs`).

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use crate::stats::{LatencyHist, MetricsSnapshot, RunStats};

/// Client thread stack: the threads only hold a connection and a buffer.
const STACK: usize = 256 * 1024;

/// How many rows each request of a workload carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mix {
    /// Every request is one row, in the flat form `{"features": [..]}`.
    Single,
    /// Requests cycle through these row counts (batch form `[[..], ..]`).
    Rows(Vec<usize>),
    /// One row per request on the Open Inference Protocol route
    /// (`/v2/models/{model}/infer`) with binary tensor data in and out.
    V2Binary,
}

impl Mix {
    /// The multi-row mix used by the suites: 1 to 32 rows, mean 10.5.
    pub fn multi() -> Mix {
        Mix::Rows(vec![1, 2, 4, 8, 16, 32])
    }

    pub fn name(&self) -> String {
        match self {
            Mix::Single => "single".to_string(),
            Mix::Rows(r) => format!("rows{r:?}").replace(' ', ""),
            Mix::V2Binary => "v2-binary-single".to_string(),
        }
    }
}

/// One pre-serialised request body.
pub struct Body {
    pub bytes: Vec<u8>,
    pub rows: usize,
    /// Binary v2 requests: the length of the JSON part
    /// (`Inference-Header-Content-Length`).
    pub v2_header_len: Option<usize>,
}

/// The model name the v2 workload addresses (the engine's default).
pub const V2_MODEL: &str = "tokitai-moe";

/// Pre-serialised request bodies, sent in turn.
pub struct Workload {
    pub mix: Mix,
    pub bodies: Vec<Body>,
    /// Sent as `X-Request-Priority` when set (`/infer` only).
    pub priority: Option<u32>,
}

impl Workload {
    /// `variants` distinct bodies per row count (so routing varies), features
    /// uniform in [-1, 1) from a fixed seed.
    pub fn new(mix: Mix, input_dim: usize, variants: usize) -> Workload {
        let mut state = 0x5eed_1234_abcd_0001u64;
        let mut next = move || {
            // SplitMix64: deterministic, no dependency.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / 8_388_608.0) - 1.0
        };
        let mut row = |n: usize| -> String {
            let vals: Vec<String> = (0..n).map(|_| format!("{:.4}", next())).collect();
            format!("[{}]", vals.join(","))
        };
        let mut bodies = Vec::new();
        for v in 0..variants.max(1) {
            match &mix {
                Mix::Single => bodies.push(Body {
                    bytes: format!(r#"{{"features":{}}}"#, row(input_dim)).into_bytes(),
                    rows: 1,
                    v2_header_len: None,
                }),
                Mix::V2Binary => {
                    let head = format!(
                        r#"{{"inputs":[{{"name":"features","shape":[1,{input_dim}],"datatype":"FP32","parameters":{{"binary_data_size":{}}}}}],"parameters":{{"binary_data_output":true}}}}"#,
                        input_dim * 4
                    );
                    let mut bytes = head.clone().into_bytes();
                    // Same values as a JSON row would carry, little-endian f32.
                    let text = row(input_dim);
                    for v in text.trim_matches(|c| c == '[' || c == ']').split(',') {
                        bytes.extend_from_slice(&v.parse::<f32>().expect("a formatted f32").to_le_bytes());
                    }
                    bodies.push(Body {
                        bytes,
                        rows: 1,
                        v2_header_len: Some(head.len()),
                    });
                }
                Mix::Rows(counts) => {
                    // Rotate so consecutive requests differ in size whatever `variants`.
                    for i in 0..counts.len() {
                        let n = counts[(i + v) % counts.len()];
                        let rows: Vec<String> = (0..n).map(|_| row(input_dim)).collect();
                        let bytes = format!(r#"{{"features":[{}]}}"#, rows.join(",")).into_bytes();
                        bodies.push(Body {
                            bytes,
                            rows: n,
                            v2_header_len: None,
                        });
                    }
                }
            }
        }
        Workload {
            mix,
            bodies,
            priority: None,
        }
    }

    /// The same requests, naming priority level `level`.
    pub fn at_priority(mut self, level: u32) -> Workload {
        self.priority = Some(level);
        self
    }

    /// The `X-Request-Priority` value its requests carry, if any.
    fn priority_header(&self) -> Option<String> {
        self.priority.map(|p| p.to_string())
    }

    /// The route this workload posts to.
    pub fn path(&self) -> String {
        match self.mix {
            Mix::V2Binary => format!("/v2/models/{V2_MODEL}/infer"),
            _ => "/infer".to_string(),
        }
    }

    pub fn mean_rows(&self) -> f64 {
        self.bodies.iter().map(|b| b.rows as f64).sum::<f64>() / self.bodies.len() as f64
    }
}

/// Where and how long to drive load.
#[derive(Debug, Clone)]
pub struct Target {
    /// e.g. `http://127.0.0.1:1234`
    pub base_url: String,
    /// Scrape `/metrics` before and after the window (the engine only).
    pub scrape_metrics: bool,
    pub warmup: Duration,
    pub duration: Duration,
    /// A request with no answer after this is counted as lost.
    pub client_timeout: Duration,
}

/// A finished run: client-side stats and, for the engine, the two scrapes.
pub struct LoadRun {
    pub stats: RunStats,
    pub window: Duration,
    pub metrics_before: Option<MetricsSnapshot>,
    pub metrics_after: Option<MetricsSnapshot>,
}

/// The outcome of one request.
enum Outcome {
    Status(u16),
    Lost,
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(timeout)
        .max_idle_connections(1)
        .max_idle_connections_per_host(1)
        .no_delay(true)
        .build()
}

/// Sends one request (with `X-Request-Priority: priority` when given) and
/// reads the whole answer (so the connection is reused).
fn send(agent: &ureq::Agent, url: &str, body: &Body, priority: Option<&str>, buf: &mut Vec<u8>) -> Outcome {
    let request = match body.v2_header_len {
        Some(len) => agent
            .post(url)
            .set("content-type", "application/octet-stream")
            .set("inference-header-content-length", &len.to_string()),
        None => agent.post(url).set("content-type", "application/json"),
    };
    let request = match priority {
        Some(level) => request.set("x-request-priority", level),
        None => request,
    };
    let resp = match request.send_bytes(&body.bytes) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(_)) => return Outcome::Lost,
    };
    let status = resp.status();
    buf.clear();
    match resp.into_reader().read_to_end(buf) {
        Ok(_) => Outcome::Status(status),
        Err(_) => Outcome::Lost,
    }
}

/// `GET /metrics`, parsed.
pub fn scrape(base_url: &str) -> Option<MetricsSnapshot> {
    let text = ureq::get(&format!("{base_url}/metrics"))
        .timeout(Duration::from_secs(10))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    Some(MetricsSnapshot::parse(&text))
}

/// Per-thread tallies, merged at the end.
#[derive(Default)]
struct Tally {
    sent: u64,
    answered: u64,
    rejected: u64,
    other: u64,
    lost: u64,
    rows: u64,
    last_done: Option<Instant>,
    latency: LatencyHist,
    rejected_latency: LatencyHist,
    rejected_service: LatencyHist,
    lateness: LatencyHist,
}

impl Tally {
    /// Records a request whose latency origin is `origin` (send time, or the
    /// intended time in the open loop) and which was really sent at `sent_at`.
    fn record(&mut self, outcome: Outcome, rows: usize, origin: Instant, sent_at: Instant) {
        let done = Instant::now();
        self.sent += 1;
        self.last_done = Some(self.last_done.map_or(done, |t| t.max(done)));
        match outcome {
            Outcome::Status(200) => {
                self.answered += 1;
                self.rows += rows as u64;
                self.latency.record(done - origin);
            }
            Outcome::Status(429) => {
                self.rejected += 1;
                self.rejected_latency.record(done - origin);
                self.rejected_service.record(done - sent_at);
            }
            Outcome::Status(_) => self.other += 1,
            Outcome::Lost => self.lost += 1,
        }
    }

    fn merge(&mut self, o: Tally) {
        self.sent += o.sent;
        self.answered += o.answered;
        self.rejected += o.rejected;
        self.other += o.other;
        self.lost += o.lost;
        self.rows += o.rows;
        self.last_done = match (self.last_done, o.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.latency.merge(&o.latency);
        self.rejected_latency.merge(&o.rejected_latency);
        self.rejected_service.merge(&o.rejected_service);
        self.lateness.merge(&o.lateness);
    }

    fn into_stats(self, measure_start: Instant, open: bool) -> (RunStats, Duration) {
        let window = self
            .last_done
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(measure_start));
        let secs = window.as_secs_f64().max(1e-9);
        let stats = RunStats {
            sent: self.sent,
            answered: self.answered,
            rejected: self.rejected,
            other_status: self.other,
            lost: self.lost,
            rows_answered: self.rows,
            elapsed_s: window.as_secs_f64(),
            requests_per_s: self.answered as f64 / secs,
            rows_per_s: self.rows as f64 / secs,
            rejected_share: if self.sent > 0 {
                self.rejected as f64 / self.sent as f64
            } else {
                0.0
            },
            latency: self.latency.summary(),
            rejected_latency: self.rejected_latency.summary(),
            rejected_service_latency: self.rejected_service.summary(),
            send_lateness: open.then(|| self.lateness.summary()),
        };
        (stats, window)
    }
}

/// Sleeps until `at` on the calling thread (returns at once if it passed).
fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// A client thread's connection: one agent with one keep-alive connection.
struct Conn {
    agent: ureq::Agent,
    ready_url: String,
    last_used: Instant,
}

impl Conn {
    /// Opens the connection with an uncounted `GET /readyz`, retrying for a
    /// while (many threads connecting at once can overflow the listen backlog).
    fn open(base_url: &str, timeout: Duration) -> Conn {
        let mut c = Conn {
            agent: agent(timeout),
            ready_url: format!("{base_url}/readyz"),
            last_used: Instant::now(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.refresh() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        c
    }

    /// An uncounted request that (re)establishes the pooled connection.
    fn refresh(&mut self) -> bool {
        self.last_used = Instant::now();
        matches!(
            self.agent.get(&self.ready_url).call().map(|r| r.into_string()),
            Ok(Ok(_))
        )
    }

    /// The server closes idle keep-alive connections (actix: 5 s), and a POST
    /// on a connection closed under it fails without a retry; so a connection
    /// idle for a while is refreshed first (before the request's intended
    /// send time, so it costs the measurement nothing).
    fn keep_fresh(&mut self) {
        if self.last_used.elapsed() > Duration::from_secs(2) {
            self.refresh();
        }
    }

    fn send(&mut self, url: &str, body: &Body, priority: Option<&str>, buf: &mut Vec<u8>) -> Outcome {
        let outcome = send(&self.agent, url, body, priority, buf);
        self.last_used = Instant::now();
        outcome
    }
}

/// Runs `threads` copies of `body`, each on its own thread with its own
/// connection opened first, all starting on one clock (`start`, shared once
/// every connection is up). The main thread scrapes `/metrics` at
/// `start + warmup` and after every thread finished.
fn drive(
    target: &Target,
    threads: usize,
    open: bool,
    body: impl Fn(usize, &mut Conn, Instant) -> Tally + Send + Sync + 'static,
) -> LoadRun {
    let body = Arc::new(body);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let start = Arc::new(OnceLock::new());
    // Every thread that passes the barrier sets or reads the same instant.
    let clock = |start: &OnceLock<Instant>| *start.get_or_init(|| Instant::now() + Duration::from_millis(20));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (body, barrier, start) = (Arc::clone(&body), Arc::clone(&barrier), Arc::clone(&start));
            let (base_url, timeout) = (target.base_url.clone(), target.client_timeout);
            std::thread::Builder::new()
                .name(format!("loadgen-{i}"))
                .stack_size(STACK)
                .spawn(move || {
                    let mut conn = Conn::open(&base_url, timeout);
                    barrier.wait();
                    let start = clock(&start);
                    body(i, &mut conn, start)
                })
                .expect("spawn client thread")
        })
        .collect();
    barrier.wait();
    let measure_start = clock(&start) + target.warmup;
    sleep_until(measure_start);
    let before = if target.scrape_metrics {
        scrape(&target.base_url)
    } else {
        None
    };
    let mut total = Tally::default();
    for h in handles {
        total.merge(h.join().expect("client thread panicked"));
    }
    let after = if target.scrape_metrics {
        scrape(&target.base_url)
    } else {
        None
    };
    let (stats, window) = total.into_stats(measure_start, open);
    LoadRun {
        stats,
        window,
        metrics_before: before,
        metrics_after: after,
    }
}

/// Closed loop: `clients` threads, each with its own keep-alive connection,
/// each sending its next request as soon as the last is answered. Requests
/// sent during the warm-up are not counted.
pub fn closed_loop(target: &Target, workload: Arc<Workload>, clients: usize) -> LoadRun {
    let url = format!("{}{}", target.base_url, workload.path());
    let (warmup, duration) = (target.warmup, target.duration);
    let n = workload.bodies.len();
    let priority = workload.priority_header();
    drive(target, clients.max(1), false, move |i, conn, start| {
        let measure_start = start + warmup;
        let end = measure_start + duration;
        let mut buf = Vec::with_capacity(4096);
        let mut tally = Tally::default();
        sleep_until(start);
        // Start each client at a different body so sizes interleave.
        let mut k = i * 7;
        loop {
            let sent_at = Instant::now();
            if sent_at >= end {
                break;
            }
            let b = &workload.bodies[k % n];
            k += 1;
            let outcome = conn.send(&url, b, priority.as_deref(), &mut buf);
            let lost = matches!(outcome, Outcome::Lost);
            if sent_at >= measure_start {
                tally.record(outcome, b.rows, sent_at, sent_at);
            }
            if lost {
                // Do not spin on a dead server.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        tally
    })
}

/// Open loop: a fixed arrival rate. Ticket `i` is due at `start + i / rate`;
/// `conns` connection threads take tickets in order from one shared counter,
/// sleep until the ticket's intended time (or send at once if already late)
/// and measure latency from the intended time. Only tickets due inside the
/// measurement window are counted; every one of them is sent and accounted
/// (answered, rejected, other status, or lost). How late each send was is
/// recorded too: if the pool is too small for the server's latency the
/// lateness grows, and shows up in the latency as it should.
pub fn open_loop(target: &Target, workload: Arc<Workload>, rate: f64, conns: usize) -> LoadRun {
    let url = format!("{}{}", target.base_url, workload.path());
    let rate = rate.max(0.1);
    let total_secs = (target.warmup + target.duration).as_secs_f64();
    let tickets = (total_secs * rate).floor() as u64;
    let first_measured = (target.warmup.as_secs_f64() * rate).ceil() as u64;
    let next = Arc::new(AtomicU64::new(0));
    let n = workload.bodies.len() as u64;
    let priority = workload.priority_header();
    drive(target, conns.max(1), true, move |_, conn, start| {
        let mut buf = Vec::with_capacity(4096);
        let mut tally = Tally::default();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= tickets {
                break;
            }
            let intended = start + Duration::from_secs_f64(i as f64 / rate);
            conn.keep_fresh();
            sleep_until(intended);
            let sent_at = Instant::now();
            let b = &workload.bodies[(i % n) as usize];
            let outcome = conn.send(&url, b, priority.as_deref(), &mut buf);
            if i >= first_measured {
                tally.lateness.record(sent_at.saturating_duration_since(intended));
                tally.record(outcome, b.rows, intended, sent_at);
            }
        }
        tally
    })
}
