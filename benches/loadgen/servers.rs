//! What the load generator drives: the real engine (in process, through
//! `tokitai_serve::embed::ServerThread`: `tokitai_serve::run` on its own
//! thread and actix `System`), and the baselines on the same kernels: the old
//! sidecar's design (one global mutex around one session, compute inline in
//! the handler), the framework floor (parse, then a canned answer), and the
//! offline forward ceiling.
//!
//! Owns: starting, readiness and stopping of every server under test, and the
//! bench-only actix servers' own thread (`BenchServer`, written once for the
//! old design and the floor). Must not touch: the engine's internals (it is
//! driven only through `tokitai_serve::embed`).
//!
//! When built by `cargo bench` all of this, engine included, is compiled with
//! the release-derived `bench` profile.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};
use serde::Serialize;
use tokio::sync::oneshot;

use tokitai_serve::backend::cpu::CpuBackend;
use tokitai_serve::backend::{Backend, ForwardOutput, Session, SessionConfig};
use tokitai_serve::config::Config;
use tokitai_serve::embed::ServerThread;
use tokitai_serve::input::InputLimits;
use tokitai_serve::model::Dims;
use tokitai_serve::sidecar_json::{parse_infer_request, write_infer_response};

/// Largest body the bench-only servers accept (the engine's default too).
const MAX_BODY: usize = 16 * 1024 * 1024;

fn bind_free_port() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")
}

