//! API keys (`server.api_keys_file`, issue 23) on HTTP, against the real
//! server: every route asks for its scope (the probes for none), a request
//! with no, a malformed or an unknown key gets 401 with `WWW-Authenticate`
//! and the error JSON of its route's protocol, a key without the scope 403;
//! the refusals are counted by reason; `server.metrics_scope` and
//! `server.metadata_scope` move or open their routes; a refused request is
//! answered before its body is read; with no file nothing is asked. The real
//! binary, driven with curl: SIGHUP re-reads the keys, a broken file keeps
//! the old ones (and the log says why without quoting a key), and a missing
//! file stops the start-up.
//!
//! Owns: nothing but tests. Must not touch: the engine's code.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokitai_serve::config::{Config, ScopeSetting};

use crate::common::{
    BIN, Metrics, ProcessServer, Reply, TestServer, agent, base_config, finish, nano_dims, raw_exchange, raw_request,
};

const MODEL: &str = "tokitai-moe";
const INFER_KEY: &str = "infer-key-0123456789abcdef";
const REPOSITORY_KEY: &str = "repository-key-0123456789abcdef";
const METADATA_KEY: &str = "metadata-key-0123456789abcdef";
const METRICS_KEY: &str = "metrics-key-0123456789abcdef";
const UNKNOWN_KEY: &str = "unknown-key-0123456789abcdef";
const REALM: &str = "Bearer realm=\"tokitai-serve\"";
/// How long a poll for a condition may take.
const POLL_LIMIT: Duration = Duration::from_secs(30);

/// Each scope's key in [`keys_file`].
const SCOPE_KEYS: [(&str, &str); 4] = [
    ("infer", INFER_KEY),
    ("repository", REPOSITORY_KEY),
    ("metadata", METADATA_KEY),
    ("metrics", METRICS_KEY),
];

fn keys_file() -> String {
    let mut text = String::from("# one key per scope\n\n");
    for (scope, key) in SCOPE_KEYS {
        text.push_str(&format!("{key} {scope}   # the {scope} client\n"));
    }
    text
}

/// A server whose keys file holds `text`, with `tweak` applied to its config.
fn keyed_server(text: &str, tweak: impl FnOnce(&mut Config)) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api-keys");
    std::fs::write(&path, text).unwrap();
    let mut config = base_config();
    config.server.api_keys_file = Some(path);
    tweak(&mut config);
    (TestServer::start(config), dir)
}

/// Every route: method, path, the scope it needs (`None`: open).
fn routes() -> Vec<(&'static str, String, Option<&'static str>)> {
    let m = MODEL;
    let mut out: Vec<(&str, String, Option<&str>)> = Vec::new();
    let open = ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"].map(String::from);
    let model_ready = [
        format!("/v2/models/{m}/ready"),
        format!("/v2/models/{m}/versions/1/ready"),
    ];
    out.extend(open.into_iter().chain(model_ready).map(|p| ("GET", p, None)));
    for p in [
        "/infer".to_string(),
        format!("/v2/models/{m}/infer"),
        format!("/v2/models/{m}/versions/1/infer"),
    ] {
        out.push(("POST", p, Some("infer")));
    }
    out.push(("GET", "/metrics".to_string(), Some("metrics")));
    let metadata = [
        "/v2".to_string(),
        format!("/v2/models/{m}"),
        format!("/v2/models/{m}/versions/1"),
        format!("/v2/models/{m}/config"),
        format!("/v2/models/{m}/versions/1/config"),
        format!("/v2/models/{m}/stats"),
        format!("/v2/models/{m}/versions/1/stats"),
    ];
    out.extend(metadata.into_iter().map(|p| ("GET", p, Some("metadata"))));
    // A model that does not exist: an allowed call changes nothing.
    let repository = [
        "/v2/repository/index",
        "/v2/repository/models/nosuch/load",
        "/v2/repository/models/nosuch/unload",
    ];
    out.extend(repository.map(|p| ("POST", p.to_string(), Some("repository"))));
    out
}

/// A well-formed body for a POST to `path`.
fn body_for(path: &str) -> String {
    let row = vec![0.25f32; nano_dims().input];
    if path == "/infer" {
        json!({ "features": row }).to_string()
    } else if path.ends_with("/infer") {
        json!({ "inputs": [{ "name": "features", "shape": [1, row.len()], "datatype": "FP32", "data": row }] })
            .to_string()
    } else {
        "{}".to_string()
    }
}

