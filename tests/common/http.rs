//! HTTP over ureq: what a well-behaved client sends.
//!
//! Owns: the keep-alive [`agent`] with bounded timeouts, [`get`] / [`post`]
//! (and their `try_` forms that return a transport failure instead of
//! panicking), the complete answer they give ([`Reply`]), and
//! [`concurrent_clients`], several clients released at once. Must not touch:
//! requests ureq cannot send (see [`super::raw`]).

use std::io::Read;
use std::sync::Barrier;
use std::time::Duration;

use serde_json::Value;

/// A complete HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the engine's error shape: status, `{"error": non-empty, "type": kind}`.
    pub fn assert_error(&self, status: u16, kind: &str, context: &str) {
        assert_eq!(
            self.status,
            status,
            "{context}: status (body {:?})",
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        let msg = v["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{context}: no `error` string in {v}"));
        assert!(!msg.trim().is_empty(), "{context}: empty error message");
        assert_eq!(v["type"], kind, "{context}: error type in {v}");
    }
}

/// A keep-alive agent with bounded timeouts.
pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .build()
}

fn reply_of(response: ureq::Response) -> Result<Reply, String> {
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = response.header(&n).unwrap_or("").to_string();
            (n.to_ascii_lowercase(), v)
        })
        .collect();
    let mut body = Vec::new();
    response
        .into_reader()
        .read_to_end(&mut body)
        .map_err(|e| format!("reading the body: {e}"))?;
    Ok(Reply { status, headers, body })
}

/// A transport failure (no complete answer), as text.
pub type HttpError = String;

/// A ureq result as a [`Reply`] (4xx/5xx included) or a transport failure.
pub fn finish(result: Result<ureq::Response, ureq::Error>) -> Result<Reply, HttpError> {
    match result {
        Ok(r) | Err(ureq::Error::Status(_, r)) => reply_of(r),
        Err(e) => Err(e.to_string()),
    }
}

pub fn try_get(agent: &ureq::Agent, url: &str) -> Result<Reply, HttpError> {
    finish(agent.get(url).call())
}

pub fn get(agent: &ureq::Agent, url: &str) -> Reply {
    try_get(agent, url).unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// `POST` with `Content-Type: application/json` and `headers`.
pub fn try_post(agent: &ureq::Agent, url: &str, body: &str, headers: &[(&str, &str)]) -> Result<Reply, HttpError> {
    let mut req = agent.post(url).set("Content-Type", "application/json");
    for (k, v) in headers {
        req = req.set(k, v);
    }
    finish(req.send_string(body))
}

pub fn post(agent: &ureq::Agent, url: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
    try_post(agent, url, body, headers).unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// Runs `clients` client threads, each with its own keep-alive [`agent`],
/// released together by a barrier once every one has its agent; `client(c,
/// agent)` is what client `c` does. Returns each client's result, in client
/// order (a client that panics fails the test).
pub fn concurrent_clients<T: Send>(clients: usize, client: impl Fn(usize, &ureq::Agent) -> T + Sync) -> Vec<T> {
    let barrier = Barrier::new(clients);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (barrier, client) = (&barrier, &client);
                s.spawn(move || {
                    let agent = agent();
                    barrier.wait();
                    client(c, &agent)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    })
}
