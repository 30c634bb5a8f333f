//! The engine under test, started and stopped by the tests.
//!
//! Owns: [`TestServer`], the library's [`ServerThread`] serving on
//! `127.0.0.1:0` in this process, ready once `GET /readyz` answers 200 and
//! checked to have stopped cleanly; [`ProcessServer`], the real binary
//! ([`BIN`]) as a child process (for signal tests), its addresses read from
//! its `listening on grpc://ADDR` and `listening on http://ADDR` lines; and [`base_config`], the settings every
//! test server starts from. Must not touch: the engine's own start and stop
//! logic (that is `tokitai_serve::embed`). No fixed ports; every wait is
//! bounded.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokitai_serve::config::Config;
use tokitai_serve::embed::ServerThread;

use super::http::{agent, get, try_get};
use super::prom::Metrics;

/// The `tokitai-serve` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_tokitai-serve");

/// How often, and how far apart, `/readyz` and `/metrics` are polled.
const READY_POLLS: usize = 1500;
const METRICS_POLLS: usize = 500;
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// `Config::default()` with test-friendly settings: a short graceful
/// shutdown so a test never waits long on an idle keep-alive connection.
pub fn base_config() -> Config {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".into();
    config.grpc.bind = "127.0.0.1:0".into();
    config.server.shutdown_timeout_secs = 2;
    config
}

// ---- in-process server ----------------------------------------------------

/// The engine on its own thread ([`ServerThread`]). Stopped and joined on
/// [`TestServer::shutdown`] or drop; either way it must have stopped with
/// `Ok` (unless the test is already failing).
pub struct TestServer {
    addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    /// `http://IP:PORT`
    base: String,
    /// `None` once stopped.
    server: Option<ServerThread>,
}

impl TestServer {
    /// Starts a server with `config` and waits until it is ready.
    pub fn start(config: Config) -> TestServer {
        config.validate().expect("test config is valid");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        let server =
            ServerThread::spawn(&format!("test-server-{port}"), listener, config).expect("spawn server thread");
        let mut server = TestServer {
            addr: server.addr(),
            grpc_addr: server.grpc_addr(),
            base: server.base_url(),
            server: Some(server),
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let agent = agent();
        let url = self.url("/readyz");
        for _ in 0..READY_POLLS {
            if let Some(server) = self.server.take_if(|s| s.is_finished()) {
                panic!("server exited before it was ready: {:?}", server.stop());
            }
            if let Ok(r) = try_get(&agent, &url)
                && r.status == 200
            {
                return;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        panic!("server on {} was not ready after {READY_POLLS} polls", self.addr);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where gRPC is served (panics when the config turned it off).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr.expect("this test server serves gRPC")
    }

    /// `http://IP:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET /metrics`, parsed.
    pub fn metrics(&self) -> Metrics {
        metrics_at(&self.url("/metrics"))
    }

    /// Polls `/metrics` until `done` holds (bounded); returns the last sample.
    pub fn wait_metrics(&self, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
        wait_metrics_at(&self.url("/metrics"), what, done)
    }

    /// Stops the server gracefully and joins its thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            let result = server.stop();
            if !std::thread::panicking() {
                result.unwrap_or_else(|e| panic!("server on {} returned an error: {e}", self.addr));
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- subprocess server ----------------------------------------------------

/// The `tokitai-serve` binary serving on a free port.
pub struct ProcessServer {
    pub child: Child,
    pub addr: SocketAddr,
    /// Where gRPC is served (`None` when the binary was told not to).
    pub grpc_addr: Option<SocketAddr>,
}

impl ProcessServer {
    /// Spawns the binary with `args` and `env` (plus `TOKITAI_MODEL_BIND_ADDR=127.0.0.1:0`)
    /// and reads stdout until it says where it listens.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> ProcessServer {
        let mut cmd = Command::new(BIN);
        cmd.args(args).stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        ProcessServer::start_with(cmd)
    }

    /// Spawns `cmd` (the binary, with its arguments, environment and
    /// stderr as the caller wants them; stdin, stdout, the bind addresses
    /// and the log level are set here) and reads stdout until it says where
    /// it listens.
    pub fn start_with(mut cmd: Command) -> ProcessServer {
        cmd.env("TOKITAI_MODEL_BIND_ADDR", "127.0.0.1:0")
            .env("TOKITAI_GRPC_BIND", "127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tokitai-serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Read stdout on a thread so a server that never prints cannot hang the test.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut grpc = None;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                // The gRPC line comes first, when gRPC is on.
                if let Some(addr) = line.strip_prefix("listening on grpc://") {
                    grpc = Some(addr.trim().to_string());
                }
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send((addr.trim().to_string(), grpc.take()));
                    break;
                }
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let (addr, grpc_addr) = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("the binary never printed `listening on http://ADDR`");
            }
        };
        let addr: SocketAddr = addr.parse().expect("a socket address after `listening on http://`");
        let grpc_addr = grpc_addr.map(|a| a.parse().expect("a socket address after `listening on grpc://`"));
        ProcessServer { child, addr, grpc_addr }
    }

    /// `http://IP:PORT{path}`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM") with the `kill` command.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        None
    }
}

impl Drop for ProcessServer {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET url` (a `/metrics` address), parsed.
pub fn metrics_at(url: &str) -> Metrics {
    let r = get(&agent(), url);
    assert_eq!(r.status, 200, "GET {url}");
    Metrics::parse(&r.text())
}

/// Polls the `/metrics` at `url` until `done` holds (bounded); returns the
/// last sample.
pub fn wait_metrics_at(url: &str, what: &str, done: impl Fn(&Metrics) -> bool) -> Metrics {
    for _ in 0..METRICS_POLLS {
        let m = metrics_at(url);
        if done(&m) {
            return m;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    panic!("metrics never showed: {what}\n{}", metrics_at(url).text);
}