/// `method path` on `server` with `authorization` (the header's whole
/// value), if any.
fn send(a: &ureq::Agent, server: &TestServer, method: &str, path: &str, authorization: Option<&str>) -> Reply {
    let mut req = a.request(method, &server.url(path));
    if let Some(value) = authorization {
        req = req.set("Authorization", value);
    }
    let result = if method == "POST" {
        req.set("Content-Type", "application/json").send_string(&body_for(path))
    } else {
        req.call()
    };
    finish(result).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// The error JSON of `path`'s protocol: `{"error", "type": kind}` on the
/// plain routes, `{"error"}` on v2.
fn assert_error_json(r: &Reply, path: &str, kind: &str, what: &str) -> String {
    let v = r.json();
    let message = v["error"].as_str().unwrap_or_else(|| panic!("{what}: no error in {v}"));
    assert!(!message.is_empty(), "{what}");
    if path.starts_with("/v2") {
        assert!(v.get("type").is_none(), "{what}: v2's error format: {v}");
    } else {
        assert_eq!(v["type"], kind, "{what}: {v}");
    }
    for (_, key) in SCOPE_KEYS {
        assert!(!message.contains(key), "{what}: the answer quotes a key: {message}");
    }
    message.to_string()
}

fn assert_unauthorized(r: &Reply, path: &str, error: Option<&str>, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", String::from_utf8_lossy(&r.body));
    let challenge = r
        .header("www-authenticate")
        .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"));
    let want = match error {
        None => REALM.to_string(),
        Some(e) => format!("{REALM}, error=\"{e}\""),
    };
    assert_eq!(challenge, want, "{what}");
    assert_error_json(r, path, "unauthorized", what);
}

fn assert_forbidden(r: &Reply, path: &str, scope: &str, what: &str) {
    assert_eq!(r.status, 403, "{what}: {}", String::from_utf8_lossy(&r.body));
    let message = assert_error_json(r, path, "forbidden", what);
    assert!(
        message.contains(&format!("does not have the `{scope}` scope")),
        "{what}: {message}"
    );
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{what}: {challenge}"
    );
}

/// `/metrics` read with the metrics key.
fn metrics(a: &ureq::Agent, server: &TestServer) -> Metrics {
    let r = send(a, server, "GET", "/metrics", Some(&bearer(METRICS_KEY)));
    assert_eq!(r.status, 200, "GET /metrics with the metrics key");
    Metrics::parse(&r.text())
}

#[test]
fn every_route_asks_for_its_scope_and_the_probes_stay_open() {
    let (server, _dir) = keyed_server(&keys_file(), |_| {});
    let a = agent();
    let mut guarded = 0.0;
    for (method, path, needs) in routes() {
        let what = format!("{method} {path}");
        let Some(scope) = needs else {
            let r = send(&a, &server, method, &path, None);
            assert!(!matches!(r.status, 401 | 403), "{what} is open: {}", r.status);
            continue;
        };
        guarded += 1.0;
        let refused = send(&a, &server, method, &path, None);
        assert_unauthorized(&refused, &path, None, &format!("{what}, no key"));
        // Its body is never read: the client must not reuse the connection.
        let closes = refused.header("connection") == Some("close");
        assert_eq!(closes, method == "POST", "{what}: Connection: close with a body unread");
        let unknown = send(&a, &server, method, &path, Some(&bearer(UNKNOWN_KEY)));
        assert_unauthorized(&unknown, &path, Some("invalid_token"), &format!("{what}, unknown key"));
        for (key_scope, key) in SCOPE_KEYS {
            let r = send(&a, &server, method, &path, Some(&bearer(key)));
            let with = format!("{what} with the {key_scope} key");
            if key_scope != scope {
                assert_forbidden(&r, &path, scope, &with);
            } else if method == "POST" && path.ends_with("/infer") && !path.contains("/versions/") {
                assert_eq!(r.status, 200, "{with}: {}", String::from_utf8_lossy(&r.body));
            } else {
                assert!(!matches!(r.status, 401 | 403), "{with}: {}", r.status);
            }
        }
    }
    for malformed in ["Basic aW5mZXI6a2V5", "Bearer", "Bearer two words"] {
        let r = send(&a, &server, "POST", "/infer", Some(malformed));
        assert_unauthorized(&r, "/infer", Some("invalid_request"), malformed);
    }
    let m = metrics(&a, &server);
    let auth = |reason: &str| m.sum("tokitai_auth_failures_total", &[("reason", reason)]);
    assert_eq!(auth("missing_key"), guarded);
    assert_eq!(auth("unknown_key"), guarded);
    assert_eq!(auth("malformed"), 3.0);
    assert_eq!(auth("missing_scope"), guarded * 3.0);
    let failures = |reason: &str, route: &str| {
        m.sum(
            "tokitai_request_failures_total",
            &[("reason", reason), ("route", route)],
        )
    };
    assert_eq!(failures("unauthorized", "/infer"), 5.0, "no key, unknown, 3 malformed");
    assert_eq!(failures("forbidden", "/infer"), 3.0);
    assert_eq!(failures("unauthorized", "/v2/repository/index"), 2.0);
    assert_eq!(m.requests_by_status("/metrics").get(&401), Some(&2));
    server.shutdown();
}

