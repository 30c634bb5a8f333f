//! A real `prometheus` server for the tests, and the tool lookup it shares
//! with promtool.
//!
//! Owns: [`Prometheus`] (Debian's `prometheus` on a free loopback port with
//! its own storage and the configuration the test writes, killed on drop; its
//! HTTP API as [`Prometheus::query`] and [`Prometheus::scalar`]), [`tool`]
//! (a binary from an environment variable, `PATH` or /usr/bin, or a failed
//! test naming the package) and [`wait_for`] (a bounded poll). Must not touch:
//! what is scraped (the tests start their own engines). Every wait is bounded.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::http::agent;

/// Generous bounds: the CI machine may be small and busy.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(90);
pub const INSTALL_HINT: &str = "install Debian's `prometheus` package (`apt-get install -y prometheus`), which provides \
     `prometheus` and `promtool`, or point the PROMETHEUS / PROMTOOL environment variables at the binaries";

/// Finds a tool in `$env_var`, `PATH`, or /usr/bin; fails the test with the
/// install hint when it is missing.
pub fn tool(name: &str, env_var: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env_var}={} is not a file; {INSTALL_HINT}", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{name}` was not found on PATH: {INSTALL_HINT}"))
}

/// A `prometheus` server on a loopback port with its own storage; killed on drop.
pub struct Prometheus {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with the configuration `config` returns; it is
    /// given the server's own folder, for files the configuration names
    /// (file_sd targets, say).
    pub fn start(config: impl Fn(&Path) -> String) -> Prometheus {
        let binary = tool("prometheus", "PROMETHEUS");
        let mut last_log = String::new();
        // Port 0 is not supported: take a free port and release it. Another
        // process may grab it in between, so retry on a new one.
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let dir = tempfile::tempdir().expect("temp dir");
            let config_path = dir.path().join("prometheus.yml");
            std::fs::write(&config_path, config(dir.path())).unwrap();
            let log_path = dir.path().join("prometheus.log");
            let log = std::fs::File::create(&log_path).unwrap();
            let child = Command::new(&binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}; {INSTALL_HINT}", binary.display()));
            let mut prom = Prometheus {
                child,
                base: format!("http://127.0.0.1:{port}"),
                dir,
            };
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Ok(Some(status)) = prom.child.try_wait() {
                    last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    if last_log.contains("address already in use") {
                        break;
                    }
                    panic!("prometheus exited at start-up ({status}):\n{last_log}");
                }
                if matches!(agent().get(&format!("{}/-/ready", prom.base)).call(), Ok(r) if r.status() == 200) {
                    return prom;
                }
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    panic!("prometheus not ready within {START_TIMEOUT:?}:\n{log}");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        panic!("prometheus could not get a free port in 5 tries:\n{last_log}");
    }

    /// `GET /api/v1/<endpoint>`; the `data` of a successful answer.
    pub fn api(&self, endpoint: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let mut req = agent().get(&format!("{}/api/v1/{endpoint}", self.base));
        for (k, v) in params {
            req = req.query(k, v);
        }
        let body: Value = match req.call() {
            Ok(r) => r.into_json().map_err(|e| e.to_string())?,
            Err(ureq::Error::Status(code, r)) => {
                return Err(format!("HTTP {code}: {}", r.into_string().unwrap_or_default()));
            }
            Err(e) => return Err(e.to_string()),
        };
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"].clone())
    }

    /// An instant query's result list.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", promql)])?;
        match &data["result"] {
            Value::Array(a) if data["resultType"] == "scalar" || data["resultType"] == "string" => {
                Ok(vec![Value::Array(a.clone())])
            }
            Value::Array(a) => Ok(a.clone()),
            other => Err(format!("unexpected result {other}")),
        }
    }

    /// The single value of a query answering one series (None when empty).
    pub fn scalar(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).ok()?;
        let value = result.first()?.get("value")?.get(1)?.as_str()?.parse().ok()?;
        Some(value)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns Some, or fails with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