/// Polls `url` until it answers 200: `true` then, `false` as soon as
/// `ended()` says the server's thread is gone; panics after `limit`.
fn wait_ready(url: &str, limit: Duration, ended: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(r) = ureq::get(url).timeout(Duration::from_secs(2)).call()
            && r.status() == 200
        {
            return true;
        }
        if ended() {
            return false;
        }
        assert!(Instant::now() < deadline, "{url} not ready after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The real engine on its own thread; `stop` drains it and joins.
pub struct EngineServer {
    pub base_url: String,
    thread: ServerThread,
}

impl EngineServer {
    /// Stops the engine and joins its thread; an engine that ended with an
    /// error is reported on stderr (the run's results stand).
    pub fn stop(self) {
        if let Err(e) = self.thread.stop() {
            eprintln!("engine at {} failed: {e}", self.base_url);
        }
    }
}

/// Starts the real engine with `config` on a free port and waits for
/// `/readyz` (model loaded, every worker warmed up).
pub fn start_engine(config: Config) -> EngineServer {
    config.validate().expect("engine config is valid");
    let thread = ServerThread::spawn("loadgen-engine", bind_free_port(), config).expect("spawn engine thread");
    let base_url = thread.base_url();
    let ready = wait_ready(&format!("{base_url}/readyz"), Duration::from_secs(300), || {
        thread.is_finished()
    });
    if !ready {
        let why = thread.stop().err().unwrap_or_else(|| "it stopped".into());
        panic!("engine failed: {why}");
    }
    EngineServer { base_url, thread }
}

/// A bench-only actix-web server on its own thread and `System`; `stop`
/// shuts it down and joins (dropping it does too).
pub struct BenchServer {
    pub base_url: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BenchServer {
    /// Serves `configure`'s routes on a free port with `http_workers` threads
    /// and waits for its `/readyz`.
    fn start<F>(name: &str, http_workers: usize, configure: F) -> BenchServer
    where
        F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
    {
        let listener = bind_free_port();
        let base_url = format!("http://{}", listener.local_addr().expect("local addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("loadgen-{name}"))
            .spawn(move || actix_rt::System::new().block_on(serve_actix(listener, http_workers, configure, rx)))
            .expect("spawn server thread");
        // Built before the wait, so a panic in it still stops and joins.
        let server = BenchServer {
            base_url,
            stop: Some(tx),
            thread: Some(thread),
        };
        let ended = || server.thread.as_ref().is_none_or(|t| t.is_finished());
        let ready = wait_ready(&format!("{}/readyz", server.base_url), Duration::from_secs(60), ended);
        assert!(ready, "the {name} server's thread ended before it was ready");
        server
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs an actix-web server with `configure`'s routes on `listener` until
/// `stop` fires (or its sender is dropped), then drains it.
async fn serve_actix<F>(listener: TcpListener, http_workers: usize, configure: F, stop: oneshot::Receiver<()>)
where
    F: Fn(&mut web::ServiceConfig) + Send + Clone + 'static,
{
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::PayloadConfig::new(MAX_BODY))
            .configure(configure.clone())
    })
    .workers(http_workers.max(1))
    .disable_signals()
    .shutdown_timeout(5)
    .listen(listener)
    .expect("listen")
    .run();
    let handle = server.handle();
    actix_rt::spawn(async move {
        let _ = stop.await;
        handle.stop(true).await;
    });
    server.await.expect("bench server failed");
}

async fn ready() -> HttpResponse {
    HttpResponse::Ok().body("ready")
}

/// A bench-only server's `/infer`: parses the body as the engine does (a 400
/// if it is invalid), then answers with `answer(rows, n_rows)`.
fn infer_with(
    body: &[u8],
    dims: Dims,
    max_rows: usize,
    answer: impl FnOnce(&[f32], usize) -> HttpResponse,
) -> HttpResponse {
    let limits = InputLimits {
        row_len: dims.input,
        max_rows,
    };
    match parse_infer_request(body, &limits) {
        Ok(r) => answer(r.input.values(), r.input.n_rows()),
        Err(e) => HttpResponse::BadRequest().body(e.to_string()),
    }
}

/// The old sidecar's design: one global `parking_lot::Mutex` around one
/// session; each handler parses, locks, computes its request alone inline on
/// the HTTP thread, and answers.
struct OldDesign {
    session: parking_lot::Mutex<(Box<dyn Session>, ForwardOutput)>,
    dims: Dims,
    max_rows: usize,
}

async fn old_infer(body: web::Bytes, st: web::Data<OldDesign>) -> HttpResponse {
    infer_with(&body, st.dims, st.max_rows, |rows, _| {
        let answer = {
            let mut guard = st.session.lock();
            let (session, out) = &mut *guard;
            match session.forward(rows, out) {
                Ok(()) => write_infer_response(&out.logits, st.dims.output, &out.router_weights, st.dims.experts),
                Err(e) => return HttpResponse::InternalServerError().body(e.to_string()),
            }
        };
        HttpResponse::Ok().content_type("application/json").body(answer)
    })
}

/// Starts the old design on `backend` with one session of `session_threads`.
pub fn start_old_design(
    backend: &Arc<dyn Backend>,
    session_threads: usize,
    http_workers: usize,
    max_rows: usize,
) -> BenchServer {
    let session = backend
        .create_session(SessionConfig {
            threads: session_threads,
        })
        .expect("session");
    let state = web::Data::new(OldDesign {
        session: parking_lot::Mutex::new((session, ForwardOutput::default())),
        dims: backend.dims(),
        max_rows,
    });
    BenchServer::start("old-design", http_workers, move |cfg| {
        cfg.app_data(state.clone())
            .route("/infer", web::post().to(old_infer))
            .route("/readyz", web::get().to(ready));
    })
}

/// The framework floor: parse the same JSON, answer a canned body of the
/// engine's answer size (pre-serialised per row count).
struct Floor {
    canned: HashMap<usize, web::Bytes>,
    dims: Dims,
    max_rows: usize,
}

async fn floor_infer(body: web::Bytes, st: web::Data<Floor>) -> HttpResponse {
    infer_with(&body, st.dims, st.max_rows, |_, n_rows| match st.canned.get(&n_rows) {
        Some(b) => HttpResponse::Ok().content_type("application/json").body(b.clone()),
        None => HttpResponse::InternalServerError().body("no canned answer for this row count"),
    })
}

/// Starts the framework floor; `row_counts` are the request sizes it will see.
/// The canned answers are the model's real answer to one row, repeated.
pub fn start_floor(
    backend: &Arc<dyn Backend>,
    row_counts: &[usize],
    http_workers: usize,
    max_rows: usize,
) -> BenchServer {
    let dims = backend.dims();
    let mut session = backend.create_session(SessionConfig { threads: 1 }).expect("session");
    let row: Vec<f32> = (0..dims.input).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    let mut out = ForwardOutput::default();
    session.forward(&row, &mut out).expect("forward");
    let canned = row_counts
        .iter()
        .map(|&n| {
            let logits = out.logits.repeat(n);
            let rw = out.router_weights.repeat(n);
            (
                n,
                web::Bytes::from(write_infer_response(&logits, dims.output, &rw, dims.experts)),
            )
        })
        .collect();
    let state = web::Data::new(Floor { canned, dims, max_rows });
    BenchServer::start("floor", http_workers, move |cfg| {
        cfg.app_data(state.clone())
            .route("/infer", web::post().to(floor_infer))
            .route("/readyz", web::get().to(ready));
    })
}

/// Builds a CPU backend from the same model the engine's `config` loads.
pub fn baseline_backend(config: &Config) -> Arc<dyn Backend> {
    let model = tokitai_serve::model::load_files_or_demo(config.model_files()).expect("load model");
    Arc::new(CpuBackend::new(model.weights, config.model.layernorm))
}

/// The offline forward (no HTTP): `sessions` threads, each with its own
/// session of `threads` on the same backend, running batches of `batch_rows`
/// back to back for `duration`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ceiling {
    pub sessions: usize,
    pub threads_per_session: usize,
    pub batch_rows: usize,
    pub batches: u64,
    pub elapsed_s: f64,
    pub rows_per_s: f64,
    pub batch_ms: f64,
}

pub fn offline_ceiling(
    backend: &Arc<dyn Backend>,
    sessions: usize,
    threads: usize,
    batch_rows: usize,
    duration: Duration,
) -> Ceiling {
    let dims = backend.dims();
    let batch_rows = batch_rows.max(1);
    let sessions = sessions.max(1);
    let barrier = Arc::new(Barrier::new(sessions + 1));
    let handles: Vec<_> = (0..sessions)
        .map(|s| {
            let backend = Arc::clone(backend);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut session = backend.create_session(SessionConfig { threads }).expect("session");
                let input: Vec<f32> = (0..batch_rows * dims.input)
                    .map(|i| (((i * 7919 + s * 104_729) % 2000) as f32 / 1000.0) - 1.0)
                    .collect();
                let mut out = ForwardOutput::default();
                session.forward(&input, &mut out).expect("warm-up forward");
                barrier.wait();
                let start = Instant::now();
                let end = start + duration;
                let mut batches = 0u64;
                while Instant::now() < end {
                    session.forward(&input, &mut out).expect("forward");
                    batches += 1;
                }
                (batches, start.elapsed())
            })
        })
        .collect();
    barrier.wait();
    let results: Vec<(u64, Duration)> = handles.into_iter().map(|h| h.join().expect("ceiling thread")).collect();
    let batches: u64 = results.iter().map(|r| r.0).sum();
    let elapsed = results
        .iter()
        .map(|r| r.1)
        .max()
        .unwrap_or_default()
        .as_secs_f64()
        .max(1e-9);
    // Each session's rate, summed: the sessions ran concurrently.
    let rows_per_s: f64 = results
        .iter()
        .map(|&(b, e)| (b as f64 * batch_rows as f64) / e.as_secs_f64().max(1e-9))
        .sum();
    let per_batch: f64 = results
        .iter()
        .map(|&(b, e)| e.as_secs_f64() / (b.max(1) as f64))
        .sum::<f64>()
        / sessions as f64;
    Ceiling {
        sessions,
        threads_per_session: threads,
        batch_rows,
        batches,
        elapsed_s: elapsed,
        rows_per_s,
        batch_ms: per_batch * 1000.0,
    }
}