#[test]
fn the_scope_settings_open_or_move_metrics_and_metadata() {
    let (server, _dir) = keyed_server(&keys_file(), |c| {
        c.server.metrics_scope = ScopeSetting::None;
        c.server.metadata_scope = ScopeSetting::Infer;
    });
    let a = agent();
    let scrape = send(&a, &server, "GET", "/metrics", None);
    assert_eq!(scrape.status, 200, "metrics_scope = none: a Prometheus without a key");
    let metadata = format!("/v2/models/{MODEL}");
    assert_unauthorized(
        &send(&a, &server, "GET", &metadata, None),
        &metadata,
        None,
        "metadata, no key",
    );
    assert_eq!(
        send(&a, &server, "GET", &metadata, Some(&bearer(INFER_KEY))).status,
        200
    );
    let meta_key = send(&a, &server, "GET", &metadata, Some(&bearer(METADATA_KEY)));
    assert_forbidden(&meta_key, &metadata, "infer", "metadata_scope = infer");
    server.shutdown();
}

#[test]
fn with_no_keys_file_no_key_is_asked() {
    let server = TestServer::start(base_config());
    let a = agent();
    for (method, path, _) in routes() {
        for authorization in [None, Some("Basic nonsense")] {
            let r = send(&a, &server, method, &path, authorization);
            assert!(!matches!(r.status, 401 | 403), "{method} {path}: {}", r.status);
        }
    }
    server.shutdown();
}

#[test]
fn a_refused_request_is_answered_before_its_body_is_read() {
    let (server, _dir) = keyed_server(&keys_file(), |_| {});
    // The head announces 10 MB and none of it is ever sent: the answer can
    // only come from the head.
    for (path, auth) in [
        ("/infer", None),
        ("/v2/models/tokitai-moe/infer", Some(bearer(UNKNOWN_KEY))),
    ] {
        let mut headers = vec![("Content-Type", "application/json"), ("Content-Length", "10000000")];
        if let Some(value) = &auth {
            headers.push(("Authorization", value.as_str()));
        }
        let r = raw_exchange(server.addr(), &raw_request("POST", path, &headers, b"")).expect_response(path);
        assert_unauthorized(&r, path, auth.as_ref().map(|_| "invalid_token"), path);
    }
    server.shutdown();
}

#[test]
fn a_request_without_a_key_gets_no_100_continue() {
    let (server, _dir) = keyed_server(&keys_file(), |_| {});
    let headers = [
        ("Content-Type", "application/json"),
        ("Content-Length", "10000000"),
        ("Expect", "100-continue"),
    ];
    for path in ["/infer", "/v2/models/tokitai-moe/infer", "/%69nfer"] {
        let r = raw_exchange(server.addr(), &raw_request("POST", path, &headers, b"")).expect_response(path);
        assert_unauthorized(&r, path, None, &format!("{path}: refused instead of 100 Continue"));
        assert_eq!(r.header("connection"), Some("close"), "{path}");
    }
    server.shutdown();
}

#[test]
fn a_percent_encoded_path_needs_the_scope_of_the_route_it_reaches() {
    let (server, _dir) = keyed_server(&keys_file(), |_| {});
    // actix routes on the percent-decoded path: `/%69nfer` is `/infer`.
    let cases = [
        ("POST", "/%69nfer", INFER_KEY),
        ("GET", "/%762/models/tokitai-moe", METADATA_KEY),
        ("GET", "/v2/models/tokitai-moe/%63onfig", METADATA_KEY),
        ("POST", "/v2/%72epository/index", REPOSITORY_KEY),
        ("GET", "/%6detrics", METRICS_KEY),
    ];
    for (method, path, key) in cases {
        let ask = |authorization: Option<String>| {
            let mut headers = vec![("Content-Type", "application/json")];
            let value = authorization.unwrap_or_default();
            if !value.is_empty() {
                headers.push(("Authorization", value.as_str()));
            }
            let body = if path.ends_with("nfer") {
                body_for("/infer")
            } else {
                "{}".to_string()
            };
            let request = raw_request(method, path, &headers, body.as_bytes());
            raw_exchange(server.addr(), &request).expect_response(path)
        };
        assert_eq!(ask(None).status, 401, "{method} {path} without a key");
        let with_key = ask(Some(bearer(key)));
        assert_eq!(
            with_key.status,
            200,
            "{method} {path}: {}",
            String::from_utf8_lossy(&with_key.body)
        );
    }
    server.shutdown();
}

