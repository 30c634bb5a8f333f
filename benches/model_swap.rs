//! A version swap under load, measured from outside: the figures of
//! BENCHMARKS.md "Model updates under load" (issue 14).
//!
//! Owns: `cargo bench --bench model_swap`: starts the release binary on a
//! polled model repository holding version 1 of a synthetic model, drives it
//! with closed-loop `/infer` clients, renames version 2 into the repository,
//! and reports the time from the rename to the first answer from version 2,
//! the steady-state latency p99 before the rename, the longest request
//! latency from the rename until version 1 is freed, every non-200, and the
//! server's RSS (`/proc/PID/status`) before, at its peak during, and after.
//! Must not touch: the engine (it only talks HTTP to the binary).
//!
//! Run:
//!   cargo bench --bench model_swap -- [--size tiny] [--clients 8] [--poll-secs 0.5]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokitai_serve::model::{ModelSize, write_model_dir};

struct Args {
    size: ModelSize,
    clients: usize,
    poll_secs: f64,
    steady_secs: u64,
}

fn args() -> Args {
    let mut a = Args {
        size: ModelSize::Tiny,
        clients: 8,
        poll_secs: 0.5,
        steady_secs: 5,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match flag.as_str() {
            "--size" => a.size = value().parse().expect("--size nano|tiny|medium|full"),
            "--clients" => a.clients = value().parse().expect("--clients N"),
            "--poll-secs" => a.poll_secs = value().parse().expect("--poll-secs S"),
            "--steady-secs" => a.steady_secs = value().parse().expect("--steady-secs N"),
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// One answered request: when it started, how long it took, which version.
struct Sample {
    start: Instant,
    latency: Duration,
    version: u64,
    status: u16,
}

fn main() {
    let a = args();
    let repo = tempfile::tempdir().expect("tempdir");
    let stage = |v: u64| {
        let dir = repo.path().join(format!(".staging-{v}"));
        write_model_dir(&dir, a.size, v, false).expect("write the model");
        dir
    };
    let publish = |staging: &Path, v: u64| {
        let dest = repo.path().join("m").join(v.to_string());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::rename(staging, &dest).unwrap();
    };
    publish(&stage(1), 1);
    let v2 = stage(2);

    let mut child = Command::new(env!("CARGO_BIN_EXE_tokitai-serve"))
        .args(["--model-repository", repo.path().to_str().unwrap()])
        .args([
            "--model-control-mode",
            "poll",
            "--repository-poll-secs",
            &a.poll_secs.to_string(),
        ])
        .args(["--bind", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the release binary");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("listening on http://").map(str::to_string))
        .expect("the server says where it listens");
    std::thread::spawn(move || for _ in lines {});
    let url = format!("http://{addr}/infer");
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    while agent.get(&format!("http://{addr}/readyz")).call().is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let row: Vec<f32> = (0..96).map(|i| (i as f32 * 0.37).sin()).collect();
    let body = serde_json::json!({ "features": row }).to_string();

    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::<Sample>::new());
    let rss_trace = Mutex::new(Vec::<(Instant, u64)>::new());
    let (mut published_at, mut freed_at) = (None, None);
    std::thread::scope(|s| {
        for _ in 0..a.clients {
            s.spawn(|| {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let r = agent
                        .post(&url)
                        .set("content-type", "application/json")
                        .send_string(&body);
                    let latency = start.elapsed();
                    let (status, version) = match r {
                        Ok(r) => (
                            r.status(),
                            r.header("x-model-version").and_then(|v| v.parse().ok()).unwrap_or(0),
                        ),
                        Err(ureq::Error::Status(code, _)) => (code, 0),
                        Err(_) => (0, 0),
                    };
                    mine.push(Sample {
                        start,
                        latency,
                        version,
                        status,
                    });
                }
                samples.lock().unwrap().extend(mine);
            });
        }
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                rss_trace.lock().unwrap().push((Instant::now(), rss(pid)));
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        std::thread::sleep(Duration::from_secs(a.steady_secs));
        let t0 = Instant::now();
        publish(&v2, 2);
        published_at = Some(t0);
        // Version 1 is freed once RSS falls back near where it was: wait for
        // the swap, then for RSS to settle (bounded).
        let before = rss_trace
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t < t0)
            .map(|x| x.1)
            .max()
            .unwrap_or(0);
        let deadline = t0 + Duration::from_secs(120);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            let swapped = agent
                .post(&url)
                .set("content-type", "application/json")
                .send_string(&body)
                .ok()
                .and_then(|r| r.header("x-model-version").map(str::to_string))
                == Some("2".into());
            if swapped && rss(pid) < before + before / 4 {
                freed_at = Some(Instant::now());
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(2));
        stop.store(true, Ordering::Relaxed);
    });
    let _ = child.kill();
    let _ = child.wait();

    let t0 = published_at.unwrap();
    let freed = freed_at.expect("version 1 was freed within 2 minutes");
    let samples = samples.into_inner().unwrap();
    let mut steady: Vec<Duration> = samples
        .iter()
        .filter(|s| s.start + s.latency < t0)
        .map(|s| s.latency)
        .collect();
    steady.sort();
    let p = |v: &[Duration], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start + s.latency >= t0 && s.start <= freed)
        .collect();
    let worst = during.iter().map(|s| s.latency).max().unwrap_or_default();
    let first_v2 = samples
        .iter()
        .filter(|s| s.version == 2)
        .map(|s| s.start + s.latency)
        .min()
        .expect("an answer from version 2");
    let bad = samples.iter().filter(|s| s.status != 200).count();
    let trace = rss_trace.into_inner().unwrap();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let before = trace
        .iter()
        .filter(|(t, _)| *t < t0)
        .map(|x| x.1)
        .next_back()
        .unwrap_or(0);
    let peak = trace.iter().filter(|(t, _)| *t >= t0).map(|x| x.1).max().unwrap_or(0);
    let after = trace.last().map(|x| x.1).unwrap_or(0);
    println!(
        "model {} ({} clients, poll {} s): {} requests, {} non-200",
        a.size,
        a.clients,
        a.poll_secs,
        samples.len(),
        bad
    );
    println!(
        "new version on disk -> first answer from it: {:.0} ms",
        (first_v2 - t0).as_secs_f64() * 1e3
    );
    println!(
        "version 1 freed (RSS back) after: {:.0} ms",
        (freed - t0).as_secs_f64() * 1e3
    );
    println!(
        "steady state before the swap: {} requests, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        steady.len(),
        p(&steady, 0.5).as_secs_f64() * 1e3,
        p(&steady, 0.99).as_secs_f64() * 1e3,
        steady.last().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "during the swap (rename .. version 1 freed): {} requests, longest {:.2} ms",
        during.len(),
        worst.as_secs_f64() * 1e3
    );
    println!(
        "RSS before {:.0} MiB, peak during {:.0} MiB, after {:.0} MiB",
        mib(before),
        mib(peak),
        mib(after)
    );
}
