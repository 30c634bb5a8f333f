//! Client-observed latency and server CPU per request of `POST /infer`
//! over the Unix socket (`server.unix_socket`) or loopback TCP (issue 23).
//!
//! Owns: a small keep-alive HTTP/1.1 client (one thread and one connection
//! per `--connections`, each sending its next request when the last answer
//! arrived), the measured window (all connections warm up, then run
//! `--seconds` together), and reading the server's own CPU time around that
//! window (the first field of every `/proc/PID/task/*/schedstat`, in ns,
//! like `benches/server_cpu.sh`). Must not touch: the server (it only
//! reads its `/proc` files). wrk cannot dial a Unix socket; this can, and
//! dials TCP the same way, so the two differ only in the transport.
//!
//! ```text
//! cargo run --release --example uds_latency -- --target unix:/tmp/t/http.sock \
//!     --connections 64 --seconds 10 --pid SERVER_PID [--rows 1] [--warmup-secs 1] [--get PATH]
//! cargo run --release --example uds_latency -- --target tcp:127.0.0.1:9100 ...
//! ```
//!
//! Prints one JSON line: requests, rps, p50/p99/mean latency in µs, the
//! mean rows per batch the server formed meanwhile (from its `/metrics`),
//! and (with `--pid`) the server's CPU µs per request. Every answer must
//! be 200.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Where the server listens.
#[derive(Clone, Debug)]
enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Target {
    fn parse(text: &str) -> Result<Target, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let addr = text.strip_prefix("tcp:").unwrap_or(text);
        addr.parse()
            .map(Target::Tcp)
            .map_err(|e| format!("--target {text:?}: unix:PATH or tcp:IP:PORT ({e})"))
    }

    fn connect(&self) -> io::Result<Box<dyn Stream>> {
        match self {
            Target::Tcp(addr) => {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Target::Unix(path) => Ok(Box::new(UnixStream::connect(path)?)),
        }
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// The command line.
#[derive(Debug)]
struct Args {
    target: Target,
    connections: usize,
    seconds: f64,
    warmup_secs: f64,
    rows: usize,
    pid: Option<u32>,
    /// `--get PATH`: send `GET PATH` instead of `/infer` (e.g.
    /// `/v2/health/live`, the framework's own floor).
    get: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        target: Target::Tcp(SocketAddr::from(([127, 0, 0, 1], 9100))),
        connections: 1,
        seconds: 5.0,
        warmup_secs: 1.0,
        rows: 1,
        pid: None,
        get: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<f64>().map_err(|e| format!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--target" => args.target = Target::parse(&value)?,
            "--connections" => args.connections = number(&value)? as usize,
            "--seconds" => args.seconds = number(&value)?,
            "--warmup-secs" => args.warmup_secs = number(&value)?,
            "--rows" => args.rows = number(&value)? as usize,
            "--pid" => args.pid = Some(number(&value)? as u32),
            "--get" => args.get = Some(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.connections == 0 || args.rows == 0 {
        return Err("--connections and --rows must be at least 1".into());
    }
    Ok(args)
}

/// One request and its answer on a keep-alive connection: the status.
fn exchange(stream: &mut dyn Stream, request: &[u8], buf: &mut Vec<u8>) -> io::Result<u16> {
    stream.write_all(request)?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some((status, total)) = complete(buf) {
            if buf.len() > total {
                return Err(io::Error::other("bytes after the answer (nothing was pipelined)"));
            }
            return Ok(status);
        }
        match stream.read(&mut chunk)? {
            0 => return Err(io::Error::other("the server closed the connection")),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `(status, length)` once `buf` holds a whole answer (`Content-Length`).
fn complete(buf: &[u8]) -> Option<(u16, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some((status, head_end + length))
}

fn request(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The model's row width, from its v2 metadata (`inputs[0].shape[1]`).
fn row_width(target: &Target) -> Result<usize, String> {
    let mut stream = target.connect().map_err(|e| format!("connect {target:?}: {e}"))?;
    let mut buf = Vec::new();
    let status = exchange(&mut *stream, &request("GET", "/v2/models/tokitai-moe", ""), &mut buf)
        .map_err(|e| format!("metadata: {e}"))?;
    let body_start = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
    let meta: serde_json::Value = serde_json::from_slice(&buf[body_start..]).map_err(|e| format!("metadata: {e}"))?;
    meta["inputs"][0]["shape"][1]
        .as_u64()
        .filter(|_| status == 200)
        .map(|w| w as usize)
        .ok_or_else(|| format!("metadata ({status}) has no inputs[0].shape[1]: {meta}"))
}

/// `POST /infer` with `--rows` rows of the served model's width.
fn infer_request(args: &Args) -> Vec<u8> {
    let width = row_width(&args.target).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1);
    });
    let row = vec!["0.25"; width].join(",");
    let rows = vec![format!("[{row}]"); args.rows].join(",");
    request("POST", "/infer", &format!("{{\"features\":[{rows}]}}"))
}

/// The server's batches so far: `(rows, batches)` summed over its models
/// (`tokitai_batch_size_rows_sum` / `_count`). A server's CPU per request
/// depends on how many rows its batches hold, which depends on how
/// requests arrive, so each run reports its mean batch.
fn batches(target: &Target) -> (f64, f64) {
    let Ok(mut stream) = target.connect() else {
        return (0.0, 0.0);
    };
    let mut buf = Vec::new();
    if exchange(&mut *stream, &request("GET", "/metrics", ""), &mut buf).is_err() {
        return (0.0, 0.0);
    }
    let text = String::from_utf8_lossy(&buf);
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    (
        sum("tokitai_batch_size_rows_sum{"),
        sum("tokitai_batch_size_rows_count{"),
    )
}

/// The server's on-CPU time, ns, over all its threads.
fn server_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// One connection: warm up, wait for the start, send until `stop`.
fn client(target: &Target, body: &[u8], warmup: Duration, start: &Barrier, end: &Barrier, run: Duration) -> Vec<u32> {
    let mut stream = target.connect().expect("connect");
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut send = |stream: &mut Box<dyn Stream>| {
        let status = exchange(&mut **stream, body, &mut buf).expect("an answer");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&buf));
    };
    let warm = Instant::now();
    while warm.elapsed() < warmup {
        send(&mut stream);
    }
    start.wait();
    let deadline = Instant::now() + run;
    let mut latencies = Vec::with_capacity(1 << 16);
    while Instant::now() < deadline {
        let t = Instant::now();
        send(&mut stream);
        latencies.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
    }
    end.wait();
    latencies
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1e3
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(2);
    });
    let body = Arc::new(match &args.get {
        Some(path) => request("GET", path, ""),
        None => infer_request(&args),
    });
    let start = Arc::new(Barrier::new(args.connections + 1));
    let end = Arc::new(Barrier::new(args.connections + 1));
    let run = Duration::from_secs_f64(args.seconds);
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let threads: Vec<_> = (0..args.connections)
        .map(|_| {
            let (target, body, start, end) = (
                args.target.clone(),
                Arc::clone(&body),
                Arc::clone(&start),
                Arc::clone(&end),
            );
            std::thread::spawn(move || client(&target, &body, warmup, &start, &end, run))
        })
        .collect();
    start.wait();
    let (cpu_before, t0) = (args.pid.map(server_cpu_ns), Instant::now());
    let batches_before = batches(&args.target);
    end.wait();
    let (cpu_after, elapsed) = (args.pid.map(server_cpu_ns), t0.elapsed());
    let batches_after = batches(&args.target);
    let mean_batch_rows = (batches_after.0 - batches_before.0) / (batches_after.1 - batches_before.1).max(1.0);
    let mut all: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("a client thread"))
        .collect();
    all.sort_unstable();
    let requests = all.len();
    if requests == 0 {
        eprintln!("error: no request finished within --seconds");
        std::process::exit(1);
    }
    let cpu_us = cpu_before
        .zip(cpu_after)
        .map(|(b, a)| a.saturating_sub(b) as f64 / 1e3 / requests.max(1) as f64);
    let mean = all.iter().map(|&n| f64::from(n)).sum::<f64>() / requests.max(1) as f64 / 1e3;
    let target = match &args.target {
        Target::Tcp(a) => format!("tcp:{a}"),
        Target::Unix(p) => format!("unix:{}", p.display()),
    };
    println!(
        "{}",
        serde_json::json!({
            "target": target,
            "connections": args.connections,
            "route": args.get.as_deref().unwrap_or("/infer"),
            "rows": args.rows,
            "requests": requests,
            "rps": (requests as f64 / elapsed.as_secs_f64() * 10.0).round() / 10.0,
            "p50_us": (percentile(&all, 0.50) * 10.0).round() / 10.0,
            "p99_us": (percentile(&all, 0.99) * 10.0).round() / 10.0,
            "mean_us": (mean * 10.0).round() / 10.0,
            "server_cpu_us_per_request": cpu_us.map(|c| (c * 10.0).round() / 10.0),
            "mean_batch_rows": (mean_batch_rows * 10.0).round() / 10.0,
        })
    );
}