// ---- the real binary, driven with curl ---------------------------------------

/// `curl` POST /infer with `-H 'Authorization: Bearer KEY'`: the status.
fn curl_infer(addr: std::net::SocketAddr, key: Option<&str>) -> u16 {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30"]);
    cmd.args(["-H", "Content-Type: application/json", "--data", &body_for("/infer")]);
    if let Some(key) = key {
        cmd.args(["-H", &format!("Authorization: Bearer {key}")]);
    }
    let out = cmd.arg(format!("http://{addr}/infer")).output().expect("run curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .parse()
        .expect("curl printed a status")
}

fn poll(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < POLL_LIMIT, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The binary with `TOKITAI_SERVER_API_KEYS_FILE=keys`, its stderr in `log`.
fn binary(keys: &Path, log: &tempfile::NamedTempFile) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("TOKITAI_SERVER_API_KEYS_FILE", keys)
        .stderr(log.reopen().expect("reopen the log file"));
    cmd
}

#[test]
fn sighup_rereads_the_keys_and_a_broken_file_keeps_the_old_ones() {
    const NEW_KEY: &str = "rotated-key-0123456789abcdef";
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("{INFER_KEY} infer\n")).unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let server = ProcessServer::start_with(binary(&keys, &log));
    poll("ready", || curl_infer(server.addr, Some(INFER_KEY)) == 200);
    assert_eq!(curl_infer(server.addr, None), 401);
    assert_eq!(curl_infer(server.addr, Some(NEW_KEY)), 401);

    std::fs::write(&keys, format!("# rotated\n{NEW_KEY} infer,metrics\n")).unwrap();
    server.signal("HUP");
    poll("the new key is taken", || curl_infer(server.addr, Some(NEW_KEY)) == 200);
    assert_eq!(curl_infer(server.addr, Some(INFER_KEY)), 401, "the old key is gone");

    // Line 3 names a scope that does not exist: nothing of this file is taken.
    std::fs::write(&keys, format!("{NEW_KEY} infer\n\n{INFER_KEY} infer,admin\n")).unwrap();
    server.signal("HUP");
    let text = || std::fs::read_to_string(log.path()).unwrap();
    poll("the log says the file was not re-read", || {
        text().contains("API keys file not re-read")
    });
    assert_eq!(curl_infer(server.addr, Some(NEW_KEY)), 200, "the keys before stay");
    assert_eq!(
        curl_infer(server.addr, Some(INFER_KEY)),
        401,
        "nothing of the broken file is taken"
    );
    let metrics = Command::new("curl")
        .args(["-sS", "-H", &format!("Authorization: Bearer {NEW_KEY}")])
        .arg(server.url("/metrics"))
        .output()
        .unwrap();
    let m = Metrics::parse(&String::from_utf8_lossy(&metrics.stdout));
    // At least: the new key before the SIGHUP, the old one after each.
    assert!(m.sum("tokitai_auth_failures_total", &[("reason", "unknown_key")]) >= 3.0);
    let log = text();
    assert!(log.contains("line 3: scope 2 is not one of"), "{log}");
    for key in [INFER_KEY, NEW_KEY] {
        assert!(!log.contains(key), "the log quotes a key:\n{log}");
    }
}

#[test]
fn a_missing_or_broken_keys_file_stops_the_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    std::fs::write(&broken, format!("{INFER_KEY}\n")).unwrap();
    for (path, why) in [
        (dir.path().join("missing"), "No such file"),
        (broken, "line 1: no scope"),
    ] {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = binary(&path, &log);
        cmd.env("TOKITAI_MODEL_BIND_ADDR", "127.0.0.1:0")
            .env("TOKITAI_GRPC_BIND", "127.0.0.1:0")
            .stdout(Stdio::null());
        let mut child = cmd.spawn().expect("spawn the binary");
        let mut status = None;
        poll("the binary exits", || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        assert!(!status.unwrap().success(), "{}", path.display());
        let text = std::fs::read_to_string(log.path()).unwrap();
        let want = format!("server.api_keys_file {}: ", path.display());
        assert!(text.contains(&want) && text.contains(why), "{text}");
        assert!(!text.contains(INFER_KEY), "{text}");
    }
}
